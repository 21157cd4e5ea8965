"""What artists see: the Sparse Attention Inspector's pictures and the run summary logged after each run.

Part 1 needs no ComfyUI: the drawing and text code in core/ (report.py, summary.py, timing.py) on hand-made
sessions. Part 2 runs a tiny Wan model through ComfyUI's sampler with the patch (reference backend on the CPU, the
shapes of test_comfy_integration.py: 5 frames of 8 x 8 tokens, one 64-token block per frame, 3 blocks), then calls
the Inspector node as ComfyUI would.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging

import numpy as np
import pytest
import torch

import comfy_env
from pack import REPO_ROOT, import_pack

core = import_pack("core")
report = import_pack("core.report")
summary = import_pack("core.summary")
timing = import_pack("core.timing")

comfyui = pytest.mark.comfyui  # skipped, loudly, without ComfyUI (conftest.py)
LOGGER = "sparse_video_attention"
GRID = core.VideoGrid(5, 8, 8)  # 320 tokens: 5 blocks of 64, one per frame
RADIAL = core.RadialSettings(decay_factor=0.2, block_size=64)


def pixel(image, x, y) -> tuple:
    return tuple(int(c) for c in np.asarray(image)[round(y), round(x)])


def tile_centre(image, i, j):
    x0, y0, py, px = image.info["plot"]
    return x0 + (j + 0.5) * px, y0 + (i + 0.5) * py


def _load_example():
    path = REPO_ROOT / "benchmarks" / "inspector_example.py"
    spec = importlib.util.spec_from_file_location("inspector_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


example = _load_example()  # benchmarks/inspector_example.py: the README picture and the run simulator


def simulated_session(grid=GRID, settings=RADIAL, steps=4, layers=3, schedule=None, backend="reference"):
    """A session after a run whose calls were booked as session.attend / record_dense book them (no attention)."""
    return example.simulated_session(grid=grid, layers=layers, steps=steps, settings=settings, backend=backend,
                                     schedule=schedule or core.SparseSchedule(dense_steps=0.25, dense_layers=1))


# ------------------------------------------------------------------------------------------------------------------
# Part 1: pure drawing and text, no ComfyUI.

def test_colormap_and_helpers():
    assert tuple(report.colormap(0.0)) == report.SKIPPED and tuple(report.colormap(1.0)) == report.KEPT
    ramp = report.colormap(np.linspace(0, 1, 50)).astype(int).sum(-1)
    assert ramp[-1] > ramp[0]  # bright for kept / dense
    assert summary.ranges([0, 1, 2, 5, 7, 8]) == "0-2, 5, 7-8" and summary.ranges([]) == "none"
    assert summary.ranges([3]) == "3"
    assert [report.nice_step(s, 5) for s in (4, 40, 591, 0.3)] == [1, 10, 200, 0.1]


def test_layout_image_shows_kept_tiles_bright():
    mask = core.radial_block_mask(GRID, RADIAL)
    assert not bool(mask.all()) and bool(mask.any())
    image = report.layout_image(mask, GRID, 64, "a layout", ["line one"], max_size=320)
    assert image.mode == "RGB" and image.width == 320
    for i in range(5):
        for j in range(5):
            want = report.KEPT if mask[i, j] else report.SKIPPED
            assert pixel(image, *tile_centre(image, i, j)) == want, (i, j)


def test_layout_image_many_tiles_averages_pixels():
    """More tiles than pixels: each pixel shows the fraction of the tiles under it; the image keeps its size."""
    mask = torch.zeros(600, 600, dtype=torch.bool)
    mask[:300, :300] = True  # top-left quarter kept
    image = report.layout_image(mask, None, None, "big", max_size=400)
    assert image.width == 400
    x0, y0, py, px = image.info["plot"]
    assert py == px < 1
    assert pixel(image, x0 + 100 * px, y0 + 100 * py) == report.KEPT
    assert pixel(image, x0 + 500 * px, y0 + 100 * py) == report.SKIPPED


def test_layout_image_frame_lines_and_text_start():
    """Frame boundaries are blended lines, the start of the text (HunyuanVideo) an orange line."""
    grid = core.VideoGrid(4, 16, 16, text_tokens=40)  # 256 tokens a frame = 4 blocks of 64, text from block 16
    mask = torch.zeros(17, 17, dtype=torch.bool)
    image = report.layout_image(mask, grid, 64, "lines", max_size=400)
    x0, y0, py, px = image.info["plot"]
    y = y0 + 2.5 * py  # a row through the middle of query block 2
    on_frame_line = pixel(image, x0 + round(4 * px), y)
    assert on_frame_line != report.SKIPPED and sum(on_frame_line) > sum(report.SKIPPED)
    assert pixel(image, x0 + round(16 * px), y) == report.TEXT_LINE
    assert pixel(image, x0 + 2.5 * px, y) == report.SKIPPED


def test_density_image_cells():
    calls = {(0, 0): 1.0, (0, 1): 1.0, (1, 0): 1.0, (1, 1): 0.25, (2, 1): 0.5}  # (2, 0) missing
    image = report.density_image(calls, total_steps=3, num_layers=2, max_size=400)
    x0, y0, ch, cw = image.info["plot"]

    def cell(layer, step):  # near the cell's top-left corner, away from the value printed in its middle
        return pixel(image, x0 + step * cw + 2, y0 + layer * ch + 2)

    assert cell(0, 0) == report.KEPT
    assert cell(1, 1) == tuple(report.colormap(0.25))
    assert cell(1, 2) == tuple(report.colormap(0.5))
    assert cell(0, 2) == report.MISSING


def test_timing_image_and_message_card():
    timings = [(0, 0, 1.0, 10.0), (0, 1, 1.0, 10.0), (1, 0, 1.0, 10.0), (1, 1, 0.3, 4.0)]
    image = report.timing_image(timings, "time", max_size=400)
    x0, y0, scale, slot = image.info["plot"]
    bottom = y0 + round(0.5 * 400)
    assert pixel(image, x0 + 0.5 * slot, bottom - 10 * scale) == report.DENSE_BAR  # step 0: 20 ms dense
    assert pixel(image, x0 + 1.5 * slot, bottom - 12 * scale) == report.SPARSE_BAR  # step 1: 10 dense + 4 sparse
    # a step whose dense time is far under a pixel (measured times vary a lot on a busy CPU) still draws
    report.timing_image([(0, 0, 1.0, 1e-4), (1, 0, 0.3, 500.0)], "time", max_size=400)
    card = report.message_image("Nothing here", ["why and what to do"], max_size=300)
    arr = np.asarray(card)
    assert card.width == 300 and card.info["title"] == "Nothing here"
    assert (arr != np.array(report.BACKGROUND)).any(axis=-1).sum() > 200  # text was drawn


def test_to_image_tensor():
    image = report.message_image("x", max_size=256)
    t = report.to_image_tensor(image)
    assert t.shape == (1, image.height, 256, 3) and t.dtype == torch.float32
    assert 0.0 <= float(t.min()) and float(t.max()) <= 1.0


def test_inspect_without_a_run_or_a_patch():
    for session, title in ((None, report.NOT_PATCHED),
                           (core.SparseAttentionSession(RADIAL, core.SparseSchedule()), report.NOT_RUN)):
        images = report.inspect(session, max_size=300)
        assert len(images) == 4 and all(im.info["title"] == title and im.width == 300 for im in images)


def test_inspect_simulated_run():
    session = simulated_session()
    layout, density, timed, _ = report.inspect(session, layer=1, max_size=400)
    assert layout.info["title"] == "Radial layout, layer 1 of 3"
    assert timed.info["title"] == report.NO_TIMING  # verbose off: nothing was timed
    dense_layout = report.inspect(session, layer=0, max_size=400)[0]
    assert dense_layout.info["title"].endswith("(dense)")
    mask = core.radial_block_mask(GRID, RADIAL)
    i, j = map(int, (~mask).nonzero()[0])
    assert pixel(layout, *tile_centre(layout, i, j)) == report.SKIPPED
    assert pixel(dense_layout, *tile_centre(dense_layout, i, j)) == report.KEPT
    clamped = report.inspect(session, layer=99, max_size=400)[0]
    assert "layer 2 of 3 (asked for 99)" in clamped.info["title"]
    # Radial: one layout for every head, whichever head is asked for
    assert np.array_equal(np.asarray(report.inspect(session, 1, head=5, max_size=400)[0]), np.asarray(layout))


def test_inspect_per_head_layouts():
    """Later methods return (H, NQ, NK) layouts: the head picks one."""
    session = simulated_session()
    heads = torch.zeros(2, 5, 5, dtype=torch.bool)
    heads[1] = True
    session.block_mask = lambda layer: heads if layer == 1 else None
    h0, h1 = (report.inspect(session, 1, head=h, max_size=300)[0] for h in (0, 1))
    assert pixel(h0, *tile_centre(h0, 2, 0)) == report.SKIPPED and pixel(h1, *tile_centre(h1, 2, 0)) == report.KEPT


def test_run_summary_text():
    session = simulated_session(steps=10, layers=4, schedule=core.SparseSchedule(dense_steps=3, dense_layers=1))
    text = core.run_summary(session)
    lines = text.splitlines()
    assert 4 <= len(lines) <= 8
    assert lines[0].startswith("sparse attention run summary: Radial (decay_factor 0.2, block_size 64")
    assert "dense steps 0-2 (3 of 10), dense layers 0 (1 of 4)" in text
    d = float(core.radial_block_mask(GRID, RADIAL).float().mean())
    overall = (21 * d + 19) / 40
    assert f"density {d:.3f} in sparse calls, {overall:.3f} overall" in text
    assert f"attention FLOPs saved {100 * (1 - overall):.1f}%" in text
    assert "WARNING" not in text and "time" not in text

    session.warn_once("no-triton", "no Triton here")
    session.warn_once("no-triton", "no Triton here")
    session.stats.timings = [(5, 1, d, 2.0), (0, 0, 1.0, 6.0)]
    text = core.run_summary(session)
    assert "WARNING: fell back to dense attention: no-triton (x2): no Triton here" in text
    assert "sparse 2 ms, dense 6 ms: speed-up 3.00x" in text


def test_run_summary_without_calls():
    session = core.SparseAttentionSession(RADIAL, core.SparseSchedule())
    session.begin_run()
    session.warn_once("cross-length", "as long as the text")
    text = core.run_summary(session)
    assert "no video self-attention call" in text and "cross-length (x1): as long as the text" in text


def test_call_timer_and_timed_override_on_cpu():
    """The timing wrapper keys each video self-attention call (the ones the session records) and skips the rest."""
    session = core.SparseAttentionSession(RADIAL, core.SparseSchedule(), verbose=True)
    assert isinstance(session.timer, timing.CallTimer)
    assert core.SparseAttentionSession(RADIAL, core.SparseSchedule()).timer is None  # off: nothing timed
    session.begin_run()
    ctx = session.forward_context(core.VideoGrid(2, 4, 4), 1.0, [1.0, 0.0])

    def inner(func, *args, **kwargs):
        if kwargs.pop("video"):
            session.record_sparse(ctx, 7, ctx.video, 0.4)
        return func(*args)

    timed = timing.timed_override(session, inner, core.CONTEXT_KEY)
    q = torch.ones(2, 2)
    options = {core.CONTEXT_KEY: ctx}
    assert torch.equal(timed(torch.add, q, q, video=True, transformer_options=options), q + q)
    timed(torch.add, q, q, video=False, transformer_options=options)  # not booked: not timed
    session.end_run()
    assert len(session.stats.timings) == 1
    step, layer, density, ms = session.stats.timings[0]
    assert (step, layer, density) == (0, 7, 0.4) and ms >= 0.0


def test_end_run_logs_the_summary(caplog):
    session = simulated_session()
    with caplog.at_level(logging.INFO, logger=LOGGER):
        session.end_run()
    records = [r for r in caplog.records if r.name == LOGGER]
    assert len(records) == 1 and records[0].levelno == logging.INFO
    assert records[0].getMessage().startswith(summary.TITLE) and session.stats.finished


def test_run_stats_hold_no_tensors():
    """The session keeps only small Python values from a run: no q/k, no device tensors."""
    session = simulated_session()
    for f in dataclasses.fields(session.stats):
        value = getattr(session.stats, f.name)
        items = list(value.items()) if isinstance(value, dict) else value if isinstance(value, list) else [value]
        assert not any(isinstance(x, torch.Tensor) for item in items
                       for x in (item if isinstance(item, tuple) else (item,))), f.name


def test_example_picture_script(tmp_path, monkeypatch):
    """benchmarks/inspector_example.py (the README picture) runs on a CPU and writes a small PNG."""
    session = example.simulated_session(grid=core.VideoGrid(9, 16, 16), layers=6, steps=8)  # small: fast
    layout, density, _, _ = report.inspect(session, layer=1, max_size=300)
    out = tmp_path / "example.png"
    report.side_by_side([layout, density]).save(out)
    assert out.stat().st_size < 300_000
    readme_picture = REPO_ROOT / "docs" / "inspector_radial_wan720p.png"  # made by the script's defaults
    assert readme_picture.is_file() and readme_picture.stat().st_size < 300_000


# ------------------------------------------------------------------------------------------------------------------
# Part 2: through ComfyUI's sampler and the Inspector node.

def patched_wan(nodes, backend="reference", verbose=False, seed=50):
    method = nodes.RadialMask().settings(0.2, 64, True, True)[0]
    model = comfy_env.tiny_wan_t2v(seed=seed)
    patched = nodes.SparseAttentionPatch().patch(model, 0.25, 1.0, 1, backend, verbose, method)[0]
    return model, patched


@pytest.fixture(scope="module")
def sampled(nodes, bridge):
    """One verbose run of 4 steps: step 0 and layer 0 dense, the rest sparse. The log records are kept."""
    model, patched = patched_wan(nodes, verbose=True)
    pos, neg = comfy_env.wan_conds(seed=51)
    handler = _Collect()
    logger = logging.getLogger(LOGGER)
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        out = comfy_env.sample(patched, torch.zeros(1, 16, 5, 16, 16), pos, neg, steps=4, seed=52)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    return dict(model=model, patched=patched, session=bridge.session_of(patched), out=out, records=handler.records)


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.records = []

    def emit(self, record):
        self.records.append(record)


def run_inspector(nodes, model, layer=1, head=0, max_size=384):
    return nodes.SparseAttentionInspector().inspect(model, {"samples": torch.zeros(1)}, layer, head, max_size)


@comfyui
def test_inspector_node_definition(nodes):
    cls = nodes.NODE_CLASS_MAPPINGS["SparseAttentionInspector"]
    assert nodes.NODE_DISPLAY_NAME_MAPPINGS["SparseAttentionInspector"] == "Sparse Attention Inspector"
    assert cls.CATEGORY == "model_patches/sparse_attention" and cls.RETURN_TYPES == ("IMAGE",) * 4
    required = cls.INPUT_TYPES()["required"]
    assert required["model"][0] == "MODEL" and required["samples"][0] == "LATENT"
    assert "share" in required["head"][1]["tooltip"]  # Radial layouts are shared by heads: the tooltip says so


@comfyui
def test_inspector_after_a_run(nodes, sampled):
    session = sampled["session"]
    assert session.stats.sparse_calls == 3 * 2 and session.stats.finished and session.stats.timings
    images = run_inspector(nodes, sampled["patched"], layer=1, max_size=384)
    assert len(images) == 4
    for t in images:
        assert t.ndim == 4 and t.shape[0] == 1 and t.shape[2] == 384 and t.shape[3] == 3
        assert t.dtype == torch.float32 and 0.0 <= float(t.min()) and float(t.max()) <= 1.0
    pictures = report.inspect(session, layer=1, max_size=384)  # the same pictures, as PIL, with their geometry
    for t, picture in zip(images, pictures):
        assert torch.equal(t, report.to_image_tensor(picture))
    layout, density, timed, check = pictures
    assert check.info["title"] == report.NO_CHECK  # no Sparse Attention Check was wired
    assert layout.info["title"] == "Radial layout, layer 1 of 3"
    assert timed.info["title"].endswith("(measured)")  # verbose: the run was timed

    mask = core.radial_block_mask(GRID, RADIAL)
    assert not bool(mask.all())
    for i in range(mask.shape[0]):
        for j in range(mask.shape[1]):
            want = report.KEPT if mask[i, j] else report.SKIPPED
            assert pixel(layout, *tile_centre(layout, i, j)) == want, (i, j)

    dense = run_inspector(nodes, sampled["patched"], layer=0, max_size=384)[0]
    assert not torch.equal(dense, images[0])  # layer 0 ran dense: every tile kept
    dense_pic = report.inspect(session, layer=0, max_size=384)[0]
    i, j = map(int, (~mask).nonzero()[0])
    assert pixel(dense_pic, *tile_centre(dense_pic, i, j)) == report.KEPT

    x0, y0, ch, cw = density.info["plot"]
    d = float(mask.float().mean())
    assert pixel(density, x0 + 0 * cw + 2, y0 + 1 * ch + 2) == report.KEPT  # step 0 dense
    assert pixel(density, x0 + 2 * cw + 2, y0 + 1 * ch + 2) == tuple(report.colormap(d))  # step 2, layer 1 sparse
    assert pixel(density, x0 + 2 * cw + 2, y0 + 0 * ch + 2) == report.KEPT  # layer 0 dense


@comfyui
def test_run_summary_in_the_log(sampled):
    text = "\n".join(r.getMessage() for r in sampled["records"] if r.getMessage().startswith(summary.TITLE))
    d = float(core.radial_block_mask(GRID, RADIAL).float().mean())
    overall = (6 * d + 6) / 12
    assert "Radial (decay_factor 0.2, block_size 64, attention_sink on, text_dense on), backend reference" in text
    assert "video 5x8x8 = 320 tokens; 4 steps x 3 layers: 6 sparse and 6 dense attention calls" in text
    assert "dense steps 0 (1 of 4), dense layers 0 (1 of 3)" in text
    assert f"density {d:.3f} in sparse calls, {overall:.3f} overall" in text
    assert f"attention FLOPs saved {100 * (1 - overall):.1f}%" in text
    assert "attention time per call (median, measured): sparse" in text and "WARNING" not in text
    assert 5 <= len(text.splitlines()) <= 8


@comfyui
def test_inspector_before_a_run_and_on_an_unpatched_model(nodes, bridge):
    """No crash: a card saying why there is nothing to show, as every output."""
    model, patched = patched_wan(nodes, seed=53)
    cards = {}
    for m, session, title in ((patched, bridge.session_of(patched), report.NOT_RUN), (model, None, report.NOT_PATCHED)):
        pictures = report.inspect(session, max_size=320)
        assert all(p.info["title"] == title for p in pictures)
        images = run_inspector(nodes, m, max_size=320)
        for t, picture in zip(images, pictures):
            assert t.shape[0] == 1 and t.shape[2] == 320 and t.shape[3] == 3 and t.dtype == torch.float32
            assert torch.equal(t, report.to_image_tensor(picture))
        cards[title] = images[0]
    assert not torch.equal(cards[report.NOT_RUN], cards[report.NOT_PATCHED])
    assert run_inspector(nodes, object(), max_size=320)[0].shape[2] == 320  # not even a ModelPatcher: a card


@comfyui
def test_fallback_in_the_summary(nodes, bridge, caplog):
    """backend auto on the CPU: no Triton kernel for these tensors, every call runs dense; the summary says why."""
    _, patched = patched_wan(nodes, backend="auto", seed=54)
    pos, neg = comfy_env.wan_conds(seed=55)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        comfy_env.sample(patched, torch.zeros(1, 16, 5, 16, 16), pos, neg, steps=2, seed=56)
    summaries = [r.getMessage() for r in caplog.records
                 if r.name == LOGGER and r.getMessage().startswith(summary.TITLE)]
    assert len(summaries) == 1
    text = summaries[0]
    assert "WARNING: fell back to dense attention: no-triton (x2)" in text and "Triton" in text
    assert "no sparse call, 1.000 overall: attention FLOPs saved 0.0%" in text
    assert "time" not in text  # verbose off: nothing was timed
    session = bridge.session_of(patched)
    assert session.timer is None
    override = patched.model_options["transformer_options"]["optimized_attention_override"]
    assert override.__name__ == "override"  # the plain dispatcher: no timing wrapper without verbose
    layout = report.inspect(session, layer=1, max_size=320)[0]
    assert layout.info["title"].endswith("(dense)")
