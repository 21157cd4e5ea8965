"""Cluster attention on a CUDA GPU at realistic sizes: the compiled Triton kernel against a dense float64 oracle
(odd lengths, ragged clusters of SVG2's sizes, B=2, head_dim 64/80/128, bf16/fp16, every benchmark tile config).
Skipped without CUDA; rerun a failure with BSA_SEED=<seed> (the seed is in the message).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from pack import REPO_ROOT, import_pack
from test_block_sparse_kernel import assert_matches, new_generator
from test_cluster_attention import all_kept, dense_oracle, oracle_token_mask, random_lists, random_offsets

K = import_pack("kernels")
KT = import_pack("kernels.cluster_triton")

pytestmark = pytest.mark.gpu

B, H = 2, 4
ROW_CHUNK = 512  # the oracle's float64 score buffer: B * H * 512 * LK * 8 bytes
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@pytest.fixture
def gen():
    return new_generator("cuda")


def make_qkv(LQ, LK, D, dtype, gen, *, token_major=False, heads=H):
    def rand(length):
        shape = (B, length, heads, D) if token_major else (B, heads, length, D)
        t = torch.randn(shape, generator=gen, device="cuda").to(dtype)
        return t.transpose(1, 2) if token_major else t
    return rand(LQ), rand(LK), rand(LK)


def ragged_clusters(LQ, LK, cq, ck, gen, *, k_end=None, heads=H, width=None):
    """Clusters of mixed sizes (empty, 1, below and above 64/128-row tiles), different per (batch, head); each
    query cluster keeps a random number of random key clusters (up to ``width``), some keep none."""
    q_off = random_offsets(B, heads, LQ, cq, gen, tile=max(2, 2 * LQ // cq), device="cuda")
    k_off = random_offsets(B, heads, LK if k_end is None else k_end, ck, gen, tile=max(2, 2 * LK // ck), device="cuda")
    return (q_off, k_off, *random_lists(B, heads, cq, ck, gen, width=width, device="cuda"))


def check(q, k, v, clusters, gen, ctx, *, backend="triton", **kwargs):
    out, lse = K.cluster_block_attention(q, k, v, *clusters, backend=backend, return_lse=True, **kwargs)
    expected = dense_oracle(q, k, v, clusters, scale=kwargs.get("scale"), row_chunk=ROW_CHUNK)
    assert_matches(out, lse, expected, q.dtype, f"{backend} {ctx} seed={gen.initial_seed()}")
    return out


@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_matches_oracle(dtype, D, gen):
    L = 4096 + 37
    q, k, v = make_qkv(L, L, D, dtype, gen)
    check(q, k, v, ragged_clusters(L, L, 17, 55, gen, width=20), gen, f"D={D} {dtype}")


def test_svg2_sizes(gen):
    """SVG2's proportions (~250-row query and ~75-token key clusters, a quarter of the keys kept) at L=20,000."""
    L = 20000
    q, k, v = make_qkv(L, L, 128, torch.bfloat16, gen, heads=1)
    clusters = ragged_clusters(L, L, 80, 266, gen, heads=1, width=66)
    check(q, k, v, clusters, gen, "svg2 proportions")


def _benchmark_module():
    spec = importlib.util.spec_from_file_location("cluster_benchmark", REPO_ROOT / "benchmarks" / "cluster_attention.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_BENCHMARK = _benchmark_module()


@pytest.mark.parametrize("config", _BENCHMARK.SWEEP, ids=_BENCHMARK.config_name)
def test_tile_configs(config, gen):
    """Every config the benchmark sweeps computes the right thing (D=128, key padding, cross lengths)."""
    LQ, LK = 3000 + 11, 2500 + 3
    q, k, v = make_qkv(LQ, LK, 128, torch.bfloat16, gen)
    clusters = ragged_clusters(LQ, LK, 13, 41, gen, k_end=LK - 100, width=15)
    from triton.runtime.errors import OutOfResources

    try:
        out, lse = KT.triton_cluster_attention(q, k, v, *clusters, scale=128 ** -0.5, return_lse=True, config=config)
    except OutOfResources as why:  # the benchmark reports these as errors too
        pytest.skip(f"does not fit this GPU: {why}")
    expected = dense_oracle(q, k, v, clusters, row_chunk=ROW_CHUNK)
    assert_matches(out, lse, expected, q.dtype, f"{config} seed={gen.initial_seed()}")


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_all_kept_matches_sdpa(dtype, gen):
    L = 4096 + 37
    q, k, v = make_qkv(L, L, 128, dtype, gen)
    clusters = (random_offsets(B, H, L, 21, gen, tile=400, device="cuda"),
                random_offsets(B, H, L, 60, gen, tile=140, device="cuda"), *all_kept(B, H, 21, 60, device="cuda"))
    out = K.cluster_block_attention(q, k, v, *clusters, backend="triton")
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    rel = ((out.float() - sdpa.float()).norm() / sdpa.float().norm()).item()
    assert rel < 1e-2, f"vs SDPA: relative error {rel:.2e} seed={gen.initial_seed()}"


@pytest.mark.parametrize("D", [128, 80])
@pytest.mark.parametrize("view", ["contiguous", "token-major"])
def test_out_buffer_and_strided_inputs(view, D, gen):
    L = 4096 + 37
    q, k, v = make_qkv(L, L, D, torch.bfloat16, gen, token_major=view == "token-major")
    if view == "contiguous":
        storage = out = torch.full((B, H, L, D), float("nan"), dtype=q.dtype, device="cuda")
    else:  # Wan's (B, L, H, D), with an extra token and head that must stay untouched
        storage = torch.full((B, L + 3, H + 1, D), float("nan"), dtype=q.dtype, device="cuda")
        out = storage[:, :L, :H].transpose(1, 2)
    result = check(q, k, v, ragged_clusters(L, L, 17, 55, gen, width=10), gen, f"out={view} D={D}", out=out)
    assert result.data_ptr() == out.data_ptr() and not torch.isnan(out).any()
    if view == "token-major":
        assert torch.isnan(storage[:, L:]).all() and torch.isnan(storage[:, :, H:]).all(), "wrote outside out"


@pytest.mark.parametrize("LQ, LK", [(4133, 3000), (1000, 4133)])
def test_cross_lengths_and_key_padding(LQ, LK, gen):
    q, k, v = make_qkv(LQ, LK, 128, torch.float16, gen)
    check(q, k, v, ragged_clusters(LQ, LK, 11, 37, gen, k_end=LK - 77, width=12), gen, f"LQ={LQ} LK={LK}",
          scale=0.07)


def test_backends_agree_and_pair_count(gen):
    L = 3000
    q, k, v = make_qkv(L, L, 64, torch.bfloat16, gen)
    clusters = ragged_clusters(L, L, 15, 40, gen, width=12)
    triton_out = check(q, k, v, clusters, gen, "triton")
    reference_out = check(q, k, v, clusters, gen, "reference", backend="reference")
    rel = ((triton_out.float() - reference_out.float()).norm() / reference_out.float().norm()).item()
    assert rel < 1e-2, f"triton vs reference {rel:.2e} seed={gen.initial_seed()}"
    expected = oracle_token_mask(*clusters, L, L).sum(dim=(-1, -2))
    assert torch.equal(K.cluster_pair_count(*clusters), expected), f"seed={gen.initial_seed()}"


def test_auto_backend_picks_triton(gen):
    q, k, v = make_qkv(1000, 1000, 64, torch.bfloat16, gen)
    clusters = ragged_clusters(1000, 1000, 9, 20, gen)
    auto = K.cluster_block_attention(q, k, v, *clusters)
    assert torch.equal(auto, K.cluster_block_attention(q, k, v, *clusters, backend="triton"))


@pytest.mark.parametrize("misalign", [0, 1], ids=["aligned", "misaligned"])
def test_batch_offsets_past_int32(misalign, gen):
    """Batch offsets b * stride(0) beyond 2**31 elements must not wrap around: q, k and v share one 4.3 GB
    storage whose batch stride is just over 2**30 elements. Last in the file: a wrapped offset may fault."""
    Lb, D, stride_b = 256, 64, (1 << 30) + (1 << 20) + misalign
    storage = torch.empty(2 * stride_b + Lb * D, dtype=torch.bfloat16, device="cuda")
    x = storage.as_strided((3, 1, Lb, D), (stride_b, Lb * D, D, 1))
    x.copy_(torch.randn(x.shape, generator=gen, device="cuda"))
    offsets = torch.tensor([0, 100, Lb], dtype=torch.int32, device="cuda").expand(3, 1, 3).contiguous()
    clusters = (offsets, offsets, *all_kept(3, 1, 2, 2, device="cuda"))
    out, lse = K.cluster_block_attention(x, x, x, *clusters, backend="triton", return_lse=True)
    torch.cuda.synchronize()
    assert_matches(out, lse, dense_oracle(x, x, x, clusters), x.dtype, f"seed={gen.initial_seed()}")


@pytest.mark.parametrize("own_terms", [0, 16])
@pytest.mark.parametrize("D", [64, 128])
def test_summarised_compensation_matches_reference(D, own_terms, gen):
    """The compiled kernel's summarised compensation (kernels/skipped_summary.py: own terms listed, the rest in one
    affine term a row, 128- and 64-row tiles) against the torch reference on the same summary, tokens in their own
    order as SVG2 calls it, a head at a time and all at once; the exact LSE stays the uncompensated one."""
    L = 4096 + 37
    q, k, v = make_qkv(L, L, D, torch.bfloat16, gen)
    clusters = ragged_clusters(L, L, 17, 90, gen, width=30)
    orders = [torch.stack([torch.randperm(L, generator=gen, device="cuda") for _ in range(B * H)]).view(B, H, L)
              .to(torch.int32) for _ in range(2)]
    pooled = K.pool_key_clusters(k, v, clusters[1], k_order=orders[1])
    results = {backend: K.cluster_block_attention(q, k, v, *clusters, backend=backend, return_lse=True, pooled=pooled,
                                                  own_terms=own_terms, q_order=orders[0], k_order=orders[1])
               for backend in ("triton", "reference")}
    (out, lse, lse_c), (want, want_lse, want_lse_c) = results["triton"], results["reference"]
    err = ((out.float() - want.float()).norm() / want.float().norm()).item()
    assert err < 1e-2, f"D={D} own={own_terms}: rel err {err:.2e} seed={gen.initial_seed()}"
    for got, expected in ((lse, want_lse), (lse_c, want_lse_c)):
        finite = torch.isfinite(expected)
        assert torch.equal(finite, torch.isfinite(got)) and (got - expected)[finite].abs().max() < 2e-2
    plain_lse = K.cluster_block_attention(q, k, v, *clusters, backend="triton", return_lse=True, q_order=orders[0],
                                          k_order=orders[1])[1]
    torch.testing.assert_close(lse, plain_lse)
    chunks = import_pack("kernels.cluster_attention")
    saved, chunks.SUMMARY_CHUNK_BYTES = chunks.SUMMARY_CHUNK_BYTES, 1
    try:
        one_head = K.cluster_block_attention(q, k, v, *clusters, backend="triton", pooled=pooled,
                                             own_terms=own_terms, q_order=orders[0], k_order=orders[1])
    finally:
        chunks.SUMMARY_CHUNK_BYTES = saved
    torch.testing.assert_close(one_head, out)
