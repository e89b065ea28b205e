"""The ledger: SQLite in WAL mode, written by one thread, read by the CLI.

Writes are queued from any thread (the proxy's event loop) and return a `concurrent.futures.Future`.
One writer thread owns the write connection: it takes whatever is queued, runs it in one transaction
(each write under its own savepoint, so one bad row cannot lose the others), commits, then resolves the
futures. The proxy awaits a call's future before it releases the last byte of the response, so a call the
client saw is a call the ledger has. WAL with `synchronous=NORMAL` makes each commit survive a crash of rk
itself (SIGKILL) without an fsync per row; SQLite work never runs on the event loop's thread.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from queue import SimpleQueue
from typing import Any

from riskkernel.errors import LedgerError
from riskkernel.ledger.migrations import migrate
from riskkernel.models import (
    PICO,
    USAGE_COLUMNS,
    Budget,
    CallRecord,
    Flag,
    RunRecord,
    RunStatus,
    Totals,
    Usage,
    now_iso,
)

Write = Callable[[sqlite3.Connection], None]
_BATCH = 512


def connect(path: Path) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are explicit), creating the file 0600 if needed."""
    try:
        if not path.exists():
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA busy_timeout = 5000")
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = NORMAL")
    except (OSError, sqlite3.Error) as exc:
        raise LedgerError(f"cannot open the ledger at {path}: {exc}") from None
    return db


def to_pusd(amount: Decimal) -> int:
    return int(amount / PICO)


def from_pusd(pusd: int) -> Decimal:
    return Decimal(pusd) * PICO


def owner_id() -> str:
    """This process, in a form that tells a live owner from a dead one whose pid was reused."""
    return f"{socket.gethostname()}:{os.getpid()}:{_process_start(os.getpid())}"


def _process_start(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[19].decode()
    except (OSError, IndexError):
        return ""


def _owner_alive(owner: str | None) -> bool:
    if not owner:
        return False
    host, _, rest = owner.partition(":")
    pid_text, _, start = rest.partition(":")
    if host != socket.gethostname():
        return True  # another machine's run: not ours to judge
    try:
        pid = int(pid_text)
        os.kill(pid, 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        pass
    return not start or _process_start(pid) in (start, "")


class Ledger:
    """The write side. `open()` migrates and starts the writer thread; `close()` drains and stops it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._queue: SimpleQueue[tuple[Write, Future[None]] | None] = SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="rk-ledger", daemon=True)

    @classmethod
    def open(cls, path: Path) -> Ledger:
        db = connect(path)
        try:
            migrate(db)
        except sqlite3.Error as exc:
            raise LedgerError(f"cannot prepare the ledger at {path}: {exc}") from None
        finally:
            db.close()
        ledger = cls(path)
        ledger._thread.start()
        return ledger

    def submit(self, write: Write) -> Future[None]:
        future: Future[None] = Future()
        self._queue.put((write, future))
        return future

    def create_run(self, run: RunRecord) -> Future[None]:
        return self.submit(lambda db: _insert_run(db, run))

    def record_call(self, call: CallRecord) -> Future[None]:
        return self.submit(lambda db: _insert_call(db, call))

    def finish_run(
        self, run_id: str, status: RunStatus, halt_reason: str | None, exit_status: int | None
    ) -> Future[None]:
        ended = now_iso()

        def write(db: sqlite3.Connection) -> None:
            db.execute(
                "UPDATE runs SET status = ?, halt_reason = ?, exit_status = ?, ended_at = ? WHERE id = ?",
                (str(status), halt_reason, exit_status, ended, run_id),
            )

        return self.submit(write)

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    def _run(self) -> None:
        db = connect(self.path)
        try:
            while True:
                item = self._queue.get()
                batch = []
                stop = item is None
                while item is not None:
                    batch.append(item)
                    if len(batch) >= _BATCH or self._queue.empty():
                        break
                    item = self._queue.get()
                    stop = item is None
                if batch:
                    _commit(db, batch)
                if stop:
                    return
        finally:
            db.close()


def _commit(db: sqlite3.Connection, batch: list[tuple[Write, Future[None]]]) -> None:
    errors: list[BaseException | None] = []
    try:
        db.execute("BEGIN IMMEDIATE")
        for write, _ in batch:
            db.execute("SAVEPOINT w")
            try:
                write(db)
            except Exception as exc:
                db.execute("ROLLBACK TO w")
                errors.append(exc)
            else:
                errors.append(None)
            db.execute("RELEASE w")
        db.execute("COMMIT")
    except sqlite3.Error as exc:
        if db.in_transaction:
            db.execute("ROLLBACK")
        errors = [exc] * len(batch)
    for (_, future), error in zip(batch, errors, strict=True):
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(LedgerError(f"cannot write to the ledger at {db_path(db)}: {error}"))


def db_path(db: sqlite3.Connection) -> str:
    row = db.execute("PRAGMA database_list").fetchone()
    return row[2] if row else "?"


def _insert_run(db: sqlite3.Connection, run: RunRecord) -> None:
    db.execute(
        "INSERT INTO runs (id, name, command, cwd, started_at, budget, status, tags, owner)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            run.run_id,
            run.name,
            json.dumps(list(run.command)),
            run.cwd,
            run.started_at,
            json.dumps(run.budget.to_json()),
            str(run.status),
            json.dumps(run.tags),
            run.owner,
        ),
    )


_CALL_COLUMNS = (
    "run_id, seq, started_at, endpoint, provider, requested_model, model, stream, status, "
    + ", ".join(USAGE_COLUMNS)
    + ", cost_pusd, price_source, flags, latency_ms, ttfb_ms, error"
)
_INSERT_CALL = f"INSERT INTO calls ({_CALL_COLUMNS}) VALUES ({', '.join('?' * len(_CALL_COLUMNS.split(',')))})"
_ADD_TOTALS = (
    "UPDATE runs SET calls = calls + 1, "
    + ", ".join(f"{c} = {c} + ?" for c in USAGE_COLUMNS)
    + ", cost_pusd = cost_pusd + ? WHERE id = ?"
)


def _insert_call(db: sqlite3.Connection, call: CallRecord) -> None:
    usage = [getattr(call.usage, c) for c in USAGE_COLUMNS]
    cost = to_pusd(call.cost)
    db.execute(
        _INSERT_CALL,
        (
            call.run_id,
            call.seq,
            call.started_at,
            call.endpoint,
            call.provider,
            call.requested_model,
            call.model,
            int(call.stream),
            call.status,
            *usage,
            cost,
            call.price_source,
            ",".join(call.flags),
            call.latency_ms,
            call.ttfb_ms,
            call.error,
        ),
    )
    if call.counted:
        db.execute(_ADD_TOTALS, (*usage, cost, call.run_id))


# -- reading ----------------------------------------------------------------------------------------------

_RUN_COLUMNS = (
    "id, name, command, cwd, started_at, ended_at, budget, status, halt_reason, exit_status, tags, owner, calls, "
    + ", ".join(USAGE_COLUMNS)
    + ", cost_pusd"
)


def open_reader(path: Path) -> sqlite3.Connection | None:
    """A connection for reading, with the schema current and dead owners' runs marked; None if no ledger."""
    if not path.exists():
        return None
    db = connect(path)
    migrate(db)
    mark_interrupted(db)
    return db


def mark_interrupted(db: sqlite3.Connection) -> None:
    """Runs still `running` whose owner process is gone become `interrupted`."""
    rows = db.execute("SELECT id, owner FROM runs WHERE status = 'running'").fetchall()
    for run_id, owner in rows:
        if not _owner_alive(owner):
            db.execute(
                "UPDATE runs SET status = 'interrupted',"
                " ended_at = coalesce((SELECT max(started_at) FROM calls WHERE run_id = runs.id), started_at)"
                " WHERE id = ? AND status = 'running'",
                (run_id,),
            )


def _run_from_row(row: tuple[Any, ...]) -> RunRecord:
    (run_id, name, command, cwd, started, ended, budget, status, halt, exit_status, tags, owner, calls) = row[:13]
    usage = Usage(**dict(zip(USAGE_COLUMNS, row[13:18], strict=True)))
    return RunRecord(
        run_id=run_id,
        name=name,
        command=tuple(json.loads(command)),
        cwd=cwd,
        started_at=started,
        ended_at=ended,
        budget=Budget.from_json(json.loads(budget)),
        status=RunStatus(status),
        halt_reason=halt,
        exit_status=exit_status,
        tags=json.loads(tags),
        owner=owner,
        totals=Totals(calls=calls, usage=usage, cost=from_pusd(row[18])),
    )


def list_runs(db: sqlite3.Connection, limit: int | None = 20) -> list[RunRecord]:
    sql = f"SELECT {_RUN_COLUMNS} FROM runs ORDER BY started_at DESC, rowid DESC"
    if limit is not None:
        sql += f" LIMIT {int(limit)}"
    return [_run_from_row(row) for row in db.execute(sql)]


def find_run(db: sqlite3.Connection, prefix: str) -> RunRecord:
    """The run whose id is, or starts with, `prefix`. LookupError if none or several."""
    rows = db.execute(
        f"SELECT {_RUN_COLUMNS} FROM runs WHERE id >= ? AND id < ? ORDER BY id LIMIT 2",
        (prefix, prefix + "\U0010ffff"),
    ).fetchall()
    exact = [row for row in rows if row[0] == prefix]
    if exact:
        return _run_from_row(exact[0])
    if not rows:
        raise LookupError(f"no run with id {prefix!r}")
    if len(rows) > 1:
        raise LookupError(f"{prefix!r} matches several runs; give more of the id")
    return _run_from_row(rows[0])


def iter_calls(db: sqlite3.Connection, run_id: str) -> Iterator[CallRecord]:
    cursor = db.execute(f"SELECT {_CALL_COLUMNS} FROM calls WHERE run_id = ? ORDER BY seq", (run_id,))
    for row in cursor:
        usage = Usage(**dict(zip(USAGE_COLUMNS, row[9:14], strict=True)))
        yield CallRecord(
            run_id=row[0],
            seq=row[1],
            started_at=row[2],
            endpoint=row[3],
            provider=row[4],
            requested_model=row[5],
            model=row[6],
            stream=bool(row[7]),
            status=row[8],
            usage=usage,
            cost=from_pusd(row[14]),
            price_source=row[15],
            flags=tuple(row[16].split(",")) if row[16] else (),
            latency_ms=row[17],
            ttfb_ms=row[18],
            error=row[19],
        )


@dataclass(frozen=True, slots=True)
class ModelLine:
    """One line of a run's cost table."""

    model: str
    calls: int
    usage: Usage
    cost: Decimal
    unpriced: bool
    estimated: bool


def model_breakdown(db: sqlite3.Connection, run_id: str) -> tuple[list[ModelLine], int]:
    """Per-model totals of a run's counted calls, and how many calls rk refused."""
    rows = db.execute(
        "SELECT coalesce(model, requested_model, '?'), count(*), "
        + ", ".join(f"sum({c})" for c in USAGE_COLUMNS)
        + ", sum(cost_pusd), max(instr(flags, ?) > 0), max(instr(flags, ?) > 0)"
        " FROM calls WHERE run_id = ? AND instr(flags, ?) = 0 AND instr(flags, ?) = 0"
        " GROUP BY 1 ORDER BY sum(cost_pusd) DESC, 1",
        (Flag.UNPRICED, Flag.ESTIMATED, run_id, Flag.REFUSED, Flag.UNMETERED),
    ).fetchall()
    lines = [
        ModelLine(
            model=row[0],
            calls=row[1],
            usage=Usage(**dict(zip(USAGE_COLUMNS, row[2:7], strict=True))),
            cost=from_pusd(row[7]),
            unpriced=bool(row[8]),
            estimated=bool(row[9]),
        )
        for row in rows
    ]
    refused = db.execute(
        "SELECT count(*) FROM calls WHERE run_id = ? AND instr(flags, ?) > 0", (run_id, Flag.REFUSED)
    ).fetchone()[0]
    return lines, refused
