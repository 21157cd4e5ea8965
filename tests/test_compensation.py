"""Compensation of skipped keys: the block-sparse and cluster kernels (Triton under the interpreter, and the torch
references) against a float64 oracle written here from the definition; pooled statistics; LSE semantics.

Definition: a row attends its kept keys exactly and, for every non-empty key group (key block or key cluster) it
skips, one virtual key of score ln(size) + q.k_mean * scale and value v_mean, in one softmax. The exact LSE is the
LSE over the kept keys alone; the compensated one includes the virtual keys.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pack import import_pack
from test_block_sparse_kernel import OUT_TOL, make_qkv, new_generator, oracle_block_mask, random_layout
from test_cluster_attention import random_clusters

K = import_pack("kernels")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BACKENDS = ("triton", "reference")
LSE_TOL = 2e-3

pytestmark = [pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")]


@pytest.fixture
def gen():
    return new_generator(DEVICE)


# ------------------------------------------------------------------------------------------------ oracle


def compensated_oracle(q, k, v, key_group, kept, scale=None, pooled=None):
    """float64 (out, exact lse, compensated lse) from the definition. ``pooled``: the PooledKeys the kernel was
    given, whose stored means (in the keys' dtype, within a rounding of the exact ones: tested apart) are then the
    virtual keys and values; else the exact means.

    key_group: (B, H, LK) long, each key's group, -1 for a key in none (padding). kept: (B, H, LQ, G) bool, the
    groups each row attends exactly; every other non-empty group enters as its pooled virtual key."""
    B, H, LQ, D = q.shape
    G = kept.shape[-1]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    q64, k64, v64 = q.double(), k.double(), v.double()
    member = F.one_hot(key_group.clamp(min=0), max(G, 1))[..., :G].double() * (key_group >= 0)[..., None]
    size = member.sum(dim=2)                                                       # (B, H, G)
    if pooled is None:
        k_mean = member.transpose(-1, -2) @ k64 / size.clamp(min=1)[..., None]
        v_mean = member.transpose(-1, -2) @ v64 / size.clamp(min=1)[..., None]
    else:
        k_mean, v_mean = (t.double().expand(B, H, G, D) for t in (pooled.keys, pooled.values))
    exact_ok = (kept.double() @ member.transpose(-1, -2)) > 0                      # (B, H, LQ, LK)
    s = (q64 @ k64.transpose(-1, -2) * scale).masked_fill(~exact_ok, float("-inf"))
    pooled_ok = ~kept & (size > 0)[:, :, None, :]
    sp = (q64 @ k_mean.transpose(-1, -2) * scale + size.log()[:, :, None, :]).masked_fill(~pooled_ok, float("-inf"))
    scores = torch.cat([s, sp], dim=-1)
    lse_c = torch.logsumexp(scores, dim=-1)
    p = torch.exp(scores - lse_c[..., None]).nan_to_num(0.0)                      # rows with nothing: 0
    return p @ torch.cat([v64, v_mean], dim=2), torch.logsumexp(s, dim=-1), lse_c


def block_groups(B, H, LK, block_size, kv_length):
    pos = torch.arange(LK, device=DEVICE)
    limit = torch.full((B,), LK, device=DEVICE) if kv_length is None else kv_length.long()
    group = torch.where(pos[None, :] < limit[:, None], pos // block_size, -1)
    return group[:, None].expand(B, H, LK)


def block_kept(kv_indices, kv_counts, B, H, LQ, LK, block_size):
    mask = oracle_block_mask(kv_indices, kv_counts, -(-LK // block_size)).expand(B, H, -1, -1)
    return mask[:, :, torch.arange(LQ, device=DEVICE) // block_size]


def cluster_groups(k_offsets, LK):
    B, H, _ = k_offsets.shape
    group = torch.full((B, H, LK), -1, dtype=torch.long)
    for b in range(B):
        for h in range(H):
            offs = k_offsets[b, h].tolist()
            for c in range(len(offs) - 1):
                group[b, h, offs[c]:offs[c + 1]] = c
    return group.to(DEVICE)


def cluster_kept(q_offsets, kv_clusters, kv_counts, ck, LQ):
    B, H, cq = kv_counts.shape
    kept = torch.zeros(B, H, LQ, ck, dtype=torch.bool)
    for b in range(B):
        for h in range(H):
            offs = q_offsets[b, h].tolist()
            for c in range(cq):
                for j in kv_clusters[b, h, c, :int(kv_counts[b, h, c])].tolist():
                    kept[b, h, offs[c]:offs[c + 1], j] = True
    return kept.to(DEVICE)


def assert_compensated(result, expected, dtype, ctx, compensated_lse_tol=LSE_TOL):
    out, lse, lse_c = result
    exp_out, exp_lse, exp_lse_c = expected
    assert not torch.isnan(out).any() and not torch.isnan(lse_c).any(), f"{ctx}: NaN"
    err = (out.double() - exp_out).norm().item()
    ref = exp_out.norm().item()
    assert (err / ref if ref > 0 else err) < OUT_TOL[dtype], f"{ctx}: output error {err / max(ref, 1e-30):.2e}"
    for name, got, want, tol in (("exact lse", lse, exp_lse, LSE_TOL),
                                 ("compensated lse", lse_c, exp_lse_c, compensated_lse_tol)):
        assert torch.equal(torch.isneginf(got), torch.isneginf(want)), f"{ctx}: {name} -inf on other rows"
        finite = torch.isfinite(want)
        if finite.any():
            diff = (got.double() - want)[finite].abs().max().item()
            assert diff < tol, f"{ctx}: {name} error {diff:.2e}"
    empty = torch.isneginf(exp_lse_c)
    assert (out[empty] == 0).all(), f"{ctx}: rows with nothing at all must be 0"


# --------------------------------------------------------------------------------------- block-sparse kernel

# (B, LQ, LK, head_dim, block_size): odd lengths, both block sizes, head_dim 64 and 128, a padded head_dim.
BLOCK_SHAPES = {
    "B2-L100-D64-bs64": (2, 100, 100, 64, 64),
    "B1-L130-D128-bs128": (1, 130, 130, 128, 128),
    "B2-LQ70-LK150-D64-bs64": (2, 70, 150, 64, 64),
    "B1-L90-D80-bs64": (1, 90, 90, 80, 64),
}


def _random(lead, nqb, nkb, gen):
    return random_layout(lead, nqb, nkb, gen, min_count=0)


def _fully_skipped_rows(lead, nqb, nkb, gen):
    idx, cnt = random_layout(lead, nqb, nkb, gen, min_count=0)
    cnt[..., 0] = 0  # the first query block of every head keeps nothing: the pooled terms alone
    return idx, cnt


def _none_kept(lead, nqb, nkb, gen):
    idx, cnt = random_layout(lead, nqb, nkb, gen)
    return idx, torch.zeros_like(cnt)


LAYOUTS = {"random": _random, "fully-skipped-rows": _fully_skipped_rows, "none-kept": _none_kept}


@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("shape", BLOCK_SHAPES.values(), ids=BLOCK_SHAPES.keys())
@pytest.mark.parametrize("backend", BACKENDS)
def test_block_compensation_matches_oracle(backend, shape, dtype, layout, gen):
    B, LQ, LK, D, bs = shape
    H = 2
    q, k, v = make_qkv(B, H, LQ, LK, D, dtype, gen)
    idx, cnt = layout((B, H), K.num_blocks(LQ, bs), K.num_blocks(LK, bs), gen)
    # key padding: batch element 1 (when there is one) ends inside a block, with whole blocks of padding after it
    kv_length = torch.tensor([LK, LK // 2 - 3][:B], dtype=torch.int32, device=DEVICE) if B > 1 else None
    pooled = K.pool_key_blocks(k, v, bs, kv_length, backend=backend)
    result = K.block_sparse_attention(q, k, v, idx, cnt, block_size=bs, kv_length=kv_length, return_lse=True,
                                      backend=backend, pooled=pooled)
    expected = compensated_oracle(q, k, v, block_groups(B, H, LK, bs, kv_length),
                                  block_kept(idx, cnt, B, H, LQ, LK, bs), pooled=pooled)
    assert_compensated(result, expected, dtype, f"{backend} {shape} {dtype} seed={gen.initial_seed()}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_padding_gives_zero(backend, gen):
    """A batch element whose every key is padding: no exact key and only empty blocks: 0 and -inf, no NaN."""
    B, H, L, bs = 2, 1, 70, 64
    q, k, v = make_qkv(B, H, L, L, 64, torch.bfloat16, gen)
    idx, cnt = _random((B, H), 2, 2, gen)
    kv_length = torch.tensor([L, 0], dtype=torch.int32, device=DEVICE)
    pooled = K.pool_key_blocks(k, v, bs, kv_length, backend=backend)
    out, lse, lse_c = K.block_sparse_attention(q, k, v, idx, cnt, block_size=bs, kv_length=kv_length,
                                               return_lse=True, backend=backend, pooled=pooled)
    assert (out[1] == 0).all() and torch.isneginf(lse_c[1]).all() and torch.isneginf(lse[1]).all()
    assert not torch.isnan(out).any(), f"seed={gen.initial_seed()}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_block_kept_adds_nothing(backend, gen):
    B, H, L, D, bs = 2, 2, 100, 64, 64
    q, k, v = make_qkv(B, H, L, L, D, torch.bfloat16, gen)
    nb = K.num_blocks(L, bs)
    idx, cnt = K.block_mask_to_indices(torch.ones(1, 1, nb, nb, dtype=torch.bool, device=DEVICE))
    kv_length = torch.tensor([L, 61], dtype=torch.int32, device=DEVICE)
    pooled = K.pool_key_blocks(k, v, bs, kv_length, backend=backend)
    plain, lse = K.block_sparse_attention(q, k, v, idx, cnt, block_size=bs, kv_length=kv_length, return_lse=True,
                                          backend=backend)
    out, lse_exact, lse_c = K.block_sparse_attention(q, k, v, idx, cnt, block_size=bs, kv_length=kv_length,
                                                     return_lse=True, backend=backend, pooled=pooled)
    assert torch.equal(out, plain), f"seed={gen.initial_seed()}"
    assert torch.equal(lse_exact, lse) and torch.equal(lse_c, lse), f"seed={gen.initial_seed()}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_exact_lse_is_the_uncompensated_lse(backend, gen):
    """return_lse with pooled: the first LSE is the plain call's (over the kept keys: what recall and AdaSpa's
    search read), the second one adds the pooled terms and is never below it."""
    B, H, L, bs = 1, 2, 150, 64
    q, k, v = make_qkv(B, H, L, L, 64, torch.float16, gen)
    idx, cnt = _random((B, H), 3, 3, gen)
    pooled = K.pool_key_blocks(k, v, bs, backend=backend)
    _, plain_lse = K.block_sparse_attention(q, k, v, idx, cnt, block_size=bs, return_lse=True, backend=backend)
    out, lse, lse_c = K.block_sparse_attention(q, k, v, idx, cnt, block_size=bs, return_lse=True, backend=backend,
                                               pooled=pooled)
    finite = torch.isfinite(plain_lse)
    assert torch.equal(finite, torch.isfinite(lse))
    assert (lse[finite] - plain_lse[finite]).abs().max() < 1e-5
    assert (lse_c >= lse - 1e-5).all(), f"seed={gen.initial_seed()}"
    without_lse = K.block_sparse_attention(q, k, v, idx, cnt, block_size=bs, backend=backend, pooled=pooled)
    assert torch.equal(without_lse, out)


def test_triton_and_reference_agree_token_major_out_buffer(gen):
    """Strided (B, L, H, D) inputs and an out view, shared (1, 1) layout: the two backends agree."""
    B, H, L, D, bs = 2, 3, 129, 64, 64
    q, k, v = make_qkv(B, H, L, L, D, torch.bfloat16, gen, token_major=True)
    idx, cnt = _random((1, 1), 3, 3, gen)
    outs = []
    for backend in BACKENDS:
        buffer = torch.zeros(B, L, H, D, dtype=torch.bfloat16, device=DEVICE)
        pooled = K.pool_key_blocks(k, v, bs, backend=backend)
        K.block_sparse_attention(q, k, v, idx, cnt, block_size=bs, backend=backend, pooled=pooled,
                                 out=buffer.transpose(1, 2))
        outs.append(buffer.float())
    rel = ((outs[0] - outs[1]).norm() / outs[1].norm()).item()
    assert rel < OUT_TOL[torch.bfloat16], f"{rel:.2e} seed={gen.initial_seed()}"


def test_pooled_shape_checked(gen):
    q, k, v = make_qkv(1, 1, 100, 100, 64, torch.float32, gen)
    idx, cnt = _random((1, 1), 2, 2, gen)
    wrong = K.pool_key_blocks(k, v, 128, backend="reference")  # one block of 128, the layout has two of 64
    with pytest.raises(ValueError, match="pooled must hold 2 key blocks"):
        K.block_sparse_attention(q, k, v, idx, cnt, block_size=64, backend="reference", pooled=wrong)


@pytest.mark.parametrize("precision", ["fp8", "int8"])
def test_pooled_terms_are_refused_in_8bit(precision, gen):
    q, k, v = make_qkv(1, 1, 100, 100, 64, torch.float16, gen)
    idx, cnt = _random((1, 1), 2, 2, gen)
    pooled = K.pool_key_blocks(k, v, 64, backend="reference")
    with pytest.raises(ValueError, match="runs in bf16 only"):
        K.block_sparse_attention(q, k, v, idx, cnt, block_size=64, backend="reference", pooled=pooled,
                                 precision=precision)


# ------------------------------------------------------------------------------------------- pooled statistics


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_pooled_blocks_triton_matches_reference(dtype, gen):
    if dtype == torch.float32 and DEVICE.type == "cuda":
        pytest.skip("the Triton path takes 16-bit floats")
    B, H, L, D, bs = 2, 3, 150, 80, 64
    k, v, _ = make_qkv(B, H, L, L, D, dtype, gen, token_major=True)
    kv_length = torch.tensor([150, 64], dtype=torch.int32, device=DEVICE)
    KT = import_pack("kernels.pooled_keys_triton")  # called directly: the public entry takes float32 to torch
    starts = torch.arange(0, L, bs, device=DEVICE, dtype=torch.int32)
    ends = torch.minimum(starts[None, :] + bs, kv_length[:, None]).clamp(min=0)
    keys, values, log_size = KT.triton_pool_groups(k, v, starts.view(1, 1, -1), torch.maximum(ends, starts)[:, None])
    ref = K.reference_pool_key_blocks(k, v, bs, kv_length)
    tol = dict(rtol=1e-2, atol=1e-3) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(keys.float(), ref.keys.float(), **tol)
    torch.testing.assert_close(values.float(), ref.values.float(), **tol)
    assert torch.equal(log_size, ref.log_size.expand(B, H, -1))
    assert torch.isneginf(log_size[1, :, 2]).all()  # batch element 1: block 2 is all padding


@pytest.mark.parametrize("backend", BACKENDS)
def test_pooled_clusters_match_definition(backend, gen):
    B, H, L, D = 2, 2, 97, 64
    k, v, _ = make_qkv(B, H, L, L, D, torch.bfloat16, gen)
    k_offsets = random_clusters(B, H, L, L, 3, 9, gen, k_end=90)[1]
    pooled = K.pool_key_clusters(k, v, k_offsets, backend=backend)
    group = cluster_groups(k_offsets, L)
    member = F.one_hot(group.clamp(min=0), 9).double() * (group >= 0)[..., None]
    size = member.sum(2)
    want = member.transpose(-1, -2) @ k.double() / size.clamp(min=1)[..., None]
    torch.testing.assert_close(pooled.keys.double(), want, rtol=1e-2, atol=1e-3, msg=f"seed={gen.initial_seed()}")
    assert torch.equal(torch.isneginf(pooled.log_size), size == 0)


# -------------------------------------------------------------------------------------------- cluster kernel

CLUSTER_SHAPES = {  # (B, LQ, LK, head_dim, query clusters, key clusters, last key offset)
    "B2-L90-D64": (2, 90, 90, 64, 5, 9, None),
    "B1-LQ70-LK131-D128-padding": (1, 70, 131, 128, 4, 8, 120),
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("shape", CLUSTER_SHAPES.values(), ids=CLUSTER_SHAPES.keys())
@pytest.mark.parametrize("backend", BACKENDS)
def test_cluster_compensation_matches_oracle(backend, shape, dtype, gen):
    """Random ragged clusters (empty ones, size 1, several tiles), lists with empty rows, padding keys."""
    B, LQ, LK, D, cq, ck, k_end = shape
    H = 2
    q, k, v = make_qkv(B, H, LQ, LK, D, dtype, gen)
    q_off, k_off, ids, counts = random_clusters(B, H, LQ, LK, cq, ck, gen, k_end=k_end)
    counts[..., 0] = 0  # a query cluster that keeps nothing: its rows are the pooled terms alone
    pooled = K.pool_key_clusters(k, v, k_off, backend=backend)
    result = K.cluster_block_attention(q, k, v, q_off, k_off, ids, counts, backend=backend, return_lse=True,
                                       pooled=pooled)
    expected = compensated_oracle(q, k, v, cluster_groups(k_off, LK), cluster_kept(q_off, ids, counts, ck, LQ),
                                  pooled=pooled)
    assert_compensated(result, expected, dtype, f"{backend} {shape} {dtype} seed={gen.initial_seed()}")


@pytest.mark.parametrize("own_terms", [None, 2], ids=["a term per skipped cluster", "2 own terms, the rest summed"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_cluster_all_kept_adds_nothing(backend, own_terms, gen):
    """Every key cluster kept: no pooled term (and with a summary, no own term and nothing rests), the output and
    both LSEs are the plain call's."""
    B, H, L, cq, ck = 2, 2, 77, 4, 6
    q, k, v = make_qkv(B, H, L, L, 64, torch.bfloat16, gen)
    q_off, k_off, _, _ = random_clusters(B, H, L, L, cq, ck, gen)
    ids = torch.arange(ck, dtype=torch.int32, device=DEVICE).expand(B, H, cq, ck).contiguous()
    counts = torch.full((B, H, cq), ck, dtype=torch.int32, device=DEVICE)
    pooled = K.pool_key_clusters(k, v, k_off, backend=backend)
    plain, lse = K.cluster_block_attention(q, k, v, q_off, k_off, ids, counts, backend=backend, return_lse=True)
    out, lse_exact, lse_c = K.cluster_block_attention(q, k, v, q_off, k_off, ids, counts, backend=backend,
                                                      return_lse=True, pooled=pooled, own_terms=own_terms)
    assert torch.equal(out, plain) and torch.equal(lse_exact, lse) and torch.equal(lse_c, lse), \
        f"seed={gen.initial_seed()}"


@pytest.mark.parametrize("chunk_bytes", [1, 1 << 30], ids=["a head at a time", "every head at once"])
def test_kept_table_marks_exactly_each_rows_listed_groups(chunk_bytes, gen, monkeypatch):
    """The kernels' kept table (which pooled groups a row's list keeps): for fresh random lists, shared over batch
    and heads or per head, with unused slots past each count holding arbitrary ids, it is 1 exactly at the first
    ``count`` entries of each row, built a head at a time or all at once."""
    kernel = import_pack("kernels.block_sparse_triton")
    monkeypatch.setattr(kernel, "_KEPT_TABLE_CHUNK_BYTES", chunk_bytes)
    B, H, R, G = 2, 3, 5, 11
    for shape in ((1, 1), (B, H), (1, H)):
        lists = torch.stack([torch.randperm(G, generator=gen, device=gen.device)
                             for _ in range(shape[0] * shape[1] * R)]).view(*shape, R, G)[..., :7].to(torch.int32)
        counts = torch.randint(0, 8, (*shape, R), generator=gen, device=gen.device, dtype=torch.int32)
        table = kernel.kept_table(lists, counts, G, B, H)
        assert table.shape == (B * H, R, G) and table.dtype == torch.uint8 and table.is_contiguous()
        for b, h, r in ((b, h, r) for b in range(B) for h in range(H) for r in range(R)):
            row_list, count = lists[b % shape[0], h % shape[1], r], counts[b % shape[0], h % shape[1], r]
            expected = torch.zeros(G, dtype=torch.uint8, device=gen.device)
            expected[row_list[:count].long()] = 1
            assert torch.equal(table[b * H + h, r], expected)
