"""Ulysses sequence parallelism around the sparse attention: one GPU against P GPUs, at the Wan 2.1 14B 720p shape.

    torchrun --nproc_per_node 2 benchmarks/sequence_parallel.py --json out/sp2.json   # and 4, 8 where lent
    TRITON_INTERPRET=1 torchrun --nproc_per_node 2 benchmarks/sequence_parallel.py --smoke   # CPU, gloo, tiny

Inputs are video-shaped (benchmarks/synthetic.py): B=1, H=40, 21 x 45 x 80 = 75,600 tokens, head_dim 128, bf16.
Every rank holds its contiguous 1/P of the tokens (padded to a multiple of P, as raylight shards them). Timed, the
slowest rank's median per call: one attention call on one GPU (rank 0 alone, the other ranks waiting), sparse
(Radial, Wan's settings, the Triton kernel through the session's planner) and dense (torch SDPA); the same call on P
GPUs through core.sequence_parallel (the two all-to-alls around the sparse planner, or around SDPA on the rank's
heads), and the two all-to-alls alone. Scaling = one-GPU ms / P-GPU ms against the target 0.9 x P. The sharded sparse
output is checked against the one-GPU sparse output on every rank first; the exit status is 1 if it differs.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

TARGET = 0.9  # of P: the target for Ulysses
CHECK_TOL = 2e-2  # relative; bf16 outputs of the same kernel on the same heads


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grid", type=int, nargs=3, default=[21, 45, 80], metavar=("FRAMES", "HEIGHT", "WIDTH"))
    p.add_argument("--heads", type=int, default=40)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--decay-factor", type=float, default=0.2, help="Radial, the Wan reference setting")
    p.add_argument("--runs", type=int, default=10, help="timed calls per measurement (the median is reported)")
    p.add_argument("--json", type=Path, help="write every result here (rank 0)")
    p.add_argument("--smoke", action="store_true", help="tiny shape on the CPU with gloo (Triton interpreter)")
    return p.parse_args()


def timed(torch, dist, fn, runs: int, cuda: bool, alone: bool = False) -> float:
    """Median ms of ``fn`` over ``runs`` calls, every rank starting together; the slowest rank's (``alone``: rank 0
    runs it, the others wait)."""
    times = []
    for i in range(runs + 1):  # the first call warms up (Triton compiles, NCCL connects)
        dist.barrier()
        if alone and dist.get_rank() != 0:
            continue
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        if i:
            times.append((time.perf_counter() - t0) * 1e3)
    dist.barrier()
    mine = torch.tensor([statistics.median(times) if times else 0.0], dtype=torch.float64,
                        device="cuda" if cuda else "cpu")
    dist.all_reduce(mine, op=dist.ReduceOp.MAX)
    return float(mine.item())


def main():
    args = parse_args()
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
        args.grid, args.heads, args.head_dim, args.runs = [4, 8, 8], 4, 32, 2
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    from pack import import_pack
    from synthetic import video_qkv

    core = import_pack("core")
    sequence_parallel = import_pack("core.sequence_parallel")
    cuda = not args.smoke
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=10))
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    grid = core.VideoGrid(*args.grid)
    settings = {"method": "radial", "method_settings": {"decay_factor": args.decay_factor, "block_size": 128},
                "dense_steps": 0, "dense_layers": 0, "backend": "auto" if cuda else "reference"}
    one = sequence_parallel.session_from_settings(settings)
    sharded = sequence_parallel.session_from_settings(settings)
    sp = sharded.sequence_parallel
    sp.heads_per_rank(args.heads)  # a clear error before any work when P does not divide the heads
    ctx = core.ForwardContext(video=grid, step=10, total_steps=50)

    q, k, v = video_qkv(*args.grid, heads=args.heads, head_dim=args.head_dim, device=device, dtype=dtype)
    L = grid.total_tokens
    size = math.ceil(L / world)
    q_s, k_s, v_s = (F.pad(t, (0, 0, 0, size * world - L))[:, :, rank * size:(rank + 1) * size].contiguous()
                     for t in (q, k, v))

    want, _ = one.attend(ctx, 0, q, k, v)
    got, density = sequence_parallel.ulysses_attend(sharded, sp, ctx, 0, q_s, k_s, v_s)
    mine = min(size, L - rank * size)
    expected = want[:, :, rank * size:rank * size + mine].float()
    error = torch.tensor([float((got[:, :, :mine].float() - expected).norm() / expected.norm())], device=device)
    dist.all_reduce(error, op=dist.ReduceOp.MAX)
    error = float(error.item())

    def dense_heads(q, k, v, head_offset):
        return F.scaled_dot_product_attention(q, k, v)

    ms = {
        "one_gpu_sparse": timed(torch, dist, lambda: one.attend(ctx, 0, q, k, v), args.runs, cuda, alone=True),
        "one_gpu_dense": timed(torch, dist, lambda: F.scaled_dot_product_attention(q, k, v), args.runs, cuda,
                               alone=True),
        "ulysses_sparse": timed(torch, dist, lambda: sequence_parallel.ulysses_attend(sharded, sp, ctx, 0, q_s, k_s,
                                                                                       v_s), args.runs, cuda),
        "ulysses_dense": timed(torch, dist, lambda: sequence_parallel.ulysses_attention(sp, q_s, k_s, v_s, L,
                                                                                         dense_heads), args.runs, cuda),
        "all_to_alls": timed(torch, dist, lambda: sp.heads_to_seq(sp.seq_to_heads(torch.cat((q_s, k_s, v_s)))
                                                                  [:q_s.shape[0]]), args.runs, cuda),
    }
    rows = [(path, ms[f"one_gpu_{path}"], ms[f"ulysses_{path}"]) for path in ("sparse", "dense")]
    result = dict(
        world=world, device=torch.cuda.get_device_name() if cuda else "cpu", torch=torch.__version__,
        shape=dict(batch=1, heads=args.heads, tokens=L, head_dim=args.head_dim, dtype=str(dtype), grid=args.grid),
        method=settings, density_rank0=density, check_rel_err=error, check_ok=error < CHECK_TOL, ms=ms,
        scaling={path: dict(speedup=a / b, target=TARGET * world, met=a / b >= TARGET * world) for path, a, b in rows},
        sparse_over_dense_one_gpu=ms["one_gpu_dense"] / ms["one_gpu_sparse"],
        sparse_over_dense_ulysses=ms["ulysses_dense"] / ms["ulysses_sparse"],
    )
    if rank == 0:
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(result, indent=1))
            print(f"wrote {args.json}")
        verdict = "ok" if error < CHECK_TOL else "FAIL"
        print(f"check: sharded sparse vs one-GPU sparse, max rel err {error:.2e} ({verdict})")
        print(f"all-to-alls alone (q, k, v there, one tensor back): {ms['all_to_alls']:.2f} ms")
        print(f"{'path':<8}{'1 GPU ms':>11}{f'{world} GPUs ms':>13}{'speed-up':>10}{'target':>8}  met")
        for path, a, b in rows:
            s = result["scaling"][path]
            met = "yes" if s["met"] else "no"
            print(f"{path:<8}{a:>11.2f}{b:>13.2f}{s['speedup']:>10.2f}{s['target']:>8.1f}  {met}")
    dist.destroy_process_group()
    return 0 if error < CHECK_TOL else 1


if __name__ == "__main__":
    sys.exit(main())
