"""Does starting each program's key list at its launch phase keep what runs at once in L2? (issue 17)

    python benchmarks/list_phase.py [--shapes hunyuan-720p wan14b-720p] [--waves 0 auto 1 2 3] [--json out.json]
    TRITON_INTERPRET=1 python benchmarks/list_phase.py --smoke     # CPU: tiny shape, the code path and the check

At HunyuanVideo 720p one head's K and V (61 MB) outgrow the 50 MB L2. Programs launch in order as earlier ones
finish, so with every list walked from its first entry the programs running at once sit at every point of their
lists and read keys from the whole head. With a phase wave W (the kernel's ``phase_wave``: the programs the GPU
holds at once), program p starts at fraction (p mod W) / W of its list and wraps around; programs then stay at
about the same fraction of their lists, which on scattered layouts is one window of key positions.

Per shape, layout (benchmarks/kernels.py's random and banded ones) and density: ms of the kernel at each wave,
against SDPA in the same run: ``0`` walks lists in order (the kernel before), ``auto`` the wave the kernel computes
from its occupancy (kernels.block_sparse_triton.resident_programs), an integer N: N x the GPU's SM count. Every
output is checked against wave 0's first; the exit status is 1 if one differs.
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

CHECK_TOL = 1e-2  # only the order of the online softmax differs


def parse_args():
    bench = sibling_benchmark("kernels")  # its shapes, layouts, device name
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", choices=list(bench.SHAPES), default=["hunyuan-720p", "wan14b-720p"])
    p.add_argument("--densities", nargs="+", type=float, default=[0.5, 0.25, 0.1])
    p.add_argument("--layouts", nargs="+", choices=["random", "banded"], default=["random", "banded"])
    p.add_argument("--waves", nargs="+", default=["0", "auto", "1", "2", "3"],
                   help="0 (lists in order), auto, or N: N x the SM count")
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
    sms = 4 if args.smoke else torch.cuda.get_device_properties(device).multi_processor_count
    timer = bench_timer(args.smoke, 100, args.rep)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    meta = dict(device=bench.device_name(torch, device), torch=torch.__version__, triton=triton.__version__,
                date=datetime.datetime.now().isoformat(timespec="seconds"), block_size=bs, sms=sms)
    print(f"{meta['device']} ({sms} SMs) | torch {meta['torch']} | triton {meta['triton']} | {meta['date']}",
          flush=True)
    rows, failed = [], []
    for name, (B, H, L, D) in shapes.items():
        q, k, v = (torch.randn(B, H, L, D, generator=gen, device=device).to(torch.bfloat16) for _ in range(3))
        scale = 1.0 / math.sqrt(D)
        nb = triton.cdiv(L, bs)
        sdpa_ms = timer(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
        base = kernel._tile_config(D, bs, device)

        def run(idx, cnt, wave):
            config = dict(base) if wave == "auto" else {**base, "phase_wave": int(wave) * sms}
            return kernel.triton_block_sparse_attention(q, k, v, idx, cnt, block_size=bs, scale=scale, config=config)

        for kind in args.layouts:
            for density in args.densities:
                idx, cnt = bench.build_layout(torch, kind, H, nb, density, gen)
                achieved = cnt.float().mean().item() / nb
                reference = run(idx, cnt, "0")
                for wave in args.waves:
                    err = bench.rel_err(run(idx, cnt, wave), reference)
                    if err > CHECK_TOL:
                        failed.append(f"{name} {kind} {density} wave {wave}: rel err {err:.2e}")
                    ms = timer(lambda: run(idx, cnt, wave))
                    programs = max(kernel._RESIDENT.values(), default=0) if wave == "auto" else int(wave) * sms
                    rows.append(dict(shape=name, layout=kind, density=achieved, wave=wave, programs=programs, ms=ms,
                                     sdpa_ms=sdpa_ms, tflops_ratio=sdpa_ms * achieved / ms, rel_err=err))
                    print(f"  {name} {kind} {achieved:.3f} wave {wave} ({programs} programs): {ms:.3f} ms "
                          f"({sdpa_ms * achieved / ms:.2f} of SDPA per computed tile), err {err:.1e}", flush=True)
        del q, k, v
    print(f"\n{'shape':14s} {'layout':7s} {'density':>7s} " + " ".join(f"{'wave ' + w:>9s}" for w in args.waves)
          + "   (throughput per computed tile / SDPA's)")
    for i in range(0, len(rows), len(args.waves)):
        r = rows[i]
        print(f"{r['shape']:14s} {r['layout']:7s} {r['density']:7.2f} "
              + " ".join(f"{x['tflops_ratio']:9.2f}" for x in rows[i:i + len(args.waves)]))
    if args.json:
        args.json.write_text(json.dumps(dict(meta=meta, resident=[[str(k), v] for k, v in kernel._RESIDENT.items()],
                                             rows=rows, failed=failed), indent=1))
    for f in failed:
        print("FAILED", f)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
