"""`rk serve` under sustained concurrent load, beside the floor relay and LiteLLM's proxy, in the same run.

    python bench/serve_load.py [--duration 10] [--repeats 3] [--litellm PYTHON] [--json]

Needs `wrk` (Debian: apt install wrk) and rk installed in this Python. As in bench/overhead.py, the proxy
under test (rk serve, the floor relay of bench/floor.py, LiteLLM's proxy) is pinned to core 0; wrk and the
fake upstream (bench/upstream.py) to core 1. For each target, at 16 and 64 connections, non-streaming and
streaming (a 50-chunk stream, timed to its last byte), wrk reports requests/s and p50/p99 latency; "added"
is the target's latency minus that of a direct hit on the fake upstream at the same concurrency.

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
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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


def cpu_ticks() -> dict[int, tuple[int, int]]:
    """Per core: (busy, total) jiffies since boot."""
    out = {}
    for line in Path("/proc/stat").read_text().splitlines():
        m = re.match(r"cpu(\d+) (.*)", line)
        if m:
            ticks = [int(t) for t in m.group(2).split()]
            idle = ticks[3] + ticks[4]
            out[int(m.group(1))] = (sum(ticks) - idle, sum(ticks))
    return out


def wrk(script: Path, base: str, paths: list[str], body: str, connections: int, duration: float) -> dict[str, float]:
    """Requests/s, p50/p99 latency (ms), errors and each core's busy share from one wrk run."""
    url = base + paths[0]
    before = cpu_ticks()
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{round(duration)}s", "--timeout=10s", "--latency", f"-s{script}", url],
        capture_output=True,
        text=True,
        check=True,
        preexec_fn=lambda: os.sched_setaffinity(0, LOAD_CORE),
        env={**os.environ, "BENCH_BODY": body, "BENCH_PATHS": " ".join(paths), "BENCH_KEY": KEY},
    )
    after = cpu_ticks()
    result = {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out.stdout).group(1))}  # type: ignore[union-attr]
    for pct, value, unit in re.findall(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s)$", out.stdout, re.M):
        result[f"p{pct}"] = float(value) * _UNITS[unit]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out.stdout)
    socket = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out.stdout)
    result["errors"] = (int(errors.group(1)) if errors else 0) + (sum(map(int, socket.groups())) if socket else 0)
    for name, cores in (("proxy_core_busy", PROXY_CORE), ("load_core_busy", LOAD_CORE)):
        busy = sum(after[c][0] - before[c][0] for c in cores)
        total = sum(after[c][1] - before[c][1] for c in cores)
        result[name] = 100 * busy / max(total, 1)
    return result


def start_litellm(python: str, upstream: str, home: str) -> tuple[subprocess.Popen[bytes], str]:
    """LiteLLM's proxy on one core, every model of the bench body routed to the fake upstream."""
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
        "LITELLM_MODE": "PRODUCTION",
        "HOME": home,
    }
    args = [python, "-m", "litellm.proxy.proxy_cli", "--config", str(config), "--host", "127.0.0.1"]
    log = (Path(home) / "litellm.log").open("wb")
    proc = spawn([*args, "--port", str(port), "--num_workers", "1"], PROXY_CORE, env=env, stdout=log, stderr=log)
    return proc, f"http://127.0.0.1:{port}"


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
        # Logs go to files: wrk hangs up on the calls in flight at the end of each run, and they complain.
        up_log = (Path(home) / "upstream.log").open("wb")
        up = [sys.executable, str(HERE / "upstream.py"), str(up_port)]
        procs.append(spawn(up, LOAD_CORE, stdout=up_log, stderr=up_log))
        upstream = f"http://127.0.0.1:{up_port}/v1"
        floor_log = (Path(home) / "floor.log").open("wb")
        floor = [sys.executable, str(HERE / "floor.py"), str(floor_port), upstream]
        procs.append(spawn(floor, PROXY_CORE, stdout=floor_log, stderr=floor_log))
        rk_log = (Path(home) / "rk.log").open("wb")
        rk = [sys.executable, "-m", "riskkernel", "serve", "--port", str(rk_port), "--max-cost", "unlimited"]
        rk_env = {**os.environ, "RK_HOME": home}
        procs.append(spawn([*rk, "--openai-upstream", upstream], PROXY_CORE, env=rk_env, stdout=rk_log, stderr=rk_log))
        plain = ["/v1/chat/completions"]
        targets = {
            "upstream": (f"http://127.0.0.1:{up_port}", plain),
            "floor": (f"http://127.0.0.1:{floor_port}", plain),
            "rk serve": (
                f"http://127.0.0.1:{rk_port}",
                [f"/run/run-{n}/v1/chat/completions" for n in range(1, RUNS + 1)],
            ),
        }
        if litellm:
            proc, url = start_litellm(litellm, upstream, home)
            procs.append(proc)
            targets["litellm"] = (url, plain)
        for port in (up_port, floor_port, rk_port):
            wait_port(port)
        if litellm:
            end = time.monotonic() + 180  # its start-up imports take a while
            port = int(targets["litellm"][0].rsplit(":", 1)[1])
            while procs[-1].poll() is None and time.monotonic() < end:
                try:
                    wait_port(port, timeout=1)
                    break
                except RuntimeError:
                    pass
            else:
                log = (Path(home) / "litellm.log").read_text(errors="replace").strip().splitlines()
                litellm_skipped = "LiteLLM's proxy did not start: " + (log[-1] if log else "no output")
                del targets["litellm"]
        for base, paths in targets.values():  # warm up: connection pools, price lookups, imports, the runs
            for body in (BODY, STREAM_BODY):
                wrk(script, base, paths, body, 16, 2)

        cells = [(stream, conns) for stream in (False, True) for conns in CONCURRENCY]
        rounds: dict[tuple[str, bool, int], list[dict[str, float]]] = {}
        for r in range(args.repeats):
            for stream, conns in cells:
                for name, (base, paths) in targets.items():
                    result = wrk(script, base, paths, STREAM_BODY if stream else BODY, conns, args.duration)
                    rounds.setdefault((name, stream, conns), []).append(result)
                    print(
                        f"round {r + 1}: {name}, {'streaming' if stream else 'non-streaming'}, {conns} conns: "
                        f"{result['rps']:.0f} req/s, p50 {result['p50']:.2f} ms, p99 {result['p99']:.2f} ms",
                        file=sys.stderr,
                    )
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()

    def med(name: str, stream: bool, conns: int, key: str) -> float:
        return statistics.median(r[key] for r in rounds[(name, stream, conns)])

    results = []
    for stream, conns in cells:
        for name in targets:
            row = {k: med(name, stream, conns, k) for k in ("rps", "p50", "p99", "proxy_core_busy", "load_core_busy")}
            results.append(
                {
                    "target": name,
                    "stream": stream,
                    "concurrency": conns,
                    "rps": row["rps"],
                    "p50_ms": row["p50"],
                    "p99_ms": row["p99"],
                    "added_p50_ms": None if name == "upstream" else row["p50"] - med("upstream", stream, conns, "p50"),
                    "added_p99_ms": None if name == "upstream" else row["p99"] - med("upstream", stream, conns, "p99"),
                    "errors": sum(int(r["errors"]) for r in rounds[(name, stream, conns)]),
                    "proxy_core_busy_pct": row["proxy_core_busy"],
                    "load_core_busy_pct": row["load_core_busy"],
                    "rps_rounds": [r["rps"] for r in rounds[(name, stream, conns)]],
                }
            )
    verdicts = []
    for stream, conns in cells:
        rk, floor = med("rk serve", stream, conns, "rps"), med("floor", stream, conns, "rps")
        lite = med("litellm", stream, conns, "rps") if "litellm" in targets else None
        verdicts.append(
            {
                "stream": stream,
                "concurrency": conns,
                "rk_over_floor_rps": rk / floor,
                "target_met": rk * TARGET >= floor,
                "rk_over_litellm_rps": rk / lite if lite else None,
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
    lines = [
        f"## rk serve under load ({report['repeats']} interleaved rounds of {report['duration_s']:g} s, medians)",
        "",
        "| mode | clients | target | requests/s | p50 (ms) | p99 (ms) | added p50 | added p99 | core 0 / 1 busy |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["results"]:
        added = [f"{row[k]:.2f}" if row[k] is not None else "" for k in ("added_p50_ms", "added_p99_ms")]
        errors = f" ({row['errors']} errors)" if row["errors"] else ""
        lines.append(
            f"| {mode[row['stream']]} | {row['concurrency']} | {row['target']} | {row['rps']:,.0f}{errors} "
            f"| {row['p50_ms']:.2f} | {row['p99_ms']:.2f} | {added[0]} | {added[1]} "
            f"| {row['proxy_core_busy_pct']:.0f}% / {row['load_core_busy_pct']:.0f}% |"
        )
    lines += [
        "",
        f"| mode | clients | rk serve / floor requests/s | target ≥ {1 / TARGET:.2f}× | rk serve / LiteLLM |",
        "|---|---|---|---|---|",
    ]
    for v in report["verdicts"]:
        lite = f"{v['rk_over_litellm_rps']:.1f}×" if v["rk_over_litellm_rps"] else "—"
        lines.append(
            f"| {mode[v['stream']]} | {v['concurrency']} | {v['rk_over_floor_rps']:.2f}× "
            f"| {'met' if v['target_met'] else '**missed**'} | {lite} |"
        )
    if report["litellm_skipped"]:
        lines.append(f"\nLiteLLM skipped: {report['litellm_skipped']}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
