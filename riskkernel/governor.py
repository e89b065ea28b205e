"""Admit, settle and halt for one run: pure bookkeeping, no I/O, no asyncio, no clock of its own.

- Admission: a call is admitted only if the run is not halted and, in every limited dimension, spent plus
  the reservations of the calls in flight is still below the limit. The admitted call then reserves its own
  estimate until it settles, so concurrent calls cannot jointly run far past a cap: a burst overshoots by
  at most about one call. A call that finds the room taken by calls in flight is refused with
  `insufficient_budget`, which does not halt the run (those calls may settle below their estimates).
- Settling releases the reservation and charges what the call actually used. When spend reaches a limit
  the run halts, and a halted run stays halted.
- Streams report their running usage as it flows; when spent plus the running streams reaches a limit the
  run halts, and the caller cuts its live streams.
- A cost limit of 0 admits only calls whose estimate is free; other dimensions have no such exception.
- Under `--strict` (`Budget.strict`) the call's own reservation must fit as well: spent plus every
  reservation never passes a cost or token limit, so, with reservations that are true worst cases, spend
  never does either. The caller first lowers the call's output limit to `room()` if it must.
- With `max_repeats`, the same request seen that many times halts the run with `loop_detected`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from decimal import Decimal

from riskkernel.models import Budget, HaltReason, Refusal

ZERO = Decimal(0)
STRICT_MIN_OUTPUT = 256  # under --strict, a call is not clamped below this many output tokens: it is refused


@dataclass(slots=True)
class Spend:
    cost: Decimal = ZERO
    tokens: int = 0
    calls: int = 0


@dataclass(slots=True)
class Ticket:
    """An admitted call: what it reserved and what it has used so far while streaming."""

    reserved: Spend
    running_cost: Decimal = ZERO
    running_tokens: int = 0
    settled: bool = False


@dataclass(frozen=True, slots=True)
class Refused:
    reason: str  # a HaltReason when the run is halted, else a Refusal
    message: str
    # Calls in flight hold the room it needs: it may fit once they settle below what they reserved.
    may_fit_later: bool = False


def format_money(amount: Decimal) -> str:
    return f"${amount:.4f}"


def format_duration(seconds: float) -> str:
    if seconds < 10 and seconds != int(seconds):
        return f"{seconds:.1f}s"
    seconds = int(seconds)
    if seconds < 60 or seconds % 60:
        return f"{seconds}s" if seconds < 60 else f"{seconds // 60}m{seconds % 60:02d}s"
    minutes = seconds // 60
    return f"{minutes}m" if minutes < 60 or minutes % 60 else f"{minutes // 60}h"


class Governor:
    def __init__(self, budget: Budget, run_id: str, started: float) -> None:
        self.budget = budget
        self.run_id = run_id
        self.started = started  # monotonic seconds
        self.spent = Spend()
        self.reserved = Spend()
        self.live = Spend()  # running usage of live streams, not yet settled
        self.in_flight = 0
        self.halt_reason: HaltReason | None = None
        self._seen: dict[bytes, int] = {}  # request digest -> times seen, under max_repeats

    @property
    def watches_spend(self) -> bool:
        """Whether a live stream's running spend can halt the run (a cost or token limit is set)."""
        return self.budget.max_cost is not None or self.budget.max_tokens is not None

    # -- decisions -------------------------------------------------------------------------------------

    def admit(self, estimate: Spend) -> Ticket | Refused:
        """Admit a call that may use `estimate`, or refuse it. The caller checks the clock first."""
        if self.halt_reason is not None:
            return Refused(self.halt_reason, self.message(self.halt_reason))
        b, spent, reserved = self.budget, self.spent, self.reserved
        if b.max_cost is not None and estimate.cost > 0:
            held = spent.cost + reserved.cost + (estimate.cost if b.strict else ZERO)
            if held > b.max_cost if b.strict else held >= b.max_cost:
                return Refused(Refusal.INSUFFICIENT_BUDGET, self._no_room("cost", estimate), self.in_flight > 0)
        if b.max_tokens is not None:
            held_tokens = spent.tokens + reserved.tokens + (estimate.tokens if b.strict else 0)
            if held_tokens > b.max_tokens if b.strict else held_tokens >= b.max_tokens:
                return Refused(Refusal.INSUFFICIENT_BUDGET, self._no_room("tokens", estimate), self.in_flight > 0)
        if b.max_calls is not None and spent.calls + reserved.calls >= b.max_calls:
            return Refused(Refusal.INSUFFICIENT_BUDGET, self._no_room("calls", estimate))
        reserved.cost += estimate.cost
        reserved.tokens += estimate.tokens
        reserved.calls += estimate.calls
        self.in_flight += 1
        return Ticket(Spend(estimate.cost, estimate.tokens, estimate.calls))

    def room(self) -> tuple[Decimal | None, int | None]:
        """What is left of the cost and token limits once spend and the reservations of the calls in flight
        are counted (None: unlimited): what a call admitted now may reserve under `--strict`."""
        b = self.budget
        cost = None if b.max_cost is None else b.max_cost - self.spent.cost - self.reserved.cost
        tokens = None if b.max_tokens is None else b.max_tokens - self.spent.tokens - self.reserved.tokens
        return cost, tokens

    def seen(self, subject: bytes) -> bool:
        """Count a request under `max_repeats`; True if it has now been seen that many times, which halts the
        run with `loop_detected`."""
        limit = self.budget.max_repeats
        if limit is None or self.halt_reason is not None:
            return False
        digest = hashlib.blake2b(subject, digest_size=16).digest()
        times = self._seen.get(digest, 0) + 1
        self._seen[digest] = times
        return times >= limit and self.halt(HaltReason.LOOP)

    def progress(self, ticket: Ticket, cost: Decimal, tokens: int) -> HaltReason | None:
        """A live stream has used this much so far. Returns the halt reason if the run just halted."""
        self.live.cost += cost - ticket.running_cost
        self.live.tokens += tokens - ticket.running_tokens
        ticket.running_cost, ticket.running_tokens = cost, tokens
        if self.halt_reason is not None:
            return None
        reason = self._exhausted(self.spent.cost + self.live.cost, self.spent.tokens + self.live.tokens, 0)
        return reason if reason is not None and self.halt(reason) else None

    def settle(self, ticket: Ticket, cost: Decimal, tokens: int, calls: int = 1) -> HaltReason | None:
        """Charge a finished call. Returns the halt reason if this call made the run halt."""
        if ticket.settled:
            return None
        ticket.settled = True
        self.in_flight -= 1
        r = ticket.reserved
        self.reserved.cost -= r.cost
        self.reserved.tokens -= r.tokens
        self.reserved.calls -= r.calls
        self.live.cost -= ticket.running_cost
        self.live.tokens -= ticket.running_tokens
        self.spent.cost += cost
        self.spent.tokens += tokens
        self.spent.calls += calls
        if self.halt_reason is not None:
            return None
        reason = self._exhausted(self.spent.cost, self.spent.tokens, self.spent.calls)
        return reason if reason is not None and self.halt(reason) else None

    def halt(self, reason: HaltReason) -> bool:
        """Halt the run; True if it was not halted before."""
        if self.halt_reason is not None:
            return False
        self.halt_reason = reason
        return True

    def check_time(self, now: float) -> bool:
        """Halt if the time budget is spent; True if that halted the run just now."""
        return self.halt_reason is None and self._time_up(now) and self.halt(HaltReason.TIME)

    def deadline(self) -> float | None:
        return None if self.budget.max_time is None else self.started + self.budget.max_time

    @property
    def remaining_cost(self) -> Decimal | None:
        if self.budget.max_cost is None:
            return None
        return max(self.budget.max_cost - self.spent.cost, ZERO)

    def resume(self, spent: Spend, halt_reason: HaltReason | None) -> None:
        """Carry on a run that an earlier process served: what it spent counts, and a halted run stays halted
        (as does one whose spend already reaches a limit)."""
        self.spent = spent
        reason = halt_reason or self._exhausted(spent.cost, spent.tokens, spent.calls)
        if reason is not None:
            self.halt(reason)

    # -- internals -------------------------------------------------------------------------------------

    def _time_up(self, now: float) -> bool:
        return self.budget.max_time is not None and now - self.started >= self.budget.max_time

    def _exhausted(self, cost: Decimal, tokens: int, calls: int) -> HaltReason | None:
        b = self.budget
        if b.max_cost is not None and cost > 0 and cost >= b.max_cost:
            return HaltReason.COST
        if b.max_tokens is not None and tokens >= b.max_tokens:
            return HaltReason.TOKENS
        if b.max_calls is not None and calls >= b.max_calls:
            return HaltReason.CALLS
        return None

    # -- messages: one plain sentence a person can act on, starting with "rk:" --------------------------

    @property
    def _run(self) -> str:
        return f"(run {self.run_id[:8]}…)"

    def message(self, reason: str) -> str:
        b, s = self.budget, self.spent
        match reason:
            case HaltReason.COST:
                return f"rk: cost budget exceeded — spent {format_money(s.cost)} of ${b.max_cost} {self._run}"
            case HaltReason.TOKENS:
                return f"rk: token budget exceeded — {s.tokens:,} of {b.max_tokens:,} tokens {self._run}"
            case HaltReason.CALLS:
                return f"rk: call budget exceeded — {s.calls} of {b.max_calls} calls {self._run}"
            case HaltReason.TIME:
                return f"rk: time budget exceeded — the run's {format_duration(b.max_time or 0)} are up {self._run}"
            case HaltReason.KILLED:
                return f"rk: run killed {self._run}"
            case HaltReason.LOOP:
                times = b.max_repeats
                return f"rk: loop detected — the same request was sent {times} times {self._run}"
        return f"rk: call refused ({reason}) {self._run}"

    def _no_room(self, dimension: str, estimate: Spend) -> str:
        b, s, r, n = self.budget, self.spent, self.reserved, self.in_flight
        flight = f"{n} call{'s' if n != 1 else ''} in flight"
        if dimension == "cost" and b.max_cost is not None:
            if b.max_cost == 0:
                return f"rk: the cost budget is $0 — no paid call may be made {self._run}"
            left = max(b.max_cost - s.cost - r.cost, ZERO)
            held = f", {format_money(r.cost)} reserved by {flight}" if n else ""
            return (
                f"rk: not enough cost budget for this call — it could cost up to {format_money(estimate.cost)}, and"
                f" {format_money(left)} is left of ${b.max_cost} (spent {format_money(s.cost)}{held}) {self._run}"
            )
        if dimension == "tokens" and b.max_tokens is not None:
            left_tokens = max(b.max_tokens - s.tokens - r.tokens, 0)
            held = f", {r.tokens:,} reserved by {flight}" if n else ""
            return (
                f"rk: not enough token budget for this call — it could use up to {estimate.tokens:,} tokens, and"
                f" {left_tokens:,} are left of {b.max_tokens:,} ({s.tokens:,} used{held}) {self._run}"
            )
        return f"rk: no call budget left — {s.calls} calls made and {n} in flight, of {b.max_calls} {self._run}"
