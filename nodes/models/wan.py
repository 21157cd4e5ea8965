"""Wan 2.1 / 2.2 and the variants ComfyUI builds on ``WanModel``."""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, replace

from ...core import BlockLayers, latent_grid
from .base import Dense, ForwardLayout, ModelAdapter, latent_frames, token_count


def _wan_class(module: str, name: str):
    """A Wan variant's class in comfy.ldm.wan.<module> (None where this ComfyUI has none)."""
    try:
        return getattr(importlib.import_module(f"comfy.ldm.wan.{module}"), name, None)
    except ImportError:
        return None


def _conv_sizes(conv, sizes) -> tuple:
    """The output sizes (T, H, W) of a patchifying Conv3d over an input of ``sizes`` (T, H, W)."""
    return tuple((n + 2 * p - d * (k - 1) - 1) // s + 1
                 for n, k, s, p, d in zip(sizes, conv.kernel_size, conv.stride, conv.padding, conv.dilation))


def _conv_tokens(conv, sizes) -> int:
    return math.prod(_conv_sizes(conv, sizes))


def _framepack_tokens(packer, motion) -> int:
    """The motion tokens of S2V's FramePackMotioner: it zero-pads the motion latents in front to sum(zip_frame_buckets)
    frames and patchifies the nearest bucket by ``proj``, the next by ``proj_2x``, the farthest by ``proj_4x`` (the
    model calls it with add_last_motion=2, which drops none of them)."""
    height, width = motion.shape[-2:]
    convs = (packer.proj, packer.proj_2x, packer.proj_4x)
    return sum(_conv_tokens(conv, (frames, height, width)) for frames, conv in zip(packer.zip_frame_buckets, convs))


def _padded(sizes, patch) -> tuple:
    """``sizes`` padded up to a multiple of the patch size, as ComfyUI's pad_to_patch_size pads a latent."""
    return tuple(-(-n // p) * p for n, p in zip(sizes, patch))


def _passes_attention_options(cls) -> bool:
    """Whether ``cls.forward_orig`` hands ``transformer_options`` on to what it calls (its blocks), read off the
    keyword names of its calls: ComfyUI 0.3.x's S2V does not, so the attention hook never sees its calls."""
    return any(isinstance(c, tuple) and "transformer_options" in c for c in cls.forward_orig.__code__.co_consts)


@dataclass(frozen=True)
class _Additions:
    """What a variant puts into its self-attention sequence beside the latent it is given: whole frames of the
    video grid concatenated to the latent before patchify (in ComfyUI's ``grid_sizes``), whole frames patchified on
    their own (not in it), and non-video tokens behind everything (dense rows and columns for the planners)."""

    frames_in_latent: int = 0
    frames_apart: int = 0
    tokens_behind: int = 0


class WanAdapter(ModelAdapter):
    """Wan 2.1 / 2.2 and the variants built on ``WanModel``. Self-attention is the video tokens, frame-major, plus:

    * whole frames of the same grid: Fun's reference image (``ref_conv``) one frame in front, SCAIL's reference
      frames in front, Phantom's subject frames (``time_dim_concat``) and HuMo's or S2V's reference frames behind;
    * tokens of other sizes behind the video, taken as non-video tokens: S2V's FramePack motion (three resolutions),
      SCAIL's pose latents (their own patch embedding, often at half resolution), in-context latents
      (``context_latents``, each stream at its own size).

    Animate 2 given pose frames runs its generation attention per frame (each frame's queries against every token and
    one pose frame), not one self-attention over a grid: dense. Cross-attention (text, CLIP image tokens) has other
    key lengths and stays on ComfyUI's attention."""

    family = "wan"

    def __init__(self, diffusion_model):
        super().__init__(diffusion_model)
        self._reaches_hook = _passes_attention_options(type(diffusion_model))
        self._additions = self._variant_reader()

    def _variant_reader(self):
        """The method that reads what this model's variant adds to its self-attention sequence."""
        variants = {("model", "WanModel_S2V"): self._s2v, ("model", "SCAILWanModel"): self._scail,
                    ("model", "HumoWanModel"): self._humo, ("model_animate2", "WanAnimate2Model"): self._animate2}
        for (module, name), read in variants.items():
            cls = _wan_class(module, name)
            if cls is not None and isinstance(self.model, cls):
                return read
        return self._wan

    def layout(self, x, named):
        model = self.model
        if not self._reaches_hook:
            return Dense(f"{self.name} does not pass ComfyUI's attention options to its blocks in this ComfyUI: the "
                         "patch never sees its attention, which stays dense")
        added = self._additions(x, named)
        if isinstance(added, Dense):
            return added
        pt = model.patch_size[0]
        concat = named.get("time_dim_concat")
        patchified = latent_frames(x, pt) + (0 if concat is None else latent_frames(concat, pt))
        in_latent = patchified + added.frames_in_latent
        extra = in_latent - latent_frames(x, pt) + added.frames_apart
        grid = latent_grid(x.shape, model.patch_size, extra_frames=extra, text_tokens=added.tokens_behind)
        # ComfyUI's grid_sizes (where reported) is the patchified latent: Phantom's and SCAIL's frames in it, neither
        # the frames patchified apart nor the tokens behind.
        return ForwardLayout(grid, reported={"grid_sizes": (in_latent, grid.height, grid.width)})

    def _wan(self, x, named) -> _Additions:
        """WanModel (and VACE, Camera, Animate): Fun's reference image as one frame in front, in-context latents
        (each padded to the patch, then patchified like the video) behind."""
        model = self.model
        front = 1 if model.ref_conv is not None and named.get("reference_latent") is not None else 0
        streams = named.get("context_latents") or ()
        behind = sum(_conv_tokens(model.patch_embedding, _padded(lat.shape[2:], model.patch_size)) for lat in streams)
        return _Additions(frames_apart=front, tokens_behind=behind)

    def _humo(self, x, named) -> _Additions:
        """HuMo: its reference latent behind the video."""
        reference = named.get("reference_latent")
        return _Additions() if reference is None else self._reference_behind(x, reference)

    def _s2v(self, x, named) -> _Additions:
        """S2V: its reference latent behind the video, then the FramePack motion tokens."""
        reference = named.get("reference_latent")
        added = _Additions() if reference is None else self._reference_behind(x, reference)
        motion = named.get("reference_motion")
        if motion is None:
            return added
        return replace(added, tokens_behind=added.tokens_behind + _framepack_tokens(self.model.frame_packer, motion))

    def _reference_behind(self, x, reference) -> _Additions:
        """A reference latent patchified as it is (not padded) right behind the video: whole frames of the grid where
        it has the video's size (as ComfyUI's nodes make it), else non-video tokens."""
        t, h, w = _conv_sizes(self.model.patch_embedding, reference.shape[2:])
        grid = latent_grid(x.shape, self.model.patch_size)
        if (h, w) == (grid.height, grid.width):
            return _Additions(frames_apart=t)
        return _Additions(tokens_behind=t * h * w)

    def _scail(self, x, named) -> _Additions:
        """SCAIL: its reference frames concatenated in front of the latent, its pose latents (padded to the patch)
        patchified by their own embedding behind."""
        model = self.model
        reference = named.get("reference_latent")
        pose = named.get("pose_latents")
        return _Additions(
            frames_in_latent=0 if reference is None else latent_frames(reference, model.patch_size[0]),
            tokens_behind=0 if pose is None else _conv_tokens(model.patch_embedding_pose,
                                                              _padded(pose.shape[2:], model.patch_size)))

    def _animate2(self, x, named) -> _Additions | Dense:
        if named.get("pose_latents") is not None:
            return Dense(f"{self.name} was given pose frames: it runs its generation attention per frame (each "
                         "frame's queries against every video token and one pose frame), not one self-attention over "
                         "the video: its attention stays dense")
        return _Additions()

    @property
    def blocks(self) -> BlockLayers:
        return BlockLayers(offsets={"double": 0}, count=len(self.model.blocks))

    def cross_attention_lengths(self, named) -> set[int]:
        """Key lengths of the cross-attention calls: the text, and the CLIP image tokens (I2V)."""
        lengths = {token_count(named.get("context"))}
        if self.model.img_emb is not None:
            lengths.add(token_count(named.get("clip_fea")))
        return lengths - {0}

    def length_collision(self, named, grid):
        # Self- and cross-attention calls then have the same shapes and cannot be told apart (Wan pads its text to
        # 512 tokens): a sparse mask on cross-attention would be wrong, so the forward stays dense. The queries of
        # both are the whole self-attention sequence, appended tokens included.
        if grid.total_tokens in self.cross_attention_lengths(named):
            return (f"the video self-attention has {grid.total_tokens} tokens, as many as the text or image tokens "
                    "of cross-attention; attention stays dense for it (change the size or frame count by a little to "
                    "get sparse attention)")
        return None
