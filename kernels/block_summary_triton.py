"""Triton kernels of the block summary (kernels/block_summary.py): the pass at the query blocks' mean queries, the
key blocks' second moments, and the fold of the term into each row after the attention kernel.

* Centre pass. Each query block's mean query c attends to every key its block skips: one program owns BLOCK_C mean
  queries of one (batch, head) and one split of the keys, walked in BLOCK_N-key tiles with an online softmax whose
  rows are masked by their own block's kept table (a kept key block is -inf for that row). A call holds a few heads
  (the summary's memory bound): at Wan 14B 720p that is ~10 programs a head, so the keys are split until the launch
  fills the GPU and the splits' (LSE, weighted means) are merged after it. It returns per mean query the LSE over the
  skipped keys, the weighted mean key and value, and per key tile its log-mass (what weighs the blocks' moments).
  The weighted sums multiply weights and keys in float16 (weights in [0, 1] keep 11 significant bits there, against
  bf16's 8: the weighted means of nearly uniform weights are small differences) with float32 accumulation.
* Moments. One program per key block: (k - p_k)^T (v - p_v) / size over its keys, p the head's mean key and value,
  centred in float32 before the 16-bit product (so the product keeps its digits), accumulated in float32.
* Fold. One program per query block's rows: the row's virtual key (score ln W + (q - c).k_w * scale, value
  v_w + (q - c) @ slope) merged into the row's output and LSE through the LSEs, in place; q, the output and the LSE
  are read once.

Head dims need not be powers of two: the kernels mask the padded columns (no padded copies of q, k, v).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .attention import padded_head_dim
from .block_sparse_triton import _LN2, _LOG2E, _NEG_BIG
from .block_summary import MAX_SPLITS


@triton.jit
def _centre_pass(
    C, K, V, KEPT, KEY_LIMIT, PLSE, PK, PV, BM,
    qk_scale,
    stride_kb, stride_kh, stride_kl,
    stride_vb, stride_vh, stride_vl,
    H, NQB, NKB, NT, TPS, S, D,
    HEAD_DP: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr, SUB: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    split = tl.program_id(2)
    b = (bh // H).to(tl.int64)
    h = bh % H
    rows = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    row_ok = rows < NQB
    at = bh.to(tl.int64) * NQB + rows                         # this program's mean queries' rows of the outputs
    offs_d = tl.arange(0, HEAD_DP)
    d_ok = (offs_d < D) | EVEN_D                               # constant True for power-of-two head dims
    offs_n = tl.arange(0, BLOCK_N)
    c = tl.load(C + at[:, None] * D + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
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
    acc_k = tl.zeros([BLOCK_C, HEAD_DP], dtype=tl.float32)
    acc_v = tl.zeros([BLOCK_C, HEAD_DP], dtype=tl.float32)
    block_mass = tl.full([BLOCK_C], float("-inf"), dtype=tl.float32)     # log2-mass of the current key block
    for t in range(split * TPS, tl.minimum(NT, split * TPS + TPS)):  # (splits start at key blocks: TPS % SUB == 0)
        cols = t * BLOCK_N + offs_n
        col_ok = cols < key_limit
        mask = col_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + cols[:, None] * stride_kl + offs_d[None, :], mask=mask, other=0.0)
        v = tl.load(v_base + cols[:, None] * stride_vl + offs_d[None, :], mask=mask, other=0.0)
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
        block_mass = _log2_add(tl.where(t % SUB == 0, float("-inf"), block_mass), m_new + tl.math.log2(p_sum))
        last = (t % SUB == SUB - 1) | (t == NT - 1)
        tl.store(BM + at * NKB + t // SUB, block_mass * _LN2, mask=row_ok & last)  # the key block's ln-mass
        m_i = m_new

    norm = tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    part = at * S + split
    tl.store(PLSE + part, (m_i + tl.math.log2(l_i)) * _LN2, mask=row_ok)
    out_mask = row_ok[:, None] & d_ok[None, :]
    tl.store(PK + part[:, None] * D + offs_d[None, :], acc_k / norm, mask=out_mask)
    tl.store(PV + part[:, None] * D + offs_d[None, :], acc_v / norm, mask=out_mask)


@triton.jit
def _log2_add(a, b):
    """log2(2^a + 2^b), -inf when both are."""
    top = tl.maximum(a, b)
    top = tl.where(top == float("-inf"), 0.0, top)
    return top + tl.math.log2(tl.math.exp2(a - top) + tl.math.exp2(b - top))


@triton.jit
def _block_moments(
    K, V, PK, PV, KEY_LIMIT, M,
    stride_kb, stride_kh, stride_kl,
    stride_vb, stride_vh, stride_vl,
    H, LK, NKB, D,
    HEAD_DP: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    blk = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    offs_d = tl.arange(0, HEAD_DP)
    d_ok = (offs_d < D) | EVEN_D
    offs_n = tl.arange(0, BLOCK_N)
    limit = tl.minimum(tl.load(KEY_LIMIT + b), LK)
    p_k = tl.load(PK + bh * D + offs_d, mask=d_ok, other=0.0)
    p_v = tl.load(PV + bh * D + offs_d, mask=d_ok, other=0.0)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    acc = tl.zeros([HEAD_DP, HEAD_DP], dtype=tl.float32)
    for r0 in range(0, BLOCK_SIZE, BLOCK_N):
        rows = blk * BLOCK_SIZE + r0 + offs_n
        ok = (rows < limit)[:, None] & d_ok[None, :]
        k = tl.load(k_base + rows[:, None] * stride_kl + offs_d[None, :], mask=ok, other=0.0).to(tl.float32)
        v = tl.load(v_base + rows[:, None] * stride_vl + offs_d[None, :], mask=ok, other=0.0).to(tl.float32)
        k = tl.where(ok, k - p_k[None, :], 0.0)
        v = tl.where(ok, v - p_v[None, :], 0.0)
        if UPCAST_DOT:
            acc = tl.dot(tl.trans(k), v, acc)
        else:
            acc = tl.dot(tl.trans(k.to(K.dtype.element_ty)), v.to(K.dtype.element_ty), acc)
    size = tl.maximum(tl.minimum(limit - blk * BLOCK_SIZE, BLOCK_SIZE), 1)
    at = (bh.to(tl.int64) * NKB + blk) * D * D
    tl.store(M + at + offs_d[:, None] * D + offs_d[None, :], (acc / size).to(M.dtype.element_ty),
             mask=d_ok[:, None] & d_ok[None, :])


@triton.jit
def _fold_rows(
    Q, O, LSE, LSE_C, CENTRE, LW, KW, VW, SLOPE,
    scale,
    stride_qb, stride_qh, stride_ql,
    stride_ob, stride_oh, stride_ol,
    stride_lb, stride_lh, stride_cb, stride_ch,
    H, L, NQB, D,
    HEAD_DP: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < L
    offs_d = tl.arange(0, HEAD_DP)
    d_ok = (offs_d < D) | EVEN_D
    mask = row_ok[:, None] & d_ok[None, :]
    at = bh.to(tl.int64) * NQB + (pid * BLOCK_M) // BLOCK_SIZE       # the rows' query block (BLOCK_M divides it)
    q = tl.load(Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_ql + offs_d[None, :], mask=mask,
                other=0.0).to(tl.float32)
    delta = q - tl.load(CENTRE + at * D + offs_d, mask=d_ok, other=0.0)[None, :]
    score = tl.load(LW + at) + tl.sum(delta * tl.load(KW + at * D + offs_d, mask=d_ok, other=0.0)[None, :], 1) * scale
    slope = tl.load(SLOPE + at * D * D + offs_d[:, None] * D + offs_d[None, :], mask=d_ok[:, None] & d_ok[None, :],
                    other=0.0)
    if UPCAST_DOT:
        moved = tl.dot(delta, slope.to(tl.float32))
    else:
        moved = tl.dot(delta.to(slope.dtype), slope)
    value = tl.load(VW + at * D + offs_d, mask=d_ok, other=0.0)[None, :] + moved

    lse_ptrs = LSE + b * stride_lb + h * stride_lh + rows
    lse = tl.load(lse_ptrs, mask=row_ok, other=float("-inf"))
    top = tl.maximum(lse, score)
    top = tl.where(top == float("-inf"), 0.0, top)                   # nothing on either side: no -inf - -inf
    total = top + tl.log(tl.exp(lse - top) + tl.exp(score - top))
    none = total == float("-inf")
    keep = tl.where(none, 0.0, tl.exp(lse - total))
    add = tl.where(none, 0.0, tl.exp(score - total))
    o_ptrs = O + b * stride_ob + h * stride_oh + rows[:, None] * stride_ol + offs_d[None, :]
    out = tl.load(o_ptrs, mask=mask, other=0.0).to(tl.float32) * keep[:, None] + value * add[:, None]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=mask)
    tl.store(LSE_C + b * stride_cb + h * stride_ch + rows, total, mask=row_ok)


# The centre pass's tiles and launch (benchmarks/compensation_cost.py --centre-configs times others: every head of Wan
# 14B 720p, H100, 2026-12-06); on the CPU interpreter (tests) small tiles cross every edge.
CENTRE_CONFIG = dict(BLOCK_C=128, BLOCK_N=64, num_warps=8, num_stages=2)  # 8.2 ms against 9.2 at 64 / 4 warps
CENTRE_CONFIG_CPU = dict(BLOCK_C=16, BLOCK_N=16, num_warps=4, num_stages=1)


def _head_dim_constants(head_dim: int, device: torch.device) -> dict:
    """The constexprs every kernel here takes from the head dim and the device: the head dim padded to a power of
    two, whether that is the head dim itself (no column masks), and float32 dots on the CPU interpreter."""
    padded = padded_head_dim(head_dim)
    return dict(HEAD_DP=padded, EVEN_D=padded == head_dim, UPCAST_DOT=device.type == "cpu")


def centre_pass_splits(programs: int, key_blocks: int, device: torch.device) -> int:
    """How many key splits the centre pass takes when its mean queries make ``programs`` programs: enough for two
    programs per SM, at most one per key block and MAX_SPLITS. Three on the CPU interpreter (tests), so that the
    splits' merge is always exercised."""
    if device.type != "cuda":
        return max(1, min(3, key_blocks))
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(key_blocks, MAX_SPLITS, -(-2 * sms // max(1, programs))))


def triton_centre_pass(centre, k, v, kept, key_limit, block_size: int, scale: float):
    """(ln W (B, H, NQB), k_w, v_w (B, H, NQB, D) float32, each key block's share of W (B, H, NQB, NKB) float32) of
    the mean queries ``centre`` (B, H, NQB, D) float32 over the keys their blocks skip: ``kept`` (B * H, NQB, NKB)
    uint8 contiguous, 1 where the query block keeps the key block (kernels.cluster_reference.keep_table's),
    ``key_limit`` (B,) int32 (keys at or past it are padding)."""
    B, H, NQB, D = centre.shape
    LK = k.shape[2]
    NKB = kept.shape[-1]
    cfg = dict(CENTRE_CONFIG if k.device.type == "cuda" else CENTRE_CONFIG_CPU)
    cfg["BLOCK_N"] = min(cfg["BLOCK_N"], block_size)
    nt = -(-LK // cfg["BLOCK_N"])
    sub = block_size // cfg["BLOCK_N"]
    blocks_c = triton.cdiv(NQB, cfg["BLOCK_C"])
    splits = centre_pass_splits(blocks_c * B * H, NKB, k.device)
    per_split = -(-NKB // splits) * sub                            # whole key blocks a split
    splits = -(-nt // per_split)                                   # no split left without tiles
    dev = centre.device
    part_lse = torch.empty(B, H, NQB, splits, device=dev)
    part_k, part_v = (torch.empty(B, H, NQB, splits, D, device=dev) for _ in range(2))
    share = torch.empty(B, H, NQB, NKB, device=dev)
    _centre_pass[(blocks_c, B * H, splits)](
        centre.contiguous(), k, v, kept, key_limit, part_lse, part_k, part_v, share, scale * _LOG2E,
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        H, NQB, NKB, nt, per_split, splits, D, SUB=sub, **_head_dim_constants(D, k.device), **cfg)
    lw = torch.logsumexp(part_lse, dim=-1)
    weight = torch.exp(part_lse - lw[..., None]).nan_to_num(0.0)[..., None, :]     # each split's share
    k_w, v_w = (weight @ t for t in (part_k, part_v))
    # each block's share: its ln-mass over ln W (a mean query that skips nothing: all 0)
    share = share.sub_(lw[..., None]).exp_().nan_to_num_(0.0)
    return lw, k_w[..., 0, :], v_w[..., 0, :], share


def triton_block_moments(k, v, mean_k, mean_v, key_limit, block_size: int, dtype: torch.dtype) -> torch.Tensor:
    """(B, H, NKB', D, D) ``dtype``: each key block's mean of (k - mean_k)(v - mean_v)^T over its keys below
    ``key_limit`` (B,) int32; ``mean_k``, ``mean_v`` (B, H, D) float32. NKB' is the key blocks rounded up to 8, the
    rows past them zeros, so that the matmul over the blocks gets aligned operands (an odd count there picked an
    unaligned GEMM at a fifth of the tensor cores' rate on the H100)."""
    B, H, LK, D = k.shape
    nkb = -(-LK // block_size)
    rows = -(-nkb // 8) * 8
    moments = torch.empty(B, H, rows, D, D, device=k.device, dtype=dtype)
    moments[:, :, nkb:] = 0
    block_n = 64 if k.device.type == "cuda" else 16
    _block_moments[(nkb, B * H)](
        k, v, mean_k.contiguous(), mean_v.contiguous(), key_limit, moments,
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        H, LK, rows, D, BLOCK_SIZE=block_size, BLOCK_N=min(block_n, block_size), **_head_dim_constants(D, k.device),
        num_warps=8 if k.device.type == "cuda" else 4)
    return moments


def triton_fold_summary(out, lse, q, summary, *, block_size: int, scale: float, lse_out) -> torch.Tensor:
    """kernels.block_summary.fold_summary in one pass over the rows: ``out`` (B, H, L, D) 16-bit, any strides with
    a contiguous last dimension, ``lse`` and ``lse_out`` (B, H, L) float32 with a contiguous last dimension."""
    B, H, L, D = q.shape
    nqb = summary.log_weight.shape[-1]
    block_m = min(block_size, 64) if q.device.type == "cuda" else 16
    _fold_rows[(triton.cdiv(L, block_m), B * H)](
        q, out, lse, lse_out, summary.centre.contiguous(), summary.log_weight.contiguous(), summary.key.contiguous(),
        summary.value.contiguous(), summary.slope.contiguous(), scale,
        q.stride(0), q.stride(1), q.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        lse.stride(0), lse.stride(1), lse_out.stride(0), lse_out.stride(1),
        H, L, nqb, D, BLOCK_SIZE=block_size, BLOCK_M=block_m, **_head_dim_constants(D, q.device),
        num_warps=8 if q.device.type == "cuda" else 4)
    return lse_out
