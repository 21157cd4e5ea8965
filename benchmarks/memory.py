"""Peak GPU memory of one video self-attention call: ComfyUI's dense attention against the Radial sparse path.

    python benchmarks/memory.py                  # Wan 2.1 14B 720p: B=1, H=40, L=75600 (21 x 45 x 80), D=128, bf16
    python benchmarks/memory.py --dtype float32  # the same in float32 (the sparse path casts to bf16 for the kernel)
    python benchmarks/memory.py --smoke          # CPU: a tiny shape through the same code, no peak numbers

Both paths get the same (B, L, H*D) q, k, v, as ComfyUI's Wan self-attention passes them, and return (B, L, H*D).
Dense: ComfyUI's ``attention_pytorch`` (SDPA; reproduced here so ComfyUI is not needed). Sparse: the pack's
``core.attention_override`` with a session and a ForwardContext of a sparse step and layer, the dense function as
``func``. A first call of each builds what it caches (the Radial layout) and compiles the kernel; the measured call is
the next one. Peak = torch.cuda.max_memory_allocated during the call minus what was allocated before it (the inputs,
and the session's cached layouts, whose bytes session.cache_bytes() reports and the table lists).

Exit status 1 if the sparse peak is above the dense peak + the cache bytes + a slack (--slack-mib, default 64), plus
for float32 on the GPU the bf16 copies the kernel needs, a few heads at a time (4 x core.dispatcher.STAGE_CHUNK_BYTES).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from pack import import_pack  # noqa: E402

SHAPES = {  # name: (batch, heads, head_dim, frames, height, width) of the patchified latent
    "wan14b-720p": (1, 40, 128, 21, 45, 80),   # 81 frames 1280 x 720 -> 21 x 45 x 80 = 75600 tokens
    "wan1.3b-480p": (1, 12, 128, 21, 30, 52),  # 81 frames 832 x 480 -> 32760 tokens
}
SMOKE_SHAPE = (1, 2, 32, 5, 6, 10)  # 300 tokens: 3 blocks of 128, frames straddling blocks
MIB = 1 << 20


def comfy_attention(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False, skip_output_reshape=False,
                    **kwargs):
    """ComfyUI's attention_pytorch (comfy/ldm/modules/attention.py), condensed: what ``func`` is for an override,
    reproduced so the benchmark (and the tests that use it) need no ComfyUI."""
    if skip_reshape:
        b, _, _, dim_head = q.shape
    else:
        b, _, dim_head = q.shape
        dim_head //= heads
        q, k, v = (t.view(b, -1, heads, dim_head).transpose(1, 2) for t in (q, k, v))
    if mask is not None and mask.ndim == 2:  # ComfyUI: (Lq, Lk) -> batch dim, then (B, Lq, Lk) -> heads dim
        mask = mask.unsqueeze(0)
    if mask is not None and mask.ndim == 3:
        mask = mask.unsqueeze(1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False)
    if not skip_output_reshape:
        out = out.transpose(1, 2).reshape(b, -1, heads * dim_head)
    return out


def make_session(core, backend: str):
    method = core.RadialSettings(decay_factor=0.2, block_size=128, attention_sink=True)  # Wan's reference settings
    schedule = core.SparseSchedule(dense_steps=0, dense_layers=0)  # every call of this benchmark is a sparse one
    return core.SparseAttentionSession(method, schedule, backend=backend)


def sparse_call(core, override, session, grid, q, k, v, heads):
    sample_sigmas = torch.linspace(1.0, 0.0, 31)  # a 30-step run; the call belongs to step 10
    ctx = session.forward_context(grid, float(sample_sigmas[10]), sample_sigmas)
    return override(comfy_attention, q, k, v, heads, transformer_options={core.CONTEXT_KEY: ctx})


def measure(fn, device) -> tuple[int | None, float]:
    """(peak bytes above what was allocated before the call, seconds) of one call; no peak off CUDA."""
    if device.type != "cuda":
        start = time.perf_counter()
        out = fn()
        del out
        return None, time.perf_counter() - start
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    out = fn()
    torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) - before
    del out
    return peak, seconds


def verdict(dense_peak: int, sparse_peak: int, extra_bytes: int, slack: int) -> tuple[bool, str]:
    """extra_bytes: what the sparse path may hold on top of dense (cached layouts, float32 cast buffers)."""
    limit = dense_peak + extra_bytes + slack
    ok = sparse_peak <= limit
    word = "OK" if ok else "FAIL"
    return ok, (f"{word}: sparse peak {sparse_peak / MIB:.1f} MiB {'<=' if ok else '>'} dense peak "
                f"{dense_peak / MIB:.1f} MiB + cache/cast {extra_bytes / MIB:.2f} MiB + slack {slack / MIB:.0f} MiB")


def fmt(nbytes) -> str:
    return f"{'n/a':>10}" if nbytes is None else f"{nbytes / MIB:10.1f}"


def run(shape, dtype, device, slack: int, check_output: bool) -> int:
    core = import_pack("core")
    dispatcher = import_pack("core.dispatcher")
    B, H, D, T, Hh, W = shape
    grid = core.VideoGrid(T, Hh, W)
    L = grid.total_tokens
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(B, L, H * D, generator=gen, device=device, dtype=dtype) for _ in range(3))
    backend = "auto" if device.type == "cuda" else "reference"
    session = make_session(core, backend)
    override = core.attention_override(session)

    dense = lambda: comfy_attention(q, k, v, H)  # noqa: E731
    sparse = lambda: sparse_call(core, override, session, grid, q, k, v, H)  # noqa: E731
    first_dense = measure(dense, device)
    first_sparse = measure(sparse, device)  # builds the layout, compiles the kernel
    cache = sum(session.cache_bytes().values())
    dense_peak, dense_s = measure(dense, device)
    sparse_peak, sparse_s = measure(sparse, device)
    stats = session.stats
    if stats.fallbacks or stats.sparse_calls != 1:  # both calls are (step 10, layer 0): one entry
        print(f"FAIL: the sparse path did not run sparse (fallbacks {stats.fallbacks}, calls {stats.calls})")
        return 1
    density = next(iter(stats.calls.values()))

    size = q.element_size() * q.numel()
    print(f"shape B={B} H={H} L={L} ({T} x {Hh} x {W}) D={D} {str(dtype).replace('torch.', '')} on {device}"
          f"{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}; "
          f"one of q/k/v = {size / MIB:.1f} MiB; Radial density {density:.3f}")
    print(f"{'path':<28}{'peak MiB':>10}{'first call MiB':>16}{'seconds':>10}")
    print(f"{'dense (ComfyUI SDPA)':<28}{fmt(dense_peak)}{fmt(first_dense[0]):>16}{dense_s:10.3f}")
    print(f"{'sparse (Radial override)':<28}{fmt(sparse_peak)}{fmt(first_sparse[0]):>16}{sparse_s:10.3f}")
    print(f"{'cached layouts (persistent)':<28}{cache / MIB:10.2f}  {session.cache_bytes()}")
    cast = 0
    if device.type == "cuda" and dtype not in (torch.float16, torch.bfloat16):  # q, k, v, result in bf16, a few heads
        cast = 4 * dispatcher.STAGE_CHUNK_BYTES
        print(f"{'bf16 cast buffers (allowed)':<28}{cast / MIB:10.2f}  (float32 inputs: 4 x STAGE_CHUNK_BYTES)")

    if check_output:  # the tiny smoke shape: the override's output is the masked attention it claims to be
        got = sparse_call(core, override, session, grid, q, k, v, H).view(B, L, H, D).transpose(1, 2).double()
        mask = core.radial_block_mask(grid, session.method)
        token = torch.arange(L, device=device) // session.method.block_size
        allowed = mask.to(device)[token][:, token]
        q4, k4, v4 = (t.view(B, L, H, D).transpose(1, 2).double() for t in (q, k, v))
        want = F.scaled_dot_product_attention(q4, k4, v4, attn_mask=allowed)
        err = float((got - want).norm() / want.norm())
        if not err < 1e-4:
            print(f"FAIL: the sparse output is off the masked dense reference (relative error {err:.2e})")
            return 1
    if dense_peak is None:
        print("SMOKE OK: the sparse path ran sparse and matches its reference (no CUDA: peaks not measured)")
        return 0
    ok, line = verdict(dense_peak, sparse_peak, cache + cast, slack)
    print(line)
    return 0 if ok else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=list(SHAPES), default="wan14b-720p")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    p.add_argument("--slack-mib", type=float, default=64.0, help="allowed excess of the sparse peak (MiB)")
    p.add_argument("--smoke", action="store_true", help="tiny shape on the CPU (torch reference backend)")
    args = p.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    slack = int(math.ceil(args.slack_mib * MIB))
    if args.smoke:
        return run(SMOKE_SHAPE, torch.float32 if args.dtype == "bfloat16" else dtype, torch.device("cpu"), slack,
                   check_output=True)
    if not torch.cuda.is_available():
        print("FAIL: needs a CUDA GPU (use --smoke on the CPU)")
        return 1
    return run(SHAPES[args.shape], dtype, torch.device("cuda"), slack, check_output=False)


if __name__ == "__main__":
    sys.exit(main())
