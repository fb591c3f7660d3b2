"""`/v1/chat/completions` on a live server, through the official client and raw HTTP."""

import asyncio
import json

import pytest

from model.tokenizer import Tokenizer

HI = [{"role": "user", "content": "Say hello."}]


def _sse_payloads(text: str) -> list:
    """The `data:` payloads of an SSE body, `[DONE]` kept as a string."""
    payloads = []
    for event in text.split("\n\n"):
        if event.startswith("data: "):
            data = event.removeprefix("data: ")
            payloads.append(data if data == "[DONE]" else json.loads(data))
    return payloads


def test_non_stream_completion_shape(client, server):
    completion = client.chat.completions.create(model=server.model, messages=HI, max_tokens=8, temperature=0,
                                                extra_body={"ignore_eos": True})
    assert completion.object == "chat.completion"
    assert completion.id.startswith("chatcmpl-")
    assert completion.model == server.model
    [choice] = completion.choices
    assert choice.index == 0 and choice.finish_reason == "length"
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.logprobs is None
    assert completion.usage.completion_tokens == 8
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + 8


def test_prompt_is_the_chat_template_rendering(client, server, chat_checkpoint):
    tokenizer = Tokenizer(chat_checkpoint)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    expected = len(tokenizer.encode(tokenizer.apply_chat_template(messages)))
    completion = client.chat.completions.create(model=server.model, messages=messages, max_tokens=1)
    assert completion.usage.prompt_tokens == expected
    # the same conversation as OpenAI clients also send it: developer role, a list of text parts
    as_parts = [{"role": "developer", "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}]},
                {"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    assert client.chat.completions.create(model=server.model, messages=as_parts, max_tokens=1).usage.prompt_tokens \
        == expected


def test_enable_thinking_false_puts_the_empty_think_block_in_the_prompt(client, server, chat_checkpoint):
    tokenizer = Tokenizer(chat_checkpoint)
    thinking_off = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], enable_thinking=False)
    assert thinking_off.endswith("<think>\n\n</think>\n\n")
    completion = client.chat.completions.create(model=server.model, messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=1, extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert completion.usage.prompt_tokens == len(tokenizer.encode(thinking_off))


def test_stream_chunks_follow_the_protocol(http, server):
    body = {"model": server.model, "messages": HI, "max_tokens": 6, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    *chunks, done = _sse_payloads(response.text)
    assert done == "[DONE]"
    assert {c["id"] for c in chunks} == {chunks[0]["id"]} and {c["created"] for c in chunks} == {chunks[0]["created"]}
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    finish = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"] is not None]
    assert len(finish) == 1 and finish[0]["choices"][0]["finish_reason"] == "length"
    assert chunks[-2] is finish[0]
    usage_chunk = chunks[-1]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] == 6
    assert all(c["usage"] is None for c in chunks[:-1])


def test_stream_text_equals_non_stream_text(client, server):
    kwargs = dict(model=server.model, messages=HI, max_tokens=24, temperature=0)
    whole = client.chat.completions.create(**kwargs).choices[0]
    chunks = list(client.chat.completions.create(**kwargs, stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] \
        == [whole.finish_reason]


def test_n_choices_and_logprobs(client, server):
    completion = client.chat.completions.create(model=server.model, messages=HI, max_tokens=5, n=3, temperature=0,
                                                logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    assert [c.index for c in completion.choices] == [0, 1, 2]
    texts = {c.message.content for c in completion.choices}
    assert len(texts) == 1  # greedy: every choice is the same
    for choice in completion.choices:
        entries = choice.logprobs.content
        assert len(entries) == 5
        assert b"".join(bytes(e.bytes) for e in entries).decode() == choice.message.content
        for entry in entries:
            assert entry.logprob <= 0 and bytes(entry.bytes).decode(errors="replace") == entry.token
            assert len(entry.top_logprobs) == 2
            assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
            assert entry.top_logprobs[0].token == entry.token  # greedy takes the most likely token


def test_streamed_logprobs_equal_non_stream_logprobs(client, server):
    kwargs = dict(model=server.model, messages=HI, max_tokens=6, temperature=0, logprobs=True, top_logprobs=1)
    whole = client.chat.completions.create(**kwargs).choices[0].logprobs.content
    streamed = [e for c in client.chat.completions.create(**kwargs, stream=True)
                if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, round(e.logprob, 4)) for e in streamed] == [(e.token, round(e.logprob, 4)) for e in whole]


def test_seed_makes_sampling_reproducible(client, server):
    kwargs = dict(model=server.model, messages=HI, max_tokens=12, temperature=1.0, seed=1234)
    first = client.chat.completions.create(**kwargs).choices[0].message.content
    assert client.chat.completions.create(**kwargs).choices[0].message.content == first


def test_stop_string_ends_the_reply_without_it(client, server):
    kwargs = dict(model=server.model, messages=HI, max_tokens=24, temperature=0, extra_body={"ignore_eos": True})
    text = client.chat.completions.create(**kwargs).choices[0].message.content
    stop = text[len(text) // 2:][:3]
    assert stop.strip(), text
    stopped = client.chat.completions.create(**kwargs, stop=[stop]).choices[0]
    assert stopped.finish_reason == "stop"
    assert stopped.message.content == text[: text.index(stop)]


def test_async_client(server):
    async def ask(client):
        completion = await client.chat.completions.create(model=server.model, messages=HI, max_tokens=4, temperature=0)
        chunks = [c async for c in await client.chat.completions.create(
            model=server.model, messages=HI, max_tokens=4, temperature=0, stream=True)]
        return completion.choices[0].message.content, "".join(c.choices[0].delta.content or "" for c in chunks)

    async def main():
        async with server.async_client() as client:
            return await ask(client)

    whole, streamed = asyncio.run(main())
    assert whole == streamed


@pytest.mark.parametrize("field", ["functions", "function_call"])
def test_deprecated_function_fields_are_refused(http, server, field):
    value = [{"name": "f", "parameters": {}}] if field == "functions" else {"name": "f"}
    response = http.post("/v1/chat/completions", json={"model": server.model, "messages": HI, field: value})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == field
    assert "not supported yet" in response.json()["error"]["message"]
