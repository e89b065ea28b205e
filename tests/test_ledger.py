import json
import os
import sqlite3
import stat
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest

from riskkernel.ledger import store
from riskkernel.ledger.migrations import MIGRATIONS, migrate
from riskkernel.ledger.store import Ledger
from riskkernel.models import Budget, CallRecord, Flag, RunRecord, RunStatus, Usage, now_iso
from tests.conftest import HALF_DOLLAR_BUDGET

EXPECTED_SCHEMA = {
    "_migrations": ["name", "applied_at"],
    "runs": [
        "id",
        "name",
        "command",
        "cwd",
        "started_at",
        "ended_at",
        "budget",
        "status",
        "halt_reason",
        "exit_status",
        "tags",
        "owner",
        "calls",
        "input_tokens",
        "cached_input_tokens",
        "cache_write_tokens",
        "output_tokens",
        "reasoning_tokens",
        "cost_pusd",
    ],
    "calls": [
        "run_id",
        "seq",
        "started_at",
        "endpoint",
        "provider",
        "requested_model",
        "model",
        "stream",
        "status",
        "input_tokens",
        "cached_input_tokens",
        "cache_write_tokens",
        "cache_write_1h_tokens",
        "input_audio_tokens",
        "output_tokens",
        "reasoning_tokens",
        "output_audio_tokens",
        "web_searches",
        "cost_pusd",
        "price_source",
        "flags",
        "latency_ms",
        "ttfb_ms",
        "error",
        "cache_savings_pusd",
        "reserved_pusd",
        "output_limit",
    ],
    "call_rollups": [
        "run_id",
        "day",
        "model",
        "calls",
        "input_tokens",
        "cached_input_tokens",
        "cache_write_tokens",
        "output_tokens",
        "reasoning_tokens",
        "cost_pusd",
    ],
    "index": ["call_rollups_day", "runs_running", "runs_started_at"],
    "trigger": ["call_rollups_on_end", "call_rollups_on_resume"],
}


def schema(db: sqlite3.Connection) -> dict[str, list[str]]:
    tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
    found = {t: [c[1] for c in db.execute(f"PRAGMA table_info({t})")] for t in tables}
    for kind in ("index", "trigger"):
        rows = db.execute("SELECT name FROM sqlite_master WHERE type = ? AND sql IS NOT NULL ORDER BY name", (kind,))
        found[kind] = [r[0] for r in rows]
    return found


def test_migrating_an_empty_database_gives_the_expected_schema_once(tmp_path: Path) -> None:
    db = store.connect(tmp_path / "l.db")
    assert migrate(db) == [
        "m001_runs_and_calls",
        "m002_cache_savings",
        "m003_call_rollups",
        "m004_reservations",
        "m005_unended_runs",
    ]
    assert schema(db) == EXPECTED_SCHEMA
    assert migrate(db) == []
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_ledger_of_the_previous_schema_is_migrated_keeping_its_rows(tmp_path: Path) -> None:
    path = tmp_path / "l.db"
    db = store.connect(path)
    assert migrate(db, MIGRATIONS[:1]) == ["m001_runs_and_calls"]  # as the previous release left it
    db.execute(
        "INSERT INTO runs (id, command, cwd, started_at, budget, status, owner, calls, cost_pusd)"
        " VALUES ('old', '[\"a\"]', '/w', '2026-01-01T00:00:00.000Z', '{}', 'completed', NULL, 1, 7)"
    )
    columns = [c[1] for c in db.execute("PRAGMA table_info(calls)")]
    values = {c: 0 for c in columns} | {
        "run_id": "old",
        "seq": 1,
        "started_at": "2026-01-01T00:00:00.000Z",
        "endpoint": "/v1/chat/completions",
        "provider": "openai",
        "model": "gpt-4o",
        "flags": "",
        "cost_pusd": 7,
    }
    db.execute(
        f"INSERT INTO calls ({', '.join(values)}) VALUES ({', '.join('?' * len(values))})", list(values.values())
    )
    db.close()

    reader = store.open_reader(path)  # readers migrate too
    assert reader is not None and schema(reader) == EXPECTED_SCHEMA
    [old] = store.iter_calls(reader, "old")
    assert old.cost == Decimal("7e-12") and old.cache_savings == 0 and old.model == "gpt-4o"
    assert store.find_run(reader, "old").totals.cost == Decimal("7e-12")
    [line] = store.summary(reader, "model")  # from the rollup the migration filled in
    assert (line.key, line.runs, line.calls, line.cost) == ("gpt-4o", 1, 1, Decimal("7e-12"))
    assert reader.execute("SELECT count(*) FROM call_rollups").fetchone()[0] == 1
    assert migrate(reader) == []


def test_the_ledger_file_is_private(tmp_path: Path) -> None:
    path = tmp_path / "new" / "ledger.db"
    Ledger.open(path).close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


def run_record(run_id: str = "r1", owner: str | None = None) -> RunRecord:
    return RunRecord(
        run_id=run_id,
        name="n",
        command=("python", "a.py"),
        cwd="/w",
        started_at=now_iso(),
        budget=Budget(max_cost=Decimal("0.50")),
        tags={"team": "x"},
        owner=owner or store.owner_id(),
    )


def call(seq: int, cost: str = "0.001", flags: tuple[str, ...] = (), run_id: str = "r1") -> CallRecord:
    return CallRecord(
        run_id=run_id,
        seq=seq,
        started_at=now_iso(),
        endpoint="/v1/chat/completions",
        provider="openai",
        requested_model="gpt-4o",
        model="gpt-4o-2024-08-06",
        stream=True,
        status=200,
        usage=Usage(input_tokens=100, cached_input_tokens=10, output_tokens=20),
        cost=Decimal(cost),
        price_source="p",
        flags=flags,
        latency_ms=12.34,
        ttfb_ms=1.5,
    )


def test_runs_and_calls_round_trip_with_totals(tmp_path: Path) -> None:
    path = tmp_path / "l.db"
    ledger = Ledger.open(path)
    ledger.submit(store.insert_run(run_record())).result()
    for seq in (1, 2):
        ledger.submit(store.insert_call(call(seq, "0.000123456789"))).result()
    ledger.submit(store.insert_call(call(3, "0", flags=(Flag.REFUSED,)))).result()
    ledger.submit(store.finish_run("r1", RunStatus.HALTED, "cost_budget_exceeded", 3)).result()
    ledger.close()

    db = store.open_reader(path)
    assert db is not None
    run = store.find_run(db, "r")
    assert run.status == RunStatus.HALTED and run.exit_status == 3
    assert run.totals.calls == 2 and run.totals.cost == Decimal("0.000246913578")
    assert run.totals.usage.input_tokens == 200
    calls = list(store.iter_calls(db, "r1"))
    assert [c.seq for c in calls] == [1, 2, 3]
    assert calls[0].to_json()["cost_usd"] == "0.000123456789" and calls[2].flags == ("refused",)
    lines, held = store.model_breakdown(db, "r1")
    assert held == store.Held(refused=1) and [(line.model, line.calls) for line in lines] == [("gpt-4o-2024-08-06", 2)]
    data = run.to_json(calls)
    assert data["budget"] == HALF_DOLLAR_BUDGET
    assert data["totals"]["cost_usd"] == "0.000246913578"
    json.dumps(data)


def test_one_bad_write_does_not_lose_the_others(tmp_path: Path) -> None:
    ledger = Ledger.open(tmp_path / "l.db")
    ledger.submit(store.insert_run(run_record())).result()
    futures = [ledger.submit(store.insert_call(call(seq))) for seq in (1, 1, 2)]
    ledger.close()
    assert futures[0].exception() is None and futures[2].exception() is None
    assert "UNIQUE constraint" in str(futures[1].exception())
    db = store.open_reader(tmp_path / "l.db")
    assert db is not None and [c.seq for c in store.iter_calls(db, "r1")] == [1, 2]


def test_prefixes_must_be_unambiguous(tmp_path: Path) -> None:
    ledger = Ledger.open(tmp_path / "l.db")
    for run_id in ("abc1", "abc2", "xyz"):
        ledger.submit(store.insert_run(run_record(run_id))).result()
    ledger.close()
    db = store.open_reader(tmp_path / "l.db")
    assert db is not None
    assert store.find_run(db, "x").run_id == "xyz"
    with pytest.raises(LookupError, match="several"):
        store.find_run(db, "abc")
    with pytest.raises(LookupError, match="no run"):
        store.find_run(db, "q")
    assert [r.run_id for r in store.list_runs(db, 2)] == ["xyz", "abc2"]


def test_a_run_whose_owner_died_reads_as_interrupted(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    host = store.owner_id().split(":")[0]
    ledger = Ledger.open(tmp_path / "l.db")
    ledger.submit(store.insert_run(run_record("dead", owner=f"{host}:{pid}:1"))).result()
    ledger.submit(store.insert_run(run_record("alive"))).result()
    ledger.submit(store.insert_call(call(1, run_id="dead"))).result()
    ledger.close()
    db = store.open_reader(tmp_path / "l.db")
    assert db is not None
    assert store.find_run(db, "dead").status == RunStatus.INTERRUPTED
    assert store.find_run(db, "dead").ended_at is not None
    assert store.find_run(db, "alive").status == RunStatus.RUNNING
    [line] = store.summary(db, "model")  # the interrupted run's call is rolled up and counted once
    assert (line.calls, line.cost) == (1, Decimal("0.001"))
    assert os.getpid() != pid
