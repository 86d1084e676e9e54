"""swav_imagenet.py --init and backbone.pt: the official SwAV layouts (facebookresearch/swav: the released
swav_*_pretrain.pth.tar, a state dict of the DDP model with src/resnet50.py's names; main_swav.py's checkpoints,
{"epoch", "state_dict", "optimizer", "amp"}), built here from those names, load with the official model's features
(its ConstantPad2d(1) + conv1 padding 2 is our padding 3) and head; a run evaluates them with --max-steps 0 on real
photos and leaves a backbone.pt that torchvision loads strictly; every wrong file ends in one line and exit 1. Also
the several prototype sets' MultiPrototypes files, and the wide ResNet-50s' documented commands and releases."""

import sys
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from conftest import ROOT, assert_finite_results, assert_one_line_error, read_results, recipe_cmd
from forkrun import forked_runs

sys.path.insert(0, str(ROOT))
import swav_imagenet as S  # noqa: E402
from common.checkpoint import CheckpointError, init_weights  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torchvision.io decoders


def official_names(sd: dict) -> dict:
    """Our SwAV state dict under facebookresearch/swav's names, as main_swav.py's DDP model holds them: `module.` +
    src/resnet50.py's ResNet (torchvision's names, no fc), projection_head.{0,1,3}, prototypes.weight."""

    def rename(k: str) -> str:
        return k.removeprefix("backbone.") if k.startswith("backbone.") else k.replace("head.", "projection_head.", 1)

    return {"module." + rename(k): v.clone() for k, v in sd.items()}


def random_swav(arch="resnet50", hidden=2048, feat=128, k=3000, seed=1) -> S.SwAV:
    """A SwAV model with random weights and non-trivial BatchNorm statistics (so eval mode tests them)."""
    torch.manual_seed(seed)
    model = S.SwAV(arch, hidden, feat, k)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.2, 0.2), m.running_var.uniform_(0.5, 1.5), m.bias.data.uniform_(-0.1, 0.1)
    return model.eval()


def official_forward(sd: dict, x: torch.Tensor, hidden: int = 2048) -> tuple:
    """The official src/resnet50.py forward, rebuilt from torchvision parts: ConstantPad2d(1), conv1 with padding 2,
    the ResNet-50 trunk, avgpool; projection_head (Linear, BN, ReLU, Linear), L2-normalise, prototypes (no bias)."""
    sd = {k[len("module.") :]: v for k, v in sd.items()}
    trunk = torchvision.models.resnet50()
    trunk.conv1.padding, trunk.fc = (2, 2), nn.Identity()
    trunk.load_state_dict({k: v for k, v in sd.items() if not k.startswith(("projection_head.", "prototypes."))})
    head = nn.Sequential(nn.Linear(2048, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, 128))
    head.load_state_dict({k[len("projection_head.") :]: v for k, v in sd.items() if k.startswith("projection_head.")})
    prototypes = nn.Linear(128, sd["prototypes.weight"].shape[0], bias=False)
    prototypes.weight.data.copy_(sd["prototypes.weight"])
    with torch.no_grad():
        h = nn.Sequential(nn.ConstantPad2d(1, 0.0), trunk).eval()(x)
        z = F.normalize(head.eval()(h), dim=1)
        return h, z, prototypes(z)


def test_official_layouts_load_with_the_official_features(tmp_path, one_thread):
    """The release (in the legacy pre-1.6 serialisation) and a main_swav.py checkpoint load every tensor (backbone,
    head.{0,1,3} from projection_head.{0,1,3}, prototypes) into our ResNet-50 SwAV; our backbone, z and scores equal
    the official forward's (its padding module + conv1 padding 2 is padding 3), and backbone.pt's tensors load
    strictly into torchvision's resnet50 with fc = Identity, which gives the same features."""
    src = random_swav()
    official = official_names(src.state_dict())
    assert {"module.conv1.weight", "module.projection_head.3.bias", "module.prototypes.weight"} <= official.keys()
    files = {"release.pth.tar": (official, "SwAV release (swav_*_pretrain.pth.tar)")}  # saved in the legacy format
    state = dict(epoch=800, state_dict=official, optimizer=dict(state={}, param_groups=[dict(lr=0.0048, params=[0])]))
    files["ckp-799.pth"] = (dict(state, amp=dict(loss_scaler0=dict(loss_scale=65536.0, unskipped=0))),
                            "main_swav.py checkpoint")  # fmt: skip
    x = torch.randn(2, 3, 64, 64)
    h_off, z_off, s_off = official_forward(official, x)
    for name, (obj, fmt) in files.items():
        torch.save(obj, tmp_path / name, _use_new_zipfile_serialization=name != "release.pth.tar")
        model = random_swav(seed=0)
        assert (model.backbone(x) - h_off).abs().max() > 1e-2  # not loaded yet: other features
        line = init_weights(model, tmp_path / name, S.INIT_FORMATS)
        assert line == f"--init {tmp_path / name}: {fmt}; loaded backbone, head, prototypes; fresh: nothing", line
        for k, v in model.state_dict().items():
            assert torch.equal(v, src.state_dict()[k]), k
        with torch.no_grad():
            h = model.backbone(x)
            z, scores = model([x])
        torch.testing.assert_close(h, h_off, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(z, z_off, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(scores, s_off, rtol=1e-4, atol=1e-5)
    tv = torchvision.models.resnet50()
    tv.fc = nn.Identity()
    tv.load_state_dict(model.backbone.state_dict(), strict=True)  # what backbone.pt holds
    torch.testing.assert_close(tv.eval()(x), h_off, rtol=1e-4, atol=1e-5)


def test_one_linear_head_and_cifar_stem(tmp_path, one_thread):
    """hidden_mlp 0 (projection_head is one Linear) maps onto our --hidden-dim 0 head; the resnet18-cifar backbone
    loads strictly into torchvision's resnet18 with the 3x3 stem and no max-pool, with the same features."""
    src = random_swav("resnet18-cifar", hidden=0, feat=16, k=20)
    torch.save(official_names(src.state_dict()), tmp_path / "linear-head.pth")
    model = random_swav("resnet18-cifar", hidden=0, feat=16, k=20, seed=0)
    line = init_weights(model, tmp_path / "linear-head.pth", S.INIT_FORMATS)
    assert line.endswith("SwAV release (swav_*_pretrain.pth.tar); loaded backbone, head, prototypes; fresh: nothing")
    assert torch.equal(model.head.weight, src.head.weight)
    tv = torchvision.models.resnet18()
    tv.conv1, tv.maxpool, tv.fc = nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.Identity(), nn.Identity()
    tv.load_state_dict(model.backbone.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(tv.eval()(x), model.backbone(x), rtol=1e-4, atol=1e-5)


def test_multiprototypes_file_loads_into_as_many_sets(tmp_path, one_thread):
    """A file with src/resnet50.py's MultiPrototypes (prototypes.prototypes{i}.weight, as DeepCluster-v2's releases
    and a multi-set main_swav.py model hold them) loads whole into a model with those sets (--n-prototypes 40 30 20),
    with the same scores; a set of another size starts fresh; a one-set model refuses the file in one line, and a
    several-set model refuses a one-set file."""
    src = random_swav("resnet18", hidden=64, feat=32, k=[40, 30, 20])
    torch.save(official_names(src.state_dict()), tmp_path / "multi.pth")
    torch.save(official_names(random_swav("resnet18", hidden=64, feat=32, k=40).state_dict()), tmp_path / "one.pth")
    model = random_swav("resnet18", hidden=64, feat=32, k=[40, 30, 20], seed=0)
    line = init_weights(model, tmp_path / "multi.pth", S.INIT_FORMATS)
    assert line.endswith("SwAV release (swav_*_pretrain.pth.tar); loaded backbone, head, prototypes; fresh: nothing")
    assert all(torch.equal(v, src.state_dict()[k]) for k, v in model.state_dict().items())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        z, scores = model([x])
    cs = [src.state_dict()[f"prototypes.prototypes{i}.weight"] for i in range(3)]
    torch.testing.assert_close(scores, torch.cat([z @ c.T for c in cs], 1))
    other = random_swav("resnet18", hidden=64, feat=32, k=[40, 30, 25], seed=0)
    fresh = other.state_dict()["prototypes.prototypes2.weight"].clone()
    assert init_weights(other, tmp_path / "multi.pth", S.INIT_FORMATS).endswith("fresh: prototypes")
    assert torch.equal(other.prototypes["prototypes1"].weight, cs[1])
    assert torch.equal(other.prototypes["prototypes2"].weight, fresh)
    refused = {"multi.pth": ([40], "prototypes.prototypes0.weight"), "one.pth": ([40, 30], "prototypes.weight")}
    for name, (k, unknown) in refused.items():
        with pytest.raises(CheckpointError, match=f"SwAV release.*{unknown} is not a tensor of this model"):
            init_weights(random_swav("resnet18", hidden=64, feat=32, k=k), tmp_path / name, S.INIT_FORMATS)


def documented_runs(marker: str) -> list:
    """The module docstring's commands (continued lines joined) that contain marker: the arguments after the script."""
    lines = S.__doc__.replace("\\\n", " ").splitlines()
    return [
        ln.split("swav_imagenet.py", 1)[1].split("#")[0].split()
        for ln in lines
        if "swav_imagenet.py" in ln and marker in ln
    ]


# The wide ResNet-50s' recipes: the official scripts/swav_RN50w{2,4}_400ep_pretrain.sh (main_swav.py: per-GPU batch x
# GPUs; base_lr as given, not scaled) and, for w5 (no official script), VISSL's configs/config/pretrain/swav/models/
# resnet50_w5.yaml over swav_8node_resnet.yaml (lr 0.3 per 256, scaled): global batch, peak lr, crop scales, queue
# (length, first epoch), head dims (features, hidden_mlp, feat_dim), BN in the head.
WIDE = {
    "resnet50w2": dict(batch=32 * 128, lr=4.8, scales=((0.14, 1), (0.05, 0.14)), queue=(0, 15), head=[4096, 8192, 128],
                       bn=True),
    "resnet50w4": dict(batch=40 * 64, lr=4.8, scales=((0.08, 1), (0.08, 0.14)), queue=(2560, 0), head=[8192, 8192, 128],
                       bn=True),
    "resnet50w5": dict(batch=12 * 128, lr=0.3 * 1536 / 256, scales=((0.14, 1), (0.05, 0.14)), queue=(1536, 0),
                       head=[10240, 10240, 128], bn=False),
}  # fmt: skip


def meta_model(args) -> S.SwAV:
    """The run's SwAV model on the meta device: every shape, no memory (w5 would be 2.4 GB)."""
    with torch.device("meta"):
        return S.SwAV(args.arch, args.hidden_dim, args.feat_dim, args.n_prototypes, args.head_dims, args.head_bn)


@pytest.mark.parametrize("arch", sorted(WIDE))
def test_wide_resnet_commands_and_their_releases(arch, monkeypatch):
    """The docstring's command for each wide ResNet-50 parses to its official hyper-parameters (2x224 + 4x96, 400
    epochs, 10 warm-up epochs from 0.3, cosine to the peak / 1000, 313 frozen iterations, K 3000, T 0.1, eps 0.05,
    wd 1e-6); its model has the official head, and a release in the official layout (module. + src/resnet50.py's
    names, projection_head.*, prototypes.weight) maps onto it tensor for tensor, shapes included: --init loads it.
    With tiny flags the command takes a training step on the meta device (its real widths: 0.5-2.8 GB of weights, too
    much for CPU tests): every shape of the forward, Sinkhorn, loss, backward and LARC update, and the queue."""
    (cmd,) = documented_runs(f"--arch {arch} ")
    args, want = S.parse_args(cmd), WIDE[arch]
    assert args.recipe == "imagenet" and args.arch == arch and args.batch_size == want["batch"]
    assert args.lr * args.batch_size / 256 == pytest.approx(want["lr"]) and args.final_lr_ratio == 0.001
    assert (args.epochs, args.warmup_epochs, args.start_warmup) == (400, 10, 0.3)
    assert (args.n_large, args.large_size, args.n_small, args.small_size) == (2, 224, 4, 96)
    assert (tuple(args.large_scale), tuple(args.small_scale)) == want["scales"]
    assert (args.queue_length, args.queue_start_epoch) == want["queue"]
    steps = 1281167 // args.batch_size  # steps per epoch on ImageNet-1k (drop_last)
    assert round(args.freeze_prototypes_epochs * steps) == (312 if steps == 312 else 313)  # 4096: 1 epoch (DEVIATION)
    assert (args.temperature, args.epsilon, args.sinkhorn_iters, args.n_prototypes) == (0.1, 0.05, 3, (3000,))
    assert args.weight_decay == 1e-6 and args.crops_for_assign == (0, 1) and args.momentum == 0.9
    model = meta_model(args)
    assert model.dims == want["head"] and any(isinstance(m, nn.BatchNorm1d) for m in model.head) == want["bn"]
    mapped = S.official_swav(official_names(model.state_dict()))
    assert {k: v.shape for k, v in mapped.items()} == {k: v.shape for k, v in model.state_dict().items()}
    monkeypatch.setattr(torch, "autocast", lambda *a, **kw: nullcontext())  # autocast has no meta device
    args = S.parse_args([*cmd, "--batch-size", "4", "--large-size", "32", "--small-size", "32", "--device", "cpu"])
    opt = S.LARS(S.param_groups(model, args), args.lr, momentum=args.momentum, eta=args.lars_eta, clip=args.lars_clip)
    run = SimpleNamespace(args=args, model=model, ddp_model=model, opt=opt, autocast=nullcontext(), queue=None,
                          scaler=torch.amp.GradScaler("cpu", enabled=False), fmt=torch.contiguous_format,
                          freeze_steps=0, steps_per_epoch=1, device=torch.device("meta"), world_size=1,
                          rank=0)  # fmt: skip
    groups = [torch.empty(2 * 4, 3, 32, 32, device="meta"), torch.empty(4 * 4, 3, 32, 32, device="meta")]
    assert S.train_step(run, groups, 0).shape == (len(S.METRICS),)
    assert all(p.grad is not None and p.grad.shape == p.shape for p in model.parameters())
    queue = (tuple(run.queue.z.shape), run.queue.filled) if run.queue else None  # from epoch 0 where there is one
    assert queue == (((2, want["queue"][0], 128), 4) if want["queue"][0] else None)


def test_resnet101_and_head_variants_of_the_guide():
    """The SwAV guide's ResNet-101 (the imagenet recipe with --arch resnet101) and its heads (--head-dims 2048 4096
    128; the 3-layer 2048 2048 2048 128, here without BN): files in the official layout map onto them as well."""
    for flags in ("--arch resnet101", "--head-dims 2048 4096 128", "--head-dims 2048 2048 2048 128 --no-head-bn"):
        model = meta_model(S.parse_args(["imagenet", *flags.split()]))
        mapped = S.official_swav(official_names(model.state_dict()))
        assert {k: v.shape for k, v in mapped.items()} == {k: v.shape for k, v in model.state_dict().items()}
    assert len(model.head) == 5 and model.dims == [2048, 2048, 2048, 128]
    assert len(meta_model(S.parse_args(["imagenet", "--arch", "resnet101"])).backbone.layer3) == 23


class RunsCode:
    """Unpickling it calls open(marker, "w"): what torch.load(weights_only=False) would run."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


# the imagenet recipe, streamed from real ImageNet photos: the ImageNet-stem ResNet-18, a tiny head, K = 30
TINY = "--arch resnet18 --hidden-dim 64 --feat-dim 32 --n-prototypes 30 --device cpu --batch-size 16 --large-size 64"
TINY += " --small-size 32 --n-small 2 --workers 0 --epochs 1 --probe-epochs 1 --probe-batch-size 16"


def test_runs_evaluate_and_export_the_loaded_weights(imagewoof_dir, tmp_path):
    """--max-steps 0 with a main_swav.py checkpoint (its K = 40 prototypes do not fit: fresh) evaluates exactly those
    weights (the run's k-NN features are torchvision's on the same centre crops) and writes them to backbone.pt, which
    loads strictly into torchvision; a run from that backbone.pt (torchvision format) trains, a rerun resumes and
    ignores --init, and its last.pt (our format) loads whole. Every wrong file: one line, exit 1, nothing run."""
    run = partial(recipe_cmd, ROOT / "swav_imagenet.py", "imagenet", TINY, imagewoof_dir)  # run(out dir, flags)
    src = random_swav("resnet18", hidden=64, feat=32, k=40)
    official = official_names(src.state_dict())
    good = tmp_path / "ckp-99.pth"
    torch.save(dict(epoch=100, state_dict=official, optimizer=dict(state={}, param_groups=[])), good)
    bad = {  # name -> (file content, needles)
        "moco": (dict(epoch=200, arch="resnet50", state_dict={"module.encoder_q.conv1.weight": torch.ones(64, 3, 7, 7)},
                      optimizer={}), ["not a format this script reads", "optimizer, state_dict"]),
        "eval-linear": (dict(epoch=100, state_dict={"module.linear.weight": torch.ones(1000, 2048),
                                                    "module.linear.bias": torch.ones(1000)}, best_acc=75.3),
                        ["not a format this script reads"]),
        "deepclusterv2": ({**{k: v for k, v in official.items() if "prototypes" not in k},
                           **{f"module.prototypes.prototypes{i}.weight": torch.ones(40, 32) for i in range(3)}},
                          ["(SwAV release", "prototypes.prototypes0.weight is not a tensor of this model"]),
        "renamed": ({k.replace("layer2.0.conv1.", "layer2.0.conv_1."): v for k, v in official.items()},
                    ["(SwAV release", "no tensor for the backbone's backbone.layer2.0.conv1.weight"]),
        "rn50w2-stem": ({**official, "module.conv1.weight": torch.ones(128, 3, 7, 7)},
                        ["backbone.conv1.weight has shape (128, 3, 7, 7), the model's (64, 3, 7, 7)"]),
        "runs-code": (dict(epoch=1, state_dict=official, payload=RunsCode(tmp_path / "ran")),
                      ["refused to load", "io.open"]),
    }  # fmt: skip
    for name, (obj, _) in bad.items():
        torch.save(obj, tmp_path / f"{name}.pth")
    (tmp_path / "truncated.pth").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    bad["truncated"] = (None, ["cannot read checkpoint", "truncated.pth"])
    runs = {
        f"bad-{n}": (run(tmp_path / f"o-{n}", f"--init {tmp_path / f'{n}.pth'} --max-steps 0 --probe none"), None)
        for n in bad
    }
    names, logs = list(runs), tmp_path / "logs"
    one = {"eval": (run(tmp_path / "eval", f"--init {good} --max-steps 0"), None), **{n: runs[n] for n in names[1::2]}}
    two = {n: runs[n] for n in names[::2]}  # then, once "eval" has written backbone.pt, train from it and resume
    two["train"] = (
        run(tmp_path / "train", f"--init {tmp_path / 'eval' / 'backbone.pt'} --max-steps 1 --probe none"),
        None,
    )
    two["resumed"] = (run(tmp_path / "train", f"--init {tmp_path / 'truncated.pth'} --max-steps 1 --probe none"), None)
    logs.mkdir()
    with ThreadPoolExecutor(2) as pool:  # two runners (2 CI cores), each importing the script once
        jobs = [pool.submit(forked_runs, one, logs), pool.submit(forked_runs, two, logs, dict(train="eval"))]
        procs = {name: proc for job in jobs for name, proc in job.result().items()}

    first = procs["eval"]
    assert first.returncode == 0, first.stderr[-3000:]
    line = f"--init {good}: main_swav.py checkpoint; loaded backbone, head; fresh: prototypes"
    assert line in first.stdout.splitlines()
    res = read_results(tmp_path / "eval")
    assert res["init"] == line and res["steps_done"] == 0
    assert_finite_results(res, "knn_top1", "knn_top5", "linear_top1", "linear_top5")
    exported = torch.load(tmp_path / "eval" / "backbone.pt", weights_only=True)
    tv = torchvision.models.resnet18()
    tv.fc = nn.Identity()
    tv.load_state_dict(exported, strict=True)
    assert all(torch.equal(v, src.backbone.state_dict()[k]) for k, v in exported.items())
    # the evaluated features: torchvision's on the run's own centre crops (Resize 73, CenterCrop 64) of the val photos
    classes = sorted(d.name for d in (imagewoof_dir / "train").iterdir())
    files, _ = S.list_image_files(imagewoof_dir / "val", classes)
    mean, std = (torch.tensor(v)[:, None, None] * 255 for v in (S.Args().mean, S.Args().std))
    with torch.no_grad():
        want = tv.eval()((S.decode_files(files, 73, 64).float() - mean) / std)
    (cached,) = (tmp_path / "eval" / "cache").glob("*/test.pt")
    torch.testing.assert_close(torch.load(cached, weights_only=True)["value"], want, rtol=1e-4, atol=1e-4)

    for name, (_, needles) in bad.items():
        proc = procs[f"bad-{name}"]
        assert proc.returncode == 1, (name, proc.stderr[-2000:])
        assert_one_line_error(proc, str(tmp_path / f"{name}.pth"), *needles)
    assert not (tmp_path / "ran").exists()
    trained, resumed = procs["train"], procs["resumed"]
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "backbone.pt: torchvision ResNet; loaded backbone; fresh: head, prototypes" in trained.stdout
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout and "--init" not in resumed.stdout
    assert read_results(tmp_path / "train")["init"] is None and read_results(tmp_path / "train")["steps_done"] == 1
    model = S.SwAV("resnet18", 64, 32, 30)  # our own last.pt: everything loads
    line = init_weights(model, tmp_path / "train" / "last.pt", S.INIT_FORMATS)
    assert line.endswith("last.pt: last.pt; loaded backbone, head, prototypes; fresh: nothing"), line
    saved = torch.load(tmp_path / "train" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
