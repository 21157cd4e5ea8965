"""The precision setting (bf16 / 8-bit / auto): how the session resolves it per device and says so once, and that
every planner running the fixed-block kernel hands it on (Radial, SVG, AdaSpa). CPU only: the planners run on the
reference backend, whose 8-bit path is the simulated-quantization reference."""

from __future__ import annotations

import logging

import pytest
import torch

from pack import import_pack
from test_block_sparse_kernel import new_generator

core = import_pack("core")
session_module = import_pack("core.session")
EB = import_pack("kernels.eight_bit")
adaspa = import_pack("core.adaspa")
svg = import_pack("core.svg")
method = import_pack("core.method")

GRID = core.VideoGrid(4, 8, 8)  # 256 tokens: 4 blocks of 64


def make_session(precision, backend="reference"):
    return core.SparseAttentionSession(core.RadialSettings(block_size=64), core.SparseSchedule(dense_steps=0.0),
                                       backend=backend, precision=precision)


def test_unknown_precision_is_a_value_error():
    with pytest.raises(ValueError, match="precision must be one of"):
        make_session("int4")


def test_bf16_never_asks_the_gpu(monkeypatch):
    monkeypatch.setattr(session_module, "eight_bit_support", lambda device: pytest.fail("asked"))
    assert make_session("bf16").kernel_precision("cpu") == "bf16"


def test_auto_without_units_runs_bf16_and_says_so_once(caplog):
    session = make_session("auto")
    with caplog.at_level(logging.INFO, logger="sparse_video_attention"):
        assert session.kernel_precision("cpu") == "bf16"
        assert session.kernel_precision("cpu") == "bf16"
    lines = [r.getMessage() for r in caplog.records if "precision" in r.getMessage()]
    assert len(lines) == 1 and "auto: bf16" in lines[0] and "NVIDIA GPU" in lines[0]
    assert not session.stats.fallbacks  # auto falling back is no fallback of the run


def test_8bit_without_units_names_what_is_missing_once(caplog):
    session = make_session("8-bit")
    with caplog.at_level(logging.WARNING, logger="sparse_video_attention"):
        assert session.kernel_precision("cpu") == "bf16"
        assert session.kernel_precision("cpu") == "bf16"
    lines = [r.getMessage() for r in caplog.records if "8-bit" in r.getMessage()]
    assert len(lines) == 1 and "needs an NVIDIA GPU" in lines[0] and "bf16" in lines[0]
    assert "no-8-bit" in session.stats.fallbacks


@pytest.mark.parametrize("found", ["fp8", "int8"])
def test_8bit_and_auto_take_what_the_gpu_has(monkeypatch, caplog, found):
    monkeypatch.setattr(session_module, "eight_bit_support",
                        lambda device: EB.EightBitSupport(found, f"{found} attention on Test GPU"))
    for precision in ("8-bit", "auto"):
        session = make_session(precision)
        with caplog.at_level(logging.INFO, logger="sparse_video_attention"):
            assert session.kernel_precision("cpu") == found
        assert f"precision {precision}: {found} attention on Test GPU" in caplog.text


class PrecisionSpy:
    """Wraps the kernel entry point where a planner module imported it; records each launch's precision."""

    def __init__(self, monkeypatch, *modules):
        self.seen = []
        real = method.block_sparse_attention
        for module in modules:
            monkeypatch.setattr(module, "block_sparse_attention", self._wrap(real))

    def _wrap(self, real):
        def spy(*args, precision="bf16", **kwargs):
            self.seen.append(precision)
            return real(*args, precision=precision, **kwargs)
        return spy


def video_inputs(gen, B=1, H=2, D=32):
    pos = torch.arange(GRID.total_tokens, dtype=torch.float32)
    feats = torch.stack([torch.sin(pos / 7.0), torch.cos(pos / 11.0), torch.sin(pos / 31.0)], 1)
    w = torch.randn(3, B, H, 3, D, generator=gen)
    return tuple(torch.einsum("lf,bhfd->bhld", feats, w[i]) + 0.3 * torch.randn(B, H, len(pos), D, generator=gen)
                 for i in range(3))


PLANNERS = {
    "radial": lambda: core.RadialSettings(block_size=64, attention_sink=False),
    "svg": lambda: svg.SVGSettings(sparsity=0.5, block_size=64, sample_fraction=0.5),
    "adaspa": lambda: adaspa.AdaSpaSettings(recall=0.7, search_steps=(0.0,), block_size=64, min_density=0.0,
                                            max_density=1.0),
}


@pytest.mark.parametrize("name", PLANNERS)
def test_planners_hand_the_precision_to_the_kernel(monkeypatch, name):
    gen = new_generator()
    q, k, v = video_inputs(gen)
    spy = PrecisionSpy(monkeypatch, method, svg, adaspa)
    outputs = {}
    for precision in ("bf16", "int8"):
        planner = PLANNERS[name]().make_planner()
        for step in (0, 1):  # AdaSpa searches (dense) at step 0, runs its layout from step 1
            call = core.AttentionCall(grid=GRID, layer=1, step=step, total_steps=4, q=q, k=k, v=v,
                                      backend="reference", precision=precision)
            outputs[precision], density = planner.attend(call)
        assert density < 1.0, f"{name}: the last call must be sparse"
    assert "int8" in spy.seen and set(spy.seen) == {"bf16", "int8"}, f"{name}: launches saw {spy.seen}"
    err = ((outputs["int8"] - outputs["bf16"]).norm() / outputs["bf16"].norm()).item()
    assert 0 < err < 0.05, f"{name}: 8-bit vs bf16 relative error {err:.3e} seed={gen.initial_seed()}"
