"""AdaSpa's kernels and planner on CUDA at realistic sizes: a first search's passes (dense attention with the LSE,
then the masses) and a later search's masses against a cached LSE, all against a float64 oracle computed on the
GPU in row chunks; key padding; the planner's Triton path (first search, sparse step, later search) against its
torch reference path.

Helpers come from test_block_sparse_kernel.py / test_adaspa.py. Inputs are random on every run; each test prints
its seed (rerun with BSA_SEED=<seed> to reproduce).
"""

from __future__ import annotations

import math

import pytest
import torch

from pack import import_pack
from test_adaspa import OUT_TOL, pattern_masks
from test_block_sparse_kernel import LSE_TOL, new_generator

K = import_pack("kernels")
dense_lse = import_pack("kernels.dense_lse")
core = import_pack("core")
adaspa = import_pack("core.adaspa")

pytestmark = pytest.mark.gpu

B, H, L = 2, 4, 4096 + 37
ROW_CHUNK = 512  # float64 scores of B * H * 512 * L * 8 bytes = 135 MB at a time
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@pytest.fixture
def gen():
    return new_generator("cuda")


def make_qkv(D, dtype, gen, length=L):
    return tuple((torch.randn(B, H, length, D, generator=gen, device="cuda") * 1.5).to(dtype) for _ in range(3))


def oracle(q, k, v, block_size, *, kv_length=None, mass_lse=None):
    """Float64 (out, lse, mass) in query-row chunks; mass against ``mass_lse`` (default: the rows' own LSE)."""
    LQ, LK, D = q.shape[2], k.shape[2], q.shape[3]
    nq, nk = -(-LQ // block_size), -(-LK // block_size)
    keep = torch.ones(B, LK, dtype=torch.bool, device="cuda") if kv_length is None \
        else torch.arange(LK, device="cuda")[None, :] < kv_length[:, None]
    out = torch.empty(B, H, LQ, D, dtype=torch.float64, device="cuda")
    lse = torch.empty(B, H, LQ, dtype=torch.float64, device="cuda")
    mass = torch.zeros(B, H, nq, nk, dtype=torch.float64, device="cuda")
    k64, v64 = k.double(), v.double()
    for r0 in range(0, LQ, ROW_CHUNK):  # ROW_CHUNK is a multiple of both block sizes
        r1 = min(LQ, r0 + ROW_CHUNK)
        s = (q[:, :, r0:r1].double() @ k64.transpose(-1, -2)) / math.sqrt(D)
        s = s.masked_fill(~keep[:, None, None, :], float("-inf"))
        row_lse = torch.logsumexp(s, dim=-1)
        ok = torch.isfinite(row_lse)[..., None]
        out[:, :, r0:r1] = torch.where(ok, torch.exp(s - torch.where(ok, row_lse[..., None], 0.0)), 0.0) @ v64
        lse[:, :, r0:r1] = row_lse
        ref = row_lse if mass_lse is None else mass_lse[:, :, r0:r1].double()
        ok = torch.isfinite(ref)[..., None]
        p = torch.where(ok, torch.exp(s - torch.where(ok, ref[..., None], 0.0)), 0.0)
        p = torch.nn.functional.pad(p, (0, nk * block_size - LK, 0, -(r1 - r0) % block_size))
        mass[:, :, r0 // block_size:r0 // block_size + p.shape[2] // block_size] = \
            p.unflatten(2, (-1, block_size)).unflatten(-1, (nk, block_size)).sum(dim=(3, 5))
    return out, lse, mass


def check_mass(mass, expected, block_size, ctx):
    assert mass.dtype == torch.float32 and mass.shape == expected.shape and torch.isfinite(mass).all(), ctx
    err = (mass.double() - expected).abs().max().item()
    assert err < 1e-5 * block_size, f"{ctx}: mass abs error {err:.2e}"


def dense_with_lse(q, k, v, kv_length=None):
    """A dense pass with the LSE, as the planner runs it (a primed step, or a first search with nothing primed)."""
    return K.dense_attention_with_lse(q, k, v, kv_length=kv_length, backend="triton")


@pytest.fixture(params=["cudnn", "kernel"])
def dense_path(request, monkeypatch):
    """Both ways of dense attention with the LSE: cuDNN's (where this torch offers it) and our kernel."""
    if request.param == "kernel":
        monkeypatch.setitem(dense_lse._cudnn_state, "usable", False)
    elif dense_lse._cudnn_state["usable"] is False:
        pytest.skip("this torch / GPU offers no cuDNN attention with the LSE")
    return request.param


@pytest.mark.parametrize("block_size", [64, 128])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_search_passes(dtype, D, block_size, gen, dense_path):
    q, k, v = make_qkv(D, dtype, gen)
    want_out, want_lse, want_mass = oracle(q, k, v, block_size)
    ctx = f"{dtype} D={D} bs={block_size} seed={gen.initial_seed()} {dense_path}"
    out, lse = dense_with_lse(q, k, v)
    if dense_path == "cudnn" and dense_lse._cudnn_state["usable"] is not True:
        pytest.skip("this torch / GPU offers no cuDNN attention with the LSE")
    err = ((out.double() - want_out).norm() / want_out.norm()).item()
    assert err < OUT_TOL[dtype], f"{ctx}: output relative error {err:.2e}"
    assert (lse.double() - want_lse).abs().max().item() < LSE_TOL, ctx
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert ((out.float() - sdpa.float()).norm() / sdpa.float().norm()).item() < OUT_TOL[dtype], ctx
    mass = K.block_mass(q, k, lse, block_size=block_size, backend="triton")
    check_mass(mass, want_mass, block_size, ctx)
    rows = torch.full_like(want_mass[..., 0], block_size)
    rows[..., -1] = L - (rows.shape[-1] - 1) * block_size
    torch.testing.assert_close(mass.double().sum(-1), rows, rtol=1e-5, atol=1e-4, msg=ctx)  # rows sum to 1

    stale = (lse + 0.2 * torch.randn(lse.shape, generator=gen, device="cuda")).half()  # as the planner caches it
    cached_mass = K.block_mass(q, k, stale, block_size=block_size, backend="triton")
    check_mass(cached_mass, oracle(q, k, v, block_size, mass_lse=stale)[2], block_size, ctx)


def test_key_padding_empty_rows_and_padded_head_dim(gen):
    """HunyuanVideo-like: keys past kv_length[b] ignored, an element with none; head_dim 80 zero-padded."""
    q, k, v = make_qkv(80, torch.bfloat16, gen)
    kv_length = torch.tensor([L - 100, 0], device="cuda", dtype=torch.int32)
    want_out, want_lse, want_mass = oracle(q, k, v, 64, kv_length=kv_length)
    out, lse = dense_with_lse(q, k, v, kv_length)
    mass = K.block_mass(q, k, lse, block_size=64, kv_length=kv_length, backend="triton")
    ctx = f"seed={gen.initial_seed()}"
    assert (out[1] == 0).all() and torch.isneginf(lse[1]).all() and (mass[1] == 0).all(), ctx
    assert ((out[0].double() - want_out[0]).norm() / want_out[0].norm()).item() < OUT_TOL[torch.bfloat16], ctx
    check_mass(mass, want_mass, 64, ctx)


@pytest.mark.parametrize("block_size", [64, 128])
def test_planner_triton_matches_reference(block_size, gen):
    """A HunyuanVideo-shaped call (video then text, padded): the Triton path finds the layouts the reference path
    finds (first search at step 0, later search at step 2); every step's output equals the reference path's."""
    grid = core.VideoGrid(8, 16, 30, text_tokens=256)  # 3840 video + 256 text tokens
    q, k, v = make_qkv(128, torch.bfloat16, gen, length=grid.total_tokens)
    kv_length = torch.tensor([grid.total_tokens - 40, grid.video_tokens + 100], device="cuda")
    settings = adaspa.AdaSpaSettings(recall=0.9, search_steps=(2.0,), block_size=block_size, max_density=0.6)
    outs, patterns = {}, {}
    for backend in ("triton", "reference"):
        planner = settings.make_planner()
        calls = [core.AttentionCall(grid=grid, layer=0, step=s, total_steps=10, q=q, k=k, v=v, kv_length=kv_length,
                                    backend=backend) for s in range(4)]
        outs[backend], patterns[backend] = [], []
        for c in calls:
            outs[backend].append(planner.attend(c)[0])
            patterns[backend].append(pattern_masks(next(iter(planner._layers[0].values())).pattern))
    ctx = f"bs={block_size} seed={gen.initial_seed()}"
    for step in (0, 2):
        same = (patterns["triton"][step] == patterns["reference"][step]).float().mean().item()
        assert same > 0.999, f"{ctx}: step {step} layouts agree on {same:.4f} of the tiles"  # near-ties may flip
    for a, b in zip(outs["triton"], outs["reference"]):
        assert ((a.float() - b.float()).norm() / b.float().norm()).item() < OUT_TOL[torch.bfloat16], ctx
