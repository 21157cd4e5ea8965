"""Triton kernels with a torch reference for each. Never imports ComfyUI."""

from .attention import (BACKENDS, MAX_TRITON_HEAD_DIM, SUPPORTED_BLOCK_SIZES, block_sparse_attention, resolve_backend,
                        triton_available)
from .block_mass import block_mass, dense_attention_with_mass
from .layout import block_mask_to_indices, indices_to_block_mask, layout_density, num_blocks, validate_layout
from .mass_reference import full_layout, reference_block_mass, reference_dense_attention_with_mass
from .reference import reference_block_sparse_attention

__all__ = [
    "BACKENDS", "MAX_TRITON_HEAD_DIM", "SUPPORTED_BLOCK_SIZES", "block_sparse_attention", "resolve_backend", "triton_available",
    "block_mask_to_indices", "indices_to_block_mask", "layout_density", "num_blocks", "validate_layout",
    "reference_block_sparse_attention",
    "block_mass", "dense_attention_with_mass", "full_layout", "reference_block_mass", "reference_dense_attention_with_mass",
]
