"""Distributed Sinkhorn on a fixed score matrix, then two SwAV training steps (multi-crop views, forward, Sinkhorn,
swapped-prediction loss, backward, LARS step) on the first two global batches of epoch 0, the second with the queue.

Run under torchrun (DDP, gloo) or as a plain process; rank r saves its Sinkhorn rows, losses, both steps' gradients
and the weights after each step (4,096 fixed entries of the large tensors) to OUT/rank{r}.pt, and rank 0 of a DDP run
its state after step 1 to OUT/state1-swav.pt. With --emulate-ranks K (single process), the model runs on each of K
contiguous image shares separately, so BatchNorm sees exactly what each DDP rank's BatchNorm sees (PyTorch's SyncBN is
GPU-only: CPU/gloo runs keep per-rank BN), while Sinkhorn and the loss cover the whole global batch (and the K ranks'
queues concatenated): the reference a K-rank DDP run must equal.

CRUCIAL: each compared step starts from the same state: the reference takes step 2 from the DDP run's state after
step 1 (--state1-dir DDP_OUT), not from its own, which differs by float32 rounding (tests/ddp_handoff.py says why).
Usage: python tests/swav_ddp_step.py DATA_DIR OUT [--emulate-ranks K --state1-dir DDP_OUT]"""

import dataclasses
import sys
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import swav_imagenet as S  # noqa: E402
from ddp_handoff import hand_off, sample  # noqa: E402

EPS, ITERS = 0.05, 3


def sinkhorn_scores(world: int) -> torch.Tensor:
    """A fixed [6 * world, 20] matrix of cosine-like scores; the first rank's rows are much smaller (max 0.25 vs
    about 1), so a per-rank (not global) max shift or row sums would change the result."""
    g = torch.Generator().manual_seed(0)
    s = torch.rand(6 * world, 20, generator=g) * 2 - 1
    s[:6] = s[:6] * 0.5 - 0.25
    return s


def main():
    data_dir, out = sys.argv[1], Path(sys.argv[2])
    opts = dict(zip(sys.argv[3::2], sys.argv[4::2]))  # --emulate-ranks K, --state1-dir DIR
    emulate, state_dir = int(opts.get("--emulate-ranks", 1)), opts.get("--state1-dir")
    args = dataclasses.replace(
        S.CIFAR_PROXY,
        dataset="imagefolder",
        data_dir=data_dir,
        batch_size=8,
        n_small=2,  # multi-crop: two resolutions, each through the backbone in its own pass
        small_size=16,
        small_scale=(0.08, 0.5),
        arch="resnet18",
        hidden_dim=64,
        feat_dim=32,
        n_prototypes=30,
        queue_length=8,
        device="cpu",
    )
    rank, world_size, device = S.setup_distributed("cpu")
    world = max(world_size, emulate)
    saved = {}

    # -- 1. Sinkhorn alone: each rank holds its rows of the global matrix
    scores = sinkhorn_scores(world)
    rows = 6
    if world_size > 1:
        saved["sinkhorn"] = S.sinkhorn(scores[rank * rows : (rank + 1) * rows], EPS, ITERS)
    else:
        saved["sinkhorn"] = S.sinkhorn(scores, EPS, ITERS)
    saved["sinkhorn64"] = S.sinkhorn(
        scores[rank * rows : (rank + 1) * rows] if world_size > 1 else scores, EPS, ITERS, fp64=True
    )

    # -- 2. two training steps, as run_training builds them
    data = S.load_data(args)
    torch.manual_seed(args.seed)
    model = S.SwAV(args.arch, args.hidden_dim, args.feat_dim, args.n_prototypes)
    opt = S.LARS(S.param_groups(model, args), lr=0.5, momentum=args.momentum, eta=args.lars_eta, clip=args.lars_clip)
    run = SimpleNamespace(
        args=args,
        model=model,
        ddp_model=torch.nn.parallel.DistributedDataParallel(model) if world_size > 1 else model,
        opt=opt,
        scaler=torch.amp.GradScaler("cuda", enabled=False),
        autocast=nullcontext(),
        fmt=torch.contiguous_format,
        queue=None,
        freeze_steps=0,  # the prototypes take part in the update
        steps_per_epoch=len(data["train_y"]) // args.batch_size,  # Queue.start: a no-op, the queue is set below
        rank=rank,
        world_size=world_size,
        device=device,
        groups=S.crop_groups(args),
    )
    n_crops, n_assign = args.n_large + args.n_small, len(args.crops_for_assign)
    b = args.batch_size // world  # images per (emulated) rank
    # this rank's queue (global length 8 = one global batch): empty at step 1, full (step 1's z) at step 2
    run.queue = S.Queue(n_assign, args.queue_length // world, args.feat_dim, device)
    saved["init"] = {k: sample(p) for k, p in model.named_parameters()}
    batches = S.epoch_batches(len(data["train_y"]), args.batch_size, args.seed, 0)[:2]
    losses = []
    queue_z = None  # the reference's global queue: every emulated rank's step-1 z of the assignment crops
    for step, batch in enumerate(batches):
        key = (args.seed, "train", 0, step)
        if world_size > 1:
            views = next(S.view_batches(run, data["train_x"], [batch], [key], run.groups))
            loss = S.train_step(run, views, step)[0]  # its metrics: the loss first
            dist.all_reduce(loss)  # the loss every rank logs: the mean of the per-rank losses
            loss = loss / world_size
        else:  # emulate `world` ranks: per-rank forward (BN), global Sinkhorn and loss, one optimizer step
            ranks = [SimpleNamespace(**{**vars(run), "rank": r, "world_size": world}) for r in range(world)]
            shares = [next(S.view_batches(rk, data["train_x"], [batch], [key], run.groups)) for rk in ranks]
            with torch.no_grad():  # as train_step: unit prototypes before the forward
                model.prototypes.weight.copy_(F.normalize(model.prototypes.weight, dim=1))
            outs = [model(x) for x in shares]  # per rank: z [n_crops * b, D], scores [n_crops * b, K]
            z = torch.cat([o[0].view(n_crops, b, -1) for o in outs], 1)  # [n_crops, B, D], crop-major
            sc = torch.cat([o[1].view(n_crops, b, -1) for o in outs], 1)  # [n_crops, B, K]
            queue_scores = None
            if queue_z is not None:
                queue_scores = list(queue_z @ model.prototypes.weight.detach().T)
            loss = S.swav_loss(
                list(sc), args.temperature, args.epsilon, args.sinkhorn_iters, args.crops_for_assign, queue_scores
            )
            queue_z = z[list(args.crops_for_assign)].detach()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss = loss.detach()
        losses.append(loss)
        saved[f"grads{step + 1}"] = {k: sample(p.grad) for k, p in model.named_parameters()}
        saved[f"weights{step + 1}"] = {k: sample(p) for k, p in model.named_parameters()}  # BN stats stay per rank
        if step == 0:  # the reference's step 2 starts from the DDP run's state (tests/ddp_handoff.py)
            hand_off("swav", model, opt, rank, world_size, out, state_dir)
    saved["queue_full"] = run.queue.filled == run.queue.z.shape[1] if world_size > 1 else True
    saved["losses"] = torch.stack(losses)
    torch.save(saved, out / f"rank{rank}.pt")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
