"""The issue-19 benchmarks in their CPU modes: benchmarks/versus.py --smoke (every row runs or says why not) and
benchmarks/check_cost.py (the share of a run it states, and its --tiny run on ComfyUI's real WanModel)."""

from __future__ import annotations

import importlib.util
import json

import pytest

import comfy_env
from pack import REPO_ROOT

comfyui = pytest.mark.comfyui


def load_benchmark(name):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", REPO_ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def kitchen_with_sol_attn() -> bool:
    try:
        import comfy_kitchen
    except ImportError:
        return False
    return hasattr(comfy_kitchen, "sol_attn")


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
