"""Torch references of the k-means kernels (kmeans_triton.py): same contracts, computed with torch ops.

They are the CPU path and the oracle the Triton kernels are tested against. Distances follow the Triton kernel's
numerics (centroids rounded to x's dtype, ||c||^2 of the rounded centroids, float32 products), so labels agree
except where two centroids are within float32 rounding of each other.
"""

from __future__ import annotations

import torch

# Upper bound on the float32 distance buffer of one chunk of points (elements).
_CHUNK_ELEMENTS = 1 << 24


def reference_assign(x, centroids):
    """Labels (B, H, N) int32 and squared distances (B, H, N) float32 of the nearest centroid (first on ties)."""
    B, H, N, D = x.shape
    K = centroids.shape[2]
    c = centroids.to(x.dtype).float()
    c_sq = c.square().sum(-1)
    labels = torch.empty(B, H, N, device=x.device, dtype=torch.int32)
    dist = torch.empty(B, H, N, device=x.device, dtype=torch.float32)
    step = max(1, _CHUNK_ELEMENTS // max(1, B * H * K))
    for n0 in range(0, N, step):
        xc = x[:, :, n0:n0 + step].float()
        d = c_sq[:, :, None, :] - 2.0 * torch.matmul(xc, c.transpose(-1, -2))
        best, idx = d.min(dim=-1)  # torch.min returns the first index of the minimum
        labels[:, :, n0:n0 + step] = idx.to(torch.int32)
        dist[:, :, n0:n0 + step] = (best + xc.square().sum(-1)).clamp_min(0.0)
    return labels, dist


def reference_update(x, order, offsets, centroids, seeds):
    """New centroids (B, H, K, D) float32: cluster means, seed points for empty clusters with a seed >= 0, else
    the old centroids. Members are read from ``order`` / ``offsets`` like the kernel."""
    B, H, N, D = x.shape
    K = centroids.shape[2]
    counts = (offsets[..., 1:] - offsets[..., :-1]).long()                     # (B, H, K)
    # Members are contiguous in sorted order: segment sums as differences of a float64 running sum (deterministic
    # on every device, unlike scatter-adds).
    rows = torch.gather(x.double(), 2, order.long()[..., None].expand(B, H, N, D))
    running = torch.nn.functional.pad(rows.cumsum(2), (0, 0, 1, 0))              # (B, H, N + 1, D)
    bound = offsets.long()[..., None].expand(B, H, K + 1, D)
    sums = torch.gather(running, 2, bound[:, :, 1:]) - torch.gather(running, 2, bound[:, :, :-1])
    means = (sums / counts.clamp_min(1)[..., None]).float()
    seed_rows = torch.gather(x.float(), 2, seeds.long().clamp_min(0)[..., None].expand(B, H, K, D))
    empty = (counts == 0)[..., None]
    fallback = torch.where((seeds >= 0)[..., None], seed_rows, centroids.float())
    return torch.where(empty, fallback, means)
