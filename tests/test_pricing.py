from decimal import Decimal
from pathlib import Path

import genai_prices
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from riskkernel.errors import ConfigError
from riskkernel.models import Usage
from riskkernel.pricing import (
    FALLBACKS,
    RATE_KEYS,
    PriceBook,
    Rates,
    Tiered,
    load_prices_file,
    normalize_model,
    parse_price_flag,
)

BOOK = PriceBook()


def cost(model: str, usage: Usage, tier: str | None = None) -> Decimal:
    rates = BOOK.resolve(model, "openai", tier)
    assert rates is not None, model
    return rates.cost(usage)


@pytest.mark.parametrize(
    ("model", "usage", "tier", "expected"),
    [
        # gpt-4o: $2.50 in, $1.25 cached in, $10 out per 1M
        ("gpt-4o", Usage(input_tokens=10_000, cached_input_tokens=4_000, output_tokens=2_000), None, "0.04"),
        ("gpt-4o-2024-08-06", Usage(input_tokens=1_000_000), None, "2.5"),
        ("openai/gpt-4o", Usage(output_tokens=1_000_000), None, "10"),
        # o3 (since 2025-06-10): $2 in, $0.50 cached, $8 out; reasoning is billed as output
        (
            "o3",
            Usage(input_tokens=5_000, cached_input_tokens=1_000, output_tokens=3_000, reasoning_tokens=2_500),
            None,
            "0.0325",
        ),
        # gpt-5 on the flex service tier: $0.625 in, $5 out
        ("gpt-5", Usage(input_tokens=1_000_000, output_tokens=100_000), "flex", "1.125"),
        # claude-sonnet-4-5: $3 in, $3.75 5m writes, $6 1h writes, $0.30 reads, $15 out (below the 200k tier)
        (
            "anthropic/claude-sonnet-4-5",
            Usage(
                input_tokens=10_000,
                cache_write_tokens=5_000,
                cache_write_1h_tokens=3_000,
                cached_input_tokens=4_000,
                output_tokens=500,
            ),
            None,
            "0.0372",
        ),
    ],
)
def test_golden_costs(model: str, usage: Usage, tier: str | None, expected: str) -> None:
    assert cost(model, usage, tier) == Decimal(expected)


MODELS = [
    "gpt-4o",
    "gpt-4o-mini",
    "o3",
    "o4-mini",
    "gpt-5",
    "gpt-4.1-nano",
    "claude-sonnet-4-5",
    "claude-opus-4-1",
    "claude-3-5-haiku-latest",
    "gpt-4o-audio-preview",
]


@settings(max_examples=300, deadline=None)
@given(
    model=st.sampled_from(MODELS),
    plain=st.integers(0, 400_000),
    cached=st.integers(0, 50_000),
    write_5m=st.integers(0, 20_000),
    write_1h=st.integers(0, 20_000),
    audio_in=st.integers(0, 5_000),
    output=st.integers(0, 100_000),
    audio_out=st.integers(0, 5_000),
)
def test_costs_match_genai_prices_calc_price(
    model: str, plain: int, cached: int, write_5m: int, write_1h: int, audio_in: int, output: int, audio_out: int
) -> None:
    total_in = plain + cached + write_5m + write_1h + audio_in
    ours = Usage(
        input_tokens=total_in,
        cached_input_tokens=cached,
        cache_write_tokens=write_5m + write_1h,
        cache_write_1h_tokens=write_1h,
        input_audio_tokens=audio_in,
        output_tokens=output + audio_out,
        output_audio_tokens=audio_out,
    )
    theirs = genai_prices.Usage(
        input_tokens=total_in,
        cache_read_tokens=cached,
        cache_write_tokens=write_5m + write_1h,
        cache_write_1h_tokens=write_1h,
        input_audio_tokens=audio_in,
        output_tokens=output + audio_out,
        output_audio_tokens=audio_out,
    )
    expected = genai_prices.calc_price(theirs, model).total_price
    assert cost(model, ours) == expected.quantize(Decimal("1e-12"))


def test_tiers_are_cliffs_on_total_input() -> None:
    rate = Tiered(Decimal(3), ((200_000, Decimal(6)),))
    rates = Rates(input=rate, output=Decimal(15))
    assert rates.cost(Usage(input_tokens=200_000)) == Decimal("0.6")
    assert rates.cost(Usage(input_tokens=200_001)) == Decimal("1.200006")


def test_unknown_models_have_no_price() -> None:
    assert BOOK.resolve("no-such-model-xyz", "openai") is None
    assert BOOK.resolve("text-embedding-3-small", "openai") is not None  # found through the provider hint


def test_overrides_come_first_and_match_dated_snapshots() -> None:
    book = PriceBook([parse_price_flag("my-model=1:2:0.5"), parse_price_flag("GPT-4o=100:200")])
    mine = book.resolve("my-model-2025-01-31", "openai")
    assert mine is not None and mine.source == "--price"
    assert mine.cost(Usage(input_tokens=2_000_000, cached_input_tokens=1_000_000, output_tokens=1_000_000)) == 3.5
    assert book.resolve("my-model-extra", "openai") is None
    override = book.resolve("gpt-4o", "openai")
    assert override is not None and override.input == 100
    assert book.cached("my-model-2025-01-31", "openai") is mine


@pytest.mark.parametrize("text", ["gpt-4o", "gpt-4o=1", "=1:2", "m=1:2:3:4", "m=a:2", "m=-1:2", "m=1:nan"])
def test_bad_price_flags_are_refused(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_price_flag(text)


def test_model_names_are_normalised() -> None:
    assert normalize_model(" OpenAI/GPT-4o ") == "gpt-4o"
    assert normalize_model("anthropic/claude-sonnet-4-5") == "claude-sonnet-4-5"
    assert normalize_model("meta-llama/llama-3") == "meta-llama/llama-3"


def test_the_genai_prices_source_is_named() -> None:
    rates = BOOK.resolve("gpt-4o-mini", "openai")
    assert rates is not None
    assert rates.source == f"genai-prices {genai_prices.__version__}: openai/gpt-4o-mini"


def test_a_prices_file_gives_exact_rates_by_normalised_name(tmp_path: Path) -> None:
    path = tmp_path / "prices.toml"
    path.write_text(
        '[models."OpenAI/My-FT"]\ninput = 0.1\noutput = 3\ncache_write = 0.125\ncache_write_1h = 0.2\n'
        '[models."free"]\ninput = 0\noutput = 0\n'
    )
    (name, rates), (free, _) = load_prices_file(path)
    assert (name, free) == ("my-ft", "free")
    assert rates.input == Decimal("0.1")  # exactly, not the float nearest 0.1
    assert rates.source == f"prices.toml ({path})"
    usage = Usage(input_tokens=10_000_000, cache_write_tokens=2_000_000, cache_write_1h_tokens=1_000_000)
    assert rates.cost(usage) == Decimal("0.8") + Decimal("0.125") + Decimal("0.2")
    assert PriceBook(load_prices_file(path)).resolve("my-ft-2025-01-01") == rates


def test_an_empty_prices_file_prices_nothing(tmp_path: Path) -> None:
    (tmp_path / "prices.toml").write_text("# nothing yet\n")
    assert load_prices_file(tmp_path / "prices.toml") == []


@pytest.mark.parametrize("missing", list(FALLBACKS))
def test_a_missing_rate_is_charged_as_its_fallback(missing: str) -> None:
    own = {attr: Decimal(n) for n, attr in enumerate(RATE_KEYS.values(), start=1) if attr != missing}
    charged = Rates(**own).per_million()  # type: ignore[arg-type]
    assert charged[missing] == charged[FALLBACKS[missing]]


def test_tiers_are_listed_by_where_they_start() -> None:
    rates = Rates(
        input=Tiered(Decimal(3), ((200_000, Decimal(6)),)),
        output=Tiered(Decimal(15), ((128_000, Decimal(20)), (200_000, Decimal("22.5")))),
    )
    assert rates.tier_starts() == [128_000, 200_000]
    assert rates.per_million(200_001)["output"] == Decimal("22.5")
    assert rates.per_million(0)["cache_read"] == 3
