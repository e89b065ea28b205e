"""OpenTelemetry export: a span per run, a span per call under it, and GenAI metrics, over OTLP/HTTP.

All of rk's OpenTelemetry knowledge is here, and this module is imported only when export is on (`--otel`,
or an OTLP endpoint in the environment: `config.otel_wanted`), so a run without it never loads OpenTelemetry.

- Call spans follow the OpenTelemetry GenAI semantic conventions: CLIENT spans named "{gen_ai.operation.name}
  {gen_ai.request.model}" with `gen_ai.*`, `server.*` and `error.type` attributes, and rk's own under
  `riskkernel.*`; never a prompt or a completion. docs/observability.md lists them all.
- A call's span is made after the fact, from its ledger row, with the call's own start and end: nothing of
  OpenTelemetry runs while a call is in flight, and its span and metrics are built on the event loop's turn
  after its row is committed, once its answer is on its way to the client.
- A call whose request carries a W3C `traceparent` joins that trace (and links to its run's span); any other
  is a child of its run's span. `rk run` hands its run span's context to the agent as TRACEPARENT.
- Spans and metrics are exported in batches on the SDK's own threads. A collector that cannot be reached
  costs one line on stderr, never a failed or slower call, and at most SHUTDOWN_WAIT seconds at exit.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from riskkernel import __version__
from riskkernel.config import OTEL_ENDPOINTS
from riskkernel.errors import RkError
from riskkernel.models import CallRecord, Flag, HaltReason

if TYPE_CHECKING:
    from riskkernel.governor import Governor
    from riskkernel.providers import Request
    from riskkernel.proxy.run import LiveRun

SHUTDOWN_WAIT = 1.0  # seconds rk waits at exit for what is left to export
SERVICE_NAME = "riskkernel"  # unless OTEL_SERVICE_NAME or OTEL_RESOURCE_ATTRIBUTES say otherwise
RUN_SPAN = "rk run"
# The GenAI operation of each metered route; for OpenAI's two chat APIs, which one it is (`openai.api.type`).
OPERATIONS = {
    "/v1/chat/completions": "chat",
    "/v1/responses": "chat",
    "/v1/completions": "text_completion",
    "/v1/embeddings": "embeddings",
    "/v1/messages": "chat",
}
OPENAI_API_TYPES = {"/v1/chat/completions": "chat_completions", "/v1/responses": "responses"}
# The conventions' bucket boundaries for the two GenAI histograms.
TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864)
DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)

_PROPAGATOR = TraceContextTextMapPropagator()


@dataclass(frozen=True, slots=True)
class _Run:
    span: Span
    context: Context  # the run span's: its calls' parent
    labels: dict[str, str]  # the run's name and tags, on its cost and halt metrics


@dataclass(frozen=True, slots=True)
class _Ended:
    """A call as recorded, and what its span needs that its row does not keep, taken when it was recorded."""

    row: CallRecord
    start: int  # when the call began, in ns since the epoch
    upstream: str
    max_tokens: int | None
    choices: int
    finish_reasons: tuple[str, ...]
    remaining: Decimal | None
    halt: HaltReason | None
    traceparent: str | None
    tracestate: str | None


class Telemetry:
    """Where rk's spans and metrics go: one per `rk run` or `rk serve` process."""

    def __init__(self, tracer_provider: TracerProvider, meter_provider: MeterProvider) -> None:
        self.tracer_provider = tracer_provider
        self.meter_provider = meter_provider
        self.tracer = tracer_provider.get_tracer("riskkernel", __version__)
        meter = meter_provider.get_meter("riskkernel", __version__)
        self.tokens = meter.create_histogram(
            "gen_ai.client.token.usage", unit="{token}", description="Number of input and output tokens used."
        )
        self.duration = meter.create_histogram(
            "gen_ai.client.operation.duration", unit="s", description="GenAI operation duration."
        )
        self.cost = meter.create_counter(
            "riskkernel.cost_usd", unit="{USD}", description="What rk charged the calls, in US dollars."
        )
        self.halts = meter.create_counter("riskkernel.halts", unit="{halt}", description="Runs rk halted.")
        self.runs: dict[str, _Run] = {}
        self._servers: dict[str, tuple[str, int]] = {}  # upstream base URL -> (server.address, server.port)

    # -- runs ------------------------------------------------------------------------------------------

    def run_started(self, run: LiveRun, traceparent: str | None = None, tracestate: str | None = None) -> None:
        """Open the run's span (a child of `traceparent`, if given) and count its halts."""
        record = run.record
        labels = {f"riskkernel.run.tag.{key}": value for key, value in record.tags.items()}
        if record.name:
            labels["riskkernel.run.name"] = record.name
        budget = {
            f"riskkernel.budget.{key}": float(value) if key == "max_cost_usd" else value
            for key, value in record.budget.to_json().items()
            if value is not None and value is not False
        }
        attributes = {"riskkernel.run.id": run.id, **labels, **budget}
        span = self.tracer.start_span(RUN_SPAN, _remote(traceparent, tracestate), attributes=attributes)
        self.runs[run.id] = _Run(span, trace.set_span_in_context(span), labels)
        run.halt_listeners.append(functools.partial(self._halted, run.id))

    def _halted(self, run_id: str, reason: HaltReason) -> None:
        state = self.runs.get(run_id)
        if state is None:
            return
        state.span.add_event("riskkernel.halt", {"riskkernel.halt_reason": str(reason)})
        self.halts.add(1, {"riskkernel.halt_reason": str(reason), **state.labels})

    def trace_env(self, run_id: str, env: dict[str, str]) -> None:
        """Give a child the run span's context (TRACEPARENT, TRACESTATE), for a child that reads them."""
        carrier: dict[str, str] = {}
        _PROPAGATOR.inject(carrier, self.runs[run_id].context)
        for name in ("traceparent", "tracestate"):
            if name in carrier:
                env[name.upper()] = carrier[name]
            else:
                env.pop(name.upper(), None)

    def run_ended(self, run: LiveRun, status: str, exit_status: int | None = None) -> None:
        state = self.runs.pop(run.id, None)
        if state is None:
            return
        governor = run.governor
        spent = governor.spent
        span = state.span
        span.set_attributes(
            {
                "riskkernel.run.status": str(status),
                "riskkernel.cost_usd": float(spent.cost),
                "riskkernel.run.calls": spent.calls,
                "riskkernel.run.tokens": spent.tokens,
            }
        )
        if exit_status is not None:
            span.set_attribute("riskkernel.exit_status", exit_status)
        if governor.halt_reason is not None:
            span.set_attribute("riskkernel.halt_reason", str(governor.halt_reason))
            span.set_status(Status(StatusCode.ERROR, governor.message(governor.halt_reason)))
        span.end()

    # -- calls -----------------------------------------------------------------------------------------

    def call_recorded(
        self,
        row: CallRecord,
        started: float,
        req: Request,
        governor: Governor,
        headers: Mapping[str, str],
        upstream: str,
        finish_reasons: Sequence[str],
    ) -> None:
        """A metered call's row is recorded (it began at `started`, monotonic): its span and metrics are made on
        the loop's next turn, once its answer is on its way to the client."""
        began = time.time_ns() - round((time.monotonic() - started) * 1e9)
        ended = _Ended(
            row,
            began,
            upstream,
            req.max_output_tokens or None,  # (0: a request without output, like embeddings)
            req.choices,
            tuple(finish_reasons),
            governor.remaining_cost,
            governor.halt_reason,
            headers.get("traceparent"),
            headers.get("tracestate"),
        )
        asyncio.get_running_loop().call_soon(self._export_call, ended)

    def _export_call(self, ended: _Ended) -> None:
        row = ended.row
        refused = Flag.REFUSED in row.flags
        operation = OPERATIONS[row.endpoint]
        address, port = self._server(ended.upstream)
        common: dict[str, Any] = {
            "gen_ai.operation.name": operation,
            "gen_ai.provider.name": row.provider,
            "gen_ai.request.model": row.requested_model,
            "server.address": address,
            "server.port": port,
        }
        if not refused and row.status < 400 and row.model:
            common["gen_ai.response.model"] = row.model
        error = _error_type(row)
        attributes = {**common, **self._call_attributes(ended, refused)}
        if error is not None:
            attributes["error.type"] = error

        state = self.runs.get(row.run_id)
        parent = _remote(ended.traceparent, ended.tracestate)
        links: list[Link] = []
        if parent is None and state is not None:
            parent = state.context
        elif state is not None:  # it joins the agent's trace; its run's span is one link away
            links.append(Link(state.span.get_span_context()))
        name = f"{operation} {row.requested_model}"
        span = self.tracer.start_span(
            name, parent, kind=SpanKind.CLIENT, attributes=attributes, links=links, start_time=ended.start
        )
        if error is not None:
            span.set_status(Status(StatusCode.ERROR, row.error))
        span.end(ended.start + round(row.latency_ms * 1e6))

        self.duration.record(row.latency_ms / 1000, {**common, "error.type": error} if error else common)
        if not refused and row.usage.total_tokens:
            self.tokens.record(row.usage.input_tokens, {**common, "gen_ai.token.type": "input"})
            self.tokens.record(row.usage.output_tokens, {**common, "gen_ai.token.type": "output"})
        if row.cost:
            self.cost.add(float(row.cost), {**common, **state.labels} if state is not None else common)

    def _call_attributes(self, ended: _Ended, refused: bool) -> dict[str, Any]:
        """A call span's attributes beyond those its metrics share."""
        row = ended.row
        attributes: dict[str, Any] = {}
        api = OPENAI_API_TYPES.get(row.endpoint)
        if api is not None and row.provider == "openai":
            attributes["openai.api.type"] = api
        if row.stream:
            attributes["gen_ai.request.stream"] = True
        if ended.max_tokens is not None:
            attributes["gen_ai.request.max_tokens"] = ended.max_tokens
        if ended.choices != 1:
            attributes["gen_ai.request.choice.count"] = ended.choices
        if not refused:
            usage = row.usage
            attributes["gen_ai.usage.input_tokens"] = usage.input_tokens
            attributes["gen_ai.usage.output_tokens"] = usage.output_tokens
            attributes["gen_ai.usage.cache_read.input_tokens"] = usage.cached_input_tokens
            attributes["gen_ai.usage.cache_creation.input_tokens"] = usage.cache_write_tokens
            for name, tokens in (
                ("gen_ai.usage.reasoning.output_tokens", usage.reasoning_tokens),
                ("gen_ai.usage.audio.input_tokens", usage.input_audio_tokens),
                ("gen_ai.usage.audio.output_tokens", usage.output_audio_tokens),
            ):
                if tokens:  # parts of the totals above, set only when the provider reported some
                    attributes[name] = tokens
        if ended.finish_reasons:
            attributes["gen_ai.response.finish_reasons"] = ended.finish_reasons
        if row.stream and row.ttfb_ms is not None:
            attributes["gen_ai.response.time_to_first_chunk"] = row.ttfb_ms / 1000
        attributes["riskkernel.run.id"] = row.run_id
        attributes["riskkernel.call.seq"] = row.seq
        attributes["riskkernel.cost_usd"] = float(row.cost)
        attributes["riskkernel.estimated"] = Flag.ESTIMATED in row.flags
        attributes["riskkernel.unpriced"] = Flag.UNPRICED in row.flags
        if ended.remaining is not None:
            attributes["riskkernel.budget.remaining_usd"] = float(ended.remaining)
        if ended.halt is not None:
            attributes["riskkernel.halt_reason"] = str(ended.halt)
        if refused and row.error is not None:
            attributes["riskkernel.refusal"] = row.error
        return attributes

    def _server(self, base: str) -> tuple[str, int]:
        found = self._servers.get(base)
        if found is None:
            url = urlsplit(base)
            found = self._servers[base] = (url.hostname or "", url.port or (443 if url.scheme == "https" else 80))
        return found

    # -- the end ---------------------------------------------------------------------------------------

    def shutdown(self) -> None:
        """End the spans of runs still open (those an `rk serve` leaves unended), and export what is left,
        waiting SHUTDOWN_WAIT seconds at most: a collector that is down never holds rk up for longer."""
        for state in self.runs.values():
            state.span.end()
        self.runs.clear()
        stopping = [
            threading.Thread(target=provider.shutdown, name="rk-otel-shutdown", daemon=True)
            for provider in (self.tracer_provider, self.meter_provider)
        ]
        deadline = time.monotonic() + SHUTDOWN_WAIT
        for thread in stopping:
            thread.start()
        for thread in stopping:
            thread.join(max(0.0, deadline - time.monotonic()))


def start(environ: Mapping[str, str]) -> Telemetry:
    """Telemetry exporting over OTLP/HTTP where the OTEL_* variables say (the exporter reads them: endpoint,
    headers, timeout, compression), for the service OTEL_SERVICE_NAME names (else "riskkernel"). RkError if
    the exporter is not installed."""
    try:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ImportError:
        raise RkError(
            "OpenTelemetry export (--otel, or OTEL_EXPORTER_OTLP_ENDPOINT) needs its exporter: "
            "pip install 'riskkernel[otel]'"
        ) from None
    _say_export_failures_once(environ)
    resource = _resource()
    tracer_provider = TracerProvider(resource=resource, shutdown_on_exit=False)
    if environ.get("OTEL_TRACES_EXPORTER", "").strip().lower() != "none":
        tracer_provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    readers: list[MetricReader] = []
    if environ.get("OTEL_METRICS_EXPORTER", "").strip().lower() != "none":
        readers.append(PeriodicExportingMetricReader(OTLPMetricExporter()))
    views = [
        View(instrument_name=name, aggregation=ExplicitBucketHistogramAggregation(buckets))
        for name, buckets in (
            ("gen_ai.client.token.usage", TOKEN_BUCKETS),
            ("gen_ai.client.operation.duration", DURATION_BUCKETS),
        )
    ]
    meter_provider = MeterProvider(readers, resource, shutdown_on_exit=False, views=views)
    return Telemetry(tracer_provider, meter_provider)


def _resource() -> Resource:
    """The OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES resource, named "riskkernel" if they name nothing."""
    found = Resource.create()
    attributes = dict(found.attributes)
    if str(attributes.get("service.name", "")).startswith("unknown_service"):
        attributes["service.name"] = SERVICE_NAME
    attributes.setdefault("service.version", __version__)
    return Resource(attributes, found.schema_url)


def _remote(traceparent: str | None, tracestate: str | None) -> Context | None:
    """The context a W3C `traceparent` (and `tracestate`) names, or None if there is none, or it is invalid."""
    if not traceparent:
        return None
    carrier = {"traceparent": traceparent}
    if tracestate:
        carrier["tracestate"] = tracestate
    context = _PROPAGATOR.extract(carrier)
    return context if trace.get_current_span(context).get_span_context().is_valid else None


def _error_type(row: CallRecord) -> str | None:
    """The call's `error.type`, or None if it succeeded: rk's refusal or cut reason, else the HTTP status."""
    if Flag.REFUSED in row.flags:
        return row.error or "refused"
    if Flag.CUT in row.flags and row.error is not None:
        return row.error.removeprefix("cut: ")
    if row.status >= 400:
        return str(row.status)
    return "_OTHER" if row.error is not None else None


_OS_ERROR = re.compile(r"\[Errno -?\d+\] [^'\")]+")  # "[Errno 111] Connection refused", inside the SDK's words


class _Once(logging.Handler):
    """Says the first export failure on stderr, in one line, and nothing after it: a collector that is down
    must neither flood the agent's terminal nor stop anything."""

    def __init__(self, endpoint: str) -> None:
        super().__init__(logging.WARNING)
        self.endpoint = endpoint
        self.said = False

    def emit(self, record: logging.LogRecord) -> None:
        if self.said:
            return
        self.said = True
        message = " ".join(record.getMessage().split())
        found = _OS_ERROR.search(message)
        reason = found.group(0).strip() if found else message[:200]
        sys.stderr.write(
            f"rk: OpenTelemetry export to {self.endpoint} failed ({reason}); calls are not affected, and this is"
            " said once\n"
        )


def _say_export_failures_once(environ: Mapping[str, str]) -> None:
    endpoint = next(
        (environ[name] for name in OTEL_ENDPOINTS if environ.get(name, "").strip()), "http://localhost:4318"
    )
    logger = logging.getLogger("opentelemetry")
    for handler in logger.handlers:
        if isinstance(handler, _Once):
            handler.endpoint = endpoint
            return
    logger.addHandler(_Once(endpoint))
    logger.propagate = False
