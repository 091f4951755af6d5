"""Test-only torchrun entry point: ``s2m2 train`` with a worker that SIGKILLs itself mid-run.

    torchrun ... tests/_elastic_worker.py --config FILE --out DIR

When S2M2_TEST_KILL_AT_STEP=K is set, the process with RANK == S2M2_TEST_KILL_RANK (default 1) of the FIRST
attempt (TORCHELASTIC_RESTART_COUNT == 0) kills itself with SIGKILL when it is about to run its K-th
training step (1-based, counted over the whole run: the first attempt starts from scratch, so the call count
is the global step). It writes ``S2M2_TEST_KILL_MARKER`` first, so the test can tell that it really died.
SIGKILL, not an exception: nothing in the process gets to clean up, as with a pre-empted node or the OOM
killer. Restarted attempts (count > 0) run unmodified -- exactly ``s2m2.train.main``.

After ``main`` returns, every worker prints the names of its threads that are still alive
(``THREADS_LINE`` + comma-separated names, from /proc/self/task; Linux only). ``main`` must have freed the
process group by then: gloo worker threads ("pt_gloo_runloop", "gloo_tcp_loop") still running when the
interpreter finalizes can abort a finished worker (see s2m2.train._end_distributed).
"""

from __future__ import annotations

import os
import signal
import sys


def install_kill_hook() -> None:
    kill_at = os.environ.get("S2M2_TEST_KILL_AT_STEP")
    if not kill_at or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return
    if os.environ.get("RANK", "0") != os.environ.get("S2M2_TEST_KILL_RANK", "1"):
        return
    from s2m2 import objectives

    calls = {"n": 0}

    def wrap(step_fn):
        def step(ctx, images, labels):
            calls["n"] += 1
            if calls["n"] == int(kill_at):
                marker = os.environ.get("S2M2_TEST_KILL_MARKER")
                if marker:
                    with open(marker, "w") as f:
                        f.write(f"rank {os.environ.get('RANK')} killed before step {calls['n']}\n")
                os.kill(os.getpid(), signal.SIGKILL)
            return step_fn(ctx, images, labels)
        return step

    # The trainer looks the step function up in this dict at the start of every epoch, so wrapping the
    # entries in place reaches it without touching s2m2.trainer.
    for name in list(objectives.STEPS):
        objectives.STEPS[name] = wrap(objectives.STEPS[name])


THREADS_LINE = "elastic worker: threads alive after main: "


def thread_names() -> list[str] | None:
    """Names of this process's threads (None where /proc/self/task does not exist)."""
    tasks = "/proc/self/task"
    if not os.path.isdir(tasks):
        return None
    names = []
    for tid in os.listdir(tasks):
        try:
            with open(f"{tasks}/{tid}/comm") as f:
                names.append(f.read().strip())
        except FileNotFoundError:  # the thread ended while we listed
            pass
    return sorted(names)


if __name__ == "__main__":
    install_kill_hook()
    from s2m2.train import main
    code = main(sys.argv[1:])
    names = thread_names()
    if names is not None:
        print(THREADS_LINE + ",".join(names), file=sys.stderr, flush=True)
    sys.exit(code)
