"""The records that cross module boundaries, and the stable strings of the contract.

Money is `Decimal` and leaves a record only as a plain decimal string (`usd`). Timestamps are ISO-8601 UTC
strings with milliseconds, so they sort as text in the ledger.
"""

from __future__ import annotations

import functools
import json
import time
from dataclasses import dataclass, field
from decimal import Decimal
from enum import StrEnum
from typing import Any, NamedTuple


class HaltReason(StrEnum):
    """Why a run stopped admitting calls. A halted run stays halted."""

    COST = "cost_budget_exceeded"
    TOKENS = "token_budget_exceeded"
    CALLS = "call_budget_exceeded"
    TIME = "time_budget_exceeded"
    LOOP = "loop_detected"
    KILLED = "killed"


class Refusal(StrEnum):
    """Why one call was refused without halting the run."""

    INSUFFICIENT_BUDGET = "insufficient_budget"
    UNPRICED_MODEL = "unpriced_model"
    UNMETERED_ENDPOINT = "unmetered_endpoint"
    LEDGER_UNAVAILABLE = "ledger_unavailable"  # the ledger cannot be written: rk forwards nothing it cannot record


class RunStatus(StrEnum):
    RUNNING = "running"
    COMPLETED = "completed"
    HALTED = "halted"
    INTERRUPTED = "interrupted"  # the owning process died without finishing the run


class Flag(StrEnum):
    """Marks on a call row."""

    ESTIMATED = "estimated"  # usage (some or all) estimated: the stream was cut or the upstream sent none
    UNPRICED = "unpriced"  # no price known for the model; cost recorded as 0 and said loudly
    UNMETERED = "unmetered"  # a free endpoint (model lists, token counts)
    CUT = "cut"  # rk ended the stream early (cap, time limit, kill)
    REFUSED = "refused"  # rk answered 402 and never contacted the upstream
    CLAMPED = "clamped"  # under --strict, rk lowered the call's output limit to what the budget could pay for


def now_iso() -> str:
    return iso(time.time())


def iso(seconds: float) -> str:
    """A Unix time as the ledger writes timestamps: `2026-11-26T10:20:31.656Z`."""
    second, ms = divmod(round(seconds * 1_000_000) // 1000, 1000)  # whole microseconds first: no float drift
    return f"{_iso_second(second)}.{ms:03d}Z"


@functools.lru_cache(maxsize=1)
def _iso_second(second: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))


PICO = Decimal("1e-12")  # the ledger keeps money as whole picodollars: exact, and summable in SQL


def usd(amount: Decimal) -> str:
    """Money as an exact plain decimal string with at least four places: "0.0040", "0.000135", "12.5000"."""
    whole, _, places = format(amount, "f").partition(".")
    places = places.rstrip("0").ljust(4, "0")
    return f"{whole}.{places}"


@dataclass(frozen=True, slots=True)
class Budget:
    """The limits of one run; `None` means the dimension is unlimited."""

    max_cost: Decimal | None = Decimal("5.00")
    max_tokens: int | None = None
    max_calls: int | None = None
    max_time: float | None = None  # seconds of wall clock from the start of the run
    max_repeats: int | None = None  # the same request seen this many times halts the run (`loop_detected`)
    strict: bool = False  # each call's worst case must fit: output limits lowered, spend never past the cap

    def to_json(self) -> dict[str, Any]:
        return {
            "max_cost_usd": None if self.max_cost is None else str(self.max_cost),
            "max_tokens": self.max_tokens,
            "max_calls": self.max_calls,
            "max_time_s": self.max_time,
            "max_repeats": self.max_repeats,
            "strict": self.strict,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Budget:
        cost = data.get("max_cost_usd")
        return cls(
            max_cost=None if cost is None else Decimal(cost),
            max_tokens=data.get("max_tokens"),
            max_calls=data.get("max_calls"),
            max_time=data.get("max_time_s"),
            max_repeats=data.get("max_repeats"),
            strict=bool(data.get("strict", False)),
        )


class Usage(NamedTuple):
    """Token counts of one call, normalised to OpenAI's sense whatever the provider said.

    `input_tokens` counts every input token: cache reads, cache writes and audio are parts of it.
    `output_tokens` counts every output token: reasoning and audio are parts of it.

    (A named tuple, as immutable as a frozen dataclass: the proxy makes a few per call, and a frozen
    dataclass, which sets each field through `object.__setattr__`, costs three times as much to make.)
    """

    input_tokens: int = 0
    cached_input_tokens: int = 0
    cache_write_tokens: int = 0
    cache_write_1h_tokens: int = 0  # the part of cache_write_tokens written with a 1-hour TTL
    input_audio_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0
    output_audio_tokens: int = 0
    web_searches: int = 0  # server-side web search requests, priced per request

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    def __add__(self, other: Usage) -> Usage:  # type: ignore[override]  # (counts add up; tuples would concatenate)
        return Usage(*(mine + theirs for mine, theirs in zip(self, other, strict=True)))


# The usage a run's totals show, in order.
USAGE_COLUMNS = ("input_tokens", "cached_input_tokens", "cache_write_tokens", "output_tokens", "reasoning_tokens")
# The usage a call's row keeps: all of it, so that its cost can be worked out again from the row.
CALL_USAGE_COLUMNS = Usage._fields


class CallRecord(NamedTuple):
    """One call as the ledger keeps it. Bodies (prompts, completions) are never part of it. (A named tuple,
    as `Usage` is: one is made per call.)"""

    run_id: str
    seq: int  # order of arrival in the run, refused calls included
    started_at: str
    endpoint: str  # the route as the client called it, e.g. /v1/chat/completions
    provider: str  # whose wire format: openai | anthropic
    requested_model: str | None
    model: str | None  # as served by the upstream; the requested model when the upstream did not say
    stream: bool
    status: int  # the HTTP status the client received
    usage: Usage = Usage()
    cost: Decimal = Decimal(0)
    price_source: str | None = None
    flags: tuple[str, ...] = ()
    latency_ms: float = 0.0
    ttfb_ms: float | None = None  # first byte from the upstream
    error: str | None = None  # refusal or halt reason, cut reason, or the upstream's error, one line
    cache_savings: Decimal = Decimal(0)  # what its cache reads saved over the plain input rate
    reserved: Decimal | None = None  # the worst case it was admitted (or refused) against; None: not metered
    output_limit: int | None = None  # the output limit rk set on it under --strict (flag `clamped`)

    def to_json(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "started_at": self.started_at,
            "endpoint": self.endpoint,
            "provider": self.provider,
            "model": self.model,
            "requested_model": self.requested_model,
            "stream": self.stream,
            "status": self.status,
            **{name: getattr(self.usage, name) for name in CALL_USAGE_COLUMNS},
            "cost_usd": usd(self.cost),
            "cache_savings_usd": usd(self.cache_savings),
            "reserved_usd": None if self.reserved is None else usd(self.reserved),
            "output_limit": self.output_limit,
            "price_source": self.price_source,
            "flags": list(self.flags),
            "latency_ms": round(self.latency_ms, 1),
            "ttfb_ms": None if self.ttfb_ms is None else round(self.ttfb_ms, 1),
            "error": self.error,
        }


@dataclass(frozen=True, slots=True)
class Totals:
    """What a run has spent: the metered calls that reached an upstream, and their usage and cost."""

    calls: int = 0
    usage: Usage = field(default_factory=Usage)
    cost: Decimal = Decimal(0)

    def to_json(self) -> dict[str, Any]:
        return {
            "calls": self.calls,
            **{name: getattr(self.usage, name) for name in USAGE_COLUMNS},
            "cost_usd": usd(self.cost),
        }


@dataclass(frozen=True, slots=True)
class RunRecord:
    run_id: str
    name: str | None
    command: tuple[str, ...]
    cwd: str
    started_at: str
    budget: Budget
    status: RunStatus = RunStatus.RUNNING
    halt_reason: str | None = None
    exit_status: int | None = None
    ended_at: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    totals: Totals = field(default_factory=Totals)
    owner: str | None = None  # host:pid:start of the process that runs it, to tell a dead owner

    def to_json(self, calls: list[CallRecord] | None = None) -> dict[str, Any]:
        data: dict[str, Any] = {
            "run_id": self.run_id,
            "name": self.name,
            "command": list(self.command),
            "cwd": self.cwd,
            "status": str(self.status),
            "halt_reason": self.halt_reason,
            "exit_status": self.exit_status,
            "started_at": self.started_at,
            "ended_at": self.ended_at,
            "budget": self.budget.to_json(),
            "totals": self.totals.to_json(),
            "tags": dict(self.tags),
        }
        if calls is not None:
            data["calls"] = [call.to_json() for call in calls]
        return data


def dumps(data: Any) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False)
