"""OpenTelemetry export, end to end: `rk run` and `rk serve` as real processes, the real SDKs as agents, and a
real OTLP/HTTP collector in-process (aiohttp, decoding the protobuf with opentelemetry-proto) receiving the
run's span, its calls' spans and the metrics, attribute for attribute."""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest
from aiohttp import web
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from riskkernel import __version__, paths
from riskkernel.ledger import store
from tests.conftest import SECRET, agent_script, rk
from tests.fakes import FakeUpstream, MessagesReply, Reply
from tests.test_anthropic import CACHED

PY = sys.executable
TOKEN_BUCKETS = [1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864]
DURATION_BUCKETS = [0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92]


def value(any_value: AnyValue) -> Any:
    kind = any_value.WhichOneof("value")
    if kind == "array_value":
        return tuple(value(v) for v in any_value.array_value.values)
    return getattr(any_value, kind) if kind else None


def attributes(pairs: list[KeyValue]) -> dict[str, Any]:
    return {pair.key: value(pair.value) for pair in pairs}


@dataclass
class Seen:
    """A span as the collector received it."""

    name: str
    kind: int
    trace_id: str
    span_id: str
    parent_id: str
    attributes: dict[str, Any]
    status: int
    message: str
    events: list[tuple[str, dict[str, Any]]]
    links: list[tuple[str, str]]
    start: int
    end: int
    resource: dict[str, Any]
    scope: str  # the instrumentation scope: name and version


@dataclass
class Collector:
    """An OTLP/HTTP collector on a loopback port: what it received, decoded."""

    url: str = ""
    spans: list[Seen] = field(default_factory=list)
    metrics: dict[str, list[tuple[dict[str, Any], Any]]] = field(default_factory=dict)  # name -> its points
    units: dict[str, str] = field(default_factory=dict)
    bounds: dict[str, list[float]] = field(default_factory=dict)  # a histogram's bucket boundaries

    async def receive_traces(self, request: web.Request) -> web.Response:
        message = ExportTraceServiceRequest.FromString(await _body(request))
        for resource_spans in message.resource_spans:
            resource = attributes(resource_spans.resource.attributes)  # type: ignore[arg-type]
            for scope in resource_spans.scope_spans:
                scope_name = f"{scope.scope.name} {scope.scope.version}"
                self.spans.extend(_seen(span, resource, scope_name) for span in scope.spans)
        return _protobuf(ExportTraceServiceResponse())

    async def receive_metrics(self, request: web.Request) -> web.Response:
        message = ExportMetricsServiceRequest.FromString(await _body(request))
        for resource_metrics in message.resource_metrics:
            for scope in resource_metrics.scope_metrics:
                for metric in scope.metrics:
                    self.units[metric.name] = metric.unit
                    kind = metric.WhichOneof("data")
                    points: list[tuple[dict[str, Any], Any]] = []
                    for point in getattr(metric, kind).data_points:
                        labels = attributes(point.attributes)  # type: ignore[arg-type]
                        if kind == "histogram":
                            self.bounds[metric.name] = list(point.explicit_bounds)
                            points.append((labels, (point.count, point.sum)))
                        else:
                            assert metric.sum.is_monotonic
                            points.append((labels, point.as_double or point.as_int))
                    self.metrics[metric.name] = points  # cumulative: the latest export holds it all
        return _protobuf(ExportMetricsServiceResponse())

    def named(self, name: str) -> list[Seen]:
        return [span for span in self.spans if span.name == name]

    def children(self, parent: Seen) -> list[Seen]:
        return sorted(
            (s for s in self.spans if s.parent_id == parent.span_id), key=lambda s: s.attributes["riskkernel.call.seq"]
        )


async def _body(request: web.Request) -> bytes:
    body = await request.read()
    return gzip.decompress(body) if request.headers.get("Content-Encoding") == "gzip" else body


def _protobuf(message: Any) -> web.Response:
    return web.Response(body=message.SerializeToString(), content_type="application/x-protobuf")


def _seen(span: Span, resource: dict[str, Any], scope: str) -> Seen:
    return Seen(
        name=span.name,
        kind=span.kind,
        trace_id=span.trace_id.hex(),
        span_id=span.span_id.hex(),
        parent_id=span.parent_span_id.hex(),
        attributes=attributes(span.attributes),  # type: ignore[arg-type]
        status=span.status.code,
        message=span.status.message,
        events=[(event.name, attributes(event.attributes)) for event in span.events],  # type: ignore[arg-type]
        links=[(link.trace_id.hex(), link.span_id.hex()) for link in span.links],
        start=span.start_time_unix_nano,
        end=span.end_time_unix_nano,
        resource=resource,
        scope=scope,
    )


@pytest.fixture
async def collector() -> AsyncIterator[Collector]:
    found = Collector()
    app = web.Application()
    app.router.add_post("/v1/traces", found.receive_traces)
    app.router.add_post("/v1/metrics", found.receive_metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    found.url = f"http://{host}:{port}"
    yield found
    await runner.cleanup()


def otel_env(url: str, **more: str) -> dict[str, str]:
    return {"OTEL_EXPORTER_OTLP_ENDPOINT": url, "OPENAI_API_KEY": SECRET, "ANTHROPIC_API_KEY": SECRET, **more}


def upstream_flags(fake: FakeUpstream) -> list[str]:
    return ["--openai-upstream", fake.url, "--anthropic-upstream", fake.root]


THREE_CALLS = """
import anthropic
messages = [{"role": "user", "content": "hi"}]
stream = client.chat.completions.create(model="gpt-4o", messages=messages, stream=True, max_tokens=50)
print("".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices))
claude = anthropic.Anthropic(max_retries=0)
print(claude.messages.create(model="claude-sonnet-4-6", max_tokens=900, messages=messages).id)
try:
    client.chat.completions.create(model="gpt-4o", messages=messages)
except openai.APIStatusError as exc:
    print("refused", exc.status_code, exc.code)
"""
SERVER = "127.0.0.1"
CLIENT, INTERNAL = Span.SPAN_KIND_CLIENT, Span.SPAN_KIND_INTERNAL
ERROR, UNSET = Status.STATUS_CODE_ERROR, Status.STATUS_CODE_UNSET


async def test_a_run_is_a_span_with_a_span_per_call_and_metrics(
    tmp_path: Path, fake: FakeUpstream, collector: Collector
) -> None:
    """An OpenAI stream, an Anthropic call with cache reads and writes, and a call refused once --max-calls is
    spent: the run's span, each call's span under it, and the metrics, attribute for attribute."""
    fake.script(Reply(), CACHED)
    env = otel_env(
        collector.url, OTEL_SERVICE_NAME="agent-gateway", OTEL_RESOURCE_ATTRIBUTES="deployment.environment.name=ci"
    )
    script = agent_script(tmp_path, THREE_CALLS)
    flags = [*upstream_flags(fake), "--max-calls", "2", "--name", "nightly", "--tag", "team=search"]
    done = await rk("run", *flags, "--json", "run.json", "--", PY, script, env=env)
    assert done.status == 3, done.stderr  # halted by --max-calls, and the agent exited 0
    assert "refused 402 call_budget_exceeded" in done.stdout.decode()
    summary = json.loads((tmp_path / "run.json").read_text())
    run_id = summary["run_id"]
    costs = [Decimal(call["cost_usd"]) for call in summary["calls"]]
    total = costs[0] + costs[1]

    (run,) = collector.named("rk run")
    assert (run.kind, run.parent_id, run.status) == (INTERNAL, "", ERROR)
    assert run.message == f"rk: call budget exceeded — 2 of 2 calls (run {run_id[:8]}…)"
    assert run.attributes == {
        "riskkernel.run.id": run_id,
        "riskkernel.run.name": "nightly",
        "riskkernel.run.tag.team": "search",
        "riskkernel.budget.max_cost_usd": 5.0,
        "riskkernel.budget.max_calls": 2,
        "riskkernel.run.status": "halted",
        "riskkernel.halt_reason": "call_budget_exceeded",
        "riskkernel.exit_status": 3,
        "riskkernel.cost_usd": float(total),
        "riskkernel.run.calls": 2,
        "riskkernel.run.tokens": 120 + 8500,
    }
    assert run.events == [("riskkernel.halt", {"riskkernel.halt_reason": "call_budget_exceeded"})]
    assert run.resource["service.name"] == "agent-gateway"  # OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES
    assert run.resource["deployment.environment.name"] == "ci"
    assert run.resource["service.version"] == __version__
    assert {span.scope for span in collector.spans} == {f"riskkernel {__version__}"}

    stream, claude, refused = calls = collector.children(run)
    assert len(collector.spans) == 4  # the run and its three calls, nothing else
    for call in calls:
        assert (call.trace_id, call.kind, call.links) == (run.trace_id, CLIENT, [])
        assert run.start <= call.start < call.end <= run.end

    ttfb = stream.attributes.pop("gen_ai.response.time_to_first_chunk")
    assert 0 < ttfb < (stream.end - stream.start) / 1e9
    assert (stream.name, stream.status) == ("chat gpt-4o", UNSET)
    openai_common = {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "openai",
        "gen_ai.request.model": "gpt-4o",
        "server.address": SERVER,
        "server.port": int(fake.url.split(":")[2].split("/")[0]),
    }
    assert stream.attributes == {
        **openai_common,
        "gen_ai.response.model": "gpt-4o-2024-08-06",
        "openai.api.type": "chat_completions",
        "gen_ai.request.stream": True,
        "gen_ai.request.max_tokens": 50,
        "gen_ai.usage.input_tokens": 100,
        "gen_ai.usage.output_tokens": 20,
        "gen_ai.usage.cache_read.input_tokens": 0,
        "gen_ai.usage.cache_creation.input_tokens": 0,
        "gen_ai.response.finish_reasons": ("stop",),
        "riskkernel.run.id": run_id,
        "riskkernel.call.seq": 1,
        "riskkernel.cost_usd": float(costs[0]),
        "riskkernel.estimated": False,
        "riskkernel.unpriced": False,
        "riskkernel.budget.remaining_usd": float(5 - costs[0]),
    }

    assert (claude.name, claude.status) == ("chat claude-sonnet-4-6", UNSET)
    anthropic_common = {
        **openai_common,
        "gen_ai.provider.name": "anthropic",
        "gen_ai.request.model": "claude-sonnet-4-6",
    }
    assert claude.attributes == {
        **anthropic_common,
        "gen_ai.response.model": "claude-sonnet-4-6",
        "gen_ai.request.max_tokens": 900,
        "gen_ai.usage.input_tokens": 8000,  # in OpenAI's sense, as the conventions count it: cache reads and writes in
        "gen_ai.usage.output_tokens": 500,
        "gen_ai.usage.cache_read.input_tokens": 4000,
        "gen_ai.usage.cache_creation.input_tokens": 3000,
        "gen_ai.response.finish_reasons": ("end_turn",),
        "riskkernel.run.id": run_id,
        "riskkernel.call.seq": 2,
        "riskkernel.cost_usd": float(costs[1]),
        "riskkernel.estimated": False,
        "riskkernel.unpriced": False,
        "riskkernel.budget.remaining_usd": float(5 - total),
        "riskkernel.halt_reason": "call_budget_exceeded",  # this call spent the last of --max-calls
    }

    assert (refused.name, refused.status, refused.message) == ("chat gpt-4o", ERROR, "call_budget_exceeded")
    assert refused.attributes == {
        **openai_common,
        "openai.api.type": "chat_completions",
        "riskkernel.run.id": run_id,
        "riskkernel.call.seq": 3,
        "riskkernel.cost_usd": 0.0,
        "riskkernel.estimated": False,
        "riskkernel.unpriced": False,
        "riskkernel.budget.remaining_usd": float(5 - total),
        "riskkernel.halt_reason": "call_budget_exceeded",
        "riskkernel.refusal": "call_budget_exceeded",
        "error.type": "call_budget_exceeded",
    }

    # Metrics, as the conventions define them, plus what rk charged and the runs it halted.
    openai_served = {**openai_common, "gen_ai.response.model": "gpt-4o-2024-08-06"}
    anthropic_served = {**anthropic_common, "gen_ai.response.model": "claude-sonnet-4-6"}
    assert sorted(collector.metrics["gen_ai.client.token.usage"], key=repr) == sorted(
        [
            ({**openai_served, "gen_ai.token.type": "input"}, (1, 100)),
            ({**openai_served, "gen_ai.token.type": "output"}, (1, 20)),
            ({**anthropic_served, "gen_ai.token.type": "input"}, (1, 8000)),
            ({**anthropic_served, "gen_ai.token.type": "output"}, (1, 500)),
        ],
        key=repr,
    )
    durations = {repr(labels): point for labels, point in collector.metrics["gen_ai.client.operation.duration"]}
    assert set(durations) == {
        repr(labels)
        for labels in (openai_served, anthropic_served, {**openai_common, "error.type": "call_budget_exceeded"})
    }
    assert all(count == 1 and 0 < seconds < 10 for count, seconds in durations.values())
    run_labels = {"riskkernel.run.name": "nightly", "riskkernel.run.tag.team": "search"}
    assert sorted(collector.metrics["riskkernel.cost_usd"], key=repr) == sorted(
        [({**openai_served, **run_labels}, float(costs[0])), ({**anthropic_served, **run_labels}, float(costs[1]))],
        key=repr,
    )
    assert collector.metrics["riskkernel.halts"] == [
        ({"riskkernel.halt_reason": "call_budget_exceeded", **run_labels}, 1)
    ]
    assert collector.units == {
        "gen_ai.client.token.usage": "{token}",
        "gen_ai.client.operation.duration": "s",
        "riskkernel.cost_usd": "{USD}",
        "riskkernel.halts": "{halt}",
    }
    assert collector.bounds == {
        "gen_ai.client.token.usage": TOKEN_BUCKETS,
        "gen_ai.client.operation.duration": DURATION_BUCKETS,
    }


TRACED = """
traceparent = os.environ["TRACEPARENT"]
print(traceparent)
trace_id = traceparent.split("-")[1]
for sent in (f"00-{trace_id}-00f067aa0ba902b7-01", sys.argv[1]):  # a span of its own in the run's trace; another trace
    client.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "hi"}], extra_headers={"traceparent": sent}
    )
"""
OUTER = ("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331")  # a trace rk itself was started in
FOREIGN = ("4bf92f3577b34da6a3ce929d0e0e4736", "1f0e2d3c4b5a6978")  # another trace, of the agent's own


async def test_trace_context_nests_the_run_and_its_calls_where_they_belong(
    tmp_path: Path, fake: FakeUpstream, collector: Collector
) -> None:
    """rk's own TRACEPARENT parents its run span; the agent gets the run span's as TRACEPARENT; a call whose
    request carries a traceparent is a child of that span, in that trace, linked to its run's span."""
    env = otel_env(collector.url, TRACEPARENT=f"00-{OUTER[0]}-{OUTER[1]}-01")
    script = agent_script(tmp_path, TRACED)
    done = await rk("run", *upstream_flags(fake), "--", PY, script, f"00-{FOREIGN[0]}-{FOREIGN[1]}-01", env=env)
    assert done.status == 0, done.stderr

    (run,) = collector.named("rk run")
    assert (run.trace_id, run.parent_id) == OUTER
    assert done.stdout.decode().splitlines()[0] == f"00-{OUTER[0]}-{run.span_id}-01"  # the agent's TRACEPARENT
    nested, foreign = sorted(collector.named("chat gpt-4o"), key=lambda s: s.attributes["riskkernel.call.seq"])
    assert (nested.trace_id, nested.parent_id) == (OUTER[0], "00f067aa0ba902b7")
    assert (foreign.trace_id, foreign.parent_id) == FOREIGN
    assert nested.links == foreign.links == [(run.trace_id, run.span_id)]


async def test_a_dead_collector_changes_nothing_for_the_agent(tmp_path: Path, fake: FakeUpstream) -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    script = agent_script(
        tmp_path,
        "for i in range(2):\n"
        "    client.chat.completions.create(model='gpt-4o', messages=[{'role': 'user', 'content': 'hi'}])\n"
        "    print('call', i, 'ok')\n"
        "sys.exit(7)\n",
    )
    args = ("run", *upstream_flags(fake), "--", PY, script)
    began = time.monotonic()
    plain = await rk(*args, env={"OPENAI_API_KEY": SECRET})
    plain_time = time.monotonic() - began
    began = time.monotonic()
    done = await rk(*args, env=otel_env(dead))
    otel_time = time.monotonic() - began

    assert plain.status == done.status == 7, done.stderr
    assert done.stdout == plain.stdout == b"call 0 ok\ncall 1 ok\n"
    assert otel_time < plain_time + 2.5, (otel_time, plain_time)  # a second at exit, at most, and the import
    said = [line for line in done.stderr.splitlines() if "OpenTelemetry" in line]
    assert len(said) == 1 and said[0].startswith(f"rk: OpenTelemetry export to {dead} failed ("), said
    assert said[0].endswith("Connection refused); calls are not affected, and this is said once")
    assert "Traceback" not in done.stderr
    db = store.open_reader(paths.ledger_path())
    assert db is not None
    try:
        assert [run.totals.calls for run in store.list_runs(db, None)] == [2, 2]
    finally:
        db.close()


WHAT_WAS_IMPORTED = """
import sys
from riskkernel.cli import main
try:
    main()
finally:
    imported = any(name.split(".")[0] == "opentelemetry" for name in sys.modules)
    print("opentelemetry imported:", imported, file=sys.stderr)
"""


@pytest.mark.parametrize("otel", [False, True])
async def test_rk_run_imports_opentelemetry_only_when_it_exports(
    tmp_path: Path, collector: Collector, otel: bool
) -> None:
    wrapper = tmp_path / "rk_wrapper.py"
    wrapper.write_text(WHAT_WAS_IMPORTED)
    call = "import openai; openai.OpenAI().chat.completions.create(model='gpt-4o', messages=[])"
    env = {**os.environ, **({"OTEL_EXPORTER_OTLP_ENDPOINT": collector.url} if otel else {})}
    proc = await asyncio.create_subprocess_exec(
        PY, str(wrapper), "run", "--mock", "--quiet", "--", PY, "-c", call, env=env, stderr=asyncio.subprocess.PIPE
    )
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err
    assert f"opentelemetry imported: {otel}" in err.decode()
    assert len(collector.named("chat gpt-4o")) == int(otel)


async def test_without_the_exporter_otel_stops_rk_before_the_run_in_one_line(tmp_path: Path) -> None:
    shadow = tmp_path / "shadow" / "opentelemetry" / "exporter" / "otlp" / "proto" / "http"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('not installed')\n")  # as if it were not installed
    env = {"PYTHONPATH": str(tmp_path / "shadow")}
    done = await rk("run", "--otel", "--mock", "--", PY, "-c", "print('never')", env=env)
    assert done.status == 125
    assert done.stderr.strip().splitlines() == [
        "rk: OpenTelemetry export (--otel, or OTEL_EXPORTER_OTLP_ENDPOINT) needs its exporter: "
        "pip install 'riskkernel[otel]'"
    ]
    assert done.stdout == b"" and not paths.ledger_path().exists()


async def test_rk_serve_exports_each_run_with_its_calls(fake: FakeUpstream, collector: Collector) -> None:
    """Runs named by base URL and a single call's own run: each a span with its calls', the last exported when
    the server stops, with the runs it leaves unended."""
    env = {**os.environ, **otel_env(collector.url)}
    proc = await asyncio.create_subprocess_exec(
        PY, "-m", "riskkernel", "serve", "--port", "0", *upstream_flags(fake), env=env, stderr=asyncio.subprocess.PIPE
    )
    assert proc.stderr is not None
    url = (await asyncio.wait_for(proc.stderr.readline(), 20)).decode().split()[2]
    fake.script(Reply(), Reply(), MessagesReply())
    messages: Any = [{"role": "user", "content": "hi"}]
    async with openai.AsyncOpenAI(base_url=f"{url}/run/nightly/v1", api_key=SECRET, max_retries=0) as nightly:
        for _ in range(2):
            await nightly.chat.completions.create(model="gpt-4o", messages=messages)
    async with anthropic.AsyncAnthropic(base_url=url, api_key=SECRET, max_retries=0) as stray:
        await stray.messages.create(model="claude-sonnet-4-6", max_tokens=10, messages=messages)
    proc.send_signal(signal.SIGTERM)
    await asyncio.wait_for(proc.wait(), 20)

    runs = {span.attributes["riskkernel.run.id"]: span for span in collector.named("rk run")}
    assert set(runs) - {"nightly"} and len(runs) == 2
    nightly_run = runs.pop("nightly")  # left unended: its span ends with the server, without an end status
    assert nightly_run.attributes == {"riskkernel.run.id": "nightly", "riskkernel.budget.max_cost_usd": 5.0}
    assert [c.attributes["riskkernel.call.seq"] for c in collector.children(nightly_run)] == [1, 2]
    (single,) = runs.values()  # a call of no run is a run of its own, which ended with it
    assert (
        single.attributes["riskkernel.run.status"] == "completed" and "riskkernel.exit_status" not in single.attributes
    )
    (claude,) = collector.children(single)
    assert (claude.name, claude.attributes["gen_ai.provider.name"]) == ("chat claude-sonnet-4-6", "anthropic")
