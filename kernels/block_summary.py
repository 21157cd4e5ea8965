"""Compensation of the key blocks a fixed-block layout skips: one term per row, exact at its query block's mean query.

A first-order term per skipped block (kernels/pooled_keys.py: size x exp(q.k_mean * scale), value v_mean) stands for
a block by its mean key and mean value. A block of adjacent tokens is no cluster: its keys spread (on the proxy their
mean squared distance to the block's mean is half their squared norm, against a third for SVG2's key clusters), so
exp(q.k_mean) under-counts the block's mass by a different factor per block and its mean value is not what the
attention over it averages. On the proxy that term made a block layout's call worse than dropping the skipped
blocks in few-step runs (benchmarks/compensation_terms.py, RESULTS.md, issue 17).

Here every skipped key of a query block is summed exactly at the block's mean query c, token by token, and moved to
each row's own query q to first order, as kernels/skipped_summary.py moves its rest term:

    score(q) = ln W + scale (q - c).k_w          W = sum_skipped exp(scale c.k_j), w_j = exp(scale c.k_j) / W
    value(q) = v_w + scale C (q - c)             k_w = sum w_j k_j,  v_w = sum w_j v_j

C, the derivative of the weighted mean value in the query, is sum w_j (v_j - v_w)(k_j - k_w)^T over the skipped
tokens; exactly it would cost a dense pass of D x D per key (as much as the attention itself), so each skipped block
enters with its exact mass at c and its own mean of (k - mean k)(v - mean v)^T (within-block weights taken as
uniform; centred on the keys' and values' means, which on the proxy made it as close as the exact C): the blocks'
second moments, D x D each, are made once per call and mixed per query block by one matmul. What is exact at c
costs one query row per query block against every key, about 1 / block_size of a dense call.

The term joins a row after its kernel has run (fold_summary): the kernel returns each row's output and LSE over the
keys it computed, and one virtual key more is one more softmax merge, exactly. So the kernel itself is the plain one,
launched once over every head at full occupancy, and the summary is made and folded in a few heads at a time.
"""

from __future__ import annotations

import torch

from .cluster_reference import keep_table
from .skipped_summary import SkippedSummary

# The reference pass works on this many bytes of (mean queries x keys) scores at a time.
CHUNK_BYTES = 64 << 20


def summary_head_bytes(batch: int, q_length: int, k_length: int, head_dim: int, block_size: int,
                       element_size: int) -> int:
    """Peak bytes per head of summarise_skipped_blocks and fold_summary: the keys and values in float32 twice (as
    they are, centred), each key block's moment in float32 and q's dtype, each query block's slope the same, the
    fold's float32 rows twice."""
    nqb, nkb = -(-q_length // block_size), -(-k_length // block_size)
    square = head_dim * head_dim * (4 + element_size)
    return batch * (16 * nkb * block_size * head_dim + (nkb + nqb) * square + 8 * q_length * head_dim)


def summarise_skipped_blocks(q, k, v, kv_indices, kv_counts, *, block_size: int, scale: float, kv_length=None,
                             backend: str = "auto") -> SkippedSummary:
    """The SkippedSummary of a block-sparse call (kernels.block_sparse_attention's arguments, validated): per
    (batch, head, query block) the skipped keys' term at the block's mean query; no own terms. Keys at or past
    kv_length[b] are in no block. The pass at the mean queries runs in Triton (kernels/block_summary_triton.py) or,
    on the reference backend, in torch; the slopes are one matmul of the blocks' shares with their moments. Every
    head given at once (summary_head_bytes each: block_sparse_attention gives it a few at a time)."""
    from .attention import padded_head_dim, resolve_backend

    B, H, LQ, D = q.shape
    LK = k.shape[2]
    nqb, nkb = -(-LQ // block_size), -(-LK // block_size)
    limit = torch.full((B,), LK, device=q.device, dtype=torch.int32) if kv_length is None \
        else kv_length.to(device=q.device, dtype=torch.int32).clamp(0, LK)
    key_ok = (torch.arange(nkb * block_size, device=q.device) < limit[:, None]).view(B, 1, nkb, block_size, 1)
    pad = (0, 0, 0, nkb * block_size - LK)
    kb, vb = (torch.nn.functional.pad(t.float(), pad).view(B, H, nkb, block_size, D) * key_ok for t in (k, v))
    kept = keep_table(kv_indices.expand(B, H, nqb, -1), kv_counts.expand(B, H, nqb), nkb,
                      dtype=torch.uint8)[..., :nkb].reshape(B * H, nqb, nkb).contiguous()
    centre = _block_means(q, block_size)
    if resolve_backend(backend, q.device, q.dtype) == "triton":
        from .block_summary_triton import triton_centre_pass  # (imports Triton: only where it runs)

        dims = (0, padded_head_dim(D) - D)                        # zeros: the scores do not move
        padded = (torch.nn.functional.pad(t, dims) for t in (centre, k, v)) if dims[1] else (centre, k, v)
        log_weight, key, value, share = triton_centre_pass(*padded, kept, limit, block_size, scale)
        key, value = key[..., :D], value[..., :D]
    else:
        log_weight, key, value, share = _reference_centre_pass(centre, kb, vb, kept, key_ok, scale)
    slope = _slope(key, value, share, kb, vb, key_ok, scale, q.dtype)
    none = torch.zeros(B, H, nqb, dtype=torch.int32, device=q.device)
    return SkippedSummary(none[..., None].contiguous(), none, centre, log_weight, key, value, slope)


def _reference_centre_pass(centre, kb, vb, kept, key_ok, scale):
    """Torch version of kernels.block_summary_triton.triton_centre_pass, on the keys and values as float32 blocks
    (B, H, NKB, block_size, D), padding 0 and masked by ``key_ok`` (B, 1, NKB, block_size, 1)."""
    B, H, nqb, D = centre.shape
    nkb, block_size = kb.shape[2:4]
    kept = kept.view(B, H, nqb, nkb, 1).bool()
    key_ok = key_ok[:, :, None, :, :, 0]                                                  # (B, 1, 1, NKB, bs)
    kf, vf = kb.flatten(2, 3), vb.flatten(2, 3)
    log_weight = torch.empty(B, H, nqb, device=kb.device)
    key, value = (torch.empty(B, H, nqb, D, device=kb.device) for _ in range(2))
    share = torch.empty(B, H, nqb, nkb, device=kb.device)
    rows = max(1, CHUNK_BYTES // (B * H * nkb * block_size * 8))                          # scores and weights
    for r0 in range(0, nqb, rows):
        qb = slice(r0, min(nqb, r0 + rows))
        s = (centre[:, :, qb] @ kf.transpose(-1, -2) * scale).view(B, H, -1, nkb, block_size)
        s = s.masked_fill(kept[:, :, qb] | ~key_ok, float("-inf"))
        lw = torch.logsumexp(s.flatten(-2), dim=-1)
        w = torch.exp(s - lw[..., None, None]).nan_to_num(0.0)          # a query block that skips nothing: all 0
        log_weight[:, :, qb], share[:, :, qb] = lw, w.sum(-1)
        key[:, :, qb], value[:, :, qb] = w.flatten(-2) @ kf, w.flatten(-2) @ vf
    return log_weight, key, value, share


def _slope(key, value, share, kb, vb, key_ok, scale, dtype):
    """scale C^T: C from each skipped block's own mean of (k - mean k)(v - mean v)^T, weighted by its share of W at
    the mean query (module docstring), in ``dtype`` (centred: the products keep their digits)."""
    B, H, nqb, D = key.shape
    count = key_ok.sum((2, 3), keepdim=True).clamp(min=1)
    mean_k, mean_v = (t.sum((2, 3), keepdim=True) / count for t in (kb, vb))             # (B, H, 1, 1, D)
    kc, vc = ((t - m) * key_ok for t, m in ((kb, mean_k), (vb, mean_v)))
    size = key_ok.sum(3, keepdim=True).clamp(min=1)                                       # (B, 1, NKB, 1, 1)
    moments = (kc.to(dtype).transpose(-1, -2) @ vc.to(dtype)).float() / size             # (B, H, NKB, D, D)
    gram = (share.to(dtype) @ moments.to(dtype).flatten(-2)).float().view(B, H, nqb, D, D)
    present = share.sum(-1, keepdim=True)                                                 # 1, or 0: nothing skipped
    k_w, v_w = key - mean_k[:, :, 0] * present, value - mean_v[:, :, 0] * present        # centred
    return ((gram - k_w[..., :, None] * v_w[..., None, :]) * scale).to(dtype)


def fold_summary(out, lse, q, summary: SkippedSummary, *, block_size: int, scale: float) -> torch.Tensor:
    """Merge the summary's virtual key into each row's softmax, in place: ``out`` (B, H, L, D) and ``lse`` (B, H, L)
    float32 the rows' output and LSE over the keys computed exactly (a row with none: 0 and -inf). Returns the LSE
    with the term. Each row's value is its query block's v_w + (q - c) @ slope: one batched matmul per block."""
    B, H, L, D = q.shape
    nqb = summary.log_weight.shape[-1]
    pad = nqb * block_size - L
    blocks = lambda t: torch.nn.functional.pad(t, (0, 0, 0, pad)).view(B, H, nqb, block_size, -1)  # noqa: E731
    delta = blocks(q.float()) - summary.centre[..., None, :]
    score = summary.log_weight[..., None] + scale * (delta @ summary.key[..., :, None])[..., 0]
    value = summary.value[..., None, :] + (delta.to(summary.slope.dtype) @ summary.slope).float()
    score, value = score.flatten(2, 3)[..., :L], value.flatten(2, 3)[:, :, :L]
    total = torch.logaddexp(lse, score)
    none = torch.isneginf(total)                                         # no key and nothing skipped: stays 0, -inf
    keep, add = (torch.exp(t - total).masked_fill(none, 0.0)[..., None] for t in (lse, score))
    out.copy_(out.float() * keep + value * add)
    return total


def _block_means(x, block_size: int) -> torch.Tensor:
    """(B, H, NB, D) float32 mean of each block of rows of (B, H, L, D) ``x`` (the last one partial)."""
    B, H, L, D = x.shape
    nb = -(-L // block_size)
    sums = torch.nn.functional.pad(x.float(), (0, 0, 0, nb * block_size - L)).view(B, H, nb, block_size, D).sum(3)
    sizes = (L - torch.arange(nb, device=x.device) * block_size).clamp(max=block_size)
    return sums / sizes[:, None]
