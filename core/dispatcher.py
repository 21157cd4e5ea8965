"""Routes every attention call of a patched model: video self-attention to the sparse path, the rest untouched.

ComfyUI calls ``override(func, q, k, v, heads, mask=..., skip_reshape=..., skip_output_reshape=...,
transformer_options=...)`` where ``func`` is its own attention function (SDPA, Sage, Flash... as the user chose).
Wan passes (B, L, H*D); HunyuanVideo (B, H, L, D) with ``skip_reshape`` and an additive key-padding mask over its
text tokens (behind the video up to ComfyUI 0.3.x, in front of it since). The result goes back in exactly the layout
that was asked for.
"""

from __future__ import annotations

import functools

import torch

from ..kernels import MAX_TRITON_HEAD_DIM, resolve_backend
from .break_even import gpu_class
from .routing import DenseCall, Router
from .session import ForwardContext, SparseAttentionSession

CONTEXT_KEY = "sparse_video_attention"
_COMPUTE_DTYPES = (torch.float16, torch.bfloat16)
# Copies of q, k, v the kernel needs (bf16 of float32 on a GPU; the video moved in front of leading text) are made this
# many bytes (of one copy) at a time, a few heads per launch: they add at most ~4x this to the call's peak memory
# instead of whole copies of q, k, v and the output.
STAGE_CHUNK_BYTES = 256 << 20
# What _sparse_call runs: the planner's sparse attention, its prime (a dense step it learns from, exact), or a dense
# call on the 8-bit kernel at a full layout (precision '8-bit + dense calls').
SPARSE, PRIME, DENSE_8BIT = "sparse", "prime", "dense 8-bit"


class Unsupported(Exception):
    """A video self-attention call the sparse path cannot take; it runs dense with one warning."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


def attention_override(session: SparseAttentionSession, previous=None):
    """The ``optimized_attention_override`` callable. ``previous``: an override already installed (the user's dense
    backend), kept for every call that stays dense, so the two compose."""

    def dense(func, args, kwargs):
        return previous(func, *args, **kwargs) if previous is not None else func(*args, **kwargs)

    def override(func, *args, **kwargs):
        options = kwargs.get("transformer_options") or {}
        ctx = options.get(CONTEXT_KEY)
        if not isinstance(ctx, ForwardContext) or ctx.owner not in (None, session):
            return dense(func, args, kwargs)
        length = _self_attention_length(args, kwargs)
        if length is None:
            return dense(func, args, kwargs)
        if ctx.grid_for(length) is None:
            ctx.note_other_self_attention(options, length)
            return dense(func, args, kwargs)
        mismatch = ctx.layout_mismatch(options)
        if mismatch is not None:
            session.fail_layout(mismatch)
        if session.stood_down is not None or session.layout_error is not None or ctx.dense:
            return dense(func, args, kwargs)
        layer = ctx.layer_of(options)
        if not session.wants_sparse(ctx, layer):
            if session.wants_prime(ctx, layer):  # checked first: the planner needs this call's exact output
                try:
                    return _sparse_call(session, ctx, layer, args, kwargs, kind=PRIME)
                except (Unsupported, ValueError):
                    pass  # a dense step either way; the sparse steps after it meet the same problem and warn
            elif session.wants_dense_8bit(ctx, args[0].device):
                try:
                    return _sparse_call(session, ctx, layer, args, kwargs, kind=DENSE_8BIT)
                except (Unsupported, ValueError) as why:
                    session.warn_once("dense-8-bit-rejected", f"the 8-bit kernel cannot take a dense call ({why}); "
                                      "it runs on your own attention")
            session.record_dense(ctx, layer)
            return dense(func, args, kwargs)
        try:
            return _sparse_call(session, ctx, layer, args, kwargs, dense_of=lambda a, kw: dense(func, a, kw))
        except DenseCall as why:  # most heads' plans are above the kernel's break-even: dense is faster
            session.record_routed_call(ctx, layer, why.route)
            return dense(func, args, kwargs)
        except Unsupported as why:
            session.warn_once(why.key, f"{why}; this attention runs dense")
        except ValueError as why:  # the kernel's input checks: never crash a render over them
            session.warn_once("kernel-rejected", f"the sparse kernel rejected a call ({why}); it runs dense")
        session.record_dense(ctx, layer)
        return dense(func, args, kwargs)

    # torch.compile (ComfyUI's TorchCompileModel) traces the diffusion model, this override included: the routing
    # (step and layer counters, plan caches, one-time warnings) is Python state Dynamo cannot trace, so attention
    # calls run eagerly and the graph breaks around them; the rest of the model still compiles.
    override = torch.compiler.disable(override)
    override.sparse_video_attention_session = session  # how the bridge recognises its own override in a chain
    return override


def _call_parts(args, kwargs):
    q, k, v = args[:3]
    heads = args[3] if len(args) > 3 else kwargs.get("heads")
    mask = args[4] if len(args) > 4 else kwargs.get("mask")
    return q, k, v, heads, mask


def _self_attention_length(args, kwargs) -> int | None:
    """The sequence length of a self-attention call (q, k, v of one shape in a layout ComfyUI names), else None."""
    if len(args) < 3 or len(args) > 5:
        return None
    q, k, v, heads, _ = _call_parts(args, kwargs)
    if not all(isinstance(t, torch.Tensor) for t in (q, k, v)) or not isinstance(heads, int):
        return None
    if q.shape != k.shape or k.shape != v.shape:
        return None
    skip_reshape = kwargs.get("skip_reshape", False)
    if q.ndim != (4 if skip_reshape else 3):
        return None
    return q.shape[2] if skip_reshape else q.shape[1]


def _sparse_call(session, ctx, layer, args, kwargs, dense_of=None, kind=SPARSE):
    """The call on the pack's kernels (``kind``: SPARSE, PRIME or DENSE_8BIT). ``dense_of(args, kwargs)``: the
    user's dense attention, for the heads of a sparse call routed to it (core.routing)."""
    q, k, v, heads, mask = _call_parts(args, kwargs)
    if kwargs.get("skip_reshape", False):
        B, H, L, D = q.shape
        q4, k4, v4 = q, k, v
    else:
        B, L, HD = q.shape
        H, D = heads, HD // heads
        q4, k4, v4 = (t.reshape(B, L, H, D).transpose(1, 2) for t in (q, k, v))
    if D > MAX_TRITON_HEAD_DIM:
        raise Unsupported("head-dim", f"head_dim {D} is larger than the kernel's {MAX_TRITON_HEAD_DIM}")
    lead = ctx.leading_tokens
    kv_length = _memo_key_padding_lengths(ctx, mask, B, L, lead)
    # The Triton kernel takes 16-bit floats: float32 on a GPU is cast to bf16 for it (the reference keeps float32).
    keep = q.dtype in _COMPUTE_DTYPES or q.device.type == "cpu" or session.backend == "reference"
    compute_dtype = q.dtype if keep else torch.bfloat16
    if session.backend == "auto" and resolve_backend("auto", q.device, compute_dtype) != "triton":
        raise Unsupported("no-triton", f"sparse attention is only faster with the Triton kernel on an NVIDIA GPU "
                                       f"(these tensors are on {q.device}); set backend to 'reference' to force the "
                                       "slow torch path")
    q4, k4, v4 = (t if t.stride(-1) == 1 else t.contiguous() for t in (q4, k4, v4))

    skip_output_reshape = kwargs.get("skip_output_reshape", False)
    # Write straight into the layout the caller wants: (B, L, H, D) memory for (B, L, H*D) output. With ``lead``
    # tokens in front of the video the buffer has ``lead`` rows more: the planners write their order (the video, then
    # those tokens) from row ``lead`` on, which puts the video where the caller wants it and the leading tokens past
    # row L; only they are copied to the front.
    rows = L + lead
    buffer = torch.empty((B, H, rows, D) if skip_output_reshape else (B, rows, H, D), device=q.device, dtype=q.dtype)
    heads_first = buffer if skip_output_reshape else buffer.transpose(1, 2)
    out_view = heads_first[:, :, lead:]
    grid = ctx.grid_for(L)
    if kind == SPARSE:
        router = Router(gpu_class(q.device), H, _dense_heads(dense_of, q4, k4, v4, mask, lead, kwargs))
        run = functools.partial(session.attend, router=router)
    else:
        run = session.prime if kind == PRIME else session.attend_dense_8bit
    if compute_dtype != q.dtype or lead:
        work = _staged(run, ctx, layer, (q4, k4, v4), out_view, kv_length, lead, compute_dtype)
    else:
        _, density = run(ctx, layer, q4, k4, v4, kv_length=kv_length, out=out_view)
        work = density * H
    if lead:
        heads_first[:, :, :lead].copy_(heads_first[:, :, L:])
    if kind == SPARSE:
        session.record_sparse(ctx, layer, grid, (work + router.added_work) / H, router.routes)
    elif kind == PRIME:
        session.record_dense(ctx, layer)
    else:
        session.record_dense_8bit(ctx, layer)
    out = buffer.narrow(2 if skip_output_reshape else 1, 0, L)
    if not out.is_contiguous():  # the extra rows sit between batch elements: hand the caller a plain tensor
        out = out.contiguous()
    return out if skip_output_reshape else out.view(B, L, H * D)


def _staged(run, ctx, layer, qkv, out_view, kv_length, lead, compute_dtype) -> float:
    """Run the planner on staged copies of q, k, v (bf16 of float32 on a GPU; the leading tokens moved behind) of a
    few heads at a time, so they add a bounded amount to the call's peak memory, not copies of whole tensors.
    Returns the attention work done, in heads (density x heads)."""
    q4 = qkv[0]
    B, H, L, D = q4.shape
    step = max(1, STAGE_CHUNK_BYTES // (B * L * D * torch.finfo(compute_dtype).bits // 8))
    work = 0.0
    for h0 in range(0, H, step):
        part = slice(h0, h0 + step)
        staged = [_video_first(t[:, part], lead).to(compute_dtype) for t in qkv]
        if compute_dtype == q4.dtype:
            _, density = run(ctx, layer, *staged, kv_length=kv_length, out=out_view[:, part], head_offset=h0)
        else:
            result, density = run(ctx, layer, *staged, kv_length=kv_length, head_offset=h0)
            out_view[:, part].copy_(result)
        work += density * staged[0].shape[1]
        del staged
    return work


def _dense_heads(dense_of, q4, k4, v4, mask, lead: int, kwargs):
    """(the layer's head indices) -> (B, n, L, D): the user's dense attention of those heads, called as ComfyUI calls
    it (heads first, the call's mask and options), in the planners' token order."""
    options = {key: value for key, value in kwargs.items() if key != "heads"}
    options.update(mask=mask, skip_reshape=True, skip_output_reshape=True)

    def run(heads: list) -> torch.Tensor:
        index = torch.tensor(heads, device=q4.device)
        part = [t.index_select(1, index) for t in (q4, k4, v4)]
        return _video_first(dense_of((*part, len(heads)), options), lead)

    return run


def _video_first(t: torch.Tensor, lead: int) -> torch.Tensor:
    """(B, H, L, D) in the model's order -> the planners' order: the ``lead`` tokens in front moved behind."""
    return t if not lead else torch.cat((t[:, :, lead:], t[:, :, :lead]), dim=2)


def _memo_key_padding_lengths(ctx: ForwardContext, mask, batch: int, length: int, lead: int = 0):
    """Every block of one forward passes the same mask object: convert it once (the checks sync the device). The
    mask is over the model's token order; the lengths are over the planners' (``lead`` tokens moved behind)."""
    key = ("kv_length", id(mask), batch, length)
    cached = ctx.memo.get(key)
    if cached is None or cached[0] is not mask:
        video_first = None if mask is None else torch.cat((mask[..., lead:], mask[..., :lead]), dim=-1)
        ctx.memo[key] = cached = (mask, _key_padding_lengths(video_first, batch, length))
    return cached[1]


def _key_padding_lengths(mask, batch: int, length: int):
    """A mask that only hides a suffix of the keys (text padding) becomes per-batch key lengths."""
    if mask is None:
        return None
    # ComfyUI reads a 2D mask as (Lq, Lk), 3D as (B, Lq, Lk), 4D as (B, H, Lq, Lk): only Lq = H = 1 is a key
    # mask.
    per_query = mask.shape[:-1] if mask.ndim == 2 else mask.shape[1:-1]
    if mask.shape[-1] != length or any(s != 1 for s in per_query) or (mask.ndim > 2 and mask.shape[0] not in (1, batch)):
        raise Unsupported("mask-shape", f"an attention mask of shape {tuple(mask.shape)} is not a key-padding mask")
    rows = mask.reshape(-1, length)
    if rows.dtype == torch.bool:
        keep = rows
    else:
        keep = rows == 0
        if not bool((keep | (rows <= -1e4)).all()):
            raise Unsupported("mask-values", "an additive attention mask holds soft biases, not only 0 / -inf")
    lengths = keep.sum(dim=-1)
    prefix = torch.arange(length, device=mask.device)[None, :] < lengths[:, None]
    if not torch.equal(prefix, keep):
        raise Unsupported("mask-order", "an attention mask hides keys that are not a suffix of the sequence")
    return lengths.expand(batch).to(torch.int32).contiguous()
