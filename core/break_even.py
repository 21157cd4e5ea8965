"""Break-even densities: per kernel and GPU class, the plan density above which the sparse kernel is slower than dense.

A kernel computing a share ``d`` of the attention pairs at ``r(d)`` of SDPA's throughput per computed pair takes
``d / r(d)`` of a dense call, so it is slower than dense above the density where ``d = r(d)``. The entries are
throughput ratios measured near that density or below it; the kernels' ratio rises from density 1.0 towards 0.5
(benchmarks/RESULTS.md, block-sparse table), so a ratio measured at density 1.0 or at a lower density than the
break-even is a break-even that is never slower than dense. What a planner spent to find its plan is spent by the
time the plan's density is known, so it is not part of the comparison (the planners' overheads are in RESULTS.md).

Only measured values: every entry cites its line of benchmarks/RESULTS.md. A GPU class that was not measured takes
the entry of the nearest measured class, lowered where that class runs a slower code path, and says so.
``benchmarks/break_even.py`` measures the entries on a GPU and prints rows for this table.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BLOCK_64, BLOCK_128, CLUSTER = "block-64", "block-128", "cluster"  # the kernels a planner's plan runs on
KERNELS = (BLOCK_64, BLOCK_128, CLUSTER)


def block_kernel(block_size: int) -> str:
    """The table's name of the fixed-block kernel at ``block_size`` (64 or 128)."""
    return f"block-{block_size}"


@dataclass(frozen=True)
class BreakEven:
    """``density``: heads whose plan keeps more of the attention pairs run dense. ``source``: where it comes from."""

    density: float
    source: str


_HOPPER = {
    BLOCK_128: BreakEven(0.90, "measured, H100: benchmarks/break_even.py, the block-sparse kernel on scattered layouts "
                               "at Wan 2.1 14B 720p, not slower than SDPA up to density 0.900 (0.98 of its time; "
                               "0.918 of its throughput), slower at 0.949 (RESULTS.md, 'Never slower than dense', "
                               "break-even table)"),
    BLOCK_64: BreakEven(0.70, "measured, H100: benchmarks/break_even.py, the block-sparse kernel at block 64 on "
                              "scattered layouts at Wan 2.1 14B 720p, not slower than SDPA up to density 0.700 (0.97 "
                              "of its time), slower at 0.800 (RESULTS.md, 'Never slower than dense', break-even "
                              "table)"),
    CLUSTER: BreakEven(0.47, "measured, H100: benchmarks/break_even.py, the cluster kernel through the cluster orders "
                             "on ragged clusters at Wan 2.1 14B 720p, 0.473-0.478 of SDPA's throughput at every "
                             "density from 0.30 to 1.00, so slower than SDPA above 0.47 (RESULTS.md, 'Never slower "
                             "than dense', break-even table)"),
}
# GPUs before Hopper run the kernel's pointer-load variant (no TMA): measured on the H100 at 62.9 ms against the TMA
# variant's 53.9 ms (Wan 14B 720p, density 0.25, block 128, SDPA 205.65 ms): 0.25 x 205.65 / 62.9 = 0.82 (RESULTS.md,
# 'What moved the kernel', the second run's sweep).
_POINTER_LOADS = 0.82


def _borrowed(entries: dict, cls: str, cap: float | None = None) -> dict:
    """``entries`` of a measured class for an unmeasured one, each at most ``cap``."""
    out = {}
    for kernel, entry in entries.items():
        density = entry.density if cap is None else min(entry.density, cap)
        lowered = f", lowered to {cap} (pointer loads)" if density < entry.density else ""
        out[kernel] = BreakEven(density, f"not measured on {cls}: Hopper's entry{lowered}. {entry.source}")
    return out


TABLE = {
    "hopper": _HOPPER,
    "blackwell": _borrowed(_HOPPER, "Blackwell (TMA loads, as Hopper)"),
    "ada": _borrowed(_HOPPER, "Ada", _POINTER_LOADS),
    "ampere": _borrowed(_HOPPER, "Ampere", _POINTER_LOADS),
    # The torch reference is the correctness path (tests, backend 'reference'), never timed against dense: no head is
    # routed there, so its outputs stay the method's own.
    "cpu": {kernel: BreakEven(1.0, "the torch reference: not a speed path, nothing routed") for kernel in KERNELS},
}


def gpu_class(device) -> str:
    """The table's class of ``device``: 'cpu' off CUDA, else by compute capability (sm_80/86/87 Ampere, sm_89 Ada,
    sm_90 Hopper, sm_100 and up Blackwell; older GPUs count as Ampere, the oldest class the pack supports)."""
    device = torch.device(device)
    if device.type != "cuda":
        return "cpu"
    major, minor = torch.cuda.get_device_capability(device)
    if major >= 10:
        return "blackwell"
    if major == 9:
        return "hopper"
    return "ada" if (major, minor) == (8, 9) else "ampere"


# What compensating skipped keys adds to a sparse call, as a share of a dense call, about the same at every density.
# Cluster: the pooling pass and a pooled term per skipped cluster, measured on the H100 (benchmarks/versus.py
# --compensate both, RESULTS.md 'Compensation on the proxy, every method'): SVG2 at Wan 14B 720p, 18.0 of 196.0 ms.
# Block kernels: the block summary and its fold (kernels/block_summary.py, benchmarks/compensation_cost.py, RESULTS.md
# issue 17, 2026-12-06, H100, Wan 14B 720p, dense 195-198 ms): 14.9-15.0 ms at block 128 since the split merge and
# the mean queries are kernels (16.7-17.9 before), 31.5 ms at block 64 (before them: an upper bound).
COMPENSATION_SHARE = {BLOCK_128: 0.08, BLOCK_64: 0.16, CLUSTER: 0.092}


def break_even(kernel: str, gpu: str, compensated: bool = False) -> BreakEven:
    """The entry of ``kernel`` on GPU class ``gpu``; ValueError naming the known ones otherwise. ``compensated``: the
    call also compensates the skipped keys, a fixed share c of a dense call, so the kernel breaks even where
    d / r + c = 1: at density r (1 - c) (the reference is never timed, its entry stays)."""
    if gpu not in TABLE or kernel not in TABLE[gpu]:
        raise ValueError(f"no break-even density for kernel {kernel!r} on {gpu!r}; known kernels {KERNELS}, "
                         f"classes {tuple(TABLE)}")
    entry = TABLE[gpu][kernel]
    if not compensated or gpu == "cpu":
        return entry
    share = COMPENSATION_SHARE[kernel]
    return BreakEven(entry.density * (1 - share), f"compensated: {entry.density} x (1 - {share}), the compensation's "
                                                  f"share of a dense call (COMPENSATION_SHARE). {entry.source}")
