"""Unit tests for swav_imagenet.py: Sinkhorn, swapped-prediction loss, queue, LARC, LR schedule, prototype freezing,
multi-crop geometry vs torchvision, the streamed and in-memory view pipelines on real photos, and the model."""

import dataclasses
import math
import sys
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.io import ImageReadMode, decode_image, read_file
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import swav_imagenet as S  # noqa: E402

CPU = torch.device("cpu")
pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),  # torchvision.io decoders
    pytest.mark.usefixtures("one_thread"),
]


def unit_scores(b, k, d=16, seed=0):
    """Cosine similarities [b, k] of random unit vectors z against random unit prototypes."""
    g = torch.Generator().manual_seed(seed)
    z, w = F.normalize(torch.randn(b, d, generator=g), dim=1), F.normalize(torch.randn(k, d, generator=g), dim=1)
    return z @ w.T


def sinkhorn_ref(scores, eps=0.05, iters=3):
    """Spec 3.2 as written, in float64, no max shift: Q = exp(S/eps)^T / total; rows /sum /K, columns /sum /B; *B."""
    q = torch.exp(scores.double() / eps).T  # [K, B]
    k, b = q.shape
    q = q / q.sum()
    for _ in range(iters):
        q = q / q.sum(1, keepdim=True) / k
        q = q / q.sum(0, keepdim=True) / b
    return (q * b).T


def ce(q, s, t):
    """mean over the batch of -sum_k q log softmax(s / t)."""
    return -(q * F.log_softmax(s / t, dim=-1)).sum(-1).mean()


# ---------------------------------------------------------------- Sinkhorn (spec 3)
def test_sinkhorn_rows_shift_and_float64_reference():
    """Rows sum to 1 whatever the iterations; +5 changes nothing; equals spec 3.2 in float64; fp64 path agrees."""
    s = unit_scores(32, 10, seed=1)
    for iters in (1, 3, 7):
        q = S.sinkhorn(s, 0.05, iters)
        assert q.dtype == torch.float32 and q.shape == (32, 10) and torch.isfinite(q).all() and (q >= 0).all()
        torch.testing.assert_close(q.sum(1), torch.ones(32), rtol=0, atol=1e-6)
        torch.testing.assert_close(q.double(), sinkhorn_ref(s, 0.05, iters), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(S.sinkhorn(s + 5, 0.05, iters), q, rtol=1e-4, atol=1e-6)
        q64 = S.sinkhorn(s, 0.05, iters, fp64=True)
        assert q64.dtype == torch.float32
        torch.testing.assert_close(q64, q, rtol=1e-5, atol=1e-7)
    # the reference is not trivially satisfied: one iteration differs from three, and both from a plain softmax
    assert (sinkhorn_ref(s, 0.05, 1) - sinkhorn_ref(s, 0.05, 3)).abs().max() > 1e-3
    assert (S.sinkhorn(s) - F.softmax(s / 0.05, dim=1)).abs().max() > 1e-2
    # eps divides (it is not a multiplier): other eps, other codes, still the reference
    torch.testing.assert_close(S.sinkhorn(s, 0.1, 3).double(), sinkhorn_ref(s, 0.1, 3), rtol=1e-5, atol=1e-7)


def test_sinkhorn_converges_to_equipartition():
    """With many iterations every prototype column carries B/K of the mass (rows still exactly 1)."""
    s = unit_scores(32, 10, seed=2)
    q = S.sinkhorn(s, 0.05, 200)
    torch.testing.assert_close(q.sum(0), torch.full((10,), 3.2), rtol=0, atol=1e-4)
    torch.testing.assert_close(q.sum(1), torch.ones(32), rtol=0, atol=1e-6)
    assert (S.sinkhorn(s, 0.05, 3).sum(0) - 3.2).abs().max() > 1e-3  # 3 iterations are not yet there (no claim how far)


def test_sinkhorn_half_precision_and_large_scores():
    """fp16/bf16 inputs are computed in fp32 with a max shift: finite and equal to the float64 reference where a naive
    exp overflows (fp16 above ~0.555 at eps 0.05; fp32 and even fp64 at scores near 50)."""
    u = torch.rand(24, 12, generator=torch.Generator().manual_seed(3))
    for dtype in (torch.float16, torch.bfloat16):
        near_one = (0.9 + 0.1 * u).to(dtype)
        if dtype == torch.float16:  # what a naive half-precision Sinkhorn would compute
            assert torch.isinf(torch.exp(near_one / 0.05)).all()
        q = S.sinkhorn(near_one, 0.05, 3)
        assert q.dtype == torch.float32 and torch.isfinite(q).all()
        torch.testing.assert_close(q.double(), sinkhorn_ref(near_one, 0.05, 3), rtol=1e-5, atol=1e-7)
        big = (48 + 2 * u).to(dtype)  # unnormalised scores: S/eps up to 1000
        ref = sinkhorn_ref(big.double() - 48, 0.05, 3)  # shift invariance: the reference needs the offset removed
        for fp64 in (False, True):
            q = S.sinkhorn(big, 0.05, 3, fp64=fp64)
            assert torch.isfinite(q).all()
            torch.testing.assert_close(q.double(), ref, rtol=1e-4, atol=1e-6)
    big = 48 + 2 * u  # fp32 input: exp(S/eps) overflows in fp32 and fp64; fp32 S/eps ~ 1000 keeps ~1e-4 relative
    assert torch.isinf(torch.exp(big.double() / 0.05)).all()
    ref = sinkhorn_ref(big.double() - 48, 0.05, 3)
    torch.testing.assert_close(S.sinkhorn(big, 0.05, 3, fp64=True).double(), ref, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(S.sinkhorn(big, 0.05, 3).double(), ref, rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(S.sinkhorn(big, 0.05, 3).sum(1), torch.ones(24), rtol=0, atol=1e-6)


def test_sinkhorn_hand_computed_2x2():
    """B = K = 2, exp(S/eps) = [[3, 1], [1, 1]] (eps 0.5): one iteration gives [[3/5, 2/5], [1/3, 2/3]], two give
    [[12/19, 7/19], [4/11, 7/11]] (done by hand with fractions, rows first, then columns)."""
    s = torch.tensor([[0.5 * math.log(3), 0.0], [0.0, 0.0]])
    torch.testing.assert_close(S.sinkhorn(s, 0.5, 1), torch.tensor([[3 / 5, 2 / 5], [1 / 3, 2 / 3]]))
    torch.testing.assert_close(S.sinkhorn(s, 0.5, 2), torch.tensor([[12 / 19, 7 / 19], [4 / 11, 7 / 11]]))


def _sinkhorn_rank(rank, world, store, scores, out_dir):
    """One gloo rank of test_sinkhorn_distributed_equals_global_batch: codes of its contiguous share of the batch."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    b = len(scores) // world
    local = scores[rank * b : (rank + 1) * b]
    torch.save(dict(q=S.sinkhorn(local), local_only=S.sinkhorn(local, distributed=False)), f"{out_dir}/{rank}.pt")
    dist.destroy_process_group()


def test_sinkhorn_distributed_equals_global_batch(tmp_path):
    """Spec 3.3 with 2 gloo processes: each rank's rows equal the single-process codes of the concatenated batch (global
    total, all-reduced row sums, global B); per-rank Sinkhorn (lightly's default) is a different thing."""
    scores = 3 * unit_scores(16, 12, seed=5)  # scale 3: the max shift differs per rank, so it must be all-reduced
    # fork: the children inherit the imported modules (spawn would re-import torch and the script: ~10 s)
    torch.multiprocessing.start_processes(
        _sinkhorn_rank, args=(2, tmp_path / "store", scores, tmp_path), nprocs=2, start_method="fork"
    )
    parts = [torch.load(tmp_path / f"{r}.pt") for r in range(2)]
    full = S.sinkhorn(scores)
    torch.testing.assert_close(torch.cat([p["q"] for p in parts]), full, rtol=1e-5, atol=1e-7)
    assert (torch.cat([p["local_only"] for p in parts]) - full).abs().max() > 1e-3


# ---------------------------------------------------------------- swapped-prediction loss (spec 4)
def test_swav_loss_pair_mean_formula():
    """Mean of CE(q_i, p_v) over the ordered pairs (i in assign, v != i), q from the float64 reference."""
    n, b, k, t = 4, 8, 6, 0.1
    scores = [unit_scores(b, k, seed=10 + v) for v in range(n)]
    for assign in [(0, 1), (0,), (1, 3)]:
        pairs = [(i, v) for i in assign for v in range(n) if v != i]
        ref = np.mean([ce(sinkhorn_ref(scores[i]), scores[v].double(), t).item() for i, v in pairs])
        assert S.swav_loss(scores, t, 0.05, 3, assign).item() == pytest.approx(ref, rel=1e-5)
    self_pred = np.mean([ce(sinkhorn_ref(scores[i]), scores[v].double(), t).item() for i in (0, 1) for v in range(n)])
    assert abs(self_pred - S.swav_loss(scores, t, 0.05, 3)) > 1e-3  # the formula can tell v = i apart


def test_swav_loss_hand_built_2x2():
    """2 crops, B = K = 2, eps 0.5, 2 iterations, T 0.5: q_0 = [[12/19, 7/19], [4/11, 7/11]] (hand Sinkhorn), q_1 its
    mirror [[7/11, 4/11], [7/19, 12/19]]; predictions softmax(s/T) = [1/2, 1/2], [1/4, 3/4] and [3/4, 1/4], [1/2, 1/2].
    Both CE terms equal (ln 2 + 4/11 ln 4 - 7/11 ln 3/4) / 2."""
    a = 0.5 * math.log(3)
    s0, s1 = torch.tensor([[a, 0.0], [0.0, 0.0]]), torch.tensor([[0.0, 0.0], [0.0, a]])
    torch.testing.assert_close(S.sinkhorn(s1, 0.5, 2), torch.tensor([[7 / 11, 4 / 11], [7 / 19, 12 / 19]]))
    expected = (math.log(2) + 4 / 11 * math.log(4) - 7 / 11 * math.log(3 / 4)) / 2
    assert S.swav_loss([s0, s1], 0.5, 0.5, 2).item() == pytest.approx(expected, abs=1e-6)
    # crop 0 alone assigns: only CE(q_0, p_1), the same value by the mirror symmetry
    assert S.swav_loss([s0, s1], 0.5, 0.5, 2, crops_for_assign=(0,)).item() == pytest.approx(expected, abs=1e-6)


def test_swav_loss_uniform_scores_give_ln_k():
    """Equal scores: uniform codes and uniform predictions, so every CE is ln K (the collapse value, spec 4.4)."""
    for k in (10, 3000):
        scores = [torch.full((16, k), 0.3) for _ in range(4)]
        assert S.swav_loss(scores, 0.1, 0.05, 3).item() == pytest.approx(math.log(k), rel=1e-6)


def test_swav_loss_codes_are_detached():
    """The gradient equals the one with q held constant; a differentiable q would give another gradient; with a single
    assignment crop that crop's scores get exactly zero gradient, every other crop a non-zero one."""
    n, b, k, t = 4, 8, 6, 0.1
    base = [unit_scores(b, k, seed=20 + v) for v in range(n)]

    def grads(fn):
        s = [x.clone().requires_grad_(True) for x in base]
        fn(s).backward()
        return [x.grad for x in s]

    def by_hand(s, assign=(0, 1), detach=True):
        total = 0
        for i in assign:
            q = S.sinkhorn(s[i]) if detach else sinkhorn_ref(s[i]).float()
            total = total + sum(ce(q, s[v], t) for v in range(n) if v != i) / (n - 1)
        return total / len(assign)

    script, held = grads(lambda s: S.swav_loss(s, t, 0.05, 3)), grads(by_hand)
    for g1, g2 in zip(script, held):
        torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-7)
    through_q = grads(lambda s: by_hand(s, detach=False))
    assert max((g1 - g2).abs().max().item() for g1, g2 in zip(script, through_q)) > 1e-3
    single = grads(lambda s: S.swav_loss(s, t, 0.05, 3, crops_for_assign=(0,)))
    assert torch.equal(single[0], torch.zeros(b, k))
    assert all(g.abs().max() > 1e-4 for g in single[1:])
    torch.testing.assert_close(single[1:], grads(lambda s: by_hand(s, (0,)))[1:], rtol=1e-5, atol=1e-7)


def test_swav_loss_with_queue_scores():
    """Codes come from sinkhorn(cat(queue, batch)) and keep the batch's last B rows (spec 5)."""
    n, b, k, length, t = 3, 4, 10, 12, 0.1
    scores = [unit_scores(b, k, seed=30 + v) for v in range(n)]
    queue = [unit_scores(length, k, seed=40 + j) for j in range(2)]
    pairs = [(j, i, v) for j, i in enumerate((0, 1)) for v in range(n) if v != i]
    codes = [sinkhorn_ref(torch.cat([queue[j], scores[i]]))[-b:] for j, i in enumerate((0, 1))]
    ref = np.mean([ce(codes[j], scores[v].double(), t).item() for j, i, v in pairs])
    assert S.swav_loss(scores, t, 0.05, 3, queue_scores=queue).item() == pytest.approx(ref, rel=1e-5)
    first = [sinkhorn_ref(torch.cat([queue[j], scores[i]]))[:b] for j, i in enumerate((0, 1))]
    wrong = np.mean([ce(first[j], scores[v].double(), t).item() for j, i, v in pairs])
    assert abs(wrong - ref) > 1e-3 and abs(S.swav_loss(scores, t, 0.05, 3).item() - ref) > 1e-3


# ---------------------------------------------------------------- queue (spec 5)
def test_queue_fifo_newest_first():
    """[n_assign, L, D] zeros; each push shifts by b and writes the batch in front; scores only once full (L/b
    pushes), None before."""
    q = S.Queue(2, 6, 3, CPU)
    w = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    assert q.z.shape == (2, 6, 3) and not q.z.any() and q.filled == 0 and q.scores(w) is None
    batches = [torch.full((2, 2, 3), float(i + 1)) + torch.tensor([0.0, 0.5])[:, None, None] for i in range(4)]
    for i, batch in enumerate(batches):
        q.push(batch)
        assert (q.scores(w) is not None) == (i >= 2) and q.filled == min(2 * (i + 1), 6)
    # after 4 pushes of 2: batch 3 (newest), batch 2, batch 1; batch 0 dropped
    torch.testing.assert_close(q.z, torch.cat([batches[3], batches[2], batches[1]], 1))
    sc = q.scores(w)
    assert len(sc) == 2 and sc[0].shape == (6, 5)
    for j in range(2):
        torch.testing.assert_close(sc[j], q.z[j] @ w.T)


# ---------------------------------------------------------------- LARC (spec 7.1) and parameter groups
def larc_sgd_ref(p0, grads_fn, steps, lr, wd, eta, momentum, clip):
    """apex LARC around torch SGD (no Nesterov, wd 0 inside SGD): g <- (g + wd p) * local where ||p||, ||g|| > 0."""
    p = nn.Parameter(p0.clone())
    sgd = torch.optim.SGD([p], lr=lr, momentum=momentum)
    for _ in range(steps):
        sgd.zero_grad()
        grads_fn(p).backward()
        with torch.no_grad():
            pn, gn = p.norm(), p.grad.norm()
            if pn > 0 and gn > 0:
                local = eta * pn / (gn + wd * pn + 1e-8)
                local = min(local / lr, 1.0) if clip else local
                p.grad.add_(wd * p).mul_(local)
        sgd.step()
    return p.detach()


def test_lars_first_step_hand_calculation():
    """First step (the momentum buffer starts at g): p - lr * 0.001 ||p|| / (||g|| + wd ||p|| + 1e-8) * (g + wd p)."""
    gen = torch.Generator().manual_seed(4)
    p0, g = torch.randn(6, 7, generator=gen), 3 * torch.randn(6, 7, generator=gen)
    lr, wd = 4.8, 1e-2  # a large wd so that its term is visible
    for clip in (False, True):
        p = nn.Parameter(p0.clone())
        opt = S.LARS([p], lr=lr, momentum=0.9, weight_decay=wd, eta=0.001, clip=clip)
        p.grad = g.clone()
        opt.step()
        local = 0.001 * p0.norm() / (g.norm() + wd * p0.norm() + 1e-8)
        ratio = min(local / lr, 1.0) if clip else local  # clip: min(local / lr, 1) (solo-learn)
        torch.testing.assert_close(p.detach(), p0 - lr * ratio * (g + wd * p0))
        torch.testing.assert_close(opt.state[p]["momentum_buffer"], ratio * (g + wd * p0))
        if not clip:  # the official scale mode: a relative step of about lr * 0.001 (0.5% of ||p|| at lr 4.8)
            assert ((p.detach() - p0).norm() / p0.norm()).item() == pytest.approx(lr * 0.001, rel=0.01)


def test_lars_matches_apex_larc_over_steps():
    """Three steps with gradients that depend on p: SGD momentum 0.9 (no Nesterov) behind apex LARC, scale and clip."""
    p0 = torch.randn(5, 4, generator=torch.Generator().manual_seed(5))
    loss = lambda p: (p.sin() * p).sum() * 50  # noqa: E731
    for clip in (False, True):
        p = nn.Parameter(p0.clone())
        opt = S.LARS([p], lr=0.6, momentum=0.9, weight_decay=1e-3, eta=0.02, clip=clip)
        for _ in range(3):
            opt.zero_grad()
            loss(p).backward()
            opt.step()
        ref = larc_sgd_ref(p0, loss, 3, lr=0.6, wd=1e-3, eta=0.02, momentum=0.9, clip=clip)
        torch.testing.assert_close(p.detach(), ref, rtol=1e-6, atol=1e-7)


def test_lars_zero_norms_give_plain_sgd_without_weight_decay():
    """apex quirk: ||p|| = 0 (zero-initialised bias): one plain SGD step at the full lr; ||g|| = 0: no weight decay."""
    p = nn.Parameter(torch.zeros(4))
    opt = S.LARS([p], lr=0.3, momentum=0.9, weight_decay=0.1, eta=0.001)
    p.grad = torch.tensor([1.0, -2.0, 0.5, 0.0])
    opt.step()
    torch.testing.assert_close(p.detach(), -0.3 * torch.tensor([1.0, -2.0, 0.5, 0.0]))
    p0 = torch.randn(3, 3, generator=torch.Generator().manual_seed(6))
    p = nn.Parameter(p0.clone())
    opt = S.LARS([p], lr=0.3, momentum=0.9, weight_decay=0.1, eta=0.001)
    p.grad = torch.zeros(3, 3)
    opt.step()
    assert torch.equal(p.detach(), p0)  # plain SGD with weight decay would have shrunk p by lr * wd


def script_optimizer(model, args):
    """The optimizer as run_training builds it."""
    return S.LARS(
        S.param_groups(model, args), lr=args.lr, momentum=args.momentum, eta=args.lars_eta, clip=args.lars_clip
    )


def small_model(k=10, arch="resnet18"):
    torch.manual_seed(0)
    return S.SwAV(arch, hidden_dim=32, feat_dim=16, n_prototypes=k)


def test_param_groups_imagenet_and_cifar_recipes():
    """Official LARC: every parameter (biases, BN, prototypes) in one LARS group with wd 1e-6, SGD momentum 0.9 without
    Nesterov; the CIFAR proxy excludes 1-D parameters from LARS and weight decay."""
    model = small_model()
    all_params = {id(p) for p in model.parameters()}
    args = S.Args()
    opt = script_optimizer(model, args)
    assert len(opt.param_groups) == 1
    (grp,) = opt.param_groups
    assert {id(p) for p in grp["params"]} == all_params and grp["lars"] and grp["weight_decay"] == 1e-6
    assert grp["eta"] == 0.001 and not grp["clip"] and not grp["nesterov"] and grp["momentum"] == 0.9
    assert grp["eps"] == 1e-8
    args = S.CIFAR_PROXY
    opt = script_optimizer(model, args)
    lars, plain = opt.param_groups
    assert {id(p) for p in lars["params"]} == {id(p) for p in model.parameters() if p.ndim > 1}
    assert {id(p) for p in plain["params"]} == {id(p) for p in model.parameters() if p.ndim == 1}
    assert id(model.prototypes.weight) in {id(p) for p in lars["params"]}
    assert id(model.backbone.bn1.bias) in {id(p) for p in plain["params"]}
    assert lars["lars"] and lars["weight_decay"] == 1e-6 and lars["clip"] and lars["eta"] == 0.02
    assert not plain["lars"] and plain["weight_decay"] == 0.0
    b = model.head[0].bias  # the excluded group takes a plain step: -lr * g, no LARS scaling, no decay
    b0, g = b.detach().clone(), torch.randn(b.shape, generator=torch.Generator().manual_seed(7))
    b.grad = g
    opt.step()
    torch.testing.assert_close(b.detach(), b0 - args.lr * g)


# ---------------------------------------------------------------- LR schedule (spec 7.2)
def official_schedule(args, spe):
    """main_swav.py: np.linspace warm-up (both ends) then a cosine over the remaining iterations."""
    base = args.lr * args.batch_size / 256
    final = base * args.final_lr_ratio
    warm = np.linspace(args.start_warmup, base, int(spe * args.warmup_epochs))
    iters = np.arange(spe * (args.epochs - int(args.warmup_epochs)))
    cos = final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))
    return np.concatenate([warm, cos])


def test_lr_schedule_imagenet_recipe():
    """Batch 4096: 0.3 at step 0, 4.8 at the last warm-up step and the first cosine step, just above 0.0048 at the last
    step; the cosine reaches 0.0048 exactly one step past epochs * steps_per_epoch."""
    args, spe = S.Args(), 312  # 1281167 // 4096
    warm, total = 10 * spe, 800 * spe
    assert S.lr_at(0, args, spe) == pytest.approx(0.3, abs=1e-12)
    assert S.lr_at(warm - 1, args, spe) == pytest.approx(4.8, abs=1e-12)
    assert S.lr_at(warm, args, spe) == pytest.approx(4.8, abs=1e-12)
    assert S.lr_at(1, args, spe) == pytest.approx(0.3 + 4.5 / (warm - 1), abs=1e-12)
    last = S.lr_at(total - 1, args, spe)
    assert 0.0048 < last < 0.0048 + 1e-9
    assert last == pytest.approx(
        0.0048 + 0.5 * (4.8 - 0.0048) * (1 + math.cos(math.pi * (total - warm - 1) / (total - warm)))
    )
    assert S.lr_at(total, args, spe) == pytest.approx(0.0048, abs=1e-12)
    assert S.lr_at(warm + (total - warm) // 2, args, spe) == pytest.approx((4.8 + 0.0048) / 2, abs=1e-12)


@pytest.mark.parametrize(
    "recipe,overrides",
    [
        ("imagenet", dict(epochs=6, warmup_epochs=2)),
        ("imagenet", dict(epochs=5, warmup_epochs=0, batch_size=256, lr=0.6)),  # the bs-256 queue recipe
        ("cifar", dict(epochs=12)),  # 10 warm-up epochs from 3e-5, cosine to 0
    ],
)
def test_lr_schedule_matches_official_array(recipe, overrides):
    """Every step of the schedule equals the official numpy array; its length is epochs * steps_per_epoch."""
    args = dataclasses.replace(S.Args() if recipe == "imagenet" else S.CIFAR_PROXY, **overrides)
    spe = 7
    ref = official_schedule(args, spe)
    assert len(ref) == args.epochs * spe
    ours = np.array([S.lr_at(s, args, spe) for s in range(len(ref))])
    np.testing.assert_allclose(ours, ref, rtol=1e-12, atol=1e-15)
    if args.warmup_epochs == 0:  # the bs-256 queue recipe: no warm-up, the first step is the base LR
        assert S.lr_at(0, args, spe) == pytest.approx(0.6, abs=1e-12)


# ---------------------------------------------------------------- model and prototypes (spec 2)
def test_model_forward_groups_and_scores():
    """The backbone runs once per resolution group (BN statistics per group, spec 2.1); z has unit rows; the scores are
    z @ W^T in fp32 (also under bf16 autocast) and lie in [-1, 1] once the prototypes are normalised (train_step)."""
    model = small_model()
    calls = []
    model.backbone.register_forward_hook(lambda m, i, o: calls.append(i[0].shape))
    g = torch.Generator().manual_seed(8)
    large, small = torch.randn(2 * 3, 3, 32, 32, generator=g), torch.randn(4 * 3, 3, 16, 16, generator=g)
    z, s = model([large, small])
    assert calls == [large.shape, small.shape]
    assert z.shape == (18, 16) and s.shape == (18, 10) and z.dtype == s.dtype == torch.float32
    torch.testing.assert_close(z.norm(dim=1), torch.ones(18))
    torch.testing.assert_close(s, z @ model.prototypes.weight.T)
    assert (model.prototypes.weight.norm(dim=1) - 1).abs().min() > 0.1  # nn.Linear's init: rows far from unit
    with torch.no_grad():
        model.prototypes.weight.copy_(F.normalize(model.prototypes.weight, dim=1))
    torch.testing.assert_close(model.prototypes.weight.norm(dim=1), torch.ones(10))
    z, s = model([large, small])
    assert s.abs().max() <= 1 + 1e-6
    # one pass per group: two same-size groups give other BN statistics than their concatenation (train mode) ...
    a, b = large[:3], large[3:]
    za, _ = model([a, b])
    zc, _ = model([large])
    assert (za - zc).abs().max() > 1e-3
    model.eval()  # ... and the same result with running statistics
    torch.testing.assert_close(model([a, b])[0], model([large])[0], rtol=1e-4, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z, s = model([large, small])
    assert z.dtype == s.dtype == torch.float32
    torch.testing.assert_close(s, z @ model.prototypes.weight.T, rtol=1e-6, atol=1e-6)  # bf16: ~1e-2 off


def make_run(args, model, freeze_steps, queue=None):
    """The parts of run_training's namespace that train_step reads (CPU, fp32, no DDP)."""
    opt = script_optimizer(model, args)
    return SimpleNamespace(
        args=args,
        model=model,
        ddp_model=model,
        opt=opt,
        scaler=torch.amp.GradScaler("cpu", enabled=False),
        autocast=nullcontext(),
        fmt=torch.contiguous_format,
        queue=queue,
        freeze_steps=freeze_steps,
        steps_per_epoch=1000,  # every step in epoch 0 (Queue.start: no --queue-length, or the queue given here)
    )


TINY = dataclasses.replace(
    S.Args(), arch="resnet18", hidden_dim=32, feat_dim=16, n_prototypes=10, n_small=2, batch_size=4, lr=1.0
)


def tiny_groups(seed, b=4):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2 * b, 3, 32, 32, generator=g), torch.randn(2 * b, 3, 16, 16, generator=g)]


def test_prototypes_frozen_then_move():
    """During freeze_steps the prototypes only get renormalised (no LARC step, no momentum buffer), the backbone
    trains; after it the prototypes take a LARC step of relative size ~ lr * eta."""
    model = small_model()
    run = make_run(TINY, model, freeze_steps=2)
    w0, conv0 = model.prototypes.weight.detach().clone(), model.backbone.conv1.weight.detach().clone()
    for step in range(2):
        metrics = S.train_step(run, tiny_groups(step), step)
        assert metrics.shape == (len(S.METRICS),) and torch.isfinite(metrics).all()
    w = model.prototypes.weight.detach()
    torch.testing.assert_close(w, F.normalize(w0, dim=1), rtol=0, atol=1e-7)
    assert model.prototypes.weight not in run.opt.state
    assert (model.backbone.conv1.weight - conv0).abs().max() > 1e-5
    w1 = w.clone()
    S.train_step(run, tiny_groups(2), 2)
    moved = (model.prototypes.weight.detach() - w1).norm() / w1.norm()
    assert moved.item() == pytest.approx(TINY.lr * TINY.lars_eta, rel=0.02)  # first LARC step: buffer = g


def test_train_step_loss_and_queue():
    """train_step's loss is swav_loss of its scores; the queue is read only once full, with the current (normalised)
    prototypes, and then gets the assignment crops' z in front. Its metrics: loss, loss / ln K, the prototypes used
    and the normalised entropy of crop 0's mean prediction, and whether the queue was used."""
    model = small_model()
    b, n_crops, k = 4, 4, 10
    queue = S.Queue(2, 8, 16, CPU)
    run = make_run(TINY, model, freeze_steps=0, queue=queue)
    outs = []
    model.register_forward_hook(lambda m, i, o: outs.append([t.detach() for t in o]))
    for step in range(3):
        before = queue.z.clone()
        was_full = queue.filled == queue.z.shape[1]
        w = F.normalize(model.prototypes.weight.detach(), dim=1)
        metrics = S.train_step(run, tiny_groups(10 + step), step)
        z, scores = outs[-1]
        loss, p = metrics[0], F.softmax(scores[:b] / 0.1, dim=1).mean(0)  # crop 0's mean prediction
        expected = dict(loss=loss.item(), loss_over_lnK=loss.item() / math.log(k), queue=float(was_full))
        expected.update(
            protos_used=len(set(scores[:b].argmax(1).tolist())), entropy=-(p * p.log()).sum().item() / math.log(k)
        )
        assert dict(zip(S.METRICS, metrics.tolist())) == pytest.approx(expected, rel=1e-5)
        sv = list(scores.view(n_crops, b, -1))
        qs = [before[j] @ w.T for j in range(2)] if was_full else None
        torch.testing.assert_close(loss, S.swav_loss(sv, 0.1, 0.05, 3, (0, 1), qs))
        if was_full:
            assert abs(loss - S.swav_loss(sv, 0.1, 0.05, 3)) > 1e-4
        torch.testing.assert_close(queue.z[:, :b], z.view(n_crops, b, -1)[:2])
        torch.testing.assert_close(queue.z[:, b:], before[:, :-b])
    assert was_full and queue.filled == 8  # filled after two steps of b = 4 into L = 8, used at the third


def test_sinkhorn_fp64_flag_reaches_every_sinkhorn_call(monkeypatch):
    """--sinkhorn-fp64 runs every Sinkhorn of a training step in float64 (with and without the queue), and only then;
    swav_loss passes its fp64 on (Sinkhorn's float64 accuracy: test_sinkhorn_half_precision_and_large_scores)."""
    calls = []

    def spy(scores, *a, fp64=False, **kw):
        calls.append(fp64)
        return sinkhorn(scores, *a, fp64=fp64, **kw)

    sinkhorn = S.sinkhorn
    monkeypatch.setattr(S, "sinkhorn", spy)
    for flag in (False, True):
        model = small_model()
        args = dataclasses.replace(TINY, sinkhorn_fp64=flag)
        run = make_run(args, model, freeze_steps=0, queue=S.Queue(2, 4, 16, CPU))
        calls.clear()
        for step in range(2):  # the queue (4 = one batch) is full at the second step
            S.train_step(run, tiny_groups(20 + step), step)
        assert run.queue.filled == 4 and calls == [flag] * 4, (flag, calls)
    # and swav_loss itself: the codes it uses are float64 Sinkhorn's (the spy saw fp64=True twice: two assigned crops)
    calls.clear()
    scores = list(torch.rand(3, 16, 12, generator=torch.Generator().manual_seed(5)))
    S.swav_loss(scores, 0.1, 0.05, 3, fp64=True)
    assert calls == [True, True]


# ---------------------------------------------------------------- head variants and prototype sets (SwAV guide)
def test_head_dims_and_bn_variants():
    """--head-dims (VISSL's swav_head dims: features, hidden widths..., z) and --no-head-bn: the default head keeps
    today's layout and init (head.{0,1,3}: Linear, BN, ReLU, Linear; --hidden-dim 0: one Linear, head.weight), the
    same dims given as a list build the same head; without BN every hidden Linear is followed by ReLU only (a hand
    computation of z); the first dim must be the backbone's features."""

    def layout(model):
        return [type(m).__name__ for m in model.head] if isinstance(model.head, nn.Sequential) else ["Linear"]

    torch.manual_seed(0)
    default = S.SwAV("resnet18", 32, 16, 10)
    torch.manual_seed(0)
    listed = S.SwAV("resnet18", 0, 0, 10, head_dims=(512, 32, 16))
    assert layout(default) == ["Linear", "BatchNorm1d", "ReLU", "Linear"] and default.dims == [512, 32, 16]
    bn = [f"head.1.{p}" for p in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")]
    assert [k for k in default.state_dict() if k.startswith("head.")] == ["head.0.weight", "head.0.bias", *bn,
                                                                          "head.3.weight", "head.3.bias"]  # fmt: skip
    sd = listed.state_dict()
    assert sd.keys() == default.state_dict().keys()  # the same modules, drawn in the same order
    assert all(torch.equal(v, sd[k]) for k, v in default.state_dict().items())
    one = S.SwAV("resnet18", 0, 16, 10)
    assert isinstance(one.head, nn.Linear) and one.head.weight.shape == (16, 512) and one.dims == [512, 16]
    three_bn = S.SwAV("resnet18", 0, 0, 10, head_dims=(512, 64, 48, 16))  # the guide's 3-layer head, smaller
    assert layout(three_bn) == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d", "ReLU", "Linear"]
    no_bn = S.SwAV("resnet18", 0, 0, 10, head_dims=(512, 64, 48, 16), head_bn=False)
    assert layout(no_bn) == ["Linear", "ReLU", "Linear", "ReLU", "Linear"]
    assert [k for k in no_bn.state_dict() if k.startswith("head.")] == [f"head.{i}.{p}" for i in (0, 2, 4)
                                                                          for p in ("weight", "bias")]  # fmt: skip
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        z, s = no_bn([x])
        h = no_bn.backbone(x)
        a = F.relu(h @ no_bn.head[0].weight.T + no_bn.head[0].bias)
        a = F.relu(a @ no_bn.head[2].weight.T + no_bn.head[2].bias)
        want = F.normalize(a @ no_bn.head[4].weight.T + no_bn.head[4].bias, dim=1)
    torch.testing.assert_close(z, want)
    torch.testing.assert_close(s, want @ no_bn.prototypes.weight.T)
    assert z.shape == (4, 16) and s.shape == (4, 10)
    with pytest.raises(S.RunError, match=r"--head-dims \(2048, 4096, 128\) must start with resnet18's 512 features"):
        S.SwAV("resnet18", 0, 0, 10, head_dims=(2048, 4096, 128))


def test_prototype_sets_one_swapped_loss_each_averaged():
    """--n-prototypes 10 6 8: official MultiPrototypes keys (prototypes.prototypes{i}.weight, no bias); the scores are
    every set's z C_h^T side by side; train_step normalises every set, and its loss is the mean over the sets of each
    set's swapped loss (float64 transcription: sinkhorn_ref codes of crops 0 and 1, with the one z queue scored by
    that set in front once full, CE against every other crop), as main_deepclusterv2.py and VISSL's SwAVLoss average
    their heads; loss / ln K uses the sets' mean ln K; the freeze holds every set."""
    ks, b, n_crops = (10, 6, 8), 4, 4
    torch.manual_seed(0)
    model = S.SwAV("resnet18", 32, 16, ks)
    names = [k for k in model.state_dict() if "prototypes" in k]
    assert names == [f"prototypes.prototypes{i}.weight" for i in range(3)]
    cs = [model.prototypes[f"prototypes{i}"].weight for i in range(3)]
    assert [tuple(c.shape) for c in cs] == [(k, 16) for k in ks] and model.ks == list(ks)
    start = [F.normalize(c.detach(), dim=1) for c in cs]
    queue = S.Queue(2, b, 16, CPU)  # one batch long: full after the first step
    run = make_run(dataclasses.replace(TINY, n_prototypes=ks), model, freeze_steps=2, queue=queue)
    outs = []
    model.register_forward_hook(lambda m, i, o: outs.append([t.detach() for t in o]))
    for step in range(3):
        before, was_full = queue.z.clone().double(), queue.filled == b
        c0 = [F.normalize(c.detach(), dim=1).double() for c in cs]
        metrics = S.train_step(run, tiny_groups(30 + step), step)
        z, scores = outs[-1]
        assert scores.shape == (n_crops * b, sum(ks))
        torch.testing.assert_close(scores.double(), torch.cat([z.double() @ c.T for c in c0], 1), atol=1e-6, rtol=0)
        per_set = []
        for h, sh in enumerate(scores.double().split(ks, 1)):
            sh = sh.view(n_crops, b, -1)
            pairs = []
            for j, i in enumerate((0, 1)):
                s_in = torch.cat([before[j] @ c0[h].T, sh[i]]) if was_full else sh[i]
                q = sinkhorn_ref(s_in)[-b:]
                pairs.append(np.mean([ce(q, sh[v], 0.1).item() for v in range(n_crops) if v != i]))
            per_set.append(np.mean(pairs))
        assert metrics[0].item() == pytest.approx(np.mean(per_set), rel=1e-5), (step, per_set)
        assert max(per_set) - min(per_set) > 1e-3  # not one set's loss alone
        assert metrics[1].item() == pytest.approx(np.mean(per_set) / np.mean(np.log(ks)), rel=1e-5)
        assert metrics[4].item() == float(was_full) and (step == 0) != was_full
        if step == 1:  # frozen for two steps: every set only renormalised
            for c, c_start in zip(cs, start):
                torch.testing.assert_close(c.detach(), c_start, rtol=0, atol=1e-6)
    assert all((c.detach() - c_before.float()).abs().max() > 1e-6 for c, c_before in zip(cs, c0))  # then they move


# ---------------------------------------------------------------- crop geometry vs torchvision (spec 1.1)
def torchvision_rrc(height, width, area, log_ratio, pos):
    """torchvision RandomResizedCrop.get_params with its random draws replaced by the given ones:
    returns the box (x1, y1, x2, y2) and, for each try, the unrounded (w, h) (to spot float32 rounding ties)."""
    unrounded = []
    for t in range(10):
        target_area = height * width * area[t].item()
        aspect_ratio = torch.exp(log_ratio[t]).item()
        w, h = math.sqrt(target_area * aspect_ratio), math.sqrt(target_area / aspect_ratio)
        unrounded += [w, h]
        w, h = int(round(w)), int(round(h))
        if 0 < w <= width and 0 < h <= height:
            i = math.floor(pos[0, t].item() * (height - h + 1))  # torch.randint(0, height - h + 1)
            j = math.floor(pos[1, t].item() * (width - w + 1))
            return (j, i, j + w, i + h), unrounded, False
    in_ratio = float(width) / float(height)
    if in_ratio < 3 / 4:
        w, h = width, int(round(width / (3 / 4)))
    elif in_ratio > 4 / 3:
        h, w = height, int(round(height * 4 / 3))
    else:
        w, h = width, height
    i, j = (height - h) // 2, (width - w) // 2
    return (j, i, j + w, i + h), unrounded, True


def test_rrc_boxes_match_torchvision_get_params():
    """Same draws, same boxes, for photo sizes, tiny images and extreme aspect ratios (which force the fallback).

    Both take exp(log_ratio) in float32 and the rest in float64, so every box must match exactly."""
    sizes = [(375, 500), (500, 333), (224, 224), (32, 32), (20, 400), (400, 20), (1, 1), (3, 3), (7, 5), (96, 300)]
    n, ties, fallbacks = 300, 0, 0
    for hh, ww in sizes:
        for scale in [(0.14, 1.0), (0.05, 0.14), (0.08, 1.0)]:
            gen = torch.Generator().manual_seed(hh * 1000 + ww)
            p = S.sample_view_params(gen, n, S.CropGroup(1, 96, scale))
            boxes = S.rrc_boxes(torch.full((n,), float(hh)), torch.full((n,), float(ww)), p)
            assert boxes.shape == (n, 4)
            x1, y1, x2, y2 = boxes.T
            assert (x1 >= 0).all() and (y1 >= 0).all() and (x2 <= ww).all() and (y2 <= hh).all()
            assert (x2 > x1).all() and (y2 > y1).all() and torch.equal(boxes, boxes.round())
            for i in range(n):
                ref, unrounded, fallback = torchvision_rrc(hh, ww, p["area"][i], p["log_ratio"][i], p["pos"][i])
                fallbacks += fallback
                if tuple(boxes[i].tolist()) != ref:
                    assert min(abs(u % 1 - 0.5) for u in unrounded) < 1e-4, (hh, ww, scale, boxes[i].tolist(), ref)
                    ties += 1
                elif not fallback:
                    frac = (ref[2] - ref[0]) * (ref[3] - ref[1]) / (hh * ww)
                    if min(hh, ww) >= 96:  # rounding of w, h moves the area a little on small images
                        assert scale[0] * 0.97 <= frac <= scale[1] * 1.03
    assert ties == 0
    assert fallbacks >= 2 * 3 * n  # 20x400 and 400x20 always fall back
    # the fallback for a 20x400 strip: the full height and a 4/3 ratio, centred
    p = S.sample_view_params(torch.Generator().manual_seed(0), 4, S.CropGroup(1, 96, (0.14, 1.0)))
    assert S.rrc_boxes(torch.full((4,), 20.0), torch.full((4,), 400.0), p).tolist() == [[186, 0, 213, 20]] * 4
    assert S.rrc_boxes(torch.full((4,), 400.0), torch.full((4,), 20.0), p).tolist() == [[0, 186, 20, 213]] * 4


def smooth_image(h, w, seed=0):
    """A smooth float image in 0..255 [1, 3, h, w] (low-frequency sines), where resampling filters nearly agree."""
    g = torch.Generator().manual_seed(seed)
    y, x = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    f, ph = 0.02 + 0.03 * torch.rand(3, 2, generator=g), 6.28 * torch.rand(3, 2, generator=g)
    chans = [torch.sin(f[c, 0] * y + ph[c, 0]) * torch.cos(f[c, 1] * x + ph[c, 1]) for c in range(3)]
    return (127.5 + 120 * torch.stack(chans))[None]


def test_resized_crops_enlarge_is_bilinear():
    """Enlarging (by less than 2x) equals F.interpolate(bilinear, align_corners=False) of the integer crop, except the
    1-pixel output border where roi_align reads the neighbouring pixel instead of repeating the edge."""
    g = torch.Generator().manual_seed(9)
    imgs = torch.rand(2, 3, 60, 70, generator=g) * 255
    boxes = torch.tensor([[5.0, 7.0, 30.0, 37.0], [0.0, 0.0, 40.0, 33.0], [30.0, 20.0, 70.0, 60.0]])
    owner = torch.tensor([0, 1, 1])
    out = S.resized_crops(imgs, owner, boxes, 48)
    assert out.shape == (3, 3, 48, 48)
    for i, (x1, y1, x2, y2) in enumerate(boxes.long().tolist()):
        ref = F.interpolate(imgs[owner[i], None, :, y1:y2, x1:x2], size=(48, 48), mode="bilinear", align_corners=False)
        torch.testing.assert_close(out[i, :, 1:-1, 1:-1], ref[0, :, 1:-1, 1:-1], rtol=0, atol=5e-3)  # 0..255 units
        assert (out[i] - ref[0]).abs().max() > 1e-2 or (x1 == 0 and y1 == 0)  # the border does read outside


def test_resized_crops_shrink_close_to_antialiased_resize():
    """Shrinking averages bilinear samples: on a smooth image within ~1/255 of torchvision's antialiased resize."""
    img = smooth_image(300, 400)
    boxes = torch.tensor([[10.0, 20.0, 250.0, 280.0], [0.0, 0.0, 400.0, 300.0], [100.0, 50.0, 190.0, 170.0]])
    out = S.resized_crops(img, torch.zeros(3), boxes, 64)
    for i, (x1, y1, x2, y2) in enumerate(boxes.long().tolist()):
        ref = TF.resized_crop(img[0], y1, x1, y2 - y1, x2 - x1, [64, 64], InterpolationMode.BILINEAR, antialias=True)
        diff = (out[i] - ref).abs()
        assert diff.mean() < 0.5 and diff[:, 2:-2, 2:-2].max() < 1.5  # 0..255 units
        naive = F.interpolate(img[:, :, y1:y2, x1:x2], size=(64, 64), mode="nearest")[0]
        assert (naive - ref).abs().mean() > 2 * diff.mean()  # the bound tells a non-averaging resize apart


# ---------------------------------------------------------------- augmentation draws (spec 1.2)
@pytest.mark.parametrize("recipe", ["imagenet", "cifar"])
def test_sample_view_params_probabilities_and_ranges(recipe):
    """flip .5, jitter .8, gray .2, blur .5 (every crop, both recipes), no solarisation; ColorJitter(.8, .8, .8, .2)
    factors; blur sigma U(.1, 2); the 10 RandomResizedCrop tries within the scale and log(3/4)..log(4/3)."""
    args = S.Args() if recipe == "imagenet" else S.CIFAR_PROXY
    n = 20000
    for group in S.crop_groups(args):
        p = S.sample_view_params(torch.Generator().manual_seed(11), n, group)
        for key, prob in [("flip", 0.5), ("jitter", 0.8), ("gray", 0.2), ("blur", 0.5)]:
            assert abs(p[key].float().mean().item() - prob) < 0.015, key  # > 4 binomial sd at n = 20000
        assert not p["solarize"].any()
        for v, lo, hi in [(p["factors"][:, :3], 0.2, 1.8), (p["factors"][:, 3], -0.2, 0.2), (p["sigma"], 0.1, 2.0)]:
            assert lo <= v.min() < lo + 0.01 and hi - 0.01 < v.max() <= hi
        a = p["area"]
        assert a.shape == (n, 10) and group.scale[0] <= a.min() and a.max() <= group.scale[1]
        assert math.log(3 / 4) - 1e-6 <= p["log_ratio"].min() and p["log_ratio"].max() <= math.log(4 / 3) + 1e-6
        assert p["pos"].shape == (n, 2, 10) and 0 <= p["pos"].min() and p["pos"].max() < 1
        assert torch.equal(p["order"].sort(1).values, torch.arange(4).expand(n, 4))
    assert [(g.n, g.size, g.scale) for g in S.crop_groups(args)] == (
        [(2, 224, (0.14, 1.0)), (6, 96, (0.05, 0.14))] if recipe == "imagenet" else [(2, 32, (0.08, 1.0))]
    )


# ---------------------------------------------------------------- view pipelines on real images
def streamed_run(data_dir, **kw):
    args = dataclasses.replace(
        S.Args(), dataset="imagefolder", data_dir=str(data_dir), in_memory=False, workers=0, batch_size=4, **kw
    )
    return SimpleNamespace(args=args, device=CPU, rank=0, world_size=1)


def item_views(run, files, index, seed, groups):
    """One streamed item by hand: decode, the draws seeded by the item seed, S.rrc_boxes, then torchvision's tensor
    RandomResizedCrop resampling (crop, bilinear antialiased resize of the uint8 image) and finish_views."""
    img = decode_image(read_file(str(files[index])), mode=ImageReadMode.RGB)
    gen = torch.Generator().manual_seed(seed)
    params = [S.sample_view_params(gen, g.n, g) for g in groups]
    views = []
    for g, p in zip(groups, params):
        boxes = S.rrc_boxes(*(torch.full((g.n,), float(d)) for d in img.shape[-2:]), p).long().tolist()
        crops = [
            TF.resized_crop(img, y1, x1, y2 - y1, x2 - x1, [g.size, g.size], InterpolationMode.BILINEAR, antialias=True)
            for x1, y1, x2, y2 in boxes
        ]
        views.append(S.finish_views(torch.stack(crops).float(), p, g, run.args))
    return views, params


def test_streamed_multicrop_on_imagenet_photos(imagewoof_dir):
    """Imagenet recipe on real photos: 2x224 + 6x96 crop-major groups, finite, within the normalised [0, 1] range; row
    v*b + i is crop v of image i, drawn from the seed (key, i) and resampled like torchvision's RandomResizedCrop;
    gray-flagged crops are gray; a 2-rank split gives the same rows."""
    run = streamed_run(imagewoof_dir)
    data = S.load_data(run.args)
    files = data["train_x"]
    assert isinstance(files, list) and len(files) == len(data["train_y"]) > 100 and data["num_classes"] == 10
    groups = S.crop_groups(run.args)
    idx, key = torch.tensor([0, 37, 81, 150 % len(files)]), (31, "train", 0, 5)
    out = next(S.view_batches(run, files, [idx], [key], groups))
    assert [tuple(x.shape) for x in out] == [(8, 3, 224, 224), (24, 3, 96, 96)]
    mean, std = torch.tensor(run.args.mean)[:, None, None], torch.tensor(run.args.std)[:, None, None]
    for x in out:
        assert torch.isfinite(x).all()
        u = x * std + mean  # back to [0, 1]
        assert u.min() >= -1e-5 and u.max() <= 1 + 1e-5 and u.std() > 0.1
    for i, index in enumerate(idx.tolist()):
        ref, params = item_views(run, files, index, S.rng_seed(*key, i), groups)
        for g, x, r, p in zip(groups, out, ref, params):
            rows = x.view(g.n, 4, *x.shape[1:])[:, i]
            # per-crop mean |difference| (normalised units): 0 for torchvision's resampling, ~0.005 for roi_align,
            # > 0.3 for another crop or other colour draws
            assert (rows - r).abs().mean((1, 2, 3)).max() < 0.03
            u = rows * std + mean
            gray = (u.amax(1) - u.amin(1)).flatten(1).amax(1) < 1e-4
            assert gray[p["gray"]].all()
            others = x.view(g.n, 4, *x.shape[1:])[:, (i + 1) % 4]
            assert (others - r).abs().mean((1, 2, 3)).min() > 0.1  # the bound tells other images apart
    for rank in range(2):
        part = next(
            S.view_batches(SimpleNamespace(**{**vars(run), "rank": rank, "world_size": 2}), files, [idx], [key], groups)
        )
        for g, x, y in zip(groups, out, part):
            assert torch.equal(y.view(g.n, 2, *y.shape[1:]), x.view(g.n, 4, *x.shape[1:])[:, 2 * rank : 2 * (rank + 1)])


@pytest.fixture(scope="module")
def cifar(cifar_dir):
    classes = sorted(d.name for d in (cifar_dir / "train").iterdir())
    return S.load_image_folder(cifar_dir / "train", classes, 32)[0]


def test_in_memory_views_rank_split_is_exact(cifar):
    """In memory (CIFAR): the draws are made for the global batch, so rank 0 and rank 1 of a 2-rank run together hold
    exactly the 1-rank run's crops (crop-major per group); another key gives other crops."""
    args = dataclasses.replace(S.CIFAR_PROXY, n_small=2, small_size=16, small_scale=(0.08, 0.5), batch_size=8)
    groups = S.crop_groups(args)
    idx, key = torch.tensor([3, 99, 140, 7, 250, 18, 399, 64]), (31, "train", 2, 11)
    one = SimpleNamespace(args=args, device=CPU, rank=0, world_size=1)
    full = next(S.view_batches(one, cifar, [idx], [key], groups))
    assert [tuple(x.shape) for x in full] == [(16, 3, 32, 32), (16, 3, 16, 16)]
    mean, std = torch.tensor(args.mean)[:, None, None], torch.tensor(args.std)[:, None, None]
    for x in full:
        u = x * std + mean
        assert torch.isfinite(x).all() and u.min() >= -1e-5 and u.max() <= 1 + 1e-5
    for rank in range(2):
        run = SimpleNamespace(args=args, device=CPU, rank=rank, world_size=2)
        part = next(S.view_batches(run, cifar, [idx], [key], groups))
        for g, x, y in zip(groups, full, part):
            assert torch.equal(y.view(g.n, 4, *y.shape[1:]), x.view(g.n, 8, *x.shape[1:])[:, 4 * rank : 4 * rank + 4])
    other = next(S.view_batches(one, cifar, [idx], [(31, "train", 2, 12)], groups))
    assert not torch.allclose(other[0], full[0])
    # image i of the batch owns rows v*B + i: changing one image changes exactly those rows
    changed = cifar.clone()
    changed[idx[5]] = 255 - changed[idx[5]]
    rows = (next(S.view_batches(one, changed, [idx], [key], groups))[0] != full[0]).flatten(1).any(1)
    assert rows.nonzero().flatten().tolist() == [5, 13]
