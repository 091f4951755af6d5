"""What makes two training runs give the same numbers: train a few steps, print a hash of the weights.

    python scripts/check_determinism.py --data data/omniglot --threads 1
    python scripts/check_determinism.py --data data/omniglot --threads 2
    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 python scripts/check_determinism.py --data data/omniglot --threads 1

Every random draw of a run is seeded from the config, so on one machine the same command gives the same
hash every time. The float arithmetic is not fixed by the seed, though: the kernels PyTorch and oneDNN pick
depend on the CPU's instruction set (AVX2, AVX-512, AMX) and the number of threads (how reductions are
split), and each choice rounds differently. Compare hashes across thread counts, ISA pins and machines to
see which of them a result depends on (docs/training.md, "Reproducibility", has the measured answers).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def weights_hash(state: dict) -> str:
    """sha256 over the backbone's tensors, in name order (bit-level: any rounding difference changes it)."""
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="a prepared Omniglot folder (s2m2 prepare omniglot ...)")
    parser.add_argument("--config", default=str(REPO / "configs" / "omniglot" / "budget" / "s2m2_r.yaml"))
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args(argv)

    import torch
    from s2m2.config import load_config
    from s2m2.trainer import Trainer

    torch.set_num_threads(args.threads)
    config = load_config(args.config, [
        f"data.root={args.data}", "schedule.budget_minutes=null", f"schedule.max_steps={args.steps}",
        "schedule.phase1_epochs=1", "schedule.epochs=1", "schedule.lr_schedule=constant",
        "validation.enabled=false", "runtime.tensorboard=false", "runtime.plots=false", "runtime.progress=false"])
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(config, out_dir=out)
        trainer.fit()
        state = trainer.model.backbone.state_dict()
    print(f"threads={args.threads} cpu_capability={torch.backends.cpu.get_cpu_capability()} "
          f"ONEDNN_MAX_CPU_ISA={os.environ.get('ONEDNN_MAX_CPU_ISA', '-')} "
          f"ATEN_CPU_CAPABILITY={os.environ.get('ATEN_CPU_CAPABILITY', '-')} "
          f"steps={args.steps} weights={weights_hash(state)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
