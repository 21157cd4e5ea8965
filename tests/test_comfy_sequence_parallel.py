"""A raylight-style run of ComfyUI's real tiny Wan on 2 gloo processes: each rank patches its own model copy with
nodes.sequence_parallel.patch_worker_model (one settings dict for all), its forward shards the tokens as raylight's
Ulysses forward does, and the sampled latent equals one process sampling the same patched model unsharded.
"""

from __future__ import annotations

import pytest
import torch

import comfy_env
from pack import import_pack
from sequence_parallel_ranks import run_ranks
from sharded_wan import shard_tokens

SETTINGS = {"method": "radial", "method_settings": {"decay_factor": 0.05, "block_size": 64, "attention_sink": False},
            "dense_steps": 1, "dense_layers": 0, "backend": "reference"}


def sample_wan(rank: int, world: int) -> dict:
    comfy_env.setup()
    workers = import_pack("nodes.sequence_parallel")
    bridge = import_pack("nodes.bridge")
    latent = torch.zeros(1, 16, 9, 18, 18)  # 9 frames of 9 x 9 tokens: 729, padded to 730 on 2 ranks
    positive, negative = comfy_env.wan_conds(seed=1)
    sharded = workers.patch_worker_model(comfy_env.tiny_wan_t2v(seed=3), SETTINGS)
    shard_tokens(sharded.get_model_object("diffusion_model"))
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
