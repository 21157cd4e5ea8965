"""SVG2's top-p choice of key clusters per query cluster, from centroids alone.

The attention of query cluster i on key cluster j is estimated from their centroids, each key centroid standing
for |K_j| keys: P'_ij = |K_j| exp(S_ij) / sum_k |K_k| exp(S_ik), S = scale * Qc Kc^T. Per query cluster the key
clusters are taken in decreasing P' until their sum passes top_p (the cluster that crosses top_p is kept), and
at least ``min_clusters`` of them. Empty key clusters weigh 0.

Two paths: one Triton kernel (cluster_select_triton.py: nothing per (query cluster, key cluster) pair but the results)
on a GPU for up to MAX_KEY_CLUSTERS key clusters, and torch, the reference, which holds TORCH_PAIR_BYTES per pair.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .attention import triton_available
from .cluster_reference import keep_table

SELECTION_BACKENDS = ("auto", "triton", "reference")
# The kernel sorts a row of key clusters whole in registers: at most this many (the references use 1,000).
MAX_KEY_CLUSTERS = 1024
# Temporaries of the torch path per (query cluster, key cluster) pair: scores, their sort (values, int64 indices),
# the cumulative sums and the sizes in sorted order.
TORCH_PAIR_BYTES = 28


@dataclass
class ClusterSelection:
    """order (B, H, CQ, CK) int32: key clusters by decreasing P'; counts (B, H, CQ) int32: the first ``counts``
    of each row are kept; kept_keys (B, H, CQ) int64: key tokens in the kept clusters (the work per query); kept
    (B, H, CQ, CK) bool, when asked for: whether query cluster i keeps key cluster j."""

    order: torch.Tensor
    counts: torch.Tensor
    kept_keys: torch.Tensor
    kept: torch.Tensor | None = None


def selection_backend(backend: str, device: torch.device, key_clusters: int) -> str:
    """'triton' or 'reference' for a selection over ``key_clusters`` key clusters on ``device``: 'auto' is the kernel
    on a GPU when the clusters fit it."""
    if backend not in SELECTION_BACKENDS:
        raise ValueError(f"backend must be one of {SELECTION_BACKENDS}, got {backend!r}")
    fits = key_clusters <= MAX_KEY_CLUSTERS
    if backend == "auto":
        return "triton" if fits and device.type == "cuda" and triton_available(device) else "reference"
    if backend == "triton" and not (fits and triton_available(device)):
        raise ValueError(f"the Triton selection needs Triton on a CUDA device (tensors are on {device}) and at most "
                         f"{MAX_KEY_CLUSTERS} key clusters (got {key_clusters}); use backend='auto' or 'reference'")
    return backend


def selection_pair_bytes(key_clusters: int, on_gpu: bool) -> int:
    """Temporaries a selection over ``key_clusters`` key clusters holds per (query cluster, key cluster) pair beyond
    its results: none in the kernel (``on_gpu``, where the clusters fit it), TORCH_PAIR_BYTES in torch."""
    return 0 if on_gpu and key_clusters <= MAX_KEY_CLUSTERS else TORCH_PAIR_BYTES


def cluster_scores(q_centroids, k_centroids, k_sizes, scale=None):
    """P' (B, H, CQ, CK) float32, each row summing to 1."""
    scale = 1.0 / math.sqrt(q_centroids.shape[-1]) if scale is None else scale
    scores = torch.matmul(q_centroids.float(), k_centroids.float().transpose(-1, -2)) * scale
    return torch.softmax(scores + k_sizes.float().log()[:, :, None, :], dim=-1)  # log 0 = -inf: weight 0


def select_key_clusters(q_centroids, k_centroids, k_sizes, *, top_p: float, min_clusters: int = 1, scale=None,
                        backend: str = "auto", order_out=None, with_kept: bool = False) -> ClusterSelection:
    """The key clusters each query cluster keeps. q_centroids (B, H, CQ, D), k_centroids (B, H, CK, D), k_sizes
    (B, H, CK) int with at least one non-empty cluster per (batch, head). top_p in (0, 1]: 1 keeps every key
    cluster (exactly dense attention, whatever the rounding of the cumulative sums).

    order_out: optional int32 (B, H, CQ, CK) tensor (any strides, contiguous last dimension: e.g. a view into a
    larger layout buffer) that receives the order, returned as the selection's order. with_kept: also return the
    kept table."""
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    B, H, CQ, D = q_centroids.shape
    CK = k_centroids.shape[2]
    if k_centroids.shape != (B, H, CK, D) or k_sizes.shape != (B, H, CK):
        raise ValueError(f"k_centroids must be ({B}, {H}, CK, {D}) and k_sizes (B, H, CK) to match q_centroids "
                         f"{tuple(q_centroids.shape)}; got {tuple(k_centroids.shape)} and {tuple(k_sizes.shape)}")
    device = q_centroids.device
    if order_out is not None and (order_out.shape != (B, H, CQ, CK) or order_out.dtype != torch.int32
                                  or order_out.device != device or order_out.stride(-1) != 1):
        raise ValueError(f"order_out must be an int32 ({B}, {H}, {CQ}, {CK}) tensor on {device} with a contiguous "
                         f"last dimension, got {order_out.dtype} {tuple(order_out.shape)} on {order_out.device}")
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    if selection_backend(backend, device, CK) == "triton":
        from .cluster_select_triton import triton_select
        order = torch.empty(B, H, CQ, CK, device=device, dtype=torch.int32) if order_out is None else order_out
        kept = torch.empty(B, H, CQ, CK, device=device, dtype=torch.bool) if with_kept else None
        counts, kept_keys = triton_select(q_centroids, k_centroids, k_sizes, top_p=top_p,
                                          min_count=min(max(1, min_clusters), CK), scale=scale, order_out=order,
                                          kept_out=kept)
        return ClusterSelection(order=order, counts=counts, kept_keys=kept_keys, kept=kept)
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
    order = order.to(torch.int32) if order_out is None else order_out.copy_(order)
    table = keep_table(order, counts, CK)[..., :CK] if with_kept else None  # (its last column: keys in no cluster)
    return ClusterSelection(order=order, counts=counts, kept_keys=kept_keys, kept=table)
