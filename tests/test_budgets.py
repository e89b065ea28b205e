"""Budgets through the proxy: each dimension halts at the right call, nothing further reaches the upstream,
concurrent calls cannot jointly run past the cap, and live streams are cut with an error the SDK raises."""

import asyncio
import time
from decimal import Decimal

import openai
import pytest

from riskkernel.models import Budget, Flag, HaltReason, Refusal
from tests.conftest import StartProxy
from tests.fakes import FakeUpstream, Reply, usage

MESSAGES = [{"role": "user", "content": "go"}]
D = Decimal
# gpt-4o-2024-08-06 at $2.50 in / $10 out per 1M: 1,000 in + 100 out = $0.0035 a call
CALL = Reply(usage=usage(1_000, 100))
CALL_COST = D("0.0035")


async def call(client: openai.AsyncOpenAI, **kwargs: object) -> object:
    kwargs = {"model": "gpt-4o", "messages": MESSAGES, "max_tokens": 100, **kwargs}
    return await client.chat.completions.create(**kwargs)  # type: ignore[call-overload]


@pytest.mark.parametrize(
    ("budget", "reason", "message"),
    [
        (Budget(max_cost=CALL_COST * 3), HaltReason.COST, "rk: cost budget exceeded — spent $0.0105 of $0.0105 (run "),
        (
            Budget(max_cost=None, max_tokens=3_300),
            HaltReason.TOKENS,
            "rk: token budget exceeded — 3,300 of 3,300 tokens (run ",
        ),
        (Budget(max_cost=None, max_calls=3), HaltReason.CALLS, "rk: call budget exceeded — 3 of 3 calls (run "),
    ],
)
async def test_each_budget_halts_at_the_call_that_spends_it(
    fake: FakeUpstream, start_proxy: StartProxy, budget: Budget, reason: HaltReason, message: str
) -> None:
    fake.script(CALL)
    proxy = await start_proxy(budget)
    for _ in range(2):
        await call(proxy.client)
    third = await proxy.client.chat.completions.with_raw_response.create(
        model="gpt-4o", messages=MESSAGES, max_tokens=100
    )
    assert third.status_code == 200  # the call that spends the budget is still answered
    assert third.headers["x-riskkernel-halt-reason"] == reason
    retrying = proxy.new_client(max_retries=3)  # the SDK does not retry a 402
    with pytest.raises(openai.APIStatusError) as refused:
        await call(retrying)
    assert refused.value.status_code == 402
    assert refused.value.code == reason
    assert refused.value.body["message"].startswith(message)  # type: ignore[index]
    assert refused.value.response.headers["x-should-retry"] == "false"
    assert len(fake.requests) == 3
    rows = await proxy.calls()
    assert [r.status for r in rows] == [200, 200, 200, 402]
    assert rows[-1].flags == (Flag.REFUSED,) and rows[-1].error == reason
    assert (await proxy.record()).totals.calls == 3


async def test_the_time_budget_halts_the_run_even_between_calls(fake: FakeUpstream, start_proxy: StartProxy) -> None:
    proxy = await start_proxy(Budget(max_cost=None, max_time=2.0))
    await call(proxy.client)
    await asyncio.sleep(2.1)
    assert proxy.live.governor.halt_reason == HaltReason.TIME
    with pytest.raises(openai.APIStatusError) as refused:
        await call(proxy.client)
    assert refused.value.code == "time_budget_exceeded"
    assert len(fake.requests) == 1


async def test_concurrent_calls_cannot_jointly_run_past_the_cap(fake: FakeUpstream, start_proxy: StartProxy) -> None:
    gate = asyncio.Event()  # the upstream holds every answer until released
    fake.script(Reply(usage=usage(1_000, 100), gate=gate))
    cap = CALL_COST * 5
    proxy = await start_proxy(Budget(max_cost=cap))
    prompt = [{"role": "user", "content": "x" * 3_980}]  # about the 1,000 input tokens the upstream reports
    calls = [asyncio.create_task(call(proxy.client, messages=prompt, max_tokens=100)) for _ in range(20)]
    for _ in range(500):
        if len(fake.requests) == 6:
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.2)
    # Admitted while spent + reserved is below the cap: each reserves its estimate (a hair under what it
    # will cost), so a sixth still starts. The other calls wait for them rather than fail.
    assert len(fake.requests) == 6 and not any(t.done() for t in calls)
    gate.set()
    results = await asyncio.gather(*calls, return_exceptions=True)
    refusals = [r for r in results if isinstance(r, openai.APIStatusError)]
    assert len(refusals) == 14 and all(r.status_code == 402 for r in refusals)
    assert {r.code for r in refusals} == {HaltReason.COST}  # once the six had spent the cap
    assert len(fake.requests) == 6
    assert (await proxy.record()).totals.cost <= cap + CALL_COST  # at most one call past the cap


async def test_a_slow_stream_is_cut_by_the_time_budget_and_its_partial_usage_charged(
    fake: FakeUpstream, start_proxy: StartProxy
) -> None:
    fake.script(Reply(endless=True, delay=0.05))
    proxy = await start_proxy(Budget(max_cost=D("1.00"), max_time=0.5))
    stream = await proxy.client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)
    started = time.monotonic()
    text = []
    with pytest.raises(openai.APIError, match="rk: time budget exceeded") as raised:
        async for chunk in stream:
            text.append(chunk.choices[0].delta.content or "")
    assert time.monotonic() - started < 1.0  # promptly, not at the end of a generation
    assert raised.value.code == "time_budget_exceeded"  # type: ignore[attr-defined]
    (row,) = await proxy.calls()
    assert {Flag.CUT, Flag.ESTIMATED} <= set(row.flags) and row.error == "cut: time_budget_exceeded"
    assert row.usage.output_tokens >= len("".join(text)) // 4 > 0
    assert row.cost > 0
    for _ in range(100):
        if fake.streams_open == 0:
            break
        await asyncio.sleep(0.01)
    assert fake.streams_open == 0  # the upstream connection was closed, so the generation stops


async def test_a_live_stream_is_cut_at_the_cost_cap(fake: FakeUpstream, start_proxy: StartProxy) -> None:
    fake.script(Reply(endless=True, delay=0.001))
    # $0.001 is 400 input tokens + ~300 output tokens of gpt-4o
    proxy = await start_proxy(Budget(max_cost=D("0.001")))
    stream = await proxy.client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)
    with pytest.raises(openai.APIError, match=r"rk: cost budget exceeded — spent \$0\.00\d+ of \$0\.001"):
        async for _ in stream:
            pass
    (row,) = await proxy.calls()
    assert Flag.CUT in row.flags and row.error == "cut: cost_budget_exceeded"
    assert D("0.001") <= row.cost < D("0.0012")
    assert proxy.live.governor.halt_reason == HaltReason.COST


async def test_a_kill_cuts_live_streams_and_refuses_later_calls(fake: FakeUpstream, start_proxy: StartProxy) -> None:
    fake.script(Reply(endless=True, delay=0.02))
    proxy = await start_proxy()
    stream = await proxy.client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)
    received = 0
    with pytest.raises(openai.APIError, match="rk: run killed"):
        async for _ in stream:
            received += 1
            if received == 3:
                proxy.live.halt(HaltReason.KILLED)
    with pytest.raises(openai.APIStatusError, match="rk: run killed"):
        await call(proxy.client)
    assert len(fake.requests) == 1


async def test_an_unpriced_model_is_refused_under_a_cost_budget(fake: FakeUpstream, start_proxy: StartProxy) -> None:
    proxy = await start_proxy(Budget(max_cost=D("1.00")))
    with pytest.raises(openai.APIStatusError) as refused:
        await proxy.client.chat.completions.create(model="acme-llm-9000", messages=MESSAGES)
    assert refused.value.status_code == 402 and refused.value.code == Refusal.UNPRICED_MODEL
    assert "--price acme-llm-9000=IN:OUT" in refused.value.body["message"]  # type: ignore[index]
    assert fake.requests == [] and proxy.live.governor.halt_reason is None


async def test_an_unpriced_model_can_be_allowed_and_is_flagged(fake: FakeUpstream, start_proxy: StartProxy) -> None:
    fake.script(Reply(model="acme-llm-9000"))
    proxy = await start_proxy(Budget(max_cost=D("1.00")), allow_unpriced=True)
    await proxy.client.chat.completions.create(model="acme-llm-9000", messages=MESSAGES)
    (row,) = await proxy.calls()
    assert row.flags == (Flag.UNPRICED,) and row.cost == 0 and row.price_source is None


async def test_a_price_override_prices_an_unknown_model(fake: FakeUpstream, start_proxy: StartProxy) -> None:
    from riskkernel.pricing import parse_price_flag

    fake.script(Reply(model="acme-llm-9000", usage=usage(1_000_000, 1_000_000)))
    proxy = await start_proxy(Budget(max_cost=D("100")), prices=(parse_price_flag("acme-llm-9000=1:2"),))
    raw = await proxy.client.chat.completions.with_raw_response.create(model="acme-llm-9000", messages=MESSAGES)
    assert raw.headers["x-riskkernel-cost-usd"] == "3.0000"
    assert raw.headers["x-riskkernel-remaining-usd"] == "97.0000"
    (row,) = await proxy.calls()
    assert row.price_source == "--price"


async def test_a_zero_cost_budget_refuses_paid_calls(fake: FakeUpstream, start_proxy: StartProxy) -> None:
    proxy = await start_proxy(Budget(max_cost=D(0)))
    with pytest.raises(openai.APIStatusError, match=r"the cost budget is \$0"):
        await call(proxy.client)
    assert fake.requests == []


async def test_a_stream_that_begins_after_the_cap_is_spent_is_cut_at_once(
    fake: FakeUpstream, start_proxy: StartProxy
) -> None:
    gate = asyncio.Event()
    fake.script(Reply(gate=gate, endless=True, delay=0.01), Reply(usage=usage(1_000_000, 0)))  # $2.50: over the cap
    proxy = await start_proxy(Budget(max_cost=D("1.00")))
    stream = asyncio.create_task(
        proxy.client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True, max_tokens=100)
    )
    while not fake.requests:
        await asyncio.sleep(0.01)
    await call(proxy.client)  # spends the budget while the stream still waits for its first byte
    assert proxy.live.governor.halt_reason == HaltReason.COST
    gate.set()
    with pytest.raises(openai.APIError, match="rk: cost budget exceeded"):
        async for _ in await stream:
            pass
    first, _ = await proxy.calls()
    assert Flag.CUT in first.flags and first.error == "cut: cost_budget_exceeded"
