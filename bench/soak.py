"""`rk serve` soaked: many concurrent streams for a minute, some reset by the upstream, some abandoned.

    python bench/soak.py [--duration 60] [--streams 200] [--chunk-delay 0.02] [--json]

Starts the fake upstream (bench/upstream.py, its own process, pinned with this client to core 1) and
`rk serve --max-cost unlimited` (its own process on a fresh data dir, RK_HOME in a temp dir, pinned to
core 0, pointed at the upstream by RK_OPENAI_UPSTREAM). `--streams` workers, each its own run (the
`X-RiskKernel-Run-Id` header), make streamed chat completions one after another for `--duration` seconds,
then finish the call they are in. A stream is 50 chunks `--chunk-delay` apart (about a second by default,
an LLM's pace). Calls are numbered over all workers: every 20th (n % 20 == 0) asks the upstream to reset
its connection (TCP RST) after 5 chunks, and every 20th from the 10th on (n % 20 == 10) is abandoned by
the client after 5 events (it closes its connection): 5% each.

The server's RSS (VmRSS) and open file descriptors (/proc/PID/fd) are sampled every second. Once the load
is over and the client has closed its connections, the bench waits for the fd count to come back to its
baseline (after start-up, before the first call), for up to FD_SETTLE seconds: rk's pool of keep-alive
connections to the upstream closes idle ones after aiohttp's 15-s keep-alive, checked every 15 s. Then it
reads the ledger (plain sqlite3, RK_HOME/ledger.db) and stops the server with SIGTERM.

Targets (missed: exit status 1):
- no crash: the server alive at the end, no "internal error" or "Traceback" in its log, exit 0 on SIGTERM;
- every call the client started in the ledger exactly once: per run, as many rows as calls started, with
  the sequence numbers the client got in `X-RiskKernel-Call`; a completed call recorded 200 with the
  upstream's usage and no flag, a reset one `estimated` with "the stream broke off", an abandoned one
  `estimated` with "client disconnected" (unless the client already had the whole stream when it left:
  then as a completed one); none at $0;
- RSS at the end within 10% of RSS at a third of the duration (the 20th second of 60);
- open fds back to the baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import aiohttp
from overhead import LOAD_CORE, PROXY_CORE, STREAM_BODY, free_port, rss_kib, spawn, wait_port
from serve_load import core_ticks, tree_cpu
from upstream import RESET_AFTER, RESET_USER

HERE = Path(__file__).resolve().parent
EVERY = 20  # 1 in 20 calls reset, 1 in 20 abandoned: 5% each
ABANDON_AFTER = 5  # events the client reads before it walks away
RSS_GROWTH = 0.10
RSS_TARGET = f"RSS growth ≤ {RSS_GROWTH:.0%}"
FD_SETTLE = 45.0  # seconds to wait for the fds to come back to baseline (aiohttp's keep-alive: 15 s)
CALL_TIMEOUT = 60.0  # a stream takes about a second: one still going after this is a hang
OK, RESET, ABANDONED = "completed", "reset by upstream", "abandoned by client"
LATE = "abandoned by client after the last event"  # an overloaded client may find the whole stream buffered
RESET_BODY = json.dumps({**json.loads(STREAM_BODY), "user": RESET_USER})
CRASH_MARKS = ("internal error", "Traceback")


class Load:
    """What the client did: per run, the sequence number and kind of every call it started."""

    def __init__(self) -> None:
        self.started: Counter[str] = Counter()  # run -> calls started
        self.calls: dict[str, dict[int, str]] = {}  # run -> {seq (X-RiskKernel-Call): kind}
        self.kinds: Counter[str] = Counter()
        self.problems: Counter[str] = Counter()  # what the client saw go wrong, by description
        self.durations: list[float] = []  # seconds, completed streams
        self.duplicates = 0  # a sequence number given twice in one run


async def call(http: aiohttp.ClientSession, url: str, run: str, n: int, load: Load) -> bool:
    """One streamed call, as `n` says (completed, reset, abandoned); False if nothing listens any more."""
    kind = RESET if n % EVERY == 0 else ABANDONED if n % EVERY == EVERY // 2 else OK
    load.started[run] += 1
    load.kinds[kind] += 1
    started = time.monotonic()
    headers = {"Content-Type": "application/json", "Authorization": "Bearer sk-bench", "X-RiskKernel-Run-Id": run}
    try:
        async with http.post(url, data=RESET_BODY if kind == RESET else STREAM_BODY, headers=headers) as response:
            seq = int(response.headers.get("X-RiskKernel-Call", 0))
            calls = load.calls.setdefault(run, {})
            load.duplicates += seq in calls
            calls[seq] = kind
            if response.status != 200:
                load.problems[f"{kind}: HTTP {response.status}"] += 1
                return True
            events, last = 0, b""
            async for line in response.content:
                if line.startswith(b"data: "):
                    events, last = events + 1, line
                    if kind == ABANDONED and events == ABANDON_AFTER:
                        if b"data: [DONE]" in response.content.read_nowait():  # rk had sent it all: complete
                            calls[seq] = LATE
                            load.kinds.update({ABANDONED: -1, LATE: 1})
                        response.close()  # walk away mid-stream: the connection is closed, not reused
                        return True
            if kind == OK and last.strip() != b"data: [DONE]":
                load.problems[f"{kind}: stream did not end with [DONE]"] += 1
            elif kind == RESET and b"upstream_stream_broken" not in last:
                load.problems[f"{kind}: stream did not end with rk's upstream_stream_broken event"] += 1
            elif kind == OK:
                load.durations.append(time.monotonic() - started)
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        load.problems[f"{kind}: {type(exc).__name__}"] += 1
        return not isinstance(exc, aiohttp.ClientConnectorError)  # the proxy is gone: stop, do not spin
    return True


async def worker(
    http: aiohttp.ClientSession, url: str, run: str, numbers: itertools.count[int], deadline: float, load: Load
) -> None:
    while time.monotonic() < deadline and await call(http, url, run, next(numbers), load):
        pass


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def fd_kinds(pid: int, upstream_port: int, rk_port: int) -> Counter[str]:
    """The process's fds by what they are; sockets by their peer (the upstream, rk's clients) and state."""
    states = {"01": "established", "06": "time-wait", "08": "close-wait", "0A": "listening"}
    peers = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, remote = int(fields[1].rsplit(":", 1)[1], 16), int(fields[2].rsplit(":", 1)[1], 16)
            peer = "upstream" if remote == upstream_port else "client" if local == rk_port else "other"
            peers[fields[9]] = f"socket, {peer}, {states.get(fields[3], fields[3])}"
    kinds: Counter[str] = Counter()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue  # closed meanwhile
        if target.startswith("socket:["):
            kinds[peers.get(target[8:-1], "socket, not TCP")] += 1
        else:
            kinds[Path(target).name if target.startswith("/") else target.split("[")[0]] += 1
    return kinds


def sockets(kinds: Counter[str]) -> int:
    return sum(n for kind, n in kinds.items() if kind.startswith("socket"))


async def sample(pid: int, start: float, samples: list[tuple[float, int, int]], stop: asyncio.Event) -> None:
    """(seconds into the load, RSS KiB, open fds) every second until `stop`."""
    while not stop.is_set():
        try:
            samples.append((time.monotonic() - start, rss_kib(pid, "VmRSS"), fd_count(pid)))
        except (OSError, RuntimeError):  # no /proc entry, or a zombie's without VmRSS
            return  # the server is gone: reported as a crash
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 1.0)


async def soak(url: str, pid: int, args: argparse.Namespace) -> tuple[Load, list[tuple[float, int, int]], float]:
    load, samples, stop = Load(), [], asyncio.Event()
    numbers = itertools.count(1)
    start = time.monotonic()
    sampler = asyncio.ensure_future(sample(pid, start, samples, stop))
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=CALL_TIMEOUT)) as http:
        runs = [f"soak-{w:03d}" for w in range(args.streams)]
        await asyncio.gather(*(worker(http, url, run, numbers, start + args.duration, load) for run in runs))
    elapsed = time.monotonic() - start
    stop.set()
    await sampler
    return load, samples, elapsed


def wait_for_rows(db_path: Path, calls: int, timeout: float = 10.0) -> None:
    """Give the rows of the last calls (those whose client left: rk notices a moment later) time to land."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
        rows = db.execute("SELECT count(*) FROM calls").fetchone()[0]
        db.close()
        if rows >= calls:
            return
        time.sleep(0.2)


def check_ledger(db_path: Path, load: Load) -> tuple[dict[str, int], Counter[str], Counter[str]]:
    """Rows against what the client started: counts, and what is wrong (by description, with a count)."""
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    rows = db.execute("SELECT run_id, seq, status, flags, error, cost_pusd, output_tokens FROM calls").fetchall()
    db.close()
    wrong: Counter[str] = Counter()
    statuses: Counter[str] = Counter()
    by_run: dict[str, set[int]] = {}
    for run, seq, status, flags, error, cost, output in rows:
        by_run.setdefault(run, set()).add(seq)
        kind = load.calls.get(run, {}).get(seq)
        statuses[f"{kind or 'unknown'}: {status}, flags '{flags}', error {(error or '')[:80]!r}"] += 1
        estimated = "estimated" in flags.split(",")
        right = {  # the upstream's usage (40 output tokens) for a completed call; an estimate for the others
            OK: status == 200 and not flags and error is None and output == 40,
            LATE: status == 200 and not flags and error is None and output == 40,
            RESET: estimated and (error or "").startswith("the stream broke off"),
            ABANDONED: estimated and error == "client disconnected" and status in (200, 499),  # 499: cancelled
        }
        if kind is None:
            wrong["row for a call the client has no sequence number for"] += 1
        elif not right[kind]:
            wrong[f"{kind} recorded wrong"] += 1
        if cost <= 0:
            wrong["recorded at $0"] += 1
    for run, started in load.started.items():
        have = by_run.get(run, set())
        if len(have) < started:
            wrong["call missing from the ledger"] += started - len(have)
        if len(have) > started:
            wrong["row for a call never started"] += len(have) - started
        if have != set(load.calls.get(run, {})):
            wrong["sequence numbers differ from those the client got"] += 1
    counts = {"rows": len(rows), "runs": len(by_run), "started": sum(load.started.values())}
    return counts, wrong, statuses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    parser.add_argument("--streams", type=int, default=200, help="concurrent streams (workers, each its own run)")
    parser.add_argument("--chunk-delay", type=float, default=0.02, help="seconds between the upstream's chunks")
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    args = parser.parse_args()
    os.sched_setaffinity(0, LOAD_CORE)

    with tempfile.TemporaryDirectory(prefix="rk-soak-") as tmp:
        home = Path(tmp)
        up_port, rk_port = free_port(), free_port()
        upstream = spawn([sys.executable, str(HERE / "upstream.py"), str(up_port), str(args.chunk_delay)], LOAD_CORE)
        env = {
            **os.environ,
            "RK_HOME": str(home),
            "RK_CONFIG_DIR": str(home / "config"),
            "RK_OPENAI_UPSTREAM": f"http://127.0.0.1:{up_port}/v1",
        }
        command = [sys.executable, "-m", "riskkernel", "serve", "--max-cost", "unlimited", "--port", str(rk_port)]
        log_path = home / "serve.log"
        with open(log_path, "wb") as log:
            server = spawn(command, PROXY_CORE, env=env, stdout=log, stderr=log)
        try:
            wait_port(up_port)
            wait_port(rk_port)
            while not list((home / "control").glob("*.json")):  # started: published its control file
                time.sleep(0.05)
            time.sleep(1)
            base_rss, base_fds = rss_kib(server.pid, "VmRSS"), fd_count(server.pid)
            base_kinds = fd_kinds(server.pid, up_port, rk_port)
            print(f"rk serve started: RSS {base_rss / 1024:.1f} MiB, {base_fds} fds; load...", file=sys.stderr)
            url = f"http://127.0.0.1:{rk_port}/v1/chat/completions"
            cpu, ticks = tree_cpu(server.pid), core_ticks()
            load, samples, elapsed = asyncio.run(soak(url, server.pid, args))
            cpu, ticks_after = tree_cpu(server.pid) - cpu, core_ticks()
            busy = {  # each core's busy share during the load: tells a proxy-bound run from a disturbed one
                core: 100 * (ticks_after[core][0] - ticks[core][0]) / max(ticks_after[core][1] - ticks[core][1], 1)
                for core in ticks
            }
            print(f"load over: {sum(load.started.values()):,} calls in {elapsed:.1f} s; fds settling", file=sys.stderr)
            alive = server.poll() is None
            after_fds = fd_count(server.pid) if alive else 0
            settle_start, sockets_back, end_kinds, settled = time.monotonic(), None, Counter[str](), 0.0
            while alive:
                end_kinds = fd_kinds(server.pid, up_port, rk_port)
                settled = time.monotonic() - settle_start
                if sockets_back is None and sockets(end_kinds) <= sockets(base_kinds):
                    sockets_back = settled
                if sum(end_kinds.values()) <= base_fds or settled >= FD_SETTLE:
                    break
                time.sleep(1)
            end_fds = sum(end_kinds.values())
            alive = server.poll() is None
            peak_rss = rss_kib(server.pid, "VmHWM") if alive else 0
            wait_for_rows(home / "ledger.db", sum(load.started.values()))
            counts, wrong, statuses = check_ledger(home / "ledger.db", load)
        finally:
            if server.poll() is None:
                server.send_signal(signal.SIGTERM)
            try:
                exit_status = server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()
                exit_status = server.wait()
            upstream.terminate()
            upstream.wait(10)
        log_text = log_path.read_text(errors="replace")

    warm = args.duration / 3  # the 20th second of 60
    rss_warm = min(samples, key=lambda s: abs(s[0] - warm))
    rss_end = [s for s in samples if s[0] <= args.duration][-1]
    growth = (rss_end[1] - rss_warm[1]) / rss_warm[1]
    crash_lines = [line for line in log_text.splitlines() if any(mark in line for mark in CRASH_MARKS)]
    banner = ("rk serve:", "  OpenAI base URL", "  /rk API token")
    other_lines = [line for line in log_text.splitlines() if line.strip() and not line.startswith(banner)]
    calls = counts["started"]
    report = {
        "duration_s": args.duration,
        "streams": args.streams,
        "chunk_delay_s": args.chunk_delay,
        "reset_after_chunks": RESET_AFTER,
        "abandon_after_events": ABANDON_AFTER,
        "calls": calls,
        "calls_per_s": calls / elapsed,
        "load_s": elapsed,
        "proxy_cpu_pct": 100 * cpu / elapsed,
        "core_busy_pct": busy,
        "kinds": dict(load.kinds),
        "client_problems": dict(load.problems),
        "stream_s_p50": statistics.median(load.durations) if load.durations else None,
        "stream_s_p99": statistics.quantiles(load.durations, n=100)[98] if len(load.durations) > 1 else None,
        "ledger": {**counts, "wrong": dict(wrong), "duplicate_seq_headers": load.duplicates, "by_kind": dict(statuses)},
        "rss_mib": {
            "baseline": base_rss / 1024,
            "warm": rss_warm[1] / 1024,
            "end": rss_end[1] / 1024,
            "warm_at_s": rss_warm[0],
            "end_at_s": rss_end[0],
            "peak": peak_rss / 1024,
        },
        "rss_growth_pct": 100 * growth,
        "fds": {
            "baseline": base_fds,
            "peak": max(s[2] for s in samples),
            "load_end": after_fds,
            "end": end_fds,
            "settle_s": settled,
            "sockets_back_s": sockets_back,
        },
        "fd_kinds": {"baseline": dict(base_kinds), "end": dict(end_kinds)},
        "server": {
            "alive_at_end": alive,
            "exit_status": exit_status,
            "crash_lines": crash_lines[:10],
            "log_lines": other_lines[:10],
        },
        "samples": [{"t": round(t, 1), "rss_mib": round(r / 1024, 1), "fds": f} for t, r, f in samples],
    }
    report["targets"] = {
        "no crash": alive and not crash_lines and exit_status == 0,
        "every call in the ledger exactly once": not wrong and not load.duplicates and counts["rows"] == calls,
        RSS_TARGET: alive and growth <= RSS_GROWTH,
        "fds back to baseline": alive and end_fds <= base_fds,
    }
    print(json.dumps(report, indent=2) if args.json else table(report))
    sys.exit(0 if all(report["targets"].values()) else 1)


def table(report: dict) -> str:
    """The report in Markdown."""
    rss, fds, ledger, server = report["rss_mib"], report["fds"], report["ledger"], report["server"]
    verdict = {True: "met", False: "**missed**"}
    targets = report["targets"]
    kinds = ", ".join(f"{n:,} {kind}" for kind, n in report["kinds"].items())
    problems = "; ".join(f"{n:,} {what}" for what, n in report["client_problems"].items()) or "none"
    crash = f"alive at the end, exit {server['exit_status']} on SIGTERM" if server["alive_at_end"] else "**died**"
    crash += f" (exit {server['exit_status']})" if not server["alive_at_end"] else ""
    crash += f", {len(server['crash_lines'])} crash lines in its log"
    back = fds["sockets_back_s"]
    sockets_note = f"sockets back to baseline after {back:.0f} s" if back is not None else "sockets **not** back"
    wrong = "; ".join(f"{n:,} {what}" for what, n in ledger["wrong"].items()) or "none wrong"
    lines = [
        f"## rk serve soak: {report['streams']} concurrent streams for {report['duration_s']:g} s",
        "",
        f"{report['calls']:,} calls in {report['load_s']:.1f} s ({report['calls_per_s']:.0f} calls/s): {kinds}."
        f" A completed stream took {report['stream_s_p50']:.2f} s at p50, {report['stream_s_p99']:.2f} s at p99"
        f" (50 chunks {report['chunk_delay_s'] * 1000:g} ms apart). Client-side problems: {problems}."
        f" rk serve used {report['proxy_cpu_pct']:.0f}% of its core; cores busy: "
        + ", ".join(f"{core}: {pct:.0f}%" for core, pct in sorted(report["core_busy_pct"].items()))
        + ".",
        "",
        "| target | measured | |",
        "|---|---|---|",
        f"| zero proxy crashes | {crash} | {verdict[targets['no crash']]} |",
        f"| every call in the ledger exactly once | {ledger['rows']:,} rows for {ledger['started']:,} calls started"
        f" in {ledger['runs']} runs; {wrong} | {verdict[targets['every call in the ledger exactly once']]} |",
        f"| {RSS_TARGET} ({rss['warm_at_s']:.0f} s to {rss['end_at_s']:.0f} s)"
        f" | {rss['warm']:.1f} → {rss['end']:.1f} MiB ({report['rss_growth_pct']:+.1f}%);"
        f" baseline {rss['baseline']:.1f}, peak {rss['peak']:.1f} MiB | {verdict[targets[RSS_TARGET]]} |",
        f"| open fds back to baseline | baseline {fds['baseline']}, peak {fds['peak']}, {fds['load_end']} as the load"
        f" ended, {fds['end']} after {fds['settle_s']:.0f} s ({sockets_note})"
        f" | {verdict[targets['fds back to baseline']]} |",
        "",
        "Ledger rows by the client's view of the call: "
        + "; ".join(f"{n:,} × {what}" for what, n in sorted(ledger["by_kind"].items())),
    ]
    if not targets["fds back to baseline"]:
        lines.append(f"\nfds at baseline: {report['fd_kinds']['baseline']}; at the end: {report['fd_kinds']['end']}")
    if server["log_lines"]:
        lines.append("\nrk serve's log, beyond its start-up banner:\n    " + "\n    ".join(server["log_lines"]))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
