"""Peak GPU memory of one video self-attention call: ComfyUI's dense attention against every sparse method.

    python benchmarks/memory.py                  # Wan 2.1 14B 720p: B=1, H=40, L=75600 (21 x 45 x 80), D=128, bf16
    python benchmarks/memory.py --methods svg2   # one method (default: radial svg svg2 adaspa)
    python benchmarks/memory.py --dtype float32  # the same in float32 (the sparse path casts to bf16 for the kernel)
    python benchmarks/memory.py --json out.json  # every row as JSON too
    python benchmarks/memory.py --compensate on  # every method with the skipped keys compensated (default: auto)
    python benchmarks/memory.py --smoke          # CPU: a tiny shape through the same code, no peak numbers

Both paths get the same (B, L, H*D) q, k, v, as ComfyUI's Wan self-attention passes them, and return (B, L, H*D).
The inputs are video-structured (benchmarks/synthetic.py): on white noise SVG2's plan keeps ~90% of the pairs and
its call is routed to the dense attention, which would measure dense twice.
Dense: ComfyUI's ``attention_pytorch`` (SDPA; reproduced here so ComfyUI is not needed). Sparse: the pack's
``core.attention_override`` with a session and a ForwardContext of a sparse step and layer, the dense function as
``func``. Each method runs at its reference settings: warm-up calls first (they build what the method caches:
layouts, centroids, the first search; and compile the kernels), then the measured phases (AdaSpa: a later search
with its cached LSE, then a sparse step). Peak = torch.cuda.max_memory_allocated during the call minus what was
allocated before it (the inputs and the session's caches; the bytes a call adds to the caches, e.g. a new searched
layout, are allowed and listed).

Every phase runs twice, in two sessions: with the planners' memory budget (core.memory: stages of a few heads at a
time within TRANSIENT_SHARE of the output, at least TRANSIENT_FLOOR) and with every head at once, so the table shows what the budget saves and
what it costs in time (median of --repeat calls where the phase can repeat; one call for a search).

Exit status 1 if a sparse peak (with the budget) is above dense's peak + the transient budget + the cache
growth + a slack for the allocator's rounding (--slack-mib, default 16; it was 64 and hid AdaSpa's search
holding 40 MiB over its budget), plus for float32 on the GPU the bf16 copies the kernel needs, a few heads
at a time (4 x core.dispatcher.STAGE_CHUNK_BYTES).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from pack import import_pack  # noqa: E402
from synthetic import video_qkv  # noqa: E402

SHAPES = {  # name: (batch, heads, head_dim, frames, height, width) of the patchified latent
    "wan14b-720p": (1, 40, 128, 21, 45, 80),   # 81 frames 1280 x 720 -> 21 x 45 x 80 = 75600 tokens
    "wan1.3b-480p": (1, 12, 128, 21, 30, 52),  # 81 frames 832 x 480 -> 32760 tokens
}
SMOKE_SHAPE = (1, 2, 32, 5, 6, 10)  # 300 tokens: 3 blocks of 128, frames straddling blocks
MIB = 1 << 20


def comfy_attention(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False, skip_output_reshape=False,
                    **kwargs):
    """ComfyUI's attention_pytorch (comfy/ldm/modules/attention.py), condensed: what ``func`` is for an override,
    reproduced so the benchmark (and the tests that use it) need no ComfyUI."""
    if skip_reshape:
        b, _, _, dim_head = q.shape
    else:
        b, _, dim_head = q.shape
        dim_head //= heads
        q, k, v = (t.view(b, -1, heads, dim_head).transpose(1, 2) for t in (q, k, v))
    if mask is not None and mask.ndim == 2:  # ComfyUI: (Lq, Lk) -> batch dim, then (B, Lq, Lk) -> heads dim
        mask = mask.unsqueeze(0)
    if mask is not None and mask.ndim == 3:
        mask = mask.unsqueeze(1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False)
    if not skip_output_reshape:
        out = out.transpose(1, 2).reshape(b, -1, heads * dim_head)
    return out


def method_settings(core, name: str, smoke: bool):
    """Each method at its reference settings (Wan 2.1 14B: the workflows' and the papers'); at the smoke shape SVG2
    gets fewer clusters than its tokens."""
    if name == "radial":
        return core.RadialSettings(decay_factor=0.2, block_size=128, attention_sink=True)
    if name == "svg":
        return core.SVGSettings(sparsity=0.3, block_size=128 if not smoke else 64)
    if name == "svg2":
        return core.SVG2_PRESETS["wan_720p"] if not smoke else core.SVG2Settings(8, 16, 0.9, 0.1, 2, 1)
    return core.AdaSpaSettings()  # the paper's: recall 0.8, block 64, searches at 20% and 60% of the steps


# Per method: the warm-up steps (of a 30-step run), then (phase, step, repeatable) measured. AdaSpa searches at steps
# 6 and 18 of 30: step 17 is a first search (its own dense pass; the LSE kept for step 18), its second call a sparse
# one on that pattern (which compiles the sparse and compensation kernels the once-timed search would otherwise pay
# for), 18 a later search.
PHASES = {
    "radial": ((10,), (("sparse", 11, True),)),
    "svg": ((10,), (("sparse, heads profiled", 11, True),)),
    "svg2": ((10,), (("sparse, k-means warm", 11, True),)),
    "adaspa": ((17, 17), (("later search", 18, False), ("sparse", 19, True))),
}
STEPS = 30


def make_session(core, method, backend: str, compensate: str = "auto"):
    """A session as the patch node makes it by default (compensate 'auto': Radial, SVG and SVG2 add the skipped keys'
    terms), every call sparse; ``compensate`` another setting."""
    schedule = core.SparseSchedule(dense_steps=0, dense_layers=0)  # every call of this benchmark is a sparse one
    return core.SparseAttentionSession(method, schedule, backend=backend, compensate=compensate)


def sparse_call(core, override, session, grid, q, k, v, heads, step=10):
    sample_sigmas = torch.linspace(1.0, 0.0, STEPS + 1)
    ctx = session.forward_context(grid, float(sample_sigmas[step]), sample_sigmas)
    return override(comfy_attention, q, k, v, heads, transformer_options={core.CONTEXT_KEY: ctx})


def measure(fn, device) -> tuple[int | None, float]:
    """(peak bytes above what was allocated before the call, seconds) of one call; no peak off CUDA."""
    if device.type != "cuda":
        start = time.perf_counter()
        out = fn()
        del out
        return None, time.perf_counter() - start
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    out = fn()
    torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) - before
    del out
    return peak, seconds


def verdict(dense_peak: int, sparse_peak: int, extra_bytes: int, slack: int) -> tuple[bool, str]:
    """extra_bytes: what the sparse path may hold on top of dense (cached layouts, float32 cast buffers)."""
    limit = dense_peak + extra_bytes + slack
    ok = sparse_peak <= limit
    word = "OK" if ok else "FAIL"
    return ok, (f"{word}: sparse peak {sparse_peak / MIB:.1f} MiB {'<=' if ok else '>'} dense peak "
                f"{dense_peak / MIB:.1f} MiB + cache/cast {extra_bytes / MIB:.2f} MiB + slack {slack / MIB:.0f} MiB")


def fmt(nbytes) -> str:
    return f"{'n/a':>10}" if nbytes is None else f"{nbytes / MIB:10.1f}"


def median_time(fn, device, repeat: int) -> float:
    """Median seconds of ``repeat`` calls."""
    times = sorted(measure(fn, device)[1] for _ in range(repeat))
    return times[len(times) // 2]


def method_rows(core, memory_budget, name, grid, qkv, heads, device, backend, repeat, smoke,
                compensate="auto") -> list[dict]:
    """The method's phases, with the memory budget and with every head at once: one row per phase."""
    rows = {}
    for share in (memory_budget.TRANSIENT_SHARE, None):
        saved = memory_budget.TRANSIENT_SHARE
        memory_budget.TRANSIENT_SHARE = saved if share is not None else 1e6
        try:
            session = make_session(core, method_settings(core, name, smoke), backend, compensate)
            override = core.attention_override(session)
            warm_up, phases = PHASES[name]
            for step in warm_up:
                measure(functools.partial(sparse_call, core, override, session, grid, *qkv, heads, step), device)
            for phase, step, repeatable in phases:
                call = functools.partial(sparse_call, core, override, session, grid, *qkv, heads, step)
                before = sum(session.cache_bytes().values())
                peak, seconds = measure(call, device)
                growth = sum(session.cache_bytes().values()) - before
                if repeatable and repeat > 1:
                    seconds = median_time(call, device, repeat)
                row = rows.setdefault(phase, dict(method=name, phase=phase))
                key = "budget" if share is not None else "all_heads"
                row[key] = dict(peak=peak, seconds=seconds, cache_growth=growth)
            stats = session.stats
            if stats.fallbacks or not stats.sparse_calls:
                raise RuntimeError(f"{name} did not run sparse (fallbacks {stats.fallbacks}, calls {stats.calls})")
            for row in rows.values():
                row["density"] = stats.sparse_density
                row["cache_bytes"] = sum(session.cache_bytes().values())
        finally:
            memory_budget.TRANSIENT_SHARE = saved
    return list(rows.values())


def run(shape, dtype, device, slack: int, check_output: bool, methods, repeat: int = 1, json_path=None,
        compensate: str = "auto") -> int:
    core = import_pack("core")
    dispatcher = import_pack("core.dispatcher")
    memory_budget = import_pack("core.memory")
    B, H, D, T, Hh, W = shape
    grid = core.VideoGrid(T, Hh, W)
    L = grid.total_tokens
    q, k, v = (x.to(dtype).transpose(1, 2).reshape(B, L, H * D).contiguous()
               for x in video_qkv(frames=T, height=Hh, width=W, heads=H, head_dim=D, batch=B, seed=0, device=device))
    backend = "auto" if device.type == "cuda" else "reference"

    dense = lambda: comfy_attention(q, k, v, H)  # noqa: E731
    measure(dense, device)
    dense_peak, dense_s = measure(dense, device)
    size = q.element_size() * q.numel()
    print(f"shape B={B} H={H} L={L} ({T} x {Hh} x {W}) D={D} {str(dtype).replace('torch.', '')} on {device}"
          f"{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}; "
          f"one of q/k/v = {size / MIB:.1f} MiB; dense (ComfyUI SDPA) peak {fmt(dense_peak).strip()} MiB, "
          f"{dense_s * 1000:.1f} ms")
    rows = []
    for name in methods:
        try:
            rows += method_rows(core, memory_budget, name, grid, (q, k, v), H, device, backend, repeat,
                                smoke=device.type != "cuda", compensate=compensate)
        except RuntimeError as why:
            print(f"FAIL: {why}")
            return 1
    cast = 0
    if device.type == "cuda" and dtype not in (torch.float16, torch.bfloat16):  # q, k, v, result in bf16, a few heads
        cast = 4 * dispatcher.STAGE_CHUNK_BYTES
        print(f"bf16 cast buffers allowed: {cast / MIB:.2f} MiB (float32 inputs: 4 x STAGE_CHUNK_BYTES)")
    allowance = memory_budget.transient_budget(q)  # the output is q's size
    print(f"{'method':<8}{'phase':<24}{'density':>8}{'peak MiB':>10}{'all heads':>11}{'limit':>9}{'ms':>9}"
          f"{'all heads':>11}{'time cost':>11}{'cached layouts':>16}")
    ok = True
    for row in rows:
        budget, whole = row["budget"], row["all_heads"]
        cost = budget["seconds"] / whole["seconds"] - 1 if whole["seconds"] > 0 else math.nan
        limit = None if dense_peak is None else dense_peak + allowance + budget["cache_growth"] + cast + slack
        row.update(dense_peak=dense_peak, dense_seconds=dense_s, limit=limit, time_cost=cost)
        if dense_peak is not None:
            row_ok, row["verdict"] = verdict(dense_peak, budget["peak"], allowance + budget["cache_growth"] + cast,
                                             slack)
            ok &= row_ok
        print(f"{row['method']:<8}{row['phase']:<24}{row['density']:8.3f}{fmt(budget['peak'])}{fmt(whole['peak']):>11}"
              f"{fmt(limit):>9}{budget['seconds'] * 1000:9.1f}{whole['seconds'] * 1000:11.1f}{100 * cost:10.1f}%"
              f"{row['cache_bytes'] / MIB:16.2f}")

    if check_output:  # the tiny smoke shape: the override's output is the masked attention it claims to be
        session = make_session(core, method_settings(core, "radial", True), backend, compensate="off")
        got = sparse_call(core, core.attention_override(session), session, grid, q, k, v, H)
        got = got.view(B, L, H, D).transpose(1, 2).double()
        mask = core.radial_block_mask(grid, session.method)
        token = torch.arange(L, device=device) // session.method.block_size
        allowed = mask.to(device)[token][:, token]
        q4, k4, v4 = (t.view(B, L, H, D).transpose(1, 2).double() for t in (q, k, v))
        want = F.scaled_dot_product_attention(q4, k4, v4, attn_mask=allowed)
        err = float((got - want).norm() / want.norm())
        if not err < 1e-4:
            print(f"FAIL: the sparse output is off the masked dense reference (relative error {err:.2e})")
            return 1
    if json_path:
        Path(json_path).write_text(json.dumps(dict(shape=shape, dtype=str(dtype), device=str(device), rows=rows),
                                              indent=1))
    if dense_peak is None:
        print("SMOKE OK: every method ran sparse; Radial matches its reference (no CUDA: peaks not measured)")
        return 0
    for row in rows:
        print(f"{row['method']} {row['phase']}: {row['verdict']}")
    return 0 if ok else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=list(SHAPES), default="wan14b-720p")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    p.add_argument("--slack-mib", type=float, default=16.0,
                   help="allowed excess of the sparse peak (MiB): the allocator's rounding")
    p.add_argument("--smoke", action="store_true", help="tiny shape on the CPU (torch reference backend)")
    p.add_argument("--methods", nargs="+", choices=list(PHASES), default=list(PHASES))
    p.add_argument("--repeat", type=int, default=5, help="calls per repeatable phase (median time)")
    p.add_argument("--json", help="write every row here")
    p.add_argument("--compensate", choices=["auto", "on", "off"], default="auto",
                   help="the patch's compensate setting for every method (default: the node's default)")
    args = p.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    slack = int(math.ceil(args.slack_mib * MIB))
    if args.smoke:
        return run(SMOKE_SHAPE, torch.float32 if args.dtype == "bfloat16" else dtype, torch.device("cpu"), slack,
                   check_output=True, methods=args.methods, repeat=1, json_path=args.json, compensate=args.compensate)
    if not torch.cuda.is_available():
        print("FAIL: needs a CUDA GPU (use --smoke on the CPU)")
        return 1
    return run(SHAPES[args.shape], dtype, torch.device("cuda"), slack, check_output=False, methods=args.methods,
               repeat=args.repeat, json_path=args.json, compensate=args.compensate)


if __name__ == "__main__":
    sys.exit(main())
