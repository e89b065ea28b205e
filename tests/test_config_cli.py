"""Settings precedence (flag > env > file > default) through a real `rk run` and through `rk config show`,
which config file is read, and the starter file `rk config init` writes."""

import json
import re
import sys
from pathlib import Path
from typing import Any

import pytest
import typer.main

from riskkernel.cli import app
from riskkernel.config import ENV, load_file
from tests.conftest import rk

PY = sys.executable


@pytest.fixture(autouse=True)
def user_config_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A user config dir of the test's own: a real one must not change the settings here."""
    path = tmp_path / "user-config"
    monkeypatch.setenv("RK_CONFIG_DIR", str(path))
    return path


FILE = 'max_cost = 2\nmax_time = "15m"\nmax_calls = 11\n'
ENV_VARS = {"RK_MAX_COST": "3", "RK_MAX_TIME": "20m"}
FLAGS = ["--max-cost", "4", "--max-time", "25m"]

# Each level adds its source on top of the ones before it; max_calls is only ever set in the file.
LEVELS = [
    pytest.param(False, {}, [], ("5.00", None, None), ("default", "default", "default"), id="default"),
    pytest.param(True, {}, [], ("2", 900.0, 11), ("file", "file", "file"), id="file"),
    pytest.param(True, ENV_VARS, [], ("3", 1200.0, 11), ("env", "env", "file"), id="env-over-file"),
    pytest.param(True, ENV_VARS, FLAGS, ("4", 1500.0, 11), ("flag", "flag", "file"), id="flag-over-env"),
]


@pytest.mark.parametrize(("file", "env", "flags", "budget", "sources"), LEVELS)
async def test_precedence_in_the_budget_of_a_real_run(
    tmp_path: Path, file: bool, env: dict[str, str], flags: list[str], budget: tuple[Any, ...], sources: Any
) -> None:
    if file:
        (tmp_path / "rk.toml").write_text(FILE)
    out = tmp_path / "summary.json"
    done = await rk("run", "--mock", "--quiet", "--json", str(out), *flags, "--", PY, "-c", "pass", env=env)
    assert done.status == 0, done.stderr
    got = json.loads(out.read_text())["budget"]
    assert (got["max_cost_usd"], got["max_time_s"], got["max_calls"]) == budget


@pytest.mark.parametrize(("file", "env", "flags", "budget", "sources"), LEVELS)
async def test_precedence_in_config_show(
    tmp_path: Path, file: bool, env: dict[str, str], flags: list[str], budget: tuple[Any, ...], sources: Any
) -> None:
    if file:
        (tmp_path / "rk.toml").write_text(FILE)
    done = await rk("config", "show", "--json", *flags, env=env)
    assert done.status == 0, done.stderr
    shown = json.loads(done.stdout)
    settings = shown["settings"]
    assert shown["config_file"] == (str(tmp_path / "rk.toml") if file else None)
    assert [settings[k]["source"] for k in ("max_cost", "max_time", "max_calls")] == list(sources)
    origins = {
        "default": None,
        "file": str(tmp_path / "rk.toml"),
        "env": {"max_cost": "RK_MAX_COST", "max_time": "RK_MAX_TIME"},
        "flag": {"max_cost": "--max-cost", "max_time": "--max-time"},
    }
    for key, source in zip(("max_cost", "max_time", "max_calls"), sources, strict=True):
        origin = origins[source]
        assert settings[key]["from"] == (origin[key] if isinstance(origin, dict) else origin)
    values = {"default": ("5.00", "unlimited", "unlimited"), "file": ("2", "15m", "11")}
    values["env"] = ("3", "20m", "11")
    values["flag"] = ("4", "25m", "11")
    assert tuple(settings[k]["value"] for k in ("max_cost", "max_time", "max_calls")) == values[sources[0]]


async def test_config_show_lists_every_setting_with_its_source(tmp_path: Path) -> None:
    (tmp_path / "rk.toml").write_text('on_halt = "terminate"\nmock = true\n[tags]\nteam = "search"\n')
    done = await rk("config", "show", "--grace", "3", env={"RK_NAME": "nightly"})
    assert done.status == 0, done.stderr
    lines = done.stdout.decode().splitlines()
    assert lines[0] == f"config file: {tmp_path / 'rk.toml'}"
    rows = {line.split()[0]: line.split()[1:] for line in lines[2:]}
    assert list(rows) == list(ENV)
    assert rows["on_halt"] == ["terminate", "file"] and rows["mock"] == ["true", "file"]
    assert rows["tag"] == ["team=search", "file"]
    assert rows["grace"] == ["3.0", "flag", "--grace"]
    assert rows["name"] == ["nightly", "env", "RK_NAME"]
    assert rows["max_cost"] == ["5.00", "default"] and rows["price"] == ["-", "default"]


async def test_config_show_takes_only_run_options() -> None:
    done = await rk("config", "show", "--max-cots", "1")
    assert done.status == 2 and "No such option: --max-cots" in done.stderr


async def test_the_user_config_file_is_read_when_there_is_no_rk_toml(tmp_path: Path, user_config_dir: Path) -> None:
    user_config_dir.mkdir()
    (user_config_dir / "config.toml").write_text("max_calls = 7\nmax_tokens = 1000\n")
    shown = json.loads((await rk("config", "show", "--json")).stdout)
    assert shown["config_file"] == str(user_config_dir / "config.toml")
    assert shown["settings"]["max_calls"] == {
        "value": "7",
        "source": "file",
        "from": str(user_config_dir / "config.toml"),
    }
    (tmp_path / "rk.toml").write_text("max_calls = 8\n")  # the local file wins whole: files are not merged
    shown = json.loads((await rk("config", "show", "--json")).stdout)
    assert shown["settings"]["max_calls"]["value"] == "8"
    assert shown["settings"]["max_tokens"] == {"value": "unlimited", "source": "default", "from": None}


async def test_a_prices_file_named_in_a_config_file_is_relative_to_it(tmp_path: Path, user_config_dir: Path) -> None:
    user_config_dir.mkdir()
    (user_config_dir / "config.toml").write_text('prices_file = "team-prices.toml"\n')
    shown = json.loads((await rk("config", "show", "--json")).stdout)
    assert shown["settings"]["prices_file"]["value"] == str(user_config_dir / "team-prices.toml")
    (tmp_path / "prices.toml").write_text('[models."m"]\ninput = 1\noutput = 2\n')
    found = json.loads((await rk("config", "show", "--json", "--prices", "prices.toml")).stdout)
    assert found["settings"]["prices_file"] == {"value": "prices.toml", "source": "flag", "from": "--prices"}


async def test_a_prices_toml_found_by_search_is_shown(tmp_path: Path) -> None:
    (tmp_path / "prices.toml").write_text('[models."m"]\ninput = 1\noutput = 2\n')
    shown = json.loads((await rk("config", "show", "--json")).stdout)
    assert shown["settings"]["prices_file"] == {
        "value": str(tmp_path / "prices.toml"),
        "source": "default",
        "from": "found",
    }


async def test_a_bad_config_file_stops_config_show_with_one_line(tmp_path: Path) -> None:
    (tmp_path / "rk.toml").write_text("max_cots = 1\n")
    done = await rk("config", "show")
    assert done.status == 125
    assert "rk.toml: unknown setting 'max_cots'" in done.stderr and done.stderr.count("\n") == 1


def uncommented(text: str) -> str:
    """The file with every commented-out setting and table switched on, and the prose left alone."""
    return re.sub(r"^# (?=\[\w+\]$|[\w-]+ = |\"[^\"]+\" = )", "", text, flags=re.MULTILINE)


async def test_config_init_writes_a_commented_file_with_every_setting(tmp_path: Path) -> None:
    done = await rk("config", "init")
    assert done.status == 0, done.stderr
    path = tmp_path / "rk.toml"
    text = path.read_text()
    assert load_file(path) == {"run": {}, "serve": {}, "prices": {}}  # every setting commented out at its default
    switched_on = tmp_path / "on.toml"
    switched_on.write_text(uncommented(text))
    settings = load_file(switched_on)["run"]
    assert sorted(settings) == sorted(ENV)  # every setting is there, each with a value rk accepts
    assert settings["max_cost"] == "5.00" and settings["on_halt"] == "block" and settings["grace"] == "10.0"
    assert settings["openai_upstream"] == "https://api.openai.com/v1"
    assert settings["price"] == ["my-finetune=2.50:10.00:1.25"] and settings["tag"] == ["team=search"]
    prose = " ".join(line[2:] for line in text.splitlines() if line.startswith("# "))
    assert (
        "USD for the whole run; 0 = no paid call may be made; 'unlimited' to disable. (--max-cost, RK_MAX_COST)"
        in prose
    )
    (tmp_path / "rk.toml").write_text(uncommented(text))
    (tmp_path / "prices.toml").write_text("")  # the file the example names
    ran = await rk("run", "--quiet", "--", PY, "-c", "pass")  # rk run takes the file as written
    assert ran.status == 0, ran.stderr


async def test_config_init_writes_the_options_it_is_given(tmp_path: Path) -> None:
    flags = ["--max-cost", "1", "--max-calls", "100", "--on-halt", "terminate", "--mock", "--price", "m=1:2"]
    done = await rk("config", "init", *flags, "--tag", "team=evals")
    assert done.status == 0, done.stderr
    assert load_file(tmp_path / "rk.toml")["run"] == {
        "max_cost": "1",
        "max_calls": "100",
        "on_halt": "terminate",
        "mock": True,
        "price": ["m=1:2"],
        "tag": ["team=evals"],
    }
    shown = json.loads((await rk("config", "show", "--json")).stdout)["settings"]
    assert (shown["max_calls"]["value"], shown["max_calls"]["source"]) == ("100", "file")
    bad = await rk("config", "init", "--force", "--price", "m=cheap")
    assert bad.status == 125 and "--price 'm=cheap'" in bad.stderr


async def test_config_init_never_overwrites_without_force(tmp_path: Path) -> None:
    path = tmp_path / "rk.toml"
    path.write_text("max_cots = 1\n")  # broken: rk config init --force must still be able to replace it
    done = await rk("config", "init")
    assert done.status == 1
    assert done.stderr.strip() == f"rk: {path} already exists; pass --force to overwrite it"
    assert path.read_text() == "max_cots = 1\n"
    forced = await rk("config", "init", "--force")
    assert forced.status == 0 and load_file(path) == {"run": {}, "serve": {}, "prices": {}}


async def test_config_init_user_writes_the_user_config_file(tmp_path: Path, user_config_dir: Path) -> None:
    done = await rk("config", "init", "--user", "--max-calls", "9")
    assert done.status == 0, done.stderr
    assert not (tmp_path / "rk.toml").exists()
    assert load_file(user_config_dir / "config.toml")["run"] == {"max_calls": "9"}
    again = await rk("config", "init", "--user")
    assert again.status == 1 and "already exists" in again.stderr


def test_every_setting_is_an_option_of_rk_run_with_its_variable() -> None:
    root = typer.main.get_command(app)
    ctx = typer.Context(root)
    run = root.get_command(ctx, "run")  # type: ignore[attr-defined]
    options = {param.name: param for param in run.params}
    for key, variable in ENV.items():
        assert options[key].envvar == variable, key
