"""What the rk proxy adds to a call, measured beside the floor for an aiohttp proxy, in the same run.

    python bench/overhead.py [--duration 8] [--repeats 3]

Needs `wrk` and `hyperfine` (Debian: apt install wrk hyperfine) and rk installed in this Python. The
proxies (rk's and the floor relay, bench/floor.py) run pinned to core 0; wrk, the stream client and the
fake upstream (bench/upstream.py) run pinned to core 1. For each target (the upstream directly, the floor,
rk) wrk measures non-streaming latency at concurrency 1 and 16 and throughput at concurrency 16; an aiohttp
client measures time to first byte of a 50-chunk stream. Also reported: rk's idle and peak RSS, and the
wall time of `rk run -- true` against `python -c "import aiohttp, typer, rich"`. Prints a Markdown report.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

HERE = Path(__file__).resolve().parent
PROXY_CORE, LOAD_CORE = {0}, {1}
BODY = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Say hello to the benchmark."}]})
STREAM_BODY = json.dumps({**json.loads(BODY), "stream": True})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(args: list[str], cores: set[int], **kwargs: object) -> subprocess.Popen[bytes]:
    return subprocess.Popen(args, preexec_fn=lambda: os.sched_setaffinity(0, cores), **kwargs)  # type: ignore[call-overload]


def wait_port(port: int, timeout: float = 20) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port}")


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def wrk(url: str, connections: int, duration: float) -> dict[str, float]:
    """Latency percentiles (ms) and requests/s from one wrk run."""
    script = HERE / "post.lua"
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{round(duration)}s", "--latency", "-s", str(script), url],
        capture_output=True,
        text=True,
        check=True,
        preexec_fn=lambda: os.sched_setaffinity(0, LOAD_CORE),
        env={**os.environ, "BENCH_BODY": BODY},
    )
    result = {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out.stdout).group(1))}  # type: ignore[union-attr]
    for pct, value, unit in re.findall(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s)$", out.stdout, re.M):
        result[f"p{pct}"] = float(value) * _UNITS[unit]
    if "Non-2xx" in out.stdout:
        raise RuntimeError(f"errors from {url}:\n{out.stdout}")
    return result


async def stream_ttfb(url: str, n: int) -> float:
    """Median ms to the first byte of a 50-chunk stream's body."""
    times = []
    async with aiohttp.ClientSession() as session:
        for i in range(n + 20):
            start = time.perf_counter()
            async with session.post(url, data=STREAM_BODY, headers={"Authorization": "Bearer sk-bench"}) as r:
                await r.content.readany()
                first = time.perf_counter() - start
                await r.read()
            if i >= 20:
                times.append(first * 1000)
    return statistics.median(times)


def rss_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def hyperfine(commands: list[str], env: dict[str, str]) -> list[float]:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        subprocess.run(
            ["hyperfine", "-N", "--warmup", "3", "--runs", "20", "--export-json", out.name, *commands],
            check=True,
            capture_output=True,
            env=env,
        )
        return [r["median"] * 1000 for r in json.loads(Path(out.name).read_text())["results"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per wrk run")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds; medians are reported")
    args = parser.parse_args()
    os.sched_setaffinity(0, LOAD_CORE)
    home = tempfile.mkdtemp(prefix="rk-bench-")
    env = {**os.environ, "RK_HOME": home}
    procs: list[subprocess.Popen[bytes]] = []
    try:
        up_port, floor_port = free_port(), free_port()
        procs.append(spawn([sys.executable, str(HERE / "upstream.py"), str(up_port)], LOAD_CORE))
        upstream = f"http://127.0.0.1:{up_port}/v1"
        procs.append(spawn([sys.executable, str(HERE / "floor.py"), str(floor_port), upstream], PROXY_CORE))
        url_file = Path(home) / "proxy-url"
        child = f"import os, time; open({str(url_file)!r}, 'w').write(os.environ['RK_PROXY_URL']); time.sleep(86400)"
        rk = spawn(
            [
                sys.executable,
                "-m",
                "riskkernel",
                "run",
                "--quiet",
                "--max-cost",
                "1000000",
                "--openai-upstream",
                upstream,
                "--",
                sys.executable,
                "-c",
                child,
            ],
            PROXY_CORE,
            env=env,
        )
        procs.append(rk)
        wait_port(up_port)
        wait_port(floor_port)
        while not url_file.exists() or not url_file.read_text():
            time.sleep(0.05)
        rk_url = url_file.read_text()
        idle_rss = rss_kib(rk.pid, "VmRSS")  # started, no call made yet
        targets = {"upstream": f"http://127.0.0.1:{up_port}", "floor": f"http://127.0.0.1:{floor_port}", "rk": rk_url}
        for base in targets.values():  # warm up: connection pools, price lookups, imports
            wrk(base + "/v1/chat/completions", 4, 1)

        runs: dict[tuple[str, int], list[dict[str, float]]] = {}
        ttfb: dict[str, list[float]] = {}
        for _ in range(args.repeats):
            for name, base in targets.items():
                for conns in (1, 16):
                    runs.setdefault((name, conns), []).append(wrk(base + "/v1/chat/completions", conns, args.duration))
                ttfb.setdefault(name, []).append(asyncio.run(stream_ttfb(base + "/v1/chat/completions", 200)))
        peak_rss = rss_kib(rk.pid, "VmHWM")

        def med(name: str, conns: int, key: str) -> float:
            return statistics.median(r[key] for r in runs[(name, conns)])

        print(f"## rk proxy overhead ({args.repeats} interleaved rounds of {args.duration:g} s, medians)\n")
        print("| | upstream direct | floor relay | rk | floor added | rk added | rk / floor |")
        print("|---|---|---|---|---|---|---|")
        for conns in (1, 16):
            for key in ("p50", "p99"):
                direct, floor, ours = (med(n, conns, key) for n in ("upstream", "floor", "rk"))
                fa, ra = floor - direct, ours - direct
                print(
                    f"| non-streaming {key}, concurrency {conns} (ms) | {direct:.3f} | {floor:.3f} | {ours:.3f} "
                    f"| {fa:.3f} | {ra:.3f} | {ra / fa:.2f}× |"
                )
        rps = {n: med(n, 16, "rps") for n in targets}
        print(
            f"| requests/s, one core, concurrency 16 | {rps['upstream']:.0f} | {rps['floor']:.0f} | {rps['rk']:.0f} "
            f"| | | {rps['rk'] / rps['floor']:.2f}× |"
        )
        t = {n: statistics.median(v) for n, v in ttfb.items()}
        print(
            f"| streaming TTFB, 50-chunk stream (ms) | {t['upstream']:.3f} | {t['floor']:.3f} | {t['rk']:.3f} "
            f"| {t['floor'] - t['upstream']:.3f} | {t['rk'] - t['upstream']:.3f} | |"
        )
        print(f"\nrk RSS: idle (started, no call yet) {idle_rss / 1024:.1f} MiB, peak {peak_rss / 1024:.1f} MiB")
        rk.terminate()
        rk.wait(20)
        # As installed, with bytecode: pip compiles rk's modules (as it did aiohttp's) when it installs them. With
        # PYTHONDONTWRITEBYTECODE set, rk's thirty-odd modules would be compiled again at every start, which
        # is no start a user sees (the warm-up runs write the checkout's bytecode).
        compiled = {name: value for name, value in env.items() if name != "PYTHONDONTWRITEBYTECODE"}
        rk_true, imports = hyperfine(
            [f"{sys.executable} -m riskkernel run -- true", f'{sys.executable} -c "import aiohttp, typer, rich"'],
            compiled,
        )
        print(
            f'`rk run -- true`: {rk_true:.0f} ms; `python -c "import aiohttp, typer, rich"`: {imports:.0f} ms '
            f"({rk_true / imports:.2f}×)"
        )
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(20)


if __name__ == "__main__":
    main()
