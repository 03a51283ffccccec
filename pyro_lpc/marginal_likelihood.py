r"""Marginal-likelihood estimates: per data point estimates of `log p_θ(x_i)`
([`log_marginal_likelihood`][pyro_lpc.marginal_likelihood.log_marginal_likelihood]) for models whose latent
variables are all local to the data plate (`p(x, z) = Π_i p(x_i, z_i)`):

* `"iwae"` — the importance-weighted bound (Burda et al. 2016) with the guide
    as proposal,

    $$
    \hat L_k(x) = \log \frac1k \sum_{j=1}^k \frac{p(x, z_j)}{q(z_j \mid x)},
    \qquad z_j \sim q(\cdot \mid x),
    $$

    with `E[\hat L_k] ≤ log p(x)`, the gap non-increasing in `k` and
    `≈ χ²(p(z|x) ‖ q) / (2k)` for large `k`.

* `"ais"` — annealed importance sampling (Neal 2001) from the guide (or the
  prior) to the posterior along `π_β ∝ q(z|x)^{1-β} p(x, z)^β`, with
  Metropolis-adjusted Langevin transitions from [`pyro_lpc.langevin`][pyro_lpc.langevin]
  ([`ais_schedule`][pyro_lpc.marginal_likelihood.ais_schedule] gives the β ladder).

Sample-quality metrics for images live in [`pyro_lpc.images.sample_quality`][pyro_lpc.images.sample_quality].
"""
from __future__ import annotations

import math
from typing import Dict, NamedTuple, Optional, Sequence, Union

import pyro
import pyro.poutine as poutine
import torch
from pyro.poutine.util import site_is_subsample
from tqdm import tqdm

from . import langevin
from .training import minibatches
from .potential import SplitEnergy, find_data_plate, guide_and_model_traces, in_plate, latent_sites, plate_log_prob, \
    sum_except
from .langevin import MALA_TARGET_ACCEPT
from .schedule import robbins_monro
from .warm_start import check_guide_sites, guide_sites, is_auxiliary

__all__ = ["log_marginal_likelihood", "ais_schedule"]

#: Points (samples × data points) evaluated in one vectorised model call by default.
DEFAULT_POINTS_PER_CALL = 10_000
#: Most chains per data point in the step-size pilot run of AIS.
PILOT_CHAINS = 10


class _Vectorized:
    """`fn` run under `pyro.plate("particles", size, dim=-max_plate_nesting - 1)`."""

    def __init__(self, fn, size: int, max_plate_nesting: int):
        self.fn, self.size, self.dim = fn, size, -max_plate_nesting - 1

    def __call__(self, *args, **kwargs):
        with pyro.plate("_lml_particles", self.size, dim=self.dim):
            return self.fn(*args, **kwargs)


class _Plate(NamedTuple):
    name: str
    dim: int


def _plate_log_prob(trace, plate: _Plate, particle_dim: int, sites=None) -> torch.Tensor:
    """Per data point and particle, `(B, particles)`: [`plate_log_prob`][pyro_lpc.potential.plate_log_prob]."""
    return torch.as_tensor(plate_log_prob(trace, plate.name, (plate.dim, particle_dim), sites))


def _check_sites(model_trace, guide_trace, plate: _Plate, method: str) -> None:
    """Raise a `ValueError` unless every latent (and observed) site is local to the data plate
    and the guide samples exactly the model's latents, each inside the data plate."""
    latents = latent_sites(model_trace)
    globals_ = [n for n in latents if not in_plate(model_trace.nodes[n], plate.name)]
    if globals_:
        raise ValueError(
            f"log_marginal_likelihood(method={method!r}) needs every latent site to be local to the "
            f"data plate '{plate.name}', but the global latent site(s) {globals_} lie outside it: "
            "with latents shared by all data points, log p(x_i) does not factorise over data points. "
            "Condition on (or marginalise) the global sites, or estimate the joint log p(x) yourself."
        )
    outside = [
        n for n, s in model_trace.nodes.items()
        if s["type"] == "sample" and s["is_observed"] and not site_is_subsample(s) and not in_plate(s, plate.name)
    ]
    if outside:
        raise ValueError(
            f"Observed site(s) {outside} lie outside the data plate '{plate.name}'; per-data-point "
            "log p(x_i) needs every observation inside it."
        )
    if guide_trace is None:
        return
    guide_latents = guide_sites(guide_trace)  # an autoguide's auxiliary sites are the guide's own
    auxiliary = [n for n in latent_sites(guide_trace) if is_auxiliary(guide_trace.nodes[n])]
    if auxiliary and method == "ais":
        raise ValueError(
            f"method='ais' evaluates the guide's density at the annealed states by conditioning it on "
            f"the model's sites, which a guide with auxiliary site(s) {auxiliary} (an autoguide) does "
            "not allow. Use method='iwae', or guide=None to anneal from the prior."
        )
    check_guide_sites(guide_trace, latents, latents, why=": a proposal must sample every latent site. Pass "
                      "guide=None to propose from the prior.")
    bad = [n for n in guide_latents + auxiliary if not in_plate(guide_trace.nodes[n], plate.name)]
    if bad:
        raise ValueError(
            f"The guide samples site(s) {bad} outside the data plate '{plate.name}'; their density "
            f"cannot be split per data point. Sample them inside pyro.plate('{plate.name}', ...)."
        )


def _max_plate_nesting(*traces) -> int:
    dims = [
        f.dim for tr in traces if tr is not None for s in tr.nodes.values()
        if s["type"] == "sample" for f in s["cond_indep_stack"] if f.vectorized
    ]
    return -min(dims) if dims else 0


def _prototype(model, guide, args, kwargs, data_plate, method):
    """A non-vectorised model run (on a guide draw) giving the data plate and the plate nesting."""
    with torch.no_grad():
        guide_trace, model_trace = guide_and_model_traces(model, guide, args, kwargs)
    frame = find_data_plate(model_trace, data_plate)
    if frame is None:
        raise ValueError(
            "The model's observed sites share no plate: log_marginal_likelihood needs a data plate "
            "(pyro.plate over data points) around every observation, or data_plate=name."
        )
    if frame.full_size is not None and frame.full_size != frame.size:
        raise ValueError(
            f"The data plate '{frame.name}' is subsampled ({frame.size} of {frame.full_size}); "
            "evaluate on batches whose plate covers every data point passed (no subsample_size)."
        )
    _check_sites(model_trace, guide_trace, _Plate(frame.name, frame.dim), method)
    return _Plate(frame.name, frame.dim), _max_plate_nesting(model_trace, guide_trace)


def _chunks(total: int, size: int):
    done = 0
    while done < total:
        yield min(size, total - done)
        done += size


def _iwae_batch(model, guide, args, kwargs, num_samples, chunk, plate, nesting, method):
    """`log (1/k) Σ_j w_j` per data point, `k = num_samples` drawn `chunk` at a time."""
    particle_dim = -nesting - 1
    running = None
    for size in _chunks(num_samples, chunk):
        with torch.no_grad():
            vguide = _Vectorized(guide, size, nesting) if guide is not None else None
            guide_trace, model_trace = guide_and_model_traces(_Vectorized(model, size, nesting), vguide, args, kwargs)
            if running is None:
                _check_sites(model_trace, guide_trace, plate, method)
            log_p = _plate_log_prob(model_trace, plate, particle_dim)
            if guide is not None:
                log_q = _plate_log_prob(guide_trace, plate, particle_dim)
            else:  # proposal = prior: the weight is the likelihood
                log_q = _plate_log_prob(model_trace, plate, particle_dim, sites=set(latent_sites(model_trace)))
            log_w = (log_p - log_q).double()
            part = torch.logsumexp(log_w, dim=1)
            running = part if running is None else torch.logaddexp(running, part)
    return running - math.log(num_samples)


# -- annealed importance sampling -------------------------------------------------------
def ais_schedule(num_steps: int, schedule: str = "sigmoid", *, delta: float = 4.0,
                 start: float = 1e-4, dtype=torch.float64, device=None) -> torch.Tensor:
    r"""Inverse temperatures `0 = β_0 < β_1 < … < β_T = 1` (`T = num_steps`), shape `(T + 1,)`.

    * `"sigmoid"` (Grosse et al. 2015; Wu et al. 2017): `β̃_t = σ(δ (2t/T − 1))`, rescaled
      so that `β_0 = 0` and `β_T = 1`; dense at both ends, where `log p − log q`
      changes fastest.
    * `"geometric"`: `β_t = start^{(T − t)/(T − 1)}` for `t ≥ 1` (`β_0 = 0`).
    * `"linear"`: `β_t = t / T`.

    ```python
    >>> ais_schedule(4, "linear").tolist()
    [0.0, 0.25, 0.5, 0.75, 1.0]

    ```
    """
    num_steps = int(num_steps)
    if num_steps < 1:
        raise ValueError(f"ais_steps must be a positive integer, got {num_steps!r}.")
    t = torch.arange(num_steps + 1, dtype=dtype, device=device)
    if schedule == "linear":
        return t / num_steps
    if schedule == "sigmoid":
        s = torch.sigmoid(delta * (2.0 * t / num_steps - 1.0))
        return (s - s[0]) / (s[-1] - s[0])
    if schedule == "geometric":
        if num_steps == 1:
            return t
        betas = start ** ((num_steps - t) / (num_steps - 1))
        betas[0] = 0.0
        return betas
    raise ValueError(f"Unknown schedule {schedule!r}; choose 'sigmoid', 'geometric' or 'linear'.")


class _Terms(NamedTuple):
    """At one position: `log p(x, z) + log|J|`, `log q(z|x) + log|J|` (`(B, S)`) and their gradients."""

    log_p: torch.Tensor
    log_q: torch.Tensor
    grad_p: Dict[str, torch.Tensor]
    grad_q: Dict[str, torch.Tensor]


class _Tempered:
    r"""`u ↦ (U_β(u), ∇U_β(u))` for `U_β = −[(1 − β)(log q + log|J|) + β(log p + log|J|)]`
    on chain-first unconstrained positions `(B, S, …)`. The terms at the last position it
    was called on are kept in `last`, so that a temperature change needs no model call."""

    def __init__(self, energy: SplitEnergy, guide, args, kwargs, plate: _Plate, particle_dim: int):
        self.energy, self.guide, self.args, self.kwargs = energy, guide, args, kwargs
        self.plate, self.particle_dim = plate, particle_dim
        self.beta = 0.0
        self.last: Optional[_Terms] = None

    def terms(self, position) -> _Terms:
        leaves = {k: v.detach().requires_grad_(True) for k, v in position.items()}
        names = list(leaves)
        # invalid proposals give non-finite energies (MALA rejects them) instead of raising
        with torch.enable_grad(), pyro.validation_enabled(False):
            values, ladj = self.energy.constrain(leaves)
            model_trace = self.energy.trace(values)
            jac = sum(sum_except(ladj[n], (self.plate.dim, self.particle_dim)) for n in names)
            log_p = _plate_log_prob(model_trace, self.plate, self.particle_dim) + jac
            if self.guide is not None:
                guide_trace = poutine.trace(poutine.condition(self.guide, data=values)).get_trace(
                    *self.args, **self.kwargs)
                log_q = _plate_log_prob(guide_trace, self.plate, self.particle_dim) + jac
            else:
                log_q = _plate_log_prob(model_trace, self.plate, self.particle_dim, sites=set(names)) + jac
            shape = leaves[names[0]].shape[:2]
            log_p, log_q = log_p.expand(shape), log_q.expand(shape)
            grad_q = torch.autograd.grad(log_q.sum(), [leaves[n] for n in names], retain_graph=True,
                                         allow_unused=True)
            grad_p = torch.autograd.grad(log_p.sum(), [leaves[n] for n in names], allow_unused=True)
        fill = lambda gs: {n: (torch.zeros_like(leaves[n]) if g is None else g) for n, g in zip(names, gs)}  # noqa: E731
        return _Terms(log_p.detach(), log_q.detach(), fill(grad_p), fill(grad_q))

    def potential(self, t: _Terms) -> torch.Tensor:
        return -((1.0 - self.beta) * t.log_q + self.beta * t.log_p)

    def grad(self, t: _Terms) -> Dict[str, torch.Tensor]:
        return {n: -((1.0 - self.beta) * t.grad_q[n] + self.beta * t.grad_p[n]) for n in t.grad_p}

    def __call__(self, position):
        self.last = self.terms(position)
        return self.potential(self.last), self.grad(self.last)


def _select_terms(accepted: torch.Tensor, new: _Terms, old: _Terms) -> _Terms:
    sel = lambda a, b: langevin.select(accepted, a, b, 2)  # noqa: E731
    return _Terms(
        torch.where(accepted, new.log_p, old.log_p),
        torch.where(accepted, new.log_q, old.log_q),
        {n: sel(new.grad_p[n], old.grad_p[n]) for n in new.grad_p},
        {n: sel(new.grad_q[n], old.grad_q[n]) for n in new.grad_q},
    )


def _ais_batch(model, guide, args, kwargs, num_samples, chunk, plate, nesting, betas, step_size,
               adjust, adapt, bar):
    """AIS log-weights per data point and chain, reduced to `log mean_s w_s`.

    With `adapt`, a pilot run of a few independent chains first tunes one step size per data
    point and temperature; the estimate then uses fresh chains with those step sizes frozen.
    """
    particle_dim = -nesting - 1
    etas = None
    if adapt:
        pilot = max(1, min(PILOT_CHAINS, num_samples // 10, chunk))
        _, etas = _anneal(_start(model, guide, args, kwargs, pilot, plate, nesting, particle_dim),
                          betas, step_size, None, adjust, bar)
    running = None
    for size in _chunks(num_samples, chunk):
        tempered, position = _start(model, guide, args, kwargs, size, plate, nesting, particle_dim)
        log_w, _ = _anneal((tempered, position), betas, step_size, etas, adjust, bar)
        part = torch.logsumexp(log_w, dim=1)
        running = part if running is None else torch.logaddexp(running, part)
    return running - math.log(num_samples)


def _start(model, guide, args, kwargs, size, plate, nesting, particle_dim):
    """`size` exact draws per data point from `π_0` (the guide, or the prior) in unconstrained
    space, chain-first `(B, size, ...)`, and the tempered energy over them."""
    vmodel = _Vectorized(model, size, nesting)
    vguide = _Vectorized(guide, size, nesting) if guide is not None else None
    with torch.no_grad():
        guide_trace, prototype = guide_and_model_traces(vmodel, vguide, args, kwargs)
    _check_sites(prototype, guide_trace, plate, "ais")
    energy = SplitEnergy(vmodel, args, kwargs, prototype, data_plate=plate.name)
    start = energy.unconstrain({n: prototype.nodes[n]["value"].detach() for n in energy.local})
    return _Tempered(energy, vguide, args, kwargs, plate, particle_dim), start


@torch.no_grad()  # gradients are taken inside _Tempered only
def _anneal(start, betas, step_size, etas, adjust, bar):
    """Run the chains from `start = (tempered, position)` along `betas`.

    Returns the AIS log-weights `(B, S)` and the step sizes used, one `(B,)` tensor per
    transition: `etas` when given (frozen), else adapted on the fly, per data point, by
    `log η += mean_s accept_prob − 0.574`.
    """
    tempered, position = start
    terms = tempered.terms(position)
    batch = terms.log_p.shape[0]
    log_eta = torch.full((batch,), math.log(step_size), dtype=terms.log_p.dtype, device=terms.log_p.device)
    log_w = torch.zeros(terms.log_p.shape, dtype=torch.float64, device=terms.log_p.device)
    betas = [float(b) for b in betas]
    num_steps = len(betas) - 1
    used = []
    for t in range(1, num_steps + 1):
        log_w = log_w + (betas[t] - betas[t - 1]) * (terms.log_p - terms.log_q).double()
        if t == num_steps:
            break
        tempered.beta = betas[t]
        eta = etas[t - 1] if etas is not None else log_eta.exp()
        used.append(eta)
        # the per-data-point step size η_i enters as a fixed diagonal preconditioner P = η_i
        # (constant within the transition, so MALA leaves π_β exactly invariant)
        scale = {n: eta.reshape((batch,) + (1,) * (v.dim() - 1)) for n, v in position.items()}
        precond = langevin.Preconditioner("diagonal", {}, {}, 0, scale)
        state = langevin.LangevinState(position, tempered.potential(terms), tempered.grad(terms), precond, t - 1)
        state, info = langevin.step(state, tempered, 1.0, adjust=adjust, batch_ndim=2)
        terms = _select_terms(info.accepted, tempered.last, terms)  # ULA too: divergent proposals stay
        position = state.position
        if etas is None:
            log_eta = robbins_monro(log_eta, info.accept_prob.mean(1), MALA_TARGET_ACCEPT)
        if bar is not None:
            bar.update(1)
    return log_w, used


def log_marginal_likelihood(
    model,
    guide,
    data,
    num_samples: int = 1000,
    method: str = "iwae",
    *,
    batch_size: Optional[int] = None,
    chunk_size: Optional[int] = None,
    ais_steps: int = 100,
    schedule: Union[str, Sequence[float], torch.Tensor] = "sigmoid",
    step_size: float = 1e-2,
    adapt_step_size: bool = True,
    adjust: bool = True,
    data_plate: Optional[str] = None,
    max_plate_nesting: Optional[int] = None,
    progress: bool = False,
) -> torch.Tensor:
    r"""Per-data-point estimates of `log p_θ(x_i)`, shape `(N,)` (float64, on the data's device).

    Requires every latent site of `model` to be *local* — inside the data plate, one
    latent per data point — so that `p(x) = Π_i p(x_i)`; global latent sites raise a
    `ValueError` naming them. Densities are the sites' log-probabilities with the user's
    scales and masks (`poutine.scale`, as Pyro scores the model) but without subsampling's
    ([`site_log_prob`][pyro_lpc.potential.site_log_prob]), summed over every site inside the data plate
    and reduced to the plate dimension. (For a β-VAE's plain likelihood, evaluate the model
    with β = 1.)

    **method="iwae"** (Burda et al. 2016): with `z_j ~ q(z | x_i)` the guide (the prior when
    `guide=None`) and `k = num_samples`,

    $$
    \hat L_k(x_i) = \log \frac1k \sum_{j=1}^{k} \exp\big(\log p(x_i, z_j) - \log q(z_j \mid x_i)\big).
    $$

    `E[\hat L_k] ≤ log p(x_i)` (Jensen), the gap is non-increasing in `k` and tends to 0
    (≈ `χ²(p(z|x_i) ‖ q)/(2k)`); `k = 1` is the ELBO; with the exact posterior as guide
    every weight equals `p(x_i)` and the estimate is exact at any `k`. The log-sum-exp
    runs in float64.

    **method="ais"** (Neal 2001): `S = num_samples` independent chains per data point follow
    the geometric path `π_β(z) ∝ q(z|x)^{1-β} p(x, z)^β` over `0 = β_0 < … < β_T = 1`
    (`T = ais_steps`, [`ais_schedule`][pyro_lpc.marginal_likelihood.ais_schedule]), in the unconstrained space
    of the latents (`u = T(z)` with `T = biject_to(support)`, densities including `log|det ∂z/∂u|`, as in
    [`SplitEnergy`][pyro_lpc.potential.SplitEnergy]). With `z_0 ~ q` and one Langevin transition
    ([`pyro_lpc.langevin.step`][pyro_lpc.langevin.step], MALA when `adjust=True`) leaving `π_{β_t}` invariant
    after each increment `t < T`,

    $$
    \log w = \sum_{t=1}^{T} (\beta_t - \beta_{t-1}) \big(\log p(x, z_{t-1}) - \log q(z_{t-1} \mid x)\big),
    \qquad \hat L = \log \frac1S \sum_s w_s .
    $$

    `E[w] = p(x)`, so `E[\hat L] ≤ log p(x)`, with a gap that shrinks as `T` and `S`
    grow; `ais_steps=1` is plain importance sampling (the IWAE estimator with `k = S`).
    The step size is one `η_i` per data point and temperature. With `adapt_step_size` a
    pilot run (`min(10, num_samples // 10)` chains per point, at least 1) starts at
    `step_size` and moves `log η_i += ā_i − 0.574` after every transition (`ā_i`: the
    mean MALA acceptance of the point's pilot chains); the estimate then comes from fresh
    chains with these step sizes frozen, so every transition is fixed in advance of the chains
    it moves and `E[w] = p(x)` holds exactly. (Adapting on the estimating chains' own
    acceptance instead biases `\hat L` *upwards*: measured +0.05 nats on the
    linear-Gaussian test with one chain per point.) The pilot adds `ais_steps` transitions
    of its few chains per batch. Without adaptation `η_i = step_size`. `adjust=False`
    (ULA) leaves `π_β` invariant only up to an
    `O(η)` bias, and then the estimate is no bound.

    **Memory and time.** Samples are drawn `chunk_size` at a time in one vectorised model call
    (`pyro.plate("_lml_particles", chunk_size, dim=-max_plate_nesting-1)` around model and
    guide, so they must broadcast over an extra leading batch dimension, as for Pyro's
    `vectorize_particles`). Memory grows as `chunk_size × batch_size` model evaluations,
    time as `num_samples × N` (IWAE) or `num_samples × N × ais_steps` model-and-gradient
    evaluations (AIS); the default `chunk_size` keeps `chunk_size × batch_size ≤ 10⁴`.
    `chunk_size=1` gives the smallest memory and the most (slower) calls.

    Args:
        model: a Pyro model called as `model(*args, **kwargs)` on each batch.
        guide: the proposal `q(z | x)` (same signature, sampling every latent of the model
            inside the data plate), or `None` for the prior.
        data: a tensor (split along dim 0 into batches of `batch_size`, all of it when
            `None`; `model(batch)`) or an iterable of batches: a tuple/list gives
            `model(*batch)`, a dict `model(**batch)`, anything else `model(batch)`.
        num_samples: `k` importance samples (IWAE) or `S` AIS chains per data point.
        method: `"iwae"` or `"ais"`.
        chunk_size: samples (chains) per vectorised call.
        ais_steps: `T`, the number of annealing increments.
        schedule: `"sigmoid"`, `"geometric"`, `"linear"`, or the `β`'s themselves
            (increasing from 0 to 1; then `ais_steps` is ignored).
        step_size: initial Langevin step size `η` of AIS.
        adapt_step_size: tune `η_i` per temperature towards acceptance 0.574 in a pilot run (AIS).
        adjust: Metropolis-adjust the transitions (MALA); `False` for ULA.
        data_plate: the name of the data plate (default: the plate shared by all observations).
        max_plate_nesting: the model's plate nesting (default: read from one model/guide run).
        progress: show a progress bar.

    Returns:
        a float64 tensor of shape `(N,)`: one estimate of `log p(x_i)` per data point.

    Example:
        ```python
        >>> import pyro, pyro.distributions as dist, torch
        >>> from pyro_lpc.marginal_likelihood import log_marginal_likelihood
        >>> def model(x):
        ...     with pyro.plate("data", x.shape[0]):
        ...         z = pyro.sample("z", dist.Normal(0.0, 1.0))
        ...         pyro.sample("x", dist.Normal(z, 1.0), obs=x)
        >>> def guide(x):                                     # the exact posterior N(x/2, 1/2)
        ...     with pyro.plate("data", x.shape[0]):
        ...         pyro.sample("z", dist.Normal(x / 2, 0.5 ** 0.5))
        >>> x = torch.tensor([0.0, 1.0, -2.0])
        >>> exact = dist.Normal(0.0, 2.0 ** 0.5).log_prob(x)
        >>> est = log_marginal_likelihood(model, guide, x, num_samples=10)
        >>> bool(torch.allclose(est.float(), exact, atol=1e-5))
        True
        >>> est = log_marginal_likelihood(model, None, x, num_samples=100, method="ais", ais_steps=50)
        >>> bool((est.float() - exact).abs().max() < 0.1)
        True

        ```
    """
    if method not in ("iwae", "ais"):
        raise ValueError(f"Unknown method {method!r}; choose 'iwae' or 'ais'.")
    num_samples = int(num_samples)
    if num_samples < 1:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}.")
    if chunk_size is not None and int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}.")
    if batch_size is not None and int(batch_size) < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    betas = None
    if method == "ais":
        step_size = langevin.check_step_size(step_size)
        if isinstance(schedule, str):
            betas = ais_schedule(ais_steps, schedule)
        else:
            betas = torch.as_tensor(schedule, dtype=torch.float64).flatten()
            if (betas.numel() < 2 or betas[0] != 0 or betas[-1] != 1
                    or not bool((betas[1:] > betas[:-1]).all())):
                raise ValueError("schedule must increase strictly from β_0 = 0 to β_T = 1.")
    plate, nesting = None, max_plate_nesting
    results = []
    bar = tqdm(disable=not progress, desc=f"log p(x) [{method}]", unit="batch" if method == "iwae" else "step")
    try:
        whole = data.shape[0] if torch.is_tensor(data) else None
        for args, kwargs in minibatches(data, batch_size or whole, shuffle=False):
            if plate is None:
                plate, guessed = _prototype(model, guide, args, kwargs, data_plate, method)
                nesting = guessed if nesting is None else max(int(nesting), guessed)
            batch = _batch_size(args, kwargs)
            chunk = int(chunk_size) if chunk_size else max(1, min(num_samples, DEFAULT_POINTS_PER_CALL // max(batch, 1)))
            if method == "iwae":
                est = _iwae_batch(model, guide, args, kwargs, num_samples, chunk, plate, nesting, method)
                bar.update(1)
            else:
                est = _ais_batch(model, guide, args, kwargs, num_samples, chunk, plate, nesting, betas,
                                 step_size, adjust, adapt_step_size, bar if progress else None)
            results.append(est)
    finally:
        bar.close()
    if not results:
        raise ValueError("data holds no batch.")
    return torch.cat(results)


def _batch_size(args, kwargs) -> int:
    """The data plate's size on this batch (for the default chunk size): the leading size of the
    first tensor argument, which is what a plate over data points usually follows."""
    for v in list(args) + list(kwargs.values()):
        if torch.is_tensor(v) and v.dim() > 0:
            return v.shape[0]
    return 1
