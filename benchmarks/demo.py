"""Demo: sparse attention methods on a video-shaped attention problem, against dense attention.

    python benchmarks/demo.py            # CPU: small problem, torch reference kernel
    python benchmarks/demo.py --gpu      # CUDA: Wan 2.1 1.3B 480p shape, Triton kernel

No model download: the inputs come from benchmarks/synthetic.py (moving objects on a smooth field, RoPE).
Prints per method: density, relative error against dense, attention recall, time and speedup.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from pack import import_pack  # noqa: E402
from synthetic import video_qkv  # noqa: E402

core = import_pack("core")
kernels = import_pack("kernels")
metrics = import_pack("core.metrics")

CPU_SHAPE = dict(frames=12, height=16, width=24, heads=4, head_dim=64)
GPU_SHAPE = dict(frames=21, height=30, width=52, heads=12, head_dim=128)  # Wan 2.1 1.3B, 480p, 81 frames


def timed(fn, device, repeats):
    """Median wall time in ms (CUDA-synchronised), after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def random_layout_like(mask, generator):
    """A layout with the same number of kept blocks per row, placed at random (diagonal kept)."""
    nb = mask.shape[-1]
    scores = torch.rand(mask.shape, generator=generator) + torch.eye(nb) * 2
    keep = mask.sum(-1, keepdim=True)
    ranks = scores.argsort(-1, descending=True).argsort(-1)
    return ranks < keep


def run(args):
    device = torch.device("cuda" if args.gpu else "cpu")
    shape = dict(GPU_SHAPE if args.gpu else CPU_SHAPE)
    for key in shape:
        if getattr(args, key) is not None:
            shape[key] = getattr(args, key)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    grid = core.VideoGrid(shape["frames"], shape["height"], shape["width"])
    q, k, v = video_qkv(**shape, seed=args.seed, device=device, dtype=dtype)
    block = args.block_size
    print(f"video grid {grid.frames}x{grid.height}x{grid.width} = {grid.total_tokens} tokens, {shape['heads']} heads "
          f"x {shape['head_dim']}, {dtype}, {device}, block {block}")

    dense_out = F.scaled_dot_product_attention(q, k, v)
    mass = metrics.block_attention_mass(q, k, block)
    dense_ms = timed(lambda: F.scaled_dot_product_attention(q, k, v), device, args.repeats)

    radial = core.radial_block_mask(grid, core.RadialSettings(decay_factor=args.decay_factor, block_size=block))
    layouts = {
        "radial": radial,
        "random (same density)": random_layout_like(radial, torch.Generator().manual_seed(args.seed)),
    }
    rows = [("dense (SDPA)", 1.0, 0.0, 1.0, dense_ms)]
    for name, mask in layouts.items():
        idx, cnt = kernels.block_mask_to_indices(mask.to(device)[None, None])
        run_layout = lambda: kernels.block_sparse_attention(q, k, v, idx, cnt, block_size=block)  # noqa: E731
        out = run_layout()
        rows.append((name, float(mask.float().mean()), metrics.relative_error(out, dense_out),
                     metrics.attention_recall(mass, mask.to(device)), timed(run_layout, device, args.repeats)))

    backend = kernels.resolve_backend("auto", device, dtype)
    print(f"sparse kernel backend: {backend}" + ("" if backend == "triton" else
          " (the torch reference: correct but not fast; run with --gpu on an NVIDIA GPU for speed)"))
    print(f"\n{'method':<24}{'density':>9}{'rel. error':>12}{'recall':>9}{'time ms':>10}{'speedup':>9}")
    for name, density, error, recall, ms in rows:
        print(f"{name:<24}{density:>9.3f}{error:>12.4f}{recall:>9.3f}{ms:>10.2f}{dense_ms / ms:>8.2f}x")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true", help="run on CUDA with the Triton kernel")
    for key in CPU_SHAPE:
        parser.add_argument(f"--{key.replace('_', '-')}", dest=key, type=int, default=None)
    parser.add_argument("--block-size", type=int, default=128, choices=(64, 128))
    parser.add_argument("--decay-factor", type=float, default=0.2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.gpu and not torch.cuda.is_available():
        parser.error("--gpu needs a CUDA device; run without it on the CPU")
    run(args)


if __name__ == "__main__":
    main()
