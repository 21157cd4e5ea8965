"""Draw the Sparse Attention Inspector's pictures for a realistic run, without a GPU or a model: docs/ example.

Wan 2.1 14B at 720p (81 frames): a 21 x 45 x 80 token grid (75,600 tokens), 40 transformer blocks, 30 steps,
Radial with the pack's defaults (decay 0.2, block 128, dense_steps 0.25, dense_layers 1). The run is simulated
through the session's own bookkeeping (each call records the density the planner's layout has) instead of running
attention, so it takes a second on a CPU. Prints the run summary the pack logs after each run.

    python benchmarks/inspector_example.py [--out docs/inspector_radial_wan720p.png] [--layer 1] [--size 720]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from pack import REPO_ROOT, import_pack  # noqa: E402

core = import_pack("core")
report = import_pack("core.report")

GRID = core.VideoGrid(frames=21, height=45, width=80)  # Wan 720p, 81 frames: latent 21 x 90 x 160, patch 1 x 2 x 2
LAYERS, STEPS = 40, 30


def simulated_session(grid=GRID, layers=LAYERS, steps=STEPS, settings=None, schedule=None, backend="auto"):
    """A session whose last run is a full sampling run's bookkeeping (densities, layouts), no attention computed."""
    session = core.SparseAttentionSession(settings or core.RadialSettings(), schedule or core.SparseSchedule(),
                                          backend=backend)
    sigmas = [1.0 - i / steps for i in range(steps + 1)]
    session.begin_run()
    density = float(session.planner.block_mask(grid).float().mean())
    for step in range(steps):
        ctx = session.forward_context(grid, sigmas[step], sigmas)
        for _ in range(layers):
            layer = ctx.next_layer()
            if session.wants_sparse(ctx, layer):
                session.record_sparse(ctx, layer, grid, density)
            else:
                session.record_dense(ctx, layer)
    return session


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "docs" / "inspector_radial_wan720p.png")
    parser.add_argument("--layer", type=int, default=1)
    parser.add_argument("--size", type=int, default=720, help="width of each picture in pixels")
    args = parser.parse_args()

    session = simulated_session()
    print(core.run_summary(session))
    layout, density, _ = report.inspect(session, layer=args.layer, max_size=args.size)
    picture = report.side_by_side([layout, density], gap=0)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    # a palette of 256 colours keeps the PNG small (the pictures hold a colour map and text, nothing photographic)
    picture.quantize(colors=256, dither=0).save(args.out, optimize=True)
    print(f"wrote {args.out} ({picture.width} x {picture.height}, {args.out.stat().st_size / 1024:.0f} KB)")


if __name__ == "__main__":
    main()
