"""What compensation of skipped keys costs against the plain sparse call, at the Wan 14B 720p shape (one GPU, bf16).

    python benchmarks/compensation_cost.py [--json out.json]          # Radial layout and a random 0.25 layout
    python benchmarks/compensation_cost.py --anatomy                  # also: where the compensated kernel's time goes
    python benchmarks/compensation_cost.py --centre-configs           # also: the block summary's centre pass per tile
    TRITON_INTERPRET=1 python benchmarks/compensation_cost.py --smoke  # CPU: tiny shape, Triton interpreter

The Sparse Attention Patch's ``compensate`` setting adds, per call, one pass pooling k and v per key block
(kernels.pool_key_blocks) and, in the block-sparse kernel, one extra tile set per query block (the skipped blocks'
pooled keys). Timed: the plain kernel, the pooling pass, the compensated kernel, and the whole compensated call
(pooling + kernel), and the summarised call (``block_sparse_attention(..., summarise=True)``, kernels/block_summary.py:
one term per row, exact at the query block's mean query; the summary and its fold alone as well). The issue's
target: the whole compensated call at most 1.05x the plain one. A check (both compensated calls against the torch
reference on two heads) runs before timing; the exit status is 1 if it fails.

``--anatomy`` splits the compensated kernel's extra time, per layout: its host-side preparation alone (pooled
tensors in the kernel's layout, the kept table), both kernels on an empty layout (no block kept: the compensation
loop over every pooled group, with nothing else), the compensated kernel at other pooled-group tiles (BLOCK_P), and
the registers and spills of every kernel variant it times (GPU only). ``--centre-configs`` times the block
summary's pass at the mean queries (kernels/block_summary_triton.py) over every head at several tiles and launches.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_timing import bench_timer  # noqa: E402

# name: (batch, heads, head_dim, video grid (frames, height, width in tokens))
SHAPES = {"wan14b-720p": (1, 40, 128, (21, 45, 80))}
SMOKE_SHAPES = {"smoke": (1, 2, 64, (5, 4, 16))}
TARGET = 1.05
CHECK_TOL = 1e-2


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layouts", nargs="+", choices=["radial", "random"], default=["radial", "random"])
    p.add_argument("--density", type=float, default=0.25, help="kept share of the random layout")
    p.add_argument("--block-size", type=int, choices=[64, 128], default=128)
    p.add_argument("--json", type=Path)
    p.add_argument("--warmup", type=float, default=100, help="do_bench warmup, ms")
    p.add_argument("--rep", type=float, default=500, help="do_bench repetition time, ms")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="tiny shape on the CPU (Triton interpreter)")
    p.add_argument("--anatomy", action="store_true", help="also split the compensated kernel's extra time")
    p.add_argument("--centre-configs", action="store_true", help="also time the summary's centre pass per config")
    return p.parse_args()


def build_layout(torch, core, K, kind, grid, heads, bs, density, gen):
    """(kv_indices, kv_counts, density) of the Radial layout of ``grid`` (Wan's reference settings) or of a random
    per-head layout keeping ``density`` of the blocks (the diagonal always)."""
    device = gen.device
    if kind == "radial":
        mask = core.radial_block_mask(grid, core.RadialSettings(block_size=bs)).to(device)[None, None]
        idx, cnt = K.block_mask_to_indices(mask)
        return idx, cnt, float(mask.float().mean())
    nb = K.num_blocks(grid.total_tokens, bs)
    kept = max(1, min(nb, round(density * nb)))
    score = torch.rand(1, heads, nb, nb, generator=gen, device=device)
    score.diagonal(dim1=-2, dim2=-1).fill_(2.0)  # above every random score: always kept
    idx = score.topk(kept, dim=-1).indices.sort(dim=-1).values.to(torch.int32).contiguous()
    return idx, torch.full((1, heads, nb), kept, dtype=torch.int32, device=device), kept / nb


def with_block_p(kernel, block_p):
    """kernel._compensation_args with the pooled-group tile set to ``block_p`` (restore kernel._compensation_args
    after use)."""
    original = kernel._compensation_args

    def args(*a, **kw):
        result = original(*a, **kw)
        result["constants"] = dict(result["constants"], BLOCK_P=block_p)
        return result
    return args


def kernel_caches(kernel) -> list:
    """Triton's in-memory caches (a compiled binary per specialisation) of both block-sparse kernels; their layout
    differs between Triton versions (3.x: a tuple whose first item is the dict; none under the CPU interpreter)."""
    caches = []
    for fn in (kernel._block_sparse_fwd, kernel._block_sparse_fwd_tma):
        for cache in getattr(fn, "device_caches", {}).values():
            caches.append(cache[0] if isinstance(cache, tuple) else cache)
    return caches


def registers_of(kernel, launch) -> list:
    """Registers and spills a thread of the kernel variant(s) ``launch`` runs: the caches are emptied first (Triton
    reloads the binary from its disk cache), so what they hold afterwards is what it ran."""
    for cache in kernel_caches(kernel):
        cache.clear()
    launch()
    return [dict(n_regs=binary.n_regs, n_spills=binary.n_spills, shared=binary.metadata.shared)
            for cache in kernel_caches(kernel) for binary in cache.values()]


def anatomy(torch, K, kernel, timer, q, k, v, out, idx, cnt, bs, pooled):
    """(ms, registers) of the compensated kernel's parts (see --anatomy); registers: per kernel variant timed, the
    registers and spills a thread (GPU only). On the GPU also the kernel at 8 warps: the compensation tiles (the
    pooled keys and values of BLOCK_P groups, their scores) come on top of the main loop's registers, which at 4
    warps are already at the 255 a thread may have (H100, Triton 3.6)."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    empty = torch.zeros_like(cnt)
    lse = torch.empty(q.shape[:3], device=q.device)
    run = lambda counts, pooled_terms, config=None: kernel.triton_block_sparse_attention(  # noqa: E731
        q, k, v, idx, counts, block_size=bs, scale=scale, out=out, pooled=pooled_terms, config=config)
    prepare = lambda: kernel._compensation_args(pooled, q, False, lse, idx.to(torch.int32),  # noqa: E731
                                                cnt.to(torch.int32))
    ms = {"preparation (pooled layout + kept table)": timer(prepare),
          "empty layout, plain": timer(lambda: run(empty, None)),
          "empty layout, compensated": timer(lambda: run(empty, pooled))}
    registers = {}
    kernels = {"plain kernel": lambda: run(cnt, None),
               f"compensated kernel, BLOCK_P {prepare()['constants']['BLOCK_P']}": lambda: run(cnt, pooled)}
    # (BLOCK_P, tile config; None: the GPU's default): the tiles around the GPU's default (32)
    variants = [(16, None), (64, None), (128, None)]
    if q.is_cuda:
        registers.update({label: registers_of(kernel, launch) for label, launch in kernels.items()})
        # 128-wide key tiles over 8 warps and 3 stages (the fastest tile at HunyuanVideo length, RESULTS.md)
        eight_warps = dict(kernel._tile_config(q.shape[-1], bs, q.device), BLOCK_N=128, num_warps=8, num_stages=3)
        launch = lambda: run(cnt, None, eight_warps)  # noqa: E731
        registers["plain kernel, 128/8/3"] = registers_of(kernel, launch)
        ms["plain kernel, 128/8/3"] = timer(launch)
        variants += [(32, eight_warps), (64, eight_warps)]
    original = kernel._compensation_args
    try:
        for block_p, config in variants:
            kernel._compensation_args = with_block_p(kernel, block_p)
            label = f"compensated kernel, BLOCK_P {block_p}" + (", 128/8/3" if config else "")
            launch = lambda: run(cnt, pooled, config)  # noqa: E731
            if q.is_cuda:
                registers[label] = registers_of(kernel, launch)
            ms[label] = timer(launch)
    finally:
        kernel._compensation_args = original
    return ms, registers


CENTRE_CONFIGS = [dict(BLOCK_C=c, BLOCK_N=n, num_warps=w, num_stages=st) for c, n, w, st in
                  ((64, 64, 4, 2), (64, 64, 4, 3), (64, 64, 8, 2), (128, 64, 8, 2), (64, 128, 8, 2), (32, 64, 4, 2),
                   (128, 32, 8, 3))]


def centre_configs(torch, K, block_summary, timer, q, k, v, idx, cnt, bs, scale) -> dict:
    """ms of the block summary's pass at the mean queries over every head at each of CENTRE_CONFIGS."""
    from pack import import_pack

    triton_side = import_pack("kernels.block_summary_triton")
    B, H, L, _ = q.shape
    nqb = K.num_blocks(L, bs)
    kept = block_summary.kept_table(idx, cnt, B, H, nqb)
    centre = block_summary._block_means(q, bs)
    limit = torch.full((B,), L, dtype=torch.int32, device=q.device)
    means = block_summary._head_means(k, v, limit)
    original, ms = dict(triton_side.CENTRE_CONFIG), {}
    try:
        for cfg in CENTRE_CONFIGS:
            triton_side.CENTRE_CONFIG.clear()
            triton_side.CENTRE_CONFIG.update(cfg)
            label = "C{BLOCK_C} N{BLOCK_N} w{num_warps} s{num_stages}".format(**cfg)
            ms[label] = timer(lambda: triton_side.triton_centre_pass(centre, k, v, kept, limit, *means, bs, scale,
                                                                     q.dtype))
    finally:
        triton_side.CENTRE_CONFIG.clear()
        triton_side.CENTRE_CONFIG.update(original)
    return ms


def rel_err(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30))


def main():
    args = parse_args()
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
    import torch
    import triton
    from pack import import_pack

    core, K = import_pack("core"), import_pack("kernels")
    block_summary = import_pack("kernels.block_summary")
    kernel = import_pack("kernels.block_sparse_triton")
    device = torch.device("cpu" if args.smoke else "cuda")
    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    bs = args.block_size
    timer = bench_timer(args.smoke, args.warmup, args.rep)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    meta = dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else
                f"CPU ({platform.processor() or 'cpu'})", torch=torch.__version__, triton=triton.__version__,
                date=datetime.datetime.now().isoformat(timespec="seconds"), block_size=bs, dtype="bfloat16",
                smoke=args.smoke)
    print(f"{meta['device']} | torch {meta['torch']} | triton {meta['triton']} | {meta['date']}", flush=True)

    rows, checks = [], []
    for name, (B, H, D, (frames, height, width)) in shapes.items():
        grid = core.VideoGrid(frames, height, width)
        L = grid.total_tokens
        q, k, v = (torch.randn(B, H, L, D, generator=gen, device=device).to(torch.bfloat16) for _ in range(3))
        out = torch.empty_like(q)
        scale = 1.0 / math.sqrt(D)
        for kind in args.layouts:
            idx, cnt, density = build_layout(torch, core, K, kind, grid, H, bs, args.density, gen)

            def plain():
                kernel.triton_block_sparse_attention(q, k, v, idx, cnt, block_size=bs, scale=scale, out=out)

            pooled = K.pool_key_blocks(k, v, bs, backend="triton")

            def pool():
                K.pool_key_blocks(k, v, bs, backend="triton")

            def compensated_kernel():
                kernel.triton_block_sparse_attention(q, k, v, idx, cnt, block_size=bs, scale=scale, out=out,
                                                     pooled=pooled)

            def compensated_call():  # what a planner runs per call
                kernel.triton_block_sparse_attention(q, k, v, idx, cnt, block_size=bs, scale=scale, out=out,
                                                     pooled=K.pool_key_blocks(k, v, bs, backend="triton"))

            _, lse = K.block_sparse_attention(q, k, v, idx, cnt, block_size=bs, out=out, check_layout=False,
                                              return_lse=True)

            def summary():  # the summary and its fold into the rows, after the plain kernel
                block_summary.compensate_skipped_blocks(out, lse, q, k, v, idx, cnt, block_size=bs, scale=scale,
                                                        backend="triton" if device.type == "cuda" else "reference")

            def summarised_call():
                K.block_sparse_attention(q, k, v, idx, cnt, block_size=bs, out=out, check_layout=False,
                                         summarise=True)

            # Check on two heads: the compensated kernel against the torch reference.
            few = tuple(t[:, :2] for t in (q, k, v))
            lay = tuple(t[:, :2] if t.shape[1] > 1 else t for t in (idx, cnt))
            got = K.block_sparse_attention(*few, *lay, block_size=bs, backend="triton",
                                           pooled=K.pool_key_blocks(*few[1:], bs, backend="triton"))
            want = K.block_sparse_attention(*(t.float() for t in few), *lay, block_size=bs, backend="reference",
                                            pooled=K.pool_key_blocks(*(t.float() for t in few[1:]), bs,
                                                                     backend="reference"))
            err = rel_err(got, want)
            checks.append(dict(shape=name, layout=kind, rel_err=err, ok=err < CHECK_TOL))
            # (the reference with the same 16-bit inputs, so that both fold the same summary: its own precision in
            # 16 bits is the summary's, tests/test_block_summary.py)
            got = K.block_sparse_attention(*few, *lay, block_size=bs, backend="triton", summarise=True)
            want = K.block_sparse_attention(*few, *lay, block_size=bs, backend="reference", summarise=True)
            err_s = rel_err(got, want)
            checks.append(dict(shape=name, layout=f"{kind} summarised", rel_err=err_s, ok=err_s < CHECK_TOL))
            print(f"{name} {kind}: density {density:.3f}, check rel err {err:.2e}, summarised {err_s:.2e}", flush=True)

            times = {label: timer(fn) for label, fn in (("plain", plain), ("pool", pool),
                                                         ("compensated_kernel", compensated_kernel),
                                                         ("compensated_call", compensated_call),
                                                         ("summary", summary), ("summarised_call", summarised_call))}
            rows.append(dict(shape=name, B=B, H=H, L=L, D=D, layout=kind, density=density, ms=times,
                             overhead=times["compensated_call"] / times["plain"],
                             summarised_overhead=times["summarised_call"] / times["plain"], target=TARGET))
            if args.anatomy:
                rows[-1]["anatomy_ms"], rows[-1]["registers"] = anatomy(torch, K, kernel, timer, q, k, v, out, idx,
                                                                        cnt, bs, pooled)
            if args.centre_configs and device.type == "cuda":
                rows[-1]["centre_pass_ms"] = centre_configs(torch, K, block_summary, timer, q, k, v, idx, cnt, bs,
                                                            scale)
        del q, k, v, out
        if device.type == "cuda":
            torch.cuda.empty_cache()

    header = (f"{'shape':12s} {'layout':7s} {'density':>7s} {'plain ms':>9s} {'pool ms':>8s} {'comp. kernel':>12s} "
              f"{'comp. call':>10s} {'ratio':>6s} {'summary':>8s} {'summ. call':>10s} {'ratio':>6s}")
    print(f"\n{meta['device']} | torch {meta['torch']} | triton {meta['triton']} | {meta['date']}")
    for c in checks:
        print(f"check {c['shape']} {c['layout']}: rel err {c['rel_err']:.2e} {'ok' if c['ok'] else 'FAIL'}")
    print(header + "\n" + "-" * len(header))
    for r in rows:
        t = r["ms"]
        print(f"{r['shape']:12s} {r['layout']:7s} {r['density']:7.3f} {t['plain']:9.3f} {t['pool']:8.3f} "
              f"{t['compensated_kernel']:12.3f} {t['compensated_call']:10.3f} {r['overhead']:6.3f} "
              f"{t['summary']:8.3f} {t['summarised_call']:10.3f} {r['summarised_overhead']:6.3f}")
    for r in rows:
        for label, ms in r.get("centre_pass_ms", {}).items():
            print(f"  {r['layout']:7s} centre pass, every head, {label:24s} {ms:9.3f} ms")
        for part, ms in r.get("anatomy_ms", {}).items():
            print(f"  {r['layout']:7s} {part:44s} {ms:9.3f} ms")
        for part, variants in r.get("registers", {}).items():
            print(f"  {r['layout']:7s} {part:44s} " + ", ".join(f"{v['n_regs']} registers, {v['n_spills']} spills"
                                                                for v in variants))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(dict(meta=meta, checks=checks, results=rows), indent=1))
        print(f"wrote {args.json}")
    failed = [f"{c['shape']} {c['layout']}" for c in checks if not c["ok"]]
    if failed:
        print(f"FAILED checks: {failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
