"""Checkpoint helpers: atomic save, safe clear-error load (a path, URL or dict), strict state_dict loading, a run's
training state (save and resume), --init's weight formats, weight digests, artifact cache."""

import argparse
import dataclasses
import hashlib
import os
import pickle
import re
import time
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch
import torch.nn as nn

PathLike = Union[str, os.PathLike]


class CheckpointError(Exception):
    """A checkpoint is missing, unreadable or does not fit the model. The message is a single line. every_rank: raised
    alike on every rank (rank 0 alone prints it)."""

    def __init__(self, message: str, every_rank: bool = False):
        super().__init__(message)
        self.every_rank = every_rank


# CRUCIAL: every file is loaded with weights_only=True: tensors, dicts, lists, tuples, strings and numbers, nothing
# that runs code. The one type more that official containers need: MAE's and TEC's checkpoints keep their
# argparse.Namespace of training args next to the weights.
torch.serialization.add_safe_globals([argparse.Namespace])


def load_error(source, e: Exception) -> CheckpointError:
    """The one-line error for a failed torch.load: a file that weights_only=True refused (naming the type it asked
    for: a pickle that would run code), or one that cannot be read at all."""
    text = " ".join(str(e).split())
    if isinstance(e, pickle.UnpicklingError):  # the zip format says "WeightsUnpickler error: ...", the legacy one not
        m = re.search(r"GLOBAL (\S+)", text)
        if m:
            return CheckpointError(f"refused to load {source}: it asks for {m.group(1)}, which weights never need "
                                   "(loaded with weights_only=True: a checkpoint must not run code)")  # fmt: skip
    return CheckpointError(f"cannot read checkpoint {source}: {type(e).__name__}: {text}")


def save_checkpoint(obj: Any, path: PathLike) -> None:
    """torch.save `obj` to `path` atomically: write a temp file in the same directory, fsync, then os.replace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(f"{path}.tmp.{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # CRUCIAL: a crash before this line leaves the previous checkpoint intact
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load_checkpoint(path: PathLike, map_location: Any = "cpu") -> dict:
    """torch.load a checkpoint with weights_only=True (ours hold tensors and plain args dicts); a file that asks for
    any other type is refused in one line and nothing of it runs."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise load_error(path, e) from e


def read_checkpoint(source) -> dict:
    """A checkpoint from a path, an http(s) URL (downloaded once into torch's hub cache) or an already loaded dict."""
    if isinstance(source, dict):
        return source
    if str(source).startswith(("http://", "https://")):
        try:
            return torch.hub.load_state_dict_from_url(str(source), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:  # a file that would run code, or not a checkpoint
            raise load_error(source, e)
        except Exception as e:  # no network, a bad URL
            raise CheckpointError(f"cannot download {source}: {' '.join(str(e).split())}")
    return load_checkpoint(source)


def find_resume(out_dir: PathLike, resume: Optional[PathLike] = None) -> Optional[Path]:
    """The checkpoint to resume from: explicit `resume` (must exist), else out_dir/last.pt if present, else None."""
    if resume is not None:
        if not Path(resume).is_file():
            raise CheckpointError(f"resume checkpoint not found: {resume}")
        return Path(resume)
    last = Path(out_dir) / "last.pt"
    return last if last.is_file() else None


def save_state(run) -> None:
    """out_dir/last.pt, written atomically by rank 0: run.model (its buffers too), run.opt, run.scaler, the step, the
    timers, the args and the dict of the method's run.extra_state(), if it has one (called on every rank: it may
    gather, as SwAV's queue)."""
    extra = run.extra_state() if hasattr(run, "extra_state") else {}
    if run.rank != 0:
        return
    t0 = time.perf_counter()
    state = dict(model=run.model.state_dict(), optimizer=run.opt.state_dict(), scaler=run.scaler.state_dict())
    state.update(step=run.global_step, train_time_s=run.train_time_s, images_seen=run.images_seen)
    state.update(data_wait_s=run.data_wait_s, args=dataclasses.asdict(run.args), epoch_sums=run.epoch_sums, **extra)
    save_checkpoint(state, Path(run.args.out_dir) / "last.pt")
    run.times["checkpoint_s"] = run.times.get("checkpoint_s", 0.0) + time.perf_counter() - t0


def resume_state(run, extra_keys: set) -> Optional[dict]:
    """Load out_dir/last.pt (or --resume) into run.model (strictly), run.opt, run.scaler and the counters. Returns the
    checkpoint (the caller restores extra_keys), or None when there is nothing to resume. Every rank reads the same
    file, so every error is raised alike on every rank."""
    args = run.args
    try:
        ckpt_path = find_resume(Path(args.out_dir), args.resume)
        if ckpt_path is None:
            return None
        ckpt = load_checkpoint(ckpt_path, map_location=run.device)
        needed = {"model", "optimizer", "scaler", "step", "args", "train_time_s", "images_seen", "data_wait_s"}
        if not isinstance(ckpt, dict) or (needed | extra_keys) - ckpt.keys():
            msg = f"{ckpt_path} is not a training checkpoint of this script (needs {sorted(needed | extra_keys)})"
            raise CheckpointError(msg)
        if ckpt["args"]["batch_size"] != args.batch_size:  # steps would map to other images and epochs
            trained = ckpt["args"]["batch_size"]
            raise CheckpointError(f"{ckpt_path} was trained with --batch-size {trained}, not {args.batch_size}")
        load_state_dict_strict(run.model, ckpt["model"], what=f"model in {ckpt_path}")
        try:
            run.opt.load_state_dict(ckpt["optimizer"])
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"optimizer state in {ckpt_path} does not match: {e}")
    except CheckpointError as e:
        raise CheckpointError(str(e), every_rank=True)
    run.scaler.load_state_dict(ckpt["scaler"])
    run.global_step, run.train_time_s, run.images_seen = ckpt["step"], ckpt["train_time_s"], ckpt["images_seen"]
    run.data_wait_s, run.epoch_sums = ckpt["data_wait_s"], ckpt.get("epoch_sums")
    if run.rank == 0:
        print(f"resumed from {ckpt_path} at step {ckpt['step']}")
    return ckpt


def strip_prefix(sd: Mapping[str, Any], prefix: str, new: str = "") -> dict:
    """The tensors of sd whose keys start with prefix, renamed to start with new instead."""
    return {new + k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix) and torch.is_tensor(v)}


def own_checkpoint(obj: Any) -> Optional[dict]:
    """--init format: a last.pt of our scripts (its model, without optimizer or counters); None for any other file."""
    ours = isinstance(obj, dict) and {"model", "optimizer", "args"} <= obj.keys() and isinstance(obj["model"], dict)
    return obj["model"] if ours else None


def torchvision_resnet(obj: Any, prefix: str = "backbone.") -> Optional[dict]:
    """--init format: a plain torchvision ResNet state dict, also one saved with nn.DataParallel's `module.` (fc.* is
    not loaded), as the model's keys under prefix; None for any other file."""
    if isinstance(obj, dict) and all(isinstance(k, str) and k.startswith("module.") for k in obj):
        obj = strip_prefix(obj, "module.")
    if not (isinstance(obj, dict) and {"conv1.weight", "layer1.0.conv1.weight"} <= obj.keys()):
        return None
    return {prefix + k: v for k, v in obj.items() if not k.startswith("fc.")}


def init_weights(model: nn.Module, path: PathLike, formats: dict, backbone: Union[str, tuple] = "backbone.") -> str:
    """--init: load pretrained weights from `path` into `model`. formats {name: convert}: the first convert(obj) that
    does not return None gives the file's tensors under the model's own names. Every tensor of the model under
    `backbone` must be there with its shape, and every tensor there must be one of the model's (an entry under one of
    the model's names must be a tensor), else one line names the first that does not fit; the other tensors (heads)
    are loaded where their shapes fit, the rest start fresh; entries that are not tensors, under other names, are
    dropped.
    Returns the one line that says which format was recognised, what was loaded and what starts fresh."""
    try:  # every rank reads the same file: every error is raised alike on every rank
        return _init_weights(model, path, formats, backbone)
    except CheckpointError as e:
        raise CheckpointError(str(e), every_rank=True)


def _init_weights(model: nn.Module, path: PathLike, formats: dict, backbone: Union[str, tuple]) -> str:
    obj = load_checkpoint(path)
    name, sd = next(((n, sd) for n, convert in formats.items() if (sd := convert(obj)) is not None), (None, None))
    if sd is None:
        keys = _first(obj.keys() if isinstance(obj, dict) else [type(obj).__name__])
        raise CheckpointError(f"--init {path}: not a format this script reads ({', '.join(formats)}); its keys: {keys}")
    own = model.state_dict()
    odd = [k for k, v in sd.items() if k in own and not torch.is_tensor(v)]  # other non-tensors (metadata): dropped
    if odd:
        raise CheckpointError(f"--init {path} ({name}): {odd[0]} is a {type(sd[odd[0]]).__name__}, not a tensor")
    sd = {k: v for k, v in sd.items() if torch.is_tensor(v)}
    for k in own:  # CRUCIAL: no backbone tensor may start fresh or be cut to fit (BN's step counter: unused)
        if k.startswith(backbone) and k not in sd and not k.endswith("num_batches_tracked"):
            raise CheckpointError(f"--init {path} ({name}): no tensor for the backbone's {k}")
        if k.startswith(backbone) and k in sd and sd[k].shape != own[k].shape:
            shapes = f"{tuple(sd[k].shape)}, the model's {tuple(own[k].shape)}"
            raise CheckpointError(f"--init {path} ({name}): {k} has shape {shapes}")
    unknown = [k for k in sd if k not in own]
    if unknown:
        raise CheckpointError(
            f"--init {path} ({name}): {unknown[0]} is not a tensor of this model ({len(unknown)} such)"
        )
    model.load_state_dict({k: v for k, v in sd.items() if v.shape == own[k].shape}, strict=False)

    def parts(keys):  # the top-level modules the keys belong to
        return sorted({k.split(".")[0] for k in keys}) or ["nothing"]

    loaded = [k for k in own if k in sd and sd[k].shape == own[k].shape]
    fresh = parts(k for k in own if k not in loaded and not k.endswith("num_batches_tracked"))
    return f"--init {path}: {name}; loaded {', '.join(parts(loaded))}; fresh: {', '.join(fresh)}"


def _first(keys, n: int = 5) -> str:
    keys = sorted(keys)
    more = f", +{len(keys) - n} more" if len(keys) > n else ""
    return "[" + ", ".join(keys[:n]) + more + "]"


def load_state_dict_strict(module: nn.Module, state_dict: Mapping[str, Any], what: str = "model") -> None:
    """Load with strict=True; on any key or shape mismatch raise a one-line CheckpointError listing them."""
    own = module.state_dict()
    missing, unexpected = own.keys() - state_dict.keys(), state_dict.keys() - own.keys()
    shapes = [
        f"{k}: ckpt {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(own.keys() & state_dict.keys())
        if torch.is_tensor(state_dict[k]) and torch.is_tensor(own[k]) and state_dict[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        parts = [f"missing {len(missing)} {_first(missing)}"] if missing else []
        parts += [f"unexpected {len(unexpected)} {_first(unexpected)}"] if unexpected else []
        more = f", +{len(shapes) - 5} more" if len(shapes) > 5 else ""
        parts += [f"shape mismatch {len(shapes)} [{', '.join(shapes[:5])}{more}]"] if shapes else []
        raise CheckpointError(f"{what}: state_dict does not match: " + "; ".join(parts))
    module.load_state_dict(state_dict, strict=True)


def state_dict_digest(state_dict: Mapping[str, Any]) -> str:
    """First 16 hex chars of a sha256 over sorted keys, dtypes, shapes and raw tensor bytes."""
    h = hashlib.sha256()
    for k in sorted(state_dict):
        v = state_dict[k]
        h.update(k.encode())
        if torch.is_tensor(v):
            h.update(f"{v.dtype}{tuple(v.shape)}".encode())
            # uint8 view reads raw bytes for any dtype (bf16 has no numpy equivalent)
            h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        else:
            h.update(repr(v).encode())
    return h.hexdigest()[:16]


class ArtifactCache:
    """Derived artifacts (e.g. extracted eval features) for one checkpoint digest + settings, kept in root/key,
    so an interrupted evaluation resumes without recomputing."""

    def __init__(self, root: PathLike, key: str):
        self.dir = Path(root) / key

    def path(self, name: str) -> Path:
        return self.dir / f"{name}.pt"

    def get(self, name: str) -> Optional[Any]:
        """The stored object, or None if it was never stored."""
        p = self.path(name)
        return load_checkpoint(p)["value"] if p.is_file() else None

    def put(self, name: str, obj: Any) -> None:
        save_checkpoint({"name": name, "value": obj}, self.path(name))
