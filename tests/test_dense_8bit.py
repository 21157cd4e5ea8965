"""Precision '8-bit + dense calls' (core.dense_8bit): the video self-attention calls the schedule keeps dense run on
the 8-bit kernel at a full layout instead of ComfyUI's attention, only when asked, and only those calls.

Through the real dispatcher, called as ComfyUI calls it (a stand-in for ComfyUI's attention as ``func``). A GPU with
INT8 units is pretended (eight_bit_support patched where the session reads it); the kernel then runs on the reference
backend (its simulated quantization) or in Triton's CPU interpreter. Error bounds are those of
tests/test_block_sparse_8bit.py against exact attention on white noise (EXACT_TOL: the worst case for 8 bits; the
measured figures, 0.004-0.012 INT8 and 0.050-0.052 FP8, are in benchmarks/RESULTS.md).
"""

from __future__ import annotations

import logging
import math

import pytest
import torch

from pack import import_pack
from test_block_sparse_8bit import EXACT_TOL
from test_radial import dense_attention as comfy_attention

core = import_pack("core")
session_module = import_pack("core.session")
dense_8bit = import_pack("core.dense_8bit")
EB = import_pack("kernels.eight_bit")

LOGGER = "sparse_video_attention"
DENSE8 = EB.EIGHT_BIT_DENSE
GRID = core.VideoGrid(5, 8, 8, text_tokens=20)  # 320 video tokens, then 20 text: 3 blocks of 128
SIGMAS = [1.0, 0.5, 0.0]  # a 2-step run
H, D = 2, 32


@pytest.fixture
def int8_gpu(monkeypatch):
    monkeypatch.setattr(session_module, "eight_bit_support",
                        lambda device: EB.EightBitSupport("int8", "INT8 attention on Test GPU"))


@pytest.fixture
def launches(monkeypatch):
    """The precision of every launch of the full-layout path (core.dense_8bit's kernel entry point)."""
    seen = []
    real = dense_8bit.block_sparse_attention

    def spy(*args, precision="bf16", **kwargs):
        seen.append(precision)
        return real(*args, precision=precision, **kwargs)

    monkeypatch.setattr(dense_8bit, "block_sparse_attention", spy)
    return seen


class ComfyAttention:
    """ComfyUI's attention function, counting the calls it gets."""

    def __init__(self):
        self.calls = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return comfy_attention(*args, **kwargs)


def make_session(precision, method=None, **schedule):
    method = method or core.RadialSettings(decay_factor=0.05, block_size=64, attention_sink=False)
    schedule = core.SparseSchedule(**{"dense_steps": 1, "dense_layers": 1, **schedule})
    return core.SparseAttentionSession(method, schedule, backend="reference", precision=precision)


def qkv(seed, length=GRID.total_tokens):
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(1, H, length, D, generator=gen) for _ in range(3))


def exact(q, k, v, mask=None):
    s = torch.einsum("bhqd,bhkd->bhqk", q.double(), k.double()) / math.sqrt(D)
    if mask is not None:
        s = s + mask.double().view(1, 1, 1, -1)
    return torch.einsum("bhqk,bhkd->bhqd", s.softmax(-1), v.double())


def rel_err(out, want) -> float:
    return ((out.double() - want).norm() / want.norm()).item()


def forward(session, func, step, layers=2, seed=0, sigmas=SIGMAS, **context):
    """One forward of ``layers`` video self-attention calls at ``step``: their outputs and inputs."""
    ctx = session.forward_context(GRID, sigmas[step], sigmas, **context)
    override = core.attention_override(session)
    results = []
    for layer in range(layers):
        q, k, v = qkv(seed + 10 * step + layer)
        out = override(func, q, k, v, H, skip_reshape=True, skip_output_reshape=True,
                       transformer_options={core.CONTEXT_KEY: ctx})
        results.append((out, q, k, v))
    return results


def test_dense_calls_run_on_the_8bit_kernel_only_when_asked(int8_gpu, launches):
    """Step 0 (a dense step) and layer 0 (a dense layer) of step 1: with '8-bit + dense calls' on the INT8 path,
    never ComfyUI's attention, within 8-bit error of exact attention; booked apart, at density 1.0."""
    asked, func = make_session(DENSE8), ComfyAttention()
    results = forward(asked, func, 0) + forward(asked, func, 1)
    assert func.calls == 0 and launches == ["int8"] * 3
    stats = asked.stats
    assert stats.eight_bit_dense == {(0, 0), (0, 1), (1, 0)}
    assert (stats.sparse_calls, stats.dense_calls, stats.dense_8bit_calls) == (1, 0, 3)
    assert stats.mean_density == pytest.approx((3 + stats.calls[(1, 1)]) / 4)
    for out, q, k, v in results[:3]:
        err = rel_err(out, exact(q, k, v))
        assert 0 < err < EXACT_TOL["int8"][0], f"8-bit dense call vs exact: {err:.3e}"
    summary = core.run_summary(asked)
    assert "1 sparse, 0 dense on your attention and 3 dense on the 8-bit kernel (full layout)" in summary
    assert "precision 8-bit + dense calls" in summary

    launches.clear()
    plain, func = make_session("8-bit"), ComfyAttention()
    forward(plain, func, 0) + forward(plain, func, 1)
    assert func.calls == 3 and not launches
    assert (plain.stats.dense_calls, plain.stats.dense_8bit_calls) == (3, 0)
    assert "1 sparse and 3 dense attention calls" in core.run_summary(plain)


@pytest.mark.parametrize("leading", [0, GRID.text_tokens], ids=["text-behind", "text-in-front"])
def test_text_tokens_and_key_padding(int8_gpu, launches, leading):
    """HunyuanVideo's self-attention mixes text into the sequence, behind the video or in front of it, with an
    additive mask over its padding: the full layout covers the text, the padding keys are dropped."""
    text, valid = GRID.text_tokens, 13
    L = GRID.total_tokens
    text_at = 0 if leading else L - text
    mask = torch.zeros(1, 1, L)
    mask[..., text_at + valid: text_at + text] = -torch.finfo(torch.float32).max
    q, k, v = qkv(5)
    session, func = make_session(DENSE8), ComfyAttention()
    ctx = session.forward_context(GRID, SIGMAS[0], SIGMAS, leading_tokens=leading)
    out = core.attention_override(session)(func, q, k, v, H, mask=mask, skip_reshape=True,
                                           transformer_options={core.CONTEXT_KEY: ctx})
    assert func.calls == 0 and launches == ["int8"] and not session.stats.fallbacks
    want = exact(q, k, v, mask)
    err = rel_err(out.view(1, L, H, D).transpose(1, 2), want)
    assert err < EXACT_TOL["int8"][0], f"8-bit dense call with text at {text_at} vs exact: {err:.3e}"


def test_cross_attention_and_other_lengths_stay_on_comfyui(int8_gpu, launches):
    session, func = make_session(DENSE8), ComfyAttention()
    ctx = session.forward_context(GRID, SIGMAS[0], SIGMAS)
    override = core.attention_override(session)
    options = {core.CONTEXT_KEY: ctx}
    q, _, _ = qkv(1)
    _, k_text, v_text = qkv(2, length=24)
    cross = override(func, q, k_text, v_text, H, skip_reshape=True, transformer_options=options)
    assert cross.shape == (1, GRID.total_tokens, H * D)
    other = qkv(3, length=100)  # a self-attention that is not over the video (LTX-2's audio)
    override(func, *other, H, skip_reshape=True, transformer_options=options)
    assert func.calls == 2 and not launches and not session.stats.calls


def test_without_8bit_units_dense_calls_stay_on_comfyui_said_once(launches, caplog):
    """On the CPU the real eight_bit_support finds no 8-bit units: the sparse calls run bf16 and the dense calls
    ComfyUI's attention, said in one warning."""
    session, func = make_session(DENSE8), ComfyAttention()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        forward(session, func, 0) + forward(session, func, 1)
    assert func.calls == 3 and not launches
    assert (session.stats.dense_calls, session.stats.dense_8bit_calls, session.stats.sparse_calls) == (3, 0, 1)
    lines = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert len(lines) == 1, lines
    assert "needs an NVIDIA GPU" in lines[0] and "dense calls stay on your own attention" in lines[0]


def test_adaspa_prime_stays_exact(int8_gpu, launches):
    """AdaSpa's first search takes the LSE of the dense step before it (``prime``): that call stays exact; the other
    dense calls go 8-bit."""
    sigmas = [1.0, 0.75, 0.5, 0.0]  # 3 steps: 0 and 1 dense, 1 primes layer 1, 2 sparse
    method = core.AdaSpaSettings(recall=0.8, search_steps=(2,), block_size=64, min_density=0.0, max_density=1.0)
    session, func = make_session(DENSE8, method, dense_steps=2), ComfyAttention()
    forward(session, func, 0, sigmas=sigmas)
    primed = forward(session, func, 1, sigmas=sigmas)
    assert session.stats.eight_bit_dense == {(0, 0), (0, 1), (1, 0)} and launches == ["int8"] * 3
    out, q, k, v = primed[1]
    assert rel_err(out, exact(q, k, v)) < 1e-5, "the primed call must be exact attention"
    forward(session, func, 2, sigmas=sigmas)
    assert session.stats.sparse_calls == 1 and func.calls == 0 and not session.stats.fallbacks


def test_the_check_still_compares_with_exact_attention(int8_gpu, launches):
    """The Sparse Attention Check at a step with a dense layer: the sparse layer is checked against exact attention,
    the 8-bit dense layer is not a sparse call to check; the check's whole-step dense forward stays on ComfyUI."""
    session, func = make_session(DENSE8), ComfyAttention()
    check = core.CheckSettings(steps=(1,), rows=8)
    forward(session, func, 1, check=check)
    assert launches == ["int8"] and func.calls == 0
    assert {layer for layer, _ in session.check.recall} == {1}
    recall = session.check.head_recall()
    assert all(0 < r <= 1 for r in recall.values())
    ctx = session.forward_context(GRID, SIGMAS[1], SIGMAS)
    ctx.dense = True  # the check's whole-step comparison runs this step dense
    q, k, v = qkv(9)
    out = core.attention_override(session)(func, q, k, v, H, skip_reshape=True, skip_output_reshape=True,
                                           transformer_options={core.CONTEXT_KEY: ctx})
    assert func.calls == 1 and launches == ["int8"]
    assert rel_err(out, exact(q, k, v)) < 1e-5


@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_full_layout_on_the_triton_kernel(precision):
    """The full-layout call on the Triton 8-bit kernel (the CPU interpreter here): bf16 inputs with key padding,
    within the 8-bit bound of exact attention over the valid keys."""
    L, valid = 257, 200
    q, k, v = (t.to(torch.bfloat16) for t in qkv(7, length=L))
    kv_length = torch.tensor([valid], dtype=torch.int32)
    call = core.AttentionCall(grid=core.VideoGrid(1, 1, L), layer=0, step=0, total_steps=2, q=q, k=k, v=v,
                              kv_length=kv_length, backend="triton", precision=precision)
    out = dense_8bit.full_layout_attention(call, {})
    mask = torch.zeros(L)
    mask[valid:] = float("-inf")
    err = rel_err(out, exact(q, k, v, mask))
    print(f"{precision} full layout vs exact: {err:.4f}")
    assert err < EXACT_TOL[precision][0], f"{precision} full layout vs exact: {err:.3e}"


def test_compensation_is_refused_with_dense_calls_in_8bit():
    with pytest.raises(ValueError, match="compensate 'on' and precision '8-bit \\+ dense calls' do not combine"):
        core.SparseAttentionSession(core.RadialSettings(), core.SparseSchedule(), compensate=True, precision=DENSE8)
