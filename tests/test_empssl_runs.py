"""End-to-end runs of empssl_cifar.py on real CIFAR-10 images: smoke, learning, resume after a kill, DDP, bad inputs."""

import dataclasses
import json
import math
import re
import shutil
import sys
from types import SimpleNamespace

import pytest
import torch

from forkrun import forked_in_two
from conftest import ROOT, assert_one_line_error, ddp_beside_reference, read_log, run_script, start_script

SCRIPT = ROOT / "empssl_cifar.py"
# small and fast on 2 CPU cores: the ImageNet-stem ResNet-18 on 32x32 costs 1/16 of the CIFAR stem
TINY = "--batch-size 16 --n-patches 2 --arch resnet18 --hidden-dim 128 --z-dim 32 --device cpu --log-every 5"
TINY += " --probe-epochs 20"


def empssl(data_dir, out_dir, extra: str = "") -> list:
    """The command line of a tiny run on an image folder; later flags override TINY's."""
    return [SCRIPT, *imagefolder(data_dir), *TINY.split(), *extra.split(), "--out-dir", out_dir]


def imagefolder(path):
    return ["--dataset", "imagefolder", "--data-dir", path]


def test_learns_on_real_cifar(cifar_dir, tmp_path):
    """3 epochs on 400 real CIFAR-10 images: the loss falls, the linear probe beats the same probe on the untrained
    network (--max-steps 0, run alongside) by a wide margin, every evaluation runs, and results.json is complete."""
    flags = "--batch-size 32 --n-patches 4 --hidden-dim 256 --z-dim 128 --epochs 3 --lr-epochs 3 --eval-patches 4"
    flags += " --probe-epochs 30 --log-every 4"
    out, init = tmp_path / "run", tmp_path / "init"
    baseline = start_script(empssl(cifar_dir, init, flags + " --max-steps 0"))
    proc = run_script(
        empssl(cifar_dir, out, flags + " --eval-every-steps 24 --eval-whole-image --bench-ceiling-steps 1")
    )
    assert baseline.wait() == 0 and proc.returncode == 0, proc.stderr[-3000:]
    res, res0 = (json.loads((d / "results.json").read_text()) for d in (out, init))
    assert res0["steps_done"] == 0 and res["steps_done"] == 3 * (400 // 32)
    # measured here: 11.0% untrained, 24.0% trained (200 test images, 10 classes; one standard error is ~3 points)
    assert res["linear_top1"] > res0["linear_top1"] + 6, (res0["linear_top1"], res["linear_top1"])
    for key in ("knn_top1", "knn_top5", "linear_top1", "linear_top1_best", "whole_knn_top1", "whole_linear_top1"):
        assert 0.0 <= res[key] <= 100.0, (key, res[key])
    assert res["linear_top1"] <= res["linear_top1_best"]
    timed = ("data_time_s", "train_time_s", "encode_s", "probe_s", "knn_s", "total_time_s", "patches_per_s")
    for key in timed + ("ceiling_patches_per_s", "ceiling_ratio"):
        assert res[key] > 0 and math.isfinite(res[key]), key
    assert res["patches_seen"] == 36 * 32 * 4 and res["args"]["n_patches"] == 4 and res["world_size"] == 1
    log = read_log(out)
    train = [r for r in log if r["type"] == "train"]
    assert [r["tag"] for r in log if r["type"] == "eval"] == ["step 24", "final"]
    assert [r["epoch"] for r in log if r["type"] == "epoch"] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) for r in train)
    assert train[-1]["loss"] < train[0]["loss"] - 1.0, [r["loss"] for r in train]
    # one summary line per epoch on stdout
    assert [ln.split(" |")[0] for ln in proc.stdout.splitlines() if ln.startswith("ep ")] == [
        "ep 1/3",
        "ep 2/3",
        "ep 3/3",
    ]


def test_evaluation_resumes_from_feature_cache(cifar_dir, tmp_path):
    """A finished run started again skips training and reuses the cached bag features: same accuracies."""
    flags = empssl(cifar_dir, tmp_path, "--epochs 1 --max-steps 3 --eval-patches 2")
    first = run_script(flags)
    assert first.returncode == 0, first.stderr[-3000:]
    r1 = json.loads((tmp_path / "results.json").read_text())
    cached = sorted(p.name for p in (tmp_path / "cache").rglob("*.pt"))
    assert cached == ["test.pt", "train.pt"]
    second = run_script(flags)
    assert second.returncode == 0, second.stderr[-3000:]
    r2 = json.loads((tmp_path / "results.json").read_text())
    assert "resumed from" in second.stdout and "ep 1/1" not in second.stdout  # no training step ran
    assert (r2["knn_top1"], r2["linear_top1"]) == (r1["knn_top1"], r1["linear_top1"])
    assert r2["encode_s"] < r1["encode_s"]


def test_ddp_two_ranks_equal_one_process(cifar_dir, tmp_path):
    """2-process torchrun (gloo): the first step's loss, gradients and LARS-updated weights equal one process on the
    same global batch (per-rank BatchNorm emulated by running each rank's images separately); so does the vonmises
    uniformity term (its value: its gradient takes the TCR's gathered path)."""
    worker = ROOT / "tests" / "empssl_ddp_step.py"
    (tmp_path / "ddp").mkdir()
    (tmp_path / "ref").mkdir()
    ddp_beside_reference(
        [worker, cifar_dir, tmp_path / "ddp"], [worker, cifar_dir, tmp_path / "ref", "--emulate-ranks", "2"]
    )
    ref = torch.load(tmp_path / "ref" / "rank0.pt")
    for rank in (0, 1):
        got = torch.load(tmp_path / "ddp" / f"rank{rank}.pt")
        torch.testing.assert_close(got["loss"], ref["loss"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got["tcr"], ref["tcr"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got["vonmises"], ref["vonmises"], rtol=1e-5, atol=1e-5)  # over the global batch
        for k, g in ref["grads"].items():
            torch.testing.assert_close(got["grads"][k], g, rtol=1e-4, atol=1e-6, msg=lambda m: f"grad {k}: {m}")
        for k, w in ref["weights"].items():
            torch.testing.assert_close(got["weights"][k], w, rtol=1e-5, atol=1e-6, msg=lambda m: f"weight {k}: {m}")
    assert ref["grads"]["backbone.conv1.weight"].abs().sum() > 0  # the comparison is not vacuous


def tiny_imagenet_layout(cifar_dir, dst):
    """Real CIFAR-10 JPEGs in Tiny-ImageNet's unzipped layout: wnids.txt, train/<wnid>/images/*.JPEG beside
    <wnid>_boxes.txt, val/images/ (shuffled) labelled by val/val_annotations.txt, test/images/ without labels."""
    classes = sorted(d.name for d in (cifar_dir / "train").iterdir())
    wnids = [f"n{9000000 + 17 * i:08d}" for i in range(len(classes))]
    (dst / "val" / "images").mkdir(parents=True)
    (dst / "test" / "images").mkdir(parents=True)
    (dst / "wnids.txt").write_text("\n".join(wnids) + "\n")
    for c, w in zip(classes, wnids):
        (dst / "train" / w / "images").mkdir(parents=True)
        (dst / "train" / w / f"{w}_boxes.txt").write_text("")
        for k, f in enumerate(sorted((cifar_dir / "train" / c).iterdir())):
            (dst / "train" / w / "images" / f"{w}_{k}.JPEG").symlink_to(f)
    val = [(f, w) for c, w in zip(classes, wnids) for f in sorted((cifar_dir / "test" / c).iterdir())]
    order = torch.randperm(len(val), generator=torch.Generator().manual_seed(0)).tolist()
    rows = []
    for k, i in enumerate(order):
        (dst / "val" / "images" / f"val_{k}.JPEG").symlink_to(val[i][0])
        (dst / "test" / "images" / f"test_{k}.JPEG").symlink_to(val[i][0])
        rows.append(f"val_{k}.JPEG\t{val[i][1]}\t0\t2\t30\t31")
    (dst / "val" / "val_annotations.txt").write_text("\n".join(rows) + "\n")
    return dst, [val[i] for i in order], wnids


def documented(needle: str) -> list:
    """The flags of the docstring's command line that contains needle, its $VARIABLES expanded."""
    sys.path.insert(0, str(ROOT))
    import empssl_cifar as E

    lines = [ln.strip() for ln in E.__doc__.splitlines()]
    env = dict(re.match(r'(\w+)="(.*)"$', ln).groups() for ln in lines if re.match(r'\w+=".*"$', ln))
    words = next(ln for ln in lines if needle in ln).split("#")[0].split()
    words = [w for a in words for w in (env[a[1:]].split() if a.startswith("$") else [a])]
    return words[words.index("empssl_cifar.py") + 1 :]


ROWS = {  # the docstring's rows: published number -> the settings its command must carry
    "Tiny-ImageNet 1 epoch: 38.1%": dict(image_size=64, epochs=1, lr_epochs=2, n_patches=20),
    "51.5%": dict(image_size=64, epochs=10, lr_epochs=10, n_patches=200),
    "ImageNet-100 1 epoch: 58.5%": dict(image_size=256, epochs=1, lr_epochs=2, n_patches=20),
    "78.9%": dict(image_size=256, epochs=10, lr_epochs=10, n_patches=200),
}
OFFICIAL_IMAGENET = dict(dataset="imagefolder", arch="resnet18", patch_aug="imagenet", patch_size=224, lr=0.3)
KACHAYEV = dict(lr_schedule="epoch-cosine-kachayev", solarize_threshold=192, probe_lr=0.0075, eval_patches=20)
KACHAYEV.update(uniformity_loss="vonmises", inv_weight=1.5, tcr_weight=1.0, emb_pool="proj", z_dim=4096, epochs=10)


def test_documented_rows_tiny_imagenet_layout_imagenet100_kachayev(small_cifar_dir, imagewoof_dir, tmp_path):
    """Every new docstring row parses to the settings of its source (the official ImageNet patches and ResNet-18;
    kachayev's notes); the 1-epoch Tiny-ImageNet and ImageNet-100 rows and the h=256 kachayev row run at CPU scale
    (later flags shrink them; the torchrun rows' flags are those of the 1-epoch rows plus 200 patches and 10 epochs,
    the h=2048 row's those of the h=256 row but h). The unzipped Tiny-ImageNet layout loads as it is: val labels from
    val_annotations.txt, test/ (no labels) unread; a row naming no image, or no class, ends in one line. The
    ImageNet-100 row runs on real ImageNet photos with a val/ split, resized at load."""
    sys.path.insert(0, str(ROOT))
    import empssl_cifar as E

    tiny, val, wnids = tiny_imagenet_layout(small_cifar_dir, tmp_path / "tiny-imagenet-200")
    woof = imagewoof_dir
    for needle, want in ROWS.items():
        args = E.parse_args(documented(needle))
        assert {k: getattr(args, k) for k in {**OFFICIAL_IMAGENET, **want}} == {**OFFICIAL_IMAGENET, **want}, needle
    for needle, h in (("similar output performance", 2048), ("84+% top1", 256)):
        args = E.parse_args(documented(needle))
        assert {k: getattr(args, k) for k in KACHAYEV} == KACHAYEV and args.hidden_dim == h, needle

    data = E.load_data(E.Args(dataset="imagefolder", data_dir=str(tiny), image_size=32))
    assert data["num_classes"] == 10 and len(data["train_x"]) == 100 and len(data["test_x"]) == 50
    assert data["test_y"].tolist() == [wnids.index(w) for _, w in val]
    assert torch.equal(data["test_x"][:3], E.decode_files([f for f, _ in val[:3]], 32, 32))
    assert torch.equal(data["train_y"], torch.arange(10).repeat_interleave(10))
    bad = tmp_path / "bad"
    shutil.copytree(tiny, bad, symlinks=True)
    with open(bad / "val" / "val_annotations.txt", "a") as f:
        f.write(f"val_999.JPEG\t{wnids[0]}\t0\t0\t9\t9\n")

    shrink = f"{TINY} --max-steps 1 --eval-patches 1 --patch-size 32 --probe-epochs 5"
    runs = {  # the Tiny-ImageNet folder as unzipped; real ImageNet photos (train/, val/) for ImageNet-100
        "tiny": [*documented("38.1%"), *shrink.split(), "--data-dir", tiny],
        "in100": [*documented("ImageNet-100 1 epoch"), *shrink.split(), "--image-size", "64", "--data-dir", woof],
        "h256": [*documented("84+%"), *shrink.split(), "--hidden-dim", "256", "--z-dim", "4096"],
    }  # fmt: skip
    runs = {k: [SCRIPT, *v, *(imagefolder(small_cifar_dir) if k[0] == "h" else []), "--out-dir", tmp_path / k]
            for k, v in runs.items()}  # fmt: skip
    broken = empssl(bad, tmp_path / "o-bad", "--max-steps 1")
    first, procs = forked_in_two(broken, [(cmd, None) for cmd in runs.values()], [], tmp_path / "logs")
    assert_one_line_error(first, "val_annotations.txt", "val_999.JPEG", "names no val/images/ file")
    for name, proc in zip(runs, procs, strict=True):
        assert proc.returncode == 0, (name, proc.stderr[-3000:])
        res = json.loads((tmp_path / name / "results.json").read_text())
        assert res["steps_done"] == 1 and 0 <= res["linear_top1"] <= 100 and 0 <= res["knn_top1"] <= 100, name
    for name in ("tiny", "in100"):
        res = json.loads((tmp_path / name / "results.json").read_text())
        assert res["args"]["patch_aug"] == "imagenet" and "h (128-d)" in res["eval_protocol"]
    for name in ("h256",):
        res = json.loads((tmp_path / name / "results.json").read_text())
        assert "z (4096-d)" in res["eval_protocol"] and res["args"]["uniformity_loss"] == "vonmises"
        train = [r for r in read_log(tmp_path / name) if r["type"] == "train"]
        # -log mean exp(-2 |zbar_i - zbar_j|^2), the zbar means of unit vectors (|.|^2 <= 4): finite, in (0, 8]
        assert train and all(math.isfinite(r["-vonmises"]) and 0 < r["-vonmises"] <= 8 for r in train), train


# ---- bad inputs: one clear line on stderr, non-zero exit --------------------------------------------------------
def test_bad_inputs_fail_with_one_line(cifar_dir, tmp_path):
    """Each bad input in its own process (forked), two at a time: exit code != 0 and one `error:` line naming the
    problem, no traceback. Missing data, an unknown arch, a batch that does not split over torchrun's 2 ranks
    (checked from the environment before any process group), a checkpoint of another model (strict load, after a
    1-step run), an absurd LR (the un-LARS'd BatchNorm parameters blow up: the first bad step is named), a corrupt
    image (named), a file that is not a training checkpoint, --device cuda without CUDA, an image folder without a
    test split."""
    data = tmp_path / "data"
    shutil.copytree(cifar_dir, data)
    bad = sorted((data / "train" / "cat").iterdir())[3]
    bad.write_bytes(b"not a jpeg")
    torch.save({"model": {}}, tmp_path / "weights.pt")  # e.g. exported weights, not a run's last.pt
    (tmp_path / "no-test" / "train").mkdir(parents=True)
    ddp_env = dict(RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29999")
    trained = empssl(cifar_dir, tmp_path / "run", "--max-steps 1 --eval-patches 0")
    cases = [  # (command, env, needles)
        (empssl(tmp_path / "nope", tmp_path / "o1"), None, ["data dir not found", "nope"]),
        (empssl(cifar_dir, tmp_path / "o2", "--arch resnet19"), None, ["unknown --arch 'resnet19'"]),
        (empssl(cifar_dir, tmp_path / "o3", "--batch-size 15"), ddp_env,
         ["--batch-size 15 does not divide by the world size 2"]),
        (empssl(cifar_dir, tmp_path / "o4", "--lr 1e20 --lr-schedule constant --eval-patches 0"), None,
         ["non-finite loss at step 2"]),
        (empssl(data, tmp_path / "o5"), None, ["cannot decode image", str(bad)]),
        (empssl(cifar_dir, tmp_path / "o6", f"--resume {tmp_path / 'weights.pt'}"), None,
         ["is not a training checkpoint of this script"]),
        (empssl(tmp_path / "no-test", tmp_path / "o7"), None, ["must hold train/ and test/"]),
    ]  # fmt: skip
    if not torch.cuda.is_available():
        cases.append((empssl(cifar_dir, tmp_path / "o8", "--device cuda"), None, ["--device cuda but no CUDA device"]))
    after_training = [([*trained, "--z-dim", "16"], None, ["last.pt", "shape mismatch", "projection.3.weight"])]
    # forked from two processes that imported the script once (tests/forkrun.py): 0.5 s a case instead of 4
    first, procs = forked_in_two(trained, cases, after_training, tmp_path / "logs")
    assert first.returncode == 0, first.stderr[-3000:]
    failures = []
    for (cmd, _, needles), proc in zip(cases + after_training, procs, strict=True):
        try:
            assert_one_line_error(proc, *needles)
        except AssertionError as e:
            failures.append(f"{' '.join(map(str, cmd[1:]))}:\n{e}")
    assert not failures, "\n\n".join(failures)


@pytest.mark.parametrize(
    "flags, message",
    [
        (dict(eval_memory_gb=0.0), "--eval-memory-gb must be > 0"),
        (dict(log_every=0), "--log-every must be >= 1"),
        (dict(max_steps=-1), "--max-steps must be >= 0"),
        (dict(crop_scale=1.5), "--crop-scale must be in (0, 1]"),
        (dict(eps=0.0), "--eps must be > 0"),
        (dict(lr=-0.3), "--lr must be > 0, got -0.3"),
        (dict(epochs=0), "--epochs must be >= 1"),
        (dict(n_patches=0), "--n-patches must be >= 1"),
        (dict(probe_lr=0.0), "--probe-lr must be > 0"),
        (dict(device="mps"), "unknown --device 'mps'"),
        (dict(uniformity_loss="vonmises", batch_size=1), "--uniformity-loss vonmises needs pairs of images"),
    ],
)
def test_out_of_range_arguments(flags, message):
    """Checked in-process (the subprocess path is the same check_args, exercised by the tests above)."""
    sys.path.insert(0, str(ROOT))
    import empssl_cifar as E

    with pytest.raises(E.RunError, match=re.escape(message)):
        E.check_args(E.Args(**flags), world_size=1)


def test_bag_features_are_the_mean_h_of_each_splits_own_patches():
    """encode_bag: eval-mode h averaged over the patches drawn from the images it is given (not another split's)."""
    from contextlib import nullcontext

    sys.path.insert(0, str(ROOT))
    import empssl_cifar as E

    args = E.Args(dataset="fake", arch="resnet18", hidden_dim=32, z_dim=8, device="cpu")
    torch.manual_seed(0)
    model = E.EMPSSL(args.arch, args.hidden_dim, args.z_dim)
    run = SimpleNamespace(
        args=args,
        model=model,
        device=torch.device("cpu"),
        rank=0,
        world_size=1,
        encode=model.encode,
        autocast=nullcontext(),
        fmt=torch.contiguous_format,
    )
    a = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    feats_a, feats_b = E.encode_bag(run, a, "test", 3), E.encode_bag(run, 255 - a, "test", 3)
    assert feats_a.shape == (5, 32) and not torch.allclose(feats_a, feats_b)
    key = (args.seed, "eval", "test", 0, 0)
    patches = next(E.patch_batches(a, [torch.arange(5)], [key], 3, args, torch.device("cpu")))
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(feats_a, model.encode(patches).view(3, 5, -1).mean(0))
    whole = E.encode_bag(run, a, "test", 0)  # whole unaugmented images
    with torch.no_grad():
        torch.testing.assert_close(whole, model.encode((a.float() / 255 - 0.5) / 0.5))
    # a memory budget of about 5 patches per forward: the same features from forwards of at most that many patches
    # (the first forward, of 3 patches, is the estimate's; the patches of a block come from one seed whatever the
    # budget; 128 patches of 100 images at once took 16 GB)
    one = torch.zeros(1, 3, 32, 32)
    per_patch = E.inputs_per_chunk(model.encode, one, 1.0) ** -1  # GB one patch may take, by the estimate
    run.args = dataclasses.replace(args, eval_memory_gb=5.5 * per_patch)
    sizes, encode = [], model.encode
    run.encode = lambda x: sizes.append(len(x)) or encode(x)
    torch.testing.assert_close(E.encode_bag(run, a, "test", 3), feats_a)
    assert sizes == [3, 5, 5, 5] and E.inputs_per_chunk(encode, one, run.args.eval_memory_gb) == 5


def test_tiny_imagenet_without_rows_or_classes_says_so(tmp_path):
    """An empty val_annotations.txt, or no class folder in train/, is named in one line (not a garbled row)."""
    sys.path.insert(0, str(ROOT))
    import empssl_cifar as E

    (tmp_path / "val" / "images").mkdir(parents=True)
    (tmp_path / "val" / "val_annotations.txt").write_text("\n")
    (tmp_path / "train" / "n01").mkdir(parents=True)
    with pytest.raises(E.RunError, match=r"needs class folders in .*train and rows in .*val_annotations.txt"):
        E.tiny_imagenet(tmp_path, 32)
