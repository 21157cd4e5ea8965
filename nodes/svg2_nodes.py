"""SVG2 K-Means Settings: the settings node of Sparse VideoGen2 (semantic-aware permutation)."""

from __future__ import annotations

from ..core import SVG2_PRESETS, SVG2Settings
from ..core.svg2 import MAX_CLUSTERS, MAX_ITERATIONS
from .patch_nodes import CATEGORY, METHOD_TYPE

CUSTOM = "custom"
DEFAULTS = SVG2_PRESETS["wan_720p"]


class SVG2KMeansSettings:
    """Settings of SVG2: k-means clusters of queries and keys per head, top-p key-cluster selection."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "preset": ([*SVG2_PRESETS, CUSTOM], {
                    "default": "wan_720p",
                    "tooltip": "wan_720p / hunyuan_720p: the reference settings for that model (300 / 400 query "
                               "clusters, 1000 key clusters, top-p 0.9, min ratio 0.10, 50 then 2 iterations). "
                               "turbo: faster, a little further from dense (top-p 0.8, min ratio 0.05, 20 then 1 "
                               "iterations). custom: the values below; any other preset ignores them."}),
                "query_clusters": ("INT", {
                    "default": DEFAULTS.query_clusters, "min": 1, "max": MAX_CLUSTERS,
                    "tooltip": "k-means clusters of the queries, per head. More: finer groups that share a key "
                               "selection (closer to dense), and more k-means work. At most the video's tokens."}),
                "key_clusters": ("INT", {
                    "default": DEFAULTS.key_clusters, "min": 1, "max": MAX_CLUSTERS,
                    "tooltip": "k-means clusters of the keys, per head. More: the kept keys follow the attention "
                               "more closely, and more k-means work. At most the video's tokens."}),
                "top_p": ("FLOAT", {
                    "default": DEFAULTS.top_p, "min": 0.01, "max": 1.0, "step": 0.01,
                    "tooltip": "Estimated attention mass each query cluster keeps. Lower is sparser and faster; "
                               "1.0 keeps everything (dense)."}),
                "min_key_ratio": ("FLOAT", {
                    "default": DEFAULTS.min_key_ratio, "min": 0.0, "max": 1.0, "step": 0.01,
                    "tooltip": "Every query cluster keeps at least this share of the key clusters, however peaked "
                               "its attention. Higher is safer and slower."}),
                "first_iterations": ("INT", {
                    "default": DEFAULTS.first_iterations, "min": 1, "max": MAX_ITERATIONS,
                    "tooltip": "k-means iterations on each layer's first sparse step of a run (from scratch). "
                               "More: better clusters once, at a one-time cost."}),
                "later_iterations": ("INT", {
                    "default": DEFAULTS.later_iterations, "min": 1, "max": MAX_ITERATIONS,
                    "tooltip": "k-means iterations on every later step, starting from the previous step's "
                               "centroids. Each one costs time on every sparse step."}),
            }
        }

    RETURN_TYPES = (METHOD_TYPE,)
    RETURN_NAMES = ("method",)
    FUNCTION = "settings"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Sparse VideoGen2: clusters queries and keys by meaning (k-means), keeps per query cluster the key "
                   "clusters holding top_p of its attention, and runs attention on those cluster blocks.")

    def settings(self, preset, query_clusters, key_clusters, top_p, min_key_ratio, first_iterations,
                 later_iterations):
        if preset == CUSTOM:
            return (SVG2Settings(query_clusters=query_clusters, key_clusters=key_clusters, top_p=top_p,
                                 min_key_ratio=min_key_ratio, first_iterations=first_iterations,
                                 later_iterations=later_iterations),)
        if preset not in SVG2_PRESETS:
            raise ValueError(f"preset must be one of {[*SVG2_PRESETS, CUSTOM]}, got {preset!r}")
        return (SVG2_PRESETS[preset],)
