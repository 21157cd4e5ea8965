"""Sparse Attention Check: what the sparse path changes, measured during a real run on the user's own model.

At the check steps, every sparse call also computes exact attention for a few query rows of each head (evenly
spread over the sequence, first conditioning of the batch) and compares: the attention mass the method kept
(recall: exp(LSE over the kept keys - LSE over all keys), from the LSE every planner reports on request) and the
relative error of those rows' output. Optionally one whole step runs twice, dense and sparse, from the same latent,
and the PSNR of the two predictions is kept. Nothing of this changes the sampled video: the sparse output is the
one the model receives, with or without the check.

Cost: the planners' LSE output, and per checked call ``rows`` x L scores per head (a few ms at the Wan 14B 720p
shape against a ~60 ms sparse call), on the check steps only; the whole-step comparison costs one dense step more.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .summary import ranges

# The transformer_options key under which a model copy carries its check settings (the Sparse Attention Check node).
CHECK_KEY = "sparse_video_attention_check"


def parse_steps(text: str) -> tuple:
    """'0.5' or '0.25, 0.75' or '2, 10' -> a tuple of numbers; ValueError naming ``steps`` otherwise."""
    try:
        values = tuple(float(part) for part in text.replace(",", " ").split())
    except ValueError:
        values = ()
    if not values:
        raise ValueError(f"steps must be numbers separated by commas, e.g. '0.5' or '0.25, 0.75' or '2, 10'; "
                         f"got {text!r}")
    return values


@dataclass(frozen=True)
class CheckSettings:
    """``steps``: the steps to check, below 1 a fraction of the run (0.5 = the middle step), from 1 up a step index.
    ``rows``: query rows compared per layer and head. ``compare_step``: also run the first check step whole, dense
    and sparse, and keep the PSNR of the two predictions. ``floor``: a layer or head keeping less of its attention
    mass is reported, with advice."""

    steps: tuple = (0.5,)
    rows: int = 64
    compare_step: bool = False
    floor: float = 0.8

    def __post_init__(self):
        if isinstance(self.rows, bool) or not isinstance(self.rows, int) or self.rows < 1:
            raise ValueError(f"rows must be a whole number >= 1 (query rows compared per layer and head), got "
                             f"{self.rows!r}")
        if not self.steps or any(not 0 <= s < math.inf or (s >= 1 and s != int(s)) for s in self.steps):
            raise ValueError(f"steps must hold fractions in [0, 1) or whole step indices, got {self.steps}")
        if not 0 < self.floor <= 1:
            raise ValueError(f"floor must be a share of the attention mass in (0, 1], got {self.floor}")

    def compares(self, step: int, total_steps: int | None) -> bool:
        """Whether ``step`` is the one to run whole, dense and sparse (the first check step)."""
        inside = self.step_indices(total_steps)[0]
        return self.compare_step and bool(inside) and step == min(inside)

    def step_indices(self, total_steps: int | None) -> tuple[set, set]:
        """(the run's step indices to check, the indices asked for past the run's last step)."""
        inside, beyond = set(), set()
        for s in self.steps:
            if s < 1:
                if total_steps:
                    inside.add(min(math.floor(s * total_steps + 0.5), total_steps - 1))
            elif total_steps is not None and s >= total_steps:
                beyond.add(int(s))
            else:
                inside.add(int(s))
        return inside, beyond


@dataclass
class CheckResults:
    """What the check measured in one run: per (layer, head) sums over the checked rows, per step the whole-step
    PSNR. Small Python values only."""

    settings: CheckSettings
    recall: dict = field(default_factory=dict)    # (layer, head) -> [sum of recall, rows]
    error: dict = field(default_factory=dict)     # (layer, head) -> [sum of squared error, sum of squared exact]
    steps: set = field(default_factory=set)
    psnr: dict = field(default_factory=dict)      # step -> dB of the sparse prediction against the dense one
    skipped_steps: tuple = ()

    def record(self, step: int, layer: int, q, k, v, out, lse, kv_length=None, head_offset: int = 0) -> None:
        """Compare the sparse ``out`` (and its kept-key ``lse``) of one call with exact attention on sampled rows."""
        L = q.shape[2]
        rows = torch.linspace(0, L - 1, min(self.settings.rows, L), device=q.device).round().long()
        keys = L if kv_length is None else int(kv_length[0])
        scale = q.shape[-1] ** -0.5
        for h in range(q.shape[1]):  # one head at a time: rows x L scores, not heads x rows x L
            s = (q[0, h, rows].float() @ k[0, h, :keys].float().T) * scale
            exact_lse = torch.logsumexp(s, dim=-1)
            exact = torch.softmax(s, dim=-1) @ v[0, h, :keys].float()
            got = out[0, h, rows].float()
            kept = torch.exp(lse[0, h, rows].float() - exact_lse).clamp(max=1.0)
            key = (layer, head_offset + h)
            acc = self.recall.setdefault(key, [0.0, 0])
            acc[0] += float(kept.sum())
            acc[1] += len(rows)
            err = self.error.setdefault(key, [0.0, 0.0])
            err[0] += float((got - exact).pow(2).sum())
            err[1] += float(exact.pow(2).sum())
        self.steps.add(step)

    def worst_heads(self) -> list:
        """[(recall, (layer, head))] of the heads under the floor, worst first."""
        return sorted((r, key) for key, r in self.head_recall().items() if r < self.settings.floor)

    def head_recall(self) -> dict:
        return {key: total / n for key, (total, n) in self.recall.items()}

    def head_error(self) -> dict:
        return {key: math.sqrt(num / den) if den > 0 else 0.0 for key, (num, den) in self.error.items()}

    def layer_recall(self) -> dict:
        layers: dict = {}
        for (layer, _), (total, n) in self.recall.items():
            acc = layers.setdefault(layer, [0.0, 0])
            acc[0] += total
            acc[1] += n
        return {layer: total / n for layer, (total, n) in sorted(layers.items())}

    def advice(self, dense_layers: int) -> list[str]:
        """What to change where a layer or head keeps less than the floor of its attention mass."""
        lines, floor = [], self.settings.floor
        low = [layer for layer, r in self.layer_recall().items() if r < floor]
        leading = []
        for layer in low:  # the low layers right after the dense ones: more dense layers fix them
            if layer == dense_layers + len(leading):
                leading.append(layer)
        if leading:
            kept = min(self.layer_recall()[layer] for layer in leading)
            lines.append(f"layers {ranges(leading)} keep as little as {100 * kept:.0f}% of the attention mass: set "
                         f"dense_layers {leading[-1] + 1}")
        rest = [layer for layer in low if layer not in leading]
        if rest:
            lines.append(f"layers {ranges(rest)} keep less than {100 * floor:.0f}% of the attention mass: a "
                         "denser setting of the method (Radial decay_factor, SVG sparsity, SVG2 top_p, AdaSpa recall) "
                         "keeps more")
        heads = self.worst_heads()
        if heads:
            worst = ", ".join(f"{layer}/{head} ({100 * r:.0f}%)" for r, (layer, head) in heads[:5])
            lines.append(f"{len(heads)} heads keep less than {100 * floor:.0f}% of their attention mass; the "
                         f"worst (layer/head): {worst}")
        return lines

    def summary_lines(self, dense_layers: int) -> list[str]:
        if not self.recall:
            lines = ["check: no sparse call ran at the check steps"]
        else:
            recall = self.head_recall()
            error = self.head_error()
            lines = [f"check (steps {ranges(sorted(self.steps))}, {self.settings.rows} rows per layer and head): "
                     f"attention mass kept {100 * sum(recall.values()) / len(recall):.1f}% on average, "
                     f"{100 * min(recall.values()):.1f}% at worst; output error {max(error.values()):.3g} at worst "
                     "(relative L2 of the sampled rows)"]
        lines += [f"check: step {step}, the whole prediction sparse against dense: PSNR {db:.1f} dB"
                  for step, db in sorted(self.psnr.items())]
        if self.skipped_steps:
            lines.append(f"check: steps {ranges(self.skipped_steps)} are past this run's last step and were not "
                         "checked (set steps inside the run)")
        return lines + [f"advice: {line}" for line in self.advice(dense_layers)]


def psnr(prediction: torch.Tensor, reference: torch.Tensor) -> float:
    """PSNR in dB of ``prediction`` against ``reference``, over the reference's peak-to-peak range."""
    mse = float((prediction.float() - reference.float()).pow(2).mean())
    span = float(reference.max() - reference.min())
    return math.inf if mse == 0 else 10 * math.log10(span * span / mse)
