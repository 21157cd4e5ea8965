"""The Sparse Attention Patch's precision input inside real ComfyUI (tiny WanModel on the CPU, reference backend):
the input is the node's last optional one with default bf16 (old workflows load unchanged); '8-bit' on a machine
without the units runs bf16 and says what is missing once; with 8-bit units the sparse calls run the 8-bit path, and
with '8-bit + dense calls' the dense layers' video self-attention too."""

from __future__ import annotations

import logging

import pytest
import torch

import comfy_env
from pack import import_pack

pytestmark = pytest.mark.comfyui

LOGGER = "sparse_video_attention"


def run(nodes, bridge, precision, seed=3):
    lat = torch.zeros(1, 16, 5, 16, 16)
    pos, neg = comfy_env.wan_conds(seed=seed)
    base = comfy_env.tiny_wan_t2v(seed=seed + 1)
    method = nodes.RadialMask().settings(0.2, 64, True, True)[0]
    patched = nodes.SparseAttentionPatch().patch(base, 0.0, 1.0, 1, "reference", False, method, precision=precision,
                                                 compensate="off")[0]  # the kernels' precision alone
    video = comfy_env.sample(patched, lat, pos, neg, steps=2, seed=seed + 2)
    return video, bridge.session_of(patched)


def test_precision_is_the_last_optional_input(nodes):
    optional = nodes.SparseAttentionPatch.INPUT_TYPES()["optional"]
    assert list(optional)[-1] == "precision"
    choices, options = optional["precision"]
    assert choices == ["bf16", "8-bit", "auto", "8-bit + dense calls"] and options["default"] == "bf16"


@pytest.mark.parametrize("precision", ["8-bit", "8-bit + dense calls"])
def test_8bit_without_the_units_runs_bf16_and_says_why_once(nodes, bridge, caplog, precision):
    bf16, _ = run(nodes, bridge, "bf16")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        video, session = run(nodes, bridge, precision)
    assert session.stats.sparse_calls > 0 and session.stats.dense_calls > 0 and not session.stats.dense_8bit_calls
    assert torch.equal(video, bf16)
    lines = [r.getMessage() for r in caplog.records if r.name == LOGGER and "8-bit" in r.getMessage()]
    assert len(lines) == 1 and "needs an NVIDIA GPU" in lines[0]


def test_8bit_units_run_the_8bit_path(nodes, bridge, monkeypatch):
    eight_bit = import_pack("kernels.eight_bit")
    session_module = import_pack("core.session")
    monkeypatch.setattr(session_module, "eight_bit_support",
                        lambda device: eight_bit.EightBitSupport("int8", "INT8 attention on Test GPU"))
    bf16, _ = run(nodes, bridge, "bf16")
    video, session = run(nodes, bridge, "auto")
    assert session.stats.sparse_calls > 0 and not session.stats.fallbacks
    err = ((video - bf16).norm() / bf16.norm()).item()
    assert 0 < err < 0.05, f"8-bit vs bf16 video: relative error {err:.3e}"


def test_dense_calls_in_8bit_run_the_dense_layer_on_the_8bit_kernel(nodes, bridge, monkeypatch):
    """dense_layers 1: layer 0 of every step runs on the 8-bit kernel at a full layout instead of ComfyUI's attention;
    the video stays within the 8-bit error of the bf16 one and differs from the '8-bit' video only by that layer."""
    eight_bit = import_pack("kernels.eight_bit")
    session_module = import_pack("core.session")
    monkeypatch.setattr(session_module, "eight_bit_support",
                        lambda device: eight_bit.EightBitSupport("int8", "INT8 attention on Test GPU"))
    bf16, _ = run(nodes, bridge, "bf16")
    sparse_only, plain = run(nodes, bridge, "8-bit")
    video, session = run(nodes, bridge, "8-bit + dense calls")
    stats = session.stats
    assert not stats.fallbacks and stats.sparse_calls == plain.stats.sparse_calls > 0
    assert stats.dense_calls == 0 and stats.dense_8bit_calls == plain.stats.dense_calls > 0
    assert {layer for _, layer in stats.eight_bit_dense} == {0}
    assert not torch.equal(video, sparse_only)
    err = ((video - bf16).norm() / bf16.norm()).item()
    assert 0 < err < 0.05, f"8-bit with dense calls vs bf16 video: relative error {err:.3e}"


def test_compensation_with_8bit_is_refused_at_the_node_and_auto_runs_it_in_bf16(nodes, bridge, monkeypatch, caplog):
    """The 8-bit kernel has no pooled terms: compensate 'on' with precision '8-bit' is an error naming both inputs;
    with 'auto' on a GPU that has 8-bit units the compensated calls run the bf16 kernel and the log says so."""
    base = comfy_env.tiny_wan_t2v(seed=1)
    with pytest.raises(ValueError, match="compensate 'on' and precision '8-bit' do not combine"):
        nodes.SparseAttentionPatch().patch(base, 0.0, 1.0, 1, "reference", False, None, compensate="on",
                                           precision="8-bit")
    eight_bit = import_pack("kernels.eight_bit")
    session_module = import_pack("core.session")
    monkeypatch.setattr(session_module, "eight_bit_support",
                        lambda device: eight_bit.EightBitSupport("int8", "INT8 attention on Test GPU"))
    patched = nodes.SparseAttentionPatch().patch(base, 0.0, 1.0, 1, "reference", False, None, compensate="on",
                                                 precision="auto")[0]
    with caplog.at_level(logging.INFO, logger=LOGGER):
        assert bridge.session_of(patched).kernel_precision(torch.device("cpu")) == "bf16"
    assert any("compensation" in r.getMessage() for r in caplog.records if r.name == LOGGER)
