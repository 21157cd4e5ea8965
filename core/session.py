"""The per-patched-model state: method planner, schedule, per-run statistics and one-time warnings."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

import torch

from ..kernels import BACKENDS
from ..kernels.eight_bit import EIGHT_BIT_DENSE, PRECISIONS, eight_bit_support
from .check import CheckResults, CheckSettings
from .dense_8bit import full_layout_attention
from .grid import VideoGrid
from .method import AttentionCall
from .routing import Route, Router, dense_lse_of_routed
from .schedule import SparseSchedule, step_index
from .summary import run_summary
from .timing import CallTimer

log = logging.getLogger("sparse_video_attention")
# The patch's compensate setting: 'auto' is each method's measured default (SparseAttentionSession._compensates)
COMPENSATE = ("auto", "off", "on")


@dataclass(frozen=True)
class BlockLayers:
    """How ComfyUI's block metadata (``transformer_options`` ``block_type`` / ``block_index``, set by newer ComfyUI
    for every block's attention) maps to the pack's layer index: ``offsets[block_type] + block_index``, ``count``
    layers in all (HunyuanVideo: double blocks 0.., then single blocks)."""

    offsets: dict
    count: int


@dataclass
class ForwardContext:
    """One call of the diffusion model: its token layout, denoising step, and how its attention calls find their layer.

    ``video``: the tokens of the video self-attention in the pack's order (every planner's): the video frames, then
    ``video.text_tokens`` non-video tokens (text, reference tokens) attended densely. ``leading_tokens``: how many of
    those non-video tokens the model puts in front of the video (HunyuanVideo since ComfyUI 0.33 puts its text
    first); the dispatcher moves them behind the video for the planners and back for the caller.
    ``blocks``: the block metadata map, when the model reports it (layer = the block, whatever other node takes
    some calls); without it attention calls are counted in call order (``next_layer``). ``reported``: the values
    ComfyUI reports in ``transformer_options`` for this layout where it reports them (``grid_sizes``, ``img_slice``):
    a call that reports another value is over a layout the pack did not understand.
    ``owner``: the session that made it; only that session's override acts on it (None: any, a context built by
    hand). A model patched twice then has one session at work, never two counting the same layers.
    ``call_layers``: without block metadata, the layer of the n-th video self-attention call where some blocks make
    none (LTX-2's STG pass skips the self-attention of a few blocks); None: the n-th call is layer n.
    ``other_self_attention``: the lengths of the self-attention calls that are not the video's (LTX-2's audio); a
    self-attention call of any other length is a layout the pack did not understand (None: not checked).
    ``check``: the Sparse Attention Check's results when this forward's step is one it checks.
    """

    video: VideoGrid
    step: int | None
    total_steps: int | None
    leading_tokens: int = 0
    conditionings: int = 1  # the batch: this many chunks of the same latents (ComfyUI's cond_or_uncond)
    blocks: BlockLayers | None = None
    reported: dict = field(default_factory=dict)  # what ComfyUI reports in transformer_options for this layout
    layer: int = 0
    memo: dict = field(default_factory=dict)  # per-forward results every layer shares (e.g. the text mask)
    owner: object = field(default=None, repr=False, compare=False)
    last_call: tuple | None = None  # (step, layer, density) of the last call booked in this forward (timing)
    call_layers: tuple | None = None
    other_self_attention: frozenset | None = None
    check: CheckResults | None = None  # this step is checked: the sparse calls record into it (core.check)
    dense: bool = False  # a forward run dense on purpose (the check's whole-step comparison): every call passes
    head_offset: int = 0  # the first head of this rank's calls under sequence parallelism (core.sequence_parallel)

    def __post_init__(self):
        if not 0 <= self.leading_tokens <= self.video.text_tokens:
            raise ValueError(f"leading_tokens must be within the {self.video.text_tokens} non-video tokens, "
                             f"got {self.leading_tokens}")

    def grid_for(self, length: int) -> VideoGrid | None:
        """The grid of a self-attention call over ``length`` tokens, or None if it is not over this video."""
        return self.video if length == self.video.total_tokens else None

    def layer_of(self, transformer_options: dict) -> int:
        """The layer of a video self-attention call. From the block metadata where the model reports it: a second
        call in the same block (VACE's context blocks reuse their main block's index) gets a layer of its own past
        the model's layers. Otherwise the call order."""
        kind, index = transformer_options.get("block_type"), transformer_options.get("block_index")
        if self.blocks is None or kind not in self.blocks.offsets or not isinstance(index, int):
            return self.next_layer()
        layer = self.blocks.offsets[kind] + index
        seen = self.memo.setdefault("layers seen", set())
        if layer in seen:
            layer = self.blocks.count + self.memo.get("repeated layers", 0)
            self.memo["repeated layers"] = layer - self.blocks.count + 1
        seen.add(layer)
        return layer

    def next_layer(self) -> int:
        self.layer += 1
        n = self.layer - 1
        return self.call_layers[n] if self.call_layers is not None and n < len(self.call_layers) else n

    def layout_mismatch(self, transformer_options: dict) -> str | None:
        """What ComfyUI reports for this call that contradicts the layout (None: nothing does)."""
        for key, want in self.reported.items():
            got = transformer_options.get(key)
            if got is not None and tuple(int(v) for v in got) != tuple(want):
                return f"ComfyUI reports {key} {tuple(int(v) for v in got)} where the pack computed {tuple(want)}"
        return None

    def note_other_self_attention(self, transformer_options: dict, length: int) -> None:
        """A self-attention call over another length than the video's (kept dense): of a reported block, or, where the
        layout says which other lengths to expect, of none of them."""
        kind, index = transformer_options.get("block_type"), transformer_options.get("block_index")
        others = self.memo.setdefault("other lengths", {})
        if self.blocks is not None and kind in self.blocks.offsets and isinstance(index, int):
            others[self.blocks.offsets[kind] + index] = length
        elif self.other_self_attention is not None and length not in self.other_self_attention:
            others[("call", len(others))] = length

    def unrecognised_blocks(self) -> dict:
        """{layer: length} of the blocks whose self-attention never matched the video in this forward."""
        seen = self.memo.get("layers seen", set())
        return {layer: n for layer, n in self.memo.get("other lengths", {}).items() if layer not in seen}


@dataclass
class RunStats:
    """What one sampling run did, kept after it for the run summary and the Inspector (small: no tensors).

    calls: per (step, layer) the density used (1.0 for a dense call). fallbacks: per reason (key) how many times
    attention fell back to dense, with the first message of each in fallback_messages. layouts: per layer the
    video grid of its last sparse call (the planner rebuilds that call's block mask from it). timings: per timed
    call (verbose only) (step, layer, density, milliseconds), filled when the run ends. routed: per reason
    (core.routing.Route.reason) [heads run on the dense attention, calls run dense whole]; planned_heads: the heads
    whose plans were routed (the sparse path's heads). eight_bit_dense: the (step, layer) of the calls the schedule
    kept dense that ran on the pack's 8-bit kernel at a full layout (precision '8-bit + dense calls'): density 1.0
    like any dense call (they save no attention work), counted apart from the user's dense calls.
    """

    calls: dict = field(default_factory=dict)
    fallbacks: dict = field(default_factory=dict)
    fallback_messages: dict = field(default_factory=dict)
    layouts: dict = field(default_factory=dict)
    grid: VideoGrid | None = None
    total_steps: int | None = None
    timings: list = field(default_factory=list)
    finished: bool = False
    routed: dict = field(default_factory=dict)
    planned_heads: int = 0
    eight_bit_dense: set = field(default_factory=set)

    def record(self, step, layer: int, density: float, eight_bit_dense: bool = False) -> None:
        self.calls[(step, layer)] = density
        if eight_bit_dense:
            self.eight_bit_dense.add((step, layer))
        else:
            self.eight_bit_dense.discard((step, layer))

    def record_routes(self, routes) -> None:
        for route in routes:
            self.planned_heads += len(route.densities)
            if route.dense:
                self.routed.setdefault(route.reason, [0, 0])[0] += len(route.dense)

    def record_routed_call(self, route) -> None:
        self.record_routes([route])
        self.routed[route.reason][1] += 1

    @property
    def routed_heads(self) -> int:
        return sum(heads for heads, _ in self.routed.values())

    @property
    def sparse_calls(self) -> int:
        return sum(1 for d in self.calls.values() if d < 1.0)

    @property
    def dense_calls(self) -> int:
        """Dense calls on the user's own attention (the 8-bit full-layout ones are ``dense_8bit_calls``)."""
        return sum(1 for key, d in self.calls.items() if d >= 1.0 and key not in self.eight_bit_dense)

    @property
    def dense_8bit_calls(self) -> int:
        return len(self.eight_bit_dense)

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


def _device_key(device) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


class SparseAttentionSession:
    """Everything one patched model needs between attention calls. Pure torch; ComfyUI stays in nodes/.

    One planner per device: ComfyUI's multi-GPU work units run the same patched model on several GPUs at once,
    in threads, with this one session; each device's calls then meet only their own caches. The statistics are
    shared and booked under a lock.
    """

    def __init__(self, method, schedule: SparseSchedule, backend: str = "auto", verbose: bool = False,
                 compensate: bool | str = False, precision: str = "bf16"):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        self.method = method
        self.schedule = schedule
        self.backend = backend
        self.precision = precision  # what the user asked: 'bf16', '8-bit' or 'auto'
        self._kernel_precisions: dict = {}  # device -> 'bf16', 'fp8' or 'int8'
        self.verbose = verbose
        self.planner = make_planner(method)  # the first device's (what the Inspector draws)
        self.compensate = self._compensates(compensate, precision)  # every sparse call adds the skipped keys' terms
        if self.compensate and not getattr(self.planner, "compensates", False):
            raise ValueError(f"compensate 'on' does not apply to the method {type(method).__name__}: its planner "
                             "cannot add the skipped keys' pooled terms; set compensate to 'off'")
        if self.compensate and precision in ("8-bit", EIGHT_BIT_DENSE):
            raise ValueError(f"compensate 'on' and precision '{precision}' do not combine: the 8-bit kernel has no "
                             "pooled terms for skipped keys; set compensate 'off' or precision 'bf16' (or 'auto', "
                             "which then runs bf16)")
        self._planners: dict = {}  # device -> planner
        self._lock = threading.Lock()
        self.stats = RunStats()
        self.runs = 0  # sampling runs begun (0: the model never sampled)
        self.timer = CallTimer() if verbose else None  # per-call attention times, only when verbose
        self.stood_down: str | None = None  # why another node does the sparse attention this run (None: we do)
        self.forwards = 0  # forwards of the model with a video layout this run
        self.layout_error: str | None = None  # a layout ComfyUI contradicted: dense from then on
        self.check: CheckResults | None = None  # the last run's Sparse Attention Check, if the run had one
        self.platform: dict = {}  # name -> version of what runs the model (ComfyUI), for the run summary's report line
        self._warned: set[str] = set()
        self.sequence_parallel = None  # core.sequence_parallel.SequenceParallel when this rank is one of several

    def _compensates(self, compensate, precision: str) -> bool:
        """The patch's compensate setting ('auto', 'off', 'on' or a bool) as a yes / no for this method: 'auto' is the
        method's measured default (its planner's compensate_by_default), off where an 8-bit precision was asked."""
        if isinstance(compensate, str) and compensate in COMPENSATE:
            if compensate == "auto":
                eight_bit = precision in ("8-bit", EIGHT_BIT_DENSE)
                return getattr(self.planner, "compensate_by_default", False) and not eight_bit
            return compensate == "on"
        if isinstance(compensate, bool):
            return compensate
        raise ValueError(f"compensate must be one of {COMPENSATE} (or a bool), got {compensate!r}")

    def planner_for(self, device) -> object:
        """The planner of ``device`` (the first device gets ``self.planner``)."""
        key = _device_key(device)
        planner = self._planners.get(key)
        if planner is None:
            with self._lock:
                planner = self._planners.get(key)
                if planner is None:
                    planner = self.planner if not self._planners else make_planner(self.method)
                    self._planners[key] = planner
        return planner

    def planners(self) -> list:
        return list(self._planners.values()) or [self.planner]

    def begin_run(self) -> None:
        """A new sampling run: per-run state and statistics start afresh."""
        self.stats = RunStats()
        self.check = None
        self.runs += 1
        self.stood_down = None
        self.forwards = 0
        for planner in self.planners():
            planner.reset()
        if self.sequence_parallel is not None:
            self.sequence_parallel.reset()
        if self.timer is not None:
            self.timer.reset()

    def end_run(self) -> None:
        """The run is over: resolve the measured times and log the run summary (always, a few lines)."""
        self.stats.finished = True
        if self.forwards and not self.stats.calls and self.stood_down is None and self.layout_error is None \
                and "unrecognised-blocks" not in self.stats.fallbacks:
            self.warn_once("hook-not-reached", "no attention call of this model reached the patch in this run: a node "
                           "applied after Sparse Attention Patch replaced ComfyUI's attention hook, or this model "
                           "does not pass ComfyUI's attention options to its blocks; sparse attention did nothing")
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

    def forward_context(self, video: VideoGrid, sigma: float | None, sample_sigmas, leading_tokens: int = 0,
                        conditionings: int = 1, blocks: BlockLayers | None = None,
                        reported: dict | None = None, call_layers: tuple | None = None,
                        other_self_attention: frozenset | None = None,
                        check: CheckSettings | None = None) -> ForwardContext:
        step = total = None
        if sigma is not None and sample_sigmas is not None and len(sample_sigmas) > 1:
            step, total = step_index(sigma, sample_sigmas), len(sample_sigmas) - 1
            self.stats.total_steps = total
        self.stats.grid = video
        if step is None:
            self.warn_once("no-step", "the denoising step is unknown (no sampler sigmas reached the model): "
                           "attention stays dense for these calls")
        self.forwards += 1
        return ForwardContext(video=video, step=step, total_steps=total, leading_tokens=leading_tokens,
                              conditionings=max(1, conditionings), blocks=blocks, reported=dict(reported or {}),
                              owner=self, call_layers=call_layers, other_self_attention=other_self_attention,
                              check=self._check_of(check, step, total))

    def _check_of(self, settings: CheckSettings | None, step: int | None, total: int | None) -> CheckResults | None:
        """The run's check results when ``step`` is one the check asks for (created with the run's first one)."""
        if settings is None or step is None:
            return None
        inside, beyond = settings.step_indices(total)
        with self._lock:
            new = self.check is None or self.check.settings != settings
            if new:
                self.check = CheckResults(settings, skipped_steps=tuple(sorted(beyond)))
        if new and beyond:
            self.warn_once("check-steps", f"the check's steps {sorted(beyond)} are past this run's last step "
                           f"(steps 0-{total - 1}): they are not checked; set steps inside the run")
        return self.check if step in inside else None

    def end_forward(self, ctx: ForwardContext, model_name: str) -> None:
        """After a forward: blocks whose self-attention never matched the video grid are a layout not understood."""
        other = ctx.unrecognised_blocks()
        if other:
            lengths = ", ".join(sorted({str(n) for n in other.values()}))
            self.warn_once("unrecognised-blocks", f"{model_name}: the self-attention of {len(other)} blocks runs "
                           f"over {lengths} tokens, not the {ctx.video.total_tokens} of the video layout the pack "
                           f"computed ({ctx.video}): it does not understand this model's token layout there, and "
                           "those blocks stay dense")

    def fail_layout(self, message: str) -> None:
        """ComfyUI contradicted the layout: every later forward of this session stays dense, said once."""
        self.layout_error = message
        self.warn_once("layout-mismatch", f"{message}: this model's token layout is not understood, its attention "
                       "stays dense")

    def cache_bytes(self) -> dict:
        """Device bytes the session keeps between attention calls, per cache entry of its planners (for Radial, per
        (grid, device) the cached layout; at most ``MAX_PLANS`` of them per device)."""
        total: dict = {}
        for planner in self.planners():
            for key, size in planner.cache_bytes().items():
                total[key] = total.get(key, 0) + size
        return total

    def move_caches(self, device, of=None) -> None:
        """A patched model moved to ``device``: the planners that keep state on the device (``to``) follow it; with
        ``of``, only the planner of the calls on that device (one device's model of several)."""
        planners = self.planners() if of is None or not self._planners else [self._planners.get(_device_key(of))]
        for planner in planners:
            move = getattr(planner, "to", None)
            if move is not None:
                move(device)

    def wants_sparse(self, ctx: ForwardContext, layer: int) -> bool:
        return ctx.step is not None and self.schedule.is_sparse(ctx.step, ctx.total_steps, layer)

    def record_dense(self, ctx: ForwardContext, layer: int) -> None:
        self._record(ctx, layer, 1.0)

    def attend(self, ctx: ForwardContext, layer: int, q, k, v, kv_length=None, out=None,
               head_offset: int = 0, router: Router | None = None) -> tuple[torch.Tensor, float]:
        """Sparse attention of (B, H, L, D) q/k/v over the video of ``ctx``: (output, density of the plan).
        ValueError for what it cannot run; core.routing.DenseCall when the call is to run dense (``router``: heads
        above the kernel's break-even run on the dense attention). The caller books the call (record_sparse) once
        per layer."""
        call = self._call(ctx, layer, q, k, v, kv_length, out, head_offset)
        call.router = router
        call.want_lse = ctx.check is not None  # the check compares the kept keys' LSE with the exact one
        decided = len(router.routes) if router is not None else 0
        result, density = self.planner_for(q.device).attend(call)
        if call.want_lse and router is not None:
            dense_lse_of_routed(call, router.routes[decided:])
        if ctx.check is not None:
            ctx.check.record(ctx.step, layer, q, k, v, result, call.lse, kv_length, call.head_offset)
        return result, density

    def wants_prime(self, ctx: ForwardContext, layer: int) -> bool:
        """A dense call the planner wants to see (``prime``: e.g. AdaSpa takes the LSE its first search needs from
        the dense step before it): the last dense step before the layer's first sparse step."""
        return ctx.step is not None and callable(getattr(self.planner, "prime", None)) \
            and self.schedule.precedes_sparse(ctx.step, ctx.total_steps, layer)

    def prime(self, ctx: ForwardContext, layer: int, q, k, v, kv_length=None, out=None,
              head_offset: int = 0) -> tuple[torch.Tensor, float]:
        """Dense attention of a call ``wants_prime`` picked, through the planner: (exact output, 1.0)."""
        planner = self.planner_for(q.device)
        return planner.prime(self._call(ctx, layer, q, k, v, kv_length, out, head_offset)), 1.0

    def wants_dense_8bit(self, ctx: ForwardContext, device) -> bool:
        """A call the schedule keeps dense that runs on the 8-bit kernel at a full layout: precision '8-bit + dense
        calls' on a device with 8-bit units, at a known step (an unknown step is a fallback, not the schedule's).
        The dispatcher asks only after ``wants_prime``: a call a planner primes from stays exact."""
        return self.precision == EIGHT_BIT_DENSE and ctx.step is not None and self.kernel_precision(device) != "bf16"

    def attend_dense_8bit(self, ctx: ForwardContext, layer: int, q, k, v, kv_length=None, out=None,
                          head_offset: int = 0) -> tuple[torch.Tensor, float]:
        """Dense attention of a call ``wants_dense_8bit`` picked, on the 8-bit kernel: (output, 1.0). The caller
        books it (record_dense_8bit)."""
        call = self._call(ctx, layer, q, k, v, kv_length, out, head_offset)
        return full_layout_attention(call, ctx.memo), 1.0

    def _call(self, ctx, layer, q, k, v, kv_length, out, head_offset) -> AttentionCall:
        chunks = ctx.conditionings if q.shape[0] % ctx.conditionings == 0 else 1
        return AttentionCall(grid=ctx.grid_for(q.shape[2]), layer=layer, step=ctx.step, total_steps=ctx.total_steps,
                             q=q, k=k, v=v, kv_length=kv_length, out=out, backend=self.backend,
                             head_offset=ctx.head_offset + head_offset, conditionings=chunks,
                             compensate=self.compensate, precision=self.kernel_precision(q.device))

    def kernel_precision(self, device) -> str:
        """What the fixed-block kernel computes in on ``device`` ('bf16', 'fp8', 'int8'), from the user's precision;
        decided once per device and said once: which 8-bit path runs, or why bf16 runs instead."""
        key = _device_key(device)
        found = self._kernel_precisions.get(key)
        if found is not None:
            return found
        support = eight_bit_support(key) if self.precision != "bf16" else None
        if support is not None and self.compensate:  # 'auto' with compensation ('8-bit' with it is refused at init)
            log.info("sparse attention: precision auto: bf16 (compensation's pooled terms run in the bf16 kernel)")
            support = None
        with self._lock:
            self._kernel_precisions[key] = chosen = "bf16" if support is None else support.precision
        if support is None:
            return chosen
        if chosen != "bf16":
            log.info("sparse attention: precision %s: %s", self.precision, support.reason)
        elif self.precision != "auto":
            dense = " and dense calls stay on your own attention" if self.precision == EIGHT_BIT_DENSE else ""
            self.warn_once("no-8-bit", f"precision {self.precision} cannot run here: {support.reason}; sparse calls "
                           f"run in bf16{dense}")
        else:
            log.info("sparse attention: precision auto: bf16 (%s)", support.reason)
        return chosen

    def record_sparse(self, ctx: ForwardContext, layer: int, grid: VideoGrid, density: float, routes=()) -> None:
        """Book a sparse call: its density, its grid so the Inspector can rebuild the layer's layout, and what
        routing decided for its heads."""
        self._record(ctx, layer, density)
        with self._lock:
            self.stats.layouts[layer] = grid
            self.stats.record_routes(routes)

    def record_dense_8bit(self, ctx: ForwardContext, layer: int) -> None:
        """Book a dense call run on the 8-bit kernel. Left untimed (``last_call`` unset): the timing medians compare
        the sparse calls with the user's own dense attention."""
        with self._lock:
            self.stats.record(ctx.step, layer, 1.0, eight_bit_dense=True)

    def record_routed_call(self, ctx: ForwardContext, layer: int, route: Route) -> None:
        """Book a call that routing ran dense whole (most heads' plans above the kernel's break-even)."""
        self._record(ctx, layer, 1.0)
        with self._lock:
            self.stats.record_routed_call(route)

    def _record(self, ctx: ForwardContext, layer: int, density: float) -> None:
        with self._lock:
            self.stats.record(ctx.step, layer, density)
        ctx.last_call = (ctx.step, layer, density)

    def stand_down(self, reason: str) -> None:
        """Another node does the sparse attention of this run: every call passes through, said once."""
        self.stood_down = reason
        self.warn_once("stood-down", reason)

    def warn_once(self, key: str, message: str) -> None:
        with self._lock:
            self.stats.fallbacks[key] = self.stats.fallbacks.get(key, 0) + 1
            self.stats.fallback_messages.setdefault(key, message)
            first = key not in self._warned
            self._warned.add(key)
        if first:
            log.warning("sparse attention: %s", message)
