"""Sparse VideoGen (SVG1, Xi et al. 2025): each attention head is spatial or temporal, decided online.

Per (layer, head) a few query rows (``sample_fraction`` of the video tokens, strided) are profiled: their exact
attention output against all keys, and their output under the spatial and under the temporal layout
(core/svg_layout.py, the exact token masks the kernel then computes), in one pass (kernels.mask_errors). The
layout with the lower mean squared error wins (summed over the latents of the batch's first conditioning chunk;
the other conditionings share the choice, core.method). Classes are kept per (layer, grid, heads) and re-profiled
every ``reprofile_every`` denoising steps; they are per-run state.

Running a call: spatial heads run in place on the block-sparse kernel, one launch for all of them (temporal heads
get empty key lists there). Temporal heads are gathered, a few at a time, into token-major order (the layout
transform: their key blocks become a contiguous band), run with the temporal layout, and scattered back into the
output in the original order (kernels.row_gather). Text tokens keep their place in both orders.

With ``semantic_heads`` on, a head that neither layout serves but SVG2's clusters do (core/svg_semantic.py) is
profiled semantic and runs through an SVG2 planner of ``semantic_clusters``, one head at a time (its centroids keyed
by the true head); the call then runs its consecutive block heads and its semantic heads as sub-calls.

With ``call.compensate`` each row gets the summed term of the keys its layout skips (kernels/block_summary.py), over
the blocks of the order its layout is in (frame-major for spatial heads, token-major for temporal ones: the layout
transform's blocks). The spatial launch adds it itself; the temporal heads get theirs after their chunks, every
temporal head at once, read through the token-major order (kernels.compensate_block_layout): a summary per chunk
was dozens of small launches a head, which at short calls took more host time than dense attention.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..kernels import (block_mask_to_indices, block_sparse_attention, candidate_mask_errors, compensate_block_layout,
                       gather_head_rows, scatter_head_rows, validate_layout)
from .break_even import block_kernel
from .grid import VideoGrid
from .memory import attend_in_parts, head_bytes, heads_per_chunk
from .method import AttentionCall, split_lse
from .routing import keep_sparse
from .svg2 import PRESETS as SVG2_PRESETS, SVG2Planner, SVG2Settings
from .svg_semantic import semantic_heads
from .svg_layout import (sampled_rows, svg_block_masks, temporal_mask_in_original_order, token_major_order,
                         token_major_position)

BLOCK_SIZES = (64, 128)
MAX_PLANS = 4  # cached device layouts per planner: a few resolutions at most are alive at once
# Temporal heads are reordered a few at a time into four buffers (q, k, v, output) of one head's size each per head:
# the heads per chunk keep them within core.memory's budget, however many heads are temporal.
TEMPORAL_COPIES = 4


@dataclass(frozen=True)
class SVGPreset:
    """What the reference scripts run for one model (svg-project/Sparse-VideoGen, scripts/*_svg.sh): the SVG
    settings, and the dense schedule to set on the Sparse Attention Patch (first_times_fp / first_layers_fp there)."""

    model: str
    sparsity: float
    attention_sink: bool
    dense_steps: float
    dense_layers: int

    def text(self) -> str:
        return (f"{self.model}: sparsity {self.sparsity:g}, attention_sink {'on' if self.attention_sink else 'off'}; "
                f"on the patch dense_steps {self.dense_steps:g}, dense_layers {self.dense_layers}")


SVG_PRESETS = (
    SVGPreset("Wan 2.1 T2V 14B", sparsity=0.3, attention_sink=True, dense_steps=0.2, dense_layers=1),
    SVGPreset("HunyuanVideo T2V", sparsity=0.25, attention_sink=False, dense_steps=0.1, dense_layers=1),
)


@dataclass(frozen=True)
class SVGSettings:
    sparsity: float = 0.25
    sample_fraction: float = 0.001
    reprofile_every: int = 1
    block_size: int = 128
    attention_sink: bool = True
    semantic_heads: bool = False
    semantic_clusters: SVG2Settings = SVG2_PRESETS["wan_720p"]

    def __post_init__(self):
        # Written so that NaN (which an API prompt can send past the UI's min / max) is rejected too.
        if not 0.0 < self.sparsity < 1.0:
            raise ValueError(f"sparsity must be in (0, 1) (the fraction of attention kept), got {self.sparsity}; "
                             "the reference uses 0.3 for Wan and 0.25 for HunyuanVideo")
        if not 0.0 < self.sample_fraction <= 1.0:
            raise ValueError(f"sample_fraction must be in (0, 1], got {self.sample_fraction}; it is the fraction of "
                             "video queries profiled to classify the heads (0.001 profiles 76 rows at 720p)")
        if isinstance(self.reprofile_every, bool) or not isinstance(self.reprofile_every, int) \
                or self.reprofile_every < 1:
            raise ValueError(f"reprofile_every must be a whole number of steps >= 1, got {self.reprofile_every!r} "
                             "(1 re-profiles every step, as the reference)")
        if self.block_size not in BLOCK_SIZES:
            raise ValueError(f"block_size must be one of {BLOCK_SIZES}, got {self.block_size}")
        if not isinstance(self.semantic_heads, bool):
            raise ValueError(f"semantic_heads must be True or False, got {self.semantic_heads!r}")
        if not isinstance(self.semantic_clusters, SVG2Settings):
            raise ValueError("semantic_clusters must be SVG2Settings (the k-means and top-p of semantic heads), got "
                             f"{type(self.semantic_clusters).__name__}")

    def make_planner(self) -> "SVGPlanner":
        return SVGPlanner(self)


@dataclass(frozen=True)
class SVGPlan:
    """Device tensors of one grid: both layouts, the token-major order, and the profiling tables."""

    spatial_indices: torch.Tensor   # (1, 1, NB, max kept) int32
    spatial_counts: torch.Tensor    # (NB,) int32
    temporal_indices: torch.Tensor  # (1, 1, NB, max kept) int32
    temporal_counts: torch.Tensor   # (1, 1, NB) int32
    order: torch.Tensor             # (L,) int32, token_major_order
    rows: torch.Tensor              # (R,) int64, sampled query rows
    keep: torch.Tensor              # (2, R, NB) uint8: the layout row of each sampled query, spatial then temporal
    key_block: torch.Tensor         # (2, L) int32: each key's block in frame-major, then in token-major order
    spatial_tiles: int
    temporal_tiles: int

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in (self.spatial_indices, self.spatial_counts, self.temporal_indices,
                                      self.temporal_counts, self.order, self.rows, self.keep, self.key_block))


@dataclass(frozen=True)
class HeadClasses:
    """The class of each head of one (layer, grid, head range), profiled at ``step``. ``parts``: with semantic
    heads, (heads, their HeadClasses or None for semantic ones) for each run of consecutive heads of one path."""

    step: int | None
    temporal: tuple               # bool per head
    spatial_counts: torch.Tensor | None  # (1, H, NB) int32: the spatial layout's counts, 0 for temporal heads
    temporal_heads: torch.Tensor | None  # (number of temporal heads,) int32; both None when there are parts
    semantic: tuple = ()          # bool per head (empty: none is)
    parts: tuple = ()

    @property
    def nbytes(self) -> int:
        if self.parts:
            return sum(classes.nbytes for _, classes in self.parts if classes)
        return self.spatial_counts.nbytes + self.temporal_heads.nbytes

    def kind(self, head: int) -> str:
        if self.semantic and self.semantic[head]:
            return "semantic"
        return "temporal" if self.temporal[head] else "spatial"


def block_classes(step, temporal: tuple, plan: "SVGPlan", device) -> HeadClasses:
    """The HeadClasses of heads that all run a block layout, temporal per ``temporal``."""
    flags = torch.tensor(temporal, device=device)
    counts = torch.where(flags[:, None], 0, plan.spatial_counts[None, :]).to(torch.int32)[None]
    heads = torch.tensor([h for h, flag in enumerate(temporal) if flag], dtype=torch.int32, device=device)
    return HeadClasses(step, tuple(temporal), counts.contiguous(), heads)


def with_semantic(step, temporal: tuple, semantic: tuple, plan: "SVGPlan", device) -> HeadClasses:
    """The HeadClasses of a call some of whose heads are semantic: its parts are the runs of consecutive heads of one
    path, block parts with their own classes."""
    temporal = tuple(t and not s for t, s in zip(temporal, semantic))
    parts, start = [], 0
    for h in range(1, len(semantic) + 1):
        if h == len(semantic) or semantic[h] != semantic[start]:
            part = slice(start, h)
            parts.append((part, None if semantic[start] else block_classes(step, temporal[part], plan, device)))
            start = h
    return HeadClasses(step, temporal, None, None, tuple(semantic), tuple(parts))


def build_plan(grid: VideoGrid, settings: SVGSettings, device: torch.device) -> SVGPlan:
    block = settings.block_size
    spatial, temporal = svg_block_masks(grid, settings.sparsity, block, settings.attention_sink)
    position = token_major_position(grid)
    rows = sampled_rows(grid, settings.sample_fraction)
    keep = torch.stack([spatial[rows // block], temporal[position[rows] // block]]).to(torch.uint8)
    key_block = torch.stack([torch.arange(grid.total_tokens) // block, position // block]).to(torch.int32)
    s_idx, s_cnt = block_mask_to_indices(spatial.to(device)[None, None])
    t_idx, t_cnt = block_mask_to_indices(temporal.to(device)[None, None])
    for idx, cnt in ((s_idx, s_cnt), (t_idx, t_cnt)):  # once; calls then skip the device sync
        validate_layout(idx, cnt, num_kv_blocks=spatial.shape[1])
    return SVGPlan(s_idx, s_cnt[0, 0], t_idx, t_cnt, token_major_order(grid).to(device, torch.int32),
                   rows.to(device), keep.to(device), key_block.to(device),
                   int(spatial.sum()), int(temporal.sum()))


class SVGPlanner:
    """Per-head spatial / temporal layouts on the block-sparse kernel, classes profiled online."""

    compensates = True
    # compensate 'auto' turns it on: on the proxy (H100, 3 seeds, density 0.25) it took the video from 33.2 to 42.3 dB
    # at 4 steps cfg 1 and from 21.0 to 26.4 dB at 20 steps cfg 4, and the compensated call stays faster than dense
    # at short calls too (Wan 1.3B 480p 7.2 ms against 10.4, Wan 14B 720p 88.8 against ~200; H100, benchmarks/
    # RESULTS.md, issue 17, 2026-12-06) since its temporal heads are compensated in one go
    compensate_by_default = True

    def __init__(self, settings: SVGSettings):
        self.settings = settings
        self._plans: dict = {}    # (grid, device) -> SVGPlan; layouts depend on the grid only, they survive runs
        self._classes: dict = {}  # (layer, grid, head_offset, heads) -> HeadClasses; per run
        self.profiled_calls = 0   # calls that profiled their heads (the cache's effect, for tests and benchmarks)
        # semantic heads' k-means, centroid cache and tile drawings (None: the class is off)
        self._clusters = SVG2Planner(settings.semantic_clusters, settings.block_size) \
            if settings.semantic_heads else None

    @property
    def block_size(self) -> int:
        return self.settings.block_size

    def plan(self, grid: VideoGrid, device: torch.device) -> SVGPlan:
        key = (grid, device)
        if key not in self._plans:
            if len(self._plans) >= MAX_PLANS:
                self._plans.pop(next(iter(self._plans)))
            self._plans[key] = build_plan(grid, self.settings, device)
        return self._plans[key]

    def attend(self, call: AttentionCall) -> tuple[torch.Tensor, float]:
        q = call.q
        if q.shape[2] != call.grid.total_tokens:
            raise ValueError(f"q has {q.shape[2]} tokens but the grid {call.grid} has {call.grid.total_tokens}")
        plan = self.plan(call.grid, q.device)
        classes = self.head_classes(call, plan)
        if classes.parts:
            return self._attend_parts(call, plan, classes)
        return self._attend_blocks(call, plan, classes)

    def _attend_parts(self, call: AttentionCall, plan: SVGPlan, classes: HeadClasses) -> tuple[torch.Tensor, float]:
        """A call with semantic heads: each run of block heads as one sub-call, each semantic head as its own
        sub-call of the cluster planner (its centroids keyed by the true head); their LSE rows gathered."""
        runs = [(heads, block) for part, block in classes.parts
                for heads in ([part] if block else [slice(h, h + 1) for h in range(part.start, part.stop)])]
        block_of = {heads.start: block for heads, block in runs}

        def attend_part(sub, heads):
            block = block_of[heads.start]
            return self._attend_blocks(sub, plan, block)[1] if block else self._clusters.attend(sub)[1]

        return attend_in_parts(call, [heads for heads, _ in runs], attend_part)

    def _attend_blocks(self, call: AttentionCall, plan: SVGPlan, classes: HeadClasses) -> tuple[torch.Tensor, float]:
        """Heads that all run a block layout: spatial ones in one launch, temporal ones reordered."""
        q = call.q
        nb = plan.keep.shape[2]
        tiles = [plan.temporal_tiles if temporal else plan.spatial_tiles for temporal in classes.temporal]
        route = call.route(block_kernel(self.block_size), [t / (nb * nb) for t in tiles])
        out = call.out if call.out is not None else torch.empty_like(q)
        temporal_heads = _without(classes.temporal_heads, route.dense)
        spatial = [h for h, temporal in enumerate(classes.temporal) if not temporal and h not in route.dense]
        # (exact LSE, compensated LSE) rows, (B, H, L) in the original order, when asked for or when the temporal heads'
        # compensation needs their exact rows (the second one only with compensation); temporal heads' rows are
        # written by their own launches, dense heads' stay -inf.
        lses = (None, None)
        want_lse = call.want_lse or (call.compensate and temporal_heads.numel() > 0)
        if spatial:  # every spatial head in one launch, in place
            # (temporal and dense heads have empty lists here and their rows are written after: compensated or not,
            # only the spatial heads get the skipped keys' term)
            result = block_sparse_attention(q, call.k, call.v, plan.spatial_indices.expand(1, q.shape[1], -1, -1),
                                            keep_sparse(classes.spatial_counts, route), block_size=self.block_size,
                                            kv_length=call.kv_length, out=out, backend=call.backend,
                                            check_layout=False, return_lse=want_lse,
                                            summarise=spatial if call.compensate else False,
                                            precision=call.precision)
            if want_lse:
                lses = split_lse(result, call.compensate)[1:]
        elif want_lse:
            lses = tuple(torch.full(q.shape[:3], -math.inf, device=q.device, dtype=torch.float32) if wanted
                         else None for wanted in (True, call.compensate))
        if temporal_heads.numel():
            temporal = [h for h, flag in enumerate(classes.temporal) if flag and h not in route.dense]
            self._attend_temporal(call, plan, temporal_heads, out, lses)
            if call.compensate:
                self._compensate_temporal(call, plan, temporal, temporal_heads, out, lses)
        call.fill_dense(route, out)
        if call.want_lse:
            call.lse, call.lse_compensated = lses
        return out, sum(tiles) / (len(tiles) * nb * nb)

    def _attend_temporal(self, call: AttentionCall, plan: SVGPlan, temporal_heads: torch.Tensor, out, lses) -> None:
        """Temporal heads in token-major order, a few at a time, scattered back into ``out`` (and their exact LSE rows
        into ``lses[0]``, (B, H, L) float32 in the original order, when it is given)."""
        B, _, L, D = call.q.shape
        step = heads_per_chunk(call.q, TEMPORAL_COPIES * head_bytes(call.q))
        size = min(step, temporal_heads.numel())
        buffers = torch.empty(TEMPORAL_COPIES, B, size, L, D, device=call.q.device, dtype=call.q.dtype)
        exact = lses[0]
        for h0 in range(0, temporal_heads.numel(), step):
            heads = temporal_heads[h0:h0 + step]
            qt, kt, vt, ot = (buf[:, :heads.numel()] for buf in buffers)
            for src, dst in ((call.q, qt), (call.k, kt), (call.v, vt)):
                gather_head_rows(src, heads, plan.order, out=dst, backend=call.backend)
            result = block_sparse_attention(qt, kt, vt, plan.temporal_indices, plan.temporal_counts,
                                            block_size=self.block_size, kv_length=call.kv_length, out=ot,
                                            backend=call.backend, check_layout=False,
                                            return_lse=exact is not None, precision=call.precision)
            scatter_head_rows(ot, heads, plan.order, out, backend=call.backend)
            if exact is not None:  # row t of the token-major order is original token order[t]
                exact[:, heads.long()[:, None], plan.order.long()[None, :]] = result[1]

    def _compensate_temporal(self, call: AttentionCall, plan: SVGPlan, temporal: list, temporal_heads, out,
                             lses) -> None:
        """The skipped keys' term of every temporal head at once, after their chunks (their copies freed): the
        temporal layout over the token-major order, read through it. ``lses``: (exact, compensated) (B, H, L)
        float32, the first holding their exact rows; their compensated rows are written into the second."""
        lse_c = compensate_block_layout(out, lses[0], call.q, call.k, call.v, plan.temporal_indices,
                                        plan.temporal_counts, block_size=self.block_size, kv_length=call.kv_length,
                                        order=plan.order, heads=temporal, backend=call.backend, check_layout=False)
        lses[1][:, temporal_heads.long()] = lse_c[:, temporal_heads.long()]

    def head_classes(self, call: AttentionCall, plan: SVGPlan) -> HeadClasses:
        """The cached classes of the call's heads, profiled anew when missing or ``reprofile_every`` steps old."""
        heads = call.q.shape[1]
        key = (call.layer, call.grid, call.head_offset, heads)
        cached = self._classes.get(key)
        fresh = cached is not None and call.step is not None and cached.step is not None \
            and cached.step <= call.step < cached.step + self.settings.reprofile_every
        if fresh:
            return cached
        temporal = self.profile(call, plan)
        semantic = semantic_heads(call, plan, self._clusters) if self._clusters is not None else ()
        if any(semantic):
            classes = with_semantic(call.step, temporal, semantic, plan, call.q.device)
        else:
            classes = block_classes(call.step, temporal, plan, call.q.device)
        self._classes[key] = classes
        return classes

    def profile(self, call: AttentionCall, plan: SVGPlan) -> tuple:
        """Per head: True when the temporal layout's error on the sampled rows is lower than the spatial one's."""
        self.profiled_calls += 1
        first = call.first_conditioning()  # its classes serve the other conditionings (core.method)
        q_rows = first.q.index_select(2, plan.rows)
        errors = candidate_mask_errors(q_rows, first.k, first.v, plan.keep, plan.key_block,
                                       kv_length=first.kv_length, backend=call.backend).sum(dim=1)  # (2, H)
        return tuple(bool(t) for t in (errors[1] < errors[0]).tolist())  # reads back: one sync per profiled call

    def block_mask(self, grid: VideoGrid, layer: int | None = None) -> torch.Tensor | None:
        """CPU bool (H, NB, NB) of ``layer``'s last classes in the original token order: spatial heads their layout,
        temporal heads the tiles holding any pair their layout computes, semantic heads the tiles of their last
        clusters. None when the layer has no classes."""
        parts = sorted((key[2], classes) for key, classes in self._classes.items()
                       if key[0] == layer and key[1] == grid)
        if not parts:
            return None
        masks = {"spatial": svg_block_masks(grid, self.settings.sparsity, self.block_size,
                                            self.settings.attention_sink)[0],
                 "temporal": temporal_mask_in_original_order(grid, self.settings.sparsity, self.block_size)}
        drawn = []
        for offset, classes in parts:
            for h in range(len(classes.temporal)):
                kind = classes.kind(h)
                drawn.append(self._clusters.head_tiles(grid, layer, offset + h) if kind == "semantic" else masks[kind])
        return torch.stack(drawn)

    def class_counts(self) -> dict:
        """{class: heads} over the last classes of every layer and head range of the run (the run summary's count)."""
        counts = {"spatial": 0, "temporal": 0, "semantic": 0}
        for classes in self._classes.values():
            for h in range(len(classes.temporal)):
                counts[classes.kind(h)] += 1
        return counts

    def cache_bytes(self) -> dict:
        """{(grid, device): bytes of its layouts and profiling tables, (layer, grid, head_offset, heads): bytes of
        its head classes, ('semantic centroids', layer, head): bytes of a semantic head's centroids}: at most
        MAX_PLANS layouts; classes per sparse layer of the run."""
        sizes = {key: plan.nbytes for key, plan in self._plans.items()}
        sizes.update({key: classes.nbytes for key, classes in self._classes.items()})
        if self._clusters is not None:  # semantic heads' centroids, per (layer, head)
            sizes.update({("semantic centroids", *key): size for key, size in self._clusters.cache_bytes().items()})
        return sizes

    def to(self, device) -> None:
        """Move the semantic heads' centroids to ``device`` (the model moved); layouts are kept per device."""
        if self._clusters is not None:
            self._clusters.to(device)

    def reset(self) -> None:
        """A new run: head classes (and semantic heads' centroids) are learned from this run's q and k, so they are
        dropped; layouts stay."""
        self._classes.clear()
        if self._clusters is not None:
            self._clusters.reset()


def _without(heads: torch.Tensor, dropped: tuple) -> torch.Tensor:
    """The head indices ``heads`` (a device int32 tensor) less ``dropped`` (routed dense)."""
    if not dropped:
        return heads
    return heads[~torch.isin(heads, torch.tensor(dropped, device=heads.device, dtype=heads.dtype))]
