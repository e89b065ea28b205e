"""Anthropic Messages through the proxy, driven by the real `anthropic` SDK against the fake upstream, and
the sans-IO Messages meter fed transcripts split at every byte offset."""

import asyncio
import itertools
import json
import time
from decimal import Decimal

import anthropic
import pytest

from riskkernel.models import Budget, Flag, HaltReason, Usage
from riskkernel.providers import ErrorKind
from riskkernel.providers import anthropic as an
from riskkernel.providers.sse import SSEDecoder
from tests.conftest import SECRET, StartProxy
from tests.fakes import FakeUpstream, MessagesReply

D = Decimal
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]
TOOLS = [
    {
        "name": "get_weather",
        "description": "Weather for a city",
        "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
    }
]

# claude-sonnet-4-6: $3 in, $3.75 5m cache writes, $6 1h cache writes, $0.30 cache
# reads, $15 out per 1M. 1,000 plain + 2,000 5m + 1,000 1h writes + 4,000 reads + 500 out:
# 3,000 + 7,500 + 6,000 + 1,200 + 7,500 = 25,200 / 1M
CACHED = MessagesReply(
    start_usage={
        "input_tokens": 1000,
        "cache_creation_input_tokens": 3000,
        "cache_read_input_tokens": 4000,
        "cache_creation": {"ephemeral_5m_input_tokens": 2000, "ephemeral_1h_input_tokens": 1000},
        "output_tokens": 1,
    },
    deltas=[{"output_tokens": 500}],
)
CACHED_COST = D("0.0252")
CACHED_USAGE = Usage(
    input_tokens=8000, cached_input_tokens=4000, cache_write_tokens=3000, cache_write_1h_tokens=1000, output_tokens=500
)

TOOLING = MessagesReply(
    blocks=[
        {"type": "thinking", "thinking": "The user wants weather; call the tool.", "signature": "sig-abc=="},
        {"type": "text", "text": "Let me check."},
        {"type": "tool_use", "id": "toolu_01", "name": "get_weather", "input": {"city": "Paris", "unit": "°C"}},
    ],
    deltas=[{"output_tokens": 20}, {"output_tokens": 64, "input_tokens": 100}],  # two deltas: cumulative
    stop_reason="tool_use",
)


def meter(transcript: bytes, cuts: list[int]) -> tuple[bytes, an.Metered, bool]:
    stream = an.MessagesStream(an.parse_messages(json.dumps({"model": "m", "messages": []}).encode()))
    decoder = SSEDecoder()
    out, ended = [], False
    bounds = [0, *cuts, len(transcript)]
    for a, b in itertools.pairwise(bounds):
        for event in decoder.feed(transcript[a:b]):
            data, terminal = stream.feed(event)
            out.append(data)
            ended = ended or terminal
    return b"".join(out), stream.result(), ended


def test_usage_is_merged_from_message_start_and_the_last_message_delta_at_every_split() -> None:
    transcript = TOOLING.stream_bytes()
    for offset in range(len(transcript) + 1):
        shown, metered, ended = meter(transcript, [offset])
        assert shown == transcript and ended, offset
        assert metered.usage == Usage(input_tokens=100, output_tokens=64), offset  # overwritten, never added
        assert metered.model == "claude-sonnet-4-6"
        assert metered.finish_reasons == ["tool_use"]
    assert an.meter_messages(TOOLING.whole()).finish_reasons == ["tool_use"]


def test_cache_writes_and_reads_are_counted_in_openais_sense() -> None:
    assert an.messages_usage(CACHED.final_usage()) == CACHED_USAGE
    assert an.messages_usage({"input_tokens": 5, "server_tool_use": {"web_search_requests": 3}}).web_searches == 3


def test_output_text_is_counted_for_estimates() -> None:
    _, metered, _ = meter(TOOLING.stream_bytes(), [])
    expected = (
        len("The user wants weather; call the tool.")
        + len("Let me check.")
        + len(json.dumps(TOOLING.blocks[2]["input"]))
    )
    assert metered.output_chars == expected


def test_error_shapes() -> None:
    body = json.loads(an.error_body("rk: no", ErrorKind.BUDGET, "killed"))
    assert body == {"type": "error", "error": {"type": "billing_error", "message": "rk: no", "code": "killed"}}
    (event,) = SSEDecoder().feed(an.error_event("rk: cut", ErrorKind.BUDGET, "cost_budget_exceeded"))
    assert event.event == "error" and json.loads(event.data or "")["error"]["code"] == "cost_budget_exceeded"


async def test_a_whole_message_reaches_the_client_byte_for_byte(fake: FakeUpstream, start_proxy: StartProxy) -> None:
    fake.script(CACHED)
    proxy = await start_proxy()
    raw = await proxy.claude.messages.with_raw_response.create(
        model="claude-sonnet-4-6",
        max_tokens=1024,
        messages=MESSAGES,
        tools=TOOLS,  # type: ignore[arg-type]
        extra_headers={"anthropic-beta": "prompt-caching-2024-07-31"},
    )
    assert raw.http_response.content == CACHED.whole()
    assert raw.headers["x-riskkernel-cost-usd"] == "0.0252"
    seen = fake.requests[0]
    assert seen.path == "/v1/messages" and seen.json()["tools"] == TOOLS
    # the SDK may authenticate with x-api-key or Authorization: whichever it sends goes upstream unchanged
    assert SECRET in seen.headers.get("X-Api-Key", "") + seen.headers.get("Authorization", "")
    assert seen.headers["Anthropic-Beta"] == "prompt-caching-2024-07-31"
    assert seen.headers["Anthropic-Version"]
    (row,) = await proxy.calls()
    assert (row.provider, row.endpoint, row.model) == ("anthropic", "/v1/messages", "claude-sonnet-4-6")
    assert row.usage == CACHED_USAGE and row.cost == CACHED_COST


async def test_an_x_api_key_header_is_forwarded(fake: FakeUpstream, start_proxy: StartProxy) -> None:
    proxy = await start_proxy()
    await proxy.claude.messages.create(
        model="claude-sonnet-4-6",
        max_tokens=10,
        messages=MESSAGES,  # type: ignore[arg-type]
        extra_headers={"x-api-key": "sk-ant-other", "Authorization": ""},
    )
    assert fake.requests[0].headers["X-Api-Key"] == "sk-ant-other"


async def test_a_stream_reassembles_exactly_and_is_priced(fake: FakeUpstream, start_proxy: StartProxy) -> None:
    fake.script(TOOLING)
    proxy = await start_proxy()
    async with proxy.claude.messages.stream(
        model="claude-sonnet-4-6", max_tokens=1024, messages=MESSAGES, tools=TOOLS
    ) as stream:  # type: ignore[arg-type]
        message = await stream.get_final_message()
    thinking, text, tool = message.content
    assert thinking.thinking == "The user wants weather; call the tool." and thinking.signature == "sig-abc=="  # type: ignore[union-attr]
    assert text.text == "Let me check."  # type: ignore[union-attr]
    assert (tool.name, tool.input) == ("get_weather", {"city": "Paris", "unit": "°C"})  # type: ignore[union-attr]
    assert message.usage.output_tokens == 64
    (row,) = await proxy.calls()
    # 100 in at $3, 64 out at $15 per 1M
    assert row.usage == Usage(input_tokens=100, output_tokens=64) and row.cost == D("0.00126") and row.stream


async def test_the_raw_stream_is_the_upstreams(fake: FakeUpstream, start_proxy: StartProxy) -> None:
    fake.script(TOOLING)
    proxy = await start_proxy()
    async with proxy.claude.messages.with_streaming_response.create(
        model="claude-sonnet-4-6",
        max_tokens=1024,
        messages=MESSAGES,
        stream=True,  # type: ignore[arg-type]
    ) as response:
        raw = b"".join([chunk async for chunk in response.iter_bytes()])
    assert raw == TOOLING.stream_bytes()


async def test_a_refusal_is_a_402_in_anthropics_shape_and_not_retried(
    fake: FakeUpstream, start_proxy: StartProxy
) -> None:
    proxy = await start_proxy(Budget(max_cost=None, max_calls=1))
    await proxy.claude.messages.create(model="claude-sonnet-4-6", max_tokens=100, messages=MESSAGES)  # type: ignore[arg-type]
    retrying = proxy.new_claude(max_retries=3)
    with pytest.raises(anthropic.APIStatusError) as refused:
        await retrying.messages.create(model="claude-sonnet-4-6", max_tokens=100, messages=MESSAGES)  # type: ignore[arg-type]
    assert refused.value.status_code == 402
    assert refused.value.body == {
        "type": "error",
        "error": {
            "type": "billing_error",
            "code": "call_budget_exceeded",
            "message": refused.value.body["error"]["message"],
        },
    }  # type: ignore[index]
    assert refused.value.body["error"]["message"].startswith("rk: call budget exceeded — 1 of 1 calls")  # type: ignore[index]
    assert len(fake.requests) == 1


@pytest.mark.parametrize(
    ("budget", "reason"),
    [
        (Budget(max_cost=D("0.001")), "cost_budget_exceeded"),
        (Budget(max_cost=None, max_time=3.0), "time_budget_exceeded"),
    ],
)
async def test_a_live_stream_is_cut_and_the_sdk_raises_promptly(
    fake: FakeUpstream, start_proxy: StartProxy, budget: Budget, reason: str
) -> None:
    fake.script(MessagesReply(endless=True, delay=0.01))
    proxy = await start_proxy(budget)
    started = time.monotonic()
    with pytest.raises(anthropic.APIStatusError, match=r"rk: (cost|time) budget exceeded"):
        async with proxy.claude.messages.stream(
            model="claude-sonnet-4-6", max_tokens=4096, messages=MESSAGES
        ) as stream:  # type: ignore[arg-type]
            async for _ in stream:
                pass
    assert time.monotonic() - started < 5  # the time budget is 3 s; a cut is never left for the end of a stream
    (row,) = await proxy.calls()
    assert {Flag.CUT, Flag.ESTIMATED} <= set(row.flags) and row.error == f"cut: {reason}"
    assert row.usage.input_tokens == 100  # the input Anthropic reported at the start, not an estimate
    assert row.usage.output_tokens > 1 and row.cost > 0
    assert proxy.live.governor.halt_reason == HaltReason(reason)


async def test_a_stream_the_upstream_breaks_before_usage_is_charged_an_estimate(
    fake: FakeUpstream, start_proxy: StartProxy
) -> None:
    fake.script(MessagesReply(break_after=6))
    proxy = await start_proxy()
    with pytest.raises(anthropic.APIStatusError, match="rk: upstream failed"):
        async with proxy.claude.messages.stream(model="claude-sonnet-4-6", max_tokens=100, messages=MESSAGES) as stream:  # type: ignore[arg-type]
            async for _ in stream:
                pass
    (row,) = await proxy.calls()
    assert Flag.ESTIMATED in row.flags and row.usage.input_tokens == 100 and row.cost > 0


async def test_token_counting_and_model_lists_are_forwarded_free(fake: FakeUpstream, start_proxy: StartProxy) -> None:
    proxy = await start_proxy(Budget(max_cost=D("1.00")))
    counted = await proxy.claude.messages.count_tokens(model="claude-sonnet-4-6", messages=MESSAGES)  # type: ignore[arg-type]
    assert counted.input_tokens == 42
    models = await proxy.claude.models.list()
    assert [m.id for m in models.data] == ["gpt-4o"]
    assert [r.path for r in fake.requests] == ["/v1/messages/count_tokens", "/v1/models?limit=20"] or [
        r.path.split("?")[0] for r in fake.requests
    ] == ["/v1/messages/count_tokens", "/v1/models"]
    rows = await proxy.calls()
    assert [(r.provider, r.flags, r.cost) for r in rows] == [("anthropic", ("unmetered",), 0)] * 2
    assert (await proxy.record()).totals.calls == 0


async def test_concurrent_streams_share_one_budget(fake: FakeUpstream, start_proxy: StartProxy) -> None:
    fake.script(MessagesReply(delay=0.001))
    proxy = await start_proxy(Budget(max_cost=D("1.00")))

    async def one() -> None:
        async with proxy.claude.messages.stream(model="claude-sonnet-4-6", max_tokens=100, messages=MESSAGES) as stream:  # type: ignore[arg-type]
            await stream.get_final_message()

    await asyncio.gather(*(one() for _ in range(5)))
    assert (await proxy.record()).totals.calls == 5


async def test_a_mid_stream_error_reaches_the_sdk_and_the_call_is_charged_an_estimate(
    fake: FakeUpstream, start_proxy: StartProxy
) -> None:
    fake.script(MessagesReply(error_after=6))  # after some text: its last usage report never comes
    proxy = await start_proxy()
    with pytest.raises(anthropic.APIStatusError, match="Overloaded"):
        async with proxy.claude.messages.stream(model="claude-sonnet-4-6", max_tokens=100, messages=MESSAGES) as stream:  # type: ignore[arg-type]
            async for _ in stream:
                pass
    (row,) = await proxy.calls()
    assert row.status == 200 and row.error == "upstream: Overloaded" and Flag.ESTIMATED in row.flags
    assert row.usage.input_tokens == 100 and row.usage.output_tokens > 1 and row.cost > 0
