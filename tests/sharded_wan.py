"""What a raylight worker's WanModel forward does, for the tests and benchmarks/sequence_parallel_wan.py: this rank's
contiguous shard of the patchified tokens (padded to a multiple of the ranks) runs through the blocks, every rank's
output gathered before the head. T2V only (no reference latents, no block patches)."""

from __future__ import annotations

import math
import types

import torch
import torch.distributed as dist


def shard_tokens(model) -> None:
    """Make ``model`` (ComfyUI's WanModel) run its blocks on this rank's shard of the tokens."""
    model.forward_orig = types.MethodType(sharded_forward_orig, model)


def whole_tokens(model) -> None:
    """Undo ``shard_tokens``: the model's own forward again."""
    model.__dict__.pop("forward_orig", None)


def sharded_forward_orig(self, x, t, context, clip_fea=None, freqs=None, transformer_options={}, **kwargs):
    """WanModel.forward_orig over this rank's shard of the tokens."""
    from comfy.ldm.wan.model import sinusoidal_embedding_1d

    world, rank = dist.get_world_size(), dist.get_rank()
    x = self.patch_embedding(x.float()).to(x.dtype)
    grid_sizes = x.shape[2:]
    transformer_options["grid_sizes"] = grid_sizes
    x = x.flatten(2).transpose(1, 2)
    total = x.shape[1]
    size = math.ceil(total / world)
    x, freqs = (torch.nn.functional.pad(part, (0,) * (2 * (part.ndim - 2)) + (0, size * world - total))
                [:, rank * size:(rank + 1) * size] for part in (x, freqs))
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
