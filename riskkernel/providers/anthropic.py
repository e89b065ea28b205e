"""Everything Anthropic-specific: the Messages route, its usage fields, error shapes and mock replies.

Usage: Anthropic's `input_tokens` excludes cache reads and cache writes, which it reports beside it
(`cache_read_input_tokens`, `cache_creation_input_tokens`, the latter split by TTL in `cache_creation`);
rk adds them up into OpenAI's sense. A stream reports usage in `message_start` and again, cumulatively,
in each `message_delta`: later values overwrite earlier ones, never add to them. Thinking tokens are
inside `output_tokens`. Server tools (web search) are counted in `server_tool_use` and priced per request.

Errors are `{"type": "error", "error": {"type", "message"}}`, in a stream as an `event: error`, which the
`anthropic` SDK raises as an API error; a dropped stream would make it raise a raw transport error instead.
Budget refusals use Anthropic's own 402 type, `billing_error`, with rk's reason beside it as `code`.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from riskkernel.models import Usage
from riskkernel.providers import (
    Endpoint,
    ErrorKind,
    Metered,
    Position,
    Provider,
    Request,
    load_dict,
    load_object,
    measure_input,
    positive_int,
    sse,
    text_len,
)
from riskkernel.providers.openai import mock_words
from riskkernel.providers.sse import Event

_TYPES = {
    ErrorKind.INVALID: "invalid_request_error",
    ErrorKind.TOO_LARGE: "request_too_large",
    ErrorKind.NOT_FOUND: "not_found_error",
    ErrorKind.AUTH: "authentication_error",
    ErrorKind.BUDGET: "billing_error",
    ErrorKind.REFUSED: "invalid_request_error",
    ErrorKind.UPSTREAM: "api_error",
    ErrorKind.UNAVAILABLE: "api_error",
    ErrorKind.INTERNAL: "api_error",
}


def _error(message: str, kind: ErrorKind, code: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": _TYPES[kind], "message": message, "code": code}}


def error_body(message: str, kind: ErrorKind, code: str) -> bytes:
    return json.dumps(_error(message, kind, code), ensure_ascii=False).encode()


def error_event(message: str, kind: ErrorKind, code: str) -> bytes:
    return sse("error", _error(message, kind, code))


PROVIDER = Provider(
    name="anthropic",
    default_upstream="https://api.anthropic.com",
    base_env=("ANTHROPIC_BASE_URL",),
    prefix="",
    key_env="ANTHROPIC_API_KEY",
    error_body=error_body,
)


def parse_messages(body: bytes) -> Request:
    obj = load_object(body)
    tier = obj.get("service_tier")
    parts = ("system", "messages", "tools")
    estimate, bound = measure_input(obj, parts)
    return Request(
        model=obj["model"],
        stream=bool(obj.get("stream")),
        body=body,
        input_tokens=estimate,
        max_output_tokens=positive_int(obj.get("max_tokens")) or None,
        service_tier=tier if isinstance(tier, str) else None,
        input_bound=bound,
        output_field="max_tokens",
        cache_writes=b'"cache_control"' in body,
        parts=parts,
        parsed=obj,
    )


def messages_usage(usage: dict[str, Any]) -> Usage:
    read = positive_int(usage.get("cache_read_input_tokens"))
    by_ttl = usage.get("cache_creation")
    by_ttl = by_ttl if isinstance(by_ttl, dict) else {}
    write_1h = positive_int(by_ttl.get("ephemeral_1h_input_tokens"))
    write = positive_int(usage.get("cache_creation_input_tokens")) or (
        positive_int(by_ttl.get("ephemeral_5m_input_tokens")) + write_1h
    )
    tools = usage.get("server_tool_use")
    return Usage(
        input_tokens=positive_int(usage.get("input_tokens")) + read + write,
        cached_input_tokens=read,
        cache_write_tokens=write,
        cache_write_1h_tokens=write_1h,
        output_tokens=positive_int(usage.get("output_tokens")),
        web_searches=positive_int(tools.get("web_search_requests")) if isinstance(tools, dict) else 0,
    )


def _block_chars(block: Any) -> int:
    """Generated text in a content block or a block delta: text, thinking, tool input."""
    if not isinstance(block, dict):
        return 0
    chars = sum(text_len(block.get(k)) for k in ("text", "thinking", "partial_json"))
    if block.get("type") in ("tool_use", "server_tool_use") and block.get("input"):
        chars += len(json.dumps(block["input"]))
    return chars


def _error_message(obj: dict[str, Any]) -> str | None:
    error = obj.get("error")
    if obj.get("type") == "error" and isinstance(error, dict):
        return str(error.get("message") or error.get("type") or "error")
    return None


def meter_messages(body: bytes) -> Metered:
    obj = load_dict(body)
    usage = obj.get("usage")
    model = obj.get("model")
    metered = Metered(
        usage=messages_usage(usage) if isinstance(usage, dict) else None,
        model=model if isinstance(model, str) else None,
        error=_error_message(obj),
    )
    stop = obj.get("stop_reason")
    if isinstance(stop, str):
        metered.finish_reasons.append(stop)
    content = obj.get("content")
    if metered.usage is None and isinstance(content, list):
        metered.output_chars = sum(_block_chars(block) for block in content)
    return metered


class MessagesStream:
    """Meters one Messages stream: usage from `message_start`, overwritten by each `message_delta`. The
    stream ends (for rk's purposes) at the `message_delta` that gives the stop reason, or an error."""

    def __init__(self, request: Request) -> None:
        self.metered = Metered()
        self.usage: dict[str, Any] | None = None  # the raw usage fields reported so far, latest value of each

    def feed(self, event: Event) -> tuple[bytes, Position]:
        if event.data is None:
            return event.raw, Position.MORE
        obj = load_dict(event.data)
        kind = obj.get("type") or event.event
        if kind == "content_block_delta":
            self.metered.output_chars += _block_chars(obj.get("delta"))
        elif kind == "content_block_start":
            self.metered.output_chars += _block_chars(obj.get("content_block"))
        elif kind == "message_start":
            message = obj.get("message")
            if isinstance(message, dict):
                model = message.get("model")
                self.metered.model = model if isinstance(model, str) else None
                self._merge(message.get("usage"))
        elif kind == "message_delta":
            self._merge(obj.get("usage"))
            delta = obj.get("delta")
            stop = delta.get("stop_reason") if isinstance(delta, dict) else None
            if stop:  # the last usage report: generation is over
                if isinstance(stop, str):
                    self.metered.finish_reasons = [stop]
                return event.raw, Position.OVER
        elif kind == "error":
            self.metered.error = _error_message(obj) or "error event"
            return event.raw, Position.LAST
        return event.raw, Position.LAST if kind == "message_stop" else Position.MORE

    def _merge(self, usage: Any) -> None:
        if isinstance(usage, dict):
            self.usage = {**(self.usage or {}), **{k: v for k, v in usage.items() if v is not None}}
            self.metered.usage = messages_usage(self.usage)

    def feed_plain(self, block: bytes) -> tuple[bytes, int]:
        return b"", 0  # its events are named (`event:` lines): never plain

    def result(self) -> Metered:
        return self.metered


def mock_messages(request: Request, obj: dict[str, Any]) -> tuple[bytes, list[bytes]]:
    words, cut = mock_words(obj.get("messages"), request.max_output_tokens)
    stop = "max_tokens" if cut else "end_turn"
    text = " ".join(words)
    usage = {
        "input_tokens": request.input_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 0},
        "output_tokens": len(words),
        "service_tier": "standard",
    }
    message = {
        "id": "msg_mock" + hashlib.sha256(request.body).hexdigest()[:20],
        "type": "message",
        "role": "assistant",
        "model": request.model,
        "content": [{"type": "text", "text": text}],
        "stop_reason": stop,
        "stop_sequence": None,
        "usage": usage,
    }
    start = {**message, "content": [], "stop_reason": None, "usage": {**usage, "output_tokens": 1}}
    events = [
        sse("message_start", {"type": "message_start", "message": start}),
        sse(
            "content_block_start",
            {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        ),
        sse("ping", {"type": "ping"}),
        *(
            sse(
                "content_block_delta",
                {
                    "type": "content_block_delta",
                    "index": 0,
                    "delta": {"type": "text_delta", "text": w if i == 0 else " " + w},
                },
            )
            for i, w in enumerate(words)
        ),
        sse("content_block_stop", {"type": "content_block_stop", "index": 0}),
        sse(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": stop, "stop_sequence": None},
                "usage": {"output_tokens": len(words)},
            },
        ),
        sse("message_stop", {"type": "message_stop"}),
    ]
    return json.dumps(message).encode(), events


MESSAGES = Endpoint(
    "/v1/messages", PROVIDER, parse_messages, meter_messages, MessagesStream, error_event, mock_messages
)
ENDPOINTS = (MESSAGES,)
COUNT_TOKENS = "/v1/messages/count_tokens"  # forwarded, free
