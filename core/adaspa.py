"""AdaSpa (Xia et al. 2025, arXiv 2502.21079): per-head block-sparse layouts found by an exact online search.

What the paper does (its Sections 3-4, Figure 7, Algorithms 1-2):
  * Attention of video DiTs is "blockified"; its pattern and each row's log-sum-exp (LSE) change with the input,
    layer and head but hardly across denoising steps. So the exact block pattern is searched online at a few steps
    (Ts = {10, 30} of 50, after 10 dense warm-up steps) and reused by the steps up to the next search.
  * A search ranks (query block, key block) tiles by their exact attention mass sum exp(q.k * scale - LSE). The
    first search runs full attention, then a second pass with the fresh LSE; later searches run one mass pass
    with the LSE cached at the first ("LSE-cached search") and then the sparse attention.
  * Head-adaptive and "row wise": every query block of a head keeps the same number of key blocks, its heaviest;
    heads are given more or fewer blocks by their recall (kept mass / all mass) against 0.8, around sparsity 0.8.
  * Text sink (HunyuanVideo): video-text, text-video and text-text blocks are always kept.

What this planner does, and where it departs from the paper:
  * The LSE of the first search comes from the dense step before it. The session hands the last dense warm-up
    step of every sparse layer to ``prime`` instead of ComfyUI's attention: dense attention with each row's LSE
    (cuDNN's, at SDPA's speed, where torch offers it; kernels.dense_attention_with_lse), output exact. The first
    search then is one ``kernels.block_mass`` pass against that LSE, the selection and the sparse attention, like
    a later search: the step's output is sparse. One step apart, the LSE differs less than the paper's later
    searches' (20 steps apart), and masses are ranked per head relative to their sum, so a uniform shift in the
    LSE changes nothing.
  * A first search with nothing primed (no dense step before the first sparse one, a new shape mid-run) runs, as
    the paper does, dense attention with each row's LSE (its output is the call's, exact) and then the masses.
    The LSE is cached (float16) while a later search of the run will use it.
  * A later search runs ``block_mass`` against the cached LSE (one QK^T sweep, no V), selects the new layout and
    runs the sparse attention with it: the call's output is sparse, as in the paper. The cache keeps the LSE of
    the last exact dense pass: the sparse launch's LSE covers the kept keys only, so it would understate each row.
    Measured on an H100 at Wan 14B 720p, both are cheaper than fusing the masses into a dense flash pass (which
    gave a dense output at later searches too): the per-tile mass accumulation inside the flash loop cost more
    than a separate QK-only pass.
  * Search steps: the paper's {10, 30} of 50 as fractions of the run (0.2, 0.6), or step indices. A call that
    finds no pattern for its shape (the first sparse step of a layer, a new resolution) searches too; a search step
    whose model call did not run (a step cache skipped it) searches at the next step that runs.
  * How many key blocks each head's query blocks keep: by default the fewest blocks in all whose kept mass, the
    call's heads pooled, reaches ``recall`` of their searched mass (each next block goes to the head it adds the
    most mass to), each head clamped to [min_density, max_density] of the searched columns. The paper's criterion
    (``per_head_recall``) gives every head the fewest blocks that reach ``recall`` of its own mass. Measured on
    the proxy (benchmarks/RESULTS.md, issue 17): at equal density the paper's criterion spends blocks on diffuse
    heads to bring them to the recall and starves concentrated ones, whose few lost blocks are what their output
    is made of; pooled, the video is 6.2-9.3 dB closer to dense at 4 steps and 1.9-2.5 dB at 20 steps (density
    0.12-0.40, compensation off, at equal or lower density). The diagonal block is always kept. A recall of 1
    keeps every block.
  * Text rows are always computed dense (a separate dense launch over the text rows, so the video rows' layout
    stays narrow); text columns are kept for every video row with ``text_dense``, else searched like video ones.
  * ``call.want_lse``: a first search with a dense pass reports its dense LSE (it attended every key); a later
    search and a sparse call the LSE their launches return over the kept keys; tokens are never reordered: all in
    the original order.
  * ``call.compensate``: a sparse call adds the summed term of the keys each query block skips; the search
    still ranks the exact masses against the exact LSE (a first search's dense pass skips nothing).
  * ``cluster_heads`` (not in the paper): at a search, a head whose blocks keep less than the recall of its own
    mass is tried on SVG2's cluster layout, its mass measured exactly against the search's LSE; a head the clusters
    serve runs SVG2's cluster path, one head at a time, until the next search (core/adaspa_clusters.py).

The pattern and LSE cache: per layer, one entry per (grid, batch size, device, first head, heads), holding the
layout of every (batch element, head) (int16 indices; searched on the batch's first conditioning chunk and shared
by the others, core.method) and, while a search of the run will use it, the LSE of that chunk's last exact dense
pass (float16; a primed entry holds the LSE alone). A call whose grid or batch differs finds no entry and searches
(never reuses a layout of another shape); the whole cache is dropped at the start of each sampling run. With
``cluster_heads``, an entry also marks its cluster-served heads, whose centroids the SVG2 planner keeps per (layer,
true head) ((query + key clusters) x head_dim values in the activations' dtype) until a search no longer serves
them.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace

import torch

from ..kernels import (block_mass, block_sparse_attention, dense_attention_with_lse, full_layout,
                       indices_to_block_mask, num_blocks, validate_layout)
from .adaspa_clusters import cluster_served
from .break_even import block_kernel
from .grid import VideoGrid
from .memory import attend_in_parts, head_parts, heads_per_chunk, transient_budget
from .method import AttentionCall, share_over_conditionings, split_lse
from .routing import keep_sparse
from .svg2 import PRESETS as SVG2_PRESETS, SVG2Planner, SVG2Settings

log = logging.getLogger("sparse_video_attention")

BLOCK_SIZES = (64, 128)
# Selection works on this many bytes of per-head temporaries at a time (sorting the masses of a few heads).
SELECT_CHUNK_BYTES = 512 << 20
# What ranking a block mass holds (rank_row_wise): its copy, the sorted copy and the int64 order. Measured on the H100
# (Wan 14B 720p, block 64): torch's sort holds nothing beyond its outputs at these sizes.
RANK_BYTES = 16


@dataclass(frozen=True)
class AdaSpaSettings:
    """recall: the share of the attention mass the blocks keep on the step they are searched: of the call's heads
    pooled (the fewest blocks in all), or of each head's own with ``per_head_recall`` (the paper's criterion).
    search_steps: when the exact search runs; below 1 a fraction of the run's steps, from 1 up a step index.
    block_size: tile of the layout. min_density / max_density: bounds on each head's share of kept key blocks.
    text_dense: video rows keep every text column (HunyuanVideo); off, text columns are searched too.
    cluster_heads: heads whose blocks miss the recall run SVG2's clusters of ``clusters`` where those serve them."""

    recall: float = 0.8
    search_steps: tuple = (0.2, 0.6)
    block_size: int = 64
    min_density: float = 0.1
    max_density: float = 0.3
    text_dense: bool = True
    cluster_heads: bool = False
    clusters: SVG2Settings = SVG2_PRESETS["wan_720p"]
    per_head_recall: bool = False

    def __post_init__(self):
        # Written so that NaN (which an API prompt can send past the UI's min/max) is rejected too.
        if not 0.0 < self.recall <= 1.0:
            raise ValueError(f"recall must be in (0, 1], got {self.recall}; 0.8 is the paper's, 1.0 keeps every block")
        if self.block_size not in BLOCK_SIZES:
            raise ValueError(f"block_size must be one of {BLOCK_SIZES}, got {self.block_size}")
        for name in ("min_density", "max_density"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.min_density > self.max_density:
            raise ValueError(f"min_density ({self.min_density}) must not be above max_density ({self.max_density}); "
                             "lower min_density or raise max_density")
        if not isinstance(self.search_steps, tuple):
            raise ValueError(f"search_steps must be a tuple of numbers, got {type(self.search_steps).__name__}")
        for s in self.search_steps:
            if not 0 <= s < math.inf or (s >= 1 and s != int(s)):
                raise ValueError(f"search_steps must hold fractions in [0, 1) or whole step indices, got {s} in "
                                 f"{self.search_steps}")
        for name in ("cluster_heads", "per_head_recall"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if not isinstance(self.clusters, SVG2Settings):
            raise ValueError("clusters must be SVG2Settings (the k-means and top-p of cluster-served heads), got "
                             f"{type(self.clusters).__name__}")

    def make_planner(self) -> "AdaSpaPlanner":
        return AdaSpaPlanner(self)


def parse_search_steps(text: str) -> tuple:
    """'0.2, 0.6' or '10 30' -> (0.2, 0.6) / (10.0, 30.0); ValueError naming search_steps for anything else."""
    try:
        values = tuple(float(part) for part in text.replace(",", " ").split())
    except ValueError:
        raise ValueError(f"search_steps must be numbers separated by commas, e.g. '0.2, 0.6' or '10, 30'; "
                         f"got {text!r}") from None
    AdaSpaSettings(search_steps=values)  # the range checks, with their message
    return values


def resolve_search_steps(search_steps: tuple, total_steps: int | None) -> tuple[tuple, tuple]:
    """(step indices of the run that search, sorted; the indices given past the run's last step).

    A fraction f is step round(f * total_steps) (the schedule's rounding), always inside the run. Without a known
    number of steps only indices can be placed."""
    inside, beyond = set(), set()
    for s in search_steps:
        if s < 1:
            if total_steps is not None:
                inside.add(min(math.floor(s * total_steps + 0.5), total_steps - 1))
        elif total_steps is not None and s >= total_steps:
            beyond.add(int(s))
        else:
            inside.add(int(s))
    return tuple(sorted(inside)), tuple(sorted(beyond))


def density_bounds(min_density: float, max_density: float, columns: int) -> tuple[int, int]:
    """(fewest, most) key blocks a query block keeps out of ``columns`` searched ones; at least the diagonal."""
    low = min(columns, max(1, math.ceil(min_density * columns - 1e-9)))
    high = min(columns, max(low, math.floor(max_density * columns + 1e-9)))
    return low, high


def rank_row_wise(mass: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's blocks of a (H, R, C) mass region ranked (row i's diagonal block is column i): (order (H, R, width)
    int64: the diagonal, then the heaviest other blocks, the first ``width`` of them; kept (H, C) float64: each
    head's mass kept when every row keeps its first 1..C). Holds RANK_BYTES per mass."""
    ranked = mass.clone()
    diagonal = ranked.diagonal(dim1=-2, dim2=-1)
    diagonal_mass = diagonal.clone()
    diagonal.fill_(float("inf"))  # the diagonal ranks first in its row
    ranked, order = ranked.sort(dim=-1, descending=True)
    ranked[..., 0] = diagonal_mass
    # Columns summed in float32 (a float64 sum made a float64 copy of the masses: 8 bytes more per mass).
    return order[..., :width], ranked.sum(1).double().cumsum(-1)


def block_counts(kept: torch.Tensor, *, recall: float, low: int, high: int, per_head: bool) -> torch.Tensor:
    """Key blocks each head's query blocks keep (H,) int64, in [low, high], from the heads' kept-mass curves (H, C)
    (rank_row_wise). ``per_head`` (the paper's criterion): each head the fewest that keep ``recall`` of its own mass.
    Otherwise the heads' masses are pooled: each head its ``low`` blocks, then one more block for whichever head it
    adds the most mass to, until the heads together keep ``recall`` of their mass: the fewest blocks in all (each
    head's next block weighs no more than its last one, so taking the heaviest next block first is optimal)."""
    H, C = kept.shape
    total = kept[:, -1]
    if recall >= 1.0:  # every block, as many as a head may keep
        return torch.full((H,), high, device=kept.device, dtype=torch.long)
    if per_head:
        return ((kept < recall * total[:, None]).sum(-1) + 1).clamp(low, high)
    added = (kept[:, low:high] - kept[:, low - 1:high - 1]).flatten()  # the mass of each head's next block
    heaviest, order = added.sort(descending=True, stable=True)
    start = kept[:, low - 1].sum()
    reached = start + heaviest.cumsum(0)  # after the first 1, 2, ... additions
    target = recall * total.sum()
    taken = torch.searchsorted(reached, target).add(1).clamp(max=added.numel()) * (target > start)
    chosen = torch.zeros_like(added).scatter_(0, order, (torch.arange(added.numel(), device=kept.device) < taken)
                                              .to(added.dtype))
    return low + chosen.view(H, high - low).sum(-1).long()


def kept_blocks(order: torch.Tensor, k: torch.Tensor, width: int) -> torch.Tensor:
    """(H, R, width) in ``order``'s dtype: each head's rows keep the first k[h] (at most ``width``) of their ranked
    blocks ``order`` (H, R, >= width), ascending; entries past k repeat the first. Holds kept_block_bytes a pick."""
    valid = torch.arange(width, device=order.device) < k[:, None, None]
    placeholder = torch.iinfo(order.dtype).max  # above every block index (ranked_dtype)
    top = torch.where(valid, order[..., :width], placeholder).sort(dim=-1).values  # kept, then placeholders
    return torch.where(valid, top, top[..., :1])


def kept_block_bytes(order: torch.Tensor) -> int:
    """Bytes kept_blocks holds per pick: the picks with their placeholders, their sorted copy, the sort's int64
    order (torch's sort holds nothing more at these sizes: measured on the H100), then the result."""
    return 3 * order.element_size() + 8


def recall_reached(kept: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """(H,) float32: the share of each head's mass its k blocks per row keep (1 for a head with no mass)."""
    total = kept[:, -1]
    share = kept.gather(-1, (k - 1)[:, None])[:, 0] / total
    return torch.where(total > 0, share, torch.ones_like(share)).float()


@dataclass(frozen=True)
class AdaSpaPattern:
    """The searched layout of one cache entry: video query rows (the first ``video_blocks`` query blocks) keep
    ``kv_counts`` key blocks listed in ``kv_indices`` (int16 when it fits: stored for every layer); the query
    blocks after them (text) are dense. ``recall``: (B, H) share of the searched mass each head kept, on CPU.
    ``head_density``: per head, the share of the tiles its layout keeps (mean over the batch; routing)."""

    kv_indices: torch.Tensor
    kv_counts: torch.Tensor
    video_blocks: int
    num_blocks: int
    density: float
    recall: torch.Tensor
    head_density: tuple

    @property
    def nbytes(self) -> int:
        return self.kv_indices.nbytes + self.kv_counts.nbytes


@dataclass(frozen=True)
class RankedBlocks:
    """A search's masses ranked row-wise (rank_blocks), before the heads' block counts are chosen. order (B, H,
    video blocks, width): each video query block's searched columns, its diagonal first and the others by falling
    mass, as many as a head may keep (int16 when it fits); kept (B, H, columns) float64: each head's mass kept when
    every row keeps its first 1..columns. num_blocks: key blocks of the call."""

    order: torch.Tensor
    kept: torch.Tensor
    num_blocks: int


def searched_region(grid: VideoGrid, num_blocks: int, settings: AdaSpaSettings) -> tuple[int, int]:
    """(video query blocks: the rows searched, searched key columns) of a call of ``num_blocks`` blocks; a block
    holding any text token counts as text, whose rows are dense and, with text_dense, its columns kept."""
    video = grid.video_tokens // settings.block_size if grid.text_tokens else num_blocks
    return video, (video if settings.text_dense else num_blocks)


def ranked_width(columns: int, settings: AdaSpaSettings) -> int:
    """How many of each row's ranked blocks a search keeps: as many as a head may keep (max_density)."""
    return density_bounds(settings.min_density, settings.max_density, columns)[1]


def ranked_dtype(num_blocks: int) -> torch.dtype:
    """The integer type of a search's ranked blocks and pattern: int16 while every block index (num_blocks - 1 at
    most) stays below its maximum (kept_blocks' placeholder), else int32."""
    return torch.int16 if num_blocks <= torch.iinfo(torch.int16).max else torch.int32


def empty_ranked(batch: int, heads: int, num_blocks: int, grid: VideoGrid, settings: AdaSpaSettings,
                 device) -> RankedBlocks:
    """The RankedBlocks that rank_blocks fills for a call of ``heads`` heads and ``num_blocks`` blocks."""
    video, columns = searched_region(grid, num_blocks, settings)
    return RankedBlocks(order=torch.zeros(batch, heads, video, ranked_width(columns, settings) if video else 1,
                                          device=device, dtype=ranked_dtype(num_blocks)),
                        kept=torch.zeros(batch, heads, columns, device=device, dtype=torch.float64),
                        num_blocks=num_blocks)


def rank_blocks(mass: torch.Tensor, into: RankedBlocks, first: int = 0):
    """Rank a (B, h, NB, NB) mass into heads first..first + h of ``into`` (empty_ranked: its searched region),
    a few heads at a time."""
    B, H = mass.shape[:2]
    video, width = into.order.shape[2:]
    columns = into.kept.shape[-1]
    chunk = max(1, SELECT_CHUNK_BYTES // max(1, video * columns * RANK_BYTES))
    for b in range(B if video else 0):
        for h0 in range(0, H, chunk):
            heads = slice(first + h0, first + min(H, h0 + chunk))
            into.order[b, heads], into.kept[b, heads] = rank_row_wise(mass[b, h0:h0 + chunk, :video, :columns], width)


def search_pattern(mass: torch.Tensor, grid: VideoGrid, settings: AdaSpaSettings) -> AdaSpaPattern:
    """The pattern of a (B, H, NB, NB) mass over ``grid``'s tokens in ``settings.block_size`` tiles."""
    ranked = empty_ranked(mass.shape[0], mass.shape[1], mass.shape[2], grid, settings, mass.device)
    rank_blocks(mass, ranked)
    return pattern_of(ranked, settings)


def pattern_of(ranked: RankedBlocks, settings: AdaSpaSettings, chunk_bytes: int = SELECT_CHUNK_BYTES) -> AdaSpaPattern:
    """The pattern of ranked masses: each head's block count (block_counts, the heads of a batch element together),
    its rows' first blocks (sorted a few heads at a time: the pattern and the sorts' temporaries within
    ``chunk_bytes``), then every text block (text_dense)."""
    B, H, video = ranked.order.shape[:3]
    columns, nb = ranked.kept.shape[-1], ranked.num_blocks
    device = ranked.order.device
    if video == 0:  # no whole block of video: every row is a text row, all dense
        return AdaSpaPattern(kv_indices=torch.zeros(B, H, 0, 1, device=device, dtype=torch.int16),
                             kv_counts=torch.zeros(B, H, 0, device=device, dtype=torch.int32), video_blocks=0,
                             num_blocks=nb, density=1.0, recall=torch.ones(B, H), head_density=(1.0,) * H)
    low, high = density_bounds(settings.min_density, settings.max_density, columns)
    k = torch.stack([block_counts(ranked.kept[b], recall=settings.recall, low=low, high=high,
                                  per_head=settings.per_head_recall) for b in range(B)]).view(B * H)
    width = int(k.max())
    text_columns = nb - video if settings.text_dense else 0
    indices = torch.empty(B * H, video, width + text_columns, device=device, dtype=ranked.order.dtype)
    order = ranked.order.view(B * H, video, -1)
    step = max(1, (chunk_bytes - indices.nbytes) // max(1, video * width * kept_block_bytes(order)))
    for r0 in range(0, B * H, step):
        indices[r0:r0 + step, :, :width] = kept_blocks(order[r0:r0 + step], k[r0:r0 + step], width)
    indices[..., width:] = indices[..., :1]
    if text_columns:  # after each row's k video blocks: every text block
        slots = (k[:, None, None] + torch.arange(text_columns, device=device)).expand(-1, video, -1)
        text = torch.arange(video, nb, device=device, dtype=indices.dtype).expand(B * H, video, -1)
        indices.scatter_(-1, slots, text)
    kv_counts = (k + text_columns).to(torch.int32)[:, None].expand(-1, video).reshape(B, H, video).contiguous()
    head_tiles = kv_counts.sum(-1, dtype=torch.float64).cpu() + (nb - video) * nb  # (B, H)
    reached = recall_reached(ranked.kept.view(B * H, columns), k)
    return AdaSpaPattern(kv_indices=indices.view(B, H, video, -1), kv_counts=kv_counts, video_blocks=video,
                         num_blocks=nb, density=float(head_tiles.mean()) / (nb * nb), recall=reached.view(B, H).cpu(),
                         head_density=tuple((head_tiles.mean(0) / (nb * nb)).tolist()))


def share_pattern(pattern: AdaSpaPattern, call: AttentionCall) -> AdaSpaPattern:
    """The pattern searched on the call's first conditioning chunk, for its whole batch."""
    if call.conditionings == 1:
        return pattern
    return replace(pattern, kv_indices=share_over_conditionings(pattern.kv_indices, call),
                   kv_counts=share_over_conditionings(pattern.kv_counts, call),
                   recall=share_over_conditionings(pattern.recall, call))


@dataclass
class _Entry:
    pattern: AdaSpaPattern | None  # None: primed (an LSE from the dense step before), not searched yet
    lse: torch.Tensor | None  # (B, H, L) float16 of the last dense pass, kept while a search will use it
    searched_step: int | None
    clustered: tuple = ()  # per head, True when it runs on its clusters (cluster_heads); empty: none does


class AdaSpaPlanner:
    """Searches at the search steps (and wherever a call finds no pattern for its shape), sparse otherwise."""

    compensates = True
    # compensate 'auto' leaves it off: on the proxy it gained 0.8-4.0 dB at 4 steps and 2.4-4.8 dB at 20 steps (H100,
    # 3 seeds, density 0.12-0.40) for 2.0-2.2x the call's time at 720p (the summary at 64-token blocks), below what
    # the other block methods gained for 1.3x (benchmarks/RESULTS.md, issue 17, 2026-12-06); 'on' turns it on

    def __init__(self, settings: AdaSpaSettings):
        self.settings = settings
        # layer -> {(grid, batch, device, first head, heads): _Entry}; one shape (grid, batch, device) per layer
        self._layers: dict[int, dict] = {}
        self._full_layouts: dict = {}  # (block size, query blocks, key blocks, device) -> a layout of every block
        self._warned: set = set()
        # cluster-served heads' k-means, centroid cache and tile drawings (None: cluster_heads is off)
        self._clusters = SVG2Planner(settings.clusters, settings.block_size) if settings.cluster_heads else None

    @property
    def block_size(self) -> int:
        return self.settings.block_size

    def attend(self, call: AttentionCall) -> tuple[torch.Tensor, float]:
        entries, key = self._entries(call)
        entry = entries.get(key)
        searches = self._search_steps(call.total_steps)
        # The search due is the last search step reached: a step cache (EasyCache, LazyCache) that skipped the
        # search step's model call moves the search to the next step that runs, never drops it.
        due = max((s for s in searches if call.step is not None and s <= call.step), default=None)
        if entry is None or entry.pattern is None or (due is not None and (entry.searched_step is None
                                                                           or entry.searched_step < due)):
            return self._search(call, entries, key, entry, searches)
        return self._sparse(call, entry.pattern, entry.clustered)

    def _entries(self, call: AttentionCall):
        """(the call's layer's cache entries, the call's key in them); a call of a new shape (grid, batch, device)
        drops what the layer kept for another one."""
        B, H = call.q.shape[:2]
        key = (call.grid, B, call.q.device, call.head_offset, H)
        entries = self._layers.get(call.layer, {})
        if key not in entries:
            self._layers[call.layer] = entries = {k: e for k, e in entries.items() if k[:3] == key[:3]}
        return entries, key

    def _search_steps(self, total_steps):
        inside, beyond = resolve_search_steps(self.settings.search_steps, total_steps)
        if beyond and (beyond, total_steps) not in self._warned:
            self._warned.add((beyond, total_steps))
            log.warning("sparse attention: AdaSpa search_steps %s are past this run's last step (%d steps, 0-%d): "
                        "those searches are skipped, the pattern of the search before them is used to the end",
                        ", ".join(map(str, beyond)), total_steps, total_steps - 1)
        return inside

    def prime(self, call: AttentionCall) -> torch.Tensor:
        """The dense step just before the first sparse step (the session calls this instead of ComfyUI's attention):
        dense attention with each row's LSE, which the next step's search uses instead of a dense pass of its own.
        Returns the exact dense output."""
        entries, key = self._entries(call)
        out, lse = dense_attention_with_lse(call.q, call.k, call.v, kv_length=call.kv_length, out=call.out,
                                            backend=call.backend)
        entries[key] = _Entry(pattern=None, lse=lse[:call.latents].half(), searched_step=None)
        return out

    def _search(self, call, entries, key, entry, searches):
        """Without a cached LSE: the exact dense output, its LSE cached. With one (a later search, or a first search
        the step before primed): the masses against it, then the sparse attention with the new layout."""
        first = call.first_conditioning()  # the layout is searched on it and shared by the other conditionings
        n = call.latents
        cached = entry.lse if entry is not None else None
        if cached is None:
            out, lse = dense_attention_with_lse(call.q, call.k, call.v, kv_length=call.kv_length, out=call.out,
                                                backend=call.backend)
        exact = lse[:n] if cached is None else cached
        searched = self._search_heads(first, exact)
        clustered = () if self._clusters is None else cluster_served(
            first, exact, searched.recall, self._clusters, recall=self.settings.recall,
            max_density=self.settings.max_density)
        pattern = share_pattern(searched, call)
        validate_layout(pattern.kv_indices.to(torch.int32), pattern.kv_counts, num_kv_blocks=pattern.num_blocks)
        later = call.step is not None and any(s > call.step for s in searches)
        keep = (lse[:n].half() if cached is None else cached) if later else None
        entries[key] = _Entry(pattern, keep, call.step, clustered if any(clustered) else ())
        if cached is not None:
            return self._sparse(call, pattern, entries[key].clustered)
        if call.want_lse:  # the dense pass attended every key: its LSE is the dense one, nothing to compensate
            call.lse = lse
            call.lse_compensated = lse if call.compensate else None
        return out, 1.0

    def _search_heads(self, first, lse):
        """The pattern of the first conditioning chunk ``first`` against its ``lse``: the block masses ranked a few
        heads at a time (core.memory: (B, H, NB, NB) float32 masses and their sort), the block counts chosen over
        every head of the call."""
        B, H, L, _ = first.q.shape
        ranked = empty_ranked(B, H, num_blocks(L, self.block_size), first.grid, self.settings, first.q.device)
        held = self.ranked_bytes(first.q, first.grid)
        for part in head_parts(H, heads_per_chunk(first.q, self.search_head_bytes(first.q), reserved=held)):
            mass = block_mass(first.q[:, part], first.k[:, part], lse[:, part], block_size=self.block_size,
                              kv_length=first.kv_length, backend=first.backend)
            rank_blocks(mass, ranked, part.start)
            del mass
        return pattern_of(ranked, self.settings, chunk_bytes=transient_budget(first.q) - held)

    def search_head_bytes(self, q) -> int:
        """Temporaries per head of a search: float32 masses of the batch, and their ranking (rank_row_wise) one batch
        element at a time."""
        nb = num_blocks(q.shape[2], self.block_size)
        return (4 * q.shape[0] + RANK_BYTES) * nb * nb

    def ranked_bytes(self, q, grid: VideoGrid) -> int:
        """What a search holds for every head while it ranks the next ones: each row's ranked blocks."""
        nb = num_blocks(q.shape[2], self.block_size)
        video, columns = searched_region(grid, nb, self.settings)
        return ranked_dtype(nb).itemsize * q.shape[0] * q.shape[1] * video * ranked_width(columns, self.settings)

    def _sparse(self, call, pattern, clustered=()):
        """The call on its searched layout: (output, density). With cluster-served heads, each run of block heads is
        a sub-call of the block path and each cluster-served head a sub-call of the cluster planner (its centroids
        keyed by the true head); their LSE rows gathered."""
        if not clustered:
            return self._sparse_blocks(call, pattern), pattern.density
        runs = head_runs(clustered)
        on_clusters = {part.start: flag for part, flag in runs}

        def attend_part(sub, part):
            if on_clusters[part.start]:
                return self._clusters.attend(sub)[1]
            block = pattern_heads(pattern, part)
            self._sparse_blocks(sub, block)
            return block.density

        return attend_in_parts(call, [part for part, _ in runs], attend_part)

    def _sparse_blocks(self, call, pattern):
        q, k = call.q, call.k
        out = call.out if call.out is not None else torch.empty_like(q)
        route = call.route(block_kernel(self.block_size), pattern.head_density)
        rows = min(q.shape[2], pattern.video_blocks * self.block_size)
        lses = []  # per launch (exact, compensated), in token order (the planner never permutes tokens)
        if route.whole:  # these heads all run dense (a few heads of a call split for memory)
            lses.append((torch.full(q.shape[:3], -math.inf, device=q.device), None))
        else:
            if rows:  # (the dense heads' rows are written after: no compensation for them)
                sparse = [h for h in range(q.shape[1]) if h not in route.dense]
                self._launch(call, q[:, :, :rows], pattern.kv_indices.to(torch.int32),
                             keep_sparse(pattern.kv_counts, route), out[:, :, :rows], lses,
                             sparse if call.compensate else False)
            if rows < q.shape[2]:  # text rows: every key block, nothing to compensate
                layout = self._full_layout(q.shape[2] - rows, k.shape[2], self.block_size, q.device)
                self._launch(call, q[:, :, rows:], *layout, out[:, :, rows:], lses, False)
        call.fill_dense(route, out)
        if call.want_lse:
            call.lse = torch.cat([exact for exact, _ in lses], dim=-1)
            call.lse_compensated = torch.cat([exact if comp is None else comp for exact, comp in lses], dim=-1) \
                if call.compensate else None
        return out

    def _launch(self, call, q, kv_indices, kv_counts, out, lses, compensate):
        """One launch over ``q``'s rows; ``compensate``: False, or the heads whose skipped keys get their term."""
        result = block_sparse_attention(q, call.k, call.v, kv_indices, kv_counts, block_size=self.block_size,
                                        kv_length=call.kv_length, out=out, backend=call.backend,
                                        check_layout=False, return_lse=call.want_lse, summarise=compensate,
                                        precision=call.precision, scattered=True)
        if call.want_lse:
            lses.append(split_lse(result, compensate is not False)[1:])

    def _full_layout(self, rows, keys, block_size, device):
        """The layout of ``rows`` query rows attending to all ``keys`` (text rows, a first search's dense pass)."""
        key = (block_size, num_blocks(rows, block_size), num_blocks(keys, block_size), device)
        if key not in self._full_layouts:
            self._full_layouts[key] = full_layout(*key[1:])
        return self._full_layouts[key]

    def block_mask(self, grid: VideoGrid, layer: int | None = None) -> torch.Tensor | None:
        """CPU bool (H, NQB, NKB): ``layer``'s searched layout for batch element 0, its heads in order."""
        entries = [(k, e) for k, e in self._layers.get(layer, {}).items() if k[0] == grid and e.pattern is not None]
        if not entries:
            return None
        masks = []
        for key, e in sorted(entries, key=lambda item: item[0][3]):  # by first head
            p = e.pattern
            video = indices_to_block_mask(p.kv_indices[0].to(torch.int32), p.kv_counts[0], p.num_blocks)
            text = torch.ones(video.shape[0], p.num_blocks - p.video_blocks, p.num_blocks, dtype=torch.bool,
                              device=video.device)
            mask = torch.cat([video, text], dim=1).cpu()
            for h, on_clusters in enumerate(e.clustered):
                if on_clusters and self._clusters.has_tiles(grid, layer, key[3] + h):
                    mask[h] = self._clusters.head_tiles(grid, layer, key[3] + h)
            masks.append(mask)
        return torch.cat(masks)

    def class_counts(self) -> dict:
        """{'block': heads, 'cluster': heads} over the last search of every layer and head range of the run (the run
        summary's count); empty when cluster_heads is off."""
        if self._clusters is None:
            return {}
        entries = [e for layer in self._layers.values() for e in layer.values() if e.pattern is not None]
        clusters = sum(sum(e.clustered) for e in entries)
        return {"block": sum(e.pattern.kv_counts.shape[1] for e in entries) - clusters, "cluster": clusters}

    def cache_bytes(self) -> dict:
        """{(layer, grid, batch, device, first head, heads): device bytes of its layout and cached LSE,
        ('cluster centroids', layer, head): bytes of a cluster-served head's centroids}."""
        sizes = {(layer, *key): sum(part.nbytes for part in (e.pattern, e.lse) if part is not None)
                 for layer, entries in self._layers.items() for key, e in entries.items()}
        if self._clusters is not None:  # cluster-served heads' centroids, per (layer, head)
            sizes.update({("cluster centroids", *key): size for key, size in self._clusters.cache_bytes().items()})
        return sizes

    def to(self, device) -> None:
        """Move the cluster-served heads' centroids to ``device`` (the model moved)."""
        if self._clusters is not None:
            self._clusters.to(device)

    def reset(self) -> None:
        """A new sampling run: patterns, LSEs (and centroids) were learned from the last run's q and k; drop them."""
        self._layers.clear()
        self._full_layouts.clear()
        if self._clusters is not None:
            self._clusters.reset()


def pattern_heads(pattern: AdaSpaPattern, part: slice) -> AdaSpaPattern:
    """The pattern of heads ``part`` alone (a run of block heads between cluster-served ones)."""
    head_density = pattern.head_density[part]
    return replace(pattern, kv_indices=pattern.kv_indices[:, part], kv_counts=pattern.kv_counts[:, part],
                   recall=pattern.recall[:, part], head_density=head_density,
                   density=sum(head_density) / len(head_density))


def head_runs(clustered: tuple) -> list:
    """(heads, on clusters) for each run of consecutive heads of one path: block heads together, each cluster-served
    head alone (its centroids are keyed by its true head)."""
    runs, start = [], 0
    for h in range(1, len(clustered) + 1):
        if h == len(clustered) or clustered[h] != clustered[start] or clustered[start]:
            runs.append((slice(start, h), clustered[start]))
            start = h
    return runs
