"""Reliability: odd inputs, interrupted and repeated runs, other patches on the same model, bounded caches.

Three levels:
  * the real dispatcher (core.attention_override with a session), called as ComfyUI calls it: a stand-in for
    ComfyUI's attention function as ``func``, a ForwardContext in transformer_options. Every input either runs
    sparse and equals dense attention under the block mask (float64 oracle), or falls back to ``func`` with exactly
    one warning that says why;
  * tiny ComfyUI Wan models sampled with comfy.sample.sample (backend "reference" unless a test says otherwise);
  * the benchmarks' CPU modes (benchmarks/memory.py --smoke, benchmarks/sanitize.py --smoke).
GPU-only paths (fp32 cast to bf16 for the kernel, CPU tensors on a CUDA machine) are marked ``gpu``; ComfyUI tests
``comfyui`` (both skipped loudly where they cannot run, see conftest.py).
"""

from __future__ import annotations

import importlib.util
import logging

import pytest
import torch

import comfy_env
from pack import REPO_ROOT, import_pack
from test_comfy_integration import latent, masked_reference, patch, radial, rel_err, spy_attend

core = import_pack("core")
kernels = import_pack("kernels")
radial_mod = import_pack("core.radial")

comfyui = pytest.mark.comfyui
gpu = pytest.mark.gpu
LOGGER = "sparse_video_attention"
BLOCK = 64
SIGMAS = [1.0, 0.75, 0.5, 0.25, 0.0]  # a 4-step run: the sigma of step i is SIGMAS[i]
TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}

pytestmark = [pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")]


# ------------------------------------------------------------------------------------------------------------------
# Helpers: ComfyUI's attention function, a session, one call through the override.

def _load_benchmark(name):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", REPO_ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


comfy_attention = _load_benchmark("memory").comfy_attention  # ComfyUI's attention_pytorch, condensed


def make_session(backend="reference", block=BLOCK, sink=True, decay=0.2):
    method = core.RadialSettings(decay_factor=decay, block_size=block, attention_sink=sink)
    return core.SparseAttentionSession(method, core.SparseSchedule(dense_steps=0, dense_layers=0), backend=backend)


def call(override, session, grid, q, k, v, heads, step=0, **kwargs):
    ctx = session.forward_context(grid, SIGMAS[step], SIGMAS)
    return override(comfy_attention, q, k, v, heads, transformer_options={core.CONTEXT_KEY: ctx}, **kwargs)


def to_bhld(t, layout, heads):
    """The (B, H, L, D) view of a call's q/k/v or output in ``layout`` ('wan': (B, L, H*D), else (B, H, L, D))."""
    if layout == "wan":
        B, L, HD = t.shape
        return t.reshape(B, L, heads, HD // heads).transpose(1, 2)
    return t


def random_inputs(B, H, L, D, dtype, device="cpu", layout="wan", seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    shape = (B, L, H * D) if layout == "wan" else (B, H, L, D)
    return tuple(torch.randn(shape, generator=gen, device=device).to(dtype) for _ in range(3))


def check_sparse(out, q, k, v, heads, grid, session, layout, out_layout="wan"):
    """The override's output equals float64 dense attention under the Radial block mask of ``grid``."""
    mask = core.radial_block_mask(grid, session.method)
    want = masked_reference(*(to_bhld(t, layout, heads).cpu() for t in (q, k, v)), mask, session.method.block_size)
    got = to_bhld(out, out_layout, heads).cpu().double()
    assert got.shape == want.shape
    err = float((got - want).norm() / want.norm())
    assert err < TOL[q.dtype], f"relative error {err:.2e} against the masked dense reference"


def our_warnings(caplog):
    return [r for r in caplog.records if r.name == LOGGER and r.levelno >= logging.WARNING]


# ------------------------------------------------------------------------------------------------------------------
# Inputs through the real dispatcher.

INPUT_CASES = {
    # name: (grid, batch, heads, head_dim, dtype, backend, layout, skip_output_reshape)
    "fp32-B1": (core.VideoGrid(5, 8, 8), 1, 2, 64, torch.float32, "reference", "wan", False),
    "fp32-B2-odd-frames": (core.VideoGrid(3, 6, 10), 2, 2, 32, torch.float32, "reference", "wan", False),
    "fp32-B3": (core.VideoGrid(6, 5, 7), 3, 1, 16, torch.float32, "reference", "wan", False),
    "fp32-B4-hunyuan-layout": (core.VideoGrid(4, 6, 6), 4, 2, 32, torch.float32, "reference", "bhld", False),
    "fp32-bhld-out": (core.VideoGrid(4, 6, 6), 2, 2, 32, torch.float32, "reference", "bhld", True),
    "fp32-D80": (core.VideoGrid(5, 8, 8), 2, 2, 80, torch.float32, "reference", "wan", False),
    "fp32-D96": (core.VideoGrid(5, 8, 8), 1, 2, 96, torch.float32, "reference", "bhld", False),
    "shorter-than-a-block": (core.VideoGrid(1, 3, 5), 2, 2, 32, torch.float32, "reference", "wan", False),
    "shorter-than-a-block-2-frames": (core.VideoGrid(2, 2, 3), 3, 2, 64, torch.float32, "reference", "bhld", False),
    # The Triton kernel (CPU: its interpreter): head_dim 80 and 96 take the zero-padded path (to 128).
    "triton-bf16-D80": (core.VideoGrid(3, 4, 8), 1, 2, 80, torch.bfloat16, "triton", "wan", False),
    "triton-bf16-D96": (core.VideoGrid(3, 4, 8), 1, 1, 96, torch.bfloat16, "triton", "bhld", False),
    "triton-bf16-shorter-than-a-block": (core.VideoGrid(1, 2, 5), 2, 1, 64, torch.bfloat16, "triton", "wan", False),
}


@pytest.mark.parametrize("case", INPUT_CASES.values(), ids=INPUT_CASES.keys())
def test_inputs_run_sparse_and_match_reference(case, caplog):
    grid, B, H, D, dtype, backend, layout, skip_out = case
    if backend == "triton" and not kernels.triton_available("cpu") and not torch.cuda.is_available():
        pytest.skip("needs Triton (its CPU interpreter or a GPU)")
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    session = make_session(backend)
    override = core.attention_override(session)
    q, k, v = random_inputs(B, H, grid.total_tokens, D, dtype, device, layout)
    kwargs = dict(skip_reshape=layout != "wan", skip_output_reshape=skip_out)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        out = call(override, session, grid, q, k, v, H, **kwargs)
    assert not our_warnings(caplog) and not session.stats.fallbacks
    assert session.stats.sparse_calls + session.stats.dense_calls == 1 and out.dtype == dtype
    want_shape = (B, H, grid.total_tokens, D) if skip_out else (B, grid.total_tokens, H * D)
    assert out.shape == want_shape and out.is_contiguous()
    check_sparse(out, q, k, v, H, grid, session, layout, "bhld" if skip_out else "wan")


@pytest.mark.parametrize("head_dim", [160, 256])
@pytest.mark.parametrize("layout", ["wan", "bhld"])
def test_head_dim_over_128_runs_dense_with_one_warning(head_dim, layout, caplog):
    grid = core.VideoGrid(3, 4, 8)
    session = make_session()
    override = core.attention_override(session)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        for step in range(3):  # fresh inputs each call: one warning for all of them
            q, k, v = random_inputs(2, 2, grid.total_tokens, head_dim, torch.float32, layout=layout, seed=step)
            out = call(override, session, grid, q, k, v, 2, step=step, skip_reshape=layout != "wan")
            assert torch.equal(out, comfy_attention(q, k, v, 2, skip_reshape=layout != "wan"))
    warnings = our_warnings(caplog)
    assert len(warnings) == 1 and f"head_dim {head_dim}" in warnings[0].getMessage()
    assert "dense" in warnings[0].getMessage()
    assert session.stats.fallbacks == {"head-dim": 3} and session.stats.sparse_calls == 0


def test_batch_size_changes_between_steps(caplog):
    """Cond and uncond batched, then not (a conditioning that ends half-way), then a bigger batch: one shared
    layout serves every batch size and each call is exact."""
    grid = core.VideoGrid(5, 6, 10)
    session = make_session()
    override = core.attention_override(session)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        for step, B in enumerate([2, 1, 4, 3]):
            q, k, v = random_inputs(B, 2, grid.total_tokens, 32, torch.float32, seed=step)
            out = call(override, session, grid, q, k, v, 2, step=step)
            check_sparse(out, q, k, v, 2, grid, session, "wan")
    assert not our_warnings(caplog)
    assert list(session.planner._plans) == [(grid, torch.device("cpu"))]
    assert session.stats.sparse_calls == 4


NON_CONTIGUOUS = {
    # Wan: q, k, v as slices of one packed (B, L, 3 * H * D) projection
    "wan-packed-qkv": lambda B, H, L, D: [t for t in torch.randn(B, L, 3 * H * D).chunk(3, dim=-1)],
    # Wan: a (B, L, H * D) view of a (B, H * D, L) tensor: the last dimension is strided
    "wan-strided-last-dim": lambda B, H, L, D: [torch.randn(B, H * D, L).transpose(1, 2) for _ in range(3)],
    # HunyuanVideo layout: (B, H, L, D) views of token-major (B, L, H, D) tensors
    "bhld-token-major": lambda B, H, L, D: [torch.randn(B, L, H, D).transpose(1, 2) for _ in range(3)],
    # (B, H, L, D) with a strided head dimension (the kernel needs it contiguous: the dispatcher copies)
    "bhld-strided-last-dim": lambda B, H, L, D: [torch.randn(B, H, D, L).transpose(2, 3) for _ in range(3)],
    # slices of a longer sequence
    "bhld-sliced": lambda B, H, L, D: [torch.randn(B, H, L + 7, D)[:, :, 3:L + 3] for _ in range(3)],
}


@pytest.mark.parametrize("make", NON_CONTIGUOUS.values(), ids=NON_CONTIGUOUS.keys())
def test_non_contiguous_inputs(make, request, caplog):
    layout = "wan" if request.node.callspec.id.startswith("wan") else "bhld"
    grid = core.VideoGrid(5, 6, 10)
    B, H, D = 2, 2, 32
    torch.manual_seed(0)
    q, k, v = make(B, H, grid.total_tokens, D)
    assert not q.is_contiguous()
    session = make_session()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        out = call(core.attention_override(session), session, grid, q, k, v, H, skip_reshape=layout == "bhld")
    assert not our_warnings(caplog) and session.stats.sparse_calls == 1
    check_sparse(out, q, k, v, H, grid, session, layout)


def test_auto_backend_on_cpu_tensors_falls_back_with_one_warning(caplog):
    """backend 'auto' never forces the slow reference: CPU tensors stay on ComfyUI's attention, said once."""
    grid = core.VideoGrid(3, 4, 8)
    session = make_session(backend="auto")
    override = core.attention_override(session)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        for step in range(2):
            q, k, v = random_inputs(1, 2, grid.total_tokens, 32, torch.float32, seed=step)
            assert torch.equal(call(override, session, grid, q, k, v, 2, step=step), comfy_attention(q, k, v, 2))
    warnings = our_warnings(caplog)
    assert len(warnings) == 1 and "cpu" in warnings[0].getMessage() and "reference" in warnings[0].getMessage()
    assert session.stats.fallbacks == {"no-triton": 2}


@gpu
@pytest.mark.parametrize("backend, tol, chunk", [("auto", TOL[torch.bfloat16], None),
                                                 ("triton", TOL[torch.bfloat16], None),
                                                 ("auto", TOL[torch.bfloat16], "one-head"),
                                                 ("reference", TOL[torch.float32], None)])
def test_fp32_on_cuda(backend, tol, chunk, caplog, monkeypatch):
    """float32 q/k/v on a GPU: the Triton kernel runs them in bf16 (cast a few heads at a time, here also one head
    per launch) and the result comes back in float32; the reference backend keeps float32 throughout."""
    if chunk == "one-head":
        monkeypatch.setattr(import_pack("core.dispatcher"), "STAGE_CHUNK_BYTES", 1)
    grid = core.VideoGrid(5, 16, 16)
    session = make_session(backend)
    override = core.attention_override(session)
    seen = []
    attend = session.attend
    monkeypatch.setattr(session, "attend", lambda ctx, layer, q, *a, **kw: seen.append(q.dtype) or
                        attend(ctx, layer, q, *a, **kw))
    q, k, v = random_inputs(2, 2, grid.total_tokens, 64, torch.float32, "cuda")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        out = call(override, session, grid, q, k, v, 2)
    assert not our_warnings(caplog) and session.stats.sparse_calls == 1
    assert out.dtype == torch.float32 and out.device.type == "cuda"
    assert seen == [torch.float32] if backend == "reference" else \
        seen == [torch.bfloat16] * (2 if chunk else 1)  # 2 heads: one launch, or one per head
    mask = core.radial_block_mask(grid, session.method)
    want = masked_reference(*(to_bhld(t, "wan", 2).cpu() for t in (q, k, v)), mask, BLOCK)
    err = float((to_bhld(out, "wan", 2).cpu().double() - want).norm() / want.norm())
    assert err < tol


@gpu
def test_cpu_tensors_on_a_cuda_machine(caplog):
    """CPU tensors where a GPU exists (a model offloaded to the CPU): 'auto' and 'triton' fall back to ComfyUI's
    attention with one warning each; 'reference' runs them. Each device has its own planner and cached layouts."""
    grid = core.VideoGrid(3, 4, 8)
    q, k, v = random_inputs(1, 2, grid.total_tokens, 32, torch.bfloat16)
    for backend, key in (("auto", "no-triton"), ("triton", "kernel-rejected")):
        session = make_session(backend)
        override = core.attention_override(session)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            for step in range(2):
                assert torch.equal(call(override, session, grid, q, k, v, 2, step=step), comfy_attention(q, k, v, 2))
        assert len(our_warnings(caplog)) == 1 and session.stats.fallbacks == {key: 2}, backend
    session = make_session("reference")
    override = core.attention_override(session)
    out = call(override, session, grid, q, k, v, 2)
    check_sparse(out, q, k, v, 2, grid, session, "wan")
    qc, kc, vc = (t.cuda() for t in (q, k, v))
    out_cuda = call(override, session, grid, qc, kc, vc, 2)
    check_sparse(out_cuda, qc, kc, vc, 2, grid, session, "wan")
    plans = [planner._plans for planner in session.planners()]  # one planner per device
    assert [{key[1].type for key in p} for p in plans] == [{"cpu"}, {"cuda"}]
    for (g, device), plan in (item for p in plans for item in p.items()):
        assert plan.kv_indices.device.type == device.type and plan.kv_counts.device.type == device.type


# ------------------------------------------------------------------------------------------------------------------
# Memory: what the session keeps between calls is bounded and reported.

def test_cache_bytes_reported_and_bounded():
    session = make_session()
    override = core.attention_override(session)
    assert session.cache_bytes() == {}
    grids = [core.VideoGrid(f, 4, 8) for f in range(2, 9)]  # 7 resolutions, more than the planner keeps
    for i, grid in enumerate(grids):
        q, k, v = random_inputs(1, 1, grid.total_tokens, 16, torch.float32, seed=i)
        call(override, session, grid, q, k, v, 1)
        report = session.cache_bytes()
        assert len(report) == min(i + 1, radial_mod.MAX_PLANS)
        for (g, device), nbytes in report.items():
            plan = session.planner._plans[(g, device)]
            mask = core.radial_block_mask(g, session.method)
            nqb, width = mask.shape[0], int(mask.sum(-1).max())
            assert nbytes == plan.kv_indices.nbytes + plan.kv_counts.nbytes == nqb * width * 4 + nqb * 4
    assert set(session.cache_bytes()) == {(g, torch.device("cpu")) for g in grids[-radial_mod.MAX_PLANS:]}
    session.begin_run()  # a new run keeps the static layouts (and their bound)
    assert len(session.cache_bytes()) == radial_mod.MAX_PLANS


def test_memory_benchmark_smoke(capsys):
    memory = _load_benchmark("memory")
    assert memory.main(["--smoke"]) == 0
    out = capsys.readouterr().out
    assert "SMOKE OK" in out and "cached layouts" in out
    ok, line = memory.verdict(dense_peak=100 << 20, sparse_peak=90 << 20, extra_bytes=1 << 20, slack=0)
    assert ok and line.startswith("OK")
    ok, line = memory.verdict(dense_peak=100 << 20, sparse_peak=102 << 20, extra_bytes=1 << 20, slack=0)
    assert not ok and line.startswith("FAIL")


def test_sanitize_workload_smoke(capsys):
    if not kernels.triton_available("cpu") and not torch.cuda.is_available():
        pytest.skip("needs Triton (its CPU interpreter or a GPU)")
    sanitize = _load_benchmark("sanitize")
    if torch.cuda.is_available():
        pytest.skip("on a GPU the workload runs in full under benchmarks/sanitize.sh")
    assert sanitize.main(["--smoke"]) == 0
    assert "WORKLOAD OK: 3 cases" in capsys.readouterr().out
    t = sanitize.tail_empty((3, 5, 7), torch.bfloat16, "cpu")  # ends where its allocation ends
    storage = t.untyped_storage()
    assert t.data_ptr() + t.numel() * 2 == storage.data_ptr() + storage.nbytes()


# ------------------------------------------------------------------------------------------------------------------
# Bad settings are rejected at the node, naming the input and what it accepts.

NODE_BAD = [
    ("patch", dict(dense_steps=float("nan")), r"dense_steps must be a fraction in \[0, 1\) or a whole step count"),
    ("patch", dict(dense_steps=float("inf")), r"dense_steps must be a fraction in \[0, 1\) or a whole step count"),
    ("patch", dict(dense_steps=2.5), r"dense_steps must be a fraction in \[0, 1\) or a whole step count"),
    ("patch", dict(dense_steps=-1.0), r"dense_steps must be a fraction in \[0, 1\) or a whole step count"),
    ("patch", dict(sparse_end=float("nan")), r"sparse_end must be in \[0, 1\]"),
    ("patch", dict(sparse_end=-0.01), r"sparse_end must be in \[0, 1\]"),
    ("patch", dict(dense_layers=float("nan")), r"dense_layers must be >= 0"),
    ("patch", dict(dense_layers=-3), r"dense_layers must be >= 0"),
    ("patch", dict(backend="cuda"), r"backend must be one of \('auto', 'triton', 'reference'\)"),
    ("patch", dict(method="radial"), r"method must be the output of a sparse attention settings node"),
    ("radial", dict(decay_factor=float("nan")), r"decay_factor must be in \(0, 4\]"),
    ("radial", dict(decay_factor=float("inf")), r"decay_factor must be in \(0, 4\]"),
    ("radial", dict(decay_factor=0.0), r"decay_factor must be in \(0, 4\]"),
    ("radial", dict(block_size=96), r"block_size must be one of \(64, 128\)"),
]


@comfyui
@pytest.mark.parametrize("node, bad, message", NODE_BAD, ids=[f"{n}-{list(b)[0]}={list(b.values())[0]}"
                                                               for n, b, _ in NODE_BAD])
def test_nodes_reject_impossible_settings(nodes, node, bad, message):
    if node == "patch":
        args = dict(dense_steps=0.25, sparse_end=1.0, dense_layers=1, backend="auto", verbose=False, method=None)
        args.update(bad)
        run = lambda: nodes.SparseAttentionPatch().patch(comfy_env.tiny_wan_t2v(seed=0), **args)  # noqa: E731
    else:
        args = dict(decay_factor=0.2, block_size=128, attention_sink=True, text_dense=True)
        args.update(bad)
        run = lambda: nodes.RadialMask().settings(**args)  # noqa: E731
    with pytest.raises(ValueError, match=message):
        run()


@comfyui
def test_node_ranges_agree_with_the_core(nodes):
    """Every value the UI lets through at its bounds (min, max) is accepted: the widgets never offer a setting
    the node then refuses."""
    model = comfy_env.tiny_wan_t2v(seed=0)
    for cls, fixed in ((nodes.SparseAttentionPatch, dict(model=model)), (nodes.RadialMask, {})):
        spec = cls.INPUT_TYPES()["required"]
        defaults = {name: entry[1]["default"] for name, entry in spec.items()
                    if len(entry) > 1 and "default" in entry[1]}
        for name, entry in spec.items():
            options = entry[1] if len(entry) > 1 else {}
            for bound in ("min", "max"):
                if bound in options:
                    args = {**defaults, **fixed, name: options[bound]}
                    getattr(cls(), cls.FUNCTION)(**args)


# ------------------------------------------------------------------------------------------------------------------
# Tiny ComfyUI Wan: inputs through a real model.

def tiny_wan(dim=comfy_env.WAN_DIM, heads=comfy_env.WAN_HEADS, seed=0, dtype=torch.float32, manual_cast=None):
    """A tiny Wan 2.1 T2V of any head size (dim / heads), optionally with weights stored in ``dtype`` and cast to
    ``manual_cast`` per layer (ComfyUI's manual_cast ops, as for fp8 checkpoints)."""
    config = comfy_env.wan_config(comfy_env.wan_checkpoint(dim=dim), dim=dim, heads=heads)
    return comfy_env.build(config, seed, dtype, manual_cast)


@comfyui
def test_wan_head_dim_80_runs_the_padded_kernel(nodes, bridge, monkeypatch, caplog):
    """dim 160 / 2 heads = head_dim 80: the Triton kernel's zero-padded path, exact against the masked reference."""
    if not kernels.triton_available("cpu"):  # the tiny model runs on the CPU (the GPU path is in the gpu tests)
        pytest.skip("needs Triton's CPU interpreter (TRITON_INTERPRET=1, set by conftest without a GPU)")
    method = radial(nodes)
    patched = patch(nodes, tiny_wan(dim=160, seed=70, dtype=torch.bfloat16), method, dense_layers=1, backend="triton")
    session = bridge.session_of(patched)
    calls = spy_attend(monkeypatch, session)
    pos, neg = comfy_env.wan_conds(seed=71)
    with caplog.at_level(logging.WARNING, logger=LOGGER):  # cfg 1: one batch element (the interpreter is slow)
        out = comfy_env.sample(patched, latent(frames=4), pos, neg, steps=1, cfg=1.0, seed=72)
    assert torch.isfinite(out).all() and not our_warnings(caplog)
    assert len(calls) == comfy_env.WAN_LAYERS - 1 and all(c["q"].shape[-1] == 80 for c in calls)
    mask = core.radial_block_mask(core.VideoGrid(4, 8, 8), method)
    assert not bool(mask.all())
    for c in calls:
        want = masked_reference(c["q"], c["k"], c["v"], mask, BLOCK)
        assert float((c["out"].double() - want).norm() / want.norm()) < TOL[torch.bfloat16]


@comfyui
def test_wan_head_dim_160_stays_dense_with_one_warning(nodes, bridge, caplog):
    base = tiny_wan(dim=320, seed=73)
    patched = patch(nodes, base, radial(nodes), dense_layers=0)
    pos, neg = comfy_env.wan_conds(seed=74)
    dense = comfy_env.sample(base, latent(frames=5), pos, neg, steps=2, seed=75)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        sparse = comfy_env.sample(patched, latent(frames=5), pos, neg, steps=2, seed=75)
    assert torch.equal(sparse, dense)
    warnings = our_warnings(caplog)
    assert len(warnings) == 1 and "head_dim 160" in warnings[0].getMessage()
    stats = bridge.session_of(patched).stats
    assert stats.sparse_calls == 0 and stats.fallbacks == {"head-dim": 2 * comfy_env.WAN_LAYERS}


@comfyui
@pytest.mark.parametrize("batch, cfg, want", [(1, 1.0, 1), (1, 3.0, 2), (3, 1.0, 3), (2, 3.0, 4)])
def test_wan_batch_sizes(nodes, bridge, monkeypatch, batch, cfg, want):
    """Latent batches of 1-3, with and without CFG (cond and uncond batched): batch 1 to 4 in attention."""
    method = radial(nodes)
    patched = patch(nodes, comfy_env.tiny_wan_t2v(seed=76), method, dense_layers=1)
    calls = spy_attend(monkeypatch, bridge.session_of(patched))
    pos, neg = comfy_env.wan_conds(seed=77)
    out = comfy_env.sample(patched, latent(frames=5, batch=batch), pos, neg, steps=1, cfg=cfg, seed=78)
    assert out.shape[0] == batch and torch.isfinite(out).all()
    assert calls and {c["q"].shape[0] for c in calls} == {want}
    mask = core.radial_block_mask(core.VideoGrid(5, 8, 8), method)
    c = calls[-1]
    torch.testing.assert_close(c["out"].double(), masked_reference(c["q"], c["k"], c["v"], mask, BLOCK),
                               rtol=1e-4, atol=1e-5)


@comfyui
def test_wan_batch_changes_within_a_run(nodes, bridge, monkeypatch):
    """A negative prompt that ends half-way (ConditioningSetTimestepRange): cond + uncond batched (2), then the cond
    alone (1), in one run. Every call is exact; one layout serves both."""
    method = radial(nodes)
    patched = patch(nodes, comfy_env.tiny_wan_t2v(seed=79), method, dense_layers=1)
    session = bridge.session_of(patched)
    calls = spy_attend(monkeypatch, session)
    pos, neg = comfy_env.wan_conds(seed=80)
    neg = [[neg[0][0], {**neg[0][1], "start_percent": 0.0, "end_percent": 0.5}]]
    comfy_env.sample(patched, latent(frames=5), pos, neg, steps=4, seed=81)
    batch_per_step = {c["step"]: c["q"].shape[0] for c in calls}
    assert set(batch_per_step.values()) == {1, 2} and batch_per_step[0] == 2 and batch_per_step[3] == 1
    assert len(session.planner._plans) == 1
    mask = core.radial_block_mask(core.VideoGrid(5, 8, 8), method)
    for c in (calls[0], calls[-1]):
        torch.testing.assert_close(c["out"].double(), masked_reference(c["q"], c["k"], c["v"], mask, BLOCK),
                                   rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------------------------------
# Runs: interrupted, repeated, shared, paired.

def install_override(model, override):
    """A clone of ``model`` with ``override`` as its optimized_attention_override (another pack's, installed first)."""
    clone = model.clone()
    clone.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = override
    return clone


class RaiseOnce:
    """An override installed before ours that raises (like an out-of-memory error) in the middle of a forward, once."""

    def __init__(self, at_call):
        self.at_call, self.calls, self.raised = at_call, 0, False

    def __call__(self, func, *args, **kwargs):
        self.calls += 1
        if not self.raised and self.calls == self.at_call:
            self.raised = True
            raise RuntimeError("simulated failure inside the model")
        return func(*args, **kwargs)

    def __deepcopy__(self, memo):
        return self


@comfyui
@pytest.mark.parametrize("where", ["sampler-callback", "inside-a-forward"])
def test_interrupted_run_then_restart(nodes, bridge, monkeypatch, where):
    import comfy.model_management
    base = comfy_env.tiny_wan_t2v(seed=82)
    method = radial(nodes)
    pos, neg = comfy_env.wan_conds(seed=83)
    lat = latent(frames=5)
    fresh = patch(nodes, base, method, dense_layers=1)
    want = comfy_env.sample(fresh, lat, pos, neg, steps=4, seed=84)
    want_calls = dict(bridge.session_of(fresh).stats.calls)

    raiser = RaiseOnce(at_call=5)  # its 5th call: step 1, the cross-attention of layer 1 (after a sparse layer)
    model = patch(nodes, install_override(base, raiser) if where == "inside-a-forward" else base, method,
                  dense_layers=1)
    session = bridge.session_of(model)
    ends = []
    end_run = session.end_run
    monkeypatch.setattr(session, "end_run", lambda: ends.append(session.stats) or end_run())

    def interrupt(step, x0, x, total_steps):
        if step == 1:
            raise comfy.model_management.InterruptProcessingException()

    if where == "sampler-callback":
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            comfy_env.sample(model, lat, pos, neg, steps=4, seed=84, callback=interrupt)
    else:
        with pytest.raises(RuntimeError, match="simulated failure"):
            comfy_env.sample(model, lat, pos, neg, steps=4, seed=84)
    interrupted = session.stats
    assert len(ends) == 1 and ends[0] is interrupted  # the run was closed despite the exception
    assert {s for s, _ in interrupted.calls} == {0, 1} and len(interrupted.calls) < len(want_calls)

    out = comfy_env.sample(model, lat, pos, neg, steps=4, seed=84)  # started again
    assert torch.equal(out, want)
    assert session.stats is not interrupted and session.stats.calls == want_calls and not session.stats.fallbacks
    assert len(ends) == 2


@comfyui
def test_prompts_in_a_row_with_new_grids_get_their_own_plans(nodes, bridge, monkeypatch):
    """Prompt after prompt at other resolutions and frame counts: each run uses the layout of its own grid (cache
    keyed by grid and device), at most MAX_PLANS are kept, and a grid whose plan was evicted gets it rebuilt."""
    pos, neg = comfy_env.wan_conds(seed=85)
    method = radial(nodes)
    patched = patch(nodes, comfy_env.tiny_wan_t2v(seed=86), method, dense_layers=0)
    session = bridge.session_of(patched)
    used = []
    plan = session.planner.plan
    monkeypatch.setattr(session.planner, "plan",
                        lambda grid, q, k: used.append((grid, plan(grid, q, k))) or used[-1][1])
    runs = [(5, 16, 16), (7, 16, 24), (3, 24, 16), (9, 8, 8), (6, 16, 8), (5, 16, 16)]
    for frames, height, width in runs:
        used.clear()
        comfy_env.sample(patched, latent(frames=frames, height=height, width=width), pos, neg, steps=1, seed=87)
        grid = core.VideoGrid(frames, height // 2, width // 2)
        mask = core.radial_block_mask(grid, method)
        assert {g for g, _ in used} == {grid}
        for _, p in used:
            assert p.kv_counts.flatten().tolist() == mask.sum(-1).tolist()
            assert p.density == pytest.approx(float(mask.float().mean()))
        assert session.stats.calls and all(d == pytest.approx(float(mask.float().mean()))
                                           for d in session.stats.calls.values())
        keys = set(session.cache_bytes())
        assert (grid, torch.device("cpu")) in keys and len(keys) <= radial_mod.MAX_PLANS
    assert len(session.cache_bytes()) == radial_mod.MAX_PLANS  # the first grid was evicted, then rebuilt


@comfyui
def test_one_patched_model_two_samplers(nodes, bridge, monkeypatch):
    """One patched model feeding two samplers in one graph (a render, then a refine pass at denoise 0.5 on its
    output): each run's statistics are its own and the first run's stay as they were."""
    patched = patch(nodes, comfy_env.tiny_wan_t2v(seed=88), radial(nodes), dense_steps=0.25, dense_layers=1)
    session = bridge.session_of(patched)
    finished = []
    end_run = session.end_run
    monkeypatch.setattr(session, "end_run", lambda: finished.append((session.stats, dict(session.stats.calls)))
                        or end_run())
    pos, neg = comfy_env.wan_conds(seed=89)
    first = comfy_env.sample(patched, latent(frames=5), pos, neg, steps=3, seed=90)
    comfy_env.sample(patched, first, pos, neg, steps=4, seed=91, denoise=0.5)
    (stats1, calls1), (stats2, calls2) = finished
    layers = range(comfy_env.WAN_LAYERS)
    assert stats1 is not stats2 and stats1.calls == calls1  # the second run left the first one's alone
    assert set(calls1) == {(s, l) for s in range(3) for l in layers}
    assert set(calls2) == {(s, l) for s in range(4) for l in layers}  # steps count within the refine pass
    assert {k for k, d in calls1.items() if d < 1} == {(s, l) for s in (1, 2) for l in (1, 2)}
    assert {k for k, d in calls2.items() if d < 1} == {(s, l) for s in (1, 2, 3) for l in (1, 2)}


@comfyui
def test_wan22_high_and_low_noise_models_keep_their_own_sessions(nodes, bridge):
    """Wan 2.2 A14B: a high-noise and a low-noise model (two loaders), each patched with its own settings, the
    first sampling steps 0-1 and the second 2-3 of one 4-step schedule (KSamplerAdvanced)."""
    import comfy.sample
    high_method, low_method = radial(nodes, decay=0.2), radial(nodes, decay=0.5, sink=False)
    high = patch(nodes, comfy_env.tiny_wan_t2v(seed=92), high_method, dense_layers=0)
    low = patch(nodes, comfy_env.tiny_wan_t2v(seed=93), low_method, dense_layers=1)
    s_high, s_low = bridge.session_of(high), bridge.session_of(low)
    assert s_high is not s_low
    pos, neg = comfy_env.wan_conds(seed=94)
    lat = latent(frames=9)
    grid = core.VideoGrid(9, 8, 8)
    d_high = float(core.radial_block_mask(grid, high_method).float().mean())
    d_low = float(core.radial_block_mask(grid, low_method).float().mean())
    assert d_high != d_low and max(d_high, d_low) < 1.0

    def pair():
        mid = comfy_env.sample(high, lat, pos, neg, steps=4, seed=95, start_step=0, last_step=2,
                               force_full_denoise=False)
        return comfy.sample.sample(low, torch.zeros_like(mid), 4, 3.0, "euler", "simple", pos, neg, mid,
                                   start_step=2, last_step=4, disable_pbar=True, seed=95)

    out = pair()
    layers = range(comfy_env.WAN_LAYERS)
    assert set(s_high.stats.calls) == set(s_low.stats.calls) == {(s, l) for s in range(2) for l in layers}
    assert all(d == pytest.approx(d_high) for d in s_high.stats.calls.values())
    assert {l: d for (_, l), d in s_low.stats.calls.items()} == {0: 1.0, 1: pytest.approx(d_low),
                                                                 2: pytest.approx(d_low)}
    assert [p.density for p in s_high.planner._plans.values()] == [pytest.approx(d_high)]
    assert [p.density for p in s_low.planner._plans.values()] == [pytest.approx(d_low)]
    assert torch.equal(pair(), out)  # again: the same, nothing carried over from the first pair


# ------------------------------------------------------------------------------------------------------------------
# Other patches on the same model.

LORA_KEYS = ("diffusion_model.blocks.1.self_attn.q.weight", "diffusion_model.blocks.2.self_attn.v.weight",
             "diffusion_model.blocks.0.cross_attn.o.weight")


def with_lora(model, seed=96):
    """ModelPatcher.add_patches with plain weight differences, as a LoRA loader adds them."""
    gen = torch.Generator().manual_seed(seed)
    sd = model.model.state_dict()
    clone = model.clone()
    added = clone.add_patches({key: (torch.randn(sd[key].shape, generator=gen) * 0.2,) for key in LORA_KEYS}, 1.0)
    assert sorted(added) == sorted(LORA_KEYS)
    return clone


@comfyui
def test_lora_before_and_after_the_patch(nodes, bridge, monkeypatch):
    base = comfy_env.tiny_wan_t2v(seed=97)
    pos, neg = comfy_env.wan_conds(seed=98)
    full = radial(nodes, decay=4.0)  # 3 frames: a fully dense layout, so the sparse path must equal dense exactly
    lat = latent(frames=3)
    plain = comfy_env.sample(base, lat, pos, neg, steps=2, seed=99)
    want = comfy_env.sample(with_lora(base), lat, pos, neg, steps=2, seed=99)
    assert rel_err(want, plain) > 1e-3  # the LoRA changes the result

    for name, model in (("lora-then-patch", patch(nodes, with_lora(base), full)),
                        ("patch-then-lora", with_lora(patch(nodes, base, full)))):
        session = bridge.session_of(model)
        calls = spy_attend(monkeypatch, session)
        out = comfy_env.sample(model, lat, pos, neg, steps=2, seed=99)
        assert len(calls) == 2 * comfy_env.WAN_LAYERS, name  # every self-attention took the sparse path
        torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4, msg=name)

    sparse = radial(nodes)  # and with a real sparse layout the LoRA still applies under the patch
    lat = latent(frames=5)
    patched = patch(nodes, base, sparse, dense_layers=1)
    out_patched = comfy_env.sample(patched, lat, pos, neg, steps=2, seed=99)
    out_lora = comfy_env.sample(with_lora(patched), lat, pos, neg, steps=2, seed=99)
    assert bridge.session_of(patched).stats.sparse_calls == 2 * (comfy_env.WAN_LAYERS - 1)
    assert rel_err(out_lora, out_patched) > 1e-3
    assert torch.equal(comfy_env.sample(base, lat, pos, neg, steps=2, seed=99),
                       comfy_env.sample(base, lat, pos, neg, steps=2, seed=99))


@comfyui
def test_fp8_weights_with_manual_cast(nodes, bridge, monkeypatch):
    """Weights stored as float8_e4m3fn, cast per layer to float32 by ComfyUI's manual_cast ops (how fp8 checkpoints
    run where the compute dtype differs): attention sees float32 activations, the patch works as with any weights."""
    if not hasattr(torch, "float8_e4m3fn"):
        pytest.skip("this torch has no float8_e4m3fn")
    base = tiny_wan(seed=100, dtype=torch.float8_e4m3fn, manual_cast=torch.float32)
    q_proj = base.model.diffusion_model.blocks[0].self_attn.q
    assert q_proj.weight.dtype == torch.float8_e4m3fn and "manual_cast" in type(q_proj).__qualname__
    pos, neg = comfy_env.wan_conds(seed=101)
    lat = latent(frames=3)
    dense = comfy_env.sample(base, lat, pos, neg, steps=2, seed=102)
    full = patch(nodes, base, radial(nodes, decay=4.0))
    torch.testing.assert_close(comfy_env.sample(full, lat, pos, neg, steps=2, seed=102), dense, rtol=1e-4, atol=1e-4)

    method = radial(nodes)
    patched = patch(nodes, base, method, dense_layers=1)
    calls = spy_attend(monkeypatch, bridge.session_of(patched))
    out = comfy_env.sample(patched, latent(frames=5), pos, neg, steps=2, seed=102)
    assert torch.isfinite(out).all() and len(calls) == 2 * (comfy_env.WAN_LAYERS - 1)
    assert {c["q"].dtype for c in calls} == {torch.float32}
    mask = core.radial_block_mask(core.VideoGrid(5, 8, 8), method)
    c = calls[-1]
    torch.testing.assert_close(c["out"].double(), masked_reference(c["q"], c["k"], c["v"], mask, BLOCK),
                               rtol=1e-4, atol=1e-5)


@comfyui
def test_patch_survives_unpatch_detach_and_unload(nodes, bridge):
    """ComfyUI loads, unpatches, detaches and unloads models between and during prompts (offloading). The patch
    lives in model_options and wrappers, not in the weights: it is still there afterwards, and the cached layouts
    are keyed by device (here all on the CPU; a GPU move cannot be exercised without a GPU)."""
    import comfy.model_management
    base = comfy_env.tiny_wan_t2v(seed=103)
    patched = patch(nodes, base, radial(nodes), dense_layers=1)
    session = bridge.session_of(patched)
    pos, neg = comfy_env.wan_conds(seed=104)
    lat = latent(frames=5)
    first = comfy_env.sample(patched, lat, pos, neg, steps=2, seed=105)
    calls = dict(session.stats.calls)

    patched.patch_model()
    patched.unpatch_model(patched.offload_device)
    patched.detach()
    comfy.model_management.unload_all_models()
    comfy.model_management.soft_empty_cache()
    assert bridge.session_of(patched) is session
    assert "optimized_attention_override" in patched.model_options["transformer_options"]

    again = comfy_env.sample(patched, lat, pos, neg, steps=2, seed=105)
    assert torch.equal(again, first) and session.stats.calls == calls and session.stats.sparse_calls > 0
    for (grid, device), plan in session.planner._plans.items():
        assert device == plan.kv_indices.device == plan.kv_counts.device == torch.device("cpu")


@comfyui
def test_patched_twice_the_second_patch_replaces_the_first(nodes, bridge, caplog):
    """Two Sparse Attention Patch nodes in a row: the second one's settings apply alone (its session counts every
    layer once), with one warning; the result is that of the second patch alone."""
    base = comfy_env.tiny_wan_t2v(seed=106)
    pos, neg = comfy_env.wan_conds(seed=107)
    lat = latent(frames=5)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        first = patch(nodes, base, radial(nodes, decay=0.2), dense_layers=1)
        second = patch(nodes, first, radial(nodes, decay=1.0, sink=False), dense_layers=2)
    warnings = our_warnings(caplog)
    assert len(warnings) == 1 and "already has a Sparse Attention Patch" in warnings[0].getMessage()
    out = comfy_env.sample(second, lat, pos, neg, steps=2, seed=108)
    alone = patch(nodes, base, radial(nodes, decay=1.0, sink=False), dense_layers=2)
    assert torch.equal(out, comfy_env.sample(alone, lat, pos, neg, steps=2, seed=108))
    s1, s2 = bridge.session_of(first), bridge.session_of(second)
    assert s1 is not s2 and not s1.stats.calls
    assert set(s2.stats.calls) == {(s, l) for s in range(2) for l in range(comfy_env.WAN_LAYERS)}
    assert {k for k, d in s2.stats.calls.items() if d < 1} == {(0, 2), (1, 2)}
    assert torch.equal(comfy_env.sample(first, lat, pos, neg, steps=2, seed=108),  # the first model is unchanged
                       comfy_env.sample(patch(nodes, base, radial(nodes, decay=0.2), dense_layers=1), lat, pos, neg,
                                        steps=2, seed=108))


class Outer:
    """Another pack's override installed AFTER ours, wrapping it (calls it for everything)."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    def __call__(self, func, *args, **kwargs):
        self.calls += 1
        return self.inner(func, *args, **kwargs)

    def __deepcopy__(self, memo):
        return self


@comfyui
def test_override_installed_after_ours_still_reaches_ours(nodes, bridge):
    base = comfy_env.tiny_wan_t2v(seed=109)
    pos, neg = comfy_env.wan_conds(seed=110)
    lat = latent(frames=5)
    patched = patch(nodes, base, radial(nodes), dense_layers=1)
    want = comfy_env.sample(patched, lat, pos, neg, steps=2, seed=111)
    want_calls = dict(bridge.session_of(patched).stats.calls)
    wrapped = patched.clone()
    options = wrapped.model_options["transformer_options"]
    outer = options["optimized_attention_override"] = Outer(options["optimized_attention_override"])
    assert torch.equal(comfy_env.sample(wrapped, lat, pos, neg, steps=2, seed=111), want)
    assert outer.calls == 2 * 2 * comfy_env.WAN_LAYERS  # self and cross-attention, 2 steps
    assert bridge.session_of(wrapped).stats.calls == want_calls


# ------------------------------------------------------------------------------------------------------------------
# torch.compile (ComfyUI's TorchCompileModel node).

@comfyui
def test_torch_compile_of_a_patched_model(nodes, bridge):
    """TorchCompileModel on a patched model: Dynamo traces the diffusion model; attention calls run eagerly (graph
    breaks), so results and per-(step, layer) statistics equal the uncompiled run, and the compiled graphs do not
    depend on the step or the sigma (the step is worked out outside the traced code): a 3-step run compiles exactly
    what a 1-step run does, and new sigmas compile nothing. Backend "eager": Dynamo's tracing, which is what meets
    the patch; inductor's code generation is tested on the GPU (test_torch_compile_inductor)."""
    from comfy_api.torch_helpers import set_torch_compile_wrapper
    from torch._dynamo.utils import counters
    patched = patch(nodes, comfy_env.tiny_wan_t2v(seed=112), radial(nodes), dense_layers=1)
    session = bridge.session_of(patched)
    compiled = patched.clone()
    set_torch_compile_wrapper(model=compiled, backend="eager")
    pos, neg = comfy_env.wan_conds(seed=113)
    lat = latent(frames=5)
    graphs = {}
    try:
        for steps in (1, 3):
            eager = comfy_env.sample(patched, lat, pos, neg, steps=steps, seed=114)
            eager_calls = dict(session.stats.calls)
            torch._dynamo.reset()
            counters.clear()
            out = comfy_env.sample(compiled, lat, pos, neg, steps=steps, seed=114)
            graphs[steps] = counters["stats"]["unique_graphs"]
            torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
            assert session.stats.calls == eager_calls
            assert session.stats.sparse_calls == steps * (comfy_env.WAN_LAYERS - 1)
        assert graphs[1] > 0 and graphs[3] == graphs[1], f"graphs compiled per run: {graphs}"
        comfy_env.sample(compiled, lat, pos, neg, steps=3, seed=114, denoise=0.6)  # other sigmas, same step count
        assert counters["stats"]["unique_graphs"] == graphs[3], "new sigmas recompiled the model"
    finally:
        torch._dynamo.reset()


@gpu
@comfyui
def test_torch_compile_inductor(nodes, bridge):
    """The same with inductor (the TorchCompileModel default), on the GPU machine (on a CPU it compiles C++: slow)."""
    from comfy_api.torch_helpers import set_torch_compile_wrapper
    torch._dynamo.reset()
    try:
        patched = patch(nodes, comfy_env.tiny_wan_t2v(seed=115), radial(nodes), dense_layers=1)
        pos, neg = comfy_env.wan_conds(seed=116)
        eager = comfy_env.sample(patched, latent(frames=5), pos, neg, steps=2, seed=117)
        compiled = patched.clone()
        set_torch_compile_wrapper(model=compiled, backend="inductor")
        out = comfy_env.sample(compiled, latent(frames=5), pos, neg, steps=2, seed=117)
        torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-4)
        assert bridge.session_of(compiled).stats.sparse_calls == 2 * (comfy_env.WAN_LAYERS - 1)
    finally:
        torch._dynamo.reset()
