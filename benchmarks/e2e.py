"""End-to-end: one denoising step of ComfyUI's own video models (Wan, HunyuanVideo, Kandinsky 5, LTX-2), dense
against Radial (GPU).

Builds ComfyUI's model at the real configuration (as ComfyUI's model detection configures it from a checkpoint's
keys) with random bf16 weights, samples a few steps through ComfyUI's sampler with the unpatched model and with the
model patched by our Sparse Attention Patch (Radial at the reference settings of its workflow), and reports the time
of a sparse step against a dense step, and the attention share of a dense step.

    python benchmarks/e2e.py --comfyui PATH [--configs 14b-720p hunyuan-720p] [--steps 3] [--json out.json]
    python benchmarks/e2e.py --comfyui PATH --precision 8-bit ...   # the sparse steps on the 8-bit kernel
    python benchmarks/e2e.py --comfyui PATH --precision bf16 8-bit ...  # both, against one dense run per model
    python benchmarks/e2e.py --comfyui PATH --precision "8-bit + dense calls" ...  # dense calls on it too

With '8-bit + dense calls' the dense layers of the sparse steps run on the 8-bit kernel, and a third run of the model
patched with no sparse step at all (sparse_end 0) times a dense step whose video self-attention is all on the 8-bit
kernel at a full layout, against the unpatched dense step.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from pack import import_pack  # noqa: E402

EIGHT_BIT_DENSE = import_pack("kernels.eight_bit").EIGHT_BIT_DENSE

def wan_checkpoint(dim: int, ffn: int, layers: int) -> dict:
    return {"head.modulation": (1, 2, dim), "head.head.weight": (64, dim), "patch_embedding.weight": (dim, 16, 1, 2, 2),
            **{f"blocks.{i}.ffn.0.weight": (ffn, dim) for i in range(layers)}}


def hunyuan_checkpoint() -> dict:
    """HunyuanVideo T2V 720p (13B): hidden 3072, 20 double and 40 single blocks, guidance-distilled."""
    keys = {"txt_in.individual_token_refiner.blocks.0.norm1.weight": (3072,),
            "txt_in.input_embedder.weight": (3072, 4096), "img_in.proj.weight": (3072, 16, 1, 2, 2),
            "final_layer.linear.weight": (64, 3072),
            "vector_in.in_layer.weight": (3072, 768), "guidance_in.in_layer.weight": (3072, 256)}
    keys.update({f"double_blocks.{i}.img_attn.qkv.weight": (9216, 3072) for i in range(20)})
    keys.update({f"single_blocks.{i}.linear1.weight": (21504, 3072) for i in range(40)})
    return keys


def wan14b_checkpoint(in_dim: int = 16, **extra) -> dict:
    """Wan 14B with a variant's marking keys (detection picks the variant from them)."""
    keys = wan_checkpoint(5120, 13824, 40)
    keys["patch_embedding.weight"] = (5120, in_dim, 1, 2, 2)
    return {**keys, **extra}


def hunyuan15_checkpoint() -> dict:
    """HunyuanVideo 1.5 720p (8.3B): hidden 2048 (16 heads of 128), 54 double blocks, no single ones, patch 1x1x1,
    byT5 and SigLIP inputs."""
    keys = {"txt_in.individual_token_refiner.blocks.0.norm1.weight": (2048,),
            "txt_in.input_embedder.weight": (2048, 3584), "img_in.proj.weight": (2048, 65, 1, 1, 1),
            "final_layer.linear.weight": (32, 2048), "byt5_in.fc1.weight": (2048, 1472),
            "cond_type_embedding.weight": (3, 2048), "vision_in.proj.0.weight": (1152,)}
    keys.update({f"double_blocks.{i}.img_attn.qkv.weight": (6144, 2048) for i in range(54)})
    return keys


def kandinsky5_checkpoint(model_dim=4096, time_dim=1024, ff_dim=16384, head_dim=128, text_blocks=4,
                          visual_blocks=60) -> dict:
    """Kandinsky 5 Video Pro (19B): 32 heads of 128, 60 visual blocks; 132 input channels (a (1, 2, 2) patch of noise,
    start-image latent and mask)."""
    keys = {"visual_embeddings.in_layer.weight": (model_dim, 132), "visual_embeddings.in_layer.bias": (model_dim,),
            "time_embeddings.in_layer.bias": (time_dim,),
            "visual_transformer_blocks.0.cross_attention.key_norm.weight": (head_dim,),
            "visual_transformer_blocks.0.feed_forward.in_layer.weight": (ff_dim, model_dim)}
    keys.update({f"text_transformer_blocks.{i}.self_attention.to_query.weight": (model_dim, model_dim)
                 for i in range(text_blocks)})
    keys.update({f"visual_transformer_blocks.{i}.self_attention.to_query.weight": (model_dim, model_dim)
                 for i in range(visual_blocks)})
    return keys


def ltx2_checkpoint(head_dim: int = 128, layers: int = 48) -> dict:
    """LTX-2 19B (LTXAV, video with audio): 48 blocks, video 32 heads of 128 (dim 4096). Detection reads the block
    count and the head size (the text key projection of block 0, as 32 heads); the audio stream (32 heads of 64, dim
    2048) and the text's 3840 channels a stream are LTXAVModel's defaults, which are LTX-2's."""
    dim = 32 * head_dim
    keys = {"adaln_single.emb.timestep_embedder.linear_1.bias": (dim,),
            "audio_adaln_single.linear.weight": (6 * 2048, 2048)}  # present: the audio stream (LTXAV, not LTXV)
    keys.update({f"transformer_blocks.{i}.attn2.to_k.weight": (dim, dim) for i in range(layers)})
    return keys


def ltx2_text():
    """LTX-2's text as its model takes it: ComfyUI's text connectors pad Gemma's tokens with learnable registers to
    1024 and return a video and an audio half of 3840 channels; the frame rate of LTXVConditioning (24)."""
    return text(1024, 2 * 3840, frame_rate=24.0)


def text(tokens: int, width: int, **extra):
    """ComfyUI conditioning: one text of ``tokens`` x ``width`` and the extra inputs its model takes."""
    gen = torch.Generator().manual_seed(1)
    return [[torch.randn(1, tokens, width, generator=gen), extra]]


@dataclass(frozen=True)
class Config:
    """One model at a typical size of its workflows: what detection builds, the latent, the conditioning, and the
    Radial settings and dense layers of the pack's workflow for it."""

    checkpoint: Callable[[], dict]
    latent: tuple  # its shape without the batch; a tuple of shapes: one latent of several streams (LTX-2's)
    cond: Callable[[], list]
    radial: dict
    dense_layers: int


WAN_RADIAL = dict(decay_factor=0.2, block_size=128, attention_sink=True, text_dense=True)
HUNYUAN_RADIAL = dict(decay_factor=0.95, block_size=128, attention_sink=False, text_dense=True)
CONFIGS = {
    "1.3b-480p": Config(lambda: wan_checkpoint(1536, 8960, 30), (16, 21, 60, 104), lambda: text(512, 4096),
                        WAN_RADIAL, 1),
    "14b-720p": Config(lambda: wan_checkpoint(5120, 13824, 40), (16, 21, 90, 160), lambda: text(512, 4096),
                       WAN_RADIAL, 1),
    # 129 frames; ComfyUI's HunyuanVideo text encoder crops the LLM text to at most 256 tokens
    "hunyuan-720p": Config(hunyuan_checkpoint, (16, 33, 90, 160),
                           lambda: text(256, 4096, pooled_output=torch.randn(1, 768), guidance=6.0),
                           HUNYUAN_RADIAL, 0),
    # 121 frames: 31 x 45 x 80 video tokens behind 128 text tokens (no pooled vector: HunyuanVideo 1.5 has none)
    "hunyuan15-720p": Config(hunyuan15_checkpoint, (32, 31, 45, 80), lambda: text(128, 3584, pooled_output=None),
                             HUNYUAN_RADIAL, 0),
    # Kandinsky 5 Video Pro, 1280x720, 121 frames: 31 x 45 x 80 tokens; Qwen2.5-VL text and a CLIP-L pooled vector
    "kandinsky5-pro-720p": Config(kandinsky5_checkpoint, (16, 31, 90, 160),
                                  lambda: text(256, 3584, pooled_output=torch.randn(1, 768)), WAN_RADIAL, 1),
    # Wan 2.2 S2V, an extension chunk of 77 frames: 20 frames, the reference frame behind them, 5,360 FramePack
    # motion tokens behind those (dense rows and columns)
    "wan22-s2v-720p": Config(lambda: wan14b_checkpoint(**{"casual_audio_encoder.encoder.final_linear.weight":
                                                         (5120, 5120)}),
                             (16, 20, 90, 160),
                             lambda: text(512, 4096, reference_latents=[torch.randn(1, 16, 1, 90, 160)],
                                          reference_motion=torch.randn(1, 16, 19, 90, 160),
                                          audio_embed=torch.randn(1, 25, 1024, 80),
                                          control_video=torch.zeros(1, 16, 20, 90, 160)), WAN_RADIAL, 1),
    # LTX-2 19B, 1280x704, 121 frames at 24 fps (workflows/ltx2_t2v_radial.json): 16 x 22 x 40 = 14,080 video
    # tokens; the audio latent's 25 frames a second (16 kHz, hop 160, /4): round(121 / 24 * 25) = 126 audio tokens
    "ltx2-720p": Config(ltx2_checkpoint, ((128, 16, 22, 40), (8, 126, 16)), ltx2_text, WAN_RADIAL, 1),
}


def empty_latent(shape: tuple):
    """A zero latent of ``shape`` (batch 1); for a tuple of shapes, a latent of those streams as ComfyUI nests them
    (LTXVConcatAVLatent: LTX-2's video and audio)."""
    if isinstance(shape[0], tuple):
        import comfy.nested_tensor
        return comfy.nested_tensor.NestedTensor([torch.zeros(1, *s) for s in shape])
    return torch.zeros(1, *shape)


def seeded_noise(latent):
    """Seeded noise of ``latent``'s shape, each stream's of a nested latent."""
    generator = torch.Generator().manual_seed(0)
    if isinstance(latent, torch.Tensor):
        return torch.randn(latent.shape, generator=generator)
    import comfy.nested_tensor
    return comfy.nested_tensor.NestedTensor([torch.randn(t.shape, generator=generator) for t in latent.unbind()])


def build_model(checkpoint: dict, device):
    """ComfyUI's model as its detection configures it for ``checkpoint``'s keys, with random bf16 weights."""
    import comfy.model_detection
    import comfy.model_patcher

    meta = {key: torch.empty(shape, device="meta") for key, shape in checkpoint.items()}
    config = comfy.model_detection.model_config_from_unet(meta, "")
    config.set_inference_dtype(torch.bfloat16, None)
    model = config.get_model({}, device=device)
    generators = {}  # one per device: some models build a part on the CPU (the sampler moves it)
    with torch.no_grad():  # ComfyUI leaves weights uninitialised; random weights of a sane scale
        for p in model.parameters():
            if p.device not in generators:
                generators[p.device] = torch.Generator(device=p.device).manual_seed(0)
            p.normal_(0.0, 0.02, generator=generators[p.device])
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=device)


def sync():
    if torch.cuda.is_available():  # the CPU smoke runs of benchmarks/check_cost.py time the same way
        torch.cuda.synchronize()


def sample_step_times(model, latent, steps, cond, cfg=1.0):
    """Wall time (s) of each denoising step of one sampling run (cfg 1: one model call per step)."""
    import comfy.sample

    marks = []

    def on_step(*_):
        sync()
        marks.append(time.perf_counter())

    sync()
    marks.append(time.perf_counter())
    noise = seeded_noise(latent)
    comfy.sample.sample(model, noise, steps, cfg, "euler", "simple", cond, cond, latent, seed=0,
                        callback=on_step, disable_pbar=True)
    return [b - a for a, b in zip(marks, marks[1:])]


def attention_seconds(model, latent, cond):
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
    sample_step_times(timed, latent, 1, cond)
    torch.cuda.synchronize()
    return sum(a.elapsed_time(b) for a, b in spent) / 1e3


def run_config(name, nodes, device, steps, attention_share=True, precisions=("bf16",)):
    """One result per precision: the model is built and its dense steps timed once, then one patched run each."""
    config = CONFIGS[name]
    model = build_model(config.checkpoint(), device)
    latent, cond = empty_latent(config.latent), config.cond()
    method = nodes.RadialMask().settings(**config.radial)[0]
    dense = sample_step_times(model, latent, steps, cond)
    dense_step = min(dense[1:] or dense)
    attn = attention_seconds(model, latent, cond) if attention_share else None
    results = []
    for precision in precisions:
        patched = nodes.SparseAttentionPatch().patch(model, dense_steps=1, sparse_end=1.0,
                                                     dense_layers=config.dense_layers, backend="auto", verbose=False,
                                                     method=method, precision=precision)[0]
        sparse = sample_step_times(patched, latent, steps + 1, cond)  # its first step is dense
        stats = nodes.session_of(patched).stats
        assert stats.sparse_calls and not stats.fallbacks, f"{name}: no sparse step ({stats.fallback_messages})"
        sparse_step = min(sparse[1:])
        result = dict(config=name, precision=precision, tokens=stats.grid.total_tokens, dense_step_s=dense_step,
                      sparse_step_s=sparse_step, speedup=dense_step / sparse_step,
                      radial_mean_density=stats.sparse_density,
                      attention_share=None if attn is None else attn / dense_step, dense_steps_s=dense,
                      sparse_steps_s=sparse)
        if precision == EIGHT_BIT_DENSE:
            result.update(dense_8bit_step(nodes, model, latent, steps, cond, config))
        results.append(result)
        del patched
    del model
    torch.cuda.empty_cache()
    return results


def dense_8bit_step(nodes, model, latent, steps, cond, config):
    """A dense step whose video self-attention runs on the 8-bit kernel at a full layout: the model patched with no
    sparse step (sparse_end 0), precision '8-bit + dense calls'."""
    patched = nodes.SparseAttentionPatch().patch(model, dense_steps=0, sparse_end=0.0, dense_layers=config.dense_layers,
                                                 backend="auto", verbose=False, precision=EIGHT_BIT_DENSE)[0]
    times = sample_step_times(patched, latent, steps, cond)
    stats = nodes.session_of(patched).stats
    assert stats.dense_8bit_calls and not stats.dense_calls and not stats.fallbacks, \
        f"the dense calls did not all run on the 8-bit kernel ({stats.fallback_messages})"
    return dict(dense_8bit_step_s=min(times[1:] or times), dense_8bit_steps_s=times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH", str(Path.home() / "comfy/ComfyUI")))
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--no-attention-share", action="store_true",
                        help="skip the timed dense step that measures attention's share (the same on any ComfyUI)")
    parser.add_argument("--precision", nargs="+", choices=["bf16", "8-bit", "auto", EIGHT_BIT_DENSE],
                        default=["bf16"],
                        help="the Sparse Attention Patch's precision for the sparse steps (and with "
                             f"'{EIGHT_BIT_DENSE}' for the dense calls); several: one patched run each, one dense run")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("this benchmark needs a CUDA GPU")
    sys.path.insert(0, args.comfyui)
    import comfy.cli_args
    import comfyui_version

    comfy.cli_args.args.highvram = True  # keep the whole model on the GPU: time attention, not weight streaming
    nodes = import_pack("nodes")
    device = torch.device("cuda")
    results = []
    for name in args.configs:
        try:
            config_results = run_config(name, nodes, device, args.steps, not args.no_attention_share,
                                        args.precision)
        except Exception as why:  # one model's failure must not lose the others' figures
            print(f"{name} FAILED: {type(why).__name__}: {why}", flush=True)
            torch.cuda.empty_cache()
            continue
        for result in config_results:
            result["comfyui"] = comfyui_version.__version__
            print(json.dumps(result), flush=True)
        results += config_results
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    print(f"\n{torch.cuda.get_device_name()} | torch {torch.__version__} | ComfyUI {comfyui_version.__version__} | "
          f"{time.strftime('%Y-%m-%d')}")
    print(f"{'config':<14}{'tokens':>8}{'precision':>21}{'dense step s':>14}{'radial step s':>15}{'speedup':>9}"
          f"{'attn share':>12}")
    for r in results:
        share = "-" if r["attention_share"] is None else f"{r['attention_share']:.0%}"
        print(f"{r['config']:<14}{r['tokens']:>8}{r['precision']:>21}{r['dense_step_s']:>14.3f}"
              f"{r['sparse_step_s']:>15.3f}{r['speedup']:>8.2f}x{share:>12}")
        if "dense_8bit_step_s" in r:
            print(f"{'':<14}a dense step with its attention in 8 bits: {r['dense_8bit_step_s']:.3f} s "
                  f"({r['dense_step_s'] / r['dense_8bit_step_s']:.2f}x the dense step)")


if __name__ == "__main__":
    main()
