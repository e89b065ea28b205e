"""Everything OpenAI-specific: routes, usage fields, the include_usage rule, error shapes, mock replies.

Chat streams carry usage only when `stream_options.include_usage` is set, so rk forces it upstream and,
for a client that did not ask, hides the difference again: the usage-only chunk (`choices: []`, which
crashes the common `chunk.choices[0]` client code) is dropped and the `"usage":null` that every other
chunk then carries is cut out of its bytes. The client sees what it would have seen without rk.

Usage: `prompt_tokens` includes cached (and, where a compatible server reports them, cache-write) tokens;
reasoning tokens are inside `completion_tokens`.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from typing import Any

from riskkernel.models import Usage
from riskkernel.providers import Endpoint, Metered, Request, estimate_input_tokens
from riskkernel.providers.sse import Event

PROVIDER = "openai"
DEFAULT_UPSTREAM = "https://api.openai.com/v1"

_NULL_USAGE = re.compile(rb',\s*"usage"\s*:\s*null(?=\s*\})|"usage"\s*:\s*null\s*,\s*')
_FORCED_USAGE = b',"stream_options":{"include_usage":true}'


# -- errors -----------------------------------------------------------------------------------------------


def _error(message: str, type_: str, code: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": None, "code": code}}


def error_body(message: str, type_: str, code: str) -> bytes:
    return json.dumps(_error(message, type_, code), ensure_ascii=False).encode()


def chat_stream_error(message: str, type_: str, code: str) -> bytes:
    """A chat stream's terminal error: the openai SDK raises `APIError` on a data event with `error`."""
    return b"data: " + error_body(message, type_, code) + b"\n\n"


# -- requests ---------------------------------------------------------------------------------------------


def load_object(body: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(body)
    except ValueError:
        raise ValueError("rk: the request body is not valid JSON") from None
    if not isinstance(obj, dict):
        raise ValueError("rk: the request body must be a JSON object")
    model = obj.get("model")
    if not isinstance(model, str) or not model.strip():
        raise ValueError("rk: the request names no model")
    if not isinstance(obj.get("stream", False), bool | None):
        raise ValueError("rk: `stream` must be true or false")
    return obj


def _positive_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def parse_chat(body: bytes) -> Request:
    obj = load_object(body)
    stream = bool(obj.get("stream"))
    hide_usage = stream and not _wants_usage(obj)
    if hide_usage:
        body = _force_include_usage(body, obj)
    tier = obj.get("service_tier")
    return Request(
        model=obj["model"],
        stream=stream,
        body=body,
        input_tokens=estimate_input_tokens(obj.get("messages")) + estimate_input_tokens(obj.get("tools")),
        max_output_tokens=_positive_int(obj.get("max_completion_tokens")) or _positive_int(obj.get("max_tokens")),
        service_tier=tier if isinstance(tier, str) else None,
        hide_usage=hide_usage,
    )


def _wants_usage(obj: dict[str, Any]) -> bool:
    options = obj.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def _force_include_usage(body: bytes, obj: dict[str, Any]) -> bytes:
    if "stream_options" not in obj:
        end = body.rindex(b"}")  # the body parsed as an object, so it ends with its closing brace
        return body[:end] + _FORCED_USAGE + body[end:]
    options = obj["stream_options"] if isinstance(obj["stream_options"], dict) else {}
    return json.dumps({**obj, "stream_options": {**options, "include_usage": True}}, ensure_ascii=False).encode()


# -- responses --------------------------------------------------------------------------------------------


def _count(value: Any) -> int:
    return len(value) if isinstance(value, str) else 0


def _details(usage: dict[str, Any], key: str) -> dict[str, Any]:
    value = usage.get(key)
    return value if isinstance(value, dict) else {}


def chat_usage(usage: dict[str, Any]) -> Usage:
    prompt = _details(usage, "prompt_tokens_details")
    completion = _details(usage, "completion_tokens_details")
    return Usage(
        input_tokens=_positive_int(usage.get("prompt_tokens")) or 0,
        cached_input_tokens=_positive_int(prompt.get("cached_tokens")) or 0,
        cache_write_tokens=_positive_int(prompt.get("cache_write_tokens")) or 0,
        input_audio_tokens=_positive_int(prompt.get("audio_tokens")) or 0,
        output_tokens=_positive_int(usage.get("completion_tokens")) or 0,
        reasoning_tokens=_positive_int(completion.get("reasoning_tokens")) or 0,
        output_audio_tokens=_positive_int(completion.get("audio_tokens")) or 0,
    )


def _message_chars(message: Any) -> int:
    """Generated text in a chat message or stream delta: content, refusal, reasoning, tool calls."""
    if not isinstance(message, dict):
        return 0
    chars = sum(_count(message.get(k)) for k in ("content", "refusal", "reasoning_content", "reasoning"))
    calls = message.get("tool_calls")
    functions = [c.get("function") for c in calls if isinstance(c, dict)] if isinstance(calls, list) else []
    functions.append(message.get("function_call"))
    for fn in functions:
        if isinstance(fn, dict):
            chars += _count(fn.get("name")) + _count(fn.get("arguments"))
    return chars


def meter_chat(body: bytes) -> Metered:
    try:
        obj = json.loads(body)
    except ValueError:
        return Metered()
    if not isinstance(obj, dict):
        return Metered()
    usage = obj.get("usage")
    model, tier = obj.get("model"), obj.get("service_tier")
    metered = Metered(
        usage=chat_usage(usage) if isinstance(usage, dict) else None,
        model=model if isinstance(model, str) else None,
        service_tier=tier if isinstance(tier, str) else None,
        error=_error_message(obj.get("error")),
    )
    choices = obj.get("choices")
    if metered.usage is None and isinstance(choices, list):  # only needed to estimate the usage
        metered.output_chars = sum(_message_chars(c.get("message")) for c in choices if isinstance(c, dict))
    return metered


def _error_message(error: Any) -> str | None:
    if isinstance(error, dict):
        return str(error.get("message") or error.get("type") or "error")
    return None


class ChatStream:
    """Meters one chat completions stream and decides, event by event, what the client sees."""

    def __init__(self, request: Request) -> None:
        self.hide_usage = request.hide_usage
        self.metered = Metered()

    def feed(self, event: Event) -> tuple[bytes, bool]:
        data = event.data
        if data is None:
            return event.raw, False
        if data == "[DONE]":
            return event.raw, True
        try:
            obj = json.loads(data)
        except ValueError:
            return event.raw, False
        if not isinstance(obj, dict):
            return event.raw, False
        m = self.metered
        if m.model is None and isinstance(obj.get("model"), str):
            m.model = obj["model"]
        if isinstance(obj.get("service_tier"), str):
            m.service_tier = obj["service_tier"]
        raw = event.raw
        choices = obj.get("choices")
        if "usage" in obj:
            usage = obj["usage"]
            if isinstance(usage, dict):
                m.usage = chat_usage(usage)
                if self.hide_usage and not choices:
                    return b"", False
            elif usage is None and self.hide_usage:
                stripped, n = _NULL_USAGE.subn(b"", raw)
                if n == 1:
                    raw = stripped
        if isinstance(choices, list):
            m.output_chars += sum(_message_chars(c.get("delta")) for c in choices if isinstance(c, dict))
        if "error" in obj:
            m.error = _error_message(obj["error"])
        return raw, False

    def result(self) -> Metered:
        return self.metered


# -- the mock upstream ------------------------------------------------------------------------------------

MOCK_WORDS = (
    "This reply comes from the rk mock upstream . No key and no network were used , yet the call was "
    "metered and priced at the real price of the model you asked for , and it counts against your budget "
    "exactly as a real call would . Point the agent at a real provider by dropping --mock ."
).split()


def mock_words(obj: dict[str, Any], limit: int | None) -> tuple[list[str], str]:
    """Deterministic reply words for a request (one word = one token), and the finish reason."""
    digest = hashlib.sha256(json.dumps(obj.get("messages") or obj.get("input"), sort_keys=True).encode()).digest()
    count = 24 + digest[0] % 40
    words = [MOCK_WORDS[(digest[1] + i) % len(MOCK_WORDS)] for i in range(count)]
    if limit is not None and count > limit:
        return words[:limit], "length"
    return words, "stop"


def mock_chat(request: Request, obj: dict[str, Any]) -> tuple[bytes, list[bytes]]:
    words, finish = mock_words(obj, request.max_output_tokens)
    text = " ".join(words)
    ident = "chatcmpl-mock" + hashlib.sha256(request.body).hexdigest()[:20]
    base = {"id": ident, "created": int(time.time()), "model": request.model, "system_fingerprint": "fp_rk_mock"}
    usage = {
        "prompt_tokens": request.input_tokens,
        "completion_tokens": len(words),
        "total_tokens": request.input_tokens + len(words),
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
    }
    message = {"role": "assistant", "content": text, "refusal": None}
    body = {
        **base,
        "object": "chat.completion",
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
        "usage": usage,
    }
    chunk = {**base, "object": "chat.completion.chunk"}
    include_usage = _wants_usage(obj)
    extra = {"usage": None} if include_usage else {}

    def event(choices: list[dict[str, Any]], **more: Any) -> bytes:
        return b"data: " + json.dumps({**chunk, "choices": choices, **more}).encode() + b"\n\n"

    def delta(d: dict[str, Any], reason: str | None = None) -> dict[str, Any]:
        return {"index": 0, "delta": d, "logprobs": None, "finish_reason": reason}

    events = [event([delta({"role": "assistant", "content": "", "refusal": None})], **extra)]
    events += [event([delta({"content": w if i == 0 else " " + w})], **extra) for i, w in enumerate(words)]
    events.append(event([delta({}, finish)], **extra))
    if include_usage:
        events.append(event([], usage=usage))
    events.append(b"data: [DONE]\n\n")
    return json.dumps(body).encode(), events


CHAT = Endpoint(
    path="/v1/chat/completions",
    provider=PROVIDER,
    parse=parse_chat,
    meter=meter_chat,
    stream_meter=ChatStream,
    error_body=error_body,
    stream_error=chat_stream_error,
    mock=mock_chat,
)

ENDPOINTS = (CHAT,)
