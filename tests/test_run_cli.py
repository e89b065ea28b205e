"""`rk run` as a real subprocess: the child's environment and output, exit statuses, signals, the ledger
and the summary it leaves, and secrets that never leak."""

import asyncio
import json
import os
import re
import signal
import sys
from decimal import Decimal
from pathlib import Path

import pytest

from riskkernel import paths
from tests.conftest import ROOT, SECRET, agent_script, rk
from tests.fakes import FakeUpstream, Reply, usage

PY = sys.executable
TWO_CALLS = """
for i in range(2):
    try:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
        print("call", i, "ok")
    except openai.APIStatusError as exc:
        print("call", i, exc.status_code, exc.code)
"""


def key_env(fake: FakeUpstream | None = None) -> dict[str, str]:
    env = {"OPENAI_API_KEY": SECRET}
    if fake is not None:
        env["OPENAI_BASE_URL"] = fake.url  # the upstream rk takes over from the parent environment
    return env


async def test_the_runaway_example_is_stopped_at_the_cap_under_mock(tmp_path: Path) -> None:
    step_summary = tmp_path / "summary.md"
    step_summary.write_text("earlier step\n")
    done = await rk(
        "run",
        "--mock",
        "--max-cost",
        "0.05",
        "--json",
        "run.json",
        "--",
        PY,
        str(ROOT / "examples" / "runaway_agent.py"),
        env={"GITHUB_STEP_SUMMARY": str(step_summary)},
    )
    assert done.status == 3, done.stderr
    out = done.stdout.decode()
    assert "turn 1:" in out and "HTTP 402" in out and "rk: cost budget exceeded" in out
    assert "halted: cost_budget_exceeded" in done.stderr and "gpt-4o" in done.stderr
    assert re.search(r"budget cost +█{20} \$0\.0\d+ of \$0\.05 +1\d\d%", done.stderr), done.stderr  # the budget's bar
    # The CI job summary: appended, in Markdown, with the same numbers as the JSON summary.
    summary = json.loads((tmp_path / "run.json").read_text())
    markdown = step_summary.read_text()
    assert markdown.startswith(f"earlier step\n### rk · {PY} ")
    totals = summary["totals"]
    cost = f"${Decimal(totals['cost_usd']):.4f}"
    assert f"| **total** | {totals['calls']} | {totals['input_tokens']:,} |" in markdown and f"**{cost}** |" in markdown
    assert "**Halted: `cost_budget_exceeded`**" in markdown and f"Run `{summary['run_id']}`, exit status 3" in markdown
    assert f"Budget: cost {cost} of $0.05" in markdown


@pytest.mark.parametrize("example", ["openai_tools_agent.py", "anthropic_agent.py", "responses_agent.py"])
async def test_the_examples_run_under_mock(example: str) -> None:
    done = await rk("run", "--mock", "--json", "summary.json", "--", PY, str(ROOT / "examples" / example))
    assert done.status == 0, done.stderr + done.stdout.decode()
    assert done.stdout.decode().strip()
    summary = json.loads(Path("summary.json").read_text())
    assert summary["totals"]["calls"] >= 1 and Decimal(summary["totals"]["cost_usd"]) > 0


async def test_the_child_gets_the_proxy_in_its_environment(tmp_path: Path, fake: FakeUpstream) -> None:
    names = "'OPENAI_BASE_URL', 'OPENAI_API_BASE', 'ANTHROPIC_BASE_URL', 'RK_RUN_ID', 'RK_PROXY_URL', 'NO_PROXY'"
    script = agent_script(
        tmp_path, f"print(*(os.environ.get(name) for name in ({names})), os.environ.get('RK_OPENAI_UPSTREAM'))"
    )
    done = await rk(
        "run", "--quiet", "--", PY, script, env={"RK_OPENAI_UPSTREAM": fake.url, "NO_PROXY": "corp", **key_env()}
    )
    base, api_base, anthropic_base, run_id, proxy_url, no_proxy, inherited = done.stdout.decode().split()
    assert base == api_base == f"{proxy_url}/v1" and anthropic_base == proxy_url
    assert proxy_url.startswith("http://127.0.0.1:") and no_proxy == "corp,127.0.0.1,localhost,::1"
    assert len(run_id) == 16 and inherited == "None"
    assert done.stderr == ""


async def test_calls_go_to_the_upstream_the_parent_environment_named(tmp_path: Path, fake: FakeUpstream) -> None:
    done = await rk("run", "--", PY, agent_script(tmp_path, TWO_CALLS), env=key_env(fake))
    assert done.status == 0, done.stderr
    assert len(fake.requests) == 2
    assert fake.requests[0].headers["Authorization"] == f"Bearer {SECRET}"


async def test_anthropic_calls_go_to_the_upstream_the_parent_environment_named(
    tmp_path: Path, fake: FakeUpstream
) -> None:
    body = (
        "import anthropic\n"
        "c = anthropic.Anthropic(max_retries=0)\n"
        "hi = [{'role': 'user', 'content': 'hi'}]\n"
        "m = c.messages.create(model='claude-sonnet-4-6', max_tokens=50, messages=hi)\n"
        "print(m.content[0].text)\n"
    )
    env = {"ANTHROPIC_BASE_URL": fake.root, "ANTHROPIC_API_KEY": SECRET}
    done = await rk("run", "--quiet", "--", PY, agent_script(tmp_path, body), env=env)
    assert done.status == 0, done.stderr
    assert done.stdout.decode().strip() == "Hello from fake Claude."
    assert [r.path for r in fake.requests] == ["/v1/messages"]


async def test_an_http_proxy_never_takes_the_calls_away_from_rk(tmp_path: Path) -> None:
    script = agent_script(tmp_path, "print(client.chat.completions.create(model='gpt-4o', messages=[]).model)")
    done = await rk(
        "run",
        "--mock",
        "--quiet",
        "--",
        PY,
        script,
        env={"HTTP_PROXY": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9"},
    )
    assert done.status == 0, done.stderr + done.stdout.decode()
    assert done.stdout.decode().strip() == "gpt-4o"


async def test_a_bad_upstream_in_the_environment_stops_rk(tmp_path: Path) -> None:
    done = await rk("run", "--", PY, "-c", "pass", env={"OPENAI_BASE_URL": "localhost:8000"})
    assert done.status == 125 and "OPENAI_BASE_URL 'localhost:8000'" in done.stderr


async def test_stdout_belongs_to_the_child(tmp_path: Path, fake: FakeUpstream) -> None:
    payload = b"\x00\x01 binary \xff\n" + b"line\n" * 2000
    script = agent_script(
        tmp_path, f"client.chat.completions.create(model='gpt-4o', messages=[])\nsys.stdout.buffer.write({payload!r})"
    )
    done = await rk("run", "--", PY, script, env=key_env(fake))
    assert done.stdout == payload
    assert "rk · run" in done.stderr


@pytest.mark.parametrize(
    ("body", "flags", "status"),
    [
        ("sys.exit(0)", [], 0),
        ("sys.exit(7)", [], 7),
        ("import signal; os.kill(os.getpid(), signal.SIGTERM)", [], 128 + signal.SIGTERM),
        (TWO_CALLS, ["--max-calls", "1"], 3),  # halted, and the child exited 0
        (TWO_CALLS + "sys.exit(1)", ["--max-calls", "1"], 1),  # halted, but the child's own failure wins
        ("sys.exit(0)", ["--max-cost", "lots"], 125),
        ("sys.exit(0)", ["--max-time", "10 minutes"], 125),
        ("sys.exit(0)", ["--no-such-flag"], 125),
        ("sys.exit(0)", ["--price", "gpt-4o=cheap"], 125),
    ],
)
async def test_exit_statuses(tmp_path: Path, fake: FakeUpstream, body: str, flags: list[str], status: int) -> None:
    done = await rk("run", *flags, "--", PY, agent_script(tmp_path, body), env=key_env(fake))
    assert done.status == status, done.stderr
    if status == 125:
        assert done.stderr.strip() and "Traceback" not in done.stderr


async def test_a_command_that_cannot_be_found_or_run(tmp_path: Path) -> None:
    missing = await rk("run", "--", "no-such-command-rk-test")
    assert missing.status == 127
    assert "rk: command not found: no-such-command-rk-test" in missing.stderr
    script = tmp_path / "not-executable.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    denied = await rk("run", "--", str(script))
    assert denied.status == 126 and "permission denied" in denied.stderr
    assert "rk · run" in denied.stderr  # the table is printed on every exit path


async def test_arguments_after_the_separator_are_the_childs_verbatim(tmp_path: Path) -> None:
    script = agent_script(tmp_path, "print(sys.argv[1:])")
    args = ["--max-cost", "1", "--", "$HOME", "a b", "*"]
    done = await rk("run", "--quiet", "--", PY, script, *args, env=key_env())
    assert done.stdout.decode().strip() == repr(args)


async def test_sigterm_is_forwarded_to_the_child(tmp_path: Path) -> None:
    marker = tmp_path / "got-term"
    script = agent_script(
        tmp_path,
        f"""
import signal, time
def on_term(sig, frame):
    open({str(marker)!r}, "w").write("TERM")
    sys.exit(0)
signal.signal(signal.SIGTERM, on_term)
print("ready", flush=True)
time.sleep(20)
""",
    )
    proc = await asyncio.create_subprocess_exec(
        PY, "-m", "riskkernel", "run", "--", PY, script, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    assert proc.stdout is not None
    assert await asyncio.wait_for(proc.stdout.readline(), 20) == b"ready\n"
    proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(proc.wait(), 20) == 0
    assert marker.read_text() == "TERM"


async def test_on_halt_terminate_stops_the_child(tmp_path: Path, fake: FakeUpstream) -> None:
    script = agent_script(tmp_path, TWO_CALLS + "import time; print('still here', flush=True); time.sleep(30)")
    done = await rk(
        "run",
        "--max-calls",
        "1",
        "--on-halt",
        "terminate",
        "--grace",
        "2",
        "--",
        PY,
        script,
        env=key_env(fake),
        timeout=20,
    )
    assert done.status == 3, done.stderr  # rk stopped the child because the run halted
    assert "halted: call_budget_exceeded" in done.stderr


async def test_a_child_that_ignores_sigterm_is_killed_after_the_grace_period(
    tmp_path: Path, fake: FakeUpstream
) -> None:
    script = agent_script(
        tmp_path, "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n" + TWO_CALLS + "time.sleep(120)"
    )
    done = await rk(
        "run",
        "--max-calls",
        "1",
        "--on-halt",
        "terminate",
        "--grace",
        "1",
        "--",
        PY,
        script,
        env=key_env(fake),
        timeout=30,
    )  # without the SIGKILL, the child would sleep on past the timeout
    assert done.status == 3, done.stderr
    assert "halted: call_budget_exceeded" in done.stderr


async def test_terminate_also_stops_what_the_child_started(tmp_path: Path, fake: FakeUpstream) -> None:
    pid_file = tmp_path / "grandchild.pid"
    script = agent_script(
        tmp_path,
        f"""
import subprocess, signal, time
grandchild = subprocess.Popen([sys.executable, "-c",
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"])
open({str(pid_file)!r}, "w").write(str(grandchild.pid))
{TWO_CALLS}
time.sleep(60)
""",
    )
    done = await rk(
        "run",
        "--max-calls",
        "1",
        "--on-halt",
        "terminate",
        "--grace",
        "1",
        "--",
        PY,
        script,
        env=key_env(fake),
        timeout=30,
    )
    assert done.status == 3, done.stderr
    grandchild = int(pid_file.read_text())
    for _ in range(50):
        try:
            os.kill(grandchild, 0)
        except ProcessLookupError:
            break
        await asyncio.sleep(0.1)
    else:
        os.kill(grandchild, signal.SIGKILL)
        pytest.fail("the grandchild that ignores SIGTERM outlived rk's grace period")


async def test_an_unwritable_json_summary_stops_rk_before_the_run(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    script = agent_script(tmp_path, f"open({str(marker)!r}, 'w').write('ran')")
    done = await rk("run", "--json", str(tmp_path / "no" / "such" / "dir" / "s.json"), "--", PY, script)
    assert done.status == 125 and "cannot write there" in done.stderr
    assert not marker.exists()


async def test_the_json_summary_has_the_contract_shape(tmp_path: Path, fake: FakeUpstream) -> None:
    fake.script(Reply(usage=usage(1000, 200, cached=400, reasoning=50)))
    out = tmp_path / "summary.json"
    done = await rk(
        "run",
        "--json",
        str(out),
        "--name",
        "nightly",
        "--tag",
        "team=search",
        "--max-calls",
        "1",
        "--",
        PY,
        agent_script(tmp_path, TWO_CALLS),
        env=key_env(fake),
    )
    assert done.status == 3
    data = json.loads(out.read_text())
    assert set(data) == {
        "run_id",
        "name",
        "command",
        "cwd",
        "status",
        "halt_reason",
        "exit_status",
        "started_at",
        "ended_at",
        "budget",
        "totals",
        "tags",
        "calls",
    }
    assert (data["name"], data["status"], data["halt_reason"], data["exit_status"]) == (
        "nightly",
        "halted",
        "call_budget_exceeded",
        3,
    )
    assert data["budget"] == {
        "max_cost_usd": "5.00",
        "max_tokens": None,
        "max_calls": 1,
        "max_time_s": None,
        "max_repeats": None,
        "strict": False,
    }
    # 600 plain at $2.50, 400 cached at $1.25, 200 out at $10 per 1M
    assert data["totals"] == {
        "calls": 1,
        "input_tokens": 1000,
        "cached_input_tokens": 400,
        "cache_write_tokens": 0,
        "output_tokens": 200,
        "reasoning_tokens": 50,
        "cost_usd": "0.0040",
    }
    assert data["tags"] == {"team": "search"}
    first, refused = data["calls"]
    assert first["cost_usd"] == "0.0040" and first["model"] == "gpt-4o-2024-08-06" and first["flags"] == []
    assert refused["status"] == 402 and refused["flags"] == ["refused"] and refused["error"] == "call_budget_exceeded"


async def test_the_api_key_never_reaches_the_ledger_or_stderr(tmp_path: Path, fake: FakeUpstream) -> None:
    echo = {"error": {"message": f"Incorrect API key provided: {SECRET}.", "type": "invalid_request_error"}}
    fake.script(Reply(), Reply(status=401, body=json.dumps(echo).encode()))
    out = tmp_path / "summary.json"
    script = agent_script(tmp_path, TWO_CALLS)
    done = await rk("run", "--json", str(out), "--", PY, script, "--api-key", SECRET, env=key_env(fake))
    assert done.status == 0, done.stderr
    assert "call 1 401" in done.stdout.decode()
    marker = SECRET.split("-")[2]
    home = Path(os.environ["RK_HOME"])
    listed = await rk("ledger", "list", "--json")
    assert marker.encode() not in listed.stdout
    for path in [*(p for p in home.rglob("*") if p.is_file()), out]:
        assert marker.encode() not in path.read_bytes(), path
    assert marker not in done.stderr


async def test_settings_come_from_flags_then_environment_then_config_file(tmp_path: Path) -> None:
    (tmp_path / "rk.toml").write_text(
        'max_calls = 11\nmax_time = "15m"\nmax_cost = 2\nmax_repeats = 4\nstrict = true\n[tags]\nfrom = "file"\n'
    )
    script = agent_script(tmp_path, "")

    async def budget(*flags: str, env: dict[str, str] | None = None) -> dict[str, object]:
        out = tmp_path / "b.json"
        done = await rk("run", "--quiet", "--json", str(out), *flags, "--", PY, script, env=env)
        assert done.status == 0, done.stderr
        data = json.loads(out.read_text())
        return {**data["budget"], "tags": data["tags"]}

    assert await budget() == {
        "max_cost_usd": "2",
        "max_tokens": None,
        "max_calls": 11,
        "max_time_s": 900.0,
        "max_repeats": 4,
        "strict": True,
        "tags": {"from": "file"},
    }
    from_env = await budget(env={"RK_MAX_CALLS": "12", "RK_MAX_COST": "unlimited"})
    assert (from_env["max_calls"], from_env["max_cost_usd"], from_env["max_time_s"]) == (12, None, 900.0)
    from_flag = await budget("--max-calls", "13", env={"RK_MAX_CALLS": "12", "RK_STRICT": "0"})
    assert from_flag["max_calls"] == 13 and from_flag["strict"] is False


async def test_a_bad_config_file_stops_rk_with_one_line(tmp_path: Path) -> None:
    (tmp_path / "rk.toml").write_text("max_cots = 1\n")
    done = await rk("run", "--", PY, "-c", "pass")
    assert done.status == 125
    assert "unknown setting 'max_cots'" in done.stderr and "Traceback" not in done.stderr


async def test_nested_runs_chain_through_the_outer_proxy(tmp_path: Path, fake: FakeUpstream) -> None:
    inner = [PY, "-m", "riskkernel", "run", "--quiet", "--name", "inner", "--", PY, agent_script(tmp_path, TWO_CALLS)]
    done = await rk("run", "--name", "outer", "--json", str(tmp_path / "outer.json"), "--", *inner, env=key_env(fake))
    assert done.status == 0, done.stderr
    assert len(fake.requests) == 2
    outer = json.loads((tmp_path / "outer.json").read_text())
    assert outer["totals"]["calls"] == 2
    listed = await rk("ledger", "list", "--json")
    names = {run["name"]: run["totals"]["calls"] for run in json.loads(listed.stdout)}
    assert names == {"outer": 2, "inner": 2}


async def test_the_ledger_shows_past_runs(tmp_path: Path, fake: FakeUpstream) -> None:
    done = await rk("run", "--quiet", "--", PY, agent_script(tmp_path, TWO_CALLS), env=key_env(fake))
    assert done.status == 0
    listed = await rk("ledger", "list", "--json")
    (run,) = json.loads(listed.stdout)
    assert "calls" not in run and run["totals"]["calls"] == 2
    shown = await rk("ledger", "show", run["run_id"][:6], "--json")
    assert [c["seq"] for c in json.loads(shown.stdout)["calls"]] == [1, 2]
    plain = await rk("ledger")
    assert plain.stdout.decode().startswith(run["run_id"] + "\t")
    text = await rk("ledger", "show", run["run_id"][:6])
    assert "gpt-4o-2024-08-06" in text.stdout.decode()
    missing = await rk("ledger", "show", "zzzz")
    assert missing.status == 1 and "no run with id 'zzzz'" in missing.stderr
    path = await rk("ledger", "path")
    assert path.stdout.decode().strip() == str(paths.ledger_path())


def test_ctrl_c_on_a_terminal_halts_the_run_and_reaches_the_child_once(tmp_path: Path) -> None:
    import select
    import subprocess

    count_file = tmp_path / "sigints"
    script = agent_script(
        tmp_path,
        f"""
import signal, time
count = 0
def on_int(sig, frame):
    global count
    count += 1
    open({str(count_file)!r}, "w").write(str(count))
signal.signal(signal.SIGINT, on_int)
print("ready", flush=True)
end = time.time() + 2
while time.time() < end:
    time.sleep(0.02)
""",
    )
    master, slave = os.openpty()
    launcher = (
        "import os, sys; fd = os.open(sys.argv[1], os.O_RDWR); [os.dup2(fd, n) for n in (0, 1, 2)];"
        " os.execv(sys.executable, [sys.executable, '-m', 'riskkernel', 'run', '--', sys.executable, sys.argv[2]])"
    )
    proc = subprocess.Popen([PY, "-c", launcher, os.ttyname(slave), script], start_new_session=True)
    seen = b""  # the slave stays open here until the end: reading a master with no slave open is an error
    try:
        while b"ready" not in seen:
            ready, _, _ = select.select([master], [], [], 20)
            assert ready, seen
            seen += os.read(master, 4096)
        os.write(master, b"\x03")
        assert proc.wait(20) == 3
        while select.select([master], [], [], 0.5)[0]:
            seen += os.read(master, 4096)
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
        os.close(slave)
    assert count_file.read_text() == "1"  # the terminal's SIGINT, and no second one from rk
    assert b"halted: killed" in seen
