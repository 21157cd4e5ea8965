"""LTX-2 (ComfyUI's LTXAV: video with audio) in real ComfyUI: the tiny model is built by ComfyUI's own detection
(supported_models.LTXAV, model_base.LTXAV, LTXAVModel), conditioned by ComfyUI's own nodes where they shape the
tokens (LTXVAddGuide, LTXVImgToVideoInplace, LTXVConcatAVLatent, LTXVSpatioTemporalGuidance; ID-LoRA's reference
audio), and sampled through ComfyUI's sampler, patched and unpatched.

What the pack must do there (nodes/models/ltx_av.py says how ComfyUI runs the model):
* make only the video self-attention sparse, over the video frames, with the guide tokens ComfyUI appends behind them
  dense in rows and columns; leave the audio self-attention, the text, audio-to-video and video-to-audio
  cross-attention to ComfyUI's attention, untouched;
* a layout that keeps every tile equals the unpatched model;
* stay dense, with one warning, where it cannot tell: guides that make ComfyUI split the self-attention by query
  rows with a soft key bias, a video as long as the audio or the text, a model class it does not know.

LTX-2 is not in ComfyUI 0.3.64: these tests are marked newer_comfyui (CI's run on it deselects them) and skip,
saying why, on a ComfyUI without it. Sizes: video dim 64 (2 heads of 32), audio dim 32 (2 heads of 16), 3 blocks;
latents 8 x 8 (64 tokens a frame: one 64-token block), 10 audio latent frames, 7 text tokens.
"""

from __future__ import annotations

import functools
import logging
import math

import pytest
import torch

import comfy_env
from pack import import_pack

pytestmark = [pytest.mark.comfyui, pytest.mark.newer_comfyui]

LOGGER = "sparse_video_attention"
BLOCK = 64
SIDE = 8  # latent height and width: 64 tokens a frame
AUDIO = 10  # audio latent frames: the audio self-attention's length
TEXT = 7
LAYERS = comfy_env.LTX_LAYERS
VIDEO_WIDTH = comfy_env.LTX_HEADS * comfy_env.LTX_HEAD_DIM
AUDIO_WIDTH = comfy_env.LTX_AUDIO_HEADS * comfy_env.LTX_AUDIO_HEAD_DIM
OVERRIDE_KEY = "optimized_attention_override"


@pytest.fixture(scope="module", autouse=True)
def ltx_av_in_this_comfyui(nodes):
    """Skip, saying why, on a ComfyUI without LTX-2 (0.3.64): tests marked newer_comfyui are deselected there in CI."""
    try:
        import comfy.ldm.lightricks.av_model  # noqa: F401
    except ImportError:
        import comfyui_version
        pytest.skip(f"ComfyUI {comfyui_version.__version__} has no LTX-2 (comfy.ldm.lightricks.av_model)")


@pytest.fixture(scope="module")
def core():
    return import_pack("core")


@functools.cache
def model(seed=3):
    return comfy_env.tiny_ltx_av(seed=seed)


@pytest.fixture(scope="module", autouse=True)
def release_models():
    yield
    model.cache_clear()  # while ComfyUI is still importable: its ModelPatcher.__del__ needs it


def radial(nodes, decay=0.05):
    return nodes.RadialMask().settings(decay, BLOCK, True, True)[0]


def full_layout(nodes):
    """Radial wide enough to keep every tile of up to 3 frames: the sparse path computing dense attention."""
    return radial(nodes, decay=4.0)


def patch(nodes, base, method, dense_steps=0.0, dense_layers=0, verbose=False):
    return nodes.SparseAttentionPatch().patch(base, dense_steps, 1.0, dense_layers, "reference", verbose, method,
                                              compensate="off")[0]  # the layout as it is: its oracle


def streams(out):
    """The video and audio latents of a sampled LTX-2 latent (the video alone for a latent without audio)."""
    return [out] if isinstance(out, torch.Tensor) else out.unbind()


def assert_same(a, b, **tolerance):
    for x, y in zip(streams(a), streams(b), strict=True):
        torch.testing.assert_close(x, y, **(tolerance or dict(rtol=0, atol=0)))


def warnings_of(caplog):
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno >= logging.WARNING]


class StubVAE:
    """What LTXVAddGuide asks of the video VAE: its scale factors and an encoder (seeded latents of LTX-2's shape)."""

    downscale_index_formula = (8, 32, 32)

    def encode(self, pixels):
        frames, height, width = pixels.shape[0], pixels.shape[1] // 32, pixels.shape[2] // 32
        gen = torch.Generator().manual_seed(frames * 1000 + height * 10 + width)
        return torch.randn(1, comfy_env.LTX_CHANNELS, (frames - 1) // 8 + 1, height, width, generator=gen)


def guided(frames, strength=1.0, frame_idx=0, iclora=None, seed=1, attention_mask=None):
    """Conditioning and latent of an LTX-2 run with one image guide (ComfyUI's LTXVAddGuide, then LTXVConcatAVLatent):
    (positive, negative, nested latent, nested noise mask)."""
    from comfy_extras.nodes_lt import LTXVAddGuide, LTXVConcatAVLatent
    pos, neg = comfy_env.ltx_conds(seed, text_tokens=TEXT)
    video = {"samples": torch.zeros(1, comfy_env.LTX_CHANNELS, frames, SIDE, SIDE)}
    image = torch.rand(1, SIDE * 32, SIDE * 32, 3, generator=torch.Generator().manual_seed(seed))
    pos, neg, video = LTXVAddGuide.execute(pos, neg, StubVAE(), video, image, frame_idx, strength,
                                           attention_mask=attention_mask,
                                           iclora_parameters=iclora).result
    audio = {"samples": torch.zeros(1, *comfy_env.LTX_AUDIO_SHAPE[:1], AUDIO, comfy_env.LTX_AUDIO_SHAPE[1]),
             "type": "audio"}
    joint = LTXVConcatAVLatent.execute(video, audio).result[0]
    return pos, neg, joint["samples"], joint["noise_mask"]


def sample(model_, lat, pos, neg, steps=2, seed=5, noise_mask=None, cfg=3.0):
    return comfy_env.sample(model_, lat, pos, neg, steps=steps, cfg=cfg, seed=seed, noise_mask=noise_mask)


# ------------------------------------------------------------------------------------------------------------------
# Recording the attention calls. Every call is named by its shapes: the video stream is 64 wide, the audio 32.

def role(q, k, video, audio=AUDIO, text=TEXT):
    lq, lk, width = q.shape[1], k.shape[1], q.shape[2]
    if width == VIDEO_WIDTH:
        return {(video, video): "video self-attention", (video, text): "video text cross-attention"}.get((lq, lk))
    if width == AUDIO_WIDTH:
        return {(audio, audio): "audio self-attention", (audio, text): "audio text cross-attention",
                (video, audio): "audio-to-video cross-attention",
                (audio, video): "video-to-audio cross-attention"}.get((lq, lk))
    return None


class Calls:
    """An ``optimized_attention_override``: records every call it sees (its inputs and output). ``inner`` None: it
    runs ComfyUI's attention (below the pack's hook, it sees exactly the calls the pack leaves to ComfyUI); else it
    chains ``inner`` (on top of the pack's hook, it sees every call and the pack's output)."""

    def __init__(self, inner=None):
        self.inner, self.calls = inner, []

    def __call__(self, func, *args, **kwargs):
        out = func(*args, **kwargs) if self.inner is None else self.inner(func, *args, **kwargs)
        q, k, v = args[:3]
        heads = args[3] if len(args) > 3 else kwargs["heads"]
        self.calls.append(dict(q=q.clone(), k=k.clone(), v=v.clone(), heads=heads, out=out.clone(), func=func,
                               kwargs=dict(kwargs)))
        return out

    def __deepcopy__(self, memo):  # ModelPatcher.clone() deep-copies model_options (ComfyUI 0.3.x): keep one
        return self

    def roles(self, video):
        return [role(c["q"], c["k"], video) for c in self.calls]


def recorded(base):
    """A clone of ``base`` whose every attention call is recorded (ComfyUI's attention, unchanged)."""
    clone = base.clone()
    clone.model_options.setdefault("transformer_options", {})[OVERRIDE_KEY] = calls = Calls()
    return clone, calls


def spy_attend(monkeypatch, session):
    """(grid, layer, forward context) of every call that takes the sparse path. The context itself is kept, not its
    id(): a finished forward's context is freed and the next one may get its id."""
    calls = []
    original = session.attend

    def attend(ctx, layer, q, k, v, **kwargs):
        calls.append((ctx.grid_for(q.shape[2]), layer, ctx))
        return original(ctx, layer, q, k, v, **kwargs)

    monkeypatch.setattr(session, "attend", attend)
    return calls


def oracle(call, allowed):
    """Float64 attention of a recorded (B, L, H*D) call, keys outside ``allowed`` (L, L) left out."""
    B, L, width = call["q"].shape
    H = call["heads"]
    q, k, v = (call[n].double().view(B, L, H, width // H).transpose(1, 2) for n in ("q", "k", "v"))
    s = (q @ k.transpose(-1, -2)) / math.sqrt(width // H)
    out = s.masked_fill(~allowed, float("-inf")).softmax(-1) @ v
    return out.transpose(1, 2).reshape(B, L, width)


def token_layout(block_mask, length):
    tile = torch.arange(length) // BLOCK
    return block_mask[tile][:, tile]


# ------------------------------------------------------------------------------------------------------------------

def test_detected_from_comfyuis_model_class(nodes, bridge):
    """ComfyUI's detection makes the tiny checkpoint an LTXAV (LTXAVModel); the pack's adapter is chosen by that
    class: the LTX-2 adapter, with one layer per transformer block."""
    base = model()
    diffusion_model = base.get_model_object("diffusion_model")
    assert type(base.model).__name__ == "LTXAV" and type(diffusion_model).__name__ == "LTXAVModel"
    adapter = bridge.adapter_for(diffusion_model)
    assert type(adapter).__name__ == "LTXAVAdapter" and adapter.family == "ltx2"
    assert adapter.blocks.count == LAYERS


@pytest.mark.parametrize("audio", [True, False], ids=["video-and-audio", "video-only-latent"])
def test_full_layout_equals_unpatched(nodes, bridge, core, monkeypatch, audio):
    """Every video self-attention takes the sparse path, over the 3-frame grid, and with every tile kept the video and
    audio the sampler returns are the unpatched model's; the same for a latent without audio (no audio stream)."""
    method = full_layout(nodes)
    grid = core.VideoGrid(3, SIDE, SIDE)
    assert bool(core.radial_block_mask(grid, method).all())
    pos, neg = comfy_env.ltx_conds(1, text_tokens=TEXT)
    lat = comfy_env.av_latent(3, audio_frames=AUDIO) if audio else torch.zeros(1, comfy_env.LTX_CHANNELS, 3, SIDE, SIDE)
    patched = patch(nodes, model(), method)
    session = bridge.session_of(patched)
    calls = spy_attend(monkeypatch, session)
    dense = sample(model(), lat, pos, neg, steps=3)
    sparse = sample(patched, lat, pos, neg, steps=3)
    assert {g for g, _, _ in calls} == {grid} and len(calls) == session.forwards * LAYERS == 3 * LAYERS
    assert set(session.stats.calls) == {(s, layer) for s in range(3) for layer in range(LAYERS)}
    assert not session.stats.fallbacks, session.stats.fallback_messages
    assert_same(sparse, dense, rtol=1e-4, atol=1e-4)


def test_start_image_in_the_latent(nodes, bridge, core):
    """Image to video as ComfyUI's LTX-2 template does it (LTXVImgToVideoInplace): the image's latent replaces the
    first frame, with a denoise mask that keeps it; the token grid is the video's, and a full layout equals the
    unpatched model."""
    from comfy_extras.nodes_lt import LTXVConcatAVLatent, LTXVImgToVideoInplace
    pos, neg = comfy_env.ltx_conds(7, text_tokens=TEXT)
    image = torch.rand(1, SIDE * 32, SIDE * 32, 3, generator=torch.Generator().manual_seed(7))
    video = {"samples": torch.zeros(1, comfy_env.LTX_CHANNELS, 3, SIDE, SIDE)}
    video = LTXVImgToVideoInplace.execute(StubVAE(), image, video, 1.0).result[0]
    audio = {"samples": torch.zeros(1, comfy_env.LTX_AUDIO_SHAPE[0], AUDIO, comfy_env.LTX_AUDIO_SHAPE[1])}
    joint = LTXVConcatAVLatent.execute(video, audio).result[0]
    full = patch(nodes, model(), full_layout(nodes))
    dense = sample(model(), joint["samples"], pos, neg, noise_mask=joint["noise_mask"])
    out = sample(full, joint["samples"], pos, neg, noise_mask=joint["noise_mask"])
    assert_same(out, dense, rtol=1e-4, atol=1e-4)
    stats = bridge.session_of(full).stats
    assert stats.grid == core.VideoGrid(3, SIDE, SIDE) and len(stats.calls) == 2 * LAYERS and not stats.fallbacks


def test_reference_audio_lengthens_only_the_audio_stream(nodes, bridge, core, caplog):
    """ID-LoRA's reference audio (LTXVReferenceAudio) puts its tokens in front of the audio stream: the audio
    self-attention grows, the video's does not; the video goes sparse with no warning."""
    reference = {"tokens": torch.randn(1, 4, 128, generator=torch.Generator().manual_seed(8))}
    pos, neg = comfy_env.ltx_conds(8, text_tokens=TEXT, ref_audio=reference)
    lat = comfy_env.av_latent(5, audio_frames=AUDIO)
    patched = patch(nodes, model(), radial(nodes))
    options = patched.model_options["transformer_options"]
    options[OVERRIDE_KEY] = above = Calls(options[OVERRIDE_KEY])
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        out = sample(patched, lat, pos, neg)
    session = bridge.session_of(patched)
    assert not warnings_of(caplog) and session.stats.sparse_calls == 2 * LAYERS
    assert session.stats.grid == core.VideoGrid(5, SIDE, SIDE)
    assert all(s.isfinite().all() for s in streams(out))
    audio_self = [c for c in above.calls if c["q"].shape[2] == AUDIO_WIDTH and c["q"].shape == c["k"].shape]
    assert {c["q"].shape[1] for c in audio_self} == {AUDIO + 4}


def test_sparse_run_changes_only_the_video_self_attention(nodes, bridge, core, monkeypatch):
    """A sparse Radial run: the video self-attention of every block and step is the pack's (float64 attention under
    the Radial layout); every other call reaches ComfyUI's attention (a recorder below the pack's hook sees them all,
    and no video self-attention) and returns what ComfyUI's attention returns; a call whose inputs are the
    unpatched run's has the unpatched output, bit for bit (the audio stream's first block at least)."""
    frames = 6
    grid = core.VideoGrid(frames, SIDE, SIDE)
    method = radial(nodes)
    block_mask = core.radial_block_mask(grid, method)
    assert not bool(block_mask.all())
    pos, neg = comfy_env.ltx_conds(2, text_tokens=TEXT)
    lat = comfy_env.av_latent(frames, audio_frames=AUDIO)
    below = Calls()
    base = model().clone()
    base.model_options.setdefault("transformer_options", {})[OVERRIDE_KEY] = below
    patched = patch(nodes, base, method)
    options = patched.model_options["transformer_options"]
    options[OVERRIDE_KEY] = above = Calls(options[OVERRIDE_KEY])
    session = bridge.session_of(patched)
    unpatched, reference = recorded(model())

    dense = sample(unpatched, lat, pos, neg)
    out = sample(patched, lat, pos, neg)

    V = grid.total_tokens
    assert session.stats.sparse_calls == 2 * LAYERS and not session.stats.fallbacks
    assert all(streams_ok.isfinite().all() for streams_ok in streams(out))
    assert not torch.equal(streams(out)[0], streams(dense)[0])
    others = ["video text cross-attention", "audio self-attention", "audio text cross-attention",
              "audio-to-video cross-attention", "video-to-audio cross-attention"]
    assert sorted(below.roles(V)) == sorted(others * 2 * LAYERS)  # ComfyUI's attention: everything but the video's
    assert above.roles(V) == reference.roles(V)  # the same calls in the same order as unpatched
    assert above.roles(V).count("video self-attention") == 2 * LAYERS
    allowed = token_layout(block_mask, V)
    kept_by_comfyui = iter(below.calls)
    same_inputs = set()
    for call, unpatched_call, name in zip(above.calls, reference.calls, above.roles(V)):
        if name == "video self-attention":
            torch.testing.assert_close(call["out"].double(), oracle(call, allowed), rtol=1e-5, atol=1e-5)
            continue
        comfyui_call = next(kept_by_comfyui)
        assert torch.equal(call["out"], comfyui_call["out"]) and torch.equal(call["q"], comfyui_call["q"])
        assert torch.equal(call["out"], call["func"](call["q"], call["k"], call["v"], call["heads"], **call["kwargs"]))
        if all(torch.equal(call[n], unpatched_call[n]) for n in ("q", "k", "v")):
            assert torch.equal(call["out"], unpatched_call["out"]), name
            same_inputs.add(name)
    assert {"audio self-attention", "audio text cross-attention"} <= same_inputs


def test_guide_tokens_are_dense_behind_the_video(nodes, bridge, core, monkeypatch):
    """LTXVAddGuide appends the guide image's latent frame to the video latent: the self-attention runs over the
    video frames and then the guide's tokens, which every video token attends to and which attend to everything.
    A full layout with the guide equals the unpatched model."""
    frames = 5
    pos, neg, lat, mask = guided(frames, frame_idx=8)
    assert lat.unbind()[0].shape[2] == frames + 1  # the guide: one latent frame behind the video
    grid = core.VideoGrid(frames, SIDE, SIDE, text_tokens=SIDE * SIDE)
    method = radial(nodes)
    block_mask = core.radial_block_mask(grid, method)
    patched = patch(nodes, model(), method)
    options = patched.model_options["transformer_options"]
    options[OVERRIDE_KEY] = above = Calls(options[OVERRIDE_KEY])
    session = bridge.session_of(patched)
    calls = spy_attend(monkeypatch, session)
    out = sample(patched, lat, pos, neg, noise_mask=mask)

    assert {g for g, _, _ in calls} == {grid} and session.stats.sparse_calls == 2 * LAYERS
    assert not session.stats.fallbacks, session.stats.fallback_messages
    assert all(s.isfinite().all() for s in streams(out))
    L, V = grid.total_tokens, grid.video_tokens
    allowed = token_layout(block_mask, L)
    assert bool(allowed[:, V:].all()) and bool(allowed[V:].all()) and not bool(allowed[:V, :V].all())
    video_calls = [c for c, name in zip(above.calls, above.roles(L)) if name == "video self-attention"]
    assert len(video_calls) == 2 * LAYERS
    for call in video_calls:
        torch.testing.assert_close(call["out"].double(), oracle(call, allowed), rtol=1e-5, atol=1e-5)

    short = guided(2, frame_idx=8)  # 2 frames and the guide: a full layout keeps every tile
    full = patch(nodes, model(), full_layout(nodes))
    dense = sample(model(), short[2], short[0], short[1], noise_mask=short[3])
    assert_same(sample(full, short[2], short[0], short[1], noise_mask=short[3]), dense, rtol=1e-4, atol=1e-4)
    stats = bridge.session_of(full).stats
    assert stats.grid == core.VideoGrid(2, SIDE, SIDE, text_tokens=SIDE * SIDE) and not stats.fallbacks
    assert stats.dense_calls == len(stats.calls) == 2 * LAYERS


def test_iclora_guide_tokens_left_out_by_comfyui(nodes, bridge, core):
    """An IC-LoRA guide at half resolution (reference_downscale_factor 2) is dilated to the video's size with a
    negative denoise mask on the positions it does not fill, which ComfyUI drops before the transformer: a quarter of
    the guide frame's tokens remain, and the grid counts exactly those."""
    pos, neg, lat, mask = guided(2, iclora={"reference_downscale_factor": 2})
    guide_tokens = (SIDE // 2) ** 2
    full = patch(nodes, model(), full_layout(nodes))
    dense = sample(model(), lat, pos, neg, noise_mask=mask)
    assert_same(sample(full, lat, pos, neg, noise_mask=mask), dense, rtol=1e-4, atol=1e-4)
    stats = bridge.session_of(full).stats
    assert stats.grid == core.VideoGrid(2, SIDE, SIDE, text_tokens=guide_tokens)
    assert len(stats.calls) == 2 * LAYERS and not stats.fallbacks

    sparse = patch(nodes, model(), radial(nodes))
    pos, neg, lat, mask = guided(6, iclora={"reference_downscale_factor": 2})
    out = sample(sparse, lat, pos, neg, noise_mask=mask)
    stats = bridge.session_of(sparse).stats
    assert stats.grid == core.VideoGrid(6, SIDE, SIDE, text_tokens=guide_tokens)
    assert stats.sparse_calls == 2 * LAYERS and not stats.fallbacks
    assert all(s.isfinite().all() for s in streams(out))


@pytest.mark.parametrize("guide", [dict(strength=0.5), dict(attention_mask=True)], ids=["strength", "attention-mask"])
def test_guide_attention_mask_stays_dense_with_one_warning(nodes, bridge, caplog, guide):
    """A guide with strength other than 1, or an attention mask, makes ComfyUI split the video self-attention into
    calls over some query rows each, with a soft bias on the guide keys: the forward runs exactly as unpatched, with
    one warning naming the model and why."""
    if guide.get("attention_mask"):
        guide = dict(attention_mask=torch.ones(1, SIDE * 32, SIDE * 32) * 0.5)
    pos, neg, lat, mask = guided(5, **guide)
    patched = patch(nodes, model(), radial(nodes))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        out = sample(patched, lat, pos, neg, noise_mask=mask)
    dense = sample(model(), lat, pos, neg, noise_mask=mask)
    assert_same(out, dense)
    session = bridge.session_of(patched)
    assert not session.stats.calls and session.forwards == 0
    messages = warnings_of(caplog)
    assert len(messages) == 1, messages
    why = "strength 0.5" if "strength" in guide else "attention mask"
    assert "LTXAVModel" in messages[0] and why in messages[0] and "dense" in messages[0], messages[0]


def test_stg_pass_books_each_call_to_its_block(nodes, bridge, monkeypatch):
    """LTXVSpatioTemporalGuidance runs an extra pass in which the named blocks make no self-attention. With no block
    metadata from ComfyUI, the pass's calls are booked to their blocks by the STG list: block 2 stays layer 2 (here
    sparse, past the 2 dense layers), never layer 1. A full layout with STG equals the unpatched model with STG."""
    from comfy_extras.nodes_lt import LTXVSpatioTemporalGuidance

    def stg(m):
        return LTXVSpatioTemporalGuidance.execute(m, 1.0, "1", 0.0, 1.0).result[0]

    pos, neg = comfy_env.ltx_conds(3, text_tokens=TEXT)
    lat = comfy_env.av_latent(5, audio_frames=AUDIO)
    patched = stg(patch(nodes, model(), radial(nodes), dense_layers=2))
    session = bridge.session_of(patched)
    calls = spy_attend(monkeypatch, session)
    out = sample(patched, lat, pos, neg)
    assert all(s.isfinite().all() for s in streams(out)) and not session.stats.fallbacks
    by_forward = {}
    for _, layer, forward in calls:
        by_forward.setdefault(id(forward), []).append(layer)
    assert sorted(by_forward.values()) == [[2], [2], [2], [2]]  # 2 steps: the CFG pass and the STG pass, block 2
    assert set(session.stats.calls) == {(s, layer) for s in range(2) for layer in range(LAYERS)}

    lat = comfy_env.av_latent(3, audio_frames=AUDIO)
    full = stg(patch(nodes, model(), full_layout(nodes)))
    assert_same(sample(full, lat, pos, neg), sample(stg(model()), lat, pos, neg), rtol=1e-4, atol=1e-4)
    assert not bridge.session_of(full).stats.fallbacks


@pytest.mark.parametrize("other", ["audio", "text"])
def test_video_as_long_as_another_call_stays_dense(nodes, bridge, caplog, other):
    """A resolution whose video is as long as the audio or the text: the audio self-attention (or the text
    cross-attention) has the video self-attention's shapes and cannot be told from it; the run is exactly the
    unpatched one, with one warning saying to change the size."""
    frames, side = 2, 4  # 32 video tokens
    pos, neg = comfy_env.ltx_conds(4, text_tokens=32 if other == "text" else TEXT)
    lat = comfy_env.av_latent(frames, side, side, audio_frames=32 if other == "audio" else AUDIO)
    patched = patch(nodes, model(), radial(nodes))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        out = sample(patched, lat, pos, neg)
    assert_same(out, sample(model(), lat, pos, neg))
    session = bridge.session_of(patched)
    assert not session.stats.calls and session.forwards == 0
    messages = warnings_of(caplog)
    assert len(messages) == 1, messages
    assert f"as many as the {other} tokens" in messages[0] and "change the width, height or frame count" in messages[0]


def test_unknown_model_variant_stays_dense_with_one_warning(nodes, bridge, caplog):
    """A subclass of LTXAVModel may order its tokens otherwise: dense, exactly as unpatched, one warning naming it."""
    from comfy.ldm.lightricks.av_model import LTXAVModel
    variant = comfy_env.tiny_ltx_av(seed=3)
    diffusion_model = variant.get_model_object("diffusion_model")
    diffusion_model.__class__ = type("LTXAVVariant", (LTXAVModel,), {"__module__": __name__})
    pos, neg = comfy_env.ltx_conds(5, text_tokens=TEXT)
    lat = comfy_env.av_latent(5, audio_frames=AUDIO)
    patched = patch(nodes, variant, radial(nodes))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        out = sample(patched, lat, pos, neg)
    assert_same(out, sample(model(), lat, pos, neg))
    assert not bridge.session_of(patched).stats.calls
    messages = warnings_of(caplog)
    assert len(messages) == 1 and "LTXAVVariant" in messages[0] and "dense" in messages[0], messages


def test_layout_contradicted_by_the_calls_stays_dense_with_one_warning(nodes, bridge, caplog, monkeypatch):
    """If the model's self-attention runs over another number of tokens than the layout read for it (a ComfyUI that
    changed how it lays them out), no call matches the video: every one runs on ComfyUI's attention and one warning
    names the class and the lengths."""
    base = model()
    adapter_class = type(bridge.adapter_for(base.get_model_object("diffusion_model")))
    original = adapter_class.layout

    def one_frame_short(self, video, named):
        return original(self, video[:, :, 1:], named)

    monkeypatch.setattr(adapter_class, "layout", one_frame_short)
    pos, neg = comfy_env.ltx_conds(6, text_tokens=TEXT)
    lat = comfy_env.av_latent(5, audio_frames=AUDIO)
    patched = patch(nodes, base, radial(nodes))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        out = sample(patched, lat, pos, neg)
    assert_same(out, sample(base, lat, pos, neg))
    assert not bridge.session_of(patched).stats.calls
    messages = warnings_of(caplog)
    assert len(messages) == 1, messages
    assert "LTXAVModel" in messages[0] and "320 tokens" in messages[0] and "256 of the video" in messages[0]


@pytest.mark.parametrize("method", ["radial", "svg", "svg2", "adaspa"])
def test_every_method_and_its_caches_on_ltx2(nodes, bridge, core, method):
    """Each method on LTX-2 with a guide, over two sampling runs: every sparse step and layer runs sparse over the
    grid with the guide behind the video, the method's caches are filled (and, being per run, the second run gives
    the first run's output), and the Inspector draws the layout of a sparse layer."""
    settings = {
        "radial": lambda: radial(nodes),
        "svg": lambda: nodes.SVGSettingsNode().settings(0.3, 0.05, 1, BLOCK, True)[0],
        "svg2": lambda: nodes.SVG2KMeansSettings().settings("custom", 8, 16, 0.5, 0.1, 4, 1)[0],
        "adaspa": lambda: nodes.AdaSpaSearch().settings(0.6, "0, 0.5", BLOCK, 0.0, 0.6, True)[0],
    }[method]()
    pos, neg, lat, mask = guided(5)
    grid = core.VideoGrid(5, SIDE, SIDE, text_tokens=SIDE * SIDE)
    patched = patch(nodes, model(), settings, dense_layers=1)
    session = bridge.session_of(patched)
    first = sample(patched, lat, pos, neg, steps=3, noise_mask=mask)
    stats = session.stats
    assert not stats.fallbacks, stats.fallback_messages
    assert stats.grid == grid and set(stats.calls) == {(s, layer) for s in range(3) for layer in range(LAYERS)}
    sparse_steps = range(1, 3) if method == "adaspa" else range(3)  # AdaSpa's search at step 0 computes dense
    assert {key for key, d in stats.calls.items() if d < 1.0} == {(s, layer) for s in sparse_steps
                                                                     for layer in range(1, LAYERS)}
    assert session.cache_bytes(), "the method cached nothing"
    tiles = session.block_mask(LAYERS - 1)  # what the Inspector draws (SVG2: cluster tiles)
    blocks = -(-grid.total_tokens // BLOCK)
    assert tiles is not None and tiles.dtype == torch.bool
    assert method == "svg2" or tiles.shape[-2:] == (blocks, blocks)
    layout = import_pack("core.report").inspect(session, layer=LAYERS - 1, max_size=320)[0]
    assert "layer 2 of 3" in layout.info["title"]
    second = sample(patched, lat, pos, neg, steps=3, noise_mask=mask)
    assert_same(second, first)
    assert all(s.isfinite().all() for s in streams(first))


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.records = []

    def emit(self, record):
        self.records.append(record)


def test_inspector_and_run_summary(nodes, bridge, core):
    """The Inspector node and the run summary on an LTX-2 run with a guide (verbose, 4 steps, the first step and
    layer dense): the summary counts the video and guide tokens and the calls; the Inspector's three pictures show
    the Radial layout of a layer, the density of every step and layer and the timing."""
    report, summary = import_pack("core.report"), import_pack("core.summary")
    pos, neg, lat, mask = guided(4)
    patched = nodes.SparseAttentionPatch().patch(model(), 0.25, 1.0, 1, "reference", True, radial(nodes))[0]
    handler, logger = _Collect(), logging.getLogger(LOGGER)
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        sample(patched, lat, pos, neg, steps=4, noise_mask=mask)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    text = "\n".join(r.getMessage() for r in handler.records if r.getMessage().startswith(summary.TITLE))
    grid = core.VideoGrid(4, SIDE, SIDE, text_tokens=SIDE * SIDE)
    d = float(core.radial_block_mask(grid, radial(nodes)).float().mean())
    assert "video 4x8x8 = 256 tokens + 64" in text
    assert "4 steps x 3 layers: 6 sparse and 6 dense attention calls" in text
    assert f"density {d:.3f} in sparse calls" in text and "attention time per call" in text
    assert "WARNING" not in text

    images = nodes.SparseAttentionInspector().inspect(patched, {"samples": torch.zeros(1)}, 1, 0, 384)
    assert len(images) == 4 and all(t.shape[0] == 1 and t.shape[2] == 384 and t.shape[3] == 3 for t in images)
    session = bridge.session_of(patched)
    layout, density, timing, _ = report.inspect(session, layer=1, max_size=384)
    assert layout.info["title"] == "Radial layout, layer 1 of 3" and timing.info["title"].endswith("(measured)")
    for t, picture in zip(images, (layout, density, timing)):
        assert torch.equal(t, report.to_image_tensor(picture))


def test_ltx_video_without_audio_passes_through_with_one_warning(nodes, caplog):
    """LTX-Video (LTXV, video only; also in ComfyUI 0.3.64) is not a model the pack takes: the patch returns it
    unchanged, with one warning naming its class."""
    base = comfy_env.tiny_ltxv(seed=7)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        out = patch(nodes, base, radial(nodes))
    messages = warnings_of(caplog)
    assert out is base and len(messages) == 1 and "LTXVModel" in messages[0], messages
