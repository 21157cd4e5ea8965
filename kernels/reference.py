"""Torch reference for block-sparse attention: the CPU path and the oracle the Triton kernel is tested against.

It computes exactly what the Triton kernel computes (same layout semantics, key-length masking, LSE, zeros for
rows with no key block), in float32, a chunk of query blocks at a time so memory stays O(chunk x kept keys).
With ``pooled`` (kernels/pooled_keys.py) every row also gets one virtual key per key block its list skips
(score q.k_mean * scale + ln(size), value v_mean), in the same softmax.
"""

from __future__ import annotations

import math

import torch

# Upper bound on the float32 score buffer of one chunk (elements); keeps CPU runs of real shapes in memory.
_CHUNK_ELEMENTS = 1 << 25


def reference_block_sparse_attention(q, k, v, kv_indices, kv_counts, *, block_size, scale=None, kv_length=None,
                                     return_lse=False, out=None, pooled=None):
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
    lse_c = torch.empty_like(lse) if return_lse and pooled is not None else None
    if pooled is not None:
        k_mean, v_mean = (t.float().expand(B, H, -1, -1) for t in (pooled.keys, pooled.values))
        log_size = pooled.log_size.float().expand(B, H, -1)
    per_block = max(1, B * H * (max_kept + (nkb if pooled is not None else 0)) * block_size * block_size)
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
        if pooled is not None:  # the skipped blocks' virtual keys
            listed = torch.zeros(B, H, nq, nkb + 1, dtype=torch.bool, device=q.device)
            listed.scatter_(-1, torch.where(slot < cnt_all[:, :, qb0:qb1, None], idx, nkb), True)
            sp = torch.matmul(qc, k_mean[:, :, None].transpose(-1, -2)) * scale + log_size[:, :, None, None]
            sp = sp.masked_fill(listed[..., None, :nkb], float("-inf"))
            exact_lse = torch.logsumexp(s, dim=-1, keepdim=True)
            o, _, _ = softmax_rows(s, vg, sp, v_mean[:, :, None])
        else:
            o, m, l = softmax_rows(s, vg)
            if lse is not None:
                exact_lse = m + torch.log(l)
        result[:, :, r0:r1] = o.view(B, H, nq * block_size, D)[:, :, : r1 - r0].to(result.dtype)
        if lse is not None:  # over the exact keys alone
            lse[:, :, r0:r1] = _rows(exact_lse, B, H, r1 - r0)
        if lse_c is not None:  # exactly the exact LSE when every block is kept
            lse_c[:, :, r0:r1] = _rows(torch.logaddexp(exact_lse, torch.logsumexp(sp, dim=-1, keepdim=True)),
                                       B, H, r1 - r0)
    if not return_lse:
        return result
    return (result, lse, lse_c) if pooled is not None else (result, lse)


def softmax_rows(s, values, pooled_scores=None, pooled_values=None, row_term=None):
    """(output, max, denominator) of the rows of scores ``s`` (masked keys -inf) over ``values``; with
    ``pooled_scores`` / ``pooled_values`` the skipped groups' virtual keys join the same softmax, summed apart from
    the exact keys: with every group kept (all -inf) they add exactly nothing (one matmul over the concatenated keys
    rounds differently on a GPU, whatever the extra columns hold). ``row_term``: (score (..., R), value (..., R, D)),
    one more virtual key per row with a value of its own (kernels/skipped_summary.py). A row with no key gives 0."""
    m = s.amax(dim=-1, keepdim=True)
    if pooled_scores is not None:
        m = torch.maximum(m, pooled_scores.amax(dim=-1, keepdim=True))
    if row_term is not None:
        m = torch.maximum(m, row_term[0][..., None])
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s - m)
    l = p.sum(dim=-1, keepdim=True)
    numerator = torch.matmul(p, values)
    if pooled_scores is not None:
        p_pooled = torch.exp(pooled_scores - m)
        l = l + p_pooled.sum(dim=-1, keepdim=True)
        numerator = numerator + torch.matmul(p_pooled, pooled_values)
    if row_term is not None:
        p_row = torch.exp(row_term[0][..., None] - m)
        l = l + p_row
        numerator = numerator + p_row * row_term[1]
    return numerator / torch.where(l > 0, l, torch.ones_like(l)), m, l


def _rows(per_block_rows, B, H, n):
    """(B, H, nq, bs, 1) per-row values -> (B, H, n): the first n rows of the chunk."""
    return per_block_rows.squeeze(-1).view(B, H, -1)[:, :, :n]
