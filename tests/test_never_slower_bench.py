"""benchmarks/never_slower.py in its CPU mode: every method on every kind of input through the dispatcher's routing
(with Hopper's break-even table, so that routing decides as on that GPU)."""

from __future__ import annotations

import importlib.util
import json

from pack import REPO_ROOT


def load_bench():
    spec = importlib.util.spec_from_file_location("_bench_never_slower", REPO_ROOT / "benchmarks" / "never_slower.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_never_slower_smoke_routes_what_is_above_the_break_even(tmp_path):
    bench = load_bench()
    assert bench.main(["--smoke", "--gpu-class", "hopper", "--repeats", "1", "--json", str(tmp_path / "n.json")]) == 0
    result = json.loads((tmp_path / "n.json").read_text())
    rows = result["rows"]
    assert result["meta"]["gpu_class"] == "hopper"
    assert {(r["inputs"], r["method"]) for r in rows} == \
        {(i, m) for i in bench.INPUTS for m in ("radial", "svg", "svg2", "adaspa")}
    assert all(r["status"] == "ok" for r in rows), [r["status"] for r in rows if r["status"] != "ok"]
    by = {(r["inputs"], r["method"]): r for r in rows}
    # White noise: SVG2 keeps ~90% of the pairs, above Hopper's cluster break-even: its heads run on SDPA itself.
    noise = by["unstructured", "svg2"]
    assert noise["routed_heads"] > 0 and noise["rel_err"] < 1e-2
    for r in rows:
        assert 0 <= r["routed_heads"] <= r["heads"] and 0 < r["density"] <= 1 and r["ratio"] > 0
        assert len(r["step_ms"]) == bench.TIMED_STEPS and all(ms > 0 for ms in r["step_ms"]), r
        if r["routed_heads"] == r["heads"]:  # the whole call went dense: SDPA's own output
            assert r["rel_err"] < 1e-2, r


def test_never_slower_runs_only_the_methods_asked_for(tmp_path):
    bench = load_bench()
    assert bench.main(["--smoke", "--inputs", "unstructured", "--methods", "svg2", "radial", "--repeats", "1",
                       "--json", str(tmp_path / "n.json")]) == 0
    rows = json.loads((tmp_path / "n.json").read_text())["rows"]
    assert sorted(r["method"] for r in rows) == ["radial", "svg2"] and {r["inputs"] for r in rows} == {"unstructured"}
