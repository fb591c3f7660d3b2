"""Everything that needs a GPU, in one command, with one summary table at the end.

    python -m bench.gpu [--out-dir bench/out] [--skip-tests]

1. the test suite on CUDA (kernel and model tests then run the compiled Triton kernels);
2. `bench.kernels`: each kernel vs its eager and compiled torch reference at Qwen3-8B shapes;
3. `bench.generate --shape qwen3-8b --device cuda`: nanoserve vs transformers `generate()` on the
   same random Qwen3-8B-shaped bf16 weights (batch-1 step time against the weight-read floor,
   batched decode at 1/8/32).
The summary holds the figures the performance targets name; the full tables and JSON files are
above it and in `--out-dir`. Without CUDA it says so and exits with status 2.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

from bench import generate, kernels

# The kernel-bench rows that the targets name.
TARGET_ROWS = (
    ("rms_norm", "4096x4096"),
    ("fused_add_rms_norm", "4096x4096"),
    ("apply_rope", "4096x(32+8)x128"),
    ("store_kv", "4096x8x128"),
    ("paged_decode_attention", "B=64 L=2048"),
    ("paged_decode_attention", "B=1 L=32768"),
)


def run_tests() -> str:
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"],
                            capture_output=True, text=True)
    print(result.stdout[-3000:], result.stderr[-2000:], sep="\n")
    lines = result.stdout.strip().splitlines()
    return lines[-1] if lines else f"pytest exited with {result.returncode}"


def kernel_summary(path: Path) -> list[str]:
    report = json.loads(path.read_text())
    lines = []
    for kernel, shape in TARGET_ROWS:
        rows = [r for r in report["rows"] if r["kernel"] == kernel and r["shape"] == shape and "ms" in r]
        triton = next((r for r in rows if r["impl"] == "triton"), None)
        eager = next((r for r in rows if r["impl"] == "torch eager"), None)
        if triton is None:
            lines.append(f"{kernel:<24} {shape:<16} not measured")
            continue
        speedup = f"{eager['ms'] / triton['ms']:.1f}x eager" if eager else "eager: -"
        lines.append(f"{kernel:<24} {shape:<16} {triton['ms'] * 1e3:9.1f} us {triton['pct_copy']:6.1f}% of copy  {speedup}")
    return lines


def generate_summary(path: Path) -> list[str]:
    r = json.loads(path.read_text())
    ms = r["ms_per_decode_step_batch1"]
    lines = [
        f"{r['shape']} {r['dtype']}, batch 1: {ms['nanoserve']:.2f} ms/step (HF {ms['hf']:.2f}: "
        f"{ms['hf'] / ms['nanoserve']:.2f}x), floor {r['weight_read_floor_ms']:.2f} ms "
        f"= {r['pct_of_floor_batch1']['nanoserve']:.0f}% of copy bandwidth",
    ]
    for batch, tok_s in r["decode_tok_s"].items():
        lines.append(f"decode batch {batch:>3}: {tok_s['nanoserve']:8.1f} tok/s vs HF {tok_s['hf']:8.1f} "
                     f"({tok_s['nanoserve'] / tok_s['hf']:.2f}x)")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", default="bench/out", help="where the JSON files go (default %(default)s)")
    parser.add_argument("--skip-tests", action="store_true", help="do not run the test suite first")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench.gpu needs a CUDA GPU: none is visible to torch.", file=sys.stderr)
        return 2
    out = Path(args.out_dir)
    kernels_json, generate_json = out / "kernels.json", out / "generate-qwen3-8b.json"
    tests = "skipped" if args.skip_tests else run_tests()
    kernels_rc = kernels.main(["--out", str(kernels_json)])
    generate_rc = generate.main(["--shape", "qwen3-8b", "--device", "cuda", "--dtype", "bfloat16",
                                 "--batches", "1,8,32", "--prompt-len", "512", "--out", str(generate_json)])
    print(f"\n==== summary: {torch.cuda.get_device_name()} ====")
    print(f"tests: {tests}")
    for ok, path, summarize in ((kernels_rc == 0, kernels_json, kernel_summary),
                                (generate_rc == 0, generate_json, generate_summary)):
        print(*(summarize(path) if ok else [f"{path.name}: the benchmark failed (see above)"]), sep="\n")
    return 0 if kernels_rc == generate_rc == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
