r"""`PCLangevin`: preconditioned Langevin dynamics as a `pyro.infer.MCMC` kernel."""
from __future__ import annotations

import warnings
from collections import OrderedDict
from typing import Optional

import pyro
import pyro.poutine as poutine
import torch
from pyro.infer.autoguide.initialization import init_to_uniform
from pyro.infer.mcmc.mcmc_kernel import MCMCKernel

from . import langevin
from .adaptation import Warmup
from .potential import joint_potential, nonfinite_sites, unconstrain
from .warm_start import check_guide_sites, guide_values


class PCLangevin(MCMCKernel):
    r"""Preconditioned Langevin kernel (ULA or MALA) for `pyro.infer.MCMC`.

    Each `sample` call takes one step

    $$
    z' = z - \eta P \odot \nabla U(z) + \sqrt{2 \eta P} \odot \xi,
    \qquad \xi \sim \mathcal N(0, I),
    $$

    on the model's energy $U(z) = -\log p(x, z)$ in unconstrained space,
    accepted with the Metropolis–Hastings probability when `adjust=True`
    (MALA, the default) and always otherwise (ULA, Zahid et al. 2024). `P` is
    adapted during warm-up and frozen afterwards, so post-warm-up MALA leaves the
    posterior exactly invariant and ULA has only its O(η) discretisation bias:

    - `"variance"` (default): $P \approx$ the posterior variance of each
      coordinate, which whitens, estimated in each slow window as
      $\sqrt{\widehat{\mathrm{Var}}(z) / \widehat{\mathrm{Var}}(\nabla U)}$
      (`pyro_lpc.adaptation.WindowCovariance`);
    - `"dense"`: the full posterior covariance $P = L L^\top$ (last slow window;
      earlier ones use the `"variance"` estimate), with the step
      $z' = z - \eta P \nabla U + \sqrt{2\eta} L \xi$; for strongly correlated
      posteriors of moderate dimension;
    - `"diagonal"`: $P = 1/(\sqrt{\hat v} + \lambda)$ from a running average of
      squared gradients (what `fit` uses); $P \propto \sigma$, so it does not whiten.

    Measured (`benchmarks/kernel_preconditioners.py`, 1,000 warm-up steps and
    2,000 draws, 2 seeds, min bulk ESS): 8-d Gaussian with σ in [1e-2, 1e2]
    1–3 (diagonal), 533–595 (variance), 463–482 (dense); 9-link Gaussian chain
    2–17, 4–16, 227–386; normal model 384–401, 984–1,027, 942–1,037; 100-d
    logistic regression 4–14, 9–15, 2 (dense needs more draws than a 100x100
    covariance takes). Warm-up follows Stan's windows
    (`adaptation_windows`): the step size is tuned throughout by dual
    averaging (Hoffman & Gelman 2014) towards `target_accept_prob` of the MALA
    acceptance probability (computed as a diagnostic under ULA too) and
    restarted after each window that adapted `P`. Warm-up steps are
    Metropolis-adjusted whenever that is exact, so tuning stays in the typical
    set. After warm-up a non-finite ULA proposal stops the chain with an error
    naming the step, and a ULA step past the stability limit (η times the
    curvature along the move above 2) is counted as a divergence, with a
    warning; a MALA proposal that is non-finite or whose energy error
    $-\log$(acceptance ratio) exceeds 1,000 (`langevin.MAX_ENERGY_ERROR`, Pyro's HMC
    threshold; such a step went far past the local stability limit, as in a funnel's
    neck) is rejected and counted as a divergence.

    ULA at the step size tuned for MALA's acceptance is biased: on a normal
    model with unknown mean and scale (50 points) its posterior sd of the scale
    was 2.3x NUTS's, MALA's 1.00x (`benchmarks/kernel_defaults.py`).
    `"rmsprop"` and `"adam"` are the paper's per-chain forms, updated every
    step: no Metropolis test is exact for them, so they need `adjust=False`
    and warm up unadjusted (kept for reproducing the paper).

    Args:
        model: a Pyro model (or give `potential_fn` instead).
        potential_fn: `dict -> scalar` energy in unconstrained space;
            requires `initial_params` (through `MCMC`).
        step_size (float): initial Langevin step size η.
        precondition (str): `"variance"`, `"dense"`, `"diagonal"`, `"rmsprop"`,
            `"adam"` or `None`.
        adjust (bool): Metropolis-adjust the step (MALA, default); `False` is ULA.
        adapt_step_size (bool): tune η during warm-up.
        target_accept_prob (float): dual-averaging target (0.574 is optimal for MALA).
        adapt_preconditioner (bool): estimate `P` during warm-up (else `P = I`).
        init_strategy: Pyro init strategy for the chains' starting points.
        transforms (dict): optional site transforms to unconstrained space.
        init: an amortised guide (e.g. [`pyro_lpc.WarmStart`][pyro_lpc.WarmStart]) called
            with the model's arguments; chains start from its draws.
        max_plate_nesting (int): as for Pyro's HMC.
        jit_compile (bool): trace the model's potential with the PyTorch JIT, as
            Pyro's HMC does (several times faster per step for small models; some
            models, e.g. ones registering `pyro.module` parameters, fail to trace).
        ignore_jit_warnings (bool): silence the JIT's tracer warnings.

    Example:
        ```python
        >>> import pyro, pyro.distributions as dist, torch
        >>> from pyro.infer import MCMC
        >>> from pyro_lpc import PCLangevin
        >>> def model(y):
        ...     mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
        ...     with pyro.plate("data", len(y)):
        ...         pyro.sample("y", dist.Normal(mu, 1.0), obs=y)
        >>> mcmc = MCMC(PCLangevin(model), num_samples=200, warmup_steps=200,
        ...             disable_progbar=True)
        >>> mcmc.run(torch.randn(20) + 3.0)
        >>> mcmc.get_samples()["mu"].shape
        torch.Size([200])

        ```
    """

    def __init__(
        self,
        model=None,
        potential_fn=None,
        step_size: float = 0.01,
        precondition: Optional[str] = "variance",
        adjust: bool = True,
        adapt_step_size: bool = True,
        target_accept_prob: float = langevin.MALA_TARGET_ACCEPT,
        adapt_preconditioner: bool = True,
        init_strategy=init_to_uniform,
        transforms=None,
        init=None,
        max_plate_nesting=None,
        jit_compile: bool = False,
        ignore_jit_warnings: bool = False,
    ):
        if (model is None) == (potential_fn is None):
            raise ValueError("PCLangevin needs exactly one of `model` or `potential_fn`.")
        langevin.check_sampling_precondition(precondition, adjust)
        if not 0.0 < target_accept_prob < 1.0:
            raise ValueError(f"target_accept_prob must lie in (0, 1), got {target_accept_prob!r}.")
        self.model = model
        self.potential_fn = potential_fn
        self.transforms = transforms
        self._init_step_size = langevin.check_step_size(step_size)
        self.precondition = precondition
        self.adjust = adjust
        self.adapt_step_size = adapt_step_size
        self.target_accept_prob = target_accept_prob
        self.adapt_preconditioner = adapt_preconditioner
        self._init_strategy = init_strategy
        self._max_plate_nesting = max_plate_nesting
        self._jit_compile, self._ignore_jit_warnings = jit_compile, ignore_jit_warnings
        self.init = init
        self.step_size = self._init_step_size
        self._final_preconditioner = None
        self._reset()

    # -- MCMC contract -----------------------------------------------------------
    def _reset(self):
        self._t = 0
        self._warmup_steps = 0
        self._accept_cnt = 0
        self._mean_accept_prob = 0.0
        self._divergences = []
        self._initial_params = None
        self._state = None
        self._value_and_grad = None
        self._warmup = None
        self._from_params = False

    @property
    def initial_params(self):
        return self._initial_params

    @initial_params.setter
    def initial_params(self, params):
        self._initial_params = params

    def setup(self, warmup_steps, *args, **kwargs):
        self._warmup_steps = warmup_steps
        self.step_size = self._init_step_size
        self._args, self._kwargs = args, kwargs
        if self.model is not None:
            built = joint_potential(
                self.model,
                args,
                kwargs,
                transforms=self.transforms,
                init_strategy=self._init_strategy,
                initial_params=self._initial_params,
                max_plate_nesting=self._max_plate_nesting,
                jit_compile=self._jit_compile,
                ignore_jit_warnings=self._ignore_jit_warnings,
            )
            self.potential_fn, self.transforms = built.potential_fn, built.transforms
            params = built.initial_params
            if self.init is not None and self._initial_params is None:
                params = {**params, **self._guide_params(params, args, kwargs)}
            self._initial_params = params
        elif not self._initial_params:
            raise ValueError(
                "PCLangevin with `potential_fn` needs initial parameters: pass "
                "`initial_params=` to pyro.infer.MCMC."
            )
        if not self._initial_params:
            # Every latent is collapsed or enumerated: nothing to move. As Pyro's HMC,
            # `sample` then returns its (empty) params unchanged.
            self._state = None
            self._check_initial_state()
            return
        self._value_and_grad = langevin.value_and_grad(self._potential)
        position = {k: v.detach() for k, v in self._initial_params.items()}
        self._state = langevin.init(position, self._value_and_grad, self.precondition)
        self._check_initial_state()
        self._warmup = Warmup(warmup_steps, self.precondition, self.step_size, self.target_accept_prob,
                              adapt_step_size=self.adapt_step_size, adapt_preconditioner=self.adapt_preconditioner)
        self._warmup.start(self._state, self._value_and_grad)
        self.step_size = self._warmup.step_size

    def _potential(self, position):
        with pyro.validation_enabled(False):
            return self.potential_fn(position)

    def _guide_params(self, params, args, kwargs):
        """Unconstrained starting values drawn from the `init` guide: the values of its
        non-auxiliary sites (an autoguide's auxiliary sites are its own variables)."""
        with torch.no_grad(), poutine.block():
            trace = poutine.trace(self.init).get_trace(*args, **kwargs)
        check_guide_sites(trace, params, who="The init guide")
        drawn = {name: value.detach() for name, value in guide_values(trace).items()}
        for name, value in drawn.items():
            if value.shape != params[name].shape:
                raise ValueError(
                    f"The init guide draws site '{name}' with shape {tuple(value.shape)}, "
                    f"but the model's site has shape {tuple(params[name].shape)}."
                )
        return unconstrain(drawn, self.transforms)

    def _check_initial_state(self):
        state = self._state
        if state is None:  # no continuous latent: U = -log p(x) is a constant
            potential = self._potential({})
            if not torch.isfinite(potential).all():
                sites = nonfinite_sites(self.model, self._args, self._kwargs, {}, self.transforms)
                raise ValueError(
                    f"The model has no continuous latent site, and its log-density is not "
                    f"finite for these data (U = {potential.item()}); non-finite log-density "
                    f"at site(s) {sites}."
                )
            return
        finite = bool(torch.isfinite(state.potential).all()) and all(
            bool(torch.isfinite(g).all()) for g in state.grad.values()
        )
        if finite:
            return
        sites = (
            nonfinite_sites(self.model, self._args, self._kwargs, state.position, self.transforms)
            if self.model is not None
            else []
        )
        sites = sites or [k for k, g in state.grad.items() if not torch.isfinite(g).all()]
        raise ValueError(
            f"The potential energy is not finite at the initial point "
            f"(U = {state.potential.item()}); non-finite log-density or gradient at "
            f"site(s) {sites or sorted(state.position)}. Check the initial values and priors."
        )

    def clear_cache(self):
        """Forget the chain's cached position, energy and gradient, as Pyro's `HMC.clear_cache`:
        the next `sample(params)` moves from `params` (adapted `η` and `P` are kept)."""
        self._from_params = True

    def sample(self, params):
        if self._from_params and self._state is not None:
            position = {k: v.detach() for k, v in params.items()}
            potential, grad = self._value_and_grad(position)
            self._state = self._state._replace(position=position, potential=potential, grad=grad)
            self._from_params = False
        if self._state is None:  # no continuous latent (see `setup`): as Pyro's HMC
            self._t += 1
            self._mean_accept_prob = 1.0
            self._accept_cnt += self._t > self._warmup_steps
            return params
        warmup = self._t < self._warmup_steps
        # Warm-up applies the Metropolis test whenever it is exact (P constant along
        # the chain), so tuning happens in the typical set; the per-chain kinds warm up
        # unadjusted, dropping only divergent proposals. After warm-up ULA moves
        # unconditionally.
        adjust = self.adjust or (warmup and self.precondition not in langevin.PER_CHAIN)
        with torch.no_grad():
            new_state, info = langevin.step(
                self._state, self._value_and_grad, self.step_size, adjust=adjust
            )
        accept_prob = float(info.accept_prob)
        if warmup:
            if bool(info.diverged):
                new_state = self._state
        elif self.adjust:
            if bool(langevin.divergent(info)):  # non-finite, or an energy error above 1000 (as HMC)
                self._divergences.append(self._t - self._warmup_steps)
        elif bool(info.diverged):
            bad = [k for k, v in new_state.position.items() if not torch.isfinite(v).all()]
            raise RuntimeError(
                f"Unadjusted Langevin diverged at sampling step {self._t - self._warmup_steps} "
                f"(step size {self.step_size:.3g}): the potential or its gradient became "
                f"non-finite{f' (non-finite values at {bad})' if bad else ''}. Use a smaller "
                f"step_size, adjust=True (MALA rejects such proposals) or preconditioning."
            )
        elif self._past_stability_limit(new_state):
            self._divergences.append(self._t - self._warmup_steps)
            if len(self._divergences) == 1:
                warnings.warn(
                    f"Unadjusted Langevin is past its stability limit at sampling step "
                    f"{self._t - self._warmup_steps}: step size {self.step_size:.3g} times the "
                    f"curvature along the move exceeds 2, so the chain can run away; such steps "
                    f"are counted in diagnostics()['divergences']. Use adjust=True (MALA) or a "
                    f"smaller step_size.",
                    RuntimeWarning,
                )
        self._state = new_state
        self._t += 1
        if warmup:
            self._state = self._warmup.update(self._state, info.accept_prob, self._value_and_grad)
            self.step_size = self._warmup.step_size
            n = self._t
        else:
            n = self._t - self._warmup_steps
            self._accept_cnt += bool(info.accepted)
        self._mean_accept_prob += (accept_prob - self._mean_accept_prob) / n
        return dict(self._state.position)

    def _past_stability_limit(self, new_state) -> bool:
        r"""Whether a ULA move `Δz` went past the stability limit `η h < 2`.

        `h = Δz·Δ∇U / (Δz·P⁻¹Δz)` is the secant curvature along the move in
        `P`'s metric. On a Gaussian it lies between the eigenvalues of `P H`, and
        ULA (`z' - z* = (I - ηPH)(z - z*) + noise`) is stable iff `η λ_max < 2`;
        a chain that runs away moves along the unstable direction, so its steps
        are caught (Pyro's HMC likewise counts a divergence, rather than stopping).
        """
        old = self._state
        move = {name: z - old.position[name] for name, z in new_state.position.items()}
        curvature = sum((dz * (new_state.grad[name] - old.grad[name])).sum() for name, dz in move.items())
        metric = langevin.squared_norm(new_state.precond, move)
        return bool(self.step_size * curvature > 2.0 * metric)

    def cleanup(self):
        """End of a chain: forget its state, but keep what warm-up adapted
        (`step_size`, `preconditioner`) readable until the next `setup`."""
        self._final_preconditioner = self.preconditioner
        self._reset()

    def logging(self):
        return OrderedDict(
            [
                ("step size", "{:.2e}".format(self.step_size)),
                ("acc. prob", "{:.3f}".format(self._mean_accept_prob)),
            ]
        )

    def diagnostics(self):
        num_samples = max(self._t - self._warmup_steps, 1)
        return {
            "divergences": list(self._divergences),
            "acceptance rate": self._accept_cnt / num_samples,
            "step size": self.step_size,
        }

    @property
    def preconditioner(self):
        """`P` (frozen after warm-up; after a run, the last chain's, or the shared one of
        `VectorizedMCMC`'s chains): per site for the diagonal kinds, the matrix `L Lᵀ` over the
        flattened sites (in the order of the model's sites) for `"dense"`, or `None` without
        preconditioning."""
        if self._state is None:
            return self._final_preconditioner
        return readable_preconditioner(self._state.precond)


def readable_preconditioner(precond: langevin.Preconditioner):
    """`P` as `PCLangevin.preconditioner` reports it (see there)."""
    if precond.kind is None:
        return None
    if precond.kind == "dense":
        return precond.cholesky @ precond.cholesky.mT
    return dict(precond.scale)
