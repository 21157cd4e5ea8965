"""Cluster (variable-size block) attention at small, odd shapes: the Triton kernel (Triton's interpreter on the CPU)
and the torch reference, both against a dense float64 oracle whose token mask is built cluster by cluster; the
pair count; the query tile table; input validation. test_cluster_attention_gpu.py adds realistic sizes on a GPU.

Inputs and clusters are random on every run. Each test prints its seed and puts it in its assertion messages;
rerun with BSA_SEED=<seed> to reproduce a failure.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pack import import_pack
from test_block_sparse_kernel import OUT_TOL, assert_matches, make_qkv, new_generator

K = import_pack("kernels")
KT = import_pack("kernels.cluster_triton")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # conftest: no CUDA -> interpreter
BACKENDS = ("triton", "reference")
TILE = 16  # the interpreter's BLOCK_N and last-rows BLOCK_M (cluster_triton.tile_config): sizes below cross them

pytestmark = [pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")]


@pytest.fixture
def gen():
    return new_generator(DEVICE)


# ---------------------------------------------------------------------------------------------- clusters


def random_sizes(total, count, gen, *, tile=TILE):
    """``count`` sizes summing to ``total``: a mix of empty clusters, clusters of one token, clusters below a tile
    and clusters of one to three tiles (the last cluster takes what is left)."""
    def draw(low, high):
        return int(torch.randint(low, high, (1,), generator=gen, device=gen.device))

    sizes = []
    for _ in range(count - 1):
        size = (0, 1, draw(2, max(3, tile)), draw(tile, 3 * tile + 1))[draw(0, 4)]
        size = min(size, total - sum(sizes))
        sizes.append(size)
    return sizes + [total - sum(sizes)]


def random_offsets(B, H, total, count, gen, *, tile=TILE, device=DEVICE):
    """(B, H, count + 1) int32 offsets, different per (batch, head), ending at ``total``."""
    rows = [[0] + torch.tensor(random_sizes(total, count, gen, tile=tile)).cumsum(0).tolist()
            for _ in range(B * H)]
    return torch.tensor(rows, dtype=torch.int32, device=device).view(B, H, count + 1)


def random_lists(B, H, cq, ck, gen, *, min_count=0, width=None, device=DEVICE):
    """Distinct key clusters in random order per query cluster; the entries after each count are arbitrary
    values (out of range too), which must be ignored."""
    width = ck if width is None else width
    ids = torch.rand(B, H, cq, ck, generator=gen, device=device).argsort(-1)[..., :width].to(torch.int32)
    counts = torch.randint(min_count, width + 1, (B, H, cq), generator=gen, device=device).to(torch.int32)
    junk = torch.randint(-3, ck + 3, ids.shape, generator=gen, device=device).to(torch.int32)
    slot = torch.arange(width, device=device)
    return torch.where(slot < counts[..., None], ids, junk).contiguous(), counts


def all_kept(B, H, cq, ck, device=DEVICE):
    ids = torch.arange(ck, dtype=torch.int32, device=device).expand(B, H, cq, ck).contiguous()
    return ids, torch.full((B, H, cq), ck, dtype=torch.int32, device=device)


def oracle_token_mask(q_offsets, k_offsets, kv_clusters, kv_cluster_counts, LQ, LK):
    """(B, H, LQ, LK) bool, one rectangle per kept cluster pair, with plain loops."""
    B, H, cq = kv_cluster_counts.shape
    qo, ko, ids, cnt = (t.cpu().tolist() for t in (q_offsets, k_offsets, kv_clusters, kv_cluster_counts))
    mask = torch.zeros(B, H, LQ, LK, dtype=torch.bool)
    for b in range(B):
        for h in range(H):
            for c in range(cq):
                for j in ids[b][h][c][:cnt[b][h][c]]:
                    mask[b, h, qo[b][h][c]:qo[b][h][c + 1], ko[b][h][j]:ko[b][h][j + 1]] = True
    return mask.to(q_offsets.device)


def dense_oracle(q, k, v, clusters, *, scale=None, row_chunk=None):
    """Dense float64 attention under the oracle token mask: (out (B, H, LQ, D), lse (B, H, LQ)); rows with no
    key give 0 and -inf."""
    B, H, LQ, D = q.shape
    LK = k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    mask = oracle_token_mask(*clusters, LQ, LK)
    k64, v64 = k.double(), v.double()
    out = torch.empty(B, H, LQ, D, dtype=torch.float64, device=q.device)
    lse = torch.empty(B, H, LQ, dtype=torch.float64, device=q.device)
    step = row_chunk or LQ
    for r0 in range(0, LQ, step):
        rows = slice(r0, min(LQ, r0 + step))
        s = (q[:, :, rows].double() @ k64.transpose(-1, -2)) * scale
        s = s.masked_fill(~mask[:, :, rows], float("-inf"))
        row_lse = torch.logsumexp(s, dim=-1)
        out[:, :, rows] = torch.exp(s - row_lse[..., None]).masked_fill(~mask[:, :, rows], 0.0) @ v64
        lse[:, :, rows] = row_lse
    return out, lse


def run_and_check(backend, q, k, v, clusters, gen, *, ctx="", row_chunk=None, **kwargs):
    out, lse = K.cluster_block_attention(q, k, v, *clusters, backend=backend, return_lse=True, **kwargs)
    expected = dense_oracle(q, k, v, clusters, scale=kwargs.get("scale"), row_chunk=row_chunk)
    assert_matches(out, lse, expected, q.dtype, f"{backend} {ctx} seed={gen.initial_seed()}")
    return out, lse, expected


def random_clusters(B, H, LQ, LK, cq, ck, gen, *, k_end=None, min_count=0, tile=TILE):
    q_offsets = random_offsets(B, H, LQ, cq, gen, tile=tile)
    k_offsets = random_offsets(B, H, LK if k_end is None else k_end, ck, gen, tile=tile)
    return (q_offsets, k_offsets, *random_lists(B, H, cq, ck, gen, min_count=min_count))


# ----------------------------------------------------------------------------------- kernels vs oracle

# (LQ, LK, head_dim, query clusters, key clusters, last key offset): odd lengths, a single token, cross lengths,
# key padding (keys past the last offset), padded head dims.
SHAPES = {
    "L1": (1, 1, 64, 1, 1, None),
    "L90-D64": (90, 90, 64, 6, 9, None),
    "LQ70-LK131-D128-padding": (70, 131, 128, 5, 8, 120),
    "LQ131-LK50-D80": (131, 50, 80, 7, 6, None),
    "L33-D8": (33, 33, 8, 3, 4, 30),
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("backend", BACKENDS)
def test_random_clusters(backend, shape, dtype, gen):
    LQ, LK, D, cq, ck, k_end = shape
    q, k, v = make_qkv(1, 2, LQ, LK, D, dtype, gen)
    clusters = random_clusters(1, 2, LQ, LK, cq, ck, gen, k_end=k_end)
    run_and_check(backend, q, k, v, clusters, gen, ctx=f"shape={shape} {dtype}")


def _one_cluster_each(B, H, LQ, LK, gen):
    q_off = torch.tensor([0, LQ], dtype=torch.int32, device=DEVICE).expand(B, H, 2).contiguous()
    k_off = torch.tensor([0, LK], dtype=torch.int32, device=DEVICE).expand(B, H, 2).contiguous()
    return (q_off, k_off, *all_kept(B, H, 1, 1))


def _tiny_and_empty(B, H, LQ, LK, gen):  # sizes 0 and 1 only, apart from the last cluster
    q_off = random_offsets(B, H, LQ, 12, gen, tile=2)
    k_off = random_offsets(B, H, LK, 20, gen, tile=2)
    return (q_off, k_off, *random_lists(B, H, 12, 20, gen, min_count=1))


def _huge_clusters(B, H, LQ, LK, gen):  # clusters of several tiles each
    q_off = random_offsets(B, H, LQ, 3, gen, tile=4 * TILE)
    k_off = random_offsets(B, H, LK, 3, gen, tile=4 * TILE)
    return (q_off, k_off, *random_lists(B, H, 3, 3, gen, min_count=1))


def _no_keys(B, H, LQ, LK, gen):  # every count 0
    q_off, k_off, ids, counts = random_clusters(B, H, LQ, LK, 5, 7, gen)
    return q_off, k_off, ids, torch.zeros_like(counts)


def _zero_width(B, H, LQ, LK, gen):  # MAXK = 0
    q_off, k_off, _, counts = random_clusters(B, H, LQ, LK, 5, 7, gen)
    return q_off, k_off, torch.zeros(B, H, 5, 0, dtype=torch.int32, device=DEVICE), torch.zeros_like(counts)


def _no_key_clusters(B, H, LQ, LK, gen):  # CK = 0: every key is padding
    q_off = random_offsets(B, H, LQ, 4, gen)
    k_off = torch.zeros(B, H, 1, dtype=torch.int32, device=DEVICE)
    ids, counts = random_lists(B, H, 4, 3, gen)
    return q_off, k_off, ids, torch.zeros_like(counts)


def _only_empty_key_clusters(B, H, LQ, LK, gen):  # some query clusters keep only empty key clusters
    q_off = random_offsets(B, H, LQ, 4, gen)
    k_off = torch.tensor([0, 0, 0, 40, 40, LK], dtype=torch.int32, device=DEVICE).expand(B, H, 6).contiguous()
    ids = torch.tensor([[0, 1, 3], [4, 2, 0], [3, 0, 1], [1, 3, 4]], dtype=torch.int32, device=DEVICE)
    counts = torch.tensor([3, 1, 1, 3], dtype=torch.int32, device=DEVICE)  # rows 0 and 2: empty clusters only
    return q_off, k_off, ids.expand(B, H, 4, 3).contiguous(), counts.expand(B, H, 4).contiguous()


def _every_row_empty_somewhere(B, H, LQ, LK, gen):
    q_off, k_off, ids, counts = random_clusters(B, H, LQ, LK, 6, 9, gen, min_count=1)
    counts[..., ::2] = 0
    return q_off, k_off, ids, counts


CLUSTER_KINDS = {"one-cluster-each": _one_cluster_each, "tiny-and-empty": _tiny_and_empty,
                 "huge-clusters": _huge_clusters, "no-keys": _no_keys, "zero-width": _zero_width,
                 "no-key-clusters": _no_key_clusters, "only-empty-key-clusters": _only_empty_key_clusters,
                 "empty-lists": _every_row_empty_somewhere}


@pytest.mark.parametrize("kind", CLUSTER_KINDS.values(), ids=CLUSTER_KINDS.keys())
@pytest.mark.parametrize("backend", BACKENDS)
def test_cluster_kinds(backend, kind, gen):
    B, H, LQ, LK = 2, 1, 83, 97
    q, k, v = make_qkv(B, H, LQ, LK, 64, torch.bfloat16, gen)
    run_and_check(backend, q, k, v, kind(B, H, LQ, LK, gen), gen, ctx=kind.__name__)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_all_kept_equals_dense_sdpa(backend, dtype, gen):
    B, H, L, D = 2, 2, 77, 64
    q, k, v = make_qkv(B, H, L, L, D, dtype, gen)
    clusters = (random_offsets(B, H, L, 5, gen), random_offsets(B, H, L, 6, gen), *all_kept(B, H, 5, 6))
    out = K.cluster_block_attention(q, k, v, *clusters, backend=backend)
    sdpa = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    rel = ((out.float() - sdpa).norm() / sdpa.norm()).item()
    assert rel < OUT_TOL[dtype], f"vs SDPA: relative error {rel:.2e} seed={gen.initial_seed()}"


def test_batch_heads_differ(gen):
    """B=2, H=3, clusters and lists per (batch, head); scale given; the two backends agree."""
    B, H, LQ, LK = 2, 3, 64, 75
    q, k, v = make_qkv(B, H, LQ, LK, 64, torch.float16, gen)
    clusters = random_clusters(B, H, LQ, LK, 5, 6, gen, k_end=70)
    results = [run_and_check(backend, q, k, v, clusters, gen, scale=0.2, ctx="B=2 H=3")[:2] for backend in BACKENDS]
    (o_t, lse_t), (o_r, lse_r) = results
    rel = ((o_t.float() - o_r.float()).norm() / o_r.float().norm()).item()
    assert rel < OUT_TOL[torch.float16], f"triton vs reference {rel:.2e} seed={gen.initial_seed()}"
    finite = torch.isfinite(lse_r)
    assert torch.equal(finite, torch.isfinite(lse_t))
    assert (lse_t[finite] - lse_r[finite]).abs().max() < 1e-3, f"seed={gen.initial_seed()}"


@pytest.mark.parametrize("D", [64, 80])
@pytest.mark.parametrize("backend", BACKENDS)
def test_return_lse_false(backend, D, gen):
    q, k, v = make_qkv(1, 2, 50, 60, D, torch.bfloat16, gen)
    clusters = random_clusters(1, 2, 50, 60, 4, 5, gen)
    out = K.cluster_block_attention(q, k, v, *clusters, backend=backend)
    assert isinstance(out, torch.Tensor)
    out_lse, _ = K.cluster_block_attention(q, k, v, *clusters, backend=backend, return_lse=True)
    assert torch.equal(out, out_lse), f"seed={gen.initial_seed()}"


@pytest.mark.parametrize("view", ["contiguous", "token-major"])
@pytest.mark.parametrize("D", [64, 80])
@pytest.mark.parametrize("backend", BACKENDS)
def test_out_buffer_fully_written(backend, D, view, gen):
    """A NaN-filled out= buffer comes back with every element written and nothing outside it touched; q, k, v
    are token-major views too."""
    B, H, L = 2, 2, 57
    q, k, v = make_qkv(B, H, L, L, D, torch.bfloat16, gen, token_major=True)
    clusters = random_clusters(B, H, L, L, 4, 5, gen)
    if view == "contiguous":
        storage = out = torch.full((B, H, L, D), float("nan"), dtype=q.dtype, device=DEVICE)
    else:  # (B, L, H, D) as in Wan's attention, with an extra token and head that must stay untouched
        storage = torch.full((B, L + 3, H + 1, D), float("nan"), dtype=q.dtype, device=DEVICE)
        out = storage[:, :L, :H].transpose(1, 2)
    result, _, _ = run_and_check(backend, q, k, v, clusters, gen, out=out, ctx=f"out={view}")
    assert result.data_ptr() == out.data_ptr() and result.stride() == out.stride()
    assert not torch.isnan(out).any()
    if view == "token-major":
        assert torch.isnan(storage[:, L:]).all() and torch.isnan(storage[:, :, H:]).all(), "wrote outside out"


CONFIGS = {  # chunk boundaries inside a tile's key list, wider tiles, one launch, two with different key tiles
    "chunk-2": dict(BLOCK_M=16, BLOCK_N=16, CHUNK=2, num_warps=4, num_stages=1),
    "chunk-8-n32": dict(BLOCK_M=16, BLOCK_N=32, CHUNK=8, num_warps=4, num_stages=1),
    "m32": dict(BLOCK_M=32, BLOCK_N=16, CHUNK=4, num_warps=4, num_stages=1),
    "m64-then-m16-n32": [dict(BLOCK_M=64, BLOCK_N=16, CHUNK=4, num_warps=4, num_stages=1),
                         dict(BLOCK_M=16, BLOCK_N=32, CHUNK=2, num_warps=4, num_stages=1)],
}


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_tile_configs(config, gen):
    B, H, LQ, LK, D = 1, 2, 150, 90, 64
    q, k, v = make_qkv(B, H, LQ, LK, D, torch.bfloat16, gen)
    clusters = random_clusters(B, H, LQ, LK, 5, 9, gen, k_end=85, min_count=1)
    out, lse = KT.triton_cluster_attention(q, k, v, *clusters, scale=D ** -0.5, return_lse=True, config=config)
    assert_matches(out, lse, dense_oracle(q, k, v, clusters), q.dtype, f"{config} seed={gen.initial_seed()}")


def test_float32_reference(gen):
    q, k, v = make_qkv(2, 2, 70, 80, 64, torch.float32, gen)
    run_and_check("reference", q, k, v, random_clusters(2, 2, 70, 80, 5, 6, gen, k_end=77), gen, ctx="float32")


def test_auto_backend_on_cpu_is_reference(gen):
    if DEVICE.type != "cpu":
        pytest.skip("the CPU's auto backend")
    q, k, v = make_qkv(1, 2, 40, 40, 64, torch.bfloat16, gen)
    clusters = random_clusters(1, 2, 40, 40, 3, 4, gen)
    auto = K.cluster_block_attention(q, k, v, *clusters)
    assert torch.equal(auto, K.cluster_block_attention(q, k, v, *clusters, backend="reference"))


# ------------------------------------------------------------------------ tokens in their own order


def random_order(B, H, N, gen):
    """(B, H, N) int32 random permutations of 0..N-1, one per (batch, head)."""
    keys = torch.rand(B, H, N, generator=gen, device=gen.device)
    return keys.argsort(dim=-1).to(torch.int32).to(DEVICE)


@pytest.mark.parametrize("compensate", [False, True], ids=["exact", "compensated"])
@pytest.mark.parametrize("tail", [0, 9], ids=["video-only", "text-tail"])
@pytest.mark.parametrize("D", [64, 80, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_tokens_in_their_own_order_equal_the_call_on_permuted_copies(backend, dtype, D, tail, compensate, gen):
    """With q_order / k_order the kernel reads every row and writes every output row (and LSE) through the orders:
    bit for bit the call on copies in cluster order, scattered back, whose output matches the dense oracle; the
    positions past the orders (HunyuanVideo's text) stay where they are; ComfyUI's token-major output buffer."""
    B, H, N = 2, 3, 67
    L = N + tail
    q, k, v = make_qkv(B, H, L, L, D, dtype, gen, token_major=True)
    q_order, k_order = random_order(B, H, N, gen), random_order(B, H, N, gen)
    clusters = random_clusters(B, H, L, L, 5, 7, gen, k_end=L - 3 if tail else None)
    qp, kp, vp = K.to_cluster_order(q, q_order), K.to_cluster_order(k, k_order), K.to_cluster_order(v, k_order)
    pooled = K.pool_key_clusters(kp, vp, clusters[1], backend=backend) if compensate else None
    want = K.cluster_block_attention(qp, kp, vp, *clusters, backend=backend, return_lse=True, pooled=pooled)
    if not compensate:
        assert_matches(*want, dense_oracle(qp, kp, vp, clusters), dtype, f"{backend} seed={gen.initial_seed()}")
    pooled_in_order = K.pool_key_clusters(k, v, clusters[1], backend=backend, k_order=k_order) if compensate else None
    if compensate:
        for got, expected in zip((pooled_in_order.keys, pooled_in_order.values, pooled_in_order.log_size),
                                 (pooled.keys, pooled.values, pooled.log_size)):
            assert torch.equal(got, expected), f"pooled through k_order, seed={gen.initial_seed()}"
    out = torch.full((B, L, H, D), float("nan"), dtype=dtype, device=DEVICE).transpose(1, 2)
    got = K.cluster_block_attention(q, k, v, *clusters, backend=backend, return_lse=True, pooled=pooled_in_order,
                                    out=out, q_order=q_order, k_order=k_order)
    assert got[0].data_ptr() == out.data_ptr() and not torch.isnan(out).any()
    for name, g, w in zip(("out", "lse", "compensated lse"), got, want):
        assert torch.equal(g, K.to_token_order(w, q_order)), f"{name}: {backend} seed={gen.initial_seed()}"


def test_cluster_order_round_trip(gen):
    """to_cluster_order puts token order[i] at position i (the positions past the order stay); to_token_order
    undoes it, also into a strided buffer, for rows (B, H, L, D) and LSE rows (B, H, L)."""
    B, H, N, L = 2, 3, 11, 14
    x = torch.randn(B, L, H, 8, generator=gen, device=gen.device).to(DEVICE).transpose(1, 2)
    order = random_order(B, H, N, gen)
    moved = K.to_cluster_order(x, order)
    for b in range(B):
        for h in range(H):
            source = torch.cat([order[b, h].long(), torch.arange(N, L, device=DEVICE)])
            assert torch.equal(moved[b, h], x[b, h, source])
    buffer = torch.full((B, L, H, 8), float("nan"), device=DEVICE).transpose(1, 2)
    assert K.to_token_order(moved, order, buffer).data_ptr() == buffer.data_ptr() and torch.equal(buffer, x)
    assert torch.equal(K.to_token_order(K.to_cluster_order(x[..., 0], order), order), x[..., 0])
    assert K.to_cluster_order(x, None) is x


# ------------------------------------------------------------------------------- pair count, tile table


@pytest.mark.parametrize("kind", ["random", "tiny-and-empty", "no-key-clusters", "zero-width"])
def test_pair_count_matches_oracle_mask(kind, gen):
    B, H, LQ, LK = 2, 3, 83, 97
    if kind == "random":
        clusters = random_clusters(B, H, LQ, LK, 6, 8, gen, k_end=90)
    else:
        clusters = CLUSTER_KINDS[kind](B, H, LQ, LK, gen)
    pairs = K.cluster_pair_count(*clusters)
    expected = oracle_token_mask(*clusters, LQ, LK).sum(dim=(-1, -2))
    assert pairs.dtype == torch.int64 and pairs.shape == (B, H)
    assert torch.equal(pairs, expected), f"seed={gen.initial_seed()}"


@pytest.mark.parametrize("block_m,last_block_m", [(16, None), (64, None), (32, 16), (64, 16), (128, 64)])
def test_query_tile_table(block_m, last_block_m, gen):
    """Every row in exactly one tile, tiles inside one cluster, the grid bounds respected; with two tables, a
    cluster's last rows are in the second one exactly when they fit its tile."""
    B, H, LQ, cq = 2, 2, 300, 9
    q_offsets = random_offsets(B, H, LQ, cq, gen, tile=block_m)
    tables = KT.query_tiles(q_offsets, block_m, LQ, last_block_m)
    assert len(tables) == (1 if last_block_m is None else 2)
    heights = (block_m, last_block_m)
    qo = q_offsets.cpu().long()
    for b in range(B):
        for h in range(H):
            covered = torch.zeros(LQ, dtype=torch.long)
            sizes = qo[b, h, 1:] - qo[b, h, :-1]
            rest = sizes % block_m
            fits_last = (rest > 0) & (rest <= (last_block_m or 0))
            expected_counts = ((sizes + block_m - 1) // block_m - fits_last.long(), fits_last.long())
            for (cluster, start, bound), height, count in zip(tables, heights, expected_counts):
                assert cluster.shape == start.shape == (B, H, bound) and bound <= LQ
                used = (cluster[b, h] >= 0).cpu()
                assert int(used.sum()) == int(count.sum()), f"seed={gen.initial_seed()}"
                assert not used[int(used.sum()):].any(), "unused tiles only at the end"
                for c, s in zip(cluster[b, h].cpu()[used].tolist(), start[b, h].cpu()[used].tolist()):
                    end = min(s + height, int(qo[b, h, c + 1]))
                    assert int(qo[b, h, c]) <= s < end, f"tile outside its cluster seed={gen.initial_seed()}"
                    covered[s:end] += 1
            assert (covered == 1).all(), f"seed={gen.initial_seed()}"


@pytest.mark.parametrize("limit,head_dim,stages", [
    (232448, 128, [3, 3]),   # H100: both launches keep three stages
    (101376, 128, [3, 2]),   # a consumer GPU (~99 KB a block): the 64 x 64 launch drops to two
    (101376, 64, [3, 3]),    # half the bytes per row: both fit
    (40000, 128, [1, 1]),    # too small for any pipelining: one stage, and Triton reports what is missing
])
def test_stages_fit_shared_memory(limit, head_dim, stages):
    hopper = [dict(BLOCK_M=128, BLOCK_N=32, CHUNK=16, num_warps=4, num_stages=3),
              dict(BLOCK_M=64, BLOCK_N=64, CHUNK=16, num_warps=4, num_stages=3)]
    fitted = [KT._fit_stages(cfg, head_dim, limit) for cfg in hopper]
    assert [cfg["num_stages"] for cfg in fitted] == stages
    assert all({**cfg, "num_stages": 0} == {**orig, "num_stages": 0} for cfg, orig in zip(fitted, hopper))


def test_query_tile_table_rejects_bad_last_height():
    with pytest.raises(ValueError, match="last_block_m"):
        KT.query_tiles(torch.tensor([[[0, 10]]], dtype=torch.int32), 16, 10, 16)


# ------------------------------------------------------------------------------------------- bad inputs


def _valid_args():
    """B=2, H=2, LQ=40, LK=50, D=64, bf16, 3 query and 4 key clusters, all kept: a call that succeeds."""
    q = torch.randn(2, 2, 40, 64, device=DEVICE).to(torch.bfloat16)
    k, v = (torch.randn(2, 2, 50, 64, device=DEVICE).to(torch.bfloat16) for _ in range(2))
    q_off = torch.tensor([0, 10, 30, 40], dtype=torch.int32, device=DEVICE).expand(2, 2, 4).contiguous()
    k_off = torch.tensor([0, 5, 20, 20, 45], dtype=torch.int32, device=DEVICE).expand(2, 2, 5).contiguous()
    ids, counts = all_kept(2, 2, 3, 4)
    return dict(q=q, k=k, v=v, q_offsets=q_off, k_offsets=k_off, kv_clusters=ids, kv_cluster_counts=counts,
                backend="reference")


def _identity_order(B, H, N):
    return torch.arange(N, dtype=torch.int32, device=DEVICE).expand(B, H, N).contiguous()


def _set(**changes):
    return lambda a: {**a, **{name: f(a) for name, f in changes.items()}}


def _edit(name, index, value):
    def change(a):
        t = a[name].clone()
        t[index] = value
        return t
    return _set(**{name: change})


BAD_INPUTS = {
    "q-float64": (_set(q=lambda a: a["q"].double()), r"^q has dtype torch.float64"),
    "k-length-mismatch": (_set(v=lambda a: a["v"][:, :, :30]), r"k and v must have shape"),
    "q-offsets-float": (_set(q_offsets=lambda a: a["q_offsets"].float()), r"^q_offsets must be an int32"),
    "q-offsets-shape": (_set(q_offsets=lambda a: a["q_offsets"][:1]), r"^q_offsets must have shape \(2, 2, CQ \+ 1\)"),
    "q-offsets-one-entry": (_set(q_offsets=lambda a: a["q_offsets"][..., :1]), r"^q_offsets must have shape"),
    "q-offsets-start": (_edit("q_offsets", (0, 1, 0), 1), r"^q_offsets\[\.\.\., 0\] must be 0"),
    "q-offsets-end": (_edit("q_offsets", (1, 0, 3), 39), r"^q_offsets\[\.\.\., -1\] must equal the sequence length 40"),
    "q-offsets-decreasing": (_edit("q_offsets", (0, 0, 2), 5), r"^q_offsets must be non-decreasing"),
    "k-offsets-past-LK": (_edit("k_offsets", (0, 0, 4), 51), r"^k_offsets\[\.\.\., -1\] must be at most .* 50"),
    "k-offsets-decreasing": (_edit("k_offsets", (1, 1, 3), 19), r"^k_offsets must be non-decreasing"),
    "k-offsets-heads": (_set(k_offsets=lambda a: a["k_offsets"][:, :1]), r"^k_offsets must have shape \(2, 2, CK \+ 1\)"),
    "counts-shape": (_set(kv_cluster_counts=lambda a: a["kv_cluster_counts"][..., :2]),
                     r"^kv_cluster_counts must have shape \(2, 2, 3\)"),
    "clusters-shape": (_set(kv_clusters=lambda a: a["kv_clusters"][..., 0]),
                       r"^kv_clusters must have shape \(2, 2, 3, MAXK\)"),
    "counts-over-width": (_edit("kv_cluster_counts", (0, 0, 1), 5), r"^kv_cluster_counts must lie in \[0, 4\]"),
    "counts-negative": (_edit("kv_cluster_counts", (0, 0, 1), -1), r"^kv_cluster_counts must lie in"),
    "cluster-id-too-large": (_edit("kv_clusters", (1, 1, 2, 0), 4), r"kv_clusters must lie in \[0, 3\]"),
    "cluster-id-negative": (_edit("kv_clusters", (1, 1, 2, 3), -1), r"kv_clusters must lie in \[0, 3\]"),
    "cluster-id-repeated": (_edit("kv_clusters", (0, 1, 0, 2), 0), r"must be distinct"),
    "clusters-on-another-device": (_set(kv_clusters=lambda a: a["kv_clusters"].to("meta")), r"^kv_clusters is on meta"),
    "out-dtype": (_set(out=lambda a: torch.empty(2, 2, 40, 64, device=DEVICE)), r"^out must be"),
    "q-order-only": (_set(q_order=lambda a: _identity_order(2, 2, 40)), r"^give both q_order and k_order"),
    "q-order-int64": (_set(q_order=lambda a: _identity_order(2, 2, 40).long(), k_order=lambda a: _identity_order(2, 2, 50)),
                      r"^q_order must be an int32 \(2, 2, N\) tensor with 1 <= N <= 40"),
    "k-order-too-long": (_set(q_order=lambda a: _identity_order(2, 2, 40), k_order=lambda a: _identity_order(2, 2, 51)),
                         r"^k_order must be an int32 \(2, 2, N\) tensor with 1 <= N <= 50"),
    "k-order-heads": (_set(q_order=lambda a: _identity_order(2, 2, 40), k_order=lambda a: _identity_order(2, 1, 50)),
                      r"^k_order must be"),
    "unknown-backend": (_set(backend=lambda a: "flash"), r"^backend must be one of"),
    "triton-float32": (_set(q=lambda a: a["q"].float(), k=lambda a: a["k"].float(), v=lambda a: a["v"].float(),
                            backend=lambda a: "triton"), r"^backend='triton' takes float16 or bfloat16"),
    "triton-head-dim-256": (_set(q=lambda a: a["q"].new_zeros(2, 2, 40, 256), k=lambda a: a["k"].new_zeros(2, 2, 50, 256),
                                 v=lambda a: a["v"].new_zeros(2, 2, 50, 256), backend=lambda a: "triton"),
                            r"^head_dim 256 is not supported"),
}


@pytest.mark.parametrize("mutate, match", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_input_raises_value_error(mutate, match):
    args = mutate(_valid_args())
    with pytest.raises(ValueError, match=match):
        K.cluster_block_attention(**args)


def test_valid_args_run():
    """The base of the bad-input cases is itself valid (unused slots may hold anything), so each case fails for
    its own reason."""
    args = _valid_args()
    args["kv_cluster_counts"] = args["kv_cluster_counts"] - 1
    args["kv_clusters"] = args["kv_clusters"].clone()
    args["kv_clusters"][..., 3] = 99
    assert K.cluster_block_attention(**args).shape == args["q"].shape


def test_unchecked_layout_skips_value_checks():
    """check_layout=False reads nothing back: only shapes and dtypes are checked."""
    args = _valid_args()
    args["kv_clusters"] = args["kv_clusters"].clone()
    args["kv_clusters"][0, 0, 0, 1] = 0  # repeated, not looked at
    assert K.cluster_block_attention(**args, check_layout=False).shape == args["q"].shape
    with pytest.raises(ValueError, match="must be distinct"):
        K.cluster_block_attention(**args)


def test_pair_count_validates():
    args = _valid_args()
    clusters = [args[n] for n in ("q_offsets", "k_offsets", "kv_clusters", "kv_cluster_counts")]
    assert K.cluster_pair_count(*clusters).tolist() == [[40 * 45] * 2] * 2
    with pytest.raises(ValueError, match="^q_offsets must be a"):
        K.cluster_pair_count(clusters[0][0], *clusters[1:])
    with pytest.raises(ValueError, match="^kv_cluster_counts must have shape"):
        K.cluster_pair_count(*clusters[:3], clusters[3][..., :1])
