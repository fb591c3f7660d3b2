"""Compile every kernel for a GPU target on any machine, and read what ptxas made of it.

`triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))` needs no GPU. The kernels are
compiled exactly as their launchers would launch them at Qwen3 shapes: each variant is a
`Launch` built by the op's own launcher from meta tensors, and its arguments are specialised
the way `@triton.jit` specialises them at run time (pointers 16-byte aligned, integers divisible
by 16 marked so, integers equal to 1 made constants). The cuobjdump that the triton wheel carries
then reads registers, spills and the SASS from the cubin.

`@triton.jit` builds interpreter functions when TRITON_INTERPRET=1, which cannot be compiled:
run this in a process without it (`python -m nanoserve_kernels.report` re-runs itself so).
"""

import re
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from nanoserve_kernels._triton import Launch
from nanoserve_kernels.attention_frontend import attention_frontend_launch
from nanoserve_kernels.decode_attention import choose_num_splits, paged_decode_attention_launches
from nanoserve_kernels.prefill_attention import paged_prefill_attention_launch
from nanoserve_kernels.rms_norm import rms_norm_launch
from nanoserve_kernels.rope import apply_rope_launch
from nanoserve_kernels.store_kv import store_kv_launch
from nanoserve_kernels.token_bitmask import apply_token_bitmask_launch

# name -> (compute capability, SM count the split heuristic plans for)
TARGETS = {"sm_90": (90, 132), "sm_80": (80, 108)}

# Qwen3-8B: hidden 4096, 32 query heads over 8 kv heads; head_dim 128 (and 64, as in small models).
HIDDEN, Q_HEADS, KV_HEADS, TOKENS, BLOCK_SIZE, MAX_MODEL_LEN = 4096, 32, 8, 4096, 16, 40960
VOCAB, BATCH = 151936, 256  # Qwen3's vocabulary; the CUDA default --max-num-seqs
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
HEAD_DIMS = (64, 128)

_POINTER_TYPES = {
    torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32",
    torch.int32: "*i32", torch.int64: "*i64",
}


@dataclass
class Variant:
    kernel: str  # the op it serves, e.g. "paged_decode_attention (merge)"
    shape: str  # the specialisation, e.g. "bf16 D=128"
    launch: Launch


@dataclass
class Compiled:
    kernel: str
    shape: str
    target: str
    registers: int
    spill_bytes: int  # stack frame + local memory: 0 unless ptxas ran out of registers
    shared_bytes: int  # dynamic shared memory Triton asks for at launch
    loads: int  # global load instructions (LDG, and LDGSTS for cp.async)
    loads_128: int  # of which 128-bit
    stores: int
    stores_128: int


def variants() -> Iterator[Variant]:
    """Every kernel in the specialisations the model and sampler launch (bf16/fp16, head_dim 64/128)."""
    meta = dict(device="meta")
    for dname, dtype in DTYPES.items():
        x = torch.empty(TOKENS, HIDDEN, dtype=dtype, **meta)
        weight = torch.empty(HIDDEN, dtype=dtype, **meta)
        yield Variant("rms_norm", f"{dname} H={HIDDEN}", rms_norm_launch(x, None, weight, 1e-6, x, None))
        yield Variant("fused_add_rms_norm", f"{dname} H={HIDDEN}", rms_norm_launch(x, x, weight, 1e-6, x, x))
        for head_dim in HEAD_DIMS:
            yield from _head_variants(dtype, f"{dname} D={head_dim}", head_dim)
    # The sampler works on fp32 logits whatever the model's dtype: one variant.
    logits = torch.empty(BATCH, VOCAB, dtype=torch.float32, **meta)
    bitmask = torch.empty(BATCH, -(-VOCAB // 32), dtype=torch.int32, **meta)
    rows = torch.empty(BATCH, dtype=torch.int64, **meta)
    yield Variant("apply_token_bitmask", f"fp32 V={VOCAB} B={BATCH}", apply_token_bitmask_launch(logits, bitmask, rows))


def _head_variants(dtype: torch.dtype, shape: str, head_dim: int) -> Iterator[Variant]:
    meta = dict(dtype=dtype, device="meta")
    qkv = torch.empty(TOKENS, (Q_HEADS + 2 * KV_HEADS) * head_dim, **meta)
    q, k, v = (t.unflatten(1, (-1, head_dim)) for t in qkv.split([Q_HEADS * head_dim, *[KV_HEADS * head_dim] * 2], 1))
    weight = torch.empty(head_dim, **meta)
    # The per-head norm on the strided q view of the QKV output; RoPE and store_kv on q and k as
    # the norm returns them (contiguous).
    yield Variant("rms_norm (q/k heads)", shape, rms_norm_launch(q, None, weight, 1e-6, q.contiguous(), None))
    q, k = q.contiguous(), k.contiguous()
    cos_sin = torch.empty(40960, head_dim, dtype=torch.float32, device="meta")
    positions = torch.empty(TOKENS, dtype=torch.int64, device="meta")
    yield Variant("apply_rope", shape, apply_rope_launch(q, k, positions, cos_sin))
    cache = torch.empty(4096, BLOCK_SIZE, KV_HEADS, head_dim, **meta)
    slots = torch.empty(TOKENS, dtype=torch.int64, device="meta")
    yield Variant("store_kv", shape, store_kv_launch(k, v, cache, cache, slots))
    yield Variant("attention_frontend", shape,
                  attention_frontend_launch(qkv, weight, weight, 1e-6, positions, cos_sin, cache, cache, slots, q))
    # Block tables at full width (Qwen3's 40,960 positions), as a CUDA graph passes them. Batch 64
    # fills the GPU with one split, so stage 1 writes the output itself; batch 1 takes many
    # splits: stage 1 writes fp32 partials, stage 2 merges them.
    for batch in (64, 1):
        stage1, *merge = _decode_launches(dtype, head_dim, cache, batch)
        decode_shape = f"{shape} B={batch}"
        yield Variant("paged_decode_attention", decode_shape, stage1)
        yield from (Variant("paged_decode_attention merge", decode_shape, launch) for launch in merge)
    yield Variant("paged_prefill_attention", shape, _prefill_launch(q, cache))
    q_14b = torch.empty(TOKENS, 5 * KV_HEADS, head_dim, **meta)  # Qwen3-14B: GQA groups of 5
    yield Variant("paged_prefill_attention", f"{shape} G=5", _prefill_launch(q_14b, cache))


def _decode_launches(dtype: torch.dtype, head_dim: int, cache: torch.Tensor, batch: int) -> list[Launch]:
    q = torch.empty(batch, Q_HEADS, head_dim, dtype=dtype, device="meta")
    tables = torch.empty(batch, MAX_MODEL_LEN // BLOCK_SIZE, dtype=torch.int32, device="meta")
    lens = torch.empty(batch, dtype=torch.int32, device="meta")
    splits = choose_num_splits(batch, KV_HEADS, head_dim, MAX_MODEL_LEN, TARGETS["sm_90"][1])
    return paged_decode_attention_launches(q, cache, cache, tables, lens, head_dim**-0.5, q, splits)


def _prefill_launch(q: torch.Tensor, cache: torch.Tensor) -> Launch:
    """Two prompts of TOKENS / 2 new tokens each, over cached prefixes (tables at full width)."""
    meta = dict(dtype=torch.int32, device="meta")
    tables = torch.empty(2, MAX_MODEL_LEN // BLOCK_SIZE, **meta)
    starts, lens = torch.empty(3, **meta), torch.empty(2, **meta)
    return paged_prefill_attention_launch(q, cache, cache, tables, starts, lens, TOKENS // 2, q.shape[-1] ** -0.5, q)


def _specialise(value) -> tuple[str, bool]:
    """(Triton type, divisible by 16) of one runtime argument, as @triton.jit would see it."""
    if isinstance(value, torch.Tensor):
        return _POINTER_TYPES[value.dtype], True  # torch allocations are 256-byte aligned
    if isinstance(value, float):
        return "fp32", False
    return ("i32" if -(2**31) <= value < 2**31 else "i64"), value % 16 == 0


def source(launch: Launch) -> ASTSource:
    """The ASTSource that @triton.jit would build for this launch (one format, Triton 3.6-3.9)."""
    fn = launch.kernel
    signature, constexprs, attrs = {}, {}, {}
    for index, param in enumerate(fn.params):
        value = launch.args[param.name]
        if param.is_constexpr or (type(value) is int and value == 1 and not param.do_not_specialize):
            signature[param.name], constexprs[param.name] = "constexpr", value
            continue
        signature[param.name], divisible = _specialise(value)
        unspecialised = param.do_not_specialize_on_alignment if isinstance(value, torch.Tensor) else param.do_not_specialize
        if divisible and not unspecialised:
            attrs[(index,)] = [["tt.divisibility", 16]]
    return ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)


def compile_variant(variant: Variant, target: str) -> Compiled:
    capability = TARGETS[target][0]
    options = dict(num_warps=variant.launch.num_warps, num_stages=variant.launch.num_stages)
    compiled = triton.compile(source(variant.launch), target=GPUTarget("cuda", capability, 32), options=options)
    usage, sass = _read_cubin(compiled.asm["cubin"])
    registers = int(re.search(r"REG:(\d+)", usage).group(1))
    spill = int(re.search(r"STACK:(\d+)", usage).group(1)) + int(re.search(r"LOCAL:(\d+)", usage).group(1))
    loads, stores = _global_accesses(sass, ("LDG", "LDGSTS")), _global_accesses(sass, ("STG",))
    return Compiled(variant.kernel, variant.shape, target, registers, spill, compiled.metadata.shared,
                    len(loads), loads.count(True), len(stores), stores.count(True))


def _read_cubin(cubin: bytes) -> tuple[str, str]:
    tool = triton.knobs.nvidia.cuobjdump.path
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True, check=True)
        sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True, check=True)
    return usage.stdout, sass.stdout


def _global_accesses(sass: str, opcodes: tuple[str, ...]) -> list[bool]:
    """One entry per global memory instruction with one of `opcodes`: is it 128-bit wide?"""
    widths = []
    for match in re.finditer(r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)", sass, re.MULTILINE):
        parts = match.group(1).split(".")
        if parts[0] in opcodes:
            widths.append("128" in parts[1:])
    return widths
