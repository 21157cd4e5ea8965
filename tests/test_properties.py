"""Property tests (hypothesis): Radial layouts over random grids and settings, the layout helpers, and the Triton kernel
(Triton's CPU interpreter without a GPU) against the torch reference on random small shapes and layouts.

Examples are random on every run (no fixed seed) but bounded, so the file stays well under 30 s; a failure prints the
falsifying example and a ``@reproduce_failure`` blob. No example database is written (database=None).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from pack import import_pack
from test_radial import oracle_block_mask

core = import_pack("core")
kernels = import_pack("kernels")

VideoGrid, RadialSettings, radial_block_mask = core.VideoGrid, core.RadialSettings, core.radial_block_mask

COMMON = dict(deadline=None, database=None, derandomize=False, print_blob=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                     HealthCheck.function_scoped_fixture])

pytestmark = [pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")]

grids = st.builds(VideoGrid, frames=st.integers(1, 12), height=st.integers(1, 20), width=st.integers(1, 20),
                  text_tokens=st.integers(0, 300))
decays = st.one_of(st.sampled_from([0.01, 0.2, 0.5, 0.95, 1.0, 4.0]), st.floats(0.01, 4.0, allow_nan=False))
radial_settings = st.builds(RadialSettings, decay_factor=decays, block_size=st.sampled_from([64, 128]),
                            attention_sink=st.booleans(), text_dense=st.booleans())


def frames_of_block(grid: VideoGrid, b: int, block: int) -> tuple[int, int] | None:
    """(first frame, last frame) of the tokens of block b, None if it holds any text token."""
    lo, hi = b * block, min((b + 1) * block, grid.total_tokens) - 1
    if hi >= grid.video_tokens:
        return None
    return lo // grid.tokens_per_frame, hi // grid.tokens_per_frame


@settings(max_examples=60, **COMMON)
@given(grid=grids, st_=radial_settings, other_decay=decays)
def test_radial_layouts_are_valid(grid, st_, other_decay):
    block = st_.block_size
    mask = radial_block_mask(grid, st_)
    nb = -(-grid.total_tokens // block)
    assert mask.dtype == torch.bool and mask.shape == (nb, nb) and mask.device.type == "cpu"
    assert bool(mask.diagonal().all()), "every query block keeps its diagonal"

    first_text = grid.video_tokens // block
    if grid.text_tokens:
        assert bool(mask[first_text:].all()), "text rows are dense"
        if st_.text_dense:
            assert bool(mask[:, first_text:].all()), "text columns are dense with text_dense"
        else:  # video queries see no block that holds only text
            assert not bool(mask[:first_text, first_text + 1:].any())

    # Frame pairs at distance <= 1 are kept whole: a tile whose every (query, key) pair is that close is kept.
    spans = [frames_of_block(grid, b, block) for b in range(nb)]
    for a, fa in enumerate(spans):
        for b, fb in enumerate(spans):
            if fa is not None and fb is not None and max(abs(fa[1] - fb[0]), abs(fb[1] - fa[0])) <= 1:
                assert bool(mask[a, b]), (a, b, fa, fb)
    if st_.attention_sink and grid.tokens_per_frame >= block:  # block 0 is all frame 0: every row sees it
        assert bool(mask[:, 0].all())

    # More decay never drops a tile; the sink only adds tiles.
    lo, hi = sorted((st_.decay_factor, other_decay))
    narrow = radial_block_mask(grid, RadialSettings(lo, block, st_.attention_sink, st_.text_dense))
    wide = radial_block_mask(grid, RadialSettings(hi, block, st_.attention_sink, st_.text_dense))
    assert not bool((narrow & ~wide).any()), "a larger decay_factor must keep a superset"
    no_sink = radial_block_mask(grid, RadialSettings(st_.decay_factor, block, False, st_.text_dense))
    assert not bool((no_sink & ~mask).any()), "the sink only adds tiles"

    # The layout the kernels get: counts match the mask, indices in range and ascending, the round trip is exact.
    idx, cnt = kernels.block_mask_to_indices(mask[None, None])
    kernels.validate_layout(idx, cnt, num_kv_blocks=nb, num_q_blocks=nb, batch=1, heads=1)
    assert torch.equal(cnt[0, 0], mask.sum(-1, dtype=torch.int32))
    assert int(idx.min()) >= 0 and int(idx.max()) < nb
    for row, count in zip(idx[0, 0], cnt[0, 0]):
        kept = row[: int(count)]
        assert bool((kept[1:] > kept[:-1]).all())
    assert torch.equal(kernels.indices_to_block_mask(idx, cnt, nb)[0, 0], mask)

    plan = core.RadialPlanner(st_).plan(grid, torch.empty(1, 1, grid.total_tokens, 16), None)
    assert plan.density == pytest.approx(float(mask.float().mean()))
    assert torch.equal(plan.kv_counts, cnt) and torch.equal(plan.kv_indices, idx)


@settings(max_examples=40, **COMMON)
@given(grid=st.builds(VideoGrid, frames=st.integers(1, 8), height=st.integers(1, 12), width=st.integers(1, 12),
                      text_tokens=st.integers(0, 100)), st_=radial_settings)
def test_radial_layouts_match_the_token_rule(grid, st_):
    """Against test_radial's independent oracle (the rule materialised per token, then tiled by coverage)."""
    assume(grid.total_tokens <= 1200)
    assert torch.equal(radial_block_mask(grid, st_), oracle_block_mask(grid, st_))


@settings(max_examples=60, **COMMON)
@given(lead=st.lists(st.integers(1, 3), min_size=0, max_size=2), nqb=st.integers(1, 9), nkb=st.integers(1, 9),
       density=st.floats(0.0, 1.0), seed=st.integers(0, 2**31 - 1))
def test_mask_indices_round_trip(lead, nqb, nkb, density, seed):
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(*lead, nqb, nkb, generator=gen) < density
    idx, cnt = kernels.block_mask_to_indices(mask)
    assert idx.dtype == cnt.dtype == torch.int32 and cnt.shape == mask.shape[:-1]
    assert torch.equal(cnt, mask.sum(-1, dtype=torch.int32))
    assert idx.shape[-1] == max(1, int(cnt.max()) if cnt.numel() else 0)
    assert int(idx.min()) >= 0 and int(idx.max()) < nkb  # padding slots are valid indices too
    assert torch.equal(kernels.indices_to_block_mask(idx, cnt, nkb), mask)
    # Any order and any valid padding after the counts describe the same mask.
    perm = torch.rand(*idx.shape, generator=gen).argsort(-1)
    slot = torch.arange(idx.shape[-1])
    valid = slot < cnt[..., None]
    shuffled_keys = torch.where(valid, perm.float(), float("inf"))  # shuffle the kept entries among themselves
    order = shuffled_keys.argsort(-1)
    shuffled = torch.gather(idx, -1, order)
    junk = torch.randint(0, nkb, idx.shape, generator=gen, dtype=torch.int32)
    shuffled = torch.where(valid, shuffled, junk)
    assert torch.equal(kernels.indices_to_block_mask(shuffled, cnt, nkb), mask)


@st.composite
def kernel_cases(draw):
    block = draw(st.sampled_from([64, 128]))
    L = draw(st.integers(1, 300))
    LK = draw(st.one_of(st.just(L), st.integers(1, 300)))
    D = draw(st.sampled_from([16, 32, 64, 80]))
    B, H = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    lead = draw(st.sampled_from([(1, 1), (B, 1), (1, H), (B, H)]))
    density = draw(st.floats(0.0, 1.0))
    kv_length = draw(st.one_of(st.none(), st.lists(st.integers(0, LK + 10), min_size=B, max_size=B)))
    dtype = draw(st.sampled_from([torch.bfloat16, torch.float16]))
    seed = draw(st.integers(0, 2**31 - 1))
    return block, L, LK, D, B, H, lead, density, kv_length, dtype, seed


@settings(max_examples=20, **COMMON)
@given(case=kernel_cases())
def test_triton_kernel_equals_the_reference(case):
    block, L, LK, D, B, H, lead, density, kv_length, dtype, seed = case
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not kernels.triton_available(device):
        pytest.skip("needs Triton (its CPU interpreter or a GPU)")
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, L, D, generator=gen).to(device, dtype)
    k, v = (torch.randn(B, H, LK, D, generator=gen).to(device, dtype) for _ in range(2))
    nqb, nkb = -(-L // block), -(-LK // block)
    mask = torch.rand(*lead, nqb, nkb, generator=gen) < density
    idx, cnt = (t.to(device) for t in kernels.block_mask_to_indices(mask))
    lengths = None if kv_length is None else torch.tensor(kv_length, device=device)
    got, got_lse = kernels.block_sparse_attention(q, k, v, idx, cnt, block_size=block, kv_length=lengths,
                                                  return_lse=True, backend="triton")
    want, want_lse = kernels.reference_block_sparse_attention(q, k, v, idx, cnt, block_size=block,
                                                              scale=1.0 / math.sqrt(D), kv_length=lengths,
                                                              return_lse=True)
    assert not torch.isnan(got).any() and not torch.isnan(got_lse).any()
    err = float((got.float() - want.float()).norm() / want.float().norm().clamp(min=1e-6))
    assert err < 1e-2, f"relative error {err:.2e}"
    empty = torch.isneginf(want_lse)
    assert torch.equal(torch.isneginf(got_lse), empty) and bool((got[empty] == 0).all())
    if (~empty).any():
        assert float((got_lse - want_lse)[~empty].abs().max()) < 1e-3
