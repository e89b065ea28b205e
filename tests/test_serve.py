"""`rk serve`: many runs in one proxy, grouped by header or base URL, created and finished through the `/rk`
API, guarded by a token, killed with `rk kill`, kept across a restart or a crash, stopped gracefully, and
holding only live runs in memory however many it has served."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import openai
import pytest

from riskkernel import control, paths
from riskkernel.config import RunSettings
from riskkernel.ledger import store
from riskkernel.models import Budget, Flag, RunStatus, usd
from riskkernel.serve import SINGLE_CALL_COMMAND, Server, ServeSettings, start
from tests.conftest import SECRET, agent_script, rk
from tests.fakes import FakeUpstream, MessagesReply, Reply
from tests.test_run_cli import PY, TWO_CALLS

MESSAGES: list[Any] = [{"role": "user", "content": "hi"}]
TOKEN = "test-token-0123456789abcdef"

StartServer = Callable[..., Awaitable[Server]]


@pytest.fixture
async def start_server(fake: FakeUpstream) -> AsyncIterator[StartServer]:
    started: list[Server] = []

    async def begin(budget: Budget | None = None, auth_token: str | None = None, mock: bool = False) -> Server:
        defaults = RunSettings(
            budget=budget or Budget(max_cost=None), openai_upstream=fake.url, anthropic_upstream=fake.root, mock=mock
        )
        server = await start(ServeSettings(defaults, port=0, auth_token=auth_token))
        started.append(server)
        return server

    yield begin
    for server in started:
        if server.servers[0].sites:
            await server.stop(0)


_OPEN: list[openai.AsyncOpenAI | anthropic.AsyncAnthropic] = []


@pytest.fixture(autouse=True)
async def _close_clients() -> AsyncIterator[None]:
    yield
    while _OPEN:
        await _OPEN.pop().close()


def client(base: str, **kwargs: Any) -> openai.AsyncOpenAI:
    made = openai.AsyncOpenAI(base_url=base, api_key=SECRET, max_retries=0, **kwargs)
    _OPEN.append(made)
    return made


def claude_client(base: str) -> anthropic.AsyncAnthropic:
    made = anthropic.AsyncAnthropic(base_url=base, api_key=SECRET, max_retries=0)
    _OPEN.append(made)
    return made


def ledger_runs() -> dict[str, store.RunRecord]:
    db = store.open_reader(paths.ledger_path())
    assert db is not None
    try:
        return {run.run_id: run for run in store.list_runs(db, None)}
    finally:
        db.close()


def calls_of(run_id: str) -> list[store.CallRecord]:
    db = store.open_reader(paths.ledger_path())
    assert db is not None
    try:
        return list(store.iter_calls(db, run_id))
    finally:
        db.close()


async def spawn_serve(fake: FakeUpstream, *args: str) -> tuple[asyncio.subprocess.Process, str]:
    """`rk serve` as a real process of its own, and its URL."""
    env = {**os.environ, "OPENAI_BASE_URL": fake.url}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "riskkernel", "serve", "--port", "0", *args, env=env, stderr=asyncio.subprocess.PIPE
    )
    assert proc.stderr is not None
    first = (await asyncio.wait_for(proc.stderr.readline(), 20)).decode()
    assert first.startswith("rk serve: http://"), first  # its announcement, else why it has none
    return proc, first.split()[2]


async def api(server: Server, method: str, path: str, body: Any = None, token: str | None = None) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token or server.token}"}
    async with (
        aiohttp.ClientSession() as http,
        http.request(method, server.url + path, json=body, headers=headers) as response,
    ):
        return response.status, await response.json()


async def test_calls_are_grouped_by_header_and_by_base_url(fake: FakeUpstream, start_server: StartServer) -> None:
    server = await start_server()
    by_path = client(f"{server.url}/run/alpha/v1")
    by_header = client(f"{server.url}/v1", default_headers={"X-RiskKernel-Run-Id": "beta"})
    claude = claude_client(f"{server.url}/run/alpha")
    fake.script(Reply())
    await by_path.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    raw = await by_header.chat.completions.with_raw_response.create(model="gpt-4o", messages=MESSAGES)
    assert raw.headers["x-riskkernel-run-id"] == "beta"
    fake.script(MessagesReply())
    await claude.messages.create(model="claude-sonnet-4-6", max_tokens=100, messages=MESSAGES)
    assert [seen.path for seen in fake.requests] == ["/v1/chat/completions"] * 2 + ["/v1/messages"]
    assert "x-riskkernel-run-id" not in fake.requests[1].headers  # rk's own headers never go upstream
    status, live = await api(server, "GET", "/rk/runs")
    spent = {run["run_id"]: run["spent"]["calls"] for run in live["runs"]}
    assert status == 200 and spent == {"alpha": 2, "beta": 1}
    assert [c.endpoint for c in calls_of("alpha")] == ["/v1/chat/completions", "/v1/messages"]
    assert ledger_runs()["alpha"].status is RunStatus.RUNNING


async def test_an_ungrouped_call_is_a_run_of_its_own_that_leaves_memory(
    fake: FakeUpstream, start_server: StartServer
) -> None:
    server = await start_server(Budget(max_cost=Decimal("1.00")))
    plain = client(f"{server.url}/v1")
    ids = set()
    for _ in range(20):
        raw = await plain.chat.completions.with_raw_response.create(model="gpt-4o", messages=MESSAGES)
        ids.add(raw.headers["x-riskkernel-run-id"])
    assert len(ids) == 20 and server.runs.runs == {}  # every one ended with its call
    runs = ledger_runs()
    assert all(runs[i].status is RunStatus.COMPLETED and runs[i].totals.calls == 1 for i in ids)
    assert all(runs[i].budget.max_cost == Decimal("1.00") for i in ids)  # the server's default budget
    with pytest.raises(openai.BadRequestError, match="a run id is 1 to 64"):
        await client(f"{server.url}/v1", default_headers={"X-RiskKernel-Run-Id": "../etc"}).models.list()


async def test_a_run_made_through_the_api_has_its_budget_and_ends_when_finished(
    fake: FakeUpstream, start_server: StartServer
) -> None:
    server = await start_server()
    body = {"run_id": "nightly", "name": "n", "tags": {"team": "x"}, "budget": {"max_calls": 1}}
    status, made = await api(server, "POST", "/rk/runs", body)
    assert status == 201 and made["openai_base_url"] == f"{server.url}/run/nightly/v1"
    assert made["budget"]["max_calls"] == 1 and made["budget"]["max_cost_usd"] is None
    assert (await api(server, "POST", "/rk/runs", body))[0] == 400  # it exists
    assert (await api(server, "POST", "/rk/runs", {"budget": {"max_cost_usd": "-1"}}))[0] == 400
    agent = client(made["openai_base_url"])
    await agent.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    with pytest.raises(openai.APIStatusError, match="call budget exceeded") as refused:
        await agent.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert refused.value.status_code == 402
    status, done = await api(server, "POST", "/rk/runs/nightly/finish")
    assert status == 200 and done["status"] == "halted" and done["halt_reason"] == "call_budget_exceeded"
    record = ledger_runs()["nightly"]
    assert record.status is RunStatus.HALTED and record.name == "n" and record.tags == {"team": "x"}
    with pytest.raises(openai.APIStatusError, match="has ended") as ended:
        await agent.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert ended.value.status_code == 410 and len(fake.requests) == 1


async def test_with_a_token_every_call_must_carry_it(fake: FakeUpstream, start_server: StartServer) -> None:
    server = await start_server(auth_token=TOKEN)
    assert server.token == TOKEN
    for bad in (client(f"{server.url}/run/a/v1"), client(f"{server.url}/t/wrong-token-00000000/run/a/v1")):
        with pytest.raises(openai.AuthenticationError, match="needs its token"):
            await bad.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    claude = claude_client(f"{server.url}/run/a")
    with pytest.raises(anthropic.AuthenticationError):
        await claude.messages.create(model="claude-sonnet-4-6", max_tokens=10, messages=MESSAGES)
    assert fake.requests == []  # nothing was forwarded
    assert (await api(server, "GET", "/rk/runs", token="nope"))[0] == 401
    await client(f"{server.url}/t/{TOKEN}/run/a/v1").chat.completions.create(model="gpt-4o", messages=MESSAGES)
    header = client(f"{server.url}/run/a/v1", default_headers={"X-RiskKernel-Token": TOKEN})
    await header.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    _, made = await api(server, "POST", "/rk/runs", {})
    assert made["openai_base_url"].startswith(f"{server.url}/t/{TOKEN}/run/")  # works for an unmodified client
    assert len(fake.requests) == 2 and "x-riskkernel-token" not in fake.requests[1].headers


async def test_binding_beyond_loopback_needs_a_token() -> None:
    done = await rk("serve", "--host", "0.0.0.0", "--port", "0")
    assert done.status == 125
    assert "binding beyond loopback needs --auth-token" in done.stderr and "Traceback" not in done.stderr


async def test_a_restart_keeps_what_runs_spent_and_their_halts(fake: FakeUpstream, start_server: StartServer) -> None:
    server = await start_server(Budget(max_cost=None, max_calls=2))
    agent = client(f"{server.url}/run/job/v1")
    await agent.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    killed = client(f"{server.url}/run/stopped/v1")
    await killed.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert (await api(server, "POST", "/rk/runs/stopped/kill"))[1]["killed"] is True
    await server.stop(1)

    again = await start_server(Budget(max_cost=None, max_calls=2))
    _, live = await api(again, "GET", "/rk/runs")  # live at once, before any call
    assert {run["run_id"]: (run["spent"]["calls"], run["halt_reason"]) for run in live["runs"]} == {
        "job": (1, None),
        "stopped": (1, "killed"),
    }
    agent = client(f"{again.url}/run/job/v1")
    await agent.chat.completions.create(model="gpt-4o", messages=MESSAGES)  # the 2nd of 2: spends the budget
    with pytest.raises(openai.APIStatusError, match="call budget exceeded"):
        await agent.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    with pytest.raises(openai.APIStatusError, match="run killed"):
        await client(f"{again.url}/run/stopped/v1").chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert len(fake.requests) == 3
    assert [c.seq for c in calls_of("job")] == [1, 2, 3]  # numbering goes on too


async def test_a_restart_after_a_crash_takes_up_unended_runs_at_once(
    fake: FakeUpstream, start_server: StartServer
) -> None:
    (crashing, crashing_url), (other, other_url) = await asyncio.gather(spawn_serve(fake), spawn_serve(fake))
    try:
        await client(f"{crashing_url}/run/job/v1").chat.completions.create(model="gpt-4o", messages=MESSAGES)
        await client(f"{crashing_url}/run/stopped/v1").chat.completions.create(model="gpt-4o", messages=MESSAGES)
        assert (await rk("kill", "stopped")).status == 0
        await client(f"{other_url}/run/elsewhere/v1").chat.completions.create(model="gpt-4o", messages=MESSAGES)
        fake.script(Reply(endless=True, delay=0.01))
        raw = await client(f"{crashing_url}/v1").chat.completions.with_raw_response.create(
            model="gpt-4o", messages=MESSAGES, stream=True
        )
        single = raw.headers["x-riskkernel-run-id"]  # a run of its own, its call in flight at the crash
        stream = raw.parse()
        await stream.__anext__()
        crashing.send_signal(signal.SIGKILL)  # nothing ended, nothing cleaned up
        await crashing.wait()
        await stream.close()
        dead_owner = ledger_runs()[single].owner
        assert dead_owner is not None and control.control_file(dead_owner).exists()
        forwarded = len(fake.requests)

        server = await start_server()
        status, live = await api(server, "GET", "/rk/runs")
        assert status == 200 and len(fake.requests) == forwarded
        runs = {run["run_id"]: run for run in live["runs"]}
        assert sorted(runs) == ["job", "stopped"]  # not the single call's run, not the live server's run
        (paid,) = calls_of("job")
        assert paid.cost > 0 and runs["job"]["spent"] == {"cost_usd": usd(paid.cost), "tokens": 120, "calls": 1}
        assert (runs["job"]["status"], runs["job"]["halt_reason"]) == ("running", None)
        assert (runs["stopped"]["status"], runs["stopped"]["halt_reason"]) == ("halted", "killed")
        assert runs["stopped"]["spent"]["calls"] == 1
        assert (await api(server, "GET", "/rk/runs/stopped"))[1]["halt_reason"] == "killed"
        records = ledger_runs()
        assert all(records[i].owner == server.runs.owner for i in ("job", "stopped"))
        assert all(records[i].status is RunStatus.RUNNING for i in ("job", "stopped"))
        assert records[single].status is RunStatus.INTERRUPTED and records[single].command == SINGLE_CALL_COMMAND
        assert records["elsewhere"].owner != server.runs.owner and records["elsewhere"].status is RunStatus.RUNNING
        assert not control.control_file(dead_owner).exists()  # the crashed server's, which nobody answered

        killed = await rk("kill", "job")
        assert killed.status == 0 and killed.stderr.startswith("rk: killed run job (0 calls in flight cut")
        with pytest.raises(openai.APIStatusError, match="run killed") as refused:
            await client(f"{server.url}/run/job/v1").chat.completions.create(model="gpt-4o", messages=MESSAGES)
        assert refused.value.status_code == 402 and len(fake.requests) == forwarded
        with pytest.raises(openai.ConflictError, match="served by another live rk process"):
            await client(f"{server.url}/run/elsewhere/v1").chat.completions.create(model="gpt-4o", messages=MESSAGES)
        with pytest.raises(openai.APIStatusError, match="one call's own run") as ended:
            await client(f"{server.url}/run/{single}/v1").chat.completions.create(model="gpt-4o", messages=MESSAGES)
        assert ended.value.status_code == 410 and len(fake.requests) == forwarded
    finally:
        for proc in (crashing, other):
            if proc.returncode is None:
                proc.terminate()
                await asyncio.wait_for(proc.wait(), 20)


def footprint() -> tuple[int, int]:
    """This process's Python memory blocks in use, and its resident set in bytes."""
    gc.collect()
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return sys.getallocatedblocks(), pages * os.sysconf("SC_PAGE_SIZE")


async def test_single_call_runs_leave_nothing_behind_in_memory(start_server: StartServer) -> None:
    """Runs by the thousand, through real HTTP to the mock upstream: what the server holds after 5,000 is what
    it held after 1,000. (bench/serve_runs_memory.py runs 100,000 against an `rk serve` process.)"""
    server = await start_server(Budget(max_cost=Decimal("1.00")), mock=True)
    url = f"{server.url}/v1/chat/completions"
    body = json.dumps({"model": "gpt-4o-mini", "messages": MESSAGES}).encode()
    headers = {"Authorization": f"Bearer {SECRET}", "Content-Type": "application/json"}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=16)) as http:

        async def drive(runs: int) -> None:
            left = runs

            async def caller() -> None:
                nonlocal left
                while left > 0:
                    left -= 1
                    async with http.post(url, data=body, headers=headers) as response:
                        assert response.status == 200, await response.text()
                        await response.read()

            await asyncio.gather(*(caller() for _ in range(16)))
            await server.ledger.commit(())

        await drive(1_000)  # prices loaded, connections and caches warm
        blocks, rss = footprint()
        await drive(4_000)
        grown_blocks, grown_rss = (now - then for now, then in zip(footprint(), (blocks, rss), strict=True))
    assert server.runs.runs == {} and server.runs.single == set()
    # One object kept per run would be 4,000 more blocks (measured: within ±100). Two kilobytes kept per run
    # outside Python's allocator (SQLite, sockets) would be 8 MiB more resident (measured: about 1.4 MiB, as
    # bounded caches such as the ledger's page cache, at most 2 MiB, fill while the ledger grows).
    assert grown_blocks < 1_000, f"{grown_blocks} more memory blocks after 4,000 more runs"
    assert grown_rss < 8 * 2**20, f"{grown_rss / 2**20:.1f} MiB more resident after 4,000 more runs"
    db = store.open_reader(paths.ledger_path())
    assert db is not None
    try:
        ended = store.RunFilter(statuses=(RunStatus.COMPLETED,))
        assert sum(run.command == SINGLE_CALL_COMMAND for run in store.iter_runs(db, ended)) == 5_000
    finally:
        db.close()


async def test_shutdown_lets_calls_finish_then_cuts_and_records_them(
    fake: FakeUpstream, start_server: StartServer
) -> None:
    server = await start_server()
    fake.script(Reply(endless=True, delay=0.01))
    agent = client(f"{server.url}/run/long/v1")
    stream = await agent.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)
    await stream.__anext__()
    stopping = asyncio.create_task(server.stop(0.3))
    with pytest.raises(openai.APIError, match="rk: rk serve is shutting down, which cut this call; run long goes on"):
        async for _ in stream:
            pass
    await stopping
    (row,) = calls_of("long")
    assert Flag.CUT in row.flags and Flag.ESTIMATED in row.flags
    assert ledger_runs()["long"].status is RunStatus.RUNNING  # not ended: the next server picks it up


async def test_rk_kill_stops_a_run_of_rk_serve(fake: FakeUpstream, tmp_path: Path) -> None:
    env = {**os.environ, "OPENAI_BASE_URL": fake.url}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "riskkernel", "serve", "--port", "0", "--max-cost", "unlimited", env=env,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stderr is not None
    first = (await asyncio.wait_for(proc.stderr.readline(), 20)).decode()
    url = first.split()[2]
    fake.script(Reply(endless=True, delay=0.01))
    agent = client(f"{url}/run/runaway/v1")
    stream = await agent.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)
    await stream.__anext__()
    killed = await rk("kill", "runaway")
    assert killed.status == 0 and killed.stderr.startswith("rk: killed run runaway (1 call in flight cut")
    with pytest.raises(openai.APIError, match="run killed"):
        async for _ in stream:
            pass
    with pytest.raises(openai.APIStatusError, match="run killed"):
        await agent.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    proc.terminate()
    assert await asyncio.wait_for(proc.wait(), 20) == 0
    record = ledger_runs()["runaway"]
    assert record.halt_reason == "killed" and [c.status for c in calls_of("runaway")] == [200, 402]
    listed = json.loads((await rk("ledger", "list", "--json")).stdout)
    assert listed[0]["status"] == "interrupted" and listed[0]["halt_reason"] == "killed"


async def test_rk_run_via_makes_the_run_on_the_server(
    fake: FakeUpstream, start_server: StartServer, tmp_path: Path
) -> None:
    server = await start_server()
    script = agent_script(tmp_path, TWO_CALLS + "print(os.environ['OPENAI_BASE_URL'], flush=True)")
    done = await rk(
        "run", "--via", server.url, "--max-calls", "1", "--name", "via-job", "--json", "out.json", "--", PY, script,
        env={"OPENAI_API_KEY": SECRET},
    )  # fmt: skip
    assert done.status == 3, done.stderr  # capped by the server: the second call got 402
    out = done.stdout.decode().splitlines()
    assert out[:2] == ["call 0 ok", "call 1 402 call_budget_exceeded"]
    run_id = json.loads((tmp_path / "out.json").read_text())["run_id"]
    assert out[2] == f"{server.url}/run/{run_id}/v1"
    assert "halted: call_budget_exceeded" in done.stderr and "gpt-4o" in done.stderr  # the cost table
    record = ledger_runs()[run_id]
    assert record.name == "via-job" and record.budget.max_calls == 1 and record.status is RunStatus.HALTED
    assert len(fake.requests) == 1 and server.runs.runs == {}  # finished: it left the server's memory

    refused = await rk("run", "--via", server.url, "--mock", "--", PY, "-c", "pass")
    assert refused.status == 125 and "--mock is the server's to set" in refused.stderr


async def test_rk_run_via_never_takes_the_token_of_a_crashed_server_at_the_same_address(
    start_server: StartServer,
) -> None:
    server = await start_server()
    dead = await asyncio.create_subprocess_exec(sys.executable, "-c", "pass")
    await dead.wait()  # its pid is free now: the owner of the file below is gone
    stale = server.control_file.with_name(f"{dead.pid}-1.json")
    control.publish(f"host:{dead.pid}:1", control.Control(server.url, "stale-token-0123456789"))
    assert stale.exists()
    server.control_file.rename(server.control_file.with_suffix(".away"))  # so only the stale file names the URL
    done = await rk("run", "--via", server.url, "--", PY, "-c", "pass")
    assert done.status == 125 and "no token for it" in done.stderr, done.stderr  # not the server's 401


async def test_rk_run_via_stops_the_agent_when_the_server_halts_the_run(
    fake: FakeUpstream, start_server: StartServer, tmp_path: Path
) -> None:
    server = await start_server(auth_token=TOKEN)
    script = agent_script(tmp_path, TWO_CALLS + "import time; time.sleep(60)")
    done = await rk(
        "run", "--via", server.url, "--max-calls", "1", "--on-halt", "terminate", "--grace", "1", "--", PY, script,
        env={"OPENAI_API_KEY": SECRET, "RK_AUTH_TOKEN": TOKEN}, timeout=30,
    )  # fmt: skip
    assert done.status == 3, done.stderr
    assert "halted: call_budget_exceeded" in done.stderr
    no_token = await rk("run", "--via", "http://127.0.0.1:9", "--", PY, "-c", "pass")
    assert no_token.status == 125 and "no token for it" in no_token.stderr
