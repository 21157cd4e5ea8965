"""Never slower than dense: heads whose plan is above the kernel's break-even run on the user's dense attention, in
the same output; a call where most heads are runs dense whole. Through the real override, on the CPU (the torch
reference; the table's CPU entries route nothing, so each test sets the break-even it needs)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from pack import import_pack
from test_radial import dense_attention as comfy_attention  # a stand-in for ComfyUI's attention function

core = import_pack("core")
break_even = import_pack("core.break_even")
routing = import_pack("core.routing")
memory = import_pack("core.memory")

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
GRID = core.VideoGrid(4, 6, 9, text_tokens=13)  # 229 tokens: 4 blocks of 64
SVG = core.SVGSettings(sparsity=0.35, block_size=64)


def set_break_even(monkeypatch, density: float, kernels=break_even.KERNELS) -> None:
    monkeypatch.setitem(break_even.TABLE, "cpu", {**break_even.TABLE["cpu"],
                                                  **{k: break_even.BreakEven(density, "test") for k in kernels}})


def inputs(H=4, B=2, D=32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(B, GRID.total_tokens, H * D, generator=gen) for _ in range(3)]


class Spy:
    """The user's dense attention, counting its calls and their head counts."""

    def __init__(self):
        self.heads = []

    def __call__(self, q, k, v, heads, **kwargs):
        self.heads.append(heads)
        return comfy_attention(q, k, v, heads, **kwargs)


def run(method, qkv, flags=None, step=0, sigmas=(1.0, 0.0), monkeypatch=None, session=None, check=None):
    """One video self-attention call through the override: (output (B, H, L, D), session, spy)."""
    if session is None:
        session = core.SparseAttentionSession(method, core.SparseSchedule(dense_steps=0, dense_layers=0),
                                              backend="reference")
    if flags is not None:
        monkeypatch.setattr(session.planner, "profile", lambda call, plan: flags)
    spy = Spy()
    ctx = session.forward_context(GRID, sigmas[step], list(sigmas), check=check)
    H = len(flags) if flags is not None else qkv[0].shape[-1] // 32
    out = core.attention_override(session)(spy, *qkv, H, transformer_options={core.CONTEXT_KEY: ctx})
    B, L, _ = out.shape
    return out.view(B, L, H, -1).transpose(1, 2), session, spy


def spy_svg2_plans(monkeypatch) -> list:
    """(step, heads part) of every group of heads SVG2's planner plans from now on, in order."""
    svg2 = import_pack("core.svg2")
    planned = []
    plan_heads = svg2.SVG2Planner._plan_heads
    monkeypatch.setattr(svg2.SVG2Planner, "_plan_heads",
                        lambda self, call, part, drawing: planned.append((call.step, part))
                        or plan_heads(self, call, part, drawing))
    return planned


def heads_first(t, H):
    return t.view(t.shape[0], t.shape[1], H, -1).transpose(1, 2)


def svg_densities():
    plan = SVG.make_planner().plan(GRID, torch.device("cpu"))
    nb = plan.keep.shape[2]
    return plan.spatial_tiles / nb ** 2, plan.temporal_tiles / nb ** 2


def test_heads_above_the_break_even_equal_dense_the_others_sparse(monkeypatch):
    spatial, temporal = svg_densities()
    assert temporal != spatial
    flags = (True, False, False, False) if temporal > spatial else (False, True, True, True)
    above = [h for h, t in enumerate(flags) if t == (temporal > spatial)]
    assert len(above) == 1
    qkv = inputs()
    sparse, _, _ = run(SVG, qkv, flags, monkeypatch=monkeypatch)  # the CPU table routes nothing
    set_break_even(monkeypatch, (spatial + temporal) / 2)
    out, session, spy = run(SVG, qkv, flags, monkeypatch=monkeypatch)
    dense = heads_first(comfy_attention(*qkv, 4), 4)
    below = [h for h in range(4) if h not in above]
    assert torch.equal(out[:, above], dense[:, above])
    assert torch.equal(out[:, below], sparse[:, below])
    assert not torch.allclose(sparse[:, above], dense[:, above], atol=1e-3)  # the routed head did change
    assert spy.heads == [1]  # one dense launch, of the routed head alone
    stats = session.stats
    assert (stats.routed_heads, stats.planned_heads, stats.sparse_calls) == (1, 4, 1)
    planned = (3 * min(spatial, temporal) + max(spatial, temporal)) / 4
    assert stats.calls[(0, 0)] == pytest.approx(planned + (1 - max(spatial, temporal)) / 4)
    summary = core.run_summary(session)
    assert "routed to the dense attention: 1 of 4 heads, 0 calls whole" in summary
    assert "block-64 kernel's break-even" in summary


def test_most_heads_above_run_the_call_dense_whole(monkeypatch):
    spatial, temporal = svg_densities()
    flags = (True, True, True, False) if temporal > spatial else (False, False, False, True)
    set_break_even(monkeypatch, (spatial + temporal) / 2)
    qkv = inputs()
    out, session, spy = run(SVG, qkv, flags, monkeypatch=monkeypatch)
    assert torch.equal(out, heads_first(comfy_attention(*qkv, 4), 4))
    assert spy.heads == [4]  # the call as it came, no copies of some heads
    stats = session.stats
    assert (stats.dense_calls, stats.sparse_calls, stats.routed_heads) == (1, 0, 4)
    assert "4 of 4 heads, 1 calls whole" in core.run_summary(session) and not stats.fallbacks


def test_no_change_when_every_head_is_below(monkeypatch):
    qkv = inputs()
    flags = (True, False, True, False)
    sparse, _, _ = run(SVG, qkv, flags, monkeypatch=monkeypatch)
    set_break_even(monkeypatch, max(svg_densities()) + 1e-9)
    out, session, spy = run(SVG, qkv, flags, monkeypatch=monkeypatch)
    assert torch.equal(out, sparse) and spy.heads == []
    assert session.stats.routed == {} and "routed" not in core.run_summary(session)


METHODS = {
    "radial": core.RadialSettings(decay_factor=0.05, block_size=64, attention_sink=False),
    "svg": SVG,
    "svg2": core.SVG2Settings(query_clusters=5, key_clusters=9, top_p=1.0, first_iterations=2, later_iterations=1),
    "adaspa": core.AdaSpaSettings(recall=1.0, search_steps=(0,), max_density=1.0),
}


@pytest.mark.parametrize("name", METHODS)
def test_every_method_routes_a_plan_above_the_break_even(name, monkeypatch):
    """Every planner reports its heads' densities before launching: with the break-even at 0 each call is the user's
    dense attention exactly (AdaSpa's first call is its own dense search pass; the next step is routed)."""
    set_break_even(monkeypatch, 0.0)
    qkv = inputs(H=2)
    sigmas = (1.0, 0.5, 0.0)
    session = None
    for step in range(2):
        out, session, _ = run(METHODS[name], qkv, step=step, sigmas=sigmas, session=session)
    assert torch.equal(out, heads_first(comfy_attention(*qkv, 2), 2))
    routed_steps = 1 if name == "adaspa" else 2
    assert session.stats.routed_heads == 2 * routed_steps and not session.stats.fallbacks


def test_svg2_planned_a_head_at_a_time_routes_the_call_once(monkeypatch):
    """SVG2 keeping every pair (top-p 1, the diffuse heads' case), planned a head at a time (core.memory): the
    routing still decides once, over every head of the call, which then runs dense whole (one dense launch of the
    call as it came); the output is the dense attention's."""
    set_break_even(monkeypatch, 0.9)
    monkeypatch.setattr(memory, "TRANSIENT_SHARE", 1e-9)
    planned = spy_svg2_plans(monkeypatch)
    qkv = inputs(H=3)
    out, session, spy = run(METHODS["svg2"], qkv)
    torch.testing.assert_close(out, heads_first(comfy_attention(*qkv, 3), 3), rtol=0, atol=1e-6)
    assert [part for _, part in planned] == [slice(0, 1), slice(1, 2), slice(2, 3)]  # planned a head at a time
    assert spy.heads == [3]  # one routing decision: the whole call dense, no copies of some heads
    assert session.stats.routed_heads == 3 and session.stats.planned_heads == 3


def test_the_check_sees_routed_heads_keep_every_key(monkeypatch):
    spatial, temporal = svg_densities()
    flags = (True, False, False, False) if temporal > spatial else (False, True, True, True)
    set_break_even(monkeypatch, (spatial + temporal) / 2)
    check = core.CheckSettings(steps=(0,), rows=8)
    _, session, _ = run(SVG, inputs(), flags, monkeypatch=monkeypatch, check=check)
    routed = 0  # the one head of the denser class
    recall = session.check.head_recall()
    assert recall[(0, routed)] == pytest.approx(1.0, abs=1e-5)
    assert session.check.head_error()[(0, routed)] < 1e-5
    assert min(recall[(0, h)] for h in range(4) if h != routed) < 1.0


def test_break_even_table_entries():
    """Every GPU class has every kernel; a class that was not measured says so; unknown names are a clear error."""
    for gpu, entries in break_even.TABLE.items():
        assert set(entries) == set(break_even.KERNELS)
        assert all(0 < e.density <= 1 for e in entries.values())
    assert all(e.source.startswith("measured") for e in break_even.TABLE["hopper"].values())
    for gpu in ("ampere", "ada", "blackwell"):
        assert all(e.source.startswith("not measured") for e in break_even.TABLE[gpu].values())
    assert break_even.TABLE["ampere"]["block-128"].density <= break_even.TABLE["hopper"]["block-128"].density
    assert break_even.gpu_class("cpu") == "cpu"
    with pytest.raises(ValueError, match="known kernels"):
        break_even.break_even("block-32", "hopper")


def test_compensated_calls_break_even_lower():
    """A compensated call pays its pooled terms on top of the kernel: its break-even is r (1 - share) on every GPU
    class, and the torch reference (never routed) keeps 1.0."""
    for gpu in ("hopper", "ampere"):
        for kernel in break_even.KERNELS:
            plain, compensated = (break_even.break_even(kernel, gpu, c) for c in (False, True))
            share = break_even.COMPENSATION_SHARE[kernel]
            assert compensated.density == pytest.approx(plain.density * (1 - share))
            assert compensated.density < plain.density
            assert compensated.source.startswith("compensated")
    assert break_even.break_even("cluster", "cpu", True).density == 1.0


def test_a_compensated_call_routes_at_the_compensated_break_even(monkeypatch):
    """A head between the compensated and the plain break-even runs dense only when the call compensates."""
    monkeypatch.setitem(break_even.TABLE, "hopper", {k: break_even.BreakEven(0.5, "test") for k in break_even.KERNELS})
    router = routing.Router("hopper", 2, dense=lambda heads: None)
    density = 0.5 * (1 - break_even.COMPENSATION_SHARE["cluster"] / 2)  # between the two
    assert router.route("cluster", [density, 0.1], 0).dense == ()
    assert router.route("cluster", [density, 0.1], 0, compensated=True).dense == (0,)


def test_break_even_benchmark_smoke(capsys):
    """benchmarks/break_even.py runs every kernel at every density and prints the table's rows (CPU: the code path)."""
    kernels = import_pack("kernels")
    if not kernels.triton_available("cpu"):
        pytest.skip("needs Triton's CPU interpreter (TRITON_INTERPRET=1, set by conftest without a GPU)")
    spec = importlib.util.spec_from_file_location("_bench_break_even", BENCHMARKS / "break_even.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--smoke"]) == 0
    out = capsys.readouterr().out
    assert "SMOKE OK" in out and all(f"cpu       {k}" in out for k in break_even.KERNELS)


def test_svg2_layer_sent_dense_is_planned_again_only_after_the_recheck_steps(monkeypatch):
    """A layer whose SVG2 plan sent the whole call dense runs dense unplanned (no k-means, no selection) for the next
    DENSE_RECHECK_STEPS - 1 steps, routed as before (statistics and summary say so), then plans again; a plan that is
    then below the break-even runs sparse, and its verdict is gone."""
    recheck = import_pack("core.svg2").DENSE_RECHECK_STEPS
    set_break_even(monkeypatch, 0.9)
    planned = spy_svg2_plans(monkeypatch)
    steps = lambda: {step for step, _ in planned}  # noqa: E731
    qkv = inputs(H=2)
    dense = heads_first(comfy_attention(*qkv, 2), 2)
    sigmas = tuple(1.0 - i / (recheck + 2) for i in range(recheck + 3))
    session = None
    for step in range(recheck):
        out, session, spy = run(METHODS["svg2"], qkv, step=step, sigmas=sigmas, session=session)
        torch.testing.assert_close(out, dense, rtol=0, atol=1e-6)
        assert spy.heads == [2]
    assert steps() == {0}  # steps 1 .. recheck - 1 reused step 0's verdict
    stats = session.stats
    assert (stats.dense_calls, stats.sparse_calls, stats.routed_heads) == (recheck, 0, 2 * recheck)
    assert f"{2 * recheck} of {2 * recheck} heads, {recheck} calls whole" in core.run_summary(session)

    run(METHODS["svg2"], qkv, step=0, sigmas=sigmas, session=session)  # same step again (another conditioning)
    assert steps() == {0}
    run(METHODS["svg2"], qkv, step=2, sigmas=sigmas, session=session)
    assert steps() == {0}

    set_break_even(monkeypatch, 1.0)  # the plan at the recheck step is below the break-even: it runs sparse
    out, session, spy = run(METHODS["svg2"], qkv, step=recheck, sigmas=sigmas, session=session)
    assert steps() == {0, recheck} and spy.heads == [] and session.stats.routed_heads == 2 * (recheck + 2)
    run(METHODS["svg2"], qkv, step=recheck + 1, sigmas=sigmas, session=session)
    assert steps() == {0, recheck, recheck + 1}  # no verdict left: every step plans


def test_svg2_dense_verdict_holds_only_from_its_step_on(monkeypatch):
    """A step before the one whose plan went dense (a sampler restarting within a run) plans again."""
    set_break_even(monkeypatch, 0.9)
    planned = spy_svg2_plans(monkeypatch)
    qkv = inputs(H=2)
    sigmas = (1.0, 0.75, 0.5, 0.25, 0.0)
    _, session, _ = run(METHODS["svg2"], qkv, step=2, sigmas=sigmas)
    out, session, spy = run(METHODS["svg2"], qkv, step=1, sigmas=sigmas, session=session)
    assert {step for step, _ in planned} == {1, 2} and spy.heads == [2]
    torch.testing.assert_close(out, heads_first(comfy_attention(*qkv, 2), 2), rtol=0, atol=1e-6)
