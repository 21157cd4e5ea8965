"""SVG's semantic class (core/svg_semantic.py): on head-kind inputs (benchmarks/head_kind_inputs.py) the semantic
heads are profiled semantic and the spatial / temporal ones are not; semantic heads run exactly SVG2's cluster path,
their state keyed by the true head; the block heads are untouched; recall on semantic heads goes up. A tiny grid
(4 x 8 x 16 tokens, blocks of 64, few clusters), the torch reference kernels."""

from __future__ import annotations

import sys

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


def settings(semantic: bool) -> core.SVGSettings:
    return core.SVGSettings(sparsity=0.3, block_size=64, semantic_heads=semantic, semantic_clusters=CLUSTERS)


def call_of(q, k, v, head_offset=0, want_lse=True):
    return core.AttentionCall(grid=GRID, layer=1, step=5, total_steps=10, q=q, k=k, v=v, backend="reference",
                              head_offset=head_offset, want_lse=want_lse)


@pytest.fixture(scope="module")
def qkv():
    return head_kind_qkv(KINDS, GRID.frames, GRID.height, GRID.width, seed=1)


@pytest.fixture(scope="module")
def runs(qkv):
    """{semantic on / off: (planner, call, output)} of one call of heads 3..6 of the layer (head_offset 3)."""
    result = {}
    for semantic in (True, False):
        planner = settings(semantic).make_planner()
        call = call_of(*qkv, head_offset=3)
        out, _ = planner.attend(call)
        result[semantic] = (planner, call, out)
    return result


def test_semantic_heads_are_classified_semantic_and_block_heads_are_not(runs):
    planner = runs[True][0]
    classes = planner._classes[(1, GRID, 3, len(KINDS))]
    assert tuple(classes.kind(h) for h in range(len(KINDS))) == KINDS
    assert planner.class_counts() == {"spatial": 1, "temporal": 1, "semantic": 2}
    plain = runs[False][0]._classes[(1, GRID, 3, len(KINDS))]
    assert not any(plain.kind(h) == "semantic" for h in range(len(KINDS)))


def test_semantic_heads_run_svg2_keyed_by_the_true_head(qkv, runs):
    """Each semantic head equals SVG2's planner run on that head alone with the same history (the profile's
    k-means, then the call's warm-started one), its centroids kept under (layer, true head)."""
    planner, call, out = runs[True]
    assert set(planner._clusters.cache_bytes()) == {(1, 3), (1, 6)}
    for h in (0, 3):
        reference = core.SVG2Planner(CLUSTERS)
        one = memory.heads_of(call_of(*qkv, head_offset=3), slice(h, h + 1), None)
        reference.plan_clusters(one)
        want, _ = reference.attend(one)
        assert torch.allclose(out[:, h:h + 1], want, atol=1e-6, rtol=0)
        assert torch.allclose(call.lse[:, h:h + 1], one.lse, atol=1e-6, rtol=0)


def test_block_heads_are_the_plain_svg_ones(runs):
    _, call, out = runs[True]
    _, plain_call, plain_out = runs[False]
    assert torch.equal(out[:, 1:3], plain_out[:, 1:3])
    assert torch.equal(call.lse[:, 1:3], plain_call.lse[:, 1:3])


def test_recall_on_semantic_heads_goes_up(qkv, runs):
    dense = metrics.dense_lse(qkv[0], qkv[1])
    dense_out = torch.nn.functional.scaled_dot_product_attention(*qkv)
    for h in (0, 3):
        recall = {s: float(metrics.recall_from_lse(runs[s][1].lse[:, h], dense[:, h]).mean()) for s in runs}
        error = {s: metrics.relative_error(runs[s][2][:, h], dense_out[:, h]) for s in runs}
        assert recall[True] > recall[False] + 0.3 and recall[True] > 0.85, recall
        assert error[True] < 0.5 * error[False], error


def test_inspector_mask_and_summary_count_the_classes(qkv):
    session = core.SparseAttentionSession(settings(True), core.SparseSchedule(dense_steps=0, dense_layers=0),
                                          backend="reference")
    session.begin_run()
    ctx = session.forward_context(GRID, sigma=1.0, sample_sigmas=torch.tensor([1.0, 0.5, 0.0]))
    _, density = session.attend(ctx, 0, *qkv)
    session.record_sparse(ctx, 0, GRID, density)
    mask = session.block_mask(0)
    nb = -(-GRID.total_tokens // 64)
    assert mask.shape == (len(KINDS), nb, nb) and mask.dtype == torch.bool
    assert torch.equal(mask[0], session.planner._clusters.head_tiles(GRID, 0, 0))
    text = summary.run_summary(session)
    assert "SVG head classes (the last profile of every sparse layer): 1 spatial, 1 temporal, 2 semantic" in text


def test_no_semantic_class_when_the_grid_has_fewer_tokens_than_clusters(qkv):
    few = core.SVGSettings(sparsity=0.3, block_size=64, semantic_heads=True,
                           semantic_clusters=core.SVG2Settings(600, 1000))
    planner = few.make_planner()
    planner.attend(call_of(*qkv))
    assert planner.class_counts()["semantic"] == 0


@pytest.mark.parametrize("kwargs, message", [
    (dict(semantic_heads="on"), "semantic_heads must be True or False"),
    (dict(semantic_clusters=(300, 1000)), "semantic_clusters must be SVG2Settings"),
])
def test_settings_reject_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        core.SVGSettings(**kwargs)


def test_sampled_masses_against_a_direct_sum():
    """Mass of each candidate mask on the sampled rows, with key padding, equals the masked softmax summed per row
    (float64, one head at a time); per-head masks (the cluster layout's) select their own head."""
    gen = torch.Generator().manual_seed(0)
    B, H, R, L, D = 2, 3, 5, 40, 16
    q, k = torch.randn(B, H, R, D, generator=gen), torch.randn(B, H, L, D, generator=gen)
    kv_length = torch.tensor([L, 29])
    semantic = import_pack("core.svg_semantic")
    for keep in (torch.rand(2, 1, 1, R, L, generator=gen) < 0.4, torch.rand(1, B, H, R, L, generator=gen) < 0.4):
        got = semantic.sampled_masses(q, k, keep, kv_length)
        for c in range(keep.shape[0]):
            for b in range(B):
                for h in range(H):
                    s = (q[b, h].double() @ k[b, h].double().T / D ** 0.5)[:, :int(kv_length[b])]
                    mask = keep[c, min(b, keep.shape[1] - 1), min(h, keep.shape[2] - 1), :, :int(kv_length[b])]
                    want = (s.softmax(-1) * mask).sum(-1).mean()
                    assert abs(float(got[c, b, h]) - float(want)) < 1e-5
