"""scripts/gpu_check.py: the CPU quick run exercises every section's code (so the GPU script cannot rot
between GPU sessions), and the pieces with logic of their own are checked directly: peak lookup / MFU,
the compile warm-up's mixup-point coverage, the docs appender, and the recipe wall-time table in
docs/training.md (regenerated and compared, so the documented numbers follow the configs).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up while the file executes
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("gpu_check", None)


def _run(args, tmp_path, timeout=180):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, str(SCRIPT), *args], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, f"gpu_check {args} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


def test_quick_cpu_run_covers_every_section(gpu_check, tmp_path, capsys):
    docs = tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n\nexisting text\n")
    out = tmp_path / "check.json"
    # In-process (the script's main), to save a second torch start-up; the DDP path needs the subprocess.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code = gpu_check.main(["--device", "cpu", "--quick", "--out", str(out), "--append-docs", str(docs)])
    finally:
        torch.set_num_threads(threads)
        torch._dynamo.reset()  # the compiled row's graphs must not leak into other tests
    assert code == 0, capsys.readouterr().err[-5000:]
    stdout = capsys.readouterr().out
    report = json.loads(out.read_text())

    for name in ("device", "flops", "throughput", "agreement", "pipeline", "max_batch", "ddp"):
        assert name in report and "error" not in report[name], (name, report.get(name))
    # FLOP count: the S2M2_R step is ~2 image forward+backward passes per input image
    assert 1.95 < report["flops"]["step_over_batch_images"] < 2.1
    rows = report["throughput"]["rows"]
    assert list(rows) == ["fp32", "bf16", "bf16+channels_last", "bf16+channels_last+compile"]
    for row in rows.values():
        assert row["images_per_s"] > 0 and row["tflops"] > 0 and row["mfu"] is None  # CPU: no known peak
    # the compile warm-up compiled every graph (all mixup points + the un-mixed pass) before timing
    compiled = rows["bf16+channels_last+compile"]
    assert compiled["graphs_compiled"] >= 6 and compiled["graphs_compiled_while_timing"] == 0
    agreement = report["agreement"]
    assert agreement["episodes"] == 1000 and agreement["acc_fp32"] > 50  # class structure survives
    assert agreement["cosine_min"] > 0.99 and abs(agreement["acc_diff_points"]) < 2
    pipeline = report["pipeline"]
    assert pipeline["augment_images_per_s"] > 0 and pipeline["headroom_full_path"] > 0
    assert report["max_batch"]["largest_batch"] == 32 and report["max_batch"]["stopped"] == "cap 32 reached"
    assert "--ddp-cpu" in report["ddp"]["skipped"]

    text = docs.read_text()
    assert text.startswith("# Benchmarks\n\nexisting text\n")
    assert text.count("## GPU self-check (scripts/gpu_check.py)") == 1
    assert "| bf16+channels_last+compile |" in text and "1000 5-way 1-shot episodes" in text
    assert "| fp32 |" in stdout


def test_peaks_and_mfu(gpu_check):
    assert gpu_check.device_peak("NVIDIA H100 80GB HBM3")["bf16_tflops"] == 989.4
    assert gpu_check.device_peak("NVIDIA H100 PCIe")["bf16_tflops"] == 756.0
    assert gpu_check.device_peak("NVIDIA H200")["label"] == "H200 SXM"
    assert gpu_check.device_peak("NVIDIA A100-SXM4-80GB")["bf16_tflops"] == 312.0
    assert gpu_check.device_peak("NVIDIA GeForce RTX 4090") is None
    assert gpu_check.device_peak("Tesla T4") is None


def test_covering_seeds_draw_every_mixup_point_twice(gpu_check):
    s = gpu_check.settings_for("cpu", quick=True)
    seeds = gpu_check.covering_seeds(s, num_points=4, batch=s.batch)
    points = [gpu_check.mix_point_of_seed(s, 4, s.batch, seed) for seed in seeds]
    assert sorted(points) == [0, 0, 1, 1, 2, 2, 3, 3]
    # the replay agrees with the real step's draw (s2m2.objectives.sample_mix after the augmentation)
    from s2m2.data.augment import TrainAugment
    from s2m2.objectives import sample_mix

    g = torch.Generator().manual_seed(seeds[3])
    TrainAugment(s.crop).sample(s.batch, s.stored, s.stored, g)
    assert sample_mix(4, s.batch, 2.0, g).layer == points[3]


def test_append_docs_adds_the_heading_once(gpu_check, tmp_path):
    docs = tmp_path / "b.md"
    docs.write_text("# B\n")
    gpu_check.append_docs(docs, "### run 1\n\n| a |\n")
    gpu_check.append_docs(docs, "### run 2\n")
    text = docs.read_text()
    assert text.count(gpu_check.DOCS_HEADING) == 1
    assert text.index(gpu_check.DOCS_HEADING) < text.index("### run 1") < text.index("### run 2")


def test_recipe_table_in_docs_is_current(gpu_check):
    rows = gpu_check.recipe_estimates()
    mini = next(r for r in rows if r["dataset"] == "mini_imagenet" and r["method"] == "s2m2_r")
    # 400 rotation epochs (4 passes per image) + 100 S2M2_R epochs (2 passes), 38,400 images, at 80 px
    per_image = mini["image_fwd_bwd_gflop"] * 1e9
    expected = (400 * 4 + 100 * 2) * 38_400 * per_image / 1e15
    assert mini["epochs"] == "400 + 100" and abs(mini["total_pflop"] - expected) / expected < 1e-3
    table = gpu_check.recipes_markdown(rows)
    assert table in (REPO / "docs" / "training.md").read_text(), \
        "docs/training.md's recipe table is stale: paste `python scripts/gpu_check.py --estimate-recipes`"


@pytest.mark.slow
def test_quick_cpu_run_with_gloo_ddp(tmp_path):
    """The DDP section's code (spawned ranks, probe equivalence, scaling) with 2 gloo CPU processes."""
    out = tmp_path / "check.json"
    _run(["--device", "cpu", "--quick", "--out", str(out), "--ddp-cpu", "2", "--skip", "agreement", "pipeline",
          "max_batch", "compile"], tmp_path)
    ddp = json.loads(out.read_text())["ddp"]
    assert ddp["world"] == 2 and ddp["backend"] == "gloo"
    assert ddp["equivalence"]["ok"] and ddp["equivalence"]["max_abs_diff"] < 1e-5
    assert ddp["scaling"]["images_per_s"] > 0 and 0 < ddp["scaling"]["efficiency"]
