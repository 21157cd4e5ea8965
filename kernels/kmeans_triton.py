"""Triton kernels of batched k-means: nearest-centroid assignment and the centroid update (segmented means).

Every (batch, head) pair is an independent problem: its points are the rows of a (B, H, N, D) view (any strides
with a contiguous last dimension, e.g. ComfyUI's (B, N, H, D) memory), its centroids (B * H, K, D).

* Assignment: one program owns a tile of points of one problem, keeps the tile in registers and walks the
  centroids in tiles: distance ||c||^2 - 2 x.c from one tl.dot per tile (fp32 accumulation), running argmin. The
  (N x K) distance matrix never exists. The point's own ||x||^2 is added at the end, giving the squared distance
  the empty-cluster re-seed ranks points by.
* Update: one program owns one cluster of one problem: its members are a contiguous range of the stable order
  of points sorted by label, so their rows are summed in a fixed order (deterministic, no atomics: the same input
  gives bit-identical centroids, so a run is reproducible). Atomics would save the sort, but their float sums
  depend on scheduling; the sort is needed anyway for the permutation.
* Order: a counting sort by label, stable (exact integers: deterministic). One pass counts each tile's labels
  (tl.histogram), torch turns the counts into where each (tile, label) run starts in the order, and a second pass
  sorts each tile in registers by (label, position) and writes every point to its place. torch's stable sort holds
  ~44 bytes per point while it runs (int64 indices and CUB's buffers: 128 MB for one Wan 14B 720p call's keys);
  this holds the int32 order and a table of (tile, label) starts, ~1 byte per point.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _assign_kernel(
    X, C, C_SQ, LABELS, DIST,
    stride_xb, stride_xh, stride_xn,
    H, N, K, D,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)  # b * stride_xb passes 2**31 elements at large batches of 720p video
    h = bh % H
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_n < N
    d_ok = offs_d < D
    x = tl.load(X + b * stride_xb + h * stride_xh + offs_n[:, None] * stride_xn + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    xf = x.to(tl.float32)
    x_sq = tl.sum(xf * xf, 1)
    if UPCAST_DOT:
        x = xf

    best = tl.full([BLOCK_N], float("inf"), dtype=tl.float32)
    best_idx = tl.zeros([BLOCK_N], dtype=tl.int32)
    c_base = C + bh.to(tl.int64) * K * D
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        c_t = tl.load(c_base + offs_k[None, :] * D + offs_d[:, None], mask=k_ok[None, :] & d_ok[:, None], other=0.0)
        if UPCAST_DOT:
            c_t = c_t.to(tl.float32)
        # Centroids past K get +inf, so they never win.
        c_sq = tl.load(C_SQ + bh * K + offs_k, mask=k_ok, other=float("inf"))
        dist = c_sq[None, :] - 2.0 * tl.dot(x, c_t)
        tile_min = tl.min(dist, 1)
        tile_arg = tl.argmin(dist, 1)  # first index among equal distances, like torch.argmin
        better = tile_min < best       # strict: an earlier tile keeps a tie
        best = tl.where(better, tile_min, best)
        best_idx = tl.where(better, tile_arg + k0, best_idx)

    out = bh.to(tl.int64) * N + offs_n
    tl.store(LABELS + out, best_idx, mask=row_ok)
    tl.store(DIST + out, tl.maximum(best + x_sq, 0.0), mask=row_ok)


@triton.jit
def _update_kernel(
    X, ORDER, OFFSETS, OLD, SEEDS, NEW,
    stride_xb, stride_xh, stride_xn,
    H, N, K, D,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    c = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    x_base = X + b * stride_xb + h * stride_xh
    start = tl.load(OFFSETS + bh * (K + 1) + c)
    end = tl.load(OFFSETS + bh * (K + 1) + c + 1)
    order_base = ORDER + bh.to(tl.int64) * N
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for m0 in range(start, end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        ok = rows < end
        tok = tl.load(order_base + rows, mask=ok, other=0)
        acc += tl.load(x_base + tok[:, None] * stride_xn + offs_d[None, :], mask=ok[:, None] & d_ok[None, :],
                       other=0.0).to(tl.float32)
    centroid = tl.sum(acc, 0) / tl.maximum(end - start, 1).to(tl.float32)
    out = bh.to(tl.int64) * K * D + c * D + offs_d
    if end == start:  # empty: re-seed at the given point, or keep the old centroid
        seed = tl.load(SEEDS + bh * K + c)
        if seed >= 0:
            centroid = tl.load(x_base + seed * stride_xn + offs_d, mask=d_ok, other=0.0).to(tl.float32)
        else:
            centroid = tl.load(OLD + out, mask=d_ok, other=0.0)
    tl.store(NEW + out, centroid, mask=d_ok)


@triton.jit
def _tile_histogram_kernel(LABELS, HIST, N, T, BLOCK: tl.constexpr, BINS: tl.constexpr):
    t = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    offs = t * BLOCK + tl.arange(0, BLOCK)
    # Points past N count in the last bin, which no label reaches (BINS > clusters): tl.histogram's mask is newer
    # than the oldest Triton this pack supports.
    labels = tl.load(LABELS + bh * N + offs, mask=offs < N, other=BINS - 1)
    tl.store(HIST + (bh * T + t) * BINS + tl.arange(0, BINS), tl.histogram(labels, BINS))


@triton.jit
def _place_kernel(LABELS, STARTS, ORDER, N, T, BLOCK: tl.constexpr, BINS: tl.constexpr, LOG_BLOCK: tl.constexpr):
    t = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    rank = tl.arange(0, BLOCK)
    offs = t * BLOCK + rank
    labels = tl.load(LABELS + bh * N + offs, mask=offs < N, other=BINS - 1)
    keys = tl.sort((labels << LOG_BLOCK) | rank)  # by label, then by position: stable
    label = keys >> LOG_BLOCK
    real = label < BINS - 1
    # STARTS[t, l]: where tile t's first point of label l goes, less the points of lower labels in the tile (the
    # sorted rank of that first point).
    start = tl.load(STARTS + (bh * T + t) * BINS + label, mask=real, other=0)
    tl.store(ORDER + bh * N + start + rank, t * BLOCK + (keys & (BLOCK - 1)), mask=real)


def _order_config(device: torch.device) -> dict:
    if device.type != "cuda":  # Triton's CPU interpreter sorts slowly: small tiles (and several per test input)
        return dict(BLOCK=64, num_warps=4)
    return dict(BLOCK=4096, num_warps=8)


def triton_cluster_order(labels, num_clusters: int):
    """(order (B, H, N) int32, offsets (B, H, K + 1) int32): the stable sort of the points by label. labels int32 in
    [0, num_clusters), num_clusters < kmeans.COUNTING_SORT_BINS (the bins of a tile live in registers)."""
    B, H, N = labels.shape
    labels = labels.to(torch.int32).contiguous()
    cfg = _order_config(labels.device)
    block = cfg.pop("BLOCK")
    bins = triton.next_power_of_2(num_clusters + 1)
    tiles = triton.cdiv(N, block)
    hist = torch.empty(B * H, tiles, bins, device=labels.device, dtype=torch.int32)
    _tile_histogram_kernel[(tiles, B * H)](labels, hist, N, tiles, BLOCK=block, BINS=bins, **cfg)
    counts = hist.sum(1, dtype=torch.int32)
    cluster_start = counts.cumsum(-1, dtype=torch.int32) - counts
    starts = hist.cumsum(1, dtype=torch.int32).sub_(hist).add_(cluster_start[:, None, :])
    starts -= hist.cumsum(2, dtype=torch.int32).sub_(hist)
    del hist
    order = torch.empty(B, H, N, device=labels.device, dtype=torch.int32)
    _place_kernel[(tiles, B * H)](labels, starts, order, N, tiles, BLOCK=block, BINS=bins,
                                  LOG_BLOCK=block.bit_length() - 1, **cfg)
    return order, cluster_start[:, :num_clusters + 1].reshape(B, H, num_clusters + 1).contiguous()


def _block_d(D: int) -> int:
    return max(16, triton.next_power_of_2(D))


def _assign_config(device: torch.device) -> dict:
    if device.type != "cuda":  # Triton's CPU interpreter (tests): small tiles keep it fast
        return dict(BLOCK_N=32, BLOCK_K=16, num_warps=4, num_stages=1)
    return dict(BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=2)


def triton_assign(x, centroids, *, config=None):
    """Labels (B, H, N) int32 and squared distances (B, H, N) float32 of the nearest centroid.

    x: (B, H, N, D) float16 / bfloat16; centroids (B, H, K, D) any float dtype. The dot runs on centroids rounded
    to x's dtype (tensor cores), and ||c||^2 is taken of those same rounded centroids, so the distance is exactly
    the one to the centroid the dot saw."""
    B, H, N, D = x.shape
    K = centroids.shape[2]
    c_low = centroids.to(x.dtype).reshape(B * H, K, D).contiguous()
    c_sq = c_low.float().square().sum(-1).contiguous()
    labels = torch.empty(B, H, N, device=x.device, dtype=torch.int32)
    dist = torch.empty(B, H, N, device=x.device, dtype=torch.float32)
    cfg = dict(config) if config is not None else _assign_config(x.device)
    grid = (triton.cdiv(N, cfg["BLOCK_N"]), B * H)
    _assign_kernel[grid](x, c_low, c_sq, labels, dist, x.stride(0), x.stride(1), x.stride(2), H, N, K, D,
                         BLOCK_D=_block_d(D), UPCAST_DOT=x.device.type == "cpu", **cfg)
    return labels, dist


def triton_update(x, order, offsets, centroids, seeds, in_place: bool = False):
    """New centroids (B, H, K, D) float32: the mean of each cluster's points, the seed point of an empty cluster
    whose seed is >= 0, else its old centroid. order (B, H, N) int32, offsets (B, H, K + 1) int32, seeds
    (B, H, K) int32. ``in_place``: written over ``centroids`` (float32, contiguous): each program reads only its own
    cluster's old centroid before writing it."""
    B, H, N, D = x.shape
    K = centroids.shape[2]
    old = centroids.float().contiguous()
    new = old if in_place else torch.empty_like(old)
    interpreted = x.device.type == "cpu"
    _update_kernel[(K, B * H)](x, order.contiguous(), offsets.contiguous(), old, seeds.contiguous(), new,
                               x.stride(0), x.stride(1), x.stride(2), H, N, K, D,
                               BLOCK_M=16 if interpreted else 32, BLOCK_D=_block_d(D), num_warps=4)
    return new
