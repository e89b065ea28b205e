"""The aiohttp proxy. Forwarding one call: admit -> upstream -> tee through the meter -> settle -> record.

- The request body goes upstream as the client sent it (the endpoint may force stream usage on), with the
  client's own headers minus hop-by-hop ones; the upstream is asked for an uncompressed response because
  rk must read its usage, and compressed SSE would also delay tokens.
- A whole response is read, metered, settled and recorded, then sent with the `X-RiskKernel-*` headers.
- A stream is relayed chunk by chunk as complete events, unchanged, and metered as it flows. From the
  endpoint's terminal event on, bytes are held back until the call's ledger row is committed: a call the
  client saw is a call the ledger has. A cut (cap, time, kill) closes the upstream at once, charges the
  partial usage and ends the client's stream with a terminal error event in the provider's format.
- Everything rk itself answers is in the provider's error shape; budget refusals are 402, which the
  SDKs do not retry, and say so with `x-should-retry: false` as well.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import io
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from riskkernel.governor import ZERO, Refused, Spend, Ticket
from riskkernel.ledger.store import insert_call
from riskkernel.models import CallRecord, Flag, HaltReason, Refusal, Usage, now_iso, usd
from riskkernel.pricing import MISSING, PriceBook, Rates
from riskkernel.providers import Endpoint, Metered, Request, estimate_tokens, redact
from riskkernel.providers.openai import ENDPOINTS as OPENAI_ENDPOINTS
from riskkernel.providers.openai import error_body
from riskkernel.providers.sse import SSEDecoder
from riskkernel.proxy.run import LiveCall, LiveRun

log = logging.getLogger("riskkernel")

MAX_BODY = 32 * 1024 * 1024  # larger request bodies get 413 and are never forwarded
MAX_EVENT = 16 * 1024 * 1024  # an SSE event that grows past this is a broken stream
OUTPUT_RESERVE = 4096  # output tokens reserved for a call that sets no output limit of its own
CONNECT_TIMEOUT = 30.0

_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
_NOT_FORWARDED = _HOP_BY_HOP | {"host", "content-length", "accept-encoding"}
_NOT_RETURNED = _HOP_BY_HOP | {"content-length", "content-encoding"}
_RK_PREFIX = "x-riskkernel-"


@dataclass
class Proxy:
    """What the proxy serves: one run (for `rk run`), where each provider's upstream is, and prices."""

    run: LiveRun
    upstreams: dict[str, str]  # provider -> base URL, e.g. {"openai": "https://api.openai.com/v1"}
    prices: PriceBook = field(default_factory=PriceBook)
    allow_unpriced: bool = False
    http_proxies: dict[str, str | None] = field(init=False)  # provider -> the HTTP(S)_PROXY its upstream goes by

    def __post_init__(self) -> None:
        # Read once: aiohttp's trust_env would read the environment and ~/.netrc on every request, in threads.
        self.http_proxies = {provider: env_proxy(url) for provider, url in self.upstreams.items()}


def env_proxy(url: str) -> str | None:
    """The proxy HTTP_PROXY / HTTPS_PROXY / NO_PROXY give for `url`, as curl and the SDKs would use."""
    import urllib.request
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.hostname is None or urllib.request.proxy_bypass(parts.hostname):
        return None
    return urllib.request.getproxies().get(parts.scheme)


PROXY = web.AppKey("proxy", Proxy)
SESSION = web.AppKey("session", aiohttp.ClientSession)


def make_app(proxy: Proxy) -> web.Application:
    app = web.Application(client_max_size=MAX_BODY)
    app[PROXY] = proxy
    app.cleanup_ctx.append(_client_session)
    for endpoint in OPENAI_ENDPOINTS:
        app.router.add_post(endpoint.path, _handler(endpoint))
    app.router.add_route("*", "/{tail:.*}", _not_served)
    return app


async def _client_session(app: web.Application):  # type: ignore[no-untyped-def]
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, enable_cleanup_closed=False),
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT),
        skip_auto_headers=("User-Agent", "Accept"),
    )
    app[SESSION] = session
    yield
    await session.close()


async def _not_served(request: web.Request) -> web.Response:
    message = f"rk: {request.method} {request.path} is not a route rk serves"
    return web.Response(
        status=404, body=error_body(message, "invalid_request_error", "unknown_route"), content_type="application/json"
    )


def _handler(endpoint: Endpoint) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handle(request: web.Request) -> web.StreamResponse:
        return await _forward(request, endpoint)

    return handle


def _json_response(status: int, body: bytes, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=body, headers=headers, content_type="application/json")


async def _rates(prices: PriceBook, model: str, provider: str, tier: str | None) -> Rates | None:
    rates = prices.cached(model, provider, tier)
    if rates is MISSING:
        rates = await asyncio.get_running_loop().run_in_executor(None, prices.resolve, model, provider, tier)
        # The price data now loaded lives as long as the process: keep its objects out of the cyclic GC's
        # full collections, which would otherwise pause the proxy for tens of milliseconds now and then.
        gc.freeze()
    return rates  # type: ignore[return-value]


class _Call:
    """One call on its way through the proxy: what it will record, and how it answers the client."""

    def __init__(self, proxy: Proxy, endpoint: Endpoint, request: web.Request, req: Request, rates: Rates | None):
        self.proxy = proxy
        self.run = proxy.run
        self.endpoint = endpoint
        self.request = request
        self.req = req
        self.rates = rates
        self.seq = self.run.next_seq()
        self.started = time.monotonic()
        self.started_at = now_iso()
        self.ttfb_ms: float | None = None
        self.live = LiveCall()
        self.stream: web.StreamResponse | None = None  # once a streamed answer has begun

    def rk_headers(self, cost: Decimal | None = None) -> dict[str, str]:
        g = self.run.governor
        headers = {
            "X-RiskKernel-Run-Id": self.run.id,
            "X-RiskKernel-Call": str(self.seq),
            "X-RiskKernel-Run-Cost-Usd": usd(g.spent.cost),
        }
        if g.remaining_cost is not None:
            headers["X-RiskKernel-Remaining-Usd"] = usd(g.remaining_cost)
        if cost is not None:
            headers["X-RiskKernel-Cost-Usd"] = usd(cost)
        if g.halt_reason is not None:
            headers["X-RiskKernel-Halt-Reason"] = str(g.halt_reason)
        return headers

    def mark_first_byte(self) -> None:
        if self.ttfb_ms is None:
            self.ttfb_ms = (time.monotonic() - self.started) * 1000

    def row(
        self,
        status: int,
        *,
        usage: Usage = Usage(),  # noqa: B008 - frozen
        cost: Decimal = ZERO,
        model: str | None = None,
        source: str | None = None,
        flags: tuple[str, ...] = (),
        error: str | None = None,
    ) -> CallRecord:
        return CallRecord(
            run_id=self.run.id,
            seq=self.seq,
            started_at=self.started_at,
            endpoint=self.endpoint.path,
            provider=self.endpoint.provider,
            requested_model=self.req.model,
            model=model or self.req.model,
            stream=self.req.stream,
            status=status,
            usage=usage,
            cost=cost,
            price_source=source,
            flags=flags,
            latency_ms=(time.monotonic() - self.started) * 1000,
            ttfb_ms=self.ttfb_ms,
            error=error,
        )

    async def record(self, status: int, **row: Any) -> None:
        """Commit the call's row; returns once it is committed."""
        await self.run.ledger.commit(insert_call(self.row(status, **row)))

    async def refuse(self, reason: str, message: str, flags: tuple[str, ...] = (Flag.REFUSED,)) -> web.Response:
        await self.record(402, flags=flags, error=str(reason))
        kind = "budget_exceeded" if reason in (*HaltReason, Refusal.INSUFFICIENT_BUDGET) else "invalid_request_error"
        headers = {**self.rk_headers(), "x-should-retry": "false"}
        return _json_response(402, self.endpoint.error_body(message, kind, str(reason)), headers)

    async def settle(
        self,
        ticket: Ticket,
        status: int,
        metered: Metered,
        *,
        billed: bool = True,
        cut: HaltReason | None = None,
        error: str | None = None,
    ) -> Decimal:
        """Charge the call to the run, then record it. Usage the upstream did not report is estimated from
        the request and the output seen, unless the call cannot have been billed (`billed=False`)."""
        flags: list[str] = []
        req = self.req
        if metered.usage is not None:
            usage = metered.usage
        elif not billed:
            usage = Usage()
        else:
            usage = Usage(input_tokens=req.input_tokens, output_tokens=estimate_tokens(metered.output_chars))
            flags.append(Flag.ESTIMATED)
        served = metered.model or req.model
        rates = self.rates
        if served != req.model or metered.service_tier != req.service_tier:
            tier = metered.service_tier if metered.service_tier != "default" else None
            rates = await _rates(self.proxy.prices, served, self.endpoint.provider, tier) or rates
        if rates is None:
            cost, source = ZERO, None
            flags.append(Flag.UNPRICED)
        else:
            cost, source = rates.cost(usage), rates.source
        if cut is not None:
            flags.append(Flag.CUT)
            error = f"cut: {cut}"
        elif error is None and metered.error is not None:
            error = f"upstream: {metered.error}"
        halt = self.run.governor.settle(ticket, cost, usage.total_tokens)
        if halt is not None:
            self.run.halted(halt)
        await self.record(
            status,
            usage=usage,
            cost=cost,
            model=served,
            source=source,
            flags=tuple(flags),
            error=None if error is None else redact(error),
        )
        return cost


async def _forward(request: web.Request, endpoint: Endpoint) -> web.StreamResponse:
    proxy = request.app[PROXY]
    run = proxy.run
    try:
        client_body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        message = f"rk: the request body is larger than the {MAX_BODY // 2**20} MiB rk accepts"
        return _json_response(413, endpoint.error_body(message, "invalid_request_error", "request_too_large"))
    try:
        req = endpoint.parse(client_body)
    except ValueError as exc:
        return _json_response(400, endpoint.error_body(str(exc), "invalid_request_error", "invalid_request"))

    rates = await _rates(proxy.prices, req.model, endpoint.provider, req.service_tier)
    call = _Call(proxy, endpoint, request, req, rates)
    governor = run.governor
    run.check_time()
    if governor.halt_reason is not None:
        return await call.refuse(governor.halt_reason, governor.message(governor.halt_reason))
    if rates is None and governor.budget.max_cost is not None and not proxy.allow_unpriced:
        return await call.refuse(Refusal.UNPRICED_MODEL, _unpriced_message(req.model, run.id))
    output = req.max_output_tokens or OUTPUT_RESERVE
    worst = Usage(input_tokens=req.input_tokens, output_tokens=output)
    admitted = governor.admit(Spend(rates.cost(worst) if rates else ZERO, worst.total_tokens, 1))
    if isinstance(admitted, Refused):
        return await call.refuse(admitted.reason, admitted.message)

    run.calls.add(call.live)
    try:
        return await _exchange(call, admitted)
    except Exception as exc:  # a bug in rk: the client gets an error in its provider's shape, the call a row
        log.exception("rk: internal error in call %s of run %s", call.seq, run.id)
        reserved = admitted.reserved
        governor.settle(admitted, reserved.cost, reserved.tokens)
        error = f"rk internal error: {type(exc).__name__}"
        await call.record(500, usage=worst, cost=reserved.cost, flags=(Flag.ESTIMATED,), error=error)
        message = f"{error} (the call was charged its reservation)"
        if call.stream is not None:  # the answer has begun: end it with an error event the SDK raises on
            with contextlib.suppress(ConnectionError, aiohttp.ClientConnectionResetError):
                await call.stream.write(endpoint.stream_error(message, "server_error", "rk_error"))
                await call.stream.write_eof()
            return call.stream
        body = endpoint.error_body(message, "server_error", "rk_error")
        return _json_response(500, body, {**call.rk_headers(), "x-should-retry": "false"})
    finally:
        run.calls.discard(call.live)
        if not admitted.settled:  # cancelled (rk is shutting down): charge and record what the call reserved
            reserved = admitted.reserved
            governor.settle(admitted, reserved.cost, reserved.tokens)
            row = call.row(499, usage=worst, cost=reserved.cost, flags=(Flag.ESTIMATED,), error="cancelled")
            run.ledger.submit(insert_call(row))  # committed before the ledger closes; nobody waits here


def _unpriced_message(model: str, run_id: str) -> str:
    return (
        f"rk: no price is known for model {model!r} — add one with --price {model}=IN:OUT (USD per 1M tokens),"
        f" or let it through unpriced with --allow-unpriced (run {run_id[:8]}…)"
    )


def _without(headers: CIMultiDictProxy[str], drop: frozenset[str]) -> CIMultiDict[str]:
    """A copy without hop-by-hop headers (and those the Connection header names) and rk's own."""
    out = CIMultiDict(headers)  # copied in C; dropping a few names is cheaper than filtering every header
    named = headers.get("Connection")
    for name in drop.union(n.strip() for n in named.split(",")) if named else drop:
        out.popall(name, None)
    for name in [n for n in out if n[:13].lower() == _RK_PREFIX]:
        out.popall(name, None)
    return out


def _upstream_headers(headers: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    out = _without(headers, _NOT_FORWARDED)
    out["Accept-Encoding"] = "identity"
    return out


def _client_headers(upstream: aiohttp.ClientResponse, extra: dict[str, str]) -> CIMultiDict[str]:
    out = _without(upstream.headers, _NOT_RETURNED)
    out.update(extra)
    return out


_UPSTREAM_ERRORS = (aiohttp.ClientError, OSError, asyncio.TimeoutError)


async def _exchange(call: _Call, ticket: Ticket) -> web.StreamResponse:
    proxy, endpoint, req = call.proxy, call.endpoint, call.req
    base = proxy.upstreams[endpoint.provider]
    url = base.rstrip("/") + call.request.raw_path[len("/v1") :]
    session = call.request.app[SESSION]
    try:
        # aiohttp writes a large body in slices, yielding to the loop between them, only from a file object.
        data = req.body if len(req.body) <= 2**20 else io.BytesIO(req.body)
        upstream = await session.post(
            url,
            data=data,
            headers=_upstream_headers(call.request.headers),
            allow_redirects=False,
            proxy=proxy.http_proxies[endpoint.provider],
        )
    except _UPSTREAM_ERRORS as exc:
        # A refused connection never reached the provider; a connection lost after sending may have been billed.
        billed = not isinstance(exc, aiohttp.ClientConnectorError)
        return await _upstream_failed(call, ticket, f"could not reach {base}: {_describe(exc)}", billed)
    call.live.upstream = upstream
    try:
        if call.live.cut_reason is not None:  # cut while the request was on its way
            upstream.close()
        is_stream = upstream.content_type == "text/event-stream" and upstream.status < 300
        if is_stream:
            return await _relay_stream(call, ticket, upstream)
        return await _relay_whole(call, ticket, upstream)
    finally:
        upstream.release()


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return redact(text, 200)


async def _upstream_failed(call: _Call, ticket: Ticket, problem: str, billed: bool = True) -> web.Response:
    """The upstream could not be reached or broke off: 502 in the provider's shape, or 402 if rk cut it."""
    reason = call.live.cut_reason
    if reason is not None:
        await call.settle(ticket, 402, Metered(), cut=reason)
        message = call.run.governor.message(reason)
        headers = {**call.rk_headers(), "x-should-retry": "false"}
        return _json_response(402, call.endpoint.error_body(message, "budget_exceeded", str(reason)), headers)
    await call.settle(ticket, 502, Metered(), billed=billed, error=problem)
    body = call.endpoint.error_body(f"rk: upstream failed — {problem}", "upstream_error", "upstream_unreachable")
    return _json_response(502, body, call.rk_headers())


async def _relay_whole(call: _Call, ticket: Ticket, upstream: aiohttp.ClientResponse) -> web.StreamResponse:
    call.mark_first_byte()
    try:
        payload = await upstream.read()
    except _UPSTREAM_ERRORS as exc:
        return await _upstream_failed(call, ticket, f"the response broke off: {_describe(exc)}")
    metered = call.endpoint.meter(payload) if payload else Metered()
    cost = await call.settle(ticket, upstream.status, metered, billed=upstream.status < 400)
    return web.Response(status=upstream.status, body=payload, headers=_client_headers(upstream, call.rk_headers(cost)))


class _ClientGone(Exception):
    pass


async def _relay_stream(call: _Call, ticket: Ticket, upstream: aiohttp.ClientResponse) -> web.StreamResponse:
    req, endpoint, run = call.req, call.endpoint, call.run
    response = web.StreamResponse(status=upstream.status, headers=_client_headers(upstream, call.rk_headers()))
    await response.prepare(call.request)
    call.stream = response

    async def send(data: bytes) -> None:
        try:
            await response.write(data)
        except (ConnectionError, aiohttp.ClientConnectionResetError) as exc:
            raise _ClientGone from exc

    decoder = SSEDecoder()
    meter = endpoint.stream_meter(req)
    rates = call.rates
    input_cost = rates.cost(Usage(input_tokens=req.input_tokens)) if rates else ZERO
    per_token = rates.output_per_token(req.input_tokens) if rates else ZERO
    held: list[bytes] = []  # the terminal event and anything after it, released once the row is committed
    problem: str | None = None
    client_gone = False
    try:
        async for chunk in upstream.content.iter_any():
            call.mark_first_byte()
            out = []
            for event in decoder.feed(chunk):
                data, terminal = meter.feed(event)
                if terminal or held:
                    held.append(data)
                elif data:
                    out.append(data)
            if out:
                await send(b"".join(out))
            if len(decoder) > MAX_EVENT:
                problem = f"the stream sent an event larger than {MAX_EVENT // 2**20} MiB"
                break
            tokens = estimate_tokens(meter.result().output_chars)
            halt = run.governor.progress(ticket, input_cost + tokens * per_token, req.input_tokens + tokens)
            if halt is not None:
                run.halted(halt)
            if call.live.cut_reason is not None:
                break
        else:
            tail, last = decoder.flush()
            if last is not None:
                meter.feed(last)
            if tail and held:
                held.append(tail)
            elif tail:
                await send(tail)
    except _ClientGone:
        client_gone = True
    except _UPSTREAM_ERRORS as exc:
        if call.live.cut_reason is None:
            problem = f"the stream broke off: {_describe(exc)}"
    cut = call.live.cut_reason
    if client_gone or problem is not None or cut is not None:
        upstream.close()  # stop the generation, and the billing, at once
    metered = meter.result()
    if client_gone:
        await call.settle(ticket, upstream.status, metered, error="client disconnected")
        return response
    await call.settle(ticket, upstream.status, metered, cut=cut, error=problem)
    try:
        if cut is not None:
            await response.write(endpoint.stream_error(run.governor.message(cut), "budget_exceeded", str(cut)))
        elif problem is not None:
            await response.write(
                endpoint.stream_error(f"rk: upstream failed — {problem}", "upstream_error", "upstream_stream_broken")
            )
        elif held:
            await response.write(b"".join(held))
        await response.write_eof()
    except (ConnectionError, aiohttp.ClientConnectionResetError):
        pass
    return response
