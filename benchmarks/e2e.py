"""End-to-end: one denoising step of ComfyUI's own WanModel, dense against Radial (GPU).

Builds ComfyUI's WanModel at the real Wan 2.1 configurations with random bf16 weights, samples a few steps
through ComfyUI's sampler with the unpatched model and with the model patched by our Sparse Attention Patch,
and reports the time of a sparse step against a dense step, and the attention share of a dense step.

    python benchmarks/e2e.py --comfyui PATH [--configs 14b-720p 1.3b-480p] [--steps 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

WAN = {
    "14b": dict(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40),
    "1.3b": dict(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30),
}
LATENTS = {"720p": (21, 90, 160), "480p": (21, 60, 104)}  # 81 frames; Wan VAE: 4x time, 8x space


def build_model(size: str, device):
    import comfy.model_patcher
    import comfy.supported_models

    unet = dict(image_model="wan2.1", model_type="t2v", in_dim=16, out_dim=16, text_dim=4096, freq_dim=256,
                patch_size=(1, 2, 2), text_len=512, eps=1e-6, **WAN[size])
    config = comfy.supported_models.WAN21_T2V(unet)
    config.set_inference_dtype(torch.bfloat16, None)
    model = config.get_model({}, device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():  # ComfyUI leaves weights uninitialised; random weights of a sane scale
        for p in model.parameters():
            p.normal_(0.0, 0.02, generator=generator)
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=device)


def sample_step_times(model, latent, steps, context):
    """Wall time (s) of each denoising step of one sampling run (cfg 1: one model call per step)."""
    import comfy.sample

    marks = []

    def on_step(*_):
        torch.cuda.synchronize()
        marks.append(time.perf_counter())

    torch.cuda.synchronize()
    marks.append(time.perf_counter())
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(0))
    cond = [[context, {}]]
    comfy.sample.sample(model, noise, steps, 1.0, "euler", "simple", cond, cond, latent, seed=0,
                        callback=on_step, disable_pbar=True)
    return [b - a for a, b in zip(marks, marks[1:])]


def attention_seconds(model, latent, context):
    """Time spent inside attention during one dense step, by an override that times every call."""
    spent = []

    def timing_override(func, *args, **kwargs):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = func(*args, **kwargs)
        stop.record()
        spent.append((start, stop))
        return out

    timed = model.clone()
    timed.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = timing_override
    sample_step_times(timed, latent, 1, context)
    torch.cuda.synchronize()
    return sum(a.elapsed_time(b) for a, b in spent) / 1e3


def run_config(name, nodes, device, steps):
    size, res = name.split("-")
    model = build_model(size, device)
    latent = torch.zeros(1, 16, *LATENTS[res])
    context = torch.randn(1, 512, 4096, generator=torch.Generator().manual_seed(1))
    method = nodes.RadialMask().settings(decay_factor=0.2, block_size=128, attention_sink=True, text_dense=True)[0]
    patched = nodes.SparseAttentionPatch().patch(model, dense_steps=1, sparse_end=1.0, dense_layers=1,
                                                 backend="auto", verbose=False, method=method)[0]
    dense = sample_step_times(model, latent, steps, context)
    sparse = sample_step_times(patched, latent, steps + 1, context)  # its first step is dense
    density = nodes.session_of(patched).stats.mean_density
    attn = attention_seconds(model, latent, context)
    dense_step = min(dense[1:] or dense)
    sparse_step = min(sparse[1:])
    tokens = LATENTS[res][0] * (LATENTS[res][1] // 2) * (LATENTS[res][2] // 2)
    del model, patched
    torch.cuda.empty_cache()
    return dict(config=name, tokens=tokens, dense_step_s=dense_step, sparse_step_s=sparse_step,
                speedup=dense_step / sparse_step, radial_mean_density=density, attention_share=attn / dense_step, dense_steps_s=dense,
                sparse_steps_s=sparse)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH", str(Path.home() / "comfy/ComfyUI")))
    parser.add_argument("--configs", nargs="+", default=["1.3b-480p", "14b-720p"])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("this benchmark needs a CUDA GPU")
    sys.path.insert(0, args.comfyui)
    import comfy.cli_args

    comfy.cli_args.args.highvram = True  # keep the whole model on the GPU: time attention, not weight streaming
    from pack import import_pack

    nodes = import_pack("nodes")
    device = torch.device("cuda")
    results = []
    for name in args.configs:
        results.append(run_config(name, nodes, device, args.steps))
        print(json.dumps(results[-1]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    print(f"\n{torch.cuda.get_device_name()} | torch {torch.__version__} | {time.strftime('%Y-%m-%d')}")
    print(f"{'config':<12}{'tokens':>8}{'dense step s':>14}{'radial step s':>15}{'speedup':>9}{'attn share':>12}")
    for r in results:
        print(f"{r['config']:<12}{r['tokens']:>8}{r['dense_step_s']:>14.3f}{r['sparse_step_s']:>15.3f}"
              f"{r['speedup']:>8.2f}x{r['attention_share']:>11.0%}")


if __name__ == "__main__":
    main()
