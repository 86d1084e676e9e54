"""End-to-end runs of groco_imagenet.py on real images (CIFAR-10, ImageNet photos): a smoke run, resume after a stop
and a kill, DDP equality with one process, torchrun on the streamed imagenet recipe, bad inputs (a non-finite loss
included)."""

import math
import re
import signal
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import pytest
import torch

from forkrun import forked_in_two, forked_runs
from conftest import (
    ROOT,
    assert_finite_results,
    assert_one_line_error,
    ddp_beside_reference,
    read_log,
    read_results,
    recipe_cmd,
    run_script,
    start_script,
)

SCRIPT = ROOT / "groco_imagenet.py"
# small and fast on 2 CPU cores: the ImageNet-stem ResNet-18 (on 32 px its stem leaves 8 x 8), a 32-wide projector
TINY = "--arch resnet18 --proj-dim 32 --device cpu --log-every 2"
# the cifar recipe loads the folder in memory (2 x 32 px views, K 10)
CIFAR_TINY = TINY + " --batch-size 16 --probe-epochs 10 --probe-batch-size 100"
# the imagenet recipe streams the files: 2 x 64 px global + 2 x 32 px local crops
IMAGENET_TINY = TINY + " --batch-size 16 --large-size 64 --small-size 32 --n-small 2 --workers 0 --epochs 1"
IMAGENET_TINY += " --probe-epochs 1 --probe-batch-size 16"


cifar = partial(recipe_cmd, SCRIPT, "cifar", CIFAR_TINY)  # cifar(data_dir, out_dir, extra="") -> command
imagenet = partial(recipe_cmd, SCRIPT, "imagenet", IMAGENET_TINY)


# ---- learning ---------------------------------------------------------------------------------------------------
# 2 epochs (62 steps of 64) of the cifar recipe on 2,000 real CIFAR-10 images: ResNet-18 (ImageNet stem), projector
# 512-512-256, the recipe's DINO views, K 10, steepness 1, no warm-up and a high LR (48 x 64/32 = 96 at the peak): the
# loss's gradients are tiny (spec 1.3), and at this scale a higher LR learns faster (manual runs on this fixture: base
# LR 12 / 24 / 48 gave k-NN 20.2 / 23.6 / 28.4 and probe 26.4 / 33.4 / 36.8, against 19.2 / 20.2 untrained; 500 test
# images). The loss itself moves little (0.210 -> 0.207): at steepness 1 it lives in a narrow band, so the features
# are what the test checks.
LEARN = "--batch-size 64 --proj-dim 256 --epochs 2 --lr 48 --warmup-epochs 0 --eval-every 0 --log-every 31"
LEARN += " --probe-epochs 30 --probe-batch-size 100"


def test_features_beat_the_untrained_network(cifar2k_dir, tmp_path):
    """Training moves the backbone's features: k-NN (k 20) and the fast linear probe beat the same network at step 0
    (--max-steps 0 evaluates the initial weights) by several points, and the positives come closer than at the start."""
    untrained = start_script(cifar(cifar2k_dir, tmp_path / "untrained", f"{LEARN} --max-steps 0"))
    proc = run_script(cifar(cifar2k_dir, tmp_path / "trained", LEARN), timeout=400, env=dict(OMP_NUM_THREADS="2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert untrained.wait(timeout=300) == 0
    res0, res = read_results(tmp_path / "untrained"), read_results(tmp_path / "trained")
    assert res0["steps_done"] == 0 and res["steps_done"] == 62 and res["images_seen"] == 62 * 64
    assert res["knn_top1"] > res0["knn_top1"] + 4, (res0["knn_top1"], res["knn_top1"])
    assert res["linear_fast_top1"] > res0["linear_fast_top1"] + 8, (res0["linear_fast_top1"], res["linear_fast_top1"])
    epochs = [r for r in read_log(tmp_path / "trained") if r["type"] == "epoch"]
    assert epochs[-1]["pos_sim"] > epochs[0]["pos_sim"] and epochs[-1]["loss"] < epochs[0]["loss"], epochs


# ---- smoke ------------------------------------------------------------------------------------------------------
# 30 steps of 16 images (25 per epoch: one epoch and 5 steps of a 3-epoch cosine schedule, stopped by --max-steps)
SMOKE = "--epochs 3 --max-steps 30 --warmup-epochs 0 --eval-every 1 --log-every 5"


def bad_cases(cifar_dir, tmp, smoke_ckpt) -> dict:
    """name -> (command, env, needles) of each bad input, the non-finite loss (its own test) included. A checkpoint of
    another model ("other_model"): the smoke run's last.pt (--proj-dim 32) resumed with --proj-dim 64 (so it must
    run after it)."""
    torch.save({"a": 1}, tmp / "other.pt")
    ddp_env = dict(RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29999")
    return {
        "no_data": (cifar(tmp / "nope", tmp / "o1"), None, ["data dir not found", "nope"]),
        "arch": (cifar(cifar_dir, tmp / "o2", "--arch resnet19"), None, ["unknown --arch 'resnet19'"]),
        # checked from torchrun's environment before any process group is created
        "world": (cifar(cifar_dir, tmp / "o3", "--batch-size 15"), ddp_env, ["--batch-size 15", "world size 2"]),
        "small_batch": (cifar(cifar_dir, tmp / "o4", "--batch-size 10"), None,
                        ["--batch-size 10", "--topk-neg 10", "K + 1"]),
        "one_view": (cifar(cifar_dir, tmp / "o5", "--n-large 1"), None, ["--n-large 1", "at least 2 global views"]),
        "not_a_run": (cifar(cifar_dir, tmp / "o6", f"--resume {tmp / 'other.pt'}"), None,
                      ["other.pt", "is not a training checkpoint of this script"]),
        "other_model": (cifar(cifar_dir, tmp / "o7", f"--resume {smoke_ckpt} --proj-dim 64"), None,
                        [str(smoke_ckpt), "shape mismatch", "projector.6.weight: ckpt (32, 512) vs model (64, 512)"]),
        # an absurd LR (1e30 x 16/32): NaN embeddings after step 1's update; step 2 is the first bad step
        "non_finite": (cifar(cifar_dir, tmp / "o8", "--lr 1e30 --warmup-epochs 0 --log-every 4 --probe none"), None,
                       ["non-finite loss at step 2 "]),
    }  # fmt: skip


@pytest.fixture(scope="module")
def cifar_runs(cifar_dir, module_tmp):
    """The smoke run and the bad inputs, each in its own process, forked from two that imported the script once
    (tests/forkrun.py; "other_model", which resumes the smoke run's checkpoint, after it). Returns the smoke (process,
    out dir) and name -> (command, needles, process)."""
    out, tmp = module_tmp("smoke"), module_tmp("bad")
    cases = bad_cases(cifar_dir, tmp, out / "last.pt")
    after = {"other_model": cases.pop("other_model")}
    smoke, procs = forked_in_two(cifar(cifar_dir, out, SMOKE), list(cases.values()), list(after.values()),
                                 module_tmp("logs"))  # fmt: skip
    runs = [*cases.items(), *after.items()]
    return (smoke, out), {
        name: (cmd, needles, proc) for (name, (cmd, _, needles)), proc in zip(runs, procs, strict=True)
    }


@pytest.fixture(scope="module")
def smoke(cifar_runs):
    proc, out = cifar_runs[0]
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, out


@pytest.fixture(scope="module")
def bad_runs(cifar_runs):
    return cifar_runs[1]


def test_cifar_recipe_smoke(smoke):
    """The cifar recipe on 400 real CIFAR-10 images: results.json complete and finite with the right step and image
    counts; log.jsonl has the train lines (every 5 steps, the scheduled LR), both epoch lines (the second a partial
    epoch cut by --max-steps), the epoch-1 k-NN and the final evaluation; the loss stays in GroCo's narrow band."""
    proc, out = smoke
    res = read_results(out)
    assert res["steps_done"] == 30 and res["images_seen"] == 30 * 16 and res["steps_per_epoch"] == 400 // 16
    assert res["epochs_done"] == pytest.approx(30 / 25) and res["world_size"] == 1
    assert res["args"]["recipe"] == "cifar" and res["args"]["in_memory"] and res["n_pos_augs"] == 2
    assert res["scaled_lr"] == pytest.approx(0.75 * 16 / 32)
    assert_finite_results(res, "knn_top1", "knn_top5", "linear_fast_top1", "linear_fast_top1_best", "train_time_s",
                          "images_per_s", "crops_per_s", "encode_s", "total_time_s")  # fmt: skip
    assert 0 <= res["knn_top1"] <= res["knn_top5"] <= 100 and 0 <= res["linear_fast_top1"] <= 100
    assert "linear_top1" not in res  # the cifar recipe's probe is the fast one on precomputed features
    log = read_log(out)
    assert {r["type"] for r in log} == {"train", "epoch", "eval"}
    train = [r for r in log if r["type"] == "train"]
    assert [r["step"] for r in train] == list(range(5, 31, 5))
    for r in train:  # the LR of the window's last step (0-based step - 1): cosine from 0.375 over 75 steps, no warm-up
        assert r["lr"] == pytest.approx(0.5 * 0.375 * (1 + math.cos(math.pi * (r["step"] - 1) / 75)), rel=1e-9)
        # spec 1.3: 2 views (n = 11) lie between 0.147 (perfect separation) and 0.264 (fully inverted)
        assert math.isfinite(r["loss"]) and 0.1 < r["loss"] < 0.4, r
        assert -1 <= r["pos_sim"] <= 1 and -1 <= r["neg_sim"] <= 1, r
    assert [(r["epoch"], r["step"]) for r in log if r["type"] == "epoch"] == [(1, 25), (2, 30)]
    evals = [r for r in log if r["type"] == "eval"]
    assert [(r["tag"], r["step"]) for r in evals] == [("epoch 1", 25), ("final", 30)]
    assert evals[-1]["knn_top1"] == res["knn_top1"] and "linear_fast_top1" not in evals[0]
    assert [ln.split(" |")[0] for ln in proc.stdout.splitlines() if ln.startswith("ep ")] == ["ep 1/3", "ep 2/3"]
    ckpt = torch.load(out / "last.pt", weights_only=False)
    assert ckpt["step"] == 30 and ckpt["args"]["proj_dim"] == 32


# ---- resume -----------------------------------------------------------------------------------------------------
RESUME = "--epochs 1 --max-steps 10 --save-every-steps 4 --warmup-epochs 0 --probe none"


@pytest.fixture(scope="module")
def resumed(cifar_dir, module_tmp):
    """Stop at step 3 (--max-steps), resume and SIGKILL the run as its step 7 begins (the step-4 checkpoint written,
    step 6 logged: steps 5-6 lost), resume to step 10; alongside, the same 10 steps uninterrupted. Each run forked
    from a process that imported the script once (tests/forkrun.py). Returns both out dirs, the final rerun and the
    step the kill left in last.pt (where the final rerun says it resumed)."""
    ref, out = module_tmp("uninterrupted"), module_tmp("resumed")
    chain = {name: (cifar(cifar_dir, out, RESUME + extra), None)
             for name, extra in (("stop", " --max-steps 3"), ("killed", ""), ("final", ""))}  # fmt: skip
    kill = {"killed": dict(term_at_step=4, term_sig=int(signal.SIGKILL))}  # the resumed loop's 4th step: step 7
    with ThreadPoolExecutor(2) as pool:
        uninterrupted = pool.submit(forked_runs, {"ref": (cifar(cifar_dir, ref, RESUME), None)}, module_tmp("logs1"))
        procs = forked_runs(chain, module_tmp("logs2"), None, kill)
        uninterrupted = uninterrupted.result()["ref"]
    for name, code in (("stop", 0), ("killed", -signal.SIGKILL), ("final", 0)):
        assert procs[name].returncode == code, (name, procs[name].returncode, procs[name].stderr[-3000:])
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]
    assert f"resumed from {out / 'last.pt'} at step 3" in procs["killed"].stdout  # the stop's checkpoint
    resumed_at = re.findall(r"resumed from .* at step (\d+)", procs["final"].stdout)
    return ref, out, procs["final"], int(resumed_at[0]) if resumed_at else None


def test_resume_after_stop_and_kill_equals_uninterrupted(resumed):
    """The run stopped by --max-steps, then killed mid-epoch and resumed, ends with exactly the uninterrupted run's
    weights, BatchNorm running statistics, SGD momentum buffers and k-NN accuracy."""
    ref, out, final, killed_at = resumed
    # killed as step 7 began: the step-4 checkpoint (mid-epoch) is where the rerun resumes, steps 5-6 are lost
    assert killed_at == 4 and f"resumed from {out / 'last.pt'} at step 4" in final.stdout, final.stdout[-2000:]
    a, b = (torch.load(d / "last.pt", weights_only=False) for d in (ref, out))
    assert a["step"] == b["step"] == 10
    assert a["model"].keys() == b["model"].keys()
    assert any("running_mean" in k for k in a["model"]) and "projector.7.running_var" in a["model"]
    for k in a["model"]:  # weights and BatchNorm running statistics (num_batches_tracked included)
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert a["model"]["projector.1.num_batches_tracked"] == 2 * 10  # two views, each BN once per view, per step
    assert len(a["optimizer"]["state"]) == len(b["optimizer"]["state"]) > 0
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    res_a, res_b = read_results(ref), read_results(out)
    assert res_a["knn_top1"] == res_b["knn_top1"] and res_a["steps_done"] == res_b["steps_done"] == 10
    assert res_a["images_seen"] == 10 * 16  # the resumed run's count: test_images_seen_survives_a_mid_epoch_resume
    # the same logged losses (means since the previous log line) before the stop and after the last resume
    log_a = {r["step"]: r["loss"] for r in read_log(ref) if r["type"] == "train"}
    log_b = {r["step"]: r["loss"] for r in read_log(out) if r["type"] == "train"}  # the last line of each step
    assert list(log_a) == [2, 4, 6, 8, 10] and 3 in log_b
    assert {s: log_a[s] for s in log_a if s < 3 or s > killed_at} == {
        s: log_b[s] for s in log_a if s < 3 or s > killed_at
    }


def test_images_seen_survives_a_mid_epoch_resume(resumed):
    """results.json counts every trained image once after a resume from a mid-epoch (--save-every-steps) checkpoint
    (the count was once added only at the end of an epoch segment, after the mid-epoch save: 144 for 160)."""
    _, out, _, killed_at = resumed
    ckpt = torch.load(out / "last.pt", weights_only=False)
    assert read_results(out)["images_seen"] == 160, (killed_at, read_results(out)["images_seen"], ckpt["images_seen"])


# ---- DDP --------------------------------------------------------------------------------------------------------
def test_ddp_two_ranks_equal_one_process(cifar_dir, tmp_path):
    """2-process torchrun (gloo, per-rank BN): two multi-crop steps (2 x 32 px + 2 x 16 px, n_pos_augs 2) give the
    same losses, gradients and SGD-updated weights as one process running each rank's images separately and the loss
    on the global batch, with stop-grad and without it (the gathered negatives then return gradient to every rank).
    K = 9 with 8 images per rank: only the global batch has 9 negatives per anchor. Each step starts from the same
    state: the reference takes step 2 from the DDP run's state after step 1 (tests/ddp_handoff.py)."""
    worker = ROOT / "tests" / "groco_ddp_step.py"
    (tmp_path / "ddp").mkdir()
    (tmp_path / "ref").mkdir()
    # the reference waits for the DDP run's state after step 1 and takes step 2 from it (tests/ddp_handoff.py)
    reference_cmd = [worker, cifar_dir, tmp_path / "ref", "--emulate-ranks", "2", "--state1-dir", tmp_path / "ddp"]
    ddp_beside_reference([worker, cifar_dir, tmp_path / "ddp"], reference_cmd)
    ref = torch.load(tmp_path / "ref" / "rank0.pt")
    for rank in (0, 1):
        got = torch.load(tmp_path / "ddp" / f"rank{rank}.pt")
        for variant, r in ref.items():
            g = got[variant]
            torch.testing.assert_close(g["losses"], r["losses"], rtol=1e-5, atol=1e-6)
            for step in ("grads1", "grads2"):
                assert g[step].keys() == r[step].keys() and "projector.6.bias" not in r[step]  # frozen bias
                # tolerance: 1e-4 of each tensor's largest gradient, plus 1e-5 of the largest of all (the residual
                # branches' gradients are 0 at step 1, zero-init, and ~1e-4 of the rest at step 2)
                floor = 1e-5 * max(t.abs().max().item() for t in r[step].values())
                for k, want in r[step].items():
                    tol = 1e-4 * want.abs().max().item() + floor
                    torch.testing.assert_close(
                        g[step][k], want, rtol=0, atol=tol, msg=lambda m: f"{variant} {step} {k} (rank {rank}): {m}"
                    )
            for part in ("weights1", "weights"):
                for k, w in r[part].items():
                    msg = lambda m: f"{variant} {part} {k} (rank {rank}): {m}"  # noqa: E731
                    torch.testing.assert_close(g[part][k], w, rtol=1e-5, atol=2e-5, msg=msg)
    # the comparisons are not vacuous: the weights moved far beyond the tolerance, the steps differ, and the detached
    # sides matter (without stop-grad step 1's gradients change by far more than the tolerance)
    for variant, r in ref.items():
        for k in ("backbone.conv1.weight", "projector.0.weight", "projector.6.weight"):
            for after, before in (("weights1", "init"), ("weights", "weights1")):  # measured: 0.002 - 0.03
                assert (r[after][k] - r[before][k]).abs().max() > 50 * 2e-5, (variant, k, after)
        assert r["losses"][0] != r["losses"][1] and 0.1 < r["losses"].min() and r["losses"].max() < 0.4
    sg, nsg = ref["stop_grad"]["grads1"], ref["no_stop_grad"]["grads1"]
    assert max(((sg[k] - nsg[k]).abs().max() / sg[k].abs().max()).item() for k in sg if sg[k].any()) > 0.1


# ---- torchrun and streamed data ---------------------------------------------------------------------------------
def test_torchrun_imagenet_recipe_streamed(imagewoof_dir, tmp_path):
    """The imagenet recipe under torchrun --nproc_per_node=2 on CPU, streaming real ImageNet photos (some grayscale)
    with 2 x 64 px global and 2 x 32 px local crops: trains, k-NN on gathered features, augmented linear probe."""
    proc = run_script(imagenet(imagewoof_dir, tmp_path, "--max-steps 2 --probe augmented"), nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = read_results(tmp_path)
    assert res["world_size"] == 2 and res["steps_done"] == 2 and res["images_seen"] == 32
    assert res["args"]["recipe"] == "imagenet" and not res["args"]["in_memory"] and res["args"]["n_small"] == 2
    assert_finite_results(res, "knn_top1", "knn_top5", "linear_top1", "linear_top5", "train_time_s", "images_per_s")
    assert 0 <= res["knn_top1"] <= 100 and 0 <= res["linear_top1"] <= 100
    assert "linear_fast_top1" not in res
    train = [r for r in read_log(tmp_path) if r["type"] == "train"]
    # multi-crop: global anchors sort 11 elements, local anchors 12 (spec 1.3: at most 0.264 and 0.362)
    assert [r["step"] for r in train] == [2] and 0.1 < train[0]["loss"] < 0.4, train


# ---- bad inputs: one clear line on stderr, non-zero exit --------------------------------------------------------
def check_bad_run(cmd, needles, proc):
    """Exit code 1, one `error:` line from the script with every needle, no traceback, no results.json."""
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-2000:])
    assert_one_line_error(proc, "groco_imagenet.py: error: ", *needles)
    assert not (cmd[-1] / "results.json").exists()


def test_bad_inputs_fail_with_one_line(bad_runs):
    """Missing data, unknown arch, a batch that does not split over 2 ranks or is too small for K = 10 negatives, a
    single global view, a file that is not a training checkpoint, a checkpoint of another model (strict load)."""
    failures = []
    for cmd, needles, proc in (run for name, run in bad_runs.items() if name != "non_finite"):
        try:
            check_bad_run(cmd, needles, proc)
        except AssertionError as e:
            failures.append(f"{' '.join(map(str, cmd[1:]))}:\n{e}")
    assert not failures, "\n\n".join(failures)


def test_non_finite_loss_names_the_step(bad_runs):
    """An absurd LR (1e30 x 16/32) makes the embeddings NaN after step 1's update: the run stops with one line naming
    step 2, the first bad step, and writes no results.json (ordering_loss must not hand NaN to F.binary_cross_entropy,
    which raises on the CPU and asserts on CUDA before the step check could name the step)."""
    check_bad_run(*bad_runs["non_finite"])
