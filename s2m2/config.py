"""Training configuration: plain dataclasses loaded from YAML, with ``--set section.key=value`` overrides.

A config file is a YAML mapping with the sections below. It may name ONE parent with
``defaults: PATH`` (relative to the file); the parent is loaded first (it may itself have a parent)
and the child's keys are merged over it, section by section. That is the whole mechanism::

    # configs/mini_imagenet/s2m2_r.yaml
    defaults: _base.yaml
    method: {name: s2m2_r}
    schedule: {phase1_epochs: 400, epochs: 100}

Unknown sections or keys are rejected with an error that names them and the file they came from.
Overrides are ``section.key=value`` strings whose value is parsed as YAML (``--set optim.lr=3e-4``,
``--set data.train_splits=[base,val]``, ``--set model.classifier_scale=null``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

METHODS = ("baseline", "baseline++", "rotation", "exemplar", "manifold_mixup", "s2m2_r", "s2m2_e")
# The self-supervised phase-1 method that each two-phase method builds on.
PHASE1_METHOD = {"s2m2_r": "rotation", "s2m2_e": "exemplar"}


class ConfigError(ValueError):
    """A config file or override is malformed: unknown key, wrong type, impossible value."""


@dataclass
class DataConfig:
    root: str = ""                       # prepared dataset folder (`s2m2 prepare ... --out DIR`)
    train_splits: list[str] = field(default_factory=lambda: ["base"])  # several: labels offset + concatenated
    val_split: str | None = "val"        # None disables validation (and early stopping)
    crop_size: int = 80                  # training crop and evaluation crop (80 mini/tiered/CUB, 32 CIFAR-FS)
    eval_resize: int = 92                # evaluation: resize to this, centre-crop eval_crop (92/80, 36/32)
    eval_crop: int | None = None         # evaluation centre crop; None = crop_size (the release). Larger than
                                         # crop_size tests at a higher resolution than training (docs/training.md,
                                         # "Test resolution"); validation uses it too
    augment: bool = True                 # paper: ON (the release defaults to OFF, spec §6/§10)
    crop_scale: tuple[float, float] = (0.08, 1.0)       # RandomResizedCrop area fraction
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)    # RandomResizedCrop aspect ratio
    jitter: float = 0.4                  # brightness/contrast/saturation factors uniform in [1-j, 1+j]
    flip: bool = True

    @property
    def test_crop(self) -> int:
        """The evaluation (and validation) centre crop: ``eval_crop``, else the training ``crop_size``."""
        return self.crop_size if self.eval_crop is None else self.eval_crop


@dataclass
class ModelConfig:
    backbone: str = "wrn28_10"
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    classifier: str | None = None        # "cosine" | "linear"; None: linear for baseline, cosine otherwise
    classifier_width: int | None = None  # number of outputs; None = number of training classes
    classifier_scale: float | None = None  # cosine scale; None = release rule (2 if width <= 200 else 10)


@dataclass
class MethodConfig:
    name: str = "s2m2_r"
    mixup_alpha: float = 2.0             # lam ~ Beta(alpha, alpha), spec §4
    ss_weight: float = 0.5               # weight of the self-supervised loss (spec §5: 0.5*CE_cls + 0.5*CE_ss)
    exemplar_views: int = 4              # random augmentations per image for the exemplar loss (Eq. 14)
    # Which of the backbone's mixup points a batch may be mixed at (0 = the input, i = after block i); null:
    # all of them, uniformly (the release: input and after each WRN block, spec §4).
    mixup_points: list[int] | None = None
    # s2m2_r/_e phase 2: the share of the batch whose 4 rotations (or views) give the self-supervised loss.
    # The release's B/4 (spec §5) makes that pass cost as much as the mixup pass; budget recipes lower it.
    ss_fraction: float = 0.25
    # Phase-1 -> phase-2 hand-off. Ours keeps the self-supervised head and the Adam state; the release
    # re-initialises the rotation head and starts a fresh Adam (spec §5, probably a bug).
    release_handoff: bool = False


@dataclass
class OptimConfig:
    name: str = "adam"                   # "adam" | "sgd"
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    momentum: float = 0.9                # sgd only
    # An exponential moving average of the weights (s2m2/ema.py), per optimizer step with a warm-up; the
    # average is what is validated and evaluated. None: off (the release has none).
    ema_decay: float | None = None


@dataclass
class ScheduleConfig:
    epochs: int = 100                    # epochs of `method` (phase 2 for s2m2_r / s2m2_e)
    phase1_epochs: int = 0               # s2m2_r/_e only: run this many rotation/exemplar epochs first
    init_from: str | None = None         # s2m2_r/_e only: start phase 2 from this phase-1 checkpoint
    batch_size: int = 64                 # GLOBAL batch (per-rank batch x world size under DDP)
    seed: int = 0
    max_steps: int | None = None         # stop after this many optimizer steps in total (smoke runs)
    drop_last: bool = False
    # Wall-clock budget for the whole run (all phases, validation included), in minutes; None: epochs only.
    # The run stops cleanly at the budget with a resumable last.pt (``stopped: budget``); ``epochs`` /
    # ``phase1_epochs`` stay upper bounds. Budgeted runs are how methods are compared on equal compute.
    budget_minutes: float | None = None
    phase1_fraction: float = 0.5         # s2m2_r/_e with a budget: the share of it spent in phase 1
    # Learning rate: "constant" (the paper), or "cosine" from optim.lr to 0 over each phase -- over its
    # share of the budget (elapsed time) when budget_minutes is set, else over its epochs.
    lr_schedule: str = "constant"
    # Which phase-1 weights phase 2 starts from: "last" (the release / Algorithm 1) or "best" (phase1_best.pt).
    phase2_init: str = "last"


@dataclass
class ValidationConfig:
    enabled: bool = True
    ways: int = 5
    shots: int = 1
    queries: int = 15
    episodes: int = 100                  # the release's 100 fixed val episodes
    seed: int = 0                        # episodes are sampled ONCE from this seed
    head: str = "logreg"                 # s2m2.fewshot.heads.evaluate_episodes head
    patience: int | None = 20            # epochs without improvement before stopping; None: never stop
    # Algorithm 1 early-stops only the Manifold Mixup phase: the self-supervised phase 1 of s2m2_r/_e
    # trains all its epochs unless this is set (off by default; the authors report 200 vs 400 rotation
    # epochs mattering).
    phase1_patience: int | None = None
    # Validation data from another prepared dataset (e.g. CUB val for the all-100 cross-domain variant,
    # as CloserLook does). Needed when data.val_split is also a training split.
    root: str | None = None
    every: int = 1                       # validate every N epochs
    batch_size: int = 256                # feature-extraction batch


@dataclass
class RuntimeConfig:
    out_dir: str = "checkpoints/default"
    device: str = "auto"                 # "auto" (cuda if available) | "cpu" | "cuda" | "cuda:N"
    precision: str = "auto"              # "auto" (bf16 on CUDA, fp32 on CPU) | "fp32" | "bf16" | "fp16"
    channels_last: bool | None = None    # None: on for CUDA, off on CPU
    compile: bool = False                # torch.compile the backbone
    sync_batchnorm: bool = False         # DDP on CUDA only
    log_every: int = 50                  # JSONL/TensorBoard step record every N steps
    progress: bool = True                # tqdm bars
    tensorboard: bool = True
    plots: bool = True                   # PNG plots of the run (s2m2.plots) when it ends
    prefetch: bool = True                # read the next uint8 batch in a background thread
    flush_denormal: bool = True          # CPU floats below 1.2e-38 become 0 (s2m2.trainer.set_flush_denormal)


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        # tuples -> lists so the dict round-trips through YAML/JSON unchanged
        return yaml.safe_load(yaml.safe_dump(_lists(out)))

    def classifier_name(self) -> str:
        if self.model.classifier is not None:
            return self.model.classifier
        return "linear" if self.method.name == "baseline" else "cosine"


_SECTION_TYPES = {"data": DataConfig, "model": ModelConfig, "method": MethodConfig, "optim": OptimConfig,
                  "schedule": ScheduleConfig, "validation": ValidationConfig, "runtime": RuntimeConfig}


def _lists(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _lists(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_lists(v) for v in obj]
    return obj


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from err
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    return raw


def _load_chain(path: Path, seen: tuple[Path, ...] = ()) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """Merged sections of ``path`` and its ``defaults:`` ancestors, and which file set each key."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: `defaults:` cycle through {[str(p) for p in seen]}")
    raw = _read_yaml(path)
    merged: dict[str, dict[str, Any]] = {}
    origin: dict[str, str] = {}
    parent = raw.pop("defaults", None)
    if parent is not None:
        if not isinstance(parent, str):
            raise ConfigError(f"{path}: `defaults:` must be one file path, got {parent!r}")
        merged, origin = _load_chain(path.parent / parent, seen + (path,))
    unknown = sorted(set(raw) - set(_SECTION_TYPES))
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {unknown}; known sections: {sorted(_SECTION_TYPES)}")
    for section, values in raw.items():
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: section {section!r} must be a mapping, got {values!r}")
        for key, value in values.items():
            merged.setdefault(section, {})[key] = value
            origin[f"{section}.{key}"] = str(path)
    return merged, origin


def parse_override(text: str) -> tuple[str, str, Any]:
    """``"section.key=value"`` -> (section, key, YAML-parsed value)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected section.key=value")
    dotted, value_text = text.split("=", 1)
    parts = dotted.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"override {text!r}: the key must be section.key (e.g. optim.lr), got {dotted!r}")
    try:
        value = yaml.safe_load(value_text) if value_text.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({err})") from err
    return parts[0], parts[1], value


def _coerce(value: Any, default: Any, where: str, optional: bool = True) -> Any:
    """Light type check against the dataclass default (ints accepted for floats, lists for tuples).

    ``optional``: the field's type admits None (``X | None``); otherwise null is refused.
    """
    if value is None:
        if not optional:
            raise ConfigError(f"{where}: must be set, got null")
        return value
    if default is None:
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if isinstance(value, bool) and isinstance(default, (int, float)):
        raise ConfigError(f"{where}: expected a number, got {value!r}")  # YAML true is not 1
    if isinstance(default, float) and isinstance(value, (int, float)):
        return float(value)
    if isinstance(default, int) and not isinstance(value, int):
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if isinstance(default, tuple):
        if not isinstance(value, (list, tuple)) or len(value) != len(default):
            raise ConfigError(f"{where}: expected a list of {len(default)} values, got {value!r}")
        return tuple(float(v) if isinstance(d, float) else v for v, d in zip(value, default))
    if isinstance(default, list) and not isinstance(value, list):
        raise ConfigError(f"{where}: expected a list, got {value!r}")
    if isinstance(default, dict) and not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping, got {value!r}")
    if isinstance(default, str) and not isinstance(value, str):
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


def build_config(sections: dict[str, dict[str, Any]], origin: dict[str, str] | None = None) -> TrainConfig:
    """Dataclasses from a ``{section: {key: value}}`` mapping; unknown keys are errors naming them."""
    origin = origin or {}
    config = TrainConfig()
    for section, values in sections.items():
        if section not in _SECTION_TYPES:
            raise ConfigError(f"unknown section {section!r}; known sections: {sorted(_SECTION_TYPES)}")
        target = getattr(config, section)
        known = {f.name for f in fields(target)}
        unknown = sorted(set(values) - known)
        if unknown:
            files = sorted({origin.get(f"{section}.{k}", "--set") for k in unknown})
            raise ConfigError(f"unknown key(s) {[f'{section}.{k}' for k in unknown]} (from {', '.join(files)}); "
                              f"known keys of {section!r}: {sorted(known)}")
        optional = {f.name: "None" in str(f.type) for f in fields(target)}
        for key, value in values.items():
            where = f"{section}.{key} (from {origin.get(f'{section}.{key}', '--set')})"
            setattr(target, key, _coerce(value, getattr(target, key), where, optional[key]))
    validate(config)
    return config


def load_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    """Load a YAML config (following ``defaults:``) and apply ``section.key=value`` overrides."""
    sections: dict[str, dict[str, Any]] = {}
    origin: dict[str, str] = {}
    if path is not None:
        sections, origin = _load_chain(Path(path))
    for text in overrides:
        section, key, value = parse_override(text)
        sections.setdefault(section, {})[key] = value
        origin[f"{section}.{key}"] = f"--set {text}"
    return build_config(sections, origin)


def config_from_dict(d: dict[str, Any]) -> TrainConfig:
    """Rebuild a config from ``TrainConfig.to_dict()`` (e.g. stored in a checkpoint)."""
    return build_config({k: dict(v) for k, v in d.items()})


def validate(config: TrainConfig) -> None:
    """Cross-field checks that a dataclass type cannot express."""
    m, s, v = config.method, config.schedule, config.validation
    if m.name not in METHODS:
        raise ConfigError(f"method.name {m.name!r} is not one of {list(METHODS)}")
    if config.model.classifier not in (None, "cosine", "linear"):
        raise ConfigError(f"model.classifier must be cosine, linear or null, got {config.model.classifier!r}")
    if config.optim.name not in ("adam", "sgd"):
        raise ConfigError(f"optim.name must be adam or sgd, got {config.optim.name!r}")
    if config.runtime.precision not in ("auto", "fp32", "bf16", "fp16"):
        raise ConfigError(f"runtime.precision must be auto, fp32, bf16 or fp16, got {config.runtime.precision!r}")
    if (s.phase1_epochs or s.init_from) and m.name not in PHASE1_METHOD:
        raise ConfigError(f"schedule.phase1_epochs / schedule.init_from apply to s2m2_r and s2m2_e only, "
                          f"not to method {m.name!r}")
    if s.phase1_epochs and s.init_from:
        raise ConfigError("set either schedule.phase1_epochs (run phase 1 here) or schedule.init_from "
                          "(start from a phase-1 checkpoint), not both")
    if s.epochs < 0 or s.phase1_epochs < 0:
        raise ConfigError("schedule.epochs and schedule.phase1_epochs must be >= 0")
    if s.batch_size < 1:
        raise ConfigError(f"schedule.batch_size must be >= 1, got {s.batch_size}")
    if not config.data.train_splits:
        raise ConfigError("data.train_splits is empty")
    if m.exemplar_views < 2:
        raise ConfigError("method.exemplar_views must be >= 2 (the loss needs positives)")
    if v.every < 1:
        raise ConfigError("validation.every must be >= 1")
    _validate_values(config)


def _positive(name: str, value: float | int | None, allow_zero: bool = False) -> None:
    if value is not None and (value < 0 or (value == 0 and not allow_zero)):
        raise ConfigError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")


def _validate_values(config: TrainConfig) -> None:
    """Values that would otherwise fail only at run time (after data loading or a whole epoch)."""
    from s2m2.fewshot.heads import HEADS
    from s2m2.models import list_backbones

    d, mo, o, s, v = config.data, config.model, config.optim, config.schedule, config.validation
    if mo.backbone not in list_backbones():
        raise ConfigError(f"model.backbone {mo.backbone!r} is not one of {list_backbones()}")
    if v.head not in HEADS:
        raise ConfigError(f"validation.head {v.head!r} is not one of {list(HEADS)}")
    _positive("optim.lr", o.lr)
    _positive("optim.weight_decay", o.weight_decay, allow_zero=True)
    if o.ema_decay is not None and (not isinstance(o.ema_decay, (int, float)) or isinstance(o.ema_decay, bool)
                                    or not 0 < o.ema_decay < 1):
        raise ConfigError(f"optim.ema_decay={o.ema_decay} must be in (0, 1) (e.g. 0.999), or null for no EMA")
    _positive("method.mixup_alpha", config.method.mixup_alpha)
    points = config.method.mixup_points
    if points is not None and (not isinstance(points, list) or not points or len(set(points)) != len(points)
                               or not all(isinstance(p, int) and not isinstance(p, bool) and p >= 0 for p in points)):
        raise ConfigError(f"method.mixup_points={points!r} must be a non-empty list of distinct mixup-point "
                          f"indices >= 0 (0 = the input), or null for all of the backbone's points")
    _positive("method.ss_weight", config.method.ss_weight, allow_zero=True)
    if not 0 < config.method.ss_fraction <= 1:
        raise ConfigError(f"method.ss_fraction={config.method.ss_fraction} must be in (0, 1]: the share of the "
                          "batch that gets the self-supervised loss in s2m2_r / s2m2_e phase 2")
    _positive("data.crop_size", d.crop_size)
    _positive("data.eval_resize", d.eval_resize)
    _positive("data.eval_crop", d.eval_crop)
    if d.eval_resize < d.test_crop:
        raise ConfigError(f"data.eval_resize={d.eval_resize} is smaller than the evaluation crop {d.test_crop} "
                          f"(data.eval_crop, else data.crop_size)")
    _positive("model.classifier_width", mo.classifier_width)
    _positive("model.classifier_scale", mo.classifier_scale)
    _positive("schedule.max_steps", s.max_steps)
    _positive("schedule.budget_minutes", s.budget_minutes)
    if not 0 < s.phase1_fraction < 1:
        raise ConfigError(f"schedule.phase1_fraction must be in (0, 1), got {s.phase1_fraction}")
    if s.lr_schedule not in ("constant", "cosine"):
        raise ConfigError(f"schedule.lr_schedule must be constant or cosine, got {s.lr_schedule!r}")
    if s.phase2_init not in ("last", "best"):
        raise ConfigError(f"schedule.phase2_init must be last or best, got {s.phase2_init!r}")
    for name in ("ways", "shots", "queries", "episodes", "batch_size"):
        _positive(f"validation.{name}", getattr(v, name))
    if v.ways < 2:
        raise ConfigError(f"validation.ways must be >= 2 (1-way accuracy is always 100%), got {v.ways}")
    _positive("validation.patience", v.patience)
    _positive("validation.phase1_patience", v.phase1_patience)
    if d.val_split is not None and v.enabled and v.root in (None, "", d.root) and d.val_split in d.train_splits:
        raise ConfigError(f"data.val_split={d.val_split!r} is also in data.train_splits={d.train_splits}: "
                          f"validation would pick the best epoch on training classes; set "
                          f"validation.root=PREPARED_DIR to validate on another dataset's {d.val_split!r} "
                          f"split (e.g. CUB val for the all-100 variant) or validation.enabled=false")


def config_diff(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Dotted keys whose values differ between two ``to_dict()`` configs."""
    keys = []
    for section in sorted(set(a) | set(b)):
        sa, sb = a.get(section, {}), b.get(section, {})
        for key in sorted(set(sa) | set(sb)):
            if sa.get(key, dataclasses.MISSING) != sb.get(key, dataclasses.MISSING):
                keys.append(f"{section}.{key}")
    return keys
