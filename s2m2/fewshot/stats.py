"""Confidence intervals over episodes."""

from __future__ import annotations

import math

import torch


def mean_ci95(accuracies) -> tuple[float, float]:
    """Mean accuracy and 95% half-width 1.96 * std / sqrt(E), both in percent.

    ``accuracies`` are per-episode accuracies in [0, 1] (tensor, array or list, E >= 1). The standard
    deviation is the population one (ddof=0), as in the release and the field's ``np.std``.
    """
    acc = torch.as_tensor(accuracies, dtype=torch.float64).reshape(-1)
    if acc.numel() == 0:
        raise ValueError("mean_ci95 needs at least one episode accuracy")
    mean = acc.mean()
    std = acc.std(correction=0)
    return float(100.0 * mean), float(100.0 * 1.96 * std / math.sqrt(acc.numel()))
