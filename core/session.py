"""The per-patched-model state: method planner, schedule, per-run statistics and one-time warnings."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

import torch

from ..kernels import BACKENDS
from .grid import VideoGrid
from .method import AttentionCall
from .radial import RadialSettings
from .schedule import SparseSchedule, step_index
from .summary import run_summary
from .timing import CallTimer

log = logging.getLogger("sparse_video_attention")


@dataclass
class ForwardContext:
    """One call of the diffusion model: its video grid, denoising step, and a counter of attention layers.

    ``text_after_video``: the model appends text tokens to the video tokens in self-attention (HunyuanVideo).
    ``owner``: the session that made it; only that session's override acts on it (None: any, a context built by
    hand). A model patched twice then has one session at work, never two counting the same layers.
    """

    video: VideoGrid
    step: int | None
    total_steps: int | None
    text_after_video: bool = False
    conditionings: int = 1  # the batch: this many chunks of the same latents (ComfyUI's cond_or_uncond)
    layer: int = 0
    memo: dict = field(default_factory=dict)  # per-forward results every layer shares (e.g. the text mask)
    owner: object = field(default=None, repr=False, compare=False)

    def grid_for(self, length: int) -> VideoGrid | None:
        """The grid of a self-attention call over ``length`` tokens, or None if it is not over this video.

        When ``video.text_tokens`` is known (> 0) only exactly video + text tokens match; otherwise, with
        ``text_after_video``, any longer call is taken as video followed by text.
        """
        if length == self.video.total_tokens:
            return self.video
        if self.text_after_video and not self.video.text_tokens and length > self.video.video_tokens:
            return replace(self.video, text_tokens=length - self.video.video_tokens)
        return None

    def next_layer(self) -> int:
        self.layer += 1
        return self.layer - 1


@dataclass
class RunStats:
    """What one sampling run did, kept after it for the run summary and the Inspector (small: no tensors).

    calls: per (step, layer) the density used (1.0 for a dense call). fallbacks: per reason (key) how many times
    attention fell back to dense, with the first message of each in fallback_messages. layouts: per layer the
    video grid of its last sparse call (the planner rebuilds that call's block mask from it). timings: per timed
    call (verbose only) (step, layer, density, milliseconds), filled when the run ends.
    """

    calls: dict = field(default_factory=dict)
    fallbacks: dict = field(default_factory=dict)
    fallback_messages: dict = field(default_factory=dict)
    layouts: dict = field(default_factory=dict)
    grid: VideoGrid | None = None
    total_steps: int | None = None
    timings: list = field(default_factory=list)
    last_call: tuple | None = None
    finished: bool = False

    def record(self, step, layer: int, density: float) -> None:
        self.calls[(step, layer)] = density
        self.last_call = (step, layer, density)

    @property
    def sparse_calls(self) -> int:
        return sum(1 for d in self.calls.values() if d < 1.0)

    @property
    def dense_calls(self) -> int:
        return sum(1 for d in self.calls.values() if d >= 1.0)

    @property
    def mean_density(self) -> float:
        """Attention work done over the dense work, across every video self-attention call of the run."""
        return sum(self.calls.values()) / len(self.calls) if self.calls else 1.0

    @property
    def sparse_density(self) -> float:
        """Mean density of the sparse calls alone (1.0 when there were none)."""
        sparse = [d for d in self.calls.values() if d < 1.0]
        return sum(sparse) / len(sparse) if sparse else 1.0

    @property
    def num_layers(self) -> int:
        """Video self-attention layers seen in the run (the highest layer index + 1)."""
        return 1 + max((layer for _, layer in self.calls), default=-1)


def make_planner(method):
    """The planner of a method's settings (see core.method); ValueError for anything that is not a method."""
    if not callable(getattr(method, "make_planner", None)):
        raise ValueError(f"method must be the output of a sparse attention settings node (Radial Mask, SVG Settings, "
                         f"SVG2 K-Means Settings, AdaSpa Search), got {type(method).__name__}")
    return method.make_planner()


class SparseAttentionSession:
    """Everything one patched model needs between attention calls. Pure torch; ComfyUI stays in nodes/."""

    def __init__(self, method, schedule: SparseSchedule, backend: str = "auto", verbose: bool = False):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.method = method
        self.schedule = schedule
        self.backend = backend
        self.verbose = verbose
        self.planner = make_planner(method)
        self.stats = RunStats()
        self.runs = 0  # sampling runs begun (0: the model never sampled)
        self.timer = CallTimer() if verbose else None  # per-call attention times, only when verbose
        self._warned: set[str] = set()

    def begin_run(self) -> None:
        """A new sampling run: per-run state and statistics start afresh."""
        self.stats = RunStats()
        self.runs += 1
        self.planner.reset()
        if self.timer is not None:
            self.timer.reset()

    def end_run(self) -> None:
        """The run is over: resolve the measured times and log the run summary (always, a few lines)."""
        self.stats.finished = True
        try:  # a report must never break a render
            if self.timer is not None:
                self.stats.timings = self.timer.resolve()
            log.info("%s", run_summary(self))
        except Exception as why:
            log.warning("sparse attention: the run summary failed (%s: %s)", type(why).__name__, why)

    def block_mask(self, layer: int) -> torch.Tensor | None:
        """CPU bool (NQB, NKB) block mask of ``layer``'s last sparse call in the last run; None if it had none."""
        grid = self.stats.layouts.get(layer)
        return None if grid is None else self.planner.block_mask(grid, layer)

    def forward_context(self, video: VideoGrid, sigma: float | None, sample_sigmas,
                        text_after_video: bool = False, conditionings: int = 1) -> ForwardContext:
        step = total = None
        if sigma is not None and sample_sigmas is not None and len(sample_sigmas) > 1:
            step, total = step_index(sigma, sample_sigmas), len(sample_sigmas) - 1
            self.stats.total_steps = total
        self.stats.grid = video
        if step is None:
            self.warn_once("no-step", "the denoising step is unknown (no sampler sigmas reached the model): "
                           "attention stays dense for these calls")
        return ForwardContext(video=video, step=step, total_steps=total, text_after_video=text_after_video,
                              conditionings=max(1, conditionings), owner=self)

    def cache_bytes(self) -> dict:
        """Device bytes the session keeps between attention calls, per cache entry of its planner (for Radial, per
        (grid, device) the cached layout; at most ``MAX_PLANS`` of them)."""
        return self.planner.cache_bytes()

    def move_caches(self, device) -> None:
        """The patched model moved to ``device``: a planner that keeps state on the device (``to``) follows it."""
        move = getattr(self.planner, "to", None)
        if move is not None:
            move(device)

    def wants_sparse(self, ctx: ForwardContext, layer: int) -> bool:
        return ctx.step is not None and self.schedule.is_sparse(ctx.step, ctx.total_steps, layer)

    def record_dense(self, ctx: ForwardContext, layer: int) -> None:
        self.stats.record(ctx.step, layer, 1.0)

    def attend(self, ctx: ForwardContext, layer: int, q, k, v, kv_length=None, out=None,
               head_offset: int = 0) -> tuple[torch.Tensor, float]:
        """Sparse attention of (B, H, L, D) q/k/v over the video of ``ctx``: (output, density computed).
        ValueError for what it cannot run. The caller books the call (record_sparse) once per layer."""
        return self.planner.attend(self._call(ctx, layer, q, k, v, kv_length, out, head_offset))

    def wants_prime(self, ctx: ForwardContext, layer: int) -> bool:
        """A dense call the planner wants to see (``prime``: e.g. AdaSpa takes the LSE its first search needs from
        the dense step before it): the last dense step before the layer's first sparse step."""
        return ctx.step is not None and callable(getattr(self.planner, "prime", None)) \
            and self.schedule.precedes_sparse(ctx.step, ctx.total_steps, layer)

    def prime(self, ctx: ForwardContext, layer: int, q, k, v, kv_length=None, out=None,
              head_offset: int = 0) -> tuple[torch.Tensor, float]:
        """Dense attention of a call ``wants_prime`` picked, through the planner: (exact output, 1.0)."""
        return self.planner.prime(self._call(ctx, layer, q, k, v, kv_length, out, head_offset)), 1.0

    def _call(self, ctx, layer, q, k, v, kv_length, out, head_offset) -> AttentionCall:
        chunks = ctx.conditionings if q.shape[0] % ctx.conditionings == 0 else 1
        return AttentionCall(grid=ctx.grid_for(q.shape[2]), layer=layer, step=ctx.step, total_steps=ctx.total_steps,
                             q=q, k=k, v=v, kv_length=kv_length, out=out, backend=self.backend,
                             head_offset=head_offset, conditionings=chunks)

    def record_sparse(self, ctx: ForwardContext, layer: int, grid: VideoGrid, density: float) -> None:
        """Book a sparse call: its density, and its grid so the Inspector can rebuild the layer's layout."""
        self.stats.record(ctx.step, layer, density)
        self.stats.layouts[layer] = grid

    def warn_once(self, key: str, message: str) -> None:
        self.stats.fallbacks[key] = self.stats.fallbacks.get(key, 0) + 1
        self.stats.fallback_messages.setdefault(key, message)
        if key not in self._warned:
            self._warned.add(key)
            log.warning("sparse attention: %s", message)
