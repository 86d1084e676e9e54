"""The state hand-off of the DDP-equality helpers (tests/*_ddp_step.py): each compared step starts from one state.

A K-rank DDP run and its one-process reference start step 1 from the same seeded init, but after the optimizer step
their weights agree only to float32 rounding (the reference sums the gradient in another order). A ReLU network's
gradient is not continuous: a pre-activation within rounding of 0 switches its gate, and the gradient of every layer
before it jumps (found in SwAV's step 2: one gate of 4,096 in layer4.1 moved conv1's gradient by 0.3% of its largest
entry; a 1e-7 relative nudge of the weights does the same in one process). So rank 0 of the DDP run writes its state
after step 1 (model with buffers, optimizer) to DIR/state1-TAG.pt, and the reference, given --state1-dir DIR, takes
step 2 from that state instead of its own. The reference waits for the file, so both runs can start together."""

import os
import time
from pathlib import Path

import torch


def hand_off(tag: str, model: torch.nn.Module, opt, rank: int, world_size: int, out: Path, state_dir) -> None:
    """Call after step 1. DDP rank 0: write the state (atomically); reference with state_dir: load it (waits up to 5
    minutes for it to appear); otherwise nothing."""
    if world_size > 1 and rank == 0:
        torch.save(dict(model=model.state_dict(), opt=opt.state_dict()), out / f"state1-{tag}.tmp")
        os.replace(out / f"state1-{tag}.tmp", out / f"state1-{tag}.pt")
    elif world_size == 1 and state_dir is not None:
        path, deadline = Path(state_dir) / f"state1-{tag}.pt", time.time() + 300
        while not path.exists() and time.time() < deadline:
            time.sleep(0.05)
        state = torch.load(path)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])


def sample(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor when small, else 4,096 fixed entries of it (the same in every process): the saved files stay
    small (every tensor of a ResNet-18 in full, several times over, is hundreds of MB)."""
    if t.numel() <= 4096:
        return t.detach().clone()
    idx = torch.randperm(t.numel(), generator=torch.Generator().manual_seed(t.numel()))[:4096]
    return t.detach().flatten()[idx]
