"""empssl_cifar.py --init and backbone.pt. In: the official main.py's save_models/<epoch>.pt (the state dict of
nn.DataParallel(encoder), built here in the layout of the official model/model.py from torchvision, not from the
script), our last.pt and a plain torchvision ResNet. Out: a plain torchvision ResNet-18 (fc = Identity). Every wrong
file ends in one line."""

import json
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from forkrun import forked_in_two
from conftest import ROOT, assert_one_line_error
from test_empssl_runs import empssl

sys.path.insert(0, str(ROOT))
import empssl_cifar as E  # noqa: E402


def official_encoder(cifar_stem: bool = True, hidden_dim: int = 4096, z_dim: int = 1024, seed: int = 0) -> nn.Module:
    """tsb0601/EMP-SSL model/model.py's encoder, by its layout: getmodel's torchvision resnet18 (resnet18-cifar: 3x3
    stride-1 conv1 and no max-pool; fc = Identity), pre_feature = Linear-BN-ReLU, projection = Linear-BN-ReLU-Linear;
    random weights and BN statistics, so that a tensor loaded into the wrong place shows."""
    torch.manual_seed(seed)
    backbone = torchvision.models.resnet18()
    if cifar_stem:
        backbone.conv1, backbone.maxpool = nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.Identity()
    backbone.fc = nn.Identity()
    enc = nn.Module()
    enc.backbone = backbone
    enc.pre_feature = nn.Sequential(nn.Linear(512, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU())
    enc.projection = nn.Sequential(
        nn.Linear(hidden_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, z_dim)
    )
    for m in enc.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            m.weight.data.uniform_(0.5, 1.5), m.bias.data.uniform_(-0.2, 0.2)
            m.running_mean.uniform_(-0.2, 0.2), m.running_var.uniform_(0.5, 1.5)
    return enc.eval()


def official_h(enc: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The official evaluated feature: encoder(x, is_test=True)'s second output, pre_feature(backbone(x))."""
    with torch.no_grad():
        return enc.pre_feature(enc.backbone(x))


def save_official(enc: nn.Module, path) -> dict:
    """As the official main.py saves: torch.save(nn.DataParallel(encoder).state_dict(), save_models/<epoch>.pt)."""
    sd = nn.DataParallel(enc).state_dict()
    torch.save(sd, path)
    return sd


def torchvision_resnet18(cifar_stem: bool) -> nn.Module:
    """What README's snippet builds for backbone.pt: torchvision's resnet18 with fc = Identity (resnet18-cifar: also
    the 3x3 stride-1 conv1 and no max-pool)."""
    net = torchvision.models.resnet18()
    if cifar_stem:
        net.conv1, net.maxpool = nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.Identity()
    net.fc = nn.Identity()
    return net.eval()


def test_official_checkpoint_gives_the_official_features(tmp_path, one_thread):
    """The official layout at the paper's sizes (resnet18-cifar, 4096, 1024): every tensor lands where the official
    model has it (h and z equal the official model's), one line says so; a torchvision ResNet fills the backbone
    alone."""
    enc = official_encoder()
    sd = save_official(enc, tmp_path / "1.pt")
    assert {k.split(".")[1] for k in sd} == {"backbone", "pre_feature", "projection"} and all(
        k.startswith("module.") for k in sd
    )
    model = E.EMPSSL("resnet18-cifar", 4096, 1024)
    line = E.init_weights(model, tmp_path / "1.pt", E.INIT_FORMATS)
    assert line.endswith("official <epoch>.pt; loaded backbone, pre_feature, projection; fresh: nothing"), line
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        z, h = model(x)
        torch.testing.assert_close(h, official_h(enc, x), rtol=0, atol=1e-6)
        torch.testing.assert_close(z, F.normalize(enc.projection(official_h(enc, x)), dim=1), rtol=0, atol=1e-6)

    tv = torchvision.models.resnet18()  # with its fc: not loaded
    tv.conv1, tv.maxpool = enc.backbone.conv1, nn.Identity()
    tv.load_state_dict({**enc.backbone.state_dict(), **{f"fc.{k}": v for k, v in tv.fc.state_dict().items()}})
    torch.save(tv.state_dict(), tmp_path / "tv.pth")
    fresh = E.EMPSSL("resnet18-cifar", 256, 64)
    line = E.init_weights(fresh, tmp_path / "tv.pth", E.INIT_FORMATS)
    assert line.endswith("torchvision ResNet; loaded backbone; fresh: pre_feature, projection"), line
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval().backbone(x), enc.backbone(x), rtol=0, atol=1e-6)


def test_weight_init_kachayev():
    """--weight-init (the initialisation scheme, formerly --init): kachayev's Linear weights N(0, 1e-3), biases 0."""
    assert E.parse_args(["--weight-init", "kachayev", "--init", "w.pt"]) == E.Args(weight_init="kachayev", init="w.pt")
    torch.manual_seed(0)
    model = E.EMPSSL("resnet18", 512, 128, weight_init="kachayev")
    for lin in (model.pre_feature[0], model.projection[0], model.projection[3]):
        assert lin.bias.abs().max() == 0 and abs(lin.weight.std().item() - 1e-3) < 1e-4
    assert E.EMPSSL("resnet18", 512, 128).projection[0].weight.std() > 1e-2  # torch's default


def test_init_runs_evaluates_resumes_and_refuses(small_cifar_dir, tmp_path, one_thread):
    """Through the command line on real CIFAR images. --init of an official checkpoint (resnet18-imagenet: our
    resnet18) with --max-steps 0 evaluates exactly its weights (the cached bag features of the test images are the
    official model's h of the same patches) and writes backbone.pt, which loads strictly into torchvision's resnet18
    (fc = Identity) and gives the official backbone's features. --init of a resnet18-cifar official checkpoint trains
    from it; its backbone.pt loads strictly into torchvision's resnet18 with the CIFAR stem; the same command again
    resumes and ignores --init (a truncated file here); our last.pt is an --init format too. Wrong files end in one
    line, exit 1: another paper's checkpoint (MoCo v2's container), a truncated file, a renamed key, the ImageNet stem
    into resnet18-cifar, a pickle that would run code (nothing runs), a missing file."""
    tiny = "--arch resnet18-cifar --hidden-dim 128 --z-dim 32 --probe-epochs 2"  # later flags override TINY's
    official, bad = tmp_path / "official", tmp_path / "bad"
    official.mkdir(), bad.mkdir()
    enc = {stem: official_encoder(cifar_stem=stem, hidden_dim=128, z_dim=32) for stem in (True, False)}
    sd = {stem: save_official(enc[stem], official / f"{'cifar' if stem else 'imagenet'}.pt") for stem in enc}
    moco = {f"module.encoder_q.{k}": v for k, v in list(enc[True].backbone.state_dict().items())[:5]}  # (first keys)
    torch.save(dict(epoch=200, arch="resnet18", state_dict=moco, optimizer={}), bad / "moco.pth.tar")
    (bad / "cut.pt").write_bytes((official / "cifar.pt").read_bytes()[:100_000])
    torch.save({k.replace("layer4.1.bn2.weight", "layer4.1.bn2.gamma"): v for k, v in sd[True].items()}, bad / "key.pt")

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'ran'}",))

    torch.save(
        {"module.pre_feature.0.weight": sd[True]["module.pre_feature.0.weight"], "x": Payload()}, bad / "evil.pt"
    )
    refused = {  # each into resnet18-cifar (tiny's --arch)
        bad / "moco.pth.tar": ["not a format this script reads (last.pt, official <epoch>.pt, torchvision ResNet)",
                               "[arch, epoch, optimizer, state_dict]"],
        bad / "cut.pt": ["cannot read checkpoint", "cut.pt"],
        bad / "key.pt": ["official <epoch>.pt", "no tensor for the backbone's backbone.layer4.1.bn2.weight"],
        official / "imagenet.pt": ["backbone.conv1.weight has shape (64, 3, 7, 7), the model's (64, 3, 3, 3)"],
        bad / "evil.pt": ["refused to load", "evil.pt", "posix.system"],
        bad / "none.pt": ["checkpoint not found", "none.pt"],
    }  # fmt: skip
    out, trained = tmp_path / "eval", tmp_path / "trained"
    evaluate = empssl(small_cifar_dir, out, f"{tiny} --arch resnet18 --init {official / 'imagenet.pt'} --max-steps 0")
    cases = [(evaluate + ["--eval-patches", "1"], None)]
    cases += [(empssl(small_cifar_dir, tmp_path / f"o-{f.name}", f"{tiny} --init {f}"), None) for f in refused]
    step = f"{tiny} --batch-size 8 --max-steps 1 --eval-patches 0 --init"
    tune = [empssl(small_cifar_dir, trained, f"{step} {f}") for f in (official / "cifar.pt", bad / "cut.pt")]
    # two runners (tests/forkrun.py): one trains a step from the official weights, then resumes; the other the rest
    first, procs = forked_in_two(tune[0], cases, [(tune[1], None)], tmp_path)
    (proc, *procs), resumed = procs[:-1], procs[-1]
    for (name, needles), p in zip(refused.items(), procs, strict=True):
        assert p.returncode == 1, (name, p.stderr[-2000:])
        assert_one_line_error(p, *needles)
    assert not (tmp_path / "ran").exists()

    assert proc.returncode == 0, proc.stderr[-3000:]
    said = [ln for ln in proc.stdout.splitlines() if ln.startswith("--init ")]
    assert said == [f"--init {official / 'imagenet.pt'}: official <epoch>.pt; loaded backbone, pre_feature, projection;"
                    " fresh: nothing"]  # fmt: skip
    res = json.loads((out / "results.json").read_text())
    assert res["init"] == said[0] and res["steps_done"] == 0 and 0 <= res["linear_top1"] <= 100
    # the evaluation's features are the official model's: the cached h of the test images (one patch each, drawn
    # again here from the evaluation's key), under the digest of the official weights
    args = E.Args(dataset="imagefolder", data_dir=str(small_cifar_dir))
    test_x = E.load_data(args)["test_x"]
    block = (args.seed, "eval", "test", 0, 0)  # the key of rank 0's first block of (up to 100) images
    patches = next(E.patch_batches(test_x, [torch.arange(50)], [block], 1, args, torch.device("cpu")))
    digest = E.state_dict_digest({k[len("module.") :]: v for k, v in sd[False].items()})
    key = E.rng_seed(digest, 1, args.seed, args.crop_scale, args.solarize_threshold, "cifar", None, "features")
    cached = torch.load(out / "cache" / f"{key:014x}" / "test.pt")["value"]
    assert cached.shape == (50, 128)
    torch.testing.assert_close(cached, official_h(enc[False], patches), rtol=0, atol=1e-4)
    # backbone.pt: a plain torchvision ResNet-18 with fc = Identity, strictly, with the official backbone's features
    images = test_x[:4].float() / 255 * 2 - 1  # whole images, the script's Normalize(0.5, 0.5)
    net = torchvision_resnet18(cifar_stem=False)
    net.load_state_dict(torch.load(out / "backbone.pt", weights_only=True), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(net(images), enc[False].backbone(images), rtol=0, atol=1e-6)

    assert first.returncode == 0 and resumed.returncode == 0, (first.stderr[-2000:], resumed.stderr[-2000:])
    assert "official <epoch>.pt; loaded backbone, pre_feature, projection; fresh: nothing" in first.stdout
    assert "resumed from" in resumed.stdout and "--init" not in resumed.stdout  # the bad --init is never read
    assert json.loads((trained / "results.json").read_text())["init"] is None
    last = torch.load(trained / "last.pt", weights_only=True)["model"]
    assert not torch.equal(last["backbone.layer1.0.conv1.weight"], sd[True]["module.backbone.layer1.0.conv1.weight"])
    model = E.EMPSSL("resnet18-cifar", 128, 32)  # our own last.pt is an --init format too
    line = E.init_weights(model, trained / "last.pt", E.INIT_FORMATS)
    assert line.endswith("last.pt; loaded backbone, pre_feature, projection; fresh: nothing"), line
    net = torchvision_resnet18(cifar_stem=True)
    net.load_state_dict(torch.load(trained / "backbone.pt", weights_only=True), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(net(images), model.eval().backbone(images), rtol=0, atol=1e-6)
