"""`s2m2` command line: one sub-command per user task, each implemented by its module's ``main(argv)``.

    s2m2 prepare DATASET --source PATH --out DIR     data_prep.cli
    s2m2 train --config FILE [--set key=value ...]   s2m2.train
    s2m2 features --checkpoint CKPT --data DIR ...   s2m2.features
    s2m2 evaluate --features FILE --ways 5 ...       s2m2.evaluate
    s2m2 cross-domain --checkpoint CKPT --cub DIR    s2m2.cross_domain

Sub-command modules are imported only when used, so ``s2m2 --help`` is instant.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "prepare": ("data_prep.cli", "prepare a dataset from the files you downloaded"),
    "train": ("s2m2.train", "train a backbone (S2M2 recipe and ablations)"),
    "features": ("s2m2.features", "extract (and cache) frozen features of a split"),
    "evaluate": ("s2m2.evaluate", "N-way K-shot episodes on cached features"),
    "cross-domain": ("s2m2.cross_domain", "mini-ImageNet backbone -> CUB novel classes"),
}


def _usage() -> str:
    lines = ["usage: s2m2 COMMAND [options]   (s2m2 COMMAND --help for details)", "", "commands:"]
    lines += [f"  {name:<13} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"s2m2: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
