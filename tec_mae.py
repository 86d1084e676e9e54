"""Towards Sustainable Self-supervised Learning (Gao, Zhou, Cheng, Yan; TEC), arXiv 2210.11016.

What we reproduce: Target-Enhanced Conditional pretraining. A frozen, already pretrained ViT (the base model: MAE or
iBOT) sees the whole image and gives two targets: the mean of its last 2 block outputs on the patch tokens (feature
target) and the last block's attention rows of the CLS query and the top-k patch queries CLS attends to most
(relation target, softened by tau). A NEW, randomly initialised ViT of the same size sees 25% of the patches (MAE
masking), with a CLS token made by an MLP (input adapter) and a fusion of all its block outputs (encoder adapter); a
2-block decoder shared by two heads predicts the normalised features of the masked patches (MSE) and the relation
distributions (soft cross-entropy, through its own q/k head). Afterwards the adapters and decoders are dropped and the
encoder is fine-tuned like MAE. Official code: sail-sg/TEC (on facebookresearch/mae); spec: ../shared/specs/tec.md.

Modes (the first argument picks a recipe; flags override it):
    torchrun --nproc_per_node=8 tec_mae.py pretrain --data-dir IMAGENET           # TEC ViT-B/16, MAE ViT-B base, 300 ep
    torchrun --nproc_per_node=8 tec_mae.py pretrain --data-dir IMAGENET --epochs 800            # ... 800 epochs
    torchrun --nproc_per_node=8 tec_mae.py pretrain-ibot --data-dir IMAGENET      # iBOT ViT-B base (k 9, tau 1.0)
    torchrun --nproc_per_node=8 tec_mae.py pretrain-large --data-dir IMAGENET     # ViT-L/16, MAE ViT-L base
    torchrun --nproc_per_node=8 tec_mae.py finetune --data-dir IMAGENET --init runs/tec-pretrain/last.pt
    torchrun --nproc_per_node=8 tec_mae.py linear --data-dir IMAGENET --init runs/tec-pretrain/last.pt
    python tec_mae.py convert --init runs/tec-pretrain/last.pt --convert-out tec_vitb.pth   # plain ViT weights
    torchrun --nproc_per_node=8 tec_mae.py mae --data-dir IMAGENET                # a plain MAE base model, from scratch
Every mode takes --init (our last.pt, TEC's checkpoints and releases, a timm/MAE ViT: INIT_FORMATS; with --max-steps 0
it evaluates them) and leaves OUT/backbone.pt, the encoder in timm/MAE layout (README: Use released weights).
CIFAR-10 proxy (ours; ViT-Tiny, patch 4, 32 x 32, data kept on the device):
    python tec_mae.py cifar-mae --data-dir CIFAR10_JPEG --dataset imagefolder      # base model, N epochs
    python tec_mae.py cifar-pretrain --data-dir CIFAR10_JPEG --dataset imagefolder  # TEC on runs/tec-cifar-mae/last.pt
    python tec_mae.py cifar-finetune --data-dir CIFAR10_JPEG --dataset imagefolder \\
        --init runs/tec-cifar-pretrain/last.pt
    python tec_mae.py cifar-linear --data-dir CIFAR10_JPEG --dataset imagefolder --init runs/tec-cifar-pretrain/last.pt
    python tec_mae.py cifar-mae --dataset imagefolder --data-dir DIR --batch-size 32 --epochs 1 --device cpu \\
        --out-dir OUT                                     # quick CPU run: under a minute on a 200-image folder
Fine-tuning, one recipe per row of the sail-sg/TEC README (the values of its main_finetune.py commands, its ImageNet-1k
top-1), each run as `finetune` above with --init the row's pretraining (our last.pt, the official checkpoint-*.pth) or
its release (INIT_FORMATS, e.g. tec_ibot_vitb_300ep.pth):
    finetune           MAE ViT-B base, 300 ep (pretrain)                      84.7  blr 5e-4 at batch 1024 (128 x 8),
                                                                                    layer decay 0.65, warm-up 20, 100 ep
    finetune-800       MAE ViT-B base, 800 ep (pretrain --epochs 800)         84.8  layer decay 0.55
    finetune-ibot      iBOT ViT-B base, 300 ep (pretrain-ibot)                84.8  layer decay 0.50, warm-up 5
    finetune-ibot-800  iBOT ViT-B base, 800 ep (pretrain-ibot --epochs 800)   85.1  layer decay 0.55
    finetune-100ep     MAE ViT-B 300-ep base, 100 ep (pretrain --epochs 100   83.9  warm-up 5 (main_finetune's default)
                       --base-checkpoint runs/tec-mae/last.pt of `mae --epochs 300`: MAE released no 300-ep model)
    finetune-large     MAE ViT-L base, 300 ep (pretrain-large)                86.5  ViT-L, blr 1e-3, 50 ep, warm-up 5,
                       min_lr 1e-5, --accum-iter 2 (64 x 8 x 2 = 1024); drop path 0.1 as in every row (MAE's ViT-L: 0.2)
Every row: AdamW wd 0.05, drop path 0.1, min_lr 1e-6 (ViT-L 1e-5), RandAugment m9-mstd0.5, mixup 0.8, cutmix 1.0,
reprob 0.25, smoothing 0.1, the CLS MLP kept and trained (--mlp_token), seed 5. The bases fine-tune (`finetune
--init MAE_URL`) to 83.6 (MAE ViT-B), 85.9 (MAE ViT-L) and 84.0 (iBOT ViT-B).

Deviations (each marked `# DEVIATION:` below): bf16 autocast for the base and the new model (official fp16 AMP), every
target and loss in fp32; crops cut and resized with antialiased bilinear tensor ops or one roi_align (official: PIL
bicubic), RandAugment batched on the device in float with bilinear resampling; mixup/cutmix draws from our seeded
streams; the converted checkpoint keeps `norm.*` (official conversion drops it); the k-NN readout after pretraining and
the fast feature probe are ours (TEC reports neither).
"""

import copy
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
from urllib.parse import urlparse

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

from common.checkpoint import CheckpointError, init_weights, own_checkpoint, read_checkpoint, resume_state
from common.checkpoint import load_checkpoint, save_state, strip_prefix
from common.vit import ENCODER, SIZES, Block, LayerNorm, Mlp, VisionTransformer, export_encoder, fit_vit
from common.vit import load_base_model, sincos_pos_embed_2d, vit_tensors

MAE_URL = "https://dl.fbaipublicfiles.com/mae/pretrain/mae_pretrain_vit_{}.pth"
IBOT_URL = "https://lf3-nlp-opensource.bytetos.com/obj/nlp-opensource/archive/2022/ibot/vitb_16/checkpoint_teacher.pth"


# ==== 1. ARGS ====
@dataclass
class Args:
    # --- I/O & experiment
    recipe: str = "pretrain"
    """which preset these defaults came from (set by the subcommand)"""
    mode: Literal["pretrain", "mae", "finetune", "linear", "convert"] = "pretrain"
    """pretrain: TEC on a base model; mae: a plain MAE; finetune / linear: evaluate an encoder; convert: export it"""
    exp_name: str = "tec-pretrain"
    """name stored in results.json"""
    seed: int = 0
    """seed for the model init, the data order, the masks and every augmentation draw"""
    out_dir: str = "runs/tec-pretrain"
    """where last.pt, log.jsonl, results.json and the feature cache go; an existing last.pt is resumed"""
    resume: Optional[str] = None
    """resume from this checkpoint instead of out_dir/last.pt"""
    init: Optional[str] = None
    """weights to start from, a path or URL (INIT_FORMATS; a resumed last.pt ignores it); convert: the file converted"""
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

    # --- views (spec 5: RandomResizedCrop(224, scale=(0.2, 1)) + flip for pretraining; 0.08-1 for evaluation)
    large_size: int = 224
    """crop size in pixels (also the evaluation's centre crop)"""
    large_scale: Tuple[float, float] = (0.2, 1.0)
    """RandomResizedCrop area range (pretrain and mae 0.2-1; finetune and linear 0.08-1)"""
    mean: Tuple[float, float, float] = (0.485, 0.456, 0.406)
    """normalisation mean (ImageNet)"""
    std: Tuple[float, float, float] = (0.229, 0.224, 0.225)
    """normalisation std (ImageNet)"""

    # --- model (spec 3)
    arch: str = "vit_base"
    """the ViT trained here: vit_tiny, vit_small, vit_base or vit_large (common/vit.py)"""
    patch_size: int = 16
    """patch size in pixels"""
    decoder_dim: int = 512
    """decoder width (TEC: 512 for ViT-B, 768 for ViT-L; MAE: 512)"""
    decoder_depth: int = 2
    """decoder blocks (TEC: 2, shared by both heads; MAE: 8)"""
    decoder_heads: int = 16
    """decoder attention heads (16)"""
    mask_ratio: float = 0.75
    """fraction of patches removed from the encoder's input (MAE, TEC: 0.75)"""

    # --- method (spec 2.3, 4; mae: MAE's norm_pix_loss)
    base_checkpoint: Optional[str] = MAE_URL.format("base")
    """pretrain: the frozen base model, a path or URL in the MAE format ({'model': sd}), iBOT's or one of our runs"""
    base_arch: Optional[str] = None
    """architecture of the base model (default: --arch)"""
    topk: int = 15
    """k patch queries (those CLS attends to most) in the relation target (MAE ViT-B/L 15, iBOT ViT-B 9)"""
    tau: float = 1.8
    """temperature of the relation target softmax(R / tau) (MAE ViT-B 1.8, ViT-L 1.4, iBOT ViT-B 1.0)"""
    last_layers: int = 2
    """the feature target is the mean of the base model's last this-many block outputs (2)"""
    norm_pix: bool = True
    """mae: the pixel target is normalised per patch (MAE's released models)"""

    # --- finetune / linear / convert (spec 6, 7)
    keep_cls_mlp: bool = True
    """finetune: keep the CLS-token MLP of a TEC checkpoint and train it (official --mlp_token); off: bake it in"""
    pool: Literal["avg", "cls"] = "avg"
    """features: avg = mean of the patch tokens (finetune: + fc_norm, official), cls = the CLS token after norm"""
    layer_decay: float = 0.65
    """finetune: block i's LR is scaled by layer_decay^(depth + 1 - (i + 1)) (0.65; 0.55 / 0.50 in spec 7's table)"""
    drop_path: float = 0.1
    """finetune: stochastic depth rate of the last block (0.1)"""
    mixup: float = 0.8
    """finetune: mixup alpha (0.8; 0: off)"""
    cutmix: float = 1.0
    """finetune: cutmix alpha (1.0; 0: off); with both on, each batch picks one (switch prob 0.5)"""
    smoothing: float = 0.1
    """finetune: label smoothing (0.1)"""
    reprob: float = 0.25
    """finetune: random-erasing probability per image (0.25, mode pixel, one box)"""
    randaug_n: int = 2
    """finetune: RandAugment ops per image (timm rand-m9-mstd0.5-inc1: 2; 0: off)"""
    randaug_m: float = 9.0
    """finetune: RandAugment magnitude (9 of 10), jittered with std --randaug-mstd per op"""
    randaug_mstd: float = 0.5
    """finetune: std of the magnitude noise (0.5)"""
    convert_out: Optional[str] = None
    """convert: where the plain ViT checkpoint ({'model': sd}) is written"""

    # --- optimisation (spec 5, 7)
    epochs: int = 300
    """training epochs (TEC 100 / 300 / 800; MAE 800; finetune 100; linear 90)"""
    max_steps: Optional[int] = None
    """stop after this many steps in total without changing the schedule (benchmarks; 0: evaluate the init)"""
    batch_size: int = 4096
    """images per optimizer step, global over all ranks and --accum-iter (pretrain 4096, finetune 1024, linear 16384)"""
    accum_iter: int = 1
    """split each rank's share into this many micro-batches, one backward each (official pretraining: 2)"""
    blr: float = 1.5e-4
    """base LR per 256 images: lr = blr x batch_size / 256 (pretrain 1.5e-4, finetune 5e-4, linear 0.1)"""
    min_lr: float = 0.0
    """the cosine ends here (pretrain 0, finetune 1e-6)"""
    warmup_epochs: float = 40.0
    """linear warm-up from 0, per step (pretrain 40, finetune 20, linear 10)"""
    weight_decay: float = 0.05
    """AdamW weight decay on matrices and tokens (0.05; linear: 0); never on biases or norms"""
    betas: Tuple[float, float] = (0.9, 0.95)
    """AdamW betas (pretrain 0.9, 0.95; finetune PyTorch's 0.9, 0.999)"""

    # --- evaluation
    eval_every: int = 10
    """epochs between evaluations (pretrain / mae: k-NN on a subset; finetune / linear: test top-1) (0: off)"""
    eval_every_steps: int = 0
    """also evaluate every this many steps (0: off)"""
    eval_subset_train: int = 30000
    """pretrain / mae: training images used as the k-NN memory during training (the final k-NN uses all)"""
    eval_subset_test: int = 10000
    """pretrain / mae: test images used during training"""
    # DEVIATION: a project requirement, not in TEC: a k-NN and a fast feature probe after pretraining
    probe: Literal["features", "none"] = "none"
    """pretrain / mae: at the end also a fast linear probe on precomputed features (the real one is `linear`)"""
    probe_epochs: int = 100
    """fast probe epochs"""
    probe_lr: float = 0.1
    """fast probe SGD LR (cosine per epoch)"""
    probe_wd: float = 0.0
    """fast probe weight decay"""
    probe_batch_size: int = 256
    """fast probe batch"""
    knn_k: int = 20
    """neighbours of the weighted k-NN"""
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


# fmt: off
IBOT = dict(seed=5, base_checkpoint=IBOT_URL, topk=9, tau=1.0)
LARGE = dict(seed=5, arch="vit_large", decoder_dim=768, base_checkpoint=MAE_URL.format("large"), tau=1.4)
MAE = dict(mode="mae", decoder_depth=8, base_checkpoint=None, epochs=800)
EVAL = dict(large_scale=(0.08, 1.0), base_checkpoint=None, probe="none")  # finetune and linear
FINETUNE = dict(EVAL, mode="finetune", seed=5, epochs=100, batch_size=1024, blr=5e-4, min_lr=1e-6, warmup_epochs=20,
                betas=(0.9, 0.999), eval_every=1)
FT_800, FT_5 = dict(FINETUNE, layer_decay=0.55), dict(FINETUNE, warmup_epochs=5)  # the other rows (docstring)
FT_LARGE = dict(FT_5, arch="vit_large", epochs=50, blr=1e-3, min_lr=1e-5, accum_iter=2)  # 64 x 8 GPUs x 2
LINEAR = dict(EVAL, mode="linear", pool="cls", epochs=90, batch_size=16384, blr=0.1, warmup_epochs=10,
              weight_decay=0.0, eval_every=10)
# The CIFAR-10 proxy (ours): ViT-Tiny, patch 4 on 32 x 32 (64 patches), data decoded once and kept on the device;
# decoders 128 wide; k 5 of 64 patches (about the official 15 of 196); batch 512 at blr 5e-4 (lr 1e-3).
CIFAR = dict(dataset="cifar10", in_memory=True, image_size=32, large_size=32, mean=(0.4914, 0.4822, 0.4465),
             std=(0.2470, 0.2435, 0.2616), arch="vit_tiny", patch_size=4, decoder_dim=128, decoder_heads=4,
             save_every_steps=0, epochs=100, batch_size=512, blr=5e-4, warmup_epochs=10, eval_every=10,
             eval_subset_train=50000, probe="features")
RECIPES = {  # name: (its Args, its description)
    name: (dataclasses.replace(Args(), recipe=name, exp_name=f"tec-{name}", out_dir=f"runs/tec-{name}", **kw), about)
    for name, kw, about in [
        ("pretrain", dict(seed=5), "TEC ViT-B/16 on the MAE ViT-B base, 300 epochs"),
        ("pretrain-ibot", IBOT, "TEC ViT-B/16 on the iBOT ViT-B base, 300 epochs"),
        ("pretrain-large", LARGE, "TEC ViT-L/16 on the MAE ViT-L base, 300 epochs"),
        ("mae", MAE, "a plain MAE ViT-B/16 (the base-model recipe), 800 epochs"),
        ("finetune", FINETUNE, "MAE/TEC fine-tuning, ViT-B/16, 100 epochs (TEC on the MAE base, 300 ep: 84.7)"),
        ("finetune-800", FT_800, "... TEC on the MAE ViT-B base, 800 ep: 84.8"),
        ("finetune-ibot", dict(FT_5, layer_decay=0.5), "... TEC on the iBOT ViT-B base, 300 ep: 84.8"),
        ("finetune-ibot-800", FT_800, "... TEC on the iBOT ViT-B base, 800 ep: 85.1"),
        ("finetune-100ep", FT_5, "... TEC 100 ep on a 300-ep MAE ViT-B base: 83.9"),
        ("finetune-large", FT_LARGE, "ViT-L/16, 50 epochs: TEC on the MAE ViT-L base, 300 ep: 86.5"),
        ("linear", LINEAR, "MAE's linear probe (LARS, BN head), 90 epochs"),
        ("convert", dict(mode="convert", base_checkpoint=None), "a TEC checkpoint -> plain ViT weights"),
        ("cifar-mae", {**CIFAR, **MAE, "decoder_depth": 4, "epochs": 100}, "CIFAR proxy (ours): the MAE base model"),
        ("cifar-pretrain", {**CIFAR, "topk": 5, "base_checkpoint": "runs/tec-cifar-mae/last.pt"},
         "CIFAR proxy (ours): TEC on top of it"),
        ("cifar-finetune", dict({**CIFAR, **FINETUNE}, seed=0, eval_every=10, batch_size=256, warmup_epochs=5),
         "CIFAR proxy (ours): fine-tuning"),
        ("cifar-linear", {**CIFAR, **LINEAR, "batch_size": 1024}, "CIFAR proxy (ours): linear probe"),
    ]
}
# fmt: on
SUBCOMMANDS = Union[
    tuple(Annotated[Args, tyro.conf.subcommand(n, default=a, description=d)] for n, (a, d) in RECIPES.items())
]


def parse_args(argv: Optional[list] = None) -> Args:
    """The command line: a recipe subcommand, then flags that override it. Without one, the first recipe runs with
    its own defaults (CRUCIAL: tyro's `default=` must be that recipe itself, or it replaces the recipe's values)."""
    return tyro.cli(SUBCOMMANDS, default=RECIPES["pretrain"][0], args=argv)


# ==== 2. VIEWS ====
def crop_groups(args: Args) -> list:
    """One crop per image: RandomResizedCrop(large_size, large_scale) + flip, no colour (spec 5, 7). Fine-tuning adds
    RandAugment and random erasing after this (augment_finetune)."""
    return [CropGroup(1, args.large_size, tuple(args.large_scale), colour=False)]


def rand_augment(x: torch.Tensor, gen: torch.Generator, n: int, m: float, mstd: float, fill: torch.Tensor):
    """timm RandAugment 'rand-m{m}-mstd{mstd}-inc1', batched: per image n ops drawn uniformly (with replacement) from
    the 15 'increasing' ops, each applied with p 0.5 at magnitude N(m, mstd) clipped to [0, 10] (of 10).
    x: float [B, 3, S, S] in 0..255 (rounded after every op, like PIL's uint8); fill: [3] for uncovered pixels.
    DEVIATION: bilinear resampling for the geometric ops (timm: PIL bicubic)."""
    B, dev = x.shape[0], x.device
    kernel = torch.tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]]).view(1, 1, 3, 3) / 13  # PIL SMOOTH

    def blend(a, b, f):  # PIL ImageEnhance: b + f (a - b), clipped
        return (b + f.view(-1, 1, 1, 1) * (a - b)).clamp(0, 255)

    for _ in range(n):
        op = torch.randint(0, 15, (B,), generator=gen, device=dev)
        op = torch.where(torch.rand(B, generator=gen, device=dev) < 0.5, op, -1)  # each op applied with p 0.5
        mag = (m + mstd * torch.randn(B, generator=gen, device=dev)).clamp(0, 10) / 10  # level / 10
        sign = torch.where(torch.rand(B, generator=gen, device=dev) < 0.5, -1.0, 1.0)
        # geometric: 3 Rotate (30 deg), 11 ShearX, 12 ShearY (0.3), 13 TranslateXRel, 14 TranslateYRel (0.45)
        ang, sh, tr = mag * 30 * sign * math.pi / 180, mag * 0.3 * sign, mag * 0.45 * sign * 2  # grid units: 2 = side
        cos, sin = torch.where(op == 3, ang.cos(), 1.0), torch.where(op == 3, ang.sin(), 0.0)
        # PIL shears about the top-left corner (x_in = x + s y in pixels): a centred shear plus a shift of s
        sx, sy = torch.where(op == 11, sh, 0.0), torch.where(op == 12, sh, 0.0)
        tx, ty = torch.where(op == 13, tr, sx), torch.where(op == 14, tr, sy)
        theta = torch.stack([cos, sx - sin, tx, sin + sy, cos, ty], 1).view(B, 2, 3)  # output -> input coordinates
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        warped = F.grid_sample(torch.cat([x, torch.ones_like(x[:, :1])], 1), grid, align_corners=False)  # bilinear
        cover = warped[:, 3:]  # 1 where the source image covers the output pixel
        geo = ((op == 3) | (op >= 11)).view(-1, 1, 1, 1)
        y = torch.where(geo, warped[:, :3] + (1 - cover) * fill.view(1, 3, 1, 1), x)
        # pixel ops on uint8 values: 0 AutoContrast, 1 Equalize, 2 Invert, 4 SharpnessIncreasing, 5 PosterizeIncreasing
        # (keep 4 - int(4 level) bits), 6 SolarizeIncreasing, 7 SolarizeAdd (threshold 128), 8 ColorIncreasing
        # (saturation), 9 ContrastIncreasing, 10 BrightnessIncreasing; the 'increasing' blends: factor 1 +- 0.9 level
        q, gray, f = x.round(), grayscale(x), 1 + mag * 0.9 * sign
        lo, hi = q.amin((2, 3), keepdim=True), q.amax((2, 3), keepdim=True)
        smooth = x.clone()  # PIL SMOOTH leaves the border unchanged
        smooth[..., 1:-1, 1:-1] = F.conv2d(x.flatten(0, 1)[:, None], kernel.to(x)).view_as(x[..., 1:-1, 1:-1])
        level, step = mag.view(-1, 1, 1, 1), 2 ** (4 + (mag * 4).floor().view(-1, 1, 1, 1))  # 2 ** (8 - bits)
        pixel = {
            0: torch.where(hi > lo, ((q - lo) * 255 / (hi - lo).clamp_min(1)).floor(), q), 1: equalize(q), 2: 255 - q,
            4: blend(x, smooth, f), 5: (q / step).floor() * step,
            6: torch.where(q >= 256 - (level * 256).floor(), 255 - q, q),
            7: torch.where(q < 128, (q + (level * 110).floor()).clamp(max=255), q), 8: blend(x, gray.expand_as(x), f),
            9: blend(x, gray.mean((1, 2, 3), keepdim=True).expand_as(x), f), 10: blend(x, torch.zeros_like(x), f),
        }  # fmt: skip
        for k, r in pixel.items():
            y = torch.where((op == k).view(-1, 1, 1, 1), r, y)
        x = y.round().clamp(0, 255)
    return x


def equalize(q: torch.Tensor) -> torch.Tensor:
    """PIL ImageOps.equalize per channel of uint8-valued images [B, C, H, W]: the cumulative histogram maps each level,
    step = (pixels - count of the last non-zero level) // 255; channels with step 0 stay unchanged."""
    B, C = q.shape[:2]
    v = q.flatten(2).long()  # [B, C, P]
    hist = torch.zeros(B, C, 256, device=q.device).scatter_add_(2, v, torch.ones_like(v, dtype=torch.float))
    last = hist.gather(2, (255 - (hist.flip(2) > 0).int().argmax(2, keepdim=True)))  # count of the top level
    step = ((hist.sum(2, keepdim=True) - last) / 255).floor()
    lut = ((hist.cumsum(2) - hist + (step / 2).floor()) / step.clamp_min(1)).floor().clamp(max=255)
    out = lut.gather(2, v).view_as(q)
    return torch.where(step.view(B, C, 1, 1) > 0, out, q)


def random_erasing(x: torch.Tensor, gen: torch.Generator, prob: float) -> torch.Tensor:
    """timm RandomErasing(prob, mode='pixel', max_count=1) on normalised images [B, 3, S, S], batched: with prob p,
    the first of 10 tries whose box fits (area U(0.02, 1/3) of the image, log aspect U(log 0.3, log 1/0.3)) is
    filled with N(0, 1) noise per pixel and channel."""
    (B, _, H, W), dev = x.shape, x.device
    area = H * W * (0.02 + (1 / 3 - 0.02) * torch.rand(B, 10, generator=gen, device=dev))
    ratio = torch.exp(math.log(0.3) * (1 - 2 * torch.rand(B, 10, generator=gen, device=dev)))  # log U(log .3, -log .3)
    h, w = (area * ratio).sqrt().round(), (area / ratio).sqrt().round()
    fits = (h < H) & (w < W)
    first = fits.int().argmax(1, keepdim=True)
    h, w = h.gather(1, first), w.gather(1, first)
    top = (torch.rand(B, 1, generator=gen, device=dev) * (H - h + 1)).floor()
    left = (torch.rand(B, 1, generator=gen, device=dev) * (W - w + 1)).floor()
    erase = (torch.rand(B, 1, generator=gen, device=dev) < prob) & fits.any(1, keepdim=True)
    rows, cols = torch.arange(H, device=dev), torch.arange(W, device=dev)
    box = ((rows >= top) & (rows < top + h))[:, :, None] & ((cols >= left) & (cols < left + w))[:, None, :]  # [B, H, W]
    return torch.where((box & erase[:, :, None])[:, None], torch.randn(x.shape, generator=gen, device=dev), x)


def mixup_cutmix(x: torch.Tensor, y: torch.Tensor, num_classes: int, args: Args, gen: torch.Generator) -> tuple:
    """timm Mixup(mixup_alpha, cutmix_alpha, prob 1, switch_prob 0.5, mode 'batch', correct_lam, label_smoothing):
    one lambda per batch; the batch is mixed with its reverse. Returns (images, soft targets [B, C]).
    gen: a CPU generator (the draws are Python numbers: no device sync)."""
    off = args.smoothing / num_classes
    y1 = torch.full((len(y), num_classes), off, device=x.device).scatter_(1, y[:, None], 1 - args.smoothing + off)
    if args.mixup <= 0 and args.cutmix <= 0:
        return x, y1
    u = torch.rand(4, generator=gen).tolist()
    cut = args.cutmix > 0 and (args.mixup <= 0 or u[0] < 0.5)
    g = torch._standard_gamma(torch.full((2,), args.cutmix if cut else args.mixup), generator=gen)
    lam = (g[0] / g.sum()).item()  # Beta(a, a) from two Gamma draws of the seeded stream
    if cut:  # PAPER (timm rand_bbox + correct_lam): a box of area (1 - lam), lam corrected by clipping
        (H, W), r = x.shape[-2:], math.sqrt(1 - lam)
        ch, cw, cy, cx = int(H * r), int(W * r), int(u[1] * H), int(u[2] * W)
        y0, y1_, x0, x1_ = max(cy - ch // 2, 0), min(cy + ch // 2, H), max(cx - cw // 2, 0), min(cx + cw // 2, W)
        x = x.clone()
        x[..., y0:y1_, x0:x1_] = x.flip(0)[..., y0:y1_, x0:x1_]
        lam = 1 - (y1_ - y0) * (x1_ - x0) / (H * W)
    else:
        x = x * lam + x.flip(0) * (1 - lam)
    return x, y1 * lam + y1.flip(0) * (1 - lam)


def augment_finetune(run: SimpleNamespace, x: torch.Tensor, y: torch.Tensor, key: tuple) -> tuple:
    """Fine-tuning's augmentation after the crop and flip (spec 7): per image RandAugment, then Normalize (already
    done by the views; undone here and redone), then random erasing; then mixup/cutmix on the batch.
    x: normalised [b, 3, S, S]; y: labels [b]. Returns (images, soft targets [b, C])."""
    args, gen = run.args, torch.Generator(device=x.device).manual_seed(rng_seed(*key))
    mean, std = run.pixel_mean.view(1, 3, 1, 1), run.pixel_std.view(1, 3, 1, 1)  # on the device once: no copies here
    if args.randaug_n > 0:
        fill = (run.pixel_mean * 255).round()  # timm: the mean pixel
        x = rand_augment(x * std * 255 + mean * 255, gen, args.randaug_n, args.randaug_m, args.randaug_mstd, fill)
        x = (x / 255 - mean) / std
    if args.reprob > 0:
        x = random_erasing(x, gen, args.reprob)
    return mixup_cutmix(x, y, run.data["num_classes"], args, torch.Generator().manual_seed(rng_seed(*key)))


# ==== 3. MODEL ====
def random_masking(x: torch.Tensor, mask_ratio: float, noise: torch.Tensor) -> tuple:
    """MAE's per-sample masking of x [B, N, D] (positions added): the int(N (1 - ratio)) tokens with the smallest noise
    [B, N] are kept, in that order. -> (kept [B, n_keep, D], mask [B, N] float with 1 = removed, ids_restore [B, N])."""
    B, N, D = x.shape
    n_keep = int(N * (1 - mask_ratio))
    ids_shuffle = noise.argsort(dim=1)  # ascending: small noise is kept
    ids_restore = ids_shuffle.argsort(dim=1)
    kept = x.gather(1, ids_shuffle[:, :n_keep, None].expand(-1, -1, D))
    return kept, (ids_restore >= n_keep).float(), ids_restore  # CRUCIAL: mask 1 = removed, in the patch order


def unshuffle(x: torch.Tensor, mask_token: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
    """Decoder input: [B, 1 + n_keep, d] (CLS first) -> [B, 1 + N, d] with mask tokens at the removed patches."""
    B, n_vis, d = x.shape
    rest = torch.cat([x[:, 1:], mask_token.to(x.dtype).expand(B, ids_restore.shape[1] + 1 - n_vis, d)], 1)
    rest = rest.gather(1, ids_restore[..., None].expand(-1, -1, d))
    return torch.cat([x[:, :1], rest], 1)


def fixed_pos_embed(dim: int, grid: int) -> nn.Parameter:
    """[1, 1 + grid^2, dim] 2-D sin-cos positions with a zero row for CLS; not trained."""
    return nn.Parameter(torch.cat([torch.zeros(1, dim), sincos_pos_embed_2d(dim, grid)])[None], requires_grad=False)


def init_new_modules(model: nn.Module) -> None:
    """MAE/TEC init: Linear xavier_uniform + zero bias, LayerNorm 1/0, mask tokens and cls tokens N(0, 0.02)."""
    model.apply(VisionTransformer._init_weights)
    for name, p in model.named_parameters():
        if name.endswith(("mask_token", "cls_token")):
            nn.init.normal_(p, std=0.02)


class MaskedEncoder(VisionTransformer):
    """The common ViT with MAE's masked forward: positions added, then masking, then the CLS token prepended.
    mlp_token: the CLS token is MLP(cls_token) (TEC's input adapter, spec 3.1)."""

    def __init__(self, mlp_token: bool = False, **vit):
        super().__init__(**vit)
        if mlp_token:
            self.cls_token_mlp = Mlp(self.embed_dim, 4 * self.embed_dim)
        self.fc_norm = nn.Identity()  # finetune's global pool: a LayerNorm (Classifier)

    def cls(self, B: int) -> torch.Tensor:
        cls = self.cls_token_mlp(self.cls_token) if hasattr(self, "cls_token_mlp") else self.cls_token
        return (cls + self.pos_embed[:, :1]).expand(B, -1, -1)

    def prepare_tokens(self, x: torch.Tensor) -> torch.Tensor:  # the full image (finetune, linear, readout)
        return torch.cat([self.cls(len(x)), self.patch_embed(x) + self.pos_embed[:, 1:]], 1)

    def encode_masked(self, imgs: torch.Tensor, noise: torch.Tensor, mask_ratio: float) -> tuple:
        """-> (every block's output [B, 1 + n_keep, D], the last one after norm; mask; ids_restore)."""
        kept, mask, ids_restore = random_masking(self.patch_embed(imgs) + self.pos_embed[:, 1:], mask_ratio, noise)
        x, outs = torch.cat([self.cls(len(imgs)), kept], 1), []
        for blk in self.blocks:
            x = blk(x)
            outs.append(x)
        outs[-1] = self.norm(x)  # PAPER (spec 3.1): the last output enters the adapter after the final norm
        return outs, mask, ids_restore

    def readout(self, x: torch.Tensor, pool: str) -> torch.Tensor:
        """Features of the unmasked image: pool cls = the CLS token after the final norm; avg = the mean patch token
        after the final norm, or after fc_norm in its place (finetune's global pool)."""
        x = self.forward_features(x)
        return x[:, 0] if pool == "cls" else self.fc_norm(x[:, 1:].mean(1))


class MAEModel(MaskedEncoder):
    """MAE (facebookresearch/mae models_mae, same key names): encoder on the visible patches, decoder_depth blocks on
    all tokens, a linear pixel head. Trains the base model where no official checkpoint is at hand."""

    def __init__(self, decoder_dim: int, decoder_depth: int, decoder_heads: int, **vit):
        super().__init__(**vit)
        self.decoder_embed = nn.Linear(self.embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder_pos_embed = fixed_pos_embed(decoder_dim, self.patch_embed.grid_size)
        self.decoder_blocks = nn.Sequential(*[Block(decoder_dim, decoder_heads) for _ in range(decoder_depth)])
        self.decoder_norm = LayerNorm(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, self.patch_embed.patch_size**2 * 3)
        init_new_modules(self)

    def forward(self, imgs: torch.Tensor, noise: torch.Tensor, mask_ratio: float) -> tuple:
        outs, mask, ids_restore = self.encode_masked(imgs, noise, mask_ratio)
        x = unshuffle(self.decoder_embed(outs[-1]), self.mask_token, ids_restore) + self.decoder_pos_embed
        return self.decoder_pred(self.decoder_norm(self.decoder_blocks(x)))[:, 1:], mask  # [B, N, p*p*3], CLS dropped


class FeatureAdaptor(nn.Module):
    """TEC's encoder adapter (spec 3.2): LN over every block's output concatenated ([B, T, depth D]), split into
    num_adap chunks of consecutive layers; y_i = Linear_i(chunk_i), y_i += MLP_i(y_i); LN(sum_i y_i)."""

    def __init__(self, dim: int, depth: int, num_adap: int, hidden: int):
        super().__init__()
        # CRUCIAL: both LayerNorms are PyTorch's default (eps 1e-5), unlike every other LN here (1e-6)
        self.adap_before = nn.LayerNorm(dim * depth)
        self.fuse_fcs = nn.ModuleList([nn.Linear(dim * (depth // num_adap), dim) for _ in range(num_adap)])
        self.adap_mlps = nn.ModuleList([Mlp(dim, hidden) for _ in range(num_adap)])
        self.adap_after = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = 0
        for chunk, fc, mlp in zip(self.adap_before(x).chunk(len(self.fuse_fcs), dim=-1), self.fuse_fcs, self.adap_mlps):
            y = fc(chunk)
            out = out + y + mlp(y)
        return self.adap_after(out)


class DecoderHead(nn.Module):
    """One of TEC's two heads on the shared decoder trunk (spec 3.3): own decoder_embed, mask_token and final LN."""

    def __init__(self, dim: int, decoder_dim: int, out_dim: int, out_name: str):
        super().__init__()
        self.decoder_embed = nn.Linear(dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder_norm = LayerNorm(decoder_dim)
        setattr(self, out_name, nn.Linear(decoder_dim, out_dim))  # decoder_pred (features) or decoder_qk (relations)
        self.out = getattr(self, out_name)

    def embed(self, a: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """Adapter output [B, 1 + n_keep, D] -> [B, 1 + N, d]: embedded, mask tokens at the removed patches."""
        return unshuffle(self.decoder_embed(a), self.mask_token, ids_restore)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.decoder_norm(x))  # [B, 1 + N, out_dim]


class TECModel(MaskedEncoder):
    """The new model (spec 3), official key names: the encoder (with cls_token_mlp), encoder_adaptor,
    forward_fea_decoder, forward_att_decoder, the shared decoder_blocks and decoder_pos_embed."""

    def __init__(self, decoder_dim: int, decoder_depth: int, decoder_heads: int, rel_heads: int, **vit):
        super().__init__(mlp_token=True, **vit)
        D, depth, grid = self.embed_dim, self.depth, self.patch_embed.grid_size
        self.rel_heads = rel_heads  # PAPER: H of the relation head = the base model's heads
        self.encoder_adaptor = FeatureAdaptor(D, depth, max(1, depth // 3), 4 * decoder_dim)
        self.forward_fea_decoder = DecoderHead(D, decoder_dim, D, "decoder_pred")
        self.forward_att_decoder = DecoderHead(D, decoder_dim, 2 * D, "decoder_qk")
        self.decoder_blocks = nn.Sequential(*[Block(decoder_dim, decoder_heads) for _ in range(decoder_depth)])
        self.decoder_pos_embed = fixed_pos_embed(decoder_dim, grid)
        init_new_modules(self)

    def forward(self, imgs: torch.Tensor, noise: torch.Tensor, topk_idx: torch.Tensor, mask_ratio: float) -> tuple:
        """-> (pred_feat [B, N, D], pred_rel_logits [B, 1+k, H, N], mask [B, N] with 1 = removed)."""
        outs, mask, ids_restore = self.encode_masked(imgs, noise, mask_ratio)
        a = self.encoder_adaptor(torch.cat(outs, dim=-1))  # [B, 1 + n_keep, D]
        fea, att = self.forward_fea_decoder, self.forward_att_decoder
        # CRUCIAL: one trunk for both heads (official: run once per head); both inputs go through it as one batch of
        # 2B, which computes the same thing in one pass (no batch statistics in a ViT)
        x = torch.cat([fea.embed(a, ids_restore), att.embed(a, ids_restore)]) + self.decoder_pos_embed
        x_fea, x_att = self.decoder_blocks(x).chunk(2)
        q, k = att(x_att).unflatten(-1, (2, self.rel_heads, -1)).permute(2, 0, 3, 1, 4)  # PAPER: (2, H, D/H) split
        rel = student_relation_logits(q.float(), k.float(), topk_idx, self.embed_dim**-0.5)  # fp32, small
        return fea(x_fea)[:, 1:], rel, mask


class Classifier(MaskedEncoder):
    """MAE's fine-tuning / linear-probe ViT (spec 7), features as `readout`; positions learned from the checkpoint's
    values; the head is trunc_normal, after a BatchNorm1d(affine=False, eps 1e-6) in the linear probe."""

    def __init__(self, pool: str, linear: bool, mlp_token: bool, num_classes: int, **vit):
        super().__init__(mlp_token=mlp_token, pos_embed="learned", num_classes=num_classes, **vit)
        self.pool, self.linear = pool, linear
        if pool == "avg" and not linear:
            self.fc_norm, self.norm = LayerNorm(self.embed_dim), nn.Identity()  # official: global_pool deletes norm
        head = self.head
        if linear:  # only the head trains: the encoder is frozen and runs without grad (forward)
            self.requires_grad_(False)
            self.head = nn.Sequential(nn.BatchNorm1d(self.embed_dim, affine=False, eps=1e-6), head.requires_grad_())
        nn.init.trunc_normal_(head.weight, std=0.01 if linear else 2e-5)  # PAPER: MAE main_linprobe / main_finetune
        nn.init.zeros_(head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad() if self.linear else nullcontext():  # CRUCIAL: linear: only the BN + Linear head trains
            f = self.readout(x, self.pool)
        return self.head(f.float() if self.linear else f)


@torch.no_grad()
def base_forward(model: VisionTransformer, images: torch.Tensor, last_layers: int) -> tuple:
    """The frozen base model (spec 2.2, loaded by common/vit.py's load_base_model) on the full image. Returns (feats
    [L, B, 1+N, D]: the last L block outputs before the final norm, attn_logits [B, H, 1+N, 1+N]: the last block's
    pre-softmax attention, scaled by d_head^-0.5)."""
    out = model.forward_features(images, return_all=True)  # only the last block leaves the fused attention kernel
    return torch.stack(out["blocks"][-last_layers:]), out["attn_logits"]


# ==== 4. LOSS ====
def relation_rows(x: torch.Tensor, topk_idx: torch.Tensor) -> torch.Tensor:
    """Rows CLS and 1 + topk_idx (token positions, CLS first) of x [B, H, 1+N, d] -> [B, H, 1+k, d]."""
    rows = torch.cat([torch.zeros_like(topk_idx[:, :1]), topk_idx + 1], 1)
    return x.gather(2, rows[:, None, :, None].expand(-1, x.shape[1], -1, x.shape[-1]))


def enhance_targets(feats: torch.Tensor, attn_logits: torch.Tensor, topk: int, tau: float) -> tuple:
    """The patch-relation enhanced targets (spec 2.3). feats [L, B, 1+N, D]; attn_logits [B, H, 1+N, 1+N].
    Returns (feat_target [B, N, D]: the mean over L, CLS dropped, not normalised; rel_target [B, 1+k, H, N]:
    softmax(R / tau) over the N patch keys; topk_idx [B, k]: the patches CLS attends to most, descending)."""
    feat_target = feats[:, :, 1:].sum(0) / len(feats)
    rank = attn_logits[:, :, 0, 1:].mean(1)  # CRUCIAL: the head mean of the PRE-softmax CLS -> patch logits
    topk_idx = rank.topk(topk, dim=1).indices  # sorted, largest first
    rel_logits = relation_rows(attn_logits, topk_idx)[..., 1:].transpose(1, 2)  # R: CLS key removed BEFORE softmax
    return feat_target, F.softmax(rel_logits / tau, dim=-1), topk_idx


def student_relation_logits(q: torch.Tensor, k: torch.Tensor, topk_idx: torch.Tensor, scale: float) -> torch.Tensor:
    """The new model's relation logits (spec 3.3): q, k [B, H, 1+N, d]; the CLS row and rows 1 + topk_idx of q against
    every key, times scale (PAPER: D^-0.5 with the full width D, not d_head), CLS key dropped -> [B, 1+k, H, N]."""
    return ((relation_rows(q, topk_idx) @ k.transpose(-2, -1)) * scale)[..., 1:].transpose(1, 2)


def tec_loss(pred_feat, pred_rel_logits, feat_target, rel_target, mask) -> tuple:
    """Spec 4: (total, loss_fea, loss_att). pred_feat, feat_target [B, N, D]; pred_rel_logits, rel_target
    [B, 1+k, H, N]; mask [B, N] with 1 = removed. Computed in fp32.
    loss_fea: MSE on the removed patches against the target normalised per image and channel over the N patches
    (unbiased variance, eps 1e-6 inside the root); loss_att: soft cross-entropy over every row (no mask, no
    temperature on the prediction), averaged over (b, row, head); total = loss_fea + loss_att."""
    t = feat_target.float()
    t = (t - t.mean(1, keepdim=True)) / (t.var(1, keepdim=True) + 1e-6) ** 0.5  # CRUCIAL: over patches (dim 1)
    per_patch = ((pred_feat.float() - t) ** 2).mean(-1)  # [B, N]
    loss_fea = (per_patch * mask).sum() / mask.sum()
    loss_att = soft_cross_entropy(pred_rel_logits, rel_target.float())
    return loss_fea + loss_att, loss_fea, loss_att


def mae_loss(pred: torch.Tensor, imgs: torch.Tensor, mask: torch.Tensor, p: int, norm_pix: bool) -> torch.Tensor:
    """MAE: MSE on the removed patches against the image [B, 3, H, W] cut into [B, N, p*p*3] in MAE's order (patch
    rows, then pixels (py, px, channel)); norm_pix: each target patch normalised by its own mean and (unbiased) var."""
    B, C, H, W = imgs.shape
    target = torch.einsum("nchpwq->nhwpqc", imgs.float().reshape(B, C, H // p, p, W // p, p)).reshape(B, -1, p * p * C)
    if norm_pix:
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    per_patch = ((pred.float() - target) ** 2).mean(-1)
    return (per_patch * mask).sum() / mask.sum()


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """timm SoftTargetCrossEntropy: mean over the batch of -sum_c target_c log_softmax(logits)_c."""
    return -(target * F.log_softmax(logits.float(), dim=-1)).sum(-1).mean()


# ==== 5. OPTIMIZER & SCHEDULES ====
def param_groups(model: nn.Module, weight_decay: float) -> list:
    """timm add_weight_decay (spec 5): no decay for 1-D parameters and biases; cls_token, cls_token_mlp and the mask
    tokens are decayed; the fixed positions (requires_grad False) are left out."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return [dict(params=no_decay, weight_decay=0.0), dict(params=decay, weight_decay=weight_decay)]


def layer_decay_groups(model: nn.Module, weight_decay: float, layer_decay: float) -> list:
    """MAE's param_groups_lrd with TEC's quirk (spec 7): with L = depth + 1 layers, lr_scale = layer_decay^(L - id);
    id 0: patch_embed, pos_embed; id i + 1: blocks.i; id L (scale 1): everything else (head, fc_norm, norm,
    cls_token_mlp) and, CRUCIAL, cls_token too (TEC gives it id -1, which Python's list indexing turns into scale 1;
    MAE puts it at 0). No weight decay on 1-D parameters, pos_embed and cls_token."""
    n_layers, groups = len(model.blocks) + 1, {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        layer = int(name.split(".")[1]) + 1 if name.startswith("blocks.") else n_layers
        layer = 0 if name.startswith(("patch_embed", "pos_embed")) else layer
        no_wd = p.ndim == 1 or name in ("pos_embed", "cls_token")
        wd, scale = 0.0 if no_wd else weight_decay, layer_decay ** (n_layers - layer)
        group = groups.setdefault((layer, no_wd), dict(params=[], weight_decay=wd, lr_scale=scale, layer=layer))
        group["params"].append(p)
    return [groups[k] for k in sorted(groups)]


def build_optimizer(model: nn.Module, args: Args) -> torch.optim.Optimizer:
    """pretrain / mae: AdamW(betas (0.9, 0.95), wd 0.05, timm groups); finetune: AdamW with layer decay;
    linear: LARS (MAE's: trust 0.001 on the head's weight, plain momentum SGD for its bias), wd 0."""
    if args.mode == "linear":
        groups = [dict(params=[model.head[-1].weight], lars=True), dict(params=[model.head[-1].bias], lars=False)]
        return LARS(groups, lr=0.0, momentum=0.9, weight_decay=args.weight_decay, eta=0.001)
    wd = args.weight_decay
    groups = layer_decay_groups(model, wd, args.layer_decay) if args.mode == "finetune" else param_groups(model, wd)
    return torch.optim.AdamW(groups, lr=0.0, betas=tuple(args.betas), fused=next(model.parameters()).is_cuda)


def lr_at(step: int, args: Args, steps_per_epoch: int) -> float:
    """MAE's lr_sched per step at the fractional epoch: linear warm-up from 0 to blr x batch/256 over warmup_epochs,
    then a half cosine to min_lr at the last epoch."""
    peak, epoch = args.blr * args.batch_size / 256, step / steps_per_epoch  # PAPER: lr = blr x eff. batch / 256
    if epoch < args.warmup_epochs:
        return peak * epoch / args.warmup_epochs
    t = (epoch - args.warmup_epochs) / max(args.epochs - args.warmup_epochs, 1e-12)
    return args.min_lr + (peak - args.min_lr) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


# ==== 6. TRAIN STEP ====
METRICS = dict(pretrain=("loss", "loss_fea", "loss_att"), mae=("loss",))  # the step's metrics; else ("loss", "top1")


def train_batches(run: SimpleNamespace, epoch: int, start: int, last: int):
    """This rank's (crops [b, 3, S, S], labels [b]) of steps start..last-1 of `epoch`."""
    args, device, data = run.args, run.device, run.data
    on = device if torch.is_tensor(data["train_x"]) else None  # in memory: the index batches on the device
    batches = epoch_batches(len(data["train_y"]), args.batch_size, args.seed, epoch, on)[start:last]
    keys = [(args.seed, "train", epoch, s) for s in range(start, last)]
    train_y, b = data["train_y"].to(device), args.batch_size // run.world_size
    for idx, (x,) in zip(batches, view_batches(run, data["train_x"], batches, keys, run.groups)):
        yield x, train_y[idx[run.rank * b : (run.rank + 1) * b].to(device)]


def step_loss(run: SimpleNamespace, x: torch.Tensor, y: torch.Tensor, noise: torch.Tensor, key: tuple) -> tuple:
    """One micro-batch's loss (fp32) and its metrics (METRICS[mode]; top-1 against the hard labels)."""
    args, mode = run.args, run.args.mode
    if mode == "pretrain":
        with run.autocast:
            feats, attn = base_forward(run.base, x, args.last_layers)
        feat_target, rel_target, topk_idx = enhance_targets(feats.float(), attn.float(), args.topk, args.tau)
        with run.autocast:
            pred_feat, pred_rel, mask = run.ddp_model(x, noise, topk_idx, args.mask_ratio)
        total, fea, att = tec_loss(pred_feat, pred_rel, feat_target, rel_target, mask)
        return total, torch.stack([total, fea, att]).detach()
    if mode == "mae":
        with run.autocast:
            pred, mask = run.ddp_model(x, noise, args.mask_ratio)
        loss = mae_loss(pred, x, mask, args.patch_size, args.norm_pix)
        return loss, loss.detach()[None]
    if mode == "finetune":
        x, target = augment_finetune(run, x, y, key)
    with run.autocast:
        logits = run.ddp_model(x)
    loss = soft_cross_entropy(logits, target) if mode == "finetune" else F.cross_entropy(logits.float(), y)
    return loss, torch.stack([loss.detach(), 100 * (logits.argmax(1) == y).float().mean()])


def train_step(run: SimpleNamespace, batch: tuple, step: int) -> torch.Tensor:
    """One optimizer step on this rank's share (x [b, 3, S, S], y [b]) in --accum-iter micro-batches (the loss of each
    divided by accum_iter; DDP reduces gradients after the last only). The masking noise is drawn for the global batch
    from the step's seed and each rank keeps its rows, so any world size sees the same masks."""
    (x, y), args, b = batch, run.args, len(batch[0])
    torch.manual_seed(rng_seed(args.seed, "step", step, run.rank))  # drop path: a resumed run replays the same masks
    noise = torch.zeros(b, 1, device=run.device)  # finetune / linear: no masking
    if args.mode in ("pretrain", "mae"):
        gen = torch.Generator(device=run.device).manual_seed(rng_seed(args.seed, "mask", step))
        noise = torch.rand(args.batch_size, run.model.patch_embed.num_patches, generator=gen, device=run.device)
        noise = noise[run.rank * b : (run.rank + 1) * b]
    parts = zip(x.chunk(args.accum_iter), y.chunk(args.accum_iter), noise.chunk(args.accum_iter))
    metrics = 0
    for i, (xi, yi, ni) in enumerate(parts):  # DDP reduces the gradients after the last micro-batch only
        with run.ddp_model.no_sync() if run.world_size > 1 and i < args.accum_iter - 1 else nullcontext():
            loss, m = step_loss(run, xi, yi, ni, (args.seed, "aug", step, run.rank, i))
            run.scaler.scale(loss / args.accum_iter).backward()
        metrics = metrics + m / args.accum_iter
    run.scaler.step(run.opt)
    run.scaler.update()
    run.opt.zero_grad(set_to_none=True)
    return metrics


# ==== 7. TRAINING ====
def check_args(args: Args, world_size: int) -> None:
    """Refuse bad input with one clear line, before any data is read or process group created."""
    mode, size, p, base, acc = args.mode, args.large_size, args.patch_size, args.base_arch, args.accum_iter
    ones = "accum_iter large_size patch_size topk last_layers train_repeat decoder_dim decoder_depth decoder_heads"
    check_common_args(args, world_size, SIZES, scales="large_scale", positive="blr tau", at_least_1=ones,
                      at_least_0="workers eval_every eval_subset_train eval_subset_test randaug_n",
                      non_negative="min_lr warmup_epochs mixup cutmix randaug_m randaug_mstd")  # fmt: skip
    n_patches, per_rank = (size // p) ** 2, args.batch_size // world_size
    for bad, message in [
        (mode == "convert" and None in (args.init, args.convert_out),
         "convert needs --init (a checkpoint) and --convert-out (where the plain ViT goes)"),
        (base not in (None, *SIZES), f"unknown --base-arch {base!r}; choose one of {', '.join(SIZES)}"),
        *[(not 0 <= getattr(args, k) < 1, f"--{k.replace('_', '-')} must be in [0, 1), got {getattr(args, k)}")
          for k in ("smoothing", "reprob", "drop_path", "mask_ratio")],
        (not 0 < args.layer_decay <= 1, f"--layer-decay must be in (0, 1], got {args.layer_decay}"),
        (size % p != 0, f"--large-size {size} does not divide into --patch-size {p} patches"),
        (mode == "pretrain" and args.base_checkpoint is None,
         "pretrain needs --base-checkpoint (a pretrained MAE/iBOT ViT, or a run of `mae`)"),
        (mode == "pretrain" and args.topk > n_patches, f"--topk {args.topk} exceeds the {n_patches} patches"),
        (mode in ("pretrain", "mae") and int(n_patches * (1 - args.mask_ratio)) < 1,
         f"--mask-ratio {args.mask_ratio} keeps no patch of {n_patches}"),
        (mode in ("finetune", "linear") and args.probe != "none",
         f"--probe {args.probe} is the pretraining readout; {mode} evaluates its own classifier"),
        (mode != "pretrain" and args.base_checkpoint, f"--base-checkpoint applies to pretrain only, not {mode}"),
        (mode == "linear" and args.init is None, "linear needs --init (the pretrained encoder to probe)"),
        (per_rank % acc, f"the per-rank batch {per_rank} does not divide into --accum-iter {acc}"),
    ]:  # fmt: skip
        if bad:
            raise RunError(message)


def read_once(run: SimpleNamespace, source: str) -> dict:
    """read_checkpoint(source), a path or URL; rank 0 alone downloads a URL into torch's hub cache, the others wait."""
    if run.world_size > 1 and run.rank > 0:
        dist.barrier()
    ckpt = read_checkpoint(source)
    if run.world_size > 1 and run.rank == 0:
        dist.barrier()
    return ckpt


def build_model(run: SimpleNamespace) -> nn.Module:
    """The trained module of this mode (random init from the seed; run_training then loads --init)."""
    args, nc = run.args, run.data["num_classes"]
    vit = dict(img_size=args.large_size, patch_size=args.patch_size, **SIZES[args.arch])
    dec = dict(decoder_dim=args.decoder_dim, decoder_depth=args.decoder_depth, decoder_heads=args.decoder_heads)
    resume = Path(args.resume or Path(args.out_dir) / "last.pt")  # to be resumed: --init is not read
    resume = resume if resume.is_file() else None
    init = read_once(run, args.init) if args.init and not resume else None  # a URL: into torch's hub cache
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", Path(urlparse(args.init or "").path).name)
    run.init_file = cached if str(args.init).startswith(("http://", "https://")) else args.init
    if args.mode == "pretrain":
        base = SIZES[args.base_arch or args.arch]
        run.base = load_base_model(read_once(run, args.base_checkpoint), args.large_size, args.patch_size, **base)
        run.base.to(run.device)
        return TECModel(rel_heads=base["num_heads"], **dec, **vit)
    if args.mode == "mae":
        return MAEModel(**dec, **vit)
    # a TEC checkpoint's CLS MLP (or the resumed run's), kept and trained (--keep-cls-mlp) or folded in by fit_vit
    src = vit_tensors(load_checkpoint(resume) if resume else init) or {}
    mlp = args.keep_cls_mlp and "cls_token_mlp.fc1.weight" in src
    if not args.init and run.rank == 0:
        print(f"{Path(__file__).name}: warning: no --init: fine-tuning from a random init", file=sys.stderr)
    linear = args.mode == "linear"
    return Classifier(args.pool, linear, mlp, nc, drop_path_rate=0.0 if linear else args.drop_path, **vit)


def tec_checkpoint(obj) -> Optional[dict]:
    """--init format: sail-sg/TEC main_pretrain.py's checkpoints (util/misc.py save_model: {"model": TECViT of
    models/models_tec_vit.py, "optimizer", "epoch", ...}), in our TECModel's names (+ each head's output as `out`)."""
    sd = vit_tensors(obj)
    if sd is None or "encoder_adaptor.adap_before.weight" not in sd:
        return None
    for h, o in (("fea", "decoder_pred"), ("att", "decoder_qk")):
        sd.update(strip_prefix(sd, f"forward_{h}_decoder.{o}.", f"forward_{h}_decoder.out."))
    return sd


INIT_FORMATS = {
    "last.pt": lambda obj: vit_tensors(own_checkpoint(obj)) if isinstance(obj, dict) and "step" in obj else None,
    "TEC pretraining checkpoint (main_pretrain.py)": tec_checkpoint,
    # sail-sg/TEC weight_convert.py (the released tec_*.pth): models/models_vit.py's bare state dict, the CLS MLP folded
    # into cls_token, norm, fc_norm and head deleted: cls_token, pos_embed, patch_embed.proj.*, blocks.* alone
    "TEC converted ViT (weight_convert.py)": lambda obj: (
        sd if (sd := vit_tensors(obj)) and all(k.startswith(("cls_token", *ENCODER)) for k in sd) else None
    ),
    # facebookresearch/mae's releases and checkpoints (models_mae.py: timm's ViT names, its decoder), iBOT's, timm's,
    # our convert's and backbone.pt
    "timm/MAE ViT": vit_tensors,
}


def load_init(run: SimpleNamespace) -> str:
    """--init: the first of INIT_FORMATS that reads the file gives its tensors under our names (common/checkpoint.py
    init_weights), fitted to this mode's model (common/vit.py fit_vit: the encoder must fit, the rest where it does)."""
    own, what = run.model.state_dict(), f"--init {run.init_file}"
    formats = {n: lambda obj, c=c, n=n: fit_vit(c(obj), own, f"{what} ({n})") for n, c in INIT_FORMATS.items()}
    return init_weights(run.model, run.init_file, formats, backbone=ENCODER)


def run_training(args: Args) -> dict:
    """The run: set-up (model, optimizer, resume, DDP), the shared epoch loop, the final evaluation, results.json."""
    if args.mode == "convert":
        check_args(args, 1)
        return convert(args)
    run = start_run(args)
    args, device = run.args, run.device  # as start_run settled them (precision, probe batch)
    torch.manual_seed(args.seed)  # the same initial model on every rank
    run.model = model = build_model(run).to(device)
    # what the evaluation encodes: the classifier's logits, or the pretrained encoder's readout of the whole image
    run.encode = model if args.mode in ("finetune", "linear") else partial(model.readout, pool=args.pool)
    run.groups, run.metrics = crop_groups(args), METRICS.get(args.mode, ("loss", "top1"))
    run.pixel_mean, run.pixel_std = (torch.tensor(v, device=device) for v in (args.mean, args.std))
    run.opt = build_optimizer(model, args)
    init = load_init(run) if resume_state(run, set()) is None and args.init else None  # resumed: --init ignored
    if init and run.rank == 0:
        print(init)
    log = Path(args.out_dir) / "log.jsonl"
    if args.mode in ("finetune", "linear") and run.global_step and log.is_file():  # the best top-1 before a resume
        evals = [json.loads(line) for line in log.read_text().splitlines()]
        run.best_top1 = max([e["top1"] for e in evals if e["type"] == "eval" and e["step"] <= run.global_step] + [0])
    ddp = dict(device_ids=[device] if device.type == "cuda" else None)
    net = nn.parallel.DistributedDataParallel(model, **ddp) if run.world_size > 1 else model
    run.ddp_model = torch.compile(net) if args.compile else net
    bench = run_benchmarks(run)
    run.total_steps = min(run.steps_per_epoch * args.epochs, math.inf if args.max_steps is None else args.max_steps)
    train_epochs(run)
    if run.rank == 0:  # the ViT encoder alone in timm/MAE layout (common/vit.py), as convert writes it
        export_encoder(model.state_dict(), f"{args.out_dir}/backbone.pt", plain=True)
    res = evaluate(run, tag="final")
    if run.rank == 0:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        extra = dict(mode=args.mode, peak_lr=args.blr * args.batch_size / 256, trainable_params=trainable, init=init)
        if args.mode == "pretrain":
            extra.update(base_checkpoint=args.base_checkpoint, topk=args.topk, tau=args.tau)
        write_results(run, "TEC, Towards Sustainable Self-supervised Learning (arXiv 2210.11016)", extra, bench, res)
    if dist.is_initialized():
        dist.destroy_process_group()
    return res


def convert(args: Args) -> dict:
    """Spec 6: a pretraining checkpoint -> the plain ViT encoder {'model': sd} that common/vit.py (and timm-style code)
    loads: cls_token := MLP(cls_token), adapters, decoders and heads dropped. DEVIATION: norm.* is kept (official
    conversion drops it because global pooling deletes the norm; the CLS-token readout needs it)."""
    sd = export_encoder(args.init, args.convert_out)
    n_blocks = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    print(f"wrote {args.convert_out}: {len(sd)} tensors, {n_blocks} blocks, width {sd['cls_token'].shape[-1]}")
    return dict(tensors=len(sd))


# --- the method's own evaluation
def evaluate(run: SimpleNamespace, tag: str) -> dict:
    """pretrain / mae: weighted k-NN on the encoder's readout of the unmasked image (a seeded subset during training,
    everything at the end; our addition) and at the end the fast feature probe (--probe features).
    finetune / linear: top-1 / top-5 of the classifier on the test split (centre crops)."""
    args, data, device, final = run.args, run.data, run.device, tag == "final"
    nc, t0, res, feats = data["num_classes"], time.perf_counter(), {}, []
    if args.mode in ("finetune", "linear"):  # run.encode: the classifier's logits
        hit = extract_features(run, "test").topk(min(5, nc), dim=1).indices == data["test_y"].to(device)[:, None]
        top1, top5 = (100 * hit[:, :k].any(1).float().mean().item() for k in (1, 5))
        run.best_top1 = max(getattr(run, "best_top1", 0.0), top1)
        res = dict(top1=top1, top5=top5, top1_best=run.best_top1)
    else:  # run.encode: the encoder's readout -> feats = [x_train, y_train, x_test, y_test]
        for split, size in (("train", args.eval_subset_train), ("test", args.eval_subset_test)):
            n = len(data[f"{split}_y"])
            g = torch.Generator().manual_seed(rng_seed(args.seed, "eval-subset", split))
            ids = torch.arange(n) if final or size >= n else torch.randperm(n, generator=g)[:size].sort().values
            feats += [extract_features(run, split, ids), data[f"{split}_y"][ids].to(device)]
    times = dict(encode_s=time.perf_counter() - t0)
    if feats and run.rank == 0:
        t0 = time.perf_counter()
        res["knn_top1"], res["knn_top5"] = knn_eval(*feats, nc, args.knn_k, args.knn_t)
        times["knn_s"] = time.perf_counter() - t0
        if final and args.probe == "features":
            t0, probe_args = time.perf_counter(), (args.probe_lr, args.probe_wd, args.probe_batch_size, args.seed)
            probe = linear_probe(*feats, nc, args.probe_epochs, *probe_args)
            res["linear_fast_top1"], res["linear_fast_top1_best"] = probe["last"], probe["best"]
            times["probe_s"] = time.perf_counter() - t0
    if run.world_size > 1:
        dist.barrier()
    if run.rank == 0:
        log_jsonl(run, dict(type="eval", tag=tag, step=run.global_step, **res, **times))
        print(f"eval @ {tag} | " + " | ".join(f"{k} {v:.2f}" for k, v in {**res, **times}.items()))
    for k, v in times.items():
        run.times[k] = run.times.get(k, 0.0) + v
    return res


def bare_step(run: SimpleNamespace):
    """The ceiling's step (issue 17: the base forward + the student): a copy of this mode's network on random images,
    masks and top-k, in --accum-iter micro-batches as the step, without data, targets, loss or optimizer. pretrain =
    the frozen base model's forward + the TEC model's forward+backward (adapter and decoders included); mae the MAE
    model's; finetune the classifier's forward+backward on every token; linear its forward."""
    args, mode, dev = run.args, run.args.mode, run.device
    bare, n, b = copy.deepcopy(run.model), run.model.patch_embed.num_patches, args.batch_size // run.world_size
    x = torch.randn(b // args.accum_iter, 3, args.large_size, args.large_size, device=dev)
    noise = torch.rand(len(x), n, device=dev)
    inputs = (x,) if mode in ("finetune", "linear") else (x, noise, args.mask_ratio)
    if mode == "pretrain":  # random top-k patches in place of the base model's
        inputs = (x, noise, torch.rand(len(x), n, device=dev).topk(args.topk, dim=1).indices, args.mask_ratio)

    def step():
        bare.zero_grad(set_to_none=True)
        for _ in range(args.accum_iter):
            with run.autocast:
                if mode == "pretrain":
                    base_forward(run.base, x, args.last_layers)  # frozen, on an input without grad: no graph
                out = bare(*inputs)
            if mode != "linear":  # every output but the mask
                sum(o.float().sum() for o in (out[:-1] if mode in ("pretrain", "mae") else [out])).backward()

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


if __name__ == "__main__":
    main(parse_args())
