"""Every route of DESIGN.md §3 handled as the table says: embeddings and legacy completions metered, GETs
and token counts forwarded free, other calls refused under a cost budget unless allowed, and `--mock`
answering every metered route; plus calls that end abnormally, accounted for."""

import asyncio
import base64
import json
import struct
from decimal import Decimal

import aiohttp
import openai
import pytest

from riskkernel.models import Budget, Flag, HaltReason, Usage
from riskkernel.providers import openai as oa
from tests.conftest import SECRET, StartProxy
from tests.fakes import CompletionReply, EmbeddingReply, FakeUpstream, Reply, ResponsesReply, usage

D = Decimal
MESSAGES = [{"role": "user", "content": "hello"}]


async def test_embeddings_are_metered_input_only(fake: FakeUpstream, start_proxy: StartProxy) -> None:
    reply = EmbeddingReply(prompt_tokens=5_000, dimensions=4)
    fake.script(reply)
    proxy = await start_proxy()
    raw = await proxy.client.embeddings.with_raw_response.create(model="text-embedding-3-small", input=["a", "b"])
    assert raw.http_response.content == reply.whole()
    assert raw.parse().data[0].embedding == [0.5] * 4
    (row,) = await proxy.calls()
    # text-embedding-3-small: $0.02 per 1M input tokens
    assert row.usage == Usage(input_tokens=5_000) and row.cost == D("0.0001") and row.endpoint == "/v1/embeddings"


async def test_an_embedding_reserves_no_output(fake: FakeUpstream, start_proxy: StartProxy) -> None:
    fake.script(EmbeddingReply(gate=asyncio.Event()))
    proxy = await start_proxy(Budget(max_cost=None, max_tokens=100))
    task = asyncio.create_task(proxy.client.embeddings.create(model="text-embedding-3-small", input="x" * 40))
    while not fake.requests:
        await asyncio.sleep(0.01)
    assert proxy.live.governor.reserved.tokens == 10  # the input estimate, and no output
    task.cancel()


@pytest.mark.parametrize("stream", [False, True])
async def test_legacy_completions_are_metered(fake: FakeUpstream, start_proxy: StartProxy, stream: bool) -> None:
    reply = CompletionReply(usage={"prompt_tokens": 1_000, "completion_tokens": 500, "total_tokens": 1_500})
    fake.script(reply)
    proxy = await start_proxy()
    if stream:
        async with proxy.client.completions.with_streaming_response.create(
            model="gpt-3.5-turbo-instruct", prompt="Once", stream=True
        ) as response:
            raw = b"".join([chunk async for chunk in response.iter_bytes()])
        assert raw == b"".join(reply.stream_events({}))  # the usage rk asked for is hidden again
    else:
        completion = await proxy.client.completions.create(model="gpt-3.5-turbo-instruct", prompt="Once")
        assert completion.choices[0].text == reply.text
    (row,) = await proxy.calls()
    # gpt-3.5-turbo-instruct: $1.50 in, $2 out per 1M
    assert row.usage == Usage(input_tokens=1_000, output_tokens=500) and row.cost == D("0.0025")


def test_a_completion_without_max_tokens_reserves_the_apis_default() -> None:
    assert oa.parse_completions(b'{"model": "m", "prompt": "x"}').max_output_tokens == 16


def test_several_choices_reserve_several_outputs() -> None:
    req = oa.parse_chat(b'{"model": "m", "messages": [], "n": 3, "max_tokens": 100}')
    assert (req.max_output_tokens, req.choices) == (100, 3)


async def test_claude_behind_an_openai_base_url_is_priced_at_claude_rates(
    fake: FakeUpstream, start_proxy: StartProxy
) -> None:
    fake.script(Reply(model="claude-sonnet-4-6", usage=usage(1_000_000, 100_000)))
    proxy = await start_proxy()
    await proxy.client.chat.completions.create(model="claude-sonnet-4-6", messages=MESSAGES)  # type: ignore[arg-type]
    (row,) = await proxy.calls()
    # claude-sonnet-4-6: $3 in, $15 out per 1M
    assert row.cost == D("4.5") and row.price_source.endswith("anthropic/claude-sonnet-4-6")


async def test_gets_are_forwarded_free_even_under_a_cost_budget(fake: FakeUpstream, start_proxy: StartProxy) -> None:
    proxy = await start_proxy(Budget(max_cost=D("1.00")))
    models = await proxy.client.models.list()
    assert [m.id async for m in models] == ["gpt-4o"]
    assert fake.requests[0].method == "GET" and fake.requests[0].path == "/v1/models"
    assert fake.requests[0].headers["Authorization"] == f"Bearer {SECRET}"
    (row,) = await proxy.calls()
    assert (row.endpoint, row.provider, row.status, row.flags, row.cost) == (
        "/v1/models",
        "openai",
        200,
        ("unmetered",),
        0,
    )
    assert (await proxy.record()).totals.calls == 0


@pytest.mark.parametrize(
    ("budget", "allow", "forwarded"),
    [
        (Budget(max_cost=D("1.00")), False, False),
        (Budget(max_cost=D("1.00")), True, True),
        (Budget(max_cost=None, max_calls=5), False, True),
    ],
)
async def test_other_calls_are_refused_under_a_cost_budget_unless_allowed(
    fake: FakeUpstream, start_proxy: StartProxy, budget: Budget, allow: bool, forwarded: bool
) -> None:
    proxy = await start_proxy(budget, allow_unmetered=allow)
    upload = {"file": ("notes.jsonl", b'{"a": 1}\n' * 1000), "purpose": "batch"}
    if forwarded:
        await proxy.client.files.create(file=upload["file"], purpose="batch")
        (seen,) = fake.requests
        assert seen.method == "POST" and seen.path == "/v1/files" and b"notes.jsonl" in seen.body
        assert seen.headers["Content-Length"] == str(len(seen.body)) and "Transfer-Encoding" not in seen.headers
        (row,) = await proxy.calls()
        assert row.flags == ("unmetered",) and row.status == 200
        return
    with pytest.raises(openai.APIStatusError) as refused:
        await proxy.client.files.create(file=upload["file"], purpose="batch")
    assert refused.value.status_code == 402 and refused.value.code == "unmetered_endpoint"
    assert "--allow-unmetered" in refused.value.message and fake.requests == []
    (row,) = await proxy.calls()
    assert row.flags == ("refused",) and row.error == "unmetered_endpoint"


async def test_a_halted_run_refuses_even_free_calls(fake: FakeUpstream, start_proxy: StartProxy) -> None:
    proxy = await start_proxy()
    proxy.live.halt(HaltReason.KILLED)
    with pytest.raises(openai.APIStatusError, match="rk: run killed"):
        await proxy.client.models.list()
    assert fake.requests == []


@pytest.mark.parametrize("stream", [False, True])
async def test_the_mock_answers_every_metered_route(start_proxy: StartProxy, stream: bool) -> None:
    proxy = await start_proxy(Budget(max_cost=D("1.00")), mock=True)
    client, claude = proxy.client, proxy.claude
    if stream:
        chat = await client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)  # type: ignore[arg-type]
        text = "".join([c.choices[0].delta.content or "" async for c in chat])
        assert text.split()[0] in oa.MOCK_WORDS and len(text.split()) >= 24
        completion = await client.completions.create(model="gpt-3.5-turbo-instruct", prompt="x", stream=True)
        assert [c async for c in completion]
        async with client.responses.stream(model="o3", input="hi") as responses:
            assert (await responses.get_final_response()).output_text
        async with claude.messages.stream(model="claude-sonnet-4-6", max_tokens=50, messages=MESSAGES) as messages:  # type: ignore[arg-type]
            assert (await messages.get_final_message()).content[0].text  # type: ignore[union-attr]
    else:
        reply = await client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=5)  # type: ignore[arg-type]
        assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 5  # type: ignore[union-attr]
        completion = await client.completions.create(model="gpt-3.5-turbo-instruct", prompt="x")
        assert completion.choices[0].text.strip()
        assert (await client.responses.create(model="o3", input="hi")).output_text
        embedding = await client.embeddings.create(model="text-embedding-3-small", input="hi")
        assert len(embedding.data[0].embedding) == 1536
        message = await claude.messages.create(model="claude-sonnet-4-6", max_tokens=50, messages=MESSAGES)  # type: ignore[arg-type]
        assert message.content[0].text and message.usage.output_tokens <= 50  # type: ignore[union-attr]
        assert (await claude.messages.count_tokens(model="claude-sonnet-4-6", messages=MESSAGES)).input_tokens > 0  # type: ignore[arg-type]
    rows = await proxy.calls()
    metered = [r for r in rows if Flag.UNMETERED not in r.flags]
    assert len(metered) == (4 if stream else 5) and all(r.cost > 0 and r.flags == () for r in metered)


def test_mock_embeddings_decode_as_the_sdk_asks_for_them() -> None:
    req = oa.parse_embeddings(b'{"model": "text-embedding-3-small", "input": "x", "encoding_format": "base64"}')
    whole, _ = oa.mock_embeddings(req, json.loads(req.body))
    vector = json.loads(whole)["data"][0]["embedding"]
    assert len(struct.unpack("<1536f", base64.b64decode(vector))) == 1536


# -- calls that end abnormally ----------------------------------------------------------------------------


async def test_a_client_that_gives_up_on_a_hung_upstream_releases_its_reservation(
    fake: FakeUpstream, start_proxy: StartProxy
) -> None:
    gate = asyncio.Event()  # never set: the upstream never answers
    fake.script(Reply(gate=gate))
    proxy = await start_proxy(Budget(max_cost=None, max_calls=2))
    impatient = proxy.new_client(timeout=0.5)
    for _ in range(2):
        with pytest.raises(openai.APITimeoutError):
            await impatient.chat.completions.create(model="gpt-4o", messages=MESSAGES)  # type: ignore[arg-type]
    for _ in range(100):
        if proxy.live.governor.in_flight == 0:
            break
        await asyncio.sleep(0.02)
    assert proxy.live.governor.in_flight == 0 and proxy.live.governor.reserved.calls == 0
    rows = await proxy.calls()
    assert [(r.status, r.error, Flag.ESTIMATED in r.flags) for r in rows] == [(499, "client disconnected", True)] * 2
    gate.set()


async def test_a_budget_halt_lets_whole_responses_in_flight_finish(fake: FakeUpstream, start_proxy: StartProxy) -> None:
    gate = asyncio.Event()
    slow = Reply(usage=usage(1_000, 4_000), gate=gate)  # $0.0425 of gpt-4o
    fake.script(slow, Reply(usage=usage(100_000, 0)))  # $0.25: spends the budget
    proxy = await start_proxy(Budget(max_cost=D("0.20")))
    in_flight = asyncio.create_task(proxy.client.chat.completions.create(model="gpt-4o", messages=MESSAGES))  # type: ignore[arg-type]
    while not fake.requests:
        await asyncio.sleep(0.01)
    await proxy.client.chat.completions.create(model="gpt-4o", messages=MESSAGES)  # type: ignore[arg-type]
    assert proxy.live.governor.halt_reason == HaltReason.COST
    gate.set()
    answer = await in_flight  # answered, not cut: the provider bills it whether or not rk waits
    assert answer.usage.completion_tokens == 4_000  # type: ignore[union-attr]
    first, _ = await proxy.calls()
    assert first.status == 200 and first.flags == () and first.cost == D("0.0425")


async def test_a_kill_cuts_whole_responses_in_flight_and_charges_their_reservation(
    fake: FakeUpstream, start_proxy: StartProxy
) -> None:
    fake.script(Reply(gate=asyncio.Event()))
    proxy = await start_proxy()
    call = asyncio.create_task(
        proxy.client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=1_000)  # type: ignore[arg-type]
    )
    while not fake.requests:
        await asyncio.sleep(0.01)
    proxy.live.halt(HaltReason.KILLED)
    with pytest.raises(openai.APIStatusError, match="rk: run killed"):
        await call
    (row,) = await proxy.calls()
    assert row.status == 402 and {Flag.CUT, Flag.ESTIMATED} <= set(row.flags)
    assert row.usage.output_tokens == 1_000  # what it reserved: the provider may bill what rk did not wait for


async def test_a_kill_cuts_a_forwarded_stream_and_records_the_cut(fake: FakeUpstream, start_proxy: StartProxy) -> None:
    fake.script(ResponsesReply(model="gpt-4o", endless=True, delay=0.01))
    proxy = await start_proxy(Budget(max_cost=D(1)), allow_unmetered=True)
    stream = await proxy.client.responses.retrieve("resp_fake1", stream=True)  # resuming a background response
    events = 0
    with pytest.raises(openai.APIConnectionError):  # not a clean end: the client knows it did not get it all
        async for _ in stream:
            events += 1
            if events == 5:
                proxy.live.halt(HaltReason.KILLED)
    assert fake.requests[0].method == "GET" and fake.requests[0].path == "/v1/responses/resp_fake1?stream=true"
    (row,) = await proxy.calls()
    assert (row.status, row.flags, row.error) == (200, ("unmetered",), "cut: killed")
    for _ in range(100):
        if fake.streams_open == 0:
            break
        await asyncio.sleep(0.02)
    assert fake.streams_open == 0


async def test_a_client_that_gives_up_on_a_forwarded_call_leaves_a_row(
    fake: FakeUpstream, start_proxy: StartProxy
) -> None:
    gate = asyncio.Event()  # never set: the upstream never answers
    fake.script(ResponsesReply(gate=gate))
    proxy = await start_proxy()
    with pytest.raises(openai.APITimeoutError):
        await proxy.new_client(timeout=0.5, max_retries=0).responses.retrieve("resp_fake1", stream=True)
    for _ in range(100):
        if proxy.live.calls == set():
            break
        await asyncio.sleep(0.02)
    (row,) = await proxy.calls()
    assert (row.status, row.flags, row.error) == (499, ("unmetered",), "client disconnected")
    gate.set()


async def test_secrets_in_an_upstream_url_never_reach_the_ledger_or_the_client(start_proxy: StartProxy) -> None:
    proxy = await start_proxy(openai_upstream="http://127.0.0.1:9/v1?api-key=hunter3secret&key=hunter2secret")
    with pytest.raises(openai.InternalServerError) as failed:
        await proxy.client.chat.completions.create(model="gpt-4o", messages=MESSAGES)  # type: ignore[arg-type]
    (row,) = await proxy.calls()
    for text in (row.error or "", failed.value.message):
        assert "hunter2secret" not in text and "hunter3secret" not in text
        assert "could not reach" in text


def test_upstream_urls_with_credentials_are_refused() -> None:
    from riskkernel.config import parse_upstream
    from riskkernel.errors import ConfigError

    with pytest.raises(ConfigError, match="credentials") as refused:
        parse_upstream("https://user:hunter2secret@gateway.example/v1", "OPENAI_BASE_URL")
    assert "hunter2secret" not in str(refused.value) and "OPENAI_BASE_URL" in str(refused.value)


async def test_absurdly_nested_json_is_a_400(fake: FakeUpstream, start_proxy: StartProxy) -> None:
    proxy = await start_proxy()
    body = b'{"model": "gpt-4o", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    async with aiohttp.ClientSession() as session, session.post(f"{proxy.url}/v1/chat/completions", data=body) as r:
        assert r.status == 400
        assert (await r.json())["error"]["message"] == "rk: the request body is nested too deeply"
    assert fake.requests == []


ROUTES = {
    "chat": lambda c: c.chat.completions.create(model="gpt-4o", messages=MESSAGES),
    "completions": lambda c: c.completions.create(model="gpt-3.5-turbo-instruct", prompt="x"),
    "responses": lambda c: c.responses.create(model="o3", input="x"),
    "embeddings": lambda c: c.embeddings.create(model="text-embedding-3-small", input="x"),
}


@pytest.mark.parametrize("route", ROUTES)
async def test_every_openai_route_refuses_with_an_openai_402_the_sdk_does_not_retry(
    fake: FakeUpstream, start_proxy: StartProxy, route: str
) -> None:
    proxy = await start_proxy(Budget(max_cost=None, max_calls=1))
    await ROUTES[route](proxy.client)
    with pytest.raises(openai.APIStatusError) as refused:
        await ROUTES[route](proxy.new_client(max_retries=3))
    assert refused.value.status_code == 402 and refused.value.code == "call_budget_exceeded"
    assert refused.value.type == "budget_exceeded" and refused.value.message.endswith(
        refused.value.body["message"]  # type: ignore[index]
    )
    assert len(fake.requests) == 1


async def test_a_whole_legacy_completion_is_byte_for_byte(fake: FakeUpstream, start_proxy: StartProxy) -> None:
    reply = CompletionReply()
    fake.script(reply)
    proxy = await start_proxy()
    raw = await proxy.client.completions.with_raw_response.create(model="gpt-3.5-turbo-instruct", prompt="Once")
    assert raw.http_response.content == reply.whole()
