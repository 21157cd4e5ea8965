"""Which denoising steps and transformer layers run dense attention."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class SparseSchedule:
    """Sparse attention runs on steps [start, end) of the run, in layers >= dense_layers.

    dense_steps: below 1 a fraction of the run's steps (0.25 = the first quarter, at least one step), from 1 up a
    step count.
    sparse_end: fraction of the run after which attention is dense again (1.0 = sparse to the end).
    dense_layers: the first transformer blocks that always run dense.
    """

    dense_steps: float = 0.25
    sparse_end: float = 1.0
    dense_layers: int = 1

    def __post_init__(self):
        # Written so that NaN and infinity (which an API prompt can send past the UI's min/max) are rejected too.
        steps = self.dense_steps
        if not 0 <= steps < math.inf or (steps >= 1 and steps != int(steps)):
            raise ValueError(f"dense_steps must be a fraction in [0, 1) or a whole step count, got {self.dense_steps}")
        if not 0.0 <= self.sparse_end <= 1.0:
            raise ValueError(f"sparse_end must be in [0, 1], got {self.sparse_end}")
        if not 0 <= self.dense_layers < math.inf:
            raise ValueError(f"dense_layers must be >= 0, got {self.dense_layers}")

    def sparse_step_range(self, total_steps: int) -> range:
        if self.dense_steps >= 1:
            first = int(self.dense_steps)
        else:  # a fraction above 0 keeps at least the first step dense, however few steps the run has (4-step LoRAs)
            first = math.floor(self.dense_steps * total_steps + 0.5)
            first = max(first, 1) if self.dense_steps > 0 else first
        return range(first, math.ceil(self.sparse_end * total_steps - 1e-9))

    def is_sparse(self, step: int, total_steps: int, layer: int) -> bool:
        return layer >= self.dense_layers and step in self.sparse_step_range(total_steps)

    def precedes_sparse(self, step: int, total_steps: int, layer: int) -> bool:
        """The dense step right before the first sparse step, in a layer that goes sparse."""
        steps = self.sparse_step_range(total_steps)
        return layer >= self.dense_layers and len(steps) > 0 and step == steps.start - 1


def step_index(sigma: float, sample_sigmas) -> int | None:
    """Index of the denoising step a model call at ``sigma`` belongs to, within the run's ``sample_sigmas``.

    Exact matches first; a sampler's intermediate sigma (Heun, DPM++ 2S...) belongs to the step whose interval
    [sigmas[i + 1], sigmas[i]] contains it. None when the sigma lies outside the schedule.
    """
    sig = [float(s) for s in sample_sigmas]
    for i, s in enumerate(sig[:-1]):
        if math.isclose(s, sigma, rel_tol=1e-5, abs_tol=1e-7):
            return i
    for i in range(len(sig) - 1):
        if min(sig[i], sig[i + 1]) <= sigma <= max(sig[i], sig[i + 1]):
            return i
    return None
