r"""From a Pyro model to the energy `U(z) = -log p(x, z)` in unconstrained space.

Latent sites with a constrained support are sampled in unconstrained space
`u = T(z)`, exactly as Pyro's HMC does: the energy is
`U(u) = -log p(x, T⁻¹(u)) - log|det ∂T⁻¹(u)/∂u|`. The construction is
Pyro's own `pyro.infer.mcmc.util.initialize_model`. Two views of it:

* [`joint_potential`][pyro_lpc.potential.joint_potential] — the whole model's energy over all its latents, one
  chain (what `PCLangevin` samples), with checks that make failures readable;
* [`SplitEnergy`][pyro_lpc.potential.SplitEnergy] — one mini-batch's energy *split* by the data plate into
  one term per data point (the local chains) and the scaled global term (what
  `LPC` and `fit` run their chains on), evaluated by a backend
  ([`PyroEvaluation`][pyro_lpc.potential.PyroEvaluation], or the recorded
  [`CompiledEnergies`][pyro_lpc.compiled.CompiledEnergies]).

Example:
    ```python
    >>> import pyro, pyro.distributions as dist, torch
    >>> from pyro_lpc.potential import joint_potential
    >>> def model(y):
    ...     scale = pyro.sample("scale", dist.HalfNormal(1.0))
    ...     pyro.sample("y", dist.Normal(0.0, scale), obs=y)
    >>> built = joint_potential(model, (torch.tensor(0.5),))
    >>> u = {"scale": torch.tensor(0.0)}            # log(scale) = 0, i.e. scale = 1
    >>> energy = built.potential_fn(u)              # -log p(y, scale) - log|d scale / du|
    >>> expected = -(dist.HalfNormal(1.0).log_prob(torch.tensor(1.0))
    ...              + dist.Normal(0.0, 1.0).log_prob(torch.tensor(0.5)))
    >>> bool(torch.isclose(energy, expected))
    True

    ```
"""
from __future__ import annotations

import copy
from typing import Callable, Dict, List, NamedTuple, Optional

import pyro
import pyro.poutine as poutine
import torch
from pyro.infer.autoguide.initialization import InitMessenger, init_to_uniform
from pyro.distributions.util import scale_and_mask, sum_rightmost as _sum_rightmost
from pyro.distributions import constraints
from pyro.distributions.transforms import biject_to
from pyro.infer.mcmc.util import initialize_model
from pyro.poutine.util import site_is_subsample

from . import langevin

Position = Dict[str, torch.Tensor]


class JointPotential(NamedTuple):
    """The whole model's energy over all its latents as one chain: initial unconstrained
    point, energy function and transforms (Pyro's `initialize_model`)."""

    initial_params: Position
    potential_fn: Callable[[Position], torch.Tensor]
    transforms: dict
    prototype_trace: poutine.Trace


def joint_potential(
    model,
    model_args=(),
    model_kwargs=None,
    *,
    transforms=None,
    init_strategy=None,
    initial_params: Optional[Position] = None,
    max_plate_nesting: Optional[int] = None,
    jit_compile: bool = False,
    ignore_jit_warnings: bool = False,
) -> JointPotential:
    """Build the unconstrained energy of `model` with `initialize_model`.

    Discrete latent sites with finite support are enumerated and summed out, as
    for Pyro's HMC. When nothing continuous is left (every latent collapsed or
    enumerated, e.g. under Pyro's `collapse_conjugate`), `initial_params` is
    empty and `potential_fn({})` is the constant `-log p(x)`.
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
            jit_compile=jit_compile,
            skip_jit_warnings=ignore_jit_warnings,
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
            f"the init strategy); non-finite log-density at site(s) {nonfinite_in_trace(trace)}."
        ) from error
    return JointPotential(params, potential_fn, transforms, trace)


def constrain(params: Position, transforms: dict) -> Position:
    """Map unconstrained values to the model's support, `z = T⁻¹(u)`."""
    return {k: transforms[k].inv(v) if k in transforms else v for k, v in params.items()}


def unconstrain(values: Position, transforms: dict) -> Position:
    """Map constrained values to unconstrained space, `u = T(z)`."""
    return {k: transforms[k](v) if k in transforms else v for k, v in values.items()}


def nonfinite_sites(model, model_args, model_kwargs, params: Position, transforms: dict) -> List[str]:
    """Names of the sample sites whose value or log-density is not finite at `params`.

    `params` are unconstrained values of the latent sites; the model is run
    conditioned on their constrained images and each site's log-density is
    checked (latent and observed alike), so an error can say *where* the joint
    density breaks.
    """
    values = constrain({k: v.detach() for k, v in params.items()}, transforms)
    with pyro.validation_enabled(False), torch.no_grad():
        trace = poutine.trace(poutine.condition(model, data=values)).get_trace(
            *model_args, **(model_kwargs or {})
        )
    bad = nonfinite_in_trace(trace)
    return bad + [k for k, u in params.items() if not torch.isfinite(u).all() and k not in bad]


def nonfinite_in_trace(trace: poutine.Trace) -> List[str]:
    """Sample sites of `trace` whose value or log-density is not finite."""
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


# -- energies of one mini-batch, for the learning loop ---------------------------------
def latent_sites(trace: poutine.Trace) -> List[str]:
    """Names of the unobserved sample sites of `trace` (plate subsample sites excluded)."""
    return [name for name in trace.stochastic_nodes if not site_is_subsample(trace.nodes[name])]


def subsample_factor(site) -> float:
    """The part of a site's Pyro scale that plate subsampling contributes: the product of
    `size / subsample_size` over the subsampled plates holding it (1 if none)."""
    factor = 1.0
    for frame in reversed(site["cond_indep_stack"]):  # innermost first, in the order Pyro multiplies
        if frame.full_size is not None and frame.full_size != frame.size:
            factor = factor * frame.full_size / frame.size
    return factor


def site_log_prob(site, value: Optional[torch.Tensor] = None) -> torch.Tensor:
    r"""Log-density of a trace site at `value` (default: its own) as one data point's
    posterior sees it: masked, scaled by the user's factors (`poutine.scale`: β-VAE or
    annealing weights, tempering) but **not** by subsampling, i.e. `scale / c` with
    `c` = [`subsample_factor`][pyro_lpc.potential.subsample_factor]. The mask is a boolean tensor or, as `poutine.mask`
    also allows, a plain bool."""
    log_p = site["fn"].log_prob(site["value"] if value is None else value)
    return scale_and_mask(log_p, site["scale"] / subsample_factor(site), site["mask"])


def guide_and_model_traces(model, guide, args, kwargs) -> "tuple[Optional[poutine.Trace], poutine.Trace]":
    """The guide's trace (`None` without a guide) and the model's, replayed on the guide's
    draws and subsample indices (drawn from its prior without a guide)."""
    guide_trace = poutine.trace(guide).get_trace(*args, **kwargs) if guide is not None else None
    model_fn = poutine.replay(model, trace=guide_trace) if guide_trace is not None else model
    return guide_trace, poutine.trace(model_fn).get_trace(*args, **kwargs)


def subsample_trace(trace: poutine.Trace) -> poutine.Trace:
    """A trace holding only the plate subsample sites of `trace`, for replay.

    Replaying it makes every evaluation in one iteration see the same
    mini-batch indices of a `pyro.plate(..., subsample_size=B)`.
    """
    replay = poutine.Trace()
    for name, site in trace.nodes.items():
        if site_is_subsample(site):
            replay.add_node(name, **site)
    return replay


def num_data(plate) -> int:
    """N: a data plate's full size (before subsampling); 1 for `None` (no data plate)."""
    return 1 if plate is None else plate.full_size or plate.size


def find_data_plate(trace: poutine.Trace, name: Optional[str] = None):
    """The plate that indexes data points: the one named `name`, or else the outermost
    plate shared by every observed site inside a plate (an inner plate, subsampled or
    not, indexes parts of a data point: pixels, time steps). `None` when they share no
    plate. Observed sites outside every plate are not data points (see
    [`SplitEnergy.coupled_sites`][pyro_lpc.potential.SplitEnergy.coupled_sites])."""
    frames = {}
    shared = None  # the plates shared by the observed sites, in an observed site's order (outermost first)
    for site in trace.nodes.values():
        if site["type"] != "sample" or site_is_subsample(site):
            continue
        stack = [f for f in site["cond_indep_stack"] if f.vectorized]  # outermost first
        frames.update((f.name, f) for f in stack)
        if site["is_observed"] and stack:
            names = [f.name for f in stack]
            shared = names if shared is None else [n for n in shared if n in names]
    if name is not None:
        if name not in frames:
            raise ValueError(f"data_plate={name!r} is not a plate of the model (plates: {sorted(frames)}).")
        return frames[name]
    return frames[shared[0]] if shared else None


def _is_real(support) -> bool:
    """Whether a support is (a product of) the real line, where Pyro's transform is the identity."""
    while isinstance(support, constraints.independent):
        support = support.base_constraint
    return support is constraints.real


def in_plate(site, plate_name: str) -> bool:
    """Whether a trace site lies inside the plate named `plate_name`."""
    return any(f.name == plate_name for f in site["cond_indep_stack"])


def sum_except(value: torch.Tensor, dims) -> torch.Tensor:
    """Sum a log-density (batch shape) over every dim except `dims` (negative, e.g. the
    data plate's), which come first in the given order; each has its size or 1 if broadcast."""
    value = value.reshape((1,) * max(0, -min(dims) - value.dim()) + value.shape)
    n = value.dim()
    value = value.movedim(tuple(n + d for d in dims), tuple(range(len(dims))))
    return value.reshape(value.shape[: len(dims)] + (-1,)).sum(-1)


def plate_log_prob(trace: poutine.Trace, plate_name: str, dims, sites=None):
    """Masked `Σ_s log p(s_i)` with the user's scales ([`site_log_prob`][pyro_lpc.potential.site_log_prob])
    over the sample sites of `trace` inside the plate (all, or those named in `sites`), reduced with
    [`sum_except`][pyro_lpc.potential.sum_except] to `dims`."""
    total = 0.0
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or site_is_subsample(site) or not in_plate(site, plate_name):
            continue
        if sites is None or name in sites:
            total = total + sum_except(site_log_prob(site), dims)
    return total


def batch_shapes(args, kwargs) -> list:
    """The shapes of a batch's tensor arguments (also inside lists, tuples and dicts), the
    values of its scalar ones (a plate's full size, say) and the type names of the rest, for
    messages and for deciding that two batches share a model structure."""
    def describe(v):
        if torch.is_tensor(v):
            return tuple(v.shape)
        if isinstance(v, (list, tuple)):
            return [describe(e) for e in v]
        if isinstance(v, dict):
            return {k: describe(e) for k, e in v.items()}
        return v if v is None or isinstance(v, (bool, int, float, str)) else type(v).__name__

    return [describe(a) for a in args] + [f"{k}={describe(v)}" for k, v in (kwargs or {}).items()]


class SplitEnergy:
    r"""The energy of a Pyro model on one mini-batch, split by the data plate into one term per
    data point and a global term, as plain functions of its latents
    ([`joint_potential`][pyro_lpc.potential.joint_potential] is the unsplit energy over all latents, for one
    chain).

    Latents are split by the data plate: *local* sites (inside it, one chain per
    data point) and *global* sites (outside it, one shared chain). Positions are
    unconstrained; local positions carry the data-point (chain) dimension first.

    * [`local_energy`][pyro_lpc.potential.SplitEnergy.local_energy] — per data point `i`,
      `U_i = -Σ_s (s_s / c_s) log p(s_i | ...) - log|J_i|` over the sites inside
      the data plate: each site's Pyro scale `s_s` (the user's `poutine.scale`
      factors times subsampling's) with the subsampling factor `c_s`
      ([`subsample_factor`][pyro_lpc.potential.subsample_factor]: the data plate's N/B and an inner subsampled
      plate's) divided out. A data point's posterior involves only its own prior
      and likelihood, as the user weighted them; given an inner subsample, the
      chains sample the posterior given the observed part.
    * [`joint_value_and_grad`][pyro_lpc.potential.SplitEnergy.joint_value_and_grad] — the above and, for the
      global latents, `-log p(x, z) - log|J|` **with** Pyro's scales (a stochastic-gradient estimate of the
      full-data energy), from one model evaluation.
    * [`log_joint`][pyro_lpc.potential.SplitEnergy.log_joint] — scaled `log p_θ(x, z)` with gradients to θ.
    * [`log_joint_from_energy`][pyro_lpc.potential.SplitEnergy.log_joint_from_energy] — the same at the
      chains' start, from their energies and gradients, without evaluating the model (where `energy_scale` is
      defined).
    """

    def __init__(self, model, args, kwargs, prototype: poutine.Trace, data_plate=None):
        self.model, self.args, self.kwargs = model, args, kwargs or {}
        self.replay = subsample_trace(prototype)
        self.param_names = [n for n, site in prototype.nodes.items() if site["type"] == "param"]
        self.plate = find_data_plate(prototype, data_plate)
        self.transforms, self.event_dims, self.chain_axis = {}, {}, {}
        self.local, self.globals = [], []
        for name in latent_sites(prototype):
            site = prototype.nodes[name]
            if site["fn"].support.is_discrete:
                raise ValueError(
                    f"Latent site '{name}' is discrete ({type(site['fn']).__name__}); Langevin "
                    "dynamics needs continuous latents. Marginalise it out or make it observed."
                )
            self.transforms[name] = biject_to(site["fn"].support).inv  # Pyro's convention
            self.event_dims[name] = site["fn"].event_dim
            if self.plate is not None and in_plate(site, self.plate.name):
                self.local.append(name)
                self.chain_axis[name] = site["value"].dim() - site["fn"].event_dim + self.plate.dim
            else:
                self.globals.append(name)
        # each sample site's Pyro scale as traced on this batch (a recording takes them as inputs)
        self.scales = {n: site["scale"] for n, site in prototype.nodes.items()
                       if site["type"] == "sample" and not site_is_subsample(site)}
        # sample sites outside the data plate: global latents, observations and factors of the whole batch
        self.outside = [n for n, site in prototype.nodes.items() if site["type"] == "sample" and not site_is_subsample(site)
                        and (self.plate is None or not in_plate(site, self.plate.name))]
        self.energy_scale = self._energy_scale(prototype)

    def _energy_scale(self, prototype: poutine.Trace) -> Optional[float]:
        """`c` such that `log p(x, z) = -c Σ_i U_i(z)` exactly, Pyro's scales included, or
        `None`. It exists when every sample site lies inside the data plate with the same
        subsampling factor `c` ([`subsample_factor`][pyro_lpc.potential.subsample_factor]; the user's scales
        are in `U_i`) and every latent is local and real-valued (no Jacobian term)."""
        if self.plate is None or self.outside:
            return None
        if not all(_is_real(prototype.nodes[name]["fn"].support) for name in self.local):
            return None
        factors = {subsample_factor(site) for site in prototype.nodes.values()
                   if site["type"] == "sample" and not site_is_subsample(site)}
        return factors.pop() if len(factors) == 1 else None

    def coupled_sites(self, values: Position) -> List[str]:
        """Sample sites outside the data plate whose log-density depends on the local latents
        (found by autograd at the constrained `values`: one model evaluation). Such a site
        (an observation or `pyro.factor` of the whole batch, or a global latent whose
        distribution reads local ones) couples the data points: `p(z | x)` no longer
        factorises over them, so per-point chains cannot sample it."""
        if not self.local or not self.outside:
            return []
        leaves = {name: values[name].detach().requires_grad_(True) for name in self.local}
        coupled = []
        with torch.enable_grad():
            trace = self.trace({**values, **leaves})
            for name in self.outside:
                site = trace.nodes[name]
                log_p = site["fn"].log_prob(site["value"])
                if log_p.requires_grad and any(g is not None for g in torch.autograd.grad(
                        log_p.sum(), list(leaves.values()), allow_unused=True, retain_graph=True)):
                    coupled.append(name)
        return coupled

    def check_factorises(self, values: Position) -> None:
        """Raise a `ValueError` naming the sites found by
        [`coupled_sites`][pyro_lpc.potential.SplitEnergy.coupled_sites]."""
        coupled = self.coupled_sites(values)
        if coupled:
            raise ValueError(
                f"Site(s) {coupled} lie outside the data plate '{self.plate.name}' but their log-density "
                f"depends on the local latent site(s) {self.local}: they couple the data points, so the "
                "posterior does not factorise into one chain per data point, and per-point chains would "
                "silently leave these terms out. Move such a site inside the data plate (one term per data "
                "point), or sample the model jointly with pyro_lpc.PCLangevin (one chain over all latents)."
            )

    @property
    def shapes(self):
        """The shapes of the batch this energy is bound to (see [`rebind`][pyro_lpc.potential.SplitEnergy.rebind])."""
        return batch_shapes(self.args, self.kwargs)

    def rebind(self, args, kwargs, replay: poutine.Trace) -> "SplitEnergy":
        """The same model structure (sites, plate, transforms) on another batch of the
        same shapes, replaying the subsample indices in `replay`; no model trace."""
        energy = copy.copy(self)
        energy.args, energy.kwargs, energy.replay = args, kwargs or {}, replay
        return energy

    # conversions between chain-first unconstrained positions and site values
    def unconstrain(self, values: Position) -> Position:
        out = unconstrain(values, self.transforms)
        return {k: u.movedim(self.chain_axis[k], 0) if k in self.chain_axis else u for k, u in out.items()}

    def constrain(self, position: Position) -> "tuple[Position, Position]":
        """Site values and each site's log|det J| (batch shape) for chain-first `position`."""
        values, ladj = {}, {}
        for name, u in position.items():
            if name in self.chain_axis:
                u = u.movedim(0, self.chain_axis[name])
            t = self.transforms[name].inv
            z = t(u)
            values[name] = z
            ladj[name] = _sum_rightmost(t.log_abs_det_jacobian(u, z), self.event_dims[name] - t.codomain.event_dim)
        return values, ladj

    def trace(self, values: Position) -> poutine.Trace:
        """The model's trace at `values`. Distribution arguments are not validated
        here: the prototype trace was, and non-finite energies are caught as divergences."""
        model = poutine.condition(poutine.replay(self.model, trace=self.replay), data=values)
        with pyro.validation_enabled(False):
            return poutine.trace(model).get_trace(*self.args, **self.kwargs)

    def _local_terms(self, trace: poutine.Trace, ladj: Position) -> torch.Tensor:
        """`-Σ log p - log|J|` per data point over the sites inside the data plate, with the user's
        scales but not subsampling's ([`site_log_prob`][pyro_lpc.potential.site_log_prob])."""
        dims = (self.plate.dim,)
        total = plate_log_prob(trace, self.plate.name, dims)
        for name in self.local:
            total = total + sum_except(ladj[name], dims)
        return -total

    def local_energy(self, global_values: Position):
        """`local position -> U_i` per data point, with the global latents fixed."""

        def energy(position):
            values, ladj = self.constrain(position)
            return self._local_terms(self.trace({**global_values, **values}), ladj)

        return energy

    def joint_value_and_grad(self, local: Position, global_: Position):
        """One model evaluation giving `(U_i, ∇_local)` (unscaled, per data point) and
        `(U, ∇_global)` (scaled, scalar) at the unconstrained `local`, `global_`."""
        leaves = {k: v.detach().requires_grad_(True) for k, v in {**local, **global_}.items()}
        with torch.enable_grad():
            values, ladj = self.constrain(leaves)
            trace = self.trace(values)
            u_global = -(trace.log_prob_sum() + sum(ladj[k].sum() for k in global_))
            g_global = torch.autograd.grad(u_global, [leaves[k] for k in global_], retain_graph=bool(local))
            out_local = (None, {})
            if local:
                u_local = self._local_terms(trace, ladj)
                g_local = torch.autograd.grad(u_local.sum(), [leaves[k] for k in local])
                out_local = (u_local.detach(), dict(zip(local, g_local)))
        return out_local, (u_global.detach(), dict(zip(global_, g_global)))

    def log_joint(self, values: Position) -> "tuple[torch.Tensor, poutine.Trace]":
        """Scaled `log p_θ(x, z)` at constrained `values` (gradients flow to θ) and its trace."""
        trace = self.trace(values)
        return trace.log_prob_sum(), trace

    def log_joint_from_energy(self, values: Position, potential: torch.Tensor, grad: Position) -> torch.Tensor:
        r"""Scaled `log p_θ(x, z)` at the chains' start `values` from the energies `U_i`
        and gradients `∇U` already computed there, without evaluating the model: the value
        `-s Σ_i U_i` and, through `values`, the gradient `-s ∇U` (`energy_scale`
        `s` must be defined). So a guide's reparameterised draws get their gradient as
        from [`log_joint`][pyro_lpc.potential.SplitEnergy.log_joint]; θ gets none (the guide's objective does
        not update θ)."""
        scale = self.energy_scale
        total = -scale * potential.sum()
        for name, g in grad.items():
            value = values[name]
            total = total - scale * (g.movedim(0, self.chain_axis[name]) * (value - value.detach())).sum()
        return total

    def num_data(self) -> int:
        """N: the data plate's full size (before subsampling); 1 without a data plate."""
        return num_data(self.plate)


def param_tensors(trace: poutine.Trace) -> Dict[str, torch.Tensor]:
    """The unconstrained tensors of the `pyro.param` sites of `trace`, by name (what an
    optimiser updates)."""
    return {name: site["value"].unconstrained() for name, site in trace.nodes.items() if site["type"] == "param"}


def param_grads(value: torch.Tensor, params: List[torch.Tensor]) -> list:
    """`∂ value / ∂ p` for each of `params`; `None` for one it does not reach (all `None` when it
    reaches none)."""
    if not params or not value.requires_grad:
        return [None] * len(params)
    return list(torch.autograd.grad(value, params, allow_unused=True))


class PyroEvaluation:
    """A [`SplitEnergy`][pyro_lpc.potential.SplitEnergy] evaluated through Pyro: the model is traced and
    differentiated at every call. The backend `LPC` uses unless `jit_compile` (then
    [`CompiledEnergies`][pyro_lpc.compiled.CompiledEnergies], which has the same two methods)."""

    #: whether every evaluation traces the model afresh (and so reads its current scales)
    traces_every_call = True

    def evaluation(self, energy: "SplitEnergy", global_values: Position, move_globals: bool):
        """`(local, global_) -> ((U_i, ∇_local), (U, ∇_global))`: with `move_globals` (and global
        latents) both from one model evaluation
        ([`SplitEnergy.joint_value_and_grad`][pyro_lpc.potential.SplitEnergy.joint_value_and_grad]); otherwise
        the local energies with the global latents held at `global_values` and `(None, {})` for the global
        part."""
        if move_globals and energy.globals:
            return energy.joint_value_and_grad
        local_value_and_grad = langevin.value_and_grad(energy.local_energy(global_values))
        return lambda local, global_: (local_value_and_grad(local), (None, {}))

    def theta_loss_and_grad(self, energy: "SplitEnergy", values: Position, num_samples: int = 1):
        """θ's loss at one of `num_samples` kept samples: the scaled `log p_θ(x, z)` at constrained
        `values` (detached), the model's parameters `θ` by name, the gradients of
        `-log p_θ(x, z) / num_samples` (`None` where unused) and the trace."""
        log_p, trace = energy.log_joint(values)
        params = param_tensors(trace)
        return log_p.detach(), params, param_grads(-log_p / num_samples, list(params.values())), trace
