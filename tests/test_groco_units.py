"""Unit tests for groco_imagenet.py: the group-ordering loss against a per-anchor transcription of spec 1.2 (values and
gradients on the spec 1.5 acceptance cases), the spec 1.3 orientation numbers, stop-gradient semantics, the cached
fp32 sorter under autocast, bad inputs, the LR schedule, the model (projector, zero-init, per-view BN) and the DINO
augmentation recipe."""

import copy
import dataclasses
import math
import sys
from pathlib import Path

import diffsort
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import groco_imagenet as G  # noqa: E402

CPU = torch.device("cpu")
pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny tensors run on one thread


# ---------------------------------------------------------------- reference (spec 1.2, written out per anchor)
def ref_anchor_term(anchor, positives, candidates, k, steepness):
    """L_a of spec 1.2 for one anchor [B, D]: positives is a list of [B, D] (row b = the same image), candidates the
    [B, D] matrix whose row b is excluded for row b (the anchor's own view). Whatever carries gradient is the caller's
    choice (detach before passing)."""
    b = anchor.shape[0]
    pos = torch.stack([F.cosine_similarity(anchor, p, dim=1, eps=1e-8) for p in positives], 1)  # [B, n_p]
    an = anchor / torch.max(anchor.norm(dim=1, keepdim=True), torch.tensor(1e-8))
    cn = candidates / torch.max(candidates.norm(dim=1, keepdim=True), torch.tensor(1e-8))
    neg = torch.mm(an, cn.t()).masked_fill(torch.eye(b, dtype=torch.bool), float("-inf"))
    neg = torch.flip(torch.topk(neg, k, dim=1).values, dims=[1])  # the K hardest, ascending
    s = torch.cat([neg, torch.sort(pos, dim=1).values], 1)  # [B, n]: negatives first
    n = s.shape[1]
    net = diffsort.DiffSortNet(
        "odd_even", size=n, steepness=steepness, interpolation_type="cauchy", art_lambda=0.25
    )  # a fresh sorter per call: nothing shared with the script's cache
    _, perm = net(s)  # [B, n, n], P[b, i, j] = P(input i -> rank j)
    target = torch.eye(n).expand(b, n, n)  # the identity permutation: the pre-ordered input is the ground truth
    pred_neg, pred_pos = perm[:, :, :k].sum(2, keepdim=True), perm[:, :, k:].sum(2, keepdim=True)
    tgt_neg, tgt_pos = target[:, :, :k].sum(2, keepdim=True), target[:, :, k:].sum(2, keepdim=True)
    bce = nn.BCELoss()
    return (bce(pred_pos.clip(0, 1), tgt_pos.clip(0, 1)) + bce(pred_neg.clip(0, 1), tgt_neg.clip(0, 1))) / 2


def ref_loss(views, topk_neg=10, steepness=1.0, n_pos_augs=None, stop_grad=True):
    """Spec 1.2: every view is an anchor once; positives = the first n_pos_augs views other than the anchor; negative
    candidates = the anchor's own view; stop_grad detaches both; mean over all V anchors. No autocast guard here."""
    n_pos = len(views) if n_pos_augs is None else n_pos_augs
    side = (lambda t: t.detach()) if stop_grad else (lambda t: t)
    total = 0
    for a in range(len(views)):
        anchor = views[a].float()
        positives = [side(views[p].float()) for p in range(n_pos) if p != a]
        total = total + ref_anchor_term(anchor, positives, side(anchor), topk_neg, steepness)
    return total / len(views)


def make_views(v, b, d, seed, noise=0.7, dtype=torch.float32):
    """V views of B images: a shared per-image embedding plus per-view noise (positives are more similar than
    negatives, as after some training, but far from separated)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(b, d, generator=g)
    return [(base + noise * torch.randn(b, d, generator=g)).to(dtype) for _ in range(v)]


def value_and_grads(fn, views, **kw):
    xs = [x.clone().requires_grad_(True) for x in views]
    loss = fn(xs, **kw)
    return loss.detach(), torch.autograd.grad(loss, xs)


# spec 1.5 acceptance cases: (name, n_views, B, D, kwargs)
CASES = [
    ("2v_B16", 2, 16, 16, {}),
    ("2v_B11_edge", 2, 11, 8, {}),
    ("2v_B64", 2, 64, 32, {}),
    ("3v_K5", 3, 16, 16, dict(topk_neg=5)),
    ("4v", 4, 16, 16, {}),
    ("multicrop_2+6", 8, 16, 16, dict(n_pos_augs=2)),
    ("K4_steep2", 2, 16, 16, dict(topk_neg=4, steepness=2.0)),
    ("4v_npos2_K3_steep5", 4, 12, 16, dict(n_pos_augs=2, topk_neg=3, steepness=5.0)),
    ("2v_nostopgrad", 2, 16, 16, dict(stop_grad=False)),
    ("multicrop_nostopgrad", 8, 16, 16, dict(n_pos_augs=2, stop_grad=False)),
    ("3v_K5_nostopgrad", 3, 16, 16, dict(topk_neg=5, stop_grad=False)),
]


# ---------------------------------------------------------------- the loss (spec 1.2, 1.5)
@pytest.mark.parametrize("name,n_views,b,d,kw", CASES, ids=[c[0] for c in CASES])
def test_groco_loss_matches_reference_value_and_grads(name, n_views, b, d, kw):
    """groco_loss equals the per-anchor transcription of spec 1.2 (fresh diffsort sorter, BCELoss on P's column sums)
    in value and in the gradient w.r.t. every view, on each spec 1.5 acceptance case."""
    views = make_views(n_views, b, d, seed=[c[0] for c in CASES].index(name))
    val, grads = value_and_grads(G.groco_loss, views, **kw)
    ref_val, ref_grads = value_and_grads(ref_loss, views, **kw)
    assert val.dtype == torch.float32 and val.shape == ()
    torch.testing.assert_close(val, ref_val, rtol=1e-6, atol=1e-7)
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        assert torch.isfinite(g).all()
        assert r.abs().max() > 1e-7, f"view {i}: the reference gradient is zero, the comparison would be empty"
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-8, msg=lambda m: f"view {i}: {m}")


def test_reference_tells_the_variants_apart():
    """The comparisons above can fail: K, steepness, n_pos_augs and the negatives' source each change the value by far
    more than the tolerance (negatives from the positive view instead of the anchor's own view, spec 8.3)."""
    views = make_views(4, 16, 16, seed=7)
    base = G.groco_loss(views)
    for kw in (dict(topk_neg=9), dict(steepness=2.0), dict(n_pos_augs=3)):
        assert abs(G.groco_loss(views, **kw) - base) > 1e-3, kw
    # negatives taken from view 1 for anchor 0 (the SimCLR-like mistake) give another anchor term
    v0, v1 = views[0], views[1]
    own = ref_anchor_term(v0, [v1], v0, 10, 1.0)
    other = ref_anchor_term(v0, [v1], v1.roll(1, 0), 10, 1.0)
    assert abs(own - other) > 1e-3


def test_ordering_loss_orientation_numbers():
    """Spec 1.3 (diffsort, steepness 1, K 10): perfect separation / all ties / inverted give 0.147/0.202/0.264 (n 11),
    0.156/0.256/0.362 (n 12), 0.140/0.251/0.396 (n 13); perfect < ties < inverted."""
    published = {11: (0.147, 0.202, 0.264), 12: (0.156, 0.256, 0.362), 13: (0.140, 0.251, 0.396)}
    k = 10
    for n, expected in published.items():
        perfect = torch.cat([-torch.ones(4, k), torch.ones(4, n - k)], 1)
        rows = (perfect, torch.zeros(4, n), -perfect)
        got = [G.ordering_loss(s, k).item() for s in rows]
        assert [round(x, 3) for x in got] == list(expected), (n, got)
        assert got[0] < got[1] < got[2]


def test_ordering_loss_mean_over_rows_and_random_band():
    """ordering_loss is the mean over rows (a batch of two different rows gives the mean of the two single-row losses);
    random 16-d Gaussian embeddings land in the spec's 0.19-0.23 band for 2 views."""
    k, n = 10, 11
    perfect = torch.cat([-torch.ones(1, k), torch.ones(1, n - k)], 1)
    pair = torch.cat([perfect, -perfect])
    expected = (G.ordering_loss(perfect, k) + G.ordering_loss(-perfect, k)) / 2
    torch.testing.assert_close(G.ordering_loss(pair, k), expected, rtol=1e-6, atol=0)
    g = torch.Generator().manual_seed(3)
    value = G.groco_loss([torch.randn(64, 16, generator=g) for _ in range(2)]).item()
    assert 0.19 <= value <= 0.23


# ---------------------------------------------------------------- stop-gradient (spec 1.2)
def test_stop_grad_only_anchor_side_carries_gradient():
    """stop_grad=True: d loss / d views[a] is exactly (1/V) d L_a / d anchor with the positives and the negative
    candidates held constant (no other anchor's term reaches view a). stop_grad=False: same value, other gradient."""
    for n_views in (2, 3):
        views = make_views(n_views, 16, 16, seed=11 + n_views)
        val, grads = value_and_grads(G.groco_loss, views)
        for a in range(n_views):
            x = views[a].clone().requires_grad_(True)
            positives = [views[p] for p in range(n_views) if p != a]  # plain tensors: constants
            term = ref_anchor_term(x, positives, views[a].clone(), 10, 1.0) / n_views
            (expected,) = torch.autograd.grad(term, x)
            assert expected.abs().max() > 1e-7
            torch.testing.assert_close(grads[a], expected, rtol=1e-4, atol=1e-8)
        val_ng, grads_ng = value_and_grads(G.groco_loss, views, stop_grad=False)
        torch.testing.assert_close(val_ng, val, rtol=1e-6, atol=1e-7)
        for g, g_ng in zip(grads, grads_ng):
            assert (g - g_ng).abs().max() > 0.05 * g.abs().max()


def _groco_rank(rank, world, store, views, out_dir):
    """One gloo rank of test_groco_loss_distributed_equals_global_batch: the loss and gradients of its contiguous
    share of the batch, with and without stop-gradient."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    b = views[0].shape[0] // world
    out = {}
    for stop_grad in (True, False):
        local = [v[rank * b : (rank + 1) * b].clone().requires_grad_(True) for v in views]
        loss = G.groco_loss(local, stop_grad=stop_grad)
        out[stop_grad] = (loss.detach(), torch.autograd.grad(loss, local))
    torch.save(out, f"{out_dir}/{rank}.pt")
    dist.destroy_process_group()


def test_groco_loss_distributed_equals_global_batch(tmp_path):
    """Spec 1.4 with 2 gloo processes of 8 images each (K 10 > 7 local candidates: the negatives must come from the
    global batch): the mean of the per-rank losses is the single-process loss of the 16 images, and each rank's
    gradient / world is the single-process gradient of its rows (stop_grad on and off)."""
    views = make_views(2, 16, 16, seed=31)
    torch.multiprocessing.start_processes(
        _groco_rank, args=(2, tmp_path / "store", views, tmp_path), nprocs=2, start_method="fork"
    )
    parts = [torch.load(tmp_path / f"{r}.pt") for r in range(2)]
    for stop_grad in (True, False):
        val, grads = value_and_grads(ref_loss, views, stop_grad=stop_grad)
        torch.testing.assert_close(sum(p[stop_grad][0] for p in parts) / 2, val, rtol=1e-6, atol=1e-7)
        for i, g in enumerate(grads):
            got = torch.cat([p[stop_grad][1][i] for p in parts]) / 2
            torch.testing.assert_close(got, g, rtol=1e-4, atol=1e-8, msg=lambda m: f"view {i}: {m}")


# ---------------------------------------------------------------- the sorter and precision (spec 8.1, 8.2)
def test_sorter_device_and_cache():
    """sorter builds the odd-even Cauchy network of the requested size and steepness on the requested device (its
    plain-list tensors live there) and caches it per (size, steepness, device)."""
    s = G.sorter(11, 1.0, CPU)
    assert isinstance(s, diffsort.DiffSortNet)
    assert s.size == 11 and s.steepness == 1.0 and s.distribution == "cauchy" and s.sorting_network_type == "odd_even"
    assert all(t.device == CPU for layer in s.sorting_network for t in layer)
    ref = diffsort.DiffSortNet("odd_even", 11)
    assert len(s.sorting_network) == len(ref.sorting_network) == 11  # odd-even: n layers
    for la, lb in zip(s.sorting_network, ref.sorting_network):
        assert all(torch.equal(a, b) for a, b in zip(la, lb))
    assert G.sorter(11, 1.0, CPU) is s and G.sorter(11, 1, "cpu") is s
    assert G.sorter(12, 1.0, CPU) is not s and G.sorter(12, 1.0, CPU).size == 12
    other = G.sorter(11, 2.0, CPU)
    assert other is not s and other.steepness == 2.0
    assert (11, 1.0, "cpu") in G._SORTERS
    meta = G.sorter(11, 1.0, torch.device("meta"))  # a device other than the CPU default: the network is built there
    assert meta is not s and all(t.device.type == "meta" for layer in meta.sorting_network for t in layer)


def test_loss_is_fp32_under_autocast():
    """Under CPU bf16 autocast groco_loss still computes in fp32: the same value (and gradients) as without autocast
    for fp32 inputs, and bf16 inputs give the loss of their .float() copies. Running the same computation without the
    guard under autocast (the reference) moves the value by far more, so the check would catch a missing guard."""
    views = make_views(2, 16, 16, seed=21)
    val, grads = value_and_grads(G.groco_loss, views)
    xs = [x.clone().requires_grad_(True) for x in views]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        val_ac = G.groco_loss(xs)
        naive = ref_loss(views)  # cosines, matmuls and diffsort's matmuls in bf16
        s = torch.cat([torch.linspace(-0.5, 0.3, 10), torch.tensor([0.4])])[None].repeat(3, 1)
        _, perm_naive = G.sorter(11, 1.0, CPU)(s)
    grads_ac = torch.autograd.grad(val_ac, xs)  # backward outside the autocast region, as train_step does
    assert val_ac.dtype == torch.float32
    torch.testing.assert_close(val_ac, val, rtol=0, atol=1e-7)
    for g, g_ac in zip(grads, grads_ac):
        torch.testing.assert_close(g_ac, g, rtol=1e-5, atol=1e-9)
    assert perm_naive.dtype == torch.bfloat16  # CPU autocast does reach diffsort's matmuls
    assert abs(naive.float() - val) > 1e-4, (naive.item(), val.item())
    views16 = [v.bfloat16() for v in views]
    v16 = G.groco_loss(views16)
    assert v16.dtype == torch.float32
    torch.testing.assert_close(v16, G.groco_loss([v.float() for v in views16]), rtol=0, atol=1e-7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(G.groco_loss(views16), v16, rtol=0, atol=1e-7)


# ---------------------------------------------------------------- bad inputs
def test_bad_inputs_are_refused():
    """B < topk_neg + 1 and n_pos_augs outside [2, V] raise ValueError; check_args refuses a batch too small for K, a
    single global view, a batch that does not divide by the world size and an unknown arch (one-line RunError), and
    accepts the shipped recipes and the edge batch K + 1."""
    views = make_views(2, 10, 8, seed=1)
    with pytest.raises(ValueError, match="topk_neg"):
        G.groco_loss(views)
    G.groco_loss(views, topk_neg=9)  # B = K + 1 is fine
    for bad in (1, 3):
        with pytest.raises(ValueError, match="n_pos_augs"):
            G.groco_loss(make_views(2, 16, 8, seed=1), n_pos_augs=bad)

    G.check_args(G.Args(), 1)
    G.check_args(G.Args(), 4)
    G.check_args(G.CIFAR_PROXY, 1)
    G.check_args(dataclasses.replace(G.Args(), batch_size=11, probe_batch_size=11), 1)
    cases = [
        (dict(batch_size=10, probe_batch_size=10), 1, "--topk-neg"),
        (dict(n_large=1), 1, "--n-large"),
        (dict(probe_batch_size=4095), 3, "--batch-size 1024 does not divide by the world size 3"),
        (dict(arch="resnet34"), 1, "--arch"),
    ]
    for overrides, world, needle in cases:
        with pytest.raises(G.RunError) as err:
            G.check_args(dataclasses.replace(G.Args(), **overrides), world)
        msg = str(err.value)
        assert needle in msg and "\n" not in msg, msg


# ---------------------------------------------------------------- LR schedule (spec 3)
def official_lr(step, base, warmup, total):
    """CustomCosineSchedulerWithWarmup.step(step) with init_lr=base, epochs=total, warmup_epochs=warmup, lr_min=0."""
    step = step % total
    if step < warmup:
        return step / warmup * base
    return 0 + (base - 0) * 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / (total - warmup)))


def test_scaled_lr_configs():
    """Spec 3 table at batch 1024: 0.75 linear -> 24, 0.375 linear -> 12, 0.1875 sqrt (the defaults) -> 6,
    0.75 sqrt -> 24; batch 256 / 512 with 0.75 linear -> 6 / 12; sqrt at 256 is sqrt(256) x lr, not batch / 32."""
    a = G.Args()
    assert G.scaled_lr(a) == pytest.approx(6.0)
    for lr, rule, batch, expected in [
        (0.75, "linear", 1024, 24),
        (0.375, "linear", 1024, 12),
        (0.1875, "linear", 1024, 6),
        (0.75, "sqrt", 1024, 24),
        (0.75, "linear", 256, 6),
        (0.75, "linear", 512, 12),
        (0.1875, "sqrt", 256, 3),
    ]:
        args = dataclasses.replace(a, lr=lr, lr_scaling=rule, batch_size=batch)
        assert G.scaled_lr(args) == pytest.approx(expected, rel=1e-12), (lr, rule, batch)
    assert G.scaled_lr(G.CIFAR_PROXY) == pytest.approx(6.0)  # 0.75 x 256 / 32


@pytest.mark.parametrize("spe,epochs,warmup_epochs", [(10, 20, 2.0), (7, 30, 1.7), (50, 4, 0.25), (8, 5, 0.0)])
def test_lr_at_matches_official_scheduler(spe, epochs, warmup_epochs):
    """lr_at is the official scheduler stepped per iteration (warm-up round(warmup_epochs x spe) steps): 0 at step 0,
    base x step / warmup in the warm-up, base at the end of it, base / 2 at the cosine midpoint, ~0 at the last step."""
    args = dataclasses.replace(G.Args(), lr=0.75, lr_scaling="linear", batch_size=1024, epochs=epochs)
    args = dataclasses.replace(args, warmup_epochs=warmup_epochs)
    base, total, warmup = 24.0, spe * epochs, round(warmup_epochs * spe)
    got = [G.lr_at(s, args, spe) for s in range(total)]
    for s, lr in enumerate(got):
        assert lr == pytest.approx(official_lr(s, base, warmup, total), rel=1e-12, abs=1e-12), s
    if warmup:
        assert got[0] == 0.0
        for s in range(warmup):
            assert got[s] == pytest.approx(base * s / warmup, rel=1e-12, abs=0)
    assert got[warmup] == pytest.approx(base, rel=1e-12)
    if (total - warmup) % 2 == 0:
        assert got[warmup + (total - warmup) // 2] == pytest.approx(base / 2, rel=1e-12)
    assert 0 < got[-1] < base * 5 / (total - warmup) ** 2
    assert G.lr_at(total, args, spe) == pytest.approx(0.0, abs=1e-12)
    assert max(got) == pytest.approx(base, rel=1e-12)


# ---------------------------------------------------------------- model (spec 2)
def test_projector_structure_and_zero_init():
    """Projector Linear(f, f, no bias) BN ReLU Linear(f, f, no bias) BN ReLU Linear(f, d) BN(affine=False), hidden
    layers as wide as the backbone's features f (official RegularProjection); the last Linear's bias is frozen and
    everything else trains; output width d; every residual block's last BN weight is 0."""
    torch.manual_seed(0)
    for arch, feat in (("resnet18", 512), ("resnet18-cifar", 512), ("resnet50", 2048)):
        model = G.GroCo(arch, 32)
        p = model.projector
        assert model.backbone.num_features == feat
        kinds = [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear, nn.BatchNorm1d]
        assert [type(m) for m in p] == kinds
        assert (p[0].in_features, p[0].out_features, p[3].in_features, p[3].out_features) == (feat, feat, feat, feat)
        assert p[1].num_features == p[4].num_features == feat and (p[6].in_features, p[6].out_features) == (feat, 32)
        assert p[0].bias is None and p[3].bias is None
        assert p[1].affine and p[4].affine and not p[7].affine and p[7].num_features == 32
        assert p[6].bias is not None and not p[6].bias.requires_grad and p[6].weight.requires_grad
        frozen = [n for n, q in model.named_parameters() if not q.requires_grad]
        assert frozen == ["projector.6.bias"]
        last_bns = []
        for m in model.backbone.modules():
            if hasattr(m, "conv2") and hasattr(m, "downsample"):  # a residual block (BasicBlock or Bottleneck)
                last_bns.append(m.bn3 if hasattr(m, "bn3") else m.bn2)
        assert len(last_bns) == (16 if arch == "resnet50" else 8)
        assert all((bn.weight == 0).all() for bn in last_bns)
        assert (model.backbone.bn1.weight == 1).all()  # only the residual branches' last BN is zeroed


def test_forward_per_view_batchnorm():
    """GroCo.forward on [view 0 (b), local group (2b, crop-major)] returns 3 embeddings [b, d], each equal to
    projector(backbone(view)) run on that view alone in train mode (BN statistics per view), and each with zero mean
    per feature (the affine-free BN); one forward of the concatenation gives different embeddings."""
    torch.manual_seed(0)
    b, d = 4, 32
    model = G.GroCo("resnet18", d).train()
    g = torch.Generator().manual_seed(1)
    # distinct content per crop (different scales) so that pooled statistics really differ from per-view ones
    x0 = torch.randn(b, 3, 32, 32, generator=g)
    local = torch.cat(
        [1.5 * torch.randn(b, 3, 32, 32, generator=g) + 0.5, 0.5 * torch.randn(b, 3, 32, 32, generator=g)]
    )
    views = [x0, local[:b], local[b:]]  # crop-major: rows v*b + i are crop v of image i
    with torch.no_grad():
        out = copy.deepcopy(model)([x0, local])
        assert len(out) == 3 and all(o.shape == (b, d) for o in out)
        for v, o in zip(views, out):
            m = copy.deepcopy(model)
            torch.testing.assert_close(o, m.projector(m.backbone(v)), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(o.mean(0), torch.zeros(d), rtol=0, atol=1e-5)
        m = copy.deepcopy(model)
        joint = m.projector(m.backbone(torch.cat(views))).split(b)
        assert max((o - j).abs().max().item() for o, j in zip(out, joint)) > 1e-2
        assert max(j.mean(0).abs().max().item() for j in joint) > 1e-2  # pooled BN: per-view means are not zero


def test_one_pass_per_group_equals_one_forward_per_view():
    """The official loop (one forward per view) and ours (one pass per crop group, BN per view) give the same
    embeddings, gradients and running statistics (updated view by view), in float64 to 1e-7 (the convolutions sum in
    another order); BN in eval mode is untouched, and the SyncBNs of a converted copy normalise per view too."""
    torch.manual_seed(0)
    b, model = 4, G.GroCo("resnet18", 16).double().train()
    for bn in (m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)):
        bn.weight.data.uniform_(0.5, 1.5) if bn.affine else None  # no zero-init BN: every gradient flows
    g = torch.Generator().manual_seed(2)
    groups = [torch.randn(b, 3, 64, 64, generator=g), torch.randn(3 * b, 3, 32, 32, generator=g) * 2 + 1]
    groups = [x.double() for x in groups]
    ours, official = copy.deepcopy(model), copy.deepcopy(model)
    z = ours(groups)
    z_off = [official.projector(official.backbone(v)) for x in groups for v in x.split(b)]
    assert len(z) == len(z_off) == 4
    for a, c in zip(z, z_off):
        torch.testing.assert_close(a, c)
    weights = torch.randn(4, b, 16, generator=g, dtype=torch.float64)
    sum((w * a).sum() for w, a in zip(weights, z)).backward()
    sum((w * c).sum() for w, c in zip(weights, z_off)).backward()
    for (name, p), q in zip(ours.named_parameters(), official.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, msg=name)
    for (name, r), s in zip(ours.named_buffers(), official.buffers()):
        torch.testing.assert_close(r, s, msg=name)  # running stats, updated 4 times
    assert ours.views == 1
    with torch.no_grad():
        ours.eval(), official.eval()
        torch.testing.assert_close(ours(groups)[3], official.projector(official.backbone(groups[1][2 * b :])))
    synced = copy.deepcopy(model)
    nn.SyncBatchNorm.convert_sync_batchnorm(synced)
    synced.per_view_bn(synced)
    bns = [m for m in synced.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert bns and all(isinstance(m, nn.SyncBatchNorm) and m.forward.func == synced._bn_per_view for m in bns)
    with torch.no_grad():  # without a process group SyncBN normalises like BN: per view here, as the official loop
        for a, c in zip(synced(groups), [model.projector(model.backbone(v)) for x in groups for v in x.split(b)]):
            torch.testing.assert_close(a, c)


# ---------------------------------------------------------------- augmentations (spec 4)
def test_crop_groups_recipes():
    """Multi-crop default: views 1 and 2 are single 224-px crops, scale (0.14, 1), blur 1.0 / 0.1, solarize 0 / 0.2,
    DINO jitter; then 6 local 96-px crops, scale (0.05, 0.14), blur 0.5, no solarize. 4 x 224: views 3, 4 repeat the
    pipelines of views 1, 2; 3 x 224: view 3 repeats view 1."""
    jit = (0.4, 0.4, 0.2, 0.1)
    groups = G.crop_groups(G.Args())
    assert len(groups) == 3
    g1, g2, small = groups
    assert g1 == G.CropGroup(1, 224, (0.14, 1.0), jit, blur=1.0, solarize=0.0, colour=True)
    assert g2 == G.CropGroup(1, 224, (0.14, 1.0), jit, blur=0.1, solarize=0.2, colour=True)
    assert small == G.CropGroup(6, 96, (0.05, 0.14), jit, blur=0.5, solarize=0.0, colour=True)
    four = G.crop_groups(dataclasses.replace(G.Args(), n_large=4, n_small=0))
    assert [(g.n, g.size) for g in four] == [(1, 224)] * 4
    assert [g.blur for g in four] == [1.0, 0.1, 1.0, 0.1] and [g.solarize for g in four] == [0.0, 0.2, 0.0, 0.2]
    three = G.crop_groups(dataclasses.replace(G.Args(), n_large=3, n_small=0))
    assert [g.blur for g in three] == [1.0, 0.1, 1.0] and [g.solarize for g in three] == [0.0, 0.2, 0.0]
    cifar = G.crop_groups(G.CIFAR_PROXY)
    assert [(g.n, g.size, g.blur, g.solarize) for g in cifar] == [(1, 32, 0.0, 0.0), (1, 32, 0.0, 0.2)]


@pytest.mark.parametrize("which", [0, 1, 2])
def test_sample_view_params_probabilities_and_ranges(which):
    """20,000 draws: flip 0.5, jitter 0.8, grayscale 0.2, blur and solarize at the group's probabilities (within
    0.015); brightness and contrast factors span [0.6, 1.4], saturation [0.8, 1.2], hue [-0.1, 0.1]; sigma in
    [0.1, 2]; crop areas within the group's scale; the op order is a permutation."""
    group = G.crop_groups(G.Args())[which]
    n = 20000
    p = G.sample_view_params(torch.Generator().manual_seed(5 + which), n, group)
    assert set("flip jitter factors order gray blur sigma solarize area log_ratio pos".split()) <= set(p)
    probs = dict(flip=0.5, jitter=0.8, gray=0.2, blur=group.blur, solarize=group.solarize)
    for key, prob in probs.items():
        assert p[key].dtype == torch.bool and p[key].shape == (n,)
        assert abs(p[key].float().mean().item() - prob) < 0.015, (key, p[key].float().mean().item(), prob)
    f = p["factors"]
    assert f.shape == (n, 4)
    for col, (lo, hi) in enumerate([(0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1)]):
        assert lo - 1e-6 <= f[:, col].min() < lo + 0.005 and hi - 0.005 < f[:, col].max() <= hi + 1e-6, col
    assert p["sigma"].min() >= 0.1 and p["sigma"].max() <= 2.0
    lo, hi = group.scale
    assert p["area"].min() >= lo and p["area"].max() <= hi
    assert (p["log_ratio"].abs() <= math.log(4 / 3) + 1e-6).all()
    assert torch.equal(p["order"].sort(1).values, torch.arange(4).expand(n, 4))
    # strengths above 1: the factors are clamped at 0 (max(0, 1 - j)) and reach 1 + j; the hue stays within +-h
    strong = dataclasses.replace(group, jitter=(1.5, 1.2, 1.1, 0.2))
    fs = G.sample_view_params(torch.Generator().manual_seed(9), n, strong)["factors"]
    for col, j in enumerate((1.5, 1.2, 1.1)):
        assert 0 <= fs[:, col].min() < 0.01 and 1 + j - 0.01 < fs[:, col].max() <= 1 + j, col
    assert 0.19 < fs[:, 3].max() <= 0.2 and -0.2 <= fs[:, 3].min() < -0.19
