"""Runs and calls written out as JSON, JSON Lines or CSV, streamed: a run of any size is written call by
call from a database cursor, never held in memory.

- `json`: an array of run objects, each with its `calls` (the shape of `rk ledger show --json`).
- `jsonl` and `csv`: one record per call, its run's id first; money as decimal strings, flags joined by
  `;` in CSV. Refused and unmetered calls are rows too (their flags say so); a run's totals are the sum
  of its rows without those flags.
"""

from __future__ import annotations

import csv
import json
import sqlite3
from collections.abc import Callable, Iterable
from typing import Any, TextIO

from riskkernel.ledger.store import iter_calls
from riskkernel.models import CallRecord, RunRecord

FORMATS = ("json", "jsonl", "csv")


def write_run(out: TextIO, db: sqlite3.Connection, run: RunRecord, indent: str = "") -> int:
    """One run object with its calls, a call per line; returns how many calls were written."""
    head = json.dumps(run.to_json(), indent=2, ensure_ascii=False)
    out.write(head[:-2].replace("\n", "\n" + indent) + f',\n{indent}  "calls": [')
    n = 0
    for n, call in enumerate(iter_calls(db, run.run_id), 1):
        out.write(("\n" if n == 1 else ",\n") + f"{indent}    " + json.dumps(call.to_json(), ensure_ascii=False))
    out.write(f"\n{indent}  ]\n{indent}}}" if n else "]\n" + indent + "}")
    return n


def write(out: TextIO, db: sqlite3.Connection, runs: Iterable[RunRecord], fmt: str) -> int:
    """Write runs in a format of FORMATS; returns how many calls were written."""
    if fmt == "json":
        return _write_json(out, db, runs)
    if fmt == "jsonl":
        return _write_rows(db, runs, lambda row: out.write(json.dumps(row, ensure_ascii=False) + "\n"))
    if fmt == "csv":
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(CSV_COLUMNS)
        return _write_rows(db, runs, lambda row: writer.writerow(_csv_cell(row[c]) for c in CSV_COLUMNS))
    raise ValueError(f"unknown format {fmt!r}: use one of {', '.join(FORMATS)}")


def _write_json(out: TextIO, db: sqlite3.Connection, runs: Iterable[RunRecord]) -> int:
    out.write("[")
    calls = runs_written = 0
    for run in runs:
        out.write(",\n  " if runs_written else "\n  ")
        calls += write_run(out, db, run, indent="  ")
        runs_written += 1
    out.write("\n]\n" if runs_written else "]\n")
    return calls


def call_row(call: CallRecord) -> dict[str, Any]:
    return {"run_id": call.run_id, **call.to_json()}


CSV_COLUMNS = tuple(call_row(CallRecord("", 0, "", "", "", None, None, False, 0)))


def _csv_cell(value: Any) -> Any:
    if isinstance(value, list):
        return ";".join(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return "" if value is None else value


def _write_rows(db: sqlite3.Connection, runs: Iterable[RunRecord], emit: Callable[[dict[str, Any]], Any]) -> int:
    n = 0
    for run in runs:
        for call in iter_calls(db, run.run_id):
            emit(call_row(call))
            n += 1
    return n
