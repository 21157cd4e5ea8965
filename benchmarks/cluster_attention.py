"""Cluster (variable-size block) attention kernel vs dense SDPA at the Wan 2.1 14B 720p shape (bf16, one GPU).

    python benchmarks/cluster_attention.py --json out.json              # < 2 minutes on an H100
    python benchmarks/cluster_attention.py --configs                    # also sweep tile configs (ragged, 25%)
    TRITON_INTERPRET=1 python benchmarks/cluster_attention.py --smoke   # CPU: tiny shape, Triton interpreter

Layouts: "ragged" has SVG2's cluster sizes (lognormal around L/300 query and L/1000 key tokens, summing to L,
different per head); "uniform128" has clusters of exactly 128 tokens (the best case: no ragged tiles). Each query
cluster keeps random distinct key clusters (sorted ascending) until they hold about 25% or 12% of the keys.
"fixed-block" runs the fixed-block kernel on the uniform128 layout (the same pairs, as 128-blocks).

Columns: pairs = computed query-key pairs / dense pairs; tile work = query-key slots the kernel's tiles cover
(padding of ragged tiles included) / pairs; ratio = effective throughput vs SDPA = SDPA ms * pairs / ms.
Medians of CUDA-event timings after warm-up, SDPA measured in the same run. Checks (kernel vs the torch
reference on one head; cluster kernel vs fixed-block kernel on the same pairs) run before timing; the exit
status is 1 if one fails.
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
from bench_timing import call_timer  # noqa: E402

# (B, H, L, D) and the mean query / key cluster sizes. Wan 2.1 14B, 720p, 81 frames, with SVG2's defaults of
# 300 query and 1000 key clusters; the smoke shape keeps clusters of a few interpreter tiles.
SHAPE = dict(B=1, H=40, L=75600, D=128, query_cluster=75600 / 300, key_cluster=75600 / 1000)
SMOKE_SHAPE = dict(B=1, H=2, L=600, D=64, query_cluster=50, key_cluster=15)
KEPT_FRACTIONS = (0.25, 0.12)
# Tile configs worth timing on a new GPU, (BLOCK_M, BLOCK_N, CHUNK, num_warps, num_stages) each: one launch, or
# two (the second's tiles take each query cluster's last rows when they fit; cluster_triton.query_tiles).
_KEYS = ("BLOCK_M", "BLOCK_N", "CHUNK", "num_warps", "num_stages")
SWEEP = [dict(zip(_KEYS, c)) for c in (
    (64, 64, 16, 4, 2), (64, 64, 16, 4, 3), (64, 64, 8, 4, 2), (64, 64, 32, 4, 2), (64, 32, 16, 4, 3),
    (64, 128, 16, 4, 2), (128, 64, 16, 8, 2), (128, 64, 16, 4, 2), (128, 32, 16, 4, 3), (128, 128, 16, 8, 2))] + [
    [dict(zip(_KEYS, first)), dict(zip(_KEYS, last))] for first, last in (
        ((128, 32, 16, 4, 3), (64, 64, 16, 4, 3)), ((128, 64, 16, 8, 2), (64, 64, 16, 4, 3)),
        ((128, 32, 16, 4, 3), (64, 32, 16, 4, 3)), ((128, 32, 32, 4, 3), (64, 64, 16, 4, 3)))]
CHECK_TOL = 1e-2


def config_name(config) -> str:
    """'128x32 c16 w4 s3' per launch (BLOCK_M x BLOCK_N, CHUNK, warps, stages), launches joined by ' + '."""
    launches = [config] if isinstance(config, dict) else config
    return " + ".join(f"{c['BLOCK_M']}x{c['BLOCK_N']} c{c['CHUNK']} w{c['num_warps']} s{c['num_stages']}"
                      for c in launches)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path, help="write every result here")
    p.add_argument("--configs", action="store_true", help="time every config of SWEEP on the ragged 25%% layout")
    p.add_argument("--sigma", type=float, default=0.5, help="lognormal sigma of the ragged cluster sizes")
    p.add_argument("--reps", type=int, default=7, help="timed runs per measurement (median)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="tiny shape on the CPU (Triton interpreter)")
    return p.parse_args()


# ----------------------------------------------------------------------------------------------- layouts


def ragged_offsets(torch, heads, length, mean_size, sigma, gen):
    """(1, heads, C + 1) offsets of C = round(length / mean_size) clusters with lognormal sizes summing to length."""
    count = max(1, round(length / mean_size))
    weights = torch.exp(sigma * torch.randn(heads, count, generator=gen, device=gen.device))
    sizes = torch.floor(weights / weights.sum(-1, keepdim=True) * length).long()
    short = length - sizes.sum(-1)                         # < count tokens: one more for the largest remainders
    order = (weights / weights.sum(-1, keepdim=True) * length - sizes).argsort(-1, descending=True)
    sizes.scatter_add_(-1, order, (torch.arange(count, device=gen.device) < short[:, None]).long())
    return torch.nn.functional.pad(sizes.cumsum(-1), (1, 0)).to(torch.int32)[None].contiguous()


def uniform_offsets(torch, heads, length, size, device):
    count = -(-length // size)
    offsets = (torch.arange(count + 1, device=device) * size).clamp(max=length)
    return offsets.to(torch.int32).expand(1, heads, count + 1).contiguous()


def kept_lists(torch, q_offsets, k_offsets, fraction, gen):
    """Per query cluster, random distinct key clusters (ascending) until they hold >= fraction of the keys."""
    _, heads, cq1 = q_offsets.shape
    k_sizes = (k_offsets[0, :, 1:] - k_offsets[0, :, :-1]).long()           # (H, CK)
    ck = k_sizes.shape[-1]
    order = torch.rand(heads, cq1 - 1, ck, generator=gen, device=gen.device).argsort(-1)
    held = torch.gather(k_sizes[:, None].expand(-1, cq1 - 1, -1), 2, order).cumsum(-1)
    target = fraction * k_offsets[0, :, -1:, None]
    counts = ((held < target).sum(-1) + 1).clamp(max=ck)                     # (H, CQ)
    width = int(counts.max())
    slot = torch.arange(width, device=gen.device)
    ids = torch.where(slot < counts[..., None], order[..., :width], ck)      # unused slots sort last
    ids = ids.sort(-1).values.clamp(max=ck - 1)
    return ids.to(torch.int32)[None].contiguous(), counts.to(torch.int32)[None].contiguous()


def tile_work(torch, KT, q_offsets, k_offsets, ids, counts, launches):
    """Query-key slots the kernel's tiles cover: per launch, its query tiles per cluster (the kernel's own tile
    tables) x BLOCK_M rows x, per chunk of CHUNK kept key clusters, the chunk's tokens rounded up to BLOCK_N."""
    k_sizes = (k_offsets[..., 1:] - k_offsets[..., :-1]).long()
    used = torch.arange(ids.shape[-1], device=ids.device) < counts[..., None]
    kept = torch.where(used, torch.gather(k_sizes, 2, ids.long().flatten(2)).view(ids.shape), 0)
    last_block_m = launches[1]["BLOCK_M"] if len(launches) > 1 else None
    tables = KT.query_tiles(q_offsets, launches[0]["BLOCK_M"], int(q_offsets[..., -1].max()), last_block_m)
    work = 0
    for cfg, (cluster, _, _) in zip(launches, tables):
        chunk, bn = cfg["CHUNK"], cfg["BLOCK_N"]
        padded = torch.nn.functional.pad(kept, (0, -kept.shape[-1] % chunk))
        per_chunk = padded.view(*padded.shape[:-1], -1, chunk).sum(-1)
        key_slots = ((per_chunk + bn - 1) // bn * bn).sum(-1)                         # (B, H, CQ)
        tiles = torch.zeros_like(key_slots).scatter_add_(-1, cluster.long().clamp(min=0), (cluster >= 0).long())
        work += int((tiles * cfg["BLOCK_M"] * key_slots).sum())
    return work


# ------------------------------------------------------------------------------------------------ timing


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


# -------------------------------------------------------------------------------------------------- main


def main():
    args = parse_args()
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
        args.reps = 1
    import torch
    import triton
    from pack import import_pack

    K = import_pack("kernels")
    KT = import_pack("kernels.cluster_triton")
    fixed = import_pack("kernels.block_sparse_triton")
    device = torch.device("cpu" if args.smoke else "cuda")
    shape = SMOKE_SHAPE if args.smoke else SHAPE
    B, H, L, D = shape["B"], shape["H"], shape["L"], shape["D"]
    scale = 1.0 / math.sqrt(D)
    timer = lambda fn: call_timer(fn, runs=args.reps, cuda=not args.smoke, warm=2)  # noqa: E731
    gen = torch.Generator(device=device).manual_seed(args.seed)
    meta = dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (interpreter)",
                torch=torch.__version__, triton=triton.__version__, shape=shape, dtype="bfloat16",
                date=datetime.datetime.now().isoformat(timespec="seconds"), sigma=args.sigma, reps=args.reps)
    print(f"{meta['device']} | torch {meta['torch']} | triton {meta['triton']} | {meta['date']}", flush=True)
    print(f"B={B} H={H} L={L} D={D} bf16", flush=True)

    q, k, v = (torch.randn(B, H, L, D, generator=gen, device=device).to(torch.bfloat16) for _ in range(3))
    out = torch.empty_like(q)
    sdpa_ms = timer(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
    print(f"SDPA dense: {sdpa_ms:.2f} ms", flush=True)

    layouts = {
        "ragged": (ragged_offsets(torch, H, L, shape["query_cluster"], args.sigma, gen),
                   ragged_offsets(torch, H, L, shape["key_cluster"], args.sigma, gen)),
        "uniform128": (uniform_offsets(torch, H, L, 128, device), uniform_offsets(torch, H, L, 128, device)),
    }

    def cluster_launch(clusters, config=None):
        # The launcher, not the public API: validation reads values back (GPU syncs), no part of the kernel's
        # cost. The tile table is built inside, as on every real call.
        return KT.triton_cluster_attention(q, k, v, *clusters, scale=scale, out=out, config=config)

    rows, checks, sweep = [], [], []
    for name, (q_off, k_off) in layouts.items():
        for fraction in KEPT_FRACTIONS:
            clusters = (q_off, k_off, *kept_lists(torch, q_off, k_off, fraction, gen))
            pairs = int(K.cluster_pair_count(*clusters).sum())
            pair_fraction = pairs / (B * H * L * L)
            cfg = KT.tile_config(D, device)
            entry = dict(layout=name, kernel="cluster", target=fraction, pairs=pair_fraction,
                         tile_work=tile_work(torch, KT, *clusters, cfg) / pairs, config=cfg,
                         query_clusters=q_off.shape[-1] - 1, key_clusters=k_off.shape[-1] - 1)
            if name == "ragged" and fraction == KEPT_FRACTIONS[0]:
                got = cluster_launch(clusters)[:, :1].clone()
                want = K.cluster_block_attention(q[:, :1], k[:, :1], v[:, :1], *(t[:, :1] for t in clusters),
                                                 backend="reference")
                checks.append(dict(name=f"{name} {fraction:.0%} vs reference (head 0)", rel_err=rel_err(got, want)))
                if args.configs:
                    sweep = sweep_configs(torch, KT, cluster_launch, clusters, timer, got)
            entry["ms"] = timer(lambda: cluster_launch(clusters))
            rows.append(entry)
            print(f"  {name:10s} {fraction:4.0%}: {entry['ms']:8.2f} ms, config {config_name(cfg)}", flush=True)
            if name == "uniform128":
                idx, cnt = clusters[2], clusters[3]
                run_fixed = lambda: fixed.triton_block_sparse_attention(q, k, v, idx, cnt, block_size=128,  # noqa: E731
                                                                         scale=scale, out=out)
                fixed_out = run_fixed().clone()
                checks.append(dict(name=f"uniform128 {fraction:.0%}: cluster vs fixed-block kernel",
                                   rel_err=rel_err(cluster_launch(clusters), fixed_out)))
                rows.append(dict(entry, kernel="fixed-block", tile_work=None, config=None, ms=timer(run_fixed)))
                print(f"  fixed-block {fraction:4.0%}: {rows[-1]['ms']:8.2f} ms", flush=True)

    for r in rows:
        r.update(sdpa_ms=sdpa_ms, ratio=sdpa_ms * r["pairs"] / r["ms"], speedup=sdpa_ms / r["ms"])
    for c in checks:
        c["ok"] = c["rel_err"] < CHECK_TOL
    print_report(meta, sdpa_ms, rows, checks, sweep)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(dict(meta=meta, sdpa_ms=sdpa_ms, results=rows, checks=checks,
                                             sweep=sweep), indent=1))
        print(f"wrote {args.json}")
    return 0 if all(c["ok"] for c in checks) else 1


def sweep_configs(torch, KT, launch, clusters, timer, expected_head0):
    """Time every SWEEP config; a config whose head-0 output differs from the default's is marked wrong."""
    results = []
    for cfg in SWEEP:
        entry = dict(config=cfg)
        try:
            err = rel_err(launch(clusters, cfg)[:, :1], expected_head0)
            entry.update(rel_err=err, ms=timer(lambda: launch(clusters, cfg)) if err < CHECK_TOL else None)
        except Exception as exc:  # e.g. triton OutOfResources: too much shared memory for this tile
            entry.update(error=f"{type(exc).__name__}: {str(exc)[:120]}", ms=None)
        verdict = f"{entry['ms']:.2f} ms" if entry["ms"] is not None else entry.get("error", "WRONG output")
        print(f"  config {config_name(cfg)}: {verdict}", flush=True)
        results.append(entry)
    return results


def print_report(meta, sdpa_ms, rows, checks, sweep):
    print(f"\n{meta['device']} | torch {meta['torch']} | triton {meta['triton']} | SDPA dense {sdpa_ms:.2f} ms")
    for c in checks:
        print(f"check {c['name']}: rel err {c['rel_err']:.2e} {'ok' if c['ok'] else 'FAIL'}")
    timed = [s for s in sweep if s["ms"] is not None]
    if timed:
        best = min(timed, key=lambda s: s["ms"])
        print(f"best config {config_name(best['config'])}: {best['ms']:.2f} ms")
    header = f"{'layout':10s} {'kernel':11s} {'target':>6s} {'pairs':>6s} {'tile work':>9s} {'ms':>8s} " \
             f"{'ratio':>6s} {'speedup':>7s}"
    print("\n" + header + "\n" + "-" * len(header))
    for r in rows:
        work = "-" if r["tile_work"] is None else f"{r['tile_work']:.3f}"
        print(f"{r['layout']:10s} {r['kernel']:11s} {r['target']:6.2f} {r['pairs']:6.3f} {work:>9s} {r['ms']:8.2f} "
              f"{r['ratio']:6.2f} {r['speedup']:6.2f}x")


if __name__ == "__main__":
    sys.exit(main())
