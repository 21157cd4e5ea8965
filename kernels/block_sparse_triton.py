"""Triton forward kernel for block-sparse attention over (batch, head, query block) key-block lists.

One program owns one query block of one (batch, head): it loads the query tile once, walks the key blocks of
its list with a flash-attention online softmax (exp2 with the scale folded into log2(e)), and writes the output
tile and, on request, the natural-log LSE of every row. Key blocks wider than the compute tile are walked as
sub-tiles, so the layout block (128) and the tile shape (picked per GPU) are independent.

Programs of the same (batch, head) are adjacent in launch order, so the K/V blocks they share stay in L2.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .cluster_reference import keep_table

_LOG2E = 1.4426950408889634
_LOG2E_C = tl.constexpr(_LOG2E)
_LN2 = tl.constexpr(0.6931471805599453)  # globals read inside @triton.jit must be constexpr
# A finite "minus infinity" for the running max: a tile whose keys are all masked then gives exp2(-inf) = 0
# instead of exp2(-inf - -inf) = NaN.
_NEG_BIG = tl.constexpr(-1.0e30)
_KEPT_TABLE_CHUNK_BYTES = 16 << 20  # kept_table's int64 ids at a time
WIDE_TILE_MAX_FRACTION = 0.3  # _wide_tile_pays: between the measured 0.25 (wins) and 0.50 (loses)


@triton.jit
def _mask_keys(s, start, offs_n, key_limit, BLOCK_N: tl.constexpr, MASK_KEYS: tl.constexpr):
    """Scores of keys at or past key_limit become -inf; only the tile holding the end of the keys pays for it."""
    if MASK_KEYS:
        if start + BLOCK_N > key_limit:
            s = tl.where((start + offs_n)[None, :] < key_limit, s, float("-inf"))
    return s


@triton.jit
def _softmax_step(q, k_t, v, start, offs_n, key_limit, qk_scale, m_i, l_i, acc, BLOCK_N: tl.constexpr,
                  MASK_KEYS: tl.constexpr):
    """One key tile (keys start + offs_n) of the flash-attention online softmax; k_t is (HEAD_DIM, BLOCK_N)."""
    s = _mask_keys(tl.dot(q, k_t), start, offs_n, key_limit, BLOCK_N, MASK_KEYS)
    return _softmax_update(s, v, qk_scale, m_i, l_i, acc)


@triton.jit
def _softmax_update(s, v, qk_scale, m_i, l_i, acc):
    """Fold a tile of raw scores s (BLOCK_M, BLOCK_N; masked keys -inf) and its values into the running max,
    sum and output accumulator. Also returns the tile's row sums of exp2(score - new running max).

    The running max is in scaled log2 units, so the scale folds into the exp2 argument: one FMA per score and
    no separate scaling pass over the tile."""
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    p = tl.math.exp2(s * qk_scale - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    p_sum = tl.sum(p, 1)
    l_i = l_i * alpha + p_sum
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    return m_new, l_i, acc, p_sum


@triton.jit
def _softmax_update_scaled(t, v, m_i, l_i, acc):
    """_softmax_update for scores already in scaled log2 units (t = s * qk_scale + a log2 weight; -inf: none)."""
    m_new = tl.maximum(m_i, tl.max(t, 1))
    p = tl.math.exp2(t - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    return m_new, l_i, acc


@triton.jit
def _compensate_skipped(q, KM, VM, LOGN, bh, G, kept_row, qk_scale, m_i, l_i, acc,
                        HEAD_DIM: tl.constexpr, BLOCK_P: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """Fold every pooled key group (kernels/pooled_keys.py) that the row's list does not keep (``kept_row``: G
    bytes, 1 where kept) into the online softmax: one virtual key per group, score q.k_mean * scale + ln(size),
    value v_mean, BLOCK_P groups per tile. KM, VM: (B * H, G, HEAD_DIM) contiguous; LOGN: (B * H, G) float32."""
    offs_p = tl.arange(0, BLOCK_P)
    offs_d = tl.arange(0, HEAD_DIM)
    base = bh.to(tl.int64) * G
    for p0 in range(0, G, BLOCK_P):
        groups = p0 + offs_p
        in_range = groups < G
        kept = tl.load(kept_row + groups, mask=in_range, other=1)
        log_size = tl.load(LOGN + base + groups, mask=in_range, other=float("-inf"))
        km = tl.load(KM + (base + groups)[None, :] * HEAD_DIM + offs_d[:, None], mask=in_range[None, :], other=0.0)
        vm = tl.load(VM + (base + groups)[:, None] * HEAD_DIM + offs_d[None, :], mask=in_range[:, None], other=0.0)
        if UPCAST_DOT:
            km = km.to(tl.float32)
            vm = vm.to(tl.float32)
        t = tl.dot(q, km) * qk_scale + (log_size * _LOG2E_C)[None, :]
        t = tl.where((kept == 0)[None, :], t, float("-inf"))
        m_i, l_i, acc = _softmax_update_scaled(t, vm, m_i, l_i, acc)
    return m_i, l_i, acc


@triton.jit
def _finish_rows(q, KM, VM, LOGN, LSE_C, bh, G, kept_row, qk_scale, m_i, l_i, acc, lse_rows, lse_mask,
                 HEAD_DIM: tl.constexpr, BLOCK_P: tl.constexpr,
                 UPCAST_DOT: tl.constexpr, COMPENSATE: tl.constexpr, RETURN_LSE: tl.constexpr):
    """(output, exact LSE) of the rows; with COMPENSATE the output also holds the skipped groups' pooled terms,
    and with RETURN_LSE their LSE with those terms is stored at LSE_C + lse_rows. The exact LSE stays the LSE
    over the keys computed exactly."""
    out, lse = _row_results(acc, m_i, l_i)
    if COMPENSATE:
        m_i, l_i, acc = _compensate_skipped(q, KM, VM, LOGN, bh, G, kept_row, qk_scale, m_i, l_i, acc,
                                            HEAD_DIM, BLOCK_P, UPCAST_DOT)
        out, lse_c = _row_results(acc, m_i, l_i)
        if RETURN_LSE:
            tl.store(LSE_C + lse_rows, lse_c, mask=lse_mask)
    return out, lse


@triton.jit
def _load_queries(q_base, offs_m, offs_d, stride_ql, LQ, EVEN_Q: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """The (BLOCK_M, HEAD_DIM) query tile of rows offs_m; rows past LQ read as zeros."""
    q_ptrs = q_base + offs_m[:, None] * stride_ql + offs_d[None, :]
    if EVEN_Q:
        q = tl.load(q_ptrs)
    else:
        q = tl.load(q_ptrs, mask=offs_m[:, None] < LQ, other=0.0)
    if UPCAST_DOT:
        q = q.to(tl.float32)
    return q


@triton.jit
def _load_keys(k_base, cols, offs_d, stride_kl, LK, MASKED: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """K^T of keys ``cols``, (HEAD_DIM, BLOCK_N); with MASKED, keys past LK read as zeros."""
    k_ptrs = k_base + cols[None, :] * stride_kl + offs_d[:, None]
    if MASKED:
        k = tl.load(k_ptrs, mask=cols[None, :] < LK, other=0.0)
    else:
        k = tl.load(k_ptrs)
    if UPCAST_DOT:
        k = k.to(tl.float32)
    return k


@triton.jit
def _load_values(v_base, cols, offs_d, stride_vl, LK, MASKED: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """V of keys ``cols``, (BLOCK_N, HEAD_DIM); with MASKED, keys past LK read as zeros."""
    v_ptrs = v_base + cols[:, None] * stride_vl + offs_d[None, :]
    if MASKED:
        v = tl.load(v_ptrs, mask=cols[:, None] < LK, other=0.0)
    else:
        v = tl.load(v_ptrs)
    if UPCAST_DOT:
        v = v.to(tl.float32)
    return v


@triton.jit
def _store_rows(o_base, out, offs_m, offs_d, stride_ol, LQ, EVEN_Q: tl.constexpr):
    """Write a (BLOCK_M, HEAD_DIM) output tile; rows past LQ are not written."""
    o_ptrs = o_base + offs_m[:, None] * stride_ol + offs_d[None, :]
    if EVEN_Q:
        tl.store(o_ptrs, out.to(o_base.dtype.element_ty))
    else:
        tl.store(o_ptrs, out.to(o_base.dtype.element_ty), mask=offs_m[:, None] < LQ)


@triton.jit
def _row_results(acc, m_i, l_i):
    """Normalised output and natural-log LSE; rows with no key (l_i == 0) give 0 and -inf."""
    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    return out, (m_i + tl.math.log2(l_i)) * _LN2


@triton.jit
def _program_layout(KV_IDX, KV_CNT, KV_LEN, stride_ib, stride_ih, stride_iq, stride_cb, stride_ch, H, LK,
                    HAS_KV_LEN: tl.constexpr):
    """(batch, head, query block, index-list base, count, key limit) of this program."""
    qb = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    idx_base = KV_IDX + b * stride_ib + h * stride_ih + qb * stride_iq
    count = tl.load(KV_CNT + b * stride_cb + h * stride_ch + qb)
    key_limit = LK
    if HAS_KV_LEN:
        key_limit = tl.minimum(tl.load(KV_LEN + b), LK)
    return b, h, qb, idx_base, count, key_limit


@triton.jit
def _block_sparse_fwd(
    Q, K, V, O, LSE, KV_IDX, KV_CNT, KV_LEN, KM, VM, LOGN, LSE_C, KEPT,
    qk_scale,
    stride_qb, stride_qh, stride_ql,
    stride_kb, stride_kh, stride_kl,
    stride_vb, stride_vh, stride_vl,
    stride_ob, stride_oh, stride_ol,
    stride_ib, stride_ih, stride_iq,
    stride_cb, stride_ch,
    H, LQ, LK, G,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, KV_BLOCK: tl.constexpr,
    HAS_KV_LEN: tl.constexpr, MASK_KEYS: tl.constexpr, EVEN_Q: tl.constexpr, RETURN_LSE: tl.constexpr,
    UPCAST_DOT: tl.constexpr, COMPENSATE: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Portable variant (any GPU Triton supports): pointer loads, boundary masks where lengths are ragged."""
    b, h, qb, idx_base, count, key_limit = _program_layout(
        KV_IDX, KV_CNT, KV_LEN, stride_ib, stride_ih, stride_iq, stride_cb, stride_ch, H, LK, HAS_KV_LEN)
    b = b.to(tl.int64)  # b * stride_qb passes 2**31 elements at large batches of 720p video: int32 would wrap
    offs_m = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_N)
    q = _load_queries(Q + b * stride_qb + h * stride_qh, offs_m, offs_d, stride_ql, LQ, EVEN_Q, UPCAST_DOT)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh

    m_i = tl.full([BLOCK_M], _NEG_BIG, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    SUB_TILES: tl.constexpr = KV_BLOCK // BLOCK_N
    for it in range(0, count * SUB_TILES):
        kb = tl.load(idx_base + it // SUB_TILES)
        start = kb * KV_BLOCK + (it % SUB_TILES) * BLOCK_N
        cols = start + offs_n
        k = _load_keys(k_base, cols, offs_d, stride_kl, LK, MASK_KEYS, UPCAST_DOT)
        v = _load_values(v_base, cols, offs_d, stride_vl, LK, MASK_KEYS, UPCAST_DOT)
        m_i, l_i, acc, _ = _softmax_step(q, k, v, start, offs_n, key_limit, qk_scale, m_i, l_i, acc, BLOCK_N,
                                         MASK_KEYS)

    kept_row = KEPT + ((b * H + h).to(tl.int64) * tl.num_programs(0) + qb) * G  # this query block's kept table row
    out, lse = _finish_rows(q, KM, VM, LOGN, LSE_C, b * H + h, G, kept_row, qk_scale, m_i, l_i, acc,
                            (b * H + h) * LQ + offs_m, offs_m < LQ, HEAD_DIM, BLOCK_P, UPCAST_DOT,
                            COMPENSATE, RETURN_LSE)
    _store_rows(O + b * stride_ob + h * stride_oh, out, offs_m, offs_d, stride_ol, LQ, EVEN_Q)
    if RETURN_LSE:
        lse_ptrs = LSE + (b * H + h) * LQ + offs_m
        if EVEN_Q:
            tl.store(lse_ptrs, lse)
        else:
            tl.store(lse_ptrs, lse, mask=offs_m < LQ)


@triton.jit
def _block_sparse_fwd_tma(
    q_desc, k_desc, v_desc, o_desc, LSE, KV_IDX, KV_CNT, KV_LEN, KM, VM, LOGN, LSE_C, KEPT,
    qk_scale,
    stride_ib, stride_ih, stride_iq,
    stride_cb, stride_ch,
    H, LQ, LK, G,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, KV_BLOCK: tl.constexpr,
    HAS_KV_LEN: tl.constexpr, MASK_KEYS: tl.constexpr, RETURN_LSE: tl.constexpr, UPCAST_DOT: tl.constexpr,
    COMPENSATE: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Hopper+ variant: 4D tensor descriptors (B, H, L, D) feed tiles through the TMA copy engine, which
    zero-fills rows past the end on loads and clips them on stores, so no boundary masks on the loads."""
    b, h, qb, idx_base, count, key_limit = _program_layout(
        KV_IDX, KV_CNT, KV_LEN, stride_ib, stride_ih, stride_iq, stride_cb, stride_ch, H, LK, HAS_KV_LEN)
    q = q_desc.load([b, h, qb * BLOCK_M, 0]).reshape(BLOCK_M, HEAD_DIM)
    if UPCAST_DOT:
        q = q.to(tl.float32)
    offs_n = tl.arange(0, BLOCK_N)

    m_i = tl.full([BLOCK_M], _NEG_BIG, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    SUB_TILES: tl.constexpr = KV_BLOCK // BLOCK_N
    for it in range(0, count * SUB_TILES):
        kb = tl.load(idx_base + it // SUB_TILES)
        start = kb * KV_BLOCK + (it % SUB_TILES) * BLOCK_N
        k = k_desc.load([b, h, start, 0]).reshape(BLOCK_N, HEAD_DIM)
        v = v_desc.load([b, h, start, 0]).reshape(BLOCK_N, HEAD_DIM)
        if UPCAST_DOT:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        m_i, l_i, acc, _ = _softmax_step(q, tl.trans(k), v, start, offs_n, key_limit, qk_scale, m_i, l_i, acc,
                                         BLOCK_N, MASK_KEYS)

    offs_m = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    kept_row = KEPT + ((b * H + h).to(tl.int64) * tl.num_programs(0) + qb) * G  # this query block's kept table row
    out, lse = _finish_rows(q, KM, VM, LOGN, LSE_C, b * H + h, G, kept_row, qk_scale, m_i, l_i, acc,
                            (b * H + h) * LQ + offs_m, offs_m < LQ, HEAD_DIM, BLOCK_P, UPCAST_DOT,
                            COMPENSATE, RETURN_LSE)
    o_desc.store([b, h, qb * BLOCK_M, 0], out.to(o_desc.dtype).reshape(1, 1, BLOCK_M, HEAD_DIM))
    if RETURN_LSE:
        tl.store(LSE + (b * H + h) * LQ + offs_m, lse, mask=offs_m < LQ)


def _tile_config(head_dim: int, block_size: int, device: torch.device, wide: bool = False) -> dict:
    """Tile shape, pipelining and load path per GPU generation (measured: benchmarks/RESULTS.md); ``wide``: the
    tile for scattered lists over keys that overflow L2 (see _wide_tile_pays)."""
    if device.type != "cuda":  # Triton's CPU interpreter (tests): any valid shape will do
        return dict(BLOCK_N=min(block_size, 64), num_warps=4, num_stages=1, tma=False)
    major, _ = torch.cuda.get_device_capability(device)
    hopper = major >= 9
    if hopper and wide:  # 128-wide key tiles over two warpgroups, three stages in flight
        return dict(BLOCK_N=128, num_warps=8, num_stages=3, tma=True)
    if hopper:  # H100 sweep (benchmarks/RESULTS.md): 64-wide key tiles, one warpgroup, TMA loads
        return dict(BLOCK_N=64, num_warps=4, num_stages=2, tma=True)
    return dict(BLOCK_N=64, num_warps=4, num_stages=3 if head_dim <= 64 else 2, tma=False)


def _wide_tile_pays(k: torch.Tensor, block_size: int, list_width: int) -> bool:
    """Whether a layout the caller calls scattered runs faster on the wide tile: on Hopper, at head_dim and block
    128, when one head's keys and values overflow L2 (so a scattered list's key tiles come from HBM and want more
    loads in flight) and the lists are short (at most WIDE_TILE_MAX_FRACTION of the key blocks; above it the
    default tile's more resident programs win). Measured on the H100 at HunyuanVideo 720p, random layouts:
    0.89 -> 0.92 of SDPA's throughput at density 0.25, 0.83 -> 0.89 at 0.10, 0.98 -> 0.88 at 0.50; banded lists and
    Wan 14B's 75,600 tokens (a head's keys fit L2) lose on it (benchmarks/RESULTS.md)."""
    if k.device.type != "cuda" or k.shape[-1] != 128 or block_size != 128:
        return False
    if torch.cuda.get_device_capability(k.device)[0] != 9:  # measured on Hopper; its shared memory holds the tile
        return False
    head_kv_bytes = 2 * k.shape[2] * k.shape[3] * k.element_size()
    key_blocks = -(-k.shape[2] // block_size)
    return head_kv_bytes > _l2_bytes(k.device) and list_width <= WIDE_TILE_MAX_FRACTION * key_blocks


@functools.lru_cache(maxsize=None)
def _l2_bytes(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).L2_cache_size


def _tensor_descriptor_class():
    try:  # Triton >= 3.4; older Triton keeps the pointer kernel
        from triton.tools.tensor_descriptor import TensorDescriptor
    except ImportError:
        return None
    return TensorDescriptor


def _tma_compatible(*tensors) -> bool:
    """TMA needs 16-byte aligned base addresses and strides (all but the innermost)."""
    return all(t.data_ptr() % 16 == 0 and all((st * t.element_size()) % 16 == 0 for st in t.stride()[:-1])
               for t in tensors)


def triton_block_sparse_attention(q, k, v, kv_indices, kv_counts, *, block_size, scale, kv_length=None,
                                  return_lse=False, out=None, config=None, pooled=None, scattered=False):
    """Launch the kernel. Inputs are assumed validated; head_dim must be a power of two in [16, 128].

    ``config``: BLOCK_N, num_warps, num_stages and tma (use the TMA variant), default per GPU and layout.
    ``scattered``: the caller's word that the lists are scattered over the keys, not bands (the kernel cannot tell
    without reading them back); at long sequences such lists take a wider tile (_wide_tile_pays).
    ``pooled``: PooledKeys of the key blocks (head dim as q's): each row also gets the pooled term of every block
    its list skips; with return_lse the result is then (out, exact LSE, compensated LSE).
    """
    B, H, LQ, D = q.shape
    LK = k.shape[2]
    nqb = (LQ + block_size - 1) // block_size
    if out is None:
        out = torch.empty(B, H, LQ, D, device=q.device, dtype=q.dtype)
    lse = torch.empty(B, H, LQ, device=q.device, dtype=torch.float32) if return_lse else out  # dummy when unused
    kv_indices = kv_indices.to(torch.int32)
    kv_counts = kv_counts.to(torch.int32)
    compensation = _compensation_args(pooled, q, return_lse, lse, kv_indices, kv_counts)
    if kv_indices.stride(-1) != 1:
        kv_indices = kv_indices.contiguous()
    if kv_counts.stride(-1) != 1:
        kv_counts = kv_counts.contiguous()
    has_len = kv_length is not None
    kv_len = kv_length.to(device=q.device, dtype=torch.int32).contiguous() if has_len else kv_counts
    if config is None:
        wide = scattered and _wide_tile_pays(k, block_size, kv_indices.shape[-1])
        config = _tile_config(D, block_size, q.device, wide)
    cfg = dict(config)
    if block_size % cfg["BLOCK_N"]:
        raise ValueError(f"config BLOCK_N={cfg['BLOCK_N']} must divide the layout block size {block_size}")
    descriptor = _tensor_descriptor_class() if cfg.pop("tma", False) else None
    if descriptor is not None and not _tma_compatible(q, k, v, out):
        descriptor = None

    def bstride(t, dim):  # a layout dimension of size 1 is shared: stride 0
        return 0 if t.shape[dim] == 1 else t.stride(dim)

    layout_strides = (bstride(kv_indices, 0), bstride(kv_indices, 1), kv_indices.stride(2),
                      bstride(kv_counts, 0), bstride(kv_counts, 1))
    common = dict(HEAD_DIM=D, BLOCK_M=block_size, KV_BLOCK=block_size, HAS_KV_LEN=has_len,
                  MASK_KEYS=has_len or LK % block_size != 0, RETURN_LSE=return_lse,
                  # Triton's CPU interpreter computes bfloat16 tl.dot wrongly (3.6 and 3.8): float32 tiles there.
                  UPCAST_DOT=q.device.type == "cpu", **compensation["constants"], **cfg)
    pooled_args = compensation["tensors"]
    if descriptor is not None:
        q_desc, o_desc = (descriptor.from_tensor(t, [1, 1, block_size, D]) for t in (q, out))
        k_desc, v_desc = (descriptor.from_tensor(t, [1, 1, cfg["BLOCK_N"], D]) for t in (k, v))
        _block_sparse_fwd_tma[(nqb, B * H)](
            q_desc, k_desc, v_desc, o_desc, lse, kv_indices, kv_counts, kv_len, *pooled_args, scale * _LOG2E,
            *layout_strides, H, LQ, LK, compensation["groups"], **common)
    else:
        _block_sparse_fwd[(nqb, B * H)](
            q, k, v, out, lse, kv_indices, kv_counts, kv_len, *pooled_args, scale * _LOG2E,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            out.stride(0), out.stride(1), out.stride(2),
            *layout_strides, H, LQ, LK, compensation["groups"], EVEN_Q=LQ % block_size == 0, **common)
    if not return_lse:
        return out
    return (out, lse, compensation["lse"]) if pooled is not None else (out, lse)


def _compensation_args(pooled, q, return_lse, lse, lists, counts) -> dict:
    """Kernel arguments of the compensation: pooled tensors (B * H, G, D) contiguous in q's dtype (what tl.dot
    multiplies), their LSE buffer, the kept table of the rows' ``lists`` / ``counts`` ((B or 1, H or 1, R, n) /
    (B or 1, H or 1, R): R list rows, each its query block's or query cluster's; None: none, a SkippedSummary lists
    the groups instead), the tile constants. Without ``pooled`` the pointers are dummies the kernel never reads."""
    B, H, _, _ = q.shape
    dtype, device = q.dtype, q.device
    if pooled is None:
        return dict(tensors=(lse, lse, lse, lse, lse), groups=0, lse=None, constants=dict(COMPENSATE=False, BLOCK_P=16))
    keys, values = (t.expand(B, H, -1, -1).to(dtype).contiguous() for t in (pooled.keys, pooled.values))
    log_size = pooled.log_size.float().expand(B, H, -1).contiguous()
    groups = log_size.shape[-1]
    lse_c = torch.empty_like(lse) if return_lse else log_size  # dummy when unused
    # 32 groups per tile on a GPU: at 64 the pooled tiles push the 4-warp kernel past 255 registers a thread (it
    # spills; H100, Wan 14B 720p, density 0.25: the compensated kernel 59.3 ms at 64, 56.1 at 32, 56.7 at 16, 189 at
    # 128; benchmarks/compensation_cost.py --anatomy). 16, the least tl.dot takes, on the CPU interpreter.
    constants = dict(COMPENSATE=True, BLOCK_P=32 if device.type == "cuda" else 16)
    kept = log_size if lists is None else kept_table(lists, counts, groups, B, H)  # None: a summary lists them
    return dict(tensors=(keys, values, log_size, lse_c, kept), groups=groups,
                lse=lse_c if return_lse else None, constants=constants)


def kept_table(lists: torch.Tensor, counts: torch.Tensor, groups: int, batch: int, heads: int) -> torch.Tensor:
    """(B * H, R, groups) uint8, contiguous: 1 where a row's list keeps the group. Built once per call, so each program
    reads which pooled groups its row skips (G bytes) instead of matching every group against its whole list (G x
    count compares; what it saved, and where the cost was instead: RESULTS.md). A few heads at a time: the
    scatter's int64 ids are 8 bytes per list entry (96 MB for SVG2's lists at Wan 14B 720p, all heads at once)."""
    R, width = lists.shape[-2:]
    table = keep_table(lists.expand(batch, heads, R, width), counts.expand(batch, heads, R), groups,
                       dtype=torch.uint8, chunk_bytes=_KEPT_TABLE_CHUNK_BYTES)
    return table[..., :groups].reshape(batch * heads, R, groups).contiguous()
