"""Which implementation each op runs: the Triton kernel, its torch reference, or a plug-in.

A backend spec is a default backend and optional per-op overrides, comma-separated:
`triton,decode_attention=torch` runs decode attention on its torch reference and every other op
on Triton. Backends: `auto` runs Triton on CUDA tensors and the torch reference on CPU tensors;
`triton` forces the Triton kernels everywhere (on CPU tensors only through the Triton
interpreter); `torch` forces the references (to A/B a kernel on a GPU). An override may also name
a plug-in, `op=module:function` (or `op=path/to/file.py:function`): that function then runs the
op (see `nanoserve_kernels.plugins` for its contract and load-time check, `nanoserve_kernels.ops` for the dispatch).
Ops are named after their modules (`OPS`). The spec comes from `NANOSERVE_KERNELS` (default
`auto`) or `set_backend`. The interpreter is read when the kernel modules are imported, so when
the environment's spec runs any op on Triton without CUDA, `TRITON_INTERPRET=1` is set here,
before any of them is. Without the triton package (it is Linux-only) every op runs its reference.
"""

import importlib
import importlib.util
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch

BACKENDS = ("auto", "triton", "torch")
# Ops by kernel module: `rms_norm` covers rms_norm and fused_add_rms_norm, `rope` apply_rope.
OPS = ("attention_frontend", "decode_attention", "prefill_attention", "rms_norm", "rope", "store_kv", "token_bitmask")
# The plug-ins in force, by op. `nanoserve_kernels.ops` reads this very dict on every call: it is changed in
# place, never rebound.
PLUGINS: dict[str, Callable] = {}


def parse_backend(spec: str) -> tuple[str, dict[str, str]]:
    """(default backend, {op: backend or 'module:function'}) of a spec such as `triton,decode_attention=torch`."""
    default, overrides = None, {}
    for part in (p.strip() for p in spec.split(",")):
        op, _, backend = part.rpartition("=")
        plugin = _is_plugin_target(backend)
        if plugin and "=" not in part:
            raise ValueError(f"{spec!r}: a plug-in needs the op it implements: OP={backend} (ops: {', '.join(OPS)})")
        if backend not in BACKENDS and not plugin:
            raise ValueError(f"{spec!r}: unknown kernel backend {backend!r} "
                             f"(expected {', '.join(BACKENDS)}, or OP=MODULE:FUNCTION for a plug-in)")
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


def _is_plugin_target(backend: str) -> bool:
    module, colon, function = backend.rpartition(":")
    return bool(colon and module and function)


def _builtin_overrides(overrides: dict[str, str]) -> dict[str, str]:
    return {op: backend for op, backend in overrides.items() if backend in BACKENDS}


_default, _overrides = parse_backend(os.environ.get("NANOSERVE_KERNELS", "auto"))
_plugin_targets = {op: target for op, target in _overrides.items() if target not in BACKENDS}
_overrides = _builtin_overrides(_overrides)
if "triton" in (_default, *_overrides.values()) and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from nanoserve_kernels._triton import HAVE_TRITON  # noqa: E402  (imports triton: after TRITON_INTERPRET is set)


def import_plugin(op: str, target: str) -> Callable:
    """The function that `target` (`module:function` or `file.py:function`) names, or ValueError saying
    what is missing. Modules are found as `python -m` finds them: the current directory first."""
    where, _, name = target.rpartition(":")
    label = f"plug-in {op}={target}"
    try:
        if where.endswith(".py"):
            path = Path(where)
            if not path.is_file():
                raise ValueError(f"{label}: no such file {where}")
            spec = importlib.util.spec_from_file_location(f"nanoserve_plugin_{op}", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            if os.getcwd() not in sys.path and "" not in sys.path:
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(where)
    except ModuleNotFoundError as err:
        raise ValueError(f"{label}: cannot import {where}: {err}") from None
    except ValueError:
        raise
    except Exception as err:  # the plug-in's own module failed while it was imported
        raise ValueError(f"{label}: importing {where} failed: {type(err).__name__}: {err}") from None
    function = getattr(module, name, None)
    if function is None:
        raise ValueError(f"{label}: {where} has no function {name!r}")
    if not callable(function):
        raise ValueError(f"{label}: {where}.{name} is a {type(function).__name__}, not a function")
    return function


def set_backend(spec: str) -> None:
    """Select the kernel backends for the whole process (a spec, as in the module docstring).
    Plug-ins are imported here; `nanoserve_kernels.plugins.check_plugins` checks them before a model runs them."""
    global _default, _overrides, _plugin_targets
    default, overrides = parse_backend(spec)
    builtin = _builtin_overrides(overrides)
    if "triton" in (default, *builtin.values()):
        if not HAVE_TRITON:
            raise RuntimeError("--kernels triton needs the triton package (Linux only); it is not installed")
        if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(
                "--kernels triton without CUDA needs the Triton interpreter, which must be enabled before "
                "the kernels are imported: set NANOSERVE_KERNELS=triton or TRITON_INTERPRET=1 in the environment"
            )
    targets = {op: target for op, target in overrides.items() if target not in BACKENDS}
    functions = {op: import_plugin(op, target) for op, target in targets.items()}
    _default, _overrides, _plugin_targets = default, builtin, targets
    PLUGINS.clear()
    PLUGINS.update(functions)


def load_environment_plugins() -> None:
    """Imports the plug-ins that `NANOSERVE_KERNELS` names (run once `nanoserve_kernels` is whole, so that a
    plug-in module may itself import `nanoserve_kernels`)."""
    if _plugin_targets and not PLUGINS:
        set_backend(get_backend())


def get_backend() -> str:
    """The spec in force, default first, then the overrides by op name."""
    overrides = _overrides | _plugin_targets
    return ",".join([_default, *(f"{op}={backend}" for op, backend in sorted(overrides.items()))])


def plugin_targets() -> dict[str, str]:
    """{op: 'module:function'} of the plug-ins in force."""
    return dict(_plugin_targets)


def overridden(op: str) -> bool:
    """True when the spec names a built-in backend for `op` itself (`op=triton`, `op=torch`)."""
    return op in _overrides


def use_triton(t: torch.Tensor, op: str) -> bool:
    """True when the built-in `op` (one of OPS) on tensor `t` should run the Triton kernel. An op
    that a plug-in runs follows the default backend here (a plug-in may call the built-in)."""
    backend = _overrides.get(op, _default)
    if backend == "torch" or not HAVE_TRITON:
        return False
    return backend == "triton" or t.is_cuda
