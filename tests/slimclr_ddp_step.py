"""Two SlimCLR training steps (two views, the online branch at every active width, the EMA update, full-width keys,
the SlimCLR loss, backward, optimizer step and, for MoCo v2, the enqueue) on the first two global batches of epoch 0
of the cifar recipes, for MoCo v2 and SimCLR with the slow start between the steps (step 0 trains the full width
alone, step 1 every width) and for MoCo v3 with every width from step 0.

Run under torchrun (DDP, gloo) or as a plain process; rank r saves, per variant, its losses (the mean of the rank
losses, as logged), both steps' gradients, the updated online and momentum-encoder weights (4,096 fixed entries of
the large tensors), the queue and how far every parameter moved to OUT/rank{r}.pt. With --emulate-ranks K (single
process) the reference is written out by hand: BatchNorm is per rank on
the CPU (PyTorch's SyncBN is GPU-only), so the online branch runs on each of K contiguous image shares separately;
  v2: shuffle-BN: the global key batch (rank-major) is permuted by the seeded shuffle-bn stream of the step, the
      momentum encoder runs on each share of the permuted batch, the keys are un-permuted; rank r's loss is
      slimclr_mocov2_loss on its queries and its keys with the shared queue; all B keys enter the queue afterwards;
  v3: the momentum encoder runs on each rank's share, the keys of all ranks are gathered, and rank r's loss (written
      out below from spec 3.2, not the script's) uses the labels arange(b) + r b over the B gathered keys;
and DDP's averaged gradient is that of the mean of the K rank losses: one backward of the mean, one optimizer step;
  SimCLR: that mean is the official global loss (models/s_simclr.py, written out below) of every rank's embeddings.
CRUCIAL: the reference takes step 2 from the DDP run's state after step 1 (--state1-dir DDP_OUT, where rank 0 writes
state1-VARIANT.pt), not from its own, which differs by float32 rounding (tests/ddp_handoff.py says why).
Usage: python tests/slimclr_ddp_step.py DATA_DIR OUT [--emulate-ranks K --state1-dir DDP_OUT]"""

import dataclasses
import sys
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import slimclr_moco as S  # noqa: E402
from ddp_handoff import hand_off, sample  # noqa: E402

SPE = 400 // 16  # steps per epoch of the 400-image fixture at batch 16
VARIANTS = {
    # the recipe's SGD at lr 0.06 (no warm-up); step 0 at epoch 0 < 0.02 (the full width alone: the 0.5 BN copies get
    # no gradient), step 1 at 0.04 (every width)
    "v2_slow_start": dict(recipe=S.CIFAR_MOCOV2, slim_start_epoch=0.5 / SPE, queue_size=32),
    # LARS: a matrix moves by lr x 0.001 of its norm per step; 1-D parameters by lr x their gradient
    "v3": dict(recipe=S.CIFAR_MOCOV3, slim_start_epoch=0.0, mlp_dim=64, lr=5.0, lr_scaling="none"),
    # NT-Xent over both ranks' embeddings, gathered with their gradient; LARS as v3
    "simclr_slow_start": dict(recipe=S.CIFAR_SIMCLR, slim_start_epoch=0.5 / SPE, mlp_dim=64, lr=5.0, lr_scaling="none"),
}


def v3_rank_loss(q1: dict, q2: dict, k1_all, k2_all, rank: int, args, epoch: float):
    """Spec 3.2 for rank `rank` of the gathered keys [B, D]: per direction l_w = q_w k^T / T, labels arange(b) + rank b,
    nce_w = 2T CE(l_w, labels), kd_w = t^2 softCE(l_w / t, softmax(l_max / t) detached); before the slow start the
    full width's nce alone, after it lambda_max nce_max + sum_w<max [(1 - a) nce_w + a kd_w], lambda_max = 1 + sum."""
    T, t, a = args.temperature, args.distill_temperature, args.distill_weight
    active = epoch >= args.slim_start_epoch

    def direction(q, k):
        widths = sorted(q, reverse=True)
        b, top = len(q[widths[0]]), widths[0]
        labels = torch.arange(b) + rank * b
        logits = {w: q[w] @ k.T / T for w in widths}
        loss = 2 * T * F.cross_entropy(logits[top], labels)
        if not active:
            return loss
        loss = (1 + sum(widths[1:])) * loss
        p = F.softmax(logits[top].detach() / t, dim=1)
        for w in widths[1:]:
            kd = t * t * -(p * F.log_softmax(logits[w] / t, dim=1)).sum(1).mean()
            loss = loss + (1 - a) * 2 * T * F.cross_entropy(logits[w], labels) + a * kd
        return loss

    return direction(q1, k2_all) + direction(q2, k1_all)


def simclr_global_loss(q: list, args, epoch: float):
    """The official s_SimCLR loss of the global batch (q: per rank [{width: view-1 embeddings}, {...view 2}]): per width
    z = [view 1 of every rank's images; view 2], sim = z z^T without its diagonal, labels [arange(N) + N - 1,
    arange(N)], nce_w = CE(sim_w / T); before the slow start nce_max alone, after it lambda_max nce_max +
    sum_w<max [(1 - a) nce_w + a t^2 softCE(sim_w / t, softmax(sim_max / t) detached)]."""
    T, t, a = args.temperature, args.distill_temperature, args.distill_weight
    widths = sorted(q[0][0], reverse=True)
    n = sum(len(r[0][widths[0]]) for r in q)
    labels = torch.cat([torch.arange(n) + n - 1, torch.arange(n)])
    sim = {}
    for w in widths:
        z = torch.cat([r[0][w] for r in q] + [r[1][w] for r in q])
        sim[w] = (z @ z.T)[~torch.eye(2 * n, dtype=torch.bool)].view(2 * n, 2 * n - 1)
    loss = F.cross_entropy(sim[widths[0]] / T, labels)
    if epoch < args.slim_start_epoch:
        return loss
    loss = (1 + sum(widths[1:])) * loss
    p = F.softmax(sim[widths[0]].detach() / t, dim=1)
    for w in widths[1:]:
        kd = t * t * -(p * F.log_softmax(sim[w] / t, dim=1)).sum(1).mean()
        loss = loss + (1 - a) * F.cross_entropy(sim[w] / T, labels) + a * kd
    return loss


def reference_step(run, model, shares: list, step: int, world: int) -> torch.Tensor:
    """One step of `world` emulated ranks (shares: per rank its two views [b, 3, S, S]). Returns the mean rank loss."""
    args, opt = run.args, run.opt
    epoch = step / SPE
    widths = run.widths if epoch >= args.slim_start_epoch else run.widths[:1]
    b = len(shares[0][0])
    norm = lambda z: {w: F.normalize(e, dim=1) for w, e in z.items()}  # noqa: E731
    if args.moco == "v2":  # queries of view 1, per rank (its own BN statistics)
        q = [[norm(model.online([s[0]], widths)[0])] for s in shares]
    else:
        q = [[norm(z) for z in model.online([s[0], s[1]], widths)] for s in shares]
    if args.moco != "simclr":
        S.ema_update(model.momentum_encoder, model.online.encoder, S.momentum_at(step, args, SPE))
    with torch.no_grad():
        key = lambda x: F.normalize(model.momentum_encoder(x, 1.0), dim=1)  # noqa: E731
        if args.moco == "v2":  # shuffle-BN over the global batch
            x_all = torch.cat([s[1] for s in shares])
            gen = torch.Generator().manual_seed(S.rng_seed(args.seed, "shuffle-bn", step))
            perm = torch.randperm(len(x_all), generator=gen)
            k_all = torch.empty(len(x_all), args.dim)
            k_all[perm] = torch.cat([key(x_all[perm[r * b : (r + 1) * b]]) for r in range(world)])
        elif args.moco == "v3":
            k1_all, k2_all = (torch.cat([key(s[v]) for s in shares]) for v in (0, 1))
    kw = dict(epoch=epoch, slim_start_epoch=args.slim_start_epoch, distill_weight=args.distill_weight)
    kw.update(distill_temperature=args.distill_temperature, reweight=args.reweight, temperature=args.temperature)
    losses = [simclr_global_loss(q, args, epoch)] if args.moco == "simclr" else []
    for r in range(world if args.moco != "simclr" else 0):
        if args.moco == "v2":
            losses.append(S.slimclr_mocov2_loss(q[r][0], k_all[r * b : (r + 1) * b], model.queue, **kw))
        else:
            losses.append(v3_rank_loss(q[r][0], q[r][1], k1_all, k2_all, r, args, epoch))
    loss = torch.stack(losses).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    if args.moco == "v2":
        ptr = step * args.batch_size % args.queue_size
        model.queue[ptr : ptr + len(k_all)] = k_all
    return loss.detach()


def two_steps(args, data, rank: int, world_size: int, world: int, device, tag: str, out: Path, state_dir) -> dict:
    """Two steps from the seeded initial model, as run_training builds them (the recipe's optimizer, per-step LR); the
    reference's step 2 from the DDP run's state after step 1 (online and momentum encoders, queue, optimizer)."""
    torch.manual_seed(args.seed)  # the same initial model (and queue) on every rank
    model = S.SlimCLR(args).to(device)
    online = model.online
    ddp = torch.nn.parallel.DistributedDataParallel(online, find_unused_parameters=True) if world_size > 1 else online
    run = SimpleNamespace(
        args=args,
        model=model,
        ddp_model=ddp,
        opt=S.build_optimizer(model, args),
        scaler=torch.amp.GradScaler("cuda", enabled=False),
        autocast=nullcontext(),
        fmt=torch.contiguous_format,
        rank=rank,
        world_size=world_size,
        device=device,
        widths=online.encoder.backbone.widths,
        steps_per_epoch=SPE,
        groups=S.crop_groups(args),
    )
    assert len(data["train_y"]) // args.batch_size == SPE
    init = {k: p.detach().clone() for k, p in model.named_parameters()}
    if args.moco == "v2":
        init["queue"] = model.queue.clone()
    saved = {}
    batches = S.epoch_batches(len(data["train_y"]), args.batch_size, args.seed, 0)[:2]
    losses = []
    for step, batch in enumerate(batches):
        for group in run.opt.param_groups:
            group["lr"] = S.lr_at(step, args, SPE)
        key = (args.seed, "train", 0, step)
        if world_size > 1:
            views = next(S.view_batches(run, data["train_x"], [batch], [key], run.groups))
            loss = S.train_step(run, views, step)[0]
            dist.all_reduce(loss)  # the loss every rank logs: the mean of the per-rank losses
            loss = loss / world_size
        else:
            ranks = [SimpleNamespace(**{**vars(run), "rank": r, "world_size": world}) for r in range(world)]
            shares = [next(S.view_batches(rk, data["train_x"], [batch], [key], run.groups)) for rk in ranks]
            loss = reference_step(run, model, shares, step, world)
        losses.append(loss)
        saved[f"grads{step + 1}"] = {k: sample(p.grad) for k, p in online.named_parameters() if p.grad is not None}
        if step == 0:
            saved["weights1"] = {k: sample(p) for k, p in online.named_parameters()}
            hand_off(tag, model, run.opt, rank, world_size, out, state_dir)
    saved["losses"] = torch.stack(losses)
    # BN running statistics stay per rank: parameters only; how far each moved in the two steps
    saved["weights"] = {k: sample(p) for k, p in online.named_parameters()}
    momentum = model.momentum_encoder.named_parameters() if model.momentum_encoder is not None else []
    saved["momentum"] = {k: sample(p) for k, p in momentum}
    saved["moved"] = {k: (p.detach() - init[k]).abs().max() for k, p in model.named_parameters()}
    if args.moco == "v2":
        saved["queue"] = model.queue.clone()
        saved["moved"]["queue"] = (model.queue - init["queue"]).abs().max()
    return saved


def main():
    data_dir, out = sys.argv[1], Path(sys.argv[2])
    opts = dict(zip(sys.argv[3::2], sys.argv[4::2]))  # --emulate-ranks K, --state1-dir DIR
    emulate, state_dir = int(opts.get("--emulate-ranks", 1)), opts.get("--state1-dir")
    rank, world_size, device = S.setup_distributed("cpu")
    world = max(world_size, emulate)
    data = None
    saved = {}
    for name, over in VARIANTS.items():
        over = dict(over)
        args = dataclasses.replace(
            over.pop("recipe"),
            dataset="imagefolder",
            data_dir=data_dir,
            batch_size=16,  # global: 8 images per rank
            arch="resnet18",  # the ImageNet stem: 8 x 8 after it at 32 px
            widths=(1.0, 0.5),
            dim=32,
            warmup_epochs=0,
            device="cpu",
            **over,
        )
        data = data or S.load_data(args)
        saved[name] = two_steps(args, data, rank, world_size, world, device, name, out, state_dir)
    torch.save(saved, out / f"rank{rank}.pt")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
