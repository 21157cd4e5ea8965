"""Triton forward kernel for cluster attention: ragged query clusters, each over its own ragged key clusters.

Why this shape (SVG2 at Wan 720p: 75,600 tokens, ~300 query clusters of ~250 rows, ~1000 key clusters of ~75):

* Query side: a tile table, built on the device before the launch, cuts every query cluster into BLOCK_M-row
  tiles; one program owns one tile. A tile never mixes clusters (its rows share one key list), so the only
  query-side waste is the last, partial tile of each cluster (about BLOCK_M / 2 rows per cluster). The grid
  has a static bound of tiles per (batch, head), min(LQ, (LQ + CQ * (BLOCK_M - 1)) // BLOCK_M), computed from
  shapes alone (no device sync); unused table entries are masked out and cost one load.
* Key side: padding each key cluster to a tile would waste ~40% of the work at 75 tokens per cluster. Instead
  a tile walks its kept key clusters in chunks of CHUNK clusters: it loads their ids and sizes (from
  k_offsets) and an in-chunk exclusive cumsum, so the chunk's kept tokens form one virtual contiguous stream
  walked in BLOCK_N-key tiles that may span several clusters. A key slot at stream position pos belongs to the
  cluster whose [prefix, prefix + size) range holds pos (a BLOCK_N x CHUNK compare), and its source row is
  k_offsets[id] + pos - prefix; K and V rows are gathered by per-row pointers (each row is one contiguous
  head_dim vector, so the loads stay coalesced). Only the last tile of a chunk is partial: the waste is at most
  one tile per CHUNK clusters, and only that tile pays for masking.
* The online softmax step is the fixed-block kernel's (_softmax_update / _row_results: exp2 with the scale
  folded in, a finite running max so fully masked tiles give 0, not NaN).
* Programs of one (batch, head) are adjacent in launch order, so the K/V rows their key lists share stay in L2.

Work computed over useful pairs: about (1 + (BLOCK_M / 2) / mean query-cluster size) x (1 + (BLOCK_N / 2) /
(CHUNK x mean key-cluster size)); at SVG2's 720p sizes with 64 x 64 tiles and CHUNK 16, 1.13 x 1.03. The query
term dominates; 128-row tiles would double it, so they are used only for long query clusters.

No Hopper-only feature is used: Hopper's TMA copies boxes of consecutive rows, and the virtual key stream is
not consecutive across cluster boundaries.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .block_sparse_triton import _LOG2E, _NEG_BIG, _row_results, _softmax_update


@triton.jit
def _cluster_fwd(
    Q, K, V, O, LSE, Q_OFF, K_OFF, KV_IDS, KV_CNT, TILE_CLUSTER, TILE_START,
    qk_scale,
    stride_qb, stride_qh, stride_ql,
    stride_kb, stride_kh, stride_kl,
    stride_vb, stride_vh, stride_vl,
    stride_ob, stride_oh, stride_ol,
    H, LQ, CQ, CK, MAXK, TILES,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr,
    RETURN_LSE: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    t = tl.program_id(0)
    bh = tl.program_id(1)
    cluster = tl.load(TILE_CLUSTER + bh * TILES + t)
    used = cluster >= 0  # tiles past this (batch, head)'s count: no rows, no keys
    cluster = tl.maximum(cluster, 0)
    row0 = tl.load(TILE_START + bh * TILES + t)
    row_end = tl.minimum(tl.load(Q_OFF + bh * (CQ + 1) + cluster + 1), row0 + BLOCK_M)
    row_end = tl.where(used, row_end, row0)
    count = tl.where(used, tl.load(KV_CNT + bh * CQ + cluster), 0)
    ids_base = KV_IDS + (bh * CQ + cluster).to(tl.int64) * MAXK
    k_off_base = K_OFF + bh * (CK + 1)

    b = (bh // H).to(tl.int64)  # b * stride_qb passes 2**31 elements at large batches of 720p video
    h = bh % H
    offs_m = row0 + tl.arange(0, BLOCK_M)
    row_ok = offs_m < row_end
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_N)
    offs_w = tl.arange(0, CHUNK)
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_ql + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)
    if UPCAST_DOT:
        q = q.to(tl.float32)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh

    m_i = tl.full([BLOCK_M], _NEG_BIG, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for j0 in range(0, count, CHUNK):
        slot_ok = j0 + offs_w < count
        ids = tl.load(ids_base + j0 + offs_w, mask=slot_ok, other=0)
        lo = tl.load(k_off_base + ids, mask=slot_ok, other=0)
        size = tl.load(k_off_base + ids + 1, mask=slot_ok, other=0) - lo
        ends = tl.cumsum(size, 0)
        starts = ends - size          # where each cluster begins in the chunk's virtual stream
        shift = lo - starts           # source row = stream position + shift of its cluster
        total = tl.sum(size, 0)
        for n0 in range(0, total, BLOCK_N):
            pos = n0 + offs_n
            inside = (pos[:, None] >= starts[None, :]) & (pos[:, None] < ends[None, :])  # empty clusters: never
            key_ok = pos < total
            rows = tl.where(key_ok, pos + tl.sum(tl.where(inside, shift[None, :], 0), 1), 0)
            k = tl.load(k_base + rows[None, :] * stride_kl + offs_d[:, None])
            v = tl.load(v_base + rows[:, None] * stride_vl + offs_d[None, :])
            if UPCAST_DOT:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            s = tl.dot(q, k)
            if n0 + BLOCK_N > total:  # only the chunk's last tile has slots past its keys (they read row 0)
                s = tl.where(key_ok[None, :], s, float("-inf"))
            m_i, l_i, acc, _ = _softmax_update(s, v, qk_scale, m_i, l_i, acc)

    out, lse = _row_results(acc, m_i, l_i)
    o_ptrs = O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ol + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None])
    if RETURN_LSE:
        tl.store(LSE + bh.to(tl.int64) * LQ + offs_m, lse, mask=row_ok)


def tile_config(head_dim: int, q_length: int, q_clusters: int, device: torch.device) -> dict:
    """Tile shapes and pipelining per GPU and mean query-cluster size (benchmarks/cluster_attention.py sweeps
    the candidates)."""
    if device.type != "cuda":  # Triton's CPU interpreter (tests): small tiles, so small inputs cross every edge
        return dict(BLOCK_M=16, BLOCK_N=16, CHUNK=4, num_warps=4, num_stages=1)
    # The last tile of each query cluster is partial (BLOCK_M / 2 idle rows on average): 64-row tiles (one
    # Hopper warpgroup) unless the clusters are long enough for 128-row tiles to waste under ~6%.
    if q_length >= 8 * 128 * q_clusters:
        return dict(BLOCK_M=128, BLOCK_N=64, CHUNK=16, num_warps=8, num_stages=2)
    # 64-wide key tiles: 128-wide ones spill registers at head_dim 128 (ptxas, sm_80 and sm_90). Three stages on
    # Hopper: 97.6 ms against 109.1 ms with two at the Wan 14B 720p shape, ragged 25% (H100, 2026-11-23).
    hopper = torch.cuda.get_device_capability(device)[0] >= 9
    return dict(BLOCK_M=64, BLOCK_N=64, CHUNK=16, num_warps=4, num_stages=3 if head_dim <= 64 or hopper else 2)


def query_tiles(q_offsets: torch.Tensor, block_m: int, q_length: int):
    """Tile table of the query clusters: (cluster (B, H, T) int32, -1 past the last tile; first row (B, H, T)
    int32; T), each cluster cut into block_m-row tiles in order. T is a bound from shapes alone (no sync)."""
    offsets = q_offsets.long()
    sizes = offsets[..., 1:] - offsets[..., :-1]
    num_clusters = sizes.shape[-1]
    tiles_per_cluster = (sizes + block_m - 1) // block_m
    ends = tiles_per_cluster.cumsum(-1)
    bound = max(1, min(q_length, (q_length + num_clusters * (block_m - 1)) // block_m))
    t = torch.arange(bound, device=q_offsets.device).expand(*sizes.shape[:-1], bound).contiguous()
    cluster = torch.searchsorted(ends.contiguous(), t, right=True).clamp(max=num_clusters - 1)
    first_tile = ends.gather(-1, cluster) - tiles_per_cluster.gather(-1, cluster)
    start = offsets.gather(-1, cluster) + (t - first_tile) * block_m
    cluster = torch.where(t < ends[..., -1:], cluster, -1)
    return cluster.to(torch.int32).contiguous(), start.to(torch.int32).contiguous(), bound


def triton_cluster_attention(q, k, v, q_offsets, k_offsets, kv_clusters, kv_cluster_counts, *, scale,
                             out=None, return_lse=False, config=None):
    """Launch the kernel. Inputs are assumed validated; head_dim must be a power of two in [16, 128].

    ``config``: BLOCK_M, BLOCK_N, CHUNK (key clusters per chunk), num_warps, num_stages; default per GPU.
    """
    B, H, LQ, D = q.shape
    CQ = q_offsets.shape[-1] - 1
    CK = k_offsets.shape[-1] - 1
    MAXK = kv_clusters.shape[-1]
    cfg = dict(config) if config is not None else tile_config(D, LQ, CQ, q.device)
    if out is None:
        out = torch.empty(B, H, LQ, D, device=q.device, dtype=q.dtype)
    lse = torch.empty(B, H, LQ, device=q.device, dtype=torch.float32) if return_lse else out  # dummy when unused
    q_off, k_off, ids, counts = (t.to(torch.int32).contiguous()
                                 for t in (q_offsets, k_offsets, kv_clusters, kv_cluster_counts))
    if MAXK == 0:  # every count is 0: one unused slot gives the kernel a real pointer
        ids, MAXK = torch.zeros(B, H, CQ, 1, dtype=torch.int32, device=q.device), 1
    tile_cluster, tile_start, tiles = query_tiles(q_off, cfg["BLOCK_M"], LQ)
    _cluster_fwd[(tiles, B * H)](
        q, k, v, out, lse, q_off, k_off, ids, counts, tile_cluster, tile_start, scale * _LOG2E,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        H, LQ, CQ, CK, MAXK, tiles,
        HEAD_DIM=D, RETURN_LSE=return_lse,
        # Triton's CPU interpreter computes bfloat16 tl.dot wrongly (3.6 and 3.8): float32 tiles there.
        UPCAST_DOT=q.device.type == "cpu", **cfg)
    return (out, lse) if return_lse else out
