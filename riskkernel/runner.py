"""`rk run`: a proxy on an ephemeral loopback port, the child pointed at it, and the child's exit turned
into the run's end.

Process groups: on a terminal (stdin is a tty and rk is in its foreground group) the child shares rk's
group, so it owns the terminal exactly as it would without rk and gets Ctrl-C from it directly; rk then
halts the run (`killed`) without sending a second SIGINT. Elsewhere (CI, scripts) the child gets a group
of its own, so `--on-halt terminate` can stop the agent and everything it spawned without touching rk or
its neighbours in a pipeline; signals rk receives are passed on to that group, as they would have
reached it had rk not moved it. A second Ctrl-C (or SIGINT) terminates the child.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from aiohttp import web

from riskkernel import control, paths
from riskkernel.config import NOT_INHERITED, RunSettings, otel_wanted, parse_upstream
from riskkernel.errors import ExitCode, LedgerError
from riskkernel.ledger import store
from riskkernel.ledger.store import Ledger, owner_id
from riskkernel.models import HaltReason, RunRecord, RunStatus, now_iso
from riskkernel.pricing import PriceBook
from riskkernel.providers import redact
from riskkernel.providers.catalog import PROVIDERS
from riskkernel.proxy import serve
from riskkernel.proxy.app import Proxy, make_app
from riskkernel.proxy.mock import MOCK_KEY, make_mock_app
from riskkernel.proxy.run import LiveRun, OneRun, Runs

if TYPE_CHECKING:
    from riskkernel.telemetry import Telemetry

FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)

log = logging.getLogger("riskkernel")


@dataclass(frozen=True)
class Outcome:
    run_id: str
    exit_status: int
    error: str | None = None  # why the child could not be started, or what the ledger lost


def new_run_id() -> str:
    return secrets.token_hex(8)


def child_env(parent: dict[str, str], proxy_url: str, run_id: str, mock: bool) -> dict[str, str]:
    """The child's environment: its SDKs' base URLs point at the proxy; under --mock, keys they need."""
    env = {k: v for k, v in parent.items() if k not in NOT_INHERITED}
    for name in ("NO_PROXY", "no_proxy"):  # an HTTP(S)_PROXY must not take the child's calls away from rk
        env[name] = ",".join(filter(None, [parent.get(name), "127.0.0.1", "localhost", "::1"]))
    for provider in PROVIDERS:
        env.update(dict.fromkeys(provider.base_env, proxy_url + provider.prefix))
        if mock:
            env.setdefault(provider.key_env, MOCK_KEY)
    env.update(RK_RUN_ID=run_id, RK_PROXY_URL=proxy_url)
    return env


def upstreams(settings: RunSettings, parent: dict[str, str]) -> dict[str, str]:
    """Each provider's upstream: the flag, else the base URL rk was started with, else the provider's own."""
    explicit = {"openai": settings.openai_upstream, "anthropic": settings.anthropic_upstream}
    found = {}
    for provider in PROVIDERS:
        inherited = next((parent[name] for name in provider.base_env if parent.get(name)), None)
        inherited = parse_upstream(inherited, what=provider.base_env[0])
        found[provider.name] = explicit[provider.name] or inherited or provider.default_upstream
    return found


def exit_status(returncode: int, halted: bool, terminated: bool = False) -> int:
    """The run's exit status. A child that rk itself terminated because the run halted counts as halted."""
    if terminated or (halted and returncode == 0):
        return ExitCode.HALTED
    if returncode < 0:
        return ExitCode.SIGNALLED + -returncode
    return returncode


def new_record(settings: RunSettings, argv: list[str]) -> RunRecord:
    return RunRecord(
        run_id=new_run_id(),
        name=settings.name,
        command=tuple(redact(arg, limit=None) for arg in argv),
        cwd=os.getcwd(),
        started_at=now_iso(),
        budget=settings.budget,
        tags=settings.tags,
        owner=owner_id(),
    )


async def start_proxy(
    settings: RunSettings,
    runs: Runs,
    control_token: str,
    *,
    prefixed: bool = False,
    host: str = "127.0.0.1",
    port: int = 0,
    telemetry: Telemetry | None = None,
) -> tuple[list[web.AppRunner], str]:
    """Serve the proxy for `runs` (and the mock upstream under --mock), with its `/rk` API behind
    `control_token`: the servers, proxy first, and its URL. `rk run` serves one run, `rk serve` many."""
    servers = []
    bases = upstreams(settings, dict(os.environ))
    if settings.mock:
        mock, mock_url = await serve(make_mock_app())
        servers.append(mock)
        bases = {provider.name: mock_url + provider.prefix for provider in PROVIDERS}
    proxy = Proxy(
        runs=runs,
        control_token=control_token,
        prefixed=prefixed,
        upstreams=bases,
        prices=PriceBook(settings.prices),
        allow_unpriced=settings.allow_unpriced,
        allow_unmetered=settings.allow_unmetered,
        connect_timeout=settings.connect_timeout,
        read_timeout=settings.read_timeout,
        telemetry=telemetry,
    )
    try:
        server, url = await serve(make_app(proxy), host, port)
    except BaseException:
        for runner in servers:
            await runner.cleanup()
        raise
    return [server, *servers], url


def start_telemetry(settings: RunSettings) -> Telemetry | None:
    """OpenTelemetry export, if `--otel` or the environment asks for it (see `config.otel_wanted`)."""
    if not otel_wanted(settings.otel, os.environ):
        return None
    from riskkernel import telemetry

    return telemetry.start(os.environ)


async def run(
    settings: RunSettings, argv: list[str], announce: Callable[[RunRecord, str], None] = lambda record, url: None
) -> Outcome:
    """Run `argv` under a proxy that enforces `settings`; the ledger holds the run when this returns."""
    telemetry = start_telemetry(settings)  # first: without its exporter, rk stops before anything has begun
    try:
        return await _run(settings, argv, announce, telemetry)
    finally:
        if telemetry is not None:
            await asyncio.to_thread(telemetry.shutdown)


async def _run(
    settings: RunSettings, argv: list[str], announce: Callable[[RunRecord, str], None], telemetry: Telemetry | None
) -> Outcome:
    ledger = await asyncio.to_thread(Ledger.open, paths.ledger_path())
    record = new_record(settings, argv)
    live = LiveRun(record, ledger)
    servers: list[web.AppRunner] = []
    status = int(ExitCode.RK_FAILED)
    terminated = False
    error = None
    published: Path | None = None
    try:
        await ledger.commit(store.insert_run(record))
    except LedgerError:
        await asyncio.to_thread(ledger.close)
        raise  # the ledger cannot take the run, so rk does not start it
    if telemetry is not None:
        telemetry.run_started(live, os.environ.get("TRACEPARENT"), os.environ.get("TRACESTATE"))
    try:
        token = control.new_token()
        servers, url = await start_proxy(settings, OneRun(live), token, telemetry=telemetry)
        assert record.owner is not None
        published = control.publish(record.owner, control.Control(url, token))  # so that `rk kill` finds us
        announce(record, url)
        env = child_env(dict(os.environ), url, record.run_id, settings.mock)
        if telemetry is not None:
            telemetry.trace_env(record.run_id, env)
        try:
            status, terminated = await _supervise(argv, env, live, settings)
        except _ChildError as exc:
            status, error = exc.code, str(exc)
    finally:
        if published is not None:
            control.unpublish(published)
        live.stop_clock()
        for server in servers:  # the proxy first: its calls in flight may still need the mock
            await server.cleanup()
        halt = live.governor.halt_reason
        final = exit_status(status, halt is not None, terminated)
        run_status = RunStatus.HALTED if halt is not None else RunStatus.COMPLETED
        try:
            await ledger.commit(store.finish_run(record.run_id, run_status, halt, final))
        except LedgerError as exc:
            log.error("rk: %s — the run's end is not there, so it will read as interrupted", exc)
        finally:
            await asyncio.to_thread(ledger.close)
        if telemetry is not None:
            telemetry.run_ended(live, run_status, final)
    if ledger.lost:
        lost = f"rk: {ledger.lost} ledger write(s) failed during the run; what they held is in the log above"
        error = f"{error}\n{lost}" if error else lost
    return Outcome(record.run_id, final, error)


def _interactive() -> bool:
    """Whether rk runs in the foreground of a terminal (through any of stdin, stdout, stderr)."""
    for fd in (0, 1, 2):
        try:
            if os.isatty(fd):
                return os.tcgetpgrp(fd) == os.getpgrp()
        except OSError:
            continue
    return False


class Supervised(Protocol):
    """What the supervisor needs of a run: a `LiveRun` here, or a run on an `rk serve` (`via.RemoteRun`)."""

    halt_listeners: list[Callable[[HaltReason], None]]

    def kill(self) -> None: ...

    def start_clock(self) -> None: ...


async def _supervise(argv: list[str], env: dict[str, str], live: Supervised, settings: RunSettings) -> tuple[int, bool]:
    """Start the child and wait for it: its raw return code (negative for a signal), and whether rk
    terminated it because the run halted."""
    interactive = _interactive()
    try:
        proc = await asyncio.create_subprocess_exec(*argv, env=env, process_group=None if interactive else 0)
    except FileNotFoundError:
        raise _ChildError(ExitCode.NOT_FOUND, f"command not found: {argv[0]}") from None
    except PermissionError:
        raise _ChildError(ExitCode.NOT_EXECUTABLE, f"permission denied: {argv[0]}") from None
    except OSError as exc:
        raise _ChildError(ExitCode.NOT_EXECUTABLE, f"cannot run {argv[0]}: {exc.strerror}") from None

    loop = asyncio.get_running_loop()
    kill_at: float | None = None  # when the child's group gets SIGKILL, once rk has terminated it
    killer: asyncio.TimerHandle | None = None
    interrupts = 0
    halted_terminate = False

    def signal_child(sig: int) -> None:
        try:
            if interactive:
                proc.send_signal(sig)
            else:
                os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass

    def terminate() -> None:
        nonlocal kill_at, killer
        if kill_at is None and proc.returncode is None:
            signal_child(signal.SIGTERM)
            kill_at = loop.time() + settings.grace
            killer = loop.call_at(kill_at, signal_child, signal.SIGKILL)  # the grace period is over

    def on_interrupt() -> None:
        nonlocal interrupts
        interrupts += 1
        if interrupts == 1:
            live.kill()
            if not interactive:
                signal_child(signal.SIGINT)
        else:
            terminate()

    def on_halt(reason: HaltReason) -> None:
        nonlocal halted_terminate
        if settings.on_halt == "terminate" and proc.returncode is None:
            halted_terminate = True
            terminate()

    for sig in FORWARDED_SIGNALS:
        loop.add_signal_handler(sig, signal_child, sig)
    loop.add_signal_handler(signal.SIGINT, on_interrupt)
    live.halt_listeners.append(on_halt)
    live.start_clock()
    try:
        returncode = await proc.wait()
        if kill_at is not None and not interactive:
            await _reap_group(proc.pid, kill_at, loop)
        return returncode, halted_terminate
    finally:
        if killer is not None:
            killer.cancel()
        for sig in (*FORWARDED_SIGNALS, signal.SIGINT):
            loop.remove_signal_handler(sig)


async def _reap_group(pgid: int, kill_at: float, loop: asyncio.AbstractEventLoop) -> None:
    """After a terminated child has exited, what it started may still run in its group: give that the rest
    of the grace period to go, then SIGKILL it too."""
    while loop.time() < kill_at:
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return
        await asyncio.sleep(0.05)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


class _ChildError(Exception):
    """The child could not be started; `code` is the exit status (126 or 127)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
