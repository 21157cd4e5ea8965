"""Which compensation of skipped keys pays, per call? Measured on the proxy's real q, k, v (CPU).

    python benchmarks/compensation_terms.py --comfyui PATH [--step 10 --steps 20 --cfg 4] [--rows 256]
        [--apart 16 64] [--json F]

The proxy (benchmarks/proxy_model.py, 16,384 tokens, 4 heads of 64) samples up to ``--step`` of ``--steps``
(Euler, dense throughout); the q, k, v of every block's self-attention at that step (the conditional batch
element) are captured and the run stops. On ``--rows`` strided query rows per head, each layout's output is
compared with exact attention (relative L2 error, mean over the blocks and heads), the skipped key groups (key
blocks of 64, or SVG2's key clusters)
  * dropped (the methods as published),
  * compensated to first order: one virtual key per skipped group, size x exp(q.k_mean * scale), value v_mean
    (what the kernels do: G terms a row),
  * per list row: the skipped groups' first-order terms taken at the mean query of the row's query block or
    cluster and summed into one virtual key (weights w: key k_w and value v_w their w-means), whose score is
    moved to the row's own query to first order (a.k_w + A - a_mean.k_w): one term a row, whatever G;
  * per list row (value moved): the same, its value moved to the row's query to first order as well (the
    derivative of the w-weighted mean value: one D x D matrix per list row, one matrix-vector product a row);
  * per list row (constant): the same term without the move (score A for every row of the list row);
  * top M + rest (M from --apart, default 16 and 64): that many skipped groups, the heaviest at the list row's mean
    query, get their own first-order terms, the others one term per list row as above (plain, value moved, and
    value moved with the slope C summed over the R heaviest of the summed groups alone: --slope-groups);
  * to second order (a Gaussian moment of each block): weight x exp(scale^2 q^T Cov_k q / 2), numerator also
    + scale Cov_vk q (the block's key covariance and value-key cross-covariance, D x D each), block layouts only;
  * to second order with the diagonal of Cov_k alone (one more dot product per block, no cross term);
  * centre exact: every skipped key summed token by token at the list row's mean query and moved to the row to first
    order (score by k_w; value not moved / moved by the exact token-level derivative / by the skipped groups' own
    mean v k^T weighted by their exact or first-order mass there); per list row (value moved, moments): the
    first-order sum moved by the groups' moments; block summary (pack): what the kernels run for block layouts
    (kernels/block_summary.py, block_sparse_attention(..., summarise=True)) on the whole call, its rows sampled.
Layouts at density about 0.25: SVG's spatial band, AdaSpa's (each query block's top key blocks by exact mass),
SVG2's clusters (quality.py's proxy cluster counts and its 0.25 top-p), and Radial's (its floor on this grid).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
import proxy_model  # noqa: E402
from pack import import_pack  # noqa: E402

BLOCK = 64
VARIANTS = ("dropped", "first order", "per list row", "per list row (value moved)", "per list row (constant)",
            "second order", "second order (diagonal)", "centre exact", "centre exact (value moved)",
            "centre exact (constant)", "centre exact (value moved, moments)",
            "centre exact (value moved, moments at first order)", "per list row (value moved, moments)",
            "block summary (pack)")
APART = (16, 64)  # --apart: the M of the "top M + rest" variants
SLOPE_GROUPS = (16, 32)  # --slope-groups: the R of their "value moved, R" variants
SVG2_CLUSTERS, SVG2_TOP_P, KMEANS_ITERATIONS = (64, 256), 0.487, 20  # quality.py's proxy scaling, its 0.25 knob


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


@dataclass
class Layout:
    """What one layout keeps for the sampled rows. kept (H, R, G) bool: row keeps key group g; key_group (H, L):
    each key's group; row_list (H, R): each row's list row (its query block or cluster), whose mean query is
    list_means (H, NR, D); blocks: the groups are key blocks of BLOCK (the second-order terms need that), whose
    (H, NB, NB) mask is block_mask."""

    kept: torch.Tensor
    key_group: torch.Tensor
    row_list: torch.Tensor
    list_means: torch.Tensor
    blocks: bool
    block_mask: torch.Tensor | None = None


def block_layout(mask, q, rows):
    """A fixed-block layout: (NB, NB) bool for every head, or (H, NB, NB) one per head."""
    H, L, D = q.shape
    nb = L // BLOCK
    key_group = (torch.arange(L) // BLOCK).expand(H, L)
    means = q.double().view(H, nb, BLOCK, D).mean(2)
    kept = mask[..., rows // BLOCK, :].expand(H, -1, -1)
    return Layout(kept, key_group, (rows // BLOCK).expand(H, -1), means, True, mask.expand(H, nb, nb))


def adaspa_layout(q, k, rows, density=0.25):
    """AdaSpa's layout at ``density``: per head and query block, the key blocks of the most exact attention mass
    (the query block's rows' mean), found here on every block of the call."""
    H, L, D = q.shape
    nb = L // BLOCK
    mass = torch.empty(H, nb, nb, dtype=torch.float64)
    for b in range(nb):  # a query block at a time: (H, BLOCK, L) scores
        p = torch.softmax(q[:, b * BLOCK:(b + 1) * BLOCK].double() @ k.double().transpose(-1, -2) / math.sqrt(D), -1)
        mass[:, b] = p.view(H, BLOCK, nb, BLOCK).sum(-1).mean(1)
    top = mass.topk(round(density * nb), dim=-1).indices
    return block_layout(torch.zeros(H, nb, nb, dtype=torch.bool).scatter_(-1, top, True), q, rows)


def svg2_layout(q, k, rows):
    """SVG2's cluster layout: k-means of q and k, key clusters kept by top-p of the centroid estimate; a query
    cluster's mean query is its centroid."""
    K = import_pack("kernels")
    cq, ck = SVG2_CLUSTERS
    qc = K.batched_kmeans(q[None], cq, KMEANS_ITERATIONS, backend="reference")
    kc = K.batched_kmeans(k[None], ck, KMEANS_ITERATIONS, backend="reference")
    sel = K.select_key_clusters(qc.centroids, kc.centroids, kc.sizes, top_p=SVG2_TOP_P, backend="reference",
                                with_kept=True)
    row_list = qc.labels[0][:, rows].long()
    kept = torch.gather(sel.kept[0], 1, row_list[..., None].expand(-1, -1, ck))
    return Layout(kept, kc.labels[0].long(), row_list, qc.centroids[0].double(), False)


def layouts(grid, q, k, rows):
    """name -> Layout of one block's q, k."""
    core, svg_layout = import_pack("core"), import_pack("core.svg_layout")
    spatial = svg_layout.svg_block_masks(grid, 0.25, BLOCK, True)[0]
    radial = core.radial_block_mask(grid, core.RadialSettings(decay_factor=0.01, block_size=BLOCK))
    return {"svg spatial 0.25": block_layout(spatial, q, rows), "radial (floor)": block_layout(radial, q, rows),
            "adaspa blocks 0.25": adaspa_layout(q, k, rows), "svg2 clusters 0.25": svg2_layout(q, k, rows)}


def group_stats(k, v, key_group, groups):
    """Per key group: log size (-inf when empty), mean key, mean value (float64)."""
    H, L, D = k.shape
    size = torch.zeros(H, groups, dtype=torch.float64).scatter_add_(1, key_group,
                                                                     torch.ones(H, L, dtype=torch.float64))
    sums = [torch.zeros(H, groups, D, dtype=torch.float64).scatter_add_(1, key_group[..., None].expand(H, L, D),
                                                                         t.double()) for t in (k, v)]
    means = [t / size.clamp(min=1)[..., None] for t in sums]
    return size.log(), *means


def block_moments(k, v):
    """Per key block: key covariance and value-key cross-covariance (float64)."""
    H, L, D = k.shape
    kb, vb = (t.double().view(H, L // BLOCK, BLOCK, D) for t in (k, v))
    dk, dv = kb - kb.mean(2, keepdim=True), vb - vb.mean(2, keepdim=True)
    return dk.transpose(-1, -2) @ dk / BLOCK, dv.transpose(-1, -2) @ dk / BLOCK


def list_row_terms(a, layout, q_scaled_means, log_size, k_mean, v_mean, linear: bool, apart: int = 0,
                   value_moved: bool = False, slope_groups: int | None = None):
    """(H, R) log weight and (H, R, D) value of the one virtual key each row gets from its list row: the skipped
    groups' first-order terms at the list row's mean query, summed (weights w, total A), and, with ``linear``,
    moved to the row's own query to first order: score a.k_w + A - a_mean.k_w, k_w the w-weighted mean key.
    ``value_moved``: the value too, v_w + C (a - a_mean), C = sum_g w_g (v_g - v_w)(k_g - k_w)^T the derivative of
    the w-weighted mean value in the query (a D x D matrix per list row in a kernel; applied here without forming it);
    ``slope_groups``: C summed over that many of the summed groups alone, the heaviest (building C costs D^2 a group).
    ``apart``: that many skipped groups, the heaviest at the list row's mean query, are left out of the sum (the
    caller gives them their own terms); also returned, (H, R, G) bool."""
    a_mean = torch.gather(q_scaled_means, 1, layout.row_list[..., None].expand(-1, -1, a.shape[-1]))
    logw = (a_mean @ k_mean.transpose(-1, -2) + log_size[:, None]).masked_fill(layout.kept, float("-inf"))
    heaviest = torch.zeros_like(layout.kept)
    if apart:
        heaviest.scatter_(-1, logw.topk(min(apart, logw.shape[-1]), dim=-1).indices, True)
        heaviest &= torch.isfinite(logw)
        logw = logw.masked_fill(heaviest, float("-inf"))
    total = torch.logsumexp(logw, -1)
    w = torch.exp(logw - total[..., None]).nan_to_num(0.0)              # rows that skip nothing: no term
    k_w, v_w = w @ k_mean, w @ v_mean
    delta = a - a_mean
    score = total + (delta * k_w).sum(-1) if linear else total
    if value_moved:
        slope_w = w
        if slope_groups is not None:
            top = w.topk(min(slope_groups, w.shape[-1]), dim=-1).indices
            slope_w = torch.zeros_like(w).scatter_(-1, top, w.gather(-1, top))
        t = slope_w * (delta @ k_mean.transpose(-1, -2) - (delta * k_w).sum(-1, keepdim=True))  # w_g (k_g-k_w).delta
        v_w = v_w + t @ v_mean - t.sum(-1, keepdim=True) * v_w
    return score, v_w, heaviest


def group_moments(k, v, key_group, groups):
    """(H, G, D, D) each key group's mean of v k^T (float64): the within-group second moment a slope needs."""
    H, L, D = k.shape
    result = torch.zeros(H, groups, D, D, dtype=torch.float64)
    for h in range(H):
        for g in key_group[h].unique().tolist():
            members = key_group[h] == g
            result[h, g] = v[h, members].double().T @ k[h, members].double() / int(members.sum())
    return result


def centre_exact_terms(a, layout, q_scaled_means, k, v, token_kept, linear: bool, slope: str | None,
                       moments=None, first=None, group_means=None):
    """(H, R) log weight and (H, R, D) value of one virtual key per row standing for every skipped key, exact at
    the list row's mean query (each skipped token's own score there, not its group's mean key) and moved to the
    row's own query to first order like list_row_terms. ``slope`` (the value's derivative C): None (the value is
    not moved), "tokens" (C over the skipped tokens, exact), "moments" (each skipped group's mean v k^T, weighted
    by the group's exact mass at the mean query), "moments at first order" (weighted by its first-order mass,
    ``first``, with ``group_means`` (mean key, mean value): no per-group output of the pass at the mean query
    needed)."""
    H, R, D = a.shape
    a_mean = torch.gather(q_scaled_means, 1, layout.row_list[..., None].expand(-1, -1, D))
    logw = (a_mean @ k.double().transpose(-1, -2)).masked_fill(token_kept, float("-inf"))     # (H, R, L)
    total = torch.logsumexp(logw, -1)
    w = torch.exp(logw - total[..., None]).nan_to_num(0.0)
    k_w, v_w = w @ k.double(), w @ v.double()
    delta = a - a_mean
    score = total + (delta * k_w).sum(-1) if linear else total
    if slope == "tokens":
        t = w * (delta @ k.double().transpose(-1, -2) - (delta * k_w).sum(-1, keepdim=True))
        v_w = v_w + t @ v.double() - t.sum(-1, keepdim=True) * v_w
    elif slope is not None:
        if slope == "moments":
            w_g = torch.zeros(H, R, moments.shape[1], dtype=torch.float64).scatter_add_(
                2, layout.key_group[:, None].expand(H, R, -1), w)
            centre_v, centre_k = v_w, k_w
        else:  # the slope centred on its own weights' means: mixing them with the exact ones leaves it uncentred
            skipped = first.masked_fill(layout.kept, float("-inf"))
            w_g = torch.softmax(skipped, -1).nan_to_num(0.0)
            centre_v, centre_k = w_g @ group_means[1], w_g @ group_means[0]
        second = torch.einsum("hrg,hgde,hre->hrd", w_g, moments, delta)                     # E_w[v k^T] delta
        v_w = v_w + second - centre_v * (centre_k * delta).sum(-1, keepdim=True)
    return score, v_w


def variants(apart=APART, slope_groups=SLOPE_GROUPS) -> tuple:
    """The variants' names, the "top M + rest" ones (plain, value moved, value moved from R groups) after first
    order."""
    moved = ("", " (value moved)") + tuple(f" (value moved, {r})" for r in slope_groups)
    return VARIANTS[:2] + tuple(f"top {m} + rest{how}" for m in apart for how in moved) + VARIANTS[2:]


def errors(q, k, v, layout, rows, apart=APART, slope_groups=SLOPE_GROUPS):
    """{variant: relative L2 error} over ``rows`` of every head for one Layout (second order: block layouts only)."""
    H, L, D = q.shape
    scale = 1.0 / math.sqrt(D)
    qr = q[:, rows].double()
    s = qr @ k.double().transpose(-1, -2) * scale                                  # (H, R, L)
    exact = torch.softmax(s, -1) @ v.double()
    groups = layout.kept.shape[-1]
    log_size, k_mean, v_mean = group_stats(k, v, layout.key_group, groups)
    a = qr * scale                                                                 # (H, R, D)
    first = a @ k_mean.transpose(-1, -2) + log_size[:, None]                       # (H, R, G) log weights
    token_kept = torch.gather(layout.kept, 2, layout.key_group[:, None].expand(H, len(rows), L))
    s_kept = s.masked_fill(~token_kept, float("-inf"))
    moments = block_moments(k, v) if layout.blocks else None
    moments_g = group_moments(k, v, layout.key_group, groups)
    result = {}
    for name in variants(apart, slope_groups):
        if name == "dropped":
            out = torch.softmax(s_kept, -1) @ v.double()
        elif name == "per list row (value moved, moments)":
            score, value, _ = list_row_terms(a, layout, layout.list_means * scale, log_size, k_mean, v_mean,
                                             linear=True)
            a_mean = torch.gather(layout.list_means * scale, 1, layout.row_list[..., None].expand(-1, -1, D))
            w_g = torch.softmax((a_mean @ k_mean.transpose(-1, -2) + log_size[:, None]).masked_fill(
                layout.kept, float("-inf")), -1).nan_to_num(0.0)
            k_w, delta = w_g @ k_mean, a - a_mean
            value = value + torch.einsum("hrg,hgde,hre->hrd", w_g, moments_g, delta) \
                - value * (k_w * delta).sum(-1, keepdim=True)
            m = torch.maximum(s_kept.amax(-1), score)[..., None]
            p, pw = torch.exp(s_kept - m), torch.exp(score[..., None] - m)
            out = (p @ v.double() + pw * value) / (p.sum(-1, keepdim=True) + pw)
        elif name.startswith("per list row") or name.startswith("top"):
            apart = int(name.split()[1]) if name.startswith("top") else 0
            score, value, heaviest = list_row_terms(a, layout, layout.list_means * scale, log_size, k_mean, v_mean,
                                                    linear=not name.endswith("(constant)"), apart=apart,
                                                    value_moved="(value moved" in name,
                                                    slope_groups=int(name[name.index(", ") + 2:-1]) if ", " in name
                                                    else None)
            own = first.masked_fill(~heaviest, float("-inf"))                  # the heaviest skipped, row by row
            m = torch.maximum(torch.maximum(s_kept.amax(-1), score), own.amax(-1))[..., None]
            p, pw, po = torch.exp(s_kept - m), torch.exp(score[..., None] - m), torch.exp(own - m)
            out = (p @ v.double() + pw * value + po @ v_mean) / (p.sum(-1, keepdim=True) + pw
                                                                  + po.sum(-1, keepdim=True))
        elif name.startswith("centre exact"):
            how = name[len("centre exact"):].strip(" ()")
            score, value = centre_exact_terms(a, layout, layout.list_means * scale, k, v, token_kept,
                                              linear=how != "constant",
                                              slope={"value moved": "tokens", "value moved, moments": "moments",
                                                     "value moved, moments at first order": "moments at first order"
                                                     }.get(how), moments=moments_g, first=first,
                                              group_means=(k_mean, v_mean))
            m = torch.maximum(s_kept.amax(-1), score)[..., None]
            p, pw = torch.exp(s_kept - m), torch.exp(score[..., None] - m)
            out = (p @ v.double() + pw * value) / (p.sum(-1, keepdim=True) + pw)
        elif name == "block summary (pack)":  # the kernels' own path: block_sparse_attention(..., summarise=True)
            if layout.block_mask is None:
                result[name] = float("nan")
                continue
            K = import_pack("kernels")
            idx, cnt = K.block_mask_to_indices(layout.block_mask[None])
            full = K.block_sparse_attention(q[None], k[None], v[None], idx, cnt, block_size=BLOCK, backend="reference",
                                            summarise=True)
            out = full[0][:, rows].double()
        elif name.startswith("second order") and moments is None:
            result[name] = float("nan")
            continue
        else:
            logw, values = first, v_mean[:, None]
            if name.startswith("second order"):
                cov_k, cov_vk = moments
                if name.endswith("(diagonal)"):
                    logw = logw + 0.5 * (a * a) @ cov_k.diagonal(dim1=-2, dim2=-1).transpose(-1, -2)
                else:
                    logw = logw + 0.5 * torch.einsum("hrd,hbde,hre->hrb", a, cov_k, a)
                    values = values + torch.einsum("hbde,hre->hrbd", cov_vk, a)    # (H, R, NB, D)
            logw = logw.masked_fill(layout.kept, float("-inf"))
            m = torch.maximum(s_kept.amax(-1), logw.amax(-1))[..., None]
            p, pw = torch.exp(s_kept - m), torch.exp(logw - m)
            num = p @ v.double() + (pw[..., None] * values.expand(H, len(rows), groups, D)).sum(-2)
            out = num / (p.sum(-1) + pw.sum(-1))[..., None]
        result[name] = float((out - exact).norm() / exact.norm())
    result["recall"] = float((torch.softmax(s, -1) * token_kept).sum(-1).mean())
    spread = (k.double() - torch.gather(k_mean, 1, layout.key_group[..., None].expand(H, L, D))).square().sum(-1)
    result["key spread"] = float(spread.mean() / k.double().square().sum(-1).mean())
    result["density"] = float(token_kept.double().mean())
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
    parser.add_argument("--apart", type=int, nargs="*", default=list(APART),
                        help="M of the 'top M + rest' variants")
    parser.add_argument("--slope-groups", type=int, nargs="*", default=list(SLOPE_GROUPS),
                        help="R of the 'top M + rest (value moved, R)' variants")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    proxy_model.use_comfyui(args.comfyui)
    nodes, bridge = import_pack("nodes"), import_pack("nodes.bridge")
    proxy = proxy_model.load(args.weights)
    grid, captured = capture(proxy, nodes, bridge, args.step, args.steps, args.cfg, args.seed, args.frames, args.size)
    L = grid.total_tokens
    rows = torch.arange(args.rows) * L // args.rows + (L // args.rows) // 2
    per_layout = {}
    for layer in sorted(captured):
        q, k, v = captured[layer]
        for name, layout in layouts(grid, q, k, rows).items():
            result = errors(q, k, v, layout, rows, tuple(args.apart), tuple(args.slope_groups))
            per_layout.setdefault(name, []).append(result)
            print(f"block {layer} {name}: {per_layout[name][-1]}", flush=True)
    results = {name: {key: sum(r[key] for r in rs) / len(rs) for key in rs[0]} for name, rs in per_layout.items()}
    if args.json:
        Path(args.json).write_text(json.dumps(dict(step=args.step, steps=args.steps, cfg=args.cfg, rows=args.rows,
                                                   grid=str(grid), results=results), indent=1))
    print(f"\nproxy {grid}, step {args.step} of {args.steps}, cfg {args.cfg}, {args.rows} rows per head, "
          f"block {BLOCK}: relative L2 error of the output against exact attention, mean over blocks 1-7 and heads")
    print("key spread: the keys' mean squared distance to their group's mean key, over their mean squared norm")
    names = variants(args.apart, args.slope_groups)
    print(f"{'layout':18s} {'density':>7s} {'recall':>6s} {'spread':>6s} " + " ".join(f"{v:>14s}" for v in names))
    for name, r in results.items():
        print(f"{name:18s} {r['density']:7.3f} {r['recall']:6.3f} {r['key spread']:6.3f} "
              + " ".join(f"{r[v]:14.4f}" for v in names))


if __name__ == "__main__":
    main()
