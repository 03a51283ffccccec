r"""Amortised warm starts for Langevin chains, and the guide's training objectives.

An encoder guide :math:`q_\phi(z \mid x)` gives each chain its start
:math:`z_0 \sim q_\phi(z \mid x)`. It is trained from the chain's (detached)
samples :math:`z_1..z_K` with one of

* ``"forward"``  — KL(p‖q): :math:`L = -\frac1K \sum_k \log q_\phi(z_k \mid x)`;
* ``"reverse"``  — KL(q‖p): :math:`L = E_q[\log q_\phi(z \mid x) - \log p_\theta(x, z)]`,
  the negative ELBO, reparameterised (only φ is updated by it);
* ``"jeffreys"`` — their sum, KL(p‖q) + KL(q‖p), the paper's choice.

Log-densities carry Pyro's plate scales, exactly as ``Trace_ELBO`` does.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import pyro.poutine as poutine
import torch
from pyro.distributions.util import scale_and_mask

from .potential import latent_sites, subsample_trace

OBJECTIVES = ("forward", "reverse", "jeffreys")


class WarmStart:
    r"""Start Langevin chains from an amortised guide and train it on their samples.

    :param guide: a Pyro guide taking the model's arguments; its latent sites
        are a subset of the model's (global latents may be left out: ``fit``
        keeps persistent chains for them).
    :param str objective: ``"forward"``, ``"reverse"`` or ``"jeffreys"``.

    A ``WarmStart`` is itself callable like the guide, so it can be passed as
    ``PCLangevin(model, init=WarmStart(guide))``.

    Example::

        >>> import pyro, pyro.distributions as dist, torch
        >>> from pyro_lpc import WarmStart
        >>> def guide(x):
        ...     loc = pyro.param("loc", torch.zeros(len(x)))
        ...     with pyro.plate("data", len(x)):
        ...         pyro.sample("z", dist.Normal(loc, 1.0))
        >>> warm = WarmStart(guide, objective="forward")
        >>> trace = warm.draw((torch.zeros(3),), {})
        >>> warm.forward_loss(trace, [{"z": torch.ones(3)}], (torch.zeros(3),), {}).item() > 0
        True
    """

    def __init__(self, guide, objective: str = "jeffreys"):
        if objective not in OBJECTIVES:
            raise ValueError(
                f"Unknown warm-start objective {objective!r}; choose one of {list(OBJECTIVES)}."
            )
        if not callable(guide):
            raise TypeError(f"guide must be a callable Pyro guide, got {type(guide).__name__}.")
        self.guide = guide
        self.objective = objective

    def __call__(self, *args, **kwargs):
        return self.guide(*args, **kwargs)

    def draw(self, args, kwargs, replay: Optional[poutine.Trace] = None) -> poutine.Trace:
        """A trace of the guide: reparameterised draws, differentiable in φ."""
        guide = self.guide if replay is None else poutine.replay(self.guide, trace=replay)
        return poutine.trace(guide).get_trace(*args, **(kwargs or {}))

    def forward_loss(
        self, guide_trace: poutine.Trace, samples: List[Dict[str, torch.Tensor]], args, kwargs
    ) -> torch.Tensor:
        r""":math:`-\frac1K \sum_k \log q_\phi(z_k \mid x)` over the guide's latent sites.

        With a single latent site the distribution drawn in ``guide_trace``
        is reused for every sample (it depends on x and φ only); otherwise the
        guide is re-run conditioned on each sample, since later sites may
        depend on earlier ones.
        """
        sites = latent_sites(guide_trace)
        if len(sites) == 1:
            name = sites[0]
            site = guide_trace.nodes[name]
            total = sum(_scaled_log_prob(site, z[name].detach()) for z in samples)
            return -total / len(samples)
        replay = subsample_trace(guide_trace)
        total = 0.0
        for z in samples:
            data = {k: z[k].detach() for k in sites}
            guide = poutine.condition(poutine.replay(self.guide, trace=replay), data=data)
            total = total + poutine.trace(guide).get_trace(*args, **(kwargs or {})).log_prob_sum()
        return -total / len(samples)

    def reverse_loss(self, guide_trace: poutine.Trace, log_joint) -> torch.Tensor:
        r"""Negative ELBO :math:`\log q_\phi(z_0 \mid x) - \log p_\theta(x, z_0)` at the draw.

        ``log_joint(values)`` evaluates the model's scaled log-joint at the
        guide's (differentiable) values; gradients reach φ through ``z_0``.
        """
        for name in latent_sites(guide_trace):
            if not guide_trace.nodes[name]["fn"].has_rsample:
                raise ValueError(
                    f"objective={self.objective!r} needs reparameterised guide draws, but site "
                    f"'{name}' ({type(guide_trace.nodes[name]['fn']).__name__}) has no rsample."
                )
        values = {name: guide_trace.nodes[name]["value"] for name in latent_sites(guide_trace)}
        return guide_trace.log_prob_sum() - log_joint(values)

    def loss(self, guide_trace, samples, args, kwargs, log_joint) -> torch.Tensor:
        """The chosen objective (see the module docstring)."""
        loss = 0.0
        if self.objective in ("forward", "jeffreys"):
            loss = loss + self.forward_loss(guide_trace, samples, args, kwargs)
        if self.objective in ("reverse", "jeffreys"):
            loss = loss + self.reverse_loss(guide_trace, log_joint)
        return loss


def _scaled_log_prob(site, value: torch.Tensor) -> torch.Tensor:
    """Pyro's scaled, masked log-density of ``site`` at ``value``, summed (as ``Trace_ELBO``)."""
    return scale_and_mask(site["fn"].log_prob(value), site["scale"], site["mask"]).sum()
