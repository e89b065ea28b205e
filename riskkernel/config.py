"""Settings: the values flags, `RK_*` variables and config files hold, and how each is read.

Precedence is flag > environment > config file > built-in default. Click keeps that order for us: the
config file becomes the command's `default_map`, which click consults after the command line and the
environment and before the option's own default, and it remembers where each value came from (which
`rk config show` reports). A setting is replaced whole: `--tag` on the command line replaces the file's
`[tags]`, it does not add to them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import TYPE_CHECKING, Any

from riskkernel.errors import ConfigError
from riskkernel.models import Budget
from riskkernel.providers import redact

if TYPE_CHECKING:
    from riskkernel.pricing import Rates

UNLIMITED = "unlimited"
DEFAULT_MAX_COST = "5.00"
# How long rk waits for an upstream to accept a connection, and for the next bytes of its answer. The read
# timeout is per read, not per call: a long generation that streams is never cut by it, and one that does
# not stream sends nothing until it is done, so the default is above the SDKs' own 10-minute timeout.
DEFAULT_CONNECT_TIMEOUT = "30s"
DEFAULT_READ_TIMEOUT = "15m"

# Settings a config file may hold, with the environment variable of each. Keys match the flags' names.
ENV = {
    "max_cost": "RK_MAX_COST",
    "max_tokens": "RK_MAX_TOKENS",
    "max_calls": "RK_MAX_CALLS",
    "max_time": "RK_MAX_TIME",
    "max_repeats": "RK_MAX_REPEATS",
    "strict": "RK_STRICT",
    "on_halt": "RK_ON_HALT",
    "grace": "RK_GRACE",
    "openai_upstream": "RK_OPENAI_UPSTREAM",
    "anthropic_upstream": "RK_ANTHROPIC_UPSTREAM",
    "connect_timeout": "RK_CONNECT_TIMEOUT",
    "read_timeout": "RK_READ_TIMEOUT",
    "mock": "RK_MOCK",
    "allow_unpriced": "RK_ALLOW_UNPRICED",
    "allow_unmetered": "RK_ALLOW_UNMETERED",
    "price": "RK_PRICE",
    "prices_file": "RK_PRICES",
    "name": "RK_NAME",
    "tag": "RK_TAG",
    "quiet": "RK_QUIET",
    "otel": "RK_OTEL",
}
# Settings a config file holds as a table (`[tags]`, `[prices]`) rather than as a list of flag values.
TABLES = {"tag": "tags", "price": "prices"}
# The settings `rk prices` takes too, so that it prices a model exactly as `rk run` would.
PRICE_SETTINGS = ("price", "prices_file")
# Variables that would make a nested `rk run` bypass the outer one; never passed to a child.
NOT_INHERITED = ("RK_OPENAI_UPSTREAM", "RK_ANTHROPIC_UPSTREAM", "RK_MOCK")
# OpenTelemetry's own variables that turn export on, as they would for any OTel SDK. Read here rather than in
# `riskkernel.telemetry`, so that deciding whether to export never imports OpenTelemetry.
OTEL_ENDPOINTS = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")


@dataclass(frozen=True)
class RunSettings:
    budget: Budget
    on_halt: str = "block"
    grace: float = 10.0
    openai_upstream: str | None = None
    anthropic_upstream: str | None = None
    connect_timeout: float | None = field(default_factory=lambda: parse_duration(DEFAULT_CONNECT_TIMEOUT, "timeout"))
    read_timeout: float | None = field(default_factory=lambda: parse_duration(DEFAULT_READ_TIMEOUT, "timeout"))
    mock: bool = False
    prices: tuple[tuple[str, Rates], ...] = ()
    allow_unpriced: bool = False
    allow_unmetered: bool = False
    name: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    otel: bool = False  # --otel; see `otel_wanted`


def otel_wanted(flag: bool, environ: Mapping[str, str]) -> bool:
    """Whether to export OpenTelemetry spans and metrics: `--otel`, or an OTLP endpoint in the environment;
    never when OTEL_SDK_DISABLED=true, OpenTelemetry's own off switch."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    return flag or any(environ.get(name, "").strip() for name in OTEL_ENDPOINTS)


def parse_cost(text: str) -> Decimal | None:
    value = text.strip().lower().lstrip("$")
    if value == UNLIMITED:
        return None
    try:
        cost = Decimal(value)
    except InvalidOperation:
        raise ConfigError(f"max cost {text!r}: expected dollars like 0.50, or 'unlimited'") from None
    if not cost.is_finite() or cost < 0:
        raise ConfigError(f"max cost {text!r}: must be zero or more dollars")
    return cost


def parse_count(text: str, what: str) -> int | None:
    value = text.strip().lower().replace("_", "").replace(",", "")
    if value == UNLIMITED:
        return None
    if not value.isdigit():
        raise ConfigError(f"max {what} {text!r}: expected a whole number, or 'unlimited'")
    return int(value)


_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(s|m|h)?")


def parse_duration(text: str, what: str = "max time") -> float | None:
    """`90`, `90s`, `15m`, `2h`, `0.5s` (seconds by default), or 'unlimited'."""
    value = text.strip().lower()
    if value == UNLIMITED:
        return None
    match = _DURATION.fullmatch(value)
    if not match:
        raise ConfigError(f"{what} {text!r}: expected a duration like 90, 90s, 15m or 2h, or 'unlimited'")
    return float(match.group(1)) * {"s": 1, "m": 60, "h": 3600}[match.group(2) or "s"]


def parse_timeout(text: str, what: str) -> float | None:
    seconds = parse_duration(text, what)
    if seconds == 0:
        raise ConfigError(f"{what} {text!r}: must be more than 0 seconds, or 'unlimited'")
    return seconds


def parse_tags(items: list[str]) -> dict[str, str]:
    tags = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"tag {item!r}: expected KEY=VALUE")
        tags[key.strip()] = value.strip()
    return tags


def parse_upstream(url: str | None, what: str = "upstream") -> str | None:
    """An upstream base URL. It may not carry credentials: rk forwards the client's own."""
    if url is None:
        return None
    if not re.match(r"https?://[^/\s]+", url):
        raise ConfigError(f"{what} {redact(url)!r}: expected an http:// or https:// URL")
    if re.match(r"\w+://[^/]*@", url):
        raise ConfigError(f"{what} {redact(url)!r}: credentials in the URL are not supported")
    return url.rstrip("/")


def parse_repeats(text: str) -> int | None:
    repeats = parse_count(text, "repeats")
    if repeats is not None and repeats < 2:
        raise ConfigError(f"max repeats {text!r}: must be 2 or more (a request is seen once before it repeats)")
    return repeats


def parse_budget(
    max_cost: str, max_tokens: str, max_calls: str, max_time: str, max_repeats: str = UNLIMITED, strict: bool = False
) -> Budget:
    return Budget(
        max_cost=parse_cost(max_cost),
        max_tokens=parse_count(max_tokens, "tokens"),
        max_calls=parse_count(max_calls, "calls"),
        max_time=parse_duration(max_time),
        max_repeats=parse_repeats(max_repeats),
        strict=strict,
    )


def load_file(path: Path) -> dict[str, Any]:
    """A config file as a click default map for the commands that take these settings. Strict.

    A relative `prices_file` is relative to the config file's directory, not to wherever rk was started."""
    import tomllib

    try:
        data = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: {exc}") from None
    tables = {table: setting for setting, table in TABLES.items()}
    settings: dict[str, Any] = {}
    for key, value in data.items():
        if key in tables:
            if not isinstance(value, dict):
                raise ConfigError(f"{path}: {key} must be a table, like [{key}] with one KEY = VALUE line each")
            settings[tables[key]] = [f"{k}={v}" for k, v in value.items()]
        elif key == "prices_file":
            if not isinstance(value, str) or not value.strip():
                raise ConfigError(f"{path}: prices_file must be a path (a string)")
            settings[key] = str(path.absolute().parent / Path(value).expanduser())
        elif key in ENV and key not in TABLES:
            if not isinstance(value, str | int | float | bool):
                raise ConfigError(f"{path}: {key} must be a string, number or boolean")
            settings[key] = value if isinstance(value, bool) else str(value)
        else:
            known = ", ".join(sorted([k for k in ENV if k not in TABLES] + list(tables)))
            raise ConfigError(f"{path}: unknown setting {key!r} (known: {known})")
    prices = {k: v for k, v in settings.items() if k in PRICE_SETTINGS}
    return {"run": settings, "serve": settings, "prices": prices}  # each command takes the keys it has
