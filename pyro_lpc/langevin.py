r"""Functional core of (preconditioned) Langevin sampling.

Everything here is a small pure function over named states, in the manner of
BlackJAX's `mala.py`: [`init`][pyro_lpc.langevin.init] builds a [`LangevinState`][pyro_lpc.langevin.LangevinState],
[`step`][pyro_lpc.langevin.step] advances it by one Langevin step and returns a
[`LangevinInfo`][pyro_lpc.langevin.LangevinInfo]. The kernel for `pyro.infer.MCMC` and `fit` both run
on these functions.

Positions are dicts `{site: tensor}` in unconstrained space. Every tensor may
carry `batch_ndim` leading *chain* dimensions: many independent chains (for
example one per data point) advance in one vectorised step. The potential
`U(z) = -log p(x, z)` then has shape `batch_shape` (one energy per chain).

One step with diagonal preconditioner `P` (DESIGN.md §2):

```text
z' = z - η P ⊙ ∇U(z) + sqrt(2 η P) ⊙ ξ,      ξ ~ N(0, I)
```

Unadjusted (ULA) this is Euler–Maruyama for the Langevin diffusion whose
stationary law is `exp(-U)`, up to an O(η) bias. Adjusted (MALA) the proposal
is accepted with probability

```text
α = min(1, exp(U(z) - U(z') + log q(z | z') - log q(z' | z))),
log q(z' | z) = -‖z' - z + η P ∇U(z)‖²_{P⁻¹} / (4η) + const,
```

which makes `exp(-U)` exactly invariant when `P` is held fixed.

Preconditioners (`kind`):

* `None` – `P = 1`.
* `"diagonal"` (default) – `P = 1 / (sqrt(v̂) + λ)` from one running
  second-moment estimate `v` of the gradient per latent coordinate, averaged
  over chains; [`step`][pyro_lpc.langevin.step] never changes it, so it is constant within a chain.
  The caller refreshes it with [`accumulate`][pyro_lpc.langevin.accumulate] and
  [`refresh`][pyro_lpc.langevin.refresh] (during warm-up, or between mini-batches).
* `"rmsprop"` – the paper's form: per-chain, per-coordinate statistics
  updated at every step, `v_k = β2 v_{k-1} + (1-β2) g_k²`,
  `v̂_k = v_k / (1 - β2^k)`.
* `"adam"` – as `"rmsprop"`, with the bias-corrected first moment `m̂_k`
  (β1) replacing the gradient in the drift. ULA only.
* `"variance"` (posterior sampling only) – a fixed diagonal `P` set by the
  caller, e.g. the posterior variance estimated during warm-up
  (`pyro_lpc.adaptation`); `P = 1` until then.
* `"dense"` (posterior sampling only) – a fixed full `P = L Lᵀ` over the
  flattened coordinates (sites in `position` order, [`flatten`][pyro_lpc.langevin.flatten]),
  held as its Cholesky factor `L`; the step is
  `z' = z - η P ∇U(z) + sqrt(2η) L ξ` and
  `log q(z' | z) = -(z' - z + ηP∇U)ᵀ P⁻¹ (z' - z + ηP∇U) / (4η)`, by triangular solves.

Example: 1,000 MALA chains on N(0, 1/4), one per row, with a shared diagonal
preconditioner refreshed once after the first 50 steps:

```python
>>> import torch
>>> from pyro_lpc import langevin
>>> _ = torch.manual_seed(0)
>>> potential = langevin.value_and_grad(lambda p: 2.0 * p["z"].square().sum(-1))
>>> state = langevin.init({"z": torch.randn(1000, 1)}, potential, "diagonal", batch_ndim=1)
>>> for k in range(200):
...     state, info = langevin.step(state, potential, 0.5, adjust=True, batch_ndim=1)
...     if k < 50:
...         state = state._replace(precond=langevin.accumulate(state.precond, state.grad, 1))
...     if k == 49:
...         state = state._replace(precond=langevin.refresh(state.precond))
>>> round(state.position["z"].var().item(), 1)
0.2

```
"""
from __future__ import annotations

import math
from typing import Callable, Dict, NamedTuple, Optional

import torch

Position = Dict[str, torch.Tensor]
PotentialAndGrad = Callable[[Position], "tuple[torch.Tensor, Position]"]

PRECONDITIONERS = (None, "diagonal", "rmsprop", "adam")
#: Kinds for posterior sampling only (`PCLangevin`): a fixed `P` set by warm-up adaptation.
SAMPLING_PRECONDITIONERS = PRECONDITIONERS + ("variance", "dense")
#: The paper's per-chain kinds: ``P`` changes at every step, so no Metropolis test is exact.
PER_CHAIN = ("rmsprop", "adam")
#: The MALA acceptance probability that step sizes are tuned towards: optimal for MALA in high
#: dimension (Roberts & Rosenthal 1998).
MALA_TARGET_ACCEPT = 0.574
#: Energy error above which a Metropolis-adjusted step counts as divergent, as in Pyro's HMC and NUTS.
MAX_ENERGY_ERROR = 1000.0
#: Defaults for the preconditioner constants (β1, β2, λ); see docs for how they were chosen.
BETA1, BETA2, EPSILON = 0.9, 0.99, 1e-5


class Preconditioner(NamedTuple):
    """Statistics of a preconditioner.

    `second_moment` holds `v` (per coordinate for `"diagonal"`; per chain
    and coordinate for `"rmsprop"`/`"adam"`), `first_moment` holds `m`
    (`"adam"` only), `count` the number of updates folded into them (for
    bias correction) and `scale` the diagonal `P` that [`step`][pyro_lpc.langevin.step]
    applies (for `"dense"`, the diagonal of `P`, whose keys fix the flattening order).
    `cholesky` is `"dense"`'s lower Cholesky factor `L` of `P` (`None` otherwise).
    """

    kind: Optional[str]
    second_moment: Position
    first_moment: Position
    count: int
    scale: Position
    beta1: float = BETA1
    beta2: float = BETA2
    epsilon: float = EPSILON
    cholesky: Optional[torch.Tensor] = None


class LangevinState(NamedTuple):
    """Where a batch of chains is: position, its potential and gradient, the preconditioner."""

    position: Position
    potential: torch.Tensor
    grad: Position
    precond: Preconditioner
    num_steps: int


class LangevinInfo(NamedTuple):
    r"""What one step did, per chain.

    `accept_prob` is the MALA acceptance probability of the proposal (computed
    for ULA too, as a diagnostic and for step-size adaptation; for `"adam"`
    the forward density uses the momentum drift actually taken); `accepted` is
    whether the chain moved; `diverged` whether the proposal's potential or
    gradient was non-finite. `proposal_potential` is `U` at the proposal;
    `energy_error` is $-\log$ of the unclamped MALA acceptance ratio (`inf` where
    diverged), the Langevin counterpart of HMC's energy error.
    """

    accept_prob: torch.Tensor
    accepted: torch.Tensor
    diverged: torch.Tensor
    proposal_potential: torch.Tensor
    energy_error: torch.Tensor


def check_precondition(kind: Optional[str], adjust: bool = False) -> None:
    """Raise a `ValueError` naming the problem for an invalid preconditioner choice.

    The per-chain kinds cannot be Metropolis-adjusted: their `P_k` is updated from
    the gradient at every step, so the reverse move would use a different `P` than
    the forward one and `q(z | z')` is not the density of any move the chain can
    make (started at N(0, 1), five such "MALA" steps at η = 1 leave variance 0.71).
    """
    if kind not in PRECONDITIONERS:
        raise ValueError(
            f"Unknown preconditioner {kind!r}; choose one of {list(PRECONDITIONERS)}."
        )
    if adjust and kind == "adam":
        raise ValueError(
            "precondition='adam' cannot be Metropolis-adjusted (adjust=True): its drift "
            "uses a momentum term, so the proposal has no tractable density. Use "
            "'diagonal' or None with adjust=True, or pass adjust=False with 'adam'."
        )
    if adjust and kind == "rmsprop":
        raise ValueError(
            "precondition='rmsprop' cannot be Metropolis-adjusted (adjust=True): its "
            "per-chain P changes at every step, so the reverse proposal density uses a "
            "different P than the move and the test is not exact. Use 'diagonal' or None "
            "with adjust=True, or pass adjust=False with 'rmsprop'."
        )


def check_sampling_precondition(kind: Optional[str], adjust: bool = False) -> None:
    """As [`check_precondition`][pyro_lpc.langevin.check_precondition], also accepting the
    posterior-sampling kinds `"variance"` and `"dense"` (fixed `P`, so MALA is exact)."""
    if kind not in SAMPLING_PRECONDITIONERS:
        raise ValueError(
            f"Unknown preconditioner {kind!r}; choose one of {list(SAMPLING_PRECONDITIONERS)}."
        )
    if kind in PRECONDITIONERS:
        check_precondition(kind, adjust)


def check_step_size(step_size) -> float:
    """Return `step_size` as a float, or raise if it is not a finite positive number."""
    try:
        value = float(step_size)
    except (TypeError, ValueError):
        raise TypeError(f"step_size must be a positive number, got {step_size!r}.") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"step_size must be finite and positive, got {step_size!r}.")
    return value


class value_and_grad:
    """Wrap `U(z)` (per-chain energies) as `z -> (U(z), ∇z U(z))`.

    Only the gradient with respect to the positions is computed; no graph is
    kept afterwards. Chains are independent, so `∇ sum_c U_c` gives each
    chain's own gradient. A class rather than a closure so that it pickles.
    """

    def __init__(self, potential_fn: Callable[[Position], torch.Tensor]):
        self.potential_fn = potential_fn

    def __call__(self, position: Position):
        leaves = {k: v.detach().requires_grad_(True) for k, v in position.items()}
        with torch.enable_grad():
            energy = self.potential_fn(leaves)
            grads = torch.autograd.grad(energy.sum(), list(leaves.values()))
        return energy.detach(), dict(zip(leaves, grads))


def _sum_event(x: torch.Tensor, batch_ndim: int) -> torch.Tensor:
    """Sum over all but the `batch_ndim` leading (chain) dims; shape `x.shape[:batch_ndim]`."""
    return x.reshape(x.shape[:batch_ndim] + (-1,)).sum(-1)


def init_preconditioner(
    kind: Optional[str],
    position: Position,
    batch_ndim: int = 0,
    *,
    beta1: float = BETA1,
    beta2: float = BETA2,
    epsilon: float = EPSILON,
) -> Preconditioner:
    """Fresh statistics (`v = 0`, `P = 1`) shaped for `position`."""
    check_sampling_precondition(kind)
    if kind in ("variance", "dense"):
        scale = {k: torch.ones_like(v[(0,) * batch_ndim]) for k, v in position.items()}
        cholesky = None
        if kind == "dense":
            like = next(iter(scale.values()), torch.zeros(()))
            size = sum(v.numel() for v in scale.values())
            cholesky = torch.eye(size, dtype=like.dtype, device=like.device)
        return Preconditioner(kind, {}, {}, 0, scale, beta1, beta2, epsilon, cholesky)
    if kind == "diagonal":
        second = {k: torch.zeros_like(v[(0,) * batch_ndim]) for k, v in position.items()}
    elif kind in ("rmsprop", "adam"):
        second = {k: torch.zeros_like(v) for k, v in position.items()}
    else:
        second = {}
    first = {k: torch.zeros_like(v) for k, v in position.items()} if kind == "adam" else {}
    scale = {k: torch.ones_like(v) for k, v in second.items()}
    return Preconditioner(kind, second, first, 0, scale, beta1, beta2, epsilon)


def accumulate(precond: Preconditioner, grad: Position, batch_ndim: int = 0) -> Preconditioner:
    """Fold one gradient into the running moments (`P` itself is unchanged).

    `"diagonal"` averages `g²` over the chain dimensions first, so all chains
    share one estimate per coordinate; the per-chain kinds keep one per chain.
    `"variance"` and `"dense"` keep no gradient statistics (unchanged).
    """
    if precond.kind in (None, "variance", "dense"):
        return precond
    b1, b2 = precond.beta1, precond.beta2
    second, first = {}, {}
    for name, g in grad.items():
        g2 = g.square()
        if precond.kind == "diagonal" and batch_ndim:
            g2 = g2.mean(dim=tuple(range(batch_ndim)))
        second[name] = precond.second_moment[name].mul(b2).add_(g2, alpha=1 - b2)
        if precond.kind == "adam":
            first[name] = precond.first_moment[name].mul(b1).add_(g, alpha=1 - b1)
    return precond._replace(second_moment=second, first_moment=first, count=precond.count + 1)


def refresh(precond: Preconditioner) -> Preconditioner:
    """Set `P = 1 / (sqrt(v / (1 - β2^n)) + λ)` from the current statistics
    (gradient kinds only; `"variance"` and `"dense"` are unchanged)."""
    if precond.kind in (None, "variance", "dense") or precond.count == 0:
        return precond
    correction = 1.0 - precond.beta2**precond.count
    scale = {
        k: (v / correction).sqrt_().add_(precond.epsilon).reciprocal_()
        for k, v in precond.second_moment.items()
    }
    return precond._replace(scale=scale)


def _drift_direction(precond: Preconditioner, grad: Position) -> Position:
    """The vector multiplied by `P` in the drift: `g`, or `m̂` for `"adam"`."""
    if precond.kind != "adam":
        return grad
    correction = 1.0 - precond.beta1**precond.count
    return {k: m / correction for k, m in precond.first_moment.items()}


def _scale_of(precond: Preconditioner, name: str, like: torch.Tensor) -> torch.Tensor:
    return precond.scale[name] if precond.kind is not None else torch.ones_like(like)


def flatten(position: Position, names, batch_ndim: int = 0) -> torch.Tensor:
    """The sites `names` of `position`, each flattened over its event dims and concatenated
    in that order: shape `batch_shape + (D,)`."""
    return torch.cat([position[k].reshape(position[k].shape[:batch_ndim] + (-1,)) for k in names], -1)


def unflatten(vector: torch.Tensor, like: Position, batch_ndim: int = 0) -> Position:
    """Inverse of [`flatten`][pyro_lpc.langevin.flatten] with `names = list(like)`: split the last
    dim of `vector` into the sites of `like`, shaped as their event dims."""
    out, start = {}, 0
    for name, x in like.items():
        event = x.shape[batch_ndim:]
        size = math.prod(event)
        out[name] = vector[..., start : start + size].reshape(vector.shape[:-1] + event)
        start += size
    return out


def _dense_whiten(precond: Preconditioner, x: Position, batch_ndim: int) -> torch.Tensor:
    """`L⁻¹ x` (flattened) by a triangular solve, for `"dense"`."""
    flat = flatten(x, precond.scale, batch_ndim).unsqueeze(-1)
    return torch.linalg.solve_triangular(precond.cholesky, flat, upper=False).squeeze(-1)


def squared_norm(precond: Preconditioner, x: Position, batch_ndim: int = 0) -> torch.Tensor:
    """`xᵀ P⁻¹ x` per chain, the squared length of `x` in `P`'s metric."""
    if precond.kind == "dense":
        return _dense_whiten(precond, x, batch_ndim).square().sum(-1)
    total = 0.0
    for name, v in x.items():
        total = total + _sum_event(v.square() / _scale_of(precond, name, v), batch_ndim)
    return total


def _log_proposal(
    to: Position, frm: Position, grad_frm: Position, precond, step_size: float, batch_ndim: int
) -> torch.Tensor:
    """`log q(to | frm)` up to a constant that cancels (`P` is the same both ways)."""
    if precond.kind == "dense":
        drift = _dense_drift(precond, grad_frm, batch_ndim)
        diff = {k: x - frm[k] + step_size * drift[k] for k, x in to.items()}
        return -squared_norm(precond, diff, batch_ndim) / (4.0 * step_size)
    total = 0.0
    for name, x in to.items():
        scale = _scale_of(precond, name, x)
        diff = x - frm[name] + step_size * scale * grad_frm[name]
        term = diff.square().div(scale)
        total = total + _sum_event(term, batch_ndim)
    return -total / (4.0 * step_size)


def init(
    position: Position,
    potential_and_grad: PotentialAndGrad,
    precondition: Optional[str] = "diagonal",
    batch_ndim: int = 0,
    precond: Optional[Preconditioner] = None,
) -> LangevinState:
    """Start chains at `position`; reuse `precond` (e.g. a shared diagonal) if given."""
    potential, grad = potential_and_grad(position)
    if precond is None:
        precond = init_preconditioner(precondition, position, batch_ndim)
    return LangevinState(dict(position), potential, grad, precond, 0)


def standard_normal(like: Position, generator: Optional[torch.Generator] = None) -> Position:
    """`ξ ~ N(0, I)` shaped like each tensor of `like`, from the default RNG or
    from a (CPU) `generator`."""
    if generator is None:
        return {name: torch.randn_like(z) for name, z in like.items()}
    return {name: torch.randn(z.shape, generator=generator, dtype=z.dtype).to(z.device) for name, z in like.items()}


def _dense_drift(precond: Preconditioner, grad: Position, batch_ndim: int) -> Position:
    """`P g = L (Lᵀ g)` per site, for `"dense"`."""
    cholesky = precond.cholesky
    grad = {k: grad[k] for k in precond.scale}
    return unflatten((flatten(grad, grad, batch_ndim) @ cholesky) @ cholesky.mT, grad, batch_ndim)


def _propose_dense(state: LangevinState, step_size: float, batch_ndim: int, noise: Position) -> Position:
    """`z - η P g + sqrt(2η) L ξ` for `"dense"`."""
    precond = state.precond
    drift = _dense_drift(precond, state.grad, batch_ndim)
    noise = {k: noise[k] for k in precond.scale}
    spread = unflatten(flatten(noise, noise, batch_ndim) @ precond.cholesky.mT, noise, batch_ndim)
    root = math.sqrt(2.0 * step_size)
    return {k: z - step_size * drift[k] + root * spread[k] for k, z in state.position.items()}


def propose(state: LangevinState, step_size: float, batch_ndim: int = 0, noise: Optional[Position] = None):
    """The Langevin proposal `z - η P ⊙ d + sqrt(2ηP) ⊙ ξ` from `state`
    (`z - η P g + sqrt(2η) L ξ` for `"dense"`).

    Returns `(precond, direction, proposal, noise)`: the preconditioner used
    (the per-chain kinds first fold in the current gradient), the drift direction
    `d` (the gradient, or `m̂` for `"adam"`), the proposed position and the
    noise `ξ` (so `log q(z'|z) = -‖ξ‖²/2 + const`), drawn by
    [`standard_normal`][pyro_lpc.langevin.standard_normal] unless given.
    """
    precond = state.precond
    if precond.kind in ("rmsprop", "adam"):
        precond = refresh(accumulate(precond, state.grad, batch_ndim))
    direction = _drift_direction(precond, state.grad)
    noise = standard_normal(state.position) if noise is None else noise
    if precond.kind == "dense":
        return precond, direction, _propose_dense(state, step_size, batch_ndim, noise), noise
    proposal = {}
    for name, z in state.position.items():
        scale = _scale_of(precond, name, z)
        proposal[name] = z - step_size * scale * direction[name] + (2.0 * step_size * scale).sqrt() * noise[name]
    return precond, direction, proposal, noise


def step(
    state: LangevinState,
    potential_and_grad: PotentialAndGrad,
    step_size: float,
    *,
    adjust: bool = False,
    batch_ndim: int = 0,
) -> "tuple[LangevinState, LangevinInfo]":
    """One Langevin step (ULA, or MALA when `adjust`) from `state`.

    For the per-chain preconditioners the statistics are first updated with the
    current gradient (`v_k` from `g_k`), then `P_k` is used for the move.
    Non-finite proposals (potential or gradient) are reported in `info.diverged`
    and rejected, under ULA too: such a chain stays where it was.
    """
    check_sampling_precondition(state.precond.kind, adjust)
    precond, _, proposal, noise = propose(state, step_size, batch_ndim)
    new_potential, new_grad = potential_and_grad(proposal)
    log_ratio, diverged = log_accept_ratio(state, proposal, noise, new_potential, new_grad, precond, step_size,
                                           batch_ndim)
    accept_prob = log_ratio.clamp(max=0.0).exp()
    accepted = torch.rand_like(accept_prob) < accept_prob if adjust else ~diverged
    moved = LangevinState(proposal, new_potential, new_grad, precond, state.num_steps + 1)
    new_state = where(accepted, moved, state, batch_ndim)
    return new_state, LangevinInfo(accept_prob, accepted, diverged, new_potential, -log_ratio)


def where(mask: torch.Tensor, new: LangevinState, old: LangevinState, batch_ndim: int = 0) -> LangevinState:
    """Chains where `mask` (chain-shaped) holds take `new`'s position, potential and
    gradient, the others keep `old`'s; the preconditioner and step count are `new`'s."""
    return new._replace(
        position={k: select(mask, v, old.position[k], batch_ndim) for k, v in new.position.items()},
        potential=torch.where(mask, new.potential, old.potential),
        grad={k: select(mask, g, old.grad[k], batch_ndim) for k, g in new.grad.items()},
    )


def finite(potential: torch.Tensor, grad: Position, batch_ndim: int = 0) -> torch.Tensor:
    """Per chain, whether the potential and every gradient coordinate are finite."""
    ok = torch.isfinite(potential)
    for g in grad.values():
        ok = ok & (_sum_event(~torch.isfinite(g), batch_ndim) == 0)
    return ok


def log_accept_ratio(state: LangevinState, proposal: Position, noise: Position, new_potential: torch.Tensor,
                     new_grad: Position, precond: Preconditioner, step_size: float, batch_ndim: int = 0):
    """The log MALA acceptance ratio of `proposal`, drawn from `state` with `noise` and `precond` by
    [`propose`][pyro_lpc.langevin.propose], `U(z) - U(z') + log q(z | z') - log q(z' | z)`, and
    whether it diverged (non-finite `U` or `∇U` there; the ratio is then `-inf`)."""
    diverged = ~finite(new_potential, new_grad, batch_ndim)
    log_ratio = (
        state.potential
        - new_potential
        + _log_proposal(state.position, proposal, new_grad, precond, step_size, batch_ndim)
        + sum(_sum_event(xi.square(), batch_ndim) for xi in noise.values()) / 2  # -log q(z'|z)
    )
    return torch.where(diverged, -math.inf, log_ratio), diverged


def accept_probability(state: LangevinState, proposal: Position, noise: Position, new_potential: torch.Tensor,
                       new_grad: Position, precond: Preconditioner, step_size: float, batch_ndim: int = 0):
    """The MALA acceptance probability `α = min(1, exp(log_accept_ratio))` of `proposal`, and
    whether it diverged (see [`log_accept_ratio`][pyro_lpc.langevin.log_accept_ratio]; `α = 0` there)."""
    log_ratio, diverged = log_accept_ratio(state, proposal, noise, new_potential, new_grad, precond, step_size,
                                           batch_ndim)
    return log_ratio.clamp(max=0.0).exp(), diverged


def divergent(info: LangevinInfo) -> torch.Tensor:
    """Per chain, whether a Metropolis-adjusted step diverged as Pyro's HMC counts it: a
    non-finite proposal, or an energy error above `MAX_ENERGY_ERROR` (the proposal is then
    rejected with probability at least $1 - e^{-1000}$; a funnel's neck shows up this way)."""
    return info.diverged | (info.energy_error > MAX_ENERGY_ERROR)


def select(mask: torch.Tensor, a: torch.Tensor, b: torch.Tensor, batch_ndim: int) -> torch.Tensor:
    """`where(mask, a, b)` with `mask` of the chain shape broadcast over event dims."""
    mask = mask.reshape(mask.shape + (1,) * (a.dim() - batch_ndim))
    return torch.where(mask, a, b)
