"""Training-run plots: ``plot_run(out_dir)`` writes PNGs of a run's curves into its folder.

    from s2m2.plots import plot_run
    plot_run("checkpoints/cifar_fs/s2m2_r")   # -> [.../curves_training.png, .../curves_validation.png]

* ``curves_training.png``: every loss term (``loss`` and each ``loss_<term>``) and the train accuracy per
  epoch;
* ``curves_validation.png`` (only when the run validated): validation accuracy with its 95% CI band.

Both mark the phase boundary (S2M2_R / S2M2_E: phase 1 -> phase 2) and the best validation epoch. The
epoch records come from ``log.jsonl`` (written while the run trains) and, when the log is missing, from
``summary.json``'s history. Rendering uses matplotlib's Agg canvas directly (no pyplot, no display, no
global figure state), and every PNG is written atomically so a reader never sees half a file.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from s2m2.utils import atomic_write

TRAINING_PNG = "curves_training.png"
VALIDATION_PNG = "curves_validation.png"


@dataclass
class RunCurves:
    """The per-epoch numbers of one run, in epoch order."""

    epochs: list[dict[str, Any]]                    # epoch records (one per epoch, last one wins on repeats)
    phase_starts: list[tuple[int, str]] = field(default_factory=list)  # (first epoch of the phase, name)
    best: dict[str, Any] | None = None              # {"epoch", "phase", "val_acc", "val_ci95"} or None
    title: str = ""

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """(epochs, values) of one numeric key, skipping epochs without it (e.g. unvalidated ones)."""
        xs, ys = [], []
        for rec in self.epochs:
            value = rec.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                xs.append(int(rec["epoch"]))
                ys.append(float(value))
        return xs, ys

    def loss_keys(self) -> list[str]:
        """``loss`` first, then every ``loss_<term>`` that appears in any epoch (first-seen order)."""
        keys: list[str] = []
        for rec in self.epochs:
            for key in rec:
                if (key == "loss" or key.startswith("loss_")) and key not in keys:
                    keys.append(key)
        return sorted(keys, key=lambda k: (k != "loss", keys.index(k)))


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    records = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a crash mid-write: the rest of the log is still usable
    return records


def load_curves(out_dir: str | Path) -> RunCurves:
    """Epoch records, phase starts and best epoch of the run in ``out_dir``."""
    out_dir = Path(out_dir)
    log_path, summary_path = out_dir / "log.jsonl", out_dir / "summary.json"
    summary: dict[str, Any] = {}
    if summary_path.exists():
        try:
            summary = json.loads(summary_path.read_text())
        except json.JSONDecodeError:
            summary = {}
    records = _read_jsonl(log_path) if log_path.exists() else []
    epoch_records = [r for r in records if r.get("type") == "epoch"] or list(summary.get("history") or [])
    by_epoch: dict[int, dict[str, Any]] = {}
    for rec in epoch_records:
        if "epoch" in rec:
            by_epoch[int(rec["epoch"])] = rec  # a resumed run may repeat an epoch: keep the last record
    epochs = [by_epoch[e] for e in sorted(by_epoch)]

    # Phase boundaries from the epoch records themselves: robust to a log without "phase" records.
    phase_starts: list[tuple[int, str]] = []
    for rec in epochs:
        name = str(rec.get("phase", "main"))
        if not phase_starts or phase_starts[-1][1] != name:
            phase_starts.append((int(rec["epoch"]), name))

    best = summary.get("best")
    if not best:
        # Not finished yet (plot_run may be called before summary.json exists): best of the last phase.
        last_phase = phase_starts[-1][1] if phase_starts else None
        candidates = [r for r in epochs if r.get("phase", "main") == last_phase and "val_acc" in r]
        if candidates:
            top = max(candidates, key=lambda r: r["val_acc"])
            best = {"epoch": top["epoch"], "phase": top.get("phase"), "val_acc": top["val_acc"],
                    "val_ci95": top.get("val_ci95")}
    methods = []
    for rec in epochs:
        if rec.get("method") and rec["method"] not in methods:
            methods.append(rec["method"])
    title = f"{out_dir.name}: {' -> '.join(methods) or 'run'}"
    if summary.get("stopped"):
        title += f" (stopped: {summary['stopped']})"
    return RunCurves(epochs=epochs, phase_starts=phase_starts, best=best, title=title)


def _mark_phases_and_best(ax, curves: RunCurves) -> None:
    """Dashed line where each later phase starts; dotted line at the best epoch."""
    for epoch, name in curves.phase_starts[1:]:
        ax.axvline(epoch - 0.5, color="grey", linestyle="--", linewidth=1)
        ax.annotate(f" {name}", xy=(epoch - 0.5, 1), xycoords=("data", "axes fraction"), va="top",
                    fontsize=8, color="grey")
    if curves.best and curves.best.get("epoch") is not None:
        ax.axvline(curves.best["epoch"], color="tab:green", linestyle=":", linewidth=1.2,
                   label=f"best epoch {curves.best['epoch']}")


def _save(fig, path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)  # attaches a headless canvas; never opens a window
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    atomic_write(path, lambda f: f.write(buffer.getvalue()))
    return path


def plot_training(curves: RunCurves, path: Path) -> Path:
    """Loss terms (left) and train accuracy (right) per epoch."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4), layout="constrained")
    ax_loss, ax_acc = fig.subplots(1, 2)
    for key in curves.loss_keys():
        xs, ys = curves.series(key)
        if xs:
            ax_loss.plot(xs, ys, marker="o", markersize=3, label=key, linewidth=2 if key == "loss" else 1)
    ax_loss.set(xlabel="epoch", ylabel="loss (epoch mean)", title="loss terms")
    xs, ys = curves.series("train_acc")
    ax_acc.plot(xs, ys, marker="o", markersize=3, color="tab:blue", label="train accuracy")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="train accuracy")
    for ax in (ax_loss, ax_acc):
        _mark_phases_and_best(ax, curves)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(curves.title, fontsize=10)
    return _save(fig, path)


def plot_validation(curves: RunCurves, path: Path) -> Path:
    """Validation accuracy per validated epoch with its 95% CI band."""
    from matplotlib.figure import Figure

    xs, acc = curves.series("val_acc")
    ci_by_epoch = dict(zip(*curves.series("val_ci95")))
    ci = [ci_by_epoch.get(x, 0.0) for x in xs]
    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.subplots()
    ax.fill_between(xs, [a - c for a, c in zip(acc, ci)], [a + c for a, c in zip(acc, ci)], alpha=0.25,
                    color="tab:orange", label="95% CI")
    ax.plot(xs, acc, marker="o", markersize=3, color="tab:orange", label="validation accuracy")
    _mark_phases_and_best(ax, curves)
    if curves.best and curves.best.get("val_acc") is not None:
        ax.plot([curves.best["epoch"]], [curves.best["val_acc"]], marker="*", markersize=12, color="tab:green")
    ax.set(xlabel="epoch", ylabel="accuracy (%)", title="validation accuracy (fixed episodes)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.suptitle(curves.title, fontsize=10)
    return _save(fig, path)


def plot_run(out_dir: str | Path) -> list[Path]:
    """Write the run's PNG plots into ``out_dir``; returns the files written (none for a run with no epoch)."""
    out_dir = Path(out_dir)
    curves = load_curves(out_dir)
    if not curves.epochs:
        return []  # stopped before the first epoch ended (e.g. a max_steps smoke run): nothing to draw
    written = [plot_training(curves, out_dir / TRAINING_PNG)]
    if curves.series("val_acc")[0]:
        written.append(plot_validation(curves, out_dir / VALIDATION_PNG))
    return written


def main(argv: list[str] | None = None) -> int:
    """``python -m s2m2.plots RUN_DIR ...``: (re)draw the plots of finished or running runs."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m s2m2.plots", description=plot_run.__doc__)
    parser.add_argument("run_dirs", nargs="+", type=Path)
    args = parser.parse_args(argv)
    for run_dir in args.run_dirs:
        for path in plot_run(run_dir):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
