"""Sparse Attention Inspector: pictures of what the sparse attention did in the patched model's last sampling run."""

from __future__ import annotations

import logging

from ..core import report
from .bridge import session_of
from .patch_nodes import CATEGORY

log = logging.getLogger("sparse_video_attention")


class SparseAttentionInspector:
    """MODEL (patched, after a run) in; four IMAGEs out: the block layout of one layer, the density per step and
    layer, the measured attention time against dense (when verbose timed it), and what the Sparse Attention Check
    measured (when the run had one)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The MODEL output of Sparse Attention Patch: the same model the sampler "
                                               "used. The Inspector shows that model's last sampling run."}),
                "samples": ("LATENT", {"tooltip": "The sampler's LATENT output. Not read: it makes the Inspector run "
                                                  "after the sampler, and again after every new run."}),
                "layer": ("INT", {
                    "default": 1, "min": 0, "max": 200,
                    "tooltip": "Which transformer block's layout to draw (0 = the first). Blocks below dense_layers "
                               "always run dense; a number past the last block shows the last one."}),
                "head": ("INT", {
                    "default": 0, "min": 0, "max": 200,
                    "tooltip": "Which attention head to draw. Radial layouts are shared by all heads, so this changes "
                               "nothing for it; per-head methods (SVG, SVG2, AdaSpa) will use it."}),
                "max_size": ("INT", {
                    "default": report.DEFAULT_SIZE, "min": 256, "max": 2048, "step": 64,
                    "tooltip": "Width of the pictures in pixels. Layouts with more tiles than pixels show the fraction "
                               "of tiles kept per pixel."}),
            },
        }

    RETURN_TYPES = ("IMAGE", "IMAGE", "IMAGE", "IMAGE")
    RETURN_NAMES = ("layout", "density", "timing", "check")
    OUTPUT_TOOLTIPS = ("The block layout of the chosen layer: kept tiles bright, frame boundaries as lines.",
                       "The density each denoising step and layer ran at (1 = dense).",
                       "Measured attention time per step against dense (turn on verbose in the patch to measure).",
                       "The attention mass each layer and head kept at the checked steps, the worst framed, with "
                       "advice (wire Sparse Attention Check before the sampler).")
    FUNCTION = "inspect"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Pictures of the last sampling run of a model patched by Sparse Attention Patch: the sparse "
                   "layout, the density per step and layer, and the attention time. Connect its outputs to Preview "
                   "Image.")

    def inspect(self, model, samples, layer, head, max_size):
        get_attachment = getattr(model, "get_attachment", None)
        session = session_of(model) if callable(get_attachment) else None
        try:
            images = report.inspect(session, layer=layer, head=head, max_size=max_size)
        except Exception as why:  # a diagnostics picture must never fail a workflow
            log.exception("sparse attention: the Inspector could not draw the last run")
            card = report.message_image("The Inspector could not draw the last run",
                                        [f"{type(why).__name__}: {why}", "The log has the details."], max_size)
            images = [card] * 4
        return tuple(report.to_image_tensor(im) for im in images)
