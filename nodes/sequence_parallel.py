"""Sparse attention on a raylight-style worker: each Ray worker (one process per GPU) holds its own copy of the model,
so a patch on the MODEL the workflow passes around never reaches it. Each worker patches its own copy instead::

    from <pack>.nodes.sequence_parallel import patch_worker_model
    model = patch_worker_model(model, {"method": "radial", "method_settings": {"decay_factor": 0.2},
                                       "dense_steps": 0.25, "dense_layers": 1})

with the same settings dict on every rank (core.sequence_parallel.session_from_settings lists the keys), after
torch.distributed is initialised and before sampling. The worker's forward shards the sequence (raylight's Ulysses
forward); the patch's hook then runs the all-to-all around the pack's attention. Nothing is process-global: the
session lives on the returned clone of the ModelPatcher.
"""

from __future__ import annotations

from ..core.sequence_parallel import session_from_settings
from .bridge import install


def patch_worker_model(model, settings: dict, group=None):
    """A clone of the ModelPatcher ``model`` with the pack's sparse attention, sequence parallel over ``group``
    (a torch.distributed process group; None: the default one)."""
    return install(model, session_from_settings(settings, group))
