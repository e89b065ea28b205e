"""`rk run`: the command line of the process wrapper. The work is in `riskkernel.runner`."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from riskkernel.cli.prices import PANEL as PRICES
from riskkernel.cli.prices import PriceFlags, PricesFile
from riskkernel.config import DEFAULT_CONNECT_TIMEOUT, DEFAULT_MAX_COST, DEFAULT_READ_TIMEOUT, ENV, UNLIMITED
from riskkernel.governor import STRICT_MIN_OUTPUT

if TYPE_CHECKING:
    from riskkernel.config import RunSettings
    from riskkernel.control import Control

HELP = """Run an agent command under a spend cap.

The command's OpenAI and Anthropic SDKs are pointed at a local proxy (through OPENAI_BASE_URL and ANTHROPIC_BASE_URL) that meters and prices every call, refuses calls with HTTP 402 once a budget is spent, and cuts live streams at the cap. The run is kept in the ledger, and a cost table is printed to stderr when the command exits.

Exit status: the command's own; 3 if the run was halted and the command exited 0 (or rk stopped it under --on-halt terminate); 125 if rk itself could not start; 126 or 127 if the command could not be run; 128+N if it died of signal N.

Example: rk run --max-cost 0.50 --max-calls 40 --max-time 10m -- python agent.py
"""


class OnHalt(StrEnum):
    block = "block"
    terminate = "terminate"


BUDGET = "Budget"
UPSTREAM = "Upstream"
OUTPUT = "Output"


# The options `rk serve` shares with `rk run` (declared once: the same flags, variables and config keys).
MaxCost = Annotated[
    str,
    typer.Option(
        envvar=ENV["max_cost"],
        rich_help_panel=BUDGET,
        help="USD for the whole run; 0 = no paid call may be made; 'unlimited' to disable.",
    ),
]
MaxTokens = Annotated[
    str, typer.Option(envvar=ENV["max_tokens"], rich_help_panel=BUDGET, help="Input + output tokens for the run.")
]
MaxCalls = Annotated[
    str, typer.Option(envvar=ENV["max_calls"], rich_help_panel=BUDGET, help="Metered LLM calls for the run.")
]
MaxTime = Annotated[
    str,
    typer.Option(
        envvar=ENV["max_time"],
        rich_help_panel=BUDGET,
        help="Wall clock from the start of the run: 90, 90s, 15m, 2h.",
    ),
]
MaxRepeats = Annotated[
    str,
    typer.Option(
        envvar=ENV["max_repeats"],
        rich_help_panel=BUDGET,
        help="Halt the run (loop_detected) when the same request — model, messages or input, tools; not "
        "temperature or other settings — is sent this many times.",
    ),
]
Strict = Annotated[
    bool,
    typer.Option(
        "--strict",
        envvar=ENV["strict"],
        rich_help_panel=BUDGET,
        help="Hard cap: a call that could cost more than is left gets its output limit lowered to what is left "
        f"(refused below {STRICT_MIN_OUTPUT} tokens), so spend never passes --max-cost or --max-tokens.",
    ),
]
OpenAIUpstream = Annotated[
    str | None,
    typer.Option(
        envvar=ENV["openai_upstream"],
        rich_help_panel=UPSTREAM,
        show_default=False,
        help="Where OpenAI calls go. Default: the OPENAI_BASE_URL rk was started with, else https://api.openai.com/v1.",
    ),
]
AnthropicUpstream = Annotated[
    str | None,
    typer.Option(
        envvar=ENV["anthropic_upstream"],
        rich_help_panel=UPSTREAM,
        show_default=False,
        help="Where Anthropic calls go. Default: the ANTHROPIC_BASE_URL rk was started with, else "
        "https://api.anthropic.com.",
    ),
]
ConnectTimeout = Annotated[
    str,
    typer.Option(
        envvar=ENV["connect_timeout"],
        rich_help_panel=UPSTREAM,
        help="How long to wait for an upstream to accept a connection (30s, 2m); then the call gets a 504.",
    ),
]
ReadTimeout = Annotated[
    str,
    typer.Option(
        envvar=ENV["read_timeout"],
        rich_help_panel=UPSTREAM,
        help="Longest silence from an upstream mid-answer before rk gives up on it (the call gets a 504, or a "
        "stream an error event); per read, so a long stream is never cut. 'unlimited' to wait forever.",
    ),
]
Mock = Annotated[
    bool,
    typer.Option(
        "--mock",
        envvar=ENV["mock"],
        rich_help_panel=UPSTREAM,
        help="Answer calls with rk's own deterministic fake replies, priced at the real price: no key, no network.",
    ),
]
AllowUnpriced = Annotated[
    bool,
    typer.Option(
        "--allow-unpriced",
        envvar=ENV["allow_unpriced"],
        rich_help_panel=PRICES,
        help="Let calls to models with no known price through, flagged unpriced, instead of refusing them.",
    ),
]
AllowUnmetered = Annotated[
    bool,
    typer.Option(
        "--allow-unmetered",
        envvar=ENV["allow_unmetered"],
        rich_help_panel=UPSTREAM,
        help="Forward calls to routes rk does not meter (files, images, audio…) under a cost budget, "
        "recorded as unmetered, instead of refusing them.",
    ),
]
Otel = Annotated[
    bool,
    typer.Option(
        "--otel",
        envvar=ENV["otel"],
        rich_help_panel=OUTPUT,
        help="Export OpenTelemetry spans (a span per run, one per call under it) and metrics over OTLP/HTTP to "
        "OTEL_EXPORTER_OTLP_ENDPOINT, else http://localhost:4318. On by itself when OTEL_EXPORTER_OTLP_ENDPOINT "
        "is set. Needs: pip install 'riskkernel[otel]'.",
    ),
]


def run(
    ctx: typer.Context,
    command: Annotated[
        list[str], typer.Argument(metavar="CMD", help="The agent command and its arguments, after --, verbatim.")
    ],
    max_cost: MaxCost = DEFAULT_MAX_COST,
    max_tokens: MaxTokens = UNLIMITED,
    max_calls: MaxCalls = UNLIMITED,
    max_time: MaxTime = UNLIMITED,
    max_repeats: MaxRepeats = UNLIMITED,
    strict: Strict = False,
    on_halt: Annotated[
        OnHalt,
        typer.Option(
            envvar=ENV["on_halt"],
            rich_help_panel=BUDGET,
            help="block: later calls get 402 and the command keeps running. terminate: also SIGTERM "
            "the command (SIGKILL after --grace).",
        ),
    ] = OnHalt.block,
    grace: Annotated[
        float,
        typer.Option(
            envvar=ENV["grace"], rich_help_panel=BUDGET, help="Seconds between SIGTERM and SIGKILL when terminating."
        ),
    ] = 10.0,
    openai_upstream: OpenAIUpstream = None,
    anthropic_upstream: AnthropicUpstream = None,
    connect_timeout: ConnectTimeout = DEFAULT_CONNECT_TIMEOUT,
    read_timeout: ReadTimeout = DEFAULT_READ_TIMEOUT,
    mock: Mock = False,
    price: PriceFlags = None,
    prices_file: PricesFile = None,
    allow_unpriced: AllowUnpriced = False,
    allow_unmetered: AllowUnmetered = False,
    json_file: Annotated[
        Path | None,
        typer.Option("--json", metavar="FILE", rich_help_panel=OUTPUT, help="Also write the run's summary as JSON."),
    ] = None,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", envvar=ENV["quiet"], rich_help_panel=OUTPUT, help="No start line or table.")
    ] = False,
    name: Annotated[
        str | None, typer.Option(envvar=ENV["name"], rich_help_panel=OUTPUT, help="A name for the run in the ledger.")
    ] = None,
    tag: Annotated[
        list[str] | None,
        typer.Option(envvar=ENV["tag"], rich_help_panel=OUTPUT, metavar="KEY=VALUE", help="Tag the run (repeatable)."),
    ] = None,
    otel: Otel = False,
    via: Annotated[
        str | None,
        typer.Option(
            "--via",
            metavar="URL",
            rich_help_panel=UPSTREAM,
            show_default=False,
            help="Make the run on the rk serve at URL, which meters and caps it with this run's budget (its "
            "upstreams and prices apply). Its token: RK_AUTH_TOKEN, else its control file on this machine.",
        ),
    ] = None,
) -> None:
    import asyncio
    from dataclasses import replace

    from riskkernel import runner
    from riskkernel.cli import output
    from riskkernel.config import parse_tags
    from riskkernel.errors import ConfigError

    if json_file is not None:
        _check_writable(json_file)
    settings = replace(proxy_settings(ctx), on_halt=on_halt.value, grace=grace, name=name, tags=parse_tags(tag or []))

    def announce(record, url):  # type: ignore[no-untyped-def]
        if not quiet:
            mock_note = " · mock upstream" if mock else ""
            output.stderr.print(
                f"rk: run {record.run_id[:8]} · budget {output.budget_summary(record.budget)} · proxy {url}{mock_note}"
            )

    if via is None:
        outcome = asyncio.run(runner.run(settings, command, announce))
        remote = None
    else:
        from riskkernel.via import run_via

        server_side = {  # what a run made on an rk serve takes from the server
            "--mock": mock,
            "--openai-upstream": openai_upstream,
            "--anthropic-upstream": anthropic_upstream,
            "--connect-timeout": connect_timeout != DEFAULT_CONNECT_TIMEOUT,
            "--read-timeout": read_timeout != DEFAULT_READ_TIMEOUT,
            "--price": price,
            "--prices": prices_file,
            "--allow-unpriced": allow_unpriced,
            "--allow-unmetered": allow_unmetered,
            "--otel": otel,
        }
        given = next((flag for flag, value in server_side.items() if value), None)
        if given is not None:
            raise ConfigError(f"--via: {given} is the server's to set, not this run's")
        outcome, remote = asyncio.run(run_via(settings, command, _server(via), announce))
    if outcome.error:
        output.error(outcome.error)
    _report(outcome.run_id, quiet, json_file, remote)
    from riskkernel.cli import Finished

    raise Finished(outcome.exit_status)


def proxy_settings(ctx: typer.Context) -> RunSettings:
    """The settings of the options `rk run` and `rk serve` share (budget, upstreams, prices), as parsed."""
    from riskkernel.cli.prices import price_overrides
    from riskkernel.config import RunSettings, parse_budget, parse_timeout, parse_upstream

    p = ctx.params  # as click parsed them: a path is still a string here
    prices_file = Path(p["prices_file"]) if p["prices_file"] is not None else None
    return RunSettings(
        budget=parse_budget(
            p["max_cost"], p["max_tokens"], p["max_calls"], p["max_time"], p["max_repeats"], p["strict"]
        ),
        openai_upstream=parse_upstream(p["openai_upstream"]),
        anthropic_upstream=parse_upstream(p["anthropic_upstream"]),
        connect_timeout=parse_timeout(p["connect_timeout"], "connect timeout"),
        read_timeout=parse_timeout(p["read_timeout"], "read timeout"),
        mock=p["mock"],
        prices=price_overrides(ctx, p["price"], prices_file),
        allow_unpriced=p["allow_unpriced"],
        allow_unmetered=p["allow_unmetered"],
        otel=p["otel"],
    )


def _server(url: str) -> Control:
    """How to reach the rk serve at `url`: its token from RK_AUTH_TOKEN, else from its control file here."""
    import os

    from riskkernel import control
    from riskkernel.config import parse_upstream
    from riskkernel.errors import ConfigError

    base = parse_upstream(url, what="--via")
    assert base is not None
    token = os.environ.get("RK_AUTH_TOKEN")
    if token:
        return control.Control(base, token)
    found = control.find_by_url(base)
    if found is None:
        raise ConfigError(
            f"--via {base}: no token for it — set RK_AUTH_TOKEN to its --auth-token, or start that rk serve on"
            " this machine with the same data directory"
        )
    return found


def _check_writable(path: Path) -> None:
    """Fail before the run, not after it, if its summary could not be written."""
    import os

    from riskkernel.errors import ConfigError

    target = path if path.exists() else path.parent
    if not target.exists() or not os.access(target, os.W_OK):
        raise ConfigError(f"--json {path}: cannot write there")


def _report(run_id: str, quiet: bool, json_file: Path | None, remote: dict[str, Any] | None = None) -> None:
    """The cost table on stderr, the --json summary, and the CI job summary where GITHUB_STEP_SUMMARY is set.
    A run made on an rk serve whose ledger is not this one is reported from the server's final status."""
    import os

    from riskkernel import paths
    from riskkernel.cli import output
    from riskkernel.ledger import store
    from riskkernel.ledger.export import write_run
    from riskkernel.models import dumps

    db = store.open_reader(paths.ledger_path())
    try:
        if db is None:
            raise LookupError(run_id)
        record = store.find_run(db, run_id, exact=True)
    except LookupError:
        if remote is None:
            raise
        if db is not None:
            db.close()
        spent = remote.get("spent", {})
        halt = f"halted: {remote['halt_reason']}" if remote.get("halt_reason") else remote.get("status")
        if not quiet:
            output.stderr.print(
                f"rk · run {run_id} (on the rk serve) · {halt} · {spent.get('calls', '?')} calls ·"
                f" ${spent.get('cost_usd', '?')} — its calls are in that server's ledger"
            )
        if json_file is not None:
            json_file.write_text(dumps(remote) + "\n")
        return
    try:
        lines, held = store.model_breakdown(db, run_id)
        if not quiet:
            width = output.stderr.width if output.stderr.is_terminal else None
            output.stderr.print(output.cost_table(record, lines, held, width=width))
        if json_file is not None:
            with json_file.open("w", encoding="utf-8") as f:
                write_run(f, db, record)
                f.write("\n")
        step_summary = os.environ.get("GITHUB_STEP_SUMMARY")
        if step_summary:
            try:
                with open(step_summary, "a", encoding="utf-8") as f:
                    f.write(output.markdown_summary(record, lines, held))
            except OSError as exc:
                output.error(f"cannot append to GITHUB_STEP_SUMMARY ({step_summary}): {exc.strerror or exc}")
    finally:
        db.close()
