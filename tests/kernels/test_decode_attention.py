"""The Triton split-KV paged decode attention against its torch reference, and against itself."""

import random

import pytest
import torch

import nanoserve_kernels
from nanoserve_kernels.decode_attention import (
    choose_num_splits,
    paged_decode_attention_launches,
    paged_decode_attention_reference,
)
from tests.kernels.common import DTYPE_IDS, DTYPES, assert_close, kernel_backend, nan_like, randn


def _paged(lens: list[int], kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype, spare: int = 3):
    """Caches holding each sequence's K/V in shuffled blocks, NaN everywhere else, and the tables.

    Rows of the table past a sequence's end point at random blocks (any valid id), whose slots
    hold NaN or another sequence's tokens: a kernel that reads past the end fails.
    """
    needed = [-(-n // block_size) for n in lens]
    pool = sum(needed) + spare
    ids = torch.randperm(pool).tolist()
    k_cache = torch.full((pool, block_size, kv_heads, head_dim), float("nan"), dtype=dtype)
    v_cache = k_cache.clone()
    tables = []
    for n, count in zip(lens, needed):
        blocks, ids = ids[:count], ids[count:]
        for block in blocks:
            k_cache[block], v_cache[block] = (randn(block_size, kv_heads, head_dim, dtype=dtype) for _ in "kv")
        tables.append(blocks + random.choices(range(pool), k=max(needed) - count))
    return k_cache, v_cache, torch.tensor(tables, dtype=torch.int32), torch.tensor(lens, dtype=torch.int32)


def _run(q, k_cache, v_cache, tables, lens, num_splits: int) -> torch.Tensor:
    out = nan_like(q)
    for launch in paged_decode_attention_launches(q, k_cache, v_cache, tables, lens, 0.125, out, num_splits):
        launch()
    return out


def _check(lens, group, kv_heads, head_dim, block_size, dtype, num_splits):
    k_cache, v_cache, tables, context_lens = _paged(lens, kv_heads, head_dim, block_size, dtype)
    q = randn(len(lens), kv_heads * group, head_dim, dtype=dtype)
    out = _run(q, k_cache, v_cache, tables, context_lens, num_splits)
    assert_close(out, paged_decode_attention_reference(q, k_cache, v_cache, tables, context_lens, 0.125))


def _edges(block_size: int) -> list[int]:
    """Contexts of one token, ending exactly on a block boundary, and just past one."""
    return [1, block_size, block_size + 1, 2 * block_size - 1, 3 * block_size]


# (group, kv heads, head_dim, block size, splits): GQA 1/2/4/5/8, head_dim 64/128, blocks 8..128.
CASES = [
    (1, 2, 64, 16, 1),
    (2, 2, 128, 8, 2),
    (4, 2, 128, 16, 3),
    (5, 2, 64, 32, 2),
    (8, 1, 128, 128, 1),
    (8, 2, 64, 8, 4),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "G{}-Hk{}-D{}-bs{}-s{}".format(*c))
def test_decode_attention_matches_reference(case, dtype):
    group, kv_heads, head_dim, block_size, num_splits = case
    _check(_edges(block_size) + [77], group, kv_heads, head_dim, block_size, dtype, num_splits)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_qwen3_14b_heads_40_over_8(dtype):
    _check([3, 130, 64], 5, 8, 128, 16, dtype, num_splits=2)


def test_one_split_equals_many_splits():
    k_cache, v_cache, tables, lens = _paged([1, 200, 700, 513], 2, 64, 16, torch.float32)
    q = randn(4, 8, 64, dtype=torch.float32)
    one = _run(q, k_cache, v_cache, tables, lens, num_splits=1)
    for splits in (3, 11):  # 11: most splits of the short sequences are past their end
        torch.testing.assert_close(_run(q, k_cache, v_cache, tables, lens, splits), one, rtol=1e-6, atol=1e-6)


def test_block_size_16_equals_block_size_1():
    lens = [1, 16, 17, 45]
    k16, v16, tables16, context_lens = _paged(lens, 2, 64, 16, torch.float32)
    # The same tokens, one per block, in a fresh shuffled order.
    slots = [tables16[b, p // 16].item() * 16 + p % 16 for b, n in enumerate(lens) for p in range(n)]
    order = torch.randperm(len(slots))
    k1 = k16.view(-1, 1, 2, 64)[torch.tensor(slots)][order.argsort()]
    v1 = v16.view(-1, 1, 2, 64)[torch.tensor(slots)][order.argsort()]
    starts = [sum(lens[:b]) for b in range(len(lens))]
    width = max(lens)
    tables1 = torch.tensor([[order[s + min(p, n - 1)].item() for p in range(width)] for s, n in zip(starts, lens)])
    q = randn(4, 6 * 2, 64, dtype=torch.float32)
    for splits in (1, 2):
        # Tiles are cut by tokens, not blocks, so the arithmetic is identical to the bit.
        assert torch.equal(
            _run(q, k1, v1, tables1.int(), context_lens, splits),
            _run(q, k16, v16, tables16, context_lens, splits),
        )


def test_cache_over_2_31_elements():
    """Blocks past 2^31 elements: int32 offsets would wrap and read elsewhere."""
    block_size, kv_heads, head_dim = 16, 1, 128
    blocks = 2**31 // (block_size * kv_heads * head_dim) + 8  # 4 GiB each, untouched but for the blocks used
    k_cache = torch.empty(blocks, block_size, kv_heads, head_dim, dtype=torch.bfloat16)
    v_cache = torch.empty_like(k_cache)
    tables = torch.tensor([[blocks - 1, blocks - 7, 3], [blocks - 2, 5, blocks - 3]], dtype=torch.int32)
    for block in tables.flatten().tolist():
        k_cache[block], v_cache[block] = (randn(block_size, kv_heads, head_dim, dtype=torch.bfloat16) for _ in "kv")
    lens = torch.tensor([40, 33], dtype=torch.int32)
    q = randn(2, 4, head_dim, dtype=torch.bfloat16)
    assert_close(_run(q, k_cache, v_cache, tables, lens, 2),
                 paged_decode_attention_reference(q, k_cache, v_cache, tables, lens, 0.125))


def test_public_function_chooses_splits_itself(triton_backend):
    k_cache, v_cache, tables, lens = _paged([1, 600, 1100], 2, 64, 16, torch.float16)
    q = randn(3, 8, 64, dtype=torch.float16)
    out = nanoserve_kernels.paged_decode_attention(q, k_cache, v_cache, tables, lens, 0.125)
    assert_close(out, paged_decode_attention_reference(q, k_cache, v_cache, tables, lens, 0.125))


def test_num_splits_depend_on_static_shapes_and_fill_the_gpu():
    h100 = 132
    # Batch 64 x 8 kv heads already fills 132 SMs: one split, and no merge.
    assert choose_num_splits(batch=64, kv_heads=8, head_dim=128, max_context=40960, sm_count=h100) == 1
    # Small batches split every sequence so that one wave of programs covers the SMs.
    assert choose_num_splits(batch=1, kv_heads=8, head_dim=128, max_context=40960, sm_count=h100) == 66
    assert choose_num_splits(batch=8, kv_heads=8, head_dim=128, max_context=40960, sm_count=h100) == 8
    # Never more splits than the widest table holds tiles (64 tokens at head_dim 128), nor than the cap.
    assert choose_num_splits(batch=1, kv_heads=8, head_dim=128, max_context=300, sm_count=h100) == 5
    assert choose_num_splits(batch=1, kv_heads=1, head_dim=64, max_context=10**6, sm_count=h100) == 128


def _graph_buffers(batch: int, q_heads: int, kv_heads: int, head_dim: int, block_size: int, max_model_len: int,
                   dtype: torch.dtype):
    """Static inputs as a CUDA-graph runner keeps them: tables at full width, room for every row."""
    width = max_model_len // block_size
    k_cache = torch.empty(batch * width + 1, block_size, kv_heads, head_dim, dtype=dtype)
    q = torch.empty(batch, q_heads, head_dim, dtype=dtype)
    tables = torch.zeros(batch, width, dtype=torch.int32)
    return q, k_cache, torch.empty_like(k_cache), tables, torch.ones(batch, dtype=torch.int32)


def _write_step(q, k_cache, v_cache, tables, context_lens, lens: list[int]) -> None:
    """Writes a new step into the static buffers in place: fresh queries, each sequence's K/V in
    shuffled blocks, NaN in every other slot. A length of 1 with an all-zero table row is padding,
    as a graph runner pads a batch up to its bucket."""
    block_size = k_cache.shape[1]
    k_cache.fill_(float("nan")), v_cache.fill_(float("nan"))
    q.copy_(randn(*q.shape, dtype=q.dtype))
    tables.zero_()
    free = torch.randperm(k_cache.shape[0]).tolist()
    for seq, n in enumerate(lens):
        if n == 1 and seq % 2:  # odd rows of one token: padding, block 0 (maybe another row's)
            k_cache[0, 0], v_cache[0, 0] = (randn(*k_cache.shape[2:], dtype=q.dtype) for _ in "kv")
            continue
        count = -(-n // block_size)
        blocks, free = free[:count], free[count:]
        tables[seq, :count] = torch.tensor(blocks, dtype=torch.int32)
        for block in blocks:
            k_cache[block], v_cache[block] = (randn(*k_cache.shape[1:], dtype=q.dtype) for _ in "kv")
    context_lens.copy_(torch.tensor(lens, dtype=torch.int32))


def _static_args(launches) -> list:
    return [(launch.kernel, launch.grid, {k: v for k, v in launch.args.items() if not isinstance(v, torch.Tensor)})
            for launch in launches]


def _replay_and_compare(steps: list[list[int]], max_model_len: int) -> None:
    """One launch configuration, built once, replayed over steps of other context lengths: each
    replay equals a fresh call of the public function (to the bit) and the torch reference."""
    buffers = _graph_buffers(len(steps[0]), 4, 2, 64, 16, max_model_len, torch.float32)
    q, k_cache, v_cache, tables, context_lens = buffers
    out = nan_like(q)
    splits = choose_num_splits(q.shape[0], 2, 64, max_model_len, sm_count=8)
    assert splits > 1  # the merge runs too
    captured = paged_decode_attention_launches(q, k_cache, v_cache, tables, context_lens, 0.125, out, splits)
    for lens in steps:
        _write_step(*buffers, lens)
        out.fill_(float("nan"))
        for launch in captured:
            launch()
        with kernel_backend("triton"):
            fresh = nanoserve_kernels.paged_decode_attention(*buffers, 0.125)
        assert torch.equal(out, fresh), lens
        real = [seq for seq, n in enumerate(lens) if not (n == 1 and seq % 2)]
        want = paged_decode_attention_reference(q[real], k_cache, v_cache, tables[real], context_lens[real], 0.125)
        assert_close(out[real], want)
        assert not out.isnan().any()  # padding rows get an output too (they are sliced off later)


def test_launch_arguments_do_not_depend_on_context_lengths():
    q, k_cache, v_cache, tables, _ = _graph_buffers(3, 8, 2, 128, 16, 4096, torch.bfloat16)
    short, long = torch.tensor([1, 1, 1], dtype=torch.int32), torch.tensor([4096, 17, 2000], dtype=torch.int32)
    splits = choose_num_splits(3, 2, 128, 4096, sm_count=132)
    built = [_static_args(paged_decode_attention_launches(q, k_cache, v_cache, tables, lens, 0.1, q, splits))
             for lens in (short, long)]
    assert built[0] == built[1] and len(built[0]) == 2


def test_fixed_launch_replayed_at_other_context_lengths():
    # Lengths 1 to the full table, on and past tile (128) and block (16) boundaries, padding rows.
    steps = [[4096, 1, 129], [1, 1, 1], [127, 4096, 2048], [3000, 1, 16], [128, 17, 4095]]
    _replay_and_compare(steps, max_model_len=4096)


@pytest.mark.slow
def test_fixed_launch_replayed_up_to_32k():
    steps = [[32768, 1, 5], [1, 1, 32767], [20000, 32768, 1]]
    _replay_and_compare(steps, max_model_len=32768)


@pytest.mark.slow
def test_batch_512():
    lens = [random.randint(1, 40) for _ in range(512)]
    _check(lens, 4, 1, 64, 16, torch.bfloat16, num_splits=1)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_context_of_max_model_len(dtype):
    """Qwen3's 40960 positions, split as an H100 would split one sequence."""
    lens = [40960, 40960 - 17]
    splits = choose_num_splits(len(lens), 1, 128, max(lens), sm_count=132)
    _check(lens, 4, 1, 128, 16, dtype, splits)
