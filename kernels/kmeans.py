"""Batched k-means over (batch x heads) independent problems, warm-startable, for SVG2's semantic clustering.

One iteration: assign every point to its nearest centroid (Triton: kmeans_triton.py), sort the points by label
(stable: cluster order, sizes and offsets), re-seed empty clusters at the points farthest from their centroids,
and move every centroid to the mean of its points. After the last iteration the labels, the cluster order and the
centroids agree: each centroid is the mean of exactly the points the labels give it, and the order is the
permutation that makes every cluster contiguous.

The first call of a run starts from evenly strided points (deterministic and seed-free, so a run is reproducible);
later ones warm-start from the centroids of the previous step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .attention import resolve_backend
from .kmeans_reference import reference_assign, reference_update

# Empty clusters re-seeded per problem and iteration (the farthest points): a bound that keeps the search a cheap
# top-k. More empties than this (rare: duplicate points) keep their old centroid and are re-seeded the next time.
RESEED_LIMIT = 32
# The counting sort keeps a histogram of this many bins per tile of points in registers: more clusters sort in torch.
COUNTING_SORT_BINS = 4096
# What :func:`cluster_order` holds per point while it runs, besides its labels and the order: the counting sort's
# table of tile starts and its sums; torch's stable sort (int64 indices and CUB's buffers: 44 bytes a point measured
# on an H100, torch 2.11).
COUNTING_SORT_BYTES = 2
TORCH_SORT_BYTES = 48


@dataclass
class KMeansResult:
    """labels (B, H, N) int32: each point's cluster. order (B, H, N) int32: point indices sorted by label (stable).
    offsets (B, H, K + 1) int32: cluster c holds order[offsets[c]:offsets[c + 1]]. centroids (B, H, K, D) float32:
    the mean of each cluster's points (empty clusters: a re-seed point or their previous centroid)."""

    labels: torch.Tensor
    order: torch.Tensor
    offsets: torch.Tensor
    centroids: torch.Tensor

    @property
    def sizes(self) -> torch.Tensor:
        """(B, H, K) int32 points per cluster."""
        return self.offsets[..., 1:] - self.offsets[..., :-1]


def _check_points(x, name="x"):
    if not isinstance(x, torch.Tensor) or x.ndim != 4:
        raise ValueError(f"{name} must be a (batch, heads, points, dim) tensor, got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if not x.is_floating_point() or x.stride(-1) != 1:
        raise ValueError(f"{name} must be a float tensor with a contiguous last dimension, got {x.dtype} with "
                         f"strides {x.stride()}; call .contiguous() first")
    if x.shape[2] == 0 or x.shape[3] == 0:
        raise ValueError(f"{name} must have at least one point and one dimension, got {tuple(x.shape)}")


def _check_centroids(x, centroids, name="centroids"):
    B, H, _, D = x.shape
    if not isinstance(centroids, torch.Tensor) or centroids.ndim != 4 or centroids.shape[:2] != (B, H) \
            or centroids.shape[3] != D or centroids.shape[2] < 1:
        raise ValueError(f"{name} must have shape ({B}, {H}, clusters >= 1, {D}) to match x {tuple(x.shape)}, got "
                         f"{tuple(centroids.shape) if isinstance(centroids, torch.Tensor) else type(centroids).__name__}")
    if centroids.device != x.device:
        raise ValueError(f"{name} is on {centroids.device} but x is on {x.device}; move it to x's device")


def kmeans_assign(x, centroids, *, backend="auto"):
    """Nearest centroid of every point: (labels (B, H, N) int32, squared distances (B, H, N) float32).

    x: (B, H, N, D), any strides with a contiguous last dimension; centroids: (B, H, K, D). Ties go to the lowest
    centroid index."""
    _check_points(x)
    _check_centroids(x, centroids)
    if resolve_backend(backend, x.device, x.dtype) == "reference":
        return reference_assign(x, centroids)
    from .kmeans_triton import triton_assign
    return triton_assign(x, centroids)


def cluster_order(labels, num_clusters: int, *, backend="auto"):
    """(order, offsets) of labels (B, H, N): the stable sort of the points by label, int32, and the (B, H, K + 1)
    int32 start of each cluster in it (offsets[..., -1] = N). On Triton a counting sort (kmeans_triton.py: ~1 byte
    per point besides the order, where torch's sort holds ~44), for fewer than COUNTING_SORT_BINS clusters."""
    if labels.ndim != 3:
        raise ValueError(f"labels must be (batch, heads, points), got {tuple(labels.shape)}")
    # (Labels are integers: the dtype only lets the backend check pass for a kernel that reads no float.)
    if num_clusters < COUNTING_SORT_BINS and resolve_backend(backend, labels.device, torch.bfloat16) == "triton":
        from .kmeans_triton import triton_cluster_order
        return triton_cluster_order(labels, num_clusters)
    sorted_labels, order = torch.sort(labels, dim=-1, stable=True)
    bounds = torch.arange(num_clusters + 1, device=labels.device, dtype=sorted_labels.dtype)
    offsets = torch.searchsorted(sorted_labels, bounds.expand(*labels.shape[:2], -1).contiguous(), out_int32=True)
    del sorted_labels  # before the int32 copy of the (int64) order
    return order.to(torch.int32), offsets


def sort_point_bytes(num_clusters: int, on_gpu: bool) -> int:
    """What :func:`cluster_order` of ``num_clusters`` clusters holds per point besides its labels and the order: the
    counting sort's (``on_gpu``, where the clusters fit it), else torch's sort's."""
    return COUNTING_SORT_BYTES if on_gpu and num_clusters < COUNTING_SORT_BINS else TORCH_SORT_BYTES


def reseed_points(offsets, dist, limit: int = RESEED_LIMIT):
    """(B, H, K) int32: for the j-th empty cluster of a problem (j < limit) the j-th farthest point from its
    centroid (by ``dist``), -1 for every other cluster."""
    counts = offsets[..., 1:] - offsets[..., :-1]
    empty = counts == 0
    take = min(limit, dist.shape[-1])
    farthest = dist.topk(take, dim=-1).indices.to(torch.int32)                # (B, H, take), farthest first
    rank = empty.to(torch.int32).cumsum(-1) - 1
    chosen = torch.gather(farthest, -1, rank.clamp(0, take - 1).long())
    return torch.where(empty & (rank < take), chosen, torch.full_like(chosen, -1))


def kmeans_update(x, order, offsets, centroids, seeds, *, backend="auto", in_place: bool = False):
    """Centroids (B, H, K, D) float32 after one update: see :func:`kmeans_triton.triton_update`. ``in_place``: write
    them over ``centroids`` (float32, contiguous), which then holds the result."""
    _check_points(x)
    _check_centroids(x, centroids)
    B, H, N, _ = x.shape
    K = centroids.shape[2]
    for name, t, shape in (("order", order, (B, H, N)), ("offsets", offsets, (B, H, K + 1)), ("seeds", seeds, (B, H, K))):
        if t.shape != shape or t.dtype != torch.int32 or t.device != x.device:
            raise ValueError(f"{name} must be an int32 tensor of shape {shape} on {x.device}, got {t.dtype} "
                             f"{tuple(t.shape)} on {t.device}")
    if in_place and (centroids.dtype != torch.float32 or not centroids.is_contiguous()):
        raise ValueError("in_place needs float32 contiguous centroids")
    if resolve_backend(backend, x.device, x.dtype) == "reference":
        new = reference_update(x, order, offsets, centroids, seeds)
        return centroids.copy_(new) if in_place else new
    from .kmeans_triton import triton_update
    return triton_update(x, order, offsets, centroids, seeds, in_place=in_place)


def strided_init(x, num_clusters: int):
    """(B, H, K, D) float32 initial centroids: the points at evenly spaced positions (centres of K equal spans).
    Video tokens are frame-major, so they are spread over space and time."""
    N = x.shape[2]
    picks = ((torch.arange(num_clusters, device=x.device, dtype=torch.float64) + 0.5) * N / num_clusters).long()
    return x[:, :, picks].float()


def batched_kmeans(x, num_clusters: int, iterations: int, *, init=None, backend="auto") -> KMeansResult:
    """k-means of every (batch, head) problem of x (B, H, N, D): ``iterations`` rounds of assignment + update,
    from ``init`` centroids (B, H, K, D) (warm start) or, without, from :func:`strided_init`."""
    _check_points(x)
    N = x.shape[2]
    if not isinstance(num_clusters, int) or not 1 <= num_clusters <= N:
        raise ValueError(f"num_clusters must be an integer in [1, {N}] (the number of points), got {num_clusters}; "
                         "lower the number of clusters")
    if not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"iterations must be an integer >= 1, got {iterations}")
    if init is None:
        centroids = strided_init(x, num_clusters)
    else:
        _check_centroids(x, init, "init")
        if init.shape[2] != num_clusters:
            raise ValueError(f"init has {init.shape[2]} centroids but num_clusters is {num_clusters}")
        centroids = init.to(torch.float32, copy=True).contiguous()  # updated in place: never the caller's tensor
    resolve_backend(backend, x.device, x.dtype)  # reject a bad backend before the loop
    # The counting sort on a GPU; Triton's CPU interpreter sorts slowly, so the CPU takes torch's sort.
    sort_backend = "reference" if backend == "reference" else "auto"
    for _ in range(iterations):
        labels = order = None  # the last iteration's, freed before this one's: a planner budgets one of each
        labels, dist = kmeans_assign(x, centroids, backend=backend)
        order, offsets = cluster_order(labels, num_clusters, backend=sort_backend)
        seeds = reseed_points(offsets, dist)
        del dist
        centroids = kmeans_update(x, order, offsets, centroids, seeds, backend=backend, in_place=True)
    return KMeansResult(labels=labels, order=order, offsets=offsets, centroids=centroids)
