"""The pack inside real ComfyUI: tiny WanModel / HunyuanVideo built by ComfyUI's own model configs, patched through
our nodes and ModelPatcher, sampled with ComfyUI's sampler (comfy.sample.sample), compared with the unpatched model.

Shapes are tiny (Wan: dim 64, 2 heads of 32, 3 blocks; latent 16 ch x 5 frames x 16 x 16 = 5 frames of 8 x 8 tokens,
one 64-token block per frame). Model runs are seeded: a patched and an unpatched run see the same weights, noise
and conditioning. Without ComfyUI these tests are skipped (loudly, see conftest.py).
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import math
import sys

import pytest
import torch

import comfy_env
from pack import REPO_ROOT, import_pack

comfyui = pytest.mark.comfyui  # skipped, loudly, without ComfyUI (conftest.py)

LOGGER = "sparse_video_attention"
BLOCK = 64
WAN_TEXT = 16


@pytest.fixture(scope="module")
def core():
    return import_pack("core")


def radial(nodes, decay=0.2, block=BLOCK, sink=True, text_dense=True):
    return nodes.RadialMask().settings(decay, block, sink, text_dense)[0]


def patch(nodes, model, method, dense_steps=0.0, sparse_end=1.0, dense_layers=0, backend="reference", verbose=False):
    return nodes.SparseAttentionPatch().patch(model, dense_steps, sparse_end, dense_layers, backend, verbose, method,
                                              compensate="off")[0]  # the layout as it is: its oracle


def latent(frames=5, height=16, width=16, batch=1, channels=16):
    return torch.zeros(batch, channels, frames, height, width)


def spy_attend(monkeypatch, session):
    """Record every sparse-path call of ``session`` (q, k, v, kv_length, out) and pass it through."""
    calls = []
    original = session.attend

    def attend(ctx, layer, q, k, v, kv_length=None, out=None, head_offset=0, **routing):
        result, density = original(ctx, layer, q, k, v, kv_length=kv_length, out=out, head_offset=head_offset,
                                   **routing)
        calls.append(dict(grid=ctx.grid_for(q.shape[2]), layer=layer, step=ctx.step, q=q.detach().clone(),
                          k=k.detach().clone(), v=v.detach().clone(), kv_length=kv_length,
                          out=result.detach().clone()))
        return result, density

    monkeypatch.setattr(session, "attend", attend)
    return calls


class Recorder:
    """An ``optimized_attention_override`` installed BEFORE ours: ours must compose with it, so it sees every call
    that stays on ComfyUI's attention (dense self-attention, all cross-attention) and none of the sparse ones."""

    def __init__(self):
        self.calls = []

    def __call__(self, func, *args, **kwargs):
        out = func(*args, **kwargs)
        opts = kwargs.get("transformer_options") or {}
        q, k, v = args[:3]
        self.calls.append(dict(func=func, args=args, kwargs=dict(kwargs), sigma=float(opts["sigmas"].flatten()[0]),
                               q=q.clone(), k=k.clone(), v=v.clone(), out=out.clone()))
        return out

    def __deepcopy__(self, memo):  # ModelPatcher.clone() deep-copies model_options; keep one recorder
        return self

    def install_on(self, model):
        clone = model.clone()
        clone.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = self
        return clone


def first_forward(calls):
    return [c for c in calls if c["sigma"] == calls[0]["sigma"]]


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


def masked_reference(q, k, v, block_mask, block, kv_length=None):
    """Dense float64 attention over (B, H, L, D) with a block mask expanded to tokens (independent of kernels/)."""
    L = q.shape[2]
    token = torch.arange(L) // block
    allowed = block_mask[token][:, token].clone()
    s = torch.einsum("bhqd,bhkd->bhqk", q.double(), k.double()) / math.sqrt(q.shape[-1])
    allowed = allowed.expand(q.shape[0], 1, L, L)
    if kv_length is not None:
        allowed = allowed & (torch.arange(L)[None, None, None, :] < kv_length.view(-1, 1, 1, 1))
    s = s.masked_fill(~allowed, float("-inf"))
    return torch.einsum("bhqk,bhkd->bhqd", s.softmax(-1), v.double())


# ------------------------------------------------------------------------------------------------------------------
# A fully dense layout through the sparse path equals the unpatched model.

@comfyui
def test_dense_layout_equals_unpatched_wan(nodes, bridge, core, monkeypatch):
    lat = latent(frames=3)  # 3 frames: every frame pair is within the full band or kept by a wide diagonal
    method = radial(nodes, decay=4.0)
    grid = core.VideoGrid(3, 8, 8)
    assert bool(core.radial_block_mask(grid, method).all())

    pos, neg = comfy_env.wan_conds(seed=1)
    base = comfy_env.tiny_wan_t2v(seed=3)
    patched = patch(nodes, base, method)
    session = bridge.session_of(patched)
    calls = spy_attend(monkeypatch, session)

    dense = comfy_env.sample(base, lat, pos, neg, steps=3, seed=5)
    sparse = comfy_env.sample(patched, lat, pos, neg, steps=3, seed=5)

    plans = list(session.planner._plans.values())
    assert plans and all(p.density == 1.0 for p in plans)
    assert len(calls) == 3 * comfy_env.WAN_LAYERS  # every self-attention of every step took the sparse path
    assert session.stats.dense_calls == len(session.stats.calls)  # density 1.0 counts as dense work
    torch.testing.assert_close(sparse, dense, rtol=1e-4, atol=1e-4)


@comfyui
def test_dense_layout_equals_unpatched_hunyuan(nodes, bridge, core, monkeypatch):
    lat = latent(frames=3)
    method = radial(nodes, decay=4.0, sink=False)
    pos, neg = comfy_env.hunyuan_conds(seed=2, text_tokens=12, valid_tokens=8)
    base = comfy_env.tiny_hunyuan_video(seed=4)
    patched = patch(nodes, base, method)
    session = bridge.session_of(patched)
    calls = spy_attend(monkeypatch, session)

    dense = comfy_env.sample(base, lat, pos, neg, steps=3, cfg=1.0, seed=6)
    sparse = comfy_env.sample(patched, lat, pos, neg, steps=3, cfg=1.0, seed=6)

    layers = comfy_env.HUNYUAN_DOUBLE + comfy_env.HUNYUAN_SINGLE
    assert len(calls) == 3 * layers
    for c in calls:
        assert c["grid"] == core.VideoGrid(3, 8, 8, text_tokens=12)
        assert c["kv_length"].tolist() == [3 * 64 + 8]  # the padded text keys are cut off
    plans = list(session.planner._plans.values())
    assert plans and all(p.density == 1.0 for p in plans)
    torch.testing.assert_close(sparse, dense, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------------------------
# Real sparsity changes self-attention only.

@comfyui
def test_radial_changes_self_attention_only_wan(nodes, bridge):
    lat = latent(frames=5)
    pos, neg = comfy_env.wan_conds(seed=7)
    base = comfy_env.tiny_wan_t2v(seed=8)
    ref_rec, sp_rec = Recorder(), Recorder()
    unpatched = ref_rec.install_on(base)
    patched = patch(nodes, sp_rec.install_on(base), radial(nodes), dense_steps=0, dense_layers=1)
    session = bridge.session_of(patched)

    dense = comfy_env.sample(unpatched, lat, pos, neg, steps=3, seed=9)
    sparse = comfy_env.sample(patched, lat, pos, neg, steps=3, seed=9)

    assert session.stats.sparse_calls == 3 * (comfy_env.WAN_LAYERS - 1)
    assert all(p.density < 1.0 for p in session.planner._plans.values())
    assert 0 < rel_err(sparse, dense) < 0.5  # sparse attention did something, and nothing blew up

    ref, got = first_forward(ref_rec.calls), first_forward(sp_rec.calls)
    is_cross = lambda c: c["k"].shape[1] == WAN_TEXT  # noqa: E731
    ref_self, ref_cross = [c for c in ref if not is_cross(c)], [c for c in ref if is_cross(c)]
    got_self, got_cross = [c for c in got if not is_cross(c)], [c for c in got if is_cross(c)]
    assert len(ref_self) == len(ref_cross) == comfy_env.WAN_LAYERS
    # Only layer 0's self-attention stayed on ComfyUI's attention; the sparse ones never reached it.
    assert len(got_self) == 1 and len(got_cross) == comfy_env.WAN_LAYERS
    for name in ("q", "k", "v", "out"):
        assert torch.equal(got_self[0][name], ref_self[0][name])
    for layer, (r, g) in enumerate(zip(ref_cross, got_cross)):
        # Keys and values come from the text alone: identical in every layer.
        assert torch.equal(g["k"], r["k"]) and torch.equal(g["v"], r["v"])
        # ComfyUI's attention ran on them untouched: its output is exactly what the function gives.
        assert torch.equal(g["out"], g["func"](*g["args"], **g["kwargs"]))
        if layer == 0:  # before any sparse layer the queries, hence the outputs, are the same as unpatched
            assert torch.equal(g["q"], r["q"]) and torch.equal(g["out"], r["out"])
        else:  # after a sparse self-attention the queries differ
            assert not torch.equal(g["q"], r["q"])


@comfyui
def test_original_model_untouched(nodes, bridge):
    lat = latent(frames=5)
    pos, neg = comfy_env.wan_conds(seed=11)
    base = comfy_env.tiny_wan_t2v(seed=12)
    options_before = copy.deepcopy(base.model_options)
    wrappers_before = copy.deepcopy(base.wrappers)
    before = comfy_env.sample(base, lat, pos, neg, steps=3, seed=13)

    patched = patch(nodes, base, radial(nodes), dense_steps=0, dense_layers=0)
    assert patched is not base and patched.model is base.model
    comfy_env.sample(patched, lat, pos, neg, steps=3, seed=13)
    assert bridge.session_of(patched).stats.sparse_calls > 0

    assert base.model_options == options_before
    assert "optimized_attention_override" not in base.model_options.get("transformer_options", {})
    assert base.wrappers == wrappers_before
    assert all(bridge.WRAPPER_KEY not in per_type for per_type in base.wrappers.values())
    assert bridge.session_of(base) is None
    after = comfy_env.sample(base, lat, pos, neg, steps=3, seed=13)
    assert torch.equal(after, before)


# ------------------------------------------------------------------------------------------------------------------
# The schedule: which (step, layer) ran sparse in a full sampling run.

STEPS = 8


@comfyui
@pytest.mark.parametrize("dense_steps, sparse_end, dense_layers, sparse_steps, sparse_layers", [
    (0.25, 1.0, 1, range(2, 8), (1, 2)),   # a fraction: the first quarter of 8 steps is dense
    (3, 1.0, 1, range(3, 8), (1, 2)),      # a count: the first 3 steps are dense
    (0.0, 1.0, 2, range(0, 8), (2,)),      # only the first two blocks are dense
    (0.25, 0.75, 0, range(2, 6), (0, 1, 2)),  # the last quarter is dense again
])
def test_schedule_in_full_run(nodes, bridge, dense_steps, sparse_end, dense_layers, sparse_steps, sparse_layers):
    lat = latent(frames=5)
    pos, neg = comfy_env.wan_conds(seed=14)
    patched = patch(nodes, comfy_env.tiny_wan_t2v(seed=15), radial(nodes), dense_steps=dense_steps,
                    sparse_end=sparse_end, dense_layers=dense_layers)
    session = bridge.session_of(patched)
    comfy_env.sample(patched, lat, pos, neg, steps=STEPS, seed=16)

    calls = session.stats.calls
    assert set(calls) == {(s, l) for s in range(STEPS) for l in range(comfy_env.WAN_LAYERS)}
    sparse = {key for key, density in calls.items() if density < 1.0}
    assert sparse == {(s, l) for s in sparse_steps for l in sparse_layers}
    assert session.stats.sparse_calls == len(sparse_steps) * len(sparse_layers)

    stats_before = session.stats
    comfy_env.sample(patched, lat, pos, neg, steps=2, seed=16)  # a new run: statistics start afresh
    assert session.stats is not stats_before
    assert set(session.stats.calls) == {(s, l) for s in range(2) for l in range(comfy_env.WAN_LAYERS)}


# ------------------------------------------------------------------------------------------------------------------
# Batches, resolutions, frame counts.

@comfyui
def test_cfg_batch_sparse_is_exact(nodes, bridge, core, monkeypatch):
    lat = latent(frames=5)
    pos, neg = comfy_env.wan_conds(seed=17)
    method = radial(nodes)
    patched = patch(nodes, comfy_env.tiny_wan_t2v(seed=18), method, dense_steps=0, dense_layers=0)
    calls = spy_attend(monkeypatch, bridge.session_of(patched))
    out = comfy_env.sample(patched, lat, pos, neg, steps=2, cfg=4.0, seed=19)
    assert torch.isfinite(out).all()

    assert calls and all(c["q"].shape[0] == 2 for c in calls)  # cond and uncond in one batch
    grid = core.VideoGrid(5, 8, 8)
    mask = core.radial_block_mask(grid, method)
    assert not bool(mask.all())
    for c in calls:
        if c["layer"] == 0:  # before any cross-attention the two batch elements are still the same
            continue
        want = masked_reference(c["q"], c["k"], c["v"], mask, BLOCK)
        torch.testing.assert_close(c["out"].double(), want, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(c["out"][0], c["out"][1])  # cond and uncond differ: nothing mixed them up


@comfyui
def test_batch_resolution_and_frames_change_between_runs(nodes, bridge, core, monkeypatch):
    pos, neg = comfy_env.wan_conds(seed=20)
    method = radial(nodes)
    patched = patch(nodes, comfy_env.tiny_wan_t2v(seed=21), method, dense_steps=0, dense_layers=0)
    session = bridge.session_of(patched)
    plans_used = []
    plan = session.planner.plan
    monkeypatch.setattr(session.planner, "plan",
                        lambda grid, q, k: plans_used.append((grid, q.shape[0], plan(grid, q, k))) or plans_used[-1][2])

    runs = [(latent(frames=5), core.VideoGrid(5, 8, 8), 2),
            (latent(frames=7, height=16, width=24, batch=2), core.VideoGrid(7, 8, 12), 4),
            (latent(frames=3, height=24, width=16), core.VideoGrid(3, 12, 8), 2),
            (latent(frames=5), core.VideoGrid(5, 8, 8), 2)]
    outputs = []
    for lat, grid, batch in runs:
        plans_used.clear()
        out = comfy_env.sample(patched, lat, pos, neg, steps=2, seed=22)
        assert out.shape == lat.shape and torch.isfinite(out).all()
        outputs.append(out)
        assert plans_used and {(g, b) for g, b, _ in plans_used} == {(grid, batch)}
        want = core.radial_block_mask(grid, method)
        for _, _, p in plans_used:  # the layout is the one of this grid, not a stale one
            assert p.kv_counts.shape[-1] == want.shape[0] == -(-grid.total_tokens // BLOCK)
            assert p.kv_counts.flatten().tolist() == want.sum(-1).tolist()
    assert torch.equal(outputs[0], outputs[-1])  # back to the first shape: the same result


# ------------------------------------------------------------------------------------------------------------------
# HunyuanVideo: text after the video in self-attention, with a padding mask.

@comfyui
def test_hunyuan_sparse_with_text_padding(nodes, bridge, core, monkeypatch):
    lat = latent(frames=5)
    pos, neg = comfy_env.hunyuan_conds(seed=23, text_tokens=12, valid_tokens=7)
    base = comfy_env.tiny_hunyuan_video(seed=24)
    method = radial(nodes, decay=0.95, sink=False)
    patched = patch(nodes, base, method, dense_steps=0, dense_layers=1)
    session = bridge.session_of(patched)
    calls = spy_attend(monkeypatch, session)

    dense = comfy_env.sample(base, lat, pos, neg, steps=3, cfg=1.0, seed=25)
    sparse = comfy_env.sample(patched, lat, pos, neg, steps=3, cfg=1.0, seed=25)

    layers = comfy_env.HUNYUAN_DOUBLE + comfy_env.HUNYUAN_SINGLE
    assert session.stats.sparse_calls == 3 * (layers - 1) == len(calls)
    assert set(session.stats.calls) == {(s, l) for s in range(3) for l in range(layers)}
    assert not session.stats.fallbacks
    grid = core.VideoGrid(5, 8, 8, text_tokens=12)
    mask = core.radial_block_mask(grid, method)
    assert not bool(mask.all()) and bool(mask[-1].all()) and bool(mask[:, -1].all())  # text rows/cols dense
    for c in calls:
        assert c["grid"] == grid and c["kv_length"].tolist() == [5 * 64 + 7]
    c = calls[0]
    torch.testing.assert_close(c["out"].double(), masked_reference(c["q"], c["k"], c["v"], mask, BLOCK, c["kv_length"]),
                               rtol=1e-4, atol=1e-5)
    assert torch.isfinite(sparse).all() and 0 < rel_err(sparse, dense) < 0.5


@comfyui
def test_hunyuan_text_longer_than_video(nodes, bridge, monkeypatch):
    """The text refiner's attention over text alone is not video self-attention, even when the text is longer
    than the video (a tiny image): layers are counted right and nothing falls back."""
    lat = latent(frames=2, height=8, width=8)  # 2 frames of 4 x 4 = 32 video tokens
    pos, neg = comfy_env.hunyuan_conds(seed=26, text_tokens=40, valid_tokens=30)
    patched = patch(nodes, comfy_env.tiny_hunyuan_video(seed=27), radial(nodes, sink=False), dense_steps=0,
                    dense_layers=0)
    session = bridge.session_of(patched)
    calls = spy_attend(monkeypatch, session)
    out = comfy_env.sample(patched, lat, pos, neg, steps=2, cfg=1.0, seed=28)
    layers = comfy_env.HUNYUAN_DOUBLE + comfy_env.HUNYUAN_SINGLE
    assert torch.isfinite(out).all()
    assert set(session.stats.calls) == {(s, l) for s in range(2) for l in range(layers)}
    assert len(calls) == 2 * layers and not session.stats.fallbacks


# ------------------------------------------------------------------------------------------------------------------
# Wan I2V: CLIP image tokens in cross-attention.

@comfyui
def test_wan_i2v_clip_tokens_untouched(nodes, bridge):
    lat = latent(frames=5)
    clip_tokens = 9
    image = torch.randn(1, 16, 5, 16, 16, generator=torch.Generator().manual_seed(29))
    pos, neg = comfy_env.wan_conds(seed=30, clip_tokens=clip_tokens, image_latent=image)
    base = comfy_env.tiny_wan_i2v(seed=31)
    ref_rec, sp_rec = Recorder(), Recorder()
    unpatched = ref_rec.install_on(base)
    patched = patch(nodes, sp_rec.install_on(base), radial(nodes), dense_steps=0, dense_layers=1)
    session = bridge.session_of(patched)

    dense = comfy_env.sample(unpatched, lat, pos, neg, steps=3, seed=32)
    sparse = comfy_env.sample(patched, lat, pos, neg, steps=3, seed=32)

    assert session.stats.sparse_calls == 3 * (comfy_env.WAN_LAYERS - 1)
    assert set(session.stats.calls) == {(s, l) for s in range(3) for l in range(comfy_env.WAN_LAYERS)}
    assert 0 < rel_err(sparse, dense) < 0.5
    ref_img = [c for c in first_forward(ref_rec.calls) if c["k"].shape[1] == clip_tokens]
    got_img = [c for c in first_forward(sp_rec.calls) if c["k"].shape[1] == clip_tokens]
    assert len(ref_img) == len(got_img) == comfy_env.WAN_LAYERS  # every image cross-attention stayed on ComfyUI's
    for layer, (r, g) in enumerate(zip(ref_img, got_img)):
        assert torch.equal(g["k"], r["k"]) and torch.equal(g["v"], r["v"])
        assert torch.equal(g["out"], g["func"](*g["args"], **g["kwargs"]))
        if layer == 0:
            assert torch.equal(g["out"], r["out"])


@comfyui
def test_wan_text_as_long_as_video(nodes, bridge, caplog):
    """Wan pads its text to 512 tokens: a video of exactly as many tokens makes cross-attention look like
    self-attention. It must never take the sparse path (the output stays the unpatched one)."""
    lat = latent(frames=5)
    pos, neg = comfy_env.wan_conds(seed=33, text_tokens=5 * 64)
    base = comfy_env.tiny_wan_t2v(seed=34)
    rec = Recorder()
    patched = patch(nodes, rec.install_on(base), radial(nodes), dense_steps=0, dense_layers=0)
    session = bridge.session_of(patched)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        dense = comfy_env.sample(base, lat, pos, neg, steps=2, seed=35)
        sparse = comfy_env.sample(patched, lat, pos, neg, steps=2, seed=35)
    assert session.stats.sparse_calls == 0
    assert all(layer < comfy_env.WAN_LAYERS for _, layer in session.stats.calls)
    assert len(rec.calls) == 2 * 2 * comfy_env.WAN_LAYERS  # self and cross, all on ComfyUI's attention
    torch.testing.assert_close(sparse, dense, rtol=0, atol=0)
    assert len([r for r in caplog.records if r.name == LOGGER]) == 1


# ------------------------------------------------------------------------------------------------------------------
# Models the pack does not know pass through.

@comfyui
@pytest.mark.parametrize("build, class_name", [(comfy_env.tiny_flux, "Flux"),
                                               (comfy_env.tiny_hunyuan_image, "HunyuanVideo")])
def test_unknown_model_passes_through(nodes, bridge, caplog, build, class_name):
    model = build(seed=0)
    options = copy.deepcopy(model.model_options)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        out = patch(nodes, model, radial(nodes))
    assert out is model and model.model_options == options and bridge.session_of(model) is None
    warnings = [r for r in caplog.records if r.name == LOGGER and r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and class_name in warnings[0].getMessage()


# ------------------------------------------------------------------------------------------------------------------
# The nodes as ComfyUI sees them.

@comfyui
@pytest.mark.parametrize("bad, message", [
    (dict(dense_steps=1.5), "dense_steps"),
    (dict(dense_steps=-0.1), "dense_steps"),
    (dict(sparse_end=1.5), "sparse_end"),
    (dict(dense_layers=-1), "dense_layers"),
    (dict(backend="cuda"), "backend"),
])
def test_patch_node_validation(nodes, bad, message):
    args = dict(dense_steps=0.25, sparse_end=1.0, dense_layers=1, backend="auto", verbose=False, method=None)
    args.update(bad)
    model = comfy_env.tiny_wan_t2v(seed=0)
    with pytest.raises(ValueError, match=message):
        nodes.SparseAttentionPatch().patch(model, **args)


@comfyui
@pytest.mark.parametrize("bad, message", [(dict(decay_factor=0.0), "decay_factor"),
                                          (dict(decay_factor=5.0), "decay_factor"),
                                          (dict(block_size=32), "block_size")])
def test_radial_node_validation(nodes, bad, message):
    args = dict(decay_factor=0.2, block_size=128, attention_sink=True, text_dense=True)
    args.update(bad)
    with pytest.raises(ValueError, match=message):
        nodes.RadialMask().settings(**args)


@comfyui
def test_every_node_input_has_a_tooltip(nodes):
    assert set(nodes.NODE_CLASS_MAPPINGS) == set(nodes.NODE_DISPLAY_NAME_MAPPINGS)
    for name, cls in nodes.NODE_CLASS_MAPPINGS.items():
        spec = cls.INPUT_TYPES()
        inputs = {**spec.get("required", {}), **spec.get("optional", {})}
        assert inputs, name
        for input_name, entry in inputs.items():
            options = entry[1] if len(entry) > 1 else {}
            assert isinstance(options.get("tooltip"), str) and len(options["tooltip"]) > 20, (name, input_name)
        assert callable(getattr(cls(), cls.FUNCTION)) and cls.RETURN_TYPES and cls.CATEGORY and cls.DESCRIPTION
        if "default" in str(inputs):
            for input_name, entry in inputs.items():
                if isinstance(entry[0], list):  # a combo: its default must be one of its choices
                    assert entry[1]["default"] in entry[0], (name, input_name)


@comfyui
def test_import_as_custom_node_under_any_folder_name(tmp_path):
    """ComfyUI's nodes.load_custom_node: spec_from_file_location(<folder path, '.' -> '_x_'>, <folder>/__init__.py),
    module registered in sys.modules, then exec'd. The pack must work under any folder name."""
    folder = tmp_path / "custom_nodes" / "ComfyUI-Sparse.Video-Attn (copy)"
    folder.parent.mkdir()
    folder.symlink_to(REPO_ROOT, target_is_directory=True)
    module_name = str(folder).replace(".", "_x_")
    spec = importlib.util.spec_from_file_location(module_name, folder / "__init__.py")
    assert spec.submodule_search_locations == [str(folder)]
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
        mappings = module.NODE_CLASS_MAPPINGS
        assert set(mappings) == {"SparseAttentionPatch", "RadialAttentionMask", "SparseAttentionInspector",
                                 "SVG2KMeansSettings", "SVGSettings", "AdaSpaSearch", "SparseAttentionCheck"}
        assert set(module.NODE_DISPLAY_NAME_MAPPINGS) == set(mappings)
        for cls in mappings.values():
            assert cls.__module__.startswith(module_name + ".nodes")
            cls.INPUT_TYPES()
    finally:
        for key in [k for k in sys.modules if k == module_name or k.startswith(module_name + ".")]:
            del sys.modules[key]


# ------------------------------------------------------------------------------------------------------------------
# Backends inside ComfyUI.

@comfyui
@pytest.mark.parametrize("family", ["wan", "hunyuan"])
def test_triton_kernel_inside_comfyui(nodes, bridge, core, monkeypatch, family):
    """The real Triton kernel (the CPU interpreter without a GPU) on a bf16 model: each sparse call matches a float64
    masked attention, and the sampled result matches the torch reference backend."""
    if not import_pack("kernels").triton_available("cpu"):  # the tiny models run on the CPU
        pytest.skip("needs Triton's CPU interpreter (TRITON_INTERPRET=1, set by conftest without a GPU)")
    if family == "wan":
        build, conds, cfg, method = comfy_env.tiny_wan_t2v, comfy_env.wan_conds(seed=40), 3.0, radial(nodes)
        grid, kv = core.VideoGrid(5, 8, 8), None
    else:
        build, conds, cfg = comfy_env.tiny_hunyuan_video, comfy_env.hunyuan_conds(seed=40, valid_tokens=5), 1.0
        method, grid, kv = radial(nodes, sink=False), core.VideoGrid(5, 8, 8, text_tokens=12), 5 * 64 + 5
    lat = latent(frames=5)
    outs, calls = {}, None
    for backend in ("reference", "triton"):
        patched = patch(nodes, build(seed=41, dtype=torch.bfloat16), method, dense_steps=0, dense_layers=1,
                        backend=backend)
        session = bridge.session_of(patched)
        recorded = spy_attend(monkeypatch, session)
        outs[backend] = comfy_env.sample(patched, lat, *conds, steps=1, cfg=cfg, seed=42)
        assert session.stats.sparse_calls > 0 and not session.stats.fallbacks
        calls = recorded
    mask = core.radial_block_mask(grid, method)
    for c in calls:
        assert c["q"].dtype == torch.bfloat16 and c["grid"] == grid
        assert (c["kv_length"] is None) if kv is None else c["kv_length"].tolist() == [kv] * c["q"].shape[0]
        want = masked_reference(c["q"], c["k"], c["v"], mask, BLOCK, c["kv_length"])
        torch.testing.assert_close(c["out"].double(), want, rtol=2e-2, atol=2e-2)
    assert rel_err(outs["triton"].float(), outs["reference"].float()) < 2e-2


@comfyui
def test_auto_backend_without_the_kernel_stays_dense(nodes, bridge, caplog):
    """backend 'auto' on tensors the Triton kernel cannot take (CPU) keeps ComfyUI's dense attention, says so once."""
    lat = latent(frames=5)
    pos, neg = comfy_env.wan_conds(seed=43)
    base = comfy_env.tiny_wan_t2v(seed=44)
    patched = patch(nodes, base, radial(nodes), dense_steps=0, dense_layers=0, backend="auto")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        sparse = comfy_env.sample(patched, lat, pos, neg, steps=2, seed=45)
    dense = comfy_env.sample(base, lat, pos, neg, steps=2, seed=45)
    assert bridge.session_of(patched).stats.sparse_calls == 0
    assert torch.equal(sparse, dense)
    assert len([r for r in caplog.records if r.name == LOGGER]) == 1


# ------------------------------------------------------------------------------------------------------------------
# Finding ComfyUI (no ComfyUI needed: fake trees).

def fake_comfyui(path):
    for name in ("comfy/model_patcher.py", "comfy/ldm/wan/model.py"):
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text("")
    return path


def test_find_comfyui_order(tmp_path, monkeypatch):
    env = fake_comfyui(tmp_path / "from_env")
    host = fake_comfyui(tmp_path / "ComfyUI")
    pack = host / "custom_nodes" / "any-name"
    pack.mkdir(parents=True)
    default = fake_comfyui(tmp_path / "home" / "comfy" / "ComfyUI")

    monkeypatch.setenv(comfy_env.ENV_VAR, str(env))
    assert comfy_env.find_comfyui([pack], default)[0] == env.resolve()
    monkeypatch.setenv(comfy_env.ENV_VAR, str(tmp_path / "missing"))  # set but wrong: the next place is used
    assert comfy_env.find_comfyui([pack], default)[0] == host.resolve()
    monkeypatch.delenv(comfy_env.ENV_VAR)
    assert comfy_env.find_comfyui([pack], default)[0] == host.resolve()
    assert comfy_env.find_comfyui([tmp_path / "elsewhere" / "pack"], default)[0] == default.resolve()
    path, note = comfy_env.find_comfyui([tmp_path / "elsewhere" / "pack"], tmp_path / "nothing")
    assert path is None and str(tmp_path / "nothing") in note and "two levels above" in note
