"""slimclr_moco.py --init and the plain backbones it leaves. The official checkpoints (mzhaoshuai/SlimCLR main_ssl.py:
{"epoch", "state_dict": the DDP model's, "optimizer", ...}; s_MoCo's encoder_q / encoder_k / queue [D, K], s_MoCoV3's
base_encoder / momentum_encoder / predictor, s_SimCLR's encoder_q alone; the encoders with s_resnet.py's names,
per-width BN copies bn.I in descending width order) are built here from those names and load every tensor; a file
without a momentum encoder starts it as a copy of the loaded encoder; backbone.pt and backbone_w{w}.pt are plain
ResNets (common/resnet.py at width w; width 1 also torchvision's) with the slimmable network's features at that
width; a run evaluates an --init file with --max-steps 0 on real images; every wrong file ends in one line, exit 1."""

import dataclasses
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torch.nn as nn
import torchvision

from conftest import ROOT, assert_finite_results, assert_one_line_error, read_results, recipe_cmd
from forkrun import forked_runs

sys.path.insert(0, str(ROOT))
import slimclr_moco as S  # noqa: E402
from common.checkpoint import CheckpointError, init_weights  # noqa: E402
from common.resnet import RESNETS  # noqa: E402

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::DeprecationWarning")]
BACKBONE = "online.encoder.backbone."
W4 = (1.0, 0.75, 0.5, 0.25)


def official_key(key: str, moco: str) -> str:
    """Our SlimCLR state dict key -> the official checkpoint's: `module.` (DDP), the encoders as s_MoCo's / s_MoCoV3's
    attributes, s_resnet.py's conv1, bn1.bn.I, features.N.{convK, bnK.bn.I, shortcut.*} (N counts the blocks of
    [3, 4, 6, 3]) and fc.* (our head), v3's predictor at the top level, v2's queue (transposed by the caller)."""
    online, momentum = ("encoder_q", "encoder_k") if moco == "v2" else ("base_encoder", "momentum_encoder")
    p = key.split(".")
    if p[0] == "queue" or p[:2] == ["online", "predictor"]:
        return "module." + ".".join(p[1:] if p[0] == "online" else p)
    enc, p = (online, p[2:]) if p[0] == "online" else (momentum, p[1:])  # p: backbone... or head...
    if p[0] == "head":
        return ".".join(["module", enc, "fc", *p[1:]])
    if p[1] != "layers":  # the stem: conv1, bn1.bn.I
        return ".".join(["module", enc, *p[1:]])
    n = sum((3, 4, 6, 3)[: int(p[2])]) + int(p[3])
    if p[4] in ("convs", "bns"):  # convs.j -> conv{j+1}, bns.j.bn.I -> bn{j+1}.bn.I
        return ".".join(["module", enc, "features", str(n), f"{p[4][:-1]}{int(p[5]) + 1}", *p[6:]])
    return ".".join(["module", enc, "features", str(n), *p[4:]])  # shortcut.0, shortcut.1.bn.I


@torch.no_grad()
def random_bn(model: nn.Module, seed: int) -> nn.Module:
    """Every BN copy gets its own random affine parameters and running statistics (the init zeroes residuals)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(0.1 * torch.randn(n, generator=g))
            m.running_var.copy_(0.5 + torch.rand(n, generator=g))
            if m.affine:
                m.weight.copy_(0.5 + torch.rand(n, generator=g))
                m.bias.copy_(0.1 * torch.randn(n, generator=g))
    return model.eval()


def random_slimclr(args: S.Args, seed: int = 0) -> S.SlimCLR:
    """A SlimCLR model whose momentum encoder differs from the online one and whose every BN copy is random."""
    torch.manual_seed(seed)
    model = S.SlimCLR(args)
    with torch.no_grad():
        for p in model.momentum_encoder.parameters():
            p.add_(torch.randn_like(p), alpha=0.01)
    return random_bn(model, seed)


def official_checkpoint(model: S.SlimCLR, moco: str, drop: str = "") -> dict:
    """main_ssl.py's checkpoint of this model: the official names, v2's queue [D, K] and queue_ptr, no tensor whose
    official name starts with drop."""
    sd = {official_key(k, moco): v.t() if k == "queue" else v for k, v in model.state_dict().items()}
    sd.update({"module.queue_ptr": torch.zeros(1, dtype=torch.long)} if moco == "v2" else {})
    sd = {k: v for k, v in sd.items() if not (drop and k.startswith(drop))}
    optimizer = dict(state={}, param_groups=[dict(lr=0.2, momentum=0.9, params=list(range(3)))])
    scaler = dict(scale=65536.0, growth_factor=2.0, backoff_factor=0.5, growth_interval=2000, _growth_tracker=0)
    return dict(epoch=200, global_step=250200, arch="resnet50", state_dict=sd, best_acc1=91.0, optimizer=optimizer,
                scaler=scaler)  # fmt: skip


def features(net, x: torch.Tensor, width=None) -> torch.Tensor:
    with torch.no_grad():
        return net.eval().forward_width(x, width) if width else net.eval()(x)


# ---- the plain backbones ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch,widths", [("resnet50", W4), ("resnet18-cifar", (1.0, 0.75))])
def test_plain_backbone_of_every_width(arch, widths):
    """plain_backbone(w) loads strictly into common/resnet.py's RESNETS[arch](width=w) and gives the slimmable
    network's eval features at w (every kernel's leading slice, that width's own BN copy), each tensor in a storage
    of its own size (a slice would save the full tensor); width 1 loads strictly into torchvision's ResNet (fc =
    Identity; resnet18-cifar: the 3x3 stem, no max-pool)."""
    torch.manual_seed(0)
    slimmable = random_bn(S.SLIM_RESNETS[arch](num_classes=0, widths=widths), 1)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    for w in widths:
        sd = S.plain_backbone(slimmable, w)
        assert all(v.untyped_storage().nbytes() == v.numel() * v.element_size() for v in sd.values())
        plain = RESNETS[arch](width=w)
        plain.load_state_dict(sd, strict=True)
        want = features(slimmable, x, w)
        assert want.shape == (2, int(slimmable.num_features * w)) and want.std() > 0.01
        torch.testing.assert_close(features(plain, x), want, rtol=1e-5, atol=1e-5)
    tv = getattr(torchvision.models, arch.split("-")[0])()
    tv.fc = nn.Identity()
    if arch == "resnet18-cifar":
        tv.conv1, tv.maxpool = nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.Identity()
    tv.load_state_dict(S.plain_backbone(slimmable, 1.0), strict=True)
    torch.testing.assert_close(features(tv, x), features(slimmable, x, 1.0), rtol=1e-5, atol=1e-5)


# ---- the official checkpoints, loaded in process ------------------------------------------------------------------
@pytest.mark.parametrize("moco", ["v2", "v3"])
def test_official_checkpoints_load_every_tensor(moco, tmp_path):
    """The official checkpoint of a SlimCLR-MoCo{v2,v3} ResNet-50 at the released widths [1, .75, .5, .25] loads every
    tensor into ours: both encoders (every width's BN copy), the heads, v3's predictor, v2's queue (transposed; the
    pointer dropped). A file without its momentum encoder starts ours as a copy of the loaded encoder (v2: its queue
    of another size starts fresh); v2: a renamed tensor and a file of other widths are refused in one line."""
    args = S.parse_args([f"moco{moco}", "--queue-size", "256", "--mlp-dim", "1024"])
    src = random_slimclr(args)
    ckpt = official_checkpoint(src, moco)
    enc, momentum = ("encoder_q", "encoder_k") if moco == "v2" else ("base_encoder", "momentum_encoder")
    names = {f"module.{enc}.{k}" for k in ("features.15.bn3.bn.3.running_var", "features.13.shortcut.1.bn.1.weight",
                                           "features.3.shortcut.0.weight", "bn1.bn.2.bias", "fc.0.weight")}  # fmt: skip
    v3 = {
        "module.predictor.1.bn.3.weight",
        "module.predictor.3.weight",
        "module.momentum_encoder.fc.4.bn.0.running_var",
    }
    names |= {"module.queue", "module.encoder_k.fc.2.bias"} if moco == "v2" else v3  # v3's fc.4: BN without affine
    assert names <= ckpt["state_dict"].keys() and len(ckpt["state_dict"]) == len(src.state_dict()) + (moco == "v2")
    torch.save(ckpt, tmp_path / "ckpt.pth.tar")
    dst = S.SlimCLR(args)
    line = init_weights(dst, tmp_path / "ckpt.pth.tar", S.INIT_FORMATS, BACKBONE)
    loaded = "momentum_encoder, online, queue" if moco == "v2" else "momentum_encoder, online"
    assert line.endswith(f": official SlimCLR-Mo{moco.upper().replace('V', 'Cov')}; loaded {loaded}; fresh: nothing")
    got = dst.state_dict()
    for k, v in src.state_dict().items():
        assert torch.equal(got[k], v), k

    ckpt = official_checkpoint(src, moco, drop=f"module.{momentum}.")
    ckpt["state_dict"].update({"module.queue": torch.randn(128, 512)} if moco == "v2" else {})
    torch.save(ckpt, tmp_path / "online.pth.tar")
    line = init_weights(dst, tmp_path / "online.pth.tar", S.INIT_FORMATS, BACKBONE)  # dst holds src's weights now
    assert line.endswith("fresh: queue" if moco == "v2" else "fresh: nothing"), line
    want, got = src.online.encoder.state_dict(), dst.momentum_encoder.state_dict()
    assert not torch.equal(want["head.0.weight"], src.momentum_encoder.head[0].weight)  # not vacuous
    for k, v in want.items():
        assert torch.equal(got[k], v), k

    if moco == "v3":
        return
    sd = ckpt["state_dict"]  # v2 only (the same code reads v3): a renamed tensor, a file of other widths
    sd[f"module.{enc}.features.3.conv9.weight"] = sd.pop(f"module.{enc}.features.3.conv1.weight")
    torch.save(ckpt, tmp_path / "renamed.pth.tar")
    with pytest.raises(CheckpointError, match=f"no tensor for the backbone's {BACKBONE}layers.1.0.convs.0.weight"):
        init_weights(dst, tmp_path / "renamed.pth.tar", S.INIT_FORMATS, BACKBONE)
    # the released widths [1, .75, .5, .25] read with --widths 1.0 0.5: BN copy 1 is 48 wide, not 32
    with pytest.raises(CheckpointError, match=rf"{BACKBONE}bn1.bn.1.weight has shape \(48,\), the model's \(32,\)"):
        init_weights(S.SlimCLR(dataclasses.replace(args, widths=(1.0, 0.5))), tmp_path / "ckpt.pth.tar",
                     S.INIT_FORMATS, BACKBONE)  # fmt: skip


def test_official_simclr_checkpoint_loads_every_tensor(tmp_path):
    """s_SimCLR's checkpoint (models/s_simclr.py: encoder_q alone, its head fc.0 Linear with bias, fc.1 BN, fc.3
    Linear, fc.4 BN with affine) of the simclr recipe's ResNet-50 [1, .75, .5, .25] loads every tensor into ours (no
    momentum encoder, no queue to fill) under its own name; a torchvision ResNet-18 loads into --widths 1.0 (the
    copies with_momentum adds are dropped); a SlimCLR-MoCov2 file is no SimCLR file (no head BN)."""
    args = S.parse_args(["simclr", "--mlp-dim", "256"])
    torch.manual_seed(0)
    src = random_bn(S.SlimCLR(args), 0)
    sd = {official_key(k, "v2"): v for k, v in src.state_dict().items()}  # encoder_q's names
    assert {
        "module.encoder_q.fc.0.bias",
        "module.encoder_q.fc.1.bn.3.weight",
        "module.encoder_q.fc.4.bn.0.weight",
    } <= set(sd)
    torch.save(dict(epoch=100, global_step=125100, state_dict=sd, optimizer={}), tmp_path / "simclr.pth.tar")
    dst = S.SlimCLR(args)
    line = init_weights(dst, tmp_path / "simclr.pth.tar", S.SIMCLR_INIT_FORMATS, BACKBONE)
    assert line.endswith(": official SlimCLR-SimCLR; loaded online; fresh: nothing"), line
    got = dst.state_dict()
    assert got.keys() == src.state_dict().keys() and all(torch.equal(got[k], v) for k, v in src.state_dict().items())
    v2 = {k: v for k, v in sd.items() if not k.startswith("module.encoder_q.fc.")}
    v2.update({"module.encoder_q.fc.0.weight": torch.zeros(4, 4), "module.queue": torch.zeros(128, 256)})
    assert S.INIT_FORMATS["official SlimCLR-SimCLR"](dict(state_dict=v2)) is None
    assert S.INIT_FORMATS["official SlimCLR-MoCov2"](dict(state_dict=v2)) is not None
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "tv.pth")
    small = S.SlimCLR(dataclasses.replace(args, arch="resnet18", widths=(1.0,)))
    line = init_weights(small, tmp_path / "tv.pth", S.SIMCLR_INIT_FORMATS, BACKBONE)
    assert line.endswith(": torchvision ResNet; loaded online; fresh: online"), line


# ---- runs: --init FILE --max-steps 0 evaluates the file; a wrong file ends in one line ----------------------------
TINY = "--dataset imagefolder --device cpu --knn-k 20 --eval-every 0 --batch-size 32 --probe-epochs 1 --max-steps 0"


class RunsCode:
    """A pickled object whose unpickling calls open(marker, "w"): what torch.load(weights_only=False) would run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def real_images(data_dir, n: int = 4) -> torch.Tensor:
    """The first n test images of the folder, normalised like the cifar recipe's, [n, 3, 32, 32]."""
    files = sorted((data_dir / "test").rglob("*.jpg"))[:n]
    x = torch.stack([torchvision.io.decode_image(str(f)).float() / 255 for f in files])
    return (x - torch.tensor(S.CIFAR_MOCOV2.mean)[:, None, None]) / torch.tensor(S.CIFAR_MOCOV2.std)[:, None, None]


def test_runs_evaluate_init_files_and_refuse_wrong_ones(small_cifar_dir, tmp_path):
    """cifar-mocov2 with --max-steps 0 on 100 real CIFAR-10 images: an official SlimCLR-MoCov2 ResNet-50 file (widths
    1.0 and 0.5) loads every tensor, says so in one line (also in results.json), is evaluated per width (k-NN, probe),
    and leaves backbone.pt (torchvision's resnet50 with fc = Identity loads it strictly) and backbone_w0.5.pt
    (common/resnet.py's resnet50(width=0.5)) with the file's features at each width; a torchvision ResNet-18 state dict
    loads into --widths 1.0 and comes back as backbone.pt unchanged. Each wrong file ends in one line and exit 1:
    another paper's checkpoint (SwAV's main_swav.py), a truncated file, a renamed tensor, an official-format file whose
    pickle would run code (and its code does not run). A run that resumes a last.pt ignores --init."""
    args = S.parse_args(["cifar-mocov2", "--arch", "resnet50", "--widths", "1.0", "0.5", "--queue-size", "64"])
    src = random_slimclr(args)
    torch.save(official_checkpoint(src, "v2"), tmp_path / "v2.pth.tar")
    torch.manual_seed(0)
    tv = random_bn(torchvision.models.resnet18(), 3)
    torch.save(tv.state_dict(), tmp_path / "tv.pth")
    (tmp_path / "truncated.pth").write_bytes((tmp_path / "tv.pth").read_bytes()[:100_000])
    renamed = tv.state_dict()
    renamed["layer2.0.conv9.weight"] = renamed.pop("layer2.0.conv1.weight")
    torch.save(renamed, tmp_path / "renamed.pth")
    swav = {"module.conv1.weight": torch.zeros(64, 3, 7, 7), "module.prototypes.weight": torch.zeros(30, 128)}
    torch.save(dict(epoch=1, state_dict=swav, optimizer={}), tmp_path / "swav.pth")
    marker = tmp_path / "code-ran"
    evil = dict(epoch=200, state_dict={"module.encoder_q.conv1.weight": torch.zeros(1)}, arch=RunsCode(marker))
    torch.save(evil, tmp_path / "evil.pth.tar")

    def cmd(name, init, extra):  # init None: no --init
        init = f" --init {tmp_path / init}" if init else ""
        return recipe_cmd(
            ROOT / "slimclr_moco.py", "cifar-mocov2", TINY, small_cifar_dir, tmp_path / name, extra + init
        )

    r50, r18 = "--arch resnet50 --widths 1.0 0.5 --queue-size 64", "--arch resnet18 --widths 1.0"
    cases = {
        "v2": (cmd("v2", "v2.pth.tar", r50), None),
        "tv": (cmd("tv", "tv.pth", r18), None),
        "alien": (cmd("alien", "swav.pth", r18), None, ["not a format this script reads", "state_dict"]),
        "truncated": (cmd("truncated", "truncated.pth", r18), None, ["cannot read checkpoint", "truncated.pth"]),
        "renamed": (cmd("renamed", "renamed.pth", r18), None,
                    [f"no tensor for the backbone's {BACKBONE}layers.1.0.convs.0.weight", "torchvision ResNet"]),
        "evil": (cmd("evil", "evil.pth.tar", r18), None, ["refused to load", "evil.pth.tar", "io.open"]),
        "train": (cmd("resume", None, r18 + " --max-steps 1 --probe none"), None),  # leaves a last.pt
        "resume": (cmd("resume", "tv.pth", r18 + " --max-steps 1 --probe none"), None),  # resumes it, ignores --init
    }  # fmt: skip
    with ThreadPoolExecutor(2) as pool:
        jobs = []
        for i, part in enumerate((["v2", "alien", "truncated", "renamed"], ["tv", "train", "resume", "evil"])):
            (tmp_path / f"logs{i}").mkdir()
            jobs.append(pool.submit(forked_runs, {n: cases[n] for n in part}, tmp_path / f"logs{i}"))
        procs = {k: v for j in jobs for k, v in j.result().items()}

    proc = procs["v2"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = f"--init {tmp_path / 'v2.pth.tar'}: official SlimCLR-MoCov2; loaded momentum_encoder, online, queue; fresh:"
    line += " nothing"
    res = read_results(tmp_path / "v2")
    assert line in proc.stdout.splitlines() and res["init"] == line and res["steps_done"] == 0
    assert_finite_results(res, *(f"{m}@{w}" for m in ("knn_top1", "linear_top1") for w in (1.0, 0.5)))
    assert sorted(p.name for p in (tmp_path / "v2").glob("backbone*")) == ["backbone.pt", "backbone_w0.5.pt"]
    x, slimmable = real_images(small_cifar_dir), src.online.encoder.backbone
    full = torchvision.models.resnet50()
    full.fc = nn.Identity()
    half = RESNETS["resnet50"](width=0.5)
    for net, name, w in ((full, "backbone.pt", 1.0), (half, "backbone_w0.5.pt", 0.5)):
        net.load_state_dict(torch.load(tmp_path / "v2" / name, weights_only=True), strict=True)
        torch.testing.assert_close(features(net, x), features(slimmable, x, w), rtol=1e-5, atol=1e-5)

    proc = procs["tv"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"--init {tmp_path / 'tv.pth'}: torchvision ResNet; loaded momentum_encoder, online;" in proc.stdout
    out = torch.load(tmp_path / "tv" / "backbone.pt", weights_only=True)
    want = {k: v for k, v in tv.state_dict().items() if not k.startswith("fc.")}
    assert out.keys() == want.keys() and all(torch.equal(out[k], v) for k, v in want.items())

    assert procs["train"].returncode == 0 and procs["resume"].returncode == 0, procs["resume"].stderr[-3000:]
    assert "--init" not in procs["resume"].stdout and "resumed from" in procs["resume"].stdout
    assert read_results(tmp_path / "resume")["init"] is None

    failures = []
    for name, (command, _, needles) in ((n, c) for n, c in cases.items() if len(c) == 3):
        try:
            assert procs[name].returncode == 1, (procs[name].returncode, procs[name].stderr[-2000:])
            assert_one_line_error(procs[name], "slimclr_moco.py: error: ", *needles)
            assert not (tmp_path / name / "results.json").exists()
        except AssertionError as e:
            failures.append(f"{name}: {' '.join(map(str, command[1:]))}:\n{e}")
    assert not failures, "\n\n".join(failures)
    assert not marker.exists(), "the checkpoint's code ran"
