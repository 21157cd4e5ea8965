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
tokens (the value's move is damped where the first order fails, below); exactly it would cost a dense pass of D x D
per key (as much as the attention itself), so each skipped block enters with its exact mass at c and its own mean of
(k - mean k)(v - mean v)^T (within-block weights taken as uniform; centred on the keys' and values' means, which on
the proxy made it as close as the exact C): the blocks' second moments, D x D each, are made once per call and mixed
per query block by one matmul. What is exact at c costs one query row per query block against every key, about
1 / block_size of a dense call.

The value's move is a tangent: where a row sits far from its block's mean query in the directions the skipped keys
spread, the weights at q are far from those at c and the tangent overshoots the values' range (sharp, local
attention: RoPE'd video queries within one block). The move is divided by 1 + (MOVE_DAMPING sigma^2)^2, sigma^2 =
scale^2 |q - c|^2 s the variance of the skipped keys' scores at q with their keys taken as isotropic (s their
weighted variance per dimension at c, one more sum in the pass at the mean queries). The damped move is then held to
MOVE_LIMIT x |v_w|: the slope mixes the key blocks' own moments by their shares at c, which SVG's temporal blocks
(token-major: rows of one block from every frame) need not follow; on sharp attention their tangents reached 1-3
|v_w| at a tenth of rows, where the proxy's rarely pass 0.6.

The term joins a row after its kernel has run (fold_summary): the kernel returns each row's output and LSE over the
keys it computed, and one virtual key more is one more softmax merge, exactly. So the kernel itself is the plain one,
launched once over every head at full occupancy. The pass at the mean queries holds little per head (the kept table
and each block's share) and runs over many heads at once; the slopes hold D x D per block (19 MB a head at Wan 14B
720p, each side) and are made and folded a head or two at a time (compensate_skipped_blocks).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .cluster_reference import keep_table
from .skipped_summary import SUMMARY_CHUNK_BYTES, SkippedSummary

# The reference pass works on this many bytes of (mean queries x keys) scores at a time.
CHUNK_BYTES = 64 << 20
# The Triton centre pass splits the keys at most this many ways (when few heads fill too few programs).
MAX_SPLITS = 32
# The value move's damping (module docstring): measured on one call's q, k, v (CPU, reference kernels; RESULTS.md
# issue 17, 2026-12-06), 0.5 keeps the proxy's error (step 2 of 4, 7 blocks, Radial and SVG's spatial layout) and cuts
# by half to two thirds what the undamped move added over dropping on the synthetic video inputs at Wan 14B 720p.
MOVE_DAMPING = 0.5
# The damped move's bound, a share of |v_w| (module docstring; RESULTS.md issue 17, 2026-12-06). On the synthetic
# video inputs SVG's temporal heads moved up to 3 |v_w| and erred more than dropping; 0.5 took them below dropping
# but cost SVG's proxy video 2.3 dB at 20 steps (whose temporal heads' moves pay); 1 keeps every proxy video within
# 0.1 dB and takes half of SVG's excess over dropping on the synthetic inputs (40% -> 16% at Wan 14B 720p).
MOVE_LIMIT = 1.0


def compensate_skipped_blocks(out, lse, q, k, v, kv_indices, kv_counts, *, block_size: int, scale: float,
                              kv_length=None, backend: str, heads=None, order=None) -> torch.Tensor:
    """Fold into each row of a block-sparse call the term of the keys its list skips (module docstring), in place:
    ``out`` (B, H, LQ, D) and ``lse`` (B, H, LQ) float32 the kernel's rows over the keys it computed; the other
    arguments kernels.block_sparse_attention's, validated, ``backend`` resolved ('triton' or 'reference'); ``heads``
    the sorted heads to compensate (None: all; the others' rows stay, their compensated LSE is the exact one);
    ``order`` (L,) int32 or None: the layout's blocks are blocks of positions of this token order (self-attention;
    every row tensor in the tokens' own order, kv_length counting positions). Returns the LSE with the term. Holds
    about SUMMARY_CHUNK_BYTES for each of its two stages, a few heads at a time."""
    if order is not None and backend == "reference":
        return _through_order(out, lse, q, k, v, kv_indices, kv_counts, order, block_size=block_size, scale=scale,
                              kv_length=kv_length, heads=heads)
    B, H, LQ, D = q.shape
    LK = k.shape[2]
    nqb, nkb = -(-LQ // block_size), -(-LK // block_size)
    limit = torch.full((B,), LK, device=q.device, dtype=torch.int32) if kv_length is None \
        else kv_length.to(device=q.device, dtype=torch.int32).clamp(0, LK)
    of = lambda t, part: t if t.shape[1] == 1 else t[:, part]  # noqa: E731
    lse_c = torch.empty_like(lse) if heads is None else lse.clone()
    per_pass = _pass_head_bytes(B, nqb, nkb, kv_indices.shape[-1], block_size, D, q.element_size(), backend)
    per_slope = _slope_head_bytes(B, nqb, nkb, block_size, D, q.element_size(), backend)
    runs = [slice(0, H)] if heads is None else _runs(heads)
    for outer in (part for run in runs for part in _head_parts(run, per_pass)):
        stats = _centre_stats(q[:, outer], k[:, outer], v[:, outer], of(kv_indices, outer),
                              of(kv_counts, outer), limit, block_size, scale, backend, order)
        for part in _head_parts(outer, per_slope):
            inner = slice(part.start - outer.start, part.stop - outer.start)
            summary = _summary(stats, inner, k[:, part], v[:, part], limit, block_size, scale, q.dtype, backend,
                               order)
            fold_summary(out[:, part], lse[:, part], q[:, part], summary, block_size=block_size, scale=scale,
                         backend=backend, lse_out=lse_c[:, part], order=order)
            del summary  # before the next part's: two sets of slopes at once were one part's bytes over the budget
        del stats
    return lse_c


def _through_order(out, lse, q, k, v, kv_indices, kv_counts, order, **args) -> torch.Tensor:
    """The reference backend's ``order``: every row tensor copied into that order, compensated there, and the rows
    (and the compensated LSE) put back in the tokens' own order."""
    at = order.long()
    moved = out[:, :, at]
    lse_c = torch.empty_like(lse)
    lse_c[:, :, at] = compensate_skipped_blocks(moved, lse[:, :, at].contiguous(), q[:, :, at], k[:, :, at],
                                                v[:, :, at], kv_indices, kv_counts, backend="reference", **args)
    out[:, :, at] = moved
    return lse_c


def _head_parts(heads: slice, per_head_bytes: int) -> list[slice]:
    """``heads`` in consecutive parts of SUMMARY_CHUNK_BYTES (one head at least)."""
    step = max(1, SUMMARY_CHUNK_BYTES // max(1, per_head_bytes))
    return [slice(h, min(heads.stop, h + step)) for h in range(heads.start, heads.stop, step)]


def _runs(heads: list) -> list[slice]:
    """Sorted head indices as slices of consecutive heads."""
    runs = []
    for h in heads:
        if runs and runs[-1].stop == h:
            runs[-1] = slice(runs[-1].start, h + 1)
        else:
            runs.append(slice(h, h + 1))
    return runs


def _pass_head_bytes(batch, nqb, nkb, width, block_size, head_dim, element_size, backend) -> int:
    """Bytes per head the pass at the mean queries holds: the kept table (and its scatter's int64 ids, ``width``
    list slots a row), each block's mass and share and the per-query-block vectors; on Triton one split's partials
    (its weighted means, LSE and squared norm; more splits only where few heads fill too few programs: at most
    ~2 x BLOCK_C x the SMs rows of partials in all), on the reference backend the keys and values as float32 blocks
    and a chunk of scores; on Triton also each key's squared norm (float32)."""
    table = nqb * (nkb * (5 + element_size) + width * 8 + head_dim * (3 * 4 + 2 * element_size) + 8)
    if backend == "reference":
        return batch * (table + 8 * nkb * block_size * head_dim + CHUNK_BYTES // 8)
    return batch * (table + nqb * (2 * head_dim + 2) * 4 + 4 * nkb * block_size)


def _slope_head_bytes(batch, nqb, nkb, block_size, head_dim, element_size, backend) -> int:
    """Bytes per head of the slopes and the fold: each key block's moment and each query block's slope (D x D in
    q's dtype); on the reference backend also the keys and values in float32 twice and the fold's float32 rows."""
    square = (nkb + 8 + nqb) * head_dim * head_dim * element_size
    if backend == "reference":
        return batch * (square + 16 * nkb * block_size * head_dim + 8 * nqb * block_size * head_dim)
    return batch * square


class CentreStats(NamedTuple):
    """What the pass at the mean queries gives of some heads, per query block: ``centre`` the mean query
    (B, H, NQB, D) float32; ``log_weight`` ln W over the keys it skips, ``key`` k_w and ``value`` v_w their weighted
    means (float32; -inf and 0 where nothing is skipped); ``share`` (B, H, NQB, NKB') each key block's share of W in
    q's dtype, zeros past the key blocks up to padded_blocks(NKB); ``key_c``, ``value_c`` k_w and v_w centred on the
    head's ``mean_k``, ``mean_v`` ((B, H, D) float32), in q's dtype, 0 where nothing is skipped; ``spread``
    (B, H, NQB) float32 the skipped keys' weighted variance per dimension."""

    centre: torch.Tensor
    log_weight: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    share: torch.Tensor
    key_c: torch.Tensor
    value_c: torch.Tensor
    spread: torch.Tensor
    mean_k: torch.Tensor
    mean_v: torch.Tensor


def padded_blocks(key_blocks: int) -> int:
    """Key blocks rounded up to 8: the rows of the moments and the shares, so that their matmul gets aligned
    operands (an odd count there picked an unaligned GEMM at a fifth of the tensor cores' rate on the H100)."""
    return -(-key_blocks // 8) * 8


def _centre_stats(q, k, v, kv_indices, kv_counts, limit, block_size, scale, backend, order=None) -> CentreStats:
    """The CentreStats of the heads given (``order``: Triton only, compensate_skipped_blocks')."""
    B, H = q.shape[:2]
    kept = kept_table(kv_indices, kv_counts, B, H, -(-k.shape[2] // block_size))
    if backend == "triton":
        from .block_summary_triton import triton_centre_pass, triton_mean_queries  # (imports Triton)

        centre = triton_mean_queries(q, block_size, order)
        mean_k, mean_v = _head_means(k, v, limit, order)
        stats = triton_centre_pass(centre, k, v, kept, limit, mean_k, mean_v, block_size, scale, q.dtype, order)
        return CentreStats(centre, *stats, mean_k, mean_v)
    centre = _block_means(q, block_size)
    kb, vb, key_ok = _float_blocks(k, v, limit, block_size)
    count = key_ok.sum((2, 3)).clamp(min=1)
    mean_k, mean_v = (t.sum((2, 3)) / count for t in (kb, vb))
    log_weight, key, value, share, norms = _reference_centre_pass(centre, kb, vb, kept, key_ok, scale)
    present = torch.isfinite(log_weight)[..., None]
    key_c, value_c = (((t - m[:, :, None]) * present).to(q.dtype) for t, m in ((key, mean_k), (value, mean_v)))
    share = torch.nn.functional.pad(share, (0, padded_blocks(share.shape[-1]) - share.shape[-1])).to(q.dtype)
    spread = (norms - (key * key).sum(-1)).clamp(min=0) / key.shape[-1]
    return CentreStats(centre, log_weight, key, value, share, key_c, value_c, spread, mean_k, mean_v)


def kept_table(kv_indices, kv_counts, batch: int, heads: int, key_blocks: int) -> torch.Tensor:
    """(B * H, NQB, NKB) uint8, contiguous: 1 where the query block's list keeps the key block (the centre pass's
    mask; lists shared by the batch or the heads are expanded)."""
    nqb = kv_counts.shape[-1]
    table = keep_table(kv_indices.expand(batch, heads, nqb, -1), kv_counts.expand(batch, heads, nqb), key_blocks,
                       dtype=torch.uint8)
    return table[..., :key_blocks].reshape(batch * heads, nqb, key_blocks).contiguous()


def _summary(stats: CentreStats, heads: slice, k, v, limit, block_size, scale, dtype, backend,
             order=None) -> SkippedSummary:
    """The SkippedSummary of ``heads`` of _centre_stats' heads (``k``, ``v`` theirs): no own terms, the slopes from
    the key blocks' moments."""
    part = CentreStats(*(t[:, heads] for t in stats))
    B, H, nqb = part.log_weight.shape
    if backend == "triton":
        from .block_summary_triton import triton_block_moments  # (imports Triton)

        moments = triton_block_moments(k, v, part.mean_k, part.mean_v, limit, block_size, dtype, order)
    else:
        moments = _reference_moments(*_float_blocks(k, v, limit, block_size), part.mean_k, part.mean_v, dtype)
    slope = _slope(part.key_c, part.value_c, part.share, moments, scale)
    none = torch.zeros(B, H, nqb, dtype=torch.int32, device=part.centre.device)
    return SkippedSummary(none[..., None], none, part.centre, part.log_weight, part.key, part.value, slope,
                          part.spread)


def _float_blocks(k, v, limit, block_size):
    """k and v as float32 blocks (B, H, NKB, block_size, D), zero past ``limit`` (B,) and at the last block's end,
    and where keys are (``key_ok`` (B, 1, NKB, block_size, 1)): the reference backend's view of the keys."""
    B, H, LK, D = k.shape
    nkb = -(-LK // block_size)
    key_ok = (torch.arange(nkb * block_size, device=k.device) < limit[:, None]).view(B, 1, nkb, block_size, 1)
    pad = (0, 0, 0, nkb * block_size - LK)
    kb, vb = (torch.nn.functional.pad(t.float(), pad).view(B, H, nkb, block_size, D) * key_ok for t in (k, v))
    return kb, vb, key_ok


def _reference_centre_pass(centre, kb, vb, kept, key_ok, scale):
    """Torch version of kernels.block_summary_triton.triton_centre_pass, on the keys and values as float32 blocks
    (_float_blocks): ln W, k_w, v_w, each key block's share of W, and the skipped keys' weighted mean squared norm."""
    B, H, nqb, D = centre.shape
    nkb, block_size = kb.shape[2:4]
    kept = kept.view(B, H, nqb, nkb, 1).bool()
    key_ok = key_ok[:, :, None, :, :, 0]                                                  # (B, 1, 1, NKB, bs)
    kf, vf = kb.flatten(2, 3), vb.flatten(2, 3)
    log_weight = torch.empty(B, H, nqb, device=kb.device)
    key, value = (torch.empty(B, H, nqb, D, device=kb.device) for _ in range(2))
    share, norms = torch.empty(B, H, nqb, nkb, device=kb.device), torch.empty(B, H, nqb, device=kb.device)
    squares = kf.square().sum(-1, keepdim=True)                                           # (B, H, NKB * bs, 1)
    rows = max(1, CHUNK_BYTES // (B * H * nkb * block_size * 8))                          # scores and weights
    for r0 in range(0, nqb, rows):
        qb = slice(r0, min(nqb, r0 + rows))
        s = (centre[:, :, qb] @ kf.transpose(-1, -2) * scale).view(B, H, -1, nkb, block_size)
        s = s.masked_fill(kept[:, :, qb] | ~key_ok, float("-inf"))
        lw = torch.logsumexp(s.flatten(-2), dim=-1)
        w = torch.exp(s - lw[..., None, None]).nan_to_num(0.0)          # a query block that skips nothing: all 0
        log_weight[:, :, qb], share[:, :, qb] = lw, w.sum(-1)
        key[:, :, qb], value[:, :, qb] = w.flatten(-2) @ kf, w.flatten(-2) @ vf
        norms[:, :, qb] = (w.flatten(-2) @ squares)[..., 0]
    return log_weight, key, value, share, norms


def _reference_moments(kb, vb, key_ok, mean_k, mean_v, dtype):
    """Each key block's mean of (k - mean_k)(v - mean_v)^T (B, H, NKB, D, D) in ``dtype``, from _float_blocks'
    blocks and the (B, H, D) means (centred first: the product keeps its digits in 16 bits)."""
    kc, vc = ((t - m[:, :, None, None]) * key_ok for t, m in ((kb, mean_k), (vb, mean_v)))
    size = key_ok.sum(3, keepdim=True).clamp(min=1)                                       # (B, 1, NKB, 1, 1)
    return ((kc.to(dtype).transpose(-1, -2) @ vc.to(dtype)).float() / size).to(dtype)


def _head_means(k, v, limit, order=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, H, D) float32 means of (B, H, L, D) ``k`` and ``v`` over their rows below ``limit`` (B,) (the tokens at
    positions below it, with an ``order``): a matmul each with the rows' 0/1 mask, no float32 copy (their 16-bit
    rounding only moves the point the moments are centred on)."""
    rows = (torch.arange(k.shape[2], device=k.device) < limit[:, None]).to(k.dtype)                    # (B, L)
    if order is not None:
        rows = torch.empty_like(rows).scatter_(1, order.long().expand(rows.shape[0], -1), rows)
    rows = rows[:, None, None, :]
    count = limit.clamp(min=1).float()[:, None, None]
    return tuple((rows @ x)[:, :, 0].float() / count for x in (k, v))


def _slope(key_c, value_c, share, moments, scale) -> torch.Tensor:
    """scale C^T: C from each skipped block's mean of (k - p_k)(v - p_v)^T (``moments`` (B, H, NKB', D, D), NKB'
    padded_blocks' rows, the last ones zeros) weighted by its ``share`` of W at the mean query (module docstring),
    less (k_w - p_k)(v_w - p_v)^T (``key_c``, ``value_c``), in the moments' dtype: one matmul of the shares with the
    moments and one rank-1 update."""
    B, H, nqb, D = key_c.shape
    gram = (share[..., :moments.shape[2]] @ moments.flatten(-2)).view(B * H * nqb, D, D)
    k_w, v_w = (t.reshape(B * H * nqb, D, 1) for t in (key_c, value_c))
    return gram.baddbmm_(k_w, v_w.transpose(1, 2), beta=scale, alpha=-scale).view(B, H, nqb, D, D)  # in place


def fold_summary(out, lse, q, summary: SkippedSummary, *, block_size: int, scale: float, backend: str,
                 lse_out: torch.Tensor, order=None) -> torch.Tensor:
    """Merge the summary's virtual key into each row's softmax, in place: ``out`` (B, H, L, D) and ``lse`` (B, H, L)
    float32 the rows' output and LSE over the keys computed exactly (a row with none: 0 and -inf). Writes the LSE
    with the term into ``lse_out`` (B, H, L) float32 and returns it. Each row's value is its query block's
    v_w + (q - c) @ slope, the move damped and bounded (module docstring). ``backend`` 'triton': one pass over the rows
    (kernels/block_summary_triton.py); 'reference': torch, one batched matmul per block."""
    if backend == "triton":
        from .block_summary_triton import triton_fold_summary  # (imports Triton)

        return triton_fold_summary(out, lse, q, summary, block_size=block_size, scale=scale, lse_out=lse_out,
                                   order=order)
    B, H, L, D = q.shape
    nqb = summary.log_weight.shape[-1]
    pad = nqb * block_size - L
    blocks = lambda t: torch.nn.functional.pad(t, (0, 0, 0, pad)).view(B, H, nqb, block_size, -1)  # noqa: E731
    delta = blocks(q.float()) - summary.centre[..., None, :]
    score = summary.log_weight[..., None] + scale * (delta @ summary.key[..., :, None])[..., 0]
    shrink = MOVE_DAMPING * scale ** 2 * (delta * delta).sum(-1, keepdim=True) * summary.spread[..., None, None]
    moved = (delta.to(summary.slope.dtype) @ summary.slope).float() / (1 + shrink * shrink)
    value = summary.value[..., None, :] + bounded_move(moved, summary.value[..., None, :])
    score, value = score.flatten(2, 3)[..., :L], value.flatten(2, 3)[:, :, :L]
    total = torch.logaddexp(lse, score)
    none = torch.isneginf(total)                                         # no key and nothing skipped: stays 0, -inf
    keep, add = (torch.exp(t - total).masked_fill(none, 0.0)[..., None] for t in (lse, score))
    out.copy_(out.float() * keep + value * add)
    return lse_out.copy_(total)


def bounded_move(moved: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """The damped value move (..., D) held to MOVE_LIMIT times the norm of v_w (..., D) it moves."""
    limit = MOVE_LIMIT * value.norm(dim=-1, keepdim=True)
    return moved * (limit / moved.norm(dim=-1, keepdim=True).clamp(min=1e-30)).clamp(max=1.0)


def _block_means(x, block_size: int) -> torch.Tensor:
    """(B, H, NB, D) float32 mean of each block of rows of (B, H, L, D) ``x`` (the last one partial), summed in
    float32 from x as it is (no float32 copy)."""
    B, H, L, D = x.shape
    nb, full = -(-L // block_size), L // block_size
    sums = torch.empty(B, H, nb, D, device=x.device)
    sums[:, :, :full] = x[:, :, :full * block_size].unflatten(2, (full, block_size)).sum(3, dtype=torch.float32)
    if nb > full:
        sums[:, :, full] = x[:, :, full * block_size:].sum(2, dtype=torch.float32)
    sizes = (L - torch.arange(nb, device=x.device) * block_size).clamp(max=block_size)
    return sums / sizes[:, None]
