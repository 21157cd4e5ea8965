"""The proxy video model: ComfyUI's own WanModel at a small size, trained in pixel space (benchmarks/train_proxy.py).

Real Wan / HunyuanVideo weights are tens of gigabytes; the quality benchmark needs a model whose attention was
learned, so the project trains this one: 16 RGB frames of 64 x 64 at patch (1, 2, 2) = 16,384 tokens (128 blocks
of 128 per attention row), 8 Wan blocks of width 256 (4 heads of 64), conditioned on a class (a training clip, or
"procedural") through Wan's text cross-attention, so classifier-free guidance works as in the real models.

The weight file (safetensors) holds the WanModel state dict, the class contexts under ``proxy.class_context``
and, in its metadata, the config and the class names. Loading builds the model through ComfyUI's model classes
(supported_models config -> model_base.WAN21 -> load_model_weights), the path ComfyUI's loaders take; only the
config is given instead of detected, since ComfyUI's detection assumes real Wan sizes (128-wide heads, T5 text).

Needs ComfyUI importable (``comfy`` on sys.path): see ``use_comfyui``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import comfy_env  # noqa: E402  (finds and imports ComfyUI; nothing of it at import time)

WEIGHTS = Path(__file__).resolve().parent / "proxy" / "wan_proxy.safetensors"
REGENERATE = ("regenerate it with: python benchmarks/train_proxy.py --data <clips.pt> --out "
              "benchmarks/proxy/wan_proxy.safetensors (see benchmarks/proxy/MODEL_CARD.md)")
CONTEXT_KEY = "proxy.class_context"
NULL_CLASS = 0  # the unconditional context (trained by dropping the class 10% of the time)
PROCEDURAL_CLASS = 1

UNET = dict(image_model="wan2.1", model_type="t2v", dim=256, ffn_dim=640, num_heads=4, num_layers=8, freq_dim=256,
            text_dim=64, text_len=4, in_dim=3, out_dim=3, patch_size=(1, 2, 2), eps=1e-6)
FRAMES, SIZE = 16, 64
SHIFT = 3.0  # flow shift of the sigma schedule (Wan uses 8 at 720p; small pixel videos need less)


def use_comfyui(path: str | os.PathLike | None = None) -> Path:
    """Put ComfyUI on sys.path and import it, found where the tests find it (``path`` if given, else $COMFYUI_PATH,
    the folder two levels up, ~/comfy/ComfyUI: tests/comfy_env.py); FileNotFoundError saying where it looked."""
    if path is not None:
        os.environ[comfy_env.ENV_VAR] = str(Path(path).expanduser())
    root, note = comfy_env.setup()
    if root is None:
        raise FileNotFoundError(f"{note}; pass --comfyui PATH or set {comfy_env.ENV_VAR} to a ComfyUI source folder")
    return root


def _config_class():
    import comfy.latent_formats
    import comfy.supported_models

    class ProxyPixels(comfy.latent_formats.LatentFormat):
        """RGB video in [-1, 1] is the 'latent': no VAE."""
        latent_channels = 3
        latent_dimensions = 3

    class WanProxy(comfy.supported_models.WAN21_T2V):
        sampling_settings = {"shift": SHIFT}
        latent_format = ProxyPixels

    return WanProxy


def build(dtype=torch.float32, device="cpu", unet: dict | None = None):
    """An untrained proxy as ComfyUI's BaseModel (model_base.WAN21); its WanModel is ``.diffusion_model``."""
    config = _config_class()(dict(unet or UNET))
    config.set_inference_dtype(dtype, None)
    return config.get_model({}, device=device)


def save(path, diffusion_model: torch.nn.Module, class_context: torch.Tensor, class_names: list[str],
         info: dict, dtype=torch.bfloat16) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in diffusion_model.state_dict().items()}
    tensors[CONTEXT_KEY] = class_context.detach().to("cpu", dtype).contiguous()
    meta = {"unet": json.dumps({**UNET, "patch_size": list(UNET["patch_size"])}), "classes": json.dumps(class_names),
            "frames": str(FRAMES), "size": str(SIZE), "shift": str(SHIFT), "info": json.dumps(info)}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=meta)


class Proxy:
    """The loaded proxy: a ComfyUI ModelPatcher around model_base.WAN21, the class contexts and names."""

    def __init__(self, patcher, class_context: torch.Tensor, class_names: list[str], meta: dict):
        self.model = patcher
        self.class_context = class_context
        self.class_names = class_names
        self.meta = meta

    def context(self, cls: int) -> torch.Tensor:
        """(1, tokens, text_dim) cross-attention context of class ``cls`` (0: unconditional)."""
        if not 0 <= cls < len(self.class_names):
            raise ValueError(f"class must be in [0, {len(self.class_names) - 1}], got {cls}")
        return self.class_context[cls][None].float()

    def conds(self, cls: int):
        """(positive, negative) in ComfyUI's conditioning format: the class against the unconditional context."""
        return [[self.context(cls), {}]], [[self.context(NULL_CLASS), {}]]


def inference_dtype(device) -> torch.dtype:
    """bf16 on a GPU (what video models run in, and what the sparse kernel takes), float32 on the CPU."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def load(path=WEIGHTS, device="cpu", dtype=torch.float32) -> Proxy:
    """Load the shipped proxy; FileNotFoundError / ValueError naming the file and how to regenerate it."""
    import comfy.model_patcher
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"proxy weights not found: {path}; {REGENERATE}")
    try:
        from safetensors import safe_open
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as why:
        raise ValueError(f"proxy weights {path} are corrupt or not a safetensors file ({why}); {REGENERATE}") from why
    if CONTEXT_KEY not in state or "unet" not in meta:
        raise ValueError(f"{path} is not a proxy weight file (no {CONTEXT_KEY} / config metadata); {REGENERATE}")
    unet = json.loads(meta["unet"])
    unet["patch_size"] = tuple(unet["patch_size"])
    class_context = state.pop(CONTEXT_KEY)
    base = build(dtype=dtype, device=device, unet=unet)
    missing, unexpected = base.diffusion_model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"proxy weights {path} do not match the config in their metadata (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}); {REGENERATE}")
    device = torch.device(device)
    patcher = comfy.model_patcher.ModelPatcher(base, load_device=device, offload_device=device)
    return Proxy(patcher, class_context.to(device), json.loads(meta["classes"]), meta)


def sample(proxy: Proxy, model, cls: int, seed: int, steps: int = 20, cfg: float = 4.0, frames: int = FRAMES,
           size: int = SIZE, sampler: str = "euler", scheduler: str = "simple", callback=None) -> torch.Tensor:
    """A video (1, 3, frames, size, size) in [-1, 1] through ComfyUI's sampler, from ``model`` (the proxy's
    ModelPatcher, or a patched clone of it)."""
    import comfy.sample

    latent = torch.zeros(1, 3, frames, size, size)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(seed))
    positive, negative = proxy.conds(cls)
    out = comfy.sample.sample(model, noise, steps, cfg, sampler, scheduler, positive, negative, latent, seed=seed,
                              callback=callback, disable_pbar=True)
    return out.float().clamp(-1, 1)


def frame_strip(video: torch.Tensor, every: int = 3) -> torch.Tensor:
    """Every ``every``-th frame of a (3, F, S, S) video in [-1, 1], side by side: uint8 (S, S * frames, 3) on the
    CPU, for pictures."""
    frames = ((video.float() + 1) * 127.5).round().clamp(0, 255).byte().permute(1, 2, 3, 0).cpu()[::every]
    return torch.cat(list(frames), dim=1)
