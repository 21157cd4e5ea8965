"""The 8-bit block-sparse kernel (FP8 e4m3 and INT8) at small, odd shapes: its quantization pre-pass and its output
against the simulated-quantization reference (tight), against exact attention (the error 8 bits cost), non-finite
inputs (the bf16 path's result), and which precision a GPU gets. On the CPU the kernels run in Triton's interpreter,
which computes FP8 and INT8 tl.dot exactly (its float32 -> FP8 cast is emulated, see _round_e4m3).

Inputs are random on every run; each test prints its seed (rerun with BSA_SEED=<seed>).
"""

from __future__ import annotations

import pytest
import torch

from pack import import_pack
from test_block_sparse_kernel import DEVICE, dense_oracle, make_qkv, new_generator, random_layout

K = import_pack("kernels")
Q8 = import_pack("kernels.block_sparse_8bit_triton")
QR = import_pack("kernels.quantize_reference")
EB = import_pack("kernels.eight_bit")
ATT = import_pack("kernels.attention")
synthetic = import_pack("benchmarks.synthetic")

PRECISIONS = ("int8", "fp8")
# Kernel vs simulated reference: float32 summation order, and the output's rounding (the interpreter rounds to bf16
# its own way: bf16 outputs differ by an ulp, 4e-3, where fp16 ones match to 1e-6). FP8 fp16 is looser: when the
# summation order moves a probability across an e4m3 rounding boundary (3 mantissa bits) it changes by 1/16; about one
# seed in 24 has such a flip at L100 (1.9e-3), the others agree to 2e-5.
KERNEL_TOL = {torch.float16: 1e-3, torch.bfloat16: 1e-2}
FP8_FP16_TOL = 5e-3
LSE_TOL = 1e-3  # the same, on the LSE
# vs exact attention on white-noise q/k/v (the hardest case for 8 bits): output relative error, worst LSE error
EXACT_TOL = {"int8": (0.03, 0.05), "fp8": (0.08, 0.25)}
VIDEO_TOL = 0.02  # vs the bf16 kernel on video-structured q/k/v (the target)

pytestmark = [pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")]


@pytest.fixture
def gen():
    return new_generator(DEVICE)


def rel_err(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def run(q, k, v, layout, block_size, precision, backend="triton", **kwargs):
    return K.block_sparse_attention(q, k, v, *layout, block_size=block_size, backend=backend, precision=precision,
                                    return_lse=True, **kwargs)


def check_against_simulation(q, k, v, layout, block_size, precision, ctx, **kwargs):
    out, lse = run(q, k, v, layout, block_size, precision, **kwargs)
    ref, ref_lse = run(q, k, v, layout, block_size, precision, backend="reference", **kwargs)
    assert out.dtype == q.dtype and out.shape == q.shape and lse.shape == q.shape[:3], ctx
    assert not torch.isnan(out).any() and not torch.isnan(lse).any(), f"{ctx}: NaN"
    empty = torch.isneginf(ref_lse)
    assert torch.equal(torch.isneginf(lse), empty), f"{ctx}: -inf LSE exactly on the rows with no key"
    assert (out[empty] == 0).all(), f"{ctx}: rows with no key must be 0"
    if (~empty).any():
        err = rel_err(out[~empty], ref[~empty])
        tol = FP8_FP16_TOL if (precision, q.dtype) == ("fp8", torch.float16) else KERNEL_TOL[q.dtype]
        assert err < tol, f"{ctx}: kernel vs simulated reference {err:.2e} >= {tol}"
        lse_err = (lse - ref_lse)[~empty].abs().max().item()
        assert lse_err < LSE_TOL, f"{ctx}: LSE vs simulated reference {lse_err:.2e} >= {LSE_TOL}"
    return out, lse


# ---------------------------------------------------------------------------------------- kernel vs reference

# (LQ, LK, head_dim, block_size): odd lengths, one token, the 128 block, head_dim 128 and a padded 80, cross lengths.
SHAPES = {
    "L1": (1, 1, 64, 64),
    "L100": (100, 100, 64, 64),
    "L257-D128": (257, 257, 128, 64),
    "L257-bs128": (257, 257, 64, 128),
    "L100-D80-padded": (100, 100, 80, 64),
    "LQ70-LK257": (70, 257, 64, 64),
}


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("precision", PRECISIONS)
def test_matches_simulated_reference(precision, shape, gen):
    LQ, LK, D, bs = shape
    q, k, v = make_qkv(1, 2, LQ, LK, D, torch.float16, gen)
    k = k + 2.0  # a shared key offset, which the smoothing removes before quantizing
    layout = random_layout((1, 2), K.num_blocks(LQ, bs), K.num_blocks(LK, bs), gen)
    check_against_simulation(q, k, v, layout, bs, precision, f"{precision} {shape} seed={gen.initial_seed()}")


@pytest.mark.parametrize("precision", PRECISIONS)
def test_batch_kv_length_and_empty_rows(precision, gen):
    B, H, LQ, LK = 2, 2, 100, 257
    q, k, v = make_qkv(B, H, LQ, LK, 64, torch.bfloat16, gen)
    idx, cnt = random_layout((B, H), K.num_blocks(LQ, 64), K.num_blocks(LK, 64), gen, min_count=0)
    cnt[0, 0, 0], cnt[1, 1, 1] = 0, 1
    kv_length = torch.tensor([64 * 2 + 5, 0], dtype=torch.int32, device=DEVICE)  # a partial block; no key at all
    k[0, :, kv_length[0]:] = float("nan")  # padding is never read as a key, even when it is garbage
    v[0, :, kv_length[0]:] = float("inf")
    ctx = f"{precision} seed={gen.initial_seed()}"
    out, lse = check_against_simulation(q, k, v, (idx, cnt), 64, precision, ctx, kv_length=kv_length)
    assert (out[1] == 0).all() and torch.isneginf(lse[1]).all(), f"{ctx}: a batch element with no key"


@pytest.mark.parametrize("precision", PRECISIONS)
def test_against_exact_attention(precision, gen):
    """What 8 bits cost on white noise: the worst case, every key alike, every rounding error showing."""
    q, k, v = make_qkv(2, 2, 257, 257, 64, torch.bfloat16, gen)
    layout = random_layout((2, 1), 5, 5, gen)
    out, lse = run(q, k, v, layout, 64, precision)
    exact, exact_lse = dense_oracle(q, k, v, *layout, 64)
    err = rel_err(out, exact)
    finite = torch.isfinite(exact_lse)
    lse_err = (lse.double() - exact_lse)[finite].abs().max().item()
    print(f"{precision} vs exact on white noise: relative error {err:.4f}, LSE {lse_err:.4f}")
    out_tol, lse_tol = EXACT_TOL[precision]
    assert err < out_tol, f"{precision}: {err:.3e} seed={gen.initial_seed()}"
    assert lse_err < lse_tol, f"{precision}: LSE {lse_err:.3e} seed={gen.initial_seed()}"


@pytest.mark.parametrize("block_size", [64, 128])
@pytest.mark.parametrize("precision", PRECISIONS)
def test_video_inputs_against_bf16(precision, block_size):
    """The issue's accuracy target (8-bit vs bf16 at most 0.02) on video-structured q, k, v: a full layout and a
    banded one."""
    q, k, v = (t.to(DEVICE) for t in synthetic.video_qkv(frames=4, height=8, width=12, heads=2, head_dim=128,
                                                         dtype=torch.bfloat16))
    nb = K.num_blocks(q.shape[2], block_size)
    rows = torch.arange(nb, device=DEVICE)
    for name, mask in (("full", torch.ones(nb, nb, dtype=torch.bool, device=DEVICE)),
                       ("banded", (rows[:, None] - rows[None, :]).abs() <= 1)):
        layout = K.block_mask_to_indices(mask[None, None].contiguous())
        bf16 = K.block_sparse_attention(q, k, v, *layout, block_size=block_size, backend="triton")
        out = K.block_sparse_attention(q, k, v, *layout, block_size=block_size, backend="triton", precision=precision)
        err = rel_err(out, bf16)
        print(f"{precision} bs={block_size} {name}: relative error vs bf16 {err:.4f}")
        assert err < VIDEO_TOL, f"{precision} {name} bs={block_size}: {err:.3e} vs bf16"


@pytest.mark.parametrize("precision", PRECISIONS)
def test_out_buffer_and_return_lse_false(precision, gen):
    B, H, L, D = 1, 2, 100, 64
    q, k, v = make_qkv(B, H, L, L, D, torch.bfloat16, gen, token_major=True)
    layout = random_layout((1, H), 2, 2, gen)
    buffer = torch.full((B, L, H, D), float("nan"), dtype=torch.bfloat16, device=DEVICE)
    out = K.block_sparse_attention(q, k, v, *layout, block_size=64, backend="triton", precision=precision,
                                   out=buffer.transpose(1, 2))
    assert out.data_ptr() == buffer.data_ptr() and not torch.isnan(buffer).any()
    with_lse, _ = run(q, k, v, layout, 64, precision)
    assert torch.equal(out, with_lse), f"seed={gen.initial_seed()}"


def test_fp8_chained_sum_stays_close_to_simulated_reference(gen):
    """split_acc off (P V summed through the MMA, fewer registers) stays within 1% of the reference, which sums each
    tile in fp32 as the default path does; the chained sum rounds differently (on Hopper the FP8 MMA's accumulator
    has fewer bits than fp32), so the default path's 0.1% does not apply."""
    q, k, v = make_qkv(1, 2, 257, 257, 64, torch.float16, gen)
    layout = random_layout((1, 2), K.num_blocks(257, 64), K.num_blocks(257, 64), gen)
    out, lse = Q8.triton_block_sparse_attention_8bit(q, k, v, *layout, block_size=64, scale=0.125, precision="fp8",
                                                     return_lse=True, config=dict(BLOCK_N=64, num_warps=4,
                                                                                  num_stages=1, split_acc=False))
    ref, ref_lse = run(q, k, v, layout, 64, "fp8", backend="reference", scale=0.125)
    rows = ~torch.isneginf(ref_lse)
    err = rel_err(out[rows], ref[rows])
    assert err < 1e-2, f"{err:.2e} seed={gen.initial_seed()}"
    assert (lse - ref_lse)[rows].abs().max().item() < LSE_TOL, f"seed={gen.initial_seed()}"


@pytest.mark.parametrize("lead", [(1, 1), (2, 3)], ids=["shared-layout", "per-head-layout"])
def test_head_groups_give_the_same_result(lead, gen):
    """With the 8-bit copies bounded to one head at a time, each group's pre-pass, kernel and checks give what one
    launch over every head gives (bit for bit), LSE included; a non-finite value in the last group still falls
    back for the whole call."""
    B, H, L = 2, 3, 100
    q, k, v = make_qkv(B, H, L, L, 64, torch.bfloat16, gen)
    layout = random_layout(lead, 2, 2, gen, min_count=0)
    kv_length = torch.tensor([L, 70], dtype=torch.int32, device=DEVICE)
    args = dict(block_size=64, scale=0.125, precision="int8", kv_length=kv_length, return_lse=True)
    whole = Q8.triton_block_sparse_attention_8bit(q, k, v, *layout, **args)
    grouped = Q8.triton_block_sparse_attention_8bit(q, k, v, *layout, copy_bytes=1, **args)
    assert torch.equal(whole[0], grouped[0]) and torch.equal(whole[1], grouped[1]), f"seed={gen.initial_seed()}"
    k[1, 2, 5, 0] = float("nan")
    grouped = Q8.triton_block_sparse_attention_8bit(q, k, v, *layout, copy_bytes=1, **args)
    bf16 = K.block_sparse_attention(q, k, v, *layout, block_size=64, scale=0.125, kv_length=kv_length,
                                    backend="triton", return_lse=True)
    torch.testing.assert_close(grouped, bf16, rtol=0, atol=0, equal_nan=True)


# ----------------------------------------------------------------------------------------- non-finite inputs


def _poison(kind, q, k, v):
    if kind == "inf-in-q":
        q[0, 1, 37, 5] = float("inf")
    elif kind == "nan-in-k":
        k[0, 0, 200, 3] = float("nan")
    elif kind == "inf-in-v":
        v[0, 1, 64, 0] = float("-inf")
    elif kind == "v-past-fp16":  # bf16 holds it, fp16 does not: the INT8 path's fp16 P V would overflow
        v[0, 0, 10, 7] = 1.0e6


POISONED = [(p, kind) for p in PRECISIONS for kind in ("inf-in-q", "nan-in-k", "inf-in-v")] + [("int8", "v-past-fp16")]


@pytest.mark.parametrize("precision, kind", POISONED)
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_non_finite_inputs_give_the_bf16_result(backend, precision, kind, gen):
    q, k, v = make_qkv(1, 2, 257, 257, 64, torch.bfloat16, gen)
    _poison(kind, q, k, v)
    layout = K.block_mask_to_indices(torch.ones(1, 1, 5, 5, dtype=torch.bool, device=DEVICE))  # every key is read
    out, lse = run(q, k, v, layout, 64, precision, backend=backend)
    bf16, bf16_lse = run(q, k, v, layout, 64, "bf16", backend=backend)
    torch.testing.assert_close(out, bf16, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(lse, bf16_lse, rtol=0, atol=0, equal_nan=True)
    if kind != "v-past-fp16":
        assert not torch.isfinite(out).all(), "the non-finite input must show in the output, as in bf16"


# ------------------------------------------------------------------------------------------ quantization


@pytest.mark.parametrize("precision", PRECISIONS)
def test_prepass_matches_reference(precision, gen):
    B, H, L, D, bs = 2, 2, 150, 64, 64
    _, k, v = make_qkv(B, H, 1, L, D, torch.bfloat16, gen)
    kv_length = torch.tensor([L, 97], dtype=torch.int32, device=DEVICE)
    valid = torch.arange(L, device=DEVICE)[None, :] < kv_length[:, None].long()
    nb = K.num_blocks(L, bs)
    mean = QR.key_means(k, kv_length)
    levels, scales = Q8._quantize(k, kv_length, block_size=bs, precision=precision, mean=mean.contiguous())
    ref_levels, ref_scales = QR.quantize_blocks(k.float() - mean[:, :, None, :], bs, precision, valid)
    torch.testing.assert_close(scales.view(B, H, nb), ref_scales, rtol=1e-6, atol=0)
    assert torch.equal(levels.float().view(B, H, nb * bs, D)[:, :, :L], ref_levels), "K levels differ"
    assert (levels.float().view(B, H, nb * bs, D)[1, :, 97:] == 0).all(), "padding keys quantize to zero"

    absmax = QR.value_channel_absmax(v, kv_length)
    v_levels = Q8._quantize(v, kv_length, block_size=bs, precision=precision,
                            inverse=QR.inverse_scale(absmax, QR.QMAX[precision]).contiguous())
    v_levels = v_levels.float().view(B, H, D, nb * bs).transpose(-1, -2)[:, :, :L]
    ref_v = QR.round_8bit(v.float() * QR.inverse_scale(absmax, QR.QMAX[precision])[:, :, None, :], precision)
    ref_v = ref_v * valid[:, None, :, None]
    assert torch.equal(v_levels, ref_v), "V levels differ"


def test_round_8bit():
    x = torch.tensor([0.5, -0.5, 1.5, -2.5, 126.7, 300.0, -300.0, 0.49])
    assert QR.round_8bit(x, "int8").tolist() == [1, -1, 2, -3, 127, 127, -127, 0]  # half away from zero, clamped
    y = torch.tensor([1.0625, 1.1875, 500.0, -500.0, 3 * 2.0 ** -10])
    assert QR.round_8bit(y, "fp8").tolist() == [1.0, 1.25, 448.0, -448.0, 2.0 ** -8]  # ties to even, clamped


@pytest.mark.parametrize("precision", PRECISIONS)
def test_quantize_blocks_error_bound(precision):
    gen = new_generator()
    x = torch.randn(2, 3, 150, 64, generator=gen) * torch.linspace(0.01, 100, 150).view(1, 1, -1, 1)
    x[0, 0, :64] = 0  # an all-zero block: scale 0, levels 0
    levels, scales = QR.quantize_blocks(x, 64, precision)
    assert scales[0, 0, 0] == 0 and (levels[0, 0, :64] == 0).all()
    per_row = scales[:, :, torch.arange(150) // 64, None]
    err = (levels * per_row - x).abs()
    if precision == "int8":
        assert (levels.abs() <= 127).all() and torch.equal(levels, levels.round())
        assert (err <= per_row / 2 + 1e-6 * x.abs()).all()
    else:
        assert torch.equal(levels, levels.to(torch.float8_e4m3fn).float())  # representable
        assert (err <= x.abs() * 2 ** -4 + per_row * 2 ** -10 + 1e-6).all()


def test_key_means_over_valid_keys():
    k = torch.randn(2, 3, 50, 16, generator=new_generator()).bfloat16()
    mean = QR.key_means(k, torch.tensor([50, 7]))
    torch.testing.assert_close(mean[0], k[0].float().mean(dim=1))
    torch.testing.assert_close(mean[1], k[1, :, :7].float().mean(dim=1))
    assert (QR.key_means(k, torch.tensor([0, 50]))[0] == 0).all(), "no valid key: mean 0"


def test_smoothing_leaves_scores_invariant(gen):
    """A key offset shared by all keys changes every score of a row alike: the 8-bit result is the same with it
    (the smoothing removes it) and the LSE moves by q.offset * scale, as in exact attention. The keys lie on a grid
    of 1/64 so that k + offset is exact in fp16: otherwise its rounding moves keys across 8-bit steps, and the two
    results differ by quantization noise (up to 0.003 over 60 seeds), not by what the smoothing leaves."""
    q, k, v = make_qkv(1, 2, 100, 100, 64, torch.float16, gen)
    k = (k.float() * 64).round().div(64).to(k.dtype)
    layout = random_layout((1, 2), 2, 2, gen)
    offset = torch.full((64,), 0.5, dtype=torch.float16, device=DEVICE)
    out, lse = run(q, k, v, layout, 64, "int8")
    out_shift, lse_shift = run(q, k + offset, v, layout, 64, "int8")
    assert rel_err(out_shift, out) < 2e-3
    expected = lse.double() + (q.double() @ offset.double()) / 8.0
    assert (lse_shift.double() - expected).abs().max() < 1e-2


# --------------------------------------------------------------------------------------- precision choice


def _fake_gpu(monkeypatch, capability, triton_version=(3, 4), has_fp8=True):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Test GPU")
    monkeypatch.setattr(EB, "_triton_version", lambda: triton_version)
    monkeypatch.setattr(EB, "_triton_has_fp8", lambda: has_fp8)


@pytest.mark.parametrize("capability, expected", [((9, 0), "fp8"), ((8, 9), "fp8"), ((12, 0), "fp8"),
                                                  ((8, 6), "int8"), ((8, 0), "int8"), ((7, 5), "bf16")])
def test_eight_bit_support_by_capability(monkeypatch, capability, expected):
    _fake_gpu(monkeypatch, capability)
    support = EB.eight_bit_support("cuda")
    assert support.precision == expected
    if expected == "bf16":
        assert "sm_75" in support.reason and "Ampere" in support.reason


def test_eight_bit_support_needs_triton_and_its_fp8(monkeypatch):
    _fake_gpu(monkeypatch, (9, 0), triton_version=(3, 2))
    assert EB.eight_bit_support("cuda").precision == "bf16" and "3.3" in EB.eight_bit_support("cuda").reason
    _fake_gpu(monkeypatch, (9, 0), has_fp8=False)
    support = EB.eight_bit_support("cuda")
    assert support.precision == "int8" and "float8e4nv" in support.reason
    assert EB.eight_bit_support("cpu").precision == "bf16"


def test_precision_checks(monkeypatch):
    _fake_gpu(monkeypatch, (8, 6))
    with pytest.raises(ValueError, match="precision 'fp8' cannot run here.*use precision 'int8'"):
        ATT.check_precision("fp8", "triton", torch.device("cuda"))
    ATT.check_precision("int8", "triton", torch.device("cuda"))
    ATT.check_precision("fp8", "reference", torch.device("cuda"))  # the simulation runs anywhere
    q = torch.zeros(1, 1, 64, 64, dtype=torch.bfloat16)
    layout = (torch.zeros(1, 1, 1, 1, dtype=torch.int32), torch.ones(1, 1, 1, dtype=torch.int32))
    with pytest.raises(ValueError, match="precision must be one of"):
        K.block_sparse_attention(q, q, q, *layout, block_size=64, backend="reference", precision="8-bit")
