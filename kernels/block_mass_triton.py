"""Triton kernels for the exact attention mass of (query block, key block) tiles, the quantity AdaSpa ranks by:
mass[qb, kb] = sum over the tile's rows r and keys j of exp(q_r . k_j * scale - LSE_r).

* ``_block_mass_fwd``: the mass against a given LSE (the paper's LSE-cached search): one sweep of QK^T, each
  score exponentiated against its row's LSE.
* ``_dense_mass_fwd``: dense flash attention (the call's output and each row's LSE) that yields the masses in
  the same sweep over K/V. With a cached LSE a tile's mass is the flash row sums times exp2(running max - cached
  LSE), a few operations per row. Without one, each row's log-sum-exp over each key block goes to a scratch
  buffer and ``_mass_from_block_lse`` turns it into masses once the row's LSE is known: exact, still one sweep.

A program owns BLOCK_M (128) query rows of one (batch, head), i.e. BLOCK_M // MASS_BLOCK query blocks of the
mass grid, and walks key blocks of MASS_BLOCK keys as MASS_BLOCK // BLOCK_N tiles. The per-row values of GROUP
consecutive key blocks are gathered in registers and summed over rows once per group: the reduction across
warps is then paid once per GROUP key blocks, not once per tile.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .block_sparse_triton import (_LOG2E, _NEG_BIG, _load_keys, _load_queries, _load_values, _mask_keys,
                                  _row_results, _softmax_step, _store_rows, _tile_config)

BLOCK_M = 128
GROUP = 16
# Bytes of float32 scratch (one value per query row and key block) the exact one-sweep mode may hold at once;
# larger calls run a few heads per launch.
SCRATCH_BYTES = 1 << 30


@triton.jit
def _row_reference(lse_ptrs, row_ok):
    """A row's LSE in scaled log2 units; rows past the end or without any key weigh 0 (reference +inf)."""
    lse = tl.load(lse_ptrs, mask=row_ok, other=float("-inf"))
    return tl.where(lse > float("-inf"), lse * 1.4426950408889634, float("inf"))


@triton.jit
def _keep_column(group, val, col, GROUP: tl.constexpr):
    """Put the per-row values of one key block into column ``col`` of the (BLOCK_M, GROUP) register group."""
    return tl.where(tl.arange(0, GROUP)[None, :] == col, val[:, None], group)


@triton.jit
def _store_group_mass(mass_base, group, qt, g0, NQB, NKB, BLOCK_M: tl.constexpr, MASS_BLOCK: tl.constexpr,
                      GROUP: tl.constexpr):
    """Sum a (BLOCK_M, GROUP) group of per-row masses over the rows of each query block; store key blocks g0.."""
    QB_PER_TILE: tl.constexpr = BLOCK_M // MASS_BLOCK
    if QB_PER_TILE == 1:
        sums = tl.sum(group, 0)[None, :]
    else:
        sums = tl.sum(tl.reshape(group, [QB_PER_TILE, MASS_BLOCK, GROUP]), 1)
    qb = qt * QB_PER_TILE + tl.arange(0, QB_PER_TILE)
    kb = g0 + tl.arange(0, GROUP)
    tl.store(mass_base + qb[:, None] * NKB + kb[None, :], sums, mask=(qb[:, None] < NQB) & (kb[None, :] < NKB))


@triton.jit
def _mass_block(q, k_base, start, offs_n, offs_d, stride_kl, LK, key_limit, qk_scale, ref, BLOCK_N: tl.constexpr,
                SUB: tl.constexpr, MASKED: tl.constexpr, MASK_KEYS: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """Per-row mass of one key block (SUB tiles from ``start``) against the rows' LSE (``ref``, log2 units)."""
    val = tl.zeros_like(ref)
    for sub in tl.static_range(SUB):
        tile = start + sub * BLOCK_N
        k = _load_keys(k_base, tile + offs_n, offs_d, stride_kl, LK, MASKED, UPCAST_DOT)
        s = _mask_keys(tl.dot(q, k), tile, offs_n, key_limit, BLOCK_N, MASK_KEYS)
        val += tl.sum(tl.math.exp2(s * qk_scale - ref[:, None]), 1)
    return val


@triton.jit
def _block_mass_fwd(
    Q, K, LSE, MASS, KV_LEN, qk_scale,
    stride_qb, stride_qh, stride_ql, stride_kb, stride_kh, stride_kl,
    H, LQ, LK, NQB, NKB,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASS_BLOCK: tl.constexpr,
    GROUP: tl.constexpr, HAS_KV_LEN: tl.constexpr, EVEN_Q: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    """Masses of rows qt*BLOCK_M.. of (b, h) = divmod(program_id(1), H) against LSE ((B*H, LQ) contiguous)."""
    qt = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    offs_m = qt * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_N)
    q = _load_queries(Q + b * stride_qb + h * stride_qh, offs_m, offs_d, stride_ql, LQ, EVEN_Q, UPCAST_DOT)
    k_base = K + b * stride_kb + h * stride_kh
    ref = _row_reference(LSE + bh.to(tl.int64) * LQ + offs_m, offs_m < LQ)
    key_limit = LK
    if HAS_KV_LEN:
        key_limit = tl.minimum(tl.load(KV_LEN + b), LK)
    mass_base = MASS + bh.to(tl.int64) * NQB * NKB

    SUB: tl.constexpr = MASS_BLOCK // BLOCK_N
    group = tl.zeros([BLOCK_M, GROUP], dtype=tl.float32)
    full_blocks = LK // MASS_BLOCK  # key blocks with no key past LK: loads need no mask
    for kb in range(0, full_blocks):
        val = _mass_block(q, k_base, kb * MASS_BLOCK, offs_n, offs_d, stride_kl, LK, key_limit, qk_scale, ref,
                          BLOCK_N, SUB, False, HAS_KV_LEN, UPCAST_DOT)
        group = _keep_column(group, val, kb % GROUP, GROUP)
        if (kb % GROUP == GROUP - 1) & (kb != NKB - 1):
            _store_group_mass(mass_base, group, qt, kb - kb % GROUP, NQB, NKB, BLOCK_M, MASS_BLOCK, GROUP)
    if full_blocks < NKB:  # the ragged last key block
        val = _mass_block(q, k_base, full_blocks * MASS_BLOCK, offs_n, offs_d, stride_kl, LK, key_limit, qk_scale,
                          ref, BLOCK_N, SUB, True, True, UPCAST_DOT)
        group = _keep_column(group, val, full_blocks % GROUP, GROUP)
    last = NKB - 1
    _store_group_mass(mass_base, group, qt, last - last % GROUP, NQB, NKB, BLOCK_M, MASS_BLOCK, GROUP)


@triton.jit
def _dense_mass_block(q, k_base, v_base, start, offs_n, offs_d, stride_kl, stride_vl, LK, key_limit, qk_scale,
                      m_i, l_i, acc, ref, BLOCK_N: tl.constexpr, SUB: tl.constexpr, MASKED: tl.constexpr,
                      MASK_KEYS: tl.constexpr, CACHED: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """Flash-attention steps over one key block (SUB tiles from ``start``) and the block's per-row value: the
    mass against the cached LSE (CACHED), else the row's log2-sum-exp over the block."""
    val = tl.zeros_like(m_i)
    for sub in tl.static_range(SUB):
        tile = start + sub * BLOCK_N
        k = _load_keys(k_base, tile + offs_n, offs_d, stride_kl, LK, MASKED, UPCAST_DOT)
        v = _load_values(v_base, tile + offs_n, offs_d, stride_vl, LK, MASKED, UPCAST_DOT)
        m_old = m_i
        m_i, l_i, acc, p_sum = _softmax_step(q, k, v, tile, offs_n, key_limit, qk_scale, m_i, l_i, acc, BLOCK_N,
                                             MASK_KEYS)
        if CACHED:
            val += p_sum * tl.math.exp2(m_i - ref)
        else:  # block sum relative to the running max, rescaled as it grows
            val = val * tl.math.exp2(m_old - m_i) + p_sum
    if not CACHED:
        val = m_i + tl.math.log2(val)
    return m_i, l_i, acc, val


@triton.jit
def _flush_group(mass_base, blse_base, group, qt, g0, NQB, NKB, BLOCK_M: tl.constexpr, MASS_BLOCK: tl.constexpr,
                 GROUP: tl.constexpr, CACHED: tl.constexpr):
    if CACHED:
        _store_group_mass(mass_base, group, qt, g0, NQB, NKB, BLOCK_M, MASS_BLOCK, GROUP)
    else:
        cols = g0 + tl.arange(0, GROUP)
        rows = tl.arange(0, BLOCK_M)
        tl.store(blse_base + cols[None, :] * BLOCK_M + rows[:, None], group, mask=cols[None, :] < NKB)


@triton.jit
def _dense_mass_fwd(
    Q, K, V, O, LSE, LSE_IN, MASS, BLSE, KV_LEN, qk_scale,
    stride_qb, stride_qh, stride_ql, stride_kb, stride_kh, stride_kl, stride_vb, stride_vh, stride_vl,
    stride_ob, stride_oh, stride_ol,
    H, LQ, LK, NQB, NKB,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASS_BLOCK: tl.constexpr,
    GROUP: tl.constexpr, HAS_KV_LEN: tl.constexpr, EVEN_Q: tl.constexpr, CACHED: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    """Dense attention over all keys of rows qt*BLOCK_M.. of (b, h) = divmod(program_id(1), H); LSE, LSE_IN and
    MASS are contiguous (B*H, ...) views of this launch's heads, BLSE its (B*H, NQT, NKB, BLOCK_M) scratch."""
    qt = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    offs_m = qt * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_N)
    q = _load_queries(Q + b * stride_qb + h * stride_qh, offs_m, offs_d, stride_ql, LQ, EVEN_Q, UPCAST_DOT)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    row_ok = offs_m < LQ
    ref = tl.zeros([BLOCK_M], dtype=tl.float32)
    if CACHED:
        ref = _row_reference(LSE_IN + bh.to(tl.int64) * LQ + offs_m, row_ok)
    key_limit = LK
    if HAS_KV_LEN:
        key_limit = tl.minimum(tl.load(KV_LEN + b), LK)
    mass_base = MASS + bh.to(tl.int64) * NQB * NKB
    blse_base = BLSE + (bh.to(tl.int64) * tl.cdiv(LQ, BLOCK_M) + qt) * NKB * BLOCK_M

    SUB: tl.constexpr = MASS_BLOCK // BLOCK_N
    m_i = tl.full([BLOCK_M], _NEG_BIG, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    group = tl.zeros([BLOCK_M, GROUP], dtype=tl.float32)
    full_blocks = LK // MASS_BLOCK  # key blocks with no key past LK: loads need no mask
    for kb in range(0, full_blocks):
        m_i, l_i, acc, val = _dense_mass_block(q, k_base, v_base, kb * MASS_BLOCK, offs_n, offs_d, stride_kl,
                                               stride_vl, LK, key_limit, qk_scale, m_i, l_i, acc, ref, BLOCK_N,
                                               SUB, False, HAS_KV_LEN, CACHED, UPCAST_DOT)
        group = _keep_column(group, val, kb % GROUP, GROUP)
        if (kb % GROUP == GROUP - 1) & (kb != NKB - 1):
            _flush_group(mass_base, blse_base, group, qt, kb - kb % GROUP, NQB, NKB, BLOCK_M, MASS_BLOCK, GROUP,
                         CACHED)
    if full_blocks < NKB:  # the ragged last key block
        m_i, l_i, acc, val = _dense_mass_block(q, k_base, v_base, full_blocks * MASS_BLOCK, offs_n, offs_d,
                                               stride_kl, stride_vl, LK, key_limit, qk_scale, m_i, l_i, acc, ref,
                                               BLOCK_N, SUB, True, True, CACHED, UPCAST_DOT)
        group = _keep_column(group, val, full_blocks % GROUP, GROUP)
    last = NKB - 1
    _flush_group(mass_base, blse_base, group, qt, last - last % GROUP, NQB, NKB, BLOCK_M, MASS_BLOCK, GROUP, CACHED)

    out, lse = _row_results(acc, m_i, l_i)
    _store_rows(O + b * stride_ob + h * stride_oh, out, offs_m, offs_d, stride_ol, LQ, EVEN_Q)
    tl.store(LSE + bh.to(tl.int64) * LQ + offs_m, lse, mask=row_ok)


@triton.jit
def _mass_from_block_lse(BLSE, LSE, MASS, LQ, NQB, NKB, BLOCK_M: tl.constexpr, MASS_BLOCK: tl.constexpr,
                         GROUP: tl.constexpr):
    """mass[qb, kb] = sum over the block's rows of exp2(block log2-sum-exp - row LSE), GROUP key blocks a step."""
    qt = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    rows = tl.arange(0, BLOCK_M)
    offs_m = qt * BLOCK_M + rows
    ref = _row_reference(LSE + bh * LQ + offs_m, offs_m < LQ)
    blse_base = BLSE + (bh * tl.cdiv(LQ, BLOCK_M) + qt) * NKB * BLOCK_M
    mass_base = MASS + bh * NQB * NKB
    for g0 in range(0, NKB, GROUP):
        cols = g0 + tl.arange(0, GROUP)
        blse = tl.load(blse_base + cols[None, :] * BLOCK_M + rows[:, None], mask=cols[None, :] < NKB,
                       other=float("-inf"))
        _store_group_mass(mass_base, tl.math.exp2(blse - ref[:, None]), qt, g0, NQB, NKB, BLOCK_M, MASS_BLOCK,
                          GROUP)


def _launch_config(head_dim: int, device: torch.device) -> dict:
    """The block-sparse kernel's tile choice for 128-row query tiles (BLOCK_N divides both mass block sizes)."""
    cfg = _tile_config(head_dim, BLOCK_M, device)
    cfg.pop("tma")
    return cfg


def triton_block_mass(q, k, lse, *, block_size, scale, kv_length=None):
    """Launch ``_block_mass_fwd``. Inputs validated; head_dim a power of two in [16, 128]; lse (B, H, LQ)."""
    B, H, LQ, D = q.shape
    LK = k.shape[2]
    nqb, nkb = triton.cdiv(LQ, block_size), triton.cdiv(LK, block_size)
    mass = torch.empty(B, H, nqb, nkb, device=q.device, dtype=torch.float32)
    lse = lse.to(torch.float32).contiguous()
    kv_len = kv_length.to(device=q.device, dtype=torch.int32).contiguous() if kv_length is not None else lse
    _block_mass_fwd[(triton.cdiv(LQ, BLOCK_M), B * H)](
        q, k, lse, mass, kv_len, scale * _LOG2E,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        H, LQ, LK, nqb, nkb,
        HEAD_DIM=D, BLOCK_M=BLOCK_M, MASS_BLOCK=block_size, GROUP=GROUP, HAS_KV_LEN=kv_length is not None,
        EVEN_Q=LQ % BLOCK_M == 0, UPCAST_DOT=q.device.type == "cpu", **_launch_config(D, q.device))
    return mass


def triton_dense_attention_with_mass(q, k, v, *, block_size, scale, cached_lse=None, kv_length=None, out=None,
                                     config=None):
    """Launch ``_dense_mass_fwd`` (and, without a cached LSE, ``_mass_from_block_lse``): (out, lse, mass).

    ``config``: BLOCK_N, num_warps, num_stages and GROUP of the search pass, default per GPU (a tuning knob for
    benchmarks/adaspa_overhead.py --configs)."""
    B, H, LQ, D = q.shape
    LK = k.shape[2]
    nqt, nqb, nkb = triton.cdiv(LQ, BLOCK_M), triton.cdiv(LQ, block_size), triton.cdiv(LK, block_size)
    if out is None:
        out = torch.empty(B, H, LQ, D, device=q.device, dtype=q.dtype)
    lse = torch.empty(B, H, LQ, device=q.device, dtype=torch.float32)
    mass = torch.empty(B, H, nqb, nkb, device=q.device, dtype=torch.float32)
    cached = cached_lse is not None
    lse_in = cached_lse.to(torch.float32).contiguous() if cached else lse
    kv_len = kv_length.to(device=q.device, dtype=torch.int32).contiguous() if kv_length is not None else lse
    cfg = {"GROUP": GROUP, **(_launch_config(D, q.device) if config is None else config)}
    if block_size % cfg["BLOCK_N"]:
        raise ValueError(f"config BLOCK_N={cfg['BLOCK_N']} must divide the layout block size {block_size}")
    meta = dict(HEAD_DIM=D, BLOCK_M=BLOCK_M, MASS_BLOCK=block_size, HAS_KV_LEN=kv_length is not None,
                EVEN_Q=LQ % BLOCK_M == 0, CACHED=cached, UPCAST_DOT=q.device.type == "cpu", **cfg)
    # The exact mode keeps one float per query row and key block until the row's LSE is known: bound that scratch
    # by running a few heads per launch (the cached mode needs none: one launch).
    row_bytes = B * nqt * BLOCK_M * nkb * 4
    heads_per_launch = H if cached else max(1, min(H, SCRATCH_BYTES // row_bytes))
    blse = lse if cached else torch.empty(B * heads_per_launch * nqt * nkb * BLOCK_M, device=q.device,
                                          dtype=torch.float32)
    for h0 in range(0, H, heads_per_launch):
        part = slice(h0, min(H, h0 + heads_per_launch))
        hp = part.stop - part.start
        qp, kp, vp, op = q[:, part], k[:, part], v[:, part], out[:, part]
        # Per-row outputs of this launch's heads as contiguous (B * hp, ...) tensors, copied into place after.
        lse_p = lse if hp == H else torch.empty(B, hp, LQ, device=q.device, dtype=torch.float32)
        mass_p = mass if hp == H else torch.empty(B, hp, nqb, nkb, device=q.device, dtype=torch.float32)
        lse_in_p = lse_in if hp == H else lse_in[:, part].contiguous()
        _dense_mass_fwd[(nqt, B * hp)](
            qp, kp, vp, op, lse_p, lse_in_p, mass_p, blse, kv_len, scale * _LOG2E,
            qp.stride(0), qp.stride(1), qp.stride(2), kp.stride(0), kp.stride(1), kp.stride(2),
            vp.stride(0), vp.stride(1), vp.stride(2), op.stride(0), op.stride(1), op.stride(2),
            hp, LQ, LK, nqb, nkb, **meta)
        if not cached:
            _mass_from_block_lse[(nqt, B * hp)](blse, lse_p, mass_p, LQ, nqb, nkb, BLOCK_M=BLOCK_M,
                                                MASS_BLOCK=block_size, GROUP=cfg["GROUP"])
        if hp != H:
            lse[:, part].copy_(lse_p)
            mass[:, part].copy_(mass_p)
    return out, lse, mass
