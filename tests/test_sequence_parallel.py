"""Ulysses sequence parallelism (core.sequence_parallel) on 2 and 4 gloo processes of this CPU: each rank holds a
sequence shard, the sharded sparse output equals one process's sparse output for every method, each rank's planner
keeps state only for its own heads, a second run restarts cleanly, and bad input (heads the ranks do not divide,
settings that differ between ranks, a rank gone) is a clear error on every rank, never a hang. No ComfyUI needed.
"""

from __future__ import annotations

import pytest
import torch

from pack import import_pack
from sequence_parallel_ranks import run_ranks
from test_radial import dense_attention  # a stand-in for ComfyUI's attention function

core = import_pack("core")
sequence_parallel = import_pack("core.sequence_parallel")
dispatcher = import_pack("core.dispatcher")

GRID = core.VideoGrid(8, 8, 8, text_tokens=7)  # 519 tokens: 2 and 4 ranks both need a padded sequence
HEADS, DIM, BATCH = 4, 32, 2  # the batch is cond and uncond of one latent (CFG)
STEPS, LAYERS = 4, 2
SCHEDULE = {"dense_steps": 1, "dense_layers": 0, "backend": "reference"}  # step 0 dense (AdaSpa primes there)
METHODS = {
    "radial": {"decay_factor": 0.5, "block_size": 64},
    "svg": {"sparsity": 0.3, "block_size": 64, "sample_fraction": 0.05},
    "svg2": {"query_clusters": 8, "key_clusters": 16, "top_p": 0.5, "first_iterations": 3, "later_iterations": 1},
    "adaspa": {"block_size": 64, "search_steps": [0.25, 0.75]},
}


def settings(method: str) -> dict:
    return {"method": method, "method_settings": METHODS[method], **SCHEDULE}


def shard(x: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """(B, L, C) -> this rank's (B, ceil(L / world), C): the sequence padded at its end, as raylight shards it."""
    size = -(-x.shape[1] // world)
    padded = torch.nn.functional.pad(x, (0, 0, 0, size * world - x.shape[1]))
    return padded[:, rank * size:(rank + 1) * size]


def head_state(planner) -> set:
    """The heads of the layer that the planner keeps state for (Radial keeps none). Its pieces of state are keyed by
    (first head, heads); a planner that bounds its memory keeps one piece per few heads."""
    if isinstance(planner, core.SVGPlanner):
        pieces = {(key[2], key[3]) for key in planner._classes}
    elif isinstance(planner, core.SVG2Planner):
        pieces = {(key[1], cached.signature[2]) for key, cached in planner._centroids.items()}
    elif isinstance(planner, core.AdaSpaPlanner):
        pieces = {(key[3], key[4]) for entries in planner._layers.values() for key in entries}
    else:
        pieces = set()
    return {head for first, heads in pieces for head in range(first, first + heads)}


def run_method(rank: int, world: int, method: str, runs: int = 2) -> dict:
    """Runs of every step and layer through one process's hook (all heads, the whole sequence) and the sharded hook;
    the largest difference on this rank's tokens, and what each planner keeps."""
    one = sequence_parallel.session_from_settings(settings(method))
    sharded = sequence_parallel.session_from_settings(settings(method))
    one_hook = dispatcher.attention_override(one)
    sharded_hook = sequence_parallel.ulysses_override(sharded.sequence_parallel, dispatcher.attention_override(sharded))
    size = -(-GRID.total_tokens // world)
    mine = min(size, GRID.total_tokens - rank * size)  # this rank's tokens that are not padding
    result = {"error": 0.0, "states": []}
    for run in range(runs):
        one.begin_run()
        sharded.begin_run()
        generator = torch.Generator().manual_seed(run)  # every rank draws the same whole-sequence inputs
        for step in range(STEPS):
            contexts = [core.ForwardContext(video=GRID, step=step, total_steps=STEPS, conditionings=2)
                        for _ in range(2)]
            for _ in range(LAYERS):
                q, k, v = (torch.randn(BATCH, GRID.total_tokens, HEADS * DIM, generator=generator) for _ in range(3))
                want = one_hook(dense_attention, q, k, v, HEADS,
                                transformer_options={dispatcher.CONTEXT_KEY: contexts[0]})
                got = sharded_hook(dense_attention, *(shard(t, rank, world) for t in (q, k, v)), HEADS,
                                   transformer_options={dispatcher.CONTEXT_KEY: contexts[1]})
                difference = got[:, :mine] - want[:, rank * size:rank * size + mine]
                result["error"] = max(result["error"], float(difference.abs().max()))
        result["states"].append((head_state(one.planner), head_state(sharded.planner)))
    result["sparse"] = (one.stats.sparse_calls, sharded.stats.sparse_calls, sharded.stats.sparse_density)
    return result


def run_every_method(rank: int, world: int) -> dict:
    return {method: run_method(rank, world, method) for method in METHODS}


_RESULTS: dict = {}


def every_method(world: int) -> list:
    if world not in _RESULTS:
        _RESULTS[world] = run_ranks(world, run_every_method)
    return _RESULTS[world]


@pytest.mark.parametrize("world", [2, 4])
def test_sharded_output_equals_one_process(world):
    outcomes = every_method(world)
    assert all(o[0] == "ok" for o in outcomes), outcomes
    for rank, (_, methods) in enumerate(outcomes):
        for method, result in methods.items():
            assert result["error"] < 1e-5, f"{method}, rank {rank} of {world}: {result['error']}"
            one_sparse, sharded_sparse, density = result["sparse"]
            assert one_sparse == sharded_sparse == (STEPS - 1) * LAYERS, (method, result["sparse"])
            assert density < 0.9, (method, density)  # the calls did skip work: not a dense fallback


@pytest.mark.parametrize("world", [2, 4])
def test_each_rank_keeps_state_for_its_heads_only_and_restarts(world):
    outcomes = every_method(world)
    assert all(o[0] == "ok" for o in outcomes), outcomes
    share = HEADS // world
    for rank, (_, methods) in enumerate(outcomes):
        for method, result in methods.items():
            for one_state, sharded_state in result["states"]:  # after the first run and after the second
                if method == "radial":  # one layout per grid, no per-head state
                    assert one_state == sharded_state == set()
                else:
                    assert one_state == set(range(HEADS)), (method, one_state)
                    assert sharded_state == set(range(rank * share, (rank + 1) * share)), (method, rank, sharded_state)


def attend_directly(rank: int, world: int) -> float:
    """core.sequence_parallel.ulysses_attend (the planner path, no hook) against one process's session.attend."""
    one = sequence_parallel.session_from_settings(settings("radial"))
    sharded = sequence_parallel.session_from_settings(settings("radial"))
    ctx = core.ForwardContext(video=GRID, step=1, total_steps=STEPS)
    q, k, v = (torch.randn(1, HEADS, GRID.total_tokens, DIM, generator=torch.Generator().manual_seed(i))
               for i in range(3))
    want, _ = one.attend(ctx, 0, q, k, v)
    size = -(-GRID.total_tokens // world)
    padded = [torch.nn.functional.pad(t, (0, 0, 0, size * world - t.shape[2]))[:, :, rank * size:(rank + 1) * size]
              for t in (q, k, v)]
    got, density = sequence_parallel.ulysses_attend(sharded, sharded.sequence_parallel, ctx, 0, *padded)
    mine = min(size, GRID.total_tokens - rank * size)
    assert 0 < density < 1
    return float((got[:, :, :mine] - want[:, :, rank * size:rank * size + mine]).abs().max())


def test_ulysses_attend_matches_the_session_on_one_process():
    outcomes = run_ranks(2, attend_directly)
    assert all(o[0] == "ok" and o[1] < 1e-5 for o in outcomes), outcomes


def indivisible_heads(rank: int, world: int):
    session = sequence_parallel.session_from_settings(settings("radial"))
    hook = sequence_parallel.ulysses_override(session.sequence_parallel, dispatcher.attention_override(session))
    session.begin_run()
    ctx = core.ForwardContext(video=GRID, step=1, total_steps=STEPS)
    x = shard(torch.randn(1, GRID.total_tokens, 3 * DIM), rank, world)
    return hook(dense_attention, x, x, x, 3, transformer_options={dispatcher.CONTEXT_KEY: ctx})


def test_heads_the_ranks_do_not_divide_are_an_error_on_every_rank():
    outcomes = run_ranks(2, indivisible_heads)
    for outcome in outcomes:
        assert outcome[:2] == ("error", "ValueError") and "3 heads" in outcome[2], outcome


def mismatched_settings(rank: int, world: int):
    method = dict(settings("radial"), method_settings={"decay_factor": 0.5 if rank == 0 else 0.25, "block_size": 64})
    session = sequence_parallel.session_from_settings(method)
    return sequence_parallel.ulysses_attend(session, session.sequence_parallel,
                                            core.ForwardContext(video=GRID, step=1, total_steps=STEPS), 0,
                                            *(torch.randn(1, HEADS, -(-GRID.total_tokens // world), DIM)
                                              for _ in range(3)))


def test_settings_that_differ_between_ranks_are_an_error_on_every_rank():
    outcomes = run_ranks(2, mismatched_settings)
    for outcome in outcomes:
        assert outcome[:2] == ("error", "SequenceParallelError") and "different settings" in outcome[2], outcome


def rank_gone(rank: int, world: int):
    if rank == 1:
        return "left"  # this rank's process ends without joining the call
    return mismatched_settings(rank, world)


def test_a_rank_gone_is_an_error_not_a_hang():
    outcomes = run_ranks(2, rank_gone, deadline=120, group_timeout=10)
    assert outcomes[1] == ("ok", "left")
    assert outcomes[0][:2] == ("error", "SequenceParallelError") and "another rank died" in outcomes[0][2], \
        outcomes[0]


def test_settings_dict_is_checked():
    with pytest.raises(ValueError, match="unknown sparse attention settings"):
        sequence_parallel.session_from_settings({"method": "radial", "decay": 0.2})
    with pytest.raises(ValueError, match="method must be one of"):
        sequence_parallel.session_from_settings({"method": "sparse"})
    with pytest.raises(ValueError, match="radial has no settings"):
        sequence_parallel.session_from_settings({"method": "radial", "method_settings": {"sparsity": 0.3}})
    with pytest.raises(ValueError, match="compensate must be one of"):
        sequence_parallel.session_from_settings({"method": "svg", "compensate": "yes"})
    with pytest.raises(ValueError, match="precision must be one of"):
        sequence_parallel.session_from_settings({"method": "radial", "precision": "fp8"})
    with pytest.raises(ValueError, match="init_process_group"):  # this process never initialised torch.distributed
        sequence_parallel.session_from_settings({"method": "radial"})
