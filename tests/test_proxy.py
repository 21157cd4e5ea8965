"""The trained proxy video model (benchmarks/proxy_model.py), its data, and the video quality measures.

The shipped weights load into ComfyUI's own WanModel and sample deterministically for a seed, through ComfyUI's
sampler, dense and with a sparse patch; a missing or corrupt weight file names the file and how to regenerate it.
"""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch

from pack import REPO_ROOT, import_pack

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import proxy_data  # noqa: E402
import proxy_model  # noqa: E402

metrics = import_pack("core.metrics")
SMALL = dict(frames=4, size=32, steps=2)  # 4 x 16 x 16 tokens: seconds on a CPU


@pytest.fixture(scope="module")
def proxy():
    proxy_model.use_comfyui()
    return proxy_model.load()


def small_sample(proxy, model, seed, cls=proxy_model.PROCEDURAL_CLASS):
    return proxy_model.sample(proxy, model, cls, seed, steps=SMALL["steps"], frames=SMALL["frames"],
                              size=SMALL["size"], cfg=3.0)


def test_shipped_weights_fit_the_budget_and_carry_their_recipe():
    from safetensors import safe_open

    assert proxy_model.WEIGHTS.stat().st_size <= 16 * 10 ** 6
    with safe_open(str(proxy_model.WEIGHTS), framework="pt") as f:
        meta = f.metadata()
        context = f.get_tensor(proxy_model.CONTEXT_KEY)
    info, classes = json.loads(meta["info"]), json.loads(meta["classes"])
    assert json.loads(meta["unet"])["num_layers"] == proxy_model.UNET["num_layers"]
    assert info["steps"] > 0 and info["holdout_clips"] and not set(info["holdout_clips"]) & set(classes)
    assert context.shape == (len(classes), proxy_model.UNET["text_len"], proxy_model.UNET["text_dim"])
    card = (proxy_model.WEIGHTS.parent / "MODEL_CARD.md").read_text()
    assert f"{info['steps']:,}" in card and "loss_curve.png" in card


@pytest.mark.comfyui
def test_weights_load_into_comfyui_wanmodel(proxy):
    import comfy.ldm.wan.model
    import comfy.model_base

    base = proxy.model.model
    assert isinstance(base, comfy.model_base.WAN21) and isinstance(base.diffusion_model, comfy.ldm.wan.model.WanModel)
    assert len(base.diffusion_model.blocks) == proxy_model.UNET["num_layers"]
    assert all(torch.isfinite(p).all() for p in base.diffusion_model.parameters())


@pytest.mark.comfyui
def test_sampling_is_deterministic_for_a_seed(proxy):
    first, again = small_sample(proxy, proxy.model, seed=3), small_sample(proxy, proxy.model, seed=3)
    other = small_sample(proxy, proxy.model, seed=4)
    assert first.shape == (1, 3, SMALL["frames"], SMALL["size"], SMALL["size"]) and torch.isfinite(first).all()
    assert torch.equal(first, again)
    assert metrics.psnr(other, first) < 40  # another seed is another video
    assert first.std() > 0.05  # a trained model draws something, not a flat field


@pytest.mark.comfyui
def test_sparse_patch_runs_on_the_proxy_and_stays_close(proxy, nodes):
    """Through the pack's own node on the CPU reference backend: deterministic, close to dense, really sparse."""
    bridge = import_pack("nodes.bridge")
    method = nodes.RadialMask().settings(decay_factor=0.2, block_size=64, attention_sink=True, text_dense=True)[0]
    patched = nodes.SparseAttentionPatch().patch(proxy.model, dense_steps=1, sparse_end=1.0, dense_layers=1,
                                                 backend="reference", verbose=False, method=method)[0]
    dense = small_sample(proxy, proxy.model, seed=5)
    sparse, again = small_sample(proxy, patched, seed=5), small_sample(proxy, patched, seed=5)
    stats = bridge.session_of(patched).stats
    assert torch.equal(sparse, again)
    assert stats.sparse_calls > 0 and stats.sparse_density < 1.0
    assert 15 < metrics.psnr(sparse, dense) < math.inf


def test_missing_weights_name_the_file_and_the_fix(tmp_path):
    missing = tmp_path / "nothing.safetensors"
    with pytest.raises(FileNotFoundError, match=r"nothing\.safetensors.*train_proxy\.py"):
        proxy_model.load(missing)


@pytest.mark.comfyui
def test_corrupt_weights_name_the_file_and_the_fix(tmp_path, proxy):
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(proxy_model.WEIGHTS.read_bytes()[:5000])
    with pytest.raises(ValueError, match=r"corrupt\.safetensors.*corrupt.*train_proxy\.py"):
        proxy_model.load(corrupt)
    foreign = tmp_path / "foreign.safetensors"
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(2)}, str(foreign))
    with pytest.raises(ValueError, match=r"foreign\.safetensors.*not a proxy weight file"):
        proxy_model.load(foreign)


def test_procedural_videos_move_and_stay_in_range():
    g = torch.Generator().manual_seed(0)
    video = proxy_data.procedural(3, g, "cpu", frames=8, size=32)
    assert video.shape == (3, 3, 8, 32, 32) and video.min() >= -1 and video.max() <= 1
    motion = (video[:, :, 1:] - video[:, :, :-1]).abs().mean()
    assert motion > 1e-3  # objects move and the background pans
    assert not torch.equal(video[0], video[1])


def test_real_clip_windows_come_from_the_right_split():
    frames = torch.arange(40, dtype=torch.uint8).view(40, 1, 1, 1).expand(40, 72, 72, 3).contiguous()
    data = {"frames": frames, "starts": torch.tensor([0, 20, 40]), "names": ["a", "b"], "holdout": ["b"]}
    train, held = proxy_data.RealClips(data, "cpu", "train", frames=16), proxy_data.RealClips(data, "cpu", "holdout",
                                                                                             frames=16)
    g = torch.Generator().manual_seed(1)
    for split, low in ((train, 0), (held, 20)):
        video, clip = split.batch(6, g)
        values = torch.round((video[:, 0, :, 0, 0] + 1) * 127.5)  # frame index of each frame (first pixel)
        assert video.shape == (6, 3, 16, 64, 64) and (clip == 0).all()
        assert values.min() >= low and values.max() < low + 20
        steps = (values[:, 1:] - values[:, :-1]).abs()
        assert (steps == 1).all()  # consecutive frames of one clip, forwards or reversed


def test_psnr_and_ssim_against_known_values():
    g = torch.Generator().manual_seed(2)
    video = torch.rand(1, 3, 4, 32, 32, generator=g) * 2 - 1
    assert metrics.psnr(video, video) == math.inf and metrics.ssim(video, video) == pytest.approx(1.0)
    noisy = video + 0.1 * torch.randn(video.shape, generator=g)
    assert metrics.psnr(noisy, video) == pytest.approx(10 * math.log10(4 / 0.01), abs=0.3)
    assert metrics.ssim(noisy, video) < metrics.ssim(video + 0.01 * torch.randn(video.shape, generator=g), video) < 1
    # Flat images: no variance, so SSIM is the luminance term alone, (2ab + C1) / (a^2 + b^2 + C1) on [0, 1].
    a, b = torch.full((1, 3, 2, 16, 16), -0.5), torch.full((1, 3, 2, 16, 16), 0.25)
    x, y, c1 = 0.25, 0.625, 0.01 ** 2
    assert metrics.ssim(a, b) == pytest.approx((2 * x * y + c1) / (x * x + y * y + c1), rel=1e-9)
