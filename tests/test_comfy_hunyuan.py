"""HunyuanVideo in real ComfyUI, on whichever ComfyUI the tests run against: its text after the video (0.3.x) or in
front of it (0.33 and later), with and without a text padding mask, T2V and the I2V inputs (start-image channels,
reference-latent frames in front of the video, the "v2 replace" guiding frame).

Where the text sits is read from ComfyUI's own padding mask in each call (the padded text keys), never from the
pack: the sparse output must be the pack's Radial layout carried to exactly those positions.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch

import comfy_env
from pack import import_pack

comfyui = pytest.mark.comfyui
LOGGER = "sparse_video_attention"
BLOCK = 64
OVERRIDE_KEY = "optimized_attention_override"


@pytest.fixture(scope="module")
def core():
    return import_pack("core")


def radial(nodes, decay=0.05):
    return nodes.RadialMask().settings(decay, BLOCK, False, True)[0]


def patch(nodes, model, method, dense_steps=0.0, dense_layers=0):
    return nodes.SparseAttentionPatch().patch(model, dense_steps, 1.0, dense_layers, "reference", False, method,
                                              compensate="off")[0]  # the layout as it is: its oracle


def latent(frames=3, channels=16):
    return torch.zeros(1, channels, frames, 16, 16)


class OuterRecorder:
    """An override on top of the pack's hook (applied after the patch, chaining it): records every call in the
    model's own token order, with what ComfyUI passes along."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def __call__(self, func, *args, **kwargs):
        out = self.inner(func, *args, **kwargs)
        options = kwargs.get("transformer_options") or {}
        q, k, v = args[:3]
        self.calls.append(dict(q=q.clone(), k=k.clone(), v=v.clone(), mask=kwargs.get("mask"), out=out.clone(),
                               img_slice=options.get("img_slice"), block_type=options.get("block_type")))
        return out

    def __deepcopy__(self, memo):  # ModelPatcher.clone() deep-copies model_options (ComfyUI 0.3.x)
        return self

    @classmethod
    def on(cls, patched):
        options = patched.model_options["transformer_options"]
        options[OVERRIDE_KEY] = recorder = cls(options[OVERRIDE_KEY])
        return recorder


def text_start(call, text: int, length: int) -> int:
    """Where the text sits in a call, from ComfyUI's key padding mask (its padded keys end the text)."""
    padded = (call["mask"].reshape(-1, length)[0] < -1e30).nonzero().flatten()
    assert len(padded), "the call has no padded key"
    return int(padded.max()) + 1 - text


def oracle(call, allowed):
    q, k, v = (call[n].double() for n in ("q", "k", "v"))
    s = torch.einsum("bhqd,bhkd->bhqk", q, k) / math.sqrt(q.shape[-1])
    s = s.masked_fill(~allowed, float("-inf")) + call["mask"].double().reshape(1, 1, 1, -1)
    out = torch.einsum("bhqk,bhkd->bhqd", s.softmax(-1), v)
    return out.transpose(1, 2).reshape(out.shape[0], out.shape[2], -1)  # (B, L, H*D), as HunyuanVideo asks


@comfyui
def test_sparse_layout_lands_on_the_text_where_comfyui_puts_it(nodes, bridge, core):
    """Radial with a padding mask: every video self-attention call equals the pack's layout carried to the model's
    order, the text (wherever this ComfyUI puts it) dense in rows and columns."""
    text, valid = 12, 7
    pos, neg = comfy_env.hunyuan_conds(seed=1, text_tokens=text, valid_tokens=valid)
    patched = patch(nodes, comfy_env.tiny_hunyuan_video(seed=2), radial(nodes))
    recorder = OuterRecorder.on(patched)
    out = comfy_env.sample(patched, latent(frames=5), pos, neg, steps=2, cfg=1.0, seed=3)
    session = bridge.session_of(patched)
    grid = core.VideoGrid(5, 8, 8, text_tokens=text)
    layers = comfy_env.HUNYUAN_DOUBLE + comfy_env.HUNYUAN_SINGLE
    assert torch.isfinite(out).all() and session.stats.sparse_calls == 2 * layers and not session.stats.fallbacks

    L, V = grid.total_tokens, grid.video_tokens
    calls = [c for c in recorder.calls if c["q"].shape[2] == L]
    assert len(calls) == 2 * layers
    block_mask = session.block_mask(layers - 1)
    assert not bool(block_mask.all())
    for call in calls:
        start = text_start(call, text, L)
        assert start in (0, V)  # in front of the video (ComfyUI 0.33+) or behind it (0.3.x)
        if call["img_slice"] is not None:  # single blocks of newer ComfyUI say where the video is: behind the text
            assert start == 0 and list(call["img_slice"]) == [text, L]
        position = torch.arange(L)
        is_text = (position >= start) & (position < start + text)
        planners = torch.where(is_text, V + position - start, position - text * (position >= start + text).long())
        tile = planners // BLOCK
        allowed = block_mask[tile][:, tile]
        assert bool(allowed[:, is_text].all()) and bool(allowed[is_text].all())
        torch.testing.assert_close(call["out"].double(), oracle(call, allowed), rtol=1e-5, atol=1e-5)
    assert {text_start(c, text, L) for c in calls} == {0 if bridge.adapter_for(
        patched.get_model_object("diffusion_model")).text_first else V}


@comfyui
@pytest.mark.parametrize("valid", [12, None], ids=["mask-without-padding", "no-mask"])
def test_full_layout_equals_unpatched_without_padding(nodes, bridge, valid):
    pos, neg = comfy_env.hunyuan_conds(seed=4, text_tokens=12, valid_tokens=valid)
    base = comfy_env.tiny_hunyuan_video(seed=5)
    patched = patch(nodes, base, full_layout(nodes))
    dense = comfy_env.sample(base, latent(), pos, neg, steps=2, cfg=1.0, seed=6)
    sparse = comfy_env.sample(patched, latent(), pos, neg, steps=2, cfg=1.0, seed=6)
    session = bridge.session_of(patched)
    assert len(session.stats.calls) == 2 * (comfy_env.HUNYUAN_DOUBLE + comfy_env.HUNYUAN_SINGLE)
    assert not session.stats.fallbacks
    torch.testing.assert_close(sparse, dense, rtol=1e-4, atol=1e-4)


def _ref_latent(frames=1):
    return torch.randn(1, 16, frames, 16, 16, generator=torch.Generator().manual_seed(7))


def full_layout(nodes):
    """Radial wide enough to keep every tile of up to 3 frames: the sparse path computing dense attention."""
    return nodes.RadialMask().settings(4.0, BLOCK, False, True)[0]


@comfyui
@pytest.mark.parametrize("extra, frames", [
    (dict(ref_latent=_ref_latent()), 1),            # "custom" I2V: the start image's frame in front of the video
    (dict(ref_latent=_ref_latent(2)), 2),
    (dict(guiding_frame_index=0), 0),               # "v2 (replace)": the first frame is the image, no extra tokens
], ids=["ref-latent", "ref-latent-2-frames", "guiding-frame"])
def test_i2v_inputs_read_by_name(nodes, bridge, core, extra, frames):
    """I2V arguments are read by name: reference-latent frames join the video grid in front, the guiding frame index
    changes nothing of the layout; a full layout equals the unpatched model, a sparse one runs every layer."""
    pos, neg = comfy_env.hunyuan_conds(seed=8, text_tokens=12, valid_tokens=9, **extra)
    base = comfy_env.tiny_hunyuan_video(seed=9)
    layers = comfy_env.HUNYUAN_DOUBLE + comfy_env.HUNYUAN_SINGLE
    short = latent(frames=3 - frames)
    full = patch(nodes, base, full_layout(nodes))
    dense = comfy_env.sample(base, short, pos, neg, steps=2, cfg=1.0, seed=10)
    torch.testing.assert_close(comfy_env.sample(full, short, pos, neg, steps=2, cfg=1.0, seed=10), dense,
                               rtol=1e-4, atol=1e-4)
    stats = bridge.session_of(full).stats
    assert stats.grid == core.VideoGrid(3, 8, 8, text_tokens=12) and len(stats.calls) == 2 * layers

    sparse = patch(nodes, base, radial(nodes))
    out = comfy_env.sample(sparse, latent(frames=5), pos, neg, steps=2, cfg=1.0, seed=10)
    session = bridge.session_of(sparse)
    assert torch.isfinite(out).all() and not session.stats.fallbacks
    assert session.stats.sparse_calls == 2 * layers
    assert session.stats.grid == core.VideoGrid(5 + frames, 8, 8, text_tokens=12)


@comfyui
def test_i2v_model_with_image_channels(nodes, bridge):
    """HunyuanVideo I2V (33 input channels: noise, start-image latent, mask): the same layout as T2V."""
    image = torch.randn(1, 16, 5, 16, 16, generator=torch.Generator().manual_seed(11))
    pos, neg = comfy_env.hunyuan_conds(seed=12, text_tokens=12, valid_tokens=7, concat_latent_image=image)
    base = comfy_env.tiny_hunyuan_video_i2v(seed=13)
    assert type(base.model).__name__ == "HunyuanVideoI2V"
    patched = patch(nodes, base, radial(nodes))
    out = comfy_env.sample(patched, latent(frames=5), pos, neg, steps=2, cfg=1.0, seed=14)
    session = bridge.session_of(patched)
    assert torch.isfinite(out).all() and not session.stats.fallbacks
    assert session.stats.sparse_calls == 2 * (comfy_env.HUNYUAN_DOUBLE + comfy_env.HUNYUAN_SINGLE)


@comfyui
def test_layers_follow_the_blocks(nodes, bridge):
    """Double blocks are layers 0.., single blocks follow them, on every ComfyUI (block metadata or the counter)."""
    pos, neg = comfy_env.hunyuan_conds(seed=15)
    patched = patch(nodes, comfy_env.tiny_hunyuan_video(seed=16), radial(nodes), dense_layers=1)
    comfy_env.sample(patched, latent(frames=5), pos, neg, steps=2, cfg=1.0, seed=17)
    session = bridge.session_of(patched)
    layers = comfy_env.HUNYUAN_DOUBLE + comfy_env.HUNYUAN_SINGLE
    assert set(session.stats.calls) == {(s, l) for s in range(2) for l in range(layers)}
    assert {l for (s, l), d in session.stats.calls.items() if d >= 1.0} == {0}


def _unknown_arguments(self, args, kwargs):
    return None


def _unreadable_model(self, x, named):
    raise AttributeError("'HunyuanVideo' object has no attribute 'byt5_in'")


@comfyui
@pytest.mark.parametrize("method, replacement, words", [
    ("arguments", _unknown_arguments, ("HunyuanVideo", "arguments")),  # ComfyUI calls it with other arguments
    ("layout", _unreadable_model, ("byt5_in", "stays dense")),           # ComfyUI changed the model's attributes
], ids=["unknown-arguments", "unreadable-model"])
def test_a_changed_model_stays_dense_with_one_warning(nodes, bridge, caplog, monkeypatch, method, replacement, words):
    """A ComfyUI whose HunyuanVideo the adapter cannot read: the run finishes dense, with one warning naming it."""
    pos, neg = comfy_env.hunyuan_conds(seed=18)
    base = comfy_env.tiny_hunyuan_video(seed=19)
    patched = patch(nodes, base, radial(nodes))
    monkeypatch.setattr(type(bridge.adapter_for(base.get_model_object("diffusion_model"))), method, replacement)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        out = comfy_env.sample(patched, latent(), pos, neg, steps=2, cfg=1.0, seed=20)
        dense = comfy_env.sample(base, latent(), pos, neg, steps=2, cfg=1.0, seed=20)
    torch.testing.assert_close(out, dense, rtol=0, atol=0)
    assert not bridge.session_of(patched).stats.calls
    messages = [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]
    assert len(messages) == 1 and all(word in messages[0] for word in words)
