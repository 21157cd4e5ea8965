"""How far two candidate sparse masks take a few sampled query rows from exact attention (SVG's online
profiling): Triton on CUDA (one pass over the keys for all three outputs), a torch reference with the same contract.

A candidate mask m keeps key j for sampled row i when ``keep[m, i, key_block[m, j]]``: ``key_block[m]`` maps every
key to a block of the candidate's own token order and ``keep[m, i]`` is the layout row of query i in that order.
"""

from __future__ import annotations

import math

import torch

from .attention import MAX_TRITON_HEAD_DIM, resolve_backend

CANDIDATES = 2
ROW_CHUNK = 256  # sampled rows per launch in candidate_mask_errors: the token masks stay ~40 MB at 720p
_CHUNK_ELEMENTS = 1 << 24  # float32 scores the reference holds at once


def candidate_mask_outputs(q_rows, k, v, keep, key_block, *, scale=None, kv_length=None, backend="auto",
                           splits=None, config=None):
    """Attention outputs of the sampled rows: (3, B, H, R, D) float32 = (exact, under candidate 0, under candidate 1).

    Args:
        q_rows: (B, H, R, D) sampled queries; k, v: (B, H, LK, D). float16 / bfloat16 (float32 on the reference
            backend); any strides with a contiguous last dimension.
        keep: (2, R, NKB) bool or uint8, per candidate and sampled row the kept key blocks.
        key_block: (2, LK) int32 / int64, per candidate the block (in [0, NKB)) of every key.
        scale: softmax scale, default 1 / sqrt(D).
        kv_length: optional (B,) int: keys at positions >= kv_length[b] are padding, for every output.
        backend: 'auto' (Triton on CUDA), 'triton' or 'reference'.
        splits: key splits of the Triton launch (default: enough programs for the GPU); the result does not
            depend on it beyond rounding.
        config: Triton tile config (BLOCK_R, BLOCK_N, num_warps, num_stages), default per device.
    Rows a candidate gives no key get zeros. Index ranges are not read back (a device sync): callers build them.
    """
    B, H, R, D = _validate(q_rows, k, v, keep, key_block, kv_length)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    if resolve_backend(backend, q_rows.device, q_rows.dtype) == "reference":
        return reference_candidate_mask_outputs(q_rows, k, v, keep, key_block, scale=scale, kv_length=kv_length)
    if D > MAX_TRITON_HEAD_DIM:
        raise ValueError(f"head_dim {D} is not supported by the Triton kernel (accepted: up to "
                         f"{MAX_TRITON_HEAD_DIM}); use backend='reference'")
    from .mask_errors_triton import triton_candidate_mask_outputs
    padded = max(16, 1 << (D - 1).bit_length())
    if padded != D:  # zero-padding the head dimension leaves q.k and the first D output columns unchanged
        pad = (0, padded - D)
        q_rows, k, v = (torch.nn.functional.pad(t, pad) for t in (q_rows, k, v))
    out = triton_candidate_mask_outputs(q_rows, k, v, token_masks(keep, key_block), scale=scale, kv_length=kv_length,
                                        splits=splits, config=config)
    return out[..., :D]


def candidate_mask_errors(q_rows, k, v, keep, key_block, *, scale=None, kv_length=None, backend="auto"):
    """(2, B, H) float32: per candidate the mean squared difference, over the sampled rows and head dims, between
    its output and exact attention (arguments as :func:`candidate_mask_outputs`). Rows go ``ROW_CHUNK`` at a time,
    so even profiling every query keeps the float32 outputs small."""
    R = q_rows.shape[2]
    total = 0.0
    for r0 in range(0, R, ROW_CHUNK):
        part = slice(r0, r0 + ROW_CHUNK)
        out = candidate_mask_outputs(q_rows[:, :, part], k, v, keep[:, part], key_block, scale=scale,
                                     kv_length=kv_length, backend=backend)
        total = total + (out[1:] - out[:1]).square().sum(dim=(-2, -1))
    return total / (R * q_rows.shape[3])


def token_masks(keep, key_block) -> torch.Tensor:
    """(2, R, LK) uint8: per candidate, row i keeps key j when its layout row keeps key j's block."""
    return torch.stack([keep[m].to(torch.uint8)[:, key_block[m].long()] for m in range(CANDIDATES)])


def reference_candidate_mask_outputs(q_rows, k, v, keep, key_block, *, scale, kv_length=None):
    """Torch version of :func:`candidate_mask_outputs` in float32 (token masks materialised for the sampled rows
    only), a few heads at a time so memory stays O(rows x keys x chunk)."""
    B, H, R, D = q_rows.shape
    LK = k.shape[2]
    allowed = [torch.ones(R, LK, dtype=torch.bool, device=q_rows.device)]
    allowed += list(token_masks(keep, key_block).bool())  # (R, LK) each
    if kv_length is not None:
        real = torch.arange(LK, device=q_rows.device)[None, :] < kv_length.to(q_rows.device).long()[:, None]
    out = torch.empty(3, B, H, R, D, device=q_rows.device, dtype=torch.float32)
    step = max(1, _CHUNK_ELEMENTS // max(1, B * R * LK))
    for h0 in range(0, H, step):
        part = slice(h0, h0 + step)
        s = torch.matmul(q_rows[:, part].float(), k[:, part].float().transpose(-1, -2)) * scale  # (B, h, R, LK)
        vf = v[:, part].float()
        for i, mask in enumerate(allowed):
            mask = mask[None, None] if kv_length is None else mask[None, None] & real[:, None, None, :]
            sm = s.masked_fill(~mask, float("-inf"))
            top = sm.amax(dim=-1, keepdim=True)
            p = torch.exp(sm - torch.where(torch.isfinite(top), top, torch.zeros_like(top)))
            total = p.sum(dim=-1, keepdim=True)
            out[i, :, part] = torch.matmul(p, vf) / torch.where(total > 0, total, torch.ones_like(total))
    return out


def _validate(q_rows, k, v, keep, key_block, kv_length):
    for name, t in (("q_rows", q_rows), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.ndim != 4:
            raise ValueError(f"{name} must be a 4-dim (B, H, L, D) tensor, got "
                             f"{getattr(t, 'shape', type(t).__name__)}")
        if t.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"{name} has dtype {t.dtype}; accepted: float16, bfloat16 (float32 on the reference "
                             "backend)")
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last (head_dim) dimension; call .contiguous() first")
        if t.device != q_rows.device or t.dtype != q_rows.dtype:
            raise ValueError(f"q_rows, k, v must share one dtype and device, got {name} {t.dtype} on {t.device}")
    B, H, R, D = q_rows.shape
    if k.shape != v.shape or k.shape[:2] != (B, H) or k.shape[3] != D or k.shape[2] == 0 or R == 0:
        raise ValueError(f"k and v must be non-empty ({B}, {H}, LK, {D}) tensors to match q_rows "
                         f"{tuple(q_rows.shape)}; got k {tuple(k.shape)}, v {tuple(v.shape)}")
    LK = k.shape[2]
    if not isinstance(keep, torch.Tensor) or keep.ndim != 3 or keep.shape[:2] != (CANDIDATES, R) \
            or keep.dtype not in (torch.bool, torch.uint8):
        raise ValueError(f"keep must be a ({CANDIDATES}, {R}, NKB) bool or uint8 tensor, got "
                         f"{getattr(keep, 'dtype', None)} {tuple(getattr(keep, 'shape', ()))}")
    if not isinstance(key_block, torch.Tensor) or tuple(key_block.shape) != (CANDIDATES, LK) \
            or key_block.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"key_block must be a ({CANDIDATES}, {LK}) int32 or int64 tensor, got "
                         f"{getattr(key_block, 'dtype', None)} {tuple(getattr(key_block, 'shape', ()))}")
    for name, t in (("keep", keep), ("key_block", key_block)):
        if t.device != q_rows.device:
            raise ValueError(f"{name} is on {t.device} but q_rows is on {q_rows.device}; move it to {q_rows.device}")
    if kv_length is not None and (not isinstance(kv_length, torch.Tensor) or tuple(kv_length.shape) != (B,)):
        raise ValueError(f"kv_length must be a ({B},) integer tensor, got "
                         f"{getattr(kv_length, 'shape', type(kv_length).__name__)}")
    return B, H, R, D
