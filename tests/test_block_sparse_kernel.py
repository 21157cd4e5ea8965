"""Block-sparse attention at small, odd shapes: the Triton kernel and the torch reference, both checked against a
dense float64 oracle; layout helpers; input validation. Runs on the CPU (the kernel under Triton's interpreter),
or on the GPU where CUDA is available (test_block_sparse_gpu.py adds realistic sizes there).

Inputs and layouts are random on every run. Each test prints its seed (shown by pytest on failure) and puts it
in its assertion messages; rerun with BSA_SEED=<seed> to reproduce a failure.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

from pack import import_pack

K = import_pack("kernels")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # conftest: no CUDA -> interpreter
BACKENDS = ("triton", "reference")
OUT_TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-5}
LSE_TOL = 1e-3

# Noise from Triton's numpy interpreter: log2(0) of empty rows warns (-inf is the intended result), and it
# converts 1-element arrays to scalars, which numpy >= 1.25 deprecates.
pytestmark = [pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")]


# ---------------------------------------------------------------------------------------------- helpers


def new_generator(device="cpu") -> torch.Generator:
    seed = int(os.environ.get("BSA_SEED") or int.from_bytes(os.urandom(6), "little"))
    print(f"seed {seed} (rerun with BSA_SEED={seed})")
    return torch.Generator(device=device).manual_seed(seed)


@pytest.fixture
def gen():
    return new_generator(DEVICE)


@pytest.fixture
def cpu_gen():
    return new_generator()


def make_qkv(B, H, LQ, LK, D, dtype, gen, *, device=DEVICE, token_major=False, scale=1.0):
    """Random q (B, H, LQ, D), k, v (B, H, LK, D); token_major: views of (B, L, H, D) tensors (Wan/Comfy layout)."""
    def rand(L):
        shape = (B, L, H, D) if token_major else (B, H, L, D)
        t = (torch.randn(shape, generator=gen, device=device) * scale).to(dtype)
        return t.transpose(1, 2) if token_major else t
    return rand(LQ), rand(LK), rand(LK)


def random_layout(lead, nqb, nkb, gen, *, width=None, min_count=1, device=DEVICE):
    """Distinct key blocks in random (unsorted) order; the entries after each count are other valid blocks,
    which the kernels must ignore."""
    width = nkb if width is None else width
    perm = torch.rand(*lead, nqb, nkb, generator=gen, device=device).argsort(-1)[..., :width]
    counts = torch.randint(min_count, width + 1, (*lead, nqb), generator=gen, device=device)
    return perm.to(torch.int32).contiguous(), counts.to(torch.int32)


def banded_layout(lead, nqb, nkb, half_width, device=DEVICE):
    rows = torch.arange(nqb, device=device)[:, None]
    cols = torch.arange(nkb, device=device)[None, :]
    mask = ((rows * nkb // nqb - cols).abs() <= half_width).expand(*lead, nqb, nkb)
    return K.block_mask_to_indices(mask.contiguous())


def oracle_block_mask(kv_indices, kv_counts, num_kv_blocks):
    """(..., NQB, NKB) bool from the first kv_counts entries of each list, without the package's helpers."""
    used = torch.arange(kv_indices.shape[-1], device=kv_indices.device) < kv_counts[..., None].long()
    hits = F.one_hot(kv_indices.long(), num_kv_blocks).bool() & used[..., None]
    return hits.any(dim=-2)


def dense_oracle(q, k, v, kv_indices, kv_counts, block_size, *, scale=None, kv_length=None, row_chunk=None):
    """Dense float64 attention under the token mask implied by the layout (and kv_length).

    Returns (out float64 (B, H, LQ, D), lse float64 (B, H, LQ)); rows with no allowed key give 0 and -inf.
    row_chunk bounds the (B, H, rows, LK) score buffer for large shapes.
    """
    B, H, LQ, D = q.shape
    LK = k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    block_mask = oracle_block_mask(kv_indices, kv_counts, -(-LK // block_size)).expand(B, H, -1, -1)
    key_pos = torch.arange(LK, device=q.device)
    key_ok = torch.ones(B, LK, dtype=torch.bool, device=q.device) if kv_length is None \
        else key_pos[None, :] < kv_length.to(q.device).long()[:, None]
    k64, v64 = k.double(), v.double()
    out = torch.empty(B, H, LQ, D, dtype=torch.float64, device=q.device)
    lse = torch.empty(B, H, LQ, dtype=torch.float64, device=q.device)
    step = row_chunk or LQ
    for r0 in range(0, LQ, step):
        rows = torch.arange(r0, min(LQ, r0 + step), device=q.device)
        mask = block_mask[:, :, rows // block_size][..., key_pos // block_size] & key_ok[:, None, None, :]
        s = (q[:, :, rows].double() @ k64.transpose(-1, -2)) * scale
        s = s.masked_fill(~mask, float("-inf"))
        row_lse = torch.logsumexp(s, dim=-1)
        p = torch.exp(s - row_lse[..., None]).masked_fill(~mask, 0.0)  # empty rows: NaN -> 0
        out[:, :, rows] = p @ v64
        lse[:, :, rows] = row_lse
    return out, lse


def assert_matches(out, lse, expected, dtype, ctx):
    """Output rel. error and LSE abs. error against the oracle; empty rows exactly 0 and -inf; no NaN."""
    exp_out, exp_lse = expected
    assert out.shape == exp_out.shape and out.dtype == dtype, f"{ctx}: got {tuple(out.shape)} {out.dtype}"
    assert not torch.isnan(out).any(), f"{ctx}: NaN in output"
    empty = torch.isneginf(exp_lse)
    assert (out[empty] == 0).all(), f"{ctx}: rows with no key must be exactly 0"
    err = (out.double() - exp_out).norm().item()
    ref = exp_out.norm().item()
    if ref > 0:
        assert err / ref < OUT_TOL[dtype], f"{ctx}: relative error {err / ref:.2e} >= {OUT_TOL[dtype]:.0e}"
    else:
        assert err == 0, f"{ctx}: expected an all-zero output"
    if lse is None:
        return
    assert lse.shape == exp_lse.shape and lse.dtype == torch.float32, f"{ctx}: lse {tuple(lse.shape)} {lse.dtype}"
    assert not torch.isnan(lse).any() and not torch.isposinf(lse).any(), f"{ctx}: NaN or +inf in lse"
    assert torch.equal(torch.isneginf(lse), empty), f"{ctx}: lse must be -inf exactly on the empty rows"
    if (~empty).any():
        lse_err = (lse.double() - exp_lse)[~empty].abs().max().item()
        assert lse_err < LSE_TOL, f"{ctx}: lse abs error {lse_err:.2e} >= {LSE_TOL:.0e}"


def run_and_check(backend, q, k, v, layout, block_size, gen, *, ctx="", **kwargs):
    out, lse = K.block_sparse_attention(q, k, v, *layout, block_size=block_size, backend=backend,
                                        return_lse=True, **kwargs)
    expected = dense_oracle(q, k, v, *layout, block_size, scale=kwargs.get("scale"),
                            kv_length=kwargs.get("kv_length"))
    assert_matches(out, lse, expected, q.dtype, f"{backend} {ctx} seed={gen.initial_seed()}")
    return out, lse, expected


# ----------------------------------------------------------------------------------- kernels vs oracle

# (LQ, LK, head_dim, block_size): odd lengths, a single token, the 128 block, a padded head_dim, cross lengths.
SHAPES = {
    "L1": (1, 1, 64, 64),
    "L100": (100, 100, 64, 64),
    "L257-D128": (257, 257, 128, 64),
    "L257-bs128": (257, 257, 64, 128),
    "L100-D80-padded": (100, 100, 80, 64),
    "L1-D8-padded": (1, 1, 8, 64),
    "LQ70-LK257": (70, 257, 64, 64),
    "LQ257-LK100-bs128": (257, 100, 128, 128),
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("backend", BACKENDS)
def test_random_per_head_layout(backend, shape, dtype, gen):
    LQ, LK, D, bs = shape
    H = 2
    q, k, v = make_qkv(1, H, LQ, LK, D, dtype, gen)
    layout = random_layout((1, H), K.num_blocks(LQ, bs), K.num_blocks(LK, bs), gen)
    run_and_check(backend, q, k, v, layout, bs, gen, ctx=f"shape={shape} {dtype}")


def _single_block(nqb, nkb, gen):
    return random_layout((1, 2), nqb, nkb, gen, width=1)


def _empty_rows(nqb, nkb, gen):
    idx, cnt = random_layout((1, 2), nqb, nkb, gen, min_count=0)
    cnt[0, 0, 0] = 0  # at least one, whatever the draw
    return idx, cnt


def _all_empty(nqb, nkb, gen):
    idx, cnt = random_layout((1, 1), nqb, nkb, gen, width=2)
    return idx, torch.zeros_like(cnt)


def _zero_width(nqb, nkb, gen):
    return (torch.zeros(1, 1, nqb, 0, dtype=torch.int32, device=DEVICE),
            torch.zeros(1, 1, nqb, dtype=torch.int32, device=DEVICE))


def _full(nqb, nkb, gen):
    return K.block_mask_to_indices(torch.ones(1, 1, nqb, nkb, dtype=torch.bool, device=DEVICE))


def _from_random_mask(nqb, nkb, gen):  # padding repeats the last kept index, as block_mask_to_indices writes it
    return K.block_mask_to_indices(torch.rand(1, 2, nqb, nkb, generator=gen, device=DEVICE) < 0.5)


def _banded(nqb, nkb, gen):
    return banded_layout((1, 1), nqb, nkb, half_width=1)


LAYOUT_KINDS = {"single-block": _single_block, "empty-rows": _empty_rows, "all-empty": _all_empty,
                "zero-width": _zero_width, "full": _full, "from-mask": _from_random_mask, "banded": _banded}


@pytest.mark.parametrize("kind", LAYOUT_KINDS.values(), ids=LAYOUT_KINDS.keys())
@pytest.mark.parametrize("backend", BACKENDS)
def test_layout_kinds(backend, kind, gen):
    LQ = LK = 257
    q, k, v = make_qkv(1, 2, LQ, LK, 64, torch.bfloat16, gen)
    layout = kind(K.num_blocks(LQ, 64), K.num_blocks(LK, 64), gen)
    run_and_check(backend, q, k, v, layout, 64, gen, ctx=kind.__name__)


@pytest.mark.parametrize("lead", [(1, 1), (2, 1), (1, 2), (2, 2)], ids=["shared", "per-batch", "per-head", "per-bh"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_and_head_layouts(backend, lead, gen):
    B, H, L = 2, 2, 257
    q, k, v = make_qkv(B, H, L, L, 64, torch.float16, gen)
    idx, cnt = random_layout(lead, K.num_blocks(L, 64), K.num_blocks(L, 64), gen)
    cnt[0, 0, 0], cnt[-1, -1, 0] = 1, 0  # a per-batch/per-head layout then really differs across entries
    run_and_check(backend, q, k, v, (idx, cnt), 64, gen, ctx=f"layout lead dims {lead}")


KV_LENGTHS = {
    "random": lambda LK, gen: torch.randint(1, LK + 1, (2,), generator=gen, device=DEVICE),
    "zero-and-partial-block": lambda LK, gen: torch.tensor([64 * 2 + 5, 0], dtype=torch.int32),
    "beyond-LK": lambda LK, gen: torch.tensor([LK + 50, LK]),
}


@pytest.mark.parametrize("lengths", KV_LENGTHS.values(), ids=KV_LENGTHS.keys())
@pytest.mark.parametrize("layout_kind", ["random", "single-block"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_kv_length(backend, layout_kind, lengths, gen):
    B, H, LQ, LK = 2, 2, 100, 257
    q, k, v = make_qkv(B, H, LQ, LK, 64, torch.bfloat16, gen)
    layout = random_layout((B, 1), K.num_blocks(LQ, 64), K.num_blocks(LK, 64), gen,
                           width=1 if layout_kind == "single-block" else None)
    kv_length = lengths(LK, gen)
    run_and_check(backend, q, k, v, layout, 64, gen, kv_length=kv_length, ctx=f"kv_length={kv_length.tolist()}")


@pytest.mark.parametrize("D", [64, 80])
@pytest.mark.parametrize("backend", BACKENDS)
def test_return_lse_false(backend, D, gen):
    q, k, v = make_qkv(1, 2, 100, 100, D, torch.bfloat16, gen)
    layout = random_layout((1, 2), 2, 2, gen, min_count=0)
    out = K.block_sparse_attention(q, k, v, *layout, block_size=64, backend=backend)
    assert isinstance(out, torch.Tensor)
    out_lse, _ = K.block_sparse_attention(q, k, v, *layout, block_size=64, backend=backend, return_lse=True)
    assert torch.equal(out, out_lse), f"seed={gen.initial_seed()}"
    assert_matches(out, None, dense_oracle(q, k, v, *layout, 64), q.dtype, f"seed={gen.initial_seed()}")


@pytest.mark.parametrize("view", ["contiguous", "token-major"])
@pytest.mark.parametrize("D", [64, 80])
@pytest.mark.parametrize("backend", BACKENDS)
def test_out_buffer_fully_written(backend, D, view, gen):
    """A NaN-filled out= buffer must come back with every element written and nothing outside it touched."""
    B, H, L = 2, 2, 100
    q, k, v = make_qkv(B, H, L, L, D, torch.bfloat16, gen)
    layout = random_layout((B, H), 2, 2, gen, min_count=0)
    if view == "contiguous":
        storage = torch.full((B, H, L, D), float("nan"), dtype=q.dtype, device=DEVICE)
        out = storage
    else:  # (B, L, H, D) as in Wan's attention, with an extra token and head that must stay untouched
        storage = torch.full((B, L + 3, H + 1, D), float("nan"), dtype=q.dtype, device=DEVICE)
        out = storage[:, :L, :H].transpose(1, 2)
    result, _, _ = run_and_check(backend, q, k, v, layout, 64, gen, out=out, ctx=f"out={view}")
    assert result.data_ptr() == out.data_ptr() and result.stride() == out.stride()
    assert not torch.isnan(out).any()
    if view == "token-major":
        assert torch.isnan(storage[:, L:]).all() and torch.isnan(storage[:, :, H:]).all(), "wrote outside out"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend, dtype, gen):
    """q, k, v as strided views: token-major (B, L, H, D) tensors, and slices of one packed qkv tensor."""
    B, H, L, D = 2, 2, 100, 64
    layout = random_layout((1, H), 2, 2, gen)
    q, k, v = make_qkv(B, H, L, L, D, dtype, gen, token_major=True)
    assert not q.is_contiguous()
    run_and_check(backend, q, k, v, layout, 64, gen, ctx="token-major")
    qkv = torch.randn(B, L, 3, H, D, generator=gen, device=DEVICE).to(dtype)
    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
    run_and_check(backend, q, k, v, layout, 64, gen, scale=0.3, ctx="packed qkv, scale=0.3")


def test_float32_reference(gen):
    q, k, v = make_qkv(2, 2, 257, 300, 64, torch.float32, gen)
    layout = random_layout((2, 2), K.num_blocks(257, 128), K.num_blocks(300, 128), gen, min_count=0)
    run_and_check("reference", q, k, v, layout, 128, gen, ctx="float32")


def test_auto_backend_on_cpu_is_reference(cpu_gen):
    assert K.resolve_backend("auto", torch.device("cpu"), torch.bfloat16) == "reference"
    q, k, v = make_qkv(1, 2, 100, 100, 64, torch.bfloat16, cpu_gen, device="cpu")
    layout = random_layout((1, 2), 2, 2, cpu_gen, device="cpu")
    auto = K.block_sparse_attention(q, k, v, *layout, block_size=64)
    assert torch.equal(auto, K.block_sparse_attention(q, k, v, *layout, block_size=64, backend="reference"))


def test_triton_backend_needs_cuda_or_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="backend='triton'"):
        K.resolve_backend("triton", torch.device("cpu"), torch.bfloat16)


# --------------------------------------------------------------------------------------- layout helpers


MASK_SHAPES = [(5, 7), (1, 1, 4, 4), (2, 3, 6, 5), (3, 1, 1), (2, 4, 9)]


@pytest.mark.parametrize("shape", MASK_SHAPES, ids=str)
def test_mask_indices_round_trip(shape, cpu_gen):
    gen = cpu_gen
    mask = torch.rand(shape, generator=gen) < torch.rand((), generator=gen)
    mask[..., 0, :] = False                                   # an empty row
    if shape[-2] > 1:
        mask[..., 1, :] = True                                # a full row
    idx, cnt = K.block_mask_to_indices(mask)
    ctx = f"seed={gen.initial_seed()} shape={shape}"
    assert idx.dtype == cnt.dtype == torch.int32 and idx.is_contiguous() and cnt.is_contiguous()
    assert cnt.shape == shape[:-1] and idx.shape[:-1] == shape[:-1]
    assert torch.equal(cnt, mask.sum(-1, dtype=torch.int32)), ctx
    assert idx.shape[-1] == max(1, int(cnt.max())), ctx
    assert ((idx >= 0) & (idx < shape[-1])).all(), ctx
    for row_idx, row_cnt, row_mask in zip(idx.reshape(-1, idx.shape[-1]), cnt.reshape(-1), mask.reshape(-1, shape[-1])):
        kept, padding = row_idx[: int(row_cnt)], row_idx[int(row_cnt):]
        assert torch.equal(kept.long(), row_mask.nonzero().flatten()), f"{ctx}: kept blocks ascending"
        pad_value = int(kept[-1]) if len(kept) else 0
        assert (padding == pad_value).all(), f"{ctx}: padding repeats the last kept block (0 if none)"
    assert torch.equal(K.indices_to_block_mask(idx, cnt, shape[-1]), mask), ctx


def test_indices_to_block_mask_unsorted_lists(cpu_gen):
    gen = cpu_gen
    idx, cnt = random_layout((2, 3), 6, 9, gen, width=5, min_count=0, device="cpu")
    mask = K.indices_to_block_mask(idx, cnt, 9)
    assert torch.equal(mask, oracle_block_mask(idx, cnt, 9)), f"seed={gen.initial_seed()}"
    idx2, cnt2 = K.block_mask_to_indices(mask)
    assert torch.equal(cnt2, cnt) and torch.equal(K.indices_to_block_mask(idx2, cnt2, 9), mask)


def test_layout_density(cpu_gen):
    mask = torch.rand(2, 3, 8, 10, generator=cpu_gen) < 0.3
    _, cnt = K.block_mask_to_indices(mask)
    assert K.layout_density(cnt, 10) == pytest.approx(mask.double().mean().item())
    _, full = K.block_mask_to_indices(torch.ones(1, 1, 4, 4, dtype=torch.bool))
    assert K.layout_density(full, 4) == 1.0
    assert K.layout_density(torch.zeros(1, 1, 4, dtype=torch.int32), 4) == 0.0
    assert K.layout_density(torch.zeros(1, 1, 0, dtype=torch.int32), 4) == 0.0


@pytest.mark.parametrize("bad, match", [(torch.zeros(3, 4, dtype=torch.int32), "block_mask"),
                                        (torch.zeros(4, dtype=torch.bool), "block_mask")], ids=["dtype", "rank"])
def test_block_mask_to_indices_rejects(bad, match):
    with pytest.raises(ValueError, match=match):
        K.block_mask_to_indices(bad)


# ------------------------------------------------------------------------------------------- bad inputs


def _rand(*shape, dtype=torch.bfloat16):
    return torch.randn(shape, device=DEVICE).to(dtype)


def _valid_args():
    """B=2, H=2, L=100 (2 blocks of 64), D=64, bf16, a full shared layout: a call that succeeds."""
    q, k, v = (_rand(2, 2, 100, 64) for _ in range(3))
    idx, cnt = K.block_mask_to_indices(torch.ones(1, 1, 2, 2, dtype=torch.bool, device=DEVICE))
    return dict(q=q, k=k, v=v, kv_indices=idx, kv_counts=cnt, block_size=64, backend="reference")


def _set(**changes):
    return lambda a: {**a, **{name: f(a) for name, f in changes.items()}}


BAD_INPUTS = {
    "q-float64": (_set(q=lambda a: a["q"].double()), r"^q has dtype torch.float64"),
    "k-int": (_set(k=lambda a: _rand(2, 2, 100, 64, dtype=torch.int32)), r"^k has dtype torch.int32"),
    "v-rank-3": (_set(v=lambda a: a["v"][0]), r"^v must have 4 dims"),
    "q-rank-5": (_set(q=lambda a: a["q"][None]), r"^q must have 4 dims"),
    "mixed-dtypes": (_set(k=lambda a: a["k"].half()), r"q, k, v must share one dtype"),
    "k-head-dim": (_set(k=lambda a: a["k"][..., :32]), r"k and v must have shape"),
    "v-length": (_set(v=lambda a: a["v"][:, :, :50]), r"k and v must have shape"),
    "k-heads": (_set(k=lambda a: a["k"][:, :1], v=lambda a: a["v"][:, :1]), r"k and v must have shape"),
    "q-last-dim-strided": (_set(q=lambda a: a["q"].transpose(2, 3)[:, :, :, :64]), r"^q must have a contiguous"),
    "block-size-32": (_set(block_size=lambda a: 32), r"^block_size must be one of"),
    "kv-indices-too-large": (_set(kv_indices=lambda a: a["kv_indices"] + 1), r"^kv_indices must lie in \[0, 1\]"),
    "kv-indices-negative": (_set(kv_indices=lambda a: a["kv_indices"] - 1), r"^kv_indices must lie"),
    "kv-indices-float": (_set(kv_indices=lambda a: a["kv_indices"].float()), r"^kv_indices must be int32"),
    "kv-counts-over-width": (_set(kv_counts=lambda a: a["kv_counts"] + 1), r"^kv_counts must lie in \[0, 2\]"),
    "kv-counts-negative": (_set(kv_counts=lambda a: a["kv_counts"] - 3), r"^kv_counts must lie"),
    "indices-counts-mismatch": (_set(kv_counts=lambda a: a["kv_counts"][..., :1]),
                                r"^kv_indices must have shape kv_counts.shape"),
    "layout-batch-3": (_set(kv_indices=lambda a: a["kv_indices"].expand(3, 1, 2, 2),
                            kv_counts=lambda a: a["kv_counts"].expand(3, 1, 2)), r"^kv_indices / kv_counts batch dimension is 3"),
    "layout-heads-3": (_set(kv_indices=lambda a: a["kv_indices"].expand(1, 3, 2, 2),
                            kv_counts=lambda a: a["kv_counts"].expand(1, 3, 2)), r"^kv_indices / kv_counts head dimension is 3"),
    "layout-query-blocks": (_set(kv_indices=lambda a: a["kv_indices"][:, :, :1],
                                 kv_counts=lambda a: a["kv_counts"][:, :, :1]), r"^kv_counts has 1 query blocks"),
    "layout-rank": (_set(kv_indices=lambda a: a["kv_indices"][0], kv_counts=lambda a: a["kv_counts"][0]),
                    r"^kv_counts must have shape \(B or 1, H or 1, NQB\)"),
    "kv-length-shape": (_set(kv_length=lambda a: torch.tensor([100], device=DEVICE)), r"^kv_length must be a \(2,\)"),
    "out-dtype": (_set(out=lambda a: _rand(2, 2, 100, 64, dtype=torch.float32)), r"^out must be"),
    "triton-float32": (_set(q=lambda a: a["q"].float(), k=lambda a: a["k"].float(), v=lambda a: a["v"].float(),
                            backend=lambda a: "triton"), r"^backend='triton' takes float16 or bfloat16"),
    "unknown-backend": (_set(backend=lambda a: "flash"), r"^backend must be one of .*'flash'"),
    "triton-head-dim-256": (_set(q=lambda a: _rand(2, 2, 100, 256), k=lambda a: _rand(2, 2, 100, 256),
                                 v=lambda a: _rand(2, 2, 100, 256),
                                 backend=lambda a: "triton"), r"^head_dim 256 is not supported"),
}


@pytest.mark.parametrize("mutate, match", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_input_raises_value_error(mutate, match):
    args = mutate(_valid_args())
    with pytest.raises(ValueError, match=match):
        K.block_sparse_attention(**args)


def test_valid_args_run():
    """The base of the bad-input cases is itself valid, so each case fails for its own reason."""
    args = _valid_args()
    out = K.block_sparse_attention(**args)
    assert out.shape == args["q"].shape


def test_out_of_shared_memory_becomes_a_value_error(monkeypatch):
    """A GPU with too little shared memory for the tile must give a ValueError (the dispatcher then runs dense
    with one warning), never an exception that stops the render."""
    from triton.runtime.errors import OutOfResources

    triton_module = import_pack("kernels.block_sparse_triton")

    def no_room(*args, **kwargs):
        raise OutOfResources(300000, 232448, "shared memory")

    monkeypatch.setattr(triton_module, "triton_block_sparse_attention", no_room)
    monkeypatch.setattr(import_pack("kernels.attention"), "resolve_backend", lambda *a: "triton")
    q = torch.randn(1, 1, 64, 64, dtype=torch.float16)
    idx, cnt = K.block_mask_to_indices(torch.ones(1, 1, 1, 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="shared memory"):
        K.block_sparse_attention(q, q, q, idx, cnt, block_size=64, backend="triton")


class _KeysOnGPU:
    """What _wide_tile_pays reads of k (shape, element size, device), without a GPU."""

    def __init__(self, tokens, head_dim=128, element_size=2):
        self.shape, self.device, self._size = (1, 24, tokens, head_dim), torch.device("cuda", 0), element_size

    def element_size(self):
        return self._size


@pytest.mark.parametrize("capability, tokens, head_dim, block_size, list_fraction, wide", [
    ((9, 0), 119_056, 128, 128, 0.10, True),   # HunyuanVideo 720p, AdaSpa's density: one head's K, V 61 MB
    ((9, 0), 119_056, 128, 128, 0.25, True),
    ((9, 0), 119_056, 128, 128, 0.50, False),  # long lists: the default tile's resident programs win
    ((9, 0), 75_600, 128, 128, 0.10, False),   # Wan 14B 720p: a head's 39 MB fit the 50 MB L2
    ((8, 0), 119_056, 128, 128, 0.10, False),  # measured on Hopper only
    ((12, 0), 119_056, 128, 128, 0.10, False),  # a consumer Blackwell card's shared memory does not hold the tile
    ((9, 0), 119_056, 64, 128, 0.10, False),
    ((9, 0), 119_056, 128, 64, 0.10, False),
])
def test_wide_tile_rule(capability, tokens, head_dim, block_size, list_fraction, wide, monkeypatch):
    kernel = import_pack("kernels.block_sparse_triton")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(kernel, "_l2_bytes", lambda device: 50 << 20)
    k = _KeysOnGPU(tokens, head_dim)
    width = round(list_fraction * K.num_blocks(tokens, block_size))
    assert kernel._wide_tile_pays(k, block_size, width) is wide


def test_wide_tile_never_on_cpu(cpu_gen):
    kernel = import_pack("kernels.block_sparse_triton")
    assert not kernel._wide_tile_pays(torch.zeros(1, 1, 1 << 20, 128, dtype=torch.bfloat16), 128, 1)
