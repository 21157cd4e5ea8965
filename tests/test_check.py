"""Sparse Attention Check: the measure on synthetic calls (no ComfyUI), and on ComfyUI's real tiny Wan through its
sampler: a full layout keeps everything, a sparse layer is flagged with advice, the sampled video never changes,
the whole-step comparison and the picture, and bad settings named at the node."""

from __future__ import annotations

import logging
import math

import pytest
import torch

import comfy_env
from pack import import_pack

core = import_pack("core")
report = import_pack("core.report")
comfyui = pytest.mark.comfyui
LOGGER = "sparse_video_attention"


def attention_with_lse(q, k, v, allowed):
    """Reference (B, H, L, D) attention restricted to ``allowed`` (L, L) keys per query, and the LSE of those keys."""
    s = torch.einsum("bhqd,bhkd->bhqk", q, k) * q.shape[-1] ** -0.5
    s = s.masked_fill(~allowed, float("-inf"))
    return torch.softmax(s, -1) @ v, torch.logsumexp(s, -1)


def test_settings_and_steps_are_checked():
    with pytest.raises(ValueError, match="rows"):
        core.CheckSettings(rows=0)
    with pytest.raises(ValueError, match="steps"):
        core.parse_steps("middle")
    with pytest.raises(ValueError, match="steps"):
        core.CheckSettings(steps=(2.5,))
    settings = core.CheckSettings(steps=core.parse_steps("0.5, 3, 9"))
    assert settings.step_indices(8) == ({4, 3}, {9})
    assert core.CheckSettings(steps=(0.5,), compare_step=True).compares(4, 8)


def test_recall_and_error_of_a_full_and_a_cut_layout():
    gen = torch.Generator().manual_seed(0)
    B, H, L, D = 2, 2, 96, 32
    q, k, v = (torch.randn(B, H, L, D, generator=gen) for _ in range(3))
    full = torch.ones(L, L, dtype=torch.bool)
    results = core.CheckResults(core.CheckSettings(rows=16))
    out, lse = attention_with_lse(q, k, v, full)
    results.record(0, 0, q, k, v, out, lse)
    cut = torch.ones(L, L, dtype=torch.bool).tril()  # each query keeps the keys up to itself
    out, lse = attention_with_lse(q, k, v, cut)
    results.record(0, 1, q, k, v, out, lse)
    recall, error = results.head_recall(), results.head_error()
    assert all(recall[(0, h)] == pytest.approx(1.0, abs=1e-5) and error[(0, h)] < 1e-5 for h in range(H))
    rows = torch.linspace(0, L - 1, 16).round().long()
    s = torch.einsum("hqd,hkd->hqk", q[0][:, rows], k[0]) * D ** -0.5
    exact = torch.exp(torch.logsumexp(s.masked_fill(~cut[rows], float("-inf")), -1) - torch.logsumexp(s, -1))
    for h in range(H):  # the mass the cut layout keeps, exactly, and an error that is not zero
        assert recall[(1, h)] == pytest.approx(float(exact[h].mean()), rel=1e-4) and error[(1, h)] > 0.05


def test_advice_names_the_layers_to_keep_dense():
    results = core.CheckResults(core.CheckSettings())
    for layer, kept in enumerate([1.0, 0.5, 0.6, 0.95, 0.7]):
        results.recall[(layer, 0)] = [kept * 10, 10]
        results.error[(layer, 0)] = [0.0, 1.0]
    lines = results.advice(dense_layers=1)
    assert "layers 1-2 keep as little as 50% of the attention mass: set dense_layers 3" in lines[0]
    assert lines[1].startswith("layers 4 keep less than 80%")
    assert "3 heads keep less than 80%" in lines[2] and "1/0 (50%)" in lines[2]


# ------------------------------------------------------------------------------------------------------------------
# On ComfyUI's real tiny Wan

def patched(nodes, decay=4.0, dense_layers=0):
    method = nodes.RadialMask().settings(decay, 64, True, True)[0]
    model = comfy_env.tiny_wan_t2v(seed=1)
    return nodes.SparseAttentionPatch().patch(model, 0.0, 1.0, dense_layers, "reference", False, method)[0]


def checked(nodes, model, steps="0, 2", rows=32, compare_step=False, floor=0.8):
    return nodes.SparseAttentionCheck().check(model, steps, rows, compare_step, floor)[0]


def run(model, frames=3):
    pos, neg = comfy_env.wan_conds(seed=2)
    return comfy_env.sample(model, torch.zeros(1, 16, frames, 16, 16), pos, neg, steps=3, seed=3)


@comfyui
def test_a_full_layout_keeps_everything_and_the_video_is_the_same(nodes, bridge):
    model = patched(nodes)
    without = run(model)
    with_check = checked(nodes, model)
    assert torch.equal(run(with_check), without)  # the check never changes the sampled video
    check = bridge.session_of(with_check).check
    assert check.steps == {0, 2}
    recall, error = check.head_recall(), check.head_error()
    assert set(recall) == {(layer, h) for layer in range(comfy_env.WAN_LAYERS) for h in range(comfy_env.WAN_HEADS)}
    assert min(recall.values()) > 1 - 1e-5 and max(error.values()) < 1e-4
    assert check.advice(0) == []


@comfyui
def test_a_sparse_layer_is_flagged_and_drawn(nodes, bridge, caplog):
    """Layers 0-1 dense, layer 2 sparse on purpose (a narrow Radial keeps ~88% of this tiny model's diffuse
    attention mass): with a floor above that, layer 2 alone is flagged, and the advice is one more dense layer."""
    model = checked(nodes, patched(nodes, decay=0.05, dense_layers=2), rows=48, compare_step=True, floor=0.95)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        out = run(model, frames=5)
    session = bridge.session_of(model)
    check = session.check
    assert torch.isfinite(out).all() and session.stats.sparse_calls > 0
    assert list(check.layer_recall()) == [2] and check.layer_recall()[2] < 0.95  # dense layers are not measured
    assert max(check.head_error().values()) > 0
    assert math.isfinite(check.psnr[0])  # the whole-step comparison at the first checked step
    summary = "\n".join(r.getMessage() for r in caplog.records if r.name == LOGGER)
    assert "attention mass kept" in summary and "step 0, the whole prediction sparse against dense: PSNR" in summary
    assert "advice: layers 2 keep as little as" in summary and "set dense_layers 3" in summary
    assert "for a bug report: ComfyUI " in summary and "Radial (decay_factor 0.05" in summary
    images = nodes.SparseAttentionInspector().inspect(model, {"samples": out}, 1, 0, 320)
    assert len(images) == 4 and images[3].shape[0] == 1 and images[3].shape[2] == 320
    picture = report.inspect(session, layer=1, max_size=320)[3]
    assert picture.info["title"].startswith("Radial: attention mass kept per layer and head")


@comfyui
def test_steps_past_the_run_warn_once_and_an_unpatched_model_has_nothing_to_check(nodes, bridge, caplog):
    model = checked(nodes, patched(nodes), steps="7")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        run(model)
        unpatched = comfy_env.tiny_wan_t2v(seed=1)
        assert nodes.SparseAttentionCheck().check(unpatched, "0.5", 64, False, 0.8)[0] is unpatched
    messages = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert sum("[7] are past this run's last step" in m for m in messages) == 1
    assert sum("nothing to check" in m for m in messages) == 1
    card = report.inspect(None)[3]
    assert card.info["title"] == report.NOT_PATCHED


@comfyui
@pytest.mark.parametrize("steps, rows, floor, words", [("half", 64, 0.8, "steps"), ("0.5", 0, 0.8, "rows"),
                                                      ("1.5", 64, 0.8, "steps"), ("0.5", 64, 0.0, "floor")])
def test_bad_settings_are_named_at_the_node(nodes, steps, rows, floor, words):
    with pytest.raises(ValueError, match=words):
        nodes.SparseAttentionCheck().check(patched(nodes), steps, rows, False, floor)
