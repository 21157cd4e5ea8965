"""The issue-19 benchmarks in their CPU modes: benchmarks/versus.py --smoke (every row runs or says why not),
benchmarks/check_cost.py (the share of a run it states, and its --tiny run on ComfyUI's real WanModel), and
benchmarks/quality.py's rows for ComfyUI's built-in sparse kernel and given knobs at a tiny size of the proxy."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import types

import pytest
import torch
import torch.nn.functional as F

import comfy_env
from pack import REPO_ROOT

comfyui = pytest.mark.comfyui


def load_benchmark(name):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", REPO_ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # (dataclasses look their module up while the file runs)
    spec.loader.exec_module(module)
    return module


def kitchen_with_sol_attn() -> bool:
    try:
        import comfy_kitchen
    except ImportError:
        return False
    return hasattr(comfy_kitchen, "sol_attn")


def comfyui_passes_block_index() -> bool:
    """Whether this ComfyUI's WanModel names each block in transformer_options (0.33 does, 0.3.64 does not)."""
    import inspect

    from comfy.ldm.wan.model import WanModel
    return "block_index" in inspect.getsource(WanModel.forward_orig)


def test_versus_smoke_runs_every_row_or_says_why(tmp_path, capsys):
    versus = load_benchmark("versus")
    assert versus.main(["--smoke", "--json", str(tmp_path / "v.json")]) == 0
    rows = json.loads((tmp_path / "v.json").read_text())["rows"]
    by_kind = {}
    for row in rows:
        by_kind.setdefault(row["kind"], []).append(row)
    assert [r["method"] for r in by_kind["ours"]] == ["radial", "svg", "svg2", "adaspa"]
    for row in by_kind["ours"] + by_kind["dense"]:
        assert row["status"] == "ok", row
        assert row["ms"] > 0 and 0 < row["density"] <= 1 and 0 <= row["rel_err"] < 0.5
    sol = by_kind["built-in sparse"]
    assert [r["settings"] for r in sol] == ["tau 1.3 (node default)", "tau 1.0", "tau 2.0"]
    for row in sol + by_kind["dense 8-bit"]:  # ran, or said that the package or its kernel is missing
        assert row["status"] == "ok" or row["status"].startswith(("not installed", "not available")), row
    if kitchen_with_sol_attn():  # its eager reference runs on the CPU: a sparse output near dense, no density
        assert all(r["status"] == "ok" and 0 < r["rel_err"] < 0.5 and "density" not in r for r in sol)
    assert "torch SDPA" in capsys.readouterr().out.rsplit("-----", 1)[-1]  # the table comes last


def test_versus_methods_picks_ours(tmp_path):
    versus = load_benchmark("versus")
    out = tmp_path / "v.json"
    assert versus.main(["--smoke", "--ours-only", "--sol-taus", "--methods", "adaspa", "radial",
                        "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["method"] for r in rows] == ["torch SDPA", "radial", "adaspa"]  # ours in the table's own order


def test_check_cost_share_of_a_run():
    check_cost = load_benchmark("check_cost")
    defaults = dict(steps="0.5", rows=64, compare_step=False, floor=0.8)
    run = check_cost.run_share(30, dense_step=10.0, sparse_step=5.0, extra=0.5, defaults=defaults,
                               patch_dense_steps=0.25)
    assert run["dense_steps"] == 8 and run["checked_steps"] == [15]
    assert run["run_s"] == 8 * 10.0 + 22 * 5.0 and run["share"] == pytest.approx(0.5 / 190.0)
    few = check_cost.run_share(4, 10.0, 5.0, 0.5, defaults, 0.25)  # a 4-step run keeps one dense step
    assert few["dense_steps"] == 1 and few["checked_steps"] == [2] and few["share"] == pytest.approx(0.5 / 25.0)
    dense_only = check_cost.run_share(4, 10.0, 5.0, 0.5, dict(defaults, steps="0"), 0.25)
    assert dense_only["checked_steps"] == [] and dense_only["share"] == 0  # a check on a dense step costs nothing


@comfyui
def test_check_cost_tiny_run(tmp_path):
    check_cost = load_benchmark("check_cost")
    path, _ = comfy_env.setup()
    check_cost.main(["--tiny", "--comfyui", str(path), "--repeats", "1", "--json", str(tmp_path / "c.json")])
    result = json.loads((tmp_path / "c.json").read_text())
    assert result["check_settings"]["rows"] == 64 and result["record_calls"] >= 1
    assert [r["run_steps"] for r in result["runs"]] == [30, 4]
    assert len(result["steps_off_s"][0]) == len(result["steps_on_s"][0]) == 3
    assert result["check_summary"][0].startswith("check (steps 2")


# ------------------------------------------------------------------------ quality.py: the built-in kernel's rows

TINY = ["--frames", "4", "--size", "32", "--seeds", "1", "--cfg", "1", "--backend", "reference"]  # 1,024 tokens


class ExactSolAttn:
    """A comfy_kitchen stand-in whose sol_attn is exact attention on sol_attn's (B, T, H, D) layout, recording each
    call: where the padding or scale were wrong, the proxy's video would differ from dense."""

    def __init__(self):
        self.calls = []

    def sol_attn(self, q, k, v, tau, scale, token_aug):
        self.calls.append(dict(shape=tuple(q.shape), tau=tau, scale=scale, token_aug=token_aug,
                               padding_is_zero=bool((q[..., 64:] == 0).all() and (k[..., 64:] == 0).all())))
        out = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), scale=scale)
        return out.transpose(1, 2)

    @staticmethod
    def sol_attn_is_available(device=None):
        return False  # as on a CPU: the benchmark calls it a head at a time, as for kitchen's eager reference


def test_quality_knobs_parse():
    quality = load_benchmark("quality")
    assert quality.method_knob("radial=0.2") == ("radial", 0.2)
    assert quality.method_knob("svg2=0.9") == ("svg2", 0.9)
    for bad in ("bogus=0.2", "svg=x", "svg", "=0.3"):
        with pytest.raises(argparse.ArgumentTypeError, match="METHOD=VALUE"):
            quality.method_knob(bad)
    with pytest.raises(SystemExit):  # --knob (one method, one density) and --knobs do not mix
        quality.main(["--knobs", "svg=0.3", "--knob", "0.3", "--methods", "svg", "--densities", "0.25"])


def test_builtin_override_takes_only_sparse_video_self_attention():
    """Only video self-attention of a sparse step (1 and 2 of 3) in a sparse layer (1 and up) goes to sol_attn."""
    quality = load_benchmark("quality")
    kitchen = ExactSolAttn()
    routed, dense_calls = [], []
    override = quality.builtin_override(kitchen, 1.3, routed)
    sample_sigmas = torch.tensor([1.0, 0.75, 0.4, 0.0])
    g = torch.Generator().manual_seed(0)
    video, text = (torch.randn(1, n, 4 * 64, generator=g) for n in (128, 4))

    def attention(q, k, v, heads):  # ComfyUI's layout, head_dim 64
        return F.scaled_dot_product_attention(*(t.view(1, -1, heads, 64).transpose(1, 2) for t in (q, k, v))) \
            .transpose(1, 2).reshape(q.shape)

    def func(q, k, v, heads, **kwargs):  # ComfyUI's own attention: records the key length of what it serves
        dense_calls.append(k.shape[1])
        return attention(q, k, v, heads)

    def call(step, layer, k=video):
        options = dict(sigmas=sample_sigmas[step:step + 1], sample_sigmas=sample_sigmas, block_index=layer)
        return override(func, video, k, k, heads=4, transformer_options=options)

    expected = attention(video, video, video, 4)
    for step in range(3):
        for layer in range(3):
            assert torch.allclose(call(step, layer), expected, atol=1e-5)  # padded to 128, scaled for 64
            call(step, layer, k=text)  # the text cross-attention of the block
    assert routed == [(1, 1), (1, 2), (2, 1), (2, 2)]
    assert len(kitchen.calls) == 4 * 4  # a head at a time where no fused kernel runs
    assert {(c["shape"], c["tau"], c["scale"], c["token_aug"], c["padding_is_zero"]) for c in kitchen.calls} == \
        {((1, 128, 1, 128), 1.3, 64 ** -0.5, 256, True)}
    assert sorted(dense_calls) == [4] * 9 + [128] * 5  # every cross-attention; step 0, and layer 0 of steps 1-2
    override(func, video, video, video, heads=4)  # no step or layer known: ComfyUI's attention
    assert len(routed) == 4 and len(dense_calls) == 15


@comfyui
def test_quality_builtin_rows_and_knobs_run_at_a_tiny_size(tmp_path, monkeypatch):
    quality = load_benchmark("quality")
    kitchen = ExactSolAttn()
    monkeypatch.setattr(quality.versus, "kitchen", lambda: kitchen)
    path, _ = comfy_env.setup()
    out = tmp_path / "q.json"
    quality.main(["--comfyui", str(path), *TINY, "--steps", "2", "--builtin-taus", "1.3", "--knobs", "radial=0.2",
                  "svg=0.3", "--json", str(out)])
    result = json.loads(out.read_text())
    builtin, radial, svg = result["results"]
    assert builtin["knob"] == dict(tau=1.3, extra_tokens=256)
    if comfyui_passes_block_index():
        assert builtin["status"] == "ok"
        assert builtin["routed_calls"] == 7 and builtin["density"] is None  # step 1 of 2, blocks 1-7 of 8, cfg 1
        assert len(kitchen.calls) == 7 * 4 and {c["shape"] for c in kitchen.calls} == {(1, 1024, 1, 128)}
        assert builtin["psnr"] > 60 and builtin["rel_l2"] < 1e-3  # exact attention through the override
        assert builtin["kernel"].startswith("eager reference")
    else:  # no call can be told apart: the row says so rather than scoring dense's video
        assert builtin["status"].startswith("not available") and "block_index" in builtin["status"]
        assert "psnr" not in builtin and not kitchen.calls
    for row, knob in ((radial, dict(decay_factor=0.2)), (svg, dict(sparsity=0.3))):
        assert row["status"] == "ok" and row["knob"] == knob and not row["calibrated"]
        assert row["target_density"] is None and 0 < row["density"] < 1 and 10 < row["psnr"] < 60


@comfyui
@pytest.mark.parametrize("missing", ["no sol_attn", "not installed"])
def test_quality_builtin_row_says_why_without_sol_attn(tmp_path, monkeypatch, capsys, missing):
    quality = load_benchmark("quality")

    def kitchen():
        if missing == "not installed":
            raise quality.versus.Unavailable("not installed (comfy-kitchen: No module named 'comfy_kitchen')")
        return types.SimpleNamespace(int8_attention=None)  # an older comfy-kitchen

    monkeypatch.setattr(quality.versus, "kitchen", kitchen)
    path, _ = comfy_env.setup()
    out = tmp_path / "q.json"
    ours = ["--methods", "svg", "--densities", "0.25", "--knob", "0.3"] if missing == "no sol_attn" else ["--methods"]
    quality.main(["--comfyui", str(path), *TINY, "--steps", "2", "--builtin-taus", "1.3", "2.0", *ours,
                  "--json", str(out)])
    builtin13, builtin2, *rest = json.loads(out.read_text())["results"]
    for row in (builtin13, builtin2):
        assert row["status"].startswith(("not available", "not installed")) and missing in row["status"]
        assert "psnr" not in row
    table = capsys.readouterr().out.rsplit("speed", 1)[-1]
    assert "sol_attn tau 1.3" in table and "sol_attn tau 2" in table and missing in table
    if rest:  # the other rows still run; --knob as before: one method at its target density, no calibration
        svg, = rest
        assert svg["status"] == "ok" and svg["target_density"] == 0.25 and svg["knob"] == dict(sparsity=0.3)
        assert not svg["calibrated"] and svg["psnr"] > 10 and "svg sparsity 0.3" in table


# ------------------------------------------------------------------------ quality.py: 8-bit against bf16

def test_quality_precision_arguments_are_checked(capsys):
    quality = load_benchmark("quality")
    for bad, says in ((["--precision", "8-bit", "--simulated-8bit", "fp8"], "give --backend reference"),
                      (["--backend", "reference", "--simulated-8bit", "fp8"], "and --precision 8-bit"),
                      (["--precision", "bf16", "8-bit", "--compensate", "both"], "do not combine")):
        with pytest.raises(SystemExit):
            quality.main(bad)
        assert says in capsys.readouterr().err


@comfyui
def test_quality_runs_each_row_in_bf16_and_simulated_8bit(tmp_path):
    quality = load_benchmark("quality")
    path, _ = comfy_env.setup()
    out = tmp_path / "q.json"
    quality.main(["--comfyui", str(path), *TINY, "--steps", "2", "--knobs", "svg=0.3", "--precision", "bf16", "8-bit",
                  "--simulated-8bit", "fp8", "--json", str(out)])
    result = json.loads(out.read_text())
    assert result["simulated_8bit"] == "fp8" and result["precision"] == ["bf16", "8-bit"]
    bf16, fp8 = result["results"]
    assert (bf16["precision"], fp8["precision"]) == ("bf16", "8-bit") and fp8["label"].endswith(", 8-bit")
    assert bf16["density"] == fp8["density"] and bf16["knob"] == fp8["knob"]  # one layout, two precisions
    assert bf16["psnr"] != fp8["psnr"]  # the 8-bit row ran quantized, not silently in bf16
    assert abs(bf16["psnr"] - fp8["psnr"]) < 3 and fp8["psnr"] > 10
