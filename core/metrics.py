"""Quality measures of a sparse layout against dense attention."""

from __future__ import annotations

import math

import torch


def block_attention_mass(q: torch.Tensor, k: torch.Tensor, block_size: int, scale: float | None = None,
                         query_chunk: int = 1024) -> torch.Tensor:
    """Exact dense attention probability summed per (query block, key block): (B, H, NQB, NKB) float32.

    Each query row's probabilities sum to 1, so a row of blocks sums to the number of queries in the block.
    Computed a chunk of queries at a time: memory O(chunk x L), never L x L.
    """
    B, H, LQ, D = q.shape
    LK = k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    nqb, nkb = -(-LQ // block_size), -(-LK // block_size)
    chunk = max(block_size, query_chunk // block_size * block_size)
    key_block = torch.arange(LK, device=q.device) // block_size
    mass = torch.zeros(B, H, nqb, nkb, device=q.device, dtype=torch.float32)
    for start in range(0, LQ, chunk):
        stop = min(LQ, start + chunk)
        p = torch.softmax(torch.matmul(q[:, :, start:stop].float(), k.float().transpose(-1, -2)) * scale, dim=-1)
        per_key_block = torch.zeros(B, H, stop - start, nkb, device=q.device).index_add_(3, key_block, p)
        query_block = (torch.arange(start, stop, device=q.device) // block_size) - start // block_size
        rows = torch.zeros(B, H, -(-(stop - start) // block_size), nkb, device=q.device)
        rows.index_add_(2, query_block, per_key_block)
        mass[:, :, start // block_size: start // block_size + rows.shape[2]] += rows
    return mass


def attention_recall(mass: torch.Tensor, block_mask: torch.Tensor) -> float:
    """Fraction of the true attention mass that a layout keeps (1.0 = nothing lost)."""
    kept = (mass * block_mask.to(mass.dtype)).sum()
    return float(kept / mass.sum())


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    return float((approx.float() - exact.float()).norm() / exact.float().norm())
