"""What the Sparse Attention Check costs: one sparse step of ComfyUI's WanModel with the check off and on (GPU).

    python benchmarks/check_cost.py --comfyui PATH [--config 14b-720p] [--run-steps 30 4] [--json out.json]
    python benchmarks/check_cost.py --comfyui PATH --tiny     # CPU: a tiny Wan, the torch reference (checks the script)

The model is built as benchmarks/e2e.py builds it (ComfyUI's own detection, random bf16 weights, the whole model on
the GPU), patched with Radial at its workflow's settings, and the check is added through the Sparse Attention Check
node at its defaults (rows, floor; compare_step off unless --compare-step). Three-step runs (step 0 dense, 1 and 2
sparse) through ComfyUI's sampler: a warm-up run with the check on at step 1 (compiles every kernel variant, the
LSE-returning one included), then runs with the check off and with the check at step 2, alternated --repeats times.
The check's cost is the median difference of step 2 between them; one more run times the check's own comparisons
(CheckResults.record, synchronised) to show where the cost goes.

The cost as a share of a run: a run of N steps (the node's default steps: one checked step, the middle one) with
the patch's dense_steps (the workflow's 0.25) costs dense steps x the dense step + sparse steps x the sparse step,
from the same measurements; the check adds its cost on each checked step that is sparse. The target (issue 19):
at most 10% of the run when on.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
import e2e  # noqa: E402
from pack import import_pack  # noqa: E402

MEASURED_STEPS, CHECKED_STEP = 3, 2
WORKFLOW_DENSE_STEPS = 0.25  # the Wan workflows' Sparse Attention Patch
TINY = e2e.Config(lambda: e2e.wan_checkpoint(256, 512, 2), (16, 4, 16, 16), lambda: e2e.text(8, 4096),
                  dict(e2e.WAN_RADIAL, block_size=64), 1)  # 2 heads of 128, 2 blocks, 4 x 8 x 8 tokens


def check_defaults(nodes) -> dict:
    """The Sparse Attention Check node's default inputs."""
    required = nodes.SparseAttentionCheck.INPUT_TYPES()["required"]
    return {name: spec[1]["default"] for name, spec in required.items() if name != "model"}


def with_check(nodes, model, defaults, steps, compare_step):
    inputs = dict(defaults, steps=steps, compare_step=compare_step)
    return nodes.SparseAttentionCheck().check(model, **inputs)[0]


class RecordTimer:
    """Times every CheckResults.record call (synchronised) while active."""

    def __init__(self):
        self.cls = import_pack("core.check").CheckResults
        self.seconds = 0.0
        self.calls = 0

    def __enter__(self):
        original = self.original = self.cls.record

        def timed(results, *args, **kwargs):
            e2e.sync()
            start = time.perf_counter()
            original(results, *args, **kwargs)
            e2e.sync()
            self.seconds += time.perf_counter() - start
            self.calls += 1

        self.cls.record = timed
        return self

    def __exit__(self, *_):
        self.cls.record = self.original


def run_share(run_steps, dense_step, sparse_step, extra, defaults, patch_dense_steps):
    """The check's cost as a share of a run of ``run_steps`` steps (sparse from the patch's schedule)."""
    core = import_pack("core")
    schedule = core.SparseSchedule(dense_steps=patch_dense_steps, sparse_end=1.0, dense_layers=1)
    sparse = schedule.sparse_step_range(run_steps)
    checked, _ = core.CheckSettings(steps=core.parse_steps(defaults["steps"])).step_indices(run_steps)
    checked_sparse = sorted(s for s in checked if s in sparse)
    run_s = (run_steps - len(sparse)) * dense_step + len(sparse) * sparse_step
    return dict(run_steps=run_steps, dense_steps=run_steps - len(sparse), checked_steps=checked_sparse,
                run_s=run_s, check_s=len(checked_sparse) * extra, share=len(checked_sparse) * extra / run_s)


def measure(args, nodes, device):
    config = TINY if args.tiny else e2e.CONFIGS[args.config]
    model = e2e.build_model(config.checkpoint(), device)
    latent, cond = e2e.empty_latent(config.latent), config.cond()
    method = nodes.RadialMask().settings(**config.radial)[0]
    backend = "reference" if args.tiny else "auto"
    patched = nodes.SparseAttentionPatch().patch(model, dense_steps=1, sparse_end=1.0, dense_layers=config.dense_layers,
                                                 backend=backend, verbose=False, method=method)[0]
    defaults = check_defaults(nodes)
    checked = with_check(nodes, patched, defaults, str(CHECKED_STEP), args.compare_step)
    print(f"check settings: {dict(defaults, steps=str(CHECKED_STEP), compare_step=args.compare_step)} "
          f"(node defaults: {defaults})", flush=True)

    e2e.sample_step_times(with_check(nodes, patched, defaults, "1", args.compare_step), latent, 2, cond, args.cfg)
    off, on = [], []
    for _ in range(args.repeats):
        off.append(e2e.sample_step_times(patched, latent, MEASURED_STEPS, cond, args.cfg))
        on.append(e2e.sample_step_times(checked, latent, MEASURED_STEPS, cond, args.cfg))
        print(f"  steps s: check off {[round(s, 3) for s in off[-1]]}, on {[round(s, 3) for s in on[-1]]}", flush=True)
    stats = nodes.session_of(checked).stats
    assert stats.sparse_calls and not stats.fallbacks, f"no sparse step ({stats.fallback_messages})"
    results = nodes.session_of(checked).check
    assert results is not None and results.recall, "the check recorded nothing"
    with RecordTimer() as timer:
        e2e.sample_step_times(checked, latent, MEASURED_STEPS, cond, args.cfg)

    dense_step = statistics.median(run[0] for run in off)
    sparse_step = statistics.median(run[CHECKED_STEP] for run in off)
    checked_step = statistics.median(run[CHECKED_STEP] for run in on)
    extra = statistics.median(b[CHECKED_STEP] - a[CHECKED_STEP] for a, b in zip(off, on))
    return dict(config="tiny" if args.tiny else args.config, tokens=stats.grid.total_tokens, cfg=args.cfg,
                check_settings=dict(defaults, compare_step=args.compare_step), dense_step_s=dense_step,
                sparse_step_s=sparse_step, checked_step_s=checked_step, check_extra_s=extra,
                record_s=timer.seconds, record_calls=timer.calls, check_summary=results.summary_lines(1)[:1],
                steps_off_s=off, steps_on_s=on,
                runs=[run_share(n, dense_step, sparse_step, extra, defaults, args.dense_steps) for n in args.run_steps])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--comfyui", default=None, help="ComfyUI folder (else $COMFYUI_PATH, ~/comfy/ComfyUI)")
    parser.add_argument("--config", default="14b-720p", choices=list(e2e.CONFIGS))
    parser.add_argument("--run-steps", nargs="+", type=int, default=[30, 4],
                        help="runs to state the cost for (the 14B workflow's 30 steps, a 4-step distilled run)")
    parser.add_argument("--dense-steps", type=float, default=WORKFLOW_DENSE_STEPS,
                        help="the patch's dense_steps in those runs")
    parser.add_argument("--cfg", type=float, default=1.0,
                        help="1: one model call per step, the check's largest share (at cfg > 1 each step batches "
                             "cond and uncond and the check still compares the first only)")
    parser.add_argument("--compare-step", action="store_true",
                        help="also run the check's whole-step comparison (one dense step more on the checked step)")
    parser.add_argument("--repeats", type=int, default=2, help="check off / on run pairs (median of the differences)")
    parser.add_argument("--tiny", action="store_true", help="CPU: a tiny Wan and the torch reference kernels")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if not args.tiny and not torch.cuda.is_available():
        parser.error("this benchmark needs a CUDA GPU; --tiny checks it on the CPU")
    import os
    comfyui = args.comfyui or os.environ.get("COMFYUI_PATH") or str(Path.home() / "comfy/ComfyUI")
    sys.path.insert(0, comfyui)
    import comfy.cli_args

    if args.tiny:
        comfy.cli_args.args.cpu = True
    else:
        comfy.cli_args.args.highvram = True  # the whole model on the GPU: time attention, not weight streaming
    import comfyui_version

    nodes = import_pack("nodes")
    device = torch.device("cpu" if args.tiny else "cuda")
    result = measure(args, nodes, device)
    result.update(comfyui=comfyui_version.__version__, torch=torch.__version__, date=time.strftime("%Y-%m-%d"),
                  device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))

    print(f"\n{result['device']} | torch {result['torch']} | ComfyUI {result['comfyui']} | {result['date']}")
    print(f"{result['config']} ({result['tokens']} tokens), cfg {args.cfg:g}, Radial; check rows "
          f"{result['check_settings']['rows']}, compare_step {args.compare_step}")
    print(f"dense step {result['dense_step_s']:.3f} s, sparse step {result['sparse_step_s']:.3f} s, sparse step "
          f"checked {result['checked_step_s']:.3f} s: the check adds {result['check_extra_s']:.3f} s per checked "
          f"step ({result['record_s']:.3f} s of it in the check's comparisons, {result['record_calls']} checked "
          "attention calls)")
    print(f"{'run steps':>9} {'dense':>6} {'checked':>10} {'run s':>9} {'check s':>8} {'share':>7}  (target <= 10%)")
    for r in result["runs"]:
        print(f"{r['run_steps']:>9} {r['dense_steps']:>6} {str(r['checked_steps']):>10} {r['run_s']:>9.2f} "
              f"{r['check_s']:>8.3f} {r['share']:>7.2%}")


if __name__ == "__main__":
    main()
