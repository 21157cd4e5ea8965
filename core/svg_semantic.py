"""SVG's third head class, semantic: heads that neither the spatial nor the temporal layout serves, run on SVG2's
clusters (issue 17).

Measured on head-kind inputs (benchmarks/head_kinds.py, benchmarks/RESULTS.md): on a head whose tokens attend to
far-apart tokens of one moving object, SVG's blocks keep about 0.4 of the attention mass and SVG2's clusters about
0.9, at a lower density. On SVG's sampled query rows, a head is semantic when the better of its two block layouts
keeps less than ``ENOUGH`` of the mass while its cluster layout (SVG2's k-means on that head's q and k, the key
clusters top-p selects) keeps at least ``ENOUGH`` at a density of at most ``MAX_CLUSTER_DENSITY``: a head with no
structure (diffuse) has its cluster layout keep most keys, and stays with its block layout.
"""

from __future__ import annotations

import math

import torch

from ..kernels.mask_errors import token_masks
from .memory import head_parts, heads_of, heads_per_chunk
from .method import AttentionCall
from .svg2 import SVG2Planner

ENOUGH = 0.75
MAX_CLUSTER_DENSITY = 0.5


def sampled_masses(q_rows: torch.Tensor, k: torch.Tensor, keep: torch.Tensor, kv_length=None) -> torch.Tensor:
    """(C, B, H) float32: per candidate token mask the attention mass the sampled rows keep, mean over the rows.
    q_rows (B, H, R, D), k (B, H, LK, D), keep (C, B or 1, H or 1, R, LK) bool or uint8. A few heads at a time: the
    probabilities of one head and their masked copies are what a chunk holds."""
    B, H, R, D = q_rows.shape
    LK = k.shape[2]
    masses = torch.empty(keep.shape[0], B, H, device=q_rows.device, dtype=torch.float32)
    valid = None if kv_length is None else torch.arange(LK, device=k.device) < kv_length.view(B, 1, 1, 1)
    for part in head_parts(H, heads_per_chunk(q_rows, 4 * (1 + keep.shape[0]) * B * R * LK)):
        scores = torch.matmul(q_rows[:, part].float(), k[:, part].float().transpose(-1, -2)) / math.sqrt(D)
        if valid is not None:
            scores = scores.masked_fill(~valid, -math.inf)
        p = torch.softmax(scores, dim=-1)
        mask = keep[:, :, part] if keep.shape[2] > 1 else keep
        masses[:, :, part] = (p[None] * mask).sum(-1).mean(-1)
    return masses


def block_masses(call: AttentionCall, plan) -> torch.Tensor:
    """(2, H) float32: the mass the spatial and the temporal layout keep on the sampled rows of the call's first
    conditioning chunk, mean over its latents."""
    first = call.first_conditioning()
    keep = token_masks(plan.keep, plan.key_block)[:, None, None]  # (2, 1, 1, R, L)
    q_rows = first.q.index_select(2, plan.rows)
    return sampled_masses(q_rows, first.k, keep, first.kv_length).mean(dim=1)


def cluster_mass(call: AttentionCall, rows: torch.Tensor, clusters: SVG2Planner) -> tuple[float, float]:
    """(mass, density) of the cluster layout of the call's single head on the sampled ``rows`` (video rows), over
    its first conditioning chunk: k-means of that head (the planner's, whose centroid cache it warm-starts) and the
    key clusters top-p keeps per query cluster. Text keys are kept, as SVG2 keeps them."""
    first = call.first_conditioning()
    q_km, k_km, selection = clusters.plan_clusters(call, with_kept=True)
    video = call.grid.video_tokens
    kept = selection.kept  # (B, 1, CQ, CK)
    row_cluster = q_km.labels.index_select(2, rows).long()                             # (B, 1, R)
    kept_rows = torch.gather(kept, 2, row_cluster[..., None].expand(-1, -1, -1, kept.shape[-1]))
    keep = torch.gather(kept_rows, 3, k_km.labels.long()[:, :, None, :].expand(-1, -1, rows.numel(), -1))
    text = torch.ones(*keep.shape[:3], first.k.shape[2] - video, dtype=torch.bool, device=keep.device)
    keep = torch.cat([keep, text], dim=-1)                                             # (B, 1, R, L)
    q_rows = first.q.index_select(2, rows)
    mass = sampled_masses(q_rows, first.k, keep[None], first.kv_length)
    return float(mass.mean()), float(keep.float().mean())


def semantic_heads(call: AttentionCall, plan, clusters: SVG2Planner) -> tuple:
    """Per head of the call: True when it is semantic (module docstring). Only heads that no block layout serves
    are clustered. None is semantic where SVG2 cannot run: fewer video tokens than clusters, key padding without
    text tokens."""
    if not clusters.runs_on(call):
        return (False,) * call.q.shape[1]
    best = block_masses(call, plan).max(dim=0).values.tolist()
    flags = []
    for h, mass in enumerate(best):
        semantic = False
        if mass < ENOUGH:
            kept, density = cluster_mass(heads_of(call, slice(h, h + 1), None), plan.rows, clusters)
            semantic = kept >= ENOUGH and density <= MAX_CLUSTER_DENSITY
        flags.append(semantic)
    return tuple(flags)
