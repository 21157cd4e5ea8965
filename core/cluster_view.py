"""What an SVG2 call computed, drawn as fixed tiles in the original token order (for the Inspector).

SVG2 keeps (query cluster, key cluster) pairs, and clusters are scattered over the video, so a tile of
``block_size`` x ``block_size`` tokens is partly computed. A tile counts as kept when at least KEEP_SHARE of its
query-key pairs are: the share of tiles drawn then follows the share of pairs computed. The count per tile is
two small matrix products over cluster histograms, never a token mask.
"""

from __future__ import annotations

import torch

KEEP_SHARE = 0.5


def _block_histogram(labels, clusters: int, block_size: int, dtype):
    """(H, NB, clusters) tokens of each cluster in each block of ``block_size`` tokens, in ``dtype`` (exact: at most
    block_size); labels (H, L) integer (int32 is enough: the scatter index is made int64 here, one at a time)."""
    H, L = labels.shape
    nb = -(-L // block_size)
    blocks = torch.arange(L, device=labels.device) // block_size
    hist = torch.zeros(H, nb * clusters, device=labels.device, dtype=dtype)
    hist.scatter_add_(1, blocks * clusters + labels, torch.ones(1, 1, device=labels.device, dtype=dtype).expand(H, L))
    return hist.view(H, nb, clusters)


def tile_mask_bytes(num_blocks: int, query_clusters: int, key_clusters: int, tokens: int, device) -> int:
    """Temporaries per head of :func:`cluster_tile_mask` on ``device``: the int32 labels with the text's, the scatter
    index, both histograms, the kept table and its product with the query histogram (counts of 2 bytes on a GPU, 4
    on the CPU), the counts per tile and the mask."""
    count = 2 if torch.device(device).type == "cuda" else 4
    return (16 * tokens + count * num_blocks * (query_clusters + 2 * key_clusters)
            + count * query_clusters * key_clusters + (count + 1) * num_blocks * num_blocks)


def cluster_tile_mask(q_labels, k_labels, kept, block_size: int) -> torch.Tensor:
    """(H, NB, NB) bool tile mask. q_labels, k_labels: (H, L) integer cluster of every query / key token in the
    original order; kept: (H, CQ, CK) bool, query cluster i computes its pairs with key cluster j."""
    H, L = q_labels.shape
    # Counts are integers up to block_size^2; float16 on a GPU (tensor cores) is within a few pairs of exact,
    # which cannot matter against a 50% threshold.
    dtype = torch.float16 if q_labels.device.type == "cuda" else torch.float32
    hq = _block_histogram(q_labels, kept.shape[1], block_size, dtype)
    hk = _block_histogram(k_labels, kept.shape[2], block_size, dtype)
    covered = torch.matmul(torch.matmul(hq, kept.to(dtype)), hk.transpose(1, 2))
    # Tokens per block, computed on the device: a bincount would wait for the GPU (a sync per planned head group).
    starts = torch.arange(hq.shape[1], device=q_labels.device) * block_size
    rows = (L - starts).clamp(max=block_size).to(dtype)
    # covered / (rows_a * rows_b) >= KEEP_SHARE, divided in place: no second (NB x NB) tensor.
    return covered.div_(rows[None, :]) >= KEEP_SHARE * rows[:, None]


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """(..., W) bool -> (..., ceil(W / 8)) uint8 (8x smaller on the host)."""
    width = mask.shape[-1]
    padded = torch.nn.functional.pad(mask.to(torch.uint8), (0, -width % 8))
    weights = 1 << torch.arange(8, device=mask.device, dtype=torch.uint8)  # made on the device: no copy, no sync
    return (padded.unflatten(-1, (-1, 8)) * weights).sum(-1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, width: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: (..., ceil(W / 8)) uint8 -> (..., W) bool."""
    shifts = torch.arange(8, device=packed.device, dtype=torch.uint8)
    return ((packed[..., None] >> shifts) & 1).flatten(-2)[..., :width].bool()
