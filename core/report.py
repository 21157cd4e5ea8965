"""Pictures of the last sampling run for the Sparse Attention Inspector. PIL + numpy + torch; no ComfyUI, no matplotlib.

* :func:`layout_image`: a block layout as a heatmap (kept tiles bright), frame boundaries as grid lines;
* :func:`density_image`: the density each (step, layer) ran at, as a steps x layers heatmap;
* :func:`timing_image`: measured attention time per step against an all-dense estimate;
* :func:`message_image`: a card that says why there is nothing to draw;
* :func:`inspect`: the three pictures of a session (or the cards saying why not);
* :func:`to_image_tensor`: a (1, H, W, 3) float tensor in [0, 1], ComfyUI's IMAGE.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .summary import (density_text, fallback_lines, grid_text, head_classes_text, method_name, method_text,
                      routing_text, schedule_text, timing_medians, timing_text)

DEFAULT_SIZE = 768
BACKGROUND = (28, 29, 33)
FOREGROUND = (236, 236, 236)
MUTED = (160, 162, 170)
MISSING = (64, 66, 72)
FRAME_LINE = (150, 150, 150)  # legend swatch; drawn darker on kept tiles, lighter on skipped
TEXT_LINE = (240, 90, 20)
SPARSE_BAR = (53, 183, 121)
DENSE_BAR = (136, 96, 200)
ESTIMATE = (255, 140, 0)
# viridis at 10 evenly spaced points: dark purple (0: skipped / sparse) to yellow (1: kept / dense)
_VIRIDIS = np.array([(68, 1, 84), (72, 40, 120), (62, 74, 137), (49, 104, 142), (38, 130, 142), (31, 158, 137),
                     (53, 183, 121), (110, 206, 88), (181, 222, 43), (253, 231, 37)], dtype=np.float64)
KEPT, SKIPPED = tuple(int(c) for c in _VIRIDIS[-1]), tuple(int(c) for c in _VIRIDIS[0])


def colormap(values) -> np.ndarray:
    """Values in [0, 1] (any shape) -> uint8 RGB (..., 3), viridis."""
    x = np.clip(np.asarray(values, dtype=np.float64), 0.0, 1.0) * (len(_VIRIDIS) - 1)
    lo = np.floor(x).astype(int).clip(0, len(_VIRIDIS) - 2)
    t = (x - lo)[..., None]
    return np.round(_VIRIDIS[lo] * (1 - t) + _VIRIDIS[lo + 1] * t).astype(np.uint8)


@functools.lru_cache(maxsize=32)
def font(size: int):
    """Pillow's default font at ``size`` (Pillow >= 10.1 with FreeType); older Pillow: its fixed bitmap font."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError, AttributeError):
        return ImageFont.load_default()


def text_size(text: str, fnt) -> tuple[int, int]:
    left, top, right, bottom = ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox((0, 0), text, font=fnt)
    return right - left, bottom - top


def line_height(fnt) -> int:
    return text_size("Ag", fnt)[1] + max(2, text_size("Ag", fnt)[1] // 3)


def wrap(text: str, fnt, width: int) -> list[str]:
    """Greedy word wrap to ``width`` pixels."""
    lines, current = [], ""
    for word in text.split(" "):
        trial = f"{current} {word}" if current else word
        if current and text_size(trial, fnt)[0] > width:
            lines.append(current)
            current = word
        else:
            current = trial
    return lines + [current] if current else lines


def nice_step(span: float, max_ticks: int) -> float:
    """A 1-2-5 tick step that puts at most ``max_ticks`` ticks over ``span``."""
    raw = max(span, 1e-12) / max(max_ticks, 1)
    mag = 10 ** math.floor(math.log10(raw))
    for f in (1, 2, 5, 10):
        if f * mag >= raw:
            return f * mag
    return 10 * mag


def _sizes(max_size: int) -> tuple[int, int, int]:
    """(body, small, title) font sizes for an image about ``max_size`` wide."""
    body = max(13, round(max_size / 48))
    return body, max(12, round(body * 0.85)), round(body * 1.3)


class _Figure:
    """A canvas with a title block, a plot rectangle, axes with ticks, and a legend row. Coordinates in pixels."""

    def __init__(self, width: int, max_size: int, title: str, subtitle_lines: list[str]):
        self.body, self.small, self.title_size = _sizes(max_size)
        self.width = width
        pad = self.body
        self.pad = pad
        title_font = font(self.title_size)
        self.header = [(line, title_font, FOREGROUND) for line in wrap(title, title_font, width - 2 * pad)]
        for sub in subtitle_lines:
            colour = TEXT_LINE if sub.startswith("WARNING") else MUTED
            self.header += [(line, font(self.body), colour) for line in wrap(sub, font(self.body), width - 2 * pad)]
        self.header_height = pad + sum(line_height(f) for _, f, _ in self.header) + pad // 2

    def start(self, height: int) -> None:
        self.image = Image.new("RGB", (self.width, height), BACKGROUND)
        self.draw = ImageDraw.Draw(self.image)
        y = self.pad
        for line, fnt, colour in self.header:
            self.draw.text((self.pad, y), line, font=fnt, fill=colour)
            y += line_height(fnt)

    def text(self, xy, text, size=None, fill=FOREGROUND, align="left", valign="top"):
        fnt = font(size or self.body)
        w, h = text_size(text, fnt)
        left, top, _, _ = self.draw.textbbox((0, 0), text, font=fnt)
        x = xy[0] - {"left": 0, "center": w / 2, "right": w}[align] - left
        y = xy[1] - {"top": 0, "middle": h / 2, "bottom": h}[valign] - top
        self.draw.text((round(x), round(y)), text, font=fnt, fill=fill)

    def vertical_text(self, center, text, size=None, fill=FOREGROUND):
        fnt = font(size or self.body)
        w, h = text_size(text, fnt)
        left, top, _, _ = self.draw.textbbox((0, 0), text, font=fnt)
        tile = Image.new("L", (w + 2, h + 2), 0)
        ImageDraw.Draw(tile).text((1 - left, 1 - top), text, font=fnt, fill=255)
        tile = tile.rotate(90, expand=True)
        x, y = round(center[0] - tile.width / 2), round(center[1] - tile.height / 2)
        self.image.paste(Image.new("RGB", tile.size, fill), (x, y), tile)

    def frame(self, box):
        x0, y0, x1, y1 = box
        self.draw.rectangle((x0 - 1, y0 - 1, x1, y1), outline=MUTED)

    def x_ticks(self, box, values, position, labels=None):
        """Ticks under the plot at pixel x = position(value)."""
        for i, v in enumerate(values):
            x = box[0] + position(v)
            self.draw.line((x, box[3], x, box[3] + 4), fill=MUTED)
            self.text((x, box[3] + 6), labels[i] if labels else _num(v), size=self.small, fill=MUTED, align="center")

    def y_ticks(self, box, values, position, labels=None):
        for i, v in enumerate(values):
            y = box[1] + position(v)
            self.draw.line((box[0] - 5, y, box[0] - 1, y), fill=MUTED)
            self.text((box[0] - 7, y), labels[i] if labels else _num(v), size=self.small, fill=MUTED, align="right",
                      valign="middle")

    def legend(self, y, items):
        """items: (kind, colour, label), kind 'box' or 'line'; laid out left to right, wrapping."""
        x, size = self.pad, self.body
        sw = round(size * 1.1)
        for kind, colour, label in items:
            w = sw + 6 + text_size(label, font(size))[0] + 2 * size
            if x + w > self.width - self.pad and x > self.pad:
                x, y = self.pad, y + line_height(font(size)) + 4
            if kind == "box":
                self.draw.rectangle((x, y + 2, x + sw, y + 2 + sw), fill=colour, outline=MUTED)
            else:
                self.draw.line((x, y + 2 + sw // 2, x + sw, y + 2 + sw // 2), fill=colour, width=max(2, size // 7))
            self.text((x + sw + 6, y + 2 + sw / 2), label, fill=FOREGROUND, valign="middle")
            x += w
        return y + line_height(font(size)) + 4

    def legend_height(self, items) -> int:
        x, rows, size = self.pad, 1, self.body
        for _, _, label in items:
            w = round(size * 1.1) + 6 + text_size(label, font(size))[0] + 2 * size
            if x + w > self.width - self.pad and x > self.pad:
                x, rows = self.pad, rows + 1
            x += w
        return rows * (line_height(font(size)) + 4)


def _rgb(c) -> tuple[int, int, int]:
    return tuple(int(x) for x in c)


def _num(v) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:g}"


def _ticks(lo: float, hi: float, max_ticks: int, integer: bool = True) -> list[float]:
    step = nice_step(hi - lo, max_ticks)
    if integer:
        step = max(1, int(round(step)))
    first = math.ceil(lo / step) * step
    out, v = [], first
    while v <= hi + 1e-9:
        out.append(v)
        v += step
    return out


# ----------------------------------------------------------------------------------------------------------------
# The pictures.

def mask_pixels(mask: torch.Tensor, side: int) -> tuple[np.ndarray, float, float]:
    """(NQ, NK) bool -> (uint8 RGB pixels, px per query block, px per key block), the longer side at most ``side``.

    Fewer blocks than pixels: each tile is a crisp square of whole pixels. More: each pixel shows the kept fraction
    of the tiles it covers (area average)."""
    nq, nk = mask.shape
    longest = max(nq, nk)
    if longest <= side:
        f = max(1, side // longest)
        frac = mask.float().repeat_interleave(f, 0).repeat_interleave(f, 1)
        return colormap(frac.numpy()), float(f), float(f)
    ph, pw = max(1, round(side * nq / longest)), max(1, round(side * nk / longest))
    frac = torch.nn.functional.adaptive_avg_pool2d(mask.float()[None, None], (ph, pw))[0, 0]
    return colormap(frac.numpy()), ph / nq, pw / nk


def _contrast_line(rgb: np.ndarray) -> np.ndarray:
    bright = rgb.mean(axis=-1, keepdims=True) > 128
    return np.where(bright, rgb * 0.55, rgb * 0.55 + 255 * 0.45)


def layout_image(mask: torch.Tensor, grid=None, block_size: int | None = None, title: str = "Block layout",
                 subtitle_lines=(), max_size: int = DEFAULT_SIZE) -> Image.Image:
    """Heatmap of a (query blocks, key blocks) bool layout: kept tiles bright (yellow), skipped dark (purple).

    ``grid`` and ``block_size`` place the frame boundaries (white lines) and, with text tokens, the start of the
    text (orange)."""
    mask = mask.detach().to("cpu", torch.bool)
    if mask.ndim != 2:
        raise ValueError(f"layout_image takes a 2D (query blocks, key blocks) mask, got shape {tuple(mask.shape)}")
    fig = _Figure(max_size, max_size, title, list(subtitle_lines))
    body = fig.body
    left, right = round(body * 4.8), fig.pad * 2
    pixels, fy, fx = mask_pixels(mask, max(16, max_size - left - right))
    ph, pw = pixels.shape[:2]
    pixels = pixels.astype(np.float64)

    legend = [("box", KEPT, "kept tile"), ("box", SKIPPED, "skipped tile")]
    boundaries = []
    if grid is not None and block_size:
        s = grid.tokens_per_frame
        lines = [f * s / block_size for f in range(1, grid.frames)]
        if lines and min(pw, ph) / grid.frames >= 4:  # at least 4 px between lines, else they would hide the tiles
            boundaries = lines
            legend.append(("line", FRAME_LINE, f"frame boundary ({grid.frames} frames)"))
        elif lines:
            legend.append(("line", BACKGROUND, f"{grid.frames} frames (too many to draw boundaries)"))
        text_at = grid.video_tokens / block_size if grid.text_tokens else None
        if text_at is not None:
            legend.append(("line", TEXT_LINE, f"text tokens start ({grid.text_tokens})"))
    for b in boundaries:  # lines that contrast with the tile under them: darker on kept, lighter on skipped
        x, y = min(pw - 1, round(b * fx)), min(ph - 1, round(b * fy))
        pixels[:, x] = _contrast_line(pixels[:, x])
        pixels[y, :] = _contrast_line(pixels[y, :])
    if grid is not None and block_size and grid.text_tokens:
        x, y = min(pw - 1, round(text_at * fx)), min(ph - 1, round(text_at * fy))
        pixels[:, x:x + 2] = TEXT_LINE  # 2 px: it must show over kept (bright) tiles too
        pixels[y:y + 2, :] = TEXT_LINE

    tick_h = line_height(font(fig.small)) + 8
    axis_label_h = line_height(font(body)) + 4
    legend_h = fig.legend_height(legend)
    top = fig.header_height + fig.pad // 2
    height = top + ph + tick_h + axis_label_h + fig.pad // 2 + legend_h + fig.pad // 2
    fig.start(height)
    box = (left, top, left + pw, top + ph)
    fig.image.paste(Image.fromarray(np.round(pixels).astype(np.uint8), "RGB"), box[:2])
    fig.frame(box)
    nq, nk = mask.shape
    fig.x_ticks(box, _ticks(0, nk - 1, max(2, pw // (body * 4))), lambda v: (v + 0.5) * fx)
    fig.y_ticks(box, _ticks(0, nq - 1, max(2, ph // (body * 2))), lambda v: (v + 0.5) * fy)
    fig.text((box[0] + pw / 2, box[3] + tick_h), "key blocks", align="center")
    fig.vertical_text((round(body * 1.1), box[1] + ph / 2), "query blocks")
    fig.legend(box[3] + tick_h + axis_label_h + fig.pad // 2, legend)
    # where things are, for tests and callers: tile (i, j) covers x0 + j * px_per_key, y0 + i * px_per_query
    fig.image.info.update(title=title, plot=(box[0], box[1], fy, fx))
    return fig.image


def density_image(calls: dict, total_steps: int | None = None, num_layers: int | None = None,
                  title: str = "Density per step and layer", subtitle_lines=(),
                  max_size: int = DEFAULT_SIZE) -> Image.Image:
    """Heatmap of the density each (step, layer) call ran at: steps across, layers down (layer 0 on top)."""
    steps_seen = sorted({s for s, _ in calls if s is not None})
    n_steps = max(total_steps or 0, (steps_seen[-1] + 1) if steps_seen else 0, 1)
    n_layers = max(num_layers or 0, 1 + max((layer for _, layer in calls), default=0))
    values = np.full((n_layers, n_steps), np.nan)
    for (step, layer), d in calls.items():
        if step is not None:
            values[layer, step] = d
    legend = [("box", KEPT, "1 = dense (all tiles)"), ("box", _rgb(colormap(0.3)), "lower = sparser")]
    image = _heatmap(values, title, subtitle_lines, "denoising step", legend, max_size)
    image.info["title"] = title
    return image


def check_image(check, title: str, subtitle_lines=(), max_size: int = DEFAULT_SIZE, marked: int = 5) -> Image.Image:
    """Heatmap of the attention mass each (layer, head) kept at the checked steps: heads across, layers down; the
    ``marked`` worst cells under the floor framed."""
    recall = check.head_recall()
    n_layers = 1 + max(layer for layer, _ in recall)
    n_heads = 1 + max(head for _, head in recall)
    values = np.full((n_layers, n_heads), np.nan)
    for (layer, head), r in recall.items():
        values[layer, head] = r
    worst = check.worst_heads()[:marked]
    legend = [("box", KEPT, "1 = all the attention mass kept"), ("box", _rgb(colormap(0.5)), "lower = more lost"),
              ("line", TEXT_LINE, f"worst, under {check.settings.floor:.0%}")]
    image = _heatmap(values, title, subtitle_lines, "attention head", legend, max_size,
                     marked=[key for _, key in worst], missing="not checked (a dense layer)")
    image.info["title"] = title
    return image


def _heatmap(values: np.ndarray, title: str, subtitle_lines, x_label: str, legend: list, max_size: int,
             marked=(), missing: str = "no call") -> Image.Image:
    """values (layers, columns) in [0, 1] (NaN: no call) as coloured cells, layer 0 on top, a colour bar, and the
    (layer, column) cells in ``marked`` framed."""
    n_layers, n_cols = values.shape
    body, small, _ = _sizes(max_size)
    left, right = round(body * 4.2), round(body * 6.5)
    cell_w = max(1, (max_size - left - right) // n_cols)
    cell_h = int(min(max(2, round(0.55 * max_size / n_layers)), max(cell_w, 2 * line_height(font(small)))))
    pw, ph = cell_w * n_cols, cell_h * n_layers
    fig = _Figure(max(max_size, left + pw + right), max_size, title, list(subtitle_lines))
    rgb = colormap(np.nan_to_num(values, nan=0.0))
    rgb[np.isnan(values)] = MISSING
    pixels = rgb.repeat(cell_h, 0).repeat(cell_w, 1)
    if cell_w >= 6:
        pixels[:, cell_w - 1::cell_w] = BACKGROUND
    if cell_h >= 6:
        pixels[cell_h - 1::cell_h, :] = BACKGROUND
    if np.isnan(values).any():
        legend = legend + [("box", MISSING, missing)]
    tick_h = line_height(font(small)) + 8
    axis_label_h = line_height(font(body)) + 4
    legend_h = fig.legend_height(legend)
    top = fig.header_height + fig.pad // 2
    height = top + max(ph, 4 * body) + tick_h + axis_label_h + fig.pad // 2 + legend_h + fig.pad // 2
    fig.start(height)
    box = (left, top, left + pw, top + ph)
    fig.image.paste(Image.fromarray(pixels, "RGB"), box[:2])
    fig.frame(box)
    label_font = font(small)
    if cell_w >= text_size("0.00", label_font)[0] + 4 and cell_h >= line_height(label_font):
        for layer in range(n_layers):
            for col in range(n_cols):
                v = values[layer, col]
                if not np.isnan(v):
                    colour = (0, 0, 0) if v > 0.55 else (255, 255, 255)
                    fig.text((box[0] + (col + 0.5) * cell_w, box[1] + (layer + 0.5) * cell_h),
                             "1" if v >= 1 else f"{v:.2f}".lstrip("0"), size=small, fill=colour, align="center",
                             valign="middle")
    for layer, col in marked:
        x0, y0 = box[0] + col * cell_w, box[1] + layer * cell_h
        fig.draw.rectangle((x0, y0, x0 + max(cell_w - 2, 1), y0 + max(cell_h - 2, 1)), outline=TEXT_LINE,
                           width=max(1, min(3, cell_w // 6, cell_h // 6)))
    fig.x_ticks(box, _ticks(0, n_cols - 1, max(2, pw // (body * 3))), lambda v: (v + 0.5) * cell_w)
    fig.y_ticks(box, _ticks(0, n_layers - 1, max(2, ph // (body * 2))), lambda v: (v + 0.5) * cell_h)
    fig.text((box[0] + pw / 2, box[1] + ph + tick_h), x_label, align="center")
    fig.vertical_text((round(body * 1.1), box[1] + ph / 2), "layer (transformer block)")
    # colour bar: 1 on top
    bx0, bw = box[2] + round(body * 1.5), max(8, body)
    bar = colormap(np.linspace(1, 0, ph))[:, None, :].repeat(bw, 1)
    fig.image.paste(Image.fromarray(bar, "RGB"), (bx0, box[1]))
    fig.frame((bx0, box[1], bx0 + bw, box[1] + ph))
    for v in (0.0, 0.5, 1.0):
        y = box[1] + (1 - v) * (ph - 1)
        fig.draw.line((bx0 + bw, y, bx0 + bw + 4, y), fill=MUTED)
        fig.text((bx0 + bw + 6, y), _num(v), size=small, fill=MUTED, valign="middle")
    fig.legend(box[1] + max(ph, 4 * body) + tick_h + axis_label_h + fig.pad // 2, legend)
    fig.image.info.update(plot=(box[0], box[1], cell_h, cell_w))  # cell (layer, column) at x0 + column * w
    return fig.image


def timing_image(timings, title: str = "Attention time per step", subtitle_lines=(),
                 max_size: int = DEFAULT_SIZE) -> Image.Image:
    """Bars of measured video self-attention time per step (sparse and dense calls stacked), with the time the same
    calls would take all dense (calls x the median dense call) as an orange mark per step."""
    sparse_med, dense_med = timing_medians(timings)
    steps = sorted({t[0] for t in timings if t[0] is not None})
    n_steps = steps[-1] + 1 if steps else 1
    sparse_ms, dense_ms, counts = np.zeros(n_steps), np.zeros(n_steps), np.zeros(n_steps)
    for step, _, density, ms in timings:
        if step is None:
            continue
        (sparse_ms if density < 1.0 else dense_ms)[step] += ms
        counts[step] += 1
    estimate = counts * dense_med if dense_med is not None else None
    top_value = max(float((sparse_ms + dense_ms).max()), float(estimate.max()) if estimate is not None else 0.0, 1e-6)

    body = _sizes(max_size)[0]
    left, right = round(body * 5.2), body * 2
    slot = max(2, (max_size - left - right) // n_steps)
    pw, ph = slot * n_steps, round(0.5 * max_size)
    fig = _Figure(max(max_size, left + pw + right), max_size, title, list(subtitle_lines))
    legend = [("box", SPARSE_BAR, "sparse calls"), ("box", DENSE_BAR, "dense calls")]
    if estimate is not None:
        legend.append(("line", ESTIMATE, "same calls all dense (estimate)"))
    tick_h = line_height(font(fig.small)) + 8
    axis_label_h = line_height(font(body)) + 4
    top = fig.header_height + fig.pad // 2
    height = top + ph + tick_h + axis_label_h + fig.pad // 2 + fig.legend_height(legend) + fig.pad // 2
    fig.start(height)
    box = (left, top, left + pw, top + ph)
    scale = (ph - 2) / (top_value * 1.05)
    y_ticks = _ticks(0, top_value * 1.05, 5, integer=False)
    for v in y_ticks:  # light horizontal grid
        y = box[3] - v * scale
        fig.draw.line((box[0], y, box[2], y), fill=(48, 50, 56))
    bar_w = max(1, round(slot * 0.7))
    for step in range(n_steps):
        x0 = box[0] + step * slot + (slot - bar_w) // 2
        y_dense = min(box[3] - dense_ms[step] * scale, box[3] - 1)  # a bar under a pixel still shows as one
        y_sparse = y_dense - sparse_ms[step] * scale
        if dense_ms[step] > 0:
            fig.draw.rectangle((x0, y_dense, x0 + bar_w - 1, box[3] - 1), fill=DENSE_BAR)
        if sparse_ms[step] > 0:
            fig.draw.rectangle((x0, y_sparse, x0 + bar_w - 1, y_dense), fill=SPARSE_BAR)
        if estimate is not None and counts[step]:
            y = box[3] - estimate[step] * scale
            fig.draw.line((x0 - 1, y, x0 + bar_w, y), fill=ESTIMATE, width=max(2, body // 7))
    fig.frame(box)
    fig.y_ticks(box, y_ticks, lambda v: ph - v * scale)
    fig.x_ticks(box, _ticks(0, n_steps - 1, max(2, pw // (body * 3))), lambda v: (v + 0.5) * slot)
    fig.text((box[0] + pw / 2, box[3] + tick_h), "denoising step", align="center")
    fig.vertical_text((round(body * 1.1), box[1] + ph / 2), "attention time (ms)")
    fig.legend(box[3] + tick_h + axis_label_h + fig.pad // 2, legend)
    fig.image.info.update(title=title, plot=(box[0], box[1], scale, slot))  # ms -> px, px per step
    return fig.image


def message_image(title: str, lines=(), max_size: int = DEFAULT_SIZE) -> Image.Image:
    """A card with a title and a few wrapped lines: what the Inspector shows when there is nothing to draw."""
    fig = _Figure(max_size, max_size, title, list(lines))
    fig.start(max(fig.header_height + fig.pad, round(max_size * 0.3)))
    fig.image.info.update(title=title)
    return fig.image


def side_by_side(images, gap: int = 0) -> Image.Image:
    """Images next to each other, top-aligned, on the background colour."""
    width = sum(im.width for im in images) + gap * (len(images) - 1)
    out = Image.new("RGB", (width, max(im.height for im in images)), BACKGROUND)
    x = 0
    for im in images:
        out.paste(im, (x, 0))
        x += im.width + gap
    return out


def to_image_tensor(image: Image.Image) -> torch.Tensor:
    """PIL image -> ComfyUI IMAGE: float32 (1, H, W, 3) in [0, 1]."""
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0)[None]


# ----------------------------------------------------------------------------------------------------------------
# A session's pictures.

NOT_PATCHED = "This model has no Sparse Attention Patch"
NOT_RUN = "No sampling run yet"
NO_VIDEO = "No video attention in the last run"
NO_TIMING = "No attention timing in the last run"
NO_CHECK = "No check in the last run"


def _layer_layout(session, layer: int):
    """(mask, what it is) of ``layer`` in the last run: its last sparse layout, or an all-kept one if it ran dense."""
    stats = session.stats
    mask = session.block_mask(layer)
    if mask is not None:
        return mask, None
    block = session.planner.block_size
    nb = -(-stats.grid.total_tokens // block)
    if layer < session.schedule.dense_layers:
        why = f"a dense layer (dense_layers {session.schedule.dense_layers}): every tile kept in every step"
    elif stats.fallbacks:
        why = "fell back to dense in every step (" + ", ".join(stats.fallbacks) + "): every tile kept"
    else:
        why = "ran dense in every step: every tile kept"
    return torch.ones(nb, nb, dtype=torch.bool), why


def inspect(session, layer: int = 1, head: int = 0, max_size: int = DEFAULT_SIZE) -> list[Image.Image]:
    """[layout, density, timing, check] pictures of a session's last run; message cards where there is nothing to
    draw."""
    if session is None:
        card = message_image(NOT_PATCHED, [
            "Connect the MODEL output of Sparse Attention Patch (the same model the sampler used). An unpatched "
            "model, or one the patch does not know, has nothing to show (and nothing to check)."], max_size)
        return [card] * 4
    stats = session.stats
    if session.runs == 0:
        card = message_image(NOT_RUN, [
            f"{method_text(session.method)}: the patched model has not sampled yet. Connect the sampler's LATENT "
            "output to 'samples' so the Inspector runs after the sampler, then queue the workflow."], max_size)
        return [card] * 4
    if not stats.calls or stats.grid is None:
        lines = ["No video self-attention call reached the patch in the last run."] + fallback_lines(stats)
        card = message_image(NO_VIDEO, lines, max_size)
        return [card] * 4

    name = method_name(session.method)
    layers = stats.num_layers
    shown = min(max(int(layer), 0), layers - 1)
    mask, dense_why = _layer_layout(session, shown)
    head_note = "all heads share this layout" if mask.ndim == 2 else None
    if mask.ndim == 3:  # per-head layouts (later methods)
        h = min(max(int(head), 0), mask.shape[0] - 1)
        mask, head_note = mask[h], f"head {h} of {mask.shape[0]}"
    nq, nk = mask.shape
    density = float(mask.float().mean())
    title = f"{name} layout, layer {shown} of {layers}" + (" (dense)" if dense_why else "")
    if shown != layer:
        title += f" (asked for {layer})"
    block = session.planner.block_size
    sub = [f"{grid_text(stats.grid)}, block {block}: {nq} x {nk} tiles",
           f"density {density:.3f} ({100 * density:.1f}% of tiles kept)" + (f"; {head_note}" if head_note else "")]
    if dense_why:
        sub.append(f"layer {shown}: {dense_why}")
    layout = layout_image(mask, stats.grid, block, title, sub, max_size)

    dense_sub = [density_text(stats), "schedule: " + schedule_text(session.schedule, stats.total_steps, layers)]
    dense_sub += [line for line in (routing_text(stats), head_classes_text(session)) if line] + fallback_lines(stats)
    density_picture = density_image(stats.calls, stats.total_steps, layers,
                                    f"{name}: density per step and layer (last run)", dense_sub, max_size)

    if stats.timings:
        sparse_med, dense_med = timing_medians(stats.timings)
        total = sum(t[3] for t in stats.timings)
        sub = [timing_text(stats.timings)]
        if dense_med is not None:
            all_dense = dense_med * len(stats.timings)
            sub.append(f"run total {total / 1000:.3g} s against about {all_dense / 1000:.3g} s all dense: "
                       f"{all_dense / total:.2f}x faster over the run" if total > 0 else f"run total {total:.3g} ms")
        else:
            sub.append(f"run total {total / 1000:.3g} s; no dense call was measured to compare with "
                       "(dense_steps 0 and dense_layers 0)")
        timing = timing_image(stats.timings, f"{name}: video attention time per step (measured)", sub, max_size)
    else:
        timing = message_image(NO_TIMING, [
            "Attention time against dense was not measured. Turn on 'verbose' in Sparse Attention Patch to time "
            "each attention call (CUDA events; small overhead), then run the sampler again.",
            density_text(stats) + " (counted, not timed)."], max_size)
    return [layout, density_picture, timing, _check_picture(session, name, max_size)]


def _check_picture(session, name: str, max_size: int) -> Image.Image:
    check = session.check
    if check is None:
        return message_image(NO_CHECK, [
            "Wire Sparse Attention Check between Sparse Attention Patch and the sampler to measure, during the run, "
            "how much of the attention mass each layer and head keeps and how far its output moves."], max_size)
    lines = check.summary_lines(session.schedule.dense_layers)
    if not check.recall:
        return message_image(NO_CHECK, lines, max_size)
    return check_image(check, f"{name}: attention mass kept per layer and head (checked steps)", lines, max_size)
