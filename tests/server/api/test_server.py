"""The endpoints beside the OpenAI API, and the server process: startup, restart, shutdown."""

import json
import signal
import threading

import httpx

from model.tokenizer import Tokenizer


def test_models(client, server):
    models = client.models.list()
    assert [(m.id, m.object, m.owned_by) for m in models.data] == [(server.model, "model", "nanoserve")]
    assert client.models.retrieve(server.model).id == server.model


def test_health_version_and_metrics(http, client, server):
    assert http.get("/health").json() == {"status": "ok"}
    assert http.get("/version").json() == {"version": "0.1.0"}
    client.completions.create(model=server.model, prompt="Hello", max_tokens=3, extra_body={"ignore_eos": True})
    metrics = http.get("/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    samples = {line.split()[0]: float(line.split()[1]) for line in metrics.text.splitlines() if line[:1] != "#"}
    for name in ("nanoserve_requests_running", "nanoserve_requests_waiting", "nanoserve_kv_blocks_used"):
        assert name in samples
    assert samples["nanoserve_kv_blocks_total"] > 0
    assert samples["nanoserve_generation_tokens_total"] >= 3
    assert samples["nanoserve_prompt_tokens_total"] >= 1
    assert samples["nanoserve_time_to_first_token_seconds_count"] >= 1
    assert samples["nanoserve_inter_token_latency_seconds_count"] >= 2
    assert samples['nanoserve_http_requests_total{route="/v1/completions",status="200"}'] >= 1
    assert samples['nanoserve_requests_finished_total{finish_reason="length"}'] >= 1


def test_tokenize_and_detokenize(http, server, chat_checkpoint):
    tokenizer = Tokenizer(chat_checkpoint)
    tokens = http.post("/tokenize", json={"model": server.model, "prompt": "Hello, world!"}).json()
    assert tokens["tokens"] == [9707, 11, 1879, 0] and tokens["count"] == 4 and tokens["max_model_len"] > 0
    chat = http.post("/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat["tokens"] == tokenizer.encode("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert http.post("/detokenize", json={"tokens": [9707, 11, 1879, 0]}).json() == {"prompt": "Hello, world!"}
    assert http.post("/detokenize", json={"tokens": [10**9]}).json()["error"]["param"] == "tokens"
    assert http.post("/tokenize", json={}).status_code == 400


def test_restart_keeps_stored_responses_and_shutdown_ends_streams_cleanly(start_server, tmp_path):
    store = str(tmp_path / "responses.sqlite3")
    first = start_server("--response-store", store, "--served-model-name", "persisted")
    stored = first.client().responses.create(model="persisted", input="Remember me.", max_output_tokens=4)
    as_first_saw_it = httpx.get(f"{first.base_url}/v1/responses/{stored.id}").json()

    # A stream that is still generating when the server is told to stop
    body = {"model": "persisted", "prompt": "Once", "max_tokens": 1500, "stream": True, "ignore_eos": True}
    lines, started = [], threading.Event()

    def read_stream():
        with httpx.stream("POST", f"{first.base_url}/v1/completions", json=body, timeout=60) as response:
            for line in response.iter_lines():
                lines.append(line)
                started.set()

    reader = threading.Thread(target=read_stream)
    reader.start()
    assert started.wait(30)
    assert first.stop(signal.SIGINT) == 0
    reader.join(30)
    data = [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    assert json.loads(data[-2])["error"]["code"] == "engine_unavailable"
    assert "Traceback" not in first.log()

    second = start_server("--response-store", store, "--served-model-name", "persisted")
    assert httpx.get(f"{second.base_url}/v1/responses/{stored.id}").json() == as_first_saw_it
    assert second.client().responses.retrieve(stored.id) == stored
