"""`rk ledger`: inspect past runs. Rich tables on a terminal, plain tab-separated text when piped, `--json`
for scripts. A run's calls are streamed from the database, so a run of any size starts printing at once."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer

if TYPE_CHECKING:
    import sqlite3

    from riskkernel.ledger.store import RunFilter
    from riskkernel.models import RunRecord

app = typer.Typer(help="Inspect past runs in the ledger.", no_args_is_help=False)

JSON = typer.Option("--json", help="Print JSON (the shapes of `rk run --json`).")
SINCE = typer.Option(
    help="Only since then: a duration back from now (30m, 12h, 7d, 2w) or a UTC date or time (2026-11-01)."
)
STATUS = typer.Option(help="Only runs in this status: running, completed, halted, interrupted (repeatable).")
TAG = typer.Option(metavar="KEY=VALUE", help="Only runs with this tag (repeatable: all must match).")


@app.callback(invoke_without_command=True)
def ledger(ctx: typer.Context) -> None:
    """Inspect past runs in the ledger. Bare `rk ledger` lists recent runs."""
    if ctx.invoked_subcommand is None:
        list_runs()


@app.command("list")
def list_runs(
    limit: Annotated[int, typer.Option(min=1, help="How many runs, newest first.")] = 20,
    since: Annotated[str | None, SINCE] = None,
    status: Annotated[list[str] | None, STATUS] = None,
    tag: Annotated[list[str] | None, TAG] = None,
    as_json: Annotated[bool, JSON] = False,
) -> None:
    """Recent runs, newest first."""
    from riskkernel.cli import output
    from riskkernel.ledger import store
    from riskkernel.models import dumps, usd

    which = _filter(since, status, tag)
    db = _reader()
    runs = store.list_runs(db, limit, which) if db is not None else []
    if as_json:
        print(dumps([run.to_json() for run in runs]))
        return
    console = output.stdout()
    if not console.is_terminal:
        for run in runs:
            fields = (
                run.run_id,
                run.started_at,
                run.status,
                run.halt_reason or "-",
                run.totals.calls,
                usd(run.totals.cost),  # exact, for sort and awk
                run.name or " ".join(run.command),
            )
            print("\t".join(map(str, fields)))
        return
    if not runs:
        filtered = since or status or tag
        console.print("No runs match." if filtered else "No runs yet. Start one with: rk run -- python agent.py")
        return
    from rich.table import Table

    table = Table(box=None, pad_edge=False)
    for column in ("run", "started", "status", "calls", "cost", "command"):
        table.add_column(column, justify="right" if column in ("calls", "cost") else "left")
    for run in runs:
        state = f"{run.status}: {run.halt_reason}" if run.halt_reason else str(run.status)
        table.add_row(
            run.run_id[:12],
            run.started_at[:19].replace("T", " "),
            state,
            str(run.totals.calls),
            output.money(run.totals.cost),
            run.name or " ".join(run.command),
        )
    console.print(table)


@app.command("show")
def show(
    run_id: Annotated[str, typer.Argument(help="A run id, or an unambiguous prefix of one.")],
    as_json: Annotated[bool, JSON] = False,
) -> None:
    """One run: budget, totals, and every call (streamed, however many)."""
    import sys

    from riskkernel.cli import output
    from riskkernel.ledger import store

    db, run = _open_run(run_id)
    if as_json:
        from riskkernel.ledger.export import write_run

        write_run(sys.stdout, db, run)
        print()
        return
    console = output.stdout()
    lines, held = store.model_breakdown(db, run.run_id)
    console.print(output.cost_table(run, lines, held, width=console.width))
    console.print(f"command: {' '.join(run.command)}   cwd: {run.cwd}   started: {run.started_at}")
    console.file.flush()
    output.write_calls(sys.stdout, store.iter_calls(db, run.run_id), aligned=console.is_terminal)


@app.command("export")
def export(
    run_ids: Annotated[
        list[str] | None, typer.Argument(metavar="[RUN_ID]...", help="Runs to export (ids or prefixes); default all.")
    ] = None,
    fmt: Annotated[
        str, typer.Option("--format", "-f", help="json (runs with their calls), jsonl or csv (a row per call).")
    ] = "json",
    out: Annotated[
        Path | None, typer.Option("--output", "-o", metavar="FILE", help="Write to FILE instead of stdout.")
    ] = None,
    since: Annotated[str | None, SINCE] = None,
    status: Annotated[list[str] | None, STATUS] = None,
    tag: Annotated[list[str] | None, TAG] = None,
) -> None:
    """Write runs and their calls out as JSON, JSON Lines or CSV, oldest run first."""
    import sys

    from riskkernel.ledger import export as exporter
    from riskkernel.ledger import store

    if fmt not in exporter.FORMATS:
        raise typer.BadParameter(f"{fmt!r}: use one of {', '.join(exporter.FORMATS)}", param_hint="--format")
    if run_ids and (since or status or tag):
        raise typer.BadParameter("name runs, or select them with --since/--status/--tag, not both")
    which = _filter(since, status, tag)
    db = _reader()
    if db is None:
        runs = []
    elif run_ids:
        runs = [_find(db, run_id) for run_id in run_ids]
    else:
        runs = store.iter_runs(db, which)  # type: ignore[assignment]
    if out is None:
        exporter.write(sys.stdout, db, runs, fmt)  # type: ignore[arg-type]
        return
    try:
        with out.open("w", newline="", encoding="utf-8") as f:
            calls = exporter.write(f, db, runs, fmt)  # type: ignore[arg-type]
    except OSError as exc:
        _fail(f"cannot write {out}: {exc.strerror or exc}")
    print(f"rk: exported {calls:,} call{'s' if calls != 1 else ''} to {out}", file=sys.stderr)


@app.command("summary")
def summary(
    by: Annotated[str, typer.Option(help="model, day (UTC) or tag:KEY (the value of a run's tag KEY).")] = "model",
    since: Annotated[str | None, SINCE] = None,
    as_json: Annotated[bool, JSON] = False,
) -> None:
    """Spend rolled up by model, by day or by a tag, biggest first (days in order)."""
    from riskkernel.cli import output
    from riskkernel.ledger import store
    from riskkernel.models import Totals, Usage, dumps, usd

    if not (by in ("model", "day") or (by.startswith("tag:") and len(by) > 4)):
        raise typer.BadParameter(f"{by!r}: use model, day or tag:KEY", param_hint="--by")
    cutoff = parse_since(since) if since else None
    db = _reader()
    lines = store.summary(db, by, cutoff) if db is not None else []
    total = Totals(
        calls=sum(line.calls for line in lines),
        usage=sum((line.usage for line in lines), Usage()),
        cost=sum((line.cost for line in lines), store.from_pusd(0)),  # Decimal: exact
    )
    if as_json:
        rows = [line.to_json(by) for line in lines]
        print(dumps({"by": by, "since": cutoff, "rows": rows, "totals": total.to_json()}))
        return
    total_usage = total.usage
    console = output.stdout()
    if not console.is_terminal:
        for line in lines:
            u = line.usage
            fields = (line.key, line.runs, line.calls, u.input_tokens, u.cached_input_tokens, u.output_tokens)
            print("\t".join(map(str, (*fields, usd(line.cost)))))  # exact, for sort and awk
        return
    if not lines:
        console.print("No spend recorded" + (f" since {cutoff}." if cutoff else "."))
        return
    from rich.table import Table

    table = Table(box=None, pad_edge=False, show_footer=True)
    table.add_column(by.removeprefix("tag:"), footer="total")
    for column, footer in (
        ("runs", ""),
        ("calls", output.count(total.calls)),
        ("input", output.count(total_usage.input_tokens)),
        ("cached", output.count(total_usage.cached_input_tokens)),
        ("output", output.count(total_usage.output_tokens)),
        ("cost", output.money(total.cost)),
    ):
        table.add_column(column, justify="right", footer=footer)
    for line in lines:
        u = line.usage
        table.add_row(
            line.key,
            output.count(line.runs),
            output.count(line.calls),
            output.count(u.input_tokens),
            output.count(u.cached_input_tokens),
            output.count(u.output_tokens),
            output.money(line.cost),
        )
    console.print(table)


@app.command("path")
def path() -> None:
    """Where the ledger lives (RK_HOME overrides the data directory)."""
    from riskkernel import paths

    print(paths.ledger_path())


_AGO = re.compile(r"(\d+)\s*(m|h|d|w)")


def parse_since(text: str) -> str:
    """A duration back from now (`30m`, `12h`, `7d`, `2w`) or a UTC date or time, as the ledger's timestamps."""
    from datetime import UTC, datetime, timedelta

    from riskkernel.models import iso

    value = text.strip().lower()
    match = _AGO.fullmatch(value)
    if match:
        n, unit = int(match.group(1)), match.group(2)
        when = datetime.now(UTC) - timedelta(**{{"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}[unit]: n})
    else:
        try:
            when = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
        except ValueError:
            raise typer.BadParameter(
                f"{text!r}: expected a duration like 30m, 12h, 7d, 2w, or a date like 2026-11-01", param_hint="--since"
            ) from None
        when = when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)
    return iso(when.timestamp())


def _filter(since: str | None, status: list[str] | None, tag: list[str] | None) -> RunFilter:
    from riskkernel.config import parse_tags
    from riskkernel.ledger.store import RunFilter
    from riskkernel.models import RunStatus

    statuses = []
    for value in status or ():
        try:
            statuses.append(RunStatus(value.strip().lower()))
        except ValueError:
            known = ", ".join(s.value for s in RunStatus)
            raise typer.BadParameter(f"{value!r}: use one of {known}", param_hint="--status") from None
    from riskkernel.errors import ConfigError

    try:
        tags = tuple(parse_tags(tag or []).items())
    except ConfigError as exc:
        raise typer.BadParameter(str(exc), param_hint="--tag") from None
    return RunFilter(since=parse_since(since) if since else None, statuses=tuple(statuses), tags=tags)


def _reader() -> sqlite3.Connection | None:
    from riskkernel import paths
    from riskkernel.ledger import store

    return store.open_reader(paths.ledger_path())


def _open_run(run_id: str) -> tuple[sqlite3.Connection, RunRecord]:
    db = _reader()
    if db is None:
        _fail(f"no run with id {run_id!r} (the ledger is empty)")
    return db, _find(db, run_id)


def _find(db: sqlite3.Connection, run_id: str) -> RunRecord:
    from riskkernel.ledger import store

    if not run_id.strip():
        _fail("give a run id, or a prefix of one")
    try:
        return store.find_run(db, run_id)
    except LookupError as exc:
        _fail(str(exc))


def _fail(message: str) -> NoReturn:
    from riskkernel.cli import output

    output.error(message)
    raise typer.Exit(1)
