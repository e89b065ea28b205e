"""Everything OpenAI-specific: the routes (chat, legacy completions, Responses, embeddings), their usage
fields, the include_usage rule, error shapes and mock replies.

Chat and completion streams carry usage only when `stream_options.include_usage` is set, so rk forces it
upstream and, for a client that did not ask, hides the difference again: the usage-only chunk
(`choices: []`, which crashes the common `chunk.choices[0]` client code) is dropped and the `"usage":null`
that every other chunk then carries is cut out of its bytes. The client sees what it would have seen
without rk. Responses streams always end with their usage, in `response.completed` (or `.incomplete`,
`.failed`).

Usage: `prompt_tokens` / `input_tokens` include cached (and, where a compatible server reports them,
cache-write) tokens; reasoning tokens are inside `completion_tokens` / `output_tokens`.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import re
import struct
import time
from typing import Any

from riskkernel.models import Usage
from riskkernel.providers import (
    SCAN,
    Endpoint,
    ErrorKind,
    Metered,
    Position,
    Provider,
    Request,
    append_field,
    load_dict,
    load_object,
    measure_input,
    positive_int,
    sse,
    text_len,
)
from riskkernel.providers.sse import Event

_NULL_USAGE = re.compile(rb',\s*"usage"\s*:\s*null(?=\s*\})|"usage"\s*:\s*null\s*,\s*')
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # what the legacy completions API generates when max_tokens is not given


# -- errors -----------------------------------------------------------------------------------------------

_TYPES = {
    ErrorKind.INVALID: "invalid_request_error",
    ErrorKind.TOO_LARGE: "invalid_request_error",
    ErrorKind.NOT_FOUND: "invalid_request_error",
    ErrorKind.AUTH: "invalid_request_error",
    ErrorKind.BUDGET: "budget_exceeded",
    ErrorKind.REFUSED: "invalid_request_error",
    ErrorKind.UPSTREAM: "upstream_error",
    ErrorKind.UNAVAILABLE: "server_error",
    ErrorKind.INTERNAL: "server_error",
}


def _error(message: str, kind: ErrorKind, code: str) -> dict[str, Any]:
    return {"message": message, "type": _TYPES[kind], "param": None, "code": code}


def error_body(message: str, kind: ErrorKind, code: str) -> bytes:
    return json.dumps({"error": _error(message, kind, code)}, ensure_ascii=False).encode()


def data_error_event(message: str, kind: ErrorKind, code: str) -> bytes:
    """A chat or completions stream's terminal error: the openai SDK raises `APIError` on an event whose
    data has an `error` object."""
    return b"data: " + error_body(message, kind, code) + b"\n\n"


def responses_error_event(message: str, kind: ErrorKind, code: str) -> bytes:
    """A Responses stream's terminal error: the Responses `error` event, with the `error` object the openai
    SDK raises `APIError` on."""
    error = _error(message, kind, code)
    return sse("error", {"type": "error", "code": code, "message": message, "param": None, "error": error})


PROVIDER = Provider(
    name="openai",
    default_upstream="https://api.openai.com/v1",
    base_env=("OPENAI_BASE_URL", "OPENAI_API_BASE"),
    prefix="/v1",
    key_env="OPENAI_API_KEY",
    error_body=error_body,
)


# -- requests ---------------------------------------------------------------------------------------------


def _tier(obj: dict[str, Any]) -> str | None:
    tier = obj.get("service_tier")
    return tier if isinstance(tier, str) else None


def _wants_usage(obj: dict[str, Any]) -> bool:
    options = obj.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def _force_include_usage(body: bytes, obj: dict[str, Any]) -> bytes:
    if "stream_options" not in obj:
        return append_field(body, "stream_options", '{"include_usage":true}')
    options = obj["stream_options"] if isinstance(obj["stream_options"], dict) else {}
    forced = {**obj, "stream_options": {**options, "include_usage": True}}
    try:
        return json.dumps(forced, ensure_ascii=False).encode()
    except UnicodeEncodeError:  # a lone surrogate (a valid JSON escape) has no UTF-8 form: keep it escaped
        return json.dumps(forced).encode()


def _request(
    body: bytes, obj: dict[str, Any], parts: tuple[str, ...], output: int | None, output_field: str | None
) -> Request:
    estimate, bound = measure_input(obj, parts)
    return Request(
        model=obj["model"],
        stream=bool(obj.get("stream")),
        body=body,
        input_tokens=estimate,
        max_output_tokens=output,
        service_tier=_tier(obj),
        input_bound=bound,
        output_field=output_field,
        parts=parts,
        parsed=obj,
    )


def _usage_streamed(request: Request, obj: dict[str, Any]) -> Request:
    """A chat or completions request, with stream usage forced on if the client streams without it, and as
    many completions as it asks for."""
    request.hide_usage = request.stream and not _wants_usage(obj)
    if request.hide_usage:
        request.body = _force_include_usage(request.body, obj)
    request.choices = max(positive_int(obj.get("n")), positive_int(obj.get("best_of")), 1)
    return request


_CHAT_PARTS = ("messages", "tools", "functions")


def parse_chat(body: bytes) -> Request:
    obj = load_object(body)
    output = positive_int(obj.get("max_completion_tokens")) or positive_int(obj.get("max_tokens")) or None
    # `--strict` lowers the limit the request set, else sets the current one (the o-series refuse max_tokens).
    field = "max_tokens" if "max_tokens" in obj and "max_completion_tokens" not in obj else "max_completion_tokens"
    return _usage_streamed(_request(body, obj, _CHAT_PARTS, output, field), obj)


def parse_completions(body: bytes) -> Request:
    obj = load_object(body)
    output = positive_int(obj.get("max_tokens")) if "max_tokens" in obj else COMPLETIONS_DEFAULT_MAX_TOKENS
    return _usage_streamed(_request(body, obj, ("prompt", "suffix"), output or None, "max_tokens"), obj)


def parse_responses(body: bytes) -> Request:
    obj = load_object(body)
    output = positive_int(obj.get("max_output_tokens")) or None
    request = _request(body, obj, ("input", "instructions", "tools"), output, "max_output_tokens")
    request.detached = bool(obj.get("background"))
    return request


def parse_embeddings(body: bytes) -> Request:
    obj = load_object(body)
    if obj.get("stream"):
        raise ValueError("rk: embeddings are not streamed")
    request = _request(body, obj, ("input",), 0, None)
    data = obj.get("input")
    if isinstance(data, list) and data and all(isinstance(x, int) for x in data):
        request.input_tokens = request.input_bound = len(data)  # one input given as token ids
    elif isinstance(data, list) and data and all(isinstance(x, list) for x in data):
        request.input_tokens = request.input_bound = sum(len(x) for x in data)  # several inputs as token ids
    return request


# -- responses --------------------------------------------------------------------------------------------


def _details(usage: dict[str, Any], key: str) -> dict[str, Any]:
    value = usage.get(key)
    return value if isinstance(value, dict) else {}


def chat_usage(usage: dict[str, Any]) -> Usage:
    """Chat and legacy completions usage (also embeddings, which report only prompt tokens)."""
    prompt = _details(usage, "prompt_tokens_details")
    completion = _details(usage, "completion_tokens_details")
    return Usage(
        input_tokens=positive_int(usage.get("prompt_tokens")),
        cached_input_tokens=positive_int(prompt.get("cached_tokens")),
        cache_write_tokens=positive_int(prompt.get("cache_write_tokens")),
        input_audio_tokens=positive_int(prompt.get("audio_tokens")),
        output_tokens=positive_int(usage.get("completion_tokens")),
        reasoning_tokens=positive_int(completion.get("reasoning_tokens")),
        output_audio_tokens=positive_int(completion.get("audio_tokens")),
    )


def responses_usage(usage: dict[str, Any], web_searches: int = 0) -> Usage:
    return Usage(
        input_tokens=positive_int(usage.get("input_tokens")),
        cached_input_tokens=positive_int(_details(usage, "input_tokens_details").get("cached_tokens")),
        output_tokens=positive_int(usage.get("output_tokens")),
        reasoning_tokens=positive_int(_details(usage, "output_tokens_details").get("reasoning_tokens")),
        web_searches=web_searches,
    )


_TEXT_FIELDS = frozenset({"content", "refusal", "reasoning_content", "reasoning"})


def _choice_chars(choice: Any) -> int:
    """Generated text in a chat or completions choice, whole or streamed: content, refusal, reasoning,
    tool calls, or a completion's text."""
    if not isinstance(choice, dict):
        return 0
    chars = text_len(choice.get("text"))
    message = choice.get("message") or choice.get("delta")
    if not isinstance(message, dict):
        return chars
    for key, value in message.items():  # (a streamed delta has one or two fields: cheaper than asking for six)
        if key in _TEXT_FIELDS:
            chars += text_len(value)
        elif key == "tool_calls" and isinstance(value, list):
            chars += sum(_function_chars(call.get("function")) for call in value if isinstance(call, dict))
        elif key == "function_call":
            chars += _function_chars(value)
    return chars


def _function_chars(function: Any) -> int:
    return text_len(function.get("name")) + text_len(function.get("arguments")) if isinstance(function, dict) else 0


MAX_FINISH_REASONS = 128  # the API's limit on `n`: a hostile stream cannot grow the list past it


def _finish_reasons(choices: list[Any], reasons: list[str]) -> None:
    """Add the finish reasons chat or completions `choices` (whole or streamed) give to `reasons`."""
    for choice in choices:
        reason = choice.get("finish_reason") if isinstance(choice, dict) else None
        if isinstance(reason, str) and len(reasons) < MAX_FINISH_REASONS:
            reasons.append(reason)


def _count_choices(choices: list[Any], metered: Metered) -> None:
    """Add what streamed `choices` generated, and why they stopped, to a stream's meter."""
    metered.output_chars += sum(_choice_chars(choice) for choice in choices)
    _finish_reasons(choices, metered.finish_reasons)


def _error_message(error: Any) -> str | None:
    if isinstance(error, dict):
        return str(error.get("message") or error.get("type") or "error")
    return None


def _str(obj: dict[str, Any], key: str) -> str | None:
    value = obj.get(key)
    return value if isinstance(value, str) else None


def meter_chat(body: bytes) -> Metered:
    """A whole chat completion, legacy completion or embeddings response."""
    obj = load_dict(body)
    usage = obj.get("usage")
    metered = Metered(
        usage=chat_usage(usage) if isinstance(usage, dict) else None,
        model=_str(obj, "model"),
        service_tier=_str(obj, "service_tier"),
        error=_error_message(obj.get("error")),
    )
    choices = obj.get("choices")
    if isinstance(choices, list):
        _finish_reasons(choices, metered.finish_reasons)
        if metered.usage is None:  # only needed to estimate the usage
            metered.output_chars = sum(_choice_chars(choice) for choice in choices)
    return metered


def _web_searches(response: dict[str, Any]) -> int:
    output = response.get("output")
    if not isinstance(output, list):
        return 0
    return sum(1 for item in output if isinstance(item, dict) and item.get("type") == "web_search_call")


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _output_chars(response: dict[str, Any]) -> int:
    """Generated text in a Responses output: message text, function call arguments, reasoning summaries."""
    chars = 0
    for item in _list(response.get("output")):
        if not isinstance(item, dict):
            continue
        chars += text_len(item.get("arguments"))
        for part in _list(item.get("content")) + _list(item.get("summary")):
            if isinstance(part, dict):
                chars += text_len(part.get("text"))
    return chars


_RESPONSE_DONE = frozenset({"completed", "incomplete", "failed", "cancelled"})


def _meter_response(response: dict[str, Any], metered: Metered) -> None:
    """Fill `metered` from a Responses response object, as returned whole or in a terminal event."""
    usage = response.get("usage")
    metered.model = _str(response, "model") or metered.model
    metered.service_tier = _str(response, "service_tier") or metered.service_tier
    if isinstance(usage, dict):
        metered.usage = responses_usage(usage, _web_searches(response))
    error = response.get("error")
    if error:
        metered.error = _error_message(error)
    status = response.get("status")
    if isinstance(status, str) and status in _RESPONSE_DONE:  # why it stopped: why it is incomplete, or its end
        details = response.get("incomplete_details")
        reason = details.get("reason") if isinstance(details, dict) else None
        metered.finish_reasons = [reason if isinstance(reason, str) else status]


def meter_responses(body: bytes) -> Metered:
    obj = load_dict(body)
    metered = Metered(error=_error_message(obj.get("error")) if "output" not in obj else None)
    _meter_response(obj, metered)
    if metered.usage is None:
        metered.output_chars = _output_chars(obj)
    return metered


_NULL_USAGE_END = b',"usage":null}\n\n'


def _without_null_usage(raw: bytes) -> bytes:
    """A chunk without the `"usage":null` that forcing `include_usage` added (unchanged unless it has exactly
    one): the client did not ask for it."""
    if raw.endswith(_NULL_USAGE_END) and raw.count(b'"usage"') == 1:  # where OpenAI puts it
        return raw[: -len(_NULL_USAGE_END)] + b"}\n\n"
    stripped, n = _NULL_USAGE.subn(b"", raw)
    return stripped if n == 1 else raw


def _delta_choices(data: str, tier_known: bool) -> list[Any] | None:
    """The `choices` of an ordinary streamed chunk, parsed alone: one with no usage or error (nor a service
    tier not yet known) to read, which is nearly every chunk of a stream. None for any other chunk, which is
    parsed whole.

    Safe on any text: inside a JSON string every quote is escaped, so `"choices":[`, `"usage"` and `"error"`
    can only be the JSON's own keys and values. (A lone `choices` nested below the top would be read as the
    chunk's own: no provider sends one, and it could only change the output estimate.)"""
    if '"error"' in data or data.count('"usage"') != data.count('"usage":null') or data.count('"choices"') != 1:
        return None
    if not tier_known and '"service_tier"' in data:
        return None
    return _choices_in(data, 0, len(data))


def _choices_in(text: str, start: int, end: int) -> list[Any] | None:
    """The `choices` array of the chunk `text[start:end]` (which has one key "choices"), parsed alone."""
    at = text.find(',"choices":[', start, end)
    if at < 0:
        at = text.find('{"choices":[', start, end)
        if at < 0:
            return None
    try:
        choices = SCAN(text, at + 11)[0]
    except (StopIteration, ValueError, RecursionError):
        return None
    return choices if isinstance(choices, list) else None


def _ordinary_end(block: bytes, start: int, tier_known: bool) -> tuple[int, int]:
    """Where, in a block of whole one-line events, the first event from `start` on with more to read than
    its choices begins (one with an error, a usage that is not null, a service tier not yet known), and
    how many `"usage"` the events before it hold. (`[DONE]` has no choices: `_count_deltas` refuses it.)"""
    stop = len(block)
    at = block.find(b'"error"', start)
    if at >= 0:
        stop = at
    if not tier_known:
        at = block.find(b'"service_tier"', start, stop)
        if at >= 0:
            stop = at
    usages = block.count(b'"usage"', start, stop)
    if usages and usages != block.count(b'"usage":null', start, stop):
        at = block.find(b'"usage"', start, stop)
        while block.startswith(b'"usage":null', at):
            at = block.find(b'"usage"', at + 12, stop)
        stop = at
    if stop == len(block):
        return stop, usages
    end = block.rfind(b"\n\n", start, stop)
    stop = start if end < 0 else end + 2
    return stop, block.count(b'"usage"', start, stop)


def _without_null_usages(part: bytes, events: int, usages: int) -> bytes | None:
    """`_without_null_usage` for a block of whole one-line events, with `usages` `"usage"` in all. None
    unless it is sure to cut every event as that does, which needs one in each: they are then cut one by
    one."""
    if not usages:
        return part
    if usages != events:
        return None
    stripped = part.replace(_NULL_USAGE_END, b"}\n\n")
    if len(part) - len(stripped) == events * (len(_NULL_USAGE_END) - 3):  # one ending each event, as OpenAI's
        return stripped
    if _TWO_USAGES.search(part):  # (else, with as many as there are events, there is one in each)
        return None
    stripped, n = _NULL_USAGE.subn(b"", part)  # (a match never reaches past its event's line)
    return stripped if n == events else None


_TWO_USAGES = re.compile(rb'"usage"[^\n]*"usage"')
# The commonest streamed chunk by far: one choice that generates text and nothing else (its text captured
# as JSON has it, escapes and all). In JSON the key "choices" follows `{` or `,` (not checked: in a chunk
# that is not JSON this may count text `feed` would not), and the text of a string cannot hold
# `"choices":[` (its quotes are escaped). A match takes the rest of its line: one per event at most.
_TEXT_DELTA = re.compile(
    r'"choices":\[\{"index":(?:0|[1-9]\d*),"delta":\{"content":"((?:[^"\\\x00-\x1f]++|\\.)*+)"\}'
    r'(?:,"logprobs":null)?(?:,"finish_reason":null)?\}\][^\n]*'
)
_SCAN_TEXT = json.decoder.scanstring  # type: ignore[attr-defined]  # (C) a JSON string from just after its opening quote


def _count_deltas(text: str, events: int, reasons: list[str]) -> tuple[int, list[str]] | None:
    """What a block of whole one-line chunks generated: its characters, and the finish reasons so far
    (`reasons`, then its own), as `_delta_choices` reads each chunk that is JSON. None if a chunk's choices
    cannot be read alone: the caller then reads each chunk as `feed` does."""
    if text.count('"choices"') != events:
        return None
    texts = _TEXT_DELTA.findall(text)
    if len(texts) == events:  # (with one "choices" in each, one match in each)
        joined = "".join(texts)
        if "\\" not in joined:
            return len(joined), reasons
        with contextlib.suppress(ValueError):  # (an escape JSON does not have: read each chunk as `feed` does)
            return sum(len(_SCAN_TEXT(t + '"', 0)[0]) for t in texts), reasons
    counted = Metered(finish_reasons=list(reasons))
    pos = 0
    for _ in range(events):
        end = text.find("\n", pos)
        choices = _choices_in(text, pos, end)  # (none: then another event has two "choices", or it is no JSON)
        if choices is None:
            return None
        _count_choices(choices, counted)
        pos = end + 2
    return counted.output_chars, counted.finish_reasons


class ChatStream:
    """Meters one chat or completions stream and decides, event by event, what the client sees. The stream
    ends (for rk's purposes) at its usage-only chunk, an error, or `[DONE]`."""

    def __init__(self, request: Request) -> None:
        self.hide_usage = request.hide_usage
        self.metered = Metered()

    def feed(self, event: Event) -> tuple[bytes, Position]:
        data = event.data
        if data is None:
            return event.raw, Position.MORE
        if data == "[DONE]":
            return event.raw, Position.LAST
        m = self.metered
        choices = _delta_choices(data, m.service_tier is not None) if m.model is not None else None
        if choices is not None:  # the fast path: the same as below, for a chunk with nothing else to read
            _count_choices(choices, m)
            return (_without_null_usage(event.raw) if self.hide_usage else event.raw), Position.MORE
        obj = load_dict(data) if data.startswith("{") else {}
        return self._read(obj, event.raw)

    def _read(self, obj: dict[str, Any], raw: bytes) -> tuple[bytes, Position]:
        """`feed` for a chunk parsed whole."""
        if not obj:
            return raw, Position.MORE
        m = self.metered
        if m.model is None:
            m.model = _str(obj, "model")
        m.service_tier = _str(obj, "service_tier") or m.service_tier
        choices = obj.get("choices")
        if "usage" in obj:
            usage = obj["usage"]
            if isinstance(usage, dict):
                m.usage = chat_usage(usage)
                if not choices:  # the usage-only chunk: generation is over, only [DONE] follows
                    return (b"" if self.hide_usage else raw), Position.OVER
            elif usage is None and self.hide_usage:
                raw = _without_null_usage(raw)
        if isinstance(choices, list):
            _count_choices(choices, m)
        if obj.get("error"):  # the SDK raises on it at once: it ends the stream as the client sees it
            m.error = _error_message(obj["error"]) or str(obj["error"])  # any error ends it, a bare string too
            return raw, Position.LAST
        return raw, Position.MORE

    def feed_plain(self, block: bytes) -> tuple[bytes, int]:
        """`feed` for many events at once (see `StreamMeter.feed_plain`): the leading events of `block` that
        are ordinary generation have only their choices read, all of them in one pass."""
        m = self.metered
        start, shown = 0, b""
        if m.model is None:  # a stream's first chunk is read whole, for its model and tier
            start = block.find(b"\n\n") + 2
            data = block[6 : start - 2].decode("utf-8", "replace")
            obj = load_dict(data) if data.startswith("{") else {}
            if not obj or isinstance(obj.get("usage"), dict) or obj.get("error"):
                return b"", 0  # (not ordinary generation: for `feed`)
            shown = self._read(obj, block[:start])[0]
            if m.model is None:
                return shown, start
        stop, usages = _ordinary_end(block, start, m.service_tier is not None)
        if stop == start:
            return shown, start
        part = block[start:stop]
        events = part.count(b"\n") // 2
        relayed = _without_null_usages(part, events, usages) if self.hide_usage else part
        if relayed is None:
            return shown, start  # for `feed`, event by event
        counted = _count_deltas(part.decode("utf-8", "replace"), events, m.finish_reasons)
        if counted is None:
            return shown, start  # for `feed`, event by event
        m.output_chars += counted[0]
        m.finish_reasons = counted[1]
        return shown + relayed, stop

    def result(self) -> Metered:
        return self.metered


_RESPONSE_ENDS = frozenset({"response.completed", "response.incomplete", "response.failed"})


class ResponsesStream:
    """Meters one Responses stream: text and arguments as they flow, the usage from its terminal event."""

    def __init__(self, request: Request) -> None:
        self.metered = Metered()

    def feed(self, event: Event) -> tuple[bytes, Position]:
        if event.data is None:
            return event.raw, Position.MORE
        obj = load_dict(event.data)
        kind = _str(obj, "type") or event.event  # a string: a list or object here is unhashable
        if kind in _RESPONSE_ENDS or kind == "response.created":
            response = obj.get("response")
            if isinstance(response, dict):
                _meter_response(response, self.metered)
            return event.raw, Position.LAST if kind in _RESPONSE_ENDS else Position.MORE
        if isinstance(kind, str) and kind.endswith(".delta"):
            self.metered.output_chars += text_len(obj.get("delta"))
        elif kind == "error":
            self.metered.error = str(obj.get("message") or _error_message(obj.get("error")) or "error event")
            return event.raw, Position.LAST
        return event.raw, Position.MORE

    def feed_plain(self, block: bytes) -> tuple[bytes, int]:
        return b"", 0  # its events are named (`event:` lines): never plain

    def result(self) -> Metered:
        return self.metered


# -- the mock upstream ------------------------------------------------------------------------------------

MOCK_WORDS = (
    "This reply comes from the rk mock upstream . No key and no network were used , yet the call was "
    "metered and priced at the real price of the model you asked for , and it counts against your budget "
    "exactly as a real call would . Point the agent at a real provider by dropping --mock ."
).split()


_SENTENCE_STARTS = [i for i, word in enumerate(MOCK_WORDS) if i == 0 or MOCK_WORDS[i - 1] == "."]


def mock_words(seed: Any, limit: int | None) -> tuple[list[str], bool]:
    """Deterministic reply words for a request's content (one word = one token), and whether the output
    limit cut them short."""
    digest = hashlib.sha256(json.dumps(seed, sort_keys=True, default=str).encode()).digest()
    count = 24 + digest[0] % 40
    start = _SENTENCE_STARTS[digest[1] % len(_SENTENCE_STARTS)]
    words = [MOCK_WORDS[(start + i) % len(MOCK_WORDS)] for i in range(count)]
    if limit is not None and count > limit:
        return words[:limit], True
    return words, False


def _mock_id(prefix: str, request: Request) -> str:
    return prefix + hashlib.sha256(request.body).hexdigest()[:24]


def _usage_chunk_stream(
    base: dict[str, Any], pieces: list[dict[str, Any]], usage: dict[str, Any], include_usage: bool
) -> list[bytes]:
    """A chat or completions stream: one chunk per choice piece, then usage if asked for, then [DONE]."""
    extra = {"usage": None} if include_usage else {}
    events = [sse(None, {**base, "choices": [piece], **extra}) for piece in pieces]
    if include_usage:
        events.append(sse(None, {**base, "choices": [], "usage": usage}))
    return [*events, b"data: [DONE]\n\n"]


def _mock_chat_usage(request: Request, output: int) -> dict[str, Any]:
    return {
        "prompt_tokens": request.input_tokens,
        "completion_tokens": output,
        "total_tokens": request.input_tokens + output,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
    }


def mock_chat(request: Request, obj: dict[str, Any]) -> tuple[bytes, list[bytes]]:
    words, cut = mock_words(obj.get("messages"), request.max_output_tokens)
    finish = "length" if cut else "stop"
    usage = _mock_chat_usage(request, len(words))
    base = {
        "id": _mock_id("chatcmpl-mock", request),
        "created": int(time.time()),
        "model": request.model,
        "system_fingerprint": "fp_rk_mock",
    }
    message = {"role": "assistant", "content": " ".join(words), "refusal": None}
    whole = {
        **base,
        "object": "chat.completion",
        "usage": usage,
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
    }

    def piece(delta: dict[str, Any], reason: str | None = None) -> dict[str, Any]:
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}

    pieces = [piece({"role": "assistant", "content": "", "refusal": None})]
    pieces += [piece({"content": w if i == 0 else " " + w}) for i, w in enumerate(words)]
    pieces.append(piece({}, finish))
    chunk = {**base, "object": "chat.completion.chunk"}
    return json.dumps(whole).encode(), _usage_chunk_stream(chunk, pieces, usage, _wants_usage(obj))


def mock_completions(request: Request, obj: dict[str, Any]) -> tuple[bytes, list[bytes]]:
    words, cut = mock_words(obj.get("prompt"), request.max_output_tokens)
    finish = "length" if cut else "stop"
    usage = _mock_chat_usage(request, len(words))
    base = {
        "id": _mock_id("cmpl-mock", request),
        "object": "text_completion",
        "created": int(time.time()),
        "model": request.model,
    }
    text = " " + " ".join(words)
    whole = {**base, "usage": usage, "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}]}
    pieces = [{"text": " " + w, "index": 0, "logprobs": None, "finish_reason": None} for w in words]
    pieces.append({"text": "", "index": 0, "logprobs": None, "finish_reason": finish})
    return json.dumps(whole).encode(), _usage_chunk_stream(base, pieces, usage, _wants_usage(obj))


def mock_responses(request: Request, obj: dict[str, Any]) -> tuple[bytes, list[bytes]]:
    words, cut = mock_words(obj.get("input"), request.max_output_tokens)
    text = " ".join(words)
    ident = _mock_id("resp_mock", request)
    item_id = "msg_" + ident[9:]
    usage = {
        "input_tokens": request.input_tokens,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": len(words),
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": request.input_tokens + len(words),
    }
    part = {"type": "output_text", "text": text, "annotations": []}
    item = {"id": item_id, "type": "message", "status": "completed", "role": "assistant", "content": [part]}
    response = {
        "id": ident,
        "object": "response",
        "created_at": int(time.time()),
        "model": request.model,
        "status": "incomplete" if cut else "completed",
        "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if cut else None,
        "instructions": obj.get("instructions"),
        "output": [item],
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        "usage": usage,
        "service_tier": "default",
        "store": False,
        "text": {"format": {"type": "text"}},
    }
    started = {**response, "status": "in_progress", "output": [], "usage": None, "incomplete_details": None}
    seq = iter(range(1_000_000))

    def event(kind: str, **fields: Any) -> bytes:
        return sse(kind, {"type": kind, "sequence_number": next(seq), **fields})

    at = {"output_index": 0, "item_id": item_id, "content_index": 0}
    events = [
        event("response.created", response=started),
        event("response.in_progress", response=started),
        event("response.output_item.added", output_index=0, item={**item, "status": "in_progress", "content": []}),
        event("response.content_part.added", **at, part={**part, "text": ""}),
        *(event("response.output_text.delta", **at, delta=w if i == 0 else " " + w) for i, w in enumerate(words)),
        event("response.output_text.done", **at, text=text),
        event("response.content_part.done", **at, part=part),
        event("response.output_item.done", output_index=0, item=item),
        event("response.incomplete" if cut else "response.completed", response=response),
    ]
    return json.dumps(response).encode(), events


def mock_embeddings(request: Request, obj: dict[str, Any]) -> tuple[bytes, list[bytes]]:
    data = obj.get("input")
    inputs = data if isinstance(data, list) and not all(isinstance(x, int) for x in data) else [data]
    default = 3072 if "large" in request.model else 1536
    dimensions = positive_int(obj.get("dimensions")) or default
    vectors = []
    for index, item in enumerate(inputs):
        seed = hashlib.sha256(json.dumps(item).encode()).digest()
        values = [((seed[i % 32] + i) % 256) / 255 - 0.5 for i in range(dimensions)]
        if obj.get("encoding_format") == "base64":
            embedding: Any = base64.b64encode(struct.pack(f"<{dimensions}f", *values)).decode()
        else:
            embedding = values
        vectors.append({"object": "embedding", "index": index, "embedding": embedding})
    usage = {"prompt_tokens": request.input_tokens, "total_tokens": request.input_tokens}
    whole = {"object": "list", "data": vectors, "model": request.model, "usage": usage}
    return json.dumps(whole).encode(), []


# -- the routes -------------------------------------------------------------------------------------------

CHAT = Endpoint("/v1/chat/completions", PROVIDER, parse_chat, meter_chat, ChatStream, data_error_event, mock_chat)
COMPLETIONS = Endpoint(
    "/v1/completions", PROVIDER, parse_completions, meter_chat, ChatStream, data_error_event, mock_completions
)
RESPONSES = Endpoint(
    "/v1/responses",
    PROVIDER,
    parse_responses,
    meter_responses,
    ResponsesStream,
    responses_error_event,
    mock_responses,
)
EMBEDDINGS = Endpoint(
    "/v1/embeddings", PROVIDER, parse_embeddings, meter_chat, ChatStream, data_error_event, mock_embeddings
)
ENDPOINTS = (CHAT, COMPLETIONS, RESPONSES, EMBEDDINGS)
