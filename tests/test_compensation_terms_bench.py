"""benchmarks/compensation_terms.py's per-call arithmetic on small random inputs (the proxy run itself is a CPU
benchmark of several minutes): every variant is exact where nothing is skipped, the per-list-row terms reduce to
the per-group ones where they must, and SVG2's cluster layout is consistent."""

from __future__ import annotations

import pytest
import torch

from test_versus_bench import load_benchmark

H, L, D = 2, 256, 16


@pytest.fixture(scope="module")
def terms():
    return load_benchmark("compensation_terms")


@pytest.fixture
def qkv():
    gen = torch.Generator().manual_seed(7)
    return tuple(torch.randn(H, L, D, generator=gen) for _ in range(3))


def rows_of(terms):
    return torch.arange(0, L, 8)


def test_nothing_skipped_is_exact_for_every_variant(terms, qkv):
    q, k, v = qkv
    nb = L // terms.BLOCK
    layout = terms.block_layout(torch.ones(nb, nb, dtype=torch.bool), q, rows_of(terms))
    result = terms.errors(q, k, v, layout, rows_of(terms))
    assert result["recall"] == pytest.approx(1.0) and result["density"] == 1.0
    for name in terms.variants():  # the kernels' own block summary computes in float32, the others in float64
        assert result[name] < (1e-6 if name == "block summary (pack)" else 1e-12), name


def test_every_skipped_group_apart_is_the_first_order(terms, qkv):
    """top G + rest with G at least the skipped groups leaves no rest: the per-group terms exactly."""
    q, k, v = qkv
    nb = L // terms.BLOCK
    mask = torch.eye(nb, dtype=torch.bool)
    layout = terms.block_layout(mask, q, rows_of(terms))
    scale = D ** -0.5
    log_size, k_mean, v_mean = terms.group_stats(k, v, layout.key_group, nb)
    a = q[:, rows_of(terms)].double() * scale
    score, _, heaviest = terms.list_row_terms(a, layout, layout.list_means * scale, log_size, k_mean, v_mean,
                                              linear=True, apart=nb)
    assert torch.isneginf(score).all()
    assert torch.equal(heaviest, ~layout.kept)


def test_one_skipped_group_per_list_row_matches_its_own_term_at_the_mean(terms, qkv):
    """With one skipped group the list row's term is that group's first-order term, moved to the row exactly
    (the score is linear in the query): a row at its list row's mean gets the same weight either way."""
    q, k, v = qkv
    nb = L // terms.BLOCK
    mask = torch.ones(nb, nb, dtype=torch.bool)
    mask[:, 0] = False
    mask[0, 0] = True  # query block 0 skips nothing
    rows = rows_of(terms)
    layout = terms.block_layout(mask, q, rows)
    scale = D ** -0.5
    log_size, k_mean, v_mean = terms.group_stats(k, v, layout.key_group, nb)
    a = q[:, rows].double() * scale
    score, value, _ = terms.list_row_terms(a, layout, layout.list_means * scale, log_size, k_mean, v_mean,
                                           linear=True)
    first = a @ k_mean.transpose(-1, -2) + log_size[:, None]
    skips = rows >= terms.BLOCK
    torch.testing.assert_close(score[:, skips], first[:, skips, 0])
    torch.testing.assert_close(value[:, skips], v_mean[:, None, 0].expand(H, int(skips.sum()), D))
    assert torch.isneginf(score[:, ~skips]).all()
    _, moved, _ = terms.list_row_terms(a, layout, layout.list_means * scale, log_size, k_mean, v_mean, linear=True,
                                       value_moved=True)
    torch.testing.assert_close(moved[:, skips], value[:, skips])  # one group: its mean value does not move


def test_moved_value_is_the_derivative_of_the_weighted_mean_value(terms, qkv):
    """The moved value of a row near its list row's mean query equals the w-weighted mean value taken at the row's
    own query, to second order in the distance."""
    q, k, v = qkv
    nb = L // terms.BLOCK
    mask = torch.eye(nb, dtype=torch.bool)
    rows = rows_of(terms)
    layout = terms.block_layout(mask, q, rows)
    scale = D ** -0.5
    log_size, k_mean, v_mean = terms.group_stats(k, v, layout.key_group, nb)
    means = layout.list_means * scale
    a_mean = torch.gather(means, 1, layout.row_list[..., None].expand(-1, -1, D))
    for eps, bound in ((1e-2, 1e-3), (1e-3, 1e-5)):
        a = a_mean + eps * torch.randn(a_mean.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        _, moved, _ = terms.list_row_terms(a, layout, means, log_size, k_mean, v_mean, linear=True, value_moved=True)
        logw = (a @ k_mean.transpose(-1, -2) + log_size[:, None]).masked_fill(layout.kept, float("-inf"))
        at_row = torch.softmax(logw, -1) @ v_mean
        assert (moved - at_row).abs().max() < bound, eps


def test_svg2_layout_is_consistent(terms, qkv, monkeypatch):
    q, k, _ = qkv
    monkeypatch.setattr(terms, "SVG2_CLUSTERS", (4, 8))
    rows = rows_of(terms)
    layout = terms.svg2_layout(q, k, rows)
    assert layout.kept.shape == (H, len(rows), 8) and layout.kept.any(-1).all()  # top-p keeps at least one
    assert layout.key_group.shape == (H, L) and int(layout.key_group.max()) < 8
    assert layout.list_means.shape == (H, 4, D) and int(layout.row_list.max()) < 4
    assert not layout.blocks
