"""One small adapter per model family: which ComfyUI model it is, the token layout of its video self-attention in
one forward call, and how ComfyUI's block metadata numbers its layers.

The layout is read from the forward's arguments by name (bound to the model's own ``forward`` signature, so an
argument ComfyUI inserts does not shift the others) and from the model's structure, never from ComfyUI's version
number. What ComfyUI reports itself (``grid_sizes``, ``img_slice`` in ``transformer_options``) is checked against it
on every call that carries it: a mismatch keeps attention dense with one warning instead of a wrong sparse mask.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch

import comfy.ldm.wan.model as comfy_wan
from comfy.ldm.hunyuan_video.model import HunyuanVideo
from comfy.ldm.wan.model import WanModel

from ..core import BlockLayers, VideoGrid, latent_grid


@dataclass(frozen=True)
class ForwardLayout:
    """The video self-attention of one forward: ``grid`` in the planners' order (video frames, then non-video
    tokens), ``leading_tokens`` of those non-video tokens in front of the video in the model's order, and what
    ComfyUI should report in ``transformer_options`` for it (key -> value), where it reports it."""

    grid: VideoGrid
    leading_tokens: int = 0
    reported: dict = field(default_factory=dict)


class Dense(str):
    """Why a forward's attention stays dense (the message of its one warning)."""


def _frames(tokens, patch_time: int) -> int:
    """Latent frames after patchify of a (B, C, T, H, W) tensor (ComfyUI pads T up to the patch size)."""
    return -(-tokens.shape[2] // patch_time)


def _length(tokens) -> int:
    return tokens.shape[1] if isinstance(tokens, torch.Tensor) and tokens.ndim == 3 else 0


class ModelAdapter:
    """Base: binds a forward's arguments to names. Subclasses give ``family``, ``blocks`` and ``layout``."""

    family = ""

    def __init__(self, diffusion_model):
        self.model = diffusion_model
        self.name = type(diffusion_model).__name__
        signature = inspect.signature(diffusion_model.forward)
        self._signature = signature
        self._extra = next((p.name for p in signature.parameters.values() if p.kind is p.VAR_KEYWORD), None)

    def arguments(self, args, kwargs) -> dict | None:
        """The forward's arguments by name (the DIFFUSION_MODEL wrapper receives them as ``forward`` passes them
        on), extra keyword arguments included; None when they do not fit the signature."""
        try:
            bound = self._signature.bind_partial(*args, **kwargs).arguments
        except TypeError:
            return None
        named = dict(bound.pop(self._extra, None) or {})
        named.update(bound)
        return named

    def forward_layout(self, args, kwargs) -> ForwardLayout | Dense | None:
        """The layout of this forward; ``Dense`` (a reason) for a layout the pack does not take; None for a call
        that is not a video (an image batch)."""
        named = self.arguments(args, kwargs)
        if named is None:
            return Dense(f"{self.name} was called with arguments the pack does not know ({len(args)} positional, "
                         f"{sorted(kwargs)}): this ComfyUI changed the model's forward; attention stays dense")
        x = named.get("x")
        if not isinstance(x, torch.Tensor) or x.ndim != 5:
            return None
        return self.layout(x, named)

    def layout(self, x, named) -> ForwardLayout | Dense:
        raise NotImplementedError

    @property
    def blocks(self) -> BlockLayers:
        raise NotImplementedError


def _wan_class(name: str):
    """A Wan variant's class in this ComfyUI (None where it has none)."""
    return getattr(comfy_wan, name, None)


# Wan variants whose self-attention holds tokens that are not whole frames of the video grid: dense, and why.
_WAN_NOT_WHOLE_FRAMES = {
    "WanModel_S2V": "appends motion-frame tokens at coarser resolutions behind the video",
    "SCAILWanModel": "appends pose tokens (at their own resolution) behind the video",
}


class WanAdapter(ModelAdapter):
    """Wan 2.1 / 2.2 and the variants built on ``WanModel``. Self-attention is the video tokens, frame-major; a few
    inputs add whole frames of the same grid: Fun's reference image (``ref_conv``) one frame in front, Phantom's
    subject frames (``time_dim_concat``) and HuMo's reference latent behind. Cross-attention (text, CLIP image
    tokens) has other key lengths and stays on ComfyUI's attention."""

    family = "wan"

    def layout(self, x, named):
        model = self.model
        for class_name, why in _WAN_NOT_WHOLE_FRAMES.items():
            cls = _wan_class(class_name)
            if cls is not None and isinstance(model, cls):
                return Dense(f"{self.name} {why}: this pack makes only video frames sparse, its attention stays dense")
        if named.get("context_latents"):
            return Dense(f"{self.name} was given in-context reference latents (context_latents), token streams of "
                         "their own sizes behind the video: its attention stays dense")
        pt = model.patch_size[0]
        concat = named.get("time_dim_concat")
        inside = _frames(x, pt) + (0 if concat is None else _frames(concat, pt))  # frames in the patchified latent
        behind = 0
        reference = named.get("reference_latent")
        humo = _wan_class("HumoWanModel")
        if humo is not None and isinstance(model, humo) and reference is not None:
            if reference.ndim != 5 or reference.shape[-2:] != x.shape[-2:]:
                return Dense(f"{self.name}: a reference latent of shape {tuple(reference.shape)} is not frames of "
                             f"the video's size {tuple(x.shape[-2:])}: its attention stays dense")
            behind = _frames(reference, pt)
        front = 1 if model.ref_conv is not None and reference is not None else 0
        grid = latent_grid(x.shape, model.patch_size, extra_frames=inside - _frames(x, pt) + front + behind)
        # ComfyUI's grid_sizes (where reported) is the patchified latent, Phantom's frames included: neither the
        # reference-image frame in front nor HuMo's reference behind.
        return ForwardLayout(grid, reported={"grid_sizes": (inside, grid.height, grid.width)})

    @property
    def blocks(self) -> BlockLayers:
        return BlockLayers(offsets={"double": 0}, count=len(self.model.blocks))

    def cross_attention_lengths(self, named) -> set[int]:
        """Key lengths of the cross-attention calls: the text, and the CLIP image tokens (I2V)."""
        lengths = {_length(named.get("context"))}
        if self.model.img_emb is not None:
            lengths.add(_length(named.get("clip_fea")))
        return lengths - {0}


class HunyuanVideoAdapter(ModelAdapter):
    """HunyuanVideo (and 1.5): one self-attention over the text (LLM text, byT5 glyph tokens, SigLIP image tokens:
    dense rows and columns) and the video, whose reference-latent frames (``ref_latent``) sit in front of it. Up to
    ComfyUI 0.3.x the text came after the video (its double blocks were built ``flipped_img_txt``); since then it
    comes first, with the text padding mask over that prefix."""

    family = "hunyuan"

    def layout(self, x, named):
        model = self.model
        pt = model.patch_size[0]
        reference = named.get("ref_latent")
        front = 0 if reference is None else _frames(reference, pt)
        text = _length(named.get("context"))
        if model.byt5_in is not None:
            text += _length(named.get("txt_byt5"))
        if getattr(model, "vision_in", None) is not None:
            text += _length(named.get("clip_fea"))
        grid = latent_grid(x.shape, model.patch_size, extra_frames=front, text_tokens=text)
        if not self.text_first:
            return ForwardLayout(grid)
        return ForwardLayout(grid, leading_tokens=text, reported={"img_slice": (text, text + grid.video_tokens)})

    @property
    def text_first(self) -> bool:
        blocks = self.model.double_blocks
        return not (len(blocks) and getattr(blocks[0], "flipped_img_txt", False))

    @property
    def blocks(self) -> BlockLayers:
        double = len(self.model.double_blocks)
        return BlockLayers(offsets={"double": 0, "single": double}, count=double + len(self.model.single_blocks))


def adapter_for(diffusion_model) -> ModelAdapter | None:
    """The adapter of a video model the pack knows, None for anything else (image models included)."""
    if isinstance(diffusion_model, WanModel):
        return WanAdapter(diffusion_model)
    if isinstance(diffusion_model, HunyuanVideo) and len(diffusion_model.patch_size) == 3:
        return HunyuanVideoAdapter(diffusion_model)
    return None
