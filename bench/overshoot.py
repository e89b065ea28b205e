"""Does the cap hold? 64 concurrent agents spend one $1.00 run, under rk, rk --strict, and a spent-only gate.

    python bench/overshoot.py [--seeds 20] [--agents 64] [--cap 1.00] [--json]

Each seed is played three times against the same fake upstream (in this process, on a loopback port):

- `rk run --max-cost CAP` (default admission: spent + reservations of the calls in flight below the cap),
- `rk run --max-cost CAP --strict`,
- a spent-only gate: a relay in this process that forwards a call while spent < CAP and adds each call's
  reported cost after it — the admission every per-key gateway budget ships (the counterfactual).

The agents (this file again, `--agents-of SEED`, run as the child) are 64 asyncio tasks sharing one OpenAI
client. Each keeps a conversation that grows by its answers and calls gpt-4o until refused: half of the
calls stream, half set `max_tokens` (256 to 4,096). The upstream answers with realistic usage: input about
a token per 4 bytes of the messages, output drawn per request from a heavy tail (60% 50-400 tokens, 30%
400-2,000, 10% 2,000-16,384, the most gpt-4o may give), never past the request's own limit; time to
answer grows with output. Draws depend only on the seed and the request, so the three plays see the same
upstream. Reported per seed: final spend / cap for each, and the largest single call / cap, which bounds
rk's default overshoot (target: strict <= 1.000 on every seed; default <= 1 + largest call / cap).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import random
import sys
import tempfile
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

from aiohttp import ClientSession, web

PRICE_IN, PRICE_OUT = Decimal("2.5") / 1_000_000, Decimal("10") / 1_000_000  # gpt-4o, USD per token
MODEL_MAX_OUTPUT = 16_384
WORDS = "the quick brown fox jumps over the lazy dog while agents keep asking for more ".split()


# -- the fake upstream --------------------------------------------------------------------------------------


def draw_output(seed: int, body: bytes, limit: int | None) -> int:
    rng = random.Random(hashlib.blake2b(body, key=str(seed).encode(), digest_size=8).digest())
    roll = rng.random()
    n = rng.randint(50, 400) if roll < 0.6 else rng.randint(400, 2_000) if roll < 0.9 else rng.randint(2_000, 16_384)
    return min(n, limit or MODEL_MAX_OUTPUT, MODEL_MAX_OUTPUT)


def upstream_app(seed: int) -> web.Application:
    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        obj = json.loads(body)
        limit = obj.get("max_completion_tokens") or obj.get("max_tokens")
        output = draw_output(seed, json.dumps(obj["messages"]).encode(), limit)
        usage = {"prompt_tokens": len(json.dumps(obj["messages"])) // 4, "completion_tokens": output}
        usage["total_tokens"] = usage["prompt_tokens"] + output
        text = " ".join(WORDS[i % len(WORDS)] for i in range(min(output, 200)))  # what the agent keeps
        base = {"id": "chatcmpl-x", "created": 1, "model": "gpt-4o-2024-08-06", "system_fingerprint": "fp"}
        if not obj.get("stream"):
            await asyncio.sleep(0.01 + output * 0.00005)
            message = {"role": "assistant", "content": text}
            choice = {"index": 0, "message": message, "finish_reason": "stop", "logprobs": None}
            answer = {**base, "object": "chat.completion", "choices": [choice], "usage": usage}
            return web.json_response(answer)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        chunk = {**base, "object": "chat.completion.chunk"}

        def event(choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> bytes:
            return b"data: " + json.dumps({**chunk, "choices": choices, "usage": usage}).encode() + b"\n\n"

        try:
            for i in range(max(output // 100, 1)):  # about 100 tokens (400 characters) an event
                delta = {"content": ("word " * 80) if i else text}
                await response.write(event([{"index": 0, "delta": delta, "finish_reason": None, "logprobs": None}]))
                await asyncio.sleep(0.005)
            await response.write(event([{"index": 0, "delta": {}, "finish_reason": "stop", "logprobs": None}]))
            await response.write(event([], usage) + b"data: [DONE]\n\n")
        except ConnectionError:
            pass  # rk cut the stream
        return response

    app = web.Application(client_max_size=64 * 2**20)
    app.router.add_post("/v1/chat/completions", chat)
    return app


# -- the counterfactual: admit while spent < cap -----------------------------------------------------------


class SpentOnlyGate:
    def __init__(self, upstream: str, cap: Decimal) -> None:
        self.upstream, self.cap, self.spent, self.largest = upstream, cap, Decimal(0), Decimal(0)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 2**20)
        app.router.add_post("/v1/chat/completions", self.chat)
        return app

    def charge(self, usage: dict[str, int]) -> None:
        cost = usage["prompt_tokens"] * PRICE_IN + usage["completion_tokens"] * PRICE_OUT
        self.spent += cost
        self.largest = max(self.largest, cost)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        if self.spent >= self.cap:
            error = {"error": {"message": "budget exceeded", "type": "budget", "code": "budget_exceeded"}}
            return web.json_response(error, status=402)
        body = await request.read()
        async with ClientSession() as session:
            headers = {"Content-Type": "application/json"}
            async with session.post(self.upstream + "/chat/completions", data=body, headers=headers) as up:
                if up.content_type != "text/event-stream":
                    answer = await up.json()
                    self.charge(answer["usage"])
                    return web.json_response(answer)
                response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
                await response.prepare(request)
                async for line in up.content:
                    if line.startswith(b"data: {") and b'"choices": []' in line:
                        self.charge(json.loads(line[6:])["usage"])
                    await response.write(line)
                return response


# -- the agents (the child) ---------------------------------------------------------------------------------


async def agents(seed: int, count: int) -> None:
    import openai

    client = openai.AsyncOpenAI(max_retries=0, timeout=120)

    async def agent(n: int) -> None:
        rng = random.Random(seed * 1_000 + n)
        messages: list[dict[str, str]] = [{"role": "user", "content": f"Agent {n}: plan task {rng.random()}."}]
        for _ in range(200):
            kwargs: dict[str, Any] = {"model": "gpt-4o", "messages": messages}
            if rng.random() < 0.5:
                kwargs["max_tokens"] = rng.randint(256, 4_096)
            try:
                if rng.random() < 0.5:
                    stream = await client.chat.completions.create(
                        **kwargs, stream=True, stream_options={"include_usage": True}
                    )
                    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
                else:
                    text = (await client.chat.completions.create(**kwargs)).choices[0].message.content or ""
            except openai.APIError:
                return  # refused (402), or cut: this agent is done
            messages += [{"role": "assistant", "content": text[:400]}, {"role": "user", "content": "Go on."}]

    await asyncio.gather(*(agent(n) for n in range(count)))
    await client.close()


# -- one play -----------------------------------------------------------------------------------------------


def child_command(seed: int, count: int) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--agents-of", str(seed), "--agents", str(count)]


async def play(seed: int, count: int, cap: Decimal, mode: str, home: str) -> tuple[Decimal, Decimal]:
    """(final spend, largest single call) of one seed played in one mode."""
    runner = web.AppRunner(upstream_app(seed), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    upstream = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/v1"  # type: ignore[union-attr]
    env = {**os.environ, "OPENAI_API_KEY": "sk-bench", "RK_HOME": home}
    try:
        if mode == "spent-only":
            gate = SpentOnlyGate(upstream, cap)
            gate_runner = web.AppRunner(gate.app(), access_log=None)
            await gate_runner.setup()
            gate_site = web.TCPSite(gate_runner, "127.0.0.1", 0)
            await gate_site.start()
            port = gate_site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            env["OPENAI_BASE_URL"] = f"http://127.0.0.1:{port}/v1"
            child = await asyncio.create_subprocess_exec(*child_command(seed, count), env=env)
            await child.wait()
            await gate_runner.cleanup()
            return gate.spent, gate.largest
        with tempfile.NamedTemporaryFile(suffix=".json") as summary:
            flags = ["--strict"] if mode == "strict" else []
            argv = ["rk", "run", "--quiet", "--max-cost", str(cap), *flags, "--json", summary.name]
            argv += ["--openai-upstream", upstream, "--", *child_command(seed, count)]
            child = await asyncio.create_subprocess_exec(*argv, env=env)
            await child.wait()
            data = json.loads(Path(summary.name).read_text())
        costs = [Decimal(call["cost_usd"]) for call in data["calls"]]
        return Decimal(data["totals"]["cost_usd"]), max(costs, default=Decimal(0))
    finally:
        await runner.cleanup()


async def main(seeds: int, count: int, cap: Decimal, as_json: bool) -> int:
    rows = []
    with tempfile.TemporaryDirectory() as home:
        for seed in range(1, seeds + 1):
            started = time.monotonic()
            row: dict[str, Any] = {"seed": seed}
            for mode in ("default", "strict", "spent-only"):
                spent, largest = await play(seed, count, cap, mode, home)
                row[mode] = float(spent / cap)
                row[f"{mode}_largest"] = float(largest / cap)
            rows.append(row)
            if not as_json:
                print(
                    f"seed {seed:2}: default {row['default']:.3f} (bound {1 + row['default_largest']:.3f})"
                    f"  strict {row['strict']:.3f}  spent-only {row['spent-only']:.3f}"
                    f"  [{time.monotonic() - started:.1f}s]",
                    flush=True,
                )
    strict_ok = all(r["strict"] <= 1.0 for r in rows)
    default_ok = all(r["default"] <= 1 + r["default_largest"] for r in rows)
    summary = {
        "cap_usd": str(cap),
        "agents": count,
        "seeds": rows,
        "max": {mode: max(r[mode] for r in rows) for mode in ("default", "strict", "spent-only")},
        "strict_holds": strict_ok,
        "default_within_one_call": default_ok,
    }
    if as_json:
        print(json.dumps(summary, indent=2))
    else:
        m = summary["max"]
        print(
            f"\nworst of {seeds} seeds, spend / cap: default {m['default']:.3f} · strict {m['strict']:.3f}"
            f" · spent-only {m['spent-only']:.3f}\n"
            f"strict <= 1.000 on every seed: {'yes' if strict_ok else 'NO'} · default <= 1 + largest call / cap on"
            f" every seed: {'yes' if default_ok else 'NO'}"
        )
    return 0 if strict_ok and default_ok else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--agents", type=int, default=64)
    parser.add_argument("--cap", type=Decimal, default=Decimal("1.00"))
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--agents-of", type=int, help=argparse.SUPPRESS)  # run as the agents' process
    args = parser.parse_args()
    if args.agents_of is not None:
        asyncio.run(agents(args.agents_of, args.agents))
        sys.exit(0)
    sys.exit(asyncio.run(main(args.seeds, args.agents, args.cap, args.json)))
