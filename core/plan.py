"""What a planner hands the kernel for one attention call."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BlockPlan:
    """A block-sparse layout (see kernels.layout) with its block size and the fraction of tiles it keeps."""

    kv_indices: torch.Tensor
    kv_counts: torch.Tensor
    block_size: int
    density: float
