"""benchmarks/e2e.py's configs: ComfyUI's own detection, given each config's checkpoint keys, builds the model the
config names at its real size (on the meta device: no weights, a fraction of a second each). The GPU run times what
these build; a key shape off by a layer or a head would time another model without saying so."""

from __future__ import annotations

import importlib
import json
import sys

import pytest
import torch

from pack import REPO_ROOT

pytestmark = pytest.mark.comfyui

# config: (module, class) of the diffusion model, and its published size in billions of parameters
INTENDED = {
    "1.3b-480p": ("comfy.ldm.wan.model", "WanModel", 1.3),
    "14b-720p": ("comfy.ldm.wan.model", "WanModel", 14),
    "hunyuan-720p": ("comfy.ldm.hunyuan_video.model", "HunyuanVideo", 13),
    "hunyuan15-720p": ("comfy.ldm.hunyuan_video.model", "HunyuanVideo", 8.3),
    "kandinsky5-pro-720p": ("comfy.ldm.kandinsky5.model", "Kandinsky5", 19),
    "wan22-s2v-720p": ("comfy.ldm.wan.model", "WanModel_S2V", 16),  # Wan 2.2 S2V "14B": 14B and its audio modules
    "ltx2-720p": ("comfy.ldm.lightricks.av_model", "LTXAVModel", 19),
}


@pytest.fixture(scope="module")
def e2e():
    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    try:
        import e2e
    finally:
        sys.path.remove(str(REPO_ROOT / "benchmarks"))
    return e2e


def test_every_config_is_listed(e2e):
    assert set(e2e.CONFIGS) == set(INTENDED)


@pytest.mark.parametrize("name", INTENDED)
def test_detection_builds_the_intended_model_at_its_size(e2e, name):
    import comfy.model_detection
    module, cls, billions = INTENDED[name]
    try:
        intended = getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError):
        import comfyui_version
        pytest.skip(f"ComfyUI {comfyui_version.__version__} has no {module}.{cls}")
    keys = {key: torch.empty(shape, device="meta") for key, shape in e2e.CONFIGS[name].checkpoint().items()}
    config = comfy.model_detection.model_config_from_unet(keys, "")
    assert config is not None, f"{name}: ComfyUI detects no model in its keys"
    config.set_inference_dtype(torch.bfloat16, None)
    with torch.device("meta"):
        model = config.get_model({}, device=torch.device("meta")).diffusion_model
    assert type(model) is intended
    size = sum(p.numel() for p in model.parameters()) / 1e9
    assert size == pytest.approx(billions, rel=0.1), f"{name}: {size:.2f}B parameters"


def test_ltx2_inputs_are_the_workflows(e2e):
    """LTX-2 at workflows/ltx2_t2v_radial.json's size and Radial settings, its video and audio latents as ComfyUI
    shapes them (LTX-2's VAE: 128 channels, 8 frames and 32 x 32 pixels a latent; its audio VAE: 25 latents a
    second of 8 channels x 16 frequency bins)."""
    workflow = json.loads((REPO_ROOT / "workflows" / "ltx2_t2v_radial.json").read_text())
    widgets = {node["type"]: node.get("widgets_values") for node in workflow["nodes"]}
    width, height, frames, _ = widgets["EmptyLTXVLatentVideo"]
    audio_frames, fps, _ = widgets["LTXVEmptyLatentAudio"]
    decay, block, sink, text_dense = widgets["RadialAttentionMask"]
    config = e2e.CONFIGS["ltx2-720p"]
    assert config.latent == ((128, (frames - 1) // 8 + 1, height // 32, width // 32),
                             (8, round(audio_frames / fps * 25), 16))
    (context, extra), = config.cond()
    assert context.shape == (1, 1024, 2 * 3840)  # 1024 tokens after ComfyUI's text connectors, video and audio halves
    assert extra == {"frame_rate": widgets["LTXVConditioning"][0]}
    assert config.radial == dict(decay_factor=decay, block_size=block, attention_sink=sink, text_dense=text_dense)
    assert config.dense_layers == widgets["SparseAttentionPatch"][2]
