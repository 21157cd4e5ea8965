"""Triton kernel moving token rows of selected heads through a token order, in either direction.

Gather: dst[b, j, t] = src[b, heads[j], rows[t]] (a head subset in a new token order, a compact buffer).
Scatter: dst[b, heads[j], rows[t]] = src[b, j, t] (back into place, e.g. straight into a strided output view).
One program copies BLOCK_L rows of one (batch, selected head); each row is head_dim contiguous elements, so the
loads and stores stay coalesced whatever the order.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _move_rows(SRC, DST, HEADS, ROWS,
               s_b, s_h, s_l, d_b, d_h, d_l,
               NUM_HEADS, L, D,
               BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, SCATTER: tl.constexpr):
    pid_l = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // NUM_HEADS).to(tl.int64)  # b * stride passes 2**31 elements at large batches of 720p video
    j = pid_bh % NUM_HEADS
    head = tl.load(HEADS + j).to(tl.int64)
    t = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    row_ok = t < L
    r = tl.load(ROWS + t, mask=row_ok, other=0).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    ok = row_ok[:, None] & (d < D)[None, :]
    if SCATTER:
        src = SRC + b * s_b + j * s_h + t.to(tl.int64)[:, None] * s_l + d[None, :]
        dst = DST + b * d_b + head * d_h + r[:, None] * d_l + d[None, :]
    else:
        src = SRC + b * s_b + head * s_h + r[:, None] * s_l + d[None, :]
        dst = DST + b * d_b + j * d_h + t.to(tl.int64)[:, None] * d_l + d[None, :]
    tl.store(dst, tl.load(src, mask=ok), mask=ok)


def triton_move_rows(src, dst, heads, rows, *, scatter: bool) -> None:
    """Launch the kernel on validated inputs (see kernels.row_gather); heads and rows are int32 on the device."""
    B = src.shape[0]
    num_heads, L, D = heads.shape[0], rows.shape[0], src.shape[-1]
    block_d = max(16, triton.next_power_of_2(D))
    block_l = max(16, 8192 // block_d)  # 16 KiB of bf16 per program
    _move_rows[(triton.cdiv(L, block_l), B * num_heads)](
        src, dst, heads, rows,
        src.stride(0), src.stride(1), src.stride(2), dst.stride(0), dst.stride(1), dst.stride(2),
        num_heads, L, D, BLOCK_L=block_l, BLOCK_D=block_d, SCATTER=scatter, num_warps=4)
