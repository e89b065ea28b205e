"""Property-based tests of rk's wire knowledge: every usage meter and every request parser, fed realistic
transcripts split into arbitrary chunks, and garbage.

Streams go through `SSEDecoder` and the endpoint's stream meter the way the proxy's `_relay_stream` drives
them (`decoder.feed`, `meter.feed(event)`, `decoder.flush()` at the end). Transcripts come from the fake
upstream's reply builders, so what the client must see is what that upstream would have sent it directly.
"""

from __future__ import annotations

import copy
import itertools
import json
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from riskkernel.models import Usage
from riskkernel.providers import Endpoint, Metered, Position, Request, StreamMeter, loads, meter_chunk
from riskkernel.providers import anthropic as an
from riskkernel.providers import openai as oa
from riskkernel.providers.catalog import ENDPOINTS
from riskkernel.providers.sse import Event, SSEDecoder
from tests.fakes import CompletionReply, MessagesReply, Reply, ResponsesReply, Scripted, compact, usage

FUZZ = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def each(role: str) -> pytest.MarkDecorator:
    """Parametrize over the endpoints, one per distinct `role` function (chat, completions and embeddings
    share their meters)."""
    chosen: dict[Any, Endpoint] = {}
    for endpoint in ENDPOINTS:
        chosen.setdefault(getattr(endpoint, role), endpoint)
    return pytest.mark.parametrize("endpoint", list(chosen.values()), ids=[e.path for e in chosen.values()])


# -- strategies -------------------------------------------------------------------------------------------

_CHARS = st.characters(codec=None, exclude_categories=())  # every code point, lone surrogates included
_TRICKY = st.sampled_from(
    [
        *('"usage":null', ',"usage":null}', '"usage":null,', "data: [DONE]\n\n", "\r\n\r\n", "\r", "event: error\n"),
        *("\ud800", "\udfff", "\x00", "\u2028", "😀"),
    ]
)
# As JSON carries them: a high and a low surrogate drawn side by side are read back as one character.
texts = st.lists(st.text(_CHARS, max_size=8) | _TRICKY, max_size=6).map(
    lambda parts: json.loads(json.dumps("".join(parts)))
)
names = st.text(_CHARS, min_size=1, max_size=16).filter(str.strip)  # models, tools: never blank
counts = st.integers(0, 2**40)
pieces = st.integers(1, 8)  # how many chunks the fake streams text and arguments in

KINDS = (
    "message_start",
    "message_delta",
    "message_stop",
    "content_block_start",
    "content_block_delta",
    "error",
    "ping",
    "tool_use",
    "server_tool_use",
    "response.created",
    "response.completed",
    "response.incomplete",
    "response.failed",
    "response.output_text.delta",
    "[DONE]",
)
WIRE_KEYS = (  # every key a meter or a parser reads
    *("type", "model", "service_tier", "usage", "choices", "delta", "message", "text", "content", "refusal"),
    *("reasoning_content", "reasoning", "tool_calls", "function", "function_call", "name", "arguments", "error"),
    *("response", "output", "summary", "content_block", "partial_json", "thinking", "input", "stop_reason"),
    *("prompt_tokens", "completion_tokens", "prompt_tokens_details", "completion_tokens_details"),
    *("cached_tokens", "cache_write_tokens", "audio_tokens", "reasoning_tokens", "input_tokens", "output_tokens"),
    *("input_tokens_details", "output_tokens_details", "cache_read_input_tokens", "cache_creation_input_tokens"),
    *("cache_creation", "ephemeral_5m_input_tokens", "ephemeral_1h_input_tokens", "server_tool_use"),
    *("web_search_requests", "stream", "stream_options", "include_usage", "max_tokens", "n"),
)
scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8) | st.sampled_from(KINDS)
keys = st.sampled_from(WIRE_KEYS) | st.text(max_size=6)
# Any JSON value, with the keys and event kinds the meters look for, and every wrong type in their place.
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(keys, inner, max_size=4), max_leaves=12
)


def _provider_objects() -> list[tuple[str | None, dict[str, Any]]]:
    """Every event (its name and object) and every whole body the fake upstream sends: text, reasoning,
    tool calls, usage of every kind."""
    call = {"id": "call_1", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'}
    replies: list[Scripted] = [
        Reply(tool_calls=[call], usage=usage(100, 20, cached=10, reasoning=5)),
        CompletionReply(),
        ResponsesReply(reasoning="Thinking.", calls=[call], web_searches=1),
        MessagesReply(
            blocks=[
                {"type": "thinking", "thinking": "Hmm.", "signature": "sig"},
                {"type": "text", "text": "Checking."},
                {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
            ],
            deltas=[{"output_tokens": 10}, {"output_tokens": 20, "server_tool_use": {"web_search_requests": 1}}],
        ),
    ]
    objects: list[tuple[str | None, dict[str, Any]]] = []
    for reply in replies:
        stream = b"".join(reply.stream_events({"stream_options": {"include_usage": True}}))
        objects += [(e.event, json.loads(e.data)) for e in SSEDecoder().feed(stream) if e.data != "[DONE]"]
        objects.append((None, json.loads(reply.whole())))
    objects.append((None, json.loads(Reply().error_event()[len(b"data: ") :])))
    objects.append(("error", json.loads(MessagesReply().error_event().split(b"data: ")[1])))
    return objects


PROVIDER_OBJECTS = _provider_objects()


def _paths(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Where every value inside `value` is, itself excluded."""
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    return [p for key, inner in items for p in [(*path, key), *_paths(inner, (*path, key))]]


@st.composite
def corrupted(draw: st.DrawFn) -> tuple[str | None, dict[str, Any]]:
    """One of the providers' own objects with a few of its fields, at any depth, swapped for any JSON."""
    name, obj = draw(st.sampled_from(PROVIDER_OBJECTS))
    obj = copy.deepcopy(obj)
    for _ in range(draw(st.integers(1, 3))):
        *parents, last = draw(st.sampled_from(_paths(obj)))
        target = obj
        for key in parents:
            target = target[key]
        target[last] = draw(json_values)
    return name, obj


def nested(depth: int) -> str:
    """A JSON object whose usage is `depth` lists deep, around where Python's json gives up."""
    return '{"type":"message_delta","usage":' + "[" * depth + "]" * depth + "}"


event_data = st.one_of(
    json_values.map(json.dumps),
    st.sampled_from(["[DONE]", "", "{", "null", "9" * 5000, '{"usage":' + "9" * 5000 + "}"]),
    st.integers(900, 3000).map(nested),
    texts,
)


def sse_bytes(name: str | None, data: str) -> bytes:
    """One well-formed event: data with line breaks is sent as several data lines, as SSE allows."""
    lines = [f"event: {name}"] if name is not None else []
    lines += [f"data: {line}" for line in data.replace("\r", "").split("\n")]
    return ("\n".join(lines) + "\n\n").encode("utf-8", "surrogatepass")


event_names = st.none() | st.sampled_from(KINDS) | st.text(max_size=8).filter(str.isprintable)
sse_events = st.one_of(  # half of them the providers' own events, corrupted
    corrupted().map(lambda event: sse_bytes(event[0], json.dumps(event[1]))),
    st.builds(sse_bytes, event_names, event_data),
)


def encode(value: Any, ascii: bool) -> bytes:
    """JSON as a client sends it, non-ASCII escaped or not; a lone surrogate, which has no UTF-8 form, is
    always escaped (it can only be in a string, where `backslashreplace` writes it as its JSON escape)."""
    return json.dumps(value, ensure_ascii=ascii).encode("utf-8", "backslashreplace")


REQUEST_FIELDS = (
    *("model", "stream", "stream_options", "messages", "input", "prompt", "suffix", "system", "tools"),
    *("max_tokens", "max_completion_tokens", "max_output_tokens", "n", "best_of", "background", "service_tier"),
)
request_bodies = st.one_of(
    st.binary(max_size=200),
    st.builds(encode, json_values, st.booleans()),
    st.builds(
        encode,
        st.fixed_dictionaries({}, optional={key: names | json_values for key in REQUEST_FIELDS}),
        st.booleans(),
    ),
    st.integers(900, 3000).map(lambda depth: b'{"model":"m","messages":' + b"[" * depth + b"]" * depth + b"}"),
)


@st.composite
def chunked(draw: st.DrawFn, blob: bytes) -> list[bytes]:
    cuts = sorted(draw(st.lists(st.integers(0, len(blob)), max_size=12)))
    bounds = [0, *cuts, len(blob)]
    return [blob[a:b] for a, b in itertools.pairwise(bounds)]


# -- realistic calls --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    """One streamed call as the upstream answers it, and what rk must make of it."""

    request: dict[str, Any]  # what the client sends
    reply: Scripted  # how the upstream answers (its stream depends on the request it gets)
    whole: bytes  # the same answer, not streamed
    usage: Usage  # what the answer reports, in rk's sense
    model: str
    output_chars: int  # text, tool names and arguments, reasoning


@st.composite
def chat_usage_reports(draw: st.DrawFn) -> tuple[dict[str, Any], Usage]:
    prompt, completion, cached, reasoning, audio_in, audio_out = draw(st.tuples(*[counts] * 6))
    report = usage(prompt, completion, cached, reasoning)
    report["prompt_tokens_details"]["audio_tokens"] = audio_in
    report["completion_tokens_details"]["audio_tokens"] = audio_out
    return report, Usage(
        input_tokens=prompt,
        cached_input_tokens=cached,
        input_audio_tokens=audio_in,
        output_tokens=completion,
        reasoning_tokens=reasoning,
        output_audio_tokens=audio_out,
    )


def openai_request(draw: st.DrawFn, part: str) -> dict[str, Any]:
    """A streamed chat or completions request that asked for stream usage or did not."""
    request = {"model": draw(names), part: draw(texts), "stream": True}
    if draw(st.booleans()):
        request["stream_options"] = {"include_usage": True}
    return request


@st.composite
def chat_calls(draw: st.DrawFn) -> Call:
    report, expected = draw(chat_usage_reports())
    tool_calls = draw(st.lists(st.fixed_dictionaries({"id": names, "name": names, "arguments": texts}), max_size=3))
    reply = Reply(
        model=draw(names),
        text=draw(st.none() | texts),
        tool_calls=tool_calls or None,
        usage=report,
        pieces=draw(pieces),
    )
    chars = len(reply.text or "") + sum(len(c["name"]) + len(c["arguments"]) for c in tool_calls)
    return Call(openai_request(draw, "messages"), reply, reply.whole(), expected, reply.model, chars)


@st.composite
def completion_calls(draw: st.DrawFn) -> Call:
    report, expected = draw(chat_usage_reports())
    reply = CompletionReply(model=draw(names), text=draw(texts), usage=report, pieces=draw(pieces))
    return Call(openai_request(draw, "prompt"), reply, reply.whole(), expected, reply.model, len(reply.text))


@st.composite
def responses_calls(draw: st.DrawFn) -> Call:
    input_tokens, cached, output, reasoning = draw(st.tuples(*[counts] * 4))
    report = {
        "input_tokens": input_tokens,
        "input_tokens_details": {"cached_tokens": cached},
        "output_tokens": output,
        "output_tokens_details": {"reasoning_tokens": reasoning},
        "total_tokens": input_tokens + output,
    }
    reply = ResponsesReply(
        model=draw(names),
        text=draw(st.none() | texts),
        reasoning=draw(st.none() | texts),
        calls=draw(st.lists(st.fixed_dictionaries({"call_id": names, "name": names, "arguments": texts}), max_size=3)),
        web_searches=draw(st.integers(0, 3)),
        usage=report,
        end=draw(st.sampled_from(["response.completed", "response.incomplete", "response.failed"])),
        pieces=draw(pieces),
    )
    expected = Usage(
        input_tokens=input_tokens,
        cached_input_tokens=cached,
        output_tokens=output,
        reasoning_tokens=reasoning,
        web_searches=reply.web_searches,
    )
    chars = len(reply.text or "") + len(reply.reasoning or "") + sum(len(c["arguments"]) for c in reply.calls)
    request = {"model": draw(names), "input": draw(texts), "stream": True}
    return Call(request, reply, reply.whole(), expected, reply.model, chars)


tool_inputs = st.dictionaries(
    st.text(max_size=8), st.none() | st.booleans() | st.integers() | texts | st.lists(st.integers(), max_size=3)
)
blocks = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": texts}),
    st.fixed_dictionaries({"type": st.just("thinking"), "thinking": texts, "signature": texts}),
    st.fixed_dictionaries({"type": st.just("tool_use"), "id": names, "name": names, "input": tool_inputs}),
)


def block_chars(block: dict[str, Any]) -> int:
    return len(block.get("text", "") + block.get("thinking", "")) + (
        len(json.dumps(block["input"])) if block["type"] == "tool_use" else 0
    )


@st.composite
def messages_calls(draw: st.DrawFn) -> Call:
    """Anthropic's usage: input excludes cache reads and writes; each message_delta repeats the totals so far.

    The input side is in message_start, or (as some compatible servers do) only in the last message_delta;
    a delta may also report a field as null, which must not erase it."""
    plain, read, write_5m, write_1h, searches = draw(st.tuples(counts, counts, counts, counts, st.integers(0, 5)))
    outputs = sorted(draw(st.lists(counts, min_size=1, max_size=4)))
    input_side = {
        "input_tokens": plain,
        "cache_creation_input_tokens": write_5m + write_1h,
        "cache_read_input_tokens": read,
        "cache_creation": {"ephemeral_5m_input_tokens": write_5m, "ephemeral_1h_input_tokens": write_1h},
    }
    late = draw(st.booleans())
    placeholder = {**dict.fromkeys(input_side, 0), "cache_creation": {}}
    start = {**(placeholder if late else input_side), "output_tokens": draw(st.integers(0, 3))}
    deltas: list[dict[str, Any]] = [
        {"output_tokens": n, **draw(st.sampled_from([{}, input_side, dict.fromkeys(input_side)]))} for n in outputs
    ]
    tools = {"server_tool_use": {"web_search_requests": searches}} if searches else {}
    final = {**input_side, "output_tokens": outputs[-1], **tools}  # what the whole message reports
    deltas[-1] |= final if late else tools
    reply = MessagesReply(
        model=draw(names),
        blocks=draw(st.lists(blocks, max_size=4)),
        start_usage=start,
        deltas=deltas,
        stop_reason=draw(st.sampled_from(["end_turn", "tool_use", "max_tokens"])),
        pieces=draw(pieces),
    )
    whole = MessagesReply(model=reply.model, blocks=reply.blocks, start_usage=final, deltas=[])
    expected = Usage(
        input_tokens=plain + read + write_5m + write_1h,
        cached_input_tokens=read,
        cache_write_tokens=write_5m + write_1h,
        cache_write_1h_tokens=write_1h,
        output_tokens=outputs[-1],
        web_searches=searches,
    )
    chars = sum(block_chars(block) for block in reply.blocks)
    request = {"model": draw(names), "max_tokens": 1024, "messages": [{"role": "user", "content": draw(texts)}]}
    return Call(request, reply, whole.whole(), expected, reply.model, chars)


STREAMED = pytest.mark.parametrize(
    ("endpoint", "calls"),
    [
        (oa.CHAT, chat_calls()),
        (oa.COMPLETIONS, completion_calls()),
        (oa.RESPONSES, responses_calls()),
        (an.MESSAGES, messages_calls()),
    ],
    ids=lambda value: value.path if isinstance(value, Endpoint) else None,
)


# -- helpers ----------------------------------------------------------------------------------------------


def relay(meter: StreamMeter, chunks: list[bytes]) -> tuple[bytes, list[Position]]:
    """What the client is sent, and where each event left the stream, as `_relay_stream` drives a meter:
    it stops reading after the chunk that brings the protocol's last event, else flushes at the end."""
    decoder = SSEDecoder()
    shown: list[bytes] = []
    positions: list[Position] = []
    for chunk in chunks:
        for data, position in meter_chunk(decoder, meter, chunk):
            assert isinstance(data, bytes) and isinstance(position, Position)
            shown.append(data)
            positions.append(position)
        if Position.LAST in positions:
            return b"".join(shown), positions
    tail, final = decoder.flush()
    if final is not None:
        meter.feed(final)
    return b"".join(shown) + tail, positions


def assert_sane(metered: Metered) -> None:
    """A meter's result is always a record rk can price and store: counts are non-negative ints."""
    assert isinstance(metered, Metered)
    if metered.usage is not None:
        for name in Usage._fields:
            value = getattr(metered.usage, name)
            assert type(value) is int and value >= 0, (name, value)
    for text in (metered.model, metered.service_tier, metered.error):
        assert text is None or isinstance(text, str)
    assert all(isinstance(reason, str) for reason in metered.finish_reasons)
    assert type(metered.output_chars) is int and metered.output_chars >= 0


def stream_request(endpoint: Endpoint, hide_usage: bool) -> Request:
    return Request("m", True, b"{}", 0, None, hide_usage=hide_usage and endpoint.stream_meter is oa.ChatStream)


def canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True)  # NaN, which never equals itself, is "NaN" on both sides


PROTOCOL_ENDS = frozenset({"message_stop", "response.completed", "response.incomplete", "response.failed"})


def protocol_end(event: Event) -> bool:
    """Whether an event is a protocol's own last one ([DONE], message_stop, a response's end), by its data's
    `type` or else its event name."""
    if event.data == "[DONE]":
        return True
    try:
        obj = json.loads(event.data or "")
    except (ValueError, RecursionError):
        obj = None
    kind = obj.get("type") if isinstance(obj, dict) else None
    return (kind if isinstance(kind, str) and kind else event.event) in PROTOCOL_ENDS


# -- stream meters on realistic transcripts ---------------------------------------------------------------


@STREAMED
@FUZZ
@given(data=st.data())
def test_a_stream_is_metered_and_relayed_exactly_at_any_chunking(
    endpoint: Endpoint, calls: st.SearchStrategy[Call], data: st.DataObject
) -> None:
    """Whatever the text, tool calls and usage, and however the bytes are chunked: the meter reports the
    usage the transcript reports (in rk's sense), its model and the characters generated; the client gets
    exactly the stream the upstream would have sent it without rk; and only the stream's last event ends
    it."""
    call = data.draw(calls)
    req = endpoint.parse(compact(call.request))
    upstream = b"".join(call.reply.stream_events(json.loads(req.body)))  # what rk forwarded is what it asked
    meter = endpoint.stream_meter(req)

    shown, positions = relay(meter, data.draw(chunked(upstream)))

    assert shown == b"".join(call.reply.stream_events(call.request))
    assert positions[-1] is Position.LAST and Position.LAST not in positions[:-1]
    metered = meter.result()
    assert (metered.usage, metered.model, metered.error) == (call.usage, call.model, None)
    assert metered.output_chars == call.output_chars


_values = st.none() | st.booleans() | counts | texts | st.lists(texts, max_size=2)
_deltas = st.fixed_dictionaries(
    {},
    optional={
        "role": st.just("assistant"),
        "content": texts | st.none(),
        "refusal": texts | st.none(),
        "tool_calls": st.lists(
            st.fixed_dictionaries(
                {"index": counts, "function": st.fixed_dictionaries({}, optional={"arguments": texts})}
            ),
            max_size=2,
        ),
    },
)
_chunks = st.fixed_dictionaries(
    {
        "choices": st.lists(
            st.fixed_dictionaries({"index": counts, "delta": _deltas, "finish_reason": st.none() | texts})
        )
    },
    optional={
        "id": texts,
        "model": texts,
        "usage": st.none() | st.fixed_dictionaries({"prompt_tokens": counts, "completion_tokens": counts}),
        "service_tier": texts,
        "error": _values,
        "obfuscation": _values,
    },
)


@FUZZ
@given(chunk=_chunks, spaced=st.booleans(), hide_usage=st.booleans())
def test_a_chat_chunk_is_metered_alike_whether_parsed_whole_or_in_part(
    chunk: dict[str, Any], spaced: bool, hide_usage: bool
) -> None:
    """Past its first chunk, a chat stream's chunks with nothing but choices to read have only those parsed:
    the meter must read every chunk exactly as parsing it whole does, whatever its text holds."""
    data = json.dumps(chunk, separators=(", ", ": ") if spaced else (",", ":"), ensure_ascii=False)
    meter = oa.ChatStream(Request(model="m", stream=True, body=b"", input_tokens=0, max_output_tokens=None))
    meter.hide_usage = hide_usage
    first = '{"model":"m","service_tier":"default","choices":[]}'
    meter.feed(Event(f"data: {first}\n\n".encode(), None, first))  # model and tier known: a fast path is open
    event = Event(f"data: {data}\n\n".encode("utf-8", "surrogatepass"), None, data)
    shown, position = meter.feed(event)
    expected = json.loads(data)
    choices = expected.get("choices")
    assert meter.metered.output_chars == sum(oa._choice_chars(c) for c in choices)
    assert meter.metered.finish_reasons == [c["finish_reason"] for c in choices if isinstance(c["finish_reason"], str)]
    if "usage" not in expected and not expected.get("error"):
        assert (shown, position) == (event.raw, Position.MORE)
    if hide_usage and expected.get("usage", 0) is None and not expected.get("error"):
        relayed = json.loads(shown[6:].decode("utf-8", "surrogatepass"))
        assert relayed == {k: v for k, v in expected.items() if k != "usage"}


@settings(FUZZ, max_examples=200)  # many shapes of chunk, each rare
@given(
    chunks=st.lists(st.tuples(_chunks, st.booleans(), st.booleans()), min_size=1, max_size=6),
    opening=st.booleans(),
    done=st.booleans(),
    hide_usage=st.booleans(),
)
def test_chat_chunks_met_in_one_read_are_metered_as_when_fed_one_by_one(
    chunks: list[tuple[dict[str, Any], bool, bool]], opening: bool, done: bool, hide_usage: bool
) -> None:
    """A network read of whole one-line events goes to the chat meter at once (`feed_plain`), which reads
    only the choices of those it can: it must meter them, and show the client, exactly what feeding them
    one by one does, whatever they hold."""
    events = ['{"model":"m","service_tier":"default","choices":[]}'] if opening else []
    for chunk, spaced, null_usage_last in chunks:
        if null_usage_last:  # where OpenAI puts it
            chunk = {**{k: v for k, v in chunk.items() if k != "usage"}, "usage": None}
        events.append(json.dumps(chunk, separators=(", ", ": ") if spaced else (",", ":"), ensure_ascii=False))
    blob = b"".join(f"data: {data}\n\n".encode("utf-8", "surrogatepass") for data in events)
    blob += b"data: [DONE]\n\n" if done else b""
    req = Request(model="m", stream=True, body=b"", input_tokens=0, max_output_tokens=None, hide_usage=hide_usage)
    one_by_one, at_once = oa.ChatStream(req), oa.ChatStream(req)

    fed = [one_by_one.feed(event) for event in SSEDecoder().feed(blob)]
    pieces = meter_chunk(SSEDecoder(), at_once, blob)

    assert b"".join(shown for shown, _ in pieces) == b"".join(shown for shown, _ in fed)
    assert [p for _, p in pieces if p is not Position.MORE] == [p for _, p in fed if p is not Position.MORE]
    assert at_once.result() == one_by_one.result()


@STREAMED
@FUZZ
@given(data=st.data())
def test_a_whole_response_is_metered_to_the_usage_it_reports(
    endpoint: Endpoint, calls: st.SearchStrategy[Call], data: st.DataObject
) -> None:
    """The same answer, not streamed, is metered to the same usage and model."""
    call = data.draw(calls)
    metered = endpoint.meter(call.whole)
    assert (metered.usage, metered.model, metered.error) == (call.usage, call.model, None)


# -- stream meters on garbage -----------------------------------------------------------------------------


@each("stream_meter")
@FUZZ
@given(chunks=st.lists(st.binary(max_size=64) | sse_events, max_size=12), hide_usage=st.booleans())
# Found by these properties, kept: nesting past what json parses; a list where an event's type belongs.
@example(chunks=[sse_bytes(None, nested(5000))], hide_usage=True)
@example(chunks=[b'data: {"type": [null]}\n\n'], hide_usage=False)
def test_any_bytes_never_crash_a_stream_meter(endpoint: Endpoint, chunks: list[bytes], hide_usage: bool) -> None:
    """Raw bytes, torn events and line noise through the decoder: the meter always returns a sane result."""
    meter = endpoint.stream_meter(stream_request(endpoint, hide_usage))
    relay(meter, chunks)
    assert_sane(meter.result())


@each("stream_meter")
@FUZZ
@given(data=st.data(), hide_usage=st.booleans())
def test_events_with_any_json_never_crash_a_stream_meter(
    endpoint: Endpoint, data: st.DataObject, hide_usage: bool
) -> None:
    """Well-formed events whose data is any JSON (usage as a string, negative or huge counts, nulls, lists
    where objects belong, nesting past what Python's json parses): the meter always returns a sane result."""
    stream = b"".join(data.draw(st.lists(sse_events, min_size=1, max_size=6)))
    meter = endpoint.stream_meter(stream_request(endpoint, hide_usage))
    relay(meter, data.draw(chunked(stream)))
    assert_sane(meter.result())


@each("stream_meter")
@FUZZ
@given(events=st.lists(sse_events, min_size=1, max_size=6))
@example(events=[b'data: {"error": "overloaded"}\n\n'])  # found by this property, kept: an error as a bare string
def test_a_stream_ends_early_only_on_an_error_it_records(endpoint: Endpoint, events: list[bytes]) -> None:
    """An event that ends the stream without being its protocol's last one is an error the meter records:
    the proxy takes a stream that ended with no error for finished, its usage final."""
    meter = endpoint.stream_meter(stream_request(endpoint, hide_usage=True))
    for event in SSEDecoder().feed(b"".join(events)):
        _, position = meter.feed(event)
        if position is Position.LAST:
            assert protocol_end(event) or meter.result().error is not None, event
            return


@each("stream_meter")
@FUZZ
@given(events=st.lists(sse_events, min_size=1, max_size=6), hide_usage=st.booleans())
def test_rk_alters_an_event_only_to_hide_the_usage_it_forced(
    endpoint: Endpoint, events: list[bytes], hide_usage: bool
) -> None:
    """Every event reaches the client byte for byte, except in a chat or completions stream whose usage rk
    forced: there the usage-only chunk is dropped, and `"usage": null` cut out of other chunks, nothing
    else touched."""
    req = stream_request(endpoint, hide_usage)
    meter = endpoint.stream_meter(req)
    for event in SSEDecoder().feed(b"".join(events)):
        shown, _ = meter.feed(event)
        if shown == event.raw:
            continue
        assert req.hide_usage
        obj = json.loads(event.data or "")
        if shown == b"":
            assert isinstance(obj["usage"], dict) and not obj.get("choices")
            continue
        (seen,) = SSEDecoder().feed(shown)
        assert seen.event == event.event
        assert obj["usage"] is None
        assert canonical(json.loads(seen.data or "")) == canonical({k: v for k, v in obj.items() if k != "usage"})


# -- whole-response meters on garbage ---------------------------------------------------------------------


@FUZZ
@given(
    data=st.binary(max_size=64)
    | st.builds(encode, json_values, st.booleans())
    | texts
    | st.builds(lambda value, pad: f"{pad}{json.dumps(value)}{pad}", json_values, st.sampled_from(["", " \n"]))
    | st.builds(
        lambda value, pad: f"{pad}{json.dumps(value)}{pad}".encode("utf-16"), json_values, st.sampled_from(["", " \n"])
    )
    | st.sampled_from([b"\xef\xbb\xbf{}", b"{} x", b" [1] ", b"\xed\xa0\x80", b"{"])
)
def test_rk_reads_json_exactly_as_the_json_module_does(data: bytes | str) -> None:
    """`loads` skips json's Python layers for speed: every input must give the same value, or the same error."""
    try:
        expected = json.loads(data)
    except ValueError as exc:
        with pytest.raises(ValueError) as raised:
            loads(data)
        assert (type(raised.value), str(raised.value)) == (type(exc), str(exc))
        return
    assert canonical(loads(data)) == canonical(expected)


@each("meter")
@FUZZ
@given(
    body=st.binary(max_size=200)
    | st.builds(encode, json_values | corrupted().map(lambda event: event[1]), st.booleans())
    | event_data.map(lambda text: text.encode("utf-8", "surrogatepass"))
)
# Found by this property, kept: nesting past what json parses; an output, or its content, not a list.
@example(body=nested(5000).encode())
@example(body=b'{"output": true}')
@example(body=b'{"output": [{"type": "message", "content": "Hello"}]}')
def test_any_response_body_never_crashes_a_whole_meter(endpoint: Endpoint, body: bytes) -> None:
    """Any bytes, any JSON, nesting past what Python's json parses: a whole response is always metered to a
    sane result."""
    assert_sane(endpoint.meter(body))


# -- request parsing --------------------------------------------------------------------------------------


@each("parse")
@FUZZ
@given(body=request_bodies)
# Found by this property, kept: a lone surrogate (a legal JSON escape) in a stream that did not ask for usage.
@example(body=b'{"model": "m", "stream": true, "stream_options": {}, "messages": "\\ud800"}')
def test_any_request_body_is_read_or_refused_with_a_message(endpoint: Endpoint, body: bytes) -> None:
    """Any bytes or JSON: the parser returns a request, or refuses it with a ValueError whose message is
    one for the client (it becomes the 400's message). A request it reads goes upstream as the client's
    own JSON (with at most stream usage forced on), and `--strict`'s bound is never below the estimate."""
    try:
        req = endpoint.parse(body)
    except ValueError as exc:
        assert str(exc).startswith("rk: "), exc
        return
    sent = json.loads(req.body)
    client = json.loads(body)
    if req.hide_usage:
        options = client.pop("stream_options", None)
        forced = {**(options if isinstance(options, dict) else {}), "include_usage": True}
        assert canonical(sent.pop("stream_options")) == canonical(forced)
    assert canonical(sent) == canonical(client)
    assert isinstance(req.model, str) and req.model.strip() and isinstance(req.stream, bool)
    assert 0 <= req.input_tokens <= req.input_bound


contents = texts | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": texts}), max_size=3)
chat_messages = st.lists(
    st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]), "content": contents}),
    max_size=4,
)
limits = st.integers(1, 10**6)
stream_options = st.fixed_dictionaries({}, optional={"include_usage": st.booleans(), "x": st.integers()})
# Per route: a valid request's fields (each optional one drawn or left out), and the output limit it sets.
VALID = {
    oa.CHAT.path: (
        {"messages": chat_messages},
        {"stream": st.booleans(), "stream_options": stream_options, "n": st.integers(1, 8)}
        | {"max_tokens": limits, "max_completion_tokens": limits},
        lambda obj: obj.get("max_completion_tokens") or obj.get("max_tokens"),
    ),
    oa.COMPLETIONS.path: (
        {"prompt": texts | st.lists(texts, max_size=3)},
        {"stream": st.booleans(), "stream_options": stream_options, "n": st.integers(1, 8), "max_tokens": limits},
        lambda obj: obj.get("max_tokens", oa.COMPLETIONS_DEFAULT_MAX_TOKENS),
    ),
    oa.RESPONSES.path: (
        {"input": texts | chat_messages},
        {"stream": st.booleans(), "instructions": texts, "max_output_tokens": limits},
        lambda obj: obj.get("max_output_tokens"),
    ),
    oa.EMBEDDINGS.path: (
        {"input": texts | st.lists(texts, min_size=1, max_size=3)},
        {"stream": st.just(False), "dimensions": limits},
        lambda obj: 0,
    ),
    an.MESSAGES.path: (
        {"messages": chat_messages},
        {"stream": st.booleans(), "system": texts, "max_tokens": limits},
        lambda obj: obj.get("max_tokens"),
    ),
}


@each("parse")
@FUZZ
@given(data=st.data(), ascii=st.booleans())
def test_a_valid_request_is_read_as_it_says(endpoint: Endpoint, data: st.DataObject, ascii: bool) -> None:
    """For any model, messages (lone surrogates included), stream flag, output limit and `n`, the parsed
    request carries what the body says, and goes upstream byte for byte unless rk must force stream usage
    on, which then is the only change."""
    required, optional, limit = VALID[endpoint.path]
    obj = data.draw(st.fixed_dictionaries({"model": names, **required}, optional=optional))
    body = encode(obj, ascii)

    req = endpoint.parse(body)

    assert (req.model, req.stream, req.max_output_tokens) == (obj["model"], obj.get("stream", False), limit(obj))
    assert req.choices == obj.get("n", 1)
    options = obj.get("stream_options", {})
    assert req.hide_usage == (endpoint in (oa.CHAT, oa.COMPLETIONS) and req.stream and not options.get("include_usage"))
    if req.hide_usage:
        assert json.loads(req.body) == {**obj, "stream_options": {**options, "include_usage": True}}
    else:
        assert req.body is body
