"""Find ComfyUI for the integration tests and build tiny ComfyUI video models on the CPU.

ComfyUI is looked for, in order (DESIGN.md): ``$COMFYUI_PATH``; the folder two levels above this repository
(when the pack sits in ``ComfyUI/custom_nodes/<pack>``); ``~/comfy/ComfyUI`` (comfy-cli's default). Tests that
need it carry ``@pytest.mark.comfyui``; when none is found (or it cannot be imported) tests/conftest.py skips
them with a pytest warning and a banner in the terminal summary, never silently.

Nothing here imports ComfyUI at import time: :func:`setup` does, once, and only when a ComfyUI test was collected.
"""

from __future__ import annotations

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


def _build(config_cls, unet_config: dict, seed: int, dtype=torch.float32):
    cfg = config_cls(unet_config)
    cfg.set_inference_dtype(dtype, None)
    base = cfg.get_model({}, device=CPU)
    init_weights(base.diffusion_model, seed)
    return wrap(base)


WAN_DIM, WAN_HEADS, WAN_LAYERS, WAN_TEXT_DIM, WAN_CLIP_DIM = 64, 2, 3, 32, 1280
HUNYUAN_DIM, HUNYUAN_HEADS, HUNYUAN_TEXT_DIM, HUNYUAN_VEC_DIM = 64, 2, 32, 32
HUNYUAN_DOUBLE, HUNYUAN_SINGLE = 2, 2


def _wan_config(**extra) -> dict:
    return dict(image_model="wan2.1", model_type="t2v", dim=WAN_DIM, num_heads=WAN_HEADS, num_layers=WAN_LAYERS,
                ffn_dim=128, freq_dim=32, text_dim=WAN_TEXT_DIM, out_dim=16, in_dim=16, patch_size=(1, 2, 2),
                text_len=16, eps=1e-6, **extra)


def tiny_wan_t2v(seed: int = 0, dtype=torch.float32):
    """Wan 2.1 T2V (supported_models.WAN21_T2V): dim 64, 2 heads of 32, 3 blocks, 16 latent channels."""
    import comfy.supported_models
    return _build(comfy.supported_models.WAN21_T2V, _wan_config(), seed, dtype)


def tiny_wan_i2v(seed: int = 0, dtype=torch.float32):
    """Wan 2.1 I2V (supported_models.WAN21_I2V): 36 input channels (noise + mask + image latent) and ``img_emb``,
    which turns CLIP vision tokens (1280 wide) into extra cross-attention keys in front of the text."""
    import comfy.supported_models
    return _build(comfy.supported_models.WAN21_I2V, {**_wan_config(), "model_type": "i2v", "in_dim": 36}, seed, dtype)


def tiny_hunyuan_video(seed: int = 0, dtype=torch.float32):
    """HunyuanVideo (supported_models.HunyuanVideo): hidden 64, 2 heads of 32, 2 double + 2 single blocks, guidance
    embedding (so cfg 1.0 as in real use), text tokens appended after the video tokens in self-attention."""
    import comfy.supported_models
    unet = dict(image_model="hunyuan_video", in_channels=16, out_channels=16, vec_in_dim=HUNYUAN_VEC_DIM,
                context_in_dim=HUNYUAN_TEXT_DIM, hidden_size=HUNYUAN_DIM, mlp_ratio=2.0, num_heads=HUNYUAN_HEADS,
                depth=HUNYUAN_DOUBLE, depth_single_blocks=HUNYUAN_SINGLE, axes_dim=[8, 12, 12], theta=256,
                patch_size=[1, 2, 2], qkv_bias=True, guidance_embed=True, byt5=False, meanflow=False)
    return _build(comfy.supported_models.HunyuanVideo, unet, seed, dtype)


def tiny_flux(seed: int = 0):
    """A tiny Flux (image model): not a video model, the pack must leave it alone."""
    import comfy.supported_models
    unet = dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=32, context_in_dim=32, hidden_size=64,
                mlp_ratio=2.0, num_heads=2, depth=1, depth_single_blocks=1, axes_dim=[8, 12, 12], theta=10000,
                patch_size=2, qkv_bias=True, guidance_embed=True)
    return _build(comfy.supported_models.Flux, unet, seed)


def tiny_hunyuan_image(seed: int = 0):
    """ComfyUI's HunyuanVideo class with a 2D patch (how ComfyUI runs HunyuanImage): an image model."""
    import comfy.supported_models
    unet = dict(image_model="hunyuan_video", in_channels=16, out_channels=16, vec_in_dim=HUNYUAN_VEC_DIM,
                context_in_dim=HUNYUAN_TEXT_DIM, hidden_size=HUNYUAN_DIM, mlp_ratio=2.0, num_heads=HUNYUAN_HEADS,
                depth=1, depth_single_blocks=1, axes_dim=[16, 16], theta=256, patch_size=[2, 2], qkv_bias=True,
                guidance_embed=True, byt5=False, meanflow=False)
    return _build(comfy.supported_models.HunyuanVideo, unet, seed)


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


def hunyuan_conds(seed: int, text_tokens: int = 12, valid_tokens: int = 8):
    """(positive, negative) for HunyuanVideo: a text of ``text_tokens`` of which the last ones are padding
    (``attention_mask`` 1 = keep, 0 = pad, as ComfyUI's Llama text encoder returns it)."""
    gen = torch.Generator().manual_seed(seed)
    mask = torch.zeros(1, text_tokens, dtype=torch.long)
    mask[:, :valid_tokens] = 1
    out = []
    for _ in range(2):
        extra = {"pooled_output": torch.randn(1, HUNYUAN_VEC_DIM, generator=gen), "attention_mask": mask.clone(),
                 "guidance": 6.0}
        out.append([[torch.randn(1, text_tokens, HUNYUAN_TEXT_DIM, generator=gen), extra]])
    return out[0], out[1]


def sample(model, latent, positive, negative, steps: int = 4, cfg: float = 3.0, sampler: str = "euler",
           scheduler: str = "simple", seed: int = 0, **kwargs):
    """ComfyUI's own sampling (comfy.sample.sample) from seeded noise."""
    import comfy.sample
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(seed))
    return comfy.sample.sample(model, noise, steps, cfg, sampler, scheduler, positive, negative, latent, seed=seed,
                               disable_pbar=True, **kwargs)


def pack_nodes():
    """The pack's nodes package (imports ComfyUI: call after setup())."""
    return import_pack("nodes")
