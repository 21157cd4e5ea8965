"""One small adapter per model family: which ComfyUI model it is, the token layout of its video self-attention in
one forward, which attention calls are that self-attention, and how ComfyUI's block metadata numbers its layers.
A family is added here and nowhere else (the bridge asks ``adapter_for``). Families are told apart by ComfyUI's own
model classes, never by file names."""

from __future__ import annotations

from comfy.ldm.hunyuan_video.model import HunyuanVideo
from comfy.ldm.wan.model import WanModel

from .base import Dense, ForwardLayout, ModelAdapter
from .hunyuan_video import HunyuanVideoAdapter
from .kandinsky5 import Kandinsky5Adapter, is_video_model as is_kandinsky5_video
from .ltx_av import LTXAVAdapter
from .wan import WanAdapter

try:  # LTX-2 (ComfyUI's LTXAV): ComfyUI 0.3.64 has no audio-video LTX model
    from comfy.ldm.lightricks.av_model import LTXAVModel
except ImportError:
    LTXAVModel = None

__all__ = ["Dense", "ForwardLayout", "ModelAdapter", "adapter_for"]


def adapter_for(diffusion_model) -> ModelAdapter | None:
    """The adapter of a video model the pack knows, None for anything else (image models included)."""
    if isinstance(diffusion_model, WanModel):
        return WanAdapter(diffusion_model)
    if isinstance(diffusion_model, HunyuanVideo) and len(diffusion_model.patch_size) == 3:
        return HunyuanVideoAdapter(diffusion_model)
    if LTXAVModel is not None and isinstance(diffusion_model, LTXAVModel):
        return LTXAVAdapter(diffusion_model)
    if is_kandinsky5_video(diffusion_model):
        return Kandinsky5Adapter(diffusion_model)
    return None
