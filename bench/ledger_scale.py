"""The ledger at scale: `rk ledger` commands on a million calls, and how fast the proxy can record calls.

    python bench/ledger_scale.py [generate|cli|queries|record|all] [--home DIR] [--regenerate] [--json]

generate  builds `$RK_HOME/ledger.db` (RK_HOME is `--home`, by default a fixed directory under the system
          temp dir, so later steps reuse it): `--calls` calls across `--runs` runs, one of which holds
          `--big-run` calls, written through rk's own schema (`migrate`) and write statements (`insert_run`,
          `insert_call`, `finish_run`, `mark_interrupted`), in time order, from a fixed seed. Reused when it
          exists with the same parameters; `--regenerate` builds it again.
cli       times real `rk` subprocesses (wall clock, one warm-up then `--repeat` runs: best and median), with
          the ledger's pages in the OS cache. `rk ledger show` of the big run is read as it prints: time to
          its first byte, to its first screenful (50 lines) and to its end, and the child's peak RSS.
          Commands rk does not have yet are reported as failed with the first line of their error.
queries   the SQL under those commands, in this process, best of 3: the store's read functions as the
          commands call them, with the `EXPLAIN QUERY PLAN` of each statement they run (traced), then
          hand-written SQL for the same questions, alternatives included, with their plans.
record    the proxy's recording path: `Ledger.commit(insert_call(...))` awaited per call from concurrent
          tasks on an event loop, as rk's proxy does before it ends a response; also one task alone, and
          `Ledger.submit` of every call at once. Each into a new ledger.

`all` runs every step. Targets are the issue's; the median is what meets or misses one. The issue states
the `list` and `summary --by model` targets for the plain commands; they are applied to their variants too
(marked *). Results print as Markdown, or as JSON with `--json`; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import concurrent.futures
import contextlib
import dataclasses
import functools
import heapq
import itertools
import json
import os
import random
import select
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

from riskkernel.ledger import store
from riskkernel.ledger.migrations import migrate
from riskkernel.models import Budget, CallRecord, Flag, HaltReason, Refusal, RunRecord, RunStatus, Usage, now_iso

DAY = 86400.0
LIST_MS, SUMMARY_MS, SHOW_FIRST_MS, RECORD_PER_S = 300.0, 1000.0, 500.0, 5000.0
META = "bench-ledger-scale.json"  # beside the ledger: what generated it, so a later step can reuse it
SCREENFUL = 50  # lines
# The ledger is being extended alongside this script: fill in what a CallRecord has, and no more.
CALL_FIELDS = {f.name for f in dataclasses.fields(CallRecord)}


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def iso(t: float) -> str:
    """A POSIX time as the ledger writes timestamps (`now_iso`)."""
    second = int(t)
    return f"{_iso_second(second)}.{int((t - second) * 1000):03d}Z"


@functools.lru_cache(maxsize=4096)
def _iso_second(second: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))


# -- generate ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Model:
    endpoint: str
    provider: str
    requested: str | None  # None: a free pass-through route, recorded as unmetered
    served: str | None
    weight: float
    rates: tuple[int, int, int, int] | None  # picodollars per token: input, cache read, cache write, output
    streams: bool = True
    reasoning: bool = False


OPENAI = (
    Model("/v1/chat/completions", "openai", "gpt-4o-mini", "gpt-4o-mini-2024-07-18", 30, (150_000, 75_000, 0, 600_000)),
    Model("/v1/chat/completions", "openai", "gpt-4o", "gpt-4o-2024-08-06", 15, (2_500_000, 1_250_000, 0, 10_000_000)),
    Model("/v1/responses", "openai", "gpt-4o", "gpt-4o-2024-08-06", 5, (2_500_000, 1_250_000, 0, 10_000_000)),
    Model("/v1/responses", "openai", "o3", "o3-2025-04-16", 6, (2_000_000, 500_000, 0, 8_000_000), reasoning=True),
    Model("/v1/embeddings", "openai", "text-embedding-3-small", "text-embedding-3-small", 10, (20_000, 0, 0, 0), False),
    Model(
        "/v1/completions", "openai", "gpt-3.5-turbo-instruct", "gpt-3.5-turbo-instruct", 1, (1_500_000, 0, 0, 2_000_000)
    ),
    Model("/v1/chat/completions", "openai", "ft:gpt-4o-mini:acme::b3nch", "ft:gpt-4o-mini:acme::b3nch", 0.5, None),
    Model("/v1/models", "openai", None, None, 0.5, None, streams=False),
)
ANTHROPIC = (
    Model(
        "/v1/messages",
        "anthropic",
        "claude-sonnet-4-5",
        "claude-sonnet-4-5-20250929",
        20,
        (3_000_000, 300_000, 3_750_000, 15_000_000),
    ),
    Model(
        "/v1/messages",
        "anthropic",
        "claude-haiku-4-5",
        "claude-haiku-4-5-20251001",
        8,
        (1_000_000, 100_000, 1_250_000, 5_000_000),
    ),
    Model("/v1/messages/count_tokens", "anthropic", None, None, 0.5, None, streams=False),
)
PROFILES = {"openai": OPENAI, "anthropic": ANTHROPIC, "mixed": OPENAI + ANTHROPIC}
CUM_WEIGHTS = {name: list(itertools.accumulate(m.weight for m in models)) for name, models in PROFILES.items()}
BUDGETS = (
    Budget(),
    Budget(max_cost=Decimal("0.50")),
    Budget(max_cost=Decimal("20.00"), max_calls=500),
    Budget(max_cost=None, max_tokens=2_000_000),
)
COMMANDS = (
    ("python", "agent.py"),
    ("python", "-m", "evals.run", "--suite", "smoke"),
    ("./agent.sh",),
    ("node", "bot.js"),
)
NAMES = (None, None, None, None, None, None, "nightly-eval", "pr-check", "research-agent", "triage-bot")
UNMETERED, REFUSED = (Flag.UNMETERED,), (Flag.REFUSED,)
HALTS = (HaltReason.COST,) * 6 + tuple(HaltReason)[1:]  # mostly the cost budget


@dataclass(slots=True)
class Plan:
    """One generated run, before and after its calls are written."""

    record: RunRecord
    start: float
    calls: int
    profile: str
    status: RunStatus
    halt: HaltReason | None
    last: float = 0.0  # when its last call ended, once its calls are generated


def plan_runs(rnd: random.Random, n_calls: int, n_runs: int, big: int, anchor: float) -> tuple[list[Plan], int]:
    """Runs started over the 60 days before `anchor - 12 h`, in start order, and the index of the big one.
    The other runs share the remaining calls, log-normally (most runs small, a few thousand-call ones)."""
    starts = sorted(rnd.uniform(anchor - 60 * DAY, anchor - DAY / 2) for _ in range(n_runs))
    big_index = n_runs * 2 // 3  # about 20 days back, so it ends well before the window does
    weights = [rnd.lognormvariate(0, 1.2) for _ in range(n_runs)]
    weights[big_index] = 0.0
    rest, total = n_calls - big, sum(weights)
    sizes = [int(w * rest / total) for w in weights]
    for i in rnd.choices([i for i in range(n_runs) if i != big_index], k=rest - sum(sizes)):
        sizes[i] += 1
    sizes[big_index] = big
    host = socket.gethostname()
    plans = []
    for i, (start, size) in enumerate(zip(starts, sizes, strict=True)):
        r = rnd.random()
        if i == big_index or r < 0.85 or (size < 2 and r < 0.95):
            status, halt = RunStatus.COMPLETED, None
        elif r < 0.95:
            status, halt = RunStatus.HALTED, rnd.choice(HALTS)
        else:
            status, halt = RunStatus.INTERRUPTED, None
        tags = {}
        if rnd.random() < 0.9:
            tags = {"team": rnd.choices("abc", (5, 3, 2))[0], "env": rnd.choices(("ci", "dev"), (3, 1))[0]}
            if rnd.random() < 0.3:
                tags["repo"] = rnd.choice(("search", "billing", "support-bot"))
        record = RunRecord(
            run_id=f"{rnd.getrandbits(64):016x}",
            name=rnd.choice(NAMES),
            command=rnd.choice(COMMANDS),
            cwd=rnd.choice(("/home/ci/work/agent", "/home/dev/src/agent")),
            started_at=iso(start),
            budget=Budget(max_cost=None) if i == big_index else rnd.choice(BUDGETS),
            tags=tags,
            # A pid above Linux's pid_max: no live process, so `mark_interrupted` ends the interrupted ones.
            owner=f"{host}:{rnd.randrange(2**22 + 1, 2**31)}:{rnd.randrange(10**6, 10**9)}",
        )
        profile = "mixed" if i == big_index else rnd.choices(("openai", "anthropic", "mixed"), (4, 3, 3))[0]
        plans.append(Plan(record, start, size, profile, status, halt))
    return plans, big_index


def calls_of(rnd: random.Random, plan: Plan, price_source: str) -> Iterator[CallRecord]:
    """A run's calls in order: mostly answered, some refused (402), upstream errors, estimated usage; a
    halted run ends with a cut call and then refusals."""
    run_id, models, cum = plan.record.run_id, PROFILES[plan.profile], CUM_WEIGHTS[plan.profile]
    halted_from = plan.calls + 1  # the call at which the run halted; rk refuses every call after it
    if plan.halt is not None:
        halted_from = plan.calls - rnd.randint(1, max(1, min(5, plan.calls // 2))) + 1
    cuts = plan.halt in (HaltReason.COST, HaltReason.TOKENS, HaltReason.TIME, HaltReason.KILLED)
    t = plan.start + rnd.uniform(0.2, 3.0)
    for seq in range(1, plan.calls + 1):
        m = models[bisect.bisect(cum, rnd.random() * cum[-1])]
        stream = m.streams and rnd.random() < 0.6
        r = rnd.random()
        if m.requested is None:
            latency = round(rnd.uniform(40, 250), 1)
            call = CallRecord(
                run_id, seq, iso(t), m.endpoint, m.provider, None, None, False, 200, flags=UNMETERED, latency_ms=latency
            )
        elif seq > halted_from or (seq < halted_from and 0.023 < r < 0.026):
            call = CallRecord(
                *(run_id, seq, iso(t), m.endpoint, m.provider, m.requested, m.requested, stream, 402),
                flags=REFUSED,
                latency_ms=round(rnd.uniform(0.2, 1.5), 1),
                error=str(plan.halt) if seq > halted_from else Refusal.INSUFFICIENT_BUDGET.value,
            )
        else:
            cut = plan.halt if cuts and seq == halted_from else None
            call = answered(rnd, (run_id, seq, iso(t)), m, stream, r, cut, price_source)
        yield call
        t += call.latency_ms / 1000 + rnd.expovariate(1 / 1.5)
    plan.last = t


def answered(
    rnd: random.Random,
    call: tuple[str, int, str],
    m: Model,
    stream: bool,
    r: float,
    cut: HaltReason | None,
    source: str,
) -> CallRecord:
    """A call that reached the upstream: usage, cost, timings, and the odd error or estimate."""
    if m.endpoint == "/v1/embeddings":
        usage = Usage(int(rnd.lognormvariate(5.5, 1.0)) + 1)
    else:
        inp = int(rnd.lognormvariate(7.3, 1.0)) + 20
        out = int(rnd.lognormvariate(5.3, 1.0)) + 1
        reasoning = int(rnd.lognormvariate(6.5, 1.0)) if m.reasoning else 0
        cached = int(inp * rnd.uniform(0.3, 0.9)) if rnd.random() < 0.35 else 0
        written = int((inp - cached) * rnd.uniform(0.2, 0.8)) if m.provider == "anthropic" and rnd.random() < 0.1 else 0
        usage = Usage(
            input_tokens=inp,
            cached_input_tokens=cached,
            cache_write_tokens=written,
            output_tokens=out + reasoning,
            reasoning_tokens=reasoning,
        )
    flags: tuple[str, ...] = ()
    status, error = 200, None
    if cut is not None:
        flags, error = (Flag.ESTIMATED, Flag.CUT), f"cut: {cut}"
    elif r < 0.008:
        status, usage, error = 429, Usage(), "upstream: Rate limit reached for requests"
    elif r < 0.011:
        status, usage, error = 500, Usage(), "upstream: The server had an error while processing your request"
    elif r < 0.013:
        status, flags, error = 499, (Flag.ESTIMATED,), "client disconnected"
    elif r < 0.023:
        flags = (Flag.ESTIMATED,)
    cost, price_source, extra = Decimal(0), None, {}
    if m.rates is None:
        flags = (*flags[:1], Flag.UNPRICED, *flags[1:]) if flags else (Flag.UNPRICED,)
    else:
        rate_in, rate_read, rate_write, rate_out = m.rates
        fresh = usage.input_tokens - usage.cached_input_tokens - usage.cache_write_tokens
        pusd = (
            fresh * rate_in
            + usage.cached_input_tokens * rate_read
            + usage.cache_write_tokens * rate_write
            + usage.output_tokens * rate_out
        )
        cost, price_source = store.from_pusd(pusd), f"{source}: {m.provider}/{m.served}"
        if "cache_savings" in CALL_FIELDS:
            extra["cache_savings"] = store.from_pusd(usage.cached_input_tokens * (rate_in - rate_read))
    latency = 250 + usage.output_tokens * rnd.uniform(5, 25) + rnd.expovariate(1 / 300)
    ttfb = rnd.uniform(150, 900) if stream else latency * rnd.uniform(0.9, 0.99)
    return CallRecord(
        *call,
        *(m.endpoint, m.provider, m.requested, m.served, stream, status),
        usage=usage,
        cost=cost,
        price_source=price_source,
        flags=flags,
        latency_ms=round(latency, 1),
        ttfb_ms=round(min(ttfb, latency), 1),
        error=error,
        **extra,
    )


def apply(db: sqlite3.Connection, writes: Iterable[store.Write]) -> int:
    """Run writes in one transaction, as the ledger's writer does: consecutive runs of one statement go to
    SQLite as one `executemany`. Returns how many writes ran."""
    n, sql, batch = 0, "", []
    db.execute("BEGIN IMMEDIATE")
    try:
        for write in writes:
            n += 1
            for statement, params in write:
                if statement != sql:
                    if batch:
                        db.executemany(sql, batch)
                    sql, batch = statement, []
                batch.append(params)
        if batch:
            db.executemany(sql, batch)
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
    return n


def price_source_prefix() -> str:
    from importlib.metadata import PackageNotFoundError, version

    with contextlib.suppress(PackageNotFoundError):
        return f"genai-prices {version('genai-prices')}"
    return "genai-prices"


def generate(args: argparse.Namespace) -> dict[str, Any]:
    home: Path = args.home
    path, meta_path = home / "ledger.db", home / META
    params = {"calls": args.calls, "runs": args.runs, "big_run_calls": args.big_run, "seed": args.seed, "v": 1}
    if path.exists():
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else None
        if meta is None and not args.regenerate:
            raise SystemExit(f"{path} exists and was not generated by this script: pass --regenerate to replace it")
        if meta is not None and meta["params"] == params and not args.regenerate:
            say(f"reusing {path} (generated {meta['generated_at']}; --regenerate to build it again)")
            age = (time.time() - time.mktime(time.strptime(meta["runs_to"][:10], "%Y-%m-%d"))) / DAY
            if age > 2:
                say(f"  its newest run is {age:.0f} days old: `--since 7d` finds fewer runs than it did")
            return {**meta, "path": str(path), "bytes": path.stat().st_size, "reused": True}
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
    if not 0 < args.big_run <= args.calls or args.runs < 2:
        raise SystemExit("need --runs ≥ 2 and 0 < --big-run ≤ --calls")
    say(f"generating {args.calls:,} calls across {args.runs:,} runs in {path} ...")
    began = time.perf_counter()
    rnd = random.Random(args.seed)
    anchor = time.time() // DAY * DAY  # midnight UTC today: `--since 7d` finds a week of runs
    plans, big_index = plan_runs(rnd, args.calls, args.runs, args.big_run, anchor)
    source = price_source_prefix()
    db = store.connect(path)
    try:
        migrate(db)
        apply(db, (store.insert_run(plan.record) for plan in plans))
        # Each run's calls come from its own seeded stream, merged in time order as rk would record them.
        streams = [calls_of(random.Random(rnd.getrandbits(64)), plan, source) for plan in plans]
        merged = (store.insert_call(call) for call in heapq.merge(*streams, key=lambda call: call.started_at))
        written = 0
        while chunk := apply(db, itertools.islice(merged, 100_000)):
            written += chunk
            say(f"  {written:,} calls, {time.perf_counter() - began:.1f} s")
        finished = [plan for plan in plans if plan.status is not RunStatus.INTERRUPTED]
        apply(
            db,
            itertools.chain.from_iterable(
                (
                    store.finish_run(
                        plan.record.run_id,
                        plan.status,
                        None if plan.halt is None else str(plan.halt),
                        (3 if plan.status is RunStatus.HALTED else rnd.choices((0, 1), (9, 1))[0]),
                    ),
                    # finish_run stamps the time it runs; the run ended when its last call did
                    (("UPDATE runs SET ended_at = ? WHERE id = ?", (iso(plan.last + 0.5), plan.record.run_id)),),
                )
                for plan in finished
            ),
        )
        store.mark_interrupted(db)  # the rest are `running` with a dead owner: rk's reader ends them
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        calls, runs, runs_from, runs_to = db.execute(
            "SELECT (SELECT count(*) FROM calls), count(*), min(started_at), max(started_at) FROM runs"
        ).fetchone()
    finally:
        db.close()
    seconds = time.perf_counter() - began
    meta = {
        "params": params,
        "generated_at": now_iso(),
        "big_run_id": plans[big_index].record.run_id,
        "seconds": round(seconds, 1),
        "calls": calls,
        "runs": runs,
        "runs_from": runs_from,
        "runs_to": runs_to,
    }
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    say(f"generated in {seconds:.1f} s: {path.stat().st_size / 2**20:.0f} MiB")
    return {**meta, "path": str(path), "bytes": path.stat().st_size, "reused": False}


# -- cli --------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class Sample:
    total_ms: float
    first_byte_ms: float | None
    screenful_ms: float | None
    out_bytes: int
    lines: int
    peak_rss_kib: int | None


class Failed(Exception):
    pass


def run_once(argv: list[str], env: dict[str, str], cwd: Path, timeout: float) -> Sample:
    """Run a command, reading its stdout as it comes; stderr goes to a file so it can never block it."""
    with tempfile.TemporaryFile() as err:
        began = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, env=env, cwd=cwd)
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        first = screenful = rss = None
        size = lines = 0
        polled = 0.0
        try:
            while True:
                remaining = began + timeout - time.perf_counter()
                if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                    proc.kill()
                    raise Failed(f"timed out after {timeout:g} s")
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    break
                now = time.perf_counter()
                first = now if first is None else first
                size += len(chunk)
                lines += chunk.count(b"\n")
                if screenful is None and lines >= SCREENFUL:
                    screenful = now
                if now - polled > 0.01:
                    rss, polled = peak_rss_kib(proc.pid) or rss, now
            proc.returncode = proc.wait()
            end = time.perf_counter()
        finally:
            proc.stdout.close()
            if proc.returncode is None:
                proc.kill()
                proc.wait()
        if proc.returncode != 0:
            err.seek(0)
            raise Failed(f"exit {proc.returncode}: {first_error_line(err.read().decode(errors='replace'))}")

    def ms(t: float | None) -> float | None:
        return None if t is None else (t - began) * 1000

    return Sample((end - began) * 1000, ms(first), ms(screenful), size, lines, rss)


def peak_rss_kib(pid: int) -> int | None:
    """The process's peak RSS so far. Not `wait4`'s ru_maxrss: that counts the memory of this process,
    which the child was forked from, before it exec'd rk."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next((int(line.split()[1]) for line in f if line.startswith("VmHWM:")), None)
    except OSError:
        return None


def first_error_line(stderr: str) -> str:
    """The message inside typer's error box if there is one, else the first line that says anything."""
    lines = [line.strip(" │╭╮╰╯─") for line in stderr.splitlines()]
    lines = [line for line in lines if line]
    for i, line in enumerate(lines):
        if line.startswith("Error:"):
            return line
        if line == "Error" and i + 1 < len(lines):
            return lines[i + 1]
    return lines[0] if lines else "(no message)"


@dataclass(slots=True)
class Command:
    name: str
    args: list[str]
    target_ms: float | None = None
    extended: bool = False  # the target is the plain command's, applied to this variant
    empty: bool = False  # run against an RK_HOME with no ledger
    stream: bool = False  # report first byte, first screenful and peak RSS too; the target is the first byte's
    samples: list[Sample] = field(default_factory=list)
    error: str | None = None


def rk_executable() -> str:
    beside = Path(sys.executable).with_name("rk")
    found = str(beside) if beside.exists() else shutil.which("rk")
    if found is None:
        raise SystemExit("no `rk` console script: install riskkernel in this Python (pip install -e .)")
    return found


def migrate_ledger(args: argparse.Namespace) -> list[str]:
    """Bring a reused ledger's schema up to date, once and untimed (a migration added since it was
    generated, an index say, would otherwise land in the first timing)."""
    began = time.perf_counter()
    db = store.connect(args.home / "ledger.db")
    try:
        applied = migrate(db)
    finally:
        db.close()
    if applied:
        say(f"applied {', '.join(applied)} to the generated ledger in {time.perf_counter() - began:.1f} s")
    return applied


def cli(args: argparse.Namespace, ledger: dict[str, Any]) -> list[dict[str, Any]]:
    big = ledger["big_run_id"]
    commands = [
        Command("rk ledger list (no ledger)", ["ledger", "list"], LIST_MS, empty=True),
        Command("rk ledger list", ["ledger", "list"], LIST_MS),
        Command("rk ledger list --json", ["ledger", "list", "--json"], LIST_MS, extended=True),
        Command("rk ledger list --status halted", ["ledger", "list", "--status", "halted"], LIST_MS, extended=True),
        Command("rk ledger list --tag team=c", ["ledger", "list", "--tag", "team=c"], LIST_MS, extended=True),
        Command("rk ledger list --since 7d", ["ledger", "list", "--since", "7d"], LIST_MS, extended=True),
        Command("rk ledger summary --by model", ["ledger", "summary", "--by", "model"], SUMMARY_MS),
        Command("rk ledger summary --by day", ["ledger", "summary", "--by", "day"], SUMMARY_MS, extended=True),
        Command(
            "rk ledger summary --by tag:team", ["ledger", "summary", "--by", "tag:team"], SUMMARY_MS, extended=True
        ),
        Command(
            "rk ledger summary --by model --since 7d",
            ["ledger", "summary", "--by", "model", "--since", "7d"],
            SUMMARY_MS,
            extended=True,
        ),
        Command("rk ledger show BIG", ["ledger", "show", big], SHOW_FIRST_MS, stream=True),
        Command("rk ledger show BIG --json", ["ledger", "show", big, "--json"], SHOW_FIRST_MS, True, stream=True),
    ]
    rk = rk_executable()
    with tempfile.TemporaryDirectory(prefix="rk-bench-empty-") as empty:
        for command in commands:
            home = Path(empty) if command.empty else args.home
            env = {**os.environ, "RK_HOME": str(home)}
            say(f"timing {command.name} ...")
            try:
                for i in range(args.repeat + 1):  # the first is a warm-up
                    sample = run_once([rk, *command.args], env, home, args.timeout)
                    if i:
                        command.samples.append(sample)
            except Failed as exc:
                command.error = str(exc)
                say(f"  failed: {exc}")
    return [cli_result(command) for command in commands]


def cli_result(command: Command) -> dict[str, Any]:
    result: dict[str, Any] = {
        "name": command.name,
        "argv": ["rk", *command.args],
        "target_ms": command.target_ms,
        "target_of": "first_byte_ms" if command.stream else "total_ms",
        "target_extended": command.extended,
        "error": command.error,
    }
    if command.error is not None:
        return result

    def stats(values: list[float | None]) -> dict[str, float] | None:
        known = [v for v in values if v is not None]
        if len(known) < len(values):
            return None
        return {"best": round(min(known), 1), "median": round(statistics.median(known), 1)}

    samples = command.samples
    result["total_ms"] = stats([s.total_ms for s in samples])
    rss = [s.peak_rss_kib for s in samples if s.peak_rss_kib is not None]
    result["peak_rss_mib"] = round(max(rss) / 1024, 1) if rss else None
    if command.stream:
        result["first_byte_ms"] = stats([s.first_byte_ms for s in samples])
        result["screenful_ms"] = stats([s.screenful_ms for s in samples])
        result["stdout_bytes"] = samples[-1].out_bytes
        result["stdout_lines"] = samples[-1].lines
    return result


# -- queries ----------------------------------------------------------------------------------------------


def queries(args: argparse.Namespace, ledger: dict[str, Any]) -> list[dict[str, Any]]:
    """The store's read functions as the commands call them, with the plans of the SQL they ran (traced),
    then hand-written SQL for the same questions, alternatives included, each with its plan."""
    since = iso(time.time() - 7 * DAY)
    big = ledger["big_run_id"]
    counted = store._COUNTED
    sums = "count(*), sum(calls.input_tokens), sum(calls.output_tokens), sum(calls.cost_pusd)"
    newest = "ORDER BY started_at DESC, rowid DESC LIMIT 20"

    def runs(**which: Any) -> Callable[[sqlite3.Connection], int]:
        if not which:
            return lambda db: len(store.list_runs(db))
        return lambda db: len(store.list_runs(db, 20, store.RunFilter(**which)))  # type: ignore[attr-defined]

    def summary(by: str, cutoff: str | None = None) -> Callable[[sqlite3.Connection], int]:
        return lambda db: len(store.summary(db, by, cutoff))  # type: ignore[attr-defined]

    functions: list[tuple[str, Callable[[sqlite3.Connection], int]]] = [
        ("store.list_runs()", runs()),
        ("store.list_runs(status=halted)", runs(statuses=(RunStatus.HALTED,))),
        ("store.list_runs(tag team=c)", runs(tags=(("team", "c"),))),
        ("store.list_runs(tag repo=billing)", runs(tags=(("repo", "billing"),))),
        ("store.list_runs(since 7d)", runs(since=since)),
        ("store.list_runs(status=running): none match", runs(statuses=(RunStatus.RUNNING,))),
        ("store.list_runs(tag team=nobody): none match", runs(tags=(("team", "nobody"),))),
        ("store.summary(by model)", summary("model")),
        ("store.summary(by model, since 7d)", summary("model", since)),
        ("store.summary(by day)", summary("day")),
        ("store.summary(by tag:team)", summary("tag:team")),
        (
            "store.find_run + model_breakdown (BIG)",
            lambda db: len(store.model_breakdown(db, store.find_run(db, big).run_id)[0]),
        ),
        ("store.iter_calls(BIG), first 50", lambda db: sum(1 for _ in itertools.islice(store.iter_calls(db, big), 50))),
        ("store.iter_calls(BIG), all", lambda db: sum(1 for _ in store.iter_calls(db, big))),
    ]
    sql: list[tuple[str, str, tuple[Any, ...]]] = [
        ("runs: newest 20", f"SELECT * FROM runs {newest}", ()),
        ("runs: status = halted", f"SELECT * FROM runs WHERE status = ? {newest}", ("halted",)),
        (
            "runs: tag team=c by json_extract",
            f"SELECT * FROM runs WHERE json_extract(tags, '$.team') = ? {newest}",
            ("c",),
        ),
        (
            "runs: tag repo=billing by json_extract",
            f"SELECT * FROM runs WHERE json_extract(tags, '$.repo') = ? {newest}",
            ("billing",),
        ),
        ("runs: since 7d", f"SELECT * FROM runs WHERE started_at >= ? {newest}", (since,)),
        (
            "calls by model",
            f"SELECT coalesce(model, requested_model, '?'), {sums} FROM calls WHERE {counted} GROUP BY 1",
            (),
        ),
        (
            "calls by model, calls.started_at since 7d",
            f"SELECT coalesce(model, requested_model, '?'), {sums} FROM calls"
            f" WHERE calls.started_at >= ? AND {counted} GROUP BY 1",
            (since,),
        ),
        (
            # The same calls, found through the runs that had not ended by then: a call falls inside its run.
            "calls by model since 7d, via runs not ended by then",
            f"SELECT coalesce(model, requested_model, '?'), {sums} FROM runs CROSS JOIN calls ON calls.run_id = runs.id"
            f" WHERE (runs.ended_at IS NULL OR runs.ended_at >= ?) AND calls.started_at >= ? AND {counted} GROUP BY 1",
            (since, since),
        ),
        ("calls by day", f"SELECT substr(started_at, 1, 10), {sums} FROM calls WHERE {counted} GROUP BY 1", ()),
        ("run totals by day", "SELECT substr(started_at, 1, 10), sum(calls), sum(cost_pusd) FROM runs GROUP BY 1", ()),
        (
            "calls by tag team, the tag read once per run",
            "WITH tagged AS MATERIALIZED (SELECT id, json_extract(tags, '$.team') AS team FROM runs)"
            f" SELECT team, {sums} FROM tagged CROSS JOIN calls ON calls.run_id = tagged.id WHERE {counted} GROUP BY 1",
            (),
        ),
        (
            "run totals by tag team (finished runs)",
            "SELECT json_extract(tags, '$.team'), sum(calls), sum(cost_pusd) FROM runs WHERE status != 'running'"
            " GROUP BY 1",
            (),
        ),
        ("calls of BIG, first 50", "SELECT * FROM calls WHERE run_id = ? ORDER BY seq LIMIT 50", (big,)),
        ("calls of BIG, all", "SELECT * FROM calls WHERE run_id = ? ORDER BY seq", (big,)),
    ]
    db = sqlite3.connect(f"file:{args.home / 'ledger.db'}?mode=ro", uri=True)
    results = []
    try:
        for name, fn in functions:
            say(f"query {name} ...")
            try:
                plans = traced_plans(db, fn)
                ms, rows = best_of(3, lambda fn=fn: fn(db))
            except (AttributeError, TypeError, ValueError, sqlite3.Error) as exc:  # not there yet, or changed
                results.append({"name": name, "error": f"{type(exc).__name__}: {exc}"})
                continue
            results.append({"name": name, "ms": ms, "rows": rows, "plan": plans})
        for name, statement, params in sql:
            say(f"query {name} ...")
            plan = "; ".join(row[3] for row in db.execute(f"EXPLAIN QUERY PLAN {statement}", params))
            ms, rows = best_of(3, lambda s=statement, p=params: len(db.execute(s, p).fetchall()))
            results.append({"name": name, "ms": ms, "rows": rows, "plan": [plan], "sql": statement})
    finally:
        db.close()
    return results


def traced_plans(db: sqlite3.Connection, fn: Callable[[sqlite3.Connection], int]) -> list[str]:
    """The query plans of the distinct SELECTs `fn` runs."""
    statements: list[str] = []
    db.set_trace_callback(statements.append)
    try:
        fn(db)
    finally:
        db.set_trace_callback(None)
    plans: list[str] = []
    for statement in statements:
        if statement.lstrip().upper().startswith(("SELECT", "WITH")):
            plan = "; ".join(row[3] for row in db.execute(f"EXPLAIN QUERY PLAN {statement}"))
            if plan not in plans:
                plans.append(plan)
    return plans


def best_of(n: int, fn: Callable[[], int]) -> tuple[float, int]:
    times, rows = [], 0
    for _ in range(n):
        began = time.perf_counter()
        rows = fn()
        times.append((time.perf_counter() - began) * 1000)
    return round(min(times), 1), rows


# -- record -----------------------------------------------------------------------------------------------


def templates(n: int) -> list[CallRecord]:
    """Calls as the proxy records them, for one run, to be stamped with a seq and a time when recorded."""
    rnd = random.Random(7)
    plan = Plan(
        RunRecord("0" * 16, None, ("python", "agent.py"), "/", now_iso(), Budget()),
        time.time(),
        n,
        "mixed",
        RunStatus.COMPLETED,
        None,
    )
    return list(calls_of(rnd, plan, price_source_prefix()))


async def record_concurrently(ledger: store.Ledger, rows: list[CallRecord], tasks: int) -> list[float]:
    """`tasks` tasks each recording one call after another, awaiting each commit as the proxy does before it
    releases a response's last byte. Returns each commit's latency in ms."""
    latencies: list[float] = []
    seqs = iter(range(len(rows)))

    async def worker() -> None:
        for i in seqs:  # shared: each task takes the next call
            row = dataclasses.replace(rows[i], seq=i + 1, started_at=now_iso())
            began = time.perf_counter()
            await ledger.commit(store.insert_call(row))
            latencies.append((time.perf_counter() - began) * 1000)

    await asyncio.gather(*(worker() for _ in range(tasks)))
    return latencies


async def record_submitted(ledger: store.Ledger, rows: list[CallRecord]) -> list[float]:
    futures = [
        ledger.submit(store.insert_call(dataclasses.replace(row, seq=i + 1, started_at=now_iso())))
        for i, row in enumerate(rows)
    ]
    done, _ = await asyncio.to_thread(concurrent.futures.wait, futures)
    for future in done:
        future.result()
    return []


Recorder = Callable[[store.Ledger, list[CallRecord]], Awaitable[list[float]]]


async def timed(ledger: store.Ledger, rows: list[CallRecord], fn: Recorder) -> tuple[float, list[float]]:
    run = RunRecord(rows[0].run_id, None, ("python", "agent.py"), "/", now_iso(), Budget())
    await ledger.commit(store.insert_run(run))
    began = time.perf_counter()
    latencies = await fn(ledger, rows)
    return time.perf_counter() - began, latencies


def record(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = templates(args.record_calls)
    variants: list[tuple[str, int, Recorder]] = [
        (
            f"commit, {args.tasks} tasks",
            args.record_calls,
            lambda ledger, r: record_concurrently(ledger, r, args.tasks),
        ),
        ("commit, 1 task", max(args.record_calls // 5, 1), lambda ledger, r: record_concurrently(ledger, r, 1)),
        ("submit, all at once", args.record_calls, record_submitted),
    ]
    results = []
    for name, n, fn in variants:
        say(f"recording {n:,} calls: {name} ...")
        with tempfile.TemporaryDirectory(prefix="rk-bench-record-") as home:
            path = Path(home) / "ledger.db"
            ledger = store.Ledger.open(path)
            try:
                seconds, latencies = asyncio.run(timed(ledger, rows[:n], fn))
            finally:
                ledger.close()
            db = sqlite3.connect(path)
            written = db.execute("SELECT count(*) FROM calls").fetchone()[0]
            db.close()
        if written != n:
            raise SystemExit(f"{name}: {written:,} of {n:,} calls in the ledger")
        result: dict[str, Any] = {
            "name": name,
            "calls": n,
            "seconds": round(seconds, 3),
            "calls_per_s": round(n / seconds),
        }
        if latencies:
            latencies.sort()
            result["commit_p50_ms"] = round(latencies[len(latencies) // 2], 3)
            result["commit_p99_ms"] = round(latencies[int(len(latencies) * 0.99)], 3)
        results.append(result)
    return results


# -- report -----------------------------------------------------------------------------------------------


def cell(stats: dict[str, float] | None) -> str:
    return "" if stats is None else f"{stats['best']:,.0f} / {stats['median']:,.0f}"


def verdict(measured: float | None, target: float | None, higher_is_better: bool = False) -> str:
    if measured is None or target is None:
        return ""
    met = measured >= target if higher_is_better else measured <= target
    return "met" if met else "**missed**"


def report(results: dict[str, Any]) -> None:
    ledger = results.get("ledger")
    if ledger:
        how = "reused" if ledger["reused"] else "generated"
        print(
            f"## Ledger: {ledger['calls']:,} calls, {ledger['runs']:,} runs, {ledger['bytes'] / 2**20:.0f} MiB\n\n"
            f"{ledger['path']}, {how}; generation took {ledger['seconds']} s"
            f" (seed {ledger['params']['seed']}; runs started {ledger['runs_from'][:10]} to {ledger['runs_to'][:10]};"
            f" big run {ledger['big_run_id']})\n"
        )
    if results.get("cli"):
        print("## rk commands (wall clock, ms: best / median)\n")
        print("| command | target | total | first byte | first screenful | peak RSS | verdict |")
        print("|---|---|---|---|---|---|---|")
        for r in results["cli"]:
            command = r["name"].replace("rk ", "", 1)
            target = ""
            if r["target_ms"] is not None:
                what = "first byte " if r["target_of"] == "first_byte_ms" else ""
                target = f"{what}≤ {r['target_ms']:g} ms" + ("*" if r["target_extended"] else "")
            if r["error"] is not None:
                print(f"| `{command}` | {target} | failed: {r['error']} | | | | |")
                continue
            judged = r[r["target_of"]]
            rss = "" if r["peak_rss_mib"] is None else f"{r['peak_rss_mib']} MiB"
            print(
                f"| `{command}` | {target} | {cell(r['total_ms'])} | {cell(r.get('first_byte_ms'))} "
                f"| {cell(r.get('screenful_ms'))} | {rss} | {verdict(judged and judged['median'], r['target_ms'])} |"
            )
        print(
            f"\n* the issue's target for the plain command, applied to this variant. BIG: the"
            f" {results['ledger']['params']['big_run_calls']:,}-call run. First screenful: {SCREENFUL} lines of"
            " stdout. Peak RSS: the rk process's, sampled while it writes.\n"
        )
    if results.get("queries"):
        print("## SQL under the commands (in this process, warm cache, best of 3)\n")
        print("| query | ms | rows | plan (one per statement, steps separated by ;) |")
        print("|---|---|---|---|")
        for q in results["queries"]:
            if "error" in q:
                print(f"| {q['name']} | unavailable: {q['error']} | | |")
            else:
                print(f"| {q['name']} | {q['ms']:,.1f} | {q['rows']:,} | {' // '.join(q['plan'])} |")
        print()
    if results.get("record"):
        print("## Recording calls (Ledger on its writer thread, new ledger file)\n")
        print("| variant | calls | calls/s | commit p50 / p99 | target | verdict |")
        print("|---|---|---|---|---|---|")
        for r in results["record"]:
            latency = f"{r['commit_p50_ms']} / {r['commit_p99_ms']} ms" if "commit_p50_ms" in r else ""
            print(
                f"| {r['name']} | {r['calls']:,} | {r['calls_per_s']:,} | {latency} | ≥ {RECORD_PER_S:,.0f}/s "
                f"| {verdict(r['calls_per_s'], RECORD_PER_S, higher_is_better=True)} |"
            )
        print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", nargs="?", default="all", choices=("generate", "cli", "queries", "record", "all"))
    parser.add_argument(
        "--home",
        type=Path,
        default=Path(tempfile.gettempdir()) / "rk-bench-ledger-scale",
        help="RK_HOME holding the generated ledger (default: %(default)s)",
    )
    parser.add_argument("--regenerate", action="store_true", help="build the ledger again even if it exists")
    parser.add_argument("--calls", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=10_000)
    parser.add_argument("--big-run", type=int, default=100_000, help="calls in the one big run `show` reads")
    parser.add_argument("--seed", type=int, default=20261127)
    parser.add_argument("--repeat", type=int, default=5, help="timed runs of each rk command, after a warm-up")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds before an rk command is killed")
    parser.add_argument("--record-calls", type=int, default=50_000)
    parser.add_argument("--tasks", type=int, default=64, help="concurrent recording tasks")
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of Markdown")
    args = parser.parse_args()
    args.home = args.home.expanduser().resolve()

    results: dict[str, Any] = {}
    if args.step in ("generate", "cli", "queries", "all"):
        results["ledger"] = generate(args)
    if args.step in ("cli", "queries", "all"):
        results["ledger"]["migrations_applied"] = migrate_ledger(args)
    if args.step in ("cli", "all"):
        results["cli"] = cli(args, results["ledger"])
    if args.step in ("queries", "all"):
        results["queries"] = queries(args, results["ledger"])
    if args.step in ("record", "all"):
        results["record"] = record(args)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        report(results)


if __name__ == "__main__":
    main()
