"""`rk prices`: the rates rk charges for a model, and where each came from.

It takes `rk run`'s own price options (the same declarations, so the same flags, variables and config keys)
and builds the user's overrides with the same function, `price_overrides`, so it answers exactly as a run
would charge: `--price` (or `RK_PRICE`, or `[prices]` in the config file), then the prices file, then
genai-prices.
"""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from riskkernel.config import ENV

if TYPE_CHECKING:
    from riskkernel.pricing import Rates

PANEL = "Prices"

PriceFlags = Annotated[
    list[str] | None,
    typer.Option(
        "--price",
        envvar=ENV["price"],
        rich_help_panel=PANEL,
        metavar="MODEL=IN:OUT[:CACHED_IN]",
        help="Price a model, USD per 1M tokens (repeatable). Wins over the prices file and genai-prices.",
    ),
]
PricesFile = Annotated[
    Path | None,
    typer.Option(
        "--prices",
        envvar=ENV["prices_file"],
        rich_help_panel=PANEL,
        metavar="FILE",
        show_default=False,
        help="A prices.toml of model prices, which win over genai-prices. Default: ./prices.toml if present, "
        "else prices.toml in the user config dir.",
    ),
]

HELP = (
    "Show the price rk charges for a model, and where that price comes from.\n\n"
    "Prices are USD per 1M tokens, resolved as `rk run` resolves them: --price (or RK_PRICE, or \\[prices] in "
    "rk.toml) first, then the prices file (--prices, or prices.toml), then the genai-prices data. With no "
    "MODEL, show the genai-prices version and the overrides in effect.\n\n"
    "Exit status: 0; 1 if no price is known for MODEL; 125 if the price options or the prices file are "
    "invalid.\n\n"
    "Example: rk prices claude-sonnet-4-5"
)

LABELS = {
    "input": "input",
    "cache_read": "cached input",
    "cache_write": "cache write (5m)",
    "cache_write_1h": "cache write (1h)",
    "output": "output",
    "input_audio": "input audio",
    "output_audio": "output audio",
}
UNIT = "USD per 1M tokens"


def prices_file_in_effect(ctx: typer.Context, prices_file: Path | None) -> Path | None:
    """The prices file a command with these options reads: the one named (which must exist), else the one
    found beside the config, else none."""
    from riskkernel import paths
    from riskkernel.cli.config import source_label
    from riskkernel.errors import ConfigError

    if prices_file is None:
        return paths.prices_file()
    if not prices_file.is_file():
        raise ConfigError(f"prices file {prices_file} (named by {source_label(ctx, 'prices_file')}): no such file")
    return prices_file


def price_overrides(
    ctx: typer.Context, price: list[str] | None, prices_file: Path | None
) -> tuple[tuple[str, Rates], ...]:
    """The user's prices, in the order they win: the `--price` values, then the prices file's entries."""
    from riskkernel.cli.config import source_label
    from riskkernel.pricing import load_prices_file, parse_price_flag

    flags = tuple(parse_price_flag(text, source_label(ctx, "price")) for text in price or ())
    path = prices_file_in_effect(ctx, prices_file)
    return flags + tuple(load_prices_file(path) if path else ())


def prices(
    ctx: typer.Context,
    model: Annotated[
        str | None,
        typer.Argument(
            metavar="MODEL",
            show_default=False,
            help="A model as a client names it or a provider serves it: gpt-4o, gpt-4o-2024-08-06, "
            "anthropic/claude-sonnet-4-5.",
        ),
    ] = None,
    price: PriceFlags = None,
    prices_file: PricesFile = None,
    provider: Annotated[
        str | None,
        typer.Option(
            metavar="openai|anthropic",
            show_default=False,
            help="Price the model as a call to this provider's API would be. Default: the first that knows it.",
        ),
    ] = None,
    tier: Annotated[
        str | None,
        typer.Option(show_default=False, help="An OpenAI service tier the call asks for: flex, priority."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON; money as decimal strings.")] = False,
) -> None:
    from riskkernel.cli import output
    from riskkernel.models import dumps
    from riskkernel.pricing import PriceBook, genai_prices_version, how_to_price

    overrides = price_overrides(ctx, price, prices_file)
    if model is None:
        path = prices_file_in_effect(ctx, prices_file)
        if as_json:
            print(dumps(_catalog_json(genai_prices_version(), path, overrides)))
        else:
            print("\n".join(_catalog_lines(genai_prices_version(), path, overrides)))
        return

    from riskkernel.providers.catalog import PROVIDERS

    names = [p.name for p in PROVIDERS]
    if provider is not None and provider not in names:
        raise typer.BadParameter(f"{provider!r} is not one of {', '.join(names)}", param_hint="--provider")
    book = PriceBook(overrides)
    rates = next(
        (r for name in ([provider] if provider else names) if (r := book.resolve(model, name, tier)) is not None),
        None,
    )
    if rates is None:
        if as_json:
            print(dumps({"model": model, "known": False}))
        output.error(f"rk: no price is known for model {model!r} — {how_to_price(model)}")
        raise typer.Exit(1)
    if as_json:
        print(dumps({"model": model, "known": True, **_rates_json(rates)}))
    else:
        print("\n".join(_rates_lines(model, rates)))


def _usd(amount: Decimal) -> str:
    """A rate for people: cents always shown, and every significant digit ($0.075 stays $0.075)."""
    amount = amount.normalize()
    if amount.as_tuple().exponent >= -2:  # type: ignore[operator]
        return f"${amount:,.2f}"
    return f"${amount:f}"


def _plain(amount: Decimal) -> str:
    """A rate for JSON: a decimal string without exponent or trailing zeros."""
    return f"{amount.normalize():f}"


def _own(rates: Rates, attr: str) -> bool:
    return getattr(rates, attr) is not None


def _rates_lines(model: str, rates: Rates) -> list[str]:
    from riskkernel.pricing import FALLBACKS, RATE_KEYS

    starts = rates.tier_starts()
    columns = [rates.per_million(0), *(rates.per_million(start + 1) for start in starts)]
    rows = [["", "base", *(f"above {start:,} input tokens" for start in starts), ""]] if starts else []
    for attr in RATE_KEYS.values():
        if _own(rates, attr):
            note = ""
        elif attr in ("input_audio", "output_audio"):
            continue  # the model takes no audio, or is charged plain rates for it: not worth a line
        elif attr in FALLBACKS:
            note = f"(no rate of its own: charged as {LABELS[FALLBACKS[attr]]})"
        else:
            note = "(none listed)"
        rows.append([LABELS[attr], *(_usd(column[attr]) for column in columns), note])
    for i in range(1, len(columns) + 1):  # line the amounts up on their decimal points
        amounts = [row[i].partition(".") for row in rows if row[i].startswith("$")]
        whole, cents = max(len(a[0]) for a in amounts), max(len(a[2]) for a in amounts)
        for row in rows:
            if row[i].startswith("$"):
                units, _, fraction = row[i].partition(".")
                row[i] = f"{units.rjust(whole)}.{fraction.ljust(cents)}"
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns) + 1)]
    lines = [f"{model}: {UNIT}, from {rates.source}"]
    for label, *cells, note in rows:
        text = "   ".join([label.ljust(widths[0]), *(c.rjust(w) for c, w in zip(cells, widths[1:], strict=True))])
        lines.append(f"  {text}   {note}".rstrip())
    for label, per_kilo in (("requests", rates.per_kilo_request), ("web searches", rates.per_kilo_web_search)):
        if per_kilo:
            lines.append(f"  {label.ljust(widths[0])}   {_usd(per_kilo)} per 1,000")
    return lines


def _rates_json(rates: Rates) -> dict[str, Any]:
    from riskkernel.pricing import RATE_KEYS

    def table(total_input: int) -> dict[str, str]:
        charged = rates.per_million(total_input)
        return {key: _plain(charged[attr]) for key, attr in RATE_KEYS.items()}

    def kilo(amount: Decimal | None) -> str | None:
        return _plain(amount) if amount else None

    return {
        "source": rates.source,
        "unit": UNIT,
        "rates": table(0),
        "own_rates": [key for key, attr in RATE_KEYS.items() if _own(rates, attr)],
        "tiers": [{"above_input_tokens": start, "rates": table(start + 1)} for start in rates.tier_starts()],
        "per_1k_requests": kilo(rates.per_kilo_request),
        "per_1k_web_searches": kilo(rates.per_kilo_web_search),
    }


def _summary(rates: Rates) -> str:
    from riskkernel.pricing import RATE_KEYS

    charged = rates.per_million(0)
    own = [f"{LABELS[attr]} {_usd(charged[attr])}" for attr in RATE_KEYS.values() if _own(rates, attr)]
    return ", ".join(own) + (" (and tiers)" if rates.tier_starts() else "")


def _catalog_lines(version: str, path: Path | None, overrides: tuple[tuple[str, Rates], ...]) -> list[str]:
    from riskkernel import paths

    lines = [f"prices: genai-prices {version} ({UNIT}), with your overrides first"]
    if path is not None:
        lines.append(f"prices file: {path.absolute()}")
    else:
        lines.append(f"prices file: none (looked for ./prices.toml, then {paths.user_prices_file()})")
    if overrides:
        lines.append("overrides, first match wins:")
        width = max(len(model) for model, _ in overrides)
        lines += [f"  {model.ljust(width)}   {_summary(rates)}   from {rates.source}" for model, rates in overrides]
    else:
        lines.append("overrides: none. Add one with --price MODEL=IN:OUT[:CACHED_IN] or an entry in prices.toml.")
    lines.append("What a model costs, and why: rk prices MODEL")
    return lines


def _catalog_json(version: str, path: Path | None, overrides: tuple[tuple[str, Rates], ...]) -> dict[str, Any]:
    return {
        "genai_prices": version,
        "prices_file": str(path.absolute()) if path else None,
        "overrides": [{"model": model, **_rates_json(rates)} for model, rates in overrides],
    }
