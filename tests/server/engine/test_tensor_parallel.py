"""`--tensor-parallel-size 2` on CPU (gloo between two processes), as users see it: the same greedy
tokens as one process, on checkpoints with 2 KV heads (split) and 1 (replicated), untied and tied;
a worker that dies or raises stops the server with a message naming its rank; SIGTERM leaves no
process behind; a startup error is one line."""

import asyncio
import multiprocessing
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch

from model.demo import write_checkpoint
from model.load import load_model
from model.parallel import Collectives
from model.tokenizer import Tokenizer
from server.engine.async_engine import AsyncEngine
from server.engine.config import EngineConfig
from server.engine.request import GenerationRequest, SamplingParams
from tests.server.conftest import LiveServer

SMALL_CONTEXT = ("--max-model-len", "512")  # small KV caches: fast to start
MAX_TOKENS = 12
EXIT_WITHIN_S = 10  # a worker fault ends the server within this
WORDS = "harbour station river lantern copper orchard violet signal meadow anchor ledger pylon".split()

# Loaded into the workers (PYTHONPATH) by the raising-worker test: rank 1's forward pass raises
# once FAULT_FILE exists. It patches the model once the worker has imported it.
FAULT_HOOK = '''
import os, sys, threading, time

def _patch():
    while "model.qwen3" not in sys.modules or not hasattr(sys.modules["model.qwen3"], "Qwen3Model"):
        time.sleep(0.05)
    model = sys.modules["model.qwen3"].Qwen3Model
    forward = model.forward

    def faulty(self, *args, **kwargs):
        if self.shard.rank == 1 and os.path.exists(os.environ["FAULT_FILE"]):
            raise RuntimeError("injected fault")
        return forward(self, *args, **kwargs)

    model.forward = faulty

if os.environ.get("FAULT_FILE"):
    threading.Thread(target=_patch, daemon=True).start()
'''


@pytest.fixture(scope="module")
def one_kv_head_tied(chat_checkpoint, tmp_path_factory) -> Path:
    """1 KV head for 4 query heads (replicated on both ranks), tied embeddings; the chat
    checkpoint's tokenizer."""
    shape = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 1, "head_dim": 64, "tie_word_embeddings": True, "dtype": "float32"}
    directory = write_checkpoint(tmp_path_factory.mktemp("kv1-tied"), shape, seed=11, with_tokenizer=False)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(chat_checkpoint) / name, directory / name)
    return directory


def _prompts(count: int) -> list[str]:
    rng = random.Random(5)
    return [" ".join(rng.choices(WORDS, k=rng.randint(3, 40))) for _ in range(count)]


def _one_process_texts(model_dir: Path, prompts: list[str]) -> list[str]:
    """Greedy replies of TP=1 in this process, all requests at once as the server batches them."""
    tokenizer = Tokenizer(model_dir)
    engine = AsyncEngine(load_model(model_dir, "cpu"), tokenizer, model_dir, EngineConfig(max_model_len=512))
    try:
        return _greedy_texts(engine, tokenizer, prompts)
    finally:
        engine.shutdown()


def _greedy_texts(engine, tokenizer: Tokenizer, prompts: list[str]) -> list[str]:
    """Each prompt's greedy reply of MAX_TOKENS tokens (EOS ignored), all requests at once."""
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)

    async def one(index: int, prompt: str) -> str:
        text = ""
        async for output in engine.generate(GenerationRequest(f"r{index}", tokenizer.encode(prompt), params)):
            text += output.choices[0].text
        return text

    async def every() -> list[str]:
        return await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))

    return asyncio.run(every())


def _worker_pid(log: str) -> int:
    return int(re.search(r"tensor parallel: rank 1 is process (\d+)", log).group(1))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()


@pytest.fixture(scope="module")
def tp_server(chat_checkpoint, tmp_path_factory):
    server = LiveServer(Path(chat_checkpoint), tmp_path_factory.mktemp("tp-log") / "server.log",
                        "--tensor-parallel-size", "2", *SMALL_CONTEXT)
    yield server
    server.stop()


def test_eight_concurrent_requests_streamed_and_not_get_the_one_process_tokens(tp_server, chat_checkpoint):
    """2 KV heads split over 2 ranks, untied LM head: 8 requests at once, half streamed."""
    prompts = _prompts(8)
    client = tp_server.async_client()

    async def ask(index: int, prompt: str) -> str:
        args = dict(model=tp_server.model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                    extra_body={"ignore_eos": True})
        if index % 2:
            return "".join([chunk.choices[0].text async for chunk in await client.completions.create(stream=True, **args)])
        return (await client.completions.create(**args)).choices[0].text

    async def every() -> list[str]:
        return await asyncio.gather(*(ask(i, p) for i, p in enumerate(prompts)))

    served = asyncio.run(every())
    assert served == _one_process_texts(Path(chat_checkpoint), prompts)
    assert all(served)


def test_sigterm_leaves_no_process(tp_server):
    worker = _worker_pid(tp_server.log())
    assert _alive(worker)
    assert tp_server.stop(signal.SIGTERM) == 0
    deadline = time.monotonic() + 5
    while _alive(worker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(worker), tp_server.log()


def _wait_exit(server: LiveServer) -> int:
    try:
        return server.process.wait(timeout=EXIT_WITHIN_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the server still runs {EXIT_WITHIN_S} s after its worker's fault:\n{server.log()}")


def test_a_killed_worker_stops_the_server_naming_its_rank(one_kv_head_tied, tmp_path):
    server = LiveServer(one_kv_head_tied, tmp_path / "server.log", "-tp", "2", *SMALL_CONTEXT)
    try:
        worker = _worker_pid(server.log())
        os.kill(worker, signal.SIGKILL)
        assert _wait_exit(server) == 1
        assert "nanoserve: error: tensor-parallel rank 1 exited (killed by SIGKILL); the server stops" in server.log()
    finally:
        server.stop()


@pytest.fixture(scope="module")
def faulty_server(one_kv_head_tied, tmp_path_factory):
    """TP=2 over the 1-KV-head tied checkpoint, decoding through the graph runner's CPU form on
    both ranks (--no-enforce-eager); rank 1 raises once `server.fault` exists."""
    hooks = tmp_path_factory.mktemp("hooks")
    (hooks / "sitecustomize.py").write_text(FAULT_HOOK)
    env = {"PYTHONPATH": f"{hooks}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "FAULT_FILE": str(hooks / "fault"),
           "OMP_WAIT_POLICY": "PASSIVE"}  # the last as the virtualenv's sitecustomize, which this one shadows
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        server = LiveServer(one_kv_head_tied, tmp_path_factory.mktemp("faulty-log") / "server.log", "-tp", "2",
                            "--no-enforce-eager", *SMALL_CONTEXT)
    finally:
        for name, value in saved.items():
            os.environ.pop(name) if value is None else os.environ.__setitem__(name, value)
    server.fault = hooks / "fault"
    yield server
    server.stop()


def test_replicated_kv_head_tied_embeddings_and_recorded_decode_steps_get_the_one_process_tokens(
    faulty_server, one_kv_head_tied,
):
    """1 KV head replicated on both ranks, the tied LM head vocab-parallel, decode replayed."""
    prompts = _prompts(3)
    client = faulty_server.client()
    args = dict(model=faulty_server.model, max_tokens=MAX_TOKENS, temperature=0, extra_body={"ignore_eos": True})
    served = [client.completions.create(prompt=prompts[0], **args).choices[0].text,
              "".join(chunk.choices[0].text for chunk in client.completions.create(prompt=prompts[1], stream=True,
                                                                                  **args)),
              client.completions.create(prompt=prompts[2], **args).choices[0].text]
    assert served == _one_process_texts(one_kv_head_tied, prompts)


def test_a_raising_worker_stops_the_server_naming_its_rank(faulty_server):
    faulty_server.fault.touch()
    with pytest.raises(openai.APIError):
        faulty_server.client().completions.create(model=faulty_server.model, prompt="violet signal", max_tokens=2)
    assert _wait_exit(faulty_server) == 1
    log = faulty_server.log()
    assert "nanoserve: error: tensor-parallel rank 1 failed: RuntimeError: injected fault; the server stops" in log
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{faulty_server.base_url}/health", timeout=2)


def _generate_errors(model_dir: Path, *flags: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "server.cli", "generate", "--model", str(model_dir), "--device", "cpu",
               *flags, "hi"]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def test_a_size_that_does_not_divide_the_model_is_refused_before_any_rank_starts(one_kv_head_tied):
    from server.engine.distributed import TensorParallelWorkers

    config = EngineConfig(tensor_parallel_size=3)
    with pytest.raises(ValueError, match="^--tensor-parallel-size 3 does not divide the model's 4 attention heads$"):
        TensorParallelWorkers(one_kv_head_tied, "cpu", "auto", "auto", config)
    assert not multiprocessing.active_children()


@pytest.mark.slow
def test_a_startup_error_on_the_ranks_is_one_line(one_kv_head_tied, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(one_kv_head_tied, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    result = _generate_errors(broken, "-tp", "2")
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert result.returncode == 2, result.stderr
    assert len(errors) == 1 and errors[0].startswith("nanoserve: error: "), result.stderr
    assert "truncated or corrupt" in errors[0]
    assert "Traceback" not in result.stderr


def test_each_rank_loads_its_slices_of_the_checkpoint(one_kv_head_tied, chat_checkpoint):
    """Rank r's weights are its rows or columns of the full model's, and nothing else; the last
    vocabulary shard's padding rows (none at 2 ranks) stay zero."""
    unused = Collectives(all_reduce=lambda t: None, all_gather=lambda t: t[None])
    for model_dir, kv_rows in ((Path(chat_checkpoint), lambda r: slice(64 * r, 64 * (r + 1))),
                               (one_kv_head_tied, lambda r: slice(0, 64))):
        full = load_model(model_dir, "cpu")
        c = full.config
        q, kv, inter, vocab = c.q_size // 2, c.kv_size, c.intermediate_size // 2, c.vocab_size // 2
        for rank in (0, 1):
            shard = load_model(model_dir, "cpu", rank=rank, world_size=2, collectives=unused)
            layer, whole = shard.layers[1], full.layers[1]
            q_rows, kv_r = slice(q * rank, q * (rank + 1)), kv_rows(rank)
            assert torch.equal(layer.qkv_proj[:q], whole.qkv_proj[:c.q_size][q_rows])
            k_rows = layer.qkv_proj[q:].shape[0] // 2  # this rank's KV heads: 1 of 2, or the 1 replicated
            assert torch.equal(layer.qkv_proj[q : q + k_rows], whole.qkv_proj[c.q_size : c.q_size + kv][kv_r])
            assert torch.equal(layer.qkv_proj[q + k_rows :], whole.qkv_proj[c.q_size + kv :][kv_r])
            assert torch.equal(layer.o_proj, whole.o_proj[:, q_rows])
            assert torch.equal(layer.gate_up_proj[:inter], whole.gate_up_proj[: c.intermediate_size][inter * rank : inter * (rank + 1)])
            assert torch.equal(layer.down_proj, whole.down_proj[:, inter * rank : inter * (rank + 1)])
            assert torch.equal(shard.embed_tokens, full.embed_tokens[vocab * rank : vocab * (rank + 1)])
            assert torch.equal(shard.lm_head, full.lm_head[vocab * rank : vocab * (rank + 1)])
            assert torch.equal(layer.q_norm, whole.q_norm) and torch.equal(shard.norm, full.norm)


def test_bench_gpu_reads_the_tensor_parallel_row():
    from bench.gpu import MULTI_GPU_TARGETS, evaluate
    from bench.tp import step_ratio

    report = {"shape": "qwen3-8b", "tp1_ms": 4.0, "tp2_ms": 2.5}
    assert step_ratio(report) == (0.625, "0.62x (2.50 vs 4.00 ms, qwen3-8b batch 1)")
    assert [row.result for row in evaluate(MULTI_GPU_TARGETS, {"tp": report})] == ["pass"]
    assert [row.result for row in evaluate(MULTI_GPU_TARGETS, {"tp": report | {"tp2_ms": 2.7}})] == ["FAIL"]
    assert [row.result for row in evaluate(MULTI_GPU_TARGETS, {"tp": None})] == ["not measured"]


def test_a_draft_model_under_tensor_parallelism_keeps_the_one_process_tokens(chat_checkpoint):
    """The draft model runs whole on rank 0 (its proposals and its copies of every step need no
    other rank), here with graphs on (their CPU form): the target as its own draft, every draft
    accepted, the tokens of one process without speculation."""
    from argparse import Namespace
    from dataclasses import fields

    from server.engine.async_engine import create_engine
    from server.engine.speculative import SpeculativeConfig

    prompts = _prompts(2)
    spec = SpeculativeConfig("draft_model", 3, disable_by_batch_size=4, model=str(chat_checkpoint))
    flags = {field.name: getattr(EngineConfig(), field.name) for field in fields(EngineConfig)} | dict(
        max_model_len=512, tensor_parallel_size=2, speculative_config=spec, enforce_eager=False)
    engine = create_engine(Namespace(model=str(chat_checkpoint), device="cpu", dtype="auto", kernels="auto", **flags))
    tokenizer = Tokenizer(chat_checkpoint)
    try:
        texts = _greedy_texts(engine, tokenizer, prompts)
        stats = engine._core.speculator.stats
    finally:
        engine.shutdown()
    assert texts == _one_process_texts(chat_checkpoint, prompts)
    assert stats.draft_tokens > 0 and stats.accepted_tokens == stats.draft_tokens
