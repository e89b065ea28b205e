"""The `rk` command line. Only this package touches typer and rich; heavy imports wait for the command
that needs them, so `rk --help` and `rk ledger list` start fast.

Errors are mapped to exit statuses here, in one place: a usage error is 2 (125 under `rk run`, so that
rk's own failures are never mistaken for the child's statuses), an `RkError` is 125, and neither prints a
traceback. `rk run` hands the child's status back as `Finished`, which is never remapped.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from riskkernel import __version__
from riskkernel.cli import config, kill, ledger, prices, run, serve
from riskkernel.errors import ExitCode, RkError

app = typer.Typer(
    name="rk",
    help="riskkernel: hard spend caps for AI agent processes, with an honest ledger.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.command(
    "run",
    help=run.HELP,
    context_settings={"allow_interspersed_args": False},
    no_args_is_help=True,
)(run.run)
app.command("serve", help=serve.HELP)(serve.serve)
app.add_typer(ledger.app, name="ledger")
app.command("kill", help=kill.HELP)(kill.kill)
app.command("prices", help=prices.HELP)(prices.prices)
app.add_typer(config.app, name="config")


def _version(value: bool) -> None:
    if value:
        print(f"rk {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    ctx: typer.Context,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    from riskkernel import paths
    from riskkernel.config import load_file

    # Only the commands that take its settings read the config file: a broken one never stops `rk ledger` or
    # `rk kill`, and `rk config` reads it itself, so that `rk config init --force` can replace a broken one.
    if ctx.invoked_subcommand in ("run", "serve", "prices"):
        file = paths.config_file()
        if file is not None:
            ctx.default_map = load_file(file)


class Finished(Exception):
    """`rk run` is over; `status` is the run's exit status, which must not be remapped as rk's own."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


def _invoked(argv: list[str]) -> str | None:
    return next((arg for arg in argv[1:] if not arg.startswith("-")), None)


def main() -> None:
    try:
        app()
    except Finished as done:
        sys.exit(done.status)
    except RkError as exc:
        from riskkernel.cli.output import error

        error(str(exc))
        sys.exit(ExitCode.RK_FAILED)
    except SystemExit as exc:
        if exc.code == ExitCode.USAGE and _invoked(sys.argv) == "run":
            sys.exit(ExitCode.RK_FAILED)
        raise
