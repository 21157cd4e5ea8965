"""Break-even densities of the sparse kernels on this GPU: above which plan density each is slower than dense SDPA.

    python benchmarks/break_even.py                               # Wan 2.1 14B 720p, densities 0.3 .. 1.0
    python benchmarks/break_even.py --shapes wan14b-720p hunyuan-720p --json out.json
    TRITON_INTERPRET=1 python benchmarks/break_even.py --smoke    # CPU: tiny shape, Triton interpreter, no figures

Per kernel of core/break_even.py (the fixed-block kernel at block 64 and 128 on scattered layouts: each query block
keeps its diagonal and random others, per head; the cluster kernel on ragged clusters of SVG2's reference counts, 300
query and 1000 key clusters, lognormal sizes) and per density: the kernel's time against SDPA's (the default dispatch,
bf16, same inputs, same run), medians of triton's do_bench. The break-even is the highest measured density at which
the kernel is not slower than SDPA (the table takes only measured points; rerun with finer --densities around it).
Printed last: the rows for core/break_even.py's TABLE, with the device, date and shape they were measured on.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import math
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE))
from bench_timing import bench_timer, sibling_benchmark  # noqa: E402


def parse_args(argv=None):
    bench_kernels = sibling_benchmark("kernels")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", choices=list(bench_kernels.SHAPES), default=["wan14b-720p"])
    p.add_argument("--densities", nargs="+", type=float, default=[0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 1.0])
    p.add_argument("--sigma", type=float, default=0.5, help="lognormal spread of the cluster sizes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write every measurement here")
    p.add_argument("--smoke", action="store_true", help="CPU, Triton interpreter, tiny shape: the code path only")
    return p.parse_args(argv), bench_kernels


def block_cases(torch, K, bench_kernels, q, block_size, densities, gen):
    """(density, run) of the fixed-block kernel on scattered layouts at ``block_size``."""
    H, L = q.shape[1], q.shape[2]
    nb = K.num_blocks(L, block_size)
    out = torch.empty_like(q)
    for density in densities:
        idx, cnt = bench_kernels.random_layout(torch, H, nb, density, gen)
        kept = float(cnt.sum()) / (H * nb * nb)
        yield kept, lambda idx=idx, cnt=cnt: K.block_sparse_attention(q, q, q, idx, cnt, block_size=block_size,
                                                                      out=out, check_layout=False)


def cluster_cases(torch, K, bench_cluster, q, densities, sigma, gen):
    """(density, run) of the cluster kernel on ragged clusters (SVG2's reference counts) keeping ``density`` of the
    keys per query cluster, reading the tokens through random cluster orders as SVG2 calls it."""
    H, L = q.shape[1], q.shape[2]
    q_off = bench_cluster.ragged_offsets(torch, H, L, max(1.0, L / 300), sigma, gen)
    k_off = bench_cluster.ragged_offsets(torch, H, L, max(1.0, L / 1000), sigma, gen)
    q_order, k_order = (torch.rand(1, H, L, generator=gen, device=q.device).argsort(-1).to(torch.int32)
                        for _ in range(2))
    out = torch.empty_like(q)
    for density in densities:
        ids, counts = bench_cluster.kept_lists(torch, q_off, k_off, density, gen)
        kept = float(K.cluster_pair_count(q_off, k_off, ids, counts).sum()) / (H * L * L)
        yield kept, lambda ids=ids, counts=counts: K.cluster_block_attention(
            q, q, q, q_off, k_off, ids, counts, out=out, check_layout=False, q_order=q_order, k_order=k_order)


def break_even_of(points) -> float | None:
    """The highest measured density whose time is at most SDPA's (None: slower at every measured density)."""
    fast = [p["density"] for p in points if p["time_vs_sdpa"] <= 1.0]
    return max(fast) if fast else None


def main(argv=None) -> int:
    args, bench_kernels = parse_args(argv)
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
        args.densities = [0.5, 1.0]
    import torch
    import triton
    from pack import import_pack

    K = import_pack("kernels")
    table = import_pack("core.break_even")
    bench_cluster = sibling_benchmark("cluster_attention")
    device = torch.device("cpu" if args.smoke else "cuda")
    if not args.smoke and not torch.cuda.is_available():
        print("FAIL: needs a CUDA GPU (use --smoke on the CPU)")
        return 1
    timer = bench_timer(args.smoke)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (Triton interpreter)"
    gpu = table.gpu_class(device)
    date = datetime.date.today().isoformat()
    print(f"{name} ({gpu}) | torch {torch.__version__} | triton {triton.__version__} | {date}", flush=True)
    shapes = {"smoke": (1, 2, 200, 64)} if args.smoke else {s: bench_kernels.SHAPES[s] for s in args.shapes}
    results = []
    for shape_name, (B, H, L, D) in shapes.items():
        q = torch.randn(B, H, L, D, generator=gen, device=device).to(torch.bfloat16)
        sdpa_ms = timer(functools.partial(torch.nn.functional.scaled_dot_product_attention, q, q, q))
        print(f"{shape_name}: B={B} H={H} L={L} D={D} bf16, SDPA {sdpa_ms:.2f} ms", flush=True)
        cases = {table.BLOCK_64: block_cases(torch, K, bench_kernels, q, 64, args.densities, gen),
                 table.BLOCK_128: block_cases(torch, K, bench_kernels, q, 128, args.densities, gen),
                 table.CLUSTER: cluster_cases(torch, K, bench_cluster, q, args.densities, args.sigma, gen)}
        print(f"{'kernel':<10}{'density':>8}{'ms':>10}{'vs SDPA time':>14}{'throughput ratio':>18}")
        for kernel, runs in cases.items():
            points = []
            for density, run in runs:
                ms = timer(run)
                point = dict(density=density, ms=ms, time_vs_sdpa=ms / sdpa_ms, ratio=density * sdpa_ms / ms)
                points.append(point)
                print(f"{kernel:<10}{density:8.3f}{ms:10.2f}{point['time_vs_sdpa']:14.3f}{point['ratio']:18.3f}",
                      flush=True)
            results.append(dict(shape=shape_name, kernel=kernel, sdpa_ms=sdpa_ms, points=points,
                                break_even=break_even_of(points)))
    if args.json:
        Path(args.json).write_text(json.dumps(dict(device=name, gpu_class=gpu, torch=torch.__version__,
                                                   triton=triton.__version__, date=date, results=results), indent=1))
    print(f"\nrows for core/break_even.py ({gpu}; the lowest over the shapes is the safe entry):")
    for r in results:
        where = f"measured, {name}, {date}, {r['shape']}, SDPA {r['sdpa_ms']:.1f} ms (benchmarks/break_even.py)"
        if r["break_even"] is None:
            print(f"  {gpu:<10}{r['kernel']:<10}none    # slower than SDPA at every measured density: {where}")
        else:
            print(f"  {gpu:<10}{r['kernel']:<10}{r['break_even']:<8.2f}# not slower than SDPA up to this density: "
                  f"{where}")
    if args.smoke:
        print("SMOKE OK: every kernel ran at every density (CPU: the figures mean nothing)")
    return 0 if all(math.isfinite(p["ms"]) for r in results for p in r["points"]) else 1


if __name__ == "__main__":
    sys.exit(main())
