"""Triton kernels that move token rows into cluster order and back (SVG2's semantic-aware permutation).

Rows are gathered / scattered whole (head_dim contiguous); every (batch, head) has its own order. The first
``NQ`` / ``NK`` rows follow the orders, the rows after them (HunyuanVideo's text tokens) stay where they are.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _source_rows(ORDER, bh, rows, row_ok, N):
    """Where each output row comes from: order[row] for the ordered rows, the row itself after them."""
    ordered = rows < N
    src = tl.load(ORDER + bh.to(tl.int64) * N + rows, mask=row_ok & ordered, other=0)
    return tl.where(ordered, src, rows)


@triton.jit
def _row_tile(H, L, D, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's (batch x head, batch, head) and its BLOCK_L rows: their indices, which exist, and the
    (rows, head_dim) mask of the elements to move."""
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    rows = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = rows < L
    return bh, b, h, rows, offs_d, row_ok, row_ok[:, None] & (offs_d < D)[None, :]


@triton.jit
def _permute_qkv_kernel(
    Q, K, V, QP, KP, VP, Q_ORDER, K_ORDER,
    stride_qb, stride_qh, stride_ql,
    stride_kb, stride_kh, stride_kl,
    stride_vb, stride_vh, stride_vl,
    H, L, NQ, NK, D,
    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    bh, b, h, rows, offs_d, row_ok, mask = _row_tile(H, L, D, BLOCK_L, BLOCK_D)
    dst = bh.to(tl.int64) * L * D + rows[:, None] * D + offs_d[None, :]  # outputs: contiguous (B, H, L, D)

    q_src = _source_rows(Q_ORDER, bh, rows, row_ok, NQ)
    q = tl.load(Q + b * stride_qb + h * stride_qh + q_src[:, None] * stride_ql + offs_d[None, :], mask=mask)
    tl.store(QP + dst, q, mask=mask)
    k_src = _source_rows(K_ORDER, bh, rows, row_ok, NK)
    k = tl.load(K + b * stride_kb + h * stride_kh + k_src[:, None] * stride_kl + offs_d[None, :], mask=mask)
    tl.store(KP + dst, k, mask=mask)
    v = tl.load(V + b * stride_vb + h * stride_vh + k_src[:, None] * stride_vl + offs_d[None, :], mask=mask)
    tl.store(VP + dst, v, mask=mask)


@triton.jit
def _unpermute_kernel(
    SRC, OUT, ORDER,
    stride_sb, stride_sh, stride_sl,
    stride_ob, stride_oh, stride_ol,
    H, L, N, D,
    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    bh, b, h, rows, offs_d, row_ok, mask = _row_tile(H, L, D, BLOCK_L, BLOCK_D)
    dst = _source_rows(ORDER, bh, rows, row_ok, N)
    rows_in = tl.load(SRC + b * stride_sb + h * stride_sh + rows[:, None] * stride_sl + offs_d[None, :], mask=mask)
    tl.store(OUT + b * stride_ob + h * stride_oh + dst[:, None] * stride_ol + offs_d[None, :], rows_in, mask=mask)


def _launch_shape(L: int, D: int, device: torch.device):
    block_d = max(16, triton.next_power_of_2(D))
    block_l = 16 if device.type == "cpu" else max(1, 8192 // block_d)  # ~16 KB of bf16 rows per tensor and program
    return block_l, block_d, (triton.cdiv(L, block_l),)


def triton_permute_qkv(q, k, v, q_order, k_order):
    B, H, L, D = q.shape
    qp, kp, vp = (torch.empty(B, H, L, D, device=q.device, dtype=q.dtype) for _ in range(3))
    block_l, block_d, grid = _launch_shape(L, D, q.device)
    _permute_qkv_kernel[(*grid, B * H)](
        q, k, v, qp, kp, vp, q_order.contiguous(), k_order.contiguous(),
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), H, L, q_order.shape[2], k_order.shape[2], D,
        BLOCK_L=block_l, BLOCK_D=block_d, num_warps=4)
    return qp, kp, vp


def triton_unpermute(src, order, out):
    B, H, L, D = src.shape
    block_l, block_d, grid = _launch_shape(L, D, src.device)
    _unpermute_kernel[(*grid, B * H)](
        src, out, order.contiguous(), src.stride(0), src.stride(1), src.stride(2),
        out.stride(0), out.stride(1), out.stride(2), H, L, order.shape[2], D,
        BLOCK_L=block_l, BLOCK_D=block_d, num_warps=4)
    return out
