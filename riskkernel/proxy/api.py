"""The `/rk` API: rk's own routes beside the proxied ones, never forwarded.

`GET /rk/health` answers anyone (it says nothing but that rk is up). Everything else needs the owner's
bearer token (see `riskkernel.control`): `GET /rk/runs`, `GET /rk/runs/{id}` (live status, spend, budget,
halt) and `POST /rk/runs/{id}/kill`. Errors are `{"error": {"message", "code"}}`.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from riskkernel import __version__
from riskkernel.control import AUTHORIZATION
from riskkernel.models import RunStatus, usd
from riskkernel.proxy.run import LiveRun, Runs

TOKEN = web.AppKey("control_token", str)
RUNS = web.AppKey("control_runs", Runs)

Handler = Callable[[web.Request], Awaitable[web.Response]]


def add_routes(app: web.Application, token: str, runs: Runs) -> None:
    """The `/rk` routes for `runs`, behind `token`. Add them before any catch-all route."""
    app[TOKEN] = token
    app[RUNS] = runs
    app.router.add_get("/rk/health", _health)
    app.router.add_get("/rk/runs", _authenticated(_list))
    app.router.add_get("/rk/runs/{run_id}", _authenticated(_show))
    app.router.add_post("/rk/runs", _authenticated(_create))
    app.router.add_post("/rk/runs/{run_id}/kill", _authenticated(_kill))
    app.router.add_post("/rk/runs/{run_id}/finish", _authenticated(_finish))
    app.router.add_route("*", "/rk/{tail:.*}", _authenticated(_unknown))


def _reply(status: int, data: dict[str, Any]) -> web.Response:
    return web.Response(status=status, text=json.dumps(data), content_type="application/json")


def _error(status: int, code: str, message: str) -> web.Response:
    return _reply(status, {"error": {"message": message, "code": code}})


def _authenticated(handler: Handler) -> Handler:
    async def check(request: web.Request) -> web.Response:
        given = request.headers.get(AUTHORIZATION, "")
        expected = f"Bearer {request.app[TOKEN]}"
        if not hmac.compare_digest(given.encode(), expected.encode()):
            return _error(401, "unauthorized", "rk: a valid bearer token is required for the /rk API")
        return await handler(request)

    return check


async def _health(request: web.Request) -> web.Response:
    return _reply(200, {"ok": True, "version": __version__})


def _status(run: LiveRun) -> dict[str, Any]:
    governor = run.governor
    remaining = governor.remaining_cost
    return {
        "run_id": run.id,
        "name": run.record.name,
        "status": str(RunStatus.HALTED if governor.halt_reason else RunStatus.RUNNING),
        "halt_reason": governor.halt_reason,
        "started_at": run.record.started_at,
        "budget": run.record.budget.to_json(),
        "spent": {"cost_usd": usd(governor.spent.cost), "tokens": governor.spent.tokens, "calls": governor.spent.calls},
        "remaining_usd": None if remaining is None else usd(remaining),
        "in_flight": len(run.calls),
        "tags": dict(run.record.tags),
    }


def _find(request: web.Request) -> LiveRun | None:
    wanted = request.match_info["run_id"]
    return request.app[RUNS].get(wanted)


def _not_live(request: web.Request) -> web.Response:
    return _error(404, "unknown_run", f"rk: no live run {request.match_info['run_id']!r} here")


async def _list(request: web.Request) -> web.Response:
    return _reply(200, {"runs": [_status(run) for run in request.app[RUNS].live()]})


async def _show(request: web.Request) -> web.Response:
    run = _find(request)
    return _not_live(request) if run is None else _reply(200, _status(run))


async def _kill(request: web.Request) -> web.Response:
    """Halt the run with `killed` and cut every call in flight. A run already halted keeps its first halt
    reason (halted stays halted), but its calls still in flight are cut all the same."""
    run = _find(request)
    if run is None:
        return _not_live(request)
    before = run.governor.halt_reason
    in_flight = len(run.calls)
    run.kill()
    return _reply(200, {**_status(run), "killed": before is None, "was_halted": before, "cut": in_flight})


async def _create(request: web.Request) -> web.Response:
    """A new run, from `{"run_id"?, "name"?, "tags"?, "budget"?}` (the budget in the shape runs are shown
    with; what it leaves out is the server's default): its status and the base URLs its clients should use."""
    try:
        spec = await request.json() if request.can_read_body else {}
        if not isinstance(spec, dict):
            raise ValueError("the body must be a JSON object")
        run = await request.app[RUNS].create(spec)
    except ValueError as exc:
        return _error(400, "invalid_run", f"rk: cannot create the run: {exc}")
    base = f"{request.scheme}://{request.host}/" + request.app[RUNS].prefix(run)
    urls = {"openai_base_url": base + "v1", "anthropic_base_url": base.rstrip("/")}
    return _reply(201, {**_status(run), **urls})


async def _finish(request: web.Request) -> web.Response:
    """End a run: no more calls; its row in the ledger is final (`completed`, or `halted`)."""
    run = _find(request)
    if run is None:
        return _not_live(request)
    try:
        await request.app[RUNS].finish(run)
    except ValueError as exc:
        return _error(409, "cannot_finish", f"rk: {exc}")
    status = _status(run)
    return _reply(200, {**status, "status": "halted" if run.governor.halt_reason else "completed"})


async def _unknown(request: web.Request) -> web.Response:
    return _error(404, "unknown_route", f"rk: {request.method} {request.path} is not a route of the /rk API")
