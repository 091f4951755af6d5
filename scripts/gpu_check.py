#!/usr/bin/env python
"""GPU self-check: everything a first session on a GPU must learn, in <= 5 minutes on one GPU.

    python scripts/gpu_check.py --out gpu_check.json --append-docs       # on the GPU machine
    python scripts/gpu_check.py --device cpu --quick --out /tmp/q.json   # same code path on CPU, seconds
    python scripts/gpu_check.py --estimate-recipes                       # FLOP-based recipe wall times (CPU)

Sections (each one is timed, bounded and fenced: an error or the time budget skips it with a reason and the
others still run; the JSON is rewritten after every section, so a killed run keeps what it measured):

  device      name, memory, torch / CUDA versions, GPU count, the bf16 dense peak from PEAKS (unknown: null).
  flops       FLOPs of one S2M2_R training step (forward + backward, torch.utils.flop_counter.FlopCounterMode)
              and of one image's forward + backward (the step is ~2 of them per input image: the mixup pass
              on B images + the rotation pass on 4 x B/4).
  throughput  WRN-28-10 S2M2_R step (augmentation from uint8 on the device, mixup pass, rotation pass, ONE
              Adam step -- the trainer's step) at 80 px, batch 64: fp32, bf16, bf16 + channels_last, and
              bf16 + channels_last + torch.compile of the backbone; images/s, TFLOP/s, MFU vs the bf16 dense
              peak (one yardstick for all rows), peak memory.
  agreement   bf16 vs fp32 features of a fixed seeded class-structured batch (cosine similarity, relative
              L2 difference) and 1,000 seeded 5-way 1-shot episodes (logreg head) on both feature sets.
  pipeline    the input pipeline on the device: TrainAugment from uint8 alone, and the trainer's whole path
              (TrainData.gather from a memory-mapped prepared folder + pin + copy + augment), images/s vs the
              fastest step's demand.
  max_batch   the largest batch that fits (bf16 + channels_last), doubling from 64, OOM caught.
  ddp         with >= 2 GPUs: NCCL DDP == one GPU on a BatchNorm-free probe (max |diff| of the weights after
              a few SGD steps; TF32 off), and scaling efficiency of the WRN step at 64 images per GPU.

``--quick`` (with ``--device cpu``) swaps in a Conv-4 at 32 px, batch 16, 2 timed steps, compile with the
"eager" backend (dynamo tracing without code generation) and a batch cap, so the whole script runs in
seconds on a CPU (tests/test_gpu_check.py, part of ``make test``). ``--ddp-cpu 2`` runs the DDP section with
gloo on CPU processes (the same code, for testing).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import math
import os
import platform
import socket
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parents[1]
DOCS_HEADING = "## GPU self-check (scripts/gpu_check.py)"

# Dense (no 2:4 sparsity) tensor-core peaks in TFLOP/s from NVIDIA's data sheets: (name substrings that must
# all occur in torch.cuda.get_device_name(), label, bf16, tf32). First match wins, so specific names first.
PEAKS: list[tuple[tuple[str, ...], str, float, float]] = [
    (("H200", "NVL"), "H200 NVL", 835.5, 417.5),
    (("H200",), "H200 SXM", 989.4, 494.7),
    (("H100", "PCIE"), "H100 PCIe", 756.0, 378.0),
    (("H100", "NVL"), "H100 NVL", 835.5, 417.5),
    (("H100",), "H100 SXM", 989.4, 494.7),
    (("A100",), "A100", 312.0, 156.0),
]


def device_peak(name: str) -> dict[str, Any] | None:
    """``{"label", "bf16_tflops", "tf32_tflops"}`` of a known GPU name, else None (MFU is then null)."""
    upper = name.upper()
    for keys, label, bf16, tf32 in PEAKS:
        if all(k in upper for k in keys):
            return {"label": label, "bf16_tflops": bf16, "tf32_tflops": tf32}
    return None


# ------------------------------------------------------------------------------------------------
# Settings
# ------------------------------------------------------------------------------------------------
@dataclass
class Settings:
    """What to measure. ``settings_for(device, quick)`` gives the two presets."""

    device: str
    quick: bool
    backbone: str = "wrn28_10"
    backbone_kwargs: dict = field(default_factory=lambda: {"dropout": 0.5})
    stored: int = 84            # stored image side (uint8), as prepared mini-ImageNet
    crop: int = 80              # training crop; evaluation: resize eval_resize -> centre crop
    eval_resize: int = 92
    batch: int = 64             # the paper's S2M2_R batch
    classes: int = 200          # cosine head width of the mini-ImageNet config
    warmup: int = 3
    steps: int = 10
    compile_backend: str = "inductor"
    max_batch_cap: int = 8192
    agree_classes: int = 20     # agreement batch: classes x per_class images
    agree_per_class: int = 30
    episodes: int = 1000
    pipeline_images: int = 4096
    ddp_steps: int = 5
    budget_s: float = 285.0     # soft limit for the whole run (sections are skipped past it)


def settings_for(device: str, quick: bool) -> Settings:
    s = Settings(device=device, quick=quick)
    if quick:
        s.backbone, s.backbone_kwargs = "conv4", {"width": 16}
        s.stored, s.crop, s.eval_resize, s.batch, s.classes = 36, 32, 36, 16, 20
        s.warmup, s.steps, s.compile_backend = 1, 2, "eager"
        s.max_batch_cap, s.agree_per_class, s.pipeline_images, s.ddp_steps = 32, 20, 256, 2
        s.budget_s = 120.0
    return s


# ------------------------------------------------------------------------------------------------
# The training step (the trainer's: s2m2.objectives.STEPS["s2m2_r"] + one Adam step)
# ------------------------------------------------------------------------------------------------
@dataclass
class StepConfig:
    name: str
    precision: str = "fp32"      # "fp32" | "bf16"
    channels_last: bool = False
    compile: bool = False


CONFIGS = [StepConfig("fp32"), StepConfig("bf16", "bf16"), StepConfig("bf16+channels_last", "bf16", True),
           StepConfig("bf16+channels_last+compile", "bf16", True, True)]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_model(s: Settings, device: torch.device, channels_last: bool = False, seed: int = 0):
    """WRN (or the quick Conv-4) + cosine head + rotation head, as the trainer builds it for S2M2_R."""
    from s2m2.models import create_backbone
    from s2m2.models.heads import create_head
    from s2m2.objectives import TrainModel

    torch.manual_seed(seed)
    backbone = create_backbone(s.backbone, **s.backbone_kwargs)
    model = TrainModel(backbone, create_head("cosine", backbone.feature_dim, s.classes),
                       create_head("rotation", backbone.feature_dim)).to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def make_step(s: Settings, model: nn.Module, device: torch.device, batch: int, cfg: StepConfig,
              wrapped: nn.Module | None = None) -> Callable[[int], float]:
    """``step(i) -> loss``: one S2M2_R training step on a fixed uint8 batch (B, stored, stored, 3) on ``device``,
    its draws seeded by i. ``wrapped``: the module the step calls (a DDP wrapper of ``model``)."""
    from s2m2.data.augment import TrainAugment
    from s2m2.objectives import STEPS, StepContext

    g = torch.Generator().manual_seed(1234)
    images = torch.randint(0, 256, (batch, s.stored, s.stored, 3), dtype=torch.uint8, generator=g).to(device)
    labels = (torch.arange(batch) % min(s.classes, 64)).to(device)
    augment = TrainAugment(s.crop)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    dtype = torch.bfloat16 if cfg.precision == "bf16" else None

    def autocast():
        return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()

    def step(i: int) -> float:
        torch.manual_seed(i)  # dropout, as the trainer re-seeds per step
        ctx = StepContext(model=wrapped or model, num_mix_points=model.backbone.num_mix_points, transform=augment,
                          view_augment=augment, generator=torch.Generator().manual_seed(i),
                          backward=lambda loss: loss.backward(), autocast=autocast, channels_last=cfg.channels_last)
        optimizer.zero_grad(set_to_none=True)
        stats = STEPS["s2m2_r"](ctx, images, labels)
        optimizer.step()
        return float(stats.loss)  # a host sync, as the trainer's per-step loss read

    step.optimizer = optimizer  # kept alive with the step (Adam state counts in the memory figures)
    return step


def timed_steps(step: Callable[[int], float], device: torch.device, warmup: int, steps: int) -> dict[str, Any]:
    """Run warm-up then timed steps; per-step wall seconds (synchronised), median as the figure."""
    warm = []
    for i in range(warmup):
        start = time.perf_counter()
        step(i)
        sync(device)
        warm.append(time.perf_counter() - start)
    times = []
    for i in range(warmup, warmup + steps):
        start = time.perf_counter()
        loss = step(i)
        sync(device)
        times.append(time.perf_counter() - start)
    if not math.isfinite(loss):
        raise RuntimeError(f"non-finite loss {loss}")
    return {"seconds_per_step": float(np.median(times)), "step_times": [round(t, 5) for t in times],
            "warmup_times": [round(t, 4) for t in warm], "last_loss": loss}


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gb(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 3) if device.type == "cuda" else None


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------
# Sections
# ------------------------------------------------------------------------------------------------
def section_device(s: Settings, device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"torch": torch.__version__, "python": platform.python_version(),
                            "platform": platform.platform(), "cpu_count": os.cpu_count(),
                            "device": str(device), "cuda_available": torch.cuda.is_available(),
                            "gpu_count": torch.cuda.device_count() if torch.cuda.is_available() else 0}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=torch.cuda.get_device_name(device), memory_gb=round(props.total_memory / 2**30, 1),
                    capability=f"{props.major}.{props.minor}", sm_count=props.multi_processor_count,
                    cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                    bf16_supported=torch.cuda.is_bf16_supported())
        info["peak"] = device_peak(info["name"])
    else:
        info.update(name=platform.processor() or "cpu", peak=None)
    return info


def count_flops(fn: Callable[[], Any]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return int(counter.get_total_flops())


def image_flops(s: Settings, crop: int | None = None, device: str | torch.device = "meta") -> int:
    """FLOPs of ONE image's forward + backward through backbone + cosine head (CE loss), counted on a batch of
    2 on the meta device (shapes only: no compute, so WRN-28-10 is counted in seconds on a CPU)."""
    crop = crop or s.crop
    with torch.device(device):
        model = build_model(s, torch.device(device))
        x = torch.randn(2, 3, crop, crop)
        y = torch.zeros(2, dtype=torch.long)

    def fwd_bwd():
        _, logits, _ = model(x)
        F.cross_entropy(logits, y).backward()
    return count_flops(fwd_bwd) // 2


def section_flops(s: Settings, device: torch.device) -> dict[str, Any]:
    model = build_model(s, device)
    step = make_step(s, model, device, s.batch, StepConfig("fp32"))
    step(0)  # allocate Adam state outside the count (the count is of the step's kernels either way)
    per_step = count_flops(lambda: step(1))
    per_image = image_flops(s)
    return {"step_flops": per_step, "image_fwd_bwd_flops": per_image, "batch": s.batch, "crop": s.crop,
            "step_over_batch_images": round(per_step / (s.batch * per_image), 4),
            "note": "S2M2_R step = mixup pass on B images + rotation pass on 4 x B/4, so ~2 image fwd+bwd per "
                    "input image (plus the heads, the augmentation and Adam, not counted by the FLOP counter "
                    "beyond their matmuls)"}


def mix_point_of_seed(s: Settings, num_points: int, batch: int, seed: int) -> int:
    """The mixup point step ``seed`` will draw: replays the S2M2 step's draws from its generator (the
    augmentation's parameters, then s2m2.objectives.sample_mix's point) without running the step."""
    from s2m2.data.augment import TrainAugment

    g = torch.Generator().manual_seed(seed)
    TrainAugment(s.crop).sample(batch, s.stored, s.stored, g)
    return int(torch.randint(0, num_points, (1,), generator=g))


def covering_seeds(s: Settings, num_points: int, batch: int, per_point: int = 2) -> list[int]:
    """Step seeds that draw every mixup point ``per_point`` times, interleaved (point order of first use).

    Why: a compiled backbone gets one graph per mixup point (``mix_spec.layer`` is a Python int, so dynamo
    specialises on it) plus one for the un-mixed rotation pass, and its first graph also specialises on the
    Beta draw ``lam`` (recompiled as dynamic on the second call). Random seeds would hit those compilations
    at random times inside the timed steps; these seeds compile everything during warm-up.
    """
    seen: dict[int, list[int]] = {p: [] for p in range(num_points)}
    seed = 0
    while any(len(v) < per_point for v in seen.values()) and seed < 10_000:
        point = mix_point_of_seed(s, num_points, batch, seed)
        if len(seen[point]) < per_point:
            seen[point].append(seed)
        seed += 1
    return [seeds[k] for k in range(per_point) for seeds in seen.values() if k < len(seeds)]


def dynamo_graphs() -> int:
    from torch._dynamo.utils import counters
    return int(counters["stats"]["unique_graphs"])


def _throughput_one(s: Settings, device: torch.device, cfg: StepConfig, flops: int | None,
                    peak: dict | None, timer: "Budget | None" = None) -> dict[str, Any]:
    free_memory(device)
    reset_peak(device)
    model = build_model(s, device, cfg.channels_last)
    step = make_step(s, model, device, s.batch, cfg)
    extra: dict[str, Any] = {}
    if cfg.compile:
        model.backbone.compile(backend=s.compile_backend)
        seeds = covering_seeds(s, model.backbone.num_mix_points, s.batch)
        graphs0, start, warm = dynamo_graphs(), time.perf_counter(), 0
        for seed in seeds:
            if timer is not None and warm and timer.left() < 20:
                break  # out of time: the timed steps then include compilations (reported below)
            step(seed)
            warm += 1
        sync(device)
        extra = {"compile_backend": s.compile_backend, "compile_warmup_steps": warm,
                 "compile_complete": warm == len(seeds),
                 "compile_and_warmup_seconds": round(time.perf_counter() - start, 2),
                 "graphs_compiled": dynamo_graphs() - graphs0}
        graphs1 = dynamo_graphs()
        # Time the steady state on the warm-up's seeds (every mixup point, evenly). Re-running a seed
        # repeats its mixup point and Beta draw, so a warm-up cut short by the budget still times only
        # compiled graphs (but not every mixup point: compile_complete is then false).
        cycle = [seeds[i % warm] for i in range(s.steps)]
        result = timed_steps(lambda i: step(cycle[i]), device, 0, s.steps)
        extra["graphs_compiled_while_timing"] = dynamo_graphs() - graphs1
    else:
        result = timed_steps(step, device, s.warmup, s.steps)
    sec = result["seconds_per_step"]
    tflops = flops / sec / 1e12 if flops else None
    row = {"config": asdict(cfg), "batch": s.batch, "images_per_s": round(s.batch / sec, 2),
           "step_ms": round(1000 * sec, 2), "tflops": round(tflops, 4) if tflops is not None else None,
           "mfu": round(tflops / peak["bf16_tflops"], 4) if (tflops is not None and peak) else None,
           "peak_memory_gb": peak_gb(device), **result, **extra}
    del model, step
    free_memory(device)
    return row


def section_throughput(s: Settings, device: torch.device, report: dict, timer: "Budget",
                       compiled: bool = False) -> dict[str, Any]:
    """The eager configurations (``compiled=False``) or the compiled one, added to report["throughput"]."""
    flops = (report.get("flops") or {}).get("step_flops")
    peak = (report.get("device") or {}).get("peak")
    section = report.get("throughput") if compiled else None
    if not isinstance(section, dict) or "rows" not in section:
        section = {"rows": {}, "mfu_basis": "bf16 dense tensor-core peak (also for the fp32 row)"}
    rows = section["rows"]
    for cfg in CONFIGS:
        if cfg.compile != compiled:
            continue
        if cfg.precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            rows[cfg.name] = {"skipped": "bf16 is not supported on this GPU"}
            continue
        try:
            rows[cfg.name] = _throughput_one(s, device, cfg, flops, peak, timer)
        except Exception as err:  # one configuration failing (e.g. compile) must not lose the others
            rows[cfg.name] = {"error": f"{type(err).__name__}: {err}"[:2000]}
            free_memory(device)
        print(f"  throughput {cfg.name}: {rows[cfg.name].get('images_per_s', rows[cfg.name])}", file=sys.stderr,
              flush=True)
    return section


def synthetic_classes(classes: int, per_class: int, size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (classes*per_class, size, size, 3) images + (N,) labels: each class a colour and a low-frequency
    pattern plus noise, so even an untrained network's features separate the classes (far above chance)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    images = np.empty((classes * per_class, size, size, 3), dtype=np.uint8)
    for c in range(classes):
        colour = rng.uniform(40, 215, size=3)
        fx, fy, phase = rng.uniform(0.5, 3.0), rng.uniform(0.5, 3.0), rng.uniform(0, 2 * np.pi)
        pattern = 40 * np.sin(2 * np.pi * (fx * xx + fy * yy) + phase)[..., None]
        noise = rng.normal(0, 25, size=(per_class, size, size, 3))
        images[c * per_class:(c + 1) * per_class] = np.clip(colour + pattern + noise, 0, 255).astype(np.uint8)
    labels = np.repeat(np.arange(classes), per_class)
    return torch.from_numpy(images), torch.from_numpy(labels)


@torch.no_grad()
def extract(model: nn.Module, x: torch.Tensor, batch: int, autocast_dtype=None, channels_last=False) -> torch.Tensor:
    """Backbone features (N, D) float32 of float images (N, 3, S, S), in eval mode, in batches."""
    out = []
    for start in range(0, len(x), batch):
        xb = x[start:start + batch]
        if channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        ctx = torch.autocast(x.device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
        with ctx:
            out.append(model(xb).float())
    return torch.cat(out)


def section_agreement(s: Settings, device: torch.device) -> dict[str, Any]:
    from s2m2.data import EvalTransform
    from s2m2.fewshot.episodes import sample_episodes
    from s2m2.fewshot.heads import evaluate_episodes
    from s2m2.fewshot.stats import mean_ci95

    images, labels = synthetic_classes(s.agree_classes, s.agree_per_class, s.stored)
    x = EvalTransform(s.eval_resize, s.crop)(images).to(device)
    backbone = build_model(s, device).backbone
    # Calibrate BatchNorm on the batch (cumulative averages): an untrained network's eval-mode statistics
    # (mean 0, var 1) would make the features of a deep WRN degenerate, and the comparison meaningless.
    for m in backbone.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    backbone.train()
    with torch.no_grad():
        for start in range(0, len(x), 100):
            backbone(x[start:start + 100])
    backbone.eval()
    f32 = extract(backbone, x, 100)
    # bf16 as training runs it on the device: autocast (+ channels_last on CUDA)
    channels_last = device.type == "cuda"
    bf_model = copy.deepcopy(backbone).to(memory_format=torch.channels_last) if channels_last else backbone
    bf16 = extract(bf_model, x, 100, torch.bfloat16, channels_last)
    cos = F.cosine_similarity(f32, bf16, dim=1)
    rel = (bf16 - f32).norm(dim=1) / f32.norm(dim=1).clamp_min(1e-12)
    episodes = sample_episodes(labels, 5, 1, 15, s.episodes, seed=0)
    acc32 = evaluate_episodes(f32, labels, episodes, head="logreg").cpu()   # fitted on the device
    acc16 = evaluate_episodes(bf16, labels, episodes, head="logreg").cpu()
    m32, ci32 = mean_ci95(acc32)
    m16, ci16 = mean_ci95(acc16)
    return {"images": len(x), "feature_dim": f32.shape[1], "cosine_min": round(float(cos.min()), 6),
            "cosine_mean": round(float(cos.mean()), 6), "rel_l2_max": round(float(rel.max()), 6),
            "rel_l2_mean": round(float(rel.mean()), 6),
            "max_abs_diff_over_max_abs": round(float((bf16 - f32).abs().max() / f32.abs().max()), 6),
            "episodes": s.episodes, "ways": 5, "shots": 1, "queries": 15, "head": "logreg",
            "acc_fp32": round(m32, 3), "ci95_fp32": round(ci32, 3), "acc_bf16": round(m16, 3),
            "ci95_bf16": round(ci16, 3), "acc_diff_points": round(m16 - m32, 3),
            "episodes_same_accuracy": round(float((acc32 == acc16).float().mean()), 4),
            "note": "untrained backbone with BatchNorm calibrated on the batch; synthetic class-structured images"}


def _make_prepared(root: Path, n: int, size: int, classes: int = 64) -> Path:
    from s2m2.data import PreparedWriter

    rng = np.random.default_rng(0)
    with PreparedWriter(root, dataset="gpu_check", source="synthetic", source_layout="synthetic",
                        resolution=size) as writer:
        split = writer.begin_split("base", num_images=n, height=size, width=size, channels=3,
                                   class_names=[str(c) for c in range(classes)])
        split.images[:] = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
        split.labels[:] = np.arange(n) % classes
        writer.end_split("base")
    return root


def section_pipeline(s: Settings, device: torch.device, report: dict) -> dict[str, Any]:
    from s2m2.data.augment import TrainAugment
    from s2m2.trainer import TrainData, epoch_permutation

    augment = TrainAugment(s.crop)
    batch, steps = s.batch, max(2, s.pipeline_images // s.batch)
    images = torch.randint(0, 256, (batch, s.stored, s.stored, 3), dtype=torch.uint8).to(device)
    for i in range(3):
        augment(images, torch.Generator().manual_seed(i))
    sync(device)
    start = time.perf_counter()
    for i in range(steps):
        augment(images, torch.Generator().manual_seed(i))
    sync(device)
    augment_only = steps * batch / (time.perf_counter() - start)

    with tempfile.TemporaryDirectory() as tmp:
        data = TrainData(_make_prepared(Path(tmp) / "p", steps * batch, s.stored), ["base"])
        order = epoch_permutation(len(data), 0, 0)

        def fetch_and_augment(i: int) -> torch.Tensor:
            rows = order[i * batch:(i + 1) * batch]
            x = data.gather(rows)
            if device.type == "cuda":
                x = x.pin_memory()
            return augment(x.to(device, non_blocking=True), torch.Generator().manual_seed(i))

        fetch_and_augment(0)
        sync(device)
        start = time.perf_counter()
        for i in range(steps):
            fetch_and_augment(i)
        sync(device)
        full_path = steps * batch / (time.perf_counter() - start)
    rows = (report.get("throughput") or {}).get("rows", {})
    speeds = [r["images_per_s"] for r in rows.values() if "images_per_s" in r]
    demand = max(speeds) if speeds else None
    return {"batch": batch, "augment_images_per_s": round(augment_only, 1),
            "gather_pin_copy_augment_images_per_s": round(full_path, 1), "step_demand_images_per_s": demand,
            "headroom_augment": round(augment_only / demand, 2) if demand else None,
            "headroom_full_path": round(full_path / demand, 2) if demand else None,
            "note": "the trainer gathers the next batch in a background thread, so the full path overlaps "
                    "the step; headroom < 1 means the input would bound training"}


def section_max_batch(s: Settings, device: torch.device, timer: "Budget") -> dict[str, Any]:
    """Doubling search from s.batch (bf16 + channels_last on CUDA, fp32 on CPU): 2 steps per batch size."""
    cfg = StepConfig("bf16+channels_last", "bf16", True) if device.type == "cuda" else StepConfig("fp32")
    tried: list[dict[str, Any]] = []
    largest, stop = None, None
    batch, last_seconds = s.batch, 0.0
    free_memory(device)
    model = build_model(s, device, cfg.channels_last)
    while True:
        if batch > s.max_batch_cap:
            stop = f"cap {s.max_batch_cap} reached"
            break
        if timer.left() < 4 * last_seconds + 10:
            stop = f"time budget ({timer.left():.0f} s left)"
            break
        reset_peak(device)
        start = time.perf_counter()
        try:
            step = make_step(s, model, device, batch, cfg)
            step(0)
            step(1)
            sync(device)
        except torch.OutOfMemoryError as err:
            tried.append({"batch": batch, "oom": True, "message": str(err).splitlines()[0][:300]})
            stop = f"out of memory at batch {batch}"
            step = None
            free_memory(device)
            break
        last_seconds = time.perf_counter() - start
        tried.append({"batch": batch, "oom": False, "peak_memory_gb": peak_gb(device),
                      "seconds_two_steps": round(last_seconds, 3)})
        largest = batch
        del step
        free_memory(device)
        batch *= 2
    del model
    free_memory(device)
    return {"config": asdict(cfg), "largest_batch": largest, "stopped": stop, "tried": tried,
            "note": "powers of two times the start batch; the true limit lies below the next size"}


# ------------------------------------------------------------------------------------------------
# DDP (>= 2 GPUs; gloo on CPU with --ddp-cpu for testing)
# ------------------------------------------------------------------------------------------------
class NoNormProbe(nn.Module):
    """conv / ReLU / avg-pool / linear, no BatchNorm: each sample's loss depends on that sample alone, so DDP
    over W ranks of B/W samples equals one device on B samples (up to float summation order)."""

    def __init__(self, width: int = 16, classes: int = 10):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
                                 nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                 nn.Flatten(), nn.Linear(width, classes))

    def forward(self, x):
        return self.net(x)


def probe_train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> None:
    """``steps`` SGD steps (lr 0.1) of the mean cross-entropy on (x (B, 3, 16, 16), y (B,))."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()


def probe_data(world: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return torch.randn(8 * world, 3, 16, 16, generator=g), torch.randint(0, 10, (8 * world,), generator=g)


def _ddp_worker(rank: int, world: int, port: int, settings: dict, out_dir: str, use_cuda: bool) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    from s2m2.trainer import init_process_group

    s = Settings(**settings)
    device = torch.device(f"cuda:{rank}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = False  # exactness check: no TF32 rounding
        torch.backends.cudnn.allow_tf32 = False
    init_process_group("nccl" if use_cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                       rank=rank, world_size=world)
    result: dict[str, Any] = {}
    try:
        # 1. equivalence: DDP on the rank's contiguous slice == one device on the global batch
        x, y = probe_data(world)
        torch.manual_seed(0)
        probe = NoNormProbe().to(device)
        reference = copy.deepcopy(probe)
        per = len(x) // world
        probe_train(DDP(probe, device_ids=[rank] if use_cuda else None),
                    x[rank * per:(rank + 1) * per].to(device), y[rank * per:(rank + 1) * per].to(device), s.ddp_steps)
        if rank == 0:
            probe_train(reference, x.to(device), y.to(device), s.ddp_steps)
            with torch.no_grad():
                diffs = [float((a - b).abs().max()) for a, b in zip(probe.parameters(), reference.parameters())]
                scale = max(float(p.abs().max()) for p in reference.parameters())
            result["equivalence"] = {"steps": s.ddp_steps, "global_batch": len(x), "max_abs_diff": max(diffs),
                                     "max_abs_param": scale, "ok": max(diffs) <= 1e-5 * max(1.0, scale)}
        if use_cuda:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        # 2. scaling: the WRN S2M2_R step, s.batch images per rank (weak scaling)
        cfg = StepConfig("bf16+channels_last", "bf16", True) if use_cuda else StepConfig("fp32")
        model = build_model(s, device, cfg.channels_last)
        # S2M2's mixup pass leaves the rotation head unused, as in the trainer
        wrapped = DDP(model, device_ids=[rank] if use_cuda else None, find_unused_parameters=True)
        step = make_step(s, model, device, s.batch, cfg, wrapped=wrapped)
        timing = timed_steps(step, device, s.warmup, s.steps)
        slowest = torch.tensor([timing["seconds_per_step"]], dtype=torch.float64, device=device)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        result["scaling"] = {"config": asdict(cfg), "per_rank_batch": s.batch,
                             "seconds_per_step": float(slowest), "images_per_s": world * s.batch / float(slowest)}
    finally:
        if rank == 0:
            Path(out_dir, "ddp.json").write_text(json.dumps(result))
        dist.destroy_process_group()


def section_ddp(s: Settings, device: torch.device, report: dict, cpu_procs: int) -> dict[str, Any]:
    import torch.multiprocessing as mp

    use_cuda = device.type == "cuda"
    world = torch.cuda.device_count() if use_cuda else cpu_procs
    if world < 2:
        return {"skipped": (f"needs >= 2 GPUs, this machine has {world}" if use_cuda else
                            "CPU: pass --ddp-cpu 2 to run the DDP section with gloo (testing)")}
    world = min(world, 8)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_ddp_worker, args=(world, port, asdict(s), tmp, use_cuda), nprocs=world, join=True)
        result = json.loads(Path(tmp, "ddp.json").read_text())
    single_name = "bf16+channels_last" if use_cuda else "fp32"
    single = (report.get("throughput") or {}).get("rows", {}).get(single_name, {})
    scaling = result["scaling"]
    if "seconds_per_step" in single:
        # weak scaling: W ranks of B images each vs one device with B
        scaling["single_device_seconds_per_step"] = single["seconds_per_step"]
        scaling["efficiency"] = round(single["seconds_per_step"] / scaling["seconds_per_step"], 4)
    return {"world": world, "backend": "nccl" if use_cuda else "gloo", **result}


# ------------------------------------------------------------------------------------------------
# Paper recipes: FLOP-based wall-time estimates
# ------------------------------------------------------------------------------------------------
# Image forward+backward passes per input image of a step (s2m2.objectives): rotation expands B -> 4B;
# exemplar trains on 4 views; S2M2 = mixup pass on B + self-supervised pass on 4 x B/4.
PASSES = {"baseline": 1, "baseline++": 1, "manifold_mixup": 1, "rotation": 4, "exemplar": 4,
          "s2m2_r": 2, "s2m2_e": 2}
PHASE1 = {"s2m2_r": "rotation", "s2m2_e": "exemplar"}
# training images per epoch (docs/data.md) and the config folder; Omniglot (Conv-4) is omitted: minutes.
RECIPE_DATA = {"mini_imagenet": 38_400, "tiered_imagenet": 448_695, "cub": 5_885, "cifar_fs": 38_400}


def recipe_estimates(peak_tflops: float = 989.4, mfus=(0.35, 0.40), methods=("rotation", "s2m2_r", "s2m2_e",
                     "manifold_mixup", "baseline++")) -> list[dict[str, Any]]:
    """Hours per paper recipe (configs/<dataset>/<method>.yaml) on one GPU of ``peak_tflops`` bf16 at each MFU.

    FLOPs = sum over phases of epochs x images per epoch x passes per image x FLOPs of one image fwd+bwd at
    the config's crop (counted on the meta device). Validation, checkpoints and early stopping are left out.
    """
    from s2m2.config import load_config

    rows, per_image = [], {}
    for dataset, images in RECIPE_DATA.items():
        for method in methods:
            config = load_config(REPO / "configs" / dataset / f"{method}.yaml", [])
            crop = config.data.crop_size
            if crop not in per_image:
                s = Settings(device="meta", quick=False, backbone=config.model.backbone,
                             backbone_kwargs=dict(config.model.backbone_kwargs), crop=crop)
                per_image[crop] = image_flops(s, crop)
            phases = [(method, config.schedule.epochs)]
            if method in PHASE1 and config.schedule.phase1_epochs:
                phases.insert(0, (PHASE1[method], config.schedule.phase1_epochs))
            total = sum(epochs * images * PASSES[m] * per_image[crop] for m, epochs in phases)
            rows.append({"dataset": dataset, "method": method, "crop": crop,
                         "epochs": " + ".join(str(e) for _, e in phases), "images_per_epoch": images,
                         "image_fwd_bwd_gflop": round(per_image[crop] / 1e9, 2), "total_pflop": round(total / 1e15),
                         **{f"hours_at_mfu_{m:.2f}": round(total / (m * peak_tflops * 1e12) / 3600, 1) for m in mfus}})
    return rows


def recipes_markdown(rows: list[dict[str, Any]]) -> str:
    mfu_keys = [k for k in rows[0] if k.startswith("hours_at_mfu_")]
    head = ["dataset", "method", "crop", "epochs (phase 1 + 2)", "images/epoch", "GFLOP/image fwd+bwd",
            "total PFLOP"] + [f"hours @ {float(k.rsplit('_', 1)[1]):.0%} MFU" for k in mfu_keys]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["dataset"], r["method"], r["crop"], r["epochs"], f"{r['images_per_epoch']:,}",
                 r["image_fwd_bwd_gflop"], f"{r['total_pflop']:,}"] + [r[k] for k in mfu_keys]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------
class Budget:
    def __init__(self, seconds: float):
        self.start, self.seconds = time.perf_counter(), seconds

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.seconds - self.elapsed()


def _fmt(value, digits=1, suffix=""):
    if value is None:
        return "n/a"
    return f"{value:,.{digits}f}{suffix}"


def markdown(report: dict[str, Any]) -> str:
    """The report as a Markdown subsection (appended under DOCS_HEADING in docs/benchmarks.md)."""
    dev = report.get("device") or {}
    peak = dev.get("peak")
    out = [f"### {dev.get('name', '?')} — {report['date']} ({'quick' if report['settings']['quick'] else 'full'} run, "
           f"{report['seconds']:.0f} s)", "",
           f"torch {dev.get('torch')}, CUDA {dev.get('cuda', '-')}, cuDNN {dev.get('cudnn', '-')}, "
           f"{dev.get('gpu_count', 0)} GPU(s), {dev.get('memory_gb', '-')} GiB; peak used for MFU: "
           f"{(peak['label'] + ' ' + str(peak['bf16_tflops']) + ' TFLOP/s bf16 dense') if peak else 'unknown (MFU n/a)'}. "
           f"Command: `python scripts/gpu_check.py {report['argv']}`.", ""]
    s = report["settings"]
    fl = report.get("flops") or {}
    out += [f"{s['backbone']} S2M2_R step at {s['crop']} px, batch {s['batch']} "
            f"({_fmt(fl.get('step_flops', 0) / 1e9 if fl.get('step_flops') else None, 1)} GFLOP per step; "
            f"{_fmt(fl.get('image_fwd_bwd_flops', 0) / 1e9 if fl.get('image_fwd_bwd_flops') else None, 1)} GFLOP "
            f"per image fwd+bwd):", "",
            "| configuration | images/s | step (ms) | TFLOP/s | MFU | peak memory (GiB) |", "|---|---|---|---|---|---|"]
    for name, row in ((report.get("throughput") or {}).get("rows") or {}).items():
        if "images_per_s" in row:
            out.append(f"| {name} | {_fmt(row['images_per_s'])} | {_fmt(row['step_ms'])} | {_fmt(row['tflops'], 2)} | "
                       f"{_fmt(100 * row['mfu'] if row['mfu'] is not None else None, 1, '%')} | "
                       f"{_fmt(row['peak_memory_gb'], 2)} |")
        else:
            out.append(f"| {name} | {row.get('skipped') or row.get('error', '?')[:120]} | | | | |")
    out.append("")
    facts = []
    ag = report.get("agreement") or {}
    if "cosine_min" in ag:
        facts.append(f"bf16 vs fp32 features ({ag['images']} images): cosine min {ag['cosine_min']:.5f} / mean "
                     f"{ag['cosine_mean']:.5f}, relative L2 max {ag['rel_l2_max']:.4f}; {ag['episodes']} 5-way 1-shot "
                     f"episodes (logreg): fp32 {ag['acc_fp32']:.2f} ± {ag['ci95_fp32']:.2f}%, bf16 {ag['acc_bf16']:.2f} ± "
                     f"{ag['ci95_bf16']:.2f}% ({ag['acc_diff_points']:+.2f} points; "
                     f"{100 * ag['episodes_same_accuracy']:.1f}% of episodes identical)")
    pl = report.get("pipeline") or {}
    if "augment_images_per_s" in pl:
        facts.append(f"input pipeline: augmentation from uint8 on the device {_fmt(pl['augment_images_per_s'], 0)} "
                     f"images/s, gather + pin + copy + augment {_fmt(pl['gather_pin_copy_augment_images_per_s'], 0)} "
                     f"images/s, vs the fastest step's {_fmt(pl['step_demand_images_per_s'], 0)} images/s "
                     f"(headroom {pl['headroom_augment']}x / {pl['headroom_full_path']}x)")
    mb = report.get("max_batch") or {}
    if "tried" in mb:
        last = next((t for t in reversed(mb["tried"]) if not t["oom"]), {})
        facts.append(f"largest batch that fits ({mb['config']['name']}): {mb['largest_batch']} "
                     f"(peak {_fmt(last.get('peak_memory_gb'), 1)} GiB; stopped: {mb['stopped']})")
    dd = report.get("ddp") or {}
    if "skipped" in dd:
        facts.append(f"DDP: skipped ({dd['skipped']})")
    elif "equivalence" in dd:
        eq, sc = dd["equivalence"], dd["scaling"]
        facts.append(f"DDP ({dd['backend']}, {dd['world']} ranks): BatchNorm-free probe max |diff| vs one device "
                     f"{eq['max_abs_diff']:.2e} ({'ok' if eq['ok'] else 'MISMATCH'}); WRN step "
                     f"{_fmt(sc['images_per_s'], 0)} images/s at {sc['per_rank_batch']}/rank, scaling efficiency "
                     f"{_fmt(100 * sc['efficiency'] if sc.get('efficiency') is not None else None, 1, '%')}")
    for name in ("flops", "throughput", "agreement", "pipeline", "max_batch", "ddp"):
        err = (report.get(name) or {}).get("error")
        if err:
            facts.append(f"{name}: ERROR {err.splitlines()[0][:200]}")
    out += [f"- {f}" for f in facts] + [""]
    return "\n".join(out)


def append_docs(path: Path, text: str) -> None:
    """Append ``text`` under DOCS_HEADING at the end of ``path`` (the heading is added once)."""
    current = path.read_text() if path.exists() else ""
    if DOCS_HEADING not in current:
        current = current.rstrip("\n") + f"\n\n{DOCS_HEADING}\n\n"
    path.write_text(current.rstrip("\n") + "\n\n" + text.rstrip("\n") + "\n")


def run_section(report: dict, name: str, fn: Callable[[], dict], timer: Budget, out: Path | None,
                min_seconds: float = 0.0) -> None:
    if timer.left() < min_seconds:
        report[name] = {"skipped": f"time budget ({timer.left():.0f} s left)"}
    else:
        start = time.perf_counter()
        try:
            report[name] = fn()
        except Exception as err:
            report[name] = {"error": f"{type(err).__name__}: {err}\n{traceback.format_exc()[-3000:]}"}
        report[name]["section_seconds"] = round(time.perf_counter() - start, 2)
    print(f"gpu_check: {name} done ({report[name].get('section_seconds', 0):.1f} s)"
          f"{' ERROR ' + report[name]['error'].splitlines()[0] if 'error' in report[name] else ''}",
          file=sys.stderr, flush=True)
    if out:
        report["seconds"] = round(timer.elapsed(), 1)
        out.write_text(json.dumps(report, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    parser.add_argument("--quick", action="store_true", help="tiny backbone/batch/steps (CPU smoke test)")
    parser.add_argument("--out", default=None, help="JSON report path (rewritten after every section)")
    parser.add_argument("--append-docs", nargs="?", const=str(REPO / "docs" / "benchmarks.md"), default=None,
                        metavar="MD", help=f"append the Markdown table under '{DOCS_HEADING}' (default file: "
                                           f"docs/benchmarks.md)")
    parser.add_argument("--budget-s", type=float, default=None, help="soft time limit (default 285, quick 120)")
    parser.add_argument("--ddp-cpu", type=int, default=0, metavar="N",
                        help="on CPU: run the DDP section with N gloo processes (testing)")
    parser.add_argument("--skip", nargs="*", default=[],
                        choices=["throughput", "agreement", "pipeline", "max_batch", "ddp", "compile"])
    parser.add_argument("--estimate-recipes", action="store_true",
                        help="print the FLOP-based wall time of each paper recipe on one H100 and exit")
    args = parser.parse_args(argv)

    if args.estimate_recipes:
        rows = recipe_estimates()
        print(recipes_markdown(rows))
        if args.out:
            Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")
        return 0

    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            print("gpu_check: CUDA is not available (use --device cpu --quick for the CPU smoke run)",
                  file=sys.stderr)
            return 2
        if device.index is None:
            device = torch.device("cuda:0")
        torch.cuda.set_device(device)
    s = settings_for(args.device, args.quick)
    if args.budget_s:
        s.budget_s = args.budget_s
    timer = Budget(s.budget_s)
    out = Path(args.out) if args.out else None
    report: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "argv": " ".join(argv),
                              "settings": asdict(s)}
    run_section(report, "device", lambda: section_device(s, device), timer, out)
    run_section(report, "flops", lambda: section_flops(s, device), timer, out)
    # Cheapest and most needed first; compilation (minutes with inductor) last, with what time is left.
    todo = [("throughput", "throughput", lambda: section_throughput(s, device, report, timer), 60),
            ("agreement", "agreement", lambda: section_agreement(s, device), 15),
            ("pipeline", "pipeline", lambda: section_pipeline(s, device, report), 10),
            ("max_batch", "max_batch", lambda: section_max_batch(s, device, timer), 15),
            ("ddp", "ddp", lambda: section_ddp(s, device, report, args.ddp_cpu), 30),
            ("compile", "throughput", lambda: section_throughput(s, device, report, timer, compiled=True), 60)]
    for name, key, fn, min_seconds in todo:
        if name in args.skip:
            if key == name:
                report[name] = {"skipped": "--skip"}
            continue
        if key != name:  # the compiled row joins the throughput table
            before = report.get(key)
            run_section(report, key, fn, timer, out, min_seconds=0 if s.quick else min_seconds)
            if "skipped" in report[key] and isinstance(before, dict) and "rows" in before:
                before["rows"]["bf16+channels_last+compile"] = {"skipped": report[key]["skipped"]}
                report[key] = before
            continue
        run_section(report, name, fn, timer, out, min_seconds=0 if s.quick else min_seconds)
    report["seconds"] = round(timer.elapsed(), 1)
    if out:
        out.write_text(json.dumps(report, indent=2) + "\n")
    text = markdown(report)
    print(text)
    if args.append_docs:
        append_docs(Path(args.append_docs), text)
    errors = [name for name in report if isinstance(report[name], dict) and "error" in report[name]]
    if errors:
        print(f"gpu_check: sections with errors: {errors}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
