"""--init and backbone.pt of groco_imagenet.py. The official trainer's checkpoints (ninatu/learning_by_sorting,
base/base_trainer.py _save_checkpoint: {epoch, step, encoder, projection, optimizer, config} saved with PyTorch's
legacy serialisation; encoder = RegularEncoder, a torchvision ResNet as `encoder.*` without fc; projection =
RegularProjection's `projection.N.*`; `module.` under DDP) are built here from those names and shapes and load onto
the model: the backbone gives torchvision's features, the head is the official one index for index. A run with
--init --max-steps 0 evaluates exactly those weights; a run trains on from them and a resumed run ignores --init;
every run writes backbone.pt, which torchvision loads strictly; a wrong file stops the run with one line."""

import collections
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

import pytest
import torch
import torch.nn as nn
import torchvision

import groco_imagenet as G
from common.checkpoint import init_weights
from conftest import ROOT, assert_one_line_error, read_results
from forkrun import forked_runs

SCRIPT = ROOT / "groco_imagenet.py"
TINY = "--arch resnet18 --proj-dim 32 --batch-size 16 --device cpu --probe none --log-every 1"


def torchvision_encoder(seed: int = 0, cifar_stem: bool = False) -> nn.Module:
    """The official RegularEncoder's network: torchvision's resnet18(zero_init_residual=True) with fc = Identity,
    here with random weights and BatchNorm statistics (nothing zero, nothing trivially 1)."""
    torch.manual_seed(seed)
    net = torchvision.models.resnet18(zero_init_residual=True)
    net.fc = nn.Identity()
    if cifar_stem:  # the torchvision form of our resnet18-cifar
        net.conv1, net.maxpool = nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.Identity()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5), m.bias.data.uniform_(-0.1, 0.1)
            m.running_mean.uniform_(-0.1, 0.1), m.running_var.uniform_(0.5, 1.5)
    return net.eval()


def official_head(f: int, d: int, batch_norm_first: bool = False) -> nn.Sequential:
    """RegularProjection's layers as regular_projection.py get_projection_head(num_layers=3) lists them (written out
    here, not taken from the script): [BN(f) if batch_norm_first], Linear(f, f, no bias), BN(f), ReLU, Linear(f, f, no
    bias), BN(f), ReLU, Linear(f, d), BN(d, affine=False); random BN statistics."""
    layers = [nn.BatchNorm1d(f)] if batch_norm_first else []
    for _ in range(2):
        layers += [nn.Linear(f, f, bias=False), nn.BatchNorm1d(f), nn.ReLU(inplace=True)]
    head = nn.Sequential(*layers, nn.Linear(f, d), nn.BatchNorm1d(d, affine=False))
    for m in head.modules():
        if isinstance(m, nn.BatchNorm1d):
            m.running_mean.uniform_(-0.1, 0.1), m.running_var.uniform_(0.5, 1.5), m.num_batches_tracked.fill_(7)
    return head.eval()


def official_checkpoint(path, encoder: nn.Module, head: nn.Module, ddp: bool = True, payload=None):
    """What the official trainer's _save_checkpoint writes (legacy serialisation): the DDP-wrapped (or, one GPU,
    bare) encoder's and projection's state dicts, SGD's state with momentum buffers, the epoch, step and config."""
    prefix = "module." if ddp else ""
    enc = collections.OrderedDict((f"{prefix}encoder.{k}", v) for k, v in encoder.state_dict().items())
    proj = collections.OrderedDict((f"{prefix}projection.{k}", v) for k, v in head.state_dict().items())
    params = [p for p in [*encoder.parameters(), *head.parameters()] if p.requires_grad]
    opt = torch.optim.SGD(params, lr=6.0, momentum=0.9, weight_decay=2e-6)
    for p in params:
        opt.state[p]["momentum_buffer"] = torch.full_like(p, 0.01)
    config = collections.OrderedDict(  # read_yaml's OrderedDicts
        encoder=collections.OrderedDict(type="RegularEncoder", args=collections.OrderedDict(arch="resnet18")),
        projection=collections.OrderedDict(type="RegularProjection", args=dict(num_layers=3, output_dim=32)),
        loss=dict(type="GroCo", args=dict(n_augs=8, n_pos_augs=2, topk_neg=10, steepness=1)), seed=None,
        evaluator=[dict(type="KNNEvaluator", args=dict(k=[20], temperature=0.07))], payload=payload,
    )  # fmt: skip
    state = dict(epoch=799, step=999_999, encoder=enc, projection=proj, optimizer=opt.state_dict(), config=config)
    torch.save(state, path, _use_new_zipfile_serialization=False)
    return path


@lru_cache
def cifar_images(data_dir, split: str = "test") -> torch.Tensor:
    """The cifar recipe's normalised whole images of the folder, as its evaluation encodes them (in memory, 32 px)."""
    args = G.parse_args(["cifar", "--dataset", "imagefolder", "--data-dir", str(data_dir)])
    x = G.load_data(args)[f"{split}_x"].float()
    mean, std = (torch.tensor(v)[:, None, None] * 255 for v in (args.mean, args.std))
    return (x - mean) / std


@torch.no_grad()
def test_official_checkpoints_load_onto_the_model(small_cifar_dir, tmp_path):
    """Both official layouts (DDP's `module.` and one GPU's bare names) give the backbone exactly torchvision's
    features on real images and the projector the official head (every tensor, the same outputs); a head of another
    width starts fresh where it does not fit, one of another layout (batch_norm_first) starts fresh entirely; a plain
    torchvision ResNet loads the backbone alone."""
    tv, head = torchvision_encoder(), official_head(512, 32)
    x = cifar_images(small_cifar_dir)[:16]
    want = tv(x)
    for ddp in (True, False):
        path = official_checkpoint(tmp_path / f"official-{ddp}.pth", tv, head, ddp=ddp)
        model = G.GroCo("resnet18", 32)
        line = init_weights(model, path, G.INIT_FORMATS)
        assert line == f"--init {path}: official GroCo checkpoint; loaded backbone, projector; fresh: nothing"
        model.eval()
        torch.testing.assert_close(model.backbone(x), want, rtol=0, atol=1e-5)
        assert model.projector.state_dict().keys() == head.state_dict().keys()
        for k, v in head.state_dict().items():
            assert torch.equal(model.projector.state_dict()[k], v), k
        torch.testing.assert_close(model.projector(want), head(want), rtol=0, atol=1e-5)
        assert not model.projector[6].bias.requires_grad  # still frozen, as officially

    wider = G.GroCo("resnet18", 64)  # its last Linear and BN do not fit: they start fresh, the rest loads
    fresh_var = wider.projector[7].running_var.clone()
    assert "loaded backbone, projector; fresh: projector" in init_weights(wider, path, G.INIT_FORMATS)
    assert torch.equal(wider.projector[0].weight, head[0].weight)
    assert torch.equal(wider.projector[7].running_var, fresh_var)
    torch.manual_seed(1)
    other = official_checkpoint(tmp_path / "bn-first.pth", tv, official_head(512, 32, batch_norm_first=True))
    model = G.GroCo("resnet18", 32)
    fresh = {k: v.clone() for k, v in model.projector.state_dict().items()}
    assert "loaded backbone; fresh: projector" in init_weights(model, other, G.INIT_FORMATS)
    assert all(torch.equal(v, fresh[k]) for k, v in model.projector.state_dict().items())  # nothing half-loaded

    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "tv.pth")
    assert "torchvision ResNet; loaded backbone; fresh: projector" in init_weights(
        G.GroCo("resnet18", 32), tmp_path / "tv.pth", G.INIT_FORMATS
    )


class RunsCode:
    """Unpickling it calls open(marker, "w"): what torch.load(weights_only=False) would run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def init_runs(small_cifar_dir, module_tmp):
    """The runs, forked from two processes that imported the script once (tests/forkrun.py): the cifar recipe on 100
    real CIFAR-10 images evaluating an official checkpoint (--max-steps 0), training 2 steps on from it, then resuming
    that run to step 3 (still with --init); and the wrong files."""
    tmp = module_tmp("init")
    tv = torchvision_encoder()
    official = official_checkpoint(tmp / "latest_model.pth", tv, official_head(512, 32))
    data = official.read_bytes()
    (tmp / "truncated.pth").write_bytes(data[: len(data) // 2])
    renamed = torch.load(official, weights_only=True)
    renamed["encoder"] = {k.replace("layer1.0.conv1.", "layer1.0.conv_1."): v for k, v in renamed["encoder"].items()}
    torch.save(renamed, tmp / "renamed.pth", _use_new_zipfile_serialization=False)
    resnet = {f"module.{k}": v for k, v in torchvision.models.resnet18().state_dict().items() if not k.startswith("fc")}
    swav = {**resnet, "module.projection_head.0.weight": torch.zeros(64, 512)}
    swav["module.prototypes.weight"] = torch.zeros(30, 64)
    torch.save(swav, tmp / "swav_800ep_pretrain.pth.tar")  # SwAV's release: module. + ResNet + its heads
    empssl = {f"module.{k}.0.weight": torch.zeros(4, 4) for k in ("pre_feature", "projection")}
    empssl["module.backbone.conv1.weight"] = torch.zeros(64, 3, 3, 3)
    torch.save(empssl, tmp / "empssl.pt")  # EMP-SSL's save_models/<epoch>.pt: nn.DataParallel(encoder)
    marker = tmp / "ran"
    official_checkpoint(tmp / "evil.pth", tv, official_head(512, 32), payload=RunsCode(marker))

    def cmd(out, extra="", tiny=TINY):
        return [SCRIPT, "cifar", "--dataset", "imagefolder", "--data-dir", small_cifar_dir, *tiny.split(),
                *extra.split(), "--out-dir", tmp / out]  # fmt: skip

    runs = {
        "eval": cmd("eval", f"--init {official} --max-steps 0"),
        "train": cmd("train", f"--init {official} --epochs 1 --max-steps 2 --warmup-epochs 0"),
        "resumed": cmd("train", f"--init {official} --epochs 1 --max-steps 3 --warmup-epochs 0"),
    }
    bad = {  # name -> (command, needles)
        "swav": (cmd("o1", f"--init {tmp / 'swav_800ep_pretrain.pth.tar'}"),
                 ["torchvision ResNet", "backbone.projection_head.0.weight is not a tensor of this model"]),
        "empssl": (cmd("o2", f"--init {tmp / 'empssl.pt'}"), ["not a format this script reads", "module.backbone."]),
        "truncated": (cmd("o3", f"--init {tmp / 'truncated.pth'}"), ["cannot read checkpoint", "truncated.pth"]),
        "renamed": (cmd("o4", f"--init {tmp / 'renamed.pth'}"),
                    ["official GroCo checkpoint", "no tensor for the backbone's backbone.layer1.0.conv1.weight"]),
        "stem-shape": (cmd("o5", f"--init {official} --arch resnet18-cifar"),
                       ["backbone.conv1.weight has shape (64, 3, 7, 7), the model's (64, 3, 3, 3)"]),
        "code": (cmd("o6", f"--init {tmp / 'evil.pth'}"), ["refused to load", "evil.pth", "open"]),
        "missing": (cmd("o7", f"--init {tmp / 'nope.pth'}"), ["checkpoint not found", "nope.pth"]),
    }  # fmt: skip
    # two runners at once (2 CI cores): the good runs ("resumed" after "train"), the wrong files
    parts = [{n: (c, None) for n, c in runs.items()}, {n: (c, None) for n, (c, _) in bad.items()}]
    with ThreadPoolExecutor(2) as pool:
        jobs = []
        for i, part in enumerate(parts):
            (tmp / f"logs{i}").mkdir()
            jobs.append(pool.submit(forked_runs, part, tmp / f"logs{i}"))
        procs = {k: v for j in jobs for k, v in j.result().items()}
    return dict(tmp=tmp, tv=tv, official=official, procs=procs, bad=bad, marker=marker, data=small_cifar_dir)


def load_torchvision(path, cifar_stem: bool = False) -> nn.Module:
    """backbone.pt into torchvision's resnet18 with fc = Identity (and the CIFAR stem), strictly."""
    net = torchvision_encoder(seed=123, cifar_stem=cifar_stem)
    net.load_state_dict(torch.load(path, weights_only=True), strict=True)
    return net.eval()


def cached_features(out, split: str = "test") -> torch.Tensor:
    """The features the run's final evaluation encoded (its feature cache)."""
    (path,) = (out / "cache").glob(f"*/{split}.pt")
    return torch.load(path, weights_only=True)["value"]


@torch.no_grad()
def test_init_max_steps_0_evaluates_the_official_weights(init_runs):
    """--init with --max-steps 0: one line says which format was recognised and what loaded; results.json keeps it;
    the final evaluation encoded exactly torchvision's features of the official encoder; backbone.pt is that encoder
    (every tensor), loads strictly into torchvision and gives the same features."""
    proc, out, tv = init_runs["procs"]["eval"], init_runs["tmp"] / "eval", init_runs["tv"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = f"--init {init_runs['official']}: official GroCo checkpoint; loaded backbone, projector; fresh: nothing"
    assert proc.stdout.splitlines().count(line) == 1, proc.stdout[-2000:]
    res = read_results(out)
    assert res["init"] == line and res["steps_done"] == 0 and 0 <= res["knn_top1"] <= 100
    x = cifar_images(init_runs["data"])
    torch.testing.assert_close(cached_features(out), tv(x), rtol=0, atol=1e-5)
    saved = torch.load(out / "backbone.pt", weights_only=True)
    assert saved.keys() == tv.state_dict().keys()
    assert all(torch.equal(saved[k], v) for k, v in tv.state_dict().items())
    torch.testing.assert_close(load_torchvision(out / "backbone.pt")(x), tv(x), rtol=0, atol=1e-5)


def test_training_goes_on_from_init_and_a_resume_ignores_it(init_runs):
    """Two steps of pre-training from an official checkpoint, then a rerun to step 3 with the same --init: it resumes
    last.pt (no init line, results.json init None); backbone.pt is the trained backbone of last.pt."""
    procs, out = init_runs["procs"], init_runs["tmp"] / "train"
    for name in ("train", "resumed"):
        assert procs[name].returncode == 0, procs[name].stderr[-3000:]
    assert "official GroCo checkpoint; loaded backbone, projector" in procs["train"].stdout
    assert f"resumed from {out / 'last.pt'} at step 2" in procs["resumed"].stdout
    assert "--init" not in procs["resumed"].stdout and read_results(out)["init"] is None
    assert read_results(out)["steps_done"] == 3
    model = torch.load(out / "last.pt", weights_only=True)["model"]
    saved = torch.load(out / "backbone.pt", weights_only=True)
    assert saved.keys() == {k[len("backbone.") :] for k in model if k.startswith("backbone.")}
    assert all(torch.equal(v, model[f"backbone.{k}"]) for k, v in saved.items())
    assert not torch.equal(saved["conv1.weight"], init_runs["tv"].state_dict()["conv1.weight"])  # it trained
    load_torchvision(out / "backbone.pt")


@torch.no_grad()
def test_backbone_of_the_cifar_stem_loads_into_torchvision(small_cifar_dir, tmp_path):
    """What run_training saves as backbone.pt for resnet18-cifar (the cifar recipe's backbone; the runs above save
    resnet18's): torchvision's resnet18 with the 3x3 stem and no max-pool loads it strictly, with the same features."""
    model = G.GroCo("resnet18-cifar", 32)
    for m in model.backbone.modules():  # non-trivial BN statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1), m.running_var.uniform_(0.5, 1.5), m.weight.data.uniform_(0.5, 1.5)
    G.save_checkpoint({k: v.cpu() for k, v in model.backbone.state_dict().items()}, tmp_path / "backbone.pt")
    x = cifar_images(small_cifar_dir)[:8]
    torch.testing.assert_close(load_torchvision(tmp_path / "backbone.pt", True)(x), model.backbone.eval()(x))


def test_wrong_init_files_stop_with_one_line(init_runs):
    """Another paper's checkpoint (SwAV's release, EMP-SSL's), a truncated file, a renamed backbone key, a backbone of
    another shape (the ImageNet stem into resnet18-cifar), an official-layout legacy pickle that would run code (it
    does not run) and a missing file: exit 1, one line, no results.json, no backbone.pt."""
    failures = []
    for name, (cmd, needles) in init_runs["bad"].items():
        proc = init_runs["procs"][name]
        try:
            assert proc.returncode == 1, (proc.returncode, proc.stderr[-2000:])
            assert_one_line_error(proc, "groco_imagenet.py: error: ", *needles)
            assert not (cmd[-1] / "results.json").exists() and not (cmd[-1] / "backbone.pt").exists()
        except AssertionError as e:
            failures.append(f"{name}: {e}")
    assert not failures, "\n\n".join(failures)
    assert not init_runs["marker"].exists()
