r"""GroCo: Learning by Sorting: Self-supervised Learning with Group Ordering Constraints (Shvetsova, Petersen, Kukleva,
Schiele, Kuehne; ICCV 2023), arXiv 2301.02009.

What we reproduce: GroCo pre-training of a ResNet-50 on ImageNet. SimCLR-like instance discrimination (ResNet-50, a
2048-2048-2048 projector ending in a BatchNorm without affine parameters, BN statistics per view) whose loss
is a group-ordering constraint: for every anchor embedding, the cosines to its positives (the other views of the same
image) and to its 10 hardest negatives (the most similar other images of the anchor's own view) are concatenated,
negatives first, each group ascending, and sorted by a differentiable odd-even sorting network (diffsort, Cauchy,
steepness 1). The loss is the binary cross-entropy between the probability that each element lands among the
negative (positive) ranks and its group. Plain SGD (momentum 0.9, LR 24 at batch 1024: the gradients are tiny), no
LARS. Official code: ninatu/learning_by_sorting; spec: ../shared/specs/groco.md.

Runs (the `imagenet` recipe is the multi-crop 800-epoch config, the paper's best model; flags override it; spec 3
lists each config's LR rule, warm-up and weight decay; k-NN (k=20) / linear top-1 of the official README, batch 1024):
    torchrun --nproc_per_node=4 groco_imagenet.py imagenet --data-dir IMAGENET                    # 66.1 / 73.9
    torchrun --nproc_per_node=4 groco_imagenet.py imagenet --data-dir IMAGENET --epochs 400 \
        --lr 0.375 --lr-scaling linear                                                            # 65.2 / 73.7
    torchrun --nproc_per_node=4 groco_imagenet.py imagenet --data-dir IMAGENET --epochs 100 \
        --lr 0.75 --lr-scaling linear --weight-decay 1e-6                                         # 62.3 / 71.8
    torchrun --nproc_per_node=4 groco_imagenet.py imagenet --data-dir IMAGENET --n-small 0 --epochs 100 \
        --lr 0.75 --lr-scaling linear --warmup-epochs 1 --weight-decay 1e-6                       # 2x224: 60.5 / 69.2
    torchrun --nproc_per_node=4 groco_imagenet.py imagenet --data-dir IMAGENET --n-small 0 --epochs 800 \
        --lr 0.1875 --lr-scaling linear --weight-decay 1e-6                                       # 2x224: 65.3 / 71.2
    torchrun --nproc_per_node=4 groco_imagenet.py imagenet --data-dir IMAGENET --n-large 4 --n-small 0 \
        --epochs 100 --lr 0.75 --warmup-epochs 1 --weight-decay 1e-6                              # 4x224: 61.8 / 69.6
    torchrun --nproc_per_node=4 groco_imagenet.py imagenet --data-dir IMAGENET --n-large 4 --n-small 0 \
        --epochs 400 --lr 0.375 --lr-scaling linear                                               # 4x224: 64.8 / 71.3
    python groco_imagenet.py imagenet --data-dir IMAGENET --init latest_model.pth --max-steps 0   # a released model
Other runs:
    python groco_imagenet.py cifar --dataset cifar10        # CIFAR proxy (ours: no published CIFAR numbers exist)
    python groco_imagenet.py cifar --dataset imagefolder --data-dir CIFAR10_JPEG
    python groco_imagenet.py imagenet --data-dir DIR --batch-size 16 --epochs 1 --arch resnet18 --large-size 64 \
        --small-size 32 --probe-epochs 1 --device cpu --out-dir OUT   # quick CPU run: under a minute on 200 images

Deviations (each marked `# DEVIATION:` below): crops are resized bilinearly (official: bicubic) by torchvision's
tensor ops in the CPU workers, or with a batched roi_align on the device, and colour/blur/solarize run batched on the
device; the evaluation's Resize(256) + CenterCrop(224) is antialiased bilinear (official final k-NN: bicubic); bf16
autocast (official: fp16 with a GradScaler) with the loss and the sort in fp32; under DDP with --no-stop-grad the
negatives pass every rank's gradient back (the official gather keeps only the local one); the final linear probe
validates on the whole validation set (official: the first floor(50000/4096)*4096 images); seeded, resumable random
streams (official seed: none).
"""

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
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Annotated, Literal, Optional, Tuple, Union

import diffsort
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
import tyro
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader
from torchvision.io import ImageReadMode, decode_image, decode_jpeg, read_file
from torchvision.ops import roi_align
from torchvision.transforms import v2 as T
from tqdm import tqdm

from common.checkpoint import ArtifactCache, CheckpointError, init_weights, own_checkpoint, resume_state
from common.checkpoint import save_checkpoint, save_state, state_dict_digest, torchvision_resnet
from common.resnet import RESNETS


# ==== 1. ARGS ====
@dataclass
class Args:
    # --- I/O & experiment
    recipe: str = "imagenet"
    """which preset these defaults came from (set by the subcommand: imagenet or cifar)"""
    exp_name: str = "groco"
    """name stored in results.json"""
    seed: int = 0  # DEVIATION: seeded, resumable random streams (the official runs set no seed)
    """seed for the model init, the data order and every augmentation draw"""
    out_dir: str = "runs/groco"
    """where last.pt, log.jsonl, results.json and the feature cache go; an existing last.pt is resumed"""
    resume: Optional[str] = None
    """resume from this checkpoint instead of out_dir/last.pt"""
    init: Optional[str] = None
    """start from these weights when nothing is resumed (no last.pt, no --resume; README: Use released weights)"""
    save_every_steps: int = 1000
    """also save out_dir/last.pt every this many steps (0: only at epoch ends)"""

    # SHARED: args-data
    # --- data
    dataset: Literal["cifar10", "cifar100", "imagefolder", "fake"] = "imagefolder"
    """imagefolder: --data-dir with train/ and val/ (or test/) class folders (ImageNet); cifar10/100 via torchvision"""
    data_dir: str = "data"
    """dataset root"""
    download: bool = False
    """let torchvision download CIFAR when it is not in --data-dir"""
    in_memory: bool = False
    """decode every image once at --image-size and keep the uint8 tensor on the device (CIFAR); off: stream files"""
    image_size: int = 256
    """in-memory images are resized (shorter side) and centre-cropped to this size at load time"""
    workers: Optional[int] = None
    """DataLoader workers per process for streamed files (default: this machine's CPUs per process, at most 10)"""
    train_repeat: int = 1
    """repeat the training file list this many times (benchmarks on a small folder)"""

    # END SHARED

    # --- views (spec 4: the "dino" and "dino_multicrop" transforms)
    n_large: int = 2
    """global 224-px views; they are the positives (PAPER: 2, 3 or 4)"""
    large_size: int = 224
    """global view size in pixels"""
    large_scale: Tuple[float, float] = (0.14, 1.0)
    """RandomResizedCrop area range of the global views (official 0.14-1, not SimCLR's 0.08)"""
    n_small: int = 6
    """local crops per image (PAPER: 6x96 in the multi-crop configs, 0 otherwise); never positives"""
    small_size: int = 96
    """local crop size in pixels"""
    small_scale: Tuple[float, float] = (0.05, 0.14)
    """RandomResizedCrop area range of the local crops (official)"""
    jitter: Tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)
    """ColorJitter brightness, contrast, saturation, hue, applied with p 0.8 (official DINO values)"""
    large_blur: Tuple[float, float] = (1.0, 0.1)
    """blur probability of global views 1 and 2 (views 3, 4 repeat them; official DINO: 1.0 and 0.1)"""
    large_solarize: Tuple[float, float] = (0.0, 0.2)
    """solarisation probability of global views 1 and 2 (official DINO: 0 and 0.2)"""
    small_blur: float = 0.5
    """blur probability of the local crops (official; no solarisation)"""
    mean: Tuple[float, float, float] = (0.485, 0.456, 0.406)
    """normalisation mean (ImageNet)"""
    # DEVIATION: the evaluation's Resize(256) + CenterCrop(224) is antialiased bilinear (official final k-NN: bicubic)
    std: Tuple[float, float, float] = (0.229, 0.224, 0.225)
    """normalisation std (ImageNet)"""

    # --- model (spec 2)
    arch: str = "resnet50"
    """backbone from common/resnet.py: resnet50, resnet18 or resnet18-cifar (zero_init_residual, official)"""
    proj_dim: int = 2048
    """embedding width (official 2048); the projector's two hidden layers are as wide as the backbone's features"""
    sync_bn: bool = True
    """SyncBatchNorm on CUDA under DDP (PyTorch's SyncBN is GPU-only: CPU/gloo runs keep per-rank BN)"""

    # --- method (spec 1)
    topk_neg: int = 10
    """K, hardest negatives per anchor (official 10)"""
    steepness: float = 1.0
    """steepness of the Cauchy relaxation of every swap (official 1)"""
    stop_grad: bool = True
    """only the anchor gets gradient; positives and negatives are detached (official default, every config)"""

    # --- optimisation (spec 3)
    epochs: int = 800
    """training epochs (the best model: multi-crop, 800 epochs)"""
    max_steps: Optional[int] = None
    """stop after this many steps in total without changing the schedule (benchmarks; 0: evaluate the init)"""
    batch_size: int = 1024
    """images per step, global over all ranks (official 4 GPUs x 256)"""
    lr: float = 0.1875
    """base LR; the LR is lr x batch/32 (linear) or lr x sqrt(batch) (sqrt): 6 at 1024 (multicrop_800ep)"""
    lr_scaling: Literal["linear", "sqrt"] = "sqrt"
    """LR scaling rule of the config (spec 3)"""
    warmup_epochs: float = 10.0
    """linear warm-up from 0, per step (official 10; 1 in the 2x224/4x224 100-epoch configs)"""
    momentum: float = 0.9
    """SGD momentum (official; no LARS in pre-training)"""
    weight_decay: float = 2e-6
    """weight decay on every parameter (official 2e-6 for multi-crop 200-800 and 4x224 200-400 epochs, else 1e-6)"""

    # --- evaluation (spec 5)
    # DEVIATION: the online monitor encodes centre crops of a seeded subset (official: the first 30,000 training
    # images with random crops against all 50,000 val images); it is not the paper's metric, the final k-NN is
    eval_every: int = 10
    """epochs between k-NN evaluations on a subset during training (official online k-NN every 10; 0: off)"""
    eval_every_steps: int = 0
    """also run that k-NN evaluation every this many steps (0: off)"""
    eval_subset_train: int = 30000
    """training images used as the k-NN memory during training (official 30,000; the final k-NN uses all)"""
    eval_subset_test: int = 10000
    """test images used during training"""
    # DEVIATION: the probe validates on every test image (official: the first floor(50000/4096)*4096 = 49,152)
    probe: Literal["augmented", "features", "none"] = "augmented"
    """final linear probe: augmented (official, spec 5.2) or features (fast, precomputed centre crops)"""
    probe_epochs: int = 90
    """linear-probe epochs (official 90)"""
    probe_lr: float = 0.1
    """linear-probe LR per 256 images, cosine per epoch to 0 (official 1.6 at 4096)"""
    probe_wd: float = 0.0
    """linear-probe weight decay (official 0)"""
    probe_batch_size: int = 4096
    """linear-probe global batch (official 4096)"""
    probe_lars: bool = True
    """wrap the probe's SGD in LARC (trust 0.001, no clipping; official)"""
    knn_k: int = 20
    """neighbours of the weighted k-NN (the paper's k-NN column: k=20)"""
    knn_t: float = 0.07
    """temperature of the k-NN vote weights exp(sim/t) (official 0.07)"""
    eval_memory_gb: float = 2.0
    """activation memory one evaluation forward may use: images are encoded in chunks sized to it (memory knob only)"""

    # SHARED: args-system
    # --- system
    device: Optional[str] = None
    """cuda or cpu (default: cuda when available); under torchrun each rank takes cuda:LOCAL_RANK"""
    amp: Literal["bf16", "fp16", "none"] = "bf16"
    """autocast precision on CUDA (CPU runs in fp32); the loss and what feeds it are always fp32 (see LOSS)"""
    channels_last: bool = True
    """channels_last memory format on CUDA"""
    compile: bool = False
    """torch.compile the model"""
    deterministic: bool = False
    """deterministic algorithms (slower); otherwise cudnn.benchmark"""
    log_every: int = 25
    """steps between progress-bar/log.jsonl updates (each costs one host sync)"""
    bench_ceiling_steps: int = 0
    """time a bare forward+backward on synthetic crops right after each of this many training steps (ceiling_ratio)"""
    bench_data_steps: int = 0
    """before training, time this many steps of the data pipeline alone (decode, crops, colour): can it keep up?"""
    # END SHARED


# The CIFAR proxy (ours, spec 6: the repo has no CIFAR config and the paper no CIFAR numbers). The loss is unchanged
# (K 10, steepness 1, stop-grad) and the LR follows the official 100-epoch rule 0.75 x batch/32 with warm-up and cosine.
# fmt: off
CIFAR_PROXY = dataclasses.replace(
    Args(), recipe="cifar", exp_name="groco-cifar", out_dir="runs/groco-cifar", save_every_steps=0,
    dataset="cifar10", in_memory=True, image_size=32, mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616),
    large_size=32, large_scale=(0.14, 1.0), n_small=0,  # 2 x 32 px, the DINO pipeline
    large_blur=(0.0, 0.0),                               # no blur on 32-px images (as solo-learn's CIFAR recipes)
    arch="resnet18-cifar",                               # projector 512-512-2048
    epochs=100, batch_size=256, lr=0.75, lr_scaling="linear", warmup_epochs=10, weight_decay=1e-6,  # lr 6 at 256
    eval_every=10, eval_subset_train=50000,
    probe="features", probe_epochs=100, probe_lr=0.1, probe_batch_size=256, probe_lars=False,  # fast probe
)
# fmt: on
RECIPES = Union[
    Annotated[Args, tyro.conf.subcommand("imagenet", default=Args(), description="multicrop_800ep (the best model)")],
    Annotated[Args, tyro.conf.subcommand("cifar", default=CIFAR_PROXY, description="CIFAR proxy (ours)")],
]


def parse_args(argv: Optional[list] = None) -> Args:
    """The command line: a recipe subcommand, then flags that override it. Without one, the first recipe runs with
    its own defaults (CRUCIAL: tyro's `default=` must be that recipe itself, or it replaces the recipe's values)."""
    return tyro.cli(RECIPES, default=Args(), args=argv)


# ==== 2. VIEWS ====
def crop_groups(args: Args) -> list:
    """One group per global view (spec 4: view 1 blur 1.0; view 2 blur 0.1 + solarize 0.2; views 3, 4 repeat them)
    and one for the local crops (blur 0.5). The jitter is DINO's (0.4, 0.4, 0.2, 0.1) with p 0.8, grayscale 0.2."""
    jit = tuple(args.jitter)
    # DEVIATION: the crops are resized bilinearly (official RandomResizedCrop: bicubic), see resized_crops/FolderViews
    groups = [
        CropGroup(1, args.large_size, tuple(args.large_scale), jit, args.large_blur[i % 2], args.large_solarize[i % 2])
        for i in range(args.n_large)
    ]
    small = CropGroup(args.n_small, args.small_size, tuple(args.small_scale), jit, args.small_blur, 0.0)
    return groups + ([small] if args.n_small else [])


# ==== 3. MODEL ====
class GroCo(nn.Module):
    """ResNet -> projector F-F-D ending in BatchNorm1d(affine=False) (spec 2; F = D = 2048 for ResNet-50). No
    predictor, no momentum encoder."""

    def __init__(self, arch: str, proj_dim: int):
        super().__init__()
        self.backbone = RESNETS[arch](zero_init_residual=True)  # PAPER: torchvision resnet50(zero_init_residual=True)
        self.projector = projection_head(self.backbone.num_features, proj_dim)
        self.views = 1  # how many views the batch being encoded holds, crop-major (forward sets it)
        self.per_view_bn(self)

    def forward(self, groups: list) -> list:
        """groups: one tensor per crop group, crop-major [n*b, 3, S, S]. Returns one embedding [b, D] per view.
        CRUCIAL: BN statistics are per view (official: one forward per view key), local crops included: one pass per
        group, in which every BN normalises each view's rows on its own (per_view_bn)."""
        out = []
        for x in groups:
            self.views = x.shape[0] // groups[0].shape[0]
            out += self.projector(self.backbone(x)).chunk(self.views)
        self.views = 1
        return out

    def per_view_bn(self, net: nn.Module) -> None:
        """Every BN (SyncBN too) of net, in training, runs once per view on that view's rows, in view order: the
        statistics and running-statistic updates of one pass per view, for the price of one pass per crop group (the
        convolutions see the whole group). Call it again after converting net's BNs to SyncBN."""
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.forward = partial(self._bn_per_view, m, type(m).forward)

    def _bn_per_view(self, bn: nn.Module, plain, x: torch.Tensor) -> torch.Tensor:
        if self.views == 1 or not bn.training:
            return plain(bn, x)
        return torch.cat([plain(bn, v) for v in x.chunk(self.views)])


def projection_head(f: int, d: int) -> nn.Sequential:
    """Official RegularProjection (num_layers 3, every config), index for index: hidden layers as wide as the
    backbone's output f, then Linear(f, d) and BatchNorm1d(d, affine=False)."""
    head = nn.Sequential(
        nn.Linear(f, f, bias=False), nn.BatchNorm1d(f), nn.ReLU(inplace=True),
        nn.Linear(f, f, bias=False), nn.BatchNorm1d(f), nn.ReLU(inplace=True),
        nn.Linear(f, d), nn.BatchNorm1d(d, affine=False),  # CRUCIAL: no affine parameters
    )  # fmt: skip
    head[6].bias.requires_grad_(False)  # official: frozen (redundant before BN), not in the optimizer
    return head


# ==== 4. LOSS ====
_SORTERS: dict = {}


def sorter(size: int, steepness: float, device: torch.device) -> diffsort.DiffSortNet:
    """The odd-even sorting network with the Cauchy relaxation, one per (size, steepness, device), built there.

    CRUCIAL: DiffSortNet keeps its network in a plain list, so module.to(device) would not move it (spec 8.1)."""
    key = (size, float(steepness), str(device))
    if key not in _SORTERS:
        _SORTERS[key] = diffsort.DiffSortNet(
            "odd_even", size, device=device, steepness=steepness, distribution="cauchy"
        )
    return _SORTERS[key]


def ordering_loss(s: torch.Tensor, k: int, steepness: float = 1.0) -> torch.Tensor:
    """The group-ordering BCE of pre-ordered rows s [R, n] (k negatives, then n - k positives), mean over rows.

    diffsort's soft permutation P [R, n, n] (sorted = s @ P, ascending; P[r, i, j] = P(input i -> rank j)) gives each
    input's probability of landing among the k lowest ranks, q_neg, and among the others, q_pos. The loss is
    (BCE(q_pos, t_pos) + BCE(q_neg, t_neg)) / 2 with t = the identity permutation's sums (t_neg[i] = i < k)."""
    n = s.shape[1]
    with torch.autocast(s.device.type, enabled=False):  # CRUCIAL: the sort in fp32 (autocast would run it in bf16)
        _, perm = sorter(n, steepness, s.device)(s.float())
    # CRUCIAL: a NaN would make BCE raise (CPU) or assert (CUDA) before the step check can name the step: the
    # probabilities are made finite for BCE and the loss is returned as NaN, which the train loop reports
    finite = torch.isfinite(perm).all()
    q_neg = perm[:, :, :k].sum(2).nan_to_num(0.5).clamp(0, 1)  # clamped: rounding can leave [0, 1] (official)
    q_pos = perm[:, :, k:].sum(2).nan_to_num(0.5).clamp(0, 1)
    t_neg = (torch.arange(n, device=s.device) < k).float().expand_as(q_neg)
    loss = (F.binary_cross_entropy(q_pos, 1 - t_neg) + F.binary_cross_entropy(q_neg, t_neg)) / 2  # log clamped -100
    return torch.where(finite, loss, float("nan"))


def groco_loss(
    views: list, topk_neg: int = 10, steepness: float = 1.0, n_pos_augs: Optional[int] = None, stop_grad: bool = True
) -> torch.Tensor:
    """The GroCo loss (spec 1.2), a scalar, in fp32 outside autocast.

    views: V embeddings [B, D] (row b of every view is one image; the positive views first). Every view is an anchor:
    positives = the other views among the first n_pos_augs (default all), negatives = the topk_neg most similar other
    images of the anchor's own view (under DDP: over the global batch). Each row s = [negatives ascending, positives
    ascending] goes to ordering_loss; the loss is the mean over anchors of its mean over rows.
    stop_grad: the positives and the negative candidates are detached; only the anchor side gets gradient."""
    n_views, k = len(views), topk_neg
    n_pos = n_views if n_pos_augs is None else n_pos_augs
    if not 2 <= n_pos <= n_views:
        raise ValueError(f"n_pos_augs {n_pos} must be between 2 and the number of views {n_views}")
    with torch.autocast(views[0].device.type, enabled=False):  # CRUCIAL: cosines and the sort in fp32
        z = torch.stack(views).float()  # [V, B, D]
        b, device = z.shape[1], z.device
        zn = F.normalize(z, dim=2, eps=1e-8)
        cand, rank = (zn.detach() if stop_grad else zn), 0  # negative candidates: each anchor's own view
        if dist.is_initialized() and dist.get_world_size() > 1:  # PAPER: negatives from the global batch
            world, rank = dist.get_world_size(), dist.get_rank()
            # DEVIATION: without stop-grad every rank's gradient flows back (official GatherLayer keeps the local one)
            flat = gather_with_grad(cand.flatten(0, 1))  # [world*V*B, D], rank-major
            cand = flat.view(world, n_views, b, -1).transpose(0, 1).flatten(1, 2)  # [V, B_global, D]
        if cand.shape[1] - 1 < k:
            raise ValueError(f"topk_neg {k} needs at least {k + 1} images in the (global) batch, got {cand.shape[1]}")
        me = torch.arange(b, device=device)
        is_self = me[:, None] + rank * b == torch.arange(cand.shape[1], device=device)  # [B, B_global]
        neg = (zn @ cand.transpose(1, 2)).masked_fill(is_self, float("-inf"))  # CRUCIAL: self masked before top-k
        neg = neg.topk(k, dim=2).values.flip(2)  # [V, B, K]: the hardest negatives, ascending
        pos_side = z.detach() if stop_grad else z
        loss = 0.0
        # anchors with the same number of positives share one sort: global ones n_pos - 1, local ones n_pos
        for lo, hi in ((0, n_pos), (n_pos, n_views)):
            if hi == lo:
                continue
            cos = [[F.cosine_similarity(z[a], pos_side[p], dim=1, eps=1e-8) for p in range(n_pos) if p != a]
                   for a in range(lo, hi)]  # fmt: skip
            pos = torch.stack([torch.stack(c, 1) for c in cos]).sort(2).values  # [A, B, n_p]: plain cosines, ascending
            s = torch.cat([neg[lo:hi], pos], 2).flatten(0, 1)  # [A*B, K + n_p]: negatives first
            loss = loss + (hi - lo) * ordering_loss(s, k, steepness)  # A x the mean over A*B rows = sum of A means
        return loss / n_views


# ==== 5. OPTIMIZER & SCHEDULES ====
def scaled_lr(args: Args) -> float:
    """PAPER: linear lr x batch/32 (= lr x 32 x batch/1024), or sqrt lr x sqrt(batch): 6 (800 ep) to 24 (100 ep)."""
    return args.lr * (args.batch_size / 32 if args.lr_scaling == "linear" else math.sqrt(args.batch_size))


def lr_at(step: int, args: Args, steps_per_epoch: int) -> float:
    """Per-step LR (official CustomCosineSchedulerWithWarmup stepped every iteration): step / warmup x lr during the
    warm-up (0 at the first step), then a cosine from lr to 0 over the remaining steps. A pure function of the step."""
    base, warmup = scaled_lr(args), round(args.warmup_epochs * steps_per_epoch)
    if step < warmup:
        return base * step / warmup
    return 0.5 * base * (1 + math.cos(math.pi * (step - warmup) / (steps_per_epoch * args.epochs - warmup)))


# ==== 6. TRAIN STEP ====
def train_batches(run: SimpleNamespace, epoch: int, start: int, last: int):
    """This rank's crops for steps start..last-1 of `epoch`: per step, one tensor per crop group (view_batches)."""
    args, images = run.args, run.data["train_x"]
    on_device = run.device if torch.is_tensor(images) else None  # in memory: the index batches live on the device
    batches = epoch_batches(len(run.data["train_y"]), args.batch_size, args.seed, epoch, on_device)
    keys = [(args.seed, "train", epoch, s) for s in range(start, last)]
    return view_batches(run, images, batches[start:last], keys, run.groups)


def train_step(run: SimpleNamespace, batch: list, step: int) -> torch.Tensor:
    """One GroCo step on this rank's crops (one tensor per crop group): a pass per group with BN per view, the loss
    over the global batch, SGD. Returns [loss, pos_sim, neg_sim], detached."""
    args = run.args
    with run.autocast:
        z = run.ddp_model([x.contiguous(memory_format=run.fmt) for x in batch])
    loss = groco_loss(z, args.topk_neg, args.steepness, args.n_large, args.stop_grad)  # fp32, outside autocast
    run.opt.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    run.scaler.step(run.opt)
    run.scaler.update()
    with torch.no_grad():  # monitoring (official info_pos / info_neg): view 0 vs view 1, and view 0's hardest negative
        z0, z1 = F.normalize(z[0].float(), dim=1), F.normalize(z[1].float(), dim=1)
        sim = z0 @ z0.T - 3 * torch.eye(len(z0), device=z0.device)
        return torch.stack([loss.detach(), (z0 * z1).sum(1).mean(), sim.amax(1).mean()])


# ==== 7. TRAINING ====
def check_args(args: Args, world_size: int) -> None:
    """Refuse bad input with one clear line, before any data is read or process group created."""
    check_common_args(
        args, world_size, RESNETS, at_least_1="large_size train_repeat proj_dim topk_neg n_large small_size",
        at_least_0="workers eval_every eval_subset_train eval_subset_test n_small", positive="lr steepness",
        non_negative="warmup_epochs momentum", scales="large_scale small_scale", per_rank="batch_size probe_batch_size",
    )  # fmt: skip
    if args.n_large < 2:
        raise RunError(f"--n-large {args.n_large}: GroCo needs at least 2 global views (an anchor needs a positive)")
    if args.batch_size < args.topk_neg + 1:  # the negatives are drawn from the global batch
        raise RunError(f"--batch-size {args.batch_size} is too small for --topk-neg {args.topk_neg}: need >= K + 1")


def official_checkpoint(obj) -> Optional[dict]:
    """--init format: the official trainer's checkpoint (ninatu/learning_by_sorting, base/base_trainer.py
    _save_checkpoint: {epoch, step, encoder, projection, optimizer, config}, legacy serialisation; latest_model.pth,
    as the official README evaluates its releases). encoder: models/encoder/regular_encoder.py, a torchvision ResNet
    as `encoder.*` (fc Identity); projection: models/projection/regular_projection.py, `projection.N.*`; both
    `module.`-prefixed by DDP. The optimizer and config are not loaded; a projection of another layout (num_layers,
    batch_norm_first) starts fresh; an encoder key without `encoder.` stays as it is (an unknown tensor)."""
    if not (isinstance(obj, dict) and isinstance(obj.get("encoder"), dict)):
        return None
    if not isinstance(obj.get("projection", {}), dict):
        return None
    parts = {}
    for part, ours in (("encoder", "backbone"), ("projection", "projector")):
        keys = {k.removeprefix("module."): v for k, v in obj.get(part, {}).items() if torch.is_tensor(v)}
        parts[part] = {ours + k[len(part) :] if k.startswith(part + ".") else k: v for k, v in keys.items()}
    if parts["projection"].keys() != {f"projector.{k}" for k in projection_head(1, 1).state_dict()}:
        parts["projection"] = {}
    return {**parts["encoder"], **parts["projection"]}


INIT_FORMATS = {"last.pt": own_checkpoint, "official GroCo checkpoint": official_checkpoint,
                "torchvision ResNet": torchvision_resnet}  # fmt: skip


def run_training(args: Args) -> dict:
    """Set up (data, model, SGD, resume, DDP), train every epoch (train_epochs), evaluate, write results.json."""
    run = start_run(args)
    args, device = run.args, run.device  # as start_run settled them (precision, probe batch)
    torch.manual_seed(args.seed)  # the same initial model on every rank
    run.model = model = GroCo(args.arch, args.proj_dim).to(device, memory_format=run.fmt)
    run.encode, run.groups, run.metrics = model.backbone, crop_groups(args), ("loss", "pos_sim", "neg_sim")
    # PAPER: plain SGD, weight decay on every parameter (BN and biases too); no LARS (spec 3), LARC only in the probe
    params = [p for p in model.parameters() if p.requires_grad]
    run.opt = torch.optim.SGD(params, lr=scaled_lr(args), momentum=args.momentum, weight_decay=args.weight_decay)
    init = None
    if resume_state(run, set()) is None and args.init:  # a resumed run ignores --init
        init = init_weights(model, args.init, INIT_FORMATS)
        if run.rank == 0:
            print(init)
    net = model
    if run.world_size > 1 and args.sync_bn and device.type == "cuda":  # PAPER: SyncBN (PyTorch's needs CUDA)
        net = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model.per_view_bn(net)  # the SyncBNs are new modules
    if run.world_size > 1:
        net = nn.parallel.DistributedDataParallel(net, device_ids=[device] if device.type == "cuda" else None)
    run.ddp_model = torch.compile(net) if args.compile else net
    bench = run_benchmarks(run)
    run.total_steps = min(run.steps_per_epoch * args.epochs, math.inf if args.max_steps is None else args.max_steps)
    train_epochs(run)
    if run.rank == 0:  # the plain backbone: torchvision's resnet with fc = Identity loads it strictly
        save_checkpoint({k: v.cpu() for k, v in model.backbone.state_dict().items()}, f"{args.out_dir}/backbone.pt")
    res = evaluate(run, tag="final")
    if run.rank == 0:
        paper = "GroCo, Learning by Sorting (arXiv 2301.02009)"
        write_results(run, paper, dict(scaled_lr=scaled_lr(args), n_pos_augs=args.n_large, init=init), bench, res)
    if dist.is_initialized():
        dist.destroy_process_group()
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


# SHARED: image-runs
CIFAR = {"cifar10": (torchvision.datasets.CIFAR10, 10), "cifar100": (torchvision.datasets.CIFAR100, 100)}


def load_data(args: Args) -> dict:
    """Both splits: uint8 images [N, 3, S, S] (in memory) or file paths (streamed), int64 labels, on the CPU."""
    if args.dataset == "fake":  # random images, for shape tests and synthetic-data benchmarks
        g = torch.Generator().manual_seed(args.seed)
        n = max(256, 16 * args.batch_size)
        x = torch.randint(0, 256, (n + 64, 3, args.image_size, args.image_size), dtype=torch.uint8, generator=g)
        y = torch.arange(n + 64) % 10
        return dict(train_x=x[:n], train_y=y[:n], test_x=x[n:], test_y=y[n:], num_classes=10)
    root = Path(args.data_dir)
    if args.dataset in CIFAR:
        cls, num_classes = CIFAR[args.dataset]
        try:
            splits = [cls(str(root), train=train, download=args.download) for train in (True, False)]
        except (RuntimeError, OSError) as e:  # "Dataset not found or corrupted", or a failed download
            if args.download:  # it was allowed and failed: no network, or a bad --data-dir
                raise RunError(f"could not download {args.dataset} into {root} ({e}); without network, give a copy in "
                               "--data-dir (torchvision's layout) or use --dataset imagefolder")  # fmt: skip
            raise RunError(f"{args.dataset} not found in {root} ({e}); pass its --data-dir, or --download")
        tr, te = [(torch.from_numpy(s.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(s.targets)) for s in splits]
        return dict(train_x=tr[0], train_y=tr[1], test_x=te[0], test_y=te[1], num_classes=num_classes)
    train_root, test_root, classes = folder_splits(root)
    read = partial(load_image_folder, size=args.image_size) if args.in_memory else list_image_files
    (train_x, train_y), (test_x, test_y) = read(train_root, classes), read(test_root, classes)
    if not args.in_memory:
        train_x, train_y = train_x * args.train_repeat, train_y.repeat(args.train_repeat)
    return dict(train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y, num_classes=len(classes))


@dataclass(frozen=True)
class CropGroup:
    """n crops per image: RandomResizedCrop(size, scale), flip 0.5, then (if colour) ColorJitter(*jitter) with p 0.8,
    grayscale p 0.2, Gaussian blur (sigma U(0.1, 2)) with p blur and solarisation with p solarize."""

    n: int
    size: int
    scale: tuple
    jitter: tuple = (0.8, 0.8, 0.8, 0.2)  # brightness, contrast, saturation, hue strengths
    blur: float = 0.5
    solarize: float = 0.0
    colour: bool = True


def sample_view_params(gen: torch.Generator, n: int, group: CropGroup) -> dict:
    """Random draws of the per-crop transform for n crops, on the generator's device."""
    dev, (b, c, s, h) = gen.device, group.jitter

    def u(lo, hi, *shape):
        return lo + (hi - lo) * torch.rand(n, *shape, generator=gen, device=dev)

    # fmt: off
    return dict(
        area=u(*group.scale, 10), log_ratio=u(math.log(3 / 4), math.log(4 / 3), 10),  # RandomResizedCrop: 10 tries
        pos=u(0, 1, 2, 10),                                                             # top/left of each try
        flip=u(0, 1) < 0.5,                                                             # RandomHorizontalFlip
        jitter=u(0, 1) < 0.8,                                                           # RandomApply(ColorJitter, .8)
        factors=torch.stack([u(max(0, 1 - b), 1 + b), u(max(0, 1 - c), 1 + c), u(max(0, 1 - s), 1 + s), u(-h, h)], 1),
        order=torch.rand(n, 4, generator=gen, device=dev).argsort(1),                  # ColorJitter's random op order
        gray=u(0, 1) < 0.2,                                                             # RandomGrayscale(p=0.2)
        blur=u(0, 1) < group.blur, sigma=u(0.1, 2.0),                                   # PIL GaussianBlur(U(.1, 2))
        solarize=u(0, 1) < group.solarize,                                              # PIL Solarize(128)
    )
    # fmt: on


def rrc_boxes(h: torch.Tensor, w: torch.Tensor, p: dict) -> torch.Tensor:
    """torchvision RandomResizedCrop.get_params, batched: the first of 10 tries that fits, else a centre crop.
    h, w: float [n] image sizes; p: sample_view_params draws. Returns boxes [n, 4] (x1, y1, x2, y2) in pixels."""
    h, w = h[:, None].double(), w[:, None].double()  # float64 like torchvision's Python floats: same rounding
    target, ratio = h * w * p["area"].double(), torch.exp(p["log_ratio"]).double()  # exp in float32 as torchvision
    cw, ch = torch.round(torch.sqrt(target * ratio)), torch.round(torch.sqrt(target / ratio))
    fits = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
    first = fits.int().argmax(1, keepdim=True)  # index of the first fitting try
    cw, ch = cw.gather(1, first), ch.gather(1, first)
    top = torch.floor(p["pos"][:, 0].gather(1, first) * (h - ch + 1))  # randint(0, h - ch + 1)
    left = torch.floor(p["pos"][:, 1].gather(1, first) * (w - cw + 1))
    # no try fits: the largest centre crop with the ratio clamped to [3/4, 4/3]
    fw = torch.where(w / h > 4 / 3, torch.round(h * 4 / 3), w)
    fh = torch.where(w / h < 3 / 4, torch.round(w * 4 / 3), h)
    ok = fits.any(1, keepdim=True)
    cw, ch = torch.where(ok, cw, fw), torch.where(ok, ch, fh)
    top, left = torch.where(ok, top, torch.floor((h - fh) / 2)), torch.where(ok, left, torch.floor((w - fw) / 2))
    return torch.cat([left, top, left + cw, top + ch], 1).float()


def resized_crops(images: torch.Tensor, owner: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Cut boxes [n, 4] out of images [m, 3, H, W] (float 0..255; owner [n] picks the image), resized to size: the
    in-memory crops, on the device. DEVIATION: one batched roi_align instead of PIL's crop + bilinear resize: exact
    bilinear when enlarging, a grid of bilinear samples when shrinking (PIL: a triangle filter); samples at the
    crop's edge may read the neighbouring pixel outside the crop instead of repeating the edge."""
    rois = torch.cat([owner[:, None].to(boxes), boxes], 1)
    return roi_align(images, rois, (size, size), spatial_scale=1.0, sampling_ratio=-1, aligned=True)


def finish_views(x: torch.Tensor, p: dict, group: CropGroup, args: Args) -> torch.Tensor:
    """Flip, colour distortion, grayscale, blur (and solarize) on crops [n, 3, S, S] in 0..255, then Normalize: the
    official per-crop order (SwAV, DINO), batched. DEVIATION: float arithmetic instead of PIL's uint8 rounding after
    every op, and an exact Gaussian (radius 6 = 3 sigma at sigma 2) instead of PIL's box approximation."""
    x = x / 255
    x = torch.where(p["flip"][:, None, None, None], x.flip(-1), x)
    if group.colour:
        x = color_jitter(x, p["factors"], p["order"], p["jitter"])
        x = torch.where(p["gray"][:, None, None, None], grayscale(x).expand_as(x), x)
        x = torch.where(p["blur"][:, None, None, None], gaussian_blur(x, p["sigma"]), x)
        if group.solarize > 0:
            x = torch.where(p["solarize"][:, None, None, None] & (x >= 128 / 255), 1 - x, x)  # PIL: v >= 128
    return torch.stack([(x[:, c] - m) / sd for c, (m, sd) in enumerate(zip(args.mean, args.std))], 1)  # no H2D copy


class FolderViews(torch.utils.data.Dataset):
    """Streamed multi-crop items, decoded and cut (uint8) by a DataLoader worker. An item (index, seed) fixes every
    draw, so ranks and resumed runs replay the same crops."""

    def __init__(self, files: list, groups: list, args: Args):
        self.files, self.groups, self.args = files, groups, args

    def __getitem__(self, item):
        index, seed = item
        gen = torch.Generator().manual_seed(seed)
        params = [sample_view_params(gen, g.n, g) for g in self.groups]
        img = decode_checked(read_file(str(self.files[index])), self.files[index])
        h, w = (torch.full((1,), float(d)) for d in img.shape[-2:])
        for g, p in zip(self.groups, params):  # torchvision's tensor RandomResizedCrop: crop, antialiased uint8 resize
            boxes = rrc_boxes(h.expand(g.n), w.expand(g.n), p).int().tolist()
            resize = [F.interpolate(img[None, :, y1:y2, x1:x2], (g.size, g.size), mode="bilinear", antialias=True)
                      for x1, y1, x2, y2 in boxes]  # fmt: skip
            p["crops"] = torch.cat(resize)
        return params


def collate_views(batch: list) -> list:
    """Per group, b items' [n, ...] crops and draws -> [n*b, ...], crop-major (row v*b + i: crop v of item i)."""
    return [{k: torch.stack([x[g][k] for x in batch], 1).flatten(0, 1) for k in p} for g, p in enumerate(batch[0])]


def view_batches(run: SimpleNamespace, images, batches: list, keys: list, groups: list):
    """This rank's crops for each global index batch: per group float [n*b, 3, S, S], crop-major (row v*b + i is crop
    v of image i), normalised, on the device. In memory: CRUCIAL: the uint8 images never leave the device; the draws
    are made for the whole global batch from its key and each rank keeps its share, so 2 ranks see exactly 1 rank's
    crops. Streamed: DataLoader workers decode and crop the files, seeded per image position."""
    args, device, rank, world = run.args, run.device, run.rank, run.world_size
    if torch.is_tensor(images):
        gen = torch.Generator(device=device)
        for idx, key in zip(batches, keys):
            b = len(idx) // world
            x = images[idx[rank * b : (rank + 1) * b].to(device)].float()
            gen.manual_seed(rng_seed(*key))
            out = []
            for g in groups:
                p = sample_view_params(gen, g.n * len(idx), g)  # [n, B] crop-major, for the global batch: this rank's
                p = {k: v.unflatten(0, (g.n, -1))[:, rank * b : (rank + 1) * b].flatten(0, 1) for k, v in p.items()}
                h, w = (torch.full((g.n * b,), float(d), device=device) for d in x.shape[-2:])
                crops = resized_crops(x, torch.arange(b, device=device).repeat(g.n), rrc_boxes(h, w, p), g.size)
                out.append(finish_views(crops, p, g, args))
            yield out
        return
    items = []  # per step: (file index, item seed) of this rank's share of the global batch
    for idx, key in zip(batches, keys):
        b = len(idx) // world
        items.append([(i, rng_seed(*key, rank * b + j)) for j, i in enumerate(idx[rank * b : (rank + 1) * b].tolist())])
    loader = DataLoader(
        FolderViews(images, groups, args), batch_sampler=items, num_workers=args.workers, collate_fn=collate_views,
        pin_memory=device.type == "cuda", prefetch_factor=4 if args.workers else None,
        worker_init_fn=ignore_stop_signals,
    )  # fmt: skip
    for views in loader:  # per group: the crops and their draws
        views = [{k: v.to(device, non_blocking=True) for k, v in p.items()} for p in views]
        yield [finish_views(p["crops"].float(), p, g, args) for g, p in zip(groups, views)]


@torch.no_grad()
def extract_features(run: SimpleNamespace, split: str, subset: Optional[torch.Tensor] = None) -> torch.Tensor:
    """run.encode's features [n, F] (fp32, eval mode) of centre crops (streamed) or whole images (in memory), in
    chunks within --eval-memory-gb, sharded over ranks and gathered; `subset` selects image indices."""
    args, device, rank, world = run.args, run.device, run.rank, run.world_size
    images = run.data[f"{split}_x"]
    ids = torch.arange(len(run.data[f"{split}_y"])) if subset is None else subset
    per_rank = math.ceil(len(ids) / world)
    mine = ids[torch.arange(rank * per_rank, (rank + 1) * per_rank).clamp(max=len(ids) - 1)]  # padded, trimmed later
    run.model.eval()
    one = torch.zeros(1, 3, args.large_size, args.large_size, device=device).contiguous(memory_format=run.fmt)
    chunk = inputs_per_chunk(run.encode, one, args.eval_memory_gb)
    if torch.is_tensor(images):
        s = (args.large_size, args.large_size)
        stream = (images[c].to(device).float() for c in mine.to(images.device).split(chunk))
        stream = (F.interpolate(x, s, mode="bilinear", antialias=True) if x.shape[-2:] != s else x for x in stream)
    else:  # PAPER: Resize(256) + CenterCrop(224), decoded by the workers, one chunk per item
        decode = partial(decode_files, size=round(args.large_size * 256 / 224), crop=args.large_size)
        loader = DataLoader([[images[i] for i in c] for c in mine.split(chunk)], batch_size=None, collate_fn=decode,
                            num_workers=args.workers, worker_init_fn=ignore_stop_signals)  # fmt: skip
        stream = (x.to(device, non_blocking=True).float() for x in loader)
    mean, std = (torch.tensor(v, device=device)[:, None, None] * 255 for v in (args.mean, args.std))
    feats = []
    for x in tqdm(stream, total=math.ceil(len(mine) / chunk), desc=f"encode {split}", disable=rank != 0, leave=False):
        with run.autocast:
            feats.append(run.encode(((x - mean) / std).contiguous(memory_format=run.fmt)).float())
    feats = torch.cat(feats)
    if world > 1:
        out = [torch.empty_like(feats) for _ in range(world)]
        dist.all_gather(out, feats)
        feats = torch.cat(out)
    return feats[: len(ids)]


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


# SHARED: probe-evaluate
def evaluate(run: SimpleNamespace, tag: str) -> dict:
    """Weighted k-NN on pooled backbone features (a seeded subset during training, everything at the end), and at the
    end the linear probe (augmented per spec 8.1, or fast on precomputed features, labelled linear_fast_*)."""
    args, data, device = run.args, run.data, run.device
    final, nc = tag == "final", data["num_classes"]
    t0 = time.perf_counter()
    use_cache = final and run.world_size == 1  # cached per weights digest: a rerun of a finished run skips encoding
    digest = state_dict_digest(run.model.state_dict()) if use_cache else None
    key = rng_seed(digest, args.dataset, args.data_dir, args.large_size, args.mean, args.std)
    cache = ArtifactCache(Path(args.out_dir) / "cache", f"{key:014x}")
    feats, labels = {}, {}
    for split, size in (("train", args.eval_subset_train), ("test", args.eval_subset_test)):
        n = len(data[f"{split}_y"])
        g = torch.Generator().manual_seed(rng_seed(args.seed, "eval-subset", split))
        subset = None if final or size >= n else torch.randperm(n, generator=g)[:size].sort().values
        labels[split] = data[f"{split}_y"][slice(None) if subset is None else subset].to(device)
        feats[split] = cache.get(split) if use_cache else None
        if feats[split] is None:
            feats[split] = extract_features(run, split, subset)
            if use_cache:
                cache.put(split, feats[split].cpu())
        feats[split] = feats[split].to(device)
    ytr, yte = labels["train"], labels["test"]
    res, times = {}, dict(encode_s=time.perf_counter() - t0)
    if run.rank == 0:
        t0 = time.perf_counter()
        res["knn_top1"], res["knn_top5"] = knn_eval(feats["train"], ytr, feats["test"], yte, nc, args.knn_k, args.knn_t)
        times["knn_s"] = time.perf_counter() - t0
        if final and args.probe == "features":
            t0 = time.perf_counter()
            probe = linear_probe(
                feats["train"], ytr, feats["test"], yte, nc, args.probe_epochs, args.probe_lr, args.probe_wd,
                args.probe_batch_size, args.seed,
            )  # fmt: skip
            res["linear_fast_top1"], res["linear_fast_top1_best"] = probe["last"], probe["best"]
            times["probe_s"] = time.perf_counter() - t0
    if final and args.probe == "augmented":  # every rank takes part (data-parallel head)
        t0 = time.perf_counter()
        group = CropGroup(1, args.large_size, (0.08, 1.0), colour=False)

        def features(epoch: int, batches: list):  # x_train: RandomResizedCrop(0.08, 1) + flip, the frozen run.encode
            keys = [(args.seed, "probe", epoch, s) for s in range(len(batches))]
            run.model.eval()
            for (x,) in view_batches(run, data["train_x"], batches, keys, [group]):
                with torch.no_grad(), run.autocast:  # exited before the yield: the head trains with grad, in fp32
                    f = run.encode(x.contiguous(memory_format=run.fmt)).float()
                yield f

        # PAPER: N(0, 0.01) head, --probe-lr per 256 images, SGD (LARC with --probe-lars)
        probe = linear_probe(
            features, ytr, feats["test"], yte, nc, args.probe_epochs,
            args.probe_lr * args.probe_batch_size / 256, args.probe_wd, args.probe_batch_size, args.seed,
            init_std=0.01, lars=args.probe_lars, world_size=run.world_size,
        )  # fmt: skip
        res.update(linear_top1=probe["last"], linear_top1_best=probe["best"], linear_top5=probe["top5"])
        times["probe_s"] = time.perf_counter() - t0
    if run.world_size > 1:
        dist.barrier()
    if run.rank == 0:
        log_jsonl(run, dict(type="eval", tag=tag, step=run.global_step, **res, **times))
        print(f"eval @ {tag} | " + " | ".join(f"{k} {v:.2f}" for k, v in {**res, **times}.items()))
    for k, v in times.items():
        run.times[k] = run.times.get(k, 0.0) + v
    return res


# END SHARED


# SHARED: bare-resnet
def bare_step(run: SimpleNamespace):
    """The ceiling's step: a bare torchvision ResNet (ours for resnet18-cifar) forward+backward on synthetic crops of
    this recipe, one pass per resolution (no augmentation, head, loss or optimizer)."""
    args, device, b = run.args, run.device, run.args.batch_size // run.world_size
    bare = (getattr(torchvision.models, args.arch, None) or RESNETS[args.arch])().to(device, memory_format=run.fmt)
    crops = [torch.randn(g.n * b, 3, g.size, g.size, device=device).to(memory_format=run.fmt) for g in run.groups]

    def step():
        with run.autocast:
            out = torch.cat([bare(x) for x in crops])
        out.float().sum().backward()

    return step


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
