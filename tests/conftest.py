"""Shared fixtures: every test gets its own data dir (RK_HOME), a fake OpenAI upstream on a loopback port,
and a way to start rk's own proxy for a run in-process, wired exactly as `rk run` wires it."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest

from riskkernel import control, paths, runner
from riskkernel.config import RunSettings
from riskkernel.ledger import store
from riskkernel.ledger.store import Ledger
from riskkernel.models import Budget, CallRecord, RunRecord
from riskkernel.proxy.run import LiveRun, OneRun
from tests.fakes import FakeUpstream

SECRET = "sk-test-SECRETMARKER-0123456789abcdef"
# A run budget of $0.50 and nothing else, as the ledger's JSON (and --json) shows it.
HALF_DOLLAR_BUDGET = {
    "max_cost_usd": "0.50",
    "max_tokens": None,
    "max_calls": None,
    "max_time_s": None,
    "max_repeats": None,
    "strict": False,
}
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def rk_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "rk-home"
    monkeypatch.setenv("RK_HOME", str(home))
    monkeypatch.setenv("RK_CONFIG_DIR", str(tmp_path / "rk-config"))  # never the developer's own config
    ours = ("RK_", "OPENAI_", "ANTHROPIC_", "OTEL_", "TRACEPARENT", "TRACESTATE")  # OTel's too: export is off
    for name in list(os.environ):
        if name.startswith(ours) and name not in ("RK_HOME", "RK_CONFIG_DIR"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    return home


@pytest.fixture
async def fake() -> AsyncIterator[FakeUpstream]:
    upstream = await FakeUpstream().start()
    yield upstream
    await upstream.stop()


@dataclass
class Harness:
    """rk's proxy serving one run, and an `openai` client pointed at it."""

    url: str
    live: LiveRun
    ledger: Ledger
    servers: list[Any]
    client: openai.AsyncOpenAI
    claude: anthropic.AsyncAnthropic
    token: str  # the /rk API's bearer token
    extra_clients: list[openai.AsyncOpenAI | anthropic.AsyncAnthropic] = field(default_factory=list)

    @property
    def run_id(self) -> str:
        return self.live.id

    async def calls(self) -> list[CallRecord]:
        """The run's call rows, once every write queued so far is committed."""
        await self.ledger.commit(())
        return self.committed_calls()

    def committed_calls(self) -> list[CallRecord]:
        """The run's call rows as committed at this instant."""
        db = store.open_reader(paths.ledger_path())
        assert db is not None
        try:
            return list(store.iter_calls(db, self.run_id))
        finally:
            db.close()

    async def record(self) -> RunRecord:
        await self.ledger.commit(())
        db = store.open_reader(paths.ledger_path())
        assert db is not None
        try:
            return store.find_run(db, self.run_id)
        finally:
            db.close()

    def new_client(self, **kwargs: Any) -> openai.AsyncOpenAI:
        client = openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key=SECRET, **{"max_retries": 0, **kwargs})
        self.extra_clients.append(client)
        return client

    def new_claude(self, **kwargs: Any) -> anthropic.AsyncAnthropic:
        client = anthropic.AsyncAnthropic(base_url=self.url, api_key=SECRET, **{"max_retries": 0, **kwargs})
        self.extra_clients.append(client)
        return client


StartProxy = Callable[..., Awaitable[Harness]]


@pytest.fixture
async def start_proxy(fake: FakeUpstream) -> AsyncIterator[StartProxy]:
    started: list[Harness] = []

    async def start(budget: Budget | None = None, **settings: Any) -> Harness:
        settings.setdefault("openai_upstream", fake.url)
        settings.setdefault("anthropic_upstream", fake.root)
        config = RunSettings(budget=budget or Budget(max_cost=None), **settings)
        ledger = Ledger.open(paths.ledger_path())
        record = runner.new_record(config, ["agent"])
        ledger.submit(store.insert_run(record)).result()
        live = LiveRun(record, ledger)
        live.start_clock()
        token = control.new_token()
        servers, url = await runner.start_proxy(config, OneRun(live), token)
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=SECRET, max_retries=0)
        claude = anthropic.AsyncAnthropic(base_url=url, api_key=SECRET, max_retries=0)
        harness = Harness(url, live, ledger, servers, client, claude, token)
        started.append(harness)
        return harness

    yield start
    for harness in started:
        for client in [harness.client, harness.claude, *harness.extra_clients]:
            await client.close()
        harness.live.stop_clock()
        for server in harness.servers:
            await server.cleanup()
        harness.ledger.close()


@dataclass
class Finished:
    status: int
    stdout: bytes
    stderr: str


async def rk(*args: str, env: dict[str, str] | None = None, timeout: float = 30, **kwargs: Any) -> Finished:
    """Run `rk ARGS` as a real subprocess (`python -m riskkernel`) and wait for it."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "riskkernel",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
        **kwargs,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return Finished(proc.returncode, out, err.decode())


def agent_script(tmp_path: Path, body: str, name: str = "agent.py") -> str:
    """Write a child agent script (the openai SDK is importable) and return its path."""
    path = tmp_path / name
    prelude = (
        "import openai, os, sys\n"
        "client = openai.OpenAI(max_retries=0, api_key=os.environ.get('OPENAI_API_KEY', 'sk-x'))\n"
    )
    path.write_text(prelude + body)
    return str(path)
