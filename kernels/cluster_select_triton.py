"""SVG2's top-p key-cluster selection in one Triton kernel: no (query cluster x key cluster) temporaries.

The torch path (cluster_select.py) holds the scores, their sort, its int64 indices and two cumulative sums: 28 bytes
per (query cluster, key cluster) pair, 8 MB a head at Wan 720p's 300 x 1,000 clusters, which is what limited how many
heads SVG2 could plan at once (and each group of heads costs its own ~350 kernel launches). Here one program owns
BLOCK_Q query clusters of one (batch, head): it computes their centroid scores against every key centroid in
registers, the size-weighted softmax, sorts each row by (probability, then lower cluster id first: the torch path's
stable descending sort) packed into one int64, takes the top-p prefix, and writes only the results: the order (into
any strided view: SVG2's layout buffer with HunyuanVideo's text column), the counts, the kept keys and, optionally,
the kept table in cluster-id order (the Inspector's drawing).

A row is sorted whole in registers, so the key clusters are at most cluster_select.MAX_KEY_CLUSTERS; more take the
torch path.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _select_kernel(
    QC, KC, SIZES, ORDER, COUNTS, KEPT_KEYS, KEPT,
    stride_ob, stride_oh, stride_oq,
    H, CQ, CK, D, scale, top_p, min_count,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    KEEP_ALL: tl.constexpr, WRITE_KEPT: tl.constexpr,
):
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    rows = pid * BLOCK_Q + tl.arange(0, BLOCK_Q)
    cols = tl.arange(0, BLOCK_K)
    row_ok = rows < CQ
    col_ok = cols < CK
    q_base = QC + bh.to(tl.int64) * CQ * D
    k_base = KC + bh.to(tl.int64) * CK * D

    scores = tl.zeros([BLOCK_Q, BLOCK_K], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        d_ok = dd < D
        q = tl.load(q_base + rows[:, None] * D + dd[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        k_t = tl.load(k_base + cols[None, :] * D + dd[:, None], mask=col_ok[None, :] & d_ok[:, None], other=0.0)
        scores += tl.dot(q, k_t, input_precision="ieee")  # float32 products, as the torch path's matmul
    sizes = tl.load(SIZES + bh * CK + cols, mask=col_ok, other=0)
    # Each centroid stands for its cluster's keys: weight |K_j| (log 0 = -inf: empty clusters and padding weigh 0).
    weighted = tl.where((sizes > 0)[None, :], scores * scale + tl.log(sizes.to(tl.float32))[None, :], float("-inf"))
    top = tl.max(weighted, 1)
    e = tl.exp(weighted - top[:, None])
    probs = e / tl.sum(e, 1)[:, None]

    # probs >= 0, so their float bits order like the floats; the low word ranks equal probabilities by lower id.
    # Padding columns (probability 0, the highest ids) sort after every real cluster.
    key = (probs.to(tl.int32, bitcast=True).to(tl.int64) << 32) | (BLOCK_K - 1 - cols).to(tl.int64)[None, :]
    ranked = tl.sort(key, dim=1, descending=True)
    ids = (BLOCK_K - 1) - (ranked & 0xFFFFFFFF).to(tl.int32)
    if KEEP_ALL:
        counts = tl.zeros([BLOCK_Q], dtype=tl.int32) + CK
    else:
        ranked_probs = (ranked >> 32).to(tl.int32).to(tl.float32, bitcast=True)
        # Kept while the mass before a cluster is at most top_p: the prefix up to the first sum that passes top_p.
        passed = tl.sum((tl.cumsum(ranked_probs, 1) <= top_p).to(tl.int32), 1)
        counts = tl.minimum(tl.maximum(passed + 1, min_count), CK)
    # The last kept key: every cluster whose (unique) key ranks at or above it is kept.
    last = tl.sum(tl.where(cols[None, :] == (counts - 1)[:, None], ranked, 0), 1)
    kept = (key >= last[:, None]) & col_ok[None, :]

    out_rows = b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + rows[:, None] * stride_oq
    tl.store(ORDER + out_rows + cols[None, :], ids, mask=row_ok[:, None] & col_ok[None, :])
    tl.store(COUNTS + bh * CQ + rows, counts, mask=row_ok)
    tl.store(KEPT_KEYS + bh * CQ + rows, tl.sum(tl.where(kept, sizes[None, :], 0).to(tl.int64), 1), mask=row_ok)
    if WRITE_KEPT:
        tl.store(KEPT + (bh.to(tl.int64) * CQ + rows[:, None]) * CK + cols[None, :], kept,
                 mask=row_ok[:, None] & col_ok[None, :])


def triton_select(q_centroids, k_centroids, k_sizes, *, top_p: float, min_count: int, scale: float, order_out,
                  kept_out=None):
    """Fill ``order_out`` (B, H, CQ, CK) int32, any strides with a contiguous last dimension, and ``kept_out``
    (B, H, CQ, CK) bool when given; return (counts (B, H, CQ) int32, kept_keys (B, H, CQ) int64). Inputs are assumed
    validated: CK <= cluster_select.MAX_KEY_CLUSTERS, at least one non-empty key cluster per (batch, head)."""
    B, H, CQ, D = q_centroids.shape
    CK = k_centroids.shape[2]
    device = q_centroids.device
    qc = q_centroids.float().contiguous()
    kc = k_centroids.float().contiguous()
    sizes = k_sizes.to(torch.int32).contiguous()
    counts = torch.empty(B, H, CQ, device=device, dtype=torch.int32)
    kept_keys = torch.empty(B, H, CQ, device=device, dtype=torch.int64)
    block_k = max(16, triton.next_power_of_2(CK))
    interpreted = device.type != "cuda"
    block_q = 16  # tl.dot's smallest tile
    grid = (triton.cdiv(CQ, block_q), B * H)
    _select_kernel[grid](
        qc, kc, sizes, order_out, counts, kept_keys, kept_out if kept_out is not None else counts,
        order_out.stride(0), order_out.stride(1), order_out.stride(2),
        H, CQ, CK, D, scale, top_p, min_count,
        # 16 x 1,024 scores and their int64 keys: 8 warps keep them in registers; the key tile of the products
        # (BLOCK_D x 1,024 float32, 64 KB) fits the shared memory of consumer GPUs.
        BLOCK_Q=block_q, BLOCK_K=block_k, BLOCK_D=16, KEEP_ALL=top_p >= 1.0, WRITE_KEPT=kept_out is not None,
        num_warps=4 if interpreted or block_k <= 256 else 8, num_stages=1)
    return counts, kept_keys
