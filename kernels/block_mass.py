"""Public entry point for block attention masses (AdaSpa's search): validation, backend choice, head-dim padding.

``block_mass`` is the mass of every (query block, key block) tile against a given per-row LSE.
"""

from __future__ import annotations

import math

import torch

from .attention import (MAX_TRITON_HEAD_DIM, check_block_size, check_kv_length, padded_head_dim, validate_qkv,
                        resolve_backend)
from .mass_reference import reference_block_mass


def block_mass(q, k, lse, *, block_size=64, scale=None, kv_length=None, backend="auto"):
    """Exact attention mass per tile: (B, H, ceil(LQ / block_size), ceil(LK / block_size)) float32,
    mass[b, h, i, j] = sum over rows r of query block i and keys c of key block j of exp(q_r . k_c * scale - lse_r).

    Args:
        q: (B, H, LQ, D); k: (B, H, LK, D). float16 / bfloat16 (float32 on the reference backend), any strides
            with a contiguous last dimension.
        lse: (B, H, LQ) natural-log log-sum-exp per query row (float), e.g. cached from an earlier step. With the
            row's own LSE, every query row's masses sum to 1. Rows with an LSE of -inf add nothing.
        block_size: 64 or 128; kv_length: optional (B,) int, keys at or past kv_length[b] add nothing.
        backend: 'auto' (Triton on CUDA), 'triton' or 'reference'.
    """
    B, H, LQ, D, _ = validate_qkv(q, k, k, None)
    check_block_size(block_size)
    check_kv_length(kv_length, B)
    _check_lse(lse, q)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    if resolve_backend(backend, q.device, q.dtype) == "reference":
        return reference_block_mass(q, k, lse, block_size=block_size, scale=scale, kv_length=kv_length)
    from .block_mass_triton import triton_block_mass

    q, k = _pad_head_dim(D, q, k)
    return _translate_out_of_resources(triton_block_mass, q, k, lse, block_size=block_size, scale=scale,
                                       kv_length=kv_length)


def _check_lse(lse, q):
    B, H, LQ, _ = q.shape
    if not isinstance(lse, torch.Tensor) or lse.shape != (B, H, LQ) or not lse.is_floating_point():
        got = f"{tuple(lse.shape)} {lse.dtype}" if isinstance(lse, torch.Tensor) else type(lse).__name__
        raise ValueError(f"lse must be a ({B}, {H}, {LQ}) float tensor (one log-sum-exp per query row), got {got}")
    if lse.device != q.device:
        raise ValueError(f"lse is on {lse.device} but q is on {q.device}; move it to the queries' device")


def _pad_head_dim(D, *tensors):
    """Zero-pad the head dimension to what the kernels compute with; q.k and the first D outputs are unchanged."""
    if D > MAX_TRITON_HEAD_DIM:
        raise ValueError(f"head_dim {D} is not supported by the Triton kernel (accepted: up to "
                         f"{MAX_TRITON_HEAD_DIM}); use backend='reference'")
    pad = padded_head_dim(D) - D
    return tuple(torch.nn.functional.pad(t, (0, pad)) if pad else t for t in tensors)


def _translate_out_of_resources(launch, *args, **kwargs):
    from triton.runtime.errors import OutOfResources

    try:
        return launch(*args, **kwargs)
    except OutOfResources as why:  # e.g. a GPU with less shared memory per block than the tile needs
        raise ValueError(f"the Triton kernel needs more GPU shared memory than this GPU offers ({why}); use "
                         "backend 'reference'") from why
