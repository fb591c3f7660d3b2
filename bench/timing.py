"""Timing helpers shared by the benchmarks."""

import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import torch


def on_own_thread(fn, *args):
    """Run `fn(*args)` on a fresh thread that ends with it.

    torch's CPU ops run on an OpenMP (libgomp) team per calling thread. Once teams outnumber the
    cores, libgomp lets every worker sleep between ops, which halves CPU decode speed. Running each
    measured phase on a thread that then ends keeps one team alive at a time (the engine's loop
    thread is one such thread too).
    """
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(fn, *args).result()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn, repeats: int, device: torch.device) -> float:
    """Median wall time of `fn()` over `repeats` runs after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)
