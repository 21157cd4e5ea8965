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
    ComfyUI should report in ``transformer_options`` for it (key -> value), where it reports it.

    For a model whose blocks report no block metadata: ``call_layers``, the block of each video self-attention call
    in call order where some blocks make none (None: the n-th call is layer n); ``other_self_attention``, the
    lengths of the self-attention calls that are not the video's (another stream's), so that any other length is a
    layout the pack did not understand (None: not checked)."""

    grid: VideoGrid
    leading_tokens: int = 0
    reported: dict = field(default_factory=dict)
    call_layers: tuple | None = None
    other_self_attention: frozenset | None = None


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
        x = self.video_latent(named)
        if not isinstance(x, torch.Tensor) or x.ndim != 5:
            return None
        return self.layout(x, named)

    def video_latent(self, named):
        """The (B, C, T, H, W) video latent among the forward's arguments."""
        return named.get("x")

    def layout(self, x, named) -> ForwardLayout | Dense:
        raise NotImplementedError

    def length_collision(self, named, grid: VideoGrid) -> str | None:
        """Why this forward's video self-attention cannot be told from another attention call of the same shape
        (a cross-attention or another stream as long as the video), or None: then it stays dense, with this warning."""
        return None

    def transformer_options(self, args, kwargs) -> dict:
        """The ``transformer_options`` a forward was called with, wherever the call puts them."""
        where = self._options_position(args, kwargs)
        value = args[where] if isinstance(where, int) else kwargs.get("transformer_options")
        return value if isinstance(value, dict) else {}

    def with_transformer_options(self, args, kwargs, options: dict) -> tuple[tuple, dict]:
        """The forward's arguments with its ``transformer_options`` replaced by ``options``, in the same place."""
        where = self._options_position(args, kwargs)
        if isinstance(where, int):
            return (*args[:where], options, *args[where + 1:]), kwargs
        return args, {**kwargs, "transformer_options": options}

    def _options_position(self, args, kwargs) -> int | None:
        """The index of ``transformer_options`` among the positional arguments, None when it is a keyword (or absent).
        From the forward's signature: ComfyUI's wrappers pass the forward's arguments on in its order."""
        if "transformer_options" in kwargs:
            return None
        names = [p.name for p in self._signature.parameters.values()
                 if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        if "transformer_options" in names and names.index("transformer_options") < len(args):
            return names.index("transformer_options")
        if args and isinstance(args[-1], dict):  # a forward without it in its signature that takes it last
            return len(args) - 1
        return None

    @property
    def blocks(self) -> BlockLayers:
        raise NotImplementedError
