"""SVG Settings: the settings node of Sparse VideoGen (spatial / temporal heads, profiled online; optionally semantic
heads on SVG2's clusters)."""

from __future__ import annotations

from ..core import SVG_PRESETS, SVGSettings
from .patch_nodes import CATEGORY, METHOD_TYPE

_DEFAULTS = SVGSettings()
_REFERENCE = "; ".join(preset.text() for preset in SVG_PRESETS)


class SVGSettingsNode:
    """Settings of SVG: per head, a spatial layout (nearby frames) or a temporal one (same position across frames)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "sparsity": ("FLOAT", {
                    "default": _DEFAULTS.sparsity, "min": 0.01, "max": 0.99, "step": 0.01,
                    "tooltip": "Fraction of the attention computed (the reference's name for it): 0.25 computes a "
                               "quarter. Lower is faster, higher is closer to dense. Reference settings: "
                               + _REFERENCE + "."}),
                "sample_fraction": ("FLOAT", {
                    "default": _DEFAULTS.sample_fraction, "min": 0.0001, "max": 1.0, "step": 0.0001,
                    "tooltip": "Fraction of the video queries profiled to decide whether each head is spatial or "
                               "temporal (at least 64 rows, as the reference; 0.001 is 76 rows at 720p). More rows "
                               "decide more reliably and cost more time."}),
                "reprofile_every": ("INT", {
                    "default": _DEFAULTS.reprofile_every, "min": 1, "max": 1000,
                    "tooltip": "Profile the heads again every this many denoising steps (1 = every step, as the "
                               "reference). Larger is a little faster; head classes change slowly."}),
                "block_size": ([128, 64], {
                    "default": _DEFAULTS.block_size,
                    "tooltip": "Tile size of the sparse layouts. 128 is fastest; 64 follows the bands more finely."}),
                "attention_sink": ("BOOLEAN", {
                    "default": _DEFAULTS.attention_sink,
                    "tooltip": "Spatial heads also attend to the whole first frame. The reference does it for Wan, "
                               "not for HunyuanVideo."}),
            },
            "optional": {
                "semantic_heads": ("BOOLEAN", {
                    "default": _DEFAULTS.semantic_heads,
                    "tooltip": "A third class of heads: a head that neither layout serves (on the sampled queries "
                               "both keep under 75% of the attention mass) but SVG2's k-means clusters do runs on "
                               "SVG2's cluster kernel (top-p 0.9, 300 / 1000 clusters). Measured on synthetic heads "
                               "(CPU): attention kept on such heads 0.40 -> 0.90; its cost (k-means of those heads at "
                               "each profile) is not measured yet, so it is off by default."}),
            },
        }

    RETURN_TYPES = (METHOD_TYPE,)
    RETURN_NAMES = ("method",)
    FUNCTION = "settings"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Sparse VideoGen: each head runs a spatial or a temporal sparse layout, chosen online by comparing "
                   "both with exact attention on a few sampled queries. Set the patch's dense_steps and dense_layers "
                   "as the reference does: " + _REFERENCE + ".")

    def settings(self, sparsity, sample_fraction, reprofile_every, block_size, attention_sink,
                 semantic_heads=_DEFAULTS.semantic_heads):
        return (SVGSettings(sparsity=sparsity, sample_fraction=sample_fraction, reprofile_every=reprofile_every,
                            block_size=int(block_size), attention_sink=attention_sink, semantic_heads=semantic_heads),)
