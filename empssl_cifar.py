"""EMP-SSL: Towards Self-Supervised Learning in One Training Epoch (Tong, Chen, Ma, LeCun, 2023), arXiv 2304.03977.

What we reproduce: EMP-SSL on CIFAR-10/100 with a ResNet-18 (CIFAR stem). Every image is cut into P heavily augmented
16x16 patches (upsampled to 32x32); the loss pulls each patch embedding towards its image's mean embedding (invariance)
while a Total Coding Rate term, computed per patch index over the batch, spreads the embeddings. The representation is
the 4096-d `h` averaged over 128 random patches ("bag of features"), read out by a linear probe and a weighted k-NN.
Official code: tsb0601/EMP-SSL; spec: ../shared/specs/empssl.md.

Runs (one GPU each unless torchrun is shown; the official README numbers are linear top-1 on the original CIFAR):
    python empssl_cifar.py                                    # 1 epoch of a 2-epoch cosine, P=20: README 84.2%
    python empssl_cifar.py --epochs 2 --eval-every-steps 500  # the same cosine to its end, evaluated after each epoch
    python empssl_cifar.py --n-patches 200                    # paper abstract: 85.1% after 1 epoch
    python empssl_cifar.py --epochs 10 --lr-epochs 10         # README multi-epoch table: 90.7%
    python empssl_cifar.py --dataset cifar100                 # README: 58.5%
    torchrun --nproc_per_node=8 empssl_cifar.py --n-patches 200 --sync-bn
    python empssl_cifar.py --dataset imagefolder --data-dir DIR --batch-size 16 --n-patches 4 --eval-patches 4 \\
        --arch resnet18 --device cpu --out-dir OUT   # quick CPU run: under a minute on 200 images (train/, test/)
Other datasets (official README, linear top-1): its ImageNet patches (aug4img.py: 224 px, bicubic, aspect ratio in
(3/4, 4/3)), torchvision's ResNet-18; Tiny-ImageNet as unzipped, ImageNet-100 (CMC's classes) in train/ and val/:
    I="--dataset imagefolder --arch resnet18 --patch-aug imagenet --patch-size 224"
    X="--n-patches 200 --epochs 10 --lr-epochs 10"
    python empssl_cifar.py $I --data-dir tiny-imagenet-200 --image-size 64               # Tiny-ImageNet 1 epoch: 38.1%
    python empssl_cifar.py $I --data-dir imagenet100 --image-size 256                     # ImageNet-100 1 epoch: 58.5%
    torchrun --nproc_per_node=4 empssl_cifar.py $I $X --data-dir tiny-imagenet-200 --image-size 64  # 10 ep: 51.5%
    torchrun --nproc_per_node=4 empssl_cifar.py $I $X --data-dir imagenet100 --image-size 256       # 10 ep: 78.9%
kachayev/ssl-in-one-epoch README notes on CIFAR-10 (K: his LR schedule, solarize threshold, probe LR and bag size):
    K="--lr-schedule epoch-cosine-kachayev --solarize-threshold 192 --probe-lr 0.0075 --eval-patches 20"
    V="--uniformity-loss vonmises --inv-weight 1.5 --emb-pool proj --z-dim 4096 --epochs 10 --lr-epochs 10"
    python empssl_cifar.py $K $V --hidden-dim 2048  # mean z as the embedding: "similar output performance" (no number)
    python empssl_cifar.py $K $V --hidden-dim 256   # "84+% top1 accuracy on 20 patches"

Deviations (each marked `# DEVIATION:` below): patches are augmented on the GPU in batches (tests compare them with the
official PIL pipeline); bf16 autocast with channels_last (official: fp32; TCR log-det in fp64); a Cholesky log-det in
the Sylvester (B x B) form; seeded, resumable random streams; the TCR is computed over the global batch under DDP
(all-gather with gradient), which equals the official single-process semantics. Inferred from the code: Tiny-ImageNet's
settings (its one Tiny-ImageNet path, commented out, sits in the ImageNet branch: aug4img.py; its resnet18-tinyimagenet
is torchvision's ResNet-18); kachayev's "loss weight set to 1.5 instead of 200.0" as --inv-weight 1.5 (200: his
invariance default), 10 epochs for his h=256 note (the note before trains 10). DEVIATION: ImageNet-100 patches are cut
from --image-size 256 centre squares decoded once, not from the full photos; the cosine spans the real epochs (the
official T_max counts 50,000 images an epoch on every dataset: it reaches 0 early, rises again)."""

import dataclasses
import hashlib
import json
import math
import os
import platform
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Literal, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
import tyro
from torchvision.io import ImageReadMode, decode_image, decode_jpeg, read_file
from torch.utils._python_dispatch import TorchDispatchMode
from torchvision.transforms import v2 as T
from tqdm import tqdm

from common.checkpoint import ArtifactCache, CheckpointError, init_weights, own_checkpoint, resume_state
from common.checkpoint import save_checkpoint, save_state, state_dict_digest, strip_prefix, torchvision_resnet
from common.resnet import RESNETS


# ==== 1. ARGS ====
@dataclass
class Args:
    # --- I/O & experiment
    exp_name: str = "empssl"
    """name stored in results.json"""
    seed: int = 0
    """seed for the model init, the data order and every augmentation draw (the official code is unseeded)"""
    out_dir: str = "runs/empssl"
    """where last.pt, backbone.pt, log.jsonl, results.json and the feature cache go; an existing last.pt is resumed"""
    resume: Optional[str] = None
    """resume from this checkpoint instead of out_dir/last.pt"""
    init: Optional[str] = None
    """start from these weights (a run resumed from last.pt or --resume ignores them; README: Use released weights)"""
    save_every_steps: int = 100
    """also save out_dir/last.pt every this many steps, so a kill mid-epoch loses little (0: only at epoch ends)"""
    # --- data
    dataset: Literal["cifar10", "cifar100", "imagefolder", "fake"] = "cifar10"
    """cifar10/cifar100 via torchvision; imagefolder: train/ and test/ (or val/), or Tiny-ImageNet unzipped; fake"""
    data_dir: str = "data"
    """dataset root (torchvision CIFAR root, or the image folder)"""
    download: bool = True
    """let torchvision download CIFAR when it is not in --data-dir"""
    image_size: int = 32
    """image folders are resized (shorter side) and centre-cropped to this size once, at load time"""
    # --- patches (spec 2.1)
    n_patches: int = 20
    """P, augmented patches per image per step (official README commands: 20; the paper's best runs: 200)"""
    crop_scale: float = 0.25
    """fraction of the image area each patch covers (official RandomResizedCrop scale=(0.25, 0.25))"""
    solarize_threshold: int = 128
    """PIL solarize threshold (official: PIL default 128; kachayev used 192)"""
    patch_aug: Literal["cifar", "imagenet"] = "cifar"
    """cifar: square crops, bilinear (official dataset/aug.py); imagenet: aspect ratio (3/4, 4/3), bicubic (aug4img)"""
    patch_size: Optional[int] = None
    """side of the patches the network sees (official: 32 on CIFAR, 224 with aug4img.py; None: --image-size)"""
    # --- model (spec 3)
    arch: str = "resnet18-cifar"
    """backbone from common/resnet.py: resnet18-cifar (3x3 stem, no max-pool), resnet18 or resnet50"""
    hidden_dim: int = 4096
    """width of pre_feature (h, the evaluated representation) and of the projection's hidden layer"""
    z_dim: int = 1024
    """dimension of the L2-normalised embedding z"""
    emb_pool: Literal["features", "proj"] = "features"
    """evaluated representation: features = h (official); proj = the mean z (kachayev's --emb_pool proj)"""
    weight_init: Literal["torch", "kachayev"] = "torch"
    """torch: framework defaults (official); kachayev: Linear weights N(0, 1e-3), biases 0"""
    sync_bn: bool = False
    """SyncBatchNorm under DDP (BN over the global batch); off = per-rank BN like the official DataParallel"""
    # --- method (spec 4)
    eps: float = 0.2
    """TCR eps, used as is (it plays the role of the paper's eps^2; official --eps 0.2)"""
    inv_weight: float = 200.0
    """weight of the invariance term (official --patch_sim 200)"""
    uniformity_loss: Literal["tcr", "vonmises"] = "tcr"
    """tcr (official) or vonmises: kachayev's log mean exp(-2 |zbar_i - zbar_j|^2) over the images' mean embeddings"""
    tcr_weight: float = 1.0
    """weight of the uniformity term, TCR or vonmises (official --tcr 1; kachayev's --uniformity_loss_weight 1)"""
    # --- optimisation (spec 5)
    # DEVIATION (inferred, spec 5.3): the "1 epoch" table is read as epoch 1 of the official --epoch 2 run (not stated)
    epochs: int = 1
    """epochs to train; the paper's '1 epoch' result is epoch 1 of a 2-epoch cosine (see --lr-epochs)"""
    lr_epochs: Optional[int] = 2
    """epochs the LR schedule spans (official --epoch 2 for the 1-epoch table); None: --epochs"""
    max_steps: Optional[int] = None
    """stop training after this many steps in total (compute-matched runs; 0: evaluate the untrained network)"""
    batch_size: int = 100
    """images per step, global over all ranks (official 100); each image contributes P patches"""
    lr: float = 0.3
    """learning rate (official 0.3 at batch 100; the official code applies no scaling rule, nor do we)"""
    lr_schedule: Literal["step-cosine", "epoch-cosine-kachayev", "constant"] = "step-cosine"
    """step-cosine: official per-step cosine to 0, no warm-up; epoch-cosine-kachayev: kachayev's per-epoch variant"""
    momentum: float = 0.9
    """SGD momentum, Nesterov (official)"""
    weight_decay: float = 1e-4
    """weight decay of matrices inside LARS; biases and norms get none (official)"""
    lars_eta: float = 0.005
    """LARS trust coefficient, with clipping (official LARSWrapper eta=0.005, clip=True)"""
    # --- evaluation (spec 6)
    eval_patches: int = 128
    """patches averaged into each image's feature (official --test_patches 128); 0 skips evaluation"""
    eval_memory_gb: float = 2.0
    """activation memory one evaluation forward may use: patches are encoded in chunks sized to it (memory knob only)"""
    eval_every: int = 0
    """also evaluate (k-NN and probe) every this many epochs, not after the last (0: only at the end)"""
    eval_every_steps: int = 0
    """also evaluate (k-NN and probe) every this many steps, for accuracy within an epoch (0: only at the end)"""
    eval_whole_image: bool = False
    """also report k-NN and probe on whole unaugmented images (spec 6.4: the gap is large)"""
    probe_epochs: int = 100
    """linear-probe epochs on the frozen features (official 100)"""
    probe_lr: float = 0.03
    """linear-probe SGD LR, cosine over the epochs (official evaluate.py default 0.03)"""
    probe_wd: float = 5e-5
    """linear-probe weight decay (official)"""
    probe_batch_size: int = 100
    """linear-probe batch (official 100)"""
    knn_k: int = 20
    """neighbours of the weighted k-NN (official 20)"""
    knn_t: float = 0.07
    """temperature of the k-NN vote weights exp(sim/t) (official 0.07)"""
    # --- system
    device: Optional[str] = None
    """cuda or cpu (default: cuda when available); under torchrun each rank takes cuda:LOCAL_RANK"""
    amp: Literal["bf16", "fp16", "none"] = "bf16"
    """autocast precision on CUDA (CPU runs in fp32); losses are always fp32 (the TCR log-det fp64)"""
    channels_last: bool = True
    """channels_last memory format on CUDA"""
    compile: bool = False
    """torch.compile the model"""
    deterministic: bool = False
    """deterministic algorithms (slower); otherwise cudnn.benchmark"""
    log_every: int = 25
    """steps between progress-bar/log.jsonl updates (each costs one host sync)"""
    bench_ceiling_steps: int = 0
    """time a bare forward+backward on synthetic patches right after each of this many training steps (ceiling_ratio)"""
    bench_data_steps: int = 0
    """before training, time this many steps of the data pipeline alone (patches, colour): can it keep up?"""


def parse_args(argv: Optional[list] = None) -> Args:
    return tyro.cli(Args, args=argv)


# ==== 2. VIEWS ====
PATCH_AUGS = {"cifar": ((1.0, 1.0), False), "imagenet": ((3 / 4, 4 / 3), True)}  # --patch-aug: (ratio, bicubic)


def sample_patch_params(gen: torch.Generator, n: int, size: int, scale: float, ratio=(1.0, 1.0)) -> dict:
    """Random draws of the official patch transform for n patches of size x size images (spec 2.1), on the
    generator's device; the crop as RandomResizedCrop(scale=(scale, scale), ratio) draws it."""

    def u(lo, hi, *shape):
        return lo + (hi - lo) * torch.rand(n, *shape, generator=gen, device=gen.device)

    aspect = torch.exp(u(math.log(ratio[0]), math.log(ratio[1])))  # PAPER: a fixed area, log-uniform aspect ratio
    h, w = [(scale * size**2 / a).sqrt().round().clamp(1, size) for a in (aspect, 1 / aspect)]  # CIFAR: 16 x 16
    return dict(
        h=h, w=w, y0=(u(0, 1) * (size - h + 1)).floor(), x0=(u(0, 1) * (size - w + 1)).floor(),  # uniform position
        flip=u(0, 1) < 0.5,                                                      # RandomHorizontalFlip(p=0.5)
        jitter=u(0, 1) < 0.8,                                                    # RandomApply(ColorJitter, p=0.8)
        factors=torch.cat([u(0.6, 1.4, 3), u(-0.2, 0.2, 1)], 1),                 # ColorJitter(0.4, 0.4, 0.4, 0.2)
        order=torch.rand(n, 4, generator=gen, device=gen.device).argsort(1),    # ColorJitter's random op order
        gray=u(0, 1) < 0.2,                                                      # RandomGrayscale(p=0.2)
        blur=u(0, 1) < 0.1, sigma=u(0.1, 2.0),                                   # GBlur(p=0.1), sigma ~ U(0.1, 2)
        solarize=u(0, 1) < 0.1,                                                  # RandomApply(Solarization, p=0.1)
    )  # fmt: skip


def resize_weights(start: torch.Tensor, length: torch.Tensor, size: int, out: int, cubic: bool) -> torch.Tensor:
    """[n, out, size]: out samples of pixels start..start+length-1 of a size-long axis, as PIL resizes a crop: triangle
    or a=-0.5 cubic kernel, widened by the scale when shrinking (antialias), taps inside the crop, renormalised."""
    scale = (length / out).view(-1, 1, 1)  # crop pixels per output pixel
    centre = (torch.arange(out, device=start.device).view(1, -1, 1) + 0.5) * scale  # [n, out, 1], in the crop
    j = torch.arange(size, device=start.device) - start.view(-1, 1, 1)  # [n, 1, size]: every pixel, in the crop
    t = ((j + 0.5 - centre) / scale.clamp(min=1)).abs()
    bicubic = torch.where(t < 1, (1.5 * t - 2.5) * t * t + 1, -0.5 * (((t - 5) * t + 8) * t - 4) * (t < 2))
    w = (bicubic if cubic else (1 - t).clamp(min=0)) * ((j >= 0) & (j < length.view(-1, 1, 1)))
    return w / w.sum(-1, keepdim=True)


def augment_patches(images: torch.Tensor, p: dict, size: int, solarize_threshold: int, cubic=False) -> torch.Tensor:
    """The official patch transform (spec 2.1), batched: uint8 images [n, 3, S, S] (one per patch), draws p -> float
    [n, 3, size, size] in [-1, 1]. DEVIATION: float arithmetic, not PIL's uint8 rounding after every op, and an exact
    Gaussian, not PIL's box blur; tests/test_empssl_units.py compares the statistics with the official PIL pipeline."""
    wy, wx = (resize_weights(p[a], p[n], images.shape[-1], size, cubic) for a, n in (("y0", "h"), ("x0", "w")))
    x = (wy[:, None] @ images.float().div_(255) @ wx[:, None].transpose(-1, -2)).clamp_(0, 1)  # PAPER: crop, resize
    x = torch.where(p["flip"][:, None, None, None], x.flip(-1), x)
    x = color_jitter(x, p["factors"], p["order"], p["jitter"])
    x = torch.where(p["gray"][:, None, None, None], grayscale(x).expand_as(x), x)
    x = torch.where(p["blur"][:, None, None, None], gaussian_blur(x, p["sigma"]), x)
    # CRUCIAL: PIL solarize inverts pixels >= threshold on the 0..255 scale (official threshold 128, not 192)
    x = torch.where(p["solarize"][:, None, None, None] & (x >= solarize_threshold / 255), 1 - x, x)
    return (x - 0.5) / 0.5  # PAPER: Normalize(mean=0.5, std=0.5), not the CIFAR statistics


def patch_batches(images: torch.Tensor, batches: list, keys: list, n_patches: int, args: Args, device, rank=0, world=1):
    """This rank's patch batches [P*b, 3, s, s] of `images` (uint8 [N, 3, S, S], on the device), patch-major (row
    p*b + i: patch p of image i, as official). Draws depend only on a batch's key and the global batch (each rank keeps
    its share): 2 ranks see the patches of 1, a resume those of an unbroken run. DEVIATION: seeded, not global RNGs."""
    (ratio, cubic), size = PATCH_AUGS[args.patch_aug], args.patch_size or images.shape[-1]
    gen = torch.Generator(device=device)
    for idx, key in zip(batches, keys):
        b = len(idx) // world
        gen.manual_seed(rng_seed(*key))
        p = sample_patch_params(gen, n_patches * len(idx), images.shape[-1], args.crop_scale, ratio)  # global batch
        mine = slice(rank * b, (rank + 1) * b)  # this rank's images of the global batch
        sel = torch.arange(n_patches * len(idx), device=device).view(n_patches, -1)[:, mine].flatten()  # patch-major
        p = {k: v[sel] for k, v in p.items()}
        yield augment_patches(images[idx[mine].to(device).repeat(n_patches)], p, size, args.solarize_threshold, cubic)


# ==== 3. MODEL ====
class EMPSSL(nn.Module):
    """ResNet backbone -> pre_feature (h, evaluated) -> projection -> L2-normalised z (spec 3)."""

    def __init__(self, arch: str, hidden_dim: int, z_dim: int, weight_init: str = "torch"):
        super().__init__()
        self.backbone, h = RESNETS[arch](), hidden_dim
        self.pre_feature = nn.Sequential(nn.Linear(self.backbone.num_features, h), nn.BatchNorm1d(h), nn.ReLU())
        self.projection = nn.Sequential(nn.Linear(h, h), nn.BatchNorm1d(h), nn.ReLU(), nn.Linear(h, z_dim))
        for m in (m for m in self.modules() if weight_init == "kachayev" and isinstance(m, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, 1e-3)  # kachayev/ssl-in-one-epoch: Linear weights N(0, 1e-3), zero biases
            nn.init.zeros_(m.bias)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.pre_feature(self.backbone(x))  # h: [N, hidden_dim], >= 0

    def forward(self, x: torch.Tensor) -> tuple:
        h = self.encode(x)
        return F.normalize(self.projection(h).float(), dim=-1), h  # z: [N, z_dim], unit norm, fp32; h


# ==== 4. LOSS ====
def tcr_loss(z: torch.Tensor, eps: float) -> torch.Tensor:
    """Negative total coding rate, -R(Z) with R(Z) = 1/2 logdet(I_D + D/(N eps) Z^T Z) (spec 4.1-4.2). z: [N, D] rows,
    not normalised here; [P, N, D] gives the mean of -R over P (spec 4.3). eps is used as is (the paper's eps^2).
    DEVIATION: the Sylvester form logdet(I + A^T A) = logdet(I + A A^T) on the smaller Gram matrix and a Cholesky
    log-det in fp64 (the B x B matrices are tiny; no TF32 or bf16); the official code: torch.logdet, D x D, fp32."""
    with torch.autocast(z.device.type, enabled=False):
        z = z.double()
        n, d = z.shape[-2:]
        gram = z @ z.transpose(-1, -2) if n <= d else z.transpose(-1, -2) @ z
        eye = torch.eye(gram.shape[-1], device=z.device, dtype=z.dtype)
        chol, _ = torch.linalg.cholesky_ex(eye + (d / (n * eps)) * gram)  # _ex: no host sync on the info flag
        rate = torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)  # 1/2 logdet = sum log diag(L)
        return -rate.mean().float()


def invariance_loss(z: torch.Tensor) -> torch.Tensor:
    """-(1/(P B)) sum_{p,b} cos(z[p, b], zbar[b]) with zbar the plain mean over patches (spec 4.4); z: [P, B, D].
    CRUCIAL: zbar is neither re-normalised nor detached (official)."""
    zbar = z.mean(0, keepdim=True)
    return -F.cosine_similarity(z, zbar, dim=-1).mean()


def vonmises_loss(zbar: torch.Tensor, t: float = 2.0) -> torch.Tensor:
    """kachayev's --uniformity_loss vonmises: log of the mean Gaussian potential exp(-t |zbar_i - zbar_j|^2) over the
    pairs i < j of the images' mean embeddings zbar: [B, D] (not re-normalised; t = 2, his default)."""
    return torch.pdist(zbar.float(), p=2).pow(2).mul(-t).exp().mean().log()


def empssl_loss(z: torch.Tensor, args: Args) -> tuple:
    """z: this rank's [P, B_local, D]. Returns (total, invariance, uniformity: -TCR or vonmises), fp32 (spec 4.5).
    CRUCIAL: the uniformity term covers the global batch (each rank's z is gathered with gradient), as in the official
    single-process code; the invariance term is per image, and DDP's gradient averaging makes it the global mean."""
    inv, z = invariance_loss(z), gather_with_grad(z.transpose(0, 1)).transpose(0, 1)  # z: [P, B_global, D]
    unif = tcr_loss(z, args.eps) if args.uniformity_loss == "tcr" else vonmises_loss(z.mean(0))
    return args.inv_weight * inv + args.tcr_weight * unif, inv, unif


# ==== 5. OPTIMIZER & SCHEDULES ====
def param_groups(model: nn.Module, weight_decay: float) -> list:
    """Matrices and convs: LARS + weight decay. 1-D tensors (biases, norms): neither (official exclude_bias_n_norm)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    return [dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0.0, lars=False)]


def lr_at(step: int, args: Args, steps_per_epoch: int) -> float:
    """Learning rate for global step `step` (0-based): a pure function of the step, so resuming needs no state."""
    total_epochs = args.lr_epochs or args.epochs
    if args.lr_schedule == "constant":
        return args.lr
    if args.lr_schedule == "epoch-cosine-kachayev":  # CosineAnnealingLR(T_max=(len(loader)//bs)*epochs) per epoch
        t_max = max(1, (steps_per_epoch // args.batch_size) * total_epochs)
        return args.lr * 0.5 * (1 + math.cos(math.pi * (step // steps_per_epoch) / t_max))
    # PAPER: CosineAnnealingLR(eta_min=0) per step, no warm-up; DEVIATION: T_max from the real epochs (official: 50k/bs)
    return args.lr * 0.5 * (1 + math.cos(math.pi * step / (steps_per_epoch * total_epochs)))


# ==== 6. TRAIN STEP ====
def train_batches(run: SimpleNamespace, epoch: int, start: int, last: int):
    """This rank's patch batches [P * B_local, 3, S, S] for steps start..last-1 of `epoch` (keyed by epoch and step)."""
    args, device = run.args, run.device
    batches = epoch_batches(len(run.data["train_x"]), args.batch_size, args.seed, epoch, device)[start:last]
    keys = [(args.seed, "train", epoch, s) for s in range(start, last)]
    return patch_batches(run.data["train_x"], batches, keys, args.n_patches, args, device, run.rank, run.world_size)


def train_step(run: SimpleNamespace, x: torch.Tensor, step: int) -> torch.Tensor:
    """One EMP-SSL step on this rank's patches: forward, loss (spec 4.5), backward, LARS. Returns [loss, cos, R]."""
    with run.autocast:
        z, _ = run.ddp_model(x.contiguous(memory_format=run.fmt))
    loss, inv, tcr = empssl_loss(z.view(run.args.n_patches, -1, z.shape[-1]), run.args)
    run.opt.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    run.scaler.step(run.opt)
    run.scaler.update()
    return torch.stack([loss, -inv, -tcr]).detach()  # cos to the image's mean embedding, the coding rate R


# ==== 7. TRAINING ====
def official_pt(obj) -> Optional[dict]:
    """--init format: tsb0601/EMP-SSL main.py's save_models/<epoch>.pt (nn.DataParallel of model/model.py's encoder)"""
    return strip_prefix(obj, "module.") if isinstance(obj, dict) and "module.pre_feature.0.weight" in obj else None


CIFAR = {"cifar10": (torchvision.datasets.CIFAR10, 10), "cifar100": (torchvision.datasets.CIFAR100, 100)}
INIT_FORMATS = {"last.pt": own_checkpoint, "official <epoch>.pt": official_pt, "torchvision ResNet": torchvision_resnet}


def load_data(args: Args) -> dict:
    """uint8 images [N, 3, S, S] and int64 labels for both splits, on the CPU."""
    root, s = Path(args.data_dir), args.image_size
    if args.dataset == "fake":  # random images, for shape tests only
        x = torch.randint(0, 256, (320, 3, s, s), dtype=torch.uint8, generator=torch.Generator().manual_seed(args.seed))
        splits, num_classes = [(x[:256], torch.arange(256) % 10), (x[256:], torch.arange(256, 320) % 10)], 10
    elif args.dataset == "imagefolder" and (root / "val" / "val_annotations.txt").is_file():
        splits, num_classes = tiny_imagenet(root, s)
    elif args.dataset == "imagefolder":
        train_root, test_root, classes = folder_splits(root)
        splits, num_classes = [load_image_folder(split, classes, s) for split in (train_root, test_root)], len(classes)
    else:
        cls, num_classes = CIFAR[args.dataset]
        try:
            sets = [cls(str(root), train=train, download=args.download) for train in (True, False)]
        except (RuntimeError, OSError) as e:  # "Dataset not found or corrupted", or a failed download (no network?)
            offline = "without network, give a copy in --data-dir (torchvision's layout) or use --dataset imagefolder"
            raise RunError(f"could not download {args.dataset} into {root} ({e}); {offline}" if args.download else
                           f"{args.dataset} not found in {root} ({e}); pass its --data-dir, or --download")  # fmt: skip
        splits = [(torch.from_numpy(d.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(d.targets)) for d in sets]
    (train_x, train_y), (test_x, test_y) = splits
    return dict(train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y, num_classes=num_classes)


def tiny_imagenet(root: Path, size: int) -> tuple:
    """([train, val] splits, number of classes) of Tiny-ImageNet as unzipped: train/<wnid>/images/*.JPEG,
    val/images/*.JPEG labelled by val/val_annotations.txt (file, wnid, box); its test/ has no labels and is not read."""
    train, val, ann = root / "train", root / "val" / "images", root / "val" / "val_annotations.txt"
    classes = sorted(d.name for d in train.iterdir() if d.is_dir()) if train.is_dir() else []
    rows = [ln.split("\t")[:2] for ln in ann.read_text().splitlines() if ln.strip()]
    bad = [r for r in rows if len(r) < 2 or r[1] not in classes or not (val / r[0]).is_file()]
    if not classes or not rows:
        raise RunError(f"Tiny-ImageNet layout needs class folders in {train} and rows in {ann}")
    if bad:
        raise RunError(f"{ann}: row {bad[0]} names no val/images/ file or no class folder of {train}")
    folders = [c + "/images" * (train / c / "images").is_dir() for c in classes]  # for the shared loader
    x, y = decode_files([val / f for f, _ in rows], size, size), torch.tensor([classes.index(w) for _, w in rows])
    return [load_image_folder(train, folders, size), (x, y)], len(classes)


def check_args(args: Args, world_size: int) -> None:
    """Refuse bad input with one clear line, before any data is read or process group created."""
    check_common_args(args, world_size, RESNETS, at_least_1="n_patches lr_epochs hidden_dim z_dim patch_size",
                      at_least_0="eval_patches eval_every", positive="lr eps lars_eta",
                      non_negative="inv_weight tcr_weight momentum")  # fmt: skip
    if not 0 < args.crop_scale <= 1:
        raise RunError(f"--crop-scale must be in (0, 1], got {args.crop_scale}")
    if args.lr_epochs is not None and args.lr_epochs < args.epochs:
        msg = f"--lr-epochs {args.lr_epochs} < --epochs {args.epochs}: the cosine would reach 0 and rise again"
        raise RunError(f"{msg}; pass --lr-epochs {args.epochs} (or None)")
    if args.uniformity_loss == "vonmises" and args.batch_size < 2:  # no pair of images: the mean over pairs is NaN
        raise RunError(f"--uniformity-loss vonmises needs pairs of images: --batch-size {args.batch_size} < 2")


def run_training(args: Args) -> dict:
    """The run: checks, data (on the device), model, LARS, precision, resume, epochs, evaluation, results.json."""
    run = start_run(args)  # DEVIATION: its TF32 also rounds the patch resize with --amp none (~1e-3 < 1/255)
    args, rank, world_size, device = run.args, run.rank, run.world_size, run.device
    max_steps = math.inf if args.max_steps is None else args.max_steps
    run.total_steps = min(run.steps_per_epoch * args.epochs, max_steps)
    run.metrics = ("loss", "cos", "R" if args.uniformity_loss == "tcr" else "-vonmises")  # train_step's, in order
    torch.manual_seed(args.seed)  # the same initial model on every rank
    model = EMPSSL(args.arch, args.hidden_dim, args.z_dim, args.weight_init).to(device, memory_format=run.fmt)
    run.model, run.encode = model, model.encode if args.emb_pool == "features" else lambda x: model(x)[0]  # h or z
    # PAPER: SGD with Nesterov momentum inside LARSWrapper(eta=0.005, clip=True, exclude_bias_n_norm=True)
    groups = param_groups(model, args.weight_decay)
    run.opt = LARS(groups, lr=args.lr, momentum=args.momentum, nesterov=True, eta=args.lars_eta, clip=True)
    run.init = None if resume_state(run, set()) or not args.init else init_weights(model, args.init, INIT_FORMATS)
    if rank == 0 and run.init:  # --init loaded before DDP (every rank the same file); a resumed run ignores it
        print(run.init)
    net = nn.SyncBatchNorm.convert_sync_batchnorm(model) if args.sync_bn and world_size > 1 else model
    if world_size > 1:
        net = nn.parallel.DistributedDataParallel(net, device_ids=[device] if device.type == "cuda" else None)
    run.ddp_model = torch.compile(net) if args.compile else net
    bench = run_benchmarks(run, "patches", args.n_patches)
    train_epochs(run)
    res = evaluate(run, tag="final") if args.eval_patches else {}
    if rank == 0:  # the ResNet alone, torchvision's names: README "Use released weights" loads it
        save_checkpoint({k: v.cpu() for k, v in model.backbone.state_dict().items()}, Path(args.out_dir, "backbone.pt"))
        emb = f"h ({args.hidden_dim}-d)" if args.emb_pool == "features" else f"z ({args.z_dim}-d)"
        protocol = f"bag of {args.eval_patches} random training-transform patches, {emb}, eval-mode BN; linear probe "
        protocol += f"{args.probe_epochs} ep lr {args.probe_lr}; weighted k-NN k={args.knn_k} T={args.knn_t}"
        seen = run.images_seen * args.n_patches
        extra = dict(
            init=run.init, eval_protocol=protocol, patches_seen=seen, patches_per_s=seen / max(run.train_time_s, 1e-9)
        )
        write_results(run, "EMP-SSL (arXiv 2304.03977)", extra, bench, res)
    if dist.is_initialized():
        dist.destroy_process_group()
    return res


def bare_step(run: SimpleNamespace):
    """The ceiling's step: forward+backward of the model on synthetic patches (no augmentation, loss or optimizer)."""
    args, size = run.args, run.args.patch_size or run.data["train_x"].shape[-1]
    bare = EMPSSL(args.arch, args.hidden_dim, args.z_dim).to(run.device, memory_format=run.fmt)
    shape = (args.n_patches * args.batch_size // run.world_size, 3, size, size)
    x = torch.randn(shape, device=run.device).contiguous(memory_format=run.fmt)

    def step():
        with run.autocast:
            z, _ = bare(x)
        z.sum().backward()

    return step


@torch.no_grad()
def encode_bag(run: SimpleNamespace, images: torch.Tensor, split: str, n_patches: int) -> torch.Tensor:
    """The method's own evaluation (official, spec 2.4, 6.1): run.encode (h, eval mode) averaged over n_patches random
    training-transform patches (0: the whole unaugmented image); each rank encodes its share, gathered: [N, hidden], in
    chunks sized to --eval-memory-gb (128 patches of 100 images at once took 16 GB)."""
    args, device, rank, world, n = run.args, run.device, run.rank, run.world_size, len(images)
    run.model.eval()
    mine = torch.arange(math.ceil(n / world) * world, device=device).clamp(max=n - 1).view(world, -1)[rank]  # padded
    size = (args.patch_size or images.shape[-1]) if n_patches else images.shape[-1]
    # each block's patches are drawn from one seed; a block holds <= 100 images, <= the pixels of 128 CIFAR patches each
    blocks = list(mine.split(min(100, max(1, 100 * 128 * 32**2 // (max(n_patches, 1) * size**2)))))
    chunk = inputs_per_chunk(run.encode, torch.zeros(1, 3, size, size, device=device), args.eval_memory_gb)
    keys = [(args.seed, "eval", split, rank, i) for i in range(len(blocks))]
    whole = ((images[c].float() / 255 - 0.5) / 0.5 for c in blocks)  # n_patches=0: the whole unaugmented images
    stream = patch_batches(images, blocks, keys, n_patches, args, device) if n_patches else whole
    feats = []
    for c, x in zip(blocks, tqdm(stream, total=len(blocks), desc=f"encode {split}", disable=rank != 0, leave=False)):
        with run.autocast:  # x: [P * b, 3, S, S], patch-major
            h = torch.cat([run.encode(part.contiguous(memory_format=run.fmt)).float() for part in x.split(chunk)])
        feats.append(h.view(max(n_patches, 1), len(c), -1).mean(0))
    return gather_with_grad(torch.cat(feats))[:n]  # identity on one rank


def evaluate(run: SimpleNamespace, tag: str) -> dict:
    """Bag-of-features encoding of both splits, then weighted k-NN and the linear probe (official func.linear, spec
    6.2) on rank 0. The final features of a 1-process run are cached per weights digest: a rerun skips encoding."""
    args, data, device, nc, res, times = run.args, run.data, run.device, run.data["num_classes"], {}, {}
    use_cache = tag == "final" and run.world_size == 1
    digest = state_dict_digest(run.model.state_dict()) if use_cache else None
    patches = (args.seed, args.crop_scale, args.solarize_threshold, args.patch_aug, args.patch_size, args.emb_pool)
    for prefix, n_patches in [("", args.eval_patches)] + ([("whole_", 0)] if args.eval_whole_image else []):
        cache = ArtifactCache(Path(args.out_dir) / "cache", f"{rng_seed(digest, n_patches, *patches):014x}")
        t0 = time.perf_counter()
        feats = {split: cache.get(split) if use_cache else None for split in ("train", "test")}
        for split in [s for s in feats if feats[s] is None]:
            feats[split] = encode_bag(run, data[f"{split}_x"], split, n_patches)
            if use_cache:
                cache.put(split, feats[split].cpu())
        times[f"{prefix}encode_s"] = time.perf_counter() - t0
        if run.rank == 0:
            xy = [t.to(device) for t in (feats["train"], data["train_y"], feats["test"], data["test_y"])]
            t0 = time.perf_counter()
            res[f"{prefix}knn_top1"], res[f"{prefix}knn_top5"] = knn_eval(*xy, nc, args.knn_k, args.knn_t)
            times[f"{prefix}knn_s"], t0 = time.perf_counter() - t0, time.perf_counter()
            p = linear_probe(*xy, nc, args.probe_epochs, args.probe_lr, args.probe_wd, args.probe_batch_size, args.seed)
            res[f"{prefix}linear_top1"], res[f"{prefix}linear_top1_best"] = p["last"], p["best"]
            times[f"{prefix}probe_s"] = time.perf_counter() - t0
        if run.world_size > 1:
            dist.barrier()
    if run.rank == 0:
        log_jsonl(run, dict(type="eval", tag=tag, step=run.global_step, **res, **times))
        print(f"eval @ {tag} | " + " | ".join(f"{k} {v:.2f}" for k, v in {**res, **times}.items()))
    run.times.update({k: run.times.get(k, 0.0) + v for k, v in times.items()})
    return res


# ==== 8. MAIN ====
# main(args) (SHARED: common) runs run_training; a bad input, a failed run or a stop signal ends in one line.


# ==== SHARED APPENDIX: identical in every script ====


# SHARED: common
class RunError(Exception):
    """Bad input or a failed run: one line, exit 1. every_rank: raised alike on every rank (rank 0 alone prints it)."""

    def __init__(self, message: str, every_rank: bool = False):
        super().__init__(message)
        self.every_rank = every_rank


def rng_seed(*keys) -> int:
    """A 56-bit seed derived from any keys, e.g. (seed, 'train', epoch, step): independent, reproducible streams."""
    return int.from_bytes(hashlib.sha256(repr(keys).encode()).digest()[:7], "little")


def cpus_per_process() -> int:
    """The default DataLoader workers: the CPUs of this process (its affinity) over torchrun's local ranks, <= 10."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(10, cpus // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))


def check_out_dir(out_dir: str) -> None:
    """Create --out-dir and write a file in it before any data is read: a run must not train and then fail to save."""
    probe = Path(out_dir) / f".write-test-{os.getpid()}"
    try:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise RunError(f"--out-dir {out_dir} cannot be written: {e.strerror or e}", every_rank=True)


def check_ranges(args, at_least_1: str = "", at_least_0: str = "", positive: str = "", non_negative: str = "") -> None:
    """One clear line for the first named flag (space-separated; None is unset) out of its range."""
    for names, low, op in ((at_least_1, 1, ">="), (at_least_0, 0, ">="), (positive, 0, ">"), (non_negative, 0, ">=")):
        for name in names.split():
            value = getattr(args, name)
            if value is not None and (value < low if op == ">=" else value <= low):
                raise RunError(f"--{name.replace('_', '-')} must be {op} {low}, got {value}")


def check_common_args(args, world_size: int, archs, at_least_1="", at_least_0="", positive="", non_negative="",
                      scales="", per_rank="batch_size") -> None:  # fmt: skip
    """The checks of every script; the caller names its own flags (as check_ranges; scales: (min, max) in (0, 1])
    and the batches that must divide by the world size (per_rank)."""
    if args.arch not in archs:
        raise RunError(f"unknown --arch {args.arch!r}; choose one of {', '.join(archs)}")
    if args.device is not None and args.device != "cpu" and not args.device.startswith("cuda"):
        raise RunError(f"unknown --device {args.device!r}; use cuda, cuda:N or cpu")
    if args.device is not None and args.device.startswith("cuda") and not torch.cuda.is_available():
        raise RunError(f"--device {args.device} but no CUDA device is available")
    check_ranges(
        args,
        at_least_1="batch_size epochs probe_batch_size probe_epochs knn_k log_every image_size " + at_least_1,
        at_least_0="save_every_steps eval_every_steps max_steps bench_ceiling_steps bench_data_steps " + at_least_0,
        positive="probe_lr knn_t eval_memory_gb " + positive,
        non_negative="weight_decay probe_wd " + non_negative,
    )
    for name in scales.split():
        lo, hi = getattr(args, name)
        if not 0 < lo <= hi <= 1:
            raise RunError(f"--{name.replace('_', '-')} must satisfy 0 < min <= max <= 1, got {lo} {hi}")
    for name in per_rank.split():
        if getattr(args, name) % world_size:
            flag = f"--{name.replace('_', '-')} {getattr(args, name)}"
            raise RunError(f"{flag} does not divide by the world size {world_size}")


def decode_checked(data: torch.Tensor, path) -> torch.Tensor:
    try:
        return decode_image(data, mode=ImageReadMode.RGB)  # JPEG, PNG, WebP; grayscale and CMYK become RGB
    except RuntimeError as e:
        raise RunError(f"cannot decode image {path}: {' '.join(str(e).split())}")


def decode_files(paths: list, size: int, crop: int) -> torch.Tensor:
    """uint8 [n, 3, crop, crop]: shorter side resized to size (if not already), centre crop."""
    datas = [read_file(str(p)) for p in paths]
    jpeg = [i for i, p in enumerate(paths) if p.suffix.lower() in (".jpg", ".jpeg")]
    try:  # batched libjpeg-turbo decode (~60 us per CIFAR image on one core)
        imgs = dict(zip(jpeg, decode_jpeg([datas[i] for i in jpeg], mode=ImageReadMode.RGB))) if jpeg else {}
    except RuntimeError:  # a bad file in the batch: decode one by one below, which names it
        imgs = {}
    imgs = [imgs[i] if i in imgs else decode_checked(d, p) for i, (p, d) in enumerate(zip(paths, datas))]
    return torch.stack([T.functional.center_crop(T.functional.resize(x, size, antialias=True), crop) for x in imgs])


def folder_splits(root: Path) -> tuple:
    """(train dir, test dir, class names) of a folder with train/ and test/ (or val/) class folders."""
    if not root.is_dir():
        raise RunError(f"data dir not found: {root}")
    test_root = next((root / n for n in ("test", "val") if (root / n).is_dir()), None)
    if not (root / "train").is_dir() or test_root is None:
        raise RunError(f"{root} must hold train/ and test/ (or val/) class folders")
    classes = sorted(d.name for d in (root / "train").iterdir() if d.is_dir())
    if sorted(d.name for d in test_root.iterdir() if d.is_dir()) != classes:
        raise RunError(f"class folders differ between {root / 'train'} and {test_root}")
    return root / "train", test_root, classes


def list_image_files(root: Path, classes: list) -> tuple:
    files = [(p, c) for c, name in enumerate(classes) for p in sorted((root / name).iterdir())]
    files = [(p, c) for p, c in files if p.suffix.lower() in {".jpg", ".jpeg", ".png", ".bmp", ".webp"}]
    if not files:
        raise RunError(f"no images in {root}")
    return [p for p, _ in files], torch.tensor([c for _, c in files])


def load_image_folder(root: Path, classes: list, size: int) -> tuple:
    paths, labels = list_image_files(root, classes)
    with ThreadPoolExecutor(os.cpu_count()) as pool:
        images = pool.map(lambda i: decode_files(paths[i : i + 1000], size, size), range(0, len(paths), 1000))
        return torch.cat(list(images)), labels


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601-2 luma, as PIL's convert('L') and torchvision: [N, 3, H, W] -> [N, 1, H, W]."""
    return (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the hue of RGB images in [0, 1] by shift (fraction of a turn, [N]) through HSV."""
    r, g, b = x.unbind(1)
    maxc, minc = x.amax(1), x.amin(1)
    delta = maxc - minc
    s = delta / maxc.clamp_min(1e-12)
    d = delta.clamp_min(1e-12)
    rc, gc, bc = (maxc - r) / d, (maxc - g) / d, (maxc - b) / d
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h6 = ((h / 6.0 + shift[:, None, None]) % 1.0) * 6.0  # hue in sixths of a turn, [0, 6)
    # HSV -> RGB in closed form: channel n (r=5, g=3, b=1) = v - v s clamp(min(k, 4 - k), 0, 1), k = (n + h6) mod 6
    n = torch.arange(5.0, 0.0, -2.0, device=x.device)  # an arange, not a host-to-device copy
    k = (n[None, :, None, None] + h6[:, None]) % 6
    return maxc[:, None] * (1 - s[:, None] * torch.minimum(k, 4 - k).clamp(0, 1))


def color_jitter(x: torch.Tensor, factors: torch.Tensor, order: torch.Tensor, apply: torch.Tensor) -> torch.Tensor:
    """torchvision ColorJitter, batched: factors [N, 4] (brightness, contrast, saturation factors, hue shift) applied
    in per-image order [N, 4] where apply [N]. The first three are blends f x + (1 - f) m (m = 0, the mean luma, the
    luma image); the costly hue runs once: the blends before each image's hue slot, hue, then the rest."""
    hue_slot = torch.where(apply, (order == 3).int().argmax(1), -1)  # -1: jitter not applied to this image

    def blends(x, before: bool):
        for slot in range(4):
            use = slot < hue_slot if before else (slot > hue_slot) & (hue_slot >= 0)
            op = torch.where(use, order[:, slot], -1).view(-1, 1, 1, 1)  # never 3 (hue) here
            f = factors.gather(1, op.view(-1, 1).clamp(min=0)).view(-1, 1, 1, 1)
            gray = grayscale(x)
            m = torch.where(op == 1, gray.mean((1, 2, 3), keepdim=True), torch.where(op == 2, gray, 0.0))
            x = torch.where(op >= 0, (f * x + (1 - f) * m).clamp(0, 1), x)
        return x

    x = blends(x, before=True)
    x = torch.where(hue_slot.view(-1, 1, 1, 1) >= 0, adjust_hue(x, factors[:, 3]), x)
    return blends(x, before=False)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, radius: int = 6) -> torch.Tensor:
    """Separable, per-image sigma, replicate padding (PIL extends edges)."""
    n, c, h, w = x.shape
    k = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    kern = torch.exp(-(k[None] ** 2) / (2 * sigma[:, None] ** 2))
    kern = (kern / kern.sum(1, keepdim=True)).repeat_interleave(c, 0)  # [n*c, 2r+1]
    y = F.pad(x.reshape(1, n * c, h, w), (radius, radius, radius, radius), mode="replicate")
    y = F.conv2d(y, kern[:, None, None, :], groups=n * c)
    y = F.conv2d(y, kern[:, None, :, None], groups=n * c)
    return y.reshape(n, c, h, w)


def setup_distributed(device_arg: Optional[str]) -> tuple:
    """(rank, world_size, device): a process per device under torchrun (nccl on GPU, gloo on CPU)."""
    use_cuda = torch.cuda.is_available() and (device_arg or "cuda") != "cpu"
    if "RANK" not in os.environ:
        return 0, 1, torch.device(device_arg or ("cuda" if use_cuda else "cpu"))
    rank, world_size, local_rank = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world_size)
    return rank, world_size, device


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, device=None) -> list:
    """The epoch's global batches: a seeded permutation cut into full batches (drop_last). CRUCIAL: moved to the
    device once per epoch; a per-step copy from pageable memory would sync the host."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(rng_seed(seed, "order", epoch)))
    return list(perm[: n // batch_size * batch_size].to(device).view(-1, batch_size))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_benchmarks(run: SimpleNamespace, unit: str = "images", per_image: int = 1) -> dict:
    """--bench-data-steps: the method's train_batches alone (read, decode, crops, colour), timed before training.
    --bench-ceiling-steps N: its bare_step(run) (bare networks, synthetic inputs, no data, loss or optimizer), warmed
    up here, then timed right after each of the first N training steps but the first (time_bare_step). Returns
    results.json's {data,ceiling}_{unit}_per_s, ceiling_ratio (median of bare / whole step time) and its spread."""
    args, keys = run.args, (f"data_{unit}_per_s", f"ceiling_{unit}_per_s", "ceiling_ratio", "ceiling_ratio_spread")
    run.bench, run.bench_unit, run.bench_pairs = dict.fromkeys(keys), (unit, per_image), None
    run.bare = bare_step(run) if args.bench_ceiling_steps else None
    stream = (b for e in range(args.bench_data_steps + 2) for b in train_batches(run, e, 0, run.steps_per_epoch))
    for i in range(args.bench_data_steps + 2 if args.bench_data_steps else 0):
        if i == 2:
            sync(run.device)
            t0 = time.perf_counter()
        next(stream)
    if args.bench_data_steps:
        sync(run.device)
        run.bench[keys[0]] = args.bench_data_steps * args.batch_size / (time.perf_counter() - t0) * per_image
    for _ in range(2 if run.bare else 0):  # warm-up
        run.bare()
    if run.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(run.device)
    return run.bench


def time_bare_step(run: SimpleNamespace, t_step: float) -> float:
    """After the training step begun at t_step, one bare step, both timed (device synced) into run.bench. Returns the
    bare step's time, which is not training time. The run's first step (compilation, autotuning) is not timed."""
    if run.bench_pairs is None:
        run.bench_pairs = []
        return 0.0
    sync(run.device)
    t1 = time.perf_counter()
    run.bare()
    sync(run.device)
    run.bench_pairs.append((t1 - t_step, time.perf_counter() - t1))
    (unit, per_image), (whole, bare) = run.bench_unit, torch.tensor(run.bench_pairs, dtype=torch.float64).T
    ratio = bare / whole  # the whole step's throughput as a fraction of the bare networks'
    run.bench[f"ceiling_{unit}_per_s"] = run.args.batch_size * per_image / bare.quantile(0.5).item()  # medians
    run.bench.update(
        ceiling_ratio=ratio.quantile(0.5).item(), ceiling_ratio_spread=[ratio.min().item(), ratio.max().item()]
    )
    if len(ratio) == run.args.bench_ceiling_steps:  # done: free the bare networks; the peak memory is training's
        run.bare = None
        if run.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(run.device)
    return run.bench_pairs[-1][1]


class LargestTensor(TorchDispatchMode):
    """numel of the largest tensor with first dimension `batch` (activations, not weights) any op makes."""

    def __init__(self, batch: int):
        super().__init__()
        self.batch, self.numel = batch, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if torch.is_tensor(t) and t.dim() and t.shape[0] == self.batch:
                self.numel = max(self.numel, t.numel())
        return out


@torch.no_grad()
def inputs_per_chunk(net, one: torch.Tensor, budget_gb: float) -> int:
    """How many inputs like `one` ([1, ...]) one no-grad forward of `net` may take within --eval-memory-gb: the peak
    is estimated as 6x the largest fp32 activation an input makes (an op's input and output, a residual, the kernels'
    buffers; measured on the CPU: 0.8x of the budget for ResNet-18 at 32 px, 0.35x for ResNet-50 at 224)."""
    with LargestTensor(3) as largest:
        net(one.expand(3, *one.shape[1:]).contiguous())
    per_input = max(largest.numel, 3 * one.numel()) / 3
    return max(1, int(budget_gb * 2**30 // (6 * 4 * per_input)))


@torch.no_grad()
def knn_eval(x_train, y_train, x_test, y_test, num_classes, k=20, t=0.07, chunk=256) -> tuple:
    """Weighted k-NN (DINO protocol): cosine similarity, votes weighted by exp(sim / t). Returns (top1, top5) in %."""
    x_train, x_test = F.normalize(x_train.float(), dim=1), F.normalize(x_test.float(), dim=1)
    k = min(k, len(x_train))
    correct1 = correct5 = 0
    for i in range(0, len(x_test), chunk):
        sim, idx = (x_test[i : i + chunk] @ x_train.T).topk(k, dim=1)
        votes = torch.zeros(len(sim), num_classes, device=sim.device).scatter_add_(1, y_train[idx], (sim / t).exp())
        pred = votes.topk(min(5, num_classes), dim=1).indices
        target = y_test[i : i + chunk, None]
        correct1 += (pred[:, :1] == target).sum().item()
        correct5 += (pred == target).any(1).sum().item()
    return 100.0 * correct1 / len(x_test), 100.0 * correct5 / len(x_test)


class RunStopped(Exception):
    """A stop signal ended the run: main prints stop_message and exits with 128 + the signal number."""


# SIGTERM (a scheduler's notice before it kills a job) and SIGINT (Ctrl-C): during the training steps (in_steps) they
# only set signum: every rank finishes its step (stop_now), saves last.pt and exits; elsewhere the run ends at once.
Stop = SimpleNamespace(signum=None, in_steps=False, run=None)  # run: the run main reports on


def on_stop_signal(signum, frame) -> None:
    Stop.signum = signum
    if not Stop.in_steps:
        raise RunStopped()


def ignore_stop_signals(worker_id: int = 0) -> None:
    """DataLoader worker_init_fn: Ctrl-C is the main process's to handle (it stops the workers after its step); SIGTERM
    (the DataLoader's shutdown, or a scheduler's to the whole job) ends a worker with exit 0, not taken for a crash."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda signum, frame: os._exit(0))


def stop_now(run: SimpleNamespace) -> bool:
    """After every step: did any rank get a stop signal? Under DDP a CPU all-reduce of one integer (gloo, no device
    sync), so every rank stops after the same step."""
    asked = Stop.signum or 0
    if run.world_size > 1:
        if not hasattr(run, "stop_group"):  # first step, on every rank alike
            run.stop_group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
        flag = torch.tensor([asked])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=run.stop_group)
        asked = int(flag)
        Stop.signum = Stop.signum or asked or None
    return asked > 0


def train_one_epoch(run: SimpleNamespace, epoch: int, start_step: int) -> dict:
    """Steps start_step.. of `epoch`, to its end or to --max-steps: each sets every parameter group's LR (times its
    lr_scale) and runs the method's `train_step` on this rank's batch from its `train_batches`; the step returns its
    metrics (named in run.metrics, the loss first) as one detached tensor. Every --log-every steps they are averaged
    over ranks and a non-finite loss stops the run: no step waits for the host. Returns the epoch's means."""
    args, device, spe, names = run.args, run.device, run.steps_per_epoch, run.metrics
    last = min(spe, run.total_steps - epoch * spe)
    stream = train_batches(run, epoch, start_step, last)
    tally = getattr(run, "epoch_sums", None)  # saved in last.pt: a run resumed mid-epoch reports the whole epoch
    if tally is None or tally["epoch"] != epoch:
        tally = dict(epoch=epoch, sums=torch.zeros(len(names)), n=0, t0=run.train_time_s)  # t0: train time at start
    tally = run.epoch_sums = dict(tally, sums=tally["sums"].to(device))
    window = torch.zeros(len(names), device=device)
    no_bad = 2**62
    bad_step = torch.full((), no_bad, device=device)  # first step (1-based) with a non-finite loss, no host syncs
    run.model.train()
    bar = tqdm(range(start_step, last), desc=f"ep {epoch + 1}/{args.epochs}", disable=run.rank != 0, dynamic_ncols=True)
    t0, n_done, n_logged = time.perf_counter(), 0, 0
    for step in bar:
        gstep = epoch * spe + step
        lr = lr_at(gstep, args, spe)
        for group in run.opt.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        tw = time.perf_counter()
        batch = next(stream)
        run.data_wait_s += time.perf_counter() - tw  # host time spent waiting for (or making) the batch
        m = train_step(run, batch, gstep)
        if getattr(run, "bare", None):  # --bench-ceiling-steps: a bare step right after this one, both timed
            t0 += time_bare_step(run, tw)
        bad_step = torch.minimum(bad_step, torch.where(torch.isfinite(m[0]), no_bad, gstep + 1))
        window += m
        n_done += 1
        run.images_seen += args.batch_size  # counted per step: a mid-epoch checkpoint holds the true count
        run.global_step = gstep + 1
        stop = stop_now(run)  # a stop signal: this step is the last (its checkpoint follows)
        save_now = args.save_every_steps and (gstep + 1) % args.save_every_steps == 0 and step + 1 < spe and not stop
        eval_now = args.eval_every_steps and (gstep + 1) % args.eval_every_steps == 0 and gstep + 1 < run.total_steps
        if (step + 1) % args.log_every == 0 or step + 1 == last or save_now or stop:  # a checkpoint holds every step
            if run.world_size > 1:  # log the global means; every rank stops at the same non-finite step
                dist.all_reduce(window)
                window /= run.world_size
                dist.all_reduce(bad_step, op=dist.ReduceOp.MIN)
            if bad_step.item() < no_bad:
                msg = f"non-finite loss at step {bad_step.item()} (epoch {epoch + 1}); try a lower LR or --amp none"
                raise RunError(msg, every_rank=True)
            mean = dict(zip(names, (window / (n_done - n_logged)).tolist()))  # over the steps since the last log
            tally["sums"] += window
            tally["n"] += n_done - n_logged
            window, n_logged = torch.zeros_like(window), n_done
            if run.rank == 0:
                bar.set_postfix(**{k: f"{v:.4g}" for k, v in mean.items()}, lr=f"{lr:.3g}")
                log_jsonl(run, dict(type="train", step=gstep + 1, epoch=epoch, lr=lr, **mean))
        if stop:  # its checkpoint is saved after the loop
            break
        if save_now or eval_now:  # neither counts as training time
            sync(device)
            run.train_time_s += time.perf_counter() - t0
            if save_now:
                save_state(run)
            if eval_now:
                evaluate(run, tag=f"step {gstep + 1}")
                run.model.train()  # CRUCIAL: back to train mode after a mid-epoch evaluation
            t0 = time.perf_counter()
    sync(device)
    run.train_time_s += time.perf_counter() - t0
    means = (tally["sums"] / max(tally["n"], 1)).tolist()  # the whole epoch's means, steps before a resume included
    return dict(zip(names, means), lr=lr_at(run.global_step - 1, args, spe), time_s=run.train_time_s - tally["t0"])


def train_epochs(run: SimpleNamespace) -> None:
    """The epochs from the resumed step on: each saves last.pt, evaluates every --eval-every epochs (not after the last:
    the final evaluation follows) and prints one line; a stop signal ends the run after its step, with a checkpoint."""
    args, spe = run.args, run.steps_per_epoch
    Stop.in_steps = True
    while run.global_step < run.total_steps:
        epoch, start = divmod(run.global_step, spe)
        m = train_one_epoch(run, epoch, start)
        save_state(run)
        if Stop.signum and run.global_step % spe:  # stopped within the epoch: no epoch line
            raise RunStopped()
        if args.eval_every and (epoch + 1) % args.eval_every == 0 and run.global_step < run.total_steps:
            m.update(evaluate(run, tag=f"epoch {epoch + 1}"))
        if run.rank == 0:
            log_jsonl(run, dict(type="epoch", epoch=epoch + 1, step=run.global_step, **m))
            line = " | ".join(f"{k} {v:.4g}" for k, v in m.items() if k != "time_s" and isinstance(v, float))
            gb = f" | {torch.cuda.max_memory_allocated(run.device) / 2**30:.1f} GB" if run.device.type == "cuda" else ""
            print(f"ep {epoch + 1}/{args.epochs} | {line} | {m['time_s']:.1f} s{gb}")
        if Stop.signum:
            raise RunStopped()
    Stop.in_steps = False


def stop_message(run: Optional[SimpleNamespace]) -> str:
    sig, again = signal.Signals(Stop.signum).name, "rerun the same command to"
    if run is None or not hasattr(run, "total_steps"):
        return f"stopped by {sig} before training; {again} start"
    last, at = Path(run.args.out_dir) / "last.pt", f"step {run.global_step} of {run.total_steps}"
    if Stop.in_steps:
        return f"stopped at {at} by {sig}; saved {last}; {again} resume"
    if run.global_step >= run.total_steps and last.is_file():
        return f"stopped by {sig} while evaluating; the trained weights are in {last}; {again} evaluate them"
    return f"stopped by {sig} at {at}; {again} resume"


def log_jsonl(run: SimpleNamespace, record: dict) -> None:
    with open(Path(run.args.out_dir) / "log.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def summary_line(res: dict, results: dict, path: Path) -> str:
    metrics = " | ".join(f"{k} {v:.2f}" for k, v in res.items() if isinstance(v, float)) or "no evaluation"
    return f"done: {metrics} | {results['steps_done']} steps in {results['train_time_s']:.1f} s | {path}"


def main(args: Args) -> None:
    Stop.signum, Stop.in_steps, Stop.run = None, False, None
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_stop_signal)
    quiet = int(os.environ.get("RANK", 0)) != 0  # torchrun's other ranks
    try:
        run_training(args)
    except (RunError, CheckpointError, RunStopped) as e:
        for sig in (signal.SIGTERM, signal.SIGINT):  # a second signal now ends the process at once, and torchrun,
            signal.signal(sig, signal.SIG_DFL)  # ending the other ranks once one fails, ends them quietly
        if isinstance(e, RunStopped):
            if not quiet:
                print(f"{Path(__file__).name}: {stop_message(Stop.run)}", file=sys.stderr)
            sys.exit(128 + Stop.signum)
        # CRUCIAL: bad input -> one clear line and exit code 1, no traceback
        msg = str(e).strip().splitlines()[-1].split("RunError: ", 1)[-1]  # a DataLoader worker's error: its last line
        if quiet and getattr(e, "every_rank", False):
            time.sleep(3)  # rank 0 has the same error: let it say it before torchrun stops everyone
            sys.exit(1)
        sys.exit(f"{Path(__file__).name}: error: {msg}")


# END SHARED


# SHARED: runs
def start_run(args: Args) -> SimpleNamespace:
    """Check the args, join the process group, read the data (on the device when in memory), set the precision."""
    try:  # before any process group and data: bad input fails fast, alike on every rank
        check_args(args, int(os.environ.get("WORLD_SIZE", 1)))
        check_out_dir(args.out_dir)
        t_start = time.perf_counter()
        rank, world_size, device = setup_distributed(args.device)
        if device.type != "cuda":  # autocast runs on CUDA only: say so in results.json
            args = dataclasses.replace(args, amp="none", channels_last=False)
        if getattr(args, "workers", 0) is None:  # streamed files (EMP-SSL reads none): this machine's CPUs
            args = dataclasses.replace(args, workers=cpus_per_process())
        data = load_data(args)
    except RunError as e:
        raise RunError(str(e), every_rank=True)
    torch.backends.cudnn.benchmark = not args.deterministic
    torch.use_deterministic_algorithms(args.deterministic, warn_only=True)
    # DEVIATION: TF32 for fp32 matmuls/convs; it only matters with --amp none (the losses compute in fp32 anyway)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    n = len(data["train_y"])
    if n < args.batch_size:
        raise RunError(f"--batch-size {args.batch_size} exceeds the {n} training images", every_rank=True)
    # a small folder: the probe batch shrinks (EMP-SSL has no --probe: it always probes)
    if getattr(args, "probe", "") != "none" and n < args.probe_batch_size:
        probe_batch = n // world_size * world_size
        if rank == 0:
            print(f"note: --probe-batch-size {args.probe_batch_size} exceeds the {n} training images: {probe_batch}")
        args = dataclasses.replace(args, probe_batch_size=probe_batch)
    if torch.is_tensor(data["train_x"]):  # CRUCIAL: decode once, keep the uint8 images on the device (CIFAR: 150 MB)
        data.update(train_x=data["train_x"].to(device), test_x=data["test_x"].to(device))
    run = SimpleNamespace(args=args, rank=rank, world_size=world_size, device=device, data=data, t_start=t_start)
    Stop.run, run.epoch_sums = run, None  # main reports a stop on this run
    run.data_time_s, run.steps_per_epoch = time.perf_counter() - t_start, n // args.batch_size
    run.fmt = torch.channels_last if args.channels_last and device.type == "cuda" else torch.contiguous_format
    run.scaler = torch.amp.GradScaler("cuda", enabled=args.amp == "fp16")  # --amp is none off CUDA (above)
    # DEVIATION: bf16 autocast by default (the official precision is in the docstring); the loss stays fp32
    amp_dtype = dict(bf16=torch.bfloat16, fp16=torch.float16).get(args.amp)
    run.autocast = torch.autocast("cuda", dtype=amp_dtype) if amp_dtype else nullcontext()
    run.global_step, run.train_time_s, run.images_seen, run.data_wait_s, run.times = 0, 0.0, 0, 0.0, {}
    return run


def write_results(run: SimpleNamespace, paper: str, extra: dict, bench: dict, res: dict) -> None:
    """out_dir/results.json (rank 0, atomic): args, machine, timings, throughput against the bare ceiling, metrics;
    extra: the method's own fields (EMP-SSL: its evaluation protocol, the bag of patches, and its patch counts)."""
    args, device = run.args, run.device
    imgs_per_s = run.images_seen / max(run.train_time_s, 1e-9)
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    if "eval_protocol" not in extra:  # pooled features of the images, and the multi-crop views' crops/s
        protocol = f"pooled backbone features of {'whole images' if args.in_memory else 'centre crops'}, eval-mode BN"
        protocol += f"; weighted k-NN k={args.knn_k} T={args.knn_t}"
        protocol += f"; linear probe: {args.probe}, {args.probe_epochs} epochs"
        extra = dict(extra, eval_protocol=protocol, crops_per_s=imgs_per_s * sum(g.n for g in run.groups))
    results = dict(script=Path(__file__).name, paper=paper, exp_name=args.exp_name, args=dataclasses.asdict(args))
    results.update(world_size=run.world_size, steps_per_epoch=run.steps_per_epoch, **extra, device=dev_name)
    results.update(python=platform.python_version(), torch=torch.__version__, torchvision=torchvision.__version__)
    results.update(epochs_done=run.global_step / run.steps_per_epoch, steps_done=run.global_step)
    results.update(data_time_s=run.data_time_s, train_time_s=run.train_time_s, data_wait_s=run.data_wait_s, **run.times)
    results.update(total_time_s=time.perf_counter() - run.t_start, images_seen=run.images_seen, images_per_s=imgs_per_s)
    results.update(**bench)
    results.update(peak_gpu_mem_gb=torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
                   script_sha256=hashlib.sha256(Path(__file__).read_bytes()).hexdigest(), **res)  # fmt: skip
    tmp = Path(args.out_dir) / f"results.json.tmp.{os.getpid()}"
    tmp.write_text(json.dumps(results, indent=2))
    os.replace(tmp, Path(args.out_dir) / "results.json")  # atomic, like the checkpoints
    print(summary_line(res, results, Path(args.out_dir) / "results.json"))


# END SHARED


# SHARED: linear-probe
class LARS(torch.optim.Optimizer):
    """SGD (momentum, optional Nesterov) with layer-wise adaptive rate scaling (solo-learn's LARSWrapper, apex LARC):
    in groups with lars=True, g <- (g + wd p) r, local = eta ||p|| / (||g|| + wd ||p|| + eps), r = min(local / lr, 1)
    if clip else local (g untouched where ||p|| or ||g|| is 0); in the others g <- g + wd p."""

    def __init__(self, params, lr, momentum=0.9, nesterov=False, weight_decay=0.0, eta=0.001, clip=False, eps=1e-8):
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, eta=eta, clip=clip)
        super().__init__(params, dict(defaults, eps=eps, lars=True))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:  # CRUCIAL: each op runs over all tensors at once (torch._foreach_*), no sync
            lr, wd, mom = group["lr"], group["weight_decay"], group["momentum"]
            ps = [p for p in group["params"] if p.grad is not None]
            gs = [p.grad for p in ps]  # scaled in place
            if not ps:
                continue
            if group["lars"]:
                p_norm, g_norm = torch.stack(torch._foreach_norm(ps)), torch.stack(torch._foreach_norm(gs))
                local = group["eta"] * p_norm / (g_norm + wd * p_norm + group["eps"])
                ratio = (local / lr).clamp(max=1.0) if group["clip"] else local
                ok = (p_norm > 0) & (g_norm > 0)  # zero norms leave g untouched: no decay, ratio 1
                torch._foreach_add_(gs, torch._foreach_mul(ps, (wd * ok).unbind()))
                torch._foreach_mul_(gs, torch.where(ok, ratio, 1.0).unbind())
            elif wd:
                torch._foreach_add_(gs, torch._foreach_mul(ps, wd))
            if mom:  # a new buffer starts at 0, so after the first step it is the gradient
                bufs = [self.state[p].get("momentum_buffer") for p in ps]
                bufs = [torch.zeros_like(p) if b is None else b for p, b in zip(ps, bufs)]
                self.state.update({p: {"momentum_buffer": b} for p, b in zip(ps, bufs)})
                torch._foreach_mul_(bufs, mom)
                torch._foreach_add_(bufs, gs)
                gs = torch._foreach_add(gs, torch._foreach_mul(bufs, mom)) if group["nesterov"] else bufs
            torch._foreach_add_(ps, gs, alpha=-lr)


def linear_probe(x_train, y_train, x_test, y_test, num_classes, epochs=100, lr=0.03, wd=5e-5, batch_size=100, seed=0,
                 init_std=None, lars=False, world_size=1) -> dict:  # fmt: skip
    """Linear classifier on frozen features: SGD (momentum 0.9; LARC, trust 0.001 and no clipping, if lars), cosine LR
    per epoch to 0, seeded shuffled batches (drop_last), head N(0, init_std) with bias 0 (None: nn.Linear's init).
    x_train: features [n, F] on y_train's device, or a function (epoch, batches) yielding this rank's features for
    each global batch (gradient averaged over world_size ranks). Returns the last, best top-1 and last top-5 (%)."""
    with torch.random.fork_rng(devices=[]):  # a seeded head without touching the caller's RNG state
        torch.manual_seed(seed)
        head = nn.Linear(x_test.shape[1], num_classes).to(x_test.device)
    if init_std is not None:
        with torch.no_grad():
            head.weight.copy_(torch.randn(head.weight.shape, generator=torch.Generator().manual_seed(seed)) * init_std)
            head.bias.zero_()
    opt = LARS([dict(params=list(head.parameters()), lars=lars)], lr=lr, momentum=0.9, weight_decay=wd, clip=False)
    rank, b = dist.get_rank() if world_size > 1 else 0, batch_size // world_size
    top1, top5 = [], []
    for epoch in tqdm(range(epochs), desc="linear probe", disable=rank != 0 or torch.is_tensor(x_train), leave=False):
        for g in opt.param_groups:
            g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * epoch / epochs))
        batches = epoch_batches(len(y_train), batch_size, seed, ("probe", epoch), y_train.device)
        feats = (x_train[i] for i in batches) if torch.is_tensor(x_train) else x_train(epoch, batches)
        for idx, f in zip(batches, feats):
            loss = F.cross_entropy(head(f), y_train[idx[rank * b : (rank + 1) * b]])  # this rank's share
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if world_size > 1:  # the gradient of the global-batch mean
                for p in head.parameters():
                    dist.all_reduce(p.grad)
                    p.grad /= world_size
            opt.step()
        with torch.no_grad():  # no host sync per epoch
            pred = head(x_test).topk(min(5, num_classes), dim=1).indices
            top1.append((pred[:, 0] == y_test).float().mean())
            top5.append((pred == y_test[:, None]).any(1).float().mean())
    top1, top5 = (torch.stack(top1) * 100).tolist(), (torch.stack(top5) * 100).tolist()
    return dict(last=top1[-1], best=max(top1), top5=top5[-1])


# END SHARED


# SHARED: ddp-gather
class _GatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0 whose backward sums every rank's gradient and returns this rank's slice."""

    @staticmethod
    def forward(ctx, x):
        out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(out, x.contiguous())
        return torch.cat(out, 0)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)  # every rank's loss depends on every rank's x
        return grad.chunk(dist.get_world_size())[dist.get_rank()]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate x from all ranks along dim 0, gradient flowing back to each rank's own rows; identity on 1 rank."""
    return _GatherWithGrad.apply(x) if dist.is_initialized() and dist.get_world_size() > 1 else x


# END SHARED


if __name__ == "__main__":
    main(parse_args())
