"""tec_mae.py --init and backbone.pt (README: Use released weights). The official layouts are built here from the
official names and shapes: sail-sg/TEC main_pretrain.py's checkpoints (util/misc.py save_model: {"model": TECViT's
state dict (models/models_tec_vit.py), "optimizer", "epoch", "scaler", "args": argparse.Namespace}), its
weight_convert.py output (the released tec_*.pth: models/models_vit.py's bare state dict with cls_token :=
cls_token_mlp(cls_token) and no norm, fc_norm, head), facebookresearch/mae's {"model": ...} (models_mae.py, with its
decoder) and our last.pt. Each loads into the model of every mode (pretrain, mae, finetune, linear) with the encoder
features of an independent float64 ViT run on the file's tensors; backbone.pt loads strictly into our ViT (and timm's,
where timm is installed) with the same features; runs on real CIFAR photos evaluate a file with --max-steps 0 (also
from a URL), fine-tune from one and resume ignoring --init; every wrong file ends in one line and exit 1. About 20 s
on 2 cores (the runs: 2 runners importing torch once each)."""

import argparse
import http.server
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from conftest import ROOT, assert_finite_results, assert_one_line_error, read_results, recipe_cmd
from forkrun import forked_runs
from test_tec_units import gelu64, ln64, randomize, ref_vit

sys.path.insert(0, str(ROOT))
import tec_mae as TEC  # noqa: E402
from common.checkpoint import CheckpointError  # noqa: E402
from common.vit import LayerNorm, VisionTransformer, export_encoder, vit_tensors  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torchvision.io decoders
VIT = dict(img_size=16, patch_size=4, embed_dim=48, depth=3, num_heads=3)  # 16 patches
DEC = dict(decoder_dim=32, decoder_depth=1, decoder_heads=2)
ENC = ("pos_embed", "patch_embed.", "blocks.")  # with cls_token: the encoder a file must hold


def mode_models(mlp: bool, seed: int = 0, **vit) -> dict:
    """The model of every mode, as build_model makes them (finetune: global pool; linear: CLS token), random init."""
    torch.manual_seed(seed)
    vit = {**VIT, **vit}
    return dict(
        pretrain=TEC.TECModel(rel_heads=vit["num_heads"], **DEC, **vit),
        mae=TEC.MAEModel(**DEC, **vit),
        finetune=TEC.Classifier("avg", False, mlp, 10, **vit),
        linear=TEC.Classifier("cls", True, mlp, 10, **vit),
    )


def lin(name, i, o):
    return {f"{name}.weight": (o, i), f"{name}.bias": (o,)}


def norm(name, d):
    return {f"{name}.weight": (d,), f"{name}.bias": (d,)}


def mlp(name, i, h):  # timm's Mlp: fc1, GELU, fc2
    return {**lin(f"{name}.fc1", i, h), **lin(f"{name}.fc2", h, i)}


def block(name, d):  # sail-sg/TEC models/models_layers.py and timm: pre-norm, qkv with bias, MLP ratio 4
    att = {**lin(f"{name}.attn.qkv", d, 3 * d), **lin(f"{name}.attn.proj", d, d)}
    return {**norm(f"{name}.norm1", d), **att, **norm(f"{name}.norm2", d), **mlp(f"{name}.mlp", d, 4 * d)}


def vit_shapes(D=48, depth=3, N=16, p=4) -> dict:
    """The encoder of MAE's MaskedAutoencoderViT (models_mae.py) and TEC's TECViT: PatchEmbed's proj, blocks, norm."""
    s = {"cls_token": (1, 1, D), "pos_embed": (1, 1 + N, D), **lin("patch_embed.proj", 0, D)}
    s["patch_embed.proj.weight"] = (D, 3, p, p)
    return {**s, **{k: v for i in range(depth) for k, v in block(f"blocks.{i}", D).items()}, **norm("norm", D)}


def official_tec_shapes(D=48, depth=3, dec=32, dec_depth=1, N=16, p=4) -> dict:
    """TECViT(mlp_token=True, pred_att=True)'s state dict, from sail-sg/TEC models/models_tec_vit.py: the encoder, the
    CLS MLP (hidden 4 D), the encoder adaptor (num_adap = depth // 3, MLP hidden 4 x decoder_embed_dim), both decoder
    heads (decoder_qk: 2 x pred_dim = 2 D), the shared decoder_blocks and decoder_pos_embed."""
    s = {**vit_shapes(D, depth, N, p), **mlp("cls_token_mlp", D, 4 * D)}
    n_adap = depth // 3
    s.update({**norm("encoder_adaptor.adap_before", depth * D), **norm("encoder_adaptor.adap_after", D)})
    for j in range(n_adap):
        s.update({**lin(f"encoder_adaptor.fuse_fcs.{j}", D * depth // n_adap, D)})
        s.update(mlp(f"encoder_adaptor.adap_mlps.{j}", D, 4 * dec))
    for head, out, width in (("fea", "decoder_pred", D), ("att", "decoder_qk", 2 * D)):
        h = f"forward_{head}_decoder"
        s.update(
            {**lin(f"{h}.decoder_embed", D, dec), f"{h}.mask_token": (1, 1, dec), **norm(f"{h}.decoder_norm", dec)}
        )
        s.update(lin(f"{h}.{out}", dec, width))
    s.update({k: v for i in range(dec_depth) for k, v in block(f"decoder_blocks.{i}", dec).items()})
    return {**s, "decoder_pos_embed": (1, 1 + N, dec)}


def mae_shapes(D=48, depth=3, dec=32, dec_depth=1, N=16, p=4) -> dict:
    """MaskedAutoencoderViT's state dict (facebookresearch/mae models_mae.py): the encoder and its decoder."""
    s = {**vit_shapes(D, depth, N, p), **lin("decoder_embed", D, dec), "mask_token": (1, 1, dec)}
    s.update({k: v for i in range(dec_depth) for k, v in block(f"decoder_blocks.{i}", dec).items()})
    return {
        **s,
        "decoder_pos_embed": (1, 1 + N, dec),
        **norm("decoder_norm", dec),
        **lin("decoder_pred", dec, p * p * 3),
    }


def official_tec(seed: int = 1) -> dict:
    """A main_pretrain.py checkpoint of random TEC weights under the official names (ours less the `out` aliases)."""
    model = randomize(mode_models(True, seed)["pretrain"], torch.Generator().manual_seed(seed))
    sd = {k: v.clone() for k, v in model.state_dict().items() if ".out." not in k}
    assert {k: tuple(v.shape) for k, v in sd.items()} == official_tec_shapes()
    args = argparse.Namespace(model="mae_vit_base_patch16", mlp_token=True, pred_att=True, topkatt=15, att_tau=1.8)
    scaler = dict(scale=65536.0, growth_factor=2.0, backoff_factor=0.5, growth_interval=2000, _growth_tracker=0)
    optimizer = dict(state={0: dict(step=torch.tensor(3.0))}, param_groups=[dict(lr=1e-4, params=[0])])
    return dict(model=sd, optimizer=optimizer, epoch=299, scaler=scaler, args=args)


def folded(sd: dict) -> dict:
    """weight_convert.py by hand: cls_token := fc2(GELU(fc1(cls_token))) in float64 (timm's Mlp, exact GELU); the CLS
    MLP, norm, fc_norm, head and everything else gone: cls_token, pos_embed, patch_embed.proj.*, blocks.* alone."""
    w = {k: sd[f"cls_token_mlp.{k}"].double() for k in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")}
    cls = gelu64(sd["cls_token"].double() @ w["fc1.weight"].T + w["fc1.bias"]) @ w["fc2.weight"].T + w["fc2.bias"]
    return {"cls_token": cls.float(), **{k: v for k, v in sd.items() if k.startswith(ENC)}}


def ref_tokens(enc: dict, x: torch.Tensor, norm=None) -> torch.Tensor:
    """The float64 ViT's tokens after the last block (and the final norm (weight, bias) when given)."""
    out = ref_vit(enc, x, VIT["depth"], VIT["num_heads"], VIT["patch_size"])[0][-1]
    return out if norm is None else ln64(out, *(t.double() for t in norm))


def load(model: nn.Module, path) -> str:
    return TEC.load_init(SimpleNamespace(model=model, init_file=str(path)))


def parts(line: str) -> tuple:
    """(format, loaded, fresh) of init_weights' line."""
    fmt, loaded, fresh = line.split(": ", 1)[1].split("; ")
    return fmt, loaded.removeprefix("loaded "), fresh.removeprefix("fresh: ")


def plain_vit(finetune: bool) -> VisionTransformer:
    """Our ViT in timm/MAE layout; the global-pool fine-tuning model has fc_norm in place of norm (timm's
    global_pool='avg')."""
    vit = VisionTransformer(**VIT, pos_embed="learned")
    if finetune:
        vit.norm, vit.fc_norm = nn.Identity(), LayerNorm(VIT["embed_dim"])
    return vit


def check_backbone(model: nn.Module, mode: str, tmp: Path, x: torch.Tensor) -> dict:
    """backbone.pt of `model` loads strictly into our ViT and gives the model's tokens. Returns its tensors."""
    export_encoder(model.state_dict(), tmp / f"{mode}.pt", plain=True)
    sd = torch.load(tmp / f"{mode}.pt", weights_only=True)
    vit = plain_vit(mode == "finetune")
    vit.load_state_dict(sd, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(vit.forward_features(x), model.forward_features(x), rtol=1e-5, atol=1e-5)
    return sd


def test_official_tec_checkpoint_into_every_mode(tmp_path, one_thread):
    """A main_pretrain.py checkpoint (TECViT's names, argparse.Namespace args: loaded with weights_only=True) loads
    whole into pretrain (the `out` aliases of our decoder heads too); into mae and --no-keep-cls-mlp fine-tuning with
    the CLS MLP folded into cls_token (weight_convert.py's exact algebra), the decoders dropped; into finetune / linear
    with the MLP kept. Every model's tokens equal the float64 ViT's on the folded encoder; backbone.pt loads strictly
    into our ViT with the same tokens."""
    ckpt = official_tec()
    path = tmp_path / "checkpoint-299.pth"
    torch.save(ckpt, path)
    sd, x = ckpt["model"], torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    enc = folded(sd)
    norm = (sd["norm.weight"], sd["norm.bias"])
    fmt, enc_parts = (
        "TEC pretraining checkpoint (main_pretrain.py)",
        "blocks, cls_token, cls_token_mlp, patch_embed, pos_embed",
    )
    tec_heads = "decoder_blocks, decoder_pos_embed, encoder_adaptor, forward_att_decoder, forward_fea_decoder"
    want = {  # mode: (loaded, fresh) top-level modules; MAE's decoder shares TEC's decoder_blocks, decoder_pos_embed
        "pretrain": (f"blocks, cls_token, cls_token_mlp, {tec_heads}, norm, patch_embed, pos_embed", "nothing"),
        "mae": ("blocks, cls_token, decoder_blocks, decoder_pos_embed, norm, patch_embed, pos_embed",
                "decoder_embed, decoder_norm, decoder_pred, mask_token"),
        "finetune": (enc_parts, "fc_norm, head"),
        "linear": ("blocks, cls_token, cls_token_mlp, norm, patch_embed, pos_embed", "head"),
        "finetune-folded": ("blocks, cls_token, patch_embed, pos_embed", "fc_norm, head"),
    }  # fmt: skip
    models = mode_models(True)
    models["finetune-folded"] = TEC.Classifier("avg", False, False, 10, **VIT)  # --no-keep-cls-mlp
    for mode, model in models.items():
        line = load(model, path)
        assert parts(line) == (fmt, *want[mode]), (mode, line)
        own = model.state_dict()
        for k in own:
            if k in sd and ("cls_token_mlp.fc1.weight" in own or k != "cls_token"):
                assert torch.equal(own[k], sd[k]), (mode, k)
        if mode == "pretrain":
            for h, o in (("fea", "pred"), ("att", "qk")):  # our heads' `out` aliases
                assert torch.equal(
                    own[f"forward_{h}_decoder.out.weight"], sd[f"forward_{h}_decoder.decoder_{o}.weight"]
                )
        elif "cls_token_mlp.fc1.weight" not in own:
            torch.testing.assert_close(own["cls_token"], enc["cls_token"], rtol=1e-5, atol=1e-6)
        with torch.no_grad():
            got = model.forward_features(x).double()
        torch.testing.assert_close(got, ref_tokens(enc, x, None if "finetune" in mode else norm), rtol=1e-5, atol=1e-5)
        exported = check_backbone(model, mode.split("-")[0], tmp_path, x)
        assert exported.keys() == enc.keys() | (
            {"fc_norm.weight", "fc_norm.bias"} if "finetune" in mode else {"norm.weight", "norm.bias"}
        )


def official_mae(seed: int = 2) -> dict:
    """A facebookresearch/mae main_pretrain.py checkpoint (its misc.save_model: the same container as TEC's) of random
    weights under models_mae.py's names (our MAEModel's)."""
    model = randomize(mode_models(False, seed)["mae"], torch.Generator().manual_seed(seed))
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in sd.items()} == mae_shapes()
    return dict(model=sd, optimizer=dict(state={}, param_groups=[]), epoch=1599, scaler={}, args=argparse.Namespace())


def test_converted_release_mae_ibot_and_our_files(tmp_path, one_thread):
    """weight_convert.py's bare converted ViT (the released tec_*.pth: cls_token baked, no norm) is recognised as
    such: fine-tuning loads it whole (fc_norm and head start fresh), the linear probe and pretraining start their final
    norm fresh (pretraining also its CLS MLP: an adapter) and nothing else. MAE's main_pretrain.py checkpoint loads
    whole
    into mae (decoder included), its encoder-only release {"model": sd} and iBOT's {"state_dict": backbone.* + head}
    into fine-tuning; our last.pt of a fine-tuning run loads whole back (head included). Tokens as the float64 ViT's;
    build_model keeps the CLS MLP (--keep-cls-mlp) exactly when the file has one."""
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    conv = folded(official_tec(seed=2)["model"])
    torch.save(conv, tmp_path / "tec_mae_vitb_300ep.pth")
    mae = official_mae()
    torch.save(mae, tmp_path / "mae-checkpoint-1599.pth")
    enc = {k: v for k, v in mae["model"].items() if k in vit_shapes()}
    torch.save(dict(model=enc), tmp_path / "mae_pretrain_vit_tiny.pth")
    ibot = {f"backbone.{k}": v for k, v in enc.items()} | {"backbone.masked_embed": torch.zeros(48)}
    torch.save(dict(state_dict=ibot | {"head.mlp.0.weight": torch.ones(4, 48)}), tmp_path / "checkpoint_teacher.pth")
    for name, has_mlp in (("tec_mae_vitb_300ep.pth", False), ("mae-checkpoint-1599.pth", False)):
        assert ("cls_token_mlp.fc1.weight" in vit_tensors(torch.load(tmp_path / name, weights_only=True))) == has_mlp
    assert "cls_token_mlp.fc1.weight" in vit_tensors(official_tec())
    mae_dec = "decoder_blocks, decoder_embed, decoder_norm, decoder_pos_embed, decoder_pred, mask_token"
    tec_heads = "decoder_blocks, decoder_pos_embed, encoder_adaptor, forward_att_decoder, forward_fea_decoder"
    enc4 = "blocks, cls_token, patch_embed, pos_embed"
    rel, conv_fmt, mae_all = "tec_mae_vitb_300ep.pth", "TEC converted ViT (weight_convert.py)", f"{mae_dec}, norm"
    cases = [  # file, mode, format, loaded, fresh, the float64 reference's (encoder, final norm or None)
        (rel, "finetune", conv_fmt, enc4, "fc_norm, head", conv, None),
        (rel, "linear", conv_fmt, enc4, "head, norm", conv, "fresh"),
        (rel, "pretrain", conv_fmt, enc4, f"cls_token_mlp, {tec_heads}, norm", None, None),
        ("mae-checkpoint-1599.pth", "mae", "timm/MAE ViT", f"blocks, cls_token, {mae_all}, patch_embed, pos_embed",
         "nothing", enc, "file"),
        ("mae_pretrain_vit_tiny.pth", "finetune", "timm/MAE ViT", enc4, "fc_norm, head", enc, None),
        ("checkpoint_teacher.pth", "linear", "timm/MAE ViT", "blocks, cls_token, norm, patch_embed, pos_embed", "head",
         enc, "file"),
    ]  # fmt: skip
    for name, mode, fmt, loaded, fresh, ref, final_norm in cases:
        model = mode_models(False, seed=7)[mode]
        assert parts(load(model, tmp_path / name)) == (fmt, loaded, fresh), (name, mode)
        own = model.state_dict()
        src = conv if name.startswith("tec") else mae["model"]
        assert all(torch.equal(own[k], src[k]) for k in src if k in own), (name, mode)
        if ref is not None:
            w = {"fresh": (torch.ones(48), torch.zeros(48)), "file": (enc["norm.weight"], enc["norm.bias"])}
            with torch.no_grad():
                got = model.forward_features(x).double()
            torch.testing.assert_close(got, ref_tokens(ref, x, w.get(final_norm)), rtol=1e-5, atol=1e-5)
    # our own last.pt (save_state's keys) of a fine-tuning run: everything loads back, the head too
    tuned = randomize(mode_models(True, seed=3)["finetune"], torch.Generator().manual_seed(3))
    torch.save(
        dict(model=tuned.state_dict(), optimizer={}, scaler={}, step=5, args={}, train_time_s=1.0), tmp_path / "l"
    )
    model = mode_models(True, seed=8)["finetune"]
    assert parts(load(model, tmp_path / "l")) == ("last.pt", "blocks, cls_token, cls_token_mlp, fc_norm, head, "
                                                  "patch_embed, pos_embed", "nothing")  # fmt: skip
    assert all(torch.equal(v, tuned.state_dict()[k]) for k, v in model.state_dict().items())


class RunsCode:
    """Unpickling it calls open(marker, "w"): what torch.load(weights_only=False) would run."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def bad_files(tmp: Path, tec: dict = None) -> dict:
    """name -> (path, needles of the one-line error) of files --init must refuse (from official_tec() or `tec`)."""
    tec = tec or official_tec()
    conv = folded(tec["model"])
    swav = {"module.conv1.weight": torch.ones(64, 3, 7, 7), "module.prototypes.weight": torch.ones(30, 16)}
    files = {  # name: (content, needles)
        "swav": (swav, ["not a format this script reads", "last.pt, TEC pretraining checkpoint (main_pretrain.py), TEC "
                        "converted ViT (weight_convert.py), timm/MAE ViT", "[module.conv1.weight"]),
        "swav-run": (dict(model={"backbone.conv1.weight": torch.ones(1)}, optimizer={}, args={}, step=1),
                     ["not a format this script reads"]),
        "renamed": (dict(tec, model={k.replace("blocks.1.attn.qkv.", "blocks.1.attn.qkv_."): v
                                     for k, v in tec["model"].items()}),
                    ["(TEC pretraining checkpoint (main_pretrain.py))",
                     "no tensor for the backbone's blocks.1.attn.qkv"]),
        "two-cls": ({**conv, "cls_token": torch.zeros(1, 2, 48)},
                    ["cls_token has shape (1, 2, 48), the model's (1, 1, 48)"]),
        "patch8": ({**conv, "pos_embed": torch.zeros(1, 5, 48)},
                   ["pos_embed has shape (1, 5, 48), the model's (1, 17, 48)"]),
        "deeper": ({**conv, **{k.replace("blocks.0.", "blocks.3."): v for k, v in conv.items() if "blocks.0." in k}},
                   ["blocks.3.", "is not a tensor of this model"]),
        "runs-code": (dict(tec, payload=RunsCode(tmp / "ran")), ["refused to load", "io.open"]),
    }  # fmt: skip
    out = {}
    for name, (obj, needles) in files.items():
        torch.save(obj, tmp / f"{name}.pth")
        out[name] = (tmp / f"{name}.pth", needles)
    good = tmp / "good.pth"
    torch.save(tec, good)
    (tmp / "truncated.pth").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    out["truncated"] = (tmp / "truncated.pth", ["cannot read checkpoint"])
    return out


def test_wrong_files_are_refused_in_one_line(tmp_path, one_thread):
    """Another paper's checkpoint (a SwAV release, a SwAV last.pt), a renamed block key, a cls_token, pos_embed or
    depth that does not fit, a pickle that would run code and a truncated file: one line naming the file (its format
    where one was recognised) and the first tensor that does not fit; the code never runs."""
    for name, (path, needles) in bad_files(tmp_path).items():
        model = mode_models(False)["finetune"]
        with pytest.raises(CheckpointError) as e:
            load(model, path)
        msg = str(e.value)
        assert "\n" not in msg and e.value.every_rank and all(n in msg for n in needles), (name, msg)
        assert msg.startswith(f"--init {path}") or name in ("runs-code", "truncated") and str(path) in msg, (name, msg)
    assert not (tmp_path / "ran").exists()


# ---- runs: the cifar recipes' ViT-Tiny (patch 4 on 32 x 32: 64 patches) on 100 + 50 real CIFAR-10 photos
CIFAR_VIT = dict(img_size=32, patch_size=4, embed_dim=192, depth=12, num_heads=3)
FLAGS = "--dataset imagefolder --device cpu --batch-size 32 --log-every 1 --epochs 1 --probe none"


def vit_tiny_files(tmp: Path) -> dict:
    """At the cifar recipes' sizes: an official TEC pretraining checkpoint, its converted release, an MAE release."""
    torch.manual_seed(5)
    tec = TEC.TECModel(rel_heads=3, decoder_dim=128, decoder_depth=2, decoder_heads=4, **CIFAR_VIT)
    ckpt = dict(official_tec(), model={k: v for k, v in tec.state_dict().items() if ".out." not in k})
    files = dict(
        tec=tmp / "checkpoint-99.pth", conv=tmp / "tec_mae_vitb_100ep.pth", mae=tmp / "served" / "mae_tiny.pth"
    )
    files["mae"].parent.mkdir()
    torch.save(ckpt, files["tec"])
    torch.save(folded(ckpt["model"]), files["conv"])
    torch.save(dict(model=VisionTransformer(**CIFAR_VIT).state_dict()), files["mae"])
    return files


def readout_knn(backbone: dict, data_dir: Path) -> tuple:
    """The k-NN of cifar-mae's evaluation (mean patch token after the final norm, whole 32 px images) on our ViT
    loaded strictly from backbone.pt."""
    args = TEC.parse_args(["cifar-mae", *FLAGS.split(), "--data-dir", str(data_dir)])
    data = TEC.load_data(args)
    vit = VisionTransformer(**CIFAR_VIT, pos_embed="learned")
    vit.load_state_dict(backbone, strict=True)
    mean, std = (torch.tensor(v)[:, None, None] * 255 for v in (args.mean, args.std))
    with torch.no_grad():
        f = {
            s: vit.eval().forward_features((data[f"{s}_x"].float() - mean) / std)[:, 1:].mean(1)
            for s in ("train", "test")
        }
    return TEC.knn_eval(f["train"], data["train_y"], f["test"], data["test_y"], data["num_classes"], 20, 0.07)


def test_runs_evaluate_continue_and_export(small_cifar_dir, tmp_path):
    """--max-steps 0 evaluates the file's weights: cifar-mae from the official checkpoint (its k-NN is that of our ViT
    loaded from the run's backbone.pt, which holds the checkpoint's encoder with the CLS MLP folded in), cifar-linear
    from an http URL (read from torch's hub cache). Fine-tuning trains from the converted release, a rerun resumes and
    ignores --init (a truncated file), and its last.pt, evaluated by another run, gives its top-1. Every wrong file: one
    line, exit 1, no results."""
    files = vit_tiny_files(tmp_path)
    tec = torch.load(files["tec"], weights_only=False)
    bad = {k: v for k, v in bad_files(tmp_path, tec).items() if k in ("swav", "renamed", "runs-code", "truncated")}
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(files["mae"].parent))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/mae_tiny.pth"

    def run(recipe, out, extra):
        return recipe_cmd(ROOT / "tec_mae.py", recipe, FLAGS, small_cifar_dir, tmp_path / out, extra)

    hub = tmp_path / "th"  # TORCH_HOME of the URL run
    one = {
        "mae-eval": (run("cifar-mae", "mae", f"--init {files['tec']} --max-steps 0"), None),
        **{f"bad-{n}": (run("cifar-finetune", f"bad-{n}", f"--init {p} --max-steps 0"), None)
           for n, (p, _) in bad.items()},
    }  # fmt: skip
    two = {
        "finetune": (run("cifar-finetune", "ft", f"--init {files['conv']} --max-steps 1"), None),
        "resumed": (run("cifar-finetune", "ft", f"--init {bad['truncated'][0]} --max-steps 1"), None),
        "again": (run("cifar-finetune", "ft-again", f"--init {tmp_path / 'ft' / 'last.pt'} --max-steps 0"), None),
        "linear-url": (run("cifar-linear", "lin", f"--init {url} --max-steps 0"), dict(TORCH_HOME=str(hub))),
    }  # fmt: skip
    (tmp_path / "logs").mkdir()
    try:
        with ThreadPoolExecutor(2) as pool:
            jobs = [pool.submit(forked_runs, cases, tmp_path / "logs") for cases in (one, two)]
            procs = {name: proc for job in jobs for name, proc in job.result().items()}
    finally:
        server.shutdown()
    for name in [*one, *two]:
        assert procs[name].returncode == (1 if name.startswith("bad") else 0), (name, procs[name].stderr[-3000:])

    fmt = "TEC pretraining checkpoint (main_pretrain.py)"
    res = read_results(tmp_path / "mae")
    loaded = "blocks, cls_token, decoder_blocks, decoder_pos_embed, norm, patch_embed, pos_embed"
    fresh = "decoder_blocks, decoder_embed, decoder_norm, decoder_pred, mask_token"  # the cifar MAE decoder: 4 blocks
    assert res["init"] == f"--init {files['tec']}: {fmt}; loaded {loaded}; fresh: {fresh}"
    assert res["init"] in procs["mae-eval"].stdout.splitlines() and res["steps_done"] == 0
    assert_finite_results(res, "knn_top1", "knn_top5")
    backbone = torch.load(tmp_path / "mae" / "backbone.pt", weights_only=True)
    sd = tec["model"]
    want = {**folded(sd), "norm.weight": sd["norm.weight"], "norm.bias": sd["norm.bias"]}
    assert backbone.keys() == want.keys()
    for k, v in want.items():
        assert (
            torch.equal(backbone[k], v) or k == "cls_token" and torch.allclose(backbone[k], v, rtol=1e-5, atol=1e-6)
        ), k
    top1, top5 = readout_knn(backbone, small_cifar_dir)
    assert abs(top1 - res["knn_top1"]) <= 2.0 and abs(top5 - res["knn_top5"]) <= 2.0, (top1, top5, res)  # 1 image

    cached = tmp_path / "th" / "hub" / "checkpoints" / "mae_tiny.pth"
    res = read_results(tmp_path / "lin")
    assert res["init"] == f"--init {cached}: timm/MAE ViT; loaded blocks, cls_token, norm, patch_embed, pos_embed; " \
        "fresh: head" and res["args"]["init"] == url  # fmt: skip

    conv_line = (
        f"--init {files['conv']}: TEC converted ViT (weight_convert.py); loaded blocks, cls_token, patch_embed, "
    )
    assert conv_line + "pos_embed; fresh: fc_norm, head" in procs["finetune"].stdout.splitlines()
    assert "resumed from" in procs["resumed"].stdout and "--init" not in procs["resumed"].stdout
    ft_backbone = torch.load(tmp_path / "ft" / "backbone.pt", weights_only=True)  # global pool: fc_norm, no norm
    assert ft_backbone.keys() == (want.keys() - {"norm.weight", "norm.bias"}) | {"fc_norm.weight", "fc_norm.bias"}
    resumed, again = read_results(tmp_path / "ft"), read_results(tmp_path / "ft-again")
    assert resumed["init"] is None and resumed["steps_done"] == 1 and again["steps_done"] == 0
    assert again["init"].endswith("last.pt: last.pt; loaded blocks, cls_token, fc_norm, head, patch_embed, pos_embed; "
                                  "fresh: nothing")  # fmt: skip
    assert again["top1"] == resumed["top1"] and again["top5"] == resumed["top5"]
    for name, (path, needles) in bad.items():
        assert_one_line_error(procs[f"bad-{name}"], "tec_mae.py: error: ", str(path), *needles)
        assert not (tmp_path / f"bad-{name}" / "results.json").exists()
    assert not (tmp_path / "ran").exists()


@pytest.mark.parametrize("mode", ["pretrain", "finetune"])
def test_backbone_loads_into_timm(mode, tmp_path, one_thread):
    """backbone.pt loads strictly into timm's VisionTransformer (global_pool 'token', or 'avg' with fc_norm for the
    global-pool fine-tuning model) and gives the model's features: the CLS token after the final norm, or fc_norm of
    the mean patch token. Skipped where timm is not installed (it is no requirement of this project)."""
    timm = pytest.importorskip("timm")
    model = randomize(mode_models(True)[mode], torch.Generator().manual_seed(9)).eval()  # fc_norm, CLS MLP too
    export_encoder(model.state_dict(), tmp_path / "backbone.pt", plain=True)
    pool = "avg" if mode == "finetune" else "token"
    vit = timm.models.vision_transformer.VisionTransformer(**VIT, num_classes=0, global_pool=pool)
    vit.load_state_dict(torch.load(tmp_path / "backbone.pt", weights_only=True), strict=True)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        want = model.readout(x, "avg" if mode == "finetune" else "cls")
        torch.testing.assert_close(vit.eval()(x), want, rtol=1e-5, atol=1e-5)
