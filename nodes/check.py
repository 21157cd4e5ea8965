"""Sparse Attention Check: measure, during a real run, what the sparse attention changes on the user's own model."""

from __future__ import annotations

import logging

from ..core import CHECK_KEY, CheckSettings, parse_steps
from .bridge import session_of
from .patch_nodes import CATEGORY

log = logging.getLogger("sparse_video_attention")


class SparseAttentionCheck:
    """MODEL (patched) in, MODEL out: a copy whose run also measures, at a few steps, the attention mass each layer
    and head keeps and how far its output moves from exact attention. The Inspector's ``check`` output draws it."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The MODEL output of Sparse Attention Patch. Its output goes to the "
                                               "sampler; the sampled video is the same as without the check."}),
                "steps": ("STRING", {
                    "default": "0.5",
                    "tooltip": "The denoising steps to check: fractions of the run (0.5 = the middle step) or step "
                               "indices, separated by commas. Each checked step costs a few percent of its attention "
                               "time."}),
                "rows": ("INT", {
                    "default": 64, "min": 1, "max": 4096,
                    "tooltip": "Query rows compared with exact attention in every layer and head (spread over the "
                               "video). More rows: a finer measure, a little more time."}),
                "compare_step": ("BOOLEAN", {
                    "default": False,
                    "tooltip": "Also run the first checked step whole, dense and sparse, from the same latent, and "
                               "report the PSNR of the two predictions. Costs one dense step more."}),
                "floor": ("FLOAT", {
                    "default": 0.8, "min": 0.05, "max": 1.0, "step": 0.01,
                    "tooltip": "Layers and heads keeping less than this share of their attention mass are marked "
                               "in the picture and get advice in the log."}),
            },
        }

    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    FUNCTION = "check"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Measures what the sparse attention changes during the run: the attention mass kept per layer and "
                   "head, the error of their output, and advice. Place it between Sparse Attention Patch and the "
                   "sampler; the Inspector's 'check' output draws the result, and the log has it after the run.")

    def check(self, model, steps, rows, compare_step, floor):
        settings = CheckSettings(steps=parse_steps(steps), rows=rows, compare_step=compare_step, floor=floor)
        if session_of(model) is None:
            log.warning("sparse attention: Sparse Attention Check got a model without a Sparse Attention Patch: "
                        "there is nothing to check, the model passes through")
            return (model,)
        checked = model.clone()
        checked.model_options.setdefault("transformer_options", {})[CHECK_KEY] = settings
        return (checked,)
