"""A run's life in every script, on real CIFAR-10 images: a stop signal mid-epoch (2 DDP ranks; one process too in
EMP-SSL) saves the step and a rerun ends bit-identical to an uninterrupted run (Ctrl-C too; a stop while evaluating
keeps the trained weights); a checkpoint whose pickle would run code is refused on every path that loads one; an
out-dir that cannot be written stops the run before the data is read; an error every rank hits is printed once; a
missing CIFAR copy is reported as the --download flag warrants; the documented quick CPU commands run on a small
folder (the probe batch shrinks to it, one line per epoch, one summary line).

Every command runs forked from a process that imported its script once (tests/forkrun.py: the ranks get the
variables torchrun sets, and SIGTERM as torchrun forwards a scheduler's); one script's stop also runs under torchrun
itself."""

import dataclasses
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from forkrun import forked_runs
from conftest import ROOT, assert_one_line_error, read_log, read_results, run_script

# name -> (script, recipe subcommand or None, tiny flags on an image folder read into memory)
SCRIPTS = {
    "empssl": ("empssl_cifar.py", None, "--batch-size 16 --n-patches 2 --arch resnet18 --hidden-dim 64 --z-dim 16 "
               "--probe-epochs 2 --eval-patches 2"),
    "swav": ("swav_imagenet.py", "cifar", "--arch resnet18 --hidden-dim 64 --feat-dim 32 --n-prototypes 30 "
             "--batch-size 16 --queue-length 0 --probe-epochs 2"),
    "groco": ("groco_imagenet.py", "cifar", "--arch resnet18 --proj-dim 32 --batch-size 16 --probe-epochs 2"),
    "slimclr": ("slimclr_moco.py", "cifar-mocov2", "--arch resnet18 --widths 1.0 0.5 --batch-size 16 "
                "--queue-size 32 --probe-epochs 2"),
    "tec": ("tec_mae.py", "cifar-mae", "--batch-size 16 --probe-epochs 2"),
}  # fmt: skip
STEPS, STOP_AT = 4, 2  # of the 6 steps of an epoch (100 images at batch 16): SIGTERM during step 2 (mid-epoch)
STOP_FLAGS = f"--epochs 1 --max-steps {STEPS} --log-every 1 --save-every-steps 0 --device cpu"


def command(name: str, data, out, extra: str = "") -> list:
    script, recipe, tiny = SCRIPTS[name]
    sub = [recipe] if recipe else []
    return [ROOT / script, *sub, "--dataset", "imagefolder", "--data-dir", data, *tiny.split(), *extra.split(),
            "--out-dir", out]  # fmt: skip


class RunsCode:
    """A pickled object whose unpickling calls open(marker, "w"): what torch.load(weights_only=False) would run."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def code_running_checkpoint(path: Path, marker: Path) -> Path:
    """A file shaped like a checkpoint (model, step, ...) that carries a RunsCode."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": {}, "step": 1, "args": {}, "payload": RunsCode(marker)}, path)
    return path


# ---- stop signals ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stop_runs(small_cifar_dir, module_tmp) -> dict:
    """Per (script, mode) of STOP_MODES: an uninterrupted run of STEPS steps, the same run sent SIGTERM during step
    STOP_AT (every rank, tests/sigterm_at_step.py), and the same command again; and two single runs (see
    test_sigint_and_a_stop_while_evaluating). Two runners at once (2 CI cores), each importing the scripts once.
    Returns (script, mode) -> dict(ref=, stopped=, rerun=) of (CompletedProcess, out dir) and rank1_err (rank 1's
    stderr of the stopped run), and name -> (CompletedProcess, out dir)."""
    tmp = module_tmp("stop")
    jobs = []  # (cases, options, out dirs, runner)
    for name, mode in STOP_MODES:
        ranks = 2 if mode == "ddp" else 1
        outs = {part: tmp / f"{name}-{mode}-{part}" for part in ("ref", "stopped")}
        cases = {
            f"{name}-{mode}-ref": (command(name, small_cifar_dir, outs["ref"], STOP_FLAGS), None),
            f"{name}-{mode}-stopped": (command(name, small_cifar_dir, outs["stopped"], STOP_FLAGS), None),
            f"{name}-{mode}-rerun": (command(name, small_cifar_dir, outs["stopped"], STOP_FLAGS), None),
        }
        opts = {n: dict(ranks=ranks) for n in cases}
        opts[f"{name}-{mode}-stopped"]["term_at_step"] = STOP_AT
        jobs.append((cases, opts, outs, 0 if ranks == 1 else (len(jobs) + 1) % 2))  # 2-rank runs: either runner
    # Ctrl-C (SIGINT) in the steps, and SIGTERM while the final evaluation encodes: the trained weights are saved
    extra = {
        "tec-sigint": (command("tec", small_cifar_dir, tmp / "tec-sigint", STOP_FLAGS), None),
        "empssl-eval": (command("empssl", small_cifar_dir, tmp / "empssl-eval", STOP_FLAGS), None),
    }
    extra_opts = {"tec-sigint": dict(term_at_step=STOP_AT, term_sig=int(signal.SIGINT)),
                  "empssl-eval": dict(term_at_step=1, term_loop="encode")}  # fmt: skip
    jobs.append((extra, extra_opts, None, 0))
    with ThreadPoolExecutor(2) as pool:
        futures = []
        for i in range(2):
            part = [j for j in jobs if j[3] == i]
            cases = {k: v for c, *_ in part for k, v in c.items()}
            opts = {k: v for _, o, *_ in part for k, v in o.items()}
            (tmp / f"logs{i}").mkdir()
            futures.append(pool.submit(forked_runs, cases, tmp / f"logs{i}", None, opts))
        procs = {k: v for f in futures for k, v in f.result().items()}
    runs = {k: (procs[k], tmp / k) for k in extra}
    for _, _, outs, i in jobs[:-1]:
        name, mode = outs["ref"].name.split("-")[:2]
        key = f"{name}-{mode}"
        runs[(name, mode)] = dict(
            ref=(procs[f"{key}-ref"], outs["ref"]),
            stopped=(procs[f"{key}-stopped"], outs["stopped"]),
            rerun=(procs[f"{key}-rerun"], outs["stopped"]),
            rank1_err=tmp / f"logs{i}" / f"{key}-stopped.err.rank1",
        )
    return runs


def test_sigint_and_a_stop_while_evaluating(stop_runs):
    """Ctrl-C in the steps stops like SIGTERM (exit 130); a SIGTERM while the final evaluation encodes ends the run at
    once, saying that the trained weights are already in last.pt (saved before the evaluation started)."""
    proc, out = stop_runs["tec-sigint"]
    assert proc.returncode == 128 + signal.SIGINT, proc.stderr[-3000:]
    said = [ln for ln in proc.stderr.splitlines() if "stopped" in ln]
    assert said == [f"tec_mae.py: stopped at step {STOP_AT} of {STEPS} by SIGINT; saved {out / 'last.pt'}; rerun the "
                    "same command to resume"], proc.stderr[-2000:]  # fmt: skip
    assert "Traceback" not in proc.stderr and "KeyboardInterrupt" not in proc.stderr
    proc, out = stop_runs["empssl-eval"]
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-3000:]
    said = [ln for ln in proc.stderr.splitlines() if "stopped" in ln]
    assert said == [f"empssl_cifar.py: stopped by SIGTERM while evaluating; the trained weights are in "
                    f"{out / 'last.pt'}; rerun the same command to evaluate them"], proc.stderr[-2000:]  # fmt: skip
    assert torch.load(out / "last.pt")["step"] == STEPS and not (out / "results.json").exists()


def assert_same_checkpoint(a: dict, b: dict):
    """The same step, image count, weights and buffers (BN statistics, a queue) and optimizer state, bit for bit."""
    assert a["step"] == b["step"] == STEPS
    seen = "patches_seen" if "patches_seen" in a else "images_seen"
    assert a[seen] == b[seen] and a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    flat = lambda sd: {f"{i}.{k}": v for i, s in sd["state"].items() for k, v in s.items()}  # noqa: E731
    sa, sb = flat(a["optimizer"]), flat(b["optimizer"])
    assert sa.keys() == sb.keys() and sa
    for k in sa:
        assert torch.equal(torch.as_tensor(sa[k]), torch.as_tensor(sb[k])), k


# Every script with 2 ranks; one process only for EMP-SSL: the stop code is one SHARED block, and the other four
# scripts' own tests resume a one-process run to equal an uninterrupted one (tests/test_*_runs.py)
STOP_MODES = [(name, "ddp") for name in SCRIPTS] + [("empssl", "1")]


@pytest.mark.parametrize("name,mode", STOP_MODES)
def test_sigterm_mid_epoch_saves_and_rerun_equals_uninterrupted(stop_runs, name, mode):
    """SIGTERM during step 2: the run (every rank) finishes the step, saves last.pt at that step (mid-epoch),
    prints one line (rank 0 alone) saying so and how to resume, writes no results, exits with 128 + 15. The same
    command then resumes there and ends with weights, optimizer state and the epoch's mean loss equal to an
    uninterrupted run's."""
    runs = stop_runs[(name, mode)]
    (ref, ref_out), (stopped, out), (rerun, _) = runs["ref"], runs["stopped"], runs["rerun"]
    assert ref.returncode == 0, ref.stderr[-3000:]
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-3000:]
    lines = [ln for ln in stopped.stderr.splitlines() if "stopped" in ln]
    n = STOP_AT  # the step it stopped after (last.pt is the rerun's by now: the rerun says where it resumed)
    script = SCRIPTS[name][0]
    want = f"{script}: stopped at step {n} of {STEPS} by SIGTERM; saved {out / 'last.pt'}; rerun the same command"
    assert len(lines) == 1 and lines[0].startswith(want), stopped.stderr[-2000:]
    assert "Traceback" not in stopped.stderr and "done:" not in stopped.stdout  # no evaluation, no results
    if mode == "ddp":  # rank 1 stopped after the same step (the checkpoint is rank 0's), silently
        assert "stopped" not in runs["rank1_err"].read_text() and "Traceback" not in runs["rank1_err"].read_text()
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resumed from {out / 'last.pt'} at step {n}" in rerun.stdout
    assert_same_checkpoint(torch.load(ref_out / "last.pt"), torch.load(out / "last.pt"))
    epoch = lambda d: [r for r in read_log(d) if r["type"] == "epoch"]  # noqa: E731
    (e_ref,), (e_run,) = epoch(ref_out), epoch(out)  # one epoch line: the stopped run printed none
    keys = [k for k in e_ref if k != "time_s"]
    assert e_ref.keys() == e_run.keys()
    for k in keys:
        assert e_run[k] == pytest.approx(e_ref[k], rel=1e-5, abs=1e-6), k  # the whole epoch, not the resumed part


# ---- bad starts: one line, nothing run -------------------------------------------------------------------------
def bad_start_cases(data, tmp: Path, url: str = "") -> dict:
    """name -> (command, env, needles, marker or None) of runs that must stop with one line before training."""
    cases = {}
    (tmp / "a-file").write_text("")
    for name in SCRIPTS:
        markers = {k: tmp / f"{name}-{k}-ran" for k in ("auto", "resume")}
        auto = tmp / f"{name}-auto"  # an out-dir whose last.pt would run code: the automatic resume
        code_running_checkpoint(auto / "last.pt", markers["auto"])
        evil = code_running_checkpoint(tmp / f"{name}-evil.pt", markers["resume"])
        cases[f"{name}-auto"] = (command(name, data, auto), None, ["refused to load", str(auto / "last.pt"),
                                 "io.open"], markers["auto"])  # fmt: skip
        cases[f"{name}-resume"] = (command(name, data, tmp / f"{name}-o1", f"--resume {evil}"), None,
                                   ["refused to load", str(evil), "io.open"], markers["resume"])  # fmt: skip
        # an out-dir under a file cannot be created (root may write anywhere else); checked before the data is read
        cases[f"{name}-out"] = (command(name, tmp / "no-data", tmp / "a-file" / "sub"), None,
                                ["--out-dir", "a-file/sub", "cannot be written"], None)  # fmt: skip
        # rank 1 of 2 (torchrun's variables; the check runs before any process group): rank 0 alone says it
        env = dict(RANK="1", LOCAL_RANK="1", WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
        cases[f"{name}-rank1"] = (command(name, data, tmp / f"{name}-o2", "--batch-size 15"), env, [], None)
        cases[f"{name}-rank0"] = (command(name, data, tmp / f"{name}-o3", "--batch-size 15"), dict(env, RANK="0"),
                                  ["--batch-size 15 does not divide by the world size 2"], None)  # fmt: skip
    # TEC loads a base model (pretrain: a path or a URL), an --init (finetune, linear, convert): each refuses code
    for mode, flag in (("cifar-pretrain", "--base-checkpoint"), ("cifar-finetune", "--init")):
        marker = tmp / f"tec-{mode}-ran"
        evil = code_running_checkpoint(tmp / f"tec-{mode}.pt", marker)
        cmd = [ROOT / "tec_mae.py", mode, "--dataset", "imagefolder", "--data-dir", data, "--device", "cpu",
               "--batch-size", "16", flag, evil, "--out-dir", tmp / f"tec-{mode}"]  # fmt: skip
        cases[f"tec-{mode}"] = (cmd, None, ["refused to load", str(evil), "io.open"], marker)
    if url:  # served by the test: torch.hub downloads it into TORCH_HOME, then the same safe load
        marker = tmp / "tec-url-ran"
        code_running_checkpoint(tmp / "served" / "evil.pth", marker)
        flags = f"--dataset imagefolder --device cpu --batch-size 16 --base-checkpoint {url}/evil.pth".split()
        cmd = [ROOT / "tec_mae.py", "cifar-pretrain", "--data-dir", data, *flags, "--out-dir", tmp / "tec-url"]
        needles = ["refused to load", "evil.pth", "io.open"]
        cases["tec-url"] = (cmd, dict(TORCH_HOME=str(tmp / "hub")), needles, marker)
    marker = tmp / "tec-convert-ran"
    evil = code_running_checkpoint(tmp / "tec-convert.pt", marker)
    cmd = [ROOT / "tec_mae.py", "convert", "--init", evil, "--convert-out", tmp / "vit.pth"]
    cases["tec-convert"] = (cmd, None, ["refused to load", str(evil), "io.open"], marker)
    return cases


def test_bad_starts_stop_with_one_line(small_cifar_dir, tmp_path):
    """In every script: a last.pt or --resume file whose pickle would run code is refused in one line naming the type
    it asks for, and its code does not run (also TEC's --base-checkpoint, as a path and as an http URL, its --init,
    and convert); an out-dir that
    cannot be created stops the run in one line before the data is read (the data dir does not even exist); an error
    every rank has is printed by rank 0 alone (rank 1 exits 1 without a word)."""
    import functools
    import http.server
    import threading

    (tmp_path / "served").mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "served"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    cases = bad_start_cases(small_cifar_dir, tmp_path, f"http://127.0.0.1:{server.server_address[1]}")
    names = list(cases)
    parts = [names[0::2], names[1::2]]
    with ThreadPoolExecutor(2) as pool:
        jobs = []
        for i, part in enumerate(parts):
            (tmp_path / f"logs{i}").mkdir()
            jobs.append(pool.submit(forked_runs, {n: cases[n][:2] for n in part}, tmp_path / f"logs{i}"))
        procs = {k: v for j in jobs for k, v in j.result().items()}
    server.shutdown()
    failures = []
    for name, (cmd, _, needles, marker) in cases.items():
        proc = procs[name]
        try:
            if name.endswith("rank1"):
                assert proc.returncode == 1 and "error" not in proc.stderr and "Traceback" not in proc.stderr
            else:
                assert_one_line_error(proc, *needles)
            assert marker is None or not marker.exists(), f"{marker} exists: the checkpoint's code ran"
        except AssertionError as e:
            failures.append(f"{name}: {' '.join(map(str, cmd[1:]))}:\n{e}")
    assert not failures, "\n\n".join(failures)


def test_feature_cache_refuses_code(tmp_path):
    """The evaluation's feature cache (out_dir/cache) is read through the same safe load."""
    from common.checkpoint import ArtifactCache, CheckpointError

    cache = ArtifactCache(tmp_path, "key")
    marker = tmp_path / "ran"
    code_running_checkpoint(cache.path("train"), marker)
    with pytest.raises(CheckpointError, match="refused to load .*io.open"):
        cache.get("train")
    assert not marker.exists()


# ---- the documented quick CPU runs -------------------------------------------------------------------------------
def quick_command(script: str) -> list:
    """The module docstring's `# quick CPU run` command line (continued with a backslash), split into arguments."""
    import importlib

    doc = importlib.import_module(script[:-3]).__doc__
    end = doc.index("# quick CPU run")
    start = doc.rindex("python ", 0, end)
    return doc[start:end].replace("\\\n", " ").split()[1:]  # without `python`


def test_quick_cpu_runs_on_a_small_folder(small_cifar_dir, tmp_path):
    """Every script's documented quick CPU command (here into a second epoch) runs on 100 training images: a probe
    batch larger than the data shrinks to it with a one-line note; one line per epoch with that epoch's time (not the
    running total) and no GPU memory on the CPU; the run ends with one summary line naming results.json (not a JSON
    dump); results.json records the precision that ran (no autocast on the CPU) and the workers it used (this
    machine's CPUs, at most 10: no DataLoader warning)."""
    import importlib

    import empssl_cifar

    cases, outs = {}, {}
    for name, (script, *_) in SCRIPTS.items():
        outs[name] = tmp_path / name
        cmd = [str(a) for a in quick_command(script)]
        cmd = [ROOT / cmd[0], *(str(small_cifar_dir) if a == "DIR" else str(outs[name]) if a == "OUT" else a
                               for a in cmd[1:])]  # fmt: skip
        batch = importlib.import_module(script[:-3]).parse_args(cmd[1:]).batch_size
        cases[name] = (cmd + ["--epochs", "2", "--max-steps", str(100 // batch + 1)], None)  # into epoch 2: quicker
    modules = {n: importlib.import_module(s[:-3]) for n, (s, *_) in SCRIPTS.items()}
    recipes = {n: modules[n].parse_args([str(a) for a in cases[n][0][1:]]) for n in cases}
    assert sum(r.probe_batch_size > 100 for r in recipes.values()) >= 3  # not vacuous: most recipes' is larger
    names = list(cases)
    with ThreadPoolExecutor(2) as pool:
        jobs = []
        for i, part in enumerate((names[0::2], names[1::2])):
            (tmp_path / f"logs{i}").mkdir()
            jobs.append(pool.submit(forked_runs, {n: cases[n] for n in part}, tmp_path / f"logs{i}"))
        procs = {k: v for j in jobs for k, v in j.result().items()}
    cpus = empssl_cifar.cpus_per_process()
    failures = []
    for name, proc in procs.items():
        try:
            assert proc.returncode == 0, proc.stderr[-3000:]
            res = read_results(outs[name])
            lines = proc.stdout.strip().splitlines()
            assert lines[-1].startswith("done: ") and lines[-1].endswith(str(outs[name] / "results.json")), lines[-1]
            assert not any(ln.startswith(("{", "}")) for ln in lines)
            epochs = [ln for ln in lines if ln.startswith("ep ")]
            assert [ln.split(" |")[0] for ln in epochs] == ["ep 1/2", "ep 2/2"] and "GB" not in "".join(epochs)
            t = [float(ln.rsplit("|", 1)[1].split()[0]) for ln in epochs]  # the epoch's seconds, the last field
            assert sum(t) == pytest.approx(res["train_time_s"], rel=0.05, abs=0.2) and t[1] < res["train_time_s"]
            assert res["args"]["amp"] == "none" and res["steps_done"] == res["steps_per_epoch"] + 1
            assert "suggested max number of worker" not in proc.stderr
            workers = res["args"].get("workers", cpus)  # EMP-SSL has no DataLoader
            assert workers == cpus, (workers, cpus)
            recipe = recipes[name].probe_batch_size  # what the command asks for
            notes = [ln for ln in lines if ln.startswith("note: --probe-batch-size")]
            assert len(notes) == (recipe > 100) and res["args"]["probe_batch_size"] == min(recipe, 100), notes
        except AssertionError as e:
            failures.append(f"{name}: {' '.join(map(str, proc.args[1:]))}:\n{e}")
    assert not failures, "\n\n".join(failures)


def test_sigterm_to_torchrun_reaches_every_rank(stop_runs, small_cifar_dir, tmp_path):
    """What a scheduler does: SIGTERM to torchrun (sent by rank 0 at the start of step 2, tests/sigterm_at_step.py),
    which forwards it to both ranks; they finish step 2, save and exit, torchrun fails. The same torchrun command
    resumes and ends bit-identical to the uninterrupted 2-rank run, then evaluates on features gathered from both
    ranks and writes one results.json."""
    out = tmp_path / "run"
    victim = [ROOT / "tests" / "sigterm_at_step.py", STOP_AT, "--to-parent"]
    stopped = run_script(victim + command("empssl", small_cifar_dir, out, STOP_FLAGS), nproc=2)
    assert stopped.returncode != 0
    said = [ln for ln in stopped.stderr.splitlines() if "empssl_cifar.py: stopped" in ln]
    assert len(said) == 1 and f"stopped at step {STOP_AT} of {STEPS} by SIGTERM" in said[0], stopped.stderr[-3000:]
    assert torch.load(out / "last.pt")["step"] == STOP_AT
    rerun = run_script(command("empssl", small_cifar_dir, out, STOP_FLAGS), nproc=2)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resumed from {out / 'last.pt'} at step {STOP_AT}" in rerun.stdout
    _, ref_out = stop_runs[("empssl", "ddp")]["ref"]
    assert_same_checkpoint(torch.load(ref_out / "last.pt"), torch.load(out / "last.pt"))
    res = read_results(out)
    assert res["world_size"] == 2 and res["steps_done"] == STEPS
    assert 0 <= res["knn_top1"] <= 100 and 0 <= res["linear_top1"] <= 100


@pytest.mark.parametrize("name", list(SCRIPTS))
def test_missing_cifar_message_fits_the_download_flag(name, tmp_path, monkeypatch):
    """A CIFAR copy that is not there: with --download on (EMP-SSL's default) the message says the download failed
    and what to do offline, not "allow --download"; with it off, it says to pass --download."""
    import importlib

    module = importlib.import_module(SCRIPTS[name][0][:-3])

    class Missing:
        def __init__(self, *args, **kwargs):
            raise RuntimeError("Dataset not found or corrupted.")

    monkeypatch.setitem(module.CIFAR, "cifar10", (Missing, 10))
    args = module.parse_args(([SCRIPTS[name][1]] if SCRIPTS[name][1] else []) + ["--data-dir", str(tmp_path)])
    with pytest.raises(module.RunError) as e:
        module.load_data(dataclasses.replace(args, dataset="cifar10", download=True))
    assert "could not download cifar10" in str(e.value) and "allow --download" not in str(e.value)
    with pytest.raises(module.RunError) as e:
        module.load_data(dataclasses.replace(args, dataset="cifar10", download=False))
    assert "cifar10 not found in" in str(e.value) and "or --download" in str(e.value)


def test_shared_encoder_keeps_to_the_memory_budget():
    """extract_features (the `encode` block of SwAV, GroCo, SlimCLR and TEC, identical in each): with a budget of
    about 3 images' activations it feeds the backbone 3 images at a time (in memory and streamed the same), and the
    features equal one pass over all of them. The estimate: 6 x 4 bytes x the largest activation of one image."""
    from contextlib import nullcontext
    from types import SimpleNamespace

    import swav_imagenet as S

    torch.manual_seed(0)
    model = S.SwAV("resnet18", hidden_dim=32, feat_dim=16, n_prototypes=10)
    images = torch.randint(0, 256, (7, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    args = dataclasses.replace(S.CIFAR_PROXY, arch="resnet18", large_size=32, device="cpu")
    run = SimpleNamespace(args=args, model=model, encode=model.backbone, device=torch.device("cpu"), rank=0,
                          world_size=1, data=dict(train_x=images, train_y=torch.arange(7)), autocast=nullcontext(),
                          fmt=torch.contiguous_format)  # fmt: skip
    whole = S.extract_features(run, "train")
    one = torch.zeros(1, 3, 32, 32)
    per_image = 1 / S.inputs_per_chunk(model.backbone, one, 1.0)  # GB, by the estimate
    with S.LargestTensor(2) as largest:  # activations have the batch first; weights (and their views) do not count
        model.backbone(torch.zeros(2, 3, 32, 32))
    assert largest.numel == 2 * 64 * 16 * 16  # resnet18's stem output at 32 px: the largest activation
    assert per_image == pytest.approx(24 * 64 * 16 * 16 / 2**30, rel=1e-3)
    run.args = dataclasses.replace(args, eval_memory_gb=3.5 * per_image)
    sizes = []
    hook = model.backbone.register_forward_pre_hook(lambda module, inputs: sizes.append(len(inputs[0])))
    torch.testing.assert_close(S.extract_features(run, "train"), whole, rtol=1e-4, atol=1e-5)  # another conv batch
    hook.remove()
    assert sizes == [3, 3, 3, 1]  # the first is the estimate's own probe (3 images)
    # EMP-SSL's paper model: the largest activation of a 32 px patch is the CIFAR stem's 64 x 32 x 32; its 4096 x 4096
    # projection weight (16.8M entries, as a transposed view in the forward) is not an activation
    import empssl_cifar as E

    emp = E.EMPSSL("resnet18-cifar", 4096, 1024).eval()
    assert E.inputs_per_chunk(emp.encode, torch.zeros(1, 3, 32, 32), 1.0) == 2**30 // (24 * 64 * 32 * 32)


@pytest.mark.parametrize("name", list(SCRIPTS))
def test_non_positive_settings_are_refused(name):
    """Every script refuses a non-positive LR, epoch count or batch, and an evaluation budget of 0, in one line."""
    import importlib

    module = importlib.import_module(SCRIPTS[name][0][:-3])
    args = module.parse_args([SCRIPTS[name][1]] if SCRIPTS[name][1] else [])
    lr = "blr" if name == "tec" else "lr"
    cases = {lr: -0.3, "epochs": 0, "batch_size": 0, "eval_memory_gb": 0.0, "probe_lr": 0.0, "knn_t": 0.0}
    for field, value in cases.items():
        with pytest.raises(module.RunError) as e:
            module.check_args(dataclasses.replace(args, **{field: value}), 1)
        flag = "--" + field.replace("_", "-")
        assert str(e.value).startswith(f"{flag} must be ") and "\n" not in str(e.value), (field, str(e.value))
