"""The Responses API through the proxy, driven by the real `openai` SDK against the fake upstream, and the
sans-IO Responses meter fed transcripts split at every byte offset."""

import itertools
import json
import time
from decimal import Decimal

import openai
import pytest

from riskkernel.models import Budget, Flag, Usage
from riskkernel.providers import openai as oa
from riskkernel.providers.sse import SSEDecoder
from tests.conftest import StartProxy
from tests.fakes import FakeUpstream, ResponsesReply

D = Decimal
INPUT = "What is the weather in Paris?"
TOOLS = [{"type": "function", "name": "get_weather", "parameters": {"type": "object", "properties": {}}}]

# o3: $2 in, $0.50 cached in, $8 out per 1M. 10,000 in (6,000 cached), 3,000 out (2,000 of it reasoning):
# 4,000 x 2 + 6,000 x 0.5 + 3,000 x 8 = 35,000 / 1M
REASONING = ResponsesReply(
    reasoning="Paris is in France; checking the weather tool.",
    calls=[{"call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'}],
    usage={
        "input_tokens": 10_000,
        "input_tokens_details": {"cached_tokens": 6_000},
        "output_tokens": 3_000,
        "output_tokens_details": {"reasoning_tokens": 2_000},
        "total_tokens": 13_000,
    },
)
REASONING_USAGE = Usage(input_tokens=10_000, cached_input_tokens=6_000, output_tokens=3_000, reasoning_tokens=2_000)


def meter(transcript: bytes, cuts: list[int]) -> tuple[oa.Metered, bool]:
    stream = oa.ResponsesStream(oa.parse_responses(b'{"model": "o3", "input": "x", "stream": true}'))
    decoder = SSEDecoder()
    ended = False
    bounds = [0, *cuts, len(transcript)]
    for a, b in itertools.pairwise(bounds):
        for event in decoder.feed(transcript[a:b]):
            data, terminal = stream.feed(event)
            assert data == event.raw
            ended = ended or terminal
    return stream.result(), ended


def test_usage_comes_from_the_terminal_event_at_every_split() -> None:
    transcript = REASONING.stream_bytes()
    for offset in range(len(transcript) + 1):
        metered, ended = meter(transcript, [offset])
        assert ended and metered.usage == REASONING_USAGE, offset
        assert metered.model == "o3-2025-04-16"
    expected = len(REASONING.reasoning or "") + len(REASONING.text or "") + len('{"city": "Paris"}')
    assert meter(transcript, [])[0].output_chars == expected


@pytest.mark.parametrize("end", ["response.completed", "response.incomplete", "response.failed"])
def test_every_terminal_event_ends_the_stream_with_its_usage(end: str) -> None:
    metered, ended = meter(ResponsesReply(end=end).stream_bytes(), [])
    assert ended and metered.usage is not None and metered.usage.input_tokens == 120
    assert metered.finish_reasons == [end.removeprefix("response.")]  # how it ended: there is no other reason


def test_web_search_calls_are_counted() -> None:
    assert oa.meter_responses(ResponsesReply(web_searches=2).whole()).usage.web_searches == 2  # type: ignore[union-attr]


async def test_a_whole_response_reaches_the_client_byte_for_byte_and_is_priced(
    fake: FakeUpstream, start_proxy: StartProxy
) -> None:
    fake.script(REASONING)
    proxy = await start_proxy()
    raw = await proxy.client.responses.with_raw_response.create(model="o3", input=INPUT, tools=TOOLS)  # type: ignore[arg-type]
    assert raw.http_response.content == REASONING.whole()
    assert raw.headers["x-riskkernel-cost-usd"] == "0.0350"
    response = raw.parse()
    (call,) = [item for item in response.output if item.type == "function_call"]
    assert call.arguments == '{"city": "Paris"}'
    assert fake.requests[0].json()["tools"] == TOOLS
    (row,) = await proxy.calls()
    assert (row.endpoint, row.model, row.usage, row.cost) == (
        "/v1/responses",
        "o3-2025-04-16",
        REASONING_USAGE,
        D("0.035"),
    )


async def test_a_stream_reassembles_exactly_and_is_priced(fake: FakeUpstream, start_proxy: StartProxy) -> None:
    fake.script(REASONING)
    proxy = await start_proxy()
    async with proxy.client.responses.stream(model="o3", input=INPUT, tools=TOOLS) as stream:  # type: ignore[arg-type]
        final = await stream.get_final_response()
    assert final.output[0].summary[0].text == REASONING.reasoning  # type: ignore[union-attr]
    assert final.output_text == REASONING.text
    (call,) = [item for item in final.output if item.type == "function_call"]
    assert call.arguments == '{"city": "Paris"}'
    assert final.usage is not None and final.usage.output_tokens_details.reasoning_tokens == 2_000
    async with proxy.client.responses.with_streaming_response.create(model="o3", input=INPUT, stream=True) as raw:
        assert b"".join([chunk async for chunk in raw.iter_bytes()]) == REASONING.stream_bytes()
    rows = await proxy.calls()
    assert [(r.stream, r.usage, r.cost) for r in rows] == [(True, REASONING_USAGE, D("0.035"))] * 2


async def test_a_refusal_is_a_402_in_openais_shape_and_not_retried(fake: FakeUpstream, start_proxy: StartProxy) -> None:
    proxy = await start_proxy(Budget(max_cost=D(0)))
    with pytest.raises(openai.APIStatusError) as refused:
        await proxy.new_client(max_retries=3).responses.create(model="o3", input=INPUT)
    assert refused.value.status_code == 402 and refused.value.code == "insufficient_budget"
    assert refused.value.body["message"].startswith("rk: the cost budget is $0")  # type: ignore[index]
    assert fake.requests == []


@pytest.mark.parametrize(
    ("budget", "reason"),
    [
        (Budget(max_cost=D("0.002")), "cost_budget_exceeded"),
        (Budget(max_cost=None, max_time=3.0), "time_budget_exceeded"),
    ],
)
async def test_a_live_stream_is_cut_and_the_sdk_raises_promptly(
    fake: FakeUpstream, start_proxy: StartProxy, budget: Budget, reason: str
) -> None:
    fake.script(ResponsesReply(model="gpt-4o", endless=True, delay=0.01))
    proxy = await start_proxy(budget)
    started = time.monotonic()
    stream = await proxy.client.responses.create(model="gpt-4o", input=INPUT, stream=True)
    with pytest.raises(openai.APIError, match=r"rk: (cost|time) budget exceeded") as raised:
        async for _ in stream:
            pass
    assert time.monotonic() - started < 5
    assert raised.value.code == reason  # type: ignore[attr-defined]
    (row,) = await proxy.calls()
    assert {Flag.CUT, Flag.ESTIMATED} <= set(row.flags) and row.error == f"cut: {reason}" and row.cost > 0


async def test_a_stream_the_upstream_breaks_before_usage_is_charged_an_estimate(
    fake: FakeUpstream, start_proxy: StartProxy
) -> None:
    fake.script(ResponsesReply(model="gpt-4o", break_after=7))
    proxy = await start_proxy()
    stream = await proxy.client.responses.create(model="gpt-4o", input=INPUT, stream=True)
    with pytest.raises(openai.APIError, match="rk: upstream failed — the stream broke off"):
        async for _ in stream:
            pass
    (row,) = await proxy.calls()
    assert Flag.ESTIMATED in row.flags and row.usage.output_tokens > 0 and row.cost > 0


async def test_an_incomplete_response_is_still_charged(fake: FakeUpstream, start_proxy: StartProxy) -> None:
    fake.script(ResponsesReply(end="response.incomplete"))
    proxy = await start_proxy()
    async with proxy.client.responses.stream(model="o3", input=INPUT) as stream:
        async for _ in stream:
            pass
    (row,) = await proxy.calls()
    assert row.usage.input_tokens == 120 and row.flags == ()


def test_the_request_estimate_reads_input_instructions_and_tools() -> None:
    body = {
        "model": "o3",
        "input": [{"role": "user", "content": "x" * 400}],
        "instructions": "y" * 400,
        "max_output_tokens": 77,
    }
    req = oa.parse_responses(json.dumps(body).encode())
    assert 200 <= req.input_tokens < 230 and req.max_output_tokens == 77


async def test_a_background_response_is_refused_under_a_cost_budget(
    fake: FakeUpstream, start_proxy: StartProxy
) -> None:
    proxy = await start_proxy(Budget(max_cost=D(10)))
    with pytest.raises(openai.APIStatusError) as refused:
        await proxy.client.responses.create(model="o3", input=INPUT, background=True)
    assert refused.value.status_code == 402 and refused.value.code == "unmetered_endpoint"
    assert "--allow-unmetered" in refused.value.message
    assert fake.requests == []
    (row,) = await proxy.calls()
    assert row.flags == (Flag.REFUSED,) and row.error == "unmetered_endpoint"


async def test_an_allowed_background_response_is_charged_its_reservation(
    fake: FakeUpstream, start_proxy: StartProxy
) -> None:
    queued = ResponsesReply(usage=None, text=None)  # what a background create answers: no output, no usage
    fake.script(queued, ResponsesReply(model="gpt-4o", break_after=7))
    proxy = await start_proxy(Budget(max_cost=D(10)), allow_unmetered=True)
    response = await proxy.client.responses.create(model="o3", input=INPUT, background=True, max_output_tokens=500)
    assert response.id == "resp_fake1"
    stream = await proxy.client.responses.create(
        model="gpt-4o", input=INPUT, background=True, stream=True, max_output_tokens=700
    )
    with pytest.raises(openai.APIError, match="the stream broke off"):
        async for _ in stream:
            pass
    # Neither answer says what the generation, still running at the provider, will use: both are charged
    # the most they may use, not the little seen so far.
    rows = await proxy.calls()
    assert [(Flag.ESTIMATED in r.flags, r.usage.output_tokens) for r in rows] == [(True, 500), (True, 700)]
    assert all(r.cost > 0 for r in rows)
