"""Model benchmark (fp32, CPU): our WRN-28-10 vs an independent functional re-implementation of the
release's forward (tests/release_reference.py), per-backbone training steps, and the Conv-4 budget recipes'
memory layout (contiguous vs channels_last, a full Adam step at batch 64) and the CIFAR-FS budget recipes'
Conv-4 width schedules (per-block widths at 32 px) and block order (conv-BN-ReLU-pool vs pool first). Variants are timed interleaved in one run after a
warm-up; the minimum over rounds is reported.

    .venv/bin/python scripts/bench_models.py [--only conv4-layout | --only conv4-widths | --only conv4-order]
"""
import argparse
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


def conv4_adam_run(x, y, steps: int, channels_last: bool = True, **backbone_kwargs):
    """A fresh Conv-4 (seed 0) + a 64-way linear head -> (model, a function running ``steps`` Adam steps on
    (x, y)), in channels_last memory format unless told otherwise."""
    import torch.nn.functional as F
    torch.manual_seed(0)
    model = create_backbone("conv4", **backbone_kwargs).train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    head = torch.nn.Linear(model.feature_dim, 64)
    opt = torch.optim.Adam([*model.parameters(), *head.parameters()], 1e-3)

    def run():
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(head(model(x)), y).backward()
            opt.step()
    return model, run


def conv4_layout(rounds: int = 5, steps: int = 30) -> None:
    """Conv-4 (64 ch) training step, batch 64, at the budget recipes' sizes: contiguous vs channels_last."""
    for size, kwargs in ((28, {}), (32, {"pool": "flatten", "input_size": 32})):
        x = torch.randn(64, 3, size, size)
        y = torch.randint(0, 64, (64,))
        variants = {layout: conv4_adam_run(x, y, steps, channels_last=layout == "channels_last", **kwargs)[1]
                    for layout in ("contiguous", "channels_last")}
        t = interleaved(variants, rounds)
        ms = {k: 1000 * v / (steps * 64) for k, v in t.items()}
        print(f"Conv-4 {kwargs or 'avg'} train step (Adam) 64x{size}x{size}, {torch.get_num_threads()} threads "
              f"(min of {rounds}): contiguous {ms['contiguous']:.3f} ms/img, channels_last "
              f"{ms['channels_last']:.3f} ms/img (ratio {ms['channels_last'] / ms['contiguous']:.2f})")


# The Conv-4 width schedules tried by the CIFAR-FS budget recipes (docs/training.md, "Width where it is cheap").
CONV4_WIDTHS = {"64 (ablation)": 64, "96": 96, "48-96-192-384 (best recipe)": [48, 96, 192, 384],
                "32-64-192-512": [32, 64, 192, 512], "32-64-128-256": [32, 64, 128, 256],
                "64-128-256-512": [64, 128, 256, 512], "96-192-384-512 (R2D2's)": [96, 192, 384, 512]}


def conv4_widths(rounds: int = 4, steps: int = 20) -> None:
    """Adam training step, batch 64, 32 px, flatten features, channels_last: ms per image for each schedule, and
    the forward FLOPs per image (torch.utils.flop_counter: convolutions and matmuls)."""
    from torch.utils.flop_counter import FlopCounterMode
    x = torch.randn(64, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 64, (64,))
    variants, sizes = {}, {}
    for name, width in CONV4_WIDTHS.items():
        model, variants[name] = conv4_adam_run(x, y, steps, width=width, pool="flatten", input_size=32)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x[:1])
        sizes[name] = (sum(p.numel() for p in model.parameters()), model.feature_dim, counter.get_total_flops())
    t = interleaved(variants, rounds)
    base = t["64 (ablation)"]
    print(f"Conv-4 width schedules, Adam step 64x32x32, flatten, channels_last, {torch.get_num_threads()} threads "
          f"(min of {rounds}):")
    for name, seconds in t.items():
        params, dim, flops = sizes[name]
        ms = 1000 * seconds / (steps * 64)
        print(f"  {name:28s} {params / 1e6:5.2f} M params, {dim:5d}-d features, {flops / 1e6:6.1f} MFLOP/img "
              f"forward: {ms:.3f} ms/img "
              f"({1000 / ms:,.0f} img/s, {seconds / base:.2f}x width 64)")


def conv4_order(rounds: int = 5, steps: int = 20) -> None:
    """Adam training step, channels_last, at the budget recipes' shapes: classic blocks (conv-BN-ReLU-pool)
    vs ``pool_first`` (conv-pool-BN-ReLU, BatchNorm and ReLU on a quarter of the elements). Batch 96 at
    28 px is the demo's S2M2_R phase-2 step (64 mixed + 8 x 4 rotated images)."""
    flat32 = {"pool": "flatten", "input_size": 32}
    shapes = {"Omniglot demo, width 64, 96x28x28": (64, 96, 28, {}),
              **{f"CIFAR-FS {'-'.join(map(str, w))} flatten, 64x32x32": (w, 64, 32, flat32)
                 for w in ([48, 96, 192, 384], [48, 96, 256, 512], [64, 128, 256, 512])}}
    for label, (width, batch, size, kwargs) in shapes.items():
        x = torch.randn(batch, 3, size, size)
        y = torch.randint(0, 64, (batch,))
        variants = {pool_first: conv4_adam_run(x, y, steps, width=width, pool_first=pool_first, **kwargs)[1]
                    for pool_first in (False, True)}
        t = interleaved(variants, rounds)
        ms = {k: 1000 * v / (steps * batch) for k, v in t.items()}
        print(f"Conv-4 block order, {label}, Adam step, channels_last, {torch.get_num_threads()} threads "
              f"(min of {rounds}): conv-BN-ReLU-pool {ms[False]:.3f} ms/img, pool_first {ms[True]:.3f} ms/img "
              f"({ms[False] / ms[True]:.2f}x faster)")


def wrn_and_backbones() -> None:
    """WRN-28-10 against the release's forward, its memory layouts and checkpoint loading; other backbones'
    training steps."""
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


SECTIONS = {"conv4-layout": conv4_layout, "conv4-widths": conv4_widths, "conv4-order": conv4_order}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=list(SECTIONS), help="run one section")
    only = parser.parse_args().only
    if only:
        SECTIONS[only]()
        return
    wrn_and_backbones()
    for section in SECTIONS.values():
        section()


if __name__ == "__main__":
    main()
