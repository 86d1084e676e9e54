"""Checkpoint helpers: atomic save, safe clear-error load (a path, URL or dict), strict state_dict loading, weight
digests, artifact cache."""

import argparse
import hashlib
import os
import pickle
import re
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch
import torch.nn as nn

PathLike = Union[str, os.PathLike]


class CheckpointError(Exception):
    """A checkpoint is missing, unreadable or does not fit the model. The message is a single line."""


# CRUCIAL: every file is loaded with weights_only=True: tensors, dicts, lists, tuples, strings and numbers, nothing
# that runs code. The one type more that official containers need: MAE's and TEC's checkpoints keep their
# argparse.Namespace of training args next to the weights.
torch.serialization.add_safe_globals([argparse.Namespace])


def load_error(source, e: Exception) -> CheckpointError:
    """The one-line error for a failed torch.load: a file that weights_only=True refused (naming the type it asked
    for: a pickle that would run code), or one that cannot be read at all."""
    text = " ".join(str(e).split())
    if isinstance(e, pickle.UnpicklingError) and "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:")[1].split(" Check the documentation")[0].strip()
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
