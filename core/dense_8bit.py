"""Dense video self-attention on the pack's 8-bit kernel: precision '8-bit + dense calls' (kernels.eight_bit).

The calls the schedule keeps dense (dense steps, dense layers, the steps after ``sparse_end``) then run the fixed-block
kernel in FP8 / INT8 with a full layout (every key block for every query block) instead of the user's own attention.
A full layout covers the non-video tokens (text) a model mixes into its self-attention as it covers the video, and the
kernel's ``kv_length`` drops key padding, so the call computes exactly what dense attention computes, in 8 bits.
"""

from __future__ import annotations

import torch

from ..kernels import block_sparse_attention, full_layout, num_blocks
from .method import AttentionCall

# The layout block of the full-layout call: the kernel's larger tile (fewer programs, the 8-bit scales per 128 rows;
# the accuracy figures of benchmarks/RESULTS.md were measured at 64 and 128 alike).
FULL_LAYOUT_BLOCK = 128


def full_layout_attention(call: AttentionCall, memo: dict) -> torch.Tensor:
    """Attention of ``call`` over every key on the fixed-block kernel at ``call.precision``; (B, H, L, D), written
    into ``call.out`` when given. ``memo``: per-forward cache where every layer finds the same layout."""
    length = call.q.shape[2]
    key = ("full layout", length, call.q.device)
    layout = memo.get(key)
    if layout is None:
        blocks = num_blocks(length, FULL_LAYOUT_BLOCK)
        memo[key] = layout = full_layout(blocks, blocks, call.q.device)
    kv_indices, kv_counts = layout
    return block_sparse_attention(call.q, call.k, call.v, kv_indices, kv_counts, block_size=FULL_LAYOUT_BLOCK,
                                  kv_length=call.kv_length, out=call.out, backend=call.backend, check_layout=False,
                                  precision=call.precision)
