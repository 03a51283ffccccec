r"""``fit``: learn a Pyro model's parameters with Langevin Predictive Coding.

For each mini-batch ``x`` (DESIGN.md §2):

1. start chains at ``z_0 ~ q_φ(z | x)`` (or the prior, encoder-free);
2. take ``K`` preconditioned Langevin steps on ``U_θ(z) = -log p_θ(x, z)`` (``K``
   fixed or adapted per mini-batch, :mod:`pyro_lpc.schedule`; with ``K = 0`` θ
   steps on the guide's draws);
3. step θ on ``-mean_k log p_θ(x, z_k)`` over the kept samples (z detached);
4. step φ on the warm-start objective (:mod:`pyro_lpc.warm_start`).

**Local and global latents.** Latent sites inside the data plate are *local*:
each data point gets its own chain, started afresh every mini-batch, and its
drift uses the per-point energy (its own prior and likelihood only — Pyro's N/B
subsampling scale is right for θ, wrong for a data point's posterior; see
**Scales**). Sites outside it are *global*: one persistent chain carried across
mini-batches, driven by the *scaled* mini-batch energy (stochastic-gradient
Langevin, unpreconditioned, step ``step_size / N`` by default). Global chains are never Metropolis-adjusted (a mini-batch energy
admits no exact test), so ``adjust=True`` requires all latents to be local. The
data plate is the outermost plate shared by all observed sites, or the one named
by ``data_plate``.

**Scales.** A site's Pyro scale is the product of subsampling factors (N/B of the
data plate, and of an inner subsampled plate) and the user's own
(``poutine.scale``: β-VAE or annealing weights, tempering). The local chains'
per-point energy divides out the subsampling factors only; θ's step and the
global chain see Pyro's full scales, as ``SVI`` and Pyro's HMC potential do. A
site outside the data plate whose log-density depends on local latents couples
the data points and is refused (:meth:`~pyro_lpc.potential.ModelEnergy.check_factorises`).
"""
from __future__ import annotations

import inspect
import numbers
import math
import os
import time
import warnings
from typing import Dict, List, Optional, Union

import pyro
import pyro.poutine as poutine
import torch
from tqdm import tqdm

from . import distributed, langevin
from .checkpoint import checkpoint_path, load_checkpoint, register_params, restore_rng, save_checkpoint, save_rng
from .compiled import CompiledEnergies
from .potential import ModelEnergy, batch_shapes, latent_sites, nonfinite_in_trace, subsample_trace
from .schedule import AdaptiveSteps, StepSizeAdaptation, steps_schedule
from .warm_start import WarmStart


class NonFiniteError(RuntimeError):
    """Training hit a non-finite log-joint or gradient; ``result`` holds what was done so far."""

    def __init__(self, message, result=None):
        super().__init__(message)
        self.result = result


class FitResult:
    """What ``fit`` did: ``history`` holds one dict per iteration with ``epoch``,
    ``iteration``, ``log_joint`` (mean over kept samples of the scaled
    mini-batch ``log p(x, z)`` divided by the number of data points N, i.e. an
    estimate of the full-data log-joint per data point), ``guide_loss``, ``accept_rate`` (MALA or
    ``target_accept`` only), ``step_size``, ``num_steps`` (this iteration's K), ``energy_drop``
    and ``late_energy_drop`` (mean ``U(z_0) - U(z_K)`` and ``U(z_{K/2}) - U(z_K)`` of the local
    chains, ``None`` without chains; :mod:`pyro_lpc.schedule`) and ``time`` (seconds since the
    start, resumed runs included).
    ``sampler_state`` holds what the sampler carries across mini-batches (the
    shared diagonal preconditioner, the global chain's position and values).

    Example::

        >>> result = FitResult([{"iteration": 0, "log_joint": -3.0}, {"iteration": 1, "log_joint": -2.5}], {})
        >>> result["log_joint"]
        [-3.0, -2.5]
    """

    def __init__(self, history: List[dict], sampler_state: dict):
        self.history = history
        self.sampler_state = sampler_state

    def __getitem__(self, key: str) -> List[float]:
        """One history column, e.g. ``result["log_joint"]``."""
        return [row[key] for row in self.history]

    def __repr__(self):
        last = self.history[-1] if self.history else {}
        return f"FitResult({len(self.history)} iterations, last={last})"


def _check_keep(keep, max_steps):
    if keep in ("all", "last"):
        return keep
    if isinstance(keep, slice):
        try:
            _kept_steps(keep, max(max_steps, 1))
            return keep
        except (ValueError, TypeError) as error:
            raise ValueError(f"keep={keep!r} is not a usable slice of the samples: {error}") from None
    if isinstance(keep, int) and not isinstance(keep, bool) and 0 <= keep < max(max_steps, 1):
        return keep
    raise ValueError(
        f"keep must be 'all', 'last', an integer burn-in in [0, num_steps={max_steps}) or a slice of "
        f"the samples (e.g. slice(4, None, 5): every 5th), got {keep!r}."
    )


def _kept_steps(keep, num_steps: int) -> set:
    """The steps ``k`` (1-based) whose samples feed the θ gradient; the last when
    ``keep`` selects none of ``num_steps`` (a burn-in or slice beyond a short chain)."""
    steps = list(range(1, num_steps + 1))
    if keep == "all":
        chosen = steps
    elif keep == "last":
        chosen = steps[-1:]
    elif isinstance(keep, slice):
        chosen = steps[keep]
    else:
        chosen = steps[keep:]
    return set(chosen or steps[-1:])


def minibatches(data, batch_size, shuffle=True, generator: Optional[torch.Generator] = None, batch_args=None):
    """Mini-batches of ``data`` for one epoch, as ``(args, kwargs)``: a tensor is split
    along dim 0 (shuffled with ``generator``, a CPU generator, unless ``shuffle=False``);
    an iterable yields tuples (``model(*batch)``), dicts (``model(**batch)``) or
    single arguments, each first mapped by ``batch_args(batch)`` when given."""
    if torch.is_tensor(data):
        if batch_size is None:
            raise ValueError("data is a tensor: give batch_size to split it into mini-batches.")
        if not shuffle:
            for chunk in data.split(batch_size):
                yield (chunk,), {}
            return
        order = torch.randperm(data.shape[0], generator=generator).to(data.device)
        for idx in order.split(batch_size):
            yield (data[idx],), {}
        return
    for batch in data:
        if batch_args is not None:
            batch = batch_args(batch)
        if isinstance(batch, dict):
            yield (), batch
        elif isinstance(batch, (tuple, list)):
            yield tuple(batch), {}
        else:
            yield (batch,), {}


def _param_tensors(trace: poutine.Trace) -> Dict[str, torch.Tensor]:
    return {
        name: site["value"].unconstrained()
        for name, site in trace.nodes.items()
        if site["type"] == "param"
    }


class _Learner:
    """The state ``fit`` carries across mini-batches, and one iteration of the algorithm."""

    def __init__(self, model, warm, schedule, step_size, global_step_size, precondition, adjust,
                 keep, optim, guide_optim, data_plate, group, generator, adaptation=None, jit_compile=False):
        self.model, self.warm = model, warm
        self.group = group  # the ranks training together (distributed.SingleProcess when alone)
        self.generator = generator  # drawn alike on every rank: the global chain's noise
        self.synced = False  # parameters broadcast from rank 0 yet?
        self.structure = None  # the last batch's ModelEnergy, reused by later batches of its shapes
        self.factorising_shapes = set()  # batch shapes whose model was checked to factorise over data points
        # the local chains' recorded value-and-gradient (True: as recorded; a dict: torch.compile options)
        self.compiled = None if jit_compile is False else CompiledEnergies(None if jit_compile is True else jit_compile)
        self.schedule = schedule  # K per mini-batch (schedule.FixedSteps / AdaptiveSteps)
        self.num_steps, self.step_size = schedule.max_steps, step_size  # this iteration's K and η
        self.adaptation = adaptation  # schedule.StepSizeAdaptation of η, or None
        self.global_step_size = global_step_size
        self.precondition, self.adjust, self.keep = precondition, adjust, keep
        self.optim, self.guide_optim = optim, guide_optim
        self.data_plate = data_plate
        # carried across mini-batches (and saved in checkpoints)
        self.local_precond = None  # shared diagonal statistics of the local chains
        self.global_position = None  # persistent global chain (unconstrained)
        self.global_values = {}  # ... and its constrained values

    # -- sampler state for checkpoints ---------------------------------------------------
    def state_dict(self):
        return {
            "local_precond": self.local_precond,
            "global_position": self.global_position,
            "global_values": self.global_values,
            "schedule": self.schedule.state_dict(),
            "adaptation": self.adaptation.state_dict() if self.adaptation else None,
        }

    def load_state_dict(self, state):
        self.local_precond = state["local_precond"]
        self.global_position = state["global_position"]
        self.global_values = state["global_values"]
        # a schedule or adaptation of another kind than the checkpoint's starts afresh
        if set(state.get("schedule") or {}) == set(self.schedule.state_dict()):
            self.schedule.load_state_dict(state["schedule"])
        if self.adaptation and state.get("adaptation"):
            self.adaptation.load_state_dict(state["adaptation"])
            self.step_size = self.adaptation.step_size

    # -- one iteration ------------------------------------------------------------------
    def chain_start(self, args, kwargs, iteration, reuse_structure=False):
        """Draw chain starts; returns (guide trace or None, ModelEnergy, start values).

        With ``reuse_structure`` and a batch the last one's structure serves
        (:meth:`_reusable`), the model is not traced here: the last batch's
        :class:`ModelEnergy` is rebound to this batch and the guide's draws (the
        first batch of those shapes was checked against the model)."""
        try:
            if self.warm is not None:
                guide_trace = self.warm.draw(args, kwargs)
                replay = subsample_trace(guide_trace)
                # the model sites' values (an autoguide's auxiliary sites are the guide's own)
                start = {n: v.detach() for n, v in self.warm.values(guide_trace).items()}
                if reuse_structure and self._reusable(args, kwargs, replay, start):
                    return guide_trace, self.structure.rebind(args, kwargs, replay), start
            else:
                guide_trace = None
                with torch.no_grad():
                    prior = poutine.trace(self.model).get_trace(*args, **kwargs)
                replay = subsample_trace(prior)
                start = {n: prior.nodes[n]["value"] for n in latent_sites(prior)}
            if self.global_position is not None:
                start.update(self.global_values)
            for name, value in start.items():  # replay (not condition): latents stay latent
                replay.add_node(name, type="sample", is_observed=False, value=value, infer={})
            with torch.no_grad():
                prototype = poutine.trace(poutine.replay(self.model, trace=replay)).get_trace(*args, **kwargs)
                prototype.compute_log_prob()  # surfaces shape errors between model and batch
            # latents the guide left out (globals on the first batch) start from the prior
            start = {n: prototype.nodes[n]["value"].detach() for n in latent_sites(prototype)}
        except Exception as error:
            message = (
                f"The model or guide failed on iteration {iteration} with a batch of shape(s) "
                f"{batch_shapes(args, kwargs)}: {type(error).__name__}: {error}"
            )
            raise RuntimeError(message) from error
        energy = ModelEnergy(self.model, args, kwargs, prototype, self.data_plate)
        self._check_sites(energy, guide_trace)
        if repr(energy.shapes) not in self.factorising_shapes:  # structural: once per batch shape
            energy.check_factorises(start)
            self.factorising_shapes.add(repr(energy.shapes))
        self.structure = energy
        if self.global_position is None and energy.globals:
            self.group.broadcast([start[n] for n in energy.globals])  # one global chain for all ranks
            self.global_position = energy.unconstrain({n: start[n] for n in energy.globals})
            self.global_values = {n: start[n] for n in energy.globals}
        return guide_trace, energy, start

    def _reusable(self, args, kwargs, replay, start) -> bool:
        """Whether the last batch's structure serves this one: not recorded (a recording takes
        the sites' scales as traced on each batch: a scale from Python state may change), a
        model without global latents (their chain starts from the prototype), the same shapes
        and scalar arguments, the guide drew exactly the local latents, and it replays every
        subsample site the model has (a model-only subsampled plate must be drawn once per
        batch, by the prototype trace, not afresh at every chain step)."""
        structure = self.structure
        return (structure is not None and not self.compiled and not structure.globals
                and structure.shapes == batch_shapes(args, kwargs)
                and set(start) == set(structure.local) and set(structure.replay.nodes) <= set(replay.nodes))

    def _check_sites(self, energy: ModelEnergy, guide_trace):
        if not energy.transforms:
            raise ValueError(
                "The model has no latent sample site: there is nothing for Langevin dynamics to "
                "sample (fit learns parameters through the posterior of latent variables)."
            )
        if self.adjust and energy.globals:
            raise ValueError(
                f"adjust=True needs every latent site to be local to the data plate, but "
                f"{energy.globals} are global (outside plate "
                f"{energy.plate.name if energy.plate else 'None'!r}); their persistent chains "
                "use mini-batch energies, which admit no Metropolis test. Use adjust=False."
            )
        if guide_trace is None:
            return
        guide_sites = set(self.warm.values(guide_trace))
        unknown = sorted(guide_sites - set(energy.transforms))
        if unknown:
            raise ValueError(
                f"The guide samples site(s) {unknown} that are not latent sites of the model "
                f"(model latents: {sorted(energy.transforms)})."
            )
        missing = sorted(set(energy.local) - guide_sites)
        if missing:
            raise ValueError(
                f"The guide does not sample the local latent site(s) {missing} of the model "
                f"(inside plate '{energy.plate.name}'); the warm start needs a draw for every "
                "local latent. Global latents may be left out."
            )
        self.warm.check(guide_trace, energy.transforms)

    def run_chains(self, energy: ModelEnergy, start, keep=None, move_globals=True):
        """K Langevin steps; returns the kept samples (constrained, detached) and chain
        stats: per-step mean acceptance probability, divergence flags, and the mean
        energy drop ``U(z_0) - U(z_K)`` of the local chains.

        ``keep`` overrides the learner's choice; ``move_globals=False`` holds the
        global latents at their current values (diagnostics record local chains)."""
        keep = _kept_steps(self.keep if keep is None else keep, self.num_steps)
        local = energy.unconstrain({n: start[n] for n in energy.local})
        local_precond = self._preconditioner(local)
        if energy.globals and move_globals:
            return self._joint_chains(energy, local, local_precond, keep)
        vag = self.compiled(energy, self.global_values) if self.compiled else \
            langevin.value_and_grad(energy.local_energy(self.global_values))
        state = langevin.init(local, vag, precond=local_precond, batch_ndim=1)
        bad = ~langevin.finite(state.potential, state.grad, batch_ndim=1)
        if bool(bad.any()):  # redraw those starts once, as Pyro's init_to_uniform (see _finite_joint_start)
            local = {k: langevin.select(bad, _uniform(v), v, 1) for k, v in local.items()}
            state = langevin.init(local, vag, precond=local_precond, batch_ndim=1)
        state = self._first_estimate(state)
        initial, start_energy = state.potential, (state.potential, state.grad)
        kept, accept, diverged = [], [], []
        halfway = initial
        for k in range(1, self.num_steps + 1):
            state, info = langevin.step(state, vag, self.step_size, adjust=self.adjust, batch_ndim=1)
            self._accumulate(state)
            accept.append(info.accept_prob.mean())
            diverged.append(info.diverged.any())
            if k in keep:
                kept.append({**energy.constrain(state.position)[0], **self.global_values})
            if k == self.num_steps // 2:
                halfway = state.potential
        self._refresh()
        stats = {"accept": torch.stack(accept), "diverged": torch.stack(diverged),
                 "energy_drop": (initial - state.potential).mean(), "late_drop": (halfway - state.potential).mean(),
                 "start_energy": start_energy}
        return kept, stats

    def _preconditioner(self, local):
        """The local chains' preconditioner: the shared diagonal, or fresh per-chain
        statistics for the per-chain kinds."""
        if self.precondition != "diagonal":
            return langevin.init_preconditioner(self.precondition, local, batch_ndim=1)
        if self.local_precond is None:
            self.local_precond = langevin.init_preconditioner("diagonal", local, batch_ndim=1)
        return self.local_precond

    def _first_estimate(self, state):
        """Before the very first chain, start the shared diagonal from the initial
        gradient instead of ``P = 1`` (which can be far too large a step)."""
        if self.precondition != "diagonal" or state.precond.count or not state.grad:
            return state
        self.local_precond = langevin.accumulate(state.precond, state.grad, 1)
        self._refresh()
        return state._replace(precond=self.local_precond)

    def _joint_chains(self, energy, local, local_precond, keep):
        """Unadjusted joint steps of the local chains and the global chain, one model
        evaluation each. The global chain is plain SGLD (``P = 1``) with step
        ``global_step_size``, by default ``step_size / N``: its posterior's curvature
        grows like N. (A gradient-RMS preconditioner turns its drift into a
        normalised-gradient step of fixed length, which measured far slower.)

        A step whose global energy or gradient is not finite is rejected whole (the chains
        stay), a local chain whose own energy or gradient is not finite stays too; both count
        as divergences. ``accept`` is the local chains' MALA acceptance probability with
        their energies at the moved global values: a diagnostic for ``target_accept`` (the
        global step, of order ``η/N``, changes them little), not a Metropolis test."""
        local, global_, (u_l, g_l), (u_g, g_g) = self._finite_joint_start(energy, local, self.global_position)
        global_step = self.global_step_size or self.step_size / energy.num_data()
        local_state = self._first_estimate(langevin.LangevinState(local, u_l, g_l, local_precond, 0))
        no_precond = langevin.init_preconditioner(None, global_)
        global_state = langevin.LangevinState(global_, u_g, g_g, no_precond, 0)
        initial = halfway = local_state.potential
        kept, accept, diverged = [], [], []
        for k in range(1, self.num_steps + 1):
            lp, _, l_prop, l_noise = langevin.propose(local_state, self.step_size, batch_ndim=1)
            noise = langevin.standard_normal(global_state.position, self.generator)
            _, _, g_prop, _ = langevin.propose(global_state, global_step, noise=noise)
            (u_l, g_l), (u_g, g_g) = self._joint_value_and_grad(energy, l_prop, g_prop)
            prob, local_bad = langevin.accept_probability(local_state, l_prop, l_noise, u_l, g_l, lp,
                                                          self.step_size, batch_ndim=1)
            global_ok = langevin.finite(u_g, g_g)  # alike on every rank (averaged over them)
            moved = ~local_bad & global_ok
            local_state = langevin.where(moved, langevin.LangevinState(l_prop, u_l, g_l, lp, k), local_state, 1)
            global_state = langevin.where(global_ok, langevin.LangevinState(g_prop, u_g, g_g, no_precond, k),
                                          global_state)
            self._accumulate(local_state)
            accept.append(prob.mean())
            diverged.append(~moved.all())
            if k in keep:
                kept.append(energy.constrain({**local_state.position, **global_state.position})[0])
            if k == self.num_steps // 2:
                halfway = local_state.potential
        self.global_position = global_state.position
        self.global_values = energy.constrain(global_state.position)[0]
        self._refresh()
        u_l = local_state.potential
        return kept, {"accept": torch.stack(accept), "diverged": torch.stack(diverged),
                      "energy_drop": (initial - u_l).mean(), "late_drop": (halfway - u_l).mean()}

    def _finite_joint_start(self, energy, local, global_):
        """The joint chains' start and its energies, with every non-finite part redrawn once as
        Pyro's ``init_to_uniform`` does (unconstrained values uniform in (-2, 2)): first the
        local chains whose own energy or gradient is not finite (a Gamma draw that underflowed
        to 0, say), then the global position if its energy still is not."""
        evaluated = self._joint_value_and_grad(energy, local, global_)
        (u_l, g_l), (u_g, g_g) = evaluated
        bad = ~langevin.finite(u_l, g_l, batch_ndim=1)
        if bool(bad.any()):
            local = {k: langevin.select(bad, _uniform(v), v, 1) for k, v in local.items()}
            evaluated = self._joint_value_and_grad(energy, local, global_)
        if not bool(langevin.finite(*evaluated[1])):
            global_ = {k: _uniform(v) for k, v in global_.items()}
            self.group.broadcast(list(global_.values()))  # one global chain for all ranks
            evaluated = self._joint_value_and_grad(energy, local, global_)
        return local, global_, *evaluated

    def adapt(self, row: dict) -> None:
        """After an iteration: the schedule takes its late energy drop, η its acceptance rate;
        after divergent steps η (and a given ``global_step_size``) is halved."""
        if row["late_energy_drop"] is not None:
            self.schedule.update(row["late_energy_drop"])
        if self.adaptation and "accept_rate" in row:
            self.step_size = self.adaptation.update(row["accept_rate"])
        if row["divergences"]:
            self.step_size /= 2.0
            if self.adaptation:
                self.adaptation.log_step_size -= math.log(2.0)
            if self.global_step_size:
                self.global_step_size /= 2.0

    def _joint_value_and_grad(self, energy, local, global_):
        """Local energies and gradients of this rank's chains; the global chain's
        mini-batch energy and gradient averaged over ranks (the same on all)."""
        (u_l, g_l), (u_g, g_g) = energy.joint_value_and_grad(local, global_)
        u_g, *grads = self.group.average([u_g, *g_g.values()])
        return (u_l, g_l), (u_g, dict(zip(g_g, grads)))

    def _accumulate(self, state):
        """Fold the local chains' gradients into the shared diagonal (P itself stays fixed)."""
        if self.precondition == "diagonal" and state.grad:
            self.local_precond = langevin.accumulate(self.local_precond, state.grad, batch_ndim=1)

    def _refresh(self):
        """End of a chain: the shared diagonal takes up the new statistics, averaged
        over ranks (so every rank samples with the same ``P``)."""
        if self.precondition == "diagonal" and self.local_precond is not None:
            moments = self.group.average_dict(self.local_precond.second_moment)
            self.local_precond = langevin.refresh(self.local_precond._replace(second_moment=moments))

    def theta_gradients(self, energy: ModelEnergy, kept):
        """Accumulate ``∇θ -mean_k log p_θ(x, z_k)`` one sample at a time (memory flat in K),
        through the recorded graph with ``jit_compile``.

        Returns ``(params, grads, mean log-joint, last trace)``; no trace from a recording.
        """
        params, grads, total, trace = None, None, 0.0, None
        for values in kept:
            if self.compiled:
                log_p, params, g = self.compiled.log_joint_and_grad(energy, values)
                g = [None if b is None else -b / len(kept) for b in g]
            else:
                log_p, trace = energy.log_joint(values)
                params = _param_tensors(trace)
                g = torch.autograd.grad(-log_p / len(kept), list(params.values()), allow_unused=True) \
                    if params and log_p.requires_grad else [None] * len(params)
            grads = [_add(a, b) for a, b in zip(grads or [None] * len(g), g)]
            total = total + log_p.detach() / len(kept)
        return params, grads, total, trace

    def guide_gradients(self, energy: ModelEnergy, guide_trace, kept, args, kwargs, theta, start_energy=None):
        """Gradients of the warm-start objective with respect to φ (the guide's own params).

        ``start_energy``: the chains' ``(U_i, ∇U)`` at the guide's draws; where the model
        allows (:meth:`ModelEnergy.log_joint_from_energy`), the reverse term takes
        ``log p(x, z_0)`` and its gradient from them instead of evaluating the model again."""
        if self.warm is None:
            return {}, [], None

        def log_joint(values):
            if start_energy is not None and energy.energy_scale is not None:
                return energy.log_joint_from_energy(values, *start_energy)
            return energy.log_joint({**self.global_values, **values})[0]

        loss = self.warm.loss(guide_trace, kept, args, kwargs, log_joint, energy.transforms)
        params = {k: v for k, v in _param_tensors(guide_trace).items() if k not in theta}
        if not params:
            return {}, [], loss.detach()
        if not loss.requires_grad:  # no φ reaches the objective (e.g. a fixed guide)
            return params, [None] * len(params), loss.detach()
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        return params, grads, loss.detach()


    def fused_gradients(self, energy: ModelEnergy, guide_trace, start, args, kwargs):
        """Without chains (K = 0), θ's and φ's gradients from one backward pass.

        The kept sample is the guide's draw ``z_0``, and the warm-start objective's
        reverse term ``log q(z_0) - log p_θ(x, z_0)`` has θ-gradient
        ``-∇θ log p_θ(x, z_0)``, exactly θ's LPC gradient there (the other terms do
        not involve θ): one model evaluation serves both, as in a VAE. Returns
        ``None`` where that does not hold (no reverse term, or θ and φ share
        parameters); otherwise the results of :meth:`theta_gradients` and
        :meth:`guide_gradients`.
        """
        if self.warm is None or self.warm.objective == "forward":
            return None
        evaluated = {}

        def log_joint(values):
            evaluated["log_p"], evaluated["trace"] = energy.log_joint({**self.global_values, **values})
            return evaluated["log_p"]

        loss = self.warm.loss(guide_trace, [start], args, kwargs, log_joint, energy.transforms)
        theta = _param_tensors(evaluated["trace"])
        phi = _param_tensors(guide_trace)
        if set(theta) & set(phi):
            return None
        tensors = list(theta.values()) + list(phi.values())
        grads = torch.autograd.grad(loss, tensors, allow_unused=True) if tensors and loss.requires_grad \
            else [None] * len(tensors)
        log_p = evaluated["log_p"].detach()
        return (theta, grads[:len(theta)], log_p, evaluated["trace"]), (phi, grads[len(theta):], loss.detach())


def _uniform(like: torch.Tensor) -> torch.Tensor:
    """Unconstrained values uniform in (-2, 2), Pyro's ``init_to_uniform``."""
    return torch.rand_like(like).mul_(4.0).sub_(2.0)


def _add(a: Optional[torch.Tensor], b: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return b if a is None else (a if b is None else a + b)


def _apply(optim, params: Dict[str, torch.Tensor], grads):
    """One PyroOptim step on ``params`` with the given gradients."""
    stepped = []
    for p, g in zip(params.values(), grads):
        if g is not None:
            p.grad = g
            stepped.append(p)
    if stepped:
        optim(stepped)
    for p in stepped:
        p.grad = None


def _all_finite(tensors) -> bool:
    flags = [torch.isfinite(t).all() for t in tensors if t is not None]
    return bool(torch.stack(flags).all()) if flags else True


def fit(
    model,
    guide=None,
    data=None,
    *,
    num_epochs: int = 1,
    num_steps: Union[int, str, AdaptiveSteps] = 20,
    step_size: float = 1e-2,
    target_accept: Optional[float] = None,
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
    jit_compile: Union[bool, dict] = False,
    batch_args=None,
) -> FitResult:
    r"""Learn the parameters θ of a Pyro ``model`` by Langevin Predictive Coding.

    Each mini-batch: chains start from ``guide`` draws (or the prior when
    ``guide=None``), take ``num_steps`` Langevin steps
    ``z' = z - η P ∇U + sqrt(2ηP) ξ`` on ``U = -log p_θ(x, z)``, then θ takes one
    ``optim`` step on ``-mean_k log p_θ(x, z_k)`` over the kept samples and φ one
    ``guide_optim`` step on the warm-start objective. See the module docstring
    for how local and global latents and subsampled plates are treated.
    Under ``torchrun`` the processes train data-parallel
    (:mod:`pyro_lpc.distributed`).

    :param model: a Pyro model; θ is every ``pyro.param``/``pyro.module`` it uses.
    :param guide: an amortised guide (or a :class:`~pyro_lpc.WarmStart`); φ is
        its parameters that are not also the model's. ``None``: encoder-free.
    :param data: an iterable of batches (a tuple/list batch is passed as
        ``model(*batch)``, a dict as ``model(**batch)``, anything else as
        ``model(batch)``) or a tensor split into shuffled mini-batches of
        ``batch_size`` each epoch.
    :param batch_args: maps each batch of an iterable ``data`` to the model's
        arguments, by the same rule (a tuple: positional, a dict: keyword, else
        one argument): ``batch_args=lambda batch: batch[0]`` trains ``model(x)``
        on a ``DataLoader`` of ``(image, label)`` pairs, as Pyro's VAE example.
    :param num_steps: Langevin steps K per mini-batch: an int (0: θ steps on the
        guide's draws; needs a guide with the reverse or Jeffreys objective),
        ``"auto"`` (:class:`~pyro_lpc.schedule.AdaptiveSteps`: starts at 20,
        halves while the second half of the chains lowers the energy by less than
        1.5 nats per data point, doubles again above 3, down to 0 and up to 20)
        or an :class:`~pyro_lpc.schedule.AdaptiveSteps`. Models with global
        latents run at least one step (their persistent chain keeps moving).
    :param float step_size: Langevin step size η of the local chains (the
        initial one with ``target_accept``).
    :param float target_accept: adapt η after every iteration so that the local
        chains' mean MALA acceptance probability tracks this value
        (:class:`~pyro_lpc.schedule.StepSizeAdaptation`); ``None``: η fixed.
    :param float global_step_size: step size of the global chain, plain SGLD
        (default ``step_size / N``, N the data plate's full size: a global
        posterior's curvature grows like N). ``precondition`` applies to the
        local chains.
    :param precondition: ``"diagonal"`` (shared by all chains, carried across
        mini-batches, constant within a chain), ``"rmsprop"``/``"adam"`` (the
        paper's per-chain forms) or ``None``.
    :param bool adjust: Metropolis-adjust the local chains (MALA).
    :param str warm_start: the guide's objective, ``"forward"``, ``"reverse"``
        or ``"jeffreys"`` (ignored when ``guide`` is a ``WarmStart``).
    :param keep: which samples feed θ: ``"last"`` (default), ``"all"``, an int
        burn-in or a ``slice`` of the K samples (``slice(4, None, 5)``: every 5th).
        Each kept sample costs one more model gradient: on MNIST (K = 20)
        ``"last"`` halves an iteration's cost; per iteration it learns more
        slowly early on, per second it is ahead (docs: Benchmarks).
    :param optim: a ``pyro.optim`` optimiser for θ (default Adam, lr 1e-3).
    :param guide_optim: the same for φ (default Adam, lr 1e-3).
    :param int batch_size: mini-batch size (per process under ``torchrun``).
    :param int seed: seeds Pyro's RNGs before training (rank ``r`` of several
        processes: an independent stream derived from it).
    :param str checkpoint_dir: save a checkpoint there after each epoch.
    :param bool resume: continue from the checkpoint in ``checkpoint_dir``.
    :param str data_plate: name of the plate over data points (default: inferred).
    :param recorder: a :class:`~pyro_lpc.diagnostics.ChainRecorder` that records
        several chains of chosen data points after each epoch, for ArviZ.
    :param jit_compile: ``True``: record the local chains' energy *and its
        gradient* once per batch shape as one graph (:mod:`pyro_lpc.compiled`)
        and run the recording at every step instead of re-running the model
        under Pyro and autograd. A dict: also compile the recording with
        ``torch.compile(**jit_compile)`` (``{}``: Inductor's defaults, some
        seconds to compile per batch shape; ``{"mode": "reduce-overhead"}``:
        CUDA graphs on a GPU). The model's control flow must depend on shapes
        only. Not used while global latents move with the local chains.
    :returns: a :class:`FitResult` with the per-iteration history.

    Example::

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
    """
    if not isinstance(jit_compile, (bool, dict)):
        raise TypeError(f"jit_compile must be True, False or a dict of torch.compile options, got {jit_compile!r}.")
    schedule = steps_schedule(num_steps)
    step_size = langevin.check_step_size(step_size)
    adaptation = None if target_accept is None else StepSizeAdaptation(step_size, target_accept)
    if global_step_size is not None:
        global_step_size = langevin.check_step_size(global_step_size)
    langevin.check_precondition(precondition, adjust)
    keep = _check_keep(keep, schedule.max_steps)
    if guide is not None and not isinstance(guide, WarmStart):
        guide = WarmStart(guide, objective=warm_start)
    if guide is None or guide.objective == "forward":
        _without_zero_steps(schedule, "encoder-free (guide=None)" if guide is None else "warm_start='forward'")
    if recorder is not None and schedule.max_steps == 0 and recorder.num_steps is None:
        raise ValueError("num_steps=0 runs no chains: give the ChainRecorder its own num_steps to record.")
    optim = optim or pyro.optim.Adam({"lr": 1e-3})
    guide_optim = guide_optim or pyro.optim.Adam({"lr": 1e-3})
    for name, o in (("optim", optim), ("guide_optim", guide_optim)):
        if not isinstance(o, pyro.optim.PyroOptim):
            raise TypeError(f"{name} must be a pyro.optim optimiser (e.g. pyro.optim.Adam), got {type(o).__name__}.")
    group = distributed.replicas()
    group.check_same("Whether fit got a checkpoint_dir and a recorder",
                     (checkpoint_dir is not None, recorder is not None))  # both run collectives
    base_seed, generator = group.streams(seed)
    learner = _Learner(model, guide, schedule, step_size, global_step_size, precondition, adjust,
                       keep, optim, guide_optim, data_plate, group, generator, adaptation, jit_compile)
    def step(args, kwargs, iteration, epoch, history):
        return _iterate(learner, args, kwargs, iteration, epoch, history)

    history = run_epochs(
        step, data, batch_size=batch_size, num_epochs=num_epochs, group=group, base_seed=base_seed,
        generator=generator, progress=progress,
        checkpoint_dir=checkpoint_dir, resume=resume, model=model, guide=guide,
        optims={"optim": optim, "guide_optim": guide_optim}, state=learner,
        on_epoch=None if recorder is None else lambda epoch: recorder.record(learner, epoch),
        desc="fit", key="log_joint", batch_args=batch_args,
    )
    return FitResult(history, learner.state_dict())


def _without_zero_steps(schedule, why: str) -> None:
    """K = 0 trains θ on the guide's draws and φ through the reverse KL: refuse it
    (or keep an adaptive schedule at one step or more) when there is no such term."""
    if isinstance(schedule, AdaptiveSteps):
        schedule.min_steps = max(schedule.min_steps, 1)
        schedule.steps = max(schedule.steps, 1)
    elif schedule.max_steps == 0:
        raise ValueError(
            f"num_steps=0 with {why}: without chains θ would step on draws that nothing trains "
            "towards the posterior. Use num_steps >= 1, or a guide with warm_start='reverse' or 'jeffreys'."
        )


def run_epochs(step, data, *, batch_size, num_epochs, group, base_seed, generator, progress, checkpoint_dir,
               resume, model, guide, optims, state=None, on_epoch=None, desc="fit", key="log_joint",
               batch_args=None) -> List[dict]:
    """The epoch loop shared by :func:`fit` and :func:`~pyro_lpc.baselines.fit_svi`.

    ``step(args, kwargs, iteration, epoch, history)`` trains on one mini-batch and
    returns its history row (``time`` is added here). Deals this rank its share
    of each epoch (``group.shard``; a tensor is shuffled with ``generator``; an
    iterable's batches mapped by ``batch_args``), resumes from and writes (rank 0)
    a checkpoint after each epoch (params, ``optims``, every rank's RNG states,
    ``generator``, history and ``state.state_dict()``), and shows a progress bar
    of ``key`` on rank 0. Bad inputs are refused before anything is trained or written.
    """
    _check_inputs(data, num_epochs, batch_args)
    history: List[dict] = []
    start_epoch, elapsed = 0, 0.0
    path = checkpoint_path(checkpoint_dir) if checkpoint_dir else None
    def epoch_batches(epoch):
        batches = minibatches(data, batch_size * group.world_size if batch_size else None, generator=generator,
                              batch_args=batch_args)
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
        for args, kwargs in epoch_batches(epoch):
            if iteration == first:
                _check_call(model, guide, args, kwargs)
            row = step(args, kwargs, iteration, epoch, history)
            row["time"] = time.perf_counter() - clock
            history.append(row)
            iteration += 1
            bar.update(1)
            bar.set_postfix(epoch=epoch, **{key: f"{row[key]:.3f}"}, refresh=False)
        if iteration == first:
            raise ValueError(f"data yielded no mini-batch in epoch {epoch}: nothing was trained or written "
                             "(an iterator is used up after one pass; give a list or a DataLoader).")
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
    """A ``TypeError`` naming ``batch_args`` when a batch's arguments do not fit the
    signature of ``model`` or ``guide`` (a loader's ``(image, label)`` pairs for ``model(x)``)."""
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


def _iterate(learner: _Learner, args, kwargs, iteration, epoch, history) -> dict:
    """One LPC iteration on a mini-batch; nothing is updated unless everything is finite."""
    if not learner.synced:
        _broadcast_params(learner, args, kwargs)
    steps = learner.schedule(iteration)
    guide_trace, energy, start = learner.chain_start(args, kwargs, iteration, reuse_structure=True)
    # global latents keep their persistent chain moving: at least one step then
    learner.num_steps = max(steps, 1 if energy.globals else 0)
    fused = None
    if learner.num_steps:
        with torch.no_grad():
            kept, stats = learner.run_chains(energy, start)
    else:  # no chains: θ steps on the guide's draws
        kept, stats = [start], {"accept": None, "diverged": torch.zeros(0, dtype=torch.bool),
                                "energy_drop": None, "late_drop": None}
        fused = learner.fused_gradients(energy, guide_trace, start, args, kwargs)
    if fused:
        (params, grads, log_joint, trace), (g_params, g_grads, guide_loss) = fused
    else:
        params, grads, log_joint, trace = learner.theta_gradients(energy, kept)
        g_params, g_grads, guide_loss = learner.guide_gradients(energy, guide_trace, kept, args, kwargs, params,
                                                                stats.get("start_energy"))
    accept = None if stats["accept"] is None else stats["accept"].mean()
    # one all-reduce: every rank steps with the gradients, reports the figures of the global batch
    # and adapts K and η alike
    n, m = len(grads), len(g_grads)
    reduced = learner.group.average(
        list(grads) + list(g_grads) + [log_joint, guide_loss, accept, stats["energy_drop"], stats["late_drop"]],
        like=list(params.values()) + list(g_params.values()) + [log_joint] * 5,
    )
    grads, g_grads, (log_joint, guide_loss, accept, drop, late) = reduced[:n], reduced[n:n + m], reduced[n + m:]
    checks = [log_joint] + list(grads) + list(g_grads) + ([guide_loss] if guide_loss is not None else [])
    if not _all_finite(checks):
        if trace is None:  # θ's gradient came from a recording: trace the last sample for the report
            with torch.no_grad():
                trace = energy.log_joint(kept[-1])[1]
        _raise_nonfinite(learner, energy, trace, stats, iteration, history)
    _apply(learner.optim, params, grads)
    _apply(learner.guide_optim, g_params, g_grads)
    row = {
        "epoch": epoch,
        "iteration": iteration,
        "log_joint": log_joint.item() / energy.num_data(),
        "guide_loss": None if guide_loss is None else guide_loss.item(),
        "step_size": learner.step_size,
        "num_steps": learner.num_steps,
        "energy_drop": None if drop is None else drop.item(),
        "late_energy_drop": None if late is None else late.item(),
        "divergences": int(stats["diverged"].sum()),
    }
    if accept is not None and (learner.adjust or learner.adaptation):
        row["accept_rate"] = accept.item()
    learner.adapt(row)
    return row


def _broadcast_params(learner: _Learner, args, kwargs):
    """Start every rank from rank 0's parameters (as ``DistributedDataParallel`` does)."""
    learner.synced = True
    if learner.group.world_size == 1:
        return
    register_params(learner.model, learner.warm, args, kwargs)
    store = pyro.get_param_store()
    names = sorted(store.keys())
    learner.group.check_same("The set of Pyro parameters", names)
    learner.group.broadcast([store.get_param(name).unconstrained() for name in names])


def _raise_nonfinite(learner, energy, trace, stats, iteration, history):
    """Stop with the iteration, the offending sites and the first divergent step."""
    sites = nonfinite_in_trace(trace) if trace is not None else []
    diverged = torch.nonzero(stats["diverged"]).flatten()
    where = f"; the chain first diverged at Langevin step {int(diverged[0]) + 1}" if len(diverged) else ""
    raise NonFiniteError(
        f"Non-finite log-joint or gradient at iteration {iteration}: non-finite log-density at "
        f"site(s) {sites or 'none found at the last sample'}{where}. The parameters were not "
        f"updated and hold their last finite values; try a smaller step_size "
        f"(now {learner.step_size:g}) or a smaller learning rate.",
        FitResult(list(history), learner.state_dict()),
    )


