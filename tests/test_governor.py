from decimal import Decimal

import pytest

from riskkernel.governor import Governor, Refused, Spend, Ticket
from riskkernel.models import Budget, HaltReason, Refusal

D = Decimal


def governor(**limits: object) -> Governor:
    budget = Budget(**{"max_cost": None, **limits})  # type: ignore[arg-type]
    return Governor(budget, "0123456789abcdef", started=0.0)


def admit(g: Governor, cost: str = "0.01", tokens: int = 100) -> Ticket:
    ticket = g.admit(Spend(D(cost), tokens, 1))
    assert isinstance(ticket, Ticket), ticket
    return ticket


def test_cost_halts_when_spend_reaches_the_cap_and_stays_halted() -> None:
    g = governor(max_cost=D("0.05"))
    for _ in range(4):
        assert g.settle(admit(g), D("0.01"), 100) is None
    assert g.settle(admit(g), D("0.01"), 100) == HaltReason.COST
    refused = g.admit(Spend(D("0.01"), 100, 1))
    assert refused == Refused(HaltReason.COST, "rk: cost budget exceeded — spent $0.0500 of $0.05 (run 01234567…)")
    assert g.halt(HaltReason.KILLED) is False and g.halt_reason == HaltReason.COST


@pytest.mark.parametrize(
    ("limits", "reason", "calls_before_halt"),
    [({"max_tokens": 450}, HaltReason.TOKENS, 5), ({"max_calls": 3}, HaltReason.CALLS, 3)],
)
def test_tokens_and_calls_halt_at_the_call_that_reaches_them(
    limits: dict[str, int], reason: HaltReason, calls_before_halt: int
) -> None:
    g = governor(**limits)
    for n in range(1, calls_before_halt + 1):
        halt = g.settle(admit(g), D("0.001"), 100)
        assert halt == (reason if n == calls_before_halt else None)
    assert isinstance(g.admit(Spend(D(0), 1, 1)), Refused)


def test_call_budget_message() -> None:
    g = governor(max_calls=2)
    g.settle(admit(g), D(0), 1)
    g.settle(admit(g), D(0), 1)
    assert g.message(HaltReason.CALLS) == "rk: call budget exceeded — 2 of 2 calls (run 01234567…)"


def test_in_flight_reservations_block_admission_without_halting() -> None:
    g = governor(max_cost=D("0.10"))
    first = admit(g, "0.06")
    second = admit(g, "0.06")  # spent + reserved = 0.06 < 0.10: still room
    third = g.admit(Spend(D("0.06"), 10, 1))
    assert isinstance(third, Refused) and third.reason == Refusal.INSUFFICIENT_BUDGET
    assert "2 calls in flight" in third.message
    assert g.halt_reason is None
    g.settle(first, D("0.01"), 10)
    g.settle(second, D("0.01"), 10)
    assert g.reserved == Spend() and g.in_flight == 0
    admit(g, "0.06")


def test_a_zero_cost_budget_admits_only_free_calls() -> None:
    g = governor(max_cost=D(0))
    refused = g.admit(Spend(D("0.0001"), 10, 1))
    assert isinstance(refused, Refused) and "no paid call" in refused.message
    free = admit(g, "0")
    assert g.settle(free, D(0), 10) is None and g.halt_reason is None


def test_live_streams_count_towards_the_cap() -> None:
    g = governor(max_cost=D("0.10"))
    done = admit(g)
    g.settle(done, D("0.04"), 100)
    a, b = admit(g), admit(g)
    assert g.progress(a, D("0.03"), 10) is None
    assert g.progress(b, D("0.03"), 10) == HaltReason.COST  # 0.04 + 0.03 + 0.03
    g.settle(a, D("0.03"), 10)
    g.settle(b, D("0.031"), 10)
    assert g.live == Spend() and g.spent.cost == D("0.101")


def test_settling_twice_is_harmless() -> None:
    g = governor(max_calls=10)
    t = admit(g)
    g.settle(t, D("0.01"), 5)
    g.settle(t, D("0.01"), 5)
    assert g.spent == Spend(D("0.01"), 5, 1)


def test_time_budget() -> None:
    g = governor(max_time=60.0)
    assert g.deadline() == 60.0
    assert g.check_time(59.9) is False
    assert g.check_time(60.0) is True and g.halt_reason == HaltReason.TIME
    assert g.message(HaltReason.TIME) == "rk: time budget exceeded — the run's 1m are up (run 01234567…)"
    assert g.check_time(61.0) is False


def test_remaining_cost() -> None:
    g = governor(max_cost=D("1.00"))
    g.settle(admit(g), D("1.25"), 1)
    assert g.remaining_cost == 0
    assert governor().remaining_cost is None
