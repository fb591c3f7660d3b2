"""Prefix caching on a live server, through the official `openai` client: cached prompt tokens in
every usage object (streamed too), the prefix-cache metrics, and `--no-prefix-caching`."""

import json
import random

import pytest

BLOCK_SIZE = 16


def token_prompt(seed: int, length: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(151643) for _ in range(length)]


def words(seed: int, count: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(["alpha", "beta", "gamma", "delta", "omega", "kappa", "sigma"]) for _ in range(count))


def cached_when_repeated(prompt_tokens: int) -> int:
    """What an exact repeat finds: its whole blocks, short of the last token."""
    return (prompt_tokens - 1) // BLOCK_SIZE * BLOCK_SIZE


@pytest.fixture(scope="module")
def uncached_server(start_server):
    return start_server("--no-prefix-caching")


def test_completions_report_the_cached_prompt_tokens(client, server):
    prompts = [token_prompt(seed=101, length=100), token_prompt(seed=102, length=40)]
    first = client.completions.create(model=server.model, prompt=prompts, max_tokens=4, temperature=0)
    assert first.usage.prompt_tokens == 140 and first.usage.prompt_tokens_details.cached_tokens == 0
    again = client.completions.create(model=server.model, prompt=prompts[0], max_tokens=4, temperature=0)
    assert again.usage.prompt_tokens_details.cached_tokens == 96 == cached_when_repeated(100)
    assert again.usage.prompt_tokens == 100 and again.choices[0].text == first.choices[0].text
    stream = client.completions.create(model=server.model, prompt=prompts, max_tokens=4, temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    *chunks, last = list(stream)
    assert last.choices == [] and last.usage.prompt_tokens == 140
    assert last.usage.prompt_tokens_details.cached_tokens == 96 + 32  # summed over the prompts
    assert all(chunk.usage is None for chunk in chunks)


def test_chat_reports_cached_tokens_streamed_and_not(client, server):
    messages = [{"role": "system", "content": words(seed=103, count=120)}, {"role": "user", "content": "Hello!"}]
    first = client.chat.completions.create(model=server.model, messages=messages, max_tokens=6, temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    stream = client.chat.completions.create(model=server.model, messages=messages, max_tokens=6, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    *chunks, last = list(stream)
    assert last.usage.prompt_tokens == first.usage.prompt_tokens
    assert last.usage.prompt_tokens_details.cached_tokens == cached_when_repeated(first.usage.prompt_tokens)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == first.choices[0].message.content
    n3 = client.chat.completions.create(model=server.model, messages=messages, max_tokens=6, temperature=0, n=3)
    assert [choice.message.content for choice in n3.choices] == [first.choices[0].message.content] * 3
    assert n3.usage.prompt_tokens_details.cached_tokens == cached_when_repeated(first.usage.prompt_tokens)


def test_chat_usage_keeps_its_shape(http, server):
    body = {"model": server.model, "messages": [{"role": "user", "content": words(seed=104, count=5)}],
            "max_tokens": 3, "temperature": 0}
    usage = http.post("/v1/chat/completions", json=body).json()["usage"]
    assert usage == {"prompt_tokens": usage["prompt_tokens"], "completion_tokens": 3,
                     "total_tokens": usage["prompt_tokens"] + 3, "prompt_tokens_details": {"cached_tokens": 0}}


def test_a_responses_chain_reuses_the_earlier_turns(client, server, http):
    first = client.responses.create(model=server.model, input=words(seed=105, count=80), max_output_tokens=8,
                                    temperature=0)
    assert first.usage.input_tokens_details.cached_tokens == 0
    second = client.responses.create(model=server.model, input="And then?", previous_response_id=first.id,
                                     max_output_tokens=8, temperature=0)
    cached = second.usage.input_tokens_details.cached_tokens
    # The second prompt starts with the whole first one: at least its whole blocks are found.
    assert first.usage.input_tokens // BLOCK_SIZE * BLOCK_SIZE <= cached < second.usage.input_tokens
    assert cached % BLOCK_SIZE == 0
    body = {"model": server.model, "input": "And then?", "previous_response_id": first.id, "max_output_tokens": 8,
            "temperature": 0, "stream": True}
    lines = http.post("/v1/responses", json=body).text.splitlines()
    [event] = [json.loads(line.removeprefix("data: ")) for line in lines
               if line.startswith("data: ") and '"response.incomplete"' in line]
    usage = event["response"]["usage"]
    assert usage["input_tokens"] == second.usage.input_tokens
    assert usage["input_tokens_details"]["cached_tokens"] == cached_when_repeated(second.usage.input_tokens)


def test_prefix_cache_metrics_count_tokens_looked_up_and_found(client, server):
    prompt = token_prompt(seed=106, length=70)
    queries = server.metric("nanoserve_prefix_cache_queries_total")
    hits = server.metric("nanoserve_prefix_cache_hits_total")
    for _ in range(2):
        client.completions.create(model=server.model, prompt=prompt, max_tokens=2, temperature=0)
    assert server.metric("nanoserve_prefix_cache_queries_total") - queries == 140
    assert server.metric("nanoserve_prefix_cache_hits_total") - hits == cached_when_repeated(70)
    assert server.metric("nanoserve_kv_blocks_used") == 0  # nothing runs: cached blocks are free
    assert server.metric("nanoserve_kv_blocks_cached") >= 70 // BLOCK_SIZE


def test_no_prefix_caching_computes_everything_and_answers_the_same(client, server, uncached_server):
    messages = [{"role": "system", "content": words(seed=107, count=100)}, {"role": "user", "content": "Hi"}]
    uncached = uncached_server.client()
    answers = []
    for api in (client, client, uncached, uncached):
        completion = api.chat.completions.create(model=server.model, messages=messages, max_tokens=10, temperature=0)
        answers.append((completion.choices[0].message.content, completion.usage.prompt_tokens_details.cached_tokens))
    prompt_tokens = completion.usage.prompt_tokens
    assert [cached for _, cached in answers] == [0, cached_when_repeated(prompt_tokens), 0, 0]
    assert len({text for text, _ in answers}) == 1
    assert uncached_server.metric("nanoserve_prefix_cache_queries_total") == 0
    assert uncached_server.metric("nanoserve_kv_blocks_cached") == 0
