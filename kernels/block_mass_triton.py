"""Triton kernel for the exact attention mass of (query block, key block) tiles, the quantity AdaSpa ranks by:
mass[qb, kb] = sum over the tile's rows r and keys j of exp(q_r . k_j * scale - LSE_r), against a given LSE (the
dense pass's of this call at a first search, the cached one at a later search): one sweep of QK^T, no V.

A program owns BLOCK_M (128) query rows of one (batch, head), i.e. BLOCK_M // MASS_BLOCK query blocks of the
mass grid, and walks key blocks of MASS_BLOCK keys as MASS_BLOCK // BLOCK_N tiles. The per-row values of GROUP
consecutive key blocks are gathered in registers and summed over rows once per group: the reduction across
warps is then paid once per GROUP key blocks, not once per tile.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .block_sparse_triton import _LOG2E, _load_keys, _load_queries, _mask_keys, _tile_config

BLOCK_M = 128
GROUP = 16


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

