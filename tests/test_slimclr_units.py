"""Unit tests for slimclr_moco.py (spec ../shared/specs/slimclr.md, sections 1-4 and 7):

- model counts (spec 1.4): active parameters per width of the slimmable ResNet-50 (with and without the 1000-way fc,
  the MoCo v2 encoder, the MoCo v3 encoder and predictor, the SimCLR encoder), raw parameter sums, MACs at 224;
- the full width is torchvision's ResNet-50 (weights copied by name, eval outputs equal);
- width slicing (spec 1.1): a width-0.5 pass reads only the leading slices and its own BN copy; switchable BN keeps
  running statistics per width (spec 1.2); forward(x) returns every width; Online returns {width: embedding} per view;
- initialisation (spec 1.3): zero-init residual in every BN copy, N(0, 0.01) Linear layers in the encoder, PyTorch's
  default in the v3 predictor, the momentum encoder a frozen copy, the v2 queue normalised;
- the SlimCLR-MoCov2 loss (spec 2.2) and the SlimCLR-MoCov3 loss (spec 3.2) against per-spec float64 references written
  here (value and gradients), the slow start, lambda_max, the CE form of the distillation, the detached teacher,
  full_distill and the spec 2.2 scale at K = 65536; the SlimCLR-SimCLR loss by hand and against a float64
  transcription of the official s_SimCLR (value and gradients);
- the switchable probe loss (spec 4);
- schedules (spec 2.4, 3.4): the LR with warm-up, cosine and the slow-start peak; the MoCo v3 momentum ramp;
- MoCo v3's LARS against a hand calculation, build_optimizer's groups, ema_update;
- check_args refusing bad flags with one-line RunErrors."""

import copy
import dataclasses
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import slimclr_moco as S  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny tensors run on one thread

W4 = [1.0, 0.75, 0.5, 0.25]


def unit(gen, *shape, dtype=torch.float32):
    return F.normalize(torch.randn(*shape, generator=gen, dtype=torch.float64), dim=-1).to(dtype)


def small_resnet18(widths=(1.0, 0.5), arch="resnet18"):
    torch.manual_seed(0)
    return S.SLIM_RESNETS[arch](num_classes=0, widths=widths)


@torch.no_grad()
def randomize_bn(model, gen):
    """Every BN copy gets random affine parameters and running statistics (the init zeroes residual branches)."""
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            n = m.num_features
            if m.affine:
                m.weight.copy_(0.5 + 0.5 * torch.rand(n, generator=gen))
                m.bias.copy_(0.1 * torch.randn(n, generator=gen))
            m.running_mean.copy_(0.1 * torch.randn(n, generator=gen))
            m.running_var.copy_(0.5 + torch.rand(n, generator=gen))


# ---------------------------------------------------------------- counts (spec 1.4)
@pytest.fixture(scope="module")
def r50():
    torch.manual_seed(0)
    return S.slimmable_resnet50(num_classes=1000)


def test_resnet50_param_counts_and_torchvision(r50):
    """With the 1000-way fc: 25,557,032 / 14,771,992 / 6,917,640 / 1,993,976 active parameters; width 1.0 is
    torchvision's resnet50; the raw sum (every BN copy once) is 25,636,712; the backbone alone 23,508,032 / ..."""
    assert r50.widths == W4
    assert [S.active_param_count(r50, w) for w in W4] == [25_557_032, 14_771_992, 6_917_640, 1_993_976]
    tv = sum(p.numel() for p in torchvision.models.resnet50().parameters())
    assert S.active_param_count(r50, 1.0) == tv == 25_557_032
    assert sum(p.numel() for p in r50.parameters()) == 25_636_712
    backbone = S.slimmable_resnet50(num_classes=0)
    assert backbone.fc is None and backbone.num_features == 2048
    assert [S.active_param_count(backbone, w) for w in W4] == [23_508_032, 13_234_992, 5_892_640, 1_480_976]


def test_resnet50_macs_at_224(r50):
    """MACs (convs + 1000-way fc) per image at 224: 4.089 / 2.323 / 1.052 / 0.278 G (spec 1.4), within 0.001 G."""
    got = [S.active_macs(r50, w, 224) / 1e9 for w in W4]
    for g, expected in zip(got, [4.089, 2.323, 1.052, 0.278]):
        assert abs(g - expected) < 1e-3, got
    assert r50.training  # active_macs restores the mode


def test_moco_encoder_param_counts():
    """v2 encoder (backbone + 2048w-2048w-128 head with biases): 27,966,656 / 15,792,560 / 7,073,440 / 1,809,296,
    raw 28,046,336; v3 encoder (+ projector 2048w-4096w-256 with BN): 32,953,408 / 18,746,160 / 8,518,176 /
    2,269,456, raw 33,045,376; v3 predictor (256-4096w-256, BN): 2,105,344 / 1,579,008 / 1,052,672 / 526,336;
    SimCLR: no momentum encoder, predictor or queue, the encoder 27,970,880 at width 1."""
    torch.manual_seed(0)
    v2 = S.SlimEncoder(S.Args())
    assert [S.active_param_count(v2, w) for w in W4] == [27_966_656, 15_792_560, 7_073_440, 1_809_296]
    assert sum(p.numel() for p in v2.parameters()) == 28_046_336
    online = S.Online(S.MOCOV3)
    v3 = online.encoder
    assert [S.active_param_count(v3, w) for w in W4] == [32_953_408, 18_746_160, 8_518_176, 2_269_456]
    assert sum(p.numel() for p in v3.parameters()) == 33_045_376
    assert [S.active_param_count(online.predictor, w) for w in W4] == [2_105_344, 1_579_008, 1_052_672, 526_336]
    # SimCLR (s_resnet.py simclr_slim): + Linear(2048w, 2048w) with bias, BN, Linear(2048w, 128), BN(128) with affine
    simclr = S.SlimCLR(S.SIMCLR)
    assert simclr.momentum_encoder is None and simclr.online.predictor is None and not hasattr(simclr, "queue")
    head = [f * f + f + 2 * f + f * 128 + 2 * 128 for f in (2048, 1536, 1024, 512)]  # 4,462,848 at width 1
    backbone = [23_508_032, 13_234_992, 5_892_640, 1_480_976]
    assert [S.active_param_count(simclr.online, w) for w in W4] == [h + b for h, b in zip(head, backbone)]


# ---------------------------------------------------------------- full width == torchvision (spec 1.1)
def torchvision_key(key: str):
    """Slimmable ResNet-50 state_dict key -> torchvision resnet50 key; None for the BN copies of the other widths."""
    p = key.split(".")
    if p[0] in ("conv1", "fc"):
        return key
    if p[0] == "bn1":  # bn1.bn.i.X
        return f"bn1.{p[3]}" if p[2] == "0" else None
    assert p[0] == "layers", key
    prefix = f"layer{int(p[1]) + 1}.{p[2]}."
    if p[3] == "convs":  # layers.s.b.convs.j.weight
        return prefix + f"conv{int(p[4]) + 1}.weight"
    if p[3] == "bns":  # layers.s.b.bns.j.bn.i.X
        return prefix + f"bn{int(p[4]) + 1}.{p[7]}" if p[6] == "0" else None
    assert p[3] == "shortcut", key
    if p[4] == "0":  # layers.s.b.shortcut.0.weight
        return prefix + "downsample.0.weight"
    return prefix + f"downsample.1.{p[7]}" if p[6] == "0" else None  # layers.s.b.shortcut.1.bn.i.X


def test_full_width_equals_torchvision_resnet50():
    """The width-1.0 weights (conv, fc, BN copy 0 with its running statistics) loaded strictly into torchvision's
    resnet50 give the same eval-mode outputs (ResNet v1.5: stride on the 3x3 conv, projection shortcuts, ReLU after
    the add). BN copies are randomised first so that the zero-init residual branches matter."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = S.slimmable_resnet50(num_classes=1000)
    randomize_bn(model, g)
    with torch.no_grad():
        model.fc.weight.normal_(0, 0.05, generator=g)
        model.fc.bias.normal_(0, 0.1, generator=g)
    mapped = {}
    for k, v in model.state_dict().items():
        tk = torchvision_key(k)
        if tk is not None:
            assert tk not in mapped, (k, tk)
            mapped[tk] = v
    tv = torchvision.models.resnet50()
    tv.load_state_dict(mapped, strict=True)
    model.eval(), tv.eval()
    x = torch.randn(2, 3, 64, 64, generator=g)
    with torch.no_grad():
        ours, ref = model.forward_width(x, 1.0), tv(x)
    assert ours.shape == ref.shape == (2, 1000)
    assert ref.abs().max() > 0.1 and (ref[0] - ref[1]).abs().max() > 0.01  # not a degenerate comparison
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- slicing and switchable BN (spec 1.1, 1.2)
def test_slim_layers_use_leading_slices():
    """SlimLinear at 0.5 is x @ W[:out/2, :in_x].T + b[:out/2] (slim_out=False keeps every output); SlimConv2d uses
    weight[:int(out w), :x.shape[1]]; active_param_count counts exactly those slices; slim(c, w) truncates."""
    g = torch.Generator().manual_seed(0)
    assert [S.slim(64, w) for w in (1.0, 0.75, 0.5, 0.25, 0.3)] == [64, 48, 32, 16, 19]
    lin = S.SlimLinear(8, 6)
    x = torch.randn(2, 4, generator=g)
    torch.testing.assert_close(lin(x, 0.5), x @ lin.weight[:3, :4].T + lin.bias[:3])
    assert S.active_param_count(lin, 0.5) == 3 * (4 + 1) and S.active_param_count(lin, 1.0) == 6 * 9
    keep = S.SlimLinear(8, 6, bias=False, slim_out=False)
    torch.testing.assert_close(keep(x, 0.5), x @ keep.weight[:, :4].T)
    assert S.active_param_count(keep, 0.5) == 6 * 4
    conv = S.SlimConv2d(8, 6, 3, padding=1)
    xc = torch.randn(2, 4, 5, 5, generator=g)
    torch.testing.assert_close(conv(xc, 0.5), F.conv2d(xc, conv.weight[:3, :4], padding=1))
    assert S.active_param_count(conv, 0.5) == 3 * 4 * 9
    stem = S.SlimConv2d(3, 64, 7, 2, 3, slim_in=False)
    assert S.active_param_count(stem, 0.25) == 16 * 3 * 49
    bn = S.SwitchBN(64, W4)
    assert [b.num_features for b in bn.bn] == [64, 48, 32, 16]
    assert S.active_param_count(bn, 0.75) == 2 * 48


def test_width_half_reads_only_leading_slices_and_its_bn():
    """resnet18 with widths (1.0, 0.5), eval mode: overwriting every weight entry outside the width-0.5 slices with
    noise and changing every width-1.0 BN copy leaves forward_width(x, 0.5) bit-identical (while width 1.0 changes);
    changing one entry inside a slice changes it; the output has int(512 x 0.5) = 256 features."""
    g = torch.Generator().manual_seed(1)
    model = small_resnet18()
    randomize_bn(model, g)
    model.eval()
    x = torch.randn(2, 3, 32, 32, generator=g)
    with torch.no_grad():
        half, full = model.forward_width(x, 0.5), model.forward_width(x, 1.0)
        assert half.shape == (2, 256) and full.shape == (2, 512)
        n_convs = 0
        for m in model.modules():
            if isinstance(m, S.SlimConv2d):
                o = S.slim(m.out_channels, 0.5)
                i = S.slim(m.in_channels, 0.5) if m.slim_in else m.in_channels
                outside = torch.ones_like(m.weight, dtype=torch.bool)
                outside[:o, :i] = False
                m.weight[outside] = torch.randn(int(outside.sum()), generator=g)
                n_convs += 1
            if isinstance(m, S.SwitchBN):
                assert m.widths == [1.0, 0.5]
                wide = m.bn[0]
                wide.weight.add_(1.0), wide.bias.add_(1.0), wide.running_mean.add_(1.0), wide.running_var.mul_(3.0)
        assert n_convs == 1 + 8 * 2 + 3  # stem, 8 basic blocks, 3 projection shortcuts
        assert torch.equal(model.forward_width(x, 0.5), half)
        assert (model.forward_width(x, 1.0) - full).abs().max() > 1e-2
        inside = [
            (model.conv1.weight, (S.slim(64, 0.5) - 1, 2, 3, 3)),
            (model.layers[3][1].convs[1].weight, (255, 255, 1, 1)),
            (model.layers[2][0].shortcut[0].weight, (127, 63, 0, 0)),
        ]
        for weight, idx in inside:
            kept = weight[idx].item()
            weight[idx] = kept + 1.0
            assert (model.forward_width(x, 0.5) - half).abs().max() > 1e-4, idx
            weight[idx] = kept
        assert torch.equal(model.forward_width(x, 0.5), half)


def test_switch_bn_statistics_stay_per_width():
    """A train-mode forward at width 0.5 updates the running statistics of bn[1] (the 0.5 copy) of every SwitchBN and
    leaves bn[0] (width 1.0) untouched; forward(x) with width None returns {1.0: ..., 0.5: ...}, each the same as
    forward_width; forward(x, 0.5) returns only that width."""
    g = torch.Generator().manual_seed(2)
    model = small_resnet18()
    x = torch.randn(2, 3, 32, 32, generator=g)
    switch = [m for m in model.modules() if isinstance(m, S.SwitchBN)]
    assert len(switch) == 1 + 8 * 2 + 3
    before = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        model.forward_width(x, 0.5)
    after = model.state_dict()
    for name, m in model.named_modules():
        if isinstance(m, S.SwitchBN):
            for i, tracked in ((0, 0), (1, 1)):
                bn = m.bn[i]
                assert int(bn.num_batches_tracked) == tracked, (name, i)
                changed = not torch.equal(before[f"{name}.bn.{i}.running_mean"], bn.running_mean)
                assert changed == (i == 1), (name, i)
    for k, v in after.items():
        if ".bn.0." in k or k.startswith("bn1.bn.0"):
            assert torch.equal(before[k], v), k
    model.eval()
    with torch.no_grad():
        out = model(x)
        assert list(out) == [1.0, 0.5]
        for w, o in out.items():
            assert torch.equal(o, model.forward_width(x, w))
        assert list(model(x, 0.5)) == [0.5] and model(x, 0.5)[0.5].shape == (2, 256)


def test_online_forward_per_view_per_width():
    """Online(v3).forward(views, widths): one {width: [b, 256]} per view, each width its own pass with its own BN
    copy (every bn[i] counted once per view); the v3 embedding equals predictor(encoder(x, w), w)."""
    args = dataclasses.replace(S.CIFAR_MOCOV3, widths=(1.0, 0.5), mlp_dim=64)
    torch.manual_seed(0)
    online = S.Online(args)
    g = torch.Generator().manual_seed(3)
    views = [torch.randn(2, 3, 32, 32, generator=g) for _ in range(2)]
    with torch.no_grad():
        out = online(views, [1.0, 0.5])
    assert len(out) == 2 and all(list(o) == [1.0, 0.5] for o in out)
    assert all(e.shape == (2, 256) for o in out for e in o.values())
    for m in online.modules():
        if isinstance(m, S.SwitchBN):
            assert [int(b.num_batches_tracked) for b in m.bn] == [2, 2]
    online.eval()
    with torch.no_grad():
        again = online(views[:1], [0.5])[0][0.5]
        torch.testing.assert_close(again, online.predictor(online.encoder(views[0], 0.5), 0.5))


# ---------------------------------------------------------------- init (spec 1.3)
def residual_last_bns(model):
    """The BN copies of every SlimBlock's last BN (the residual branch's output)."""
    return {id(bn) for m in model.modules() if isinstance(m, S.SlimBlock) for bn in m.bns[-1].bn}


def test_init_bn_and_convs():
    """Every BN outside the residual branches' last one: weight 1, bias 0 (every width copy); every BN bias 0; convs
    Kaiming-normal fan_out (std sqrt(2 / (out k k)))."""
    model = small_resnet18(widths=W4)
    last = residual_last_bns(model)
    assert len(last) == 8 * 4  # 8 basic blocks x 4 width copies
    n_other = 0
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert (m.bias == 0).all()
            if id(m) not in last:
                assert (m.weight == 1).all()
                n_other += 1
    assert n_other == (1 + 8 + 3) * 4  # stem, first BN of each block, shortcut BNs
    w = model.layers[3][0].convs[1].weight  # 512 x 512 x 3 x 3
    assert w.std().item() == pytest.approx(math.sqrt(2 / (512 * 9)), rel=0.02)


@pytest.mark.parametrize("which", ["resnet18", "resnet50", "v2-encoder"])
def test_init_zero_residual_every_width_copy(which):
    """Spec 1.3 (zero_init_residual, always on): the last BN of every residual block has weight 0 in every width copy,
    in the bare backbone and in the SSL encoder (which re-runs init_slim)."""
    torch.manual_seed(0)
    if which == "resnet18":
        model = small_resnet18(widths=W4)
    elif which == "resnet50":
        model = S.slimmable_resnet50(num_classes=0, widths=(1.0, 0.25))
    else:
        model = S.SlimEncoder(dataclasses.replace(S.CIFAR_MOCOV2, widths=(1.0, 0.5)))
    last = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d) and id(m) in residual_last_bns(model)]
    assert len(last) >= 16
    nonzero = [bn.weight.detach().abs().max().item() for bn in last]
    assert max(nonzero) == 0.0, f"{sum(v > 0 for v in nonzero)} of {len(last)} residual BN copies are not zero"


def test_init_linear_layers():
    """Encoder Linear layers (v2 head, v3 projector) are N(0, 0.01) with zero bias; the v3 predictor keeps PyTorch's
    default (U(+-1/sqrt(fan_in)), std 1/sqrt(3 fan_in)), i.e. it is not N(0, 0.01)."""
    torch.manual_seed(0)
    v2 = S.SlimEncoder(dataclasses.replace(S.CIFAR_MOCOV2, widths=(1.0, 0.5)))
    lin2 = [m for m in v2.head if isinstance(m, nn.Linear)]
    assert [tuple(m.weight.shape) for m in lin2] == [(512, 512), (128, 512)]
    online = S.Online(dataclasses.replace(S.CIFAR_MOCOV3, widths=(1.0, 0.5)))
    lin3 = [m for m in online.encoder.head if isinstance(m, nn.Linear)]
    assert [tuple(m.weight.shape) for m in lin3] == [(2048, 512), (256, 2048)]
    for m in lin2 + lin3:
        assert m.weight.std().item() == pytest.approx(0.01, rel=0.03)
        assert abs(m.weight.mean().item()) < 1e-3
        assert m.bias is None or (m.bias == 0).all()
    assert all(m.bias is None for m in lin3)
    pred = [m for m in online.predictor if isinstance(m, nn.Linear)]
    assert [tuple(m.weight.shape) for m in pred] == [(2048, 256), (256, 2048)]
    for m in pred:
        bound = 1 / math.sqrt(m.in_features)
        assert m.weight.abs().max().item() <= bound
        assert m.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.03)
    assert (online.predictor[1].bn[0].weight == 1).all()
    last = online.encoder.head[-1]
    assert isinstance(last, S.SwitchBN) and all(not b.affine and b.num_features == 256 for b in last.bn)


def test_momentum_encoder_and_queue_init():
    """SlimCLR: the momentum encoder equals the online encoder (every parameter and buffer, every BN copy), is a
    separate copy with requires_grad False; v2's queue is [K, D] with unit rows; v3 has no queue and no predictor copy.
    """
    torch.manual_seed(0)
    model = S.SlimCLR(dataclasses.replace(S.CIFAR_MOCOV2, widths=(1.0, 0.5)))
    online, mom = model.online.encoder.state_dict(), model.momentum_encoder.state_dict()
    assert list(online) == list(mom) and any(".bn.1." in k for k in mom)
    for k in online:
        assert torch.equal(online[k], mom[k]), k
        assert online[k].data_ptr() != mom[k].data_ptr(), k
    assert all(not p.requires_grad for p in model.momentum_encoder.parameters())
    assert all(p.requires_grad for p in model.online.parameters())
    assert model.queue.shape == (4096, 128)
    torch.testing.assert_close(model.queue.norm(dim=1), torch.ones(4096))
    v3 = S.SlimCLR(dataclasses.replace(S.CIFAR_MOCOV3, widths=(1.0, 0.5), mlp_dim=64))
    assert not hasattr(v3, "queue")
    assert not any(k.startswith("predictor") for k in v3.momentum_encoder.state_dict())


# ---------------------------------------------------------------- SlimCLR-MoCov2 loss (spec 2.2)
def ce_first(z):
    """mean_b CE(z, target 0) written out."""
    return (torch.logsumexp(z, 1) - z[:, 0]).mean()


def ref_kd(student, teacher, t):
    """t^2 mean_b[-sum softmax(teacher / t) log_softmax(student / t)], the teacher detached."""
    p = torch.softmax(teacher.detach() / t, 1)
    return t * t * (-(p * torch.log_softmax(student / t, 1)).sum(1)).mean()


def ref_combine(logits, nce, active, a, t, reweight, full_distill, detach=True):
    """Spec 2.2 steps 4-6, one width at a time."""
    widths = sorted(logits, reverse=True)
    top = widths[0]
    if not active:
        return nce(logits[top])
    lam = 1 + sum(widths[1:]) if reweight else 1.0
    loss = lam * nce(logits[top])
    for i, w in enumerate(widths):
        if i == 0:
            continue
        teachers = widths[:i] if full_distill else [top]
        kd = 0
        for v in teachers:
            if detach:
                kd = kd + ref_kd(logits[w], logits[v], t)
            else:  # the wrong variant, for contrast: gradient flows into the teacher
                p = torch.softmax(logits[v] / t, 1)
                kd = kd + t * t * (-(p * torch.log_softmax(logits[w] / t, 1)).sum(1)).mean()
        kd = kd / len(teachers)
        loss = loss + (1 - a) * nce(logits[w]) + a * kd
    return loss


def ref_v2(q, k, queue, *, temperature=0.2, epoch, slim_start_epoch, distill_weight=0.5, distill_temperature=5.0,
           reweight=True, full_distill=False, detach=True):  # fmt: skip
    """Spec 2.2 in float64: z_w = [q_w . k, q_w Q^T] (plain cosines), nce_w = CE(z_w / T, 0)."""
    active = epoch >= slim_start_epoch
    widths = sorted(q, reverse=True)
    k, queue = k.double(), queue.double()
    z = {}
    for w in widths if active else widths[:1]:
        qw = q[w].double()
        z[w] = torch.cat([(qw * k).sum(1, keepdim=True), qw @ queue.T], 1)
    return ref_combine(
        z, lambda l: ce_first(l / temperature), active, distill_weight, distill_temperature, reweight, full_distill,
        detach,
    )  # fmt: skip


def v2_inputs(widths=W4, b=6, d=16, k=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(b, d, generator=g, dtype=torch.float64)
    q = {
        w: F.normalize(base + 0.7 * torch.randn(b, d, generator=g, dtype=torch.float64), dim=1).float() for w in widths
    }
    key = F.normalize(base + 0.5 * torch.randn(b, d, generator=g, dtype=torch.float64), dim=1).float()
    return q, key, unit(g, k, d)


def value_and_grads(fn, q, *args, dtype=torch.float32, **kw):
    leaves = {w: v.to(dtype).clone().requires_grad_(True) for w, v in q.items()}
    loss = fn(leaves, *args, **kw)
    grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    return loss.detach(), dict(zip(leaves, grads))


V2_CASES = {
    "default": dict(),
    "three_widths": dict(widths=[1.0, 0.5, 0.25]),
    "no_reweight": dict(reweight=False),
    "no_distill": dict(distill_weight=0.0),
    "distill_only": dict(distill_weight=1.0),
    "full_distill": dict(full_distill=True, distill_temperature=0.5),
    "T_t_a": dict(temperature=0.07, distill_temperature=2.0, distill_weight=0.3),
    "inactive": dict(epoch=10.0),
}


@pytest.mark.parametrize("case", list(V2_CASES))
def test_mocov2_loss_matches_reference(case):
    """slimclr_mocov2_loss equals the float64 transcription of spec 2.2 in value and in the gradient w.r.t. every
    width's query (the sub-widths' gradient is None or zero before the slow start)."""
    kw = dict(V2_CASES[case])
    q, k, queue = v2_inputs(widths=kw.pop("widths", W4))
    kw = dict(dict(epoch=120.0, slim_start_epoch=100.0), **kw)
    val, grads = value_and_grads(S.slimclr_mocov2_loss, q, k, queue, **kw)
    ref, ref_grads = value_and_grads(ref_v2, q, k, queue, dtype=torch.float64, **kw)
    assert val.dtype == torch.float32 and val.shape == ()
    torch.testing.assert_close(val.double(), ref, rtol=1e-5, atol=1e-5)
    for w, gr in ref_grads.items():
        if gr is None:
            assert grads[w] is None or not grads[w].any(), w
        else:
            assert gr.abs().max() > 1e-4, w
            torch.testing.assert_close(grads[w].double(), gr, rtol=1e-4, atol=1e-6, msg=lambda m: f"width {w}: {m}")


def test_mocov2_inactive_is_unweighted_full_width_nce():
    """Before the slow start the loss is exactly CE(z_max / T, 0) (no lambda_max), the sub-width entries are ignored
    (NaN queries change nothing) and get no gradient."""
    q, k, queue = v2_inputs()
    z = torch.cat([(q[1.0] * k).sum(1, keepdim=True), q[1.0] @ queue.T], 1)
    expected = F.cross_entropy(z / 0.2, torch.zeros(len(z), dtype=torch.long))
    got = S.slimclr_mocov2_loss(q, k, queue, epoch=3.0, slim_start_epoch=100.0)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)
    nan_q = {w: (v if w == 1.0 else torch.full_like(v, float("nan"))) for w, v in q.items()}
    torch.testing.assert_close(S.slimclr_mocov2_loss(nan_q, k, queue, epoch=3.0, slim_start_epoch=100.0), got)
    _, grads = value_and_grads(S.slimclr_mocov2_loss, q, k, queue, epoch=3.0, slim_start_epoch=100.0)
    assert grads[1.0].abs().max() > 1e-4
    for w in W4[1:]:
        assert grads[w] is None or not grads[w].any(), w


@pytest.mark.parametrize("widths,lam", [(W4, 2.5), ([1.0, 0.5, 0.25], 1.75), ([1.0, 0.5], 1.5)])
def test_mocov2_lambda_max(widths, lam):
    """With every width given the same query and no distillation, loss / nce = lambda_max + (n - 1) with reweighting
    (lambda_max = 1 + sum of the sub-widths: 2.5, 1.75) and n without it."""
    q, k, queue = v2_inputs(widths=[1.0])
    same = {w: q[1.0] for w in widths}
    nce = S.slimclr_mocov2_loss(q, k, queue, epoch=0.0, slim_start_epoch=-1)  # one width: lambda 1
    rw = S.slimclr_mocov2_loss(same, k, queue, epoch=0.0, slim_start_epoch=-1, distill_weight=0.0)
    flat = S.slimclr_mocov2_loss(same, k, queue, epoch=0.0, slim_start_epoch=-1, distill_weight=0.0, reweight=False)
    assert (rw / nce).item() == pytest.approx(lam + len(widths) - 1, rel=1e-5)
    assert (flat / nce).item() == pytest.approx(len(widths), rel=1e-5)


def test_mocov2_no_distill_is_weighted_infonce():
    """distill_weight 0: lambda_max nce_max + sum of the sub-widths' nce, nothing else."""
    q, k, queue = v2_inputs()
    got = S.slimclr_mocov2_loss(q, k, queue, epoch=150.0, slim_start_epoch=100.0, distill_weight=0.0)
    nces = {w: ce_first(torch.cat([(v * k).sum(1, keepdim=True), v @ queue.T], 1).double() / 0.2) for w, v in q.items()}
    expected = 2.5 * nces[1.0] + sum(nces[w] for w in W4[1:])
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=0)


def test_mocov2_kd_is_cross_entropy_form():
    """kd_w = t^2 (KL(p_teacher || p_student) + H(p_teacher)) at t = 5 (the CE form, not KL alone)."""
    q, k, queue = v2_inputs(widths=[1.0, 0.5])
    kw = dict(epoch=150.0, slim_start_epoch=100.0, reweight=False)
    nce = S.slimclr_mocov2_loss({1.0: q[1.0]}, k, queue, **kw)
    kd = (S.slimclr_mocov2_loss(q, k, queue, distill_weight=1.0, **kw) - nce).double()
    z = {w: torch.cat([(v * k).sum(1, keepdim=True), v @ queue.T], 1).double() for w, v in q.items()}
    log_p, log_s = F.log_softmax(z[1.0] / 5, 1), F.log_softmax(z[0.5] / 5, 1)
    kl = F.kl_div(log_s, log_p, log_target=True, reduction="batchmean")
    entropy = -(log_p.exp() * log_p).sum(1).mean()
    torch.testing.assert_close(kd, 25 * (kl + entropy), rtol=1e-5, atol=0)
    assert 25 * entropy > 10 * 25 * kl  # the entropy dominates: a KL-only loss would be far off


def test_mocov2_teacher_is_detached():
    """With distillation on, d loss / d q_max is exactly lambda_max x d nce_max / d q_max: the teacher gets no
    gradient from the kd terms (a non-detached teacher would change it)."""
    q, k, queue = v2_inputs()
    kw = dict(epoch=150.0, slim_start_epoch=100.0)
    _, grads = value_and_grads(S.slimclr_mocov2_loss, q, k, queue, **kw)
    _, alone = value_and_grads(S.slimclr_mocov2_loss, {1.0: q[1.0]}, k, queue, **kw)
    torch.testing.assert_close(grads[1.0], 2.5 * alone[1.0], rtol=1e-5, atol=1e-7)
    _, wrong = value_and_grads(ref_v2, q, k, queue, dtype=torch.float64, detach=False, **kw)
    assert (wrong[1.0] - 2.5 * alone[1.0].double()).abs().max() > 1e-2


def test_mocov2_slow_start_switch():
    """slim_start_epoch -1 is always active (epoch 0); with 100, epoch 99.99 (fractional) gives the unweighted full
    loss and 100.0 the SlimCLR loss."""
    q, k, queue = v2_inputs()
    active = ref_v2(q, k, queue, epoch=1.0, slim_start_epoch=0.0)
    inactive = ref_v2(q, k, queue, epoch=0.0, slim_start_epoch=1.0)
    assert active - inactive > 1.0
    for epoch, start, expected in [(0.0, -1, active), (99.99, 100, inactive), (100.0, 100, active)]:
        got = S.slimclr_mocov2_loss(q, k, queue, epoch=epoch, slim_start_epoch=start)
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=0, msg=f"epoch {epoch} start {start}")


def test_mocov2_full_distill_averages_larger_widths():
    """full_distill: sub-width w_i distils from every larger width, kd averaged; with a = 1 and no reweighting,
    loss - nce_max = sum_i mean_{v < i} kd(z_i, z_v)."""
    q, k, queue = v2_inputs()
    kw = dict(epoch=150.0, slim_start_epoch=100.0, reweight=False, distill_weight=1.0, distill_temperature=0.1)
    nce = S.slimclr_mocov2_loss({1.0: q[1.0]}, k, queue, **kw)
    got = S.slimclr_mocov2_loss(q, k, queue, full_distill=True, **kw) - nce
    z = {w: torch.cat([(v * k).sum(1, keepdim=True), v @ queue.T], 1).double() for w, v in q.items()}
    expected = sum(sum(ref_kd(z[w], z[v], 0.1) for v in W4[:i]) / i for i, w in enumerate(W4) if i)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=0)
    only_full = S.slimclr_mocov2_loss(q, k, queue, **kw) - nce
    assert abs(only_full - got) > 1e-3


def test_mocov2_distillation_scale_at_65536():
    """Spec 2.2 [!]: with K = 65536 random keys and t = 5 the teacher is nearly uniform and each sub-width's kd is
    about 25 ln(65537) = 277; the default total after the slow start is above 420."""
    g = torch.Generator().manual_seed(4)
    q = {w: unit(g, 8, 128) for w in W4}
    k, queue = unit(g, 8, 128), unit(g, 65536, 128)
    kw = dict(epoch=150.0, slim_start_epoch=100.0)
    nce = S.slimclr_mocov2_loss({1.0: q[1.0]}, k, queue, **kw)
    kd = S.slimclr_mocov2_loss({1.0: q[1.0], 0.5: q[0.5]}, k, queue, distill_weight=1.0, reweight=False, **kw) - nce
    assert kd.item() == pytest.approx(25 * math.log(65537), rel=0.02)
    assert S.slimclr_mocov2_loss(q, k, queue, **kw).item() > 420


# ---------------------------------------------------------------- SlimCLR-MoCov3 loss (spec 3.2)
def ref_v3(q1, q2, k1, k2, *, temperature=1.0, epoch, slim_start_epoch, distill_weight=0.5, distill_temperature=1.0,
           reweight=True):  # fmt: skip
    """Spec 3.2 in float64: direction(q1, k2) + direction(q2, k1), l_w = q_w k^T / T, nce_w = 2T CE(l_w, arange),
    kd on l_w with t."""
    active = epoch >= slim_start_epoch

    def nce(l):
        return 2 * temperature * (torch.logsumexp(l, 1) - l.diagonal()).mean()

    def direction(q, k):
        widths = sorted(q, reverse=True)
        logits = {w: q[w].double() @ k.double().T / temperature for w in (widths if active else widths[:1])}
        return ref_combine(logits, nce, active, distill_weight, distill_temperature, reweight, False)

    return direction(q1, k2) + direction(q2, k1)


V3_CASES = {
    "default": dict(),
    "T_t": dict(temperature=0.5, distill_temperature=2.0),
    "T_t_a_noreweight": dict(temperature=0.2, distill_temperature=3.0, distill_weight=0.3, reweight=False),
    "no_distill": dict(temperature=0.5, distill_weight=0.0),
    "inactive": dict(temperature=0.5, epoch=100.0),
}


@pytest.mark.parametrize("case", list(V3_CASES))
def test_mocov3_loss_matches_reference(case):
    """slimclr_mocov3_loss equals the float64 transcription of spec 3.2 in value and in the gradients w.r.t. every
    query of both views; pairing q1 with k1 instead of k2 would give another value."""
    kw = dict(dict(epoch=200.0, slim_start_epoch=150.0), **V3_CASES[case])
    g = torch.Generator().manual_seed(5)
    b, d = 6, 16
    base = torch.randn(b, d, generator=g)
    k1, k2 = (F.normalize(base + 0.6 * torch.randn(b, d, generator=g), dim=1) for _ in range(2))
    qs = {(v, w): F.normalize(base + 0.8 * torch.randn(b, d, generator=g), dim=1) for v in (1, 2) for w in W4}

    def run(fn, dtype):
        leaves = {key: t.to(dtype).clone().requires_grad_(True) for key, t in qs.items()}
        q1 = {w: leaves[(1, w)] for w in W4}
        q2 = {w: leaves[(2, w)] for w in W4}
        loss = fn(q1, q2, k1.to(dtype), k2.to(dtype), **kw)
        return loss.detach(), dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)))

    val, grads = run(S.slimclr_mocov3_loss, torch.float32)
    ref, ref_grads = run(ref_v3, torch.float64)
    assert val.shape == ()
    torch.testing.assert_close(val.double(), ref, rtol=1e-5, atol=1e-6)
    for key, gr in ref_grads.items():
        if gr is None:
            assert grads[key] is None or not grads[key].any(), key
        else:
            assert gr.abs().max() > 1e-4, key
            torch.testing.assert_close(grads[key].double(), gr, rtol=1e-4, atol=1e-6, msg=lambda m: f"{key}: {m}")
    q1 = {w: qs[(1, w)] for w in W4}
    q2 = {w: qs[(2, w)] for w in W4}
    swapped = S.slimclr_mocov3_loss(q1, q2, k2, k1, **kw)
    assert abs(swapped.item() - val.item()) > 1e-3


def test_mocov3_single_width_is_2T_symmetric_infonce():
    """One width, T = 0.5: loss = 2T [CE(q1 k2^T / T, arange) + CE(q2 k1^T / T, arange)] (the 2T multiplies the CE)."""
    g = torch.Generator().manual_seed(6)
    q1, q2, k1, k2 = (unit(g, 5, 8) for _ in range(4))
    labels = torch.arange(5)
    expected = F.cross_entropy(q1 @ k2.T / 0.5, labels) + F.cross_entropy(q2 @ k1.T / 0.5, labels)
    got = S.slimclr_mocov3_loss({1.0: q1}, {1.0: q2}, k1, k2, temperature=0.5, epoch=0, slim_start_epoch=1)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)


# ---------------------------------------------------------------- SlimCLR-SimCLR loss (official models/s_simclr.py)
def ref_simclr(q1, q2, *, temperature=0.1, epoch, slim_start_epoch, distill_weight=0.5, distill_temperature=5.0,
               reweight=True):  # fmt: skip
    """Float64 transcription of the official s_SimCLR on one process: q_all = [q1; q2] (2N rows), sim = q_all q_all^T
    without its diagonal [2N, 2N - 1], labels [arange(N) + N - 1, arange(N)], nce_w = CE(sim_w / T, labels); the
    distillation (kd_distill_loss_v2, teacher and student T 5) on the raw sim_w, teacher the full width's, detached;
    the weights of loss_weights_generate option 5 on (1 - a) nce_w + a kd_w; before the slow start nce_max alone."""
    active = epoch >= slim_start_epoch
    n = len(q1[1.0])
    labels = torch.cat([torch.arange(n) + n - 1, torch.arange(n)])

    def sim(w):
        q_all = torch.cat([q1[w], q2[w]]).double()
        s = q_all @ q_all.T
        return s[~torch.eye(2 * n, dtype=torch.bool)].view(2 * n, 2 * n - 1)

    def nce(s):
        return (torch.logsumexp(s / temperature, 1) - s[torch.arange(2 * n), labels] / temperature).mean()

    widths = sorted(q1, reverse=True)
    logits = {w: sim(w) for w in (widths if active else widths[:1])}
    return ref_combine(logits, nce, active, distill_weight, distill_temperature, reweight, False)


def test_simclr_nt_xent_by_hand():
    """N = 2 images whose two views are e1 and e2: every row sees its positive at cosine 1 and two negatives at 0, so
    NT-Xent = log(1 + 2 e^(-1/T)); a sub-width equal to the full one adds (1 - a) of that and a t^2 H(softmax([0, 1,
    0] / t)) (the CE-form distillation of identical logits: the teacher's entropy), with lambda_max = 1.5."""
    e = torch.eye(2)
    kw = dict(temperature=0.5, slim_start_epoch=1.0)
    nce = math.log(1 + 2 * math.exp(-2))
    got = S.slimclr_simclr_loss({1.0: e, 0.5: e}, {1.0: e, 0.5: e}, epoch=0.0, **kw)
    assert got.item() == pytest.approx(nce, rel=1e-6)
    p = torch.softmax(torch.tensor([0.0, 0.2, 0.0], dtype=torch.float64), 0)
    kd = 25 * -(p * p.log()).sum().item()
    got = S.slimclr_simclr_loss({1.0: e, 0.5: e}, {1.0: e, 0.5: e}, epoch=1.0, **kw)
    assert got.item() == pytest.approx(1.5 * nce + 0.5 * nce + 0.5 * kd, rel=1e-6)


SIMCLR_CASES = {
    "default": dict(),
    "three_widths": dict(widths=[1.0, 0.5, 0.25]),
    "T_t_a_noreweight": dict(temperature=0.3, distill_temperature=2.0, distill_weight=0.3, reweight=False),
    "no_distill": dict(distill_weight=0.0),
    "inactive": dict(epoch=10.0),
}


@pytest.mark.parametrize("case", list(SIMCLR_CASES))
def test_simclr_loss_matches_official_transcription(case):
    """slimclr_simclr_loss on one process equals the float64 transcription of the official s_SimCLR in value and in
    the gradients w.r.t. every width's embeddings of both views (the teacher detached; the sub-widths get no gradient
    before the slow start); swapping two images' second views changes the positives and the value."""
    kw = dict(SIMCLR_CASES[case])
    widths = kw.pop("widths", W4)
    kw = dict(dict(epoch=60.0, slim_start_epoch=50.0), **kw)
    g = torch.Generator().manual_seed(8)
    base = torch.randn(6, 16, generator=g)
    qs = {(v, w): F.normalize(base + 0.8 * torch.randn(6, 16, generator=g), dim=1) for v in (1, 2) for w in widths}

    def run(fn, dtype, swap=False):
        leaves = {key: t.to(dtype).clone().requires_grad_(True) for key, t in qs.items()}
        q2 = {w: leaves[(2, w)][[1, 0, 2, 3, 4, 5] if swap else slice(None)] for w in widths}
        loss = fn({w: leaves[(1, w)] for w in widths}, q2, **kw)
        return loss.detach(), dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)))

    val, grads = run(S.slimclr_simclr_loss, torch.float32)
    ref, ref_grads = run(ref_simclr, torch.float64)
    assert val.shape == ()
    torch.testing.assert_close(val.double(), ref, rtol=1e-5, atol=1e-6)
    for key, gr in ref_grads.items():
        if gr is None:
            assert grads[key] is None or not grads[key].any(), key
        else:
            assert gr.abs().max() > 1e-4, key
            torch.testing.assert_close(grads[key].double(), gr, rtol=1e-4, atol=1e-6, msg=lambda m: f"{key}: {m}")
    assert abs(run(S.slimclr_simclr_loss, torch.float32, swap=True)[0].item() - val.item()) > 1e-3


# ---------------------------------------------------------------- switchable probe loss (spec 4)
def test_linear_probe_loss_matches_hand_computation():
    """CE(full, y) + sum_w<max 0.5 [softCE(sub, softmax(full).detach()) + CE(sub, y)], no temperature; the full head's
    gradient is that of CE(full, y) alone."""
    g = torch.Generator().manual_seed(7)
    b, c = 5, 7
    logits = {w: (2 * torch.randn(b, c, generator=g)).requires_grad_(True) for w in W4}
    y = torch.randint(0, c, (b,), generator=g)
    got = S.slimclr_linear_probe_loss(logits, y)

    def ce(s):
        return (torch.logsumexp(s, 1) - s[torch.arange(b), y]).mean()

    full = logits[1.0].detach().double()
    p = torch.exp(full - torch.logsumexp(full, 1, keepdim=True))
    expected = ce(full)
    for w in W4[1:]:
        s = logits[w].detach().double()
        expected = expected + 0.5 * ((-(p * (s - torch.logsumexp(s, 1, keepdim=True))).sum(1)).mean() + ce(s))
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=0)
    grads = torch.autograd.grad(got, [logits[w] for w in W4])
    onehot = F.one_hot(y, c).double()
    torch.testing.assert_close(grads[0].double(), (p - onehot) / b, rtol=1e-5, atol=1e-7)
    for gw, w in zip(grads[1:], W4[1:]):
        s = logits[w].detach().double()
        sm = torch.softmax(s, 1)
        torch.testing.assert_close(gw.double(), 0.5 * ((sm - p) + (sm - onehot)) / b, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- schedules (spec 2.4, 3.1, 3.4)
def cos_lr(step, peak, warmup, total):
    return 0.5 * peak * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))


def test_lr_at_mocov2():
    """Args() with 10 steps/epoch (200 epochs, 100 warm-up steps): 1e-8 at step 0, ~0.1 at 50, the 0.2 peak at 100,
    0.1 at the cosine midpoint (1050), the last step tiny but >= 1e-8 (the floor); slim_start_lr unset: the cosine
    goes on through epoch 100; slim_start_lr 1e-4: from step 1000 the peak is 1e-4 (step 999 the normal cosine)."""
    args, spe = S.Args(), 10
    assert (args.lr, args.lr_scaling, args.epochs, args.warmup_epochs, args.slim_start_lr) == (
        0.2, "none", 200, 10.0, None
    )  # fmt: skip
    assert S.lr_at(0, args, spe) == pytest.approx(1e-8, rel=1e-9)
    assert S.lr_at(50, args, spe) == pytest.approx(0.5 * (0.2 - 1e-8) + 1e-8, rel=1e-9)
    assert S.lr_at(100, args, spe) == pytest.approx(0.2, rel=1e-12)
    assert S.lr_at(1050, args, spe) == pytest.approx(0.1, rel=1e-12)
    last = S.lr_at(1999, args, spe)
    assert 1e-8 <= last < 1e-6
    assert last == pytest.approx(max(cos_lr(1999, 0.2, 100, 2000), 1e-8), rel=1e-9)
    assert S.lr_at(2000, args, spe) == 1e-8  # the cosine reaches 0 at S: the floor
    for s in (999, 1000, 1001, 1500):
        assert S.lr_at(s, args, spe) == pytest.approx(cos_lr(s, 0.2, 100, 2000), rel=1e-12), s
    shipped = dataclasses.replace(args, slim_start_lr=1e-4)
    assert S.lr_at(999, shipped, spe) == pytest.approx(cos_lr(999, 0.2, 100, 2000), rel=1e-12)
    assert S.lr_at(999, shipped, spe) == pytest.approx(0.108, abs=2e-3)
    assert S.lr_at(1000, shipped, spe) == pytest.approx(1e-4 * 0.5 * (1 + math.cos(math.pi * 900 / 1900)), rel=1e-12)
    assert S.lr_at(50, shipped, spe) == S.lr_at(50, args, spe)


def test_lr_at_mocov3():
    """MOCOV3: lr 0.3 x 1024/256 = 1.2 peak after 99 warm-up steps (9.9 epochs x 10); from epoch 150 the peak is
    0.8 x 4 = 3.2 and the LR jumps up from about 0.64 to about 1.69."""
    args, spe = S.MOCOV3, 10
    assert S.lr_at(0, args, spe) == pytest.approx(1e-8, rel=1e-9)
    assert S.lr_at(99, args, spe) == pytest.approx(1.2, rel=1e-12)
    assert max(S.lr_at(s, args, spe) for s in range(1500)) == pytest.approx(1.2, rel=1e-12)
    before, after = S.lr_at(1499, args, spe), S.lr_at(1500, args, spe)
    assert before == pytest.approx(cos_lr(1499, 1.2, 99, 3000), rel=1e-12)
    assert after == pytest.approx(cos_lr(1500, 3.2, 99, 3000), rel=1e-12)
    assert before == pytest.approx(0.64, abs=0.01) and after == pytest.approx(1.69, abs=0.01)
    half = dataclasses.replace(args, batch_size=512)  # linear scaling: both peaks halve
    assert S.lr_at(99, half, spe) == pytest.approx(0.6, rel=1e-12)
    assert S.lr_at(1500, half, spe) == pytest.approx(after / 2, rel=1e-12)


def test_momentum_at():
    """v2: constant 0.999; v3: 1 - (1 + cos(pi epoch / epochs)) / 2 x 0.01: 0.99 at step 0, 0.995 halfway, 1 at the end
    (fractional epoch)."""
    spe = 10
    assert [S.momentum_at(s, S.Args(), spe) for s in (0, 777, 1999)] == [0.999] * 3
    v3 = S.MOCOV3
    assert S.momentum_at(0, v3, spe) == pytest.approx(0.99, abs=1e-12)
    assert S.momentum_at(1500, v3, spe) == pytest.approx(0.995, abs=1e-12)
    assert S.momentum_at(3000, v3, spe) == pytest.approx(1.0, abs=1e-12)
    assert S.momentum_at(5, v3, spe) == pytest.approx(1 - 0.5 * (1 + math.cos(math.pi * 0.5 / 300)) * 0.01, abs=1e-15)


# ---------------------------------------------------------------- optimizer (spec 2.4, 3.4)
def test_mocov3_lars_matches_hand_calculation():
    """2-D parameter: g' = g + wd p, ratio = eta ||p|| / ||g'||, mu = ratio g' (then m mu + ratio g'), p -= lr mu;
    1-D parameter: plain momentum SGD, no weight decay; a zero-norm 2-D parameter uses ratio 1."""
    g = torch.Generator().manual_seed(8)
    lr, wd, mom, eta = 0.5, 0.1, 0.9, 0.001
    w0 = torch.randn(3, 4, generator=g, dtype=torch.float64)
    b0 = torch.randn(4, generator=g, dtype=torch.float64)
    grads = [(torch.randn(3, 4, generator=g, dtype=torch.float64), torch.randn(4, generator=g, dtype=torch.float64),
              torch.randn(2, 3, generator=g, dtype=torch.float64)) for _ in range(2)]  # fmt: skip
    w, b, z = nn.Parameter(w0.clone()), nn.Parameter(b0.clone()), nn.Parameter(torch.zeros(2, 3, dtype=torch.float64))
    opt = S.MoCoV3LARS([w, b, z], lr=lr, weight_decay=wd, momentum=mom, eta=eta)
    ew, eb, ez = w0.clone(), b0.clone(), torch.zeros(2, 3, dtype=torch.float64)
    mw = mb = mz = None
    for step, (gw, gb, gz) in enumerate(grads):
        w.grad, b.grad, z.grad = gw.clone(), gb.clone(), gz.clone()
        opt.step()
        dw = gw + wd * ew
        dw = dw * (eta * ew.norm() / dw.norm())
        dz = gz + wd * ez
        if step > 0:  # at step 0 ||p|| = 0: ratio 1, dz unchanged
            dz = dz * (eta * ez.norm() / dz.norm())
        mw = dw if mw is None else mom * mw + dw
        mb = gb if mb is None else mom * mb + gb
        mz = dz if mz is None else mom * mz + dz
        ew, eb, ez = ew - lr * mw, eb - lr * mb, ez - lr * mz
        torch.testing.assert_close(w.data, ew, rtol=1e-12, atol=1e-15, msg=lambda m: f"step {step} 2-D: {m}")
        torch.testing.assert_close(b.data, eb, rtol=1e-12, atol=1e-15, msg=lambda m: f"step {step} 1-D: {m}")
        torch.testing.assert_close(z.data, ez, rtol=1e-12, atol=1e-15, msg=lambda m: f"step {step} zero: {m}")
    assert (b0 - b.data).abs().max() > 0.1 and (w0 - w.data).abs().max() < 1e-2  # the trust ratio keeps 2-D steps small


def test_build_optimizer():
    """v2: torch.optim.SGD, momentum 0.9, no Nesterov, wd 1e-4 on every online parameter (BN and biases included),
    nothing of the momentum encoder; v3: MoCoV3LARS with wd 1e-6 over the encoder and the predictor."""
    small = dict(arch="resnet18-cifar", widths=(1.0, 0.5))
    torch.manual_seed(0)
    model = S.SlimCLR(dataclasses.replace(S.Args(), queue_size=256, **small))
    opt = S.build_optimizer(model, S.Args())
    assert type(opt) is torch.optim.SGD
    ids = [id(p) for grp in opt.param_groups for p in grp["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.online.parameters()}
    assert not set(ids) & {id(p) for p in model.momentum_encoder.parameters()}
    assert any(p.ndim == 1 for grp in opt.param_groups for p in grp["params"])  # BN and biases are in
    for grp in opt.param_groups:
        assert (grp["weight_decay"], grp["momentum"], grp["nesterov"], grp["lr"]) == (1e-4, 0.9, False, 0.2)
    v3 = S.SlimCLR(dataclasses.replace(S.MOCOV3, mlp_dim=64, **small))
    opt3 = S.build_optimizer(v3, S.MOCOV3)
    assert type(opt3) is S.MoCoV3LARS
    ids3 = {id(p) for grp in opt3.param_groups for p in grp["params"]}
    assert ids3 == {id(p) for p in v3.online.parameters()}
    assert {id(p) for p in v3.online.predictor.parameters()} <= ids3
    assert all(grp["weight_decay"] == 1e-6 and grp["momentum"] == 0.9 for grp in opt3.param_groups)


def test_ema_update():
    """teacher <- m teacher + (1 - m) student for every parameter, every BN copy included; buffers are not EMA'd."""
    torch.manual_seed(0)
    model = S.SlimCLR(dataclasses.replace(S.CIFAR_MOCOV2, widths=(1.0, 0.5), queue_size=256))
    student, teacher = model.online.encoder, model.momentum_encoder
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn(p.shape, generator=g))
        for m in student.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.add_(1.0)
    t_old = {k: v.clone() for k, v in teacher.state_dict().items()}
    s_now = dict(student.state_dict())
    S.ema_update(teacher, student, 0.9)
    params = dict(teacher.named_parameters())
    assert any(".bn.1." in k for k in params)
    for k, v in teacher.state_dict().items():
        if k in params:
            torch.testing.assert_close(v, 0.9 * t_old[k] + 0.1 * s_now[k], rtol=1e-6, atol=1e-6, msg=k)
            assert (v - t_old[k]).abs().max() > 1e-3, k
        else:
            assert torch.equal(v, t_old[k]), k


# ---------------------------------------------------------------- check_args
def test_check_args_accepts_the_recipes():
    for args in (S.Args(), S.MOCOV3, S.SIMCLR, S.CIFAR_MOCOV2, S.CIFAR_MOCOV3, S.CIFAR_SIMCLR):
        S.check_args(args, 1)
    S.check_args(S.Args(), 4)
    S.check_args(dataclasses.replace(S.Args(), widths=(0.5, 1.0, 0.25)), 1)  # any order


@pytest.mark.parametrize(
    "base,changes,world,needle",
    [
        ("v2", dict(widths=(0.5, 0.25)), 1, "must contain 1.0"),
        ("v2", dict(widths=(1.0, 0.5, 0.5)), 1, "distinct"),
        ("v2", dict(widths=(1.0, 0.0)), 1, "--widths"),
        ("v2", dict(widths=(1.5, 1.0)), 1, "--widths"),
        ("v2", dict(widths=(1.0, 0.01)), 1, "--widths"),
        ("v2", dict(queue_size=1000), 1, "--queue-size 1000"),
        ("v2", dict(batch_size=1000), 1, "--queue-size 65536"),
        ("v2", dict(queue_size=512), 1, "--queue-size 512"),
        ("v3", dict(distill_weight=1.5), 1, "--distill-weight"),
        ("v2", dict(distill_weight=-0.1), 1, "--distill-weight"),
        ("v2", dict(arch="resnet34"), 1, "unknown --arch 'resnet34'"),
        ("v2", dict(), 3, "world size 3"),
        ("v3", dict(slim_start_lr=0.0), 1, "--slim-start-lr"),
    ],
)
def test_check_args_refuses(base, changes, world, needle):
    """Bad flags raise RunError with one line naming the problem."""
    args = dataclasses.replace(S.Args() if base == "v2" else S.MOCOV3, **changes)
    with pytest.raises(S.RunError) as err:
        S.check_args(args, world)
    msg = str(err.value)
    assert needle in msg and "\n" not in msg, msg


def test_check_args_queue_only_for_v2():
    """v3 has no queue: a queue size that is no multiple of the batch is fine there."""
    S.check_args(dataclasses.replace(S.MOCOV3, queue_size=1000), 1)
    S.check_args(dataclasses.replace(S.MOCOV3, queue_size=100), 1)


def test_check_args_warns_about_settings_without_effect(capsys):
    """Legal settings that change nothing are said on stderr, not silently dropped: a slow-start LR without a slow
    start (the official loop applies it only for slim_start_epoch > 0) and a slow start after the last epoch."""
    S.check_args(dataclasses.replace(S.MOCOV3, slim_start_epoch=-1), 1)
    S.check_args(dataclasses.replace(S.Args(), epochs=100, slim_start_epoch=100), 1)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all(ln.startswith("slimclr_moco.py: warning: ") for ln in err), err
    assert "--slim-start-lr 0.8 is unused" in err[0] and "the sub-networks are never trained" in err[1]
    S.check_args(S.MOCOV3, 1)
    S.check_args(dataclasses.replace(S.Args(), widths=(1.0,), slim_start_epoch=500), 1)  # plain MoCo: nothing to say
    assert capsys.readouterr().err == ""


def test_sub_width_kernels_equal_per_call_slices(monkeypatch):
    """Issue 17: the sub-widths' kernels made once per step (SubWidthKernels: one forward copy, one full-size gradient
    filled slice by slice) give the per-call slices' outputs and, to float rounding, their gradients: an encoder
    at 4 widths on two views, backward of a loss mixing every output."""
    args = S.Args(arch="resnet18-cifar", moco="v3", widths=(1.0, 0.75, 0.5, 0.25), mlp_dim=64, dim=16)
    torch.manual_seed(0)
    online = S.Online(args)
    views = [torch.randn(4, 3, 16, 16) for _ in range(2)]
    grads, outs = [], []
    for fused in (True, False):
        online.zero_grad(set_to_none=True)
        ctx = S.sub_width_kernels(online, list(args.widths)) if fused else S.nullcontext()
        with ctx:  # the plain path: every call slices the full weight
            z = [{w: online.predictor(online.encoder(x, w), w) for w in args.widths} for x in views]
            assert (online.encoder.backbone.conv1.sub_width_kernels is not None) == fused  # the fused path is taken
        loss = sum((e * torch.arange(e.numel()).view_as(e).sin()).sum() * (1 + w) for zv in z for w, e in zv.items())
        loss.backward()
        outs.append(torch.cat([e.flatten() for zv in z for e in zv.values()]))
        grads.append({n: p.grad.clone() for n, p in online.named_parameters() if p.grad is not None})
    assert torch.equal(outs[0], outs[1])
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 40
    for n in grads[0]:
        scale = grads[1][n].abs().max().item()  # the sums run in another order: float32 rounding of the largest
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=0, atol=1e-6 * scale, msg=n)
    conv = online.encoder.backbone.layers[1][0].convs[0]
    assert conv.sub_width_kernels is None  # the kernels live for one step only
    with pytest.raises(ZeroDivisionError), S.sub_width_kernels(online, [1.0, 0.5]):
        assert conv.sub_width_kernels[0.5].shape == conv.weight[:64, :32].shape
        1 / 0
    assert conv.sub_width_kernels is None  # not left set by an exception in the step
    calls, apply = [], S.SubWidthKernels.apply  # nor by one midway through making them (e.g. out of memory)
    fail_third = lambda *a: apply(*a) if calls.append(0) or len(calls) < 3 else 1 / 0  # noqa: E731
    monkeypatch.setattr(S.SubWidthKernels, "apply", fail_third)
    with pytest.raises(ZeroDivisionError), S.sub_width_kernels(online, [1.0, 0.5]):
        pass
    assert all(m.__dict__.get("sub_width_kernels") is None for m in online.modules())


def test_bare_step_is_the_plain_four_width_pass(monkeypatch):
    """Issue 17: SlimCLR's ceiling is a plain ResNet of each width's shape (no slicing) forward+backward on the query
    views (v2: one, v3 and SimCLR: both), one pass per view and width, with the slimmable sub-network's parameter count;
    before --slim-start-epoch (the step just trained ran the full width alone) the full width alone. Then MoCo's keys:
    a full-width forward without gradient per key view (v2: one more view, v3: both; SimCLR: none)."""
    made, real = [], S.RESNETS["resnet18-cifar"]
    record = lambda width: made.append((width, real(width=width))) or made[-1][1]  # noqa: E731
    monkeypatch.setitem(S.RESNETS, "resnet18-cifar", record)
    full = S.SLIM_RESNETS["resnet18-cifar"](widths=(1.0, 0.5))
    for moco, n_views, n_keys in (("v2", 1, 1), ("v3", 2, 2), ("simclr", 2, 0)):
        made.clear()
        args = S.Args(arch="resnet18-cifar", moco=moco, batch_size=4, large_size=16, slim_start_epoch=0.5)
        run = S.SimpleNamespace(args=args, device=torch.device("cpu"), world_size=1, fmt=torch.contiguous_format,
                                widths=[1.0, 0.5], autocast=S.nullcontext(),
                                global_step=1, steps_per_epoch=4)  # fmt: skip
        step, calls, grads = S.bare_step(run), [], {}
        for w, net in made:
            net.register_forward_hook(lambda m, i, o, w=w: calls.append((w, len(i[0]), o.requires_grad)))
            for p in net.parameters():  # every parameter's gradient of the last step, however it is returned
                p.register_hook(lambda g, p=p: grads.__setitem__(p, g.abs().sum()))
        step()  # step 1 of 4 per epoch: epoch 0.25, before the slow start
        assert calls == [(1.0, 4, True)] * n_views + [(1.0, 4, False)] * n_keys  # keys: no graph
        calls.clear()
        run.global_step = 2  # epoch 0.5: every width
        step()
        assert calls == [(w, 4, True) for _ in range(n_views) for w in (1.0, 0.5)] + [(1.0, 4, False)] * n_keys
        for w, net in made:
            assert sum(p.numel() for p in net.parameters()) == S.active_param_count(full, w)
            assert all(grads[p] > 0 for p in net.parameters())
