"""Two GroCo training steps (multi-crop views, per-view forwards, the group-ordering loss with negatives from the
global batch, backward, SGD step) on the first two global batches of epoch 0 of the cifar recipe, once with stop-grad
(official) and once without (the gathered negatives then carry gradient back across ranks).

Run under torchrun (DDP, gloo) or as a plain process; rank r saves, per variant, its losses (the mean of the rank
losses, as logged), both steps' gradients and the updated weights to OUT/rank{r}.pt (and rank 0 of a DDP run its state
after step 1 to OUT/state1-VARIANT.pt). With --emulate-ranks K (single
process), the model runs on each of K contiguous image shares separately, so BatchNorm sees exactly what each DDP
rank's BatchNorm sees (PyTorch's SyncBN is GPU-only: CPU/gloo runs keep per-rank BN), while groco_loss runs once on the
global batch (each view's embeddings concatenated over the ranks, rank-major rows): negatives over all B images,
positives per row, the mean over all rows (= the mean of the per-rank means): the reference a K-rank DDP run must
equal. K = topk_neg = 9 hardest negatives with 8 images per rank: a rank-local top-k (7 candidates) cannot exist.
CRUCIAL: the reference takes step 2 from the DDP run's state after step 1 (--state1-dir DDP_OUT), not from its own,
which differs by float32 rounding (tests/ddp_handoff.py says why).
Usage: python tests/groco_ddp_step.py DATA_DIR OUT [--emulate-ranks K --state1-dir DDP_OUT]"""

import dataclasses
import sys
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import groco_imagenet as G  # noqa: E402
from ddp_handoff import hand_off  # noqa: E402

VARIANTS = {"stop_grad": True, "no_stop_grad": False}


def two_steps(args, data, rank: int, world_size: int, world: int, device, tag: str, out: Path, state_dir) -> dict:
    """Two steps from the seeded initial model, as run_training builds them (SGD, per-step LR); the reference's step 2
    from the DDP run's state after step 1 (tests/ddp_handoff.py)."""
    torch.manual_seed(args.seed)  # the same initial model on every rank
    model = G.GroCo(args.arch, args.proj_dim).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=G.scaled_lr(args), momentum=args.momentum, weight_decay=args.weight_decay)
    run = SimpleNamespace(
        args=args,
        model=model,
        ddp_model=torch.nn.parallel.DistributedDataParallel(model) if world_size > 1 else model,
        opt=opt,
        scaler=torch.amp.GradScaler("cuda", enabled=False),
        autocast=nullcontext(),
        fmt=torch.contiguous_format,
        rank=rank,
        world_size=world_size,
        device=device,
        groups=G.crop_groups(args),
    )
    spe = len(data["train_y"]) // args.batch_size
    saved = dict(init={k: p.detach().clone() for k, p in model.named_parameters()})
    batches = G.epoch_batches(len(data["train_y"]), args.batch_size, args.seed, 0)[:2]
    losses = []
    for step, batch in enumerate(batches):
        for group in opt.param_groups:
            group["lr"] = G.lr_at(step, args, spe)
        key = (args.seed, "train", 0, step)
        if world_size > 1:
            views = next(G.view_batches(run, data["train_x"], [batch], [key], run.groups))
            loss = G.train_step(run, views, step)[0]
            dist.all_reduce(loss)  # the loss every rank logs: the mean of the per-rank losses
            loss = loss / world_size
        else:  # emulate `world` ranks: per-rank forward (BN), the loss on the global batch, one optimizer step
            ranks = [SimpleNamespace(**{**vars(run), "rank": r, "world_size": world}) for r in range(world)]
            shares = [next(G.view_batches(rk, data["train_x"], [batch], [key], run.groups)) for rk in ranks]
            outs = [model(x) for x in shares]  # per rank: one embedding [b, D] per view (2 global + 2 local)
            views = [torch.cat([o[v] for o in outs]) for v in range(len(outs[0]))]  # [B, D], rank-major rows
            loss = G.groco_loss(views, args.topk_neg, args.steepness, args.n_large, args.stop_grad)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss = loss.detach()
        losses.append(loss)
        saved[f"grads{step + 1}"] = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
        if step == 0:
            saved["weights1"] = {k: p.detach().clone() for k, p in model.named_parameters()}
            hand_off(tag, model, opt, rank, world_size, out, state_dir)
    saved["losses"] = torch.stack(losses)
    saved["weights"] = {k: p.detach().clone() for k, p in model.named_parameters()}  # BN running stats stay per rank
    return saved


def main():
    data_dir, out = sys.argv[1], Path(sys.argv[2])
    opts = dict(zip(sys.argv[3::2], sys.argv[4::2]))  # --emulate-ranks K, --state1-dir DIR
    emulate, state_dir = int(opts.get("--emulate-ranks", 1)), opts.get("--state1-dir")
    args = dataclasses.replace(
        G.CIFAR_PROXY,
        dataset="imagefolder",
        data_dir=data_dir,
        batch_size=16,  # global: 8 images per rank
        topk_neg=9,  # > the 7 other images of a rank: only the global batch (15 candidates) has 9 negatives
        n_small=2,  # multi-crop: 2 x 32 px positives + 2 x 16 px local crops (n_pos_augs 2, sorters of 10 and 11)
        small_size=16,
        small_scale=(0.08, 0.5),
        arch="resnet18",
        proj_dim=32,
        epochs=1,
        warmup_epochs=0,
        lr=2.0,  # x 16/32 = 1: the weights move far beyond the tolerances
        device="cpu",
    )
    rank, world_size, device = G.setup_distributed("cpu")
    world = max(world_size, emulate)
    data = G.load_data(args)
    saved = {}
    for name, stop_grad in VARIANTS.items():
        variant = dataclasses.replace(args, stop_grad=stop_grad)
        saved[name] = two_steps(variant, data, rank, world_size, world, device, name, out, state_dir)
    torch.save(saved, out / f"rank{rank}.pt")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
