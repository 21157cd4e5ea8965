"""Triton kernels with a torch reference for each. Never imports ComfyUI."""

from .attention import (BACKENDS, MAX_TRITON_HEAD_DIM, SUPPORTED_BLOCK_SIZES, block_sparse_attention,
                        compensate_block_layout, resolve_backend, triton_available)
from .block_mass import block_mass
from .cluster_attention import cluster_block_attention, cluster_pair_count
from .cluster_reference import reference_cluster_block_attention, to_cluster_order, to_token_order
from .cluster_select import (MAX_KEY_CLUSTERS, ClusterSelection, cluster_scores, select_key_clusters,
                             selection_backend, selection_pair_bytes)
from .dense_lse import dense_attention_with_lse
from .kmeans import (KMeansResult, batched_kmeans, cluster_order, kmeans_assign, kmeans_update, reseed_points,
                     sort_point_bytes, strided_init)
from .layout import block_mask_to_indices, indices_to_block_mask, layout_density, num_blocks, validate_layout
from .mask_errors import candidate_mask_errors, candidate_mask_outputs, reference_candidate_mask_outputs
from .mass_reference import full_layout, reference_block_mass
from .pooled_keys import (PooledKeys, pool_key_blocks, pool_key_clusters, reference_pool_key_blocks,
                          reference_pool_key_clusters)
from .reference import reference_block_sparse_attention
from .row_gather import gather_head_rows, scatter_head_rows

__all__ = [
    "BACKENDS", "MAX_TRITON_HEAD_DIM", "SUPPORTED_BLOCK_SIZES", "block_sparse_attention", "resolve_backend", "triton_available",
    "block_mask_to_indices", "indices_to_block_mask", "layout_density", "num_blocks", "validate_layout",
    "reference_block_sparse_attention",
    # compensation of skipped keys
    "compensate_block_layout", "PooledKeys", "pool_key_blocks", "pool_key_clusters", "reference_pool_key_blocks",
    "reference_pool_key_clusters",
    # SVG2
    "cluster_block_attention", "cluster_pair_count", "reference_cluster_block_attention", "to_cluster_order",
    "to_token_order",
    "MAX_KEY_CLUSTERS", "ClusterSelection", "cluster_scores", "select_key_clusters",
    "selection_backend", "selection_pair_bytes",
    "KMeansResult", "batched_kmeans", "cluster_order", "kmeans_assign", "kmeans_update", "reseed_points",
    "sort_point_bytes", "strided_init",
    # SVG
    "candidate_mask_errors", "candidate_mask_outputs", "reference_candidate_mask_outputs", "gather_head_rows",
    "scatter_head_rows",
    # AdaSpa
    "block_mass", "dense_attention_with_lse", "full_layout", "reference_block_mass",
]
