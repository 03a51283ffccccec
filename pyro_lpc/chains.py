r"""One mini-batch's Langevin chains: the loop shared by local-only and local + global latents.

Local latents (inside the data plate) get one chain per data point, started at
`z_0` (the guide's draw or the prior's); global latents, if they move, one
chain shared by the batch, carried across mini-batches in [`SamplerState`][pyro_lpc.chains.SamplerState].
Each step proposes ([`pyro_lpc.langevin.propose`][pyro_lpc.langevin.propose]) for both, evaluates the
energy once at the joint proposal and then

* a local chain moves if its MALA test accepts (`adjust=True`; only without
  moving globals, whose mini-batch energy admits no exact test) or, unadjusted,
  if its energy and gradient are finite;
* the global chain (plain SGLD, `P = 1`) moves if the global energy and
  gradient are finite — otherwise the whole step is rejected. The global energy
  sums every data point's terms, so while global latents move one local chain's
  non-finite proposal rejects every chain's step.

Rejected non-finite proposals are *divergences*. `accept` records the local
chains' MALA acceptance probability at every step (under ULA a diagnostic of
the discretisation error, and what `target_accept_prob` adapts η to; with moving
globals the energies are those at the moved global values — the global step, of
order `η/N`, changes them little). See docs: Concepts, "Local and global latents".

Example: 200 chains of a standard normal, one per data point:

```python
>>> import torch
>>> from pyro_lpc import chains
>>> def evaluate(local, global_):      # (U_i, ∇U_i) per chain; no global latents
...     z = local["z"]
...     return (0.5 * z.square().sum(-1), {"z": z}), (None, {})
>>> torch.manual_seed(0)  # doctest: +ELLIPSIS
<torch._C.Generator object at ...>
>>> settings = chains.ChainSettings(num_steps=300, step_size=0.5, adjust=True, precondition=None,
...                                 kept={300})
>>> info, state = chains.run(evaluate, {"z": torch.zeros(200, 1)}, chains.SamplerState(), settings)
>>> round(info.kept[0]["z"].var().item(), 1)
1.0

```
"""
from __future__ import annotations

from typing import Callable, List, NamedTuple, Optional, Tuple

import torch

from . import langevin
from .distributed import SingleProcess
from .langevin import Position, Preconditioner

#: ``(local, global_) -> ((U_i, ∇_local), (U_global, ∇_global))``; the global part ``(None, {})``
#: when no global latent moves.
JointEvaluation = Callable[[Position, Position], Tuple[Tuple[torch.Tensor, Position], Tuple[Optional[torch.Tensor], Position]]]


class SamplerState(NamedTuple):
    """What the sampler carries from one mini-batch to the next.

    Attributes:
        local_precond: the local chains' shared diagonal preconditioner
            (`"diagonal"`: one running second moment per latent coordinate, averaged
            over chains, steps and mini-batches); `None` before the first chain or
            for the other kinds (their statistics start afresh with each chain).
        global_position: the global chain's unconstrained position (`None`
            before the first mini-batch and for models without global latents).
        global_values: the same, constrained: the values the local chains
            condition on (`{}` without global latents).
    """

    local_precond: Optional[Preconditioner] = None
    global_position: Optional[Position] = None
    global_values: dict = {}


class ChainSettings(NamedTuple):
    """How one mini-batch's chains run.

    Attributes:
        num_steps: K, Langevin steps.
        step_size: η of the local chains.
        adjust: Metropolis-adjust the local chains (MALA); not with moving globals.
        precondition: the local chains' preconditioner kind ([`pyro_lpc.langevin`][pyro_lpc.langevin]).
        kept: the steps `k` (1..K) whose samples are returned.
        global_step_size: η of the global chain (plain SGLD).
    """

    num_steps: int
    step_size: float
    adjust: bool = False
    precondition: Optional[str] = "diagonal"
    kept: frozenset = frozenset()
    global_step_size: Optional[float] = None


class ChainsInfo(NamedTuple):
    """What one mini-batch's chains report.

    Attributes:
        kept: the kept samples, constrained values of every latent site (local
            and global), one dict per kept step.
        accept: per step, the local chains' mean MALA acceptance probability `(K,)`.
        diverged: per step, whether any proposal was rejected as non-finite `(K,)`.
        energy_drop: mean `U_i(z_0) - U_i(z_K)` over the local chains (nats per data point).
        late_drop: mean `U_i(z_{K//2}) - U_i(z_K)`, what [`AdaptiveSteps`][pyro_lpc.schedule.AdaptiveSteps] reads.
        start_energy: `(U_i, ∇U)` at the chains' start (the guide's draws), for the reverse-KL term;
            `None` when a start was redrawn.
        final: the local chains' unconstrained positions after the last step (what
            persistent chains store, [`pyro_lpc.persistent`][pyro_lpc.persistent]).
    """

    kept: List[dict]
    accept: torch.Tensor
    diverged: torch.Tensor
    energy_drop: Optional[torch.Tensor]
    late_drop: Optional[torch.Tensor]
    start_energy: Optional[Tuple[torch.Tensor, Position]]
    final: Optional[Position] = None


def run(evaluate: JointEvaluation, local: Position, state: SamplerState, settings: ChainSettings, *,
        constrain: Callable[[Position], dict] = dict, generator: Optional[torch.Generator] = None,
        group=None) -> Tuple[ChainsInfo, SamplerState]:
    """Run K steps from the unconstrained `local` starts (chain dimension first) and, when
    `state.global_position` is given, of the global chain; return what they report and the
    sampler state to carry on.

    `evaluate` is the energy (`JointEvaluation`), `constrain` maps unconstrained
    positions to site values, `generator` draws the global chain's noise (alike on every
    rank) and `group` ([`pyro_lpc.distributed`][pyro_lpc.distributed]) averages the shared diagonal's
    statistics over ranks.
    """
    group = group or SingleProcess()
    global_ = state.global_position or {}
    local, global_, (u_l, g_l), (u_g, g_g), redrawn = _finite_start(evaluate, local, global_, group)
    start = None if redrawn else (u_l, g_l)
    local_state = langevin.LangevinState(local, u_l, g_l, _preconditioner(settings.precondition, local, state), 0)
    if settings.precondition == "diagonal" and not local_state.precond.count and g_l:
        # before the very first chain: P from the initial gradient, not P = 1 (often far too large a step)
        local_state = local_state._replace(precond=_refresh(_accumulate(local_state.precond, local_state), group))
    no_precond = langevin.init_preconditioner(None, global_)
    global_state = langevin.LangevinState(global_, u_g, g_g, no_precond, 0)
    initial = halfway = local_state.potential
    kept, accept, diverged = [], [], []
    for k in range(1, settings.num_steps + 1):
        lp, _, l_prop, l_noise = langevin.propose(local_state, settings.step_size, batch_ndim=1)
        g_prop = global_state.position
        if global_:
            noise = langevin.standard_normal(global_state.position, generator)
            g_prop = langevin.propose(global_state, settings.global_step_size, noise=noise)[2]
        (u_l, g_l), (u_g, g_g) = evaluate(l_prop, g_prop)
        prob, local_bad = langevin.accept_probability(local_state, l_prop, l_noise, u_l, g_l, lp,
                                                      settings.step_size, batch_ndim=1)
        moved = torch.rand_like(prob) < prob if settings.adjust else ~local_bad
        bad = local_bad.any()
        if global_:
            global_ok = langevin.finite(u_g, g_g)  # alike on every rank (averaged over them)
            moved, bad = moved & global_ok, bad | ~global_ok
            global_state = langevin.where(global_ok, langevin.LangevinState(g_prop, u_g, g_g, no_precond, k),
                                          global_state)
        local_state = langevin.where(moved, langevin.LangevinState(l_prop, u_l, g_l, lp, k), local_state, 1)
        if settings.precondition == "diagonal":  # fold the gradients in; P stays fixed within the chain
            local_state = local_state._replace(precond=_accumulate(local_state.precond, local_state))
        accept.append(prob.mean())
        diverged.append(bad)
        if k in settings.kept:
            kept.append({**state.global_values, **constrain({**local_state.position, **global_state.position})})
        if k == settings.num_steps // 2:
            halfway = local_state.potential
    carried = state
    if settings.precondition == "diagonal":
        carried = carried._replace(local_precond=_refresh(local_state.precond, group))
    if global_:
        carried = carried._replace(global_position=global_state.position,
                                   global_values=constrain(global_state.position))
    final = local_state.potential
    info = ChainsInfo(kept, _stack(accept, torch.float), _stack(diverged, torch.bool), (initial - final).mean(),
                      (halfway - final).mean(), start, local_state.position)
    return info, carried


def _stack(values: list, dtype) -> torch.Tensor:
    return torch.stack(values) if values else torch.zeros(0, dtype=dtype)


def _preconditioner(kind: Optional[str], local: Position, state: SamplerState) -> Preconditioner:
    """The local chains' preconditioner: the shared diagonal carried in `state` (fresh the
    first time), or fresh per-chain statistics for the other kinds."""
    if kind == "diagonal" and state.local_precond is not None:
        return state.local_precond
    return langevin.init_preconditioner(kind, local, batch_ndim=1)


def _accumulate(precond: Preconditioner, state: langevin.LangevinState) -> Preconditioner:
    """Fold the chains' gradients into the shared diagonal; a chain whose energy or gradient is
    not finite (a start still broken after its redraw) contributes zeros, not NaN."""
    ok = langevin.finite(state.potential, state.grad, batch_ndim=1)
    grads = {k: langevin.select(ok, g, torch.zeros_like(g), 1) for k, g in state.grad.items()}
    return langevin.accumulate(precond, grads, batch_ndim=1)


def _refresh(precond: Preconditioner, group) -> Preconditioner:
    """The shared diagonal takes up its new statistics, averaged over ranks (every rank then
    samples with the same `P`)."""
    return langevin.refresh(precond._replace(second_moment=group.average_dict(precond.second_moment)))


def _finite_start(evaluate: JointEvaluation, local: Position, global_: Position, group):
    """The start, its energies, and whether it was redrawn: every non-finite part is redrawn
    once as Pyro's `init_to_uniform` does (unconstrained values uniform in (-2, 2)), first
    the local chains whose own energy or gradient is not finite (a Gamma draw that underflowed
    to 0, say), then the global position if the global energy still is not. Decided alike on
    every rank (each evaluation averages over ranks)."""
    evaluated = evaluate(local, global_)
    bad = ~langevin.finite(*evaluated[0], batch_ndim=1)
    redraw = group.average([bad.any().to(torch.get_default_dtype())])[0] > 0
    if redraw:
        local = {k: langevin.select(bad, _uniform(v), v, 1) for k, v in local.items()}
        evaluated = evaluate(local, global_)
    if global_ and not bool(langevin.finite(*evaluated[1])):
        global_ = {k: _uniform(v) for k, v in global_.items()}
        group.broadcast(list(global_.values()))  # one global chain for all ranks
        evaluated = evaluate(local, global_)
    return local, global_, *evaluated, bool(redraw)


def _uniform(like: torch.Tensor) -> torch.Tensor:
    """Unconstrained values uniform in (-2, 2), Pyro's `init_to_uniform`."""
    return torch.rand_like(like).mul_(4.0).sub_(2.0)
