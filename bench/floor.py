"""The floor for an aiohttp proxy: a minimal pass-through relay that also parses usage, nothing else.

No admission, pricing, ledger or headers: what any aiohttp-based metering proxy must at least spend.
The benchmark measures rk beside it, in the same run, on the same core.

    python bench/floor.py PORT UPSTREAM_BASE_URL
"""

import json
import sys

import aiohttp
from aiohttp import web

SESSION = web.AppKey("session", aiohttp.ClientSession)
UPSTREAM = web.AppKey("upstream", str)
DROP = {"host", "content-length", "connection", "transfer-encoding", "keep-alive", "accept-encoding"}


async def relay(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    headers = {k: v for k, v in request.headers.items() if k.lower() not in DROP}
    session = request.app[SESSION]
    async with session.post(request.app[UPSTREAM] + request.path[3:], data=body, headers=headers) as upstream:
        out_headers = {k: v for k, v in upstream.headers.items() if k.lower() not in DROP | {"content-encoding"}}
        if upstream.content_type != "text/event-stream":
            payload = await upstream.read()
            usage = json.loads(payload).get("usage")
            return web.Response(status=upstream.status, body=payload, headers=out_headers)
        response = web.StreamResponse(status=upstream.status, headers=out_headers)
        await response.prepare(request)
        usage = None
        async for chunk in upstream.content.iter_any():
            for line in chunk.split(b"\n"):
                if line.startswith(b"data: {") and b'"usage":{' in line:
                    usage = json.loads(line[6:])["usage"]
            await response.write(chunk)
        await response.write_eof()
        assert usage is None or "prompt_tokens" in usage
        return response


async def session_ctx(app: web.Application):  # type: ignore[no-untyped-def]
    app[SESSION] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    yield
    await app[SESSION].close()


if __name__ == "__main__":
    app = web.Application()
    app[UPSTREAM] = sys.argv[2].rstrip("/")
    app.cleanup_ctx.append(session_ctx)
    app.router.add_post("/v1/chat/completions", relay)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)
