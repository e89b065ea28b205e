"""A fast fake OpenAI upstream for benchmarks: raw asyncio, keep-alive HTTP/1.1, canned answers.

POST with `"stream": true` in the body gets a 50-chunk chat completion stream (chunked encoding, with the
usage chunk and [DONE]); anything else gets a canned non-streaming chat completion. Fast enough that it
is never the bottleneck when measuring a proxy in front of it. A stream whose request has
`"user": "rk-bench-reset"` (RESET_USER) is reset (TCP RST) after RESET_AFTER chunks, as a provider that
breaks off mid-answer: bench/soak.py sends it. A stream whose connection the proxy closes stops.

    python bench/upstream.py PORT [CHUNK_DELAY_S]
"""

import asyncio
import json
import socket
import struct
import sys

RESET_USER = "rk-bench-reset"
RESET_AFTER = 5

USAGE = {
    "prompt_tokens": 120,
    "completion_tokens": 40,
    "total_tokens": 160,
    "prompt_tokens_details": {"cached_tokens": 0},
    "completion_tokens_details": {"reasoning_tokens": 0},
}
WHOLE = json.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 1764150000,
        "model": "gpt-4o-mini-2024-07-18",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello from the benchmark upstream."},
                "finish_reason": "stop",
            }
        ],
        "usage": USAGE,
    },
    separators=(",", ":"),
).encode()


def chunk(obj: dict) -> bytes:
    data = b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"
    return b"%x\r\n%s\r\n" % (len(data), data)


BASE = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1764150000, "model": "gpt-4o-mini"}
STREAM = [
    chunk({**BASE, "choices": [{"index": 0, "delta": {"content": f" token{i}"}}], "usage": None}) for i in range(50)
]
STREAM_TAIL = (
    chunk({**BASE, "choices": [], "usage": USAGE})
    + b"%x\r\ndata: [DONE]\n\n\r\n" % len(b"data: [DONE]\n\n")
    + b"0\r\n\r\n"
)
WHOLE_RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
    len(WHOLE),
    WHOLE,
)
STREAM_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"


STREAMS: set[asyncio.Task[None]] = set()  # referenced until done


class Upstream(asyncio.Protocol):
    def __init__(self, delay: float) -> None:
        self.buf = b""
        self.delay = delay

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            head_end = self.buf.find(b"\r\n\r\n")
            if head_end < 0:
                return
            head = self.buf[:head_end].lower()
            length = 0
            at = head.find(b"content-length:")
            if at >= 0:
                length = int(head[at + 15 : head.find(b"\r\n", at) if head.find(b"\r\n", at) > 0 else None])
            end = head_end + 4 + length
            if len(self.buf) < end:
                return
            body, self.buf = self.buf[head_end + 4 : end], self.buf[end:]
            body = body.replace(b" ", b"")
            if b'"stream":true' in body:
                task = asyncio.ensure_future(self.stream(b'"user":"%s"' % RESET_USER.encode() in body))
                STREAMS.add(task)
                task.add_done_callback(STREAMS.discard)
            else:
                self.transport.write(WHOLE_RESPONSE)  # type: ignore[attr-defined]

    async def stream(self, reset: bool = False) -> None:
        transport = self.transport
        transport.write(STREAM_HEAD)  # type: ignore[attr-defined]
        for n, piece in enumerate(STREAM):
            if transport.is_closing():
                return  # the proxy hung up (its client left): stop, as a provider stops generating
            if reset and n == RESET_AFTER:
                # SO_LINGER 0: close() sends an RST, not a FIN, as a provider's load balancer dropping the connection
                sock = transport.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                transport.abort()
                return
            transport.write(piece)  # type: ignore[attr-defined]
            if self.delay:
                await asyncio.sleep(self.delay)
        if not transport.is_closing():
            transport.write(STREAM_TAIL)  # type: ignore[attr-defined]


async def main(port: int, delay: float) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Upstream(delay), "127.0.0.1", port, backlog=1024)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), float(sys.argv[2]) if len(sys.argv) > 2 else 0.0))
