"""What a call costs: genai-prices (pinned) with the user's overrides on top.

A genai-prices lookup costs about as much as a whole proxy hop and importing it takes 0.2 s, so a model's
rates are resolved once into `Rates` (the first time off the event loop, by the caller's choice of thread)
and every call is then priced with a few `Decimal` multiplications. `Rates.cost` follows genai-prices'
rules, which the tests check against `genai_prices.calc_price`:

- `input_tokens` is all input; cache reads, cache writes and audio are parts of it, each priced at its
  own rate, and at the plain input rate when the model has none. 1-hour cache writes are a part of the
  cache writes. Output likewise: reasoning is plain output, audio has its own rate.
- A tiered rate is a cliff: once the call's input crosses a tier's start, every token pays the tier's rate.

Model names are matched as served: case-insensitive, `openai/` and `anthropic/` prefixes stripped, dated
snapshots (`gpt-4o-2024-08-06`) resolved by genai-prices, and by the overrides too. An unknown model is
`None`, never a silent zero.

User overrides come from `--price MODEL=IN:OUT[:CACHED_IN]` and from a prices file (`prices.toml`), read
strictly: pricing is money, so a typo stops rk rather than pricing a model at $0.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import ROUND_CEILING, Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from riskkernel.errors import ConfigError
from riskkernel.models import PICO, Usage

MILLION = Decimal(1_000_000)
_PREFIXES = ("openai/", "anthropic/")


@dataclass(frozen=True, slots=True)
class Tiered:
    base: Decimal
    tiers: tuple[tuple[int, Decimal], ...]  # (start, rate), ascending

    def at(self, total_input: int) -> Decimal:
        for start, rate in reversed(self.tiers):
            if total_input > start:
                return rate
        return self.base


Rate = Decimal | Tiered


@dataclass(frozen=True, slots=True)
class Rates:
    """USD per 1M tokens (per 1,000 requests for `per_kilo_request`), and where they came from."""

    input: Rate
    output: Rate | None = None
    cache_read: Rate | None = None
    cache_write: Rate | None = None
    cache_write_1h: Rate | None = None
    input_audio: Rate | None = None
    output_audio: Rate | None = None
    per_kilo_request: Decimal | None = None
    per_kilo_web_search: Decimal | None = None
    source: str = ""
    _flat: tuple[Decimal, ...] | None = field(init=False, repr=False, compare=False, default=None)

    def __post_init__(self) -> None:
        if not any(isinstance(getattr(self, name), Tiered) for name in _RATE_NAMES):
            object.__setattr__(self, "_flat", self._resolve(0))  # the same for every call: resolve once

    def _resolve(self, total_input: int) -> tuple[Decimal, ...]:
        """USD per token for plain input, cache reads, cache writes, 1h cache writes, input audio, output and
        output audio, each falling back as genai-prices does when the model has no rate of its own."""

        def at(rate: Rate | None, fallback: Decimal) -> Decimal:
            if rate is None:
                return fallback
            return (rate if isinstance(rate, Decimal) else rate.at(total_input)) / MILLION

        inp = at(self.input, Decimal(0))
        out = at(self.output, Decimal(0))
        write = at(self.cache_write, inp)
        return (
            inp,
            at(self.cache_read, inp),
            write,
            at(self.cache_write_1h, write),
            at(self.input_audio, inp),
            out,
            at(self.output_audio, out),
        )

    def cost(self, usage: Usage) -> Decimal:
        """USD, rounded to the picodollar the ledger keeps (exact for any rate with six decimals or fewer)."""
        inp, read, write, write_1h, audio_in, out, audio_out = self._flat or self._resolve(usage.input_tokens)
        u = usage
        plain = u.input_tokens - u.cached_input_tokens - u.cache_write_tokens - u.input_audio_tokens
        cost = max(plain, 0) * inp + (u.output_tokens - u.output_audio_tokens) * out
        if u.cached_input_tokens:
            cost += u.cached_input_tokens * read
        if u.cache_write_tokens:
            cost += (u.cache_write_tokens - u.cache_write_1h_tokens) * write + u.cache_write_1h_tokens * write_1h
        if u.input_audio_tokens or u.output_audio_tokens:
            cost += u.input_audio_tokens * audio_in + u.output_audio_tokens * audio_out
        if self.per_kilo_request:
            cost += self.per_kilo_request / 1000
        if u.web_searches and self.per_kilo_web_search:
            cost += u.web_searches * self.per_kilo_web_search / 1000
        return cost.quantize(PICO)

    def worst_case(self, input_tokens: int, cache_writes: bool = False) -> tuple[Decimal, Decimal]:
        """The most a call with up to `input_tokens` of input can cost: (its input and per-request fee, each
        output token). Input at the dearest rate it may be billed at (cache writes if it may write the cache,
        audio), output at the dearer of text and audio; never rounded down."""
        inp, _, write, write_1h, audio_in, out, audio_out = self._flat or self._resolve(input_tokens)
        fixed = input_tokens * max(inp, audio_in, *((write, write_1h) if cache_writes else ()))
        if self.per_kilo_request:
            fixed += self.per_kilo_request / 1000
        return fixed.quantize(PICO, ROUND_CEILING), max(out, audio_out)

    def output_per_token(self, total_input: int) -> Decimal:
        """USD per plain output token for a call with this much input: what a live stream is metered at."""
        return (self._flat or self._resolve(total_input))[5]

    def per_million(self, total_input: int = 0) -> dict[str, Decimal]:
        """USD per 1M tokens of each kind that a call with this much input is charged, fallbacks applied."""
        per_token = self._flat or self._resolve(total_input)
        return {name: (rate * MILLION).normalize() for name, rate in zip(_RESOLVED, per_token, strict=True)}

    def tier_starts(self) -> list[int]:
        """The input sizes above which some rate changes (a call with more input pays the tier's rates)."""
        tiers = (getattr(self, name) for name in _RATE_NAMES)
        return sorted({start for rate in tiers if isinstance(rate, Tiered) for start, _ in rate.tiers})


_RATE_NAMES = ("input", "output", "cache_read", "cache_write", "cache_write_1h", "input_audio", "output_audio")
_RESOLVED = ("input", "cache_read", "cache_write", "cache_write_1h", "input_audio", "output", "output_audio")
# The rate a model with none of its own of a kind is charged instead, as `Rates._resolve` applies it (no
# input or output rate at all is $0: genai-prices lists such models, e.g. embeddings have no output price).
FALLBACKS = {
    "cache_read": "input",
    "cache_write": "input",
    "cache_write_1h": "cache_write",
    "input_audio": "input",
    "output_audio": "output",
}
# Each rate's name where people see it: prices.toml keys and `rk prices --json`. In display order.
RATE_KEYS = {
    "input": "input",
    "cached_input": "cache_read",
    "cache_write": "cache_write",
    "cache_write_1h": "cache_write_1h",
    "output": "output",
    "input_audio": "input_audio",
    "output_audio": "output_audio",
}


def normalize_model(name: str) -> str:
    name = name.strip().lower()
    for prefix in _PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix) :]
    return name


def _decimal(text: str, what: str) -> Decimal:
    try:
        value = Decimal(text.strip())
    except InvalidOperation:
        raise ConfigError(f"{what}: {text!r} is not a number") from None
    if not value.is_finite() or value < 0:
        raise ConfigError(f"{what}: {text!r} must be a non-negative number")
    return value


def parse_price_flag(text: str, source: str = "--price") -> tuple[str, Rates]:
    """`MODEL=IN:OUT[:CACHED_IN]` in USD per 1M tokens, as `--price` takes it. `source` says where the text
    came from (`--price`, `RK_PRICE`, `[prices] in rk.toml`), in errors and on the rates."""
    model, eq, spec = text.partition("=")
    parts = spec.split(":")
    what = f"{source} {text!r}"
    if not eq or not model.strip() or len(parts) not in (2, 3):
        raise ConfigError(f"{what}: expected MODEL=IN:OUT[:CACHED_IN] in USD per 1M tokens")
    rates = Rates(
        input=_decimal(parts[0], what),
        output=_decimal(parts[1], what),
        cache_read=_decimal(parts[2], what) if len(parts) == 3 else None,
        source=source,
    )
    return normalize_model(model), rates


PRICES_FILE_EXAMPLE = '[models."my-model"] with input = 2.50 and output = 10.00 (USD per 1M tokens)'


def load_prices_file(path: Path) -> list[tuple[str, Rates]]:
    """The models a prices file prices, in its order. Strict: anything but well-formed, non-negative rates
    under known keys is a `ConfigError` naming the file and the entry. The format (USD per 1M tokens):

        [models."my-finetune"]
        input = 2.50           # required
        output = 10.00         # required
        cached_input = 1.25    # optional, as all the other RATE_KEYS; a missing rate falls back (FALLBACKS)
    """
    import tomllib

    try:
        data = tomllib.loads(path.read_text(), parse_float=Decimal)  # exact: 0.1 is 0.1, not 0.1000000000000000055
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"prices file {path}: cannot read it: {getattr(exc, 'strerror', None) or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"prices file {path}: not valid TOML: {exc}") from None
    for key in data:
        if key != "models":
            raise ConfigError(f"prices file {path}: unknown section {key!r}: prices go under {PRICES_FILE_EXAMPLE}")
    models = data.get("models", {})
    if not isinstance(models, dict):
        raise ConfigError(f"prices file {path}: 'models' must be tables like {PRICES_FILE_EXAMPLE}")
    source = f"{path.name} ({path.absolute()})"
    seen: dict[str, str] = {}
    found = []
    for model, entry in models.items():
        where = f'prices file {path}: [models."{model}"]'
        name = normalize_model(model)
        if not name:
            raise ConfigError(f"{where}: the model name is empty")
        if name in seen:
            raise ConfigError(f"{where}: priced twice (also as {seen[name]!r})")
        seen[name] = model
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: expected a table of rates like input = 2.50 and output = 10.00")
        for key in entry:
            if key not in RATE_KEYS:
                raise ConfigError(f"{where}: unknown rate {key!r} (known: {', '.join(RATE_KEYS)})")
        for key in ("input", "output"):
            if key not in entry:
                raise ConfigError(f"{where}: {key} is missing (USD per 1M tokens)")
        rates = {RATE_KEYS[key]: _file_rate(value, f"{where}: {key}") for key, value in entry.items()}
        found.append((name, Rates(**rates, source=source)))
    return found


def _file_rate(value: Any, what: str) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, int | Decimal):
        raise ConfigError(f"{what} = {_toml(value)}: expected a number of USD per 1M tokens, like 2.50")
    rate = Decimal(value)
    if not rate.is_finite() or rate < 0:
        raise ConfigError(f"{what} = {_toml(value)}: must be zero or more USD per 1M tokens")
    return rate


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return repr(value) if isinstance(value, str) else str(value)


def how_to_price(model: str) -> str:
    """What a person can do about a model with no known price: the end of rk's "no price" messages."""
    return (
        f'add one with --price {model}=IN:OUT[:CACHED_IN] (USD per 1M tokens) or a [models."{model}"] entry '
        "in prices.toml, or let its calls through unpriced with --allow-unpriced"
    )


class _Missing:
    pass


MISSING = _Missing()
_DATED = r"-\d{4}-?\d{2}-?\d{2}"


class PriceBook:
    """Rates by model: user overrides first, then genai-prices. Safe to share across threads."""

    def __init__(self, overrides: Iterable[tuple[str, Rates]] = ()) -> None:
        self._overrides = [(re.compile(re.escape(name) + f"(?:{_DATED})?"), rates) for name, rates in overrides]
        self._cache: dict[tuple[str, str | None, str | None, int], Rates | None] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _key(model: str, provider: str | None, tier: str | None) -> tuple[str, str | None, str | None, int]:
        # The UTC day is part of the key: some prices change on a date (genai-prices' date constraints).
        return normalize_model(model), provider, tier, int(time.time() // 86400)

    def cached(self, model: str, provider: str | None = None, tier: str | None = None) -> Rates | _Missing | None:
        """The rates if already resolved, else MISSING. Never slow: safe on the event loop."""
        return self._cache.get(self._key(model, provider, tier), MISSING)

    def resolve(self, model: str, provider: str | None = None, tier: str | None = None) -> Rates | None:
        """The rates for a model as served, or None if no price is known. Slow the first time."""
        key = self._key(model, provider, tier)
        with self._lock:
            if key in self._cache:
                return self._cache[key]
            name = key[0]
            rates = next((r for pattern, r in self._overrides if pattern.fullmatch(name)), None)
            if rates is None:
                rates = _from_genai_prices(name, provider, tier)
            self._cache[key] = rates
            return rates


_PRICE_KEYS = {
    "input_mtok": "input",
    "output_mtok": "output",
    "cache_read_mtok": "cache_read",
    "cache_write_mtok": "cache_write",
    "cache_write_5m_mtok": "cache_write",
    "cache_write_1h_mtok": "cache_write_1h",
    "input_audio_mtok": "input_audio",
    "output_audio_mtok": "output_audio",
}


def genai_prices_version() -> str:
    from importlib.metadata import version

    return version("genai-prices")


def _from_genai_prices(name: str, provider_hint: str | None, tier: str | None) -> Rates | None:
    from genai_prices import data_snapshot, types

    snapshot = data_snapshot.get_snapshot()
    try:
        provider, info = snapshot.find_provider_model(name, None, None, None)
    except LookupError:
        if provider_hint is None:
            return None
        try:
            provider, info = snapshot.find_provider_model(name, None, provider_hint, None)
        except LookupError:
            return None
    # Price variants (service tiers) belong to a provider's own models, as in genai-prices' calc_price.
    own_model = any(info is m for m in provider.models)
    context = {"service_tier": tier} if tier and own_model else None
    prices = info.get_prices(datetime.now(UTC), context)  # type: ignore[arg-type]

    def convert(value: object) -> Rate | None:
        if isinstance(value, types.TieredPrices):
            return Tiered(value.base, tuple((t.start, t.price) for t in value.tiers))
        return value if isinstance(value, Decimal) else None

    values: dict[str, Rate | None] = {}
    for price_key, attr in _PRICE_KEYS.items():
        rate = convert(getattr(prices, price_key, None))
        if rate is not None:
            values.setdefault(attr, rate)
    if "input" not in values and "output" not in values:
        return None  # priced by units rk does not meter (audio hours, characters)
    per_kilo_request = getattr(prices, "requests_kcount", None)
    per_kilo_web_search = getattr(prices, "web_searches_kcount", None)
    return Rates(
        input=values.pop("input", None) or Decimal(0),
        per_kilo_request=per_kilo_request if isinstance(per_kilo_request, Decimal) else None,
        per_kilo_web_search=per_kilo_web_search if isinstance(per_kilo_web_search, Decimal) else None,
        source=f"genai-prices {genai_prices_version()}: {provider.id}/{info.id}",
        **values,  # type: ignore[arg-type]
    )
