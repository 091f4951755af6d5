"""The training loop: data from the prepared uint8 arrays, batched augmentation on the device, every method,
validation-driven early stopping, exact resume, and DDP through torchrun.

Determinism. Nothing random depends on hidden state carried across steps:

- the sample order of epoch e is ``randperm(N)`` from a generator seeded with (seed, e);
- global step s of epoch e takes ``perm[s*G:(s+1)*G]`` (G = global batch); under DDP rank r takes the
  r-th of ``world`` equal contiguous slices of it, so one process with batch G sees the same batches;
- every step's augmentation / mixup / subset draws come from a fresh CPU generator seeded with
  (seed, e, s, rank), and the global torch RNG (dropout) is re-seeded from (seed, e, s, rank) too.

So a run resumed from any checkpoint (end of epoch, or mid-epoch after ``schedule.max_steps``) continues
bit-for-bit on CPU. The RNG states are still saved in the checkpoint (and restored) for completeness.

Phases. ``s2m2_r`` / ``s2m2_e`` with ``schedule.phase1_epochs > 0`` run phase 1 (``rotation`` /
``exemplar``) and then phase 2 in one command; with ``schedule.init_from`` phase 2 starts from a phase-1
checkpoint. At the hand-off the rotation head and the Adam state are kept, unless
``method.release_handoff`` (re-initialised rotation head and a fresh Adam, as the release does).
Phase 2 starts from phase 1's last weights (``schedule.phase2_init: best`` takes ``phase1_best.pt``).
Validation runs in every phase; patience cuts only the final phase, as in Algorithm 1 (phase 1 trains
all its epochs unless ``validation.phase1_patience`` is set). ``best.pt`` holds the best epoch of the
final phase (phase 1's best is kept as ``phase1_best.pt``).

Budgets. ``schedule.budget_minutes`` bounds the whole run's wall-clock time, validation included (phase 1
of s2m2_r/_e gets ``phase1_fraction`` of it). Time spent is carried across resumes in the checkpoint; the
step loop stops when the time left would not cover the next validation, the partial epoch is validated
and saved, and the run ends with ``stopped: budget`` and a resumable ``last.pt``. With
``schedule.lr_schedule: cosine`` the learning rate follows a cosine to 0 over each phase's share of the
budget (or over its epochs without a budget). A time-driven schedule is, by nature, not bit-exact across
resumes or machines; everything else above still is.

Moving average. With ``optim.ema_decay`` an average of the weights (``s2m2/ema.py``) is updated after every
optimizer step, restarted at each phase, validated instead of the trained weights and saved beside them.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import math
import os
import random
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from s2m2.config import PHASE1_METHOD, ConfigError, TrainConfig, config_diff, config_from_dict
from s2m2.data import EvalTransform, PreparedSplit, check_trainable, open_split
from s2m2.data.augment import TrainAugment, pack_source_sizes
from s2m2.ema import ema_decay_at, make_ema, update_ema
from s2m2.models import create_backbone
from s2m2.models.heads import create_head
from s2m2.objectives import ROTATION_METHODS, STEPS, StepContext, TrainModel
from s2m2.utils import atomic_torch_save, atomic_write, atomic_write_json, seed_everything

CHECKPOINT_FORMAT = "s2m2-checkpoint"   # the payload described in s2m2.checkpoint
CHECKPOINT_VERSION = 1
# Config keys that may change when resuming (everything else must match the checkpoint); a moved data
# folder is fine because the data fingerprint (content hashes) is checked separately.
RESUMABLE_CHANGES = ("data.root", "schedule.epochs", "schedule.max_steps", "schedule.budget_minutes",
                     "validation.patience", "validation.phase1_patience")


class TrainingError(RuntimeError):
    """A run cannot start or continue (bad data, incompatible checkpoint, ...)."""


class TrainingDiverged(RuntimeError):
    """A loss became NaN/inf; the run stopped and the last good checkpoint was kept."""


# ------------------------------------------------------------------------------------------------
# Seeds
# ------------------------------------------------------------------------------------------------
def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from any tuple of ints/strings (stable across runs, platforms and processes)."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> torch.Tensor:
    """The sample order of ``epoch``: (N,) int64, a function of (seed, epoch) only."""
    g = torch.Generator().manual_seed(derive_seed("order", seed, epoch))
    return torch.randperm(num_samples, generator=g)


def step_indices(order: torch.Tensor, step: int, global_batch: int, rank: int, world: int) -> torch.Tensor:
    """Rows of global step ``step`` that rank ``rank`` of ``world`` processes.

    The global batch is ``order[step*G:(step+1)*G]``; it is cut into ``world`` equal contiguous slices (a
    final batch not divisible by ``world`` drops its last ``len % world`` rows, so ranks stay in step).
    """
    rows = order[step * global_batch:(step + 1) * global_batch]
    usable = len(rows) // world * world
    return rows[:usable].view(world, -1)[rank] if usable else rows[:0]


def steps_per_epoch(num_samples: int, global_batch: int, world: int, drop_last: bool) -> int:
    if drop_last:
        return num_samples // global_batch
    full, rest = divmod(num_samples, global_batch)
    return full + (1 if rest >= world else 0)


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------
class TrainData:
    """One or several prepared splits as one labelled training set (labels offset per split).

    ``gather(rows)`` reads a batch from the memory-mapped arrays (rows sorted for locality, returned in the
    requested order); nothing is loaded whole. It returns uint8 (B, H, W, C) stored images, or, when the
    splits carry a training view of full-resolution photos and ``use_train_view`` is set (``train_view``
    is then True), uint8 (B, T + 1, T, C): each photo squashed to T x T plus a header row holding its
    original (height, width) (:func:`s2m2.data.augment.pack_source_sizes`), for
    ``TrainAugment(source_sized=True)`` to crop in the photo's own pixels as the release does.
    """

    def __init__(self, root: str | os.PathLike, split_names: list[str], use_train_view: bool = True):
        self.root = str(root)
        self.split_names = list(split_names)
        self.splits: list[PreparedSplit] = [open_split(root, name) for name in split_names]
        check_trainable(self.splits[0].meta, root)  # a format-1 folder of full-resolution photos: refused
        has_view = {s.split: s.train_images is not None for s in self.splits}
        if len(set(has_view.values())) != 1:
            raise TrainingError(f"{root}: only some of data.train_splits have a training view {has_view}; "
                                f"prepare the dataset again")
        self.train_view = use_train_view and all(has_view.values())
        shapes = {s.split: (s.train_images.shape[1:] if self.train_view else s.image_shape) for s in self.splits}
        if len(set(shapes.values())) != 1:
            raise TrainingError(f"{root}: data.train_splits have different image shapes {shapes}; "
                                f"they must match to be concatenated")
        sizes = [len(s) for s in self.splits]
        self.starts = np.cumsum([0] + sizes)  # row offset of each split
        label_offsets = np.cumsum([0] + [s.num_classes for s in self.splits])
        self.labels = torch.from_numpy(np.concatenate(
            [s.labels + off for s, off in zip(self.splits, label_offsets[:-1])]).astype(np.int64))
        self.num_classes = int(label_offsets[-1])
        self.image_shape = tuple(shapes[self.splits[0].split])  # (H, W, C) or (T, T, C) of the training view

    def __len__(self) -> int:
        return int(self.starts[-1])

    def gather(self, rows: torch.Tensor) -> torch.Tensor:
        """(B,) row indices -> uint8 (B, H, W, C), or packed (B, T + 1, T, C) with ``train_view`` (a fresh,
        writable CPU tensor)."""
        rows_np = rows.numpy()
        out = np.empty((len(rows_np),) + self.image_shape, dtype=np.uint8)
        source_sizes = np.empty((len(rows_np), 2), dtype=np.int32)
        order = np.argsort(rows_np, kind="stable")
        sorted_rows = rows_np[order]
        which = np.searchsorted(self.starts, sorted_rows, side="right") - 1
        for k, split in enumerate(self.splits):
            sel = which == k
            if sel.any():
                local = sorted_rows[sel] - self.starts[k]
                if self.train_view:
                    out[order[sel]] = split.train_images[local]
                    source_sizes[order[sel]] = split.source_sizes[local]
                else:
                    out[order[sel]] = split.images[local]
        images = torch.from_numpy(out)
        return pack_source_sizes(images, torch.from_numpy(source_sizes)) if self.train_view else images

    def fingerprint(self) -> str:
        text = "|".join(f"{s.split}:{s.fingerprint()}" for s in self.splits)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------------
# Distributed / device setup
# ------------------------------------------------------------------------------------------------
@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    autocast_dtype: torch.dtype | None = None   # bf16 / fp16 autocast, None for fp32
    channels_last: bool = False
    flush_denormal: str = "off"                 # set_flush_denormal's answer: on | main thread only | off | ...

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)


def init_process_group(backend: str, **kwargs) -> None:
    """``torch.distributed.init_process_group`` that lets ``destroy_process_group`` free the group later.

    DDP imports torch._dynamo on construction. Imported after the group exists, torch._dynamo (torch 2.14.1)
    keeps ~10 references to it, so destroy_process_group cannot free it and gloo's worker threads outlive
    the run: one still releasing a finished collective when the interpreter shuts down aborts the finished
    worker (s2m2.train._end_distributed has the details). Imported first, it holds none.
    """
    importlib.import_module("torch._dynamo")
    dist.init_process_group(backend=backend, **kwargs)


def set_flush_denormal(enabled: bool) -> str:
    """Flush denormal floats (magnitude < 1.2e-38) to zero in CPU arithmetic (x86 FTZ/DAZ), or stop doing so.

    Returns "on", "main thread only", "off" or "unsupported" (a CPU without the modes).

    Why: x86 cores take a microcode assist, ~100x the cost, for every operation on a denormal. Weight decay
    shrinks the weights of dead channels and their Adam moments through that range: a 30-minute CPU run of
    the CIFAR-FS best recipe with L2 5e-4 fell from ~450 to 95-250 images/s from its 7th epoch on, and a
    training step from its epoch-7 checkpoint costs 3.0x more without flushing (scripts/bench_denormals.py;
    docs/training.md, "Speed"). Flushing changes no value above 1.2e-38.

    ``torch.set_flush_denormal`` sets the calling thread only. Intra-op worker threads inherit the mode when
    they are created, but a pool that already exists keeps its own; a parallel multiply whose every product
    is a denormal shows which case this is ("main thread only": set it before the process's first parallel
    operation, as ``s2m2 train`` does).
    """
    if not torch.set_flush_denormal(enabled):
        return "unsupported"
    if not enabled:
        return "off"
    # 2**20 elements: several grains (32,768) for every intra-op thread.
    products = torch.full((1 << 20,), 1e-30) * 1e-10
    return "on" if not bool(products.count_nonzero()) else "main thread only"


def setup_runtime(config: TrainConfig) -> Runtime:
    """Device, precision, denormal flushing and (under torchrun: WORLD_SIZE > 1) the process group."""
    rc = config.runtime
    flush = set_flush_denormal(rc.flush_denormal)
    if flush == "main thread only":
        # A Python warning, not a line on stderr: only in-process use meets it (``s2m2 train`` sets the mode
        # before any parallel operation), and there it is shown once and can be filtered.
        warnings.warn("runtime.flush_denormal: denormals are flushed on the main thread only (the intra-op "
                      "thread pool existed before the trainer); CPU steps may slow down when weights decay "
                      "towards zero. Call torch.set_flush_denormal(True) before the process's first torch "
                      "computation", RuntimeWarning, stacklevel=3)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if rc.device == "auto":
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(rc.device)
        if device.type == "cuda" and device.index is None:
            device = torch.device(f"cuda:{local_rank}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise TrainingError(f"runtime.device={rc.device!r} but CUDA is not available")
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    precision = rc.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    channels_last = rc.channels_last if rc.channels_last is not None else device.type == "cuda"
    return Runtime(device, rank, world, local_rank, dtype, channels_last, flush)


# ------------------------------------------------------------------------------------------------
# Model and optimizer
# ------------------------------------------------------------------------------------------------
def head_specs(config: TrainConfig, in_dim: int, num_classes: int, method: str) -> dict[str, dict[str, Any]]:
    """``{"classifier": {"name", "kwargs"}, ["ss_head": ...]}`` as stored in the checkpoint."""
    width = config.model.classifier_width or num_classes
    if width < num_classes:
        raise ConfigError(f"model.classifier_width={width} is smaller than the {num_classes} training classes")
    name = config.classifier_name()
    kwargs: dict[str, Any] = {"in_dim": in_dim, "num_classes": width}
    if name == "cosine":
        kwargs["scale"] = config.model.classifier_scale
    elif config.model.classifier_scale is not None:
        raise ConfigError("model.classifier_scale applies to the cosine classifier only")
    specs = {"classifier": {"name": name, "kwargs": kwargs}}
    if method in ROTATION_METHODS:
        specs["ss_head"] = {"name": "rotation", "kwargs": {"in_dim": in_dim}}
    return specs


def build_model(config: TrainConfig, num_classes: int, method: str) -> tuple[TrainModel, dict[str, Any]]:
    backbone = create_backbone(config.model.backbone, **config.model.backbone_kwargs)
    specs = head_specs(config, backbone.feature_dim, num_classes, method)
    classifier = create_head(specs["classifier"]["name"], **specs["classifier"]["kwargs"])
    if specs["classifier"]["name"] == "cosine":
        specs["classifier"]["kwargs"]["scale"] = classifier.scale  # record the resolved scale
    ss_head = create_head("rotation", **specs["ss_head"]["kwargs"]) if "ss_head" in specs else None
    return TrainModel(backbone, classifier, ss_head), specs


def check_test_crop(backbone: nn.Module, config: TrainConfig) -> None:
    """Refuse a ``data.eval_crop`` the backbone cannot take before training starts, not at the first
    validation minutes later: Conv-4 with ``pool="flatten"`` only takes sizes that reach its final map side."""
    crop = config.data.test_crop
    if crop == config.data.crop_size:
        return
    was_training = backbone.training
    backbone.eval()  # one zero image: BatchNorm must not need batch statistics
    try:
        with torch.no_grad():
            backbone(torch.zeros(1, 3, crop, crop))
    except (ValueError, RuntimeError) as err:
        raise ConfigError(f"data.eval_crop={crop}: backbone {config.model.backbone} cannot take {crop}-pixel "
                          f"images ({err})") from err
    finally:
        backbone.train(was_training)


def build_optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    o = config.optim
    if o.name == "adam":
        return torch.optim.Adam(model.parameters(), lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)


def reset_module(module: nn.Module) -> None:
    for m in module.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()


# ------------------------------------------------------------------------------------------------
# Validation (paper Algorithm 1)
# ------------------------------------------------------------------------------------------------
class Validator:
    """Fixed seeded 5-way 1-shot episodes on the val split, sampled once; ``__call__(backbone) -> (acc, ci95)``."""

    def __init__(self, config: TrainConfig, runtime: Runtime):
        from s2m2.fewshot.episodes import sample_episodes

        v = config.validation
        self.split = open_split(v.root or config.data.root, config.data.val_split)
        self.transform = EvalTransform(config.data.eval_resize, config.data.test_crop)
        self.config = v
        self.runtime = runtime
        try:
            self.episodes = sample_episodes(torch.from_numpy(self.split.labels), v.ways, v.shots, v.queries,
                                            v.episodes, v.seed)
        except ValueError as err:
            raise TrainingError(f"validation episodes on {self.split.root}/{self.split.split}: {err} "
                                f"(change validation.ways/shots/queries or set validation.enabled=false)") from err

    def __call__(self, backbone: nn.Module) -> tuple[float, float]:
        from s2m2.features import extract_features
        from s2m2.fewshot.heads import evaluate_episodes
        from s2m2.fewshot.stats import mean_ci95

        was_training = backbone.training
        with self.runtime.autocast():
            features, labels = extract_features(backbone, self.split, self.transform, self.config.batch_size,
                                                device=self.runtime.device, progress=False)
        backbone.train(was_training)
        accuracies = evaluate_episodes(features.float(), labels, self.episodes, head=self.config.head)
        return mean_ci95(accuracies)


# ------------------------------------------------------------------------------------------------
# Logging
# ------------------------------------------------------------------------------------------------
class RunLog:
    """JSONL records (``log.jsonl``) and TensorBoard scalars (``tb/``), written by rank 0 only."""

    def __init__(self, out_dir: Path, enabled: bool, tensorboard: bool, keep_until_step: int | None,
                 keep_records: int | None = None):
        self.enabled = enabled
        self.path = out_dir / "log.jsonl"
        self.writer = None
        self.count = 0   # records in the file: a checkpoint stores it, so a resume keeps exactly those
        if not enabled:
            return
        if keep_until_step is not None and self.path.exists():
            # Resuming: drop records written after the checkpoint (a crashed run's tail) so the log is
            # the history of exactly the run that continues. A torn last line (power loss, full disk)
            # is dropped too.
            kept = []
            for line in self.path.read_text(errors="replace").splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                kept.append((line, rec))
            if keep_records is not None:
                kept = kept[:keep_records]
            else:  # checkpoints from before record counting
                kept = [(line, rec) for line, rec in kept if rec.get("step", 0) <= keep_until_step]
            self.count = len(kept)
            atomic_write(self.path, lambda f: f.write("".join(line + "\n" for line, _ in kept)), binary=False)
        elif keep_until_step is None and self.path.exists():
            self.path.unlink()
        self._file = open(self.path, "a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(out_dir / "tb"),
                                            purge_step=None if keep_until_step is None else keep_until_step + 1)

    def record(self, kind: str, step: int, **fields: Any) -> None:
        if not self.enabled:
            return
        rec = {"type": kind, "step": step, "time": time.time(), **fields}
        self._file.write(json.dumps(rec) + "\n")
        self._file.flush()
        self.count += 1
        if self.writer is not None:
            for key, value in fields.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                    self.writer.add_scalar(f"{kind}/{key}", value, step)

    def close(self) -> None:
        if self.enabled:
            self._file.close()
            if self.writer is not None:
                self.writer.close()


# ------------------------------------------------------------------------------------------------
# Checkpoints
# ------------------------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """Global RNG states as plain tensors/tuples (loadable with ``torch.load(weights_only=True)``)."""
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(),
             "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
             "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_payload(path: str | os.PathLike) -> dict[str, Any]:
    """One of our full checkpoints, validated by ``s2m2.checkpoint.load_checkpoint`` (errors -> TrainingError)."""
    from s2m2.checkpoint import CheckpointError, load_checkpoint

    if not Path(path).is_file():
        raise TrainingError(f"checkpoint {path} does not exist")
    try:
        return load_checkpoint(path)
    except CheckpointError as err:
        raise TrainingError(str(err)) from err


# ------------------------------------------------------------------------------------------------
# The trainer
# ------------------------------------------------------------------------------------------------
@dataclass
class Phase:
    name: str      # "main" | "phase1" | "phase2"
    method: str
    epochs: int


def plan_phases(config: TrainConfig) -> list[Phase]:
    m, s = config.method.name, config.schedule
    if m in PHASE1_METHOD:
        phases = [Phase("phase1", PHASE1_METHOD[m], s.phase1_epochs)] if s.phase1_epochs else []
        return phases + [Phase("phase2", m, s.epochs)]
    return [Phase("main", m, s.epochs)]


class Trainer:
    """Runs a training config end to end. ``Trainer(config, out_dir, resume).fit() -> summary dict``."""

    def __init__(self, config: TrainConfig, out_dir: str | os.PathLike | None = None,
                 resume: str | os.PathLike | None = None):
        self.config = config
        self.out_dir = Path(out_dir or config.runtime.out_dir)
        self.rt = setup_runtime(config)
        self.phases = plan_phases(config)
        c = config
        if not c.data.root:
            raise ConfigError("data.root is empty: set it to a prepared dataset folder (--set data.root=DIR)")
        # the full-resolution training view when augmenting; the stored (evaluation) view otherwise
        self.data = TrainData(c.data.root, c.data.train_splits, use_train_view=c.data.augment)
        self.validator = (Validator(c, self.rt)
                          if c.validation.enabled and c.data.val_split else None)
        self.data_info = {"root": str(Path(c.data.root).resolve()), "splits": list(c.data.train_splits),
                          "fingerprint": self._fingerprint(), "num_classes": self.data.num_classes}

        # Initial weights from schedule.seed (identical on every rank; DDP also broadcasts rank 0's).
        seed_everything(derive_seed("init", c.schedule.seed))
        # The model carries a rotation head whenever any phase needs one.
        head_method = "rotation" if any(p.method in ROTATION_METHODS for p in self.phases) else self.phases[0].method
        self.model, self.head_specs = build_model(c, self.data.num_classes, head_method)
        check_test_crop(self.model.backbone, c)
        self.model.to(self.rt.device)
        if self.rt.channels_last:
            self.model.to(memory_format=torch.channels_last)
        if c.runtime.sync_batchnorm and self.rt.distributed:
            if self.rt.device.type != "cuda":
                raise ConfigError("runtime.sync_batchnorm needs CUDA (SyncBatchNorm has no CPU/gloo kernel)")
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        points = c.method.mixup_points
        if points is not None and max(points) >= self.model.backbone.num_mix_points:
            raise ConfigError(f"method.mixup_points={points}: backbone {c.model.backbone} has mixup points "
                              f"0..{self.model.backbone.num_mix_points - 1} (0 = the input)")
        self.optimizer = build_optimizer(c, self.model)
        # optim.ema_decay: the averaged copy that is validated and evaluated (s2m2/ema.py)
        self.ema = make_ema(self.model) if c.optim.ema_decay is not None else None
        self.ema_updates = 0      # EMA updates in the current phase (the warm-up counts from each phase start)
        self.scaler = torch.amp.GradScaler(self.rt.device.type, enabled=self.rt.autocast_dtype == torch.float16)

        self.augment = TrainAugment(c.data.crop_size, tuple(c.data.crop_scale), tuple(c.data.crop_ratio),
                                    c.data.jitter, c.data.flip, source_sized=self.data.train_view)
        eval_transform = EvalTransform(c.data.eval_resize, c.data.crop_size)
        self.transform = self.augment if c.data.augment else (lambda images, generator: eval_transform(images))

        # progress
        self.phase_index = 0
        self.epoch = 0            # completed epochs (all phases)
        self.epoch_in_phase = 0   # completed epochs of the current phase
        self.step = 0             # optimizer steps (all phases)
        self.step_in_epoch = 0    # steps done in the current, unfinished epoch
        self.partial: dict[str, float] = {}  # meters of the unfinished epoch
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] | None = None
        self.since_best = 0
        self.elapsed = 0.0        # wall-clock seconds of training so far (all sessions, validation included)
        self.phase_started = 0.0  # self.elapsed when the current phase began (for the cosine-in-time LR)
        self.images_seen = 0      # training images (global) through the optimizer, all phases
        self.budget_spent = False # the step loop stopped the current phase for the budget
        self.log_records = None   # log.jsonl records covered by the resumed checkpoint
        self.log: RunLog | None = None
        self._clock: tuple[float, float] | None = None   # (perf_counter, self.elapsed) when this session began
        self._last_val_seconds = 0.0

        resume_path = self._resolve_resume(resume)
        if resume_path is not None:
            self._resume(resume_path)
        elif c.schedule.init_from:
            self._init_from(c.schedule.init_from)
        self._ddp_model: nn.Module | None = None
        if c.runtime.compile:
            self.model.backbone.compile()

    # -- setup helpers ---------------------------------------------------------------------------
    def _fingerprint(self) -> str:
        parts = [self.data.fingerprint()]
        if self.validator is not None:
            parts.append(f"val:{self.validator.split.fingerprint()}")
        return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]

    def _resolve_resume(self, resume) -> Path | None:
        if resume is None:
            return None
        if str(resume) == "auto":
            path = self.out_dir / "last.pt"
            return path if path.is_file() else None
        return Path(resume)

    def _model_parts(self, model: TrainModel | None = None) -> dict[str, nn.Module]:
        model = self.model if model is None else model
        parts = {"backbone": model.backbone, "classifier": model.classifier}
        if model.ss_head is not None:
            parts["ss_head"] = model.ss_head
        return parts

    def _resume(self, path: Path) -> None:
        payload = load_payload(path)
        if payload["data"]["fingerprint"] != self.data_info["fingerprint"]:
            raise TrainingError(
                f"{path}: the checkpoint was trained on data {payload['data']['root']} splits "
                f"{payload['data']['splits']} (fingerprint {payload['data']['fingerprint']}), but "
                f"{self.data_info['root']} splits {self.data_info['splits']} has fingerprint "
                f"{self.data_info['fingerprint']}; resume with the same prepared data")
        mine = self.config.to_dict()
        try:  # keys added since the checkpoint was written read as their defaults
            theirs = config_from_dict(payload["config"]).to_dict()
        except ConfigError:
            theirs = payload["config"]
        changed = [k for k in config_diff(theirs, mine)
                   if not k.startswith("runtime.") and k not in RESUMABLE_CHANGES]
        if changed:
            details = "; ".join(f"{k}: checkpoint {theirs[k.split('.')[0]].get(k.split('.')[1])!r} "
                                f"vs now {mine[k.split('.')[0]].get(k.split('.')[1])!r}" for k in changed)
            raise TrainingError(f"{path}: config differs from the checkpoint's in {details}. Only "
                                f"runtime.* and {list(RESUMABLE_CHANGES)} may change when resuming.")
        self._load_states(payload, optimizer=True)
        if self.ema is not None:  # optim.ema_decay matched the checkpoint's above, so it holds an average
            self._load_parts(payload["ema_state"], self.ema)
            self.ema_updates = payload["progress"]["ema_updates"]
        if payload.get("scaler") is not None:
            self.scaler.load_state_dict(payload["scaler"])
        progress = payload["progress"]
        self.phase_index = progress["phase_index"]
        self.epoch_in_phase = progress["epoch_in_phase"]
        self.step_in_epoch = progress["step_in_epoch"]
        self.partial = dict(progress["partial"])
        self.since_best = progress["since_best"]
        self.elapsed = progress.get("elapsed", 0.0)
        self.phase_started = progress.get("phase_started", 0.0)
        self.images_seen = progress.get("images_seen", 0)
        # A budget spent under the old budget_minutes is not spent under a new one (resume with more time).
        self.budget_spent = (progress.get("budget_spent", False) and
                             payload["config"]["schedule"].get("budget_minutes") == self.config.schedule.budget_minutes)
        self.log_records = progress.get("log_records")
        self.epoch, self.step = payload["epoch"], payload["step"]
        self.history = list(payload["history"])
        self.best = payload["best"]
        set_rng_state(payload["rng"])
        self.resumed_from = str(path)

    def _part_states(self, model: TrainModel) -> dict[str, dict[str, torch.Tensor]]:
        """A checkpoint's ``state`` (or ``ema_state``): ``{part: state_dict}`` of ``model``'s parts."""
        return {name: module.state_dict() for name, module in self._model_parts(model).items()}

    def _load_parts(self, state: dict[str, Any], model: TrainModel) -> None:
        for name, module in self._model_parts(model).items():
            if name in state:
                module.load_state_dict(state[name])

    def _load_states(self, payload: dict[str, Any], optimizer: bool) -> None:
        self._load_parts(payload["state"], self.model)
        if optimizer:
            self.optimizer.load_state_dict(payload["optimizer"])

    def _reset_ema(self) -> None:
        """The average restarts from the current weights (a new phase, or weights loaded from elsewhere)."""
        if self.ema is not None:
            self.ema.load_state_dict(self.model.state_dict())
            self.ema_updates = 0

    def _init_from(self, path: str) -> None:
        """Phase 2 from a phase-1 checkpoint: weights (and, unless release_handoff, the Adam state).

        Our checkpoints give backbone, heads and optimizer; the release's (``s2m2.checkpoint.load_model``)
        give backbone, classifier and, for a rotation model, the rotation head -- no optimizer state.
        """
        from s2m2.checkpoint import CheckpointError, load_model

        release = self.config.method.release_handoff
        try:
            loaded = load_model(path, with_heads=True, ema=False)  # the trained weights, which Adam's state fits
        except CheckpointError as err:
            raise TrainingError(f"schedule.init_from: {err}") from err
        parts = {"backbone": loaded.backbone, "classifier": loaded.classifier, "ss_head": loaded.ss_head}
        for name, module in self._model_parts().items():
            source = parts[name]
            if source is None:
                continue
            theirs = {k: tuple(v.shape) for k, v in source.state_dict().items()}
            mine = {k: tuple(v.shape) for k, v in module.state_dict().items()}
            if theirs != mine:
                raise TrainingError(f"schedule.init_from {path}: its {name} does not match this config's "
                                    f"(model.backbone / model.classifier_* / data must be those of phase 1)")
            module.load_state_dict(source.state_dict())
        same_params = (parts["ss_head"] is None) == (self.model.ss_head is None) and parts["classifier"] is not None
        if loaded.info.get("source") == "s2m2" and not release and same_params:
            self.optimizer.load_state_dict(load_payload(path)["optimizer"])
        if release and self.model.ss_head is not None:
            torch.manual_seed(derive_seed("handoff", self.config.schedule.seed))
            reset_module(self.model.ss_head)
        self._reset_ema()
        self.init_from = str(path)

    def _payload(self) -> dict[str, Any]:
        phase = self.phases[min(self.phase_index, len(self.phases) - 1)]
        heads = {k: {"name": v["name"], "kwargs": {kk: vv for kk, vv in v["kwargs"].items()}}
                 for k, v in self.head_specs.items()}
        return {
            "format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION,
            "backbone": {"name": self.config.model.backbone, "kwargs": dict(self.config.model.backbone_kwargs)},
            "heads": heads,
            "state": self._part_states(self.model),
            **({"ema_state": self._part_states(self.ema)} if self.ema is not None else {}),
            "method": self.config.method.name, "phase": phase.name,
            "epoch": self.epoch, "step": self.step,
            "config": self.config.to_dict(), "data": dict(self.data_info),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "rng": rng_state(), "history": list(self.history), "best": self.best,
            "progress": {"phase_index": self.phase_index, "epoch_in_phase": self.epoch_in_phase,
                         "step_in_epoch": self.step_in_epoch, "partial": dict(self.partial),
                         "since_best": self.since_best, "elapsed": self._elapsed(),
                         "phase_started": self.phase_started, "images_seen": self.images_seen,
                         "budget_spent": self.budget_spent, "ema_updates": self.ema_updates,
                         "log_records": self.log.count if self.log is not None else None},
        }

    def save(self, name: str) -> None:
        if self.rt.is_main:
            atomic_torch_save(self._payload(), self.out_dir / name)

    # -- budget and learning rate --------------------------------------------------------------------
    def _elapsed(self) -> float:
        """Seconds of training so far, this session included (validation time counts)."""
        if self._clock is None:
            return self.elapsed
        started, elapsed_then = self._clock
        return elapsed_then + time.perf_counter() - started

    def _synced_elapsed(self) -> float:
        """``_elapsed()`` agreed by all ranks (the max), so they stop and schedule the LR together."""
        elapsed = self._elapsed()
        if self.rt.distributed and self.config.schedule.budget_minutes is not None:
            t = torch.tensor([elapsed], dtype=torch.float64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            elapsed = float(t)
        return elapsed

    def _deadline(self, index: int) -> float | None:
        """Elapsed seconds at which phase ``index`` must end, or None without a budget."""
        s = self.config.schedule
        if s.budget_minutes is None:
            return None
        total = 60.0 * s.budget_minutes
        if len(self.phases) == 2 and index == 0:
            return s.phase1_fraction * total
        return total

    def _budget_out(self, elapsed: float | None = None, reserve: float = 0.0) -> bool:
        deadline = self._deadline(self.phase_index)
        if deadline is None:
            return False
        elapsed = self._synced_elapsed() if elapsed is None else elapsed
        return elapsed + reserve >= deadline

    def _set_lr(self, phase: Phase, elapsed: float, steps_in_epoch: int) -> None:
        """The cosine schedule (``schedule.lr_schedule: cosine``): optim.lr -> 0 over the phase."""
        if self.config.schedule.lr_schedule != "cosine":
            return
        deadline = self._deadline(self.phase_index)
        if deadline is not None:
            done = (elapsed - self.phase_started) / max(deadline - self.phase_started, 1e-9)
        else:
            done = (self.epoch_in_phase * steps_in_epoch + self.step_in_epoch) / max(phase.epochs * steps_in_epoch, 1)
        lr = self.config.optim.lr * 0.5 * (1.0 + math.cos(math.pi * min(max(done, 0.0), 1.0)))
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    # -- training ------------------------------------------------------------------------------------
    def _wrapped(self) -> nn.Module:
        if not self.rt.distributed:
            return self.model
        if self._ddp_model is None:
            from torch.nn.parallel import DistributedDataParallel as DDP
            # S2M2's mixup pass does not touch the rotation head, so DDP must look for unused parameters.
            self._ddp_model = DDP(self.model, device_ids=[self.rt.device.index] if self.rt.device.type == "cuda"
                                  else None, find_unused_parameters=self.model.ss_head is not None)
        return self._ddp_model

    def _backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def _check_finite(self, stats, phase: Phase, step_in_epoch: int) -> None:
        values = torch.stack([stats.loss.float()] + [t.float() for t in stats.terms.values()])
        finite = torch.isfinite(values).all().to(torch.int32).reshape(1)
        if self.rt.distributed:
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)  # every rank stops together
        if int(finite.item()) == 1:
            return
        terms = ", ".join(f"{k}={float(v):.4g}" for k, v in stats.terms.items())
        last = self.out_dir / "last.pt"
        kept = (f"the last good checkpoint {last} (epoch {self.epoch}) is kept" if last.exists()
                else "no checkpoint had been written yet")
        raise TrainingDiverged(
            f"non-finite loss in {phase.name} ({phase.method}) at epoch {self.epoch + 1}, step "
            f"{step_in_epoch + 1} of the epoch (global step {self.step + 1}) on rank {self.rt.rank}: "
            f"loss={float(stats.loss):.4g} ({terms}); training stopped, {kept}. Lower optim.lr or check the data.")

    def _run_epoch(self, phase: Phase, log: RunLog) -> str | None:
        """One epoch (or its rest, when resuming mid-epoch). Returns None when it completed, else why it
        stopped early: "max_steps" or "budget"."""
        c = self.config
        seed, world, rank = c.schedule.seed, self.rt.world, self.rt.rank
        global_batch = c.schedule.batch_size
        if global_batch % world:
            raise ConfigError(f"schedule.batch_size={global_batch} (global) is not divisible by the "
                              f"{world} processes")
        order = epoch_permutation(len(self.data), seed, self.epoch)
        num_steps = steps_per_epoch(len(self.data), global_batch, world, c.schedule.drop_last)
        model = self._wrapped()
        model.train()
        step_fn = STEPS[phase.method]
        meters = {"loss": 0.0, "correct": 0.0, "count": 0.0, "images": 0.0, "steps": 0.0, "seconds": 0.0}
        meters.update(self.partial)
        pool = ThreadPoolExecutor(max_workers=1) if c.runtime.prefetch else None

        def fetch(step: int):
            rows = step_indices(order, step, global_batch, rank, world)
            images = self.data.gather(rows)
            labels = self.data.labels[rows]
            if self.rt.device.type == "cuda":
                images = images.pin_memory()
            return images, labels

        bar = None
        if c.runtime.progress and self.rt.is_main:
            from tqdm import tqdm
            bar = tqdm(total=num_steps, initial=self.step_in_epoch, leave=False, dynamic_ncols=True,
                       desc=f"{phase.name} {phase.method} epoch {self.epoch + 1}")
        pending = pool.submit(fetch, self.step_in_epoch) if (pool and self.step_in_epoch < num_steps) else None
        stopped = None
        start = time.perf_counter()
        for step_in_epoch in range(self.step_in_epoch, num_steps):
            if c.schedule.max_steps is not None and self.step >= c.schedule.max_steps:
                stopped = "max_steps"
                break
            elapsed = self._synced_elapsed()
            # Stop while the time left still covers the validation that closes the (partial) epoch.
            if self._budget_out(elapsed, reserve=self._last_val_seconds if self.validator else 0.0):
                stopped = "budget"
                break
            self._set_lr(phase, elapsed, num_steps)
            images, labels = pending.result() if pending else fetch(step_in_epoch)
            if pool and step_in_epoch + 1 < num_steps:
                pending = pool.submit(fetch, step_in_epoch + 1)
            images = images.to(self.rt.device, non_blocking=True)
            labels = labels.to(self.rt.device, non_blocking=True)
            # Dropout (global RNG) and every draw of the step: functions of (seed, epoch, step, rank).
            torch.manual_seed(derive_seed("dropout", seed, self.epoch, step_in_epoch, rank))
            generator = torch.Generator().manual_seed(derive_seed("step", seed, self.epoch, step_in_epoch, rank))
            ctx = StepContext(model=model, num_mix_points=self.model.backbone.num_mix_points,
                              transform=self.transform, view_augment=self.augment, generator=generator,
                              backward=self._backward, mixup_alpha=c.method.mixup_alpha,
                              ss_weight=c.method.ss_weight, exemplar_views=c.method.exemplar_views,
                              ss_fraction=c.method.ss_fraction,
                              mixup_points=None if c.method.mixup_points is None else tuple(c.method.mixup_points),
                              autocast=self.rt.autocast, channels_last=self.rt.channels_last)
            self.optimizer.zero_grad(set_to_none=True)
            stats = step_fn(ctx, images, labels)
            self._check_finite(stats, phase, step_in_epoch)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            if self.ema is not None:
                update_ema(self.ema, self.model, ema_decay_at(c.optim.ema_decay, self.ema_updates))
                self.ema_updates += 1
            self.step += 1
            self.step_in_epoch = step_in_epoch + 1
            loss = float(stats.loss)
            meters["loss"] += loss
            meters["correct"] += float(stats.correct)
            meters["count"] += stats.count
            meters["images"] += len(labels) * world
            meters["steps"] += 1
            for name, value in stats.terms.items():
                meters[f"loss_{name}"] = meters.get(f"loss_{name}", 0.0) + float(value)
            self.images_seen += len(labels) * world
            elapsed = meters["seconds"] + time.perf_counter() - start
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{meters['loss'] / meters['steps']:.3f}",
                                acc=f"{100 * meters['correct'] / max(meters['count'], 1):.1f}",
                                img_s=f"{meters['images'] / max(elapsed, 1e-9):.0f}")
            if c.runtime.log_every and self.step % c.runtime.log_every == 0:
                log.record("step", self.step, epoch=self.epoch + 1, phase=phase.name, method=phase.method,
                           loss=loss, **{k: float(v) for k, v in stats.terms.items()},
                           images_per_s=meters["images"] / max(elapsed, 1e-9))
        meters["seconds"] += time.perf_counter() - start
        if bar is not None:
            bar.close()
        if pool:
            if pending is not None:
                pending.cancel()
            pool.shutdown(wait=True)
        self.partial = meters
        return stopped

    def _end_epoch(self, phase: Phase, log: RunLog) -> None:
        """Validation, ``best.pt`` / ``last.pt`` and the epoch record."""
        c, m = self.config, dict(self.partial)
        if self.rt.distributed:
            # Epoch metrics of the global batches: mean of the ranks' mean losses, summed accuracy counts.
            # (After a mid-epoch resume under DDP the restored partial meters are rank 0's on every rank,
            # so that epoch's logged numbers are approximate; training itself is unaffected.)
            totals = torch.tensor([m["loss"], m["correct"], m["count"]], dtype=torch.float64)
            dist.all_reduce(totals)
            m["loss"], m["correct"], m["count"] = float(totals[0]) / self.rt.world, float(totals[1]), float(totals[2])
        self.epoch += 1
        self.epoch_in_phase += 1
        record: dict[str, Any] = {
            "epoch": self.epoch, "phase": phase.name, "method": phase.method,
            "loss": m["loss"] / max(m["steps"], 1), "train_acc": 100 * m["correct"] / max(m["count"], 1),
            "images_per_s": m["images"] / max(m["seconds"], 1e-9), "seconds": m["seconds"],
            **{k: v / max(m["steps"], 1) for k, v in m.items() if k.startswith("loss_")},
            "lr": self.optimizer.param_groups[0]["lr"],
        }
        if m.get("steps", 0) and self.step_in_epoch < steps_per_epoch(
                len(self.data), c.schedule.batch_size, self.rt.world, c.schedule.drop_last):
            record["partial"] = True   # cut by the budget
        improved = False
        if self.validator is not None and self.epoch_in_phase % c.validation.every == 0:
            start = time.perf_counter()
            acc, ci = self.validator((self.ema if self.ema is not None else self.model).backbone)
            self._last_val_seconds = time.perf_counter() - start
            record.update(val_acc=acc, val_ci95=ci, val_seconds=self._last_val_seconds)
            improved = self.best is None or acc > self.best["val_acc"]
            if improved:
                self.best = {"epoch": self.epoch, "phase": phase.name, "val_acc": acc, "val_ci95": ci}
                self.since_best = 0
            else:
                self.since_best += 1
        self.history.append({"step": self.step, **record})
        self.step_in_epoch, self.partial = 0, {}
        # The record first, so that the checkpoint's log_records covers it.
        log.record("epoch", self.step, **record)
        if improved:
            self.save("best.pt" if phase is self.phases[-1] else "phase1_best.pt")
        self.save("last.pt")
        if self.rt.is_main:
            val = f", val {record['val_acc']:.2f} +- {record['val_ci95']:.2f}%" if "val_acc" in record else ""
            print(f"[{phase.name} {phase.method}] epoch {self.epoch}: loss {record['loss']:.4f}, "
                  f"train acc {record['train_acc']:.1f}%, {record['images_per_s']:.0f} img/s{val}",
                  file=sys.stderr, flush=True)

    def _start_phase(self, index: int, log: RunLog) -> None:
        """Phase hand-off (phase 1 -> phase 2): keep heads + Adam, or the release's reset."""
        self.phase_index, self.epoch_in_phase = index, 0
        self.best, self.since_best = None, 0
        self.phase_started, self.budget_spent = self._elapsed(), False
        if index > 0 and self.config.schedule.phase2_init == "best":
            best = self.out_dir / "phase1_best.pt"
            if not best.is_file():
                raise TrainingError(f"schedule.phase2_init=best but {best} does not exist (phase 1 ran "
                                    f"without validation?); use schedule.phase2_init=last")
            self._load_states(load_payload(best), optimizer=True)
        if index > 0:
            self._reset_ema()   # phase 2's average is of phase-2 weights only
        if index > 0 and self.config.method.release_handoff:
            if self.model.ss_head is not None:
                torch.manual_seed(derive_seed("handoff", self.config.schedule.seed))
                reset_module(self.model.ss_head)
            self.optimizer = build_optimizer(self.config, self.model)
        log.record("phase", self.step, phase=self.phases[index].name, method=self.phases[index].method,
                   release_handoff=self.config.method.release_handoff,
                   init=self.config.schedule.phase2_init if index > 0 else None)

    def _patience_out(self) -> bool:
        """Algorithm 1: patience cuts the final phase only (phase 1 with validation.phase1_patience)."""
        v = self.config.validation
        patience = v.phase1_patience if self.phases[self.phase_index].name == "phase1" else v.patience
        return self.validator is not None and patience is not None and self.since_best >= patience

    def fit(self) -> dict[str, Any]:
        """Train all phases; returns a summary (also written to ``summary.json``)."""
        c = self.config
        resumed = getattr(self, "resumed_from", None)
        if self.rt.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(self.out_dir)
            text = _yaml_dump(c.to_dict())
            atomic_write(self.out_dir / "config.yaml", lambda f: f.write(text), binary=False)
        log = self.log = RunLog(self.out_dir, self.rt.is_main, c.runtime.tensorboard,
                                keep_until_step=self.step if resumed else None, keep_records=self.log_records)
        self._clock = (time.perf_counter(), self.elapsed)
        stopped, error = "finished", None
        try:
            if resumed:
                log.record("resume", self.step, checkpoint=resumed, epoch=self.epoch, elapsed=self.elapsed,
                           flush_denormal=self.rt.flush_denormal)
            else:
                log.record("start", 0, config=c.to_dict(), data=self.data_info, world_size=self.rt.world,
                           device=str(self.rt.device), init_from=getattr(self, "init_from", None),
                           flush_denormal=self.rt.flush_denormal)
                self._start_phase(0, log)
            while self.phase_index < len(self.phases):
                phase = self.phases[self.phase_index]
                while (self.epoch_in_phase < phase.epochs and not self._patience_out()
                       and not self.budget_spent and not self._budget_out()):
                    why = self._run_epoch(phase, log)
                    if why == "max_steps":
                        stopped = "max_steps"
                        break
                    if why == "budget":
                        # The phase's time is up (the same decision on every rank, from the synced clock);
                        # a partial epoch is validated and saved like any other, an empty one is not.
                        self.budget_spent = True
                        if not self.partial.get("steps"):
                            self.save("last.pt")
                            break
                    self._end_epoch(phase, log)
                    if self._patience_out():
                        log.record("early_stop", self.step, phase=phase.name, epoch=self.epoch,
                                   best=self.best, patience=(c.validation.phase1_patience if phase.name == "phase1"
                                                             else c.validation.patience))
                        if self.phase_index == len(self.phases) - 1:
                            stopped = "early_stop"
                if stopped == "max_steps":
                    self.save("last.pt")  # mid-epoch state, resumable exactly
                    break
                if self.budget_spent or (self._budget_out() and self.epoch_in_phase < phase.epochs):
                    log.record("budget", self.step, phase=phase.name, epoch=self.epoch, elapsed=self._elapsed(),
                               budget_minutes=c.schedule.budget_minutes)
                    if self.phase_index == len(self.phases) - 1:
                        stopped = "budget"
                if self.phase_index + 1 == len(self.phases):
                    break
                self._start_phase(self.phase_index + 1, log)
        except TrainingDiverged as err:
            stopped, error = "diverged", str(err)
            log.record("diverged", self.step, message=error)
            raise
        except BaseException as err:
            # A crash or an interrupt must not leave a summary that says the run finished.
            stopped = "interrupted" if isinstance(err, KeyboardInterrupt) else "error"
            error = f"{type(err).__name__}: {err}"
            raise
        finally:
            summary = {"stopped": stopped, "epochs": self.epoch, "steps": self.step, "best": self.best,
                       "out_dir": str(self.out_dir), "budget_minutes": c.schedule.budget_minutes,
                       "elapsed_seconds": round(self._elapsed(), 3), "images_seen": self.images_seen,
                       "world_size": self.rt.world, "history": self.history}
            if error is not None:
                summary["error"] = error
            if self.rt.is_main:
                atomic_write_json(self.out_dir / "summary.json", summary)
            log.close()
        if self.rt.is_main and c.runtime.plots:
            write_plots(self.out_dir)
        return summary


def remove_stale_temporaries(out_dir: Path) -> None:
    """Remove ``.NAME.*.tmp`` files that a killed run's atomic writes left in its folder (rank 0 is the only
    writer of a run folder, and it calls this before writing anything, so none of them is in use)."""
    for path in out_dir.glob(".*.tmp"):
        if path.is_file():
            path.unlink(missing_ok=True)


def write_plots(out_dir: Path) -> None:
    """The run's PNG plots (``s2m2.plots``); a plotting failure never fails a finished run."""
    try:
        from s2m2.plots import plot_run
        plot_run(out_dir)
    except Exception as err:  # noqa: BLE001 - plots are a convenience, the checkpoints are the result
        print(f"s2m2 train: warning: plots not written ({type(err).__name__}: {err})", file=sys.stderr)


def _yaml_dump(obj: Any) -> str:
    import yaml
    return yaml.safe_dump(obj, sort_keys=False)
