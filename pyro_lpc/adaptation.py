r"""Warm-up adaptation for `PCLangevin`: Stan's windows and the posterior (co)variance.

[`adaptation_windows`][pyro_lpc.adaptation.adaptation_windows] splits warm-up into
Stan's fast and slow windows. [`WindowCovariance`][pyro_lpc.adaptation.WindowCovariance]
collects the chains' positions during one slow window (Welford's scheme, as Pyro's
`pyro.ops.welford.WelfordCovariance`, batched over chains) and, at the window's end, sets the
preconditioner to the regularised estimate (as Stan's and Pyro's HMC)

$$
P = \frac{n}{n + 5} \hat\Sigma + 10^{-3} \frac{5}{n + 5} I,
$$

the variance of each unconstrained coordinate (`"variance"`) or their full
covariance (`"dense"`, held as its Cholesky factor), so that the Langevin
step whitens the posterior.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from pyro.ops.dual_averaging import DualAveraging

from .langevin import LangevinState, Position, Preconditioner, accumulate, flatten, refresh, step, unflatten

#: Fraction of warm-up in the terminal window that tunes η against the final ``P``.
TERMINAL_FRACTION = 0.25


#: Shortest warm-up in which `P` adapts: from a slow window of a dozen draws the estimate misled
#: the step size that the short terminal window then tunes (10-d Gaussian, 5 seeds, post-warm-up
#: acceptance after 30 warm-up steps: "variance" 0.05-0.78, "diagonal" 0.27-0.77; with the step
#: size alone 0.49-0.70; after 50 steps, adapting P: 0.38-0.81).
SHORTEST_WINDOWED_WARMUP = 50


def adaptation_windows(warmup_steps: int):
    """Warm-up windows `[(start, end), ...]` (inclusive step indices), as Stan's.

    An initial fast window (75 steps, or 15 % of a short warm-up) tunes the step
    size only; slow windows of doubling length (from 25 steps; the last one
    stretched to fill) also adapt `P`, and the step size restarts after each;
    a terminal fast window tunes the step size against the frozen `P`. Below
    `SHORTEST_WINDOWED_WARMUP` steps there is one window and only the step size adapts. The terminal
    window is `TERMINAL_FRACTION` of warm-up, longer than Stan's 10 %: a single
    MALA proposal's acceptance probability is a noisier signal than NUTS's
    trajectory average (10-d Gaussian, 5 seeds, 500 warm-up steps: acceptance
    0.42–0.69 with 10 %, 0.54–0.63 with 25 %).

    ```python
    >>> adaptation_windows(500)
    [(0, 74), (75, 99), (100, 149), (150, 374), (375, 499)]
    >>> adaptation_windows(50)
    [(0, 6), (7, 37), (38, 49)]
    >>> adaptation_windows(30)
    [(0, 29)]

    ```
    """
    if warmup_steps < SHORTEST_WINDOWED_WARMUP:
        return [(0, warmup_steps - 1)]
    start = min(75, int(0.15 * warmup_steps))
    end = warmup_steps - int(TERMINAL_FRACTION * warmup_steps)
    windows, size = [(0, start - 1)], min(25, end - start)
    while start < end:
        if 3 * size > end - start:
            size = end - start
        windows.append((start, start + size - 1))
        start, size = start + size, 2 * size
    return windows + [(end, warmup_steps - 1)]


class Moments:
    r"""Running mean and (co)variance of rows of samples, merged a batch at a time (Chan et al.'s
    pairwise form of Welford's scheme), so `C` chains' draws enter in one tensor operation;
    `covariance(regularize=True)` is Stan's and Pyro's `WelfordCovariance` regularisation
    $\frac{n}{n + 5} \hat\Sigma + 10^{-3} \frac{5}{n + 5} I$."""

    def __init__(self, dense: bool):
        self.dense = dense
        self.reset()

    def reset(self) -> None:
        self.n, self.mean, self.m2 = 0, 0.0, 0.0

    def update(self, samples: torch.Tensor) -> None:
        """Fold in `samples` of shape `(B, D)`."""
        count = samples.shape[0]
        mean = samples.mean(0)
        centred = samples - mean
        m2 = centred.mT @ centred if self.dense else centred.square().sum(0)
        delta, total = mean - self.mean, self.n + count
        spread = torch.outer(delta, delta) if self.dense else delta.square()
        self.m2 = self.m2 + m2 + spread * (self.n * count / total)
        self.mean = self.mean + delta * (count / total)
        self.n = total

    def covariance(self, regularize: bool = True) -> torch.Tensor:
        cov = self.m2 / (self.n - 1)
        if not regularize:
            return cov
        cov = cov * (self.n / (self.n + 5.0))
        shrinkage = 1e-3 * (5.0 / (self.n + 5.0))
        if self.dense:
            return cov + shrinkage * torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
        return cov + shrinkage


class WindowCovariance:
    r"""Welford estimate of the posterior (co)variance over one slow window.

    `update` folds in one position and its gradient (a single chain's, sites
    flattened in `position` order); `preconditioner` returns `precond` with `P`
    set from the window and starts the next window afresh.

    The diagonal estimate is $P = \sqrt{\widehat{\mathrm{Var}}(z) / \widehat{\mathrm{Var}}(\nabla U)}$
    per coordinate (Stan-regularised $\widehat{\mathrm{Var}}(z)$), as nutpie's
    mass-matrix adaptation (Seyboldt 2023): on a Gaussian $\nabla U$ is linear in
    $z$, so it equals the posterior variance $\sigma^2$ from any window, however
    little the chain has moved. The sample variance alone only grows by the
    distance the chain diffused (8-d Gaussian, σ in [1e-2, 1e2], 2,000 warm-up
    steps: min ESS 18 of 4,000 draws with it, 1,062 with this). The dense estimate
    (`dense=True, final=True`) is the Stan-regularised sample covariance; earlier
    windows of a dense run use the diagonal estimate so that the chain explores
    well before the covariance is taken.

    ```python
    >>> from pyro_lpc import langevin
    >>> precond = langevin.init_preconditioner("variance", {"z": torch.zeros(2)})
    >>> window = WindowCovariance(dense=False)
    >>> for z in ([0.0, 1.0], [2.0, 1.0], [4.0, 1.0]):  # U = z·z / 8: ∇U = z / 4
    ...     window.update({"z": torch.tensor(z)}, {"z": torch.tensor(z) / 4})
    >>> window.preconditioner(precond).scale["z"]  # √((3/8·4 + 1e-3·5/8) / (4/16)); 1e-3·5/8
    tensor([2.4500e+00, 6.2500e-04])

    ```
    """

    def __init__(self, dense: bool):
        self.dense = dense
        self._position = Moments(dense=False)
        self._grad = Moments(dense=False)
        self._covariance = Moments(dense=True) if dense else None

    @property
    def num_samples(self) -> int:
        return self._position.n

    def update(self, position: Position, grad: Position, batch_ndim: int = 0) -> None:
        """Fold in a position and its gradient, or `C` chains' at once (`batch_ndim=1`)."""
        z = flatten(position, position, batch_ndim)  # batch_shape + (D,)
        z = z.reshape(-1, z.shape[-1])
        self._position.update(z)
        self._grad.update(flatten(grad, grad, batch_ndim).reshape(z.shape))
        if self._covariance is not None:
            self._covariance.update(z)

    def preconditioner(self, precond: Preconditioner, final: bool = True) -> Preconditioner:
        """`precond` with `P` set from this window (needs two or more samples); for
        `"dense"`, the full covariance when `final`, else the diagonal estimate."""
        if self.num_samples < 2:
            raise ValueError(
                f"A window needs at least 2 samples to estimate the posterior variance, "
                f"got {self.num_samples}."
            )
        var = self._position.covariance(regularize=True)
        grad_var = self._grad.covariance(regularize=False)
        var = torch.where(grad_var > 0, (var / grad_var).sqrt(), var)
        cov = self._covariance.covariance(regularize=True) if self.dense and final else None
        for moments in (self._position, self._grad, self._covariance):
            if moments is not None:
                moments.reset()
        if not self.dense:
            return precond._replace(scale=unflatten(var, precond.scale))
        if cov is None:
            return precond._replace(scale=unflatten(var, precond.scale), cholesky=torch.diag(var.sqrt()))
        return precond._replace(scale=unflatten(cov.diagonal(), precond.scale), cholesky=torch.linalg.cholesky(cov))


#: At most this many doublings or halvings when searching for a reasonable step size.
MAX_STEP_SIZE_SEARCH = 100


def search_step_size(above: Callable[[float], bool], step_size: float) -> float:
    """A reasonable step size for the current preconditioner, as Pyro's HMC finds one: double
    (or halve) η while `above(η)` — one proposal's MALA acceptance probability exceeds the
    target — keeps its first answer, and return the η on the accepting side of the crossing."""
    direction = above(step_size)
    for _ in range(MAX_STEP_SIZE_SEARCH):
        trial = step_size * 2.0 if direction else step_size / 2.0
        if above(trial) != direction:
            return step_size if direction else trial
        step_size = trial
    return step_size


class Warmup:
    """Stan's windowed warm-up of the step size and `P` for the functional core's state, of one
    chain or of `C` chains at once (`batch_ndim=1`: `P` from all chains' draws, η from their
    mean acceptance probability); what `PCLangevin` and `VectorizedMCMC` share.

    Throughout, η is tuned by dual averaging (Hoffman & Gelman 2014) towards `target_accept_prob`
    of the MALA acceptance probability. In each slow window `P` adapts (`"diagonal"`: the
    gradient folded into its running average at every step; `"variance"`/`"dense"`: the
    positions and gradients into the window's `WindowCovariance`, `P` set from it at the
    window's end), after which η restarts from a search around its current value (see
    `adaptation_windows`). Call `update` after each of the `num_steps` warm-up steps.
    """

    def __init__(self, num_steps: int, kind, step_size: float, target_accept_prob: float, *,
                 adapt_step_size: bool = True, adapt_preconditioner: bool = True, batch_ndim: int = 0):
        self.num_steps, self.kind, self.step_size = num_steps, kind, step_size
        self.target_accept_prob, self.batch_ndim = target_accept_prob, batch_ndim
        self.adapt_step_size = adapt_step_size
        self.adapt_preconditioner = adapt_preconditioner and kind in ("diagonal", "variance", "dense")
        self.windows, self.window, self.t = adaptation_windows(num_steps) if num_steps else [], 0, 0
        self.dual_averaging = DualAveraging()
        self.covariance = WindowCovariance(dense=kind == "dense") if kind in ("variance", "dense") else None

    def start(self, state: LangevinState, value_and_grad) -> None:
        """Search a reasonable starting η from the initial state."""
        if self.num_steps and self.adapt_step_size:
            self._restart_step_size(state, value_and_grad)

    def update(self, state: LangevinState, accept_prob: torch.Tensor, value_and_grad) -> LangevinState:
        """After warm-up step `t` (with its acceptance probability, per chain): adapt η and,
        in a slow window, `P`; returns the state with the new `P`. `step_size` is then the η
        for the next step (after the last, dual averaging's average)."""
        t, (_, end) = self.t, self.windows[self.window]
        slow = self.adapt_preconditioner and 0 < self.window < len(self.windows) - 1
        if self.adapt_step_size:
            self.dual_averaging.step(self.target_accept_prob - accept_prob.mean().item())
            log_step, log_step_avg = self.dual_averaging.get_state()
            self.step_size = math.exp(log_step_avg if t == self.num_steps - 1 else log_step)
        if slow and self.kind == "diagonal":
            precond = refresh(accumulate(state.precond, state.grad, self.batch_ndim))
            state = state._replace(precond=precond)
        elif slow:
            self.covariance.update(state.position, state.grad, self.batch_ndim)
            if t == end:
                final = self.window == len(self.windows) - 2
                state = state._replace(precond=self.covariance.preconditioner(state.precond, final))
        if t == end:
            self.window += 1
            if slow and self.adapt_step_size:
                self._restart_step_size(state, value_and_grad)
        self.t += 1
        return state

    def _restart_step_size(self, state: LangevinState, value_and_grad) -> None:
        """Restart dual averaging around a reasonable η for the current `P`.

        As Pyro's HMC: from the current state, double (or halve) η while the MALA
        acceptance probability of one proposal (the chains' mean) stays above (below) the
        target; keep the η on the accepting side of the crossing and centre dual averaging
        on it (not on `10 η` as Pyro: the search has bracketed η already, and short
        terminal windows cannot undo a tenfold start).
        """
        def above(trial):
            _, info = step(state, value_and_grad, trial, batch_ndim=self.batch_ndim)
            return bool(info.accept_prob.mean() > self.target_accept_prob)

        self.step_size = search_step_size(above, self.step_size)
        self.dual_averaging.prox_center = math.log(self.step_size)
        self.dual_averaging.reset()
