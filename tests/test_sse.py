import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from riskkernel.providers.sse import Event, SSEDecoder

TRANSCRIPT = (
    b": keep-alive comment\n\n"
    b'data: {"a":1}\n\n'
    b"event: message_delta\r\ndata: line one\r\ndata: line two\r\n\r\n"
    b"id: 7\rretry: 10\rdata:no-space\r\r"
    b"data: \xc3\xa9t\xc3\xa9 caf\xc3\xa9\n\n"
    b"data: [DONE]\n\n"
)
EXPECTED = [
    (None, None),
    (None, '{"a":1}'),
    ("message_delta", "line one\nline two"),
    (None, "no-space"),
    (None, "été café"),
    (None, "[DONE]"),
]


def decode(chunks: list[bytes]) -> tuple[list[Event], bytes, Event | None]:
    decoder = SSEDecoder()
    events = [event for chunk in chunks for event in decoder.feed(chunk)]
    tail, last = decoder.flush()
    return events, tail, last


def test_events_fields_and_raw_bytes() -> None:
    events, tail, last = decode([TRANSCRIPT])
    assert [(e.event, e.data) for e in events] == EXPECTED
    assert b"".join(e.raw for e in events) == TRANSCRIPT
    assert tail == b"" and last is None


@pytest.mark.parametrize("offset", range(len(TRANSCRIPT) + 1))
def test_split_at_every_byte_offset_gives_the_same_events(offset: int) -> None:
    events, tail, _ = decode([TRANSCRIPT[:offset], TRANSCRIPT[offset:]])
    assert [(e.event, e.data) for e in events] == EXPECTED
    assert b"".join(e.raw for e in events) + tail == TRANSCRIPT


def test_byte_by_byte_feeding() -> None:
    events, tail, _ = decode([TRANSCRIPT[i : i + 1] for i in range(len(TRANSCRIPT))])
    assert [(e.event, e.data) for e in events] == EXPECTED
    assert b"".join(e.raw for e in events) + tail == TRANSCRIPT


def test_an_unterminated_last_event_is_returned_by_flush() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b'data: {"x":1}\n\ndata: [DONE]') != []
    assert len(decoder) == len(b"data: [DONE]")
    tail, last = decoder.flush()
    assert tail == b"data: [DONE]"
    assert last is not None and last.data == "[DONE]"


def test_a_trailing_cr_waits_for_a_possible_lf() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: x\r\n\r") == []
    (event,) = decoder.feed(b"\n")
    assert event.data == "x" and event.raw == b"data: x\r\n\r\n"


@given(st.lists(st.binary(max_size=40), max_size=30))
def test_arbitrary_bytes_never_crash_and_are_all_accounted_for(chunks: list[bytes]) -> None:
    events, tail, _ = decode(chunks)
    assert b"".join(e.raw for e in events) + tail == b"".join(chunks)


@given(st.data())
def test_arbitrary_chunking_of_a_transcript_gives_the_same_events(data: st.DataObject) -> None:
    cuts = sorted(data.draw(st.lists(st.integers(0, len(TRANSCRIPT)), max_size=12)))
    bounds = [0, *cuts, len(TRANSCRIPT)]
    events, tail, _ = decode([TRANSCRIPT[a:b] for a, b in itertools.pairwise(bounds)])
    assert [(e.event, e.data) for e in events] == EXPECTED
    assert tail == b""
