"""The patch beside ComfyUI's own nodes on the same model: Model Attention Backend, Model Sparse Attention (a stand-in
installed the way the core node installs itself), EasyCache and LazyCache, each before and after the patch.

Policy (nodes/composition.py): the dense calls run on the backend the user picked, wherever the backend node sits;
one sparse method per model, the node nearer the sampler in charge, said once; a step cache may skip model calls,
never an AdaSpa search or an SVG re-profile without it happening at the next step that runs.
"""

from __future__ import annotations

import importlib
import logging

import pytest
import torch

import comfy_env
from core_node_doubles import nodes_sparse_attention as core_sparse
from pack import import_pack

comfyui = pytest.mark.comfyui
LOGGER = "sparse_video_attention"
OVERRIDE_KEY = "optimized_attention_override"
STEPS = 3


def patch(nodes, model, method=None, dense_layers=1):
    method = method or nodes.RadialMask().settings(0.05, 64, True, True)[0]
    return nodes.SparseAttentionPatch().patch(model, 0.0, 1.0, dense_layers, "reference", False, method)[0]


def latent(frames=5):
    return torch.zeros(1, 16, frames, 16, 16)


def run(model, seed=1):
    pos, neg = comfy_env.wan_conds(seed=seed)
    return comfy_env.sample(model, latent(), pos, neg, steps=STEPS, seed=seed + 1)


def warnings_of(caplog):
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno >= logging.WARNING]


def comfy_node(module: str, name: str):
    """A ComfyUI core node class, or a skip naming the ComfyUI version without it (tests marked newer_comfyui are
    deselected in CI's run on the oldest ComfyUI)."""
    try:
        return getattr(importlib.import_module(f"comfy_extras.{module}"), name)
    except (ImportError, AttributeError) as why:
        import comfyui_version
        pytest.skip(f"ComfyUI {comfyui_version.__version__} has no {name} node ({why})")


# ------------------------------------------------------------------------------------------------------------------
# Model Attention Backend (core node since ComfyUI 0.32): it replaces the hook, never chains.

@pytest.fixture
def counted_backend(monkeypatch):
    """ComfyUI's "pytorch attention" backend, counting its calls (patched where Model Attention Backend looks it up)."""
    comfy_node("nodes_model_advanced", "ModelAttentionBackend")
    import comfy.ldm.modules.attention as attention
    original = attention.get_attention_function("pytorch")
    calls = []

    def backend(*args, **kwargs):
        calls.append(args[0].shape)
        return original(*args, **kwargs)

    monkeypatch.setitem(attention.REGISTERED_ATTENTION_FUNCTIONS, "pytorch", backend)
    return calls


def attention_backend(model):
    node = comfy_node("nodes_model_advanced", "ModelAttentionBackend")()
    return node.patch(model, "pytorch attention")[0]


@comfyui
@pytest.mark.newer_comfyui
@pytest.mark.parametrize("order", ["backend-then-patch", "patch-then-backend"])
def test_dense_calls_run_on_the_chosen_backend(nodes, bridge, counted_backend, caplog, order):
    base = comfy_env.tiny_wan_t2v(seed=2)
    reference = run(attention_backend(base))
    every_call = len(counted_backend)
    counted_backend.clear()
    want = run(patch(nodes, base))
    if order == "backend-then-patch":
        patched = patch(nodes, attention_backend(base))
    else:
        patched = attention_backend(patch(nodes, base))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        got = run(patched)
    session = bridge.session_of(patched)
    assert session.stats.sparse_calls == STEPS * (comfy_env.WAN_LAYERS - 1)
    # every call that stayed dense (layer 0's self-attention, all cross-attention) ran on the chosen backend
    assert len(counted_backend) == every_call - session.stats.sparse_calls
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.equal(got, reference)  # sparse attention did run
    messages = warnings_of(caplog)
    if order == "backend-then-patch":
        assert not messages
    else:  # the overwrite of the patch's hook is detected, repaired for the run, and reported once
        assert len(messages) == 1 and "Model Attention Backend" in messages[0] and "after" in messages[0]


@comfyui
def test_a_node_that_replaces_the_hook_after_the_patch_is_reported(nodes, bridge, caplog):
    """An unknown node that overwrites the hook without chaining: nothing reaches the patch, and the run says so."""
    patched = patch(nodes, comfy_env.tiny_wan_t2v(seed=3))
    replaced = patched.clone()
    replaced.model_options["transformer_options"][OVERRIDE_KEY] = lambda func, *args, **kwargs: func(*args, **kwargs)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        run(replaced)
    assert not bridge.session_of(replaced).stats.calls
    messages = warnings_of(caplog)
    assert len(messages) == 1 and "no attention call of this model reached the patch" in messages[0]


# ------------------------------------------------------------------------------------------------------------------
# Model Sparse Attention (core node in ComfyUI 0.38): a second sparse method. The node nearer the sampler is in charge.

class Below:
    """An override below both sparse nodes (e.g. a dense backend chosen earlier): counts what reaches it."""

    def __init__(self):
        self.calls = 0

    def __call__(self, func, *args, **kwargs):
        self.calls += 1
        return func(*args, **kwargs)

    def __deepcopy__(self, memo):
        return self


def with_below(model):
    below = Below()
    clone = model.clone()
    clone.model_options.setdefault("transformer_options", {})[OVERRIDE_KEY] = below
    return clone, below


@comfyui
def test_model_sparse_attention_before_the_patch_is_switched_off(nodes, bridge, caplog):
    base, below = with_below(comfy_env.tiny_wan_t2v(seed=4))
    first, state = core_sparse.apply(base)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        patched = patch(nodes, first)
        run(patched)
        run(patched)
    session = bridge.session_of(patched)
    assert state.taken == 0 and len(state.installed) == 1  # never served a call, never re-wrapped the hook
    assert session.stats.sparse_calls == STEPS * (comfy_env.WAN_LAYERS - 1)
    # the patch's dense calls go to what the core node had wrapped: two runs, each 6 calls per step minus the sparse
    assert below.calls == 2 * (STEPS * 2 * comfy_env.WAN_LAYERS - session.stats.sparse_calls)
    assert core_sparse.KEY not in patched.callbacks.get("on_prepare_state", {})
    assert core_sparse.KEY in first.callbacks.get("on_prepare_state", {})  # the node's own model is untouched
    messages = warnings_of(caplog)
    assert len(messages) == 1 and "Model Sparse Attention was applied before" in messages[0]


@comfyui
def test_model_sparse_attention_after_the_patch_is_in_charge(nodes, bridge, caplog):
    base, below = with_below(comfy_env.tiny_wan_t2v(seed=5))
    patched = patch(nodes, base)
    last, state = core_sparse.apply(patched)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        run(last)
        run(last)
    session = bridge.session_of(last)
    assert not session.stats.calls  # the patch passed every call through
    assert state.taken == 2 * STEPS * comfy_env.WAN_LAYERS  # every self-attention call went to the core node
    assert below.calls == 2 * STEPS * comfy_env.WAN_LAYERS  # its declined calls (cross-attention) reached below
    assert len(state.installed) == 1  # the chain never grew
    messages = warnings_of(caplog)
    assert len(messages) == 1 and "Model Sparse Attention was applied after" in messages[0]


# ------------------------------------------------------------------------------------------------------------------
# EasyCache / LazyCache: steps whose model call is skipped.

def apply_cache(name, model):
    node = comfy_node("nodes_easycache", f"{name}Node")
    out = node.execute(model, reuse_threshold=3.0, start_percent=0.0, end_percent=1.0, verbose=False)
    return out.result[0]


@comfyui
@pytest.mark.parametrize("cache", ["EasyCache", "LazyCache"])
@pytest.mark.parametrize("order", ["cache-then-patch", "patch-then-cache"])
def test_step_caches_never_drop_an_adaspa_search(nodes, bridge, monkeypatch, cache, order):
    """A step cache skipping model calls (a high reuse threshold skips most steps): every AdaSpa search step still
    searches, at the first step whose model call runs, and the skipped steps are said in the run summary."""
    steps = 8
    method = nodes.AdaSpaSearch().settings(0.8, "0.25, 0.5, 0.75", 64, 0.1, 0.3, True)[0]
    base = comfy_env.tiny_wan_t2v(seed=6)
    if order == "cache-then-patch":
        model = patch(nodes, apply_cache(cache, base), method, dense_layers=0)
    else:
        model = apply_cache(cache, patch(nodes, base, method, dense_layers=0))
    session = bridge.session_of(model)
    planner = session.planner
    searched = []
    original = planner._search

    def search(call, *args, **kwargs):
        searched.append((call.step, call.layer))
        return original(call, *args, **kwargs)

    monkeypatch.setattr(planner, "_search", search)
    pos, neg = comfy_env.wan_conds(seed=7)
    out = comfy_env.sample(model, latent(), pos, neg, steps=steps, seed=8)
    assert torch.isfinite(out).all()
    ran = sorted({s for s, _ in session.stats.calls})
    assert len(ran) < steps, f"{cache} skipped no step: the test needs skipped steps"
    search_steps = [2, 4, 6]  # 0.25, 0.5, 0.75 of 8
    want = {min(s for s in ran if s >= due) for due in search_steps if any(s >= due for s in ran)} | {ran[0]}
    assert {s for s, layer in searched if layer == 1} == want
    summary = import_pack("core").run_summary(session)
    skipped = sorted(set(range(steps)) - set(ran))
    assert f"{len(skipped)} of {steps} steps ran no attention" in summary
