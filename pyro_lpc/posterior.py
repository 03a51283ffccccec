r"""Posterior samples of a (learned) model's latents for given data, shaped for `pyro.infer.Predictive`.

[`infer_posterior`][pyro_lpc.posterior.infer_posterior] runs one Langevin chain per data point
(the local latents, inside the data plate) with the model's current parameters, warm-started by
the guide's draws (or the prior's), exactly as [`LPC`][pyro_lpc.LPC] does during training —
but longer: a warm-up that adapts the step size $\eta$ (Robbins–Monro on the MALA acceptance
probability) and the shared diagonal preconditioner $P$, then `num_samples` steps with both
frozen, so MALA (the default) leaves each data point's posterior $p(z_i \mid x_i)$ exactly
invariant. Global latents, if any, move jointly as one unadjusted chain (their energy is the
whole batch's, as in training), and every step is then unadjusted.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import chains, langevin
from .lpc import check_sites, draw_starts, prototype_trace
from .potential import PyroEvaluation, SplitEnergy
from .schedule import StepSizeAdaptation
from .warm_start import WarmStart

#: Warm-up steps between two step-size updates.
ADAPTATION_WINDOW = 10


class PosteriorSamples(dict):
    """Posterior samples `{site: tensor}` with a leading sample dimension (pass it to
    `pyro.infer.Predictive(model, posterior_samples=...)`), and what the chains reported.

    Attributes:
        accept_rate: mean MALA acceptance probability of the sampling steps (a diagnostic of the
            discretisation error under ULA).
        divergences: sampling steps in which a proposal was rejected as non-finite.
        step_size: the step size η the warm-up adapted and the sampling used.
    """

    accept_rate: float
    divergences: int
    step_size: float


def infer_posterior(model, guide=None, *args, num_samples: int = 100, warmup_steps: int = 100,
                    step_size: float = 0.1, adjust: Optional[bool] = None,
                    target_accept_prob: float = langevin.MALA_TARGET_ACCEPT, precondition: Optional[str] = "diagonal",
                    data_plate: Optional[str] = None, **kwargs) -> PosteriorSamples:
    r"""Draw `num_samples` posterior samples of `model`'s latents given the data in `args`/`kwargs`.

    Args:
        model: a Pyro model; its parameters are used as they are in Pyro's param store (the
            learned ones after [`fit`][pyro_lpc.fit.fit]).
        guide: a guide (or [`WarmStart`][pyro_lpc.WarmStart]) whose draws start the chains; `None`:
            the prior's draws.
        *args: the model's arguments (the data).
        num_samples (int): steps kept after the warm-up: one sample per step.
        warmup_steps (int): steps that adapt η and the diagonal preconditioner, discarded.
        step_size (float): the initial η.
        adjust (bool): MALA (`True`, the default where every latent is local) or ULA.
        target_accept_prob (float): the acceptance probability the warm-up tunes η towards.
        precondition: `"diagonal"` (shared by all chains, frozen while sampling), `None`, or
            the paper's per-chain `"rmsprop"`/`"adam"` (ULA only).
        data_plate (str): the plate over data points (default: the outermost plate shared by the
            observed sites).
        **kwargs: the model's (and the guide's) keyword arguments. For partly observed data, a
            model whose likelihood is masked (`.mask(mask)`, `poutine.mask`) gets chains on
            $p(z_i \mid x_{i,\mathrm{obs}})$, e.g. `infer_posterior(vae.model, vae.guide, x, mask=mask)`.

    Returns:
        A [`PosteriorSamples`][pyro_lpc.posterior.PosteriorSamples] dict: every latent site's
        constrained values, shaped `(num_samples,) + site shape`.

    Example:
        ```python
        >>> import pyro, pyro.distributions as dist, torch
        >>> from pyro.infer import Predictive
        >>> from pyro_lpc import infer_posterior
        >>> def model(x=None):
        ...     with pyro.plate("data", 2):
        ...         z = pyro.sample("z", dist.Normal(0.0, 1.0))
        ...         return pyro.sample("x", dist.Normal(z, 0.5), obs=x)
        >>> samples = infer_posterior(model, None, torch.tensor([0.0, 2.0]), num_samples=500)
        >>> samples["z"].shape
        torch.Size([500, 2])
        >>> Predictive(model, posterior_samples=samples)()["x"].shape   # new x given the posterior
        torch.Size([500, 2])

        ```
    """
    if int(num_samples) < 1 or int(warmup_steps) < 0:
        raise ValueError(f"num_samples must be positive and warmup_steps non-negative, got {num_samples!r} and "
                         f"{warmup_steps!r}.")
    warm = guide if guide is None or isinstance(guide, WarmStart) else WarmStart(guide, objective="reverse")
    guide_trace, replay, start = draw_starts(model, warm, args, kwargs)
    prototype, start = prototype_trace(model, args, kwargs, replay, start)
    energy = SplitEnergy(model, args, kwargs, prototype, data_plate)
    if adjust is None:
        adjust = not energy.globals and precondition not in langevin.PER_CHAIN
    langevin.check_precondition(precondition, adjust)
    check_sites(energy, warm, guide_trace, adjust)
    energy.check_factorises(start)
    adaptation = StepSizeAdaptation(langevin.check_step_size(step_size), target_accept_prob)
    state = chains.SamplerState()
    if energy.globals:
        values = {n: start[n] for n in energy.globals}
        state = state._replace(global_position=energy.unconstrain(values), global_values=values)
    local = energy.unconstrain({n: start[n] for n in energy.local})
    evaluate = PyroEvaluation().evaluation(energy, state.global_values, move_globals=True)

    def run(num_steps, local, state):
        settings = chains.ChainSettings(num_steps, adaptation.step_size, adjust, precondition,
                                        frozenset(range(1, num_steps + 1)), adaptation.step_size / energy.num_data())
        info, state = chains.run(evaluate, local, state, settings, constrain=lambda p: energy.constrain(p)[0])
        last = energy.unconstrain({n: info.kept[-1][n] for n in energy.local})
        return info, last, state

    with torch.no_grad():
        for done in range(0, int(warmup_steps), ADAPTATION_WINDOW):
            info, local, state = run(min(ADAPTATION_WINDOW, int(warmup_steps) - done), local, state)
            adaptation.update(info.accept.mean().item())
            if info.diverged.any():
                adaptation.halve()
        info, _, _ = run(int(num_samples), local, state)
    samples = PosteriorSamples({name: torch.stack([s[name] for s in info.kept]) for name in energy.transforms})
    samples.accept_rate = info.accept.mean().item()
    samples.divergences = int(info.diverged.sum())
    samples.step_size = adaptation.step_size
    return samples
