"""Demo: sparse attention methods on a video-shaped attention problem, against dense attention.

    python benchmarks/demo.py            # CPU: small problem, torch reference kernel
    python benchmarks/demo.py --gpu      # CUDA: Wan 2.1 1.3B 480p shape, Triton kernel
    python benchmarks/demo.py --proxy [--gpu]   # the trained proxy video model, dense against sparse

No model download: the inputs come from benchmarks/synthetic.py (moving objects on a smooth field, RoPE).
Prints per method: density, relative error against dense, attention recall, time and speedup, and the recall on
each kind of head (benchmarks/head_kind_inputs.py: one more call whose heads are one of each kind).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from pack import import_pack  # noqa: E402
from bench_timing import call_timer  # noqa: E402
from synthetic import video_qkv  # noqa: E402
from head_kind_inputs import KINDS, head_kind_qkv  # noqa: E402

core = import_pack("core")
kernels = import_pack("kernels")
metrics = import_pack("core.metrics")

# Calls are made as steps 39 and 40 of a 50-step run (no AdaSpa search step): the first builds the method's state
# (k-means, search, profile), the measured and timed ones are what a later step costs (warm-started k-means, reused
# pattern).
RUN_STEPS, LATER_STEP = 50, 40
CPU_SHAPE = dict(frames=12, height=16, width=24, heads=4, head_dim=64)
GPU_SHAPE = dict(frames=21, height=30, width=52, heads=12, head_dim=128)  # Wan 2.1 1.3B, 480p, 81 frames


def random_layout_like(mask, generator):
    """A layout with the same number of kept blocks per row, placed at random (diagonal kept)."""
    nb = mask.shape[-1]
    scores = torch.rand(mask.shape, generator=generator) + torch.eye(nb) * 2
    keep = mask.sum(-1, keepdim=True)
    ranks = scores.argsort(-1, descending=True).argsort(-1)
    return ranks < keep


def demo_methods(args, block):
    """(name, settings) of every method the demo compares, at their reference settings (about a quarter of the
    attention work or less)."""
    return [("radial", core.RadialSettings(decay_factor=args.decay_factor, block_size=block)),
            ("svg", core.SVGSettings(sparsity=0.25, block_size=block)),
            ("svg2", core.SVG2_PRESETS["wan_720p"]),
            ("adaspa", core.AdaSpaSettings(block_size=block))]


def run_method(settings, grid, q, k, v, backend):
    """Two attention calls through the method's planner, as the patched model makes them on consecutive steps: the
    first builds the method's state (k-means, search, head profile), the second is a later step, whose output,
    density and LSE are returned with the planner."""
    planner = settings.make_planner()
    planner.attend(core.AttentionCall(grid=grid, layer=1, step=LATER_STEP - 1, total_steps=RUN_STEPS, q=q, k=k, v=v,
                                      backend=backend))
    call = core.AttentionCall(grid=grid, layer=1, step=LATER_STEP, total_steps=RUN_STEPS, q=q, k=k, v=v,
                              backend=backend, want_lse=True)
    out, density = planner.attend(call)
    return planner, out, density, call.lse


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
    backend = kernels.resolve_backend("auto", device, dtype)
    print(f"video grid {grid.frames}x{grid.height}x{grid.width} = {grid.total_tokens} tokens, {shape['heads']} heads "
          f"x {shape['head_dim']}, {dtype}, {device}, block {block}")

    dense_out = F.scaled_dot_product_attention(q, k, v)
    dense_lse = metrics.dense_lse(q, k)
    on_gpu = device.type == "cuda"
    dense_ms = call_timer(lambda: F.scaled_dot_product_attention(q, k, v), runs=args.repeats, cuda=on_gpu)
    # One head of each kind in one call: the recall each method keeps on each kind of head.
    mixed = head_kind_qkv(KINDS, shape["frames"], shape["height"], shape["width"], shape["head_dim"], seed=args.seed,
                          device=device, dtype=dtype)
    mixed_lse = metrics.dense_lse(*mixed[:2])

    def per_kind(lse):
        return metrics.recall_from_lse(lse, mixed_lse).mean(dim=(0, 2)).tolist()

    rows = [("dense (SDPA)", 1.0, 0.0, 1.0, dense_ms, [1.0] * len(KINDS))]
    for name, settings in demo_methods(args, block):
        planner, out, density, lse = run_method(settings, grid, q, k, v, backend)
        kinds = per_kind(run_method(settings, grid, *mixed, backend)[3])
        recall = float(metrics.recall_from_lse(lse, dense_lse).mean())
        call = core.AttentionCall(grid=grid, layer=1, step=LATER_STEP, total_steps=RUN_STEPS, q=q, k=k, v=v,
                                  backend=backend)
        ms = call_timer(lambda: planner.attend(call), runs=args.repeats, cuda=on_gpu)  # a later step: state reused
        rows.append((name, density, metrics.relative_error(out, dense_out), recall, ms, kinds))
        if name == "radial":  # the same number of tiles per row, placed at random: what the structure buys
            mask = planner.block_mask(grid)
            rand = random_layout_like(mask, torch.Generator().manual_seed(args.seed))
            idx, cnt = kernels.block_mask_to_indices(rand.to(device)[None, None])
            run_layout = lambda: kernels.block_sparse_attention(q, k, v, idx, cnt, block_size=block,  # noqa: E731
                                                                return_lse=True)
            out, lse = run_layout()
            mixed_layout = kernels.block_sparse_attention(*mixed, idx, cnt, block_size=block, return_lse=True)
            rows.append(("random (same density)", float(rand.float().mean()), metrics.relative_error(out, dense_out),
                         float(metrics.recall_from_lse(lse, dense_lse).mean()),
                         call_timer(run_layout, runs=args.repeats, cuda=on_gpu), per_kind(mixed_layout[1])))

    print(f"sparse kernel backend: {backend}" + ("" if backend == "triton" else
          " (the torch reference: correct but not fast; run with --gpu on an NVIDIA GPU for speed)"))
    print("recall per head kind: one call of the same grid whose heads are one of each kind (head_kind_inputs.py)")
    print(f"\n{'method':<24}{'density':>9}{'rel. error':>12}{'recall':>9}{'time ms':>10}{'speedup':>9}  "
          + "".join(f"{kind:>10}" for kind in KINDS))
    for name, density, error, recall, ms, kinds in rows:
        print(f"{name:<24}{density:>9.3f}{error:>12.4f}{recall:>9.3f}{ms:>10.2f}{dense_ms / ms:>8.2f}x  "
              + "".join(f"{r:>10.3f}" for r in kinds))


def run_proxy(args):
    """Sample the trained proxy model (ComfyUI's WanModel) dense and sparse; picture, speed and PSNR."""
    import proxy_model
    from quality import picture

    proxy_model.use_comfyui(args.comfyui)
    nodes, bridge = import_pack("nodes"), import_pack("nodes.bridge")
    device = torch.device("cuda" if args.gpu else "cpu")
    # On the CPU a smaller video keeps the demo to a minute; the sparse path there is the (slow) torch reference.
    frames, size, steps = (proxy_model.FRAMES, proxy_model.SIZE, 20) if args.gpu else (8, 32, 8)
    proxy = proxy_model.load(args.weights, device=device, dtype=proxy_model.inference_dtype(device))
    method = dict(demo_methods(args, args.block_size))[args.method]
    patched = nodes.SparseAttentionPatch().patch(proxy.model, dense_steps=0.2, sparse_end=1.0, dense_layers=1,
                                                 backend="auto" if args.gpu else "reference", verbose=False,
                                                 method=method)[0]
    videos, seconds = [], []
    for model in (proxy.model, patched):
        proxy_model.sample(proxy, model, proxy_model.PROCEDURAL_CLASS, args.seed, steps=2, frames=frames, size=size)
        start = time.perf_counter()
        videos.append(proxy_model.sample(proxy, model, proxy_model.PROCEDURAL_CLASS, args.seed, steps=steps,
                                         frames=frames, size=size))
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    density = bridge.session_of(patched).stats.sparse_density
    score = metrics.psnr(videos[1], videos[0])
    picture([("dense", videos[0]), (f"{args.method}\ndensity {density:.2f}\nPSNR {score:.1f} dB", videos[1])], args.picture)
    print(f"proxy model: {frames} frames of {size}x{size}, {steps} steps, {device}")
    print(f"dense  {seconds[0]:.2f} s   {args.method} (density {density:.3f})  {seconds[1]:.2f} s  "
          f"({seconds[0] / seconds[1]:.2f}x)   PSNR {score:.2f} dB against dense   picture: {args.picture}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true", help="run on CUDA with the Triton kernel")
    for key in CPU_SHAPE:
        parser.add_argument(f"--{key.replace('_', '-')}", dest=key, type=int, default=None)
    parser.add_argument("--block-size", type=int, default=128, choices=(64, 128))
    parser.add_argument("--decay-factor", type=float, default=0.2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--proxy", action="store_true",
                        help="sample the trained proxy video model dense and sparse (needs a ComfyUI source tree)")
    parser.add_argument("--comfyui", default=None, help="with --proxy: ComfyUI folder (else $COMFYUI_PATH, "
                                                        "~/comfy/ComfyUI)")
    parser.add_argument("--weights", default=None, help="with --proxy: the proxy weights (default: the shipped ones)")
    parser.add_argument("--method", default="radial", choices=["radial", "svg", "svg2", "adaspa"],
                        help="with --proxy: the sparse method")
    parser.add_argument("--picture", default="proxy_dense_vs_sparse.png", help="with --proxy: where the picture goes")
    args = parser.parse_args(argv)
    if args.gpu and not torch.cuda.is_available():
        parser.error("--gpu needs a CUDA device; run without it on the CPU")
    if args.proxy:
        import proxy_model
        args.weights = args.weights or str(proxy_model.WEIGHTS)
        run_proxy(args)
    else:
        run(args)


if __name__ == "__main__":
    main()
