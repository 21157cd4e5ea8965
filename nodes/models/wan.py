"""Wan 2.1 / 2.2 and the variants ComfyUI builds on ``WanModel``."""

from __future__ import annotations

import comfy.ldm.wan.model as comfy_wan

from ...core import BlockLayers, latent_grid
from .base import Dense, ForwardLayout, ModelAdapter, latent_frames, token_count


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
        inside = latent_frames(x, pt) + (0 if concat is None else latent_frames(concat, pt))  # in the patchified latent
        behind = 0
        reference = named.get("reference_latent")
        humo = _wan_class("HumoWanModel")
        if humo is not None and isinstance(model, humo) and reference is not None:
            if reference.ndim != 5 or reference.shape[-2:] != x.shape[-2:]:
                return Dense(f"{self.name}: a reference latent of shape {tuple(reference.shape)} is not frames of "
                             f"the video's size {tuple(x.shape[-2:])}: its attention stays dense")
            behind = latent_frames(reference, pt)
        front = 1 if model.ref_conv is not None and reference is not None else 0
        extra = inside - latent_frames(x, pt) + front + behind
        grid = latent_grid(x.shape, model.patch_size, extra_frames=extra)
        # ComfyUI's grid_sizes (where reported) is the patchified latent, Phantom's frames included: neither the
        # reference-image frame in front nor HuMo's reference behind.
        return ForwardLayout(grid, reported={"grid_sizes": (inside, grid.height, grid.width)})

    @property
    def blocks(self) -> BlockLayers:
        return BlockLayers(offsets={"double": 0}, count=len(self.model.blocks))

    def cross_attention_lengths(self, named) -> set[int]:
        """Key lengths of the cross-attention calls: the text, and the CLIP image tokens (I2V)."""
        lengths = {token_count(named.get("context"))}
        if self.model.img_emb is not None:
            lengths.add(token_count(named.get("clip_fea")))
        return lengths - {0}
