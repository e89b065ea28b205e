"""Wire knowledge of the LLM APIs, sans-IO: no aiohttp, no sockets, bytes in and records out.

A `Provider` is whose API it is: where it lives, how its SDKs find their base URL, its error shape. Each
metered route is an `Endpoint` of a provider: how to read its request, meter its response (whole or
streamed) and end a stream with an error. The proxy drives endpoints without knowing whose they are;
`catalog` lists them all.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum, StrEnum
from typing import Any, Protocol

from riskkernel.models import Usage
from riskkernel.providers.sse import Event, SSEDecoder

CHARS_PER_TOKEN = 4  # how rk estimates tokens from text it has not been told the usage of
MEDIA_TOKENS = 1000  # flat estimate for one image, audio clip, file or document in a request
# What `--strict` takes as the most input a request can be: a token is at least one byte of text (so a
# part's UTF-8 bytes bound its tokens, keys and quoting paying for the chat template's few tokens per
# message), a number or literal at most SCALAR_BOUND tokens, and one media part at most MEDIA_BOUND (the
# most an image costs on OpenAI's and Anthropic's current models; long audio and many-page files can cost
# more, the one input `--strict` cannot bound).
SCALAR_BOUND = 8
MEDIA_BOUND = 3000
REQUEST_BOUND = 16  # tokens every request carries beyond its parts (the reply's priming)
_MEDIA = ("image", "audio", "file", "document")  # in a part's type: its payload is binary, not text


@dataclass(slots=True)
class Request:
    """What rk needs to know of a request before forwarding it."""

    model: str
    stream: bool
    body: bytes  # what goes upstream: the client's bytes, except where the endpoint must change them
    input_tokens: int  # estimated from the body
    max_output_tokens: int | None  # the request's own output limit; None if it set none, 0 if it has no output
    input_bound: int = 0  # the most input tokens it can be (see MEDIA_BOUND): what `--strict` reserves
    output_field: str | None = None  # the top-level field that limits its output, which `--strict` may set
    cache_writes: bool = False  # it may write the prompt cache, which Anthropic bills above plain input
    parts: tuple[str, ...] = ()  # the fields that say what it asks (messages or input, system, tools)
    parsed: dict[str, Any] | None = None  # the body as parsed, until rk has taken what it needs of it
    service_tier: str | None = None
    hide_usage: bool = False  # rk asked the upstream for stream usage the client did not ask for
    choices: int = 1  # how many completions the request asks for (`n`): each may use the output limit
    # The generation runs on at the provider whatever becomes of this connection (Responses' background
    # mode): rk can neither meter its end nor stop it by cutting the connection.
    detached: bool = False


@dataclass(slots=True)
class Metered:
    """What a response said about itself."""

    usage: Usage | None = None  # None: the upstream reported no usage
    model: str | None = None
    output_chars: int = 0  # text, tool arguments and reasoning seen, to estimate usage when none is reported
    service_tier: str | None = None
    error: str | None = None  # an error the upstream reported inside a 200 stream
    finish_reasons: list[str] = field(default_factory=list)  # why generation stopped, one per choice, as sent


class Position(IntEnum):
    """Where an event leaves a stream, for rk's purposes."""

    MORE = 0  # generation goes on
    OVER = 1  # generation is over and its usage final (chat's usage chunk, Anthropic's last message_delta);
    #           only the protocol's closing event is still to come: nothing to cut any more
    LAST = 2  # the protocol's last event ([DONE], message_stop, a response.* end, an error): stop reading


class StreamMeter(Protocol):
    def feed(self, event: Event) -> tuple[bytes, Position]:
        """The bytes the client should see for this event, and where it leaves the stream."""
        ...

    def feed_plain(self, block: bytes) -> tuple[bytes, int]:
        """`feed` for many events at once: `block` is whole events of one `data: ` line each. Meters those
        at its start that are ordinary generation (`Position.MORE`, every one) and returns the bytes the
        client should see for them, and how many bytes of `block` they are (0: feed them one by one)."""
        ...

    def result(self) -> Metered: ...


def meter_chunk(decoder: SSEDecoder, meter: StreamMeter, chunk: bytes) -> list[tuple[bytes, Position]]:
    """A stream's next network chunk, metered: the bytes the client should see, piece by piece, and where
    each piece leaves the stream. Whole one-line events at its start go to the meter at once, if it can
    take them so; the rest, event by event."""
    pieces: list[tuple[bytes, Position]] = []
    plain = decoder.plain_prefix(chunk)
    if plain:
        shown, used = meter.feed_plain(chunk[:plain])
        if used:
            pieces.append((shown, Position.MORE))
            chunk = chunk[used:]
    pieces += [meter.feed(event) for event in decoder.feed(chunk)]
    return pieces


class ErrorKind(StrEnum):
    """What went wrong, for an error rk itself answers; each provider words it in its own shape."""

    INVALID = "invalid"  # 400: rk cannot read the request
    TOO_LARGE = "too_large"  # 413: the request body is over rk's limit
    NOT_FOUND = "not_found"  # 404: not a route rk serves
    AUTH = "auth"  # 401: `rk serve`'s token is missing or wrong
    BUDGET = "budget"  # 402: a budget refusal, or the run is halted
    REFUSED = "refused"  # 402: a call rk will not forward (an unpriced model, an unmetered endpoint)
    UPSTREAM = "upstream"  # 502: the upstream could not be reached or broke off (504: it fell silent)
    UNAVAILABLE = "unavailable"  # 503: rk cannot serve the call now (its ledger cannot be written)
    INTERNAL = "internal"  # 500: a bug in rk


ErrorBody = Callable[[str, ErrorKind, str], bytes]  # (message, kind, code) -> body in the provider's shape


@dataclass(frozen=True, slots=True)
class Provider:
    name: str  # openai | anthropic
    default_upstream: str
    base_env: tuple[str, ...]  # variables its SDKs read their base URL from, the first the current one
    prefix: str  # the part of request paths that is in the SDK's base URL: /v1 for OpenAI, none for Anthropic
    key_env: str  # the variable its SDKs read their API key from
    error_body: ErrorBody

    def upstream_url(self, base: str, raw_path: str) -> str:
        """Where a request the client sent to `raw_path` (query included) goes, for an upstream `base`."""
        return base.rstrip("/") + raw_path[len(self.prefix) :]


@dataclass(frozen=True, slots=True)
class Endpoint:
    path: str  # as the client calls it, e.g. /v1/chat/completions
    provider: Provider
    parse: Callable[[bytes], Request]  # raises ValueError with a message for the client
    meter: Callable[[bytes], Metered]  # a whole (non-streamed) response body
    stream_meter: Callable[[Request], StreamMeter]
    stream_error: ErrorBody  # a terminal error event the provider's SDK raises on
    mock: Callable[[Request, dict[str, Any]], tuple[bytes, list[bytes]]]  # (body, stream events)

    @property
    def error_body(self) -> ErrorBody:
        return self.provider.error_body


SCAN = json.JSONDecoder().scan_once  # type: ignore[attr-defined]  # (C) one JSON value at an index, or StopIteration


def loads(data: bytes | str) -> Any:
    """`json.loads`, at half its cost for the usual UTF-8 text (encoding detection and the decoder's Python
    layers skipped); the same value, or the same errors, for any input."""
    if isinstance(data, bytes):
        try:
            text = data.decode()
        except UnicodeDecodeError:
            return json.loads(data)  # UTF-16 or -32, or encoded surrogates: as json reads them
        if text[:1] == "\ufeff" or "\x00" in text[:2]:
            return json.loads(data)  # (what json takes for a byte order mark, or UTF-16 or -32 text)
    else:
        text = data
    start = 0 if text[:1] == "{" else _WHITESPACE.match(text).end()  # type: ignore[union-attr]
    try:
        value, end = SCAN(text, start)
    except StopIteration as exc:
        raise json.JSONDecodeError("Expecting value", text, exc.value) from None
    if end != len(text):
        end = _WHITESPACE.match(text, end).end()  # type: ignore[union-attr]
        if end != len(text):
            raise json.JSONDecodeError("Extra data", text, end)
    return value


def load_dict(data: bytes | str) -> dict[str, Any]:
    """The JSON object `data` is, or {} if it is some other JSON, or not JSON."""
    try:
        obj = loads(data)
    except (ValueError, RecursionError):  # not JSON, or nested deeper than json parses
        return {}
    return obj if isinstance(obj, dict) else {}


def load_object(body: bytes) -> dict[str, Any]:
    """The request as a JSON object with a model, or ValueError with a message for the client."""
    try:
        obj = loads(body)
    except ValueError:
        raise ValueError("rk: the request body is not valid JSON") from None
    except RecursionError:
        raise ValueError("rk: the request body is nested too deeply") from None
    if not isinstance(obj, dict):
        raise ValueError("rk: the request body must be a JSON object")
    model = obj.get("model")
    if not isinstance(model, str) or not model.strip():
        raise ValueError("rk: the request names no model")
    if not isinstance(obj.get("stream", False), bool | None):
        raise ValueError("rk: `stream` must be true or false")
    return obj


def positive_int(value: Any) -> int:
    """An integer field of a request or a usage report, or 0 if it is missing or not a positive integer."""
    return value if type(value) is int and value > 0 else 0  # (JSON has no int subclass but bool: excluded)


def text_len(value: Any) -> int:
    return len(value) if isinstance(value, str) else 0


def sse(event: str | None, data: Any) -> bytes:
    """One server-sent event carrying `data` as compact JSON."""
    head = f"event: {event}\n".encode() if event else b""
    return head + b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


_SECRETS = (
    re.compile(r"(sk-|Bearer\s+)[\w\-*.]{6,}"),  # API keys, even masked ones
    re.compile(r"(\w://)[^/\s@]+@"),  # credentials in a URL
    re.compile(r"(?i)([?&;]\s*(?:api[-_]?key|key|token|secret|password|sig|signature|code)=)[^&;\s]+"),
    re.compile(r"(?i)((?:api[-_]?key|token|secret|password)[\s:=]+)[\w\-*.]{12,}"),
)


def redact(text: str, limit: int | None = 500) -> str:
    """Text made fit for the ledger and logs: API keys (even masked ones), URL credentials and secret
    parameters cut out, length bounded."""
    for pattern in _SECRETS:
        text = pattern.sub(r"\1…", text)
    return text[:limit]


def estimate_tokens(chars: int) -> int:
    return math.ceil(chars / CHARS_PER_TOKEN)


def measure_input(obj: dict[str, Any], fields: tuple[str, ...]) -> tuple[int, int]:
    """A request's input tokens, estimated and at most, from its parts `fields`.

    The estimate: a token for every 4 characters of the parts' keys and strings, and a flat 1,000 for each
    media part (image, audio, file, document), whose base64 payload says little about the tokens it costs.
    The bound: see MEDIA_BOUND. Iterative, so no nesting is too deep for it."""
    chars = size = media = 0
    stack = [obj.get(name) for name in fields]
    while stack:
        node = stack.pop()
        if isinstance(node, str):
            chars += len(node)
            size += len(node) if node.isascii() else len(node.encode("utf-8", "surrogatepass"))
        elif isinstance(node, dict):
            kind = node.get("type")
            if isinstance(kind, str) and any(word in kind for word in _MEDIA):
                media += 1
                continue
            for key in node:
                chars += len(key)
                size += len(key) if key.isascii() else len(key.encode("utf-8", "surrogatepass"))
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
        elif node is not None:
            chars += 2
            size += SCALAR_BOUND
    return estimate_tokens(chars) + media * MEDIA_TOKENS, REQUEST_BOUND + size + media * MEDIA_BOUND


def subject(request: Request) -> bytes:
    """What a request asks, for telling a repeated request: its model and its parts (messages or input,
    system, tools) as canonical JSON. Sampling settings (temperature, seed, output limit, stream) are left
    out: an agent that retries the same question at another temperature is still looping."""
    obj = request.parsed or {}
    asked = {name: obj.get(name) for name in request.parts}
    asked["model"] = request.model
    return json.dumps(asked, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8", "replace")


_WHITESPACE = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder()


def append_field(body: bytes, name: str, value: str) -> bytes:
    """`body` (a JSON object) with the field `name` (`value` as JSON text) added at its end, every other byte
    as it was."""
    end = body.rindex(b"}")  # the body parsed as an object, so it ends with its closing brace
    comma = b"," if body[:end].rstrip()[-1:] != b"{" else b""
    return body[:end] + comma + f'"{name}":{value}'.encode() + body[end:]


def set_top_level(body: bytes, name: str, value: int) -> bytes:
    """`body` (a JSON object) with its top-level field `name` set to `value`, every other byte as it was;
    the field is added at the end if the object has none. The object is walked with the json module's own
    scanner, so a key of the same name inside a message or a tool schema is never touched."""
    text = body.decode("utf-8", "surrogatepass")
    spans = []  # where each top-level `name` value is (a duplicate key counts where it is last)
    i = _WHITESPACE.match(text, 0).end() + 1  # type: ignore[union-attr]  # past the opening brace
    while True:
        i = _WHITESPACE.match(text, i).end()  # type: ignore[union-attr]
        if text[i] == "}":
            break
        key, i = json.decoder.scanstring(text, i + 1)  # type: ignore[attr-defined]
        i = _WHITESPACE.match(text, i).end() + 1  # type: ignore[union-attr]  # past the colon
        start = _WHITESPACE.match(text, i).end()  # type: ignore[union-attr]
        _, i = _DECODER.raw_decode(text, start)
        if key == name:
            spans.append((start, i))
        i = _WHITESPACE.match(text, i).end()  # type: ignore[union-attr]
        if text[i] == "}":
            break
        i += 1  # past the comma
    if not spans:
        return append_field(body, name, str(value))
    for start, stop in reversed(spans):
        text = text[:start] + str(value) + text[stop:]
    return text.encode("utf-8", "surrogatepass")
