"""Radial layouts, the step/layer schedule, and the dispatcher's mask handling. No ComfyUI needed.

The Radial rule (core/radial.py, after mit-han-lab/radial-attention) for a query in frame i, a key in frame j,
d = |i - j|, s tokens per frame, base(d) = 2^bit_length(s) / 2^bit_length(d):
  * d <= 1, or j == 0 with the attention sink: the whole frame pair;
  * otherwise the spatial diagonal |x_q - x_k| <= max(decay * base, block), and once base < block only the
    distances d % (block / base) == 0;
  * a tile is kept when the rule covers >= 25% of it; text rows (and with text_dense, columns) are dense; the
    diagonal is always kept.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch

from pack import import_pack

core = import_pack("core")
dispatcher = import_pack("core.dispatcher")
kernels = import_pack("kernels")
radial_mod = import_pack("core.radial")

VideoGrid, RadialSettings, radial_block_mask = core.VideoGrid, core.RadialSettings, core.radial_block_mask
LOGGER = "sparse_video_attention"


def settings(decay=0.2, block=64, sink=True, text_dense=True):
    return RadialSettings(decay_factor=decay, block_size=block, attention_sink=sink, text_dense=text_dense)


# ------------------------------------------------------------------------------------------------------------------
# An independent token-level oracle: materialise the rule per token, then shrink to tiles by coverage.

def token_rule(grid: VideoGrid, st: RadialSettings) -> torch.Tensor:
    s, n = grid.tokens_per_frame, grid.video_tokens
    pos = torch.arange(n)
    frame, x = pos // s, pos % s
    d = (frame[:, None] - frame[None, :]).abs()
    bits = torch.where(d > 0, torch.floor(torch.log2(d.clamp(min=1).double())) + 1, torch.zeros_like(d, dtype=torch.float64))
    base = 2.0 ** s.bit_length() / 2.0 ** bits
    width = torch.clamp(st.decay_factor * base, min=float(st.block_size))
    stride = torch.where(base >= st.block_size, torch.ones_like(base), st.block_size / base).long()
    band = (d > 1) & (d % stride == 0) & ((x[:, None] - x[None, :]).abs() <= width)
    full = (d <= 1) | ((frame[None, :] == 0) & st.attention_sink)
    return full | band


def oracle_block_mask(grid: VideoGrid, st: RadialSettings) -> torch.Tensor:
    b, n = st.block_size, grid.total_tokens
    nb = -(-n // b)
    tokens = torch.zeros(nb * b, nb * b)
    tokens[: grid.video_tokens, : grid.video_tokens] = token_rule(grid, st).double()
    covered = tokens.view(nb, b, nb, b).sum(dim=(1, 3))
    sizes = torch.full((nb,), float(b))
    sizes[-1] = n - (nb - 1) * b
    mask = covered >= radial_mod.KEEP_COVERAGE * sizes[:, None] * sizes[None, :]
    first_text = grid.video_tokens // b
    if grid.text_tokens:
        mask[first_text:] = True
        if st.text_dense:
            mask[:, first_text:] = True
    return mask | torch.eye(nb, dtype=torch.bool)


@pytest.mark.parametrize("grid, st", [
    (VideoGrid(9, 8, 12), settings()),                           # 96 tokens a frame: frames straddle blocks
    (VideoGrid(6, 16, 16), settings(decay=1.0)),                 # 256 a frame: bands narrower than a frame
    (VideoGrid(12, 10, 10), settings(decay=0.5, sink=False)),
    (VideoGrid(5, 16, 24), settings(decay=0.2, block=128)),
    (VideoGrid(7, 6, 10, text_tokens=37), settings(sink=False)),  # HunyuanVideo-like: text after the video
    (VideoGrid(7, 6, 10, text_tokens=37), settings(sink=False, text_dense=False)),
    (VideoGrid(17, 8, 8), settings(decay=4.0)),
])
def test_block_mask_matches_token_rule(grid, st):
    got = radial_block_mask(grid, st)
    want = oracle_block_mask(grid, st)
    assert got.shape == want.shape == (-(-grid.total_tokens // st.block_size),) * 2
    assert torch.equal(got, want)


def test_frame_aligned_blocks_keep_power_of_two_distances():
    """One 64-token block per frame: a tile is a frame pair. The diagonal covers whole frames, so only the temporal
    stride thins: base(d) = 128 / 2^bit_length(d) < 64 from d = 2 on, keeping d % (64 / base) == 0, i.e. d a power
    of two."""
    frames = 40
    mask = radial_block_mask(VideoGrid(frames, 8, 8), settings(sink=False))
    i, j = torch.meshgrid(torch.arange(frames), torch.arange(frames), indexing="ij")
    d = (i - j).abs()
    kept_distances = {0, 1, 2, 4, 8, 16, 32}
    want = torch.zeros_like(mask)
    for k in kept_distances:
        want |= d == k
    assert torch.equal(mask, want)
    for dist in range(frames):  # per distance: every pair or none
        pairs = mask[d == dist]
        assert bool(pairs.all()) if dist in kept_distances else not bool(pairs.any()), dist


@pytest.mark.parametrize("decay, widths", [
    # half-width of the kept band, in 64-token blocks, per band of frame distance (s = 1024, base = 2048 / 2^r)
    (1.0, {(2, 3): 8, (4, 7): 4, (8, 15): 2, (16, 31): 1}),
    (0.5, {(2, 3): 4, (4, 7): 2, (8, 15): 1, (16, 31): 1}),
])
def test_band_width_halves_per_band(decay, widths):
    """32 x 32 tokens a frame = 16 blocks. Within a frame pair at distance d, query block a keeps key block b when
    |a - b| <= w: the half-width w = decay * base / 64 halves with each band, down to one block (the floor); past
    d = 32 the base is under a block and only even distances stay."""
    frames, per = 40, 16
    mask = radial_block_mask(VideoGrid(frames, 32, 32), settings(decay=decay, sink=False))
    a, b = torch.meshgrid(torch.arange(per), torch.arange(per), indexing="ij")
    for (lo, hi), w in widths.items():
        for dist in (lo, hi):
            tile = mask[:per, dist * per:(dist + 1) * per]
            assert torch.equal(tile, (a - b).abs() <= w), (dist, w)
            density = float(tile.float().mean())
            assert density == pytest.approx(float(((a - b).abs() <= w).float().mean()))
    for dist in (32, 34):
        assert torch.equal(mask[:per, dist * per:(dist + 1) * per], (a - b).abs() <= 1)
    for dist in (33, 35):
        assert not bool(mask[:per, dist * per:(dist + 1) * per].any())
    for dist in (0, 1):
        assert bool(mask[:per, dist * per:(dist + 1) * per].all())


def kept(frames, height=16, width=16, **kw):
    return int(radial_block_mask(VideoGrid(frames, height, width), settings(sink=False, **kw)).sum())


def test_total_cost_grows_as_n_log_n():
    """Doubling the frames at a fixed resolution: dense work grows 4x, Radial's ~2 (1 + 1 / log2 n) x, the ratio
    falling towards 2 as the video gets longer; the density falls."""
    counts = {f: kept(f) for f in (16, 32, 64, 128)}
    ratios = [counts[2 * f] / counts[f] for f in (16, 32, 64)]
    assert all(2.0 < r < 3.0 for r in ratios), ratios
    assert ratios == sorted(ratios, reverse=True), ratios
    densities = [counts[f] / (f * 4) ** 2 for f in sorted(counts)]
    assert densities == sorted(densities, reverse=True) and densities[-1] < 0.2


def test_text_rows_and_columns_dense():
    grid = VideoGrid(9, 8, 8, text_tokens=100)  # 576 video tokens: the block holding 512..575 is video only
    mask = radial_block_mask(grid, settings(sink=False))
    first_text = grid.video_tokens // 64
    assert first_text == 9 and mask.shape == (11, 11)
    assert bool(mask[first_text:].all()) and bool(mask[:, first_text:].all())
    assert not bool(mask[:first_text, :first_text].all())
    no_text_cols = radial_block_mask(grid, settings(sink=False, text_dense=False))
    assert bool(no_text_cols[first_text:].all())  # text queries still see everything
    assert not bool(no_text_cols[:first_text, first_text:].any())  # video queries: no text keys


def test_text_sharing_a_block_with_video_makes_it_dense():
    grid = VideoGrid(5, 6, 10, text_tokens=20)  # 300 video tokens: block 4 holds video 256..299 and text
    mask = radial_block_mask(grid, settings(sink=False))
    assert bool(mask[4].all()) and bool(mask[:, 4].all())


def test_attention_sink_on_frame_zero():
    grid = VideoGrid(16, 8, 8)  # one block a frame
    with_sink = radial_block_mask(grid, settings(sink=True))
    without = radial_block_mask(grid, settings(sink=False))
    assert bool(with_sink[:, 0].all())  # every frame sees frame 0 (Wan)
    assert not bool(without[:, 0].all()) and not bool(without[3, 0])  # d = 3 is thinned out without the sink
    assert torch.equal(with_sink[:, 1:], without[:, 1:])  # the sink changes nothing else
    assert torch.equal(with_sink[0], without[0])  # frame 0's own queries are not a sink


@pytest.mark.parametrize("grid", [VideoGrid(1, 3, 5), VideoGrid(11, 7, 9), VideoGrid(64, 4, 4),
                                  VideoGrid(33, 8, 8, text_tokens=3)])
@pytest.mark.parametrize("block", [64, 128])
def test_diagonal_always_kept(grid, block):
    for st in (settings(decay=0.01, block=block, sink=False), settings(block=block)):
        mask = radial_block_mask(grid, st)
        assert bool(mask.diagonal().all())


def test_mask_and_plan_cache():
    grid, st = VideoGrid(8, 8, 8), settings()
    assert radial_block_mask(grid, st) is radial_block_mask(VideoGrid(8, 8, 8), settings())
    planner = core.RadialPlanner(st)
    q = torch.randn(2, 3, grid.total_tokens, 16)
    plan = planner.plan(grid, q, q)
    assert planner.plan(grid, torch.randn(1, 3, grid.total_tokens, 16), q) is plan  # batch size does not matter
    other = planner.plan(VideoGrid(4, 8, 8), q, q)
    assert other is not plan and other.kv_counts.shape[-1] == 4
    mask = radial_block_mask(grid, st)
    assert plan.block_size == 64 and plan.density == pytest.approx(float(mask.float().mean()))
    assert torch.equal(kernels.indices_to_block_mask(plan.kv_indices, plan.kv_counts, mask.shape[0])[0, 0], mask)
    for frames in range(10, 16):  # a few grids at most are kept
        planner.plan(VideoGrid(frames, 8, 8), q, q)
    assert len(planner._plans) <= 4 and planner.plan(grid, q, q) is not plan
    planner.reset()  # a new run keeps static layouts
    assert planner._plans


@pytest.mark.parametrize("kw, message", [(dict(decay_factor=0.0), "decay_factor"), (dict(decay_factor=-1), "decay_factor"),
                                         (dict(decay_factor=4.5), "decay_factor"), (dict(block_size=32), "block_size"),
                                         (dict(block_size=256), "block_size")])
def test_radial_settings_validation(kw, message):
    with pytest.raises(ValueError, match=message):
        RadialSettings(**kw)


def test_video_grid_and_latent_grid():
    g = core.latent_grid((2, 16, 5, 15, 17), (1, 2, 2), extra_frames=1, text_tokens=7)  # padded up like ComfyUI
    assert g == VideoGrid(6, 8, 9, 7) and g.tokens_per_frame == 72 and g.video_tokens == 432 and g.total_tokens == 439
    with pytest.raises(ValueError):
        VideoGrid(0, 4, 4)
    with pytest.raises(ValueError):
        core.latent_grid((1, 16, 4, 4), (1, 2, 2))


# ------------------------------------------------------------------------------------------------------------------
# core/schedule.py

SparseSchedule, step_index = core.SparseSchedule, core.step_index


@pytest.mark.parametrize("dense_steps, sparse_end, total, want", [
    (0.25, 1.0, 8, range(2, 8)),    # a fraction of the run
    (0.2, 1.0, 20, range(4, 20)),
    (3, 1.0, 8, range(3, 8)),       # a step count
    (3.0, 1.0, 30, range(3, 30)),
    (0, 1.0, 4, range(0, 4)),
    (0.25, 0.75, 8, range(2, 6)),   # dense again for the last quarter
    (0.0, 0.5, 10, range(0, 5)),
    (10, 1.0, 8, range(10, 8)),     # more dense steps than steps: nothing sparse
    (0.5, 1.0, 5, range(3, 5)),     # halves round up: half of 5 steps is 3 dense steps
    (0.25, 1.0, 50, range(13, 50)),
    (0.0, 0.0, 8, range(0, 0)),
    (0.1, 1.0, 4, range(1, 4)),     # few-step runs: a fraction above 0 never rounds to no dense step
    (0.05, 1.0, 8, range(1, 8)),
    (0.25, 1.0, 4, range(1, 4)),
])
def test_sparse_step_range(dense_steps, sparse_end, total, want):
    got = SparseSchedule(dense_steps=dense_steps, sparse_end=sparse_end).sparse_step_range(total)
    assert list(got) == list(want)


def test_is_sparse_combines_steps_and_layers():
    sched = SparseSchedule(dense_steps=2, sparse_end=1.0, dense_layers=3)
    grid = {(s, l): sched.is_sparse(s, 6, l) for s in range(6) for l in range(5)}
    assert {k for k, v in grid.items() if v} == {(s, l) for s in range(2, 6) for l in range(3, 5)}


def test_precedes_sparse_is_the_last_dense_step_of_sparse_layers():
    sched = SparseSchedule(dense_steps=2, sparse_end=1.0, dense_layers=3)
    assert {(s, l) for s in range(6) for l in range(5) if sched.precedes_sparse(s, 6, l)} == {(1, 3), (1, 4)}
    assert not any(SparseSchedule(dense_steps=0).precedes_sparse(s, 6, 1) for s in range(6))  # no dense step
    assert not any(SparseSchedule(dense_steps=8).precedes_sparse(s, 6, 1) for s in range(6))  # no sparse step


@pytest.mark.parametrize("kw, message", [
    (dict(dense_steps=1.5), "dense_steps"), (dict(dense_steps=-0.1), "dense_steps"), (dict(dense_steps=2.5), "dense_steps"),
    (dict(sparse_end=1.01), "sparse_end"), (dict(sparse_end=-0.5), "sparse_end"), (dict(dense_layers=-1), "dense_layers"),
])
def test_schedule_validation(kw, message):
    with pytest.raises(ValueError, match=message):
        SparseSchedule(**kw)


SIGMAS = [1.0, 0.9, 0.7, 0.4, 0.15, 0.0]


def test_step_index_exact_sigmas():
    for i, s in enumerate(SIGMAS[:-1]):
        assert step_index(s, SIGMAS) == i
        assert step_index(s * (1 + 1e-7), torch.tensor(SIGMAS)) == i  # float32 round trips still match
    assert step_index(float(torch.tensor(0.7, dtype=torch.float32)), torch.tensor(SIGMAS, dtype=torch.float64)) == 2


def test_step_index_intermediate_sigmas():
    """Second-order samplers (DPM++ 2S, ...) call the model between two sigmas: that call belongs to the step."""
    assert step_index(0.95, SIGMAS) == 0
    assert step_index(0.55, SIGMAS) == 2
    assert step_index(math.sqrt(0.4 * 0.15), SIGMAS) == 3
    assert step_index(0.05, SIGMAS) == 4
    assert step_index(1.5, SIGMAS) is None and step_index(-0.1, SIGMAS) is None


def test_step_index_with_a_partial_schedule():
    """KSamplerAdvanced / split sigmas: the run's sample_sigmas are a slice; steps count within it."""
    part = SIGMAS[2:]
    assert [step_index(s, part) for s in part[:-1]] == [0, 1, 2]


# ------------------------------------------------------------------------------------------------------------------
# core/dispatcher.py: attention masks -> per-batch key lengths

key_lengths, Unsupported = dispatcher._key_padding_lengths, dispatcher.Unsupported
NEG = torch.finfo(torch.float32).max


def additive(keep: torch.Tensor, value=float("-inf")) -> torch.Tensor:
    return torch.where(keep, torch.zeros(()), torch.full((), value))


def suffix(length, valid):
    return torch.arange(length) < valid


@pytest.mark.parametrize("make, batch, want", [
    (lambda: None, 2, None),
    (lambda: additive(suffix(10, 7)).view(1, 1, 10), 2, [7, 7]),           # HunyuanVideo: (1, 1, L)
    (lambda: additive(suffix(10, 7), -NEG).view(1, 1, 10), 1, [7]),       # ... with -finfo.max as ComfyUI does
    (lambda: additive(suffix(10, 10)).view(1, 1, 10), 1, [10]),           # nothing padded
    (lambda: suffix(10, 4).view(1, 1, 1, 10), 3, [4, 4, 4]),              # a bool mask, True = keep
    (lambda: torch.stack([additive(suffix(10, 3)), additive(suffix(10, 9))]).view(2, 1, 1, 10), 2, [3, 9]),
    (lambda: additive(suffix(10, 6)).view(1, 10), 2, [6, 6]),              # 2D (Lq = 1, Lk)
    (lambda: additive(suffix(10, 6), -1e4).view(1, 1, 10), 1, [6]),
])
def test_suffix_masks_become_key_lengths(make, batch, want):
    got = key_lengths(make(), batch, 10)
    if want is None:
        assert got is None
    else:
        assert got.dtype == torch.int32 and got.tolist() == want


@pytest.mark.parametrize("make, key", [
    (lambda: additive(torch.tensor([True] * 4 + [False] * 2 + [True] * 4)).view(1, 1, 10), "mask-order"),  # a hole
    (lambda: additive(~suffix(10, 3)).view(1, 1, 10), "mask-order"),                       # a prefix hidden
    (lambda: torch.zeros(1, 1, 10).index_fill_(2, torch.tensor([9]), -0.5), "mask-values"),  # a soft bias
    (lambda: torch.randn(1, 1, 10), "mask-values"),
    (lambda: torch.zeros(1, 10, 10), "mask-shape"),                                         # one row per query
    (lambda: torch.zeros(10, 10), "mask-shape"),
    (lambda: torch.zeros(2, 2, 1, 10), "mask-shape"),                                       # one row per head
    (lambda: torch.zeros(1, 1, 12), "mask-shape"),                                          # another length
    (lambda: torch.zeros(3, 1, 10), "mask-shape"),                                          # another batch
])
def test_other_masks_are_unsupported(make, key):
    with pytest.raises(Unsupported) as why:
        key_lengths(make(), 2, 10)
    assert why.value.key == key


def dense_attention(q, k, v, heads, mask=None, skip_reshape=False, skip_output_reshape=False, **kwargs):
    """A stand-in for ComfyUI's attention function: (B, L, H*D) unless skip_reshape, additive or bool mask."""
    if not skip_reshape:
        q, k, v = (t.view(t.shape[0], t.shape[1], heads, -1).transpose(1, 2) for t in (q, k, v))
    if mask is not None and mask.ndim == 3:
        mask = mask.unsqueeze(1)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out if skip_output_reshape else out.transpose(1, 2).reshape(out.shape[0], out.shape[2], -1)


def make_session():
    return core.SparseAttentionSession(settings(sink=False), SparseSchedule(dense_steps=0, dense_layers=0),
                                       backend="reference")


def call(override, session, grid, q, k, v, mask):
    ctx = session.forward_context(grid, 1.0, [1.0, 0.0])
    return override(dense_attention, q, k, v, q.shape[1], mask=mask, skip_reshape=True,
                    transformer_options={core.CONTEXT_KEY: ctx})


def test_padding_mask_runs_sparse_with_key_lengths():
    grid = VideoGrid(5, 8, 8, text_tokens=20)
    B, H, D, L = 2, 2, 32, grid.total_tokens
    q, k, v = (torch.randn(B, H, L, D) for _ in range(3))
    mask = additive(suffix(L, L - 6), -NEG).view(1, 1, L)
    session = make_session()
    out = call(core.attention_override(session), session, grid, q, k, v, mask)
    assert session.stats.sparse_calls == 1 and not session.stats.fallbacks
    block_mask = radial_block_mask(grid, session.method)
    token = torch.arange(L) // 64
    allowed = block_mask[token][:, token] & (torch.arange(L) < L - 6)[None, :]
    want = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=allowed)
    assert out.shape == (B, L, H * D)
    torch.testing.assert_close(out.view(B, L, H, D).transpose(1, 2).double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad_mask, key", [
    (lambda L: additive(torch.arange(L) % 7 != 3).view(1, 1, L), "mask-order"),
    (lambda L: torch.full((1, 1, L), -0.25), "mask-values"),
    (lambda L: torch.zeros(1, L, L), "mask-shape"),
])
def test_unsupported_masks_fall_back_dense_with_one_warning(caplog, bad_mask, key):
    grid = VideoGrid(5, 8, 8, text_tokens=20)
    L = grid.total_tokens
    mask = bad_mask(L)
    session = make_session()
    override = core.attention_override(session)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        for _ in range(3):  # fresh inputs each call
            q, k, v = (torch.randn(2, 2, L, 32) for _ in range(3))
            out = call(override, session, grid, q, k, v, mask)
            torch.testing.assert_close(out, dense_attention(q, k, v, 2, mask=mask, skip_reshape=True))
    assert session.stats.sparse_calls == 0 and session.stats.fallbacks == {key: 3}
    warnings = [r for r in caplog.records if r.name == LOGGER]
    assert len(warnings) == 1 and "dense" in warnings[0].getMessage()


def test_calls_that_are_not_video_self_attention_pass_through():
    grid = VideoGrid(5, 8, 8)
    session = make_session()
    override = core.attention_override(session)
    ctx = session.forward_context(grid, 1.0, [1.0, 0.0])
    L = grid.video_tokens
    q = torch.randn(2, L, 64)
    cross_k = torch.randn(2, 16, 64)
    out = override(dense_attention, q, cross_k, cross_k, heads=2, transformer_options={core.CONTEXT_KEY: ctx})
    torch.testing.assert_close(out, dense_attention(q, cross_k, cross_k, 2))
    other = torch.randn(2, L + 1, 64)  # not this video's length
    override(dense_attention, other, other, other, heads=2, transformer_options={core.CONTEXT_KEY: ctx})
    override(dense_attention, q, q, q, heads=2, transformer_options={})  # no context: not a patched forward
    assert ctx.layer == 0 and not session.stats.calls
    override(dense_attention, q, q, q, heads=2, transformer_options={core.CONTEXT_KEY: ctx})
    assert ctx.layer == 1 and session.stats.sparse_calls == 1


def test_only_the_exact_text_and_video_length_is_the_video():
    """With the text known, only video + text tokens is the video's self-attention (not the text alone)."""
    ctx = core.ForwardContext(video=VideoGrid(2, 4, 4, text_tokens=40), step=0, total_steps=2)
    assert ctx.grid_for(72) == VideoGrid(2, 4, 4, text_tokens=40)
    assert ctx.grid_for(40) is None and ctx.grid_for(60) is None and ctx.grid_for(32) is None
