"""A stand-in for ComfyUI's "Model Sparse Attention" node (comfy_extras/nodes_sparse_attention.py, ComfyUI 0.38):
what the pack must recognise and compose with is how it installs itself, reproduced here:

* its override wraps whatever override was on the hook (``previous``) and serves the calls it declines through it;
* it is installed at patch time and again from an ON_PREPARE_STATE callback keyed "block_sparse_attention" at every
  step (idempotent once it is on top), with an ON_CLEANUP callback under the same key;
* the function is ``make_attention_override.<locals>.override`` of a module named ``...nodes_sparse_attention``.

Instead of a sparse kernel it computes ComfyUI's attention and counts the calls it took.
"""

from __future__ import annotations

KEY = "block_sparse_attention"


class SparseAttnPatch:
    def __init__(self, min_tokens: int):
        self.min_tokens = min_tokens
        self.installed = set()
        self.taken = 0
        self.cleanups = 0


def make_attention_override(patch: SparseAttnPatch, previous):
    def override(func, q, k, v, heads, mask=None, skip_reshape=False, **kwargs):
        def dense():
            kw = dict(mask=mask, skip_reshape=skip_reshape, **kwargs)
            return func(q, k, v, heads, **kw) if previous is None else previous(func, q, k, v, heads, **kw)

        tokens = q.shape[2] if skip_reshape else q.shape[1]
        if mask is not None or q.shape != k.shape or tokens < patch.min_tokens:
            return dense()
        patch.taken += 1
        return func(q, k, v, heads, mask=mask, skip_reshape=skip_reshape, **kwargs)

    return override


def install_override(patch: SparseAttnPatch, transformer_options: dict) -> None:
    current = transformer_options.get("optimized_attention_override")
    if current in patch.installed:
        return
    override = make_attention_override(patch, current)
    patch.installed.add(override)
    transformer_options["optimized_attention_override"] = override


def apply(model, min_tokens: int = 0):
    """The node's patch: (patched clone, its state)."""
    import comfy.patcher_extension as patcher_extension
    patch = SparseAttnPatch(min_tokens)
    m = model.clone()
    install_override(patch, m.model_options.setdefault("transformer_options", {}))

    def prepare_state(model_patcher, timestep, model_options=None, *rest):
        if model_options is not None:  # ComfyUI 0.3.x passes no model options here
            install_override(patch, model_options.setdefault("transformer_options", {}))

    def cleanup(model_patcher):
        patch.cleanups += 1

    m.add_callback_with_key(patcher_extension.CallbacksMP.ON_PREPARE_STATE, KEY, prepare_state)
    m.add_callback_with_key(patcher_extension.CallbacksMP.ON_CLEANUP, KEY, cleanup)
    return m, patch
