r"""Amortised warm starts for Langevin chains, and the guide's training objectives.

An encoder guide $q_\phi(z \mid x)$ gives each chain its start
$z_0 \sim q_\phi(z \mid x)$. It is trained from the chain's (detached)
*kept* samples $\{z_k\}_{k \in \mathcal K}$ — the same ones θ steps on
(`fit(keep=...)`; the default `keep="last"` is $z_K$ alone) — with one of

* `"forward"`  — KL(p‖q): $L = -\frac{1}{|\mathcal K|} \sum_{k \in \mathcal K} \log q_\phi(z_k \mid x)$;
* `"reverse"`  — KL(q‖p): $L = E_q[\log q_\phi(z \mid x) - \log p_\theta(x, z)]$,
  the negative ELBO, reparameterised (only φ is updated by it);
* `"jeffreys"` — their sum, KL(p‖q) + KL(q‖p), the paper's choice.

Log-densities carry Pyro's plate scales, exactly as `Trace_ELBO` does.
Training the forward term on every $z_1..z_K$ (`keep="all"`) instead of
$z_K$ alone measured a little better per iteration and worse per second:
PPCA with its exact posterior, θ fixed, K = 10, seeds 0 / 1, KL(p‖q) after 300
iterations 0.165 / 0.115 nats against 0.172 / 0.143 with `keep="last"`, but at
the wall time of the `"last"` runs (8.7 / 9.1 s) 0.235 / 0.431
(`benchmarks/forward_kl_samples.py`).

**Pyro's autoguides.** `AutoNormal`, the `AutoContinuous` guides
(`AutoDiagonalNormal`, `AutoMultivariateNormal`, ...) and `EasyGuide`
groups sample *auxiliary* sites (`infer={"is_auxiliary": True}`) in
unconstrained space and set each model site they cover to
`Delta(T⁻¹(a), log_density=-log|J|)`. The chains start from the model sites'
values; the reverse term is Pyro's ELBO of the whole guide trace; the forward
term is $\log q(z) = \log q_a(a(T(z))) - \log|J|$, evaluated by
conditioning the auxiliary sites on values packed from the chain's samples
(`auxiliary_sites`). A point-mass guide (`AutoDelta`,
`EasyGuide.map_estimate`) has no density at the chains' samples: it takes
`"reverse"` only (a MAP estimate of the chains' start).
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional

import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from pyro.distributions.util import scale_and_mask

from .potential import latent_sites, subsample_trace

OBJECTIVES = ("forward", "reverse", "jeffreys")


class WarmStart:
    r"""Start Langevin chains from an amortised guide and train it on their samples.

    Args:
        guide: a Pyro guide taking the model's arguments; its latent sites
            are a subset of the model's (global latents may be left out: `fit`
            keeps persistent chains for them).
        objective (str): `"forward"`, `"reverse"` or `"jeffreys"`.

    A `WarmStart` is itself callable like the guide, so it can be passed as
    `PCLangevin(model, init=WarmStart(guide))`.

    Example:
        ```python
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

        ```
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

    @staticmethod
    def values(guide_trace: poutine.Trace) -> Dict[str, torch.Tensor]:
        """The values a guide trace gives the model's latents (`guide_values`)."""
        return guide_values(guide_trace)

    def draw(self, args, kwargs, replay: Optional[poutine.Trace] = None) -> poutine.Trace:
        """A trace of the guide: reparameterised draws, differentiable in φ."""
        guide = self.guide if replay is None else poutine.replay(self.guide, trace=replay)
        return poutine.trace(guide).get_trace(*args, **(kwargs or {}))

    def forward_loss(
        self, guide_trace: poutine.Trace, samples: List[Dict[str, torch.Tensor]], args, kwargs,
        transforms: Optional[dict] = None,
    ) -> torch.Tensor:
        r"""$-\frac1S \sum_s \log q_\phi(z_s \mid x)$ over the `S` given samples.

        With a single latent site the distribution drawn in `guide_trace`
        is reused for every sample (it depends on x and φ only); otherwise the
        guide is re-run conditioned on each sample, since later sites may
        depend on earlier ones. A guide with auxiliary sites (an autoguide) is
        conditioned on its auxiliary sites instead, packed from the samples'
        unconstrained values `transforms[name](z)` (`auxiliary_sites`;
        `transforms` as [`SplitEnergy.transforms`][pyro_lpc.potential.SplitEnergy]).
        """
        sites = guide_sites(guide_trace)
        packed = auxiliary_sites(guide_trace, transforms)
        if len(sites) == 1 and not packed:
            name = sites[0]
            site = guide_trace.nodes[name]
            total = sum(_scaled_log_prob(site, z[name].detach()) for z in samples)
            return -total / len(samples)
        covered = {n for names in packed.values() for n in names}
        replay = subsample_trace(guide_trace)
        total = 0.0
        for z in samples:
            data = {k: z[k].detach() for k in sites if k not in covered}
            for aux, names in packed.items():
                unconstrained = [transforms[n](z[n].detach()) for n in names]
                data[aux] = _pack(unconstrained, guide_trace.nodes[aux]["value"].shape)
            guide = poutine.condition(poutine.replay(self.guide, trace=replay), data=data)
            total = total + poutine.trace(guide).get_trace(*args, **(kwargs or {})).log_prob_sum()
        return -total / len(samples)

    def reverse_loss(self, guide_trace: poutine.Trace, log_joint) -> torch.Tensor:
        r"""Negative ELBO $\log q_\phi(z_0 \mid x) - \log p_\theta(x, z_0)$ at the draw.

        `log_joint(values)` evaluates the model's scaled log-joint at the
        guide's (differentiable) values; gradients reach φ through `z_0`.
        """
        for name in latent_sites(guide_trace):  # auxiliary sites included
            if not guide_trace.nodes[name]["fn"].has_rsample:
                raise ValueError(
                    f"objective={self.objective!r} needs reparameterised guide draws, but site "
                    f"'{name}' ({type(guide_trace.nodes[name]['fn']).__name__}) has no rsample."
                )
        return guide_trace.log_prob_sum() - log_joint(guide_values(guide_trace))

    def check(self, guide_trace: poutine.Trace, transforms: dict) -> None:
        """Raise a `ValueError` now if the objective is undefined for this guide (a
        forward term with a point-mass site, or an auxiliary site the chains' samples
        do not determine: `auxiliary_sites`)."""
        if self.objective in ("forward", "jeffreys"):
            auxiliary_sites(guide_trace, transforms, verify=True)

    def loss(self, guide_trace, samples, args, kwargs, log_joint, transforms=None) -> torch.Tensor:
        """The chosen objective (see the module docstring)."""
        loss = 0.0
        if self.objective in ("forward", "jeffreys"):
            loss = loss + self.forward_loss(guide_trace, samples, args, kwargs, transforms)
        if self.objective in ("reverse", "jeffreys"):
            loss = loss + self.reverse_loss(guide_trace, log_joint)
        return loss


def _scaled_log_prob(site, value: torch.Tensor) -> torch.Tensor:
    """Pyro's scaled, masked log-density of `site` at `value`, summed (as `Trace_ELBO`)."""
    return scale_and_mask(site["fn"].log_prob(value), site["scale"], site["mask"]).sum()


def is_auxiliary(site) -> bool:
    """Whether a guide site is auxiliary (`infer={"is_auxiliary": True}`): a variable of the
    guide alone, such as an autoguide's `mu_unconstrained` or `_AutoDiagonalNormal_latent`."""
    return bool((site.get("infer") or {}).get("is_auxiliary"))


def guide_sites(trace: poutine.Trace) -> List[str]:
    """The latent sites of a guide trace that stand for the model's: not auxiliary."""
    return [name for name in latent_sites(trace) if not is_auxiliary(trace.nodes[name])]


def guide_values(trace: poutine.Trace) -> Dict[str, torch.Tensor]:
    """The values a guide trace gives the model's latent sites (`guide_sites`)."""
    return {name: trace.nodes[name]["value"] for name in guide_sites(trace)}


def check_guide_sites(trace: poutine.Trace, latents, required=(), why: str = "", who: str = "The guide") -> None:
    """Raise a `ValueError` when a guide trace samples sites that are not among the model's
    `latents` (auxiliary sites aside), or leaves out a `required` latent (`why` says why
    it is required)."""
    drawn = set(guide_sites(trace))
    unknown = sorted(drawn - set(latents))
    if unknown:
        raise ValueError(f"{who} samples site(s) {unknown} that are not latent sites of the model "
                         f"(model latents: {sorted(latents)}).")
    missing = sorted(set(required) - drawn)
    if missing:
        raise ValueError(f"{who} does not sample the latent site(s) {missing} of the model{why}")


def _is_point_mass(fn) -> bool:
    while isinstance(fn, (dist.Independent, dist.MaskedDistribution, dist.ExpandedDistribution)):
        fn = fn.base_dist
    return isinstance(fn, dist.Delta)


def _pack(unconstrained: List[torch.Tensor], shape: torch.Size) -> torch.Tensor:
    """`a = concat_s u_s`: each site's unconstrained value flattened to `shape[:-1] + (-1,)`
    (event and per-site batch dims), concatenated along the last dim, as Pyro's
    `AutoContinuous._unpack_latent` and `easyguide.Group.sample` unpack it."""
    if len(shape) == 0:
        return unconstrained[0].reshape(shape)
    return torch.cat([u.reshape(shape[:-1] + (-1,)) for u in unconstrained], -1)


def auxiliary_sites(trace: poutine.Trace, transforms: Optional[dict], verify: bool = False) -> Dict[str, List[str]]:
    r"""For each auxiliary site of a guide trace, the model sites it determines.

    Pyro's autoguides sample an auxiliary `a` in unconstrained space, then
    each model site `s` it covers as `Delta(T_s⁻¹(a_s), log_density=-log|J_s|)`,
    in order: `AutoNormal` one `a = u` per site, `AutoContinuous` guides
    and `EasyGuide` groups one vector `a = concat_s u_s` (`_pack`).
    So the point-mass sites following an auxiliary site, until their sizes fill
    it, are its sites, and $\log q(z) = \log q_a(a(T(z))) - \log|J|$ is
    defined at any `z`. With `verify`, the packing is checked on the trace's
    own draw (`transforms[s]` maps site `s` to unconstrained space).

    Raises a `ValueError` naming the site where $\log q$ at the chains'
    samples is undefined: a point-mass site no auxiliary site determines
    (`AutoDelta`, `EasyGuide.map_estimate`), or an auxiliary site that its
    following point masses do not fill (an unknown guide structure).
    """
    packed: Dict[str, List[str]] = {}
    current, width, filled = None, 0, 0
    for name in latent_sites(trace):
        site = trace.nodes[name]
        if is_auxiliary(site):
            if current is not None:
                raise _underivable(trace, current, packed[current], f"fill {filled} of its {width} values")
            shape = site["value"].shape
            current, width, filled = name, (shape[-1] if len(shape) else 1), 0
            packed[name] = []
            continue
        if not _is_point_mass(site["fn"]):
            continue  # a site with a density of its own
        if current is None:
            raise ValueError(
                f"The guide's site '{name}' is a point mass ({type(site['fn']).__name__}, as in "
                "AutoDelta): it has no density at the chains' samples, so the forward KL term "
                "(warm_start='forward' or 'jeffreys') is undefined. Use warm_start='reverse' "
                "(with a point-mass guide, a MAP estimate of the chains' start)."
            )
        if transforms is None or name not in transforms:
            raise ValueError(f"The guide's site '{name}' is determined by auxiliary site '{current}', "
                             "but no transform to unconstrained space was given for it.")
        packed[current].append(name)
        lead = max(math.prod(trace.nodes[current]["value"].shape[:-1]), 1)
        size = transforms[name](site["value"]).numel()
        filled += size // lead
        if size % lead or filled > width:
            raise _underivable(trace, current, packed[current], f"do not fit its {width} values")
        if filled == width:
            current = None
    if current is not None:
        raise _underivable(trace, current, packed[current], f"fill {filled} of its {width} values")
    if verify:
        for aux, names in packed.items():
            value = trace.nodes[aux]["value"].detach()
            derived = _pack([transforms[n](trace.nodes[n]["value"].detach()) for n in names], value.shape)
            close = torch.isclose(derived, value, rtol=1e-3, atol=1e-4) | ~torch.isfinite(derived)
            if not bool(close.all()):
                raise _underivable(trace, aux, names, "packed do not give its drawn value")
    return packed


def _underivable(trace, aux: str, names: List[str], why: str) -> ValueError:
    shape = tuple(trace.nodes[aux]["value"].shape)
    return ValueError(
        f"The guide's auxiliary site '{aux}' (shape {shape}) cannot be derived from the chains' "
        f"samples: the model sites sampled after it ({names}, unconstrained) {why}. log q at the "
        "samples is then unknown, and the forward KL term (warm_start='forward' or 'jeffreys') "
        "needs it; use warm_start='reverse'."
    )
