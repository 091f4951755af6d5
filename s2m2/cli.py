"""`s2m2` command line: one sub-command per user task, each implemented by its module's ``main(argv)``.

    s2m2 prepare DATASET --source PATH --out DIR     data_prep.cli
    s2m2 train --config FILE [--set key=value ...]   s2m2.train
    s2m2 features --checkpoint CKPT --data DIR ...   s2m2.features
    s2m2 evaluate --features FILE --ways 5 ...       s2m2.evaluate
    s2m2 cross-domain --checkpoint CKPT --cub DIR    s2m2.cross_domain

Sub-command modules are imported only when used, so ``s2m2 --help`` is instant. ``python -m s2m2.cli``
and ``python -m s2m2`` are the same program.

Exit statuses shared by every command: 0 success, 1 training diverged (``s2m2 train`` only), 2 a user
error (one ``error:`` line on stderr naming the flag, file or config key), 130 Ctrl-C (SIGINT): one line
``s2m2 COMMAND: interrupted; nothing written`` (or what was kept), never a traceback.

This module also holds the small pieces the commands share: :class:`CommandParser` (one-line argparse
errors), argument types that validate before any work (:func:`int_at_least`, :func:`positive_float`,
:func:`device_arg`, :func:`output_file`), and the Ctrl-C plumbing (:class:`Interrupted`,
:func:`interrupt_point`).
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import signal
import sys
from pathlib import Path

COMMANDS = {
    "prepare": ("data_prep.cli", "prepare a dataset from the files you downloaded"),
    "train": ("s2m2.train", "train a backbone (S2M2 recipe and ablations)"),
    "features": ("s2m2.features", "extract (and cache) frozen features of a split"),
    "evaluate": ("s2m2.evaluate", "N-way K-shot episodes on cached features"),
    "cross-domain": ("s2m2.cross_domain", "mini-ImageNet backbone -> CUB novel classes"),
    "report": ("s2m2.report", "tables and plots from result records"),
}

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for a Ctrl-C'd program

#: Test hook (see :func:`interrupt_point`): ``S2M2_TEST_SIGINT=POINT`` or ``POINT:wait``.
TEST_SIGINT_ENV = "S2M2_TEST_SIGINT"
TEST_READY_ENV = "S2M2_TEST_READY"


# ------------------------------------------------------------------------------------------------
# Ctrl-C
# ------------------------------------------------------------------------------------------------
class Interrupted(KeyboardInterrupt):
    """Ctrl-C, re-raised by a command that wants to say what it kept (e.g. a features cache it wrote).

    ``raise Interrupted("kept the features cache f.pt; no results written") from err``. The top level reads
    the ``kept`` attribute, not the class, so a plain KeyboardInterrupt given a ``kept`` attribute works too
    (and so does this class when the module was loaded twice, as ``__main__`` and as ``s2m2.cli``).
    """

    def __init__(self, kept: str):
        super().__init__(kept)
        self.kept = kept


def interrupted_message(command: str, err: BaseException) -> str:
    """The single stderr line printed for a Ctrl-C'd command."""
    kept = getattr(err, "kept", None)
    return f"s2m2 {command}: interrupted; {kept or 'nothing written'}"


def interrupt_point(name: str) -> None:
    """Test hook: a real SIGINT delivered at a known point of a command, instead of a sleep race.

    With ``S2M2_TEST_SIGINT=NAME`` the process sends itself SIGINT here (``signal.raise_signal`` runs the
    Python handler before returning, so KeyboardInterrupt is raised exactly here). With
    ``S2M2_TEST_SIGINT=NAME:wait`` it writes its pid to the file ``S2M2_TEST_READY`` and sleeps until a
    signal arrives from outside (the test's Ctrl-C). Fires once per process. A no-op otherwise.
    """
    spec = os.environ.get(TEST_SIGINT_ENV)
    if not spec or spec.split(":")[0] != name:
        return
    del os.environ[TEST_SIGINT_ENV]
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        # Started as a background job (`cmd &`, nohup): the shell set SIGINT to ignored and Python kept it,
        # so the signal would vanish. A user's Ctrl-C reaches a foreground process; make this one alike.
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if spec.endswith(":wait"):
        import time

        ready = Path(os.environ[TEST_READY_ENV])
        tmp = ready.with_name(ready.name + ".tmp")
        tmp.write_text(f"{os.getpid()}\n")
        tmp.replace(ready)  # the reader never sees a half-written pid
        time.sleep(600)  # interrupted by the test's SIGINT; 600 s is only a safety net
        return
    signal.raise_signal(signal.SIGINT)


# ------------------------------------------------------------------------------------------------
# Argument parsing shared by the commands
# ------------------------------------------------------------------------------------------------
class CommandParser(argparse.ArgumentParser):
    """argparse with one-line errors naming the flag, exit 2:

        s2m2 evaluate: error: argument --C: must be > 0 ... (see s2m2 evaluate --help)

    (argparse's default prints the whole usage first, which buries the one line that matters.)
    """

    def error(self, message: str):
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def int_at_least(minimum: int, why: str = ""):
    """argparse type: an int >= ``minimum``; ``why`` is appended to the error (what a smaller value means)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}{why}, got {value}")
        return value

    return parse


def positive_float(why: str = "", allow_zero: bool = False):
    """argparse type: a finite float > 0 (>= 0 with ``allow_zero``)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
            raise argparse.ArgumentTypeError(f"must be a finite number {'>=' if allow_zero else '>'} 0{why}, "
                                             f"got {text}")
        return value

    return parse


def device_arg(text: str) -> str:
    """argparse type for ``--device``: a device this machine has (checked now, not after minutes of work)."""
    import torch

    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"unknown device {text!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise argparse.ArgumentTypeError(
                f"{text}: no CUDA GPU is available here (torch {torch.__version__}"
                f"{', built without CUDA' if torch.version.cuda is None else ''}); use --device cpu")
        if device.index is not None and device.index >= count:
            raise argparse.ArgumentTypeError(f"{text}: this machine has {count} CUDA device(s) (0..{count - 1})")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise argparse.ArgumentTypeError(f"{text}: MPS is not available here; use --device cpu")
    elif device.type != "cpu":
        raise argparse.ArgumentTypeError(f"unsupported device {text!r}; use cpu, cuda or cuda:N")
    return text


def output_file(text: str) -> str:
    """argparse type for a file a command writes at the end: refuse now what could not be written then.

    Refused: an existing directory, a path below a regular file, a folder we cannot write in. Missing
    folders are fine (they are created when the file is written, as ``results/run.json`` in the README).
    Checking before the work means results are never computed and then lost.
    """
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a directory; give a file path, e.g. {path / 'out'}")
    ancestor = path.absolute().parent
    try:
        while not ancestor.exists():
            ancestor = ancestor.parent
    except OSError as err:  # e.g. a parent we may not even look into
        raise argparse.ArgumentTypeError(f"cannot check the folder of {text}: {err.strerror or err}") from None
    if not ancestor.is_dir():
        raise argparse.ArgumentTypeError(f"{ancestor} is a file, not a folder, so {text} cannot be created")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"cannot write in {ancestor} (permission denied or read-only)")
    return text


def describe_error(err: BaseException) -> str:
    """One line for an error: ``PATH: reason`` for OS errors (no ``[Errno 13]`` noise), else ``str(err)``."""
    if isinstance(err, OSError) and err.strerror:
        return f"{err.filename}: {err.strerror}" if err.filename else err.strerror
    return str(err)


def same_file(a: str | os.PathLike | None, b: str | os.PathLike | None) -> bool:
    """Whether two paths name the same file (resolved; False when either is None)."""
    if a is None or b is None:
        return False
    return Path(a).resolve() == Path(b).resolve()


# ------------------------------------------------------------------------------------------------
# Entry point
# ------------------------------------------------------------------------------------------------
def _usage() -> str:
    lines = ["usage: s2m2 COMMAND [options]   (s2m2 COMMAND --help for details)", "", "commands:"]
    lines += [f"  {name:<13} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    as_program = argv is None  # the console script / python -m: we own the process
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(name, COMMANDS, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        print(f"s2m2: error: unknown command {name!r}; {hint}commands: {', '.join(COMMANDS)} (see s2m2 --help)",
              file=sys.stderr)
        return EXIT_USER_ERROR
    try:
        # The import is inside: Ctrl-C during the (seconds-long) torch import is an interrupt like any other.
        module = importlib.import_module(COMMANDS[name][0])
        return int(module.main(rest) or 0)
    except KeyboardInterrupt as err:
        if as_program:
            # A second Ctrl-C while we print and exit must not produce the traceback we are avoiding.
            # (Not when called in-process, e.g. from tests: that would disable Ctrl-C for the caller.)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        print(interrupted_message(name, err), file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
