"""Backbones, heads and checkpoint import.

Backbones are created by name through a small registry (``create_backbone("wrn28_10", dropout=0.5)``)
so configs and checkpoints can record ``{"name": ..., "kwargs": ...}`` and rebuild the same model.
"""

from __future__ import annotations

from typing import Callable

from s2m2.models.base import Backbone, MixSpec, mix

_BACKBONES: dict[str, Callable[..., Backbone]] = {}


def register_backbone(name: str):
    """Decorator: make a backbone constructor available to ``create_backbone(name, **kwargs)``."""

    def wrap(fn):
        if name in _BACKBONES:
            raise ValueError(f"backbone {name!r} registered twice")
        _BACKBONES[name] = fn
        return fn

    return wrap


def _load_builtin() -> None:
    # Importing the model files registers their backbones.
    from s2m2.models import conv, resnet, wrn  # noqa: F401


def list_backbones() -> list[str]:
    _load_builtin()
    return sorted(_BACKBONES)


def create_backbone(name: str, **kwargs) -> Backbone:
    _load_builtin()
    if name not in _BACKBONES:
        raise KeyError(f"unknown backbone {name!r}; available: {sorted(_BACKBONES)}")
    return _BACKBONES[name](**kwargs)


__all__ = ["Backbone", "MixSpec", "mix", "register_backbone", "create_backbone", "list_backbones"]
