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
enters with its exact mass at c and its own mean of v k^T (within-block weights taken as uniform): the blocks'
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

# summarise_skipped_blocks works on this many bytes of scores (and of each head's block moments) at a time.
CHUNK_BYTES = 64 << 20


def summarise_skipped_blocks(q, k, v, kv_indices, kv_counts, *, block_size: int, scale: float,
                             kv_length=None) -> SkippedSummary:
    """The SkippedSummary of a block-sparse call (kernels.block_sparse_attention's arguments, validated): per
    (batch, head, query block) the skipped keys' term at the block's mean query; no own terms. Keys at or past
    kv_length[b] are in no block. Made a few heads and query blocks at a time, on the device, in q's dtype where
    it is 16-bit (scores, weights and moments in tensor-core matmuls; sums in float32)."""
    B, H, LQ, D = q.shape
    nqb, nkb = -(-LQ // block_size), -(-k.shape[2] // block_size)
    kept = keep_table(kv_indices.expand(B, H, nqb, -1), kv_counts.expand(B, H, nqb), nkb,
                      chunk_bytes=CHUNK_BYTES)[..., :nkb]
    limit = k.shape[2] if kv_length is None else kv_length.to(device=q.device, dtype=torch.long).clamp(0, k.shape[2])
    key_ok = (torch.arange(nkb * block_size, device=q.device) < torch.as_tensor(limit, device=q.device).view(-1, 1))
    key_ok = key_ok.expand(B, -1).view(B, 1, 1, nkb, block_size)
    centre = _block_means(q, block_size)
    per_head = B * (nkb * block_size * D * (4 * q.element_size()) + (nkb + nqb) * D * D * 4)
    step = max(1, CHUNK_BYTES // per_head)
    parts = [_summarise_heads(centre[:, h0:h0 + step], k[:, h0:h0 + step], v[:, h0:h0 + step],
                              kept[:, h0:h0 + step], key_ok, scale) for h0 in range(0, H, step)]
    log_weight, key, value, slope = (torch.cat(t, dim=1) for t in zip(*parts))
    none = torch.zeros(B, H, nqb, dtype=torch.int32, device=q.device)
    return SkippedSummary(none[..., None].contiguous(), none, centre, log_weight, key, value, slope)


def _summarise_heads(centre, k, v, kept, key_ok, scale):
    """(log W, k_w, v_w, scale C^T) of these heads' query blocks (module docstring)."""
    B, H, nqb, D = centre.shape
    nkb, block_size = key_ok.shape[-2:]
    dtype = k.dtype
    pad = (0, 0, 0, nkb * block_size - k.shape[2])
    valid = key_ok.reshape(B, 1, -1, 1)
    count = valid.sum(2, keepdim=True).clamp(min=1)
    # Keys and values centred on their means (padding 0): C's products keep their digits in a 16-bit dtype.
    mean_k, mean_v = ((torch.nn.functional.pad(t, pad).float() * valid).sum(2, keepdim=True) / count for t in (k, v))
    kc, vc = ((torch.nn.functional.pad(t.float() - m, pad) * valid).to(dtype) for t, m in ((k, mean_k), (v, mean_v)))
    size = key_ok.sum(-1).clamp(min=1)                                                    # (B, 1, 1, NKB)
    blocks = lambda t: t.view(B, H, nkb, block_size, D)  # noqa: E731
    moments = ((blocks(kc).transpose(-1, -2) @ blocks(vc)).float() / size[:, :, 0, :, None, None]).to(dtype)
    moments = moments.flatten(-2)                                                         # (B, H, NKB, D * D)
    log_weight = torch.empty(B, H, nqb, device=k.device)
    key, value = (torch.empty(B, H, nqb, D, device=k.device) for _ in range(2))
    slope = torch.empty(B, H, nqb, D, D, device=k.device, dtype=dtype)
    rows = max(1, CHUNK_BYTES // (B * H * nkb * block_size * 8))                          # scores and weights
    for r0 in range(0, nqb, rows):
        qb = slice(r0, min(nqb, r0 + rows))
        c = centre[:, :, qb]
        s = (c.to(dtype) @ kc.transpose(-1, -2)).float() * scale + (c * mean_k).sum(-1, keepdim=True) * scale
        s = s.view(B, H, -1, nkb, block_size).masked_fill(kept[:, :, qb, :, None] | ~key_ok, float("-inf"))
        lw = torch.logsumexp(s.flatten(-2), dim=-1)
        w = torch.exp(s - lw[..., None, None]).nan_to_num(0.0)          # a query block that skips nothing: all 0
        mass = w.sum(-1)                                                                  # each block's share
        w = w.flatten(-2).to(dtype)
        k_w, v_w = (w @ kc).float(), (w @ vc).float()                                     # centred
        gram = (mass.to(dtype) @ moments).float().view(*mass.shape[:3], D, D)
        log_weight[:, :, qb] = lw
        share = mass.sum(-1, keepdim=True)                                                # 1, or 0: nothing skipped
        key[:, :, qb], value[:, :, qb] = k_w + mean_k * share, v_w + mean_v * share
        slope[:, :, qb] = ((gram - k_w[..., :, None] * v_w[..., None, :]) * scale).to(dtype)
    return log_weight, key, value, slope


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
