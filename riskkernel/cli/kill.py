"""`rk kill RUN_ID`: the kill switch, from any terminal. The run's owner is found through the ledger and
told through its `/rk` API (see `riskkernel.control`)."""

from __future__ import annotations

from typing import Annotated

import typer

HELP = """Kill a live run: halt it with `killed`, cut its calls in flight, refuse its later calls with 402.

The run's own rk process does it (an `rk run` elsewhere on this machine, found through the ledger); under
--on-halt terminate it also stops the agent. A run already halted keeps its halt reason, but its calls in
flight are cut all the same.

Exit status: 0 if the run was killed or already halted; 1 if there is no such live run or its owner cannot
be reached.

Example: rk kill 7f3a2c1d
"""


def kill(
    run_id: Annotated[str, typer.Argument(help="A run id, or an unambiguous prefix of one.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the run's live status after the kill.")] = False,
) -> None:
    from riskkernel import control, paths
    from riskkernel.cli import output
    from riskkernel.errors import RkError
    from riskkernel.ledger import store
    from riskkernel.models import RunStatus, dumps

    try:
        db = store.open_reader(paths.ledger_path())
        if db is None:
            raise RkError(f"no run with id {run_id!r} (the ledger is empty)")
        try:
            run = store.find_run(db, run_id)
        except LookupError as exc:
            raise RkError(str(exc)) from None
        finally:
            db.close()
        if run.status is not RunStatus.RUNNING:
            ended = f"{run.status}: {run.halt_reason}" if run.halt_reason else str(run.status)
            raise RkError(f"run {run.run_id[:8]} is not live ({ended})")
        try:
            reply = control.call(control.find(run.owner), "POST", f"/rk/runs/{run.run_id}/kill")
        except RkError as exc:
            raise RkError(f"cannot kill run {run.run_id[:8]}: {exc}") from None
    except RkError as exc:
        output.error(str(exc))
        raise typer.Exit(1) from None
    if as_json:
        print(dumps(reply))
        return
    cut = int(reply.get("cut", 0))
    cuts = f"{cut} call{'s' if cut != 1 else ''} in flight cut"
    if reply.get("killed"):
        output.error(f"killed run {run.run_id[:8]} ({cuts}; spent ${reply['spent']['cost_usd']})")
    else:
        output.error(f"run {run.run_id[:8]} was already halted ({reply.get('was_halted')}); {cuts}")
