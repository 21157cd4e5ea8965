"""benchmarks/key_split.py: a call split into key ranges and merged through the LSEs equals the whole call."""

import torch

from pack import import_pack
from test_versus_bench import load_benchmark


def test_split_ranges_merge_to_the_whole_call():
    """Fresh random ascending lists of ragged counts (some rows with no key in a range): P partial attentions over
    disjoint key ranges, merged through their LSEs, equal the one call (the reference sums in float32), for P = 1, 2,
    3 and 5."""
    bench, ref = load_benchmark("key_split"), import_pack("kernels.reference")
    gen = torch.Generator().manual_seed(7)
    B, H, L, D, bs = 2, 3, 203, 16, 16
    nb = -(-L // bs)
    q, k, v = (torch.randn(B, H, L, D, generator=gen, dtype=torch.float64) for _ in range(3))
    keep = torch.rand(B, H, nb, nb, generator=gen) < 0.3
    keep[..., torch.arange(nb), torch.arange(nb)] = True  # every row keeps a block
    cnt = keep.sum(-1).to(torch.int32)
    idx = torch.where(keep, torch.arange(nb), nb).sort(-1).values.clamp(max=nb - 1).to(torch.int32)
    whole = ref.reference_block_sparse_attention(q, k, v, idx, cnt, block_size=bs)
    for parts in (1, 2, 3, 5):
        bounds = [round(p * nb / parts) for p in range(parts + 1)]
        lists = bench.split_lists(torch, idx, cnt, bounds)
        assert sum(c for _, c in lists).equal(cnt)
        outs, lses = zip(*(ref.reference_block_sparse_attention(q, k, v, i, c, block_size=bs, return_lse=True)
                           for i, c in lists))
        torch.testing.assert_close(bench.merge(torch, list(outs), list(lses)), whole, rtol=1e-4, atol=1e-6)
