"""HunyuanVideo (and HunyuanVideo 1.5, the same ComfyUI class)."""

from __future__ import annotations

from ...core import BlockLayers, latent_grid
from .base import ForwardLayout, ModelAdapter, latent_frames, token_count


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
        front = 0 if reference is None else latent_frames(reference, pt)
        text = token_count(named.get("context"))
        if model.byt5_in is not None:
            text += token_count(named.get("txt_byt5"))
        if getattr(model, "vision_in", None) is not None:
            text += token_count(named.get("clip_fea"))
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
