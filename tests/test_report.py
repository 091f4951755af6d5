"""`s2m2 report` and `s2m2.plots` on synthetic records and run folders (no training)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from s2m2.plots import TRAINING_PNG, VALIDATION_PNG, plot_run
from s2m2.report import ReportError, build_report, format_acc, load_record, main

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def is_png(path: Path) -> bool:
    """A complete PNG: signature first, IEND chunk last."""
    data = path.read_bytes()
    return data.startswith(PNG_MAGIC) and data[-12:-8] == b"\x00\x00\x00\x00" and data[-8:-4] == b"IEND"


def make_run(root: Path, method: str, *, budget=30.0, phases=("main",), epochs=3, validate=True) -> Path:
    """A run folder as the trainer leaves it: config.yaml, log.jsonl, summary.json."""
    run = root / "runs" / method
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(
        f"method:\n  name: {method}\nmodel:\n  backbone: conv4\n  backbone_kwargs:\n    width: 32\n"
        f"schedule:\n  budget_minutes: {budget}\n")
    history, step = [], 0
    for phase in phases:
        for _ in range(epochs):
            step += 10
            rec = {"type": "epoch", "step": step, "time": 0.0, "epoch": len(history) + 1, "phase": phase,
                   "method": method, "loss": 2.0 / (len(history) + 1), "loss_ce": 1.5 / (len(history) + 1),
                   "loss_rotation": 0.5, "train_acc": 10.0 * (len(history) + 1), "images_per_s": 900.0,
                   "seconds": 60.0}
            if validate:
                rec.update(val_acc=40.0 + len(history), val_ci95=1.5)
            history.append(rec)
    best = ({"epoch": history[-1]["epoch"], "phase": phases[-1], "val_acc": history[-1]["val_acc"],
             "val_ci95": 1.5} if validate else None)
    (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))
    (run / "summary.json").write_text(json.dumps({
        "stopped": "budget", "epochs": len(history), "steps": step, "best": best, "history": history,
        "budget_minutes": budget, "elapsed_seconds": budget * 60, "images_seen": 123_456}))
    return run


def make_record(path: Path, run: Path, method: str, head: str, means: dict[int, float],
                fmt: str = "s2m2-evaluation", dataset: str = "cifar-fs", **extra) -> Path:
    """A record shaped like `s2m2 evaluate --out` writes it."""
    results = [{"ways": 5, "shots": shots, "queries": 15, "episodes": 1000, "seed": 0, "generator_seed": 1,
                "mean": mean, "ci95": 0.456, "accuracies": [mean / 100] * 4} for shots, mean in means.items()]
    path.write_text(json.dumps({
        "format": fmt, "format_version": 1, "created": "2026-01-02T03:04:05Z",
        "features": {"path": str(run / "feats.pt"), "cache_key": "abc", "shape": [600, 64],
                     "dataset": {"name": dataset, "split": "novel", "fingerprint": "f"},
                     "transform": {"resize": 36, "crop": 32},
                     "checkpoint": {"path": str(run / "best.pt"), "source": "s2m2", "fingerprint": "0" * 16,
                                    "backbone": {"name": "conv4"}, "epoch": 3}},
        "head": {"name": head, "options": {}}, "feature_transform": {}, "device": "cpu", "torch": "2.14.1",
        "results": results, "wall_seconds": 1.0, **extra}))
    return path


def make_plotted_run_and_record(root: Path, record: Path, method: str, means: dict[int, float], *, epochs=3,
                                hardware=None, date=None) -> Path:
    """A run folder with its curves PNGs and a checkpoint, and an ncm record that evaluated exactly that
    checkpoint (so the report copies the run's curves)."""
    from s2m2.checkpoint import file_fingerprint

    run = make_run(root, method, epochs=epochs)
    plot_run(run)
    (run / "best.pt").write_bytes(f"{root}/{method}".encode())
    provenance = {"provenance": {"method": method, "hardware": hardware, "date": date}} if hardware else {}
    make_record(record, run, method, "ncm", means, **provenance)
    data = json.loads(record.read_text())
    data["features"]["checkpoint"]["fingerprint"] = file_fingerprint(run / "best.pt")
    record.write_text(json.dumps(data))
    return run


@pytest.fixture
def records(tmp_path):
    recs = tmp_path / "records"
    recs.mkdir()
    s2m2_r = make_run(tmp_path, "s2m2_r", phases=("phase1", "phase2"))
    baseline = make_run(tmp_path, "baseline")
    make_record(recs / "s2m2_r-logreg.json", s2m2_r, "s2m2_r", "logreg", {1: 61.234, 5: 80.5},
                provenance={"method": "s2m2_r", "hardware": {"cpu": "Test CPU 9000", "cores": 2, "torch": "2.14.1"},
                            "commands": {"train": [{"command": "s2m2 train --config X", "date": "D", "exit": 0}]}})
    make_record(recs / "s2m2_r-ncm.json", s2m2_r, "s2m2_r", "ncm", {1: 59.0, 5: 78.0})
    make_record(recs / "baseline-logreg.json", baseline, "baseline", "logreg", {1: 50.0, 5: 70.0})
    return recs


def test_report_table_ci_links_and_plots(records, tmp_path):
    out = tmp_path / "docs" / "results.md"
    plots = tmp_path / "docs" / "results"
    report = build_report([records, REPO / "docs/results/reference/easyfsl_cifarfs_baseline.json"], out, plots,
                          archive=tmp_path / "docs" / "archive", command="s2m2 report X")
    md = report.markdown
    assert "Generated by `s2m2 report X`" in md and "do not edit" in md.lower()
    assert "## CIFAR-FS (novel classes)" in md
    table = [line for line in md.splitlines() if line.startswith("| ")]
    header = table[0]
    assert "5-way 1-shot" in header and "5-way 5-shot" in header and "episodes" in header
    row = next(line for line in table if line.startswith("| s2m2_r | conv4 (width=32) | logreg |"))
    assert "61.23 ± 0.46" in row and "80.50 ± 0.46" in row      # two decimals, CI from the record
    assert "1,000" in row and "15 queries, seed 0" in row
    assert "30 min budget" in row and "stopped: budget" in row and "0.12 M images" in row
    # the baseline row precedes s2m2_r (paper order); the reference rows come last
    labels = [line.split("|")[1].strip() for line in table[1:]]
    assert labels.index("baseline") < labels.index("s2m2_r") < labels.index(
        "easyfsl baseline, Conv-4 (reference)")
    assert "60.29 ± 0.48" in md and "53.33 (no CI reported)" in md
    # provenance: commands, hardware and the generated differences statement
    assert "`s2m2 train --config X`" in md and "Test CPU 9000, 2 cores, torch 2.14.1" in md
    assert "What differs" in md and "Conv-4 (64 channels, 32 px)" in md
    # links resolve relative to the Markdown file
    for target in re.findall(r"\]\(([^)#]+)\)", md):
        assert (out.parent / target).exists(), target
    archived = json.loads((tmp_path / "docs/archive/cifar-fs-novel-classes-s2m2_r-logreg.json").read_text())
    assert "accuracies" not in archived["results"][0] and archived["run"]["method"] == "s2m2_r"
    assert len(report.plots) == 2 and all(is_png(p) for p in report.plots)


def test_report_rebuilds_from_archived_records(records, tmp_path):
    """The archived copies alone (run folders gone) give the same table rows."""
    out = tmp_path / "a.md"
    first = build_report([records], out, tmp_path / "p", archive=tmp_path / "archive").markdown
    import shutil
    shutil.rmtree(tmp_path / "runs")
    second = build_report([tmp_path / "archive"], out, tmp_path / "p").markdown
    rows = lambda md: sorted(line.rsplit("|", 2)[0] for line in md.splitlines() if line.startswith("| "))  # noqa: E731
    assert rows(first) == rows(second)


def test_archive_moved_to_another_folder_keeps_names_and_origin(records, tmp_path):
    """Archiving archived copies elsewhere copies them under the same names, still pointing at the original
    records (not at the first archive), and the report from the new archive has the same rows."""
    out = tmp_path / "a.md"
    first = build_report([records], out, tmp_path / "p", archive=tmp_path / "archive").markdown
    build_report([tmp_path / "archive"], out, tmp_path / "p", archive=tmp_path / "moved")
    names = lambda folder: sorted(p.name for p in folder.glob("*.json"))  # noqa: E731
    assert names(tmp_path / "moved") == names(tmp_path / "archive")
    for path in (tmp_path / "moved").glob("*.json"):
        original = json.loads((tmp_path / "archive" / path.name).read_text())["archived_from"]
        assert json.loads(path.read_text())["archived_from"] == original
        assert Path(original).parent == records.resolve()
    second = build_report([tmp_path / "moved"], out, tmp_path / "p").markdown
    rows = lambda md: sorted(line.rsplit("|", 2)[0] for line in md.splitlines() if line.startswith("| "))  # noqa: E731
    assert rows(first) == rows(second)


def test_report_command_writes_markdown_and_pngs(records, tmp_path, capsys):
    out = tmp_path / "r.md"
    assert main([str(records), "--out", str(out)]) == 0
    assert out.read_text().startswith("# Results")
    pngs = sorted((tmp_path / "r").glob("*.png"))
    assert [p.name for p in pngs] == ["cifar-fs-novel-classes_by_method.png", "cifar-fs-novel-classes_by_shots.png"]
    assert all(is_png(p) for p in pngs)


def test_corrupt_or_missing_record_is_an_error_naming_the_file(records, tmp_path, capsys):
    bad = records / "broken.json"
    bad.write_text('{"format": "s2m2-evaluation", "results": [')
    with pytest.raises(ReportError, match=re.escape(str(bad)) + ".*not valid JSON"):
        build_report([records], tmp_path / "r.md", tmp_path / "p")
    assert main([str(bad), "--out", str(tmp_path / "r.md")]) == 2
    assert str(bad) in capsys.readouterr().err
    missing = tmp_path / "nope.json"
    with pytest.raises(ReportError, match=re.escape(str(missing)) + ": record not found"):
        load_record(missing)
    other = tmp_path / "summary.json"
    other.write_text('{"stopped": "finished"}')
    with pytest.raises(ReportError, match=re.escape(str(other)) + ": not a result record"):
        load_record(other)


def test_format_acc():
    assert format_acc(74.806, 0.1949) == "74.81 ± 0.19"
    assert format_acc(60.0, None) == "60.00 (no CI reported)"
    assert format_acc(None, None) == "–"


def test_plot_run_two_phases_marks_and_pngs(tmp_path):
    run = make_run(tmp_path, "s2m2_r", phases=("phase1", "phase2"))
    written = plot_run(run)
    assert [p.name for p in written] == [TRAINING_PNG, VALIDATION_PNG]
    assert all(is_png(p) for p in written)
    assert not list(run.glob(".*.tmp"))  # atomic writes leave no temporary file


def test_plot_run_without_validation_or_with_one_epoch(tmp_path):
    run = make_run(tmp_path, "baseline", epochs=1, validate=False)
    written = plot_run(run)
    assert [p.name for p in written] == [TRAINING_PNG] and is_png(written[0])
    (run / "log.jsonl").unlink()  # history from summary.json alone
    assert [p.name for p in plot_run(run)] == [TRAINING_PNG]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert plot_run(empty) == []


def test_report_shows_each_runs_training_curves_and_keeps_them_after_the_run_is_gone(records, tmp_path):
    from s2m2.plots import plot_run

    from s2m2.checkpoint import file_fingerprint

    run = tmp_path / "runs" / "s2m2_r"
    plot_run(run)
    (run / "best.pt").write_bytes(b"the evaluated checkpoint")
    for head in ("logreg", "ncm"):  # the records evaluated that checkpoint
        record = json.loads((records / f"s2m2_r-{head}.json").read_text())
        record["features"]["checkpoint"]["fingerprint"] = file_fingerprint(run / "best.pt")
        (records / f"s2m2_r-{head}.json").write_text(json.dumps(record))
    out, plots = tmp_path / "docs" / "results.md", tmp_path / "docs" / "results"
    md = build_report([records], out, plots, archive=tmp_path / "archive").markdown
    curves = re.findall(r"!\[s2m2_r: ([^\]]+)\]\(([^)]+)\)", md)
    fingerprint = file_fingerprint(run / "best.pt")
    assert [name for name, _ in curves] == [f"cifar-fs-novel-classes_s2m2-r_{fingerprint}_curves_training",
                                            f"cifar-fs-novel-classes_s2m2-r_{fingerprint}_curves_validation"]
    assert all(is_png(out.parent / target) for _, target in curves)
    assert "baseline: " not in md   # the baseline run has no plots, so no links
    # The folder trained again (another checkpoint, other curves): the copies of the evaluated run stay.
    copied = (out.parent / curves[0][1]).read_bytes()
    (run / "best.pt").write_bytes(b"a later training")
    (run / "curves_training.png").write_bytes(b"not these")
    build_report([records], out, plots)
    assert (out.parent / curves[0][1]).read_bytes() == copied
    import shutil
    shutil.rmtree(tmp_path / "runs")
    again = build_report([tmp_path / "archive"], out, plots).markdown
    assert re.findall(r"!\[s2m2_r: ([^\]]+)\]\(([^)]+)\)", again) == curves

    # A run of the same method on another backbone joins: the series names grow the backbone, and the copies
    # of the run whose folder is gone are still found.
    other = make_plotted_run_and_record(tmp_path / "wide", tmp_path / "wide.json", "s2m2_r", {1: 70.0, 5: 85.0})
    wide = json.loads((tmp_path / "wide.json").read_text())
    wide["features"]["checkpoint"]["backbone"] = {"name": "conv4", "kwargs": {"width": 96}}
    (tmp_path / "wide.json").write_text(json.dumps(wide))
    report = build_report([tmp_path / "archive", tmp_path / "wide.json"], out, plots)
    linked = re.findall(r"!\[s2m2_r[^\]]*\]\(([^)]+_curves_training\.png)\)", report.markdown)
    assert len(linked) == 2 and curves[0][1] in linked and report.warnings == []
    assert {(out.parent / target).read_bytes() for target in linked} == {
        copied, (other / "curves_training.png").read_bytes()}

    # With the copies gone too, the report says so instead of dropping the curves without a word.
    shutil.rmtree(plots)
    report = build_report([tmp_path / "archive"], out, plots)
    assert "![s2m2_r" not in report.markdown
    assert "Training curves not found" in report.markdown and "s2m2_r" in report.markdown
    assert len(report.warnings) == 1 and "no training curves for s2m2_r" in report.warnings[0]


def test_variant_label_and_two_recipes_of_one_method_stay_apart(tmp_path):
    """A recipe variant (scripts/ablation.py --variant) is named in the table, and one method trained with two
    backbones gives two plot series, not one bar showing whichever record came first."""
    from s2m2.report import find_records, rows_of, series_names

    recs = tmp_path / "records"
    recs.mkdir()
    v1 = make_run(tmp_path / "v1", "s2m2_r")
    v2 = make_run(tmp_path / "v2", "s2m2_r")
    (v2 / "config.yaml").write_text((v2 / "config.yaml").read_text().replace("width: 32", "width: 32\n    pool: flatten"))
    make_record(recs / "v1.json", v1, "s2m2_r", "logreg", {1: 50.0, 5: 70.0})
    make_record(recs / "v2.json", v2, "s2m2_r", "logreg", {1: 52.0, 5: 71.0})
    make_record(recs / "crop.json", v2, "s2m2_r", "logreg", {1: 58.0, 5: 75.0},
                provenance={"method": "s2m2_r", "variant": "crop 0.35"})
    md = build_report([recs], tmp_path / "r.md", tmp_path / "plots").markdown
    labels = [line.split("|")[1].strip() for line in md.splitlines() if line.startswith("| ")][1:]
    assert sorted(labels) == ["s2m2_r", "s2m2_r", "s2m2_r (crop 0.35)"]
    rows = [row for path in find_records([recs]) for row in rows_of(load_record(path), path, str(path))]
    names = series_names(rows)
    by_mean = {r.mean: names[id(r)] for r in rows}
    assert by_mean[50.0] == "s2m2_r\nconv4 (width=32)" and by_mean[52.0] == "s2m2_r\nconv4 (width=32, pool=flatten)"
    assert by_mean[58.0] == "s2m2_r (crop 0.35)"  # the only row of its label: no backbone needed


def test_rerun_record_at_the_same_path_is_archived_beside_the_old_one(records, tmp_path):
    """An ablation re-run with a new recipe writes its record to the same path as the old one: archiving must
    keep both (the old copy is history the report still shows), while the original and its own archived copy
    given together still count once."""
    archive = tmp_path / "archive"
    first = build_report([records], tmp_path / "a.md", tmp_path / "p", archive=archive)
    assert sum("61.23 ± 0.46" in line for line in first.markdown.splitlines() if line.startswith("| ")) == 1
    again = build_report([records, archive], tmp_path / "a.md", tmp_path / "p", archive=archive)
    assert len(again.rows) == len(first.rows)                      # original + its archived copy: once
    old = json.loads((records / "s2m2_r-logreg.json").read_text())
    new = make_record(records / "s2m2_r-logreg.json", tmp_path / "runs" / "s2m2_r", "s2m2_r", "logreg",
                      {1: 66.6, 5: 82.2}, provenance=old["provenance"])
    record = json.loads(new.read_text())
    record["created"] = "2026-02-03T04:05:06Z"
    record["features"]["checkpoint"]["fingerprint"] = "1" * 16   # the run folder was trained again
    new.write_text(json.dumps(record))
    both = build_report([records, archive], tmp_path / "a.md", tmp_path / "p", archive=archive)
    table = [line for line in both.markdown.splitlines() if line.startswith("| s2m2_r ")]
    assert any("61.23 ± 0.46" in line for line in table) and any("66.60 ± 0.46" in line for line in table)
    names = sorted(p.name for p in archive.glob("*s2m2_r-logreg*.json"))
    assert names == ["cifar-fs-novel-classes-s2m2_r-logreg-20260203T040506Z.json",
                     "cifar-fs-novel-classes-s2m2_r-logreg.json"]


def test_order_check_states_whether_the_papers_order_holds_per_recipe_head_and_column(tmp_path):
    """The generated answer to "does the paper's ordering hold?": measured order with ties marked by the CI of
    the difference, and each pair adjacent in the paper's order marked holds / tie / reversed; another recipe
    (a --variant) is never ranked against this one."""
    recs = tmp_path / "records"
    recs.mkdir()
    means = {"s2m2_r": {1: 60.0, 5: 70.0}, "rotation": {1: 55.0, 5: 72.0},
             "manifold_mixup": {1: 55.3, 5: 69.0}, "baseline++": {1: 50.0, 5: 60.0}}
    for method, by_shots in means.items():
        make_record(recs / f"{method}.json", make_run(tmp_path, method), method, "logreg", by_shots)
    make_record(recs / "variant.json", tmp_path / "runs" / "s2m2_r", "s2m2_r", "logreg", {1: 99.0, 5: 99.0},
                provenance={"method": "s2m2_r", "variant": "crop 0.35"})
    md = build_report([recs, REPO / "docs/results/reference/paper_s2m2_wrn28_10_cifarfs.json"], tmp_path / "r.md",
                      tmp_path / "plots").markdown
    assert "s2m2_r > rotation > manifold_mixup > baseline++" in md      # the paper's order, from its numbers
    rows = {line.split("|")[3].strip(): line for line in md.splitlines()
            if line.startswith("| conv4 (width=32); 30 min | logreg |")}
    assert set(rows) == {"5-way 1-shot", "5-way 5-shot"}
    one = rows["5-way 1-shot"]
    # 55.3 vs 55.0 with CIs of 0.456 each: the difference's CI is 0.645, so a tie
    assert "s2m2_r 60.00 > manifold_mixup 55.30 ≈ rotation 55.00 > baseline++ 50.00" in one
    assert "2 of 3 hold: s2m2_r > rotation: holds; rotation > manifold_mixup: tie; manifold_mixup > baseline++: holds" in one
    five = rows["5-way 5-shot"]
    assert "rotation 72.00 > s2m2_r 70.00 > manifold_mixup 69.00 > baseline++ 60.00" in five
    assert "s2m2_r > rotation: reversed" in five and "rotation > manifold_mixup: holds" in five
    assert "crop 0.35" not in "".join(line for line in md.splitlines() if "hold:" in line)  # alone in its recipe


def test_rows_on_transformed_features_name_the_transform_in_the_head(records, tmp_path):
    """`s2m2 evaluate --power 0.5 --center --l2` evaluates other features than the plain record of the same
    checkpoint: its row must say so instead of reading as a second, different result of the same head."""
    make_record(records / "s2m2_r-ncm-transformed.json", tmp_path / "runs" / "s2m2_r", "s2m2_r", "ncm",
                {1: 57.0, 5: 77.0}, feature_transform={"power": 0.5, "center": True, "l2": True})
    md = build_report([records], tmp_path / "r.md", tmp_path / "p").markdown
    heads = {line.split("|")[3].strip(): line for line in md.splitlines() if line.startswith("| s2m2_r |")}
    assert set(heads) == {"logreg", "ncm", "ncm (power 0.5, centred, L2)"}
    assert "57.00 ± 0.46" in heads["ncm (power 0.5, centred, L2)"] and "59.00 ± 0.46" in heads["ncm"]


def test_baseline_and_baseline_plus_plus_curves_get_their_own_files(tmp_path):
    """Plot copies are named by a slug of the series: "baseline++" must not collapse onto "baseline"."""
    recs = tmp_path / "records"
    recs.mkdir()
    for method in ("baseline", "baseline++"):
        make_plotted_run_and_record(tmp_path, recs / f"{method}.json", method, {1: 50.0, 5: 70.0})
    md = build_report([recs], tmp_path / "r.md", tmp_path / "plots").markdown
    targets = re.findall(r"!\[(baseline\+*): [^\]]+\]\(([^)]+_curves_training\.png)\)", md)
    assert sorted(method for method, _ in targets) == ["baseline", "baseline++"]
    assert len({target for _, target in targets}) == 2
    for method, target in targets:  # each file holds its own run's curves
        assert (tmp_path / target).read_bytes() == (tmp_path / "runs" / method / TRAINING_PNG).read_bytes()


ONE_RECIPE_RUN_TWICE = {  # (CPUs, dates) -> expected series names of the two runs
    (("CPU A", "CPU B"), (None, None)): ("s2m2_r\nCPU A", "s2m2_r\nCPU B"),
    (("CPU A", "CPU A"), ("2026-12-01T12:48:58+00:00", "2026-12-01T11:16:05+00:00")):
        ("s2m2_r\nCPU A, 2026-12-01 12:48 UTC", "s2m2_r\nCPU A, 2026-12-01 11:16 UTC"),
    (("CPU A", "CPU A"), (None, None)): ("s2m2_r\nrun 1", "s2m2_r\nrun 2"),
    # one model name, two machines: the family and vector extension tell them apart (hardware_info records
    # them since 2026-12-02; the three 'AMD EPYC' VMs so far differ up to 5.5x in speed)
    ((("AMD EPYC", "23", "AVX2"), ("AMD EPYC", "26", "AVX-512")), (None, None)):
        ("s2m2_r\nAMD EPYC (family 23, AVX2)", "s2m2_r\nAMD EPYC (family 26, AVX-512)"),
}


def _cpu_fields(cpu: str | tuple[str, str, str]) -> dict[str, str]:
    """A model name, or (model name, family, vector extension) as hardware_info records them."""
    return {"cpu": cpu} if isinstance(cpu, str) else dict(zip(("cpu", "cpu_family", "cpu_isa"), cpu))


@pytest.mark.parametrize("cpus, dates", list(ONE_RECIPE_RUN_TWICE))
def test_one_recipe_run_twice_gets_two_series_and_two_curves_files(tmp_path, cpus, dates):
    """The same method and backbone run twice (the demo on two machines, or twice on one) must not share a
    bar or a curves file: the series name adds the CPU; where the CPUs are the same, the run's date (which,
    unlike a run number, stays put when a third run is added); a run number only when neither tells."""
    from s2m2.report import find_records, rows_of, series_names

    recs = tmp_path / "records"
    recs.mkdir(parents=True)
    for i, (cpu, date) in enumerate(zip(cpus, dates)):
        make_plotted_run_and_record(tmp_path / f"host{i}", recs / f"r{i}.json", "s2m2_r", {1: 90.0 + i, 5: 95.0},
                                    epochs=2 + i, date=date,
                                    hardware={**_cpu_fields(cpu), "cores": 2, "torch": "2.14.1"})
    rows = [row for path in find_records([recs]) for row in rows_of(load_record(path), path, str(path))]
    names = {r.mean: series_names(rows)[id(r)] for r in rows if r.shots == 1}
    assert names == dict(zip((90.0, 91.0), ONE_RECIPE_RUN_TWICE[cpus, dates]))
    md = build_report([recs], tmp_path / "r.md", tmp_path / "plots").markdown
    targets = re.findall(r"!\[s2m2_r[^\]]*\]\(([^)]+_curves_training\.png)\)", md)
    assert len(set(targets)) == 2
    assert {(tmp_path / t).read_bytes() for t in targets} == {
        (tmp_path / f"host{i}" / "runs" / "s2m2_r" / TRAINING_PNG).read_bytes() for i in range(2)}


@pytest.mark.filterwarnings("ignore:constrained_layout not applied")  # 240-character tick labels
def test_long_series_names_get_short_distinct_file_names(tmp_path):
    """Names built from a long section and series (a cross-domain section plus a backbone label) passed the
    file system's 255 bytes; cut short, two names that differ only at their end must still get two files,
    and the plots and the archived records must be written."""
    recs = tmp_path / "records"
    recs.mkdir(parents=True)
    methods = ["manifold_mixup_" + "x" * 225 + "_a", "manifold_mixup_" + "x" * 225 + "_b"]  # 242-byte folders
    for i, method in enumerate(methods):
        make_plotted_run_and_record(tmp_path / f"host{i}", recs / f"r{i}.json", method, {1: 60.0 + i, 5: 78.0})
    md = build_report([recs], tmp_path / "r.md", tmp_path / "plots", archive=tmp_path / "archive").markdown
    curves = sorted((tmp_path / "plots").glob("*_curves_training.png"))
    assert len(curves) == 2
    assert {c.read_bytes() for c in curves} == {
        (tmp_path / f"host{i}" / "runs" / method / TRAINING_PNG).read_bytes() for i, method in enumerate(methods)}
    archived = sorted((tmp_path / "archive").glob("*.json"))
    assert len(archived) == 2
    for path in [*curves, *archived, *(tmp_path / "plots").iterdir()]:
        assert len(path.name.encode()) <= 240, path.name
        assert path.name in md or path.suffix == ".json" or "_curves_" not in path.name


@pytest.mark.parametrize("flags, isa", [("fpu sse2 avx avx2 fma avx512f avx512bw", "AVX-512"),
                                         ("fpu sse2 avx avx2 fma", "AVX2"), ("fpu sse2 avx", "AVX"),
                                         ("fpu sse2", "none"), ("", "")])
def test_cpu_vector_isa_names_the_widest_extension(flags, isa):
    from s2m2.report import cpu_vector_isa

    assert cpu_vector_isa(flags) == isa


def test_hardware_label_names_family_and_isa_where_recorded():
    """Records made before 2026-12-02 hold only the model name and keep their label; newer ones add the
    family and vector extension that tell two 'AMD EPYC' machines apart."""
    from s2m2.report import hardware_info, hardware_label

    old = {"cpu": "AMD EPYC", "cores": 2, "torch": "2.14.1"}
    assert hardware_label(old) == "AMD EPYC, 2 cores, torch 2.14.1"
    assert hardware_label({**old, "cpu_family": "26", "cpu_isa": "AVX-512"}) == \
        "AMD EPYC (family 26, AVX-512), 2 cores, torch 2.14.1"
    here = hardware_info()
    if Path("/proc/cpuinfo").exists() and "flags" in Path("/proc/cpuinfo").read_text():
        assert here["cpu_family"] and here["cpu_isa"] in ("AVX-512", "AVX2", "AVX", "none")
        assert f"family {here['cpu_family']}" in hardware_label(here)


def test_a_third_run_on_the_same_cpu_leaves_the_other_runs_names_alone(tmp_path):
    """Adding a run must not rename the runs already in the report: their curves copies are found by name
    when their folders are gone (a report rebuilt from archived records)."""
    from s2m2.report import find_records, rows_of, series_names

    recs = tmp_path / "records"
    recs.mkdir(parents=True)
    dates = ("2026-12-01T11:16:05+00:00", "2026-12-01T12:48:58+00:00", "2026-12-01T10:00:00+00:00")
    before = {}
    for count in (2, 3):
        i = count - 1  # the third record's name sorts first, where a run number would renumber the others
        make_plotted_run_and_record(tmp_path / f"host{i}", recs / ("a-new.json" if count == 3 else f"r{i}.json"),
                                    "s2m2_r", {1: 90.0 + i, 5: 95.0},
                                    epochs=2 + i, hardware={"cpu": "CPU A", "cores": 2, "torch": "2.14.1"},
                                    date=dates[i])
        if count == 2:
            make_plotted_run_and_record(tmp_path / "host0", recs / "r0.json", "s2m2_r", {1: 90.0, 5: 95.0},
                                        epochs=2, hardware={"cpu": "CPU A", "cores": 2, "torch": "2.14.1"},
                                        date=dates[0])
        rows = [row for path in find_records([recs]) for row in rows_of(load_record(path), path, str(path))]
        names = {r.mean: series_names(rows)[id(r)] for r in rows if r.shots == 1}
        if count == 2:
            before = names
    assert len(set(names.values())) == 3
    assert {mean: names[mean] for mean in before} == before


def test_reference_rows_without_an_episode_count_say_not_stated(tmp_path):
    """A published table that gives no episode count is "not stated", not the "?" of a broken record."""
    md = build_report([REPO / "docs/results/reference/published_conv4_cifarfs.json"], tmp_path / "r.md",
                      tmp_path / "plots").markdown
    row = next(line for line in md.splitlines() if line.startswith("| published: R2D2 (reference) |"))
    assert "65.30 ± 0.20" in row and "79.40 ± 0.10" in row
    assert row.split("|")[6].strip() == "not stated"


def test_plots_of_a_report_with_dozens_of_long_labelled_runs_keep_every_label(tmp_path):
    """docs/results.md holds 30+ CIFAR-FS runs whose labels run to 100 characters. The by-method chart then
    squeezed its axes to nothing under rotated labels and the by-shots legend overflowed its figure
    (matplotlib: "constrained_layout not applied"); both charts now grow with their rows."""
    import warnings

    from PIL import Image

    recs = tmp_path / "records"
    recs.mkdir()
    run = make_run(tmp_path / "run", "manifold_mixup")
    for i in range(36):
        variant = f"best recipe, Conv-4 widths 64-128-256-512, pool first, a variant of a long series, number {i:02d}"
        for head in ("logreg", "ncm"):
            make_record(recs / f"r{i}-{head}.json", run, "manifold_mixup", head, {1: 50 + i * 0.3, 5: 70 + i * 0.2},
                        provenance={"method": "manifold_mixup", "variant": variant})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a layout matplotlib gave up on is a failure, not a log line
        build_report([recs], tmp_path / "r.md", tmp_path / "plots")
    by_method, = (tmp_path / "plots").glob("*_by_method.png")
    by_shots, = (tmp_path / "plots").glob("*_by_shots.png")
    # one line of ~0.3 inch per method at 110 dpi; one legend entry of ~0.14 inch per (method, head)
    assert Image.open(by_method).height > 36 * 0.3 * 110
    assert Image.open(by_shots).height > 72 * 0.14 * 110
