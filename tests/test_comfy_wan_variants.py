"""The Wan variants in real ComfyUI: each built tiny by ComfyUI's own detection from the keys that mark it (VACE, Fun
Control's ``ref_conv``, HuMo, Animate, S2V, SCAIL) or given the conditioning that changes its token layout (Phantom's
``time_dim_concat``, Bernini's ``context_latents``), sampled through ComfyUI's sampler, patched and unpatched.

Supported: self-attention over video frames, plus whole frames of the same grid in front (Fun's reference image) or
behind (Phantom's subjects, HuMo's reference). A layout that keeps every tile through the sparse path must give the
unpatched model's output; a sparse one must make every layer sparse over the grid counting those frames.
Unsupported: tokens that are not whole frames of the grid (S2V's motion, SCAIL's pose, Bernini's in-context
latents): attention stays dense, exactly as unpatched, with one warning naming the model class and why.

Sizes: dim 64, 2 heads of 32; latents 16 x 16 (8 x 8 tokens: one 64-token block per frame).
"""

from __future__ import annotations

import functools
import inspect
import logging
from dataclasses import dataclass

import pytest
import torch

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
    return nodes.SparseAttentionPatch().patch(model, 0.0, 1.0, 0, "reference", False, method)[0]


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


def wan_class(name):
    import comfy.ldm.wan.model as wan
    return getattr(wan, name, None)


@functools.cache
def model(name):
    """One tiny model per variant for the whole module (patching clones it; the original is never changed)."""
    return getattr(comfy_env, name)(seed=3)


@pytest.fixture(scope="module", autouse=True)
def release_models():
    yield
    model.cache_clear()  # while ComfyUI is still importable: its ModelPatcher.__del__ needs it


def spy_attend(monkeypatch, session):
    """Record the grid and layer of every sparse-path call of ``session`` and pass it through."""
    calls = []
    original = session.attend

    def attend(ctx, layer, q, k, v, **kwargs):
        calls.append((ctx.grid_for(q.shape[2]), layer))
        return original(ctx, layer, q, k, v, **kwargs)

    monkeypatch.setattr(session, "attend", attend)
    return calls


# ------------------------------------------------------------------------------------------------------------------
# The variants: how to build each and condition it for ``frames`` latent frames.

@dataclass(frozen=True)
class Variant:
    name: str
    builder: str  # comfy_env function
    layers: int  # video self-attention calls per forward
    extra_frames: int = 0  # whole frames of the grid the model adds to the video's
    conds: object = None  # (frames) -> extra values of the positive and negative conditioning
    clip_tokens: int | None = None
    needs: str | None = None  # a wan model class this variant needs in the ComfyUI under test
    needs_cond: str | None = None  # a conditioning key WAN21.extra_conds must know
    reason: str = ""  # unsupported: what the warning says


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


def scail_conds(frames):
    # SCAIL: a reference frame in front, pose latents at half resolution behind
    values = dict(reference_latents=[noise(30, 1, 16, 1, SIDE, SIDE)],
                  pose_video_latent=noise(31, 1, 16, frames, SIDE // 2, SIDE // 2))
    return values, values


def bernini_conds(frames):
    # BerniniConditioning: an in-context reference image at its own aspect ratio behind the video
    values = dict(context_latents=[noise(32, 1, 16, 1, 12, 20)])
    return values, values


VACE_CALLS = comfy_env.WAN_VACE_LAYERS + comfy_env.WAN_VACE_BLOCKS  # 4 blocks, 2 VACE blocks: 6 self-attentions

SUPPORTED = [
    Variant("vace", "tiny_wan_vace", VACE_CALLS, conds=vace_conds),
    Variant("phantom", "tiny_wan_t2v", comfy_env.WAN_LAYERS, extra_frames=2, conds=phantom_conds),
    Variant("fun_control_ref", "tiny_wan22_fun_control", comfy_env.WAN_LAYERS, extra_frames=1, conds=fun_control_conds),
    Variant("humo", "tiny_wan_humo", comfy_env.WAN_LAYERS, extra_frames=1, conds=humo_conds),
    Variant("animate", "tiny_wan_animate", comfy_env.WAN_LAYERS, conds=animate_conds, clip_tokens=4),
]

UNSUPPORTED = [
    Variant("s2v", "tiny_wan_s2v", comfy_env.WAN_LAYERS, conds=s2v_conds, needs="WanModel_S2V",
            reason="motion-frame tokens"),
    Variant("scail", "tiny_wan_scail", comfy_env.WAN_LAYERS, conds=scail_conds, clip_tokens=4, needs="SCAILWanModel",
            reason="pose tokens"),
    Variant("context_latents", "tiny_wan_t2v", comfy_env.WAN_LAYERS, conds=bernini_conds, needs_cond="context_latents",
            reason="context_latents"),
]


def require(variant):
    """Skip a variant this ComfyUI does not have (a version without it, not a missing ComfyUI)."""
    if variant.needs is not None and wan_class(variant.needs) is None:
        pytest.skip(f"ComfyUI {comfyui_version()} has no {variant.needs}")
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
# Supported: a layout that keeps every tile equals the unpatched model; a sparse one covers the extra frames.

@comfyui
@pytest.mark.parametrize("variant", SUPPORTED, ids=lambda v: v.name)
def test_full_layout_equals_unpatched(nodes, bridge, core, monkeypatch, variant):
    frames = 3 - variant.extra_frames  # 3 frames in all: Radial with decay 4 keeps every tile
    method = radial(nodes, decay=4.0)
    grid = core.VideoGrid(3, 8, 8)
    assert bool(core.radial_block_mask(grid, method).all())

    dense, sparse, session, calls = run(variant, nodes, bridge, method, frames, monkeypatch)

    assert session.forwards >= STEPS
    assert len(calls) == session.forwards * variant.layers  # every video self-attention took the sparse path
    assert {grid_ for grid_, _ in calls} == {grid}
    assert set(session.stats.calls) == every_call(variant)  # booked every (step, layer)
    assert all(density == 1.0 for density in session.stats.calls.values())
    assert not session.stats.fallbacks, session.stats.fallback_messages
    torch.testing.assert_close(sparse, dense, rtol=1e-4, atol=1e-4)


@comfyui
@pytest.mark.parametrize("variant", SUPPORTED, ids=lambda v: v.name)
def test_radial_sparse_over_the_whole_frames(nodes, bridge, core, monkeypatch, variant):
    frames = 5
    grid = core.VideoGrid(frames + variant.extra_frames, 8, 8)
    method = radial(nodes, decay=0.05)
    assert not bool(core.radial_block_mask(grid, method).all())

    dense, sparse, session, calls = run(variant, nodes, bridge, method, frames, monkeypatch)

    assert session.stats.grid == grid
    assert {grid_ for grid_, _ in calls} == {grid}
    assert set(session.stats.calls) == every_call(variant)
    assert session.stats.sparse_calls == len(session.stats.calls)  # every layer of every step sparse
    assert not session.stats.fallbacks, session.stats.fallback_messages
    assert torch.isfinite(sparse).all()
    assert not torch.equal(sparse, dense)


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
    assert {grid for grid, _ in calls} == {core.VideoGrid(7, 8, 8), core.VideoGrid(5, 8, 8)}
    assert len(calls) == 4 * comfy_env.WAN_LAYERS and not session.stats.fallbacks
    assert torch.isfinite(out).all()


# ------------------------------------------------------------------------------------------------------------------
# Unsupported: dense, exactly as unpatched, one warning naming the model and why.

NEWER = {"scail", "context_latents"}  # models and inputs ComfyUI added after 0.3.64 (deselected in CI's run on it)


@comfyui
@pytest.mark.parametrize("variant", [pytest.param(v, id=v.name, marks=[pytest.mark.newer_comfyui] * (v.name in NEWER))
                                     for v in UNSUPPORTED])
def test_unsupported_stays_dense_with_one_warning(nodes, bridge, caplog, monkeypatch, variant):
    require(variant)
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
    assert class_name in warnings[0] and variant.reason in warnings[0] and "dense" in warnings[0], warnings[0]
