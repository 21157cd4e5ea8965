"""The patch's ``compensate`` setting reaches every planner (Radial, SVG with its layout transform, SVG2, AdaSpa) on
tiny calls, each checked against the float64 oracle of test_compensation.py built from the planner's own layout;
the session carries it to every call and refuses a method that cannot honour it; the node takes it."""

from __future__ import annotations

import pytest
import torch

import comfy_env
from pack import import_pack
from test_block_sparse_kernel import new_generator
from test_block_summary import summary_oracle
from test_compensation import DEVICE, LSE_TOL, assert_compensated

core = import_pack("core")
svg = import_pack("core.svg")
svg_layout = import_pack("core.svg_layout")
VideoGrid = core.VideoGrid

pytestmark = [pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")]


@pytest.fixture
def gen():
    return new_generator(DEVICE)


def qkv(B, H, L, D, dtype, gen):
    return tuple(torch.randn(B, H, L, D, generator=gen, device=DEVICE).to(dtype) for _ in range(3))


def make_call(grid, q, k, v, backend, *, compensate, step=0, layer=1, kv_length=None):
    return core.AttentionCall(grid=grid, layer=layer, step=step, total_steps=6, q=q, k=k, v=v, kv_length=kv_length,
                              backend=backend, want_lse=True, compensate=compensate)


# A block layout's compensated LSE holds the summary's scores at 16-bit precision (test_block_summary.py).
SUMMARY_LSE_TOL = {torch.float32: LSE_TOL, torch.bfloat16: 1e-2}


def block_oracle(q, k, v, head_masks, block_size, kv_length=None):
    """The compensated oracle (the skipped keys summarised per query block: kernels/block_summary.py) for per-head
    (H, NQB, NKB) block masks in the tokens' own order."""
    B, H, L, _ = q.shape
    pos = torch.arange(L, device=q.device)
    limit = torch.full((B,), L, device=q.device) if kv_length is None else kv_length.long()
    group = torch.where(pos[None, :] < limit[:, None], pos // block_size, -1)[:, None].expand(B, H, L)
    kept = head_masks.to(q.device)[None].expand(B, -1, -1, -1)[:, :, pos // block_size]
    return summary_oracle(q, k, v, kept, group, block_size)


def check_lse_unchanged(planner_of, grid, q, k, v, backend, call, **kwargs):
    """The compensated call's exact LSE is the uncompensated call's (a fresh planner, the same inputs)."""
    plain = make_call(grid, q, k, v, backend, compensate=False, **kwargs)
    planner_of().attend(plain)
    assert plain.lse_compensated is None
    finite = torch.isfinite(plain.lse)
    assert torch.equal(finite, torch.isfinite(call.lse))
    assert (call.lse[finite] - plain.lse[finite]).abs().max() < 1e-4


# ------------------------------------------------------------------------------------------------ Radial


@pytest.mark.parametrize("backend, dtype", [("reference", torch.float32), ("triton", torch.bfloat16)])
def test_radial_compensates(backend, dtype, gen):
    grid = VideoGrid(8, 4, 16, text_tokens=9)  # 521 tokens: 8 frames of one 64-token block, text after
    st = core.RadialSettings(decay_factor=0.2, block_size=64, attention_sink=False)
    q, k, v = qkv(2, 2, grid.total_tokens, 64, dtype, gen)
    kv_length = torch.tensor([grid.total_tokens, grid.total_tokens - 4], dtype=torch.int32, device=DEVICE)
    call = make_call(grid, q, k, v, backend, compensate=True, kv_length=kv_length)
    planner = st.make_planner()
    out, density = planner.attend(call)
    assert density < 1.0
    mask = planner.block_mask(grid)
    expected = block_oracle(q, k, v, mask.expand(2, -1, -1), 64, kv_length)
    assert_compensated((out, call.lse, call.lse_compensated), expected, dtype, f"seed={gen.initial_seed()}",
                       compensated_lse_tol=SUMMARY_LSE_TOL[dtype])
    check_lse_unchanged(st.make_planner, grid, q, k, v, backend, call, kv_length=kv_length)


def test_radial_every_block_kept_adds_nothing(gen):
    grid = VideoGrid(2, 4, 16)  # two frames: every frame pair is within distance 1
    st = core.RadialSettings(block_size=64)
    q, k, v = qkv(1, 2, grid.total_tokens, 64, torch.float32, gen)
    outs = [st.make_planner().attend(make_call(grid, q, k, v, "reference", compensate=c))[0] for c in (False, True)]
    assert torch.equal(outs[0], outs[1])


# --------------------------------------------------------------------------------------------------- SVG


@pytest.mark.parametrize("backend, dtype, flags", [("reference", torch.float32, (True, False)),
                                                   ("triton", torch.bfloat16, (False, True))])
def test_svg_compensates_spatial_and_temporal_heads(backend, dtype, flags, gen, monkeypatch):
    """Spatial heads compensate in the original order; temporal heads in the token-major order, whose blocks their
    layout skips (the layout transform), and their rows come back in the original order."""
    grid = VideoGrid(6, 4, 8, text_tokens=11)  # 203 tokens
    st = core.SVGSettings(sparsity=0.3, block_size=64, attention_sink=False)
    L = grid.total_tokens
    q, k, v = qkv(2, 2, L, 64, dtype, gen)
    kv_length = torch.tensor([L, L - 5], dtype=torch.int32, device=DEVICE)
    planner = st.make_planner()
    monkeypatch.setattr(planner, "profile", lambda call, plan: flags)
    call = make_call(grid, q, k, v, backend, compensate=True, kv_length=kv_length)
    out, density = planner.attend(call)
    assert density < 1.0

    spatial, temporal = svg_layout.svg_block_masks(grid, st.sparsity, 64, False)
    order = svg_layout.token_major_order(grid)
    want = [torch.empty(2, 2, L, *tail, dtype=torch.float64, device=DEVICE) for tail in ((64,), (), ())]
    for h, is_temporal in enumerate(flags):
        # row t of the head's order is original token rows[t]
        rows = order.to(DEVICE) if is_temporal else torch.arange(L, device=DEVICE)
        parts = (t[:, h:h + 1, rows] for t in (q, k, v))
        head = block_oracle(*parts, (temporal if is_temporal else spatial)[None], 64, kv_length)
        for full, part in zip(want, head):
            full[:, h, rows] = part[:, 0]
    assert_compensated((out, call.lse, call.lse_compensated), want, dtype, f"flags={flags} seed={gen.initial_seed()}",
                       compensated_lse_tol=SUMMARY_LSE_TOL[dtype])

    plain_planner = st.make_planner()
    monkeypatch.setattr(plain_planner, "profile", lambda call, plan: flags)
    check_lse_unchanged(lambda: plain_planner, grid, q, k, v, backend, call, kv_length=kv_length)


# -------------------------------------------------------------------------------------------------- SVG2


SVG2_SETTINGS = core.SVG2Settings(query_clusters=6, key_clusters=12, top_p=0.5, min_key_ratio=0.0,
                                  first_iterations=3, later_iterations=1)


@pytest.mark.parametrize("own_terms", [None, 2], ids=["every skipped cluster its own term", "2 own, the rest summed"])
@pytest.mark.parametrize("backend, dtype", [("reference", torch.float32), ("triton", torch.bfloat16)])
def test_svg2_compensates_skipped_clusters(backend, dtype, own_terms, gen, monkeypatch):
    """SVG2's clusters are internal: the compensated call keeps the exact LSE of the plain one (the same clusters:
    k-means is deterministic), adds mass (its compensated LSE is never lower), and moves the output towards dense
    attention on diffuse random inputs, where the pooled terms are nearly exact; also where a query cluster's
    skipped clusters beyond its 2 heaviest are summed (kernels/skipped_summary.py)."""
    monkeypatch.setattr(import_pack("core.svg2"), "OWN_TERMS", own_terms)
    grid = VideoGrid(3, 4, 6, text_tokens=7)  # 72 video tokens, text after
    L = grid.total_tokens
    q, k, v = qkv(1, 2, L, 64, dtype, gen)
    q, k = (t * 0.3 for t in (q, k))  # scores of about unit spread: diffuse attention
    kv_length = torch.tensor([L - 3], dtype=torch.int32, device=DEVICE)
    call = make_call(grid, q, k, v, backend, compensate=True, kv_length=kv_length)
    out, density = SVG2_SETTINGS.make_planner().attend(call)
    assert density < 1.0 and not torch.isnan(out).any()
    check_lse_unchanged(SVG2_SETTINGS.make_planner, grid, q, k, v, backend, call, kv_length=kv_length)
    assert (call.lse_compensated >= call.lse - 1e-4).all()

    plain = make_call(grid, q, k, v, backend, compensate=False, kv_length=kv_length)
    plain_out, _ = SVG2_SETTINGS.make_planner().attend(plain)
    keys = torch.arange(L, device=DEVICE) < L - 3
    dense = torch.softmax((q.double() @ k.double().transpose(-1, -2) / 8).masked_fill(~keys, float("-inf")), -1)
    dense = dense @ v.double()
    err = lambda o: ((o.double() - dense).norm() / dense.norm()).item()  # noqa: E731
    assert err(out) < 0.5 * err(plain_out), f"{err(out):.3f} vs {err(plain_out):.3f} seed={gen.initial_seed()}"


def test_svg2_every_cluster_kept_adds_nothing(gen):
    grid = VideoGrid(3, 4, 6)
    st = core.SVG2Settings(query_clusters=6, key_clusters=12, top_p=1.0, min_key_ratio=0.0, first_iterations=3,
                           later_iterations=1)
    q, k, v = qkv(1, 2, grid.total_tokens, 64, torch.float32, gen)
    calls = [make_call(grid, q, k, v, "reference", compensate=c) for c in (False, True)]
    outs = [st.make_planner().attend(c)[0] for c in calls]
    assert torch.equal(outs[0], outs[1]) and torch.equal(calls[1].lse_compensated, calls[1].lse)


# ------------------------------------------------------------------------------------------------ AdaSpa


@pytest.mark.parametrize("backend, dtype", [("reference", torch.float32), ("triton", torch.bfloat16)])
def test_adaspa_compensates_its_searched_layout(backend, dtype, gen):
    """Step 0 searches with a dense pass (exact output: nothing to compensate, both LSEs the dense one); step 2
    searches against the cached LSE and runs the new layout sparse, compensated; text rows stay dense."""
    grid = VideoGrid(4, 4, 16, text_tokens=9)  # 265 tokens, block 64: 4 video blocks and a text block
    st = core.AdaSpaSettings(recall=0.5, block_size=64, min_density=0.0, max_density=0.5)
    L = grid.total_tokens
    q, k, v = qkv(1, 2, L, 64, dtype, gen)
    planner = st.make_planner()
    first = make_call(grid, q, k, v, backend, compensate=True, step=0)
    planner.attend(first)
    assert torch.equal(first.lse_compensated, first.lse)
    call = make_call(grid, q, k, v, backend, compensate=True, step=2)
    out, density = planner.attend(call)
    assert density < 1.0
    expected = block_oracle(q, k, v, planner.block_mask(grid, 1), 64)
    assert_compensated((out, call.lse, call.lse_compensated), expected, dtype, f"seed={gen.initial_seed()}",
                       compensated_lse_tol=SUMMARY_LSE_TOL[dtype])


# ---------------------------------------------------------------------------------------- session and node


def test_session_carries_the_setting_to_every_call(gen):
    grid = VideoGrid(8, 4, 16)
    session = core.SparseAttentionSession(core.RadialSettings(block_size=64), core.SparseSchedule(0.0, 1.0, 0),
                                          backend="reference", compensate=True)
    seen = []
    planner = session.planner_for(DEVICE)
    attend = planner.attend
    planner.attend = lambda call: (seen.append(call.compensate), attend(call))[1]
    ctx = core.ForwardContext(video=grid, step=1, total_steps=4)
    q, k, v = qkv(1, 2, grid.total_tokens, 64, torch.float32, gen)
    session.attend(ctx, 1, q, k, v)
    assert seen == [True]


def test_session_refuses_a_method_that_cannot_compensate():
    class Plain:  # a method whose planner has no compensation
        def make_planner(self):
            return object()

    with pytest.raises(ValueError, match="compensate 'on' does not apply to the method Plain"):
        core.SparseAttentionSession(Plain(), core.SparseSchedule(0.0, 1.0, 0), compensate=True)
    core.SparseAttentionSession(Plain(), core.SparseSchedule(0.0, 1.0, 0))  # off: any method


@pytest.mark.comfyui
def test_patch_node_compensate(nodes, bridge, monkeypatch):
    """The node's compensate input: 'on' reaches the planner's calls and changes the video; a bad value is an
    error naming the setting; the default is 'auto', which compensates Radial, SVG and SVG2."""
    from test_comfy_integration import latent

    model = comfy_env.tiny_wan_t2v(seed=3)
    method = nodes.RadialMask().settings(decay_factor=0.2, block_size=64, attention_sink=False, text_dense=True)[0]
    args = dict(dense_steps=0.0, sparse_end=1.0, dense_layers=0, backend="reference", verbose=False, method=method)
    off = nodes.SparseAttentionPatch().patch(model, **args, compensate="off")[0]
    on = nodes.SparseAttentionPatch().patch(model, **args, compensate="on")[0]
    assert bridge.session_of(off).compensate is False and bridge.session_of(on).compensate is True
    assert nodes.SparseAttentionPatch.INPUT_TYPES()["optional"]["compensate"][1]["default"] == "auto"
    assert bridge.session_of(nodes.SparseAttentionPatch().patch(model, **args)[0]).compensate
    svg2 = core.SVG2Settings(query_clusters=4, key_clusters=8)
    assert bridge.session_of(nodes.SparseAttentionPatch().patch(model, **dict(args, method=svg2))[0]).compensate
    seen = []
    planner = bridge.session_of(on).planner
    attend = planner.attend
    monkeypatch.setattr(planner, "attend", lambda call: (seen.append(call.compensate), attend(call))[1])
    lat = latent(frames=9)
    pos, neg = comfy_env.wan_conds(seed=4)
    videos = [comfy_env.sample(m, lat, pos, neg, steps=2, seed=5) for m in (off, on)]
    assert seen and all(seen)
    assert not torch.equal(videos[0], videos[1])
    with pytest.raises(ValueError, match="compensate"):
        nodes.SparseAttentionPatch().patch(model, **args, compensate="yes")


def test_compensate_auto_is_each_methods_measured_default():
    """'auto' compensates Radial, SVG and SVG2 (the methods it served on the proxy without a slower call,
    RESULTS.md), not AdaSpa; an explicit 8-bit precision keeps it off (the 8-bit kernel has no compensation); 'on' / 'off'
    force it; another value is an error naming the setting."""
    schedule = core.SparseSchedule(0.0, 1.0, 0)
    svg2 = core.SVG2Settings(query_clusters=4, key_clusters=8)
    for method in (svg2, core.RadialSettings(), core.SVGSettings()):
        assert core.SparseAttentionSession(method, schedule, compensate="auto").compensate is True
    assert core.SparseAttentionSession(core.AdaSpaSettings(), schedule, compensate="auto").compensate is False
    for precision in ("8-bit", "8-bit + dense calls"):
        assert core.SparseAttentionSession(svg2, schedule, compensate="auto", precision=precision).compensate is False
    assert core.SparseAttentionSession(svg2, schedule, compensate="auto", precision="auto").compensate is True
    assert core.SparseAttentionSession(svg2, schedule, compensate="off").compensate is False
    assert core.SparseAttentionSession(core.RadialSettings(), schedule, compensate="on").compensate is True
    with pytest.raises(ValueError, match="compensate must be one of"):
        core.SparseAttentionSession(svg2, schedule, compensate="yes")


def test_summary_says_whether_skipped_keys_were_compensated():
    schedule = core.SparseSchedule(0.0, 1.0, 0)
    summary = import_pack("core.summary")
    on = core.SparseAttentionSession(core.SVG2Settings(), schedule, compensate="auto")
    off = core.SparseAttentionSession(core.AdaSpaSettings(), schedule, compensate="auto")
    assert "skipped keys compensated" in summary.run_summary(on) and "| compensate on |" in summary.report_line(on)
    assert "compensated" not in summary.run_summary(off) and "| compensate off |" in summary.report_line(off)
