r"""`LPC`: one Langevin Predictive Coding iteration per call, shaped like `pyro.infer.SVI`.

For each mini-batch `x` (docs: Concepts, "The algorithm"):

1. start chains at `z_0 ~ q_φ(z | x)` (or the prior, encoder-free);
2. take `K` preconditioned Langevin steps on `U_θ(z) = -log p_θ(x, z)`
   ([`pyro_lpc.chains`][pyro_lpc.chains]; `K` fixed or adapted per mini-batch,
   [`pyro_lpc.schedule`][pyro_lpc.schedule]; with `K = 0` θ steps on the guide's draws);
3. step θ on `-mean_k log p_θ(x, z_k)` over the kept samples (z detached);
4. step φ on the warm-start objective (`pyro_lpc.warm_start`).

**Local and global latents.** Latent sites inside the data plate are *local*:
each data point gets its own chain, started afresh every mini-batch, and its
drift uses the per-point energy (its own prior and likelihood only — Pyro's N/B
subsampling scale is right for θ, wrong for a data point's posterior; see
**Scales**). Sites outside it are *global*: one persistent chain carried across
mini-batches, driven by the *scaled* mini-batch energy (stochastic-gradient
Langevin, unpreconditioned, step `step_size / N` by default). Global chains
are never Metropolis-adjusted (a mini-batch energy admits no exact test), so
`adjust=True` requires all latents to be local. The data plate is the
outermost plate shared by all observed sites, or the one named by
`data_plate`.

**Scales.** A site's Pyro scale is the product of subsampling factors (N/B of the
data plate, and of an inner subsampled plate) and the user's own
(`poutine.scale`: β-VAE or annealing weights, tempering). The local chains'
per-point energy divides out the subsampling factors only; θ's step and the
global chain see Pyro's full scales, as `SVI` and Pyro's HMC potential do. A
site outside the data plate whose log-density depends on local latents couples
the data points and is refused ([`check_factorises`][pyro_lpc.potential.SplitEnergy.check_factorises]).
"""
from __future__ import annotations

import copy
from typing import Dict, Optional, Union

import pyro
import pyro.poutine as poutine
import torch

from . import chains, distributed, langevin, persistent
from .checkpoint import register_params
from .compiled import CompiledEnergies
from .potential import SplitEnergy, PyroEvaluation, batch_shapes, latent_sites, nonfinite_in_trace, \
    param_grads, param_tensors, subsample_trace
from .schedule import AdaptiveSteps, StepSizeAdaptation, steps_schedule
from .warm_start import WarmStart, check_guide_sites


class NonFiniteError(RuntimeError):
    """Training hit a non-finite log-joint or gradient; `result` holds what was done so far
    (a [`FitResult`][pyro_lpc.FitResult] when raised through [`fit`][pyro_lpc.fit.fit])."""

    def __init__(self, message, result=None):
        super().__init__(message)
        self.result = result


class LPC:
    r"""Langevin Predictive Coding, one mini-batch per [`step`][pyro_lpc.LPC.step], as `pyro.infer.SVI`.

    `step(*args, **kwargs)` runs the model's chains on one mini-batch (the model's
    arguments), takes one `optim` step on θ and one `guide_optim` step on φ, and
    returns the iteration's figures. [`fit`][pyro_lpc.fit.fit] is a loop over it; write
    your own for learning-rate schedules, callbacks or evaluation on the way.

    Args:
        model: a Pyro model; θ is every `pyro.param`/`pyro.module` it uses.
        guide: an amortised guide (or a [`WarmStart`][pyro_lpc.WarmStart]); φ is its
            parameters that are not also the model's. `None`: encoder-free (chains
            start from the prior).
        optim: a `pyro.optim` optimiser for θ (a `pyro.optim` LR scheduler too:
            step it yourself, e.g. once per epoch).
        guide_optim: the same for φ (default Adam, lr 1e-3).
        num_steps: Langevin steps K per mini-batch: an int (0: θ steps on the
            guide's draws; needs a guide with the reverse or Jeffreys objective),
            `"auto"` ([`AdaptiveSteps`][pyro_lpc.schedule.AdaptiveSteps]) or an
            [`AdaptiveSteps`][pyro_lpc.schedule.AdaptiveSteps] (copied: the object passed in is
            not changed). Models with global latents run at least one step.
        step_size (float): Langevin step size η of the local chains (the initial
            one with `target_accept_prob`). After an iteration with divergent steps
            it is halved.
        target_accept_prob (float): adapt η after every iteration so that the local
            chains' mean MALA acceptance probability tracks this value
            ([`StepSizeAdaptation`][pyro_lpc.schedule.StepSizeAdaptation]); `None`: η fixed.
        global_step_size (float): step size of the global chain, plain SGLD
            (default `step_size / N`, N the data plate's full size).
        precondition: `"diagonal"` (shared by all chains, carried across
            mini-batches, constant within a chain), `"rmsprop"`/`"adam"` (the
            paper's per-chain forms, ULA only) or `None`.
        adjust (bool): Metropolis-adjust the local chains (MALA).
        warm_start (str): the guide's objective, `"forward"`, `"reverse"`
            or `"jeffreys"` (ignored when `guide` is a `WarmStart`).
        keep: which samples feed θ: `"last"` (default), `"all"`, an int
            burn-in or a `slice` of the K samples (`slice(4, None, 5)`: every 5th).
        data_plate (str): name of the plate over data points (default: the
            outermost plate shared by the observed sites).
        jit_compile (bool): record the local chains' energy *and its gradient*
            once per batch shape as one graph ([`pyro_lpc.compiled`][pyro_lpc.compiled]) and replay it
            instead of re-running the model under Pyro and autograd (as Pyro's HMC
            `jit_compile`). The model's control flow must depend on shapes only.
        jit_options (dict): with `jit_compile`, also compile the recording with
            `torch.compile(**jit_options)` (`{}`: Inductor's defaults;
            `{"mode": "reduce-overhead"}`: CUDA graphs on a GPU).
        generator: a CPU `torch.Generator` for the global chain's noise
            (drawn alike on every process under `torchrun`); default: one seeded
            from torch's random stream.
        persistent_chains (bool): keep each data point's local chain state across visits
            (epochs), by dataset index, and start each visit from it or from a fresh guide
            draw by an independence Metropolis choice ([`pyro_lpc.persistent`][pyro_lpc.persistent]):
            a point seen E times has had E·K steps. The indices come from
            `step(..., data_indices=idx)` or a subsampled data plate. The store holds one
            copy of the local latents per data point (MNIST, 50 latents: 12 MB).

    Example, with a learning-rate schedule and an evaluation every 10 steps:

    ```python
    >>> import pyro, pyro.distributions as dist, torch
    >>> from pyro_lpc import LPC
    >>> def model(x):
    ...     w = pyro.param("w", torch.ones(2))
    ...     with pyro.plate("data", x.shape[0]):
    ...         z = pyro.sample("z", dist.Normal(0.0, 1.0))
    ...         pyro.sample("x", dist.Normal(z[:, None] * w, 0.5).to_event(1), obs=x)
    >>> scheduler = pyro.optim.ExponentialLR({"optimizer": torch.optim.Adam,
    ...                                       "optim_args": {"lr": 0.01}, "gamma": 0.9})
    >>> lpc = LPC(model, None, scheduler, num_steps=5)
    >>> data = torch.randn(64, 2)
    >>> for epoch in range(2):
    ...     for i, x in enumerate(data.split(16)):
    ...         figures = lpc.step(x)
    ...         if i % 10 == 0:
    ...             pass  # evaluate, log figures["log_joint"], ...
    ...     scheduler.step()
    >>> sorted(figures)[:4]
    ['divergences', 'energy_drop', 'guide_loss', 'iteration']

    ```
    """

    def __init__(self, model, guide, optim, *, guide_optim=None, num_steps: Union[int, str, AdaptiveSteps] = 20,
                 step_size: float = 1e-2, target_accept_prob: Optional[float] = None,
                 global_step_size: Optional[float] = None, precondition: Optional[str] = "diagonal",
                 adjust: bool = False, warm_start: str = "jeffreys", keep: Union[str, int, slice] = "last",
                 data_plate: Optional[str] = None, jit_compile: bool = False, jit_options: Optional[dict] = None,
                 generator: Optional[torch.Generator] = None, persistent_chains: bool = False):
        if not isinstance(jit_compile, bool):
            raise TypeError(f"jit_compile must be True or False, got {jit_compile!r} (torch.compile options go "
                            "in jit_options).")
        if jit_options is not None and not jit_compile:
            raise ValueError(f"jit_options={jit_options!r} compiles the recording that jit_compile=True makes; "
                             "pass jit_compile=True too.")
        self.schedule = copy.deepcopy(steps_schedule(num_steps))
        self.step_size = langevin.check_step_size(step_size)
        self.adaptation = None if target_accept_prob is None else \
            StepSizeAdaptation(self.step_size, target_accept_prob)
        self.global_step_size = None if global_step_size is None else langevin.check_step_size(global_step_size)
        langevin.check_precondition(precondition, adjust)
        self.keep = check_keep(keep, self.schedule.max_steps)
        if guide is not None and not isinstance(guide, WarmStart):
            guide = WarmStart(guide, objective=warm_start)
        if guide is None or guide.objective == "forward":
            _without_zero_steps(self.schedule, "encoder-free (guide=None)" if guide is None
                                else "warm_start='forward'")
        guide_optim = guide_optim or pyro.optim.Adam({"lr": 1e-3})
        for name, o in (("optim", optim), ("guide_optim", guide_optim)):
            if not isinstance(o, pyro.optim.PyroOptim):
                raise TypeError(f"{name} must be a pyro.optim optimiser (e.g. pyro.optim.Adam), "
                                f"got {type(o).__name__}.")
        self.model, self.warm, self.optim, self.guide_optim = model, guide, optim, guide_optim
        self.precondition, self.adjust, self.data_plate = precondition, adjust, data_plate
        # the energy's backend, chosen once: through Pyro, or recorded (and compiled)
        self.backend = CompiledEnergies(jit_options) if jit_compile else PyroEvaluation()
        self.group = distributed.replicas()  # the ranks training together (one process: SingleProcess)
        if generator is None:  # alike on every rank: rank 0's draw from torch's stream
            generator = torch.Generator().manual_seed(self.group.broadcast_object(int(torch.randint(2**62, ()))))
        self.generator = generator
        self.sampler_state = chains.SamplerState()
        if not isinstance(persistent_chains, bool):
            raise TypeError(f"persistent_chains must be True or False, got {persistent_chains!r}.")
        #: the persistent chains' states by dataset index ([`ChainStore`][pyro_lpc.persistent.ChainStore]), or `None`
        self.chain_store = persistent.ChainStore() if persistent_chains else None
        self.iteration = 0
        self._synced = False  # parameters broadcast from rank 0 yet?
        self._structure = None  # the last batch's SplitEnergy, reused by later batches of its shapes
        self._factorising_shapes = set()  # batch shapes whose model was checked to factorise

    @property
    def max_steps(self) -> int:
        """The most Langevin steps an iteration takes."""
        return self.schedule.max_steps

    # -- checkpoints ---------------------------------------------------------------------
    def state_dict(self) -> dict:
        """What a resumed run needs besides the parameters and optimisers: the sampler state
        ([`SamplerState`][pyro_lpc.chains.SamplerState]), the step sizes, the schedule and adaptation, and
        with `persistent_chains` the stored chain states (`chain_store`)."""
        return {
            **self.sampler_state._asdict(),
            "step_size": self.step_size,
            "global_step_size": self.global_step_size,
            "iteration": self.iteration,
            "generator": self.generator.get_state(),
            "schedule": self.schedule.state_dict(),
            "adaptation": self.adaptation.state_dict() if self.adaptation else None,
            "chain_store": self.chain_store.state_dict() if self.chain_store else None,
        }

    def load_state_dict(self, state: dict) -> None:
        self.sampler_state = chains.SamplerState(state["local_precond"], state["global_position"], state["global_values"])
        self.step_size = state.get("step_size", self.step_size)
        self.global_step_size = state.get("global_step_size", self.global_step_size)
        self.iteration = state.get("iteration", self.iteration)
        if "generator" in state:
            self.generator.set_state(state["generator"].cpu())
        # a schedule or adaptation of another kind than the checkpoint's starts afresh
        if set(state.get("schedule") or {}) == set(self.schedule.state_dict()):
            self.schedule.load_state_dict(state["schedule"])
        if self.adaptation and state.get("adaptation"):
            self.adaptation.load_state_dict(state["adaptation"])
            self.step_size = self.adaptation.step_size
        if self.chain_store is not None and state.get("chain_store"):
            self.chain_store.load_state_dict(state["chain_store"])

    # -- one iteration ---------------------------------------------------------------------
    def step(self, *args, **kwargs) -> Dict[str, Optional[float]]:
        """One LPC iteration on the mini-batch `model(*args, **kwargs)`; returns its figures:
        `iteration`, `log_joint` (mean over kept samples of the scaled mini-batch
        `log p(x, z)` divided by the data plate's full size N: the full-data log-joint per
        data point), `guide_loss`, `step_size`, `num_steps` (this iteration's K),
        `energy_drop`/`late_energy_drop` ([`ChainsInfo`][pyro_lpc.chains.ChainsInfo]),
        `divergences`, with MALA or `target_accept_prob` `accept_rate` and with
        `persistent_chains` `stored_starts` (the fraction of chains that started from their
        stored state). Under
        `torchrun` the figures are those of the global batch. Nothing is updated unless
        every gradient is finite ([`NonFiniteError`][pyro_lpc.NonFiniteError] otherwise).

        With `persistent_chains`, the keyword `data_indices` (a 1-d integer tensor, one
        dataset index per data point of the batch) is taken by `step`, not passed to the
        model; without it the indices come from a subsampled data plate. Without
        `persistent_chains` every keyword goes to the model."""
        indices = kwargs.pop(persistent.INDICES, None) if self.chain_store is not None else None
        if not self._synced:
            self._broadcast_params(args, kwargs)
        steps = self.schedule(self.iteration)
        guide_trace, energy, start = self._chain_start(args, kwargs)
        num_steps = max(steps, 1 if energy.globals else 0)  # a global chain keeps moving
        local = energy.unconstrain({n: start[n] for n in energy.local})
        from_store, at_draw = None, None  # persistent chains: which start from a stored state; (U_i, ∇U) at the draws
        if self.chain_store is not None:
            indices, local, from_store, at_draw = self._persistent_start(energy, guide_trace, local, indices,
                                                                         args, kwargs)
        stored_starts = from_store is not None and bool(from_store.any())
        if stored_starts:
            start = {**start, **energy.constrain(local)[0]}
        state, fused = self.sampler_state, None
        if num_steps:
            with torch.no_grad():
                info, state = self._run_chains(energy, local, num_steps, self.keep, move_globals=True)
            if at_draw is not None:  # the reverse term reads the guide draws' energies, not the starts'
                info = info._replace(start_energy=at_draw)
        else:  # no chains: θ steps on the starts (the guide's draws, or stored states)
            info = chains.ChainsInfo([start], torch.zeros(0), torch.zeros(0, dtype=torch.bool), None, None,
                                     at_draw, local)
            if not stored_starts:
                fused = self._fused_gradients(energy, guide_trace, start, args, kwargs)
        if fused:
            (params, grads, log_joint, trace), (g_params, g_grads, guide_loss) = fused
        else:
            params, grads, log_joint, trace = self._theta_gradients(energy, info.kept)
            g_params, g_grads, guide_loss = self._guide_gradients(energy, guide_trace, info, args, kwargs, params,
                                                                  state.global_values)
        accept = info.accept.mean() if len(info.accept) else None
        divergences = info.diverged.sum().to(log_joint.dtype)
        stored = None if from_store is None else from_store.to(log_joint.dtype).mean()
        # one all-reduce: every rank steps with the gradients, reports the global batch's figures
        # and adapts K and η alike
        n, m = len(grads), len(g_grads)
        reduced = self.group.average(
            list(grads) + list(g_grads) + [log_joint, guide_loss, accept, info.energy_drop, info.late_drop,
                                           divergences, stored],
            like=list(params.values()) + list(g_params.values()) + [log_joint] * 7,
        )
        grads, g_grads = reduced[:n], reduced[n:n + m]
        log_joint, guide_loss, accept, drop, late, divergences, stored = reduced[n + m:]
        checks = [log_joint] + list(grads) + list(g_grads) + ([guide_loss] if guide_loss is not None else [])
        if not _all_finite(checks):
            if trace is None:  # θ's gradient came from a recording: trace the last sample for the report
                with torch.no_grad():
                    trace = energy.log_joint(info.kept[-1])[1]
            self._raise_nonfinite(trace, info)
        _apply(self.optim, params, grads)
        _apply(self.guide_optim, g_params, g_grads)
        self.sampler_state = state
        if self.chain_store is not None:  # every rank stores the global batch's final states
            names = list(info.final)
            indices, *final = self.group.gather_rows([indices] + [info.final[n] for n in names])
            self.chain_store.update(indices, dict(zip(names, final)))
        figures = {
            "iteration": self.iteration,
            "log_joint": log_joint.item() / energy.num_data(),
            "guide_loss": None if guide_loss is None else guide_loss.item(),
            "step_size": self.step_size,
            "num_steps": num_steps,
            "energy_drop": None if drop is None else drop.item(),
            "late_energy_drop": None if late is None else late.item(),
            "divergences": round(divergences.item() * self.group.world_size),
        }
        if stored is not None:
            figures["stored_starts"] = stored.item()
        if accept is not None and (self.adjust or self.adaptation):
            figures["accept_rate"] = accept.item()
        self._adapt(None if accept is None else accept.item(), figures["late_energy_drop"], figures["divergences"])
        self.iteration += 1
        return figures

    def sample_chains(self, *args, num_steps: Optional[int] = None, keep="all", **kwargs):
        """Run the chains on the batch `model(*args, **kwargs)` without training: the global
        latents held at their current values, nothing of this object's state changed (its
        random draws do advance torch's stream). Returns the batch's
        [`SplitEnergy`][pyro_lpc.potential.SplitEnergy] and [`ChainsInfo`][pyro_lpc.chains.ChainsInfo]
        (`keep` as for the constructor; `num_steps` default [`max_steps`][pyro_lpc.LPC.max_steps])."""
        structure, state = self._structure, self.sampler_state
        if self.chain_store is not None:
            kwargs.pop(persistent.INDICES, None)  # the chains start from the guide; the store is left alone
        try:
            with torch.no_grad():
                _, energy, start = self._chain_start(args, kwargs, reuse_structure=False)
                num_steps = num_steps or self.max_steps
                local = energy.unconstrain({n: start[n] for n in energy.local})
                info, _ = self._run_chains(energy, local, num_steps, check_keep(keep, num_steps), move_globals=False)
        finally:
            self._structure, self.sampler_state = structure, state
        return energy, info

    def _adapt(self, accept: Optional[float], late_drop: Optional[float], divergences: int) -> None:
        """After an iteration: the schedule takes its late energy drop, η its acceptance rate;
        after divergent steps η (and a given `global_step_size`) is halved."""
        if late_drop is not None:
            self.schedule.update(late_drop)
        if self.adaptation and accept is not None:
            self.step_size = self.adaptation.update(accept)
        if divergences:
            self.step_size = self.adaptation.halve() if self.adaptation else self.step_size / 2.0
            if self.global_step_size:
                self.global_step_size /= 2.0

    def _chain_start(self, args, kwargs, reuse_structure=True):
        """Draw chain starts; returns (guide trace or None, SplitEnergy, start values).

        With `reuse_structure` and a batch the last one's structure serves
        (`_reusable`), the model is not traced here: the last batch's
        [`SplitEnergy`][pyro_lpc.potential.SplitEnergy] is rebound to this batch and the guide's draws (the
        first batch of those shapes was checked against the model)."""
        try:
            guide_trace, replay, start = draw_starts(self.model, self.warm, args, kwargs)
            if guide_trace is not None and reuse_structure and self._reusable(args, kwargs, replay, start):
                return guide_trace, self._structure.rebind(args, kwargs, replay), start
            if self.sampler_state.global_position is not None:
                start.update(self.sampler_state.global_values)
            prototype, start = prototype_trace(self.model, args, kwargs, replay, start)
        except Exception as error:
            message = (
                f"The model or guide failed on iteration {self.iteration} with a batch of shape(s) "
                f"{batch_shapes(args, kwargs)}: {type(error).__name__}: {error}"
            )
            raise RuntimeError(message) from error
        energy = SplitEnergy(self.model, args, kwargs, prototype, self.data_plate)
        check_sites(energy, self.warm, guide_trace, self.adjust)
        if repr(energy.shapes) not in self._factorising_shapes:  # structural: once per batch shape
            energy.check_factorises(start)
            self._factorising_shapes.add(repr(energy.shapes))
        self._structure = energy
        if self.sampler_state.global_position is None and energy.globals:
            self.group.broadcast([start[n] for n in energy.globals])  # one global chain for all ranks
            values = {n: start[n] for n in energy.globals}
            self.sampler_state = self.sampler_state._replace(global_position=energy.unconstrain(values),
                                                             global_values=values)
        return guide_trace, energy, start

    def _reusable(self, args, kwargs, replay, start) -> bool:
        """Whether the last batch's structure serves this one: not recorded (a recording takes
        the sites' scales as traced on each batch: a scale from Python state may change), a
        model without global latents (their chain starts from the prototype), the same shapes
        and scalar arguments, the guide drew exactly the local latents, and it replays every
        subsample site the model has (a model-only subsampled plate must be drawn once per
        batch, by the prototype trace, not afresh at every chain step)."""
        structure = self._structure
        return (structure is not None and self.backend.traces_every_call and not structure.globals
                and structure.shapes == batch_shapes(args, kwargs)
                and set(start) == set(structure.local) and set(structure.replay.nodes) <= set(replay.nodes))

    def _persistent_start(self, energy: SplitEnergy, guide_trace, local, indices, args, kwargs):
        """The batch's dataset indices, each chain's start (unconstrained, chain-first: the stored state or
        the draw `local`, [`choose_starts`][pyro_lpc.persistent.choose_starts]), which are stored states,
        and the energies at the guide's draws (`None` if not evaluated)."""
        if not energy.local:
            raise ValueError(f"persistent_chains=True keeps the chains of local latents (inside the data plate), "
                             f"but every latent of the model is global: {energy.globals}.")
        persistent.check_guide(guide_trace, energy)
        indices = persistent.batch_indices(indices, energy, next(iter(local.values())).shape[0])
        stored, seen = self.chain_store.lookup(indices, local)
        if not bool(seen.any()):
            return indices, local, seen, None
        evaluate = self.backend.evaluation(energy, self.sampler_state.global_values, False)
        with torch.no_grad():
            local, from_store, at_draw = persistent.choose_starts(lambda position: evaluate(position, {})[0],
                                                                  energy, self.warm, guide_trace, args, kwargs,
                                                                  local, stored, seen)
        return indices, local, from_store, at_draw

    def _run_chains(self, energy: SplitEnergy, local, num_steps: int, keep, move_globals: bool):
        """The chains from the unconstrained chain-first starts `local`
        ([`pyro_lpc.chains.run`][pyro_lpc.chains.run]); `move_globals=False` holds the global latents at
        their current values."""
        move_globals = move_globals and bool(energy.globals)
        evaluate = self.backend.evaluation(energy, self.sampler_state.global_values, move_globals)
        state = self.sampler_state
        if move_globals:
            evaluate = self._averaged(evaluate)
        else:
            state = state._replace(global_position=None)
        settings = chains.ChainSettings(
            num_steps, self.step_size, self.adjust, self.precondition, frozenset(kept_steps(keep, num_steps)),
            self.global_step_size or self.step_size / energy.num_data())
        info, carried = chains.run(evaluate, local, state, settings, constrain=lambda p: energy.constrain(p)[0],
                                   generator=self.generator, group=self.group)
        if not move_globals:
            carried = carried._replace(global_position=self.sampler_state.global_position)
        return info, carried

    def _averaged(self, evaluate):
        """The global chain's energy and gradient averaged over ranks (the same on all)."""
        def averaged(local, global_):
            (u_l, g_l), (u_g, g_g) = evaluate(local, global_)
            u_g, *grads = self.group.average([u_g, *g_g.values()])
            return (u_l, g_l), (u_g, dict(zip(g_g, grads)))
        return averaged

    def _theta_gradients(self, energy: SplitEnergy, kept):
        """Accumulate `∇θ -mean_k log p_θ(x, z_k)` one sample at a time (memory flat in K).

        Returns `(params, grads, mean log-joint, last trace)`; no trace from a recording.
        """
        params, grads, total, trace = None, None, 0.0, None
        for values in kept:
            log_p, params, g, trace = self.backend.theta_loss_and_grad(energy, values, len(kept))
            grads = [_add(a, b) for a, b in zip(grads or [None] * len(g), g)]
            total = total + log_p / len(kept)
        return params, grads, total, trace

    def _guide_gradients(self, energy: SplitEnergy, guide_trace, info: chains.ChainsInfo, args, kwargs, theta,
                         global_values):
        """Gradients of the warm-start objective with respect to φ (the guide's own params).

        Where the model allows
        ([`SplitEnergy.log_joint_from_energy`][pyro_lpc.potential.SplitEnergy.log_joint_from_energy]), the
        reverse term takes `log p(x, z_0)` and its gradient from the chains' start energies instead of
        evaluating the model again."""
        if self.warm is None:
            return {}, [], None

        def log_joint(values):
            if info.start_energy is not None and energy.energy_scale is not None:
                return energy.log_joint_from_energy(values, *info.start_energy)
            return energy.log_joint({**global_values, **values})[0]  # the global chain's values after its moves

        loss = self.warm.loss(guide_trace, info.kept, args, kwargs, log_joint, energy.transforms)
        params = {k: v for k, v in param_tensors(guide_trace).items() if k not in theta}
        if not params:
            return {}, [], loss.detach()
        return params, param_grads(loss, list(params.values())), loss.detach()  # None: no φ reaches it

    def _fused_gradients(self, energy: SplitEnergy, guide_trace, start, args, kwargs):
        """Without chains (K = 0), θ's and φ's gradients from one backward pass.

        The kept sample is the guide's draw `z_0`, and the warm-start objective's
        reverse term `log q(z_0) - log p_θ(x, z_0)` has θ-gradient
        `-∇θ log p_θ(x, z_0)`, exactly θ's LPC gradient there (the other terms do
        not involve θ): one model evaluation serves both, as in a VAE. Returns
        `None` where that does not hold (no reverse term, or θ and φ share
        parameters); otherwise the results of `_theta_gradients` and
        `_guide_gradients`.
        """
        if self.warm is None or self.warm.objective == "forward":
            return None
        evaluated = {}

        def log_joint(values):
            evaluated["log_p"], evaluated["trace"] = energy.log_joint({**self.sampler_state.global_values, **values})
            return evaluated["log_p"]

        loss = self.warm.loss(guide_trace, [start], args, kwargs, log_joint, energy.transforms)
        theta = param_tensors(evaluated["trace"])
        phi = param_tensors(guide_trace)
        if set(theta) & set(phi):
            return None
        grads = param_grads(loss, list(theta.values()) + list(phi.values()))
        log_p = evaluated["log_p"].detach()
        return (theta, grads[:len(theta)], log_p, evaluated["trace"]), (phi, grads[len(theta):], loss.detach())

    def _broadcast_params(self, args, kwargs):
        """Start every rank from rank 0's parameters (as `DistributedDataParallel` does)."""
        self._synced = True
        if self.group.world_size == 1:
            return
        register_params(self.model, self.warm, args, kwargs)
        store = pyro.get_param_store()
        names = sorted(store.keys())
        self.group.check_same("The set of Pyro parameters", names)
        self.group.broadcast([store.get_param(name).unconstrained() for name in names])

    def _raise_nonfinite(self, trace, info: chains.ChainsInfo):
        """Stop with the iteration, the offending sites and the first divergent step."""
        sites = nonfinite_in_trace(trace) if trace is not None else []
        diverged = torch.nonzero(info.diverged).flatten()
        where = f"; a chain first diverged at Langevin step {int(diverged[0]) + 1}" if len(diverged) else ""
        raise NonFiniteError(
            f"Non-finite log-joint or gradient at iteration {self.iteration}: non-finite log-density at "
            f"site(s) {sites or 'none found at the last sample'}{where}. The parameters were not "
            f"updated and hold their last finite values; try a smaller step_size "
            f"(now {self.step_size:g}) or a smaller learning rate."
        )


def draw_starts(model, warm: Optional[WarmStart], args, kwargs):
    """A batch's chain starts: `(guide trace, replay, start)` — the guide's trace and the values it
    gives the model's latents (an autoguide's auxiliary sites are its own), or encoder-free
    (`warm=None`) no trace and the prior's draws; `replay` holds the subsample indices drawn."""
    if warm is not None:
        guide_trace = warm.draw(args, kwargs)
        return guide_trace, subsample_trace(guide_trace), {n: v.detach() for n, v in warm.values(guide_trace).items()}
    with torch.no_grad():
        prior = poutine.trace(model).get_trace(*args, **kwargs)
    return None, subsample_trace(prior), {n: prior.nodes[n]["value"] for n in latent_sites(prior)}


def prototype_trace(model, args, kwargs, replay: poutine.Trace, start: dict):
    """One model trace that replays `start` (latents stay latent) and the subsample indices in
    `replay` — what a batch's [`SplitEnergy`][pyro_lpc.potential.SplitEnergy] is built from — and
    the start completed with the prior's draws for latents `start` leaves out (global latents
    the guide has no site for). Shape errors between model and batch surface here."""
    for name, value in start.items():
        replay.add_node(name, type="sample", is_observed=False, value=value, infer={})
    with torch.no_grad():
        prototype = poutine.trace(poutine.replay(model, trace=replay)).get_trace(*args, **kwargs)
        prototype.compute_log_prob()
    return prototype, {n: prototype.nodes[n]["value"].detach() for n in latent_sites(prototype)}


def check_sites(energy: SplitEnergy, warm: Optional[WarmStart], guide_trace, adjust: bool) -> None:
    """Refuse a model without latents, MALA with global latents, and a guide that does not draw
    the model's local latents (or whose warm-start objective is undefined), naming the sites."""
    if not energy.transforms:
        raise ValueError(
            "The model has no latent sample site: there is nothing for Langevin dynamics to "
            "sample (LPC learns parameters through the posterior of latent variables)."
        )
    if adjust and energy.globals:
        raise ValueError(
            f"adjust=True needs every latent site to be local to the data plate, but "
            f"{energy.globals} are global (outside plate "
            f"{energy.plate.name if energy.plate else 'None'!r}); their persistent chains "
            "use mini-batch energies, which admit no Metropolis test. Use adjust=False."
        )
    if guide_trace is None:
        return
    check_guide_sites(guide_trace, energy.transforms, energy.local,
                      why=f" (inside plate '{energy.plate.name if energy.plate else None}'); the warm start "
                          "needs a draw for every local latent. Global latents may be left out.")
    warm.check(guide_trace, energy.transforms)


def check_keep(keep, max_steps: int):
    """`keep` if it selects samples of a K-step chain (`"all"`, `"last"`, an int burn-in
    below `max_steps` or a slice), else a `ValueError` naming it."""
    if keep in ("all", "last"):
        return keep
    if isinstance(keep, slice):
        try:
            kept_steps(keep, max(max_steps, 1))
            return keep
        except (ValueError, TypeError) as error:
            raise ValueError(f"keep={keep!r} is not a usable slice of the samples: {error}") from None
    if isinstance(keep, int) and not isinstance(keep, bool) and 0 <= keep < max(max_steps, 1):
        return keep
    raise ValueError(
        f"keep must be 'all', 'last', an integer burn-in in [0, num_steps={max_steps}) or a slice of "
        f"the samples (e.g. slice(4, None, 5): every 5th), got {keep!r}."
    )


def kept_steps(keep, num_steps: int) -> set:
    """The steps `k` (1-based) whose samples feed the θ gradient; the last when
    `keep` selects none of `num_steps` (a burn-in or slice beyond a short chain)."""
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


def _add(a: Optional[torch.Tensor], b: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return b if a is None else (a if b is None else a + b)


def _apply(optim, params: Dict[str, torch.Tensor], grads):
    """One PyroOptim step on `params` with the given gradients."""
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
