"""Head-kind inputs (benchmarks/head_kind_inputs.py): each kind of head has, under dense attention, the structure its
name claims, and the inputs are deterministic by seed. A tiny grid of 4 frames of 8 x 12 tokens."""

from __future__ import annotations

import math
import sys

import pytest
import torch

from pack import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
from head_kind_inputs import KINDS, head_kind_qkv, moving_segments  # noqa: E402

FRAMES, HEIGHT, WIDTH = 4, 8, 12


def token_axes():
    """(frame, y, x) of every token, frame-major."""
    i = torch.arange(FRAMES * HEIGHT * WIDTH)
    s = HEIGHT * WIDTH
    return i // s, (i % s) // WIDTH, i % WIDTH


def pair_mass(probabilities, related):
    """Mean over query rows of the dense attention mass on the keys ``related`` (L, L bool) marks."""
    return float((probabilities * related.float()).sum(-1).mean())


@pytest.fixture(scope="module")
def dense():
    """{kind: (L, L) dense attention probabilities of its head}."""
    q, k, _ = head_kind_qkv(KINDS, FRAMES, HEIGHT, WIDTH, head_dim=64, seed=3)
    p = torch.softmax(q[0] @ k[0].transpose(-1, -2) / 8.0, dim=-1)
    return dict(zip(KINDS, p))


def test_each_kind_has_its_structure(dense):
    f, y, x = token_axes()
    df, dy, dx = ((a[:, None] - a[None, :]).abs() for a in (f, y, x))
    segment = moving_segments(FRAMES, HEIGHT, WIDTH, seed=3)
    same_frame, same_position = df == 0, (dy == 0) & (dx == 0)
    # a frame is a quarter of the keys, a position 1/96, a segment about a sixth: each kind's mass is far above that
    assert pair_mass(dense["spatial"], same_frame) > 0.9
    assert pair_mass(dense["spatial"], same_position) < 0.3  # not a temporal head
    assert pair_mass(dense["temporal"], same_position) > 0.9
    assert pair_mass(dense["temporal"], same_frame) < 0.35
    assert pair_mass(dense["local"], (df <= 1) & (dy <= 2) & (dx <= 2)) > 0.9
    assert pair_mass(dense["sink"], (f == 0)[None, :].expand_as(df)) > 0.9
    assert pair_mass(dense["semantic"], segment[:, None] == segment[None, :]) > 0.9
    assert pair_mass(dense["semantic"], (df <= 1) & (dy <= 2) & (dx <= 2)) < 0.5  # not a local head
    p = dense["diffuse"]
    entropy = -(p * p.log()).sum(-1).mean()
    assert float(entropy) > 0.99 * math.log(p.shape[-1])


def test_semantic_segments_move_and_span_frames():
    """Each segment lives in every frame and its tokens move: the same position is not the same segment throughout,
    so neither a frame nor a position holds it."""
    segment = moving_segments(FRAMES, HEIGHT, WIDTH, seed=3).view(FRAMES, -1)
    for s in segment.unique():
        assert bool((segment == s).any(dim=1).all())
    assert float((segment[0] != segment[-1]).float().mean()) > 0.2


def test_inputs_are_deterministic_by_seed():
    a = head_kind_qkv(("semantic", "sink"), FRAMES, HEIGHT, WIDTH, seed=5)
    b = head_kind_qkv(("semantic", "sink"), FRAMES, HEIGHT, WIDTH, seed=5)
    c = head_kind_qkv(("semantic", "sink"), FRAMES, HEIGHT, WIDTH, seed=6)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])
    assert a[0].shape == (1, 2, FRAMES * HEIGHT * WIDTH, 64)


def test_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="unknown head kind 'radial'; the kinds are spatial, temporal"):
        head_kind_qkv(("radial",), FRAMES, HEIGHT, WIDTH)
