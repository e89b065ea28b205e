"""The proxy on POST /v1/chat/completions, driven by the real `openai` SDK against the fake upstream."""

import asyncio
import io
import json
from decimal import Decimal

import aiohttp
import openai
import pytest
from aiohttp import web

from riskkernel.models import Flag, Usage
from riskkernel.proxy import serve
from tests.conftest import SECRET, StartProxy
from tests.fakes import FakeUpstream, Reply, compact, usage

MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]
TOOL_CALLS = [
    {"id": "call_a", "name": "get_weather", "arguments": '{"city": "Paris"}'},
    {"id": "call_b", "name": "get_weather", "arguments": '{"city": "Lyon", "note": "naïve ✓ \\"quoted\\""}'},
]


async def test_a_non_streaming_response_reaches_the_client_byte_for_byte(
    fake: FakeUpstream, start_proxy: StartProxy
) -> None:
    reply = Reply(text=None, tool_calls=TOOL_CALLS, usage=usage(120, 40))
    fake.script(reply)
    proxy = await start_proxy()
    raw = await proxy.client.chat.completions.with_raw_response.create(model="gpt-4o", messages=MESSAGES, tools=TOOLS)
    assert raw.http_response.content == reply.whole()
    completion = raw.parse()
    assert [(c.id, c.function.name, c.function.arguments) for c in completion.choices[0].message.tool_calls] == [
        (c["id"], c["name"], c["arguments"]) for c in TOOL_CALLS
    ]
    sent = fake.requests[0].json()
    assert sent["tools"] == TOOLS and sent["messages"] == MESSAGES
    # gpt-4o-2024-08-06: $2.50 in, $10 out per 1M
    assert raw.headers["x-riskkernel-cost-usd"] == "0.0007"
    assert raw.headers["x-riskkernel-run-id"] == proxy.run_id
    assert raw.headers["x-riskkernel-call"] == "1"
    assert raw.headers["x-riskkernel-run-cost-usd"] == "0.0007"
    assert "x-riskkernel-remaining-usd" not in raw.headers  # no cost limit on this run
    (row,) = await proxy.calls()
    assert (row.requested_model, row.model, row.status, row.stream) == ("gpt-4o", "gpt-4o-2024-08-06", 200, False)
    assert row.usage == Usage(input_tokens=120, output_tokens=40) and row.cost == Decimal("0.0007")


async def test_request_bodies_and_headers_are_forwarded_faithfully(fake: FakeUpstream, start_proxy: StartProxy) -> None:
    proxy = await start_proxy()
    body = b'{ "model" : "gpt-4o",\n  "messages": [{"role": "user", "content": "caf\\u00e9"}], "future": [1.50, {}] }'
    headers = {
        "Authorization": f"Bearer {SECRET}",
        "OpenAI-Organization": "org-123",
        "Content-Type": "application/json",
        "Connection": "keep-alive, X-Hop",
        "X-Hop": "drop me",
        "Keep-Alive": "timeout=5",
        "Accept-Encoding": "gzip, br",
        "X-RiskKernel-Token": "not for the upstream",
    }
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{proxy.url}/v1/chat/completions", data=body, headers=headers) as response,
    ):
        assert response.status == 200
        await response.read()
    seen = fake.requests[0]
    assert seen.body == body
    assert seen.path == "/v1/chat/completions"
    assert seen.headers["Authorization"] == f"Bearer {SECRET}"
    assert seen.headers["OpenAI-Organization"] == "org-123"
    assert seen.headers["Accept-Encoding"] == "identity"
    assert "X-Hop" not in seen.headers and "Keep-Alive" not in seen.headers
    assert not any(name.lower().startswith("x-riskkernel-") for name in seen.headers)


async def test_rk_headers_from_an_upstream_are_replaced_by_this_runs(start_proxy: StartProxy) -> None:
    async def outer_rk(request: web.Request) -> web.Response:
        await request.read()
        headers = {"X-RiskKernel-Run-Id": "outer", "X-RiskKernel-Halt-Reason": "killed", "X-Other": "kept"}
        return web.Response(body=Reply().whole(), content_type="application/json", headers=headers)

    app = web.Application()
    app.router.add_post("/v1/chat/completions", outer_rk)
    runner, url = await serve(app)
    try:
        proxy = await start_proxy(openai_upstream=f"{url}/v1")
        raw = await proxy.client.chat.completions.with_raw_response.create(model="gpt-4o", messages=MESSAGES)
    finally:
        await runner.cleanup()
    assert raw.headers["x-riskkernel-run-id"] == proxy.run_id
    assert "x-riskkernel-halt-reason" not in raw.headers and raw.headers["x-other"] == "kept"


async def stream_raw(client: openai.AsyncOpenAI, **kwargs: object) -> bytes:
    async with client.chat.completions.with_streaming_response.create(**kwargs) as response:  # type: ignore[call-overload]
        return b"".join([chunk async for chunk in response.iter_bytes()])


@pytest.mark.parametrize("include_usage", [False, True])
async def test_a_stream_reaches_the_client_as_the_upstream_would_have_sent_it(
    fake: FakeUpstream, start_proxy: StartProxy, include_usage: bool
) -> None:
    reply = Reply(usage=usage(200, 30, cached=100))
    fake.script(reply)
    proxy = await start_proxy()
    options = {"stream_options": {"include_usage": True}} if include_usage else {}
    raw = await stream_raw(proxy.client, model="gpt-4o", messages=MESSAGES, stream=True, **options)
    assert raw == reply.stream_bytes(include_usage)
    assert fake.requests[0].json()["stream_options"] == {"include_usage": True}
    (row,) = await proxy.calls()
    # 100 plain at $2.50, 100 cached at $1.25, 30 out at $10 per 1M
    assert row.cost == Decimal("0.000675") and row.flags == () and row.stream


async def test_the_common_choices_0_loop_never_sees_a_usage_chunk(fake: FakeUpstream, start_proxy: StartProxy) -> None:
    fake.script(Reply(text="one two three four five six"))
    proxy = await start_proxy()
    stream = await proxy.client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)
    text = "".join([chunk.choices[0].delta.content or "" async for chunk in stream])
    assert text == "one two three four five six"


async def test_streamed_tool_calls_reassemble_exactly(fake: FakeUpstream, start_proxy: StartProxy) -> None:
    fake.script(Reply(text=None, tool_calls=TOOL_CALLS, pieces=5))
    proxy = await start_proxy()
    stream = await proxy.client.chat.completions.create(model="gpt-4o", messages=MESSAGES, tools=TOOLS, stream=True)
    calls: dict[int, dict[str, str]] = {}
    finish = None
    async for chunk in stream:
        for delta_call in chunk.choices[0].delta.tool_calls or []:
            entry = calls.setdefault(delta_call.index, {"id": "", "name": "", "arguments": ""})
            entry["id"] += delta_call.id or ""
            entry["name"] += delta_call.function.name or ""
            entry["arguments"] += delta_call.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert [calls[i] for i in sorted(calls)] == TOOL_CALLS
    assert finish == "tool_calls"


@pytest.mark.parametrize("stream", [False, True])
async def test_cached_and_reasoning_tokens_are_priced_as_billed(
    fake: FakeUpstream, start_proxy: StartProxy, stream: bool
) -> None:
    fake.script(Reply(model="o3-2025-04-16", usage=usage(10_000, 3_000, cached=6_000, reasoning=2_000)))
    proxy = await start_proxy()
    if stream:
        await stream_raw(proxy.client, model="o3", messages=MESSAGES, stream=True)
    else:
        await proxy.client.chat.completions.create(model="o3", messages=MESSAGES)
    (row,) = await proxy.calls()
    # o3: 4,000 plain at $2, 6,000 cached at $0.50, 3,000 out (2,000 of it reasoning) at $8 per 1M
    assert row.cost == Decimal("0.035")
    assert row.cache_savings == Decimal("0.009")  # 6,000 cached at $0.50 instead of $2 per 1M
    assert row.usage == Usage(
        input_tokens=10_000, cached_input_tokens=6_000, output_tokens=3_000, reasoning_tokens=2_000
    )
    assert row.model == "o3-2025-04-16" and row.price_source.endswith("openai/o3")


async def test_the_ledger_has_the_call_before_the_client_has_the_last_byte(
    fake: FakeUpstream, start_proxy: StartProxy
) -> None:
    proxy = await start_proxy()
    stream = await proxy.client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)
    async for _ in stream:
        pass
    assert len(proxy.committed_calls()) == 1  # read at once, as the client returns: no waiting for a writer
    await proxy.client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert len(proxy.committed_calls()) == 2


@pytest.mark.parametrize(
    ("status", "body", "error"),
    [
        (
            429,
            compact({"error": {"message": "Rate limit reached", "type": "requests", "code": "rate_limit_exceeded"}}),
            openai.RateLimitError,
        ),
        (
            400,
            compact({"error": {"message": "bad param", "type": "invalid_request_error", "param": "x", "code": None}}),
            openai.BadRequestError,
        ),
        (503, b"", openai.InternalServerError),
    ],
)
async def test_upstream_errors_pass_through_unchanged(
    fake: FakeUpstream, start_proxy: StartProxy, status: int, body: bytes, error: type[Exception]
) -> None:
    fake.script(Reply(status=status, body=body))
    proxy = await start_proxy()
    with pytest.raises(error) as raised:
        await proxy.client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert raised.value.response.status_code == status  # type: ignore[attr-defined]
    assert raised.value.response.content == body  # type: ignore[attr-defined]
    (row,) = await proxy.calls()
    assert row.status == status and row.cost == 0 and row.flags == ()


async def test_an_unreachable_upstream_is_a_502_in_openai_shape(start_proxy: StartProxy) -> None:
    proxy = await start_proxy(openai_upstream="http://127.0.0.1:9/v1")
    with pytest.raises(openai.InternalServerError) as raised:
        await proxy.client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert raised.value.status_code == 502
    assert raised.value.code == "upstream_unreachable"
    assert raised.value.body["message"].startswith("rk: upstream failed — could not reach http://127.0.0.1:9/v1")  # type: ignore[index]
    (row,) = await proxy.calls()
    assert row.status == 502 and row.cost == 0 and row.flags == ()  # never reached the provider: not billed
    assert row.error.startswith("could not reach")


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (b'{"model": "gpt-4o", "messages": [', 400, "invalid_request"),
        (b'{"messages": []}', 400, "invalid_request"),
        (b'{"model": "gpt-4o", "pad": "' + b"x" * (33 * 2**20) + b'"}', 413, "request_too_large"),
    ],
)
async def test_bad_requests_are_answered_by_rk_and_never_forwarded(
    fake: FakeUpstream, start_proxy: StartProxy, body: bytes, status: int, code: str
) -> None:
    proxy = await start_proxy()
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{proxy.url}/v1/chat/completions", data=io.BytesIO(body)) as response,
    ):
        assert response.status == status
        error = (await response.json())["error"]
    assert error["code"] == code and error["message"].startswith("rk: ")
    assert fake.requests == []
    # the proxy keeps serving
    await proxy.client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert len(fake.requests) == 1


async def test_a_stream_without_usage_is_charged_an_estimate(fake: FakeUpstream, start_proxy: StartProxy) -> None:
    fake.script(Reply(text="x" * 400, usage=None))
    proxy = await start_proxy()
    await stream_raw(proxy.client, model="gpt-4o", messages=MESSAGES, stream=True)
    (row,) = await proxy.calls()
    assert Flag.ESTIMATED in row.flags
    assert row.usage.output_tokens == 100 and row.usage.input_tokens > 0 and row.cost > 0


async def test_a_client_that_leaves_mid_stream_stops_the_upstream_and_is_charged(
    fake: FakeUpstream, start_proxy: StartProxy
) -> None:
    fake.script(Reply(endless=True, delay=0.01))
    proxy = await start_proxy()
    stream = await proxy.client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)
    seen = 0
    async for _ in stream:
        seen += 1
        if seen == 20:
            break
    await stream.close()
    for _ in range(200):
        if fake.streams_open == 0 and await proxy.calls():
            break
        await asyncio.sleep(0.01)
    assert fake.streams_open == 0
    (row,) = await proxy.calls()
    assert Flag.ESTIMATED in row.flags and row.usage.output_tokens > 0 and row.error == "client disconnected"
    assert proxy.live.governor.in_flight == 0


async def test_a_stream_the_upstream_breaks_off_ends_in_an_error_the_sdk_raises(start_proxy: StartProxy) -> None:
    events = Reply().stream_events({"stream_options": {"include_usage": True}})

    async def broken(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"".join(events[:3]))
        assert request.transport is not None
        request.transport.close()
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", broken)
    runner, url = await serve(app)
    try:
        proxy = await start_proxy(openai_upstream=f"{url}/v1")
        stream = await proxy.client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)
        with pytest.raises(openai.APIError, match="rk: upstream failed — the stream broke off"):
            async for _ in stream:
                pass
        (row,) = await proxy.calls()
        assert Flag.ESTIMATED in row.flags and row.error.startswith("the stream broke off")
    finally:
        await runner.cleanup()


async def test_routes_outside_the_api_are_404_in_openai_shape(start_proxy: StartProxy) -> None:
    proxy = await start_proxy()
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{proxy.url}/v2/anything", json={}) as response,
    ):
        assert response.status == 404
        assert (await response.json())["error"]["code"] == "unknown_route"


async def test_the_served_model_is_priced_when_it_differs(fake: FakeUpstream, start_proxy: StartProxy) -> None:
    fake.script(Reply(model="gpt-4o-mini-2024-07-18", usage=usage(1_000_000, 0)))
    proxy = await start_proxy()
    await proxy.client.chat.completions.create(model="my-alias", messages=MESSAGES)
    (row,) = await proxy.calls()
    assert row.model == "gpt-4o-mini-2024-07-18" and row.cost == Decimal("0.15")
    assert json.loads(fake.requests[0].body)["model"] == "my-alias"


async def test_a_mid_stream_error_reaches_the_sdk_and_the_call_is_charged_an_estimate(
    fake: FakeUpstream, start_proxy: StartProxy
) -> None:
    fake.script(Reply(error_after=4))
    proxy = await start_proxy()
    stream = await proxy.client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)
    with pytest.raises(openai.APIError, match="Overloaded"):
        async for _ in stream:
            pass
    (row,) = await proxy.calls()
    assert row.status == 200 and row.error == "upstream: Overloaded" and Flag.ESTIMATED in row.flags
    assert row.usage.output_tokens > 0 and row.cost > 0


async def test_an_upstream_that_idles_after_its_last_event_does_not_hold_the_client(
    fake: FakeUpstream, start_proxy: StartProxy
) -> None:
    fake.script(Reply(linger=60))  # sends [DONE], then keeps the connection open
    proxy = await start_proxy()
    stream = await proxy.client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)
    text = "".join([chunk.choices[0].delta.content or "" async for chunk in stream])
    assert text == Reply().text
    (row,) = await proxy.calls()
    assert row.flags == () and row.usage.output_tokens == 20
