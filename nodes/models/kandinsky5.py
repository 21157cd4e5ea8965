"""Kandinsky 5 video (Lite and Pro), in a ComfyUI that has it (0.3.64 has not)."""

from __future__ import annotations

import comfy.supported_models

from ...core import BlockLayers, latent_grid
from .base import Dense, ForwardLayout, ModelAdapter, token_count

try:
    from comfy.ldm.kandinsky5.model import Kandinsky5
except ImportError:  # a ComfyUI from before Kandinsky 5 (0.3.x)
    Kandinsky5 = None


def is_video_model(diffusion_model) -> bool:
    """Kandinsky 5 video. ComfyUI builds Kandinsky 5 image on the same diffusion model class; it picks
    ``supported_models.Kandinsky5Image`` by that class's ``unet_config`` (model_dim, visual_embed_dim), which is
    read from ComfyUI here, so the image model passes through as ComfyUI's own detection tells them apart."""
    if Kandinsky5 is None or not isinstance(diffusion_model, Kandinsky5):
        return False
    image = getattr(comfy.supported_models, "Kandinsky5Image", None)
    if image is None:  # a ComfyUI with the video models only
        return True
    sizes = {key: value for key, value in image.unet_config.items() if key != "image_model"}
    return not all(getattr(diffusion_model, key, None) == value for key, value in sizes.items())


class Kandinsky5Adapter(ModelAdapter):
    """Kandinsky 5 video: the text runs through blocks of its own (self-attention over the text alone), then every
    visual block attends over the video tokens alone, frame-major in raster order after a (1, 2, 2) patchify, and
    cross-attends to the text. An I2V start image replaces the first latent frame (``time_dim_replace``) and its
    mask adds input channels: neither adds tokens. ComfyUI reports no layout of its own (no ``grid_sizes``)."""

    family = "kandinsky5"

    def layout(self, x, named):
        if type(self.model) is not Kandinsky5:
            return Dense(f"{self.name} is a variant of ComfyUI's Kandinsky5 the pack does not know (where its tokens "
                         "sit in self-attention): its attention stays dense")
        return ForwardLayout(latent_grid(x.shape, self.model.patch_size))

    def length_collision(self, named, grid):
        # The text blocks' self-attention and the cross-attention would then look like the video's: a sparse mask
        # on them would be wrong.
        if token_count(named.get("context")) == grid.total_tokens:
            return (f"{self.name}: the video has {grid.total_tokens} tokens, as many as the text; its attention stays "
                    "dense (change the width or height by 16 pixels, or the length by 4 frames, to get sparse "
                    "attention)")
        return None

    @property
    def blocks(self) -> BlockLayers:
        return BlockLayers(offsets={"double": 0}, count=len(self.model.visual_transformer_blocks))
