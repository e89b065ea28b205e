"""`--mock`: an upstream inside rk that answers every metered route with a deterministic fake reply.

It runs as a real aiohttp server on a loopback port so that mock calls take exactly the path real ones
take through the proxy: the same metering, pricing, caps, cuts and ledger rows. It also lists a few models
and counts tokens, so that SDKs that ask for those work too.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable

from aiohttp import web

from riskkernel.providers import Endpoint, ErrorKind, anthropic
from riskkernel.providers.catalog import ENDPOINTS, provider_for

MOCK_KEY = "sk-rk-mock"  # the API key the child gets under --mock for a provider it has none for
_MODELS = {"openai": ("gpt-4o", "gpt-4o-mini", "o3", "text-embedding-3-small"), "anthropic": ("claude-sonnet-4-6",)}


def make_mock_app() -> web.Application:
    app = web.Application(client_max_size=64 * 2**20)
    for endpoint in ENDPOINTS:
        app.router.add_post(endpoint.path, _handler(endpoint))
    app.router.add_post(anthropic.COUNT_TOKENS, _count_tokens)
    app.router.add_get("/v1/models", _models)
    return app


def _handler(endpoint: Endpoint) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handle(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        try:
            req = endpoint.parse(body)
        except ValueError as exc:
            error = endpoint.error_body(str(exc), ErrorKind.INVALID, "invalid_request")
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


async def _count_tokens(request: web.Request) -> web.Response:
    try:
        req = anthropic.parse_messages(await request.read())
    except ValueError as exc:
        error = anthropic.error_body(str(exc), ErrorKind.INVALID, "invalid_request")
        return web.Response(status=400, body=error, content_type="application/json")
    return web.json_response({"input_tokens": req.input_tokens})


async def _models(request: web.Request) -> web.Response:
    provider = provider_for(request.path, request.headers).name
    if provider == "anthropic":
        data = [
            {"type": "model", "id": m, "display_name": m, "created_at": "2025-09-29T00:00:00Z"}
            for m in _MODELS[provider]
        ]
        return web.json_response(
            {"data": data, "has_more": False, "first_id": data[0]["id"], "last_id": data[-1]["id"]}
        )
    models = [{"id": m, "object": "model", "created": 1_700_000_000, "owned_by": "openai"} for m in _MODELS[provider]]
    return web.json_response({"object": "list", "data": models})
