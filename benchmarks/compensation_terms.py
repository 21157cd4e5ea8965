"""Does a second-order term pay for the compensation of skipped keys? Measured on the proxy's real q, k, v (CPU).

    python benchmarks/compensation_terms.py --comfyui PATH [--step 10 --steps 20] [--rows 256] [--json out.json]

The proxy (benchmarks/proxy_model.py, 16,384 tokens, 4 heads of 64) samples up to ``--step`` of ``--steps``
(Euler, cfg 4, dense throughout); the q, k, v of every block's self-attention at that step (the conditional batch
element) are captured and the run stops. On ``--rows`` strided query rows per head, each block-64 layout's output
is compared with exact attention (relative L2 error, mean over the blocks and heads), the skipped key blocks
  * dropped (the methods as published),
  * compensated to first order: size x exp(q.k_mean * scale), value v_mean (what the kernels do),
  * to second order (a Gaussian moment of each block): weight x exp(scale^2 q^T Cov_k q / 2), numerator also
    + scale Cov_vk q (the block's key covariance and value-key cross-covariance, D x D each),
  * to second order with the diagonal of Cov_k alone (one more dot product per block, no cross term).
Layouts: SVG's spatial band and AdaSpa's rows at density 0.25, and Radial's (its floor on this grid).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
import proxy_model  # noqa: E402
from pack import import_pack  # noqa: E402

BLOCK = 64
VARIANTS = ("dropped", "first order", "second order", "second order (diagonal)")


class Captured(Exception):
    """Raised once every sparse block of the step is captured: the sampling run stops there."""


def capture(proxy, nodes, bridge, step: int, steps: int, cfg: float, seed: int, frames: int, size: int):
    """(the call's video grid, {layer: (q, k, v) (H, L, D) float32} of the conditional batch element at ``step``)."""
    method = nodes.RadialMask().settings(decay_factor=1.0, block_size=BLOCK, attention_sink=True, text_dense=True)[0]
    patched = nodes.SparseAttentionPatch().patch(proxy.model, dense_steps=float(step), sparse_end=1.0, dense_layers=1,
                                                 backend="reference", verbose=False, method=method)[0]
    planner = bridge.session_of(patched).planner
    layers = proxy_model.UNET["num_layers"]
    seen, grids = {}, []

    def attend(call):  # dense attention (the run stays exact), the inputs kept
        grids.append(call.grid)
        seen[call.layer] = tuple(t[0].float().clone() for t in (call.q, call.k, call.v))
        if len(seen) == layers - 1:
            raise Captured
        out = torch.nn.functional.scaled_dot_product_attention(call.q, call.k, call.v)
        return (out if call.out is None else call.out.copy_(out)), 1.0

    planner.attend = attend
    try:
        proxy_model.sample(proxy, patched, proxy_model.PROCEDURAL_CLASS, seed, steps=steps, cfg=cfg, frames=frames,
                           size=size)
    except Captured:
        return grids[0], seen
    raise RuntimeError(f"the run ended before step {step} captured every block")


def layouts(grid):
    """name -> (NB, NB) bool block mask, or a callable of the head's block masses for AdaSpa's row-wise top-k."""
    core, svg_layout = import_pack("core"), import_pack("core.svg_layout")
    return {"svg spatial 0.25": svg_layout.svg_block_masks(grid, 0.25, BLOCK, True)[0],
            "radial (floor)": core.radial_block_mask(grid, core.RadialSettings(decay_factor=0.01, block_size=BLOCK)),
            "adaspa rows 0.25": None}


def block_stats(k, v):
    """Per key block: size, mean key, mean value, key covariance, value-key cross-covariance (float64)."""
    H, L, D = k.shape
    nb = L // BLOCK
    kb, vb = (t.double().view(H, nb, BLOCK, D) for t in (k, v))
    k_mean, v_mean = kb.mean(2), vb.mean(2)
    dk, dv = kb - k_mean[:, :, None], vb - v_mean[:, :, None]
    return k_mean, v_mean, dk.transpose(-1, -2) @ dk / BLOCK, dv.transpose(-1, -2) @ dk / BLOCK


def errors(q, k, v, mask_of, rows):
    """{variant: relative L2 error} over ``rows`` of every head, for one layout (block mask (NB, NB), or None:
    per head the row-wise top 25% blocks by exact block mass)."""
    H, L, D = q.shape
    scale = 1.0 / math.sqrt(D)
    nb = L // BLOCK
    qr = q[:, rows].double()
    s = qr @ k.double().transpose(-1, -2) * scale                                  # (H, R, L)
    exact = torch.softmax(s, -1) @ v.double()
    if mask_of is None:
        mass = torch.softmax(s, -1).view(H, len(rows), nb, BLOCK).sum(-1)
        top = mass.topk(nb // 4, dim=-1).indices
        kept = torch.zeros(H, len(rows), nb, dtype=torch.bool).scatter_(-1, top, True)
    else:
        kept = mask_of[rows // BLOCK][None].expand(H, -1, -1)
    k_mean, v_mean, cov_k, cov_vk = block_stats(k, v)
    a = qr * scale                                                                 # (H, R, D)
    first = a @ k_mean.transpose(-1, -2) + math.log(BLOCK)                         # (H, R, NB) log weights
    quad = 0.5 * torch.einsum("hrd,hbde,hre->hrb", a, cov_k, a)
    diag = 0.5 * (a * a) @ cov_k.diagonal(dim1=-2, dim2=-1).transpose(-1, -2)
    cross = torch.einsum("hbde,hre->hrbd", cov_vk, a)                              # (H, R, NB, D)
    token_kept = kept.repeat_interleave(BLOCK, dim=-1)
    s_kept = s.masked_fill(~token_kept, float("-inf"))
    result = {}
    for name in VARIANTS:
        if name == "dropped":
            out = torch.softmax(s_kept, -1) @ v.double()
        else:
            logw = first + (quad if name == "second order" else diag if name.endswith("(diagonal)") else 0.0)
            logw = logw.masked_fill(kept, float("-inf"))
            values = v_mean[:, None] + (cross if name == "second order" else 0.0)        # (H, R?, NB, D)
            m = torch.maximum(s_kept.amax(-1), logw.amax(-1))[..., None]
            p, pw = torch.exp(s_kept - m), torch.exp(logw - m)
            num = p @ v.double() + (pw[..., None] * values.expand(H, len(rows), nb, D)).sum(-2)
            out = num / (p.sum(-1) + pw.sum(-1))[..., None]
        result[name] = float((out - exact).norm() / exact.norm())
    result["recall"] = float((torch.softmax(s, -1) * token_kept).sum(-1).mean())
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--comfyui", default=None)
    parser.add_argument("--weights", default=str(proxy_model.WEIGHTS))
    parser.add_argument("--step", type=int, default=10)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cfg", type=float, default=4.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rows", type=int, default=256, help="strided query rows per head")
    parser.add_argument("--frames", type=int, default=proxy_model.FRAMES)
    parser.add_argument("--size", type=int, default=proxy_model.SIZE)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    proxy_model.use_comfyui(args.comfyui)
    nodes, bridge = import_pack("nodes"), import_pack("nodes.bridge")
    proxy = proxy_model.load(args.weights)
    grid, captured = capture(proxy, nodes, bridge, args.step, args.steps, args.cfg, args.seed, args.frames, args.size)
    L = grid.total_tokens
    rows = torch.arange(args.rows) * L // args.rows + (L // args.rows) // 2
    results = {}
    for name, mask in layouts(grid).items():
        per_layer = [errors(*captured[layer], mask, rows) for layer in sorted(captured)]
        results[name] = {key: sum(r[key] for r in per_layer) / len(per_layer) for key in per_layer[0]}
        results[name]["density"] = 0.25 if mask is None else float(mask.float().mean())
        print(name, results[name], flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(dict(step=args.step, steps=args.steps, cfg=args.cfg, rows=args.rows,
                                                   grid=str(grid), results=results), indent=1))
    print(f"\nproxy {grid}, step {args.step} of {args.steps}, cfg {args.cfg}, {args.rows} rows per head, block {BLOCK}: "
          "relative L2 error of the output against exact attention, mean over blocks 1-7 and heads")
    print(f"{'layout':18s} {'density':>7s} {'recall':>6s} " + " ".join(f"{v:>23s}" for v in VARIANTS))
    for name, r in results.items():
        print(f"{name:18s} {r['density']:7.3f} {r['recall']:6.3f} " + " ".join(f"{r[v]:23.4f}" for v in VARIANTS))


if __name__ == "__main__":
    main()
