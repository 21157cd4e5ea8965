"""Never slower than dense: heads whose plan is denser than the kernel's break-even run on the user's dense attention.

A planner, once it knows each head's plan density and before it launches its kernel, calls
``call.route(kernel, densities)`` (core.method). Heads above the kernel's break-even on the call's device
(core.break_even) are routed dense: the planner leaves them out of its launch and ``call.fill_dense`` writes the
user's dense attention (the function ComfyUI would have run, through the dispatcher) into the same output. When most
heads of the whole call are above it, ``route`` raises :class:`DenseCall` and the dispatcher runs the call dense as
it stands, with no copy; the planner has updated its state (caches, searched layouts) by then. When the call reaches
the planner a few heads at a time (core.dispatcher's staging), "most heads" is counted over those heads, which then
all go to the dense attention.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..kernels import dense_attention_with_lse
from .break_even import break_even


@dataclass(frozen=True)
class Route:
    """What routing decided for the heads of one call: ``densities`` per head (of the plan), ``dense`` the call's
    local indices of the heads that run dense, ``head_offset`` the call's first head in the layer."""

    kernel: str
    limit: float
    gpu: str
    head_offset: int
    densities: tuple
    dense: tuple

    @property
    def whole(self) -> bool:
        return len(self.dense) == len(self.densities)

    @property
    def dense_heads(self) -> tuple:
        """The layer's indices of the heads that run dense."""
        return tuple(self.head_offset + h for h in self.dense)

    @property
    def added_work(self) -> float:
        """Head-sized units of attention work the dense heads add to the plan's (a dense head does 1)."""
        return sum(1.0 - self.densities[h] for h in self.dense)

    @property
    def reason(self) -> str:
        return f"plan denser than the {self.kernel} kernel's break-even {self.limit:g} on {self.gpu}"


class DenseCall(Exception):
    """Most heads of the whole call are above the break-even: it runs on the dense attention, as it stands."""

    def __init__(self, route: Route):
        super().__init__(route.reason)
        self.route = route


@dataclass
class Router:
    """One attention call's routing: the GPU class of its device (core.break_even), its ``heads``, and ``dense``:
    (the layer's head indices) -> (B, n, L, D) the user's dense attention of those heads in the planners' token
    order. ``routes``: every decision made for the call (one per planner launch group), for the statistics."""

    gpu: str
    heads: int
    dense: Callable[[list], torch.Tensor]
    routes: list = field(default_factory=list)

    def route(self, kernel: str, densities, head_offset: int, compensated: bool = False) -> Route:
        limit = break_even(kernel, self.gpu, compensated).density
        densities = tuple(float(d) for d in densities)
        dense = tuple(h for h, d in enumerate(densities) if d > limit)
        if 2 * len(dense) > len(densities):  # most of them: all of them, in one dense launch
            dense = tuple(range(len(densities)))
        route = Route(kernel, limit, self.gpu, head_offset, densities, dense)
        self.routes.append(route)
        if route.whole and head_offset == 0 and len(densities) == self.heads:
            raise DenseCall(route)
        return route

    @property
    def added_work(self) -> float:
        return sum(route.added_work for route in self.routes)

    def fill(self, route: Route, out: torch.Tensor) -> None:
        """Write the dense heads of ``route`` into ``out`` (B, H, L, D) of the call it was made for."""
        if route.dense:
            out[:, list(route.dense)] = self.dense(list(route.dense_heads)).to(out.dtype)


def keep_sparse(counts: torch.Tensor, route: Route, heads: slice | None = None) -> torch.Tensor:
    """A layout's per-head counts (B or 1, H, ...) with the routed heads' rows emptied: the kernel skips them. With
    ``heads``, the counts are those of heads ``heads`` of the call ``route`` was made for."""
    heads = slice(0, len(route.densities)) if heads is None else heads
    dense = [h - heads.start for h in route.dense if heads.start <= h < heads.stop]
    if not dense:
        return counts
    kept = counts.expand(counts.shape[0], heads.stop - heads.start, *counts.shape[2:]).clone()
    kept[:, dense] = 0
    return kept


def dense_lse_of_routed(call, routes) -> None:
    """Where ``call.lse`` is wanted (the check, quality measurements), the rows of heads routed dense get the dense
    LSE: they attended every key (the planner left them at -inf), and so its compensated LSE, when kept."""
    heads = sorted({h - call.head_offset for route in routes for h in route.dense_heads})
    if heads:
        index = torch.tensor(heads, device=call.q.device)
        _, lse = dense_attention_with_lse(*(t.index_select(1, index) for t in (call.q, call.k, call.v)),
                                          kv_length=call.kv_length, backend=call.backend)
        call.lse[:, index] = lse
        if call.lse_compensated is not None:
            call.lse_compensated[:, index] = lse
