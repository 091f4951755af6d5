"""``s2m2 report``: Markdown tables and plots from result records.

    s2m2 report RECORD_OR_DIR [...] --out docs/results.md [--plots-dir docs/results]
                [--archive docs/results/records] [--title Results]

Inputs are JSON records: ``s2m2 evaluate --out`` (format ``s2m2-evaluation``), ``s2m2 cross-domain --out``
(``s2m2-cross-domain``) and reference numbers measured elsewhere (``s2m2-reference``: the paper, a public
baseline; each carries its provenance). A folder stands for the records in it (``*.json`` whose ``format``
is one of those; other JSON such as ``summary.json`` is ignored).

For each measured record the training run is found from the features' checkpoint path (its folder's
``config.yaml`` and ``summary.json``: method, backbone, budget, how it stopped, images seen). A
``provenance`` entry in the record (added by ``scripts/ablation.py``) adds the exact commands, the hardware
and the section title; without it the evaluate command is rebuilt from the record and the hardware is
reported as not recorded.

Output: one section per dataset (cross-domain separately), each with a table (rows: method x head; columns:
ways x shots, mean +- 95% CI), the protocol, the training budget, links to the record and the run's
provenance, two plots (accuracy by method with CI bars; accuracy by shots), and a generated statement of
what differs from the reference rows. Where a reference names the method of each row (the paper's ablation:
``"method": "s2m2_r"``), a generated check says whether its order of methods holds in the measured rows, per
recipe (variant, backbone, budget), head and column. ``--archive`` keeps compact copies of the measured records (without
per-episode accuracies, with the run information embedded) so the report can be rebuilt from the repository.
Each run's training curves are copied beside the plots, named by method label and the evaluated checkpoint's
fingerprint, so a rebuilt report finds them after the run folder is gone; curves a run drew that are found
nowhere are named in the section and in a warning on stderr.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from s2m2.utils import atomic_write, atomic_write_json
from s2m2.cli import CommandParser

MEASURED_FORMATS = ("s2m2-evaluation", "s2m2-cross-domain")
REFERENCE_FORMAT = "s2m2-reference"
FORMATS = (*MEASURED_FORMATS, REFERENCE_FORMAT)

DATASET_TITLES = {"cifar-fs": "CIFAR-FS", "fc100": "FC100", "mini-imagenet": "mini-ImageNet",
                  "tiered-imagenet": "tiered-ImageNet", "cub": "CUB", "omniglot": "Omniglot"}
# The paper's ablation order first, so tables read like its Table 3.
METHOD_ORDER = ("baseline", "baseline++", "manifold_mixup", "rotation", "exemplar", "s2m2_r", "s2m2_e")
HEAD_ORDER = ("logreg", "cosine", "ncm")


class ReportError(Exception):
    """A record cannot be used; the message names the file."""


# ------------------------------------------------------------------------------------------------
# Hardware and provenance (also used by scripts/ablation.py)
# ------------------------------------------------------------------------------------------------
def _first_cpu_fields() -> dict[str, str]:
    """The fields of the first processor in /proc/cpuinfo ({} where there is none, e.g. off Linux)."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if not line.strip() and fields:
                break
            key, sep, value = line.partition(":")
            if sep:
                fields.setdefault(key.strip().lower(), value.strip())
    except OSError:
        pass
    return fields


def cpu_vector_isa(flags: str) -> str:
    """The widest x86 vector extension in a /proc/cpuinfo flags line: it picks oneDNN's kernels, so two CPUs
    sold under one name (three 'AMD EPYC' VMs so far, up to 5.5x apart in a Conv-4 step) give different
    numbers."""
    present = set(flags.split())
    for flag, name in (("avx512f", "AVX-512"), ("avx2", "AVX2"), ("avx", "AVX")):
        if flag in present:
            return name
    return "none" if present else ""


def hardware_info() -> dict[str, Any]:
    """What a wall-clock number depends on: CPU model, family and vector extension, cores usable by this
    process, torch, GPU."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        torch_version = version("torch")
    except PackageNotFoundError:
        torch_version = "not installed"
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cpu = _first_cpu_fields()
    info = {"cpu": cpu.get("model name") or platform.processor() or "unknown", "cores": usable,
            "cpu_count": os.cpu_count(), "torch": torch_version,
            "python": platform.python_version(), "platform": platform.platform()}
    if "cpu family" in cpu:
        info["cpu_family"] = cpu["cpu family"]
    if isa := cpu_vector_isa(cpu.get("flags", "")):
        info["cpu_isa"] = isa
    if "torch" in sys.modules:  # only when already loaded: importing torch costs seconds
        torch = sys.modules["torch"]
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    return info


def cpu_label(hw: dict[str, Any]) -> str:
    """'AMD EPYC (family 26, AVX-512)'; the bare model name for records made before family and ISA were
    recorded (2026-12-02)."""
    family = f"family {hw['cpu_family']}" if hw.get("cpu_family") else ""
    detail = ", ".join(filter(None, (family, hw.get("cpu_isa"))))
    return hw.get("cpu", "?") + (f" ({detail})" if detail else "")


def hardware_label(hw: dict[str, Any] | None) -> str:
    if not hw:
        return "not recorded"
    text = f"{cpu_label(hw)}, {hw.get('cores', '?')} cores, torch {hw.get('torch', '?')}"
    return text + (f", GPU {hw['gpu']}" if hw.get("gpu") else "")


def add_provenance(record_path: str | Path, **provenance: Any) -> None:
    """Add (or update) the ``provenance`` entry of a result record, atomically.

    Used by scripts that run ``s2m2 evaluate`` / ``cross-domain`` and know what the record itself cannot:
    the commands that made the checkpoint, the hardware, the section the row belongs to.
    """
    path = Path(record_path)
    record = load_record(path)
    record["provenance"] = {**record.get("provenance", {}), **provenance}
    atomic_write_json(path, record, indent=None)


# ------------------------------------------------------------------------------------------------
# Records
# ------------------------------------------------------------------------------------------------
def load_record(path: str | Path) -> dict[str, Any]:
    """Read and check one record; every problem is a :class:`ReportError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ReportError(f"{path}: record not found")
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ReportError(f"{path}: not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ReportError(f"{path}: cannot be read ({err})") from None
    if not isinstance(record, dict) or record.get("format") not in FORMATS:
        found = record.get("format") if isinstance(record, dict) else type(record).__name__
        raise ReportError(f"{path}: not a result record (format {found!r}; expected one of {', '.join(FORMATS)})")
    required = ("rows", "label", "dataset") if record["format"] == REFERENCE_FORMAT else ("results", "features", "head")
    missing = [key for key in required if key not in record]
    if missing:
        raise ReportError(f"{path}: {record['format']} record without {', '.join(map(repr, missing))}")
    return record


def find_records(inputs: list[str | Path]) -> list[Path]:
    """Files as given; folders expanded to their ``*.json`` files that are records (sorted)."""
    found: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            for path in sorted(item.glob("*.json")):
                try:
                    fmt = json.loads(path.read_text()).get("format")
                except (json.JSONDecodeError, AttributeError):
                    raise ReportError(f"{path}: not valid JSON (found in {item})") from None
                if fmt in FORMATS:
                    found.append(path)
        elif item.exists():
            found.append(item)
        else:
            raise ReportError(f"{item}: record not found")
    return found


@dataclass
class RunInfo:
    """What the training run folder says: method, backbone, budget, how and when it stopped."""

    run_dir: str
    method: str | None = None
    backbone: str | None = None
    budget_minutes: float | None = None
    stopped: str | None = None
    epochs: int | None = None
    steps: int | None = None
    images_seen: int | None = None
    elapsed_seconds: float | None = None
    best: dict[str, Any] | None = None
    config_path: str | None = None
    plotted: bool | None = None   # the folder had curves_training.png (None: a copy archived before this was kept)


def backbone_label(name: str | None, kwargs: dict[str, Any] | None = None) -> str | None:
    if not name:
        return None
    extra = {k: v for k, v in (kwargs or {}).items() if k != "dropout"}  # dropout is no shape
    return name + (" (" + ", ".join(f"{k}={v}" for k, v in extra.items()) + ")" if extra else "")


def read_run(run_dir: str | Path) -> RunInfo | None:
    """The run folder's config.yaml + summary.json, or None when neither is there."""
    import yaml

    run_dir = Path(run_dir)
    config_path, summary_path = run_dir / "config.yaml", run_dir / "summary.json"
    if not config_path.is_file() and not summary_path.is_file():
        return None
    info = RunInfo(run_dir=str(run_dir), plotted=(run_dir / "curves_training.png").is_file())
    if config_path.is_file():
        try:
            config = yaml.safe_load(config_path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ReportError(f"{config_path}: not valid YAML ({err})") from None
        model = config.get("model") or {}
        info.method = (config.get("method") or {}).get("name")
        info.backbone = backbone_label(model.get("backbone"), model.get("backbone_kwargs"))
        info.budget_minutes = (config.get("schedule") or {}).get("budget_minutes")
        info.config_path = str(config_path)
    if summary_path.is_file():
        try:
            summary = json.loads(summary_path.read_text())
        except json.JSONDecodeError as err:
            raise ReportError(f"{summary_path}: not valid JSON ({err.msg})") from None
        info.stopped, info.epochs, info.steps = summary.get("stopped"), summary.get("epochs"), summary.get("steps")
        info.images_seen, info.elapsed_seconds = summary.get("images_seen"), summary.get("elapsed_seconds")
        info.best = summary.get("best")
        if summary.get("budget_minutes") is not None:
            info.budget_minutes = summary["budget_minutes"]
    return info


def run_of_record(record: dict[str, Any]) -> RunInfo | None:
    """The run behind a measured record: embedded (archived copy) or read from the checkpoint's folder."""
    if record.get("run"):
        return RunInfo(**record["run"])
    provenance = record.get("provenance") or {}
    run_dir = provenance.get("run_dir")
    if not run_dir:
        checkpoint = ((record.get("features") or {}).get("checkpoint") or {}).get("path")
        run_dir = str(Path(checkpoint).parent) if checkpoint else None
    return read_run(run_dir) if run_dir else None


def evaluate_command(record: dict[str, Any]) -> str:
    """The `s2m2 evaluate` command that reproduces a record's protocol (for records without provenance)."""
    res = [r for r in record["results"]]
    shots = " ".join(str(r["shots"]) for r in res)
    first = res[0] if res else {}
    head = record["head"]
    args = [f"--features {shlex.quote(str(record['features'].get('path', '?')))}",
            f"--ways {first.get('ways', '?')}", f"--shots {shots}", f"--queries {first.get('queries', '?')}",
            f"--episodes {first.get('episodes', '?')}", f"--seed {first.get('seed', '?')}", f"--head {head['name']}"]
    args += [f"--{k.replace('_', '-')} {v}" for k, v in (head.get("options") or {}).items()
             if head["name"] == "logreg"]
    sub = "cross-domain" if record["format"] == "s2m2-cross-domain" else "evaluate"
    return f"s2m2 {sub} " + " ".join(args)


# ------------------------------------------------------------------------------------------------
# Rows and sections
# ------------------------------------------------------------------------------------------------
@dataclass
class Row:
    """One (method, head, ways, shots) result."""

    section: str
    label: str            # method name, or the reference's label
    backbone: str
    head: str
    ways: int
    shots: int
    mean: float | None
    ci95: float | None
    episodes: int | None
    queries: Any
    seed: Any
    skipped: str | None
    reference: bool
    record_path: str      # where the report links (archived copy when archived)
    group: str            # provenance group: one per run (measured) or per reference record
    details: dict[str, Any] = field(default_factory=dict)
    method: str | None = None   # the training method (a reference row's "method" key), for the order check
    recipe: str | None = None   # measured rows: variant, backbone and budget; rows of one recipe are compared


def dataset_title(name: str | None) -> str:
    return DATASET_TITLES.get(name or "", name or "unknown dataset")


def section_of(record: dict[str, Any]) -> str:
    """Section title: stated by the provenance or the reference, else from the dataset of the features."""
    provenance = record.get("provenance") or {}
    if provenance.get("section"):
        return provenance["section"]
    if record["format"] == REFERENCE_FORMAT:
        return record.get("section") or f"{dataset_title(record['dataset'])} ({record.get('split', 'novel')} classes)"
    dataset = (record["features"].get("dataset") or {})
    if record["format"] == "s2m2-cross-domain":
        images = (record["features"].get("shape") or ["?"])[0]
        return f"Cross-domain: {dataset_title(dataset.get('name'))} ({images} images)"
    return f"{dataset_title(dataset.get('name'))} ({dataset.get('split', '?')} classes)"


def record_views(record: dict[str, Any]) -> str:
    """The test views (``s2m2 features --views``) of a record's features; "centre" for records made before
    views were a choice."""
    return ((record.get("features") or {}).get("transform") or {}).get("views", "centre")


# (resize, crop) test transforms the head label leaves unnamed: the release's (mini/tiered-ImageNet and CUB
# 92 -> 80, CIFAR-FS 36 -> 32) and Omniglot's stored 28 px. Any other is named, e.g. data.eval_crop's 40 px.
USUAL_TEST_SIZES = {(92, 80), (36, 32), (28, 28)}


def eval_size_label(record: dict[str, Any]) -> str | None:
    """The record's test resize and crop in words when they are not a usual one (:data:`USUAL_TEST_SIZES`)."""
    transform = (record.get("features") or {}).get("transform") or {}
    resize, crop = transform.get("resize"), transform.get("crop")
    if resize is None or crop is None or (resize, crop) in USUAL_TEST_SIZES:
        return None
    return f"whole image at {crop} px" if resize == crop else f"resize {resize}, crop {crop}"


def head_label(record: dict[str, Any]) -> str:
    """The head, with the test size, views and feature transforms its features had (``s2m2 features
    --resize/--crop/--views``, ``s2m2 evaluate --power/--center/--l2``): a record evaluated at another size, on
    ten-crop or on transformed features must not read like one on the release's centre crop and raw features."""
    ft = record.get("feature_transform") or {}
    views = record_views(record)
    size = eval_size_label(record)
    parts = ([] if size is None else [size]) + \
        ([] if views == "centre" else [f"{views.replace('_', '-')} views"]) + \
        ([f"power {ft['power']:g}"] if ft.get("power") is not None else []) + \
        (["centred"] if ft.get("center") else []) + (["L2"] if ft.get("l2") else [])
    name = record["head"]["name"]
    return f"{name} ({', '.join(parts)})" if parts else name


def rows_of(record: dict[str, Any], path: Path, link: str) -> list[Row]:
    """The rows a record contributes."""
    section = section_of(record)
    if record["format"] == REFERENCE_FORMAT:
        group = f"ref:{path}"
        return [Row(section=section, label=r.get("label", record["label"]), backbone=r.get("backbone", "?"),
                    head=r.get("head", "?"), ways=int(r["ways"]), shots=int(r["shots"]), mean=r.get("mean"),
                    ci95=r.get("ci95"), episodes=r.get("episodes"), queries=r.get("queries"), seed=r.get("seed"),
                    skipped=None, reference=True, record_path=link, group=group,
                    details={"record": record}, method=r.get("method"))
                for r in record["rows"]]
    run = run_of_record(record)
    provenance = record.get("provenance") or {}
    method = provenance.get("method") or (run.method if run else None)
    label = method or "unknown method"
    if provenance.get("variant"):
        label = f"{label} ({provenance['variant']})"
    ckpt = record["features"].get("checkpoint") or {}
    backbone = (run.backbone if run else None) or backbone_label((ckpt.get("backbone") or {}).get("name")) or "?"
    budget = f"{run.budget_minutes:g} min" if run and run.budget_minutes is not None else "no budget"
    recipe = "; ".join(filter(None, (provenance.get("variant"), backbone, budget)))
    # One provenance group per trained checkpoint: a run folder trained again (a new recipe) is another group.
    group = f"run:{run.run_dir}:{ckpt.get('fingerprint')}" if run else f"record:{path}"
    rows = []
    for r in record["results"]:
        rows.append(Row(section=section, label=label, backbone=backbone, head=head_label(record),
                        ways=int(r["ways"]), shots=int(r["shots"]), mean=r.get("mean"), ci95=r.get("ci95"),
                        episodes=r.get("episodes"), queries=r.get("queries"), seed=r.get("seed"),
                        skipped=r.get("skipped"), reference=False, record_path=link, group=group,
                        details={"record": record, "run": run, "path": str(path)}, method=method, recipe=recipe))
    return rows


def format_acc(mean: float | None, ci95: float | None) -> str:
    """``74.81 ± 0.19`` (two decimals, as the paper); a reference without a CI says so."""
    if mean is None:
        return "–"
    return f"{mean:.2f} ± {ci95:.2f}" if ci95 is not None else f"{mean:.2f} (no CI reported)"


def _order_key(row: Row) -> tuple:
    method = row.label.split(" (")[0]  # a recipe variant, "s2m2_r (crop 0.35)", sorts with its method
    method_rank = METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER)
    head_rank = HEAD_ORDER.index(row.head) if row.head in HEAD_ORDER else len(HEAD_ORDER)
    return (row.reference, method_rank, row.label, row.backbone, head_rank, row.head)


def slug(text: str) -> str:
    """A file-name and anchor-safe form of ``text``. "+" is spelled out: dropped, "baseline++" would share
    "baseline"'s plot files, and the second copied would overwrite the first."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower().replace("+", " plus ")).strip("-") or "section"


# File systems allow 255 bytes per name; atomic_write's temporary adds a leading dot and ".xxxxxxxx.tmp".
_NAME_BYTES = 240


def file_name(stem: str, suffix: str) -> str:
    """``stem + suffix``, or, when that is longer than ``_NAME_BYTES``, the stem cut short and tagged with a
    hash of the whole stem, so that two long names sharing a prefix still get different files. (A cross-domain
    section named after its backbone and a run named after its backbone label passed 255 bytes.)"""
    name = stem + suffix
    if len(name.encode()) <= _NAME_BYTES:
        return name
    tag = hashlib.sha256(stem.encode()).hexdigest()[:12]
    keep = _NAME_BYTES - len(suffix.encode()) - len(tag) - 1
    return f"{stem.encode()[:keep].decode(errors='ignore')}-{tag}{suffix}"


def _unique(values, missing: str = "?") -> str:
    """Distinct values joined by '/', in order (e.g. the episodes of a row's cells); ``missing`` if none."""
    seen: list[str] = []
    for v in values:
        if v is not None and str(v) not in seen:
            seen.append(str(v))
    return "/".join(seen) if seen else missing


def training_label(run: RunInfo | None) -> str:
    """How the backbone was trained, from its run folder: budget, stop reason, epochs, images, time."""
    if run is None:
        return "run folder not found"
    parts = []
    if run.budget_minutes is not None:
        parts.append(f"{run.budget_minutes:g} min budget")
    if run.stopped:
        parts.append(f"stopped: {run.stopped}")
    if run.epochs is not None:
        parts.append(f"{run.epochs} epochs")
    if run.images_seen is not None:
        parts.append(f"{run.images_seen / 1e6:.2f} M images")
    if run.elapsed_seconds is not None:
        parts.append(f"{run.elapsed_seconds / 60:.1f} min")
    return ", ".join(parts) or "not recorded"


# ------------------------------------------------------------------------------------------------
# Plots
# ------------------------------------------------------------------------------------------------
def _save_png(fig, path: Path) -> Path:
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    atomic_write(path, lambda f: f.write(buffer.getvalue()))
    return path


def _columns(rows: list[Row]) -> list[tuple[int, int]]:
    return sorted({(r.ways, r.shots) for r in rows})


def series_names(rows: list[Row]) -> dict[int, str]:
    """{id(row): plot label}: the row's label, plus its backbone where one label has rows of several
    backbones (e.g. one method trained with two recipes), plus the CPU where one label and backbone still
    has several runs (the same recipe run on two machines), plus the run's date where the CPUs do not tell
    them apart (a run number only if the dates do not either), so the plots never merge two runs into one bar
    and two runs never share a curves file. A date, unlike a number, does not change when a run is added."""
    backbones: dict[str, set[str]] = {}
    for r in rows:
        backbones.setdefault(r.label, set()).add(r.backbone)
    base = {id(r): r.label if len(backbones[r.label]) == 1 else f"{r.label}\n{r.backbone}" for r in rows}
    cpus: dict[str, dict[str, str]] = {}   # base name -> {run group: its CPU}
    dates: dict[str, dict[str, str]] = {}  # base name -> {run group: its earliest record's date}
    for r in sorted(rows, key=_order_key):
        provenance = (r.details.get("record") or {}).get("provenance") or {}
        hardware = provenance.get("hardware") or {}
        cpus.setdefault(base[id(r)], {}).setdefault(r.group, cpu_label(hardware) if hardware.get("cpu") else "")
        group_dates = dates.setdefault(base[id(r)], {})
        if date := _minute(provenance.get("date")):
            group_dates[r.group] = min(date, group_dates.get(r.group, date))
    names = {}
    for r in rows:
        b, cpu = base[id(r)], cpus[base[id(r)]][r.group]
        groups = list(cpus[b])
        if len(groups) == 1:
            names[id(r)] = b
        elif _tells_apart(cpus[b], groups):
            names[id(r)] = f"{b}\n{cpu}"
        elif _tells_apart(dates[b], groups):
            names[id(r)] = f"{b}\n{cpu + ', ' if cpu else ''}{dates[b][r.group]}"
        else:
            names[id(r)] = f"{b}\nrun {groups.index(r.group) + 1}"
    return names


def _tells_apart(value_of: dict[str, str], groups: list[str]) -> bool:
    """Every group has a value and no two share one."""
    values = [value_of.get(g, "") for g in groups]
    return all(values) and len(set(values)) == len(values)


def _minute(date: Any) -> str:
    """An ISO date-time from a record ('2026-12-01T12:48:58+00:00') -> '2026-12-01 12:48 UTC'; '' if none.
    Records write UTC (``datetime.now(timezone.utc)``)."""
    if not isinstance(date, str) or len(date) < 16:
        return ""
    return f"{date[:10]} {date[11:16]} UTC"


def plot_by_method(rows: list[Row], title: str, path: Path) -> Path:
    """One line per method (or reference), one marker per head with its 95% CI as a horizontal bar; one panel
    per (ways, shots), the panels sharing the method axis. Horizontal so that the long labels of a report
    with dozens of runs stay readable (vertical bars squeezed 30 of them into unreadable slivers), and
    markers rather than bars from 0 so that differences of a point show."""
    from matplotlib.figure import Figure

    columns = _columns(rows)
    names = series_names(rows)
    labels = list(dict.fromkeys(names[id(r)] for r in sorted(rows, key=_order_key)))
    heads = list(dict.fromkeys(r.head for r in sorted(rows, key=_order_key)))
    offset = 0.7 / max(len(heads), 1)
    label_lines = sum(label.count("\n") + 1 for label in labels)  # series names may hold a backbone and a CPU
    fig = Figure(figsize=(6.0 + 3.2 * len(columns), 1.6 + 0.18 * len(labels) + 0.14 * label_lines),
                 layout="constrained")
    axes = fig.subplots(1, len(columns), squeeze=False, sharey=True)[0]
    for ax, (ways, shots) in zip(axes, columns):
        for i in range(0, len(labels), 2):  # banded rows: the eye follows a label to its markers
            ax.axhspan(i - 0.5, i + 0.5, color="0.94", zorder=0)
        for h, head in enumerate(heads):
            xs, ys, errs = [], [], []
            for i, label in enumerate(labels):
                match = [r for r in rows if (names[id(r)], r.head, r.ways, r.shots) == (label, head, ways, shots)
                         and r.mean is not None]
                if match:
                    ys.append(i + (h - (len(heads) - 1) / 2) * offset)
                    xs.append(match[0].mean)
                    errs.append(match[0].ci95 or 0.0)
            if xs:
                ax.errorbar(xs, ys, xerr=errs, fmt="o", markersize=3.5, capsize=2, linewidth=1, label=head)
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
        ax.set_ylim(len(labels) - 0.5, -0.5)  # the first method on top
        ax.set(xlabel="accuracy (%)", title=f"{ways}-way {shots}-shot (95% CI bars)")
        ax.grid(axis="x", alpha=0.3)
    axes[-1].legend(fontsize=7, title="head", title_fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.suptitle(f"{title}: accuracy by method", fontsize=10)
    return _save_png(fig, path)


def plot_by_shots(rows: list[Row], title: str, path: Path) -> Path:
    """Accuracy against shots, one line per (method, head); one panel per number of ways. The legend sits
    beside the panels and the figure grows with it, so a report with dozens of runs keeps every entry
    (a fixed 7 x 3.6-inch figure clipped it)."""
    from matplotlib.figure import Figure

    ways_list = sorted({r.ways for r in rows})
    names = series_names(rows)
    panels: list[dict[tuple[str, str, bool], list[Row]]] = []
    for ways in ways_list:
        series: dict[tuple[str, str, bool], list[Row]] = {}
        for r in sorted(rows, key=_order_key):
            if r.ways == ways and r.mean is not None:
                series.setdefault((names[id(r)].replace("\n", ", "), r.head, r.reference), []).append(r)
        panels.append(series)
    entries = max((len(series) for series in panels), default=0)
    longest = max((len(f"{label} ({head})") for series in panels for label, head, _ in series), default=0)
    fig = Figure(figsize=(5.5 + 0.055 * longest, max(3.6, 1.0 + 0.14 * entries) * len(ways_list)),
                 layout="constrained")
    axes = fig.subplots(len(ways_list), 1, squeeze=False)[:, 0]
    for ax, ways, series in zip(axes, ways_list, panels):
        for (label, head, reference), items in series.items():
            items.sort(key=lambda r: r.shots)
            ax.errorbar([r.shots for r in items], [r.mean for r in items], yerr=[r.ci95 or 0 for r in items],
                        marker="o", markersize=4, capsize=3, linestyle="--" if reference else "-",
                        label=f"{label} ({head})")
        shots = sorted({r.shots for r in rows if r.ways == ways})
        ax.set_xticks(shots)
        ax.set(xlabel="shots", ylabel="accuracy (%)", title=f"{ways}-way (dashed: references)")
        ax.grid(alpha=0.3)
        if series:
            ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.suptitle(f"{title}: accuracy by shots", fontsize=10)
    return _save_png(fig, path)


# ------------------------------------------------------------------------------------------------
# Markdown
# ------------------------------------------------------------------------------------------------
def _rel(target: str | Path, base: Path) -> str:
    return Path(os.path.relpath(Path(target).absolute(), base.absolute())).as_posix()


def section_table(rows: list[Row], groups: dict[str, str], base: Path) -> list[str]:
    columns = _columns(rows)
    header = ["method", "backbone", "head", *[f"{w}-way {s}-shot" for w, s in columns], "episodes",
              "protocol", "training", "provenance"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    keys = list(dict.fromkeys((r.label, r.backbone, r.head, r.group) for r in sorted(rows, key=_order_key)))
    for key in keys:
        cells = [r for r in rows if (r.label, r.backbone, r.head, r.group) == key]
        first = cells[0]
        accs = []
        for ways, shots in columns:
            match = [r for r in cells if (r.ways, r.shots) == (ways, shots)]
            if not match:
                accs.append("–")
            elif match[0].skipped:
                accs.append("skipped (data too small)")
            else:
                accs.append(format_acc(match[0].mean, match[0].ci95))
        episodes = _unique((f"{r.episodes:,}" if isinstance(r.episodes, int) else r.episodes
                            for r in cells if not r.skipped), "not stated" if first.reference else "?")
        protocol = (f"{_unique((r.queries for r in cells), 'n/a')} queries, "
                    f"seed {_unique((r.seed for r in cells), 'n/a')}")
        if first.reference:
            training = first.details["record"].get("setup", {}).get("training", "see record")
            label = f"{first.label} (reference)"
        else:
            training = training_label(first.details["run"])
            label = first.label
        links = f"[record]({_rel(first.record_path, base)}), [{groups[first.group]}](#{slug(groups[first.group])})"
        lines.append("| " + " | ".join([label, first.backbone, first.head, *accs, episodes, protocol, training,
                                         links]) + " |")
    return lines


def differences(rows: list[Row]) -> list[str]:
    """Generated statement of what differs between the measured rows and each reference."""
    measured = [r for r in rows if not r.reference]
    references = {r.group: r for r in rows if r.reference}
    if not references:
        return []
    if not measured:
        return ["No measured record in this section yet: only the reference rows are shown."]
    runs = [r.details["run"] for r in measured]
    records = [r.details["record"] for r in measured]
    backbones = _unique(r.backbone for r in measured)
    budgets = _unique(f"{run.budget_minutes:g}-minute wall-clock budget" if run and run.budget_minutes is not None
                      else "no wall-clock budget" for run in runs)
    epochs = _unique(run.epochs for run in runs if run)
    hardware = _unique(hardware_label((rec.get("provenance") or {}).get("hardware")) for rec in records)
    evaluation = (f"{_unique(r.episodes for r in measured if not r.skipped)} episodes, "
                  f"{_unique(r.queries for r in measured)} queries per class, heads {_unique(r.head for r in measured)}")
    lines = [f"What differs (generated from the records): here — backbone {backbones}; training: {budgets}, "
             f"{epochs} epochs; hardware: {hardware}; evaluation: {evaluation}."]
    for ref in references.values():
        setup = ref.details["record"].get("setup") or {}
        lines.append(f"- {ref.details['record']['label']}: backbone {setup.get('backbone', '?')}; training: "
                     f"{setup.get('training', '?')}; hardware: {setup.get('hardware', '?')}; evaluation: "
                     f"{setup.get('evaluation', '?')}.")
    return lines


def _differ(a: Row, b: Row) -> bool:
    """Whether two independent means differ beyond the 95% CI of their difference, sqrt(ci_a^2 + ci_b^2).
    Unpaired, hence conservative: the rows of one ablation share their episodes (same seed)."""
    return abs(a.mean - b.mean) > ((a.ci95 or 0.0) ** 2 + (b.ci95 or 0.0) ** 2) ** 0.5


def order_check(rows: list[Row]) -> list[str]:
    """Does the reference's order of methods (the paper's ablation) hold in the measured rows? Generated per
    recipe, head and (ways, shots): the measured order, then each pair of methods adjacent in the reference's
    order (among those measured) marked holds / tie (within the CI of the difference) / reversed."""
    reference: dict[tuple[int, int], dict[str, Row]] = {}
    reference_label = ""
    for r in rows:
        if r.reference and r.method and r.mean is not None:
            reference.setdefault((r.ways, r.shots), {})[r.method] = r
            reference_label = r.details["record"]["label"]
    measured: dict[tuple[str, str, int, int], dict[str, Row]] = {}
    for r in sorted(rows, key=lambda r: str(r.details.get("record", {}).get("created"))):
        if not r.reference and r.method and r.mean is not None and not r.skipped:
            measured.setdefault((r.recipe or "", r.head, r.ways, r.shots), {})[r.method] = r  # newest wins
    lines = []
    for (recipe, head, ways, shots), by_method in measured.items():
        paper = reference.get((ways, shots), {})
        paper_order = [m for m in sorted(paper, key=lambda m: -paper[m].mean) if m in by_method]
        if len(by_method) < 2 or len(paper_order) < 2:
            continue
        ranked = sorted(by_method.values(), key=lambda r: -r.mean)
        chain = f"{ranked[0].method} {ranked[0].mean:.2f}"
        for above, below in zip(ranked, ranked[1:]):
            chain += f" {'>' if _differ(above, below) else '≈'} {below.method} {below.mean:.2f}"
        verdicts = {(hi, lo): "tie" if not _differ(by_method[hi], by_method[lo])
                    else "holds" if by_method[hi].mean > by_method[lo].mean else "reversed"
                    for hi, lo in zip(paper_order, paper_order[1:])}
        pairs = "; ".join(f"{hi} > {lo}: {verdict}" for (hi, lo), verdict in verdicts.items())
        held = list(verdicts.values()).count("holds")
        lines.append(f"| {recipe} | {head} | {ways}-way {shots}-shot | {chain} | {held} of {len(verdicts)} hold: {pairs} |")
    if not lines:
        return []
    orders = {" > ".join(sorted(p, key=lambda m: -p[m].mean)) for p in reference.values() if len(p) > 1}
    return ["### Does the reference's order of methods hold here? (generated)", "",
            f"{reference_label}: {' | '.join(sorted(orders))}. Below, per recipe, head and column: the measured order "
            "(`≈`: the two means differ by less than the 95% CI of their difference, sqrt(ci1² + ci2²), unpaired "
            "and so conservative), and each pair of methods adjacent in the reference's order (among those "
            "measured) marked holds, tie or reversed.", "",
            "| recipe | head | column | measured order | reference's pairs |", "|---|---|---|---|---|", *lines]


def provenance_lines(group: str, name: str, rows: list[Row], base: Path) -> list[str]:
    """The run's (or reference's) provenance: commands, config, budget, hardware, date."""
    first = rows[0]
    record = first.details["record"]
    title = record["label"] if first.reference else first.label
    lines = [f"<a id=\"{slug(name)}\"></a>**{name}** — {title}"]
    if first.reference:
        prov = record.get("provenance") or {}
        lines += [f"- {k.replace('_', ' ')}: {v}" for k, v in prov.items()]
        lines += [f"- {k}: {v}" for k, v in (record.get("setup") or {}).items()]
        lines.append(f"- record: [{Path(first.record_path).name}]({_rel(first.record_path, base)})")
        return lines
    run: RunInfo | None = first.details["run"]
    provenance = {}
    for r in rows:  # records of the same run may each carry provenance; the commands are merged
        provenance = {**(r.details["record"].get("provenance") or {}), **provenance}
    commands = provenance.get("commands") or {}
    for step in ("prepare", "train"):
        entries = commands.get(step) or []
        for entry in [entries] if isinstance(entries, (str, dict)) else entries:  # one command, or a list
            when = f" ({entry.get('date')}, exit {entry.get('exit')})" if isinstance(entry, dict) else ""
            cmd = entry.get("command") if isinstance(entry, dict) else entry
            lines.append(f"- {step}: `{cmd}`{when}")
    if commands.get("features"):
        lines.append(f"- features: `{commands['features']}`")
    evaluated = list(dict.fromkeys((r.details["record"].get("provenance") or {}).get("commands", {}).get("evaluate")
                                   or evaluate_command(r.details["record"]) for r in rows))
    lines += [f"- evaluate: `{cmd}`" for cmd in evaluated]
    if run:
        if run.config_path:
            lines.append(f"- config: `{run.config_path}`")
        lines.append(f"- run folder: `{run.run_dir}`; training: {training_label(run)}")
        if run.best:
            lines.append(f"- best validation epoch: {run.best.get('epoch')} ({run.best.get('phase')}, "
                         f"{format_acc(run.best.get('val_acc'), run.best.get('val_ci95'))})")
    if provenance.get("checkpoint_used"):
        lines.append(f"- checkpoint evaluated: {provenance['checkpoint_used']}")
    else:
        ckpt = record["features"].get("checkpoint") or {}
        lines.append(f"- checkpoint evaluated: `{ckpt.get('path', '?')}` (epoch {ckpt.get('epoch', '?')})")
    hw = provenance.get("hardware")
    lines.append(f"- hardware: {hardware_label(hw)}" + ("" if hw else f" (evaluation: {record.get('device', '?')}, "
                                                                 f"torch {record.get('torch', '?')})"))
    dates = _unique(r.details["record"].get("created") for r in rows)
    lines.append(f"- date: {provenance.get('date') or dates} (records created {dates})")
    return lines


@dataclass
class Report:
    markdown: str
    plots: list[Path]
    rows: list[Row]
    warnings: list[str] = field(default_factory=list)   # printed to stderr by ``s2m2 report``


def build_report(inputs: list[str | Path], out: Path, plots_dir: Path, archive: Path | None = None,
                 title: str = "Results", command: str | None = None) -> Report:
    """Read the records, write plots (and archived copies), return the Markdown (not yet written)."""
    paths = find_records(inputs)
    if not paths:
        raise ReportError(f"no result records in {', '.join(map(str, inputs))}")
    base = out.parent
    rows: list[Row] = []
    seen: set[tuple[str, str]] = set()
    for path in paths:
        record = load_record(path)
        identity = record_identity(record, path)
        if identity in seen:
            continue  # the same record given twice (e.g. the original and its archived copy)
        seen.add(identity)
        link = path
        if archive is not None and record["format"] in MEASURED_FORMATS:
            link = archive_record(record, path, archive)
        rows += rows_of(record, path, str(link))
    sections = list(dict.fromkeys(r.section for r in rows))
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    md = [f"# {title}", "",
          "<!-- GENERATED FILE: do not edit by hand; change the records or s2m2/report.py and re-run. -->",
          f"Generated by `{command or 's2m2 report'}` on {stamp} from {len(seen)} result records. "
          "Nothing here is typed by hand: every number, command, budget and hardware line comes from a record.",
          "Accuracy: mean ± 95% CI (1.96·σ/√episodes) in %, 5-way unless stated."]
    plots: list[Path] = []
    warnings: list[str] = []
    group_names: dict[str, str] = {}
    for section in sections:
        section_rows = [r for r in rows if r.section == section]
        for r in sorted(section_rows, key=_order_key):
            if r.group not in group_names:
                prefix = "reference" if r.reference else "run"
                group_names[r.group] = f"{prefix} {sum(n.startswith(prefix) for n in group_names.values()) + 1}"
        md += ["", f"## {section}", ""]
        md += section_table(section_rows, group_names, base)
        plottable = [r for r in section_rows if r.mean is not None]
        if plottable:
            by_method = plot_by_method(plottable, section, plots_dir / file_name(slug(section), "_by_method.png"))
            by_shots = plot_by_shots(plottable, section, plots_dir / file_name(slug(section), "_by_shots.png"))
            plots += [by_method, by_shots]
            md += ["", f"![{section}: accuracy by method]({_rel(by_method, base)})",
                   f"![{section}: accuracy by shots]({_rel(by_shots, base)})"]
        curves, missing = training_curves(section_rows, section, plots_dir)
        warnings += [f"{section}: no training curves for {name}: its run folder is gone or holds another "
                     "training, and the plots folder has no copy of them" for name in missing]
        if curves:
            md += ["", "Training curves (loss terms, train and validation accuracy; phase boundary and best epoch "
                   "marked), drawn by `s2m2.plots` in each run's folder:", ""]
            md += [f"![{label}: {png.stem}]({_rel(png, base)})" for label, png in curves]
            plots += [png for _, png in curves]
        if missing:
            md += ["", f"Training curves not found (run folder gone or retrained, no copy kept): {', '.join(missing)}."]
        order = order_check(section_rows)
        if order:
            md += [""] + order
        diff = differences(section_rows)
        if diff:
            md += [""] + diff
        md += ["", "### Provenance", ""]
        for group in dict.fromkeys(r.group for r in sorted(section_rows, key=_order_key)):
            md += provenance_lines(group, group_names[group], [r for r in section_rows if r.group == group], base)
            md.append("")
    return Report(markdown="\n".join(md).rstrip() + "\n", plots=plots, rows=rows, warnings=warnings)


def training_curves(rows: list[Row], section: str, plots_dir: Path) -> tuple[list[tuple[str, Path]], list[str]]:
    """The runs' ``curves_*.png`` (from ``s2m2.plots``), copied beside the report's plots: ([(label, png)],
    [the series names of runs that drew curves (``RunInfo.plotted``) whose curves are not found]).

    A run folder that is gone (a report rebuilt from archived records), or that now holds another training
    (its checkpoint is not the one the record evaluated: the folder was trained again), keeps the copies made
    earlier. A copy is named by the method label and the evaluated checkpoint's fingerprint, not by the series
    name: the series name grows a backbone, CPU or date when another run of the label joins the report, and
    a copy named by it would then be lost for a run whose folder is gone.
    """
    from s2m2.checkpoint import file_fingerprint

    out, missing, done = [], [], set()
    names = series_names(rows)
    for row in sorted(rows, key=_order_key):
        run = row.details.get("run") if not row.reference else None
        if run is None or row.group in done:
            continue
        done.add(row.group)
        checkpoint = (row.details["record"].get("features") or {}).get("checkpoint") or {}
        fingerprint = checkpoint.get("fingerprint") or hashlib.sha256(row.group.encode()).hexdigest()[:16]
        used = Path(run.run_dir) / Path(checkpoint.get("path") or "best.pt").name
        same_training = used.is_file() and file_fingerprint(used) == checkpoint.get("fingerprint")
        for name in ("curves_training.png", "curves_validation.png"):
            copy = plots_dir / file_name(f"{slug(section)}_{slug(row.label)}_{fingerprint}", f"_{name}")
            source = Path(run.run_dir) / name
            if same_training and source.is_file():
                data = source.read_bytes()
                atomic_write(copy, lambda f: f.write(data))
            if copy.is_file():
                out.append((names[id(row)].replace("\n", ", "), copy))
            elif not same_training and run.plotted and name == "curves_training.png":
                missing.append(names[id(row)].replace("\n", ", "))
    return out, missing


def archive_record(record: dict[str, Any], path: Path, archive: Path) -> Path:
    """A compact copy (no per-episode accuracies; the run folder's information embedded) in ``archive``."""
    if archive.resolve() == path.resolve().parent:
        return path  # already the archived copy
    compact = json.loads(json.dumps(record))
    for result in compact.get("results", []):
        result.pop("accuracies", None)
        for checkpoint in (result.get("checkpoints") or {}).values():
            checkpoint.pop("accuracies", None)
    run = run_of_record(record)
    compact["run"] = asdict(run) if run else None
    # A copy of an archived copy (moving an archive) keeps its name and its original path: prefixing the
    # section again would grow the name on every move (past the file system's 255 bytes for cross-domain).
    already_archived = "archived_from" in record
    compact["archived_from"] = record["archived_from"] if already_archived else str(path.resolve())
    name = path.stem if already_archived else f"{slug(section_of(record))}-{path.stem}"
    target = archive / file_name(name, ".json")
    existing = read_json_or_none(target)
    if existing is not None and record_identity(existing, target) != record_identity(compact, path):
        # Another record already archived under this name (the same file path re-run with a new recipe, or two
        # ablation folders with the same record names): keep both, this one named by its creation time.
        stamp = re.sub(r"[^0-9TZ]", "", str(record.get("created", "")))
        target = archive / file_name(f"{name}-{stamp}", ".json")
    atomic_write_json(target, compact)
    return target


def record_identity(record: dict[str, Any], path: Path) -> tuple[str, str]:
    """Which evaluation a record (or an archived copy of it) is: its original path and creation time. The path
    alone is not enough: rerunning an ablation writes a new record to the same path."""
    return record.get("archived_from") or str(Path(path).resolve()), str(record.get("created"))


def read_json_or_none(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def build_parser() -> argparse.ArgumentParser:
    p = CommandParser(prog="s2m2 report", description=__doc__.split("\n\n")[0])
    p.add_argument("inputs", nargs="+", help="result records (JSON) or folders of them")
    p.add_argument("--out", type=Path, default=Path("results.md"), help="Markdown file to write")
    p.add_argument("--plots-dir", type=Path, help="where the PNGs go (default: beside --out, in <stem>/)")
    p.add_argument("--archive", type=Path, help="also keep compact copies of the measured records here "
                   "(the table links to them), so the report can be rebuilt from the repository")
    p.add_argument("--title", default="Results")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    plots_dir = args.plots_dir or args.out.parent / args.out.stem
    command = "s2m2 report " + " ".join(shlex.quote(a) for a in argv)
    try:
        report = build_report(args.inputs, args.out, plots_dir, archive=args.archive, title=args.title,
                              command=command)
    except ReportError as err:
        print(f"s2m2 report: error: {err}", file=sys.stderr)
        return 2
    atomic_write(args.out, lambda f: f.write(report.markdown), binary=False)
    for warning in report.warnings:
        print(f"s2m2 report: warning: {warning}", file=sys.stderr)
    print(f"wrote {args.out} ({len(report.rows)} rows) and {len(report.plots)} plots in {plots_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
