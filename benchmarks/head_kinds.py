"""Each method on each kind of head: density, attention recall and output error against dense (issue 17).

    python benchmarks/head_kinds.py --json head_kinds.json   # CPU: 8 x 16 x 24 tokens, torch reference kernels
    python benchmarks/head_kinds.py --smoke                  # a tiny grid, seconds

Inputs come from benchmarks/head_kind_inputs.py: one attention call per kind, every head of it of that kind. Each
call is made twice through a fresh planner, as steps 39 and 40 of a 50-step run (no AdaSpa search step): the first
builds the method's state (k-means, search, head classes), the second is measured. Recall is the attention mass the
method's kept keys hold (core.metrics.recall_from_lse against the dense LSE), the error the relative L2 distance of
the output from dense attention. Quality only: nothing is timed here (the reference kernels are not fast).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from pack import import_pack  # noqa: E402
from head_kind_inputs import KINDS, head_kind_qkv  # noqa: E402

core = import_pack("core")
metrics = import_pack("core.metrics")

RUN_STEPS, LATER_STEP = 50, 40
SHAPE = dict(frames=8, height=16, width=24, head_dim=64)
SMOKE_SHAPE = dict(frames=4, height=8, width=16, head_dim=64)


def methods(smoke: bool):
    """(name, settings) of every method at the settings of its Wan 2.1 workflow (workflows/wan2.1_t2v_14b_*.json),
    SVG with its semantic class (SVG2's clusters for the heads no block layout serves) and AdaSpa with its
    cluster-served heads (the same, chosen at its search); on the smoke grid blocks
    of 64 and fewer clusters, so that every layout has a few tiles to choose from."""
    block = 64 if smoke else 128
    svg2 = core.SVG2Settings(16, 32, 0.9, 0.10, 5, 2) if smoke else core.SVG2_PRESETS["wan_720p"]
    return [("radial", core.RadialSettings(decay_factor=0.2, block_size=block)),
            ("svg", core.SVGSettings(sparsity=0.3, block_size=block, attention_sink=True)),
            ("svg semantic", core.SVGSettings(sparsity=0.3, block_size=block, attention_sink=True, semantic_heads=True,
                                              semantic_clusters=svg2)),
            ("svg2", svg2),
            ("adaspa", core.AdaSpaSettings(block_size=64)),
            ("adaspa clusters", core.AdaSpaSettings(block_size=64, cluster_heads=True, clusters=svg2))]


def measure(settings, grid, q, k, v) -> dict:
    """{density, recall, error} of the method's later-step call on q, k, v (recall: mean over heads and rows)."""
    planner = settings.make_planner()
    for step, want_lse in ((LATER_STEP - 1, False), (LATER_STEP, True)):
        call = core.AttentionCall(grid=grid, layer=1, step=step, total_steps=RUN_STEPS, q=q, k=k, v=v,
                                  backend="reference", want_lse=want_lse)
        out, density = planner.attend(call)
    recall = metrics.recall_from_lse(call.lse, metrics.dense_lse(q, k))
    return dict(density=float(density), recall=float(recall.mean()),
                error=metrics.relative_error(out, F.scaled_dot_product_attention(q, k, v)))


def run(shape: dict, heads: int, seed: int, smoke: bool) -> dict:
    """{method: {kind: {density, recall, error}}}."""
    grid = core.VideoGrid(shape["frames"], shape["height"], shape["width"])
    results = {name: {} for name, _ in methods(smoke)}
    for kind in KINDS:
        q, k, v = head_kind_qkv((kind,) * heads, **shape, seed=seed)
        for name, settings in methods(smoke):
            results[name][kind] = measure(settings, grid, q, k, v)
    return results


def table(results: dict) -> str:
    kinds = list(next(iter(results.values())))
    lines = [f"{'method':<16}{'':<9}" + "".join(f"{kind:>10}" for kind in kinds)]
    for name, per_kind in results.items():
        for quantity in ("density", "recall", "error"):
            lines.append(f"{name if quantity == 'density' else '':<16}{quantity:<9}"
                         + "".join(f"{per_kind[kind][quantity]:>10.3f}" for kind in kinds))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="a tiny grid and few clusters: seconds, for the tests")
    parser.add_argument("--heads", type=int, default=2, help="heads per call, all of one kind (default 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    if args.heads < 1:
        parser.error(f"--heads must be at least 1, got {args.heads}")
    shape = SMOKE_SHAPE if args.smoke else SHAPE
    results = run(shape, args.heads, args.seed, args.smoke)
    grid = f"{shape['frames']}x{shape['height']}x{shape['width']}"
    print(f"CPU, reference kernels, float32: grid {grid} = {shape['frames'] * shape['height'] * shape['width']} "
          f"tokens, {args.heads} heads x {shape['head_dim']} per call, one call per head kind, seed {args.seed}")
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps(dict(device="CPU", grid=grid, heads=args.heads, head_dim=shape["head_dim"],
                                             seed=args.seed, results=results), indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
