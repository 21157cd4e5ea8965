"""Public entry point for cluster (variable-size block) attention, SVG2's kernel: validation, backend choice,
head-dim padding. The Triton kernel is in cluster_triton.py, the torch reference in cluster_reference.py.

Clusters are contiguous runs of positions in cluster order, described by offsets; each query cluster lists the key
clusters it keeps. Tokens arrive either already in cluster order, or in their own order with the cluster orders
(q_order, k_order): the kernel then reads each row and writes each output row through the orders, so no permuted
copy of q, k, v or of the output is ever made (SVG2 at Wan 14B 720p: 3 GB of copies for one call of 40 heads).
"""

from __future__ import annotations

import math

import torch

from .attention import (check_pooled, check_triton_head_dim, pad_pooled, resolve_backend, run_padded_head_dim,
                        shared_memory_guard, validate_qkv)
from .cluster_reference import reference_cluster_block_attention, reference_cluster_pair_count
from .pooled_keys import PooledKeys
from .skipped_summary import SUMMARY_CHUNK_BYTES, pad_summary, summarise_skipped, summary_head_bytes

_INDEX_DTYPES = (torch.int32, torch.int64)


def cluster_block_attention(q, k, v, q_offsets, k_offsets, kv_clusters, kv_cluster_counts, *, scale=None,
                            out=None, backend="auto", return_lse=False, check_layout=True, pooled=None,
                            own_terms=None, q_order=None, k_order=None):
    """Attention where each query cluster attends only to its kept key clusters.

    Args:
        q: (B, H, LQ, D); k, v: (B, H, LK, D). float16 / bfloat16 (float32 on the reference backend), contiguous
            last dimension, any other strides.
        q_offsets: (B, H, CQ + 1) int32, non-decreasing, first 0, last LQ: query cluster c is the rows
            q_offsets[..., c]:q_offsets[..., c + 1]. Clusters may be empty, of size 1, or larger than any tile.
        k_offsets: (B, H, CK + 1) int32, non-decreasing, first 0, last <= LK: keys past the last offset are
            never attended (e.g. padding).
        kv_clusters: (B, H, CQ, MAXK) int32 key-cluster ids; the first kv_cluster_counts[b, h, c] entries of
            row c are used and must be distinct; the entries after them are ignored (any value).
        kv_cluster_counts: (B, H, CQ) int32.
        scale: softmax scale, default 1 / sqrt(D).
        out: optional (B, H, LQ, D) output buffer (any strides, contiguous last dimension).
        backend: 'auto' (Triton on CUDA, reference elsewhere), 'triton' or 'reference'.
        return_lse: also return the natural-log log-sum-exp of each query row, (B, H, LQ) float32.
        check_layout: verify the offsets, counts and ids (reads them back: device syncs). Planners that built
            the clusters themselves may pass False.
        pooled: optional PooledKeys of the key clusters (kernels.pool_key_clusters of the same k, v, k_offsets and
            k_order): compensation of skipped keys. Every non-empty key cluster a query cluster does not keep adds its
            pooled term (size x exp(q.k_mean * scale), value v_mean) to each of its rows' softmax.
        own_terms: with ``pooled``, how many of a query cluster's skipped key clusters keep their own term (the
            heaviest at its mean query); the others are summed into one term per row (kernels/skipped_summary.py:
            ``own_terms`` + 1 terms a row instead of one per skipped cluster). None: every one its own term.
        q_order, k_order: optional (both or neither) int32 (B, H, NQ) / (B, H, NK) cluster orders of tokens given
            in their own order: position i of the cluster order is token order[..., i] (positions from N on are the
            tokens themselves: HunyuanVideo's text, which is not clustered). Offsets then count positions in cluster
            order, and the output and LSE come in the tokens' own order. Each must be a permutation of 0..N-1
            (not checked: reading it back would wait for the device). Without them q, k, v are in cluster order.

    Rows whose query cluster keeps no key (or only empty clusters) give 0 and an LSE of -inf, never NaN (with
    ``pooled``: the pooled terms alone, 0 and -inf when there are none).
    Returns out (B, H, LQ, D) [, lse (B, H, LQ) over the keys computed exactly [, the compensated lse with
    ``pooled``]].
    """
    B, H, LQ, D, LK = validate_qkv(q, k, v, out)
    validate_clusters(q_offsets, k_offsets, kv_clusters, kv_cluster_counts, batch=B, heads=H, device=q.device,
                      q_length=LQ, k_length=LK, check_values=check_layout)
    check_pooled(pooled, B, H, k_offsets.shape[-1] - 1, D, q.device, "key clusters")
    if (q_order is None) != (k_order is None):
        raise ValueError("give both q_order and k_order (tokens in their own order), or neither (tokens already in "
                         "cluster order)")
    validate_order(q_order, "q_order", B, H, LQ, q.device)
    validate_order(k_order, "k_order", B, H, LK, q.device)
    if own_terms is not None and (pooled is None or isinstance(own_terms, bool) or not isinstance(own_terms, int)
                                  or own_terms < 0):
        raise ValueError(f"own_terms must be a count >= 0 given with pooled (or None), got {own_terms!r}"
                         + ("" if pooled is not None else " without pooled"))
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    kind = resolve_backend(backend, q.device, q.dtype)
    layout = (q_offsets, k_offsets, kv_clusters, kv_cluster_counts)
    if own_terms is None or not pooled.groups:
        return _attend(q, k, v, layout, out, pooled, None, q_order, k_order, scale, kind, return_lse)
    # A summary holds a D x D slope per query cluster (10 MB a head at Wan 14B 720p) and is built from one per key
    # cluster: a few heads at a time.
    step = max(1, SUMMARY_CHUNK_BYTES // summary_head_bytes(B, q_offsets.shape[-1] - 1, pooled.groups, D,
                                                            q.element_size()))
    out = torch.empty(B, H, LQ, D, device=q.device, dtype=q.dtype) if out is None else out
    lses = []
    for h0 in range(0, H, step):
        part = slice(h0, min(H, h0 + step))
        heads = lambda t: t if t is None or t.shape[1] == 1 else t[:, part]  # noqa: E731
        part_pooled = PooledKeys(*map(heads, (pooled.keys, pooled.values, pooled.log_size)))
        part_layout = tuple(map(heads, layout))
        part_q_offsets, _, part_lists, part_counts = part_layout
        summary = summarise_skipped(q[:, part], part_pooled, part_q_offsets, part_lists, part_counts, scale=scale,
                                    own_terms=own_terms, q_order=heads(q_order), backend=kind)
        result = _attend(q[:, part], k[:, part], v[:, part], part_layout, out[:, part], part_pooled, summary,
                         heads(q_order), heads(k_order), scale, kind, return_lse)
        if return_lse:
            lses.append(result[1:])
    return (out, *(torch.cat(rows, dim=1) for rows in zip(*lses))) if return_lse else out


def _attend(q, k, v, layout, out, pooled, summary, q_order, k_order, scale, kind, return_lse):
    """One launch of the chosen backend over every head given (validated)."""
    orders = dict(q_order=q_order, k_order=k_order)
    if kind == "reference":
        return reference_cluster_block_attention(q, k, v, *layout, scale=scale, out=out, return_lse=return_lse,
                                                 pooled=pooled, summary=summary, **orders)
    check_triton_head_dim(q.shape[-1])
    from .cluster_triton import triton_cluster_attention

    def launch(q, k, v, out):
        return triton_cluster_attention(q, k, v, *layout, scale=scale, out=out, return_lse=return_lse,
                                        pooled=pad_pooled(pooled, q.shape[-1]),
                                        summary=pad_summary(summary, q.shape[-1]), **orders)

    with shared_memory_guard("use backend 'reference'"):
        return run_padded_head_dim(launch, q, k, v, out, return_lse)


def cluster_pair_count(q_offsets, k_offsets, kv_clusters, kv_cluster_counts, *, check_layout=True) -> torch.Tensor:
    """(B, H) int64 number of query-key pairs the call computes (density = pairs / (LQ * k_offsets[..., -1]))."""
    if not isinstance(q_offsets, torch.Tensor) or q_offsets.ndim != 3:
        raise ValueError("q_offsets must be a (B, H, CQ + 1) integer tensor, got "
                         f"{tuple(q_offsets.shape) if isinstance(q_offsets, torch.Tensor) else type(q_offsets)}")
    validate_clusters(q_offsets, k_offsets, kv_clusters, kv_cluster_counts, batch=q_offsets.shape[0],
                      heads=q_offsets.shape[1], device=q_offsets.device, check_values=check_layout)
    return reference_cluster_pair_count(q_offsets, k_offsets, kv_clusters, kv_cluster_counts)


def validate_order(order, name: str, batch: int, heads: int, length: int, device) -> None:
    """An optional cluster order: int32 (batch, heads, N) with 1 <= N <= length, on the queries' device."""
    if order is None:
        return
    if not isinstance(order, torch.Tensor) or order.dtype != torch.int32 or order.ndim != 3 \
            or order.shape[:2] != (batch, heads) or not 1 <= order.shape[2] <= length or order.device != device:
        raise ValueError(f"{name} must be an int32 ({batch}, {heads}, N) tensor with 1 <= N <= {length} on {device}, "
                         f"got {getattr(order, 'dtype', type(order).__name__)} "
                         f"{tuple(order.shape) if isinstance(order, torch.Tensor) else ''}"
                         + ("" if not isinstance(order, torch.Tensor) or order.device == device
                            else f" on {order.device}"))


def validate_clusters(q_offsets, k_offsets, kv_clusters, kv_cluster_counts, *, batch, heads, device,
                      q_length=None, k_length=None, check_values=True):
    """Raise ValueError naming the argument when the cluster description cannot be run as given.

    Shapes, dtypes and devices are always checked; ``check_values`` also checks the offsets, counts and ids
    (each a device sync). ``q_length`` / ``k_length``: the last offsets' bounds, when known."""
    named = (("q_offsets", q_offsets), ("k_offsets", k_offsets), ("kv_clusters", kv_clusters),
             ("kv_cluster_counts", kv_cluster_counts))
    for name, t in named:
        if not isinstance(t, torch.Tensor) or t.dtype not in _INDEX_DTYPES:
            raise ValueError(f"{name} must be an int32 (or int64) tensor, got "
                             f"{t.dtype if isinstance(t, torch.Tensor) else type(t).__name__}")
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but q is on {device}; move the clusters to the queries' device")
    if q_offsets.ndim != 3 or q_offsets.shape[:2] != (batch, heads) or q_offsets.shape[2] < 2:
        raise ValueError(f"q_offsets must have shape ({batch}, {heads}, CQ + 1) with CQ >= 1, "
                         f"got {tuple(q_offsets.shape)}")
    cq = q_offsets.shape[2] - 1
    if k_offsets.ndim != 3 or k_offsets.shape[:2] != (batch, heads) or k_offsets.shape[2] < 1:
        raise ValueError(f"k_offsets must have shape ({batch}, {heads}, CK + 1), got {tuple(k_offsets.shape)}")
    ck = k_offsets.shape[2] - 1
    if kv_cluster_counts.shape != (batch, heads, cq):
        raise ValueError(f"kv_cluster_counts must have shape ({batch}, {heads}, {cq}) (one count per query cluster), "
                         f"got {tuple(kv_cluster_counts.shape)}")
    if kv_clusters.ndim != 4 or kv_clusters.shape[:3] != (batch, heads, cq):
        raise ValueError(f"kv_clusters must have shape ({batch}, {heads}, {cq}, MAXK), got {tuple(kv_clusters.shape)}")
    if not check_values:
        return
    _check_offsets("q_offsets", q_offsets, q_length, exact_end=True)
    _check_offsets("k_offsets", k_offsets, k_length, exact_end=False)
    max_kept = kv_clusters.shape[3]
    cmin, cmax = int(kv_cluster_counts.min()), int(kv_cluster_counts.max())
    if cmin < 0 or cmax > max_kept:
        raise ValueError(f"kv_cluster_counts must lie in [0, {max_kept}] (the width of kv_clusters), "
                         f"got values in [{cmin}, {cmax}]")
    slot = torch.arange(max_kept, device=device)
    used = slot < kv_cluster_counts[..., None].long()
    if not used.any():
        return
    ids = kv_clusters.long()[used]
    if int(ids.min()) < 0 or int(ids.max()) >= ck:
        raise ValueError(f"the used entries of kv_clusters must lie in [0, {ck - 1}] (the key clusters of "
                         f"k_offsets), got values in [{int(ids.min())}, {int(ids.max())}]")
    # Unused slots get distinct negative stand-ins, so a sorted row has equal neighbours only for repeated ids.
    rows = torch.where(used, kv_clusters.long(), -1 - slot).sort(-1).values
    if bool((rows[..., 1:] == rows[..., :-1]).any()):
        raise ValueError("the used entries of each kv_clusters row must be distinct key clusters; a repeated "
                         "cluster would be attended twice")


def _check_offsets(name, offsets, length, *, exact_end):
    first, last = offsets[..., 0], offsets[..., -1]
    if bool((first != 0).any()):
        raise ValueError(f"{name}[..., 0] must be 0, got values in [{int(first.min())}, {int(first.max())}]")
    if bool((offsets[..., 1:] < offsets[..., :-1]).any()):
        raise ValueError(f"{name} must be non-decreasing along the last dimension (cluster c is "
                         f"{name}[c]:{name}[c + 1]); sort the clusters' starts")
    if length is None:
        return
    if exact_end and bool((last != length).any()):
        raise ValueError(f"{name}[..., -1] must equal the sequence length {length} (every row in a cluster), "
                         f"got values in [{int(last.min())}, {int(last.max())}]")
    if not exact_end and bool((last > length).any()):
        raise ValueError(f"{name}[..., -1] must be at most the sequence length {length}, got up to {int(last.max())}")
