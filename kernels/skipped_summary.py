"""Fewer compensation terms per row: a query cluster's skipped key clusters beyond its heaviest few, summed.

Per-group compensation (kernels/pooled_keys.py) gives every row one virtual key per key cluster its list skips:
at SVG2's Wan 14B 720p sizes ~1,000 terms a row against ~8,200 exact keys at density 0.1, so ~12% of the exact
work, whatever the kernel. Here the skipped clusters of each query cluster are weighed at the cluster's mean query
c (w_g ~ n_g exp(scale c.k_g)); the ``own_terms`` heaviest keep their own first-order terms, and the others ("the
rest") become one virtual key per row whose score and value are affine in the row's query q:

    score(q) = ln sum_rest n_g exp(scale c.k_g) + scale (q - c).k_w      k_w = sum_rest w_g k_g  (w normalised)
    value(q) = v_w + scale C (q - c),  C = sum_rest w_g (v_g - v_w)(k_g - k_w)^T

that is, the rest's first-order terms summed at c and moved to the row to first order: the log of their sum moves
by its gradient, their weighted mean value by its derivative C (over every cluster of the rest: C summed over the
heaviest few alone loses most of what moving the value gains). A row then costs ``own_terms`` terms and one D x D
product instead of ~1,000 terms; building C costs D^2 per (query cluster, key cluster) pair, once per call, in one
matmul. How close it comes to a term per cluster on the proxy: benchmarks/compensation_terms.py, RESULTS.md.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .cluster_reference import keep_table
from .pooled_keys import PooledKeys, pool_key_clusters

# RESULTS.md, issue 17: on the proxy's 256 key clusters, 16 own terms erred as little as a term for every skipped
# cluster at 4 steps and 19% more at step 10 of 20 (64: 2% less and 8% more), against 2.4-4.7x more when dropped.
OWN_TERMS = 16
# kernels.cluster_block_attention builds a summary (and launches) this many bytes of heads at a time.
SUMMARY_CHUNK_BYTES = 64 << 20


@dataclass(frozen=True)
class SkippedSummary:
    """Per (batch, head, query cluster c): the skipped key clusters with their own terms, ``own`` (B, H, CQ, M)
    int32, the first ``own_counts`` (B, H, CQ) of each row valid; and the rest's affine virtual key: ``centre``
    (B, H, CQ, D) float32 the cluster's mean query, ``log_weight`` (B, H, CQ) float32 (-inf: nothing rests),
    ``key`` k_w and ``value`` v_w (B, H, CQ, D) float32, ``slope`` (B, H, CQ, D, D) in q's dtype, scale C^T (query
    dimension first: value(q) = value + (q - centre) @ slope); ``spread`` (B, H, CQ) float32 or None, the rest's
    weighted key variance per dimension at the centre, by which the block summary's fold damps the value's move
    (kernels.block_summary.MOVE_DAMPING, then bounded by MOVE_LIMIT)."""

    own: torch.Tensor
    own_counts: torch.Tensor
    centre: torch.Tensor
    log_weight: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    slope: torch.Tensor
    spread: torch.Tensor | None = None


def summarise_skipped(q, pooled: PooledKeys, q_offsets, kv_clusters, kv_cluster_counts, *, scale: float,
                      own_terms: int = OWN_TERMS, q_order=None, backend: str = "auto") -> SkippedSummary:
    """The SkippedSummary of cluster attention's call (kernels.cluster_block_attention's arguments, validated):
    ``pooled`` the key clusters' statistics, ``own_terms`` how many skipped clusters of a query cluster keep their
    own terms. All on the device."""
    B, H, _, D = q.shape
    CK = pooled.log_size.shape[-1]
    centre = pool_key_clusters(q, q, q_offsets, backend=backend, k_order=q_order).keys.float()  # (B, H, CQ, D)
    k_mean, v_mean = (t.float().expand(B, H, -1, -1) for t in (pooled.keys, pooled.values))
    log_size = pooled.log_size.float().expand(B, H, -1)
    kept = keep_table(kv_clusters, kv_cluster_counts, CK)[..., :CK]
    logits = (centre @ k_mean.transpose(-1, -2) * scale + log_size[:, :, None]).masked_fill(kept, float("-inf"))
    heaviest, ids = logits.topk(max(1, min(own_terms, CK)), dim=-1)       # one slot at least: the kernel's pointer
    counts = torch.isfinite(heaviest[..., :own_terms]).sum(-1, dtype=torch.int32)  # skipped, nonempty, heaviest first
    rest = logits.scatter(-1, ids[..., :own_terms], float("-inf"))
    log_weight = torch.logsumexp(rest, dim=-1)
    w = torch.exp(rest - log_weight[..., None]).nan_to_num(0.0)          # a row where nothing rests: all 0
    key, value = w @ k_mean, w @ v_mean
    # scale C^T over every summed cluster, for all query clusters in one matmul of the weights with the clusters'
    # outer products, centred on the clusters' plain means so that the difference keeps its digits in q's dtype.
    k_centred, v_centred = k_mean - k_mean.mean(2, keepdim=True), v_mean - v_mean.mean(2, keepdim=True)
    outer = (k_centred.to(q.dtype)[..., :, None] * v_centred.to(q.dtype)[..., None, :]).flatten(-2)  # (B,H,CK,D*D)
    gram = (w.to(q.dtype) @ outer).float().view(*w.shape[:3], D, D)
    key_w, value_w = w @ k_centred, w @ v_centred
    slope = ((gram - key_w[..., :, None] * value_w[..., None, :]) * scale).to(q.dtype)
    return SkippedSummary(ids.to(torch.int32).contiguous(), counts, centre.contiguous(), log_weight.contiguous(),
                          key.contiguous(), value.contiguous(), slope.contiguous())


def summary_head_bytes(batch: int, query_clusters: int, key_clusters: int, head_dim: int, element_size: int) -> int:
    """Peak bytes per head of summarise_skipped: per key cluster its D x D outer product, per query cluster the
    slope (in q's dtype and float32 twice) and a few float32 tables over the key clusters (logits, the rest,
    weights)."""
    square = head_dim * head_dim
    return batch * (key_clusters * square * element_size
                    + query_clusters * (square * (element_size + 8) + 16 * key_clusters + 16 * head_dim))


def pad_summary(summary: SkippedSummary | None, head_dim: int) -> SkippedSummary | None:
    """``summary`` zero-padded to ``head_dim`` (what run_padded_head_dim gives the kernel): the padded query
    dimensions move nothing and the padded value dimensions stay 0."""
    if summary is None or summary.key.shape[-1] == head_dim:
        return summary
    pad = head_dim - summary.key.shape[-1]
    vec = lambda t: torch.nn.functional.pad(t, (0, pad))  # noqa: E731
    return replace(summary, centre=vec(summary.centre), key=vec(summary.key), value=vec(summary.value),
                   slope=torch.nn.functional.pad(summary.slope, (0, pad, 0, pad)))


def summary_terms(q, summary: SkippedSummary, row_cluster, scale: float):
    """The rest's virtual key at each row of (B, H, L, D) ``q`` whose query cluster is ``row_cluster`` (B, H, L):
    (score (B, H, L) float32 natural-log, value (B, H, L, D) float32). The torch reference of the kernel's term;
    each row's D x D slope is gathered a few rows at a time."""
    B, H, L, D = q.shape
    pick = lambda t: torch.gather(t, 2, row_cluster[..., None].expand(-1, -1, -1, t.shape[-1]))  # noqa: E731
    delta = q.float() - pick(summary.centre)
    score = torch.gather(summary.log_weight, 2, row_cluster) + scale * (delta * pick(summary.key)).sum(-1)
    value = pick(summary.value)
    slope = summary.slope.float().flatten(-2)                                   # (B, H, CQ, D * D)
    step = max(1, _GATHER_ELEMENTS // (B * H * D * D))
    for r0 in range(0, L, step):
        rows = slice(r0, min(L, r0 + step))
        row_slope = torch.gather(slope, 2, row_cluster[:, :, rows, None].expand(-1, -1, -1, D * D))
        value[:, :, rows] += (delta[:, :, rows, None, :] @ row_slope.view(B, H, -1, D, D))[..., 0, :]
    return score, value


_GATHER_ELEMENTS = 1 << 24  # the reference's gathered slopes: 64 MB of float32 at a time
