"""The only place that installs the pack on ComfyUI's model objects.

* an OUTER_SAMPLE wrapper marks the start and end of each sampling run (per-run state is reset there) and settles,
  for the run, who holds ComfyUI's attention hook (nodes.composition);
* a DIFFUSION_MODEL wrapper reads the forward's token layout through the model's adapter (nodes.models)
  and the current sigma, and hands the attention calls of that forward a ForwardContext through
  transformer_options;
* ``optimized_attention_override`` receives every attention call (core.dispatcher routes it).
"""

from __future__ import annotations

import dataclasses
import logging

import torch

import comfy.ldm.modules.attention as comfy_attention
import comfy.patcher_extension as patcher_extension

from ..core import CHECK_KEY, CONTEXT_KEY, CheckSettings, SparseAttentionSession, attention_override, psnr, \
    timed_override
from ..core.sequence_parallel import ulysses_override
from . import composition
from .models import Dense, adapter_for

log = logging.getLogger("sparse_video_attention")

WRAPPER_KEY = "sparse_video_attention"
OVERRIDE_KEY = composition.OVERRIDE_KEY
MIN_COMFYUI = "0.3.60"


def check_comfyui_supports_override() -> None:
    if not hasattr(comfy_attention, "wrap_attn"):
        raise RuntimeError(f"Sparse Attention Patch needs ComfyUI {MIN_COMFYUI} or newer (this ComfyUI has no "
                           "attention override); update ComfyUI")


def comfyui_version() -> str:
    try:
        import comfyui_version as version
    except ImportError:  # ComfyUI run from a tree without its version file
        return "unknown"
    return version.__version__


def session_of(model) -> SparseAttentionSession | None:
    """The session a Sparse Attention Patch installed on this model (or a clone of it), None if unpatched."""
    return model.get_attachment(WRAPPER_KEY)


def make_hook(session: SparseAttentionSession, previous):
    """The patch's attention hook over ``previous`` (the hook that serves dense calls), timed when verbose."""
    override = attention_override(session, previous=previous)
    # verbose: time every video self-attention call for the run summary and the Inspector (no cost otherwise)
    hook = override if session.timer is None else timed_override(session, override, CONTEXT_KEY)
    if session.sequence_parallel is not None:  # a rank of several, its forward sharding the sequence (raylight)
        hook = ulysses_override(session.sequence_parallel, hook)
    return composition.mark(hook, session)


def settle_hook_for_run(guider, session: SparseAttentionSession) -> None:
    """At the start of a run, on the run's copy of the model options: who serves the attention calls."""
    model_options = getattr(guider, "model_options", None)
    patcher = getattr(guider, "model_patcher", None)
    if model_options is None or patcher is None:
        return
    if composition.has_core_sparse(patcher):
        session.stand_down(composition.CORE_SPARSE_AFTER)
        return
    options = model_options.setdefault("transformer_options", {})
    hook = options.get(OVERRIDE_KEY)
    if hook is None or composition.is_backend_override(hook):
        if hook is not None:
            session.warn_once("backend-after-patch", composition.BACKEND_AFTER)
        options[OVERRIDE_KEY] = make_hook(session, hook)


def _check_settings(transformer_options) -> CheckSettings | None:
    """The Sparse Attention Check's settings this model copy carries (see nodes/check.py), if any."""
    settings = transformer_options.get(CHECK_KEY)
    return settings if isinstance(settings, CheckSettings) else None


def install(model, session: SparseAttentionSession):
    """Clone the ModelPatcher and install the sparse path on the clone; the original is never changed."""
    diffusion_model = model.get_model_object("diffusion_model")
    adapter = adapter_for(diffusion_model)
    if adapter is None:
        log.warning("sparse attention: %s is not a video model this pack knows (Wan 2.1/2.2, HunyuanVideo 1.0/1.5, "
                    "LTX-2, Kandinsky 5); the model passes through unchanged with dense attention",
                    type(diffusion_model).__name__)
        return model
    check_comfyui_supports_override()
    patched = model.clone()
    if session_of(model) is not None:
        # A second patch on the same model replaces the first: its wrappers go, and the first hook, still in the
        # chain below the new one, passes every call through (a context answers to the session that made it).
        log.warning("sparse attention: this model already has a Sparse Attention Patch; the new one replaces it")
        for kind in (patcher_extension.WrappersMP.OUTER_SAMPLE, patcher_extension.WrappersMP.DIFFUSION_MODEL):
            patched.remove_wrappers_with_key(kind, WRAPPER_KEY)
        for kind in (patcher_extension.CallbacksMP.ON_LOAD, patcher_extension.CallbacksMP.ON_DETACH):
            patched.remove_callbacks_with_key(kind, WRAPPER_KEY)
    options = patched.model_options.setdefault("transformer_options", {})
    previous = options.get(OVERRIDE_KEY)
    if composition.has_core_sparse(patched):
        previous = composition.take_over_from_core_sparse(patched, previous)
        session.warn_once("core-sparse-before-patch", composition.CORE_SPARSE_BEFORE)
    if previous is not None:
        log.info("sparse attention: composing with an attention override already on this model; its path "
                 "serves every call that stays dense")
    options[OVERRIDE_KEY] = make_hook(session, previous)

    def outer_sample(executor, *args, **kwargs):
        session.begin_run()
        settle_hook_for_run(getattr(executor, "class_obj", None), session)
        try:
            return executor(*args, **kwargs)
        finally:
            session.end_run()

    # Under torch.compile (TorchCompileModel) this runs eagerly: it reads the sigma off the device and builds Python
    # state, which traced would break the graph and recompile the whole model at every new sigma (every step).
    @torch.compiler.disable
    def forward_context(args, kwargs, transformer_options):
        if session.layout_error is not None:
            return None
        layout = adapter.forward_layout(args, kwargs)
        if layout is None:
            return None
        if isinstance(layout, Dense):
            session.warn_once(f"layout:{adapter.name}", str(layout))
            return None
        grid = layout.grid
        # A video self-attention of the same shape as another attention call of the forward (a cross-attention, or
        # another stream's self-attention, as long as the video) cannot be told apart from it: a sparse mask there
        # would be wrong, so the forward stays dense.
        collision = adapter.length_collision(adapter.arguments(args, kwargs), grid)
        if collision is not None:
            session.warn_once("cross-length", collision)
            return None
        sigmas = transformer_options.get("sigmas")
        sigma = float(sigmas.flatten()[0]) if sigmas is not None else None
        ctx = session.forward_context(grid, sigma, transformer_options.get("sample_sigmas"),
                                      leading_tokens=layout.leading_tokens,
                                      conditionings=len(transformer_options.get("cond_or_uncond") or ()),
                                      blocks=adapter.blocks, reported=layout.reported,
                                      call_layers=layout.call_layers,
                                      other_self_attention=layout.other_self_attention,
                                      check=_check_settings(transformer_options))
        return ctx

    def diffusion_model_call(executor, *args, **kwargs):
        transformer_options = adapter.transformer_options(args, kwargs)
        try:
            ctx = forward_context(args, kwargs, transformer_options)
        except Exception as why:  # a ComfyUI whose model changed in a way the adapter did not foresee: never a crash
            session.warn_once(f"adapter:{adapter.name}", f"reading the token layout of {adapter.name} failed "
                              f"({type(why).__name__}: {why}): this ComfyUI changed the model; attention stays dense")
            ctx = None
        if ctx is None:
            return executor(*args, **kwargs)
        compare = ctx.check is not None and ctx.check.settings.compares(ctx.step, ctx.total_steps)
        if compare:  # the check's whole step: the same forward dense first, for the PSNR of the two predictions
            dense_ctx = dataclasses.replace(ctx, dense=True, check=None, memo={})
            dense_args, dense_kwargs = adapter.with_transformer_options(
                args, kwargs, {**transformer_options, CONTEXT_KEY: dense_ctx})
            dense_out = executor(*dense_args, **dense_kwargs)
        args, kwargs = adapter.with_transformer_options(args, kwargs, {**transformer_options, CONTEXT_KEY: ctx})
        out = executor(*args, **kwargs)
        if compare:
            ctx.check.psnr[ctx.step] = psnr(out, dense_out)
        session.end_forward(ctx, adapter.name)
        return out

    def on_load(patcher, device_to, *args):
        if device_to is not None:
            session.move_caches(device_to, of=patcher.load_device)

    def on_detach(patcher, unpatch_all):
        session.move_caches(patcher.offload_device, of=patcher.load_device)

    session.platform = {"ComfyUI": comfyui_version()}
    patched.set_attachments(WRAPPER_KEY, session)
    # Caches a planner keeps on the device (SVG2's centroids) follow the model when ComfyUI loads or offloads it.
    patched.add_callback_with_key(patcher_extension.CallbacksMP.ON_LOAD, WRAPPER_KEY, on_load)
    patched.add_callback_with_key(patcher_extension.CallbacksMP.ON_DETACH, WRAPPER_KEY, on_detach)
    patched.add_wrapper_with_key(patcher_extension.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY, outer_sample)
    patched.add_wrapper_with_key(patcher_extension.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY, diffusion_model_call)
    return patched
