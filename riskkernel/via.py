"""`rk run --via URL`: the agent's run is made on an existing `rk serve`, which meters and caps it; this
process only supervises the agent. Halts are learnt by polling the server's `/rk` API, and a Ctrl-C kills
the run there, so `--on-halt terminate` and the exit statuses work as under a plain `rk run`."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable
from typing import Any

from riskkernel import control
from riskkernel.config import RunSettings
from riskkernel.errors import RkError
from riskkernel.models import HaltReason, RunRecord, now_iso
from riskkernel.runner import Outcome, _ChildError, _supervise, child_env, exit_status

POLL = 0.5  # seconds between looks at the run's status


class RemoteRun:
    """A run served elsewhere, as the supervisor sees it (see `runner.Supervised`)."""

    def __init__(self, server: control.Control, run_id: str) -> None:
        self.server = server
        self.id = run_id
        self.halt_listeners: list[Callable[[HaltReason], None]] = []
        self.halt_reason: str | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    def kill(self) -> None:
        self._spawn(asyncio.to_thread(control.call, self.server, "POST", f"/rk/runs/{self.id}/kill"))

    def start_clock(self) -> None:
        self._spawn(self._watch())

    def stop_clock(self) -> None:
        for task in self._tasks:
            task.cancel()

    def _spawn(self, work: Any) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled():
            task.exception()  # a kill that could not be delivered shows in the final status instead

    async def _watch(self) -> None:
        while self.halt_reason is None:
            with contextlib.suppress(RkError):
                status = await asyncio.to_thread(control.call, self.server, "GET", f"/rk/runs/{self.id}")
                reason = status.get("halt_reason")
                if reason:
                    self.halt_reason = reason
                    for listener in self.halt_listeners:
                        listener(HaltReason(reason))
                    return
            await asyncio.sleep(POLL)


async def run_via(
    settings: RunSettings,
    argv: list[str],
    server: control.Control,
    announce: Callable[[RunRecord, str], None] = lambda record, url: None,
) -> tuple[Outcome, dict[str, Any]]:
    """Run `argv` in a new run on the `rk serve` at `server`; the outcome and the run's final status there."""
    spec = {"name": settings.name, "tags": settings.tags, "budget": settings.budget.to_json()}
    made = await asyncio.to_thread(control.call, server, "POST", "/rk/runs", spec)
    run_id = str(made["run_id"])
    record = RunRecord(run_id, settings.name, tuple(argv), os.getcwd(), now_iso(), settings.budget)
    announce(record, server.url)
    remote = RemoteRun(server, run_id)
    env = child_env(dict(os.environ), str(made["anthropic_base_url"]), run_id, mock=False)
    status, terminated, error = 0, False, None
    try:
        status, terminated = await _supervise(argv, env, remote, settings)
    except _ChildError as exc:
        status, error = exc.code, str(exc)
    finally:
        remote.stop_clock()
    try:
        final = await asyncio.to_thread(control.call, server, "POST", f"/rk/runs/{run_id}/finish")
    except RkError as exc:
        error = error or f"could not finish run {run_id} on {server.url}: {exc}"
        final = {"run_id": run_id, "halt_reason": remote.halt_reason, "status": "unknown"}
    halted = final.get("halt_reason") is not None
    return Outcome(run_id, exit_status(status, halted, terminated), error), final
