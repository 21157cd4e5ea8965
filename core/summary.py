"""The run summary logged after every sampling run, and the small text helpers the Inspector shares. Plain text."""

from __future__ import annotations

import dataclasses
import statistics

TITLE = "sparse attention run summary"


def method_name(method) -> str:
    name = type(method).__name__
    return name[: -len("Settings")] if name.endswith("Settings") and len(name) > len("Settings") else name


def _value(v) -> str:
    if isinstance(v, bool):
        return "on" if v else "off"
    if isinstance(v, float):
        return f"{v:g}"
    if dataclasses.is_dataclass(v):  # nested settings (SVG's semantic_clusters)
        return method_text(v)
    return str(v)


def method_settings(method) -> str:
    """'decay_factor 0.2, block_size 128, attention_sink on, ...' for a settings dataclass."""
    if not dataclasses.is_dataclass(method):
        return ""
    return ", ".join(f"{f.name} {_value(getattr(method, f.name))}" for f in dataclasses.fields(method))


def method_text(method) -> str:
    settings = method_settings(method)
    return f"{method_name(method)} ({settings})" if settings else method_name(method)


def ranges(values) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2, 5, 7-8'; 'none' when empty."""
    values = sorted(set(values))
    if not values:
        return "none"
    parts, start, prev = [], values[0], values[0]
    for v in values[1:] + [None]:
        if v is not None and v == prev + 1:
            prev = v
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if v is not None:
            start = prev = v
    return ", ".join(parts)


def dense_steps(schedule, total_steps: int | None) -> list[int] | None:
    """The steps the schedule keeps dense in a run of ``total_steps`` (None when the step count is unknown)."""
    if not total_steps:
        return None
    sparse = schedule.sparse_step_range(total_steps)
    return [s for s in range(total_steps) if s not in sparse]


def schedule_text(schedule, total_steps: int | None, num_layers: int) -> str:
    steps = dense_steps(schedule, total_steps)
    if steps is None:
        step_part = f"dense_steps {schedule.dense_steps:g} (the step count was unknown)"
    else:
        step_part = f"dense steps {ranges(steps)} ({len(steps)} of {total_steps})"
    layers = list(range(min(schedule.dense_layers, num_layers))) if num_layers else []
    layer_part = f"dense layers {ranges(layers)} ({len(layers)} of {num_layers})" if num_layers else \
        f"dense layers below {schedule.dense_layers}"
    return f"{step_part}, {layer_part}"


def timing_medians(timings) -> tuple[float | None, float | None]:
    """Median milliseconds per (sparse, dense) video self-attention call of [(step, layer, density, ms)]."""
    sparse = [t[3] for t in timings if t[2] < 1.0]
    dense = [t[3] for t in timings if t[2] >= 1.0]
    return (statistics.median(sparse) if sparse else None, statistics.median(dense) if dense else None)


def timing_text(timings) -> str | None:
    if not timings:
        return None
    sparse, dense = timing_medians(timings)
    parts = []
    if sparse is not None:
        parts.append(f"sparse {sparse:.3g} ms")
    if dense is not None:
        parts.append(f"dense {dense:.3g} ms")
    text = "attention time per call (median, measured): " + ", ".join(parts)
    if sparse is not None and dense is not None and sparse > 0:
        text += f": speed-up {dense / sparse:.2f}x"
    elif dense is None:
        text += " (no dense call to compare with)"
    return text


def fallback_lines(stats) -> list[str]:
    lines = []
    for key, count in stats.fallbacks.items():
        message = stats.fallback_messages.get(key, "")
        lines.append(f"WARNING: fell back to dense attention: {key} (x{count}){': ' + message if message else ''}")
    return lines


def grid_text(grid) -> str:
    if grid is None:
        return "video grid unknown"
    text = f"video {grid.frames}x{grid.height}x{grid.width} = {grid.video_tokens} tokens"
    return text + (f" + {grid.text_tokens} text" if grid.text_tokens else "")


def calls_text(stats) -> str:
    """'12 sparse and 4 dense attention calls'; the dense calls run on the pack's 8-bit kernel (precision '8-bit +
    dense calls') are named apart: they are neither sparse nor the user's own attention."""
    if not stats.dense_8bit_calls:
        return f"{stats.sparse_calls} sparse and {stats.dense_calls} dense attention calls"
    return (f"{stats.sparse_calls} sparse, {stats.dense_calls} dense on your attention and {stats.dense_8bit_calls} "
            "dense on the 8-bit kernel (full layout) attention calls")


def density_text(stats) -> str:
    sparse = f"density {stats.sparse_density:.3f} in sparse calls" if stats.sparse_calls else "no sparse call"
    return f"{sparse}, {stats.mean_density:.3f} overall: attention FLOPs saved {100 * (1 - stats.mean_density):.1f}%"


def routing_text(stats) -> str | None:
    """How many heads ran on the dense attention because their plan was above the kernel's break-even, and why
    (core.routing); None when none did."""
    if not stats.routed:
        return None
    whole = sum(calls for _, calls in stats.routed.values())
    reasons = "; ".join(f"{reason}: {heads} heads" + (f" ({calls} calls whole)" if calls else "")
                        for reason, (heads, calls) in stats.routed.items())
    return (f"routed to the dense attention: {stats.routed_heads} of {stats.planned_heads} heads, {whole} calls "
            f"whole, as faster than sparse there ({reasons})")


def head_classes_text(session) -> str | None:
    """How many heads each class of a planner that classifies its heads (SVG: spatial, temporal, semantic at its
    profiles; AdaSpa with cluster_heads: block, cluster at its searches) holds, over the last profile (search) of
    every sparse layer of the run; None for other methods or before any."""
    counts: dict = {}
    for planner in session.planners():
        for kind, heads in (planner.class_counts() if hasattr(planner, "class_counts") else {}).items():
            counts[kind] = counts.get(kind, 0) + heads
    if not sum(counts.values()):
        return None
    when = "search" if method_name(session.method) == "AdaSpa" else "profile"
    return (f"{method_name(session.method)} head classes (the last {when} of every sparse layer): "
            + ", ".join(f"{heads} {kind}" for kind, heads in counts.items()))


def skipped_steps_text(stats) -> str | None:
    """The steps of the run whose model call never reached attention (a step cache skipped them), or None."""
    if not stats.total_steps:
        return None
    ran = {s for s, _ in stats.calls if s is not None}
    skipped = [s for s in range(stats.total_steps) if s not in ran]
    if not skipped or not ran:
        return None
    return (f"{len(skipped)} of {stats.total_steps} steps ran no attention (steps {ranges(skipped)}: a step cache "
            "such as EasyCache reused an earlier result there)")


def run_summary(session) -> str:
    """A few lines: method and settings, calls, schedule, density and FLOPs saved, time (if measured), fallbacks."""
    stats = session.stats
    head = f"{TITLE}: {method_text(session.method)}, backend {session.backend}" \
        + (", skipped keys compensated" if session.compensate else "")
    if not stats.calls:
        lines = [head, "  no video self-attention call reached the patch in this run"]
        return "\n".join(lines + ["  " + line for line in fallback_lines(stats)])
    steps = len({s for s, _ in stats.calls if s is not None})
    lines = [
        head,
        f"  {grid_text(stats.grid)}; {steps} steps x {stats.num_layers} layers: {calls_text(stats)}",
        "  schedule: " + schedule_text(session.schedule, stats.total_steps, stats.num_layers),
        "  " + density_text(stats),
    ]
    for extra in (routing_text(stats), head_classes_text(session), skipped_steps_text(stats),
                  timing_text(stats.timings)):
        if extra:
            lines.append("  " + extra)
    if session.check is not None:
        lines += ["  " + line for line in session.check.summary_lines(session.schedule.dense_layers)]
    lines += ["  " + line for line in fallback_lines(stats)]
    return "\n".join(lines + ["  " + report_line(session)])


def report_line(session) -> str:
    """One line an artist can paste into a bug report: versions, GPU, method and settings, what the run did."""
    import torch

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA GPU"
    stats = session.stats
    fallbacks = ", ".join(f"{key} x{n}" for key, n in stats.fallbacks.items()) or "none"
    platform = " | ".join(f"{name} {version}" for name, version in session.platform.items())
    return (f"for a bug report: {platform + ' | ' if platform else ''}torch {torch.__version__} | Triton "
            f"{triton_version} | {gpu} | {method_text(session.method)} | backend {session.backend} | precision "
            f"{session.precision} | compensate {'on' if session.compensate else 'off'} | schedule "
            f"dense_steps {session.schedule.dense_steps:g}, sparse_end {session.schedule.sparse_end:g}, dense_layers "
            f"{session.schedule.dense_layers} | mean density {stats.mean_density:.3f} | fallbacks {fallbacks}")
