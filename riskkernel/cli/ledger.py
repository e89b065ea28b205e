"""`rk ledger`: inspect past runs. Rich tables on a terminal, plain tab-separated text when piped."""

from __future__ import annotations

from typing import Annotated

import typer

app = typer.Typer(help="Inspect past runs in the ledger.", no_args_is_help=False)

JSON = typer.Option("--json", help="Print JSON (the shapes of `rk run --json`).")


@app.callback(invoke_without_command=True)
def ledger(ctx: typer.Context) -> None:
    """Inspect past runs in the ledger. Bare `rk ledger` lists recent runs."""
    if ctx.invoked_subcommand is None:
        list_runs()


@app.command("list")
def list_runs(
    limit: Annotated[int, typer.Option(help="How many runs, newest first.")] = 20,
    as_json: Annotated[bool, JSON] = False,
) -> None:
    """Recent runs, newest first."""
    from riskkernel import paths
    from riskkernel.cli import output
    from riskkernel.ledger import store
    from riskkernel.models import dumps

    db = store.open_reader(paths.ledger_path())
    runs = store.list_runs(db, limit) if db is not None else []
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
                output.money(run.totals.cost),
                run.name or " ".join(run.command),
            )
            print("\t".join(map(str, fields)))
        return
    if not runs:
        console.print("No runs yet. Start one with: rk run -- python agent.py")
        return
    from rich.table import Table

    table = Table(box=None, pad_edge=False)
    for column in ("run", "started", "status", "calls", "cost", "command"):
        table.add_column(column, justify="right" if column in ("calls", "cost") else "left")
    for run in runs:
        status = f"{run.status}: {run.halt_reason}" if run.halt_reason else str(run.status)
        table.add_row(
            run.run_id[:12],
            run.started_at[:19].replace("T", " "),
            status,
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
    """One run: budget, totals and every call."""
    from riskkernel import paths
    from riskkernel.cli import output
    from riskkernel.ledger import store
    from riskkernel.models import dumps

    db = store.open_reader(paths.ledger_path())
    try:
        if db is None:
            raise LookupError(f"no run with id {run_id!r} (the ledger is empty)")
        run = store.find_run(db, run_id)
    except LookupError as exc:
        output.error(str(exc))
        raise typer.Exit(1) from None
    if as_json:
        print(dumps(run.to_json(list(store.iter_calls(db, run.run_id)))))
        return
    console = output.stdout()
    lines, refused = store.model_breakdown(db, run.run_id)
    console.print(output.cost_table(run, lines, refused))
    console.print(f"command: {' '.join(run.command)}   cwd: {run.cwd}   started: {run.started_at}")
    from rich.table import Table

    table = Table(box=None, pad_edge=False)
    for column in ("seq", "model", "stream", "status", "input", "cached", "output", "cost", "ms", "flags"):
        table.add_column(column, justify="left" if column in ("model", "flags") else "right")
    for call in store.iter_calls(db, run.run_id):
        u = call.usage
        table.add_row(
            str(call.seq),
            call.model or "?",
            "yes" if call.stream else "",
            str(call.status),
            output.count(u.input_tokens),
            output.count(u.cached_input_tokens),
            output.count(u.output_tokens),
            output.money(call.cost),
            f"{call.latency_ms:.0f}",
            ",".join(call.flags) + (f" {call.error}" if call.error else ""),
        )
    console.print(table)


@app.command("path")
def path() -> None:
    """Where the ledger lives (RK_HOME overrides the data directory)."""
    from riskkernel import paths

    print(paths.ledger_path())
