"""One EMP-SSL training step (patches, forward, loss, backward, LARS step) on the first global batch of epoch 0.

Run under torchrun (DDP, gloo) or as a plain process; rank r saves its loss, gradients and updated weights to
OUT/rank{r}.pt. With --emulate-ranks K (single process), the model runs on each of K contiguous image shares
separately, so BatchNorm sees exactly what each DDP rank's BatchNorm sees (per-rank BN, like the official
DataParallel), and the loss covers the whole global batch: the reference a K-rank DDP step must equal.
Usage: python tests/empssl_ddp_step.py DATA_DIR OUT [--emulate-ranks K]"""

import dataclasses
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import empssl_cifar as E  # noqa: E402


def main():
    data_dir, out = sys.argv[1], Path(sys.argv[2])
    emulate = int(sys.argv[4]) if len(sys.argv) > 4 and sys.argv[3] == "--emulate-ranks" else 1
    args = E.Args(
        dataset="imagefolder",
        data_dir=data_dir,
        batch_size=8,
        n_patches=3,
        arch="resnet18",
        hidden_dim=64,
        z_dim=16,
        device="cpu",
    )
    rank, world_size, device = E.setup_distributed("cpu")
    data = E.load_data(args)
    torch.manual_seed(args.seed)
    model = E.EMPSSL(args.arch, args.hidden_dim, args.z_dim)
    net = torch.nn.parallel.DistributedDataParallel(model) if world_size > 1 else model
    opt = E.LARS(
        E.param_groups(model, args.weight_decay),
        lr=args.lr,
        momentum=args.momentum,
        nesterov=True,
        weight_decay=args.weight_decay,
        eta=args.lars_eta,
        clip=True,
    )
    batch = E.epoch_batches(len(data["train_x"]), args.batch_size, args.seed, 0)[0]
    key = (args.seed, "train", 0, 0)
    # the same draws as the training loop's first step; each (emulated) rank gets its share of the global batch
    shares = [
        next(
            E.patch_batches(data["train_x"], [batch], [key], args.n_patches, args, device, r, max(world_size, emulate))
        )
        for r in ([rank] if world_size > 1 else range(emulate))
    ]
    z = torch.cat([net(x)[0].view(args.n_patches, -1, args.z_dim) for x in shares], 1)  # [P, B_local, D]
    loss, inv, tcr = E.empssl_loss(z, args)
    vonmises = E.empssl_loss(z.detach(), dataclasses.replace(args, uniformity_loss="vonmises"))[2]  # global batch too
    loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    opt.step()
    if world_size > 1:  # the loss every rank logs: the mean of the per-rank losses (the TCR part is global)
        dist.all_reduce(loss.detach())
        loss = loss / world_size
    weights = {k: p.detach() for k, p in model.named_parameters()}  # BN running stats stay per rank, as in DDP
    torch.save(
        dict(loss=loss.detach(), tcr=tcr.detach(), vonmises=vonmises, grads=grads, weights=weights),
        out / f"rank{rank}.pt",
    )
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
