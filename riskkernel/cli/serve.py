"""`rk serve`: the command line of the long-lived proxy. The work is in `riskkernel.serve`."""

from __future__ import annotations

from typing import Annotated

import typer

from riskkernel.cli.prices import PriceFlags, PricesFile
from riskkernel.cli.run import (
    AllowUnmetered,
    AllowUnpriced,
    AnthropicUpstream,
    ConnectTimeout,
    MaxCalls,
    MaxCost,
    MaxRepeats,
    MaxTime,
    MaxTokens,
    Mock,
    OpenAIUpstream,
    Otel,
    ReadTimeout,
    Strict,
)
from riskkernel.config import DEFAULT_CONNECT_TIMEOUT, DEFAULT_MAX_COST, DEFAULT_READ_TIMEOUT, UNLIMITED

HELP = """Serve the proxy for many runs, each with its own budget, until SIGTERM or Ctrl-C.

A call belongs to the run named by its X-RiskKernel-Run-Id header, else by its base URL's path
(http://HOST:PORT/run/RUN_ID/v1 for OpenAI SDKs, http://HOST:PORT/run/RUN_ID for Anthropic's), else to a
run of its own. A run named for the first time gets the budget options below; POST /rk/runs creates one
with a budget of its own. Runs end with POST /rk/runs/ID/finish; rk kill stops one. A restart on the same
ledger picks unended runs up again with what they spent.

Listens on loopback unless --auth-token is given; then every call and /rk request must carry the token.

Example: rk serve --port 7070 --max-cost 2.00
"""

SERVER = "Server"


def serve(
    ctx: typer.Context,
    host: Annotated[str, typer.Option(rich_help_panel=SERVER, help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(rich_help_panel=SERVER, help="Port to listen on (0: any free one).")] = 7070,
    auth_token: Annotated[
        str | None,
        typer.Option(
            envvar="RK_AUTH_TOKEN",
            rich_help_panel=SERVER,
            show_default=False,
            help="Require this token on every call (X-RiskKernel-Token, or /t/TOKEN/ in the base URL) and on the "
            "/rk API. Needed to listen beyond loopback.",
        ),
    ] = None,
    shutdown_grace: Annotated[
        float,
        typer.Option(rich_help_panel=SERVER, help="Seconds calls in flight may take to finish on shutdown."),
    ] = 10.0,
    max_cost: MaxCost = DEFAULT_MAX_COST,
    max_tokens: MaxTokens = UNLIMITED,
    max_calls: MaxCalls = UNLIMITED,
    max_time: MaxTime = UNLIMITED,
    max_repeats: MaxRepeats = UNLIMITED,
    strict: Strict = False,
    openai_upstream: OpenAIUpstream = None,
    anthropic_upstream: AnthropicUpstream = None,
    connect_timeout: ConnectTimeout = DEFAULT_CONNECT_TIMEOUT,
    read_timeout: ReadTimeout = DEFAULT_READ_TIMEOUT,
    mock: Mock = False,
    price: PriceFlags = None,
    prices_file: PricesFile = None,
    allow_unpriced: AllowUnpriced = False,
    allow_unmetered: AllowUnmetered = False,
    otel: Otel = False,
) -> None:
    import asyncio

    from riskkernel.cli import output
    from riskkernel.cli.run import proxy_settings
    from riskkernel.serve import Server, ServeSettings, check_bind, serve_forever

    check_bind(host, auth_token)
    defaults = proxy_settings(ctx)
    settings = ServeSettings(defaults, host, port, auth_token, shutdown_grace)

    def announce(server: Server) -> None:
        mock_note = " · mock upstream" if mock else ""
        output.stderr.print(
            f"rk serve: {server.url} · default budget {output.budget_summary(defaults.budget)}{mock_note}\n"
            f"  OpenAI base URL for a run: {server.url}/run/RUN_ID/v1 · Anthropic: {server.url}/run/RUN_ID\n"
            f"  /rk API token: {'--auth-token' if auth_token else server.control_file}",
            highlight=False,
        )

    asyncio.run(serve_forever(settings, announce))
