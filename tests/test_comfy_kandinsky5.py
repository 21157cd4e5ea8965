"""Kandinsky 5 video in real ComfyUI (0.33+; ComfyUI 0.3.64 has no Kandinsky 5): ComfyUI's Kandinsky5 built tiny by
ComfyUI's own model detection, sampled through its sampler, patched and unpatched.

Its self-attention holds the video alone, raster frame-major after a (1, 2, 2) patchify; the text runs through text
blocks of its own and reaches the video by cross-attention, both on ComfyUI's attention. A layout that keeps every
tile equals the unpatched model, T2V and I2V (the start image replaces latent frame 0: no extra tokens); a sparse one
changes the video self-attention only. The image model built on the same class passes through; a video whose token
count equals the text's, or a class built on Kandinsky5 that the pack has not read, stays dense with one warning.

Sizes: model_dim 64, 2 heads of 32, 1 text block and 3 visual blocks; latents 16 x 16 (8 x 8 tokens per frame).
"""

from __future__ import annotations

import copy
import functools
import importlib
import logging

import pytest
import torch

import comfy_env
from pack import import_pack
from test_adaspa import adaspa_node
from test_comfy_integration import Recorder, first_forward, latent, patch, rel_err, spy_attend
from test_svg2 import svg2_node
from test_svg_comfy import svg_node

pytestmark = [pytest.mark.comfyui, pytest.mark.newer_comfyui]

LOGGER = "sparse_video_attention"
BLOCK = 64
DIM, TEXT_DIM, POOLED_DIM, TIME_DIM, FF_DIM = 64, 32, 32, 32, 128
AXES = (8, 12, 12)  # head_dim 32: 2 heads
TEXT_BLOCKS, VISUAL_BLOCKS = 1, 3
TEXT = 12  # text tokens
VISUAL_IN = 4 * (16 + 16 + 1)  # a (1, 2, 2) patch of the noise, the start-image latent and its mask
STEPS = 3

core = import_pack("core")


@pytest.fixture(autouse=True)
def comfyui_has_kandinsky5():
    try:
        importlib.import_module("comfy.ldm.kandinsky5.model")
    except ImportError:
        import comfyui_version
        pytest.skip(f"ComfyUI {comfyui_version.__version__} has no Kandinsky 5")


def checkpoint(model_dim: int, visual_in: int, text_blocks: int, visual_blocks: int) -> dict:
    """The keys of a Kandinsky 5 checkpoint that detection reads (the blocks only counted: their shapes nominal)."""
    keys = {"visual_embeddings.in_layer.weight": (model_dim, visual_in),
            "visual_embeddings.in_layer.bias": (model_dim,), "time_embeddings.in_layer.bias": (TIME_DIM,),
            "visual_transformer_blocks.0.cross_attention.key_norm.weight": (32,),
            "visual_transformer_blocks.0.feed_forward.in_layer.weight": (FF_DIM, model_dim)}
    for kind, count in (("text", text_blocks), ("visual", visual_blocks)):
        keys.update({f"{kind}_transformer_blocks.{i}.self_attention.to_query.weight": (model_dim,)
                     for i in range(count)})
    return keys


def video_config():
    """Kandinsky 5 video as ComfyUI detects it (supported_models.Kandinsky5), at the tiny sizes."""
    return comfy_env.detected_config(checkpoint(DIM, VISUAL_IN, TEXT_BLOCKS, VISUAL_BLOCKS), in_text_dim=TEXT_DIM,
                                     in_text_dim2=POOLED_DIM, axes_dims=AXES)


@functools.cache
def tiny_video_model():
    """One model for the module (patching clones it; the original is never changed)."""
    return comfy_env.build(video_config(), seed=3)


@pytest.fixture(scope="module", autouse=True)
def release_models():
    yield
    tiny_video_model.cache_clear()  # while ComfyUI is still importable: its ModelPatcher.__del__ needs it


def image_model():
    """Kandinsky 5 image (supported_models.Kandinsky5Image) at its real width, which is how ComfyUI tells it from the
    video models (model_dim 2560, 64 input channels); never run, so its weights are left uninitialised."""
    config = comfy_env.detected_config(checkpoint(2560, 64, 0, 1), in_text_dim=TEXT_DIM, in_text_dim2=POOLED_DIM)
    config.set_inference_dtype(torch.bfloat16, None)
    return comfy_env.wrap(config.get_model({}, device=comfy_env.CPU))


def conds(seed, text=TEXT, **extra):
    """(positive, negative) as CLIPTextEncodeKandinsky5 makes them: Qwen text tokens and the CLIP-L pooled vector;
    ``extra``: what Kandinsky5ImageToVideo adds for a start image."""
    gen = torch.Generator().manual_seed(seed)
    return tuple([[torch.randn(1, text, TEXT_DIM, generator=gen),
                   {"pooled_output": torch.randn(1, POOLED_DIM, generator=gen), **extra}]] for _ in range(2))


def start_image(frames):
    """Kandinsky5ImageToVideo's start image: its latent replaces frame 0 (time_dim_replace); the mask marks it."""
    mask = torch.ones(1, 1, frames, 16, 16)
    mask[:, :, 0] = 0.0
    encoded = torch.randn(1, 16, 1, 16, 16, generator=torch.Generator().manual_seed(4))
    return dict(time_dim_replace=encoded, concat_mask=mask)


def radial(nodes, decay):
    return nodes.RadialMask().settings(decay, BLOCK, True, True)[0]


def warnings_of(caplog):
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno >= logging.WARNING]


def every_call():
    return {(step, layer) for step in range(STEPS) for layer in range(VISUAL_BLOCKS)}


# ------------------------------------------------------------------------------------------------------------------
# The video model: its self-attention over the video grid

@pytest.mark.parametrize("extra", [{}, start_image(3)], ids=["t2v", "i2v"])
def test_full_layout_equals_unpatched(nodes, bridge, monkeypatch, extra):
    method = radial(nodes, decay=4.0)
    grid = core.VideoGrid(3, 8, 8)
    assert bool(core.radial_block_mask(grid, method).all())
    base = tiny_video_model()
    assert type(base.model).__name__ == "Kandinsky5"  # ComfyUI's video class, by its own detection
    pos, neg = conds(seed=1, **extra)
    patched = patch(nodes, base, method)
    session = bridge.session_of(patched)
    calls = spy_attend(monkeypatch, session)

    dense = comfy_env.sample(base, latent(frames=3), pos, neg, steps=STEPS, seed=5)
    sparse = comfy_env.sample(patched, latent(frames=3), pos, neg, steps=STEPS, seed=5)

    assert len(calls) == session.forwards * VISUAL_BLOCKS  # every visual block's self-attention, no other call
    assert {c["grid"] for c in calls} == {grid}
    assert set(session.stats.calls) == every_call() and set(session.stats.calls.values()) == {1.0}
    assert not session.stats.fallbacks, session.stats.fallback_messages
    torch.testing.assert_close(sparse, dense, rtol=1e-4, atol=1e-4)


def test_sparse_changes_only_the_video_self_attention(nodes, bridge):
    """Sparse from the first step and block: the text blocks and the cross-attention stay on ComfyUI's attention
    (a recorder below the patch sees them, untouched), the video self-attention never reaches it."""
    base = tiny_video_model()
    pos, neg = conds(seed=6)
    reference, below = Recorder(), Recorder()
    unpatched = reference.install_on(base)
    patched = patch(nodes, below.install_on(base), radial(nodes, decay=0.05))
    session = bridge.session_of(patched)

    dense = comfy_env.sample(unpatched, latent(), pos, neg, steps=STEPS, seed=7)
    sparse = comfy_env.sample(patched, latent(), pos, neg, steps=STEPS, seed=7)

    assert set(session.stats.calls) == every_call() and session.stats.sparse_calls == len(every_call())
    assert session.stats.grid == core.VideoGrid(5, 8, 8) and not session.stats.fallbacks
    assert torch.isfinite(sparse).all() and 0 < rel_err(sparse, dense) < 0.5

    ref, got = first_forward(reference.calls), first_forward(below.calls)
    is_text = lambda c: c["q"].shape[2] == TEXT  # noqa: E731  ((B, H, L, D): Kandinsky passes skip_reshape)
    is_cross = lambda c: c["q"].shape[2] == 5 * 64 and c["k"].shape[2] == TEXT  # noqa: E731
    assert [is_text(c) for c in ref] == [True] * TEXT_BLOCKS + [False] * 2 * VISUAL_BLOCKS
    assert len([c for c in ref if is_cross(c)]) == VISUAL_BLOCKS
    # Below the patch: the text blocks and every cross-attention, no video self-attention.
    assert [is_text(c) for c in got] == [True] * TEXT_BLOCKS + [False] * VISUAL_BLOCKS
    assert all(is_cross(c) for c in got[TEXT_BLOCKS:])
    for r, g in zip([c for c in ref if is_text(c) or is_cross(c)], got):
        assert torch.equal(g["k"], r["k"]) and torch.equal(g["v"], r["v"])  # keys and values: the text alone
        assert torch.equal(g["out"], g["func"](*g["args"], **g["kwargs"]))  # ComfyUI's attention ran untouched
    for r, g in zip(ref[:TEXT_BLOCKS], got[:TEXT_BLOCKS]):  # the text blocks run before any video attention
        assert torch.equal(g["q"], r["q"]) and torch.equal(g["out"], r["out"])


@pytest.mark.parametrize("method", ["radial", "svg", "svg2", "adaspa"])
def test_every_method_and_its_caches(nodes, bridge, method):
    """Each method runs sparse on every visual block past the first, keeps its caches on the video grid, and a
    second run (caches reset or reused, as the method does) gives the same video."""
    settings = {"radial": lambda: radial(nodes, decay=0.05),
                "svg": lambda: svg_node(nodes, sparsity=0.4),
                "svg2": lambda: svg2_node(nodes),
                "adaspa": lambda: adaspa_node(nodes, recall=0.6, search_steps="0, 2", min_density=0.0,
                                              max_density=0.6)}[method]()
    base = tiny_video_model()
    pos, neg = conds(seed=8)
    patched = patch(nodes, base, settings, dense_layers=1)
    session = bridge.session_of(patched)
    first = comfy_env.sample(patched, latent(), pos, neg, steps=4, seed=9)

    stats = session.stats
    assert stats.grid == core.VideoGrid(5, 8, 8) and not stats.fallbacks, stats.fallback_messages
    assert {layer for (_, layer), d in stats.calls.items() if d < 1.0} == set(range(1, VISUAL_BLOCKS))
    assert stats.sparse_calls >= 2 * (VISUAL_BLOCKS - 1) and torch.isfinite(first).all()
    assert session.cache_bytes()
    again = comfy_env.sample(patched, latent(), pos, neg, steps=4, seed=9)
    torch.testing.assert_close(again, first, rtol=1e-5, atol=1e-5)


def test_inspector_and_run_summary(nodes, bridge, caplog):
    """The run summary counts the visual blocks as layers, the Inspector draws a sparse block's Radial layout."""
    patched = patch(nodes, tiny_video_model(), radial(nodes, decay=0.2), dense_steps=0.25, dense_layers=1,
                    verbose=True)
    pos, neg = conds(seed=10)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        comfy_env.sample(patched, latent(), pos, neg, steps=4, seed=11)
    title = import_pack("core.summary").TITLE
    summary = "\n".join(r.getMessage() for r in caplog.records if r.getMessage().startswith(title))
    assert "video 5x8x8 = 320 tokens; 4 steps x 3 layers: 6 sparse and 6 dense attention calls" in summary
    assert "dense steps 0 (1 of 4), dense layers 0 (1 of 3)" in summary and "WARNING" not in summary

    session = bridge.session_of(patched)
    report = import_pack("core.report")
    images = nodes.SparseAttentionInspector().inspect(patched, {"samples": torch.zeros(1)}, 1, 0, 384)
    pictures = report.inspect(session, layer=1, max_size=384)
    assert pictures[0].info["title"] == "Radial layout, layer 1 of 3"
    for image, picture in zip(images, pictures):
        assert torch.equal(image, report.to_image_tensor(picture))
    mask = session.block_mask(1)
    assert torch.equal(mask, core.radial_block_mask(core.VideoGrid(5, 8, 8), radial(nodes, decay=0.2)))
    assert not bool(mask.all())


# ------------------------------------------------------------------------------------------------------------------
# What stays untouched or dense

def test_image_model_passes_through(nodes, bridge, caplog):
    """Kandinsky 5 image is ComfyUI's Kandinsky5 diffusion model under another supported-model class: not a video
    model, the patch returns it unchanged with one warning."""
    model = image_model()
    assert type(model.model).__name__ == "Kandinsky5Image"
    assert bridge.adapter_for(tiny_video_model().get_model_object("diffusion_model")) is not None
    options = copy.deepcopy(model.model_options)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        out = patch(nodes, model, radial(nodes, decay=0.2))
    assert out is model and model.model_options == options and bridge.session_of(model) is None
    warnings = warnings_of(caplog)
    assert len(warnings) == 1 and "Kandinsky5" in warnings[0] and "not a video model" in warnings[0]


def test_video_as_long_as_the_text_stays_dense(nodes, bridge, caplog):
    """A video of as many tokens as the text: the text blocks' self-attention and the cross-attention would look like
    the video's, so the whole forward stays on ComfyUI's attention, said once with how to change the size."""
    base = tiny_video_model()
    pos, neg = conds(seed=12, text=3 * 64)
    below = Recorder()
    patched = patch(nodes, below.install_on(base), radial(nodes, decay=0.05))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        dense = comfy_env.sample(base, latent(frames=3), pos, neg, steps=2, seed=13)
        sparse = comfy_env.sample(patched, latent(frames=3), pos, neg, steps=2, seed=13)
    torch.testing.assert_close(sparse, dense, rtol=0, atol=0)
    session = bridge.session_of(patched)
    assert not session.stats.calls and session.forwards == 0
    assert len(below.calls) == 2 * (TEXT_BLOCKS + 2 * VISUAL_BLOCKS)  # every call, on ComfyUI's attention
    warnings = warnings_of(caplog)
    assert len(warnings) == 1, warnings
    assert "192 tokens, as many as the text" in warnings[0] and "change the width or height" in warnings[0]


def test_a_class_built_on_kandinsky5_stays_dense(nodes, bridge, caplog):
    """A model class built on ComfyUI's Kandinsky5 (a custom node's, a later ComfyUI's variant) may put other tokens
    in its self-attention: dense, exactly as unpatched, with one warning naming it."""
    from comfy.ldm.kandinsky5.model import Kandinsky5

    class Kandinsky5Variant(Kandinsky5):
        pass

    base = comfy_env.build(video_config(), seed=3)
    base.model.diffusion_model.__class__ = Kandinsky5Variant
    pos, neg = conds(seed=14)
    patched = patch(nodes, base, radial(nodes, decay=0.05))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        dense = comfy_env.sample(base, latent(), pos, neg, steps=2, seed=15)
        sparse = comfy_env.sample(patched, latent(), pos, neg, steps=2, seed=15)
    torch.testing.assert_close(sparse, dense, rtol=0, atol=0)
    session = bridge.session_of(patched)
    assert not session.stats.calls and session.forwards == 0
    warnings = warnings_of(caplog)
    assert len(warnings) == 1 and "Kandinsky5Variant" in warnings[0] and "stays dense" in warnings[0], warnings
