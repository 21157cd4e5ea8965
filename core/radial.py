"""Radial attention (Li et al. 2025): a static block layout whose density decays with frame distance.

Token rule for a query in frame i and a key in frame j, d = |i - j|, s tokens per frame (as the reference):
  * d <= 1, or j == 0 with the attention sink (Wan): the whole frame pair is kept;
  * otherwise band r = bit_length(d) (= floor(log2 d) + 1), base width 2^bit_length(s) / 2^r: the pair keeps a
    spatial diagonal |x_q - x_k| <= max(decay_factor * base, block_size) (x = position inside the frame);
  * once the base width is narrower than a block, whole frame pairs are thinned to a temporal stride
    m = block_size / base: only d % m == 0 is kept.
So the kept mass halves per band and the total is O(n log n).

A (query block, key block) tile is kept when that token rule covers at least ``KEEP_COVERAGE`` of it, computed
exactly (closed form per frame segment) rather than by materialising token masks. Text tokens (HunyuanVideo)
sit after the video: their rows are always dense, their columns dense with ``text_dense``. Every query block
keeps its diagonal block.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ..kernels import block_mask_to_indices, validate_layout
from .grid import VideoGrid
from .method import AttentionCall, run_block_plan
from .plan import BlockPlan

KEEP_COVERAGE = 0.25
MAX_PLANS = 4  # cached layouts per planner: a few resolutions at most are alive at once
BLOCK_SIZES = (64, 128)


@dataclass(frozen=True)
class RadialSettings:
    decay_factor: float = 0.2
    block_size: int = 128
    attention_sink: bool = True
    text_dense: bool = True

    def __post_init__(self):
        if not 0.0 < self.decay_factor <= 4.0:
            raise ValueError(f"decay_factor must be in (0, 4], got {self.decay_factor}; lower is sparser "
                             "(the reference uses 0.2 for Wan and 0.95 for HunyuanVideo)")
        if self.block_size not in BLOCK_SIZES:
            raise ValueError(f"block_size must be one of {BLOCK_SIZES}, got {self.block_size}")

    def make_planner(self) -> "RadialPlanner":
        return RadialPlanner(self)


def _frame_pair_rules(frames: int, tokens_per_frame: int, settings: RadialSettings):
    """Per frame distance d: (keep the whole pair, keep a band, band half-width)."""
    full, band, width = [], [], []
    top = 2 ** tokens_per_frame.bit_length()
    for d in range(frames):
        base = top / 2 ** d.bit_length()
        stride_ok = base >= settings.block_size or d % int(settings.block_size // base) == 0
        full.append(d <= 1)
        band.append(d > 1 and stride_ok)
        width.append(max(settings.decay_factor * base, float(settings.block_size)))
    return torch.tensor(full), torch.tensor(band), torch.tensor(width, dtype=torch.float64)


def _pairs_below(x, n):
    """sum_{y < x} clamp(y, 0, n) for integer tensors x (helper of the band count)."""
    small = x * (x - 1) / 2
    large = n * (n + 1) / 2 + (x - n - 1) * n
    return torch.where(x <= 0, torch.zeros_like(x), torch.where(x <= n + 1, small, large))


def _band_pairs(a0, a1, b0, b1, w):
    """#{(a, b): a0 <= a < a1, b0 <= b < b1, |a - b| <= w}, elementwise, exact for integer w."""
    n = b1 - b0

    def at_most(t):  # pairs with b - a <= t
        return _pairs_below(a1 + t - b0 + 1, n) - _pairs_below(a0 + t - b0 + 1, n)

    w = torch.floor(w)
    return at_most(w) - at_most(-w - 1)


def _video_segments(grid: VideoGrid, block: int):
    """Split the video tokens at block and frame boundaries: (frame, in-frame start, in-frame end, block)."""
    s, v = grid.tokens_per_frame, grid.video_tokens
    cuts = torch.unique(torch.cat([torch.arange(0, v, block), torch.arange(0, v, s), torch.tensor([v])]))
    start, end = cuts[:-1].double(), cuts[1:].double()
    frame = torch.div(cuts[:-1], s, rounding_mode="floor")
    return frame, start - frame * s, end - frame * s, torch.div(cuts[:-1], block, rounding_mode="floor")


@functools.lru_cache(maxsize=16)
def radial_block_mask(grid: VideoGrid, settings: RadialSettings) -> torch.Tensor:
    """(NB, NB) bool block mask over grid.total_tokens tokens (CPU), cached per (grid, settings)."""
    block = settings.block_size
    n = grid.total_tokens
    nb = -(-n // block)
    full_rule, band_rule, width_rule = _frame_pair_rules(grid.frames, grid.tokens_per_frame, settings)

    frame, lo, hi, blk = _video_segments(grid, block)
    fi, fj = frame[:, None], frame[None, :]
    dist = (fi - fj).abs()
    full = full_rule[dist] | ((fj == 0) & settings.attention_sink)
    area = (hi - lo)[:, None] * (hi - lo)[None, :]
    band = _band_pairs(lo[:, None], hi[:, None], lo[None, :], hi[None, :], width_rule[dist])
    kept = torch.where(full, area, torch.where(band_rule[dist], band, torch.zeros_like(area)))

    covered = torch.zeros(nb * nb, dtype=torch.float64)
    covered.index_add_(0, (blk[:, None] * nb + blk[None, :]).flatten(), kept.flatten())
    rows = torch.full((nb,), float(block), dtype=torch.float64)
    rows[-1] = n - (nb - 1) * block
    mask = covered.view(nb, nb) >= KEEP_COVERAGE * rows[:, None] * rows[None, :]

    first_text_block = grid.video_tokens // block  # a block holding any text token counts as text
    if grid.text_tokens:
        mask[first_text_block:, :] = True
        if settings.text_dense:
            mask[:, first_text_block:] = True
    mask |= torch.eye(nb, dtype=torch.bool)
    return mask


class RadialPlanner:
    """Radial layouts for the kernels, on the queries' device, shared by every batch element and head."""

    compensates = True  # call.compensate: run_block_plan adds the skipped keys' summed term (kernels/block_summary.py)
    # compensate 'auto' turns it on: on the proxy (H100, 3 seeds, density 0.37) it took the video from 32.7 to 42.4 dB
    # at 4 steps cfg 1 and from 18.1 to 25.6 dB at 20 steps cfg 4, for 1.33x the call's time at Wan 14B 720p
    # (benchmarks/RESULTS.md, issue 17, 2026-12-06)
    compensate_by_default = True

    def __init__(self, settings: RadialSettings):
        self.settings = settings
        self._plans: dict = {}

    @property
    def block_size(self) -> int:
        return self.settings.block_size

    def plan(self, grid: VideoGrid, q: torch.Tensor, k: torch.Tensor) -> BlockPlan:
        key = (grid, q.device)
        if key not in self._plans:
            if len(self._plans) >= MAX_PLANS:
                self._plans.pop(next(iter(self._plans)))
            mask = radial_block_mask(grid, self.settings)
            indices, counts = block_mask_to_indices(mask.to(q.device)[None, None])
            validate_layout(indices, counts, num_kv_blocks=mask.shape[1])  # once; calls then skip the device sync
            self._plans[key] = BlockPlan(indices, counts, self.block_size, float(mask.float().mean()))
        return self._plans[key]

    def attend(self, call: AttentionCall) -> tuple[torch.Tensor, float]:
        return run_block_plan(call, self.plan(call.grid, call.q, call.k))

    def block_mask(self, grid: VideoGrid, layer: int | None = None) -> torch.Tensor:
        """The CPU bool (NQB, NKB) block mask of ``grid`` (cached; the same for every layer and head)."""
        return radial_block_mask(grid, self.settings)

    def cache_bytes(self) -> dict:
        """{(grid, device): bytes of its cached layout (kv_indices + kv_counts)}; at most MAX_PLANS entries."""
        return {key: plan.kv_indices.nbytes + plan.kv_counts.nbytes for key, plan in self._plans.items()}

    def reset(self) -> None:
        """Radial layouts depend only on the grid, so they survive runs; nothing per-run to drop."""
