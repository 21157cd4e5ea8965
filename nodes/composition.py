"""The patch among ComfyUI's own attention nodes: who serves which call when several nodes set the attention hook.

ComfyUI has one hook, ``transformer_options["optimized_attention_override"]``. The policy:

* **Model Attention Backend** (core node) sets the hook to the chosen backend without chaining. Before the patch it
  is what the patch's dense calls run on. After the patch it would switch the patch off: at the start of each run
  the patch puts itself back on top, with that backend serving its dense calls, and says so once.
* **Model Sparse Attention** (core node in newer ComfyUI) is a second sparse method. One sparse method per model:
  the node nearer the sampler is in charge. Applied after the patch, it re-wraps the hook at every step, so the
  patch stands down for the run (every call passes through it) and says so once. Applied before the patch, the patch
  removes its per-step re-wrapping from its clone and takes it out of the hook chain, and says so once.

Everything here reads ComfyUI's objects by their public names (callback keys, the override's function); where
a newer ComfyUI changes them so that the other node cannot be taken out, the patch fails loudly at the node.
"""

from __future__ import annotations

import comfy.patcher_extension as patcher_extension

OVERRIDE_KEY = "optimized_attention_override"
# The key under which "Model Sparse Attention" registers its per-step ON_PREPARE_STATE re-wrapping.
CORE_SPARSE_KEY = "block_sparse_attention"
CORE_SPARSE_CALLBACKS = (patcher_extension.CallbacksMP.ON_PREPARE_STATE, patcher_extension.CallbacksMP.ON_CLEANUP)
# The closure ModelPatcher.set_model_optimized_attention installs (Model Attention Backend): never chains.
BACKEND_OVERRIDE = "ModelPatcher.set_model_optimized_attention.<locals>.optimized_attention_override"
MARK = "sparse_video_attention_session"  # the attribute that marks the patch's own hook, naming its session

CORE_SPARSE_BEFORE = ("ComfyUI's Model Sparse Attention was applied before Sparse Attention Patch on this model: the "
                      "patch (nearer the sampler) is in charge of sparse attention and has switched Model Sparse "
                      "Attention off on its copy of the model. One sparse method per model: remove one of the two "
                      "nodes to silence this")
CORE_SPARSE_AFTER = ("ComfyUI's Model Sparse Attention was applied after Sparse Attention Patch on this model: it "
                     "(nearer the sampler) is in charge of sparse attention, and the patch passes every call through "
                     "for this run. One sparse method per model: remove Model Sparse Attention, or put it before the "
                     "patch, to use the patch's method")
BACKEND_AFTER = ("an attention backend node (Model Attention Backend) was applied after Sparse Attention Patch and "
                 "replaced its attention hook: the patch put itself back on top for this run, and the chosen backend "
                 "serves every call that stays dense. Put the backend node before the patch to silence this")


def session_of_hook(hook):
    return getattr(hook, MARK, None)


def mark(hook, session):
    setattr(hook, MARK, session)
    return hook


def is_backend_override(hook) -> bool:
    return getattr(hook, "__qualname__", "") == BACKEND_OVERRIDE


def _is_core_sparse_override(hook) -> bool:
    module = (getattr(hook, "__module__", None) or "").replace("\\", "/")
    return module.endswith("nodes_sparse_attention") and \
        getattr(hook, "__qualname__", "").startswith("make_attention_override.")


def has_core_sparse(patcher) -> bool:
    """Whether "Model Sparse Attention" is active on this ModelPatcher (its per-step callback is there)."""
    return any(CORE_SPARSE_KEY in patcher.callbacks.get(kind, {}) for kind in CORE_SPARSE_CALLBACKS)


def hook_below_core_sparse(hook):
    """The hook "Model Sparse Attention" wraps (its ``previous``), through any number of its layers; ``hook`` itself
    when it is not one. RuntimeError when a layer does not say what it wraps (a ComfyUI that changed the node)."""
    while _is_core_sparse_override(hook):
        cells = dict(zip(hook.__code__.co_freevars, (c.cell_contents for c in hook.__closure__ or ())))
        if "previous" not in cells:
            raise RuntimeError("Sparse Attention Patch cannot switch off ComfyUI's Model Sparse Attention in this "
                               "ComfyUI version. One sparse method per model: remove one of the two nodes")
        hook = cells["previous"]
    return hook


def take_over_from_core_sparse(patched, hook):
    """On the patch's clone: stop Model Sparse Attention from re-wrapping the hook every step, and the hook it
    wrapped (what serves dense calls). ``hook`` is the clone's current hook."""
    below = hook_below_core_sparse(hook)
    for kind in CORE_SPARSE_CALLBACKS:
        patched.remove_callbacks_with_key(kind, CORE_SPARSE_KEY)
    return below
