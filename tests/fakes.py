"""A fake OpenAI upstream: a real aiohttp server on a loopback port that records every request it gets
and answers the way api.openai.com does (compact JSON, `usage: null` on every chunk of a stream that asked
for usage, a usage-only chunk with `choices: []`, `data: [DONE]`).

Tests script it with `Reply` objects; `Reply.stream_bytes(include_usage)` is also what the upstream would
have sent a client that talked to it directly, which is what a client behind rk must see.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


def compact(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


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


@dataclass
class Reply:
    """One scripted answer to a chat completions request."""

    model: str = "gpt-4o-2024-08-06"
    text: str | None = "Hello! This is the fake upstream answering, in several pieces."
    tool_calls: list[dict[str, Any]] | None = None  # [{"id", "name", "arguments"}]
    usage: dict[str, Any] | None = field(default_factory=lambda: usage(100, 20))
    pieces: int = 6  # how many chunks the text (and each tool call's arguments) is streamed in
    delay: float = 0.0  # seconds between stream chunks
    gate: asyncio.Event | None = None  # hold the answer until this is set
    status: int = 200
    body: bytes | None = None  # answer exactly these bytes (as JSON) instead
    endless: bool = False  # keep streaming text chunks until the client goes away
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

    def stream_events(self, include_usage: bool) -> list[bytes]:
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
        return b"".join(self.stream_events(include_usage))


def split(text: str, pieces: int) -> list[str]:
    if not text:
        return []
    size = max(1, -(-len(text) // pieces))
    return [text[i : i + size] for i in range(0, len(text), size)]


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class FakeOpenAI:
    def __init__(self) -> None:
        self.requests: list[Seen] = []
        self.replies: list[Reply] = []  # answered in order; the last one repeats
        self.url = ""
        self._runner: web.AppRunner | None = None
        self.streams_open = 0

    def script(self, *replies: Reply) -> None:
        self.replies = list(replies)

    async def start(self) -> FakeOpenAI:
        app = web.Application(client_max_size=256 * 2**20)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{host}:{port}/v1"
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def _next(self) -> Reply:
        if not self.replies:
            return Reply()
        return self.replies.pop(0) if len(self.replies) > 1 else self.replies[0]

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.requests.append(Seen(request.method, request.path_qs, dict(request.headers), body))
        reply = self._next()
        if reply.gate is not None:
            await reply.gate.wait()
        if reply.body is not None or reply.status != 200:
            return web.Response(status=reply.status, body=reply.body or b"", content_type="application/json")
        obj = json.loads(body)
        if not obj.get("stream"):
            return web.Response(body=reply.whole(), content_type="application/json")
        include_usage = bool((obj.get("stream_options") or {}).get("include_usage"))
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
        await response.prepare(request)
        self.streams_open += 1
        try:
            events = reply.stream_events(include_usage)
            if reply.endless:
                events = events[:1]
            for event in events:
                await response.write(event)
                if reply.delay:
                    await asyncio.sleep(reply.delay)
            while reply.endless:
                await response.write(reply._chunk({"content": " more"}, include_usage))
                await asyncio.sleep(reply.delay or 0.01)
            await response.write_eof()
        except ConnectionError:
            pass
        finally:
            self.streams_open -= 1
        return response
