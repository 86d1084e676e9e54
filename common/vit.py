"""Pre-norm Vision Transformer with the MAE/timm key layout, so official MAE encoder checkpoints load strictly.

Keys: cls_token, pos_embed, patch_embed.proj, blocks.{i}.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2},
norm, and head when num_classes > 0. LayerNorm eps is 1e-6 everywhere. At the end: the encoder weights of MAE, iBOT
and TEC checkpoints in this layout, loaded strictly (TEC's base model) or written (its conversion and backbone.pt), and
tec_mae.py's --init: a file's ViT tensors fitted to the model of a mode (vit_tensors, fit_vit).
"""

import os
from functools import partial
from typing import Literal, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.checkpoint import CheckpointError, load_state_dict_strict, read_checkpoint, save_checkpoint

LayerNorm = partial(nn.LayerNorm, eps=1e-6)


def sincos_pos_embed_2d(dim: int, grid_size: int) -> torch.Tensor:
    """Fixed 2-D sin-cos positions [grid_size**2, dim] (MAE): first half of dims encodes the column (w) index,
    second half the row (h) index; each half is [sin(p * omega), cos(p * omega)], omega_k = 10000^(-k / (dim/4))."""
    assert dim % 4 == 0, f"sincos pos_embed needs embed_dim divisible by 4, got {dim}"
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    rows, cols = torch.meshgrid(torch.arange(grid_size), torch.arange(grid_size), indexing="ij")

    def embed_1d(pos: torch.Tensor) -> torch.Tensor:
        out = pos.reshape(-1, 1).double() * omega  # [N, dim/4]
        return torch.cat([out.sin(), out.cos()], dim=1)

    return torch.cat([embed_1d(cols), embed_1d(rows)], dim=1).float()


class DropPath(nn.Module):
    """Stochastic depth: zero the residual branch for a random subset of samples, rescale the rest by 1/keep."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        assert dim % num_heads == 0, f"embed_dim {dim} not divisible by num_heads {num_heads}"
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, return_logits: bool = False):
        """x: [B, T, D] -> [B, T, D]; with return_logits also the pre-softmax logits [B, H, T, T]."""
        B, T, D = x.shape
        q, k, v = self.qkv(x).reshape(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # [B, H, T, hd]
        if return_logits:  # explicit path: the fused kernel never materialises the logits
            logits = (q @ k.transpose(-2, -1)) * self.scale
            out = logits.softmax(dim=-1) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        out = self.proj(out.transpose(1, 2).reshape(B, T, D))
        return (out, logits) if return_logits else out


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0):
        super().__init__()
        self.norm1, self.attn = LayerNorm(dim), Attention(dim, num_heads)
        self.norm2, self.mlp = LayerNorm(dim), Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, return_logits: bool = False):
        if return_logits:
            a, logits = self.attn(self.norm1(x), return_logits=True)
        else:
            a = self.attn(self.norm1(x))
        x = x + self.drop_path(a)
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return (x, logits) if return_logits else x


class PatchEmbed(nn.Module):
    def __init__(self, img_size: int, patch_size: int, in_chans: int, dim: int):
        super().__init__()
        assert img_size % patch_size == 0, f"img_size {img_size} not divisible by patch_size {patch_size}"
        self.img_size, self.patch_size = img_size, patch_size
        self.grid_size = img_size // patch_size
        self.num_patches = self.grid_size**2
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # [B, N, D], patches in row-major order


class VisionTransformer(nn.Module):
    """ViT encoder. `forward` returns the normed CLS token [B, D] (or head logits when num_classes > 0)."""

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        num_classes: int = 0,
        drop_path_rate: float = 0.0,
        pos_embed: Literal["sincos", "learned"] = "sincos",
    ):
        super().__init__()
        self.embed_dim, self.num_heads, self.depth = embed_dim, num_heads, depth
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        pos = torch.zeros(1, 1 + self.num_patches, embed_dim)
        self.pos_embed = nn.Parameter(pos, requires_grad=pos_embed == "learned")  # sincos: fixed, not trained
        dpr = torch.linspace(0, drop_path_rate, depth).tolist()  # stochastic depth grows linearly with block index
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio, dpr[i]) for i in range(depth)])
        self.norm = LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()

        # init as MAE: fixed sin-cos positions (CLS position = 0), xavier everywhere, conv treated as a Linear
        if pos_embed == "sincos":
            self.pos_embed.data[0, 1:] = sincos_pos_embed_2d(embed_dim, self.patch_embed.grid_size)
        elif pos_embed == "learned":
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        else:
            raise ValueError(f"pos_embed must be 'sincos' or 'learned', got {pos_embed!r}")
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module):
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def prepare_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Images [B, C, H, W] -> patch tokens with CLS prepended and positions added: [B, 1 + N, D]."""
        s = self.patch_embed.img_size
        if x.shape[-2:] != (s, s):
            raise ValueError(f"ViT expects {s}x{s} images, got {tuple(x.shape[-2:])} (pos_embed is not interpolated)")
        x = self.patch_embed(x) + self.pos_embed[:, 1:]
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        return torch.cat([cls, x], dim=1)

    def forward_features(self, x: torch.Tensor, return_all: bool = False):
        """Final-normed tokens [B, 1 + N, D]; with return_all a dict with every block's (un-normed) output,
        the last block's pre-softmax attention logits [B, H, 1 + N, 1 + N] and the normed tokens ("out")."""
        x = self.prepare_tokens(x)
        if not return_all:
            for blk in self.blocks:
                x = blk(x)
            return self.norm(x)
        outs, logits = [], None
        for i, blk in enumerate(self.blocks):
            if i == len(self.blocks) - 1:
                x, logits = blk(x, return_logits=True)
            else:
                x = blk(x)
            outs.append(x)
        return {"blocks": outs, "attn_logits": logits, "out": self.norm(x)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x)[:, 0])


SIZES = {  # width, blocks, heads of each size (without building the models)
    "vit_tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "vit_small": dict(embed_dim=384, depth=12, num_heads=6),
    "vit_base": dict(embed_dim=768, depth=12, num_heads=12),
    "vit_large": dict(embed_dim=1024, depth=24, num_heads=16),
}


def vit_tiny(**kw) -> VisionTransformer:
    return VisionTransformer(**{**SIZES["vit_tiny"], **kw})


def vit_small(**kw) -> VisionTransformer:
    return VisionTransformer(**{**SIZES["vit_small"], **kw})


def vit_base(**kw) -> VisionTransformer:
    return VisionTransformer(**{**SIZES["vit_base"], **kw})


def vit_large(**kw) -> VisionTransformer:
    return VisionTransformer(**{**SIZES["vit_large"], **kw})


VITS = {"vit_tiny": vit_tiny, "vit_small": vit_small, "vit_base": vit_base, "vit_large": vit_large}


# --- encoder weights in this layout from MAE, iBOT and TEC checkpoints (every load strict: key and shape checked)
def unwrap(ckpt):
    """The state dict of a checkpoint: bare, or under 'model' (MAE, TEC, ours), 'state_dict', 'student' or 'teacher'
    (iBOT, DINO), its prefixes module., backbone., _orig_mod. stripped; the checkpoint itself if it holds no dict."""
    keys = ("model", "state_dict", "student", "teacher")
    sd = next((ckpt[k] for k in keys if isinstance(ckpt, dict) and isinstance(ckpt.get(k), dict)), ckpt)
    if not isinstance(sd, dict):
        return sd
    strip = lambda k: k.removeprefix("module.").removeprefix("backbone.").removeprefix("_orig_mod.")  # noqa: E731
    return {strip(k) if isinstance(k, str) else k: v for k, v in sd.items()}


def vit_tensors(ckpt) -> Optional[dict]:
    """--init (tec_mae.py): the tensors of a ViT state dict in this layout (unwrap; decoders, adapters and heads too);
    None for any other file (one without cls_token, pos_embed, patch_embed.proj.weight and blocks.0.norm1.weight)."""
    sd = unwrap(ckpt)
    sd = {k: v for k, v in sd.items() if isinstance(k, str) and torch.is_tensor(v)} if isinstance(sd, dict) else {}
    return sd if {"cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.norm1.weight"} <= sd.keys() else None


def fold_cls_mlp(sd: dict) -> dict:
    """sd with a TEC CLS MLP folded into cls_token (exact: cls = MLP(cls_token) + pos[0] either way, TEC spec 6)."""
    if "cls_token_mlp.fc1.weight" not in sd:
        return sd
    w = {k[len("cls_token_mlp.") :]: v.float() for k, v in sd.items() if k.startswith("cls_token_mlp.")}
    h = F.gelu(F.linear(sd["cls_token"].float(), w["fc1.weight"], w["fc1.bias"]))
    cls = F.linear(h, w["fc2.weight"], w["fc2.bias"]).to(sd["cls_token"].dtype)
    return {**{k: v for k, v in sd.items() if not k.startswith("cls_token_mlp.")}, "cls_token": cls}


def encoder_state_dict(ckpt: dict, bake_cls_mlp: bool = True, fc_norm: bool = False) -> dict:
    """The plain-ViT encoder weights of a checkpoint (unwrap; our checkpoints of every mode too): decoders, adapters,
    heads, mask tokens and (unless fc_norm) fc_norm dropped. bake_cls_mlp: a TEC CLS MLP is folded in (fold_cls_mlp)."""
    sd = unwrap(ckpt)
    if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
        raise CheckpointError("not a model checkpoint: expected a state dict, or one under 'model' or 'state_dict'")
    keep = ("cls_token", "pos_embed", "patch_embed.", "blocks.", "norm.", *(["fc_norm."] if fc_norm else []))
    out = {k: v for k, v in sd.items() if k.startswith(keep)}  # cls_token_mlp. too
    return fold_cls_mlp(out) if bake_cls_mlp else out


def load_encoder(model: nn.Module, source, what: str) -> list:
    """Load encoder weights (a path, URL or loaded dict) strictly into `model`; only the keys a pretrained encoder
    cannot have (head, fc_norm, a norm the source lacks) keep their init. Returns the names of those. A missing block,
    patch_embed, cls_token or pos_embed key, or any shape mismatch, is a one-line CheckpointError."""
    mine = model.state_dict()
    sd = encoder_state_dict(read_checkpoint(source), bake_cls_mlp="cls_token_mlp.fc1.weight" not in mine)
    fresh = [k for k in mine if k.startswith(("head.", "fc_norm.")) or (k.startswith("norm.") and k not in sd)]
    sd = {k: v for k, v in sd.items() if k in mine or not k.startswith("norm.")}  # global pool: norm unused
    load_state_dict_strict(model, {**{k: mine[k] for k in fresh}, **sd}, what=what)
    return fresh


def load_base_model(checkpoint, img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12) -> nn.Module:
    """A frozen, pretrained ViT (TEC's base model, spec 2.2) loaded strictly from a path, URL or loaded dict in the MAE
    format (or iBOT's, or one of our runs), every parameter frozen, in eval mode. Only norm.* may be absent."""
    model = VisionTransformer(img_size, patch_size, 3, embed_dim, depth, num_heads, pos_embed="learned")
    fresh = load_encoder(model, checkpoint, what="base model")
    if fresh and os.environ.get("RANK", "0") == "0":
        print(f"base model: kept the init of {', '.join(fresh)} (unused by the targets)")
    return model.requires_grad_(False).eval()


def export_encoder(source, out: str, plain: bool = False) -> dict:
    """Write the plain encoder of a checkpoint (TEC's CLS MLP baked in, see encoder_state_dict; a global-pool model's
    fc_norm.* in place of norm.*, as timm's global_pool='avg' ViT has it) to `out` atomically, on the CPU: {'model': sd}
    (convert), or with plain the bare sd (backbone.pt). A source without the ViT keys is a one-line CheckpointError.
    Returns sd."""
    sd = {k: v.cpu() for k, v in encoder_state_dict(read_checkpoint(source), bake_cls_mlp=True, fc_norm=True).items()}
    missing = [k for k in ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.norm1.weight") if k not in sd]
    if missing:
        raise CheckpointError(f"{source}: not a ViT encoder checkpoint (missing {', '.join(missing)})")
    save_checkpoint(sd if plain else {"model": sd}, out)
    return sd


# --- --init (tec_mae.py): a file's ViT tensors (vit_tensors) fitted to the model of the run's mode
ENCODER = ("pos_embed", "patch_embed.", "blocks.")  # init_weights' backbone; cls_token is fit_vit's (see there)


def fit_vit(sd: Optional[dict], own: dict, what: str = "--init") -> Optional[dict]:
    """sd (None: not the format, passed on) fitted to the model whose state dict is `own`: a TEC CLS MLP the model
    lacks is folded into cls_token (exact); what the model lacks outside ENCODER is dropped (another mode's decoders,
    adapters and heads; norm.* where global pooling removed it). common/checkpoint.py init_weights(backbone=ENCODER)
    then checks every encoder tensor but cls_token, checked here (`what` opens the error): the prefix "cls_token" would
    also claim the CLS MLP, an adapter that may start fresh."""
    if sd is None:
        return None
    sd = sd if "cls_token_mlp.fc1.weight" in own else fold_cls_mlp(sd)
    if sd["cls_token"].shape != own["cls_token"].shape:
        shapes = f"{tuple(sd['cls_token'].shape)}, the model's {tuple(own['cls_token'].shape)}"
        raise CheckpointError(f"{what}: cls_token has shape {shapes}")
    return {k: v for k, v in sd.items() if k in own or k.startswith(ENCODER)}
