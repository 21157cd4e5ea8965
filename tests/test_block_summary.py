"""Summarised compensation of a block layout (kernels/block_summary.py): every key a query block skips, summed
exactly at the block's mean query and moved to each row to first order, as one virtual key per row. The block
kernel (Triton under the interpreter) and the torch reference against a float64 oracle written here from that
definition; where it must be exact; bad settings."""

from __future__ import annotations

import math

import pytest
import torch

from pack import import_pack
from test_block_sparse_kernel import make_qkv, new_generator, random_layout
from test_compensation import BLOCK_SHAPES, DEVICE, LAYOUTS, assert_compensated, block_groups, block_kept

K = import_pack("kernels")
summary = import_pack("kernels.block_summary")
BACKENDS = ("triton", "reference")
SUMMARY_LSE_TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3}

pytestmark = [pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")]


@pytest.fixture
def gen():
    return new_generator(DEVICE)


def summary_oracle(q, k, v, kept, group, block_size):
    """float64 (out, exact lse, compensated lse) from the definition, block by block. ``kept`` (B, H, LQ, NKB) bool:
    the key blocks a row's list holds; ``group`` (B, H, LK): each key's block, -1 for padding."""
    B, H, LQ, D = q.shape
    scale = 1.0 / math.sqrt(D)
    q64, k64, v64 = (t.double().cpu() for t in (q, k, v))
    kept, group = kept.cpu(), group.cpu()
    out = torch.zeros(B, H, LQ, D, dtype=torch.float64)
    lse, lse_c = (torch.full((B, H, LQ), float("-inf"), dtype=torch.float64) for _ in range(2))
    for b in range(B):
        for h in range(H):
            valid = group[b, h] >= 0
            mean_k, mean_v = k64[b, h][valid].mean(0), v64[b, h][valid].mean(0)
            moments = {}
            for g in group[b, h][valid].unique().tolist():
                members = group[b, h] == g
                kc, vc = k64[b, h][members] - mean_k, v64[b, h][members] - mean_v
                moments[g] = kc.T @ vc / int(members.sum())                    # (D_k, D_v)
            for r0 in range(0, LQ, block_size):
                rows = slice(r0, min(LQ, r0 + block_size))
                a = q64[b, h, rows]
                centre = a.mean(0)
                listed = kept[b, h, r0][group[b, h].clamp(min=0)] & valid
                exact, skipped = listed, ~listed & valid
                s = (a @ k64[b, h].T * scale).masked_fill(~exact, float("-inf"))
                cols, vals = [s], [v64[b, h][None].expand(a.shape[0], -1, -1)]
                if skipped.any():
                    sc = (centre @ k64[b, h][skipped].T) * scale
                    total = torch.logsumexp(sc, 0)
                    w = torch.exp(sc - total)
                    k_w, v_w = w @ k64[b, h][skipped], w @ v64[b, h][skipped]
                    share = torch.zeros(int(group[b, h].max()) + 1, dtype=torch.float64).index_add_(
                        0, group[b, h][skipped].cpu(), w)
                    gram = sum(share[g] * moments[g] for g in moments)
                    slope = scale * (gram - torch.outer(k_w - mean_k, v_w - mean_v))
                    delta = a - centre
                    spread = (w @ k64[b, h][skipped].square().sum(1) - k_w @ k_w).clamp(min=0) / D
                    shrink = summary.MOVE_DAMPING * scale ** 2 * delta.square().sum(1) * spread
                    cols.append((total + scale * delta @ k_w)[:, None])
                    moved = (delta @ slope) / (1 + shrink ** 2)[:, None]
                    bound = summary.MOVE_LIMIT * v_w.norm() / moved.norm(dim=1).clamp(min=1e-300)
                    vals.append((v_w + moved * bound.clamp(max=1.0)[:, None])[:, None])
                scores = torch.cat(cols, 1)
                values = torch.cat(vals, 1)
                lse[b, h, rows] = torch.logsumexp(s, 1)
                lse_c[b, h, rows] = torch.logsumexp(scores, 1)
                p = torch.exp(scores - lse_c[b, h, rows][:, None]).nan_to_num(0.0)
                out[b, h, rows] = (p[..., None] * values).sum(1)
    return out.to(DEVICE), lse.to(DEVICE), lse_c.to(DEVICE)


def _case(shape, dtype, layout, gen, padded=True):
    B, LQ, LK, D, bs = shape
    H = 2
    q, k, v = make_qkv(B, H, LQ, LK, D, dtype, gen)
    idx, cnt = layout((B, H), K.num_blocks(LQ, bs), K.num_blocks(LK, bs), gen)
    # key padding: batch element 1 (when there is one) ends inside a block, with whole blocks of padding after it
    kv_length = torch.tensor([LK, LK // 2 - 3][:B], dtype=torch.int32, device=DEVICE) if B > 1 and padded else None
    return q, k, v, idx, cnt, kv_length


def _four_heads(shape, dtype, gen):
    """_case's random layout on 4 heads: its two and their flips (heads with distinct rows)."""
    q, k, v, idx, cnt, kv_length = _case(shape, dtype, LAYOUTS["random"], gen)
    q, k, v = (torch.cat([t, t.flip(1)], dim=1) for t in (q, k, v))
    return q, k, v, torch.cat([idx, idx], dim=1), torch.cat([cnt, cnt], dim=1), kv_length


@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("shape", BLOCK_SHAPES.values(), ids=BLOCK_SHAPES.keys())
@pytest.mark.parametrize("backend", BACKENDS)
def test_summary_matches_oracle(backend, shape, dtype, layout, gen):
    q, k, v, idx, cnt, kv_length = _case(shape, dtype, layout, gen)
    B, H, LQ, _ = q.shape
    LK, bs = k.shape[2], shape[-1]
    result = K.block_sparse_attention(q, k, v, idx, cnt, block_size=bs, kv_length=kv_length, return_lse=True,
                                      backend=backend, summarise=True)
    expected = summary_oracle(q, k, v, block_kept(idx, cnt, B, H, LQ, LK, bs),
                              block_groups(B, H, LK, bs, kv_length), bs)
    # The summary's scores at the mean query come from tensor-core matmuls in q's dtype (one rounding of each score
    # to 16 bits: kernels/block_summary.py), so its LSE is held to 16-bit score precision.
    assert_compensated(result, expected, dtype, f"{backend} {shape} {dtype} seed={gen.initial_seed()}",
                       compensated_lse_tol=SUMMARY_LSE_TOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_at_their_blocks_mean_get_every_skipped_key_exactly(backend, gen):
    """Queries equal within each query block: every row is its block's mean, so the summed term is exact and the
    compensated call is dense attention, whatever the layout keeps."""
    B, H, L, D, bs = 2, 2, 150, 64, 64
    _, k, v = make_qkv(B, H, L, L, D, torch.float16, gen)
    nb = K.num_blocks(L, bs)
    q = torch.randn(B, H, nb, D, generator=gen, device=DEVICE).repeat_interleave(bs, dim=2)[:, :, :L]
    q = q.to(torch.float16).contiguous()
    idx, cnt = random_layout((B, H), nb, nb, gen, min_count=0)
    out, _, lse_c = K.block_sparse_attention(q, k, v, idx, cnt, block_size=bs, return_lse=True, backend=backend,
                                             summarise=True)
    dense_out, dense_lse = K.dense_attention_with_lse(q, k, v)
    assert (out.double() - dense_out.double()).norm() / dense_out.double().norm() < 2e-3
    assert (lse_c - dense_lse).abs().max() < 2e-3


@pytest.mark.parametrize("backend", BACKENDS)
def test_value_move_held_to_its_bound(backend, gen):
    """A term whose tangent overshoots (a large slope, nothing damped): each row's value moves MOVE_LIMIT |v_w| at
    most, along the tangent; a row whose move is within the bound keeps it whole."""
    B, H, L, D, bs = 1, 2, 100, 64, 64
    nqb = K.num_blocks(L, bs)
    q = torch.randn(B, H, L, D, generator=gen, device=DEVICE).to(torch.float16)
    f32 = dict(device=DEVICE, dtype=torch.float32)
    centre = torch.randn(B, H, nqb, D, generator=gen, **f32)
    value = torch.randn(B, H, nqb, D, generator=gen, **f32)
    slope = torch.randn(B, H, nqb, D, D, generator=gen, **f32) * 0.3
    slope[:, 1] *= 0.05  # head 1: moves about a sixth of |v_w|, within the bound
    term = summary.SkippedSummary(
        own=torch.zeros(B, H, nqb, 0, device=DEVICE, dtype=torch.int32),
        own_counts=torch.zeros(B, H, nqb, device=DEVICE, dtype=torch.int32), centre=centre,
        log_weight=torch.zeros(B, H, nqb, **f32), key=torch.zeros(B, H, nqb, D, **f32), value=value,
        slope=slope.to(torch.float16), spread=torch.zeros(B, H, nqb, **f32))
    out = torch.zeros(B, H, L, D, device=DEVICE, dtype=torch.float16)
    lse = torch.full((B, H, L), float("-inf"), **f32)  # rows with no exact key: the output is the term's value
    summary.fold_summary(out, lse, q, term, block_size=bs, scale=D ** -0.5, backend=backend,
                         lse_out=torch.empty_like(lse))
    at = torch.arange(L, device=DEVICE) // bs
    v_w = value[:, :, at].double()
    tangent = ((q.double() - centre[:, :, at].double())[..., None, :] @ slope[:, :, at].half().double())[..., 0, :]
    moved = out.double() - v_w
    ctx = f"seed={gen.initial_seed()}"
    bound = summary.MOVE_LIMIT * v_w.norm(dim=-1)
    assert (moved[:, 0].norm(dim=-1) <= bound[:, 0] * 1.01 + 1e-2).all(), ctx
    assert (moved[:, 0].norm(dim=-1) >= bound[:, 0] * 0.98 - 1e-2).all(), f"{ctx}: head 0's moves are cut to it"
    cos = torch.nn.functional.cosine_similarity(moved[:, 0], tangent[:, 0], dim=-1)
    assert (cos > 0.99).all(), f"{ctx}: along the tangent"
    assert (tangent[:, 1].norm(dim=-1) < bound[:, 1]).all() and tangent[:, 1].norm(dim=-1).mean() > 0.1 * bound.mean()
    torch.testing.assert_close(moved[:, 1], tangent[:, 1], atol=2e-2, rtol=1e-2, msg=ctx)


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_block_kept_adds_nothing(backend, gen):
    q, k, v, _, _, _ = _case(BLOCK_SHAPES["B2-L100-D64-bs64"], torch.bfloat16, LAYOUTS["random"], gen)
    nb = K.num_blocks(100, 64)
    idx = torch.arange(nb, dtype=torch.int32, device=DEVICE).expand(2, 2, nb, nb).contiguous()
    cnt = torch.full((2, 2, nb), nb, dtype=torch.int32, device=DEVICE)
    plain, lse = K.block_sparse_attention(q, k, v, idx, cnt, block_size=64, return_lse=True, backend=backend)
    out, exact, lse_c = K.block_sparse_attention(q, k, v, idx, cnt, block_size=64, return_lse=True, backend=backend,
                                                 summarise=True)
    assert torch.equal(out, plain) and torch.equal(exact, lse) and torch.equal(lse_c, lse)


@pytest.mark.parametrize("pass_heads, slope_heads", [(1, 1), (2, 1), (3, 2)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_few_heads_at_a_time_equals_all_at_once(backend, pass_heads, slope_heads, gen, monkeypatch):
    """The pass at the mean queries and the slopes each take their own number of heads at a time (the slopes'
    parts nested in the pass's, the last ones shorter): the same result as every head at once."""
    q, k, v, idx, cnt, kv_length = _four_heads((2, 100, 100, 64, 64), torch.bfloat16, gen)
    args = dict(block_size=64, kv_length=kv_length, return_lse=True, backend=backend, summarise=True)
    whole = K.block_sparse_attention(q, k, v, idx, cnt, **args)
    chunk = summary.SUMMARY_CHUNK_BYTES
    monkeypatch.setattr(summary, "_pass_head_bytes", lambda *a: chunk // pass_heads)
    monkeypatch.setattr(summary, "_slope_head_bytes", lambda *a: chunk // slope_heads)
    monkeypatch.setattr(summary, "CHUNK_BYTES", 1)                                     # one query block a pass
    parts = K.block_sparse_attention(q, k, v, idx, cnt, **args)
    for got, want in zip(parts, whole):
        torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_chosen_heads_alone_are_compensated(backend, gen):
    """summarise=[heads]: those heads' rows and compensated LSE as with every head compensated, the others' rows the
    plain call's and their compensated LSE their exact one (heads whose rows a planner writes otherwise)."""
    q, k, v, idx, cnt, kv_length = _four_heads((2, 100, 100, 64, 64), torch.bfloat16, gen)
    args = dict(block_size=64, kv_length=kv_length, return_lse=True, backend=backend)
    plain, lse = K.block_sparse_attention(q, k, v, idx, cnt, **args)
    every = K.block_sparse_attention(q, k, v, idx, cnt, summarise=True, **args)
    chosen = [3, 0, 1]                                                                    # runs 0-1 and 3, unsorted
    out, exact, lse_c = K.block_sparse_attention(q, k, v, idx, cnt, summarise=chosen, **args)
    torch.testing.assert_close(exact, lse)
    for h in range(4):
        want = (every[0][:, h], every[2][:, h]) if h in chosen else (plain[:, h], lse[:, h])
        torch.testing.assert_close(out[:, h], want[0], atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(lse_c[:, h], want[1], atol=2e-3, rtol=2e-3)


def test_shared_layout_and_token_major_out_buffer(gen):
    """A layout shared by every head (H = 1) and an output written through a (B, L, H, D) view: both backends agree."""
    B, H, L, D, bs = 1, 3, 130, 64, 64
    q, k, v = make_qkv(B, H, L, L, D, torch.bfloat16, gen, token_major=True)
    nb = K.num_blocks(L, bs)
    idx, cnt = random_layout((1, 1), nb, nb, gen, min_count=0)
    results = []
    for backend in BACKENDS:
        buffer = torch.zeros(B, L, H, D, dtype=q.dtype, device=DEVICE)
        K.block_sparse_attention(q, k, v, idx, cnt, block_size=bs, out=buffer.transpose(1, 2), backend=backend,
                                 summarise=True)
        results.append(buffer)
    torch.testing.assert_close(results[0], results[1], atol=2e-2, rtol=2e-2)


SELF_SHAPES = {k: s for k, s in BLOCK_SHAPES.items() if s[1] == s[2]}                  # an order needs LQ == LK


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("shape", SELF_SHAPES.values(), ids=SELF_SHAPES.keys())
@pytest.mark.parametrize("backend", BACKENDS)
def test_compensation_through_an_order_is_the_permuted_calls(backend, shape, dtype, gen):
    """compensate_block_layout(order=...) on rows in the tokens' own order equals summarise on copies in that order
    (SVG's temporal heads: the layout over the token-major order), rows and LSE put back; kv_length counts positions
    of the order; the heads not chosen keep their rows and exact LSE."""
    q, k, v, idx, cnt, kv_length = _four_heads(shape, dtype, gen)
    L, bs = q.shape[2], shape[-1]
    order = torch.randperm(L, generator=torch.Generator().manual_seed(gen.initial_seed())).to(DEVICE)
    moved = [t[:, :, order] for t in (q, k, v)]
    args = dict(block_size=bs, kv_length=kv_length, backend=backend)
    chosen = [0, 2, 3]
    want_out, want_lse, want_c = K.block_sparse_attention(*moved, idx, cnt, return_lse=True, summarise=chosen, **args)
    plain, lse = K.block_sparse_attention(*moved, idx, cnt, return_lse=True, **args)
    out, exact = torch.empty_like(q), torch.empty(lse.shape, device=DEVICE)
    out[:, :, order], exact[:, :, order] = plain, lse                                    # the call made, put back
    lse_c = K.compensate_block_layout(out, exact, q, k, v, idx, cnt, order=order, heads=chosen, **args)
    tol = dict(atol=2e-3, rtol=2e-3) if backend == "reference" else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(out[:, :, order], want_out, **tol)
    torch.testing.assert_close(lse_c[:, :, order], want_c, **tol)
    torch.testing.assert_close(lse_c[:, 1], exact[:, 1])


def test_compensate_block_layout_names_bad_input(gen):
    q, k, v, idx, cnt, _ = _case(BLOCK_SHAPES["B2-L100-D64-bs64"], torch.bfloat16, LAYOUTS["random"], gen)
    out, lse = K.block_sparse_attention(q, k, v, idx, cnt, block_size=64, return_lse=True, backend="reference")
    order = torch.arange(100, device=DEVICE)
    args = dict(out=out, lse=lse, q=q, k=k, v=v, kv_indices=idx, kv_counts=cnt, block_size=64, order=order)
    call = lambda **kw: K.compensate_block_layout(**{**args, **kw})  # noqa: E731
    with pytest.raises(ValueError, match="order must be a \\(100,\\) integer tensor"):
        call(order=order[:99])
    with pytest.raises(ValueError, match="order must be a \\(100,\\) integer tensor"):
        call(order=order.float())
    with pytest.raises(ValueError, match="lse must be the call's \\(2, 2, 100\\) float32 LSE rows"):
        call(lse=lse.half())
    with pytest.raises(ValueError, match="out must be the call's output rows"):
        call(out=None)
    for bad in ([2], True):
        with pytest.raises(ValueError, match="heads must be None or a list of head indices in \\[0, 2\\)"):
            call(heads=bad)
    short = K.block_sparse_attention(q[:, :, :70], k, v, idx[:, :, :2], cnt[:, :, :2], block_size=64,
                                     return_lse=True, backend="reference")
    with pytest.raises(ValueError, match="LQ == LK"):
        call(out=short[0], lse=short[1], q=q[:, :, :70], kv_indices=idx[:, :, :2], kv_counts=cnt[:, :, :2],
             order=order[:70])


def test_bad_settings_are_named(gen):
    q, k, v, idx, cnt, _ = _case(BLOCK_SHAPES["B2-L100-D64-bs64"], torch.bfloat16, LAYOUTS["random"], gen)
    pooled = K.pool_key_blocks(k, v, 64, backend="reference")
    with pytest.raises(ValueError, match="summarise and pooled"):
        K.block_sparse_attention(q, k, v, idx, cnt, block_size=64, pooled=pooled, summarise=True)
    for bad in ("yes", [0, 5], [1.0]):
        with pytest.raises(ValueError, match="summarise must be True, False or a list of head indices"):
            K.block_sparse_attention(q, k, v, idx, cnt, block_size=64, summarise=bad)
    with pytest.raises(ValueError, match="bf16 only"):
        K.block_sparse_attention(q, k, v, idx, cnt, block_size=64, summarise=True, precision="int8",
                                 backend="reference")
