"""Which implementation an op runs: the Triton kernel or its torch reference.

`auto` runs Triton on CUDA tensors and the torch reference on CPU tensors. `triton` forces the
Triton kernels everywhere; on CPU tensors that only works through the Triton interpreter, which
reads `TRITON_INTERPRET=1` when the kernel modules are imported, so the variable is set here,
before any of them is. `torch` forces the references (useful to A/B a kernel on a GPU).
Without the triton package (it is Linux-only) every op runs its reference.
"""

import os

import torch

BACKENDS = ("auto", "triton", "torch")

_backend = os.environ.get("NANOSERVE_KERNELS", "auto")
if _backend not in BACKENDS:
    raise ValueError(f"NANOSERVE_KERNELS={_backend!r}: expected one of {', '.join(BACKENDS)}")
if _backend == "triton" and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kernels._triton import HAVE_TRITON  # noqa: E402  (imports triton: after TRITON_INTERPRET is set)


def set_backend(name: str) -> None:
    """Select the kernel backend for the whole process (`auto`, `triton` or `torch`)."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}: expected one of {', '.join(BACKENDS)}")
    if name == "triton" and not HAVE_TRITON:
        raise RuntimeError("--kernels triton needs the triton package (Linux only); it is not installed")
    if name == "triton" and not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            "--kernels triton without CUDA needs the Triton interpreter, which must be enabled before "
            "the kernels are imported: set NANOSERVE_KERNELS=triton or TRITON_INTERPRET=1 in the environment"
        )
    _backend = name


def get_backend() -> str:
    return _backend


def use_triton(t: torch.Tensor) -> bool:
    """True when the op on tensor `t` should run the Triton kernel."""
    if _backend == "torch" or not HAVE_TRITON:
        return False
    return _backend == "triton" or t.is_cuda
