"""End-to-end runs of swav_imagenet.py on real images (CIFAR-10, ImageNet photos): learning, resume after a kill
(with the queue), DDP equality with one process, torchrun, streamed decoding, bad inputs."""

import math
import shutil
import signal
import sys
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

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

SCRIPT = ROOT / "swav_imagenet.py"
# small and fast on 2 CPU cores: the ImageNet-stem ResNet-18, a tiny head, K = 30
TINY = "--arch resnet18 --hidden-dim 64 --feat-dim 32 --n-prototypes 30 --device cpu --log-every 2"
# the cifar recipe loads the folder in memory (32 px); no queue unless a test asks for one
CIFAR_TINY = TINY + " --batch-size 16 --queue-length 0 --probe-epochs 10 --probe-batch-size 100"
# the imagenet recipe streams the files: 2 x 64 px + 2 x 32 px crops
IMAGENET_TINY = TINY + " --batch-size 16 --large-size 64 --small-size 32 --n-small 2 --workers 0 --epochs 1"
IMAGENET_TINY += " --probe-epochs 1 --probe-batch-size 16"


cifar = partial(recipe_cmd, SCRIPT, "cifar", CIFAR_TINY)  # cifar(data_dir, out_dir, extra="") -> command
imagenet = partial(recipe_cmd, SCRIPT, "imagenet", IMAGENET_TINY)


# ---- learning ---------------------------------------------------------------------------------------------------
# 2 epochs (50 steps of 16 images) of the cifar recipe on 400 real CIFAR-10 images with milder augmentations, the
# author's CIFAR advice (K = 30, T = 0.5; spec 9.2, swav#23) and K > feat-dim (so z cannot escape every prototype).
# With the recipe's own augmentations (colour strength 1, blur 0.5, scale 0.08-1) every setting we tried at this size
# (K 30-300, feat-dim 16-128, eps 0.03-0.05, T 0.1-0.5, LARS official or solo-learn, batch 16-64, up to 20 epochs)
# collapsed: the loss sits at ln K within 2-3 epochs (z orthogonal to the prototypes, uniform predictions). With
# identical views (no augmentation) the loss falls to 0.63 ln K in 3 epochs: the swapped prediction itself works.
LEARN = "--epochs 2 --warmup-epochs 0 --hidden-dim 256 --feat-dim 16 --n-prototypes 30 --temperature 0.5"
LEARN += " --blur-prob 0 --jitter-strength 0.5 --large-scale 0.2 1 --freeze-prototypes-epochs 1 --probe-epochs 30"


@pytest.fixture(scope="module")
def learned(cifar_dir, module_tmp):
    """The 2-epoch run and, alongside, the same command with --max-steps 0 (the untrained network evaluated)."""
    out, init = module_tmp("learn"), module_tmp("init")
    baseline = start_script(cifar(cifar_dir, init, LEARN + " --max-steps 0"))
    proc = run_script(cifar(cifar_dir, out, LEARN))
    assert baseline.wait(timeout=300) == 0 and proc.returncode == 0, proc.stderr[-3000:]
    return proc, out, read_results(out), read_results(init)


def test_swapped_prediction_is_learned_on_real_cifar(learned):
    """The loss falls clearly below ln K (the value of uniform predictions, where collapsed or mis-paired views
    leave it), the epochs run and log, and results.json is complete and finite."""
    proc, out, res, res0 = learned
    assert res0["steps_done"] == 0 and res["steps_done"] == 2 * (400 // 16) and res["images_seen"] == 800
    assert_finite_results(res, "knn_top1", "knn_top5", "linear_fast_top1", "linear_fast_top1_best", "train_time_s",
                          "images_per_s", "crops_per_s", "encode_s", "total_time_s")  # fmt: skip
    assert_finite_results(res0, "knn_top1", "knn_top5", "linear_fast_top1")
    assert res["args"]["recipe"] == "cifar" and res["args"]["in_memory"] and res["world_size"] == 1
    log = read_log(out)
    train = [r for r in log if r["type"] == "train"]
    assert [r["epoch"] for r in log if r["type"] == "epoch"] == [1, 2]
    assert all(math.isfinite(r["loss"]) and 0 <= r["entropy"] <= 1 for r in train)
    # measured: loss / ln K 1.021 1.015 1.010 at steps 2-6, 0.944 on average over the last 8 log lines
    first = sum(r["loss_over_lnK"] for r in train[:3]) / 3
    last = sum(r["loss_over_lnK"] for r in train[-8:]) / 8
    assert first > 1.0 and last < 0.97 and last < first - 0.04, [round(r["loss_over_lnK"], 3) for r in train]
    assert [ln.split(" |")[0] for ln in proc.stdout.splitlines() if ln.startswith("ep ")] == ["ep 1/2", "ep 2/2"]


@pytest.mark.xfail(strict=True, reason="FINDING: at this scale SwAV's features do not beat the untrained network")
def test_features_beat_the_untrained_network(learned):
    """k-NN and the linear probe on the trained backbone beat the untrained one (same evaluation) by 6 points.

    Measured (200 test images, 10 classes; one standard error is ~3 points): untrained k-NN 26.0 / linear 30.0,
    trained k-NN 21.5 / linear 25.5. Even 40 epochs (480 steps, K 100, T 0.2) only reached k-NN 26.5. Strict xfail:
    it turns red once the features do learn here, so that this test can become a plain assertion."""
    _, _, res, res0 = learned
    assert res["knn_top1"] > res0["knn_top1"] + 6, (res0["knn_top1"], res["knn_top1"])
    assert res["linear_fast_top1"] > res0["linear_fast_top1"] + 6, (res0["linear_fast_top1"], res["linear_fast_top1"])


# ---- resume -----------------------------------------------------------------------------------------------------
def test_resume_after_stop_and_kill_equals_uninterrupted(cifar_dir, tmp_path):
    """With the queue in use (32 embeddings, batch 16: full after step 2) and the prototypes frozen for 5 steps:
    stop at step 3 (--max-steps), resume and SIGKILL the run as its step 7 begins (step 6 logged, the last checkpoint
    at step 4), resume to the end: the weights, momentum buffers and queue equal an uninterrupted run's exactly."""
    flags = "--epochs 1 --max-steps 12 --save-every-steps 4 --queue-length 32 --queue-start-epoch 0"
    flags += " --freeze-prototypes-epochs 0.2 --probe none"  # 0.2 x 25 steps: frozen for steps 1-5
    ref, out = tmp_path / "ref", tmp_path / "resumed"
    chain = {name: (cifar(cifar_dir, out, flags + extra), None)
             for name, extra in (("stop", " --max-steps 3"), ("killed", ""), ("final", ""))}  # fmt: skip
    kill = {"killed": dict(term_at_step=4, term_sig=int(signal.SIGKILL))}  # the resumed loop's 4th step: step 7
    (tmp_path / "logs1").mkdir(), (tmp_path / "logs2").mkdir()
    with ThreadPoolExecutor(2) as pool:  # forked from processes that imported the script once (tests/forkrun.py)
        uninterrupted = pool.submit(forked_runs, {"ref": (cifar(cifar_dir, ref, flags), None)}, tmp_path / "logs1")
        procs = forked_runs(chain, tmp_path / "logs2", None, kill)
        uninterrupted = uninterrupted.result()["ref"]
    for name, code in (("stop", 0), ("killed", -signal.SIGKILL), ("final", 0)):
        assert procs[name].returncode == code, (name, procs[name].returncode, procs[name].stderr[-3000:])
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]
    assert f"resumed from {out / 'last.pt'} at step 3" in procs["killed"].stdout  # the stop's checkpoint
    assert f"resumed from {out / 'last.pt'} at step 4" in procs["final"].stdout  # steps 5-6 lost with the kill
    a, b = (torch.load(d / "last.pt", weights_only=False) for d in (ref, out))
    assert a["step"] == b["step"] == 12
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:  # weights and BatchNorm running statistics
        assert torch.equal(a["model"][k], b["model"][k]), k
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    assert a["queue"] is not None and a["queue"]["filled"] == b["queue"]["filled"] == 32
    assert a["queue"]["z"].abs().sum() > 0 and torch.equal(a["queue"]["z"], b["queue"]["z"])
    assert read_results(ref)["knn_top1"] == read_results(out)["knn_top1"]
    # the queue was full from step 2 on, so steps 3-12 used it (logged as the fraction of steps 1-2, 3-4, ...)
    assert [r["queue"] for r in read_log(ref) if r["type"] == "train"] == [0, 1, 1, 1, 1, 1]


# ---- the SwAV guide's head and prototype variants ------------------------------------------------------------------
def test_head_and_prototype_variants_train_with_the_queue(forked):
    """The cifar recipe with a three-layer head without BN (--head-dims 512 64 48 32 --no-head-bn) and two prototype
    sets (--n-prototypes 30 20), the queue full after step 2 (16 embeddings, batch 8): 4 steps train and evaluate,
    last.pt holds VISSL's head layout and both sets (official MultiPrototypes keys), and steps 3-4 used the queue."""
    _, proc, tmp_path = forked["variants"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = read_results(tmp_path)
    assert res["steps_done"] == 4 and res["args"]["n_prototypes"] == [30, 20] and not res["args"]["head_bn"]
    assert_finite_results(res, "knn_top1", "knn_top5")
    shapes = {k: tuple(v.shape) for k, v in torch.load(tmp_path / "last.pt", weights_only=True)["model"].items()}
    assert {k: v for k, v in shapes.items() if k.startswith(("head.", "prototypes."))} == {
        "head.0.weight": (64, 512), "head.0.bias": (64,), "head.2.weight": (48, 64), "head.2.bias": (48,),
        "head.4.weight": (32, 48), "head.4.bias": (32,),
        "prototypes.prototypes0.weight": (30, 32), "prototypes.prototypes1.weight": (20, 32),
    }  # fmt: skip
    train = [r for r in read_log(tmp_path) if r["type"] == "train"]
    assert [r["queue"] for r in train] == [0, 1] and all(math.isfinite(r["loss_over_lnK"]) for r in train)


# ---- DDP --------------------------------------------------------------------------------------------------------
def test_ddp_two_ranks_equal_one_process(cifar_dir, tmp_path):
    """2-process torchrun (gloo): distributed Sinkhorn gives each rank exactly its rows of the 1-process Sinkhorn on
    the full matrix; two training steps (multi-crop, the second with the queue), each from the same state, give the
    same losses, gradients and LARS-updated weights as one process on the same global batches (per-rank BatchNorm
    emulated by running each rank's images separately; the loss every rank logs is the mean of the rank losses).
    The reference takes step 2 from the DDP run's state after step 1 (its own differs by float32 rounding, enough to
    flip a ReLU gate: tests/ddp_handoff.py)."""
    import swav_ddp_step as helper  # tests/ is on sys.path (conftest); it imports the script
    import swav_imagenet as S

    worker = ROOT / "tests" / "swav_ddp_step.py"
    (tmp_path / "ddp").mkdir()
    (tmp_path / "ref").mkdir()
    # the reference waits for the DDP run's state after step 1 and takes step 2 from it (tests/ddp_handoff.py)
    reference_cmd = [worker, cifar_dir, tmp_path / "ref", "--emulate-ranks", "2", "--state1-dir", tmp_path / "ddp"]
    ddp_beside_reference([worker, cifar_dir, tmp_path / "ddp"], reference_cmd)
    ref = torch.load(tmp_path / "ref" / "rank0.pt")
    for rank in (0, 1):
        got = torch.load(tmp_path / "ddp" / f"rank{rank}.pt")
        rows = slice(6 * rank, 6 * rank + 6)
        torch.testing.assert_close(got["sinkhorn"], ref["sinkhorn"][rows], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(got["sinkhorn64"], ref["sinkhorn64"][rows], rtol=1e-6, atol=1e-9)
        assert got["queue_full"]
        torch.testing.assert_close(got["losses"], ref["losses"], rtol=1e-5, atol=1e-5)
        for step in (1, 2):
            for k, g in ref[f"grads{step}"].items():  # tolerance relative to each tensor's largest gradient
                tol = 1e-4 * g.abs().max().item() + 1e-7
                msg = lambda m: f"step {step} grad {k} (rank {rank}): {m}"  # noqa: E731
                torch.testing.assert_close(got[f"grads{step}"][k], g, rtol=0, atol=tol, msg=msg)
            for k, w in ref[f"weights{step}"].items():
                msg = lambda m: f"step {step} weight {k} (rank {rank}): {m}"  # noqa: E731
                torch.testing.assert_close(got[f"weights{step}"][k], w, rtol=1e-5, atol=2e-5, msg=msg)
    # the comparisons are not vacuous: a rank-local Sinkhorn differs, and the weights moved far beyond the tolerance
    local = S.sinkhorn(helper.sinkhorn_scores(2)[6:], helper.EPS, helper.ITERS, distributed=False)
    assert (local - ref["sinkhorn"][6:]).abs().max() > 1e-2
    for k in ("backbone.conv1.weight", "head.3.weight", "prototypes.weight"):
        for step, before in ((1, ref["init"]), (2, ref["weights1"])):
            assert (ref[f"weights{step}"][k] - before[k]).abs().max() > 100 * 2e-5, (step, k)
    assert ref["losses"][0] != ref["losses"][1]


# ---- torchrun and streamed data ---------------------------------------------------------------------------------
def test_torchrun_imagenet_recipe_streamed(imagewoof_dir, tmp_path):
    """The imagenet recipe under torchrun --nproc_per_node=2 on CPU, streaming real ImageNet photos (some grayscale)
    through a DataLoader worker that decodes and crops: trains, k-NN on gathered features, augmented linear probe."""
    proc = run_script(imagenet(imagewoof_dir, tmp_path, "--max-steps 2 --workers 1"), nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = read_results(tmp_path)
    assert res["world_size"] == 2 and res["steps_done"] == 2 and res["images_seen"] == 32
    assert_finite_results(res, "knn_top1", "knn_top5", "linear_top1", "linear_top5", "train_time_s", "images_per_s")
    assert 0 <= res["knn_top1"] <= 100 and 0 <= res["linear_top1"] <= 100
    train = [r for r in read_log(tmp_path) if r["type"] == "train"]
    assert [r["step"] for r in train] == [2] and math.isfinite(train[0]["loss"])


# ---- bad inputs: one clear line on stderr, non-zero exit --------------------------------------------------------
VARIANTS = "--head-dims 512 64 48 32 --no-head-bn --n-prototypes 30 20 --queue-length 16 --queue-start-epoch 0"


@pytest.fixture(scope="module")
def forked(cifar_dir, small_cifar_dir, imagewoof_dir, module_tmp):
    """The bad inputs, the head and prototype variants (test_head_and_prototype_variants_train_with_the_queue), two
    non-finite losses and a corrupt streamed image, each in its own process forked from two that imported the script
    once (tests/forkrun.py): 0.5 s a case instead of 4. The checkpoint cases resume a tiny trained run (the first
    job) with another K or backbone. Returns name -> (needles, process, out dir), and "bad": the bad-input names."""
    sys.path.insert(0, str(ROOT))
    import swav_imagenet as S

    tmp = module_tmp("forked")
    data = tmp / "data"
    shutil.copytree(cifar_dir, data)
    bad = sorted((data / "train" / "cat").iterdir())[3]
    bad.write_bytes(b"not a jpeg")
    woof = tmp / "woof"  # a file that is not an image in the first training batch of a streamed folder
    shutil.copytree(imagewoof_dir, woof)
    files, _ = S.list_image_files(woof / "train", sorted(d.name for d in (woof / "train").iterdir()))
    bad_photo = files[S.epoch_batches(len(files), 16, S.Args().seed, 0)[0][5]]
    bad_photo.write_bytes(b"not a jpeg")
    torch.save({"model": {}}, tmp / "weights.pt")  # e.g. exported weights, not a run's last.pt
    ddp_env = dict(RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29999")
    trained = cifar(cifar_dir, tmp / "run", "--max-steps 1 --probe none")
    finite = "--warmup-epochs 0 --log-every 4 --probe none"
    cases = {  # name -> (command, env, needles)
        "no_data": (cifar(tmp / "nope", tmp / "o1"), None, ["data dir not found", "nope"]),
        "arch": (cifar(cifar_dir, tmp / "o2", "--arch resnet19"), None, ["unknown --arch 'resnet19'"]),
        # checked from torchrun's environment before any process group is created
        "batch": (cifar(cifar_dir, tmp / "o3", "--batch-size 15"), ddp_env, ["--batch-size 15", "world size 2"]),
        "weights": (cifar(cifar_dir, tmp / "o4", f"--resume {tmp / 'weights.pt'}"), None,
                    ["weights.pt", "is not a training checkpoint of this script"]),
        "image": (cifar(data, tmp / "o5"), None, ["cannot decode image", str(bad)]),  # in-memory folder
        "assign": (cifar(cifar_dir, tmp / "o6", "--crops-for-assign 0 2"), None, ["--crops-for-assign (0, 2)", "2 "]),
        "queue": (cifar(cifar_dir, tmp / "o7", "--queue-length 8"), None, ["--queue-length 8", "global batch (16)"]),
        "head": (cifar(cifar_dir, tmp / "o8", "--head-dims 100 64 32"), None, ["--head-dims (100, 64", "512 features"]),
        "protos": (cifar(cifar_dir, tmp / "o9", "--n-prototypes 30 0"), None, ["--n-prototypes (30, 0)", "sizes >= 1"]),
        "variants": (cifar(small_cifar_dir, tmp / "variants", VARIANTS + " --batch-size 8 --max-steps 4 --probe none"),
                     None, None),
        "big_lr": (cifar(cifar_dir, tmp / "lr", finite + " --lr 1e30"), None, ["non-finite loss at step 2 "]),
        "tiny_eps": (cifar(cifar_dir, tmp / "eps", finite + " --epsilon 1e-4"), None, ["non-finite loss at step 1 "]),
        # raised in the DataLoader worker process that decodes it
        "photo": (imagenet(woof, tmp / "w", "--workers 1 --probe none"), None, ["cannot decode image", bad_photo.name]),
    }  # fmt: skip
    after_training = {
        "more_protos": ([*trained, "--n-prototypes", "40"], None,
                        ["last.pt", "shape mismatch", "prototypes.weight: ckpt (30, 32)"]),
        "resnet50": ([*trained, "--arch", "resnet50"], None,
                     ["last.pt", "does not match", "missing", "layer1.0.bn3.weight"]),
    }  # fmt: skip
    first, procs = forked_in_two(trained, list(cases.values()), list(after_training.values()), tmp / "logs")
    assert first.returncode == 0, first.stderr[-3000:]
    runs = {name: (c[2], proc, Path(c[0][c[0].index("--out-dir") + 1])) for (name, c), proc in
            zip([*cases.items(), *after_training.items()], procs, strict=True)}  # fmt: skip
    bad_names = [n for n in [*cases, *after_training] if n not in ("variants", "big_lr", "tiny_eps", "photo")]
    return dict(runs, bad=bad_names)


def test_bad_inputs_fail_with_one_line(forked):
    """Each bad input in its own process (forked): exit code != 0 and one `error:` line, no traceback; the checkpoint
    cases resume a tiny trained run with another K or backbone: strict-load errors."""
    failures = []
    for name in forked["bad"]:
        needles, proc, _ = forked[name]
        try:
            assert_one_line_error(proc, *needles)
        except AssertionError as e:
            failures.append(f"{name} ({' '.join(map(str, proc.args[1:]))}):\n{e}")
    assert not failures, "\n\n".join(failures)


def test_non_finite_loss_names_the_step(forked):
    """An absurd LR blows up the biases (no LARS on them in the cifar recipe) in step 1's update: the run stops
    naming step 2 (the first bad one, although the check runs at the step-4 log line); a Sinkhorn epsilon so small
    that whole prototype rows underflow makes step 1's loss non-finite."""
    for name in ("big_lr", "tiny_eps"):
        needles, proc, _ = forked[name]
        assert_one_line_error(proc, *needles)
    assert not (forked["big_lr"][2] / "results.json").exists()


def test_corrupt_streamed_image_is_named(forked):
    """A file that is not an image in a streamed (imagenet-recipe) folder, in the first training batch: one line
    naming the file, raised in the DataLoader worker that decodes it."""
    needles, proc, _ = forked["photo"]
    assert_one_line_error(proc, *needles)
