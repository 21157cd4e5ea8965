"""benchmarks/head_kinds.py --smoke: every method measured on every head kind, the table printed and the JSON
written; on semantic heads the cluster layout (SVG2) keeps more mass than SVG's spatial / temporal blocks."""

from __future__ import annotations

import json
import sys

from pack import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import head_kinds  # noqa: E402
from head_kind_inputs import KINDS  # noqa: E402


def test_smoke_measures_every_method_on_every_kind(tmp_path, capsys):
    path = tmp_path / "kinds.json"
    assert head_kinds.main(["--smoke", "--json", str(path)]) == 0
    printed = capsys.readouterr().out
    assert "CPU, reference kernels" in printed and all(kind in printed for kind in KINDS)
    report = json.loads(path.read_text())
    assert report["device"] == "CPU" and report["grid"] == "4x8x16"
    results = report["results"]
    assert set(results) == {name for name, _ in head_kinds.methods(smoke=True)}
    for per_kind in results.values():
        assert set(per_kind) == set(KINDS)
        for row in per_kind.values():
            assert 0.0 < row["density"] <= 1.0 and 0.0 <= row["recall"] <= 1.0 + 1e-6 and row["error"] >= 0.0
    assert results["svg2"]["semantic"]["recall"] > results["svg"]["semantic"]["recall"] + 0.2
