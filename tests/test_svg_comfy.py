"""SVG inside real ComfyUI: the SVG Settings node, and tiny WanModel / HunyuanVideo sampled through the patch, every
sparse call checked against the float64 oracle of its heads' layouts (tests/test_svg.py states the rule).
Without ComfyUI these tests are skipped (loudly, see conftest.py)."""

from __future__ import annotations

import pytest
import torch

import comfy_env
from pack import import_pack
from test_comfy_integration import latent, patch, rel_err
from test_svg import head_masks, masked_oracle

comfyui = pytest.mark.comfyui

core = import_pack("core")


def svg_node(nodes, sparsity=0.3, sample_fraction=0.001, reprofile_every=1, block_size=64, attention_sink=True):
    return nodes.NODE_CLASS_MAPPINGS["SVGSettings"]().settings(sparsity, sample_fraction, reprofile_every,
                                                               block_size, attention_sink)[0]


def spy_classes(monkeypatch, session):
    """Record every sparse call (q, k, v, kv_length, output) with the head classes it ran with."""
    calls = []
    original = session.attend

    def attend(ctx, layer, q, k, v, kv_length=None, out=None, head_offset=0, **routing):
        result, density = original(ctx, layer, q, k, v, kv_length=kv_length, out=out, head_offset=head_offset,
                                   **routing)
        grid = ctx.grid_for(q.shape[2])
        classes = session.planner._classes[(layer, grid, head_offset, q.shape[1])]
        calls.append(dict(grid=grid, layer=layer, step=ctx.step, q=q.detach().clone(), k=k.detach().clone(),
                          v=v.detach().clone(), kv_length=kv_length, out=result.detach().clone(),
                          temporal=classes.temporal, profiled_at=classes.step))
        return result, density

    monkeypatch.setattr(session, "attend", attend)
    return calls


@comfyui
def test_node_builds_settings_and_rejects_bad_values(nodes):
    node = nodes.NODE_CLASS_MAPPINGS["SVGSettings"]
    assert nodes.NODE_DISPLAY_NAME_MAPPINGS["SVGSettings"] == "SVG Settings"
    assert node.RETURN_TYPES == ("SPARSE_ATTENTION_METHOD",)
    inputs = node.INPUT_TYPES()["required"]
    defaults = {name: spec[1]["default"] for name, spec in inputs.items()}
    assert node().settings(**defaults)[0] == core.SVGSettings()
    for preset in core.SVG_PRESETS:  # the reference settings per model are in the tooltip and the description
        assert preset.text() in inputs["sparsity"][1]["tooltip"] and preset.text() in node.DESCRIPTION
    for kwargs, message in [(dict(sparsity=0.0), r"sparsity must be in \(0, 1\)"),
                            (dict(sparsity=1.2), r"sparsity must be in \(0, 1\)"),
                            (dict(sample_fraction=0.0), r"sample_fraction must be in \(0, 1\]"),
                            (dict(reprofile_every=0), "reprofile_every must be a whole number")]:
        with pytest.raises(ValueError, match=message):
            node().settings(**{**defaults, **kwargs})


@comfyui
@pytest.mark.parametrize("reprofile_every", [1, 2])
def test_wan_svg_calls_equal_their_layouts(nodes, bridge, monkeypatch, reprofile_every):
    lat = latent(frames=5)
    pos, neg = comfy_env.wan_conds(seed=41)
    base = comfy_env.tiny_wan_t2v(seed=42)
    method = svg_node(nodes, reprofile_every=reprofile_every)
    patched = patch(nodes, base, method, dense_steps=0, dense_layers=1)
    session = bridge.session_of(patched)
    calls = spy_classes(monkeypatch, session)

    dense = comfy_env.sample(base, lat, pos, neg, steps=3, seed=43)
    sparse = comfy_env.sample(patched, lat, pos, neg, steps=3, seed=43)

    grid = core.VideoGrid(5, 8, 8)
    assert len(calls) == session.stats.sparse_calls == 3 * (comfy_env.WAN_LAYERS - 1)
    assert not session.stats.fallbacks
    assert torch.isfinite(sparse).all() and 0 < rel_err(sparse, dense) < 0.5
    # cond and uncond in one batch; profiled at steps 0 (and 2) when re-profiled every 2 steps, else every step
    assert {c["profiled_at"] for c in calls} == ({0, 1, 2} if reprofile_every == 1 else {0, 2})
    assert session.planner.profiled_calls == len({(c["layer"], c["profiled_at"]) for c in calls})
    for c in calls:
        assert c["grid"] == grid and c["q"].shape[:2] == (2, comfy_env.WAN_HEADS)
        want = masked_oracle(c["q"], c["k"], c["v"], head_masks(grid, method, c["temporal"]))
        torch.testing.assert_close(c["out"].double(), want, rtol=1e-4, atol=1e-5)
    mask = session.block_mask(1)  # what the Inspector draws: one layout per head
    assert mask.shape == (comfy_env.WAN_HEADS, 5, 5)


@comfyui
def test_hunyuan_svg_with_text_padding(nodes, bridge, monkeypatch):
    lat = latent(frames=5)
    pos, neg = comfy_env.hunyuan_conds(seed=44, text_tokens=12, valid_tokens=7)
    base = comfy_env.tiny_hunyuan_video(seed=45)
    method = svg_node(nodes, sparsity=0.25, attention_sink=False)
    patched = patch(nodes, base, method, dense_steps=0, dense_layers=1)
    session = bridge.session_of(patched)
    calls = spy_classes(monkeypatch, session)

    dense = comfy_env.sample(base, lat, pos, neg, steps=2, cfg=1.0, seed=46)
    sparse = comfy_env.sample(patched, lat, pos, neg, steps=2, cfg=1.0, seed=46)

    layers = comfy_env.HUNYUAN_DOUBLE + comfy_env.HUNYUAN_SINGLE
    assert len(calls) == session.stats.sparse_calls == 2 * (layers - 1) and not session.stats.fallbacks
    grid = core.VideoGrid(5, 8, 8, text_tokens=12)
    for c in calls:
        assert c["grid"] == grid and c["kv_length"].tolist() == [5 * 64 + 7]
        want = masked_oracle(c["q"], c["k"], c["v"], head_masks(grid, method, c["temporal"]), c["kv_length"])
        torch.testing.assert_close(c["out"].double(), want, rtol=1e-4, atol=1e-5)
    assert torch.isfinite(sparse).all() and 0 < rel_err(sparse, dense) < 0.5


@comfyui
def test_semantic_heads_is_the_last_optional_input(nodes):
    """Old workflows (five widgets) load unchanged: the new input is optional, last, and off when absent."""
    node = nodes.NODE_CLASS_MAPPINGS["SVGSettings"]
    types = node.INPUT_TYPES()
    assert list(types["optional"]) == ["semantic_heads"] and types["optional"]["semantic_heads"][0] == "BOOLEAN"
    defaults = {name: spec[1]["default"] for name, spec in types["required"].items()}
    assert node().settings(**defaults)[0].semantic_heads is False
    assert node().settings(**defaults, semantic_heads=True)[0] == core.SVGSettings(semantic_heads=True)


@comfyui
def test_node_bounds_are_accepted(nodes):
    """Every value the UI lets through at its bounds builds settings: the widgets never offer what the core refuses."""
    node = nodes.NODE_CLASS_MAPPINGS["SVGSettings"]
    spec = node.INPUT_TYPES()["required"]
    defaults = {name: entry[1]["default"] for name, entry in spec.items()}
    for name, (_, options) in spec.items():
        for bound in ("min", "max"):
            if bound in options:
                node().settings(**{**defaults, name: options[bound]})
