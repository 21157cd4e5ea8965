"""Semantic-aware permutation: q, k, v gathered into cluster order, and the attention output scattered back.

``q_order`` (B, H, NQ) lists, per (batch, head), the token each position of the permuted queries comes from (the
stable sort of the tokens by cluster, kernels.kmeans.cluster_order); ``k_order`` the same for keys and values.
Only the first NQ / NK tokens are permuted: the ones after them (HunyuanVideo's text, which is not clustered)
keep their positions. The Triton kernels permute q, k and v in one launch and scatter the output straight into
the caller's buffer (e.g. a (B, H, L, D) view of ComfyUI's (B, L, H * D) output): no copy on either side.
"""

from __future__ import annotations

import torch

from .attention import resolve_backend


def _full_order(order, length: int):
    """(B, H, length) int64 source index of every row: the order, then the identity for the rows after it."""
    B, H, N = order.shape
    tail = torch.arange(N, length, device=order.device).expand(B, H, -1)
    return torch.cat([order.long(), tail], dim=-1)


def _check_order(order, name, like, length):
    B, H = like.shape[:2]
    if not isinstance(order, torch.Tensor) or order.dtype != torch.int32 or order.ndim != 3 \
            or order.shape[:2] != (B, H) or not 1 <= order.shape[2] <= length or order.device != like.device:
        raise ValueError(f"{name} must be an int32 ({B}, {H}, N) tensor with 1 <= N <= {length} on {like.device}, "
                         f"got {getattr(order, 'dtype', type(order).__name__)} "
                         f"{tuple(order.shape) if isinstance(order, torch.Tensor) else ''}")


def _check_rows(name, t, like):
    if not isinstance(t, torch.Tensor) or t.shape != like.shape or t.dtype != like.dtype or t.device != like.device \
            or t.stride(-1) != 1:
        raise ValueError(f"{name} must be a {like.dtype} tensor of shape {tuple(like.shape)} on {like.device} with a "
                         f"contiguous last dimension, got {getattr(t, 'dtype', type(t).__name__)} "
                         f"{tuple(t.shape) if isinstance(t, torch.Tensor) else ''}")


def permute_qkv(q, k, v, q_order, k_order, *, backend="auto"):
    """Contiguous (B, H, L, D) copies of q in ``q_order`` and of k, v in ``k_order`` (rows past the orders stay).

    q, k, v: (B, H, L, D), any strides with a contiguous last dimension. q_order (B, H, NQ), k_order (B, H, NK):
    int32 permutations of 0..NQ-1 / 0..NK-1 (not checked: reading them back would wait for the device)."""
    if not isinstance(q, torch.Tensor) or q.ndim != 4:
        raise ValueError(f"q must be a (batch, heads, length, dim) tensor, got {getattr(q, 'shape', type(q).__name__)}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_rows(name, t, q)
    L = q.shape[2]
    _check_order(q_order, "q_order", q, L)
    _check_order(k_order, "k_order", q, L)
    if resolve_backend(backend, q.device, q.dtype) == "reference":
        return reference_permute_qkv(q, k, v, q_order, k_order)
    from .permute_triton import triton_permute_qkv
    return triton_permute_qkv(q, k, v, q_order, k_order)


def unpermute_rows(src, order, *, out=None, backend="auto"):
    """The inverse of the query permutation: out[b, h, order[b, h, i]] = src[b, h, i] (rows past the order stay).

    src: (B, H, L, D) rows in cluster order; out: optional (B, H, L, D) buffer, any strides with a contiguous last
    dimension (written in place and returned)."""
    if not isinstance(src, torch.Tensor) or src.ndim != 4 or src.stride(-1) != 1:
        raise ValueError(f"src must be a (batch, heads, length, dim) tensor with a contiguous last dimension, got "
                         f"{getattr(src, 'shape', type(src).__name__)}")
    _check_order(order, "order", src, src.shape[2])
    if out is None:
        out = torch.empty_like(src, memory_format=torch.contiguous_format)
    _check_rows("out", out, src)
    if resolve_backend(backend, src.device, src.dtype) == "reference":
        return reference_unpermute(src, order, out)
    from .permute_triton import triton_unpermute
    return triton_unpermute(src, order, out)


def reference_permute_qkv(q, k, v, q_order, k_order):
    """Torch reference of :func:`permute_qkv`."""
    L, D = q.shape[2:]
    q_idx = _full_order(q_order, L)[..., None].expand(-1, -1, -1, D)
    k_idx = _full_order(k_order, L)[..., None].expand(-1, -1, -1, D)
    return tuple(torch.gather(t, 2, idx).contiguous() for t, idx in ((q, q_idx), (k, k_idx), (v, k_idx)))


def reference_unpermute(src, order, out):
    """Torch reference of :func:`unpermute_rows`."""
    idx = _full_order(order, src.shape[2])[..., None].expand(-1, -1, -1, src.shape[3])
    out.scatter_(2, idx, src)
    return out
