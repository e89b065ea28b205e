"""The aiohttp side of rk: the proxy app (`app`), a run's live state (`run`), the mock upstream (`mock`)."""

from __future__ import annotations

from aiohttp import web

from riskkernel.errors import RkError

SHUTDOWN_GRACE = 2.0  # seconds calls still in flight at shutdown may take to finish


async def serve(app: web.Application, host: str = "127.0.0.1", port: int = 0) -> tuple[web.AppRunner, str]:
    """Serve `app` (on an ephemeral port by default); its runner, to clean up, and its base URL."""
    # handler_cancellation: a handler whose client has gone is cancelled, so a call waiting on an upstream
    # for a client that gave up does not hold its reservation until the upstream answers.
    runner = web.AppRunner(
        app, access_log=None, shutdown_timeout=SHUTDOWN_GRACE, handle_signals=False, handler_cancellation=True
    )
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise RkError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    bound_host, bound_port = runner.addresses[0][:2]
    return runner, f"http://{bound_host}:{bound_port}"
