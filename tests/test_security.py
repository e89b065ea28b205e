"""Security, end to end, against `rk run` and `rk serve` as real processes: API keys and the serve token never
land in anything rk writes or answers, rk's files are private, it listens on loopback only unless told to
(and then nothing answers without the token), `rk serve` refuses run ids and paths it cannot trust before
anything is forwarded or created, and calls never cross from one run to another, however they share a
connection or try to hide inside one another."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import socket
import stat
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import anthropic
import httpx2
import openai
import pytest

from riskkernel import paths
from riskkernel.ledger import store
from tests.conftest import Finished, StartProxy, rk
from tests.fakes import FakeUpstream, MessagesReply, Reply, compact, usage
from tests.test_run_cli import PY
from tests.test_serve import calls_of

# Marker secrets: distinctive enough that any 9 characters of their secret part, in any casing, found in
# an artifact can only have come from the secret itself.
OPENAI_KEY = "sk-proj-OAImarkQzvX7Wp3Jr9Lt2Hy5Kb8Nd4Fg6Sc1Vm0"
ANTHROPIC_KEY = "sk-ant-api03-ANTmarkZqWv2Xr8Ty4Up6Io1Lk3Jh5Gf7Ds9Ae0"
SERVE_TOKEN = "TOKmarkYwQz4Vx8Rn2Mp6Lt0Kj3Hg7Fd5Sb9Ac1"
PUBLIC_PREFIXES = ("sk-proj-", "sk-ant-api03-")  # what every key of its kind starts with: not secret
HI: Any = [{"role": "user", "content": "hi"}]
CHAT_BODY = compact({"model": "gpt-4o", "messages": HI})
MESSAGES_BODY = compact({"model": "claude-sonnet-4-6", "max_tokens": 50, "messages": HI})
ANTHROPIC_HEADERS = (b"x-api-key: " + ANTHROPIC_KEY.encode(), b"anthropic-version: 2023-06-01")
OPENAI_HEADERS = (b"Authorization: Bearer " + OPENAI_KEY.encode(),)
needs_proc = pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads Linux's /proc")


# -- finding secrets ---------------------------------------------------------------------------------------


def fragments(secret: str, size: int = 9) -> set[bytes]:
    """Every run of `size` characters of the secret part of `secret`, lower-cased."""
    for prefix in PUBLIC_PREFIXES:
        secret = secret.removeprefix(prefix)
    low = secret.lower().encode()
    return {low[i : i + size] for i in range(len(low) - size + 1)}


def leaks(artifacts: dict[str, bytes], *secrets: str) -> list[str]:
    """Which artifacts hold part of a secret, in any casing, and which part."""
    found = []
    for name, blob in artifacts.items():
        low = blob.lower()
        for secret in secrets:
            hits = sorted(part.decode() for part in fragments(secret) if part in low)
            if hits:
                found.append(f"{name}: {hits[0]!r}")
    return found


def files_under(root: Path, label: str, skip: Iterable[Path] = ()) -> dict[str, bytes]:
    skipped = set(skip)
    return {
        f"{label}/{path.relative_to(root)}": path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_file() and path not in skipped
    }


# -- rk as a process ---------------------------------------------------------------------------------------


def closed_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Served:
    """An `rk serve` process."""

    proc: asyncio.subprocess.Process
    url: str  # as it announced itself
    port: int
    stderr: bytes = b""

    @property
    def local(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def stop(self) -> bytes:
        """SIGTERM it, wait, and return all it wrote to stderr."""
        if self.proc.returncode is None:
            self.proc.terminate()
        assert self.proc.stderr is not None
        self.stderr += await asyncio.wait_for(self.proc.stderr.read(), 20)
        await asyncio.wait_for(self.proc.wait(), 20)
        return self.stderr


StartServe = Callable[..., Awaitable[Served]]


@pytest.fixture
async def start_serve(fake: FakeUpstream) -> AsyncIterator[StartServe]:
    started: list[Served] = []

    async def begin(*args: str, env: dict[str, str] | None = None) -> Served:
        upstreams = {"OPENAI_BASE_URL": fake.url, "ANTHROPIC_BASE_URL": fake.root}
        proc = await asyncio.create_subprocess_exec(
            PY, "-m", "riskkernel", "serve", "--port", "0", *args,
            env={**os.environ, **upstreams, **(env or {})}, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert proc.stderr is not None
        first = await asyncio.wait_for(proc.stderr.readline(), 20)
        served = Served(proc, "", 0, first)
        started.append(served)
        assert first.startswith(b"rk serve: http://"), first + await proc.stderr.read()
        served.url = first.split()[2].decode()
        served.port = int(served.url.rsplit(":", 1)[1])
        return served

    yield begin
    for served in started:
        await served.stop()


def ledger_runs() -> dict[str, store.RunRecord]:
    db = store.open_reader(paths.ledger_path())
    if db is None:
        return {}
    try:
        return {run.run_id: run for run in store.list_runs(db, None)}
    finally:
        db.close()


def listening(pid: int) -> list[tuple[str, int]]:
    """The TCP addresses process `pid` listens on: its sockets, looked up in the kernel's socket tables."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    found = []
    for table, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A" or fields[9] not in inodes:  # 0A: LISTEN
                continue
            address, port = fields[1].split(":")
            raw = bytes.fromhex(address)  # host byte order, 32 bits at a time
            packed = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            found.append((socket.inet_ntop(family, packed), int(port, 16)))
    return found


def own_addresses() -> list[str]:
    """This machine's own IPv4 addresses beyond loopback (its kernel's local routes)."""
    try:
        lines = Path("/proc/net/fib_trie").read_text().splitlines()
    except OSError:
        return []
    local = {before.split()[-1] for before, line in itertools.pairwise(lines) if "/32 host LOCAL" in line}
    return sorted(address for address in local if not address.startswith("127."))


async def refused_at(host: str, port: int) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 5)
    except ConnectionRefusedError:
        return True
    writer.close()
    return False


# -- raw HTTP/1.1, for what no HTTP client will send -------------------------------------------------------


def http(path: bytes, *headers: bytes, body: bytes = CHAT_BODY, method: bytes = b"POST", length: bool = True) -> bytes:
    """One request, byte for byte as given (headers: whole lines, without their CRLF)."""
    lines = [method + b" " + path + b" HTTP/1.1", b"Host: rk.test", b"Content-Type: application/json", *headers]
    if length:
        lines.append(b"Content-Length: " + str(len(body)).encode())
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


@dataclass
class Raw:
    status: int
    headers: dict[str, str]  # lower-cased names
    body: bytes
    head: bytes = b""

    def json(self) -> Any:
        return json.loads(self.body)


async def read_response(reader: asyncio.StreamReader) -> Raw:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
    headers.pop("", None)
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding") == "chunked":
        body = b""
        while size := int((await reader.readuntil(b"\r\n")).strip(), 16):
            body += await reader.readexactly(size)
            await reader.readexactly(2)
        await reader.readuntil(b"\r\n")
    else:
        body = await reader.read()
    return Raw(int(lines[0].split()[1]), headers, body, head)


async def exchange(
    port: int, data: bytes, count: int = 1, host: str = "127.0.0.1", linger: float = 0.0
) -> tuple[list[Raw], bytes]:
    """Send `data` on one new connection, read `count` responses, then whatever else comes within `linger`
    seconds (a response to a request `data` should not have held)."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(data)
        await writer.drain()
        responses = [await asyncio.wait_for(read_response(reader), 10) for _ in range(count)]
        rest = b""
        try:
            while linger and (chunk := await asyncio.wait_for(reader.read(65536), linger)):
                rest += chunk
        except (TimeoutError, ConnectionError):
            pass
        return responses, rest
    finally:
        writer.close()


def provider_shaped(response: Raw, anthropic_route: bool) -> bool:
    """Whether an error body is rk's own, in the provider's error shape, so the SDK raises its usual error."""
    try:
        body = response.json()
    except ValueError:
        return False
    if anthropic_route:
        error = body.get("error") or {}
        return body.get("type") == "error" and str(error.get("message", "")).startswith("rk:") and "type" in error
    error = body.get("error") or {}
    return {"message", "type", "param", "code"} <= set(error) and str(error["message"]).startswith("rk:")


async def a_normal_call_works(base: str, run: str = "still-serving", **headers: str) -> None:
    async with openai.AsyncOpenAI(
        base_url=f"{base}/v1",
        api_key=OPENAI_KEY,
        max_retries=0,
        default_headers={"X-RiskKernel-Run-Id": run, **headers},
    ) as client:
        raw = await client.chat.completions.with_raw_response.create(model="gpt-4o", messages=HI)
    assert raw.headers["x-riskkernel-run-id"] == run and raw.parse().choices[0].message.content


# -- 1. secrets in everything rk writes --------------------------------------------------------------------

# The child keeps every answer it gets from rk, headers and body, one file each (named `N.STATUS`), and
# prints what each call came to; at the end it copies the data dir as it is while rk runs (the ledger's
# -wal and -shm files and rk's control file live only that long).
AGENT_PRELUDE = r"""
import itertools, json, os, pathlib, sys, urllib.error, urllib.request

received, snapshot = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
received.mkdir(exist_ok=True)
numbers = itertools.count()
HI = [{"role": "user", "content": "hi"}]
openai_auth = {"Authorization": "Bearer " + os.environ["OPENAI_API_KEY"], "Content-Type": "application/json"}
claude_auth = {"x-api-key": os.environ["ANTHROPIC_API_KEY"], "anthropic-version": "2023-06-01"}
claude_auth["Content-Type"] = "application/json"

def keep(status, headers, body):
    name = received / f"{next(numbers):02}.{status}"
    name.with_suffix(f".{status}.headers").write_text(json.dumps(headers))
    name.with_suffix(f".{status}.body").write_bytes(body)

def post(name, path, headers, body):  # what no SDK would send
    request = urllib.request.Request(os.environ["RK_PROXY_URL"] + path, data=body, headers=headers, method="POST")
    try:
        with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(request, timeout=30) as response:
            status, headers, content = response.status, response.headers.items(), response.read()
    except urllib.error.HTTPError as exc:
        status, headers, content = exc.code, exc.headers.items(), exc.read()
    keep(status, headers, content)
    print(name, status, flush=True)
    return status

def copy_data_dir():
    home = pathlib.Path(os.environ["RK_HOME"])
    for path in home.rglob("*"):
        if path.is_file():
            copy = snapshot / path.relative_to(home)
            copy.parent.mkdir(parents=True, exist_ok=True)
            copy.write_bytes(path.read_bytes())
"""

# Every kind of call, through both SDKs, each of whose answers is kept.
SDK_AGENT = (
    AGENT_PRELUDE
    + r"""
import anthropic, openai

def record(response):
    response.read()
    keep(response.status_code, [[k.decode(), v.decode()] for k, v in response.headers.raw], response.content)

hooks = {"response": [record]}
client = openai.OpenAI(max_retries=0, http_client=openai.DefaultHttpxClient(event_hooks=hooks))
claude = anthropic.Anthropic(max_retries=0, http_client=anthropic.DefaultHttpxClient(event_hooks=hooks))

def attempt(name, call):
    try:
        call()
        print(name, "ok", flush=True)
    except (openai.APIStatusError, anthropic.APIStatusError) as exc:
        print(name, exc.status_code, flush=True)
    except (openai.APIError, anthropic.APIError) as exc:  # an error event ended a stream
        keep("event", [], exc.message.encode())
        print(name, "error event", flush=True)

def chat(**kw):
    return client.chat.completions.create(model="gpt-4o", messages=HI, **kw)

def messages(**kw):
    return claude.messages.create(model="claude-sonnet-4-6", max_tokens=50, messages=HI, **kw)

attempt("chat", chat)
attempt("chat-stream", lambda: list(chat(stream=True)))
attempt("messages", messages)
attempt("messages-stream", lambda: list(messages(stream=True)))
attempt("chat-key-echoed", chat)
attempt("messages-key-echoed", messages)
attempt("models", lambda: client.models.list())
attempt("chat-no-model", lambda: client.chat.completions.create(model="", messages=HI))
post("chat-malformed", "/v1/chat/completions", openai_auth, b'{"model": "gpt-4o", "messages": [')
post("messages-malformed", "/v1/messages", claude_auth, b'{"model": ')
for _ in range(20):
    attempt("chat-until-refused", chat)
    if any(received.glob("*.402.body")):
        break
copy_data_dir()
"""
)

# The same calls, against upstreams that cannot be reached: rk's 502s are the same whoever the client is,
# so this one spares itself the SDKs' import time.
RAW_AGENT = (
    AGENT_PRELUDE
    + r"""
chat = json.dumps({"model": "gpt-4o", "messages": HI})
messages = json.dumps({"model": "claude-sonnet-4-6", "max_tokens": 50, "messages": HI})
post("chat", "/v1/chat/completions", openai_auth, chat.encode())
post("chat-stream", "/v1/chat/completions", openai_auth, chat.replace("{", '{"stream": true, ', 1).encode())
post("messages", "/v1/messages", claude_auth, messages.encode())
post("messages-stream", "/v1/messages", claude_auth, messages.replace("{", '{"stream": true, ', 1).encode())
for _ in range(20):
    if post("chat-until-refused", "/v1/chat/completions", openai_auth, chat.encode()) == 402:
        break
copy_data_dir()
"""
)


async def test_api_keys_appear_in_nothing_rk_writes_or_answers(
    tmp_path: Path, fake: FakeUpstream, rk_home: Path
) -> None:
    # Upstreams that echo the key they were given, as OpenAI's "Incorrect API key provided" does.
    openai_echo = compact({"error": {"message": f"Incorrect API key provided: {OPENAI_KEY}.", "type": "x"}})
    anthropic_echo = compact(
        {"type": "error", "error": {"type": "authentication_error", "message": f"invalid x-api-key: {ANTHROPIC_KEY}"}}
    )
    fake.script(
        Reply(),
        Reply(),
        MessagesReply(),
        MessagesReply(),
        Reply(status=401, body=openai_echo),
        MessagesReply(status=401, body=anthropic_echo),
        Reply(),
    )
    agents = {"reachable": tmp_path / "sdk_agent.py", "unreachable": tmp_path / "raw_agent.py"}
    agents["reachable"].write_text(SDK_AGENT)
    agents["unreachable"].write_text(RAW_AGENT)
    step_summary = tmp_path / "step-summary.md"
    keys = {"OPENAI_API_KEY": OPENAI_KEY, "ANTHROPIC_API_KEY": ANTHROPIC_KEY, "GITHUB_STEP_SUMMARY": str(step_summary)}
    nowhere = f"http://127.0.0.1:{closed_port()}"
    upstreams = {
        "reachable": {"OPENAI_BASE_URL": fake.url, "ANTHROPIC_BASE_URL": fake.root},
        "unreachable": {"OPENAI_BASE_URL": f"{nowhere}/v1", "ANTHROPIC_BASE_URL": nowhere},
    }
    artifacts: dict[str, bytes] = {}
    run_ids = {}

    def run(label: str, env: dict[str, str]) -> Awaitable[Finished]:
        received, snapshot = str(tmp_path / f"received-{label}"), str(tmp_path / f"snapshot-{label}")
        flags = ("--max-calls", "10", "--name", label, "--json", str(tmp_path / label))
        keys_as_arguments = ("--api-key", OPENAI_KEY, "--claude-key", ANTHROPIC_KEY)
        child = (PY, str(agents[label]), received, snapshot, *keys_as_arguments)
        return rk("run", *flags, "--", *child, env={**keys, **env})

    finished = await asyncio.gather(*(run(label, env) for label, env in upstreams.items()))
    for label, done in zip(upstreams, finished, strict=True):
        received, snapshot, summary = tmp_path / f"received-{label}", tmp_path / f"snapshot-{label}", tmp_path / label
        out = done.stdout.decode()
        assert done.status == 3 and "chat-until-refused 402" in out, (out, done.stderr)  # halted by --max-calls
        artifacts |= {f"rk run ({label}) stdout": done.stdout, f"rk run ({label}) stderr": done.stderr.encode()}
        artifacts |= files_under(snapshot, f"data dir while rk ran ({label})")
        artifacts[f"--json ({label})"] = summary.read_bytes()
        run_ids[label] = json.loads(summary.read_bytes())["run_id"]
        lines = set(out.splitlines())
        if label == "reachable":
            assert {"chat ok", "chat-stream ok", "messages ok", "messages-stream ok", "models ok"} <= lines, out
            assert {"chat-key-echoed 401", "messages-key-echoed 401", "chat-no-model 400"} <= lines, out
            assert {"chat-malformed 400", "messages-malformed 400"} <= lines, out
            # Upstream errors pass through with their own status and body (the contract, §3): the upstream's
            # echo of the client's own key reaches the client unchanged. It is the upstream's, not rk's: it is
            # checked for being unchanged, and left out of the scan.
            passed_through = sorted(received.glob("*.401.body"))
            assert [p.read_bytes() for p in passed_through] == [openai_echo, anthropic_echo]
            assert len(list(received.glob("*.200.body"))) >= 5  # the answers that were not errors are scanned too
        else:
            assert {"chat 502", "chat-stream 502", "messages 502", "messages-stream 502"} <= lines, out
            passed_through = []
        artifacts |= files_under(received, f"received from rk ({label})", skip=passed_through)
    artifacts["step summary"] = step_summary.read_bytes()
    assert step_summary.read_text().count("### rk") == 2

    # rk copied the upstream's error into the ledger, with the key cut out of it.
    echoed = [c for c in calls_of(run_ids["reachable"]) if c.status == 401]
    assert [c.endpoint for c in echoed] == ["/v1/chat/completions", "/v1/messages"]
    assert all(c.error and c.error.startswith("upstream: ") for c in echoed), [c.error for c in echoed]

    reading = [
        ("ledger", "list"), ("ledger", "summary"), ("ledger", "export", "-f", "json"),
        ("ledger", "export", "-f", "jsonl"), ("ledger", "export", "-f", "csv", "-o", str(tmp_path / "export.csv")),
        *(("ledger", "show", run_id, *json_flag) for run_id in run_ids.values() for json_flag in ((), ("--json",))),
    ]  # fmt: skip
    for args, done in zip(reading, await asyncio.gather(*(rk(*args) for args in reading)), strict=True):
        assert done.status == 0, (args, done.stderr)
        artifacts |= {f"rk {' '.join(args)} stdout": done.stdout, f"rk {' '.join(args)} stderr": done.stderr.encode()}
    artifacts["export -o"] = (tmp_path / "export.csv").read_bytes()
    artifacts |= files_under(rk_home, "data dir")
    assert any(name.endswith("ledger.db-wal") for name in artifacts)  # the snapshots did catch rk mid-run
    assert any("/control/" in name for name in artifacts)

    assert leaks(artifacts, OPENAI_KEY, ANTHROPIC_KEY) == []
    # What the scan is worth: the keys did travel through rk, to the upstream, unchanged.
    sent = {r.headers.get("x-api-key") or r.headers["Authorization"].removeprefix("Bearer ") for r in fake.requests}
    assert sent == {OPENAI_KEY, ANTHROPIC_KEY}
    assert leaks({"sanity": openai_echo + anthropic_echo}, OPENAI_KEY, ANTHROPIC_KEY) != []


async def test_a_key_of_any_shape_echoed_by_the_upstream_stays_out_of_the_ledger(
    fake: FakeUpstream, start_proxy: StartProxy
) -> None:
    """A gateway's key need not look like `sk-...`; rk knows the key each call carries, whatever its shape."""
    key = "gw_live_KEYmarkPq8Rs2Tu4Vw6Xy0Za3Bc5De7"
    echo = compact({"error": {"message": f"Incorrect API key provided: {key}.", "type": "invalid_request_error"}})
    fake.script(Reply(status=401, body=echo))
    proxy = await start_proxy()
    async with openai.AsyncOpenAI(base_url=f"{proxy.url}/v1", api_key=key, max_retries=0) as client:
        with pytest.raises(openai.AuthenticationError) as refused:
            await client.chat.completions.create(model="gpt-4o", messages=HI)
    assert refused.value.response.content == echo  # passed through unchanged: the upstream's own answer
    (row,) = await proxy.calls()
    assert row.status == 401 and row.error is not None
    assert leaks({"ledger error column": row.error.encode()}, key) == [], row.error


async def test_the_serve_token_stays_in_its_control_file(
    tmp_path: Path, fake: FakeUpstream, start_serve: StartServe, rk_home: Path
) -> None:
    nowhere = f"http://127.0.0.1:{closed_port()}"
    served = await start_serve("--auth-token", SERVE_TOKEN, "--max-calls", "4", "--anthropic-upstream", nowhere)
    (control_file,) = (rk_home / "control").glob("*.json")
    assert stat.S_IMODE(control_file.stat().st_mode) == 0o600 and SERVE_TOKEN in control_file.read_text()
    artifacts: dict[str, bytes] = {}

    def keep(name: str, response: httpx2.Response) -> None:
        artifacts[f"answer to {name}"] = b"%d %r\n" % (response.status_code, response.headers.raw) + response.content

    by_path = openai.AsyncOpenAI(
        base_url=f"{served.local}/t/{SERVE_TOKEN}/run/job/v1", api_key=OPENAI_KEY, max_retries=0
    )
    token_header = {"X-RiskKernel-Token": SERVE_TOKEN}
    by_header = openai.AsyncOpenAI(
        base_url=f"{served.local}/run/job/v1", api_key=OPENAI_KEY, max_retries=0, default_headers=token_header
    )
    claude = anthropic.AsyncAnthropic(
        base_url=f"{served.local}/run/job", api_key=ANTHROPIC_KEY, max_retries=0, default_headers=token_header
    )
    wrong = openai.AsyncOpenAI(base_url=f"{served.local}/t/{'x' * 20}/run/job/v1", api_key=OPENAI_KEY, max_retries=0)
    async with by_path, by_header, claude, wrong:
        raw = await by_path.chat.completions.with_raw_response.create(model="gpt-4o", messages=HI)
        keep("chat", raw.http_response)
        async with by_header.chat.completions.with_streaming_response.create(
            model="gpt-4o", messages=HI, stream=True
        ) as streamed:
            await streamed.read()
            keep("chat stream", streamed.http_response)
        keep("models", (await by_header.models.with_raw_response.list()).http_response)
        with pytest.raises(anthropic.InternalServerError) as unreachable:
            await claude.messages.create(model="claude-sonnet-4-6", max_tokens=50, messages=HI)
        keep("messages, upstream unreachable", unreachable.value.response)
        with pytest.raises(openai.AuthenticationError) as unauthorized:
            await wrong.chat.completions.create(model="gpt-4o", messages=HI)
        keep("a wrong token", unauthorized.value.response)
        for _ in range(10):
            try:
                await by_path.chat.completions.create(model="gpt-4o", messages=HI)
            except openai.APIStatusError as exc:
                assert exc.status_code == 402, exc
                keep("a refused call", exc.response)
                break
        else:
            pytest.fail("never refused")
    token = b"X-RiskKernel-Token: " + SERVE_TOKEN.encode()
    for name, request in {
        "malformed JSON": http(b"/run/job/v1/chat/completions", token, *OPENAI_HEADERS, body=b'{"model": '),
        "no model": http(b"/run/job/v1/chat/completions", token, *OPENAI_HEADERS, body=b'{"messages": []}'),
        "an invalid run id": http(b"/v1/messages", token, b"X-RiskKernel-Run-Id: ../x", *ANTHROPIC_HEADERS),
        "an unmetered POST": http(b"/t/" + SERVE_TOKEN.encode() + b"/run/job/v1/files", *OPENAI_HEADERS),
        "the /rk API": http(b"/rk/runs", b"Authorization: Bearer " + SERVE_TOKEN.encode(), method=b"GET", body=b""),
        "one run on the /rk API": http(
            b"/rk/runs/job", b"Authorization: Bearer " + SERVE_TOKEN.encode(), method=b"GET", body=b""
        ),
    }.items():
        (response,), _ = await exchange(served.port, request)
        assert response.status in (200, 400, 402, 404), (name, response)
        artifacts[f"answer to {name}"] = response.head + response.body
    artifacts |= files_under(rk_home, "data dir while rk serve runs", skip=[control_file])

    artifacts["rk serve stderr"] = await served.stop()
    for args in (("ledger", "list", "--json"), ("ledger", "show", "job"), ("ledger", "export", "-f", "csv")):
        done = await rk(*args)
        artifacts |= {f"rk {' '.join(args)}": done.stdout + done.stderr.encode()}
    artifacts |= files_under(rk_home, "data dir")
    assert not control_file.exists()
    # The upstream (a third party) never gets rk's token either: not in a path, a header or a body.
    artifacts |= {f"upstream request {n}": repr(seen).encode() for n, seen in enumerate(fake.requests)}

    assert leaks(artifacts, SERVE_TOKEN) == []
    assert {c.status for c in calls_of("job")} >= {200, 502, 402}
    assert len(fake.requests) >= 4


async def test_rk_serve_does_not_echo_its_token_in_an_unknown_route_error(start_serve: StartServe) -> None:
    """A client's base URL mistyped (`/v2` for `/v1`) is a 404 whose message SDKs raise and frameworks log."""
    served = await start_serve("--auth-token", SERVE_TOKEN)
    prefix = b"/t/" + SERVE_TOKEN.encode()
    for path in (
        prefix + b"/run/job/v2/chat/completions",  # /v2 for /v1
        prefix + b"/run/job/chat/completions",  # no /v1
        prefix + b"/runs/job/v1/chat/completions",  # /runs for /run
    ):
        (response,), _ = await exchange(served.port, http(path, *OPENAI_HEADERS))
        assert response.status == 404 and provider_shaped(response, anthropic_route=False), response
        assert leaks({path.decode(): response.head + response.body}, SERVE_TOKEN) == [], response.body


# -- 2. permissions ----------------------------------------------------------------------------------------

MODES_AGENT = """
import json, os, pathlib, urllib.request
body = json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}).encode()
headers = {"Content-Type": "application/json", "Authorization": "Bearer sk-x"}
call = urllib.request.Request(os.environ["OPENAI_BASE_URL"] + "/chat/completions", data=body, headers=headers)
urllib.request.build_opener(urllib.request.ProxyHandler({})).open(call).read()
home = pathlib.Path(os.environ["RK_HOME"])
print(json.dumps({str(p.relative_to(home)): p.stat().st_mode for p in [home, *home.rglob("*")]}))
"""


@pytest.mark.parametrize("data_dir", ["new", "made by someone else"])
async def test_rks_files_are_private_under_a_permissive_umask(tmp_path: Path, rk_home: Path, data_dir: str) -> None:
    if data_dir != "new":
        rk_home.mkdir(mode=0o755)  # e.g. a CI step's mkdir
    script = tmp_path / "modes.py"
    script.write_text(MODES_AGENT)
    done = await rk("run", "--mock", "--quiet", "--", PY, str(script), umask=0o022)
    assert done.status == 0, done.stderr
    modes = {name: stat.S_IMODE(mode) for name, mode in json.loads(done.stdout).items()}  # while rk runs
    control = [name for name in modes if name.startswith("control/")]
    assert len(control) == 1 and control[0].endswith(".json")
    expected = {"ledger.db": 0o600, "ledger.db-wal": 0o600, "ledger.db-shm": 0o600, "control": 0o700, control[0]: 0o600}
    if data_dir == "new":
        expected["."] = 0o700
    else:
        del modes["."]  # rk leaves the mode of a directory it did not make alone; what it puts in it is private
    assert modes == expected
    assert stat.S_IMODE((rk_home / "ledger.db").stat().st_mode) == 0o600  # and after it has closed


# -- 3. loopback only, unless told otherwise, and then behind the token ------------------------------------


@needs_proc
async def test_rk_run_listens_on_loopback_only(tmp_path: Path) -> None:
    script = "import os, sys; print(os.environ['RK_PROXY_URL'], flush=True); sys.stdin.readline()"
    proc = await asyncio.create_subprocess_exec(
        PY, "-m", "riskkernel", "run", "--mock", "--quiet", "--", PY, "-c", script,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdin is not None and proc.stdout is not None
    try:
        proxy_url = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode().strip()
        port = int(proxy_url.rsplit(":", 1)[1])
        bound = listening(proc.pid)
        from_outside = [address for address in own_addresses() if not await refused_at(address, port)]
    finally:
        proc.stdin.write(b"\n")
        await asyncio.wait_for(proc.communicate(), 20)
    assert from_outside == []
    assert port in {p for _, p in bound} and len(bound) == 2  # the proxy and the --mock upstream
    assert {host for host, _ in bound} == {"127.0.0.1"}, bound
    assert proc.returncode == 0


@needs_proc
async def test_rk_serve_listens_on_loopback_only_by_default(start_serve: StartServe) -> None:
    served = await start_serve("--mock")
    bound = listening(served.proc.pid)
    assert served.port in {p for _, p in bound} and {host for host, _ in bound} == {"127.0.0.1"}, bound
    for address in own_addresses():
        assert await refused_at(address, served.port), address
    await a_normal_call_works(served.local)


@pytest.mark.parametrize("host", ["::", ""])
async def test_binding_anywhere_but_loopback_needs_a_token(host: str) -> None:
    done = await rk("serve", "--host", host, "--port", "0")
    assert done.status == 125, done.stderr
    assert "binding beyond loopback needs --auth-token" in done.stderr and "Traceback" not in done.stderr


# Every kind of route there is, with the body it takes: (method, path, headers, body).
ROUTES: list[tuple[bytes, bytes, tuple[bytes, ...], bytes]] = [
    (b"POST", b"/v1/chat/completions", OPENAI_HEADERS, CHAT_BODY),
    (b"POST", b"/run/job/v1/chat/completions", OPENAI_HEADERS, CHAT_BODY),
    (b"POST", b"/v1/responses", OPENAI_HEADERS, compact({"model": "gpt-4o", "input": "hi"})),
    (b"POST", b"/v1/embeddings", OPENAI_HEADERS, compact({"model": "text-embedding-3-small", "input": "hi"})),
    (b"POST", b"/v1/messages", ANTHROPIC_HEADERS, MESSAGES_BODY),
    (b"POST", b"/run/job/v1/messages/count_tokens", ANTHROPIC_HEADERS, MESSAGES_BODY),
    (b"GET", b"/v1/models", OPENAI_HEADERS, b""),
    (b"GET", b"/run/job/v1/models", ANTHROPIC_HEADERS, b""),
    (b"POST", b"/v1/files", OPENAI_HEADERS, b"{}"),
    (b"DELETE", b"/v1/files/file-1", OPENAI_HEADERS, b""),
    (b"GET", b"/rk/runs", (), b""),
    (b"GET", b"/rk/runs/job", (), b""),
    (b"POST", b"/rk/runs", (), b"{}"),
    (b"POST", b"/rk/runs/job/kill", (), b""),
    (b"POST", b"/rk/runs/job/finish", (), b""),
]


@needs_proc
async def test_beyond_loopback_no_route_answers_without_the_token(fake: FakeUpstream, start_serve: StartServe) -> None:
    served = await start_serve("--host", "0.0.0.0", "--auth-token", SERVE_TOKEN, "--max-cost", "unlimited")
    assert ("0.0.0.0", served.port) in listening(served.proc.pid)  # what the loopback tests would catch
    hosts = [*own_addresses()[:1], "127.0.0.1"]  # from the network when this machine has an address on one
    wrong = "W" * len(SERVE_TOKEN)
    for host in hosts:
        for method, path, headers, body in ROUTES:
            api = path.startswith(b"/rk")
            wrong_credential = b"Authorization: Bearer " if api else b"X-RiskKernel-Token: "
            for credentials in ((), (wrong_credential + wrong.encode(),)):
                request = http(path, *headers, *credentials, body=body, method=method)
                (response,), _ = await exchange(served.port, request, host=host)
                assert response.status == 401, (host, method, path, credentials, response)
            if not api:  # the proxied routes: the token in the path, but not this one
                mangled = b"/t/" + wrong.encode() + path
                (response,), _ = await exchange(
                    served.port, http(mangled, *headers, body=body, method=method), host=host
                )
                assert response.status == 401, (host, method, mangled, response)
                assert provider_shaped(response, anthropic_route=b"x-api-key" in b"".join(headers)), response
        (health,), _ = await exchange(served.port, http(b"/rk/health", method=b"GET", body=b""), host=host)
        assert health.status == 200 and set(health.json()) == {"ok", "version"}  # says nothing but that rk is up
    assert fake.requests == [] and ledger_runs() == {}  # nothing forwarded, no run made

    base = f"http://{hosts[0]}:{served.port}"
    await a_normal_call_works(base, "job", **{"X-RiskKernel-Token": SERVE_TOKEN})
    token = b"X-RiskKernel-Token: " + SERVE_TOKEN.encode()
    for method, path, headers, body in [r for r in ROUTES if r[1].endswith((b"/models", b"/files"))]:
        (response,), _ = await exchange(
            served.port, http(path, *headers, token, body=body, method=method), host=hosts[0]
        )
        assert response.status == 200, (path, response)  # with the token, the proxied routes answer
    bearer = b"Authorization: Bearer " + SERVE_TOKEN.encode()
    (runs,), _ = await exchange(served.port, http(b"/rk/runs", bearer, method=b"GET", body=b""), host=hosts[0])
    assert runs.status == 200 and [run["run_id"] for run in runs.json()["runs"]] == ["job"]


# -- 4. run ids and path prefixes --------------------------------------------------------------------------

BAD_RUN_IDS = [b"../../etc", b"a/b", b"x" * 200, "\u00e9t\u00e9".encode(), b".hidden", b"a b", b"%2e%2e", b"a\tb"]
BAD_PREFIXES = [
    b"/run/..",
    b"/run/%2e%2e",
    b"/run/%2E%2E",
    b"/run/a%2Fb",
    b"/run/..%2F..%2Fetc",
    b"/run/" + b"x" * 200,
    b"/run/%C3%A9t%C3%A9",
    b"/run/.hidden",
    b"/run/a%00b",
    b"/run/",
    b"/run//",
]


def tree(root: Path) -> set[Path]:
    return {path for path in root.rglob("*") if not path.name.startswith("ledger.db-")}


async def test_invalid_run_ids_and_prefixes_are_refused_before_anything_happens(
    tmp_path: Path, fake: FakeUpstream, start_serve: StartServe
) -> None:
    served = await start_serve()
    await a_normal_call_works(served.local, "before")
    runs, files = set(ledger_runs()), tree(tmp_path)
    for anthropic_route, route, headers, body in (
        (False, b"/v1/chat/completions", OPENAI_HEADERS, CHAT_BODY),
        (True, b"/v1/messages", ANTHROPIC_HEADERS, MESSAGES_BODY),
        (False, b"/v1/models", OPENAI_HEADERS, b""),
    ):
        method = b"GET" if route == b"/v1/models" else b"POST"
        cases = [(route, (b"X-RiskKernel-Run-Id: " + run_id,)) for run_id in BAD_RUN_IDS]
        cases += [(prefix + route, ()) for prefix in BAD_PREFIXES]
        for path, run_header in cases:
            (response,), _ = await exchange(served.port, http(path, *headers, *run_header, body=body, method=method))
            assert response.status in (400, 404), (path, run_header, response)
            assert provider_shaped(response, anthropic_route), (path, run_header, response.body)
            assert "x-evil" not in response.headers and "x-riskkernel-run-id" not in response.headers
    assert fake.requests[1:] == []  # only the first normal call was forwarded
    assert set(ledger_runs()) == runs and tree(tmp_path) == files  # no run made, no file anywhere
    assert not (tmp_path / "etc").exists() and not (tmp_path.parent / "etc").exists()
    await a_normal_call_works(served.local, "after")


async def test_an_empty_run_id_header_is_refused_not_taken_for_no_header(
    fake: FakeUpstream, start_serve: StartServe
) -> None:
    """A client that means to name its run and names none (`{"X-RiskKernel-Run-Id": os.environ.get("RUN", "")}`)
    would otherwise have every call run alone, under the default budget rather than its run's."""
    served = await start_serve()
    (response,), _ = await exchange(
        served.port, http(b"/v1/chat/completions", b"X-RiskKernel-Run-Id: ", *OPENAI_HEADERS)
    )
    assert response.status == 400 and provider_shaped(response, anthropic_route=False), response
    assert fake.requests == [] and ledger_runs() == {}
    await a_normal_call_works(served.local)


async def test_dot_segments_never_take_a_call_past_rks_routes(fake: FakeUpstream, start_serve: StartServe) -> None:
    """`/v1/files/../chat/completions` is a chat completion once the path is normalised on its way upstream: it
    must not pass as an unmetered call (allowed here: no cost budget), past the token and call budgets."""
    served = await start_serve("--max-cost", "unlimited", "--max-calls", "1", "--max-tokens", "50")
    for path, method in (
        (b"/run/job/v1/files/../chat/completions", b"POST"),
        (b"/run/job/v1/files/%2e%2e/chat/completions", b"POST"),
        (b"/run/job/v1/../../run/other/v1/models", b"GET"),
        (b"/v1/%2e%2e/%2e%2e/etc/passwd", b"GET"),
    ):
        body = CHAT_BODY if method == b"POST" else b""
        (response,), _ = await exchange(served.port, http(path, *OPENAI_HEADERS, body=body, method=method))
        assert response.status in (400, 404) and provider_shaped(response, anthropic_route=False), (path, response)
    assert [seen.path for seen in fake.requests] == []
    await a_normal_call_works(served.local)


INJECTIONS = [
    http(b"/v1/chat/completions", *OPENAI_HEADERS, b"X-RiskKernel-Run-Id: inj" + line + b"X-Evil: 1")
    for line in (b"\n", b"\r", b"\r\n ", b"\r\n\t", b"\x00", b"\x0b")  # bare LF, bare CR, folded lines, NUL, VT
] + [http(b"/run/inj%0D%0AX-Evil:%201/v1/chat/completions", *OPENAI_HEADERS)]


async def test_cr_lf_in_a_run_id_is_rejected_and_rk_serve_serves_on(
    fake: FakeUpstream, start_serve: StartServe
) -> None:
    served = await start_serve()
    for injection in INJECTIONS:
        (response,), rest = await exchange(served.port, injection, linger=0.3)
        assert response.status in (400, 404) and b"HTTP/1." not in rest, (injection, response)
        assert "x-evil" not in response.headers and "x-riskkernel-run-id" not in response.headers
        await a_normal_call_works(served.local)
    assert not any(run_id.startswith("inj") for run_id in ledger_runs())
    assert len(fake.requests) == len(INJECTIONS)  # the normal calls only


async def test_a_path_with_a_line_break_gets_rks_own_error(fake: FakeUpstream, start_serve: StartServe) -> None:
    """rk's catch-all route answers every path it does not serve in the provider's shape, so the SDK raises
    its usual error; a path with an encoded line break in it is no different."""
    served = await start_serve()
    for path in (b"/run/a%0D%0Ab/v1/chat/completions", b"/v1/chat%0A/completions", b"/nothing%0Ahere"):
        (response,), _ = await exchange(served.port, http(path, *OPENAI_HEADERS))
        assert response.status == 404 and provider_shaped(response, anthropic_route=False), (path, response.body)
    assert fake.requests == []


async def test_a_run_named_twice_in_one_request_is_refused(fake: FakeUpstream, start_serve: StartServe) -> None:
    """Which of two run headers counts is a guess another hop (a gateway setting the run for its tenants) may
    make the other way: the call is charged to a run nobody meant."""
    served = await start_serve()
    twice = (b"X-RiskKernel-Run-Id: mine", b"X-RiskKernel-Run-Id: theirs")
    (response,), _ = await exchange(served.port, http(b"/v1/chat/completions", *twice, *OPENAI_HEADERS))
    assert response.status == 400 and provider_shaped(response, anthropic_route=False), response
    assert fake.requests == [] and ledger_runs() == {}


# -- 5. no call crosses from one run to another -------------------------------------------------------------


async def test_calls_for_many_runs_on_one_keep_alive_connection_are_each_charged_to_their_own(
    fake: FakeUpstream, start_serve: StartServe
) -> None:
    served = await start_serve("--max-cost", "1.00")
    one_connection = httpx2.AsyncClient(limits=httpx2.Limits(max_connections=1, max_keepalive_connections=1))
    runs: dict[str, Any] = {
        "hdr-a": openai.AsyncOpenAI(
            base_url=f"{served.local}/v1", default_headers={"X-RiskKernel-Run-Id": "hdr-a"},
            api_key=OPENAI_KEY, max_retries=0, http_client=one_connection,
        ),
        "hdr-b": openai.AsyncOpenAI(
            base_url=f"{served.local}/v1", default_headers={"X-RiskKernel-Run-Id": "hdr-b"},
            api_key=OPENAI_KEY, max_retries=0, http_client=one_connection,
        ),
        "path-c": openai.AsyncOpenAI(
            base_url=f"{served.local}/run/path-c/v1", api_key=OPENAI_KEY, max_retries=0, http_client=one_connection
        ),
        "claude-d": anthropic.AsyncAnthropic(
            base_url=f"{served.local}/run/claude-d", api_key=ANTHROPIC_KEY, max_retries=0, http_client=one_connection
        ),
    }  # fmt: skip
    seen: dict[str, list[httpx2.Response]] = {name: [] for name in runs}
    async with one_connection:
        for _ in range(4):
            for name, client in runs.items():
                if isinstance(client, anthropic.AsyncAnthropic):
                    raw: Any = await client.messages.with_raw_response.create(
                        model="claude-sonnet-4-6", max_tokens=50, messages=HI
                    )
                else:
                    raw = await client.chat.completions.with_raw_response.create(model="gpt-4o", messages=HI)
                seen[name].append(raw.http_response)
        ports = {r.extensions["network_stream"].get_extra_info("client_addr") for rs in seen.values() for r in rs}
    assert len(ports) == 1  # all 16 calls on one connection
    for name, responses in seen.items():
        rows = calls_of(name)
        assert [row.seq for row in rows] == [1, 2, 3, 4]
        for n, (response, row) in enumerate(zip(responses, rows, strict=True), 1):
            assert response.headers["x-riskkernel-run-id"] == name and response.headers["x-riskkernel-call"] == str(n)
            assert Decimal(response.headers["x-riskkernel-cost-usd"]) == row.cost > 0
            own = sum((r.cost for r in rows[:n]), Decimal(0))
            assert Decimal(response.headers["x-riskkernel-run-cost-usd"]) == own
            assert Decimal(response.headers["x-riskkernel-remaining-usd"]) == Decimal("1.00") - own
    assert len(fake.requests) == 16
    assert all("x-riskkernel-run-id" not in request.headers for request in fake.requests)


async def test_pipelined_calls_for_different_runs_are_each_charged_to_their_own(
    fake: FakeUpstream, start_serve: StartServe
) -> None:
    served = await start_serve()
    named = [
        (b"p1", http(b"/v1/chat/completions", b"X-RiskKernel-Run-Id: p1", *OPENAI_HEADERS)),
        (b"p2", http(b"/run/p2/v1/chat/completions", *OPENAI_HEADERS)),
        (b"p3", http(b"/run/p3/v1/messages", *ANTHROPIC_HEADERS, body=MESSAGES_BODY)),
    ] * 3
    requests = b"".join(request for _, request in named)
    responses, rest = await exchange(served.port, requests, count=len(named), linger=0.3)
    assert rest == b""
    for n, ((run_id, _), response) in enumerate(zip(named, responses, strict=True)):
        assert response.status == 200, response
        assert response.headers["x-riskkernel-run-id"] == run_id.decode()
        assert response.headers["x-riskkernel-call"] == str(n // 3 + 1)
    for run_id in ("p1", "p2", "p3"):
        rows = calls_of(run_id)
        assert [row.seq for row in rows] == [1, 2, 3] and all(row.status == 200 for row in rows)
    assert [seen.path for seen in fake.requests] == ["/v1/chat/completions", "/v1/chat/completions", "/v1/messages"] * 3


HIDDEN = http(b"/v1/messages", b"X-RiskKernel-Run-Id: hidden", *ANTHROPIC_HEADERS, body=MESSAGES_BODY)
OUTER = (b"X-RiskKernel-Run-Id: outer", *OPENAI_HEADERS)
CHUNKED_THEN_HIDDEN = b"0\r\n\r\n" + HIDDEN


def _length(body: bytes) -> bytes:
    return b"Content-Length: " + str(len(body)).encode()


# A request whose framing two parsers could read two ways, with a second request hidden in it.
SMUGGLING = {
    "CL then TE": http(
        b"/v1/chat/completions", *OUTER, _length(CHUNKED_THEN_HIDDEN), b"Transfer-Encoding: chunked",
        body=CHUNKED_THEN_HIDDEN, length=False,
    ),
    "TE then CL": http(
        b"/v1/chat/completions", *OUTER, b"Transfer-Encoding: chunked", _length(CHUNKED_THEN_HIDDEN),
        body=CHUNKED_THEN_HIDDEN, length=False,
    ),
    "TE chunked, identity": http(
        b"/v1/chat/completions", *OUTER, b"Transfer-Encoding: chunked, identity", _length(CHUNKED_THEN_HIDDEN),
        body=CHUNKED_THEN_HIDDEN, length=False,
    ),
    "TE with a space before its colon": http(
        b"/v1/chat/completions", *OUTER, b"Transfer-Encoding : chunked", _length(CHUNKED_THEN_HIDDEN),
        body=CHUNKED_THEN_HIDDEN, length=False,
    ),
    "TE xchunked": http(
        b"/v1/chat/completions", *OUTER, b"Transfer-Encoding: xchunked", _length(CHUNKED_THEN_HIDDEN),
        body=CHUNKED_THEN_HIDDEN, length=False,
    ),
    "two Content-Lengths": http(
        b"/v1/chat/completions", *OUTER, _length(CHAT_BODY), _length(CHAT_BODY + HIDDEN),
        body=CHAT_BODY + HIDDEN, length=False,
    ),
    "a Content-Length list": http(
        b"/v1/chat/completions", *OUTER, b"Content-Length: %d, %d" % (len(CHAT_BODY), len(CHAT_BODY + HIDDEN)),
        body=CHAT_BODY + HIDDEN, length=False,
    ),
}  # fmt: skip


@pytest.mark.parametrize("parser", ["C", "pure Python"])
async def test_a_request_hidden_in_another_is_never_executed(
    fake: FakeUpstream, start_serve: StartServe, parser: str
) -> None:
    served = await start_serve(env={"AIOHTTP_NO_EXTENSIONS": "1"} if parser == "pure Python" else {})
    accepted = 0
    for name, request in SMUGGLING.items():
        before = len(fake.requests)
        (response,), rest = await exchange(served.port, request, linger=0.3)
        assert b"HTTP/1." not in rest, (name, rest)  # one answer, to one request
        forwarded = fake.requests[before:]
        assert len(forwarded) <= 1 and all(seen.path == "/v1/chat/completions" for seen in forwarded), name
        assert all(seen.body == CHAT_BODY for seen in forwarded), name
        assert response.status == 400 or (response.status == 200 and forwarded), (name, response)
        accepted += response.status == 200
        await a_normal_call_works(served.local, f"after-{len(fake.requests)}")
    runs = ledger_runs()
    assert "hidden" not in runs and all(seen.path != "/v1/messages" for seen in fake.requests)
    assert len(calls_of("outer")) == accepted if accepted else "outer" not in runs


async def test_one_runs_answers_never_carry_another_runs_spend(fake: FakeUpstream, start_serve: StartServe) -> None:
    """Two runs at once, each its calls one after another; their calls cost different amounts (input tokens
    follow the prompt's length), so any spend that crossed over would show in the other run's headers."""

    def by_prompt(request: dict[str, Any]) -> dict[str, Any]:
        return usage(100 * len(request["messages"][0]["content"]), 20)

    fake.script(Reply(usage_for=by_prompt))
    served = await start_serve("--max-cost", "1.00")

    async def drive(run_id: str, prompt: str) -> list[dict[str, str]]:
        async with openai.AsyncOpenAI(
            base_url=f"{served.local}/run/{run_id}/v1", api_key=OPENAI_KEY, max_retries=0
        ) as client:
            headers = []
            for n in range(6):
                messages: Any = [{"role": "user", "content": prompt}]
                if n % 2:
                    async with client.chat.completions.with_streaming_response.create(
                        model="gpt-4o", messages=messages, stream=True
                    ) as streamed:
                        await streamed.read()
                        headers.append(dict(streamed.headers))
                else:
                    raw = await client.chat.completions.with_raw_response.create(model="gpt-4o", messages=messages)
                    headers.append(dict(raw.headers))
            return headers

    answers = dict(
        zip(("cheap", "dear"), await asyncio.gather(drive("cheap", "a"), drive("dear", "bbbb")), strict=True)
    )
    costs = {run_id: [row.cost for row in calls_of(run_id)] for run_id in answers}
    assert costs["cheap"][0] < costs["dear"][0] and len(set(costs["cheap"])) == len(set(costs["dear"])) == 1
    for run_id, headers in answers.items():
        for n, got in enumerate(headers):
            assert got["x-riskkernel-run-id"] == run_id and got["x-riskkernel-call"] == str(n + 1)
            own = sum(costs[run_id][: n + 1 if "x-riskkernel-cost-usd" in got else n], Decimal(0))
            assert Decimal(got["x-riskkernel-run-cost-usd"]) == own, (run_id, n, got)
            assert Decimal(got["x-riskkernel-remaining-usd"]) == Decimal("1.00") - own
    assert {run_id: record.totals.calls for run_id, record in ledger_runs().items()} == {"cheap": 6, "dear": 6}
