"""What routers read from a replica, over ASGI with a scripted engine: the render endpoints (vLLM's
`GenerateRequest`: the exact prompt token ids the generating endpoint uses, vLLM's sampling
parameter names), SGLang's model info, and the vllm:* gauges beside nanoserve's own."""

import json
from pathlib import Path

import pytest

from server.api.app import create_app
from server.api.response_store import SQLiteResponseStore
from server.api.sealed_reasoning import ReasoningSeal
from server.engine.request import EngineStats
from tests.server.api.test_http_scripted import MODEL, ScriptedEngine, tokenizer  # noqa: F401 (a fixture)

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Which way to the harbour?"}]


class _Engine(ScriptedEngine):
    model_dir = Path("/models/Qwen3-0.6B")

    def stats(self) -> EngineStats:
        return EngineStats(num_running=3, num_waiting=2, kv_blocks_used=6, kv_blocks_total=8, num_preemptions=0,
                           kv_blocks_cached=1)


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture
async def client(tokenizer, tmp_path):
    store = SQLiteResponseStore(tmp_path / "responses.sqlite3", 100)
    app = create_app(_Engine(tokenizer, ["Left", "."]), MODEL, store, None, 1 << 20, ReasoningSeal(bytes(range(32))))
    try:
        async with app.test_app() as test_app:
            yield test_app.test_client()
    finally:
        store.close()


async def _post(client, path: str, body: dict) -> tuple[int, dict | list]:
    response = await client.post(path, json=body)
    return response.status_code, json.loads(await response.get_data(as_text=True))


VLLM_DEFAULTS = {"n": 1, "temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "seed": None,
                 "presence_penalty": 0.0, "frequency_penalty": 0.0, "repetition_penalty": 1.0, "logit_bias": None,
                 "min_tokens": 0, "ignore_eos": False, "stop": [], "stop_token_ids": [], "logprobs": None,
                 "prompt_logprobs": None, "skip_special_tokens": True, "structured_outputs": None}


@pytest.mark.anyio
async def test_chat_render_is_the_prompt_chat_generates_from(client, tokenizer):
    body = {"model": MODEL, "messages": MESSAGES, "temperature": 0.25, "max_tokens": 7, "stop": ["\n"], "seed": 11,
            "top_k": -1, "stream": True, "stream_options": {"include_usage": True},
            "response_format": {"type": "json_object"}}
    status, rendered = await _post(client, "/v1/chat/completions/render", body)
    assert status == 200
    expected_ids = tokenizer.encode_chat(MESSAGES)
    assert rendered["token_ids"] == expected_ids
    assert rendered["request_id"].startswith("chatcmpl-")
    assert rendered["sampling_params"] == VLLM_DEFAULTS | {"temperature": 0.25, "max_tokens": 7, "stop": ["\n"],
                                                           "seed": 11, "structured_outputs": {"json_object": True}}
    assert {k: v for k, v in rendered.items() if k not in ("request_id", "token_ids", "sampling_params")} == {
        "features": None, "model": MODEL, "stream": True, "stream_options": {"include_usage": True},
        "cache_salt": None, "priority": 0, "kv_transfer_params": None}
    _, completion = await _post(client, "/v1/chat/completions", {"model": MODEL, "messages": MESSAGES})
    assert completion["usage"]["prompt_tokens"] == len(expected_ids)


@pytest.mark.anyio
async def test_completions_render_gives_one_request_per_prompt(client, tokenizer):
    body = {"model": MODEL, "prompt": ["The harbour is", "Hello, world!"], "max_tokens": None, "logprobs": 2,
            "echo": True}
    status, rendered = await _post(client, "/v1/completions/render", body)
    assert status == 200
    assert [r["token_ids"] for r in rendered] == [tokenizer.encode("The harbour is"), [9707, 11, 1879, 0]]
    # No max_tokens: the rest of the context, as vLLM resolves it.
    assert [r["sampling_params"]["max_tokens"] for r in rendered] == [4096 - len(r["token_ids"]) for r in rendered]
    assert all(r["sampling_params"]["logprobs"] == 2 and r["sampling_params"]["prompt_logprobs"] == 2
               for r in rendered)
    assert all(r["request_id"].startswith("cmpl-") and r["stream"] is False for r in rendered)


@pytest.mark.anyio
async def test_responses_render_is_stateless(client, tokenizer):
    schema = {"type": "object", "properties": {"way": {"type": "string"}}, "required": ["way"]}
    body = {"model": MODEL, "instructions": "Be brief.", "input": "Which way to the harbour?",
            "max_output_tokens": 5, "text": {"format": {"type": "json_schema", "name": "way", "schema": schema}}}
    status, rendered = await _post(client, "/v1/responses/render", body)
    assert status == 200
    assert rendered["token_ids"] == tokenizer.encode_chat(MESSAGES)
    assert rendered["sampling_params"] == VLLM_DEFAULTS | {"max_tokens": 5, "structured_outputs": {"json": schema}}
    status, error = await _post(client, "/v1/responses/render", body | {"previous_response_id": "resp_1"})
    assert status == 400 and error["error"]["param"] == "previous_response_id"


@pytest.mark.anyio
async def test_render_checks_the_request_as_generation_would(client):
    status, error = await _post(client, "/v1/chat/completions/render", {"model": "other", "messages": MESSAGES})
    assert status == 404 and error["error"]["code"] == "model_not_found"
    status, error = await _post(client, "/v1/completions/render", {"model": MODEL, "prompt": [[151700]]})
    assert status == 400 and error["error"]["param"] == "prompt"
    status, error = await _post(client, "/v1/responses/render", {"model": MODEL, "input": ""})
    assert status == 400 and error["error"]["param"] == "input"


@pytest.mark.anyio
async def test_model_info_answers_as_sglang_does(client):
    for path in ("/model_info", "/get_model_info"):
        response = await client.get(path)
        assert response.status_code == 200
        assert json.loads(await response.get_data(as_text=True)) == {
            "model_path": "/models/Qwen3-0.6B", "tokenizer_path": "/models/Qwen3-0.6B", "is_generation": True,
            "preferred_sampling_params": None, "weight_version": "default", "has_image_understanding": False,
            "has_audio_understanding": False, "model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"]}


@pytest.mark.anyio
async def test_metrics_carry_vllm_gauges_beside_our_own(client):
    text = await (await client.get("/metrics")).get_data(as_text=True)
    samples = dict(line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))
    labels = f'{{engine="0",model_name="{MODEL}"}}'
    assert float(samples[f"vllm:num_requests_running{labels}"]) == 3
    assert float(samples[f"vllm:num_requests_waiting{labels}"]) == 2
    assert float(samples[f"vllm:kv_cache_usage_perc{labels}"]) == 0.75  # 6 of 8 blocks held; the cached one is free
    assert float(samples["nanoserve_requests_running"]) == 3 and float(samples["nanoserve_kv_blocks_used"]) == 6
    assert "# TYPE vllm:kv_cache_usage_perc gauge" in text
