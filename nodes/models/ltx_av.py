"""LTX-2: ComfyUI's ``LTXAV`` (video with audio), whose diffusion model is ``LTXAVModel``.

How ComfyUI runs it (comfy/ldm/lightricks/av_model.py and model.py, the same in 0.33 and 0.38):

* The forward gets ``x`` as a list: the video latent (B, 128, T, H, W) and, when the latent holds audio, the audio
  latent (B, 8, T_a, 16). The video is patchified 1 x 1 x 1 (SymmetricPatchifier): T x H x W tokens, frame-major.
* Guides (LTXVAddGuide: keyframes, IC-LoRA references) are latent frames of the video's size appended to the video
  latent in time; ``keyframe_idxs`` lists their tokens (the last ones of the sequence). Tokens whose denoise mask is
  negative (the unused positions of an IC-LoRA's dilated reference) are dropped before the transformer, so the
  self-attention runs over the video tokens and then the guide tokens that remain: the guides are its non-video
  tokens, behind the video, attended densely (rows and columns).
* Each block runs the video self-attention (``attn1``, ComfyUI's attention over (B, L, H*D), one call, no mask), the
  video's text cross-attention, the audio self-attention and text cross-attention, then audio-to-video and
  video-to-audio cross-attention. Only the first is made sparse; every other call stays on ComfyUI's attention.
* A guide with strength other than 1 or an attention mask makes ComfyUI split the video self-attention by query
  rows, each part over all keys with a soft bias on the guide keys (``GuideAttentionMask``): the pack keeps such a
  forward dense.
* STG (LTXVSpatioTemporalGuidance) skips the self-attention of the blocks it names in its extra pass; the blocks
  report no block metadata, so the calls of that pass are booked to their blocks by the STG list.
"""

from __future__ import annotations

import torch

from ...core import BlockLayers, VideoGrid, latent_grid
from .base import Dense, ForwardLayout, ModelAdapter, token_count


class LTXAVAdapter(ModelAdapter):
    """LTX-2 (``LTXAVModel``): video self-attention sparse over the video frames, the guide tokens behind them dense;
    the audio stream, text and audio-video cross-attention left to ComfyUI."""

    family = "ltx2"
    # The classes whose token layout this adapter reads: ComfyUI's own. A subclass (a custom node's variant) may
    # order its tokens otherwise, so it stays dense with one warning naming it.
    KNOWN = (("comfy.ldm.lightricks.av_model", "LTXAVModel"),)

    def video_latent(self, named):
        x = named.get("x")
        if isinstance(x, (list, tuple)) and x and isinstance(x[0], torch.Tensor):
            return x[0]
        return None

    def layout(self, video, named):
        model = self.model
        if (type(model).__module__, type(model).__name__) not in self.KNOWN:
            return Dense(f"{self.name} is a variant of LTX-2's LTXAVModel whose token layout this pack does not know; "
                         "its attention stays dense")
        options = named.get("transformer_options") or {}
        if not options.get("run_vx", True):
            return None  # a forward without the video stream: no video self-attention
        whole = latent_grid(video.shape, tuple(model.patchifier.patch_size))  # the guide frames included
        per_frame = whole.tokens_per_frame
        frames, guides = whole.frames, 0
        keyframes = named.get("keyframe_idxs")
        appended = keyframes.shape[2] if isinstance(keyframes, torch.Tensor) and keyframes.ndim >= 3 else 0
        if appended:
            if appended % per_frame or appended // per_frame >= frames:
                return Dense(f"{self.name}: its {appended} guide tokens are not whole frames of the {frames}-frame "
                             f"video ({per_frame} tokens each); its attention stays dense")
            frames -= appended // per_frame
            kept = self._kept_tokens(named.get("denoise_mask"))
            if kept is not None:
                video_tokens = frames * per_frame
                left_out = video_tokens - int(kept[:video_tokens].sum())
                if left_out:
                    return Dense(f"{self.name}: a negative denoise mask leaves {left_out} of the video's own tokens "
                                 "out of its self-attention, which is then no whole frames; its attention stays dense")
                guides = int(kept[video_tokens:].sum())
            else:
                guides = appended
            weighted = self._weighted_guides(named.get("guide_attention_entries")) if guides else None
            if weighted:
                return Dense(f"{self.name}: {weighted}, so ComfyUI splits the video self-attention by query rows with "
                             "a soft bias on the guide keys; the pack keeps it dense (guide strength 1 and no guide "
                             "attention mask for sparse attention)")
        grid = VideoGrid(frames, whole.height, whole.width, text_tokens=guides)
        skipped = options.get("stg_self_attn_blocks") or ()
        count = len(model.transformer_blocks)
        call_layers = tuple(i for i in range(count) if i not in skipped) if skipped else None
        audio = self.audio_tokens(named)
        return ForwardLayout(grid, call_layers=call_layers,
                             other_self_attention=frozenset({audio} if audio else ()))

    def _kept_tokens(self, denoise_mask):
        """Which tokens enter the transformer (bool over the patchified sequence, the guides included), as the model
        filters them: a token whose denoise mask is negative anywhere is dropped (read on the first batch element);
        None without a mask."""
        if not isinstance(denoise_mask, torch.Tensor) or denoise_mask.ndim != 5:
            return None
        tokens = self.model.patchifier.patchify(denoise_mask)[0]
        return ~torch.any(tokens < 0, dim=-1)[0]

    @staticmethod
    def _weighted_guides(entries) -> str | None:
        """What in the guides makes ComfyUI build a guide attention mask (None: nothing)."""
        for entry in entries or ():
            if not isinstance(entry, dict):
                continue
            if entry.get("pixel_mask") is not None:
                return "a guide has an attention mask"
            strength = entry.get("strength", 1.0)
            if strength != 1.0:
                return f"a guide has strength {strength:g}"
        return None

    def audio_tokens(self, named) -> int:
        """Length of the audio stream's self-attention (0: no audio), the ID-LoRA reference audio in front included."""
        x = named.get("x")
        audio = x[1] if isinstance(x, (list, tuple)) and len(x) > 1 else None
        if not isinstance(audio, torch.Tensor) or audio.ndim != 4 or audio.numel() == 0:
            return 0
        reference = named.get("ref_audio")
        extra = reference.get("tokens") if isinstance(reference, dict) else None
        return audio.shape[2] + (extra.shape[1] if isinstance(extra, torch.Tensor) and extra.ndim == 3 else 0)

    def length_collision(self, named, grid):
        clash = [what for what, n in (("audio", self.audio_tokens(named)), ("text", token_count(named.get("context"))))
                 if n == grid.total_tokens]
        if not clash:
            return None
        return (f"{self.name}: the video self-attention has {grid.total_tokens} tokens, as many as the "
                f"{' and '.join(clash)} tokens of its other attention calls, which then cannot be told apart from it; "
                "attention stays dense for it (change the width, height or frame count by a step to get sparse "
                "attention)")

    @property
    def blocks(self) -> BlockLayers:
        # ComfyUI reports no block metadata for LTXAV blocks: layers are the video self-attention calls in order.
        return BlockLayers(offsets={}, count=len(self.model.transformer_blocks))
