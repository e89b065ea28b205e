import itertools
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from riskkernel.models import Usage
from riskkernel.providers import ErrorKind, Position, meter_chunk
from riskkernel.providers import openai as oa
from riskkernel.providers.sse import SSEDecoder
from tests.fakes import Reply, compact, usage

TOOLS_REQUEST = {
    "model": "gpt-4o",
    "messages": [{"role": "user", "content": "weather in Paris?"}],
    "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}],
}


def test_a_non_streaming_request_goes_upstream_byte_for_byte() -> None:
    body = json.dumps(TOOLS_REQUEST, indent=1).encode()
    req = oa.parse_chat(body)
    assert req.body is body
    assert (req.model, req.stream, req.hide_usage) == ("gpt-4o", False, False)


def test_stream_usage_is_forced_by_appending_one_field() -> None:
    body = compact({**TOOLS_REQUEST, "stream": True})
    req = oa.parse_chat(body)
    assert req.hide_usage
    assert req.body == body[:-1] + b',"stream_options":{"include_usage":true}}'
    assert json.loads(req.body)["stream_options"] == {"include_usage": True}


def test_existing_stream_options_are_kept_when_usage_is_forced() -> None:
    body = compact({**TOOLS_REQUEST, "stream": True, "stream_options": {"include_usage": False, "x": 1}})
    req = oa.parse_chat(body)
    sent = json.loads(req.body)
    assert sent["stream_options"] == {"include_usage": True, "x": 1}
    assert {k: v for k, v in sent.items() if k != "stream_options"} == {**TOOLS_REQUEST, "stream": True}


def test_a_client_that_asked_for_usage_is_left_alone() -> None:
    body = compact({**TOOLS_REQUEST, "stream": True, "stream_options": {"include_usage": True}})
    req = oa.parse_chat(body)
    assert req.body is body and not req.hide_usage


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b'{"messages": []}', "names no model"),
        (b'{"model": "  "}', "names no model"),
        (b'{"model": "gpt-4o", "stream": "yes"}', "`stream` must be"),
        (b"\xff\xfe{", "not valid JSON"),
    ],
)
def test_malformed_requests_are_rejected_with_a_message(body: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        oa.parse_chat(body)


def test_output_limit_and_input_estimate() -> None:
    req = oa.parse_chat(compact({**TOOLS_REQUEST, "max_completion_tokens": 300, "max_tokens": 9}))
    assert req.max_output_tokens == 300
    assert 10 < req.input_tokens < 40
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 100_000}}
    with_image = {"model": "gpt-4o", "messages": [{"role": "user", "content": [image]}]}
    assert 1000 <= oa.parse_chat(compact(with_image)).input_tokens < 1010


def test_chat_usage_reads_cached_reasoning_and_audio_tokens() -> None:
    u = usage(1000, 500, cached=300, reasoning=200)
    u["prompt_tokens_details"]["audio_tokens"] = 10
    assert oa.chat_usage(u) == Usage(
        input_tokens=1000, cached_input_tokens=300, input_audio_tokens=10, output_tokens=500, reasoning_tokens=200
    )


def replay(transcript: bytes, cuts: list[int], hide_usage: bool) -> tuple[bytes, oa.Metered]:
    request = oa.Request("gpt-4o", True, b"{}", 10, None, hide_usage=hide_usage)
    meter = oa.ChatStream(request)
    decoder = SSEDecoder()
    out = []
    bounds = [0, *cuts, len(transcript)]
    for a, b in itertools.pairwise(bounds):
        for data, _ in meter_chunk(decoder, meter, transcript[a:b]):
            out.append(data)
    return b"".join(out), meter.result()


TOOL_REPLY = Reply(
    text="Checking.",
    tool_calls=[{"id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}],
    usage=usage(812, 64, cached=512, reasoning=16),
)


def test_stream_metering_is_the_same_at_every_split() -> None:
    forced = TOOL_REPLY.stream_bytes(include_usage=True)
    expected_chars = len("Checking.") + len("get_weather") + len(TOOL_REPLY.tool_calls[0]["arguments"])
    for offset in range(len(forced) + 1):
        shown, metered = replay(forced, [offset], hide_usage=True)
        assert shown == TOOL_REPLY.stream_bytes(include_usage=False), offset
        assert metered.usage == Usage(input_tokens=812, cached_input_tokens=512, output_tokens=64, reasoning_tokens=16)
        assert metered.model == "gpt-4o-2024-08-06"
        assert metered.output_chars == expected_chars
        assert metered.finish_reasons == ["tool_calls"]
    assert oa.meter_chat(TOOL_REPLY.whole()).finish_reasons == ["tool_calls"]


def test_escaped_text_is_counted_as_the_characters_it_stands_for() -> None:
    """Text arrives JSON-escaped (quotes, line breaks, non-ASCII as `\\u` escapes): what is counted is its
    characters, whether its chunks come in one network read or in many."""
    reply = Reply(text='Line one\n"two" \u2014 caf\u00e9 \U0001f600 \\ done')
    forced = reply.stream_bytes(include_usage=True)
    ends = list(itertools.accumulate(len(event.raw) for event in SSEDecoder().feed(forced)))
    # (the text's chunks in one read of their own; each in its own; all the stream in one read)
    for cuts in ([ends[0], ends[-4]], ends, []):
        shown, metered = replay(forced, cuts, hide_usage=True)
        assert shown == reply.stream_bytes(include_usage=False)
        assert metered.output_chars == len(reply.text or "") == 30


def test_a_client_that_asked_for_usage_sees_the_stream_unchanged() -> None:
    forced = TOOL_REPLY.stream_bytes(include_usage=True)
    shown, metered = replay(forced, [], hide_usage=False)
    assert shown == forced
    assert metered.usage is not None and metered.usage.input_tokens == 812


@given(st.lists(st.integers(0, len(TOOL_REPLY.stream_bytes(True))), max_size=10))
def test_stream_metering_under_arbitrary_chunking(cuts: list[int]) -> None:
    shown, metered = replay(TOOL_REPLY.stream_bytes(True), sorted(cuts), hide_usage=True)
    assert shown == TOOL_REPLY.stream_bytes(False)
    assert metered.usage is not None and metered.usage.output_tokens == 64


def test_done_is_the_terminal_event() -> None:
    meter = oa.ChatStream(oa.Request("m", True, b"{}", 1, None))
    (done,) = SSEDecoder().feed(b"data: [DONE]\n\n")
    assert meter.feed(done) == (b"data: [DONE]\n\n", Position.LAST)


def test_null_usage_is_cut_only_when_it_is_unambiguous() -> None:
    meter = oa.ChatStream(oa.Request("m", True, b"{}", 1, None, hide_usage=True))
    spaced = b'data: {"choices": [{"delta": {"content": "x"}}], "usage": null}\n\n'
    (event,) = SSEDecoder().feed(spaced)
    assert meter.feed(event)[0] == b'data: {"choices": [{"delta": {"content": "x"}}]}\n\n'
    first = b'data: {"usage":null,"choices":[]}\n\n'
    (event,) = SSEDecoder().feed(first)
    assert meter.feed(event)[0] == b'data: {"choices":[]}\n\n'


def test_mid_stream_error_events_end_the_stream_and_are_recorded() -> None:
    meter = oa.ChatStream(oa.Request("m", True, b"{}", 1, None))
    (event,) = SSEDecoder().feed(b'data: {"error": {"message": "overloaded", "type": "server_error"}}\n\n')
    assert meter.feed(event) == (event.raw, Position.LAST)  # the SDK raises on it: it is held until the row is in
    assert meter.result().error == "overloaded"


def test_error_shapes() -> None:
    assert json.loads(oa.error_body("rk: no", ErrorKind.BUDGET, "killed")) == {
        "error": {"message": "rk: no", "type": "budget_exceeded", "param": None, "code": "killed"}
    }
    (event,) = SSEDecoder().feed(oa.data_error_event("rk: cut", ErrorKind.BUDGET, "cost_budget_exceeded"))
    assert event.event is None and json.loads(event.data or "")["error"]["code"] == "cost_budget_exceeded"
    (event,) = SSEDecoder().feed(oa.responses_error_event("rk: cut", ErrorKind.BUDGET, "killed"))
    data = json.loads(event.data or "")
    assert event.event == "error" and data["type"] == "error" and data["code"] == "killed"
    assert data["error"]["message"] == "rk: cut"


def test_mock_replies_are_deterministic_and_honour_the_output_limit() -> None:
    obj = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "stream": True}
    req = oa.parse_chat(compact(obj))
    first = oa.mock_chat(req, json.loads(req.body))
    again = oa.mock_chat(req, json.loads(req.body))
    assert json.loads(first[0])["choices"] == json.loads(again[0])["choices"]
    whole = json.loads(first[0])
    assert whole["usage"]["completion_tokens"] == 5 and whole["choices"][0]["finish_reason"] == "length"
    shown, metered = replay(b"".join(first[1]), [], hide_usage=True)
    assert b'"usage"' not in shown and metered.usage is not None and metered.usage.output_tokens == 5


def test_the_usage_chunk_ends_generation_and_a_null_error_does_not_end_the_stream() -> None:
    meter = oa.ChatStream(oa.Request("m", True, b"{}", 1, None, hide_usage=True))
    events = SSEDecoder().feed(
        b'data: {"choices": [{"delta": {"content": "x"}}], "error": null}\n\n'
        b'data: {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 1}}\n\n'
    )
    assert [meter.feed(event)[1] for event in events] == [Position.MORE, Position.OVER]
    assert meter.result().error is None
