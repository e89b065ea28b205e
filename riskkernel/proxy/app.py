"""The aiohttp proxy. Forwarding one call: admit -> upstream -> tee through the meter -> settle -> record.

- The request body goes upstream as the client sent it (the endpoint may force stream usage on), with the
  client's own headers minus hop-by-hop ones; the upstream is asked for an uncompressed response because
  rk must read its usage, and compressed SSE would also delay tokens.
- A whole response is read, metered, settled and recorded, then sent with the `X-RiskKernel-*` headers.
- A stream is relayed chunk by chunk as complete events, unchanged, and metered as it flows. From the
  endpoint's terminal event on, bytes are held back until the call's ledger row is committed: a call the
  client saw is a call the ledger has. A cut (cap, time, kill) closes the upstream at once, charges the
  partial usage and ends the client's stream with a terminal error event in the provider's format.
- Routes rk does not meter are passed through, streamed both ways, and recorded as unmetered: GETs and
  token counting for free; any other call only when no cost budget is set or `--allow-unmetered` says so,
  since its spend could not count against the budget.
- Everything rk itself answers is in the provider's error shape; budget refusals are 402, which the
  SDKs do not retry, and say so with `x-should-retry: false` as well.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import io
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from riskkernel.errors import LedgerError
from riskkernel.governor import STRICT_MIN_OUTPUT, ZERO, Refused, Spend, Ticket
from riskkernel.ledger.store import insert_call
from riskkernel.models import CallRecord, Flag, HaltReason, Refusal, Usage, now_iso, usd
from riskkernel.pricing import MISSING, PriceBook, Rates, how_to_price
from riskkernel.providers import (
    Endpoint,
    ErrorKind,
    Metered,
    Position,
    Provider,
    Request,
    StreamMeter,
    estimate_tokens,
    meter_chunk,
    redact,
    set_top_level,
    subject,
)
from riskkernel.providers.catalog import ENDPOINTS, FREE_POSTS, provider_for
from riskkernel.providers.limits import output_limit
from riskkernel.providers.sse import SSEDecoder
from riskkernel.proxy import api
from riskkernel.proxy.run import LiveCall, LiveRun, Runs, watch_silence

if TYPE_CHECKING:
    from riskkernel.telemetry import Telemetry

log = logging.getLogger("riskkernel")

MAX_BODY = 32 * 1024 * 1024  # larger request bodies get 413 and are never forwarded
MAX_EVENT = 16 * 1024 * 1024  # an SSE event that grows past this is a broken stream
LINGER = 1.0  # how long to wait, after a stream's last event, for its upstream to close it

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
    """What the proxy serves: its runs (one for `rk run`), where each provider's upstream is, and prices."""

    runs: Runs
    upstreams: dict[str, str]  # provider -> base URL, e.g. {"openai": "https://api.openai.com/v1"}
    control_token: str | None = None  # serve the /rk API behind this bearer token
    prefixed: bool = False  # routes may carry a prefix (`/run/ID/v1/...`) that `runs` resolves
    prices: PriceBook = field(default_factory=PriceBook)
    allow_unpriced: bool = False
    allow_unmetered: bool = False
    connect_timeout: float | None = None  # seconds; None: wait as long as the OS does
    read_timeout: float | None = None  # the longest silence mid-answer, per read
    telemetry: Telemetry | None = None  # where each metered call's span and metrics go, if anywhere
    http_proxies: dict[str, str | None] = field(init=False)  # provider -> the HTTP(S)_PROXY its upstream goes by

    def __post_init__(self) -> None:
        # Read once: aiohttp's trust_env would read the environment and ~/.netrc on every request, in threads.
        self.http_proxies = {provider: env_proxy(url) for provider, url in self.upstreams.items()}


def env_proxy(url: str) -> str | None:
    """The proxy HTTP_PROXY / HTTPS_PROXY / NO_PROXY give for `url`, as curl and the SDKs would use. Never
    one for a loopback upstream (the mock, an outer rk, a local model server)."""
    import ipaddress
    import urllib.request
    from urllib.parse import urlsplit

    host = urlsplit(url).hostname
    if host is None or host == "localhost" or urllib.request.proxy_bypass(host):
        return None
    try:
        if ipaddress.ip_address(host).is_loopback:
            return None
    except ValueError:
        pass
    return urllib.request.getproxies().get(urlsplit(url).scheme)


PROXY = web.AppKey("proxy", Proxy)
SESSION = web.AppKey("session", aiohttp.ClientSession)


def make_app(proxy: Proxy) -> web.Application:
    app = web.Application(client_max_size=MAX_BODY)
    app[PROXY] = proxy
    app.cleanup_ctx.append(_client_session)
    # Under `rk serve`, a route may start with a prefix naming the run (and carrying the token), so that an
    # unmodified client is grouped by its base URL alone: `/run/ID/v1/...`, `/t/TOKEN/run/ID/v1/...`.
    pre = "/{prefix:" + PREFIX + "}" if proxy.prefixed else "/"
    for endpoint in ENDPOINTS:
        app.router.add_post(pre + endpoint.path[1:], _handler(endpoint))
    for path in FREE_POSTS:
        app.router.add_post(pre + path[1:], _free)
    app.router.add_route("GET", pre + "v1/{tail:.*}", _free)  # (HEAD too)
    app.router.add_route("*", pre + "v1/{tail:.*}", _unmetered)
    if proxy.control_token is not None:
        api.add_routes(app, proxy.control_token, proxy.runs)
    app.router.add_route("*", r"/{tail:[\s\S]*}", _not_served)  # every path, line breaks and all
    return app


async def _client_session(app: web.Application):  # type: ignore[no-untyped-def]
    proxy = app[PROXY]
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, enable_cleanup_closed=False),
        # (the read timeout is rk's own watch_silence: aiohttp's sock_read re-arms a timer at every read)
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=proxy.connect_timeout),
        skip_auto_headers=("User-Agent", "Accept"),
    )
    app[SESSION] = session
    watch = None if proxy.read_timeout is None else asyncio.create_task(watch_silence(proxy.runs, proxy.read_timeout))
    yield
    if watch is not None:
        watch.cancel()
    await session.close()


def _dotted(request: web.Request) -> web.Response | None:
    """The 400 for a path with `.` or `..` segments (encoded or not): normalised on its way upstream, it would
    reach another route than the one rk resolved, metered and authorised it as. Every handler that sends a
    request upstream asks this first (a check there, rather than a middleware, costs nothing per call)."""
    path = request.path
    if "/." in path and any(segment in (".", "..") for segment in path.split("/")):
        message = "rk: a path with '.' or '..' segments is not served"
        body = provider_for(path, request.headers).error_body(message, ErrorKind.INVALID, "invalid_path")
        return _json_response(400, body)
    return None


async def _not_served(request: web.Request) -> web.Response:
    path = re.sub(r"^/t/[^/]*/", "/t/…/", request.path)  # never `rk serve`'s token back, into the client's logs
    message = f"rk: {request.method} {path} is not a route rk serves"
    body = provider_for(request.path, request.headers).error_body(message, ErrorKind.NOT_FOUND, "unknown_route")
    return _json_response(404, body)


RUN_ID = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"  # what a run id may be: safe in a path, a header, a file name
PREFIX = rf"(?:t/[A-Za-z0-9_-]{{1,128}}/)?(?:run/{RUN_ID}/)?"


def client_path(request: web.Request, raw: bool = False) -> str:
    """The request's path (or raw path, query included) as if sent to an unprefixed base URL."""
    path = request.raw_path if raw else request.path
    prefix = request.match_info.get("prefix", "")
    return "/" + path[1 + len(prefix) :] if prefix else path


async def _resolve(request: web.Request, provider: Provider) -> LiveRun | web.Response:
    """The run the request belongs to, or the answer that says why it has none."""
    try:
        found = await request.app[PROXY].runs.resolve(request)
    except LedgerError as exc:  # a run new to the ledger could not be written there
        return _unavailable(provider, _ledger_message(exc))
    if isinstance(found, LiveRun):
        return found
    kind = {401: ErrorKind.AUTH, 404: ErrorKind.NOT_FOUND}.get(found.status, ErrorKind.INVALID)
    return _json_response(found.status, provider.error_body(found.message, kind, found.code))


def _handler(endpoint: Endpoint) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handle(request: web.Request) -> web.StreamResponse:
        run = _dotted(request) or await _resolve(request, endpoint.provider)
        if not isinstance(run, LiveRun):
            return run
        try:
            return await _forward_in(request, endpoint, run)
        finally:
            await request.app[PROXY].runs.release(run)

    return handle


def _json_response(status: int, body: bytes, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=body, headers=headers, content_type="application/json")


def _rk_headers(run: LiveRun, seq: int, cost: Decimal | None = None) -> dict[str, str]:
    g = run.governor
    headers = {
        "X-RiskKernel-Run-Id": run.id,
        "X-RiskKernel-Call": str(seq),
        "X-RiskKernel-Run-Cost-Usd": usd(g.spent.cost),
    }
    if g.remaining_cost is not None:
        headers["X-RiskKernel-Remaining-Usd"] = usd(g.remaining_cost)
    if cost is not None:
        headers["X-RiskKernel-Cost-Usd"] = usd(cost)
    if g.halt_reason is not None:
        headers["X-RiskKernel-Halt-Reason"] = str(g.halt_reason)
    return headers


def _refusal(provider: Provider, reason: str, message: str, headers: dict[str, str]) -> web.Response:
    """A 402: a budget refusal or a halted run (`BUDGET`), or a call rk will not forward (`REFUSED`)."""
    kind = ErrorKind.BUDGET if reason in (*HaltReason, Refusal.INSUFFICIENT_BUDGET) else ErrorKind.REFUSED
    body = provider.error_body(message, kind, str(reason))
    return _json_response(402, body, {**headers, "x-should-retry": "false"})


async def _rates(prices: PriceBook, model: str, provider: str, tier: str | None) -> Rates | None:
    rates = prices.cached(model, provider, tier)
    if rates is MISSING:
        rates = await asyncio.get_running_loop().run_in_executor(None, prices.resolve, model, provider, tier)
        # The price data now loaded lives as long as the process: keep its objects out of the cyclic GC's
        # full collections, which would otherwise pause the proxy for tens of milliseconds now and then.
        gc.freeze()
    return rates  # type: ignore[return-value]


class _Call:
    """One admitted-or-refused call on its way through the proxy: what it records, how it answers."""

    def __init__(
        self, proxy: Proxy, run: LiveRun, endpoint: Endpoint, request: web.Request, req: Request, rates: Rates | None
    ):
        self.proxy = proxy
        self.run = run
        self.endpoint = endpoint
        self.request = request
        self.req = req
        self.rates = rates
        self.seq = self.run.next_seq()
        self.started = time.monotonic()
        self.started_at = now_iso()
        self.ttfb_ms: float | None = None
        self.live = LiveCall()
        self.strict = run.governor.budget.strict
        # Its worst case: all the input it can be (under --strict, the bound; else the estimate) and all the
        # output it may ask for, per completion: its own limit, else its model's.
        self.limit = output_limit(req.model) if req.max_output_tokens is None else req.max_output_tokens
        self.worst = self._worst(self.limit)
        self.reserved: Decimal | None = None  # what it was admitted or refused against
        self.clamped: int | None = None  # the output limit rk set on it (under --strict)
        self.meter: StreamMeter | None = None  # once a streamed answer is being metered
        self.stream: web.StreamResponse | None = None  # once a streamed answer has begun
        self.recorded = False

    def rk_headers(self, cost: Decimal | None = None) -> dict[str, str]:
        return _rk_headers(self.run, self.seq, cost)

    def _worst(self, limit: int) -> Usage:
        req = self.req
        input_tokens = req.input_bound if self.strict else req.input_tokens
        return Usage(input_tokens=input_tokens, output_tokens=limit * req.choices)

    def _worst_cost(self, worst: Usage) -> Decimal:
        if self.rates is None:
            return ZERO
        if not self.strict:
            return self.rates.cost(worst)
        fixed, per_output = self.rates.worst_case(worst.input_tokens, self.req.cache_writes)
        return fixed + worst.output_tokens * per_output

    def admit(self) -> Ticket | Refused:
        """Reserve the call's worst case in its run, or be refused. Under --strict, a call whose worst case
        does not fit what is left is first given the output limit the rest can pay for (not below
        STRICT_MIN_OUTPUT), in the request field the provider reads."""
        req, governor = self.req, self.run.governor
        limit = self.limit
        if self.strict and req.output_field is not None and limit:
            fits = self._fitting_output(governor.room())
            if fits is not None and STRICT_MIN_OUTPUT <= fits < limit:
                limit = fits
        worst = self._worst(limit) if limit != self.limit else self.worst
        estimate = Spend(self._worst_cost(worst), worst.total_tokens, 1)
        self.reserved = estimate.cost
        admitted = governor.admit(estimate)
        if isinstance(admitted, Ticket) and limit != self.limit:
            assert req.output_field is not None
            req.body = set_top_level(req.body, req.output_field, limit)
            req.max_output_tokens = self.clamped = limit
            self.worst = worst
        return admitted

    def _fitting_output(self, room: tuple[Decimal | None, int | None]) -> int | None:
        """The most output tokens per completion the call can have and still fit `room` (None: no limit)."""
        req = self.req
        cost_room, token_room = room
        fits: list[int] = []
        if cost_room is not None and self.rates is not None:
            fixed, per_output = self.rates.worst_case(req.input_bound, req.cache_writes)
            if per_output > 0:
                fits.append(int((cost_room - fixed) / (per_output * req.choices)))
        if token_room is not None:
            fits.append((token_room - req.input_bound) // req.choices)
        return min(fits) if fits else None

    def mark_first_byte(self) -> None:
        if self.ttfb_ms is None:
            self.ttfb_ms = (time.monotonic() - self.started) * 1000

    def row(
        self,
        status: int,
        *,
        usage: Usage = Usage(),  # noqa: B008 - immutable
        cost: Decimal = ZERO,
        model: str | None = None,
        source: str | None = None,
        flags: tuple[str, ...] = (),
        error: str | None = None,
        cache_savings: Decimal = ZERO,
    ) -> CallRecord:
        return CallRecord(
            run_id=self.run.id,
            seq=self.seq,
            started_at=self.started_at,
            endpoint=self.endpoint.path,
            provider=self.endpoint.provider.name,
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
            cache_savings=cache_savings,
            reserved=self.reserved,
            output_limit=self.clamped,
        )

    async def record(self, status: int, finish_reasons: Sequence[str] = (), **row: Any) -> None:
        """Commit the call's row; returns once it is committed (or known to be lost, and logged)."""
        self.recorded = True
        record = self.row(status, **row)
        await _commit(self.run, record)
        telemetry = self.proxy.telemetry
        if telemetry is not None:
            upstream = self.proxy.upstreams[self.endpoint.provider.name]
            telemetry.call_recorded(
                record, self.started, self.req, self.run.governor, self.request.headers, upstream, finish_reasons
            )

    async def refuse(self, reason: str, message: str) -> web.Response:
        await self.record(402, flags=(Flag.REFUSED,), error=str(reason))
        return _refusal(self.endpoint.provider, reason, message, self.rk_headers())

    async def settle(
        self,
        ticket: Ticket,
        status: int,
        metered: Metered,
        *,
        billed: bool = True,
        estimated: bool = False,
        cut: HaltReason | None = None,
        error: str | None = None,
    ) -> Decimal:
        """Charge the call to the run, then record it. Usage the upstream did not report is estimated from
        the request and the output seen (`estimated` says the usage given is itself an estimate), unless
        the call cannot have been billed (`billed=False`)."""
        flags: list[str] = []
        req = self.req
        if metered.usage is not None:
            usage = metered.usage
        elif not billed:
            usage = Usage()
        else:
            usage = Usage(input_tokens=req.input_tokens, output_tokens=estimate_tokens(metered.output_chars))
            estimated = True
        if estimated:
            flags.append(Flag.ESTIMATED)
        if self.clamped is not None:
            flags.append(Flag.CLAMPED)
        served = metered.model or req.model
        rates = self.rates
        tier = metered.service_tier if metered.service_tier != "default" else None
        if served != req.model or (metered.service_tier != req.service_tier and tier != req.service_tier):
            rates = await _rates(self.proxy.prices, served, self.endpoint.provider.name, tier) or rates
        savings = ZERO
        if rates is None:
            cost, source = ZERO, None
            flags.append(Flag.UNPRICED)
        else:
            cost, source = rates.cost(usage), rates.source
            if usage.cached_input_tokens:  # what the same input would have cost uncached
                savings = rates.cost(usage._replace(cached_input_tokens=0)) - cost
        if cut is not None:
            flags.append(Flag.CUT)
            error = f"cut: {cut}"
        elif error is None and metered.error is not None:
            error = f"upstream: {metered.error}"
        self.run.settle(ticket, cost, usage.total_tokens)
        await self.record(
            status,
            metered.finish_reasons,
            usage=usage,
            cost=cost,
            model=served,
            source=source,
            flags=tuple(flags),
            error=None if error is None else redact(_scrub(error, self.request.headers)),
            cache_savings=savings,
        )
        return cost

    def spent_so_far(self) -> Metered:
        """For a call that ends abnormally: what its stream used so far, else its reservation, as an estimate.
        A detached generation goes on after its stream ends: it is charged its reservation."""
        if self.meter is None or self.req.detached:
            return Metered(usage=self.worst)
        metered = self.meter.result()
        return replace(metered, usage=_so_far(metered, self.req))


async def _forward_in(request: web.Request, endpoint: Endpoint, run: LiveRun) -> web.StreamResponse:
    proxy = request.app[PROXY]
    try:
        client_body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        message = f"rk: the request body is larger than the {MAX_BODY // 2**20} MiB rk accepts"
        return _json_response(413, endpoint.error_body(message, ErrorKind.TOO_LARGE, "request_too_large"))
    try:
        req = endpoint.parse(client_body)
    except ValueError as exc:
        return _json_response(400, endpoint.error_body(str(exc), ErrorKind.INVALID, "invalid_request"))

    rates = await _rates(proxy.prices, req.model, endpoint.provider.name, req.service_tier)
    call = _Call(proxy, run, endpoint, request, req, rates)
    governor = run.governor
    run.check_time()
    if governor.budget.max_repeats is not None and governor.halt_reason is None:
        run.seen(subject(req))
    req.parsed = None  # all rk needs of it is taken
    if governor.halt_reason is not None:
        return await call.refuse(governor.halt_reason, governor.message(governor.halt_reason))
    if rates is None and governor.budget.max_cost is not None and not proxy.allow_unpriced:
        return await call.refuse(Refusal.UNPRICED_MODEL, _unpriced_message(req.model, run.id))
    if req.detached and governor.budget.max_cost is not None and not proxy.allow_unmetered:
        return await call.refuse(Refusal.UNMETERED_ENDPOINT, _detached_message(run.id))
    if run.ledger.failure is not None:
        message = _ledger_message(run.ledger.failure)
        await call.record(503, flags=(Flag.REFUSED,), error=Refusal.LEDGER_UNAVAILABLE)
        return _unavailable(endpoint.provider, message, call.rk_headers())
    admitted = call.admit()
    while isinstance(admitted, Refused) and admitted.may_fit_later:
        try:
            await run.room_freed()  # rather than fail a call that calls in flight may leave room for
        except asyncio.CancelledError:  # the client gave up waiting, or rk is stopping: never sent, no cost
            await call.record(499, flags=(Flag.REFUSED,), error="client disconnected while waiting for room")
            raise
        run.check_time()
        admitted = call.admit()
    if isinstance(admitted, Refused):
        return await call.refuse(admitted.reason, admitted.message)

    run.calls.add(call.live)
    try:
        return await _exchange(call, admitted)
    except asyncio.CancelledError:  # the client went away (aiohttp cancels its handler), or rk is stopping
        if not admitted.settled:
            await call.settle(admitted, 499, call.spent_so_far(), estimated=True, error="client disconnected")
        raise
    except Exception as exc:  # a bug in rk: the client gets an error in its provider's shape, the call a row
        log.exception("rk: internal error in call %s of run %s", call.seq, run.id)
        error = f"rk internal error: {type(exc).__name__}"
        if not call.recorded:
            status = 200 if call.stream is not None else 500
            await call.settle(admitted, status, call.spent_so_far(), estimated=True, error=error)
        message = f"{error} (the call was charged what it used, or its reservation)"
        if call.stream is not None:  # the answer has begun: end it with an error event the SDK raises on
            with contextlib.suppress(ConnectionError, aiohttp.ClientConnectionResetError):
                await call.stream.write(endpoint.stream_error(message, ErrorKind.INTERNAL, "rk_error"))
                await call.stream.write_eof()
            return call.stream
        body = endpoint.error_body(message, ErrorKind.INTERNAL, "rk_error")
        return _json_response(500, body, {**call.rk_headers(), "x-should-retry": "false"})
    finally:
        run.calls.discard(call.live)


async def _commit(run: LiveRun, row: CallRecord) -> None:
    """Commit a call's row. One the ledger cannot take is not lost: it goes to the log, whole, with why; and
    while the ledger fails, rk refuses calls (see `_unavailable`) rather than forward what it cannot record."""
    try:
        await run.ledger.commit(insert_call(row))
    except LedgerError as exc:
        row_json = json.dumps({"run_id": row.run_id, **row.to_json()})
        log.error("rk: %s — the call's row, not in the ledger: %s", exc, row_json)


_CREDENTIAL_HEADERS = ("Authorization", "x-api-key", "api-key", "x-goog-api-key")


def _scrub(text: str, headers: CIMultiDictProxy[str]) -> str:
    """`text` (an upstream's error, say) without the credentials the request carried, whatever their shape:
    `redact` knows the common key formats, this knows the very keys."""
    for name in _CREDENTIAL_HEADERS:
        for value in headers.getall(name, ()):
            scheme, _, token = value.partition(" ")
            secret = token.strip() if scheme.lower() == "bearer" else value.strip()
            if len(secret) >= 8:
                text = text.replace(secret, "…")
    return text


def _ledger_message(failure: LedgerError) -> str:
    return f"rk: {failure} — rk forwards no call it cannot record, so this one was not sent"


def _unavailable(provider: Provider, message: str, headers: dict[str, str] | None = None) -> web.Response:
    """A 503: rk cannot record calls now. The SDKs retry it after a pause, which a ledger that was only
    locked for a moment survives; one that stays unwritable makes them raise this message."""
    body = provider.error_body(message, ErrorKind.UNAVAILABLE, Refusal.LEDGER_UNAVAILABLE)
    return _json_response(503, body, headers)


def _detached_message(run_id: str) -> str:
    return (
        "rk: a background response runs on at the provider after rk has answered or cut it, so its cost could"
        f" not count against the cost budget — let it through with --allow-unmetered (run {run_id[:8]}…)"
    )


def _unpriced_message(model: str, run_id: str) -> str:
    return f"rk: no price is known for model {model!r} — {how_to_price(model)} (run {run_id[:8]}…)"


def _without(headers: CIMultiDictProxy[str], drop: frozenset[str]) -> CIMultiDict[str]:
    """A copy without hop-by-hop headers (and those the Connection header names) and rk's own."""
    named = headers.get("Connection")
    if named:
        drop = drop.union(n.strip().lower() for n in named.split(","))
    out = CIMultiDict(headers)  # copied in C; then only the names present that must go are dropped
    for name in {name for name in headers if (low := name.lower()) in drop or low.startswith(_RK_PREFIX)}:
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
# Failures before the request could have reached the provider: such a call cannot have been billed.
_NOT_SENT = (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError, aiohttp.InvalidURL)


async def _exchange(call: _Call, ticket: Ticket) -> web.StreamResponse:
    proxy, endpoint, req = call.proxy, call.endpoint, call.req
    provider = endpoint.provider
    base = proxy.upstreams[provider.name]
    url = provider.upstream_url(base, client_path(call.request, raw=True))
    session = call.request.app[SESSION]
    # aiohttp writes a large body in slices, yielding to the loop between them, only from a file object.
    data = req.body if len(req.body) <= 2**20 else io.BytesIO(req.body)
    headers = _upstream_headers(call.request.headers)
    try:
        call.live.connecting = asyncio.current_task()
        call.live.wait()
        try:
            upstream = await session.post(
                url, data=data, headers=headers, allow_redirects=False, proxy=proxy.http_proxies[provider.name]
            )
        finally:
            call.live.connecting = None  # from here on, a cut closes the upstream response instead
    except _UPSTREAM_ERRORS as exc:
        failure = _failure(exc, proxy, f"could not reach {base}")
        return await _upstream_failed(call, ticket, failure, billed=not isinstance(exc, _NOT_SENT))
    except asyncio.CancelledError:
        if call.live.cut_reason is None and not call.live.timed_out:
            raise  # neither rk's cut nor its read timeout: the client went away, or rk is stopping
        asyncio.current_task().uncancel()  # type: ignore[union-attr]
        return await _upstream_failed(call, ticket, _silence(proxy) if call.live.timed_out else _Failure(502, ""))
    call.live.upstream = upstream
    try:
        if call.live.cut_reason is not None:  # cut while the request was on its way
            upstream.close()
        is_stream = upstream.content_type == "text/event-stream" and upstream.status < 300
        if is_stream:
            return await _relay_stream(call, ticket, upstream)
        return await _relay_whole(call, ticket, upstream)
    except BaseException:
        upstream.close()  # whatever went wrong, stop the generation and the billing at once
        raise
    finally:
        upstream.release()


@dataclass(frozen=True, slots=True)
class _Failure:
    """How an upstream failed, for the client and the ledger: 504 if it timed out, else 502."""

    status: int
    problem: str

    def code(self, stream: bool = False) -> str:
        if self.status == 504:
            return "upstream_timeout"
        return "upstream_stream_broken" if stream else "upstream_unreachable"

    @property
    def message(self) -> str:
        return f"rk: upstream failed — {self.problem}"


def _failure(exc: BaseException, proxy: Proxy, what: str, live: LiveCall | None = None) -> _Failure:
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return _Failure(504, f"{what}: no connection within {_seconds(proxy.connect_timeout)} (--connect-timeout)")
    if isinstance(exc, TimeoutError) or (live is not None and live.timed_out):
        return _silence(proxy)
    if isinstance(exc, aiohttp.ClientPayloadError | aiohttp.ServerDisconnectedError):
        # (aiohttp's own words for these are about its parser, not about what happened)
        return _Failure(502, f"{what}: the upstream closed the connection before the end")
    return _Failure(502, redact(f"{what}: {exc or type(exc).__name__}"))


def _silence(proxy: Proxy) -> _Failure:
    return _Failure(504, f"the upstream sent nothing for {_seconds(proxy.read_timeout)} (--read-timeout)")


def _seconds(seconds: float | None) -> str:
    return f"{seconds:g}s" if seconds is not None else "ever"


async def _upstream_failed(call: _Call, ticket: Ticket, failure: _Failure, billed: bool = True) -> web.Response:
    """The upstream could not be reached, broke off or fell silent: 502 or 504 in the provider's shape, or
    402 if rk cut it.

    What it is charged: nothing if the request cannot have reached the provider; what it reserved if rk cut
    it or the upstream fell silent, since the provider may bill a generation rk did not wait for; else (the
    connection broke) its input, as an estimate: a flaky network must not drain a budget by worst cases."""
    reason = call.live.cut_reason
    if reason is not None:
        await call.settle(ticket, 402, Metered(usage=call.worst), estimated=True, cut=reason)
        return _refusal(call.endpoint.provider, reason, call.live.why(call.run.governor), call.rk_headers())
    silent = billed and failure.status == 504
    metered = Metered(usage=call.worst) if silent else Metered()
    await call.settle(ticket, failure.status, metered, billed=billed, estimated=silent, error=failure.problem)
    body = call.endpoint.error_body(failure.message, ErrorKind.UPSTREAM, failure.code())
    return _json_response(failure.status, body, call.rk_headers())


async def _relay_whole(call: _Call, ticket: Ticket, upstream: aiohttp.ClientResponse) -> web.StreamResponse:
    call.mark_first_byte()
    try:
        payload = await upstream.read()
    except _UPSTREAM_ERRORS as exc:
        return await _upstream_failed(call, ticket, _failure(exc, call.proxy, "the response broke off", call.live))
    finally:
        call.live.waiting = None
    metered = call.endpoint.meter(payload) if payload else Metered()
    if upstream.status < 400 and metered.usage is None and metered.error is None and not _json_object(payload):
        metered = replace(metered, error="the response body is not a JSON object")  # why its usage is estimated
    estimated = False
    if call.req.detached and metered.usage is None and upstream.status < 400:
        # Queued, not done: the answer has no usage yet, and rk will not see it when it has. Charge the
        # reservation; the generation's real cost is only in the provider's bill.
        metered, estimated = replace(metered, usage=call.worst), True
    cost = await call.settle(ticket, upstream.status, metered, billed=upstream.status < 400, estimated=estimated)
    return web.Response(status=upstream.status, body=payload, headers=_client_headers(upstream, call.rk_headers(cost)))


def _json_object(payload: bytes) -> bool:
    try:
        return isinstance(json.loads(payload), dict)
    except (ValueError, RecursionError):
        return False


class _ClientGone(Exception):
    pass


async def _relay_stream(call: _Call, ticket: Ticket, upstream: aiohttp.ClientResponse) -> web.StreamResponse:
    req, endpoint, run = call.req, call.endpoint, call.run
    response = web.StreamResponse(status=upstream.status, headers=_client_headers(upstream, call.rk_headers()))
    try:
        await response.prepare(call.request)
    except (ConnectionError, aiohttp.ClientConnectionResetError):  # the client hung up before the answer began
        upstream.close()
        await call.settle(ticket, 499, call.spent_so_far(), estimated=True, error="client disconnected")
        return response
    call.stream = response
    call.live.streaming = True
    if run.governor.halt_reason is not None:  # the run halted while this call waited for its answer to begin
        call.live.cut(run.governor.halt_reason)

    live = call.live

    async def send(data: bytes) -> None:
        live.waiting = None  # (a client slow to take it is not the upstream's silence)
        try:
            await response.write(data)
        except (ConnectionError, aiohttp.ClientConnectionResetError) as exc:
            raise _ClientGone from exc
        live.wait()

    decoder = SSEDecoder()
    meter = call.meter = endpoint.stream_meter(req)
    held: list[bytes] = []  # from the end of generation on, released once the call's row is committed
    held_size = 0
    last = False  # the protocol's last event has come: nothing more to read
    problem: _Failure | None = None
    client_gone = False
    watched = run.governor.watches_spend  # else a running cost would be worked out for nothing
    try:
        async for chunk in upstream.content.iter_any():
            call.mark_first_byte()
            out = []
            for data, position in meter_chunk(decoder, meter, chunk):
                if position is Position.MORE and not held:
                    if data:
                        out.append(data)
                    continue
                held.append(data)
                held_size += len(data)
                last = last or position is Position.LAST
            if not held:  # generation goes on: meter it, and cut it before it sends output past a cap
                if watched:
                    cost, tokens = _running(meter.result(), req, call.rates)
                    run.progress(ticket, cost, tokens)
                if live.cut_reason is not None:
                    break
            if out:
                await send(b"".join(out))
            if len(decoder) + held_size > MAX_EVENT:
                problem = _Failure(502, f"the stream sent more than {MAX_EVENT // 2**20} MiB in one event")
                break
            if last:
                break  # do not wait for the upstream to close: the client has all there is
        else:  # the upstream ended its body
            tail, final = decoder.flush()
            position = meter.feed(final)[1] if final is not None else Position.MORE
            if held or position is not Position.MORE:
                if tail and held:
                    held.append(tail)
                elif tail:
                    await send(tail)
            elif call.live.cut_reason is None:
                # Before the protocol's end: a partial answer must not pass for a whole one. The unterminated
                # tail is dropped, as SSE clients drop it, so that the error event after it parses.
                problem = _Failure(502, "the stream ended before its last event")
    except _ClientGone:
        client_gone = True
    except _UPSTREAM_ERRORS as exc:
        if live.cut_reason is None and not held:
            problem = _failure(exc, call.proxy, "the stream broke off")
    live.waiting = None
    if live.timed_out and not held:
        problem = _silence(call.proxy)
    cut = live.cut_reason if not held else None  # a stream the upstream finished is delivered whole
    if not (last or upstream.content.at_eof()):
        upstream.close()  # stop the generation, and the billing, at once
    metered = meter.result()
    finished = held and metered.error is None  # its usage is final; else, what it used so far, estimated
    if not finished:
        metered = call.spent_so_far()
    if client_gone:  # 499, as when the client is gone before the answer begins or while it waits for it
        await call.settle(ticket, 499, metered, estimated=not finished, error="client disconnected")
        return response
    error = problem.problem if problem is not None else None
    await call.settle(ticket, upstream.status, metered, estimated=not finished, cut=cut, error=error)
    if cut is not None:
        tail = endpoint.stream_error(call.live.why(run.governor), ErrorKind.BUDGET, str(cut))
    elif problem is not None:
        tail = endpoint.stream_error(problem.message, ErrorKind.UPSTREAM, problem.code(stream=True))
    else:
        tail = b"".join(held)
    with contextlib.suppress(ConnectionError, aiohttp.ClientConnectionResetError):
        await response.write_eof(tail)  # (with the end of the body, in one write)
    if last and not upstream.content.at_eof():
        # The client has it all. Read the upstream's close (normally already here) so that its connection
        # can serve the next call, but give up on one that lingers after its last event.
        with contextlib.suppress(asyncio.TimeoutError, *_UPSTREAM_ERRORS):
            await asyncio.wait_for(upstream.content.read(), LINGER)
    return response


def _so_far(metered: Metered, req: Request) -> Usage:
    """What a stream has used so far: its reported usage where it has any (Anthropic reports the input at
    the start), with output at least what the text seen amounts to (but no more than the request's output
    limit, which the provider never bills past); else the request's estimate."""
    output = estimate_tokens(metered.output_chars)
    if req.max_output_tokens is not None:
        output = min(output, req.max_output_tokens * req.choices)
    reported = metered.usage
    if reported is None:
        return Usage(input_tokens=req.input_tokens, output_tokens=output)
    return reported._replace(output_tokens=max(reported.output_tokens, output))


def _running(metered: Metered, req: Request, rates: Rates | None) -> tuple[Decimal, int]:
    usage = _so_far(metered, req)
    return (rates.cost(usage) if rates else ZERO), usage.total_tokens


async def _free(request: web.Request) -> web.StreamResponse:
    return await _pass_through(request, free=True)


async def _unmetered(request: web.Request) -> web.StreamResponse:
    return await _pass_through(request, free=False)


async def _pass_through(request: web.Request, *, free: bool) -> web.StreamResponse:
    """Forward a call rk does not meter, streamed both ways, and record it as unmetered. A call that is not
    free is refused while a cost budget is set, unless `--allow-unmetered`: its spend could not count."""
    provider = provider_for(client_path(request), request.headers)
    run = _dotted(request) or await _resolve(request, provider)
    if not isinstance(run, LiveRun):
        return run
    try:
        return await _pass_through_in(request, provider, run, free)
    finally:
        await request.app[PROXY].runs.release(run)


async def _pass_through_in(request: web.Request, provider: Provider, run: LiveRun, free: bool) -> web.StreamResponse:
    proxy = request.app[PROXY]
    seq = run.next_seq()
    started, started_at = time.monotonic(), now_iso()

    async def record(status: int, flags: tuple[str, ...], error: str | None = None) -> None:
        row = CallRecord(
            run_id=run.id,
            seq=seq,
            started_at=started_at,
            endpoint=client_path(request),
            provider=provider.name,
            requested_model=None,
            model=None,
            stream=False,
            status=status,
            flags=flags,
            latency_ms=(time.monotonic() - started) * 1000,
            error=error,
        )
        await _commit(run, row)

    governor = run.governor
    run.check_time()
    reason: str | None = None
    message = ""
    if governor.halt_reason is not None:
        reason, message = governor.halt_reason, governor.message(governor.halt_reason)
    elif not free and governor.budget.max_cost is not None and not proxy.allow_unmetered:
        reason, message = Refusal.UNMETERED_ENDPOINT, _unmetered_message(request, run.id)
    if reason is not None:
        await record(402, (Flag.REFUSED,), reason)
        return _refusal(provider, reason, message, _rk_headers(run, seq))
    if run.ledger.failure is not None:
        message = _ledger_message(run.ledger.failure)
        await record(503, (Flag.REFUSED,), Refusal.LEDGER_UNAVAILABLE)
        return _unavailable(provider, message, _rk_headers(run, seq))

    url = provider.upstream_url(proxy.upstreams[provider.name], client_path(request, raw=True))
    headers = _upstream_headers(request.headers)
    if request.content_length is not None:  # sent as the client sent it, not re-chunked
        headers["Content-Length"] = str(request.content_length)
    live = LiveCall()  # a kill or the end of the time budget cuts it too
    run.calls.add(live)
    status: int = 499
    error: str | None = "client disconnected"  # unless it gets further
    try:
        try:
            live.connecting = asyncio.current_task()
            live.wait()
            try:
                upstream = await request.app[SESSION].request(
                    request.method,
                    url,
                    data=request.content if request.can_read_body else None,
                    headers=headers,
                    allow_redirects=False,
                    proxy=proxy.http_proxies[provider.name],
                )
            finally:
                live.connecting = None
        except (*_UPSTREAM_ERRORS, asyncio.CancelledError) as exc:
            if isinstance(exc, asyncio.CancelledError):
                if live.cut_reason is None and not live.timed_out:
                    raise  # the client went away, or rk is stopping
                asyncio.current_task().uncancel()  # type: ignore[union-attr]
                if live.cut_reason is not None:
                    status, error = 402, f"cut: {live.cut_reason}"
                    return _refusal(provider, live.cut_reason, live.why(governor), _rk_headers(run, seq))
            failure = _failure(exc, proxy, f"could not reach {proxy.upstreams[provider.name]}", live)
            status, error = failure.status, failure.problem
            body = provider.error_body(failure.message, ErrorKind.UPSTREAM, failure.code())
            return _json_response(status, body, _rk_headers(run, seq))
        live.upstream = upstream
        try:
            status, error = upstream.status, None
            headers = _client_headers(upstream, _rk_headers(run, seq))
            response = web.StreamResponse(status=upstream.status, headers=headers)
            await response.prepare(request)
            try:
                async for chunk in upstream.content.iter_any():
                    live.waiting = None  # (a client slow to take it is not the upstream's silence)
                    await response.write(chunk)
                    live.wait()
            except (ConnectionError, aiohttp.ClientConnectionResetError, asyncio.CancelledError) as exc:
                error = "client disconnected"
                if isinstance(exc, asyncio.CancelledError):
                    raise
            except _UPSTREAM_ERRORS as exc:
                error = _failure(exc, proxy, "the body broke off").problem
            live.waiting = None
            if live.cut_reason is not None:
                error = f"cut: {live.cut_reason}"
            elif live.timed_out:
                error = _silence(proxy).problem
            if error is None:
                with contextlib.suppress(ConnectionError, aiohttp.ClientConnectionResetError):
                    await response.write_eof()
            elif request.transport is not None:
                request.transport.abort()  # so that the client sees the body is incomplete
            return response
        finally:
            if error is not None:
                upstream.close()  # stop the upstream at once
            upstream.release()
    finally:
        run.calls.discard(live)
        await record(status, (Flag.UNMETERED,), error)


def _unmetered_message(request: web.Request, run_id: str) -> str:
    return (
        f"rk: {request.method} {client_path(request)} is not metered by rk, so its cost could not count against the"
        f" cost budget — let it through with --allow-unmetered (run {run_id[:8]}…)"
    )
