r"""From a Pyro model to the energy ``U(z) = -log p(x, z)`` in unconstrained space.

Latent sites with a constrained support are sampled in unconstrained space
``u = T(z)``, exactly as Pyro's HMC does: the energy is
``U(u) = -log p(x, T⁻¹(u)) - log|det ∂T⁻¹(u)/∂u|``. The construction is
Pyro's own :func:`pyro.infer.mcmc.util.initialize_model`; this module adds the
checks that make failures readable.
"""
from __future__ import annotations

from typing import Callable, Dict, List, NamedTuple, Optional

import pyro
import pyro.poutine as poutine
import torch
from pyro.infer.autoguide.initialization import InitMessenger, init_to_uniform
from pyro.infer.mcmc.util import initialize_model

Position = Dict[str, torch.Tensor]


class ModelPotential(NamedTuple):
    """A model's initial unconstrained point, energy function and transforms."""

    initial_params: Position
    potential_fn: Callable[[Position], torch.Tensor]
    transforms: dict
    prototype_trace: poutine.Trace


def model_potential(
    model,
    model_args=(),
    model_kwargs=None,
    *,
    transforms=None,
    init_strategy=None,
    initial_params: Optional[Position] = None,
    max_plate_nesting: Optional[int] = None,
) -> ModelPotential:
    """Build the unconstrained energy of ``model`` with :func:`initialize_model`.

    Raises ``ValueError`` when the model has no continuous latent site.
    """
    init_strategy = init_strategy or init_to_uniform
    try:
        params, potential_fn, transforms, trace = initialize_model(
            model,
            model_args,
            model_kwargs or {},
            transforms=transforms,
            max_plate_nesting=max_plate_nesting,
            initial_params=initial_params,
            init_strategy=init_strategy,
        )
    except ValueError as error:
        if "cannot find valid initial params" not in str(error):
            raise
        with pyro.validation_enabled(False), torch.no_grad():
            trace = poutine.trace(InitMessenger(init_strategy)(model)).get_trace(
                *model_args, **(model_kwargs or {})
            )
        raise ValueError(
            "The potential energy is not finite at any initial point tried (100 draws of "
            f"the init strategy); non-finite log-density at site(s) {_nonfinite_in(trace)}."
        ) from error
    if not params:
        observed = [n for n, s in trace.nodes.items() if s["type"] == "sample"]
        raise ValueError(
            "The model has no continuous latent sample site to run Langevin dynamics "
            f"on (sample sites found: {observed or 'none'}; all observed or enumerated)."
        )
    return ModelPotential(params, potential_fn, transforms, trace)


def constrain(params: Position, transforms: dict) -> Position:
    """Map unconstrained values to the model's support, ``z = T⁻¹(u)``."""
    return {k: transforms[k].inv(v) if k in transforms else v for k, v in params.items()}


def unconstrain(values: Position, transforms: dict) -> Position:
    """Map constrained values to unconstrained space, ``u = T(z)``."""
    return {k: transforms[k](v) if k in transforms else v for k, v in values.items()}


def nonfinite_sites(model, model_args, model_kwargs, params: Position, transforms: dict) -> List[str]:
    """Names of the sample sites whose value or log-density is not finite at ``params``.

    ``params`` are unconstrained values of the latent sites; the model is run
    conditioned on their constrained images and each site's log-density is
    checked (latent and observed alike), so an error can say *where* the joint
    density breaks.
    """
    values = constrain({k: v.detach() for k, v in params.items()}, transforms)
    with pyro.validation_enabled(False), torch.no_grad():
        trace = poutine.trace(poutine.condition(model, data=values)).get_trace(
            *model_args, **(model_kwargs or {})
        )
    bad = _nonfinite_in(trace)
    return bad + [k for k, u in params.items() if not torch.isfinite(u).all() and k not in bad]


def _nonfinite_in(trace: poutine.Trace) -> List[str]:
    """Sample sites of ``trace`` whose value or log-density is not finite."""
    bad = []
    with pyro.validation_enabled(False), torch.no_grad():
        for name, site in trace.nodes.items():
            if site["type"] != "sample":
                continue
            value = torch.as_tensor(site["value"])
            try:
                finite = torch.isfinite(site["fn"].log_prob(value)).all()
            except (ValueError, RuntimeError):
                finite = False
            if not (finite and torch.isfinite(value).all()):
                bad.append(name)
    return bad
