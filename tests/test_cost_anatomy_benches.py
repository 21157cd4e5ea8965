"""The benchmarks that split a cost into its parts, in their CPU modes (tiny shapes, Triton's interpreter):
``benchmarks/svg2_stages.py --profile`` (where SVG2's planner time goes), ``benchmarks/compensation_cost.py
--anatomy`` (where the compensated kernel's extra time goes) and ``benchmarks/summary_cost.py`` (SVG2's compensation
per group against summarised). Their figures mean nothing on the CPU; what is checked
is that every part is measured and written."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from pack import REPO_ROOT


def run_benchmark(name, *args):
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / f"{name}.py"), "--smoke", *args],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done.stdout


def test_svg2_stages_profile_writes_the_trace_ops_and_one_group_time(tmp_path):
    run_benchmark("svg2_stages", "--profile", str(tmp_path / "profile"), "--json", str(tmp_path / "s.json"))
    entry = json.loads((tmp_path / "s.json").read_text())["results"]["smoke"]
    assert entry["check"]["ok"] and entry["planner_later_one_group_ms"] > 0
    profile = entry["profile"]
    assert {"kernels", "kernel_span_ms", "gpu_busy_ms", "top_kernels", "runtime_calls"} <= set(profile)
    trace = json.loads((tmp_path / "profile" / "svg2_planner_smoke.trace.json").read_text())
    assert any(e.get("cat") == "cpu_op" for e in trace["traceEvents"])  # the planner's ops were recorded
    ops = (tmp_path / "profile" / "svg2_planner_smoke.ops.txt").read_text()
    assert "by device time" in ops and "by host time" in ops


def test_compensation_anatomy_times_every_part(tmp_path):
    run_benchmark("compensation_cost", "--anatomy", "--layouts", "random", "--json", str(tmp_path / "c.json"))
    result = json.loads((tmp_path / "c.json").read_text())
    assert all(c["ok"] for c in result["checks"])
    (row,) = result["results"]
    parts = row["anatomy_ms"]
    assert {"preparation (pooled layout + kept table)", "empty layout, plain", "empty layout, compensated",
            "compensated kernel, BLOCK_P 16", "compensated kernel, BLOCK_P 64",
            "compensated kernel, BLOCK_P 128"} == set(parts)  # the GPU adds the 8-warp rows
    assert all(ms > 0 for ms in parts.values())


def test_summary_cost_times_every_variant_after_its_checks(tmp_path):
    """benchmarks/summary_cost.py: each kept fraction gets plain, per-group and summarised times (and the summary's
    own), after checks of the Triton kernel against the torch reference for every compensation."""
    run_benchmark("summary_cost", "--own-terms", "2", "--fractions", "0.25", "--json", str(tmp_path / "s.json"))
    result = json.loads((tmp_path / "s.json").read_text())
    assert len(result["checks"]) == 2 and all(c["rel_err"] < 1e-2 for c in result["checks"])
    (row,) = result["rows"]
    assert all(row[key] > 0 for key in ("plain_ms", "per_group_ms", "summarised_2_ms", "summary_2_ms"))
