"""AdaSpa's cluster-served heads (core/adaspa_clusters.py): on head-kind inputs (benchmarks/head_kind_inputs.py) the
semantic heads' search sends them to SVG2's clusters and the spatial / temporal ones stay on their blocks; served
heads run exactly SVG2's cluster path, their state keyed by the true head; block heads are plain AdaSpa's; the LSE
(with and without compensation) and the recall on semantic heads. A tiny grid (4 x 8 x 16 tokens, blocks of 64, few
clusters), the torch reference kernels."""

from __future__ import annotations

import sys
from dataclasses import replace

import pytest
import torch

from pack import REPO_ROOT, import_pack

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
from head_kind_inputs import head_kind_qkv  # noqa: E402

core = import_pack("core")
memory = import_pack("core.memory")
metrics = import_pack("core.metrics")
summary = import_pack("core.summary")

GRID = core.VideoGrid(4, 8, 16)
CLUSTERS = core.SVG2Settings(24, 64, 0.9, 0.10, 10, 2)
KINDS = ("semantic", "spatial", "temporal", "semantic")
SERVED = (0, 3)
# search steps of a 10-step run: 2 (first search, dense: no LSE primed) and 6 (later search, on the cached LSE)
STEPS = (2, 3, 6)


def settings(clusters: bool) -> core.AdaSpaSettings:
    return core.AdaSpaSettings(block_size=64, search_steps=(2, 6), cluster_heads=clusters, clusters=CLUSTERS)


def call_of(q, k, v, step, head_offset=3, **kwargs):
    return core.AttentionCall(grid=GRID, layer=1, step=step, total_steps=10, q=q, k=k, v=v, backend="reference",
                              head_offset=head_offset, want_lse=True, **kwargs)


@pytest.fixture(scope="module")
def qkv():
    return head_kind_qkv(KINDS, GRID.frames, GRID.height, GRID.width, seed=1)


def run(qkv, clusters: bool, **kwargs):
    """(planner, {step: (call, output)}) of heads 3..6 of layer 1 at STEPS."""
    planner = settings(clusters).make_planner()
    calls = {}
    for step in STEPS:
        call = call_of(*qkv, step, **kwargs)
        calls[step] = (call, planner.attend(call)[0])
    return planner, calls


@pytest.fixture(scope="module")
def runs(qkv):
    return {clusters: run(qkv, clusters) for clusters in (True, False)}


def entry(planner):
    return planner._layers[1][(GRID, 1, torch.device("cpu"), 3, len(KINDS))]


def test_semantic_heads_are_cluster_served_and_block_heads_are_not(runs):
    planner = runs[True][0]
    assert entry(planner).clustered == (True, False, False, True)
    assert planner.class_counts() == {"block": 2, "cluster": 2}
    assert entry(runs[False][0]).clustered == () and runs[False][0].class_counts() == {}


def test_served_heads_run_svg2_keyed_by_the_true_head(qkv, runs):
    """Between searches each served head equals SVG2's planner on that head alone with the same history (the search's
    probe, then the call's warm-started k-means), its centroids kept under (layer, true head)."""
    planner, calls = runs[True]
    assert {key for key in planner.cache_bytes() if key[0] == "cluster centroids"} == \
        {("cluster centroids", 1, 3 + h) for h in SERVED}
    for h in SERVED:
        reference = core.SVG2Planner(CLUSTERS, 64)
        probe = memory.heads_of(call_of(*qkv, 2), slice(h, h + 1), None)
        reference.attend(probe)  # the first search's probe
        one = memory.heads_of(call_of(*qkv, 3), slice(h, h + 1), None)
        want, _ = reference.attend(one)
        call, out = calls[3]
        assert torch.allclose(out[:, h:h + 1], want, atol=1e-6, rtol=0)
        assert torch.allclose(call.lse[:, h:h + 1], one.lse, atol=1e-6, rtol=0)


def test_block_heads_are_plain_adaspas(runs):
    for step in STEPS:
        (call, out), (plain_call, plain_out) = runs[True][1][step], runs[False][1][step]
        assert torch.equal(out[:, 1:3], plain_out[:, 1:3])
        assert torch.equal(call.lse[:, 1:3], plain_call.lse[:, 1:3])


def test_first_search_is_dense_and_later_search_keeps_the_clusters(qkv, runs):
    planner, calls = runs[True]
    call, out = calls[2]  # nothing primed: the dense pass, as plain AdaSpa
    assert torch.allclose(out, torch.nn.functional.scaled_dot_product_attention(*qkv), atol=1e-5, rtol=0)
    assert entry(planner).searched_step == 6 and entry(planner).clustered == (True, False, False, True)
    dense = metrics.dense_lse(qkv[0], qkv[1])
    call, _ = calls[6]  # the later search ran sparse: served heads on their clusters
    assert float(metrics.recall_from_lse(call.lse[:, 0], dense[:, 0]).mean()) > 0.8


def test_recall_on_semantic_heads_goes_up(qkv, runs):
    dense = metrics.dense_lse(qkv[0], qkv[1])
    dense_out = torch.nn.functional.scaled_dot_product_attention(*qkv)
    for h in SERVED:
        recall = {c: float(metrics.recall_from_lse(runs[c][1][3][0].lse[:, h], dense[:, h]).mean()) for c in runs}
        error = {c: metrics.relative_error(runs[c][1][3][1][:, h], dense_out[:, h]) for c in runs}
        assert recall[True] > recall[False] + 0.3 and recall[True] > 0.8, recall
        assert error[True] < 0.5 * error[False], error


def test_check_measures_the_served_heads(qkv, runs):
    """Sparse Attention Check's measure, on a call's output and LSE: served heads keep their clusters' mass, block
    heads the same as plain AdaSpa's."""
    measured = {}
    for clusters in runs:
        call, out = runs[clusters][1][3]
        results = core.CheckResults(core.CheckSettings(rows=16))
        results.record(3, 1, *qkv, out, call.lse)
        measured[clusters] = results.head_recall()
    for h in SERVED:
        assert measured[True][(1, h)] > 0.8 > measured[False][(1, h)] + 0.3
    for h in (1, 2):
        assert measured[True][(1, h)] == measured[False][(1, h)]


def test_compensation_keeps_working(qkv):
    """With compensation the served heads' output and compensated LSE are SVG2's compensated ones; the block heads'
    plain AdaSpa's; every row's compensated LSE is at least its exact one (the pooled terms add mass)."""
    planner, calls = run(qkv, True, compensate=True)
    _, plain = run(qkv, False, compensate=True)
    call, out = calls[3]
    assert torch.equal(out[:, 1:3], plain[3][1][:, 1:3])
    assert torch.equal(call.lse_compensated[:, 1:3], plain[3][0].lse_compensated[:, 1:3])
    assert bool((call.lse_compensated >= call.lse - 1e-5).all())
    for h in SERVED:
        reference = core.SVG2Planner(CLUSTERS, 64)
        reference.attend(memory.heads_of(call_of(*qkv, 2), slice(h, h + 1), None))
        one = memory.heads_of(call_of(*qkv, 3, compensate=True), slice(h, h + 1), None)
        want, _ = reference.attend(one)
        assert torch.allclose(out[:, h:h + 1], want, atol=1e-6, rtol=0)
        assert torch.allclose(call.lse_compensated[:, h:h + 1], one.lse_compensated, atol=1e-6, rtol=0)


def test_conditionings_share_the_served_heads(qkv):
    """A batch of two conditionings (the second alike, as uncond is to cond): the search runs on the first chunk and
    the second chunk's served heads run its clusters too, keeping its mass."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.cat([t, t + 0.05 * torch.randn(t.shape, generator=gen)]) for t in qkv)
    planner = settings(True).make_planner()
    for step in STEPS[:2]:
        call = call_of(q, k, v, step, conditionings=2)
        out, _ = planner.attend(call)
    assert planner._layers[1][(GRID, 2, torch.device("cpu"), 3, len(KINDS))].clustered == (True, False, False, True)
    dense = metrics.dense_lse(q, k)
    assert float(metrics.recall_from_lse(call.lse[1:, 0], dense[1:, 0]).mean()) > 0.8


def test_inspector_mask_and_summary_count_the_heads(qkv):
    session = core.SparseAttentionSession(settings(True), core.SparseSchedule(dense_steps=0, dense_layers=0),
                                          backend="reference")
    session.begin_run()
    sigmas = torch.linspace(1.0, 0.0, 11)
    for step in (2, 3):
        ctx = session.forward_context(GRID, sigma=float(sigmas[step]), sample_sigmas=sigmas)
        _, density = session.attend(ctx, 0, *qkv)
        session.record_sparse(ctx, 0, GRID, density)
    mask = session.block_mask(0)
    nb = GRID.total_tokens // 64
    assert mask.shape == (len(KINDS), nb, nb) and mask.dtype == torch.bool
    for h in SERVED:
        assert torch.equal(mask[h], session.planner._clusters.head_tiles(GRID, 0, h))
    text = summary.run_summary(session)
    assert "AdaSpa head classes (the last search of every sparse layer): 2 block, 2 cluster" in text


def test_heads_no_longer_served_drop_their_centroids(qkv):
    """A search that finds a served head's blocks enough again (or its clusters no longer enough) drops its
    centroids; heads probed and rejected keep none."""
    served = import_pack("core.adaspa_clusters").cluster_served
    clusters = core.SVG2Planner(CLUSTERS, 64)
    first, lse = call_of(*qkv, 2), metrics.dense_lse(qkv[0], qkv[1])
    missed = torch.tensor([[0.0, 1.0, 0.0, 0.0]])  # the temporal head probed too: its clusters are near dense here
    assert served(first, lse, missed, clusters, recall=0.8, max_density=0.3) == (True, False, False, True)
    assert set(clusters.cache_bytes()) == {(1, 3 + h) for h in SERVED}
    assert served(first, lse, torch.ones(1, len(KINDS)), clusters, recall=0.8, max_density=0.3) == (False,) * 4
    assert clusters.cache_bytes() == {}


def test_no_cluster_heads_when_the_grid_has_fewer_tokens_than_clusters(qkv):
    planner = replace(settings(True), clusters=core.SVG2Settings(600, 1000)).make_planner()
    for step in STEPS[:2]:
        planner.attend(call_of(*qkv, step))
    assert planner.class_counts() == {"block": len(KINDS), "cluster": 0}


@pytest.mark.parametrize("kwargs, message", [
    (dict(cluster_heads="on"), "cluster_heads must be True or False"),
    (dict(clusters=(300, 1000)), "clusters must be SVG2Settings"),
])
def test_settings_reject_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        core.AdaSpaSettings(**kwargs)
