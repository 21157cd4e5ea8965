"""Torch reference for block-sparse attention: the CPU path and the oracle the Triton kernel is tested against.

It computes exactly what the Triton kernel computes (same layout semantics, key-length masking, LSE, zeros for
rows with no key block), in float32, a chunk of query blocks at a time so memory stays O(chunk x kept keys).
"""

from __future__ import annotations

import math

import torch

# Upper bound on the float32 score buffer of one chunk (elements); keeps CPU runs of real shapes in memory.
_CHUNK_ELEMENTS = 1 << 25


def reference_block_sparse_attention(q, k, v, kv_indices, kv_counts, *, block_size, scale=None, kv_length=None,
                                     return_lse=False, out=None):
    """Same contract as :func:`kernels.block_sparse_attention`; inputs are assumed validated."""
    B, H, LQ, D = q.shape
    LK = k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    nkb = (LK + block_size - 1) // block_size
    nqb = (LQ + block_size - 1) // block_size
    pad_k = nkb * block_size - LK
    if kv_indices.shape[-1] == 0:  # all lists empty (counts are 0): one unused slot keeps the reductions non-empty
        kv_indices = kv_indices.new_zeros(*kv_indices.shape[:-1], 1)
    kf = torch.nn.functional.pad(k.float(), (0, 0, 0, pad_k)).view(B, H, nkb, block_size, D)
    vf = torch.nn.functional.pad(v.float(), (0, 0, 0, pad_k)).view(B, H, nkb, block_size, D)
    key_limit = torch.full((B,), LK, device=q.device, dtype=torch.long) if kv_length is None \
        else kv_length.to(device=q.device, dtype=torch.long).clamp(max=LK)
    idx_all = kv_indices.long().expand(B, H, nqb, -1)
    cnt_all = kv_counts.long().expand(B, H, nqb)
    max_kept = idx_all.shape[-1]

    result = torch.empty(B, H, LQ, D, device=q.device, dtype=q.dtype) if out is None else out
    lse = torch.empty(B, H, LQ, device=q.device, dtype=torch.float32) if return_lse else None
    per_block = max(1, B * H * max_kept * block_size * block_size)
    chunk = max(1, _CHUNK_ELEMENTS // per_block)
    slot = torch.arange(max_kept, device=q.device)
    tok = torch.arange(block_size, device=q.device)
    for qb0 in range(0, nqb, chunk):
        qb1 = min(nqb, qb0 + chunk)
        r0, r1 = qb0 * block_size, min(LQ, qb1 * block_size)
        nq = qb1 - qb0
        qc = torch.nn.functional.pad(q[:, :, r0:r1].float(), (0, 0, 0, nq * block_size - (r1 - r0)))
        qc = qc.view(B, H, nq, block_size, D)
        idx = idx_all[:, :, qb0:qb1]                                       # (B, H, nq, M)
        gather = idx[..., None, None].expand(B, H, nq, max_kept, block_size, D).reshape(B, H, nq * max_kept, block_size, D)
        kg = torch.gather(kf, 2, gather).view(B, H, nq, max_kept * block_size, D)
        vg = torch.gather(vf, 2, gather).view(B, H, nq, max_kept * block_size, D)
        key_pos = idx[..., None] * block_size + tok                        # (B, H, nq, M, bs)
        valid = (slot < cnt_all[:, :, qb0:qb1, None])[..., None] & (key_pos < key_limit.view(B, 1, 1, 1, 1))
        valid = valid.reshape(B, H, nq, 1, max_kept * block_size)
        s = torch.matmul(qc, kg.transpose(-1, -2)) * scale                 # (B, H, nq, bs, M*bs)
        s = s.masked_fill(~valid, float("-inf"))
        m = s.amax(dim=-1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        p = torch.exp(s - m)
        l = p.sum(dim=-1, keepdim=True)
        o = torch.matmul(p, vg) / torch.where(l > 0, l, torch.ones_like(l))
        result[:, :, r0:r1] = o.view(B, H, nq * block_size, D)[:, :, : r1 - r0].to(result.dtype)
        if lse is not None:
            row_lse = (m + torch.log(l)).squeeze(-1).view(B, H, nq * block_size)
            lse[:, :, r0:r1] = row_lse[:, :, : r1 - r0]
    return (result, lse) if return_lse else result
