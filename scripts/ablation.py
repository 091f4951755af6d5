"""The S2M2 ablation at equal compute: every method trained with the same wall-clock budget, then evaluated.

    scripts/ablation.py --dataset cifar-fs --budget-minutes 30 [--out checkpoints/ablation/cifar-fs]
                        [--methods baseline rotation ...] [--episodes 10000] [--data data/cifar-fs]
                        [--source ../shared/data/cifar100/cifar-100-python.tar.gz] [--set key=value ...]
                        [--variant LABEL] [--eval-views centre|flip|ten_crop] [--eval-size RESIZE CROP]
                        [--eval-checkpoint best|last]

Steps, each the `s2m2` command a user would run (a subprocess of ``python -m s2m2.cli``):

1. ``s2m2 prepare``   the dataset, if ``--data`` holds no prepared folder yet;
2. ``s2m2 train``     each method from ``configs/<dataset>/budget/<method>.yaml`` with
                      ``schedule.budget_minutes`` set. Resumable: a method whose ``summary.json`` says it
                      ended (finished, early_stop, budget, max_steps, diverged) is skipped; an interrupted
                      one continues with ``--resume auto``; an ended run whose saved config differs from
                      the recipe now (the recipe was edited since) is refused, not reported as the new one;
3. ``s2m2 features``  of the novel split (``best.pt`` if the run validated, else ``last.pt``; recorded).
                      ``--eval-checkpoint last`` takes ``last.pt`` (the state at the end of the budget) of a
                      run that validated, into ``<method>-<head>-last.json``, its variant label ending
                      in "last.pt";
4. ``s2m2 evaluate``  5-way 1- and 5-shot, ``--episodes`` episodes, 15 queries, seed 0, heads logreg, cosine
                      and ncm -> ``OUT/records/<method>-<head>.json`` (skipped when a record of the same
                      checkpoint and protocol exists). ``--eval-views flip|ten_crop`` averages each image's
                      features over its test views and writes ``<method>-<head>-<views>.json`` beside them;
                      ``--eval-size 40 40`` resizes and centre-crops the test images to other sizes than the
                      checkpoint config's (``<method>-<head>-resize40-crop40.json``). The cross-domain step
                      below uses the same test protocol;
5. ``s2m2 cross-domain`` the best backbone (novel 5-way 5-shot, logreg) on the CUB sample in
                      ``../shared/data/cub_sample`` (3 images per class: 1-shot with 2 queries; 5-shot is
                      recorded as skipped);
6. ``s2m2 report``    ``OUT/report.md`` and its plots, with the reference records of the dataset
                      (``docs/results/reference/``) beside the measured rows.

Every record gets a ``provenance`` entry: the commands (with dates and exit codes) that made the checkpoint,
the features and the record, the checkpoint used, and the hardware (CPU model, cores, torch).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from s2m2.data.transforms import VIEWS  # noqa: E402
from s2m2.report import (add_provenance, cpu_label, dataset_title, hardware_info, read_json_or_none,  # noqa: E402
                         record_views)

METHODS = ("baseline", "baseline++", "rotation", "exemplar", "manifold_mixup", "s2m2_r", "s2m2_e")
HEADS = ("logreg", "cosine", "ncm")
# summary.json "stopped" values of a run that ended; anything else (or no summary) is resumed.
ENDED = ("finished", "early_stop", "budget", "max_steps", "diverged")
DEFAULT_SOURCES = {"cifar-fs": "../shared/data/cifar100/cifar-100-python.tar.gz",
                   "fc100": "../shared/data/cifar100/cifar-100-python.tar.gz",
                   "omniglot": "../shared/data/omniglot"}


@dataclass(frozen=True)
class EvalProtocol:
    """How test images become features (``s2m2 features --views/--resize/--crop``): the views averaged per
    image and, when given, a (resize, crop) other than the one in the checkpoint's config; and which of a
    run's checkpoints it evaluates ("best": best.pt where the run validated, else last.pt; "last": last.pt)."""
    views: str = "centre"
    size: tuple[int, int] | None = None
    checkpoint: str = "best"

    @property
    def suffix(self) -> str:
        """File-name suffix of its records and features: "" for the best checkpoint's own single centre crop."""
        size = "" if self.size is None else f"-resize{self.size[0]}-crop{self.size[1]}"
        return (size + ("" if self.views == "centre" else f"-{self.views}")
                + ("-last" if self.checkpoint == "last" else ""))

    def extraction_args(self) -> list[str]:
        size = [] if self.size is None else ["--resize", str(self.size[0]), "--crop", str(self.size[1])]
        return ["--views", self.views, *size]

    def made(self, record: dict) -> bool:
        """Whether ``record``'s features were made with this protocol."""
        transform = (record.get("features") or {}).get("transform") or {}
        if record_views(record) != self.views:
            return False
        if self.size is None:
            return transform.get("default", True)  # records from before the flag used the checkpoint's
        return (transform.get("resize"), transform.get("crop")) == self.size


class AblationError(Exception):
    """A step failed in a way that makes the rest pointless (bad config, data, missing files)."""


@dataclass
class Step:
    """One `s2m2` command that ran: what, when, how it ended."""

    command: str
    date: str
    exit: int
    seconds: float


def short(path: Path) -> Path:
    """``path`` relative to the repository root when inside it, else absolute."""
    path = Path(path).absolute()
    return path.relative_to(REPO) if path.is_relative_to(REPO) else path


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def s2m2(argv: list[str], log: Path | None = None) -> Step:
    """Run ``python -m s2m2.cli ARGV`` (output streamed), append the step to ``log`` (JSON lines)."""
    command = "s2m2 " + " ".join(shlex.quote(a) for a in argv)
    print(f"$ {command}", flush=True)
    start, date = time.perf_counter(), now()
    code = subprocess.call([sys.executable, "-m", "s2m2.cli", *argv], cwd=REPO)
    step = Step(command=command, date=date, exit=code, seconds=round(time.perf_counter() - start, 1))
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a") as f:
            f.write(json.dumps(step.__dict__) + "\n")
    return step


def read_steps(log: Path) -> list[dict]:
    if not log.is_file():
        return []
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


def prepare(dataset: str, source: Path, data: Path, log: Path) -> None:
    """``s2m2 prepare`` unless ``data`` is already a prepared folder."""
    if (data / "meta.json").is_file():
        print(f"prepare: reusing {data}")
        return
    if not source.exists():
        raise AblationError(f"{data} is not prepared and the source {source} does not exist (--source)")
    step = s2m2(["prepare", dataset, "--source", str(source), "--out", str(data)], log)
    if step.exit:
        raise AblationError(f"`{step.command}` failed (exit {step.exit})")


def train(method: str, config: Path, run: Path, data: Path, budget: float, overrides: list[str],
          log: Path) -> str:
    """Train one method to its budget unless its run already ended; returns how it ended."""
    summary = read_json_or_none(run / "summary.json") or {}
    if summary.get("stopped") in ENDED:
        changed = recipe_changes(config, run, data, budget, overrides)
        if changed:
            raise AblationError(f"{run} ended, but it was trained with a different recipe than {config} "
                                f"(differs in {', '.join(changed)}), so its results are not this recipe's; move "
                                f"the folder away (or pass another --out) to train it again")
        recorded = summary.get("budget_minutes")
        note = "" if recorded in (None, budget) else f" (WARNING: trained with a {recorded}-min budget, not {budget})"
        print(f"train {method}: already ended ({summary['stopped']}, {summary.get('epochs')} epochs), skipped{note}")
        return summary["stopped"]
    if not config.is_file():
        raise AblationError(f"{config}: no budget recipe for {method} (--configs)")
    argv = ["train", "--config", str(config), "--out", str(run), "--set", f"data.root={data}",
            "--set", f"schedule.budget_minutes={budget:g}"]
    for item in overrides:
        argv += ["--set", item]
    if (run / "last.pt").is_file():
        argv += ["--resume", "auto"]  # an interrupted run continues where its last checkpoint left it
    step = s2m2(argv, log)
    summary = read_json_or_none(run / "summary.json") or {}
    if step.exit == 2:
        raise AblationError(f"`{step.command}` failed (exit 2: bad config, data or checkpoint)")
    if step.exit:
        print(f"train {method}: exit {step.exit} ({summary.get('stopped', 'no summary')}); evaluating its last "
              f"good checkpoint anyway, the table says how it ended")
    return summary.get("stopped", "unknown")


def recipe_changes(config: Path, run: Path, data: Path, budget: float, overrides: list[str]) -> list[str]:
    """Config keys where the run's saved ``config.yaml`` differs from what ``config`` + overrides give now.

    runtime.* (where and how it ran), data.root (the same data under another path) and the budget (warned
    about separately) do not count. A run folder without config.yaml (made before it was saved) is not checked.
    """
    saved = run / "config.yaml"
    if not saved.is_file() or not config.is_file():
        return []
    import yaml

    from s2m2.config import config_diff, config_from_dict, load_config

    now_cfg = load_config(config, [f"data.root={data}", f"schedule.budget_minutes={budget:g}", *overrides])
    # through the dataclasses, so that keys added since the run was made read as their defaults, as on resume
    then = config_from_dict(yaml.safe_load(saved.read_text())).to_dict()
    return [key for key in config_diff(then, now_cfg.to_dict())
            if not key.startswith("runtime.") and key not in ("data.root", "schedule.budget_minutes")]


def same_record(record_path: Path, fingerprint: str, episodes: int,
                protocol: EvalProtocol = EvalProtocol()) -> bool:
    """True when ``record_path`` already holds this checkpoint's evaluation with this many episodes and
    this test protocol."""
    record = read_json_or_none(record_path)
    if not record or record.get("format") not in ("s2m2-evaluation", "s2m2-cross-domain"):
        return False
    ckpt = (record.get("features") or {}).get("checkpoint") or {}
    return (ckpt.get("fingerprint") == fingerprint and protocol.made(record)
            and all(r.get("episodes") == episodes for r in record.get("results", [])))


def checkpoint_of(run: Path, which: str = "best") -> Path:
    """"best": best.pt (best validation epoch) when the run validated, else last.pt; "last": last.pt."""
    for name in ("best.pt", "last.pt") if which == "best" else ("last.pt",):
        if (run / name).is_file():
            return run / name
    raise AblationError(f"{run}: no {'best.pt or ' if which == 'best' else ''}last.pt (did training start?)")


def evaluate_method(method: str, run: Path, data: Path, out: Path, episodes: int, heads: list[str],
                    hardware: dict, train_log: Path, variant: str | None = None,
                    protocol: EvalProtocol = EvalProtocol()) -> list[Path]:
    """Features of the novel split, then one record per head (skipped when already there; its ``variant``
    label is still brought up to date). Test protocols other than the checkpoint's centre crop get files of
    their own (``-ten_crop``, ``-resize40-crop40``, ``-last`` after the head), beside the centre-crop records of
    the best checkpoint. last.pt's records say so in their variant label, as the table shows no checkpoint."""
    from s2m2.checkpoint import file_fingerprint

    checkpoint = checkpoint_of(run, protocol.checkpoint)
    if protocol.checkpoint == "last":
        variant = f"{variant}: last.pt" if variant else "last.pt"
    fingerprint = file_fingerprint(checkpoint)
    suffix = protocol.suffix
    features = out / "features" / f"{method}-novel{suffix}.pt"
    features_step = None
    records = []
    for head in heads:
        record = out / "records" / f"{method}-{head}{suffix}.json"
        if same_record(record, fingerprint, episodes, protocol):
            print(f"evaluate {method} {head}: record of this checkpoint exists, skipped ({record})")
            if ((read_json_or_none(record) or {}).get("provenance") or {}).get("variant") != variant:
                add_provenance(record, variant=variant)
            records.append(record)
            continue
        if features_step is None:
            features_step = s2m2(["features", "--checkpoint", str(checkpoint), "--data", str(data),
                                  "--split", "novel", "--out", str(features), *protocol.extraction_args()])
            if features_step.exit:
                raise AblationError(f"`{features_step.command}` failed (exit {features_step.exit})")
        step = s2m2(["evaluate", "--features", str(features), "--ways", "5", "--shots", "1", "5",
                     "--queries", "15", "--episodes", str(episodes), "--seed", "0", "--head", head,
                     "--threads", "1", "--no-progress", "--out", str(record)])
        if step.exit:
            raise AblationError(f"`{step.command}` failed (exit {step.exit})")
        why = ("best validation epoch" if checkpoint.name == "best.pt"
               else "last state" if (run / "best.pt").is_file() else "last state: no validation")
        add_provenance(record, method=method, run_dir=str(run), checkpoint_used=f"{checkpoint.name} ({why})",
                       commands={"train": read_steps(train_log), "features": features_step.command,
                                 "evaluate": step.command},
                       hardware=hardware, date=now(), added_by="scripts/ablation.py", variant=variant)
        records.append(record)
    return records


def best_method(records_dir: Path, methods: list[str], protocol: EvalProtocol = EvalProtocol()) -> str | None:
    """The method with the highest novel 5-way 5-shot logreg accuracy (with this test protocol)."""
    scores = {}
    for method in methods:
        record = read_json_or_none(records_dir / f"{method}-logreg{protocol.suffix}.json") or {}
        for r in record.get("results", []):
            if r.get("ways") == 5 and r.get("shots") == 5 and "mean" in r:
                scores[method] = r["mean"]
    return max(scores, key=scores.get) if scores else None


def cross_domain(method: str, run: Path, cub_source: Path, cub: Path, out: Path, episodes: int, heads: list[str],
                 hardware: dict, dataset: str, train_log: Path,
                 protocol: EvalProtocol = EvalProtocol()) -> list[Path]:
    """The best backbone on the CUB sample: 1-shot with 2 queries (3 images per class); 5-shot is skipped."""
    from s2m2.checkpoint import file_fingerprint
    from s2m2.data import open_split

    prepare("cub", cub_source, cub, out / "commands" / "prepare-cub.jsonl")
    # The protocol evaluates the CloserLook novel classes only; the sample spreads its classes over all three
    # splits, so the label gives both counts (computed, not typed).
    splits = {name: open_split(cub, name) for name in ("base", "val", "novel")}
    total_images = sum(len(s.labels) for s in splits.values())
    total_classes = sum(len(s.class_names) for s in splits.values())
    novel = splits["novel"]
    label = (f"CUB sample ({total_images} images, {total_classes} classes), its novel split: "
             f"{len(novel.labels)} images, {len(novel.class_names)} classes")
    section = f"Cross-domain: {dataset_title(dataset)} backbone ({method}, best by 5-way 5-shot logreg) -> {label}"
    checkpoint = checkpoint_of(run, protocol.checkpoint)
    fingerprint = file_fingerprint(checkpoint)
    records = []
    for head in heads:
        record = out / "records" / f"cross-domain-{method}-{head}{protocol.suffix}.json"
        if same_record(record, fingerprint, episodes, protocol):
            print(f"cross-domain {head}: record of this checkpoint exists, skipped ({record})")
            records.append(record)
            continue
        step = s2m2(["cross-domain", "--checkpoint", str(checkpoint), "--cub", str(cub), "--shots", "1", "5",
                     "--queries", "2", "--episodes", str(episodes), "--seed", "0", "--head", head, "--threads", "1",
                     "--no-progress", "--features-out", str(out / "features" / f"cub-{method}{protocol.suffix}.pt"),
                     *protocol.extraction_args(), "--out", str(record)])
        if step.exit:
            raise AblationError(f"`{step.command}` failed (exit {step.exit})")
        add_provenance(record, method=method, run_dir=str(run), section=section,
                       checkpoint_used=checkpoint.name, commands={"train": read_steps(train_log),
                                                                  "evaluate": step.command},
                       hardware=hardware, date=now(), added_by="scripts/ablation.py")
        records.append(record)
    return records


def reference_records(directory: Path, dataset: str) -> list[str]:
    """The shipped reference records (paper, public baselines) of this dataset."""
    records = {p: read_json_or_none(p) or {} for p in sorted(directory.glob("*.json"))}
    return [str(p) for p, r in records.items() if r.get("format") == "s2m2-reference" and r.get("dataset") == dataset]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True, choices=sorted(DEFAULT_SOURCES))
    p.add_argument("--budget-minutes", type=float, required=True, help="wall-clock budget of every method")
    p.add_argument("--out", type=Path, help="default: checkpoints/ablation/<dataset>")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--heads", nargs="+", choices=HEADS, default=list(HEADS))
    p.add_argument("--episodes", type=int, default=10000)
    p.add_argument("--eval-views", choices=VIEWS, default="centre",
                   help="test views averaged per image (s2m2 features --views): centre = the release's single "
                        "centre crop; flip; ten_crop. Records of other views are kept beside the centre ones")
    p.add_argument("--eval-size", type=int, nargs=2, metavar=("RESIZE", "CROP"),
                   help="test-time resize and centre crop (s2m2 features --resize/--crop) instead of the "
                        "checkpoint config's data.eval_resize / data.eval_crop; records get their own files")
    p.add_argument("--eval-checkpoint", choices=("best", "last"), default="best",
                   help="best: best.pt where the run validated, else last.pt; last: last.pt, the state at the end "
                        "of the budget (records <method>-<head>-last.json, variant label ending in 'last.pt')")
    p.add_argument("--data", type=Path, help="prepared dataset folder (default: data/<dataset>)")
    p.add_argument("--source", type=Path, help="downloaded files, to prepare --data when missing")
    p.add_argument("--configs", type=Path, help="budget recipes folder (default: configs/<dataset>/budget)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="extra `s2m2 train --set` override for every method (e.g. smoke tests)")
    p.add_argument("--variant", help="label for the records of a recipe variant (e.g. the --set values), shown "
                   "beside the method name in the report: 's2m2_r (crop 0.35)'")
    p.add_argument("--cub-source", type=Path, default=REPO.parent / "shared" / "data" / "cub_sample")
    p.add_argument("--cub-data", type=Path, default=REPO / "data" / "cub-sample")
    p.add_argument("--no-cross-domain", action="store_true")
    p.add_argument("--references", type=Path, default=REPO / "docs" / "results" / "reference")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.eval_size and not 0 < args.eval_size[1] <= args.eval_size[0]:
        parser.error(f"--eval-size {args.eval_size[0]} {args.eval_size[1]}: the crop must be > 0 and at most "
                     f"the resize")
    protocol = EvalProtocol(args.eval_views, tuple(args.eval_size) if args.eval_size else None, args.eval_checkpoint)
    out = args.out or REPO / "checkpoints" / "ablation" / args.dataset
    data = args.data or REPO / "data" / args.dataset
    source = args.source or (REPO / DEFAULT_SOURCES[args.dataset])
    configs = args.configs or REPO / "configs" / args.dataset.replace("-", "_") / "budget"
    # Paths inside the repository are shown relative to it: the recorded commands then read as a user types
    # them (the subprocesses run in the repository root).
    out, data, configs = short(out), short(data), short(configs)
    source, cub_source, cub_data, references = (short(source), short(args.cub_source), short(args.cub_data),
                                                short(args.references))
    os.chdir(REPO)
    hardware = hardware_info()
    print(f"ablation: {args.dataset}, {len(args.methods)} methods x {args.budget_minutes:g} min on "
          f"{cpu_label(hardware)} ({hardware['cores']} cores) -> {out}", flush=True)
    try:
        prepare(args.dataset, source, data, out / "commands" / "prepare.jsonl")
        ended = {}
        for i, method in enumerate(args.methods, 1):
            print(f"\n=== [{i}/{len(args.methods)}] {method}", flush=True)
            run, log = out / "runs" / method, out / "commands" / f"train-{method}.jsonl"
            ended[method] = train(method, configs / f"{method}.yaml", run, data, args.budget_minutes,
                                  args.overrides, log)
            if not any(run.glob("curves_*.png")):
                from s2m2.plots import plot_run
                plot_run(run)  # the trainer draws them at the end of fit; this covers runs made before that
            evaluate_method(method, run, data, out, args.episodes, args.heads, hardware, log, args.variant,
                            protocol)
        if not args.no_cross_domain:
            best = best_method(out / "records", args.methods, protocol)
            if best is None:
                print("cross-domain: no 5-way 5-shot logreg record, skipped")
            else:
                print(f"\n=== cross-domain: {best} (best novel 5-way 5-shot logreg) -> CUB sample", flush=True)
                cross_domain(best, out / "runs" / best, cub_source, cub_data, out,
                             args.episodes, args.heads, hardware, args.dataset,
                             out / "commands" / f"train-{best}.jsonl", protocol)
        print("\n=== report", flush=True)
        step = s2m2(["report", str(out / "records"), *reference_records(references, args.dataset),
                     "--out", str(out / "report.md"), "--plots-dir", str(out / "report"),
                     "--title", f"{dataset_title(args.dataset)} ablation, {args.budget_minutes:g} min per method"])
        if step.exit:
            raise AblationError(f"`{step.command}` failed (exit {step.exit})")
    except AblationError as err:
        print(f"ablation: error: {err}", file=sys.stderr)
        return 2
    print(f"\nAblation done: {out / 'report.md'} (runs ended: {ended})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
