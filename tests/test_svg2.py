"""The SVG2 planner (core/svg2.py): top-p 1.0 equals dense attention; a sparse call equals float64 attention under
the token mask its clusters imply (HunyuanVideo's text dense); the centroid cache across steps, its reset per run
and its invalidation; the Inspector's tiles; and the node, inside real ComfyUI with tiny WanModel / HunyuanVideo.

Inputs are random on every run; each test prints its seed (rerun with SVG2_SEED=<seed>).
"""

from __future__ import annotations

import gc
import math
import os
import weakref
from dataclasses import replace

import pytest
import torch

import comfy_env
from pack import import_pack

K = import_pack("kernels")
core = import_pack("core")
svg2 = import_pack("core.svg2")
memory = import_pack("core.memory")
comfyui = pytest.mark.comfyui  # skipped, loudly, without ComfyUI (conftest.py)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BACKENDS = ("triton", "reference")
SMALL = core.SVG2Settings(query_clusters=5, key_clusters=9, top_p=0.6, min_key_ratio=0.2, first_iterations=2,
                          later_iterations=1)
WAN_GRID = core.VideoGrid(3, 4, 6)                    # 72 video tokens
HUNYUAN_GRID = core.VideoGrid(3, 4, 5, text_tokens=7)  # 60 video tokens, then 7 text tokens


@pytest.fixture(autouse=True)
def whole_calls(monkeypatch):
    """These tests read one call's state as one head range: every head at once. tests/test_memory.py checks that the
    default (a few heads at a time) gives the same outputs and state."""
    monkeypatch.setattr(memory, "TRANSIENT_SHARE", 1e6)


@pytest.fixture
def gen():
    seed = int(os.environ.get("SVG2_SEED") or int.from_bytes(os.urandom(6), "little"))
    print(f"seed {seed} (rerun with SVG2_SEED={seed})")
    return torch.Generator(device=DEVICE).manual_seed(seed)


def make_call(grid, gen, *, B=2, H=2, D=64, dtype=torch.bfloat16, backend="reference", layer=1, padded=True,
              out=False):
    """An AttentionCall over ``grid`` with token-major q, k, v (ComfyUI's Wan layout); with text, the second batch
    element's last 3 text tokens are padding."""
    L = grid.total_tokens
    q, k, v = ((torch.randn(B, L, H, D, generator=gen, device=DEVICE) * 1.5).to(dtype).transpose(1, 2)
               for _ in range(3))
    kv_length = None
    if grid.text_tokens and padded:
        kv_length = torch.full((B,), L, dtype=torch.int32, device=DEVICE)
        kv_length[1:] = L - 3
    buffer = torch.empty(B, L, H, D, device=DEVICE, dtype=dtype).transpose(1, 2) if out else None
    return core.AttentionCall(grid=grid, layer=layer, step=0, total_steps=10, q=q, k=k, v=v, kv_length=kv_length,
                              out=buffer, backend=backend)


def masked_attention(call, allowed):
    """float64 attention of the call under a (B, H, L, L) bool token mask."""
    s = torch.matmul(call.q.double(), call.k.double().transpose(-1, -2)) / math.sqrt(call.q.shape[-1])
    p = torch.softmax(s.masked_fill(~allowed, float("-inf")), dim=-1)
    return torch.matmul(p, call.v.double())


def key_mask(call):
    """(B, 1, 1, L): keys before kv_length."""
    B, _, L, _ = call.q.shape
    device = call.q.device
    limit = torch.full((B,), L, device=device) if call.kv_length is None else call.kv_length.long().to(device)
    return (torch.arange(L, device=device)[None, :] < limit[:, None])[:, None, None, :]


def oracle_mask(call, settings, init=None):
    """(B, H, L, L) token mask of the plan SVG2 makes for the call, rebuilt from the public kernels: video pairs by
    their (query cluster, key cluster), text rows and columns dense, padding keys never."""
    video = call.grid.video_tokens
    iterations = settings.first_iterations if init is None else settings.later_iterations
    q_km = K.batched_kmeans(call.q[:, :, :video], settings.query_clusters, iterations, backend=call.backend,
                            init=None if init is None else init.queries)
    k_km = K.batched_kmeans(call.k[:, :, :video], settings.key_clusters, iterations, backend=call.backend,
                            init=None if init is None else init.keys)
    sel = K.select_key_clusters(q_km.centroids, k_km.centroids, k_km.sizes, top_p=settings.top_p,
                                min_clusters=settings.min_key_clusters)
    B, H, CQ, CK = sel.order.shape
    used = torch.arange(CK, device=DEVICE) < sel.counts[..., None]
    kept = torch.zeros(B, H, CQ, CK, dtype=torch.bool, device=DEVICE).scatter_(-1, sel.order.long(), used)
    L = call.q.shape[2]
    allowed = torch.ones(B, H, L, L, dtype=torch.bool, device=DEVICE)
    rows = torch.gather(kept, 2, q_km.labels.long()[..., None].expand(-1, -1, -1, CK))         # (B, H, V, CK)
    allowed[:, :, :video, :video] = torch.gather(rows, 3, k_km.labels.long()[:, :, None, :].expand(-1, -1, video, -1))
    return allowed & key_mask(call)


# ---------------------------------------------------------------------------------------------------------------
# Planner

CASES = {"wan-bf16-D64": (WAN_GRID, torch.bfloat16, 64), "wan-fp16-D128": (WAN_GRID, torch.float16, 128),
         "hunyuan-bf16-D128": (HUNYUAN_GRID, torch.bfloat16, 128), "hunyuan-fp16-D128": (HUNYUAN_GRID, torch.float16, 128)}
OUT_TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3}


def rel_err(got, want):
    return float((got.double() - want).norm() / want.norm())


@pytest.mark.parametrize("backend, case", [("reference", name) for name in CASES]
                         + [("triton", "wan-bf16-D64"), ("triton", "hunyuan-fp16-D128")])
def test_top_p_one_equals_dense_attention(backend, case, gen):
    grid, dtype, D = CASES[case]
    call = make_call(grid, gen, D=D, dtype=dtype, backend=backend, out=True)
    planner = replace(SMALL, top_p=1.0).make_planner()
    out, density = planner.attend(call)
    assert out.data_ptr() == call.out.data_ptr()  # written into the caller's (B, L, H, D) buffer
    assert density == 1.0
    L = call.q.shape[2]
    want = masked_attention(call, key_mask(call).expand(-1, call.q.shape[1], L, -1))
    assert rel_err(out, want) < OUT_TOL[dtype], f"{backend} {grid} seed={gen.initial_seed()}"
    assert bool(planner.block_mask(grid, 1).all())


@pytest.mark.parametrize("backend, grid", [("reference", WAN_GRID), ("reference", HUNYUAN_GRID),
                                           ("triton", HUNYUAN_GRID)], ids=["reference-wan", "reference-hunyuan",
                                                                          "triton-hunyuan"])
def test_sparse_call_equals_attention_under_its_cluster_mask(backend, grid, gen):
    """A cold call, then a warm one (later step, new q/k/v): each output equals float64 attention under the token
    mask of its clusters and selection, text queries see every valid key, the density counts the kept pairs, and
    the Inspector's tiles are those the mask covers for at least half of their pairs."""
    planner = SMALL.make_planner()
    planner.block_size = 16  # several tiles at these small sizes
    for step in range(2):
        call = make_call(grid, gen, backend=backend)
        init = planner._centroids.get((1, 0))
        allowed = oracle_mask(call, SMALL, init)
        out, density = planner.attend(call)
        ctx = f"{backend} {grid} step {step} seed={gen.initial_seed()}"
        assert rel_err(out, masked_attention(call, allowed)) < OUT_TOL[torch.bfloat16], ctx
        L = call.q.shape[2]
        dense_pairs = float(key_mask(call).expand(-1, call.q.shape[1], L, -1).sum())
        assert density == pytest.approx(float(allowed.sum()) / dense_pairs, rel=1e-9), ctx
        assert 0.0 < density < 1.0, ctx
        dense = masked_attention(call, key_mask(call).expand(-1, call.q.shape[1], L, -1))
        video = grid.video_tokens
        if grid.text_tokens:  # text rows: dense
            assert rel_err(out[:, :, video:], dense[:, :, video:]) < OUT_TOL[torch.bfloat16], ctx

        tiles = planner.block_mask(grid, 1)
        nb = -(-L // planner.block_size)
        assert tiles.shape == (call.q.shape[1], nb, nb) and tiles.device.type == "cpu"
        pad = nb * planner.block_size - L
        first = torch.nn.functional.pad(allowed[0].float(), (0, pad, 0, pad)).cpu()
        covered = first.unflatten(1, (nb, -1)).unflatten(3, (nb, -1)).sum((2, 4))
        sizes = torch.full((nb,), float(planner.block_size))
        sizes[-1] -= pad
        assert torch.equal(tiles, covered >= 0.5 * sizes[:, None] * sizes[None, :]), ctx


@pytest.mark.parametrize("backend, grid", [("reference", WAN_GRID), ("reference", HUNYUAN_GRID),
                                           ("triton", HUNYUAN_GRID)], ids=["reference-wan", "reference-hunyuan",
                                                                          "triton-hunyuan"])
def test_lse_is_that_of_the_kept_keys_in_token_order(backend, grid, gen):
    """With want_lse, call.lse is each row's float64 log-sum-exp over exactly its kept keys, in the original token
    order (text rows included); without it, call.lse stays None and the output is the same."""
    planner = SMALL.make_planner()
    call = make_call(grid, gen, backend=backend)
    allowed = oracle_mask(call, SMALL)
    plain, _ = planner.attend(call)
    assert call.lse is None
    planner.reset()
    call.want_lse = True
    out, _ = planner.attend(call)
    assert torch.equal(out, plain)
    s = torch.matmul(call.q.double(), call.k.double().transpose(-1, -2)) / math.sqrt(call.q.shape[-1])
    want = torch.logsumexp(s.masked_fill(~allowed, float("-inf")), dim=-1)
    B, H, L, _ = call.q.shape
    assert call.lse.shape == (B, H, L) and call.lse.dtype == torch.float32
    torch.testing.assert_close(call.lse.double(), want, atol=1e-4, rtol=1e-5,
                               msg=lambda m: f"{backend} {grid} seed={gen.initial_seed()}: {m}")


def spy_kmeans(monkeypatch):
    """Record (points shape, iterations, warm) of every k-means the planner runs."""
    runs = []
    original = svg2.batched_kmeans

    def spy(x, clusters, iterations, *, init=None, backend="auto"):
        runs.append((tuple(x.shape), clusters, iterations, init is not None))
        return original(x, clusters, iterations, init=init, backend=backend)

    monkeypatch.setattr(svg2, "batched_kmeans", spy)
    return runs


@pytest.mark.parametrize("grid", [WAN_GRID, HUNYUAN_GRID], ids=["wan", "hunyuan"])
def test_conditionings_share_the_first_chunks_layout(grid, monkeypatch, gen):
    """A CFG batch of 2 latents x 2 conditionings: k-means runs on the first chunk only, and every element's output
    is attention under that chunk's clusters and selection (its own text padding), the first chunk's being exactly
    what a call of the first chunk alone computes."""
    runs = spy_kmeans(monkeypatch)
    call = make_call(grid, gen, B=4)
    call.conditionings = 2
    first = replace(call, q=call.q[:2], k=call.k[:2], v=call.v[:2], conditionings=1,
                    kv_length=None if call.kv_length is None else call.kv_length[:2])
    allowed = oracle_mask(first, SMALL).repeat(2, 1, 1, 1)
    allowed[..., grid.video_tokens:] = True  # text keys (HunyuanVideo): every row, up to each element's padding
    allowed &= key_mask(call)
    out, _ = SMALL.make_planner().attend(call)
    ctx = f"{grid} seed={gen.initial_seed()}"
    assert {r[0][0] for r in runs} == {2}, ctx
    assert rel_err(out, masked_attention(call, allowed)) < OUT_TOL[torch.bfloat16], ctx
    alone, _ = SMALL.make_planner().attend(first)
    torch.testing.assert_close(out[:2], alone, rtol=0, atol=0, msg=ctx)


@pytest.mark.parametrize("grid", [WAN_GRID, HUNYUAN_GRID], ids=["wan", "hunyuan"])
def test_pair_counts_from_the_kept_keys_equal_the_layouts(grid, gen):
    """The density a plan reports comes from the selection's kept keys per query cluster (no per-pair tensors):
    the pairs the kernel's layout covers, and L x the attended keys dense, for a CFG batch whose conditionings pad
    their text differently."""
    call = make_call(grid, gen, B=4)
    call.conditionings = 2
    if call.kv_length is not None:
        call.kv_length[2] = grid.total_tokens - 5
    plan = SMALL.make_planner()._plan_heads(call, slice(0, 2), drawing=1)
    assert torch.equal(plan.pairs, K.cluster_pair_count(*plan.layout).double())
    assert torch.equal(plan.dense, grid.total_tokens * plan.layout[1][..., -1].double())
    whole = SMALL.make_planner()._plan_heads(call, slice(0, 2), drawing=2)
    assert torch.equal(plan.tiles, whole.tiles), "the tile mask a head at a time is the one of both heads at once"


def test_centroid_cache_warm_starts_later_steps_and_resets_per_run(monkeypatch, gen):
    runs = spy_kmeans(monkeypatch)
    planner = SMALL.make_planner()
    call = make_call(WAN_GRID, gen)
    planner.attend(call)
    assert [(r[2], r[3]) for r in runs] == [(2, False), (2, False)]  # queries and keys, from scratch
    cached = planner._centroids[(1, 0)]
    assert cached.queries.shape == (2, 2, 5, 64) and cached.keys.shape == (2, 2, 9, 64)
    assert cached.queries.dtype == torch.bfloat16
    assert planner.cache_bytes() == {(1, 0): cached.queries.nbytes + cached.keys.nbytes}

    runs.clear()
    planner.attend(make_call(WAN_GRID, gen))                        # the next step of layer 1: warm, 1 iteration
    planner.attend(replace(make_call(WAN_GRID, gen), layer=2))      # another layer: its own first call
    assert [(r[2], r[3]) for r in runs] == [(1, True), (1, True), (2, False), (2, False)]
    assert set(planner.cache_bytes()) == {(1, 0), (2, 0)}

    runs.clear()
    planner.reset()  # a new sampling run
    assert planner.cache_bytes() == {} and planner.block_mask(WAN_GRID, 1) is None
    planner.attend(call)
    assert [(r[2], r[3]) for r in runs] == [(2, False), (2, False)]


@pytest.mark.parametrize("change", ["grid", "batch", "heads"])
def test_centroid_cache_is_not_reused_for_another_shape(change, monkeypatch, gen):
    runs = spy_kmeans(monkeypatch)
    planner = SMALL.make_planner()
    planner.attend(make_call(WAN_GRID, gen))
    runs.clear()
    other = dict(grid=dict(grid=core.VideoGrid(4, 4, 6)), batch=dict(B=1), heads=dict(H=3))[change]
    planner.attend(make_call(**{"grid": WAN_GRID, "gen": gen, **other}))
    assert [r[3] for r in runs] == [False, False], f"a {change} change must start k-means afresh"
    runs.clear()
    planner.attend(make_call(**{"grid": WAN_GRID, "gen": gen, **other}))
    assert [r[3] for r in runs] == [True, True]


def test_head_chunks_have_their_own_centroids_and_one_drawing(monkeypatch, gen):
    """float32 calls on a GPU arrive a few heads at a time (head_offset): each chunk keeps its centroids, and the
    Inspector gets the layer's heads in order."""
    planner = SMALL.make_planner()
    full = make_call(WAN_GRID, gen, H=3)
    for h0, h1 in ((0, 2), (2, 3)):
        part = replace(full, q=full.q[:, h0:h1], k=full.k[:, h0:h1], v=full.v[:, h0:h1], head_offset=h0)
        planner.attend(part)
    assert set(planner.cache_bytes()) == {(1, 0), (1, 2)}
    assert planner.block_mask(WAN_GRID, 1).shape[0] == 3
    planner.attend(replace(full, q=full.q[:, :2], k=full.k[:, :2], v=full.v[:, :2]))  # the next call starts anew
    assert planner.block_mask(WAN_GRID, 1).shape[0] == 2
    assert planner.block_mask(core.VideoGrid(4, 4, 6), 1) is None and planner.block_mask(WAN_GRID, 7) is None


def test_centroid_cache_follows_the_model_between_devices(gen):
    planner = SMALL.make_planner()
    planner.attend(make_call(WAN_GRID, gen))
    planner.to("meta")  # where ComfyUI's offload would move it; "meta" shows the move without a second device
    cached = planner._centroids[(1, 0)]
    assert cached.queries.device.type == cached.keys.device.type == "meta"
    session = core.SparseAttentionSession(SMALL, core.SparseSchedule())
    session.planner.attend(make_call(WAN_GRID, gen))
    session.move_caches("meta")
    assert session.planner._centroids[(1, 0)].keys.device.type == "meta"


def test_planner_rejects_calls_it_cannot_run(gen):
    planner = replace(SMALL, key_clusters=73).make_planner()
    with pytest.raises(ValueError, match="key_clusters .*73.* at most the 72 video tokens"):
        planner.attend(make_call(WAN_GRID, gen))
    call = make_call(WAN_GRID, gen)
    with pytest.raises(ValueError, match="key padding"):
        SMALL.make_planner().attend(replace(call, kv_length=torch.full((2,), 70, dtype=torch.int32)))
    with pytest.raises(ValueError, match="video grid"):
        SMALL.make_planner().attend(replace(call, grid=core.VideoGrid(3, 4, 5)))


@pytest.mark.parametrize("bad, message", [
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(top_p=float("nan")), "top_p"),
    (dict(first_iterations=0), "first_iterations"), (dict(later_iterations=0), "later_iterations"),
    (dict(query_clusters=0), "query_clusters"), (dict(key_clusters=10 ** 6), "key_clusters"),
    (dict(min_key_ratio=-0.1), "min_key_ratio"), (dict(min_key_ratio=1.5), "min_key_ratio"),
    (dict(key_clusters=2.5), "key_clusters"),
])
def test_settings_validation(bad, message):
    with pytest.raises(ValueError, match=message):
        replace(core.SVG2Settings(), **bad)


def test_presets_are_the_reference_settings():
    wan, hunyuan = core.SVG2_PRESETS["wan_720p"], core.SVG2_PRESETS["hunyuan_720p"]
    assert (wan.query_clusters, wan.key_clusters, wan.top_p, wan.min_key_ratio) == (300, 1000, 0.9, 0.10)
    assert (hunyuan.query_clusters, hunyuan.key_clusters) == (400, 1000)
    assert (wan.first_iterations, wan.later_iterations) == (50, 2) == (hunyuan.first_iterations,
                                                                       hunyuan.later_iterations)
    assert wan.min_key_clusters == 100
    turbo = core.SVG2_PRESETS["turbo"]
    assert turbo.top_p < wan.top_p and turbo.later_iterations < wan.later_iterations
    assert core.SVG2Settings() == wan


# ---------------------------------------------------------------------------------------------------------------
# Inside ComfyUI

TINY = dict(query_clusters=8, key_clusters=16, min_key_ratio=0.1, first_iterations=4, later_iterations=1)


def svg2_node(nodes, preset="custom", top_p=0.5, **values):
    args = {**TINY, **values}
    return nodes.SVG2KMeansSettings().settings(preset, args["query_clusters"], args["key_clusters"], top_p,
                                               args["min_key_ratio"], args["first_iterations"],
                                               args["later_iterations"])[0]


def patch(nodes, model, method, dense_steps=0.0, dense_layers=0, backend="reference"):
    return nodes.SparseAttentionPatch().patch(model, dense_steps, 1.0, dense_layers, backend, False, method)[0]


def latent(frames=5, height=16, width=16):
    return torch.zeros(1, 16, frames, height, width)


@comfyui
@pytest.mark.parametrize("family", ["wan", "hunyuan"])
def test_top_p_one_equals_unpatched_model(nodes, bridge, family):
    if family == "wan":
        pos, neg = comfy_env.wan_conds(seed=1)
        base, cfg = comfy_env.tiny_wan_t2v(seed=2), 3.0
    else:
        pos, neg = comfy_env.hunyuan_conds(seed=1, text_tokens=12, valid_tokens=8)
        base, cfg = comfy_env.tiny_hunyuan_video(seed=2), 1.0
    patched = patch(nodes, base, svg2_node(nodes, top_p=1.0))
    session = bridge.session_of(patched)
    dense = comfy_env.sample(base, latent(frames=3), pos, neg, steps=3, cfg=cfg, seed=3)
    sparse = comfy_env.sample(patched, latent(frames=3), pos, neg, steps=3, cfg=cfg, seed=3)
    assert len(session.stats.calls) == 3 * (comfy_env.WAN_LAYERS if family == "wan"
                                            else comfy_env.HUNYUAN_DOUBLE + comfy_env.HUNYUAN_SINGLE)
    assert not session.stats.fallbacks and session.stats.dense_calls == len(session.stats.calls)  # density 1.0
    torch.testing.assert_close(sparse, dense, rtol=1e-4, atol=1e-4)


@comfyui
def test_sparse_run_warm_starts_each_layer_and_resets_per_run(nodes, bridge, monkeypatch):
    runs = spy_kmeans(monkeypatch)
    pos, neg = comfy_env.wan_conds(seed=4)
    base = comfy_env.tiny_wan_t2v(seed=5)
    patched = patch(nodes, base, svg2_node(nodes), dense_layers=1)
    session = bridge.session_of(patched)
    dense = comfy_env.sample(base, latent(), pos, neg, steps=3, cfg=4.0, seed=6)
    sparse = comfy_env.sample(patched, latent(), pos, neg, steps=3, cfg=4.0, seed=6)
    assert not session.stats.fallbacks
    assert session.stats.sparse_calls == 3 * (comfy_env.WAN_LAYERS - 1)
    assert 0 < session.stats.sparse_density < 1 and 0 < rel_err(sparse, dense.double()) < 0.5
    # Cond and uncond in one batch of 2, clustered on the first conditioning (the other shares its layout); per
    # layer: step 0 from scratch, steps 1 and 2 warm (queries and keys).
    assert all(r[0][:2] == (1, comfy_env.WAN_HEADS) for r in runs)
    assert [(r[2], r[3]) for r in runs] == [(4, False)] * 4 + [(1, True)] * 8
    assert set(session.cache_bytes()) == {(1, 0), (2, 0)}
    tiles = session.block_mask(1)
    assert tiles.shape == (comfy_env.WAN_HEADS, 3, 3) and tiles.dtype == torch.bool
    images = import_pack("core.report").inspect(session, layer=1, head=1)  # the Inspector draws the head's tiles
    assert images and all(image.width > 0 for image in images)

    runs.clear()
    comfy_env.sample(patched, latent(), pos, neg, steps=2, cfg=4.0, seed=6)  # a new run: from scratch again
    assert [(r[2], r[3]) for r in runs] == [(4, False)] * 4 + [(1, True)] * 4


@comfyui
def test_hunyuan_sparse_run_keeps_text_dense(nodes, bridge, monkeypatch):
    pos, neg = comfy_env.hunyuan_conds(seed=7, text_tokens=12, valid_tokens=7)
    patched = patch(nodes, comfy_env.tiny_hunyuan_video(seed=8), svg2_node(nodes))
    session = bridge.session_of(patched)
    calls = []
    original = session.attend

    def attend(ctx, layer, q, k, v, kv_length=None, out=None, head_offset=0, **routing):
        result, density = original(ctx, layer, q, k, v, kv_length=kv_length, out=out, head_offset=head_offset,
                                   **routing)
        calls.append((q.clone(), k.clone(), v.clone(), kv_length, result.clone()))
        return result, density

    monkeypatch.setattr(session, "attend", attend)
    out = comfy_env.sample(patched, latent(), pos, neg, steps=2, cfg=1.0, seed=9)
    assert torch.isfinite(out).all() and not session.stats.fallbacks
    assert 0 < session.stats.sparse_density < 1
    video = 5 * 64
    for q, k, v, kv_length, result in calls:
        assert kv_length.tolist() == [video + 7]
        call = core.AttentionCall(grid=None, layer=0, step=0, total_steps=2, q=q, k=k, v=v, kv_length=kv_length)
        L = q.shape[2]
        want = masked_attention(call, key_mask(call).expand(-1, q.shape[1], L, -1))
        # The text queries attend densely to the video and the valid text.
        torch.testing.assert_close(result[:, :, video:].double(), want[:, :, video:], rtol=1e-4, atol=1e-5)


@comfyui
def test_too_many_clusters_fall_back_to_dense_with_a_warning(nodes, bridge, caplog):
    pos, neg = comfy_env.wan_conds(seed=10)
    base = comfy_env.tiny_wan_t2v(seed=11)
    patched = patch(nodes, base, svg2_node(nodes, key_clusters=1000))
    session = bridge.session_of(patched)
    with caplog.at_level("WARNING", logger="sparse_video_attention"):
        sparse = comfy_env.sample(patched, latent(frames=3), pos, neg, steps=2, seed=12)
    dense = comfy_env.sample(base, latent(frames=3), pos, neg, steps=2, seed=12)
    assert torch.equal(sparse, dense) and session.stats.sparse_calls == 0
    assert "key_clusters (1000)" in caplog.text and "192 video tokens" in caplog.text


@comfyui
def test_cache_moves_when_comfyui_loads_and_offloads_the_model(nodes, bridge, monkeypatch):
    pos, neg = comfy_env.wan_conds(seed=13)
    patched = patch(nodes, comfy_env.tiny_wan_t2v(seed=14), svg2_node(nodes))
    session = bridge.session_of(patched)
    moves = []
    monkeypatch.setattr(session, "move_caches", lambda device, of=None: moves.append(torch.device(device)))
    comfy_env.sample(patched, latent(frames=3), pos, neg, steps=2, seed=15)
    assert moves and moves[0] == patched.load_device  # loaded for sampling
    moves.clear()
    patched.detach()
    assert moves == [torch.device(patched.offload_device)]


@comfyui
def test_centroid_cache_is_freed_with_the_patched_model(nodes, bridge):
    pos, neg = comfy_env.wan_conds(seed=16)
    patched = patch(nodes, comfy_env.tiny_wan_t2v(seed=17), svg2_node(nodes))
    comfy_env.sample(patched, latent(frames=3), pos, neg, steps=2, seed=18)
    planner = weakref.ref(bridge.session_of(patched).planner)
    assert planner().cache_bytes()
    del patched
    gc.collect()
    assert planner() is None, "something outside the patched model keeps the centroid cache alive"


@comfyui
def test_node_presets_and_validation(nodes):
    node = nodes.SVG2KMeansSettings()
    spec = node.INPUT_TYPES()["required"]
    assert spec["preset"][0] == [*core.SVG2_PRESETS, "custom"]
    for name in core.SVG2_PRESETS:
        assert node.settings(name, 1, 1, 0.5, 0.0, 1, 1)[0] == core.SVG2_PRESETS[name]  # the preset wins
    custom = node.settings("custom", 12, 34, 0.7, 0.2, 5, 3)[0]
    assert custom == core.SVG2Settings(12, 34, 0.7, 0.2, 5, 3)
    defaults = {name: entry[1]["default"] for name, entry in spec.items() if name != "preset"}
    assert core.SVG2Settings(**defaults) == core.SVG2_PRESETS[spec["preset"][1]["default"]]
    for bad, message in ((dict(top_p=0.0), "top_p"), (dict(top_p=1.2), "top_p"), (dict(first_iterations=0),
                         "first_iterations"), (dict(later_iterations=0), "later_iterations")):
        args = dict(query_clusters=12, key_clusters=34, top_p=0.7, min_key_ratio=0.2, first_iterations=5,
                    later_iterations=3)
        args.update(bad)
        with pytest.raises(ValueError, match=message):
            node.settings("custom", **args)
    with pytest.raises(ValueError, match="preset"):
        node.settings("fast", 12, 34, 0.7, 0.2, 5, 3)
