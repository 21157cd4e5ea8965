"""Workload of benchmarks/sanitize.sh: the Triton block-sparse kernels on odd shapes, for compute-sanitizer memcheck.

Both variants (pointer loads and TMA tensor descriptors, chosen through
``kernels.block_sparse_triton.triton_block_sparse_attention(config=...)``) on L = 1, 256, 257, 4096, 4133 (multiples of
the block take the kernel's unmasked paths); D = 64, 80 (zero-padded to 128, as kernels.attention does) and 128; layout
blocks 64 and 128; with and without kv_length (0, a partial block, past the end); layouts with empty rows, unsorted
lists and, after each row's count, a key block past the end (never to be read); an all-empty layout; token-major out=
views; return_lse. Every tensor the kernel reads or writes ends exactly where its
CUDA allocation ends (with PYTORCH_NO_CUDA_MEMORY_CACHING=1, which sanitize.sh sets), so a read or write past the end
of any of them is an out-of-bounds access memcheck reports. Each result is also compared with the torch reference: a
clean kernel that computes the wrong thing fails too.

    benchmarks/sanitize.sh                                    # GPU, under compute-sanitizer (what to run)
    python benchmarks/sanitize.py                             # GPU, the workload alone
    TRITON_INTERPRET=1 python benchmarks/sanitize.py --smoke  # CPU: a few small cases in Triton's interpreter

Prints "WORKLOAD OK: <n> cases" last, or "WORKLOAD FAIL: ..." and exits 1.
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from pack import import_pack  # noqa: E402



def stray_block(block: int, head_dim: int) -> int:
    """A key block index written after each row's count (never to be read): its keys start 2**29 elements (1 GiB of
    bf16) past the tensor, beyond this small workload's allocations, so a read is reported wherever it happens (a
    stray a little past the end could land in a neighbouring allocation, which memcheck does not flag). Not larger:
    the kernel's offsets are int32 (2**30 blocks * 64 tokens * 64 elements would wrap to 0, back inside the tensor)."""
    return (1 << 29) // (block * head_dim)
TOL = 2e-2
ALLOC_ALIGN = 512  # PyTorch rounds every CUDA allocation up to this many bytes


def tail_empty(shape, dtype, device) -> torch.Tensor:
    """An uninitialised tensor that ends exactly at the end of its own allocation."""
    numel = math.prod(shape)
    elem = torch.empty((), dtype=dtype).element_size()
    total = -(-numel * elem // ALLOC_ALIGN) * ALLOC_ALIGN // elem
    buf = torch.empty(max(total, 1), dtype=dtype, device=device)
    return buf[buf.numel() - numel:].view(shape)


def tail_copy(t: torch.Tensor) -> torch.Tensor:
    out = tail_empty(tuple(t.shape), t.dtype, t.device)
    out.copy_(t)
    return out


def random_layout(nqb, nkb, heads, gen, device, *, stray, empty_rows=True):
    """(1, heads, nqb, width) unsorted distinct key blocks, counts in [0 or 1, width], a block past the end after
    each row's count."""
    width = max(1, (nkb + 1) // 2)
    order = torch.rand(1, heads, nqb, nkb, generator=gen, device=device).argsort(-1)[..., :width]
    counts = torch.randint(0 if empty_rows else 1, width + 1, (1, heads, nqb), generator=gen, device=device)
    if empty_rows and nqb > 1:
        counts[0, 0, 0] = 0
    slot = torch.arange(width, device=device)
    clean = order.to(torch.int32)
    dirty = torch.where(slot < counts[..., None], clean, torch.full_like(clean, stray))
    return dirty, counts.to(torch.int32), clean


def pad_head_dim(t, to):
    return torch.nn.functional.pad(t, (0, to - t.shape[-1]))


def run_case(K, T, case, device, gen, plant_oob=False) -> str | None:
    """One kernel launch and its check; returns an error message or None."""
    L, D, block, variant, kv_kind, layout_kind, out_kind = case
    B, H = 2, 2
    dtype = torch.bfloat16
    nb = -(-L // block)
    padded = max(16, 1 << (D - 1).bit_length())
    q, k, v = (tail_copy(torch.randn(B, H, L, D, generator=gen, device=device).to(dtype)) for _ in range(3))
    if layout_kind == "all-empty":
        clean = torch.zeros(1, H, nb, 1, dtype=torch.int32, device=device)
        counts = torch.zeros(1, H, nb, dtype=torch.int32, device=device)
        dirty = torch.full_like(clean, stray_block(block, padded))
    else:
        dirty, counts, clean = random_layout(nb, nb, H, gen, device, stray=stray_block(block, padded))
    kv_length = None
    if kv_kind == "kv_length":
        kv_length = tail_copy(torch.tensor([min(L, block + 3) if L > 1 else 1, 0], dtype=torch.int32, device=device))
    elif kv_kind == "kv_past_end":
        kv_length = tail_copy(torch.tensor([L + 100, max(L - 1, 0)], dtype=torch.int32, device=device))
    if plant_oob:  # the self-test: one count past its row's valid entries, so the kernel reads a block past the end
        counts = counts.clone()
        counts[0, 0, 0] = clean.shape[-1]
        dirty[0, 0, 0, -1] = stray_block(block, padded)
    qp, kp, vp = (tail_copy(pad_head_dim(t, padded)) if padded != D else t for t in (q, k, v))
    if out_kind == "token-major":  # (B, L, H, D) memory seen as (B, H, L, D), as the dispatcher passes it
        out = tail_empty((B, L, H, padded), dtype, device).transpose(1, 2)
    else:
        out = tail_empty((B, H, L, padded), dtype, device)
    out.fill_(float("nan"))
    config = dict(BLOCK_N=64, num_warps=4, num_stages=2 if device.type == "cuda" else 1, tma=variant == "tma")
    o, lse = T.triton_block_sparse_attention(qp, kp, vp, tail_copy(dirty), tail_copy(counts), block_size=block,
                                             scale=1.0 / math.sqrt(D), kv_length=kv_length, return_lse=True, out=out,
                                             config=config)
    if device.type == "cuda":
        torch.cuda.synchronize()
    o = o[..., :D]
    want, want_lse = K.reference_block_sparse_attention(q, k, v, clean, counts, block_size=block,
                                                         scale=1.0 / math.sqrt(D), kv_length=kv_length,
                                                         return_lse=True)
    if torch.isnan(o).any() or torch.isnan(lse).any():
        return "NaN in the output or LSE (an output row not written, or a 0/0)"
    err = float((o.float() - want.float()).norm() / want.float().norm().clamp(min=1e-6))
    if want.float().norm() == 0:
        err = float(o.float().abs().max())
    if err > TOL:
        return f"output off the torch reference: relative error {err:.2e}"
    finite = torch.isfinite(want_lse)
    if not torch.equal(finite, torch.isfinite(lse)):
        return "LSE: rows without keys must give -inf, and only those"
    if finite.any() and float((lse[finite] - want_lse[finite]).abs().max()) > 1e-2:
        return "LSE off the torch reference"
    return None


def cases(smoke: bool, tma: bool):
    if smoke:
        yield from [(1, 64, 64, "pointer", "none", "random", "contiguous"),
                    (257, 80, 64, "pointer", "kv_length", "random", "token-major"),
                    (130, 64, 128, "pointer", "kv_past_end", "all-empty", "contiguous")]
        return
    variants = ["pointer", "tma"] if tma else ["pointer"]
    for L, D, block, variant in itertools.product((1, 256, 257, 4096, 4133), (64, 80, 128), (64, 128), variants):
        yield (L, D, block, variant, "none", "random", "contiguous")
    for L, variant, kv_kind in itertools.product((1, 256, 4133), variants, ("kv_length", "kv_past_end")):
        yield (L, 128, 128, variant, kv_kind, "random", "token-major")
    for L, variant in itertools.product((257, 4133), variants):
        yield (L, 64, 64, variant, "none", "all-empty", "token-major")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="a few small cases (the CPU interpreter)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plant-oob", action="store_true",
                   help="self-test of the check: one launch reads a key block far out of bounds (must be reported)")
    args = p.parse_args(argv)
    K = import_pack("kernels")
    T = import_pack("kernels.block_sparse_triton")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not K.triton_available(device):
        print("WORKLOAD FAIL: no CUDA GPU and no Triton interpreter (set TRITON_INTERPRET=1 for --smoke)")
        return 1
    tma = device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9 \
        and T._tensor_descriptor_class() is not None
    gen = torch.Generator(device=device).manual_seed(args.seed)
    failures, n = [], 0
    if args.plant_oob:
        # L a multiple of the block: the key loads are unmasked, so the stray block is really read
        run_case(K, T, (256, 64, 64, "pointer", "none", "random", "contiguous"), device, gen, plant_oob=True)
        print("WORKLOAD PLANTED: one out-of-bounds launch ran (the sanitizer must report it)")
        return 0
    for case in cases(args.smoke or device.type == "cpu", tma):
        n += 1
        try:
            why = run_case(K, T, case, device, gen)
        except Exception as exc:  # noqa: BLE001  (a launch error is a finding too)
            why = f"{type(exc).__name__}: {exc}"
        if why:
            failures.append(f"{case}: {why}")
            print(f"case {case}: FAIL {why}", flush=True)
    variants = "pointer + TMA" if tma else "pointer only (TMA needs Hopper and Triton >= 3.4)"
    if failures:
        print(f"WORKLOAD FAIL: {len(failures)} of {n} cases ({variants})")
        return 1
    print(f"WORKLOAD OK: {n} cases ({variants})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
