"""The token layout of one video self-attention call."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class VideoGrid:
    """The tokens of a video self-attention in the order every planner sees them: the patchified video,
    ``frames`` x ``height`` x ``width`` frame-major, then ``text_tokens`` non-video tokens attended densely.

    Wan puts only video tokens in self-attention (reference frames, when present, are frames of the grid).
    HunyuanVideo mixes its text into the same sequence, after the video up to ComfyUI 0.3.x and in front of it
    since; a model's own order reaches the planners as this one (core.dispatcher moves leading tokens behind).
    """

    frames: int
    height: int
    width: int
    text_tokens: int = 0

    def __post_init__(self):
        if min(self.frames, self.height, self.width) < 1 or self.text_tokens < 0:
            raise ValueError(f"a video grid needs frames, height, width >= 1 and text_tokens >= 0, got {self}")

    @property
    def tokens_per_frame(self) -> int:
        return self.height * self.width

    @property
    def video_tokens(self) -> int:
        return self.frames * self.tokens_per_frame

    @property
    def total_tokens(self) -> int:
        return self.video_tokens + self.text_tokens


def latent_grid(latent_shape, patch_size, extra_frames: int = 0, text_tokens: int = 0) -> VideoGrid:
    """Token grid of a (B, C, T, H, W) latent after patchify with ``patch_size`` (pt, ph, pw).

    Matches ComfyUI's Wan / HunyuanVideo: the latent is padded up to a multiple of the patch size.
    """
    if len(latent_shape) != 5 or len(patch_size) != 3:
        raise ValueError(f"expected a (B, C, T, H, W) latent and a 3D patch size, got {tuple(latent_shape)} and "
                         f"{tuple(patch_size)}")
    t, h, w = latent_shape[2:]
    pt, ph, pw = patch_size
    return VideoGrid(frames=-(-t // pt) + extra_frames, height=-(-h // ph), width=-(-w // pw), text_tokens=text_tokens)
