"""Triton forward kernel for cluster attention: ragged query clusters, each over its own ragged key clusters.

Why this shape (SVG2 at Wan 720p: 75,600 tokens, ~300 query clusters of ~250 rows, ~1000 key clusters of ~75):

* Query side: a tile table, built on the device before the launch, cuts every query cluster into BLOCK_M-row
  tiles; one program owns one tile. A tile never mixes clusters (its rows share one key list), so the only
  query-side waste is the last, partial tile of each cluster. On Hopper two launches share the work: 128-row
  tiles (each K/V tile loaded serves twice the rows of a 64-row tile) and, for a cluster's last rows when they
  are 64 or fewer, one 64-row tile, so a cluster wastes at most 63 rows (about 32 on average, where one 128-row
  launch wastes about 64). Each grid has a static bound of tiles per (batch, head), computed from shapes alone
  (no device sync); unused table entries are masked out and cost one load.
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
* Tokens in their own order (GATHER, SVG2's path): a position of the cluster order becomes a row through the
  cluster order (one int32 per query row per program, one per key slot per tile, from L2), so q, k, v are never
  copied into cluster order and the output rows (and LSE) are written straight to their tokens. The loads were
  per-row gathers already (key clusters are ragged); each row is still one contiguous head_dim vector.

Work computed over useful pairs: about (1 + wasted rows per cluster / mean query-cluster size) x (1 + (BLOCK_N / 2)
/ (CHUNK x mean key-cluster size)); at SVG2's 720p sizes (252-row query, 76-token key clusters), CHUNK 16 and
32-key tiles, 1.13 x 1.01.

No Hopper-only feature is used: Hopper's TMA copies boxes of consecutive rows, and the virtual key stream is
not consecutive across cluster boundaries.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .block_sparse_triton import (_LOG2E, _LOG2E_C, _NEG_BIG, _compensation_args, _finish_rows, _row_results,
                                  _softmax_update, _softmax_update_scaled)


@triton.jit
def _cluster_fwd(
    Q, K, V, O, LSE, Q_OFF, K_OFF, KV_IDS, KV_CNT, TILE_CLUSTER, TILE_START, KM, VM, LOGN, LSE_C, KEPT, Q_ORD, K_ORD,
    OWN, OWN_CNT, S_CENTRE, S_LOGW, S_KEY, S_VAL, S_SLOPE,
    qk_scale,
    stride_qb, stride_qh, stride_ql,
    stride_kb, stride_kh, stride_kl,
    stride_vb, stride_vh, stride_vl,
    stride_ob, stride_oh, stride_ol,
    H, LQ, CQ, CK, MAXK, TILES, G, NQ, NK, M_OWN,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr,
    RETURN_LSE: tl.constexpr, UPCAST_DOT: tl.constexpr, COMPENSATE: tl.constexpr, BLOCK_P: tl.constexpr,
    GATHER: tl.constexpr, SUMMARY: tl.constexpr,
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
    offs_m = row0 + tl.arange(0, BLOCK_M)  # positions in cluster order
    row_ok = offs_m < row_end
    rows_m = _token_rows(Q_ORD, bh, offs_m, row_ok, NQ, GATHER)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_N)
    offs_w = tl.arange(0, CHUNK)
    q = tl.load(Q + b * stride_qb + h * stride_qh + rows_m[:, None] * stride_ql + offs_d[None, :],
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
            rows = _token_rows(K_ORD, bh, rows, key_ok, NK, GATHER)
            k = tl.load(k_base + rows[None, :] * stride_kl + offs_d[:, None])
            v = tl.load(v_base + rows[:, None] * stride_vl + offs_d[None, :])
            if UPCAST_DOT:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            s = tl.dot(q, k)
            if n0 + BLOCK_N > total:  # only the chunk's last tile has slots past its keys (they read row 0)
                s = tl.where(key_ok[None, :], s, float("-inf"))
            m_i, l_i, acc, _ = _softmax_update(s, v, qk_scale, m_i, l_i, acc)

    lse_rows = bh.to(tl.int64) * LQ + rows_m
    if SUMMARY:  # the listed skipped clusters' own terms, then the rest's one (kernels/skipped_summary.py)
        out, lse = _row_results(acc, m_i, l_i)
        at = (bh * CQ + cluster).to(tl.int64)
        m_i, l_i, acc = _compensate_listed(q, KM, VM, LOGN, bh, G, OWN + at * M_OWN, tl.load(OWN_CNT + at),
                                           qk_scale, m_i, l_i, acc, HEAD_DIM, BLOCK_P, UPCAST_DOT)
        m_i, l_i, acc = _compensate_rest(q, S_CENTRE, S_LOGW, S_KEY, S_VAL, S_SLOPE, at, qk_scale, m_i, l_i, acc,
                                         HEAD_DIM, UPCAST_DOT)
        out, lse_c = _row_results(acc, m_i, l_i)
        if RETURN_LSE:
            tl.store(LSE_C + lse_rows, lse_c, mask=row_ok)
    else:
        out, lse = _finish_rows(q, KM, VM, LOGN, LSE_C, bh, G, KEPT + (bh * CQ + cluster).to(tl.int64) * G,
                                qk_scale, m_i, l_i, acc, lse_rows, row_ok, HEAD_DIM, BLOCK_P, UPCAST_DOT, COMPENSATE,
                                RETURN_LSE)
    o_ptrs = O + b * stride_ob + h * stride_oh + rows_m[:, None] * stride_ol + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None])
    if RETURN_LSE:
        tl.store(LSE + bh.to(tl.int64) * LQ + rows_m, lse, mask=row_ok)


@triton.jit
def _compensate_listed(q, KM, VM, LOGN, bh, G, ids_row, count, qk_scale, m_i, l_i, acc,
                       HEAD_DIM: tl.constexpr, BLOCK_P: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """Fold the pooled key groups listed at ``ids_row`` (``count`` of them) into the online softmax, one virtual key
    each (score q.k_mean * scale + ln(size), value v_mean), BLOCK_P at a time: _compensate_skipped over a short
    list instead of every group."""
    offs_p = tl.arange(0, BLOCK_P)
    offs_d = tl.arange(0, HEAD_DIM)
    base = bh.to(tl.int64) * G
    for p0 in range(0, count, BLOCK_P):
        listed = p0 + offs_p < count
        groups = base + tl.load(ids_row + p0 + offs_p, mask=listed, other=0)
        log_size = tl.load(LOGN + groups, mask=listed, other=float("-inf"))
        km = tl.load(KM + groups[None, :] * HEAD_DIM + offs_d[:, None], mask=listed[None, :], other=0.0)
        vm = tl.load(VM + groups[:, None] * HEAD_DIM + offs_d[None, :], mask=listed[:, None], other=0.0)
        if UPCAST_DOT:
            km = km.to(tl.float32)
            vm = vm.to(tl.float32)
        t = tl.dot(q, km) * qk_scale + (log_size * _LOG2E_C)[None, :]
        m_i, l_i, acc = _softmax_update_scaled(t, vm, m_i, l_i, acc)
    return m_i, l_i, acc


@triton.jit
def _compensate_rest(q, S_CENTRE, S_LOGW, S_KEY, S_VAL, S_SLOPE, at, qk_scale, m_i, l_i, acc,
                     HEAD_DIM: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """Fold the rest's virtual key of query cluster ``at`` into the online softmax: score ln W + (q - c).k_w * scale,
    value v_w + (q - c) @ slope, a value of its own in every row (kernels/skipped_summary.py). Nothing rests: ln W
    is -inf and the term adds nothing."""
    offs_d = tl.arange(0, HEAD_DIM)
    vec = at * HEAD_DIM + offs_d
    delta = q.to(tl.float32) - tl.load(S_CENTRE + vec)[None, :]
    t = tl.load(S_LOGW + at) * _LOG2E_C + tl.sum(delta * tl.load(S_KEY + vec)[None, :], 1) * qk_scale
    m_new = tl.maximum(m_i, t)
    p = tl.math.exp2(t - m_new)
    alpha = tl.math.exp2(m_i - m_new)
    slope = tl.load(S_SLOPE + at * HEAD_DIM * HEAD_DIM + offs_d[:, None] * HEAD_DIM + offs_d[None, :])
    if UPCAST_DOT:
        slope = slope.to(tl.float32)
    acc = acc * alpha[:, None] + p[:, None] * tl.load(S_VAL + vec)[None, :]
    acc = tl.dot((delta * p[:, None]).to(slope.dtype), slope, acc)
    return m_new, l_i * alpha + p, acc


@triton.jit
def _token_rows(ORDER, bh, positions, ok, N, GATHER: tl.constexpr):
    """The rows of ``positions`` of the cluster order: order[position] for the N clustered ones, the position
    itself after them (and for every position without GATHER: tokens already in cluster order)."""
    if GATHER:
        clustered = positions < N
        rows = tl.load(ORDER + bh.to(tl.int64) * N + positions, mask=ok & clustered, other=0)
        return tl.where(clustered, rows, positions)
    return positions


def tile_config(head_dim: int, device: torch.device) -> list[dict]:
    """One config per launch (benchmarks/cluster_attention.py sweeps the candidates). The first launch cuts every
    query cluster into BLOCK_M-row tiles; a second one, when present, takes each cluster's last rows as one
    tile of its smaller BLOCK_M whenever they fit in it."""
    if device.type != "cuda":  # Triton's CPU interpreter (tests): small tiles, so small inputs cross every edge
        return [dict(BLOCK_M=32, BLOCK_N=16, CHUNK=4, num_warps=4, num_stages=1),
                dict(BLOCK_M=16, BLOCK_N=16, CHUNK=4, num_warps=4, num_stages=1)]
    if torch.cuda.get_device_capability(device)[0] >= 9:
        # H100, Wan 14B 720p shape, ragged 25% (benchmarks/cluster_attention.py --configs, 2026-11-23): 93.5 ms
        # against 102.8 for 64-row tiles alone and 100.9 for 128-row tiles alone. 32-key tiles for the 128-row
        # launch: 64-key ones spill registers there.
        launches = [dict(BLOCK_M=128, BLOCK_N=32, CHUNK=16, num_warps=4, num_stages=3),
                    dict(BLOCK_M=64, BLOCK_N=64, CHUNK=16, num_warps=4, num_stages=3)]
    else:  # not measured before Hopper: one launch of 64-row tiles (128-wide key tiles spill at head_dim 128)
        launches = [dict(BLOCK_M=64, BLOCK_N=64, CHUNK=16, num_warps=4, num_stages=3 if head_dim <= 64 else 2)]
    limit = _max_shared_memory(device.index if device.index is not None else torch.cuda.current_device())
    return [_fit_stages(cfg, head_dim, limit) for cfg in launches]


def _fit_stages(cfg: dict, head_dim: int, limit: int) -> dict:
    """Fewer pipeline stages where a block's shared memory cannot hold them: the query tile plus K and V tiles per
    stage, 2-byte elements (an A100 has 163 KB, a consumer GPU ~99 KB, an H100 227 KB)."""
    stages = cfg["num_stages"]
    while stages > 1 and 2 * head_dim * (cfg["BLOCK_M"] + 2 * stages * cfg["BLOCK_N"]) > limit:
        stages -= 1
    return dict(cfg, num_stages=stages)


@functools.lru_cache(maxsize=None)
def _max_shared_memory(device_index: int) -> int:
    return triton.runtime.driver.active.utils.get_device_properties(device_index)["max_shared_mem"]


def query_tiles(q_offsets: torch.Tensor, block_m: int, q_length: int, last_block_m: int | None = None):
    """Tile tables of the query clusters, each (cluster (B, H, T) int32, -1 past the last tile; first row
    (B, H, T) int32; T), T a bound from shapes alone (no sync).

    Without ``last_block_m``: one table, every cluster cut into block_m-row tiles in order. With it: two tables;
    a cluster's last rows, when there are at most last_block_m of them, go to the second table (one tile of
    last_block_m rows) instead of a block_m-row tile of the first."""
    offsets = q_offsets.long()
    sizes = offsets[..., 1:] - offsets[..., :-1]
    if last_block_m is not None and not 0 < last_block_m < block_m:
        raise ValueError(f"last_block_m must lie in [1, block_m - 1] = [1, {block_m - 1}], got {last_block_m}")
    bound = min(q_length, (q_length + sizes.shape[-1] * (block_m - 1)) // block_m)  # ceil(size / block_m), summed
    if last_block_m is None:
        return [_tile_table(offsets, (sizes + block_m - 1) // block_m, block_m, bound)]
    rest = sizes % block_m
    short = (rest > 0) & (rest <= last_block_m)
    long_bound = min(bound, q_length // (last_block_m + 1))  # each of these tiles holds more than last_block_m rows
    long_tiles = _tile_table(offsets, sizes // block_m + (rest > last_block_m).long(), block_m, long_bound)
    short_tiles = _tile_table(offsets[..., :-1] + sizes // block_m * block_m, short.long(), block_m,
                              min(sizes.shape[-1], q_length))
    return [long_tiles, short_tiles]


def _tile_table(first_rows, per_cluster, block_m, bound):
    """Tile t of a (batch, head) belongs to the cluster c whose range of per_cluster counts holds it, and starts at
    first_rows[c] + block_m x (its index within c)."""
    bound = max(1, bound)
    ends = per_cluster.cumsum(-1)
    num_clusters = per_cluster.shape[-1]
    t = torch.arange(bound, device=per_cluster.device).expand(*per_cluster.shape[:-1], bound).contiguous()
    cluster = torch.searchsorted(ends.contiguous(), t, right=True).clamp(max=num_clusters - 1)
    first_tile = ends.gather(-1, cluster) - per_cluster.gather(-1, cluster)
    start = first_rows.gather(-1, cluster) + (t - first_tile) * block_m
    cluster = torch.where(t < ends[..., -1:], cluster, -1)
    return cluster.to(torch.int32).contiguous(), start.to(torch.int32).contiguous(), bound


def triton_cluster_attention(q, k, v, q_offsets, k_offsets, kv_clusters, kv_cluster_counts, *, scale,
                             out=None, return_lse=False, config=None, pooled=None, summary=None, q_order=None,
                             k_order=None):
    """Launch the kernel. Inputs are assumed validated; head_dim must be a power of two in [16, 128].

    ``config``: BLOCK_M, BLOCK_N, CHUNK (key clusters per chunk), num_warps, num_stages for one launch over every
    query tile, or a list of two such dicts (query_tiles' two tables: the second's BLOCK_M takes each cluster's
    last rows when they fit); default per GPU (tile_config).
    ``pooled``: PooledKeys of the key clusters (head dim as q's): each row also gets the pooled term of every key
    cluster its list skips; with return_lse the result is then (out, exact LSE, compensated LSE). With ``summary``
    (kernels/skipped_summary.py, head dim as q's) only the clusters it lists, and one term for the rest.
    ``q_order`` / ``k_order``: tokens in their own order (kernels.cluster_block_attention); both or neither.
    """
    B, H, LQ, D = q.shape
    CQ = q_offsets.shape[-1] - 1
    CK = k_offsets.shape[-1] - 1
    MAXK = kv_clusters.shape[-1]
    launches = tile_config(D, q.device) if config is None else [config] if isinstance(config, dict) else config
    if out is None:
        out = torch.empty(B, H, LQ, D, device=q.device, dtype=q.dtype)
    lse = torch.empty(B, H, LQ, device=q.device, dtype=torch.float32) if return_lse else out  # dummy when unused
    q_off, k_off, ids, counts = (t.to(torch.int32).contiguous()
                                 for t in (q_offsets, k_offsets, kv_clusters, kv_cluster_counts))
    if MAXK == 0:  # every count is 0: one unused slot gives the kernel a real pointer
        ids, MAXK = torch.zeros(B, H, CQ, 1, dtype=torch.int32, device=q.device), 1
    compensation = _compensation_args(pooled, q, return_lse, lse, ids if summary is None else None, counts)
    summarised = _summary_args(summary, lse)
    gather = q_order is not None
    if gather != (k_order is not None):
        raise ValueError("give both q_order and k_order (tokens in their own order), or neither")
    q_ord, k_ord = (t.contiguous() for t in (q_order, k_order)) if gather else (q_off, q_off)  # dummies: not read
    last_block_m = launches[1]["BLOCK_M"] if len(launches) > 1 else None
    tables = query_tiles(q_off, launches[0]["BLOCK_M"], LQ, last_block_m)
    for cfg, (tile_cluster, tile_start, tiles) in zip(launches, tables):
        _cluster_fwd[(tiles, B * H)](
            q, k, v, out, lse, q_off, k_off, ids, counts, tile_cluster, tile_start, *compensation["tensors"], q_ord, k_ord,
            *summarised["tensors"], scale * _LOG2E,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            out.stride(0), out.stride(1), out.stride(2),
            H, LQ, CQ, CK, MAXK, tiles, compensation["groups"],
            q_ord.shape[-1] if gather else 0, k_ord.shape[-1] if gather else 0, summarised["width"],
            HEAD_DIM=D, RETURN_LSE=return_lse, GATHER=gather, SUMMARY=summary is not None,
            # Triton's CPU interpreter computes bfloat16 tl.dot wrongly (3.6 and 3.8): float32 tiles there.
            UPCAST_DOT=q.device.type == "cpu", **compensation["constants"], **cfg)
    if not return_lse:
        return out
    return (out, lse, compensation["lse"]) if pooled is not None else (out, lse)


def _summary_args(summary, dummy) -> dict:
    """Kernel arguments of a SkippedSummary: its tensors, contiguous, and the listed width; dummies without one."""
    if summary is None:
        return dict(tensors=(dummy,) * 7, width=0)
    tensors = (summary.own, summary.own_counts, summary.centre, summary.log_weight, summary.key, summary.value,
               summary.slope)
    return dict(tensors=tuple(t.contiguous() for t in tensors), width=summary.own.shape[-1])
