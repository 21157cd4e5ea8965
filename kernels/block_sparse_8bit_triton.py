"""8-bit variants of the block-sparse forward kernel: Q K^T in FP8 e4m3 or INT8, P V in FP8 or fp16, fp32 sums.

Same layouts, LSE, key padding and ``out=`` contract as kernels/block_sparse_triton.py. Quantization follows
SageAttention: K is smoothed by its mean over the valid keys (every score of a row moves by the same q.mean, so the
softmax is unchanged; the LSE is shifted back), Q and K get one scale per layout block and head, V one per channel
and head. Work per call:

  1. a pre-pass quantizes K (and on the FP8 path V, stored transposed so P V reads it K-major, as FP8 tensor cores
     want) once into padded 8-bit copies; key padding rows become zeros;
  2. the attention kernel quantizes its query tile itself (it is loaded once per program), walks the key blocks
     with the online softmax, and flags query tiles that hold a non-finite value;
  3. one 4-byte read decides whether any input was non-finite (or, on the INT8 path, V past fp16's range): then
     the bf16 kernel recomputes the call, so such inputs give exactly what the bf16 path gives.

The 8-bit copies of K and V are made for a group of heads at a time, which bounds the memory they add to a call
(COPY_BYTES); the groups' checks are read once, at the end.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .block_sparse_triton import (_LOG2E, _NEG_BIG, _load_values, _mask_keys, _program_layout, _row_results,
                                  _store_rows, _tensor_descriptor_class, _tile_config, triton_block_sparse_attention)
from .quantize_reference import FP16_MAX, P_SCALE, QMAX, inverse_scale, key_means, value_channel_absmax

# Bound on the 8-bit copies of K and V one launch holds (heads run in groups under it): at Wan 14B 720p the copies
# of all 40 heads would be 740 MB on top of the 740 MB output a call already writes.
COPY_BYTES = 128 << 20


@triton.jit
def _round_e4m3(x):
    """x rounded to the nearest e4m3 value (ties to even) in float32 arithmetic, for Triton's CPU interpreter,
    whose float32 -> float8e4nv cast rounds ties up and can lose the carry when rounding up (3.8: 1.0625 -> 1.125,
    1.9375 -> 1.0); it casts exact values right. Adding 1.5 * 2**23 steps (the e4m3 spacing at x's exponent) and
    taking it away rounds to a whole step."""
    exponent = tl.maximum((x.to(tl.int32, bitcast=True) >> 23) & 0xFF, 121)  # below 2**-6: subnormal steps of 2**-9
    big = ((exponent - 3) << 23).to(tl.float32, bitcast=True) * 12582912.0
    return (x + big) - big


@triton.jit
def _e4m3(x, EMULATE_FP8_CAST: tl.constexpr):
    """x (inside +-448) as e4m3, rounded to nearest even."""
    if EMULATE_FP8_CAST:
        x = _round_e4m3(x)
    return x.to(tl.float8e4nv)


@triton.jit
def _to_8bit(x, QMAX: tl.constexpr, FP8: tl.constexpr, EMULATE_FP8_CAST: tl.constexpr):
    """Levels of x (already scaled onto +-QMAX): e4m3 (round to nearest even) or int8 (half away from zero)."""
    x = tl.minimum(tl.maximum(x, -QMAX), QMAX)
    # one return: Triton's compiler (3.6) types every return of a function, even in a constexpr branch not taken
    if FP8:
        levels = _e4m3(x, EMULATE_FP8_CAST)
    else:
        levels = tl.where(x >= 0, x + 0.5, x - 0.5).to(tl.int8)
    return levels


@triton.jit
def _absmax_scale(x, QMAX: tl.constexpr):
    """(scale, inverse scale) of a tile: absmax / QMAX and QMAX / absmax (0 for an all-zero tile), correctly rounded
    divisions (a plain ``/`` is approximate on the GPU) so the levels are the reference's, ties included."""
    absmax = tl.max(tl.max(tl.abs(x), 1), 0)
    inverse = tl.math.div_rn(tl.full([], QMAX, tl.float32), tl.where(absmax > 0, absmax, 1.0))
    return tl.math.div_rn(absmax, tl.full([], QMAX, tl.float32)), tl.where(absmax > 0, inverse, 0.0)


@triton.jit
def _count_nonfinite(x):
    return tl.sum(tl.sum(tl.where(tl.abs(x) < float("inf"), 0, 1), 1), 0)  # NaN fails the test too


@triton.jit
def _quantize_rows(
    X, CHANNEL, XQ, SCALE, KV_LEN,
    stride_xb, stride_xh, stride_xl,
    H, LX, L_PAD,
    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, QMAX: tl.constexpr, FP8: tl.constexpr,
    HAS_KV_LEN: tl.constexpr, PER_BLOCK: tl.constexpr, EMULATE_FP8_CAST: tl.constexpr,
):
    """One (row block, batch x head) of K or V into its padded 8-bit copy; rows past the key limit become zeros.

    CHANNEL (B*H, D): K's mean with PER_BLOCK, else V's inverse scales. PER_BLOCK (K): subtract the mean, quantize
    with the block's own scale, store it in SCALE (B*H, blocks), NaN when the block holds a non-finite value; the
    copy is (B*H, L_PAD, D). Otherwise (V): the copy is transposed, (B*H, D, L_PAD)."""
    blk = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    rows = blk * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM)
    limit = LX
    if HAS_KV_LEN:
        limit = tl.minimum(tl.load(KV_LEN + b), LX)
    valid = rows[:, None] < limit
    x = tl.load(X + b * stride_xb + h * stride_xh + rows[:, None] * stride_xl + offs_d[None, :], mask=valid,
                other=0.0).to(tl.float32)
    if PER_BLOCK:
        x = tl.where(valid, x - tl.load(CHANNEL + bh * HEAD_DIM + offs_d)[None, :], 0.0)
        scale, inv = _absmax_scale(x, QMAX)
        tl.store(SCALE + bh * tl.num_programs(0) + blk, tl.where(_count_nonfinite(x) == 0, scale, float("nan")))
        levels = _to_8bit(x * inv, QMAX, FP8, EMULATE_FP8_CAST)
        tl.store(XQ + bh * L_PAD * HEAD_DIM + rows[:, None] * HEAD_DIM + offs_d[None, :], levels)
    else:
        levels = _to_8bit(x * tl.load(CHANNEL + bh * HEAD_DIM + offs_d)[None, :], QMAX, FP8, EMULATE_FP8_CAST)
        tl.store(XQ + bh * L_PAD * HEAD_DIM + offs_d[None, :] * L_PAD + rows[:, None], levels)


@triton.jit
def _block_sparse_8bit_fwd(
    Q, KQ, KS, V, VQ, VS, MEAN, O, LSE, FLAGS, KV_IDX, KV_CNT, KV_LEN,
    scale, qk_scale,
    stride_qb, stride_qh, stride_ql,
    stride_vb, stride_vh, stride_vl,
    stride_ob, stride_oh, stride_ol,
    stride_lb, stride_lh,
    stride_ib, stride_ih, stride_iq,
    stride_cb, stride_ch,
    H, LQ, LK, L_PAD, NKB,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, KV_BLOCK: tl.constexpr,
    QMAX: tl.constexpr, FP8: tl.constexpr, P_SCALE: tl.constexpr,
    HAS_KV_LEN: tl.constexpr, MASK_KEYS: tl.constexpr, EVEN_Q: tl.constexpr, RETURN_LSE: tl.constexpr,
    UPCAST_DOT: tl.constexpr, TMA: tl.constexpr, SPLIT_ACC: tl.constexpr,
):
    """One query block of one (batch, head). KQ (B*H, L_PAD, D) and KS (B*H, NKB): the pre-pass's K levels and
    block scales. FP8: VQ (B*H, D, L_PAD) levels and VS (B*H, D) channel scales of V; INT8: V itself, in fp16.
    UPCAST_DOT (the CPU interpreter): fp16 products in float32 tiles, the FP8 rounding emulated.
    TMA (FP8, Hopper+): KQ and VQ are 2D tensor descriptors of those copies, (B*H*L_PAD, D) and (B*H*D, L_PAD).
    SPLIT_ACC (FP8): each tile's P V in a fresh accumulator added in fp32, else chained through the MMA."""
    b, h, qb, idx_base, count, key_limit = _program_layout(
        KV_IDX, KV_CNT, KV_LEN, stride_ib, stride_ih, stride_iq, stride_cb, stride_ch, H, LK, HAS_KV_LEN)
    b = b.to(tl.int64)
    bh = b * H + h
    offs_m = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_N)
    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_ql + offs_d[None, :]
    if EVEN_Q:
        q = tl.load(q_ptrs).to(tl.float32)
    else:
        q = tl.load(q_ptrs, mask=offs_m[:, None] < LQ, other=0.0).to(tl.float32)
    tl.store(FLAGS + bh * tl.num_programs(0) + qb, _count_nonfinite(q))
    q_scale, q_inv = _absmax_scale(q, QMAX)
    q8 = _to_8bit(q * q_inv, QMAX, FP8, UPCAST_DOT)
    if not TMA:
        kq_base = KQ + bh * L_PAD * HEAD_DIM
        vq_base = VQ + bh * L_PAD * HEAD_DIM
    v_base = V + b * stride_vb + h * stride_vh

    m_i = tl.full([BLOCK_M], _NEG_BIG, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    SUB_TILES: tl.constexpr = KV_BLOCK // BLOCK_N
    for it in range(0, count * SUB_TILES):
        kb = tl.load(idx_base + it // SUB_TILES)
        start = kb * KV_BLOCK + (it % SUB_TILES) * BLOCK_N
        cols = start + offs_n
        if TMA:
            k8_t = tl.trans(KQ.load([(bh * L_PAD + start).to(tl.int32), 0]))
        else:
            k8_t = tl.load(kq_base + cols[None, :] * HEAD_DIM + offs_d[:, None])  # padded copy: no masks
        if FP8:
            s = tl.dot(q8, k8_t)
        else:
            s = tl.dot(q8, k8_t, out_dtype=tl.int32).to(tl.float32)
        # one scale per tile takes the integer scores to scaled log2 units: one multiply per score
        s = _mask_keys(s * (q_scale * tl.load(KS + bh * NKB + kb) * qk_scale), start, offs_n, key_limit, BLOCK_N,
                       MASK_KEYS)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        if FP8:
            if TMA:
                v8 = tl.trans(VQ.load([(bh * HEAD_DIM).to(tl.int32), start]))
            else:
                v8 = tl.load(vq_base + offs_d[None, :] * L_PAD + cols[:, None])
            p8 = _e4m3(p * P_SCALE, UPCAST_DOT)  # p is in [0, 1]: no clamp
            if SPLIT_ACC:
                # Hopper's FP8 MMA sums with fewer bits than fp32: a fresh accumulator per tile, added in fp32,
                # keeps long key lists exact to fp32 (SageAttention2's two-level sum) at the cost of registers
                acc = acc * alpha[:, None] + tl.dot(p8, v8)
            else:
                acc = tl.dot(p8, v8, acc * alpha[:, None])
        else:  # keys past the limit read as zeros: padding never reaches the sum, even as NaN * 0
            v = _load_values(v_base, cols, offs_d, stride_vl, key_limit, MASK_KEYS, False).to(tl.float16)
            p16 = p.to(tl.float16)
            if UPCAST_DOT:  # the CPU interpreter's 16-bit tl.dot is wrong: the same fp16 values in fp32 tiles
                acc = tl.dot(p16.to(tl.float32), v.to(tl.float32), acc * alpha[:, None])
            else:
                acc = tl.dot(p16, v, acc * alpha[:, None])
        m_i = m_new

    if FP8:
        acc = acc * (tl.load(VS + bh * HEAD_DIM + offs_d) / P_SCALE)[None, :]
    out, lse = _row_results(acc, m_i, l_i)
    _store_rows(O + b * stride_ob + h * stride_oh, out, offs_m, offs_d, stride_ol, LQ, EVEN_Q)
    if RETURN_LSE:  # the scores were of the smoothed keys: add q.mean back
        lse += tl.sum(q * tl.load(MEAN + bh * HEAD_DIM + offs_d)[None, :], 1) * scale
        tl.store(LSE + b * stride_lb + h * stride_lh + offs_m, lse, mask=offs_m < LQ)


def _eight_bit_config(config, head_dim, block_size, device, precision) -> dict:
    """The tile config of a launch: the caller's, else the measured one for this GPU (FP8 on Hopper: 128-wide key
    tiles over two warpgroups, the fastest of the sweep in benchmarks/RESULTS.md that keeps fp32 sums; otherwise the
    bf16 kernel's); TMA only on the FP8 path (its copies are padded and contiguous) where Triton has descriptors."""
    if config is None:
        config = _tile_config(head_dim, block_size, device)
        if precision == "fp8" and device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9 \
                and block_size % 128 == 0:
            config = dict(BLOCK_N=128, num_warps=8, num_stages=3, tma=False)
    cfg = {"split_acc": True, **config}
    cfg["tma"] = bool(cfg.get("tma")) and precision == "fp8" and _tensor_descriptor_class() is not None
    return cfg


def prepass(k, v, kv_len, kv_length, *, block_size, precision):
    """What a call computes before its kernel: K's mean over the valid keys (B, H, D), K's 8-bit levels and block
    scales, V's channel absmax (B, H, D), and on the FP8 path V's transposed levels (None on the INT8 path, whose
    kernel reads V itself). ``kv_len``: int32 key limits on the device, ``kv_length`` as the caller gave them."""
    mean = key_means(k, kv_length).contiguous()
    k_levels, k_scales = _quantize(k, kv_len, block_size=block_size, precision=precision, mean=mean)
    v_absmax = value_channel_absmax(v, kv_length)
    v_levels = _quantize(v, kv_len, block_size=block_size, precision=precision,
                         inverse=inverse_scale(v_absmax, QMAX["fp8"]).contiguous()) if precision == "fp8" else None
    return mean, k_levels, k_scales, v_absmax, v_levels


def _quantize(x, kv_len, *, block_size, precision, mean=None, inverse=None):
    """Launch the pre-pass over x (B, H, L, D): K (``mean`` given) -> (levels, block scales); V (``inverse``
    given) -> transposed levels."""
    B, H, L, D = x.shape
    nb = (L + block_size - 1) // block_size
    dtype = torch.float8_e4m3fn if precision == "fp8" else torch.int8
    levels = torch.empty(B * H, nb * block_size, D, device=x.device, dtype=dtype)
    per_block = mean is not None
    scales = torch.empty(B * H, nb, device=x.device, dtype=torch.float32) if per_block else levels
    _quantize_rows[(nb, B * H)](
        x, mean if per_block else inverse, levels, scales,
        kv_len if kv_len is not None else scales,
        x.stride(0), x.stride(1), x.stride(2), H, L, nb * block_size,
        HEAD_DIM=D, BLOCK=block_size, QMAX=QMAX[precision], FP8=precision == "fp8",
        HAS_KV_LEN=kv_len is not None, PER_BLOCK=per_block, EMULATE_FP8_CAST=x.device.type == "cpu")
    return (levels, scales) if per_block else levels


def triton_block_sparse_attention_8bit(q, k, v, kv_indices, kv_counts, *, block_size, scale, precision,
                                       kv_length=None, return_lse=False, out=None, config=None,
                                       copy_bytes=COPY_BYTES):
    """Launch the 8-bit path ('fp8' or 'int8'). Inputs are assumed validated; head_dim a power of two in [16, 128].

    ``config``: BLOCK_N, num_warps, num_stages, tma (FP8: read the 8-bit copies through TMA descriptors) and
    split_acc (FP8: P V summed per tile in fp32), default per GPU. The heads run a group at a time, so that the 8-bit
    copies of K and V stay under ``copy_bytes``."""
    B, H, LQ, D = q.shape
    LK = k.shape[2]
    nkb = (LK + block_size - 1) // block_size
    result = torch.empty(B, H, LQ, D, device=q.device, dtype=q.dtype) if out is None else out
    lse = torch.empty(B, H, LQ, device=q.device, dtype=torch.float32) if return_lse else None
    indices = kv_indices.to(torch.int32)
    counts = kv_counts.to(torch.int32)
    indices = indices if indices.stride(-1) == 1 else indices.contiguous()
    counts = counts if counts.stride(-1) == 1 else counts.contiguous()
    kv_len = kv_length.to(device=q.device, dtype=torch.int32).contiguous() if kv_length is not None else None
    cfg = _eight_bit_config(config, D, block_size, q.device, precision)
    if block_size % cfg["BLOCK_N"]:
        raise ValueError(f"config BLOCK_N={cfg['BLOCK_N']} must divide the layout block size {block_size}")

    per_head = 2 * B * nkb * block_size * D  # bytes of one head's K and V levels
    groups = -(-H // max(1, min(H, copy_bytes // per_head)))
    step = -(-H // groups)  # even groups: no short last launch
    unsafe = torch.zeros((), dtype=torch.bool, device=q.device)
    for h0 in range(0, H, step):
        heads = slice(h0, min(H, h0 + step))

        def of_heads(t):  # a layout shared across heads (dim 1 of size 1) stays whole
            return t if t.shape[1] == 1 else t[:, heads]

        unsafe |= _launch_heads(q[:, heads], k[:, heads], v[:, heads], of_heads(indices), of_heads(counts), kv_len,
                                kv_length, result[:, heads], None if lse is None else lse[:, heads],
                                block_size=block_size, scale=scale, precision=precision, cfg=cfg)
    if unsafe.item():  # the one sync of the call: non-finite inputs get exactly the bf16 path's result
        return triton_block_sparse_attention(q, k, v, kv_indices, kv_counts, block_size=block_size, scale=scale,
                                             kv_length=kv_length, return_lse=return_lse, out=result)
    return (result, lse) if return_lse else result


def _launch_heads(q, k, v, indices, counts, kv_len, kv_length, result, lse, *, block_size, scale, precision, cfg):
    """Pre-pass and kernel over a group of heads; returns a device bool: an input was non-finite (or, on the INT8
    path, V is past fp16's range), so the call must give the bf16 path's result instead."""
    B, H, LQ, D = q.shape
    LK = k.shape[2]
    nqb = (LQ + block_size - 1) // block_size
    nkb = (LK + block_size - 1) // block_size
    fp8 = precision == "fp8"
    mean, k_levels, k_scales, v_absmax, v_levels = prepass(k, v, kv_len, kv_length, block_size=block_size,
                                                           precision=precision)
    v_scales = (v_absmax / QMAX["fp8"]).contiguous()
    v_levels = k_levels if v_levels is None else v_levels  # INT8: an unread placeholder
    flags = torch.empty(B * H, nqb, device=q.device, dtype=torch.int32)
    cfg = dict(cfg)
    tma, split_acc = cfg.pop("tma"), cfg.pop("split_acc")
    if tma:  # 2D views of the padded copies: every tile is a box inside one head's rows
        descriptor = _tensor_descriptor_class()
        k_levels = descriptor.from_tensor(k_levels.view(-1, D), [cfg["BLOCK_N"], D])
        v_levels = descriptor.from_tensor(v_levels.view(-1, nkb * block_size), [D, cfg["BLOCK_N"]])

    def bstride(t, dim):  # a layout dimension of size 1 is shared: stride 0
        return 0 if t.shape[dim] == 1 else t.stride(dim)

    _block_sparse_8bit_fwd[(nqb, B * H)](
        q, k_levels, k_scales, v, v_levels, v_scales, mean, result, result if lse is None else lse, flags,
        indices, counts, kv_len if kv_len is not None else counts, scale, scale * _LOG2E,
        q.stride(0), q.stride(1), q.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        result.stride(0), result.stride(1), result.stride(2),
        0 if lse is None else lse.stride(0), 0 if lse is None else lse.stride(1),
        bstride(indices, 0), bstride(indices, 1), indices.stride(2), bstride(counts, 0), bstride(counts, 1),
        H, LQ, LK, nkb * block_size, nkb,
        HEAD_DIM=D, BLOCK_M=block_size, KV_BLOCK=block_size, QMAX=QMAX[precision], FP8=fp8, P_SCALE=P_SCALE,
        HAS_KV_LEN=kv_len is not None, MASK_KEYS=kv_len is not None or LK % block_size != 0,
        EVEN_Q=LQ % block_size == 0, RETURN_LSE=lse is not None, UPCAST_DOT=q.device.type == "cpu", TMA=tma,
        SPLIT_ACC=split_acc, **cfg)

    unsafe = flags.any() | k_scales.isnan().any() | ~torch.isfinite(v_absmax).all()
    if not fp8 and v.dtype != torch.float16:
        unsafe |= (v_absmax > FP16_MAX).any()
    return unsafe
