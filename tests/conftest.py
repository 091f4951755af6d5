"""Shared test fixtures: where ../shared lives, and small prepared datasets made on the fly."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

# As `s2m2 train` does, before this process's first parallel torch operation, so the intra-op threads
# inherit it: the in-process Trainers of the tests then train as CLI runs do (runtime.flush_denormal "on")
# instead of warning that only the main thread flushes (s2m2.trainer.set_flush_denormal).
torch.set_flush_denormal(True)

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("S2M2_SHARED", REPO.parent / "shared"))


def shared_path(*parts: str) -> Path:
    """Path under ../shared, or skip the test (with the reason) when it is absent."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"reference data not available: {path} (../shared is only present in development and CI)")
    return path


@pytest.fixture
def make_prepared(tmp_path):
    """Factory: write a small synthetic prepared dataset and return its folder.

    ``make_prepared(splits={"base": 8, "novel": 6}, per_class=10, size=16, channels=3, seed=0)``
    Each class has a distinct mean colour plus noise, so simple features can separate classes.
    """
    from s2m2.data import PreparedWriter

    def factory(splits=None, per_class=10, size=16, channels=3, seed=0, name="synthetic"):
        splits = splits or {"base": 8, "val": 5, "novel": 6}
        rng = np.random.default_rng(seed)
        out = tmp_path / name
        with PreparedWriter(out, dataset=name, source="synthetic", source_layout="synthetic",
                            resolution=size) as writer:
            for split, num_classes in splits.items():
                n = num_classes * per_class
                w = writer.begin_split(split, num_images=n, height=size, width=size, channels=channels,
                                       class_names=[f"{split}_{c}" for c in range(num_classes)])
                centers = rng.integers(30, 225, size=(num_classes, channels))
                for i in range(n):
                    c = i // per_class
                    img = centers[c] + rng.normal(0, 20, size=(size, size, channels))
                    w.images[i] = np.clip(img, 0, 255).astype(np.uint8)
                    w.labels[i] = c
                writer.end_split(split)
        return out

    return factory
