"""``s2m2 train``: train a backbone with one of the methods (S2M2 recipe and its ablations).

    s2m2 train --config configs/mini_imagenet/s2m2_r.yaml --set data.root=data/mini-imagenet
    s2m2 train --config FILE --resume auto --out checkpoints/mini_s2m2r      # continue where it stopped
    torchrun --nproc_per_node 4 -m s2m2.cli train --config FILE         # DDP (see docs/training.md)
    torchrun --standalone --nproc_per_node 4 --max-restarts 3 -m s2m2.cli train --config FILE --out DIR
                                              # pre-emptible: restarted workers resume from DIR/last.pt

Elastic restarts: torchrun sets TORCHELASTIC_RESTART_COUNT in every worker; when it is > 0 (the group was
restarted after a worker failed) and no --resume was given, the run behaves as ``--resume auto``.

Exit status: 0 on success (finished, early-stopped or stopped at schedule.max_steps), 1 when the loss
diverged (the last good checkpoint is kept), 2 on a bad config, data or checkpoint.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from s2m2.config import ConfigError, load_config
from s2m2.checkpoint import CheckpointError
from s2m2.data import PreparedDataError
from s2m2.cli import CommandParser


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="s2m2 train", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config, e.g. configs/mini_imagenet/s2m2_r.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value (YAML-parsed); repeatable")
    parser.add_argument("--resume", default=None, metavar="PATH|auto",
                        help="continue from a checkpoint (auto: OUT/last.pt if it exists, else start fresh)")
    parser.add_argument("--out", default=None, help="output folder (default: runtime.out_dir)")
    return parser


def elastic_resume(resume: str | None, environ=None) -> str | None:
    """The --resume value to use: ``"auto"`` in a worker that torchrun restarted, else ``resume`` unchanged.

    torchrun (torch.distributed.elastic) restarts the whole worker group when one worker dies and tells the
    new workers how many restarts happened in TORCHELASTIC_RESTART_COUNT (0 in the first attempt). Without
    this, a restarted group would start from scratch (and, worse, overwrite OUT/last.pt); with it the
    command line needs no change between attempts. An explicit --resume always wins.
    """
    environ = os.environ if environ is None else environ
    try:
        restarts = int(environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    except ValueError:
        restarts = 0
    if resume is None and restarts > 0:
        if environ.get("RANK", "0") == "0":
            print(f"s2m2 train: torchrun restart {restarts}: resuming from OUT/last.pt (as --resume auto)",
                  file=sys.stderr, flush=True)
        return "auto"
    return resume


def check_ranks_agree(trainer) -> None:
    """Under DDP, stop with an error if the ranks did not load the same checkpoint.

    Every rank resolves ``--resume auto`` on its own; on several nodes without a shared OUT folder, rank 0
    would resume while the others start fresh, and the ranks would then run different numbers of steps and
    hang in a collective. One all-gather of (phase, epoch, step) at start turns that into an error.
    """
    import torch
    import torch.distributed as dist
    from s2m2.trainer import TrainingError

    if not trainer.rt.distributed:
        return
    mine = torch.tensor([trainer.phase_index, trainer.epoch, trainer.step], dtype=torch.int64)
    if trainer.rt.device.type == "cuda":
        mine = mine.to(trainer.rt.device)
    gathered = [torch.zeros_like(mine) for _ in range(trainer.rt.world)]
    dist.all_gather(gathered, mine)
    states = [tuple(int(v) for v in g.tolist()) for g in gathered]
    if len(set(states)) > 1:
        raise TrainingError(
            f"the ranks start from different points (phase index, epoch, step per rank: {states}); every rank "
            f"must see the same OUT/last.pt -- put --out on a filesystem shared by all nodes")


def _fit(config, resume: str | None) -> tuple[dict, bool]:
    """Train; return (run summary, whether this is the main rank). The Trainer -- and with it the DDP
    wrapper, which holds the process group -- lives only in this frame, so ``_end_distributed`` can free
    the group once it returns."""
    from s2m2.trainer import Trainer

    trainer = Trainer(config, config.runtime.out_dir, resume=resume)
    check_ranks_agree(trainer)
    summary = trainer.fit()
    if trainer.rt.distributed:
        # Every rank done before any tears its process group down, so no rank exits while a peer still
        # waits on it in a collective.
        import torch.distributed as dist
        dist.barrier()
    return summary, trainer.rt.is_main


def _end_distributed() -> None:
    """Free the process group -- and with it gloo's worker threads -- before the interpreter shuts down.

    A gloo worker thread that drops the last reference to a finished collective's tensors takes the GIL to
    do it; if that happens while the interpreter is finalizing, Python ends the thread with pthread_exit,
    which unwinds through a noexcept C++ frame: "terminate called without an active exception" and SIGABRT
    in a worker whose run had finished (3-5 of 20 two-process CPU runs under load, before this; gdb:
    ProcessGroupGloo::runLoop -> ~AsyncBarrierWork -> decref -> take_gil -> PyThread_exit_thread). Once
    nothing holds the group (``_fit`` has returned, so the Trainer and its DDP wrapper are gone, and
    s2m2.trainer.init_process_group keeps torch._dynamo from holding it), ``destroy_process_group`` drops the
    last reference and the group's destructor joins the threads here, with the GIL released.
    """
    import gc
    import torch.distributed as dist

    if dist.is_initialized():
        gc.collect()  # in case reference cycles through the Trainer still hold the DDP wrapper
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from s2m2.trainer import TrainingDiverged, TrainingError

    resume = elastic_resume(args.resume)
    try:
        config = load_config(args.config, args.overrides)
        if args.out:
            config.runtime.out_dir = args.out
        summary, is_main = _fit(config, resume)
    except TrainingDiverged as err:
        print(f"s2m2 train: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as err:
        # s2m2.cli prints the one line; say what survives: the last complete epoch, resumable.
        out = Path(config.runtime.out_dir) if "config" in locals() else None
        last = out / "last.pt" if out is not None else None
        if last is not None and last.is_file():
            err.kept = f"kept {last} (the last complete epoch); continue with --resume auto --out {out}"
        raise
    except (ConfigError, TrainingError, PreparedDataError, CheckpointError) as err:
        print(f"s2m2 train: error: {err}", file=sys.stderr)
        return 2
    finally:
        _end_distributed()
    if is_main:
        best = summary["best"]
        best_text = (f"best val {best['val_acc']:.2f} +- {best['val_ci95']:.2f}% at epoch {best['epoch']}"
                     if best else "no validation")
        print(f"s2m2 train: {summary['stopped']} after {summary['epochs']} epochs / {summary['steps']} steps; "
              f"{best_text}; outputs in {summary['out_dir']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
