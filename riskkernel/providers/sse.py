"""An incremental, sans-IO Server-Sent Events decoder that keeps every event's exact bytes.

`feed(bytes)` returns the events completed by those bytes; `flush()` returns what is left at the end of
the stream. Each event carries `raw`, the exact bytes it arrived as (terminating blank line included), so
a relay can forward events unchanged, drop one, or hold one back, and the bytes it forwards are always
the upstream's own. Line endings are LF, CRLF or CR, as the SSE specification allows; an event may be
split across any number of feeds.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class Event:
    raw: bytes
    event: str | None = None
    data: str | None = None  # data lines joined by "\n"; None when the block had no data field


class SSEDecoder:
    __slots__ = ("_buf", "_data", "_event", "_pos")

    def __init__(self) -> None:
        self._buf = b""  # bytes of the event being received
        self._pos = 0  # where the next unparsed line starts in _buf
        self._event: str | None = None
        self._data: list[str] = []

    def __len__(self) -> int:
        """Bytes held for an event not yet complete."""
        return len(self._buf)

    def feed(self, chunk: bytes) -> list[Event]:
        events: list[Event] = []
        start = 0
        if self._buf:
            buf = self._buf + chunk
        else:
            buf = chunk
            if b"\r" not in chunk:
                start = self._plain_events(chunk, events)
        pos = self._pos + start
        end = len(buf)
        while pos < end:
            lf = buf.find(b"\n", pos)
            cr = buf.find(b"\r", pos, end if lf < 0 else lf)
            if cr >= 0:
                if cr + 1 == end:
                    break  # a CR at the end may be the first half of a CRLF: wait for the next byte
                line_end = cr
                nxt = cr + 2 if buf[cr + 1] == 0x0A else cr + 1
            elif lf >= 0:
                line_end, nxt = lf, lf + 1
            else:
                break
            if line_end == pos:
                events.append(self._dispatch(buf[start:nxt]))
                start = nxt
            else:
                self._field(buf[pos:line_end])
            pos = nxt
        self._buf = buf[start:]
        self._pos = pos - start
        return events

    def plain_prefix(self, chunk: bytes) -> int:
        """How many bytes at the start of `chunk` are whole events of one `data: ` line each, ended by LF
        (what nearly every stream sends): a caller may take those itself, at once, and `feed` the rest.
        0 while an event is incomplete.

        Checked with counts, not event by event. The prefix ends with a blank line; if it holds 2k LFs and
        k-1 blank lines followed by `data: `, each of those is a run of exactly two LFs, and so is its end:
        every other run would add LFs and no event."""
        if self._buf:
            return 0
        end = chunk.rfind(b"\n\n") + 2
        if end < 2 or not chunk.startswith(b"data: ") or chunk.find(b"\r", 0, end) >= 0:
            return 0
        lfs = chunk.count(b"\n", 0, end)
        return end if lfs % 2 == 0 and chunk.count(b"\n\ndata: ", 0, end) == lfs // 2 - 1 else 0

    @staticmethod
    def _plain_events(chunk: bytes, events: list[Event]) -> int:
        """The fast path, for what nearly every stream sends: events of one `data: ` line, ended by LF. Takes
        those from the start of `chunk` (which has no CR) and returns where the first other one starts."""
        pos = 0
        while chunk.startswith(b"data: ", pos):
            end = chunk.find(b"\n", pos)
            if end < 0 or chunk[end + 1 : end + 2] != b"\n":
                break  # incomplete, or more lines than one: the general parser takes it from here
            events.append(Event(chunk[pos : end + 2], None, chunk[pos + 6 : end].decode("utf-8", "replace")))
            pos = end + 2
        return pos

    def flush(self) -> tuple[bytes, Event | None]:
        """End of stream: the bytes of an unterminated last event, and that event if it carried data.

        The specification discards an unterminated event; clients differ, so the caller decides what to
        do with it (a relay forwards the bytes either way).
        """
        buf, pos = self._buf, self._pos
        if pos < len(buf):
            self._field(buf[pos:].rstrip(b"\r\n"))
        event = self._dispatch(buf) if self._data else None
        self._buf, self._pos = b"", 0
        self._event, self._data = None, []
        return buf, event

    def _field(self, line: bytes) -> None:
        if line[:1] == b":":
            return
        name, colon, value = line.partition(b":")
        if colon and value[:1] == b" ":
            value = value[1:]
        if name == b"data":
            self._data.append(value.decode("utf-8", "replace"))
        elif name == b"event":
            self._event = value.decode("utf-8", "replace")

    def _dispatch(self, raw: bytes) -> Event:
        event = Event(raw, self._event, "\n".join(self._data) if self._data else None)
        self._event, self._data = None, []
        return event
