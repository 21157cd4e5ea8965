"""Quality measures of a sparse layout against dense attention."""

from __future__ import annotations

import math

import torch


def block_attention_mass(q: torch.Tensor, k: torch.Tensor, block_size: int, scale: float | None = None,
                         query_chunk: int = 1024) -> torch.Tensor:
    """Exact dense attention probability summed per (query block, key block): (B, H, NQB, NKB) float32.

    Each query row's probabilities sum to 1, so a row of blocks sums to the number of queries in the block.
    Computed a chunk of queries at a time: memory O(chunk x L), never L x L.
    """
    B, H, LQ, D = q.shape
    LK = k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    nqb, nkb = -(-LQ // block_size), -(-LK // block_size)
    chunk = max(block_size, query_chunk // block_size * block_size)
    key_block = torch.arange(LK, device=q.device) // block_size
    mass = torch.zeros(B, H, nqb, nkb, device=q.device, dtype=torch.float32)
    for start in range(0, LQ, chunk):
        stop = min(LQ, start + chunk)
        p = torch.softmax(torch.matmul(q[:, :, start:stop].float(), k.float().transpose(-1, -2)) * scale, dim=-1)
        per_key_block = torch.zeros(B, H, stop - start, nkb, device=q.device).index_add_(3, key_block, p)
        query_block = (torch.arange(start, stop, device=q.device) // block_size) - start // block_size
        rows = torch.zeros(B, H, -(-(stop - start) // block_size), nkb, device=q.device)
        rows.index_add_(2, query_block, per_key_block)
        mass[:, :, start // block_size: start // block_size + rows.shape[2]] += rows
    return mass


def attention_recall(mass: torch.Tensor, block_mask: torch.Tensor) -> float:
    """Fraction of the true attention mass that a layout keeps (1.0 = nothing lost)."""
    kept = (mass * block_mask.to(mass.dtype)).sum()
    return float(kept / mass.sum())


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    return float((approx.float() - exact.float()).norm() / exact.float().norm())


def recall_from_lse(sparse_lse: torch.Tensor, dense_lse: torch.Tensor) -> torch.Tensor:
    """Per-row kept attention mass, exp(LSE over the kept keys - LSE over all keys): works for any method whose
    kernel reports the LSE of the keys it attended to (clusters, permutations and all), same shapes in and out."""
    return torch.exp((sparse_lse.float() - dense_lse.float()).clamp(max=0.0))


def dense_lse(q: torch.Tensor, k: torch.Tensor, scale: float | None = None, query_chunk: int = 2048) -> torch.Tensor:
    """Natural-log LSE of q k^T * scale per query row, (B, H, LQ) float32, a chunk of queries at a time."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    parts = [torch.logsumexp(torch.matmul(q[:, :, s:s + query_chunk].float(), k.float().transpose(-1, -2)) * scale, -1)
             for s in range(0, q.shape[2], query_chunk)]
    return torch.cat(parts, dim=2)


# ----------------------------------------------------------------------------------------------------------------
# Video quality of a sparse sample against the dense sample of the same seed (videos in [-1, 1]).

def psnr(video: torch.Tensor, reference: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB for videos in [-1, 1] (peak-to-peak 2); inf when identical."""
    mse = float((video.double() - reference.double()).pow(2).mean())
    return math.inf if mse == 0 else 10 * math.log10(4.0 / mse)


def _gaussian_window(size: int = 11, sigma: float = 1.5, dtype=torch.float64) -> torch.Tensor:
    x = torch.arange(size, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    return g / g.sum()


def ssim(video: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean SSIM (Wang et al. 2004: 11-tap Gaussian window, sigma 1.5, K1 0.01, K2 0.03) over every frame and
    channel of (..., C, F, H, W) videos in [-1, 1], computed on [0, 1] intensities."""
    x = ((video.double() + 1) / 2).reshape(-1, 1, *video.shape[-2:])
    y = ((reference.double() + 1) / 2).reshape(-1, 1, *reference.shape[-2:])
    g = _gaussian_window().to(x.device)
    pad = len(g) // 2

    def blur(t):
        t = torch.nn.functional.conv2d(torch.nn.functional.pad(t, (pad, pad, 0, 0), mode="reflect"),
                                       g.view(1, 1, 1, -1))
        return torch.nn.functional.conv2d(torch.nn.functional.pad(t, (0, 0, pad, pad), mode="reflect"),
                                          g.view(1, 1, -1, 1))

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return float(s.mean())
