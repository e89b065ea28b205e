"""Process and ledger faults: `rk run` killed with SIGKILL mid-run, and a ledger that cannot be written
(read-only, full, locked). rk keeps every completed call, and fails closed: it forwards no call it could not
record, and says why."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import resource
import shutil
import signal
import sqlite3
import sys
from asyncio.subprocess import Process
from pathlib import Path
from typing import Any

import openai
import pytest

from riskkernel import paths
from riskkernel.config import RunSettings
from riskkernel.ledger import store
from riskkernel.models import Budget, Flag, RunStatus
from riskkernel.serve import ServeSettings, start
from tests.conftest import SECRET, StartProxy, agent_script, rk
from tests.fakes import FakeUpstream, Reply

PY = sys.executable
UNRECORDED = re.compile(r"the call's row, not in the ledger: (\{.*\})")

CALLS_THEN_HANG = """
import pathlib
out = pathlib.Path(sys.argv[1])
for i in range(5):
    client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": f"call {i}"}])
out.write_text(os.environ["RK_RUN_ID"] + " " + str(os.getpid()))
hang = [{"role": "user", "content": "hang"}]
for chunk in client.chat.completions.create(model="gpt-4o", messages=hang, stream=True):
    pass
"""


def key_env(fake: FakeUpstream) -> dict[str, str]:
    return {"OPENAI_API_KEY": SECRET, "OPENAI_BASE_URL": fake.url}


async def rk_run(fake: FakeUpstream, *agent: str, output: int = asyncio.subprocess.PIPE, **kwargs: Any) -> Process:
    """`rk run -- python AGENT...` as a real process, its upstream the fake."""
    return await asyncio.create_subprocess_exec(
        PY, "-m", "riskkernel", "run", "--", PY, *agent,
        stdout=output, stderr=output, env={**os.environ, **key_env(fake)}, **kwargs,
    )  # fmt: skip


def integrity(path: Path) -> str:
    db = sqlite3.connect(path)
    try:
        return str(db.execute("PRAGMA integrity_check").fetchone()[0])
    finally:
        db.close()


async def test_sigkill_of_rk_run_mid_run_loses_no_completed_call(tmp_path: Path, fake: FakeUpstream) -> None:
    fake.script(Reply(), Reply(), Reply(), Reply(), Reply(), Reply(endless=True, delay=0.01))
    marker = tmp_path / "marker"
    proc = await rk_run(fake, agent_script(tmp_path, CALLS_THEN_HANG), str(marker), output=asyncio.subprocess.DEVNULL)
    for _ in range(400):
        if marker.exists() and fake.streams_open:
            break
        await asyncio.sleep(0.05)
    assert marker.exists() and fake.streams_open, "the agent never reached its stream"
    run_id, child = marker.read_text().split()
    proc.kill()  # SIGKILL: rk gets no chance to finalise anything
    await proc.wait()
    with contextlib.suppress(ProcessLookupError):  # the agent, orphaned, is not this test's to leave behind
        os.kill(int(child), signal.SIGKILL)

    assert integrity(paths.ledger_path()) == "ok"
    shown = await rk("ledger", "show", run_id, "--json")
    assert shown.status == 0, shown.stderr
    run = json.loads(shown.stdout)
    assert run["status"] == RunStatus.INTERRUPTED
    completed = [call for call in run["calls"] if call["status"] == 200 and not call["stream"]]
    assert [call["seq"] for call in completed] == [1, 2, 3, 4, 5]  # every call the agent saw complete
    assert all(call["input_tokens"] == 100 and call["output_tokens"] == 20 for call in completed)
    assert run["totals"]["cost_usd"] != "0.0000"


ONE_CALL = """
client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
pathlib.Path(sys.argv[1]).write_text("ran")
"""


def read_only(command: list[str], directory: Path) -> list[str]:
    """`command`, run where `directory` is read-only: for root (whom file modes do not stop), under a
    read-only bind mount in a mount namespace of its own; for anyone else, by taking away write permission."""
    if os.geteuid() != 0:
        for path in [directory, *directory.iterdir()]:
            path.chmod(path.stat().st_mode & ~0o222)
        return command
    if shutil.which("unshare") is None:
        pytest.skip("root, and no unshare(1) to make a read-only mount with")
    mount = f"mount --bind -o ro {directory} {directory}"
    return ["unshare", "-m", "sh", "-c", f'{mount} && exec "$@"', "sh", *command]


async def test_a_read_only_ledger_stops_rk_run_before_the_agent_starts(tmp_path: Path, fake: FakeUpstream) -> None:
    first = await rk("run", "-q", "--mock", "--", PY, "-c", "pass")  # the ledger exists, with one run
    assert first.status == 0, first.stderr
    home = paths.ledger_path().parent
    marker = tmp_path / "ran"
    command = [PY, "-m", "riskkernel", "run", "--", PY, agent_script(tmp_path, "import pathlib\n" + ONE_CALL)]
    proc = await asyncio.create_subprocess_exec(
        *read_only([*command, str(marker)], home),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **key_env(fake)},
    )
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    if os.geteuid() == 0 and b"mount" in err and proc.returncode != 125:
        pytest.skip(f"no read-only mount here: {err.decode().strip()}")

    assert proc.returncode == 125  # rk itself could not start
    message = err.decode()
    assert "ledger" in message and str(paths.ledger_path()) in message and "read-only" in message, message
    assert "Traceback" not in message
    assert not marker.exists() and not fake.requests  # the agent never ran; nothing was forwarded
    assert integrity(paths.ledger_path()) == "ok"


UNTIL_REFUSED = """
ok = 0
for i in range(2000):
    try:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": f"call {i}"}])
        ok += 1
    except openai.APIStatusError as exc:
        print(json.dumps({"ok": ok, "status": exc.status_code, "message": exc.message}))
        break
"""


def disk_nearly_full() -> None:
    """In the rk process: files may grow to 256 KiB, and writing past that fails (EFBIG) rather than kills."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, 256 * 1024))


async def test_a_full_disk_mid_run_fails_closed_and_loses_no_row(tmp_path: Path, fake: FakeUpstream) -> None:
    script = agent_script(tmp_path, "import json\n" + UNTIL_REFUSED)
    proc = await rk_run(fake, script, preexec_fn=disk_nearly_full)
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    stderr = err.decode()
    assert proc.returncode == 0, stderr  # the agent's own status: it handled the refusal
    seen = json.loads(out)

    # The agent was refused with rk's reason, in a 503 (which its SDK retried, then raised).
    assert seen["status"] == 503
    assert "cannot write to the ledger" in seen["message"] and "not sent" in seen["message"]
    assert "ledger write(s) failed during the run" in stderr

    # Every call that reached the upstream is either in the ledger or, whole, in rk's log; none is in both.
    forwarded = len(fake.requests)
    assert seen["ok"] == forwarded > 0
    db = store.open_reader(paths.ledger_path())
    assert db is not None
    try:
        run = store.list_runs(db, 1)[0]
        recorded = [c for c in store.iter_calls(db, run.run_id) if Flag.REFUSED not in c.flags]
    finally:
        db.close()
    logged = [json.loads(m) for m in UNRECORDED.findall(stderr)]
    logged_forwarded = [row for row in logged if "refused" not in row["flags"]]
    assert logged_forwarded, "the disk filled, yet no call's row was lost from the ledger"
    assert len(recorded) + len(logged_forwarded) == forwarded
    assert {c.seq for c in recorded}.isdisjoint(row["seq"] for row in logged_forwarded)
    assert all(row["run_id"] == run.run_id and row["status"] == 200 for row in logged_forwarded)
    assert run.status is RunStatus.INTERRUPTED  # its end could not be written either
    assert integrity(paths.ledger_path()) == "ok"


async def test_a_locked_ledger_refuses_calls_until_it_can_be_written_again(
    fake: FakeUpstream, start_proxy: StartProxy
) -> None:
    h = await start_proxy()
    client = h.new_client(max_retries=2)  # as agents run: the SDK retries a 503 after a pause
    await client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "before"}])

    lock = sqlite3.connect(paths.ledger_path(), isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")  # another process holds the ledger: rk's writes time out (5 s), then fail
    try:
        first = await client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "a"}])
        assert first.choices[0].message.content  # the call was paid for: its answer is delivered
        assert h.ledger.failure is not None
        second = asyncio.create_task(
            client.chat.completions.with_raw_response.create(
                model="gpt-4o", messages=[{"role": "user", "content": "b"}]
            )
        )
        await asyncio.sleep(1.0)  # refused (its refusal's row waits on the lock too), then retried
        assert len(fake.requests) == 2  # nothing forwarded while the ledger cannot be written
    finally:
        lock.execute("COMMIT")
        lock.close()
    answer = await second  # the SDK's retry, once the ledger took the refusal's row: forwarded
    assert answer.http_response.status_code == 200 and len(fake.requests) == 3
    assert h.ledger.failure is None

    calls = await h.calls()
    assert [c.status for c in calls] == [200, 503, 200]  # the call whose row was lost is the missing seq 2
    assert [c.seq for c in calls] == [1, 3, 4]
    assert calls[1].error == "ledger_unavailable" and Flag.REFUSED in calls[1].flags


async def test_rk_serve_answers_a_run_it_cannot_write_with_a_503_in_the_providers_shape(fake: FakeUpstream) -> None:
    defaults = RunSettings(budget=Budget(max_cost=None), openai_upstream=fake.url, anthropic_upstream=fake.root)
    server = await start(ServeSettings(defaults, port=0))
    client = openai.AsyncOpenAI(base_url=f"{server.url}/run/nightly/v1", api_key=SECRET, max_retries=0)
    try:
        lock = sqlite3.connect(paths.ledger_path(), isolation_level=None)
        lock.execute("BEGIN EXCLUSIVE")
        try:
            with pytest.raises(openai.InternalServerError) as refused:  # the new run's row cannot be written
                await client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
        finally:
            lock.execute("COMMIT")
            lock.close()
        assert refused.value.status_code == 503
        assert "cannot write to the ledger" in refused.value.message and "database is locked" in refused.value.message
        assert not fake.requests

        done = await client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
        assert done.choices[0].message.content and len(fake.requests) == 1  # the ledger is back: so is the run
    finally:
        await client.close()
        await server.stop(0)
    db = store.open_reader(paths.ledger_path())
    assert db is not None
    try:
        assert [c.status for c in store.iter_calls(db, "nightly")] == [200]
    finally:
        db.close()
