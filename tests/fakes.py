"""A fake of the OpenAI and Anthropic APIs: a real aiohttp server on a loopback port that records every
request it gets and answers the way the real services do (compact JSON; for chat and completions streams,
`usage: null` on every chunk of a stream that asked for usage, a usage-only chunk with `choices: []`,
`data: [DONE]`; for Responses and Messages streams, their named events).

Tests script it with replies (`Reply` for chat, `CompletionReply`, `ResponsesReply`, `EmbeddingReply`,
`MessagesReply`), answered in order, the last one repeating. A reply's `stream_bytes(...)` is also what the
upstream would have sent a client that talked to it directly, which is what a client behind rk must see.
OpenAI's routes are under `url` (`…/v1`), Anthropic's under `root`.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from multidict import CIMultiDict


def compact(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def sse(event: str | None, data: Any) -> bytes:
    return (f"event: {event}\n".encode() if event else b"") + b"data: " + compact(data) + b"\n\n"


def usage(prompt: int, completion: int, cached: int = 0, reasoning: int = 0) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": reasoning,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def split(text: str, pieces: int) -> list[str]:
    if not text:
        return []
    size = max(1, -(-len(text) // pieces))
    return [text[i : i + size] for i in range(0, len(text), size)]


@dataclass
class Scripted:
    """How any reply is delivered."""

    pieces: int = 6  # how many chunks text and tool arguments are streamed in
    delay: float = 0.0  # seconds between stream events
    gate: asyncio.Event | None = None  # hold the answer until this is set
    status: int = 200
    body: bytes | None = None  # answer exactly these bytes instead, as `content_type`
    content_type: str = "application/json"
    endless: bool = False  # after the first events, keep streaming text until the client goes away
    break_after: int | None = None  # close the connection after this many stream events
    error_after: int | None = None  # after this many stream events, send the provider's error event and end
    linger: float = 0.0  # after the last event, wait this long before closing the stream
    usage_for: Callable[[dict[str, Any]], dict[str, Any]] | None = None  # usage as this makes it of the request

    def whole(self) -> bytes:
        raise NotImplementedError

    def error_event(self) -> bytes:
        """The provider's mid-stream error: the upstream is overloaded."""
        raise NotImplementedError

    def stream_events(self, request: dict[str, Any]) -> list[bytes]:
        raise NotImplementedError

    def more(self, request: dict[str, Any]) -> bytes:
        """One more text event, for an endless stream."""
        raise NotImplementedError


@dataclass
class Reply(Scripted):
    """A chat completion."""

    model: str = "gpt-4o-2024-08-06"
    text: str | None = "Hello! This is the fake upstream answering, in several pieces."
    tool_calls: list[dict[str, Any]] | None = None  # [{"id", "name", "arguments"}]
    usage: dict[str, Any] | None = field(default_factory=lambda: usage(100, 20))
    service_tier: str = "default"

    def whole(self) -> bytes:
        message: dict[str, Any] = {"role": "assistant", "content": self.text, "refusal": None, "annotations": []}
        if self.tool_calls:
            message["tool_calls"] = [
                {"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
                for c in self.tool_calls
            ]
        finish = "tool_calls" if self.tool_calls else "stop"
        return compact(
            {
                "id": "chatcmpl-fake123",
                "object": "chat.completion",
                "created": 1764150000,
                "model": self.model,
                "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
                "usage": self.usage,
                "service_tier": self.service_tier,
                "system_fingerprint": "fp_fake",
            }
        )

    def error_event(self) -> bytes:
        return sse(None, {"error": {"message": "Overloaded", "type": "server_error", "param": None, "code": None}})

    def _chunk(self, delta: dict[str, Any] | None, include_usage: bool, finish: str | None = None) -> bytes:
        chunk: dict[str, Any] = {
            "id": "chatcmpl-fake123",
            "object": "chat.completion.chunk",
            "created": 1764150000,
            "model": self.model,
            "service_tier": self.service_tier,
            "system_fingerprint": "fp_fake",
            "choices": []
            if delta is None
            else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
        if include_usage:
            chunk["usage"] = self.usage if delta is None else None
        return b"data: " + compact(chunk) + b"\n\n"

    def stream_events(self, request: dict[str, Any]) -> list[bytes]:
        include_usage = bool((request.get("stream_options") or {}).get("include_usage"))
        events = [self._chunk({"role": "assistant", "content": "", "refusal": None}, include_usage)]
        for piece in split(self.text or "", self.pieces):
            events.append(self._chunk({"content": piece}, include_usage))
        for index, call in enumerate(self.tool_calls or []):
            head = {
                "index": index,
                "id": call["id"],
                "type": "function",
                "function": {"name": call["name"], "arguments": ""},
            }
            events.append(self._chunk({"tool_calls": [head]}, include_usage))
            for piece in split(call["arguments"], self.pieces):
                events.append(
                    self._chunk({"tool_calls": [{"index": index, "function": {"arguments": piece}}]}, include_usage)
                )
        events.append(self._chunk({}, include_usage, "tool_calls" if self.tool_calls else "stop"))
        if include_usage:
            events.append(self._chunk(None, include_usage))
        events.append(b"data: [DONE]\n\n")
        return events

    def stream_bytes(self, include_usage: bool) -> bytes:
        request = {"stream_options": {"include_usage": True}} if include_usage else {}
        return b"".join(self.stream_events(request))

    def more(self, request: dict[str, Any]) -> bytes:
        return self._chunk({"content": " more"}, bool((request.get("stream_options") or {}).get("include_usage")))


@dataclass
class CompletionReply(Scripted):
    """A legacy completion."""

    model: str = "gpt-3.5-turbo-instruct"
    text: str = " Once upon a time, a fake upstream completed a prompt."
    usage: dict[str, Any] | None = field(
        default_factory=lambda: {"prompt_tokens": 10, "completion_tokens": 12, "total_tokens": 22}
    )

    def _base(self) -> dict[str, Any]:
        return {"id": "cmpl-fake1", "object": "text_completion", "created": 1764150000, "model": self.model}

    def whole(self) -> bytes:
        choice = {"text": self.text, "index": 0, "logprobs": None, "finish_reason": "stop"}
        return compact({**self._base(), "choices": [choice], "usage": self.usage})

    def _chunk(self, text: str, finish: str | None, include_usage: bool) -> bytes:
        extra = {"usage": None} if include_usage else {}
        choice = {"text": text, "index": 0, "logprobs": None, "finish_reason": finish}
        return b"data: " + compact({**self._base(), "choices": [choice], **extra}) + b"\n\n"

    def stream_events(self, request: dict[str, Any]) -> list[bytes]:
        include_usage = bool((request.get("stream_options") or {}).get("include_usage"))
        events = [self._chunk(piece, None, include_usage) for piece in split(self.text, self.pieces)]
        events.append(self._chunk("", "stop", include_usage))
        if include_usage:
            events.append(b"data: " + compact({**self._base(), "choices": [], "usage": self.usage}) + b"\n\n")
        return [*events, b"data: [DONE]\n\n"]

    def more(self, request: dict[str, Any]) -> bytes:
        return self._chunk(" more", None, bool((request.get("stream_options") or {}).get("include_usage")))


@dataclass
class ResponsesReply(Scripted):
    """A Responses API response: optional reasoning, text and function calls, and its usage."""

    model: str = "o3-2025-04-16"
    text: str | None = "The answer, from the fake Responses upstream."
    reasoning: str | None = None  # a reasoning summary
    calls: list[dict[str, Any]] = field(default_factory=list)  # [{"call_id", "name", "arguments"}]
    web_searches: int = 0
    usage: dict[str, Any] | None = field(
        default_factory=lambda: {
            "input_tokens": 120,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": 30,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": 150,
        }
    )
    end: str = "response.completed"

    def _output(self) -> list[dict[str, Any]]:
        output: list[dict[str, Any]] = []
        if self.reasoning is not None:
            output.append(
                {"id": "rs_1", "type": "reasoning", "summary": [{"type": "summary_text", "text": self.reasoning}]}
            )
        for n in range(self.web_searches):
            output.append(
                {
                    "id": f"ws_{n}",
                    "type": "web_search_call",
                    "status": "completed",
                    "action": {"type": "search", "query": "q"},
                }
            )
        if self.text is not None:
            output.append(
                {
                    "id": "msg_1",
                    "type": "message",
                    "status": "completed",
                    "role": "assistant",
                    "content": [{"type": "output_text", "text": self.text, "annotations": []}],
                }
            )
        for n, call in enumerate(self.calls):
            output.append({"id": f"fc_{n}", "type": "function_call", "status": "completed", **call})
        return output

    def response(self, status: str = "completed", final: bool = True) -> dict[str, Any]:
        return {
            "id": "resp_fake1",
            "object": "response",
            "created_at": 1764150000,
            "model": self.model,
            "status": status,
            "error": None,
            "incomplete_details": None,
            "instructions": None,
            "output": self._output() if final else [],
            "parallel_tool_calls": True,
            "tool_choice": "auto",
            "tools": [],
            "usage": self.usage if final else None,
            "service_tier": "default",
            "store": True,
            "text": {"format": {"type": "text"}},
        }

    def whole(self) -> bytes:
        return compact(self.response())

    def stream_events(self, request: dict[str, Any]) -> list[bytes]:
        seq = iter(range(10_000))

        def event(kind: str, **fields: Any) -> bytes:
            return sse(kind, {"type": kind, "sequence_number": next(seq), **fields})

        events = [
            event("response.created", response=self.response("in_progress", final=False)),
            event("response.in_progress", response=self.response("in_progress", final=False)),
        ]
        for index, item in enumerate(self._output()):
            at = {"output_index": index, "item_id": item["id"]}
            if item["type"] == "message":
                events.append(
                    event(
                        "response.output_item.added",
                        output_index=index,
                        item={**item, "status": "in_progress", "content": []},
                    )
                )
                events.append(
                    event(
                        "response.content_part.added",
                        **at,
                        content_index=0,
                        part={"type": "output_text", "text": "", "annotations": []},
                    )
                )
                for piece in split(self.text or "", self.pieces):
                    events.append(event("response.output_text.delta", **at, content_index=0, delta=piece))
                events.append(event("response.output_text.done", **at, content_index=0, text=self.text))
                events.append(event("response.content_part.done", **at, content_index=0, part=item["content"][0]))
            elif item["type"] == "function_call":
                events.append(
                    event(
                        "response.output_item.added",
                        output_index=index,
                        item={**item, "status": "in_progress", "arguments": ""},
                    )
                )
                for piece in split(item["arguments"], self.pieces):
                    events.append(event("response.function_call_arguments.delta", **at, delta=piece))
                events.append(event("response.function_call_arguments.done", **at, arguments=item["arguments"]))
            elif item["type"] == "reasoning":
                events.append(event("response.output_item.added", output_index=index, item={**item, "summary": []}))
                for piece in split(self.reasoning or "", self.pieces):
                    events.append(event("response.reasoning_summary_text.delta", **at, summary_index=0, delta=piece))
            else:
                events.append(event("response.output_item.added", output_index=index, item=item))
            events.append(event("response.output_item.done", output_index=index, item=item))
        status = {"response.completed": "completed", "response.incomplete": "incomplete"}.get(self.end, "failed")
        events.append(event(self.end, response=self.response(status)))
        return events

    def stream_bytes(self) -> bytes:
        return b"".join(self.stream_events({}))

    def more(self, request: dict[str, Any]) -> bytes:
        return sse(
            "response.output_text.delta",
            {
                "type": "response.output_text.delta",
                "item_id": "msg_1",
                "output_index": 0,
                "content_index": 0,
                "delta": " more",
            },
        )


@dataclass
class EmbeddingReply(Scripted):
    model: str = "text-embedding-3-small"
    dimensions: int = 8
    prompt_tokens: int = 8

    def whole(self) -> bytes:  # base64, as the openai SDK asks for by default
        vector = base64.b64encode(struct.pack(f"<{self.dimensions}f", *[0.5] * self.dimensions)).decode()
        return compact(
            {
                "object": "list",
                "model": self.model,
                "data": [{"object": "embedding", "index": 0, "embedding": vector}],
                "usage": {"prompt_tokens": self.prompt_tokens, "total_tokens": self.prompt_tokens},
            }
        )


@dataclass
class MessagesReply(Scripted):
    """An Anthropic message: content blocks, and usage reported at the start and in each message_delta."""

    model: str = "claude-sonnet-4-6"
    blocks: list[dict[str, Any]] = field(default_factory=lambda: [{"type": "text", "text": "Hello from fake Claude."}])
    start_usage: dict[str, Any] = field(
        default_factory=lambda: {
            "input_tokens": 100,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
            "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 0},
            "output_tokens": 1,
            "service_tier": "standard",
        }
    )
    deltas: list[dict[str, Any]] = field(default_factory=lambda: [{"output_tokens": 25}])  # cumulative, in order
    stop_reason: str = "end_turn"

    def final_usage(self) -> dict[str, Any]:
        merged = dict(self.start_usage)
        for delta in self.deltas:
            merged.update(delta)
        return merged

    def _message(self, usage: dict[str, Any], content: list[dict[str, Any]], stop: str | None) -> dict[str, Any]:
        return {
            "id": "msg_fake1",
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": content,
            "stop_reason": stop,
            "stop_sequence": None,
            "usage": usage,
        }

    def whole(self) -> bytes:
        return compact(self._message(self.final_usage(), self.blocks, self.stop_reason))

    def stream_events(self, request: dict[str, Any]) -> list[bytes]:
        events = [sse("message_start", {"type": "message_start", "message": self._message(self.start_usage, [], None)})]
        for index, block in enumerate(self.blocks):
            kind = block["type"]
            empty = {
                "text": {"type": "text", "text": ""},
                "thinking": {"type": "thinking", "thinking": ""},
                "tool_use": {**block, "input": {}},
            }[kind]
            events.append(
                sse("content_block_start", {"type": "content_block_start", "index": index, "content_block": empty})
            )
            if index == 0:
                events.append(sse("ping", {"type": "ping"}))
            if kind == "text":
                deltas = [{"type": "text_delta", "text": p} for p in split(block["text"], self.pieces)]
            elif kind == "thinking":
                deltas = [{"type": "thinking_delta", "thinking": p} for p in split(block["thinking"], self.pieces)]
                deltas.append({"type": "signature_delta", "signature": block["signature"]})
            else:
                arguments = json.dumps(block["input"])
                deltas = [{"type": "input_json_delta", "partial_json": p} for p in split(arguments, self.pieces)]
            for delta in deltas:
                events.append(
                    sse("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta})
                )
            events.append(sse("content_block_stop", {"type": "content_block_stop", "index": index}))
        for n, usage_delta in enumerate(self.deltas):
            stop = self.stop_reason if n == len(self.deltas) - 1 else None
            events.append(
                sse(
                    "message_delta",
                    {
                        "type": "message_delta",
                        "delta": {"stop_reason": stop, "stop_sequence": None},
                        "usage": usage_delta,
                    },
                )
            )
        events.append(sse("message_stop", {"type": "message_stop"}))
        return events

    def stream_bytes(self) -> bytes:
        return b"".join(self.stream_events({}))

    def error_event(self) -> bytes:
        return sse("error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})

    def more(self, request: dict[str, Any]) -> bytes:
        return sse(
            "content_block_delta",
            {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": " more"}},
        )


_DEFAULTS: dict[str, type[Scripted]] = {
    "/v1/chat/completions": Reply,
    "/v1/completions": CompletionReply,
    "/v1/responses": ResponsesReply,
    "/v1/embeddings": EmbeddingReply,
    "/v1/messages": MessagesReply,
}


@dataclass
class Seen:
    method: str
    path: str
    headers: CIMultiDict[str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class FakeUpstream:
    def __init__(self) -> None:
        self.requests: list[Seen] = []
        self.replies: list[Scripted] = []  # answered in order; the last one repeats
        self.root = ""  # Anthropic's base URL
        self.url = ""  # OpenAI's base URL, root + /v1
        self._runner: web.AppRunner | None = None
        self.streams_open = 0

    def script(self, *replies: Scripted) -> None:
        self.replies = list(replies)

    async def start(self) -> FakeUpstream:
        app = web.Application(client_max_size=256 * 2**20)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.root = f"http://{host}:{port}"
        self.url = f"{self.root}/v1"
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def _next(self, path: str) -> Scripted:
        if not self.replies:
            return _DEFAULTS[path]()
        return self.replies.pop(0) if len(self.replies) > 1 else self.replies[0]

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.requests.append(Seen(request.method, request.path_qs, CIMultiDict(request.headers), body))
        # Resuming a background response's stream: a route rk does not meter, answered as a stream.
        resumed = request.path.startswith("/v1/responses/") and request.query.get("stream") == "true"
        if request.path not in _DEFAULTS and not resumed:  # a route rk does not meter: say what was asked
            answer = {
                "method": request.method,
                "path": request.path_qs,
                "bytes": len(body),
                "object": "list",
                "data": [
                    {
                        "id": "gpt-4o",
                        "object": "model",
                        "created": 1,
                        "owned_by": "openai",
                        "type": "model",
                        "display_name": "m",
                        "created_at": "2025-01-01T00:00:00Z",
                    }
                ],
                "input_tokens": 42,
                "has_more": False,
            }
            return web.Response(body=compact(answer), content_type="application/json")
        reply = self._next("/v1/responses" if resumed else request.path)
        if reply.gate is not None:
            await reply.gate.wait()
        if reply.body is not None or reply.status != 200:
            return web.Response(status=reply.status, body=reply.body or b"", content_type=reply.content_type)
        obj = json.loads(body) if body else {}
        if reply.usage_for is not None:
            reply = dataclasses.replace(reply, usage=reply.usage_for(obj))  # type: ignore[call-arg]
        if not (obj.get("stream") or resumed):
            return web.Response(body=reply.whole(), content_type="application/json")
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
        await response.prepare(request)
        self.streams_open += 1
        try:
            events = reply.stream_events(obj)
            if reply.endless:
                events = events[:3]
            for n, event in enumerate(events):
                if reply.break_after is not None and n == reply.break_after:
                    assert request.transport is not None
                    request.transport.close()
                    return response
                if reply.error_after is not None and n == reply.error_after:
                    await response.write(reply.error_event())
                    break
                await response.write(event)
                if reply.delay:
                    await asyncio.sleep(reply.delay)
            while reply.endless:
                await response.write(reply.more(obj))
                await asyncio.sleep(reply.delay or 0.01)
            await asyncio.sleep(reply.linger)
            await response.write_eof()
        except ConnectionError:
            pass
        finally:
            self.streams_open -= 1
        return response
