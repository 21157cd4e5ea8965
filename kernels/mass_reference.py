"""Torch reference for the block-mass kernel: the CPU path and the oracle the Triton kernel is tested against.

Same contract as :func:`kernels.block_mass`, computed in float32 a chunk of query blocks at a time, so memory
stays O(chunk x L), never L x L. ``full_layout``: the layout of dense attention on the block-sparse kernel.
"""

from __future__ import annotations

import math

import torch

from .layout import num_blocks

_CHUNK_ELEMENTS = 1 << 25  # float32 scores of one chunk


def full_layout(num_q_blocks: int, num_kv_blocks: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """A layout keeping every key block for every query block, shared by all batch elements and heads."""
    indices = torch.arange(num_kv_blocks, device=device, dtype=torch.int32).expand(1, 1, num_q_blocks, -1)
    counts = torch.full((1, 1, num_q_blocks), num_kv_blocks, device=device, dtype=torch.int32)
    return indices.contiguous(), counts


def reference_block_mass(q, k, lse, *, block_size, scale=None, kv_length=None):
    """(B, H, NQB, NKB) float32: sum over each tile of exp(q.k * scale - lse[row]); rows with an LSE of -inf and
    keys at or past kv_length[b] add nothing."""
    B, H, LQ, D = q.shape
    LK = k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    nqb, nkb = num_blocks(LQ, block_size), num_blocks(LK, block_size)
    key_limit = torch.full((B,), LK, device=q.device) if kv_length is None \
        else kv_length.to(device=q.device, dtype=torch.long).clamp(max=LK)
    key_ok = torch.arange(nkb * block_size, device=q.device)[None, :] < key_limit[:, None]  # (B, NKB * bs)
    kf = torch.nn.functional.pad(k.float(), (0, 0, 0, nkb * block_size - LK))
    lse = lse.float()
    mass = torch.empty(B, H, nqb, nkb, device=q.device, dtype=torch.float32)
    chunk = max(1, _CHUNK_ELEMENTS // max(1, B * H * block_size * nkb * block_size))
    for qb0 in range(0, nqb, chunk):
        qb1 = min(nqb, qb0 + chunk)
        r0, r1 = qb0 * block_size, min(LQ, qb1 * block_size)
        pad = (qb1 - qb0) * block_size - (r1 - r0)
        s = torch.matmul(torch.nn.functional.pad(q[:, :, r0:r1].float(), (0, 0, 0, pad)), kf.transpose(-1, -2))
        row_lse = torch.nn.functional.pad(lse[:, :, r0:r1], (0, pad), value=float("-inf"))
        ok = key_ok[:, None, None, :] & torch.isfinite(row_lse)[..., None]
        p = torch.where(ok, torch.exp(s * scale - torch.where(ok, row_lse[..., None], 0.0)), 0.0)
        mass[:, :, qb0:qb1] = p.view(B, H, qb1 - qb0, block_size, nkb, block_size).sum(dim=(3, 5))
    return mass

