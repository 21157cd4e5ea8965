"""What every sparse attention method implements, and the call it receives.

A method is a settings object (frozen dataclass, built by its ComfyUI settings node) with ``make_planner()``.
The planner is per patched model and holds the method's state across attention calls (cached layouts,
centroids, LSE, head classes). It implements:

  * ``attend(call) -> (output, density)``: sparse attention of one video self-attention call. ``output`` is
    (B, H, L, D), written into ``call.out`` when given. ``density`` is the fraction of the dense attention work
    the plan keeps (kept query-key pairs over all pairs), every head counted at its plan's density, for the run's
    statistics (the dispatcher adds what routed heads do). A ValueError makes the call run dense with one warning
    (the dispatcher's fallback), never a broken render. Once the plan is known and before its kernel launches,
    ``attend`` calls ``call.route(kernel, densities)`` with each head's plan density: the heads it returns as
    dense are left out of the launch (``core.routing.keep_sparse``) and written by ``call.fill_dense`` (the user's
    dense attention: a sparse kernel is slower than dense above its break-even, core.break_even). A planner keeps
    its transient memory (copies of q, k, v, scores) to ``core.memory``'s budget, a few heads at a time.
  * ``reset()``: a new sampling run begins; per-run state (anything learned from the last run's q/k) is dropped.
  * ``block_mask(grid, layer)``: CPU bool (NQB, NKB) or per-head (H, NQB, NKB) mask over ``block_size`` tiles, in
    the original token order, of ``layer``'s last sparse call (what the Inspector draws); None if there is none.
  * ``cache_bytes()``: {description: bytes} of device memory the planner keeps between calls.
  * ``block_size``: the tile size ``block_mask`` uses.
  * optionally ``prime(call) -> output``: the exact dense output of the last dense step before a layer's first
    sparse step, which the session then routes here instead of ComfyUI's attention, for a planner that prepares
    state from it (AdaSpa takes the LSE its first search needs). A ValueError leaves the step to ComfyUI.

Classifier-free guidance batches the same latents under each conditioning (cond, uncond): ``call.conditionings``
chunks of ``call.latents`` batch elements each. A planner that finds its layout from q and k finds it on the first
chunk and shares it with the others (``share_over_conditionings``): with the same keys kept for cond and uncond
their errors are alike and largely cancel in the guidance difference (cond - uncond) x cfg, where independent
layouts' errors add up (measured on the proxy model: benchmarks/RESULTS.md).

When ``call.want_lse`` is set (quality measurements), ``attend`` also stores in ``call.lse`` the natural-log LSE
(B, H, L) float32 of every query row over the keys the method attended to, in the original token order:
exp(that - the dense LSE) is the attention mass the method kept (core.metrics.recall_from_lse).

When ``call.compensate`` is set (the patch's ``compensate`` setting), the keys a row's layout skips still enter its
softmax, so the whole sequence stays in it: on a block layout in one term per row, the skipped keys summed exactly
at the query block's mean query and moved to the row to first order (kernels/block_summary.py); on SVG2's clusters
one term per skipped key cluster from its pooled statistics (kernels/pooled_keys.py). ``call.lse`` keeps its meaning
(the exact keys alone: AdaSpa's search and the recall metric read it); with ``want_lse`` the LSE with the
compensation is stored in ``call.lse_compensated``. A planner that honours the setting has ``compensates = True``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..kernels import block_sparse_attention
from .break_even import block_kernel
from .grid import VideoGrid
from .plan import BlockPlan
from .routing import Route, Router, keep_sparse


@dataclass
class AttentionCall:
    """One video self-attention call on the sparse path: (B, H, L, D) q, k, v with a contiguous last dimension.

    ``grid``: the video (and trailing text) tokens of the sequence. ``layer``: the attention layer's index in the
    forward (0-based). ``step`` / ``total_steps``: the denoising step of the run. ``kv_length``: optional (B,) int32,
    keys at positions >= kv_length[b] are padding. ``out``: optional (B, H, L, D) view to write into. ``backend``:
    'auto', 'triton' or 'reference' (kernels.BACKENDS). ``head_offset``: q holds heads head_offset..head_offset+H-1
    of the layer (float32 calls on a GPU arrive a few heads at a time); per-head state is keyed by the true head.
    ``conditionings``: the batch is this many chunks of the same latents under different conditionings (1: every
    element its own). ``router``: routes heads above the kernel's break-even to the dense attention (None: none are).
    ``compensate``: skipped keys enter the softmax too (module docstring). ``precision``: what the
    fixed-block kernel computes in, 'bf16', 'fp8' or 'int8' (resolved for the call's device by the session;
    kernels.block_sparse_attention's ``precision``).
    """

    grid: VideoGrid
    layer: int
    step: int
    total_steps: int | None
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    kv_length: torch.Tensor | None = None
    out: torch.Tensor | None = None
    backend: str = "auto"
    head_offset: int = 0
    want_lse: bool = False
    lse: torch.Tensor | None = None
    conditionings: int = 1
    router: Router | None = None
    compensate: bool = False
    lse_compensated: torch.Tensor | None = None
    precision: str = "bf16"

    def route(self, kernel: str, densities) -> Route:
        """Which heads of the call run dense (core.routing): call with each head's plan density before launching
        ``kernel``; raises core.routing.DenseCall when the whole call runs dense."""
        if self.router is None:
            return Route(kernel, 1.0, "none", self.head_offset, tuple(float(d) for d in densities), ())
        return self.router.route(kernel, densities, self.head_offset, compensated=self.compensate)

    def fill_dense(self, route: Route, out: torch.Tensor) -> None:
        """The user's dense attention of the heads ``route`` sends dense, written into ``out`` (B, H, L, D)."""
        if self.router is not None:
            self.router.fill(route, out)

    @property
    def latents(self) -> int:
        """Batch elements of the first conditioning chunk: the ones a shared layout is found on."""
        return self.q.shape[0] // self.conditionings

    def first_conditioning(self) -> "AttentionCall":
        """The call's first conditioning chunk (its q, k, v and kv_length): what a shared layout is found on."""
        if self.conditionings == 1:
            return self
        n = self.latents
        return replace(self, q=self.q[:n], k=self.k[:n], v=self.v[:n], out=None, conditionings=1,
                       kv_length=None if self.kv_length is None else self.kv_length[:n])


def share_over_conditionings(t: torch.Tensor, call: AttentionCall) -> torch.Tensor:
    """A per-latent tensor (latents, ...) of the first chunk, repeated for every conditioning chunk: (B, ...)."""
    return t if call.conditionings == 1 else t.repeat(call.conditionings, *([1] * (t.ndim - 1)))


def split_lse(result, compensated: bool) -> tuple:
    """(output, exact LSE, compensated LSE) of a kernel call made with return_lse; uncompensated, the compensated
    LSE is None."""
    return result if compensated else (*result, None)


def run_block_plan(call: AttentionCall, plan: BlockPlan) -> tuple[torch.Tensor, float]:
    """Run a fixed-block layout (validated once when it was built) on the block-sparse kernel; every head has the
    layout's density, so routing sends all of them dense or none."""
    route = call.route(block_kernel(plan.block_size), [plan.density] * call.q.shape[1])
    result = block_sparse_attention(call.q, call.k, call.v, plan.kv_indices, keep_sparse(plan.kv_counts, route),
                                    block_size=plan.block_size, kv_length=call.kv_length, out=call.out,
                                    backend=call.backend, check_layout=False, return_lse=call.want_lse,
                                    summarise=call.compensate, precision=call.precision)
    if call.want_lse:
        result, call.lse, call.lse_compensated = split_lse(result, call.compensate)
    call.fill_dense(route, result)
    return result, plan.density
