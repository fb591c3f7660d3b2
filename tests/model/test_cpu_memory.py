"""Freed memory kept in the process (`model.cpu_memory`): it removes the page faults of a step's
re-allocated tensors, the CPU plan applies it and says so, and the environment or low memory
keeps glibc's behaviour. Run in subprocesses: the setting is process-wide and cannot be undone."""

import os
import subprocess
import sys
import textwrap

import pytest

from model import cpu_memory

pytestmark = pytest.mark.skipif(not cpu_memory.available(), reason="malloc is not glibc's: no thresholds to set")


def _run(code: str, **env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if k not in cpu_memory.GLIBC_MALLOC_VARIABLES and k != "GLIBC_TUNABLES"}
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300,
                          env=clean | env)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_kept_memory_serves_a_steps_tensors_without_page_faults():
    # 40 rounds of a 4 MiB tensor allocated, written and freed: with glibc's thresholds each lands
    # on fresh pages (1,024 faults of 4 KiB pages; fewer where transparent huge pages serve them);
    # kept, the heap, once grown, serves them from pages it already has.
    out = _run("""
        import resource, torch
        from model import cpu_memory

        def faults():
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            for _ in range(40):
                torch.empty(2**20).fill_(1.0)
            return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

        # glibc's starting thresholds, fixed (as set by hand glibc no longer raises them)
        cpu_memory._set({cpu_memory.M_MMAP_THRESHOLD: 128 * 2**10, cpu_memory.M_TRIM_THRESHOLD: 128 * 2**10})
        returned = faults()
        cpu_memory.keep_freed_memory()
        faults()  # the heap grows to the size the rounds need (measured: 8 rounds' faults)
        kept = faults()
        print(returned, kept, cpu_memory.kept())
    """)
    returned, kept, flag = out.split()
    assert int(returned) >= 40 and int(kept) < 40 and flag == "True"


PLAN = """
    import torch
    from model import cpu_memory
    from model.cpu_plan import PlannedWeight, measure_cpu_plan
    plan = measure_cpu_plan([PlannedWeight(torch.randn(32, 16), 1)], torch.float32, 4, 2, 16, 2, 32)
    print(plan.describe().split("; freed memory ")[1].split(";")[0], cpu_memory.kept(), sep="|")
"""


def test_the_plan_keeps_freed_memory_and_says_so():
    assert _run(PLAN) == "kept|True"


@pytest.mark.parametrize("name, value, says", [
    ("MALLOC_TRIM_THRESHOLD_", "131072", "returned as MALLOC_TRIM_THRESHOLD_ sets it"),
    ("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=131072", "returned as GLIBC_TUNABLES sets it"),
])
def test_the_environment_keeps_glibcs_behaviour(name, value, says):
    assert _run(PLAN, **{name: value}) == f"{says}|False"


def test_too_little_memory_keeps_glibcs_behaviour():
    out = _run("""
        from model import cpu_memory
        print(cpu_memory.keep_freed_memory_if_possible(2**30), cpu_memory.kept(), sep="|")
    """)
    assert out == "returned (only 1.0 GiB available, under 4 GiB)|False"
