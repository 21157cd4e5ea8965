"""SVG on CUDA at realistic sizes: the profiling kernel, the row gather / scatter and the whole planner (mixed heads,
text padding, a (B, L, H, D) output view) against float64 oracles computed on the GPU in row chunks, and planted
heads classified right. Helpers and the rule come from test_svg.py. Inputs are random on every run; each test prints
its seed (rerun with BSA_SEED=<seed> to reproduce).
"""

from __future__ import annotations

import math

import pytest
import torch

from pack import import_pack
from test_block_sparse_kernel import new_generator
from test_svg import candidate_oracle, planted_qkv, token_major

core = import_pack("core")
kernels = import_pack("kernels")
layout = import_pack("core.svg_layout")

pytestmark = pytest.mark.gpu

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
TOL = {torch.bfloat16: 2e-2, torch.float16: 4e-3}


@pytest.fixture
def gen():
    return new_generator("cuda")


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("D", [64, 128])
def test_candidate_outputs_at_size(dtype, D, gen):
    B, H, R, LK, NKB = 2, 4, 150, 8192 + 37, 65
    q = torch.randn(B, H, R, D, generator=gen, device="cuda").to(dtype)
    k, v = (torch.randn(B, LK, H, D, generator=gen, device="cuda").to(dtype).transpose(1, 2) for _ in range(2))
    keep = torch.rand(2, R, NKB, generator=gen, device="cuda") < 0.3
    key_block = torch.randint(0, NKB, (2, LK), generator=gen, device="cuda", dtype=torch.int32)
    kv_length = torch.tensor([LK, LK - 3000], device="cuda")
    got = kernels.candidate_mask_outputs(q, k, v, keep, key_block, kv_length=kv_length, backend="triton")
    want = candidate_oracle(q, k, v, keep, key_block, kv_length)
    ref = kernels.candidate_mask_outputs(q, k, v, keep, key_block, kv_length=kv_length, backend="reference")
    for i in range(3):
        assert float((got[i].double() - want[i]).norm() / want[i].norm()) < TOL[dtype], f"seed={gen.initial_seed()}"
        assert float((ref[i].double() - want[i]).norm() / want[i].norm()) < 1e-3, f"seed={gen.initial_seed()}"


def test_gather_scatter_at_720p_size(gen):
    grid = core.VideoGrid(21, 45, 80)
    B, H, D, L = 1, 8, 128, grid.total_tokens
    x = torch.randn(B, L, H, D, generator=gen, device="cuda").to(torch.bfloat16).transpose(1, 2)
    order = layout.token_major_order(grid).to("cuda")
    heads = torch.tensor([6, 1, 3], device="cuda")
    moved = kernels.gather_head_rows(x, heads, order, backend="triton")
    assert torch.equal(moved, x[:, heads][:, :, order])
    out = torch.zeros_like(x)
    kernels.scatter_head_rows(moved, heads, order, out, backend="triton")
    assert torch.equal(out[:, heads], x[:, heads]) and not out[:, 0].any()


def chunked_oracle(q, k, v, grid, settings, flags, kv_length, row_chunk=512):
    """Float64 (B, H, L, D) under each head's layout token mask, a chunk of query rows at a time."""
    B, H, L, D = q.shape
    b = settings.block_size
    spatial, temporal = (m.cuda() for m in layout.svg_block_masks(grid, settings.sparsity, b, settings.attention_sink))
    blk = torch.arange(L, device="cuda") // b
    tblk = token_major(grid).cuda() // b
    key_ok = torch.arange(L, device="cuda")[None, :] < kv_length.view(-1, 1)
    out = torch.empty(B, H, L, D, dtype=torch.float64, device="cuda")
    for h in range(H):
        kh, vh = k[:, h].double(), v[:, h].double()
        for r0 in range(0, L, row_chunk):
            rows = torch.arange(r0, min(L, r0 + row_chunk), device="cuda")
            allowed = temporal[tblk[rows]][:, tblk] if flags[h] else spatial[blk[rows]][:, blk]
            s = q[:, h, rows].double() @ kh.transpose(-1, -2) / math.sqrt(D)
            s = s.masked_fill(~(allowed[None] & key_ok[:, None, :]), float("-inf"))
            out[:, h, rows] = s.softmax(-1) @ vh
    return out


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_planner_mixed_heads_at_size(dtype, gen):
    """HunyuanVideo-like: video then text with padding, batch 2, output into a (B, L, H, D) buffer; the classes are
    forced (half temporal) so both paths run at size."""
    grid = core.VideoGrid(9, 24, 40, text_tokens=77)
    B, H, D, L = 2, 4, 128, grid.total_tokens
    q, k, v = (torch.randn(B, L, H, D, generator=gen, device="cuda").to(dtype).transpose(1, 2) for _ in range(3))
    settings = core.SVGSettings(sparsity=0.25, block_size=128, attention_sink=False)
    planner = settings.make_planner()
    flags = (False, True, True, False)
    planner.profile = lambda call, plan: flags
    buffer = torch.empty(B, L, H, D, device="cuda", dtype=dtype)
    kv_length = torch.tensor([L, L - 50], device="cuda")
    call = core.AttentionCall(grid=grid, layer=3, step=0, total_steps=10, q=q, k=k, v=v, out=buffer.transpose(1, 2),
                              kv_length=kv_length, backend="auto")
    planner.attend(call)
    want = chunked_oracle(q, k, v, grid, settings, flags, kv_length)
    err = float((buffer.transpose(1, 2).double() - want).norm() / want.norm())
    assert err < TOL[dtype], f"seed={gen.initial_seed()}"


def test_planted_heads_classified_at_size(gen):
    grid = core.VideoGrid(8, 16, 16)
    q, k, v = planted_qkv(grid, "sttsst", torch.Generator().manual_seed(gen.initial_seed()), B=2, D=128)
    q, k, v = (t.cuda().to(torch.bfloat16) for t in (q, k, v))
    planner = core.SVGSettings(sparsity=0.25, block_size=128).make_planner()
    call = core.AttentionCall(grid=grid, layer=1, step=0, total_steps=10, q=q, k=k, v=v, backend="auto")
    planner.attend(call)
    assert planner._classes[(1, grid, 0, 6)].temporal == (False, True, True, False, False, True), \
        f"seed={gen.initial_seed()}"
