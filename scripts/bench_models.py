"""Model benchmark (fp32, CPU): our WRN-28-10 vs an independent functional re-implementation of the
release's forward (tests/release_reference.py), and per-backbone training steps. Variants are timed
interleaved in one run after a warm-up; the minimum over rounds is reported.

    .venv/bin/python scripts/bench_models.py
"""
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from s2m2.models import create_backbone, MixSpec
from s2m2.checkpoint import export_release_checkpoint, load_backbone, release_state_dict
from release_reference import release_wrn_features

def interleaved(variants, rounds):
    """{name: fn} -> {name: min seconds}, alternating the order every round."""
    for fn in variants.values():
        fn()  # warm-up (oneDNN primitive creation, allocator)
    times = {name: [] for name in variants}
    items = list(variants.items())
    for r in range(rounds):
        for name, fn in (items if r % 2 == 0 else items[::-1]):
            t = time.perf_counter(); fn(); times[name].append(time.perf_counter() - t)
    return {name: min(v) for name, v in times.items()}

torch.manual_seed(0)
wrn = create_backbone("wrn28_10").eval()
state = release_state_dict(wrn)
x = torch.randn(8, 3, 32, 32)
with torch.no_grad():
    t = interleaved({"ours": lambda: wrn(x), "reference": lambda: release_wrn_features(state, x)}, 12)
print(f"WRN-28-10 eval forward 8x32x32 (min of 12): ours {t['ours']:.2f}s, functional reference {t['reference']:.2f}s, "
      f"ratio {t['ours'] / t['reference']:.2f}")

x16 = torch.randn(16, 3, 80, 80)
wrn_cl = create_backbone("wrn28_10").train().to(memory_format=torch.channels_last)
wrn.train()
perm = torch.randperm(16)
def step(model, inp):
    model.zero_grad(set_to_none=True)
    model(inp, MixSpec(2, 0.4, perm)).square().mean().backward()
x16_cl = x16.contiguous(memory_format=torch.channels_last)
t = interleaved({"contiguous": lambda: step(wrn, x16), "channels_last": lambda: step(wrn_cl, x16_cl)}, 2)
print(f"WRN-28-10 train fwd+bwd (mixup at block2) 16x80x80: contiguous {t['contiguous']:.2f}s "
      f"({16 / t['contiguous']:.2f} img/s), channels_last {t['channels_last']:.2f}s "
      f"(ratio {t['channels_last'] / t['contiguous']:.2f})")

wrn.eval()
release_file = Path(tempfile.mkdtemp()) / "470.tar"
export_release_checkpoint(wrn, release_file, kind="mixup", epoch=470)
t = interleaved({"load": lambda: load_backbone(release_file)}, 2)
print(f"load_backbone(release-format WRN-28-10, 146 MB, incl. sha256 fingerprint): {t['load']:.2f}s")
for name, kw, size in [("resnet12", {}, 80), ("resnet18", {}, 32), ("conv4", {}, 80), ("wrn", {"depth": 16, "widen": 4}, 32)]:
    m = create_backbone(name, **kw).train(); xb = torch.randn(64, 3, size, size)
    t = interleaved({"s": lambda: m(xb).square().mean().backward()}, 2)["s"]
    print(f"{name} {kw} train fwd+bwd 64x{size}x{size}: {t:.2f}s = {64 / t:.0f} img/s")
