"""`rk serve` over 100,000 single-call runs: does a long-lived server keep anything per run?

    python bench/serve_runs_memory.py [--runs 100000] [--every 10000] [--concurrency 16] [--json]

Starts `rk serve --mock --max-cost 1.00` as a process of its own on a fresh data dir (RK_HOME in a temp dir),
pinned to core 0, and sends it `--runs` chat completions that name no run, so that each is a run of its own
that must end, and leave memory, with its call. The client is this process (aiohttp, `--concurrency`
keep-alive connections), pinned to core 1. After every `--every` runs, with no call in flight, it reads the
server's resident set (VmRSS) and peak (VmHWM) from /proc, the live runs the server lists (`GET /rk/runs`,
which must be none), the ledger's size on disk, and the rate of the last batch. At the end it counts the
completed runs in the ledger (all `--runs` of them must be there).

Verdict: the server's RSS after the last batch is within 4 MiB of its RSS after the first (which includes
start-up, the price data and warm caches), i.e. under about 45 bytes per run over 90,000 runs. Results print
as a Markdown table, or JSON with `--json`; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from overhead import BODY, LOAD_CORE, PROXY_CORE, free_port, rss_kib, spawn, wait_port

GROWTH_MIB = 4.0


async def batch(http: aiohttp.ClientSession, url: str, runs: int, concurrency: int) -> None:
    left = runs

    async def caller() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            async with http.post(url, data=BODY, headers={"Content-Type": "application/json"}) as response:
                if response.status != 200:
                    raise RuntimeError(f"HTTP {response.status}: {await response.text()}")
                await response.read()

    await asyncio.gather(*(caller() for _ in range(concurrency)))


async def measure(base: str, pid: int, home: Path, args: argparse.Namespace) -> list[dict[str, float]]:
    control = json.loads(next((home / "control").glob("*.json")).read_text())
    authorization = {"Authorization": f"Bearer {control['token']}"}
    rows = []
    done = 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=args.concurrency)) as http:
        while done < args.runs:
            size = min(args.every, args.runs - done)
            started = time.monotonic()
            await batch(http, base + "/v1/chat/completions", size, args.concurrency)
            elapsed = time.monotonic() - started
            done += size
            async with http.get(base + "/rk/runs", headers=authorization) as response:
                live = len((await response.json())["runs"])
            ledger = sum(f.stat().st_size for f in home.glob("ledger.db*"))
            row = {
                "runs": done,
                "runs_per_s": size / elapsed,
                "rss_mib": rss_kib(pid, "VmRSS") / 1024,
                "peak_mib": rss_kib(pid, "VmHWM") / 1024,
                "live_runs": live,
                "ledger_mib": ledger / 2**20,
            }
            rows.append(row)
            print(
                f"{done:>7,} runs  {row['runs_per_s']:6.0f} runs/s  RSS {row['rss_mib']:.1f} MiB"
                f"  peak {row['peak_mib']:.1f} MiB  live {live}  ledger {row['ledger_mib']:.1f} MiB",
                file=sys.stderr,
                flush=True,
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100_000)
    parser.add_argument("--every", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    os.sched_setaffinity(0, LOAD_CORE)

    with tempfile.TemporaryDirectory(prefix="rk-serve-runs-") as tmp:
        home = Path(tmp)
        port = free_port()
        env = {**os.environ, "RK_HOME": str(home), "RK_CONFIG_DIR": str(home / "config")}
        command = [sys.executable, "-m", "riskkernel", "serve", "--mock", "--max-cost", "1.00", "--port", str(port)]
        with open(home / "serve.log", "wb") as log:
            server = spawn(command, PROXY_CORE, env=env, stderr=log)
        try:
            wait_port(port)
            while not list((home / "control").glob("*.json")):
                time.sleep(0.05)
            started = time.monotonic()
            rows = asyncio.run(measure(f"http://127.0.0.1:{port}", server.pid, home, args))
            total = time.monotonic() - started
        finally:
            server.terminate()
            try:
                server.wait(20)
            except subprocess.TimeoutExpired:
                server.kill()
        db = sqlite3.connect(home / "ledger.db")
        completed = db.execute("SELECT count(*) FROM runs WHERE status = 'completed'").fetchone()[0]
        db.close()

    growth = rows[-1]["rss_mib"] - rows[0]["rss_mib"]
    verdict = {
        "runs": args.runs,
        "seconds": round(total, 1),
        "completed_in_ledger": completed,
        "live_runs_at_checkpoints": max(row["live_runs"] for row in rows),
        "rss_growth_mib": round(growth, 2),
        "target_mib": GROWTH_MIB,
        "met": growth <= GROWTH_MIB and completed == args.runs and all(row["live_runs"] == 0 for row in rows),
    }
    if args.json:
        print(json.dumps({"checkpoints": rows, "verdict": verdict}, indent=2))
        return
    print("| runs | runs/s | RSS MiB | peak RSS MiB | live runs | ledger MiB |")
    print("|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['runs']:,} | {row['runs_per_s']:.0f} | {row['rss_mib']:.1f} | {row['peak_mib']:.1f}"
            f" | {row['live_runs']} | {row['ledger_mib']:.1f} |"
        )
    print(
        f"\n{args.runs:,} runs in {total:.0f} s; {completed:,} completed in the ledger; RSS grew"
        f" {growth:+.2f} MiB from the first checkpoint to the last (target ≤ {GROWTH_MIB:g} MiB):"
        f" {'met' if verdict['met'] else 'MISSED'}"
    )


if __name__ == "__main__":
    main()
