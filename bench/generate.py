"""nanoserve vs transformers `generate()` on the same weights, same device, same prompts, one run.

    python -m bench.generate --shape qwen3-0.6b --device cpu --dtype bfloat16
    python -m bench.generate --model /path/to/Qwen3-8B --device cuda

Weights come from a checkpoint directory (`--model`) or are random with a named shape
(`--shape demo|qwen3-0.6b|qwen3-8b`): HF initialises its model and nanoserve loads HF's tensors,
so both hold the same values. Speed does not depend on the values.

Measured, each a median over `--repeats` runs:
- prefill tokens/s: one forward pass over a `--prompt-len` prompt, logits for its last token,
  eagerly and with the pieces between attentions replayed (`server.engine.piecewise_graph`: CUDA
  graphs on CUDA, the recorded pieces called on CPU), which is how the engine runs prompt steps;
- decode tokens/s at batch 1 and ms per decode step (generating `--decode-tokens` after the first);
- aggregate decode tokens/s at each of `--batches`: nanoserve's engine with that many concurrent
  requests vs HF batched `generate` with that many prompts (equal lengths, so no padding);
- the bytes a batch-1 decode step must read over the step time (GB/s) beside the memory floor:
  those bytes over the measured memory bandwidth (`bench.timing.memory_bandwidth`). A step reads
  every weight once, except an untied model's embedding table, of which it reads one row (a tied
  table is read whole, as the LM head), and the sequence's K/V at its mean decode context.
nanoserve's decode runs once per engine mode of `--modes`: `graphs` (CUDA graphs on CUDA, with
async scheduling; on CPU the recorded step replayed over static buffers), `sync` (graphs with
`--no-async-scheduling`: each step read back before the next is scheduled) and `eager`
(`--enforce-eager`), one engine per mode for all batch sizes. Greedy decoding, EOS ignored, so
every side generates exactly the same number of tokens. Every phase runs on a thread of its own
(see `bench.timing.on_own_thread`). With `--rounds N` the decode comparison (HF, then each mode)
runs N times in a row and each figure is its median over the rounds: on a machine whose speed
drifts (a shared VM), a side measured minutes after the other would otherwise gain or lose by it.
"""

import argparse
import asyncio
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from bench.report import comma_ints, run_and_report
from bench.timing import median_seconds, memory_bandwidth, on_own_thread
from nanoserve_kernels import set_backend
from model.batch import SequenceStep, make_batch
from model.config import parse_config
from model.demo import DEMO_CONFIG, demo_checkpoint, hf_config
from model.load import check_kernel_plugins, load_model, resolve_device
from model.qwen3 import Qwen3Model
from model.tokenizer import Tokenizer
from model.weights import load_state_dict
from server.engine.async_engine import AsyncEngine
from server.engine.config import EngineConfig
from server.engine.piecewise_graph import PiecewiseGraphRunner, TokenInputs
from server.engine.request import GenerationRequest, SamplingParams

SHAPES = {
    "demo": DEMO_CONFIG,
    "qwen3-0.6b": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, tie_word_embeddings=True),
    "qwen3-8b": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, tie_word_embeddings=False),
}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def build_models(args: argparse.Namespace, device: torch.device, dtype: torch.dtype):
    """(HF model, nanoserve model, tokenizer directory) holding the same weights."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    if args.model:
        ours = load_model(args.model, device.type, args.dtype)
        hf = Qwen3ForCausalLM.from_pretrained(args.model, dtype=ours.dtype).to(device).eval()
        return hf, ours, Path(args.model)
    raw = hf_config(SHAPES[args.shape] | {"dtype": args.dtype})
    hf_kwargs = {k: v for k, v in raw.items() if k not in ("architectures", "dtype")}
    torch.manual_seed(0)
    with torch.device(device):
        hf = Qwen3ForCausalLM._from_config(Qwen3Config(**hf_kwargs), dtype=dtype).eval()
    config = parse_config(raw)
    check_kernel_plugins(config, device, dtype, 16)
    ours = Qwen3Model(config, dtype, device)
    load_state_dict(ours, hf.state_dict())
    return hf, ours, demo_checkpoint()  # random shapes share the demo's (real Qwen3) tokenizer


def hf_generate_time(hf, prompts: torch.Tensor, new_tokens: int, repeats: int, device) -> float:
    def run():
        hf.generate(prompts, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                    eos_token_id=None, pad_token_id=0)

    with torch.inference_mode():
        return median_seconds(run, repeats, device)


def hf_prefill_time(hf, prompt: torch.Tensor, repeats: int, device) -> float:
    with torch.inference_mode():
        return median_seconds(lambda: hf(prompt, logits_to_keep=1), repeats, device)


def ours_prefill_time(ours: Qwen3Model, prompt: list[int], repeats: int, device) -> float:
    block_size = 16
    blocks = list(range(-(-len(prompt) // block_size)))
    cache = ours.allocate_kv_cache(len(blocks), block_size)
    batch = make_batch([SequenceStep(prompt, 0, blocks)], block_size, device)
    return median_seconds(lambda: ours.forward(batch, cache), repeats, device)


def ours_pieces_prefill_time(ours: Qwen3Model, prompt: list[int], repeats: int, device) -> float:
    """The same prefill through a piecewise runner with one bucket, the prompt's length."""
    block_size, tokens = 16, len(prompt)
    blocks = list(range(-(-tokens // block_size)))
    cache = ours.allocate_kv_cache(len(blocks), block_size)
    inputs = TokenInputs(*(torch.zeros(tokens, dtype=torch.int64, device=device) for _ in range(3)))
    runner = PiecewiseGraphRunner(ours, cache, inputs, [tokens])
    runner.capture()  # fills the inputs with padding: the prompt goes in after
    batch = make_batch([SequenceStep(prompt, 0, blocks)], block_size, device)
    inputs.token_ids.copy_(batch.token_ids)
    inputs.positions.copy_(batch.positions)
    inputs.slot_mapping.copy_(batch.slot_mapping)
    batch = replace(batch, token_ids=inputs.token_ids, positions=inputs.positions, slot_mapping=inputs.slot_mapping)
    return median_seconds(lambda: runner.forward(batch, tokens), repeats, device)


# Engine modes: their EngineConfig settings. `graphs` is the server's default (async scheduling on
# CUDA); `sync` is graphs with every step read back before the next is scheduled.
MODES = {"graphs": {"enforce_eager": False}, "sync": {"enforce_eager": False, "async_scheduling": False},
         "eager": {"enforce_eager": True}}


def decode_step_bytes(model: Qwen3Model, batch: int, context: int) -> int:
    """Bytes a decode step of `batch` sequences of `context` tokens reads at the least: every
    weight once, but of an embedding table that is not also the LM head (untied, or tied with a
    held copy of it as the head, see `model.cpu_plan`) one row per sequence, and every K/V. Weights
    count in the model's dtype: a layout the CPU plan holds them in (fp32 copies) reads more, and
    that is the plan's cost, not the floor's."""
    c, itemsize = model.config, model.dtype.itemsize
    # A shared table counts once; int8 weights (--quantization) at their byte.
    read = sum(p.numel() * (1 if p.dtype == torch.int8 else itemsize) for p in model.parameters())
    if model.lm_head is not model.embed_tokens:
        read -= (c.vocab_size - batch) * c.hidden_size * itemsize
    return read + batch * context * c.num_layers * 2 * c.kv_size * itemsize


async def _engine_decode(engine: AsyncEngine, prompts: list[list[int]], new_tokens: int) -> float:
    """Seconds from the last request's first token to the last request's end (decode only)."""
    first_token_at: list[float] = []
    finished_at: list[float] = []

    async def one(i: int, prompt: list[int]) -> None:
        params = SamplingParams(temperature=0.0, max_tokens=new_tokens + 1, ignore_eos=True)
        seen = 0
        async for output in engine.generate(GenerationRequest(f"bench-{time.monotonic_ns()}-{i}", prompt, params)):
            if seen == 0:
                first_token_at.append(time.perf_counter())
            seen += sum(len(c.token_ids) for c in output.choices)
        finished_at.append(time.perf_counter())

    await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
    return max(finished_at) - max(first_token_at)


def ours_decode_times(ours: Qwen3Model, tokenizer_dir: Path, config: EngineConfig, prompts: list[list[int]],
                      batches: list[int], new_tokens: int, repeats: int) -> dict[int, float]:
    """Per batch size, the median decode time of one engine (its graphs captured once), shut down
    afterwards so that its loop thread ends."""
    engine = AsyncEngine(ours, Tokenizer(tokenizer_dir), tokenizer_dir, config)
    print(f"  {engine.decode_mode}", file=sys.stderr)
    times = {}
    try:
        for batch in batches:
            asyncio.run(_engine_decode(engine, prompts[:batch], new_tokens))  # warm-up
            runs = [asyncio.run(_engine_decode(engine, prompts[:batch], new_tokens)) for _ in range(repeats)]
            times[batch] = statistics.median(runs)
    finally:
        engine.shutdown()
    return times


def decode_round(args: argparse.Namespace, hf, ours: Qwen3Model, tokenizer_dir: Path, config: EngineConfig,
                 prompts: torch.Tensor, device: torch.device) -> dict[int, dict[str, float]]:
    """Decode tokens/s per batch size and side: HF's batched `generate`, then one engine per mode."""
    decode: dict[int, dict[str, float]] = {batch: {} for batch in args.batches}
    for batch in args.batches:
        print(f"HF decode at batch {batch} ...", file=sys.stderr)
        hf_prompts = prompts[:batch].to(device)
        hf_first = on_own_thread(hf_generate_time, hf, hf_prompts, 1, args.repeats, device)
        hf_all = on_own_thread(hf_generate_time, hf, hf_prompts, args.decode_tokens + 1, args.repeats, device)
        decode[batch]["hf"] = batch * args.decode_tokens / (hf_all - hf_first)
    for mode in args.modes:
        print(f"nanoserve decode, {mode} ...", file=sys.stderr)
        mode_config = replace(config, **MODES[mode])
        times = ours_decode_times(ours, tokenizer_dir, mode_config, prompts.tolist(), args.batches,
                                  args.decode_tokens, args.repeats)
        for batch, seconds in times.items():
            decode[batch][mode] = batch * args.decode_tokens / seconds
    for batch, rates in decode.items():
        print(f"  batch {batch}: " + ", ".join(f"{mode}/HF {rates[mode] / rates['hf']:.2f}x" for mode in args.modes),
              file=sys.stderr)
    return decode


def run(args: argparse.Namespace) -> dict:
    device = resolve_device(args.device)
    dtype = DTYPES[args.dtype]
    torch.manual_seed(args.seed)
    print(f"building {args.model or args.shape} ({args.dtype}) on {device} ...", file=sys.stderr)
    hf, ours, tokenizer_dir = on_own_thread(build_models, args, device, dtype)
    vocab = ours.config.vocab_size
    weight_bytes = sum(p.numel() * p.element_size() for p in ours.parameters())
    max_batch = max(args.batches)
    block_size = 16
    blocks_per_seq = -(-(args.prompt_len + args.decode_tokens + 2) // block_size)
    if device.type == "cpu":  # as the server does at load: its CPU op choices, timed here
        plan = on_own_thread(ours.plan_cpu_ops, max_batch, blocks_per_seq * block_size, args.quantization)
        print(plan.describe(), file=sys.stderr)
    prompts = torch.randint(0, min(vocab, 151643), (max_batch, args.prompt_len))
    result: dict = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "shape": args.model or args.shape,
        "dtype": args.dtype + (f" ({args.quantization} for nanoserve)" if args.quantization else ""),
        "weight_bytes": weight_bytes,
        "memory_bandwidth_GBps": on_own_thread(memory_bandwidth, device) / 1e9,
        "prompt_len": args.prompt_len,
        "decode_tokens": args.decode_tokens,
        "cpu_plan": ours.cpu_plan.describe() if ours.cpu_plan else None,
        "modes": args.modes,
    }

    print("prefill ...", file=sys.stderr)
    one_prompt = prompts[:1].to(device)
    result["prefill_tok_s"] = {
        "hf": args.prompt_len / on_own_thread(hf_prefill_time, hf, one_prompt, args.repeats, device),
        "nanoserve": args.prompt_len / on_own_thread(ours_prefill_time, ours, prompts[0].tolist(), args.repeats, device),
        "pieces": args.prompt_len / on_own_thread(ours_pieces_prefill_time, ours, prompts[0].tolist(), args.repeats,
                                                  device),
    }

    config = EngineConfig(block_size=block_size, num_kv_blocks=blocks_per_seq * max_batch + 1,
                          max_num_seqs=max_batch, max_num_batched_tokens=max(2048, max_batch * args.prompt_len))
    rounds: list[dict[int, dict[str, float]]] = []
    for round_index in range(args.rounds):  # HF, then each mode: one round; rounds alternate the sides
        if args.rounds > 1:
            print(f"round {round_index + 1} of {args.rounds}", file=sys.stderr)
        rounds.append(decode_round(args, hf, ours, tokenizer_dir, config, prompts, device))
    decode = {batch: {side: statistics.median(r[batch][side] for r in rounds) for side in rounds[0][batch]}
              for batch in args.batches}
    if args.rounds > 1:  # each round's ratio is a paired comparison: drift between rounds cancels in it
        result["decode_tok_s_rounds"] = rounds
        result["decode_ratio_median"] = {
            batch: {mode: statistics.median(r[batch][mode] / r[batch]["hf"] for r in rounds) for mode in args.modes}
            for batch in args.batches}
    result["decode_tok_s"] = decode
    step_s = {side: 1.0 / tok_s for side, tok_s in decode.get(1, {}).items()}
    result["ms_per_decode_step_batch1"] = {side: s * 1e3 for side, s in step_s.items()}
    # A batch-1 step's floor: the bytes it must read, at its mean context, over the bandwidth.
    step_bytes = decode_step_bytes(ours, 1, args.prompt_len + args.decode_tokens // 2)
    floor_s = step_bytes / (result["memory_bandwidth_GBps"] * 1e9)
    result["step_read_bytes_batch1"] = step_bytes
    result["floor_ms_batch1"] = floor_s * 1e3
    result["read_GBps_batch1"] = {side: step_bytes / s / 1e9 for side, s in step_s.items()}
    result["pct_of_floor_batch1"] = {side: 100 * floor_s / s for side, s in step_s.items()}
    return result


def print_table(r: dict) -> None:
    print(f"\n{r['shape']} {r['dtype']} on {r['device']}: weights {r['weight_bytes'] / 1e9:.2f} GB, "
          f"memory bandwidth {r['memory_bandwidth_GBps']:.1f} GB/s")
    print(f"a batch-1 decode step reads {r['step_read_bytes_batch1'] / 1e9:.2f} GB: floor {r['floor_ms_batch1']:.2f} ms")
    modes = r["modes"]
    print(f"{'metric':<34} {'HF':>10}" + "".join(f" {mode:>10}" for mode in modes)
          + "".join(f" {mode + '/HF':>10}" for mode in modes))

    def row(name: str, values: dict, fmt: str = "{:.1f}", higher_is_better: bool = True) -> None:
        cells = [values.get(side) for side in modes]
        ratios = [(v / values["hf"] if higher_is_better else values["hf"] / v) if v else None for v in cells]
        print(f"{name:<34} {fmt.format(values['hf']):>10}"
              + "".join(f" {fmt.format(v) if v else '-':>10}" for v in cells)
              + "".join(f" {format(x, '.2f') + 'x' if x else '-':>10}" for x in ratios))

    prefill, label = r["prefill_tok_s"], f"prefill tok/s ({r['prompt_len']} tokens)"
    print(f"{label:<34} {prefill['hf']:>10.1f} {prefill['nanoserve']:>10.1f} "
          f"(one eager forward: {prefill['nanoserve'] / prefill['hf']:.2f}x)")
    if "pieces" in prefill:
        print(f"{'  with pieces replayed':<34} {'':>10} {prefill['pieces']:>10.1f} "
              f"({prefill['pieces'] / prefill['nanoserve']:.2f}x the eager forward)")
    for batch, values in r["decode_tok_s"].items():
        row(f"decode tok/s, batch {batch}", values)
    if "decode_ratio_median" in r:  # with --rounds: each round's own ratio, HF measured beside it
        print(f"decode figures: medians over {len(r['decode_tok_s_rounds'])} rounds; each round's own ratio:")
        for batch, ratios in r["decode_ratio_median"].items():
            for mode, median in ratios.items():
                each = " ".join(f"{rd[batch][mode] / rd[batch]['hf']:.2f}" for rd in r["decode_tok_s_rounds"])
                print(f"  {mode}/HF, batch {batch}: {each} (median {median:.2f}x)")
    if r["ms_per_decode_step_batch1"]:
        row("ms per decode step, batch 1", r["ms_per_decode_step_batch1"], "{:.2f}", higher_is_better=False)
        row("read GB/s, batch 1", r["read_GBps_batch1"])
        row("% of memory floor, batch 1", r["pct_of_floor_batch1"])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", default=None, help="Qwen3 checkpoint directory (default: random weights, --shape)")
    src.add_argument("--shape", choices=sorted(SHAPES), default="qwen3-0.6b", help="random weights of this shape (default %(default)s)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="default %(default)s")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16", help="default %(default)s")
    p.add_argument("--quantization", choices=["int8"], default=None,
                   help="(CPU) nanoserve's matmul weights in int8, as the CLI's --quantization; HF stays in --dtype")
    p.add_argument("--prompt-len", type=int, default=128, help="prompt tokens (default %(default)s)")
    p.add_argument("--decode-tokens", type=int, default=32, help="decode steps timed (default %(default)s)")
    p.add_argument("--batches", default="1,8,32", help="comma-separated decode batch sizes (default %(default)s)")
    p.add_argument("--modes", default="graphs,eager",
                   help="comma-separated nanoserve engine modes: graphs, sync (graphs, --no-async-scheduling), "
                   "eager (--enforce-eager) (default %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per figure; medians (default %(default)s)")
    p.add_argument("--rounds", type=int, default=1,
                   help="decode comparisons run one after another, each HF then nanoserve; figures are the medians "
                   "over rounds, so that a machine whose speed drifts favours neither side (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="prompt seed (default %(default)s)")
    p.add_argument("--kernels", default="auto", metavar="SPEC",
                   help="kernel spec as `nanoserve --kernels` takes it, plug-ins included (default %(default)s)")
    p.add_argument("--out", default="bench/out/generate.json", help="JSON output (default %(default)s)")
    args = p.parse_args(argv)
    try:
        set_backend(args.kernels)
    except (ValueError, RuntimeError) as err:
        p.error(f"--kernels: {err}")
    args.batches = comma_ints(p, "--batches", args.batches)
    args.modes = args.modes.split(",")
    if not args.modes or set(args.modes) - set(MODES) or len(set(args.modes)) < len(args.modes):
        p.error(f"--modes must name some of {', '.join(MODES)}, each once, got {','.join(args.modes)!r}")
    if min(args.batches) < 1 or min(args.prompt_len, args.decode_tokens, args.repeats, args.rounds) < 1:
        p.error("--batches, --prompt-len, --decode-tokens, --repeats and --rounds must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    return run_and_report("bench.generate", parse_args(argv), run, print_table)


if __name__ == "__main__":
    sys.exit(main())
