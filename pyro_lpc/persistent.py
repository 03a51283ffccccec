r"""Persistent chains: each data point's local chain carried from one visit to the next.

With `LPC(..., persistent_chains=True)` (or `fit(..., persistent_chains=True)`) the
local chains' last positions are kept in a [`ChainStore`][pyro_lpc.persistent.ChainStore],
by dataset index, so a data point visited E times (E epochs) has had E·K Langevin steps,
as in persistent-chain learning (alternating back-propagation, Han et al. 2017; particle
gradient descent, Kuntz et al. 2023; DCPC's stored particles, Sennesh et al. 2024), and
keeps LPC's amortised warm start besides.

**Which start.** On each visit a data point's chain starts either from its stored state
`z` or from a fresh guide draw `z' ~ q_φ(z | x)`, chosen by an *independence Metropolis*
step with the guide as proposal: `z'` is taken with probability

$$\alpha = \min\Big(1, \frac{p_\theta(x, z')\, q_\phi(z \mid x)}{p_\theta(x, z)\, q_\phi(z' \mid x)}\Big),$$

the ratio of the importance weights `w = p/q` of the two candidates (computed per data
point with the user's scales and without subsampling's, as the chains' own energy; in
unconstrained space the Jacobians cancel). This step leaves `p_θ(z | x)` invariant, so a
stored state that follows the posterior still does after it, and with Metropolis-adjusted
chains (`adjust=True`) and fixed θ each data point's chain is an exact MCMC chain. The
simpler rule "whichever has the lower energy" is not: it prefers modes and shrinks the
chains' spread. Where the guide is good (large α) the fresh draw wins, where the stored
chain has gone further the stored state mostly wins. Without a guide (encoder-free) a
seen point's chain simply continues (the prior, as an independence proposal, would almost
never be accepted). A point never seen starts from the guide (or the prior).

**θ moves between visits.** A stored state was a sample for the θ (and global latents)
of its last visit; after θ moves it is a warm start, not an exact sample, and the
Metropolis choice and the K steps then move it towards the current posterior.

**Indices.** Each chain needs its data point's index in the dataset: `LPC.step(x,
data_indices=idx)`; `fit` passes them for a tensor (it knows its permutation) and, for
a `DataLoader`, takes them from `batch_indices(batch)`; otherwise from a subsampled data
plate, `pyro.plate("data", N, subsample_size=B)` or `subsample=idx` (the plate's
subsample indices in the trace). Anything else is refused with a `ValueError`.

**Memory.** One copy of the local latents' unconstrained values per data point, on the
device and in the dtype of the chains (indexing needs no transfer; the update is one
scatter per iteration): MNIST with 50 latents, 60,000 × 50 × 4 bytes = 12 MB. Under
`torchrun` every rank keeps the whole store, updated after each iteration with the
final states of the global batch (one all-gather of `world_size × B` rows): the ranks'
shards change from epoch to epoch (a tensor is reshuffled globally, a `DistributedSampler`
too), and a checkpoint written by rank 0 then resumes under any world size.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import pyro.poutine as poutine
import torch

from .langevin import Position, select
from .potential import SplitEnergy, subsample_trace, sum_except
from .warm_start import WarmStart, guide_sites, is_auxiliary

#: the keyword of `LPC.step` (and of `fit`'s batches) that carries the batch's dataset indices
INDICES = "data_indices"


class ChainStore:
    """The local chains' last unconstrained positions, one row per dataset index.

    Rows are allocated on first use (up to the largest index seen) on the device and in
    the dtype of the positions stored; `seen[i]` says whether row `i` holds a state.

    Example:
        ```python
        >>> import torch
        >>> from pyro_lpc.persistent import ChainStore
        >>> store = ChainStore()
        >>> store.update(torch.tensor([3, 0]), {"z": torch.tensor([[1.0, 2.0], [3.0, 4.0]])})
        >>> stored, seen = store.lookup(torch.tensor([0, 1]), {"z": torch.zeros(2, 2)})
        >>> stored["z"].tolist(), seen.tolist()
        ([[3.0, 4.0], [0.0, 0.0]], [True, False])

        ```
    """

    def __init__(self):
        self.positions: Dict[str, torch.Tensor] = {}
        self.seen: Optional[torch.Tensor] = None

    @property
    def nbytes(self) -> int:
        """Bytes held by the stored positions."""
        return sum(p.numel() * p.element_size() for p in self.positions.values())

    def lookup(self, indices: torch.Tensor, like: Position) -> Tuple[Position, torch.Tensor]:
        """The stored positions of `indices` (rows without a state take `like`'s) and which rows
        have a state; `like` holds chain-first positions of the batch."""
        self._reserve(indices, like)
        indices = indices.to(self.seen.device)
        seen = self.seen[indices]
        return {k: select(seen, self.positions[k][indices].to(v.dtype), v, 1) for k, v in like.items()}, seen

    def update(self, indices: torch.Tensor, position: Position) -> None:
        """Store the chain-first `position` as the state of `indices`. An index repeated (a
        `DistributedSampler` pads the last shards with repeats) keeps its first row, the same on
        every rank (an indexed write of duplicates has no defined order on CUDA)."""
        self._reserve(indices, position)
        indices = indices.to(self.seen.device)
        rows = first_occurrences(indices)
        indices = indices[rows]
        for name, value in position.items():
            self.positions[name][indices] = value.detach()[rows.to(value.device)].to(self.positions[name].dtype)
        self.seen[indices] = True

    def _reserve(self, indices: torch.Tensor, like: Position) -> None:
        """Rows up to the largest of `indices`, shaped, typed and placed like `like`'s chains."""
        needed = int(indices.max()) + 1 if len(indices) else 0
        size = 0 if self.seen is None else len(self.seen)
        if set(like) != set(self.positions) and self.positions:
            raise ValueError(f"The persistent chains hold the local site(s) {sorted(self.positions)}, but this "
                             f"batch has {sorted(like)}: one ChainStore serves one model.")
        if needed <= size:
            return
        first = next(iter(like.values()))
        seen = torch.zeros(needed, dtype=torch.bool, device=first.device)
        if self.seen is not None:
            seen[:size] = self.seen
        for name, value in like.items():
            rows = value.new_zeros((needed,) + value.shape[1:])
            if name in self.positions:
                rows[:size] = self.positions[name]
            self.positions[name] = rows
        self.seen = seen

    def state_dict(self) -> dict:
        """A copy of the store: `positions` by site (rows by dataset index) and `seen`."""
        return {"positions": {k: v.clone() for k, v in self.positions.items()},
                "seen": None if self.seen is None else self.seen.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.positions = {k: v.clone() for k, v in state["positions"].items()}
        self.seen = None if state["seen"] is None else state["seen"].clone()


def batch_indices(given, energy: SplitEnergy, num_chains: int) -> torch.Tensor:
    """The batch's dataset indices, one per chain: `given` (`data_indices`), else the subsample
    indices of a subsampled data plate; a `ValueError` saying what is missing otherwise."""
    plate = energy.plate
    if given is None:
        subsampled = plate is not None and plate.full_size is not None and plate.full_size != plate.size
        if not subsampled:
            where = "the model has no data plate" if plate is None else \
                f"the data plate '{plate.name}' is not subsampled (size {plate.size} of {plate.full_size})"
            raise ValueError(
                f"persistent_chains=True stores each data point's chain by its index in the dataset, but this "
                f"batch gives no indices: {INDICES} was not passed and {where}. Pass LPC.step(..., "
                f"{INDICES}=idx); in fit, give the data as a tensor (fit knows its order) or batch_indices= "
                "mapping a DataLoader's batch to its indices; or subsample the data plate "
                "(pyro.plate('data', N, subsample=idx) or subsample_size=B).")
        given = energy.replay.nodes[plate.name]["value"]
    indices = torch.as_tensor(given)
    if indices.dtype == torch.bool or indices.is_floating_point() or indices.is_complex() \
            or indices.shape != (num_chains,):
        raise ValueError(f"{INDICES} must be a 1-d integer tensor with one index per data point of the batch "
                         f"({num_chains}), got {indices.dtype} of shape {tuple(indices.shape)}.")
    if num_chains and (int(indices.min()) < 0 or len(torch.unique(indices)) != num_chains):
        raise ValueError(f"{INDICES} must be distinct non-negative dataset indices, got {indices.tolist()[:20]}"
                         f"{' ...' if num_chains > 20 else ''}.")
    return indices.long()


def check_guide(guide_trace: Optional[poutine.Trace], energy: SplitEnergy) -> None:
    """Refuse a guide whose density at stored states is not per data point: an autoguide's
    auxiliary sites (the Metropolis choice needs `log q(z_i | x_i)` for each point)."""
    if guide_trace is None:
        return
    auxiliary = [n for n, site in guide_trace.nodes.items() if site["type"] == "sample" and is_auxiliary(site)]
    if auxiliary:
        raise ValueError(
            f"persistent_chains=True chooses between a stored state and a guide draw by their importance "
            f"weights p(x, z) / q(z | x) per data point; the guide samples auxiliary site(s) {auxiliary} (an "
            "autoguide), whose density at a stored state is not per data point. Use an encoder guide that "
            f"samples the local latent(s) {energy.local} itself.")


def choose_starts(evaluate, energy: SplitEnergy, warm: Optional[WarmStart], guide_trace, args, kwargs,
                  draw: Position, stored: Position, seen: torch.Tensor):
    """Each chain's start (chain-first, unconstrained), whether it is the stored state, and the
    energies `(U_i, ∇U)` at the draw (`None` without a guide).

    `draw` is the guide's (or prior's) draw, `stored` the stored states (rows not `seen` hold
    the draw) and `evaluate(position) -> (U_i, ∇U)` the chains' energy (with the global
    latents held); call it under `torch.no_grad()`. Unseen points take the draw; with a guide the others take it by the
    independence Metropolis test of the module docstring (torch's random stream), with
    `log w = -U_i(u) - log|det ∂z/∂u| - log q(z | x)` in unconstrained space `u`; without
    one they keep the stored state.
    """
    if warm is None:
        return {k: select(seen, stored[k], v, 1) for k, v in draw.items()}, seen, None
    at_draw = evaluate(draw)
    log_w_draw = _log_weight(energy, at_draw[0], draw, warm, guide_trace, args, kwargs)
    log_w_stored = _log_weight(energy, evaluate(stored)[0], stored, warm, guide_trace, args, kwargs, True)
    take_draw = ~seen | ~torch.isfinite(log_w_stored) | \
        (torch.rand(log_w_draw.shape, device=log_w_draw.device).log() < log_w_draw - log_w_stored)
    return {k: select(take_draw, v, stored[k], 1) for k, v in draw.items()}, ~take_draw, at_draw


def _log_weight(energy: SplitEnergy, potential: torch.Tensor, position: Position, warm: WarmStart, guide_trace,
                args, kwargs, rerun: bool = False) -> torch.Tensor:
    """`log p(x_i, z_i) - log q(z_i | x_i)` per data point from the energies `U_i` at the
    unconstrained `position`: the guide's own draw, or (`rerun`) other values, at which a
    guide with several sites is re-run conditioned on them (its subsample replayed)."""
    values, ladj = energy.constrain(position)
    dim = energy.plate.dim
    log_w = -potential - sum(sum_except(ladj[name], (dim,)) for name in energy.local)
    sites = [n for n in guide_sites(guide_trace) if n in energy.local]
    if rerun and len(guide_sites(guide_trace)) > 1:
        guide = poutine.condition(poutine.replay(warm.guide, trace=subsample_trace(guide_trace)), data=values)
        guide_trace = poutine.trace(guide).get_trace(*args, **(kwargs or {}))
    for name in sites:
        log_w = log_w - sum_except(guide_trace.nodes[name]["fn"].log_prob(values[name]), (dim,))
    return log_w


def first_occurrences(indices: torch.Tensor) -> torch.Tensor:
    """Positions in `indices` of the first occurrence of each distinct value, in order."""
    order = torch.argsort(indices, stable=True)
    ranked = indices[order]
    first = torch.ones_like(ranked, dtype=torch.bool)
    first[1:] = ranked[1:] != ranked[:-1]
    return order[first].sort().values
