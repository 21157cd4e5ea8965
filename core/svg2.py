"""Sparse VideoGen2 (Yang et al. 2025): semantic-aware permutation with k-means and top-p cluster selection.

Per attention call, for every (latent, head) (the batch's first conditioning chunk; the layout is shared by the
other conditionings of the same latent, core.method):
  1. k-means on the video queries and, separately, on the video keys: the full iteration count on a layer's first
     sparse call of a run, then a few iterations warm-started from that layer's centroids of the previous step
     (the centroid cache: per layer and head chunk, all batch elements and heads in one tensor, on the device);
  2. per query cluster, the key clusters by the size-weighted centroid softmax P' until their mass passes top_p,
     and at least min_key_ratio of them (kernels.cluster_select);
  3. attention over the kept (query cluster, key cluster) blocks of variable size (kernels.cluster_block_attention:
     no padding), the kernel reading q, k, v and writing the output through the cluster orders: no permuted copy.
Steps 1-2 (the plan) run as many heads at a time as core.memory's budget allows: on a GPU (the counting sort, the
selection kernel) every head of a Wan 14B or HunyuanVideo 720p call in one group, so the plan's ~350 kernel launches
are paid once; the centroids are kept per first head of each group. Then one device sync reads every head's kept pairs,
heads above the cluster kernel's break-even go to the dense attention (core.routing), and step 3 launches group by
group with nothing more to wait for: the GPU runs the launches back to back while the host has returned. A layer whose
plan sends the whole call dense (diffuse keys: the plan keeps most pairs) runs dense unplanned until
DENSE_RECHECK_STEPS later, so it does not pay for k-means at every step to learn the same.

HunyuanVideo's text tokens (after the video) are not clustered; as in the reference they stay dense: the text
queries are one more query cluster that keeps every key cluster, the text keys one more key cluster that every
query cluster keeps, and the text padding lies past the last key offset, so it is never attended.

With ``call.compensate`` every non-empty key cluster a query cluster skips enters its rows' softmax through the
cluster's pooled statistics (mean key, mean value, size: kernels.pool_key_clusters of the permuted keys); with
OWN_TERMS set, its OWN_TERMS heaviest one term each and the others one term per row (kernels/skipped_summary.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..kernels import (batched_kmeans, cluster_block_attention, pool_key_clusters, select_key_clusters,
                       selection_backend, selection_pair_bytes, sort_point_bytes)
from .break_even import CLUSTER
from .cluster_view import cluster_tile_mask, pack_bits, tile_mask_bytes, unpack_bits
from .grid import VideoGrid
from .memory import head_parts, heads_of, heads_per_chunk
from .method import AttentionCall, share_over_conditionings, split_lse
from .routing import DenseCall, keep_sparse

INSPECT_BLOCK = 128  # tile size of the Inspector's drawing
# Bytes per head (core.memory). While a group of heads is planned: per token the labels of both k-means and the
# distances of one (and the sort's: kernels.sort_point_bytes), per centroid coordinate the
# float32 centroids, their rounded copy and the layer's new cache entry, per (query cluster, key cluster) pair the
# kept table (bool) and the selection's temporaries (kernels.selection_pair_bytes: none in the GPU's kernel). Kept for
# every head until its launch: per token the two cluster orders (int32), per pair the kept list (int32). Checked
# against the peak at Wan 14B 720p: benchmarks/memory.py.
KMEANS_BYTES = 16
LABEL_BYTES = 8  # of those, the labels of both, which the Inspector's drawing reads after the k-means
CENTROID_BYTES = 8
KEPT_TABLE_BYTES = 1
ORDER_BYTES = 8
KEPT_LIST_BYTES = 4
# Compensation's own terms per query cluster (kernels.cluster_block_attention's own_terms): None, a term for every
# skipped key cluster (measured: RESULTS.md). kernels.skipped_summary.OWN_TERMS (16 own, the rest summed, ~1% of the
# exact work a row against ~12%) matches it per call on the proxy's CPU runs; it becomes the default once a GPU has
# compiled, timed and rendered it (benchmarks/summary_cost.py, quality.py).
OWN_TERMS = None
MAX_CLUSTERS = 16384
MAX_ITERATIONS = 1000
# A layer whose plan sent the whole call dense (its keys too diffuse for the cluster kernel to beat dense) runs dense
# without planning until this many steps later, then plans again: a plan costs ~15% of a dense call at Wan 14B 720p,
# which every call of such a layer would otherwise add to dense's time. Over this period such a layer costs
# 1.01-1.02x dense (H100, benchmarks/never_slower.py; at 5 steps the plans showed through).
DENSE_RECHECK_STEPS = 10


@dataclass(frozen=True)
class SVG2Settings:
    """query_clusters / key_clusters: k-means clusters per head. top_p: key-cluster mass each query cluster keeps.
    min_key_ratio: the fewest key clusters kept, as a share of key_clusters. first_iterations: k-means iterations
    on a layer's first sparse step of a run; later_iterations: on the steps after it (warm-started)."""

    query_clusters: int = 300
    key_clusters: int = 1000
    top_p: float = 0.9
    min_key_ratio: float = 0.10
    first_iterations: int = 50
    later_iterations: int = 2

    def __post_init__(self):
        for name in ("query_clusters", "key_clusters"):
            value = getattr(self, name)
            if not isinstance(value, int) or not 1 <= value <= MAX_CLUSTERS:
                raise ValueError(f"{name} must be an integer in [1, {MAX_CLUSTERS}], got {value!r}")
        for name in ("first_iterations", "later_iterations"):
            value = getattr(self, name)
            if not isinstance(value, int) or not 1 <= value <= MAX_ITERATIONS:
                raise ValueError(f"{name} must be an integer in [1, {MAX_ITERATIONS}], got {value!r}; k-means needs "
                                 "at least one iteration")
        # Written so that NaN (which an API prompt can send past the UI's min/max) is rejected too.
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}; 0.9 is the reference, 1.0 keeps every key "
                             "cluster (dense attention)")
        if not 0.0 <= self.min_key_ratio <= 1.0:
            raise ValueError(f"min_key_ratio must be in [0, 1], got {self.min_key_ratio}; 0.10 is the reference")

    @property
    def min_key_clusters(self) -> int:
        """The fewest key clusters a query cluster keeps (the reference's int(min_kc_ratio * kc_num))."""
        return int(self.min_key_ratio * self.key_clusters)

    def make_planner(self) -> "SVG2Planner":
        return SVG2Planner(self)


PRESETS = {  # the reference scripts' settings per model, and this pack's faster variant
    "wan_720p": SVG2Settings(300, 1000, 0.9, 0.10, 50, 2),
    "hunyuan_720p": SVG2Settings(400, 1000, 0.9, 0.10, 50, 2),
    "turbo": SVG2Settings(300, 1000, 0.8, 0.05, 20, 1),
}


@dataclass
class _Centroids:
    """A layer's (and head chunk's) centroids of its last call, and what they were computed for."""

    signature: tuple
    queries: torch.Tensor  # (B, H, CQ, D)
    keys: torch.Tensor     # (B, H, CK, D)

    @property
    def nbytes(self) -> int:
        return self.queries.nbytes + self.keys.nbytes


@dataclass(frozen=True)
class _DenseVerdict:
    """A layer's (and head chunk's) last plan sent its whole call dense: at which plan densities, for what call
    (its _signature), and the steps [from_step, until_step) whose calls run dense unplanned (a step before the plan's,
    e.g. a sampler restarting without a new run, plans again)."""

    signature: tuple
    densities: tuple
    from_step: int
    until_step: int

    def covers(self, call: AttentionCall) -> bool:
        return self.signature == _signature(call) and self.from_step <= call.step < self.until_step


@dataclass(frozen=True)
class _TileView:
    """Batch element 0's per-head tile mask of a call, bit-packed on the CPU (the Inspector's drawing)."""

    grid: VideoGrid
    packed: torch.Tensor  # (H, NB, ceil(NB / 8)) uint8
    width: int


@dataclass
class _HeadsPlan:
    """A group of heads of one call, planned and not yet launched: heads ``part`` of the call, their cluster orders
    (B, h, video tokens) int32 and layout (q_offsets, k_offsets, kv_clusters, counts), shared over the
    conditionings; kept and all query-key pairs (B, h) float64; batch element 0's tile mask, bit-packed, on the
    device until the call's sync."""

    part: slice
    q_order: torch.Tensor
    k_order: torch.Tensor
    layout: tuple
    pairs: torch.Tensor
    dense: torch.Tensor
    tiles: torch.Tensor
    width: int


class SVG2Planner:
    """Per patched model: the centroid cache across the steps of a run, and the Inspector's tile masks (of
    ``block_size`` tokens: SVG draws its semantic heads through this planner at its own block size)."""

    compensates = True
    # compensate 'auto' turns it on: on the proxy it gained 4.7 dB at density 0.25 (20 steps, cfg 4) and 6.5 dB
    # (4 steps, cfg 1) for 1.26-1.30x the call's time (benchmarks/RESULTS.md, issue 17)
    compensate_by_default = True

    def __init__(self, settings: SVG2Settings, block_size: int = INSPECT_BLOCK):
        self.settings = settings
        self.block_size = block_size
        self._centroids: dict[tuple[int, int], _Centroids] = {}
        self._views: dict[int, dict[int, _TileView]] = {}  # layer -> head offset -> tiles of the last call
        self._dense: dict[tuple[int, int], _DenseVerdict] = {}

    def attend(self, call: AttentionCall) -> tuple[torch.Tensor, float]:
        s = self.settings
        H, L = call.q.shape[1:3]
        grid = call.grid
        if grid is None or grid.total_tokens != L:
            raise ValueError(f"SVG2 needs the video grid of the call: {L} tokens, grid {grid}")
        video = grid.video_tokens
        if not self.fits(grid):
            raise ValueError(f"query_clusters ({s.query_clusters}) and key_clusters ({s.key_clusters}) must be at most "
                             f"the {video} video tokens of this call; lower them in SVG2 K-Means Settings (a 720p "
                             "video has tens of thousands of tokens)")
        if call.kv_length is not None and not grid.text_tokens:
            raise ValueError("SVG2 takes key padding only after the video tokens (HunyuanVideo's text)")
        key = (call.layer, call.head_offset)
        verdict = self._dense.get(key)
        if verdict is not None and verdict.covers(call):
            call.route(CLUSTER, verdict.densities)  # sends the whole call dense again (core.routing.DenseCall)
        reserved = H * self.layout_head_bytes(call.q)
        group = heads_per_chunk(call.q, self.plan_head_bytes(call.q, _gpu_kernels(call)), reserved=reserved)
        drawing = self.drawing_heads(call.q, grid, group, reserved)
        plans = [self._plan_heads(heads_of(call, part, None), part, drawing) for part in head_parts(H, group)]
        # The call's one device sync, before any launch: every head's share of the pairs it keeps (routing) and the
        # pairs kept and in all (the call's density).
        pairs = torch.cat([plan.pairs for plan in plans], dim=1)
        dense = torch.cat([plan.dense for plan in plans], dim=1)
        densities, kept, total = torch.stack([(pairs / dense).mean(0), pairs.sum(0), dense.sum(0)]).tolist()
        self._keep_views(call, plans)
        self._dense.pop(key, None)
        try:
            route = call.route(CLUSTER, densities)
        except DenseCall:
            self._dense[key] = _DenseVerdict(_signature(call), tuple(densities), call.step,
                                             call.step + DENSE_RECHECK_STEPS)
            raise
        out = call.out if call.out is not None else torch.empty_like(call.q)
        lses = [torch.full(call.q.shape[:3], -math.inf, device=call.q.device) if wanted else None
                for wanted in (call.want_lse, call.want_lse and call.compensate)]
        while plans:  # each group's plan is freed once launched
            self._launch(call, plans.pop(0), route, out, lses)
        call.fill_dense(route, out)
        if call.want_lse:
            call.lse, call.lse_compensated = lses
        return out, sum(kept) / sum(total)

    def fits(self, grid: VideoGrid) -> bool:
        """Whether the grid has a video token for every query and key cluster."""
        return max(self.settings.query_clusters, self.settings.key_clusters) <= grid.video_tokens

    def runs_on(self, call: AttentionCall) -> bool:
        """Whether ``attend`` can run the call: a video token for every cluster, key padding only after text tokens
        (what a planner that sends some heads here checks first, instead of the ValueError)."""
        return self.fits(call.grid) and (call.kv_length is None or bool(call.grid.text_tokens))

    def plan_clusters(self, call: AttentionCall, order_out=None, with_kept: bool = False):
        """(query k-means, key k-means, selection) of the call's first conditioning chunk: k-means of its video
        queries and keys (warm-started from the layer's centroids, which it updates) and the key clusters each query
        cluster keeps (their order written into ``order_out`` when given; the kept table ``with_kept``)."""
        s = self.settings
        video = call.grid.video_tokens
        first = call.first_conditioning()  # its clusters and selection serve the other conditionings
        q_km, k_km = self._cluster(call, first.q[:, :, :video], first.k[:, :, :video])
        selection = select_key_clusters(q_km.centroids, k_km.centroids, k_km.sizes, top_p=s.top_p,
                                        min_clusters=s.min_key_clusters, scale=1.0 / math.sqrt(call.q.shape[-1]),
                                        backend=self.selection_backend(call), order_out=order_out,
                                        with_kept=with_kept)
        return q_km, k_km, selection

    def selection_backend(self, call: AttentionCall) -> str:
        """Where the call's selection runs: the kernel on a GPU when the key clusters fit it, else torch (also on
        the CPU, where Triton's interpreter would sort slowly)."""
        wanted = "auto" if _gpu_kernels(call) else "reference"
        return selection_backend(wanted, call.q.device, self.settings.key_clusters)

    def plan_head_bytes(self, q: torch.Tensor, gpu_kernels: bool) -> int:
        """Temporaries per head of a call whose queries are ``q`` while a group of heads is planned: the k-means
        tables and its sort's, the centroids, the selection's per pair and the kept table the Inspector's drawing
        starts from. ``gpu_kernels``: the plan runs the GPU's counting sort and selection kernel where the cluster
        counts allow (else torch's sort and selection, which hold much more)."""
        B, _, L, D = q.shape
        s = self.settings
        pair_bytes = selection_pair_bytes(s.key_clusters, gpu_kernels) + KEPT_TABLE_BYTES
        # The larger k-means' sort is the one that may fall back to torch's.
        token_bytes = KMEANS_BYTES + sort_point_bytes(max(s.query_clusters, s.key_clusters), gpu_kernels)
        return B * (token_bytes * L + CENTROID_BYTES * (s.query_clusters + s.key_clusters) * D
                    + pair_bytes * s.query_clusters * s.key_clusters)

    def layout_head_bytes(self, q: torch.Tensor) -> int:
        """What a head's plan keeps until its launch: its cluster orders and kept lists."""
        B = q.shape[0]
        s = self.settings
        return ORDER_BYTES * B * q.shape[2] + KEPT_LIST_BYTES * B * (s.query_clusters + 1) * (s.key_clusters + 1)

    def drawing_heads(self, q: torch.Tensor, grid: VideoGrid, group: int, reserved: int, device=None) -> int:
        """Heads at a time of the Inspector's tile mask in a call whose queries are ``q`` (on ``device``, default
        q's), planned ``group`` heads at a time beside ``reserved`` bytes (every head's layout): what the group holds
        then is its k-means labels, float32 centroids and kept tables."""
        B, _, L, D = q.shape
        s = self.settings
        held = reserved + group * B * (LABEL_BYTES * L + 4 * (s.query_clusters + s.key_clusters) * D
                                       + KEPT_TABLE_BYTES * s.query_clusters * s.key_clusters)
        return heads_per_chunk(q, self.tile_head_bytes(grid, q.device if device is None else device), reserved=held)

    def _plan_heads(self, call: AttentionCall, part: slice, drawing: int) -> "_HeadsPlan":
        """k-means, selection and layout of the heads of ``call`` (heads ``part`` of the whole call), shared over
        its conditionings; the Inspector's tile mask ``drawing`` heads at a time. Nothing is read back from the
        device."""
        s = self.settings
        L = call.q.shape[2]
        grid = call.grid
        video = grid.video_tokens
        latents, heads = call.first_conditioning().q.shape[:2]
        kv_clusters, video_lists = kept_lists(latents, heads, s.query_clusters, s.key_clusters, L > video,
                                              call.q.device)
        q_km, k_km, selection = self.plan_clusters(call, order_out=video_lists, with_kept=True)
        share = lambda t: share_over_conditionings(t, call)  # noqa: E731
        # Each conditioning chunk has its own text padding (kv_length): shared first, then the text added.
        q_offsets, k_offsets, kept_keys = share(q_km.offsets), share(k_km.offsets), share(selection.kept_keys)
        layout = with_text(q_offsets, k_offsets, share(kv_clusters), share(selection.counts), video, L, call.kv_length)
        pairs, dense = pair_counts(q_offsets, kept_keys, video, L, call.kv_length)
        tiles = self._tile_mask(q_km.labels[0], k_km.labels[0], selection.kept[0], grid, drawing)
        return _HeadsPlan(part, share(q_km.order), share(k_km.order), layout, pairs=pairs, dense=dense,
                          tiles=pack_bits(tiles), width=tiles.shape[-1])

    def tile_head_bytes(self, grid: VideoGrid, device) -> int:
        """Temporaries per head of the Inspector's tile mask (core.cluster_view) on ``device``."""
        s = self.settings
        nb = -(-grid.total_tokens // self.block_size)
        return tile_mask_bytes(nb, s.query_clusters + 1, s.key_clusters + 1, grid.total_tokens, device)

    def _launch(self, call: AttentionCall, plan: "_HeadsPlan", route, out: torch.Tensor, lses: list) -> None:
        """Run the heads of ``plan`` that ``route`` leaves sparse, written into ``out`` (and their LSE rows into
        ``lses``: exact, compensated)."""
        part = plan.part
        if set(range(part.start, part.stop)) <= set(route.dense):
            return  # every head of the group runs dense
        heads = heads_of(call, part, out)
        pooled = pool_key_clusters(heads.k, heads.v, plan.layout[1], backend=call.backend,
                                   k_order=plan.k_order) if call.compensate else None
        result = cluster_block_attention(heads.q, heads.k, heads.v, *plan.layout[:3],
                                         keep_sparse(plan.layout[3], route, part), out=heads.out,
                                         backend=call.backend, check_layout=False, return_lse=call.want_lse,
                                         pooled=pooled, own_terms=OWN_TERMS if pooled is not None else None,
                                         q_order=plan.q_order, k_order=plan.k_order)
        if call.want_lse:  # lses[1] is wanted exactly when pooled terms were given
            _, lse, lse_compensated = split_lse(result, pooled is not None)
            for rows, lse_part in zip(lses, (lse, lse_compensated)):
                if rows is not None:
                    rows[:, part] = lse_part

    def _keep_views(self, call: AttentionCall, plans: list) -> None:
        """Keep batch element 0's tile masks of the call's heads for the Inspector (a new call of the layer starts at
        head 0: float32 calls arrive a few heads at a time)."""
        views = self._views.setdefault(call.layer, {})
        if call.head_offset == 0:
            views.clear()
        for plan in plans:
            views[call.head_offset + plan.part.start] = _TileView(call.grid, plan.tiles.cpu(), plan.width)

    def _cluster(self, call: AttentionCall, q_video, k_video):
        """k-means of the video queries and keys, warm-started from this layer's cache when it fits the call."""
        s = self.settings
        B, H, _, D = q_video.shape
        key = (call.layer, call.head_offset)
        signature = (call.grid, B, H, D)
        cached = self._centroids.get(key)
        warm = cached is not None and cached.signature == signature
        iterations = s.later_iterations if warm else s.first_iterations
        q_km = batched_kmeans(q_video, s.query_clusters, iterations, backend=call.backend,
                              init=cached.queries.to(q_video.device) if warm else None)
        k_km = batched_kmeans(k_video, s.key_clusters, iterations, backend=call.backend,
                              init=cached.keys.to(k_video.device) if warm else None)
        # Stored in the activations' dtype: half the memory of float32, and what the assignment rounds to anyway.
        self._centroids[key] = _Centroids(signature, q_km.centroids.to(q_video.dtype),
                                          k_km.centroids.to(k_video.dtype))
        return q_km, k_km

    def _tile_mask(self, q_labels, k_labels, kept, grid: VideoGrid, chunk: int):
        """Batch element 0's (H, NB, NB) tile mask, ``chunk`` heads at a time; text tokens (and their padding) drawn
        as one more query and key cluster that keeps and is kept by every cluster. q_labels, k_labels (H, video
        tokens); kept (H, CQ, CK) bool."""
        H, text = q_labels.shape[0], grid.text_tokens
        if text:
            kept = torch.nn.functional.pad(kept, (0, 1, 0, 1), value=True)
        CQ, CK = kept.shape[1:]
        parts = []
        for part in head_parts(H, chunk):
            q_lab, k_lab = (torch.cat([labels[part], labels.new_full((part.stop - part.start, text), last)], 1)
                            for labels, last in ((q_labels, CQ - 1), (k_labels, CK - 1)))
            parts.append(cluster_tile_mask(q_lab, k_lab, kept[part], self.block_size))
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def reset(self) -> None:
        """A new sampling run: centroids of the last run's q/k no longer fit; drop them, the drawings and the dense
        verdicts."""
        self._centroids.clear()
        self._views.clear()
        self._dense.clear()

    def forget(self, layer: int, head_offset: int) -> None:
        """Drop the centroids, drawing and dense verdict kept for (layer, head_offset) (a head probed but not run
        here)."""
        self._centroids.pop((layer, head_offset), None)
        self._views.get(layer, {}).pop(head_offset, None)
        self._dense.pop((layer, head_offset), None)

    def to(self, device) -> None:
        """Move the centroid cache to ``device`` (the model moved; e.g. ComfyUI offloads it to the CPU)."""
        for entry in self._centroids.values():
            entry.queries = entry.queries.to(device)
            entry.keys = entry.keys.to(device)

    def block_mask(self, grid: VideoGrid, layer: int | None = None) -> torch.Tensor | None:
        """CPU bool (H, NB, NB) tile mask of ``layer``'s last call (batch element 0), None if it had none."""
        views = self._views.get(layer)
        if not views or any(view.grid != grid for view in views.values()):
            return None
        return torch.cat([unpack_bits(views[h].packed, views[h].width) for h in sorted(views)])

    def has_tiles(self, grid: VideoGrid, layer: int, head: int) -> bool:
        """Whether head ``head`` of ``layer`` last ran alone on ``grid`` (``head_tiles`` can draw it)."""
        view = self._views.get(layer, {}).get(head)
        return view is not None and view.grid == grid

    def head_tiles(self, grid: VideoGrid, layer: int, head: int) -> torch.Tensor:
        """CPU bool (NB, NB) tile mask of head ``head`` of ``layer``'s last call that ran it alone (SVG's semantic
        heads)."""
        view = self._views[layer][head]
        if view.grid != grid:
            raise ValueError(f"layer {layer} head {head} last ran on the grid {view.grid}, not {grid}")
        return unpack_bits(view.packed, view.width)[0]

    def cache_bytes(self) -> dict:
        """{(layer, first head): bytes of its cached query and key centroids} on the device."""
        return {key: entry.nbytes for key, entry in self._centroids.items()}


def _signature(call: AttentionCall) -> tuple:
    """What a dense verdict was reached for: the call's grid and its q's batch, heads and head dim."""
    B, H, _, D = call.q.shape
    return call.grid, B, H, D


def _gpu_kernels(call: AttentionCall) -> bool:
    """Whether the call's plan runs the GPU's kernels (the counting sort, the selection kernel) where its cluster
    counts fit them: on CUDA unless the torch reference was asked for."""
    return call.q.device.type == "cuda" and call.backend != "reference"


def _key_ends(batch: int, length: int, kv_length, device) -> torch.Tensor:
    """(batch,) where each batch element's keys end: ``length``, or ``kv_length`` (text padding after it)."""
    return torch.full((batch,), length, device=device) if kv_length is None else kv_length.to(device)


def kept_lists(latents: int, heads: int, query_clusters: int, key_clusters: int, text: bool, device):
    """(kv_clusters, video part): the kernel's kept lists (latents, heads, CQ, CK), and with text tokens (CQ + 1,
    CK + 1) with the text filled in: one more key cluster (id CK), first in every query cluster's list, and one
    more query cluster (the text queries) that keeps every key cluster. The video part, [..., :CQ, 1:] with text,
    is where the selection writes each query cluster's key clusters: no copy of the lists is ever made."""
    if not text:
        lists = torch.empty(latents, heads, query_clusters, key_clusters, device=device, dtype=torch.int32)
        return lists, lists
    lists = torch.empty(latents, heads, query_clusters + 1, key_clusters + 1, device=device, dtype=torch.int32)
    lists[:, :, :query_clusters, 0] = key_clusters
    # Text first: [CK, 0, .., CK - 1], made on the device (a copy from the host would wait for the GPU).
    lists[:, :, query_clusters] = torch.arange(key_clusters + 1, device=device, dtype=torch.int32).roll(1)
    return lists, lists[:, :, :query_clusters, 1:]


def with_text(q_offsets, k_offsets, kv_clusters, counts, video: int, length: int, kv_length):
    """(q_offsets, k_offsets, kv_clusters, counts) for the cluster attention kernel, ``kv_clusters`` from
    :func:`kept_lists`. Without text tokens: the clusters as they are. With text (tokens video..length): the text
    query cluster, and the text key cluster that ends at kv_length (the padding after it is never attended)."""
    if length == video:
        return q_offsets, k_offsets, kv_clusters, counts
    B, H = counts.shape[:2]
    k_end = _key_ends(B, length, kv_length, counts.device)
    q_offsets = torch.cat([q_offsets, q_offsets.new_full((B, H, 1), length)], dim=-1)
    k_offsets = torch.cat([k_offsets, k_end.to(torch.int32).view(B, 1, 1).expand(B, H, 1)], dim=-1)
    counts = torch.cat([counts + 1, counts.new_full((B, H, 1), kv_clusters.shape[-1])], dim=-1)
    return q_offsets, k_offsets, kv_clusters, counts


def pair_counts(q_offsets, kept_keys, video: int, length: int, kv_length):
    """(pairs, dense) (B, H) float64: the query-key pairs a layout computes (each video query cluster's rows times its
    kept video keys and every text key; the text rows every key) and those dense attention would, from the
    selection's kept keys: no (query cluster x key cluster) temporaries."""
    k_end = _key_ends(kept_keys.shape[0], length, kv_length, kept_keys.device).double()[:, None]
    q_sizes = (q_offsets[..., 1:] - q_offsets[..., :-1]).double()
    pairs = (q_sizes * (kept_keys.double() + (k_end - video)[..., None])).sum(-1) + (length - video) * k_end
    return pairs, (length * k_end).expand_as(pairs)
