"""What every model adapter gives the bridge: the token layout of one forward, and how ComfyUI's block metadata
numbers the model's layers.

The layout is read from the forward's arguments by name (bound to the model's own ``forward`` signature, so an
argument ComfyUI inserts does not shift the others) and from the model's structure, never from ComfyUI's version
number. What ComfyUI reports itself (``grid_sizes``, ``img_slice`` in ``transformer_options``) is checked against it
on every call that carries it: a mismatch keeps attention dense with one warning instead of a wrong sparse mask.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch

from ...core import BlockLayers, VideoGrid


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


def latent_frames(tokens, patch_time: int) -> int:
    """Latent frames after patchify of a (B, C, T, H, W) tensor (ComfyUI pads T up to the patch size)."""
    return -(-tokens.shape[2] // patch_time)


def token_count(tokens) -> int:
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
