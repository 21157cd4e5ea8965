"""Summarised compensation (kernels/skipped_summary.py): a query cluster's heaviest skipped key clusters keep their own
pooled terms, the rest become one virtual key per row, affine in the row's query. The cluster kernel (Triton under
the interpreter) and the torch reference against a float64 oracle written here from that definition; where it must
reduce to per-group compensation; bad settings."""

from __future__ import annotations

import math

import pytest
import torch

from pack import import_pack
from test_block_sparse_kernel import OUT_TOL, make_qkv, new_generator
from test_cluster_attention import random_clusters
from test_compensation import DEVICE, LSE_TOL, assert_compensated, cluster_groups

K = import_pack("kernels")
BACKENDS = ("triton", "reference")

pytestmark = [pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")]


@pytest.fixture
def gen():
    return new_generator(DEVICE)


def summary_oracle(q, k, v, q_off, k_off, ids, counts, pooled, own_terms):
    """float64 (out, exact lse, compensated lse) from the definition, loop by loop. The pooled means are the ones the
    kernel was given (their rounding is tested apart); a cluster's mean query is exact here."""
    B, H, LQ, D = q.shape
    LK = k.shape[2]
    scale = 1.0 / math.sqrt(D)
    q64, k64, v64 = q.double(), k.double(), v.double()
    group = cluster_groups(k_off, LK)
    out = torch.zeros(B, H, LQ, D, dtype=torch.float64)
    lse, lse_c = (torch.full((B, H, LQ), float("-inf"), dtype=torch.float64) for _ in range(2))
    for b in range(B):
        for h in range(H):
            k_mean, v_mean = pooled.keys[b, h].double(), pooled.values[b, h].double()
            log_size = pooled.log_size[b, h].double()
            offs = q_off[b, h].tolist()
            for c in range(len(offs) - 1):
                rows = slice(offs[c], offs[c + 1])
                if offs[c] == offs[c + 1]:
                    continue
                kept = set(ids[b, h, c, :int(counts[b, h, c])].tolist())
                skipped = [g for g in range(k_mean.shape[0]) if g not in kept and math.isfinite(log_size[g])]
                centre = q64[b, h, rows].mean(0)
                weight = {g: float(log_size[g] + scale * centre @ k_mean[g]) for g in skipped}
                order = sorted(skipped, key=lambda g: -weight[g])
                own, rest = order[:own_terms], order[own_terms:]
                a = q64[b, h, rows]
                exact = torch.tensor([g in kept for g in group[b, h].tolist()])
                s = (a @ k64[b, h].T * scale).masked_fill(~exact, float("-inf"))
                cols, vals = [s], [v64[b, h][None].expand(a.shape[0], -1, -1)]
                for g in own:
                    cols.append((log_size[g] + scale * a @ k_mean[g])[:, None])
                    vals.append(v_mean[g][None, None].expand(a.shape[0], 1, D))
                if rest:
                    lw = torch.tensor([weight[g] for g in rest], dtype=torch.float64)
                    total = torch.logsumexp(lw, 0)
                    w = torch.exp(lw - total)
                    k_w, v_w = w @ k_mean[rest], w @ v_mean[rest]
                    C = sum(w[i] * torch.outer(v_mean[g] - v_w, k_mean[g] - k_w) for i, g in enumerate(rest))
                    delta = a - centre
                    cols.append((total + scale * delta @ k_w)[:, None])
                    vals.append((v_w + scale * delta @ C.T)[:, None])
                scores = torch.cat(cols, 1)
                values = torch.cat(vals, 1)
                lse[b, h, rows] = torch.logsumexp(s, 1)
                lse_c[b, h, rows] = torch.logsumexp(scores, 1)
                p = torch.exp(scores - lse_c[b, h, rows][:, None]).nan_to_num(0.0)
                out[b, h, rows] = (p[..., None] * values).sum(1)
    return out.to(DEVICE), lse.to(DEVICE), lse_c.to(DEVICE)


CLUSTER_SHAPES = {  # (B, LQ, LK, head_dim, query clusters, key clusters, last key offset)
    "B2-L90-D64": (2, 90, 90, 64, 5, 9, None),
    "B1-LQ70-LK131-D128-padding": (1, 70, 131, 128, 4, 8, 120),
    "B1-L67-D80": (1, 67, 67, 80, 3, 7, None),
}


@pytest.mark.parametrize("own_terms", [0, 2])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("shape", CLUSTER_SHAPES.values(), ids=CLUSTER_SHAPES.keys())
@pytest.mark.parametrize("backend", BACKENDS)
def test_summary_matches_oracle(backend, shape, dtype, own_terms, gen):
    """Random ragged clusters (empty ones, several tiles), a query cluster keeping nothing, padding keys, odd and
    padded head dims, batch 2."""
    B, LQ, LK, D, cq, ck, k_end = shape
    H = 2
    q, k, v = make_qkv(B, H, LQ, LK, D, dtype, gen)
    q_off, k_off, ids, counts = random_clusters(B, H, LQ, LK, cq, ck, gen, k_end=k_end)
    counts[..., 0] = 0  # every cluster skipped: own terms and the rest alone
    pooled = K.pool_key_clusters(k, v, k_off, backend=backend)
    result = K.cluster_block_attention(q, k, v, q_off, k_off, ids, counts, backend=backend, return_lse=True,
                                       pooled=pooled, own_terms=own_terms)
    expected = summary_oracle(q.cpu(), k.cpu(), v.cpu(), q_off.cpu(), k_off.cpu(), ids.cpu(), counts.cpu(),
                              K.PooledKeys(*(t.cpu() for t in (pooled.keys, pooled.values, pooled.log_size))),
                              own_terms)
    assert_compensated(result, expected, dtype, f"{backend} {shape} {dtype} own={own_terms} seed={gen.initial_seed()}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_skipped_cluster_own_is_per_group_compensation(backend, gen):
    """own_terms at least the key clusters: nothing rests, and the call is per-group compensation's."""
    B, H, L, cq, ck = 2, 2, 77, 4, 6
    q, k, v = make_qkv(B, H, L, L, 64, torch.bfloat16, gen)
    q_off, k_off, ids, counts = random_clusters(B, H, L, L, cq, ck, gen)
    pooled = K.pool_key_clusters(k, v, k_off, backend=backend)
    every = K.cluster_block_attention(q, k, v, q_off, k_off, ids, counts, backend=backend, return_lse=True,
                                      pooled=pooled)
    own = K.cluster_block_attention(q, k, v, q_off, k_off, ids, counts, backend=backend, return_lse=True,
                                    pooled=pooled, own_terms=ck)
    torch.testing.assert_close(own[0], every[0], rtol=0, atol=OUT_TOL[torch.bfloat16] / 10)
    for got, want in zip(own[1:], every[1:]):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_at_their_clusters_mean_get_the_rest_exactly(backend, gen):
    """Where every row of a query cluster is its mean query, the rest's one term is the sum of its clusters' own
    terms (the move to the row is zero): the call equals per-group compensation."""
    B, H, L, cq, ck, D = 1, 2, 64, 4, 8, 64
    _, k, v = make_qkv(B, H, L, L, D, torch.float16, gen)
    q_off, k_off, ids, counts = random_clusters(B, H, L, L, cq, ck, gen)
    row_cluster = import_pack("kernels.cluster_reference").token_clusters(q_off, L)
    means = torch.randn(B, H, cq, D, generator=gen, device=DEVICE)
    q = torch.gather(means, 2, row_cluster[..., None].expand(-1, -1, -1, D)).to(torch.float16)
    pooled = K.pool_key_clusters(k, v, k_off, backend=backend)
    every = K.cluster_block_attention(q, k, v, q_off, k_off, ids, counts, backend=backend, return_lse=True,
                                      pooled=pooled)
    summed = K.cluster_block_attention(q, k, v, q_off, k_off, ids, counts, backend=backend, return_lse=True,
                                       pooled=pooled, own_terms=0)
    torch.testing.assert_close(summed[0], every[0], rtol=0, atol=OUT_TOL[torch.float16])
    torch.testing.assert_close(summed[2], every[2], rtol=0, atol=LSE_TOL)
    assert torch.equal(summed[1], every[1])  # the exact LSE never holds a pooled term


def test_summary_in_token_order_equals_cluster_order(gen):
    """Tokens in their own order with the cluster orders (SVG2's path): the same rows as in cluster order."""
    B, H, L, cq, ck = 1, 2, 90, 4, 7
    q, k, v = make_qkv(B, H, L, L, 64, torch.bfloat16, gen)
    q_off, k_off, ids, counts = random_clusters(B, H, L, L, cq, ck, gen)
    orders = [torch.stack([torch.randperm(L, generator=gen, device=gen.device) for _ in range(B * H)]).view(B, H, L)
              .to(torch.int32) for _ in range(2)]
    cluster_reference = import_pack("kernels.cluster_reference")
    qc, kc, vc = (cluster_reference.to_cluster_order(t, o) for t, o in ((q, orders[0]), (k, orders[1]),
                                                                         (v, orders[1])))
    for backend in BACKENDS:
        pooled = K.pool_key_clusters(k, v, k_off, backend=backend, k_order=orders[1])
        got = K.cluster_block_attention(q, k, v, q_off, k_off, ids, counts, backend=backend, pooled=pooled,
                                        own_terms=1, q_order=orders[0], k_order=orders[1])
        want = K.cluster_block_attention(qc, kc, vc, q_off, k_off, ids, counts, backend=backend, pooled=pooled,
                                         own_terms=1)
        torch.testing.assert_close(cluster_reference.to_cluster_order(got, orders[0]), want, rtol=0,
                                   atol=OUT_TOL[torch.bfloat16], msg=backend)


@pytest.mark.parametrize("own_terms, why", [(-1, "count >= 0"), (True, "count >= 0"), (1.5, "count >= 0"),
                                            (2, "without pooled")])
def test_bad_own_terms_named(own_terms, why, gen):
    B, H, L = 1, 1, 40
    q, k, v = make_qkv(B, H, L, L, 64, torch.bfloat16, gen)
    q_off, k_off, ids, counts = random_clusters(B, H, L, L, 2, 3, gen)
    pooled = None if why == "without pooled" else K.pool_key_clusters(k, v, k_off, backend="reference")
    with pytest.raises(ValueError, match="own_terms") as error:
        K.cluster_block_attention(q, k, v, q_off, k_off, ids, counts, backend="reference", pooled=pooled,
                                  own_terms=own_terms)
    assert why in str(error.value)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_head_at_a_time_equals_every_head_at_once(backend, gen, monkeypatch):
    """The summary is built and launched a few heads at a time (its D x D slopes): one head per part gives the same
    output and LSE rows, written into a strided output buffer."""
    B, H, L, cq, ck = 2, 3, 60, 3, 6
    q, k, v = make_qkv(B, H, L, L, 64, torch.bfloat16, gen)
    q_off, k_off, ids, counts = random_clusters(B, H, L, L, cq, ck, gen)
    pooled = K.pool_key_clusters(k, v, k_off, backend=backend)
    once = K.cluster_block_attention(q, k, v, q_off, k_off, ids, counts, backend=backend, return_lse=True,
                                     pooled=pooled, own_terms=1)
    monkeypatch.setattr(import_pack("kernels.cluster_attention"), "SUMMARY_CHUNK_BYTES", 1)
    buffer = torch.zeros(B, L, H, 64, dtype=q.dtype, device=DEVICE).transpose(1, 2)
    parts = K.cluster_block_attention(q, k, v, q_off, k_off, ids, counts, backend=backend, return_lse=True,
                                      pooled=pooled, own_terms=1, out=buffer)
    assert parts[0] is buffer
    for got, want in zip(parts, once):  # within a rounding: smaller batched matmuls may sum in another order
        torch.testing.assert_close(got, want)
