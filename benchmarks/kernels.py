"""Block-sparse attention kernel vs dense SDPA at Wan 2.1 / HunyuanVideo sizes (bf16, one GPU).

    python benchmarks/kernels.py                                  # all shapes, densities 1 .5 .25 .1, both layouts
    python benchmarks/kernels.py --shapes wan1.3b-480p --configs --json out.json
    TRITON_INTERPRET=1 python benchmarks/kernels.py --smoke       # CPU: tiny shape, Triton interpreter

Effective TFLOP/s counts only the computed tiles: 4 * B * H * L^2 * D * density / time, so at density 1 it is
comparable with SDPA's. Checks (kernel vs SDPA at density 1, kernel vs the torch reference on a slice of a sparse
layout) run before timing; the exit status is 1 if one fails.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_timing import bench_timer  # noqa: E402

SHAPES = {  # name: (B, H, L, D); L is video tokens (+ text tokens for HunyuanVideo's joint attention)
    "wan1.3b-480p": (1, 12, 32760, 128),
    "wan14b-720p": (1, 40, 75600, 128),
    "hunyuan-720p": (1, 24, 118800 + 256, 128),
}
SMOKE_SHAPES = {"smoke": (1, 2, 200, 64)}
TILE_CONFIGS = [dict(BLOCK_N=n, num_warps=w, num_stages=s, tma=tma)
                for tma in (False, True) for n in (64, 128) for w in (4, 8) for s in (2, 3, 4)]
CHECK_TOL = 1e-2


def tile_spec(text: str):
    """'default' -> None (the GPU's tile config); 'scattered' -> the kernel's choice for lists its caller calls
    scattered (what AdaSpa's layouts get); 'N/W/S/tma' or 'N/W/S/ptr' -> the kernel's config dict."""
    if text in ("default", "scattered"):
        return None if text == "default" else text
    n, w, st, path = text.split("/")
    if path not in ("tma", "ptr"):
        raise argparse.ArgumentTypeError(f"{text!r}: the load path is 'tma' or 'ptr'")
    return dict(BLOCK_N=int(n), num_warps=int(w), num_stages=int(st), tma=path == "tma")


def tile_name(config) -> str:
    if config is None or isinstance(config, str):
        return config or "default"
    return \
        f"{config['BLOCK_N']}/{config['num_warps']}/{config['num_stages']}/{'tma' if config['tma'] else 'ptr'}"


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    p.add_argument("--densities", nargs="+", type=float, default=[1.0, 0.5, 0.25, 0.1])
    p.add_argument("--layouts", nargs="+", choices=["random", "banded"], default=["random", "banded"])
    p.add_argument("--block-size", type=int, choices=[64, 128], default=128)
    p.add_argument("--configs", action="store_true",
                   help="sweep BLOCK_N/num_warps/num_stages/tma at the first layout and the lowest density")
    p.add_argument("--tiles", nargs="+", type=tile_spec, default=[None], metavar="N/W/S/tma|ptr",
                   help="tile configs the table times, each layout at each (BLOCK_N/num_warps/num_stages/load "
                        "path, 'default': the GPU's, or 'scattered': the kernel's pick for lists called scattered); "
                        "default: the GPU's alone")
    p.add_argument("--json", type=Path, help="write every result here")
    p.add_argument("--warmup", type=float, default=100, help="do_bench warmup, ms")
    p.add_argument("--rep", type=float, default=500, help="do_bench repetition time, ms")
    p.add_argument("--seed", type=int, default=0, help="seed of the inputs and random layouts")
    p.add_argument("--smoke", action="store_true", help="tiny shape on the CPU (Triton interpreter); implies --configs")
    return p.parse_args()


# ------------------------------------------------------------------------------------------------ layouts


def kept_blocks(nb, density):
    return max(1, min(nb, round(density * nb)))


def random_layout(torch, heads, nb, density, gen):
    """Per head: each query block keeps its diagonal block plus random others (ascending, for K/V locality)."""
    device = gen.device
    score = torch.rand(1, heads, nb, nb, generator=gen, device=device)
    diag = torch.arange(nb, device=device)
    score[..., diag, diag] = -1.0  # sorts first, so it is always kept
    idx = score.argsort(dim=-1)[..., : kept_blocks(nb, density)].sort(dim=-1).values
    cnt = torch.full((1, heads, nb), idx.shape[-1], dtype=torch.int32, device=device)
    return idx.to(torch.int32).contiguous(), cnt


def banded_layout(torch, nb, density, device):
    """Shared: a contiguous band of kept blocks around the diagonal, shifted inward at the edges."""
    kept = kept_blocks(nb, density)
    start = (torch.arange(nb, device=device) - (kept - 1) // 2).clamp(0, nb - kept)
    idx = start[:, None] + torch.arange(kept, device=device)
    cnt = torch.full((1, 1, nb), kept, dtype=torch.int32, device=device)
    return idx.to(torch.int32)[None, None].contiguous(), cnt


def build_layout(torch, kind, heads, nb, density, gen):
    if kind == "random":
        return random_layout(torch, heads, nb, density, gen)
    return banded_layout(torch, nb, density, gen.device)


# ------------------------------------------------------------------------------------------------- timing




def sdpa_op_name(torch, q, k, v):
    """Which SDPA implementation the default dispatch runs, read from the aten op the profiler records."""
    from torch.profiler import ProfilerActivity, profile
    with warnings.catch_warnings():  # the profiler warns that it clears events at the end of each cycle
        warnings.simplefilter("ignore")
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            torch.nn.functional.scaled_dot_product_attention(q, k, v)
    names = {e.key for e in prof.key_averages()}
    for tag in ("cudnn", "flash", "efficient", "math"):
        if any(tag in n and "scaled_dot_product" in n for n in names):
            return tag
    return "unknown"


def time_sdpa(torch, q, k, v, timer):
    """ms per SDPA backend (None when it cannot run these inputs), the default dispatch, and the fastest."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    sdpa = torch.nn.functional.scaled_dot_product_attention
    backends = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                "cudnn": SDPBackend.CUDNN_ATTENTION}
    ms = {}
    for name, backend in backends.items():
        try:
            with sdpa_kernel([backend]):
                ms[name] = timer(lambda: sdpa(q, k, v))
        except RuntimeError:  # "No available kernel" for this device / dtype / shape
            ms[name] = None
    default_ms = timer(lambda: sdpa(q, k, v))
    ran = {name: t for name, t in ms.items() if t is not None}
    best = min(ran, key=ran.get) if ran else "default"
    return dict(backends=ms, default_ms=default_ms, default_op=sdpa_op_name(torch, q, k, v),
                best=best, best_ms=ran.get(best, default_ms))


# ------------------------------------------------------------------------------------------------- checks


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def run_checks(torch, K, q, k, v, bs, gen, args):
    """Kernel (public API) vs SDPA on the full layout; kernel vs the torch reference on a slice of a sparse one."""
    nb = K.num_blocks(q.shape[2], bs)
    full = K.block_mask_to_indices(torch.ones(1, 1, nb, nb, dtype=torch.bool, device=q.device))
    ours = K.block_sparse_attention(q, k, v, *full, block_size=bs, backend="triton")
    checks = [("full layout vs SDPA", rel_err(ours, torch.nn.functional.scaled_dot_product_attention(q, k, v)))]
    del ours

    density = min([d for d in args.densities if d < 1] or [0.25])
    idx, cnt = build_layout(torch, args.layouts[0], q.shape[1], nb, density, gen)
    ours = K.block_sparse_attention(q, k, v, idx, cnt, block_size=bs, backend="triton")
    qb0 = nb // 2
    qb1 = min(nb, qb0 + 2)
    r0, r1 = qb0 * bs, min(q.shape[2], qb1 * bs)
    ref = K.reference_block_sparse_attention(q[:, :1, r0:r1], k[:, :1], v[:, :1], idx[:, :1, qb0:qb1],
                                             cnt[:, :1, qb0:qb1], block_size=bs)
    checks.append((f"{args.layouts[0]} d={density} vs reference (head 0, rows {r0}:{r1})",
                   rel_err(ours[:, :1, r0:r1], ref)))
    return [dict(name=name, rel_err=err, ok=err < CHECK_TOL) for name, err in checks]


# ------------------------------------------------------------------------------------------------ sweeps


def time_layouts(torch, K, launch, q, bs, gen, timer, args, shape_name, sdpa_ms):
    B, H, L, D = q.shape
    nb = K.num_blocks(L, bs)
    dense_flops = 4 * B * H * L * L * D
    rows = []
    for kind in args.layouts:
        for density in args.densities:
            idx, cnt = build_layout(torch, kind, H, nb, density, gen)
            achieved = K.layout_density(cnt, nb)
            for config in args.tiles:
                ms = timer(lambda: launch(idx, cnt, config))
                tflops = dense_flops * achieved / ms / 1e9
                sdpa_tflops = dense_flops / sdpa_ms / 1e9
                rows.append(dict(shape=shape_name, layout=kind, density=density, achieved_density=achieved,
                                 tile=tile_name(config), sdpa_ms=sdpa_ms, ms=ms, tflops=tflops,
                                 sdpa_tflops=sdpa_tflops, tflops_ratio=tflops / sdpa_tflops, speedup=sdpa_ms / ms))
                print(f"  {kind:7s} density {achieved:.3f} tile {tile_name(config)}: {ms:9.3f} ms  "
                      f"{tflops:7.1f} TFLOP/s", flush=True)
    return rows


def sweep_configs(torch, K, launch, q, bs, gen, timer, args):
    """Time the default and every tile config at one layout; a config whose output differs from the default's
    is marked wrong (ms None). Returns (default ms, per-config results)."""
    nb = K.num_blocks(q.shape[2], bs)
    density = min(args.densities)
    idx, cnt = build_layout(torch, args.layouts[0], q.shape[1], nb, density, gen)
    expected = launch(idx, cnt, None).clone()
    default_ms = timer(lambda: launch(idx, cnt, None))
    results = []
    # The interpreter ignores warps and stages: the smoke run sweeps only the tile width and load path.
    configs = [c for c in TILE_CONFIGS if c["num_warps"] == 4 and c["num_stages"] == 2] if args.smoke else TILE_CONFIGS
    for cfg in configs:
        if cfg["BLOCK_N"] > bs:  # a key block narrower than the tile would be skipped entirely
            continue
        entry = dict(config=cfg, layout=args.layouts[0], density=density)
        try:
            err = rel_err(launch(idx, cnt, cfg), expected)
            entry.update(rel_err=err, ms=timer(lambda: launch(idx, cnt, cfg)) if err < CHECK_TOL else None)
        except Exception as exc:  # e.g. triton OutOfResources: too much shared memory for this tile
            entry.update(error=f"{type(exc).__name__}: {str(exc)[:120]}", ms=None)
        verdict = f"{entry['ms']:.3f} ms" if entry["ms"] is not None else entry.get("error", "WRONG output")
        print(f"  config {cfg}: {verdict}", flush=True)
        results.append(entry)
    return default_ms, results


# ------------------------------------------------------------------------------------------------- report


def device_name(torch, device):
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or 'cpu'})"


def print_report(meta, per_shape, rows):
    print(f"\n{meta['device']} | torch {meta['torch']} | triton {meta['triton']} | {meta['date']}")
    for name, info in per_shape.items():
        sdpa = info["sdpa"]
        backends = ", ".join(f"{b} {'n/a' if t is None else f'{t:.2f}'}" for b, t in sdpa["backends"].items())
        print(f"{name}: SDPA ms [{backends}; default ({sdpa['default_op']}) {sdpa['default_ms']:.2f}] "
              f"-> reference {sdpa['best']}")
        for c in info["checks"]:
            print(f"  check {c['name']}: rel err {c['rel_err']:.2e} {'ok' if c['ok'] else 'FAIL'}")
        timed = [r for r in info.get("configs", []) if r["ms"] is not None]
        if timed:
            best = min(timed, key=lambda r: r["ms"])
            print(f"  best tile config {best['config']}: {best['ms']:.3f} ms "
                  f"(default {info['default_config']}: {info['default_config_ms']:.3f} ms)")
    header = f"{'shape':14s} {'layout':7s} {'density':>7s} {'tile':>12s} {'SDPA ms':>9s} {'ours ms':>9s} " \
             f"{'TFLOP/s':>8s} {'vs SDPA':>7s} {'speedup':>7s}"
    print("\n" + header + "\n" + "-" * len(header))
    for r in rows:
        print(f"{r['shape']:14s} {r['layout']:7s} {r['achieved_density']:7.3f} {r['tile']:>12s} {r['sdpa_ms']:9.3f} "
              f"{r['ms']:9.3f} "
              f"{r['tflops']:8.1f} {r['tflops_ratio']:7.2f} {r['speedup']:6.2f}x")


def main():
    args = parse_args()
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
        args.configs = True
    import torch
    import triton
    from pack import import_pack

    K = import_pack("kernels")
    kernel = import_pack("kernels.block_sparse_triton")
    device = torch.device("cpu" if args.smoke else "cuda")
    shapes = SMOKE_SHAPES if args.smoke else {name: SHAPES[name] for name in args.shapes}
    bs = args.block_size
    timer = bench_timer(args.smoke, args.warmup, args.rep)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    meta = dict(device=device_name(torch, device), torch=torch.__version__, triton=triton.__version__,
                date=datetime.datetime.now().isoformat(timespec="seconds"), block_size=bs, dtype="bfloat16",
                warmup_ms=args.warmup, rep_ms=args.rep, smoke=args.smoke)
    print(f"{meta['device']} | torch {meta['torch']} | triton {meta['triton']} | {meta['date']}", flush=True)

    per_shape, rows = {}, []
    for name, (B, H, L, D) in shapes.items():
        print(f"{name}: B={B} H={H} L={L} D={D} block {bs}", flush=True)
        q, k, v = (torch.randn(B, H, L, D, generator=gen, device=device).to(torch.bfloat16) for _ in range(3))
        out = torch.empty_like(q)
        scale = 1.0 / math.sqrt(D)

        def launch(idx, cnt, config):
            # The launcher, not the public API: validation reads layout min/max on the host (GPU syncs),
            # which is no part of the kernel's cost. run_checks goes through the public API.
            named = isinstance(config, str)
            return kernel.triton_block_sparse_attention(q, k, v, idx, cnt, block_size=bs, scale=scale, out=out,
                                                        config=None if named else config,
                                                        scattered=config == "scattered")

        info = dict(shape=dict(B=B, H=H, L=L, D=D), checks=run_checks(torch, K, q, k, v, bs, gen, args))
        info["sdpa"] = time_sdpa(torch, q, k, v, timer)
        rows += time_layouts(torch, K, launch, q, bs, gen, timer, args, name, info["sdpa"]["best_ms"])
        if args.configs:
            info["default_config"] = kernel._tile_config(D, bs, device)
            info["default_config_ms"], info["configs"] = sweep_configs(torch, K, launch, q, bs, gen, timer, args)
        per_shape[name] = info
        del q, k, v, out
        if device.type == "cuda":
            torch.cuda.empty_cache()

    print_report(meta, per_shape, rows)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(dict(meta=meta, shapes=per_shape, results=rows), indent=1))
        print(f"wrote {args.json}")
    failed = [c["name"] for info in per_shape.values() for c in info["checks"] if not c["ok"]]
    if failed:
        print(f"FAILED checks: {failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
