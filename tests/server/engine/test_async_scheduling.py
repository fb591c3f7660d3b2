"""Async scheduling (step n+1 launched before step n is read back) on CPU, where it runs the same
bookkeeping as on CUDA: every request's output equals the synchronous engine's, token for token,
with the stops exact (a sequence that stopped gets nothing from the step launched after), and no
KV block is lost, through preemption, aborts, grammars and failing launches."""

from collections import defaultdict
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from model.tokenizer import Tokenizer
from server.engine.config import EngineConfig, resolve_config
from server.engine.core import EngineCore
from server.engine.request import GenerationRequest, RequestFailed, RequestOutput, SamplingParams, StructuredOutput
from tests.conftest import load_test_model
from tests.server.engine.test_engine import demo, random_prompts  # noqa: F401  (demo is a fixture)


def make_core(demo, **config) -> EngineCore:
    model, tokenizer = demo
    return EngineCore(model, tokenizer, resolve_config(EngineConfig(**config), model))


def workload(tokenizer) -> list[tuple[int, GenerationRequest]]:
    """(step to add it at, request): every way a choice can end, side by side, arriving while
    others run. Sampled requests are seeded: their tokens do not depend on the batch."""
    eos = tokenizer.eos_token_ids[0]
    prompts = random_prompts(12, seed=40, lengths=(5, 70))
    plain = dict(temperature=0.0, ignore_eos=True)
    params = [
        SamplingParams(max_tokens=30, **plain),
        SamplingParams(max_tokens=1, **plain),  # finishes on its first token: in the prompt's step
        SamplingParams(max_tokens=12, logprobs=2, **plain),
        SamplingParams(max_tokens=20, temperature=0.0, logit_bias={eos: 100.0}, min_tokens=3),  # EOS at 4
        SamplingParams(max_tokens=25, temperature=0.9, top_p=0.9, seed=7, n=2, presence_penalty=0.5),
        SamplingParams(max_tokens=0, prompt_logprobs=1),  # scores its prompt, generates nothing
        SamplingParams(max_tokens=18, temperature=0.0, repetition_penalty=1.3, frequency_penalty=0.2, ignore_eos=True),
        SamplingParams(max_tokens=16, temperature=0.0, structured_output=StructuredOutput("json_object")),
        SamplingParams(max_tokens=40, temperature=0.7, seed=3, ignore_eos=True),
        SamplingParams(max_tokens=22, prompt_logprobs=2, **plain),
    ]
    requests = [(2 * i % 7, GenerationRequest(f"r{i}", prompts[i], p)) for i, p in enumerate(params)]
    # A stop token and a stop string that the greedy reply reaches mid-way (found by the test).
    return requests + [(1, GenerationRequest("stop-token", prompts[10], SamplingParams(max_tokens=30, **plain))),
                       (3, GenerationRequest("stop-string", prompts[11], SamplingParams(max_tokens=30, **plain)))]


def drive(core: EngineCore, timed_requests: list[tuple[int, GenerationRequest]],
          aborts: dict[int, str] | None = None) -> dict[str, list[RequestOutput | Exception]]:
    """Step the core until it is idle, adding each request at its step and aborting at theirs."""
    outputs: dict[str, list[RequestOutput | Exception]] = defaultdict(list)
    pending = sorted(timed_requests, key=lambda item: item[0])
    aborts = dict(aborts or {})
    step = 0
    while pending or core.has_work():
        while pending and pending[0][0] <= step:
            core.add_request(pending.pop(0)[1])
        if (request_id := aborts.pop(step, None)) and (output := core.abort(request_id)) is not None:
            outputs[request_id].append(output)
        for request_id, output in core.step():
            outputs[request_id].append(output)
        step += 1
    assert core.block_manager.num_used == 0, "a KV block was not given back"
    return outputs


def summary(outputs: list[RequestOutput]) -> dict:
    """What a client sees of a request: per choice text, tokens, logprobs and ending; usage."""
    choices: dict[int, dict] = defaultdict(lambda: {"text": "", "token_ids": [], "logprobs": []})
    for output in outputs:
        for delta in output.choices:
            choice = choices[delta.index]
            choice["text"] += delta.text
            choice["token_ids"] += delta.token_ids
            choice["logprobs"] += [(lp.token_id, round(lp.logprob, 4)) for lp in delta.logprobs or []]
            choice["end"] = (delta.finish_reason, delta.stop_reason)
    last = outputs[-1]
    prompt_logprobs = [(lp.token_id, round(lp.logprob, 4)) for lp in last.prompt_logprobs or []] or None
    return {"choices": dict(choices), "finished": last.finished, "usage": (last.prompt_tokens, last.completion_tokens),
            "prompt_logprobs": prompt_logprobs}


def with_stops(demo, requests: list[tuple[int, GenerationRequest]], config: dict) -> list[tuple[int, GenerationRequest]]:
    """The stop-token and stop-string requests, given a stop their greedy reply reaches at its 6th
    token (run under the test's `config`: on CUDA the defaults would size the cache from free memory)."""
    _, tokenizer = demo
    unstopped = drive(make_core(demo, **config), requests)
    tokens = {rid: [t for out in outputs for d in out.choices for t in d.token_ids] for rid, outputs in unstopped.items()}
    text = summary(unstopped["stop-string"])["choices"][0]["text"]
    stop_string = tokenizer.decode(tokens["stop-string"][5:7]).strip() or text[5:9]
    assert stop_string and stop_string in text
    out = []
    for at, req in requests:
        if req.request_id == "stop-token":
            req = replace(req, params=replace(req.params, stop_token_ids=[tokens["stop-token"][5]]))
        elif req.request_id == "stop-string":
            req = replace(req, params=replace(req.params, stop=[stop_string]))
        out.append((at, req))
    return out


@pytest.mark.parametrize("config", [{}, {"num_kv_blocks": 14, "max_num_batched_tokens": 48}, {"enforce_eager": False}],
                         ids=["normal-cache", "tiny-cache-preempts", "replayed-decode-steps"])
def test_async_scheduling_gives_every_request_exactly_the_synchronous_output(demo, config):
    check_async_equals_sync(demo, config)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_async_scheduling_with_graphs_gives_exactly_the_synchronous_output(demo_dir):
    """Events, pinned double buffers and device-side token hand-over, on the real thing."""
    cuda_demo = load_test_model(demo_dir, "cuda"), Tokenizer(demo_dir)
    check_async_equals_sync(cuda_demo, {"num_kv_blocks": 1024, "max_num_seqs": 8, "enforce_eager": False})


def check_async_equals_sync(demo, config: dict) -> None:
    requests = with_stops(demo, workload(demo[1]), config)
    sync_core = make_core(demo, async_scheduling=False, **config)
    async_core = make_core(demo, async_scheduling=True, **config)
    overlapped = 0
    launch = async_core.runner.launch

    def counting_launch(batch, previous=None):
        nonlocal overlapped
        overlapped += previous is not None
        return launch(batch, previous)

    async_core.runner.launch = counting_launch
    expected = {rid: summary(outputs) for rid, outputs in drive(sync_core, requests).items()}
    got = {rid: summary(outputs) for rid, outputs in drive(async_core, requests).items()}
    assert got == expected
    ends = {end for result in expected.values() for choice in result["choices"].values() for end in [choice["end"]]}
    stop_string = next(req.params.stop[0] for _, req in requests if req.request_id == "stop-string")
    assert {("length", None), ("stop", None), ("stop", stop_string)} <= ends
    assert any(end[0] == "stop" and isinstance(end[1], int) for end in ends)
    assert expected["r7"]["choices"][0]["text"].startswith("{")  # the grammar held: a JSON object begins
    assert overlapped > 20, "steps were not launched before the previous one was read back"
    if "num_kv_blocks" in config and config["num_kv_blocks"] < 100:
        assert async_core.scheduler.num_preemptions > 0


def test_a_stopped_sequence_gets_nothing_from_the_step_launched_after_its_stop(demo):
    _, tokenizer = demo
    eos = tokenizer.eos_token_ids[0]
    prompt = random_prompts(1, seed=41)[0]
    core = make_core(demo, async_scheduling=True)
    finished_then_launched = []
    launch = core.runner.launch

    def watching_launch(batch, previous=None):
        step = launch(batch, previous)
        finished_then_launched.append([seq.request_id for seq in batch.seqs])
        return step

    core.runner.launch = watching_launch
    # EOS is forced from the 3rd token on: the step after it is launched before the host sees it.
    request = GenerationRequest("eos", prompt, SamplingParams(temperature=0.0, max_tokens=50, min_tokens=2,
                                                             logit_bias={eos: 100.0}))
    outputs = drive(core, [(0, request)])["eos"]
    token_ids = [t for out in outputs for d in out.choices for t in d.token_ids]
    assert len(token_ids) == 3 and token_ids[-1] == eos and eos not in token_ids[:2]
    assert outputs[-1].choices[-1].finish_reason == "stop" and outputs[-1].completion_tokens == 3
    # prompt step, then decodes of tokens 1, 2 and 3: the last one launched before token 3 was known
    assert len(finished_then_launched) == 4


def test_an_abort_while_a_step_is_on_the_device_frees_every_block(demo):
    prompts = random_prompts(3, seed=42)
    requests = [(0, GenerationRequest(f"a{i}", p, SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)))
                for i, p in enumerate(prompts)]
    outputs = drive(make_core(demo, async_scheduling=True), requests, aborts={5: "a1"})
    assert outputs["a1"][-1].finished and outputs["a1"][-1].choices[-1].finish_reason == "abort"
    sync = drive(make_core(demo, async_scheduling=False), [requests[0], requests[2]])
    for request_id in ("a0", "a2"):
        assert summary(outputs[request_id]) == summary(sync[request_id])


def test_a_failing_launch_fails_its_requests_and_the_rest_are_unchanged(demo):
    prompts = random_prompts(3, seed=43)
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    requests = [(0, GenerationRequest("healthy", prompts[0], params)), (4, GenerationRequest("poison", prompts[1], params)),
                (9, GenerationRequest("later", prompts[2], params))]
    core = make_core(demo, async_scheduling=True)
    launch, run = core.runner.launch, core.runner.run

    def fail_on_poison(run_or_launch):
        def wrapped(batch, *args):
            if any(seq.request_id == "poison" for seq in batch.seqs):
                raise RuntimeError("injected failure")
            return run_or_launch(batch, *args)
        return wrapped

    core.runner.launch, core.runner.run = fail_on_poison(launch), fail_on_poison(run)
    outputs = drive(core, requests)
    assert isinstance(outputs["poison"][-1], RequestFailed) and "injected failure" in str(outputs["poison"][-1])
    sync = drive(make_core(demo, async_scheduling=False), [requests[0], requests[2]])
    for request_id in ("healthy", "later"):
        assert summary(outputs[request_id]) == summary(sync[request_id])


def test_async_scheduling_is_on_for_cuda_and_off_for_cpu_unless_asked():
    from types import SimpleNamespace

    def model(device: str):
        return SimpleNamespace(device=torch.device(device), config=SimpleNamespace(max_position_embeddings=4096))

    sized = EngineConfig(num_kv_blocks=64, max_model_len=1024)
    assert resolve_config(sized, model("cpu")).async_scheduling is False
    assert resolve_config(sized, model("cuda")).async_scheduling is True
    assert resolve_config(replace(sized, async_scheduling=True), model("cpu")).async_scheduling is True
    assert resolve_config(replace(sized, async_scheduling=False), model("cuda")).async_scheduling is False


def test_unresolved_tokens_come_from_their_own_rows_when_a_resolved_row_sits_between_them(demo):
    """The steady-state shortcut (one copy of the first k sampled ids) holds only when the
    unresolved rows are exactly 0..k-1: rows 0 and 2 unresolved around a resolved row 1 (a
    sequence resumed after a read-back) must keep row 1's token as the host wrote it."""
    runner = make_core(demo).runner
    token_ids = runner._token_ids.device
    token_ids[:3] = torch.tensor([100, 101, 102])
    decodes = [SimpleNamespace(unresolved_row=0), SimpleNamespace(unresolved_row=None), SimpleNamespace(unresolved_row=2)]
    previous = SimpleNamespace(sampled=SimpleNamespace(token_ids=torch.tensor([7, 8, 9])))
    runner._read_unresolved(decodes, previous)
    assert token_ids[:3].tolist() == [7, 101, 9]
    token_ids[:3] = torch.tensor([100, 101, 102])
    runner._read_unresolved([decodes[0], SimpleNamespace(unresolved_row=1)], previous)
    assert token_ids[:3].tolist() == [7, 8, 102]  # rows 0..1 from rows 0..1: the shortcut
