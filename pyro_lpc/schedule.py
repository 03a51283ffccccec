r"""How much inference `fit` spends per mini-batch: adaptive Langevin steps and step size.

**Steps** ([`AdaptiveSteps`][pyro_lpc.schedule.AdaptiveSteps], `fit(num_steps="auto")`). Langevin steps
pay while they still move the samples to markedly more probable latents. After
each iteration that ran chains, `fit` reports the *late energy drop*

$$
Δ = \frac{1}{B} \sum_i \big[U_i(z_i^{(\lfloor K/2 \rfloor)}) - U_i(z_i^{(K)})\big]
\quad\text{(nats per data point)},
$$

how much the second half of the chains still lowered the energy (for `K = 1`
the drop from the guide's draw `z^{(0)}`). Chains that have reached their
stationary law no longer lower it (Δ ≈ 0, up to Monte Carlo noise of order
`sqrt(d / 2B)` for d latent dimensions); chains still descending from poor
guide draws do. While `Δ > tolerance` `K` doubles (up to `max_steps`);
when `Δ < tolerance / 2` it halves, down to `min_steps` (0 by default: θ
then steps on the guide's draws, from the same model evaluation as the guide's
reverse-KL term, like a VAE). At `K = 0` nothing is measured, so every
`probe_every`-th iteration runs `probe_steps` steps anyway (its samples also
train θ) and the schedule decides again. (The total drop
`U(z^{(0)}) - U(z^{(K)})`, an estimate of how far the guide still is from the
chains, is reported in the history as `energy_drop`.)

**Step size** ([`StepSizeAdaptation`][pyro_lpc.schedule.StepSizeAdaptation], `fit(target_accept_prob=...)`). The
MALA acceptance probability of a Langevin proposal measures its discretisation
error (it is computed for ULA too). After each iteration the local step size
moves as `log η ← log η + γ (ā − target)`, `ā` the mean acceptance
probability over the iteration's chains and steps: a constant-gain
Robbins–Monro recursion, which keeps tracking as θ changes the posterior (the
kernel's dual averaging, by contrast, converges and freezes).
"""
from __future__ import annotations

import math
import operator
from typing import Optional


class AdaptiveSteps:
    """Langevin steps per mini-batch driven by the late energy drop (module docstring).

    Args:
        max_steps (int): most steps per mini-batch.
        min_steps (int): fewest (0: θ may step on the guide's draws; `fit`
            raises it to 1 without a guide or with `warm_start="forward"`, where no
            reverse-KL term trains the guide's draws towards the posterior).
        initial (int): steps of the first iteration (default `max_steps`).
        tolerance (float): late energy drop, in nats per data point, above which
            steps are doubled; below half of it they are halved. The default, 3, was
            chosen on MNIST (`benchmarks/per_second.py`): with 1 the chains kept
            K ≈ 16 and the run was 5 nats worse after 6 minutes.
        probe_every (int): at `K = 0`, run chains every this many iterations.
        probe_steps (int): steps of such a probe (default `max(1, max_steps // 4)`).

    Example:
        ```python
        >>> steps = AdaptiveSteps(max_steps=8, tolerance=1.0)
        >>> [steps(0), steps.update(5.0), steps.update(0.1), steps.update(0.1), steps.update(0.1)]
        [8, 8, 4, 2, 1]

        ```
    """

    def __init__(self, max_steps: int = 20, min_steps: int = 0, initial: Optional[int] = None,
                 tolerance: float = 3.0, probe_every: int = 20, probe_steps: Optional[int] = None):
        if int(max_steps) < 1 or not 0 <= int(min_steps) <= int(max_steps):
            raise ValueError(f"need 0 <= min_steps <= max_steps and max_steps >= 1, got min_steps={min_steps!r}, "
                             f"max_steps={max_steps!r}.")
        if not (isinstance(tolerance, (int, float)) and math.isfinite(tolerance) and tolerance > 0):
            raise ValueError(f"tolerance must be a positive number of nats per data point, got {tolerance!r}.")
        if int(probe_every) < 1:
            raise ValueError(f"probe_every must be a positive integer, got {probe_every!r}.")
        self.max_steps, self.min_steps = int(max_steps), int(min_steps)
        self.tolerance, self.probe_every = float(tolerance), int(probe_every)
        self.probe_steps = int(probe_steps) if probe_steps is not None else max(1, self.max_steps // 4)
        self.steps = self._clip(self.max_steps if initial is None else int(initial))
        self.since_probe = 0

    def _clip(self, steps: int) -> int:
        return max(self.min_steps, min(self.max_steps, steps))

    def __call__(self, iteration: int) -> int:
        """Steps for this iteration (a probe's when due at `K = 0`)."""
        if self.steps > 0:
            return self.steps
        self.since_probe += 1
        if self.since_probe >= self.probe_every:
            self.since_probe = 0
            return self.probe_steps
        return 0

    def update(self, energy_drop: float) -> int:
        """Take the late energy drop of the chains just run; returns the next `K`."""
        if energy_drop > self.tolerance:
            self.steps = self._clip(max(1, 2 * self.steps))
        elif energy_drop < self.tolerance / 2:
            self.steps = self._clip(self.steps // 2)
        return self.steps

    def state_dict(self) -> dict:
        return {"steps": self.steps, "since_probe": self.since_probe}

    def load_state_dict(self, state: dict) -> None:
        self.steps, self.since_probe = state["steps"], state["since_probe"]


class FixedSteps:
    """`K` steps at every iteration (`fit(num_steps=K)`)."""

    def __init__(self, value: int):
        try:
            steps = -1 if isinstance(value, bool) else operator.index(value)
        except TypeError:
            steps = -1
        if steps < 0:
            raise ValueError(f"num_steps must be a non-negative integer, 'auto' or an AdaptiveSteps, got {value!r}.")
        self.steps = self.max_steps = steps

    def __call__(self, iteration: int) -> int:
        return self.steps

    def update(self, energy_drop: float) -> int:
        return self.steps

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def steps_schedule(num_steps):
    """`num_steps` of `fit` as a schedule: an int, `"auto"` or an [`AdaptiveSteps`][pyro_lpc.schedule.AdaptiveSteps]."""
    if isinstance(num_steps, AdaptiveSteps):
        return num_steps
    if num_steps == "auto":
        return AdaptiveSteps()
    return FixedSteps(num_steps)


def robbins_monro(log_step_size, accept_prob, target: float, gain: float = 1.0):
    """One constant-gain Robbins–Monro move of a log step size towards an acceptance target:
    `log η + gain (ā − target)` (floats or tensors, e.g. one η per data point in AIS)."""
    return log_step_size + gain * (accept_prob - target)


class StepSizeAdaptation:
    """`log η ← log η + gain (ā − target)` after each iteration (module docstring).

    Args:
        step_size (float): initial η.
        target (float): target mean MALA acceptance probability, in (0, 1).
        gain (float): γ, the change of `log η` per unit of acceptance error.

    Example:
        ```python
        >>> adapt = StepSizeAdaptation(0.1, target=0.6, gain=1.0)
        >>> round(adapt.update(0.1), 4)   # far too few accepted: η shrinks by e^-0.5
        0.0607

        ```
    """

    def __init__(self, step_size: float, target: float, gain: float = 0.1, bounds=(1e-7, 10.0)):
        if not 0.0 < float(target) < 1.0:
            raise ValueError(f"target_accept_prob must be in (0, 1), got {target!r}.")
        self.log_step_size, self.target, self.gain = math.log(step_size), float(target), float(gain)
        self.bounds = (math.log(bounds[0]), math.log(bounds[1]))

    @property
    def step_size(self) -> float:
        return math.exp(self.log_step_size)

    def update(self, accept_prob: float) -> float:
        """Take the mean acceptance probability of the chains just run; returns the next η."""
        if math.isfinite(accept_prob):
            moved = robbins_monro(self.log_step_size, accept_prob, self.target, self.gain)
            self.log_step_size = min(max(moved, self.bounds[0]), self.bounds[1])
        return self.step_size

    def halve(self) -> float:
        """After divergent steps: η halves (within the bounds); returns it."""
        self.log_step_size = max(self.log_step_size - math.log(2.0), self.bounds[0])
        return self.step_size

    def state_dict(self) -> dict:
        return {"log_step_size": self.log_step_size}

    def load_state_dict(self, state: dict) -> None:
        self.log_step_size = state["log_step_size"]
