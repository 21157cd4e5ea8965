"""Torch reference for cluster (variable-size block) attention: the CPU path and the twin of the Triton kernel.

Each query row looks up its query cluster, each key its key cluster (keys past ``k_offsets[..., -1]`` belong to
none), and a (query cluster, key cluster) keep table decides which scores survive. Attention is then dense and
masked, in float32, a chunk of query rows at a time, so memory stays O(chunk x LK) whatever the cluster sizes.
This costs the dense work; it is the path for CPUs, float32 and checking, not for speed. With ``pooled``
(kernels/pooled_keys.py) every row also gets one virtual key per key cluster its query cluster skips (with a
summary, kernels/skipped_summary.py: per listed one, and one for the rest). Tokens given in their own order with
the cluster orders are gathered into cluster order here, and the results scattered back.
"""

from __future__ import annotations

import math

import torch

from .reference import softmax_rows

# Upper bound on the float32 score buffer of one chunk of rows (elements).
_CHUNK_ELEMENTS = 1 << 25


def token_clusters(offsets: torch.Tensor, length: int) -> torch.Tensor:
    """(B, H, length) int64 cluster of every token for (B, H, C + 1) offsets; tokens at or past the last
    offset get C (no cluster). Empty clusters own no token."""
    positions = torch.arange(length, device=offsets.device).expand(*offsets.shape[:-1], length).contiguous()
    # The last offset <= the position, counted from the right: an empty cluster's start equals the next one's.
    return torch.searchsorted(offsets.long().contiguous(), positions, right=True) - 1


def keep_table(kv_clusters: torch.Tensor, kv_cluster_counts: torch.Tensor, num_key_clusters: int,
               dtype: torch.dtype = torch.bool, chunk_bytes: int | None = None) -> torch.Tensor:
    """(B, H, CQ, CK + 1) ``dtype``: query cluster c keeps key cluster j (True / 1); the extra last column (keys in
    no cluster) is always empty. Entries of kv_clusters past the count are ignored, whatever their value. Any list
    of groups works the same (a fixed-block layout's key blocks per query block). ``chunk_bytes``: the scatter's
    int64 ids (8 bytes per list entry) are made for that many bytes of heads at a time; None: all at once."""
    B, H = kv_clusters.shape[:2]
    width = kv_clusters.shape[-1]
    table = torch.zeros(*kv_clusters.shape[:-1], num_key_clusters + 1, dtype=dtype, device=kv_clusters.device)
    slots = torch.arange(width, device=kv_clusters.device)
    per_head = 8 * B * math.prod(kv_clusters.shape[2:])
    step = H if chunk_bytes is None else max(1, chunk_bytes // max(1, per_head))
    for h in range(0, H, step):
        part = slice(h, h + step)
        ids = torch.where(slots < kv_cluster_counts[:, part, ..., None].long(), kv_clusters[:, part].long(),
                          num_key_clusters)  # unused slots: the extra column
        table[:, part].scatter_(-1, ids, 1)
    table[..., num_key_clusters] = 0
    return table


def token_positions(order: torch.Tensor, length: int) -> torch.Tensor:
    """(B, H, length) int64 token at every position of the cluster order: ``order`` (B, H, N), then the tokens
    from N on in their own places (HunyuanVideo's text is not clustered)."""
    B, H, N = order.shape
    tail = torch.arange(N, length, device=order.device).expand(B, H, -1)
    return torch.cat([order.long(), tail], dim=-1)


def _row_index(order: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """token_positions shaped to gather / scatter the rows of (B, H, L[, D]) ``t`` along dim 2."""
    index = token_positions(order, t.shape[2])
    return index if t.ndim == 3 else index[..., None].expand(-1, -1, -1, t.shape[3])


def to_cluster_order(t: torch.Tensor, order: torch.Tensor | None) -> torch.Tensor:
    """Rows of (B, H, L[, D]) ``t`` in cluster order (position i holds token order[..., i]); None: as they are."""
    return t if order is None else torch.gather(t, 2, _row_index(order, t))


def to_token_order(t: torch.Tensor, order: torch.Tensor | None, out: torch.Tensor | None = None) -> torch.Tensor:
    """The inverse of :func:`to_cluster_order`, written into ``out`` (any strides) when given."""
    if order is None:
        return t if out is None else out.copy_(t)
    out = torch.empty_like(t) if out is None else out
    return out.scatter_(2, _row_index(order, t), t)


def reference_cluster_pair_count(q_offsets, k_offsets, kv_clusters, kv_cluster_counts) -> torch.Tensor:
    """(B, H) int64 number of query-key pairs the kept cluster pairs cover; inputs are assumed validated."""
    q_sizes = (q_offsets[..., 1:] - q_offsets[..., :-1]).long()                     # (B, H, CQ)
    k_sizes = (k_offsets[..., 1:] - k_offsets[..., :-1]).long()                     # (B, H, CK)
    used = torch.arange(kv_clusters.shape[-1], device=kv_clusters.device) < kv_cluster_counts[..., None].long()
    if k_sizes.shape[-1] == 0:
        return torch.zeros(q_sizes.shape[:2], dtype=torch.int64, device=q_sizes.device)
    ids = torch.where(used, kv_clusters.long(), 0)
    kept = torch.gather(k_sizes, 2, ids.flatten(2)).view(ids.shape)                 # (B, H, CQ, MAXK)
    return (q_sizes * torch.where(used, kept, 0).sum(-1)).sum(-1)


def reference_cluster_block_attention(q, k, v, q_offsets, k_offsets, kv_clusters, kv_cluster_counts, *, scale=None,
                                      out=None, return_lse=False, pooled=None, summary=None, q_order=None,
                                      k_order=None):
    """Same contract as :func:`kernels.cluster_block_attention` (``summary``: the SkippedSummary it builds from
    ``pooled`` when a row's terms are summarised); inputs are assumed validated."""
    if q_order is not None or k_order is not None:
        result = reference_cluster_block_attention(
            to_cluster_order(q, q_order), to_cluster_order(k, k_order), to_cluster_order(v, k_order), q_offsets,
            k_offsets, kv_clusters, kv_cluster_counts, scale=scale, return_lse=return_lse, pooled=pooled,
            summary=summary)
        outputs = result if return_lse else (result,)
        back = [to_token_order(outputs[0], q_order, out)] + [to_token_order(t, q_order) for t in outputs[1:]]
        return tuple(back) if return_lse else back[0]
    B, H, LQ, D = q.shape
    LK = k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    num_key_clusters = k_offsets.shape[-1] - 1
    table = keep_table(kv_clusters, kv_cluster_counts, num_key_clusters)            # (B, H, CQ, CK + 1)
    row_cluster = token_clusters(q_offsets, LQ)                                     # (B, H, LQ)
    key_cluster = token_clusters(k_offsets, LK)                                     # (B, H, LK)
    kf, vf = k.float(), v.float()

    result = torch.empty(B, H, LQ, D, device=q.device, dtype=q.dtype) if out is None else out
    lse = torch.empty(B, H, LQ, device=q.device, dtype=torch.float32) if return_lse else None
    lse_c = torch.empty_like(lse) if return_lse and pooled is not None else None
    if pooled is not None:
        k_mean, v_mean = (t.float().expand(B, H, -1, -1) for t in (pooled.keys, pooled.values))
        log_size = pooled.log_size.float().expand(B, H, -1)
        # Which skipped clusters get their own term: every one, or with a summary its listed ones (the rest: one)
        own = ~table if summary is None else keep_table(summary.own, summary.own_counts, num_key_clusters)
    chunk = max(1, _CHUNK_ELEMENTS // (B * H * (LK + num_key_clusters)))
    for r0 in range(0, LQ, chunk):
        r1 = min(LQ, r0 + chunk)
        rows_table = torch.gather(table, 2, row_cluster[:, :, r0:r1, None].expand(-1, -1, -1, num_key_clusters + 1))
        allowed = torch.gather(rows_table, 3, key_cluster[:, :, None, :].expand(-1, -1, r1 - r0, -1))
        s = torch.matmul(q[:, :, r0:r1].float(), kf.transpose(-1, -2)) * scale
        s = s.masked_fill(~allowed, float("-inf"))
        if lse is not None:  # over the exact keys alone
            exact_lse = lse[:, :, r0:r1] = torch.logsumexp(s, dim=-1)
        sp = rest = None
        if pooled is not None:  # the skipped clusters' virtual keys
            rows_own = torch.gather(own, 2, row_cluster[:, :, r0:r1, None].expand(-1, -1, -1, num_key_clusters + 1))
            sp = torch.matmul(q[:, :, r0:r1].float(), k_mean.transpose(-1, -2)) * scale + log_size[:, :, None, :]
            sp = sp.masked_fill(~rows_own[..., :num_key_clusters], float("-inf"))
        if summary is not None:  # the rest of them: one virtual key a row
            from .skipped_summary import summary_terms  # (that module takes keep_table from this one)

            rest = summary_terms(q[:, :, r0:r1], summary, row_cluster[:, :, r0:r1], scale)
        o, _, _ = softmax_rows(s, vf, sp, v_mean if pooled is not None else None, rest)
        result[:, :, r0:r1] = o.to(result.dtype)
        if lse_c is not None:  # = exact_lse when every cluster is kept
            lse_c[:, :, r0:r1] = torch.logaddexp(exact_lse, torch.logsumexp(sp, dim=-1))
            if rest is not None:
                lse_c[:, :, r0:r1] = torch.logaddexp(lse_c[:, :, r0:r1], rest[0])
    if not return_lse:
        return result
    return (result, lse, lse_c) if pooled is not None else (result, lse)
