"""Dense attention that also returns each query row's log-sum-exp (AdaSpa's search needs the LSE of a dense pass).

On CUDA, torch's cuDNN attention returns the LSE at SDPA's own speed (it keeps it for the backward pass). Its op is
private and its signature has changed across torch releases, so it is used only where it answers, and its LSE is
checked once per process against a few rows computed in torch; anything else (another torch, another GPU, key
padding, a failed check) runs the block-sparse kernel over every block, which returns the same LSE at ~1.1x the
cost of SDPA dense (measured on an H100, benchmarks/RESULTS.md).
"""

from __future__ import annotations

import functools
import logging
import math

import torch

from .attention import block_sparse_attention, resolve_backend, validate_qkv
from .mass_reference import full_layout
from .layout import num_blocks

log = logging.getLogger("sparse_video_attention")

FULL_LAYOUT_BLOCK = 128  # with every block kept the granularity changes nothing; 128 halves the lists walked
_CHECK_ROWS = 8
_CHECK_TOLERANCE = 1e-2
_cudnn_state = {"usable": None}  # None: not tried yet in this process; then True / False


def dense_attention_with_lse(q, k, v, *, scale=None, kv_length=None, out=None, backend="auto"):
    """(output (B, H, LQ, D), natural-log LSE (B, H, LQ) float32) of dense attention; arguments as
    :func:`kernels.block_sparse_attention` (``out``: an optional buffer, any strides)."""
    B, H, LQ, D, LK = validate_qkv(q, k, v, out)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    if kv_length is None and q.is_cuda and resolve_backend(backend, q.device, q.dtype) == "triton" \
            and _cudnn_state["usable"] is not False:
        result = _cudnn_attention_with_lse(q, k, v, scale)
        if result is not None:
            o, lse = result
            if out is None:
                return o, lse
            out.copy_(o)
            return out, lse
    layout = _full_layout(num_blocks(LQ, FULL_LAYOUT_BLOCK), num_blocks(LK, FULL_LAYOUT_BLOCK), q.device)
    return block_sparse_attention(q, k, v, *layout, block_size=FULL_LAYOUT_BLOCK, scale=scale, kv_length=kv_length,
                                  return_lse=True, out=out, backend=backend, check_layout=False)


@functools.lru_cache(maxsize=4)  # a few resolutions alive at once; 1.4 MiB each at 720p
def _full_layout(num_q_blocks, num_kv_blocks, device):
    return full_layout(num_q_blocks, num_kv_blocks, device)


def _cudnn_attention_with_lse(q, k, v, scale):
    """cuDNN's (output, LSE (B, H, L) float32), or None where it is missing, fails or disagrees with torch."""
    op = getattr(torch.ops.aten, "_scaled_dot_product_cudnn_attention", None)
    try:
        # (query, key, value, attn_bias, compute_log_sumexp, dropout_p, is_causal, return_debug_mask, *, scale)
        result = op(q, k, v, None, True, 0.0, False, False, scale=scale)
        o, lse = result[0], result[1]
        B, H, L, _ = q.shape
        if o.shape != q.shape or lse.numel() != B * H * L:
            raise RuntimeError(f"unexpected shapes: output {tuple(o.shape)}, LSE {tuple(lse.shape)}")
        lse = lse.reshape(B, H, L).float()
        if _cudnn_state["usable"] is None:
            _check_lse(q, k, lse, scale)
    except Exception as why:  # noqa: BLE001  (a private op: any failure means "use our kernel")
        _cudnn_state["usable"] = False
        log.info("sparse attention: cuDNN attention with LSE is not usable here (%s: %s); our dense kernel runs",
                 type(why).__name__, why)
        return None
    _cudnn_state["usable"] = True
    return o, lse


def _check_lse(q, k, lse, scale):
    """The LSE of a few rows of the first (batch, head) against torch in float32."""
    rows = torch.linspace(0, q.shape[2] - 1, _CHECK_ROWS, device=q.device).long()
    want = torch.logsumexp(q[0, 0, rows].float() @ k[0, 0].float().T * scale, dim=-1)
    error = (lse[0, 0, rows] - want).abs().max().item()
    if not error <= _CHECK_TOLERANCE:
        raise RuntimeError(f"its LSE differs from torch's by {error:.3g}")
