"""tec_mae.py's own training run as 2 DDP ranks, as one process, and as one process with --accum-iter 2, recording
every optimizer step's gradients: the evidence that these train alike on the same global batch.

The run is tec_mae.main itself (start_run, build_model, the optimizer, DDP, train_one_epoch, train_step, save_state)
with two stand-ins: the run's GradScaler (disabled on the CPU) is wrapped so that its step(opt), which train_step calls
between the backward and the optimizer step, first copies the gradients (and, at the first step, the initial weights);
and the final evaluation is skipped (the k-NN is not compared, and it costs more than the steps). Every run is forked
from this process after the import, which saves 4 s of imports per process and the launcher's: first the 2 ranks,
with the variables torchrun sets (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT; tec_mae joins a gloo group
via env://), then, side by side, the one-process runs (--accum-iter 1 and 2).

Writes OUT/rank0.pt, OUT/rank1.pt, OUT/single.pt and OUT/accum2.pt: per optimizer step the gradients; the weights
before the first step and after the last, AdamW's exp_avg and exp_avg_sq after the last (each tensor in full when
small, else 4,096 fixed entries of it, the same in every process); and, by the script, OUT/ddp/, OUT/single/ and
OUT/accum2/ (log.jsonl, last.pt, results.json).
Usage: python tests/tec_ddp_step.py OUT RECIPE [tec_mae.py flags, without --out-dir]"""

import os
import signal
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import tec_mae as T  # noqa: E402
from forkrun import free_port  # noqa: E402  (tests/ is this script's sys.path[0])

WORLD = 2


def sample(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor when small, else 4,096 fixed entries of it (the same in every process)."""
    if t.numel() <= 4096:
        return t.detach().clone()
    idx = torch.randperm(t.numel(), generator=torch.Generator().manual_seed(t.numel()))[:4096]
    return t.detach().flatten()[idx].clone()


class GradRecorder:
    """Wraps the run's GradScaler: step(opt) records the gradients (and first the weights) the optimizer is given."""

    def __init__(self, run, scaler):
        self.run, self.scaler, self.grads, self.init = run, scaler, [], None

    def step(self, opt):
        named = list(self.run.model.named_parameters())
        if self.init is None:
            self.init = {k: sample(p) for k, p in named}
        self.grads.append({k: sample(p.grad) for k, p in named if p.grad is not None})
        return self.scaler.step(opt)

    def __getattr__(self, name):  # scale, update, state_dict, load_state_dict
        return getattr(self.scaler, name)


def train(argv: list, out: Path, name: str) -> None:
    """tec_mae.py's main on argv with the recorder and without the final evaluation; saves OUT/name.pt."""
    recorders = []
    start_run = T.start_run

    def recording_start_run(args):
        run = start_run(args)
        run.scaler = GradRecorder(run, run.scaler)
        recorders.append(run.scaler)
        return run

    T.start_run = recording_start_run
    T.evaluate = lambda run, tag: {}
    T.main(T.parse_args(argv))  # as tec_mae.py parses its command line
    (rec,) = recorders
    model, opt = rec.run.model, rec.run.opt
    state = {k: opt.state[p] for k, p in model.named_parameters() if p in opt.state}
    saved = dict(grads=rec.grads, init=rec.init, weights={k: sample(p) for k, p in model.named_parameters()})
    saved.update({m: {k: sample(s[m]) for k, s in state.items()} for m in ("exp_avg", "exp_avg_sq")})
    torch.save(saved, out / f"{name}.pt")


def forked(fn, *args, env=None) -> int:
    """Run fn(*args) in a forked child with env added to its environment; returns its pid."""
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        os.environ.update(env or {})
        fn(*args)
        code = 0
    except SystemExit as e:  # tec_mae's one-line errors
        print(e.code, file=sys.stderr)
        code = 1 if e.code else 0
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def wait(pids: list, what: str, timeout: float = 240) -> None:
    """Wait for the children; once one fails (or the time is up) kill the others (a rank left alone would wait for
    its peer at the next collective)."""
    codes, t0 = {}, time.perf_counter()
    while len(codes) < len(pids):
        for pid in set(pids) - codes.keys():
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                codes[pid] = os.waitstatus_to_exitcode(status)
        if any(codes.values()) or time.perf_counter() > t0 + timeout:
            for pid in set(pids) - codes.keys():
                os.kill(pid, signal.SIGKILL)
                codes[pid] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        time.sleep(0.02)
    if any(codes.values()):
        sys.exit(f"{what} exited with {[codes[pid] for pid in pids]}")


def main():
    out, argv = Path(sys.argv[1]), sys.argv[2:]
    env = dict(WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    ddp = [*argv, "--out-dir", str(out / "ddp")]
    ranks = [forked(train, ddp, out, f"rank{r}", env=dict(env, RANK=str(r), LOCAL_RANK=str(r))) for r in range(WORLD)]
    wait(ranks, "the ranks")
    accum = forked(train, [*argv, "--accum-iter", "2", "--out-dir", str(out / "accum2")], out, "accum2")
    train([*argv, "--out-dir", str(out / "single")], out, "single")
    wait([accum], "the --accum-iter 2 run")


if __name__ == "__main__":
    main()
