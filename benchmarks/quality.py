"""Quality of every sparse attention method on the trained proxy video model, against dense, same seeds (GPU).

    python benchmarks/quality.py --comfyui PATH [--seeds 4] [--steps 20] [--cfg 4] [--densities 0.25 0.12] \
        [--methods radial svg svg2 adaspa] [--compensate off|on|both] \
        [--precision bf16 8-bit|auto|"8-bit + dense calls"] [--json out.json] [--picture out.png]
    python benchmarks/quality.py --comfyui PATH --steps 4 --cfg 1      # few-step runs, as distilled LoRAs sample
    python benchmarks/quality.py --comfyui PATH --methods svg --densities 0.25 --knob 0.2   # no calibration
    python benchmarks/quality.py --comfyui PATH --knobs radial=0.2 svg=0.3 svg2=0.9 adaspa=0.8 \
        --builtin-taus 1.3 1.0 2.0      # each method at its own knob, and ComfyUI's built-in sparse kernel

The proxy (benchmarks/proxy_model.py: ComfyUI's WanModel, 16 frames of 64 x 64 = 16,384 tokens) samples K seeds
through ComfyUI's sampler, once unpatched (dense) and once per method through the pack's own nodes (Sparse
Attention Patch + the method's settings node). Each method's knob is calibrated per target density (bisection on
its mean density over the sparse calls of a run), and every method runs the same schedule (the first 20% of
steps and the first block dense: the papers keep 10-25% of steps and ~3% of layers dense). Per method and
density: achieved density, PSNR / SSIM / relative L2 of the video against the dense video of the same seed,
attention recall per layer (the attention mass kept, exp(LSE over kept keys - dense LSE), at the middle step),
and the sampling time. A picture shows frames of the dense video and of each method, side by side.

The proxy was trained for 20-step sampling and is not step-distilled: 4- or 8-step runs at cfg 1 show how a sparse
step weighs when a run has few steps, not how a distilled LoRA (lightx2v) behaves. The output says so by the figures.

``--builtin-taus`` adds rows for ComfyUI's built-in sparse kernel, comfy_kitchen.sol_attn (comfy-kitchen 0.2.40 or
newer; a row says "not installed / not available" otherwise) at each tau, extra_tokens 256 as its node: it serves the
video self-attention of the same sparse steps and layers through ComfyUI's optimized_attention_override, the other
calls stay on ComfyUI's attention. Where no fused kernel runs (a CPU), kitchen's eager reference does: full precision,
no token_aug, one head at a time (it materialises the scores). It reports no density and no LSE (no recall).

``--compensate both`` runs every method and density twice, with the patch's compensate setting off and on (the
skipped keys' pooled terms), at the knob calibrated without compensation: the two rows compare equal layouts.
``--precision bf16 8-bit`` likewise runs each row in both precisions at the knob calibrated in the first. On a CPU,
``--simulated-8bit fp8`` (with ``--backend reference``) runs the 8-bit precisions through the 8-bit kernels' test
oracle, their simulated quantization (the same per-block Q / K scales, K smoothing, V and P rounding): the quality
of the 8-bit numbers where no GPU is lent, not the kernel's speed.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
import proxy_model  # noqa: E402
import versus  # noqa: E402  (comfy_kitchen's sol_attn, found and reported as in the per-call benchmark)
from pack import import_pack  # noqa: E402

core = import_pack("core")
metrics = import_pack("core.metrics")
eight_bit = import_pack("kernels.eight_bit")
PRECISIONS, EIGHT_BIT_DENSE = eight_bit.PRECISIONS, eight_bit.EIGHT_BIT_DENSE
DENSE_STEPS, DENSE_LAYERS = 0.2, 1
SCHEDULE = core.SparseSchedule(dense_steps=DENSE_STEPS, dense_layers=DENSE_LAYERS)  # what the patch runs below
SOL_HEAD_DIM = 128  # the only head_dim the fused sol_attn takes
NOT_DISTILLED = "the proxy is not step-distilled: few-step figures show how much one sparse step weighs, not a " \
                "distilled LoRA's quality"


@dataclass(frozen=True)
class Method:
    """How to build one method's settings from its density knob, and the knob's range (density rises with it)."""
    knob: str
    low: float
    high: float
    build: object  # (nodes, value) -> the method settings


# Each method's own density knob, everything else at its reference settings, scaled to the proxy where they are
# sizes: Radial at block 64 (the proxy's frames are 1,024 tokens and Radial's narrowest band is one block wide, so
# at block 128 it cannot go below about half density here); SVG2 with its cluster counts scaled from Wan 720p's
# 300 / 1000 for 75,600 tokens to 16,384 (64 / 256), a low minimum key ratio so top-p alone sets the density;
# AdaSpa with its density bounds opened so the recall target alone sets it (its heads' recall pooled, and each
# head's own as the paper).
METHODS = {
    "radial": Method("decay_factor", 0.01, 4.0, lambda nodes, x: nodes.RadialMask().settings(
        decay_factor=x, block_size=64, attention_sink=True, text_dense=True)[0]),
    "svg": Method("sparsity", 0.02, 0.98, lambda nodes, x: nodes.SVGSettingsNode().settings(
        sparsity=x, sample_fraction=0.001, reprofile_every=1, block_size=64, attention_sink=True)[0]),
    "svg2": Method("top_p", 0.05, 0.999, lambda nodes, x: nodes.SVG2KMeansSettings().settings(
        preset="custom", query_clusters=64, key_clusters=256, top_p=x, min_key_ratio=0.02, first_iterations=50,
        later_iterations=2)[0]),
    "adaspa": Method("recall", 0.05, 0.999, lambda nodes, x: nodes.AdaSpaSearch().settings(
        recall=x, search_steps="0.2, 0.6", block_size=64, min_density=0.01, max_density=1.0, text_dense=True)[0]),
    # the paper's allocation: every head reaches the recall of its own mass
    "adaspa-per-head": Method("recall", 0.05, 0.999, lambda nodes, x: nodes.AdaSpaSearch().settings(
        recall=x, search_steps="0.2, 0.6", block_size=64, min_density=0.01, max_density=1.0, text_dense=True,
        per_head_recall=True)[0]),
}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


class RecallProbe:
    """Wraps a patched model's planner: at one step, every sparse call also reports its LSE, and the kept
    attention mass per layer is measured against the dense LSE of the same q, k."""

    def __init__(self, session, step: int):
        self.per_layer: dict[int, list[float]] = {}
        planner, attend = session.planner, session.planner.attend

        def probe(call):
            call.want_lse = call.step == step
            result = attend(call)
            if call.want_lse and call.lse is not None:
                video = call.grid.video_tokens
                dense = metrics.dense_lse(call.q[:, :, :video], call.k)
                kept = metrics.recall_from_lse(call.lse[:, :, :video], dense)
                self.per_layer.setdefault(call.layer, []).append(float(kept.mean()))
            return result

        planner.attend = probe

    def layers(self) -> list[float]:
        return [statistics.mean(v) for _, v in sorted(self.per_layer.items())]


def sample_seeds(proxy, model, seeds, args, after_each=None):
    """(videos, median seconds per video) of ``model`` over the (seed, class) pairs; ``after_each()`` after each."""
    videos, seconds = [], []
    for seed, cls in seeds:
        sync(proxy.class_context.device)
        start = time.perf_counter()
        videos.append(proxy_model.sample(proxy, model, cls, seed, steps=args.steps, cfg=args.cfg,
                                         frames=args.frames, size=args.size))
        sync(proxy.class_context.device)
        seconds.append(time.perf_counter() - start)
        if after_each is not None:
            after_each()
    return videos, statistics.median(seconds)


def run_method(nodes, bridge, proxy, settings, seeds, args, probe_step=None, compensate="off", precision=None):
    """(videos, mean sparse density, seconds per video, recall per layer) of one settings object; ``precision``:
    the patch's (default: the first of --precision)."""
    patched = nodes.SparseAttentionPatch().patch(proxy.model, dense_steps=DENSE_STEPS, sparse_end=1.0,
                                                 dense_layers=DENSE_LAYERS, backend=args.backend, verbose=False,
                                                 method=settings, compensate=compensate,
                                                 precision=precision or args.precision[0])[0]
    session = bridge.session_of(patched)
    probe = RecallProbe(session, probe_step) if probe_step is not None else None
    densities = []
    videos, seconds = sample_seeds(proxy, patched, seeds, args,
                                   after_each=lambda: densities.append(session.stats.sparse_density))
    return videos, statistics.mean(densities), seconds, probe.layers() if probe else []


def calibrate(nodes, bridge, proxy, method: Method, target: float, args, iterations: int = 7):
    """The knob value whose run reaches ``target`` mean density (bisection; ends at the closest value tried)."""
    low, high, best = method.low, method.high, None
    seed = [(args.seed, proxy_model.PROCEDURAL_CLASS)]
    for _ in range(iterations):
        mid = (low + high) / 2
        _, density, _, _ = run_method(nodes, bridge, proxy, method.build(nodes, mid), seed, args)
        if best is None or abs(density - target) < abs(best[1] - target):
            best = (mid, density)
        low, high = (mid, high) if density < target else (low, mid)
    return best


def simulate_8bit(fmt: str) -> None:
    """Make the pack's sessions take this CPU for a device with ``fmt`` units: with the reference backend, their
    8-bit calls then run kernels.quantize_reference (the 8-bit kernels' oracle in the GPU tests)."""
    session = import_pack("core.session")
    support = eight_bit.EightBitSupport(fmt, f"{fmt} as simulated quantization (torch reference)")
    session.eight_bit_support = lambda device: support


def sol_attention(kitchen, q, k, v, heads: int, tau: float) -> torch.Tensor:
    """comfy_kitchen.sol_attn on ComfyUI's (B, L, H * D) tensors. q, k, v are zero-padded from head_dim D to 128 (the
    fused kernel's) with the scale kept at D ** -0.5: zero features change no score, and the output is sliced back.
    Without a fused kernel the eager reference runs, which materialises a call's scores: one head at a time."""
    B, L, HD = q.shape
    D = HD // heads
    q4, k4, v4 = (F.pad(t.reshape(B, L, heads, D), (0, SOL_HEAD_DIM - D)) for t in (q, k, v))

    def call(q, k, v):
        return kitchen.sol_attn(q, k, v, tau=tau, scale=D ** -0.5, token_aug=versus.SOL_EXTRA_TOKENS)

    if kitchen.sol_attn_is_available(q.device):
        out = call(q4, k4, v4)
    else:
        out = torch.cat([torch.cat([call(*(t[b:b + 1, :, h:h + 1] for t in (q4, k4, v4))) for h in range(heads)], 2)
                         for b in range(B)])
    return out[..., :D].reshape(B, L, HD)


def builtin_override(kitchen, tau: float, routed: list):
    """ComfyUI's ``optimized_attention_override`` putting comfy_kitchen.sol_attn on the video self-attention of the
    sparse steps and layers (SCHEDULE, as every method runs); every other call (dense steps, the dense block, the text
    cross-attention) runs ComfyUI's own attention. Appends each call it takes as (step, layer) to ``routed``."""

    def override(func, *args, **kwargs):
        q, k, v = args[:3]
        heads = args[3] if len(args) > 3 else kwargs["heads"]
        options = kwargs.get("transformer_options") or {}
        sigmas, schedule, layer = options.get("sigmas"), options.get("sample_sigmas"), options.get("block_index")
        self_attention = q.ndim == 3 and q.shape == k.shape == v.shape and len(args) <= 4 and \
            kwargs.get("mask") is None
        if not self_attention or sigmas is None or schedule is None or layer is None:
            return func(*args, **kwargs)
        step = core.step_index(float(sigmas.flatten()[0]), schedule)
        if step is None or not SCHEDULE.is_sparse(step, len(schedule) - 1, layer):
            return func(*args, **kwargs)
        routed.append((step, layer))
        return sol_attention(kitchen, q, k, v, heads, tau)

    return override


def run_builtin(proxy, kitchen, tau: float, seeds, args):
    """(videos, seconds per video, (step, layer) of the calls sol_attn served) of the proxy with the built-in kernel."""
    model, routed = proxy.model.clone(), []
    options = model.model_options.setdefault("transformer_options", {})
    options["optimized_attention_override"] = builtin_override(kitchen, tau, routed)
    videos, seconds = sample_seeds(proxy, model, seeds, args)
    if not routed:  # an older ComfyUI: the row would be dense's video under the built-in's name
        raise versus.Unavailable("not available (this ComfyUI passes attention no block_index, so no call can be "
                                 "matched to the sparse layers; ComfyUI 0.33 and newer do)")
    return videos, seconds, routed


def scores(videos, dense_videos) -> dict:
    """PSNR, SSIM and relative L2 of each video against the dense video of the same seed: means and per seed."""
    per_seed = [(metrics.psnr(v, d), metrics.ssim(v, d), metrics.relative_error(v, d))
                for v, d in zip(videos, dense_videos)]
    return dict(psnr=statistics.mean(s[0] for s in per_seed), ssim=statistics.mean(s[1] for s in per_seed),
                rel_l2=statistics.mean(s[2] for s in per_seed), per_seed=per_seed)


def method_knob(text: str):
    """``name=value`` of --knobs: (method, its knob's value)."""
    name, _, value = text.partition("=")
    try:
        if name in METHODS:
            return name, float(value)
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"{text!r}: want METHOD=VALUE with METHOD one of {', '.join(METHODS)}")


def picture(rows, path, frames_every=3):
    """Rows of (label, video (1, 3, F, S, S)): every ``frames_every``-th frame, labelled on the left."""
    from PIL import Image, ImageDraw

    label_w, scale = 150, 2
    strips = []
    for label, video in rows:
        strip = Image.fromarray(proxy_model.frame_strip(video[0], frames_every).numpy())
        strip = strip.resize((strip.width * scale, strip.height * scale), Image.NEAREST)
        canvas = Image.new("RGB", (label_w + strip.width, strip.height), "white")
        canvas.paste(strip, (label_w, 0))
        ImageDraw.Draw(canvas).multiline_text((6, 8), label, fill="black")
        strips.append(canvas)
    out = Image.new("RGB", (strips[0].width, sum(s.height for s in strips)), "white")
    y = 0
    for s in strips:
        out.paste(s, (0, y))
        y += s.height
    out.save(path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--comfyui", default=None)
    parser.add_argument("--weights", default=str(proxy_model.WEIGHTS))
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--densities", nargs="+", type=float, default=[0.25, 0.12])
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cfg", type=float, default=4.0)
    parser.add_argument("--frames", type=int, default=proxy_model.FRAMES)
    parser.add_argument("--size", type=int, default=proxy_model.SIZE)
    parser.add_argument("--calibration", type=int, default=7, help="bisection runs per method and density")
    parser.add_argument("--knob", type=float, default=None,
                        help="the density knob's value to run (no calibration): one method and one density only")
    parser.add_argument("--knobs", nargs="+", type=method_knob, default=None, metavar="METHOD=VALUE",
                        help="each named method at this value of its knob (no calibration, no target density), "
                             "instead of --methods / --densities: e.g. radial=0.2 svg=0.3 svg2=0.9 adaspa=0.8")
    parser.add_argument("--builtin-taus", nargs="*", type=float, default=[],
                        help="rows for ComfyUI's built-in sparse kernel comfy_kitchen.sol_attn at these taus "
                             f"(its node's default: {versus.SOL_DEFAULT_TAU})")
    parser.add_argument("--backend", default="auto", help="auto on a GPU; reference for a (slow) CPU smoke run")
    parser.add_argument("--compensate", choices=("off", "on", "both"), default="off",
                        help="the patch's compensate setting; both: every row without and with it")
    parser.add_argument("--svg2-own-terms", type=int, default=None,
                        help="SVG2's compensation with this many own terms per query cluster and the rest summed "
                             "(kernels/skipped_summary.py) instead of core.svg2.OWN_TERMS")
    parser.add_argument("--precision", nargs="+", choices=list(PRECISIONS), default=["bf16"],
                        help="the Sparse Attention Patch's precision (8-bit: the sparse calls on the 8-bit kernel; "
                             "'8-bit + dense calls': the calls the schedule keeps dense too); several: every row in "
                             "each, at the knob calibrated in the first")
    parser.add_argument("--simulated-8bit", choices=["fp8", "int8"], default=None,
                        help="with --backend reference (a CPU): the 8-bit precisions run the 8-bit kernels' "
                             "simulated-quantization reference in this format (quality only, not speed)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--picture", default=None)
    args = parser.parse_args(argv)
    if args.knob is not None and (len(args.methods) != 1 or len(args.densities) != 1):
        parser.error("--knob sets one method's knob: give one --methods and one --densities (the target it was "
                     "calibrated for)")
    if args.knob is not None and args.knobs:
        parser.error("give --knob (one method and density) or --knobs (methods without a target), not both")
    asked_8bit = [p for p in args.precision if p in ("8-bit", EIGHT_BIT_DENSE)]
    if asked_8bit and args.compensate != "off":
        parser.error(f"--compensate {args.compensate} and --precision {asked_8bit[0]!r} do not combine (compensation "
                     "runs in the bf16 kernel): run them apart")
    if args.simulated_8bit and (args.backend != "reference" or not asked_8bit):
        parser.error("--simulated-8bit runs the 8-bit precisions on the torch reference: give --backend reference "
                     "and --precision 8-bit (or '8-bit + dense calls')")

    proxy_model.use_comfyui(args.comfyui)
    nodes, bridge = import_pack("nodes"), import_pack("nodes.bridge")
    if args.svg2_own_terms is not None:
        import_pack("core.svg2").OWN_TERMS = args.svg2_own_terms
    if args.simulated_8bit:
        simulate_8bit(args.simulated_8bit)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    proxy = proxy_model.load(args.weights, device=device, dtype=proxy_model.inference_dtype(device))
    classes = [proxy_model.PROCEDURAL_CLASS] + list(range(2, len(proxy.class_names), 7))
    seeds = [(args.seed + i, classes[i % len(classes)]) for i in range(args.seeds)]

    dense_videos, dense_time = sample_seeds(proxy, proxy.model, seeds, args)
    summary = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                   torch=torch.__version__, steps=args.steps, cfg=args.cfg, seeds=seeds, dense_steps=DENSE_STEPS,
                   dense_layers=DENSE_LAYERS, dense_seconds=dense_time, date=time.strftime("%Y-%m-%d"),
                   step_distilled=False, note=NOT_DISTILLED, precision=args.precision,
                   simulated_8bit=args.simulated_8bit, comfy_kitchen=versus.kitchen_version())
    probe_step = args.steps // 2
    modes = ("off", "on") if args.compensate == "both" else (args.compensate,)
    summary["compensate"] = args.compensate
    results, rows = [], [("dense", dense_videos[0])]

    def record(row, video=None):
        results.append(row)
        if video is not None:
            rows.append((row["label"].replace(", ", "\n") + "\n"
                         + (f"density {row['density']:.3f}\n" if row["density"] is not None else "")
                         + f"PSNR {row['psnr']:.1f}", video))
        figures = f"PSNR {row['psnr']:.2f}  SSIM {row['ssim']:.3f}" if row["status"] == "ok" else row["status"]
        print(f"{row['label']}: {figures}", flush=True)
        if args.json:  # after every row: a run cut short keeps what it measured
            Path(args.json).write_text(json.dumps(dict(summary, results=results), indent=1))

    for tau in args.builtin_taus:
        row = dict(method="builtin", kernel_name="comfy_kitchen.sol_attn", compensate=None, target_density=None,
                   knob=dict(tau=tau, extra_tokens=versus.SOL_EXTRA_TOKENS), calibrated=False, density=None,
                   recall=None, recall_per_layer=[], label=f"sol_attn tau {tau:g}")
        try:
            kitchen = versus.sol_attn_kitchen()
            videos, seconds, routed = run_builtin(proxy, kitchen, tau, seeds, args)
        except versus.Unavailable as why:
            record(dict(row, status=str(why)))
            continue
        except Exception as why:  # one row's failure (a kernel's input rules) must not lose the others' figures
            record(dict(row, status=f"failed: {type(why).__name__}: {str(why)[:200]}"))
            continue
        kernel = "fused" if kitchen.sol_attn_is_available(device) else \
            "eager reference (full precision, token_aug ignored)"
        record(dict(row, status="ok", kernel=kernel, routed_calls=len(routed) // len(seeds), **scores(videos,
                    dense_videos), seconds=seconds, speedup=dense_time / seconds), videos[0])

    if args.knobs:
        jobs = [(name, None, knob) for name, knob in args.knobs]
    else:
        jobs = [(name, target, args.knob) for name in args.methods for target in args.densities]
    for name, target, knob in jobs:
        method = METHODS[name]
        calibrated = knob is None
        if calibrated:
            knob = calibrate(nodes, bridge, proxy, method, target, args, args.calibration)[0]
        for mode, precision in itertools.product(modes, args.precision):
            videos, density, seconds, recall = run_method(nodes, bridge, proxy, method.build(nodes, knob), seeds,
                                                          args, probe_step=probe_step, compensate=mode,
                                                          precision=precision)
            label = f"{name} {method.knob} {knob:.3g}, compensate {mode}" + \
                (f", {precision}" if args.precision != ["bf16"] else "") + \
                (f", target {target:.2f}" if target is not None else "")
            record(dict(method=name, compensate=mode, precision=precision, target_density=target,
                        knob={method.knob: knob},
                        calibrated=calibrated, density=density, status="ok", label=label,
                        **scores(videos, dense_videos), recall_per_layer=recall,
                        recall=statistics.mean(recall) if recall else None, seconds=seconds,
                        speedup=dense_time / seconds), videos[0] if target in (None, args.densities[0]) else None)

    summary["results"] = results
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))
    if args.picture:
        picture(rows, args.picture)
    print(f"\nproxy quality: {len(seeds)} seeds, {args.steps} steps, cfg {args.cfg}, dense first {DENSE_STEPS:.0%} "
          f"of steps (at least one) and {DENSE_LAYERS} block; dense {dense_time:.2f} s/video on {summary['device']}"
          + ("" if all(r["calibrated"] for r in results if r["method"] != "builtin") else
             "; knobs given, not calibrated"))
    print(f"note: {NOT_DISTILLED}")
    if args.simulated_8bit:
        print(f"note: the 8-bit rows are {args.simulated_8bit} as simulated quantization on the torch reference (the "
              "8-bit kernels' test oracle): their quality, not the kernel's speed")
    if any(r.get("kernel", "").startswith("eager") for r in results):
        print(f"note: sol_attn ran as comfy-kitchen {summary['comfy_kitchen']}'s eager reference (no fused kernel on "
              "this device): full precision, token_aug ignored; its s/video is not the fused kernel's")
    print(f"{'row':44s} {'density':>7s} {'PSNR':>6s} {'SSIM':>6s} {'relL2':>6s} {'recall':>6s} {'s/video':>7s} "
          f"{'speed':>6s}")
    for r in results:
        if r["status"] != "ok":
            print(f"{r['label']:44s} {r['status']}")
            continue
        density = f"{r['density']:7.3f}" if r["density"] is not None else f"{'-':>7s}"
        recall = f"{r['recall']:6.3f}" if r["recall"] is not None else f"{'-':>6s}"
        print(f"{r['label']:44s} {density} {r['psnr']:6.2f} {r['ssim']:6.3f} {r['rel_l2']:6.3f} {recall} "
              f"{r['seconds']:7.2f} {r['speedup']:5.2f}x")


if __name__ == "__main__":
    main()
