"""SVG2's kernels at small, odd shapes: batched k-means (assignment, update, re-seed, planted clusters), the
semantic-aware permutation, and the top-p key-cluster selection, against float64 / brute-force oracles. Triton
kernels run on the CPU under Triton's interpreter (conftest.py), or on the GPU where CUDA is available
(test_svg2_gpu.py adds realistic sizes there).

Inputs are random on every run. Each test prints its seed; rerun with SVG2_SEED=<seed> to reproduce a failure.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from pack import import_pack

K = import_pack("kernels")
reference = import_pack("kernels.cluster_reference")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # conftest: no CUDA -> interpreter
BACKENDS = ("triton", "reference")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@pytest.fixture
def gen():
    seed = int(os.environ.get("SVG2_SEED") or int.from_bytes(os.urandom(6), "little"))
    print(f"seed {seed} (rerun with SVG2_SEED={seed})")
    return torch.Generator(device=DEVICE).manual_seed(seed)


def randn(*shape, gen, scale=1.0):
    return torch.randn(*shape, generator=gen, device=DEVICE) * scale


def points(B, H, N, D, dtype, gen, *, token_major=False, scale=1.0):
    """(B, H, N, D) points; token_major: a view of (B, N, H, D) memory (ComfyUI's Wan layout)."""
    if token_major:
        return (randn(B, N, H, D, gen=gen, scale=scale)).to(dtype).transpose(1, 2)
    return randn(B, H, N, D, gen=gen, scale=scale).to(dtype)


def oracle_distances(x, centroids):
    """(B, H, N, K) float64 squared distances to the centroids as rounded to x's dtype (what the kernels use)."""
    c = centroids.to(x.dtype).double()
    return ((x.double()[:, :, :, None, :] - c[:, :, None, :, :]) ** 2).sum(-1)


def same_partition(a, b):
    """True when labels a and b (1-D) group the points identically (a bijection between their label sets)."""
    pairs = torch.unique(torch.stack([a.long(), b.long()]), dim=1)
    return pairs.shape[1] == torch.unique(a).numel() == torch.unique(b).numel()


# ------------------------------------------------------------------------------------------------ assignment

ASSIGN_SHAPES = {  # (N, K, D)
    "N1-K1": (1, 1, 64),
    "N37-K5": (37, 5, 64),
    "N130-K17-D128": (130, 17, 128),
    "N65-K40-D80": (65, 40, 80),
}


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("shape", ASSIGN_SHAPES.values(), ids=ASSIGN_SHAPES.keys())
@pytest.mark.parametrize("backend", BACKENDS)
def test_assign_matches_oracle(backend, shape, dtype, gen):
    N, C, D = shape
    x = points(2, 3, N, D, dtype, gen, token_major=N % 2 == 1)
    centroids = randn(2, 3, C, D, gen=gen)
    labels, dist = K.kmeans_assign(x, centroids, backend=backend)
    assert labels.shape == dist.shape == (2, 3, N) and labels.dtype == torch.int32 and dist.dtype == torch.float32
    d64 = oracle_distances(x, centroids)
    best, oracle_labels = d64.min(-1)
    chosen = d64.gather(-1, labels.long()[..., None]).squeeze(-1)
    tol = 1e-4 * d64.abs().amax().item() + 1e-4
    ctx = f"{backend} {shape} {dtype} seed={gen.initial_seed()}"
    assert ((chosen - best) <= tol).all(), f"{ctx}: a point did not get a nearest centroid"
    if C > 1:
        second = d64.topk(2, dim=-1, largest=False).values[..., 1]
        clear = (second - best) > tol
        assert torch.equal(labels[clear].long(), oracle_labels[clear]), f"{ctx}: labels differ where the margin is clear"
    assert torch.allclose(dist.double(), best, rtol=1e-4, atol=tol), f"{ctx}: squared distances"


@pytest.mark.parametrize("backend", BACKENDS)
def test_assign_ties_go_to_the_lowest_index(backend, gen):
    """Exact ties (small integers are exact in bf16 and in the fp32 dot): the first of equal centroids wins, also
    when the copies sit in different centroid tiles of the kernel."""
    B, H, N, D, C = 1, 2, 40, 64, 24
    centroids = torch.randint(-3, 4, (B, H, C, D), generator=gen, device=DEVICE).float()
    centroids[:, :, 7] = centroids[:, :, 3]    # same tile
    centroids[:, :, 20] = centroids[:, :, 3]   # another tile
    centroids[:, :, 21] = centroids[:, :, 19]
    pick = torch.randint(0, C, (N,), generator=gen, device=DEVICE)
    x = (centroids[:, :, pick] + torch.randint(0, 2, (B, H, N, D), generator=gen, device=DEVICE)).to(torch.bfloat16)
    labels, _ = K.kmeans_assign(x, centroids, backend=backend)
    d64 = oracle_distances(x, centroids)
    expected = d64.argmin(-1)  # torch: first index of the minimum
    assert torch.equal(labels.long(), expected), f"{backend} seed={gen.initial_seed()}"
    assert not (labels == 7).any() and not (labels == 20).any() and not (labels == 21).any()


# ------------------------------------------------------------------------------------------------ order and update


@pytest.mark.parametrize("backend", BACKENDS)
def test_cluster_order_is_the_stable_sort(backend, gen):
    """torch's sort, and the counting sort (two tiles of 64 points on the CPU, the second ragged; 9 clusters in 16
    bins, the last of them the padding's)."""
    labels = torch.randint(0, 9, (2, 3, 101), generator=gen, device=DEVICE, dtype=torch.int32)
    labels[0, 0] = 4  # a problem with one non-empty cluster
    order, offsets = K.cluster_order(labels, 9, backend=backend)
    assert order.dtype == offsets.dtype == torch.int32 and offsets.shape == (2, 3, 10)
    expected = torch.from_numpy(labels.cpu().numpy().argsort(axis=-1, kind="stable")).to(DEVICE)
    assert torch.equal(order.long(), expected)
    counts = torch.stack([torch.bincount(row, minlength=9) for row in labels.reshape(-1, 101).long()]).view(2, 3, 9)
    assert torch.equal(offsets[..., 1:].long() - offsets[..., :-1].long(), counts)
    assert (offsets[..., 0] == 0).all() and (offsets[..., -1] == 101).all()


@pytest.mark.parametrize("clusters", [1, 15, 16, 200])
def test_counting_sort_at_bin_edges(clusters, gen):
    """The counting sort equals torch's for one cluster, for cluster counts that just fill (15) or just pass (16) a
    power of two of bins, and for more clusters than a tile has points (most of them empty in every tile)."""
    labels = torch.randint(0, clusters, (1, 2, 150), generator=gen, device=DEVICE, dtype=torch.int32)
    got = K.cluster_order(labels, clusters, backend="triton")
    want = K.cluster_order(labels, clusters, backend="reference")
    for g, w in zip(got, want):
        assert torch.equal(g, w), f"clusters={clusters} seed={gen.initial_seed()}"


def test_update_in_place_writes_the_same_centroids(gen):
    x = points(1, 2, 77, 64, torch.bfloat16, gen)
    old = randn(1, 2, 11, 64, gen=gen)
    order, offsets = K.cluster_order(labels_with_empty_clusters(1, 2, 77, 11, {3}, gen), 11)
    seeds = torch.full((1, 2, 11), -1, dtype=torch.int32, device=DEVICE)
    for backend in BACKENDS:
        want = K.kmeans_update(x, order, offsets, old, seeds, backend=backend)
        work = old.clone()
        got = K.kmeans_update(x, order, offsets, work, seeds, backend=backend, in_place=True)
        assert got.data_ptr() == work.data_ptr() and torch.equal(got, want), backend
    with pytest.raises(ValueError, match="in_place needs float32 contiguous"):
        K.kmeans_update(x, order, offsets, old.half(), seeds, in_place=True)


def labels_with_empty_clusters(B, H, N, C, empty, gen):
    """Random labels in [0, C): the clusters in ``empty`` get no point, every other at least one."""
    used = torch.tensor([c for c in range(C) if c not in empty], device=DEVICE)
    labels = used[torch.randint(0, len(used), (B, H, N), generator=gen, device=DEVICE)]
    labels[..., :len(used)] = used
    return labels.to(torch.int32)


@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("backend", BACKENDS)
def test_update_matches_oracle(backend, dtype, D, gen):
    B, H, N, C = 2, 2, 77, 11
    x = points(B, H, N, D, dtype, gen, token_major=True)
    old = randn(B, H, C, D, gen=gen)
    labels = labels_with_empty_clusters(B, H, N, C, {2, 5, 10}, gen)
    order, offsets = K.cluster_order(labels, C)
    seeds = torch.full((B, H, C), -1, dtype=torch.int32, device=DEVICE)
    seeds[:, :, 5] = torch.randint(0, N, (B, H), generator=gen, device=DEVICE).to(torch.int32)
    seeds[:, :, 3] = 0  # ignored: cluster 3 is not empty
    new = K.kmeans_update(x, order, offsets, old, seeds, backend=backend)
    assert new.shape == (B, H, C, D) and new.dtype == torch.float32

    x64 = x.double()
    for b in range(B):
        for h in range(H):
            for c in range(C):
                members = labels[b, h] == c
                if members.any():
                    expected = x64[b, h][members].mean(0)
                elif seeds[b, h, c] >= 0:
                    expected = x64[b, h, seeds[b, h, c].long()]
                else:
                    expected = old[b, h, c].double()
                torch.testing.assert_close(new[b, h, c].double(), expected, rtol=1e-5, atol=1e-5,
                                           msg=f"{backend} cluster {c} of ({b}, {h}) seed={gen.initial_seed()}")


def test_reseed_takes_the_farthest_points_in_order(gen):
    B, H, N, C = 2, 2, 50, 12
    dist = torch.rand(B, H, N, generator=gen, device=DEVICE)
    labels = labels_with_empty_clusters(B, H, N, C, {0, 4, 11}, gen)
    _, offsets = K.cluster_order(labels, C)
    seeds = K.reseed_points(offsets, dist)
    farthest = dist.argsort(dim=-1, descending=True)
    assert torch.equal(seeds[..., [0, 4, 11]].long(), farthest[..., :3])
    others = [c for c in range(C) if c not in (0, 4, 11)]
    assert (seeds[..., others] == -1).all()
    limited = K.reseed_points(offsets, dist, limit=2)
    assert torch.equal(limited[..., [0, 4]].long(), farthest[..., :2]) and (limited[..., 11] == -1).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_clusters_are_reseeded_then_filled(backend, gen):
    """Centroids far from every point get no point; the update moves them onto the farthest points, and the next
    iteration gives them members: no cluster is empty after two iterations."""
    B, H, N, D, C = 1, 2, 90, 64, 6
    x = points(B, H, N, D, torch.bfloat16, gen)
    init = K.strided_init(x, C)
    init[:, :, [1, 4]] = 1e3  # nothing is near these
    one = K.batched_kmeans(x, C, 1, init=init, backend=backend)
    assert (one.sizes[..., [1, 4]] == 0).all()
    _, dist = K.kmeans_assign(x, init, backend=backend)
    far = dist.argsort(dim=-1, descending=True)[..., :2]
    for b in range(B):
        for h in range(H):
            torch.testing.assert_close(one.centroids[b, h, [1, 4]], x[b, h, far[b, h]].float())
    two = K.batched_kmeans(x, C, 1, init=one.centroids, backend=backend)
    assert (two.sizes > 0).all(), f"{backend} seed={gen.initial_seed()}: sizes {two.sizes.tolist()}"


# ------------------------------------------------------------------------------------------------ k-means


def planted(B, H, runs, D, gen, *, shuffle):
    """Points around well-separated centres: (x bf16 (B, H, N, D), planted labels (B, H, N), centres).
    ``runs``: the size of each planted cluster; unshuffled, each is a contiguous run of tokens (like an object
    occupying a region of the video), shuffled they are scattered."""
    P = len(runs)
    centres = randn(B, H, P, D, gen=gen, scale=4.0)
    truth = torch.repeat_interleave(torch.arange(P, device=DEVICE), torch.tensor(runs, device=DEVICE))
    truth = truth.expand(B, H, -1).clone()
    if shuffle:
        perm = torch.rand(B, H, truth.shape[-1], generator=gen, device=DEVICE).argsort(-1)
        truth = torch.gather(truth, -1, perm)
    x = torch.gather(centres, 2, truth[..., None].expand(-1, -1, -1, D)) + randn(*truth.shape, D, gen=gen, scale=0.3)
    return x.to(torch.bfloat16), truth, centres


@pytest.mark.parametrize("backend", BACKENDS)
def test_kmeans_recovers_planted_clusters_from_warm_start(backend, gen):
    """Scattered planted clusters, warm-started near their centres (what later denoising steps do): the exact
    partition comes back, and the centroids are the clusters' means."""
    runs = [13, 40, 7, 25, 31]
    x, truth, centres = planted(2, 2, runs, 64, gen, shuffle=True)
    init = centres + randn(*centres.shape, gen=gen, scale=1.0)
    result = K.batched_kmeans(x, len(runs), 3, init=init, backend=backend)
    for b in range(2):
        for h in range(2):
            assert same_partition(result.labels[b, h], truth[b, h]), f"{backend} seed={gen.initial_seed()}"
            for c in range(len(runs)):
                torch.testing.assert_close(result.centroids[b, h, c].double(),
                                           x[b, h][result.labels[b, h] == c].double().mean(0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kmeans_from_strided_start_separates_planted_regions(backend, gen):
    """Planted clusters as contiguous token runs (objects in a video), more clusters than objects, cold start: every
    cluster found lies inside one planted cluster and every planted cluster is found."""
    clusters, N = 8, 200
    cuts = sorted(torch.randperm(N - 4 * 26, generator=torch.Generator().manual_seed(gen.initial_seed()))[:3].tolist())
    runs = [b - a + 26 for a, b in zip([0] + cuts, cuts + [N - 4 * 26])]  # 4 runs of >= 26 tokens (> N / clusters)
    x, truth, _ = planted(1, 2, runs, 64, gen, shuffle=False)
    result = K.batched_kmeans(x, clusters, 5, backend=backend)
    ctx = f"{backend} runs={runs} seed={gen.initial_seed()}"
    for b in range(1):
        for h in range(2):
            for c in torch.unique(result.labels[b, h]):
                assert torch.unique(truth[b, h][result.labels[b, h] == c]).numel() == 1, f"{ctx}: cluster {c} mixes"
            assert torch.unique(truth[b, h]).numel() == len(runs)


def test_kmeans_is_deterministic(gen):
    x = points(2, 2, 150, 64, torch.bfloat16, gen, token_major=True)
    a, b = (K.batched_kmeans(x, 9, 2, backend="triton") for _ in range(2))
    for name in ("labels", "order", "offsets", "centroids"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


@pytest.mark.parametrize("backend", BACKENDS)
def test_kmeans_result_is_consistent(backend, gen):
    """Labels, order, offsets and centroids agree: the order sorts by label, the offsets count the labels, and every
    non-empty centroid is the mean of its points."""
    x = points(1, 3, 97, 128, torch.float16, gen)
    r = K.batched_kmeans(x, 10, 3, backend=backend)
    assert torch.equal(torch.gather(r.labels, -1, r.order.long()), torch.sort(r.labels, dim=-1).values)
    for h in range(3):
        sizes = torch.bincount(r.labels[0, h].long(), minlength=10)
        assert torch.equal(r.sizes[0, h].long(), sizes)
        for c in torch.nonzero(sizes).flatten():
            torch.testing.assert_close(r.centroids[0, h, c].double(), x[0, h][r.labels[0, h] == c].double().mean(0),
                                       rtol=1e-5, atol=1e-5)


def test_kmeans_rejects_bad_input(gen):
    x = points(1, 1, 20, 64, torch.bfloat16, gen)
    with pytest.raises(ValueError, match="num_clusters"):
        K.batched_kmeans(x, 21, 1)
    with pytest.raises(ValueError, match="iterations"):
        K.batched_kmeans(x, 4, 0)
    with pytest.raises(ValueError, match="init"):
        K.batched_kmeans(x, 4, 1, init=torch.zeros(1, 1, 5, 64, device=DEVICE))
    with pytest.raises(ValueError, match="centroids"):
        K.kmeans_assign(x, torch.zeros(1, 1, 4, 32, device=DEVICE))
    with pytest.raises(ValueError, match="contiguous last"):
        K.kmeans_assign(x.transpose(2, 3), torch.zeros(1, 1, 4, 20, device=DEVICE))


# ------------------------------------------------------------------------------------------------ selection


def brute_force_selection(qc, kc, sizes, top_p, min_clusters):
    """Per query cluster, the set of kept key clusters, computed one row at a time in float64 (None where the
    cumulative mass lies within rounding of top_p, so float32 may rightly decide either way)."""
    B, H, CQ, D = qc.shape
    CK = kc.shape[2]
    kept = {}
    for b in range(B):
        for h in range(H):
            for i in range(CQ):
                s = [float(qc[b, h, i].double() @ kc[b, h, j].double()) / math.sqrt(D) for j in range(CK)]
                top = max(s[j] for j in range(CK) if sizes[b, h, j] > 0)
                w = [float(sizes[b, h, j]) * math.exp(s[j] - top) for j in range(CK)]
                p = [wj / sum(w) for wj in w]
                ranked = sorted(range(CK), key=lambda j: (-p[j], j))
                chosen, mass, close = [], 0.0, False
                for j in ranked:
                    if top_p < 1.0 and mass > top_p:
                        break
                    chosen.append(j)
                    mass += p[j]
                    close |= top_p < 1.0 and abs(mass - top_p) < 1e-5
                for j in ranked[len(chosen):max(1, min_clusters)]:
                    chosen.append(j)
                kept[(b, h, i)] = None if close else set(chosen)
    return kept


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("top_p,min_clusters", [(0.9, 1), (0.5, 4), (0.02, 3), (1.0, 1)])
def test_selection_matches_brute_force(top_p, min_clusters, backend, gen):
    B, H, CQ, CK, D = 2, 2, 17, 13, 64  # 17 query clusters: two of the kernel's 16-row tiles, the second ragged
    qc, kc = randn(B, H, CQ, D, gen=gen, scale=1.5), randn(B, H, CK, D, gen=gen, scale=1.5)
    sizes = torch.randint(0, 9, (B, H, CK), generator=gen, device=DEVICE)
    sizes[..., 0] = 3  # at least one non-empty key cluster
    sel = K.select_key_clusters(qc, kc, sizes, top_p=top_p, min_clusters=min_clusters, backend=backend,
                                with_kept=True)
    assert sel.order.dtype == sel.counts.dtype == torch.int32 and sel.order.shape == (B, H, CQ, CK)
    assert sorted(sel.order.flatten(0, 2).tolist()[0]) == list(range(CK)), "each row is a permutation"
    assert torch.equal(sel.kept, reference.keep_table(sel.order, sel.counts, CK)[..., :CK])
    expected = brute_force_selection(qc, kc, sizes, top_p, min_clusters)
    checked = 0
    for (b, h, i), want in expected.items():
        got = sel.order[b, h, i, :sel.counts[b, h, i]].tolist()
        assert len(set(got)) == len(got)
        assert sel.kept_keys[b, h, i] == sizes[b, h, got].sum(), "kept_keys"
        if want is not None:
            checked += 1
            assert set(got) == want, f"row {(b, h, i)} top_p={top_p} seed={gen.initial_seed()}"
    assert checked >= len(expected) // 2
    if top_p == 1.0:
        assert (sel.counts == CK).all() and (sel.kept_keys == sizes.sum(-1, keepdim=True)).all()


def test_selection_size_weighting_and_empty_clusters(gen):
    """Two key clusters with the same centroid: the bigger one carries proportionally more mass; an empty cluster,
    however well it matches, is ranked last."""
    D = 64
    qc = randn(1, 1, 1, D, gen=gen)
    kc = torch.zeros(1, 1, 3, D, device=DEVICE)
    kc[0, 0, 2] = qc[0, 0, 0] * 10
    sizes = torch.tensor([[[10, 30, 0]]], device=DEVICE)
    probs = K.cluster_scores(qc, kc, sizes)
    torch.testing.assert_close(probs[0, 0, 0], torch.tensor([0.25, 0.75, 0.0], device=DEVICE))
    for backend in BACKENDS:
        sel = K.select_key_clusters(qc, kc, sizes, top_p=0.5, backend=backend)
        assert sel.order[0, 0, 0].tolist() == [1, 0, 2] and sel.counts.item() == 1 and sel.kept_keys.item() == 30


@pytest.mark.parametrize("D", [64, 128])
def test_selection_kernel_equals_the_torch_path(D, gen):
    """The kernel against the torch path on the same centroids: same counts, kept keys and kept table; the orders
    may differ only among clusters of (nearly) equal probability, which rank the same (empty clusters, and padding
    past 33 key clusters, last and in id order). The order lands in a strided view: SVG2's layout buffer with
    HunyuanVideo's text column first."""
    B, H, CQ, CK = 1, 3, 21, 33
    qc, kc = randn(B, H, CQ, D, gen=gen, scale=0.5), randn(B, H, CK, D, gen=gen, scale=0.5)
    sizes = torch.randint(1, 40, (B, H, CK), generator=gen, device=DEVICE)
    sizes[..., ::5] = 0  # 7 empty clusters in every head
    buffer = torch.full((B, H, CQ + 1, CK + 1), -7, dtype=torch.int32, device=DEVICE)
    got = K.select_key_clusters(qc, kc, sizes, top_p=0.7, min_clusters=2, backend="triton",
                                order_out=buffer[:, :, :CQ, 1:], with_kept=True)
    want = K.select_key_clusters(qc, kc, sizes, top_p=0.7, min_clusters=2, backend="reference", with_kept=True)
    assert got.order.data_ptr() == buffer[:, :, :CQ, 1:].data_ptr()
    assert (buffer[:, :, :, 0] == -7).all() and (buffer[:, :, CQ] == -7).all(), "wrote outside the view"
    probs = K.cluster_scores(qc, kc, sizes).double()
    ranked = torch.gather(probs, -1, got.order.long())
    assert (ranked[..., 1:] <= ranked[..., :-1] + 1e-7).all(), f"not by decreasing P', seed={gen.initial_seed()}"
    empty = torch.gather((sizes == 0)[:, :, None].expand(-1, -1, CQ, -1), -1, got.order.long())
    assert empty[..., -7:].all() and not empty[..., :-7].any() and (got.order[..., -7:].diff(dim=-1) > 0).all()
    assert torch.equal(got.counts, want.counts), f"seed={gen.initial_seed()}"
    assert torch.equal(got.kept_keys, want.kept_keys) and torch.equal(got.kept, want.kept)


def test_selection_backends_named(gen):
    """'auto' takes the kernel only on a GPU and within its key clusters; asking for the kernel where it cannot run
    names the limit."""
    assert K.selection_backend("auto", torch.device("cpu"), 1000) == "reference"
    assert K.selection_backend("auto", torch.device("cuda"), K.MAX_KEY_CLUSTERS + 1) == "reference"
    assert K.selection_pair_bytes(1000, on_gpu=True) == 0 < K.selection_pair_bytes(1000, on_gpu=False)
    assert K.selection_pair_bytes(K.MAX_KEY_CLUSTERS + 1, on_gpu=True) == K.selection_pair_bytes(1000, on_gpu=False)
    qc = randn(1, 1, 2, 64, gen=gen)
    kc = randn(1, 1, K.MAX_KEY_CLUSTERS + 1, 64, gen=gen)
    with pytest.raises(ValueError, match="at most 1024 key clusters"):
        K.select_key_clusters(qc, kc, torch.ones(1, 1, K.MAX_KEY_CLUSTERS + 1, device=DEVICE), top_p=0.5,
                              backend="triton")
    with pytest.raises(ValueError, match="backend must be one of"):
        K.select_key_clusters(qc, qc, torch.ones(1, 1, 2, device=DEVICE), top_p=0.5, backend="cuda")
    with pytest.raises(ValueError, match="order_out must be an int32"):
        K.select_key_clusters(qc, qc, torch.ones(1, 1, 2, device=DEVICE), top_p=0.5,
                              order_out=torch.empty(1, 1, 2, 2, dtype=torch.int64, device=DEVICE))


def test_selection_rejects_bad_top_p(gen):
    qc = randn(1, 1, 2, 64, gen=gen)
    for bad in (0.0, -0.1, 1.01):
        with pytest.raises(ValueError, match="top_p"):
            K.select_key_clusters(qc, qc, torch.ones(1, 1, 2, device=DEVICE), top_p=bad)
