"""How one forward's attention calls are placed: non-video tokens in front of the video (HunyuanVideo's text since
ComfyUI 0.33), layers from ComfyUI's block metadata, what ComfyUI reports checked against the layout, and one
session serving several devices at once (ComfyUI's multi-GPU work units). No ComfyUI needed.
"""

from __future__ import annotations

import logging
import math
import threading

import pytest
import torch

from pack import import_pack
from test_radial import dense_attention as comfy_attention  # a stand-in for ComfyUI's attention function

core = import_pack("core")
dispatcher = import_pack("core.dispatcher")

VideoGrid, BlockLayers = core.VideoGrid, core.BlockLayers
LOGGER = "sparse_video_attention"
GRID = VideoGrid(5, 8, 8, text_tokens=20)  # 320 video tokens, then 20 text: 6 blocks of 64


def session(decay=0.05, **schedule):
    settings = core.RadialSettings(decay_factor=decay, block_size=64, attention_sink=False)
    return core.SparseAttentionSession(settings, core.SparseSchedule(**{"dense_steps": 0, "dense_layers": 0,
                                                                        **schedule}), backend="reference")


def padded_text_mask(length: int, text_at: int, text: int, valid: int) -> torch.Tensor:
    """ComfyUI's additive key mask (1, 1, L): the last text - valid tokens of the text (at ``text_at``) are padding."""
    mask = torch.zeros(1, 1, length)
    mask[..., text_at + valid: text_at + text] = -torch.finfo(torch.float32).max
    return mask


def oracle(q, k, v, allowed, mask):
    """Float64 attention over (B, H, L, D) where a key is ``allowed`` (L, L) for its query and not masked out."""
    s = torch.einsum("bhqd,bhkd->bhqk", q.double(), k.double()) / math.sqrt(q.shape[-1])
    s = s.masked_fill(~allowed, float("-inf")) + mask.double().view(1, 1, 1, -1)
    return torch.einsum("bhqk,bhkd->bhqd", s.softmax(-1), v.double())


@pytest.mark.parametrize("chunk_bytes", [None, 1])  # whole call, or one head at a time
def test_text_in_front_equals_the_planners_layout_in_the_models_order(monkeypatch, chunk_bytes):
    """Text first (ComfyUI 0.33 HunyuanVideo): the output is the Radial layout of video-then-text, carried to the
    model's order token by token, with the padding mask over the text in front."""
    if chunk_bytes is not None:
        monkeypatch.setattr(dispatcher, "STAGE_CHUNK_BYTES", chunk_bytes)
    gen = torch.Generator().manual_seed(0)
    B, H, D, L, T = 2, 2, 32, GRID.total_tokens, GRID.text_tokens
    q, k, v = (torch.randn(B, H, L, D, generator=gen) for _ in range(3))
    mask = padded_text_mask(L, 0, T, valid=13)
    s = session()
    ctx = s.forward_context(GRID, 1.0, [1.0, 0.0], leading_tokens=T)
    out = core.attention_override(s)(comfy_attention, q, k, v, H, mask=mask, skip_reshape=True,
                                     transformer_options={core.CONTEXT_KEY: ctx})
    assert s.stats.sparse_calls == 1 and not s.stats.fallbacks
    block_mask = core.radial_block_mask(GRID, s.method)
    assert not bool(block_mask.all())
    planners_position = (torch.arange(L) - T) % L  # model order -> video first, then text
    tile = planners_position // 64
    allowed = block_mask[tile][:, tile]
    assert bool(allowed[:, :T].all()) and bool(allowed[:T].all())  # text rows and columns dense
    want = oracle(q, k, v, allowed, mask)
    assert out.shape == (B, L, H * D)
    torch.testing.assert_close(out.view(B, L, H, D).transpose(1, 2).double(), want, rtol=1e-5, atol=1e-5)


def test_text_in_front_or_behind_give_the_same_attention():
    """The same tokens in either order: the same output per token."""
    gen = torch.Generator().manual_seed(1)
    B, H, D, L, T = 1, 2, 32, GRID.total_tokens, GRID.text_tokens
    q, k, v = (torch.randn(B, L, H * D, generator=gen) for _ in range(3))
    behind = session()
    ctx = behind.forward_context(GRID, 1.0, [1.0, 0.0])
    out_behind = core.attention_override(behind)(comfy_attention, q, k, v, heads=H,
                                                 transformer_options={core.CONTEXT_KEY: ctx})
    front = session()
    ctx = front.forward_context(GRID, 1.0, [1.0, 0.0], leading_tokens=T)
    roll = (torch.arange(L) - T) % L  # text-first position p holds video-first token roll[p]
    out_front = core.attention_override(front)(comfy_attention, q[:, roll], k[:, roll], v[:, roll], heads=H,
                                               transformer_options={core.CONTEXT_KEY: ctx})
    torch.testing.assert_close(out_front, out_behind[:, roll], rtol=1e-6, atol=1e-6)


def test_leading_tokens_cannot_exceed_the_non_video_tokens():
    with pytest.raises(ValueError, match="leading_tokens"):
        core.ForwardContext(video=VideoGrid(2, 4, 4, text_tokens=3), step=0, total_steps=2, leading_tokens=4)


# ------------------------------------------------------------------------------------------------------------------
# Layers from ComfyUI's block metadata.

def test_layers_from_block_metadata_and_the_counter_without_it():
    blocks = BlockLayers(offsets={"double": 0, "single": 2}, count=4)
    ctx = core.ForwardContext(video=GRID, step=0, total_steps=2, blocks=blocks)
    assert ctx.layer_of({"block_type": "single", "block_index": 1}) == 3
    assert ctx.layer_of({"block_type": "double", "block_index": 0}) == 0
    # a second self-attention in a block (VACE's context block reuses its block's index): a layer of its own
    assert ctx.layer_of({"block_type": "double", "block_index": 0}) == 4
    assert ctx.layer_of({"block_type": "double", "block_index": 0}) == 5
    counted = core.ForwardContext(video=GRID, step=0, total_steps=2)
    assert [counted.layer_of({}) for _ in range(3)] == [0, 1, 2]
    unknown = core.ForwardContext(video=GRID, step=0, total_steps=2, blocks=blocks)
    assert unknown.layer_of({"block_type": "triple", "block_index": 0}) == 0  # a type this model never reports


def test_block_metadata_gives_the_layer_when_another_node_takes_some_calls():
    """The layer schedule follows the blocks even when earlier blocks' calls never reach the patch."""
    s = session(dense_layers=2)
    blocks = BlockLayers(offsets={"double": 0}, count=4)
    ctx = s.forward_context(VideoGrid(5, 8, 8), 1.0, [1.0, 0.0], blocks=blocks)
    override = core.attention_override(s)
    x = torch.randn(1, 320, 64)
    for index in (2, 3):  # blocks 0 and 1 were served elsewhere
        override(comfy_attention, x, x, x, heads=2,
                 transformer_options={core.CONTEXT_KEY: ctx, "block_type": "double", "block_index": index})
    assert set(s.stats.calls) == {(0, 2), (0, 3)} and s.stats.sparse_calls == 2


def test_a_reported_layout_that_contradicts_the_pack_keeps_attention_dense(caplog):
    s = session()
    grid = VideoGrid(5, 8, 8, text_tokens=20)
    override = core.attention_override(s)
    q = torch.randn(1, 2, grid.total_tokens, 32)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        for _ in range(2):
            ctx = s.forward_context(grid, 1.0, [1.0, 0.0], leading_tokens=20, reported={"img_slice": (20, 340)})
            out = override(comfy_attention, q, q, q, 2, skip_reshape=True,
                           transformer_options={core.CONTEXT_KEY: ctx, "img_slice": [12, 340]})
            torch.testing.assert_close(out, comfy_attention(q, q, q, 2, skip_reshape=True))
    assert not s.stats.calls and s.layout_error is not None
    messages = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert len(messages) == 1 and "img_slice (12, 340)" in messages[0] and "(20, 340)" in messages[0]
    agreeing = session()
    ctx = agreeing.forward_context(grid, 1.0, [1.0, 0.0], leading_tokens=20, reported={"img_slice": (20, 340)})
    core.attention_override(agreeing)(comfy_attention, q, q, q, 2, skip_reshape=True,
                                      transformer_options={core.CONTEXT_KEY: ctx, "img_slice": [20, 340]})
    assert agreeing.stats.sparse_calls == 1


def test_blocks_whose_self_attention_is_not_the_video_are_reported(caplog):
    s = session()
    blocks = BlockLayers(offsets={"double": 0}, count=3)
    ctx = s.forward_context(VideoGrid(5, 8, 8), 1.0, [1.0, 0.0], blocks=blocks)
    override = core.attention_override(s)
    video, other = torch.randn(1, 320, 64), torch.randn(1, 256, 64)
    options = {core.CONTEXT_KEY: ctx, "block_type": "double"}
    override(comfy_attention, other, other, other, heads=2, transformer_options={**options, "block_index": 0})
    override(comfy_attention, video, video, video, heads=2, transformer_options={**options, "block_index": 0})
    override(comfy_attention, other, other, other, heads=2, transformer_options={**options, "block_index": 1})
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        s.end_forward(ctx, "SomeWanVariant")
    messages = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    # block 0 also held the video (a side stream such as a pose branch is fine); block 1 never did
    assert len(messages) == 1 and "SomeWanVariant" in messages[0] and "1 blocks" in messages[0]
    assert "256" in messages[0] and "stay dense" in messages[0]


def test_a_run_whose_calls_never_reach_the_hook_says_so(caplog):
    s = session()
    s.begin_run()
    s.forward_context(VideoGrid(5, 8, 8), 1.0, [1.0, 0.0])  # the model ran, no call came to the override
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        s.end_run()
    assert any("no attention call of this model reached the patch" in r.getMessage() for r in caplog.records)


def test_a_stood_down_session_passes_every_call_through(caplog):
    s = session()
    s.begin_run()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        s.stand_down("another node does it")
        s.stand_down("another node does it")
    ctx = s.forward_context(VideoGrid(5, 8, 8), 1.0, [1.0, 0.0])
    x = torch.randn(1, 320, 64)
    out = core.attention_override(s)(comfy_attention, x, x, x, heads=2, transformer_options={core.CONTEXT_KEY: ctx})
    torch.testing.assert_close(out, comfy_attention(x, x, x, 2))
    assert not s.stats.calls and [r.getMessage() for r in caplog.records].count(
        "sparse attention: another node does it") == 1
    s.begin_run()
    assert s.stood_down is None  # decided again at every run's start


# ------------------------------------------------------------------------------------------------------------------
# One session, several devices (ComfyUI's multi-GPU work units run one patched model in a thread per GPU).

def test_each_device_gets_its_own_planner():
    s = session()
    first = s.planner_for("cpu")
    assert first is s.planner and s.planner_for(torch.device("cpu")) is first
    other = s.planner_for("meta")
    assert other is not first and type(other) is type(first)
    assert s.planners() == [first, other]


def test_threads_on_several_devices_book_every_call(monkeypatch):
    """Two device threads running forwards at once: every call booked, each thread on its own planner."""
    s = session()
    seen = {}
    original = s.planner_for

    def planner_for(device):  # the CPU stands in for two GPUs: the thread name picks the device key
        key = "cpu" if threading.current_thread().name == "gpu0" else "meta"
        planner = original(key)
        seen.setdefault(threading.current_thread().name, set()).add(id(planner))
        return planner

    monkeypatch.setattr(s, "planner_for", planner_for)
    override = core.attention_override(s)
    blocks = BlockLayers(offsets={"double": 0}, count=3)
    s.begin_run()
    sigmas = [1.0, 0.5, 0.0]
    errors = []

    def work():
        try:
            gen = torch.Generator().manual_seed(threading.current_thread().ident % 1000)
            for step in range(2):
                ctx = s.forward_context(VideoGrid(5, 8, 8), sigmas[step], sigmas, blocks=blocks)
                for index in range(3):
                    x = torch.randn(1, 320, 64, generator=gen)
                    override(comfy_attention, x, x, x, heads=2, transformer_options={
                        core.CONTEXT_KEY: ctx, "block_type": "double", "block_index": index})
        except Exception as why:  # noqa: BLE001 (reported below)
            errors.append(why)

    threads = [threading.Thread(target=work, name=f"gpu{i}") for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert set(s.stats.calls) == {(step, layer) for step in range(2) for layer in range(3)}
    assert len(seen["gpu0"]) == len(seen["gpu1"]) == 1 and seen["gpu0"] != seen["gpu1"]
