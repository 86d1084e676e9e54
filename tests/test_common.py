"""Tests for common/: torchvision-exact ResNets, MAE-layout ViT, and the checkpoint helpers (CPU, no network)."""

import dataclasses
import os
import re
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import checkpoint as ckpt  # noqa: E402
from common.checkpoint import (  # noqa: E402
    ArtifactCache,
    CheckpointError,
    find_resume,
    load_checkpoint,
    load_state_dict_strict,
    save_checkpoint,
    state_dict_digest,
)
from common.resnet import RESNETS, resnet18, resnet18_cifar, resnet50  # noqa: E402
from common.vit import VITS, VisionTransformer, vit_base  # noqa: E402


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


# ---------------------------------------------------------------- ResNet


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "resnet101"])
def test_resnet_matches_torchvision(name):
    torch.manual_seed(0)
    ours = RESNETS[name](num_classes=1000)
    tv = getattr(torchvision.models, name)()
    sd, tv_sd = ours.state_dict(), tv.state_dict()
    assert list(sd.keys()) == list(tv_sd.keys())
    assert all(sd[k].shape == tv_sd[k].shape for k in sd)
    tv.load_state_dict(sd, strict=True)
    ours.eval(), tv.eval()
    tv.fc = nn.Identity()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        f_ours, f_tv = ours.forward_features(x), tv(x)
    assert f_ours.shape == (2, ours.num_features) == (2, 512 if name == "resnet18" else 2048)
    torch.testing.assert_close(f_ours, f_tv, atol=1e-5, rtol=1e-5)


def test_resnet_headless_and_init():
    m = resnet50()
    assert isinstance(m.fc, nn.Identity) and not any(k.startswith("fc.") for k in m.state_dict())
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 2048)
    assert torch.all(m.layer1[0].bn3.weight == 1) and torch.all(m.bn1.bias == 0)
    z = resnet18(zero_init_residual=True)
    assert all(torch.all(b.bn2.weight == 0) for layer in [z.layer1, z.layer4] for b in layer)
    assert torch.all(z.layer1[0].bn1.weight == 1)
    # kaiming fan_out: std = sqrt(2 / (c_out * k * k))
    w = resnet50().layer3[0].conv2.weight
    assert abs(w.std().item() - (2 / (256 * 9)) ** 0.5) < 0.05 * (2 / (256 * 9)) ** 0.5


def test_resnet18_cifar():
    m = resnet18_cifar()
    assert m.conv1.kernel_size == (3, 3) and m.conv1.stride == (1, 1) and m.conv1.padding == (1, 1)
    assert m.conv1.bias is None and isinstance(m.maxpool, nn.Identity)
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 512)
    tv = torchvision.models.resnet18()
    expected = n_params(tv) - n_params(tv.fc) - (7 * 7 - 3 * 3) * 3 * 64
    assert n_params(m) == expected == 11_168_832


# ---------------------------------------------------------------- ViT


def small_vit(**kw):
    return VisionTransformer(**{"img_size": 32, "patch_size": 4, "embed_dim": 64, "depth": 2, "num_heads": 4, **kw})


def test_vit_base_matches_mae_layout():
    D, N, H = 768, (224 // 16) ** 2, 3072
    shapes = {
        "cls_token": (1, 1, D),
        "pos_embed": (1, 1 + N, D),
        "patch_embed.proj.weight": (D, 3, 16, 16),
        "patch_embed.proj.bias": (D,),
        "norm.weight": (D,),
        "norm.bias": (D,),
    }
    per_block = {"norm1": (D, D), "attn.qkv": (3 * D, D), "attn.proj": (D, D), "norm2": (D, D)}
    per_block.update({"mlp.fc1": (H, D), "mlp.fc2": (D, H)})
    for i in range(12):
        for name, (out, inp) in per_block.items():
            norm = name.startswith("norm")
            shapes[f"blocks.{i}.{name}.weight"] = (out,) if norm else (out, inp)
            shapes[f"blocks.{i}.{name}.bias"] = (out,)
    sd = vit_base().state_dict()
    assert set(sd) == set(shapes)
    assert {k: tuple(v.shape) for k, v in sd.items()} == shapes
    assert set(VITS) == {"vit_tiny", "vit_small", "vit_base", "vit_large"}
    assert VITS["vit_tiny"](img_size=32, patch_size=4).embed_dim == 192
    head = vit_base(num_classes=10).state_dict()
    assert head["head.weight"].shape == (10, D)


def test_vit_layers_and_pos_embed():
    m = small_vit()
    lns = [mod for mod in m.modules() if isinstance(mod, nn.LayerNorm)]
    assert len(lns) == 2 * 2 + 1 and all(ln.eps == 1e-6 for ln in lns)
    assert not m.pos_embed.requires_grad and "pos_embed" not in [n for n, p in m.named_parameters() if p.requires_grad]
    pe = m.pos_embed[0]
    assert torch.all(pe[0] == 0)  # CLS position
    # grid of 8x8 patches, row-major: first half of dims encodes the column, second half the row
    half = m.embed_dim // 2
    p00, p01, p10 = pe[1], pe[1 + 1], pe[1 + 8]
    assert torch.equal(p00[half:], p01[half:]) and not torch.equal(p00[:half], p01[:half])
    assert torch.equal(p00[:half], p10[:half]) and not torch.equal(p00[half:], p10[half:])
    q = half // 2  # position 0: sin(0) = 0, cos(0) = 1
    assert torch.equal(p00[:q], torch.zeros(q)) and torch.equal(p00[q:half], torch.ones(q))
    assert small_vit(pos_embed="learned").pos_embed.requires_grad
    assert m.blocks[0].attn.scale == (64 // 4) ** -0.5
    assert torch.all(m.blocks[1].mlp.fc1.bias == 0) and m.blocks[1].mlp.fc1.weight.shape == (256, 64)
    with pytest.raises(ValueError, match="32x32"):
        m.prepare_tokens(torch.randn(1, 3, 48, 48))


def test_vit_drop_path():
    m = small_vit(drop_path_rate=0.2, depth=3)
    assert [b.drop_path.p for b in m.blocks] == pytest.approx([0.0, 0.1, 0.2])
    x = torch.randn(4, 3, 32, 32)
    m.eval()
    with torch.no_grad():
        torch.testing.assert_close(m(x), m(x))
    m.train()
    torch.manual_seed(0)
    y = m.blocks[2].drop_path(torch.ones(1000, 2, 3))
    kept = y[:, 0, 0]
    assert set(kept.unique().tolist()) <= {0.0, 1 / 0.8} and 0.1 < (kept == 0).float().mean() < 0.3


def test_vit_return_all_and_explicit_attention():
    torch.manual_seed(0)
    m = small_vit().eval()
    x = torch.randn(2, 3, 32, 32)
    B, T, D, H = 2, 1 + 64, 64, 4
    with torch.no_grad():
        out = m.forward_features(x)
        allo = m.forward_features(x, return_all=True)
        cls = m(x)
    assert out.shape == (B, T, D) and cls.shape == (B, D)
    torch.testing.assert_close(cls, out[:, 0])
    assert len(allo["blocks"]) == 2 and all(b.shape == (B, T, D) for b in allo["blocks"])
    assert allo["attn_logits"].shape == (B, H, T, T)
    torch.testing.assert_close(allo["out"], out, atol=1e-5, rtol=1e-5)  # fused path == explicit-logits path
    torch.testing.assert_close(m.norm(allo["blocks"][-1]), out, atol=1e-5, rtol=1e-5)
    # recompute the last block's logits and attention output by hand
    blk = m.blocks[-1]
    with torch.no_grad():
        q, k, v = blk.attn.qkv(blk.norm1(allo["blocks"][0])).reshape(B, T, 3, H, D // H).permute(2, 0, 3, 1, 4)
        logits = q @ k.transpose(-2, -1) / (D // H) ** 0.5
        a = blk.attn.proj((logits.softmax(-1) @ v).transpose(1, 2).reshape(B, T, D))
        a_fused = blk.attn(blk.norm1(allo["blocks"][0]))
    torch.testing.assert_close(allo["attn_logits"], logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a_fused, a, atol=1e-5, rtol=1e-5)


def test_vit_checkpoint_roundtrip(tmp_path):
    torch.manual_seed(0)
    m = small_vit(pos_embed="learned").eval()
    save_checkpoint({"model": m.state_dict()}, tmp_path / "vit.pt")
    torch.manual_seed(1)
    fresh = small_vit(pos_embed="learned").eval()
    x = torch.randn(2, 3, 32, 32)
    assert not torch.allclose(fresh(x), m(x))
    load_state_dict_strict(fresh, load_checkpoint(tmp_path / "vit.pt")["model"])
    with torch.no_grad():
        assert torch.equal(fresh(x), m(x))


# ---------------------------------------------------------------- checkpoint


def test_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "sub" / "last.pt"
    save_checkpoint({"epoch": 1, "w": torch.arange(3)}, path)  # creates the parent dir
    assert os.listdir(path.parent) == ["last.pt"]
    save_checkpoint({"epoch": 2}, path)
    assert os.listdir(path.parent) == ["last.pt"] and load_checkpoint(path)["epoch"] == 2
    before = path.read_bytes()

    def dying_save(obj, f, *a, **kw):  # writes half a file, then "gets killed"
        f.write(b"partial garbage")
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(ckpt.torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"epoch": 3}, path)
    assert path.read_bytes() == before and os.listdir(path.parent) == ["last.pt"]


def test_load_errors(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(CheckpointError, match="checkpoint not found") as e:
        load_checkpoint(missing)
    assert str(missing) in str(e.value)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint\n\n")
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(bad)
    assert str(e.value).startswith(f"cannot read checkpoint {bad}: ") and "\n" not in str(e.value)


def test_load_state_dict_strict_message():
    m = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    sd = m.state_dict()
    sd.pop("1.bias")
    sd["0.weight"] = torch.zeros(5, 4)
    sd["extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as e:
        load_state_dict_strict(m, sd, what="teacher")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("teacher")
    assert "1.bias" in msg and "extra.weight" in msg and "0.weight: ckpt (5, 4) vs model (3, 4)" in msg
    many = {f"junk{i}": torch.zeros(1) for i in range(8)}
    with pytest.raises(CheckpointError, match=r"\+3 more"):
        load_state_dict_strict(m, {**m.state_dict(), **many})
    m2 = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    load_state_dict_strict(m2, m.state_dict())
    assert torch.equal(m2[0].weight, m[0].weight)


def test_find_resume(tmp_path):
    assert find_resume(tmp_path) is None
    save_checkpoint({}, tmp_path / "last.pt")
    assert find_resume(tmp_path) == tmp_path / "last.pt"
    other = tmp_path / "ep5.pt"
    save_checkpoint({}, other)
    assert find_resume(tmp_path, str(other)) == other
    with pytest.raises(CheckpointError, match="missing.pt"):
        find_resume(tmp_path, tmp_path / "missing.pt")


def test_state_dict_digest():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    d = state_dict_digest(m.state_dict())
    assert len(d) == 16 and int(d, 16) >= 0
    assert state_dict_digest({k: v.clone() for k, v in reversed(m.state_dict().items())}) == d
    with torch.no_grad():
        m[0].weight[0, 0] += 1e-6
    assert state_dict_digest(m.state_dict()) != d
    sd = {"w": torch.ones(3, dtype=torch.bfloat16), "n": torch.tensor(5)}
    assert state_dict_digest(sd) == state_dict_digest({k: v.clone() for k, v in sd.items()})
    assert state_dict_digest(sd) != state_dict_digest({**sd, "w": torch.ones(3)})  # dtype counts
    assert state_dict_digest(sd) != state_dict_digest({**sd, "w": torch.ones(1, 3, dtype=torch.bfloat16)})  # shape


def test_artifact_cache(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return {"feats": torch.arange(6.0).reshape(2, 3), "labels": torch.tensor([0, 1])}

    def get_or_compute(cache, name):  # as the scripts' evaluations use the cache
        if cache.get(name) is None:
            cache.put(name, compute())
        return cache.get(name)

    cache = ArtifactCache(tmp_path, "abc123-knn")
    assert cache.get("train") is None
    a = get_or_compute(cache, "train")
    b = get_or_compute(ArtifactCache(tmp_path, "abc123-knn"), "train")
    assert len(calls) == 1 and torch.equal(a["feats"], b["feats"]) and torch.equal(b["labels"], torch.tensor([0, 1]))
    assert (tmp_path / "abc123-knn" / "train.pt").is_file()
    cache.put("val", [1, 2])
    assert cache.get("val") == [1, 2] and ArtifactCache(tmp_path, "other").get("val") is None
    assert sorted(os.listdir(tmp_path / "abc123-knn")) == ["train.pt", "val.pt"]


# ---------------------------------------------------------------- SHARED blocks, called as every script calls them


@pytest.mark.parametrize("script, unit, per_image", [("swav_imagenet", "images", 1), ("empssl_cifar", "patches", 5)])
def test_benchmarks_time_the_bare_step_interleaved_with_training(script, unit, per_image, monkeypatch):
    """The `common` block: run_benchmarks times the method's train_batches alone (epoch after epoch) and warms up its
    bare_step(run) twice; time_bare_step then runs one bare step after each training step but the first, until
    --bench-ceiling-steps pairs, and reports the median ceiling, the median bare / whole ratio and its [min, max]."""
    import importlib

    module = importlib.import_module(script)
    calls, epochs, clock = [], [], [0.0]

    def train_batches(run, epoch, start, last):
        epochs.append((epoch, start, last))
        return iter(range(last - start))

    def bare():  # a bare step of 1, 2, 3, ... seconds
        calls.append(1)
        clock[0] += len(calls) - 2

    monkeypatch.setattr(module, "bare_step", lambda run: bare, raising=False)
    monkeypatch.setattr(module, "train_batches", train_batches, raising=False)
    monkeypatch.setattr(module.time, "perf_counter", lambda: clock[0])
    args = module.Args(batch_size=8, bench_ceiling_steps=3, bench_data_steps=5)
    run = module.SimpleNamespace(args=args, rank=0, world_size=1, device=torch.device("cpu"), steps_per_epoch=2)
    monkeypatch.setattr(module.time, "perf_counter", lambda: clock[0] + 0.5 * len(epochs))  # data: 0.5 s per epoch
    bench = module.run_benchmarks(run, unit, per_image)
    assert len(calls) == 2 and epochs == [(e, 0, 2) for e in range(4)]  # warm-up; 5 + 2 batches over 2-step epochs
    assert bench[f"data_{unit}_per_s"] == pytest.approx(5 * 8 * per_image / 1.5)  # from the 3rd batch (epoch 1) on
    monkeypatch.setattr(module.time, "perf_counter", lambda: clock[0])
    whole = [4.0, 4.0, 2.0, 6.0, 9.0]  # seconds per training step; the first is not timed, the last comes after N
    for i, t in enumerate(whole):
        start, clock[0] = clock[0], clock[0] + t
        if run.bare:
            assert module.time_bare_step(run, start) == (0.0 if i == 0 else len(calls) - 2)
    assert len(calls) == 2 + 3 and run.bare is None  # 3 pairs: bare 1, 2, 3 s after steps of 4, 2, 6 s
    assert bench[f"ceiling_{unit}_per_s"] == pytest.approx(8 * per_image / 2.0)
    assert bench["ceiling_ratio"] == pytest.approx(1 / 2) and bench["ceiling_ratio_spread"] == pytest.approx([0.25, 1])
    args.bench_ceiling_steps = args.bench_data_steps = 0
    assert set(module.run_benchmarks(run).values()) == {None} and run.bare is None


def test_linear_probe_one_loop_for_features_and_a_feature_stream():
    """The `linear-probe` block: precomputed features and a function yielding the same features per batch (the
    augmented probe's form) train the same head; init_std gives the official N(0, std) head; the top-5 is reported."""
    import swav_imagenet as S

    gen = torch.Generator().manual_seed(8)
    centers = 4 * torch.randn(5, 16, generator=gen)
    y, yt = torch.arange(300) % 5, torch.arange(90) % 5
    x, xt = centers[y] + torch.randn(300, 16, generator=gen), centers[yt] + torch.randn(90, 16, generator=gen)
    seen = []

    def stream(epoch, batches):
        seen.append(epoch)
        return (x[idx] for idx in batches)

    for kw in (dict(), dict(init_std=0.01), dict(init_std=0.01, lars=True)):
        a = S.linear_probe(x, y, xt, yt, 5, epochs=4, lr=0.1, batch_size=50, **kw)
        b = S.linear_probe(stream, y, xt, yt, 5, epochs=4, lr=0.1, batch_size=50, **kw)
        assert a == b and a["top5"] == 100
        assert "lars" in kw or a["best"] >= a["last"] >= 90  # LARC (trust 0.001) barely moves the head in 4 epochs
    assert seen == [0, 1, 2, 3] * 3
    untrained = S.linear_probe(x, y, xt, yt, 5, epochs=1, lr=0.0, batch_size=50, init_std=0.0)
    assert untrained["last"] == 20.0  # a zero head predicts class 0 for every image


@pytest.mark.parametrize("script", ["empssl_cifar", "tec_mae"])
def test_check_common_args_serves_every_script(script):
    """check_common_args (`common`) checks only flags every script has, the caller's architecture table and names."""
    import importlib

    module = importlib.import_module(script)
    args = module.Args()
    archs = {args.arch: None}
    module.check_common_args(args, 1, archs)
    cases = [
        (dict(arch="nope"), {}, "unknown --arch 'nope'"),
        (dict(device="tpu"), {}, "unknown --device 'tpu'"),
        (dict(knn_t=0.0), {}, "--knn-t must be > 0, got 0.0"),
        (dict(bench_data_steps=-1), {}, "--bench-data-steps must be >= 0, got -1"),
        (dict(batch_size=15), {}, "--batch-size 15 does not divide by the world size 2"),
        (dict(probe_batch_size=15), dict(per_rank="batch_size probe_batch_size"), "--probe-batch-size 15 does not"),
    ]
    for change, kw, message in cases:
        with pytest.raises(module.RunError, match=re.escape(message)):
            module.check_common_args(dataclasses.replace(args, **{"batch_size": 16, **change}), 2, archs, **kw)


def test_save_state_adds_the_methods_extra_state(tmp_path):
    """common.checkpoint.save_state: last.pt holds the run's counters and, where the method has one, every key of its
    run.extra_state() (called on every rank, before rank 0 writes: it may gather, as SwAV's queue)."""
    import groco_imagenet as G

    model = nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    run = G.SimpleNamespace(args=G.Args(out_dir=str(tmp_path)), rank=0, model=model, opt=opt, times={},
                            scaler=torch.amp.GradScaler("cuda", enabled=False), global_step=7, train_time_s=1.5,
                            images_seen=56, data_wait_s=0.1, epoch_sums=None)  # fmt: skip
    G.save_state(run)
    assert "queue" not in load_checkpoint(tmp_path / "last.pt") and run.times["checkpoint_s"] > 0
    calls = []
    run.extra_state = lambda: calls.append(1) or dict(queue=torch.ones(3))
    G.save_state(run)
    state = load_checkpoint(tmp_path / "last.pt")
    assert state["step"] == 7 and torch.equal(state["queue"], torch.ones(3))
    run.rank = 1  # another rank: takes part in extra_state, writes nothing
    G.save_state(run)
    assert calls == [1, 1]


class _Net(nn.Module):
    """A model as the scripts build them: a backbone and a head."""

    def __init__(self, head_out: int = 8):
        super().__init__()
        self.backbone, self.head = resnet18_cifar(), nn.Linear(512, head_out)


def test_init_weights_reads_torchvision_and_own_checkpoints(tmp_path):
    """--init: a plain torchvision ResNet (with DataParallel's `module.` and its fc) gives the backbone exactly the
    features torchvision computes; a last.pt loads heads that fit and leaves the others fresh, with one line."""
    torch.manual_seed(0)
    tv = torchvision.models.resnet18(num_classes=10)
    tv.conv1, tv.maxpool = nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.Identity()
    for m in tv.modules():  # non-trivial BN statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1), m.running_var.uniform_(0.5, 1.5)
    save_checkpoint({f"module.{k}": v for k, v in tv.state_dict().items()}, tmp_path / "tv.pth")
    formats = {"last.pt": ckpt.own_checkpoint, "torchvision ResNet": ckpt.torchvision_resnet}
    net = _Net()
    line = ckpt.init_weights(net, tmp_path / "tv.pth", formats)
    assert "torchvision ResNet; loaded backbone; fresh: head" in line
    tv.fc, x = nn.Identity(), torch.randn(2, 3, 32, 32)
    assert torch.allclose(net.eval().backbone(x), tv.eval()(x), atol=1e-5)

    old = {k: v for k, v in tv.state_dict().items() if not k.endswith("num_batches_tracked")}  # pre-0.4.1 files
    save_checkpoint(old, tmp_path / "old.pth")
    assert "loaded backbone; fresh: head" in ckpt.init_weights(_Net(), tmp_path / "old.pth", formats)
    save_checkpoint(dict(model=net.state_dict(), optimizer={}, args={}), tmp_path / "last.pt")
    other = _Net(head_out=5)  # its head does not fit: fresh
    assert "last.pt; loaded backbone; fresh: head" in ckpt.init_weights(other, tmp_path / "last.pt", formats)
    same = _Net()
    assert "loaded backbone, head; fresh: nothing" in ckpt.init_weights(same, tmp_path / "last.pt", formats)
    assert torch.equal(same.head.weight, net.head.weight)


def test_init_weights_refuses_what_does_not_fit(tmp_path):
    """A file of no known format, a backbone tensor missing or of another shape, a tensor the model lacks (another
    method's head), a head entry that is no tensor: one line naming it, and nothing loaded from a file that would run
    code."""
    formats = {"last.pt": ckpt.own_checkpoint, "torchvision ResNet": ckpt.torchvision_resnet}
    sd = {k: v for k, v in resnet18_cifar().state_dict().items()}
    cases = {
        "alien": ({"encoder": sd}, r"not a format this script reads \(last.pt, torchvision ResNet\)"),
        "missing": ({k: v for k, v in sd.items() if k != "layer2.0.conv1.weight"}, "no tensor for the backbone's "
                    "backbone.layer2.0.conv1.weight"),
        "shape": ({**sd, "bn1.weight": torch.ones(32)}, r"backbone.bn1.weight has shape \(32,\), the model's \(64,\)"),
        "stem": (resnet18().state_dict(), r"backbone.conv1.weight has shape \(64, 3, 7, 7\)"),
        "other head": (dict(model={**{f"backbone.{k}": v for k, v in sd.items()}, "prototypes.weight": torch.ones(3)},
                            optimizer={}, args={}), "prototypes.weight is not a tensor of this model"),
        "head no tensor": (dict(model={**{f"backbone.{k}": v for k, v in sd.items()}, "head.weight": [0.5]},
                                optimizer={}, args={}), "head.weight is a list, not a tensor"),
    }  # fmt: skip
    for name, (obj, message) in cases.items():
        save_checkpoint(obj, tmp_path / f"{name}.pt")
        with pytest.raises(CheckpointError, match=message):
            ckpt.init_weights(_Net(), tmp_path / f"{name}.pt", formats)

    class Payload:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "ran"),))

    torch.save({"conv1.weight": Payload()}, tmp_path / "evil.pth", _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match="refused to load .* it asks for posix.system"):
        ckpt.init_weights(_Net(), tmp_path / "evil.pth", formats)
    assert not (tmp_path / "ran").exists()


def test_resnet_width_scales_every_channel_count():
    """width w: every channel count c is int(c w). SwAV's wide ResNet-50s have the official README's 94M (w2), 375M
    (w4) and 586M (w5) parameters; a truncating width (0.3) scales each layer on its own (a stage's output
    4 x 128 x 0.3 = 153, not 4 int(128 x 0.3) = 152); width 1 is torchvision's layout."""
    with torch.device("meta"):  # shapes only: no memory, no init time
        for name, millions in (("resnet50w2", 94), ("resnet50w4", 375), ("resnet50w5", 586)):
            assert round(n_params(RESNETS[name]()) / 1e6) == millions, name
    net = resnet50(width=0.3)
    assert net.conv1.out_channels == 19 and net.layer2[0].conv1.out_channels == 38
    assert net.layer2[0].conv3.out_channels == 153 and net.num_features == int(2048 * 0.3)
    assert net(torch.randn(1, 3, 64, 64)).shape == (1, 614)
    assert resnet50().state_dict().keys() == torchvision.models.resnet50().state_dict().keys() - {
        "fc.weight",
        "fc.bias",
    }


def reference_lars_step(params: list, state: dict, group: dict) -> None:
    """The shared LARS's update as a plain per-tensor loop (the code before it was fused), for one group."""
    lr, wd, mom = group["lr"], group["weight_decay"], group["momentum"]
    for p in params:
        if p.grad is None:
            continue
        g = p.grad
        if group["lars"]:
            p_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(g)
            local = group["eta"] * p_norm / (g_norm + wd * p_norm + group["eps"])
            ratio = (local / lr).clamp(max=1.0) if group["clip"] else local
            g = torch.where((p_norm > 0) & (g_norm > 0), (g + wd * p) * ratio, g)
        elif wd:
            g = g + wd * p
        if mom:
            buf = state.get(p)
            buf = state[p] = g.clone() if buf is None else buf.mul_(mom).add_(g)
            g = g + mom * buf if group["nesterov"] else buf
        p.add_(g, alpha=-lr)


@pytest.mark.parametrize("nesterov,clip", [(False, False), (True, True), (False, True)])
def test_fused_lars_equals_the_per_tensor_loop(nesterov, clip):
    """The `linear-probe` block's LARS (torch._foreach_* over each group) gives bit for bit the weights of the
    per-tensor loop over 4 steps: LARS and plain groups, weight decay, momentum, Nesterov, clipping, a zero weight,
    a zero gradient, a parameter without gradient and one that gets its first gradient late."""
    import groco_imagenet as G

    torch.manual_seed(0)
    shapes = [(16, 8, 3, 3), (16,), (32, 16), (5,), (7, 7), (3,)]
    ours = [torch.randn(s, requires_grad=True) for s in shapes]
    with torch.no_grad():
        ours[3].zero_()  # ||p|| = 0
    ref = [p.detach().clone().requires_grad_() for p in ours]
    kw = dict(momentum=0.9, nesterov=nesterov, eta=0.02, clip=clip)

    def groups(ps):
        return [dict(params=ps[:4], lars=True, weight_decay=1e-2), dict(params=ps[4:], lars=False)]

    opt = G.LARS(groups(ours), lr=0.3, weight_decay=1e-4, **kw)
    ref_groups = [{**opt.defaults, **{k: v for k, v in g.items() if k != "params"}} for g in groups(ref)]
    state = {}
    for step in range(4):
        for i, (p, q) in enumerate(zip(ours, ref)):
            g = torch.randn(p.shape) if i != 1 else torch.zeros(p.shape)  # ||g|| = 0 for the bias
            late = i == 5 and step < 2  # no gradient in the first two steps
            p.grad, q.grad = (None, None) if late else (g.clone(), g.clone())
        opt.step()
        for group, ps in zip(ref_groups, (ref[:4], ref[4:])):
            with torch.no_grad():
                reference_lars_step(ps, state, group)
        for i, (p, q) in enumerate(zip(ours, ref)):
            assert torch.equal(p, q), f"step {step}, parameter {i}"
