"""An exponential moving average (EMA) of the model's weights, the copy that is validated and evaluated.

``optim.ema_decay: d`` (off by default; the release has no EMA) keeps, after every optimizer step ``t``
(counted from 0 in each phase),

    ema <- decay_t * ema + (1 - decay_t) * model,   decay_t = min(d, (1 + t) / (10 + t))

for every floating-point parameter *and* buffer (BatchNorm's running mean and variance are averaged like
the weights they belong to, as timm's ``ModelEmaV2`` and torchvision's ``ExponentialMovingAverage`` do);
integer buffers (``num_batches_tracked``) are copied. The warm-up ``(1 + t) / (10 + t)`` keeps the average
from being dominated by the random initial weights in short runs: the horizon ``1 / (1 - decay_t)`` grows
from ~1 step to ``1 / (1 - d)`` steps.

The trainer validates the EMA copy, and writes it to the checkpoint as ``ema_state`` beside the trained
weights (``state``, which resume and ``schedule.init_from`` keep using); ``s2m2.checkpoint.load_model``
returns the EMA weights when a checkpoint has them.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def ema_decay_at(decay: float, updates: int) -> float:
    """The decay of update number ``updates`` (0-based): ``min(decay, (1 + updates) / (10 + updates))``."""
    return min(decay, (1.0 + updates) / (10.0 + updates))


def make_ema(model: nn.Module) -> nn.Module:
    """A frozen copy of ``model`` (same device and memory format) to average into."""
    ema = copy.deepcopy(model)
    ema.requires_grad_(False)
    return ema


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """``ema <- decay * ema + (1 - decay) * model`` over floating parameters and buffers; other buffers are
    copied. Both modules must have the same state-dict keys (``ema`` was made by ``make_ema(model)``)."""
    current = model.state_dict()
    for name, mine in ema.state_dict().items():
        theirs = current[name].detach()
        if mine.shape != theirs.shape:
            raise ValueError(f"EMA entry {name} has shape {tuple(mine.shape)}, the model's {tuple(theirs.shape)}")
        if mine.is_floating_point():
            mine.lerp_(theirs, 1.0 - decay)   # = decay * mine + (1 - decay) * theirs
        else:
            mine.copy_(theirs)
