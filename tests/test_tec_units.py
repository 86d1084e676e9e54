"""Unit tests for tec_mae.py (spec ../shared/specs/tec.md, sections 2.3, 3, 4, 6, 7 and 9):

- enhance_targets (spec 2.3, 9) against a float64 loop transcription (L = 2 and 3), a hand-built top-k case whose
  order differs from a ranking by head-averaged post-softmax probabilities, the CLS key removed before the softmax,
  tau applied to the target, the mean over the last L blocks with CLS dropped;
- student_relation_logits against loops; TECModel.forward against the official structure run head by head (loops for
  masking and unshuffle, the (2, H, D/H) q/k split, scale D^-0.5 with the full width); FeatureAdaptor (spec 3.2);
- tec_loss (spec 4): hand-computed values (unbiased per-channel normalisation over the patches, eps inside the root),
  a float64 loop transcription, masked/visible patches, an unmasked relation loss, analytic gradients;
- random_masking / unshuffle (spec 3.1): kept tokens in ascending-noise order, mask, ids_restore round trip;
- checkpoints (spec 2.2): MAE-format round trip through common/vit.py's load_base_model (path and dict, iBOT /
  prefixed / extra keys), frozen eval model, one-line CheckpointErrors naming the key; base_forward against an
  independent float64 ViT forward written from the state dict; no autograd graph;
- encoder_state_dict / convert (spec 6): the CLS MLP baked by hand, adapters and decoders dropped, a plain common ViT
  loaded strictly reproduces the TEC encoder; convert writes {"model": sd} atomically;
- parameter counts (spec 5) of TEC ViT-B and ViT-L (built on the meta device), LayerNorm eps, fixed positions;
- layer_decay_groups (spec 7, TEC's cls_token quirk) and param_groups (spec 5, timm add_weight_decay);
- lr_at (warm-up and half cosine) against hand values; each README fine-tuning row's recipe, its values;
- mixup_cutmix (timm Mixup semantics), random_erasing, equalize against PIL, light rand_augment checks."""

import dataclasses
import math
import os
import re
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image, ImageOps

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import tec_mae as TEC  # noqa: E402
from common.checkpoint import CheckpointError  # noqa: E402
from common.vit import VisionTransformer, encoder_state_dict, load_base_model  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny tensors run on one thread

TINY_VIT = dict(img_size=16, patch_size=4, embed_dim=32, depth=3, num_heads=2)  # N = 16 patches
TINY_TEC = dict(
    decoder_dim=32, decoder_depth=1, decoder_heads=2, rel_heads=2, img_size=16, patch_size=4, embed_dim=48, depth=3,
    num_heads=3,
)  # fmt: skip


# ---------------------------------------------------------------- helpers
@torch.no_grad()
def randomize(model: nn.Module, gen: torch.Generator, scale: float = 0.1) -> nn.Module:
    """Every trainable parameter gets random values (LayerNorm weights around 1), so that no term is trivially 0/1."""
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        noise = torch.randn(p.shape, generator=gen)
        if name.endswith("weight") and p.ndim == 1:
            p.copy_(1 + 0.2 * noise)
        elif "pos_embed" in name:
            p.copy_(0.5 * noise)
        else:
            p.copy_(scale * noise)
    return model


def tiny_base_vit(seed: int = 0) -> VisionTransformer:
    torch.manual_seed(seed)
    model = VisionTransformer(**TINY_VIT, pos_embed="learned")
    return randomize(model, torch.Generator().manual_seed(seed + 100))


def tiny_tec(seed: int = 0) -> "TEC.TECModel":
    torch.manual_seed(seed)
    return randomize(TEC.TECModel(**TINY_TEC), torch.Generator().manual_seed(seed + 200))


def softmax_list(vals):
    m = max(vals)
    e = [math.exp(v - m) for v in vals]
    s = sum(e)
    return [x / s for x in e]


def ln64(x, w, b, eps=1e-6):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)  # biased, as LayerNorm
    return (x - mu) / torch.sqrt(var + eps) * w + b


def gelu64(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2.0)))


def ref_vit(sd: dict, images: torch.Tensor, depth: int, heads: int, p: int) -> tuple:
    """Independent float64 MAE/timm ViT forward from a state dict: (every block output, last block's scaled logits).
    Patch conv as a matmul over each p x p patch (row-major), cls + pos, pre-norm blocks (LN eps 1e-6), qkv with
    bias, scale d_head^-0.5, exact GELU."""
    sd = {k: v.detach().double() for k, v in sd.items()}
    B, _, S, _ = images.shape
    g, D = S // p, sd["cls_token"].shape[-1]
    W = sd["patch_embed.proj.weight"].reshape(D, -1)
    seqs = []
    for b in range(B):
        rows = [sd["cls_token"][0, 0]]
        for i in range(g):
            for j in range(g):
                patch = images[b, :, i * p : (i + 1) * p, j * p : (j + 1) * p].double().reshape(-1)
                rows.append(W @ patch + sd["patch_embed.proj.bias"])
        seqs.append(torch.stack(rows))
    x = torch.stack(seqs) + sd["pos_embed"]
    T, dh = x.shape[1], D // heads
    outs, logits = [], None
    for i in range(depth):
        P = f"blocks.{i}."
        h = ln64(x, sd[P + "norm1.weight"], sd[P + "norm1.bias"])
        qkv = h @ sd[P + "attn.qkv.weight"].T + sd[P + "attn.qkv.bias"]
        q, k, v = (qkv[..., s * D : (s + 1) * D].reshape(B, T, heads, dh).transpose(1, 2) for s in range(3))
        logits = (q @ k.transpose(-2, -1)) * dh**-0.5
        e = torch.exp(logits - logits.amax(-1, keepdim=True))
        att = e / e.sum(-1, keepdim=True)
        o = (att @ v).transpose(1, 2).reshape(B, T, D)
        x = x + o @ sd[P + "attn.proj.weight"].T + sd[P + "attn.proj.bias"]
        h = ln64(x, sd[P + "norm2.weight"], sd[P + "norm2.bias"])
        x = x + gelu64(h @ sd[P + "mlp.fc1.weight"].T + sd[P + "mlp.fc1.bias"]) @ sd[P + "mlp.fc2.weight"].T
        x = x + sd[P + "mlp.fc2.bias"]
        outs.append(x)
    return outs, logits


# ---------------------------------------------------------------- enhance_targets (spec 2.3, 9)
def ref_enhance(feats, attn, topk, tau):
    """Loop transcription of spec 2.3 in float64."""
    L, B, T, D = feats.shape
    N, H = T - 1, attn.shape[1]
    feat = torch.zeros(B, N, D, dtype=torch.float64)
    for b in range(B):
        for n in range(N):
            for d in range(D):
                feat[b, n, d] = sum(float(feats[i, b, 1 + n, d]) for i in range(L)) / L
    idx = []
    for b in range(B):
        r = [sum(float(attn[b, h, 0, 1 + n]) for h in range(H)) / H for n in range(N)]
        idx.append(sorted(range(N), key=lambda n: -r[n])[:topk])
    rel = torch.zeros(B, 1 + topk, H, N, dtype=torch.float64)
    for b in range(B):
        for j in range(1 + topk):
            tok = 0 if j == 0 else 1 + idx[b][j - 1]
            for h in range(H):
                rel[b, j, h] = torch.tensor(
                    softmax_list([float(attn[b, h, tok, 1 + n]) / tau for n in range(N)]), dtype=torch.float64
                )
    return feat, rel, torch.tensor(idx)


@pytest.mark.parametrize("L", [2, 3])
def test_enhance_targets_matches_loop_transcription(L):
    """feat_target = mean over L of feats[:, :, 1:]; topk_idx = descending top-k of the head-mean pre-softmax CLS->patch
    logits; rel_target rows CLS + 1+idx, all heads, softmax(R / tau) over the N patch keys. float64 inputs agree to
    1e-12, float32 inputs to the acceptance tolerance 1e-5 (topk_idx exactly); topk_idx is int64."""
    g = torch.Generator().manual_seed(L)
    B, H, N, D, k, tau = 2, 3, 7, 4, 3, 1.8
    feats = torch.randn(L, B, 1 + N, D, generator=g, dtype=torch.float64)
    attn = 2 * torch.randn(B, H, 1 + N, 1 + N, generator=g, dtype=torch.float64)
    ref_feat, ref_rel, ref_idx = ref_enhance(feats, attn, k, tau)
    feat, rel, idx = TEC.enhance_targets(feats, attn, k, tau)
    assert feat.shape == (B, N, D) and rel.shape == (B, 1 + k, H, N) and idx.shape == (B, k)
    assert idx.dtype == torch.long
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(feat, ref_feat, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rel, ref_rel, rtol=1e-12, atol=1e-12)
    feat32, rel32, idx32 = TEC.enhance_targets(feats.float(), attn.float(), k, tau)
    assert torch.equal(idx32, ref_idx)
    torch.testing.assert_close(feat32.double(), ref_feat, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rel32.double(), ref_rel, rtol=1e-5, atol=1e-5)


def test_enhance_targets_hand_built_topk_order():
    """Two heads, four patches; CLS->patch logits head 0: [8, 0, 1, 3], head 1: [-6, 0, 2, 1]. The head mean of the
    logits is [1, 0, 1.5, 2]: top-3 = [3, 2, 0] (descending, not index order). Ranking by the head mean of per-head
    post-softmax probabilities would give patch 0 first; ranking by one head or the max would too."""
    attn = torch.zeros(1, 2, 5, 5)
    attn[0, 0, 0] = torch.tensor([0.0, 8, 0, 1, 3])
    attn[0, 1, 0] = torch.tensor([0.0, -6, 0, 2, 1])
    feats = torch.zeros(2, 1, 5, 3)
    _, rel, idx = TEC.enhance_targets(feats, attn, 3, 1.0)
    assert idx.tolist() == [[3, 2, 0]]
    probs = attn[0, :, 0].softmax(-1)[:, 1:].mean(0)  # the WRONG ranking, to show the case discriminates
    assert probs.argsort(descending=True)[:3].tolist() != [3, 2, 0]
    assert probs.argmax().item() == 0 and attn[0, :, 0, 1:].amax(0).argmax().item() == 0
    # rows: CLS then tokens 4, 3, 1 (all-zero rows -> uniform over the 4 patch keys)
    torch.testing.assert_close(rel[0, 0, 0], torch.tensor([8.0, 0, 1, 3]).softmax(-1))
    torch.testing.assert_close(rel[0, 1:], torch.full((3, 2, 4), 0.25))


def test_enhance_targets_cls_key_dropped_before_softmax_and_tau():
    """A huge CLS-key logit (50) is ignored: row (j=1 -> patch idx[0] = 3 -> token 4, head 0) with patch logits
    [0, 2 ln 2, 0, 2 ln 3] at tau 2 gives [1, 2, 1, 3] / 7; every row sums to 1 over the N patch keys."""
    g = torch.Generator().manual_seed(3)
    attn = torch.randn(1, 2, 5, 5, generator=g)
    attn[0, :, 0, 1:] = torch.tensor([[0.0, 1, 2, 9], [0.0, 1, 2, 9]])  # idx = [3, 2, 1]
    attn[:, :, :, 0] = 50.0  # CLS key column
    attn[0, 0, 4, 1:] = torch.tensor([0.0, 2 * math.log(2), 0.0, 2 * math.log(3)])
    _, rel, idx = TEC.enhance_targets(torch.zeros(2, 1, 5, 3), attn, 3, 2.0)
    assert idx.tolist() == [[3, 2, 1]]
    torch.testing.assert_close(rel[0, 1, 0], torch.tensor([1.0, 2, 1, 3]) / 7)
    torch.testing.assert_close(rel.sum(-1), torch.ones(1, 4, 2))
    _, rel1, _ = TEC.enhance_targets(torch.zeros(2, 1, 5, 3), attn, 3, 1.0)  # tau 1: [1, 4, 1, 9] / 15
    torch.testing.assert_close(rel1[0, 1, 0], torch.tensor([1.0, 4, 1, 9]) / 15)


@pytest.mark.parametrize("L", [2, 3])
def test_enhance_targets_feature_mean_over_last_blocks(L):
    """feats[l] = l + 1 on the patches and 1000 on CLS: the target is (L + 1) / 2 everywhere, shape [B, N, D]."""
    feats = torch.arange(1, L + 1, dtype=torch.float32).view(L, 1, 1, 1).expand(L, 2, 6, 4).clone()
    feats[:, :, 0] = 1000.0
    feat, _, _ = TEC.enhance_targets(feats, torch.zeros(2, 1, 6, 6), 2, 1.0)
    assert feat.shape == (2, 5, 4)
    torch.testing.assert_close(feat, torch.full((2, 5, 4), (L + 1) / 2))


# ---------------------------------------------------------------- student relation logits (spec 3.3, 9)
def ref_student(q, k, idx, scale):
    B, H, T, d = q.shape
    K = idx.shape[1]
    out = torch.zeros(B, 1 + K, H, T - 1, dtype=torch.float64)
    for b in range(B):
        for j in range(1 + K):
            tok = 0 if j == 0 else 1 + int(idx[b, j - 1])
            for h in range(H):
                for n in range(T - 1):
                    out[b, j, h, n] = scale * sum(float(q[b, h, tok, c]) * float(k[b, h, 1 + n, c]) for c in range(d))
    return out


def test_student_relation_logits_matches_loops():
    """Rows CLS and 1 + topk_idx of q against keys 1..N (CLS key dropped), times scale -> [B, 1+k, H, N]."""
    g = torch.Generator().manual_seed(0)
    B, H, N, d = 2, 3, 6, 4
    q = torch.randn(B, H, 1 + N, d, generator=g, dtype=torch.float64)
    k = torch.randn(B, H, 1 + N, d, generator=g, dtype=torch.float64)
    idx = torch.tensor([[5, 0], [2, 4]])
    out = TEC.student_relation_logits(q, k, idx, 0.3)
    assert out.shape == (B, 3, H, N)
    torch.testing.assert_close(out, ref_student(q, k, idx, 0.3), rtol=1e-12, atol=1e-12)


@torch.no_grad()
def ref_tec_forward(model, imgs, noise, idx, n_keep):
    """The official TECViT forward (spec 3) written with loops over the model's own submodules: MAE masking by noise,
    MLP'd CLS, every block output (the last one normed), the encoder adapter, then EACH head separately: its embed,
    mask tokens and unshuffle (by hand), decoder_pos_embed, the shared trunk, its LN and output layer. The relation
    logits use the (2, H, D/H) split of decoder_qk's output, q rows CLS + 1 + idx, scale D^-0.5, CLS key dropped."""
    B, N, D, H = imgs.shape[0], model.num_patches, model.embed_dim, model.rel_heads
    tokens = model.patch_embed(imgs) + model.pos_embed[:, 1:]
    order = [sorted(range(N), key=lambda n: float(noise[b, n]))[:n_keep] for b in range(B)]
    kept = torch.stack([torch.stack([tokens[b, n] for n in order[b]]) for b in range(B)])
    cls = model.cls_token_mlp(model.cls_token) + model.pos_embed[:, :1]
    x, outs = torch.cat([cls.expand(B, -1, -1), kept], 1), []
    for blk in model.blocks:
        x = blk(x)
        outs.append(x)
    outs[-1] = model.norm(x)
    a = model.encoder_adaptor(torch.cat(outs, -1))
    heads = []
    for head in (model.forward_fea_decoder, model.forward_att_decoder):
        e = head.decoder_embed(a)
        full = head.mask_token.expand(B, 1 + N, -1).clone()
        full[:, 0] = e[:, 0]
        for b in range(B):
            for i, n in enumerate(order[b]):
                full[b, 1 + n] = e[b, 1 + i]
        y = full + model.decoder_pos_embed
        for blk in model.decoder_blocks:
            y = blk(y)
        y = head.decoder_norm(y)
        heads.append(head.decoder_pred(y) if hasattr(head, "decoder_pred") else head.decoder_qk(y))
    pred_feat, qk = heads[0][:, 1:], heads[1].double()
    dh = D // H
    rel = torch.zeros(B, 1 + idx.shape[1], H, N, dtype=torch.float64)
    for b in range(B):
        for j in range(1 + idx.shape[1]):
            tok = 0 if j == 0 else 1 + int(idx[b, j - 1])
            for h in range(H):
                qv = qk[b, tok, h * dh : (h + 1) * dh]
                for n in range(N):
                    rel[b, j, h, n] = (qv * qk[b, 1 + n, D + h * dh : D + (h + 1) * dh]).sum() / math.sqrt(D)
    mask = torch.tensor([[0.0 if n in order[b] else 1.0 for n in range(N)] for b in range(B)])
    return pred_feat, rel, mask


def test_tec_model_forward_matches_official_structure():
    """TECModel.forward equals the official structure run head by head (ref_tec_forward): pred_feat [B, N, D],
    pred_rel from the (2, H, D/H) q/k split with H = rel_heads = 2 and scale D^-0.5 = 48^-0.5 (not d_head^-0.5 =
    24^-0.5), and the mask (12 of 16 patches removed)."""
    model = tiny_tec()
    g = torch.Generator().manual_seed(1)
    imgs, noise = torch.randn(2, 3, 16, 16, generator=g), torch.rand(2, 16, generator=g)
    idx = torch.tensor([[5, 0, 9], [15, 3, 7]])
    with torch.no_grad():
        pred_feat, pred_rel, mask = model(imgs, noise, idx, 0.75)
    ref_feat, ref_rel, ref_mask = ref_tec_forward(model, imgs, noise, idx, 4)
    assert pred_feat.shape == (2, 16, 48) and pred_rel.shape == (2, 4, 2, 16)
    assert ref_rel.abs().max() > 0.1 and ref_feat.abs().max() > 0.1
    torch.testing.assert_close(pred_feat, ref_feat, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pred_rel.double(), ref_rel, rtol=1e-5, atol=1e-5)
    assert torch.equal(mask, ref_mask) and mask.sum().item() == 2 * 12


def test_feature_adaptor_matches_spec():
    """FeatureAdaptor (spec 3.2) against float64 algebra: LN over depth*D (eps 1e-5), num_adap chunks of consecutive
    channels, y_i = Linear_i(chunk_i), y_i += fc2(gelu(fc1(y_i))), LN(sum_i y_i) (eps 1e-5)."""
    torch.manual_seed(0)
    ad = randomize(TEC.FeatureAdaptor(8, 6, 2, 12), torch.Generator().manual_seed(1), scale=0.3)
    x = 2 * torch.randn(2, 5, 48, generator=torch.Generator().manual_seed(2))
    sd = {k: v.double() for k, v in ad.state_dict().items()}
    h = ln64(x.double(), sd["adap_before.weight"], sd["adap_before.bias"], eps=1e-5)
    total = 0
    for i in range(2):
        y = h[..., 24 * i : 24 * (i + 1)] @ sd[f"fuse_fcs.{i}.weight"].T + sd[f"fuse_fcs.{i}.bias"]
        m = gelu64(y @ sd[f"adap_mlps.{i}.fc1.weight"].T + sd[f"adap_mlps.{i}.fc1.bias"])
        total = total + y + m @ sd[f"adap_mlps.{i}.fc2.weight"].T + sd[f"adap_mlps.{i}.fc2.bias"]
    ref = ln64(total, sd["adap_after.weight"], sd["adap_after.bias"], eps=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(ad(x).double(), ref, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- tec_loss (spec 4, 9)
def test_tec_loss_hand_values():
    """N = 3, D = 2. Target channel 0 = [1, 2, 3] (mean 2, unbiased var 1) -> [-1, 0, 1] / sqrt(1 + 1e-6); channel 1 =
    [0, 0, 3e-3] (mean 1e-3, unbiased var 3e-6, + eps = 4e-6) -> [-0.5, -0.5, 1] (biased variance or eps outside the
    root would give +-0.577 / 1.155). pred = [[0, 0], [5, -5], [0, 0]], mask [1, 0, 1]:
    loss_fea = ((1/(1+1e-6) + 0.25) / 2 + (1/(1+1e-6) + 1) / 2) / 2 ~ 0.8125 (the visible patch 1 is ignored).
    Relations [1, 2 rows, 1 head, 3]: logits [0, ln 2, ln 5] vs P [.5, .5, 0] -> 0.5 ln 8 + 0.5 ln 4 = 2.5 ln 2;
    logits [0, 0, 0] vs P [0, 0, 1] -> ln 3; loss_att = the row mean."""
    target = torch.tensor([[[1.0, 0.0], [2.0, 0.0], [3.0, 3e-3]]])
    pred = torch.tensor([[[0.0, 0.0], [5.0, -5.0], [0.0, 0.0]]])
    mask = torch.tensor([[1.0, 0.0, 1.0]])
    rel_logits = torch.tensor([[[[0.0, math.log(2), math.log(5)]], [[0.0, 0.0, 0.0]]]])
    rel_target = torch.tensor([[[[0.5, 0.5, 0.0]], [[0.0, 0.0, 1.0]]]])
    total, loss_fea, loss_att = TEC.tec_loss(pred, rel_logits, target, rel_target, mask)
    a = 1 / (1 + 1e-6)
    exp_fea = ((a + 0.25) / 2 + (a + 1.0) / 2) / 2
    exp_att = (2.5 * math.log(2) + math.log(3)) / 2
    assert loss_fea.item() == pytest.approx(exp_fea, rel=1e-6)
    assert loss_att.item() == pytest.approx(exp_att, rel=1e-6)
    assert total.item() == pytest.approx(exp_fea + exp_att, rel=1e-6)


def ref_tec_loss(pred, rel, target, P, mask):
    """Loop transcription of spec 4 in float64; returns (loss_fea, loss_att, normalised target)."""
    B, N, D = target.shape
    t_hat = torch.zeros(B, N, D, dtype=torch.float64)
    for b in range(B):
        for d in range(D):
            col = [float(target[b, n, d]) for n in range(N)]
            mu = sum(col) / N
            var = sum((c - mu) ** 2 for c in col) / (N - 1)
            for n in range(N):
                t_hat[b, n, d] = (col[n] - mu) / math.sqrt(var + 1e-6)
    num = den = 0.0
    for b in range(B):
        for n in range(N):
            m = float(mask[b, n])
            num += m * sum((float(pred[b, n, d]) - float(t_hat[b, n, d])) ** 2 for d in range(D)) / D
            den += m
    ces = []
    for b in range(B):
        for j in range(rel.shape[1]):
            for h in range(rel.shape[2]):
                row = [float(v) for v in rel[b, j, h]]
                lse = max(row) + math.log(sum(math.exp(v - max(row)) for v in row))
                ces.append(-sum(float(P[b, j, h, n]) * (row[n] - lse) for n in range(len(row))))
    return num / den, sum(ces) / len(ces), t_hat


def random_loss_inputs(seed=0, B=2, N=6, D=3, K=2, H=2):
    g = torch.Generator().manual_seed(seed)
    pred = torch.randn(B, N, D, generator=g)
    target = 3 + 2 * torch.randn(B, N, D, generator=g)
    rel = 2 * torch.randn(B, 1 + K, H, N, generator=g)
    P = (torch.randn(B, 1 + K, H, N, generator=g) * 1.5).softmax(-1)
    mask = torch.tensor([[1.0, 0, 1, 1, 0, 0], [0.0, 1, 1, 0, 1, 1]])
    return pred, rel, target, P, mask


def test_tec_loss_matches_loop_transcription_and_gradients():
    """Random inputs: (total, loss_fea, loss_att) match the float64 loops at 1e-5; the gradient w.r.t. pred_feat is
    2 (pred - T_hat) mask / (D sum mask) (zero on visible patches), w.r.t. pred_rel (softmax - P) / (B (1+k) H)."""
    pred, rel, target, P, mask = random_loss_inputs()
    exp_fea, exp_att, t_hat = ref_tec_loss(pred, rel, target, P, mask)
    pred.requires_grad_(True), rel.requires_grad_(True)
    total, loss_fea, loss_att = TEC.tec_loss(pred, rel, target, P, mask)
    assert loss_fea.item() == pytest.approx(exp_fea, rel=1e-5)
    assert loss_att.item() == pytest.approx(exp_att, rel=1e-5)
    assert total.item() == pytest.approx(exp_fea + exp_att, rel=1e-5)
    total.backward()
    B, N, D = target.shape
    exp_gp = 2 * (pred.detach().double() - t_hat) * mask.double()[..., None] / (D * mask.sum().item())
    torch.testing.assert_close(pred.grad.double(), exp_gp, rtol=1e-5, atol=1e-6)
    assert (pred.grad[mask == 0] == 0).all()
    exp_gr = (rel.detach().double().softmax(-1) - P.double()) / (B * rel.shape[1] * rel.shape[2])
    torch.testing.assert_close(rel.grad.double(), exp_gr, rtol=1e-5, atol=1e-6)


def test_tec_loss_mask_semantics():
    """Changing pred_feat on visible (mask 0) patches leaves loss_fea unchanged, on a removed patch changes it; the
    relation loss does not depend on the mask at all."""
    pred, rel, target, P, mask = random_loss_inputs(1)
    _, fea, att = TEC.tec_loss(pred, rel, target, P, mask)
    pred2 = pred.clone()
    pred2[mask == 0] += 10.0
    _, fea2, att2 = TEC.tec_loss(pred2, rel, target, P, mask)
    assert fea2.item() == pytest.approx(fea.item(), rel=1e-6) and att2.item() == att.item()
    pred3 = pred.clone()
    pred3[0, 0] += 1.0  # mask[0, 0] = 1
    assert abs(TEC.tec_loss(pred3, rel, target, P, mask)[1].item() - fea.item()) > 1e-3
    other = 1 - mask
    _, fea4, att4 = TEC.tec_loss(pred, rel, target, P, other)
    assert att4.item() == att.item() and abs(fea4.item() - fea.item()) > 1e-3


def test_tec_loss_normalises_per_image_over_patches():
    """Shifting and scaling one image's target channel (per image, per channel) leaves the loss unchanged (the target
    is normalised over the N patches of that image); scaling one patch across its channels does change it."""
    pred, rel, target, P, mask = random_loss_inputs(2)
    _, fea, _ = TEC.tec_loss(pred, rel, target, P, mask)
    t2 = target.clone()
    t2[1, :, 2] = 4 * t2[1, :, 2] - 7
    assert TEC.tec_loss(pred, rel, t2, P, mask)[1].item() == pytest.approx(fea.item(), rel=1e-5)
    t3 = target.clone()
    t3[0, 2] = 3 * t3[0, 2] + 1
    assert abs(TEC.tec_loss(pred, rel, t3, P, mask)[1].item() - fea.item()) > 1e-3


# ---------------------------------------------------------------- masking (spec 3.1)
@pytest.mark.parametrize("N, ratio, n_keep", [(16, 0.75, 4), (196, 0.75, 49), (10, 0.6, 4)])
def test_random_masking_and_unshuffle(N, ratio, n_keep):
    """kept = the int(N (1 - ratio)) tokens with the smallest noise, in ascending-noise order; mask 1 = removed with
    N - n_keep per row; concatenating kept + placeholders and gathering by ids_restore puts every kept token back at
    its position; TEC.unshuffle does the same with CLS first and the mask token at every removed patch."""
    g = torch.Generator().manual_seed(N)
    B, D = 3, 5
    x = torch.randn(B, N, D, generator=g)
    noise = torch.rand(B, N, generator=g)
    kept, mask, ids_restore = TEC.random_masking(x, ratio, noise)
    assert kept.shape == (B, n_keep, D) and mask.shape == (B, N) and ids_restore.shape == (B, N)
    assert mask.dtype.is_floating_point
    for b in range(B):
        order = sorted(range(N), key=lambda n: float(noise[b, n]))[:n_keep]
        for i, n in enumerate(order):
            assert torch.equal(kept[b, i], x[b, n])
        assert mask[b].tolist() == [0.0 if n in order else 1.0 for n in range(N)]
    assert (mask.sum(1) == N - n_keep).all()
    filler = torch.full((B, N - n_keep, D), -99.0)
    back = torch.cat([kept, filler], 1).gather(1, ids_restore[..., None].expand(-1, -1, D))
    assert torch.equal(back[mask == 0], x[mask == 0]) and (back[mask == 1] == -99).all()
    cls = torch.randn(B, 1, D, generator=g)
    mtok = torch.randn(1, 1, D, generator=g)
    out = TEC.unshuffle(torch.cat([cls, kept], 1), mtok, ids_restore)
    assert out.shape == (B, 1 + N, D)
    assert torch.equal(out[:, 0], cls[:, 0])
    for b in range(B):
        for n in range(N):
            assert torch.equal(out[b, 1 + n], x[b, n] if mask[b, n] == 0 else mtok[0, 0])


# ---------------------------------------------------------------- base-model checkpoints (spec 2.2)
@pytest.fixture(scope="module")
def base_ckpt(module_tmp):
    """A small MAE-format checkpoint {"model": sd} of a random common ViT (learned, non-trivial pos_embed)."""
    model = tiny_base_vit()
    path = module_tmp("base") / "mae_tiny.pth"
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    torch.save({"model": sd}, path)
    return model, sd, path


def load_tiny_base(ckpt):
    cfg = TINY_VIT
    return load_base_model(
        ckpt, cfg["img_size"], cfg["patch_size"], cfg["embed_dim"], cfg["depth"], cfg["num_heads"]
    )  # fmt: skip


def test_load_base_model_mae_round_trip(base_ckpt):
    """Loading the MAE file by path and as a loaded dict gives a frozen (no requires_grad), eval-mode common ViT with
    the same weights and the same outputs as the source model."""
    model, sd, path = base_ckpt
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model.forward_features(x)
    for source in (path, str(path), torch.load(path, weights_only=False)):
        base = load_tiny_base(source)
        assert isinstance(base, VisionTransformer) and not base.training
        assert all(not p.requires_grad for p in base.parameters())
        for k, v in base.state_dict().items():
            assert torch.equal(v, sd[k]), k
        with torch.no_grad():
            torch.testing.assert_close(base.forward_features(x), ref, rtol=0, atol=0)


def test_load_base_model_other_formats(base_ckpt):
    """{"state_dict": sd} with backbone. prefixes and extra iBOT/MAE keys (head, fc_norm, masked_embed, decoder_*,
    mask_token), {"model": sd} with module. prefixes, and a bare state dict all load the same weights; a file without
    norm.* loads too (the targets never use it)."""
    _, sd, _ = base_ckpt
    extra = {
        "head.weight": torch.zeros(10, 32), "head.bias": torch.zeros(10), "fc_norm.weight": torch.ones(32),
        "masked_embed": torch.zeros(32), "decoder_embed.weight": torch.zeros(16, 32),
        "mask_token": torch.zeros(1, 1, 16), "decoder_pos_embed": torch.zeros(1, 17, 16),
    }  # fmt: skip
    variants = [
        {"state_dict": {**{f"backbone.{k}": v for k, v in sd.items()}, **extra}},
        {"model": {f"module.{k}": v for k, v in sd.items()}},
        dict(sd),
        {"model": {k: v for k, v in sd.items() if not k.startswith("norm.")}},
    ]
    for ckpt, has_norm in zip(variants, (True, True, True, False)):
        base = load_tiny_base(ckpt)
        assert all(not p.requires_grad for p in base.parameters())
        for k, v in base.state_dict().items():
            if has_norm or not k.startswith("norm."):
                assert torch.equal(v, sd[k]), k


@pytest.mark.parametrize(
    "drop, reshape",
    [("blocks.1.attn.qkv.weight", None), ("blocks.2.mlp.fc2.bias", None), ("patch_embed.proj.weight", None),
     ("cls_token", None), ("pos_embed", None), (None, "pos_embed"), (None, "blocks.0.norm1.weight")],
)  # fmt: skip
def test_load_base_model_strict_errors(base_ckpt, drop, reshape):
    """A missing blocks.* / patch_embed / cls_token / pos_embed key or a shape mismatch is a one-line
    CheckpointError naming the key."""
    _, sd, _ = base_ckpt
    bad = dict(sd)
    if drop:
        del bad[drop]
    if reshape:
        bad[reshape] = torch.zeros(bad[reshape].shape[:-1] + (bad[reshape].shape[-1] + 1,))
    with pytest.raises(CheckpointError) as e:
        load_tiny_base({"model": bad})
    msg = str(e.value)
    assert "\n" not in msg and (drop or reshape) in msg


@pytest.mark.parametrize("last_layers", [2, 3])
def test_base_forward_matches_float64_vit(base_ckpt, last_layers):
    """base_forward of the loaded MAE checkpoint: feats = the last L block outputs BEFORE the final norm, attn_logits
    = the last block's pre-softmax scores scaled by d_head^-0.5, against an independent float64 forward from the
    state dict (float32 at 1e-5; the model in float64 at 1e-10). No autograd graph even if parameters need grad."""
    _, sd, path = base_ckpt
    base = load_tiny_base(path)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    outs, logits = ref_vit(sd, x, 3, 2, 4)
    ref_feats = torch.stack(outs[3 - last_layers :])
    feats, attn = TEC.base_forward(base, x, last_layers)
    assert feats.shape == (last_layers, 2, 17, 32) and attn.shape == (2, 2, 17, 17)
    assert ref_feats.abs().max() > 1 and logits.std() > 0.3  # a non-degenerate comparison
    torch.testing.assert_close(feats.double(), ref_feats, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(attn.double(), logits, rtol=1e-5, atol=1e-5)
    base64 = load_tiny_base(path).double()
    feats64, attn64 = TEC.base_forward(base64, x.double(), last_layers)
    torch.testing.assert_close(feats64, ref_feats, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(attn64, logits, rtol=1e-10, atol=1e-10)
    base64.requires_grad_(True)
    f, a = TEC.base_forward(base64, x.double().requires_grad_(True), last_layers)
    assert f.grad_fn is None and a.grad_fn is None and not f.requires_grad and not a.requires_grad


# ---------------------------------------------------------------- conversion (spec 6)
def test_encoder_state_dict_bakes_cls_mlp():
    """A TEC training checkpoint -> plain encoder keys only (cls_token, pos_embed, patch_embed.proj.*, blocks.*,
    norm.*), cls_token = fc2(gelu(fc1(cls_token))) by hand; bake_cls_mlp=False keeps the MLP and the raw token. A
    plain common ViT loaded strictly from it reproduces the TEC encoder on the full image (MLP'd CLS + blocks + norm).
    """
    model = tiny_tec()
    sd = model.state_dict()
    out = encoder_state_dict({"model": sd, "epoch": 3, "optimizer": {}})
    plain = VisionTransformer(**{**TINY_VIT, "embed_dim": 48, "num_heads": 3}, pos_embed="learned")
    assert set(out) == set(plain.state_dict())
    c = sd["cls_token"].double()[0, 0]
    h = gelu64(sd["cls_token_mlp.fc1.weight"].double() @ c + sd["cls_token_mlp.fc1.bias"].double())
    exp = sd["cls_token_mlp.fc2.weight"].double() @ h + sd["cls_token_mlp.fc2.bias"].double()
    assert out["cls_token"].shape == (1, 1, 48) and (exp - c).abs().max() > 0.1
    torch.testing.assert_close(out["cls_token"][0, 0].double(), exp, rtol=1e-5, atol=1e-6)
    for k in out:
        if k != "cls_token":
            assert torch.equal(out[k], sd[k]), k
    raw = encoder_state_dict({"model": sd}, bake_cls_mlp=False)
    assert torch.equal(raw["cls_token"], sd["cls_token"]) and "cls_token_mlp.fc2.weight" in raw
    assert not any(k.startswith(("encoder_adaptor", "forward_", "decoder")) for k in raw)
    plain.load_state_dict(out, strict=True)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        t = model.prepare_tokens(x)
        for blk in model.blocks:
            t = blk(t)
        torch.testing.assert_close(plain.forward_features(x), model.norm(t), rtol=1e-5, atol=1e-5)


def test_convert_writes_model_dict_atomically(tmp_path, monkeypatch):
    """convert(args) writes {"model": encoder_state_dict(ckpt)}; a failing write leaves an existing output file
    untouched and no temporary file behind."""
    model = tiny_tec()
    src, dst = tmp_path / "tec.pth", tmp_path / "out" / "plain.pth"
    torch.save({"model": model.state_dict(), "epoch": 1}, src)
    args = dataclasses.replace(TEC.RECIPES["convert"][0], init=str(src), convert_out=str(dst))
    TEC.convert(args)
    saved = torch.load(dst, weights_only=False)
    assert set(saved) == {"model"}
    exp = encoder_state_dict({"model": model.state_dict()})
    assert set(saved["model"]) == set(exp) and all(torch.equal(saved["model"][k], exp[k]) for k in exp)
    before = dst.read_bytes()

    def failing_save(obj, f, *a, **kw):
        f.write(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(RuntimeError, match="disk full"):
        TEC.convert(args)
    assert dst.read_bytes() == before
    assert sorted(os.listdir(dst.parent)) == ["plain.pth"]


# ---------------------------------------------------------------- parameter counts, norms, positions (spec 3, 5)
SPEC_COUNTS = {
    "vit_base": (
        dict(decoder_dim=512, decoder_heads=16, rel_heads=12, embed_dim=768, depth=12, num_heads=12),
        118_342_144,
        dict(
            blocks=85_054_464, patch_embed=590_592, cls_token=768, norm=1_536, cls_token_mlp=4_722_432,
            encoder_adaptor=19_695_104, forward_fea_decoder=789_248, forward_att_decoder=1_183_232,
            decoder_blocks=6_304_768,
        ),
    ),
    "vit_large": (
        dict(decoder_dim=768, decoder_heads=16, rel_heads=16, embed_dim=1024, depth=24, num_heads=16),
        405_200_384,
        dict(
            blocks=302_309_376, patch_embed=787_456, cls_token=1_024, norm=2_048, cls_token_mlp=8_393_728,
            encoder_adaptor=75_589_632, forward_fea_decoder=1_576_960, forward_att_decoder=2_364_416,
            decoder_blocks=14_175_744,
        ),
    ),
}  # fmt: skip


@pytest.mark.parametrize("arch", ["vit_base", "vit_large"])
def test_tec_param_counts_and_layernorm_eps(arch, monkeypatch):
    """Spec 5's table: trainable parameters per top-level module and in total (built on the meta device); both
    encoder-adapter LayerNorms have eps 1e-5, every other LayerNorm 1e-6."""
    linspace = torch.linspace  # common/vit.py reads drop-path rates with .tolist(): keep that one on the CPU
    monkeypatch.setattr(torch, "linspace", lambda *a, **kw: linspace(*a, **{**kw, "device": "cpu"}))
    cfg, total, parts = SPEC_COUNTS[arch]
    with torch.device("meta"):
        model = TEC.TECModel(decoder_depth=2, img_size=224, patch_size=16, **cfg)
    counts = Counter()
    for name, p in model.named_parameters():
        if p.requires_grad:
            counts[name.split(".")[0]] += p.numel()
    assert dict(counts) == parts
    assert sum(counts.values()) == total
    eps = {n: m.eps for n, m in model.named_modules() if isinstance(m, nn.LayerNorm)}
    assert eps.pop("encoder_adaptor.adap_before") == 1e-5 and eps.pop("encoder_adaptor.adap_after") == 1e-5
    assert len(eps) == 2 * cfg["depth"] + 1 + 2 * 2 + 2 and set(eps.values()) == {1e-6}


def test_tec_fixed_positions():
    """pos_embed and decoder_pos_embed are not trainable, their CLS row is zero, and patch (h, w) has sin(w) at
    channel 0 and sin(h) at channel dim/2 (MAE's 2-D sin-cos, column half first)."""
    model = TEC.TECModel(**TINY_TEC)
    for name, dim in (("pos_embed", 48), ("decoder_pos_embed", 32)):
        pos = getattr(model, name)
        assert not pos.requires_grad and pos.shape == (1, 17, dim)
        assert (pos[0, 0] == 0).all()
        for h, w in ((0, 0), (1, 2), (3, 1)):
            row = pos[0, 1 + 4 * h + w]
            assert row[0].item() == pytest.approx(math.sin(w), abs=1e-6)
            assert row[dim // 4].item() == pytest.approx(math.cos(w), abs=1e-6)
            assert row[dim // 2].item() == pytest.approx(math.sin(h), abs=1e-6)


# ---------------------------------------------------------------- optimizer groups (spec 5, 7)
def test_layer_decay_groups_tec_quirk():
    """Classifier (avg pool, mlp_token, depth 3): every trainable parameter in exactly one group; lr_scale =
    ld^(4 - id) with patch_embed / pos_embed id 0 (ld^4), blocks.i id i+1, head / fc_norm / cls_token_mlp scale 1
    and cls_token scale 1 (TEC's -1 index; MAE would give ld^4); no weight decay on 1-D params, pos_embed and
    cls_token, 0.05 on the rest."""
    torch.manual_seed(0)
    model = TEC.Classifier(
        pool="avg", linear=False, mlp_token=True, num_classes=10, img_size=32, patch_size=8, embed_dim=32, depth=3,
        num_heads=2,
    )  # fmt: skip
    ld = 0.65
    groups = TEC.layer_decay_groups(model, 0.05, ld)
    seen = Counter()
    names = {id(p): n for n, p in model.named_parameters()}
    expected_scale = {"patch_embed": ld**4, "pos_embed": ld**4, "cls_token": 1.0, "cls_token_mlp": 1.0}
    expected_scale.update({"head": 1.0, "fc_norm": 1.0})
    for grp in groups:
        for p in grp["params"]:
            name = names[id(p)]
            seen[name] += 1
            top = name.split(".")[0]
            scale = ld ** (3 - int(name.split(".")[1])) if top == "blocks" else expected_scale[top]
            assert grp["lr_scale"] == pytest.approx(scale, rel=1e-12), name
            no_wd = p.ndim == 1 or name in ("pos_embed", "cls_token")
            assert grp["weight_decay"] == (0.0 if no_wd else 0.05), name
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert set(seen) == set(trainable) and set(seen.values()) == {1}
    assert {"cls_token", "pos_embed", "fc_norm.weight", "head.weight", "cls_token_mlp.fc1.weight"} <= set(seen)


def test_param_groups_timm_add_weight_decay():
    """TECModel: biases and 1-D parameters without decay; cls_token and both mask tokens (3-D) decayed; the fixed
    pos_embed and decoder_pos_embed in no group; every trainable parameter exactly once."""
    model = TEC.TECModel(**TINY_TEC)
    groups = TEC.param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    by_wd = {}
    for grp in groups:
        by_wd.setdefault(grp["weight_decay"], []).extend(names[id(p)] for p in grp["params"])
    assert set(by_wd) == {0.0, 0.05}
    decay, no_decay = set(by_wd[0.05]), set(by_wd[0.0])
    assert len(by_wd[0.05]) + len(by_wd[0.0]) == len(decay | no_decay)
    assert decay | no_decay == {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"cls_token", "forward_fea_decoder.mask_token", "forward_att_decoder.mask_token"} <= decay
    assert {"blocks.0.attn.qkv.weight", "cls_token_mlp.fc1.weight", "patch_embed.proj.weight"} <= decay
    assert "pos_embed" not in decay | no_decay and "decoder_pos_embed" not in decay | no_decay
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert (n in no_decay) == (p.ndim <= 1 or n.endswith(".bias")), n


# ---------------------------------------------------------------- LR schedule (spec 5, 7)
def test_lr_at_hand_values():
    """Pretraining (blr 1.5e-4, batch 4096 -> peak 2.4e-3, warm-up 40 of 300 epochs, min 0), 100 steps per epoch:
    step 0 -> 0, step 1 -> 2.4e-3 x 0.01 / 40, epoch 20 -> 1.2e-3, epoch 40 -> 2.4e-3, epoch 170 (cosine middle) ->
    1.2e-3, epoch 105 (a quarter) -> 2.4e-3 x (0.5 + sqrt(2) / 4). Fine-tuning (peak 2e-3, warm-up 20 of 100,
    min 1e-6): epoch 60 -> 1e-6 + (2e-3 - 1e-6) / 2; the last step -> min + (peak - min) (1 + cos(pi (1 - 1/8000))) / 2.
    """
    a = dataclasses.replace(TEC.Args(), blr=1.5e-4, batch_size=4096, warmup_epochs=40, epochs=300, min_lr=0.0)
    cases = [(0, 0.0), (1, 2.4e-3 * 0.01 / 40), (2000, 1.2e-3), (4000, 2.4e-3), (17000, 1.2e-3)]
    cases.append((10500, 2.4e-3 * (0.5 + math.sqrt(2) / 4)))
    for step, exp in cases:
        assert TEC.lr_at(step, a, 100) == pytest.approx(exp, rel=1e-12, abs=1e-15), step
    f = dataclasses.replace(TEC.RECIPES["finetune"][0], warmup_epochs=20, epochs=100)
    assert f.blr * f.batch_size / 256 == pytest.approx(2e-3) and f.min_lr == 1e-6
    assert TEC.lr_at(6000, f, 100) == pytest.approx(1e-6 + (2e-3 - 1e-6) / 2, rel=1e-12)
    last = 1e-6 + (2e-3 - 1e-6) * 0.5 * (1 + math.cos(math.pi * (1 - 1 / 8000)))
    assert TEC.lr_at(9999, f, 100) == pytest.approx(last, rel=1e-12)
    assert TEC.lr_at(1000, f, 100) == pytest.approx(1e-3, rel=1e-12)  # mid warm-up


# every main_finetune.py command of the sail-sg/TEC README (8 GPUs): its flags, the defaults of main_finetune.py it
# leaves (min_lr 1e-6, warm-up 5, seed 5, rand-m9-mstd0.5-inc1, smoothing 0.1, global pool) and torch's AdamW betas
OFFICIAL_FT = dict(mode="finetune", arch="vit_base", patch_size=16, large_size=224, large_scale=(0.08, 1.0),
                   batch_size=128 * 8, accum_iter=1, epochs=100, blr=5e-4, layer_decay=0.65, warmup_epochs=20,
                   min_lr=1e-6, weight_decay=0.05, betas=(0.9, 0.999), drop_path=0.1, mixup=0.8, cutmix=1.0,
                   reprob=0.25, smoothing=0.1, randaug_n=2, randaug_m=9.0, randaug_mstd=0.5, pool="avg",
                   keep_cls_mlp=True, seed=5, init=None, base_checkpoint=None)  # fmt: skip
FT_ROWS = {  # recipe: (the README command's values that differ from OFFICIAL_FT, the README's top-1)
    "finetune": ({}, 84.7),  # MAE ViT-B base, 300 ep
    "finetune-800": (dict(layer_decay=0.55), 84.8),
    "finetune-ibot": (dict(layer_decay=0.5, warmup_epochs=5), 84.8),
    "finetune-ibot-800": (dict(layer_decay=0.55), 85.1),
    "finetune-100ep": (dict(warmup_epochs=5), 83.9),  # no --warmup_epochs in its command: the default 5
    "finetune-large": (dict(arch="vit_large", batch_size=64 * 8 * 2, accum_iter=2, epochs=50, blr=1e-3, min_lr=1e-5,
                            warmup_epochs=5), 86.5),
}  # fmt: skip


@pytest.mark.parametrize("recipe", FT_ROWS)
def test_finetune_rows_parse_to_the_official_values(recipe):
    """`tec_mae.py RECIPE` is exactly its README row's fine-tuning command, and the module docstring lists the row
    with its published top-1 (the recipe's --help too)."""
    row, top1 = FT_ROWS[recipe]
    want = {**OFFICIAL_FT, **row}
    assert {k: getattr(TEC.parse_args([recipe]), k) for k in want} == want
    assert re.search(rf"^    {recipe} +[^\n]* {top1}  ", TEC.__doc__, re.M), recipe
    assert f": {top1}" in TEC.RECIPES[recipe][1]


# ---------------------------------------------------------------- mixup / cutmix (spec 7)
Y = torch.tensor([0, 5, 2, 7])


def smooth_onehot(y, C, s):
    out = torch.full((len(y), C), s / C, dtype=torch.float64)
    for b, c in enumerate(y.tolist()):
        out[b, c] = 1 - s + s / C
    return out


def mix_args(mixup, cutmix, smoothing=0.1):
    return dataclasses.replace(TEC.RECIPES["finetune"][0], mixup=mixup, cutmix=cutmix, smoothing=smoothing)


def expected_targets(lam, C=10, s=0.1):
    y1 = smooth_onehot(Y, C, s)
    B = len(Y)
    return torch.stack([lam * y1[b] + (1 - lam) * y1[B - 1 - b] for b in range(B)])


def mixed(seed, mixup, cutmix, smoothing=0.1):
    g = torch.Generator().manual_seed(100 + seed)
    x = torch.randn(4, 3, 16, 16, generator=g)
    out, t = TEC.mixup_cutmix(x, Y, 10, mix_args(mixup, cutmix, smoothing), torch.Generator().manual_seed(seed))
    return x, out, t


def lam_from_pixels(x, out):
    """-> ('cut' or 'mix', lam). Cutmix leaves pixels outside the box untouched; mixup changes every pixel."""
    f = x.flip(0)
    same = out == x
    if same.any():
        changed = ~same[0, 0]
        assert torch.equal(~same, changed.expand_as(same))  # one box for every image and channel
        rows, cols = changed.any(1).nonzero().flatten(), changed.any(0).nonzero().flatten()
        if len(rows):
            r0, r1, c0, c1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
            assert changed[r0:r1, c0:c1].all() and changed.sum() == (r1 - r0) * (c1 - c0)  # a full rectangle
            assert torch.equal(out[..., r0:r1, c0:c1], f[..., r0:r1, c0:c1])  # pasted from the reversed batch
        return "cut", 1 - changed.sum().item() / changed.numel()
    d = (x - f).double()
    lam = ((out.double() - f.double()) * d).sum().item() / (d * d).sum().item()
    torch.testing.assert_close(out.double(), lam * x.double() + (1 - lam) * f.double(), rtol=1e-5, atol=1e-5)
    return "mix", lam


def test_mixup_cutmix_off_gives_smoothed_onehots():
    """mixup = cutmix = 0: images unchanged, targets s/C off and 1 - s + s/C on (s = 0.1 and 0)."""
    for s in (0.1, 0.0):
        x, out, t = mixed(0, 0.0, 0.0, s)
        assert torch.equal(out, x)
        torch.testing.assert_close(t.double(), smooth_onehot(Y, 10, s))


@pytest.mark.parametrize("mixup, cutmix, kind", [(0.8, 0.0, "mix"), (0.0, 1.0, "cut")])
def test_mixup_or_cutmix_lam_from_pixels_matches_targets(mixup, cutmix, kind):
    """Only mixup: x lam + flip(x) (1 - lam); only cutmix: a box pasted from the reversed batch with lam = 1 - box
    area / image area. The lam recovered from the pixels gives the targets lam y_s + (1 - lam) flip(y_s), which sum
    to 1; lam varies over seeds."""
    lams = []
    for seed in range(6):
        x, out, t = mixed(seed, mixup, cutmix)
        got, lam = lam_from_pixels(x, out)
        assert got == kind
        torch.testing.assert_close(t.double(), expected_targets(lam), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(t.sum(1), torch.ones(4))
        lams.append(lam)
    assert max(lams) - min(lams) > 0.1 and all(0 <= v <= 1 for v in lams)


def test_mixup_cutmix_switch_and_determinism():
    """Both on: over 16 seeds both branches occur, each consistent with its targets; the same generator seed gives
    identical images and targets."""
    kinds = Counter()
    for seed in range(16):
        x, out, t = mixed(seed, 0.8, 1.0)
        kind, lam = lam_from_pixels(x, out)
        kinds[kind] += 1
        torch.testing.assert_close(t.double(), expected_targets(lam), rtol=1e-5, atol=1e-6)
        _, out2, t2 = mixed(seed, 0.8, 1.0)
        assert torch.equal(out, out2) and torch.equal(t, t2)
    assert kinds["mix"] >= 3 and kinds["cut"] >= 3, kinds


# ---------------------------------------------------------------- random erasing (spec 7)
def test_random_erasing():
    """prob 0: unchanged. prob 1: in every image exactly one full axis-aligned rectangle (all channels) is replaced,
    h < H, w < W, area within [2%, 1/3] of the image up to the rounding of h and w; nothing else changes.
    prob 0.5 over 40 images erases some and not others."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, 24, 24, generator=g)
    assert torch.equal(TEC.random_erasing(x, torch.Generator().manual_seed(1), 0.0), x)
    out = TEC.random_erasing(x, torch.Generator().manual_seed(1), 1.0)
    H = W = 24
    areas = []
    for b in range(8):
        changed = out[b] != x[b]
        assert torch.equal(changed, changed[0].expand_as(changed))  # every channel in the box
        m = changed[0]
        rows, cols = m.any(1).nonzero().flatten(), m.any(0).nonzero().flatten()
        assert len(rows) > 0
        h, w = int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)
        assert m[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].all() and int(m.sum()) == h * w
        assert h < H and w < W
        slack = (h + w) / 2 + 0.25
        assert 0.02 * H * W - slack <= h * w <= H * W / 3 + slack, (h, w)
        areas.append(h * w)
    assert len(set(areas)) > 3
    x40 = torch.randn(40, 3, 24, 24, generator=g)
    out40 = TEC.random_erasing(x40, torch.Generator().manual_seed(2), 0.5)
    n = int((out40 != x40).flatten(1).any(1).sum())
    assert 8 <= n <= 32, n


# ---------------------------------------------------------------- RandAugment pieces (spec 7)
def test_equalize_matches_pil():
    """TEC.equalize equals PIL.ImageOps.equalize exactly on uint8 RGB images: uniform, narrow-range, a constant channel,
    a two-valued channel, a mostly-constant channel, several sizes."""
    rng = np.random.default_rng(0)
    imgs = []
    for S, lo, hi in ((16, 0, 256), (23, 100, 107), (32, 0, 256), (9, 40, 200), (40, 0, 3)):
        a = rng.integers(lo, hi, size=(S, S, 3)).astype(np.uint8)
        imgs.append(a)
    imgs[0][..., 1] = 77  # constant channel
    imgs[2][..., 2] = np.where(rng.random((32, 32)) < 0.3, 10, 250)  # two values
    imgs[3][:8, :, 0] = 5  # mostly one value
    for a in imgs:
        pil = np.asarray(ImageOps.equalize(Image.fromarray(a, "RGB")))
        q = torch.from_numpy(a).permute(2, 0, 1)[None].float()
        ours = TEC.equalize(q)[0].permute(1, 2, 0)
        assert torch.equal(ours, ours.round()) and torch.equal(ours.to(torch.uint8), torch.from_numpy(pil.copy()))
    assert not np.array_equal(np.asarray(ImageOps.equalize(Image.fromarray(imgs[1], "RGB"))), imgs[1])


def test_rand_augment_light():
    """n = 0 leaves images unchanged; n = 2 at m 9 keeps integral values in 0..255 and is deterministic per seed;
    with n = 1 (each op applied with p 0.5) some images stay untouched and others change."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (16, 3, 16, 16), generator=g).float()
    fill = torch.tensor([124.0, 116.0, 104.0])
    assert torch.equal(TEC.rand_augment(x, torch.Generator().manual_seed(1), 0, 9.0, 0.5, fill), x)
    out = TEC.rand_augment(x, torch.Generator().manual_seed(1), 2, 9.0, 0.5, fill)
    assert out.shape == x.shape and torch.equal(out, out.round()) and out.min() >= 0 and out.max() <= 255
    assert torch.equal(out, TEC.rand_augment(x, torch.Generator().manual_seed(1), 2, 9.0, 0.5, fill))
    assert not torch.equal(out, TEC.rand_augment(x, torch.Generator().manual_seed(2), 2, 9.0, 0.5, fill))
    one = TEC.rand_augment(x, torch.Generator().manual_seed(3), 1, 9.0, 0.5, fill)
    same = (one == x).flatten(1).all(1)
    assert 2 <= int(same.sum()) <= 14, same


@pytest.mark.parametrize(
    "recipe, flags, message",
    [
        ("cifar-finetune", dict(base_checkpoint="b.pt"), "--base-checkpoint applies to pretrain only, not finetune"),
        ("cifar-linear", dict(init="x.pt", base_checkpoint="b.pt"), "--base-checkpoint applies to pretrain only"),
    ],
)
def test_flags_of_other_modes_are_refused(recipe, flags, message):
    """A flag another mode reads is an error, not silently ignored (--base-checkpoint outside pretraining; --init is
    every mode's); the recipes themselves pass, also with --init."""
    args = dataclasses.replace(TEC.RECIPES[recipe][0], **flags)
    with pytest.raises(TEC.RunError, match=message.replace("-", r"\-")):
        TEC.check_args(args, 1)
    for name, (recipe_args, _) in TEC.RECIPES.items():
        if name != "convert":
            if "linear" not in name:  # linear needs --init
                TEC.check_args(recipe_args, 1)
            TEC.check_args(dataclasses.replace(recipe_args, init="x.pt"), 1)


def test_bare_step_is_the_base_forward_and_the_whole_student(monkeypatch):
    """Issue 17's ceiling for TEC: the frozen base model's forward + a copy of the student (adapter and both decoder
    heads included) forward+backward, on random images, masks and top-k; the trained model itself is not touched."""
    student, base = tiny_tec(), tiny_base_vit()
    args = TEC.Args(mode="pretrain", batch_size=4, large_size=16, topk=3, mask_ratio=0.75)
    run = TEC.SimpleNamespace(args=args, model=student, base=base, device=torch.device("cpu"), world_size=1,
                              autocast=TEC.nullcontext())  # fmt: skip
    base_calls, copies, deepcopy = [], [], TEC.copy.deepcopy
    monkeypatch.setattr(TEC, "base_forward", lambda m, x, last: base_calls.append((m, x.shape, last)))  # the step's
    monkeypatch.setattr(TEC.copy, "deepcopy", lambda m: copies.append(deepcopy(m)) or copies[-1])
    TEC.bare_step(run)()
    (bare,) = copies
    assert base_calls == [(base, (4, 3, 16, 16), args.last_layers)]
    assert isinstance(bare, TEC.TECModel) and bare is not student
    for name in (
        "encoder_adaptor.fuse_fcs.0.weight",
        "forward_fea_decoder.decoder_pred.weight",
        "forward_att_decoder.decoder_qk.weight",
        "decoder_blocks.0.attn.qkv.weight",
        "blocks.0.mlp.fc1.weight",
    ):
        assert dict(bare.named_parameters())[name].grad.abs().sum() > 0, name
    assert all(p.grad is None for p in student.parameters())
    base_calls.clear(), copies.clear()  # --accum-iter 2: two micro-batches of 2, as the step
    step = TEC.bare_step(TEC.SimpleNamespace(**{**vars(run), "args": dataclasses.replace(args, accum_iter=2)}))
    student_calls = []
    copies[0].register_forward_hook(lambda m, i, o: student_calls.append(i[0].shape))
    step()
    assert base_calls == [(base, (2, 3, 16, 16), args.last_layers)] * 2 and student_calls == [(2, 3, 16, 16)] * 2
