"""HunyuanVideo 1.5 in real ComfyUI (0.33+): tiny models built by ComfyUI's own detection from the keys that make it
pick supported_models.HunyuanVideo15 / HunyuanVideo15_SR_Distilled (``cond_type_embedding``, ``vision_in``,
``byt5_in``; 98 input channels for the super-resolution model), on ComfyUI's HunyuanVideo class, sampled through
ComfyUI's sampler: T2V, I2V (SigLIP image tokens and the start image's latent through ComfyUI's own
HunyuanVideo15ImageToVideo node), byT5 glyph tokens (in both prompts, or only in the positive one: then cond and
uncond run apart, over different lengths), a padded LLM text, and the 1080p super-resolution model.

In ComfyUI 0.33 every double block (1.5 has no single blocks) attends over [SigLIP image tokens, byT5 tokens, LLM
text, video], patch size 1. Where the video starts is read from ComfyUI, never from the pack: each double block
hands its ``attn1_patch`` the ``img_slice`` of that very call.

Sizes: hidden 256 in 2 heads of 128 (the real head size: detection derives the heads from it), 2 double blocks;
latents 32 x 8 x 8 (64 tokens per frame: one 64-token block per frame).
"""

from __future__ import annotations

import functools
import logging
import types

import pytest
import torch

import comfy_env
from pack import import_pack
from test_comfy_hunyuan import OuterRecorder, oracle, text_start

pytestmark = [pytest.mark.comfyui, pytest.mark.newer_comfyui]

LOGGER = "sparse_video_attention"
BLOCK = 64
HIDDEN, DEPTH, TEXT_DIM = 256, 2, 32
SIGLIP_DIM, BYT5_DIM = 1152, 1472   # fixed by ComfyUI's vision_in / byt5_in
CHANNELS, SIDE = 32, 8              # HunyuanVideo 1.5's latent: 32 channels
T2V_IN, SR_IN = 2 * CHANNELS + 1, 3 * CHANNELS + 2  # noise + image latent + mask; noise + two latents + two masks
STEPS = 2


@pytest.fixture(scope="module")
def core():
    return import_pack("core")


@pytest.fixture(scope="module", autouse=True)
def comfyui_with_hunyuan15():
    import comfy.model_base
    import comfyui_version
    if not hasattr(comfy.model_base, "HunyuanVideo15"):
        pytest.skip(f"ComfyUI {comfyui_version.__version__} has no HunyuanVideo 1.5")
    yield
    model.cache_clear()  # while ComfyUI is still importable: its ModelPatcher.__del__ needs it


def checkpoint(in_channels: int, meanflow: bool = False) -> dict:
    keys = {"txt_in.individual_token_refiner.blocks.0.norm1.weight": (HIDDEN,),
            "txt_in.input_embedder.weight": (HIDDEN, TEXT_DIM),
            "img_in.proj.weight": (HIDDEN, in_channels, 1, 1, 1), "final_layer.linear.weight": (CHANNELS, HIDDEN),
            "byt5_in.fc1.weight": (2048, BYT5_DIM), "cond_type_embedding.weight": (3, HIDDEN),
            "vision_in.proj.0.weight": (SIGLIP_DIM,),
            **{f"double_blocks.{i}.img_attn.qkv.weight": (3 * HIDDEN, HIDDEN) for i in range(DEPTH)}}
    if meanflow:
        keys["time_r_in.in_layer.weight"] = (HIDDEN, 256)
    return keys


@functools.cache
def model(kind: str):
    """"base" (T2V and I2V: the same checkpoint layout) or "sr" (the 1080p super-resolution model), one each."""
    config = comfy_env.detected_config(checkpoint(SR_IN, meanflow=True) if kind == "sr" else checkpoint(T2V_IN))
    return comfy_env.build(config, seed=3)


def radial(nodes, decay):
    return nodes.RadialMask().settings(decay, BLOCK, False, True)[0]


def patch(nodes, base, method, dense_layers=0, verbose=False):
    return nodes.SparseAttentionPatch().patch(base, 0.0, 1.0, dense_layers, "reference", verbose, method,
                                              compensate="off")[0]  # the layout as it is: its oracle


def noise(seed, *shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@functools.cache
def conds(case: str, frames: int):
    """(positive, negative, latent, (positive's, negative's) non-video tokens) of a case, as ComfyUI's nodes make
    them. The text encoder (Qwen 2.5 VL) gives no pooled vector and drops a mask without padding; byT5 tokens come
    with quoted text (the positive prompt only: "quoted-text", both: "byt5")."""
    text, image_tokens = 12, 9 if case.startswith("i2v") or case == "sr" else 0
    byt5 = (5, 5) if "byt5" in case else (5, 0) if "quoted-text" in case else (0, 0)
    pair = []
    for seed, glyphs in zip((1, 2), byt5):
        extra = {"pooled_output": None}
        if case == "t2v-padded":
            extra["attention_mask"] = (torch.arange(text) < 7).long().view(1, -1)
        if glyphs:
            extra["conditioning_byt5small"] = noise(seed + 10, 1, glyphs, BYT5_DIM)
        pair.append([[noise(seed, 1, text, TEXT_DIM), extra]])
    latent = {"samples": torch.zeros(1, CHANNELS, frames, SIDE, SIDE)}
    siglip = types.SimpleNamespace(last_hidden_state=noise(4, 1, image_tokens, SIGLIP_DIM))
    from comfy_extras import nodes_hunyuan
    if case.startswith("i2v"):
        vae = types.SimpleNamespace(encode=lambda pixels: noise(5, 1, CHANNELS, 1, SIDE, SIDE))
        pair[0], pair[1], latent = nodes_hunyuan.HunyuanVideo15ImageToVideo.execute(
            *pair, vae, SIDE * 16, SIDE * 16, 4 * frames - 3, 1, start_image=noise(6, 1, SIDE * 16, SIDE * 16, 3),
            clip_vision_output=siglip).result
    elif case == "sr":
        upscaled = {"samples": noise(7, 1, CHANNELS, frames, SIDE, SIDE)}
        pair[0], pair[1], latent = nodes_hunyuan.HunyuanVideo15SuperResolution.execute(
            *pair, upscaled, 0.7, clip_vision_output=siglip).result
    return pair[0], pair[1], latent["samples"], tuple(text + glyphs + image_tokens for glyphs in byt5)


# cfg 6 runs cond and uncond as one batch where their inputs have the same shapes; a padded text runs at cfg 1, as
# ComfyUI 0.33 builds that mask for one text; "sr": the super-resolution model as the I2V template runs it.
CASES = {"t2v": 6.0, "t2v-padded": 1.0, "t2v-byt5": 6.0, "i2v": 6.0, "i2v-quoted-text": 6.0, "sr": 1.0}


def run(base, case, frames, seed=8):
    positive, negative, latent, _ = conds(case, frames)
    return comfy_env.sample(base, latent, positive, negative, steps=STEPS, cfg=CASES[case], seed=seed)


def test_detection_builds_hunyuan_video_15(bridge, core):
    """ComfyUI's detection picks 1.5 and its SR model, on ComfyUI's HunyuanVideo class: patch size 1, head size 128,
    no single blocks; the pack's layers are the double blocks."""
    for kind, name in (("base", "HunyuanVideo15"), ("sr", "HunyuanVideo15_SR_Distilled")):
        base = model(kind)
        diffusion_model = base.get_model_object("diffusion_model")
        assert type(base.model).__name__ == name and type(diffusion_model).__name__ == "HunyuanVideo"
        assert list(diffusion_model.patch_size) == [1, 1, 1] and not len(diffusion_model.single_blocks)
        assert diffusion_model.hidden_size // diffusion_model.num_heads == 128
        adapter = bridge.adapter_for(diffusion_model)
        assert adapter.family == "hunyuan" and adapter.text_first
        assert adapter.blocks == core.BlockLayers(offsets={"double": 0, "single": DEPTH}, count=DEPTH)


@pytest.mark.parametrize("case", CASES)
def test_full_layout_equals_unpatched(nodes, bridge, core, case):
    """Radial wide enough to keep every tile of 3 frames: the sparse path, the image, byT5 and text tokens moved
    behind the video and back, gives the unpatched model's output."""
    base = model("sr" if case == "sr" else "base")
    patched = patch(nodes, base, radial(nodes, 4.0))
    dense = run(base, case, frames=3)
    torch.testing.assert_close(run(patched, case, frames=3), dense, rtol=1e-4, atol=1e-4)
    stats = bridge.session_of(patched).stats
    assert stats.grid in {core.VideoGrid(3, SIDE, SIDE, text_tokens=prefix) for prefix in conds(case, 3)[3]}
    assert len(stats.calls) == STEPS * DEPTH and not stats.fallbacks


class VideoStart:
    """An attn1_patch (ComfyUI's own hook in every double block): records the ``img_slice`` the block reports for
    its joint attention, [first video token, length], one per call, in call order."""

    def __init__(self):
        self.slices = []

    def __call__(self, q, k, v, pe=None, attn_mask=None, extra_options=None):
        self.slices.append(tuple(extra_options["img_slice"]))
        return {}

    def __deepcopy__(self, memo):
        return self


@pytest.mark.parametrize("case", CASES)
def test_sparse_radial_keeps_every_non_video_token_dense(nodes, bridge, core, case):
    """A sparse Radial run: every double block's self-attention equals the pack's layout carried to where ComfyUI
    says the video is, with every image, byT5 and text row and column kept, and the run finishes finite."""
    frames = 5
    method = radial(nodes, 0.05)
    patched = patch(nodes, model("sr" if case == "sr" else "base"), method)
    video_start = VideoStart()
    patched.set_model_attn1_patch(video_start)
    recorder = OuterRecorder.on(patched)
    out = run(patched, case, frames)
    session = bridge.session_of(patched)
    assert torch.isfinite(out).all() and not session.stats.fallbacks

    prefixes, V = conds(case, frames)[3], frames * SIDE * SIDE
    calls = [c for c in recorder.calls if c["q"].shape[2] > V]  # the text refiner's attention is shorter
    assert session.stats.sparse_calls == STEPS * DEPTH  # every (step, layer) sparse
    forwards = 1 if CASES[case] == 1.0 or prefixes[0] == prefixes[1] else 2  # cond and uncond batched, or apart
    assert len(calls) == len(video_start.slices) == forwards * STEPS * DEPTH
    assert all(c["img_slice"] is None for c in recorder.calls)  # no single blocks: ComfyUI reports no img_slice
    for call, (prefix, length) in zip(calls, video_start.slices):
        # ComfyUI: the non-video tokens first, then the video
        assert length == call["q"].shape[2] == prefix + V and prefix in prefixes
        block_mask = core.radial_block_mask(core.VideoGrid(frames, SIDE, SIDE, text_tokens=prefix), method)
        assert not bool(block_mask.all())
        position = torch.arange(length)
        is_prefix = position < prefix
        tile = torch.where(is_prefix, V + position, position - prefix) // BLOCK  # the planners' order: video first
        allowed = block_mask[tile][:, tile]
        assert bool(allowed[:, is_prefix].all()) and bool(allowed[is_prefix].all())
        if call["mask"] is None:
            call["mask"] = torch.zeros(length)
        else:  # the padded keys end the LLM text, which ends the prefix
            assert text_start(call, prefix, length) == 0
        torch.testing.assert_close(call["out"].double(), oracle(call, allowed), rtol=1e-5, atol=1e-5)


def test_padding_mask_covers_the_llm_text_only(nodes):
    """ComfyUI 0.33 lays the LLM text's padding mask over the first tokens, as long as the LLM text alone: with
    byT5 (or image) tokens a padded text fails in ComfyUI itself, patched or not (the Qwen 2.5 VL encoder gives a
    mask only to padded text, so the templates never meet it)."""
    positive, negative, latent, _ = conds("t2v-byt5", 3)
    padded = [[[text, {**extra, "attention_mask": (torch.arange(12) < 7).long().view(1, -1)}]]
              for [[text, extra]] in (positive, negative)]
    base = model("base")
    for unpatched_or_patched in (base, patch(nodes, base, radial(nodes, 0.05))):
        with pytest.raises(RuntimeError, match="must match"):
            comfy_env.sample(unpatched_or_patched, latent, *padded, steps=STEPS, cfg=1.0)


def test_inspector_and_run_summary(nodes, bridge, caplog):
    """An I2V run with the first block dense: the run summary names the method and the layers, the Inspector draws
    a sparse layer."""
    patched = patch(nodes, model("base"), radial(nodes, 0.05), dense_layers=1, verbose=True)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        run(patched, "i2v", frames=5)
    session = bridge.session_of(patched)
    assert {layer: density >= 1.0 for (_, layer), density in session.stats.calls.items()} == {0: True, 1: False}
    summaries = [r.getMessage() for r in caplog.records if r.name == LOGGER and "run summary" in r.getMessage()]
    assert len(summaries) == 1 and "Radial" in summaries[0] and f"dense layers 0 (1 of {DEPTH})" in summaries[0]
    images = nodes.SparseAttentionInspector().inspect(patched, {"samples": torch.zeros(1)}, 1, 0, 256)
    assert len(images) == 4 and all(t.shape[0] == 1 and t.shape[2] == 256 and t.shape[3] == 3 for t in images)
    layout = import_pack("core.report").inspect(session, layer=1, max_size=256)[0]
    assert layout.info["title"] == f"Radial layout, layer 1 of {DEPTH}"
