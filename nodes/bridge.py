"""The only place that knows ComfyUI's model objects: detects the model, installs wrappers and the override.

* an OUTER_SAMPLE wrapper marks the start and end of each sampling run (per-run state is reset there);
* a DIFFUSION_MODEL wrapper sees the latent before patchify and the current sigma, and hands the attention
  calls of that forward a ForwardContext (token grid, step, layer counter) through transformer_options;
* ``optimized_attention_override`` receives every attention call (core.dispatcher routes it).
"""

from __future__ import annotations

import logging

import torch

import comfy.ldm.modules.attention as comfy_attention
import comfy.patcher_extension as patcher_extension
from comfy.ldm.hunyuan_video.model import HunyuanVideo
from comfy.ldm.wan.model import WanModel

from ..core import CONTEXT_KEY, SparseAttentionSession, attention_override, latent_grid, timed_override

log = logging.getLogger("sparse_video_attention")

WRAPPER_KEY = "sparse_video_attention"
OVERRIDE_KEY = "optimized_attention_override"
MIN_COMFYUI = "0.3.60"
# Positional index of the optional extra inputs in each model's forward(x, timestep, context, ...).
_WAN_TIME_DIM_CONCAT = 4
_HUNYUAN_BYT5 = 4
_HUNYUAN_REF_LATENT = 8


def check_comfyui_supports_override() -> None:
    if not hasattr(comfy_attention, "wrap_attn"):
        raise RuntimeError(f"Sparse Attention Patch needs ComfyUI {MIN_COMFYUI} or newer (this ComfyUI has no "
                           "attention override); update ComfyUI")


def session_of(model) -> SparseAttentionSession | None:
    """The session a Sparse Attention Patch installed on this model (or a clone of it), None if unpatched."""
    return model.get_attachment(WRAPPER_KEY)


def model_family(diffusion_model) -> str | None:
    """'wan' or 'hunyuan' for the video DiTs the pack knows, None for anything else."""
    if isinstance(diffusion_model, WanModel):
        return "wan"
    if isinstance(diffusion_model, HunyuanVideo) and len(diffusion_model.patch_size) == 3:
        return "hunyuan"
    return None


def _video_grid(family: str, diffusion_model, args, kwargs):
    """Token grid of one forward call: the latent frames plus frames the model adds in front or behind, and for
    HunyuanVideo the exact number of text tokens appended to them (its text refiner attends over the text alone,
    which must not pass for video self-attention even when the text is longer than the video)."""
    x = args[0]
    if x.ndim != 5:
        return None
    extra = 0
    if family == "wan":
        concat = args[_WAN_TIME_DIM_CONCAT] if len(args) > _WAN_TIME_DIM_CONCAT else None
        extra += 0 if concat is None else -(-concat.shape[2] // diffusion_model.patch_size[0])
        if diffusion_model.ref_conv is not None and kwargs.get("reference_latent") is not None:
            extra += 1
    text = 0
    if family == "hunyuan":
        ref = args[_HUNYUAN_REF_LATENT] if len(args) > _HUNYUAN_REF_LATENT else None
        extra += 0 if ref is None else -(-ref.shape[2] // diffusion_model.patch_size[0])
        byt5 = args[_HUNYUAN_BYT5] if len(args) > _HUNYUAN_BYT5 else None
        text = _length(args[2]) + (_length(byt5) if diffusion_model.byt5_in is not None else 0)
    return latent_grid(x.shape, diffusion_model.patch_size, extra_frames=extra, text_tokens=text)


def _length(tokens) -> int:
    return tokens.shape[1] if isinstance(tokens, torch.Tensor) and tokens.ndim == 3 else 0


def _wan_cross_attention_lengths(diffusion_model, args) -> set[int]:
    """Key lengths of Wan's cross-attention calls: the text, and the CLIP image tokens (I2V)."""
    lengths = {_length(args[2])}
    clip_fea = args[3] if len(args) > 3 else None
    if diffusion_model.img_emb is not None:
        lengths.add(_length(clip_fea))
    return lengths - {0}


def install(model, session: SparseAttentionSession):
    """Clone the ModelPatcher and install the sparse path on the clone; the original is never changed."""
    diffusion_model = model.get_model_object("diffusion_model")
    family = model_family(diffusion_model)
    if family is None:
        log.warning("sparse attention: %s is not a video model this pack knows (Wan 2.1/2.2, HunyuanVideo); "
                    "the model passes through unchanged with dense attention", type(diffusion_model).__name__)
        return model
    check_comfyui_supports_override()
    patched = model.clone()
    if session_of(model) is not None:
        # A second patch on the same model replaces the first: its wrappers go, and the first override, still in the
        # chain below the new one, passes every call through (a context answers to the session that made it).
        log.warning("sparse attention: this model already has a Sparse Attention Patch; the new one replaces it")
        for kind in (patcher_extension.WrappersMP.OUTER_SAMPLE, patcher_extension.WrappersMP.DIFFUSION_MODEL):
            patched.remove_wrappers_with_key(kind, WRAPPER_KEY)
        for kind in (patcher_extension.CallbacksMP.ON_LOAD, patcher_extension.CallbacksMP.ON_DETACH):
            patched.remove_callbacks_with_key(kind, WRAPPER_KEY)
    options = patched.model_options.setdefault("transformer_options", {})
    previous = options.get(OVERRIDE_KEY)
    if previous is not None:
        log.info("sparse attention: composing with an attention override already on this model; its path "
                 "serves every call that stays dense")
    override = attention_override(session, previous=previous)
    # verbose: time every video self-attention call for the run summary and the Inspector (no cost otherwise)
    options[OVERRIDE_KEY] = override if session.timer is None else timed_override(session, override)

    def outer_sample(executor, *args, **kwargs):
        session.begin_run()
        try:
            return executor(*args, **kwargs)
        finally:
            session.end_run()

    # Under torch.compile (TorchCompileModel) this runs eagerly: it reads the sigma off the device and builds Python
    # state, which traced would break the graph and recompile the whole model at every new sigma (every step).
    @torch.compiler.disable
    def forward_context(args, kwargs, transformer_options):
        grid = _video_grid(family, diffusion_model, args, kwargs)
        if grid is None:
            return None
        if family == "wan" and grid.video_tokens in _wan_cross_attention_lengths(diffusion_model, args):
            # Self- and cross-attention calls then have the same shapes and cannot be told apart (Wan pads its
            # text to 512 tokens): a sparse mask on cross-attention would be wrong, so this call stays dense.
            session.warn_once("cross-length", f"the video has {grid.video_tokens} tokens, as many as the text or "
                              "image tokens of cross-attention; attention stays dense for it (change the size or "
                              "frame count by a little to get sparse attention)")
            return None
        sigmas = transformer_options.get("sigmas")
        sigma = float(sigmas.flatten()[0]) if sigmas is not None else None
        return session.forward_context(grid, sigma, transformer_options.get("sample_sigmas"),
                                       text_after_video=family == "hunyuan",
                                       conditionings=len(transformer_options.get("cond_or_uncond") or ()))

    def diffusion_model_call(executor, *args, **kwargs):
        in_args = isinstance(args[-1], dict) and "transformer_options" not in kwargs
        transformer_options = args[-1] if in_args else kwargs.get("transformer_options", {})
        ctx = forward_context(args, kwargs, transformer_options)
        if ctx is None:
            return executor(*args, **kwargs)
        with_ctx = {**transformer_options, CONTEXT_KEY: ctx}
        if in_args:
            args = (*args[:-1], with_ctx)
        else:
            kwargs["transformer_options"] = with_ctx
        return executor(*args, **kwargs)

    def on_load(patcher, device_to, *args):
        if device_to is not None:
            session.move_caches(device_to)

    def on_detach(patcher, unpatch_all):
        session.move_caches(patcher.offload_device)

    patched.set_attachments(WRAPPER_KEY, session)
    # Caches a planner keeps on the device (SVG2's centroids) follow the model when ComfyUI loads or offloads it.
    patched.add_callback_with_key(patcher_extension.CallbacksMP.ON_LOAD, WRAPPER_KEY, on_load)
    patched.add_callback_with_key(patcher_extension.CallbacksMP.ON_DETACH, WRAPPER_KEY, on_detach)
    patched.add_wrapper_with_key(patcher_extension.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY, outer_sample)
    patched.add_wrapper_with_key(patcher_extension.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY, diffusion_model_call)
    return patched
