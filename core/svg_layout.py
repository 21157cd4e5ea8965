"""The two block layouts of Sparse VideoGen (SVG1) and the token reorder that makes the temporal one contiguous.

Video tokens come frame-major (frame outer, position in the frame inner). The **token-major** order puts the
position outer and the frame inner, so the F tokens of one spatial position over all frames are neighbours; text
tokens (HunyuanVideo, after the video) keep their place in both orders.

Both layouts are one band of blocks around the diagonal, as in the reference, read in a different order:
  * spatial (frame-major order): a query block keeps the key blocks within ``band`` blocks of it, i.e. the tokens
    of its own and the nearest frames, plus, with the attention sink (the reference does it for Wan), every block
    holding a token of frame 0;
  * temporal (token-major order): the same band keeps, for every frame, the same and the nearest spatial positions.
Text rows and columns are dense in both (a block holding any text token counts as text). The band half-width is
the one whose share of the video-video tiles is closest to ``sparsity`` (the reference's name for the fraction of
attention kept: 0.25 computes a quarter of it).
"""

from __future__ import annotations

import functools

import torch

from .grid import VideoGrid

MIN_SAMPLED_ROWS = 64  # the reference profiles 64 query rows per call


def num_video_blocks(grid: VideoGrid, block: int) -> int:
    """Blocks holding video tokens only (the band's extent); every later block holds text."""
    return grid.video_tokens // block if grid.text_tokens else -(-grid.total_tokens // block)


def band_half_width(blocks: int, sparsity: float) -> int:
    """Half-width h (in blocks) of the band |i - j| <= h whose share of a blocks x blocks map is closest to sparsity."""
    if blocks <= 0:
        return 0
    kept = [blocks * (2 * h + 1) - h * (h + 1) for h in range(blocks)]
    return min(range(blocks), key=lambda h: abs(kept[h] / blocks ** 2 - sparsity))


@functools.lru_cache(maxsize=16)
def token_major_order(grid: VideoGrid) -> torch.Tensor:
    """(L,) int64: position t of the token-major order holds original token order[t] (text tokens stay in place)."""
    t = torch.arange(grid.video_tokens)
    video = (t % grid.frames) * grid.tokens_per_frame + t // grid.frames
    return torch.cat([video, torch.arange(grid.video_tokens, grid.total_tokens)])


@functools.lru_cache(maxsize=16)
def token_major_position(grid: VideoGrid) -> torch.Tensor:
    """(L,) int64, the inverse of :func:`token_major_order`: original token i sits at position[i] of that order."""
    order = token_major_order(grid)
    position = torch.empty_like(order)
    position[order] = torch.arange(order.numel())
    return position


@functools.lru_cache(maxsize=16)
def svg_block_masks(grid: VideoGrid, sparsity: float, block: int, attention_sink: bool):
    """(spatial, temporal): CPU bool (NB, NB) block masks, spatial in frame-major order, temporal in token-major."""
    nb = -(-grid.total_tokens // block)
    video = num_video_blocks(grid, block)
    i = torch.arange(nb)
    band = (i[:, None] - i[None, :]).abs() <= band_half_width(video, sparsity)
    text = i >= video
    temporal = band | text[:, None] | text[None, :]
    sink = i < -(-grid.tokens_per_frame // block) if attention_sink else torch.zeros(nb, dtype=torch.bool)
    return temporal | sink[None, :], temporal


@functools.lru_cache(maxsize=16)
def temporal_mask_in_original_order(grid: VideoGrid, sparsity: float, block: int) -> torch.Tensor:
    """CPU bool (NB, NB): the tiles of the frame-major order that hold any query-key pair the temporal layout
    computes (what the Inspector draws for a temporal head)."""
    nb = -(-grid.total_tokens // block)
    temporal = svg_block_masks(grid, sparsity, block, False)[1]
    # incidence[o, t]: some token of frame-major block o lies in token-major block t
    incidence = torch.zeros(nb, nb)
    incidence[torch.arange(grid.total_tokens) // block, token_major_position(grid) // block] = 1.0
    return (incidence @ temporal.float() @ incidence.T) > 0


def sampled_rows(grid: VideoGrid, fraction: float) -> torch.Tensor:
    """(R,) int64 video query rows to profile: ``fraction`` of the video tokens (at least MIN_SAMPLED_ROWS, at most
    all), evenly strided so every frame and region is represented; the same rows at every call."""
    video = grid.video_tokens
    count = min(video, max(MIN_SAMPLED_ROWS, round(fraction * video)))
    return ((torch.arange(count, dtype=torch.float64) + 0.5) * video / count).long()
