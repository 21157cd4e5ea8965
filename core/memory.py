"""Transient memory of a sparse call: at most a quarter of its output (or TRANSIENT_FLOOR for short calls) above what
dense attention holds.

Dense attention holds its output beyond q, k and v (about 0.74 GB for one Wan 14B 720p call); the sparse path writes
its output in place of that one, so whatever a planner allocates besides (copies of q, k, v in another token order,
scores, selection temporaries) is what it adds to the call's peak. A planner runs such a stage a few heads at a time,
as many as fit in ``TRANSIENT_SHARE`` of the call's output, keeping every per-head state keyed by the true head
(``head_offset``). Artists run 14B models on 16-24 GB cards: 3 GB of copies is the difference between a render and an
out-of-memory error.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

TRANSIENT_SHARE = 0.25
# A short call may hold this much all the same: a quarter of its output (25 MB at Wan 1.3B 480p) bounds nothing that
# matters on a GPU that renders video, while planning SVG2's 12 heads there in 4 groups of 3 made its call 3.9x dense's
# time (41.8 against SDPA's 10.8 ms; 11.6 ms in one group; H100, 2026-12-05). The memory benchmark's slack.
TRANSIENT_FLOOR = 64 << 20


def head_bytes(t: torch.Tensor) -> int:
    """Bytes of one head of a (B, H, L, D) tensor: the unit a planner's temporaries are counted in."""
    B, _, L, D = t.shape
    return B * L * D * t.element_size()


def transient_budget(q: torch.Tensor) -> int:
    """Bytes a call whose queries are ``q`` may hold above dense attention: TRANSIENT_SHARE of its output (q's size),
    at least TRANSIENT_FLOOR."""
    return max(int(TRANSIENT_SHARE * q.numel() * q.element_size()), TRANSIENT_FLOOR)


def heads_per_chunk(q: torch.Tensor, per_head_bytes: int, reserved: int = 0) -> int:
    """How many heads of the call whose queries are ``q`` (B, H, L, D) a stage holding ``per_head_bytes`` per head
    may process at once: within the call's transient budget less ``reserved`` (what the call holds besides, e.g.
    every head's plan until its launch), at least one."""
    budget = transient_budget(q) - reserved
    return max(1, min(q.shape[1], int(budget // max(1, per_head_bytes))))


def head_parts(heads: int, step: int) -> list[slice]:
    """Consecutive slices of ``step`` heads (the last one shorter) covering ``heads``."""
    return [slice(h0, min(heads, h0 + step)) for h0 in range(0, heads, step)]


def heads_of(call, part: slice, out: torch.Tensor | None):
    """The AttentionCall of heads ``part`` of ``call``, writing into ``out[:, part]`` (per-head state keys on the
    true head: head_offset)."""
    return replace(call, q=call.q[:, part], k=call.k[:, part], v=call.v[:, part], lse=None, lse_compensated=None,
                   out=None if out is None else out[:, part], head_offset=call.head_offset + part.start)


def attend_in_parts(call, parts, attend_part) -> tuple[torch.Tensor, float]:
    """Run ``attend_part(sub_call, part) -> density`` on each head slice ``part`` of ``call`` (sub-calls write into
    the call's output) and gather their LSE rows (exact and compensated, when wanted; heads no part covers stay
    -inf): (output, density over the call's heads)."""
    out = call.out if call.out is not None else torch.empty_like(call.q)
    lses = [torch.full(call.q.shape[:3], -math.inf, device=call.q.device) if wanted else None
            for wanted in (call.want_lse, call.want_lse and call.compensate)]
    work = 0.0
    for part in parts:
        sub = heads_of(call, part, out)
        work += attend_part(sub, part) * (part.stop - part.start)
        for lse, rows in zip(lses, (sub.lse, sub.lse_compensated)):
            if lse is not None and rows is not None:
                lse[:, part] = rows
    if call.want_lse:
        call.lse, call.lse_compensated = lses
    return out, work / call.q.shape[1]
