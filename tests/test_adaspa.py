"""AdaSpa: the block-mass kernels against a float64 oracle, the head-adaptive selection, the planner's pattern and
LSE cache, and the AdaSpa Search node inside ComfyUI (tiny WanModel and HunyuanVideo).

Kernel tests run the Triton kernels (the CPU interpreter without a GPU) and the torch reference at small, odd
shapes. Inputs are random on every run; each test prints its seed (rerun with BSA_SEED=<seed> to reproduce).
"""

from __future__ import annotations

import itertools
import logging
import math

import pytest
import torch

import comfy_env
from pack import import_pack
from test_block_sparse_kernel import LSE_TOL, OUT_TOL, make_qkv, new_generator

K = import_pack("kernels")
core = import_pack("core")
adaspa = import_pack("core.adaspa")
metrics = import_pack("core.metrics")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # conftest: no CUDA -> interpreter
BACKENDS = ("triton", "reference")
LOGGER = "sparse_video_attention"
comfyui = pytest.mark.comfyui

pytestmark = [pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")]


@pytest.fixture
def gen():
    return new_generator(DEVICE)


def oracle(q, k, v, block_size, *, kv_length=None, mass_lse=None):
    """Float64 dense attention: (out, lse, mass); mass against ``mass_lse`` (default: the rows' own LSE)."""
    B, H, LQ, D = q.shape
    LK = k.shape[2]
    s = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(D)
    if kv_length is not None:
        keep = torch.arange(LK, device=q.device)[None, :] < kv_length.to(q.device)[:, None]
        s = s.masked_fill(~keep[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    finite = torch.isfinite(lse)[..., None]
    out = torch.where(finite, torch.exp(s - torch.where(finite, lse[..., None], 0.0)), 0.0) @ v.double()
    ref = lse if mass_lse is None else mass_lse.double()
    weigh = torch.isfinite(ref)[..., None]
    p = torch.where(weigh, torch.exp(s - torch.where(weigh, ref[..., None], 0.0)), 0.0)
    nq, nk = -(-LQ // block_size), -(-LK // block_size)
    p = torch.nn.functional.pad(p, (0, nk * block_size - LK, 0, nq * block_size - LQ))
    return out, lse, p.view(B, H, nq, block_size, nk, block_size).sum(dim=(3, 5))


def rows_per_block(lse, block_size):
    """Query rows with at least one key, per query block: what each row of blocks of the mass must sum to."""
    finite = torch.isfinite(lse).double()
    pad = -lse.shape[-1] % block_size
    return torch.nn.functional.pad(finite, (0, pad)).unflatten(-1, (-1, block_size)).sum(-1)


def assert_mass(mass, expected, block_size, ctx):
    assert mass.dtype == torch.float32 and mass.shape == expected.shape, f"{ctx}: {mass.dtype} {tuple(mass.shape)}"
    assert torch.isfinite(mass).all(), f"{ctx}: non-finite mass"
    err = (mass.double() - expected).abs().max().item()
    assert err < 1e-5 * block_size, f"{ctx}: mass abs error {err:.2e}"


# (B, H, L, head_dim, block_size, dtype): odd lengths, head_dim 64 / 128 / 80 (zero-padded), both block sizes,
# batch > 1, bf16 and fp16.
CASES = {
    "B2-L100-D64-bs64-bf16": (2, 2, 100, 64, 64, torch.bfloat16),
    "B2-L100-D64-bs64-fp16": (2, 2, 100, 64, 64, torch.float16),
    "B1-L150-D128-bs128-bf16": (1, 2, 150, 128, 128, torch.bfloat16),
    "B2-L200-D80-bs64-fp16": (2, 1, 200, 80, 64, torch.float16),
}


# ------------------------------------------------------------------------------------------------------------------
# Kernels against float64

@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
@pytest.mark.parametrize("backend", BACKENDS)
def test_block_mass_matches_float64(backend, case, gen):
    B, H, L, D, bs, dtype = case
    q, k, _ = make_qkv(B, H, L, L, D, dtype, gen, scale=1.5)
    _, lse, expected = oracle(q, k, k, bs)
    mass = K.block_mass(q, k, lse.float(), block_size=bs, backend=backend)
    ctx = f"{backend} {case} seed={gen.initial_seed()}"
    assert_mass(mass, expected, bs, ctx)
    # With each row's own LSE every query row's probabilities sum to 1 over all key blocks.
    torch.testing.assert_close(mass.double().sum(-1), rows_per_block(lse, bs), rtol=1e-5, atol=1e-5, msg=ctx)


def dense_with_lse(q, k, v, block_size, backend, kv_length=None):
    """Dense attention with each row's LSE on the block-sparse kernel over every block (what a first search or a
    primed step runs where cuDNN's LSE is not at hand)."""
    layout = K.full_layout(-(-q.shape[2] // block_size), -(-k.shape[2] // block_size), q.device)
    return K.block_sparse_attention(q, k, v, *layout, block_size=block_size, kv_length=kv_length, backend=backend,
                                    return_lse=True)


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
@pytest.mark.parametrize("backend", BACKENDS)
def test_first_search_dense_lse_then_masses(backend, case, gen):
    """A first search's two passes: dense attention's output and LSE, then the masses against that LSE; a later
    search's masses against a stale (cached) LSE. All against float64."""
    B, H, L, D, bs, dtype = case
    q, k, v = make_qkv(B, H, L, L, D, dtype, gen, scale=1.5)
    want_out, want_lse, want_mass = oracle(q, k, v, bs)
    out, lse = dense_with_lse(q, k, v, bs, backend)
    ctx = f"{backend} {case} seed={gen.initial_seed()}"
    assert out.dtype == dtype and lse.dtype == torch.float32
    err = ((out.double() - want_out).norm() / want_out.norm()).item()
    assert err < OUT_TOL[dtype], f"{ctx}: output relative error {err:.2e}"
    assert (lse.double() - want_lse).abs().max().item() < LSE_TOL, ctx
    mass = K.block_mass(q, k, lse, block_size=bs, backend=backend)
    assert_mass(mass, oracle(q, k, v, bs, mass_lse=lse)[2], bs, ctx)
    torch.testing.assert_close(mass.double().sum(-1), rows_per_block(lse, bs), rtol=1e-5, atol=1e-5, msg=ctx)
    stale = (want_lse + 0.3 * torch.randn(want_lse.shape, generator=gen, device=DEVICE, dtype=torch.float64)).half()
    cached_mass = K.block_mass(q, k, stale, block_size=bs, backend=backend)
    assert_mass(cached_mass, oracle(q, k, v, bs, mass_lse=stale)[2], bs, f"{ctx} cached")


@pytest.mark.parametrize("backend", BACKENDS)
def test_dense_attention_with_lse_into_a_strided_buffer(backend, gen):
    """What a primed step runs: dense output (written into a (B, L, H, D) buffer's view) and each row's LSE."""
    q, k, v = make_qkv(2, 3, 193, 193, 64, torch.float16 if backend == "triton" else torch.float32, gen)
    storage = torch.full((q.shape[0], q.shape[2], q.shape[1], q.shape[3]), float("nan"), dtype=q.dtype,
                         device=q.device)
    out, lse = K.dense_attention_with_lse(q, k, v, out=storage.transpose(1, 2), backend=backend)
    want_out, want_lse, _ = oracle(q, k, v, 64)
    ctx = f"{backend} seed={gen.initial_seed()}"
    assert out.data_ptr() == storage.data_ptr() and lse.dtype == torch.float32, ctx
    torch.testing.assert_close(out.double(), want_out, rtol=2e-2, atol=2e-3, msg=ctx)
    assert (lse.double() - want_lse).abs().max().item() < LSE_TOL, ctx


@pytest.mark.parametrize("backend", BACKENDS)
def test_key_padding_and_empty_rows(backend, gen):
    """kv_length cuts keys per batch element; an element with no key has an LSE of -inf and no mass."""
    B, H, L, D, bs = 3, 2, 150, 64, 64
    q, k, v = make_qkv(B, H, L, L, D, torch.bfloat16, gen)
    kv_length = torch.tensor([L - 7, 0, 70], device=DEVICE)
    _, want_lse, want_mass = oracle(q, k, v, bs, kv_length=kv_length)
    _, lse = dense_with_lse(q, k, v, bs, backend, kv_length=kv_length)
    ctx = f"{backend} seed={gen.initial_seed()}"
    assert torch.isneginf(lse[1]).all() and torch.isfinite(lse[[0, 2]]).all(), ctx
    mass = K.block_mass(q, k, lse, block_size=bs, kv_length=kv_length, backend=backend)
    assert_mass(mass, want_mass, bs, ctx)
    assert (mass[1] == 0).all() and (mass[2, :, :, 2:] == 0).all(), f"{ctx}: padded keys carry no mass"


def _valid():
    q, k, v = (torch.randn(2, 2, 100, 64, device=DEVICE).to(torch.bfloat16) for _ in range(3))
    return q, k, v, torch.zeros(2, 2, 100, device=DEVICE)


@pytest.mark.parametrize("change, match", [
    (lambda a: {**a, "lse": a["lse"][:, :, :50]}, r"^lse must be a \(2, 2, 100\) float tensor"),
    (lambda a: {**a, "lse": a["lse"].long()}, r"^lse must be a \(2, 2, 100\) float tensor"),
    (lambda a: {**a, "block_size": 32}, r"^block_size must be one of"),
    (lambda a: {**a, "kv_length": torch.tensor([1])}, r"^kv_length must be a \(2,\)"),
    (lambda a: {**a, "backend": "flash"}, r"^backend must be one of"),
    (lambda a: {**a, **{n: torch.randn(2, 2, 100, 256, device=DEVICE).half() for n in "qk"}, "backend": "triton"},
     r"^head_dim 256 is not supported"),
], ids=["lse-shape", "lse-dtype", "block-size", "kv-length", "backend", "head-dim-256"])
def test_block_mass_bad_input(change, match):
    if "head_dim" in match and not K.triton_available(DEVICE):
        pytest.skip("needs the Triton backend")
    q, k, _, lse = _valid()
    with pytest.raises(ValueError, match=match):
        K.block_mass(**change(dict(q=q, k=k, lse=lse, backend="reference")))


# ------------------------------------------------------------------------------------------------------------------
# Head-adaptive selection

def random_mass(H, R, C, gen):
    """Per-head masses of peaked attention: rows of C blocks drawn from a heavy-tailed distribution."""
    raw = torch.exp(torch.randn(H, R, C, generator=gen) * torch.linspace(0.5, 3.0, H).view(H, 1, 1))
    return raw / raw.sum(-1, keepdim=True)


def select(mass, *, recall, low, high, per_head):
    """(picks, counts, recall reached) of a (H, R, C) mass, through the planner's three steps (the ranking held as
    int16, as the planner holds it)."""
    order, kept = adaspa.rank_row_wise(mass, high)
    k = adaspa.block_counts(kept, recall=recall, low=low, high=high, per_head=per_head)
    return adaspa.kept_blocks(order.to(torch.int16), k, int(k.max())), k, adaspa.recall_reached(kept, k)


def best_rows(mass, h, count):
    """Mass head h keeps when each row keeps its diagonal and its count - 1 heaviest other blocks."""
    ranked = mass[h].clone()
    ranked.diagonal().fill_(float("inf"))
    return mass[h].gather(-1, ranked.argsort(-1, descending=True)[:, :count]).sum()


def check_picks(mass, picks, k, ctx):
    """Ascending distinct picks holding the diagonal and each row's heaviest blocks; returns the mass kept per head."""
    H, R, _ = mass.shape
    assert picks.dtype == torch.int16 and picks.shape == (H, R, int(k.max())), ctx
    kept = []
    for h in range(H):
        chosen = picks[h, :, :int(k[h])]
        assert (chosen[:, 1:] > chosen[:, :-1]).all(), f"{ctx}: picks ascending and distinct"
        assert (chosen == torch.arange(R)[:, None]).any(-1).all(), f"{ctx}: every row keeps its diagonal"
        assert (picks[h, :, int(k[h]):] == chosen[:, :1]).all(), f"{ctx}: entries past the count repeat the first"
        kept.append(mass[h].gather(-1, chosen.long()).sum())
        torch.testing.assert_close(kept[-1], best_rows(mass, h, int(k[h])), msg=ctx)
    return torch.stack(kept)


@pytest.mark.parametrize("recall", [0.5, 0.8, 0.95])
def test_per_head_recall_fewest_blocks_of_each_head(recall):
    gen = new_generator()
    H, R, C = 4, 9, 12
    mass = random_mass(H, R, C, gen)
    picks, k, reached = select(mass, recall=recall, low=1, high=C, per_head=True)
    ctx = f"seed={gen.initial_seed()} recall={recall}"
    kept = check_picks(mass, picks, k, ctx)
    for h in range(H):
        share = kept[h] / mass[h].sum()
        assert share >= recall - 1e-6 and torch.isclose(share, reached[h]), ctx
        if k[h] > 1:  # one block fewer per row does not reach it
            assert best_rows(mass, h, int(k[h]) - 1) / mass[h].sum() < recall, f"{ctx}: head {h} keeps too many"


@pytest.mark.parametrize("recall, low, high", [(0.5, 1, 6), (0.8, 1, 6), (0.95, 2, 5), (0.6, 3, 3)])
def test_pooled_recall_fewest_blocks_in_all(recall, low, high):
    """The heads' masses pooled: the counts reach the recall of the total with the fewest blocks any counts within
    [low, high] need, and no counts of as many blocks keep more (every combination tried)."""
    gen = new_generator()
    H, R, C = 3, 5, 6
    mass = random_mass(H, R, C, gen).double()  # the float64 sums of every combination compare exactly
    picks, k, reached = select(mass, recall=recall, low=low, high=high, per_head=False)
    ctx = f"seed={gen.initial_seed()} recall={recall} bounds=({low}, {high})"
    kept = check_picks(mass, picks, k, ctx)
    torch.testing.assert_close(reached, (kept / mass.sum((1, 2))).float(), msg=ctx)
    every = {counts: float(sum(best_rows(mass, h, c) for h, c in enumerate(counts)))
             for counts in itertools.product(range(low, high + 1), repeat=H)}
    reaching = [sum(c) for c, m in every.items() if m >= recall * float(mass.sum()) - 1e-9]
    fewest = min(reaching) if reaching else H * high
    assert int(k.sum()) == fewest, f"{ctx}: {k.tolist()} uses {int(k.sum())} blocks, {fewest} suffice"
    best = max(m for c, m in every.items() if sum(c) == fewest)
    assert float(kept.sum()) >= best - 1e-9, f"{ctx}: counts {k.tolist()} keep less than others of as many blocks"


def test_pooled_recall_of_one_head_is_its_own():
    gen = new_generator()
    mass = random_mass(1, 9, 12, gen)
    for recall in (0.3, 0.7, 0.9):
        pooled = select(mass, recall=recall, low=1, high=12, per_head=False)
        own = select(mass, recall=recall, low=1, high=12, per_head=True)
        assert all(torch.equal(a, b) for a, b in zip(pooled, own)), f"seed={gen.initial_seed()} recall={recall}"


@pytest.mark.parametrize("per_head", [True, False])
def test_selection_bounds_and_recall_one(per_head):
    gen = new_generator()
    mass = random_mass(3, 8, 8, gen)
    _, k, reached = select(mass, recall=0.99, low=2, high=3, per_head=per_head)
    assert ((k >= 2) & (k <= 3)).all() and (reached < 0.99).any(), f"seed={gen.initial_seed()}: the bound wins"
    _, k, _ = select(mass, recall=0.01, low=2, high=3, per_head=per_head)
    assert (k == 2).all()
    picks, k, reached = select(mass, recall=1.0, low=1, high=8, per_head=per_head)
    assert (k == 8).all() and torch.equal(reached, torch.ones(3)) and (picks == torch.arange(8)).all()


def test_selection_of_a_head_without_mass():
    """A head whose rows hold no mass (all its keys padding) keeps its fewest blocks and reports recall 1."""
    gen = new_generator()
    mass = random_mass(2, 6, 6, gen)
    mass[1] = 0
    for per_head in (True, False):
        _, k, reached = select(mass, recall=0.8, low=1, high=6, per_head=per_head)
        assert int(k[1]) == 1 and float(reached[1]) == 1.0 and torch.isfinite(reached).all(), per_head


@pytest.mark.parametrize("low, high, columns, want", [
    (0.1, 0.3, 100, (10, 30)), (0.0, 0.3, 5, (1, 1)), (0.1, 1.0, 7, (1, 7)), (0.5, 0.5, 10, (5, 5)),
    (0.0, 0.0, 4, (1, 1))])
def test_density_bounds(low, high, columns, want):
    assert adaspa.density_bounds(low, high, columns) == want


@pytest.mark.parametrize("text_dense", [True, False])
def test_pattern_text_rows_and_columns(text_dense):
    """HunyuanVideo: the blocks holding text are dense rows always, dense columns with text_dense."""
    gen = new_generator()
    grid = core.VideoGrid(3, 8, 8, text_tokens=40)  # 192 video + 40 text tokens: 3 video blocks, 1 text block
    nb = 4
    mass = random_mass(2, nb, nb, gen)[None].expand(2, -1, -1, -1).contiguous()
    settings = adaspa.AdaSpaSettings(recall=0.5, block_size=64, min_density=0.0, max_density=1.0,
                                     text_dense=text_dense)
    pattern = adaspa.search_pattern(mass, grid, settings)
    assert pattern.video_blocks == 3 and pattern.kv_indices.dtype == torch.int16
    mask = K.indices_to_block_mask(pattern.kv_indices.int(), pattern.kv_counts, nb)  # (B, H, 3, 4)
    assert mask[..., 3].all() == text_dense, f"seed={gen.initial_seed()}"
    per_head = mask.sum(-1)
    assert (per_head == per_head[..., :1]).all(), "row wise: every query block of a head keeps as many blocks"
    tiles = mask.sum().item() + 2 * 2 * 1 * nb  # + the dense text row
    assert pattern.density == pytest.approx(tiles / (2 * 2 * nb * nb))


# ------------------------------------------------------------------------------------------------------------------
# The planner: search steps, the pattern / LSE cache, sparse steps

def video_inputs(grid, B=2, H=2, D=32, gen=None, dtype=torch.float32):
    """q, k, v (B, H, L, D) with local structure (tokens attend to nearby tokens), on the CPU."""
    L = grid.total_tokens
    pos = torch.arange(L, dtype=torch.float32)
    feats = torch.cat([torch.sin(pos[:, None] / (4 * 2 ** torch.arange(8))), torch.cos(pos[:, None] / 9.0)], 1)
    w = torch.randn(3, B, H, feats.shape[1], D, generator=gen)
    noise = torch.randn(3, B, H, L, D, generator=gen) * 0.3
    q, k, v = (torch.einsum("lf,bhfd->bhld", feats, w[i]) * 1.5 + noise[i] for i in range(3))
    return q.to(dtype), k.to(dtype), v.to(dtype)


def call(grid, q, k, v, step, total=6, layer=0, backend="reference", head_offset=0, kv_length=None):
    return core.AttentionCall(grid=grid, layer=layer, step=step, total_steps=total, q=q, k=k, v=v,
                              kv_length=kv_length, backend=backend, head_offset=head_offset)


def pattern_masks(pattern):
    """(B, H, NQB, NKB) bool block masks of a searched pattern: its video rows, then dense text rows."""
    B, H = pattern.kv_counts.shape[:2]
    video = K.indices_to_block_mask(pattern.kv_indices.int(), pattern.kv_counts, pattern.num_blocks)
    text = torch.ones(B, H, pattern.num_blocks - pattern.video_blocks, pattern.num_blocks, dtype=torch.bool)
    return torch.cat([video.cpu(), text], dim=2)


def masked_scores(q, k, mask, block_size, kv_length=None):
    """Float64 scores with a per-head (H, NQB, NKB) block mask expanded to tokens: -inf where not kept."""
    L = q.shape[2]
    token = torch.arange(L) // block_size
    allowed = mask[:, token][:, :, token][None]
    if kv_length is not None:
        allowed = allowed & (torch.arange(L)[None, None, None, :] < kv_length.view(-1, 1, 1, 1))
    s = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    return s.masked_fill(~allowed, float("-inf"))


def masked_oracle(q, k, v, mask, block_size, kv_length=None):
    """Float64 attention with a per-head (H, NQB, NKB) block mask expanded to tokens."""
    return masked_scores(q, k, mask, block_size, kv_length).softmax(-1) @ v.double()


class SearchSpy:
    """Counts the planner's searches (one block_mass call each) and records the LSE each weighed the masses by:
    float32, fresh from the dense pass, at a first search; the float16 cache at a later one."""

    def __init__(self, monkeypatch):
        self.lses = []
        original = adaspa.block_mass

        def spy(q, k, lse, **kwargs):
            self.lses.append(lse)
            return original(q, k, lse, **kwargs)

        monkeypatch.setattr(adaspa, "block_mass", spy)

    @property
    def exact(self):
        return [lse.dtype == torch.float32 for lse in self.lses]


def entry_of(planner, layer=0):
    return next(iter(planner._layers[layer].values()))


def true_recall(q, k, mask, block_size):
    """(H,) share of batch element 0's exact attention mass each head's (H, NQB, NKB) block mask keeps."""
    true_mass = metrics.block_attention_mass(q, k, block_size)[0]
    return [metrics.attention_recall(true_mass[h], mask[h]) for h in range(mask.shape[0])]


GRID = core.VideoGrid(4, 8, 8)  # 256 tokens: 4 blocks of 64


def test_search_then_sparse_steps(monkeypatch):
    """The first call searches (dense output, density 1); the pattern reaches the recall on that step's exact
    attention; the next steps reuse it (no search) and compute exactly the masked attention it describes."""
    gen = new_generator()
    q, k, v = video_inputs(GRID, gen=gen)
    settings = adaspa.AdaSpaSettings(recall=0.7, search_steps=(3.0,), block_size=64, min_density=0.0,
                                     max_density=1.0)
    planner = settings.make_planner()
    spy = SearchSpy(monkeypatch)
    out, density = planner.attend(call(GRID, q, k, v, step=0))
    ctx = f"seed={gen.initial_seed()}"
    assert density == 1.0 and spy.exact == [True]
    dense = oracle(q, k, v, 64)[0]
    torch.testing.assert_close(out.double(), dense, rtol=1e-4, atol=1e-4, msg=ctx)

    mask = planner.block_mask(GRID, 0)  # (H, 4, 4)
    assert mask.shape == (2, 4, 4) and mask.dtype == torch.bool and not mask.all(), ctx
    assert sum(true_recall(q, k, mask, 64)) / 2 >= 0.7 - 1e-4, f"{ctx}: the heads' pooled recall"

    pattern = entry_of(planner).pattern
    masks = pattern_masks(pattern)  # (B, H, 4, 4)
    assert torch.equal(masks[0], mask)
    for step in (1, 2):
        out, density = planner.attend(call(GRID, q, k, v, step=step))
        assert len(spy.lses) == 1 and density == pytest.approx(masks.float().mean().item()), ctx
        for b in range(2):
            want = masked_oracle(q[b:b + 1], k[b:b + 1], v[b:b + 1], masks[b], 64)
            torch.testing.assert_close(out[b:b + 1].double(), want, rtol=1e-4, atol=1e-4, msg=ctx)


def test_scheduled_searches_use_the_cached_lse(monkeypatch):
    """Search steps 2 and 4 of 6: the first search (step 0, no pattern yet) is exact with a dense output; steps 2
    and 4 weigh the masses by the LSE of step 0's dense pass and compute the sparse attention of the layout they
    find; after the last search no LSE is kept."""
    gen = new_generator()
    q, k, v = video_inputs(GRID, gen=gen)
    planner = adaspa.AdaSpaSettings(search_steps=(2.0, 4.0), max_density=1.0).make_planner()
    spy = SearchSpy(monkeypatch)
    lses = []
    ctx = f"seed={gen.initial_seed()}"
    for step in range(6):
        ks = k * (1 + 0.05 * step)
        out, density = planner.attend(call(GRID, q, ks, v, step=step))
        entry = entry_of(planner)
        lses.append(entry.lse)
        if step == 0:
            assert density == 1.0, ctx
            torch.testing.assert_close(out.double(), oracle(q, ks, v, 64)[0], rtol=1e-4, atol=1e-4, msg=ctx)
        else:  # sparse, with the layout searched at this step (2, 4) or the one before
            assert entry.searched_step == step - step % 2, ctx
            masks = pattern_masks(entry.pattern)
            assert density == pytest.approx(entry.pattern.density) and density < 1, ctx
            for b in range(2):
                want = masked_oracle(q[b:b + 1], ks[b:b + 1], v[b:b + 1], masks[b], 64)
                torch.testing.assert_close(out[b:b + 1].double(), want, rtol=1e-4, atol=1e-4, msg=ctx)
    assert spy.exact == [True, False, False], ctx
    assert torch.equal(spy.lses[1], lses[0]) and torch.equal(spy.lses[2], lses[0]), "step 0's LSE, kept"
    exact = oracle(q, k, v, 64)[1]
    assert lses[0].dtype == torch.float16 and (lses[0].double() - exact).abs().max() < 2e-2
    assert lses[4] is None and lses[5] is None, "no later search: the LSE is dropped"
    assert sum(planner.cache_bytes().values()) == entry_of(planner).pattern.nbytes


def test_a_skipped_search_step_searches_at_the_next_step_that_runs(monkeypatch):
    """A step cache (EasyCache, LazyCache) that skips the search step's model call: the search runs at the next step
    that does, once, and never again for that search step."""
    gen = new_generator()
    q, k, v = video_inputs(GRID, gen=gen)
    planner = adaspa.AdaSpaSettings(search_steps=(3.0, 6.0), max_density=1.0).make_planner()
    spy = SearchSpy(monkeypatch)
    searched = []
    for step in (0, 1, 2, 4, 5, 8, 9):  # steps 3, 6 and 7 skipped
        planner.attend(call(GRID, q, k, v, step=step, total=10))
        searched.append(entry_of(planner).searched_step)
    assert searched == [0, 0, 0, 4, 4, 8, 8] and spy.exact == [True, False, False], f"seed={gen.initial_seed()}"


def test_later_search_reaches_the_recall(monkeypatch):
    """A later search (masses against the cached LSE) of the same q and k finds a layout holding the recall of
    the exact attention (its heads pooled); the step's output is the sparse attention of that layout."""
    gen = new_generator()
    q, k, v = video_inputs(GRID, gen=gen)
    planner = adaspa.AdaSpaSettings(recall=0.7, search_steps=(1.0,), min_density=0.0, max_density=1.0).make_planner()
    spy = SearchSpy(monkeypatch)
    planner.attend(call(GRID, q, k, v, step=0))
    out, density = planner.attend(call(GRID, q, k, v, step=1))
    ctx = f"seed={gen.initial_seed()}"
    assert spy.exact == [True, False] and entry_of(planner).searched_step == 1, ctx
    mask = planner.block_mask(GRID, 0)
    assert not mask.all() and density == pytest.approx(entry_of(planner).pattern.density), ctx
    # The cached LSE is float16: each row's weight is off by ~1e-3 at most.
    assert sum(true_recall(q, k, mask, 64)) / 2 >= 0.7 - 5e-3, f"{ctx}: the heads' pooled recall"
    masks = pattern_masks(entry_of(planner).pattern)
    for b in range(2):
        want = masked_oracle(q[b:b + 1], k[b:b + 1], v[b:b + 1], masks[b], 64)
        torch.testing.assert_close(out[b:b + 1].double(), want, rtol=1e-4, atol=1e-4, msg=ctx)


def test_conditionings_share_the_first_chunks_pattern(monkeypatch):
    """A CFG batch of 2 latents x 2 conditionings: the masses are computed for the first chunk only, its pattern
    serves the second, and each element's output is the attention under its latent's layout."""
    gen = new_generator()
    q, k, v = video_inputs(GRID, B=4, gen=gen)
    planner = adaspa.AdaSpaSettings(recall=0.7, search_steps=(1.0,), min_density=0.0, max_density=1.0).make_planner()
    spy = SearchSpy(monkeypatch)
    for step in range(3):  # a first search (dense), a later one (the cached LSE of the first chunk), a sparse step
        c = call(GRID, q, k, v, step=step)
        c.conditionings = 2
        out, density = planner.attend(c)
    ctx = f"seed={gen.initial_seed()}"
    assert [lse.shape[0] for lse in spy.lses] == [2, 2], ctx
    pattern = entry_of(planner).pattern
    masks = pattern_masks(pattern)
    assert torch.equal(masks[2:], masks[:2]) and not masks.all() and density == pattern.density, ctx
    for b in range(4):
        want = masked_oracle(q[b:b + 1], k[b:b + 1], v[b:b + 1], masks[b], 64)
        torch.testing.assert_close(out[b:b + 1].double(), want, rtol=1e-4, atol=1e-4, msg=ctx)


def test_recall_one_gives_dense_output():
    """Recall 1 keeps every block: the first search, a sparse step and a later search all equal dense attention."""
    gen = new_generator()
    q, k, v = video_inputs(GRID, gen=gen)
    planner = adaspa.AdaSpaSettings(recall=1.0, search_steps=(2.0,), min_density=0.0, max_density=1.0).make_planner()
    dense = oracle(q, k, v, 64)[0]
    for step in range(4):
        out, density = planner.attend(call(GRID, q, k, v, step=step))
        assert density == 1.0 and planner.block_mask(GRID, 0).all()
        torch.testing.assert_close(out.double(), dense, rtol=1e-4, atol=1e-4,
                                   msg=f"seed={gen.initial_seed()} step {step}")


def test_every_kind_of_call_writes_into_out():
    """A first search, a later search and a sparse step write into a (B, L, H, D) buffer's view, and nowhere else."""
    gen = new_generator()
    q, k, v = video_inputs(GRID, gen=gen)
    B, H, L, D = q.shape
    planner = adaspa.AdaSpaSettings(search_steps=(1.0,), max_density=1.0).make_planner()
    for step in range(3):
        storage = torch.full((B, L, H + 1, D), float("nan"))
        view = storage[:, :, :H].transpose(1, 2)
        c = call(GRID, q, k, v, step=step)
        c.out = view
        out, _ = planner.attend(c)
        assert out.data_ptr() == view.data_ptr() and not torch.isnan(view).any(), f"step {step}"
        assert torch.isnan(storage[:, :, H:]).all(), f"step {step}: wrote outside out"


def test_cache_keys_invalidation_and_reset(monkeypatch):
    """A new grid (same length), batch size or head chunk searches; a layer keeps one shape; reset drops all."""
    gen = new_generator()
    planner = adaspa.AdaSpaSettings(search_steps=()).make_planner()
    spy = SearchSpy(monkeypatch)
    q, k, v = video_inputs(GRID, B=2, H=4, gen=gen)
    planner.attend(call(GRID, q[:, :2], k[:, :2], v[:, :2], step=0))                  # heads 0-1
    planner.attend(call(GRID, q[:, 2:], k[:, 2:], v[:, 2:], step=0, head_offset=2))   # heads 2-3: own entry
    planner.attend(call(GRID, q[:, :2], k[:, :2], v[:, :2], step=1))                  # reuses
    assert len(spy.lses) == 2 and len(planner._layers[0]) == 2
    assert planner.block_mask(GRID, 0).shape == (4, 4, 4) and planner.block_mask(GRID, 1) is None

    other = core.VideoGrid(2, 16, 8)  # also 256 tokens: must not reuse the layout of GRID
    planner.attend(call(other, q[:, :2], k[:, :2], v[:, :2], step=2))
    assert len(spy.lses) == 3 and list(planner._layers[0])[0][0] == other
    assert len(planner._layers[0]) == 1, "entries of the old shape are dropped"
    planner.attend(call(other, q[:1, :2], k[:1, :2], v[:1, :2], step=3))  # batch 1: another shape
    assert len(spy.lses) == 4
    planner.attend(call(other, q[:1, :2], k[:1, :2], v[:1, :2], step=4, layer=1))  # another layer
    assert len(spy.lses) == 5

    planner.reset()
    assert planner.cache_bytes() == {} and planner.block_mask(other, 0) is None
    planner.attend(call(other, q[:1, :2], k[:1, :2], v[:1, :2], step=5))
    assert len(spy.lses) == 6 and all(spy.exact)


def test_search_step_past_the_run_warns_once(monkeypatch, caplog):
    gen = new_generator()
    q, k, v = video_inputs(GRID, gen=gen)
    planner = adaspa.AdaSpaSettings(search_steps=(0.5, 30.0)).make_planner()
    spy = SearchSpy(monkeypatch)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        for step in range(6):
            planner.attend(call(GRID, q, k, v, step=step, total=6))
            planner.attend(call(GRID, q, k, v, step=step, total=6, layer=1))
    warnings = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert len(warnings) == 1 and "search_steps" in warnings[0] and "30" in warnings[0] and "6 steps" in warnings[0]
    assert len(spy.lses) == 4  # per layer: step 0 (no pattern yet) and step 3 (0.5 of 6); never at 30


def test_fraction_and_index_search_steps():
    assert adaspa.resolve_search_steps((0.2, 0.6), 50) == ((10, 30), ())
    assert adaspa.resolve_search_steps((10.0, 30.0), 20) == ((10,), (30,))
    assert adaspa.resolve_search_steps((0.99,), 10) == ((9,), ())
    assert adaspa.resolve_search_steps((0.5, 3.0), None) == ((3,), ())
    assert adaspa.parse_search_steps(" 0.2, 0.6 ") == (0.2, 0.6) and adaspa.parse_search_steps("10 30") == (10, 30)
    assert adaspa.parse_search_steps("") == ()


def test_text_rows_dense_with_key_padding():
    """HunyuanVideo-shaped call: text after the video with padding; text rows and columns dense, the sparse step
    equals the masked float64 attention under kv_length."""
    gen = new_generator()
    grid = core.VideoGrid(3, 8, 8, text_tokens=20)
    q, k, v = video_inputs(grid, gen=gen)
    kv_length = torch.tensor([grid.total_tokens - 6, grid.video_tokens + 3])
    planner = adaspa.AdaSpaSettings(recall=0.6, search_steps=(), min_density=0.0, max_density=1.0).make_planner()
    planner.attend(call(grid, q, k, v, step=0, kv_length=kv_length))
    out, density = planner.attend(call(grid, q, k, v, step=1, kv_length=kv_length))
    masks = pattern_masks(entry_of(planner).pattern)
    mask = planner.block_mask(grid, 0)
    assert torch.equal(mask, masks[0]) and mask.shape == (2, 4, 4)
    assert masks[:, :, 3].all() and masks[..., 3].all() and not masks.all()
    for b in range(2):
        want = masked_oracle(q[b:b + 1], k[b:b + 1], v[b:b + 1], masks[b], 64, kv_length[b:b + 1])
        torch.testing.assert_close(out[b:b + 1].double(), want, rtol=1e-4, atol=1e-4,
                                   msg=f"seed={gen.initial_seed()} batch {b}")
    assert 0 < density < 1


@pytest.mark.parametrize("backend", [
    "reference", pytest.param("triton", marks=pytest.mark.skipif(not K.triton_available(DEVICE),
                                                                  reason="needs the Triton kernels"))])
def test_lse_of_the_kept_keys_when_asked(backend):
    """want_lse: a first search reports the dense LSE (it attended every key); a sparse call and a later search the
    float64 log-sum-exp over exactly the pairs their layout keeps, text rows included, in token order; a batch
    element with no keys gives -inf rows. Without want_lse call.lse stays None."""
    gen = new_generator()
    grid = core.VideoGrid(3, 8, 8, text_tokens=20)
    dtype = torch.bfloat16 if backend == "triton" else torch.float32
    q, k, v = (t.to(DEVICE) for t in video_inputs(grid, B=3, gen=gen, dtype=dtype))
    kv_length = torch.tensor([grid.total_tokens - 6, grid.video_tokens + 3, 0], device=DEVICE, dtype=torch.int32)
    planner = adaspa.AdaSpaSettings(recall=0.6, search_steps=(2.0,), min_density=0.0, max_density=1.0).make_planner()
    ctx = f"seed={gen.initial_seed()} {backend}"
    calls = [call(grid, q, k, v, step=s, kv_length=kv_length, backend=backend) for s in range(4)]
    masks = []  # the layout each call used
    for c in calls[:3]:
        c.want_lse = True
    for c in calls:
        planner.attend(c)
        masks.append(pattern_masks(entry_of(planner).pattern))
    assert entry_of(planner).searched_step == 2 and not masks[2].all(), ctx
    q, k, kv_length = q.cpu(), k.cpu(), kv_length.cpu()
    dense = oracle(q, k, k, 64, kv_length=kv_length)[1]

    def kept(mask):
        return torch.cat([torch.logsumexp(masked_scores(q[b:b + 1], k[b:b + 1], mask[b], 64, kv_length[b:b + 1]),
                                          -1) for b in range(3)])

    for i, (got, want) in enumerate(((calls[0].lse, dense), (calls[1].lse, kept(masks[1])),
                                     (calls[2].lse, kept(masks[2])))):
        if i:
            assert (dense - want)[want.isfinite()].max() > 1e-2, f"{ctx}: call {i} must drop some mass"
        assert got.dtype == torch.float32 and got.shape == want.shape, ctx
        assert torch.equal(got.cpu().isneginf(), want.isneginf()) and want[2].isneginf().all(), ctx
        finite = want.isfinite()
        assert (got.cpu().double()[finite] - want[finite]).abs().max().item() < LSE_TOL, f"{ctx}: call {i}"
    assert calls[3].lse is None, ctx


@pytest.mark.skipif(not K.triton_available(DEVICE), reason="needs the Triton kernels (CUDA or the interpreter)")
def test_planner_triton_matches_reference():
    """bf16 through the Triton kernels: the same pattern and outputs as the torch reference path."""
    gen = new_generator()
    grid = core.VideoGrid(3, 8, 8, text_tokens=20)
    q, k, v = (t.to(DEVICE) for t in video_inputs(grid, B=1, gen=gen, dtype=torch.bfloat16))
    outs, masks = {}, {}
    for backend in BACKENDS:
        planner = adaspa.AdaSpaSettings(recall=0.7, search_steps=(), min_density=0.0, max_density=1.0).make_planner()
        outs[backend] = [planner.attend(call(grid, q, k, v, step=s, backend=backend))[0] for s in range(2)]
        masks[backend] = planner.block_mask(grid, 0)
    assert torch.equal(masks["triton"], masks["reference"]), f"seed={gen.initial_seed()}"
    for a, b in zip(outs["triton"], outs["reference"]):
        assert ((a.double() - b.double()).norm() / b.double().norm()).item() < OUT_TOL[torch.bfloat16]


@pytest.mark.parametrize("bad, message", [
    (dict(recall=0.0), "recall must be in \\(0, 1\\]"), (dict(recall=1.5), "recall"), (dict(recall=math.nan), "recall"),
    (dict(min_density=0.5, max_density=0.2), "min_density \\(0.5\\) must not be above max_density"),
    (dict(max_density=1.5), "max_density must be in"), (dict(block_size=32), "block_size"),
    (dict(search_steps=(2.5,)), "search_steps"), (dict(search_steps=(-1.0,)), "search_steps"),
    (dict(search_steps=[0.2]), "search_steps must be a tuple")])
def test_settings_validation(bad, message):
    with pytest.raises(ValueError, match=message):
        adaspa.AdaSpaSettings(**bad)


# ------------------------------------------------------------------------------------------------------------------
# Inside ComfyUI

def adaspa_node(nodes, recall=0.8, search_steps="0.2, 0.6", block_size=64, min_density=0.1, max_density=0.3,
                text_dense=True):
    return nodes.AdaSpaSearch().settings(recall, search_steps, block_size, min_density, max_density, text_dense)[0]


def patch(nodes, model, method, dense_steps=0.0, dense_layers=0, backend="reference"):
    return nodes.SparseAttentionPatch().patch(model, dense_steps, 1.0, dense_layers, backend, False, method)[0]


def latent(frames=5, height=16, width=16):
    return torch.zeros(1, 16, frames, height, width)


def record_calls(monkeypatch, session):
    calls = []
    original = session.attend

    def attend(ctx, layer, q, k, v, kv_length=None, out=None, head_offset=0, **routing):
        result, density = original(ctx, layer, q, k, v, kv_length=kv_length, out=out, head_offset=head_offset,
                                   **routing)
        entries = session.planner._layers[layer].values()
        calls.append(dict(layer=layer, step=ctx.step, grid=ctx.grid_for(q.shape[2]), q=q.clone(), k=k.clone(),
                          v=v.clone(), kv_length=kv_length, out=result.clone(), density=density,
                          masks=torch.cat([pattern_masks(e.pattern) for e in entries], dim=1),
                          searched={e.searched_step for e in entries}))
        return result, density

    monkeypatch.setattr(session, "attend", attend)
    return calls


@comfyui
@pytest.mark.parametrize("bad, message", [
    (dict(recall=0.0), "recall"), (dict(recall=1.01), "recall"),
    (dict(min_density=0.4, max_density=0.3), "min_density"), (dict(search_steps="soon"), "search_steps"),
    (dict(search_steps="0.2, -3"), "search_steps"), (dict(search_steps="12.5"), "search_steps"),
    (dict(block_size=32), "block_size")])
def test_node_validation(nodes, bad, message):
    args = dict(recall=0.8, search_steps="0.2, 0.6", block_size=64, min_density=0.1, max_density=0.3,
                text_dense=True)
    args.update(bad)
    with pytest.raises(ValueError, match=message):
        nodes.AdaSpaSearch().settings(**args)


@comfyui
@pytest.mark.parametrize("name", ["cluster_heads", "per_head_recall"])
def test_node_optional_inputs(nodes, name):
    """Off by default and after the required inputs (saved workflows load unchanged); on, each reaches the
    settings; a bad value names the input."""
    spec = nodes.AdaSpaSearch.INPUT_TYPES()
    assert list(spec["optional"]) == ["cluster_heads", "per_head_recall"]
    assert spec["optional"][name][1]["default"] is False
    args = dict(recall=0.8, search_steps="0.2, 0.6", block_size=64, min_density=0.1, max_density=0.3,
                text_dense=True)
    assert getattr(nodes.AdaSpaSearch().settings(**args, **{name: True})[0], name) is True
    with pytest.raises(ValueError, match=f"{name} must be True or False"):
        nodes.AdaSpaSearch().settings(**args, **{name: "yes"})


@comfyui
def test_node_defaults_are_the_papers_but_the_pooled_recall(nodes):
    spec = nodes.AdaSpaSearch.INPUT_TYPES()["required"]
    method = nodes.AdaSpaSearch().settings(**{name: entry[1]["default"] for name, entry in spec.items()})[0]
    assert method == adaspa.AdaSpaSettings() and method.search_steps == (0.2, 0.6) and method.block_size == 64
    assert method.recall == 0.8 and not method.per_head_recall
    assert nodes.AdaSpaSearch.RETURN_TYPES == ("SPARSE_ATTENTION_METHOD",)


@comfyui
@pytest.mark.parametrize("family", ["wan", "hunyuan"])
def test_adaspa_in_a_sampling_run(nodes, bridge, monkeypatch, family):
    """Searches at steps 0 (exact, dense output) and 2 of 4 (cached LSE, sparse output); steps 1 to 3 are sparse
    with the layout searched last: each sparse call equals float64 attention under that layout (and the text
    padding), the render stays close to dense, and the Inspector's per-head mask is there after the run."""
    if family == "wan":
        base, conds, cfg, grid, kv = comfy_env.tiny_wan_t2v(seed=50), comfy_env.wan_conds(seed=51), 3.0, \
            core.VideoGrid(5, 8, 8), None
    else:
        base, conds, cfg = comfy_env.tiny_hunyuan_video(seed=50), comfy_env.hunyuan_conds(seed=51, valid_tokens=7), 1.0
        grid, kv = core.VideoGrid(5, 8, 8, text_tokens=12), 5 * 64 + 7
    method = adaspa_node(nodes, recall=0.6, search_steps="0, 2", min_density=0.0, max_density=0.6)
    patched = patch(nodes, base, method, dense_layers=1)
    session = bridge.session_of(patched)
    calls = record_calls(monkeypatch, session)
    lat = latent()
    dense = comfy_env.sample(base, lat, *conds, steps=4, cfg=cfg, seed=52)
    sparse = comfy_env.sample(patched, lat, *conds, steps=4, cfg=cfg, seed=52)

    assert torch.isfinite(sparse).all() and 0 < rel_err(sparse, dense) < 0.5
    assert not session.stats.fallbacks
    assert {c["step"] for c in calls if c["density"] == 1.0} == {0}
    sparse_calls = [c for c in calls if c["step"] in (1, 2, 3)]
    assert sparse_calls and all(c["density"] < 1.0 for c in sparse_calls)
    assert all(c["searched"] == {2 if c["step"] >= 2 else 0} for c in sparse_calls)
    for c in sparse_calls:
        B = c["q"].shape[0]
        assert c["grid"] == grid and (c["kv_length"] is None if kv is None else c["kv_length"].tolist() == [kv] * B)
        for b in range(B):  # cond and uncond have layouts of their own
            kv_b = None if kv is None else c["kv_length"][b:b + 1]
            want = masked_oracle(c["q"][b:b + 1], c["k"][b:b + 1], c["v"][b:b + 1], c["masks"][b], 64, kv_b)
            torch.testing.assert_close(c["out"][b:b + 1].double(), want, rtol=1e-4, atol=1e-4)
        if family == "hunyuan":
            assert c["masks"][:, :, -1].all() and c["masks"][..., -1].all()
    mask = session.block_mask(1)
    assert mask is not None and mask.shape == (2, 6 if kv else 5, 6 if kv else 5)


@comfyui
def test_first_search_takes_the_lse_of_the_dense_step_before(nodes, bridge, monkeypatch):
    """One dense warm-up step: there, every layer that goes sparse runs through the planner's prime (exact dense
    output, each row's LSE kept); the first sparse step searches with that LSE, without a dense pass of its own,
    and its output is the sparse attention of the layout found."""
    base, (pos, neg) = comfy_env.tiny_wan_t2v(seed=56), comfy_env.wan_conds(seed=57)
    method = adaspa_node(nodes, recall=0.6, search_steps="1", min_density=0.0, max_density=0.6)
    patched = patch(nodes, base, method, dense_steps=1, dense_layers=1)
    session = bridge.session_of(patched)
    primed, prime = [], session.prime

    def spy_prime(ctx, layer, q, k, v, kv_length=None, out=None, head_offset=0):
        result, density = prime(ctx, layer, q, k, v, kv_length=kv_length, out=out, head_offset=head_offset)
        primed.append(dict(step=ctx.step, layer=layer, q=q.clone(), k=k.clone(), v=v.clone(), out=result.clone(),
                           lse=entry_of(session.planner, layer).lse.clone(), density=density))
        return result, density

    monkeypatch.setattr(session, "prime", spy_prime)
    searches = SearchSpy(monkeypatch)
    calls = record_calls(monkeypatch, session)
    lat = latent()
    dense = comfy_env.sample(base, lat, pos, neg, steps=3, seed=58)
    sparse = comfy_env.sample(patched, lat, pos, neg, steps=3, seed=58)

    layers = session.stats.num_layers
    assert layers > 2 and not session.stats.fallbacks
    assert [(p["step"], p["layer"]) for p in primed] == [(0, layer) for layer in range(1, layers)]
    assert all(session.stats.calls[(0, layer)] == 1.0 for layer in range(layers))
    for p in primed:
        want_out, want_lse, _ = oracle(p["q"], p["k"], p["v"], 64)
        latents = p["q"].shape[0] // 2  # cond and uncond in one batch: the LSE of the first conditioning is kept
        assert p["density"] == 1.0 and p["lse"].dtype == torch.float16 and p["lse"].shape[0] == latents
        torch.testing.assert_close(p["out"].double(), want_out, rtol=1e-4, atol=1e-4)
        assert (p["lse"].double() - want_lse[:latents]).abs().max() < 2e-2
    first = [c for c in calls if c["step"] == 1]
    assert [c["layer"] for c in first] == list(range(1, layers)) and all(c["density"] < 1.0 for c in first)
    assert searches.exact[:len(first)] == [False] * len(first), "no dense pass at the first search"
    for p, lse, c in zip(primed, searches.lses, first):
        assert torch.equal(lse, p["lse"]), f"layer {c['layer']}: the masses weighed by the primed LSE"
        for b in range(c["q"].shape[0]):
            want = masked_oracle(c["q"][b:b + 1], c["k"][b:b + 1], c["v"][b:b + 1], c["masks"][b], 64)
            torch.testing.assert_close(c["out"][b:b + 1].double(), want, rtol=1e-4, atol=1e-4)
    assert torch.isfinite(sparse).all() and 0 < rel_err(sparse, dense) < 0.5


@comfyui
def test_recall_one_equals_unpatched_wan(nodes, bridge):
    pos, neg = comfy_env.wan_conds(seed=53)
    base = comfy_env.tiny_wan_t2v(seed=54)
    patched = patch(nodes, base, adaspa_node(nodes, recall=1.0, search_steps="1", min_density=0.0, max_density=1.0))
    lat = latent(frames=3)
    dense = comfy_env.sample(base, lat, pos, neg, steps=3, seed=55)
    sparse = comfy_env.sample(patched, lat, pos, neg, steps=3, seed=55)
    assert bridge.session_of(patched).stats.sparse_calls == 0  # every call computed every block
    torch.testing.assert_close(sparse, dense, rtol=1e-4, atol=1e-4)


def rel_err(a, b):
    return float((a - b).norm() / b.norm())
