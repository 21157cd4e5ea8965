"""AdaSpa's cluster-served heads: at a search, a head whose block pattern keeps less than the recall of its own
mass is tried on SVG2's cluster layout, and keeps it until the next search when the clusters serve it (issue 17).

Measured on head-kind inputs (benchmarks/head_kinds.py, benchmarks/RESULTS.md): on a head whose tokens attend to
far-apart tokens of one moving object, AdaSpa's blocks keep about 0.4 of the mass at its density cap and SVG2's
clusters about 0.9 at a lower density. The search already holds each row's exact LSE over every key, so the cluster
layout's mass is exact too, over every video row: the cluster kernel's LSE over the kept keys against the search's
LSE (exp(kept - all) is the share of the row's mass kept), one head at a time through the SVG2 planner (its k-means
keyed by the true head, warm-started across steps; the same centroids then serve the head between searches). A head
is cluster-served when that share reaches the recall, or is ``CLEARLY_MORE`` above what its blocks keep, at a
density (SVG2's kept pairs over all pairs) of at most the head's max_density: a head with no structure (diffuse)
has its clusters keep most keys and stays with its blocks.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from .memory import heads_of
from .method import AttentionCall
from .svg2 import SVG2Planner

# A cluster layout below the recall still serves a head when it keeps this much more of its mass than the head's
# blocks at max_density (an error of 1.4 against 0.2 on semantic heads, RESULTS.md).
CLEARLY_MORE = 0.2


def cluster_recall(call: AttentionCall, lse: torch.Tensor, clusters: SVG2Planner) -> tuple[float, float]:
    """(share of the exact attention mass, density) of the cluster layout of the call's single head, over every
    video row of its latents. ``call``: one head of a first conditioning chunk; ``lse``: its rows' exact LSE
    (B, 1, L) over every key. The probe launch is not routed, not compensated and writes a scratch output."""
    probe = replace(call, router=None, compensate=False, want_lse=True, out=None, lse=None, lse_compensated=None)
    _, density = clusters.attend(probe)
    video = call.grid.video_tokens
    # a primed LSE is the step before's: a row's kept keys may hold a little more than it, never more than all
    kept = torch.exp(probe.lse[..., :video] - lse[..., :video].float()).clamp(max=1.0)
    return float(kept.mean()), float(density)


def cluster_served(first: AttentionCall, lse: torch.Tensor, block_recall: torch.Tensor, clusters: SVG2Planner, *,
                   recall: float, max_density: float) -> tuple:
    """Per head of the first conditioning chunk ``first`` (its exact ``lse`` (B, H, L), its block pattern's recall
    (B, H)): True when its cluster layout serves it (module docstring). Only heads whose blocks miss ``recall`` are
    tried; none is where SVG2 cannot run the call."""
    heads = first.q.shape[1]
    if not clusters.runs_on(first):
        return (False,) * heads
    flags = []
    for h, reached in enumerate(block_recall.mean(0).tolist()):
        served = False
        if reached < recall:
            kept, density = cluster_recall(heads_of(first, slice(h, h + 1), None), lse[:, h:h + 1], clusters)
            served = density <= max_density and (kept >= recall or kept >= reached + CLEARLY_MORE)
        if not served:  # probed now or served before: its centroids would only take memory (Wan 14B: 0.3 MB a head)
            clusters.forget(first.layer, first.head_offset + h)
        flags.append(served)
    return tuple(flags)
