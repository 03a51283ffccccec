r"""`fit`: learn a Pyro model's parameters with Langevin Predictive Coding, epoch by epoch.

A thin loop over [`LPC`][pyro_lpc.LPC] (one iteration per mini-batch) and
`run_epochs` (mini-batches, checkpoints, processes).
"""
from __future__ import annotations

from typing import Optional, Union

import pyro
import torch

from . import distributed
from .lpc import LPC, NonFiniteError
from .schedule import AdaptiveSteps, steps_schedule
from .training import FitResult, run_epochs


def fit(
    model,
    guide=None,
    data=None,
    *,
    num_epochs: int = 1,
    num_steps: Union[int, str, AdaptiveSteps] = 20,
    step_size: float = 1e-2,
    target_accept_prob: Optional[float] = None,
    global_step_size: Optional[float] = None,
    precondition: Optional[str] = "diagonal",
    adjust: bool = False,
    warm_start: str = "jeffreys",
    keep: Union[str, int, slice] = "last",
    optim=None,
    guide_optim=None,
    batch_size: Optional[int] = None,
    seed: Optional[int] = None,
    progress: bool = True,
    checkpoint_dir: Optional[str] = None,
    resume: bool = False,
    data_plate: Optional[str] = None,
    recorder=None,
    jit_compile: bool = False,
    jit_options: Optional[dict] = None,
    batch_args=None,
    persistent_chains: bool = False,
    batch_indices=None,
) -> FitResult:
    r"""Learn the parameters θ of a Pyro `model` by Langevin Predictive Coding: a loop of
    [`LPC.step`][pyro_lpc.LPC.step] over epochs and mini-batches, with a progress
    bar, checkpoints, `pyro.optim` LR schedulers stepped once per epoch and, under
    `torchrun`, data-parallel training ([`pyro_lpc.distributed`][pyro_lpc.distributed]).

    Each mini-batch: chains start from `guide` draws (or the prior when
    `guide=None`), take `num_steps` Langevin steps
    `z' = z - η P ∇U + sqrt(2ηP) ξ` on `U = -log p_θ(x, z)`, then θ takes one
    `optim` step on `-mean_k log p_θ(x, z_k)` over the kept samples and φ one
    `guide_optim` step on the warm-start objective. See `pyro_lpc.lpc` for how
    local and global latents, subsampled plates and scales are treated. The
    options shared with [`LPC`][pyro_lpc.LPC] are documented there in full.

    Args:
        model: a Pyro model; θ is every `pyro.param`/`pyro.module` it uses.
        guide: an amortised guide (or a [`WarmStart`][pyro_lpc.WarmStart]); φ is
            its parameters that are not also the model's. `None`: encoder-free.
        data: an iterable of batches (a tuple/list batch is passed as
            `model(*batch)`, a dict as `model(**batch)`, anything else as
            `model(batch)`) or a tensor split into shuffled mini-batches of
            `batch_size` each epoch.
        batch_args: maps each batch of an iterable `data` to the model's
            arguments, by the same rule (a tuple: positional, a dict: keyword, else
            one argument): `batch_args=lambda batch: batch[0]` trains `model(x)`
            on a `DataLoader` of `(image, label)` pairs, as Pyro's VAE example.
        num_steps: Langevin steps K per mini-batch: an int (0: θ steps on the
            guide's draws; needs a guide with the reverse or Jeffreys objective),
            `"auto"` ([`AdaptiveSteps`][pyro_lpc.schedule.AdaptiveSteps]: starts at 20,
            halves while the second half of the chains lowers the energy by less than
            1.5 nats per data point, doubles again above 3, down to 0 and up to 20)
            or an [`AdaptiveSteps`][pyro_lpc.schedule.AdaptiveSteps]. Models with global
            latents run at least one step (their persistent chain keeps moving).
        step_size (float): Langevin step size η of the local chains (the
            initial one with `target_accept_prob`).
        target_accept_prob (float): adapt η after every iteration so that the local
            chains' mean MALA acceptance probability tracks this value
            ([`StepSizeAdaptation`][pyro_lpc.schedule.StepSizeAdaptation]); `None`: η fixed.
        global_step_size (float): step size of the global chain, plain SGLD
            (default `step_size / N`, N the data plate's full size: a global
            posterior's curvature grows like N). `precondition` applies to the
            local chains.
        precondition: `"diagonal"` (shared by all chains, carried across
            mini-batches, constant within a chain), `"rmsprop"`/`"adam"` (the
            paper's per-chain forms) or `None`.
        adjust (bool): Metropolis-adjust the local chains (MALA).
        warm_start (str): the guide's objective, `"forward"`, `"reverse"`
            or `"jeffreys"` (ignored when `guide` is a `WarmStart`).
        keep: which samples feed θ: `"last"` (default), `"all"`, an int
            burn-in or a `slice` of the K samples (`slice(4, None, 5)`: every 5th).
            Each kept sample costs one more model gradient: on MNIST (K = 20)
            `"last"` halves an iteration's cost; per iteration it learns more
            slowly early on, per second it is ahead (docs: Benchmarks).
        optim: a `pyro.optim` optimiser for θ (default Adam, lr 1e-3); a `pyro.optim`
            LR scheduler is stepped after every epoch.
        guide_optim: the same for φ (default Adam, lr 1e-3).
        batch_size (int): mini-batch size (per process under `torchrun`).
        seed (int): seeds Pyro's RNGs before training (rank `r` of several
            processes: an independent stream derived from it).
        checkpoint_dir (str): save a checkpoint there after each epoch.
        resume (bool): continue from the checkpoint in `checkpoint_dir`.
        data_plate (str): name of the plate over data points (default: inferred).
        recorder: a [`ChainRecorder`][pyro_lpc.diagnostics.ChainRecorder] that records
            several chains of chosen data points after each epoch, for ArviZ.
        jit_compile (bool): record the local chains' energy *and its gradient*
            once per batch shape as one graph ([`pyro_lpc.compiled`][pyro_lpc.compiled]) and run the
            recording at every step instead of re-running the model under Pyro and
            autograd. The model's control flow must depend on shapes only. Not used
            while global latents move with the local chains.
        jit_options (dict): with `jit_compile`, also compile the recording with
            `torch.compile(**jit_options)` (`{}`: Inductor's defaults, some seconds
            to compile per batch shape; `{"mode": "reduce-overhead"}`: CUDA graphs).
        persistent_chains (bool): keep each data point's local chain state from one epoch
            to the next, by dataset index, and start each visit from it or from a fresh
            guide draw by an independence Metropolis choice ([`pyro_lpc.persistent`][pyro_lpc.persistent]):
            a point seen E times has had E·K steps. The indices: a tensor's rows (fit
            knows its order), `batch_indices`, or a subsampled data plate's. Memory: one
            copy of the local latents per data point (MNIST, 50 latents: 12 MB); the
            states are in the checkpoints and in `FitResult.sampler_state["chain_store"]`.
        batch_indices: with `persistent_chains` and an iterable `data`, maps each batch
            (before `batch_args`) to its data points' indices in the dataset, a 1-d
            integer tensor: with a `DataLoader` over a dataset whose items are
            `(x, index)`, `batch_args=lambda b: b[0], batch_indices=lambda b: b[1]`.

    Returns:
        a [`FitResult`][pyro_lpc.FitResult] with the per-iteration history.

    Example:
        ```python
        >>> import pyro, pyro.distributions as dist, torch
        >>> from pyro_lpc import fit
        >>> def model(x):
        ...     w = pyro.param("w", torch.ones(2))
        ...     with pyro.plate("data", x.shape[0]):
        ...         z = pyro.sample("z", dist.Normal(0.0, 1.0))
        ...         pyro.sample("x", dist.Normal(z[:, None] * w, 0.5).to_event(1), obs=x)
        >>> result = fit(model, None, torch.randn(64, 2), batch_size=32, num_steps=5,
        ...              progress=False, seed=0)
        >>> len(result.history)
        2

        ```
    """
    if recorder is not None and steps_schedule(num_steps).max_steps == 0 and recorder.num_steps is None:
        raise ValueError("num_steps=0 runs no chains: give the ChainRecorder its own num_steps to record.")
    if batch_indices is not None and not persistent_chains:
        raise ValueError("batch_indices gives persistent chains their data points' indices; "
                         "pass persistent_chains=True (or leave batch_indices out).")
    if batch_indices is not None and torch.is_tensor(data):
        raise ValueError("batch_indices maps the batches of an iterable data; fit splits a tensor itself and "
                         "knows each row's index.")
    group = distributed.replicas()
    group.check_same("Whether fit got a checkpoint_dir and a recorder",
                     (checkpoint_dir is not None, recorder is not None))  # both run collectives
    base_seed, generator = group.streams(seed)
    lpc = LPC(model, guide, optim or pyro.optim.Adam({"lr": 1e-3}), guide_optim=guide_optim, num_steps=num_steps,
              step_size=step_size, target_accept_prob=target_accept_prob, global_step_size=global_step_size,
              precondition=precondition, adjust=adjust, warm_start=warm_start, keep=keep, data_plate=data_plate,
              jit_compile=jit_compile, jit_options=jit_options, generator=generator,
              persistent_chains=persistent_chains)

    def step(args, kwargs, iteration, epoch, history):
        lpc.iteration = iteration  # the loop's count (a resumed run's too)
        try:
            return {"epoch": epoch, **lpc.step(*args, **kwargs)}
        except NonFiniteError as error:
            error.result = FitResult(list(history), lpc.state_dict())
            raise

    history = run_epochs(
        step, data, batch_size=batch_size, num_epochs=num_epochs, group=group, base_seed=base_seed,
        generator=generator, progress=progress, checkpoint_dir=checkpoint_dir, resume=resume, model=model,
        guide=lpc.warm, optims={"optim": lpc.optim, "guide_optim": lpc.guide_optim}, state=lpc,
        on_epoch=None if recorder is None else lambda epoch: recorder.record(lpc, epoch), desc="fit", key="log_joint", batch_args=batch_args,
        indexed=persistent_chains, batch_indices=batch_indices,
    )
    return FitResult(history, lpc.state_dict())
