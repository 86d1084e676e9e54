"""End-to-end runs of tec_mae.py (TEC) on real images, each a process running `tec_mae.py RECIPE ...`:

- every mode on CIFAR-10 photos: cifar-mae (the base model, evaluated during training on subsets), cifar-pretrain on
  its last.pt (across an epoch boundary: losses, LR warm-up, k-NN and fast probe), cifar-finetune (layer decay: the
  LR of the CLS token, of the last and of the first block, as moved weights), cifar-linear (the encoder stays frozen,
  top1_best), convert (a plain {"model": sd}, the CLS MLP baked in) and a fine-tuning step from the converted file;
- the finetune-large recipe (a README row: ViT-L's LR schedule, --accum-iter 2) on ViT-Tiny, its images streamed;
- the streamed ImageNet-layout `pretrain` recipe under torchrun --nproc_per_node=2 (gloo) on ImageNet photos;
- resume: a pretrain run stopped by --max-steps and rerun ends bit-identical to the uninterrupted run (model, AdamW
  state, logged losses, k-NN);
- DDP: 2 ranks of cifar-pretrain equal one process on the same global batch (logged losses, every gradient, AdamW
  moments, the weights), through tests/tec_ddp_step.py;
- --accum-iter 2: the logged losses and the gradients of --accum-iter 1;
- bad inputs fail with one `tec_mae.py: error:` line and no traceback; a non-finite loss names its step;
- cifar-linear on fewer training images than the fast probe's batch (which it never uses) runs.

Budget (75 s on 2 cores; a fresh process spends 4 s importing torch, torchvision and tyro): the CIFAR runs use 100
train / 50 test images of the cifar_dir fixture (10 / 5 per class: 3 steps of 32 per epoch; the final k-NN encodes
every image at 32 px, 10 ms each on one core), and every tec_mae.py command line but the torchrun one runs in a
child forked from a helper process that did those imports once (tests/forkrun.py: own argv, environment, stdout and
stderr, exit status as from the interpreter; nothing passes between runs but their files). One module fixture starts
the jobs of the selected tests two at a time: the torchrun run, two chains of CIFAR runs (the second waits for the
cifar-mae checkpoint), the DDP helper and the bad inputs. Not here: a kill mid-run (test_groco_runs covers the shared
checkpointing) and a learning test (a ViT-Tiny step at batch 32 costs about 1 s on one core)."""

import math
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

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

sys.path.insert(0, str(ROOT))
from common.vit import VITS  # noqa: E402

SCRIPT = ROOT / "tec_mae.py"
N_TRAIN, N_TEST = 100, 50  # 10 / 5 images per class of cifar_dir
SPE = N_TRAIN // 32  # steps per epoch at batch 32
PEAK = 5e-4 * 32 / 256  # the cifar recipes' blr 5e-4 at batch 32
LN10 = math.log(10)
# ViT-Tiny, patch 4 on 32 x 32 (the cifar recipes' model); log every step; the fast probe for 2 epochs
TINY = "--dataset imagefolder --device cpu --batch-size 32 --log-every 1 --probe-epochs 2"
TINY += " --probe-batch-size 32"
PRETRAIN = "--epochs 2 --max-steps 4"  # the first epoch (3 steps) and one step of the second
SUBSETS = "--eval-subset-train 40 --eval-subset-test 20"  # the k-NN during training
# the streamed pretrain recipe: ViT-Tiny with 8 px patches on 32 px crops (16 patches, k 15), 4 images per rank
IMAGENET_TINY = "--arch vit_tiny --large-size 32 --patch-size 8 --batch-size 8 --workers 1 --device cpu"
IMAGENET_TINY += " --epochs 1 --max-steps 2 --log-every 1"
FT_TINY = "--arch vit_tiny --patch-size 4 --large-size 32 --workers 0 --max-steps 2 --init"  # a README row, streamed


def cifar(recipe: str, data_dir, out, extra: str = "") -> list:
    return recipe_cmd(SCRIPT, f"cifar-{recipe}", TINY, data_dir, out, extra)


def train_records(out) -> list:
    return [r for r in read_log(out) if r["type"] == "train"]


def summary_lines(proc) -> list:
    """The per-epoch summary lines a run printed, cut at the first ' |'."""
    return [ln.split(" |")[0] for ln in proc.stdout.splitlines() if ln.startswith("ep ") and " | " in ln]


def load(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def out_dir(cmd) -> Path:
    return Path(cmd[list(map(str, cmd)).index("--out-dir") + 1])


def cifar_runs(data, runs: Path) -> dict:
    """name -> (command, env) of the CIFAR runs, in an order where every checkpoint is written before it is read."""
    base, init, vit = runs / "mae" / "last.pt", runs / "pretrain" / "last.pt", runs / "vit.pth"
    pretrain = f"{PRETRAIN} --base-checkpoint {base}"
    return {
        "mae": (cifar("mae", data, runs / "mae", f"{PRETRAIN} --eval-every 1 {SUBSETS}"), None),
        "pretrain": (cifar("pretrain", data, runs / "pretrain", pretrain), None),
        "stop": (cifar("pretrain", data, runs / "resume", f"{pretrain} --max-steps 2 --probe none"), None),
        "resume": (cifar("pretrain", data, runs / "resume", pretrain), None),
        "accum": (cifar("pretrain", data, runs / "accum", f"{pretrain} --accum-iter 2"), None),
        "convert": ([SCRIPT, "convert", "--init", init, "--convert-out", vit], None),
        "finetune_converted": (
            cifar("finetune", data, runs / "ft_vit", f"--epochs 1 --max-steps 1 --init {vit}"),
            None,
        ),
        "finetune": (cifar("finetune", data, runs / "finetune", f"--epochs 1 --max-steps 2 --init {init}"), None),
        "finetune_large": (
            recipe_cmd(SCRIPT, "finetune-large", TINY, data, runs / "ft_large", f"{FT_TINY} {init}"),
            None,
        ),
        "linear": (cifar("linear", data, runs / "linear", f"{PRETRAIN} --eval-every 1 --init {init}"), None),
    }


def bad_cases(data, files: dict, tmp: Path) -> dict:
    """name -> (command, env, needles) of each bad input; all fail before training but the non-finite loss. Each run
    stops after 2 steps of one epoch, should a check ever let it train."""
    outs = iter(range(100))

    def run(recipe, extra="", data_dir=data):
        return cifar(recipe, data_dir, tmp / f"out{next(outs)}", f"--epochs 1 --max-steps 2 {extra}")

    return {
        "no_data": (run("mae", data_dir=tmp / "nope"), None, ["data dir not found", "nope"]),
        "arch": (run("mae", "--arch vit_huge"), None, ["unknown --arch 'vit_huge'"]),
        # torchrun's WORLD_SIZE is checked before any process group is created
        "batch_vs_world": (run("mae", "--batch-size 33"), dict(WORLD_SIZE="2"),
                           ["--batch-size 33 does not divide by the world size 2"]),
        "accum": (run("mae", "--accum-iter 3"), None, ["the per-rank batch 32 does not divide into --accum-iter 3"]),
        "base_key": (run("pretrain", f"--base-checkpoint {files['no_block_key']}"), None,
                     ["base model", "missing 1 [blocks.3.attn.qkv.weight]"]),
        "init_size": (run("finetune", f"--arch vit_small --init {files['base_p4']}"), None,
                      ["--init", "(timm/MAE ViT)", "cls_token has shape (1, 1, 192), the model's (1, 1, 384)"]),
        "convert_out": ([SCRIPT, "convert", "--init", files["base_p4"]], None, ["convert needs", "--convert-out"]),
        "convert_what": ([SCRIPT, "convert", "--init", files["not_vit"], "--convert-out", tmp / "vit.pth"], None,
                         ["not a ViT encoder checkpoint", "missing cls_token"]),
        "linear_init": (run("linear"), None, ["linear needs --init"]),
        "init_missing": (run("finetune", f"--init {tmp / 'none.pt'}"), None, ["checkpoint not found", "none.pt"]),
        "topk": (run("pretrain", "--topk 65"), None, ["--topk 65 exceeds the 64 patches"]),
        # an absurd LR without warm-up: step 1's AdamW update (about lr per weight) overflows step 2's forward
        "non_finite": (run("mae", "--blr 1e30 --warmup-epochs 0"), None, ["non-finite loss at step 2 "]),
        # not bad: the recipes' fast-probe batch, unused by linear, over the 100 training images; evaluate the init
        "probe_unused": (run("linear", f"--init {files['base_p4']} --max-steps 0 --probe-batch-size 256"), None, []),
    }  # fmt: skip


# ---- the jobs -----------------------------------------------------------------------------------------------------
def small_cifar(src: Path, dst: Path) -> Path:
    """The first 10 train and 5 test images of every class of the cifar_dir fixture, linked into dst."""
    for split, n in (("train", N_TRAIN // 10), ("test", N_TEST // 10)):
        for cls in sorted((src / split).iterdir()):
            (dst / split / cls.name).mkdir(parents=True)
            for f in sorted(cls.iterdir())[:n]:
                (dst / split / cls.name / f.name).symlink_to(f)
    return dst


def save_files(tmp: Path) -> dict:
    """MAE-format ViT-Tiny checkpoints ({"model": common ViT state dict}, random init): 32 px with patches of 4 and of
    8, the first also without blocks.3.attn.qkv.weight; and a checkpoint that is no ViT."""
    torch.manual_seed(0)
    files = {name: tmp / f"{name}.pth" for name in ("base_p4", "base_p8", "no_block_key", "not_vit")}
    sd = VITS["vit_tiny"](img_size=32, patch_size=4).state_dict()
    torch.save({"model": sd}, files["base_p4"])
    torch.save({"model": {k: v for k, v in sd.items() if k != "blocks.3.attn.qkv.weight"}}, files["no_block_key"])
    torch.save({"model": VITS["vit_tiny"](img_size=32, patch_size=8).state_dict()}, files["base_p8"])
    torch.save({"model": {"fc.weight": torch.zeros(2, 2)}}, files["not_vit"])
    return files


def run_in(cmd, out, **kw) -> tuple:
    return run_script(cmd, **kw), out


def ddp_runs(data, base, out) -> dict:
    """tests/tec_ddp_step.py: 2 steps of cifar-pretrain at global batch 16, no warm-up: 2 ranks, 1 process, and 1
    process with --accum-iter 2."""
    out.mkdir()
    flags = f"--dataset imagefolder --data-dir {data} --device cpu --batch-size 16 --epochs 1 --max-steps 2"
    flags += f" --log-every 1 --warmup-epochs 0 --probe none --base-checkpoint {base}"
    proc = run_script([ROOT / "tests" / "tec_ddp_step.py", out, "cifar-pretrain", *flags.split()])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {name: load(out / f"{name}.pt") for name in ("rank0", "rank1", "single", "accum2")} | dict(out=out)


# the CIFAR runs in two processes (run_commands); the first of CHAIN_RESUME waits for cifar-mae's end
CHAIN_MAE = ["mae", "pretrain", "convert", "finetune_converted", "finetune", "finetune_large", "linear"]
CHAIN_RESUME = ["stop", "resume", "accum"]
NEEDS = {  # test -> the jobs whose results it reads (and, for the CIFAR runs, the runs whose checkpoints they read)
    "test_cifar_mae_smoke": {"mae"},
    "test_cifar_pretrain_smoke_across_an_epoch": {"mae", "pretrain"},
    "test_cifar_finetune_smoke_layer_decay": {"mae", "pretrain", "finetune"},
    "test_finetune_large_row_accumulates": {"mae", "pretrain", "finetune_large"},
    "test_cifar_linear_smoke_frozen_encoder": {"mae", "pretrain", "linear"},
    "test_convert_then_finetune": {"mae", "pretrain", "convert", "finetune_converted"},
    "test_torchrun_pretrain_streamed": {"woof"},
    "test_resume_after_a_stop_equals_uninterrupted": {"mae", "pretrain", "stop", "resume"},
    "test_ddp_two_ranks_equal_one_process": {"ddp"},
    "test_accum_iter_2_logs_the_same_losses": {"mae", "pretrain", "accum", "ddp"},
    "test_bad_inputs_fail_with_one_line": {"bad"},
    "test_non_finite_loss_names_the_step": {"bad"},
    "test_finetune_recipes_ignore_the_probe_batch_size": {"bad"},
}


@pytest.fixture(scope="module")
def jobs(request, imagewoof_dir, module_tmp) -> dict:
    """Start the selected tests' jobs two at a time (2 CI cores): the torchrun run on ImageNet photos first (while
    the CIFAR images are extracted), the CIFAR runs in two chains (about 30 s and 20 s), the DDP helper and the bad
    inputs. Returns the futures, the CIFAR runs' and the bad inputs' commands."""
    selected = {item.name.split("[")[0] for item in request.session.items if item.module is request.module}
    wanted = set().union(*(NEEDS[name] for name in selected if name in NEEDS))
    mktemp = module_tmp
    files = save_files(mktemp("files"))
    with ThreadPoolExecutor(2) as pool:
        futures = {}

        def submit(name, fn, *args, **kw):
            if name in wanted:
                futures[name] = pool.submit(fn, *args, **kw)

        woof = mktemp("woof") / "out"
        cmd = [SCRIPT, "pretrain", "--data-dir", imagewoof_dir, *IMAGENET_TINY.split(), "--out-dir", woof]
        submit("woof", run_in, [*cmd, "--base-checkpoint", files["base_p8"]], woof, nproc=2)
        data = small_cifar(request.getfixturevalue("cifar_dir"), mktemp("cifar") / "small")
        runs = {k: v for k, v in cifar_runs(data, mktemp("runs")).items() if k in wanted}
        logs = mktemp("logs")
        for chain in (CHAIN_MAE, CHAIN_RESUME):
            cases = {name: runs[name] for name in chain if name in runs}
            after = {next(iter(cases)): "mae"} if cases and chain is CHAIN_RESUME else {}  # mae's last.pt, final
            if cases:
                futures[chain[0]] = pool.submit(forked_runs, cases, logs, after=after)
        submit("ddp", ddp_runs, data, files["base_p4"], mktemp("ddp") / "out")
        bad = bad_cases(data, files, mktemp("bad"))
        submit("bad", forked_runs, bad, mktemp("bad_logs"))
        yield dict(futures=futures, runs=runs, bad=bad)  # leaving the pool waits for every job: none writes after


def finished(jobs, name) -> tuple:
    """(process, out dir) of a CIFAR run that must have succeeded."""
    proc = jobs["futures"][CHAIN_MAE[0] if name in CHAIN_MAE else CHAIN_RESUME[0]].result()[name]
    assert proc.returncode == 0, proc.stderr[-3000:]
    cmd = jobs["runs"][name][0]
    return proc, out_dir(cmd) if "--out-dir" in map(str, cmd) else None


# ---- smoke --------------------------------------------------------------------------------------------------------
def check_run(res: dict, recipe: str, steps: int, *metrics):
    assert res["args"]["recipe"] == recipe and res["args"]["in_memory"] and res["world_size"] == 1
    assert res["steps_done"] == steps and res["images_seen"] == 32 * steps and res["steps_per_epoch"] == SPE
    assert_finite_results(res, *metrics, "train_time_s", "images_per_s")
    assert all(0 <= res[k] <= 100 for k in metrics), {k: res[k] for k in metrics}


def test_cifar_mae_smoke(jobs):
    """cifar-mae, 4 steps of 32 real CIFAR-10 images (epoch 1 and a step of epoch 2), evaluated after epoch 1 on
    seeded subsets (40 train / 20 test images) and at the end on all 150: the MAE loss against per-patch normalised
    pixels (variance 1, so at least about 1 for a prediction that does not know them), results.json with the final
    k-NN and the fast probe, one summary line per epoch (the first with its k-NN), a last.pt with MAE's decoder (4
    blocks in the cifar recipe)."""
    proc, out = finished(jobs, "mae")
    check_run(read_results(out), "cifar-mae", 4, "knn_top1", "knn_top5", "linear_fast_top1", "linear_fast_top1_best")
    log = read_log(out)
    train = [r for r in log if r["type"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert all(0.9 < r["loss"] < 5 for r in train), train
    assert [(r["epoch"], r["step"]) for r in log if r["type"] == "epoch"] == [(1, 3), (2, 4)]
    evals = [r for r in log if r["type"] == "eval"]
    assert [(r["tag"], r["step"]) for r in evals] == [("epoch 1", 3), ("final", 4)]
    assert all(0 <= r["knn_top1"] <= r["knn_top5"] <= 100 for r in evals) and "linear_fast_top1" not in evals[0]
    assert summary_lines(proc) == ["ep 1/2", "ep 2/2"]
    epoch_1 = next(ln for ln in proc.stdout.splitlines() if ln.startswith("ep 1/2 | "))
    assert f"| knn_top1 {evals[0]['knn_top1']:.4g} |" in epoch_1
    sd = load(out / "last.pt")["model"]
    assert "mask_token" in sd and "decoder_blocks.3.mlp.fc2.weight" in sd and "decoder_blocks.4.norm1.weight" not in sd


def test_cifar_pretrain_smoke_across_an_epoch(jobs):
    """cifar-pretrain on the cifar-mae run's last.pt, 4 steps (epoch 1 and a step of epoch 2): per logged step loss =
    loss_fea + loss_att, the relation loss at init about ln 64 (a soft cross-entropy against a near-uniform prediction
    over the 64 patch keys, CLS key dropped), the LR warming up linearly from 0 over 10 epochs, one summary line per
    epoch, finite k-NN and probe; last.pt holds TEC's model (CLS MLP, adapter, both decoder heads) and no base model."""
    proc, out = finished(jobs, "pretrain")
    res = read_results(out)
    check_run(res, "cifar-pretrain", 4, "knn_top1", "knn_top5", "linear_fast_top1", "linear_fast_top1_best")
    assert res["mode"] == "pretrain" and res["topk"] == 5 and res["base_checkpoint"].endswith("mae/last.pt")
    log = read_log(out)
    train = [r for r in log if r["type"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    for r in train:
        assert all(math.isfinite(r[k]) and r[k] > 0 for k in ("loss", "loss_fea", "loss_att")), r
        assert r["loss"] == pytest.approx(r["loss_fea"] + r["loss_att"], rel=1e-6)
        assert r["lr"] == pytest.approx(PEAK * (r["step"] - 1) / SPE / 10, rel=1e-9, abs=1e-15)
    assert abs(train[0]["loss_att"] - math.log(64)) < 0.05, train[0]
    assert [(r["epoch"], r["step"]) for r in log if r["type"] == "epoch"] == [(1, 3), (2, 4)]
    assert [(r["tag"], r["step"]) for r in log if r["type"] == "eval"] == [("final", 4)]
    assert summary_lines(proc) == ["ep 1/2", "ep 2/2"]
    sd = load(out / "last.pt")["model"]
    for key in ("cls_token_mlp.fc1.weight", "encoder_adaptor.fuse_fcs.3.weight", "decoder_blocks.1.norm1.weight"):
        assert key in sd, key
    assert {k.split(".")[0] for k in sd} >= {"forward_fea_decoder", "forward_att_decoder"}
    assert not any(k.startswith("base") for k in sd)


def test_cifar_finetune_smoke_layer_decay(jobs):
    """cifar-finetune from the pretrain run's last.pt, 2 steps: the loss at step 1 is ln 10 (head init std 2e-5:
    uniform logits; soft targets sum to 1); top1 / top5 / top1_best on the test images. Step 1's LR is 0 (warm-up),
    so the weights move once, at step 2, by lr x lr_scale x m/sqrt(v) (+ weight decay): with betas (0.9, 0.999) that
    ratio is at most 1.0013 and is 1 where both gradients agree, so a large tensor's largest move is about lr x
    lr_scale: 1 for the CLS token and its MLP (TEC's quirk: layer id -1), 0.65 for block 11, 0.65^12 for block 0 and
    0.65^13 for the positions and the patch embedding (layer decay 0.65, depth 12)."""
    proc, out = finished(jobs, "finetune")
    res = read_results(out)
    check_run(res, "cifar-finetune", 2, "top1", "top5", "top1_best")
    assert res["top1"] <= res["top5"] and res["top1_best"] == res["top1"]
    train = train_records(out)
    assert [r["step"] for r in train] == [1, 2] and train[0]["lr"] == 0
    assert train[0]["loss"] == pytest.approx(LN10, abs=1e-3) and math.isfinite(train[1]["loss"])
    assert summary_lines(proc) == ["ep 1/1"]
    lr = train[1]["lr"]
    assert lr == pytest.approx(PEAK / SPE / 5)
    init, sd = load(finished(jobs, "pretrain")[1] / "last.pt")["model"], load(out / "last.pt")["model"]
    moved = {k: (sd[k] - init[k]).abs().max().item() / lr for k in sd if k in init}
    assert {"head.weight", "fc_norm.weight"} <= sd.keys() - init.keys()
    assert max(moved.values()) < 1.05, max(moved.items(), key=lambda kv: kv[1])
    scales = {"cls_token": 1, "cls_token_mlp.fc1.weight": 1, "blocks.11.attn.qkv.weight": 0.65}
    scales.update({"blocks.0.attn.qkv.weight": 0.65**12, "pos_embed": 0.65**13, "patch_embed.proj.weight": 0.65**13})
    assert all(0.8 < moved[k] / scale < 1.05 for k, scale in scales.items()), {k: moved[k] for k in scales}


def test_finetune_large_row_accumulates(jobs):
    """finetune-large (the README's ViT-L row: blr 1e-3, warm-up 5 of 50 epochs, min_lr 1e-5, --accum-iter 2) on
    ViT-Tiny and the CIFAR photos streamed from their files, from the pretrain run's last.pt, 2 steps of 2
    micro-batches of 16: the loss at step 1 is ln 10, the LR 0 at step 1 and at step 2 that of the warm-up (peak
    1e-3 x 32 / 256, a third of the first of 5 epochs), the CLS MLP kept and trained, a test top-1."""
    _, out = finished(jobs, "finetune_large")
    res = read_results(out)
    a = res["args"]
    assert (a["accum_iter"], a["epochs"], a["blr"], a["min_lr"], a["warmup_epochs"], a["layer_decay"]) == (
        2, 50, 1e-3, 1e-5, 5, 0.65)  # fmt: skip
    assert a["recipe"] == "finetune-large" and not a["in_memory"]
    assert res["steps_done"] == 2 and res["images_seen"] == 64 and res["steps_per_epoch"] == SPE
    assert_finite_results(res, "top1", "top5")
    train = train_records(out)
    assert [r["step"] for r in train] == [1, 2] and train[0]["lr"] == 0
    assert train[0]["loss"] == pytest.approx(LN10, abs=1e-3) and math.isfinite(train[1]["loss"])
    assert train[1]["lr"] == pytest.approx(1e-3 * 32 / 256 / SPE / 5)
    init, sd = load(finished(jobs, "pretrain")[1] / "last.pt")["model"], load(out / "last.pt")["model"]
    assert not torch.equal(sd["cls_token_mlp.fc1.weight"], init["cls_token_mlp.fc1.weight"])


def test_cifar_linear_smoke_frozen_encoder(jobs):
    """cifar-linear from the pretrain run's last.pt, 4 steps (epoch 1, evaluated, and a step of epoch 2): the loss at
    step 1 near ln 10 (head init std 0.01 on batch-normalised features), top1 / top5 on the test images and top1_best
    the better of the two evaluations; every encoder weight (CLS MLP and final norm included) is the pretrained one
    bit for bit, the LARS-trained head moved and its BatchNorm saw 4 batches."""
    proc, out = finished(jobs, "linear")
    res = read_results(out)
    check_run(res, "cifar-linear", 4, "top1", "top5", "top1_best")
    assert res["top1"] <= res["top5"]
    train = train_records(out)
    assert [r["step"] for r in train] == [1, 2, 3, 4] and abs(train[0]["loss"] - LN10) < 0.1, train
    evals = [r for r in read_log(out) if r["type"] == "eval"]
    assert [(r["tag"], r["step"]) for r in evals] == [("epoch 1", 3), ("final", 4)]
    assert res["top1_best"] == max(r["top1"] for r in evals) and evals[0]["top1_best"] == evals[0]["top1"]
    assert summary_lines(proc) == ["ep 1/2", "ep 2/2"]
    init, sd = load(finished(jobs, "pretrain")[1] / "last.pt")["model"], load(out / "last.pt")["model"]
    encoder = [k for k in sd if not k.startswith("head.")]
    assert "cls_token_mlp.fc2.weight" in encoder and "norm.weight" in encoder and "blocks.11.mlp.fc2.bias" in encoder
    for k in encoder:
        assert torch.equal(sd[k], init[k]), k
    assert sd["head.0.num_batches_tracked"] == 4 and sd["head.0.running_mean"].abs().max() > 0
    assert res["trainable_params"] == 192 * 10 + 10


def test_convert_then_finetune(jobs):
    """convert writes {"model": sd} with exactly the encoder's keys (CLS token, positions, patch embedding, 12 blocks,
    final norm; no CLS MLP, adapter, decoder or mask token), every tensor the pretrained one but cls_token =
    MLP(cls_token) (exact GELU); a fine-tuning step from it (LR 0 at step 1) loads it strictly: its encoder is that
    file's, with no CLS MLP."""
    conv, _ = finished(jobs, "convert")
    assert "wrote" in conv.stdout and "12 blocks, width 192" in conv.stdout
    raw = load(finished(jobs, "pretrain")[1] / "last.pt")["model"]
    ckpt = load(jobs["runs"]["convert"][0][-1])
    assert list(ckpt) == ["model"]
    sd = ckpt["model"]
    assert sd.keys() == {
        k for k in raw if k.split(".")[0] in ("cls_token", "pos_embed", "patch_embed", "blocks", "norm")
    }
    assert len([k for k in sd if k.startswith("blocks.")]) == 12 * 12
    for k in sd.keys() - {"cls_token"}:
        assert torch.equal(sd[k], raw[k]), k
    w = {k: raw[f"cls_token_mlp.{k}"] for k in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")}
    h = torch.nn.functional.gelu(torch.nn.functional.linear(raw["cls_token"], w["fc1.weight"], w["fc1.bias"]))
    torch.testing.assert_close(sd["cls_token"], torch.nn.functional.linear(h, w["fc2.weight"], w["fc2.bias"]))
    assert (sd["cls_token"] - raw["cls_token"]).abs().max() > 1e-2
    _, out = finished(jobs, "finetune_converted")
    assert_finite_results(read_results(out), "top1", "top5", "top1_best")
    assert [(t["step"], t["lr"]) for t in train_records(out)] == [(1, 0.0)]
    tuned = load(out / "last.pt")["model"]
    assert not any(k.startswith("cls_token_mlp") for k in tuned) and {"head.weight", "fc_norm.bias"} <= tuned.keys()
    for k in sd.keys() - {"norm.weight", "norm.bias"}:  # the global-pool fine-tuning model has fc_norm, no norm
        assert torch.equal(tuned[k], sd[k]), k


# ---- torchrun and streamed data -----------------------------------------------------------------------------------
def test_torchrun_pretrain_streamed(jobs):
    """The `pretrain` recipe under torchrun --nproc_per_node=2 on the CPU (gloo), streaming ImageNet photos through
    DataLoader workers (each rank its half of every global batch, no DistributedSampler), on a saved ViT-Tiny base:
    2 steps of 8, logged global means with the relation loss near ln 16 at init, one summary line (rank 0 alone
    prints), the k-NN over features gathered from both ranks."""
    proc, out = jobs["futures"]["woof"].result()
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = read_results(out)
    assert res["world_size"] == 2 and res["steps_done"] == 2 and res["images_seen"] == 16, res
    assert res["args"]["recipe"] == "pretrain" and not res["args"]["in_memory"] and res["args"]["arch"] == "vit_tiny"
    assert_finite_results(res, "knn_top1", "knn_top5", "train_time_s")
    assert 0 <= res["knn_top1"] <= res["knn_top5"] <= 100
    train = train_records(out)
    assert [r["step"] for r in train] == [1, 2]
    for r in train:
        assert r["loss"] == pytest.approx(r["loss_fea"] + r["loss_att"], rel=1e-6) and r["loss_fea"] > 0, r
    assert abs(train[0]["loss_att"] - math.log(16)) < 0.1, train
    assert summary_lines(proc) == ["ep 1/1"]
    assert (out / "last.pt").is_file()


# ---- resume -------------------------------------------------------------------------------------------------------
def test_resume_after_a_stop_equals_uninterrupted(jobs):
    """The pretrain smoke run stopped by --max-steps 2 (mid-epoch) and rerun ends with exactly the uninterrupted
    run's state: every weight, AdamW's moments and step counts, the step and image counts, the logged losses of
    every step, and the same final k-NN and probe accuracies (the frozen base is reloaded, the crops and the masks
    are drawn from per-step seeds)."""
    _, ref = finished(jobs, "pretrain")
    finished(jobs, "stop")
    final, out = finished(jobs, "resume")
    assert f"resumed from {out / 'last.pt'} at step 2" in final.stdout
    a, b = load(ref / "last.pt"), load(out / "last.pt")
    assert a["step"] == b["step"] == 4 and a["images_seen"] == b["images_seen"] == 4 * 32
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys() and len(sa) > 200
    for i in sa:
        assert sa[i].keys() == sb[i].keys() == {"step", "exp_avg", "exp_avg_sq"}
        for k in sa[i]:
            assert torch.equal(sa[i][k], sb[i][k]), (i, k)
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    res_a, res_b = read_results(ref), read_results(out)
    for k in ("knn_top1", "knn_top5", "linear_fast_top1", "steps_done", "images_seen"):
        assert res_a[k] == res_b[k], k
    log_a, log_b = train_records(ref), train_records(out)
    assert [r["step"] for r in log_b] == [1, 2, 3, 4] and log_a == log_b


def assert_grads_close(got: list, want: list, what: str):
    """Per step, every gradient within 1e-4 of its tensor's largest entry, plus 1e-5 of the step's largest one."""
    assert len(got) == len(want) == 2 and len(want[0]) > 200
    for step, (g, w) in enumerate(zip(got, want)):
        assert g.keys() == w.keys()
        floor = 1e-5 * max(t.abs().max().item() for t in w.values())
        for k, t in w.items():
            msg = lambda m: f"{what}, step {step + 1}, {k}: {m}"  # noqa: E731
            torch.testing.assert_close(g[k], t, rtol=0, atol=1e-4 * t.abs().max().item() + floor, msg=msg)


# ---- DDP ----------------------------------------------------------------------------------------------------------
def test_ddp_two_ranks_equal_one_process(jobs):
    """2 DDP ranks (gloo) of cifar-pretrain, 2 steps at global batch 16 without warm-up, against one process: the same
    logged losses; both ranks' gradients at both steps equal the single process's (its global batch in one backward:
    each rank keeps its share of the crops and masks drawn for the global batch, and the per-rank losses average to
    the global one, as every rank has the same number of images and of masked patches; no BatchNorm), to 1e-4 of
    each tensor's largest entry (measured: 3e-6); AdamW's moments likewise; both ranks' weights are identical.

    The weights themselves: AdamW's first steps move each weight by about lr x sign(gradient), so where the exact
    gradient is 0 (the attention key biases: a softmax ignores a constant added to its logits) the rounding noise
    decides the sign, and such a weight may differ by up to 2 lr per step (measured: 0.04 lr; 1.3e-3 of the sampled
    weights off by more than 1e-3 lr). Hence: every weight within 4 lr; those whose gradients at both steps exceed
    1e-6 of their tensor's largest (over 99% of the trained ones) within 1e-3 lr + 1e-6 |w| (the float spacing of a
    weight near 1 is 1e-7: 3e-3 lr); over 90% of the weights moved by more than that."""
    r = jobs["futures"]["ddp"].result()
    ref = r["single"]
    log_ddp, log_ref = train_records(r["out"] / "ddp"), train_records(r["out"] / "single")
    assert [t["step"] for t in log_ddp] == [t["step"] for t in log_ref] == [1, 2]
    for t, u in zip(log_ddp, log_ref):
        assert t["lr"] == u["lr"]
        for k in ("loss", "loss_fea", "loss_att"):
            assert t[k] == pytest.approx(u[k], rel=1e-5), (t, u)
    assert read_results(r["out"] / "ddp")["world_size"] == 2 and read_results(r["out"] / "single")["world_size"] == 1
    lr = log_ref[0]["lr"]
    assert lr == pytest.approx(5e-4 * 16 / 256)
    for rank in (0, 1):
        got = r[f"rank{rank}"]
        assert_grads_close(got["grads"], ref["grads"], f"rank {rank}")
        assert_grads_close(
            [got["exp_avg"], got["exp_avg_sq"]], [ref["exp_avg"], ref["exp_avg_sq"]], f"AdamW, rank {rank}"
        )
        assert got["init"].keys() == ref["init"].keys()
        for k in ref["init"]:
            assert torch.equal(got["init"][k], ref["init"][k]), k  # the same seeded model
            assert torch.equal(got["weights"][k], r["rank0"]["weights"][k]), k
    n_signal = n_all = n_moved = 0
    for k, w in ref["weights"].items():
        diff = (r["rank0"]["weights"][k] - w).abs()
        assert diff.max() <= 4 * lr, (k, diff.max())
        n_all += w.numel()
        n_moved += ((w - ref["init"][k]).abs() > 1e-3 * lr).sum().item()
        if k in ref["grads"][0]:
            g1, g2 = (ref["grads"][i][k].abs() for i in (0, 1))
            signal = (g1 > 1e-6 * g1.max()) & (g2 > 1e-6 * g2.max())
            n_signal += signal.sum().item()
            off = signal & (diff > 1e-3 * lr + 1e-6 * w.abs())
            assert not off.any(), (k, diff[off], w[off])
    assert n_signal > 0.9 * n_all and n_moved > 0.9 * n_all, (n_signal, n_moved, n_all)
    assert all(not torch.equal(g, ref["grads"][1][k]) for k, g in ref["grads"][0].items() if g.abs().max() > 0)


# ---- --accum-iter -------------------------------------------------------------------------------------------------
def test_accum_iter_2_logs_the_same_losses(jobs):
    """The pretrain smoke run with --accum-iter 2 (2 micro-batches of 16, one backward each): step 1 logs the same
    loss, loss_fea and loss_att as --accum-iter 1 (the micro-batch means average to the batch mean: the same number
    of images and masked patches in each), to float rounding; the later steps too (step 1's LR is 0; AdamW's next
    updates differ only where the gradient is rounding noise), and the run finishes like the smoke run. And (through
    tests/tec_ddp_step.py, 2 steps at batch 16 without warm-up) the gradients handed to AdamW equal --accum-iter 1's:
    each micro-batch loss is divided by 2 (which the logged losses, and AdamW's nearly scale-free steps, would not
    show)."""
    helper = jobs["futures"]["ddp"].result()
    assert read_results(helper["out"] / "accum2")["args"]["accum_iter"] == 2
    assert_grads_close(helper["accum2"]["grads"], helper["single"]["grads"], "--accum-iter 2")
    assert [t["loss"] for t in train_records(helper["out"] / "accum2")] == pytest.approx(
        [t["loss"] for t in train_records(helper["out"] / "single")], rel=1e-5
    )
    _, ref = finished(jobs, "pretrain")
    proc, out = finished(jobs, "accum")
    assert read_results(out)["args"]["accum_iter"] == 2
    check_run(read_results(out), "cifar-pretrain", 4, "knn_top1", "linear_fast_top1")
    a, b = train_records(ref), train_records(out)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for one, two in zip(a, b):
        for k in ("loss", "loss_fea", "loss_att"):
            assert two[k] == pytest.approx(one[k], rel=1e-5 if one["step"] == 1 else 1e-4), (one, two)
    assert summary_lines(proc) == ["ep 1/2", "ep 2/2"]


# ---- bad inputs ---------------------------------------------------------------------------------------------------
def check_bad_run(name, cmd, needles, proc):
    """Exit code 1, one `tec_mae.py: error:` line with every needle, no traceback, no results.json."""
    assert proc.returncode == 1, (name, proc.returncode, proc.stderr[-2000:])
    assert_one_line_error(proc, "tec_mae.py: error: ", *needles)
    if "--out-dir" in map(str, cmd):
        assert not (out_dir(cmd) / "results.json").exists()


BAD = ["no_data", "arch", "batch_vs_world", "accum", "base_key", "init_size", "convert_out", "convert_what"]
BAD += ["linear_init", "init_missing", "topk"]


def test_bad_inputs_fail_with_one_line(jobs):
    """Missing data; an unknown arch; a batch that does not split over WORLD_SIZE=2 ranks; a per-rank batch that does
    not split into --accum-iter micro-batches; a base checkpoint without blocks.3.attn.qkv.weight (named); a ViT-Tiny
    --init into ViT-Small (shape mismatch, named); convert without --convert-out, or of a checkpoint that is no ViT;
    linear without --init; a missing --init file; --topk over the patch count."""
    runs = jobs["futures"]["bad"].result()
    failures = []
    for name in BAD:
        cmd, _, needles = jobs["bad"][name]
        try:
            check_bad_run(name, cmd, needles, runs[name])
        except AssertionError as e:
            failures.append(f"{name}: {' '.join(map(str, cmd[1:]))}:\n{e}")
    assert not failures, "\n\n".join(failures)


def test_non_finite_loss_names_the_step(jobs):
    """An absurd LR (blr 1e30, no warm-up): step 1's update ruins the weights, the run stops at the next log point
    with one line naming step 2, and writes neither results.json nor a checkpoint."""
    cmd, _, needles = jobs["bad"]["non_finite"]
    check_bad_run("non_finite", cmd, needles, jobs["futures"]["bad"].result()["non_finite"])
    assert not (out_dir(cmd) / "last.pt").exists()


def test_finetune_recipes_ignore_the_probe_batch_size(jobs):
    """cifar-linear with --max-steps 0 (evaluate the init) on 100 training images, the recipe's probe settings kept:
    the fast probe is not part of linear, so its batch size must not stop the run."""
    proc = jobs["futures"]["bad"].result()["probe_unused"]
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = out_dir(jobs["bad"]["probe_unused"][0])
    assert_finite_results(read_results(out), "top1", "top5")
