"""Attention inputs whose every head is of one chosen kind, the kinds real video DiTs mix in one layer.

Each head's queries and keys are the same code vector per token (plus a little independent noise), so q_i . k_j is
high where the codes of tokens i and j agree; what the code depends on makes the kind:

  * spatial:  the token's frame (one random code per frame) plus a smooth field over (y, x): attends within its
              frame, nearby positions most;
  * temporal: the token's position (one random code per (y, x)) plus a weak smooth field over t: the same position
              in every frame;
  * local:    a smooth field over (t, y, x) with a short correlation length: a 3D neighbourhood;
  * sink:     every query matches one direction that only the keys of frame 0 carry: most mass on frame 0;
  * semantic: the token's segment, a Voronoi cell of a few seeds moving across the frames (the moving objects of
              synthetic.py): far-apart tokens of one object attend each other;
  * diffuse:  small random codes: near-uniform attention, no structure.

Gains per kind are set so the structure holds 0.89 to 0.97 of each row's mass on a 8 x 16 x 24 grid. Values are
random per head. Deterministic by seed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

KINDS = ("spatial", "temporal", "local", "sink", "semantic", "diffuse")
SEGMENTS = 6
NOISE = 0.1  # independent noise on q and on k, relative to the code: the two are alike, not equal


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-6)


def _random_codes(count: int, dim: int, generator) -> torch.Tensor:
    return _unit(torch.randn(count, dim, generator=generator))


def _smooth_codes(size: tuple, coarse: tuple, dim: int, generator) -> torch.Tensor:
    """(prod(size), dim) unit codes interpolated from random ones on a coarse grid: nearby tokens have alike codes,
    the correlation length is size / coarse tokens per axis."""
    lattice = torch.randn(1, dim, *coarse, generator=generator)
    mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[len(size)]
    field = F.interpolate(lattice, size=size, mode=mode, align_corners=True)[0]
    return _unit(field.reshape(dim, -1).T)


def moving_segments(frames: int, height: int, width: int, seed: int = 0, count: int = SEGMENTS) -> torch.Tensor:
    """(frames * height * width,) int64 segment of each token: the nearest of ``count`` seeds that move across the
    frames (start and velocity random, up to half the frame's size over the clip)."""
    generator = torch.Generator().manual_seed(seed)
    start = torch.rand(count, 2, generator=generator) * torch.tensor([height, width])
    velocity = (torch.rand(count, 2, generator=generator) - 0.5) * torch.tensor([height, width]) / max(frames, 1)
    t = torch.arange(frames).float()
    # seeds bounce off the frame's edges, so every segment lives in every frame
    span = torch.tensor([height - 1, width - 1]).float().clamp_min(1.0)
    travelled = torch.remainder(start[None] + velocity[None] * t[:, None, None], 2 * span)
    centers = span - (travelled - span).abs()  # (F, count, 2)
    y, x = torch.meshgrid(torch.arange(height).float(), torch.arange(width).float(), indexing="ij")
    points = torch.stack([y, x], dim=-1).reshape(1, -1, 1, 2)  # (1, S, 1, 2)
    distance = (points - centers[:, None]).norm(dim=-1)         # (F, S, count)
    return distance.argmin(dim=-1).reshape(-1)


def _head_codes(kind: str, frames: int, height: int, width: int, dim: int, seed: int, generator):
    """(query codes, key codes), each (L, dim), of one head of ``kind``; their dot products are the logits."""
    s = height * width
    tokens = frames * s
    frame = torch.arange(tokens) // s
    position = torch.arange(tokens) % s
    if kind == "spatial":
        codes = 2.2 * _random_codes(frames, dim, generator)[frame] \
            + 1.6 * _smooth_codes((height, width), (3, 4), dim, generator)[position]
        return codes, codes
    if kind == "temporal":
        codes = 3.2 * _random_codes(s, dim, generator)[position] \
            + 0.8 * _smooth_codes((frames,), (2,), dim, generator)[frame]
        return codes, codes
    if kind == "local":
        coarse = (max(2, frames // 2), max(2, height // 3), max(2, width // 3))
        codes = 3.4 * _smooth_codes((frames, height, width), coarse, dim, generator)
        return codes, codes
    if kind == "sink":
        sink = _random_codes(1, dim, generator)
        noise = 0.5 * _random_codes(tokens, dim, generator)
        keys = noise + torch.where((frame == 0)[:, None], 2.0 * sink, torch.zeros_like(sink))
        return 2.0 * sink.expand(tokens, dim) + noise, keys
    if kind == "semantic":
        codes = 2.1 * _random_codes(SEGMENTS, dim, generator)[moving_segments(frames, height, width, seed)]
        return codes, codes
    if kind == "diffuse":
        return 0.5 * _random_codes(tokens, dim, generator), 0.5 * _random_codes(tokens, dim, generator)
    raise ValueError(f"unknown head kind {kind!r}; the kinds are {', '.join(KINDS)}")


def head_kind_qkv(kinds=KINDS, frames=8, height=16, width=24, head_dim=64, batch=1, seed=0, device="cpu",
                  dtype=torch.float32):
    """(q, k, v), each (batch, len(kinds), frames * height * width, head_dim): head h is of kind ``kinds[h]``.
    Gains are in units of head_dim ** 0.25 per side, so the logits (scaled by 1 / sqrt(head_dim)) do not depend
    on head_dim."""
    for kind in kinds:
        if kind not in KINDS:
            raise ValueError(f"unknown head kind {kind!r}; the kinds are {', '.join(KINDS)}")
    generator = torch.Generator().manual_seed(seed)
    tokens = frames * height * width
    gain = head_dim ** 0.25
    qs, ks = [], []
    for kind in kinds:
        q, k = _head_codes(kind, frames, height, width, head_dim, seed, generator)
        for codes, out in ((q, qs), (k, ks)):
            noise = NOISE * torch.randn(batch, tokens, head_dim, generator=generator) / math.sqrt(head_dim)
            out.append(gain * (codes + noise * codes.norm(dim=-1, keepdim=True)))
    v = torch.randn(batch, len(kinds), tokens, head_dim, generator=generator)
    q, k = torch.stack(qs, dim=1), torch.stack(ks, dim=1)
    return tuple(t.to(device=device, dtype=dtype).contiguous() for t in (q, k, v))
