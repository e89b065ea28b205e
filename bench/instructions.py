"""CPU instructions per call of `rk serve` and of the floor relay, counted by valgrind's callgrind.

    python bench/instructions.py [--stream] [--floor] [--seconds 12] [--connections 16]

Wall-clock throughput on a shared VM varies by ±30% from one minute to the next; the instructions a proxy
executes per call do not (±2% here). The proxy runs under callgrind (about 50x slower) with instrumentation
off until it is warmed up; wrk then drives it for `--seconds`, and the instructions of all its threads (the
ledger writer's included) are divided by the calls wrk completed. Kernel time (system calls) is not counted.
Same set-up as bench/serve_load.py: rk's calls go round-robin over 8 runs, the fake upstream (not measured)
runs outside valgrind. Needs valgrind and wrk.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from overhead import BODY, LOAD_CORE, PROXY_CORE, STREAM_BODY, free_port, spawn, wait_port
from serve_load import KEY, ROTATE_LUA, RUNS

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stream", action="store_true", help="50-chunk streams instead of whole responses")
    parser.add_argument("--floor", action="store_true", help="measure the floor relay instead of rk serve")
    parser.add_argument("--seconds", type=int, default=12, help="how long wrk drives the proxy, once warm")
    parser.add_argument("--connections", type=int, default=16)
    args = parser.parse_args()
    home = tempfile.mkdtemp()
    script = Path(home) / "rotate.lua"
    script.write_text(ROTATE_LUA)
    up, port = free_port(), free_port()
    upstream = spawn([sys.executable, str(HERE / "upstream.py"), str(up)], LOAD_CORE)
    out = f"{home}/callgrind.out"
    if args.floor:
        argv, paths = (
            [sys.executable, str(HERE / "floor.py"), str(port), f"http://127.0.0.1:{up}/v1"],
            "/v1/chat/completions",
        )
    else:
        serve = [
            "serve",
            "--port",
            str(port),
            "--max-cost",
            "unlimited",
            "--openai-upstream",
            f"http://127.0.0.1:{up}/v1",
        ]
        argv = [sys.executable, "-m", "riskkernel", *serve]
        paths = " ".join(f"/run/run-{n}/v1/chat/completions" for n in range(1, RUNS + 1))
    valgrind = [
        "valgrind",
        "--tool=callgrind",
        "--separate-threads=yes",
        "--instr-atstart=no",
        f"--callgrind-out-file={out}",
    ]
    proxy = spawn(
        valgrind + argv,
        PROXY_CORE,
        env={**os.environ, "RK_HOME": home},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    env = {**os.environ, "BENCH_BODY": STREAM_BODY if args.stream else BODY, "BENCH_PATHS": paths, "BENCH_KEY": KEY}

    def wrk(seconds: int) -> str:
        command = [
            "wrk",
            "-t1",
            f"-c{args.connections}",
            f"-d{seconds}s",
            "--timeout=60s",
            f"-s{script}",
            f"http://127.0.0.1:{port}/",
        ]
        run = subprocess.run(
            command, env=env, capture_output=True, text=True, preexec_fn=lambda: os.sched_setaffinity(0, LOAD_CORE)
        )
        return run.stdout

    try:
        wait_port(up)
        wait_port(port, timeout=300)
        wrk(5)  # warm up: imports, price lookups, connection pools, the runs
        time.sleep(1)
        subprocess.run(["callgrind_control", "-i", "on", str(proxy.pid)], capture_output=True, check=True)
        calls = int(re.search(r"(\d+) requests in", wrk(args.seconds)).group(1))  # type: ignore[union-attr]
        subprocess.run(["callgrind_control", "-i", "off", str(proxy.pid)], capture_output=True, check=True)
        subprocess.run(["callgrind_control", "-d", str(proxy.pid)], capture_output=True, check=True)
        time.sleep(1)
        total = 0
        for dump in glob.glob(out + "*"):
            total += sum(
                int(line.split()[1]) for line in Path(dump).read_text().splitlines() if line.startswith("totals:")
            )
    finally:
        for process in (proxy, upstream):
            process.terminate()
            process.wait(30)
    what = "floor" if args.floor else "rk serve"
    mode = "streaming" if args.stream else "non-streaming"
    print(f"{what}, {mode}: {calls} calls, {total / max(calls, 1) / 1000:,.0f}k instructions per call")


if __name__ == "__main__":
    main()
