"""Per-step cost of batch-1 greedy decoding: nanoserve's engine vs `transformers` generate().

Same demo weights, same device, same prompt, in one run, alternating repeats so that background
load hits both alike. A step's time is the interval between consecutive tokens: for nanoserve
between consecutive outputs of `AsyncEngine.generate` (the whole path: scheduler, model,
sampler, detokenizer, thread hand-off); for HF between consecutive calls of a no-op logits
processor. Also shown: each side's forward pass alone (a decode step's model call and nothing
else), so that what the engine adds can be told from the model's own cost. Prints medians and
the ratio; `--profile` adds a torch.profiler table of the engine's decode steps; `--replay` adds
the engine replaying its recorded decode steps (`--no-enforce-eager`), which decides whether CPU
decode replays by default.

Each measurement runs on a thread of its own (nanoserve's: a fresh engine's loop thread), so that
one thread at a time holds an OpenMP team; see `create_engine` for why that doubles CPU speed.

    python -m bench.step_overhead [--model DIR] [--tokens 128] [--repeats 5] [--profile] [--replay]
"""

import argparse
import asyncio
from dataclasses import replace
import statistics
import time

import torch
from transformers import LogitsProcessor, LogitsProcessorList, Qwen3ForCausalLM

from bench.timing import on_own_thread
from model.batch import SequenceStep, make_batch
from model.load import load_model, model_dir_or_demo
from model.qwen3 import Qwen3Model
from model.tokenizer import Tokenizer
from server.engine.async_engine import AsyncEngine
from server.engine.config import EngineConfig, resolve_config
from server.engine.core import EngineCore
from server.engine.request import GenerationRequest, SamplingParams

PROMPT = "The quick brown fox jumps over the lazy dog. " * 2


class _StepClock(LogitsProcessor):
    """Records when HF asks for each next token's scores; changes nothing."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.times.append(time.perf_counter())
        return scores


def intervals_ms(times: list[float]) -> list[float]:
    return [(b - a) * 1e3 for a, b in zip(times, times[1:])]


@torch.inference_mode()
def hf_forward_steps(hf: Qwen3ForCausalLM, prompt_ids: list[int], tokens: int) -> list[float]:
    cache = hf(torch.tensor([prompt_ids]), use_cache=True).cache
    token = torch.tensor([[prompt_ids[-1]]])
    times = [time.perf_counter()]
    for _ in range(tokens):
        hf(token, cache=cache, use_cache=True)
        times.append(time.perf_counter())
    return intervals_ms(times)


def hf_steps(hf: Qwen3ForCausalLM, prompt_ids: list[int], tokens: int) -> list[float]:
    clock = _StepClock()
    prompt = torch.tensor([prompt_ids])
    hf.generate(prompt, max_new_tokens=tokens, do_sample=False, logits_processor=LogitsProcessorList([clock]))
    return intervals_ms(clock.times)


async def _engine_times(engine: AsyncEngine, request: GenerationRequest) -> list[float]:
    times = []
    async for _ in engine.generate(request):
        times.append(time.perf_counter())
    return times


def engine_steps(model: Qwen3Model, tokenizer: Tokenizer, prompt_ids: list[int], tokens: int,
                 config: EngineConfig = EngineConfig()) -> list[float]:
    """Steps of a fresh engine (its loop thread ends with it), the first one a warm-up."""
    engine = AsyncEngine(model, tokenizer, "", config)
    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    try:
        asyncio.run(_engine_times(engine, GenerationRequest("warm-up", prompt_ids, replace(params, max_tokens=4))))
        return intervals_ms(asyncio.run(_engine_times(engine, GenerationRequest("bench", prompt_ids, params))))
    finally:
        engine.shutdown()


def forward_steps(model, prompt_ids: list[int], tokens: int) -> list[float]:
    """The decode forward pass alone, inputs prepared beforehand: the model's own cost per step."""
    block_size = 16
    num_blocks = -(-(len(prompt_ids) + tokens) // block_size)
    kv_cache = model.allocate_kv_cache(num_blocks, block_size)
    table = list(range(num_blocks))
    model.forward(make_batch([SequenceStep(prompt_ids, 0, table)], block_size, model.device), kv_cache)
    steps = [
        SequenceStep([prompt_ids[-1]], num_cached, table[: num_cached // block_size + 1])
        for num_cached in range(len(prompt_ids), len(prompt_ids) + tokens)
    ]
    batches = [make_batch([step], block_size, model.device) for step in steps]
    times = [time.perf_counter()]
    for batch in batches:
        model.forward(batch, kv_cache)
        times.append(time.perf_counter())
    return intervals_ms(times)


def profile_engine_steps(model: Qwen3Model, tokenizer: Tokenizer, prompt_ids: list[int], tokens: int) -> str:
    """torch.profiler's table of the engine core's decode steps, run on the calling thread: the
    profiler sees the ops of the thread that starts it."""
    from torch.profiler import ProfilerActivity, profile

    core = EngineCore(model, tokenizer, resolve_config(EngineConfig(), model))
    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    core.add_request(GenerationRequest("profile", prompt_ids, params))
    core.step()  # the prefill
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        while core.has_work():
            core.step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20)


def load_hf(model_dir) -> Qwen3ForCausalLM:
    hf = Qwen3ForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None  # every run decodes exactly --tokens tokens
    return hf


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="checkpoint directory (default: the demo)")
    parser.add_argument("--tokens", type=int, default=128, help="tokens generated per run (default 128)")
    parser.add_argument("--repeats", type=int, default=5, help="runs of each, alternating (default 5)")
    parser.add_argument("--profile", action="store_true", help="also print a torch.profiler table of engine steps")
    parser.add_argument("--replay", action="store_true",
                        help="also time the engine replaying recorded decode steps (--no-enforce-eager) against eager")
    args = parser.parse_args()

    model_dir = model_dir_or_demo(args.model)
    model = on_own_thread(load_model, model_dir, "cpu", "float32")
    config = resolve_config(EngineConfig(), model)
    print(on_own_thread(model.plan_cpu_ops, config.max_num_seqs, config.max_model_len).describe())  # as the server
    hf = on_own_thread(load_hf, model_dir)
    tokenizer = Tokenizer(model_dir)
    prompt_ids = tokenizer.encode(PROMPT)
    samples: dict[str, list[float]] = {"hf": [], "hf forward": [], "nanoserve": [], "forward": []}
    on_own_thread(hf_steps, hf, prompt_ids, 8)  # warm-up
    for _ in range(args.repeats):
        samples["hf"] += on_own_thread(hf_steps, hf, prompt_ids, args.tokens)
        samples["hf forward"] += on_own_thread(hf_forward_steps, hf, prompt_ids, args.tokens)
        samples["nanoserve"] += engine_steps(model, tokenizer, prompt_ids, args.tokens)
        samples["forward"] += on_own_thread(forward_steps, model, prompt_ids, args.tokens)
        if args.replay:
            replay = EngineConfig(enforce_eager=False)
            samples.setdefault("replay", []).extend(engine_steps(model, tokenizer, prompt_ids, args.tokens, replay))
    if args.profile:
        print(profile_engine_steps(model, tokenizer, prompt_ids, args.tokens))  # last: no thread runs beside it

    ms = {name: statistics.median(values) for name, values in samples.items()}
    threads = torch.get_num_threads()
    print(f"demo checkpoint, CPU ({threads} threads), batch 1, {args.tokens} tokens x {args.repeats} runs")
    print(f"{'median ms per decode step':36}{'step':>8}{'forward':>9}{'the rest':>10}")
    rows = (("transformers generate()", "hf", "hf forward"), ("nanoserve engine", "nanoserve", "forward"))
    for label, step, forward in rows:
        print(f"{label:36}{ms[step]:8.3f}{ms[forward]:9.3f}{ms[step] - ms[forward]:10.3f}")
    if args.replay:
        print(f"{'nanoserve engine, decode replayed':36}{ms['replay']:8.3f}")
    print(f"ratio nanoserve / HF per step: {ms['nanoserve'] / ms['hf']:.2f} (target <= 0.50)")
    if args.replay:
        print(f"ratio replayed / eager engine step: {ms['replay'] / ms['nanoserve']:.2f}")


if __name__ == "__main__":
    main()
