"""Faults on either side of the proxy, each seen three ways: what the client's SDK raises (or the upstream's
own error, passed through), that the proxy still serves the next call, and the call's one ledger row.

Upstreams the fake cannot be made to misbehave like are small servers on 127.0.0.1 written here: `RawUpstream`
speaks HTTP/1.1 by hand, so it can hang up, reset, stall or cut a body short at any byte.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import struct
import time
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import anthropic
import openai
import pytest
from aiohttp import web

from riskkernel.models import CallRecord, Flag, Usage
from riskkernel.proxy import serve
from tests.conftest import SECRET, Harness, StartProxy
from tests.fakes import FakeUpstream, MessagesReply, Reply, compact

MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]
CHAT = {"model": "gpt-4o", "messages": MESSAGES}
CLAUDE = {"model": "claude-sonnet-4-6", "max_tokens": 100, "messages": MESSAGES}
NEVER = asyncio.Event  # a gate no one sets: the upstream never answers


# -- helpers ----------------------------------------------------------------------------------------------


def rk_message(exc: BaseException) -> str:
    """The error message in an SDK exception's body, in either provider's shape (else the exception's text),
    which never carries the client's key."""
    message = str(getattr(exc, "message", exc))
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)  # Anthropic's {"type": "error", "error": {...}}; the openai SDK unwraps
        if isinstance(inner, dict) and isinstance(inner.get("message"), str):
            message = inner["message"]
    assert SECRET not in message
    return message


async def normal_chat(proxy: Harness) -> None:
    completion = await proxy.client.chat.completions.create(**CHAT)  # type: ignore[call-overload]
    assert completion.choices[0].message.content == Reply().text


async def normal_claude(proxy: Harness) -> None:
    message = await proxy.claude.messages.create(**CLAUDE)  # type: ignore[call-overload]
    assert message.content[0].text == "Hello from fake Claude."


async def still_serves(proxy: Harness, provider: str = "openai") -> CallRecord:
    """A normal call through the same proxy succeeds; its row (the last) is a plain metered one."""
    await (normal_chat(proxy) if provider == "openai" else normal_claude(proxy))
    row = (await proxy.calls())[-1]
    assert (row.status, row.flags, row.error, row.provider) == (200, (), None, provider)
    return row


async def only_row(proxy: Harness) -> CallRecord:
    """The run's one call row; an error it records never carries the client's key."""
    (row,) = await proxy.calls()
    assert SECRET not in (row.error or "")
    return row


async def eventually(check: Callable[[], bool], within: float = 3.0) -> None:
    deadline = time.monotonic() + within
    while not check() and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert check()


def free_port() -> int:
    """A loopback port nothing listens on (so connecting to it is refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def post_raw(url: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, str, bytes]:
    async with aiohttp.ClientSession() as session, session.post(url, data=body, headers=headers) as response:
        return response.status, response.content_type, await response.read()


# -- a hand-written upstream ------------------------------------------------------------------------------

Fault = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def head(content_type: str = "application/json", length: int | None = None, chunked: bool = False) -> bytes:
    """A response's head; without a length or chunking, its body ends where the connection does."""
    lines = ["HTTP/1.1 200 OK", f"Content-Type: {content_type}", "Connection: close"]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    if chunked:
        lines.append("Transfer-Encoding: chunked")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def chunks(*pieces: bytes) -> bytes:
    """`pieces` in chunked encoding, without the last chunk that would end the body."""
    return b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for piece in pieces)


def reset(writer: asyncio.StreamWriter) -> None:
    """Abort the connection with a TCP RST rather than a FIN."""
    writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def end(writer: asyncio.StreamWriter, how: str) -> None:
    if how == "reset":
        reset(writer)
        return
    await writer.drain()
    writer.close()


def sends(data: bytes, then: str) -> Fault:
    """Answer with `data`, then: `close` (FIN), `reset` (RST) or `stall` (silence until rk hangs up)."""

    async def fault(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(data)
        await writer.drain()
        if then == "reset":
            await asyncio.sleep(0.05)  # so that what was sent is read: a RST may discard what is not
        if then == "stall":
            await reader.read()  # returns once rk closes the connection
        await end(writer, "close" if then == "stall" else then)

    return fault


class RawUpstream:
    """An upstream on 127.0.0.1 that reads each request and answers it with the next fault given, then, once
    they are used up, with the fake's normal answer (chat or Messages, whole or streamed) and a close."""

    def __init__(self, *faults: Fault) -> None:
        self.faults = list(faults)
        self.requests: list[tuple[str, bytes]] = []  # (path, body) of every request read
        self.root = self.url = ""
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None

    async def start(self) -> RawUpstream:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.root = f"http://127.0.0.1:{port}"
        self.url = f"{self.root}/v1"
        return self

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        await self._server.wait_closed()
        await asyncio.sleep(0)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            request_head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
            length = 0
            for line in request_head[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            body = await reader.readexactly(length)
            path = request_head[0].split()[1]
            self.requests.append((path, body))
            if self.faults:
                await self.faults.pop(0)(reader, writer)
                return
            reply = MessagesReply() if path.endswith("/messages") else Reply()
            obj = json.loads(body)
            if obj.get("stream"):
                writer.write(head("text/event-stream") + b"".join(reply.stream_events(obj)))
            else:
                writer.write(head("application/json", len(reply.whole())) + reply.whole())
            await end(writer, "close")
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._writers.discard(writer)


@pytest.fixture
async def raw() -> AsyncIterator[Callable[..., Awaitable[RawUpstream]]]:
    started: list[RawUpstream] = []

    async def start(*faults: Fault) -> RawUpstream:
        upstream = await RawUpstream(*faults).start()
        started.append(upstream)
        return upstream

    yield start
    for upstream in started:
        await upstream.stop()


StartRaw = Callable[..., Awaitable[RawUpstream]]


def chat_events() -> list[bytes]:
    return Reply().stream_events({"stream_options": {"include_usage": True}})


def claude_events() -> list[bytes]:
    return MessagesReply().stream_events({})


# -- upstreams that cannot be reached -----------------------------------------------------------------------


async def test_a_refused_connection_fails_an_anthropic_stream_with_a_502_and_no_charge(start_proxy: StartProxy) -> None:
    port = free_port()
    proxy = await start_proxy(anthropic_upstream=f"http://127.0.0.1:{port}")
    with pytest.raises(anthropic.InternalServerError) as failed:
        async with proxy.claude.messages.stream(**CLAUDE) as stream:  # type: ignore[arg-type]
            await stream.get_final_message()
    assert failed.value.status_code == 502
    assert rk_message(failed.value).startswith(f"rk: upstream failed — could not reach http://127.0.0.1:{port}")
    row = await only_row(proxy)
    assert (row.status, row.stream, row.provider) == (502, True, "anthropic")
    assert (row.flags, row.usage, row.cost) == ((), Usage(), 0)  # the request never left: it cannot have been billed
    assert row.error.startswith(f"could not reach http://127.0.0.1:{port}")
    await still_serves(proxy, "openai")
    assert len(await proxy.calls()) == 2


async def test_an_upstream_host_that_does_not_resolve_is_a_502_and_no_charge(
    fake: FakeUpstream, start_proxy: StartProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)  # .invalid must go to the local resolver, and no further
    proxy = await start_proxy(openai_upstream="http://rk-no-such-host.invalid/v1")
    started = time.monotonic()
    with pytest.raises(openai.InternalServerError) as failed:
        await proxy.client.chat.completions.create(**CHAT, stream=True)  # type: ignore[call-overload]
    assert time.monotonic() - started < 5  # the resolver answers .invalid at once
    assert failed.value.status_code == 502 and failed.value.code == "upstream_unreachable"
    assert rk_message(failed.value).startswith(
        "rk: upstream failed — could not reach http://rk-no-such-host.invalid/v1"
    )
    row = await only_row(proxy)
    assert (row.status, row.stream, row.flags, row.usage, row.cost) == (502, True, (), Usage(), 0)
    assert "rk-no-such-host.invalid" in row.error
    await still_serves(proxy, "anthropic")


@pytest.fixture
def unanswered_port() -> Any:
    """A loopback port whose listener never accepts and whose backlog is full: the kernel drops further SYNs,
    so a connection to it neither succeeds nor is refused."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(3):
        filler = socket.socket()
        filler.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            filler.connect(("127.0.0.1", port))
        fillers.append(filler)
    probe = socket.socket()
    probe.settimeout(0.3)
    try:
        probe.connect(("127.0.0.1", port))
        pytest.skip("this kernel answers a SYN past a full backlog: no connect timeout to be had on loopback")
    except TimeoutError:
        pass
    finally:
        probe.close()
    yield port
    for s in [*fillers, listener]:
        s.close()


async def test_an_upstream_that_never_accepts_the_connection_times_out(
    start_proxy: StartProxy, unanswered_port: int
) -> None:
    proxy = await start_proxy(openai_upstream=f"http://127.0.0.1:{unanswered_port}/v1", connect_timeout=0.5)
    started = time.monotonic()
    with pytest.raises(openai.InternalServerError) as failed:
        await proxy.client.chat.completions.create(**CHAT)  # type: ignore[call-overload]
    assert 0.4 < time.monotonic() - started < 5
    assert failed.value.status_code >= 500 and rk_message(failed.value).startswith("rk:")
    row = await only_row(proxy)
    assert row.status >= 500 and row.flags == () and row.cost == 0  # never sent: never billed
    assert row.error
    await still_serves(proxy, "anthropic")


# -- upstreams that go silent ---------------------------------------------------------------------------------


async def test_an_upstream_silent_before_its_answer_times_out_and_is_charged_its_reservation(
    fake: FakeUpstream, start_proxy: StartProxy
) -> None:
    gate = NEVER()
    fake.script(Reply(gate=gate), Reply())
    proxy = await start_proxy(read_timeout=0.5)
    started = time.monotonic()
    with pytest.raises(openai.InternalServerError) as failed:
        await proxy.client.chat.completions.create(**CHAT)  # type: ignore[call-overload]
    assert 0.4 < time.monotonic() - started < 3
    assert failed.value.status_code == 504
    assert rk_message(failed.value) == "rk: upstream failed — the upstream sent nothing for 0.5s (--read-timeout)"
    row = await only_row(proxy)
    # The request reached the provider, which may be generating (and billing) all the while: charged what it
    # reserved, as an estimate.
    assert row.status == 504 and Flag.ESTIMATED in row.flags and row.error
    assert row.usage.input_tokens > 0 and row.cost == row.reserved > 0
    await still_serves(proxy)
    assert len(fake.requests) == 2
    gate.set()


async def test_a_whole_body_that_stalls_midway_times_out(start_proxy: StartProxy, raw: StartRaw) -> None:
    whole = MessagesReply().whole()
    upstream = await raw(sends(head("application/json", len(whole)) + whole[:40], then="stall"))
    proxy = await start_proxy(anthropic_upstream=upstream.root, read_timeout=0.5)
    with pytest.raises(anthropic.APIStatusError) as failed:
        await proxy.claude.messages.create(**CLAUDE)  # type: ignore[call-overload]
    assert failed.value.status_code >= 500 and rk_message(failed.value).startswith("rk:")
    row = await only_row(proxy)
    assert row.status >= 500 and Flag.ESTIMATED in row.flags and row.usage.input_tokens > 0 and row.error
    await still_serves(proxy, "anthropic")
    assert len(upstream.requests) == 2


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
async def test_a_stream_that_stalls_midway_times_out_and_is_charged_what_it_streamed(
    start_proxy: StartProxy, raw: StartRaw, provider: str
) -> None:
    events = chat_events()[:3] if provider == "openai" else claude_events()[:5]  # some text, no usage yet
    upstream = await raw(sends(head("text/event-stream") + b"".join(events), then="stall"))
    proxy = await start_proxy(openai_upstream=upstream.url, anthropic_upstream=upstream.root, read_timeout=0.5)
    text = []
    started = time.monotonic()
    if provider == "openai":
        stream = await proxy.client.chat.completions.create(**CHAT, stream=True)  # type: ignore[call-overload]
        with pytest.raises(openai.APIError) as failed:
            async for chunk in stream:
                text.append(chunk.choices[0].delta.content or "")
    else:
        with pytest.raises(anthropic.APIStatusError) as failed:  # type: ignore[assignment]
            async with proxy.claude.messages.stream(**CLAUDE) as claude:  # type: ignore[arg-type]
                async for piece in claude.text_stream:
                    text.append(piece)
    assert time.monotonic() - started < 3
    assert rk_message(failed.value).startswith("rk:"), rk_message(failed.value)
    assert "".join(text)  # what came before the stall reached the client
    row = await only_row(proxy)
    assert row.status == 200 and Flag.ESTIMATED in row.flags and row.error
    assert row.usage.output_tokens >= len("".join(text)) // 4 > 0 and row.cost > 0
    if provider == "anthropic":
        assert row.usage.input_tokens == 100  # reported by message_start, not estimated
    await still_serves(proxy, provider)


async def test_a_slow_drip_stream_arrives_whole_the_read_timeout_is_per_read(
    fake: FakeUpstream, start_proxy: StartProxy
) -> None:
    fake.script(Reply(delay=0.3, pieces=2), Reply())  # 6 events, 0.3 s apart: longer than the timeout in all
    proxy = await start_proxy(read_timeout=1.0)
    started = time.monotonic()
    stream = await proxy.client.chat.completions.create(**CHAT, stream=True)  # type: ignore[call-overload]
    text = "".join([chunk.choices[0].delta.content or "" async for chunk in stream])
    assert time.monotonic() - started > 1.2
    assert text == Reply().text
    row = await only_row(proxy)
    assert (row.status, row.flags, row.error, row.usage) == (200, (), None, Usage(input_tokens=100, output_tokens=20))
    await still_serves(proxy)


async def test_a_client_that_stops_reading_is_not_a_silent_upstream(start_proxy: StartProxy) -> None:
    # The upstream sends as fast as it is let; the client stops reading for longer than the read timeout, so
    # rk is held writing to it, not waiting on the upstream: the stream goes on when the client reads again.
    delta = {"index": 0, "delta": {"content": "x" * 2**14}, "finish_reason": None}
    event = b"data: " + compact({"object": "chat.completion.chunk", "model": "gpt-4o", "choices": [delta]}) + b"\n\n"

    async def firehose(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        with contextlib.suppress(ConnectionError):
            while True:
                await response.write(event)
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", firehose)
    runner, url = await serve(app)
    try:
        proxy = await start_proxy(openai_upstream=f"{url}/v1", read_timeout=0.3)
        async with (
            aiohttp.ClientSession() as session,
            session.post(f"{proxy.url}/v1/chat/completions", json={**CHAT, "stream": True}) as response,
        ):
            first = await response.content.readexactly(2**20)
            await asyncio.sleep(1.2)  # the buffers on the way fill; rk waits on the client, 4x the timeout
            after = await response.content.readexactly(2**20)
        assert first.startswith(b"data: ") and b"upstream_timeout" not in first + after
        await eventually(lambda: len(proxy.committed_calls()) == 1)
        row = await only_row(proxy)
        assert (row.status, row.error) == (499, "client disconnected")
        await still_serves(proxy, "anthropic")
    finally:
        await runner.cleanup()


# -- upstreams that break off ---------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["close", "reset"])
async def test_an_upstream_that_hangs_up_before_answering_is_a_502(
    start_proxy: StartProxy, raw: StartRaw, how: str
) -> None:
    upstream = await raw(sends(b"", then=how))
    proxy = await start_proxy(openai_upstream=upstream.url)
    with pytest.raises(openai.InternalServerError) as failed:
        await proxy.client.chat.completions.create(**CHAT)  # type: ignore[call-overload]
    assert failed.value.status_code == 502 and rk_message(failed.value).startswith("rk: upstream failed — ")
    assert len(upstream.requests) == 1  # not retried: a POST that reached the provider may have been billed
    row = await only_row(proxy)
    assert row.status == 502 and Flag.ESTIMATED in row.flags and row.error
    assert row.usage.input_tokens > 0 and row.usage.output_tokens == 0 and row.cost > 0
    await still_serves(proxy)


@pytest.mark.parametrize("how", ["close", "reset"])
async def test_a_whole_body_cut_short_is_a_502_and_charged_an_estimate(
    start_proxy: StartProxy, raw: StartRaw, how: str
) -> None:
    whole = MessagesReply().whole()
    upstream = await raw(sends(head("application/json", len(whole)) + whole[: len(whole) // 2], then=how))
    proxy = await start_proxy(anthropic_upstream=upstream.root)
    with pytest.raises(anthropic.InternalServerError) as failed:
        await proxy.claude.messages.create(**CLAUDE)  # type: ignore[call-overload]
    assert failed.value.status_code == 502
    assert rk_message(failed.value).startswith("rk: upstream failed — the response broke off")
    row = await only_row(proxy)
    assert row.status == 502 and Flag.ESTIMATED in row.flags and row.error.startswith("the response broke off")
    assert row.usage.input_tokens > 0 and row.cost > 0
    await still_serves(proxy, "anthropic")


async def test_a_stream_reset_midway_ends_in_an_error_the_sdk_raises(start_proxy: StartProxy, raw: StartRaw) -> None:
    # Streams come chunked: with a body that ends where the connection does, aiohttp takes a reset for an end.
    upstream = await raw(sends(head("text/event-stream", chunked=True) + chunks(*chat_events()[:4]), then="reset"))
    proxy = await start_proxy(openai_upstream=upstream.url)
    stream = await proxy.client.chat.completions.create(**CHAT, stream=True)  # type: ignore[call-overload]
    text = []
    with pytest.raises(openai.APIError) as failed:
        async for chunk in stream:
            text.append(chunk.choices[0].delta.content or "")
    assert rk_message(failed.value).startswith("rk: upstream failed — the stream broke off")
    row = await only_row(proxy)
    assert row.status == 200 and Flag.ESTIMATED in row.flags and row.error.startswith("the stream broke off")
    assert row.usage.output_tokens >= len("".join(text)) // 4 > 0
    await still_serves(proxy)


# -- broken answers -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("provider", "then"),
    [
        ("openai", "close"),
        ("anthropic", "close"),
        # A body that ends where the connection does: aiohttp takes a reset for its end, so only the SSE shows it.
        ("openai", "reset"),
    ],
)
async def test_a_stream_that_ends_mid_event_is_an_error_not_a_silent_end(
    start_proxy: StartProxy, raw: StartRaw, provider: str, then: str
) -> None:
    events = chat_events()[:4] if provider == "openai" else claude_events()[:6]
    truncated = b"".join(events[:-1]) + events[-1][: len(events[-1]) // 2]  # ends halfway through an event
    upstream = await raw(sends(head("text/event-stream") + truncated, then=then))
    proxy = await start_proxy(openai_upstream=upstream.url, anthropic_upstream=upstream.root)
    raised: Exception | None = None
    try:
        if provider == "openai":
            stream = await proxy.client.chat.completions.create(**CHAT, stream=True)  # type: ignore[call-overload]
            async for _ in stream:
                pass
        else:
            async with proxy.claude.messages.stream(**CLAUDE) as claude:  # type: ignore[arg-type]
                await claude.get_final_message()
    except (openai.APIError, anthropic.APIError) as exc:
        raised = exc
    row = await only_row(proxy)
    assert row.status == 200 and Flag.ESTIMATED in row.flags and row.usage.output_tokens > 0
    # A partial answer must not pass for a whole one: the SDK raises, as when rk sees a stream break off,
    # and the ledger says why the usage is an estimate.
    assert raised is not None and rk_message(raised).startswith("rk: upstream failed"), "the stream ended silently"
    assert row.error
    await still_serves(proxy, provider)


JUNK = [b"data: {not json at all\n\n", b"a line with no colon\n\n", b": a comment\n\n", b"data: \xff\xfe\n\n"]
DEEP = [b'data: {"choices": ' + b"[" * 100_000 + b"\n\n"]  # too deep for a recursive JSON parser


@pytest.mark.parametrize(
    ("provider", "garbage"),
    [("openai", JUNK), ("openai", DEEP), ("anthropic", DEEP)],
    ids=["openai-junk", "openai-deep", "anthropic-deep"],
)
async def test_malformed_sse_passes_through_as_sent_and_the_call_is_metered(
    start_proxy: StartProxy, raw: StartRaw, provider: str, garbage: list[bytes]
) -> None:
    events = chat_events() if provider == "openai" else claude_events()
    sent = b"".join(events[:2] + garbage + events[2:])
    upstream = await raw(sends(head("text/event-stream") + sent, then="close"))
    proxy = await start_proxy(openai_upstream=upstream.url, anthropic_upstream=upstream.root)
    if provider == "openai":
        streaming = proxy.client.chat.completions.with_streaming_response.create(
            **CHAT, stream=True, stream_options={"include_usage": True}
        )  # type: ignore[call-overload]
    else:
        streaming = proxy.claude.messages.with_streaming_response.create(**CLAUDE, stream=True)  # type: ignore[call-overload,assignment]
    async with streaming as response:
        received = b"".join([chunk async for chunk in response.iter_bytes()])
    assert received == sent  # the upstream's own bytes: what the client would have had without rk
    row = await only_row(proxy)
    reported = Usage(input_tokens=100, output_tokens=20 if provider == "openai" else 25)
    assert (row.status, row.flags, row.error, row.usage) == (200, (), None, reported)
    await still_serves(proxy, provider)


async def test_an_event_that_never_ends_is_cut_at_16_mib(start_proxy: StartProxy, raw: StartRaw) -> None:
    endless = b"data: " + b"x" * (17 * 2**20)  # no blank line, ever
    upstream = await raw(sends(head("text/event-stream") + b"".join(chat_events()[:2]) + endless, then="stall"))
    proxy = await start_proxy(openai_upstream=upstream.url)
    stream = await proxy.client.chat.completions.create(**CHAT, stream=True)  # type: ignore[call-overload]
    with pytest.raises(openai.APIError) as failed:
        async for _ in stream:
            pass
    assert rk_message(failed.value) == "rk: upstream failed — the stream sent more than 16 MiB in one event"
    row = await only_row(proxy)
    assert row.status == 200 and Flag.ESTIMATED in row.flags and row.cost > 0
    assert row.error == "the stream sent more than 16 MiB in one event"
    await still_serves(proxy)


TRUNCATED_JSON = b'{"id": "x", "usage": {"prompt_tokens": 1'
DEEP_JSON = b'{"id": "x", "content": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"


@pytest.mark.parametrize(
    ("provider", "broken"),
    [("openai", TRUNCATED_JSON), ("anthropic", TRUNCATED_JSON), ("openai", DEEP_JSON), ("anthropic", DEEP_JSON)],
    ids=["openai-truncated", "anthropic-truncated", "openai-deep", "anthropic-deep"],
)
async def test_a_200_whose_body_rk_cannot_read_passes_through_and_is_charged_an_estimate(
    fake: FakeUpstream, start_proxy: StartProxy, provider: str, broken: bytes
) -> None:
    normal = Reply() if provider == "openai" else MessagesReply()
    fake.script(type(normal)(body=broken), normal)
    proxy = await start_proxy()
    if provider == "openai":
        raw = await proxy.client.chat.completions.with_raw_response.create(**CHAT)  # type: ignore[call-overload]
    else:
        raw = await proxy.claude.messages.with_raw_response.create(**CLAUDE)  # type: ignore[call-overload,assignment]
    # The upstream's own answer, as the client would have had it without rk: its SDK fails to parse it either way.
    assert raw.http_response.status_code == 200 and raw.http_response.content == broken
    row = await only_row(proxy)
    assert row.status == 200 and Flag.ESTIMATED in row.flags and row.usage.input_tokens > 0 and row.cost > 0
    assert row.error  # the ledger says why the usage is an estimate
    await still_serves(proxy, provider)


HTML = b"<html><body><h1>503 Service Temporarily Unavailable</h1></body></html>"
RATE_LIMITED = compact({"type": "error", "error": {"type": "rate_limit_error", "message": "Slow down"}})
OVERLOADED = compact({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})


@pytest.mark.parametrize(
    ("provider", "stream", "status", "body", "content_type", "error"),
    [
        ("anthropic", False, 500, b"", "application/json", anthropic.InternalServerError),
        ("anthropic", False, 503, HTML, "text/html", anthropic.InternalServerError),
        ("anthropic", True, 429, RATE_LIMITED, "application/json", anthropic.RateLimitError),
        ("anthropic", True, 529, OVERLOADED, "application/json", anthropic.InternalServerError),
        ("openai", True, 500, b"", "application/json", openai.InternalServerError),
        ("openai", True, 503, HTML, "text/html", openai.InternalServerError),
    ],
    ids=[
        "anthropic-500-empty",
        "anthropic-503-html",
        "anthropic-stream-429",
        "anthropic-stream-529",
        "openai-stream-500-empty",
        "openai-stream-503-html",
    ],
)
async def test_upstream_error_statuses_pass_through_with_their_own_body(
    fake: FakeUpstream,
    start_proxy: StartProxy,
    provider: str,
    stream: bool,
    status: int,
    body: bytes,
    content_type: str,
    error: type[Exception],
) -> None:
    normal = Reply() if provider == "openai" else MessagesReply()
    fake.script(type(normal)(status=status, body=body, content_type=content_type), normal)
    proxy = await start_proxy()
    with pytest.raises(error) as failed:
        if provider == "openai":
            await proxy.client.chat.completions.create(**CHAT, stream=stream)  # type: ignore[call-overload]
        else:
            await proxy.claude.messages.create(**CLAUDE, stream=stream)  # type: ignore[call-overload]
    response = failed.value.response  # type: ignore[attr-defined]
    assert (response.status_code, response.content) == (status, body)
    assert response.headers["content-type"].startswith(content_type)
    row = await only_row(proxy)
    assert (row.status, row.stream, row.flags, row.usage, row.cost) == (status, stream, (), Usage(), 0)
    if body.startswith(b"{"):
        assert row.error == f"upstream: {json.loads(body)['error']['message']}"
    await still_serves(proxy, provider)


# -- clients that misbehave -----------------------------------------------------------------------------------


async def test_an_anthropic_client_that_leaves_mid_stream_stops_the_upstream_and_is_charged(
    fake: FakeUpstream, start_proxy: StartProxy
) -> None:
    fake.script(MessagesReply(endless=True, delay=0.01), MessagesReply())
    proxy = await start_proxy()
    async with proxy.claude.messages.stream(**CLAUDE) as stream:  # type: ignore[arg-type]
        pieces = 0
        async for _ in stream.text_stream:
            pieces += 1
            if pieces == 10:
                break
    await eventually(lambda: fake.streams_open == 0)
    await eventually(lambda: len(proxy.committed_calls()) == 1)
    row = await only_row(proxy)
    assert (row.status, row.error) == (499, "client disconnected") and Flag.ESTIMATED in row.flags
    assert row.usage.input_tokens == 100 and row.usage.output_tokens > 1 and row.cost > 0
    assert proxy.live.governor.in_flight == 0
    await still_serves(proxy, "anthropic")


async def test_a_slow_reader_holds_the_upstream_back_and_rk_buffers_little(start_proxy: StartProxy) -> None:
    delta = {"index": 0, "delta": {"content": "x" * 2**16}, "finish_reason": None}
    event = b"data: " + compact({"object": "chat.completion.chunk", "model": "gpt-4o", "choices": [delta]}) + b"\n\n"
    sent = 0  # what the upstream has handed to its socket
    streaming = False

    async def firehose(request: web.Request) -> web.StreamResponse:  # as fast as it is let
        nonlocal sent, streaming
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        streaming = True
        try:
            while True:
                await response.write(event)
                sent += len(event)
        except ConnectionError:
            return response
        finally:
            streaming = False

    app = web.Application()
    app.router.add_post("/v1/chat/completions", firehose)
    runner, url = await serve(app)
    try:
        proxy = await start_proxy(openai_upstream=f"{url}/v1")  # Anthropic's is the fake
        await normal_claude(proxy)  # price data loads once per process: not while memory is measured
        read = 0
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            async with (
                aiohttp.ClientSession() as session,
                session.post(f"{proxy.url}/v1/chat/completions", json={**CHAT, "stream": True}) as response,
            ):
                assert response.status == 200
                started = time.monotonic()
                settled = None  # memory once the buffers on the way have filled
                while time.monotonic() - started < 1.5:  # about 1 MiB/s
                    read += len(await response.content.read(2**14))
                    await asyncio.sleep(0.01)
                    if settled is None and time.monotonic() - started > 0.5:
                        settled = tracemalloc.get_traced_memory()[0]
                now = tracemalloc.get_traced_memory()[0]
        finally:
            tracemalloc.stop()
        # Unbounded, the upstream would have sent gigabytes by now; held back, it is ahead of the client by
        # what the socket buffers on the way hold, and memory stopped growing once they were full.
        assert read > 2**20
        assert sent - read < 16 * 2**20, f"read {read / 2**20:.1f} MiB, the upstream sent {sent / 2**20:.1f} MiB"
        assert settled is not None and now - settled < 2**20, f"{(now - settled) / 2**20:.1f} MiB more memory"
        assert now - before < 8 * 2**20, f"{(now - before) / 2**20:.1f} MiB more memory"
        await eventually(lambda: not streaming)  # the client left: rk closed the upstream
        await eventually(lambda: len(proxy.committed_calls()) == 2)
        _, row = await proxy.calls()
        assert (row.status, row.error) == (499, "client disconnected") and Flag.ESTIMATED in row.flags
        assert row.usage.output_tokens > 0 and row.cost > 0
        await still_serves(proxy, "anthropic")
    finally:
        await runner.cleanup()


async def test_an_anthropic_body_over_32_mib_is_a_413_and_never_forwarded(
    fake: FakeUpstream, start_proxy: StartProxy
) -> None:
    proxy = await start_proxy()
    huge = [{"role": "user", "content": "x" * (32 * 2**20)}]  # just over the limit, as JSON
    with pytest.raises(anthropic.APIStatusError) as refused:
        await proxy.claude.messages.create(model="claude-sonnet-4-6", max_tokens=10, messages=huge)  # type: ignore[arg-type]
    assert refused.value.status_code == 413
    assert refused.value.body["type"] == "error"  # type: ignore[index]
    assert rk_message(refused.value) == "rk: the request body is larger than the 32 MiB rk accepts"
    assert fake.requests == []
    await still_serves(proxy, "anthropic")
    assert len(await proxy.calls()) == 1  # the refused body left no row: it reached no one and cost nothing


@pytest.mark.parametrize(("depth", "status"), [(100_000, 400), (5_000, 400), (500, 200)])
async def test_deeply_nested_anthropic_bodies_are_refused_or_forwarded_never_a_crash(
    fake: FakeUpstream, start_proxy: StartProxy, depth: int, status: int
) -> None:
    proxy = await start_proxy()
    nested = b"[" * depth + b"]" * depth
    body = (
        b'{"model": "claude-sonnet-4-6", "max_tokens": 10, "messages": [{"role": "user", "content": ' + nested + b"}]}"
    )
    answered, _, answer = await post_raw(
        f"{proxy.url}/v1/messages", body, {"x-api-key": SECRET, "content-type": "application/json"}
    )
    assert answered == status, answer
    if status == 400:  # too deep for rk to read: refused in Anthropic's shape, never forwarded
        assert json.loads(answer)["error"]["message"] == "rk: the request body is nested too deeply"
        assert fake.requests == []
    else:  # deep, but readable: forwarded as sent
        assert fake.requests[0].body == body
    await still_serves(proxy, "anthropic")


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "caf\xe9"}]}'),
        (
            "/v1/messages",
            b'{"model": "claude-sonnet-4-6", "max_tokens": 9, "messages": [{"role": "user", "content": "\xc3"}]}',
        ),
    ],
    ids=["openai", "anthropic"],
)
async def test_invalid_utf8_in_a_body_is_a_400_and_never_forwarded(
    fake: FakeUpstream, start_proxy: StartProxy, path: str, body: bytes
) -> None:
    proxy = await start_proxy()
    status, content_type, answer = await post_raw(f"{proxy.url}{path}", body, {"content-type": "application/json"})
    assert (status, content_type) == (400, "application/json")
    error = json.loads(answer)["error"]
    assert error["message"].startswith("rk: the request body is not valid")
    assert fake.requests == []
    await still_serves(proxy, "openai" if path.startswith("/v1/chat") else "anthropic")


@pytest.mark.parametrize("side", ["requested", "served"])
async def test_a_model_name_with_a_lone_surrogate_neither_loses_its_row_nor_the_next_call(
    fake: FakeUpstream, start_proxy: StartProxy, side: str
) -> None:
    # Valid JSON whose model name has no UTF-8 form: sent by a client, or in the upstream's answer.
    model = "gpt-4o\\ud800" if side == "requested" else "gpt-4o"
    fake.script(Reply(model="gpt-4o\ud800" if side == "served" else "gpt-4o-2024-08-06"), Reply())
    proxy = await start_proxy()
    body = b'{"model": "%s", "messages": [{"role": "user", "content": "hi"}]}' % model.encode()
    status, _, answer = await post_raw(f"{proxy.url}/v1/chat/completions", body, {"content-type": "application/json"})
    assert status in (200, 400), answer  # answered, or refused as unreadable: not an rk error
    await normal_chat(proxy)  # the next call, before anything else writes to the ledger
    rows = await proxy.calls()
    if status == 400:
        assert json.loads(answer)["error"]["message"].startswith("rk: ") and len(fake.requests) == 1
        assert [r.status for r in rows] == [200]
    else:
        assert [r.status for r in rows] == [200, 200]  # the first call's row is in the ledger, not only in a log


async def test_a_form_encoded_body_is_a_400_and_never_forwarded(fake: FakeUpstream, start_proxy: StartProxy) -> None:
    proxy = await start_proxy()
    status, _, answer = await post_raw(
        f"{proxy.url}/v1/chat/completions",
        b"model=gpt-4o&messages=hello",
        {"content-type": "application/x-www-form-urlencoded"},
    )
    assert status == 400 and json.loads(answer)["error"]["message"] == "rk: the request body is not valid JSON"
    assert fake.requests == []
    await still_serves(proxy)
    assert len(await proxy.calls()) == 1


async def test_a_json_body_labelled_text_plain_is_forwarded_as_sent_and_metered(
    fake: FakeUpstream, start_proxy: StartProxy
) -> None:
    # rk reads the body as the API does, whatever its label, and leaves the label to the upstream to judge.
    proxy = await start_proxy()
    completion = await proxy.client.chat.completions.create(**CHAT, extra_headers={"Content-Type": "text/plain"})  # type: ignore[call-overload]
    assert completion.choices[0].message.content == Reply().text
    assert fake.requests[0].headers["Content-Type"] == "text/plain"
    row = await only_row(proxy)
    assert (row.status, row.flags, row.usage) == (200, (), Usage(input_tokens=100, output_tokens=20))
    await still_serves(proxy)


async def test_a_100_kb_header_is_refused_and_never_forwarded(fake: FakeUpstream, start_proxy: StartProxy) -> None:
    proxy = await start_proxy()
    with pytest.raises(openai.APIStatusError) as refused:
        await proxy.client.chat.completions.create(**CHAT, extra_headers={"X-Huge": "x" * 100_000})  # type: ignore[call-overload]
    assert 400 <= refused.value.status_code < 500
    assert fake.requests == [] and await proxy.calls() == []
    await still_serves(proxy)
