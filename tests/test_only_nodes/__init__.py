"""A tiny ComfyUI custom node pack used only by the tests (tests/server_fixture.py installs it next to the pack).

* ``SVATestWanConditioning``: seeded random text embeddings shaped like umT5's output for Wan (4096 wide), so a
  workflow can sample a Wan model without a text encoder.
* ``SVATestSparseReport`` (output node): after sampling, reports what the Sparse Attention Patch did in that run
  (the session's sparse / dense calls, mean density) and what ComfyUI loaded (model config class, diffusion model
  class and size). It lands in ``/history/<prompt_id>`` as the node's ``ui`` output.

Never shipped to users: the pack's own ``__init__.py`` does not import this folder.
"""

from __future__ import annotations

import importlib
import sys

import torch

PATCH_NODE = "SparseAttentionPatch"


def _pack_nodes_module():
    """The pack's ``nodes`` package as ComfyUI loaded it (under a module name derived from its folder path)."""
    for name, module in list(sys.modules.items()):
        mapping = getattr(module, "NODE_CLASS_MAPPINGS", None)
        if isinstance(mapping, dict) and PATCH_NODE in mapping and hasattr(module, "__path__"):
            nodes = importlib.import_module(f"{name}.nodes")
            if hasattr(nodes, "session_of"):
                return nodes
    raise RuntimeError(f"no loaded custom node package registers {PATCH_NODE}: is the pack installed?")


class SVATestWanConditioning:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1, "tooltip": "Seed of the random embeddings."}),
            "tokens": ("INT", {"default": 16, "min": 1, "max": 512, "tooltip": "Number of text tokens."}),
            "width": ("INT", {"default": 4096, "min": 1, "max": 8192, "tooltip": "Embedding width (Wan: 4096)."}),
        }}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "encode"
    CATEGORY = "testing/sparse_video_attention"

    def encode(self, seed, tokens, width):
        gen = torch.Generator().manual_seed(seed)
        return ([[torch.randn(1, tokens, width, generator=gen), {}]],)


class SVATestSparseReport:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The model out of Sparse Attention Patch."}),
            "samples": ("LATENT", {"tooltip": "The sampler's output (runs this node after sampling)."}),
        }}

    RETURN_TYPES = ()
    FUNCTION = "report"
    OUTPUT_NODE = True
    CATEGORY = "testing/sparse_video_attention"

    def report(self, model, samples):
        session = _pack_nodes_module().session_of(model)
        latent = samples["samples"]
        diffusion_model = model.model.diffusion_model
        info = {
            "patched": session is not None,
            "model_config": type(model.model.model_config).__name__,
            "diffusion_model": type(diffusion_model).__name__,
            "dim": int(getattr(diffusion_model, "dim", 0)),
            "num_heads": int(getattr(diffusion_model, "num_heads", 0)),
            "num_layers": len(getattr(diffusion_model, "blocks", [])),
            "latent_shape": list(latent.shape),
            "latent_finite": bool(torch.isfinite(latent).all()),
            "latent_std": float(latent.float().std()),
        }
        if session is not None:
            stats = session.stats
            info.update(sparse_calls=stats.sparse_calls, dense_calls=stats.dense_calls,
                        mean_density=float(stats.mean_density), fallbacks=dict(stats.fallbacks),
                        backend=session.backend)
        return {"ui": {"sparse_attention": [info]}}


NODE_CLASS_MAPPINGS = {
    "SVATestWanConditioning": SVATestWanConditioning,
    "SVATestSparseReport": SVATestSparseReport,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "SVATestWanConditioning": "SVA test: Wan conditioning (random)",
    "SVATestSparseReport": "SVA test: sparse attention report",
}
