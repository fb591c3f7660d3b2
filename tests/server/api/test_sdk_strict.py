"""The default server (the demo checkpoint, no flags) as the official SDK sees it: every object and
stream event it sends validates against the SDK's own pydantic types in strict mode, and the demo's
replies end on their own, so `status: completed` and the SDK's stream helpers work."""

import json

import httpx
import openai
import pytest
from openai.types import Completion, Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from openai.types.responses import Response, ResponseItemList, ResponseStreamEvent
from pydantic import TypeAdapter


STREAM_EVENT = TypeAdapter(ResponseStreamEvent)
HI = [{"role": "user", "content": "Hello! How are you today?"}]


@pytest.fixture
def raw(demo_server):
    with httpx.Client(base_url=demo_server.base_url, timeout=120) as http:
        yield http


def _data(body: str) -> list[dict]:
    return [json.loads(line[6:]) for line in body.splitlines() if line.startswith("data: ") and line != "data: [DONE]"]


def _strict(model_type, payload: dict):
    return model_type.model_validate(payload, strict=True)


def _strict_scored_completion(payload: dict, chunk: bool = False) -> Completion:
    """Two nulls that OpenAI's legacy API sends and the SDK's `Completion` type has no room for are
    allowed, nothing else: an echoed prompt's first token's logprobs (nothing predicts it; vLLM
    sends the same), and, in stream chunks (the SDK reuses `Completion` for them), the
    finish_reason of every chunk but a choice's last."""
    for choice in payload["choices"]:
        if chunk and choice["finish_reason"] is None:
            choice["finish_reason"] = "length"
        logprobs = choice["logprobs"]
        if logprobs and logprobs["token_logprobs"] and logprobs["token_logprobs"][0] is None:
            assert logprobs["top_logprobs"][0] is None
            logprobs["token_logprobs"][0], logprobs["top_logprobs"][0] = 0.0, {}
    return _strict(Completion, payload)


def test_chat_objects_and_chunks(raw, demo_server):
    body = {"model": demo_server.model, "messages": HI, "n": 2, "logprobs": True, "top_logprobs": 2, "seed": 1}
    completion = _strict(ChatCompletion, raw.post("/v1/chat/completions", json=body).json())
    assert [c.finish_reason for c in completion.choices] == ["stop", "stop"]  # the demo ends its replies
    streamed = raw.post("/v1/chat/completions", json=body | {"stream": True, "stream_options": {"include_usage": True}})
    chunks = [_strict(ChatCompletionChunk, payload) for payload in _data(streamed.text)]
    assert chunks[-1].usage is not None and {c.choices[0].finish_reason for c in chunks if c.choices} >= {"stop"}


def test_completion_objects_and_chunks(raw, demo_server):
    body = {"model": demo_server.model, "prompt": ["Once upon a time", "The sky is"], "echo": True, "logprobs": 3,
            "max_tokens": 8}
    _strict(Completion, raw.post("/v1/completions", json=body | {"echo": False}).json())
    _strict_scored_completion(raw.post("/v1/completions", json=body).json())
    _strict_scored_completion(raw.post("/v1/completions", json=body | {"max_tokens": 0}).json())
    streamed = raw.post("/v1/completions", json=body | {"stream": True, "stream_options": {"include_usage": True}})
    for payload in _data(streamed.text):
        _strict_scored_completion(payload, chunk=True)


def test_response_objects_events_and_stored_items(raw, demo_server):
    body = {"model": demo_server.model, "input": "Hello! How are you today?", "instructions": "Be brief.",
            "include": ["message.output_text.logprobs"], "top_logprobs": 2, "metadata": {"run": "strict"}}
    response = _strict(Response, raw.post("/v1/responses", json=body).json())
    assert response.status == "completed" and response.incomplete_details is None
    assert response.usage.input_tokens_details.cache_write_tokens == 0
    [message] = response.output
    [text] = message.content
    assert text.logprobs and len(text.logprobs[0].top_logprobs) == 2
    assert "".join(lp.token for lp in text.logprobs) == text.text
    events = [STREAM_EVENT.validate_python(payload, strict=True)
              for payload in _data(raw.post("/v1/responses", json=body | {"stream": True}).text)]
    assert events[-1].type == "response.completed"
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert [lp.token for e in deltas for lp in e.logprobs] == [lp.token for lp in events[-1].response.output[0]
                                                                .content[0].logprobs]
    _strict(Response, raw.get(f"/v1/responses/{response.id}").json())
    _strict(ResponseItemList, raw.get(f"/v1/responses/{response.id}/input_items").json())
    _strict(Model, raw.get(f"/v1/models/{demo_server.model}").json())


def test_the_sdk_stream_helpers_work_on_the_demo(demo_server):
    client = demo_server.client()
    with client.responses.stream(model=demo_server.model, input="Tell me a story.") as stream:
        final = stream.get_final_response()
    assert final.status == "completed" and final.output_text
    with client.chat.completions.stream(model=demo_server.model, messages=HI, temperature=1.0) as stream:
        chat = stream.get_final_completion()
    assert chat.choices[0].finish_reason == "stop" and chat.choices[0].message.content


def test_demo_reply_lengths(demo_server):
    """Chat replies end by themselves after a few to a few dozen tokens, greedy and sampled."""
    client = demo_server.client()
    prompts = ["Hi", "What is the capital of France?", "Write a haiku about rain.", "Explain TCP in one line.",
               "2+2?", "Tell me a joke about cats and dogs, please.", "Summarise War and Peace.", "Good morning!"]
    for temperature in (0.0, 1.0):
        for seed, prompt in enumerate(prompts):
            reply = client.chat.completions.create(model=demo_server.model, messages=[{"role": "user", "content": prompt}],
                                                   temperature=temperature, seed=seed, max_tokens=200)
            assert reply.choices[0].finish_reason == "stop", (temperature, prompt)
            assert 3 <= reply.usage.completion_tokens <= 60, (temperature, prompt, reply.usage.completion_tokens)


def test_a_context_limit_stop_reports_what_openai_reports(start_server):
    """OpenAI: a response that reaches the context window, like one that reaches max_output_tokens,
    is incomplete with reason max_output_tokens (its reasoning guide); chat and completions say
    "length". The random chat checkpoint never ends a reply by itself."""
    server = start_server("--max-model-len", "64", "--num-kv-blocks", "16")
    client = server.client()
    response = client.responses.create(model=server.model, input="hi", temperature=0)
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    assert response.usage.input_tokens + response.usage.output_tokens == 64
    cut = client.completions.create(model=server.model, prompt="word " * 40, max_tokens=None)
    assert cut.choices[0].finish_reason == "length"
    assert cut.usage.prompt_tokens + cut.usage.completion_tokens == 64


@pytest.mark.parametrize("field, value", [("conversation", "conv_123"), ("prompt", {"id": "pmpt_1"})])
def test_unimplemented_responses_fields_are_refused_by_name(client, server, field, value):
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(model=server.model, input="hi", extra_body={field: value})
    assert refused.value.param == field and "not supported" in refused.value.message
