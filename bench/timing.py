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


def memory_bandwidth(device: torch.device) -> float:
    """Bytes/s the device's memory moves, over a buffer far larger than any cache.

    CUDA: a 1 GiB device-to-device copy timed by `triton.testing.do_bench`, counted as bytes read
    plus bytes written (the usual "copy bandwidth"). CPU: a reduction over 1 GiB (bytes read),
    what a weight-streaming decode step does.
    """
    if device.type == "cuda":
        import triton.testing

        src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
        ms = triton.testing.do_bench(lambda: dst.copy_(src), return_mode="median")
        return 2 * src.numel() / (ms / 1e3)
    src = torch.randn(256 << 20)  # 1 GiB of fp32
    return src.numel() * 4 / median_seconds(src.sum, 5, device)
