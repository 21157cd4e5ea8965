"""Run a function on several gloo processes of this machine (torch.multiprocessing, spawn), each rank's result or
error back, with a deadline: a hang fails the test instead of blocking it."""

from __future__ import annotations

import datetime
import os
import queue as queues
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _rank_main(rank, world, store, group_timeout, target, args, results):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=group_timeout))
    try:
        outcome = ("ok", target(rank, world, *args))
    except Exception as why:  # reported to the test, which asserts on it
        outcome = ("error", type(why).__name__, str(why))
    results.put((rank, outcome))
    dist.destroy_process_group()


def run_ranks(world: int, target, *args, deadline: float = 600.0, group_timeout: float = 60.0) -> list:
    """[(status, ...) per rank]: ('ok', target's result) or ('error', exception type name, message).
    ``target(rank, world, *args)`` is a module-level function (spawned processes import it by name)."""
    context = mp.get_context("spawn")
    results = context.Queue()
    with tempfile.TemporaryDirectory() as folder:
        store = os.path.join(folder, "store")
        processes = [context.Process(target=_rank_main, args=(rank, world, store, group_timeout, target, args,
                                                                results), daemon=True) for rank in range(world)]
        for process in processes:
            process.start()
        outcomes = {}
        try:
            while len(outcomes) < world:
                rank, outcome = results.get(timeout=deadline)
                outcomes[rank] = outcome
        except queues.Empty:
            raise AssertionError(f"ranks {sorted(set(range(world)) - set(outcomes))} of {world} did not finish "
                                 f"within {deadline}s (a hang)") from None
        finally:
            for process in processes:
                process.join(timeout=30)
                if process.is_alive():
                    process.kill()
    return [outcomes[rank] for rank in range(world)]
