"""Which implementation each op runs: the Triton kernel or its torch reference.

A backend spec is a default backend and optional per-op overrides, comma-separated:
`triton,decode_attention=torch` runs decode attention on its torch reference and every other op
on Triton. Backends: `auto` runs Triton on CUDA tensors and the torch reference on CPU tensors;
`triton` forces the Triton kernels everywhere (on CPU tensors only through the Triton
interpreter); `torch` forces the references (to A/B a kernel on a GPU). Ops are named after
their modules (`OPS`). The spec comes from `NANOSERVE_KERNELS` (default `auto`) or
`set_backend`. The interpreter is read when the kernel modules are imported, so when the
environment's spec runs any op on Triton without CUDA, `TRITON_INTERPRET=1` is set here, before
any of them is. Without the triton package (it is Linux-only) every op runs its reference.
"""

import os

import torch

BACKENDS = ("auto", "triton", "torch")
# Ops by kernel module: `rms_norm` covers rms_norm and fused_add_rms_norm, `rope` apply_rope.
OPS = ("attention_frontend", "decode_attention", "prefill_attention", "rms_norm", "rope", "store_kv", "token_bitmask")


def parse_backend(spec: str) -> tuple[str, dict[str, str]]:
    """(default backend, {op: backend}) of a spec such as `triton,decode_attention=torch`."""
    default, overrides = None, {}
    for part in (p.strip() for p in spec.split(",")):
        op, _, backend = part.rpartition("=")
        if backend not in BACKENDS:
            raise ValueError(f"{spec!r}: unknown kernel backend {backend!r} (expected {', '.join(BACKENDS)})")
        if not op and "=" not in part:
            if default is not None:
                raise ValueError(f"{spec!r}: two default backends ({default!r} and {backend!r})")
            default = backend
        elif op not in OPS:
            raise ValueError(f"{spec!r}: unknown op {op!r} (ops: {', '.join(OPS)})")
        elif op in overrides:
            raise ValueError(f"{spec!r}: op {op!r} given twice")
        else:
            overrides[op] = backend
    return default or "auto", overrides


_default, _overrides = parse_backend(os.environ.get("NANOSERVE_KERNELS", "auto"))
if "triton" in (_default, *_overrides.values()) and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kernels._triton import HAVE_TRITON  # noqa: E402  (imports triton: after TRITON_INTERPRET is set)


def set_backend(spec: str) -> None:
    """Select the kernel backends for the whole process (a spec, as in the module docstring)."""
    global _default, _overrides
    default, overrides = parse_backend(spec)
    if "triton" in (default, *overrides.values()):
        if not HAVE_TRITON:
            raise RuntimeError("--kernels triton needs the triton package (Linux only); it is not installed")
        if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(
                "--kernels triton without CUDA needs the Triton interpreter, which must be enabled before "
                "the kernels are imported: set NANOSERVE_KERNELS=triton or TRITON_INTERPRET=1 in the environment"
            )
    _default, _overrides = default, overrides


def get_backend() -> str:
    """The spec in force, default first, then the overrides by op name."""
    return ",".join([_default, *(f"{op}={backend}" for op, backend in sorted(_overrides.items()))])


def use_triton(t: torch.Tensor, op: str) -> bool:
    """True when `op` (one of OPS) on tensor `t` should run the Triton kernel."""
    backend = _overrides.get(op, _default)
    if backend == "torch" or not HAVE_TRITON:
        return False
    return backend == "triton" or t.is_cuda
