"""What OpenTelemetry export adds to a call: `rk run --mock` with export off and on, in the same run.

    python bench/otel_overhead.py [--calls 3000] [--repeats 3] [--pause 0]

rk (pinned to core 0) answers with its own mock upstream; the agent (pinned to core 1) makes `--calls`
sequential non-streaming chat calls and as many streaming ones with aiohttp, timing each, `--pause` ms
apart (0: back to back, which shows the CPU export costs rk; a real agent thinks between calls). With export on,
spans and metrics go to a minimal OTLP/HTTP sink in this process (which answers 200 to everything). The
rounds are interleaved; medians are reported, and what export adds is the median of each round's
difference. Needs the `otel` extra. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading

from aiohttp import web

AGENT = r"""
import asyncio, json, os, statistics, sys, time
import aiohttp

os.sched_setaffinity(0, {1})
BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Say hello to the benchmark."}]}

async def main(n, pause):
    url = os.environ["OPENAI_BASE_URL"] + "/chat/completions"
    async with aiohttp.ClientSession(headers={"Authorization": "Bearer sk-bench"}) as session:
        async def call(stream):
            await asyncio.sleep(pause)
            start = time.perf_counter()
            async with session.post(url, json={**BODY, "stream": stream}) as response:
                await response.read()
                assert response.status == 200, response.status
            return (time.perf_counter() - start) * 1e6
        for stream in (False, True):  # warm up: connections, price lookups
            for _ in range(200):
                await call(stream)
        whole = [await call(False) for _ in range(n)]
        streams = [await call(True) for _ in range(n)]
    print(json.dumps({"whole": statistics.median(whole), "stream": statistics.median(streams)}))

asyncio.run(main(int(sys.argv[1]), float(sys.argv[2]) / 1000))
"""


def sink() -> str:
    """An OTLP/HTTP endpoint that takes everything, on a thread of its own."""
    app = web.Application()
    app.router.add_post("/{tail:.*}", lambda request: _ok(request))
    runner = web.AppRunner(app, access_log=None)
    loop = asyncio.new_event_loop()
    loop.run_until_complete(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", 0)
    loop.run_until_complete(site.start())
    threading.Thread(target=loop.run_forever, daemon=True).start()
    host, port = runner.addresses[0][:2]
    return f"http://{host}:{port}"


async def _ok(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(content_type="application/x-protobuf")


def one_run(calls: int, pause: float, env: dict[str, str]) -> dict[str, float]:
    """Median µs of each kind of call, and the CPU µs per call of rk and the agent together."""
    args = [sys.executable, "-m", "riskkernel", "run", "--quiet", "--mock", "--max-cost", "unlimited", "--"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(
        [*args, sys.executable, "-c", AGENT, str(calls), str(pause)],
        capture_output=True,
        text=True,
        check=True,
        env=env,
        preexec_fn=lambda: os.sched_setaffinity(0, {0}),
    )
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return {**json.loads(out.stdout), "cpu": cpu / (2 * (calls + 200)) * 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=3000, help="calls of each kind per run")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds; medians are reported")
    parser.add_argument("--pause", type=float, default=0.0, help="ms between an answer and the next call")
    args = parser.parse_args()
    endpoint = sink()
    base = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    base["RK_HOME"] = tempfile.mkdtemp(prefix="rk-bench-otel-")
    modes = {"off": base, "on": {**base, "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint}}
    results: dict[str, list[dict[str, float]]] = {mode: [] for mode in modes}
    for _ in range(args.repeats):
        for mode, env in modes.items():
            results[mode].append(one_run(args.calls, args.pause, env))

    def med(mode: str, kind: str) -> float:
        return statistics.median(r[kind] for r in results[mode])

    def added(kind: str) -> float:  # round by round: this VM's speed drifts more between rounds than within one
        return statistics.median(on[kind] - off[kind] for off, on in zip(results["off"], results["on"], strict=True))

    rounds = f"{args.repeats} rounds of {args.calls} calls each, {args.pause:g} ms apart"
    print(f"## OpenTelemetry export overhead ({rounds}, medians)\n")
    print("| µs: median call, agent's view; CPU of rk and the agent | export off | export on | added |")
    print("|---|---|---|---|")
    labels = (("whole", "non-streaming chat"), ("stream", "streaming chat, whole stream"), ("cpu", "CPU per call"))
    for kind, label in labels:
        print(f"| {label} | {med('off', kind):.0f} | {med('on', kind):.0f} | {added(kind):+.0f} |")


if __name__ == "__main__":
    main()
