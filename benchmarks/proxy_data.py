"""Training videos for the proxy model: real clips and procedural scenes, as (B, 3, F, S, S) in [-1, 1].

Real: the animated WebP clips of the PyPI package ``comfyui-workflow-templates-media-video`` (outputs of real video
models, 300-480 px). ``prepare`` decodes them once into a small uint8 tensor file (every second frame, the short
side scaled to 72 px and centre-cropped), holding a few clips out for evaluation:

    pip download --no-deps comfyui-workflow-templates-media-video -d /tmp/clips
    python benchmarks/proxy_data.py /tmp/clips/*.whl --out /tmp/clips.pt

``RealClips`` then draws random 16-frame windows, 64 px crops, mirror images and time reversals on the GPU.
Procedural: textured discs and squares that move, rotate and occlude one another over a panning textured
background, generated on the fly (``procedural``).
"""

from __future__ import annotations

import argparse
import io
import math
import zipfile
from pathlib import Path

import torch
import torch.nn.functional as F

STORED_SIZE = 72
FRAME_STRIDE = 2
HOLDOUT_EVERY = 13  # every 13th clip (sorted by name) is kept out of training


def _decode(data: bytes, size: int, stride: int) -> torch.Tensor:
    from PIL import Image

    image = Image.open(io.BytesIO(data))
    frames = []
    for i in range(0, getattr(image, "n_frames", 1), stride):
        image.seek(i)
        rgb = image.convert("RGB")
        scale = size / min(rgb.size)
        w, h = max(size, round(rgb.size[0] * scale)), max(size, round(rgb.size[1] * scale))
        rgb = rgb.resize((w, h), Image.BICUBIC)
        left, top = (w - size) // 2, (h - size) // 2
        frames.append(torch.frombuffer(bytearray(rgb.crop((left, top, left + size, top + size)).tobytes()),
                                       dtype=torch.uint8).view(size, size, 3))
    return torch.stack(frames)


def prepare(sources: list[Path], out: Path, frames: int = 16) -> dict:
    """Decode every animated WebP of ``sources`` (.whl / .zip archives or folders) into ``out``."""
    clips = {}
    for source in sources:
        if source.is_dir():
            for path in sorted(source.rglob("*.webp")):
                clips[path.name] = path.read_bytes()
        else:
            with zipfile.ZipFile(source) as archive:
                for name in sorted(archive.namelist()):
                    if name.endswith(".webp"):
                        clips[Path(name).name] = archive.read(name)
    videos, names = [], []
    for name in sorted(clips):
        video = _decode(clips[name], STORED_SIZE, FRAME_STRIDE)
        if len(video) >= frames:  # stills and short clips cannot give a training window
            videos.append(video)
            names.append(name)
    if not videos:
        raise ValueError(f"no animated WebP clip of at least {frames * FRAME_STRIDE} frames in {sources}")
    holdout = [n for i, n in enumerate(names) if i % HOLDOUT_EVERY == HOLDOUT_EVERY - 1]
    starts = torch.tensor([0] + [len(v) for v in videos]).cumsum(0)
    data = {"frames": torch.cat(videos), "starts": starts, "names": names, "holdout": holdout}
    torch.save(data, out)
    return data


class RealClips:
    """Random windows of the prepared clips on ``device``; ``split`` 'train' or 'holdout'."""

    def __init__(self, data: dict, device, split: str = "train", frames: int = 16, size: int = 64):
        keep = [(i, n) for i, n in enumerate(data["names"]) if (n in data["holdout"]) == (split == "holdout")]
        self.names = [n for _, n in keep]
        self.frames, self.size, self.device = frames, size, torch.device(device)
        starts = data["starts"]
        self.video = data["frames"].to(self.device)
        self.first = torch.tensor([int(starts[i]) for i, _ in keep], device=self.device)
        self.length = torch.tensor([int(starts[i + 1] - starts[i]) for i, _ in keep], device=self.device)

    def batch(self, n: int, generator: torch.Generator):
        """(videos (n, 3, F, S, S) in [-1, 1], clip index within this split (n,))."""
        dev = self.device
        clip = torch.randint(len(self.names), (n,), generator=generator, device=dev)
        offset = (torch.rand(n, generator=generator, device=dev) * (self.length[clip] - self.frames + 1)).long()
        t = self.first[clip, None] + offset[:, None] + torch.arange(self.frames, device=dev)
        stored = self.video.shape[1]
        y0, x0 = (torch.randint(stored - self.size + 1, (2, n), generator=generator, device=dev))
        ys = y0[:, None] + torch.arange(self.size, device=dev)
        xs = x0[:, None] + torch.arange(self.size, device=dev)
        video = self.video[t[:, :, None, None], ys[:, None, :, None], xs[:, None, None, :]]  # n, F, S, S, 3
        video = video.permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0
        flip = torch.rand(n, generator=generator, device=dev) < 0.5
        video = torch.where(flip[:, None, None, None, None], video.flip(-1), video)
        reverse = torch.rand(n, generator=generator, device=dev) < 0.25
        video = torch.where(reverse[:, None, None, None, None], video.flip(2), video)
        return video, clip


def _texture(n, size, generator, device, waves=4):
    """(n, 3, size, size) smooth colourful texture: a few random plane waves per channel."""
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size, device=device), torch.linspace(-1, 1, size, device=device),
                            indexing="ij")
    freq = torch.randn(n, 3, waves, 2, generator=generator, device=device) * 4.0
    phase = torch.rand(n, 3, waves, generator=generator, device=device) * 2 * math.pi
    arg = freq[..., 0, None, None] * yy + freq[..., 1, None, None] * xx + phase[..., None, None]
    base = torch.rand(n, 3, 1, 1, generator=generator, device=device) * 1.4 - 0.7
    return (base + 0.3 * torch.sin(arg).mean(2)).clamp(-1, 1)


def procedural(n: int, generator: torch.Generator, device, frames: int = 16, size: int = 64, objects: int = 3):
    """(n, 3, F, S, S) in [-1, 1]: objects moving, rotating and occluding over a panning background."""
    dev = torch.device(device)
    world = 2 * size
    background = _texture(n, world, generator, dev, waves=6)
    start = torch.rand(n, 2, generator=generator, device=dev) * (world - size)
    pan = (torch.rand(n, 2, generator=generator, device=dev) - 0.5) * 2.0 * (world - size) / frames / 2
    t = torch.arange(frames, device=dev, dtype=torch.float32)
    corner = (start[:, None] + pan[:, None] * t[None, :, None]).clamp(0, world - size)  # n, F, 2 (y, x)
    axis = torch.linspace(-1, 1, size, device=dev)
    # Sample the background window of each frame with grid_sample (sub-pixel pans stay smooth).
    ys = (corner[..., 0, None] + (axis + 1) / 2 * (size - 1)) / (world - 1) * 2 - 1  # n, F, S
    xs = (corner[..., 1, None] + (axis + 1) / 2 * (size - 1)) / (world - 1) * 2 - 1
    grid = torch.stack(torch.broadcast_tensors(xs[:, :, None, :], ys[:, :, :, None]), dim=-1)  # n, F, S, S, 2
    video = F.grid_sample(background.repeat_interleave(frames, 0), grid.flatten(0, 1), align_corners=True)
    video = video.view(n, frames, 3, size, size)

    yy, xx = torch.meshgrid(axis, axis, indexing="ij")
    for _ in range(objects):  # later objects are drawn over earlier ones: occlusion
        center = torch.rand(n, 2, generator=generator, device=dev) * 1.4 - 0.7
        velocity = (torch.rand(n, 2, generator=generator, device=dev) - 0.5) * 2.4 / frames
        radius = 0.15 + 0.25 * torch.rand(n, generator=generator, device=dev)
        spin = (torch.rand(n, generator=generator, device=dev) - 0.5) * 2 * math.pi / frames
        square = torch.rand(n, generator=generator, device=dev) < 0.5
        texture = _texture(n, size, generator, dev, waves=3)
        c = center[:, None] + velocity[:, None] * t[None, :, None]  # n, F, 2
        angle = spin[:, None] * t[None, :]
        dy, dx = yy - c[..., 0, None, None], xx - c[..., 1, None, None]  # n, F, S, S
        cos, sin = angle.cos()[..., None, None], angle.sin()[..., None, None]
        u, v = cos * dx + sin * dy, -sin * dx + cos * dy
        r = radius[:, None, None, None]
        distance = torch.where(square[:, None, None, None], torch.maximum(u.abs(), v.abs()), torch.sqrt(u ** 2 + v ** 2))
        inside = torch.sigmoid((r - distance) * size / 2)[:, :, None]  # soft edge of about one pixel
        # The texture rotates with the object: sample it in the object's frame.
        tex_grid = torch.stack((u / r, v / r), dim=-1).clamp(-1, 1).flatten(0, 1)
        tex = F.grid_sample(texture.repeat_interleave(frames, 0), tex_grid, align_corners=True)
        video = video * (1 - inside) + tex.view(n, frames, 3, size, size) * inside
    return video.permute(0, 2, 1, 3, 4).contiguous()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sources", nargs="+", type=Path, help="the package's .whl, or folders of .webp clips")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    data = prepare(args.sources, args.out)
    print(f"{len(data['names'])} clips, {len(data['frames'])} frames of {STORED_SIZE}px -> {args.out} "
          f"({args.out.stat().st_size / 2**20:.1f} MiB); held out: {data['holdout']}")


if __name__ == "__main__":
    main()
