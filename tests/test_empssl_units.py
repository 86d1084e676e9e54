"""Unit tests for empssl_cifar.py: losses, LARS, schedules, augmentations vs torchvision/PIL, layout, model, eval."""

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageFilter, ImageOps
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T
from torchvision.transforms.v2 import functional as TF

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import empssl_cifar as E  # noqa: E402

CPU = torch.device("cpu")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torchvision.io decoders


@pytest.fixture(scope="module")
def cifar(cifar_dir):
    """The 400 real CIFAR-10 training images of the fixture folder, uint8 [400, 3, 32, 32]."""
    classes = sorted(d.name for d in (cifar_dir / "train").iterdir())
    return E.load_image_folder(cifar_dir / "train", classes, 32)[0]


def plain_params(n, y0, x0, **on):
    """Patch parameters with every random op off (a 16x16 crop at the position given); `on` switches ops back on."""
    p = dict(
        y0=torch.as_tensor(y0),
        x0=torch.as_tensor(x0),
        h=torch.full((n,), 16),
        w=torch.full((n,), 16),
        factors=torch.tensor([[1.0, 1.0, 1.0, 0.0]]).repeat(n, 1),
        order=torch.arange(4).repeat(n, 1),
        sigma=torch.ones(n),
    )
    p.update({k: torch.zeros(n, dtype=torch.bool) for k in ("flip", "jitter", "gray", "blur", "solarize")})
    p.update(on)
    return p


class PILBlur:
    """Official GBlur: PIL GaussianBlur(radius=sigma), sigma ~ U(0.1, 2.0), p=0.1 (torch RNG, not numpy's)."""

    def __call__(self, img):
        if torch.rand(1).item() < 0.1:
            return img.filter(ImageFilter.GaussianBlur(0.1 + 1.9 * torch.rand(1).item()))
        return img


class PILPatches(torch.utils.data.Dataset):
    """The official torchvision/PIL patch transform (the reference for the batched one), P patches per item.

    An item is (image index, seed): the seed fixes every draw."""

    def __init__(self, images: torch.Tensor, n_patches: int, crop_scale: float, solarize_threshold: int):
        self.images, self.n_patches = images, n_patches
        size = images.shape[-1]
        self.transform = T.Compose(
            [
                T.RandomResizedCrop(size, scale=(crop_scale, crop_scale), ratio=(1.0, 1.0)),
                T.RandomHorizontalFlip(p=0.5),
                T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.2)], p=0.8),
                T.RandomGrayscale(p=0.2),
                PILBlur(),
                T.RandomSolarize(solarize_threshold, p=0.1),  # on a PIL image: ImageOps.solarize, as the official code
                T.ToImage(),
                T.ToDtype(torch.float32, scale=True),
                T.Normalize([0.5] * 3, [0.5] * 3),
            ]
        )

    def __len__(self):
        return len(self.images)

    def __getitem__(self, item):
        index, seed = item
        with torch.random.fork_rng(devices=[]):  # seeded draws without touching the caller's RNG
            torch.manual_seed(seed)
            img = T.functional.to_pil_image(self.images[index])
            return torch.stack([self.transform(img) for _ in range(self.n_patches)])


# ---------------------------------------------------------------- TCR
def tcr_brute(z, eps):
    """-1/2 logdet(I_D + D/(N eps) Z^T Z) in float64 on the D x D form (the official code's form)."""
    z = z.double()
    n, d = z.shape
    return -0.5 * torch.logdet(torch.eye(d, dtype=torch.float64) + d / (n * eps) * z.T @ z)


@pytest.mark.parametrize("n,d,eps", [(8, 32, 0.2), (40, 12, 0.5), (16, 16, 0.05)])
def test_tcr_matches_float64_logdet_both_forms(n, d, eps):
    z = torch.randn(n, d, generator=torch.Generator().manual_seed(n))
    torch.testing.assert_close(E.tcr_loss(z, eps).double(), tcr_brute(z, eps), rtol=1e-5, atol=0)
    zg, zd = z.clone().requires_grad_(True), z.double().requires_grad_(True)  # gradients agree too
    E.tcr_loss(zg, eps).backward()
    tcr_brute(zd, eps).backward()
    assert torch.isfinite(zg.grad).all()
    torch.testing.assert_close(zg.grad.double(), zd.grad, rtol=1e-4, atol=1e-6)


def test_tcr_hand_values_and_sanity_bound():
    n, d, eps = 10, 64, 0.2  # orthonormal one-hot rows: Z^T Z has N ones on the diagonal
    torch.testing.assert_close(
        E.tcr_loss(torch.eye(d)[:n], eps).item(), -0.5 * n * math.log(1 + d / (n * eps)), rtol=1e-6, atol=0
    )
    n, d = 100, 1024  # spec 4.1: unit rows, bound 1/2 min(N, D) log(1 + D/(min(N, D) eps)) ~ 197.75
    bound = 0.5 * n * math.log(1 + d / (n * eps))
    assert bound == pytest.approx(197.75, abs=0.01)
    assert -E.tcr_loss(torch.eye(d)[:n], eps).item() == pytest.approx(bound, rel=1e-6)  # attained by orthonormal rows
    z = F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(0)), dim=1)
    r = -E.tcr_loss(z, eps).item()
    assert r <= bound and abs(r - 195) < 2.5  # spec: random embeddings give about -195


def test_tcr_sign_rotation_scale_batching_dtype():
    g = torch.Generator().manual_seed(1)
    for scale in (1e-3, 1.0, 30.0):
        assert E.tcr_loss(scale * torch.randn(20, 50, generator=g), 0.2).item() <= 0
    z = torch.randn(20, 50, generator=g)
    q, _ = torch.linalg.qr(torch.randn(50, 50, generator=g))
    torch.testing.assert_close(E.tcr_loss(z @ q, 0.2), E.tcr_loss(z, 0.2), rtol=1e-5, atol=0)
    assert E.tcr_loss(2 * z, 0.2).item() < E.tcr_loss(z, 0.2).item() - 1  # no internal normalisation
    zp = torch.randn(5, 20, 50, generator=g)  # spec 4.3: [P, N, D] -> mean over P of the per-patch values
    torch.testing.assert_close(E.tcr_loss(zp, 0.2), torch.stack([E.tcr_loss(zi, 0.2) for zi in zp]).mean())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = E.tcr_loss(z.bfloat16(), 0.2)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), tcr_brute(z.bfloat16().float(), 0.2), rtol=1e-5, atol=0)


# ---------------------------------------------------------------- invariance & total loss
def invariance_explicit(z, detach=False):
    zbar = z.mean(0)
    zbar = zbar.detach() if detach else zbar
    return -((z * zbar).sum(-1) / (z.norm(dim=-1) * zbar.norm(dim=-1))).mean()


def test_invariance_loss_values():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(1, 6, 9, generator=g)
    assert E.invariance_loss(v.expand(4, 6, 9)).item() == pytest.approx(-1.0, abs=1e-6)
    z = torch.randn(3, 4, 5, generator=g)  # not unit norm: the plain mean, not re-normalised
    total = 0.0
    for p in range(3):
        for b in range(4):
            zbar = sum(z[q, b] for q in range(3)) / 3
            total += float(z[p, b] @ zbar / (z[p, b].norm() * zbar.norm()))
    assert E.invariance_loss(z).item() == pytest.approx(-total / 12, rel=1e-6)


def test_invariance_gradient_flows_through_mean():
    z = torch.randn(4, 3, 8, generator=torch.Generator().manual_seed(2))
    grads = {}
    for name, fn in [
        ("script", E.invariance_loss),
        ("explicit", invariance_explicit),
        ("detached", lambda x: invariance_explicit(x, detach=True)),
    ]:
        x = z.clone().requires_grad_(True)
        fn(x).backward()
        grads[name] = x.grad
    torch.testing.assert_close(grads["script"], grads["explicit"])
    assert (grads["script"] - grads["detached"]).abs().max() > 1e-3  # the test can tell a detached zbar apart
    u, ud = (F.normalize(z, dim=-1).requires_grad_(True) for _ in range(2))  # spec 4.4: unit rows, zbar path is 0
    invariance_explicit(u).backward()
    invariance_explicit(ud, detach=True).backward()
    torch.testing.assert_close(u.grad, ud.grad, rtol=1e-4, atol=1e-6)


def test_empssl_loss_single_process():
    z = F.normalize(torch.randn(4, 16, 32, generator=torch.Generator().manual_seed(3)), dim=-1)
    args = E.Args(inv_weight=3.0, tcr_weight=0.5, eps=0.7)
    total, inv, tcr = E.empssl_loss(z, args)
    ref_tcr = np.mean([tcr_brute(z[p], 0.7).item() for p in range(4)])
    assert tcr.item() == pytest.approx(ref_tcr, rel=1e-5)
    assert inv.item() == pytest.approx(invariance_explicit(z).item(), rel=1e-6)
    assert total.item() == pytest.approx(3.0 * inv.item() + 0.5 * tcr.item(), rel=1e-6)


def vonmises_transcribed(z, t=2.0):
    """kachayev/ssl-in-one-epoch BarycenterSphericalUniformityLoss in float64, pair by pair: log of the mean over the
    pairs i < j of exp(-t |zbar_i - zbar_j|^2), zbar the plain mean over the patches of z [P, B, D]."""
    zbar = z.double().mean(0)
    pots = [torch.exp(-t * ((zbar[i] - zbar[j]) ** 2).sum()) for i in range(len(zbar)) for j in range(i + 1, len(zbar))]
    return torch.log(sum(pots) / len(pots))


def test_vonmises_loss_hand_values_and_empssl_loss():
    """--uniformity-loss vonmises: hand values, the float64 transcription, and its place in empssl_loss (weight
    --tcr-weight, default 1 = his --uniformity_loss_weight; the returned term is the loss itself)."""
    z = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]], [[0.0, 1.0], [0.0, 1.0], [1.0, 0.0]]])  # P=2, B=3, D=2
    # means (.5, .5), (0, 1), (1, 0): squared distances 0.5, 0.5, 2 -> log((2 e^-1 + e^-4) / 3)
    assert E.vonmises_loss(z.mean(0)).item() == pytest.approx(math.log((2 * math.exp(-1) + math.exp(-4)) / 3), rel=1e-6)
    assert E.vonmises_loss(z.mean(0), t=1.0).item() == pytest.approx(math.log((2 * math.exp(-0.5) + math.exp(-2)) / 3))
    assert E.vonmises_loss(z[0, :2]).item() == pytest.approx(-4.0)  # two orthogonal unit vectors: exp(-2 * 2)
    z = F.normalize(torch.randn(4, 16, 32, generator=torch.Generator().manual_seed(5)), dim=-1)
    assert E.vonmises_loss(z.mean(0)).item() == pytest.approx(vonmises_transcribed(z).item(), rel=1e-5)
    args = E.Args(uniformity_loss="vonmises", inv_weight=1.5)
    total, inv, unif = E.empssl_loss(z, args)
    assert unif.item() == pytest.approx(vonmises_transcribed(z).item(), rel=1e-5)
    assert total.item() == pytest.approx(1.5 * inv.item() + 1.0 * unif.item(), rel=1e-6)
    x = z.clone().requires_grad_(True)  # minimising it spreads the images' mean embeddings apart
    E.vonmises_loss(x.mean(0)).backward()
    spread = lambda m: torch.pdist(m).pow(2).mean().item()  # noqa: E731
    assert spread((z - 0.1 * x.grad).mean(0)) > spread(z.mean(0))


# ---------------------------------------------------------------- LARS
def lars_step(p0, grads, lr=0.1, wd=1e-2, eta=0.005, clip=True, momentum=0.0):
    """Run LARS on one parameter with the given gradient sequence; return the parameter and optimizer."""
    p = nn.Parameter(p0.clone())
    opt = E.LARS([p], lr=lr, momentum=momentum, nesterov=True, weight_decay=wd, eta=eta, clip=clip)
    for gr in grads:
        p.grad = gr.clone()
        opt.step()
    return p.detach(), opt


def test_lars_bias_gets_plain_nesterov_without_weight_decay():
    model = nn.Linear(5, 3)
    nn.init.normal_(model.bias)
    groups = E.param_groups(model, 1e-2)
    assert [q is model.weight for q in groups[0]["params"]] == [True] and groups[1]["params"][0] is model.bias
    opt = E.LARS(groups, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2, eta=0.005, clip=True)
    b0, g1, g2 = model.bias.detach().clone(), torch.randn(3), torch.randn(3)
    model.weight.grad, model.bias.grad = torch.randn(3, 5), g1.clone()
    opt.step()
    torch.testing.assert_close(model.bias.detach(), b0 - 0.1 * (g1 + 0.9 * g1))
    model.bias.grad = g2.clone()
    opt.step()
    buf = 0.9 * g1 + g2
    torch.testing.assert_close(model.bias.detach(), b0 - 0.1 * 1.9 * g1 - 0.1 * (g2 + 0.9 * buf))
    torch.testing.assert_close(opt.state[model.bias]["momentum_buffer"], buf)


def test_lars_trust_ratio_and_clip():
    gen = torch.Generator().manual_seed(4)
    p0, lr, wd, eta = torch.randn(6, 7, generator=gen), 0.1, 1e-2, 0.005
    for gscale, clip in [(100.0, True), (1e-4, True), (100.0, False), (1e-4, False)]:
        g = gscale * torch.randn(6, 7, generator=gen)
        local = eta * p0.norm() / (g.norm() + wd * p0.norm() + 1e-8)
        ratio = min(local / lr, 1.0) if clip else local  # clip=False: LARC semantics, g scaled by local
        if clip:
            assert (local / lr < 1) == (gscale > 1)  # large ||g||: ratio below 1; tiny ||g||: the clip caps it at 1
        p, _ = lars_step(p0, [g], lr=lr, wd=wd, eta=eta, clip=clip)
        torch.testing.assert_close(p, p0 - lr * ratio * (g + wd * p0))
    p, _ = lars_step(torch.zeros(3, 3), [torch.ones(3, 3)], lr=lr)  # ||p|| = 0: the gradient is left untouched
    torch.testing.assert_close(p, -lr * torch.ones(3, 3))


def test_lars_nesterov_momentum_two_steps():
    gen = torch.Generator().manual_seed(5)
    p0, g1, g2 = (torch.randn(4, 5, generator=gen) * s for s in (1.0, 50.0, 50.0))
    lr, wd, eta, m = 0.2, 1e-3, 0.005, 0.9

    def scaled(p, g):
        return min(eta * p.norm() / (g.norm() + wd * p.norm() + 1e-8) / lr, 1.0) * (g + wd * p)

    s1 = scaled(p0, g1)
    p1 = p0 - lr * (s1 + m * s1)
    s2 = scaled(p1, g2)
    buf = m * s1 + s2
    p2 = p1 - lr * (s2 + m * buf)
    p, opt = lars_step(p0, [g1, g2], lr=lr, wd=wd, eta=eta, momentum=m)
    torch.testing.assert_close(p, p2)
    torch.testing.assert_close(next(iter(opt.state.values()))["momentum_buffer"], buf)


def test_lars_off_group_equals_torch_sgd_nesterov():
    p_ours = nn.Parameter(torch.randn(4, 6, generator=torch.Generator().manual_seed(6)))
    p_ref = nn.Parameter(p_ours.detach().clone())
    ours = E.LARS([dict(params=[p_ours], lars=False)], lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2)
    ref = torch.optim.SGD([p_ref], lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2)
    for _ in range(3):
        for p, opt in [(p_ours, ours), (p_ref, ref)]:
            opt.zero_grad()
            (p.sin() * p).sum().backward()  # gradient depends on p, so the trajectories must stay together
            opt.step()
    torch.testing.assert_close(p_ours, p_ref, rtol=1e-6, atol=1e-7)  # equal up to the order of float roundings


# ---------------------------------------------------------------- schedules, seeds, batches
def test_lr_schedules():
    args = E.Args(batch_size=100, epochs=2, lr_epochs=2)
    assert [E.lr_at(s, args, 500) for s in (0, 500, 1000)] == pytest.approx([0.3, 0.15, 0.0], abs=1e-12)
    assert E.lr_at(1, args, 500) < 0.3  # per-step decay, no warm-up
    assert E.lr_at(500, E.Args(), 500) == pytest.approx(0.15)  # default: epoch 1 of a 2-epoch cosine
    const = E.Args(lr_schedule="constant", lr=0.2)
    assert {E.lr_at(s, const, 500) for s in (0, 250, 999)} == {0.2}
    kach = E.Args(lr_schedule="epoch-cosine-kachayev", epochs=2, lr_epochs=2)
    assert len({E.lr_at(s, kach, 500) for s in range(500)}) == 1 and E.lr_at(0, kach, 500) == pytest.approx(0.3)
    # spec 9: T_max = (500 // 100) * 2 = 10 epochs, stepped per epoch
    assert E.lr_at(500, kach, 500) == pytest.approx(0.3 * 0.5 * (1 + math.cos(math.pi / 10)))


def test_rng_seed_and_epoch_batches():
    assert E.rng_seed(0, "train", 1, 2) == E.rng_seed(0, "train", 1, 2)
    seeds = {E.rng_seed(0, "train", e, s) for e in range(3) for s in range(50)} | {E.rng_seed(1, "train", 0, 0)}
    assert len(seeds) == 151 and all(0 <= s < 2**56 for s in seeds)
    b = E.epoch_batches(105, 10, seed=0, epoch=0)
    assert len(b) == 10 and all(x.shape == (10,) for x in b)  # drop_last: 5 images left out
    flat = torch.cat(b)
    assert len(set(flat.tolist())) == 100 and 0 <= flat.min() and flat.max() < 105
    assert torch.equal(flat, torch.cat(E.epoch_batches(105, 10, seed=0, epoch=0)))
    assert not torch.equal(flat, torch.cat(E.epoch_batches(105, 10, seed=0, epoch=1)))
    assert not torch.equal(flat, torch.cat(E.epoch_batches(105, 10, seed=1, epoch=0)))


# ---------------------------------------------------------------- augmentations vs torchvision / PIL
def test_sample_patch_params_distribution():
    p = E.sample_patch_params(torch.Generator().manual_seed(0), 20000, 32, 0.25)
    for key, prob in [("flip", 0.5), ("jitter", 0.8), ("gray", 0.2), ("blur", 0.1), ("solarize", 0.1)]:
        assert abs(p[key].float().mean().item() - prob) < 0.015, key  # 4 binomial sd at n = 20000
    for key in ("y0", "x0"):
        assert set(p[key].tolist()) == set(range(17))  # every 16x16 position of a 32x32 image
    for v, lo, hi in [(p["factors"][:, :3], 0.6, 1.4), (p["factors"][:, 3], -0.2, 0.2), (p["sigma"], 0.1, 2.0)]:
        assert lo <= v.min() < lo + 0.01 and hi - 0.01 < v.max() <= hi  # ColorJitter(.4, .4, .4, .2), U(0.1, 2)
        assert abs(v.mean().item() - (lo + hi) / 2) < 0.01 * (hi - lo)
    assert torch.equal(p["order"].sort(1).values, torch.arange(4).expand(20000, 4))
    assert (p["h"] == 16).all() and (p["w"] == 16).all()
    # --patch-aug imagenet: RandomResizedCrop(scale=(0.25, 0.25)) with the default ratio, as torchvision draws it
    p = E.sample_patch_params(torch.Generator().manual_seed(0), 20000, 64, 0.25, (3 / 4, 4 / 3))
    ref = [T.RandomResizedCrop.get_params(torch.zeros(1, 64, 64), [0.25, 0.25], [3 / 4, 4 / 3]) for _ in range(20000)]
    ref_h, ref_w = (torch.tensor([r[k] for r in ref]).float() for k in (2, 3))
    for ours, theirs in ((p["h"], ref_h), (p["w"], ref_w)):
        assert ours.min() == theirs.min() == 28 and ours.max() == theirs.max() == 37  # round(32 sqrt(4/3)) = 37
        assert abs(ours.mean() - theirs.mean()) < 0.05 and abs(ours.std() - theirs.std()) < 0.05
    assert ((p["h"] * p["w"] - 1024).abs() <= 37).all()  # the area, up to rounding
    for pos, side in (("y0", "h"), ("x0", "w")):
        assert p[pos].min() == 0 and (p[pos] + p[side]).max() == 64 and (p[pos] + p[side] <= 64).all()


def test_color_jitter_hue_gray_match_torchvision(cifar):
    x = cifar[:48].float() / 255
    p = E.sample_patch_params(torch.Generator().manual_seed(1), 48, 32, 0.25)
    assert 0 < p["jitter"].sum() < 48
    out = E.color_jitter(x, p["factors"], p["order"], p["jitter"])
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    for i in range(48):
        if not p["jitter"][i]:
            assert torch.equal(out[i], x[i])
            continue
        ref = x[i]
        for op in p["order"][i].tolist():
            ref = ops[op](ref, p["factors"][i, op].item())
        assert (out[i] - ref).abs().max() < 1e-3
    shifts = torch.linspace(-0.5, 0.5, 48)
    hue = E.adjust_hue(x, shifts)
    ref = torch.stack([TF.adjust_hue(x[i], shifts[i].item()) for i in range(48)])
    torch.testing.assert_close(hue, ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(E.grayscale(x), TF.rgb_to_grayscale(x), rtol=0, atol=2e-4)  # 0.299 vs 0.2989
    pil_l = torch.stack([torch.from_numpy(np.array(TF.to_pil_image(im).convert("L"))) for im in cifar[:48]])
    assert (E.grayscale(x)[:, 0] * 255 - pil_l).abs().max() <= 0.5 + 1e-3  # PIL rounds the same luma


def test_crop_resize_path_equals_resized_crop(cifar):
    n, gen = 32, torch.Generator().manual_seed(2)
    y0, x0 = torch.randint(0, 17, (n,), generator=gen), torch.randint(0, 17, (n,), generator=gen)
    imgs = cifar[:n]
    out = E.augment_patches(imgs, plain_params(n, y0, x0), 32, 128)
    assert out.shape == (n, 3, 32, 32) and out.min() >= -1 and out.max() <= 1
    ref = torch.stack(
        [
            TF.resized_crop(
                imgs[i].float() / 255,
                int(y0[i]),
                int(x0[i]),
                16,
                16,
                [32, 32],
                InterpolationMode.BILINEAR,
                antialias=True,
            )
            for i in range(n)
        ]
    )
    torch.testing.assert_close((out + 1) / 2, ref, rtol=0, atol=1e-5)
    outside = imgs.clone()  # the patch reads exactly the 16x16 window and nothing else
    mask = torch.ones(n, 1, 32, 32, dtype=torch.bool)
    for i in range(n):
        mask[i, :, y0[i] : y0[i] + 16, x0[i] : x0[i] + 16] = False
    outside[mask.expand_as(outside)] = 255 - outside[mask.expand_as(outside)]
    assert torch.equal(E.augment_patches(outside, plain_params(n, y0, x0), 32, 128), out)
    inside = imgs.clone()
    inside[torch.arange(n), :, y0 + 15, x0 + 15] ^= 0x80
    assert (E.augment_patches(inside, plain_params(n, y0, x0), 32, 128) != out).flatten(1).any(1).all()


@pytest.mark.parametrize("cubic", [False, True])
def test_resize_of_any_crop_equals_torchvision_and_pil(cifar, cubic):
    """--patch-aug imagenet: crops of any shape resized (bicubic; up to 224 and down to 12) as torchvision's
    resized_crop with antialias (PIL's algorithm) does, and as PIL itself up to its uint8 rounding after each pass."""
    imgs = F.interpolate(cifar[:8].float(), size=48, mode="bilinear").round().byte()  # real photos, 48 x 48
    p = E.sample_patch_params(torch.Generator().manual_seed(4), 8, 48, 0.25, (3 / 4, 4 / 3))
    p.update({k: v for k, v in plain_params(8, 0, 0).items() if k not in ("y0", "x0", "h", "w")})
    assert len(set(p["h"].tolist())) > 2
    mode = InterpolationMode.BICUBIC if cubic else InterpolationMode.BILINEAR
    for out in (224, 24, 12):
        ours = (E.augment_patches(imgs, p, out, 128, cubic) + 1) / 2
        box = [[int(p[k][i]) for k in ("y0", "x0", "h", "w")] for i in range(8)]
        ref = torch.stack([TF.resized_crop(imgs[i] / 255, *box[i], [out, out], mode, antialias=True) for i in range(8)])
        torch.testing.assert_close(ours, ref.clamp(0, 1), rtol=0, atol=1e-5)
        resample = Image.BICUBIC if cubic else Image.BILINEAR
        pil = [TF.to_pil_image(imgs[i]).crop((x, y, x + w, y + h)).resize((out, out), resample) for i, (y, x, h, w) in
               enumerate(box)]  # fmt: skip
        pil = torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in pil]).float() / 255
        diff = (ours - pil).abs()  # measured: at most 2/255 (bicubic to 224), 0.22-0.31/255 on average
        assert diff.max() <= 2 / 255 + 1e-5 and diff.mean() < 0.4 / 255


def test_single_ops_and_their_order(cifar):
    n, imgs = 24, cifar[:24]
    y0, x0, on = torch.full((n,), 5), torch.full((n,), 9), torch.ones(n, dtype=torch.bool)
    base = (E.augment_patches(imgs, plain_params(n, y0, x0), 32, 128) + 1) / 2
    run = lambda **kw: (E.augment_patches(imgs, plain_params(n, y0, x0, **kw), 32, 128) + 1) / 2  # noqa: E731
    assert torch.equal(run(flip=on), base.flip(-1))
    gray = run(gray=on)
    assert torch.equal(gray[:, 0], gray[:, 2]) and torch.allclose(gray[:, :1], E.grayscale(base), atol=1e-6)
    sigma = torch.linspace(0.1, 2.0, n)
    torch.testing.assert_close(run(blur=on, sigma=sigma), E.gaussian_blur(base, sigma))
    p = E.sample_patch_params(torch.Generator().manual_seed(3), n, 32, 0.25)
    p.update(
        y0=y0,
        x0=x0,
        flip=on,
        jitter=on,
        gray=on.clone().index_fill_(0, torch.arange(0, n, 2), False),
        blur=on,
        solarize=on,
    )  # spec 2.1 order: flip, jitter, gray, blur, solarize
    ref = E.color_jitter(base.flip(-1), p["factors"], p["order"], on)
    ref = torch.where(p["gray"][:, None, None, None], E.grayscale(ref).expand_as(ref), ref)
    ref = E.gaussian_blur(ref, p["sigma"])
    ref = torch.where(ref >= 128 / 255, 1 - ref, ref)
    torch.testing.assert_close((E.augment_patches(imgs, p, 32, 128) + 1) / 2, ref)


def test_solarize_matches_pil(cifar):
    n = 16  # values 16m + 8: the bilinear x2 upsample (weights k/16) stays on integers, and none sits on 128
    imgs = cifar[:n] // 16 * 16 + 8
    y0, x0, on = torch.arange(n), torch.arange(n).flip(0), torch.ones(n, dtype=torch.bool)
    off = (E.augment_patches(imgs, plain_params(n, y0, x0), 32, 128) + 1) / 2 * 255
    sol = (E.augment_patches(imgs, plain_params(n, y0, x0, solarize=on), 32, 128) + 1) / 2 * 255
    assert (off - off.round()).abs().max() < 1e-3
    hi = off.round() >= 128
    assert 0.1 < hi.float().mean() < 0.9
    torch.testing.assert_close(sol[hi], 255 - off[hi], rtol=0, atol=1e-3)
    assert torch.equal(sol[~hi], off[~hi])
    for i in range(n):
        pil = ImageOps.solarize(Image.fromarray(off[i].round().byte().permute(1, 2, 0).numpy()), 128)
        assert torch.equal(torch.from_numpy(np.array(pil)).permute(2, 0, 1), sol[i].round().byte())


def test_gaussian_blur(cifar):
    const = torch.full((3, 3, 32, 32), 0.3)
    torch.testing.assert_close(E.gaussian_blur(const, torch.tensor([0.1, 1.0, 2.0])), const)
    x = cifar[:30].float() / 255
    torch.testing.assert_close(E.gaussian_blur(x, torch.full((30,), 0.1)), x, rtol=0, atol=1e-6)
    canvas = torch.full((30, 3, 48, 48), 0.5)  # away from the borders the normalised kernel preserves the mean
    canvas[..., 8:40, 8:40] = x
    torch.testing.assert_close(E.gaussian_blur(canvas, torch.full((30,), 2.0)).mean((1, 2, 3)), canvas.mean((1, 2, 3)))
    for s in (0.5, 1.0, 2.0):
        ours = E.gaussian_blur(x, torch.full((30,), s))
        pil = (
            torch.stack(
                [
                    torch.from_numpy(np.array(TF.to_pil_image(im).filter(ImageFilter.GaussianBlur(s)))).permute(2, 0, 1)
                    for im in cifar[:30]
                ]
            ).float()
            / 255
        )
        diff = (ours - pil).abs().mean().item()
        assert diff < 2 / 255 and diff < 0.3 * (ours - x).abs().mean().item()  # measured ~0.6-0.75/255 (box approx.)


def patch_stats(x):
    """Per-patch statistics of normalised patches [N, P, 3, S, S] -> [N, P, 25]: channel means and second moments (mean
    and std), fully gray (R==G==B within 1/255), dark (max < 128/255: every solarized patch is, so this tracks the
    solarize probability and threshold), mean |horizontal gradient| (sharpness: blur), a 16-bin pixel histogram."""
    u = (x + 1) / 2
    hist = F.one_hot((u * 16).long().clamp(max=15), 16).float().mean((2, 3, 4))
    return torch.cat(
        [
            u.mean((3, 4)),
            (u**2).mean((3, 4)),
            ((u.amax(2) - u.amin(2)) <= 1.5 / 255).flatten(2).all(2, keepdim=True).float(),
            (u.flatten(2).amax(2, keepdim=True) < 128 / 255).float(),
            (u[..., 1:] - u[..., :-1]).abs().mean((2, 3, 4))[..., None],
            hist,
        ],
        -1,
    )


def test_gpu_pipeline_statistics_match_pil(cifar):
    imgs, n_p = cifar[::2], 10
    n = len(imgs)

    def gpu(seed):
        p = E.sample_patch_params(torch.Generator().manual_seed(seed), n * n_p, 32, 0.25)
        return patch_stats(
            E.augment_patches(imgs.repeat(n_p, 1, 1, 1), p, 32, 128).view(n_p, n, 3, 32, 32).transpose(0, 1)
        )

    ds = PILPatches(imgs, n_p, 0.25, 128)
    pil = patch_stats(torch.stack([ds[(i, E.rng_seed("pil", i))] for i in range(n)]))
    g1, g2 = gpu(1), gpu(2)
    # augmentation noise of a mean over N*P patches given the images: within-image variance / (N P)
    se = torch.maximum(g1.var(1).mean(0), pil.var(1).mean(0)).div(n * n_p).sqrt() * math.sqrt(2)  # of a difference
    m1, m2, mp = g1.mean((0, 1)), g2.mean((0, 1)), pil.mean((0, 1))
    assert ((m1 - m2).abs() < 4 * se).all()  # the noise model holds between two GPU draws
    # systematic: PIL's Image.blend truncates to uint8 after brightness, contrast and saturation (<= 1.5/255 darker);
    # channel means and second moments (= the std) allow 2/255 for it, the other statistics nothing
    sys_bias = torch.zeros(25).index_fill_(0, torch.arange(6), 2 / 255)
    assert ((m1 - mp).abs() < 4 * se + sys_bias).all(), (m1 - mp) / se
    tvd = lambda a, b: 0.5 * (a[-16:] - b[-16:]).abs().sum().item()  # noqa: E731
    assert tvd(m1, mp) < 2 * tvd(m1, m2) + 0.01  # histogram, measured: gpu-gpu ~0.013, gpu-pil ~0.014
    assert abs(m1[6] - 0.2) < 0.04 and abs(mp[6] - 0.2) < 0.04  # gray patches: RandomGrayscale(0.2) + gray photos


# ---------------------------------------------------------------- data layout
def test_pil_reference_items(cifar):
    """The PIL reference (PILPatches, above): P normalised patches per item, the same for the same seed."""
    ds = PILPatches(cifar, 3, 0.25, 128)
    item = ds[(7, E.rng_seed(0, "train", 0, 5, 0))]
    assert item.shape == (3, 3, 32, 32) and item.min() >= -1 and item.max() <= 1
    assert torch.equal(item, ds[(7, E.rng_seed(0, "train", 0, 5, 0))])
    assert not torch.equal(item, ds[(7, E.rng_seed(0, "train", 0, 5, 1))])


def test_patch_batches_rank_split_and_keys(cifar):
    args = E.Args(dataset="fake")
    idx, key, n_p = torch.tensor([5, 17, 2, 9, 33, 1]), (0, "train", 0, 3), 4
    full = next(E.patch_batches(cifar, [idx], [key], n_p, args, CPU))
    assert full.shape == (n_p * 6, 3, 32, 32) and full.min() >= -1 and full.max() <= 1
    for rank in range(2):  # what makes a 2-rank run see the patches of a 1-rank run
        part = next(E.patch_batches(cifar, [idx], [key], n_p, args, CPU, rank=rank, world=2))
        assert torch.equal(part.view(n_p, 3, 3, 32, 32), full.view(n_p, 6, 3, 32, 32)[:, 3 * rank : 3 * rank + 3])
    assert torch.equal(next(E.patch_batches(cifar, [idx], [key], n_p, args, CPU)), full)
    assert not torch.allclose(next(E.patch_batches(cifar, [idx], [(0, "train", 0, 4)], n_p, args, CPU)), full)


def test_gpu_batch_is_patch_major(cifar):
    idx, key, n_p, b_star = torch.tensor([4, 8, 15, 16, 23]), (1, "train", 0, 0), 3, 2
    args = E.Args(dataset="fake")
    full = next(E.patch_batches(cifar, [idx], [key], n_p, args, CPU))
    changed = cifar.clone().index_fill_(0, idx[b_star], 0)  # the draws depend on the key only, not on the pixels
    other = next(E.patch_batches(changed, [idx], [key], n_p, args, CPU))
    rows = (other != full).flatten(1).any(1).nonzero().flatten().tolist()
    assert rows == [p * len(idx) + b_star for p in range(n_p)]


# ---------------------------------------------------------------- model
def count_resnet18_cifar():
    conv, bn = (lambda ci, co, k: ci * co * k * k), (lambda c: 2 * c)
    total, c_in = conv(3, 64, 3) + bn(64), 64
    for width in (64, 128, 256, 512):
        for block in range(2):
            total += conv(c_in, width, 3) + bn(width) + conv(width, width, 3) + bn(width)
            if c_in != width:  # stride-2 first block of stages 2-4: 1x1 projection shortcut
                total += conv(c_in, width, 1) + bn(width)
            c_in = width
    return total


def test_model_shapes_and_parameter_counts():
    torch.manual_seed(0)
    model = E.EMPSSL("resnet18-cifar", 4096, 1024)
    stem = model.backbone.conv1
    assert stem.kernel_size == (3, 3) and stem.stride == (1, 1) and isinstance(model.backbone.maxpool, nn.Identity)
    count, linear = (lambda m: sum(p.numel() for p in m.parameters())), (lambda i, o: i * o + o)
    expected = dict(
        backbone=count_resnet18_cifar(),
        pre_feature=linear(512, 4096) + 2 * 4096,
        projection=linear(4096, 4096) + 2 * 4096 + linear(4096, 1024),
    )
    for name, n in expected.items():
        assert count(getattr(model, name)) == n, name
    assert count(model) == sum(expected.values())
    assert [round(v / 1e6, 2) for v in (*expected.values(), count(model))] == [11.17, 2.11, 20.98, 34.26]  # spec 3.3
    x = torch.randn(6, 3, 32, 32)
    z, h = model(x)
    assert h.shape == (6, 4096) and (h >= 0).all() and z.shape == (6, 1024) and z.dtype == torch.float32
    torch.testing.assert_close(z.norm(dim=1), torch.ones(6))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        z, _ = model.eval()(x)
    assert z.dtype == torch.float32 and torch.allclose(z.norm(dim=1), torch.ones(6), atol=1e-5)


# ---------------------------------------------------------------- evaluation
def knn_loop(trf, trl, tef, tel, num_classes, k, t):
    """Brute-force weighted k-NN; top-5 is None when a zero-vote tie makes it ill-defined."""
    trf, tef = F.normalize(trf.double(), dim=1).numpy(), F.normalize(tef.double(), dim=1).numpy()
    c1 = c5 = 0
    defined = True
    for f, y in zip(tef, tel.tolist()):
        sims = [float(f @ g) for g in trf]
        votes = [0.0] * num_classes
        for j in sorted(range(len(sims)), key=lambda j: -sims[j])[:k]:
            votes[int(trl[j])] += math.exp(sims[j] / t)
        defined &= min(votes) > 0
        ranked = sorted(range(num_classes), key=lambda c: -votes[c])
        c1, c5 = c1 + (ranked[0] == y), c5 + (y in ranked[:5])
    return 100 * c1 / len(tel), 100 * c5 / len(tel) if defined else None


def test_knn_matches_brute_force():
    gen = torch.Generator().manual_seed(7)
    centers = 0.4 * torch.randn(7, 6, generator=gen)
    trl, tel = torch.randint(0, 7, (150,), generator=gen), torch.randint(0, 7, (37,), generator=gen)
    trf = centers[trl] + torch.randn(150, 6, generator=gen)
    tef = centers[tel] + torch.randn(37, 6, generator=gen)
    ref = knn_loop(trf, trl, tef, tel, 7, k=60, t=0.07)
    assert 20 < ref[0] < ref[1] < 95  # a non-trivial case
    for chunk in (10, 1000):  # 10 does not divide the 37 test points
        assert E.knn_eval(trf, trl, tef, tel, 7, k=60, t=0.07, chunk=chunk) == pytest.approx(ref)
    # hand-built: one class-0 twin (sim 1), two class-1 points at sim cos(0.1); votes e^1 vs e^0.995 per point
    trf = torch.tensor([[1.0, 0.0], [math.cos(0.1), math.sin(0.1)], [math.cos(0.1), -math.sin(0.1)], [0.0, 1.0]])
    one = torch.tensor([[1.0, 0.0]]), torch.tensor([0])
    accs = [E.knn_eval(trf, torch.tensor([0, 1, 1, 2]), *one, 3, k=k, t=1.0)[0] for k in (1, 2, 3, 9)]
    assert accs == [100, 100, 0, 0]  # k=9 > 4 training points: all of them vote


def test_linear_probe_separable_blobs():
    gen = torch.Generator().manual_seed(8)
    centers = 4 * torch.randn(3, 16, generator=gen)
    trl, tel = torch.arange(300) % 3, torch.arange(90) % 3
    trf = centers[trl] + torch.randn(300, 16, generator=gen)
    tef = centers[tel] + torch.randn(90, 16, generator=gen)
    res = E.linear_probe(trf, trl, tef, tel, 3, epochs=20, batch_size=50)
    assert res["best"] == pytest.approx(100.0) and res["last"] >= 98 and res["last"] <= res["best"]


def test_linear_probe_reports_best_and_last_epoch():
    """On random labels the test accuracy wanders, so the best epoch beats the last one; with one epoch they agree."""
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(200, 8, generator=gen), torch.randint(0, 4, (200,), generator=gen)
    xt, yt = torch.randn(100, 8, generator=gen), torch.randint(0, 4, (100,), generator=gen)
    res = E.linear_probe(x, y, xt, yt, 4, epochs=10, lr=0.5, batch_size=20)
    assert res["best"] > res["last"]
    one = E.linear_probe(x, y, xt, yt, 4, epochs=1, lr=0.5, batch_size=20)
    assert one["best"] == one["last"]
