r"""`VectorizedMCMC`: many `PCLangevin` chains in one process, one model evaluation per step.

Pyro's `MCMC` runs `num_chains` chains one process each, or one after another
when cores are short, so every step pays Python and tracing overhead for one
chain. `VectorizedMCMC` is a drop-in for `pyro.infer.MCMC` (same constructor,
`run`, `get_samples`, `diagnostics`, `summary`, and what `arviz.from_pyro`
reads) that advances all `C` chains of a [`PCLangevin`][pyro_lpc.PCLangevin]
kernel together with the functional core (`batch_ndim=1`): each chain keeps its
own position, Metropolis test and divergence count (a proposal non-finite or with
an energy error above 1,000, as `PCLangevin` counts them). It is a driver of its own,
not a kernel, because `MCMCKernel.sample` moves one chain.

The model is evaluated **once per step for all chains**: its one-chain energy

$$
U(u) = -\sum_s \log p(s \mid \dots) - \log\left|\det \partial T^{-1}(u)/\partial u\right|
$$

is mapped over a leading chain dim by `torch.func.vmap`, so a model written for
one chain runs unchanged (`X @ beta` included). Where `vmap` cannot trace it
(data-dependent Python control flow, `.item()`, random operations), the model
runs once under an outer `pyro.plate("_chains", C)` left of its own plates (as
Pyro's vectorised importance weights do), each site's log-density summed over
its dims except the chain dim; that needs a model that broadcasts over a leading
dim. At the start the vectorised energy and gradient are checked against Pyro's
one-chain ones at every chain's position; a model neither way vectorises gets a
`ValueError` giving both reasons and saying to use
`pyro.infer.MCMC(PCLangevin(...))`. A `potential_fn=` is likewise mapped by
`vmap`, or else called on positions with a leading chain dim `[C, ...]` and must
return `C` energies.

Warm-up uses all chains (Stan's windows, `pyro_lpc.adaptation`): one step size,
tuned by dual averaging towards `target_accept_prob` of the chains' *mean* MALA
acceptance probability, and one preconditioner `P` (`"variance"`, `"dense"`:
the windowed Welford estimate over all chains' positions and gradients;
`"diagonal"`: the chain-averaged squared gradient). Chains start spread out: `C`
draws of the kernel's `init_strategy` (Pyro's `init_to_uniform` by default), or
of its `init` guide, so that R-hat is meaningful. Only MALA (`adjust=True`) with
`precondition` `None`, `"diagonal"`, `"variance"` or `"dense"` is vectorised;
`jit_compile` is not used. Tensors stay on the device of the model's data (or of
`initial_params`); after warm-up no value is read back to the host per step.

Example:
    ```python
    >>> import pyro, pyro.distributions as dist, torch
    >>> from pyro_lpc import PCLangevin, VectorizedMCMC
    >>> def model(y):
    ...     mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
    ...     with pyro.plate("data", len(y)):
    ...         pyro.sample("y", dist.Normal(mu, 1.0), obs=y)
    >>> mcmc = VectorizedMCMC(PCLangevin(model), num_samples=100, warmup_steps=100,
    ...                       num_chains=4, disable_progbar=True)
    >>> mcmc.run(torch.randn(20) + 3.0)
    >>> mcmc.get_samples(group_by_chain=True)["mu"].shape
    torch.Size([4, 100])

    ```
"""
from __future__ import annotations

import contextlib
import functools

import pyro
import pyro.poutine as poutine
import torch
from pyro.distributions.util import scale_and_mask
from pyro.infer.mcmc.api import MCMC, AbstractMCMC
from pyro.infer.mcmc.logger import ProgressBar
from pyro.infer.mcmc.util import _find_valid_initial_params, diagnostics
from pyro.poutine.util import site_is_subsample
from pyro.util import optional

from . import langevin
from .adaptation import Warmup
from .kernel import PCLangevin, readable_preconditioner
from .potential import joint_potential, latent_sites, sum_except

#: Preconditioners whose `P` is constant within a chain, so MALA is exact and `P` can be shared.
VECTORIZED_PRECONDITIONERS = (None, "diagonal", "variance", "dense")
#: Tolerance of the start-up check that the vectorised energy matches Pyro's per chain (float32 sums).
CHECK_RTOL = 1e-4


def _not_vectorisable(reason: str, num_chains: int) -> ValueError:
    return ValueError(
        f"The model cannot be vectorised over {num_chains} chains ({reason}). Use "
        f"pyro.infer.MCMC(PCLangevin(model), num_chains={num_chains}) instead, which evaluates one chain "
        f"at a time."
    )


class ChainPotential:
    """Per-chain energies `U_c` for positions `{site: [C, *site_shape]}` (unconstrained) from
    one trace of `model` under `pyro.plate("_chains", C, dim=chain_dim)`, with `chain_dim`
    left of every plate and batch dim of the model's sites (`prototype`). With
    `num_chains=None` it is one chain's energy (no plate, every dim summed), the function
    `torch.func.vmap` maps over the chains."""

    def __init__(self, model, args, kwargs, transforms, prototype: poutine.Trace, num_chains=None,
                 max_plate_nesting=None):
        self.model, self.args, self.kwargs = model, args, kwargs
        self.transforms, self.num_chains = transforms, num_chains
        nesting = max_plate_nesting or 0
        batch_ndim = {}
        for name, site in prototype.nodes.items():
            if site["type"] != "sample" or site_is_subsample(site):
                continue
            batch_ndim[name] = torch.as_tensor(site["value"]).dim() - site["fn"].event_dim
            frames = [-f.dim for f in site["cond_indep_stack"] if f.vectorized]
            nesting = max([nesting, batch_ndim[name]] + frames)
        self.chain_dim = -nesting - 1
        self.pad = {name: nesting - n for name, n in batch_ndim.items()}

    def _sum(self, log_p: torch.Tensor) -> torch.Tensor:
        if self.num_chains is None:
            return log_p.sum()
        return sum_except(log_p, (self.chain_dim,))

    def __call__(self, position):
        chains = self.num_chains
        values, log_p = {}, 0.0
        for name, u in position.items():
            z = u
            if name in self.transforms:
                inverse = self.transforms[name].inv
                z = inverse(u)
                jacobian = inverse.log_abs_det_jacobian(u, z)
                log_p = log_p + (jacobian.sum() if chains is None else jacobian.reshape(chains, -1).sum(-1))
            values[name] = z if chains is None else z.reshape((chains,) + (1,) * self.pad[name] + z.shape[1:])
        plate = pyro.plate("_chains", chains, dim=self.chain_dim) if chains else contextlib.nullcontext()
        with plate, pyro.validation_enabled(False):
            trace = poutine.trace(poutine.condition(self.model, data=values)).get_trace(*self.args, **self.kwargs)
        for site in trace.nodes.values():
            if site["type"] == "sample" and not site_is_subsample(site):
                log_p = log_p + self._sum(scale_and_mask(site["fn"].log_prob(site["value"]), site["scale"],
                                                         site["mask"]))
        return -log_p if chains is None else -log_p.expand(chains)


def mapped(energy):
    """`energy` of one chain's position mapped over a leading chain dim by `torch.func.vmap`
    (random operations in the model are refused: a potential must be deterministic)."""
    return torch.func.vmap(energy, randomness="error")


class PerChain(dict):
    """One figure per chain, keyed `"chain 0"`, ..., zero-padded beyond 10 chains (`"chain 00"`,
    ...) so that the keys sort in chain order; Pyro's unpadded `"chain 3"` finds `"chain 03"`."""

    def __init__(self, num_chains: int, values):
        self.width = len(str(num_chains - 1))
        super().__init__((f"chain {c:0{self.width}d}", value) for c, value in enumerate(values))

    def __missing__(self, key):
        name, _, number = key.partition(" ") if isinstance(key, str) else ("", "", "")
        if name == "chain" and number.isdigit() and f"chain {int(number):0{self.width}d}" != key:
            return self[f"chain {int(number):0{self.width}d}"]
        raise KeyError(key)


class VectorizedMCMC(MCMC):
    """`pyro.infer.MCMC` for a [`PCLangevin`][pyro_lpc.PCLangevin] kernel with all chains
    advanced together in one process (module docstring: how, and what is shared).

    The arguments are `pyro.infer.MCMC`'s. `initial_params` are unconstrained, with a
    leading dim of size `num_chains` (optional for one chain); `mp_context` is accepted
    and unused (one process); `hook_fn(kernel, params, stage, i)` gets all chains'
    unconstrained positions `[C, ...]` after each step. After `run`, `kernel.step_size`
    is the adapted step size; `diagnostics()`
    reports each chain's `"divergences"` (sampling-step indices), `"acceptance rate"`
    and the `"step size"`.
    """

    def __init__(self, kernel, num_samples, warmup_steps=None, initial_params=None, num_chains=1,
                 hook_fn=None, mp_context=None, disable_progbar=False, disable_validation=True,
                 transforms=None, save_params=None):
        if not isinstance(kernel, PCLangevin):
            raise TypeError(f"VectorizedMCMC needs a pyro_lpc.PCLangevin kernel, got {type(kernel).__name__}.")
        if kernel.precondition not in VECTORIZED_PRECONDITIONERS:
            raise ValueError(
                f"VectorizedMCMC shares one preconditioner across chains: precondition must be one of "
                f"{list(VECTORIZED_PRECONDITIONERS)}, got {kernel.precondition!r}; use pyro.infer.MCMC for "
                f"the per-chain kinds."
            )
        if not kernel.adjust:
            raise ValueError("VectorizedMCMC runs MALA: the kernel needs adjust=True; use pyro.infer.MCMC "
                             "for unadjusted Langevin (adjust=False).")
        if isinstance(num_chains, bool) or not isinstance(num_chains, int) or num_chains < 1:
            raise ValueError(f"num_chains must be a positive integer, got {num_chains!r}.")
        for name, value in (("num_samples", num_samples), ("warmup_steps", warmup_steps)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}.")
        AbstractMCMC.__init__(self, kernel, num_chains, transforms)
        self.warmup_steps = num_samples if warmup_steps is None else warmup_steps
        self.num_samples = num_samples
        self.disable_validation, self.disable_progbar = disable_validation, disable_progbar
        self.hook_fn, self.save_params = hook_fn, save_params
        self._samples, self._args, self._kwargs = None, None, None
        self._diagnostics = [None] * num_chains
        if initial_params:
            if num_chains == 1 and not all(v.dim() and v.shape[0] == 1 for v in initial_params.values()):
                initial_params = {k: v.unsqueeze(0) for k, v in initial_params.items()}
            for name, value in initial_params.items():
                if value.dim() == 0 or value.shape[0] != num_chains:
                    raise ValueError(
                        f"initial_params['{name}'] has shape {tuple(value.shape)}: its leading dim must be "
                        f"num_chains={num_chains}."
                    )
        self._initial_params = initial_params

    def diagnostics(self):
        """As `pyro.infer.MCMC.diagnostics`, with the chains named `"chain 0"`, ... zero-padded
        beyond 10 chains (`"chain 00"`, ...): ArviZ's `from_pyro` sorts the names as strings to
        match each chain's divergences to its draws, and `"chain 10"` sorts before `"chain 2"`
        (Pyro's `"chain 3"` still finds `"chain 03"`)."""
        diag = diagnostics(self._samples)
        for name in self._diagnostics[0]:
            diag[name] = PerChain(self.num_chains, [d[name] for d in self._diagnostics])
        return diag

    @poutine.block
    def run(self, *args, **kwargs):
        """Warm up and sample all chains; fills `get_samples()` and `diagnostics()`."""
        self._args, self._kwargs = args, kwargs
        with optional(pyro.validation_enabled(not self.disable_validation), self.disable_validation is not None):
            args = [arg.detach() if torch.is_tensor(arg) else arg for arg in args]
            position, value_and_grad = self._setup(args, kwargs)
            self._sample(position, value_and_grad)

    # -- set-up: the vectorised potential and spread-out starting points ------------------
    def _setup(self, args, kwargs):
        kernel, num_chains = self.kernel, self.num_chains
        if kernel.model is None:
            if not self._initial_params:
                raise ValueError("VectorizedMCMC with `potential_fn` needs initial_params with a leading "
                                 f"dim of num_chains={num_chains}.")
            self.transforms = self.transforms or kernel.transforms or {}
            position = {k: v.detach() for k, v in self._initial_params.items()}
            ways = {"torch.func.vmap": mapped(kernel.potential_fn), "a batched call": kernel.potential_fn}
            return position, self._vectorised(ways, position, one_chain=None)
        built = joint_potential(kernel.model, args, kwargs, transforms=kernel.transforms,
                                init_strategy=kernel._init_strategy, max_plate_nesting=kernel._max_plate_nesting)
        if not built.initial_params:
            raise ValueError("The model has no continuous latent site to sample; use pyro.infer.MCMC(PCLangevin("
                             "model)), which handles collapsed and enumerated models as Pyro's HMC does.")
        trace = built.prototype_trace
        discrete = [name for name in latent_sites(trace) if trace.nodes[name]["fn"].support.is_discrete]
        if discrete:
            raise _not_vectorisable(f"its discrete latent site(s) {discrete} are enumerated", num_chains)
        self.transforms = kernel.transforms = built.transforms
        position = self._initial_positions(built, args, kwargs)
        energy = functools.partial(ChainPotential, kernel.model, args, kwargs, built.transforms, trace,
                                   max_plate_nesting=kernel._max_plate_nesting)
        ways = {"torch.func.vmap": mapped(energy()), "pyro.plate('_chains')": energy(num_chains=num_chains)}
        return position, self._vectorised(ways, position, langevin.value_and_grad(built.potential_fn))

    def _vectorised(self, ways, position, one_chain):
        """The first of `ways` (vectorised potentials by name) that gives one finite energy
        per chain, equal to `one_chain`'s (Pyro's potential) where given; the value-and-gradient
        function of it. Raises with every way's reason when none does."""
        failures = []
        for how, potential in ways.items():
            value_and_grad = langevin.value_and_grad(potential)
            try:
                energies, grads = value_and_grad(position)
            except Exception as error:  # any failure of the user's model or potential_fn under this way
                failures.append(f"{how}: {type(error).__name__}: {str(error).splitlines()[0].rstrip('.')}")
                continue
            if energies.shape != (self.num_chains,):
                failures.append(f"{how}: one energy per chain, shape ({self.num_chains},), is needed for "
                                f"positions with a leading chain dim; got shape {tuple(energies.shape)}")
                continue
            mismatch = one_chain and self._differs_from_one_chain(one_chain, position, energies, grads)
            if mismatch:
                failures.append(f"{how}: {mismatch}")
                continue
            self._check_finite(energies, grads)
            return value_and_grad
        raise _not_vectorisable("; ".join(failures), self.num_chains)

    def _initial_positions(self, built, args, kwargs):
        """`initial_params`, else `C` draws of the init strategy with finite energy (Pyro's own
        search), the sites the `init` guide draws replaced by `C` draws of it."""
        kernel, num_chains = self.kernel, self.num_chains
        if self._initial_params:
            return {k: v.detach() for k, v in self._initial_params.items()}
        position = _find_valid_initial_params(kernel.model, args, kwargs, built.transforms, built.potential_fn,
                                              built.initial_params, num_chains=num_chains,
                                              init_strategy=kernel._init_strategy)
        if num_chains == 1:
            position = {k: v.unsqueeze(0) for k, v in position.items()}
        if kernel.init is not None:
            draws = [kernel._guide_params(built.initial_params, args, kwargs) for _ in range(num_chains)]
            position.update({name: torch.stack([d[name] for d in draws]) for name in draws[0]})
        return position

    def _differs_from_one_chain(self, one_chain, position, energies, grads):
        """Why the chains' vectorised energies or gradients differ from Pyro's one-chain ones, or `None`."""
        for c in range(self.num_chains):
            energy, grad = one_chain({k: v[c] for k, v in position.items()})
            if not torch.isfinite(energy):
                continue  # a non-finite start is reported by `_check_finite`
            if not torch.allclose(energies[c], energy, rtol=CHECK_RTOL, atol=CHECK_RTOL):
                return (f"chain {c}'s energy is {energies[c].item():.6g} vectorised but {energy.item():.6g} "
                        f"evaluated alone (does the model reduce or reshape a latent over all its dims?)")
            for name, g in grad.items():
                if not torch.allclose(grads[name][c], g, rtol=CHECK_RTOL, atol=CHECK_RTOL * (1 + g.abs().max().item())):
                    return f"chain {c}'s gradient at site '{name}' differs from the one-chain gradient"
        return None

    def _check_finite(self, energies, grads):
        ok = langevin.finite(energies, grads, batch_ndim=1)
        if not ok.all():
            bad = ok.logical_not().nonzero().flatten().tolist()
            raise ValueError(f"The potential energy or its gradient is not finite at the initial point of "
                             f"chain(s) {bad}; check initial_params and the priors.")

    # -- warm-up and sampling ---------------------------------------------------------------
    def _warmup(self, state, value_and_grad, progress):
        """Warm-up in Stan's windows (`pyro_lpc.adaptation.Warmup`), statistics from all chains."""
        kernel = self.kernel
        warmup = Warmup(self.warmup_steps, kernel.precondition, kernel._init_step_size, kernel.target_accept_prob,
                        adapt_step_size=kernel.adapt_step_size, adapt_preconditioner=kernel.adapt_preconditioner,
                        batch_ndim=1)
        warmup.start(state, value_and_grad)
        for t in range(self.warmup_steps):
            state, info = langevin.step(state, value_and_grad, warmup.step_size, adjust=True, batch_ndim=1)
            state = warmup.update(state, info.accept_prob, value_and_grad)
            self._after_step(state, "Warmup", t, progress)
        return state, warmup.step_size

    def _after_step(self, state, stage, i, progress):
        progress.update()
        if self.hook_fn is not None:
            self.hook_fn(self.kernel, dict(state.position), stage, i)

    def _sample(self, position, value_and_grad):
        kernel, num_chains = self.kernel, self.num_chains
        state = langevin.init(position, value_and_grad, kernel.precondition, batch_ndim=1)
        progress = ProgressBar(self.warmup_steps, self.num_samples, disable=self.disable_progbar)
        try:
            state, step_size = self._warmup(state, value_and_grad, progress)
            progress.set_description("Sample")
            names = self.save_params or sorted(state.position)
            draws, accepted, diverged = {name: [] for name in names}, [], []
            for i in range(self.num_samples):
                state, info = langevin.step(state, value_and_grad, step_size, adjust=True, batch_ndim=1)
                accepted.append(info.accepted)
                diverged.append(langevin.divergent(info))
                for name in names:
                    draws[name].append(state.position[name])
                self._after_step(state, "Sample", i, progress)
        finally:
            progress.close()
        samples = {}
        for name, values in draws.items():
            like = state.position[name]
            z = torch.stack(values, 1) if values else like.new_empty((num_chains, 0) + like.shape[1:])
            samples[name] = self.transforms[name].inv(z) if name in self.transforms else z
        self._samples = samples
        accept_rate = (torch.stack(accepted, 1).float().mean(1) if accepted else torch.zeros(num_chains)).tolist()
        diverged = torch.stack(diverged, 1) if diverged else torch.zeros(num_chains, 0, dtype=torch.bool)
        self._diagnostics = [
            {"divergences": diverged[c].nonzero().flatten().tolist(), "acceptance rate": accept_rate[c],
             "step size": step_size}
            for c in range(num_chains)
        ]
        kernel.step_size, kernel._final_preconditioner = step_size, readable_preconditioner(state.precond)

