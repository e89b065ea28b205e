"""The kill switch: `rk kill RUN_ID` from another process against a live `rk run`, and the `/rk` API behind
it, with its token."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import sys
from pathlib import Path

import aiohttp

from riskkernel import control, paths
from riskkernel.ledger import store
from riskkernel.models import Flag, RunStatus
from tests.conftest import StartProxy, agent_script, rk
from tests.fakes import FakeUpstream, Reply
from tests.test_run_cli import PY, key_env

STREAM_THEN_CALL = """
import pathlib
pathlib.Path(sys.argv[1]).write_text(os.environ["RK_RUN_ID"])
stream = client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "go"}], stream=True)
try:
    for i, chunk in enumerate(stream):
        if i == 3:
            print("streaming", flush=True)
except openai.APIError as exc:
    print("raised:", type(exc).__name__, exc.message, flush=True)
try:
    client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "again"}])
except openai.APIStatusError as exc:
    print("then:", exc.status_code, exc.message, flush=True)
"""


async def start_run(*args: str, env: dict[str, str]) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        PY,
        "-m",
        "riskkernel",
        "run",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **env},
    )


async def test_rk_kill_cuts_a_live_stream_and_the_run_exits_3(tmp_path: Path, fake: FakeUpstream) -> None:
    fake.script(Reply(endless=True, delay=0.01))
    script = agent_script(tmp_path, STREAM_THEN_CALL)
    run_file = tmp_path / "run_id"
    proc = await start_run("--", PY, script, str(run_file), env=key_env(fake))
    assert proc.stdout is not None and proc.stderr is not None
    assert await asyncio.wait_for(proc.stdout.readline(), 20) == b"streaming\n"
    run_id = run_file.read_text()

    db = store.open_reader(paths.ledger_path())
    assert db is not None
    owner = store.find_run(db, run_id).owner
    assert owner is not None
    published = control.control_file(owner)
    assert stat.S_IMODE(published.stat().st_mode) == 0o600  # the token is the owner user's alone
    assert stat.S_IMODE(published.parent.stat().st_mode) == 0o700

    killed = await rk("kill", run_id[:8])
    assert killed.status == 0, killed.stderr
    assert killed.stderr.startswith(f"rk: killed run {run_id[:8]} (1 call in flight cut; spent $")

    out, err = await asyncio.wait_for(proc.communicate(), 20)  # the endless stream ended: the SDK raised
    assert proc.returncode == 3, err.decode()
    lines = out.decode().splitlines()
    assert lines[0].startswith("raised: APIError rk: run killed")
    assert lines[1].startswith("then: 402 ") and "rk: run killed (run" in lines[1]
    assert "halted: killed" in err.decode()
    assert not published.exists()  # removed when the run ended

    record = store.find_run(db, run_id)
    assert record.status is RunStatus.HALTED and record.halt_reason == "killed"
    first, second = store.iter_calls(db, run_id)
    assert Flag.CUT in first.flags and Flag.ESTIMATED in first.flags and first.error == "cut: killed"
    assert second.status == 402 and Flag.REFUSED in second.flags
    again = await rk("kill", run_id)
    assert again.status == 1 and again.stderr.strip() == f"rk: run {run_id[:8]} is not live (halted: killed)"


async def test_rk_kill_stops_the_agent_under_on_halt_terminate(tmp_path: Path) -> None:
    script = agent_script(
        tmp_path, "import pathlib, time\npathlib.Path(sys.argv[1]).write_text(os.environ['RK_RUN_ID'])\ntime.sleep(60)"
    )
    run_file = tmp_path / "run_id"
    proc = await start_run("--on-halt", "terminate", "--grace", "2", "--", PY, script, str(run_file), env={})
    for _ in range(200):
        if run_file.exists() and run_file.read_text():
            break
        await asyncio.sleep(0.05)
    killed = await rk("kill", run_file.read_text(), "--json")
    assert killed.status == 0, killed.stderr
    reply = json.loads(killed.stdout)
    assert reply["killed"] is True and reply["status"] == "halted" and reply["halt_reason"] == "killed"
    assert reply["spent"] == {"cost_usd": "0.0000", "tokens": 0, "calls": 0} and reply["cut"] == 0
    _, err = await asyncio.wait_for(proc.communicate(), 20)  # long before the agent's 60 s sleep ends
    assert proc.returncode == 3 and "halted: killed" in err.decode()


async def test_rk_kill_says_why_it_cannot(tmp_path: Path) -> None:
    assert (await rk("kill", "abc")).stderr.strip() == "rk: no run with id 'abc' (the ledger is empty)"
    done = await rk("run", "--quiet", "--", PY, "-c", "pass")
    assert done.status == 0
    listed = json.loads((await rk("ledger", "list", "--json")).stdout)
    finished = await rk("kill", listed[0]["run_id"])
    assert finished.status == 1 and finished.stderr.strip().endswith("is not live (completed)")
    missing = await rk("kill", "zzz")
    assert missing.status == 1 and missing.stderr.strip() == "rk: no run with id 'zzz'"


async def test_the_rk_api_needs_the_token(fake: FakeUpstream, start_proxy: StartProxy) -> None:
    proxy = await start_proxy()
    run = f"{proxy.url}/rk/runs/{proxy.run_id}"
    good = {"Authorization": f"Bearer {proxy.token}"}
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{proxy.url}/rk/health") as response:  # the only route open to anyone
            assert response.status == 200 and (await response.json())["ok"] is True
        for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": proxy.token}):
            for method, url in (("GET", run), ("POST", f"{run}/kill"), ("GET", f"{proxy.url}/rk/runs")):
                async with http.request(method, url, headers=headers) as response:
                    assert response.status == 401
                    assert (await response.json())["error"]["code"] == "unauthorized"
        assert proxy.live.governor.halt_reason is None  # nothing was killed
        async with http.get(run, headers=good) as response:
            status = await response.json()
        assert status["status"] == "running" and status["run_id"] == proxy.run_id and status["in_flight"] == 0
        async with http.get(f"{proxy.url}/rk/runs", headers=good) as response:
            assert [r["run_id"] for r in (await response.json())["runs"]] == [proxy.run_id]
        async with http.post(f"{proxy.url}/rk/runs/other/kill", headers=good) as response:
            assert response.status == 404 and (await response.json())["error"]["code"] == "unknown_run"
        async with http.get(f"{proxy.url}/rk/nothing", headers=good) as response:
            assert response.status == 404
        async with http.post(f"{run}/kill", headers=good) as response:
            assert (await response.json())["killed"] is True
    assert proxy.live.governor.halt_reason == "killed"
    assert fake.requests == []  # the /rk API never reaches an upstream


def test_rk_kill_imports_no_aiohttp() -> None:
    import subprocess

    code = "import sys, riskkernel.cli.kill, riskkernel.control; print('aiohttp' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
