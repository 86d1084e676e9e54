"""Run many short `python SCRIPT ARGS` command lines without paying for torch's import each time.

Every fresh process spends about 4 s importing torch, torchvision and tyro; a bad-input case fails in well under a
second after that. `forked_runs` hands command lines to `python tests/forkrun.py SPEC`, which imports each script once
(module level only: importing our scripts runs nothing) and then runs every command line in a child forked from it,
as the interpreter would run `python SCRIPT ARGS`: its own environment, argv, sys.path[0], stdout and stderr files, the
script run as __main__, and the interpreter's exit status (sys.exit(message): the message on stderr and status 1; an
uncaught exception: its traceback and status 1). Nothing passes between the runs but their files."""

import importlib.util
import json
import os
import runpy
import signal
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_commands(spec: Path) -> None:
    """Run the cases of SPEC (a JSON list: args with the script first, env, stdout and stderr paths) in order, each in
    forked children. A case with "after" first waits (up to 5 minutes) for that file: STDOUT.rc, which holds a run's
    exit code once it has ended (of another runner's case). A case with "ranks": K runs as K ranks, each with the
    variables torchrun sets (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT; rank r > 0
    writes STDOUT.rankR and STDERR.rankR); with "term_at_step": S, every rank gets SIGTERM at the start of its
    training step S, as torchrun forwards a scheduler's (tests/sigterm_at_step.py; "term_loop": the description of
    another progress bar, "term_sig": another signal); once a rank fails, the others get SIGTERM and 30 s, as under
    torchrun. A run still going after 4 minutes
    is killed (-9). Writes each case's exit code (the first non-zero of its ranks) and time into SPEC."""
    cases = json.loads(spec.read_text())
    sys.path.insert(0, str(ROOT))
    for script in dict.fromkeys(c["args"][0] for c in cases):  # the imports every command would pay for, once
        module = importlib.util.module_from_spec(importlib.util.spec_from_file_location(Path(script).stem, script))
        module.__spec__.loader.exec_module(module)
    for case in cases:
        t0 = time.perf_counter()
        while case.get("after") and not Path(case["after"]).exists() and time.perf_counter() < t0 + 300:
            time.sleep(0.05)
        t0 = time.perf_counter()
        ranks = case.get("ranks", 1)
        ddp = dict(WORLD_SIZE=str(ranks), LOCAL_WORLD_SIZE=str(ranks), MASTER_ADDR="127.0.0.1")
        ddp["MASTER_PORT"] = str(free_port())
        pids = []
        for rank in range(ranks):
            pid = os.fork()
            if pid == 0:
                env = {**case["env"], **(dict(ddp, RANK=str(rank), LOCAL_RANK=str(rank)) if ranks > 1 else {})}
                suffix = f".rank{rank}" if rank else ""
                if case.get("term_at_step"):
                    from sigterm_at_step import stop_at

                    loop, sig = case.get("term_loop", "ep "), case.get("term_sig", signal.SIGTERM)
                    stop_at(case["term_at_step"], os.getpid(), 0.0, loop, sig)
                run_child(case["args"], env, case["stdout"] + suffix, case["stderr"] + suffix)
            pids.append(pid)
        status, failed_at = {}, None
        while len(status) < len(pids):
            for pid in pids:
                if pid not in status:
                    done, st = os.waitpid(pid, os.WNOHANG)
                    if done:
                        status[pid] = st
                        if os.waitstatus_to_exitcode(st) and failed_at is None:  # as torchrun: SIGTERM the others
                            failed_at = time.perf_counter()
                            for other in set(pids) - set(status):
                                os.kill(other, signal.SIGTERM)
            late = failed_at is not None and time.perf_counter() > failed_at + 30  # torchrun's grace period
            if late or time.perf_counter() > t0 + 240:  # a hung run is killed (exit code -9)
                for pid in set(pids) - set(status):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.02)
        codes = [os.waitstatus_to_exitcode(status[pid]) for pid in pids]
        case["returncode"] = next((c for c in codes if c), 0)
        case["seconds"] = time.perf_counter() - t0
        Path(case["stdout"] + ".rc").write_text(str(case["returncode"]))
    spec.write_text(json.dumps(cases))


def run_child(args: list, env: dict, stdout: str, stderr: str) -> None:
    """In a forked child: run `python ARGS` as the interpreter would (environment, argv, sys.path[0], output files,
    the script as __main__, the exit status), then leave."""
    code = 1
    try:
        os.environ.update(env)
        for fd, name in ((1, stdout), (2, stderr)):
            os.dup2(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
        sys.argv, sys.path[0] = list(args), str(Path(args[0]).parent)
        try:
            runpy.run_path(args[0], run_name="__main__")
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else int(e.code is not None)
            if not isinstance(e.code, (int, type(None))):
                print(e.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def forked_runs(cases: dict, tmp: Path, after: dict = None, options: dict = None) -> dict:
    """name -> CompletedProcess of each case (name -> (command with the script first, env, ...)), run in order by
    run_commands in one subprocess; outputs in tmp/NAME.out and .err. after: name -> the name of a run (of another
    call with the same tmp) to wait for. options: name -> {"ranks": K, "term_at_step": S} (see run_commands)."""
    from conftest import run_script  # the same subprocess environment as every other test run

    options = options or {}
    spec = [
        dict(name=n, args=[str(a) for a in cmd], env=env or {}, stdout=str(tmp / f"{n}.out"), **options.get(n, {}))
        for n, (cmd, env, *_) in cases.items()
    ]
    for case in spec:
        case["stderr"] = case["stdout"][: -len(".out")] + ".err"
        if case["name"] in (after or {}):
            case["after"] = str(tmp / f"{after[case['name']]}.out.rc")
    path = tmp / f"{spec[0]['name']}.json"
    path.write_text(json.dumps(spec))
    proc = run_script([Path(__file__), path], timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {
        c["name"]: subprocess.CompletedProcess(
            c["args"], c["returncode"], Path(c["stdout"]).read_text(), Path(c["stderr"]).read_text()
        )
        for c in json.loads(path.read_text())
    }


def forked_in_two(first: list, cases: list, after_first: list, tmp: Path) -> tuple:
    """Two runners at once (2 CI cores): one runs the command `first`, then after_first (which need its output),
    then every other case; the other the remaining cases. cases, after_first: [(command, env, ...)].
    Returns (first's CompletedProcess, [CompletedProcess of cases + after_first, in order])."""
    from concurrent.futures import ThreadPoolExecutor

    one = {"first": (first, None), **{f"after{i}": c[:2] for i, c in enumerate(after_first)}}
    one.update({f"case{i}": c[:2] for i, c in enumerate(cases) if i % 2})
    two = {f"case{i}": c[:2] for i, c in enumerate(cases) if i % 2 == 0}
    with ThreadPoolExecutor(2) as pool:
        jobs = []
        for k, part in enumerate((one, two)):
            (tmp / f"runner{k}").mkdir(parents=True, exist_ok=True)
            jobs.append(pool.submit(forked_runs, part, tmp / f"runner{k}"))
        done = {name: proc for job in jobs for name, proc in job.result().items()}
    names = [f"case{i}" for i in range(len(cases))] + [f"after{i}" for i in range(len(after_first))]
    return done["first"], [done[n] for n in names]


if __name__ == "__main__":
    run_commands(Path(sys.argv[1]))
