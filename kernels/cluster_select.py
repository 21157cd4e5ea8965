"""SVG2's top-p choice of key clusters per query cluster, from centroids alone (torch: the tensors are small).

The attention of query cluster i on key cluster j is estimated from their centroids, each key centroid standing
for |K_j| keys: P'_ij = |K_j| exp(S_ij) / sum_k |K_k| exp(S_ik), S = scale * Qc Kc^T. Per query cluster the key
clusters are taken in decreasing P' until their sum passes top_p (the cluster that crosses top_p is kept), and
at least ``min_clusters`` of them. Empty key clusters weigh 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class ClusterSelection:
    """order (B, H, CQ, CK) int32: key clusters by decreasing P'; counts (B, H, CQ) int32: the first ``counts``
    of each row are kept; kept_keys (B, H, CQ) int64: key tokens in the kept clusters (the work per query)."""

    order: torch.Tensor
    counts: torch.Tensor
    kept_keys: torch.Tensor


def cluster_scores(q_centroids, k_centroids, k_sizes, scale=None):
    """P' (B, H, CQ, CK) float32, each row summing to 1."""
    scale = 1.0 / math.sqrt(q_centroids.shape[-1]) if scale is None else scale
    scores = torch.matmul(q_centroids.float(), k_centroids.float().transpose(-1, -2)) * scale
    return torch.softmax(scores + k_sizes.float().log()[:, :, None, :], dim=-1)  # log 0 = -inf: weight 0


def select_key_clusters(q_centroids, k_centroids, k_sizes, *, top_p: float, min_clusters: int = 1,
                        scale=None) -> ClusterSelection:
    """The key clusters each query cluster keeps. q_centroids (B, H, CQ, D), k_centroids (B, H, CK, D), k_sizes
    (B, H, CK) int with at least one non-empty cluster per (batch, head). top_p in (0, 1]: 1 keeps every key
    cluster (exactly dense attention, whatever the rounding of the cumulative sums)."""
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    B, H, CQ, D = q_centroids.shape
    CK = k_centroids.shape[2]
    if k_centroids.shape != (B, H, CK, D) or k_sizes.shape != (B, H, CK):
        raise ValueError(f"k_centroids must be ({B}, {H}, CK, {D}) and k_sizes (B, H, CK) to match q_centroids "
                         f"{tuple(q_centroids.shape)}; got {tuple(k_centroids.shape)} and {tuple(k_sizes.shape)}")
    probs = cluster_scores(q_centroids, k_centroids, k_sizes, scale)
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    if top_p >= 1.0:
        counts = torch.full((B, H, CQ), CK, device=probs.device, dtype=torch.int32)
    else:
        # Cluster j is kept while the mass before it is at most top_p (as the reference): the cumulative sums never
        # decrease, so the kept clusters are the prefix up to the first one whose sum passes top_p.
        passed = (torch.cumsum(sorted_probs, dim=-1) <= top_p).sum(dim=-1, dtype=torch.int32)
        counts = (passed + 1).clamp(min=min(max(1, min_clusters), CK), max=CK)
    sorted_sizes = torch.gather(k_sizes.to(torch.int32)[:, :, None, :].expand(B, H, CQ, CK), -1, order)
    kept = torch.gather(sorted_sizes.cumsum(-1, dtype=torch.int32), -1, (counts.long() - 1)[..., None])
    kept_keys = kept.squeeze(-1).long()
    return ClusterSelection(order=order.to(torch.int32), counts=counts, kept_keys=kept_keys)
