"""Triton kernel of the block summary's pass at the query blocks' mean queries (kernels/block_summary.py).

Each query block's mean query c attends to every key its block skips: one program owns BLOCK_C mean queries of one
(batch, head) and walks all the keys once, in BLOCK_N-key tiles, with an online softmax whose rows are masked by
their own block's kept table (a kept key block is -inf for that row). It returns per mean query the LSE over the
skipped keys, the weighted mean key and value, and per key tile its log-mass (what weighs the blocks' moments).
A torch version of the same pass materialises the (mean queries x keys) scores and passes over them a dozen times;
here they never leave registers, and K and V are read once per BLOCK_C mean queries.

The weighted sums multiply weights and keys in float16 (weights in [0, 1] keep 11 significant bits there, against
bf16's 8: the weighted means of nearly uniform weights are small differences) with float32 accumulation.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .block_sparse_triton import _LN2, _LOG2E, _NEG_BIG


@triton.jit
def _centre_pass(
    C, K, V, KEPT, KEY_LIMIT, LW, KW, VW, TM,
    qk_scale,
    stride_kb, stride_kh, stride_kl,
    stride_vb, stride_vh, stride_vl,
    H, NQB, NKB, NT,
    HEAD_DIM: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr, SUB: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    rows = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    row_ok = rows < NQB
    at = bh.to(tl.int64) * NQB + rows                         # this program's mean queries' rows of the outputs
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_N)
    c = tl.load(C + at[:, None] * HEAD_DIM + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    if UPCAST_DOT:
        wdt = tl.float32
    else:
        wdt = tl.float16
        c = c.to(K.dtype.element_ty)
    key_limit = tl.load(KEY_LIMIT + b)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh

    m_i = tl.full([BLOCK_C], _NEG_BIG, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_k = tl.zeros([BLOCK_C, HEAD_DIM], dtype=tl.float32)
    acc_v = tl.zeros([BLOCK_C, HEAD_DIM], dtype=tl.float32)
    for t in range(0, NT):
        cols = t * BLOCK_N + offs_n
        col_ok = cols < key_limit
        k = tl.load(k_base + cols[:, None] * stride_kl + offs_d[None, :], mask=col_ok[:, None], other=0.0)
        v = tl.load(v_base + cols[:, None] * stride_vl + offs_d[None, :], mask=col_ok[:, None], other=0.0)
        if UPCAST_DOT:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        kept = tl.load(KEPT + at * NKB + t // SUB, mask=row_ok, other=1)
        s = tl.dot(c, tl.trans(k)) * qk_scale
        s = tl.where(col_ok[None, :] & (kept == 0)[:, None], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        p_sum = tl.sum(p, 1)
        l_i = l_i * alpha + p_sum
        pw = p.to(wdt)
        acc_k = tl.dot(pw, k.to(wdt), acc_k * alpha[:, None])
        acc_v = tl.dot(pw, v.to(wdt), acc_v * alpha[:, None])
        tl.store(TM + at * NT + t, (m_new + tl.math.log2(p_sum)) * _LN2, mask=row_ok)  # the tile's ln-mass
        m_i = m_new

    some = l_i > 0.0
    norm = tl.where(some, l_i, 1.0)[:, None]
    tl.store(LW + at, (m_i + tl.math.log2(l_i)) * _LN2, mask=row_ok)
    tl.store(KW + at[:, None] * HEAD_DIM + offs_d[None, :], acc_k / norm, mask=row_ok[:, None])
    tl.store(VW + at[:, None] * HEAD_DIM + offs_d[None, :], acc_v / norm, mask=row_ok[:, None])


def triton_centre_pass(centre, k, v, kept, key_limit, block_size: int, scale: float):
    """(ln W (B, H, NQB), k_w, v_w (B, H, NQB, D) float32, each key block's share of W (B, H, NQB, NKB) float32) of
    the mean queries ``centre`` (B, H, NQB, D) float32 over the keys their blocks skip: ``kept`` (B * H, NQB, NKB)
    uint8 contiguous, 1 where the query block keeps the key block (kernels.cluster_reference.keep_table's),
    ``key_limit`` (B,) int32 (keys at or past it are padding). Head dim a power of two in [16, 128]."""
    B, H, NQB, D = centre.shape
    LK = k.shape[2]
    NKB = kept.shape[-1]
    if k.device.type == "cuda":
        cfg = dict(BLOCK_C=64, BLOCK_N=64 if block_size % 64 == 0 else block_size, num_warps=4, num_stages=2)
    else:  # Triton's CPU interpreter (tests): small tiles cross every edge
        cfg = dict(BLOCK_C=16, BLOCK_N=16, num_warps=4, num_stages=1)
    nt = -(-LK // cfg["BLOCK_N"])
    sub = block_size // cfg["BLOCK_N"]
    dev = centre.device
    lw = torch.empty(B, H, NQB, device=dev)
    k_w, v_w = (torch.empty(B, H, NQB, D, device=dev) for _ in range(2))
    tile_mass = torch.empty(B, H, NQB, nt, device=dev)
    _centre_pass[(triton.cdiv(NQB, cfg["BLOCK_C"]), B * H)](
        centre.contiguous(), k, v, kept, key_limit, lw, k_w, v_w, tile_mass, scale * _LOG2E,
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        H, NQB, NKB, nt, HEAD_DIM=D, SUB=sub, UPCAST_DOT=k.device.type == "cpu", **cfg)
    # each block's share: its tiles' masses over W (a mean query that skips nothing: all 0)
    share = torch.exp(tile_mass - lw[..., None]).nan_to_num(0.0)
    share = torch.nn.functional.pad(share, (0, NKB * sub - nt)).view(B, H, NQB, NKB, sub).sum(-1)
    return lw, k_w, v_w, share
