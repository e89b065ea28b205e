"""`rk serve` under sustained concurrent load, beside the floor relay and LiteLLM's proxy, in the same run.

    python bench/serve_load.py [--duration 10] [--repeats 3] [--litellm PYTHON] [--json]

Needs `wrk` (Debian: apt install wrk) and rk installed in this Python. As in bench/overhead.py, the proxy
under test (rk serve, the floor relay of bench/floor.py, LiteLLM's proxy) is pinned to core 0; wrk and the
fake upstream (bench/upstream.py) to core 1. For each target, at 16 and 64 connections, non-streaming and
streaming (a 50-chunk stream, timed to its last byte), wrk reports requests/s and p50/p99 latency; "added"
is the target's latency minus that of a direct hit on the fake upstream at the same concurrency. Also
reported: the proxy's CPU time per call, and its share of core 0 beside each core's busy time, which tell a
proxy-bound cell from one disturbed by other load.

rk's calls are spread round-robin over 8 runs by base-URL prefix (`/run/run-N/v1/...`), created on first use
by `rk serve --max-cost unlimited`. The floor and LiteLLM have no runs, so wrk sends them the plain
`/v1/...` path: the prefix is stripped rather than taught to the floor, whose route match and path slice
for it measured within noise (0-6% of its throughput) in a side test.

LiteLLM runs from its own Python (`--litellm`, default /tmp/litellm-venv/bin/python if it exists, made with
`python -m venv /tmp/litellm-venv && /tmp/litellm-venv/bin/pip install 'litellm[proxy]'`), one worker, no
database, no callbacks, local price map; without it, its rows are skipped with the reason.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from overhead import _UNITS, BODY, LOAD_CORE, PROXY_CORE, STREAM_BODY, free_port, spawn, wait_port

HERE = Path(__file__).resolve().parent
RUNS = 8
CONCURRENCY = (16, 64)
TARGET = 1.5  # rk serve's throughput within 1.5x of the floor's
LITELLM_DEFAULT = Path("/tmp/litellm-venv/bin/python")
KEY = "sk-bench-5f0c2a9e7d4b4c1e8a3f6b2d9e0c7a41"  # every target is sent it; LiteLLM wants a strong master key
# wrk: POST BENCH_BODY to the space-separated BENCH_PATHS in turn (one path: always that one)
ROTATE_LUA = """
local paths = {}
for p in string.gmatch(os.getenv("BENCH_PATHS"), "%S+") do paths[#paths + 1] = p end
local body = os.getenv("BENCH_BODY")
local headers = {["Content-Type"] = "application/json", ["Authorization"] = "Bearer " .. os.getenv("BENCH_KEY")}
local i = 0
request = function()
  i = i + 1
  return wrk.format("POST", paths[i % #paths + 1], headers, body)
end
"""
LITELLM_CONFIG = """
model_list:
{models}
litellm_settings:
  callbacks: []
  success_callback: []
  failure_callback: []
  telemetry: false
  request_timeout: 60
general_settings:
  master_key: {key}
  disable_spend_logs: true
  disable_error_logs: true
"""


class Target(NamedTuple):
    base: str  # http://127.0.0.1:PORT
    paths: list[str]  # wrk sends to these in turn
    pid: int | None  # the proxy's process, None for the upstream itself


def core_ticks() -> dict[int, tuple[int, int]]:
    """Per core: (busy, total) clock ticks since boot; steal is neither."""
    out = {}
    for line in Path("/proc/stat").read_text().splitlines():
        m = re.match(r"cpu(\d+) (.*)", line)
        if m:
            user, nice, system, idle, iowait, irq, softirq, *_ = map(int, m.group(2).split())
            busy = user + nice + system + irq + softirq
            out[int(m.group(1))] = (busy, busy + idle + iowait)
    return out


def tree_cpu(pid: int) -> float:
    """CPU seconds (user + system, all threads) of a process and its live descendants."""
    stats = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone
        stats[int(stat.parent.name)] = (int(fields[1]), int(fields[11]) + int(fields[12]))  # ppid, utime + stime
    tree: set[int] = set()
    grown = {pid}
    while grown:
        tree |= grown
        grown = {p for p, (ppid, _) in stats.items() if ppid in grown and p not in tree}
    return sum(stats[p][1] for p in tree if p in stats) / os.sysconf("SC_CLK_TCK")


def wrk(script: Path, target: Target, body: str, connections: int, duration: float) -> dict[str, float]:
    """Requests/s, p50/p99 latency (ms) and errors from one wrk run; for a proxy, also its CPU per call and
    its share of its core, to tell a proxy-bound result from a disturbed one."""
    url = target.base + target.paths[0]
    ticks, start = core_ticks(), time.monotonic()
    cpu = tree_cpu(target.pid) if target.pid else 0.0
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{round(duration)}s", "--timeout=30s", "--latency", f"-s{script}", url],
        capture_output=True,
        text=True,
        check=True,
        preexec_fn=lambda: os.sched_setaffinity(0, LOAD_CORE),
        env={**os.environ, "BENCH_BODY": body, "BENCH_PATHS": " ".join(target.paths), "BENCH_KEY": KEY},
    )
    cpu = tree_cpu(target.pid) - cpu if target.pid else 0.0
    wall, ticks_after = time.monotonic() - start, core_ticks()
    result = {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out.stdout).group(1))}  # type: ignore[union-attr]
    for pct, value, unit in re.findall(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s)\s*$", out.stdout, re.M):  # wrk pads "1.54s "
        result[f"p{pct}"] = float(value) * _UNITS[unit]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out.stdout)
    socket = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out.stdout)
    result["errors"] = (int(errors.group(1)) if errors else 0) + (sum(map(int, socket.groups())) if socket else 0)
    calls = int(re.search(r"(\d+) requests in", out.stdout).group(1))  # type: ignore[union-attr]
    if target.pid:
        result["cpu_us_per_call"] = cpu / max(calls, 1) * 1e6
        result["proxy_share_pct"] = 100 * cpu / wall
    for name, cores in (("proxy_core_busy_pct", PROXY_CORE), ("load_core_busy_pct", LOAD_CORE)):
        busy = sum(ticks_after[c][0] - ticks[c][0] for c in cores)
        total = sum(ticks_after[c][1] - ticks[c][1] for c in cores)
        result[name] = 100 * busy / max(total, 1)
    return result


def start_litellm(
    python: str, upstream: str, home: str, start: Callable[..., subprocess.Popen[bytes]], targets: dict[str, Target]
) -> str | None:
    """Start LiteLLM's proxy on the proxy core, every model of the bench body routed to the fake upstream, and
    add it to the targets; or say why it is skipped."""
    models = "\n".join(
        f"  - model_name: {name}\n    litellm_params:\n      model: openai/{name}\n"
        f"      api_base: {upstream}\n      api_key: {KEY}"
        for name in ("gpt-4o", "gpt-4o-mini")
    )
    config = Path(home) / "litellm.yaml"
    config.write_text(LITELLM_CONFIG.format(models=models, key=KEY))
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "VIRTUAL_ENV")},
        "LITELLM_LOG": "ERROR",
        "LITELLM_TELEMETRY": "False",
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # no fetch of the price map from GitHub at import
        "LITELLM_MODE": "PRODUCTION",  # no .env loading
        "HOME": home,
    }
    args = [python, "-m", "litellm.proxy.proxy_cli", "--config", str(config), "--host", "127.0.0.1"]
    try:
        proc = start("litellm", [*args, "--port", str(port), "--num_workers", "1"], PROXY_CORE, env=env)
    except OSError as exc:
        return f"cannot run {python}: {exc.strerror}"
    end = time.monotonic() + 180  # its start-up imports take a while
    while proc.poll() is None and time.monotonic() < end:
        try:
            wait_port(port, timeout=1)
        except RuntimeError:
            continue
        targets["litellm"] = Target(f"http://127.0.0.1:{port}", ["/v1/chat/completions"], proc.pid)
        return None
    log = (Path(home) / "litellm.log").read_text(errors="replace").strip().splitlines()
    return "LiteLLM's proxy did not start: " + (log[-1] if log else "no output")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per wrk run (cell)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds; medians are reported")
    parser.add_argument("--litellm", help="the Python of a venv with litellm[proxy] installed ('' to skip)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    args = parser.parse_args()
    os.sched_setaffinity(0, LOAD_CORE)
    home = tempfile.mkdtemp(prefix="rk-serve-bench-")
    script = Path(home) / "rotate.lua"
    script.write_text(ROTATE_LUA)
    litellm = args.litellm if args.litellm is not None else (str(LITELLM_DEFAULT) if LITELLM_DEFAULT.exists() else "")
    litellm_skipped = None
    if not litellm:
        litellm_skipped = "--litellm ''" if args.litellm == "" else f"no {LITELLM_DEFAULT} and no --litellm PYTHON"
    procs: list[subprocess.Popen[bytes]] = []
    try:
        up_port, floor_port, rk_port = free_port(), free_port(), free_port()
        upstream = f"http://127.0.0.1:{up_port}/v1"

        def start(name: str, argv: list[str], cores: set[int], **kwargs: object) -> subprocess.Popen[bytes]:
            # Logs go to files: wrk hangs up on the calls in flight at the end of each run, and they complain.
            log = (Path(home) / f"{name}.log").open("wb")
            procs.append(spawn(argv, cores, stdout=log, stderr=log, **kwargs))
            return procs[-1]

        start("upstream", [sys.executable, str(HERE / "upstream.py"), str(up_port)], LOAD_CORE)
        floor = start("floor", [sys.executable, str(HERE / "floor.py"), str(floor_port), upstream], PROXY_CORE)
        rk_args = ["serve", "--port", str(rk_port), "--max-cost", "unlimited", "--openai-upstream", upstream]
        rk_env = {**os.environ, "RK_HOME": home}
        rk = start("rk", [sys.executable, "-m", "riskkernel", *rk_args], PROXY_CORE, env=rk_env)
        plain = ["/v1/chat/completions"]
        targets = {
            "upstream": Target(f"http://127.0.0.1:{up_port}", plain, None),
            "floor": Target(f"http://127.0.0.1:{floor_port}", plain, floor.pid),
            "rk serve": Target(
                f"http://127.0.0.1:{rk_port}",
                [f"/run/run-{n}/v1/chat/completions" for n in range(1, RUNS + 1)],
                rk.pid,
            ),
        }
        if litellm:
            litellm_skipped = start_litellm(litellm, upstream, home, start, targets)
        for target in targets.values():
            wait_port(int(target.base.rsplit(":", 1)[1]))
        for target in targets.values():  # warm up: connection pools, price lookups, imports, the runs
            for body in (BODY, STREAM_BODY):
                wrk(script, target, body, 16, 2)

        cells = [(stream, conns) for stream in (False, True) for conns in CONCURRENCY]
        rounds: dict[tuple[str, bool, int], list[dict[str, float]]] = {}
        for r in range(args.repeats):
            for stream, conns in cells:
                for name, target in targets.items():
                    result = wrk(script, target, STREAM_BODY if stream else BODY, conns, args.duration)
                    rounds.setdefault((name, stream, conns), []).append(result)
                    print(f"round {r + 1}, {name}, stream={stream}, {conns} clients: {result}", file=sys.stderr)
    except BaseException:
        print(f"logs: {home}", file=sys.stderr)
        raise
    finally:
        for proc in reversed(procs):  # the proxies before their upstream, so that calls in flight end cleanly
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
    shutil.rmtree(home)  # rk's ledger of a few hundred thousand calls among it

    def med(name: str, stream: bool, conns: int, key: str) -> float | None:
        values = [r[key] for r in rounds[(name, stream, conns)] if key in r]
        return statistics.median(values) if values else None

    results = []
    for stream, conns in cells:
        direct = {k: med("upstream", stream, conns, k) for k in ("p50", "p99")}
        for name in targets:
            row = {
                "target": name,
                "stream": stream,
                "concurrency": conns,
                **{k: med(name, stream, conns, k) for k in ("rps", "p50", "p99", "cpu_us_per_call")},
                **{k: med(name, stream, conns, k) for k in ("proxy_share_pct", "proxy_core_busy_pct")},
                "load_core_busy_pct": med(name, stream, conns, "load_core_busy_pct"),
                "errors": sum(int(r["errors"]) for r in rounds[(name, stream, conns)]),
                "rps_rounds": [round(r["rps"]) for r in rounds[(name, stream, conns)]],
            }
            for k in ("p50", "p99"):  # none when no call finished in a run
                if name != "upstream" and row[k] is not None and direct[k] is not None:
                    row[f"added_{k}"] = row[k] - direct[k]  # type: ignore[operator]
            results.append(row)
    verdicts = []
    for stream, conns in cells:
        rk_rps, floor_rps = med("rk serve", stream, conns, "rps"), med("floor", stream, conns, "rps")
        lite = med("litellm", stream, conns, "rps") if "litellm" in targets else None
        verdicts.append(
            {
                "stream": stream,
                "concurrency": conns,
                "rk_over_floor_rps": rk_rps / floor_rps,  # type: ignore[operator]
                "target_met": rk_rps * TARGET >= floor_rps,  # type: ignore[operator]
                "rk_over_litellm_rps": rk_rps / lite if lite else None,  # type: ignore[operator]
            }
        )
    report = {
        "duration_s": args.duration,
        "repeats": args.repeats,
        "runs": RUNS,
        "cores": os.cpu_count(),
        "target": f"rk serve requests/s >= floor / {TARGET}",
        "target_met": all(v["target_met"] for v in verdicts),
        "litellm_skipped": litellm_skipped,
        "results": results,
        "verdicts": verdicts,
    }
    print(json.dumps(report, indent=2) if args.json else table(report))


def table(report: dict) -> str:
    """The report in Markdown."""
    mode = {False: "non-streaming", True: "streaming"}

    def num(value: float | None, fmt: str, unit: str = "", none: str = "") -> str:
        return none if value is None else format(value, fmt) + unit

    lines = [
        f"## rk serve under load ({report['repeats']} interleaved rounds of {report['duration_s']:g} s, medians)",
        "",
        "| mode | clients | target | requests/s | p50 ms | p99 ms | added p50 | added p99 | CPU µs/call "
        "| core 0: proxy / all | core 1 |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["results"]:
        errors = f" ({row['errors']} errors)" if row["errors"] else ""
        lines.append(
            f"| {mode[row['stream']]} | {row['concurrency']} | {row['target']} | {row['rps']:,.0f}{errors} "
            f"| {num(row['p50'], '.2f')} | {num(row['p99'], '.2f')} | {num(row.get('added_p50'), '.2f')} "
            f"| {num(row.get('added_p99'), '.2f')} | {num(row['cpu_us_per_call'], '.0f')} "
            f"| {num(row['proxy_share_pct'], '.0f', '%', '—')} / {row['proxy_core_busy_pct']:.0f}% "
            f"| {row['load_core_busy_pct']:.0f}% |"
        )
    lines += [
        "",
        f"| mode | clients | rk serve / floor requests/s | target ≥ {1 / TARGET:.2f}× | rk serve / LiteLLM |",
        "|---|---|---|---|---|",
    ]
    for v in report["verdicts"]:
        lite = num(v["rk_over_litellm_rps"], ".1f", "×", "—")
        lines.append(
            f"| {mode[v['stream']]} | {v['concurrency']} | {v['rk_over_floor_rps']:.2f}× "
            f"| {'met' if v['target_met'] else '**missed**'} | {lite} |"
        )
    if report["litellm_skipped"]:
        lines.append(f"\nLiteLLM skipped: {report['litellm_skipped']}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
