"""The ledger: SQLite in WAL mode, written by one thread, read by the CLI.

Writes are queued from any thread (the proxy's event loop) and return a `concurrent.futures.Future`.
One writer thread owns the write connection: it takes whatever is queued, runs it in one transaction
(each write under its own savepoint, so one bad row cannot lose the others), commits, then resolves the
futures. The proxy awaits a call's future before it releases the last byte of the response, so a call the
client saw is a call the ledger has. WAL with `synchronous=NORMAL` makes each commit survive a crash of rk
itself (SIGKILL) without an fsync per row; SQLite work never runs on the event loop's thread.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from queue import SimpleQueue
from typing import TYPE_CHECKING, Any

from riskkernel.errors import LedgerError
from riskkernel.ledger.migrations import migrate
from riskkernel.models import (
    CALL_USAGE_COLUMNS,
    PICO,
    USAGE_COLUMNS,
    Budget,
    CallRecord,
    Flag,
    Refusal,
    RunRecord,
    RunStatus,
    Totals,
    Usage,
    now_iso,
    usd,
)

Statement = tuple[str, Sequence[Any]]
Write = Sequence[Statement]  # what to write, as data: statements run in one transaction on the writer thread
_BATCH = 512
# What a write that is itself wrong raises (a constraint, a value SQLite cannot take), rather than the
# ledger failing (read-only, full, locked, corrupt: sqlite3.OperationalError and its kin).
_BAD_WRITE = (sqlite3.IntegrityError, sqlite3.InterfaceError, sqlite3.ProgrammingError, ValueError, TypeError)


def _null(_: None) -> None:
    return None


# sqlite3 binds None as NULL, but (CPython 3.11) only after failing to find an adapter for it, which costs
# more than the rest of a call's insert; with one registered, the lookup succeeds at once.
sqlite3.register_adapter(type(None), _null)


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
        raise LedgerError(f"cannot open the ledger at {path}: {exc}{_read_only(path)}") from None
    return db


def _read_only(path: Path) -> str:
    """Why SQLite could not open or write the ledger, when the cause is that it may not write there."""
    for where in (path, path.parent):
        if where.exists() and not os.access(where, os.W_OK):
            return f" ({where} is read-only)"
    return ""


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


def owner_alive(owner: str | None) -> bool:
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
    """The write side. `open()` migrates and starts the writer thread; `close()` drains and stops it.

    What to write is a `Write` (see `insert_run`, `insert_call`, `finish_run`); `submit()` queues one and
    returns a `concurrent.futures.Future`, `commit()` queues one and awaits it on the caller's event loop.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        # Fail closed: while this is set (the last awaited write failed), the proxy forwards no call it might
        # not be able to record. The next write that commits clears it.
        self.failure: LedgerError | None = None
        self.lost = 0  # awaited writes that failed, over the ledger's life
        self._queue: SimpleQueue[list[tuple[Write, Waiter]] | None] = SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="rk-ledger", daemon=True)

    @classmethod
    def open(cls, path: Path) -> Ledger:
        db = connect(path)
        try:
            migrate(db)
            with _immediate(db):  # can it be written at all (read-only, locked)? Better to know now.
                pass
        except sqlite3.Error as exc:
            raise LedgerError(f"cannot prepare the ledger at {path}: {exc}{_read_only(path)}") from None
        finally:
            db.close()
        ledger = cls(path)
        ledger._thread.start()
        return ledger

    def submit(self, write: Write) -> Future[None]:
        future: Future[None] = Future()
        self._queue.put([(write, future)])
        return future

    async def commit(self, write: Write) -> None:
        """Queue a write from the event loop and wait until it is committed. Writes queued while the writer
        is busy are committed together, in the order they were queued."""
        import asyncio  # here, not at the top: readers (the CLI) never need it

        future = asyncio.get_running_loop().create_future()
        self._queue.put([(write, future)])
        try:
            await future
        except LedgerError as exc:
            self.lost += 1
            if not isinstance(exc.__cause__, _BAD_WRITE):  # the ledger itself failed, not this one write
                self.failure = exc
            raise
        self.failure = None

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    def _run(self) -> None:
        try:
            db: sqlite3.Connection | None = connect(self.path)
        except LedgerError as exc:
            db, failure = None, exc  # every write fails with this, rather than waiting forever
        try:
            while True:
                item = self._queue.get()
                batch: list[tuple[Write, Waiter]] = []
                while item is not None:
                    batch += item
                    if len(batch) >= _BATCH or self._queue.empty():
                        break
                    item = self._queue.get()
                if batch:
                    errors: list[Exception | None] | None = (
                        _transaction(db, [w for w, _ in batch]) if db is not None else [failure] * len(batch)
                    )
                    if errors is not None and len(batch) > 1 and db is not None:
                        errors = [(_transaction(db, [write]) or [None])[0] for write, _ in batch]
                    self._notify(batch, errors)
                if item is None:
                    return
        finally:
            if db is not None:
                db.close()

    def _notify(self, batch: list[tuple[Write, Waiter]], errors: list[Exception | None] | None) -> None:
        wakeups: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[None], Exception | None]]] = {}
        for i, (_, waiter) in enumerate(batch):
            error = None if errors is None else errors[i]
            if error is not None and not isinstance(error, LedgerError):
                cause = error
                error = LedgerError(f"cannot write to the ledger at {self.path}: {error}{_read_only(self.path)}")
                error.__cause__ = cause
            if not isinstance(waiter, Future):  # an asyncio future: resolved on its own loop
                wakeups.setdefault(waiter.get_loop(), []).append((waiter, error))
            elif error is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(error)
        for loop, waiters in wakeups.items():  # one wake-up per loop and batch, not one per write
            with contextlib.suppress(RuntimeError):  # that loop has closed: nobody is waiting any more
                loop.call_soon_threadsafe(_resolve, waiters)


if TYPE_CHECKING:
    import asyncio

    Waiter = Future[None] | asyncio.Future[None]


@contextlib.contextmanager
def _immediate(db: sqlite3.Connection) -> Iterator[None]:
    """A write transaction on an autocommit connection."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def _transaction(db: sqlite3.Connection, writes: list[Write]) -> list[Exception | None] | None:
    """Run writes in one transaction: None if it committed, else the error, for each write. When a batch
    fails, the writer runs each write alone, so one bad row loses no others.

    Runs of the same statement (a batch of call rows) go to SQLite as one `executemany`."""
    try:
        statements = [statement for write in writes for statement in write]
        if len(statements) == 1:  # (a call's row, alone) one statement is a transaction of its own
            db.execute(*statements[0])
            return None
        with _immediate(db):
            i = 0
            while i < len(statements):
                sql = statements[i][0]
                j = i + 1
                while j < len(statements) and statements[j][0] == sql:
                    j += 1
                if j - i == 1:
                    db.execute(sql, statements[i][1])
                else:
                    db.executemany(sql, [params for _, params in statements[i:j]])
                i = j
    except Exception as exc:
        return [exc] * len(writes)
    return None


def _resolve(waiters: list[tuple[asyncio.Future[None], Exception | None]]) -> None:
    for future, error in waiters:
        if future.cancelled():
            continue
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)


_INSERT_RUN = (
    "INSERT INTO runs (id, name, command, cwd, started_at, budget, status, tags, owner) VALUES (?,?,?,?,?,?,?,?,?)"
)


def insert_run(run: RunRecord) -> Write:
    row = (
        run.run_id,
        run.name,
        json.dumps(list(run.command)),
        run.cwd,
        run.started_at,
        json.dumps(run.budget.to_json()),
        str(run.status),
        json.dumps(run.tags),
        run.owner,
    )
    return ((_INSERT_RUN, row),)


# Which calls a run's totals count: those that reached an upstream as metered calls.
_COUNTED = f"instr(flags, '{Flag.REFUSED}') = 0 AND instr(flags, '{Flag.UNMETERED}') = 0"
_TOTAL_COLUMNS = ("calls", *USAGE_COLUMNS, "cost_pusd")
_TOTALS = (
    "SELECT count(*), "
    + ", ".join(f"coalesce(sum({c}), 0)" for c in (*USAGE_COLUMNS, "cost_pusd"))
    + f" FROM calls WHERE run_id = ? AND {_COUNTED}"
)
# A run's row holds its totals once it has ended; while it runs, readers sum its calls.
_STORE_TOTALS = f"UPDATE runs SET ({', '.join(_TOTAL_COLUMNS)}) = ({_TOTALS}) WHERE id = ?"
_MODEL = "coalesce(model, requested_model, '?')"  # a call's model for people: as served, else as requested
# When a run ends, triggers (migration m003) sum its counted calls per UTC day and model into `call_rollups`,
# which is what `summary` reads for runs that have ended.


def finish_run(run_id: str, status: RunStatus, halt_reason: str | None, exit_status: int | None) -> Write:
    return (
        (_FINISH_RUN, (str(status), halt_reason, exit_status, now_iso(), run_id)),
        (_STORE_TOTALS, (run_id, run_id)),
    )


_FINISH_RUN = "UPDATE runs SET status = ?, halt_reason = ?, exit_status = ?, ended_at = ? WHERE id = ?"


def record_halt(run_id: str, reason: str) -> Write:
    """A live run's halt, kept at once (its status stays `running` until it ends), so that an owner that
    starts again after a crash finds the run still halted."""
    return (("UPDATE runs SET halt_reason = ? WHERE id = ? AND halt_reason IS NULL", (reason, run_id)),)


def reopen_run(run_id: str, owner: str) -> Write:
    """A run taken over by a new owner (an `rk serve` started again on the same ledger)."""
    return (("UPDATE runs SET status = 'running', owner = ?, ended_at = NULL WHERE id = ?", (owner, run_id)),)


_CALL_COLUMNS = (
    "run_id, seq, started_at, endpoint, provider, requested_model, model, stream, status, "
    + ", ".join(CALL_USAGE_COLUMNS)
    + ", cost_pusd, price_source, flags, latency_ms, ttfb_ms, error, cache_savings_pusd, reserved_pusd, output_limit"
)
_INSERT_CALL = f"INSERT INTO calls ({_CALL_COLUMNS}) VALUES ({', '.join('?' * len(_CALL_COLUMNS.split(',')))})"


def _text(value: str | None) -> str | None:
    """Text SQLite can store: a JSON string may hold a lone surrogate (`"\\ud800"`), which has no UTF-8 form."""
    if value is None or value.isascii():
        return value
    return value.encode("utf-8", "replace").decode("utf-8")


def insert_call(call: CallRecord) -> Write:
    row = (
        call.run_id,
        call.seq,
        call.started_at,
        _text(call.endpoint),
        call.provider,
        _text(call.requested_model),
        _text(call.model),
        int(call.stream),
        call.status,
        *call.usage,  # (in the order of CALL_USAGE_COLUMNS)
        to_pusd(call.cost),
        _text(call.price_source),
        ",".join(call.flags),
        call.latency_ms,
        call.ttfb_ms,
        _text(call.error),
        to_pusd(call.cache_savings),
        None if call.reserved is None else to_pusd(call.reserved),
        call.output_limit,
    )
    return ((_INSERT_CALL, row),)


# -- reading ----------------------------------------------------------------------------------------------

_RUN_COLUMNS = (
    "id, name, command, cwd, started_at, ended_at, budget, status, halt_reason, exit_status, tags, owner, "
    + (", ".join(_TOTAL_COLUMNS))
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
        if not owner_alive(owner):
            with _immediate(db):
                db.execute(
                    "UPDATE runs SET status = 'interrupted',"
                    " ended_at = coalesce((SELECT max(started_at) FROM calls WHERE run_id = runs.id), started_at)"
                    " WHERE id = ? AND status = 'running'",
                    (run_id,),
                )
                db.execute(_STORE_TOTALS, (run_id, run_id))


def _run_from_row(db: sqlite3.Connection, row: tuple[Any, ...]) -> RunRecord:
    (run_id, name, command, cwd, started, ended, budget, status, halt, exit_status, tags, owner) = row[:12]
    totals = row[12:] if status != RunStatus.RUNNING else db.execute(_TOTALS, (run_id,)).fetchone()
    usage = Usage(**dict(zip(USAGE_COLUMNS, totals[1:6], strict=True)))
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
        totals=Totals(calls=totals[0], usage=usage, cost=from_pusd(totals[6])),
    )


@dataclass(frozen=True, slots=True)
class RunFilter:
    """Which runs: started at or after `since` (an ISO-8601 UTC timestamp), in one of `statuses`, carrying
    every one of `tags`. Empty means no condition."""

    since: str | None = None
    statuses: tuple[RunStatus, ...] = ()
    tags: tuple[tuple[str, str], ...] = ()

    def where(self) -> tuple[str, list[Any]]:
        clauses, params = [], []
        if self.since is not None:
            clauses.append("started_at >= ?")
            params.append(self.since)
        if self.statuses:
            clauses.append(f"status IN ({', '.join('?' * len(self.statuses))})")
            params += [str(status) for status in self.statuses]
        for key, value in self.tags:
            clauses.append("EXISTS (SELECT 1 FROM json_each(tags) WHERE key = ? AND value = ?)")
            params += [key, value]
        return (" WHERE " + " AND ".join(clauses) if clauses else ""), params


def list_runs(db: sqlite3.Connection, limit: int | None = 20, which: RunFilter = RunFilter()) -> list[RunRecord]:
    """The newest runs first."""
    return list(iter_runs(db, which, newest_first=True, limit=limit))


def iter_runs(
    db: sqlite3.Connection, which: RunFilter = RunFilter(), *, newest_first: bool = False, limit: int | None = None
) -> Iterator[RunRecord]:
    where, params = which.where()
    order = "DESC" if newest_first else "ASC"
    sql = f"SELECT {_RUN_COLUMNS} FROM runs{where} ORDER BY started_at {order}, rowid {order}"
    if limit is not None:
        sql += f" LIMIT {int(limit)}"
    for row in db.execute(sql, params).fetchall() if limit is not None else db.execute(sql, params):
        yield _run_from_row(db, row)


def find_run(db: sqlite3.Connection, prefix: str, exact: bool = False) -> RunRecord:
    """The run whose id is, or (unless `exact`) starts with, `prefix`. LookupError if none or several."""
    rows = db.execute(
        f"SELECT {_RUN_COLUMNS} FROM runs WHERE id >= ? AND id < ? ORDER BY id LIMIT 2",
        (prefix, prefix + "\U0010ffff"),
    ).fetchall()
    same = [row for row in rows if row[0] == prefix]
    if same:
        return _run_from_row(db, same[0])
    if not rows or exact:
        raise LookupError(f"no run with id {prefix!r}")
    if len(rows) > 1:
        raise LookupError(f"{prefix!r} matches several runs; give more of the id")
    return _run_from_row(db, rows[0])


def last_seq(db: sqlite3.Connection, run_id: str) -> int:
    """The sequence number of a run's last call recorded, 0 if none."""
    return int(db.execute("SELECT coalesce(max(seq), 0) FROM calls WHERE run_id = ?", (run_id,)).fetchone()[0])


def iter_calls(db: sqlite3.Connection, run_id: str) -> Iterator[CallRecord]:
    cursor = db.execute(f"SELECT {_CALL_COLUMNS} FROM calls WHERE run_id = ? ORDER BY seq", (run_id,))
    n = len(CALL_USAGE_COLUMNS)
    for row in cursor:
        cost, source, flags, latency, ttfb, error, savings, reserved, output_limit = row[9 + n :]
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
            usage=Usage(*row[9 : 9 + n]),
            cost=from_pusd(cost),
            price_source=source,
            flags=tuple(flags.split(",")) if flags else (),
            latency_ms=latency,
            ttfb_ms=ttfb,
            error=error,
            cache_savings=from_pusd(savings),
            reserved=None if reserved is None else from_pusd(reserved),
            output_limit=output_limit,
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
    cache_savings: Decimal


@dataclass(frozen=True, slots=True)
class Held:
    """The calls of a run that rk held back: refused (with 402), and of those, refused because their worst
    case did not fit what the budget had left (the largest such worst case); clamped under --strict."""

    refused: int = 0
    short: int = 0
    largest_short: Decimal = Decimal(0)
    clamped: int = 0


def model_breakdown(db: sqlite3.Connection, run_id: str) -> tuple[list[ModelLine], Held]:
    """Per-model totals of a run's counted calls, and the calls rk refused or clamped."""
    rows = db.execute(
        f"SELECT {_MODEL}, count(*), "
        + ", ".join(f"sum({c})" for c in USAGE_COLUMNS)
        + ", sum(cost_pusd), max(instr(flags, ?) > 0), max(instr(flags, ?) > 0), sum(cache_savings_pusd)"
        f" FROM calls WHERE run_id = ? AND {_COUNTED}"
        " GROUP BY 1 ORDER BY sum(cost_pusd) DESC, 1",
        (Flag.UNPRICED, Flag.ESTIMATED, run_id),
    ).fetchall()
    lines = [
        ModelLine(
            model=row[0],
            calls=row[1],
            usage=Usage(**dict(zip(USAGE_COLUMNS, row[2:7], strict=True))),
            cost=from_pusd(row[7]),
            unpriced=bool(row[8]),
            estimated=bool(row[9]),
            cache_savings=from_pusd(row[10]),
        )
        for row in rows
    ]
    refused, short, largest, clamped = db.execute(
        "SELECT count(*) FILTER (WHERE instr(flags, ?) > 0), count(*) FILTER (WHERE error = ?),"
        " coalesce(max(reserved_pusd) FILTER (WHERE error = ?), 0), count(*) FILTER (WHERE instr(flags, ?) > 0)"
        " FROM calls WHERE run_id = ?",
        (Flag.REFUSED, Refusal.INSUFFICIENT_BUDGET, Refusal.INSUFFICIENT_BUDGET, Flag.CLAMPED, run_id),
    ).fetchone()
    return lines, Held(refused, short, from_pusd(largest), clamped)


@dataclass(frozen=True, slots=True)
class SummaryLine:
    """Spend rolled up under one key (a model, a UTC day, a tag's value)."""

    key: str
    runs: int
    calls: int
    usage: Usage
    cost: Decimal

    def to_json(self, by: str) -> dict[str, Any]:
        return {
            by: self.key,
            "runs": self.runs,
            "calls": self.calls,
            **{name: getattr(self.usage, name) for name in USAGE_COLUMNS},
            "cost_usd": usd(self.cost),
        }


NO_TAG = "(none)"


def summary(db: sqlite3.Connection, by: str, since: str | None = None) -> list[SummaryLine]:
    """The counted calls made at or after `since`, rolled up `by` "model", "day" (UTC) or "tag:KEY" (the
    value of the tag KEY on the call's run). The biggest spend first; days in order.

    Finished runs are read from their rollups, running runs from their calls. With `since`, the rollups
    of the days after its day are whole; calls of its own day are read one by one, to the millisecond."""
    sums = ", ".join((*USAGE_COLUMNS, "cost_pusd"))
    calls = f"SELECT run_id, substr(started_at, 1, 10) AS day, {_MODEL} AS model, 1 AS calls, {sums} FROM calls"
    rollups = f"SELECT run_id, day, model, calls, {sums} FROM call_rollups"
    running = f"run_id IN (SELECT id FROM runs WHERE status = '{RunStatus.RUNNING}')"
    params: list[Any] = []
    if since is None:
        parts = [rollups, f"{calls} WHERE {running} AND {_COUNTED}"]
    else:
        day = since[:10]
        parts = [
            f"{rollups} WHERE day > ?",
            f"{calls} WHERE run_id IN (SELECT run_id FROM call_rollups WHERE day = ?)"
            f" AND started_at >= ? AND started_at < ? AND {_COUNTED}",
            f"{calls} WHERE {running} AND started_at >= ? AND {_COUNTED}",
        ]
        params += [day, day, since, day + "\U0010ffff", since]
    if by == "model":
        key = "u.model"
    elif by == "day":
        key = "u.day"
    elif by.startswith("tag:") and by[4:]:
        key = "r.tag"
    else:
        raise ValueError(f"cannot summarise by {by!r}: use model, day or tag:KEY")
    join = ""
    if by.startswith("tag:"):  # each run's tag read once, not once per row
        tag = f"coalesce((SELECT value FROM json_each(tags) WHERE key = ?), '{NO_TAG}')"
        join = f" JOIN (SELECT id, {tag} AS tag FROM runs) r ON r.id = u.run_id"
        params.append(by[4:])
    order = "1" if by == "day" else "sum(u.cost_pusd) DESC, 1"
    rows = db.execute(
        f"SELECT {key}, count(DISTINCT u.run_id), sum(u.calls), "
        + ", ".join(f"sum(u.{column})" for column in (*USAGE_COLUMNS, "cost_pusd"))
        + f" FROM ({' UNION ALL '.join(parts)}) u{join} GROUP BY 1 ORDER BY {order}",
        params,
    ).fetchall()
    return [
        SummaryLine(
            key=row[0],
            runs=row[1],
            calls=row[2],
            usage=Usage(**dict(zip(USAGE_COLUMNS, row[3:8], strict=True))),
            cost=from_pusd(row[8]),
        )
        for row in rows
    ]
