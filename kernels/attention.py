"""Public entry point for block-sparse attention: validation, backend choice, head-dim padding."""

from __future__ import annotations

import contextlib
import math
import os

import torch

from .block_summary import compensate_skipped_blocks
from .eight_bit import KERNEL_PRECISIONS, eight_bit_support
from .layout import num_blocks, validate_layout
from .pooled_keys import PooledKeys
from .quantize_reference import reference_8bit_block_sparse_attention
from .reference import reference_block_sparse_attention

BACKENDS = ("auto", "triton", "reference")
SUPPORTED_BLOCK_SIZES = (64, 128)
MAX_TRITON_HEAD_DIM = 128
_KERNEL_DTYPES = (torch.float16, torch.bfloat16)


def triton_available(device: torch.device | str) -> bool:
    """True when the Triton kernel can run on tensors of this device (CUDA, or the CPU interpreter)."""
    device = torch.device(device)
    if device.type == "cpu":
        return os.environ.get("TRITON_INTERPRET") == "1" and _import_triton()
    return device.type == "cuda" and _import_triton()


def _import_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """'auto' is Triton on CUDA for fp16/bf16 and the torch reference everywhere else."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and dtype in _KERNEL_DTYPES and triton_available(device) else "reference"
    if backend == "triton":
        if not triton_available(device):
            raise ValueError(f"backend='triton' needs a CUDA device with Triton installed (tensors are on {device}); "
                             "use backend='auto' or 'reference'")
        if dtype not in _KERNEL_DTYPES:
            raise ValueError(f"backend='triton' takes float16 or bfloat16 q/k/v, got {dtype}; cast the inputs "
                             "or use backend='reference'")
    return backend


def block_sparse_attention(q, k, v, kv_indices, kv_counts, *, block_size=128, scale=None, kv_length=None,
                           return_lse=False, out=None, backend="auto", check_layout=True, pooled=None,
                           precision="bf16", scattered=False, summarise=False):
    """Attention of q over k/v restricted to key blocks listed per (batch, head, query block).

    Args:
        q: (B, H, LQ, D); k, v: (B, H, LK, D). float16 / bfloat16 (float32 on the reference backend).
            Any strides with a contiguous last dimension; L need not be a multiple of the block.
        kv_indices: (B or 1, H or 1, ceil(LQ / block_size), max_kept) int32 key-block indices; the first
            ``kv_counts`` entries of each row are used and must be distinct.
        kv_counts: (B or 1, H or 1, ceil(LQ / block_size)) int32.
        block_size: query and key block size of the layout, 64 or 128.
        scale: softmax scale, default 1 / sqrt(D).
        kv_length: optional (B,) int: keys at positions >= kv_length[b] are ignored (padding).
        return_lse: also return the natural-log log-sum-exp of each query row, (B, H, LQ) float32.
        out: optional (B, H, LQ, D) output buffer (any strides, contiguous last dimension), e.g. a transposed
            view of a (B, LQ, H, D) tensor so the caller needs no copy.
        backend: 'auto' (Triton on CUDA, reference elsewhere), 'triton' or 'reference'.
        check_layout: verify that counts and indices are in range (reads them back: a device sync). Planners
            that validated a cached layout once pass False.
        pooled: optional PooledKeys of k, v's key blocks (kernels.pool_key_blocks, same block_size and kv_length):
            compensation of skipped keys. Every key block a row's list does not hold adds its pooled term (size x
            exp(q.k_mean * scale), value v_mean) to that row's softmax. With return_lse the result is then
            (out, lse, compensated lse): ``lse`` stays the LSE over the keys computed exactly. bf16 precision only.
        precision: 'bf16' (q/k/v's own 16-bit type), 'fp8' or 'int8' (kernels/block_sparse_8bit_triton.py; on the
            reference backend its simulated-quantization reference). kernels.eight_bit_support says which a GPU has.
        scattered: the lists keep blocks scattered over the keys (a searched layout), not bands around the
            diagonal: at long sequences on Hopper the bf16 kernel then takes a wider key tile (same result).
        summarise: compensation of skipped keys in one term per row instead of ``pooled``'s one per skipped block
            (kernels/block_summary.py): every key a row's list skips, summed exactly at its query block's mean query
            and moved to the row's own query to first order. True for every head, or a list of the heads to
            compensate (the others keep their plain rows, their compensated LSE the exact one: heads whose rows the
            caller writes otherwise). Returns as with ``pooled``; bf16 precision only.

    Rows whose list is empty (or whose keys are all masked) give 0 and an LSE of -inf, never NaN (with ``pooled``:
    the pooled terms alone, and 0 / -inf when every block is empty).
    """
    B, H, LQ, D, LK = validate_qkv(q, k, v, out)
    check_block_size(block_size)
    check_kv_length(kv_length, B)
    validate_layout(kv_indices, kv_counts, num_kv_blocks=num_blocks(LK, block_size),
                    num_q_blocks=num_blocks(LQ, block_size), batch=B, heads=H, check_values=check_layout)
    for name, t in (("kv_indices", kv_indices), ("kv_counts", kv_counts)):
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}; move the layout to the queries' device")
    check_pooled(pooled, B, H, num_blocks(LK, block_size), D, q.device, "key blocks")
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    kind = resolve_backend(backend, q.device, q.dtype)
    check_precision(precision, kind, q.device)
    summarised = _summarised_heads(summarise, H)
    if summarise and pooled is not None:
        raise ValueError("summarise and pooled are two ways to compensate skipped keys; pass one of them")
    if (pooled is not None or summarise) and precision != "bf16":
        raise ValueError(f"compensation of skipped keys (pooled / summarise) runs in bf16 only, got precision "
                         f"{precision!r}; pass precision 'bf16' or no compensation")
    if kind != "reference":
        check_triton_head_dim(D)
    args = dict(block_size=block_size, scale=scale, kv_length=kv_length, return_lse=return_lse, pooled=pooled,
                precision=precision, scattered=scattered, kind=kind)
    if not summarise:
        return _attend_blocks(q, k, v, kv_indices, kv_counts, out=out, **args)
    out, lse = _attend_blocks(q, k, v, kv_indices, kv_counts, out=out, **dict(args, return_lse=True))
    lse_c = compensate_skipped_blocks(out, lse, q, k, v, kv_indices, kv_counts, block_size=block_size, scale=scale,
                                      kv_length=kv_length, backend=kind, heads=summarised)
    return (out, lse, lse_c) if return_lse else out


def compensate_block_layout(out, lse, q, k, v, kv_indices, kv_counts, *, block_size=128, scale=None, kv_length=None,
                            order=None, heads=None, backend="auto", check_layout=True):
    """Fold the skipped keys' term into the rows of a block-sparse call already made, in place: what
    ``block_sparse_attention(summarise=...)`` adds after its kernel, for callers that ran the layout another way
    (SVG's temporal heads: token-major copies a few heads at a time, compensated afterwards in one go).

    Args:
        out: (B, H, L, D) the call's output rows, 16-bit on Triton (any strides, contiguous last dimension).
        lse: (B, H, L) float32 their LSE over the keys computed exactly (contiguous last dimension).
        q, k, v, kv_indices, kv_counts, block_size, scale, kv_length, backend, check_layout: as for
            block_sparse_attention.
        order: optional (L,) integer tensor, the token at each position of the order the layout's blocks are over
            (a permutation; self-attention): q, k, v, out and lse stay in the tokens' own order, kv_length counts
            positions of the order. Not read back (no sync): callers pass the permutation they built.
        heads: optional list of the heads to compensate (default every head; the others' rows stay as they are).

    Returns the LSE with the term (B, H, L) float32 (the heads not compensated: their ``lse``).
    """
    B, H, LQ, D, LK = validate_qkv(q, k, v, out)
    if out is None:
        raise ValueError("out must be the call's output rows (B, H, L, D); got None")
    check_block_size(block_size)
    check_kv_length(kv_length, B)
    validate_layout(kv_indices, kv_counts, num_kv_blocks=num_blocks(LK, block_size),
                    num_q_blocks=num_blocks(LQ, block_size), batch=B, heads=H, check_values=check_layout)
    if not isinstance(lse, torch.Tensor) or lse.shape != (B, H, LQ) or lse.dtype != torch.float32 \
            or lse.device != q.device or lse.stride(-1) != 1:
        raise ValueError(f"lse must be the call's ({B}, {H}, {LQ}) float32 LSE rows on {q.device} with a contiguous "
                         f"last dimension, got {_describe(lse)}")
    if order is not None and (not isinstance(order, torch.Tensor) or order.shape != (LQ,) or LQ != LK
                              or order.dtype.is_floating_point or order.device != q.device):
        raise ValueError(f"order must be a ({LQ},) integer tensor on {q.device} (a permutation of the tokens of a "
                         f"self-attention call, LQ == LK = {LK}), got {_describe(order)}")
    kind = resolve_backend(backend, q.device, q.dtype)
    if kind != "reference":
        check_triton_head_dim(D)
    chosen = None if heads is None else _head_list(heads, H, "heads must be None or")
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    return compensate_skipped_blocks(out, lse, q, k, v, kv_indices, kv_counts, block_size=block_size, scale=scale,
                                     kv_length=kv_length, backend=kind, heads=chosen,
                                     order=None if order is None else order.to(torch.int32))


def _describe(t) -> str:
    return f"{tuple(t.shape)} {t.dtype} on {t.device}" if isinstance(t, torch.Tensor) else type(t).__name__


def _summarised_heads(summarise, heads: int):
    """None (every head) for summarise=True, the sorted head indices of a list; ValueError for anything else."""
    return None if isinstance(summarise, bool) else _head_list(summarise, heads, "summarise must be True, False or")


def _head_list(chosen, heads: int, what: str) -> list:
    """The sorted distinct head indices of the list ``chosen``; ValueError starting with ``what`` otherwise."""
    if not isinstance(chosen, (list, tuple)) or not all(isinstance(h, int) and not isinstance(h, bool)
                                                        and 0 <= h < heads for h in chosen):
        raise ValueError(f"{what} a list of head indices in [0, {heads}), got {chosen!r}")
    return sorted(set(chosen))


def _attend_blocks(q, k, v, kv_indices, kv_counts, *, block_size, scale, kv_length, return_lse, out, pooled,
                   precision, scattered, kind):
    """One call of the chosen backend and precision over every head given (validated)."""
    if kind == "reference":
        if precision != "bf16":
            return reference_8bit_block_sparse_attention(q, k, v, kv_indices, kv_counts, block_size=block_size,
                                                         precision=precision, scale=scale, kv_length=kv_length,
                                                         return_lse=return_lse, out=out)
        return reference_block_sparse_attention(q, k, v, kv_indices, kv_counts, block_size=block_size, scale=scale,
                                                kv_length=kv_length, return_lse=return_lse, out=out, pooled=pooled)
    from .block_sparse_8bit_triton import triton_block_sparse_attention_8bit
    from .block_sparse_triton import triton_block_sparse_attention

    def launch(q, k, v, out):
        args = dict(block_size=block_size, scale=scale, kv_length=kv_length, return_lse=return_lse, out=out)
        if precision == "bf16":
            return triton_block_sparse_attention(q, k, v, kv_indices, kv_counts, pooled=pad_pooled(pooled, q.shape[-1]),
                                                 scattered=scattered, **args)
        return triton_block_sparse_attention_8bit(q, k, v, kv_indices, kv_counts, precision=precision, **args)

    with shared_memory_guard("use block_size 64 or backend 'reference'"):
        return run_padded_head_dim(launch, q, k, v, out, return_lse)


def check_pooled(pooled, batch: int, heads: int, groups: int, head_dim: int, device, what: str) -> None:
    """Raise ValueError when ``pooled`` (None: no compensation) does not describe these keys' ``groups`` groups."""
    if pooled is None:
        return
    if not isinstance(pooled, PooledKeys):
        raise ValueError(f"pooled must be a PooledKeys (kernels.pool_key_blocks / pool_key_clusters), got "
                         f"{type(pooled).__name__}")
    lead_ok = lambda t: t.shape[0] in (1, batch) and t.shape[1] in (1, heads)  # noqa: E731
    if not (pooled.keys.ndim == pooled.values.ndim == 4 and pooled.log_size.ndim == 3
            and pooled.keys.shape[2:] == pooled.values.shape[2:] == (groups, head_dim)
            and pooled.log_size.shape[2] == groups and all(map(lead_ok, (pooled.keys, pooled.values, pooled.log_size)))):
        raise ValueError(f"pooled must hold {groups} {what} of head_dim {head_dim} for ({batch}, {heads}) batch and "
                         f"heads; got keys {tuple(pooled.keys.shape)}, values {tuple(pooled.values.shape)}, log_size "
                         f"{tuple(pooled.log_size.shape)}: pool the same k, v (and block size / clusters) the call uses")
    if any(t.device != device for t in (pooled.keys, pooled.values, pooled.log_size)):
        raise ValueError(f"pooled is on {pooled.keys.device} but q is on {device}; pool the call's own k and v")


def pad_pooled(pooled, head_dim: int):
    """``pooled`` with its keys and values zero-padded to ``head_dim`` (what run_padded_head_dim gives the kernel)."""
    if pooled is None or pooled.keys.shape[-1] == head_dim:
        return pooled
    pad = (0, head_dim - pooled.keys.shape[-1])
    return PooledKeys(torch.nn.functional.pad(pooled.keys, pad), torch.nn.functional.pad(pooled.values, pad),
                      pooled.log_size)


def check_precision(precision, backend: str, device: torch.device) -> None:
    """An 8-bit precision on the Triton backend needs the GPU's units (the CPU interpreter runs both)."""
    if precision not in KERNEL_PRECISIONS:
        raise ValueError(f"precision must be one of {KERNEL_PRECISIONS}, got {precision!r}")
    if precision == "bf16" or backend == "reference" or device.type == "cpu":
        return
    support = eight_bit_support(device)
    if support.precision == "bf16" or (precision == "fp8" and support.precision != "fp8"):
        raise ValueError(f"precision {precision!r} cannot run here: {support.reason}; use precision "
                         f"{support.precision!r}")


def check_triton_head_dim(D: int) -> None:
    if D > MAX_TRITON_HEAD_DIM:
        raise ValueError(f"head_dim {D} is not supported by the Triton kernel (accepted: up to "
                         f"{MAX_TRITON_HEAD_DIM}); use backend='reference'")


@contextlib.contextmanager
def shared_memory_guard(fix: str):
    """Turn Triton's OutOfResources (a GPU with less shared memory per block than the tile needs) into a
    ValueError, which the dispatcher answers with a dense fallback instead of a stopped render."""
    from triton.runtime.errors import OutOfResources

    try:
        yield
    except OutOfResources as why:
        raise ValueError(f"the Triton kernel needs more GPU shared memory than this GPU offers ({why}); {fix}") from why


def padded_head_dim(head_dim: int) -> int:
    """The head_dim the Triton kernels compute with: a power of two, at least 16 (zero padding)."""
    return max(16, 1 << (head_dim - 1).bit_length())


def run_padded_head_dim(launch, q, k, v, out, return_lse):
    """Run ``launch(q, k, v, out)`` (a Triton kernel taking power-of-two head dims of at least 16) on any head_dim.

    Zero-padding the head dimension leaves q.k and the first D output columns unchanged."""
    D = q.shape[-1]
    padded = padded_head_dim(D)
    if padded == D:
        return launch(q, k, v, out)
    pad = (0, padded - D)
    result = launch(*(torch.nn.functional.pad(t, pad) for t in (q, k, v)), None)
    o, *lses = result if return_lse else (result,)  # the LSE, or the exact and the compensated LSE
    if out is None:
        out = o[..., :D].contiguous()
    else:
        out.copy_(o[..., :D])
    return (out, *lses) if return_lse else out


def check_block_size(block_size) -> None:
    if block_size not in SUPPORTED_BLOCK_SIZES:
        raise ValueError(f"block_size must be one of {SUPPORTED_BLOCK_SIZES}, got {block_size}")


def check_kv_length(kv_length, batch: int) -> None:
    if kv_length is not None and (not isinstance(kv_length, torch.Tensor) or kv_length.shape != (batch,)):
        raise ValueError(f"kv_length must be a ({batch},) integer tensor, got "
                         f"{tuple(kv_length.shape) if isinstance(kv_length, torch.Tensor) else type(kv_length)}")


def validate_qkv(q, k, v, out):
    """Check q (B, H, LQ, D), k, v (B, H, LK, D) and the optional out buffer; return (B, H, LQ, D, LK)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.ndim != 4:
            raise ValueError(f"{name} must have 4 dims (batch, heads, length, head_dim), got shape {tuple(t.shape)}")
        if t.dtype not in (*_KERNEL_DTYPES, torch.float32):
            raise ValueError(f"{name} has dtype {t.dtype}; accepted: float16, bfloat16 (float32 on the reference backend)")
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last (head_dim) dimension; call .contiguous() first")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    B, H, LQ, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[1] != H or k.shape[3] != D:
        raise ValueError(f"k and v must have shape ({B}, {H}, LK, {D}) to match q {tuple(q.shape)}; "
                         f"got k {tuple(k.shape)}, v {tuple(v.shape)}")
    if LQ == 0 or k.shape[2] == 0 or D == 0:
        raise ValueError(f"q and k must be non-empty, got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if out is not None and (out.shape != q.shape or out.dtype != q.dtype or out.device != q.device
                            or out.stride(-1) != 1):
        raise ValueError(f"out must be a {tuple(q.shape)} {q.dtype} tensor on {q.device} with a contiguous last "
                         f"dimension, got {tuple(out.shape)} {out.dtype} on {out.device}")
    return B, H, LQ, D, k.shape[2]
