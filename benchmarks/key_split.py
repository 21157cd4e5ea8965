"""Does splitting the keys in ranges pay where one head's K and V outgrow L2? (issue 17, HunyuanVideo length)

    python benchmarks/key_split.py [--shapes hunyuan-720p wan14b-720p] [--parts 1 2 3] [--json out.json]
    TRITON_INTERPRET=1 python benchmarks/key_split.py --smoke     # CPU: tiny shape, the code path and the check

At HunyuanVideo 720p (119,056 tokens, head_dim 128) one head's K and V are 61 MB, more than the H100 / H200's
50 MB L2. The block-sparse kernel's programs start in launch order but finish at different times, so the ones
running at once sit at every point of their (ascending) key lists, and the keys they read together span the
whole head: scattered layouts re-read key blocks from HBM (0.78-0.85 of SDPA's throughput there, 0.96 at Wan 14B
720p whose head is 39 MB). Splitting each row's key list at P - 1 key boundaries and launching the kernel once per
range (every head's range 1 first, then range 2, ...) bounds what runs at once to 1/P of a head; the P partial
outputs merge exactly through their LSEs: out = sum_p exp(lse_p - lse) out_p, lse = logsumexp_p lse_p. What that
costs: P launches, P partial outputs in the output dtype, one merge.

Per shape, layout (benchmarks/kernels.py's random and banded ones) and density: ms of the one-launch kernel and of
the P-range version (launches and merge, and the launches alone: what a kernel that resumes from the previous
range's output and LSE would cost), all against SDPA in the same run. A check compares each split output
with the one-launch output first; the exit status is 1 if one differs.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE))
from bench_timing import bench_timer, sibling_benchmark  # noqa: E402

CHECK_TOL = 2e-2  # the partials are rounded to bf16 before the merge


def split_lists(torch, idx, cnt, bounds):
    """Per key range [bounds[p], bounds[p + 1]) in key blocks: (indices, counts) of each row's entries in it. The
    lists are ascending, so a range's entries are one run of the row: they move to its front."""
    width = idx.shape[-1]
    pos = torch.arange(width, device=idx.device)
    valid = pos < cnt[..., None].long()
    parts = []
    for lo, hi in zip(bounds, bounds[1:]):
        before = ((idx < lo) & valid).sum(-1)
        inside = ((idx >= lo) & (idx < hi) & valid).sum(-1)
        shifted = torch.gather(idx, -1, (pos + before[..., None]).clamp(max=width - 1))
        parts.append((shifted.contiguous(), inside.to(torch.int32).contiguous()))
    return parts


def merge(torch, outs, lses):
    """Exact merge of partial attentions over disjoint key ranges (a range with no key has LSE -inf)."""
    lse = torch.logsumexp(torch.stack(lses), dim=0)
    total = torch.zeros_like(outs[0], dtype=torch.float32)
    for out, part_lse in zip(outs, lses):
        total += out.float() * torch.exp(part_lse - lse).unsqueeze(-1)
    return total.to(outs[0].dtype)


def parse_args():
    bench = sibling_benchmark("kernels")  # its shapes, layouts, device name
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", choices=list(bench.SHAPES), default=["hunyuan-720p", "wan14b-720p"])
    p.add_argument("--densities", nargs="+", type=float, default=[0.5, 0.25, 0.1])
    p.add_argument("--layouts", nargs="+", choices=["random", "banded"], default=["random", "banded"])
    p.add_argument("--parts", nargs="+", type=int, default=[1, 2, 3], help="key ranges per call (1: one launch)")
    p.add_argument("--json", type=Path)
    p.add_argument("--rep", type=float, default=300, help="do_bench repetition time, ms")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="tiny shape on the CPU (Triton interpreter)")
    return p.parse_args(), bench


def main():
    args, bench = parse_args()
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch
    import triton
    from pack import import_pack

    kernel = import_pack("kernels.block_sparse_triton")
    device = torch.device("cpu" if args.smoke else "cuda")
    shapes = {"smoke": (1, 2, 1000, 64)} if args.smoke else {n: bench.SHAPES[n] for n in args.shapes}
    bs = 64 if args.smoke else 128
    timer = bench_timer(args.smoke, 100, args.rep)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    meta = dict(device=bench.device_name(torch, device), torch=torch.__version__, triton=triton.__version__,
                date=datetime.datetime.now().isoformat(timespec="seconds"), block_size=bs, l2_mib=None)
    if device.type == "cuda":
        meta["l2_mib"] = torch.cuda.get_device_properties(device).L2_cache_size / 2**20
    print(f"{meta['device']} (L2 {meta['l2_mib']} MiB) | torch {meta['torch']} | triton {meta['triton']} | "
          f"{meta['date']}", flush=True)
    rows, failed = [], []
    for name, (B, H, L, D) in shapes.items():
        q, k, v = (torch.randn(B, H, L, D, generator=gen, device=device).to(torch.bfloat16) for _ in range(3))
        scale = 1.0 / math.sqrt(D)
        nb = triton.cdiv(L, bs)
        sdpa_ms = timer(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))

        def launches(parts_lists):
            return [kernel.triton_block_sparse_attention(q, k, v, i, c, block_size=bs, scale=scale, return_lse=True)
                    for i, c in parts_lists]

        def split_call(parts_lists):
            if len(parts_lists) == 1:
                return kernel.triton_block_sparse_attention(q, k, v, *parts_lists[0], block_size=bs, scale=scale)
            results = launches(parts_lists)
            return merge(torch, [o for o, _ in results], [lse for _, lse in results])

        for kind in args.layouts:
            for density in args.densities:
                idx, cnt = bench.build_layout(torch, kind, H, nb, density, gen)
                achieved = cnt.float().mean().item() / nb
                one = split_call([(idx, cnt)])
                for parts in args.parts:
                    bounds = [round(p * nb / parts) for p in range(parts + 1)]
                    lists = split_lists(torch, idx, cnt, bounds)
                    err = bench.rel_err(split_call(lists), one)
                    if err > CHECK_TOL:
                        failed.append(f"{name} {kind} {density} parts {parts}: rel err {err:.2e}")
                    ms = timer(lambda: split_call(lists))
                    launches_ms = timer(lambda: launches(lists)) if parts > 1 else ms
                    rows.append(dict(shape=name, layout=kind, density=achieved, parts=parts, ms=ms, sdpa_ms=sdpa_ms,
                                     launches_ms=launches_ms, tflops_ratio=sdpa_ms * achieved / ms,
                                     launches_ratio=sdpa_ms * achieved / launches_ms, rel_err=err))
                    print(f"  {name} {kind} {achieved:.3f} parts {parts}: {ms:.3f} ms ({sdpa_ms * achieved / ms:.2f}"
                          f" of SDPA per computed tile; launches alone {launches_ms:.3f} ms), err {err:.1e}",
                          flush=True)
        del q, k, v
    print(f"\n{'shape':14s} {'layout':7s} {'density':>7s} {'parts':>5s} {'ms':>9s} {'vs SDPA/tile':>12s} "
          f"{'launches ms':>11s} {'vs SDPA/tile':>12s}")
    for r in rows:
        print(f"{r['shape']:14s} {r['layout']:7s} {r['density']:7.2f} {r['parts']:5d} {r['ms']:9.3f} "
              f"{r['tflops_ratio']:12.2f} {r['launches_ms']:11.3f} {r['launches_ratio']:12.2f}")
    if args.json:
        args.json.write_text(json.dumps(dict(meta=meta, rows=rows, failed=failed), indent=1))
    for f in failed:
        print("FAILED", f)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
