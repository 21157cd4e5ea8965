"""Triton kernel for pooled key statistics (kernels/pooled_keys.py is the contract and the torch reference).

One program owns one group (a key block or a key cluster) of one (batch, head): it walks the group's rows in
BLOCK_R-row tiles, sums keys and values in float32 and writes their means and ln(size). k and v are read once,
so the pass costs about one read of k and v, however they are strided.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .cluster_triton import _token_rows


@triton.jit
def _pool_fwd(K, V, KM, VM, LOGN, STARTS, ENDS, ORDER,
              stride_kb, stride_kh, stride_kl, stride_vb, stride_vh, stride_vl,
              stride_sb, stride_sh, H, G, D, N,
              HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr, GATHER: tl.constexpr):
    g = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    lo = tl.load(STARTS + b * stride_sb + h * stride_sh + g)
    hi = tl.load(ENDS + b * stride_sb + h * stride_sh + g)
    offs_r = tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, HEAD_DIM)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    # row-wise float32 sums, reduced once after the loop: a reduction across warps per tile made the pass wait on
    # shared memory between loads
    k_sum = tl.zeros([BLOCK_R, HEAD_DIM], dtype=tl.float32)
    v_sum = tl.zeros([BLOCK_R, HEAD_DIM], dtype=tl.float32)
    for r0 in range(lo, hi, BLOCK_R):
        positions = r0 + offs_r  # of the cluster order (GATHER), else rows
        inside = positions < hi
        rows = _token_rows(ORDER, bh, positions, inside, N, GATHER)
        ok = inside[:, None] & (offs_d < D)[None, :]
        k = tl.load(k_base + rows[:, None] * stride_kl + offs_d[None, :], mask=ok, other=0.0)
        v = tl.load(v_base + rows[:, None] * stride_vl + offs_d[None, :], mask=ok, other=0.0)
        k_sum += k.to(tl.float32)
        v_sum += v.to(tl.float32)
    size = (hi - lo).to(tl.float32)
    k_sum = tl.sum(k_sum, 0)
    v_sum = tl.sum(v_sum, 0)
    out = (bh.to(tl.int64) * G + g) * D + offs_d
    tl.store(KM + out, (k_sum / tl.maximum(size, 1.0)).to(KM.dtype.element_ty), mask=offs_d < D)
    tl.store(VM + out, (v_sum / tl.maximum(size, 1.0)).to(VM.dtype.element_ty), mask=offs_d < D)
    tl.store(LOGN + bh.to(tl.int64) * G + g, tl.log(size))


def triton_pool_groups(k, v, starts, ends, order=None):
    """Means of k / v rows starts[b, h, g]:ends[b, h, g] ((B or 1, H or 1, G) int32; an empty range gives 0 and
    ln 0 = -inf). Any head_dim; k and v need a contiguous last dimension. With ``order`` (B, H, N) int32 the ranges
    are positions of that cluster order (kernels.cluster_block_attention's k_order)."""
    B, H, _, D = k.shape
    G = starts.shape[-1]
    keys = torch.empty(B, H, G, D, device=k.device, dtype=k.dtype)
    values = torch.empty(B, H, G, D, device=v.device, dtype=v.dtype)
    log_size = torch.empty(B, H, G, device=k.device, dtype=torch.float32)
    if G == 0:
        return keys, values, log_size
    starts, ends = (t.to(torch.int32).expand(ends.shape).contiguous() for t in (starts, ends))
    stride = lambda t, dim: 0 if t.shape[dim] == 1 else t.stride(dim)  # noqa: E731  (a shared dimension)
    _pool_fwd[(G, B * H)](
        k, v, keys, values, log_size, starts, ends, starts if order is None else order.contiguous(),
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        stride(starts, 0), stride(starts, 1), H, G, D, 0 if order is None else order.shape[-1],
        HEAD_DIM=max(16, triton.next_power_of_2(D)), BLOCK_R=32, GATHER=order is not None, num_warps=4)
    return keys, values, log_size
