"""Pyro's own amortised-inference training, for like-for-like comparisons with LPC.

`fit_svi` trains the *same* model and guide as [`pyro_lpc.fit`][pyro_lpc.fit.fit] with
`pyro.infer.SVI`: the VAE objective (`Trace_ELBO`, Kingma & Welling 2014)
or the IWAE bound (`RenyiELBO(alpha=0)` with k particles, Burda et al. 2016),
and records the same kind of history and checkpoints.
"""
from __future__ import annotations

import math
from typing import Optional

import pyro
from pyro.infer import SVI, RenyiELBO, Trace_ELBO

from . import distributed
from .checkpoint import register_params
from .lpc import NonFiniteError
from .training import FitResult, run_epochs
from .potential import batch_shapes, find_data_plate, num_data

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
    batch_args=None,
) -> FitResult:
    r"""Train `model` and `guide` jointly with `pyro.infer.SVI`.

    `objective="elbo"`: $E_q[\log p(x,z) - \log q(z|x)]$ (one particle);
    `"iwae"`: $E[\log \frac1k \sum_j p(x,z_j)/q(z_j|x)]$ with
    `num_particles` = k (vectorised over particles, so the model must be
    vectorisable with `max_plate_nesting` plates). History rows hold `epoch`,
    `iteration`, `elbo` and `time`. `elbo` is `-loss / N`, N the data
    plate's full size: Pyro scales a subsampled plate's terms by N/B, so this
    estimates the full-data objective per data point, as `fit`'s `log_joint`
    (N is read from one trace of model and guide per distinct batch shape).
    `data`, `batch_args` and the checkpoint arguments are as for
    [`pyro_lpc.fit`][pyro_lpc.fit.fit].

    Example:
        ```python
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

        ```
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
    sizes = {}  # N by batch shapes

    def step(args, kwargs, iteration, epoch, history):
        value = svi.step(*args, **kwargs)
        if not math.isfinite(value):
            raise NonFiniteError(
                f"Non-finite {objective} loss at iteration {iteration}; the parameters hold that "
                "step's update, so restart from the last checkpoint.",
                FitResult(list(history), {}),
            )
        shapes = repr(batch_shapes(args, kwargs))
        if shapes not in sizes:
            sizes[shapes] = num_data(find_data_plate(register_params(model, guide, args, kwargs)))
        return {"epoch": epoch, "iteration": iteration, "elbo": -value / sizes[shapes]}

    group = distributed.replicas()
    if group.world_size > 1:
        raise NotImplementedError(
            f"fit_svi runs in one process; this is rank {group.rank} of {group.world_size}. Train the "
            "SVI baselines without torchrun (distributed training is supported by pyro_lpc.fit)."
        )
    base_seed, generator = group.streams(seed)
    history = run_epochs(
        step, data, batch_size=batch_size, num_epochs=num_epochs, group=group, base_seed=base_seed,
        generator=generator, progress=progress,
        checkpoint_dir=checkpoint_dir, resume=resume, model=model, guide=guide,
        optims={"optim": optim}, desc=f"svi-{objective}", key="elbo", batch_args=batch_args,
    )
    return FitResult(history, {})
