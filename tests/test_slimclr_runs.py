"""End-to-end runs of slimclr_moco.py on real images (CIFAR-10, ImageNet photos): smoke runs of both cifar recipes
and of the simclr recipe across the slow start, resume after a stop, DDP equality with one process (shuffle-BN, the
queue, the gathered v3 keys, SimCLR's gathered embeddings), torchrun on the streamed mocov2 recipe, bad inputs (a
non-finite loss included).

Every process spends about 4 s importing torch and torchvision, so one module fixture starts the selected tests'
processes up front, two at a time (2 CI cores), and the tests read their results. Not here, for the 75 s budget: a
kill mid-run (test_groco_runs covers the shared checkpointing), and a learning test (a ResNet-18 step costs about
0.45 s on one core even at 32 px, so a run that beats the untrained network would take minutes)."""

import math
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import pytest
import torch

from forkrun import forked_runs
from conftest import (
    ROOT,
    assert_finite_results,
    assert_one_line_error,
    read_log,
    read_results,
    recipe_cmd,
    run_script,
)

SCRIPT = ROOT / "slimclr_moco.py"
# small and fast on 2 CPU cores: the ImageNet-stem ResNet-18 (8 x 8 after its stem at 32 px) at widths 1.0 and 0.5,
# the final k-NN with k 20 and the cifar recipes' fast probe (precomputed features) for 2 epochs
TINY = "--arch resnet18 --widths 1.0 0.5 --device cpu --knn-k 20 --eval-every 0"
CIFAR_TINY = "--dataset imagefolder " + TINY + " --batch-size 32 --probe-epochs 2 --probe-batch-size 32"
V2_TINY = CIFAR_TINY + " --queue-size 64 --log-every 2"  # the queue: the keys of the last 2 steps
V3_TINY = CIFAR_TINY + " --mlp-dim 128 --dim 32 --log-every 1"
# the mocov2 recipe streams the files (2 x 32 px views) and probes on augmented batches
IMAGENET_TINY = TINY + " --batch-size 16 --queue-size 32 --large-size 32 --workers 0 --epochs 1 --log-every 1"
IMAGENET_TINY += " --probe augmented --probe-epochs 1 --probe-batch-size 16"
IMAGENET_RUN = "--max-steps 2 --slim-start-epoch 0"  # both widths from step 0

cifar_v2 = partial(recipe_cmd, SCRIPT, "cifar-mocov2", V2_TINY)  # cifar_v2(data_dir, out_dir, extra="") -> command
cifar_v3 = partial(recipe_cmd, SCRIPT, "cifar-mocov3", V3_TINY)
imagenet_v2 = partial(recipe_cmd, SCRIPT, "mocov2", IMAGENET_TINY)
# the simclr recipe as it is (LARS at 2.4, T 0.1, t 5, its views) streaming the cifar files at 32 px, probe on features
SIMCLR_TINY = TINY + " --batch-size 32 --large-size 32 --workers 0 --mlp-dim 128 --dim 32 --log-every 1"
simclr = partial(recipe_cmd, SCRIPT, "simclr", SIMCLR_TINY + " --probe features --probe-epochs 2 --probe-batch-size 32")

SPE = 400 // 32  # steps per epoch of the 400-image fixture
# v2: 14 steps (one epoch of 12 and 2 of the next, cut by --max-steps); the sub-network joins at epoch 0.5 (step 6)
SMOKE_V2 = "--epochs 2 --max-steps 14 --slim-start-epoch 0.5"
# v3: 3 steps; the sub-network joins at epoch 0.0625 (step 0.75: step 0 alone, steps 1-2 with it)
SMOKE_V3 = "--epochs 2 --max-steps 3 --slim-start-epoch 0.0625"
DDP_ENV = dict(RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29999")


# ---- the jobs ---------------------------------------------------------------------------------------------------
def ddp_step(cifar_dir, out, *extra) -> list:
    """tests/slimclr_ddp_step.py under torchrun (2 ranks: the saved files of both) or as one process emulating 2."""
    worker = ROOT / "tests" / "slimclr_ddp_step.py"
    out.mkdir()
    proc = run_script([worker, cifar_dir, out, *extra], nproc=None if extra else 2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt") for r in ((0,) if extra else (0, 1))]


def bad_cases(cifar_dir, tmp) -> dict:
    """name -> (command, env, needles) of each bad input, each failing before or during training."""
    return {
        # an absurd LR: NaN weights after step 1's update (no warm-up), so step 2 is the first bad step
        "non_finite": (cifar_v2(cifar_dir, tmp / "o6", "--lr 1e30 --warmup-epochs 0 --probe none"),
                       None, ["non-finite loss at step 2 "]),
        "no_full_width": (cifar_v2(cifar_dir, tmp / "o1", "--widths 0.5 0.25"), None,
                          ["--widths 0.5 0.25 must contain 1.0"]),
        "arch": (cifar_v2(cifar_dir, tmp / "o2", "--arch vgg"), None, ["unknown --arch 'vgg'"]),
        # checked from torchrun's environment before any process group is created
        "batch_vs_world": (cifar_v2(cifar_dir, tmp / "o3", "--batch-size 15 --queue-size 60"), DDP_ENV,
                           ["--batch-size 15 does not divide by the world size 2"]),
        "queue": (cifar_v2(cifar_dir, tmp / "o4", "--queue-size 48"), None,
                  ["--queue-size 48 must be a multiple of the global --batch-size 32"]),
        "no_data": (cifar_v2(tmp / "nope", tmp / "o5"), None, ["data dir not found", "nope"]),
    }  # fmt: skip


STRICT_NEEDLES = ["state_dict does not match", "unexpected", "bn.1.running_mean"]  # and the checkpoint's path


def cifar_chains(cifar_dir, mktemp, wanted: set) -> dict:
    """The CIFAR runs of the wanted jobs in two chains, each forked from one process that imported the script once
    (tests/forkrun.py): the v2 smoke run, its checkpoint resumed by a model of another shape (--widths 1.0: no 0.5 BN
    copies), the v3 smoke run; and the v2 smoke run in two pieces (stopped by --max-steps 5, mid-epoch, then rerun to
    step 14), the simclr smoke run. Returns (chain's case names, its forked_runs arguments) per chain."""
    v2, v3, sim, res, tmp = (mktemp(n) for n in ("smoke_v2", "smoke_v3", "smoke_simclr", "resume", "strict"))
    strict = cifar_v2(cifar_dir, tmp / "o7", f"--resume {v2 / 'last.pt'} --widths 1.0")
    runs = {
        "smoke_v2": [("smoke_v2", cifar_v2(cifar_dir, v2, SMOKE_V2)), ("strict", strict)],
        "smoke_v3": [("smoke_v3", cifar_v3(cifar_dir, v3, SMOKE_V3))],
        "resume": [("stop", cifar_v2(cifar_dir, res, SMOKE_V2 + " --max-steps 5 --probe none")),
                   ("final", cifar_v2(cifar_dir, res, SMOKE_V2))],
        "smoke_simclr": [("smoke_simclr", simclr(cifar_dir, sim, SMOKE_V3))],
    }  # fmt: skip
    chains = []
    for names in (("smoke_v2", "smoke_v3"), ("resume", "smoke_simclr")):
        cases = {case: (cmd, None) for job in names if job in wanted for case, cmd in runs[job]}
        chains.append((cases, mktemp("logs")) if cases else None)
    outs = dict(smoke_v2=v2, smoke_v3=v3, smoke_simclr=sim, resume=res, strict=strict)
    return dict(chains=chains, outs=outs)


class Part:
    """One job's result inside a chain's Future, shaped as the tests read it (.result())."""

    def __init__(self, future, pick):
        self.future, self.pick = future, pick

    def result(self):
        return self.pick(self.future.result())


def run_in(cmd_of_out, out, **kw) -> tuple:
    """(process, out dir) of the command cmd_of_out(out)."""
    return run_script(cmd_of_out(out), **kw), out


BAD = ["no_full_width", "arch", "batch_vs_world", "queue", "no_data"]  # the bad_cases before the non-finite loss
NEEDS = {  # test -> the jobs whose results it reads
    "test_cifar_mocov2_smoke_across_the_slow_start": {"smoke_v2"},
    "test_cifar_mocov3_smoke_across_the_slow_start": {"smoke_v3"},
    "test_simclr_smoke_across_the_slow_start": {"smoke_simclr"},
    "test_resume_after_a_stop_equals_uninterrupted": {"smoke_v2", "resume"},
    "test_ddp_two_ranks_equal_one_process": {"ddp", "ddp_ref"},
    "test_torchrun_mocov2_recipe_streamed": {"imagewoof"},
    "test_bad_inputs_fail_with_one_line": {"smoke_v2", "bad"},
    "test_non_finite_loss_names_the_step": {"bad"},
}


@pytest.fixture(scope="module")
def jobs(request, imagewoof_dir, module_tmp) -> dict:
    """Start the jobs of the selected tests, two at a time (2 CI cores): the torchrun runs first (the streamed one
    while the cifar images are extracted), then the longest chains. Returns name -> Future, and the bad cases."""
    selected = {item.name for item in request.session.items if item.module is request.module}
    wanted = set().union(*(NEEDS[name] for name in selected if name in NEEDS))
    mktemp = module_tmp
    with ThreadPoolExecutor(2) as pool:
        futures = {}

        def submit(name, fn, *args, **kw):
            if name in wanted:
                futures[name] = pool.submit(fn, *args, **kw)

        submit("imagewoof", run_in, partial(imagenet_v2, imagewoof_dir, extra=IMAGENET_RUN), mktemp("woof"), nproc=2)
        cifar_dir = request.getfixturevalue("cifar_dir")
        tmp = mktemp("bad")
        bad = bad_cases(cifar_dir, tmp)
        ddp_dir = mktemp("ddp")
        submit("ddp", ddp_step, cifar_dir, ddp_dir / "ddp")
        runs = cifar_chains(cifar_dir, mktemp, wanted)
        chains = [c and pool.submit(forked_runs, *c) for c in runs["chains"]]
        outs, v2_chain, resume_chain = runs["outs"], chains[0], chains[1]
        if v2_chain:
            strict = (outs["strict"], [str(outs["smoke_v2"] / "last.pt"), *STRICT_NEEDLES])
            futures["smoke_v2"] = Part(v2_chain, lambda r: dict(smoke=(r["smoke_v2"], outs["smoke_v2"]),
                                                                strict=(*strict, r["strict"])))  # fmt: skip
            futures["smoke_v3"] = Part(v2_chain, lambda r: (r.get("smoke_v3"), outs["smoke_v3"]))
        if resume_chain:
            futures["resume"] = Part(resume_chain, lambda r: dict(out=outs["resume"], stop=r["stop"], final=r["final"]))
            futures["smoke_simclr"] = Part(resume_chain, lambda r: (r.get("smoke_simclr"), outs["smoke_simclr"]))
        # started after "ddp" (FIFO): it waits for that run's state after step 1 (tests/ddp_handoff.py)
        ref_flags = ("--emulate-ranks", "2", "--state1-dir", ddp_dir / "ddp")
        submit("ddp_ref", ddp_step, cifar_dir, ddp_dir / "ref", *ref_flags)
        # every bad input forked from one process that imported the script once (tests/forkrun.py): 4 s less each
        submit("bad", forked_runs, bad, mktemp("bad_logs"))
        yield dict(futures=futures, bad=bad)  # leaving the pool waits for every job: none writes after the tests


@pytest.fixture(scope="module")
def smoke_v2(jobs):
    proc, out = jobs["futures"]["smoke_v2"].result()["smoke"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, out


# ---- smoke ------------------------------------------------------------------------------------------------------
def check_results(res: dict, steps: int, images: int):
    """results.json: the step and image counts, finite k-NN and probe accuracies per width (the full width also
    without @W), and per width the deployed network's size: ResNet-18 with a 10-way classifier at width 1.0 is
    torchvision's resnet18(num_classes=10); at width 0.5 about a quarter of it."""
    assert res["steps_done"] == steps and res["images_seen"] == images and res["steps_per_epoch"] == SPE
    assert res["world_size"] == 1 and res["args"]["widths"] == [1.0, 0.5]
    keys = [f"{m}@{w}" for m in ("knn_top1", "knn_top5", "linear_top1", "linear_top1_best") for w in (1.0, 0.5)]
    assert_finite_results(res, "knn_top1", "linear_top1", *keys, "train_time_s", "images_per_s")
    assert all(0 <= res[k] <= 100 for k in keys)
    assert res["knn_top1"] == res["knn_top1@1.0"] and res["linear_top1"] == res["linear_top1@1.0"]
    full, half = res["widths"]["1.0"], res["widths"]["0.5"]
    assert full["params"] == 11_181_642 and full["backbone_params"] == 11_176_512  # resnet18: 11,689,512 at 1000
    assert 0.2 < half["params"] / full["params"] < 0.3 and 0.2 < half["backbone_params"] / full["backbone_params"] < 0.3
    assert 0 < half["gmacs"] < full["gmacs"] < 0.1  # 32 px
    assert full["knn_top1"] == res["knn_top1@1.0"] and half["linear_top1"] == res["linear_top1@0.5"]


def test_cifar_mocov2_smoke_across_the_slow_start(smoke_v2):
    """cifar-mocov2 on 400 real CIFAR-10 images, 14 steps of 32 with the sub-network joining at epoch 0.5 (step 6):
    results.json complete and finite per width; before the slow start the 0.5 network is not trained (top-1 exactly 0)
    and the loss is the full network's InfoNCE alone (about ln 65 = 4.2 with K 64); from it on, the 0.5 network's
    distillation term alone adds a t^2 H(teacher) >= 0.5 x 25 x (ln 65 - 0.4) = 47 (t 5 on cosines: the teacher's
    logits span at most 0.4, spec 2.2 [!]); the LR warms up from 1e-8; one summary line per epoch (the second cut by
    --max-steps)."""
    proc, out = smoke_v2
    res = read_results(out)
    check_results(res, 14, 14 * 32)
    assert res["args"]["recipe"] == "cifar-mocov2" and res["args"]["in_memory"] and res["args"]["moco"] == "v2"
    log = read_log(out)
    assert {r["type"] for r in log} == {"train", "epoch", "eval"}
    train = [r for r in log if r["type"] == "train"]
    assert [r["step"] for r in train] == list(range(2, 15, 2))
    before, after = [r for r in train if r["step"] <= 6], [r for r in train if r["step"] > 6]
    for r in train:  # the LR of the window's last step (step - 1): linear warm-up over 5 epochs from 1e-8 to 0.06
        assert r["lr"] == pytest.approx((r["step"] - 1) / (5 * SPE) * (0.06 - 1e-8) + 1e-8, rel=1e-9)
        assert math.isfinite(r["loss"]) and 0 <= r["top1@1.0"] <= 100 and 0 <= r["top1@0.5"] <= 100, r
    assert train[0]["top1@1.0"] > 25  # steps 1-2: the queue still holds its Gaussian noise, far from any key
    assert all(r["top1@0.5"] == 0 and 0 < r["loss"] < 10 for r in before), before
    assert all(r["loss"] > 47 for r in after) and any(r["top1@0.5"] > 0 for r in after), after
    assert [(r["epoch"], r["step"]) for r in log if r["type"] == "epoch"] == [(1, 12), (2, 14)]
    assert [(r["tag"], r["step"]) for r in log if r["type"] == "eval"] == [("final", 14)]
    assert [ln.split(" |")[0] for ln in proc.stdout.splitlines() if ln.startswith("ep ")] == ["ep 1/2", "ep 2/2"]
    ckpt = torch.load(out / "last.pt", weights_only=False)
    assert ckpt["step"] == 14 and ckpt["model"]["queue"].shape == (64, 128)


def test_cifar_mocov3_smoke_across_the_slow_start(jobs):
    """cifar-mocov3 (LARS, predictor, symmetric loss) on 400 real CIFAR-10 images, 3 steps of 32, the sub-network
    joining at step 1: results.json complete and finite per width; step 1 alone has top-1 0 at width 0.5 and the
    symmetric 2T-scaled InfoNCE of the full network (about 2 x 2T ln 32 = 2.8 with T 0.2); steps 2-3 add the 0.5
    network, its distillation and lambda_max 1.5 on the full network's term: the loss about triples."""
    proc, out = jobs["futures"]["smoke_v3"].result()
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = read_results(out)
    check_results(res, 3, 3 * 32)
    assert res["args"]["recipe"] == "cifar-mocov3" and res["args"]["optimizer"] == "lars"
    train = [r for r in read_log(out) if r["type"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3]
    assert train[0]["top1@0.5"] == 0 and 0 < train[0]["loss"] < 2 * 0.4 * (math.log(32) + 1), train
    assert all(r["loss"] > 2 * train[0]["loss"] for r in train[1:]) and any(r["top1@0.5"] > 0 for r in train), train
    assert [ln.split(" |")[0] for ln in proc.stdout.splitlines() if ln.startswith("ep ")] == ["ep 1/2"]
    ckpt = torch.load(out / "last.pt", weights_only=False)
    assert "queue" not in ckpt["model"] and any(k.startswith("online.predictor.") for k in ckpt["model"])


def test_simclr_smoke_across_the_slow_start(jobs):
    """The simclr recipe (SlimCLR-SimCLR: LARS, LR 2.4 warming up over 10 epochs, NT-Xent with T 0.1) streaming 400
    real CIFAR-10 images, 3 steps of 32, the sub-network joining at step 1: results.json complete and finite per
    width; step 1 alone has top-1 0 at width 0.5 and the full network's NT-Xent over the 63 others of each view, at
    most 2 / T + ln 63 = 24.1; from step 2 the 0.5 network's distillation adds at least 0.5 x 25 x (ln 63 - 0.4) = 46.8
    (t 5 on cosines: the teacher's logits span at most 0.4); no momentum encoder or queue in the checkpoint."""
    proc, out = jobs["futures"]["smoke_simclr"].result()
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = read_results(out)
    check_results(res, 3, 3 * 32)
    assert res["args"]["recipe"] == "simclr" and res["args"]["moco"] == "simclr" and not res["args"]["in_memory"]
    train = [r for r in read_log(out) if r["type"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3]
    for r in train:  # the LR of the step: a linear warm-up over 10 epochs from 1e-8 to 2.4 (not scaled by the batch)
        assert r["lr"] == pytest.approx((r["step"] - 1) / (10 * SPE) * (2.4 - 1e-8) + 1e-8, rel=1e-9)
    assert train[0]["top1@0.5"] == 0 and 0 < train[0]["loss"] < 24.1, train
    assert all(r["loss"] > 46.8 for r in train[1:]) and any(r["top1@0.5"] > 0 for r in train), train
    ckpt = torch.load(out / "last.pt", weights_only=False)
    assert not any(k.startswith(("momentum_encoder.", "queue", "online.predictor.")) for k in ckpt["model"])
    assert "online.encoder.head.0.bias" in ckpt["model"] and "online.encoder.head.4.bn.1.weight" in ckpt["model"]


# ---- resume -----------------------------------------------------------------------------------------------------
def test_resume_after_a_stop_equals_uninterrupted(smoke_v2, jobs):
    """The v2 smoke run stopped by --max-steps at step 5 (mid-epoch, before the slow start) and rerun ends with
    exactly the uninterrupted run's state: online weights, every BN copy's running statistics, the momentum encoder,
    the queue of keys, the SGD momentum buffers; the same accuracies, image count and logged losses outside the
    interrupted window."""
    r = jobs["futures"]["resume"].result()
    ref, out = smoke_v2[1], r["out"]
    assert r["stop"].returncode == 0 and r["final"].returncode == 0, (r["stop"].stderr + r["final"].stderr)[-3000:]
    assert f"resumed from {out / 'last.pt'} at step 5" in r["final"].stdout
    a, b = (torch.load(d / "last.pt", weights_only=False) for d in (ref, out))
    assert a["step"] == b["step"] == 14 and a["images_seen"] == b["images_seen"] == 14 * 32
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    names = list(a["model"])
    assert "queue" in names and any(k.startswith("momentum_encoder.") for k in names)
    assert any(".bn.1.running_mean" in k for k in names)  # the 0.5 network's BN copies
    # the 0.5 copies ran from step 6 on (one query pass per step); the momentum encoder's full-width copy every step
    assert a["model"]["online.encoder.backbone.bn1.bn.1.num_batches_tracked"] == 14 - 6
    assert a["model"]["momentum_encoder.backbone.bn1.bn.0.num_batches_tracked"] == 14
    assert a["model"]["momentum_encoder.backbone.bn1.bn.1.num_batches_tracked"] == 0
    assert len(a["optimizer"]["state"]) == len(b["optimizer"]["state"]) > 0
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    res_a, res_b = read_results(ref), read_results(out)
    for k in ("knn_top1@1.0", "knn_top1@0.5", "linear_top1@1.0", "linear_top1@0.5", "images_seen", "steps_done"):
        assert res_a[k] == res_b[k], k
    log_a = {r["step"]: r["loss"] for r in read_log(ref) if r["type"] == "train"}
    log_b = {r["step"]: r["loss"] for r in read_log(out) if r["type"] == "train"}
    # windows of 2 steps; the stopped run logged step 5 (its last), the rerun step 6 (step 5 alone)
    assert log_a.keys() == set(range(2, 15, 2)) and log_b.keys() == {*range(2, 15, 2), 5}
    same = [s for s in log_a if s != 6]
    assert {s: log_a[s] for s in same} == {s: log_b[s] for s in same} and log_a[6] != log_b[6]


# ---- DDP --------------------------------------------------------------------------------------------------------
# How far some weights moved in the two steps, at least (measured: 3-20 x these), each well beyond the comparison's
# tolerance. v2 (SGD): the zero-init residual branches barely move (1e-5), the stem, shortcuts and head do; v3: LARS
# moves every matrix by about lr x 0.001 of its norm (lr 5), the BN parameters by lr x their gradient; the momentum
# encoder follows by 1 - m = 0.01 of that.
MOVED = {
    "v2_slow_start": {
        "online.encoder.backbone.conv1.weight": 1e-2,
        "online.encoder.head.2.weight": 1e-2,
        "momentum_encoder.backbone.conv1.weight": 1e-4,
        "momentum_encoder.head.2.weight": 1e-4,
    },
    "simclr_slow_start": {
        "online.encoder.backbone.layers.3.1.convs.1.weight": 1e-3,
        "online.encoder.head.3.weight": 1e-4,
        "online.encoder.head.4.bn.0.bias": 1e-3,
    },
    "v3": {
        "online.encoder.backbone.layers.3.1.convs.1.weight": 1e-3,
        "online.encoder.head.3.weight": 1e-4,
        "online.predictor.3.weight": 1e-3,
        "momentum_encoder.backbone.layers.1.0.shortcut.0.weight": 1e-5,
        "momentum_encoder.head.1.bn.0.weight": 1e-4,
    },
}


def test_ddp_two_ranks_equal_one_process(jobs):
    """2-process torchrun (gloo, per-rank BN): two steps give the same losses, gradients, SGD/LARS-updated weights,
    momentum-encoder weights and (v2) queue as one process emulating the 2 ranks: v2 with shuffle-BN (keys of a
    seeded permutation of the global batch, un-permuted) and the slow start between the steps (DDP must tolerate the
    0.5 BN copies unused at step 1); v3 with every width, each rank's loss over the keys of both ranks; SimCLR with
    the slow start, its rank losses averaging to the official loss of the global batch (NT-Xent over both ranks).
    Each step starts from the same state: the reference takes step 2 from the DDP run's state after step 1
    (ddp_handoff.py)."""
    ref = jobs["futures"]["ddp_ref"].result()[0]
    assert set(ref) == {"v2_slow_start", "v3", "simclr_slow_start"}
    for rank, got in enumerate(jobs["futures"]["ddp"].result()):
        for variant, want in ref.items():
            g = got[variant]
            torch.testing.assert_close(g["losses"], want["losses"], rtol=1e-5, atol=1e-6)
            for step in ("grads1", "grads2"):
                assert g[step].keys() == want[step].keys()
                # tolerance: 1e-4 of each tensor's largest gradient, plus 1e-5 of the largest of all
                floor = 1e-5 * max(t.abs().max().item() for t in want[step].values())
                for k, w in want[step].items():
                    tol = 1e-4 * w.abs().max().item() + floor
                    msg = lambda m: f"{variant} {step} {k} (rank {rank}): {m}"  # noqa: E731
                    torch.testing.assert_close(g[step][k], w, rtol=0, atol=tol, msg=msg)
            for part, atol in (("weights1", 2e-5), ("weights", 2e-5), ("momentum", 1e-6)):  # measured: within 1/7
                for k, w in want[part].items():
                    msg = lambda m: f"{variant} {part} {k} (rank {rank}): {m}"  # noqa: E731
                    torch.testing.assert_close(g[part][k], w, rtol=1e-5, atol=atol, msg=msg)
            if variant.startswith("v2"):
                torch.testing.assert_close(g["queue"], want["queue"], rtol=0, atol=1e-6)
    # not vacuous: the steps differ, the weights, the momentum encoder and the queue moved far beyond the tolerances
    v2, v3, sim = ref["v2_slow_start"], ref["v3"], ref["simclr_slow_start"]
    # step 1 trains the full width alone: the 0.5 network's BN copies have no gradient there, and one at step 2
    for v in (v2, sim):
        assert not any(".bn.1." in k for k in v["grads1"]) and any(".bn.1." in k for k in v["grads2"])
    assert any(".bn.1." in k for k in v3["grads1"])
    assert v2["losses"][1] > v2["losses"][0] + 10 and sim["losses"][1] > sim["losses"][0] + 10  # the distillation joins
    assert v2["moved"]["queue"] > 0.1 and v2["queue"].norm(dim=1).sub(1).abs().max() < 1e-5  # 2 x 16 new keys
    for variant, want in ref.items():
        assert want["losses"][0] != want["losses"][1]
        for k, low in MOVED[variant].items():
            assert want["moved"][k] > low, (variant, k, want["moved"][k])


# ---- torchrun and streamed data ---------------------------------------------------------------------------------
def test_torchrun_mocov2_recipe_streamed(jobs):
    """The mocov2 recipe under torchrun --nproc_per_node=2 on CPU, streaming real ImageNet photos (some grayscale),
    2 x 32 px views, both widths from step 0: shuffle-BN across the ranks, k-NN on gathered features per width, the
    augmented switchable probe with data-parallel heads."""
    proc, out = jobs["futures"]["imagewoof"].result()
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = read_results(out)
    assert res["world_size"] == 2 and res["steps_done"] == 2 and res["images_seen"] == 32
    assert res["args"]["recipe"] == "mocov2" and not res["args"]["in_memory"] and res["args"]["probe"] == "augmented"
    keys = [f"{m}@{w}" for m in ("knn_top1", "linear_top1", "linear_top5") for w in (1.0, 0.5)]
    assert_finite_results(res, "knn_top1", "linear_top1", *keys, "train_time_s", "images_per_s")
    assert all(0 <= res[k] <= 100 for k in keys)
    assert set(res["widths"]) == {"1.0", "0.5"} and res["widths"]["0.5"]["gmacs"] < res["widths"]["1.0"]["gmacs"]
    train = [r for r in read_log(out) if r["type"] == "train"]
    assert [r["step"] for r in train] == [1, 2], train
    assert all(math.isfinite(r["loss"]) and r["top1@0.5"] >= 0 for r in train)


# ---- bad inputs: one clear line on stderr, non-zero exit --------------------------------------------------------
def check_bad_run(cmd, needles, proc):
    """Exit code 1, one `error:` line from the script with every needle, no traceback, no results.json."""
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-2000:])
    assert_one_line_error(proc, "slimclr_moco.py: error: ", *needles)
    assert not (cmd[-1] / "results.json").exists()


def test_bad_inputs_fail_with_one_line(jobs, smoke_v2):
    """Widths without the full network, an unknown arch, a batch that does not split over 2 ranks, a queue that is not
    a multiple of the batch, missing data, and a checkpoint of another model (the smoke run's, widths 1.0 and 0.5,
    resumed with --widths 1.0: strict load, the 0.5 BN copies unexpected)."""
    cases = [(jobs["bad"][name][0], jobs["bad"][name][2], jobs["futures"]["bad"].result()[name]) for name in BAD]
    cases.append(jobs["futures"]["smoke_v2"].result()["strict"])
    failures = []
    for cmd, needles, proc in cases:
        try:
            check_bad_run(cmd, needles, proc)
        except AssertionError as e:
            failures.append(f"{' '.join(map(str, cmd[1:]))}:\n{e}")
    assert not failures, "\n\n".join(failures)


def test_non_finite_loss_names_the_step(jobs):
    """An absurd LR (1e30, no warm-up) makes the weights NaN after step 1's update: the run stops with one line naming
    step 2, the first bad step, and writes no results.json."""
    cmd, _, needles = jobs["bad"]["non_finite"]
    check_bad_run(cmd, needles, jobs["futures"]["bad"].result()["non_finite"])
