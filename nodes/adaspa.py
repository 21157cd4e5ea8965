"""AdaSpa Search: the settings node of AdaSpa (exact online search of per-head block layouts)."""

from __future__ import annotations

from ..core import AdaSpaSettings, parse_search_steps
from .patch_nodes import CATEGORY, METHOD_TYPE


class AdaSpaSearch:
    """Settings of AdaSpa: which blocks each head keeps is searched exactly at a few steps, then reused."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "recall": ("FLOAT", {
                    "default": 0.8, "min": 0.01, "max": 1.0, "step": 0.01,
                    "tooltip": "Share of the attention mass the kept blocks must hold on the step they are "
                               "searched, every head of a layer pooled (per_head_recall: of each head; 0.8 is the "
                               "paper's). Higher is closer to dense and slower; 1.0 keeps every block (needs "
                               "max_density 1)."}),
                "search_steps": ("STRING", {
                    "default": "0.2, 0.6",
                    "tooltip": "When the exact search runs; the layout found is reused until the next one. Numbers "
                               "below 1 are fractions of the run's steps, from 1 up step indices (0 = the first "
                               "step). The paper searches at steps 10 and 30 of 50 = '0.2, 0.6'. Steps before "
                               "the patch's dense_steps are dense: the first sparse step then searches."}),
                "block_size": ([64, 128], {
                    "default": 64,
                    "tooltip": "Tile size of the layout. 64 (the paper's) follows the attention more finely; 128 "
                               "runs faster and keeps a 4x smaller layout per layer in GPU memory."}),
                "min_density": ("FLOAT", {
                    "default": 0.1, "min": 0.0, "max": 1.0, "step": 0.01,
                    "tooltip": "Each head keeps at least this share of the key blocks (per query block), however "
                               "concentrated its attention. The paper's heads range over 0.1-0.3."}),
                "max_density": ("FLOAT", {
                    "default": 0.3, "min": 0.0, "max": 1.0, "step": 0.01,
                    "tooltip": "Each head keeps at most this share of the key blocks, even when it does not reach "
                               "the recall: bounds the attention time. Must not be below min_density."}),
                "text_dense": ("BOOLEAN", {
                    "default": True,
                    "tooltip": "Video tokens attend to all text tokens (HunyuanVideo mixes its text into "
                               "self-attention; the paper's text sink). Off: text blocks are searched like video "
                               "ones. Wan's S2V motion, SCAIL pose and in-context latent tokens count as text."}),
            },
            "optional": {
                "cluster_heads": ("BOOLEAN", {
                    "default": False,
                    "tooltip": "At each search, a head whose blocks keep less than the recall of its own "
                               "attention is tried on SVG2's k-means clusters (top-p 0.9, 300 / 1000 clusters), its "
                               "kept attention mass measured exactly; if the clusters keep the recall (or 0.2 more "
                               "than the blocks) within max_density, the head runs on SVG2's cluster kernel until "
                               "the next search. Measured on synthetic heads (CPU): attention kept on heads of "
                               "far-apart tokens of one moving object 0.41 -> 0.90; its cost (k-means and a cluster "
                               "launch per such head at each search) is not measured yet, so it is off by default."}),
                "per_head_recall": ("BOOLEAN", {
                    "default": False,
                    "tooltip": "On: every head keeps the fewest blocks that hold the recall of its own attention "
                               "(the paper's criterion). Off: the recall is of every head's attention pooled, each "
                               "next block going to the head it adds the most attention to: the fewest blocks in "
                               "all, closer to dense at the same density (measured on the proxy at density 0.25: "
                               "the video 8.3 dB closer at 4 steps, 2.5 dB at 20 steps)."}),
            },
        }

    RETURN_TYPES = (METHOD_TYPE,)
    RETURN_NAMES = ("method",)
    FUNCTION = "settings"
    CATEGORY = CATEGORY
    DESCRIPTION = ("AdaSpa: the heads keep the fewest blocks that hold the recall of their attention, found by an "
                   "exact search at a few steps and reused in between (Xia et al. 2025).")

    def settings(self, recall, search_steps, block_size, min_density, max_density, text_dense, cluster_heads=False,
                 per_head_recall=False):
        return (AdaSpaSettings(recall=recall, search_steps=parse_search_steps(search_steps),
                               block_size=int(block_size), min_density=min_density, max_density=max_density,
                               text_dense=text_dense, cluster_heads=cluster_heads,
                               per_head_recall=per_head_recall),)
