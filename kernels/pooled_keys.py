"""Pooled statistics of key groups, for the compensation of the keys a sparse layout skips.

A query row's attention over a group of n keys with mean key k_mean and mean value v_mean is, to first order,
n exp(q.k_mean * scale) in the softmax denominator and that times v_mean in the numerator: one virtual key of
score q.k_mean * scale + ln(n) and value v_mean. The kernels add that virtual key for every group a row skips,
in the same online softmax as the exact keys, so rows stay normalised and nothing the layout drops is lost whole.

Groups are the layout's key blocks (fixed-block layouts) or key clusters (SVG2's contiguous runs in cluster
order). Padding keys (past kv_length, or past the last cluster offset) belong to no group; an empty group has
ln(0) = -inf and adds nothing. Cost: one pass over k and v (O(L * D)), once per call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PooledKeys:
    """Per (batch, head, group): mean key (B, H, G, D), mean value (B, H, G, D) (the keys' dtype, what the
    kernels multiply in) and the natural log of the group size (B, H, G) float32, -inf for an empty group."""

    keys: torch.Tensor
    values: torch.Tensor
    log_size: torch.Tensor

    @property
    def groups(self) -> int:
        return self.log_size.shape[-1]


def pool_key_blocks(k: torch.Tensor, v: torch.Tensor, block_size: int, kv_length=None,
                    backend: str = "auto") -> PooledKeys:
    """Pooled statistics of the key blocks of (B, H, LK, D) k, v: block j is keys j*block_size.. (the last one
    partial); keys at or past kv_length[b] are padding and count in no block. ``backend`` as the kernels'."""
    if _use_triton(k, backend):
        from .pooled_keys_triton import triton_pool_groups

        LK = k.shape[2]
        starts = torch.arange(0, LK, block_size, device=k.device, dtype=torch.int32)
        limit = torch.full((k.shape[0],), LK, device=k.device) if kv_length is None else kv_length.to(k.device)
        ends = torch.minimum((starts + block_size)[None, :], limit.clamp(0, LK)[:, None].to(torch.int32))
        return PooledKeys(*triton_pool_groups(k, v, starts.view(1, 1, -1), torch.maximum(ends, starts)[:, None]))
    return reference_pool_key_blocks(k, v, block_size, kv_length)


def pool_key_clusters(k: torch.Tensor, v: torch.Tensor, k_offsets: torch.Tensor, backend: str = "auto",
                      k_order: torch.Tensor | None = None) -> PooledKeys:
    """Pooled statistics of the key clusters of (B, H, LK, D) k, v: cluster c is the positions
    k_offsets[..., c]:k_offsets[..., c + 1] ((B, H, C + 1) offsets) of the cluster order, which is the keys' own
    order or, with ``k_order``, the one it gives (kernels.cluster_block_attention); positions past the last offset
    are in none."""
    if _use_triton(k, backend):
        from .pooled_keys_triton import triton_pool_groups

        return PooledKeys(*triton_pool_groups(k, v, k_offsets[..., :-1], k_offsets[..., 1:], k_order))
    from .cluster_reference import to_cluster_order

    return reference_pool_key_clusters(to_cluster_order(k, k_order), to_cluster_order(v, k_order), k_offsets)


def _use_triton(k: torch.Tensor, backend: str) -> bool:
    from .attention import resolve_backend

    return resolve_backend(backend, k.device, k.dtype) == "triton"


def reference_pool_key_blocks(k: torch.Tensor, v: torch.Tensor, block_size: int, kv_length=None) -> PooledKeys:
    """Torch reference of :func:`pool_key_blocks`."""
    B, H, LK, D = k.shape
    nkb = -(-LK // block_size)
    pad = nkb * block_size - LK
    position = torch.arange(nkb * block_size, device=k.device)
    limit = torch.full((B,), LK, device=k.device, dtype=torch.long) if kv_length is None \
        else kv_length.to(device=k.device, dtype=torch.long).clamp(0, LK)
    valid = (position[None, :] < limit[:, None]).view(B, 1, nkb, block_size, 1)
    sizes = valid.sum(dim=3, dtype=torch.float32)                                    # (B, 1, NKB, 1)

    def mean(t, heads):  # every head has the same blocks
        blocks = torch.nn.functional.pad(t.float(), (0, 0, 0, pad)).view(B, t.shape[1], nkb, block_size, D)
        return (blocks * valid).sum(dim=3) / sizes.clamp(min=1)

    keys, values = _by_heads(mean, k, v, bytes_per_head=B * nkb * block_size * D * 4)
    return PooledKeys(keys, values, sizes[..., 0].log().expand(B, H, nkb).contiguous())


def reference_pool_key_clusters(k: torch.Tensor, v: torch.Tensor, k_offsets: torch.Tensor) -> PooledKeys:
    """Torch reference of :func:`pool_key_clusters`."""
    B, H, LK, D = k.shape
    clusters = k_offsets.shape[-1] - 1
    offsets = k_offsets.long()
    sizes = (offsets[..., 1:] - offsets[..., :-1]).float()                          # (B, H, C)

    def mean(t, heads):  # segment sums as differences of a float64 prefix sum: no scatter, exact enough at any length
        prefix = torch.nn.functional.pad(t.double().cumsum(dim=2), (0, 0, 1, 0))   # (B, h, LK + 1, D)
        ends = prefix.gather(2, offsets[:, heads, :, None].expand(B, t.shape[1], clusters + 1, D))
        return (ends[:, :, 1:] - ends[:, :, :-1]) / sizes[:, heads].clamp(min=1)[..., None]

    keys, values = _by_heads(mean, k, v, bytes_per_head=B * (LK + 1) * D * 8)
    return PooledKeys(keys, values, sizes.log().contiguous())


# Pooling works on float copies of this many bytes at a time (a few heads), not on whole-tensor copies of k and v.
CHUNK_BYTES = 64 << 20


def _by_heads(mean, k, v, *, bytes_per_head: int):
    """(mean of k, mean of v) in k's / v's dtype, computed a few heads at a time by ``mean(t[:, heads], heads)``."""
    H = k.shape[1]
    step = max(1, CHUNK_BYTES // max(1, bytes_per_head))
    parts = []
    for t in (k, v):
        chunks = [mean(t[:, h0:h0 + step], slice(h0, h0 + step)) for h0 in range(0, H, step)]
        parts.append(torch.cat(chunks, dim=1).to(t.dtype))
    return parts
