"""The benchmarks' shared helpers: timers (median milliseconds of a callable, on the GPU or, in smoke runs, on the
CPU) and loading a sibling benchmark by path."""

from __future__ import annotations

import importlib.util
import statistics
import time
from pathlib import Path


def sibling_benchmark(name: str):
    """benchmarks/<name>.py as a module (its shapes, layouts, helpers), loaded by path: benchmarks/kernels.py would
    shadow the pack's kernels package as a plain import."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", Path(__file__).resolve().parent / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bench_timer(smoke: bool, warmup: float = 100, rep: float = 500):
    """Median ms of short, repeatable work. On the GPU, triton's do_bench (it clears L2 before every run; the
    inputs here are GBs, far beyond L2, so no rotating input sets are needed); on the CPU a plain clock."""
    if smoke:
        return lambda fn: call_timer(fn, runs=2, cuda=False)
    from triton.testing import do_bench
    return lambda fn: do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def call_timer(fn, runs: int = 3, cuda: bool = True, warm: int = 1, setup=None) -> float:
    """Median ms of ``runs`` calls after ``warm`` untimed ones, each between synchronisations (for long calls
    that sync themselves, or state that changes per call, where do_bench's many repetitions do not fit).
    ``setup()``: untimed work before every call (the state the call starts from)."""
    import torch

    for _ in range(warm):
        if setup is not None:
            setup()
        fn()
    times = []
    for _ in range(runs):
        if setup is not None:
            setup()
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)
