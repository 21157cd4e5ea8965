#!/usr/bin/env bash
# Every GPU check and benchmark of the pack in one go; logs and JSON go to OUT_DIR.
#   benchmarks/gpu_suite.sh OUT_DIR [tests] [sweep] [kernels] [cluster] [svg] [svg2] [adaspa] [quality] [demo] [e2e]
#                                   [textorder] [memory] [breakeven] [sanitize] [comfy] [versus] [checkcost] [fewstep]
#                                   [compensation] [int8] [neverslower]
#   (default: all)
# COMFYUI_PATH points the end-to-end benchmarks and the ComfyUI tests at a ComfyUI source tree. versus compares with
# comfy-kitchen's kernels (int8_attention, sol_attn: comfy-kitchen 0.2.40 or newer) and SageAttention where installed.
set -uo pipefail
out=${1:?usage: gpu_suite.sh OUT_DIR [steps...]}; shift
steps=${*:-tests sweep kernels cluster svg svg2 adaspa quality demo e2e textorder memory breakeven sanitize comfy versus checkcost fewstep compensation int8 neverslower}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
status=0
want() { [[ " $steps " == *" $1 "* ]]; }
run() { local name=$1; shift; echo "== $name: $*"; "$@" 2>&1 | tee "$out/$name.log"; local rc=${PIPESTATUS[0]}; [ "$rc" = 0 ] || { echo "== $name FAILED ($rc)"; status=1; }; }

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$out/device.log"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/device.log"
want tests && run gpu_tests python3 -m pytest tests -m gpu -q -p no:cacheprovider
want sweep && run sweep python3 benchmarks/kernels.py --shapes wan14b-720p --densities 1.0 0.25 --layouts random --configs --json "$out/sweep.json"
want kernels && run kernels python3 benchmarks/kernels.py --json "$out/kernels.json"
want cluster && run cluster python3 benchmarks/cluster_attention.py --configs --json "$out/cluster.json"
want svg && run svg python3 benchmarks/svg_overhead.py --json "$out/svg_overhead.json"
want svg2 && run svg2 python3 benchmarks/svg2_stages.py --profile "$out/svg2_profile" --json "$out/svg2_stages.json"
want adaspa && run adaspa python3 benchmarks/adaspa_overhead.py --json "$out/adaspa_overhead.json"
want quality && run quality python3 benchmarks/quality.py --json "$out/quality.json" --picture "$out/quality.png"
want demo && run demo python3 benchmarks/demo.py --gpu
want e2e && run e2e python3 benchmarks/e2e.py --json "$out/e2e.json"
want textorder && run textorder python3 benchmarks/text_order.py --json "$out/text_order.json"
want memory && run memory python3 benchmarks/memory.py --json "$out/memory.json"
# A short call, where the budget's floor (core.memory.TRANSIENT_FLOOR) applies (SVG was over its bound here on
# 2026-12-05: RESULTS.md).
want memory && run memory_short python3 benchmarks/memory.py --shape wan1.3b-480p --json "$out/memory_short.json"
want breakeven && run breakeven python3 benchmarks/break_even.py --shapes wan1.3b-480p wan14b-720p hunyuan-720p --json "$out/break_even.json"
want sanitize && run sanitize bash benchmarks/sanitize.sh "$out/sanitize_full.log"
want int8 && run int8_kernels python3 benchmarks/int8_kernels.py --configs --json "$out/int8_kernels.json"
want comfy && run comfy_tests python3 -m pytest -q -p no:cacheprovider -m comfyui
want versus && run versus python3 benchmarks/versus.py --json "$out/versus.json"
want checkcost && run check_cost python3 benchmarks/check_cost.py --config 14b-720p --json "$out/check_cost.json"
want fewstep && run quality_4step python3 benchmarks/quality.py --steps 4 --cfg 1 --json "$out/quality_4step.json" --picture "$out/quality_4step.png"
want fewstep && run quality_8step python3 benchmarks/quality.py --steps 8 --cfg 1 --json "$out/quality_8step.json" --picture "$out/quality_8step.png"
# Compensation of skipped keys (issue 17): its cost at the Wan 14B 720p shape, and the proxy's quality without and with
# it at both sampling regimes (20 steps cfg 4; 4 steps cfg 1, as few-step distilled runs).
want compensation && run compensation_cost python3 benchmarks/compensation_cost.py --anatomy --json "$out/compensation_cost.json"
want compensation && run summary_cost python3 benchmarks/summary_cost.py --own-terms 16 64 --json "$out/summary_cost.json"
want compensation && run versus_compensated python3 benchmarks/versus.py --sol-taus --ours-only --compensate both \
    --json "$out/versus_compensated.json"
want compensation && run quality_compensated python3 benchmarks/quality.py --compensate both --densities 0.40 0.25 0.12 \
    --steps 20 --cfg 4 --json "$out/quality_compensated.json" --picture "$out/quality_compensated.png"
want compensation && run quality_compensated_4step python3 benchmarks/quality.py --compensate both \
    --densities 0.40 0.25 0.12 --steps 4 --cfg 1 --json "$out/quality_compensated_4step.json"
# SVG2 with its compensation summarised beyond 16 own terms (kernels/skipped_summary.py; not yet its default).
want compensation && run quality_summarised python3 benchmarks/quality.py --methods svg2 --densities 0.25 --knob 0.487 \
    --seeds 3 --steps 20 --cfg 4 --compensate both --svg2-own-terms 16 --json "$out/quality_summarised.json"
want compensation && run quality_summarised_4step python3 benchmarks/quality.py --methods svg2 --densities 0.25 \
    --knob 0.48 --seeds 3 --steps 4 --cfg 1 --compensate both --svg2-own-terms 16 \
    --json "$out/quality_summarised_4step.json"
want neverslower && run never_slower python3 benchmarks/never_slower.py --json "$out/never_slower.json"
exit $status
