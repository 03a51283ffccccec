"""Atomic training checkpoints: parameters, optimiser states, RNG states, history.

A checkpoint is written to a temporary file in the same folder and renamed
over the previous one, so a crash mid-write leaves the last checkpoint intact.
Loading copies parameter values *in place* into the live param store (after
running model and guide once so every `pyro.module` has registered its
parameters), so the user's `nn.Module` objects see the restored values, and
restores the RNG states last: the resumed run continues bit for bit.
"""
from __future__ import annotations

import os
import random
import tempfile
from typing import Dict

import numpy as np
import pyro
import pyro.poutine as poutine
import torch
from torch.distributions import transform_to

from .potential import guide_and_model_traces

CHECKPOINT = "checkpoint.pt"


def save_rng() -> dict:
    """The torch (CPU and CUDA), Python and NumPy random states."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str, *, epoch: int, elapsed: float, optims: Dict[str, "pyro.optim.PyroOptim"],
                    history: list, **extra) -> None:
    """Write the param store, optimiser and RNG states, history and `extra` atomically."""
    state = {
        "epoch": epoch,
        "elapsed": elapsed,
        "params": pyro.get_param_store().get_state(),
        "optims": {name: optim.get_state() for name, optim in optims.items()},
        "rng": save_rng(),
        "history": history,
        **extra,
    }
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".checkpoint-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def checkpoint_path(checkpoint_dir: str) -> str:
    """The checkpoint file in `checkpoint_dir`, checked before training: a `ValueError`
    when the folder (or a folder above it) exists but is not a directory. Creates nothing."""
    folder = os.path.abspath(checkpoint_dir)
    existing = folder
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(
            f"checkpoint_dir={checkpoint_dir!r} cannot be a folder: {existing} exists and is not a directory."
        )
    path = os.path.join(folder, CHECKPOINT)
    if os.path.isdir(path):
        raise ValueError(f"checkpoint_dir={checkpoint_dir!r} holds a directory {path} where the checkpoint file goes.")
    return path


def read_checkpoint(path: str) -> dict:
    """Read a checkpoint, or raise a `ValueError` saying it is unreadable (nothing is changed)."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        checkpoint["epoch"], checkpoint["params"]["params"], checkpoint["optims"]
    except Exception as error:
        raise ValueError(
            f"Cannot resume: the checkpoint {path} is corrupted or not a pyro-lpc checkpoint "
            f"({type(error).__name__}: {error}). Nothing was changed; remove it to start afresh."
        ) from error
    return checkpoint


def to_device(obj, device):
    """`obj` (tensors in dicts, lists, tuples and named tuples) with every tensor on `device`."""
    if torch.is_tensor(obj):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(to_device(v, device) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


def register_params(model, guide, args, kwargs) -> poutine.Trace:
    """Run `guide` and `model` once on a batch so that every `pyro.param` and
    `pyro.module` is in the param store, leaving the random streams untouched.
    Returns the model's trace (replayed on the guide's draws)."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.no_grad(), poutine.block(), torch.random.fork_rng(devices=devices):
        return guide_and_model_traces(model, guide, args, kwargs)[1]


def load_checkpoint(path: str, model, guide, args, kwargs, optims: Dict[str, "pyro.optim.PyroOptim"]) -> dict:
    """Restore a checkpoint into the live param store, `optims` and the RNGs.

    `args`/`kwargs` are one batch on which model and guide are run once to
    register their parameters. Returns the checkpoint dict (epoch, history, ...),
    its other tensors moved to the device of the model's parameters.
    """
    checkpoint = read_checkpoint(path)
    register_params(model, guide, args, kwargs)
    store = pyro.get_param_store()
    current = dict(store.named_parameters())
    with torch.no_grad():
        for name, value in checkpoint["params"]["params"].items():
            if name in current:
                current[name].copy_(value.to(current[name].device))
            else:
                constraint = checkpoint["params"]["constraints"][name]
                store.setdefault(name, transform_to(constraint)(value), constraint)
    for name, optim in optims.items():
        optim.set_state(checkpoint["optims"][name])
    restore_rng(checkpoint["rng"])
    device = next(iter(current.values())).device if current else torch.device("cpu")
    cpu_only = ("params", "optims", "rng", "rng_by_rank", "generator")
    return {k: v if k in cpu_only else to_device(v, device) for k, v in checkpoint.items()}
