"""Run a script, sending SIGTERM at the start of training step K of its first epoch loop: to this process, or with
--to-parent from rank 0 to the parent (torchrun, which forwards it to every rank, as it does a scheduler's). Either
way every rank then waits 2 s at that step, so the signal lands inside step K whatever the forwarding takes: the run
must stop after step K. The step loop is found by its progress bar (tqdm with a description starting "ep ").
Usage: python tests/sigterm_at_step.py K [--to-parent] SCRIPT ARGS..."""

import os
import runpy
import signal
import sys
import time
from pathlib import Path

import tqdm


def stop_at(step: int, target: int, wait: float, loop: str = "ep ", sig: int = signal.SIGTERM) -> None:
    """Patch tqdm.tqdm (the scripts import it by name when they run): the k-th item of the first loop whose progress
    bar's description starts with `loop` (the training steps; "encode": the evaluation) sends `sig` to `target` (if
    any) and waits `wait` seconds before it is handed out."""
    real = tqdm.tqdm

    class StopAt(real):
        done = False

        def __init__(self, *args, **kwargs):
            self.watched = str(kwargs.get("desc", "")).startswith(loop)
            super().__init__(*args, **kwargs)

        def __iter__(self):
            for i, item in enumerate(super().__iter__()):
                if self.watched and i == step - 1 and not StopAt.done:
                    StopAt.done = True
                    if target:
                        os.kill(target, sig)
                    time.sleep(wait)
                yield item

    tqdm.tqdm = StopAt


if __name__ == "__main__":
    k, args = int(sys.argv[1]), sys.argv[2:]
    to_parent = args[0] == "--to-parent"
    args = args[1:] if to_parent else args
    if to_parent:
        stop_at(k, os.getppid() if int(os.environ.get("RANK", 0)) == 0 else 0, 2.0)
    else:
        stop_at(k, os.getpid(), 0.0)
    sys.argv, sys.path[0] = args, str(Path(args[0]).resolve().parent)
    runpy.run_path(args[0], run_name="__main__")
