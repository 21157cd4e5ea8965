"""Find ComfyUI for the integration tests and build tiny ComfyUI video models on the CPU.

ComfyUI is looked for, in order (DESIGN.md): ``$COMFYUI_PATH``; the folder two levels above this repository
(when the pack sits in ``ComfyUI/custom_nodes/<pack>``); ``~/comfy/ComfyUI`` (comfy-cli's default). Tests that
need it carry ``@pytest.mark.comfyui``; when none is found (or it cannot be imported) tests/conftest.py skips
them with a pytest warning and a banner in the terminal summary, never silently.

Nothing here imports ComfyUI at import time: :func:`setup` does, once, and only when a ComfyUI test was collected.
"""

from __future__ import annotations

import math
import os
import sys
import types
from pathlib import Path

import torch

from pack import REPO_ROOT, import_pack

ENV_VAR = "COMFYUI_PATH"
DEFAULT_PATH = Path("~/comfy/ComfyUI").expanduser()
CPU = torch.device("cpu")

_state: dict = {}


def is_comfyui(path: Path) -> bool:
    return (path / "comfy" / "model_patcher.py").is_file() and (path / "comfy" / "ldm" / "wan" / "model.py").is_file()


def _repo_roots() -> list[Path]:
    """The repository as reached (a symlink in custom_nodes/ stays one) and as resolved."""
    roots = [Path(__file__).absolute().parent.parent, REPO_ROOT]
    return [r for i, r in enumerate(roots) if r not in roots[:i]]


def candidates(repo_roots=None, default: Path | None = None) -> list[tuple[str, Path]]:
    found = []
    if os.environ.get(ENV_VAR):
        found.append((f"${ENV_VAR}", Path(os.environ[ENV_VAR]).expanduser()))
    for root in repo_roots if repo_roots is not None else _repo_roots():
        found.append(("two levels above the repository", root.parent.parent))
    found.append(("comfy-cli default", DEFAULT_PATH if default is None else default))
    return found


def find_comfyui(repo_roots=None, default: Path | None = None) -> tuple[Path | None, str]:
    """(path, note): the first ComfyUI source tree in the search order, or None and where it looked."""
    looked = []
    for label, path in candidates(repo_roots, default):
        if is_comfyui(path):
            return path.resolve(), f"ComfyUI at {path} ({label})"
        looked.append(f"{label}: {path}")
        if label.startswith("$"):
            looked[-1] += " (set, but holds no comfy/ package)"
    return None, "ComfyUI not found; looked at " + "; ".join(looked)


def setup() -> tuple[Path | None, str]:
    """Put ComfyUI on sys.path and import it (CPU mode without CUDA). Cached; returns (path or None, reason)."""
    if "result" in _state:
        return _state["result"]
    path, note = find_comfyui()
    if path is not None:
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))
        try:
            import comfy.cli_args
            if not torch.cuda.is_available():
                if "comfy.model_management" in sys.modules and not comfy.cli_args.args.cpu:
                    raise ImportError("comfy.model_management was imported before args.cpu could be set")
                comfy.cli_args.args.cpu = True
            import comfy.model_management  # noqa: F401
            import comfy.model_patcher  # noqa: F401
            import comfy.sample  # noqa: F401
            import comfy.supported_models  # noqa: F401
        except Exception as why:  # a tree without its requirements, or a broken one: skip loudly, say why
            path, note = None, f"{note}, but importing it failed: {type(why).__name__}: {why}"
    _state["result"] = (path, note)
    return _state["result"]


def available() -> bool:
    return setup()[0] is not None


# ----------------------------------------------------------------------------------------------------------------
# Tiny models. ComfyUI builds its modules with uninitialised weights (they come from a checkpoint), so every
# parameter is filled from a seeded normal: the same seed gives the same model.

def init_weights(module: torch.nn.Module, seed: int = 0, std: float = 0.05) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters()):
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32) * std
            is_scale = p.ndim == 1 and ("norm" in name) and (name.endswith("weight") or name.endswith("scale"))
            p.copy_((1.0 + 2 * noise) if is_scale else noise)


def wrap(base_model) -> "comfy.model_patcher.ModelPatcher":  # noqa: F821
    import comfy.model_patcher
    return comfy.model_patcher.ModelPatcher(base_model, load_device=CPU, offload_device=CPU)


def detected_config(checkpoint: dict, **sizes):
    """The supported-model config ComfyUI's own detection (comfy.model_detection) picks for a checkpoint holding
    ``checkpoint``'s keys ({key: shape}), with its size fields replaced by ``sizes`` (tiny heads: detection assumes
    head_dim 128, as real checkpoints have). Each ComfyUI version fills the fields it needs: the model class and
    its config are that version's own."""
    import comfy.model_detection
    state_dict = {key: torch.empty(shape) for key, shape in checkpoint.items()}
    config = comfy.model_detection.model_config_from_unet(state_dict, "")
    if config is None:
        raise AssertionError(f"ComfyUI detects no model in a checkpoint with keys {sorted(checkpoint)}")
    config.unet_config.update(sizes)
    return config


def build(config, seed: int = 0, dtype=torch.float32, manual_cast=None):
    """A ModelPatcher of the model ``config`` describes, with seeded weights stored in ``dtype`` (cast per layer to
    ``manual_cast`` when given: ComfyUI's manual_cast ops, as for fp8 checkpoints)."""
    config.set_inference_dtype(dtype, manual_cast)
    base = config.get_model({}, device=CPU)
    init_weights(base.diffusion_model, seed)
    return wrap(base)


def _blocks(prefix: str, count: int, suffix: str, shape: tuple) -> dict:
    return {f"{prefix}.{i}.{suffix}": shape for i in range(count)}


WAN_DIM, WAN_HEADS, WAN_LAYERS, WAN_TEXT_DIM, WAN_CLIP_DIM = 64, 2, 3, 32, 1280
WAN_FFN = 128
HUNYUAN_DIM, HUNYUAN_HEADS, HUNYUAN_TEXT_DIM, HUNYUAN_VEC_DIM = 64, 2, 32, 32
HUNYUAN_DOUBLE, HUNYUAN_SINGLE = 2, 2


def wan_checkpoint(in_dim: int = 16, dim: int = WAN_DIM, layers: int = WAN_LAYERS, i2v: bool = False) -> dict:
    """The keys (and the shapes detection reads) of a Wan 2.1 checkpoint; ``i2v`` adds the CLIP image embedding."""
    keys = {"head.modulation": (1, 2, dim), "head.head.weight": (16 * 4, dim), "patch_embedding.weight": (dim, in_dim, 1, 2, 2),
            **_blocks("blocks", layers, "ffn.0.weight", (WAN_FFN, dim))}
    if i2v:
        keys["img_emb.proj.0.bias"] = (WAN_CLIP_DIM,)
    return keys


def wan_config(checkpoint: dict, dim: int = WAN_DIM, heads: int = WAN_HEADS):
    return detected_config(checkpoint, dim=dim, num_heads=heads, ffn_dim=WAN_FFN, freq_dim=32, text_dim=WAN_TEXT_DIM,
                           text_len=16)


def tiny_wan_t2v(seed: int = 0, dtype=torch.float32):
    """Wan 2.1 T2V as ComfyUI detects it (supported_models.WAN21_T2V): dim 64, 2 heads of 32, 3 blocks."""
    return build(wan_config(wan_checkpoint()), seed, dtype)


def tiny_wan_i2v(seed: int = 0, dtype=torch.float32):
    """Wan 2.1 I2V (supported_models.WAN21_I2V): 36 input channels (noise + mask + image latent) and ``img_emb``,
    which turns CLIP vision tokens (1280 wide) into extra cross-attention keys in front of the text."""
    return build(wan_config(wan_checkpoint(in_dim=36, i2v=True)), seed, dtype)


def hunyuan_checkpoint(patch: tuple = (1, 2, 2), double: int = HUNYUAN_DOUBLE, single: int = HUNYUAN_SINGLE,
                       in_channels: int = 16) -> dict:
    """The keys of a HunyuanVideo checkpoint (guidance-distilled, with the CLIP-L pooled vector); 33 input channels
    is HunyuanVideo I2V (noise, start-image latent and mask)."""
    hidden = HUNYUAN_DIM
    return {"txt_in.individual_token_refiner.blocks.0.norm1.weight": (hidden,),
            "txt_in.input_embedder.weight": (hidden, HUNYUAN_TEXT_DIM),
            "img_in.proj.weight": (hidden, in_channels, *patch), "final_layer.linear.weight": (16 * math.prod(patch), hidden),
            "vector_in.in_layer.weight": (hidden, HUNYUAN_VEC_DIM), "guidance_in.in_layer.weight": (hidden, 256),
            **_blocks("double_blocks", double, "img_attn.qkv.weight", (3 * hidden, hidden)),
            **_blocks("single_blocks", single, "linear1.weight", (3 * hidden, hidden))}


def _hunyuan_sizes(axes_dim: list) -> dict:
    return dict(num_heads=HUNYUAN_HEADS, axes_dim=axes_dim, mlp_ratio=2.0, vec_in_dim=HUNYUAN_VEC_DIM)


def tiny_hunyuan_video(seed: int = 0, dtype=torch.float32):
    """HunyuanVideo as ComfyUI detects it (supported_models.HunyuanVideo): hidden 64, 2 heads of 32, 2 double + 2
    single blocks, guidance embedding (so cfg 1.0 as in real use). Where its text sits in self-attention depends on
    the ComfyUI version (after the video up to 0.3.x, in front of it since)."""
    return build(detected_config(hunyuan_checkpoint(), **_hunyuan_sizes([8, 12, 12])), seed, dtype)


def tiny_hunyuan_video_i2v(seed: int = 0, dtype=torch.float32):
    """HunyuanVideo I2V (supported_models.HunyuanVideoI2V): the start image's latent and a mask concatenated to the
    noise as input channels; the token layout is the T2V one."""
    return build(detected_config(hunyuan_checkpoint(in_channels=33), **_hunyuan_sizes([8, 12, 12])), seed, dtype)


def tiny_flux(seed: int = 0):
    """A tiny Flux (image model): not a video model, the pack must leave it alone."""
    hidden = 64
    checkpoint = {"img_in.weight": (hidden, 16 * 4), "txt_in.weight": (hidden, 32),
                  "vector_in.in_layer.weight": (hidden, 32), "guidance_in.in_layer.weight": (hidden, 256),
                  "double_blocks.0.img_attn.norm.key_norm.scale": (32,), "single_blocks.0.linear1.weight": (hidden,)}
    return build(detected_config(checkpoint, hidden_size=hidden, num_heads=2, axes_dim=[8, 12, 12], mlp_ratio=2.0,
                                 context_in_dim=32, vec_in_dim=32), seed)


def tiny_hunyuan_image(seed: int = 0):
    """ComfyUI's HunyuanVideo class with a 2D patch (how ComfyUI runs HunyuanImage): an image model."""
    checkpoint = hunyuan_checkpoint(patch=(2, 2), double=1, single=1)
    return build(detected_config(checkpoint, **_hunyuan_sizes([16, 16])), seed)


# ----------------------------------------------------------------------------------------------------------------
# Conditioning in ComfyUI's format: a list of [tensor, dict] pairs, the dict going to model_base.extra_conds.

def wan_conds(seed: int, text_tokens: int = 16, clip_tokens: int | None = None, image_latent=None):
    """(positive, negative) for Wan; with ``clip_tokens`` a CLIP vision output and the start-image latent (I2V)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(2):
        extra = {}
        if clip_tokens is not None:
            hidden = torch.randn(1, clip_tokens, WAN_CLIP_DIM, generator=gen)
            extra["clip_vision_output"] = types.SimpleNamespace(penultimate_hidden_states=hidden)
        if image_latent is not None:
            extra["concat_latent_image"] = image_latent
        out.append([[torch.randn(1, text_tokens, WAN_TEXT_DIM, generator=gen), extra]])
    return out[0], out[1]


def hunyuan_conds(seed: int, text_tokens: int = 12, valid_tokens: int | None = 8, **extra):
    """(positive, negative) for HunyuanVideo: a text of ``text_tokens`` of which the last ones are padding
    (``attention_mask`` 1 = keep, 0 = pad, as ComfyUI's Llama text encoder returns it; None: no mask, as the
    encoder returns a text without padding). ``extra``: more conditioning (``ref_latent``, ``guiding_frame_index``,
    ``concat_latent_image``...)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(2):
        cond = {"pooled_output": torch.randn(1, HUNYUAN_VEC_DIM, generator=gen), "guidance": 6.0, **extra}
        if valid_tokens is not None:
            cond["attention_mask"] = (torch.arange(text_tokens) < valid_tokens).long().view(1, -1)
        out.append([[torch.randn(1, text_tokens, HUNYUAN_TEXT_DIM, generator=gen), cond]])
    return out[0], out[1]


def sample(model, latent, positive, negative, steps: int = 4, cfg: float = 3.0, sampler: str = "euler",
           scheduler: str = "simple", seed: int = 0, **kwargs):
    """ComfyUI's own sampling (comfy.sample.sample) from seeded noise; a NestedTensor latent (LTX-2's video and
    audio) gets seeded noise for each of its tensors."""
    import comfy.sample
    generator = torch.Generator().manual_seed(seed)
    if isinstance(latent, torch.Tensor):
        noise = torch.randn(latent.shape, generator=generator)
    else:
        import comfy.nested_tensor
        noise = comfy.nested_tensor.NestedTensor([torch.randn(t.shape, generator=generator) for t in latent.unbind()])
    return comfy.sample.sample(model, noise, steps, cfg, sampler, scheduler, positive, negative, latent, seed=seed,
                               disable_pbar=True, **kwargs)


def pack_nodes():
    """The pack's nodes package (imports ComfyUI: call after setup())."""
    return import_pack("nodes")


# ----------------------------------------------------------------------------------------------------------------
# Wan variants (tests/test_comfy_wan_variants.py). ComfyUI's detection tells each from the Wan 2.1 keys plus the one
# key that marks it; only the presence of that key is read, so its shape here is nominal.

WAN_VACE_LAYERS = 4  # VACE blocks run after every num_layers // vace_layers-th block: 2 of them, after blocks 0 and 2
WAN_VACE_BLOCKS = 2
WAN_VACE_IN = 96  # the VACE context: 32 channels of control latents (inactive + reactive) and a 64-channel mask


def tiny_wan_vace(seed: int = 0):
    """Wan 2.1 VACE (supported_models.WAN21_Vace, VaceWanModel): 4 blocks and 2 VACE blocks, each of which runs a
    self-attention of its own over the VACE context (same length as the video) after blocks 0 and 2."""
    keys = {**wan_checkpoint(layers=WAN_VACE_LAYERS), "vace_patch_embedding.weight": (WAN_DIM, WAN_VACE_IN, 1, 2, 2),
            **_blocks("vace_blocks", WAN_VACE_BLOCKS, "after_proj.weight", (WAN_DIM, WAN_DIM))}
    return build(wan_config(keys), seed)


def tiny_wan22_fun_control(seed: int = 0):
    """Wan 2.2 Fun Control (plain WanModel, detected as WAN21_T2V): 52 input channels (noise, control latent, mask,
    start-image latent) and ``ref_conv``, which turns a reference image's latent into one frame of tokens in front
    of the video."""
    keys = {**wan_checkpoint(in_dim=52), "ref_conv.weight": (WAN_DIM, 16, 2, 2)}
    return build(wan_config(keys), seed)


def tiny_wan_humo(seed: int = 0):
    """HuMo 1.7B (supported_models.WAN21_HuMo, HumoWanModel): 16 input channels; its reference latent's frames are
    patchified like the video and appended behind it; audio goes through a per-frame cross-attention."""
    return build(wan_config({**wan_checkpoint(), "audio_proj.audio_proj_glob_1.layer.bias": (512,)}), seed)


def tiny_wan_animate(seed: int = 0):
    """Wan 2.2 Animate (supported_models.WAN22_Animate, AnimateWanModel): 36 input channels, CLIP image tokens,
    pose latents added to frames 1.. (frame 0 is the reference image, inside the latent)."""
    keys = {**wan_checkpoint(in_dim=36, i2v=True), "face_adapter.fuser_blocks.0.k_norm.weight": (WAN_DIM // WAN_HEADS,)}
    return build(wan_config(keys), seed)


def tiny_wan_s2v(seed: int = 0):
    """Wan 2.2 S2V (supported_models.WAN22_S2V, WanModel_S2V): reference frames and FramePack motion tokens (at three
    resolutions) appended behind the video."""
    keys = {**wan_checkpoint(), "casual_audio_encoder.encoder.final_linear.weight": (WAN_DIM, WAN_DIM)}
    return build(wan_config(keys), seed)


def tiny_wan_scail(seed: int = 0):
    """SCAIL (supported_models.WAN21_SCAIL, SCAILWanModel; ComfyUI 0.33+): 20 input channels, reference frames in
    front of the video, pose tokens (from their own patch embedding, possibly at half resolution) behind it."""
    keys = {**wan_checkpoint(in_dim=20, i2v=True), "patch_embedding_pose.weight": (WAN_DIM, 20, 1, 2, 2)}
    return build(wan_config(keys), seed)


# ----------------------------------------------------------------------------------------------------------------
# LTX-2 (tests/test_comfy_ltx_av.py; ComfyUI 0.33+): LTXAV, video with audio. Detection reads the keys that mark an
# LTX model (adaln_single) and its audio stream (audio_adaln_single), the block count, and the head size from the
# text cross-attention's key projection (as 32 heads); the sizes below replace those of the real 19B model.

LTX_HEADS, LTX_HEAD_DIM = 2, 32            # video stream: 2 heads of 32 (dim 64)
LTX_AUDIO_HEADS, LTX_AUDIO_HEAD_DIM = 2, 16  # audio stream: 2 heads of 16 (dim 32)
LTX_LAYERS = 3
LTX_CAPTION = 24  # the text as the model receives it (after ComfyUI's text connectors): 2 x 24 channels
LTX_CHANNELS = 128  # video latent channels (LTX-2's VAE)
LTX_AUDIO_SHAPE = (8, 16)  # audio latent channels and frequency bins (LTX-2's audio VAE)


def ltx_checkpoint(layers: int = LTX_LAYERS, audio: bool = True) -> dict:
    """The keys detection reads of an LTX-2 checkpoint (``audio``) or an LTX-Video one (video only)."""
    dim = LTX_HEADS * LTX_HEAD_DIM
    keys = {"adaln_single.emb.timestep_embedder.linear_1.bias": (dim,),
            **_blocks("transformer_blocks", layers, "attn2.to_k.weight", (32 * LTX_HEAD_DIM, dim))}
    if audio:
        audio_dim = LTX_AUDIO_HEADS * LTX_AUDIO_HEAD_DIM
        keys["audio_adaln_single.linear.weight"] = (6 * audio_dim, audio_dim)
    return keys


def tiny_ltx_av(seed: int = 0, layers: int = LTX_LAYERS):
    """LTX-2 as ComfyUI detects it (supported_models.LTXAV, model_base.LTXAV, LTXAVModel): video dim 64 (2 heads of
    32), audio dim 32 (2 heads of 16), ``layers`` blocks, small text connectors (the text given to it is already
    connected, so they do not run)."""
    dim, audio_dim = LTX_HEADS * LTX_HEAD_DIM, LTX_AUDIO_HEADS * LTX_AUDIO_HEAD_DIM
    config = detected_config(ltx_checkpoint(layers), num_attention_heads=LTX_HEADS, attention_head_dim=LTX_HEAD_DIM,
                             cross_attention_dim=dim, audio_num_attention_heads=LTX_AUDIO_HEADS,
                             audio_attention_head_dim=LTX_AUDIO_HEAD_DIM, audio_cross_attention_dim=audio_dim,
                             caption_channels=LTX_CAPTION, connector_attention_head_dim=8,
                             connector_num_attention_heads=2, connector_num_layers=1)
    return build(config, seed)


def tiny_ltxv(seed: int = 0):
    """LTX-Video (supported_models.LTXV, LTXVModel): the video-only LTX model, which the pack does not take."""
    dim = LTX_HEADS * LTX_HEAD_DIM
    config = detected_config(ltx_checkpoint(audio=False), num_attention_heads=LTX_HEADS,
                             attention_head_dim=LTX_HEAD_DIM, cross_attention_dim=dim, caption_channels=LTX_CAPTION)
    return build(config, seed)


def ltx_conds(seed: int, text_tokens: int = 7, frame_rate: float = 24.0, **extra):
    """(positive, negative) for LTX-2: text embeddings as its connectors return them (video and audio halves), and
    the frame rate (LTXVConditioning)."""
    gen = torch.Generator().manual_seed(seed)
    return tuple([[torch.randn(1, text_tokens, 2 * LTX_CAPTION, generator=gen), {"frame_rate": frame_rate, **extra}]]
                 for _ in range(2))


def av_latent(frames: int, height: int = 8, width: int = 8, audio_frames: int = 10, video=None):
    """An LTX-2 latent as LTXVConcatAVLatent makes it: the video latent (or ``video``) and an audio latent."""
    import comfy.nested_tensor
    video = torch.zeros(1, LTX_CHANNELS, frames, height, width) if video is None else video
    audio = torch.zeros(1, LTX_AUDIO_SHAPE[0], audio_frames, LTX_AUDIO_SHAPE[1])
    return comfy.nested_tensor.NestedTensor((video, audio))
