"""Ulysses sequence parallelism around the pack's sparse attention, on torch.distributed.

Design
------
Several GPUs share one video: each of P ranks holds a contiguous 1/P of the tokens (the sequence padded at its end to
a multiple of P, as raylight and xDiT shard it) for every one of the H heads. One all-to-all (q, k and v together)
gives each rank the whole sequence for H/P heads, rank r holding heads r*H/P .. (r+1)*H/P - 1; the rank's session then
runs its planner exactly as on one GPU, with ``head_offset`` = the rank's first head, so every method's per-head state
(SVG head classes, SVG2 centroids, AdaSpa patterns and LSE; Radial's layout depends on the grid only) is keyed by the
true head and lives only on the rank that owns that head. A second all-to-all returns the output to the sequence
shards. Calls the schedule keeps dense take the same route, to ComfyUI's attention on the rank's heads.

The transport is ``torch.distributed.all_to_all_single`` (NCCL on GPUs, gloo on CPU). yunchang 0.6.4 was considered:
it imports and moves data on gloo/CPU, but its ``UlyssesAttention`` picks the inner attention from a closed enum
(``AttnType``: flash-attn, SageAttention, torch SDPA...) when it is built and calls it with flash-attn's arguments,
so our planner would go in only by overwriting a private attribute; its all-to-all is the same
``all_to_all_single`` this module calls. The pack's dependencies stay torch, triton, einops, safetensors, ComfyUI.

Failure modes, each a clear error on every rank and never a hang:

* a head count P does not divide: ValueError before any collective (every rank sees the same head count);
* settings or call shapes that differ between ranks: the first sequence-parallel call of each run all-gathers a
  fingerprint of the settings and of the call's shape, and every rank raises ``SequenceParallelError`` naming the
  ranks that differ;
* a rank that dies or stops calling: the others' collectives fail, at the latest after the process group's timeout
  (``init_process_group(timeout=...)`` / ``new_group(timeout=...)``), re-raised as ``SequenceParallelError`` where
  the backend raises (gloo; NCCL's watchdog instead ends the process after that timeout with its own message).
  ``SequenceParallelError`` is a RuntimeError, so the dispatcher never turns it into a one-rank dense fallback.

Ring attention with the Radial mask (not built; the issue asks for it only where measurements on several GPUs show
it pays, and none were lent yet). In ring attention rank r keeps its query shard and the key/value shards travel
round the ring: P - 1 steps, each sending L/P keys and values per head. Radial keeps, for a query frame, every key
frame within distance 1 and, farther off, a band whose width halves with each doubling of the frame distance, plus
the text and the attention sink (frame 0) densely. With contiguous sequence shards of F/P frames each, rank r needs
from rank s only the key blocks inside the bands of its frames: at distance d ~ |r - s| F/P frames that is about
(1/2)^floor(log2 d) of the shard (the strided keep once the diagonal is narrower than a block), so the far shards
could go as a gathered subset of blocks, not whole. But every rank still needs frame 0 (the sink) and the text from
the first and last shards, the per-step volume is set by the nearest shards (which Radial keeps dense), and the
Ulysses all-to-all already moves only 4 x (P - 1)/P of one rank's q, k, v, o per call without any per-step
synchronisation. What ring with a Radial skip would save is the bytes of far key shards at P >= 4, against P - 1
dependent steps; whether that beats Ulysses' two all-to-alls is for benchmarks/sequence_parallel.py to measure first
(Ulysses at P GPUs against 0.9 x P of one GPU's sparse speed). Ulysses alone is capped at P <= H (40 heads for
Wan 14B): enough for 2, 4 and 8 GPUs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math

import torch
import torch.distributed as dist

from .adaspa import AdaSpaSettings
from .dispatcher import CONTEXT_KEY
from .radial import RadialSettings
from .schedule import SparseSchedule
from .session import ForwardContext, SparseAttentionSession
from .svg import SVGSettings
from .svg2 import SVG2Settings

METHODS = {"radial": RadialSettings, "svg": SVGSettings, "svg2": SVG2Settings, "adaspa": AdaSpaSettings}
SESSION_KEYS = ("method", "method_settings", "dense_steps", "sparse_end", "dense_layers", "backend", "verbose",
                "compensate", "precision")


class SequenceParallelError(RuntimeError):
    """A sequence-parallel collective failed or the ranks disagree: raised on every rank, the run cannot go on."""


class SequenceParallel:
    """The ranks of one sequence-parallel group (``group``: a torch.distributed process group, None: the default one)
    and what must match across them (``fingerprint``: the settings every rank was built from)."""

    def __init__(self, group=None, fingerprint: str = ""):
        if not dist.is_available() or not dist.is_initialized():
            raise ValueError("sequence parallelism needs torch.distributed initialised first "
                             "(torch.distributed.init_process_group, as torchrun or raylight's workers do)")
        self.group = group
        self.fingerprint = fingerprint
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self._verified = False

    def reset(self) -> None:
        """A new sampling run: its first call checks the ranks agree again."""
        self._verified = False

    def heads_per_rank(self, heads: int) -> int:
        if heads % self.world:
            raise ValueError(f"sequence parallelism over {self.world} ranks needs a head count they divide, got "
                             f"{heads} heads; use a number of GPUs that divides {heads}")
        return heads // self.world

    def shard_length(self, total: int) -> int:
        """Tokens per rank of a ``total``-token sequence padded to a multiple of the ranks."""
        return math.ceil(total / self.world)

    def verify(self, call_signature: tuple) -> None:
        """Once per run: every rank was built from the same settings and makes the same call (else an error on
        every rank, naming the ranks that differ)."""
        if self._verified:
            return
        text = json.dumps([self.fingerprint, [str(x) for x in call_signature]])
        digest = int.from_bytes(hashlib.sha256(text.encode()).digest()[:7], "little")
        mine = torch.tensor([digest], dtype=torch.int64, device=self._device())
        every = [torch.empty_like(mine) for _ in range(self.world)]
        self._collective("settings check", lambda: dist.all_gather(every, mine, group=self.group))
        digests = [int(t.item()) for t in every]
        if len(set(digests)) > 1:
            groups: dict = {}
            for rank, d in enumerate(digests):
                groups.setdefault(d, []).append(rank)
            raise SequenceParallelError(
                "sequence-parallel ranks were patched with different settings or run different calls (ranks "
                f"grouped by what they run: {sorted(groups.values())}); give every rank the same settings dict")
        self._verified = True

    def _device(self) -> torch.device:
        backend = dist.get_backend(self.group)
        return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")

    def _collective(self, what: str, run) -> None:
        try:
            run()
        except RuntimeError as why:  # gloo / NCCL: a peer closed its connection, or the group's timeout passed
            raise SequenceParallelError(
                f"sequence parallel {what} failed on rank {self.rank} of {self.world} ({type(why).__name__}: "
                f"{why}); another rank died or stopped calling. The process group's timeout bounds the wait") \
                from why

    def seq_to_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, Ls, D) this rank's tokens of every head -> (B, H/P, P*Ls, D) every token of this rank's heads."""
        B, H, Ls, D = x.shape
        hp = self.heads_per_rank(H)
        send = x.reshape(B, self.world, hp, Ls, D).transpose(0, 1).contiguous()  # chunk j: rank j's heads
        received = torch.empty_like(send)  # chunk i: rank i's tokens of this rank's heads
        self._collective("all-to-all", lambda: dist.all_to_all_single(received, send, group=self.group))
        return received.permute(1, 2, 0, 3, 4).reshape(B, hp, self.world * Ls, D)

    def heads_to_seq(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H/P, P*Ls, D) -> (B, H, Ls, D): the inverse of ``seq_to_heads``."""
        B, hp, L, D = x.shape
        Ls = L // self.world
        send = x.reshape(B, hp, self.world, Ls, D).permute(2, 0, 1, 3, 4).contiguous()  # chunk j: rank j's tokens
        received = torch.empty_like(send)  # chunk i: rank i's heads of this rank's tokens
        self._collective("all-to-all", lambda: dist.all_to_all_single(received, send, group=self.group))
        return received.transpose(0, 1).reshape(B, self.world * hp, Ls, D)


def ulysses_attention(sp: SequenceParallel, q, k, v, length: int, attend) -> torch.Tensor:
    """Attention of (B, H, Ls, D) sequence shards of a ``length``-token sequence (padded at its end to P*Ls).

    ``attend(q, k, v, head_offset)`` gets (B, H/P, length, D): the whole sequence of heads head_offset.. and returns
    its (B, H/P, length, D) output. Returns this rank's (B, H, Ls, D) shard of the output.
    """
    B, H, Ls, D = q.shape
    hp = sp.heads_per_rank(H)
    if not length <= sp.world * Ls < length + sp.world:
        raise ValueError(f"each of the {sp.world} ranks must hold {sp.shard_length(length)} tokens of the "
                         f"{length}-token sequence (padded at its end to a multiple of the ranks), got {Ls}")
    sp.verify((B, H, Ls, D, q.dtype, length))
    heads = sp.seq_to_heads(torch.cat((q, k, v)))[:, :, :length]  # q, k, v travel in one all-to-all
    out = attend(*heads.chunk(3), head_offset=sp.rank * hp)
    if out.shape[2] < sp.world * Ls:
        out = torch.nn.functional.pad(out, (0, 0, 0, sp.world * Ls - out.shape[2]))
    return sp.heads_to_seq(out)


def ulysses_attend(session: SparseAttentionSession, sp: SequenceParallel, ctx: ForwardContext, layer: int,
                   q, k, v) -> tuple[torch.Tensor, float]:
    """The session's sparse attention of one layer over sequence shards: (this rank's output shard, the density of
    this rank's heads)."""
    densities = []

    def attend(q, k, v, head_offset):
        out, density = session.attend(ctx, layer, q, k, v, head_offset=head_offset)
        densities.append(density)
        return out

    return ulysses_attention(sp, q, k, v, ctx.video.total_tokens, attend), densities[0]


def ulysses_override(sp: SequenceParallel, inner):
    """An ``optimized_attention_override`` for a model whose forward shards the sequence (raylight's workers): each
    video self-attention call over this rank's shard goes through the all-to-all to ``inner`` (the pack's hook) as a
    call over the whole video for this rank's heads; every other call goes to ``inner`` unchanged."""

    def override(func, q, k, v, heads, mask=None, skip_reshape=False, skip_output_reshape=False, **kwargs):
        options = kwargs.get("transformer_options") or {}
        ctx = options.get(CONTEXT_KEY)
        length = q.shape[2] if skip_reshape else q.shape[1]
        # As on one GPU, a call is self-attention by its shapes: a cross-attention whose text is exactly as long as
        # the rank's shard would be taken for one (the same limit the dispatcher has for the whole video).
        sharded = isinstance(ctx, ForwardContext) and sp.world > 1 and q.shape == k.shape == v.shape \
            and length == sp.shard_length(ctx.video.total_tokens)
        if not sharded:
            return inner(func, q, k, v, heads, mask=mask, skip_reshape=skip_reshape,
                         skip_output_reshape=skip_output_reshape, **kwargs)
        if not skip_reshape:
            q, k, v = (t.view(t.shape[0], length, heads, -1).transpose(1, 2) for t in (q, k, v))
        total = ctx.video.total_tokens
        if mask is not None and mask.shape[-1] != total:
            mask = mask[..., :total]  # over the padded keys: the padding is cut off before attention

        def attend(q, k, v, head_offset):
            ctx.head_offset = head_offset
            return inner(func, q, k, v, q.shape[1], mask=mask, skip_reshape=True, skip_output_reshape=True, **kwargs)

        out = ulysses_attention(sp, q, k, v, total, attend)
        return out if skip_output_reshape else out.transpose(1, 2).reshape(out.shape[0], length, -1)

    return torch.compiler.disable(override)  # collectives and Python state, as the pack's own hook


def session_from_settings(settings: dict, group=None) -> SparseAttentionSession:
    """A session built from a plain settings dict (JSON-like, the same on every rank), for sequence parallelism over
    ``group`` (None: the default process group).

    ``method``: 'radial', 'svg', 'svg2' or 'adaspa'; ``method_settings``: that method's settings by field name
    (core.RadialSettings...); ``dense_steps``, ``sparse_end``, ``dense_layers``: the schedule (core.SparseSchedule);
    ``backend``, ``verbose``, ``compensate`` ('auto' / 'off' / 'on'), ``precision`` ('bf16', '8-bit', 'auto',
    '8-bit + dense calls'): as on Sparse Attention Patch. Missing keys take the node defaults.
    """
    unknown = set(settings) - set(SESSION_KEYS)
    if unknown:
        raise ValueError(f"unknown sparse attention settings {sorted(unknown)}; the keys are {list(SESSION_KEYS)}")
    name = settings.get("method", "radial")
    if name not in METHODS:
        raise ValueError(f"method must be one of {list(METHODS)}, got {name!r}")
    kind = METHODS[name]
    fields = {f.name: f for f in dataclasses.fields(kind)}
    given = dict(settings.get("method_settings") or {})
    wrong = set(given) - set(fields)
    if wrong:
        raise ValueError(f"{name} has no settings {sorted(wrong)}; its settings are {list(fields)}")
    given = {key: tuple(value) if isinstance(value, list) else value for key, value in given.items()}
    schedule = SparseSchedule(dense_steps=settings.get("dense_steps", 0.25), sparse_end=settings.get("sparse_end", 1.0),
                              dense_layers=settings.get("dense_layers", 1))
    session = SparseAttentionSession(kind(**given), schedule, backend=settings.get("backend", "auto"),
                                     verbose=bool(settings.get("verbose", False)),
                                     compensate=settings.get("compensate", "auto"),
                                     precision=settings.get("precision", "bf16"))
    fingerprint = json.dumps(settings, sort_keys=True, default=str)
    session.sequence_parallel = SequenceParallel(group, fingerprint=fingerprint)
    return session
