"""Episode sampling: reproducibility, validity, the "all" queries protocol, clear errors, the CI formula."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from s2m2.fewshot import EpisodeError, mean_ci95, sample_episodes


def _labels(sizes: list[int], shuffle_seed: int | None = 0) -> torch.Tensor:
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(sizes)])
    if shuffle_seed is not None:  # rows of a class need not be contiguous
        labels = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(shuffle_seed))]
    return labels


def test_same_seed_same_episodes_and_different_seed_different():
    labels = _labels([30] * 12)
    a = sample_episodes(labels, ways=5, shots=2, queries=7, episodes=300, seed=3)
    b = sample_episodes(labels, ways=5, shots=2, queries=7, episodes=300, seed=3)
    c = sample_episodes(labels, ways=5, shots=2, queries=7, episodes=300, seed=4)
    for name in ("support", "query", "query_mask", "classes"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert not torch.equal(a.support, c.support)
    assert not torch.equal(a.classes, c.classes)
    # The protocol is part of the seed: more shots gives different classes, not a prefix of the same draw.
    d = sample_episodes(labels, ways=5, shots=3, queries=7, episodes=300, seed=3)
    assert not torch.equal(a.classes, d.classes)


def test_episodes_are_valid_draws_without_replacement():
    labels = _labels([25, 40, 31, 22, 60, 33, 28])
    eps = sample_episodes(labels, ways=4, shots=3, queries=5, episodes=500, seed=0)
    assert eps.support.shape == (500, 4, 3) and eps.query.shape == (500, 4, 5) and eps.classes.shape == (500, 4)
    assert eps.query_mask.all()
    for e in range(0, 500, 7):
        classes = eps.classes[e]
        assert len(set(classes.tolist())) == 4
        rows = torch.cat([eps.support[e], eps.query[e]], 1)  # (ways, shots + queries)
        assert len(set(rows.flatten().tolist())) == 4 * 8  # no image twice in an episode
        assert torch.equal(labels[rows], classes.view(4, 1).expand(4, 8))
    # Every class and (roughly uniformly) every image gets used.
    assert set(eps.classes.flatten().tolist()) == set(range(7))
    counts = torch.bincount(eps.support.flatten(), minlength=len(labels))
    assert (counts > 0).float().mean() > 0.9


def test_queries_all_takes_every_other_image_with_mask():
    sizes = [6, 9, 7, 12, 8]
    labels = _labels(sizes, shuffle_seed=1)
    eps = sample_episodes(labels, ways=3, shots=2, queries="all", episodes=200, seed=5)
    assert eps.query.shape == (200, 3, max(sizes) - 2)
    for e in range(200):
        for j, c in enumerate(eps.classes[e].tolist()):
            mask = eps.query_mask[e, j]
            assert int(mask.sum()) == sizes[c] - 2
            assert not mask[sizes[c] - 2:].any()  # real queries first, padding after
            used = set(eps.query[e, j][mask].tolist()) | set(eps.support[e, j].tolist())
            assert used == set(torch.nonzero(labels == c).flatten().tolist())


def test_clear_errors():
    labels = _labels([10, 10, 4, 10, 10, 10])
    with pytest.raises(EpisodeError, match=r"need 6 images per class.*1 class\(es\).*labels \[2\].*smallest has 4"):
        sample_episodes(labels, ways=5, shots=1, queries=5, episodes=10, seed=0)
    with pytest.raises(EpisodeError, match="at least 7 classes"):
        sample_episodes(labels, ways=7, shots=1, queries=1, episodes=10, seed=0)
    with pytest.raises(EpisodeError, match="queries must be"):
        sample_episodes(labels, ways=2, shots=1, queries="some", episodes=10, seed=0)
    with pytest.raises(EpisodeError, match="5 shots"):
        sample_episodes(labels, ways=2, shots=5, queries="all", episodes=10, seed=0)  # class of 4 images


def test_mean_ci95_formula():
    acc = np.array([0.2, 0.4, 0.9, 0.7, 0.55])
    mean, ci = mean_ci95(torch.tensor(acc))
    assert mean == pytest.approx(100 * acc.mean())
    assert ci == pytest.approx(100 * 1.96 * acc.std() / math.sqrt(len(acc)))  # np.std: ddof=0
    assert mean_ci95([0.5, 0.5, 0.5]) == (50.0, 0.0)
    with pytest.raises(ValueError):
        mean_ci95([])
