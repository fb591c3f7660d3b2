"""No blocking host-to-device copy in the code a step runs: read the step path's modules and fail
on every call that would make the host wait for a copy (or for the device) on CUDA.

What counts: `.to(<device>)` or `.cuda()` without `non_blocking=True`; `torch.tensor(..., device=...)`
(a copy from pageable memory); and a non-blocking `.to` straight off a fresh `torch.tensor(...)`,
whose memory is pageable, so the driver stages it while the host waits. Host data reaches the
device through `model.batch.to_device` (pinned memory) or the runner's pinned double buffers.
A `.to(<dtype>)` is a cast, not a copy, and passes.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
STEP_PATH = ["model/batch.py", "model/qwen3.py", "server/engine/model_runner.py", "server/engine/cuda_graph.py",
             "server/engine/sampler.py", "server/engine/structured.py", "server/engine/scheduler.py",
             "server/engine/core.py", "server/engine/speculative.py", "server/engine/proposers.py",
             "server/engine/draft_model.py"]
DTYPES = {"bool", "int8", "uint8", "int16", "int32", "int64", "float16", "bfloat16", "float32", "float64", "float",
          "long", "int", "half"}


def _is_dtype(node: ast.expr) -> bool:
    return isinstance(node, ast.Attribute) and node.attr in DTYPES and ast.unparse(node.value) == "torch"


def _is_torch_tensor(node: ast.expr) -> bool:
    return isinstance(node, ast.Call) and ast.unparse(node.func) in ("torch.tensor", "torch.as_tensor")


def _non_blocking(call: ast.Call) -> bool:
    return any(k.arg == "non_blocking" and isinstance(k.value, ast.Constant) and k.value.value is True
               for k in call.keywords)


def blocking_copies(source: str) -> list[tuple[int, str]]:
    """(line, call) of every host-to-device copy in `source` that makes the host wait."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if _is_torch_tensor(node) and any(k.arg == "device" for k in node.keywords):
            found.append((node.lineno, ast.unparse(node)))
        elif isinstance(func, ast.Attribute) and func.attr == "cuda" and not _non_blocking(node):
            found.append((node.lineno, ast.unparse(node)))
        elif isinstance(func, ast.Attribute) and func.attr == "to":
            casts = (node.args and _is_dtype(node.args[0])) or (not node.args and all(k.arg != "device" for k in node.keywords))
            if casts:
                continue
            if not _non_blocking(node) or _is_torch_tensor(func.value):
                found.append((node.lineno, ast.unparse(node)))
    return found


@pytest.mark.parametrize("module", STEP_PATH)
def test_the_step_path_makes_no_blocking_host_copy(module):
    assert blocking_copies((ROOT / module).read_text()) == []


def test_the_check_finds_each_kind_of_blocking_copy():
    source = "\n".join([
        "a = torch.tensor(rows, dtype=torch.int64).to(device)",  # blocking
        "b = torch.tensor(rows, device=x.device)",  # pageable, blocking
        "c = torch.tensor(rows).to(device, non_blocking=True)",  # pageable: staged while the host waits
        "d = ids.cuda()",
        "e = ids.to(torch.int32)",  # a cast
        "f = pinned.to(device, non_blocking=True)",
        "g = x.to(dtype=torch.float32)",  # a cast
        "h = x.to(device=dev)",
        "i = out.to('cpu', non_blocking=True)",
    ])
    assert [line for line, _ in blocking_copies(source)] == [1, 2, 3, 4, 8]
