"""`rk serve`: one long-lived proxy for many runs, each with its own budget, ledger rows and kill switch.

A call belongs to the run its `X-RiskKernel-Run-Id` header names, else the run its path prefix names
(`/run/ID/v1/...`, so an unmodified client is grouped by its base URL alone), else to a fresh run of its
own, which ends with the call. A run named for the first time is created with the server's default budget
(or made with `POST /rk/runs`, with a budget of its own). A run ends with `POST /rk/runs/ID/finish`, and then
leaves memory; so does a single call's run when its call is over, so memory holds only live runs.

Restarts: at start-up, before it listens, a server takes up every run that earlier servers on the same
ledger left unended and that no live process serves: it becomes their owner in the ledger, and they are
live at once (listed by `/rk/runs`, reachable by `rk kill`) with what they spent, their halt and their call
numbering, so a restart never resets a meter or re-opens a halted run. A single call's run left unended (its
call was cut by the crash) is ended `interrupted` instead: nobody can name it again, and taken up it would
never leave memory. A run that a live process served at start-up is taken up lazily, on its first call here
once that process is gone.

With `--auth-token`, every call must carry the token (`X-RiskKernel-Token`, or a `/t/TOKEN/` path prefix)
and the `/rk` API takes it as its bearer token; without one, the server only listens on loopback and its
`/rk` API takes a per-process token kept in a private file in the data dir (see `riskkernel.control`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import logging
import os
import re
import signal
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from aiohttp import web

from riskkernel import control, paths
from riskkernel.config import RunSettings, parse_cost, parse_count, parse_duration, parse_repeats
from riskkernel.errors import ConfigError, LedgerError
from riskkernel.governor import Spend
from riskkernel.ledger import store
from riskkernel.ledger.store import Ledger, owner_id
from riskkernel.models import Budget, HaltReason, RunRecord, RunStatus, now_iso
from riskkernel.proxy.app import RUN_ID
from riskkernel.proxy.run import LiveRun, Unresolved
from riskkernel.runner import new_run_id, start_proxy, start_telemetry

if TYPE_CHECKING:
    from riskkernel.telemetry import Telemetry

log = logging.getLogger("riskkernel")
_T = TypeVar("_T")

# The command of the runs a server creates: how a restarted one knows them, and knows which to end.
SERVE_COMMAND = ("rk", "serve")
SINGLE_CALL_COMMAND = ("rk", "serve", "(single call)")
TOKEN_HEADER = "X-RiskKernel-Token"
RUN_HEADER = "X-RiskKernel-Run-Id"
_PREFIX = re.compile(r"(?:t/(?P<token>[^/]+)/)?(?:run/(?P<run>[^/]+)/)?")


@dataclass(frozen=True, slots=True)
class _Resumable:
    """An unended run an earlier server left, as the ledger has it."""

    record: RunRecord
    spent: Spend
    last_seq: int


@dataclass(frozen=True)
class ServeSettings:
    defaults: RunSettings  # the budget and proxy settings of the runs it creates
    host: str = "127.0.0.1"
    port: int = 7070
    auth_token: str | None = None
    shutdown_grace: float = 10.0


class ServedRuns:
    """The runs an `rk serve` holds in memory: those live now. Implements `riskkernel.proxy.run.Runs`."""

    def __init__(
        self, ledger: Ledger, defaults: RunSettings, auth_token: str | None, telemetry: Telemetry | None = None
    ) -> None:
        self.ledger = ledger
        self.defaults = defaults
        self.auth_token = auth_token
        self.telemetry = telemetry
        self.owner = owner_id()
        self.runs: dict[str, LiveRun] = {}
        self.single: set[str] = set()  # runs of one call, which end with it
        self._opening: dict[str, asyncio.Future[LiveRun | Unresolved]] = {}
        # Run lookups read the ledger through one connection on one thread of their own: SQLite keeps the
        # file of a closed connection open while the writer's is, so a connection per lookup would leave a
        # descriptor behind for every lookup that ever ran at the same time as another.
        self._reads = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rk-ledger-read")
        self._db: sqlite3.Connection | None = None

    def live(self) -> list[LiveRun]:
        return list(self.runs.values())

    async def _read(self, read: Callable[[sqlite3.Connection], _T]) -> _T:
        """`read(db)` on the reads thread, with the runs of dead owners marked `interrupted` first."""
        return await asyncio.get_running_loop().run_in_executor(self._reads, self._reading, read)

    def _reading(self, read: Callable[[sqlite3.Connection], _T]) -> _T:
        if self._db is None:
            self._db = store.connect(self.ledger.path)  # (Ledger.open has made it, and migrated it)
        store.mark_interrupted(self._db)
        return read(self._db)

    def close(self) -> None:
        """Close the reads' connection (after the last lookup)."""
        self._reads.shutdown()
        if self._db is not None:
            self._db.close()
            self._db = None

    def get(self, run_id: str) -> LiveRun | None:
        return self.runs.get(run_id)

    def prefix(self, run: LiveRun) -> str:
        return (f"t/{self.auth_token}/" if self.auth_token else "") + f"run/{run.id}/"

    async def resolve(self, request: web.Request) -> LiveRun | Unresolved:
        match = _PREFIX.fullmatch(request.match_info.get("prefix", ""))
        path_token, path_run = (match.group("token"), match.group("run")) if match else (None, None)
        if self.auth_token is not None:
            given = request.headers.get(TOKEN_HEADER) or path_token or ""
            if not hmac.compare_digest(given.encode(), self.auth_token.encode()):
                return Unresolved(
                    401,
                    "unauthorized",
                    f"rk: this rk serve needs its token — send it as {TOKEN_HEADER}, or put /t/TOKEN/ before"
                    " the run's path in the base URL",
                )
        named = request.headers.getall(RUN_HEADER, [])  # present but empty is a bad id, not no id
        if len(named) > 1 or (named and path_run is not None and named[0] != path_run):
            return Unresolved(400, "invalid_run_id", "rk: the request names more than one run")
        run_id = named[0] if named else path_run
        if run_id is None:
            run = await self._start(self._record(new_run_id(), None, {}, self.defaults.budget, SINGLE_CALL_COMMAND))
            self.single.add(run.id)
            return run
        if not re.fullmatch(RUN_ID, run_id):
            return Unresolved(
                400, "invalid_run_id", "rk: a run id is 1 to 64 letters, digits, '.', '_' or '-', starting alphanumeric"
            )
        return self.runs.get(run_id) or await self._open(run_id)

    async def release(self, run: LiveRun) -> None:
        if run.id in self.single and run.id in self.runs:
            try:
                await self.finish(run)
            except LedgerError as exc:  # its call is answered all the same; the run reads as interrupted later
                log.error("rk: %s — run %s stays unended there", exc, run.id)

    async def create(self, spec: dict[str, Any]) -> LiveRun:
        unknown = set(spec) - {"run_id", "name", "tags", "budget"}
        if unknown:
            raise ValueError(f"unknown field {sorted(unknown)[0]!r} (known: run_id, name, tags, budget)")
        run_id = spec.get("run_id") or new_run_id()
        if not isinstance(run_id, str) or not re.fullmatch(RUN_ID, run_id):
            raise ValueError("run_id must be 1 to 64 letters, digits, '.', '_' or '-', starting alphanumeric")
        name = spec.get("name")
        tags = spec.get("tags") or {}
        if name is not None and not isinstance(name, str):
            raise ValueError("name must be a string")
        if not isinstance(tags, dict) or not all(isinstance(v, str) for v in tags.values()):
            raise ValueError("tags must be an object of strings")
        budget = _budget(spec.get("budget") or {}, self.defaults.budget)
        if run_id in self.runs or await self._read(lambda db: _known(db, run_id)):
            raise ValueError(f"run {run_id!r} exists already")
        return await self._start(self._record(run_id, name, tags, budget))

    async def finish(self, run: LiveRun) -> None:
        """End the run: its calls still in flight are cut, its row is made final, and it leaves memory."""
        if self.runs.pop(run.id, None) is None:
            return
        self.single.discard(run.id)
        run.stop_clock()
        for call in list(run.calls):
            call.cut(HaltReason.KILLED, f"rk: run {run.id} has been finished, which cut this call")
        while run.calls:  # their rows are written before the run's totals are
            await asyncio.sleep(0.01)
        halt = run.governor.halt_reason
        status = RunStatus.HALTED if halt is not None else RunStatus.COMPLETED
        try:
            await self.ledger.commit(store.finish_run(run.id, status, halt, None))
        finally:
            if self.telemetry is not None:
                self.telemetry.run_ended(run, status)

    # -- runs coming to life --------------------------------------------------------------------------

    def _record(
        self,
        run_id: str,
        name: str | None,
        tags: dict[str, str],
        budget: Budget,
        command: tuple[str, ...] = SERVE_COMMAND,
    ) -> RunRecord:
        return RunRecord(
            run_id=run_id,
            name=name,
            command=command,
            cwd=os.getcwd(),
            started_at=now_iso(),
            budget=budget,
            tags=tags,
            owner=self.owner,
        )

    async def _start(
        self, record: RunRecord, spent: Spend | None = None, halt: str | None = None, last_seq: int = 0
    ) -> LiveRun:
        """A run in memory, live: new (its row written first), or resumed."""
        if spent is None:
            await self.ledger.commit(store.insert_run(record))
        run = LiveRun(record, self.ledger, last_seq)
        if spent is not None:
            elapsed = time.time() - _epoch(record.started_at)
            run.governor.started = time.monotonic() - elapsed  # the time budget runs from the run's start
            run.governor.resume(spent, HaltReason(halt) if halt else None)

        self.runs[run.id] = run
        if self.telemetry is not None:
            self.telemetry.run_started(run)
        run.start_clock()
        return run

    async def _open(self, run_id: str) -> LiveRun | Unresolved:
        """A run named for the first time in this process: resumed if an earlier server left it unended, new
        if the ledger has never seen it, refused if it has ended or belongs to another process."""
        pending = self._opening.get(run_id)
        if pending is not None:  # calls racing to open the same run get the same one
            return await asyncio.shield(pending)
        future: asyncio.Future[LiveRun | Unresolved] = asyncio.get_running_loop().create_future()
        self._opening[run_id] = future
        try:
            found = await self._read(lambda db: self._load(db, run_id))
            if found is None:
                result: LiveRun | Unresolved = await self._start(self._record(run_id, None, {}, self.defaults.budget))
            elif isinstance(found, Unresolved):
                result = found
            else:
                await self.ledger.commit(store.reopen_run(run_id, self.owner))
                result = await self._resume(found)
            future.set_result(result)
            return result
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: nobody else may be waiting
            raise
        finally:
            del self._opening[run_id]

    async def _resume(self, found: _Resumable) -> LiveRun:
        return await self._start(found.record, found.spent, found.record.halt_reason, found.last_seq)

    def _load(self, db: sqlite3.Connection, run_id: str) -> _Resumable | Unresolved | None:
        try:
            record = store.find_run(db, run_id, exact=True)
        except LookupError:
            return None
        if record.command == SINGLE_CALL_COMMAND:
            message = f"rk: run {run_id} was one call's own run and ended with it; start a new run"
            return Unresolved(410, "run_ended", message)
        if record.command != SERVE_COMMAND or record.status not in (RunStatus.RUNNING, RunStatus.INTERRUPTED):
            ended = f"{record.status}" + (f": {record.halt_reason}" if record.halt_reason else "")
            return Unresolved(410, "run_ended", f"rk: run {run_id} has ended ({ended}); start a new run")
        if record.status is RunStatus.RUNNING and record.owner != self.owner:
            return Unresolved(409, "run_owned", f"rk: run {run_id} is served by another live rk process")
        return _resumable(db, record)

    # -- start-up: taking up what earlier servers left --------------------------------------------------

    async def take_up(self) -> None:
        """Make live every run earlier servers on this ledger left unended and no live process serves, with
        this server as their owner; end their single calls' runs `interrupted`. Call it before listening."""
        take, end = await self._read(self._unended)
        writes = [s for found in take for s in store.reopen_run(found.record.run_id, self.owner)]
        for record in end:
            writes += store.finish_run(record.run_id, RunStatus.INTERRUPTED, record.halt_reason, None)
        if writes:
            await self.ledger.commit(writes)  # one transaction, however many runs
        for found in take:
            await self._resume(found)

    def _unended(self, db: sqlite3.Connection) -> tuple[list[_Resumable], list[RunRecord]]:
        """What `take_up` takes up and ends. Reading has marked the runs of dead owners `interrupted`; a run
        still `running` after that has a live owner, and is taken only if that owner is this process (an
        earlier server in it has stopped)."""
        take: list[_Resumable] = []
        end: list[RunRecord] = []
        dead: set[str] = set()
        unended = store.RunFilter(statuses=(RunStatus.RUNNING, RunStatus.INTERRUPTED))
        for record in list(store.iter_runs(db, unended)):
            if record.command not in (SERVE_COMMAND, SINGLE_CALL_COMMAND):
                continue
            if record.status is RunStatus.RUNNING and record.owner != self.owner:
                continue  # a live process serves it: the lazy path takes it once that process is gone
            if record.owner is not None and record.owner != self.owner:
                dead.add(record.owner)
            if record.command == SERVE_COMMAND:
                take.append(_resumable(db, record))
            elif record.status is RunStatus.RUNNING:
                end.append(record)  # (a single call's run `interrupted` has ended already)
        for owner in dead:  # a crash leaves its control file behind: nobody answers at its address any more
            control.unpublish(control.control_file(owner))
        return take, end


def _known(db: sqlite3.Connection, run_id: str) -> bool:
    try:
        store.find_run(db, run_id, exact=True)
        return True
    except LookupError:
        return False


def _resumable(db: sqlite3.Connection, record: RunRecord) -> _Resumable:
    t = record.totals
    return _Resumable(record, Spend(t.cost, t.usage.total_tokens, t.calls), store.last_seq(db, record.run_id))


def _epoch(iso: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def _budget(spec: Any, default: Budget) -> Budget:
    """A budget from `POST /rk/runs` (`{"max_cost_usd": "0.50", "max_tokens": null, ...}`): a field left out
    is the server's default, a null one unlimited."""
    if not isinstance(spec, dict):
        raise ValueError("budget must be an object")
    fields = {"max_cost_usd", "max_tokens", "max_calls", "max_time_s", "max_repeats", "strict"}
    unknown = set(spec) - fields
    if unknown:
        raise ValueError(f"unknown budget field {sorted(unknown)[0]!r} (known: {', '.join(sorted(fields))})")

    def get(key: str, parse: Callable[[str], Any], current: Any) -> Any:
        if key not in spec:
            return current
        value = spec[key]
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise ValueError(f"{key} must be a number, a string or null")
        try:
            return parse(str(value))
        except ConfigError as exc:
            raise ValueError(str(exc)) from None

    return Budget(
        max_cost=get("max_cost_usd", parse_cost, default.max_cost),
        max_tokens=get("max_tokens", lambda v: parse_count(v, "tokens"), default.max_tokens),
        max_calls=get("max_calls", lambda v: parse_count(v, "calls"), default.max_calls),
        max_time=get("max_time_s", parse_duration, default.max_time),
        max_repeats=get("max_repeats", parse_repeats, default.max_repeats),
        strict=_flag(spec.get("strict", default.strict)),
    )


def _flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError("strict must be true or false")
    return value


def check_bind(host: str, auth_token: str | None) -> None:
    """Beyond loopback, every caller must prove it holds the token."""
    if auth_token is not None:
        if len(auth_token) < 16 or not re.fullmatch(r"[A-Za-z0-9_-]+", auth_token):
            raise ConfigError("--auth-token: use at least 16 letters, digits, '_' or '-' (e.g. from rk's own)")
        return
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ConfigError(f"--host {host}: binding beyond loopback needs --auth-token (every caller must hold it)")


@dataclass
class Server:
    """A running `rk serve`, for its command and for tests."""

    url: str
    runs: ServedRuns
    token: str
    control_file: Path
    ledger: Ledger
    servers: list[web.AppRunner] = field(default_factory=list)

    async def stop(self, grace: float) -> None:
        """Stop accepting calls, let those in flight finish for up to `grace` seconds, cut the rest, record
        everything. Runs not ended stay so in the ledger, for the next server to pick up."""
        proxy = self.servers[0]
        for site in list(proxy.sites):
            await site.stop()
        deadline = time.monotonic() + grace
        while any(run.calls for run in self.runs.live()) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for run in self.runs.live():
            for call in list(run.calls):
                call.cut(HaltReason.KILLED, f"rk: rk serve is shutting down, which cut this call; run {run.id} goes on")
        deadline = time.monotonic() + 5
        while any(run.calls for run in self.runs.live()) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for run in self.runs.live():
            run.stop_clock()
        for single in list(self.runs.single):
            left = self.runs.get(single)
            if left is not None:
                await self.runs.finish(left)
        for server in self.servers:
            await server.cleanup()
        control.unpublish(self.control_file)
        await asyncio.to_thread(self.runs.close)
        await asyncio.to_thread(self.ledger.close)


async def start(settings: ServeSettings) -> Server:
    check_bind(settings.host, settings.auth_token)
    defaults = settings.defaults
    telemetry = start_telemetry(defaults)
    try:
        ledger = await asyncio.to_thread(Ledger.open, paths.ledger_path())
    except BaseException:
        if telemetry is not None:
            await asyncio.to_thread(telemetry.shutdown)
        raise
    runs = ServedRuns(ledger, defaults, settings.auth_token, telemetry)
    token = settings.auth_token or control.new_token()
    try:
        await runs.take_up()  # before listening: no call can open a run it is taking up
        servers, url = await start_proxy(
            defaults, runs, token, prefixed=True, host=settings.host, port=settings.port, telemetry=telemetry
        )
    except BaseException:
        for run in runs.live():
            run.stop_clock()
        await asyncio.to_thread(runs.close)
        await asyncio.to_thread(ledger.close)
        if telemetry is not None:
            await asyncio.to_thread(telemetry.shutdown)
        raise
    published = control.publish(runs.owner, control.Control(url, token))
    return Server(url, runs, token, published, ledger, servers)


async def serve_forever(settings: ServeSettings, announce: Callable[[Server], None]) -> None:
    """Serve until SIGTERM or SIGINT, then stop gracefully."""
    server = await start(settings)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    try:
        announce(server)
        await stopping.wait()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        with contextlib.suppress(Exception):
            await server.stop(settings.shutdown_grace)
        if server.runs.telemetry is not None:  # the spans of runs left unended end here, and all is exported
            await asyncio.to_thread(server.runs.telemetry.shutdown)
