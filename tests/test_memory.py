"""A sparse call holds at most a quarter of its output beyond dense attention's peak: the planners' memory-heavy
stages run a few heads at a time (core.memory). The few-heads path gives the same output and the same per-head state
as every head at once; the chunk sizes at the Wan 14B 720p shape are the largest the byte budget allows. (Peaks on the
GPU: benchmarks/memory.py. Radial needs no stage of its own: it writes its output in place.)"""

from __future__ import annotations

import pytest
import torch

from pack import import_pack

core = import_pack("core")
memory = import_pack("core.memory")
svg = import_pack("core.svg")
adaspa = import_pack("core.adaspa")

GRID = core.VideoGrid(4, 6, 9, text_tokens=13)  # 216 video tokens, then 13 text: 4 blocks of 64
WHOLE, FEW = 1e6, 1e-9  # TRANSIENT_SHARE: every head at once / one head at a time
SHIPPED_FLOOR = memory.TRANSIENT_FLOOR  # (read at import: conftest zeroes it for the tests' tiny calls)


def make_call(step, H=3, B=2, D=32, seed=0):
    gen = torch.Generator().manual_seed(seed + step)
    L = GRID.total_tokens
    q, k, v = (torch.randn(B, H, L, D, generator=gen) for _ in range(3))
    return core.AttentionCall(grid=GRID, layer=1, step=step, total_steps=4, q=q, k=k, v=v,
                              kv_length=torch.tensor([L, L - 5]), backend="reference")


def run_steps(settings, share, monkeypatch, steps=2, **planner_patches):
    """(outputs per step, planner) of ``steps`` calls with TRANSIENT_SHARE ``share``."""
    monkeypatch.setattr(memory, "TRANSIENT_SHARE", share)
    planner = settings.make_planner()
    for name, value in planner_patches.items():
        monkeypatch.setattr(planner, name, value)
    outputs = [planner.attend(make_call(step))[0] for step in range(steps)]
    return outputs, planner


def count_heads(monkeypatch, module, name) -> list:
    """Spy on ``module.name(q, ...)``: the head count of each call's q."""
    heads, original = [], getattr(module, name)

    def spy(q, *args, **kwargs):
        heads.append(q.shape[1])
        return original(q, *args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    return heads


def assert_same_outputs(few, whole):
    for a, b in zip(few, whole):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_svg2_few_heads_equal_all_heads(monkeypatch):
    """Cold then warm-started k-means: outputs, centroids per head (keyed by the true head) and drawings agree."""
    settings = core.SVG2Settings(query_clusters=5, key_clusters=9, top_p=0.6, min_key_ratio=0.2, first_iterations=3,
                                 later_iterations=1)
    whole, all_heads = run_steps(settings, WHOLE, monkeypatch)
    few, one_head = run_steps(settings, FEW, monkeypatch)
    assert_same_outputs(few, whole)
    assert set(all_heads.cache_bytes()) == {(1, 0)} and set(one_head.cache_bytes()) == {(1, 0), (1, 1), (1, 2)}
    for part in ("queries", "keys"):
        joined = torch.cat([getattr(one_head._centroids[(1, h)], part) for h in range(3)], dim=1)
        torch.testing.assert_close(joined, getattr(all_heads._centroids[(1, 0)], part), rtol=1e-6, atol=1e-6)
    assert torch.equal(one_head.block_mask(GRID, 1), all_heads.block_mask(GRID, 1))


def test_adaspa_search_few_heads_equal_all_heads(monkeypatch):
    """A search with its own dense pass (step 0), then the sparse step: the same pattern, recall and outputs."""
    settings = core.AdaSpaSettings(recall=0.7, search_steps=(0,), block_size=64, min_density=0.2, max_density=0.8)
    searched = count_heads(monkeypatch, adaspa, "block_mass")
    whole, all_heads = run_steps(settings, WHOLE, monkeypatch)
    few, one_head = run_steps(settings, FEW, monkeypatch)
    assert searched == [3, 1, 1, 1]
    assert_same_outputs(few, whole)
    (a,), (b,) = (list(p._layers[1].values()) for p in (one_head, all_heads))
    assert torch.equal(a.pattern.kv_counts, b.pattern.kv_counts) and torch.equal(a.pattern.recall, b.pattern.recall)
    assert a.pattern.head_density == b.pattern.head_density and a.pattern.density == pytest.approx(b.pattern.density)
    assert torch.equal(one_head.block_mask(GRID, 1), all_heads.block_mask(GRID, 1))


def test_svg_temporal_heads_few_at_a_time_equal_all_at_once(monkeypatch):
    settings = core.SVGSettings(sparsity=0.35, block_size=64)
    flags = lambda call, plan: (True, False, True)  # noqa: E731  two temporal heads: two reorder chunks
    launches = count_heads(monkeypatch, svg, "block_sparse_attention")
    whole, all_heads = run_steps(settings, WHOLE, monkeypatch, profile=flags)
    assert launches == [3, 2] * 2  # per step: the spatial launch (every head), the temporal heads together
    launches.clear()
    few, one_head = run_steps(settings, FEW, monkeypatch, profile=flags)
    assert launches == [3, 1, 1] * 2
    assert_same_outputs(few, whole)
    assert torch.equal(one_head.block_mask(GRID, 1), all_heads.block_mask(GRID, 1))


def wan14b_queries(dtype=torch.bfloat16):
    """q of one Wan 2.1 14B 720p call (B=1, 40 heads, 75,600 tokens, head_dim 128), without memory (meta)."""
    return torch.empty(1, 40, 75600, 128, dtype=dtype, device="meta")


@pytest.mark.parametrize("method", ["svg2", "svg", "adaspa"])
def test_chunks_at_wan14b_720p_are_the_largest_within_the_budget(method):
    """Each stage's heads x its bytes per head fit in a quarter of the call's output (less what the call holds for
    every head: SVG2's plans until their launch, AdaSpa's ranked blocks until the counts are chosen), one head more
    would not."""
    q = wan14b_queries()
    svg2 = core.SVG2Settings().make_planner()
    adaspa_planner = core.AdaSpaSettings().make_planner()
    per_head, reserved = {"svg2": lambda: (svg2.plan_head_bytes(q, gpu_kernels=False),
                                    40 * svg2.layout_head_bytes(q)),
                          "svg": lambda: (svg.TEMPORAL_COPIES * memory.head_bytes(q), 0),
                          "adaspa": lambda: (adaspa_planner.search_head_bytes(q),
                                             adaspa_planner.ranked_bytes(q, core.VideoGrid(21, 45, 80)))}[method]()
    heads = memory.heads_per_chunk(q, per_head, reserved)
    budget = memory.transient_budget(q)  # 185 MiB: a quarter of the 738 MiB output
    assert reserved + heads * per_head <= budget < reserved + (heads + 1) * per_head
    assert 1 < heads < 40  # a few heads: the stage is bounded, and not a head at a time


def test_svg2_plans_in_a_few_groups_and_copies_nothing_at_wan14b_720p():
    """SVG2 holds no copy of q, k, v (the kernel reads through the cluster orders): at the Wan 14B 720p shape every
    head's plan (80 MB) stays within the budget beside a group being planned, and even on torch's sort and selection
    the plan runs in a few groups, where the permuted copies (88 MB a head) allowed two heads at a time."""
    q = wan14b_queries()
    planner = core.SVG2Settings().make_planner()
    reserved = 40 * planner.layout_head_bytes(q)
    budget = memory.transient_budget(q)
    assert reserved < budget / 2
    assert memory.heads_per_chunk(q, planner.plan_head_bytes(q, gpu_kernels=False), reserved) >= 5


@pytest.mark.parametrize("shape", ["wan14b-720p", "hunyuan-720p"])
def test_svg2_plans_every_head_at_once_with_the_selection_kernel(shape):
    """With the selection kernel (a GPU's path: no per-pair temporaries) every head of a Wan 14B 720p or a
    HunyuanVideo 720p call is planned in one group within the budget: one set of k-means launches a call instead of
    one per group (4 groups of 11 heads cost 24% of the call's time on the H100). The Inspector's tile mask, drawn a
    few heads at a time, fits beside them in at most 4 chunks."""
    heads, tokens, grid = {"wan14b-720p": (40, 75600, core.VideoGrid(21, 45, 80)),
                           "hunyuan-720p": (24, 119056, core.VideoGrid(33, 45, 80, text_tokens=256))}[shape]
    assert grid.total_tokens == tokens
    q = torch.empty(1, heads, tokens, 128, dtype=torch.bfloat16, device="meta")
    settings = core.svg2.PRESETS["hunyuan_720p" if grid.text_tokens else "wan_720p"]
    planner = settings.make_planner()
    reserved = heads * planner.layout_head_bytes(q)
    assert memory.heads_per_chunk(q, planner.plan_head_bytes(q, gpu_kernels=True), reserved) == heads
    assert planner.drawing_heads(q, grid, heads, reserved, device="cuda") >= heads // 4  # a few chunks of launches


def test_a_short_call_plans_svg2_in_one_group_within_the_floor(monkeypatch):
    """A Wan 1.3B 480p call (12 heads, 32,760 tokens): a quarter of its output is 25 MB, which split SVG2's plan into
    4 groups of 3 heads (3.9x dense's time on the H100); the floor lets it plan at once, and a 720p call's budget is
    its quarter still."""
    monkeypatch.setattr(memory, "TRANSIENT_FLOOR", SHIPPED_FLOOR)
    q = torch.empty(1, 12, 32760, 128, dtype=torch.bfloat16, device="meta")
    planner = core.svg2.PRESETS["wan_720p"].make_planner()
    reserved = 12 * planner.layout_head_bytes(q)
    assert memory.transient_budget(q) == SHIPPED_FLOOR > memory.TRANSIENT_SHARE * q.numel() * q.element_size()
    assert memory.heads_per_chunk(q, planner.plan_head_bytes(q, gpu_kernels=True), reserved) == 12
    big = wan14b_queries()
    assert memory.transient_budget(big) == int(memory.TRANSIENT_SHARE * big.numel() * big.element_size())
