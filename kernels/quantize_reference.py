"""Torch reference of the 8-bit block-sparse kernel: simulated quantization, the oracle its tests use.

What the kernel computes, in float32:
  * K smoothed: minus its mean over the valid keys of each (batch, head) (softmax-invariant: it shifts every score
    of a row by the same q.mean; the LSE is shifted back), padding keys zeroed.
  * Q and smoothed K quantized per layout block and head: scale = absmax / QMAX, level = round(x * QMAX / absmax)
    (INT8: round half away from zero, clamped to +-127; FP8 e4m3: the float8_e4m3fn cast, clamped to +-448).
  * Scores from the quantized levels times the two block scales; fp32 softmax; the row sum from unquantized P.
  * P V: FP8 with P scaled by 448 and V per channel (absmax over the valid keys / 448); INT8 mode: fp16 P and V.

The online softmax walks the key tiles in the kernel's order (each list's blocks, ``tile`` keys at a time), so P is
quantized against the same running row maximum; what is left between the two is float32 summation order. Inputs with a non-finite
value (in q, or in k / v before kv_length), and on the INT8 path values past float16's range, give what the bf16 path
gives: the kernel falls back to it, and so does this reference.
"""

from __future__ import annotations

import math

import torch

from .layout import num_blocks
from .reference import reference_block_sparse_attention

QMAX = {"int8": 127.0, "fp8": 448.0}
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
NEG_BIG = -1.0e30  # the kernel's finite start of the running max
P_SCALE = 448.0  # P is in [0, 1]: scaled onto e4m3's range before the cast
FP16_MAX = 65504.0


def key_limits(kv_length, batch: int, length: int, device) -> torch.Tensor:
    """(batch,) long: keys at or past it are padding."""
    if kv_length is None:
        return torch.full((batch,), length, dtype=torch.long, device=device)
    return kv_length.to(device=device, dtype=torch.long).clamp(0, length)


def key_means(k: torch.Tensor, kv_length) -> torch.Tensor:
    """(B, H, D) float32 mean of k over the valid keys of each batch element (0 where there is none).

    Sums in float32 without a float32 copy of k (the kernel's wrapper uses this too: it is cheap and exact)."""
    B, H, LK, D = k.shape
    if kv_length is None:
        return k.sum(dim=2, dtype=torch.float32) / LK
    limits = key_limits(kv_length, B, LK, "cpu").tolist()
    return torch.stack([k[b, :, :n].sum(dim=1, dtype=torch.float32) / max(n, 1) for b, n in enumerate(limits)])


def value_channel_absmax(v: torch.Tensor, kv_length) -> torch.Tensor:
    """(B, H, D) float32 absmax of v over the valid keys, per channel (NaN and inf propagate)."""
    B, H, LK, D = v.shape
    limits = key_limits(kv_length, B, LK, "cpu").tolist()
    rows = []
    for b, n in enumerate(limits):
        if n == 0:
            rows.append(torch.zeros(H, D, dtype=torch.float32, device=v.device))
            continue
        low, high = torch.aminmax(v[b, :, :n], dim=1)  # no |v| copy
        rows.append(torch.maximum(-low.float(), high.float()))
    return torch.stack(rows)


def inverse_scale(absmax: torch.Tensor, qmax: float) -> torch.Tensor:
    """qmax / absmax, correctly rounded (``scalar / tensor`` would multiply by a rounded reciprocal, and the kernel
    divides), 0 where absmax is 0 (an all-zero block quantizes to zeros)."""
    return torch.where(absmax > 0, torch.full_like(absmax, qmax) / absmax, torch.zeros_like(absmax))


def round_8bit(x: torch.Tensor, precision: str) -> torch.Tensor:
    """The float32 value of the 8-bit level nearest to x (x already scaled onto the level range)."""
    qmax = QMAX[precision]
    x = x.clamp(-qmax, qmax)
    if precision == "fp8":
        return x.to(torch.float8_e4m3fn).float()
    return torch.where(x >= 0, x + 0.5, x - 0.5).trunc()


def quantize_blocks(x: torch.Tensor, block_size: int, precision: str, valid_rows=None):
    """Per (batch, head, block of rows) quantization of float32 x (B, H, L, D): (levels (B, H, L, D) float32,
    scales (B, H, nb) float32). ``valid_rows`` (B, L) bool: the other rows are zeroed first."""
    B, H, L, D = x.shape
    nb = num_blocks(L, block_size)
    if valid_rows is not None:
        x = torch.where(valid_rows[:, None, :, None], x, 0.0)  # padding may hold anything, NaN included
    padded = torch.nn.functional.pad(x, (0, 0, 0, nb * block_size - L)).reshape(B, H, nb, block_size * D)
    absmax = padded.abs().amax(dim=-1)
    levels = round_8bit(padded * inverse_scale(absmax, QMAX[precision])[..., None], precision)
    levels = levels.view(B, H, nb * block_size, D)[:, :, :L]
    return levels, absmax / QMAX[precision]


def has_nonfinite(q, k, v, kv_length) -> bool:
    """A non-finite value in q, or in k / v before the key limits: the 8-bit path then gives the bf16 result."""
    valid = torch.arange(k.shape[2], device=k.device)[None, :] < key_limits(kv_length, k.shape[0], k.shape[2],
                                                                           k.device)[:, None]
    keys_bad = [(~torch.isfinite(t) & valid[:, None, :, None]).any() for t in (k, v)]
    return bool((~torch.isfinite(q)).any() or keys_bad[0] or keys_bad[1])


def fp16_overflow(v, kv_length) -> bool:
    """V past float16's range: the INT8 path's fp16 P V would overflow, so it gives the bf16 result instead."""
    return v.dtype != torch.float16 and bool((value_channel_absmax(v, kv_length) > FP16_MAX).any())


def pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    return torch.nn.functional.pad(x, (0, 0, 0, rows - x.shape[2]))


def reference_8bit_block_sparse_attention(q, k, v, kv_indices, kv_counts, *, block_size, precision, scale=None,
                                          kv_length=None, return_lse=False, out=None, tile=64):
    """Same contract as :func:`kernels.block_sparse_attention` with ``precision`` 'fp8' or 'int8'. ``tile``: the
    kernel's key tile (its BLOCK_N)."""
    B, H, LQ, D = q.shape
    LK = k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    if has_nonfinite(q, k, v, kv_length) or (precision == "int8" and fp16_overflow(v, kv_length)):
        return reference_block_sparse_attention(q, k, v, kv_indices, kv_counts, block_size=block_size, scale=scale,
                                                kv_length=kv_length, return_lse=return_lse, out=out)
    limits = key_limits(kv_length, B, LK, q.device)
    if block_size % tile:
        raise ValueError(f"tile {tile} must divide the block size {block_size}")
    valid = torch.arange(LK, device=q.device)[None, :] < limits[:, None]  # (B, LK)
    mean = key_means(k, kv_length)
    q_levels, q_scales = quantize_blocks(q.float(), block_size, precision)
    k_levels, k_scales = quantize_blocks(k.float() - mean[:, :, None, :], block_size, precision, valid)
    if precision == "fp8":
        absmax = value_channel_absmax(v, kv_length)
        v_sim = round_8bit(v.float() * inverse_scale(absmax, QMAX["fp8"])[:, :, None, :], "fp8")
        v_sim = v_sim * (absmax / QMAX["fp8"])[:, :, None, :]
    else:
        v_sim = v.half().float()
    v_sim = torch.where(valid[:, None, :, None], v_sim, 0.0)
    nqb, nkb = num_blocks(LQ, block_size), num_blocks(LK, block_size)
    tiles = block_size // tile
    q_tiles = pad_rows(q_levels, nqb * block_size).reshape(B, H, nqb, block_size, D)
    k_rows, v_rows = pad_rows(k_levels, nkb * block_size), pad_rows(v_sim, nkb * block_size)
    indices = kv_indices.long().expand(B, H, nqb, -1)
    counts = kv_counts.long().expand(B, H, nqb)
    qk_scale = scale * LOG2E
    m = torch.full((B, H, nqb, block_size), NEG_BIG, device=q.device)
    l = torch.zeros(B, H, nqb, block_size, device=q.device)
    acc = torch.zeros(B, H, nqb, block_size, D, device=q.device)
    offsets = torch.arange(tile, device=q.device)
    for slot in range(indices.shape[-1]):  # the kernel's order: each list's blocks, each block's tiles
        block = indices[..., slot]  # (B, H, nqb)
        for sub in range(tiles):
            keys = (block * tiles + sub)[..., None] * tile + offsets  # (B, H, nqb, tile)
            gather = keys.view(B, H, nqb * tile, 1).expand(-1, -1, -1, D)
            kt = torch.gather(k_rows, 2, gather).view(B, H, nqb, tile, D)
            vt = torch.gather(v_rows, 2, gather).view(B, H, nqb, tile, D)
            s = q_tiles @ kt.transpose(-1, -2) * (q_scales * torch.gather(k_scales, 2, block))[..., None, None]
            live = (slot < counts)[..., None] & (keys < limits.view(B, 1, 1, 1))
            s = s.masked_fill(~live[..., None, :], float("-inf")) * qk_scale
            m_new = torch.maximum(m, s.amax(dim=-1))
            p = torch.exp2(s - m_new[..., None])
            alpha = torch.exp2(m - m_new)
            l = l * alpha + p.sum(dim=-1)
            p_sim = round_8bit(p * P_SCALE, "fp8") / P_SCALE if precision == "fp8" else p.half().float()
            acc = acc * alpha[..., None] + p_sim @ vt
            m = m_new
    o = acc / torch.where(l > 0, l, torch.ones_like(l))[..., None]
    result = torch.empty(B, H, LQ, D, device=q.device, dtype=q.dtype) if out is None else out
    result.copy_(o.view(B, H, nqb * block_size, D)[:, :, :LQ])
    lse = None
    if return_lse:  # natural log, and back from the smoothed keys' scores to the true ones
        shift = (q.float() @ mean[..., None]).squeeze(-1) * scale
        lse = ((m + torch.log2(l)) * LN2).view(B, H, nqb * block_size)[:, :, :LQ] + shift
    return (result, lse) if return_lse else result
