"""Video-shaped attention inputs with the structure real video DiTs show, for the demo and benchmarks.

Tokens of F frames x H x W carry a smooth space-time field (local correlation) plus a few objects that move
across frames (semantic correlation: far-apart tokens of one object are alike). Per-head projections give
q, k, v, and Wan's 3D RoPE (head dims split over t, h, w) is applied to q and k, as in the model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _smooth_field(frames, height, width, channels, generator, device):
    coarse = torch.randn(1, channels, max(2, frames // 4), max(2, height // 6), max(2, width // 6),
                         generator=generator, device=device)
    return F.interpolate(coarse, size=(frames, height, width), mode="trilinear", align_corners=True)[0]


def _moving_objects(frames, height, width, channels, count, generator, device):
    t = torch.arange(frames, device=device).view(-1, 1, 1).float()
    y = torch.arange(height, device=device).view(1, -1, 1).float()
    x = torch.arange(width, device=device).view(1, 1, -1).float()
    field = torch.zeros(channels, frames, height, width, device=device)
    for _ in range(count):
        start = torch.rand(2, generator=generator, device=device) * torch.tensor([height, width], device=device)
        velocity = (torch.rand(2, generator=generator, device=device) - 0.5) * 0.6 * min(height, width) / max(frames, 1)
        radius = (0.08 + 0.12 * torch.rand(1, generator=generator, device=device)) * min(height, width)
        cy, cx = start[0] + velocity[0] * t, start[1] + velocity[1] * t
        inside = torch.sigmoid((radius - torch.sqrt((y - cy) ** 2 + (x - cx) ** 2)) / 1.5)
        embedding = torch.randn(channels, generator=generator, device=device) * 2.0
        field += embedding.view(-1, 1, 1, 1) * inside
    return field


def _rope_3d(frames, height, width, head_dim, device, theta=10000.0):
    """cos/sin tables (L, head_dim/2) with Wan's split of rotary pairs over (t, h, w)."""
    pairs = head_dim // 2
    split = [pairs - 2 * (pairs // 3), pairs // 3, pairs // 3]
    grids = torch.meshgrid(torch.arange(frames), torch.arange(height), torch.arange(width), indexing="ij")
    angles = []
    for axis, n in enumerate(split):
        freqs = 1.0 / theta ** (torch.arange(n, dtype=torch.float64) / n)
        angles.append(grids[axis].reshape(-1, 1).double() * freqs)
    angle = torch.cat(angles, dim=1).to(device)
    return angle.cos().float(), angle.sin().float()


def _apply_rope(x, cos, sin):
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


def video_qkv(frames=8, height=16, width=24, heads=4, head_dim=64, batch=1, objects=6, sharpness=1.6, seed=0,
              device="cpu", dtype=torch.float32):
    """(q, k, v), each (batch, heads, frames * height * width, head_dim)."""
    device = torch.device(device)
    generator = torch.Generator(device=device).manual_seed(seed)
    channels = 64
    tokens = frames * height * width
    cos, sin = _rope_3d(frames, height, width, head_dim, device)
    out = []
    for _ in range(batch):
        field = _smooth_field(frames, height, width, channels, generator, device)
        field = field + _moving_objects(frames, height, width, channels, objects, generator, device)
        x = field.reshape(channels, tokens).T
        x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-6) * channels ** 0.5
        w = torch.randn(3, channels, heads * head_dim, generator=generator, device=device) / channels ** 0.5
        # Trained q/k projections are aligned (a token matches itself and its look-alikes), which RoPE turns
        # into attention that decays with space-time distance; the rest is content noise.
        w[1] = 0.8 * w[0] + 0.6 * w[1]
        w[:2] *= sharpness
        q, k, v = (torch.matmul(x, w[i]).view(tokens, heads, head_dim).transpose(0, 1) for i in range(3))
        out.append((_apply_rope(q, cos, sin), _apply_rope(k, cos, sin), v))
    return tuple(torch.stack([o[i] for o in out]).to(dtype).contiguous() for i in range(3))
