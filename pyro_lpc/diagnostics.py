r"""Chain diagnostics with ArviZ: fit-time Langevin chains and `PCLangevin` runs.

During `fit` each data point gets one short chain per mini-batch, which says
nothing about convergence on its own. A [`ChainRecorder`][pyro_lpc.diagnostics.ChainRecorder] therefore runs,
after every epoch, `num_chains` independent chains for each of a few chosen
data points with the run's current sampler (same θ, warm start,
preconditioner, step size and K) and keeps every step, so that
`arviz.rhat`, `arviz.ess`, `arviz.summary` and
`arviz.plot_trace` apply. Recording neither changes the training's random
stream nor its sampler state.

Local latents only are recorded, with the global latents held at the values
of their persistent chain (which the recorded points alone must not move).
The recorded points are passed to the model as one batch of
`num_chains × B` copies, so the model's data plate must be sized by its
batch (`pyro.plate("data", x.shape[0])`).
"""
from __future__ import annotations

from typing import Dict, Optional, Union

import arviz
import torch
from pyro.infer import MCMC

from .checkpoint import restore_rng, save_rng


class ChainRecorder:
    """Record `num_chains` Langevin chains per chosen data point after each epoch.

    Args:
        batch: the chosen data points, a tensor `(B, ...)` or a tuple of
            tensors passed as `model(*batch)`.
        num_chains (int): independent chains per data point.
        num_steps (int): steps to record (default: the `fit` run's K, its
            largest with an adaptive schedule).

    After `fit(..., recorder=recorder)`, `recorder.records[epoch]` is an
    `arviz.InferenceData` with dims `(chain, draw, point, ...)`.

    Example:
        ```python
        >>> import pyro, pyro.distributions as dist, torch, arviz
        >>> from pyro_lpc import fit
        >>> from pyro_lpc.diagnostics import ChainRecorder
        >>> def model(x):
        ...     with pyro.plate("data", x.shape[0]):
        ...         z = pyro.sample("z", dist.Normal(0.0, 1.0))
        ...         pyro.sample("x", dist.Normal(z, 0.5), obs=x)
        >>> x = torch.randn(64)
        >>> recorder = ChainRecorder(x[:3], num_chains=4, num_steps=50)
        >>> _ = fit(model, None, x, batch_size=32, num_steps=5, recorder=recorder, progress=False)
        >>> arviz.rhat(recorder.records[0])["z"].shape
        (3,)

        ```
    """

    def __init__(self, batch, num_chains: int = 4, num_steps: Optional[int] = None):
        self.args = tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)
        if not self.args or not all(torch.is_tensor(a) for a in self.args):
            raise TypeError("ChainRecorder needs the chosen data points as a tensor or a tuple of tensors.")
        if int(num_chains) < 2:
            raise ValueError(f"num_chains must be at least 2 for R-hat, got {num_chains!r}.")
        self.num_chains = int(num_chains)
        self.num_steps = num_steps
        self.records: Dict[int, arviz.InferenceData] = {}

    def record(self, lpc, label: int) -> arviz.InferenceData:
        """Run the chains with `lpc`'s sampler (an [`LPC`][pyro_lpc.LPC], through
        [`sample_chains`][pyro_lpc.LPC.sample_chains]) and store them under `label`; the
        training's random stream is restored afterwards."""
        size = self.args[0].shape[0]
        replicated = tuple(a.repeat((self.num_chains,) + (1,) * (a.dim() - 1)) for a in self.args)
        rng = save_rng()
        try:
            energy, info = lpc.sample_chains(*replicated, num_steps=self.num_steps, keep="all")
        finally:
            restore_rng(rng)
        samples = info.kept
        posterior = {}
        for name in energy.local:
            steps = torch.stack([s[name].movedim(energy.chain_axis[name], 0) for s in samples])
            steps = steps.reshape((len(samples), self.num_chains, size) + steps.shape[2:])
            posterior[name] = steps.transpose(0, 1).cpu().numpy()
        idata = arviz.from_dict(
            posterior=posterior,
            dims={name: ["point"] for name in posterior},
            attrs={"epoch": label, "source": "pyro_lpc.fit"},
        )
        self.records[label] = idata
        return idata


def to_inference_data(source: Union["MCMC", ChainRecorder], label: Optional[int] = None):
    """ArviZ `InferenceData` of a `pyro.infer.MCMC` run (e.g. with `PCLangevin`,
    through `arviz.from_pyro`) or of a recorder's chains (the last epoch by default)."""
    if isinstance(source, ChainRecorder):
        if not source.records:
            raise ValueError("The recorder holds no chains yet: pass it to fit(..., recorder=...).")
        return source.records[max(source.records) if label is None else label]
    return arviz.from_pyro(source, log_likelihood=False)
