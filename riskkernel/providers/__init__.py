"""Wire knowledge of the LLM APIs, sans-IO: no aiohttp, no sockets, bytes in and records out.

Each metered route is an `Endpoint`: how to read its request, meter its response (whole or streamed),
and speak its error shapes. The proxy drives endpoints without knowing whose API they belong to.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from riskkernel.models import Usage
from riskkernel.providers.sse import Event

CHARS_PER_TOKEN = 4  # how rk estimates tokens from text it has not been told the usage of
IMAGE_TOKENS = 1000  # flat estimate for one image in a request


@dataclass(slots=True)
class Request:
    """What rk needs to know of a request before forwarding it."""

    model: str
    stream: bool
    body: bytes  # what goes upstream: the client's bytes, except where the endpoint must change them
    input_tokens: int  # estimated from the body
    max_output_tokens: int | None  # the request's own output limit, if it set one
    service_tier: str | None = None
    hide_usage: bool = False  # rk asked the upstream for stream usage the client did not ask for


@dataclass(slots=True)
class Metered:
    """What a response said about itself."""

    usage: Usage | None = None  # None: the upstream reported no usage
    model: str | None = None
    output_chars: int = 0  # text, tool arguments and reasoning seen, to estimate usage when none is reported
    service_tier: str | None = None
    error: str | None = None  # an error the upstream reported inside a 200 stream


class StreamMeter(Protocol):
    def feed(self, event: Event) -> tuple[bytes, bool]:
        """The bytes the client should see for this event, and whether it ends the stream."""
        ...

    def result(self) -> Metered: ...


@dataclass(frozen=True, slots=True)
class Endpoint:
    path: str  # as the client calls it, e.g. /v1/chat/completions
    provider: str  # openai | anthropic
    parse: Callable[[bytes], Request]  # raises ValueError with a message for the client
    meter: Callable[[bytes], Metered]  # a whole (non-streamed) response body
    stream_meter: Callable[[Request], StreamMeter]
    error_body: Callable[[str, str, str], bytes]  # (message, type, code) in the provider's error shape
    stream_error: Callable[[str, str, str], bytes]  # a terminal error event the provider's SDK raises on
    mock: Callable[[Request, dict[str, Any]], tuple[bytes, list[bytes]]]  # (body, stream events)


_SECRET = re.compile(r"(sk-|Bearer\s+)[\w\-*.]{6,}")


def redact(text: str, limit: int = 500) -> str:
    """Upstream text made fit for the ledger and logs: API keys (even masked ones) cut out, length bounded."""
    return _SECRET.sub(r"\1…", text)[:limit]


def estimate_tokens(chars: int) -> int:
    return math.ceil(chars / CHARS_PER_TOKEN)


def count_input(node: Any) -> tuple[int, int]:
    """(characters, images) in a parsed request: every key and string, and each image part once."""
    if isinstance(node, str):
        return len(node), 0
    chars = images = 0
    if isinstance(node, dict):
        kind = node.get("type")
        if isinstance(kind, str) and "image" in kind:
            return 0, 1
        for key, value in node.items():
            c, i = count_input(value)
            chars += len(key) + c
            images += i
    elif isinstance(node, list):
        for value in node:
            c, i = count_input(value)
            chars += c
            images += i
    elif node is not None:
        chars = 2
    return chars, images


def estimate_input_tokens(obj: Any) -> int:
    chars, images = count_input(obj)
    return estimate_tokens(chars) + images * IMAGE_TOKENS
