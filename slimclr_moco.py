"""SlimCLR: Slimmable Networks for Contrastive Self-supervised Learning (Zhao, Zhu, Wang, Yang; IJCV 2024),
arXiv 2209.15525.

What we reproduce: one pre-training run trains ONE slimmable ResNet-50 whose leading channels form networks of width
1.0, 0.75, 0.5 and 0.25 (25.6M / 14.8M / 6.9M / 2.0M parameters with a 1000-way classifier, 4.1 / 2.3 / 1.1 / 0.28
GMACs), each width with its own BatchNorm copies. The objective is MoCo v2 (queue 65536, momentum 0.999, T 0.2),
MoCo v3 (projector + predictor, symmetric loss, cosine momentum) or SimCLR (NT-Xent over the global batch, T 0.1, no
momentum encoder; official scripts/simclr.sh, models/s_simclr.py) applied at every width, plus the three SlimCLR
techniques: a slow start (the sub-networks join halfway), online distillation of the full network's contrastive
logits into every sub-network, and loss re-weighting (the full network's loss x 1 + sum of the sub-widths). The keys
and the queue always come from the full-width momentum encoder. Evaluation: a switchable linear probe (one head per
width, the sub-width heads distilled from the full one) and, our addition, a weighted k-NN per width. Official code:
mzhaoshuai/SlimCLR (scripts/mocov2.sh, scripts/mocov3.sh); spec: ../shared/specs/slimclr.md.

Runs (ImageNet, global batch 1024; flags override the recipe):
    torchrun --nproc_per_node=4 slimclr_moco.py mocov2 --data-dir IMAGENET            # SlimCLR-MoCov2, 200 epochs
    torchrun --nproc_per_node=4 slimclr_moco.py mocov2 --data-dir IMAGENET --epochs 800 --slim-start-epoch 400 \\
        --warmup-epochs 10                                                           # SlimCLR-MoCov2, 800 epochs
    torchrun --nproc_per_node=8 slimclr_moco.py mocov3 --data-dir IMAGENET            # SlimCLR-MoCov3, 300 epochs
    torchrun --nproc_per_node=8 slimclr_moco.py simclr --data-dir IMAGENET            # SlimCLR-SimCLR, 100 epochs
    torchrun --nproc_per_node=4 slimclr_moco.py mocov2 --data-dir IMAGENET --widths 1.0   # MoCo v2, SlimCLR's recipe
    torchrun --nproc_per_node=8 slimclr_moco.py mocov3 --data-dir IMAGENET --widths 1.0   # MoCo v3, SlimCLR's recipe
    python slimclr_moco.py mocov2 --data-dir IMAGENET --max-steps 0 \\
        --init slimclr-mocov2-ep200-48213217.pth.tar    # evaluates a released model (mocov3: its v3 release)
    python slimclr_moco.py cifar-mocov2 --dataset imagefolder --data-dir CIFAR10_JPEG  # CIFAR proxy (ours)
    python slimclr_moco.py cifar-mocov3 --dataset cifar10 --data-dir CIFAR10          # CIFAR proxy (ours)
    python slimclr_moco.py cifar-simclr --dataset cifar10 --data-dir CIFAR10          # CIFAR proxy (ours)
    python slimclr_moco.py cifar-mocov2 --dataset imagefolder --data-dir DIR --arch resnet18 --batch-size 32 \\
        --queue-size 64 --epochs 1 --device cpu --out-dir OUT   # quick CPU run: under a minute on 200 images
Published targets: the plain baselines MoCo v2 R50 67.5 (200 ep) / 71.1 (800 ep; MoCo's own recipe: batch 256, lr
0.03) and MoCo v3 R50 72.8 (300 ep, batch 4096). The paper's per-width SlimCLR table could not be retrieved when this
script was written (spec 5); the official probe logs are in release 1.0.0 of mzhaoshuai/SlimCLR. SlimCLR-SimCLR: the
official README and scripts give no number and release no checkpoint; we found none in the paper text we could read.

The slow-start LR (spec 2.4, 3.4): from epoch --slim-start-epoch the official loop continues the cosine with the peak
--slim-start-lr: MoCo v3's 3.2 at batch 1024 (0.8 per 256 here; the LR jumps up). MoCo v2 and SimCLR pass none, so
the params.py default 1e-4 drops the LR from about 0.11 (SimCLR: 1.41) to 5e-5 halfway, which looks unintended; our
defaults keep the peak (--slim-start-lr unset); `--slim-start-lr 1e-4` reproduces the shipped behaviour.

Deviations (each marked `# DEVIATION:` below): crops are cut and resized by torchvision's tensor ops in the workers
or one roi_align on the device (official: PIL), and colour/blur run batched on the device in float; bf16 autocast
(official: fp16 AMP) with every loss in fp32; the shuffle-BN permutation is drawn from a seeded stream on every rank
instead of being broadcast from rank 0; SimCLR's gradient is the global loss's at any world size (official: 1/world
of it); the k-NN (k 200, T 0.07) is ours, SlimCLR reports none."""

import copy
import dataclasses
import hashlib
import json
import math
import os
import platform
import re
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Annotated, Literal, Optional, Tuple, Union

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
import tyro
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode
from torchvision.io import ImageReadMode, decode_image, decode_jpeg, read_file
from torchvision.ops import roi_align
from torchvision.transforms import v2 as T
from tqdm import tqdm

from common.checkpoint import ArtifactCache, CheckpointError, init_weights, own_checkpoint, resume_state, save_state
from common.checkpoint import save_checkpoint, state_dict_digest, strip_prefix, torchvision_resnet
from common.resnet import RESNETS


# ==== 1. ARGS ====
@dataclass
class Args:
    # --- I/O & experiment
    recipe: str = "mocov2"
    """which preset these defaults came from (set by the subcommand: mocov2, mocov3, simclr, cifar-mocov2, ...)"""
    exp_name: str = "slimclr-mocov2"
    """name stored in results.json"""
    seed: int = 3407
    """seed for the model init, the data order and every augmentation draw (official scripts: 3407)"""
    out_dir: str = "runs/slimclr-mocov2"
    """where last.pt, log.jsonl, results.json and the feature cache go; an existing last.pt is resumed"""
    resume: Optional[str] = None
    """resume from this checkpoint instead of out_dir/last.pt"""
    init: Optional[str] = None
    """start from these weights unless a last.pt is resumed (which ignores --init); README: Use released weights"""
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

    # --- views (spec 2.4: MoCo v2 "aug+"; spec 3.4: MoCo v3's asymmetric BYOL views)
    large_size: int = 224
    """view size in pixels (both views; also the evaluation's centre crop)"""
    large_scale: Tuple[float, float] = (0.2, 1.0)
    """RandomResizedCrop area range of both views (official 0.2-1 for v2 and v3)"""
    jitter: Tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)
    """ColorJitter brightness, contrast, saturation, hue, with p 0.8 (v2: 0.4/0.4/0.4/0.1; v3: 0.4/0.4/0.2/0.1)"""
    blur: Tuple[float, float] = (0.5, 0.5)
    """Gaussian-blur probability (sigma U(0.1, 2)) of view 1 and view 2 (v2: 0.5, 0.5; v3: 1.0, 0.1)"""
    solarize: Tuple[float, float] = (0.0, 0.0)
    """solarisation probability of view 1 and view 2 (v2: none; v3: 0, 0.2)"""
    mean: Tuple[float, float, float] = (0.485, 0.456, 0.406)
    """normalisation mean (ImageNet)"""
    std: Tuple[float, float, float] = (0.229, 0.224, 0.225)
    """normalisation std (ImageNet)"""

    # --- model (spec 1, 2.1, 3.1)
    moco: Literal["v2", "v3", "simclr"] = "v2"
    """MoCo v2 (queue, one query view, shuffle-BN), v3 (predictor, symmetric loss) or SimCLR (no momentum encoder)"""
    arch: str = "resnet50"
    """slimmable backbone: resnet50, resnet18 or resnet18-cifar (3x3 stem, no max-pool)"""
    widths: Tuple[float, ...] = (1.0, 0.75, 0.5, 0.25)
    """width multipliers trained together; must contain 1.0, the full network (official [1, .75, .5, .25])"""
    dim: int = 128
    """output dimension of the head (never sliced; v2 128, v3 256)"""
    mlp_dim: int = 4096
    """hidden width of the v3 projector and predictor (official 4096), SimCLR's head (2048) at width 1 (v2: F w)"""
    sync_bn: bool = True
    """v3, SimCLR: SyncBatchNorm on CUDA under DDP (official); v2 uses shuffle-BN (PyTorch's SyncBN is GPU-only)"""

    # --- method (spec 2.2, 3.2)
    queue_size: int = 65536
    """v2: K keys in the queue; a multiple of the global batch (official 65536)"""
    moco_m: float = 0.999
    """momentum of the key encoder (v2 0.999 constant; v3 0.99, rising to 1 with --moco-m-cos)"""
    moco_m_cos: bool = False
    """v3: momentum 1 - (1 - moco_m)(1 + cos(pi epoch / epochs)) / 2, per step (official v3)"""
    temperature: float = 0.2
    """contrastive temperature T (v2 0.2, v3 1.0)"""
    slim_start_epoch: float = 100.0
    """slow start: the sub-networks join the loss from this (fractional) epoch (official: epochs / 2; -1: at once)"""
    distill_weight: float = 0.5
    """a: a sub-network's loss is (1 - a) InfoNCE + a distillation from the full network (official 0.5; 0: none)"""
    distill_temperature: float = 5.0
    """t: distillation temperature; the term is multiplied by t^2 (v2 5.0, v3 1.0)"""
    reweight: bool = True
    """loss re-weighting (official option 5): the full network's loss x (1 + sum of sub-widths) after the slow start"""
    full_distill: bool = False
    """each sub-network distils from every larger width too (averaged; official option, off in every run)"""

    # --- optimisation (spec 2.4, 3.4)
    epochs: int = 200
    """training epochs (v2 200 or 800, v3 300)"""
    max_steps: Optional[int] = None
    """stop after this many steps in total without changing the schedule (benchmarks; 0: evaluate the init)"""
    batch_size: int = 1024
    """images per step, global over all ranks (official 1024: 4 GPUs x 256 for v2, 8 x 128 for v3)"""
    optimizer: Literal["sgd", "lars"] = "sgd"
    """v2: SGD; v3: LARS (MoCo v3's: trust 0.001, no weight decay or trust ratio for 1-D parameters)"""
    lr: float = 0.2
    """peak LR (v2 0.2 at any batch; v3 0.3 per 256 images, see --lr-scaling)"""
    lr_scaling: Literal["none", "linear"] = "none"
    """none: --lr is the peak; linear: the peak is lr x batch/256 (v3: 1.2 at 1024)"""
    # DEVIATION: v2 keeps its peak at the slow start (the official v2 script falls back to 1e-4, see the docstring)
    slim_start_lr: Optional[float] = None
    """peak LR from --slim-start-epoch on, scaled like --lr (v3 0.8 per 256 = 3.2; v2: unset, see the docstring)"""
    warmup_epochs: float = 10.0
    """linear warm-up from 1e-8, per step (official v2 5% of 200 = 10 epochs; v3 3.3% of 300 = 9.9)"""
    momentum: float = 0.9
    """SGD / LARS momentum (official)"""
    weight_decay: float = 1e-4
    """weight decay (v2 1e-4 on every parameter, BN and biases included; v3 1e-6 on matrices and kernels only)"""

    # --- evaluation (spec 4)
    eval_every: int = 10
    """epochs between per-width k-NN evaluations on a subset during training (0: off)"""
    eval_every_steps: int = 0
    """also evaluate every this many steps (0: off)"""
    eval_subset_train: int = 30000
    """training images used as the k-NN memory during training (the final k-NN uses all)"""
    eval_subset_test: int = 10000
    """test images used during training"""
    # DEVIATION: the probe's validation crops are an antialiased bilinear Resize(256) + CenterCrop(224) of tensors
    probe: Literal["augmented", "features", "none"] = "augmented"
    """final switchable probe: augmented (official: RandomResizedCrop + flip batches) or features (fast, precomputed)"""
    probe_epochs: int = 100
    """switchable-probe epochs (v2 100, v3 90)"""
    probe_lr: float = 60.0
    """switchable-probe LR at --probe-batch-size (official v2 60.0, v3 0.4)"""
    probe_schedule: Literal["step", "cosine"] = "step"
    """step: x0.1 at 60% and 80% of the epochs (v2: 60, 80 of 100); cosine per epoch without warm-up (v3)"""
    probe_wd: float = 0.0
    """switchable-probe weight decay (official 0)"""
    probe_batch_size: int = 1024
    """switchable-probe global batch (official 1024)"""
    probe_eval_every: int = 2
    """evaluate the probe every this many epochs (official 2; the best epoch is picked by the full width's top-1)"""
    # DEVIATION: a project requirement, not in SlimCLR: the standard weighted k-NN per width
    knn_k: int = 200
    """neighbours of the weighted k-NN (ours, spec 4: k 200)"""
    knn_t: float = 0.07
    """temperature of the k-NN vote weights exp(sim/t)"""
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


# MoCo v3 (spec 3.4, scripts/mocov3.sh run "01"): LARS, LR 0.3 x batch/256 = 1.2 at 1024, the slow start raises the
# peak to 0.8 x batch/256 = 3.2; T 1; momentum 0.99 -> 1; asymmetric views.
# fmt: off
MOCOV3 = dataclasses.replace(Args(), recipe="mocov3", exp_name="slimclr-mocov3", out_dir="runs/slimclr-mocov3",
    jitter=(0.4, 0.4, 0.2, 0.1), blur=(1.0, 0.1), solarize=(0.0, 0.2), moco="v3", dim=256, moco_m=0.99,
    moco_m_cos=True, temperature=1.0, slim_start_epoch=150, distill_temperature=1.0, epochs=300, optimizer="lars",
    lr=0.3, lr_scaling="linear", slim_start_lr=0.8, warmup_epochs=9.9, weight_decay=1e-6, probe_epochs=90,
    probe_lr=0.4, probe_schedule="cosine")
# SimCLR (scripts/simclr.sh run "02", models/s_simclr.py, dataset/dataloader.py `simclr`): LARS, LR 2.4 at 1024 (its
# 0.075 sqrt(batch)), warm-up 10% of 100 epochs, the sub-networks from epoch 50, T 0.1, distillation t 5 on cosines;
# views RandomResizedCrop(0.08, 1), ColorJitter(0.8, 0.8, 0.8, 0.2), blur p 0.5 on both; probe SGD 0.4, wd 1e-6, 90 ep.
SIMCLR = dataclasses.replace(Args(), recipe="simclr", exp_name="slimclr-simclr", out_dir="runs/slimclr-simclr",
    large_scale=(0.08, 1.0), jitter=(0.8, 0.8, 0.8, 0.2), moco="simclr", mlp_dim=2048, temperature=0.1,
    slim_start_epoch=50, epochs=100, optimizer="lars", lr=2.4, weight_decay=1e-6, probe_epochs=90, probe_lr=0.4,
    probe_schedule="cosine", probe_wd=1e-6)
# The CIFAR proxies (ours: the paper has no CIFAR runs). Slimmable ResNet-18 with the 3x3 stem, 2 x 32 px, no blur,
# data decoded once and kept on the device; v2 after the MoCo CIFAR-10 demo (K 4096, m 0.99, T 0.1, lr 0.06, wd 5e-4).
CIFAR_PROXY = dict(dataset="cifar10", in_memory=True, image_size=32, large_size=32, mean=(0.4914, 0.4822, 0.4465),
    std=(0.2470, 0.2435, 0.2616), blur=(0.0, 0.0), arch="resnet18-cifar", save_every_steps=0, epochs=100,
    slim_start_epoch=50, batch_size=512, warmup_epochs=5, eval_every=10, eval_subset_train=50000, probe="features",
    probe_epochs=100, probe_lr=0.1, probe_schedule="cosine", probe_batch_size=256)
CIFAR_MOCOV2 = dataclasses.replace(Args(), recipe="cifar-mocov2", exp_name="slimclr-cifar-mocov2", **CIFAR_PROXY,
    out_dir="runs/slimclr-cifar-mocov2", queue_size=4096, moco_m=0.99, temperature=0.1, lr=0.06, weight_decay=5e-4)
CIFAR_MOCOV3 = dataclasses.replace(MOCOV3, recipe="cifar-mocov3", exp_name="slimclr-cifar-mocov3", **CIFAR_PROXY,
    out_dir="runs/slimclr-cifar-mocov3", mlp_dim=2048, temperature=0.2, slim_start_lr=None, weight_decay=1e-5)
# SimCLR after google-research/simclr's CIFAR-10 command (T 0.5, lr 1.0 x batch/256, wd 1e-4, jitter strength 0.5)
CIFAR_SIMCLR = dataclasses.replace(SIMCLR, recipe="cifar-simclr", exp_name="slimclr-cifar-simclr", **CIFAR_PROXY,
    out_dir="runs/slimclr-cifar-simclr", jitter=(0.4, 0.4, 0.4, 0.1), mlp_dim=512, temperature=0.5, lr=1.0,
    lr_scaling="linear", weight_decay=1e-4)
# fmt: on
RECIPES = Union[
    Annotated[Args, tyro.conf.subcommand("mocov2", default=Args(), description="SlimCLR-MoCov2, 200 epochs")],
    Annotated[Args, tyro.conf.subcommand("mocov3", default=MOCOV3, description="SlimCLR-MoCov3, 300 epochs")],
    Annotated[Args, tyro.conf.subcommand("simclr", default=SIMCLR, description="SlimCLR-SimCLR, 100 epochs")],
    Annotated[Args, tyro.conf.subcommand("cifar-mocov2", default=CIFAR_MOCOV2, description="CIFAR proxy (ours)")],
    Annotated[Args, tyro.conf.subcommand("cifar-mocov3", default=CIFAR_MOCOV3, description="CIFAR proxy (ours)")],
    Annotated[Args, tyro.conf.subcommand("cifar-simclr", default=CIFAR_SIMCLR, description="CIFAR proxy (ours)")],
]


def parse_args(argv: Optional[list] = None) -> Args:
    """The command line: a recipe subcommand, then flags that override it. Without one, the first recipe runs with
    its own defaults (CRUCIAL: tyro's `default=` must be that recipe itself, or it replaces the recipe's values)."""
    return tyro.cli(RECIPES, default=Args(), args=argv)


# ==== 2. VIEWS ====
def crop_groups(args: Args) -> list:
    """The two views, one group each: RandomResizedCrop(scale), flip, ColorJitter(*jitter) p 0.8, grayscale p 0.2,
    then each view's blur and solarize probability (v2: the same pipeline twice; v3: blur 1 / 0.1, solarize 0 / 0.2)."""
    jit, scale = tuple(args.jitter), tuple(args.large_scale)
    return [CropGroup(1, args.large_size, scale, jit, args.blur[v], args.solarize[v]) for v in range(2)]


# ==== 3. MODEL ====
def slim(c: int, width: float) -> int:
    """Channels of a layer of full size c at this width. PAPER: int(c x w), truncation, no rounding (spec 1.1)."""
    return int(c * width)


class SubWidthKernels(torch.autograd.Function):
    """The kernels of every sub-width at once, weight[:o, :i] per (o, i), contiguous: one forward copy per width for
    all the step's views, and one full-size gradient into which each width's adds in place (slicing per call instead
    copies per view and zero-fills a full-size gradient per width)."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, *shapes) -> tuple:
        ctx.shapes, ctx.full = shapes, weight.shape
        return tuple(weight[:o, :i].clone(memory_format=torch.contiguous_format) for o, i in shapes)

    @staticmethod
    def backward(ctx, *grads) -> tuple:
        full = grads[0].new_zeros(ctx.full)
        for (o, i), g in zip(ctx.shapes, grads):  # unused outputs' gradients come as zeros (materialize_grads)
            full[:o, :i] += g
        return (full, *[None] * len(ctx.shapes))


@contextmanager
def sub_width_kernels(module: nn.Module, widths: list):
    """Within it (with gradients), each slim layer's sub-width kernels are made once for the step (SubWidthKernels)."""
    layers = [m for m in module.modules() if isinstance(m, SlimLayer)]
    subs = [w for w in widths if w < 1.0] if torch.is_grad_enabled() else []
    try:  # CRUCIAL: made inside it, so that a failure midway leaves no layer's kernels set
        for m in layers if subs else []:
            m.sub_width_kernels = dict(zip(subs, SubWidthKernels.apply(m.weight, *(m.shape_at(w) for w in subs))))
        yield
    finally:
        for m in layers:
            m.sub_width_kernels = None


class SlimLayer:
    """SlimConv2d's and SlimLinear's slicing: one full-size weight; width w uses its leading slice
    weight[:int(out x w), :c_in] (0.25 in 0.5 in 0.75 in 1), c_in the input's channels (the previous layer's slice).
    slim_in / slim_out=False keeps that side whole (the stem's 3 inputs; the embeddings, classes)."""

    slim_in, slim_out, sub_width_kernels = True, True, None  # sub_width_kernels: {width: kernel} within the context

    def shape_at(self, width: float) -> tuple:
        o, i = self.weight.shape[:2]
        return slim(o, width) if self.slim_out else o, slim(i, width) if self.slim_in else i

    def kernel(self, width: float, c_in: int) -> torch.Tensor:
        if self.sub_width_kernels and width in self.sub_width_kernels:
            return self.sub_width_kernels[width]
        return self.weight[: self.shape_at(width)[0], :c_in]


class SlimConv2d(SlimLayer, nn.Conv2d):
    def __init__(self, c_in, c_out, k, stride=1, padding=0, slim_in=True):
        super().__init__(c_in, c_out, k, stride, padding, bias=False)
        self.slim_in = slim_in

    def forward(self, x: torch.Tensor, width: float) -> torch.Tensor:
        return F.conv2d(x, self.kernel(width, x.shape[1]), None, self.stride, self.padding)


class SlimLinear(SlimLayer, nn.Linear):
    def __init__(self, f_in, f_out, bias=True, slim_in=True, slim_out=True):
        super().__init__(f_in, f_out, bias=bias)
        self.slim_in, self.slim_out = slim_in, slim_out

    def forward(self, x: torch.Tensor, width: float) -> torch.Tensor:
        bias = None if self.bias is None else self.bias[: self.shape_at(width)[0]]
        return F.linear(x, self.kernel(width, x.shape[-1]), bias)


class SwitchBN(nn.Module):
    """Switchable BatchNorm (spec 1.2): one independent BN per width (own affine parameters AND running statistics),
    sized for that width's slice (or full size, slim=False); the width picks the copy. Nothing is shared."""

    def __init__(self, c: int, widths, dims: int = 2, affine: bool = True, slim: bool = True):
        super().__init__()
        bn = nn.BatchNorm2d if dims == 2 else nn.BatchNorm1d
        self.widths = [float(w) for w in widths]
        self.bn = nn.ModuleList(bn(int(c * w) if slim else c, affine=affine) for w in self.widths)

    def forward(self, x: torch.Tensor, width: float) -> torch.Tensor:
        return self.bn[self.widths.index(width)](x)


class SlimSequential(nn.Sequential):
    """nn.Sequential that passes the width to every layer but the ReLUs."""

    def forward(self, x: torch.Tensor, width: float) -> torch.Tensor:
        for m in self:
            x = m(x) if isinstance(m, nn.ReLU) else m(x, width)
        return x


class SlimBlock(nn.Module):
    """ResNet v1.5 block (the stride on the 3x3 conv): bottleneck (1x1, 3x3, 1x1; mid = out / 4) or basic (3x3, 3x3);
    a projection shortcut (1x1 conv + BN) exactly when the stride or the channel count changes; ReLU after the add."""

    def __init__(self, c_in: int, c_out: int, stride: int, widths, bottleneck: bool):
        super().__init__()
        if bottleneck:
            mid = c_out // 4
            convs = [SlimConv2d(c_in, mid, 1), SlimConv2d(mid, mid, 3, stride, 1), SlimConv2d(mid, c_out, 1)]
        else:
            convs = [SlimConv2d(c_in, c_out, 3, stride, 1), SlimConv2d(c_out, c_out, 3, 1, 1)]
        self.convs = nn.ModuleList(convs)
        self.bns = nn.ModuleList(SwitchBN(c.out_channels, widths) for c in convs)
        proj = stride != 1 or c_in != c_out
        self.shortcut = SlimSequential(SlimConv2d(c_in, c_out, 1, stride), SwitchBN(c_out, widths)) if proj else None

    def forward(self, x: torch.Tensor, width: float) -> torch.Tensor:
        out = x
        for i, (conv, bn) in enumerate(zip(self.convs, self.bns)):  # conv - BN, a ReLU between them
            out = bn(conv(out if i == 0 else F.relu(out), width), width)
        return F.relu(out + (x if self.shortcut is None else self.shortcut(x, width)))


class SlimResNet(nn.Module):
    """Slimmable ResNet (spec 1.1): stem int(64w) (3 input channels), stages of int(64 2^s e w) channels (e = 4 for
    bottlenecks), pooled to int(F w) features, an optional classifier (num_classes outputs at every width).
    forward(x, width=None) returns {width: output}, every width in turn when None; forward_width returns the tensor."""

    def __init__(self, layers, widths, bottleneck: bool, cifar_stem: bool = False, num_classes: int = 0):
        super().__init__()
        self.widths = sorted((float(w) for w in widths), reverse=True)
        k, stride, pad = (3, 1, 1) if cifar_stem else (7, 2, 3)  # the CIFAR stem: 3x3 stride 1, no max-pool
        self.conv1 = SlimConv2d(3, 64, k, stride, pad, slim_in=False)
        self.bn1, self.maxpool = SwitchBN(64, self.widths), not cifar_stem
        self.layers, c_in = nn.ModuleList(), 64
        for s, n in enumerate(layers):  # the first block of every stage but the first has stride 2
            c_out, stride = 64 * 2**s * (4 if bottleneck else 1), 1 if s == 0 else 2
            blocks = [SlimBlock(c_in if i == 0 else c_out, c_out, stride if i == 0 else 1, self.widths, bottleneck)
                      for i in range(n)]  # fmt: skip
            self.layers.append(SlimSequential(*blocks))
            c_in = c_out
        self.num_features = c_in
        self.fc = SlimLinear(c_in, num_classes, slim_out=False) if num_classes else None
        init_slim(self)

    def forward_width(self, x: torch.Tensor, width: float) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x, width), width))
        x = F.max_pool2d(x, 3, 2, 1) if self.maxpool else x
        for stage in self.layers:
            x = stage(x, width)
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return x if self.fc is None else self.fc(x, width)

    def forward(self, x: torch.Tensor, width: Optional[float] = None) -> dict:
        return {w: self.forward_width(x, w) for w in (self.widths if width is None else [float(width)])}


def init_slim(module: nn.Module) -> None:
    """Official init (spec 1.3): convs Kaiming-normal (fan_out, relu); BN gamma 1, beta 0 (PyTorch's), but the last BN
    of every residual block zero in every width copy (zero_init_residual); every Linear N(0, 0.01) with bias 0."""
    for m in module.modules():
        if isinstance(m, SlimConv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, SlimBlock):
            for bn in m.bns[-1].bn:
                nn.init.zeros_(bn.weight)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def slimmable_resnet50(num_classes: int = 1000, widths=(1.0, 0.75, 0.5, 0.25)) -> SlimResNet:
    """Slimmable ResNet-50 (blocks [3, 4, 6, 3]); num_classes 0: no classifier (the SSL backbone, 2048w features)."""
    return SlimResNet([3, 4, 6, 3], widths, bottleneck=True, num_classes=num_classes)


SLIM_RESNETS = {
    "resnet50": slimmable_resnet50,
    "resnet18": lambda num_classes=0, widths=(1.0,): SlimResNet([2, 2, 2, 2], widths, False, False, num_classes),
    "resnet18-cifar": lambda num_classes=0, widths=(1.0,): SlimResNet([2, 2, 2, 2], widths, False, True, num_classes),
}


def active_param_count(model: nn.Module, width: float) -> int:
    """Parameters the network of this width uses (spec 1.4): the weight and bias slices of every slimmable layer,
    its own BN copy, and every other parameter in full. Running statistics are buffers and not counted."""

    def used(m):  # the slice of m's parameters this width reads
        if isinstance(m, SwitchBN):
            return sum(p.numel() for p in m.bn[m.widths.index(width)].parameters())
        f_out, f_in = m.shape_at(width)
        return f_out * (f_in * m.weight[0, 0].numel() + (m.bias is not None))  # kernel size x inputs (+ a bias)

    slimmable = [m for m in model.modules() if isinstance(m, (SlimLayer, SwitchBN))]
    inside = {id(p) for m in slimmable for p in m.parameters()}
    return sum(p.numel() for p in model.parameters() if id(p) not in inside) + sum(used(m) for m in slimmable)


@torch.no_grad()
def active_macs(model: SlimResNet, width: float, size: int) -> int:
    """Multiply-accumulates of one size x size image through the convs and linear layers at this width (eval mode)."""
    was_training, p = model.training, next(model.parameters())
    with FlopCounterMode(display=False) as counter:  # counts the convs and matrix products only, 2 flops per MAC
        model.eval().forward_width(torch.zeros(1, 3, size, size, device=p.device, dtype=p.dtype), float(width))
    model.train(was_training)
    return counter.get_total_flops() // 2


class SlimEncoder(nn.Module):
    """Backbone + head at one width: v2 head Linear(F w, F w) - ReLU - Linear(F w, 128) with biases, no BN (spec 2.1);
    v3 projector Linear(F w, 4096 w) - BN - ReLU - Linear(4096 w, 256) - BN(affine=False), no biases (spec 3.1);
    SimCLR's the same with 2048 w, 128, the first Linear's bias and an affine last BN (s_resnet.py `simclr_slim`)."""

    def __init__(self, args: Args):
        super().__init__()
        self.backbone = SLIM_RESNETS[args.arch](num_classes=0, widths=args.widths)
        f, w = self.backbone.num_features, self.backbone.widths
        if args.moco == "v2":
            self.head = SlimSequential(SlimLinear(f, f), nn.ReLU(inplace=True), SlimLinear(f, args.dim, slim_out=False))
        else:
            s = args.moco == "simclr"
            self.head = SlimSequential(
                SlimLinear(f, args.mlp_dim, bias=s), SwitchBN(args.mlp_dim, w, dims=1), nn.ReLU(inplace=True),
                SlimLinear(args.mlp_dim, args.dim, bias=False, slim_out=False),
                SwitchBN(args.dim, w, dims=1, affine=s, slim=False),  # per width, but 256 (128) wide at every width
            )  # fmt: skip
        init_slim(self)  # PAPER: every Linear inside the encoder N(0, 0.01)

    def forward(self, x: torch.Tensor, width: float) -> torch.Tensor:
        return self.head(self.backbone.forward_width(x, width), width)


class Online(nn.Module):
    """The trained branch: the encoder, and for v3 the predictor Linear(256, 4096 w) - BN - ReLU - Linear(4096 w, 256)
    (outside the encoder: PyTorch's default Linear init, spec 1.3). The one module DDP wraps."""

    def __init__(self, args: Args):
        super().__init__()
        self.encoder = SlimEncoder(args)
        self.predictor = None
        if args.moco == "v3":
            self.predictor = SlimSequential(
                SlimLinear(args.dim, args.mlp_dim, bias=False, slim_in=False),
                SwitchBN(args.mlp_dim, self.encoder.backbone.widths, dims=1), nn.ReLU(inplace=True),
                SlimLinear(args.mlp_dim, args.dim, bias=False, slim_out=False),
            )  # fmt: skip

    def forward(self, views: list, widths: list) -> list:
        """views: images [b, 3, S, S] each. Returns per view {width: embedding [b, D]} (not normalised).
        CRUCIAL: every width is a separate pass of the same images, with its own BN batch statistics (spec 7.5)."""
        predict = (lambda e, w: e) if self.predictor is None else self.predictor  # v2: no predictor
        with sub_width_kernels(self, widths):
            return [{w: predict(self.encoder(x, w), w) for w in widths} for x in views]


class SlimCLR(nn.Module):
    """Online branch, full-width momentum encoder (a copy of the encoder, every BN copy included, no gradient; SimCLR:
    None) and, for v2, the queue [K, D] of L2-normalised full-width keys, initialised with normalised Gaussian noise."""

    def __init__(self, args: Args):
        super().__init__()
        self.online = Online(args)
        encoder = self.online.encoder
        self.momentum_encoder = None if args.moco == "simclr" else copy.deepcopy(encoder).requires_grad_(False)
        if args.moco == "v2":
            self.register_buffer("queue", F.normalize(torch.randn(args.queue_size, args.dim), dim=1))


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, m: float) -> None:
    """teacher <- m teacher + (1 - m) student, every parameter (the full tensors and every BN copy; spec 2.1)."""
    torch._foreach_lerp_(list(teacher.parameters()), list(student.parameters()), 1.0 - m)


@torch.no_grad()
def momentum_keys(run: SimpleNamespace, x: torch.Tensor, step: int) -> tuple:
    """Full-width keys [b, D] of this rank's images and [B, D] of the global batch, L2-normalised, fp32. v2 under DDP:
    shuffle-BN (spec 2.1), so that no key's BN statistics come from its query's images (per-rank statistics would leak
    the positive). DEVIATION: the permutation is a seeded stream alike on every rank (official: drawn on rank 0 and
    broadcast). v3, or one process (nothing to shuffle across; the official code needs DDP): no shuffle."""
    rank, b = run.rank, len(x)
    shuffle = run.args.moco == "v2" and run.world_size > 1
    if shuffle:  # this rank encodes its share of the permuted global batch
        gen = torch.Generator(device=x.device).manual_seed(rng_seed(run.args.seed, "shuffle-bn", step))
        perm = torch.randperm(b * run.world_size, generator=gen, device=x.device)
        x = gather_with_grad(x)[perm[rank * b : (rank + 1) * b]]
    with run.autocast:
        k = run.model.momentum_encoder(x.contiguous(memory_format=run.fmt), 1.0)
    k_all = gather_with_grad(F.normalize(k.float(), dim=1))
    k_all = k_all[perm.argsort()] if shuffle else k_all  # un-permuted: row i is the key of global image i
    return k_all[rank * b : (rank + 1) * b], k_all


# ==== 4. LOSS ====
def distill_ce(student: torch.Tensor, teacher: torch.Tensor, t: float) -> torch.Tensor:
    """t^2 mean_b[-sum_j softmax(teacher / t)_j log_softmax(student / t)_j], the teacher detached. PAPER (official
    kd_distill_loss_v2): cross-entropy, not KL (larger by t^2 H(teacher), the same gradient)."""
    p = F.softmax(teacher.detach().float() / t, dim=1)
    return t * t * -(p * F.log_softmax(student.float() / t, dim=1)).sum(1).mean()


def slimclr_combine(q_by_width: dict, logits, nce, active: bool, a: float, t: float, reweight, full_distill, top1=None):
    """The SlimCLR combination (spec 2.2 steps 4-6). q_by_width: {width: [B, D]}; logits: q -> (logits [B, C], the
    positives [B]); nce: (logits, positives) -> one width's contrastive loss. Before the slow start (not active): the
    full network's loss alone, unweighted (PAPER: the sub-widths contribute exactly 0). After it, a = distill_weight:
        lambda_max nce_max + sum_w<max [(1 - a) nce_w + a kd_w],  lambda_max = 1 + sum of the sub-widths (reweight)
    with kd_w the distillation (temperature t) of the full width's logits (and the larger sub-widths', full_distill).
    top1 (monitoring), a dict: gets per width how often the positive has the largest logit."""
    widths = sorted(q_by_width, reverse=True)[: None if active else 1]
    out, top = {w: logits(q_by_width[w].float()) for w in widths}, widths[0]
    z, positives = {w: zw for w, (zw, _) in out.items()}, out[top][1]  # every width's logits, one set of positives
    lam = 1 + sum(widths[1:]) if reweight else 1.0  # PAPER: official loss_weights_generate option 5
    loss = lam * nce(z[top], positives)
    for i, w in enumerate(widths[1:], 1):
        sub = nce(z[w], positives)
        if a > 0:
            teachers = widths[:i] if full_distill else [top]
            sub = (1 - a) * sub + a * sum(distill_ce(z[w], z[v], t) for v in teachers) / len(teachers)
        loss = loss + sub
    if top1 is not None:
        top1.update({w: (zw.detach().argmax(1) == positives).float().mean() for w, zw in z.items()})
    return loss


def slimclr_mocov2_loss(
    q_by_width: dict, k: torch.Tensor, queue: torch.Tensor, *, temperature: float = 0.2, epoch: float,
    slim_start_epoch: float, distill_weight: float = 0.5, distill_temperature: float = 5.0, reweight: bool = True,
    full_distill: bool = False, top1: Optional[dict] = None,
) -> torch.Tensor:  # fmt: skip
    """SlimCLR-MoCov2 loss (spec 2.2). q_by_width: {width: [B, D]} L2-normalised queries; k: [B, D] full-width keys;
    queue: [K, D]. Raw logits z_w = [q_w . k, q_w Q^T] (plain cosines) per width; nce_w = CE(z_w / T, 0); the
    distillation works on the raw z_w with temperature t (spec 7.2: around 25 ln(K+1) per sub-width is normal).
    The sub-width entries are ignored before the slow start (epoch < slim_start_epoch; -1: always active)."""
    k, queue = k.float(), queue.float()
    labels, active = torch.zeros(len(k), dtype=torch.long, device=k.device), epoch >= slim_start_epoch
    logits = lambda q: (torch.cat([(q * k).sum(1, keepdim=True), q @ queue.T], 1), labels)  # noqa: E731  [B, 1 + K]
    nce = lambda z, y: F.cross_entropy(z / temperature, y)  # noqa: E731
    a, t = distill_weight, distill_temperature
    return slimclr_combine(q_by_width, logits, nce, active, a, t, reweight, full_distill, top1)


def slimclr_mocov3_loss(
    q1_by_width: dict, q2_by_width: dict, k1: torch.Tensor, k2: torch.Tensor, *, temperature: float = 1.0,
    epoch: float, slim_start_epoch: float, distill_weight: float = 0.5, distill_temperature: float = 1.0,
    reweight: bool = True, top1: Optional[dict] = None,
) -> torch.Tensor:  # fmt: skip
    """SlimCLR-MoCov3 loss (spec 3.2): direction(q1, k2) + direction(q2, k1), each with l_w = q_w k^T / T,
    nce_w = 2T CE(l_w, labels) and the distillation on l_w (already divided by T). q: {width: [B, D]} normalised;
    k: [B, D] normalised keys, or the keys of every rank [B x world, D] under DDP (labels offset by rank)."""
    b, active = len(next(iter(q1_by_width.values()))), epoch >= slim_start_epoch
    gathered = len(k1) > b and dist.is_initialized()  # k of every rank: the positives are this rank's rows
    labels = torch.arange(b, device=k1.device) + (dist.get_rank() * b if gathered else 0)  # CRUCIAL: offset by rank
    nce = lambda logits, y: 2 * temperature * F.cross_entropy(logits, y)  # noqa: E731  PAPER: the 2T factor

    def direction(q_by_width, k, top1=None):  # top1: the first direction's
        logits = lambda q: (q @ k.float().T / temperature, labels)  # noqa: E731
        a, t = distill_weight, distill_temperature
        return slimclr_combine(q_by_width, logits, nce, active, a, t, reweight, False, top1)

    return direction(q1_by_width, k2, top1) + direction(q2_by_width, k1)


def simclr_similarities(q1: torch.Tensor, q2: torch.Tensor) -> tuple:
    """This rank's 2b rows (both views) against the 2N - 1 other embeddings of the global batch, raw cosines
    [2b, 2N - 1] (official s_SimCLR.contrastive_loss: z = [view 1 of every image; view 2], itself removed), and each
    row's positive: its other view's column once the diagonal is gone. q1, q2: [b, D] normalised, this rank's."""
    z = torch.cat([gather_with_grad(q1), gather_with_grad(q2)])  # [2N, D]: every rank's, rank-major
    n, b, rank = len(z) // 2, len(q1), dist.get_rank() if dist.is_initialized() else 0
    g = rank * b + torch.arange(b, device=z.device)  # this rank's images in the global batch
    rows = torch.cat([g, n + g])
    cols = torch.arange(2 * n - 1, device=z.device)  # PAPER: no self-similarity (gather, not a mask: no host sync)
    sim = (z[rows] @ z.T).gather(1, cols + (cols >= rows[:, None]))
    return sim, torch.cat([n + g - 1, g])


def slimclr_simclr_loss(
    q1_by_width: dict, q2_by_width: dict, *, temperature: float = 0.1, epoch: float, slim_start_epoch: float,
    distill_weight: float = 0.5, distill_temperature: float = 5.0, reweight: bool = True, top1: Optional[dict] = None,
) -> torch.Tensor:  # fmt: skip
    """SlimCLR-SimCLR loss (official models/s_simclr.py): NT-Xent over the global batch at every width, nce_w =
    CE(sim_w / T, positives) over this rank's rows, the distillation on the raw cosines sim_w (as v2's; official
    full_distill does nothing here). q: {width: [b, D]} normalised, this rank's views.
    DEVIATION: the official loss is the mean over all 2N rows on every rank with the gradient let through only its own
    rows, so DDP's average keeps 1/world of the global loss's gradient; ours is the mean over this rank's rows, the
    embeddings gathered with their gradient: DDP's average is the global loss's gradient at any world size."""
    q = {w: torch.stack([q1_by_width[w], q2_by_width[w]]) for w in q1_by_width}  # [2, b, D]: both views
    nce = lambda sim, y: F.cross_entropy(sim / temperature, y)  # noqa: E731
    logits = lambda q: simclr_similarities(q[0], q[1])  # noqa: E731
    a, t, active = distill_weight, distill_temperature, epoch >= slim_start_epoch
    return slimclr_combine(q, logits, nce, active, a, t, reweight, False, top1)


def slimclr_linear_probe_loss(logits_by_width: dict, targets: torch.Tensor) -> torch.Tensor:
    """Switchable probe loss (spec 4; official inplace_distill_mixed): CE(full) + sum over sub-widths of
    (softCE(logits_w, softmax(full) detached) + CE(logits_w, y)) / 2, no temperature: the SlimCLR combination with
    a = 0.5, t = 1 and no re-weighting, on the heads' logits."""
    logits = lambda z: (z, targets)  # noqa: E731
    return slimclr_combine(logits_by_width, logits, F.cross_entropy, True, 0.5, 1.0, reweight=False, full_distill=False)


# ==== 5. OPTIMIZER & SCHEDULES ====
class MoCoV3LARS(torch.optim.Optimizer):
    """LARS as in MoCo v3 (and SlimCLR's utils/optim.py), spec 3.4. For parameters with ndim > 1: g <- g + wd p, then
    g <- g x eta ||p|| / ||g|| (1 where a norm is 0; no eps or clipping, unlike solo-learn's). 1-D parameters (BN,
    biases) take g unchanged. Then mu <- m mu + g; p <- p - lr mu."""

    def __init__(self, params, lr, weight_decay=0.0, momentum=0.9, eta=0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if p.ndim > 1:
                    g = g.add(p, alpha=group["weight_decay"])
                    p_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(g)
                    ok = (p_norm > 0) & (g_norm > 0)  # no host sync
                    g = g * torch.where(ok, group["eta"] * p_norm / g_norm, 1.0)
                mu = self.state[p].get("mu")
                mu = self.state[p]["mu"] = g.clone() if mu is None else mu.mul_(group["momentum"]).add_(g)
                p.add_(mu, alpha=-group["lr"])


def build_optimizer(model: nn.Module, args: Args) -> torch.optim.Optimizer:
    """v2: SGD (momentum 0.9) with weight decay on every parameter: the official scheduler rewrites every group's decay
    to the base value each step, so BN and biases decay too (spec 2.4 [!]). v3: MoCo v3's LARS (spec 3.4)."""
    params = [p for p in model.online.parameters() if p.requires_grad]
    if args.optimizer == "sgd":
        return torch.optim.SGD(params, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    return MoCoV3LARS(params, lr=args.lr, weight_decay=args.weight_decay, momentum=args.momentum)


def lr_at(step: int, args: Args, steps_per_epoch: int) -> float:
    """Per-step LR (official lr_scheduler, mode cos): a linear warm-up from 1e-8 to the peak over W steps, then
    0.5 peak (1 + cos(pi (s - W) / (S - W))), floored at 1e-8. From the epoch --slim-start-epoch on (whole epochs,
    as the official loop) the peak is --slim-start-lr when set. A pure function of the step."""
    slim_started = args.slim_start_epoch > 0 and step // steps_per_epoch >= args.slim_start_epoch
    peak = args.slim_start_lr if slim_started and args.slim_start_lr is not None else args.lr  # PAPER: spec 2.4, 3.4
    peak *= args.batch_size / 256 if args.lr_scaling == "linear" else 1.0
    total, warmup = steps_per_epoch * args.epochs, int(args.warmup_epochs * steps_per_epoch)
    if warmup > 0 and step <= warmup:
        return min(step / warmup * (peak - 1e-8) + 1e-8, peak)
    return max(0.5 * peak * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1))), 1e-8)


def momentum_at(step: int, args: Args, steps_per_epoch: int) -> float:
    """v2: constant. v3 (spec 3.1): 1 - (1 + cos(pi epoch / epochs)) / 2 (1 - m), the epoch fractional: 0.99 -> 1."""
    if not args.moco_m_cos:
        return args.moco_m
    return 1 - 0.5 * (1 + math.cos(math.pi * step / (steps_per_epoch * args.epochs))) * (1 - args.moco_m)


# ==== 6. TRAIN STEP ====
def train_batches(run: SimpleNamespace, epoch: int, start: int, last: int):
    """This rank's two views [b, 3, S, S] of each step start..last-1 of `epoch` (every width sees the same views)."""
    args, images = run.args, run.data["train_x"]
    on_device = run.device if torch.is_tensor(images) else None
    batches = epoch_batches(len(run.data["train_y"]), args.batch_size, args.seed, epoch, on_device)
    keys = [(args.seed, "train", epoch, s) for s in range(start, last)]
    return view_batches(run, images, batches[start:last], keys, run.groups)


def train_step(run: SimpleNamespace, views: list, step: int) -> torch.Tensor:
    """One SlimCLR step on this rank's two views. Returns [loss, contrastive top-1 (%) per width], detached.
    Order as the official forward: queries (with gradient), then the momentum update, then the keys."""
    args, model, spe = run.args, run.model, run.steps_per_epoch
    epoch = step / spe  # PAPER: the fractional epoch decides the slow start
    widths = run.widths if epoch >= args.slim_start_epoch else run.widths[:1]
    queries = views[:1] if args.moco == "v2" else views  # v2: view 1 is the query, view 2 the key; else both
    with run.autocast:
        z = run.ddp_model([x.contiguous(memory_format=run.fmt) for x in queries], widths)
    q = [{w: F.normalize(e.float(), dim=1) for w, e in zv.items()} for zv in z]  # q: [b, D], L2-normalised, fp32
    if model.momentum_encoder is not None:
        ema_update(model.momentum_encoder, model.online.encoder, momentum_at(step, args, spe))
    top1 = {}  # monitoring: per width, how often the positive wins (0 for widths not yet trained)
    kw = dict(epoch=epoch, slim_start_epoch=args.slim_start_epoch, distill_weight=args.distill_weight, top1=top1)
    kw.update(distill_temperature=args.distill_temperature, reweight=args.reweight, temperature=args.temperature)
    if args.moco == "v2":
        k, k_all = momentum_keys(run, views[1], step)
        loss = slimclr_mocov2_loss(q[0], k, model.queue, full_distill=args.full_distill, **kw)
    elif args.moco == "simclr":
        loss = slimclr_simclr_loss(q[0], q[1], **kw)
    else:
        (_, k1_all), (_, k2_all) = momentum_keys(run, views[0], step), momentum_keys(run, views[1], step)
        loss = slimclr_mocov3_loss(q[0], q[1], k1_all, k2_all, **kw)
    run.opt.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    run.scaler.step(run.opt)
    run.scaler.update()
    if args.moco == "v2":  # CRUCIAL: enqueue the global batch's keys; the pointer follows from the step (no sync)
        ptr = step * args.batch_size % args.queue_size
        model.queue[ptr : ptr + len(k_all)] = k_all
    acc = [top1.get(w, torch.zeros((), device=run.device)) for w in run.widths]
    return torch.cat([loss.detach()[None], 100 * torch.stack(acc)])


# ==== 7. TRAINING ====
def check_args(args: Args, world_size: int) -> None:
    """Refuse bad input with one clear line, before any data is read or process group created."""
    check_common_args(
        args, world_size, SLIM_RESNETS, at_least_1="large_size train_repeat dim mlp_dim probe_eval_every",
        at_least_0="workers eval_every eval_subset_train eval_subset_test",
        positive="lr temperature distill_temperature slim_start_lr", non_negative="warmup_epochs momentum",
        scales="large_scale", per_rank="batch_size probe_batch_size",
    )  # fmt: skip
    widths = " ".join(map(str, args.widths))
    if 1.0 not in args.widths:
        raise RunError(f"--widths {widths} must contain 1.0, the full network")
    if len(set(args.widths)) != len(args.widths) or not all(0 < w <= 1 and slim(64, w) >= 1 for w in args.widths):
        raise RunError(f"--widths must be distinct values in [1/64, 1], got {widths}")
    for name in ("distill_weight", "moco_m"):
        if not 0 <= getattr(args, name) <= 1:
            raise RunError(f"--{name.replace('_', '-')} must be in [0, 1], got {getattr(args, name)}")
    queue, batch = args.queue_size, args.batch_size
    if args.moco == "v2" and (queue < batch or queue % batch):
        raise RunError(f"--queue-size {queue} must be a multiple of the global --batch-size {batch}")
    warnings = []  # legal but probably not meant: said once, on rank 0, never silently
    if args.slim_start_lr is not None and args.slim_start_epoch <= 0:  # PAPER: official loop needs slim_start_epoch > 0
        warnings.append(f"--slim-start-lr {args.slim_start_lr} is unused: it applies only with --slim-start-epoch > 0")
    if len(args.widths) > 1 and args.slim_start_epoch >= args.epochs:
        warnings.append(f"--slim-start-epoch {args.slim_start_epoch} >= --epochs: the sub-networks are never trained")
    for w in warnings if os.environ.get("RANK", "0") == "0" else []:
        print(f"{Path(__file__).name}: warning: {w}", file=sys.stderr)


# ---- released weights in (--init); plain ResNets out (backbone.pt: the full width, backbone_w{w}.pt: a sub-width)
def with_momentum(sd: dict) -> dict:
    """CRUCIAL: a file without a momentum encoder starts it as a copy of the loaded encoder, as a fresh start does
    (what the file lacks stays the model's own, alike in both: SlimCLR() copies the encoder)."""
    if not any(k.startswith("momentum_encoder.") for k in sd):
        sd.update({"momentum_encoder." + k[15:]: v for k, v in list(sd.items()) if k.startswith("online.encoder.")})
    return sd


def official_slimclr(obj, online: str, momentum: str, rest, mark: str = "") -> Optional[dict]:
    """--init format: the official main_ssl.py's checkpoints and releases ({"state_dict": DDP's `module.` names, ...}):
    s_MoCo's encoder_q, encoder_k, queue (models/s_moco.py), s_MoCoV3's base_encoder, momentum_encoder, predictor or
    s_SimCLR's encoder_q alone (its head's BN fc.1, the mark, tells it from s_MoCo's). Encoders as s_resnet.py's
    (features.N.convK, .bnK.bn.I, .shortcut.{0, 1.bn.I}, head fc.*), BN copy I the I-th width in descending order as
    ours (slimmable_ops.py). rest(name, tensor): (our name, tensor) of any other tensor, or None to drop it."""
    sd = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not (isinstance(sd, dict) and any(str(k).startswith(f"module.{online}.{mark}") for k in sd)):
        return None
    blocks = [f"layers.{s}.{b}." for s, n in enumerate((3, 4, 6, 3)) for b in range(n)]  # features.N: stage s, block b
    out = {}
    for name, v in strip_prefix(sd, "module.").items():
        part, _, k = name.partition(".")
        if part in (online, momentum):  # a block of a deeper ResNet keeps its name: refused
            k = re.sub(r"^features\.(\d+)\.", lambda m: blocks[int(m[1])] if int(m[1]) < len(blocks) else m[0], k)
            k = re.sub(r"^(layers\.\d\.\d\.)(conv|bn)(\d)", lambda m: f"{m[1]}{m[2]}s.{int(m[3]) - 1}", k)
            k = "head" + k[2:] if k.startswith("fc.") else "backbone." + k
            out[("online.encoder." if part == online else "momentum_encoder.") + k] = v
        elif (kv := rest(name, v)) is not None:
            out[kv[0]] = kv[1]
    return with_momentum(out)


def from_plain(sd: dict) -> dict:
    """A plain ResNet's state dict (torchvision's names) as our full-width network's (BN copy 0)."""
    out = {}
    for k, v in sd.items():
        k = re.sub(r"^layer(\d)", lambda m: f"layers.{int(m[1]) - 1}", k).replace("downsample", "shortcut")
        k = re.sub(r"\.(conv|bn)(\d)\.", lambda m: f".{m[1]}s.{int(m[2]) - 1}.", k)
        out["online.encoder.backbone." + re.sub(r"^(bn1|.+\.bns\.\d|.+\.shortcut\.1)\.", r"\1.bn.0.", k)] = v
    return with_momentum(out)


def without_momentum(convert, obj) -> Optional[dict]:
    """--init of a SimCLR model (SIMCLR_INIT_FORMATS): what the format gives, less the momentum encoder and queue."""
    sd = convert(obj)
    return None if sd is None else {k: v for k, v in sd.items() if not k.startswith(("momentum_encoder.", "queue"))}


INIT_FORMATS = {  # --init: the first format that reads the file gives its tensors under our names (init_weights)
    "last.pt": own_checkpoint,
    "official SlimCLR-SimCLR": partial(official_slimclr, online="encoder_q", momentum="", mark="fc.1.",
        rest=lambda *kv: kv),
    "official SlimCLR-MoCov2": partial(official_slimclr, online="encoder_q", momentum="encoder_k",
        rest=lambda k, v: ("queue", v.t()) if k == "queue" else None if k == "queue_ptr" else (k, v)),  # ours: [K, D]
    "official SlimCLR-MoCov3": partial(official_slimclr, online="base_encoder", momentum="momentum_encoder",
        rest=lambda k, v: ("online." + k, v) if k.startswith("predictor.") else (k, v)),
    "torchvision ResNet": lambda obj: from_plain(sd) if (sd := torchvision_resnet(obj, "")) else None,
}  # fmt: skip
SIMCLR_INIT_FORMATS = {n: partial(without_momentum, f) for n, f in INIT_FORMATS.items()}  # no momentum encoder, queue


@torch.no_grad()
def plain_backbone(backbone: SlimResNet, width: float) -> dict:
    """The network of this width as a plain ResNet's state dict on the CPU, common/resnet.py's (torchvision's) names:
    RESNETS[arch](width=width) loads it strictly. Every kernel's leading slice, the width's own BN copy."""
    sd = {}
    for name, m in backbone.named_modules():
        name = re.sub(r"^layers\.(\d)", lambda s: f"layer{int(s[1]) + 1}", name).replace("shortcut", "downsample")
        name = re.sub(r"(conv|bn)s\.(\d)", lambda s: f"{s[1]}{int(s[2]) + 1}", name)
        if isinstance(m, SlimConv2d):
            o, i = m.shape_at(width)  # the stem's 3 inputs: never sliced
            sd[f"{name}.weight"] = m.weight[:o, :i]
        elif isinstance(m, SwitchBN):
            sd.update({f"{name}.{k}": v for k, v in m.bn[m.widths.index(width)].state_dict().items()})
    return {k: v.to("cpu", copy=True, memory_format=torch.contiguous_format) for k, v in sd.items()}


def run_training(args: Args) -> dict:
    """Set up the run (model, optimizer, resume, DDP), train, evaluate every width and write results.json."""
    run = start_run(args)
    args, device, world_size = run.args, run.device, run.world_size  # as start_run settled them
    torch.manual_seed(args.seed)  # the same initial model on every rank
    run.model = model = SlimCLR(args).to(device, memory_format=run.fmt)
    backbone = model.online.encoder.backbone
    run.widths = backbone.widths  # descending, the full width first
    run.encode = lambda x: torch.cat(list(backbone(x).values()), 1)  # every width's pooled features side by side
    run.feature_dims = [slim(backbone.num_features, w) for w in run.widths]
    run.groups, run.opt = crop_groups(args), build_optimizer(model, args)
    run.metrics = ("loss", *(f"top1@{w}" for w in run.widths))
    ckpt = resume_state(run, set())
    formats = SIMCLR_INIT_FORMATS if args.moco == "simclr" else INIT_FORMATS
    init = init_weights(model, args.init, formats, "online.encoder.backbone.") if args.init and not ckpt else None
    if init and run.rank == 0:
        print(init)
    net = model.online
    if world_size > 1 and args.moco != "v2" and args.sync_bn and device.type == "cuda":  # PAPER: SyncBN but for v2
        net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
        if model.momentum_encoder is not None:
            model.momentum_encoder = nn.SyncBatchNorm.convert_sync_batchnorm(model.momentum_encoder)
    if world_size > 1:  # CRUCIAL: before the slow start the sub-widths' BN copies get no gradient
        ids = [device] if device.type == "cuda" else None
        net = nn.parallel.DistributedDataParallel(net, device_ids=ids, find_unused_parameters=len(run.widths) > 1)
    run.ddp_model = torch.compile(net) if args.compile else net
    bench = run_benchmarks(run)
    run.total_steps = min(run.steps_per_epoch * args.epochs, math.inf if args.max_steps is None else args.max_steps)
    train_epochs(run)
    for w in run.widths if run.rank == 0 else []:  # before the long evaluation
        save_checkpoint(plain_backbone(backbone, w), Path(args.out_dir) / f"backbone{f'_w{w}' if w < 1 else ''}.pt")
    res = evaluate(run, tag="final")
    if run.rank == 0:  # per width, what a user deploys: the backbone + a C-way classifier, at the evaluation size
        net, per_width = SLIM_RESNETS[args.arch](num_classes=run.data["num_classes"], widths=run.widths), {}
        for w in run.widths:
            scores = {k.split("@")[0]: v for k, v in res.items() if k.endswith(f"@{w}")}
            per_width[str(w)] = dict(params=active_param_count(net, w), backbone_params=active_param_count(backbone, w),
                                     gmacs=active_macs(net, w, args.large_size) / 1e9, **scores)  # fmt: skip
        peak_lr = args.lr * (args.batch_size / 256 if args.lr_scaling == "linear" else 1.0)
        paper = "SlimCLR, Slimmable Networks for Contrastive Self-supervised Learning (arXiv 2209.15525)"
        extra = dict(widths=per_width, peak_lr=peak_lr, slim_start_lr=args.slim_start_lr, init=init)
        write_results(run, paper, extra, bench, res)
    if dist.is_initialized():
        dist.destroy_process_group()
    return res


# ---- the method's own evaluation: per-width k-NN and the switchable linear probe
def evaluate(run: SimpleNamespace, tag: str) -> dict:
    """Per width: weighted k-NN on pooled backbone features (a seeded subset during training, everything at the end),
    and at the end the switchable probe. Keys: knn_top1@W, linear_top1@W (...); the full width also without @W."""
    args, data, device, widths, nc = run.args, run.data, run.device, run.widths, run.data["num_classes"]
    final, t0 = tag == "final", time.perf_counter()
    use_cache = final and run.world_size == 1  # cached per weights digest: a rerun of a finished run skips encoding
    digest = state_dict_digest(run.model.state_dict()) if use_cache else None
    key = rng_seed(digest, args.dataset, args.data_dir, args.large_size, args.mean, args.std)
    cache = ArtifactCache(Path(args.out_dir) / "cache", f"{key:014x}")
    feats, labels = {}, {}  # per split: every width's features side by side [n, sum F w] (run.encode), labels [n]
    for split, size in (("train", args.eval_subset_train), ("test", args.eval_subset_test)):
        n = len(data[f"{split}_y"])
        g = torch.Generator().manual_seed(rng_seed(args.seed, "eval-subset", split))
        subset = None if final or size >= n else torch.randperm(n, generator=g)[:size].sort().values
        labels[split] = data[f"{split}_y"][slice(None) if subset is None else subset].to(device)
        f = cache.get(split) if use_cache else None
        if f is None:
            f = extract_features(run, split, subset)
            if use_cache:
                cache.put(split, f.cpu())
        feats[split] = f.to(device)
    (ftr, ytr), (fte, yte) = ((feats[s], labels[s]) for s in ("train", "test"))
    res, times = {}, dict(encode_s=time.perf_counter() - t0)
    if run.rank == 0:
        t0 = time.perf_counter()
        for w, tr, te in zip(widths, ftr.split(run.feature_dims, 1), fte.split(run.feature_dims, 1)):
            res[f"knn_top1@{w}"], res[f"knn_top5@{w}"] = knn_eval(tr, ytr, te, yte, nc, args.knn_k, args.knn_t)
        times["knn_s"] = time.perf_counter() - t0
    if final and (args.probe == "augmented" or args.probe == "features" and run.rank == 0):  # augmented: every rank
        t0 = time.perf_counter()
        res.update(switchable_probe(run, ftr if args.probe == "features" else None, fte, yte))
        times["probe_s"] = time.perf_counter() - t0
    res.update({k.split("@")[0]: v for k, v in res.items() if k.endswith("@1.0")})  # the full width also without @W
    if run.world_size > 1:
        dist.barrier()
    if run.rank == 0:
        log_jsonl(run, dict(type="eval", tag=tag, step=run.global_step, **res, **times))
        shown = {k: v for k, v in res.items() if "top5" not in k and "best" not in k and "@" in k}
        print(f"eval @ {tag} | " + " | ".join(f"{k} {v:.2f}" for k, v in {**shown, **times}.items()))
    for k, v in times.items():
        run.times[k] = run.times.get(k, 0.0) + v
    return res


def switchable_probe(run: SimpleNamespace, train_feats, test_feats: torch.Tensor, y_test: torch.Tensor) -> dict:
    """The switchable linear probe (spec 4): one Linear(F w, C) per width (N(0, 0.01), bias 0) on the frozen eval-mode
    backbone, trained together by slimclr_linear_probe_loss (SGD momentum 0.9, fp32) on run.encode's features of
    RandomResizedCrop(0.08, 1) + flip views (train_feats None, official; data-parallel) or on train_feats (rank 0).
    Per width: linear_top1@W, linear_top5@W (last epoch), linear_top1_best@W (at the full width's best epoch)."""
    args, device, nc, widths, dims = run.args, run.device, run.data["num_classes"], run.widths, run.feature_dims
    world, rank = (1, 0) if train_feats is not None else (run.world_size, run.rank)
    gen = torch.Generator().manual_seed(args.seed)
    heads = nn.ModuleList(nn.Linear(d, nc) for d in dims)
    for h in heads:  # drawn on the CPU: the same heads on any device
        nn.init.normal_(h.weight, 0, 0.01, generator=gen)
        nn.init.zeros_(h.bias)
    heads.to(device)
    opt = torch.optim.SGD(heads.parameters(), lr=args.probe_lr, momentum=0.9, weight_decay=args.probe_wd)
    images, train_y = run.data["train_x"], run.data["train_y"].to(device)
    on_device = device if train_feats is not None or torch.is_tensor(images) else None  # where the batches are
    group, b = CropGroup(1, args.large_size, (0.08, 1.0), colour=False), args.probe_batch_size // world
    run.model.eval()

    def features(views):  # the frozen backbone's features of one batch of views, every width's side by side, fp32
        with torch.no_grad(), run.autocast:
            return run.encode(views[0].contiguous(memory_format=run.fmt)).float()

    history = []  # per evaluated epoch: [n_widths, 2] top-1 and top-5
    for epoch in tqdm(range(args.probe_epochs), desc="switchable probe", disable=rank != 0, leave=False):
        step = 0.1 ** sum(epoch >= round(f * args.probe_epochs) for f in (0.6, 0.8))  # PAPER (v2): epochs 60, 80 of 100
        cosine = 0.5 * (1 + math.cos(math.pi * epoch / args.probe_epochs))
        opt.param_groups[0]["lr"] = args.probe_lr * (step if args.probe_schedule == "step" else cosine)
        batches = epoch_batches(len(train_y), args.probe_batch_size, args.seed, ("probe", epoch), on_device)
        keys = [(args.seed, "probe", epoch, s) for s in range(len(batches))]
        views = view_batches(run, images, batches, keys, [group])  # a generator: it reads nothing unless iterated
        stream = map(features, views) if train_feats is None else (train_feats[idx] for idx in batches)
        for idx, f in zip(batches, stream):
            logits = {w: h(x) for w, h, x in zip(widths, heads, f.split(dims, 1))}
            loss = slimclr_linear_probe_loss(logits, train_y[idx[rank * b : (rank + 1) * b].to(device)])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if world > 1:  # the gradient of the global-batch mean
                for p in heads.parameters():
                    dist.all_reduce(p.grad)
                    p.grad /= world
            opt.step()
        if (epoch + 1) % args.probe_eval_every == 0 or epoch + 1 == args.probe_epochs:
            with torch.no_grad():  # hit: [n_widths, N, 5]
                top5 = [h(x).topk(min(5, nc), dim=1).indices for h, x in zip(heads, test_feats.split(dims, 1))]
                hit = torch.stack(top5) == y_test[:, None]
                history.append(100 * torch.stack([hit[..., 0].float().mean(1), hit.any(2).float().mean(1)], 1))
    history = torch.stack(history).tolist()  # one host sync
    last, best = history[-1], max(history, key=lambda h: h[0][0])  # PAPER: the best epoch by the full width's top-1
    res = {}
    for w, (top1, top5), (best_top1, _) in zip(widths, last, best):
        res.update({f"linear_top1@{w}": top1, f"linear_top1_best@{w}": best_top1, f"linear_top5@{w}": top5})
    return res


def bare_step(run: SimpleNamespace):
    """The ceiling's step (issue 17): the widths' forward+backward as plain ResNets of each width's shape (no slicing)
    on synthetic query views (v2: one, else both), a pass per view and width (the full width alone before the slow
    start, as the step), and MoCo's keys as TEC's frozen base: a full-width forward, no gradient (v2: a second view)."""
    args, device, b, s = run.args, run.device, run.args.batch_size // run.world_size, run.args.large_size
    nets = [RESNETS[args.arch](width=w).to(device, memory_format=run.fmt) for w in run.widths]
    views = [torch.randn(b, 3, s, s, device=device).to(memory_format=run.fmt) for _ in range(2)]
    queries, keyed = (views[:1], views[1:]) if args.moco == "v2" else (views, views if args.moco == "v3" else [])

    def step():  # run.global_step: the step just trained (train_one_epoch advances it after this call)
        widths = nets if run.global_step / run.steps_per_epoch >= args.slim_start_epoch else nets[:1]
        with run.autocast:
            out = [net(x).float().sum() for x in queries for net in widths]
            with torch.no_grad():
                _keys = [nets[0](x) for x in keyed]
        torch.autograd.grad(sum(out), [p for net in widths for p in net.parameters()])  # fresh, like set_to_none

    return step


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
