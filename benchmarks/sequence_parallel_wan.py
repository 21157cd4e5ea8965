"""One denoising step of ComfyUI's WanModel 14B at 720p on P GPUs (Ulysses, raylight-style workers) against one GPU.

    torchrun --nproc_per_node 2 benchmarks/sequence_parallel_wan.py --comfyui PATH --json out/sp_wan2.json
    TRITON_INTERPRET=1 torchrun --nproc_per_node 2 benchmarks/sequence_parallel_wan.py --comfyui PATH --smoke  # CPU

Every rank builds ComfyUI's WanModel as detection configures it for Wan 2.1 14B (random bf16 weights; benchmarks/
e2e.py), 81 frames at 1280 x 720 (21 x 45 x 80 = 75,600 tokens), and patches its own copy with
nodes.sequence_parallel.patch_worker_model (Radial at the workflow's settings). Timed, the fastest step after the
first of one sampling run (cfg 1): on one GPU (rank 0 alone, the others waiting) the unpatched model (dense) and the
patched one (Radial); on P GPUs the model with its tokens sharded as raylight's forward shards them
(tests/sharded_wan.py), the patch doing the all-to-alls, Radial and dense (every step dense). Scaling = one-GPU
step / P-GPU step against 0.9 x P.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

TARGET = 0.9


def step_seconds(model, latent, cond, steps: int, cuda: bool) -> float:
    """The fastest step after the first of one sampling run (cfg 1: one model call per step)."""
    import comfy.sample

    marks = []

    def mark(*_):
        if cuda:
            torch.cuda.synchronize()
        marks.append(time.perf_counter())

    mark()
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(0))
    comfy.sample.sample(model, noise, steps, 1.0, "euler", "simple", cond, cond, latent, seed=0, callback=mark,
                        disable_pbar=True)
    return min(b - a for a, b in list(zip(marks, marks[1:]))[1:])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH", str(Path.home() / "comfy/ComfyUI")))
    p.add_argument("--steps", type=int, default=3, help="steps per run; the first runs dense and is not counted")
    p.add_argument("--json", type=Path)
    p.add_argument("--smoke", action="store_true", help="ComfyUI's tiny test Wan on the CPU with gloo")
    args = p.parse_args()
    cuda = not args.smoke
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))  # before ComfyUI picks its device
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=30))
    rank, world = dist.get_rank(), dist.get_world_size()
    os.environ.setdefault("COMFYUI_PATH", args.comfyui)
    import comfy_env
    from pack import import_pack

    if cuda:
        sys.path.insert(0, args.comfyui)
        import comfy.cli_args

        comfy.cli_args.args.highvram = True  # the whole model on the GPU: time the step, not weight streaming
        import e2e

        config = e2e.CONFIGS["14b-720p"]
        base = e2e.build_model(config.checkpoint(), torch.device("cuda", torch.cuda.current_device()))
        latent, cond = torch.zeros(1, *config.latent), config.cond()
        radial, dense_layers = config.radial, config.dense_layers
    else:
        comfy_env.setup()
        base = comfy_env.tiny_wan_t2v(seed=3)
        latent, cond = torch.zeros(1, 16, 9, 18, 18), comfy_env.wan_conds(seed=1)[0]
        radial, dense_layers = dict(decay_factor=0.05, block_size=64, attention_sink=False), 0
    from sharded_wan import shard_tokens, whole_tokens

    workers = import_pack("nodes.sequence_parallel")
    settings = {"method": "radial", "method_settings": radial, "dense_steps": 1, "dense_layers": dense_layers,
                "backend": "auto" if cuda else "reference"}
    sparse = workers.patch_worker_model(base, settings)
    dense = workers.patch_worker_model(base, dict(settings, dense_steps=1000))  # every call dense, sharded
    model = base.get_model_object("diffusion_model")
    steps = args.steps

    one_gpu = {}
    dist.barrier()
    if rank == 0:
        one_gpu = {"dense": step_seconds(base, latent, cond, steps, cuda),
                   "sparse": step_seconds(sparse, latent, cond, steps + 1, cuda)}
    dist.barrier()
    shard_tokens(model)
    sharded = {"sparse": step_seconds(sparse, latent, cond, steps + 1, cuda),
               "dense": step_seconds(dense, latent, cond, steps + 1, cuda)}
    whole_tokens(model)
    slowest = torch.tensor([sharded["sparse"], sharded["dense"]], dtype=torch.float64,
                           device="cuda" if cuda else "cpu")
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    sharded = {"sparse": float(slowest[0]), "dense": float(slowest[1])}
    stats = import_pack("nodes.bridge").session_of(sparse).stats
    if rank == 0:
        scaling = {path: dict(speedup=one_gpu[path] / sharded[path], target=TARGET * world,
                              met=one_gpu[path] / sharded[path] >= TARGET * world) for path in ("sparse", "dense")}
        result = dict(world=world, device=torch.cuda.get_device_name() if cuda else "cpu", torch=torch.__version__,
                      tokens=stats.grid.total_tokens if stats.grid else None, method=settings,
                      radial_mean_density=stats.sparse_density, one_gpu_step_s=one_gpu, sharded_step_s=sharded,
                      scaling=scaling, sparse_over_dense_one_gpu=one_gpu["dense"] / one_gpu["sparse"],
                      sparse_over_dense_sharded=sharded["dense"] / sharded["sparse"])
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(result, indent=1))
            print(f"wrote {args.json}")
        print(f"{'step':<8}{'1 GPU s':>10}{f'{world} GPUs s':>12}{'speed-up':>10}{'target':>8}  met")
        for path in ("sparse", "dense"):
            s = scaling[path]
            print(f"{path:<8}{one_gpu[path]:>10.3f}{sharded[path]:>12.3f}{s['speedup']:>10.2f}{s['target']:>8.1f}  "
                  f"{'yes' if s['met'] else 'no'}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
