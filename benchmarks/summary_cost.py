"""What SVG2's compensation costs, per-group against summarised (kernels/skipped_summary.py), at the Wan 14B 720p shape.

    python benchmarks/summary_cost.py [--own-terms 16 64] [--json out.json]
    TRITON_INTERPRET=1 python benchmarks/summary_cost.py --smoke   # CPU: tiny shape, Triton interpreter

Cluster attention on SVG2's ragged cluster sizes (benchmarks/cluster_attention.py's layouts: 300 query and 1,000 key
clusters, random kept lists holding 25% and 12% of the keys, tokens in their own order through random cluster
orders, as SVG2 calls it). Timed, each a whole call as the planner makes it: the plain call; per-group compensation
(pooling + the kernel with a term per skipped cluster); summarised compensation at each --own-terms (pooling, the
summary, the kernel); and the summary alone. The issue's target: a compensated call at most 1.05x the plain one.
Checks before timing (head 0 against the torch reference, both compensations); the exit status is 1 if one fails.
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
from bench_timing import call_timer, sibling_benchmark  # noqa: E402

CHECK_TOL = 1e-2
TARGET = 1.05


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--own-terms", type=int, nargs="+", default=[16, 64])
    p.add_argument("--fractions", type=float, nargs="+", default=[0.25, 0.12])
    p.add_argument("--reps", type=int, default=7, help="timed calls per measurement (median)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path)
    p.add_argument("--smoke", action="store_true", help="tiny shape on the CPU (Triton interpreter)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
        args.reps = 1
    import torch
    import triton
    from pack import import_pack

    clusters_bench = sibling_benchmark("cluster_attention")
    K = import_pack("kernels")
    summary_module = import_pack("kernels.skipped_summary")
    device = torch.device("cpu" if args.smoke else "cuda")
    shape = clusters_bench.SMOKE_SHAPE if args.smoke else clusters_bench.SHAPE
    B, H, L, D = shape["B"], shape["H"], shape["L"], shape["D"]
    scale = 1.0 / math.sqrt(D)
    timer = lambda fn: call_timer(fn, runs=args.reps, cuda=not args.smoke, warm=0 if args.smoke else 2)  # noqa: E731
    gen = torch.Generator(device=device).manual_seed(args.seed)
    meta = dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (interpreter)",
                torch=torch.__version__, triton=triton.__version__, shape=shape, dtype="bfloat16",
                date=datetime.datetime.now().isoformat(timespec="seconds"), reps=args.reps)
    print(f"{meta['device']} | torch {meta['torch']} | triton {meta['triton']} | {meta['date']}", flush=True)

    q, k, v = (torch.randn(B, H, L, D, generator=gen, device=device).to(torch.bfloat16) for _ in range(3))
    out = torch.empty_like(q)
    orders = [torch.stack([torch.randperm(L, generator=gen, device=device) for _ in range(B * H)]).view(B, H, L)
              .to(torch.int32) for _ in range(2)]
    q_off = clusters_bench.ragged_offsets(torch, H, L, shape["query_cluster"], 0.5, gen)
    k_off = clusters_bench.ragged_offsets(torch, H, L, shape["key_cluster"], 0.5, gen)
    rows, checks = [], []
    for fraction in args.fractions:
        layout = (q_off, k_off, *clusters_bench.kept_lists(torch, q_off, k_off, fraction, gen))
        pairs = int(K.cluster_pair_count(*layout).sum()) / (B * H * L * L)

        def call(own_terms=None, compensate=True, heads=slice(None), backend="triton", into=out):
            part = lambda t: t[:, heads]  # noqa: E731
            qh, kh, vh = map(part, (q, k, v))
            pooled = K.pool_key_clusters(kh, vh, part(k_off), backend=backend, k_order=part(orders[1])) \
                if compensate else None
            return K.cluster_block_attention(qh, kh, vh, *map(part, layout), out=into if into is None else part(into),
                                             backend=backend, check_layout=False, pooled=pooled, own_terms=own_terms,
                                             q_order=part(orders[0]), k_order=part(orders[1]))

        for own_terms in (None, *args.own_terms):
            got = call(own_terms, heads=slice(0, 1), into=None)
            want = call(own_terms, heads=slice(0, 1), backend="reference", into=None)
            err = ((got.float() - want.float()).norm() / want.float().norm()).item()
            checks.append(dict(name=f"{fraction:.0%} own terms {own_terms or 'all'} vs reference (head 0)",
                               rel_err=err))

        plain = timer(lambda: call(compensate=False))
        row = dict(fraction=fraction, pairs=pairs, plain_ms=plain, per_group_ms=timer(call))
        pooled = K.pool_key_clusters(k, v, k_off, backend="triton", k_order=orders[1])
        for own_terms in args.own_terms:
            row[f"summarised_{own_terms}_ms"] = timer(lambda: call(own_terms))
            row[f"summary_{own_terms}_ms"] = timer(lambda: summary_module.summarise_skipped(
                q, pooled, q_off, *layout[2:], scale=scale, own_terms=own_terms, q_order=orders[0], backend="triton"))
        rows.append(row)
        print(f"  kept {fraction:.0%} (pairs {pairs:.3f}): plain {plain:.2f} ms, per-group "
              f"{row['per_group_ms']:.2f} ({row['per_group_ms'] / plain:.3f}x)"
              + "".join(f", own {m}: {row[f'summarised_{m}_ms']:.2f} ({row[f'summarised_{m}_ms'] / plain:.3f}x; "
                        f"summary {row[f'summary_{m}_ms']:.2f})" for m in args.own_terms), flush=True)

    failed = [c for c in checks if not c["rel_err"] < CHECK_TOL]
    for c in checks:
        print(f"check {c['name']}: rel err {c['rel_err']:.2e} {'ok' if c['rel_err'] < CHECK_TOL else 'FAILED'}")
    print(f"\n{meta['device']}, B={B} H={H} L={L} D={D} bf16, medians of {args.reps} calls; target <= {TARGET}x plain")
    print(f"{'kept':>5s} {'pairs':>6s} {'plain ms':>9s} {'per-group':>10s} "
          + " ".join(f"{'own ' + str(m):>10s}" for m in args.own_terms))
    for r in rows:
        print(f"{r['fraction']:5.0%} {r['pairs']:6.3f} {r['plain_ms']:9.2f} {r['per_group_ms'] / r['plain_ms']:9.3f}x "
              + " ".join(f"{r[f'summarised_{m}_ms'] / r['plain_ms']:9.3f}x" for m in args.own_terms))
    if args.json:
        args.json.write_text(json.dumps(dict(meta=meta, rows=rows, checks=checks), indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
