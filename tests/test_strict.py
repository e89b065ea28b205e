"""A cap that holds: reservations of the worst case, `--strict` clamping, waiting for room, loop detection."""

from __future__ import annotations

import asyncio
import json
from decimal import Decimal as D
from typing import Any

import aiohttp
import openai
import pytest

from riskkernel.governor import STRICT_MIN_OUTPUT, Spend
from riskkernel.models import Budget, Flag, HaltReason, Refusal
from tests.conftest import SECRET, Harness, StartProxy, rk
from tests.fakes import FakeUpstream, MessagesReply, Reply, usage

MESSAGES = [{"role": "user", "content": "Plan the next step of the migration."}]
# gpt-4o: $2.50 per 1M input tokens, $10 per 1M output tokens
INPUT, OUTPUT = D("2.5") / 1_000_000, D("10") / 1_000_000


def uses_all_it_may(request: dict[str, Any]) -> dict[str, Any]:
    """Usage as a provider would bill the worst case: about a token per 4 bytes of the request as input, and
    every output token its limit allows (gpt-4o's 16,384 when it sets none)."""
    limit = request.get("max_completion_tokens") or request.get("max_tokens") or 16_384
    return usage(len(json.dumps(request.get("messages"))) // 4, limit)


def assert_nothing_held(proxy: Harness) -> None:
    g = proxy.live.governor
    assert (g.reserved, g.live, g.in_flight) == (Spend(), Spend(), 0)


async def test_under_strict_concurrent_calls_never_spend_past_the_cap(
    fake: FakeUpstream, start_proxy: StartProxy
) -> None:
    gate = asyncio.Event()  # the upstream holds every answer until released
    fake.script(Reply(gate=gate, usage_for=uses_all_it_may))
    cap = D("0.20")
    proxy = await start_proxy(Budget(max_cost=cap, strict=True))
    limits: list[int | None] = [None, 2_000, 8_000, 500] * 6  # without a limit: gpt-4o's 16,384
    calls = [
        asyncio.create_task(
            proxy.client.chat.completions.create(model="gpt-4o", messages=MESSAGES, **({"max_tokens": n} if n else {}))
        )
        for n in limits
    ]
    await asyncio.sleep(0.5)
    g = proxy.live.governor
    assert 0 < g.in_flight < len(calls)
    assert g.spent.cost + g.reserved.cost <= cap  # every worst case admitted fits, all together
    gate.set()
    results = await asyncio.gather(*calls, return_exceptions=True)
    spent = (await proxy.record()).totals.cost
    assert spent <= cap
    refusals = [r for r in results if isinstance(r, Exception)]
    assert all(isinstance(r, openai.APIStatusError) and r.code == Refusal.INSUFFICIENT_BUDGET for r in refusals)
    assert cap - spent < (D(STRICT_MIN_OUTPUT) * OUTPUT + D(1_000) * INPUT) * 2  # refused only when nearly all spent
    rows = await proxy.calls()
    assert any(Flag.CLAMPED in row.flags and row.output_limit for row in rows)
    assert all(row.reserved is not None and row.cost <= row.reserved for row in rows)  # actual within reserved
    assert_nothing_held(proxy)


async def test_without_strict_calls_wait_for_room_and_overshoot_by_less_than_one_call(
    fake: FakeUpstream, start_proxy: StartProxy
) -> None:
    gate = asyncio.Event()
    fake.script(Reply(gate=gate, usage_for=uses_all_it_may))
    cap = D("0.05")
    proxy = await start_proxy(Budget(max_cost=cap))
    calls = [
        asyncio.create_task(proxy.client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=1_000))
        for _ in range(12)
    ]
    await asyncio.sleep(0.5)
    assert len(fake.requests) == 5  # $0.01 reserved each: five reservations fill the cap, the rest wait
    assert not any(call.done() for call in calls)
    gate.set()
    results = await asyncio.gather(*calls, return_exceptions=True)
    largest = max(row.cost for row in await proxy.calls())
    assert (await proxy.record()).totals.cost <= cap + largest
    assert {r.code for r in results if isinstance(r, openai.APIStatusError)} == {HaltReason.COST}
    assert_nothing_held(proxy)


async def send(proxy: Harness, path: str, body: bytes) -> tuple[int, dict[str, Any]]:
    headers = {"Authorization": f"Bearer {SECRET}", "Content-Type": "application/json"}
    if path == "/v1/messages":
        headers["anthropic-version"] = "2023-06-01"
    async with aiohttp.ClientSession() as session, session.post(proxy.url + path, data=body, headers=headers) as r:
        return r.status, await r.json()


BODY = (
    '{ "model" : "gpt-4o",\n  "messages": [{"role": "user", "content": "héllo ✓ \\"max_tokens\\": 9"}],\n'
    '  "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object",'
    ' "properties": {"max_tokens": {"type": "integer", "default": 4000}}}}}],\n'
    '  "max_tokens" :  {limit} , "temperature": 0.7 }'
)


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/v1/chat/completions", BODY, "max_tokens"),
        (
            "/v1/chat/completions",
            BODY.replace('"max_tokens" :  {limit} ,', '"max_completion_tokens":{limit},'),
            "max_completion_tokens",
        ),
        ("/v1/messages", BODY.replace('"tools": [{"type": "function", "function"', '"tools": [{"x"'), "max_tokens"),
        (
            "/v1/responses",
            BODY.replace('"messages"', '"input"').replace('"max_tokens" :  {limit}', '"max_output_tokens":{limit}'),
            "max_output_tokens",
        ),
    ],
    ids=["chat max_tokens", "chat max_completion_tokens", "messages", "responses"],
)
async def test_clamping_rewrites_the_output_limit_and_not_one_other_byte(
    fake: FakeUpstream, start_proxy: StartProxy, path: str, body: str, field: str
) -> None:
    if path == "/v1/messages":
        fake.script(MessagesReply())
    proxy = await start_proxy(Budget(max_cost=D("0.02"), strict=True))
    status, _ = await send(proxy, path, body.replace("{limit}", "4000").encode())
    assert status == 200
    sent = fake.requests[-1].body
    clamped = json.loads(sent)[field]
    assert STRICT_MIN_OUTPUT <= clamped < 4000
    assert sent == body.replace("{limit}", str(clamped)).encode()  # the nested "max_tokens" are untouched
    row = (await proxy.calls())[-1]
    assert Flag.CLAMPED in row.flags and row.output_limit == clamped


async def test_a_request_without_a_limit_gets_one_added_only_when_its_worst_case_does_not_fit(
    fake: FakeUpstream, start_proxy: StartProxy
) -> None:
    body = BODY.replace('"max_tokens" :  {limit} ,', "").encode()
    roomy = await start_proxy(Budget(max_cost=D("5.00"), strict=True))
    assert (await send(roomy, "/v1/chat/completions", body))[0] == 200
    assert fake.requests[-1].body == body  # 16,384 output tokens of gpt-4o fit in $5: forwarded as sent
    tight = await start_proxy(Budget(max_cost=D("0.05"), strict=True))
    assert (await send(tight, "/v1/chat/completions", body))[0] == 200
    limit = json.loads(fake.requests[-1].body)["max_completion_tokens"]
    end = body.rindex(b"}")
    assert fake.requests[-1].body == body[:end] + f',"max_completion_tokens":{limit}'.encode() + body[end:]


async def test_a_call_that_cannot_fit_even_clamped_is_refused_with_the_numbers(
    fake: FakeUpstream, start_proxy: StartProxy
) -> None:
    proxy = await start_proxy(Budget(max_cost=D("0.002"), strict=True))
    prompt = [{"role": "user", "content": "x" * 2_000}]
    with pytest.raises(openai.APIStatusError) as refused:
        await proxy.client.chat.completions.create(model="gpt-4o", messages=prompt, max_tokens=100)
    assert refused.value.status_code == 402 and refused.value.code == Refusal.INSUFFICIENT_BUDGET
    message = str(refused.value)
    assert "could cost up to $0.00" in message and "$0.0020 is left of $0.002" in message
    assert not fake.requests and proxy.live.governor.halt_reason is None  # refused, not halted
    row = (await proxy.calls())[-1]
    assert row.error == Refusal.INSUFFICIENT_BUDGET and row.reserved is not None and row.reserved > D("0.002")
    assert f"could cost up to ${row.reserved:.4f}" in message
    shown = await rk("ledger", "show", proxy.run_id)
    line = shown.stdout.decode().splitlines()[-1].split("\t")
    assert line[7:9] == ["$0.0000", f"${row.reserved:.4f}"] and "insufficient_budget" in line[-1]


async def test_a_stream_is_cut_before_it_relays_output_past_the_cap(
    fake: FakeUpstream, start_proxy: StartProxy
) -> None:
    # The input the provider reports at the start (a long document) is more than rk reserved: the stream
    # is cut at once, before its first text reaches the client.
    start = {**MessagesReply().start_usage, "input_tokens": 400_000}
    fake.script(MessagesReply(start_usage=start, endless=True, delay=0.01))
    proxy = await start_proxy(Budget(max_cost=D("1.00")))
    text = []
    with pytest.raises(Exception, match="cost budget exceeded"):
        async with proxy.claude.messages.stream(model="claude-sonnet-4-6", max_tokens=500, messages=MESSAGES) as s:
            async for piece in s.text_stream:
                text.append(piece)
    assert text == []
    row = (await proxy.calls())[-1]
    assert Flag.CUT in row.flags
    assert_nothing_held(proxy)


async def _whole(proxy: Harness, fake: FakeUpstream) -> None:
    await proxy.client.chat.completions.create(model="gpt-4o", messages=MESSAGES)


async def _stream(proxy: Harness, fake: FakeUpstream) -> None:
    async for _ in await proxy.client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True):
        pass


async def _upstream_error(proxy: Harness, fake: FakeUpstream) -> None:
    fake.script(Reply(status=500, body=b'{"error": {"message": "boom"}}'))
    with pytest.raises(openai.InternalServerError):
        await _whole(proxy, fake)


async def _broken_stream(proxy: Harness, fake: FakeUpstream) -> None:
    fake.script(Reply(break_after=2))
    with pytest.raises(openai.APIError):
        await _stream(proxy, fake)


async def _disconnect_mid_stream(proxy: Harness, fake: FakeUpstream) -> None:
    fake.script(Reply(endless=True))
    stream = await proxy.client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)
    async for _ in stream:
        break
    await stream.close()


async def _killed_mid_stream(proxy: Harness, fake: FakeUpstream) -> None:
    fake.script(Reply(endless=True))
    stream = await proxy.client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)
    with pytest.raises(openai.APIError):
        async for _ in stream:
            proxy.live.kill()


async def _cancelled_while_waiting(proxy: Harness, fake: FakeUpstream) -> None:
    gate = asyncio.Event()
    fake.script(Reply(gate=gate))
    first = asyncio.create_task(_whole(proxy, fake))
    await asyncio.sleep(0.2)
    waiting = asyncio.create_task(_whole(proxy, fake))
    await asyncio.sleep(0.2)
    assert not waiting.done()
    waiting.cancel()  # the client gives up while its call waits for room
    await asyncio.sleep(0.1)
    gate.set()
    await first


EXITS = {
    "success": _whole,
    "stream": _stream,
    "upstream error": _upstream_error,
    "broken stream": _broken_stream,
    "client disconnect": _disconnect_mid_stream,
    "kill": _killed_mid_stream,
    "cancelled while waiting": _cancelled_while_waiting,
}


@pytest.mark.parametrize("exit_path", EXITS)
async def test_every_reservation_is_released_whatever_becomes_of_the_call(
    fake: FakeUpstream, start_proxy: StartProxy, exit_path: str
) -> None:
    # One call in flight at a time: its worst case (16,384 output tokens of gpt-4o, $0.16) holds all the room.
    proxy = await start_proxy(Budget(max_cost=D("0.15")))
    await EXITS[exit_path](proxy, fake)
    for _ in range(100):  # a handler the client left settles on its own time
        if proxy.live.governor.in_flight == 0:
            break
        await asyncio.sleep(0.02)
    assert_nothing_held(proxy)


async def test_a_call_given_up_while_it_waits_for_room_leaves_a_row(
    fake: FakeUpstream, start_proxy: StartProxy
) -> None:
    proxy = await start_proxy(Budget(max_cost=D("0.15")))  # the first call's reservation holds all the room
    await _cancelled_while_waiting(proxy, fake)
    rows = await proxy.calls()
    assert [row.seq for row in rows] == [1, 2]  # no call goes unrecorded, though this one was never sent
    waited = next(row for row in rows if row.status == 499)
    assert (
        Flag.REFUSED in waited.flags
        and waited.cost == 0
        and waited.error == "client disconnected while waiting for room"
    )
    assert len(fake.requests) == 1


async def test_the_same_request_repeated_halts_the_run_as_a_loop(fake: FakeUpstream, start_proxy: StartProxy) -> None:
    proxy = await start_proxy(Budget(max_cost=D("1.00"), max_repeats=3))
    ask = proxy.client.chat.completions.create
    other = [{"role": "user", "content": "Something else."}]
    await ask(model="gpt-4o", messages=MESSAGES, temperature=0.1)
    await ask(model="gpt-4o", messages=other)
    await ask(model="gpt-4o-mini", messages=MESSAGES)  # another model: another request
    await ask(model="gpt-4o", messages=MESSAGES, temperature=0.9, max_tokens=50)  # the same request again
    with pytest.raises(openai.APIStatusError) as looped:
        await ask(model="gpt-4o", messages=MESSAGES, stream=True)  # the third time
    assert looped.value.status_code == 402 and looped.value.code == HaltReason.LOOP
    assert "rk: loop detected — the same request was sent 3 times" in str(looped.value)
    assert len(fake.requests) == 4
    with pytest.raises(openai.APIStatusError) as halted:
        await ask(model="gpt-4o", messages=other)
    assert halted.value.code == HaltReason.LOOP  # halted stays halted
    record = await proxy.record()
    assert record.halt_reason == HaltReason.LOOP
    assert [row.error for row in await proxy.calls()][-2:] == [HaltReason.LOOP, HaltReason.LOOP]
