"""Block-sparse layouts: for each (batch, head, query block) a list of key-block indices and a count.

This is the format FlexAttention (``kv_indices`` / ``kv_num_blocks``) and FlashInfer use. The leading
batch and head dimensions of a layout may be 1, in which case the layout is shared (broadcast) across
that dimension: a static Radial layout is stored once, not B x H times.
"""

from __future__ import annotations

import torch


def num_blocks(length: int, block_size: int) -> int:
    return (length + block_size - 1) // block_size


def block_mask_to_indices(block_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., NQB, NKB) bool -> kv_indices (..., NQB, max_kept) int32, kv_counts (..., NQB) int32.

    Kept key blocks of each row come first in ascending order; the padding after ``count`` entries
    repeats the last valid index (or 0 for an empty row) so that it is always in range.
    """
    if block_mask.dtype != torch.bool:
        raise ValueError(f"block_mask must be a bool tensor, got {block_mask.dtype}")
    if block_mask.ndim < 2:
        raise ValueError(f"block_mask must have at least 2 dims (..., NQB, NKB), got shape {tuple(block_mask.shape)}")
    nkb = block_mask.shape[-1]
    counts = block_mask.sum(dim=-1, dtype=torch.int32)
    max_kept = max(int(counts.max().item()) if counts.numel() else 0, 1)
    # A stable sort of "not kept" puts kept columns first, each group in ascending column order.
    order = torch.sort((~block_mask).to(torch.int8), dim=-1, stable=True).indices[..., :max_kept]
    slot = torch.arange(max_kept, device=block_mask.device)
    last = (counts.long() - 1).clamp(min=0).unsqueeze(-1)
    pad_value = torch.gather(order, -1, last)
    pad_value = torch.where(counts.unsqueeze(-1) > 0, pad_value, torch.zeros_like(pad_value))
    indices = torch.where(slot < counts.unsqueeze(-1), order, pad_value)
    assert nkb == 0 or int(indices.max()) < nkb
    return indices.to(torch.int32).contiguous(), counts.contiguous()


def indices_to_block_mask(kv_indices: torch.Tensor, kv_counts: torch.Tensor, num_kv_blocks: int) -> torch.Tensor:
    """Inverse of :func:`block_mask_to_indices`: (..., NQB, max_kept), (..., NQB) -> (..., NQB, NKB) bool."""
    validate_layout(kv_indices, kv_counts, num_kv_blocks=num_kv_blocks)
    slot = torch.arange(kv_indices.shape[-1], device=kv_indices.device)
    valid = (slot < kv_counts.unsqueeze(-1)).to(torch.int32)
    hits = torch.zeros(*kv_indices.shape[:-1], num_kv_blocks, dtype=torch.int32, device=kv_indices.device)
    # Padding slots repeat a valid index with weight 0, so adding (not assigning) keeps every kept block.
    hits.scatter_add_(-1, kv_indices.long(), valid)
    return hits > 0


def validate_layout(kv_indices: torch.Tensor, kv_counts: torch.Tensor, *, num_kv_blocks: int,
                    num_q_blocks: int | None = None, batch: int | None = None, heads: int | None = None,
                    check_values: bool = True) -> None:
    """Raise ValueError naming the argument when a layout cannot be run as given.

    ``check_values=False`` checks dtypes and shapes only: reading the index range back from a GPU waits for
    the device, which planners whose layouts were checked once when built need not pay on every call.
    """
    if kv_indices.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"kv_indices must be int32 or int64, got {kv_indices.dtype}")
    if kv_counts.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"kv_counts must be int32 or int64, got {kv_counts.dtype}")
    if kv_indices.ndim != kv_counts.ndim + 1 or kv_indices.shape[:-1] != kv_counts.shape:
        raise ValueError(
            f"kv_indices must have shape kv_counts.shape + (max_kept,); got kv_indices {tuple(kv_indices.shape)} "
            f"and kv_counts {tuple(kv_counts.shape)}")
    if kv_indices.device != kv_counts.device:
        raise ValueError(f"kv_indices is on {kv_indices.device} but kv_counts is on {kv_counts.device}")
    if num_q_blocks is not None:
        if kv_counts.ndim != 3:
            raise ValueError(f"kv_counts must have shape (B or 1, H or 1, NQB), got {tuple(kv_counts.shape)}")
        lb, lh, nqb = kv_counts.shape
        if nqb != num_q_blocks:
            raise ValueError(f"kv_counts has {nqb} query blocks but the queries need {num_q_blocks}")
        if lb not in (1, batch):
            raise ValueError(f"kv_indices / kv_counts batch dimension is {lb}; accepted: 1 (shared) or the batch size {batch}")
        if lh not in (1, heads):
            raise ValueError(f"kv_indices / kv_counts head dimension is {lh}; accepted: 1 (shared) or the number of heads {heads}")
    if not check_values:
        return
    if kv_counts.numel():
        cmin, cmax = int(kv_counts.min()), int(kv_counts.max())
        if cmin < 0 or cmax > kv_indices.shape[-1]:
            raise ValueError(f"kv_counts must lie in [0, {kv_indices.shape[-1]}] (the index list width), "
                             f"got values in [{cmin}, {cmax}]")
    if kv_indices.numel():
        imin, imax = int(kv_indices.min()), int(kv_indices.max())
        if imin < 0 or imax >= num_kv_blocks:
            raise ValueError(f"kv_indices must lie in [0, {num_kv_blocks - 1}] (the key blocks), "
                             f"got values in [{imin}, {imax}]")


def layout_density(kv_counts: torch.Tensor, num_kv_blocks: int) -> float:
    """Fraction of (query block, key block) tiles the layout computes."""
    if kv_counts.numel() == 0 or num_kv_blocks == 0:
        return 0.0
    return float(kv_counts.double().mean() / num_kv_blocks)
