"""``s2m2 train``: train a backbone with one of the methods (S2M2 recipe and its ablations).

    s2m2 train --config configs/mini_imagenet/s2m2_r.yaml --set data.root=data/mini-imagenet
    s2m2 train --config FILE --resume auto --out checkpoints/mini_s2m2r      # continue where it stopped
    torchrun --nproc_per_node 4 -m s2m2.cli train --config FILE         # DDP (see docs/training.md)

Exit status: 0 on success (finished, early-stopped or stopped at schedule.max_steps), 1 when the loss
diverged (the last good checkpoint is kept), 2 on a bad config, data or checkpoint.
"""

from __future__ import annotations

import argparse
import sys

from s2m2.config import ConfigError, load_config
from s2m2.checkpoint import CheckpointError
from s2m2.data import PreparedDataError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="s2m2 train", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config, e.g. configs/mini_imagenet/s2m2_r.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value (YAML-parsed); repeatable")
    parser.add_argument("--resume", default=None, metavar="PATH|auto",
                        help="continue from a checkpoint (auto: OUT/last.pt if it exists, else start fresh)")
    parser.add_argument("--out", default=None, help="output folder (default: runtime.out_dir)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from s2m2.trainer import Trainer, TrainingDiverged, TrainingError

    try:
        config = load_config(args.config, args.overrides)
        if args.out:
            config.runtime.out_dir = args.out
        trainer = Trainer(config, config.runtime.out_dir, resume=args.resume)
        summary = trainer.fit()
    except TrainingDiverged as err:
        print(f"s2m2 train: {err}", file=sys.stderr)
        return 1
    except (ConfigError, TrainingError, PreparedDataError, CheckpointError) as err:
        print(f"s2m2 train: error: {err}", file=sys.stderr)
        return 2
    finally:
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()
    if trainer.rt.is_main:
        best = summary["best"]
        best_text = (f"best val {best['val_acc']:.2f} +- {best['val_ci95']:.2f}% at epoch {best['epoch']}"
                     if best else "no validation")
        print(f"s2m2 train: {summary['stopped']} after {summary['epochs']} epochs / {summary['steps']} steps; "
              f"{best_text}; outputs in {summary['out_dir']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
