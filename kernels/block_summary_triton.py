"""Triton kernels of the block summary (kernels/block_summary.py): the pass at the query blocks' mean queries, the
key blocks' second moments, and the fold of the term into each row after the attention kernel.

* Centre pass. Each query block's mean query c attends to every key its block skips: one program owns BLOCK_C mean
  queries of one (batch, head) and one split of the keys, walked in BLOCK_N-key tiles with an online softmax whose
  rows are masked by their own block's kept table (a kept key block is -inf for that row). A call holds a few heads
  (the summary's memory bound): at Wan 14B 720p that is ~10 programs a head, so the keys are split until the launch
  fills the GPU and the splits' (LSE, weighted means) are merged after it, in one more small kernel (a torch merge
  was a dozen launches a call, which at short calls cost more host time than the GPU spent). It returns per mean
  query the LSE over the skipped keys, the weighted mean key and value, the keys' weighted variance per dimension
  (from their weighted mean squared norm: the fold's damping; each key's squared norm made once before the pass, in
  float32, rather than from every key tile each program visits), and per key block its share of the mass (what
  weighs the blocks' moments).
  The weighted sums multiply weights and keys in float16 (weights in [0, 1] keep 11 significant bits there, against
  bf16's 8: the weighted means of nearly uniform weights are small differences) with float32 accumulation.
* Moments. One program per key block: (k - p_k)^T (v - p_v) / size over its keys, p the head's mean key and value,
  centred in float32 before the 16-bit product (so the product keeps its digits), accumulated in float32.
* Fold. One program per query block's rows: the row's virtual key (score ln W + (q - c).k_w * scale, value
  v_w + (q - c) @ slope, the move damped and bounded) merged into the row's output and LSE through the LSEs, in
  place; q, the output and the LSE are read once.
* Orders. With an ``order`` (SVG's temporal heads: their layout is over the token-major order) the kernels read the
  rows of q, k, v, the output and the LSE through it: the layout's position t is token order[t] (_tokens).

Head dims need not be powers of two: the kernels mask the padded columns (no padded copies of q, k, v).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .attention import padded_head_dim
from .block_sparse_triton import _LN2, _LOG2E, _NEG_BIG
from .block_summary import MAX_SPLITS, MOVE_DAMPING, MOVE_LIMIT, padded_blocks


@triton.jit
def _centre_pass(
    C, K, V, KN, ORDER, KEPT, KEY_LIMIT, PLSE, PK, PV, PN, BM,
    qk_scale,
    stride_kb, stride_kh, stride_kl,
    stride_vb, stride_vh, stride_vl,
    H, NQB, NKB, NT, TPS, S, D, LK,
    HEAD_DP: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr, SUB: tl.constexpr,
    UPCAST_DOT: tl.constexpr, GATHER: tl.constexpr,
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
    kn_base = KN + bh.to(tl.int64) * LK                       # the keys' squared norms, by layout position

    m_i = tl.full([BLOCK_C], _NEG_BIG, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_k = tl.zeros([BLOCK_C, HEAD_DP], dtype=tl.float32)
    acc_v = tl.zeros([BLOCK_C, HEAD_DP], dtype=tl.float32)
    acc_n = tl.zeros([BLOCK_C], dtype=tl.float32)                        # weighted sum of the keys' squared norms
    block_mass = tl.full([BLOCK_C], float("-inf"), dtype=tl.float32)     # log2-mass of the current key block
    for t in range(split * TPS, tl.minimum(NT, split * TPS + TPS)):  # (splits start at key blocks: TPS % SUB == 0)
        cols = t * BLOCK_N + offs_n
        col_ok = cols < key_limit
        mask = col_ok[:, None] & d_ok[None, :]
        tok = _tokens(ORDER, cols, col_ok, GATHER)
        k = tl.load(k_base + tok[:, None] * stride_kl + offs_d[None, :], mask=mask, other=0.0)
        v = tl.load(v_base + tok[:, None] * stride_vl + offs_d[None, :], mask=mask, other=0.0)
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
        kn = tl.load(kn_base + cols, mask=col_ok, other=0.0)
        acc_n = acc_n * alpha + tl.sum(p * kn[None, :], 1)
        block_mass = _log2_add(tl.where(t % SUB == 0, float("-inf"), block_mass), m_new + tl.math.log2(p_sum))
        last = (t % SUB == SUB - 1) | (t == NT - 1)
        tl.store(BM + at * NKB + t // SUB, block_mass * _LN2, mask=row_ok & last)  # the key block's ln-mass
        m_i = m_new

    norm = tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    part = at * S + split
    tl.store(PLSE + part, (m_i + tl.math.log2(l_i)) * _LN2, mask=row_ok)
    tl.store(PN + part, acc_n / tl.where(l_i > 0.0, l_i, 1.0), mask=row_ok)
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
def _tokens(ORDER, positions, ok, GATHER: tl.constexpr):
    """The token rows at ``positions`` of the layout's order (``order`` (L,) int32), or the positions themselves
    without GATHER (tokens already in the layout's order)."""
    if GATHER:
        return tl.load(ORDER + positions, mask=ok, other=0)
    return positions


@triton.jit
def _mean_queries(
    Q, ORDER, C,
    stride_qb, stride_qh, stride_ql,
    H, L, NQB, D,
    HEAD_DP: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    GATHER: tl.constexpr,
):
    """Each query block's mean query in float32, one program per block (the last one partial)."""
    blk = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    offs_d = tl.arange(0, HEAD_DP)
    d_ok = (offs_d < D) | EVEN_D
    acc = tl.zeros([HEAD_DP], dtype=tl.float32)
    for r0 in range(0, BLOCK_SIZE, BLOCK_N):
        rows = blk * BLOCK_SIZE + r0 + tl.arange(0, BLOCK_N)
        ok = rows < L
        tok = _tokens(ORDER, rows, ok, GATHER)
        x = tl.load(Q + b * stride_qb + h * stride_qh + tok[:, None] * stride_ql + offs_d[None, :],
                    mask=ok[:, None] & d_ok[None, :], other=0.0)
        acc += tl.sum(x.to(tl.float32), 0)
    size = tl.minimum(L - blk * BLOCK_SIZE, BLOCK_SIZE)
    tl.store(C + (bh.to(tl.int64) * NQB + blk) * D + offs_d, acc / size, mask=d_ok)


@triton.jit
def _merge_splits(
    PLSE, PK, PV, PN, MASS, MK, MV, LW, KW, VW, KC, VC, SHARE, SPREAD,
    R, NQB, S, NKB, NKB_PAD, D,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, HEAD_DP: tl.constexpr, EVEN_D: tl.constexpr,
):
    """The centre pass's key splits merged per mean query (one program per BLOCK_R of them): ln W, k_w, v_w; k_w and
    v_w centred on the head's means in the moments' dtype (0 where nothing is skipped: no rank-1 term); the skipped
    keys' weighted variance per dimension (the fold's damping); each key block's share of W from its ln-mass, in
    that dtype, zeros past NKB up to NKB_PAD."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    offs_d = tl.arange(0, HEAD_DP)
    d_ok = (offs_d < D) | EVEN_D
    mask = row_ok[:, None] & d_ok[None, :]
    top = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    for s in range(S):
        top = tl.maximum(top, tl.load(PLSE + rows * S + s, mask=row_ok, other=float("-inf")))
    top = tl.where(top == float("-inf"), 0.0, top)                   # nothing skipped: every weight below is 0
    total = tl.zeros([BLOCK_R], dtype=tl.float32)
    norms = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc_k = tl.zeros([BLOCK_R, HEAD_DP], dtype=tl.float32)
    acc_v = tl.zeros([BLOCK_R, HEAD_DP], dtype=tl.float32)
    for s in range(S):
        w = tl.exp(tl.load(PLSE + rows * S + s, mask=row_ok, other=float("-inf")) - top)
        part = (rows * S + s)[:, None] * D + offs_d[None, :]
        acc_k += w[:, None] * tl.load(PK + part, mask=mask, other=0.0)
        acc_v += w[:, None] * tl.load(PV + part, mask=mask, other=0.0)
        norms += w * tl.load(PN + rows * S + s, mask=row_ok, other=0.0)
        total += w
    present = total > 0.0
    log_weight = tl.where(present, top + tl.log(total), float("-inf"))
    norm = tl.where(present, total, 1.0)
    key = acc_k / norm[:, None]
    value = acc_v / norm[:, None]
    at = rows[:, None] * D + offs_d[None, :]
    tl.store(LW + rows, log_weight, mask=row_ok)
    spread = tl.maximum(norms / norm - tl.sum(key * key, 1), 0.0) / D
    tl.store(SPREAD + rows, spread, mask=row_ok)
    tl.store(KW + at, key, mask=mask)
    tl.store(VW + at, value, mask=mask)
    head = (rows // NQB)[:, None] * D + offs_d[None, :]
    key_c = tl.where(present[:, None], key - tl.load(MK + head, mask=mask, other=0.0), 0.0)
    value_c = tl.where(present[:, None], value - tl.load(MV + head, mask=mask, other=0.0), 0.0)
    tl.store(KC + at, key_c.to(KC.dtype.element_ty), mask=mask)
    tl.store(VC + at, value_c.to(VC.dtype.element_ty), mask=mask)
    for c0 in range(0, NKB_PAD, BLOCK_K):
        cols = c0 + tl.arange(0, BLOCK_K)
        mass = tl.load(MASS + rows[:, None] * NKB + cols[None, :], mask=row_ok[:, None] & (cols < NKB)[None, :],
                       other=float("-inf"))
        share = tl.where(present[:, None], tl.exp(mass - log_weight[:, None]), 0.0)
        tl.store(SHARE + rows[:, None] * NKB_PAD + cols[None, :], share.to(SHARE.dtype.element_ty),
                 mask=row_ok[:, None] & (cols < NKB_PAD)[None, :])


@triton.jit
def _squared_norms(
    K, ORDER, KN,
    stride_kb, stride_kh, stride_kl,
    H, LK, D,
    HEAD_DP: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_N: tl.constexpr, GATHER: tl.constexpr,
):
    """Each key's squared norm in float32, by layout position (the centre pass's weighted mean squared norm reads
    them instead of converting every key tile it visits)."""
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = cols < LK
    offs_d = tl.arange(0, HEAD_DP)
    tok = _tokens(ORDER, cols, ok, GATHER)
    k = tl.load(K + b * stride_kb + h * stride_kh + tok[:, None] * stride_kl + offs_d[None, :],
                mask=ok[:, None] & ((offs_d < D) | EVEN_D)[None, :], other=0.0).to(tl.float32)
    tl.store(KN + bh.to(tl.int64) * LK + cols, tl.sum(k * k, 1), mask=ok)


@triton.jit
def _block_moments(
    K, V, ORDER, PK, PV, KEY_LIMIT, M,
    stride_kb, stride_kh, stride_kl,
    stride_vb, stride_vh, stride_vl,
    H, LK, NKB, D,
    HEAD_DP: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    UPCAST_DOT: tl.constexpr, GATHER: tl.constexpr,
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
        tok = _tokens(ORDER, rows, rows < limit, GATHER)
        ok = (rows < limit)[:, None] & d_ok[None, :]
        k = tl.load(k_base + tok[:, None] * stride_kl + offs_d[None, :], mask=ok, other=0.0).to(tl.float32)
        v = tl.load(v_base + tok[:, None] * stride_vl + offs_d[None, :], mask=ok, other=0.0).to(tl.float32)
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
    Q, O, LSE, LSE_C, ORDER, CENTRE, LW, KW, VW, SLOPE, SPREAD,
    scale, damping, limit,
    stride_qb, stride_qh, stride_ql,
    stride_ob, stride_oh, stride_ol,
    stride_lb, stride_lh, stride_cb, stride_ch,
    H, L, NQB, D,
    HEAD_DP: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr,
    UPCAST_DOT: tl.constexpr, GATHER: tl.constexpr,
):
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    positions = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = positions < L
    rows = _tokens(ORDER, positions, row_ok, GATHER)                  # the rows' tokens: where they are read
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
    # the move's damping (kernels.block_summary.MOVE_DAMPING): sigma^2 the variance of the skipped keys' scores at q
    sigma2 = tl.sum(delta * delta, 1) * (scale * scale) * tl.load(SPREAD + at)
    shrink = damping * sigma2
    moved = moved / (1.0 + shrink * shrink)[:, None]
    v_w = tl.load(VW + at * D + offs_d, mask=d_ok, other=0.0)[None, :]
    # held to MOVE_LIMIT |v_w| (kernels.block_summary.MOVE_LIMIT)
    length = tl.sqrt(tl.sum(moved * moved, 1))
    bound = limit * tl.sqrt(tl.sum(v_w * v_w, 1))
    value = v_w + moved * tl.minimum(bound / tl.maximum(length, 1e-30), 1.0)[:, None]

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


def triton_mean_queries(q, block_size: int, order=None) -> torch.Tensor:
    """(B, H, NQB, D) float32 mean query of each block of ``q`` (B, H, L, D) 16-bit, any strides with a contiguous
    last dimension; with ``order`` (L,) int32, of each block of positions of that order."""
    B, H, L, D = q.shape
    nqb = -(-L // block_size)
    centre = torch.empty(B, H, nqb, D, device=q.device)
    _mean_queries[(nqb, B * H)](
        q, _order_arg(order, q), centre, q.stride(0), q.stride(1), q.stride(2), H, L, nqb, D,
        BLOCK_SIZE=block_size, BLOCK_N=min(32 if q.device.type == "cuda" else 16, block_size),
        GATHER=order is not None, HEAD_DP=padded_head_dim(D), EVEN_D=padded_head_dim(D) == D, num_warps=4)
    return centre


def _order_arg(order, fallback: torch.Tensor) -> torch.Tensor:
    """The ORDER pointer of a launch: ``order`` contiguous, or any tensor when there is none (not read)."""
    return fallback if order is None else order.contiguous()


def triton_centre_pass(centre, k, v, kept, key_limit, mean_k, mean_v, block_size: int, scale: float,
                       dtype: torch.dtype, order=None):
    """kernels.block_summary.CentreStats' fields past the centre, of the mean queries ``centre`` (B, H, NQB, D)
    float32 over the keys their blocks skip: ``kept`` (B * H, NQB, NKB) uint8 contiguous, 1 where the query block
    keeps the key block (kernels.cluster_reference.keep_table's), ``key_limit`` (B,) int32 (keys at or past it are
    padding), ``mean_k``, ``mean_v`` (B, H, D) float32 the heads' means; ``order`` (L,) int32 or None, the tokens
    at the layout's positions. Two launches: the pass over the key splits, then their merge (_merge_splits)."""
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
    part_n = torch.empty(B, H, NQB, splits, device=dev)
    mass = torch.empty(B, H, NQB, NKB, device=dev)
    consts = _head_dim_constants(D, k.device)
    norms = torch.empty(B, H, LK, device=dev)
    norms_block = 128 if k.device.type == "cuda" else 16
    _squared_norms[(triton.cdiv(LK, norms_block), B * H)](
        k, _order_arg(order, kept), norms, k.stride(0), k.stride(1), k.stride(2), H, LK, D,
        HEAD_DP=consts["HEAD_DP"], EVEN_D=consts["EVEN_D"], BLOCK_N=norms_block, GATHER=order is not None,
        num_warps=4)
    _centre_pass[(blocks_c, B * H, splits)](
        centre.contiguous(), k, v, norms, _order_arg(order, kept), kept, key_limit, part_lse, part_k, part_v, part_n,
        mass, scale * _LOG2E,
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        H, NQB, NKB, nt, per_split, splits, D, LK, SUB=sub, GATHER=order is not None, **consts, **cfg)
    log_weight, spread = (torch.empty(B, H, NQB, device=dev) for _ in range(2))
    key, value = (torch.empty(B, H, NQB, D, device=dev) for _ in range(2))
    key_c, value_c = (torch.empty(B, H, NQB, D, device=dev, dtype=dtype) for _ in range(2))
    share = torch.empty(B, H, NQB, padded_blocks(NKB), device=dev, dtype=dtype)
    block_r = 16 if k.device.type == "cuda" else 4
    _merge_splits[(triton.cdiv(B * H * NQB, block_r),)](
        part_lse, part_k, part_v, part_n, mass, mean_k.contiguous(), mean_v.contiguous(),
        log_weight, key, value, key_c, value_c, share, spread,
        B * H * NQB, NQB, splits, NKB, share.shape[-1], D,
        BLOCK_R=block_r, BLOCK_K=64 if k.device.type == "cuda" else 16, HEAD_DP=consts["HEAD_DP"],
        EVEN_D=consts["EVEN_D"], num_warps=4)
    return log_weight, key, value, share, key_c, value_c, spread


def triton_block_moments(k, v, mean_k, mean_v, key_limit, block_size: int, dtype: torch.dtype,
                         order=None) -> torch.Tensor:
    """(B, H, NKB', D, D) ``dtype``: each key block's mean of (k - mean_k)(v - mean_v)^T over its keys below
    ``key_limit`` (B,) int32 (blocks of positions of ``order`` (L,) int32 when it is given); ``mean_k``, ``mean_v``
    (B, H, D) float32. NKB' is padded_blocks(NKB), the rows past the key blocks zeros."""
    B, H, LK, D = k.shape
    nkb = -(-LK // block_size)
    rows = padded_blocks(nkb)
    moments = torch.empty(B, H, rows, D, D, device=k.device, dtype=dtype)
    moments[:, :, nkb:] = 0
    block_n = 64 if k.device.type == "cuda" else 16
    _block_moments[(nkb, B * H)](
        k, v, _order_arg(order, key_limit), mean_k.contiguous(), mean_v.contiguous(), key_limit, moments,
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        H, LK, rows, D, BLOCK_SIZE=block_size, BLOCK_N=min(block_n, block_size), GATHER=order is not None,
        **_head_dim_constants(D, k.device), num_warps=8 if k.device.type == "cuda" else 4)
    return moments


def triton_fold_summary(out, lse, q, summary, *, block_size: int, scale: float, lse_out, order=None) -> torch.Tensor:
    """kernels.block_summary.fold_summary in one pass over the rows: ``out`` (B, H, L, D) 16-bit, any strides with
    a contiguous last dimension, ``lse`` and ``lse_out`` (B, H, L) float32 with a contiguous last dimension; with
    ``order`` (L,) int32 the summary's query blocks are blocks of positions of that order (every row tensor in the
    tokens' own order)."""
    B, H, L, D = q.shape
    nqb = summary.log_weight.shape[-1]
    block_m = min(block_size, 64) if q.device.type == "cuda" else 16
    _fold_rows[(triton.cdiv(L, block_m), B * H)](
        q, out, lse, lse_out, _order_arg(order, lse), summary.centre.contiguous(), summary.log_weight.contiguous(),
        summary.key.contiguous(), summary.value.contiguous(), summary.slope.contiguous(), summary.spread.contiguous(),
        scale, MOVE_DAMPING, MOVE_LIMIT,
        q.stride(0), q.stride(1), q.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        lse.stride(0), lse.stride(1), lse_out.stride(0), lse_out.stride(1),
        H, L, nqb, D, BLOCK_SIZE=block_size, BLOCK_M=block_m, GATHER=order is not None,
        **_head_dim_constants(D, q.device), num_warps=8 if q.device.type == "cuda" else 4)
    return lse_out
