"""Paired timing of CPU training steps from a real checkpoint with denormal flushing on and off.

    .venv/bin/python scripts/bench_denormals.py CHECKPOINT [--rounds 3] [--steps 10] [--batch 64]

CHECKPOINT is a training checkpoint (``last.pt`` / ``best.pt`` of an ``s2m2 train`` run). Its model is built
from the recorded config, the weights and the optimizer state (Adam moments included) are loaded, and
``--steps`` cross-entropy steps on random images (the batch of the run's crop size) are timed, in a fresh
process per timing: ``torch.set_flush_denormal`` reaches every intra-op thread only when it is set before
the process's first parallel operation (s2m2.trainer.set_flush_denormal). The two settings alternate, the
order swapping every round; the minimum per setting is printed with the ratio.

Also prints how many stored values (weights and optimizer moments) are denormal: weight decay drives the
dead channels' weights and Adam moments through that range, and each operation on a denormal costs x86
cores a microcode assist.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch


def count_denormals(payload: dict) -> tuple[int, int]:
    """(denormal values, all floating-point values) in the checkpoint's model and optimizer states."""
    tiny = torch.finfo(torch.float32).tiny
    counts = [0, 0]

    def walk(obj):
        if isinstance(obj, dict):
            for value in obj.values():
                walk(value)
        elif isinstance(obj, (list, tuple)):
            for value in obj:
                walk(value)
        elif torch.is_tensor(obj) and obj.dtype == torch.float32:
            counts[0] += int(((obj != 0) & (obj.abs() < tiny)).sum())
            counts[1] += obj.numel()

    walk(payload["state"])
    walk(payload["optimizer"])
    return counts[0], counts[1]


def time_steps(checkpoint: str, flush: bool, steps: int, batch: int) -> float:
    """Milliseconds per image of ``steps`` training steps from ``checkpoint`` (after 3 warm-up steps)."""
    from s2m2.config import config_from_dict
    from s2m2.trainer import build_model, build_optimizer, load_payload, set_flush_denormal

    status = set_flush_denormal(flush)  # first: before any parallel operation of this process
    assert status == ("on" if flush else "off"), status
    payload = load_payload(checkpoint)
    config = config_from_dict(payload["config"])
    num_classes = payload["heads"]["classifier"]["kwargs"]["num_classes"]
    method = "rotation" if "ss_head" in payload["heads"] else payload["method"]
    model, _ = build_model(config, num_classes, method)
    for name, state in payload["state"].items():
        getattr(model, name).load_state_dict(state)
    optimizer = build_optimizer(config, model)
    optimizer.load_state_dict(payload["optimizer"])
    model.train().to(memory_format=torch.channels_last)
    gen = torch.Generator().manual_seed(0)
    size = config.data.crop_size
    images = torch.randn(batch, 3, size, size, generator=gen).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, num_classes, (batch,), generator=gen)

    def step():
        optimizer.zero_grad(set_to_none=True)
        _, logits, _ = model(images)
        torch.nn.functional.cross_entropy(logits, labels).backward()
        optimizer.step()

    for _ in range(3):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return 1000 * (time.perf_counter() - start) / (steps * batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--child", choices=("on", "off"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(time_steps(args.checkpoint, args.child == "on", args.steps, args.batch)))
        return

    from s2m2.trainer import load_payload
    payload = load_payload(args.checkpoint)
    denormal, total = count_denormals(payload)
    print(f"{args.checkpoint}: epoch {payload['epoch']}, {denormal:,} of {total:,} stored float32 values "
          f"are denormal ({100 * denormal / total:.2f}%); {torch.get_num_threads()} threads, batch {args.batch}")
    times: dict[str, list[float]] = {"on": [], "off": []}
    for r in range(args.rounds):
        for setting in (("off", "on") if r % 2 == 0 else ("on", "off")):
            out = subprocess.run([sys.executable, __file__, args.checkpoint, "--child", setting,
                                  "--steps", str(args.steps), "--batch", str(args.batch)],
                                 check=True, capture_output=True, text=True).stdout
            times[setting].append(json.loads(out.strip().splitlines()[-1]))
            print(f"  round {r + 1}, flush {setting:3s}: {times[setting][-1]:.3f} ms/img", flush=True)
    best = {k: min(v) for k, v in times.items()}
    print(f"flush_denormal off {best['off']:.3f} ms/img, on {best['on']:.3f} ms/img (min of {args.rounds}): "
          f"off costs {best['off'] / best['on']:.2f}x")


if __name__ == "__main__":
    main()
