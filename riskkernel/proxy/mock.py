"""`--mock`: an upstream inside rk that answers every metered route with a deterministic fake reply.

It runs as a real aiohttp server on a loopback port so that mock calls take exactly the path real ones
take through the proxy: the same metering, pricing, caps, cuts and ledger rows.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable

from aiohttp import web

from riskkernel.providers import Endpoint
from riskkernel.providers.openai import ENDPOINTS as OPENAI_ENDPOINTS

MOCK_KEYS = {"OPENAI_API_KEY": "sk-rk-mock"}  # set for the child under --mock when it has none


def make_mock_app() -> web.Application:
    app = web.Application(client_max_size=64 * 2**20)
    for endpoint in OPENAI_ENDPOINTS:
        app.router.add_post(endpoint.path, _handler(endpoint))
    return app


def _handler(endpoint: Endpoint) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handle(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        try:
            req = endpoint.parse(body)
        except ValueError as exc:
            error = endpoint.error_body(str(exc), "invalid_request_error", "invalid_request")
            return web.Response(status=400, body=error, content_type="application/json")
        whole, events = endpoint.mock(req, json.loads(body))
        if not req.stream:
            return web.Response(body=whole, content_type="application/json")
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        for event in events:
            await response.write(event)
        await response.write_eof()
        return response

    return handle
