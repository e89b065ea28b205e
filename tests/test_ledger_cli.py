"""`rk ledger list | show | export | summary` as real subprocesses, over a ledger written through rk's own
write path: output checked through `--json` and through normalised text."""

from __future__ import annotations

import csv
import io
import json
import re
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest

from riskkernel import paths
from riskkernel.ledger import store
from riskkernel.ledger.store import Ledger
from riskkernel.models import Budget, CallRecord, Flag, RunRecord, RunStatus, Usage, iso
from tests.conftest import HALF_DOLLAR_BUDGET, rk

NOW = datetime.now(UTC)


def ago(**delta: float) -> str:
    return iso((NOW - timedelta(**delta)).timestamp())


def call(run_id: str, seq: int, model: str, cost: str, when: str, **kw: object) -> CallRecord:
    fields: dict[str, object] = {
        "endpoint": "/v1/chat/completions",
        "provider": "openai",
        "requested_model": model,
        "model": model,
        "stream": False,
        "status": 200,
        "usage": Usage(input_tokens=1000 * seq, cached_input_tokens=100, output_tokens=10 * seq),
        "cost": Decimal(cost),
        "price_source": "test",
        "latency_ms": 5.0,
    }
    return CallRecord(run_id=run_id, seq=seq, started_at=when, **{**fields, **kw})  # type: ignore[arg-type]


ALPHA, BETA, GAMMA = "aaaa1111" + "0" * 24, "bbbb2222" + "0" * 24, "cccc3333" + "0" * 24


@pytest.fixture
def ledger(rk_home: Path) -> dict[str, list[CallRecord]]:
    """Three runs: alpha (completed, 2 days ago, team=search env=ci), beta (halted, 10 days ago, team=ads),
    gamma (still running, owned by this live process, no tags)."""
    runs = [
        (ALPHA, "alpha", ago(days=2), RunStatus.COMPLETED, None, {"team": "search", "env": "ci"}),
        (BETA, "beta", ago(days=10), RunStatus.HALTED, "cost_budget_exceeded", {"team": "ads"}),
        (GAMMA, None, ago(minutes=5), RunStatus.RUNNING, None, {}),
    ]
    calls = {
        ALPHA: [
            call(ALPHA, 1, "gpt-4o", "0.001000000001", ago(days=2)),
            call(ALPHA, 2, "claude-sonnet-4-5", "0.0105", ago(days=2), provider="anthropic", endpoint="/v1/messages"),
            call(ALPHA, 3, "gpt-4o", "0.002", ago(days=1, hours=23)),
            call(ALPHA, 4, "gpt-4o", "0", ago(days=1, hours=23), status=402, flags=(Flag.REFUSED,), usage=Usage()),
        ],
        BETA: [
            call(BETA, 1, "gpt-4o-mini", "0.0003", ago(days=10), flags=(Flag.ESTIMATED,)),
            call(BETA, 2, "gpt-4o", "0.51", ago(days=9, hours=23)),
        ],
        GAMMA: [call(GAMMA, 1, "gpt-4o", "0.003", ago(minutes=4), stream=True)],
    }
    writer = Ledger.open(paths.ledger_path())
    try:
        for run_id, name, started, status, halt, tags in runs:
            record = RunRecord(
                run_id=run_id,
                name=name,
                command=("python", f"{name or 'gamma'}.py"),
                cwd="/work",
                started_at=started,
                budget=Budget(max_cost=Decimal("0.50")),
                tags=tags,
                owner=store.owner_id(),
            )
            writer.submit(store.insert_run(record)).result()
            for row in calls[run_id]:
                writer.submit(store.insert_call(row)).result()
            if status is not RunStatus.RUNNING:
                writer.submit(store.finish_run(run_id, status, halt, 3 if halt else 0)).result()
    finally:
        writer.close()
    return calls


def counted(rows: list[CallRecord]) -> list[CallRecord]:
    return [r for r in rows if Flag.REFUSED not in r.flags]


def words(text: str) -> str:
    """Text without styling, its runs of whitespace and box lines made single spaces, for comparing."""
    return re.sub(r"[\s─━│╭╮╰╯]+", " ", re.sub(r"\x1b\[[0-9;]*m", "", text)).strip()


TERMINAL = {"TTY_COMPATIBLE": "1", "TTY_INTERACTIVE": "0", "NO_COLOR": "1", "COLUMNS": "140"}


async def ids(*args: str) -> list[str]:
    done = await rk("ledger", "list", "--json", *args)
    assert done.status == 0, done.stderr
    return [run["run_id"] for run in json.loads(done.stdout)]


async def test_list_filters_by_status_tag_and_time(ledger: dict[str, list[CallRecord]]) -> None:
    assert await ids() == [GAMMA, ALPHA, BETA]
    assert await ids("--limit", "2") == [GAMMA, ALPHA]
    assert await ids("--status", "halted") == [BETA]
    assert await ids("--status", "halted", "--status", "running") == [GAMMA, BETA]
    assert await ids("--tag", "team=search") == [ALPHA]
    assert await ids("--tag", "team=search", "--tag", "env=dev") == []
    assert await ids("--since", "7d") == [GAMMA, ALPHA]
    assert await ids("--since", "1h") == [GAMMA]
    assert await ids("--since", ago(days=3)[:10]) == [GAMMA, ALPHA]
    bad = await rk("ledger", "list", "--status", "done")
    assert bad.status == 2 and "use one of running, completed, halted, interrupted" in words(bad.stderr)
    bad = await rk("ledger", "list", "--since", "yesterday")
    assert bad.status == 2 and "expected a duration like 30m" in words(bad.stderr)


async def test_list_json_has_the_totals_of_counted_calls(ledger: dict[str, list[CallRecord]]) -> None:
    done = await rk("ledger", "list", "--json")
    runs = {run["run_id"]: run for run in json.loads(done.stdout)}
    for run_id, rows in ledger.items():
        totals = runs[run_id]["totals"]
        assert totals["calls"] == len(counted(rows))
        assert Decimal(totals["cost_usd"]) == sum(r.cost for r in counted(rows))
        assert "calls" not in runs[run_id]
    assert runs[BETA]["status"] == "halted" and runs[BETA]["halt_reason"] == "cost_budget_exceeded"
    assert runs[GAMMA]["status"] == "running" and runs[ALPHA]["tags"] == {"team": "search", "env": "ci"}


async def test_list_text_piped_and_on_a_terminal(ledger: dict[str, list[CallRecord]]) -> None:
    piped = [line.split("\t") for line in (await rk("ledger", "list")).stdout.decode().splitlines()]
    assert [(f[0], f[1], f[2], f[3]) for f in piped] == [
        (GAMMA, ago(minutes=5), "running", "-"),
        (ALPHA, ago(days=2), "completed", "-"),
        (BETA, ago(days=10), "halted", "cost_budget_exceeded"),
    ]
    assert piped[1][4:] == ["3", "0.013500000001", "alpha"]  # exact money, for sort and awk
    shown = words((await rk("ledger", "list", env=TERMINAL)).stdout.decode())
    assert shown.startswith("run started status calls cost command")
    assert f"{ALPHA[:12]} {ago(days=2)[:10]}" in shown
    assert "halted: cost_budget_exceeded 2 $0.5103 beta" in shown
    empty = await rk("ledger", "list", "--tag", "team=nobody", env=TERMINAL)
    assert words(empty.stdout.decode()) == "No runs match."


async def test_show_json_is_the_run_with_every_call(ledger: dict[str, list[CallRecord]]) -> None:
    done = await rk("ledger", "show", "aaaa", "--json")
    data = json.loads(done.stdout)
    assert data["run_id"] == ALPHA and data["name"] == "alpha" and data["status"] == "completed"
    assert data["budget"] == HALF_DOLLAR_BUDGET
    assert data["totals"]["cost_usd"] == "0.013500000001" and data["totals"]["calls"] == 3
    assert [c["seq"] for c in data["calls"]] == [1, 2, 3, 4]
    assert data["calls"][3]["flags"] == ["refused"] and data["calls"][3]["status"] == 402
    assert data["calls"][0] == {**ledger[ALPHA][0].to_json()}
    empty_run = await rk("ledger", "show", GAMMA, "--json")
    assert len(json.loads(empty_run.stdout)["calls"]) == 1


async def test_show_text_has_the_cost_table_and_the_calls(ledger: dict[str, list[CallRecord]]) -> None:
    for env in ({}, TERMINAL):
        text = (await rk("ledger", "show", "bbbb", env=env)).stdout.decode()
        flat = words(text)
        assert f"rk · run {BETA[:8]} · halted: cost_budget_exceeded" in flat
        assert "gpt-4o 1 2,000 100 20 $0.5100" in flat and "gpt-4o-mini 1 1,000 100 10 ~$0.0003" in flat
        assert "total 2 3,000 200 30 $0.5103" in flat
        assert "~ some usage was estimated" in flat
        assert re.search(r"budget cost █{20} \$0\.5103 of \$0\.50 102%", flat)
        lines = text.splitlines()
        if env:
            assert "seq model stream status input cached output cost reserved ms flags" in flat
            assert "1 gpt-4o-mini 200 1,000 100 10 $0.0003 5 estimated" in flat
        else:  # piped: the calls tab-separated
            assert "1\tgpt-4o-mini\t\t200\t1,000\t100\t10\t$0.0003\t\t5\testimated" in lines
    narrow = await rk("ledger", "show", "bbbb", env={**TERMINAL, "COLUMNS": "60"})
    first = narrow.stdout.decode().splitlines()[0]
    assert (
        words(first)
        == f"rk {BETA[:8]} · halted: cost_budget_exceeded · 2 calls · $0.5103 of $0.50 · exit 3 · ~estimated"
    )
    missing = await rk("ledger", "show", "zz")
    assert missing.status == 1 and missing.stderr.strip() == "rk: no run with id 'zz'"


async def test_export_csv_and_jsonl_have_a_row_per_call_summing_to_the_totals(
    ledger: dict[str, list[CallRecord]], tmp_path: Path
) -> None:
    every = [row for rows in ledger.values() for row in rows]
    done = await rk("ledger", "export", "--format", "csv", "-o", str(tmp_path / "calls.csv"))
    assert done.status == 0 and "exported 7 calls" in done.stderr
    rows = list(csv.DictReader(io.StringIO((tmp_path / "calls.csv").read_text())))
    assert len(rows) == len(every)
    assert [r["run_id"] for r in rows] == [BETA] * 2 + [ALPHA] * 4 + [GAMMA]  # oldest run first
    totals = json.loads((await rk("ledger", "list", "--json")).stdout)
    for run in totals:
        mine = [r for r in rows if r["run_id"] == run["run_id"] and "refused" not in r["flags"].split(";")]
        assert sum(Decimal(r["cost_usd"]) for r in mine) == Decimal(run["totals"]["cost_usd"])
        assert sum(int(r["input_tokens"]) for r in mine) == run["totals"]["input_tokens"]
    assert rows[0]["flags"] == "estimated" and rows[0]["stream"] == "false" and rows[0]["ttfb_ms"] == ""

    lines = (await rk("ledger", "export", "--format", "jsonl")).stdout.decode().splitlines()
    assert [json.loads(line) for line in lines] == [{"run_id": r.run_id, **r.to_json()} for r in _in_order(ledger)]


def _in_order(ledger: dict[str, list[CallRecord]]) -> list[CallRecord]:
    return ledger[BETA] + ledger[ALPHA] + ledger[GAMMA]


async def test_export_json_is_the_runs_as_show_gives_them(ledger: dict[str, list[CallRecord]]) -> None:
    exported = json.loads((await rk("ledger", "export", "cccc", "aaaa")).stdout)
    shown = [json.loads((await rk("ledger", "show", run_id, "--json")).stdout) for run_id in (GAMMA, ALPHA)]
    assert exported == shown
    since = json.loads((await rk("ledger", "export", "--since", "7d", "--status", "completed")).stdout)
    assert [run["run_id"] for run in since] == [ALPHA]
    both = await rk("ledger", "export", "aaaa", "--since", "7d")
    assert both.status == 2 and "not both" in words(both.stderr)
    bad = await rk("ledger", "export", "--format", "xml")
    assert bad.status == 2 and "use one of json, jsonl, csv" in words(bad.stderr)


async def test_summary_rolls_spend_up_exactly(ledger: dict[str, list[CallRecord]]) -> None:
    every = counted([row for rows in ledger.values() for row in rows])
    by_model = json.loads((await rk("ledger", "summary", "--by", "model", "--json")).stdout)
    expected: dict[str, Decimal] = {}
    for row in every:
        expected[row.model or ""] = expected.get(row.model or "", Decimal(0)) + row.cost
    assert {r["model"]: Decimal(r["cost_usd"]) for r in by_model["rows"]} == expected
    assert [r["model"] for r in by_model["rows"]] == ["gpt-4o", "claude-sonnet-4-5", "gpt-4o-mini"]  # biggest first
    gpt = by_model["rows"][0]
    assert gpt["runs"] == 3 and gpt["calls"] == 4 and gpt["input_tokens"] == 1000 + 3000 + 2000 + 1000
    assert by_model["totals"]["cost_usd"] == "0.526800000001"  # exact: no float on the way
    assert by_model["totals"]["calls"] == len(every)

    by_day = json.loads((await rk("ledger", "summary", "--by", "day", "--json")).stdout)["rows"]
    assert [r["day"] for r in by_day] == sorted({row.started_at[:10] for row in every})
    assert sum(Decimal(r["cost_usd"]) for r in by_day) == sum(row.cost for row in every)

    by_team = json.loads((await rk("ledger", "summary", "--by", "tag:team", "--json")).stdout)["rows"]
    assert {r["tag:team"]: r["cost_usd"] for r in by_team} == {
        "ads": "0.5103",
        "search": "0.013500000001",
        "(none)": "0.0030",
    }
    recent = json.loads((await rk("ledger", "summary", "--since", "7d", "--json")).stdout)
    assert recent["totals"]["cost_usd"] == "0.016500000001" and recent["since"] is not None

    # A time in the middle of a day: that day's calls are counted from the cutoff on, exactly.
    cutoff = ago(days=1, hours=23, minutes=30)
    exact = json.loads((await rk("ledger", "summary", "--since", cutoff, "--json")).stdout)
    assert exact["since"] == cutoff
    assert exact["totals"]["calls"] == 2 and exact["totals"]["cost_usd"] == "0.0050"  # alpha's 3rd, gamma's

    text = words((await rk("ledger", "summary", "--by", "tag:team", env=TERMINAL)).stdout.decode())
    assert text.startswith("team runs calls input cached output cost ads 1 2 3,000 200 30 $0.5103")
    assert text.endswith("total 6 10,000 600 100 $0.5268")
    bad = await rk("ledger", "summary", "--by", "week")
    assert bad.status == 2 and "use model, day or tag:KEY" in words(bad.stderr)


async def test_an_empty_ledger_answers_every_command(rk_home: Path) -> None:
    assert json.loads((await rk("ledger", "list", "--json")).stdout) == []
    assert (await rk("ledger", "list")).stdout == b""
    assert words((await rk("ledger", env=TERMINAL)).stdout.decode()).startswith("No runs yet.")
    assert json.loads((await rk("ledger", "export")).stdout) == []
    assert (await rk("ledger", "export", "-f", "csv")).stdout.decode().startswith("run_id,seq,started_at,")
    summary = json.loads((await rk("ledger", "summary", "--json")).stdout)
    assert summary["rows"] == [] and summary["totals"]["cost_usd"] == "0.0000"
