"""The Wan variants in real ComfyUI: each built tiny by ComfyUI's own detection from the keys that mark it (VACE, Fun
Control's ``ref_conv``, HuMo, Animate, S2V, SCAIL; Animate 2 by its metadata) or given the conditioning that changes
its token layout (Phantom's ``time_dim_concat``, Bernini's ``context_latents``), sampled through ComfyUI's sampler,
patched and unpatched.

Supported: self-attention over video frames, plus whole frames of the same grid in front (Fun's and SCAIL's
reference images) or behind (Phantom's subjects, HuMo's and S2V's references), plus tokens of other sizes behind the
video (S2V's motion, SCAIL's pose, Bernini's in-context latents), which the planners take as text: dense rows and
columns. A layout that keeps every tile through the sparse path must give the unpatched model's output; a sparse
one must make every layer sparse over the grid counting those frames and tokens.
Unsupported (Animate 2 given pose frames, S2V on a ComfyUI whose S2V blocks never see the attention options):
attention stays dense, exactly as unpatched, with one warning naming the model class and why.

Sizes: dim 64, 2 heads of 32; latents 16 x 16 (8 x 8 tokens: one 64-token block per frame).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import json
import logging
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

import comfy_env
from pack import import_pack

comfyui = pytest.mark.comfyui  # skipped, loudly, without ComfyUI (conftest.py)

LOGGER = "sparse_video_attention"
BLOCK = 64
SIDE = 16  # latent height and width: 8 x 8 tokens per frame
STEPS = 3


@pytest.fixture(scope="module")
def core():
    return import_pack("core")


def radial(nodes, decay):
    return nodes.RadialMask().settings(decay, BLOCK, True, True)[0]


def patch(nodes, model, method):
    return nodes.SparseAttentionPatch().patch(model, 0.0, 1.0, 0, "reference", False, method,
                                              compensate="off")[0]  # the layout as it is: its oracle


def latent(frames, channels=16, side=SIDE):
    return torch.zeros(1, channels, frames, side, side)


def noise(seed, *shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def with_values(conds, **values):
    """A copy of a conditioning with ``values`` added to each entry's dict (as ComfyUI's conditioning nodes do)."""
    return [[tensor, {**extra, **values}] for tensor, extra in conds]


def comfyui_version() -> str:
    import comfyui_version as version  # the ComfyUI root is on sys.path (comfy_env.setup)
    return version.__version__


def wan_class(name, module="model"):
    try:
        return getattr(importlib.import_module(f"comfy.ldm.wan.{module}"), name, None)
    except ImportError:
        return None


def blocks_get_attention_options(cls) -> bool:
    """Whether a Wan class hands its blocks ComfyUI's attention options (0.3.x's S2V does not), read off its source."""
    return "transformer_options=transformer_options" in inspect.getsource(cls.forward_orig)


def tiny_wan_animate2(seed: int = 0):
    """Wan Animate 2 (supported_models.WAN_Animate2, WanAnimate2Model; ComfyUI 0.33+): a Wan 2.1 I2V checkpoint
    whose metadata names the model type, which is how ComfyUI's detection tells the two apart."""
    import comfy.model_detection
    state_dict = {key: torch.empty(shape) for key, shape in comfy_env.wan_checkpoint(in_dim=36, i2v=True).items()}
    metadata = {"config": json.dumps({"transformer": {"model_type": "animate2"}})}
    config = comfy.model_detection.model_config_from_unet(state_dict, "", metadata=metadata)
    config.unet_config.update(dim=comfy_env.WAN_DIM, num_heads=comfy_env.WAN_HEADS, ffn_dim=comfy_env.WAN_FFN,
                              freq_dim=32, text_dim=comfy_env.WAN_TEXT_DIM, text_len=16)
    return comfy_env.build(config, seed)


@functools.cache
def model(name):
    """One tiny model per variant for the whole module (patching clones it; the original is never changed)."""
    builder = globals().get(name) or getattr(comfy_env, name)
    return builder(seed=3)


@pytest.fixture(scope="module", autouse=True)
def release_models():
    yield
    model.cache_clear()  # while ComfyUI is still importable: its ModelPatcher.__del__ needs it


@dataclass(frozen=True)
class SparseCall:
    """One call through the sparse path: its grid and layer, (B, H, L, D) q, k, v and what it returned."""
    grid: object
    layer: int
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    out: torch.Tensor


def spy_attend(monkeypatch, session):
    """Record every sparse-path call of ``session`` and pass it through."""
    calls = []
    original = session.attend

    def attend(ctx, layer, q, k, v, **kwargs):
        out, density = original(ctx, layer, q, k, v, **kwargs)
        calls.append(SparseCall(ctx.grid_for(q.shape[2]), layer, q, k, v, out.clone()))
        return out, density

    monkeypatch.setattr(session, "attend", attend)
    return calls


# ------------------------------------------------------------------------------------------------------------------
# The variants: how to build each and condition it for ``frames`` latent frames.

@dataclass(frozen=True)
class Variant:
    name: str
    builder: str  # a tiny-model builder, of this module or comfy_env
    layers: int  # video self-attention calls per forward
    extra_frames: int = 0  # whole frames of the grid the model adds to the video's
    conds: object = None  # (frames) -> extra values of the positive and negative conditioning
    appended: object = None  # (frames) -> tokens of other sizes the model puts behind the video (the grid's text)
    clip_tokens: int | None = None
    needs: tuple | None = None  # (module, class) of comfy.ldm.wan this variant needs in the ComfyUI under test
    needs_cond: str | None = None  # a conditioning key WAN21.extra_conds must know

    def grid(self, core, frames):
        """The grid of a run over ``frames`` video latent frames."""
        text = 0 if self.appended is None else self.appended(frames)
        return core.VideoGrid(frames + self.extra_frames, 8, 8, text)


def vace_conds(frames):
    # WanVaceToVideo's control video (inactive and reactive latents) and mask; a reference image would be a frame of
    # the latent itself, nothing the model sees differently.
    values = dict(vace_frames=[noise(21, 1, 32, frames, SIDE, SIDE)], vace_mask=[torch.ones(1, 64, frames, SIDE, SIDE)],
                  vace_strength=[1.0])
    return values, values


def phantom_conds(frames):
    # WanPhantomSubjectToVideo: the subject images' latents, two frames, concatenated behind the video in time
    values = dict(time_dim_concat=noise(22, 1, 16, 2, SIDE, SIDE))
    return values, values


def fun_control_conds(frames):
    # Wan22FunControlToVideo with a reference image: the control latent (and start image slot) as channels, the
    # reference image's latent as reference_latents (one frame, turned into tokens in front by ref_conv)
    values = dict(concat_latent_image=noise(23, 1, 32, frames, SIDE, SIDE),
                  concat_mask=torch.ones(1, 4, frames, SIDE, SIDE), concat_mask_index=16,
                  reference_latents=[noise(24, 1, 16, 1, SIDE, SIDE)])
    return values, values


def humo_conds(frames):
    # WanHuMoImageToVideo (1.7B): the reference image's latent (frames behind the video) and the audio embedding
    # (whisper features per latent frame; zeros for the negative)
    reference = [noise(25, 1, 16, 1, SIDE, SIDE)]
    audio = noise(26, 1, frames, 8, 5, 1280)
    return dict(reference_latents=reference, audio_embed=audio), \
        dict(reference_latents=reference, audio_embed=torch.zeros_like(audio))


def animate_conds(frames):
    # WanAnimateToVideo: frame 0 of the latent is the reference image's slot; pose latents are added to frames 1..
    values = dict(pose_video_latent=noise(27, 1, 16, frames - 1, SIDE, SIDE))
    return values, values


def s2v_conds(frames):
    # WanSoundImageToVideo: a reference frame and FramePack motion latents (19 frames at three resolutions)
    values = dict(reference_latents=[noise(28, 1, 16, 1, SIDE, SIDE)],
                  reference_motion=noise(29, 1, 16, 19, SIDE, SIDE))
    return values, values


def s2v_reference_other_size_conds(frames):
    # S2V given a reference latent of another size than the video's (ComfyUI's node resizes it; the model does not)
    values = dict(reference_latents=[noise(34, 1, 16, 1, 12, 20)],
                  reference_motion=noise(29, 1, 16, 19, SIDE, SIDE))
    return values, values


def scail_conds(frames):
    # SCAIL: a reference frame in front, pose latents at half resolution behind
    values = dict(reference_latents=[noise(30, 1, 16, 1, SIDE, SIDE)],
                  pose_video_latent=noise(31, 1, 16, frames, SIDE // 2, SIDE // 2))
    return values, values


def animate2_conds(frames):
    # WanAnimate2ToVideo with a pose video: its latents for every frame but frame 0 (the reference image's slot)
    values = dict(pose_video_latent=noise(33, 1, 16, frames - 1, SIDE, SIDE))
    return values, values


def bernini_conds(frames):
    # BerniniConditioning: an in-context reference image at its own aspect ratio behind the video
    values = dict(context_latents=[noise(32, 1, 16, 1, 12, 20)])
    return values, values


VACE_CALLS = comfy_env.WAN_VACE_LAYERS + comfy_env.WAN_VACE_BLOCKS  # 4 blocks, 2 VACE blocks: 6 self-attentions
S2V = ("model", "WanModel_S2V")

# The tokens each variant appends behind the video, counted by hand from ComfyUI's code (8 x 8 tokens per frame):
# S2V's FramePack motion: its nearest frame at (1, 2, 2) -> 8 x 8, the next 2 frames at (2, 4, 4) -> 1 x 4 x 4, the
# farthest 16 at (4, 8, 8) -> 4 x 2 x 2; SCAIL's pose at half resolution, (1, 2, 2) -> 4 x 4 a frame; a 12 x 20
# latent (S2V's reference of another size, Bernini's reference) -> 6 x 10.
S2V_MOTION = 8 * 8 + 4 * 4 + 4 * 2 * 2
APPENDED = [
    Variant("s2v", "tiny_wan_s2v", comfy_env.WAN_LAYERS, extra_frames=1, conds=s2v_conds,
            appended=lambda frames: S2V_MOTION, needs=S2V),
    Variant("s2v_reference_other_size", "tiny_wan_s2v", comfy_env.WAN_LAYERS, conds=s2v_reference_other_size_conds,
            appended=lambda frames: 6 * 10 + S2V_MOTION, needs=S2V),
    Variant("scail", "tiny_wan_scail", comfy_env.WAN_LAYERS, extra_frames=1, conds=scail_conds,
            appended=lambda frames: frames * 4 * 4, clip_tokens=4, needs=("model", "SCAILWanModel")),
    Variant("context_latents", "tiny_wan_t2v", comfy_env.WAN_LAYERS, conds=bernini_conds,
            appended=lambda frames: 6 * 10, needs_cond="context_latents"),
]

SUPPORTED = [
    Variant("vace", "tiny_wan_vace", VACE_CALLS, conds=vace_conds),
    Variant("phantom", "tiny_wan_t2v", comfy_env.WAN_LAYERS, extra_frames=2, conds=phantom_conds),
    Variant("fun_control_ref", "tiny_wan22_fun_control", comfy_env.WAN_LAYERS, extra_frames=1, conds=fun_control_conds),
    Variant("humo", "tiny_wan_humo", comfy_env.WAN_LAYERS, extra_frames=1, conds=humo_conds),
    Variant("animate", "tiny_wan_animate", comfy_env.WAN_LAYERS, conds=animate_conds, clip_tokens=4),
    *APPENDED,
]


def params(variants):
    """pytest params of ``variants``: those that need more than ComfyUI 0.3.64 offers are marked newer_comfyui
    (deselected in CI's run on it)."""
    return [pytest.param(v, id=v.name, marks=[pytest.mark.newer_comfyui] * (v.needs is not None or
                                                                           v.needs_cond is not None))
            for v in variants]


def require(variant):
    """Skip a variant this ComfyUI does not have or does not let the patch see (a version without it, not a missing
    ComfyUI)."""
    if variant.needs is not None:
        cls = wan_class(variant.needs[1], variant.needs[0])
        if cls is None:
            pytest.skip(f"ComfyUI {comfyui_version()} has no {variant.needs[1]}")
        if not blocks_get_attention_options(cls):
            pytest.skip(f"ComfyUI {comfyui_version()}'s {variant.needs[1]} does not pass the attention options to its "
                        "blocks: the patch cannot see its attention (tested dense)")
    if variant.needs_cond is not None:
        import comfy.model_base
        if variant.needs_cond not in inspect.getsource(comfy.model_base.WAN21.extra_conds):
            pytest.skip(f"ComfyUI {comfyui_version()} does not pass {variant.needs_cond} to Wan")


def conditioned(variant, frames, seed=1):
    pos, neg = comfy_env.wan_conds(seed, clip_tokens=variant.clip_tokens)
    extra_pos, extra_neg = variant.conds(frames)
    return with_values(pos, **extra_pos), with_values(neg, **extra_neg)


def run(variant, nodes, bridge, method, frames, monkeypatch):
    """(unpatched output, patched output, session, sparse-path calls) of one seeded run of ``variant``."""
    base = model(variant.builder)
    lat = latent(frames)
    pos, neg = conditioned(variant, frames)
    patched = patch(nodes, base, method)
    session = bridge.session_of(patched)
    calls = spy_attend(monkeypatch, session)
    dense = comfy_env.sample(base, lat, pos, neg, steps=STEPS, seed=5)
    sparse = comfy_env.sample(patched, lat, pos, neg, steps=STEPS, seed=5)
    return dense, sparse, session, calls


def every_call(variant):
    return {(step, layer) for step in range(STEPS) for layer in range(variant.layers)}


# ------------------------------------------------------------------------------------------------------------------
# Supported: a layout that keeps every tile equals the unpatched model; a sparse one covers the extra frames and takes
# the appended tokens as text.

@comfyui
@pytest.mark.parametrize("variant", params(SUPPORTED))
def test_full_layout_equals_unpatched(nodes, bridge, core, monkeypatch, variant):
    require(variant)
    frames = 3 - variant.extra_frames  # 3 frames in all: Radial with decay 4 keeps every tile
    method = radial(nodes, decay=4.0)
    grid = variant.grid(core, frames)
    assert grid.frames == 3 and bool(core.radial_block_mask(grid, method).all())

    dense, sparse, session, calls = run(variant, nodes, bridge, method, frames, monkeypatch)

    assert session.forwards >= STEPS
    assert len(calls) == session.forwards * variant.layers  # every video self-attention took the sparse path
    assert {call.grid for call in calls} == {grid}
    assert set(session.stats.calls) == every_call(variant)  # booked every (step, layer)
    assert all(density == 1.0 for density in session.stats.calls.values())
    assert not session.stats.fallbacks, session.stats.fallback_messages
    torch.testing.assert_close(sparse, dense, rtol=1e-4, atol=1e-4)


@comfyui
@pytest.mark.parametrize("variant", params(SUPPORTED))
def test_radial_sparse_over_the_whole_frames(nodes, bridge, core, monkeypatch, variant):
    require(variant)
    frames = 5
    grid = variant.grid(core, frames)
    method = radial(nodes, decay=0.05)
    assert not bool(core.radial_block_mask(grid, method).all())

    dense, sparse, session, calls = run(variant, nodes, bridge, method, frames, monkeypatch)

    assert session.stats.grid == grid
    assert {call.grid for call in calls} == {grid}
    assert set(session.stats.calls) == every_call(variant)
    assert session.stats.sparse_calls == len(session.stats.calls)  # every layer of every step sparse
    assert not session.stats.fallbacks, session.stats.fallback_messages
    assert torch.isfinite(sparse).all()
    assert not torch.equal(sparse, dense)


@comfyui
@pytest.mark.parametrize("variant", params(APPENDED))
def test_appended_tokens_keep_dense_rows_and_columns(nodes, bridge, core, monkeypatch, variant):
    """Each sparse call over a variant with appended tokens: its layout keeps the rows and columns of those tokens
    whole while the video part is sparse, and its output is attention under that layout (so the appended tokens'
    rows equal dense attention)."""
    require(variant)
    frames = 5
    grid = variant.grid(core, frames)
    method = radial(nodes, decay=0.05)
    _, _, session, calls = run(variant, nodes, bridge, method, frames, monkeypatch)

    assert calls and {call.grid for call in calls} == {grid}
    video, length = grid.video_tokens, grid.total_tokens
    assert video % BLOCK == 0  # whole frames of 64 tokens: the first text block holds only appended tokens
    blocks = core.radial_block_mask(grid, method)
    assert blocks[video // BLOCK:].all() and blocks[:, video // BLOCK:].all()
    assert not blocks[:video // BLOCK, :video // BLOCK].all()
    keep = blocks.repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)[:length, :length]
    for call in calls:
        torch.testing.assert_close(call.out, F.scaled_dot_product_attention(call.q, call.k, call.v, attn_mask=keep),
                                   rtol=1e-5, atol=1e-5)
        dense_rows = F.scaled_dot_product_attention(call.q[:, :, video:], call.k, call.v)
        torch.testing.assert_close(call.out[:, :, video:], dense_rows, rtol=1e-5, atol=1e-5)


@comfyui
def test_vace_blocks_get_layers_of_their_own(nodes, bridge, core):
    """A VACE block's self-attention (over the VACE context, as long as the video) follows its main block with the
    same block_index on ComfyUI 0.33+: it is booked under a layer past the model's blocks, never under the main
    block's. Without block metadata (0.3.x) every call is a layer in call order."""
    variant = SUPPORTED[0]
    base = model(variant.builder)
    pos, neg = conditioned(variant, 5)
    patched = patch(nodes, base, radial(nodes, decay=0.05))
    session = bridge.session_of(patched)
    options = patched.model_options["transformer_options"]
    inner = options["optimized_attention_override"]
    seen = []

    class Outer:  # on top of the pack's hook: what ComfyUI reports with each self-attention, and the layer booked
        def __call__(self, func, *args, **kwargs):
            out = inner(func, *args, **kwargs)
            opts = kwargs["transformer_options"]
            if args[0].shape == args[1].shape:
                seen.append((opts.get("block_index"), opts[core.CONTEXT_KEY].last_call[1]))
            return out

        def __deepcopy__(self, memo):
            return self

    options["optimized_attention_override"] = Outer()
    comfy_env.sample(patched, latent(5), pos, neg, steps=1, seed=5)

    diffusion_model = base.model.diffusion_model
    assert sorted(diffusion_model.vace_layers_mapping) == [0, 2]
    if "block_index" in inspect.getsource(type(diffusion_model).forward_orig):  # ComfyUI 0.33+
        # each VACE block right after its main block (0 and 2), with the same index, booked past the 4 blocks
        assert [index for index, _ in seen] == [0, 0, 1, 2, 2, 3]
        assert [layer for _, layer in seen] == [0, 4, 1, 2, 5, 3]
    else:  # no block metadata (0.3.x): layers in call order
        assert [index for index, _ in seen] == [None] * VACE_CALLS
        assert [layer for _, layer in seen] == list(range(VACE_CALLS))
    assert set(layer for _, layer in session.stats.calls) == set(range(VACE_CALLS))
    assert session.stats.sparse_calls == VACE_CALLS and not session.stats.fallbacks


@comfyui
def test_phantom_negative_without_subjects(nodes, bridge, core, monkeypatch):
    """WanPhantomSubjectToVideo's text-only negative has no subject frames: cond and uncond then run as separate
    forwards of different lengths, each sparse over its own grid."""
    variant = SUPPORTED[1]
    base = model(variant.builder)
    pos, neg = comfy_env.wan_conds(1)
    pos = with_values(pos, **phantom_conds(5)[0])
    patched = patch(nodes, base, radial(nodes, decay=0.05))
    session = bridge.session_of(patched)
    calls = spy_attend(monkeypatch, session)
    out = comfy_env.sample(patched, latent(5), pos, neg, steps=2, seed=5)

    assert session.forwards == 4
    assert {call.grid for call in calls} == {core.VideoGrid(7, 8, 8), core.VideoGrid(5, 8, 8)}
    assert len(calls) == 4 * comfy_env.WAN_LAYERS and not session.stats.fallbacks
    assert torch.isfinite(out).all()


# ------------------------------------------------------------------------------------------------------------------
# Unsupported: dense, exactly as unpatched, one warning naming the model and why.

def assert_dense_with_one_warning(variant, nodes, bridge, caplog, monkeypatch, reason):
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        dense, sparse, session, calls = run(variant, nodes, bridge, radial(nodes, decay=0.05), 5, monkeypatch)

    torch.testing.assert_close(sparse, dense, rtol=0, atol=1e-6)
    assert not calls and not session.stats.calls
    # The layout is refused before the forward runs, so no forward counts as reaching the patch: ComfyUI 0.3.64's
    # S2V, whose blocks never pass the attention options on, gets no "no attention call ... reached" warning either.
    assert session.forwards == 0
    warnings = [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno >= logging.WARNING]
    class_name = type(model(variant.builder).model.diffusion_model).__name__
    assert len(warnings) == 1, warnings
    assert class_name in warnings[0] and reason in warnings[0] and "dense" in warnings[0], warnings[0]


@comfyui
def test_s2v_whose_blocks_miss_the_attention_options_stays_dense(nodes, bridge, caplog, monkeypatch):
    """ComfyUI 0.3.x's S2V runs its blocks without the attention options: the patch could never see their calls.
    On a ComfyUI whose S2V passes them (tested sparse above) the adapter is shown such an S2V."""
    variant = APPENDED[0]
    if blocks_get_attention_options(wan_class(S2V[1])):
        monkeypatch.setattr(import_pack("nodes.models.wan"), "_passes_attention_options", lambda cls: False)
    assert_dense_with_one_warning(variant, nodes, bridge, caplog, monkeypatch,
                                  reason="does not pass ComfyUI's attention options")


@comfyui
@pytest.mark.newer_comfyui
def test_animate2_with_pose_frames_stays_dense(nodes, bridge, caplog, monkeypatch):
    """Animate 2 given pose frames runs its generation attention per frame: no self-attention over a grid."""
    variant = Variant("animate2", "tiny_wan_animate2", comfy_env.WAN_LAYERS, conds=animate2_conds, clip_tokens=4,
                      needs=("model_animate2", "WanAnimate2Model"))
    require(variant)
    assert_dense_with_one_warning(variant, nodes, bridge, caplog, monkeypatch, reason="runs its generation attention "
                                  "per frame")
