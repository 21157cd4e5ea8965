"""Token rows of selected heads gathered into a new token order, and scattered back: the layout transform of
methods that reorder tokens (SVG's temporal heads). Triton on CUDA, a torch reference with the same contract."""

from __future__ import annotations

import torch

from .attention import resolve_backend


def gather_head_rows(x, heads, rows, *, out=None, backend="auto"):
    """out[b, j, t] = x[b, heads[j], rows[t]]: (B, len(heads), len(rows), D).

    Args:
        x: (B, H, L, D), any strides with a contiguous last dimension.
        heads: (NH,) integer tensor of head indices in [0, H) on x's device.
        rows: (LT,) integer tensor of token indices in [0, L) on x's device (a permutation for a reorder).
        out: optional (B, NH, LT, D) buffer of x's dtype (any strides, contiguous last dimension).
        backend: 'auto' (Triton on CUDA for fp16/bf16), 'triton' or 'reference'.
    Index ranges are not read back (that would sync the device): callers pass indices they built.
    """
    shape = _check("x", x, heads, rows)
    if out is None:
        out = torch.empty(shape, device=x.device, dtype=x.dtype)
    _check_buffer("out", out, shape, x)
    if resolve_backend(backend, x.device, x.dtype) == "reference":
        out.copy_(x.index_select(1, heads.long()).index_select(2, rows.long()))
        return out
    from .row_gather_triton import triton_move_rows
    triton_move_rows(x, out, heads.to(torch.int32), rows.to(torch.int32), scatter=False)
    return out


def scatter_head_rows(src, heads, rows, out, *, backend="auto"):
    """out[b, heads[j], rows[t]] = src[b, j, t], in place; the inverse of :func:`gather_head_rows` when rows is a
    permutation. ``out``: (B, H, L, D), any strides with a contiguous last dimension (e.g. a transposed view of a
    (B, L, H, D) tensor); heads and rows must be distinct. Returns ``out``."""
    if not isinstance(out, torch.Tensor) or out.ndim != 4:
        raise ValueError(f"out must be a (B, H, L, D) tensor, got {getattr(out, 'shape', type(out).__name__)}")
    shape = _check("out", out, heads, rows)
    _check_buffer("src", src, shape, out)
    if resolve_backend(backend, out.device, out.dtype) == "reference":
        out[:, heads.long()[:, None], rows.long()[None, :]] = src
        return out
    from .row_gather_triton import triton_move_rows
    triton_move_rows(src, out, heads.to(torch.int32), rows.to(torch.int32), scatter=True)
    return out


def _check(name, x, heads, rows):
    """Shape (B, NH, LT, D) of the compact side; ValueError naming the argument for anything else."""
    if not isinstance(x, torch.Tensor) or x.ndim != 4:
        raise ValueError(f"{name} must be a (B, H, L, D) tensor, got {getattr(x, 'shape', type(x).__name__)}")
    if x.stride(-1) != 1:
        raise ValueError(f"{name} must have a contiguous last (head_dim) dimension; call .contiguous() first")
    for label, t in (("heads", heads), ("rows", rows)):
        if not isinstance(t, torch.Tensor) or t.ndim != 1 or t.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{label} must be a 1-D int32 or int64 tensor, got "
                             f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
        if t.device != x.device:
            raise ValueError(f"{label} is on {t.device} but {name} is on {x.device}; move it to {x.device}")
    return x.shape[0], heads.shape[0], rows.shape[0], x.shape[3]


def _check_buffer(name, t, shape, like):
    if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(shape) or t.dtype != like.dtype \
            or t.device != like.device or t.stride(-1) != 1:
        raise ValueError(f"{name} must be a {tuple(shape)} {like.dtype} tensor on {like.device} with a contiguous "
                         f"last dimension, got {tuple(getattr(t, 'shape', ()))} {getattr(t, 'dtype', None)} on "
                         f"{getattr(t, 'device', None)}")
