"""SVG (Sparse VideoGen): layouts, the token-major transform, the profiling and row-gather kernels, the online head
classification, and the planner against a float64 oracle. No ComfyUI needed (test_svg_comfy.py runs it inside
ComfyUI). Runs the Triton kernels under the interpreter on the CPU.

The layout rule, restated here independently of core/svg_layout.py: with n video blocks and h the band half-width
whose share of the n x n tiles is closest to the sparsity, a query token i and a key token j (block size b, F
frames of S tokens, token-major position P(f * S + p) = p * F + f, text tokens in place) are computed when
  * spatial heads: |i // b - j // b| <= h, or (attention sink) j // b holds a token of frame 0;
  * temporal heads: |P(i) // b - P(j) // b| <= h;
and always when i or j lies in a block (of that layout's token order) holding a text token.

Inputs are random on every run; each test prints its seed: rerun with BSA_SEED=<seed> to reproduce a failure.
"""

from __future__ import annotations

import math

import pytest
import torch

from pack import import_pack
from test_block_sparse_kernel import new_generator

core = import_pack("core")
kernels = import_pack("kernels")
layout = import_pack("core.svg_layout")
svg = import_pack("core.svg")

VideoGrid, SVGSettings = core.VideoGrid, core.SVGSettings

pytestmark = [pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")]

TRITON_TOL = {torch.bfloat16: 2e-2, torch.float16: 4e-3}


@pytest.fixture(autouse=True)
def _interpreter_only(request):
    """The 'triton' cases here build CPU tensors for Triton's interpreter; on a CUDA machine (no interpreter) they
    cannot run, and tests/test_svg_gpu.py covers the kernels on the GPU instead."""
    params = getattr(getattr(request.node, "callspec", None), "params", {})
    if params.get("backend") == "triton" and torch.cuda.is_available():
        pytest.skip("CPU-interpreter case; the GPU runs tests/test_svg_gpu.py")


@pytest.fixture
def gen():
    return new_generator()


# ------------------------------------------------------------------------------------------------------------------
# The rule, token by token (the oracle of every test below)

def token_major(grid: VideoGrid) -> torch.Tensor:
    """P(i): the token-major position of original token i."""
    i = torch.arange(grid.total_tokens)
    frame, p = i // grid.tokens_per_frame, i % grid.tokens_per_frame
    return torch.where(i < grid.video_tokens, p * grid.frames + frame, i)


def half_width(grid: VideoGrid, st: SVGSettings) -> int:
    n = grid.video_tokens // st.block_size if grid.text_tokens else -(-grid.total_tokens // st.block_size)
    shares = [float(((torch.arange(n)[:, None] - torch.arange(n)[None, :]).abs() <= h).double().mean())
              for h in range(n)]
    return min(range(n), key=lambda h: abs(shares[h] - st.sparsity))


def token_rules(grid: VideoGrid, st: SVGSettings):
    """(spatial, temporal) bool (L, L) token masks in the original order."""
    b, h = st.block_size, half_width(grid, st)
    i = torch.arange(grid.total_tokens)
    first_text = grid.video_tokens // b if grid.text_tokens else 10 ** 9
    blk, tblk = i // b, token_major(grid) // b

    def text(blocks):
        return (blocks >= first_text)[:, None] | (blocks >= first_text)[None, :]

    sink = (blk < -(-grid.tokens_per_frame // b))[None, :] & st.attention_sink
    spatial = ((blk[:, None] - blk[None, :]).abs() <= h) | sink | text(blk)
    temporal = ((tblk[:, None] - tblk[None, :]).abs() <= h) | text(tblk)
    return spatial, temporal


def masked_oracle(q, k, v, masks, kv_length=None):
    """Float64 attention of (B, H, L, D) under a per-head (H, L, L) token mask (and key padding)."""
    B, H, L, D = q.shape
    allowed = masks[None].expand(B, -1, -1, -1)
    if kv_length is not None:
        allowed = allowed & (torch.arange(L)[None, None, None, :] < kv_length.view(-1, 1, 1, 1))
    s = torch.einsum("bhqd,bhkd->bhqk", q.double(), k.double()) / math.sqrt(D)
    return torch.einsum("bhqk,bhkd->bhqd", s.masked_fill(~allowed, float("-inf")).softmax(-1), v.double())


def rel_err(a, b):
    return float((a.double() - b).norm() / b.norm())


# ------------------------------------------------------------------------------------------------------------------
# Layouts and the token-major order

GRIDS = [VideoGrid(4, 8, 8), VideoGrid(5, 6, 10, text_tokens=37), VideoGrid(7, 5, 9), VideoGrid(3, 16, 12)]


@pytest.mark.parametrize("grid", GRIDS, ids=str)
def test_token_major_order_is_the_transposed_grid(grid):
    order, position = layout.token_major_order(grid), layout.token_major_position(grid)
    assert torch.equal(position, token_major(grid))
    assert torch.equal(order[position], torch.arange(grid.total_tokens))  # a permutation, position its inverse
    f, s = grid.frames, grid.tokens_per_frame
    assert order[:2 * f].tolist() == [fr * s + p for p in range(2) for fr in range(f)]  # position outer, frame inner
    assert order[grid.video_tokens:].tolist() == list(range(grid.video_tokens, grid.total_tokens))


@pytest.mark.parametrize("blocks", [1, 2, 5, 17, 591])
@pytest.mark.parametrize("sparsity", [0.05, 0.25, 0.3, 0.6, 0.95])
def test_band_half_width_is_the_closest_share(blocks, sparsity):
    h = layout.band_half_width(blocks, sparsity)
    share = lambda w: (blocks * (2 * w + 1) - w * (w + 1)) / blocks ** 2  # noqa: E731
    assert 0 <= h < blocks
    assert all(abs(share(h) - sparsity) <= abs(share(w) - sparsity) for w in range(blocks))
    if blocks > 100:
        assert abs(share(h) - sparsity) < 0.005


@pytest.mark.parametrize("grid", GRIDS, ids=str)
@pytest.mark.parametrize("st", [SVGSettings(sparsity=0.3, block_size=64),
                                SVGSettings(sparsity=0.6, block_size=64, attention_sink=False),
                                SVGSettings(sparsity=0.25, block_size=128)], ids=["s0.3", "s0.6-nosink", "b128"])
def test_block_masks_follow_the_token_rule(grid, st):
    """The block masks are the token rule at tile level: every tile all-kept or all-skipped, nothing else."""
    spatial, temporal = layout.svg_block_masks(grid, st.sparsity, st.block_size, st.attention_sink)
    want_s, want_t = token_rules(grid, st)
    b = st.block_size
    blk, tblk = torch.arange(grid.total_tokens) // b, token_major(grid) // b
    assert torch.equal(spatial[blk][:, blk], want_s)
    assert torch.equal(temporal[tblk][:, tblk], want_t)


def test_layouts_keep_about_the_sparsity_at_720p():
    grid = VideoGrid(21, 45, 80)
    spatial, temporal = layout.svg_block_masks(grid, 0.3, 128, True)
    assert abs(float(temporal.float().mean()) - 0.3) < 0.005
    assert 0.3 < float(spatial.float().mean()) < 0.36  # plus the first frame's 29 key blocks
    assert layout.sampled_rows(grid, 0.001).numel() == 76


@pytest.mark.parametrize("grid", GRIDS[:3], ids=str)
def test_inspector_mask_marks_tiles_holding_a_temporal_pair(grid):
    st = SVGSettings(sparsity=0.3, block_size=64)
    _, temporal_tok = token_rules(grid, st)
    nb = -(-grid.total_tokens // 64)
    pad = nb * 64 - grid.total_tokens
    tiles = torch.nn.functional.pad(temporal_tok, (0, pad, 0, pad)).view(nb, 64, nb, 64).any(dim=3).any(dim=1)
    assert torch.equal(layout.temporal_mask_in_original_order(grid, st.sparsity, 64), tiles)


def test_sampled_rows_are_strided_video_rows():
    grid = VideoGrid(21, 30, 52, text_tokens=40)
    rows = layout.sampled_rows(grid, 0.01)
    assert rows.numel() == round(0.01 * grid.video_tokens) and rows.unique().numel() == rows.numel()
    assert 0 <= int(rows.min()) and int(rows.max()) < grid.video_tokens  # never a text row
    gaps = rows.diff()
    assert int(gaps.max()) - int(gaps.min()) <= 1
    assert layout.sampled_rows(grid, 1e-6).numel() == layout.MIN_SAMPLED_ROWS
    assert layout.sampled_rows(VideoGrid(2, 4, 4), 0.5).tolist() == list(range(32))  # fewer video tokens than 64


# ------------------------------------------------------------------------------------------------------------------
# Row gather / scatter (the layout transform)

@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [64, 128, 40])
def test_gather_and_scatter_round_trip_exactly(backend, dtype, D, gen):
    grid = VideoGrid(5, 6, 7, text_tokens=11)
    B, H, L = 2, 3, grid.total_tokens
    x = torch.randn(B, L, H, D, generator=gen).to(dtype).transpose(1, 2)  # (B, H, L, D) view of Wan's layout
    heads = torch.tensor([2, 0])
    order = layout.token_major_order(grid)
    moved = kernels.gather_head_rows(x, heads, order, backend=backend)
    assert torch.equal(moved, x[:, heads][:, :, order]), f"seed={gen.initial_seed()}"
    out = torch.full((B, L, H, D), 7.0, dtype=dtype).transpose(1, 2)
    assert kernels.scatter_head_rows(moved, heads, order.to(torch.int32), out, backend=backend) is out
    assert torch.equal(out[:, heads], x[:, heads])  # back in the original order: exact
    assert bool((out[:, 1] == 7.0).all())  # heads not listed are untouched


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_gather_into_a_buffer_slice(backend, gen):
    x = torch.randn(1, 4, 150, 64, generator=gen).to(torch.bfloat16)
    buffer = torch.zeros(1, 3, 150, 64, dtype=torch.bfloat16)
    rows = torch.randperm(150, generator=gen)
    kernels.gather_head_rows(x, torch.tensor([3, 1]), rows, out=buffer[:, :2], backend=backend)
    assert torch.equal(buffer[:, :2], x[:, [3, 1]][:, :, rows]) and bool((buffer[:, 2] == 0).all())


@pytest.mark.parametrize("call, message", [
    (lambda x: kernels.gather_head_rows(x[0], torch.tensor([0]), torch.arange(4)), "must be a (B, H, L, D)"),
    (lambda x: kernels.gather_head_rows(x, torch.tensor([0.0]), torch.arange(4)), "heads must be a 1-D int32"),
    (lambda x: kernels.gather_head_rows(x, torch.tensor([0]), torch.arange(4), out=torch.empty(1, 1, 5, 8)),
     "out must be a (1, 1, 4, 8)"),
    (lambda x: kernels.gather_head_rows(x.transpose(2, 3), torch.tensor([0]), torch.arange(4)), "contiguous last"),
    (lambda x: kernels.scatter_head_rows(torch.empty(1, 2, 4, 8), torch.tensor([0]), torch.arange(4), x),
     "src must be a (1, 1, 4, 8)"),
])
def test_row_gather_rejects_bad_input(call, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        call(torch.zeros(1, 2, 6, 8))


# ------------------------------------------------------------------------------------------------------------------
# The profiling kernel: exact and candidate outputs of the sampled rows

def candidate_oracle(q_rows, k, v, keep, key_block, kv_length=None):
    """Float64 (3, B, H, R, D): exact, candidate 0, candidate 1 (rows without keys: 0)."""
    B, H, R, D = q_rows.shape
    LK = k.shape[2]
    masks = [torch.ones(R, LK, dtype=torch.bool, device=q_rows.device)]
    masks += [keep[m].bool()[:, key_block[m].long()] for m in range(2)]
    s = torch.einsum("bhrd,bhkd->bhrk", q_rows.double(), k.double()) / math.sqrt(D)
    out = []
    for mask in masks:
        allowed = mask[None, None].expand(B, H, R, LK)
        if kv_length is not None:
            allowed = allowed & (torch.arange(LK, device=q_rows.device)[None, None, None, :]
                                 < kv_length.view(-1, 1, 1, 1))
        p = s.masked_fill(~allowed, float("-inf")).softmax(-1).nan_to_num(0.0)
        out.append(torch.einsum("bhrk,bhkd->bhrd", p, v.double()))
    return torch.stack(out)


SMALL_TILES = dict(BLOCK_R=16, BLOCK_N=32, num_warps=4, num_stages=1)  # the GPU default's shape family


@pytest.mark.parametrize("backend, dtype, D, splits, config", [
    ("triton", torch.bfloat16, 64, 1, None), ("triton", torch.float16, 64, 3, SMALL_TILES),
    ("triton", torch.bfloat16, 128, 2, None), ("reference", torch.float32, 64, None, None),
    ("reference", torch.bfloat16, 128, None, None)])
def test_candidate_outputs_match_float64(backend, dtype, D, splits, config, gen):
    B, H, R, LK, NKB = 2, 2, 37, 203 if D == 64 else 131, 7  # the interpreter is slow at head_dim 128
    q = torch.randn(B, H, R, D, generator=gen).to(dtype)
    k, v = (torch.randn(B, LK, H, D, generator=gen).to(dtype).transpose(1, 2) for _ in range(2))  # strided
    keep = torch.rand(2, R, NKB, generator=gen) < 0.4
    keep[0, 5] = False  # a row candidate 0 gives no key
    key_block = torch.randint(0, NKB, (2, LK), generator=gen, dtype=torch.int32)
    kv_length = torch.tensor([LK, 110])
    got = kernels.candidate_mask_outputs(q, k, v, keep, key_block, kv_length=kv_length, backend=backend,
                                         splits=splits, config=config)
    want = candidate_oracle(q, k, v, keep, key_block, kv_length)
    tol = TRITON_TOL.get(dtype, 1e-5) if backend == "triton" else 1e-5
    for i in range(3):
        assert rel_err(got[i], want[i]) < tol, f"output {i} seed={gen.initial_seed()}"
    assert bool((got[1, :, :, 5] == 0).all())
    errors = kernels.candidate_mask_errors(q, k, v, keep, key_block, kv_length=kv_length, backend=backend)
    want_errors = (want[1:] - want[:1]).square().mean(dim=(-2, -1))
    torch.testing.assert_close(errors.double(), want_errors, rtol=0.05, atol=1e-4)


def test_candidate_errors_are_chunked_over_rows(gen, monkeypatch):
    q = torch.randn(2, 3, 25, 32, generator=gen)
    k, v = (torch.randn(2, 3, 70, 32, generator=gen) for _ in range(2))
    keep = torch.rand(2, 25, 4, generator=gen) < 0.5
    key_block = torch.randint(0, 4, (2, 70), generator=gen)
    whole = kernels.candidate_mask_errors(q, k, v, keep, key_block, backend="reference")
    monkeypatch.setattr(import_pack("kernels.mask_errors"), "ROW_CHUNK", 7)
    chunked = kernels.candidate_mask_errors(q, k, v, keep, key_block, backend="reference")
    torch.testing.assert_close(chunked, whole)
    want = candidate_oracle(q, k, v, keep, key_block)
    torch.testing.assert_close(chunked.double(), (want[1:] - want[:1]).square().mean(dim=(-2, -1)))


def test_candidate_partials_stay_within_their_byte_cap(monkeypatch):
    """A short call (Wan 1.3B 480p: 12 heads, 64 sampled rows, one row tile each) would take 64 key splits to fill
    the GPU; the float32 partials then held 76 MB. The splits stop where PARTIAL_BYTES is full; a long call's rows
    already fill the GPU with few splits."""
    pytest.importorskip("triton")
    triton_path = import_pack("kernels.mask_errors_triton")

    class Props:
        multi_processor_count = 132

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: Props())
    B, H, R, D = 1, 12, 64, 128
    split_bytes = 4 * B * H * R * (4 + 3 * D)
    splits = triton_path._default_splits(torch.device("cuda"), 1 * B * H, 256, split_bytes)
    assert splits * split_bytes <= triton_path.PARTIAL_BYTES < (splits + 1) * split_bytes
    long_call = 4 * 40 * 76 * 388  # Wan 14B 720p: 40 heads, 76 rows in 5 row tiles; 16 splits would fill the GPU
    assert triton_path._default_splits(torch.device("cuda"), 5 * 40, 600, long_call) == \
        triton_path.PARTIAL_BYTES // long_call < 16
    assert triton_path._default_splits(torch.device("cpu"), 12, 256, split_bytes) == 1


def test_candidate_outputs_pad_odd_head_dims(gen):
    q, k, v = (torch.randn(1, 2, n, 40, generator=gen).to(torch.bfloat16) for n in (20, 90, 90))
    keep = torch.rand(2, 20, 3, generator=gen) < 0.5
    key_block = torch.randint(0, 3, (2, 90), generator=gen)
    got = kernels.candidate_mask_outputs(q, k, v, keep, key_block, backend="triton")
    assert got.shape == (3, 1, 2, 20, 40)
    assert rel_err(got, candidate_oracle(q, k, v, keep, key_block)) < 2e-2, f"seed={gen.initial_seed()}"


@pytest.mark.parametrize("kwargs, message", [
    (dict(keep=torch.zeros(3, 4, 2, dtype=torch.bool)), r"keep must be a \(2, 4, NKB\)"),
    (dict(key_block=torch.zeros(2, 9, dtype=torch.int32)), r"key_block must be a \(2, 10\)"),
    (dict(key_block=torch.zeros(2, 10)), "int32 or int64"),
    (dict(kv_length=torch.tensor([3, 4])), r"kv_length must be a \(1,\)"),
])
def test_candidate_outputs_reject_bad_input(kwargs, message):
    args = dict(q_rows=torch.zeros(1, 1, 4, 8), k=torch.zeros(1, 1, 10, 8), v=torch.zeros(1, 1, 10, 8),
                keep=torch.zeros(2, 4, 2, dtype=torch.bool), key_block=torch.zeros(2, 10, dtype=torch.int32))
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        kernels.candidate_mask_outputs(**args)


# ------------------------------------------------------------------------------------------------------------------
# Planted heads: the classifier picks right; the planner equals the oracle of each head's layout

def planted_qkv(grid: VideoGrid, kinds: str, gen, B=2, D=64, dtype=torch.float32):
    """Heads whose queries match only keys of their own frame ('s': spatial) or of their own spatial position in
    every frame ('t': temporal); text tokens (if any) are noise. Sharp: the matched group holds ~97%+ of the mass."""
    L, s = grid.total_tokens, grid.tokens_per_frame
    i = torch.arange(L)
    heads = []
    for kind in kinds:
        group = torch.where(i < grid.video_tokens, i // s if kind == "s" else i % s, -1)
        u = torch.randn(max(grid.frames, s), D, generator=gen)
        u = u / u.norm(dim=-1, keepdim=True) * (8 * math.sqrt(D)) ** 0.5
        x = torch.where((group >= 0)[:, None], u[group.clamp(min=0)], torch.randn(L, D, generator=gen))
        heads.append(x)
    x = torch.stack(heads)[None] + 0.1 * torch.randn(B, len(kinds), L, D, generator=gen)
    v = torch.randn(B, len(kinds), L, D, generator=gen)
    return x.to(dtype), x.clone().to(dtype), v.to(dtype)


def call_of(grid, q, k, v, backend, layer=1, step=0, **kwargs):
    return core.AttentionCall(grid=grid, layer=layer, step=step, total_steps=10, q=q, k=k, v=v, backend=backend,
                              **kwargs)


def head_masks(grid, st, temporal_flags):
    spatial, temporal = token_rules(grid, st)
    return torch.stack([temporal if flag else spatial for flag in temporal_flags])


CASES = [  # grid, settings, head kinds, batch, dtype (triton), kv_length
    (VideoGrid(4, 8, 8), SVGSettings(sparsity=0.3, block_size=64), "stts", 2, torch.bfloat16, None),
    (VideoGrid(5, 6, 10, text_tokens=37), SVGSettings(sparsity=0.3, block_size=64, attention_sink=False), "tsst", 1,
     torch.float16, [320]),
    (VideoGrid(6, 4, 8), SVGSettings(sparsity=0.4, block_size=64), "ts", 2, torch.bfloat16, None),
]


def test_the_first_conditioning_classifies_the_heads(gen):
    """A CFG batch (2 conditionings of one latent) whose chunks disagree: the first chunk's heads decide, the second
    chunk is not profiled, and both run the first chunk's layouts."""
    grid, st = VideoGrid(4, 8, 8), SVGSettings(sparsity=0.3, block_size=64)
    first, second = planted_qkv(grid, "st", gen, B=1), planted_qkv(grid, "ts", gen, B=1)
    q, k, v = (torch.cat(pair) for pair in zip(first, second))
    planner = st.make_planner()
    out, _ = planner.attend(call_of(grid, q, k, v, "reference", conditionings=2))
    assert planner._classes[(1, grid, 0, 2)].temporal == (False, True), f"seed={gen.initial_seed()}"
    assert rel_err(out, masked_oracle(q, k, v, head_masks(grid, st, (False, True)))) < 1e-5


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_planted_heads_are_classified_and_each_equals_its_layout(backend, case, gen):
    grid, st, kinds, B, dtype, kv = CASES[case]
    dtype = dtype if backend == "triton" else torch.float32
    q, k, v = planted_qkv(grid, kinds, gen, B=B, dtype=dtype)
    kv_length = None if kv is None else torch.tensor(kv * B)
    planner = st.make_planner()
    out, density = planner.attend(call_of(grid, q, k, v, backend, kv_length=kv_length))
    flags = planner._classes[(1, grid, 0, len(kinds))].temporal
    assert flags == tuple(kind == "t" for kind in kinds), f"classes {flags} for {kinds}, seed={gen.initial_seed()}"
    masks = head_masks(grid, st, flags)
    want = masked_oracle(q, k, v, masks, kv_length)
    tol = TRITON_TOL[dtype] if backend == "triton" else 1e-5
    assert rel_err(out, want) < tol, f"seed={gen.initial_seed()}"
    spatial, temporal = layout.svg_block_masks(grid, st.sparsity, st.block_size, st.attention_sink)
    tiles = [float((temporal if flag else spatial).float().mean()) for flag in flags]
    assert density == pytest.approx(sum(tiles) / len(tiles)) and 0 < density < 1


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_random_heads_equal_their_layout_in_a_strided_output(backend, gen, monkeypatch):
    """Whatever the classes, each head equals the oracle of its layout; the output lands in a (B, L, H, D) view; the
    temporal heads go through more than one chunk of the reorder buffers."""
    grid = VideoGrid(4, 6, 9, text_tokens=13)
    B, H, D, L = 2, 3, 64, grid.total_tokens
    dtype = torch.bfloat16 if backend == "triton" else torch.float32
    q, k, v = (torch.randn(B, L, H, D, generator=gen).to(dtype).transpose(1, 2) for _ in range(3))
    st = SVGSettings(sparsity=0.35, block_size=64)
    assert svg.heads_per_chunk(q, svg.TEMPORAL_COPIES * svg.head_bytes(q)) == 1  # one head per chunk
    planner = st.make_planner()
    monkeypatch.setattr(planner, "profile", lambda call, plan: (True, False, True))
    buffer = torch.full((B, L, H, D), float("nan"), dtype=dtype)
    kv_length = torch.tensor([L, L - 9])
    out, _ = planner.attend(call_of(grid, q, k, v, backend, out=buffer.transpose(1, 2), kv_length=kv_length))
    assert out.data_ptr() == buffer.data_ptr()
    want = masked_oracle(q, k, v, head_masks(grid, st, (True, False, True)), kv_length)
    assert rel_err(buffer.transpose(1, 2), want) < (2e-2 if backend == "triton" else 1e-5), f"seed={gen.initial_seed()}"


def masked_lse_oracle(q, k, masks, kv_length=None):
    """Float64 natural-log LSE (B, H, L) of each row over the pairs of a per-head (H, L, L) token mask."""
    B, H, L, D = q.shape
    allowed = masks[None].expand(B, -1, -1, -1)
    if kv_length is not None:
        allowed = allowed & (torch.arange(L)[None, None, None, :] < kv_length.view(-1, 1, 1, 1))
    s = torch.einsum("bhqd,bhkd->bhqk", q.double(), k.double()) / math.sqrt(D)
    return s.masked_fill(~allowed, float("-inf")).logsumexp(-1)


@pytest.mark.parametrize("backend, flags", [("triton", (True, False, True)), ("reference", (True, False, True)),
                                            ("reference", (True, True, True)), ("reference", (False, False, False))],
                         ids=["triton-mixed", "mixed", "temporal", "spatial"])
def test_lse_of_the_kept_keys_in_the_original_order(backend, flags, gen, monkeypatch):
    """want_lse: call.lse is each row's LSE over exactly the pairs of its head's layout, temporal heads' rows back in
    the original order (text rows included, through several reorder chunks); without it call.lse stays None."""
    grid = VideoGrid(4, 6, 9, text_tokens=13)
    B, H, D, L = 2, 3, 64, grid.total_tokens
    dtype = torch.bfloat16 if backend == "triton" else torch.float32
    q, k, v = (torch.randn(B, H, L, D, generator=gen).to(dtype) for _ in range(3))
    st = SVGSettings(sparsity=0.35, block_size=64)
    assert svg.heads_per_chunk(q, svg.TEMPORAL_COPIES * svg.head_bytes(q)) == 1  # one head per chunk
    planner = st.make_planner()
    monkeypatch.setattr(planner, "profile", lambda call, plan: flags)
    kv_length = torch.tensor([L, L - 9])
    call = call_of(grid, q, k, v, backend, kv_length=kv_length, want_lse=True)
    out, _ = planner.attend(call)
    masks = head_masks(grid, st, flags)
    want = masked_lse_oracle(q, k, masks, kv_length)
    assert call.lse.shape == (B, H, L) and call.lse.dtype == torch.float32
    assert torch.allclose(call.lse.double(), want, rtol=0, atol=1e-4), \
        f"max err {float((call.lse.double() - want).abs().max())}, seed={gen.initial_seed()}"
    quiet = call_of(grid, q, k, v, backend, kv_length=kv_length)
    assert torch.equal(planner.attend(quiet)[0], out) and quiet.lse is None


def test_all_spatial_and_all_temporal_calls(gen):
    grid = VideoGrid(4, 8, 8)
    st = SVGSettings(sparsity=0.3, block_size=64)
    for kinds in ("ss", "tt"):
        q, k, v = planted_qkv(grid, kinds, gen, B=1)
        planner = st.make_planner()
        out, density = planner.attend(call_of(grid, q, k, v, "reference"))
        flags = tuple(kind == "t" for kind in kinds)
        assert planner._classes[(1, grid, 0, 2)].temporal == flags, f"seed={gen.initial_seed()}"
        assert rel_err(out, masked_oracle(q, k, v, head_masks(grid, st, flags))) < 1e-5
        spatial, temporal = layout.svg_block_masks(grid, 0.3, 64, True)
        assert density == pytest.approx(float((temporal if kinds == "tt" else spatial).float().mean()))


# ------------------------------------------------------------------------------------------------------------------
# Caching: per (layer, grid, heads), re-profiled every N steps, dropped per run

def test_classes_are_cached_reprofiled_and_reset(gen):
    grid = VideoGrid(4, 8, 8)
    q, k, v = planted_qkv(grid, "st", gen, B=1)
    planner = SVGSettings(sparsity=0.3, block_size=64, reprofile_every=3).make_planner()

    def run(step, layer=1, **kwargs):
        planner.attend(call_of(grid, q, k, v, "reference", layer=layer, step=step, **kwargs))
        return planner.profiled_calls

    assert run(4) == 1
    assert run(4) == 1 and run(5) == 1 and run(6) == 1  # steps 4..6 reuse the classes of step 4
    assert run(7) == 2                                  # 3 steps later: profiled again
    assert run(7, layer=2) == 3                         # another layer has its own classes
    assert run(8, layer=1) == 3
    # float32 calls arrive a few heads at a time: each head range has its own classes
    planner.attend(call_of(grid, q[:, 1:], k[:, 1:], v[:, 1:], "reference", layer=1, step=8, head_offset=1))
    assert planner.profiled_calls == 4
    mask = planner.block_mask(grid, 1)
    assert mask.shape == (3, 4, 4)  # heads 0-1 of the first call, head 1 of the second (offset 1)
    assert torch.equal(mask[0], layout.svg_block_masks(grid, 0.3, 64, True)[0])
    assert torch.equal(mask[1], layout.temporal_mask_in_original_order(grid, 0.3, 64))
    assert planner.block_mask(grid, 5) is None
    sizes = planner.cache_bytes()
    assert (grid, q.device) in sizes and (1, grid, 0, 2) in sizes and all(b > 0 for b in sizes.values())
    planner.reset()
    assert planner.block_mask(grid, 1) is None and run(8) == 5  # a new run profiles again
    assert (grid, q.device) in planner.cache_bytes()           # layouts survive runs


def test_unknown_step_profiles_every_call(gen):
    grid = VideoGrid(4, 8, 8)
    q, k, v = planted_qkv(grid, "st", gen, B=1)
    planner = SVGSettings(block_size=64, reprofile_every=5).make_planner()
    for _ in range(2):
        planner.attend(call_of(grid, q, k, v, "reference", step=None))
    assert planner.profiled_calls == 2


def test_planner_rejects_a_call_of_another_grid():
    grid = VideoGrid(4, 8, 8)
    q = torch.zeros(1, 2, 100, 64)
    with pytest.raises(ValueError, match="q has 100 tokens but the grid"):
        SVGSettings(block_size=64).make_planner().attend(call_of(grid, q, q, q, "reference"))


def test_session_runs_svg_through_the_dispatcher(gen):
    """The session and dispatcher take SVG like any method: the per-head layout reaches the Inspector's mask."""
    grid = VideoGrid(4, 8, 8)
    session = core.SparseAttentionSession(SVGSettings(block_size=64), core.SparseSchedule(dense_steps=0,
                                                                                          dense_layers=0),
                                          backend="reference")
    session.begin_run()
    ctx = session.forward_context(grid, sigma=1.0, sample_sigmas=torch.tensor([1.0, 0.5, 0.0]))
    q, k, v = planted_qkv(grid, "ts", gen, B=1)
    _, density = session.attend(ctx, 0, q, k, v)
    session.record_sparse(ctx, 0, grid, density)
    mask = session.block_mask(0)
    assert mask.shape == (2, 4, 4) and torch.equal(mask[0], layout.temporal_mask_in_original_order(grid, 0.25, 64))


# ------------------------------------------------------------------------------------------------------------------
# Settings

@pytest.mark.parametrize("kwargs, message", [
    (dict(sparsity=0.0), r"sparsity must be in \(0, 1\)"),
    (dict(sparsity=1.0), r"sparsity must be in \(0, 1\)"),
    (dict(sparsity=float("nan")), r"sparsity must be in \(0, 1\)"),
    (dict(sample_fraction=0.0), r"sample_fraction must be in \(0, 1\]"),
    (dict(sample_fraction=1.5), r"sample_fraction must be in \(0, 1\]"),
    (dict(reprofile_every=0), "reprofile_every must be a whole number of steps >= 1"),
    (dict(reprofile_every=1.5), "reprofile_every must be a whole number"),
    (dict(block_size=32), r"block_size must be one of \(64, 128\)"),
])
def test_settings_reject_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SVGSettings(**kwargs)


def test_presets_are_valid_settings():
    for preset in core.SVG_PRESETS:
        SVGSettings(sparsity=preset.sparsity, attention_sink=preset.attention_sink)
        core.SparseSchedule(dense_steps=preset.dense_steps, dense_layers=preset.dense_layers)
        assert preset.model in preset.text() and f"sparsity {preset.sparsity:g}" in preset.text()
