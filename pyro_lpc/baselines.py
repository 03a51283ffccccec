"""Pyro's own amortised-inference training, for like-for-like comparisons with LPC.

``fit_svi`` trains the *same* model and guide as :func:`pyro_lpc.fit` with
``pyro.infer.SVI``: the VAE objective (``Trace_ELBO``, Kingma & Welling 2014)
or the IWAE bound (``RenyiELBO(alpha=0)`` with k particles, Burda et al. 2016),
and records the same kind of history and checkpoints.
"""
from __future__ import annotations

import os
import time
import warnings
from typing import List, Optional

import pyro
import torch
from pyro.infer import SVI, RenyiELBO, Trace_ELBO
from tqdm.auto import tqdm

from .checkpoint import CHECKPOINT, load_checkpoint, save_checkpoint
from .fit import FitResult, NonFiniteError, minibatches

OBJECTIVES = ("elbo", "iwae")


def fit_svi(
    model,
    guide,
    data,
    *,
    objective: str = "elbo",
    num_particles: int = 5,
    num_epochs: int = 1,
    optim=None,
    batch_size: Optional[int] = None,
    seed: Optional[int] = None,
    progress: bool = True,
    checkpoint_dir: Optional[str] = None,
    resume: bool = False,
    max_plate_nesting: int = 1,
) -> FitResult:
    r"""Train ``model`` and ``guide`` jointly with ``pyro.infer.SVI``.

    ``objective="elbo"``: :math:`E_q[\log p(x,z) - \log q(z|x)]` (one particle);
    ``"iwae"``: :math:`E[\log \frac1k \sum_j p(x,z_j)/q(z_j|x)]` with
    ``num_particles`` = k (vectorised over particles, so the model must be
    vectorisable with ``max_plate_nesting`` plates). History rows hold ``epoch``,
    ``iteration``, ``elbo`` (the objective per data point of the mini-batch) and
    ``time``.

    Example::

        >>> import pyro, pyro.distributions as dist, torch
        >>> from pyro_lpc.baselines import fit_svi
        >>> def model(x):
        ...     w = pyro.param("w", torch.ones(2))
        ...     with pyro.plate("data", x.shape[0]):
        ...         z = pyro.sample("z", dist.Normal(0.0, 1.0))
        ...         pyro.sample("x", dist.Normal(z[:, None] * w, 0.5).to_event(1), obs=x)
        >>> def guide(x):
        ...     loc = pyro.param("loc", torch.zeros(x.shape[0]))
        ...     with pyro.plate("data", x.shape[0]):
        ...         pyro.sample("z", dist.Normal(loc, 1.0))
        >>> result = fit_svi(model, guide, torch.randn(32, 2), batch_size=32, num_epochs=3,
        ...                  progress=False, seed=0)
        >>> len(result["elbo"])
        3
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"Unknown SVI objective {objective!r}; choose one of {list(OBJECTIVES)}.")
    if objective == "iwae":
        loss = RenyiELBO(alpha=0.0, num_particles=int(num_particles), vectorize_particles=True,
                         max_plate_nesting=max_plate_nesting)
    else:
        loss = Trace_ELBO()
    optim = optim or pyro.optim.Adam({"lr": 1e-3})
    svi = SVI(model, guide, optim, loss)
    optims = {"optim": optim}
    history: List[dict] = []
    start_epoch, elapsed = 0, 0.0
    path = os.path.join(checkpoint_dir, CHECKPOINT) if checkpoint_dir else None
    if seed is not None:
        pyro.set_rng_seed(seed)
    if resume:
        if path is None:
            raise ValueError("resume=True needs checkpoint_dir.")
        if os.path.exists(path):
            args, kwargs = next(iter(minibatches(data, batch_size)))
            checkpoint = load_checkpoint(path, model, guide, args, kwargs, optims)
            history.extend(checkpoint["history"])
            start_epoch, elapsed = checkpoint["epoch"], checkpoint["elapsed"]
        else:
            warnings.warn(f"resume=True but no checkpoint at {path}; starting from scratch.")
    iteration = len(history)
    clock = time.perf_counter() - elapsed
    bar = tqdm(total=None, disable=not progress, desc=f"svi-{objective}", unit="it")
    for epoch in range(start_epoch, num_epochs):
        for args, kwargs in minibatches(data, batch_size):
            value = svi.step(*args, **kwargs)
            size = args[0].shape[0] if args and torch.is_tensor(args[0]) else 1
            if not torch.isfinite(torch.tensor(value)):
                raise NonFiniteError(
                    f"Non-finite {objective} loss at iteration {iteration}; parameters hold the "
                    "values of that step's update, so restart from the last checkpoint.",
                    FitResult(list(history), {}),
                )
            history.append({"epoch": epoch, "iteration": iteration, "elbo": -value / size,
                            "time": time.perf_counter() - clock})
            iteration += 1
            bar.update(1)
            bar.set_postfix(epoch=epoch, elbo=f"{-value / size:.3f}", refresh=False)
        if path:
            save_checkpoint(path, epoch=epoch + 1, elapsed=time.perf_counter() - clock,
                            optims=optims, history=history)
    bar.close()
    return FitResult(history, {})
