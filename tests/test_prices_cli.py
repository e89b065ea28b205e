"""`rk prices` as a real subprocess: the rates rk charges for a model and where each came from; and the
prices.toml override file, read strictly by `rk run` and `rk prices` alike, and charged under `rk run`."""

import json
import sys
from decimal import Decimal
from pathlib import Path

import genai_prices
import pytest

from tests.conftest import agent_script, rk

PY = sys.executable
VERSION = genai_prices.__version__
MY_FINETUNE = '[models."my-finetune"]\ninput = 2.50\noutput = 10.00\ncached_input = 1.25\n'


@pytest.fixture(autouse=True)
def user_config_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A user config dir of the test's own: a real one must not change what rk charges here."""
    path = tmp_path / "user-config"
    monkeypatch.setenv("RK_CONFIG_DIR", str(path))
    return path


async def priced(*args: str, env: dict[str, str] | None = None) -> dict[str, object]:
    done = await rk("prices", *args, "--json", env=env)
    assert done.status == 0, done.stderr
    data: dict[str, object] = json.loads(done.stdout)
    return data


# genai-prices' own data, USD per 1M tokens. gpt-4o has no cache-write rates: writes are charged as input.
GPT_4O = {
    "input": "2.5",
    "cached_input": "1.25",
    "cache_write": "2.5",
    "cache_write_1h": "2.5",
    "output": "10",
    "input_audio": "2.5",
    "output_audio": "10",
}
SONNET_4_5 = {
    "input": "3",
    "cached_input": "0.3",
    "cache_write": "3.75",
    "cache_write_1h": "6",
    "output": "15",
    "input_audio": "3",
    "output_audio": "15",
}
SONNET_4_5_LONG = {
    "input": "6",
    "cached_input": "0.6",
    "cache_write": "7.5",
    "cache_write_1h": "12",
    "output": "22.5",
    "input_audio": "6",
    "output_audio": "22.5",
}


async def test_a_model_is_priced_from_genai_prices_with_its_source() -> None:
    data = await priced("gpt-4o")
    assert data == {
        "model": "gpt-4o",
        "known": True,
        "source": f"genai-prices {VERSION}: openai/gpt-4o",
        "unit": "USD per 1M tokens",
        "rates": GPT_4O,
        "own_rates": ["input", "cached_input", "output"],
        "tiers": [],
        "per_1k_requests": None,
        "per_1k_web_searches": "10",
    }


async def test_long_context_tiers_are_shown() -> None:
    data = await priced("anthropic/claude-sonnet-4-5")
    assert data["source"] == f"genai-prices {VERSION}: anthropic/claude-sonnet-4-5"
    assert data["rates"] == SONNET_4_5
    assert data["tiers"] == [{"above_input_tokens": 200_000, "rates": SONNET_4_5_LONG}]
    text = await rk("prices", "claude-sonnet-4-5")
    lines = text.stdout.decode().splitlines()
    assert lines[0] == f"claude-sonnet-4-5: USD per 1M tokens, from genai-prices {VERSION}: anthropic/claude-sonnet-4-5"
    assert "above 200,000 input tokens" in lines[1]
    assert lines[2].split() == ["input", "$3.00", "$6.00"]
    assert lines[3].split() == ["cached", "input", "$0.30", "$0.60"]
    assert lines[4].split() == ["cache", "write", "(5m)", "$3.75", "$7.50"]
    assert lines[5].split() == ["cache", "write", "(1h)", "$6.00", "$12.00"]
    assert lines[6].split() == ["output", "$15.00", "$22.50"]


async def test_the_text_says_which_rates_fall_back() -> None:
    done = await rk("prices", "gpt-4o")
    out = done.stdout.decode()
    assert done.status == 0 and done.stderr == ""
    assert f"gpt-4o: USD per 1M tokens, from genai-prices {VERSION}: openai/gpt-4o" in out
    rows = {line[:20].strip(): line[20:].split() for line in out.splitlines()[1:]}
    assert rows["input"] == ["$2.50"] and rows["cached input"] == ["$1.25"] and rows["output"] == ["$10.00"]
    assert " ".join(rows["cache write (5m)"]) == "$2.50 (no rate of its own: charged as input)"
    assert rows["web searches"] == ["$10.00", "per", "1,000"]


async def test_models_are_matched_as_served() -> None:
    snapshot = await priced("openai/gpt-4o-2024-08-06")
    assert snapshot["rates"] == GPT_4O


async def test_a_model_known_only_on_one_providers_api_is_priced_as_rk_run_would() -> None:
    data = await priced("text-embedding-3-small")  # genai-prices finds it only with the provider's hint
    assert data["source"] == f"genai-prices {VERSION}: openai/text-embedding-3-small"
    assert data["rates"]["input"] == "0.02"  # type: ignore[index]
    bad = await rk("prices", "gpt-4o", "--provider", "azure")
    assert bad.status == 2 and "'azure' is not one of openai, anthropic" in bad.stderr


async def test_a_price_flag_wins_over_genai_prices() -> None:
    data = await priced("gpt-4o-2024-08-06", "--price", "gpt-4o=100:200")
    assert data["source"] == "--price"
    assert data["own_rates"] == ["input", "output"]
    assert data["rates"] == {
        "input": "100",
        "cached_input": "100",  # no cached rate given: cached input is charged as input
        "cache_write": "100",
        "cache_write_1h": "100",
        "output": "200",
        "input_audio": "100",
        "output_audio": "200",
    }


async def test_the_source_names_the_variable_or_config_file_a_price_came_from(tmp_path: Path) -> None:
    from_env = await priced("my-model", env={"RK_PRICE": "my-model=1:2:0.5"})
    assert from_env["source"] == "RK_PRICE" and from_env["own_rates"] == ["input", "cached_input", "output"]
    (tmp_path / "rk.toml").write_text('[prices]\n"my-model" = "3:4"\n')
    from_file = await priced("my-model")
    assert from_file["source"] == f"[prices] in {tmp_path / 'rk.toml'}"
    assert (await priced("my-model", env={"RK_PRICE": "my-model=1:2"}))["source"] == "RK_PRICE"


async def test_prices_toml_is_found_here_else_in_the_user_config_dir(tmp_path: Path, user_config_dir: Path) -> None:
    user_config_dir.mkdir()
    (user_config_dir / "prices.toml").write_text('[models."my-finetune"]\ninput = 7\noutput = 8\n')
    from_user = await priced("my-finetune")
    assert from_user["source"] == f"prices.toml ({user_config_dir / 'prices.toml'})"
    assert from_user["rates"]["input"] == "7"  # type: ignore[index]
    (tmp_path / "prices.toml").write_text(MY_FINETUNE)
    here = await priced("my-finetune")
    assert here["source"] == f"prices.toml ({tmp_path / 'prices.toml'})"
    assert here["own_rates"] == ["input", "cached_input", "output"]
    assert (here["rates"]["input"], here["rates"]["cached_input"], here["rates"]["output"]) == ("2.5", "1.25", "10")  # type: ignore[index]


async def test_a_named_prices_file_replaces_the_search(tmp_path: Path) -> None:
    (tmp_path / "prices.toml").write_text(MY_FINETUNE)
    (tmp_path / "ci.toml").write_text('[models."other"]\ninput = 1\noutput = 1\n')
    for args, env in ((["--prices", "ci.toml"], None), ([], {"RK_PRICES": str(tmp_path / "ci.toml")})):
        assert (await priced("other", *args, env=env))["source"] == f"ci.toml ({tmp_path / 'ci.toml'})"
        unknown = await rk("prices", "my-finetune", *args, env=env)
        assert unknown.status == 1
    (tmp_path / "rk.toml").write_text('prices_file = "ci.toml"\n')
    assert (await priced("other"))["source"] == f"ci.toml ({tmp_path / 'ci.toml'})"


async def test_price_flags_win_over_prices_toml_which_wins_over_genai_prices(tmp_path: Path) -> None:
    (tmp_path / "prices.toml").write_text('[models."gpt-4o"]\ninput = 5\noutput = 6\n')
    assert (await priced("gpt-4o"))["rates"]["input"] == "5"  # type: ignore[index]
    assert (await priced("gpt-4o", "--price", "gpt-4o=9:9"))["source"] == "--price"
    assert (await priced("gpt-4o-mini"))["source"] == f"genai-prices {VERSION}: openai/gpt-4o-mini"


@pytest.mark.parametrize("as_json", [False, True])
async def test_an_unknown_model_is_an_error_that_says_how_to_price_it(as_json: bool) -> None:
    done = await rk("prices", "no-such-model-xyz", *(["--json"] if as_json else []))
    assert done.status == 1
    message = done.stderr.strip()
    assert "\n" not in message and "Traceback" not in message
    assert message.startswith("rk: no price is known for model 'no-such-model-xyz'")
    assert "--price no-such-model-xyz=IN:OUT[:CACHED_IN]" in message
    assert '[models."no-such-model-xyz"]' in message and "prices.toml" in message and "--allow-unpriced" in message
    if as_json:
        assert json.loads(done.stdout) == {"model": "no-such-model-xyz", "known": False}
    else:
        assert done.stdout == b""


async def test_bare_rk_prices_shows_the_data_version_and_the_overrides_in_effect(tmp_path: Path) -> None:
    nothing = await rk("prices")
    text = nothing.stdout.decode()
    assert nothing.status == 0 and f"genai-prices {VERSION}" in text and "overrides: none" in text
    (tmp_path / "prices.toml").write_text(MY_FINETUNE)
    listed = await rk("prices", "--price", "gpt-4o=1:2")
    lines = listed.stdout.decode().splitlines()
    assert f"prices file: {tmp_path / 'prices.toml'}" in lines
    flag_line = next(line for line in lines if line.strip().startswith("gpt-4o"))
    assert "input $1.00, output $2.00" in flag_line and flag_line.endswith("from --price")
    assert any(line.strip().startswith("my-finetune") and "cached input $1.25" in line for line in lines)
    data = await priced("--price", "gpt-4o=1:2")
    assert data["genai_prices"] == VERSION and data["prices_file"] == str(tmp_path / "prices.toml")
    overrides = data["overrides"]
    assert isinstance(overrides, list)
    assert [(o["model"], o["source"]) for o in overrides] == [
        ("gpt-4o", "--price"),
        ("my-finetune", f"prices.toml ({tmp_path / 'prices.toml'})"),
    ]


# Each a prices.toml that must stop rk, and what the one-line error must say.
BAD_PRICES = [
    pytest.param('[models."m"]\ninput = 1\noutput = \n', "not valid TOML", id="malformed"),
    pytest.param('[models."m"]\ninput = -1\noutput = 2\n', "input = -1: must be zero or more", id="negative"),
    pytest.param(
        '[models."m"]\ninput = 1\noutput = 2\ncahced_input = 1\n', "unknown rate 'cahced_input'", id="unknown-field"
    ),
    pytest.param('[models."m"]\ninput = "1.00"\noutput = 2\n', "input = '1.00': expected a number", id="string"),
    pytest.param('[models."m"]\ninput = true\noutput = 2\n', "input = true: expected a number", id="boolean"),
    pytest.param('[models."m"]\ninput = nan\noutput = 2\n', "must be zero or more", id="nan"),
    pytest.param('[models."m"]\ninput = 1\n', "output is missing", id="missing-output"),
    pytest.param('[modles."m"]\ninput = 1\noutput = 2\n', "unknown section 'modles'", id="unknown-section"),
    pytest.param("[models]\nm = 1\n", "expected a table of rates", id="not-a-table"),
    pytest.param(
        '[models."M"]\ninput = 1\noutput = 2\n[models."openai/m"]\ninput = 1\noutput = 2\n',
        "priced twice",
        id="duplicate",
    ),
]


@pytest.mark.parametrize(("text", "says"), BAD_PRICES)
async def test_a_bad_prices_file_stops_rk_run_with_one_line(tmp_path: Path, text: str, says: str) -> None:
    (tmp_path / "prices.toml").write_text(text)
    marker = tmp_path / "ran"
    done = await rk("run", "--mock", "--", PY, "-c", f"open({str(marker)!r}, 'w')")
    assert done.status == 125, done.stderr
    message = done.stderr.strip()
    assert "\n" not in message and "Traceback" not in message
    assert message.startswith("rk: prices file prices.toml: ") and says in message
    assert not marker.exists()  # stopped before the command started
    shown = await rk("prices", "gpt-4o")
    assert shown.status == 125 and shown.stderr == done.stderr


async def test_a_named_prices_file_that_does_not_exist_stops_rk(tmp_path: Path) -> None:
    done = await rk("run", "--prices", "nope.toml", "--", PY, "-c", "pass")
    assert done.status == 125
    assert done.stderr.strip() == "rk: prices file nope.toml (named by --prices): no such file"
    from_env = await rk("prices", env={"RK_PRICES": "nope.toml"})
    assert from_env.status == 125 and "(named by RK_PRICES)" in from_env.stderr


CALL_MY_FINETUNE = """
try:
    client.chat.completions.create(model="my-finetune", messages=[{"role": "user", "content": "hello " * 50}])
    print("ok")
except openai.APIStatusError as exc:
    print(exc.status_code, exc.code)
"""


async def test_a_prices_toml_model_is_charged_its_rates_under_rk_run(tmp_path: Path) -> None:
    script = agent_script(tmp_path, CALL_MY_FINETUNE)
    unpriced = await rk("run", "--mock", "--quiet", "--", PY, script)
    assert unpriced.stdout.decode().strip() == "402 unpriced_model"

    (tmp_path / "prices.toml").write_text(MY_FINETUNE)
    summary = tmp_path / "summary.json"
    done = await rk("run", "--mock", "--quiet", "--json", str(summary), "--", PY, script)
    assert done.status == 0 and done.stdout.decode().strip() == "ok", done.stderr
    (call,) = json.loads(summary.read_text())["calls"]
    assert call["requested_model"] == "my-finetune" and call["input_tokens"] > 50 and call["output_tokens"] > 0
    plain = call["input_tokens"] - call["cached_input_tokens"]
    expected = (
        plain * Decimal("2.50") + call["cached_input_tokens"] * Decimal("1.25") + call["output_tokens"] * Decimal(10)
    ) / 1_000_000
    assert Decimal(call["cost_usd"]) == expected
    # and `rk prices` names the very rates the run charged
    rates = (await priced("my-finetune"))["rates"]
    assert rates["input"] == "2.5" and rates["output"] == "10"  # type: ignore[index]

    flagged = await rk(
        "run", "--mock", "--quiet", "--price", "my-finetune=1:1", "--json", str(summary), "--", PY, script
    )
    assert flagged.status == 0
    (call,) = json.loads(summary.read_text())["calls"]
    assert Decimal(call["cost_usd"]) == Decimal(call["input_tokens"] + call["output_tokens"]) / 1_000_000
