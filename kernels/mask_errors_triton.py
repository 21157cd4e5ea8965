"""Triton kernel for the error of two candidate masks on a few sampled query rows (SVG's online profiling).

One program owns BLOCK_R sampled rows of one (batch, head) and one split of the keys. It walks the key tiles once
with a flash-attention online softmax and keeps three accumulators that share the running max: all keys (the
exact output), the keys candidate 0 keeps and the keys candidate 1 keeps. Which keys a candidate keeps for a row
comes as a token mask (2, R, LK) uint8 (mask_errors.token_masks, from the block tables keep[m, i, key_block[m,
j]]): its tiles load like the keys' own, with addresses known ahead (the pipeliner prefetches them), where a lookup
through key_block in the loop would be a load waiting on a load. One exp2 per score serves all three sums; the partial
(max, sums, outputs) of every split are combined in torch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634
_NEG_BIG = tl.constexpr(-1.0e30)  # finite "minus infinity" for the running max: exp2(-inf - -inf) would be NaN


@triton.jit
def _mask_errors_fwd(
    Q, K, V, MASK, KV_LEN, M_OUT, L_OUT, ACC_OUT,
    qk_scale,
    s_qb, s_qh, s_qr,
    s_kb, s_kh, s_kl,
    s_vb, s_vh, s_vl,
    H, R, LK, KEYS_PER_SPLIT, PARTIALS,
    HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_KV_LEN: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    rt = tl.program_id(0)
    bh = tl.program_id(1)
    sp = tl.program_id(2)
    b = (bh // H).to(tl.int64)
    h = bh % H
    rows = rt * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_N)
    q = tl.load(Q + b * s_qb + h * s_qh + rows[:, None] * s_qr + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    if UPCAST_DOT:
        q = q.to(tl.float32)
    key_limit = LK
    if HAS_KV_LEN:
        key_limit = tl.minimum(tl.load(KV_LEN + b), LK)
    lo = sp * KEYS_PER_SPLIT
    hi = tl.minimum(lo + KEYS_PER_SPLIT, key_limit)
    k_base = K + b * s_kb + h * s_kh
    v_base = V + b * s_vb + h * s_vh
    mask0 = MASK + rows[:, None].to(tl.int64) * LK
    mask1 = MASK + (R + rows[:, None]).to(tl.int64) * LK

    m_i = tl.full([BLOCK_R], _NEG_BIG, dtype=tl.float32)
    l_all = tl.zeros([BLOCK_R], dtype=tl.float32)
    l_0 = tl.zeros([BLOCK_R], dtype=tl.float32)
    l_1 = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc_all = tl.zeros([BLOCK_R, HEAD_DIM], dtype=tl.float32)
    acc_0 = tl.zeros([BLOCK_R, HEAD_DIM], dtype=tl.float32)
    acc_1 = tl.zeros([BLOCK_R, HEAD_DIM], dtype=tl.float32)
    for start in range(lo, hi, BLOCK_N):
        cols = start + offs_n
        col_ok = cols < hi
        k = tl.load(k_base + cols[None, :] * s_kl + offs_d[:, None], mask=col_ok[None, :], other=0.0)
        v = tl.load(v_base + cols[:, None] * s_vl + offs_d[None, :], mask=col_ok[:, None], other=0.0)
        if UPCAST_DOT:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, k) * qk_scale
        s = tl.where(col_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        both = row_ok[:, None] & col_ok[None, :]
        p0 = tl.where(tl.load(mask0 + cols[None, :], mask=both, other=0) != 0, p, 0.0)
        p1 = tl.where(tl.load(mask1 + cols[None, :], mask=both, other=0) != 0, p, 0.0)
        l_all = l_all * alpha + tl.sum(p, 1)
        l_0 = l_0 * alpha + tl.sum(p0, 1)
        l_1 = l_1 * alpha + tl.sum(p1, 1)
        acc_all = tl.dot(p.to(v.dtype), v, acc_all * alpha[:, None])
        acc_0 = tl.dot(p0.to(v.dtype), v, acc_0 * alpha[:, None])
        acc_1 = tl.dot(p1.to(v.dtype), v, acc_1 * alpha[:, None])
        m_i = m_new

    # Partials: M (S, B*H, R); L and ACC (3, S, B*H, R[, D]) with PARTIALS = S * B * H * R rows per candidate.
    part = (sp * tl.num_programs(1) + bh).to(tl.int64) * R + rows
    tl.store(M_OUT + part, m_i, mask=row_ok)
    tl.store(L_OUT + part, l_all, mask=row_ok)
    tl.store(L_OUT + PARTIALS + part, l_0, mask=row_ok)
    tl.store(L_OUT + 2 * PARTIALS + part, l_1, mask=row_ok)
    acc_ptr = ACC_OUT + part[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(acc_ptr, acc_all, mask=row_ok[:, None])
    tl.store(acc_ptr + PARTIALS * HEAD_DIM, acc_0, mask=row_ok[:, None])
    tl.store(acc_ptr + 2 * PARTIALS * HEAD_DIM, acc_1, mask=row_ok[:, None])


def default_config(device: torch.device) -> dict:
    """Tile shape and launch options. On GPUs: 16 rows x 64 keys with 4 warps and 3 stages, the fastest of the
    benchmark's sweep on an H100 at the Wan 14B 720p shape (2.24 ms for 76 rows of 40 heads, with the splits below;
    2026-11-23); the interpreter takes fewer, larger tiles."""
    if device.type != "cuda":
        return dict(BLOCK_R=64, BLOCK_N=64, num_warps=4, num_stages=1)
    return dict(BLOCK_R=16, BLOCK_N=64, num_warps=4, num_stages=3)


# The float32 partials (m, three sums and three accumulators per split and row) may hold this much: a short call
# has few row tiles, so filling the GPU takes many splits, and at Wan 1.3B 480p (12 heads, 64 rows, 64 splits) they
# were 76 MB, twice that during their merge: the SVG profile's peak above its call's output (H100, RESULTS.md).
PARTIAL_BYTES = 32 << 20


def _default_splits(device: torch.device, programs: int, key_tiles: int, split_bytes: int) -> int:
    """Enough key splits for about 24 programs per SM: each program's walk is a chain of small dependent products,
    so many in flight hide its latency (measured on the H100: 16 splits 2.24 ms, 3 splits 2.58 ms; 2026-11-23); at
    most what PARTIAL_BYTES holds at ``split_bytes`` a split."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(key_tiles, -(-24 * sms // programs), 64, PARTIAL_BYTES // split_bytes))


def triton_candidate_mask_outputs(q_rows, k, v, token_mask, *, scale, kv_length=None, splits=None, config=None):
    """Outputs (3, B, H, R, D) float32 (exact, candidate 0, candidate 1) of validated inputs and the (2, R, LK)
    uint8 ``token_mask``; head_dim a power of two in [16, 128]. Rows a candidate gives no key get zeros.
    ``config``: BLOCK_R, BLOCK_N, num_warps, num_stages (default_config when None)."""
    B, H, R, D = q_rows.shape
    LK = k.shape[2]
    on_gpu = q_rows.device.type == "cuda"
    cfg = dict(config) if config is not None else default_config(q_rows.device)
    block_r, block_n = cfg.pop("BLOCK_R"), cfg.pop("BLOCK_N")
    row_tiles = triton.cdiv(R, block_r)
    key_tiles = triton.cdiv(LK, block_n)
    splits = splits or _default_splits(q_rows.device, row_tiles * B * H, key_tiles, 4 * B * H * R * (4 + 3 * D))
    keys_per_split = triton.cdiv(key_tiles, splits) * block_n
    splits = triton.cdiv(LK, keys_per_split)
    partials = splits * B * H * R
    dev = q_rows.device
    m = torch.empty(splits, B, H, R, device=dev, dtype=torch.float32)
    sums = torch.empty(3, splits, B, H, R, device=dev, dtype=torch.float32)
    acc = torch.empty(3, splits, B, H, R, D, device=dev, dtype=torch.float32)
    has_len = kv_length is not None
    kv_len = kv_length.to(device=dev, dtype=torch.int32).contiguous() if has_len else token_mask
    _mask_errors_fwd[(row_tiles, B * H, splits)](
        q_rows, k, v, token_mask, kv_len, m, sums, acc, scale * _LOG2E,
        q_rows.stride(0), q_rows.stride(1), q_rows.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        H, R, LK, keys_per_split, partials,
        HEAD_DIM=D, BLOCK_R=block_r, BLOCK_N=block_n, HAS_KV_LEN=has_len,
        # Triton's CPU interpreter computes bfloat16 tl.dot wrongly: float32 tiles there (as the attention kernel).
        UPCAST_DOT=not on_gpu, **cfg)
    weight = torch.exp2(m - m.amax(dim=0, keepdim=True))  # (S, B, H, R); splits with no key have weight 0
    total = (weight * sums).sum(dim=1)                     # (3, B, H, R)
    out = acc.mul_(weight[..., None]).sum(dim=1)           # (3, B, H, R, D); in place: no second copy of the partials
    return out / torch.where(total > 0, total, torch.ones_like(total))[..., None]
