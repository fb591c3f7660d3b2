"""Each Triton kernel vs its torch reference (eager, and torch.compile'd) at Qwen3-8B shapes, on a GPU.

    python -m bench.kernels [--out bench/out/kernels.json] [--dtype bfloat16] [--no-compile] [--only 'KERNEL SHAPE' ...]
    python -m bench.kernels --sweep [--out bench/out/kernels-sweep.json]

Qwen3-8B: hidden 4096, 32 query heads over 8 kv heads, head_dim 128. RMSNorm (plain, fused
residual add, per-head q norm), RoPE, store_kv and the fused attention front-end run over 4096
tokens; paged decode attention over batches 1-256 and contexts 512-32k (block size 16, shuffled
block tables), each case that fits in the GPU's free memory; paged prefill attention over one
fresh prompt of 512-8192 tokens.

Rows per case: `triton` (the public op, called eagerly: at small sizes the host's launch cost
shows), `triton graph` for decode attention (the same call captured once in a CUDA graph and
replayed, as the engine's decode runs: the GPU's time alone), `torch eager` (the torch
reference) and `torch.compile` of it; `triton unfused` for the front-end (the four Triton ops
it replaces: q norm, k norm, RoPE, store_kv); `sdpa flash` for prefill attention (torch's
flash backend on the contiguous prompt, K/V expanded to the query heads beforehand).

Every time is the median of `triton.testing.do_bench`. Bandwidth is the bytes a perfect kernel
must move (read once, write once) over that time, and is given as a share of the copy bandwidth
measured first on the same GPU (a 1 GiB device-to-device copy: bytes read + written per second);
prefill attention, bound by compute, reports TFLOP/s (causal: 2 * L^2 * D * Hq multiply-adds x 2).

`--sweep` times the launch configurations each launcher could take (rows or tokens per program,
warps; decode attention's split count) replayed from CUDA graphs, checks each against the
heuristic's output, and prints which wins: the measurement that picks the heuristics written
beside the launchers. Without CUDA it says so and exits with status 2 (`python -m nanoserve_kernels.report`
needs no GPU).

`--kernels op=module:function[,...]` benches kernel plug-ins (see README, "Bring your own
kernel"): first a correctness column, the plug-in and the built-in Triton kernel each against the
torch reference on the load-time check's inputs (`nanoserve_kernels.plugins`); then, on a GPU, every case of
each plug-in's op gets a `plug-in` row beside the built-in's (and `plug-in graph` where the
built-in is timed from a CUDA graph). On CPU only the correctness column is printed, the built-in
through the Triton interpreter (set TRITON_INTERPRET=1, or NANOSERVE_KERNELS=triton).
"""

import argparse
import json
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

import nanoserve_kernels
from bench.timing import memory_bandwidth
from nanoserve_kernels._triton import Launch, interpreting
from nanoserve_kernels.backend import PLUGINS, import_plugin, parse_backend
from nanoserve_kernels.plugins import PluginCheckFailed, check_plugin
from nanoserve_kernels.attention_frontend import attention_frontend_launch, attention_frontend_reference
from nanoserve_kernels.decode_attention import choose_num_splits, paged_decode_attention_launches, paged_decode_attention_reference
from nanoserve_kernels.prefill_attention import paged_prefill_attention_reference
from nanoserve_kernels.rms_norm import fused_add_rms_norm_reference, rms_norm_launch, rms_norm_reference
from nanoserve_kernels.rope import apply_rope_launch, apply_rope_reference, build_cos_sin_cache
from nanoserve_kernels.store_kv import store_kv_launch, store_kv_reference

HIDDEN, Q_HEADS, KV_HEADS, HEAD_DIM, TOKENS, BLOCK_SIZE, MAX_MODEL_LEN = 4096, 32, 8, 128, 4096, 16, 40960
DEVICE = "cuda"  # the CPU test of this module's logic runs it on the interpreter at small shapes
BATCHES = (1, 8, 64, 256)
CONTEXTS = (512, 2048, 8192, 32768)
PROMPTS = (512, 2048, 8192)
DECODE_SWEEP = ((1, 512), (1, 32768), (8, 2048), (8, 32768))  # (batch, context) whose split count is swept
EPS = 1e-6
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Case:
    kernel: str
    shape: str
    bytes: int  # what a perfect kernel reads and writes once
    triton: Callable[[], object]
    others: dict[str, Callable[[], object]] = field(default_factory=dict)  # other implementations, by row name
    compile: Callable[[], object] | None = None  # the torch reference that --no-compile skips compiling
    flops: int = 0  # set for compute-bound kernels: rows report TFLOP/s
    graph: bool = False  # also time the Triton call replayed from a CUDA graph


def _reference(fn: Callable[[], object]) -> dict:
    return dict(others={"torch eager": fn}, compile=fn)


def row_cases(dtype: torch.dtype) -> Iterator[Case]:
    """RMSNorm, fused add + RMSNorm, per-head q norm, RoPE and store_kv over TOKENS tokens."""
    x, residual = _randn(TOKENS, HIDDEN, dtype=dtype), _randn(TOKENS, HIDDEN, dtype=dtype)
    weight, head_weight = _randn(HIDDEN, dtype=dtype), _randn(HEAD_DIM, dtype=dtype)
    size = x.numel() * x.element_size()
    shape = f"{TOKENS}x{HIDDEN}"
    yield Case("rms_norm", shape, 2 * size, lambda: nanoserve_kernels.rms_norm(x, weight, EPS),
               **_reference(lambda: rms_norm_reference(x, weight, EPS)))
    yield Case("fused_add_rms_norm", shape, 4 * size, lambda: nanoserve_kernels.fused_add_rms_norm(x, residual, weight, EPS),
               **_reference(lambda: fused_add_rms_norm_reference(x, residual, weight, EPS)))
    qkv = _randn(TOKENS, (Q_HEADS + 2 * KV_HEADS) * HEAD_DIM, dtype=dtype)
    q_view = qkv[:, : Q_HEADS * HEAD_DIM].view(TOKENS, Q_HEADS, HEAD_DIM)  # as the model normed it before fusing
    q_bytes = q_view.numel() * q_view.element_size()
    yield Case("rms_norm (q heads)", f"{TOKENS}x{Q_HEADS}x{HEAD_DIM}", 2 * q_bytes,
               lambda: nanoserve_kernels.rms_norm(q_view, head_weight, EPS),
               **_reference(lambda: rms_norm_reference(q_view, head_weight, EPS)))
    q, k = q_view.contiguous(), _randn(TOKENS, KV_HEADS, HEAD_DIM, dtype=dtype)
    positions = torch.randint(0, MAX_MODEL_LEN, (TOKENS,), device=DEVICE)
    cos_sin = build_cos_sin_cache(MAX_MODEL_LEN, HEAD_DIM, 1e6, DEVICE)
    kv_bytes = k.numel() * k.element_size()
    yield Case("apply_rope", f"{TOKENS}x({Q_HEADS}+{KV_HEADS})x{HEAD_DIM}", 2 * (q_bytes + kv_bytes) + TOKENS * HEAD_DIM * 4,
               lambda: nanoserve_kernels.apply_rope(q, k, positions, cos_sin),
               **_reference(lambda: apply_rope_reference(q, k, positions, cos_sin)))
    v = qkv[:, (Q_HEADS + KV_HEADS) * HEAD_DIM :].view(TOKENS, KV_HEADS, HEAD_DIM)  # strided, as the model passes it
    k_cache = torch.empty(2 * TOKENS // BLOCK_SIZE, BLOCK_SIZE, KV_HEADS, HEAD_DIM, dtype=dtype, device=DEVICE)
    v_cache = torch.empty_like(k_cache)
    slots = torch.randperm(2 * TOKENS, device=DEVICE)[:TOKENS]
    yield Case("store_kv", f"{TOKENS}x{KV_HEADS}x{HEAD_DIM}", 4 * kv_bytes + TOKENS * 8,
               lambda: nanoserve_kernels.store_kv(k, v, k_cache, v_cache, slots),
               **_reference(lambda: store_kv_reference(k, v, k_cache, v_cache, slots)))
    yield frontend_case(qkv, head_weight, positions, cos_sin, k_cache, v_cache, slots)


def frontend_case(qkv, head_weight, positions, cos_sin, k_cache, v_cache, slots) -> Case:
    """The fused front-end vs the four Triton launches it replaces and the torch references."""
    args = (qkv, head_weight, head_weight, EPS, positions, cos_sin, k_cache, v_cache, slots)
    element = qkv.element_size()
    tokens = qkv.shape[0]
    moved = (qkv.numel() + tokens * (Q_HEADS + 2 * KV_HEADS) * HEAD_DIM) * element + tokens * (16 + HEAD_DIM * 4)

    def unfused():
        q, k, v = qkv.split([Q_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM], dim=-1)
        q = nanoserve_kernels.rms_norm(q.view(tokens, Q_HEADS, HEAD_DIM), head_weight, EPS)
        k = nanoserve_kernels.rms_norm(k.view(tokens, KV_HEADS, HEAD_DIM), head_weight, EPS)
        nanoserve_kernels.apply_rope(q, k, positions, cos_sin)
        nanoserve_kernels.store_kv(k, v.view(tokens, KV_HEADS, HEAD_DIM), k_cache, v_cache, slots)

    reference = lambda: attention_frontend_reference(*args)  # noqa: E731
    return Case("attention_frontend", f"{tokens}x({Q_HEADS}+2x{KV_HEADS})x{HEAD_DIM}", moved,
                lambda: nanoserve_kernels.attention_frontend(*args),
                others={"triton unfused": unfused, "torch eager": reference}, compile=reference)


def decode_case(dtype: torch.dtype, batch: int, context: int) -> Case | None:
    """Decode attention for `batch` sequences of `context` tokens; None if the cache does not fit."""
    blocks_per_seq = -(-context // BLOCK_SIZE)
    element = torch.tensor([], dtype=dtype).element_size()
    cache_bytes = 2 * batch * context * KV_HEADS * HEAD_DIM * element  # K and V
    # The reference gathers every sequence's K and V and upcasts them: about 2.5x the cache again.
    if not _fits(1.1 * cache_bytes):
        return None
    k_cache = _randn(batch * blocks_per_seq, BLOCK_SIZE, KV_HEADS, HEAD_DIM, dtype=dtype)
    v_cache = _randn(batch * blocks_per_seq, BLOCK_SIZE, KV_HEADS, HEAD_DIM, dtype=dtype)
    tables = torch.randperm(batch * blocks_per_seq, device=DEVICE).view(batch, blocks_per_seq).int()
    lens = torch.full((batch,), context, dtype=torch.int32, device=DEVICE)
    q = _randn(batch, Q_HEADS, HEAD_DIM, dtype=dtype)
    scale = HEAD_DIM**-0.5
    moved = cache_bytes + 2 * q.numel() * element + tables.numel() * 4
    fits_reference = _fits(2.5 * cache_bytes)
    reference = lambda: paged_decode_attention_reference(q, k_cache, v_cache, tables, lens, scale)  # noqa: E731
    return Case("paged_decode_attention", f"B={batch} L={context}", moved,
                lambda: nanoserve_kernels.paged_decode_attention(q, k_cache, v_cache, tables, lens, scale),
                **(_reference(reference) if fits_reference else {}), graph=True)


def prefill_case(dtype: torch.dtype, length: int) -> Case:
    """Prefill attention over one fresh prompt of `length` tokens, its K/V in a shuffled paged cache."""
    blocks = -(-length // BLOCK_SIZE)
    q = _randn(length, Q_HEADS, HEAD_DIM, dtype=dtype)
    k, v = _randn(length, KV_HEADS, HEAD_DIM, dtype=dtype), _randn(length, KV_HEADS, HEAD_DIM, dtype=dtype)
    k_cache = torch.empty(blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM, dtype=dtype, device=DEVICE)
    v_cache = torch.empty_like(k_cache)
    tables = torch.randperm(blocks, device=DEVICE, dtype=torch.int32)[None]
    slots = (tables[0].long()[:, None] * BLOCK_SIZE + torch.arange(BLOCK_SIZE, device=DEVICE)).flatten()[:length]
    store_kv_reference(k, v, k_cache, v_cache, slots)
    starts = torch.tensor([0, length], dtype=torch.int32, device=DEVICE)
    lens = torch.tensor([length], dtype=torch.int32, device=DEVICE)
    scale = HEAD_DIM**-0.5
    group = Q_HEADS // KV_HEADS
    q4 = q.transpose(0, 1)[None].contiguous()
    k4, v4 = (t.repeat_interleave(group, dim=1).transpose(0, 1)[None].contiguous() for t in (k, v))

    def sdpa_flash():
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q4, k4, v4, is_causal=True, scale=scale)

    paged = (k_cache, v_cache, tables, starts, lens, length, scale)
    moved = (2 * q.numel() + 2 * k.numel()) * q.element_size()
    return Case("paged_prefill_attention", f"L={length}", moved,
                lambda: nanoserve_kernels.paged_prefill_attention(q, None, None, *paged),
                others={"sdpa flash": sdpa_flash,
                        "torch eager": lambda: paged_prefill_attention_reference(q, k, v, *paged)},
                flops=2 * 2 * length * length * HEAD_DIM * Q_HEADS // 2)


def _fits(nbytes: float) -> bool:
    return nbytes < 0.8 * torch.cuda.mem_get_info()[0]


def _randn(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(*shape, device=DEVICE).to(dtype)


def graphed(fn: Callable[[], object]) -> Callable[[], None]:
    """`fn`'s launches captured once in a CUDA graph; calling the result replays them."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # compiles the kernels outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def measure(case: Case, copy_gbps: float, compile_reference: bool) -> list[dict]:
    """One row per implementation, the Triton kernel first."""
    import triton.testing

    # Each implementation as a maker of the function to time (capturing or compiling comes first).
    makers = {"triton": lambda: case.triton}
    if case.graph:
        makers["triton graph"] = lambda: graphed(case.triton)
    makers.update({impl: (lambda fn=fn: fn) for impl, fn in case.others.items()})
    if compile_reference and case.compile is not None:
        makers["torch.compile"] = lambda: _compiled(case.compile)
    rows = []
    for impl, make in makers.items():
        try:
            ms = triton.testing.do_bench(make(), return_mode="median")
        except Exception as err:  # torch.compile does not take every reference; say why and go on
            rows.append(dict(kernel=case.kernel, shape=case.shape, impl=impl, error=f"{type(err).__name__}: {err}"[:200]))
            continue
        row = dict(kernel=case.kernel, shape=case.shape, impl=impl, ms=ms)
        if case.flops:
            row["tflops"] = case.flops / ms / 1e9
        else:
            row["gbps"] = case.bytes / ms / 1e6
            row["pct_copy"] = 100 * row["gbps"] / copy_gbps
        rows.append(row)
    triton_ms = rows[0].get("ms")
    for row in rows[1:]:
        if triton_ms and "ms" in row:
            row["triton_speedup"] = row["ms"] / triton_ms
    return rows


def _compiled(fn: Callable[[], object]) -> Callable[[], object]:
    torch.compiler.reset()  # a fresh compile per case: dynamo's recompile limit would fall back to eager
    return torch.compile(fn)


def format_row(row: dict) -> str:
    head = f"{row['kernel']:<24} {row['shape']:<26} {row['impl']:<14}"
    if "error" in row:
        return f"{head} failed: {row['error']}"
    speedup = f"  triton speedup {row['triton_speedup']:.2f}x" if "triton_speedup" in row else ""
    if "tflops" in row:
        return f"{head} {row['ms'] * 1e3:>10.1f} us {row['tflops']:>8.1f} TFLOP/s{speedup}"
    return f"{head} {row['ms'] * 1e3:>10.1f} us {row['gbps']:>8.0f} GB/s {row['pct_copy']:>5.1f}% of copy{speedup}"


def _cases(dtype: torch.dtype, only: set[str] | None = None) -> Iterator[Case | str]:
    """The cases in order, or for a decode case whose cache does not fit, a line saying so; with
    `only`, just the cases named there as "kernel shape" (the attention caches are built only then)."""
    def wanted(kernel: str, shape: str) -> bool:
        return only is None or f"{kernel} {shape}" in only

    yield from (case for case in row_cases(dtype) if wanted(case.kernel, case.shape))
    for batch in BATCHES:
        for context in CONTEXTS:
            if not wanted("paged_decode_attention", f"B={batch} L={context}"):
                continue
            case = decode_case(dtype, batch, context)
            yield case or f"{'paged_decode_attention':<24} B={batch} L={context}: skipped, the cache does not fit"
            del case
    for length in PROMPTS:
        if wanted("paged_prefill_attention", f"L={length}"):
            yield prefill_case(dtype, length)


# --sweep: the launch configurations each launcher could take, timed against each other.


@dataclass
class Sweep:
    kernel: str
    shape: str
    bytes: int
    candidates: dict[str, Launch | list[Launch]]  # configuration label -> launch(es); the heuristic's first
    outputs: Callable[[], list[torch.Tensor]]  # what a launch writes, to check every candidate against
    reset: Callable[[], None] = lambda: None  # restores the inputs of an in-place kernel


def sweeps(dtype: torch.dtype) -> Iterator[Sweep]:
    x, residual = _randn(TOKENS, HIDDEN, dtype=dtype), _randn(TOKENS, HIDDEN, dtype=dtype)
    weight, head_weight = _randn(HIDDEN, dtype=dtype), _randn(HEAD_DIM, dtype=dtype)
    out, residual_out = torch.empty_like(x), torch.empty_like(x)
    size = x.numel() * x.element_size()
    configs = [(rows, warps) for rows in (1, 2, 4) for warps in (4, 8, 16)]
    yield Sweep("rms_norm", f"{TOKENS}x{HIDDEN}", 2 * size, _with_heuristic(
        rms_norm_launch(x, None, weight, EPS, out, None),
        {f"rows={r} warps={w}": rms_norm_launch(x, None, weight, EPS, out, None, r, w) for r, w in configs}),
        lambda: [out])
    yield Sweep("fused_add_rms_norm", f"{TOKENS}x{HIDDEN}", 4 * size, _with_heuristic(
        rms_norm_launch(x, residual, weight, EPS, out, residual_out),
        {f"rows={r} warps={w}": rms_norm_launch(x, residual, weight, EPS, out, residual_out, r, w) for r, w in configs}),
        lambda: [out, residual_out])
    qkv = _randn(TOKENS, (Q_HEADS + 2 * KV_HEADS) * HEAD_DIM, dtype=dtype)
    q_view = qkv[:, : Q_HEADS * HEAD_DIM].view(TOKENS, Q_HEADS, HEAD_DIM)
    q_out = torch.empty(TOKENS, Q_HEADS, HEAD_DIM, dtype=dtype, device=DEVICE)
    q_bytes = q_out.numel() * q_out.element_size()
    yield Sweep("rms_norm (q heads)", f"{TOKENS}x{Q_HEADS}x{HEAD_DIM}", 2 * q_bytes, _with_heuristic(
        rms_norm_launch(q_view, None, head_weight, EPS, q_out, None),
        {f"rows={r} warps={w}": rms_norm_launch(q_view, None, head_weight, EPS, q_out, None, r, w)
         for r in (4, 8, 16, 32, 64) for w in (1, 2, 4, 8)}), lambda: [q_out])
    yield from _token_sweeps(dtype, qkv, head_weight)
    yield from _decode_sweeps(dtype)


def _token_sweeps(dtype: torch.dtype, qkv: torch.Tensor, head_weight: torch.Tensor) -> Iterator[Sweep]:
    """RoPE, store_kv and the front-end: tokens per program and warps."""
    q0, k0 = qkv[:, : Q_HEADS * HEAD_DIM].reshape(TOKENS, Q_HEADS, HEAD_DIM), _randn(TOKENS, KV_HEADS, HEAD_DIM, dtype=dtype)
    q, k = q0.clone(), k0.clone()
    positions = torch.randint(0, MAX_MODEL_LEN, (TOKENS,), device=DEVICE)
    cos_sin = build_cos_sin_cache(MAX_MODEL_LEN, HEAD_DIM, 1e6, DEVICE)
    configs = [(tokens, warps) for tokens in (1, 2, 4, 8) for warps in (1, 2, 4, 8)]
    rope_bytes = 2 * (q.numel() + k.numel()) * q.element_size() + TOKENS * HEAD_DIM * 4
    yield Sweep("apply_rope", f"{TOKENS}x({Q_HEADS}+{KV_HEADS})x{HEAD_DIM}", rope_bytes, _with_heuristic(
        apply_rope_launch(q, k, positions, cos_sin),
        {f"tokens={t} warps={w}": apply_rope_launch(q, k, positions, cos_sin, t, w) for t, w in configs}),
        lambda: [q, k], reset=lambda: (q.copy_(q0), k.copy_(k0)))
    v = qkv[:, (Q_HEADS + KV_HEADS) * HEAD_DIM :].view(TOKENS, KV_HEADS, HEAD_DIM)
    k_cache = torch.zeros(2 * TOKENS // BLOCK_SIZE, BLOCK_SIZE, KV_HEADS, HEAD_DIM, dtype=dtype, device=DEVICE)
    v_cache = torch.zeros_like(k_cache)
    slots = torch.randperm(2 * TOKENS, device=DEVICE)[:TOKENS]
    kv_bytes = k.numel() * k.element_size()
    yield Sweep("store_kv", f"{TOKENS}x{KV_HEADS}x{HEAD_DIM}", 4 * kv_bytes + TOKENS * 8, _with_heuristic(
        store_kv_launch(k0, v, k_cache, v_cache, slots),
        {f"tokens={t} warps={w}": store_kv_launch(k0, v, k_cache, v_cache, slots, t, w) for t, w in configs}),
        lambda: [k_cache, v_cache])
    q_out = torch.empty(TOKENS, Q_HEADS, HEAD_DIM, dtype=dtype, device=DEVICE)
    args = (qkv, head_weight, head_weight, EPS, positions, cos_sin, k_cache, v_cache, slots, q_out)
    moved = (qkv.numel() + TOKENS * (Q_HEADS + 2 * KV_HEADS) * HEAD_DIM) * qkv.element_size() + TOKENS * (16 + HEAD_DIM * 4)
    launch = attention_frontend_launch(*args)
    candidates = {}
    for warps in (1, 2, 4, 8):  # the front-end launcher takes no overrides: the sweep sets the warps
        candidates[f"warps={warps}"] = Launch(launch.kernel, launch.grid, launch.args, num_warps=warps)
    yield Sweep("attention_frontend", f"{TOKENS}x({Q_HEADS}+2x{KV_HEADS})x{HEAD_DIM}", moved,
                _with_heuristic(launch, candidates), lambda: [q_out, k_cache, v_cache])


def _decode_sweeps(dtype: torch.dtype) -> Iterator[Sweep]:
    """Decode attention's split count at the small batches it is chosen for, tables at full width."""
    sm_count = torch.cuda.get_device_properties(0).multi_processor_count if DEVICE == "cuda" else 8
    width = MAX_MODEL_LEN // BLOCK_SIZE
    for batch, context in DECODE_SWEEP:
        blocks_per_seq = -(-context // BLOCK_SIZE)
        k_cache = _randn(batch * blocks_per_seq, BLOCK_SIZE, KV_HEADS, HEAD_DIM, dtype=dtype)
        v_cache = _randn(*k_cache.shape, dtype=dtype)
        tables = torch.zeros(batch, width, dtype=torch.int32, device=DEVICE)  # full width, as a CUDA graph has them
        tables[:, :blocks_per_seq] = torch.randperm(k_cache.shape[0], device=DEVICE).view(batch, -1).int()
        lens = torch.full((batch,), context, dtype=torch.int32, device=DEVICE)
        q, out = _randn(batch, Q_HEADS, HEAD_DIM, dtype=dtype), torch.empty(batch, Q_HEADS, HEAD_DIM, dtype=dtype, device=DEVICE)
        inputs = (q, k_cache, v_cache, tables, lens, HEAD_DIM**-0.5, out)
        chosen = choose_num_splits(batch, KV_HEADS, HEAD_DIM, MAX_MODEL_LEN, sm_count)
        candidates = {f"splits={n}": paged_decode_attention_launches(*inputs, n) for n in (1, 4, 8, 16, 33, 66, 128)}
        moved = 2 * batch * context * KV_HEADS * HEAD_DIM * q.element_size()
        yield Sweep("paged_decode_attention", f"B={batch} L={context}", moved,
                    _with_heuristic(paged_decode_attention_launches(*inputs, chosen), candidates), lambda out=out: [out])


def _with_heuristic(heuristic: Launch, candidates: dict[str, Launch]) -> dict[str, Launch]:
    return {"heuristic": heuristic, **candidates}


def run_sweep(sweep: Sweep, copy_gbps: float) -> list[dict]:
    """Times every candidate from a CUDA graph; a candidate whose output differs from the
    heuristic's (beyond bf16 rounding: warps and splits change the order of sums) is reported, not timed."""
    import triton.testing

    def call(launches) -> Callable[[], None]:
        launches = launches if isinstance(launches, list) else [launches]
        return lambda: [launch() for launch in launches]

    def run_once(launches) -> list[torch.Tensor]:
        for t in sweep.outputs():
            t.fill_(float("nan"))  # so that a candidate that writes nothing cannot pass
        sweep.reset()
        call(launches)()
        return [t.float() for t in sweep.outputs()]

    expected = run_once(sweep.candidates["heuristic"])
    rows = []
    for label, launches in sweep.candidates.items():
        row = dict(kernel=sweep.kernel, shape=sweep.shape, config=label)
        try:
            for got, want in zip(run_once(launches), expected):
                torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2, equal_nan=True)
            ms = triton.testing.do_bench(graphed(call(launches)), return_mode="median")
        except Exception as err:  # a configuration that does not compile, or computes something else
            rows.append(row | dict(error=f"{type(err).__name__}: {err}"[:200]))
            continue
        gbps = sweep.bytes / ms / 1e6
        rows.append(row | dict(ms=ms, gbps=gbps, pct_copy=100 * gbps / copy_gbps))
    timed = [r for r in rows if "ms" in r]
    best = min(timed, key=lambda r: r["ms"]) if timed else None
    for r in rows:
        r["best"] = r is best
    return rows


def format_sweep_row(row: dict) -> str:
    head = f"{row['kernel']:<24} {row['shape']:<26} {row['config']:<18}"
    if "error" in row:
        return f"{head} failed: {row['error']}"
    return (f"{head} {row['ms'] * 1e3:>9.1f} us {row['gbps']:>7.0f} GB/s {row['pct_copy']:>5.1f}% of copy"
            + ("  <- fastest" if row["best"] else ""))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None,
                        help="JSON output (default bench/out/kernels.json, with --sweep bench/out/kernels-sweep.json)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16", help="default %(default)s")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile of the references")
    parser.add_argument("--only", action="append", default=None, metavar="'KERNEL SHAPE'",
                        help="run only this case (repeatable), e.g. 'paged_decode_attention B=1 L=512'")
    parser.add_argument("--sweep", action="store_true",
                        help="time each launcher's candidate configurations instead, and print the fastest")
    parser.add_argument("--kernels", default=None, metavar="OP=MODULE:FUNCTION[,...]",
                        help="bench these plug-ins beside the built-in kernels (on CPU: their correctness only)")
    args = parser.parse_args(argv)
    if args.kernels:
        return bench_plugins(args.kernels, DTYPES[args.dtype], args.out or "bench/out/kernels-plugins.json",
                             not args.no_compile)
    if not torch.cuda.is_available():
        print("bench.kernels needs a CUDA GPU: none is visible to torch. (On CPU the kernels run "
              "through the Triton interpreter, which says nothing about speed; `python -m nanoserve_kernels.report` "
              "shows what they compile to for sm_90/sm_80 without a GPU.)", file=sys.stderr)
        return 2
    nanoserve_kernels.set_backend("triton")
    dtype = DTYPES[args.dtype]
    copy_gbps = memory_bandwidth(torch.device(DEVICE)) / 1e9
    device = torch.cuda.get_device_name()
    print(f"{device}: device-to-device copy {copy_gbps:.0f} GB/s; {args.dtype}; medians of triton.testing.do_bench")
    rows = []
    out = Path(args.out or ("bench/out/kernels-sweep.json" if args.sweep else "bench/out/kernels.json"))
    out.parent.mkdir(parents=True, exist_ok=True)

    def write() -> None:  # after every case: a run stopped mid-way keeps the figures it has
        out.write_text(json.dumps(dict(device=device, dtype=args.dtype, copy_gbps=copy_gbps, rows=rows), indent=1) + "\n")

    if args.sweep:
        for sweep in sweeps(dtype):
            for row in run_sweep(sweep, copy_gbps):
                print(format_sweep_row(row), flush=True)
                rows.append(row)
            write()
            del sweep
            torch.cuda.empty_cache()
    else:
        for case in _cases(dtype, set(args.only) if args.only else None):
            if isinstance(case, str):
                print(case, flush=True)
                continue
            for row in measure(case, copy_gbps, not args.no_compile):
                print(format_row(row), flush=True)
                rows.append(row)
            write()
            del case  # the decode caches are large: free each before the next is built
            torch.cuda.empty_cache()
    write()
    print(f"wrote {out}")
    return 0


# --kernels: plug-ins beside the built-in kernels.

# Case names (`Case.kernel`) by the op that runs them.
OP_CASES = {"rms_norm": ("rms_norm", "fused_add_rms_norm", "rms_norm (q heads)"), "rope": ("apply_rope",),
            "store_kv": ("store_kv",), "attention_frontend": ("attention_frontend",),
            "decode_attention": ("paged_decode_attention",), "prefill_attention": ("paged_prefill_attention",)}
BUILTINS = {"rms_norm": "nanoserve_kernels.rms_norm:rms_norm", "rope": "nanoserve_kernels.rope:apply_rope",
            "store_kv": "nanoserve_kernels.store_kv:store_kv", "attention_frontend": "nanoserve_kernels.attention_frontend:attention_frontend",
            "decode_attention": "nanoserve_kernels.decode_attention:paged_decode_attention",
            "prefill_attention": "nanoserve_kernels.prefill_attention:paged_prefill_attention",
            "token_bitmask": "nanoserve_kernels.token_bitmask:apply_token_bitmask_"}


def correctness_rows(plugins: dict[str, tuple[str, Callable]], device: torch.device, dtype: torch.dtype) -> list[dict]:
    """Per plug-in op: the plug-in and the built-in Triton kernel against the torch reference."""
    from nanoserve_kernels.plugins import HeadLayout

    layout = HeadLayout(HIDDEN, Q_HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE)
    rows = []
    for op, (target, function) in sorted(plugins.items()):
        candidates = [("plug-in", target, function)]
        if device.type == "cuda" or interpreting():
            candidates.append(("triton", BUILTINS[op], import_plugin(op, BUILTINS[op])))
        for impl, name, fn in candidates:
            row = dict(kernel=op, impl=impl, target=name)
            try:
                row["max_abs_diff"] = check_plugin(op, name, fn, device, dtype, layout).max_abs_diff
            except PluginCheckFailed as err:
                row["error"] = str(err)
            rows.append(row)
    return rows


def format_correctness_row(row: dict) -> str:
    head = f"{row['kernel']:<20} {row['impl']:<8} {row['target']:<48}"
    if "error" in row:
        return f"{head} WRONG: {row['error']}"
    return f"{head} ok, max |Δ| {row['max_abs_diff']:.2e} vs the torch reference"


def _with_plugin(op: str, function: Callable, call: Callable[[], object]) -> Callable[[], object]:
    """`call` (a case's call of the public op) with `function` plugged in for `op` while it runs."""
    def run():
        PLUGINS[op] = function
        try:
            return call()
        finally:
            del PLUGINS[op]
    return run


def bench_plugins(spec: str, dtype: torch.dtype, out: str, compile_reference: bool) -> int:
    _, overrides = parse_backend(spec)
    targets = {op: target for op, target in overrides.items() if ":" in target}
    if not targets:
        print(f"bench.kernels: --kernels {spec!r} names no plug-in (OP=MODULE:FUNCTION)", file=sys.stderr)
        return 2
    plugins = {op: (target, import_plugin(op, target)) for op, target in targets.items()}
    device = torch.device(DEVICE if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" or interpreting():
        nanoserve_kernels.set_backend("triton")  # the built-ins' rows: their Triton kernels (on CPU, interpreted)
    rows = correctness_rows(plugins, device, dtype)
    print(f"{device.type}, {str(dtype).removeprefix('torch.')}: each implementation against the torch reference")
    for row in rows:
        print(format_correctness_row(row))
    if device.type == "cuda":
        copy_gbps = memory_bandwidth(device) / 1e9
        print(f"{torch.cuda.get_device_name()}: device-to-device copy {copy_gbps:.0f} GB/s; medians of triton.testing.do_bench")
        for case in _cases(dtype):
            op = next((op for op, names in OP_CASES.items() if not isinstance(case, str) and case.kernel in names), None)
            if op not in plugins:
                continue
            plugged = _with_plugin(op, plugins[op][1], case.triton)
            graph = {"plug-in graph": graphed(plugged)} if case.graph else {}
            case.others = {"plug-in": plugged, **graph, **case.others}
            for row in measure(case, copy_gbps, compile_reference):
                print(format_row(row), flush=True)
                rows.append(row)
            del case
            torch.cuda.empty_cache()
    else:
        print("(no CUDA: correctness only; speed needs a GPU)")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(dict(device=device.type, dtype=str(dtype), kernels=spec, rows=rows), indent=1) + "\n")
    print(f"wrote {out}")
    return 1 if any("error" in row for row in rows if row.get("impl") == "plug-in") else 0


if __name__ == "__main__":
    sys.exit(main())
