"""Train the proxy video model (benchmarks/proxy_model.py) with rectified flow, on one GPU, in a fixed time.

    python benchmarks/proxy_data.py <comfyui_workflow_templates_media_video-*.whl> --out clips.pt
    python benchmarks/train_proxy.py --data clips.pt --out benchmarks/proxy/wan_proxy.safetensors \
        --comfyui PATH --minutes 7.5 --report-dir OUT

Recipe: ComfyUI's WanModel (proxy_model.UNET) trained to predict the flow velocity noise - x0 at
x_sigma = (1 - sigma) x0 + sigma noise, timestep sigma * 1000 (ComfyUI's flow parameterisation, so its samplers
run the result), sigma drawn logit-normal then shifted like the sampler's schedule. Batches mix real clips
(3/4) and procedural scenes (1/4). The class (training clip, or procedural) conditions through cross-attention
and is dropped 10% of the time (classifier-free guidance). Resolution curriculum: the first part of the time at
32 x 32 (4,096 tokens, large batches), then 64 x 64 (16,384 tokens). AdamW, warm-up then cosine decay over the
time budget, bf16 autocast, EMA of the weights (what is saved). Writes the weights, a loss-curve picture, sample
frames and a JSON log.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import proxy_data  # noqa: E402
import proxy_model  # noqa: E402


def sigmas_like(n, generator, device):
    """Logit-normal times, shifted as the sampler's schedule shifts them (more steps at high noise)."""
    u = torch.sigmoid(torch.randn(n, generator=generator, device=device))
    s = proxy_model.SHIFT
    return s * u / (1 + (s - 1) * u)


def flow_loss(wan, context_table, video, classes, generator, drop: float):
    n = video.shape[0]
    sigma = sigmas_like(n, generator, video.device)
    noise = torch.randn(video.shape, generator=generator, device=video.device)
    s = sigma.view(-1, 1, 1, 1, 1)
    x = (1 - s) * video + s * noise
    keep = torch.rand(n, generator=generator, device=video.device) >= drop
    context = context_table[torch.where(keep, classes, torch.zeros_like(classes))]
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=video.is_cuda):
        velocity = wan(x, sigma * 1000, context)
    return F.mse_loss(velocity.float(), noise - video)


def curve_points(log, smooth=0.98):
    """(step, smoothed train loss, held-out loss or None) from a training log."""
    points, value = [], None
    for e in log:
        value = e["loss"] if value is None else smooth * value + (1 - smooth) * e["loss"]
        points.append((e["step"], value, e["holdout"]))
    return points


def draw_curve(points, path, title):
    """A small line chart of (step, train loss, holdout loss or None) with PIL only."""
    from PIL import Image, ImageDraw

    w, h, pad = 720, 360, 48
    image = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(image)
    steps = [p[0] for p in points]
    values = [v for p in points for v in p[1:] if v is not None]
    lo, hi = min(values), max(values)
    span = max(hi - lo, 1e-6)

    def xy(step, value):
        return (pad + (w - 2 * pad) * step / max(steps[-1], 1), h - pad - (h - 2 * pad) * (value - lo) / span)

    draw.rectangle([pad, pad, w - pad, h - pad], outline="black")
    for series, colour in ((1, "royalblue"), (2, "darkorange")):
        line = [xy(p[0], p[series]) for p in points if p[series] is not None]
        if len(line) > 1:
            draw.line(line, fill=colour, width=2)
    draw.text((pad, 12), title, fill="black")
    draw.text((pad, h - pad + 8), f"step 0 .. {steps[-1]}", fill="black")
    draw.text((w - pad - 230, 12), "blue: train (EMA of batches)  orange: held-out clips", fill="black")
    draw.text((4, pad), f"{hi:.3f}", fill="black")
    draw.text((4, h - pad - 10), f"{lo:.3f}", fill="black")
    image.save(path)


def save_samples(proxy, path, classes, seed=0, steps=20, cfg=4.0):
    """Rows: one sample per class, every 3rd frame."""
    from PIL import Image

    rows = []
    for i, cls in enumerate(classes):
        video = proxy_model.sample(proxy, proxy.model, cls, seed + i, steps=steps, cfg=cfg)[0]
        rows.append(proxy_model.frame_strip(video))
    grid = torch.cat(rows, dim=0).cpu().numpy()
    Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST).save(path)


@torch.no_grad()
def holdout_loss(wan, context_table, holdout, samples, seed=1234):
    """Flow loss on windows of the held-out clips: the same windows, noise and sigmas every time."""
    g = torch.Generator(device=holdout.device).manual_seed(seed)
    losses = []
    for first in range(0, samples, 8):
        n = min(8, samples - first)
        video, _ = holdout.batch(n, g)
        classes = torch.zeros(n, dtype=torch.long, device=video.device)  # unseen clips: the unconditional context
        losses.append(float(flow_loss(wan, context_table, video, classes, g, drop=0.0)))
    return sum(losses) / len(losses)


def init_weights(wan):
    """ComfyUI leaves weights uninitialised (they come from checkpoints): Xavier matrices, unit norms, zero biases,
    a zero output head (the first prediction is 0: a stable start), small modulation tables."""
    for name, p in wan.named_parameters():
        if p.ndim > 1:
            torch.nn.init.xavier_uniform_(p.view(p.shape[0], -1))
        elif "norm" in name and name.endswith("weight"):
            torch.nn.init.ones_(p)
        else:
            torch.nn.init.zeros_(p)
    with torch.no_grad():
        wan.head.head.weight.zero_()
        wan.head.modulation.normal_(0, wan.dim ** -0.5)
        for block in wan.blocks:
            block.modulation.normal_(0, wan.dim ** -0.5)


def train(args):
    proxy_model.use_comfyui(args.comfyui)
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    data = torch.load(args.data)
    real = proxy_data.RealClips(data, device, "train")
    holdout = proxy_data.RealClips(data, device, "holdout")
    class_names = ["<unconditional>", "<procedural>"] + real.names
    g = torch.Generator(device=device).manual_seed(args.seed)
    torch.manual_seed(args.seed)

    base = proxy_model.build(dtype=torch.float32, device=device)
    wan = base.diffusion_model
    text_len, text_dim = proxy_model.UNET["text_len"], proxy_model.UNET["text_dim"]
    if args.resume:  # continue from saved (EMA) weights with a fresh optimiser
        resumed = proxy_model.load(args.resume, device=device)
        if resumed.class_names != class_names:
            raise ValueError(f"{args.resume} was trained on other classes than {args.data}")
        wan.load_state_dict(resumed.model.model.diffusion_model.state_dict())
        context = torch.nn.Parameter(resumed.class_context.float().clone())
        del resumed
        previous = json.loads(Path(args.history).read_text()) if args.history else None
        if previous is None or "phases" not in previous["info"]:
            raise ValueError("--resume needs --history: the train_log.json of the run that wrote those weights")
        previous = dict(phases=previous["info"]["phases"], steps=previous["info"]["steps"], log=previous["log"])
    else:
        init_weights(wan)
        context = torch.nn.Parameter(torch.randn(len(class_names), text_len, text_dim, device=device) * 0.5)
        previous = dict(phases=[], steps=0, log=[])
    params = list(wan.parameters()) + [context]
    print(f"proxy: {sum(p.numel() for p in params) / 1e6:.2f} M parameters, {len(class_names)} classes", flush=True)

    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.99), weight_decay=0.01)
    ema_wan, ema_context = copy.deepcopy(wan).requires_grad_(False), context.detach().clone()
    budget = args.minutes * 60
    start = time.time()
    log, smooth, step = [], None, 0
    next_eval = 0.0
    while (elapsed := time.time() - start) < budget:
        progress = elapsed / budget
        low_res = progress < args.low_res_fraction
        batch = args.batch_low if low_res else args.batch_high
        n_real = round(batch * args.real_fraction)
        video_r, clip = real.batch(n_real, g)
        video_p = proxy_data.procedural(batch - n_real, g, device)
        video = torch.cat([video_r, video_p])
        classes = torch.cat([clip + 2, torch.full((batch - n_real,), proxy_model.PROCEDURAL_CLASS, device=device)])
        if low_res:
            video = F.avg_pool3d(video, (1, 2, 2))
        lr = args.lr * min(1.0, (step + 1) / args.warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
        for group in opt.param_groups:
            group["lr"] = lr
        loss = flow_loss(wan, context, video, classes, g, drop=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema_wan.parameters(), wan.parameters()):
                e.lerp_(p, 1 - decay)
            ema_context.lerp_(context, 1 - decay)
        value = float(loss.detach())
        smooth = value if smooth is None else 0.98 * smooth + 0.02 * value  # for the progress lines only
        step += 1
        held = None
        if elapsed >= next_eval:
            held = holdout_loss(ema_wan, ema_context, holdout, args.holdout_samples)
            next_eval += budget / 20
            print(f"step {step:5d}  {elapsed:6.0f}s  {'32px' if low_res else '64px'} batch {batch}  lr {lr:.2e}  "
                  f"loss {smooth:.4f}  held-out {held:.4f}", flush=True)
        log.append(dict(step=step, seconds=elapsed, loss=value, lr=lr, res=32 if low_res else 64, holdout=held))
    final_held = holdout_loss(ema_wan, ema_context, holdout, args.holdout_samples)
    log.append(dict(step=step, seconds=time.time() - start, loss=value, lr=lr, res=64, holdout=final_held))
    phase = dict(steps=step, minutes=args.minutes, lr=args.lr, low_res_fraction=args.low_res_fraction,
                 batch_low=args.batch_low, batch_high=args.batch_high)
    phases, log = previous["phases"] + [phase], previous["log"] + [dict(e, step=e["step"] + previous["steps"])
                                                                   for e in log]
    info = dict(steps=sum(p["steps"] for p in phases), minutes=sum(p["minutes"] for p in phases), phases=phases,
                final_holdout_loss=final_held, ema=args.ema, seed=args.seed, holdout_clips=holdout.names,
                device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu")
    print(json.dumps(info), flush=True)
    proxy_model.save(args.out, ema_wan, ema_context, class_names, info)
    report = Path(args.report_dir)
    report.mkdir(parents=True, exist_ok=True)
    (report / "train_log.json").write_text(json.dumps(dict(info=info, log=log)))
    draw_curve(curve_points(log), report / "loss_curve.png",
               f"proxy training: {info['steps']} steps in {info['minutes']:g} min ({len(phases)} phase(s))")
    proxy = proxy_model.load(args.out, device=device)
    save_samples(proxy, report / "samples.png", [proxy_model.PROCEDURAL_CLASS, 2, 2 + len(real.names) // 2,
                                                  len(class_names) - 1], steps=args.sample_steps)
    print(f"saved {args.out} ({Path(args.out).stat().st_size / 2**20:.1f} MiB) and {report}/", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="the clips file of proxy_data.py")
    parser.add_argument("--out", default=str(proxy_model.WEIGHTS))
    parser.add_argument("--report-dir", default="benchmarks/proxy")
    parser.add_argument("--comfyui", default=None, help="ComfyUI source folder (else $COMFYUI_PATH, ~/comfy/ComfyUI)")
    parser.add_argument("--minutes", type=float, default=15.0)
    parser.add_argument("--batch-low", type=int, default=32)
    parser.add_argument("--batch-high", type=int, default=8)
    parser.add_argument("--low-res-fraction", type=float, default=0.45)
    parser.add_argument("--real-fraction", type=float, default=0.75)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--ema", type=float, default=0.998)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", default=None, help="continue training from these proxy weights")
    parser.add_argument("--history", default=None, help="with --resume: the train_log.json of that run")
    parser.add_argument("--device", default="cuda", help="cuda; cpu only for a smoke test of the script")
    parser.add_argument("--holdout-samples", type=int, default=32, help="held-out windows per evaluation")
    parser.add_argument("--sample-steps", type=int, default=20, help="sampler steps of the sample picture")
    train(parser.parse_args(argv))


if __name__ == "__main__":
    main()
