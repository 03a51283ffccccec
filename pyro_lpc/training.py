r"""The epoch loop shared by [`fit`][pyro_lpc.fit.fit] and [`fit_svi`][pyro_lpc.baselines.fit_svi]:
mini-batches, sharding over processes, checkpoints and resuming, the progress bar."""
from __future__ import annotations

import inspect
import numbers
import os
import time
import warnings
from typing import List, Optional

import torch
from pyro.optim.lr_scheduler import PyroLRScheduler
from tqdm import tqdm

from .checkpoint import checkpoint_path, load_checkpoint, restore_rng, save_checkpoint, save_rng
from .persistent import INDICES
from .potential import batch_shapes
from .warm_start import WarmStart


class FitResult:
    """What `fit` did: `history` holds one dict per iteration with `epoch`,
    `iteration`, `log_joint` (mean over kept samples of the scaled
    mini-batch `log p(x, z)` divided by the number of data points N, i.e. an
    estimate of the full-data log-joint per data point), `guide_loss`, `accept_rate` (MALA or
    `target_accept_prob` only), `step_size`, `num_steps` (this iteration's K), `energy_drop`
    and `late_energy_drop` (mean `U(z_0) - U(z_K)` and `U(z_{K/2}) - U(z_K)` of the local
    chains, `None` without chains; [`pyro_lpc.schedule`][pyro_lpc.schedule]), `divergences`
    (Langevin steps rejected as non-finite), with `persistent_chains` `stored_starts` (the
    fraction of chains that started from their stored state) and `time` (seconds since the
    start, resumed runs included); `fit_svi`'s rows hold `elbo` instead.
    `sampler_state` is [`LPC.state_dict`][pyro_lpc.LPC.state_dict] at the end: the shared diagonal
    preconditioner, the global chain's position and values, the step sizes, the iteration, the
    global chain's noise generator, the schedule and the step-size adaptation, and with
    `persistent_chains` the stored chain states (`chain_store`: `positions` by site, `seen`).

    Example:
        ```python
        >>> result = FitResult([{"iteration": 0, "log_joint": -3.0}, {"iteration": 1, "log_joint": -2.5}], {})
        >>> result["log_joint"]
        [-3.0, -2.5]

        ```
    """

    def __init__(self, history: List[dict], sampler_state: dict):
        self.history = history
        self.sampler_state = sampler_state

    def __getitem__(self, key: str) -> List[float]:
        """One history column, e.g. `result["log_joint"]`."""
        return [row[key] for row in self.history]

    def __repr__(self):
        last = self.history[-1] if self.history else {}
        return f"FitResult({len(self.history)} iterations, last={last})"


def minibatches(data, batch_size, shuffle=True, generator: Optional[torch.Generator] = None, batch_args=None,
                indexed: bool = False, batch_indices=None):
    """Mini-batches of `data` for one epoch, as `(args, kwargs)`: a tensor is split
    along dim 0 (shuffled with `generator`, a CPU generator, unless `shuffle=False`);
    an iterable yields tuples (`model(*batch)`), dicts (`model(**batch)`) or
    single arguments, each first mapped by `batch_args(batch)` when given. With
    `indexed`, `kwargs["data_indices"]` holds the batch's dataset indices (for
    persistent chains): a tensor's rows, or `batch_indices(batch)` of an iterable's batch."""
    if torch.is_tensor(data):
        if batch_size is None:
            raise ValueError("data is a tensor: give batch_size to split it into mini-batches.")
        order = torch.randperm(data.shape[0], generator=generator) if shuffle else torch.arange(data.shape[0])
        for idx in order.to(data.device).split(batch_size):
            yield (data[idx],), ({INDICES: idx} if indexed else {})
        return
    for raw in data:
        batch = raw if batch_args is None else batch_args(raw)
        if isinstance(batch, dict):
            args, kwargs = (), dict(batch)
        elif isinstance(batch, (tuple, list)):
            args, kwargs = tuple(batch), {}
        else:
            args, kwargs = (batch,), {}
        if indexed and batch_indices is not None:
            kwargs[INDICES] = batch_indices(raw)
        yield args, kwargs


def run_epochs(step, data, *, batch_size, num_epochs, group, base_seed, generator, progress, checkpoint_dir,
               resume, model, guide, optims, state=None, on_epoch=None, desc="fit", key="log_joint",
               batch_args=None, indexed=False, batch_indices=None) -> List[dict]:
    """The epoch loop shared by [`fit`][pyro_lpc.fit.fit] and [`fit_svi`][pyro_lpc.baselines.fit_svi].

    `step(args, kwargs, iteration, epoch, history)` trains on one mini-batch and
    returns its history row (`time` is added here). Deals this rank its share
    of each epoch (`group.shard`; a tensor is shuffled with `generator`; an
    iterable's batches mapped by `batch_args`), resumes from and writes (rank 0)
    a checkpoint after each epoch (params, `optims`, every rank's RNG states,
    `generator`, history and `state.state_dict()`), and shows a progress bar
    of `key` on rank 0. With `indexed` each batch's dataset indices ride in its keyword
    `data_indices` ([`minibatches`][pyro_lpc.training.minibatches]). Bad inputs are refused before
    anything is trained or written.
    """
    _check_inputs(data, num_epochs, batch_args)
    history: List[dict] = []
    start_epoch, elapsed = 0, 0.0
    path = checkpoint_path(checkpoint_dir) if checkpoint_dir else None
    def epoch_batches(epoch):
        batches = minibatches(data, batch_size * group.world_size if batch_size else None, generator=generator,
                              batch_args=batch_args, indexed=indexed, batch_indices=batch_indices)
        return group.shard(batches, data, epoch)

    if resume:
        if path is None:
            raise ValueError("resume=True needs checkpoint_dir.")
        # rank 0 decides (a rank that cannot read the checkpoint then fails instead of starting afresh)
        if group.broadcast_object(os.path.exists(path) if group.is_main else None):
            args, kwargs = next(iter(minibatches(data, batch_size, shuffle=False, batch_args=batch_args)))
            _check_call(model, guide, args, kwargs)
            checkpoint = load_checkpoint(path, model, guide, args, kwargs, optims)
            if state is not None:
                state.load_state_dict(checkpoint["sampler"])
            history.extend(checkpoint["history"])
            start_epoch, elapsed = checkpoint["epoch"], checkpoint["elapsed"]
            _restore_streams(checkpoint, group, generator, start_epoch)
        else:
            warnings.warn(f"resume=True but no checkpoint at {path}; starting from scratch.")
    iteration = first = len(history)
    clock = time.perf_counter() - elapsed
    bar = tqdm(total=group.num_batches(data, batch_size) * num_epochs or None, initial=iteration,
               disable=not (progress and group.is_main), desc=desc, unit="it")
    for epoch in range(start_epoch, num_epochs):
        epoch_start = len(history)
        for args, kwargs in epoch_batches(epoch):
            if iteration == first:
                _check_call(model, guide, args, {k: v for k, v in kwargs.items() if not (indexed and k == INDICES)})
            row = step(args, kwargs, iteration, epoch, history)
            row["time"] = time.perf_counter() - clock
            history.append(row)
            iteration += 1
            bar.update(1)
            bar.set_postfix(epoch=epoch, **{key: f"{row[key]:.3f}"}, refresh=False)
        if iteration == first:
            raise ValueError(f"data yielded no mini-batch in epoch {epoch}: nothing was trained or written "
                             "(an iterator is used up after one pass; give a list or a DataLoader).")
        step_schedulers(optims, [row[key] for row in history[epoch_start:]])
        if on_epoch is not None:
            on_epoch(epoch)
        if path:
            extra = {} if state is None else {"sampler": state.state_dict()}
            rng_by_rank = group.gather_objects(save_rng())
            if group.is_main:
                save_checkpoint(path, epoch=epoch + 1, elapsed=time.perf_counter() - clock,
                                optims=optims, history=history, rng_by_rank=rng_by_rank, base_seed=base_seed,
                                generator=generator.get_state(), **extra)
    bar.close()
    return history


def step_schedulers(optims: dict, figures: List[float]) -> None:
    """After an epoch, step each distinct `pyro.optim` learning-rate scheduler among `optims` once
    (`ReduceLROnPlateau` on the epoch's mean loss, minus the mean of `figures`: the epoch's
    log-joints or ELBOs per data point)."""
    stepped = set()
    for optim in optims.values():
        if not isinstance(optim, PyroLRScheduler) or id(optim) in stepped:
            continue
        stepped.add(id(optim))
        if issubclass(optim.pt_scheduler_constructor, torch.optim.lr_scheduler.ReduceLROnPlateau):
            optim.step(-sum(figures) / len(figures))
        else:
            optim.step()


def _check_inputs(data, num_epochs, batch_args) -> None:
    """Refuse inputs that would train nothing or fail late."""
    if not isinstance(num_epochs, numbers.Integral) or isinstance(num_epochs, bool) or num_epochs < 1:
        raise ValueError(f"num_epochs must be a positive integer, got {num_epochs!r}.")
    if data is None:
        raise ValueError("data is None: give an iterable of batches or a tensor with batch_size.")
    if batch_args is not None and not callable(batch_args):
        raise TypeError(f"batch_args must be a callable mapping one batch to the model's arguments, "
                        f"got {type(batch_args).__name__}.")
    if torch.is_tensor(data):
        if data.dim() == 0:
            raise ValueError("data is a 0-dimensional tensor: a tensor is split into mini-batches along dim 0.")
        if data.shape[0] == 0:
            raise ValueError(f"data is an empty tensor of shape {tuple(data.shape)}: no data point to train on.")
        if batch_args is not None:
            raise ValueError("batch_args maps the batches of an iterable data; each mini-batch of a tensor "
                             "is passed as model(x).")
        return
    try:
        size = len(data)
    except TypeError:  # an iterator: found empty when its first epoch yields nothing
        return
    if size == 0:
        raise ValueError(f"data ({type(data).__name__}) has no mini-batch (length 0): nothing to train on.")


def _check_call(model, guide, args, kwargs) -> None:
    """A `TypeError` naming `batch_args` when a batch's arguments do not fit the
    signature of `model` or `guide` (a loader's `(image, label)` pairs for `model(x)`)."""
    guide = guide.guide if isinstance(guide, WarmStart) else guide
    for role, fn in (("model", model), ("guide", guide)):
        try:
            signature = inspect.signature(fn)
        except (TypeError, ValueError):  # None, or a callable without a signature
            continue
        try:
            signature.bind(*args, **kwargs)
        except TypeError as error:
            raise TypeError(
                f"The batch gives the {role} {len(args)} positional argument(s) of shape(s) "
                f"{batch_shapes(args, {})} and keyword argument(s) {sorted(kwargs)}, which "
                f"{getattr(fn, '__qualname__', role)}{signature} does not take ({error}). A tuple or list batch "
                f"is passed as {role}(*batch), a dict as {role}(**batch); map each batch to the model's "
                "arguments with batch_args=, e.g. batch_args=lambda batch: batch[0] for (image, label) pairs."
            ) from None


def _restore_streams(checkpoint, group, generator, epoch):
    """Continue every rank's random streams from a checkpoint: bit for bit under the
    same world size, from fresh streams derived from the run's seed under another."""
    if "generator" in checkpoint:
        generator.set_state(checkpoint["generator"].cpu())
    by_rank = checkpoint.get("rng_by_rank", [checkpoint["rng"]])
    if len(by_rank) == group.world_size:
        restore_rng(by_rank[group.rank])
    else:
        group.reseed(checkpoint.get("base_seed", 0), epoch)
