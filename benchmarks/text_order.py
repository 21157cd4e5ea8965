"""What HunyuanVideo's text in front of the video (ComfyUI 0.33 and later) costs a sparse call (GPU).

Since ComfyUI 0.33 HunyuanVideo puts its text tokens in front of the video; the planners' layouts put them behind
it. The dispatcher moves them behind (copies of q, k and v) and the output back, a few heads at a time
(core.dispatcher.STAGE_CHUNK_BYTES per copy). This times one Radial call (HunyuanVideo 720p reference settings)
at the HunyuanVideo 720p shape with the text behind the video (no copies) and in front of it at several chunk
sizes, with cuDNN SDPA dense in the same run, and the peak memory of each above its inputs. It checks that both
orders give the same output per token.

    python benchmarks/text_order.py [--chunks-mib 64 256 1024 0] [--json out.json] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from bench_timing import bench_timer  # noqa: E402
from pack import import_pack  # noqa: E402

MIB = 1 << 20
SHAPES = {"hunyuan-720p": dict(heads=24, frames=33, height=45, width=80, text=256),
          "smoke": dict(heads=2, frames=3, height=8, width=8, text=20)}


def sdpa(q, k, v, heads, mask=None, skip_reshape=True, **kwargs):
    """ComfyUI's attention for this layout: (B, H, L, D) in, (B, L, H*D) out."""
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2).reshape(out.shape[0], out.shape[2], -1)


def peak_bytes(fn, device) -> int | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del out
    return peak


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunks-mib", type=int, nargs="+", default=[64, 256, 1024, 0],
                        help="STAGE_CHUNK_BYTES to time, in MiB (0: the whole call at once)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--smoke", action="store_true", help="a tiny shape on the CPU (the reference backend)")
    args = parser.parse_args(argv)
    core, dispatcher = import_pack("core"), import_pack("core.dispatcher")
    smoke = args.smoke or not torch.cuda.is_available()
    device = torch.device("cpu" if smoke else "cuda")
    shape = SHAPES["smoke" if smoke else "hunyuan-720p"]
    grid = core.VideoGrid(shape["frames"], shape["height"], shape["width"], text_tokens=shape["text"])
    H, L, T = shape["heads"], grid.total_tokens, grid.text_tokens
    dtype = torch.float32 if smoke else torch.bfloat16
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(1, H, L, 128, device=device, dtype=dtype, generator=gen) for _ in range(3))
    text_first = [torch.cat((t[:, :, -T:], t[:, :, :-T]), dim=2) for t in (q, k, v)]  # the same tokens, text first
    settings = core.RadialSettings(decay_factor=0.95, block_size=128, attention_sink=False, text_dense=True)
    session = core.SparseAttentionSession(settings, core.SparseSchedule(dense_steps=0, dense_layers=0),
                                          backend="reference" if smoke else "auto")
    override = core.attention_override(session)
    sigmas = torch.linspace(1.0, 0.0, 31)

    def call(tensors, lead):
        ctx = session.forward_context(grid, float(sigmas[10]), sigmas, leading_tokens=lead)
        return override(sdpa, *tensors, H, skip_reshape=True, transformer_options={core.CONTEXT_KEY: ctx})

    behind = call((q, k, v), 0)
    front = call(text_first, T)
    moved = torch.cat((behind[:, -T:], behind[:, :-T]), dim=1)
    max_diff = float((front.float() - moved.float()).abs().max())
    assert max_diff <= 1e-4 * float(moved.float().abs().max()), f"text in front and behind differ by {max_diff}"
    timer = bench_timer(smoke)
    rows = [dict(case="cuDNN SDPA dense", ms=timer(lambda: sdpa(q, k, v, H)),
                 peak_mib=peak_bytes(lambda: sdpa(q, k, v, H), device)),
            dict(case="Radial, text behind the video", ms=timer(lambda: call((q, k, v), 0)),
                 peak_mib=peak_bytes(lambda: call((q, k, v), 0), device))]
    default = dispatcher.STAGE_CHUNK_BYTES
    try:
        for mib in args.chunks_mib:
            dispatcher.STAGE_CHUNK_BYTES = (mib * MIB) or (1 << 62)
            label = "whole call" if mib == 0 else f"{mib} MiB chunks" + (" (default)" if mib * MIB == default else "")
            rows.append(dict(case=f"Radial, text in front, {label}", ms=timer(lambda: call(text_first, T)),
                             peak_mib=peak_bytes(lambda: call(text_first, T), device)))
    finally:
        dispatcher.STAGE_CHUNK_BYTES = default
    for r in rows:
        r["peak_mib"] = None if r["peak_mib"] is None else r["peak_mib"] / MIB
    base = rows[1]["ms"]
    name = "cpu (smoke)" if smoke else torch.cuda.get_device_name()
    record = dict(device=name, torch=torch.__version__, date=time.strftime("%Y-%m-%d"), tokens=L, text=T, heads=H,
                  density=session.stats.sparse_density, max_abs_diff_front_vs_behind=max_diff, rows=rows)
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=1))
    print(f"{name} | torch {torch.__version__} | {record['date']} | L={L} ({T} text) H={H} D=128, "
          f"Radial density {record['density']:.3f}, front vs behind max |diff| {max_diff:.2g}")
    print(f"{'case':<48}{'ms':>9}{'vs behind':>11}{'peak MiB':>10}")
    for r in rows:
        peak = "n/a" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
        print(f"{r['case']:<48}{r['ms']:>9.2f}{r['ms'] / base:>10.3f}x{peak:>10}")


if __name__ == "__main__":
    main()
