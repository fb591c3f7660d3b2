"""`python -m nanoserve_kernels.report`: what each kernel compiles to on sm_90 and sm_80, without a GPU.

For every kernel in the specialisations the model launches: registers per thread, spilled bytes,
shared memory per program, and how many of its global loads and stores are 128-bit wide (the
SASS opcodes LDG.E.128 / LDGSTS...128 / STG.E.128), as `wide/all`. `--json PATH` also writes the rows.
"""

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict

from nanoserve_kernels._triton import interpreting

COLUMNS = ("kernel", "specialisation", "target", "regs", "spill B", "smem B", "128-bit ld", "128-bit st")


def compile_all(targets: list[str]) -> list:
    """Every variant for every target, compiled in parallel processes (ptxas is single-threaded)."""
    from nanoserve_kernels.aot import variants

    jobs = [(index, target) for index in range(len(list(variants()))) for target in targets]
    with ProcessPoolExecutor(max_workers=os.cpu_count()) as pool:
        return list(pool.map(_compile_job, jobs))


def _compile_job(job: tuple[int, str]):
    from nanoserve_kernels.aot import compile_variant, variants

    index, target = job
    return compile_variant(list(variants())[index], target)


def format_table(rows: list) -> str:
    cells = [COLUMNS] + [
        (r.kernel, r.shape, r.target, str(r.registers), str(r.spill_bytes), str(r.shared_bytes),
         f"{r.loads_128}/{r.loads}", f"{r.stores_128}/{r.stores}")
        for r in rows
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in cells]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nanoserve_kernels.report", description=__doc__)
    parser.add_argument("--target", action="append", choices=["sm_90", "sm_80"], help="default: both")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    args = parser.parse_args(argv)
    if interpreting():
        # Interpreter functions cannot be compiled: run again in a process that builds real ones.
        env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "NANOSERVE_KERNELS")}
        argv = sys.argv[1:] if argv is None else argv
        return subprocess.run([sys.executable, "-m", "nanoserve_kernels.report", *argv], env=env).returncode
    rows = compile_all(args.target or ["sm_90", "sm_80"])
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in rows], f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
