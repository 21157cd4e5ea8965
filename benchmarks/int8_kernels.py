"""8-bit block-sparse kernels (FP8 / INT8) against our bf16 kernel, cuDNN SDPA and ComfyUI's own 8-bit kernels.

    python benchmarks/int8_kernels.py --json int8_kernels.json      # the three model shapes, densities 1 .5 .25 .1,
                                                                     # banded and scattered layouts
    python benchmarks/int8_kernels.py --shapes wan14b-720p --configs # also sweep the 8-bit kernel's tile configs
    TRITON_INTERPRET=1 python benchmarks/int8_kernels.py --smoke    # CPU: a tiny shape through the interpreter

Inputs are video-structured (benchmarks/synthetic.py: smooth space-time fields, moving objects, Wan's 3D RoPE) at
each model's token grid, bf16, head_dim 128. Per layout and density: ms per call of our bf16 kernel and of every
8-bit path the GPU has (the call as the pack makes it: pre-pass, kernel, the non-finite check); the speedup of
8-bit over bf16; throughput per computed tile relative to SDPA (SDPA ms x density / ms: 1.0 = as fast per tile as
dense SDPA); the relative error of the 8-bit output against the bf16 output on the same layout. ComfyUI's
comfy_kitchen (when importable): ``sol_attn`` (its own routed sparse attention, top-k at the same kept fraction,
no pooled tail) per density, and ``int8_attention`` (dense), each with its error against dense SDPA. Peak memory
of one bf16 and one 8-bit call. The issue's targets: 8-bit >= 1.5x bf16 per tile at every density, error <= 0.02.

Precision '8-bit + dense calls' (core/dense_8bit.py): per shape, one dense video self-attention call as the pack runs
it there (full layout, block 128, through kernels.block_sparse_attention) on each 8-bit path, against SDPA: ms, error
vs SDPA, and what it changes in a dense step's attention time (the model's video self-attention layers x the per-call
difference, for one model forward: cfg runs two).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_timing import bench_timer  # noqa: E402
from kernels import build_layout, device_name, rel_err, time_sdpa  # noqa: E402

# name: (batch, heads, frames, height, width, text tokens) of the latent token grid; head_dim 128
SHAPES = {
    "wan1.3b-480p": (1, 12, 21, 30, 52, 0),      # 32,760 tokens
    "wan14b-720p": (1, 40, 21, 45, 80, 0),       # 75,600
    "hunyuan-720p": (1, 24, 33, 45, 80, 256),    # 118,800 video + 256 text = 119,056
}
SMOKE_SHAPES = {"smoke": (1, 2, 2, 8, 16, 0)}  # 256 tokens
HEAD_DIM = 128
LAYOUT_NAMES = {"banded": "banded", "scattered": "random"}  # our name -> benchmarks/kernels.py's
# Tile configs swept (BLOCK_N, num_warps, num_stages); the FP8 path also with and without TMA loads and the per-tile
# fp32 sum of P V (the INT8 path has neither)
TILES = [(64, 4, 2), (64, 8, 2), (128, 8, 2), (128, 8, 3)]
CONFIGS = [dict(BLOCK_N=n, num_warps=w, num_stages=s, tma=tma, split_acc=split) for n, w, s in TILES
           for tma in (False, True) for split in (True, False)]
# Video self-attention calls in one forward of each model (HunyuanVideo: 20 double + 40 single blocks).
LAYERS = {"wan1.3b-480p": 30, "wan14b-720p": 40, "hunyuan-720p": 60, "smoke": 2}
SPEEDUP_TARGET = 1.5
ERROR_TARGET = 0.02


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    p.add_argument("--densities", nargs="+", type=float, default=[1.0, 0.5, 0.25, 0.1])
    p.add_argument("--layouts", nargs="+", choices=list(LAYOUT_NAMES), default=list(LAYOUT_NAMES))
    p.add_argument("--block-size", type=int, choices=[64, 128], default=128)
    p.add_argument("--configs", action="store_true", help="sweep the 8-bit tile configs at the lowest density")
    p.add_argument("--no-kitchen", action="store_true", help="skip comfy_kitchen even when it imports")
    p.add_argument("--json", type=Path, help="write every result here")
    p.add_argument("--warmup", type=float, default=100, help="do_bench warmup, ms")
    p.add_argument("--rep", type=float, default=500, help="do_bench repetition time, ms")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="tiny shape on the CPU (Triton interpreter)")
    return p.parse_args()


def video_inputs(torch, synthetic, B, H, frames, height, width, text, device, seed):
    """bf16 (B, H, L, 128) q, k, v of a video grid; text tokens (HunyuanVideo's joint attention) appended."""
    q, k, v = synthetic.video_qkv(frames=frames, height=height, width=width, heads=H, head_dim=HEAD_DIM, batch=B,
                                  seed=seed, device=device, dtype=torch.bfloat16)
    if text:
        gen = torch.Generator(device=device).manual_seed(seed + 1)
        q, k, v = (torch.cat([t, (torch.randn(B, H, text, HEAD_DIM, generator=gen, device=device) * t.float().std())
                              .to(t.dtype)], dim=2).contiguous() for t in (q, k, v))
    return q, k, v


def kitchen():
    """comfy_kitchen, or (None, why) when it does not import."""
    try:
        import comfy_kitchen
    except Exception as why:  # not installed, or its extension does not load here
        return None, f"{type(why).__name__}: {why}"
    return comfy_kitchen, getattr(comfy_kitchen, "__version__", "unknown version")


def attempt(fn):
    """(result, None) or (None, the error in one line): a third-party kernel that cannot run a shape is reported."""
    try:
        return fn(), None
    except Exception as why:
        return None, f"{type(why).__name__}: {str(why)[:160]}"


def peak_bytes(torch, fn):
    """Extra device memory one call holds at its peak (beyond what was allocated before it)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def main():
    args = parse_args()
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
        args.densities = [0.5]
        args.block_size = 64
    import torch
    import triton
    from pack import import_pack

    K = import_pack("kernels")
    bf16_kernel = import_pack("kernels.block_sparse_triton")
    q8_kernel = import_pack("kernels.block_sparse_8bit_triton")
    synthetic = import_pack("benchmarks.synthetic")
    core = import_pack("core")
    dense_8bit = import_pack("core.dense_8bit")
    device = torch.device("cpu" if args.smoke else "cuda")
    support = import_pack("kernels.eight_bit").eight_bit_support(device)
    # An FP8 GPU runs INT8 too (measured both); the interpreter runs both.
    precisions = ["fp8", "int8"] if args.smoke or support.precision == "fp8" else \
        ([support.precision] if support.precision != "bf16" else [])
    if not precisions:
        print(f"no 8-bit path here: {support.reason}")
        return 1
    ck, ck_note = (None, "skipped (--no-kitchen)") if args.no_kitchen else kitchen()
    bs = args.block_size
    timer = bench_timer(args.smoke, args.warmup, args.rep)
    meta = dict(device=device_name(torch, device), torch=torch.__version__, triton=triton.__version__,
                date=datetime.datetime.now().isoformat(timespec="seconds"), block_size=bs, dtype="bfloat16",
                head_dim=HEAD_DIM, precisions=precisions, support=support.reason, comfy_kitchen=ck_note,
                warmup_ms=args.warmup, rep_ms=args.rep, smoke=args.smoke)
    print(" | ".join(f"{k} {meta[k]}" for k in ("device", "torch", "triton", "date", "comfy_kitchen")), flush=True)

    shapes = SMOKE_SHAPES if args.smoke else {name: SHAPES[name] for name in args.shapes}
    per_shape, rows = {}, []
    for name, (B, H, frames, height, width, text) in shapes.items():
        q, k, v = video_inputs(torch, synthetic, B, H, frames, height, width, text, device, args.seed)
        L = q.shape[2]
        nb = K.num_blocks(L, bs)
        scale = 1.0 / math.sqrt(HEAD_DIM)
        print(f"{name}: B={B} H={H} L={L} D={HEAD_DIM} block {bs}", flush=True)
        out = torch.empty_like(q)
        gen = torch.Generator(device=device).manual_seed(args.seed)

        def launch(precision, idx, cnt, config=None):
            # The launchers, not the public API (whose layout validation syncs): the 8-bit one includes its
            # pre-pass and the non-finite check, as every call of the pack pays them.
            if precision == "bf16":
                return bf16_kernel.triton_block_sparse_attention(q, k, v, idx, cnt, block_size=bs, scale=scale,
                                                                 out=out, config=config)
            return q8_kernel.triton_block_sparse_attention_8bit(q, k, v, idx, cnt, block_size=bs, scale=scale,
                                                                precision=precision, out=out, config=config)

        sdpa = time_sdpa(torch, q, k, v, timer)
        sdpa_ms = sdpa["backends"].get("cudnn") or sdpa["best_ms"]
        dense = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        info = dict(shape=dict(B=B, H=H, L=L, D=HEAD_DIM, frames=frames, height=height, width=width, text=text),
                    sdpa=sdpa, sdpa_ms_used=sdpa_ms)
        if ck is not None:
            info["int8_attention"] = kitchen_dense(ck, q, k, v, dense, timer)
            qs, ks, vs = (t.transpose(1, 2).contiguous() for t in (q, k, v))  # sol_attn takes (B, T, H, 128)

        for layout in args.layouts:
            for density in args.densities:
                idx, cnt = build_layout(torch, LAYOUT_NAMES[layout], H, nb, density, gen)
                achieved = K.layout_density(cnt, nb)
                row = dict(shape=name, layout=layout, density=density, achieved_density=achieved, sdpa_ms=sdpa_ms)
                bf16_out = launch("bf16", idx, cnt).clone()
                row["bf16_ms"] = timer(lambda: launch("bf16", idx, cnt))
                row["bf16_err_vs_dense"] = rel_err(bf16_out, dense)
                for precision in precisions:
                    row[f"{precision}_err_vs_bf16"] = rel_err(launch(precision, idx, cnt), bf16_out)
                    row[f"{precision}_ms"] = ms = timer(lambda: launch(precision, idx, cnt))
                    row[f"{precision}_speedup"] = row["bf16_ms"] / ms
                for kind in ["bf16", *precisions]:
                    row[f"{kind}_tile_vs_sdpa"] = sdpa_ms * achieved / row[f"{kind}_ms"]
                if ck is not None:
                    row.update(kitchen_sparse(ck, qs, ks, vs, dense, density, timer))
                del bf16_out
                rows.append(row)
                print("  " + row_text(row, precisions), flush=True)

        grid = core.VideoGrid(frames, height, width, text_tokens=text)
        info["dense_calls"] = dense_calls(torch, core, dense_8bit, grid, (q, k, v), precisions, sdpa_ms, dense, timer,
                                          LAYERS[name])
        print("  " + dense_calls_text(info["dense_calls"], precisions), flush=True)
        if device.type == "cuda":
            idx, cnt = build_layout(torch, "banded", H, nb, 0.25, gen)
            info["peak_bytes"] = {p: peak_bytes(torch, lambda: launch(p, idx, cnt)) for p in ["bf16", *precisions]}
        if args.configs:
            def prepass(precision):  # what a call spends before its kernel: K's mean, the 8-bit copies of K and V
                q8_kernel.prepass(k, v, None, None, block_size=bs, precision=precision)

            info["configs"] = sweep_configs(torch, K, launch, prepass, precisions, H, nb, gen, timer, args)
        per_shape[name] = info
        del q, k, v, out, dense
        if ck is not None:
            del qs, ks, vs
        if device.type == "cuda":
            torch.cuda.empty_cache()

    print_report(meta, per_shape, rows, precisions)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(dict(meta=meta, shapes=per_shape, results=rows), indent=1))
        print(f"wrote {args.json}")
    return 0


def dense_calls(torch, core, dense_8bit, grid, qkv, precisions, sdpa_ms, dense, timer, layers):
    """Precision '8-bit + dense calls': one dense call as the pack runs it (core.dense_8bit.full_layout_attention, its
    layout cached as within a forward) per 8-bit path: ms, speed-up and error against SDPA, and a dense step's
    attention time (``layers`` calls, one forward) with SDPA and with the 8-bit call."""
    out, memo = torch.empty_like(qkv[0]), {}
    result = dict(layers=layers, sdpa_ms=sdpa_ms, sdpa_step_attention_s=layers * sdpa_ms / 1e3)
    for precision in precisions:
        call = core.AttentionCall(grid=grid, layer=0, step=0, total_steps=1, q=qkv[0], k=qkv[1], v=qkv[2], out=out,
                                  backend="triton", precision=precision)
        err = rel_err(dense_8bit.full_layout_attention(call, memo), dense)
        ms = timer(lambda: dense_8bit.full_layout_attention(call, memo))
        result[precision] = dict(ms=ms, speedup_vs_sdpa=sdpa_ms / ms, err_vs_sdpa=err,
                                 step_attention_s=layers * ms / 1e3)
    return result


def dense_calls_text(info, precisions):
    parts = [f"dense call, full layout: SDPA {info['sdpa_ms']:.3f} ms"]
    parts += [f"{p} {info[p]['ms']:.3f} ms ({info[p]['speedup_vs_sdpa']:.2f}x SDPA, err {info[p]['err_vs_sdpa']:.4f})"
              for p in precisions]
    step = " / ".join([f"SDPA {info['sdpa_step_attention_s']:.3f} s"] +
                      [f"{p} {info[p]['step_attention_s']:.3f} s" for p in precisions])
    return " | ".join(parts) + f"; a dense step's attention ({info['layers']} layers, one forward): {step}"


def kitchen_dense(ck, q, k, v, dense, timer):
    """comfy_kitchen.int8_attention (dense, (B, H, L, D)): ms and error against SDPA, or why it did not run."""
    out, error = attempt(lambda: ck.int8_attention(q, k, v))
    if error:
        return dict(error=error)
    return dict(ms=timer(lambda: ck.int8_attention(q, k, v)), err_vs_dense=rel_err(out, dense))


def kitchen_sparse(ck, qs, ks, vs, dense, density, timer):
    """comfy_kitchen.sol_attn at the same kept fraction (its own top-k routing, no pooled tail)."""
    def call():
        return ck.sol_attn(qs, ks, vs, topk_ratio=density, tail=False)
    out, error = attempt(call)
    if error:
        return dict(sol_error=error)
    return dict(sol_ms=timer(call), sol_err_vs_dense=rel_err(out.transpose(1, 2), dense))


def sweep_configs(torch, K, launch, prepass, precisions, H, nb, gen, timer, args):
    """Every tile config of each 8-bit path at the first layout and the lowest density; a config whose output
    differs from the default's (or that cannot launch) gets no time. Also the pre-pass alone."""
    density = min(args.densities)
    idx, cnt = build_layout(torch, LAYOUT_NAMES[args.layouts[0]], H, nb, density, gen)
    results = []
    for precision in precisions:
        expected = launch(precision, idx, cnt).clone()
        default_ms = timer(lambda: launch(precision, idx, cnt))
        entry = dict(precision=precision, prepass_ms=timer(lambda: prepass(precision)))
        print(f"  {precision} pre-pass alone (K and V quantized, every head): {entry['prepass_ms']:.3f} ms",
              flush=True)
        results.append(entry)
        for cfg in CONFIGS:
            if cfg["BLOCK_N"] > args.block_size or (precision == "int8" and (cfg["tma"] or not cfg["split_acc"])):
                continue
            entry = dict(precision=precision, config=cfg, default_ms=default_ms)
            err, error = attempt(lambda: rel_err(launch(precision, idx, cnt, dict(cfg)), expected))
            ok = error is None and err < 1e-2
            entry.update(rel_err=err, error=error, ms=timer(lambda: launch(precision, idx, cnt, dict(cfg))) if ok
                         else None)
            print(f"  {precision} config {cfg}: " + (f"{entry['ms']:.3f} ms" if ok else (error or "WRONG output")),
                  flush=True)
            results.append(entry)
    return results


def row_text(row, precisions):
    parts = [f"{row['shape']:13s} {row['layout']:9s} d={row['achieved_density']:.3f}",
             f"bf16 {row['bf16_ms']:8.3f} ms"]
    for p in precisions:
        parts.append(f"{p} {row[f'{p}_ms']:8.3f} ms ({row[f'{p}_speedup']:.2f}x, err {row[f'{p}_err_vs_bf16']:.4f})")
    if "sol_ms" in row:
        parts.append(f"sol_attn {row['sol_ms']:8.3f} ms")
    return " | ".join(parts)


def print_report(meta, per_shape, rows, precisions):
    print(f"\n{meta['device']} | torch {meta['torch']} | triton {meta['triton']} | {meta['date']} | "
          f"block {meta['block_size']} | 8-bit: {meta['support']}")
    for name, info in per_shape.items():
        line = f"{name}: L={info['shape']['L']} H={info['shape']['H']}, SDPA {info['sdpa_ms_used']:.2f} ms"
        dense8 = info.get("int8_attention")
        if dense8 is not None:
            line += (f", comfy_kitchen int8_attention {dense8['ms']:.2f} ms (err vs SDPA {dense8['err_vs_dense']:.4f})"
                     if "ms" in dense8 else f", int8_attention did not run: {dense8['error']}")
        if "peak_bytes" in info:
            line += ", peak MiB " + " / ".join(f"{p} {b / 2 ** 20:.0f}" for p, b in info["peak_bytes"].items())
        print(line)
        print("  " + dense_calls_text(info["dense_calls"], precisions))
        timed = [c for c in info.get("configs", []) if c.get("ms") is not None]
        for p in precisions:
            best = min((c for c in timed if c["precision"] == p), key=lambda c: c["ms"], default=None)
            if best:
                print(f"  best {p} tile config {best['config']}: {best['ms']:.3f} ms (default {best['default_ms']:.3f})")
    cols = "".join(f" {p + ' ms':>9s} {'x bf16':>6s} {'/tile':>6s} {'err':>7s}" for p in precisions)
    header = f"{'shape':13s} {'layout':9s} {'density':>7s} {'SDPA ms':>9s} {'bf16 ms':>9s} {'/tile':>6s}{cols} " \
             f"{'sol ms':>8s}"
    print("\n" + header + "\n" + "-" * len(header))
    for r in rows:
        line = f"{r['shape']:13s} {r['layout']:9s} {r['achieved_density']:7.3f} {r['sdpa_ms']:9.3f} " \
               f"{r['bf16_ms']:9.3f} {r['bf16_tile_vs_sdpa']:6.2f}"
        for p in precisions:
            line += f" {r[f'{p}_ms']:9.3f} {r[f'{p}_speedup']:6.2f} {r[f'{p}_tile_vs_sdpa']:6.2f} " \
                    f"{r[f'{p}_err_vs_bf16']:7.4f}"
        line += f" {r['sol_ms']:8.3f}" if "sol_ms" in r else f" {'-':>8s}"
        print(line)
    for p in precisions:
        speed = all(r[f"{p}_speedup"] >= SPEEDUP_TARGET for r in rows)
        error = all(r[f"{p}_err_vs_bf16"] <= ERROR_TARGET for r in rows)
        print(f"{p}: >= {SPEEDUP_TARGET}x bf16 at every row: {'yes' if speed else 'NO'}; error <= {ERROR_TARGET} "
              f"at every row: {'yes' if error else 'NO'}")


if __name__ == "__main__":
    sys.exit(main())
