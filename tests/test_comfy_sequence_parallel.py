"""A raylight-style run of ComfyUI's real tiny Wan on 2 gloo processes: each rank patches its own model copy with
nodes.sequence_parallel.patch_worker_model (one settings dict for all), its forward shards the tokens as raylight's
Ulysses forward does, and the sampled latent equals one process sampling the same patched model unsharded.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

import comfy_env
from pack import import_pack
from sequence_parallel_ranks import run_ranks

SETTINGS = {"method": "radial", "method_settings": {"decay_factor": 0.05, "block_size": 64, "attention_sink": False}, "dense_steps": 1,
            "dense_layers": 0, "backend": "reference"}


def sharded_forward_orig(self, x, t, context, clip_fea=None, freqs=None, transformer_options={}, **kwargs):
    """What a raylight worker's WanModel forward does (T2V only): this rank's contiguous shard of the patchified
    tokens (padded to a multiple of the ranks) through the blocks, every rank's gathered before the head."""
    from comfy.ldm.wan.model import sinusoidal_embedding_1d

    world, rank = dist.get_world_size(), dist.get_rank()
    x = self.patch_embedding(x.float()).to(x.dtype)
    grid_sizes = x.shape[2:]
    transformer_options["grid_sizes"] = grid_sizes
    x = x.flatten(2).transpose(1, 2)
    total = x.shape[1]
    size = math.ceil(total / world)
    x, freqs = (torch.nn.functional.pad(t, (0,) * (2 * (t.ndim - 2)) + (0, size * world - total))
                [:, rank * size:(rank + 1) * size] for t in (x, freqs))
    e = self.time_embedding(sinusoidal_embedding_1d(self.freq_dim, t.flatten()).to(dtype=x[0].dtype))
    e = e.reshape(t.shape[0], -1, e.shape[-1])
    e0 = self.time_projection(e).unflatten(2, (6, self.dim))
    context = self.text_embedding(context)
    transformer_options["total_blocks"] = len(self.blocks)
    transformer_options["block_type"] = "double"
    for i, block in enumerate(self.blocks):
        transformer_options["block_index"] = i
        x = block(x, e=e0, freqs=freqs, context=context, context_img_len=None, transformer_options=transformer_options)
    shards = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(shards, x.contiguous())
    x = self.head(torch.cat(shards, dim=1)[:, :total], e)
    return self.unpatchify(x, grid_sizes)


def sample_wan(rank: int, world: int) -> dict:
    comfy_env.setup()
    import types

    workers = import_pack("nodes.sequence_parallel")
    bridge = import_pack("nodes.bridge")
    latent = torch.zeros(1, 16, 9, 18, 18)  # 9 frames of 9 x 9 tokens: 729, padded to 730 on 2 ranks
    positive, negative = comfy_env.wan_conds(seed=1)
    sharded = workers.patch_worker_model(comfy_env.tiny_wan_t2v(seed=3), SETTINGS)
    model = sharded.get_model_object("diffusion_model")
    model.forward_orig = types.MethodType(sharded_forward_orig, model)
    one = workers.patch_worker_model(comfy_env.tiny_wan_t2v(seed=3), SETTINGS)  # whole sequence, every head
    results = {}
    for run in range(2):  # a second run restarts cleanly (per-run state reset, the ranks checked again)
        got = comfy_env.sample(sharded, latent, positive, negative, steps=3, seed=run)
        want = comfy_env.sample(one, latent, positive, negative, steps=3, seed=run)
        results[run] = float((got - want).norm() / want.norm())
    stats = bridge.session_of(sharded).stats
    unpatched = comfy_env.sample(comfy_env.tiny_wan_t2v(seed=3), latent, positive, negative, steps=3, seed=1)
    results["sparse calls"] = stats.sparse_calls
    results["density"] = stats.sparse_density
    results["from dense"] = float((got - unpatched).norm() / unpatched.norm())
    return results


@pytest.mark.comfyui
def test_raylight_style_workers_sample_what_one_process_samples():
    outcomes = run_ranks(2, sample_wan)
    for rank, outcome in enumerate(outcomes):
        assert outcome[0] == "ok", outcome
        result = outcome[1]
        assert result[0] < 1e-5 and result[1] < 1e-5, (rank, result)
        assert result["sparse calls"] == 2 * 3 and result["density"] < 0.9, (rank, result)  # steps 1, 2 x 3 blocks
        assert result["from dense"] > 1e-4, (rank, result)  # the sparse attention changed the result
