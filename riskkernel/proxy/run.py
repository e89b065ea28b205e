"""A run as this process serves it: its governor, its live calls, and what happens when it halts.

The governor decides; `LiveRun` carries the consequences out on the event loop: a halt cuts the run's
live calls (by closing their upstream responses, which wakes their relays at once) and tells whoever
listens (the runner terminates the child under `--on-halt terminate`).

A budget halt cuts live streams, whose spend is still growing; a whole response already being generated
is let finish and settle, since the provider bills it whether or not rk waits for it. A kill or the end
of the time budget cuts everything.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Protocol

import aiohttp
from aiohttp import web

from riskkernel.governor import Governor, Ticket
from riskkernel.ledger.store import Ledger, record_halt
from riskkernel.models import HaltReason, RunRecord

_CUTS_EVERY_CALL = frozenset({HaltReason.KILLED, HaltReason.TIME})


class LiveCall:
    """An admitted call in flight; `cut()` ends it from outside its own task: by closing its upstream
    response, or, while the request is still on its way there, by cancelling that wait. `time_out()` ends it
    the same way when its upstream has been silent too long (see `watch_silence`)."""

    __slots__ = ("connecting", "cut_message", "cut_reason", "seen", "streaming", "timed_out", "upstream", "waiting")

    def __init__(self) -> None:
        self.cut_reason: HaltReason | None = None
        self.cut_message: str | None = None  # what the client is told, when not what the halt reason says
        self.connecting: asyncio.Task[object] | None = None  # the task waiting for the upstream's answer
        self.upstream: aiohttp.ClientResponse | None = None
        self.streaming = False
        self.waiting: float | None = None  # since when (loop time) rk has waited on the upstream; None: it is not
        self.seen = 0  # the upstream's body bytes when last looked at
        self.timed_out = False

    def wait(self) -> None:
        """rk is waiting on the upstream again (it had stopped to write to the client)."""
        self.waiting = asyncio.get_running_loop().time()

    def time_out(self) -> None:
        if self.cut_reason is None and not self.timed_out:
            self.timed_out = True
            if self.upstream is not None:
                self.upstream.close()
            elif self.connecting is not None:
                self.connecting.cancel()

    def why(self, governor: Governor) -> str:
        """The message for the client of a call that was cut."""
        assert self.cut_reason is not None
        return self.cut_message or governor.message(self.cut_reason)

    def cut(self, reason: HaltReason, message: str | None = None) -> None:
        if self.cut_reason is None:
            self.cut_reason = reason
            self.cut_message = message
            if self.upstream is not None:
                self.upstream.close()
            elif self.connecting is not None:
                self.connecting.cancel()


class LiveRun:
    def __init__(self, record: RunRecord, ledger: Ledger, last_seq: int = 0) -> None:
        self.record = record
        self.id = record.run_id
        self.ledger = ledger
        self.governor = Governor(record.budget, record.run_id, time.monotonic())
        self.calls: set[LiveCall] = set()
        self.halt_listeners: list[Callable[[HaltReason], None]] = []
        self._seq = last_seq  # calls are numbered on from here (a run resumed by a new owner goes on)
        self._timer: asyncio.TimerHandle | None = None
        self._waiting: list[asyncio.Future[None]] = []  # calls waiting for room held by calls in flight

    def next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def start_clock(self) -> None:
        """Halt the run when its time budget runs out, even if no call is made then."""
        deadline = self.governor.deadline()
        if deadline is not None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_at(loop.time() + deadline - time.monotonic(), self.halt, HaltReason.TIME)

    def stop_clock(self) -> None:
        if self._timer is not None:
            self._timer.cancel()

    def halt(self, reason: HaltReason) -> None:
        if self.governor.halt(reason):
            self.halted(reason)

    def kill(self) -> None:
        """The kill switch: halt with `killed` and cut every call in flight. A run already halted keeps its
        reason (halted stays halted), but its calls in flight are cut all the same."""
        if self.governor.halt(HaltReason.KILLED):
            self.halted(HaltReason.KILLED)
        else:
            for call in list(self.calls):
                call.cut(HaltReason.KILLED)

    def progress(self, ticket: Ticket, cost: Decimal, tokens: int) -> None:
        """A live stream has cost this much so far; halt the run if that spends a budget."""
        reason = self.governor.progress(ticket, cost, tokens)
        if reason is not None:
            self.halted(reason)

    def settle(self, ticket: Ticket, cost: Decimal, tokens: int) -> None:
        """Charge a finished call; halt the run if that spends a budget."""
        reason = self.governor.settle(ticket, cost, tokens)
        if reason is not None:
            self.halted(reason)
        self._wake()

    async def room_freed(self) -> None:
        """Wait until a call in flight settles (freeing what it reserved beyond what it used) or the run
        halts: a call that did not fit may fit now, or learn that it never will."""
        waiter = asyncio.get_running_loop().create_future()
        self._waiting.append(waiter)
        await waiter

    def _wake(self) -> None:
        waiting, self._waiting = self._waiting, []
        for waiter in waiting:
            if not waiter.done():
                waiter.set_result(None)

    def seen(self, subject: bytes) -> bool:
        """Count a request under `--max-repeats`; True if that halted the run with `loop_detected`."""
        if not self.governor.seen(subject):
            return False
        self.halted(HaltReason.LOOP)
        return True

    def check_time(self) -> None:
        if self.governor.check_time(time.monotonic()):
            self.halted(HaltReason.TIME)

    def halted(self, reason: HaltReason) -> None:
        """The governor has just halted the run: keep the halt in the ledger, cut its streams, and tell the
        listeners."""
        self.ledger.submit(record_halt(self.id, reason))  # not awaited: a halt never waits on the disk
        self.stop_clock()
        for call in list(self.calls):
            if call.streaming or reason in _CUTS_EVERY_CALL:
                call.cut(reason)
        for listener in self.halt_listeners:
            listener(reason)
        self._wake()


async def watch_silence(runs: Runs, limit: float) -> None:
    """The read timeout: time out every call whose upstream has sent nothing for `limit` seconds while rk
    waited on it (a client too slow to take what was sent is not the upstream's silence).

    One look every tenth of the limit (at most every second), rather than a timer per read, which costs the
    proxy more than anything else it does per call: a call times out within 1.2x its limit (or 2 s past it)."""
    loop = asyncio.get_running_loop()
    period = min(limit / 10, 1.0)
    while True:
        await asyncio.sleep(period)
        now = loop.time()
        for run in runs.live():
            for call in run.calls:
                since = call.waiting
                if since is None or call.timed_out:
                    continue
                if call.upstream is not None:
                    received = call.upstream.content.total_bytes
                    if received != call.seen:
                        call.seen, call.waiting = received, now
                        continue
                if now - since >= limit:
                    call.time_out()


@dataclass(frozen=True, slots=True)
class Unresolved:
    """Why a request has no run to go to: an error the proxy answers in the provider's shape."""

    status: int
    code: str
    message: str


class Runs(Protocol):
    """The runs a proxy serves, and which one a request belongs to."""

    def live(self) -> list[LiveRun]: ...

    def get(self, run_id: str) -> LiveRun | None: ...

    async def resolve(self, request: web.Request) -> LiveRun | Unresolved:
        """The run a proxied request belongs to (its path prefix is in `match_info["prefix"]`)."""
        ...

    async def release(self, run: LiveRun) -> None:
        """A call of `run` is over (a single-call run ends here)."""
        ...

    async def create(self, spec: dict[str, Any]) -> LiveRun:
        """A new run from a `POST /rk/runs` body; ValueError if the body is wrong."""
        ...

    async def finish(self, run: LiveRun) -> None:
        """End a run: its row is final in the ledger and it leaves memory."""
        ...

    def prefix(self, run: LiveRun) -> str:
        """The path prefix (`run/ID/`, with the token if one is needed) a client of `run` puts before `v1/`."""
        ...


class OneRun:
    """`rk run`: every call belongs to its one run, which ends when the agent does."""

    def __init__(self, run: LiveRun) -> None:
        self.run = run

    def live(self) -> list[LiveRun]:
        return [self.run]

    def get(self, run_id: str) -> LiveRun | None:
        return self.run if run_id == self.run.id else None

    async def resolve(self, request: web.Request) -> LiveRun | Unresolved:
        return self.run

    async def release(self, run: LiveRun) -> None:
        pass

    async def create(self, spec: dict[str, Any]) -> LiveRun:
        raise ValueError("rk run serves one run: start another rk run, or use rk serve")

    async def finish(self, run: LiveRun) -> None:
        raise ValueError("an rk run's run ends when its agent exits")

    def prefix(self, run: LiveRun) -> str:
        return ""
