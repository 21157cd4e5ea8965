"""The pack against what artists already have: one attention call at the Wan 2.1 14B and HunyuanVideo 720p shapes.

    python benchmarks/versus.py [--shapes wan14b-720p hunyuan-720p] [--json out.json]     # one GPU
    python benchmarks/versus.py --sol-taus --ours-only --compensate both   # ours with and without compensation
    python benchmarks/versus.py --smoke [--json out.json]      # CPU: tiny shape, kitchen's eager backend, our reference

Rows, all on the same video-structured bf16 inputs (benchmarks/synthetic.py: moving objects on a smooth field, 3D
RoPE; HunyuanVideo's 256 text tokens behind the video, as every planner orders them):
  * dense torch SDPA (the reference output of every error below),
  * dense 8-bit: comfy_kitchen.int8_attention, and SageAttention's sageattn where it is installed,
  * ComfyUI's built-in sparse kernel comfy_kitchen.sol_attn at the "Model Sparse Attention" node's default (tau 1.3,
    extra_tokens 256) and two other taus. Its node needs a newer ComfyUI than the pack's tests run, so it is measured
    per call here, not per step of a sampled model,
  * our four methods through their planners, at the reference settings of the pack's workflows for each model
    (Radial as benchmarks/e2e.py builds it), called as steps 39 and 40 of a 50-step run: the first call builds the
    method's state (k-means, search, head profile; reported as "first call"), the timed calls are later steps.
Each kernel gets its own contiguous layout, prepared outside the timing: (B, H, L, D) for SDPA, the 8-bit kernels
and ours, (B, L, H, D) for sol_attn (what ComfyUI's Wan (B, L, H*D) tensors are as a view).

``--compensate on|both`` runs each of ours with the patch's compensate setting (the skipped keys' pooled terms) too;
``--ours-only`` leaves out the dense 8-bit rows (``--sol-taus`` with no value: no built-in rows).

Per row: median ms per call (synchronised wall clock), speedup over SDPA, the density the method reports (sol_attn
reports none), and the relative L2 error of the output against dense SDPA. A package that is missing makes its row
say "not installed"; a row that fails says why; the others still run. Full results as JSON with --json.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import itertools
import json
import platform
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE))
from bench_timing import call_timer  # noqa: E402
from e2e import HUNYUAN_RADIAL, WAN_RADIAL  # noqa: E402
from pack import import_pack  # noqa: E402
from synthetic import video_qkv  # noqa: E402

core = import_pack("core")
metrics = import_pack("core.metrics")

HEAD_DIM = 128
SHAPES = {  # name: (latent frames, height, width, text tokens, heads) after patchify; head_dim 128
    "wan14b-720p": (21, 45, 80, 0, 40),          # Wan 2.1 14B, 1280x720, 81 frames: 75,600 tokens
    "hunyuan-720p": (33, 45, 80, 256, 24),       # HunyuanVideo, 1280x720, 129 frames: 118,800 + 256 tokens
}
SMOKE_SHAPES = {"smoke": (4, 8, 16, 16, 2)}
SOL_DEFAULT_TAU, SOL_EXTRA_TOKENS = 1.3, 256  # ComfyUI's "Model Sparse Attention" node: tau and extra_tokens defaults
RUN_STEPS, LATER_STEP = 50, 40  # after AdaSpa's searches (steps 10 and 30 of 50): a later step reuses its pattern
KNOBS = {"radial": "decay_factor", "svg": "sparsity", "svg2": "top_p", "adaspa": "recall"}  # the table's settings


def our_methods(shape: str, smoke: bool) -> list:
    """(name, settings) of the pack's four methods at the reference settings of its workflow for the model."""
    svg_preset = {p.model: p for p in core.SVG_PRESETS}
    if shape.startswith("hunyuan"):
        radial, svg, svg2 = HUNYUAN_RADIAL, svg_preset["HunyuanVideo T2V"], core.SVG2_PRESETS["hunyuan_720p"]
    else:
        radial, svg, svg2 = WAN_RADIAL, svg_preset["Wan 2.1 T2V 14B"], core.SVG2_PRESETS["wan_720p"]
    methods = [("radial", core.RadialSettings(**radial)),
               ("svg", core.SVGSettings(sparsity=svg.sparsity, attention_sink=svg.attention_sink)),
               ("svg2", svg2),
               ("adaspa", core.AdaSpaSettings())]
    if smoke:  # a few hundred tokens: blocks and cluster counts scaled down so every method runs sparse
        small = dict(radial=dict(block_size=64), svg=dict(block_size=64),
                     svg2=dict(query_clusters=8, key_clusters=16, first_iterations=5), adaspa={})
        methods = [(name, dataclasses.replace(s, **small[name])) for name, s in methods]
    return methods


def describe(settings) -> str:
    return ", ".join(f"{f.name} {getattr(settings, f.name)}" for f in dataclasses.fields(settings))


def make_inputs(frames, height, width, text, heads, device, dtype, seed):
    """(grid, q, k, v): video-structured (1, H, L, D) tensors, text tokens (if any) behind the video."""
    q, k, v = video_qkv(frames=frames, height=height, width=width, heads=heads, head_dim=HEAD_DIM, seed=seed,
                        device=device, dtype=torch.float32)
    if text:
        gen = torch.Generator(device=device).manual_seed(seed + 1)
        q, k, v = (torch.cat([x, torch.randn(1, heads, text, HEAD_DIM, generator=gen, device=device) * x.std()], 2)
                   for x in (q, k, v))
    q, k, v = (x.to(dtype).contiguous() for x in (q, k, v))
    return core.VideoGrid(frames, height, width, text_tokens=text), q, k, v


# ------------------------------------------------------------------------------------------------------ rows


class Unavailable(Exception):
    """The row cannot run here (package missing, no kernel for this device): its status says why."""


def kitchen():
    try:
        import comfy_kitchen
    except ImportError as why:
        raise Unavailable(f"not installed (comfy-kitchen: {why})") from None
    return comfy_kitchen


def sol_attn_kitchen():
    """comfy_kitchen where it has sol_attn (ComfyUI's built-in sparse kernel); Unavailable saying why otherwise."""
    ck = kitchen()
    if not hasattr(ck, "sol_attn"):
        raise Unavailable(f"not available: comfy-kitchen {kitchen_version()} has no sol_attn (0.2.40 has)")
    return ck


def int8_row(q, k, v, smoke):
    ck = kitchen()
    if not ck.int8_attention_is_available():
        raise Unavailable(f"not available: comfy_kitchen.int8_attention has no kernel here ({q.device.type})")
    return lambda: ck.int8_attention(q, k, v)


def sage_row(q, k, v, smoke):
    try:
        from sageattention import sageattn
    except ImportError as why:
        raise Unavailable(f"not installed (sageattention: {why})") from None
    return lambda: sageattn(q, k, v, tensor_layout="HND", is_causal=False)


def sol_row(tau):
    def build(q, k, v, smoke):
        ck = sol_attn_kitchen()
        if not smoke and not ck.sol_attn_is_available(q.device):
            # the eager fallback materialises L x L scores: not a measure of the built-in kernel
            raise Unavailable("not available: no compiled sol_attn kernel for this GPU (comfy_kitchen."
                              "sol_attn_is_available is False)")
        qs, ks, vs = (x.transpose(1, 2).contiguous() for x in (q, k, v))  # (B, L, H, D)
        return lambda: ck.sol_attn(qs, ks, vs, tau=tau, token_aug=SOL_EXTRA_TOKENS).transpose(1, 2)
    return build


def time_row(build, q, k, v, dense, args, on_gpu):
    """(ms, relative error) of one dense or kitchen row; Unavailable or any failure propagates."""
    fn = build(q, k, v, args.smoke)
    err = metrics.relative_error(fn(), dense)
    return call_timer(fn, runs=args.repeats, cuda=on_gpu), err


def time_planner(settings, grid, q, k, v, dense, backend, args, on_gpu, compensate=False):
    """(first call ms, later call ms, density, relative error) of one method through a fresh planner. A throwaway
    planner runs first so compilation is not timed."""
    def call(step):
        return core.AttentionCall(grid=grid, layer=1, step=step, total_steps=RUN_STEPS, q=q, k=k, v=v,
                                  backend=backend, compensate=compensate)

    warm = settings.make_planner()
    warm.attend(call(LATER_STEP - 1))
    warm.attend(call(LATER_STEP))
    del warm
    planner = settings.make_planner()
    first_ms = call_timer(lambda: planner.attend(call(LATER_STEP - 1)), runs=1, cuda=on_gpu, warm=0)
    out, density = planner.attend(call(LATER_STEP))
    err = metrics.relative_error(out, dense)
    del out
    ms = call_timer(lambda: planner.attend(call(LATER_STEP)), runs=args.repeats, cuda=on_gpu)
    return first_ms, ms, float(density), err


def run_shape(name, dims, args, device, dtype):
    frames, height, width, text, heads = dims
    on_gpu = device.type == "cuda"
    grid, q, k, v = make_inputs(frames, height, width, text, heads, device, dtype, args.seed)
    print(f"{name}: {grid.video_tokens} video + {text} text tokens, {heads} heads x {HEAD_DIM}, {dtype}", flush=True)
    kernels = import_pack("kernels")
    backend = "reference" if args.smoke else kernels.resolve_backend("auto", device, dtype)
    dense = F.scaled_dot_product_attention(q, k, v)
    sdpa_ms = call_timer(lambda: F.scaled_dot_product_attention(q, k, v), runs=args.repeats, cuda=on_gpu)
    rows = [dict(shape=name, kind="dense", method="torch SDPA", settings="", status="ok", ms=sdpa_ms, rel_err=0.0,
                 density=1.0)]
    others = [] if args.ours_only else [("dense 8-bit", "comfy_kitchen.int8_attention", "", int8_row),
                                        ("dense 8-bit", "SageAttention sageattn", "", sage_row)]
    others += [("built-in sparse", "comfy_kitchen.sol_attn", f"tau {tau}" + (" (node default)" if tau == SOL_DEFAULT_TAU
                else ""), sol_row(tau)) for tau in args.sol_taus]
    for kind, method, settings, build in others:
        row = dict(shape=name, kind=kind, method=method, settings=settings)
        if build is not int8_row and build is not sage_row:
            row["extra_tokens"] = SOL_EXTRA_TOKENS
        try:
            ms, err = time_row(build, q, k, v, dense, args, on_gpu)
            row.update(status="ok", ms=ms, rel_err=err)
        except Unavailable as why:
            row.update(status=str(why))
        except Exception as why:  # one row's failure must not lose the others' figures
            row.update(status=f"failed: {type(why).__name__}: {str(why)[:200]}")
        report(row)
        rows.append(row)
        free(device)
    compensations = {"off": [False], "on": [True], "both": [False, True]}[args.compensate]
    ours = [(method, settings) for method, settings in our_methods(name, args.smoke) if method in args.methods]
    for (method, settings), compensate in itertools.product(ours, compensations):
        knob = KNOBS[method]
        row = dict(shape=name, kind="ours", method=method + (", compensated" if compensate else ""),
                   settings=f"{knob} {getattr(settings, knob)}", all_settings=describe(settings), backend=backend,
                   compensate=compensate)
        try:
            first_ms, ms, density, err = time_planner(settings, grid, q, k, v, dense, backend, args, on_gpu,
                                                      compensate)
            row.update(status="ok", ms=ms, first_call_ms=first_ms, density=density, rel_err=err)
        except Exception as why:
            row.update(status=f"failed: {type(why).__name__}: {str(why)[:200]}")
        report(row)
        rows.append(row)
        free(device)
    for row in rows:
        if row.get("ms"):
            row["speedup"] = sdpa_ms / row["ms"]
    return rows


def report(row):
    figures = f"{row['ms']:.2f} ms, rel. error {row['rel_err']:.4f}" if row["status"] == "ok" else row["status"]
    print(f"  {row['method']} {row.get('all_settings', row['settings'])}: {figures}", flush=True)


def free(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------- report


def kitchen_version():
    try:
        return importlib.metadata.version("comfy-kitchen")
    except importlib.metadata.PackageNotFoundError:
        return None


def package_version(name):
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def print_table(meta, rows):
    print(f"\n{meta['device']} | torch {meta['torch']} | triton {meta['triton']} | comfy-kitchen "
          f"{meta['comfy_kitchen'] or 'not installed'} | sageattention {meta['sageattention'] or 'not installed'} | "
          f"{meta['date']}")
    print(f"sol_attn is ComfyUI's built-in sparse kernel (extra_tokens {SOL_EXTRA_TOKENS}, the node's default), "
          "measured per call: its node (Model Sparse Attention) needs a newer ComfyUI than the pack's tests run.\n"
          f"ms: a later step's call (step {LATER_STEP} of {RUN_STEPS} for ours); 1st call: ours building their state "
          "(k-means, search with nothing primed, head profile). Error: relative L2 against dense SDPA, same inputs.")
    header = f"{'shape':13s} {'method':29s} {'settings':22s} {'ms':>9s} {'vs SDPA':>8s} {'1st call':>9s} " \
             f"{'density':>7s} {'rel.err':>7s}"
    print(header + "\n" + "-" * len(header))
    for r in rows:
        settings = r["settings"]
        if r["status"] != "ok":
            print(f"{r['shape']:13s} {r['method']:29s} {settings:22s} {r['status']}")
            continue
        first = f"{r['first_call_ms']:9.2f}" if "first_call_ms" in r else f"{'-':>9s}"
        density = f"{r['density']:7.3f}" if r.get("density") is not None else f"{'-':>7s}"
        print(f"{r['shape']:13s} {r['method']:29s} {settings:22s} {r['ms']:9.2f} {r['speedup']:7.2f}x {first} "
              f"{density} {r['rel_err']:7.4f}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument("--sol-taus", nargs="*", type=float, default=[SOL_DEFAULT_TAU, 1.0, 2.0],
                        help="sol_attn thresholds (its node's tooltip: 1.0 keeps ~16%% of key blocks exact, "
                             "2.0 ~2.7%%)")
    parser.add_argument("--compensate", choices=("off", "on", "both"), default="off",
                        help="ours with the skipped keys' pooled terms: off, on, or both rows")
    parser.add_argument("--ours-only", action="store_true", help="no dense 8-bit rows")
    parser.add_argument("--methods", nargs="+", choices=list(KNOBS), default=list(KNOBS), help="which of ours to time")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per row (median)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--smoke", action="store_true",
                        help="CPU, tiny shape: kitchen's eager backend and our torch reference (checks the script)")
    args = parser.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        parser.error("this benchmark needs a CUDA GPU; --smoke checks it on the CPU")
    import triton

    device = torch.device("cpu" if args.smoke else "cuda")
    dtype = torch.bfloat16
    shapes = SMOKE_SHAPES if args.smoke else {name: SHAPES[name] for name in args.shapes}
    meta = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({platform.machine()})",
                torch=torch.__version__, triton=triton.__version__, comfy_kitchen=kitchen_version(),
                sageattention=package_version("sageattention"), dtype="bfloat16", head_dim=HEAD_DIM,
                repeats=args.repeats, run_steps=RUN_STEPS, timed_step=LATER_STEP, smoke=args.smoke,
                date=datetime.datetime.now().isoformat(timespec="seconds"))
    rows = []
    for name, dims in shapes.items():
        rows += run_shape(name, dims, args, device, dtype)
        if args.json:  # after every shape: a run cut short keeps what it measured
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    print_table(meta, rows)
    if args.json:
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
