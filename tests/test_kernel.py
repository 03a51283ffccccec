"""PCLangevin inside pyro.infer.MCMC against closed-form posteriors.

Tolerances: a posterior mean is checked to 5 Monte Carlo standard errors,
``5 * sd / sqrt(ESS)``, with ESS estimated from the chain itself
(:func:`pyro.ops.stats.effective_sample_size`); a posterior variance to
``5 * var * sqrt(2 / ESS)``. Seeds are fixed.
"""
import math
import pickle

import arviz
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import MCMC
from pyro.ops.stats import effective_sample_size

from pyro_lpc import PCLangevin, langevin


def run(kernel, *args, num_samples=2000, warmup_steps=1000, num_chains=1, seed=0, **kwargs):
    pyro.set_rng_seed(seed)
    mcmc = MCMC(
        kernel,
        num_samples=num_samples,
        warmup_steps=warmup_steps,
        num_chains=num_chains,
        disable_progbar=True,
        **kwargs,
    )
    mcmc.run(*args)
    return mcmc


def assert_moments(samples, mean, var, num_se=5.0):
    """``samples``: (num_samples, d) from one chain; compare to exact mean and variance."""
    samples = samples.reshape(samples.shape[0], -1)
    ess = effective_sample_size(samples.unsqueeze(0), chain_dim=0, sample_dim=1)
    mean, var = torch.as_tensor(mean).reshape(-1), torch.as_tensor(var).reshape(-1)
    mean_err = (samples.mean(0) - mean).abs()
    var_err = (samples.var(0) - var).abs()
    assert torch.all(mean_err < num_se * (var / ess).sqrt()), (samples.mean(0), mean, ess)
    assert torch.all(var_err < num_se * var * (2.0 / ess).sqrt()), (samples.var(0), var, ess)


# -- a conjugate Gaussian chain -------------------------------------------------
T = 4


def gaussian_chain(y):
    loc = torch.tensor(0.0)
    for i in range(T):
        loc = pyro.sample(f"loc_{i}", dist.Normal(loc, 1.0))
    pyro.sample("obs", dist.Normal(loc, 1.0), obs=y)


def gaussian_chain_posterior(y):
    """Exact posterior of (loc_0..loc_{T-1}): a Gaussian with tridiagonal precision."""
    precision = torch.zeros(T, T)
    for i in range(T):
        precision[i, i] += 1.0  # its own conditional p(loc_i | loc_{i-1})
        if i > 0:
            precision[i - 1, i - 1] += 1.0
            precision[i - 1, i] -= 1.0
            precision[i, i - 1] -= 1.0
    precision[T - 1, T - 1] += 1.0  # the observation
    b = torch.zeros(T)
    b[T - 1] = y
    cov = torch.linalg.inv(precision)
    return cov @ b, cov


@pytest.mark.slow
@pytest.mark.parametrize("precondition", ["diagonal", None])
def test_mala_gaussian_chain_matches_exact_posterior(precondition):
    y = torch.tensor(2.5)
    mcmc = run(PCLangevin(gaussian_chain, adjust=True, precondition=precondition), y,
               num_samples=4000)
    samples = torch.stack([mcmc.get_samples()[f"loc_{i}"] for i in range(T)], -1)
    mean, cov = gaussian_chain_posterior(y)
    assert_moments(samples, mean, cov.diagonal())
    # the precision (inverse covariance) too: posterior correlations are strong here
    emp_precision = torch.linalg.inv(torch.cov(samples.T))
    assert torch.allclose(emp_precision, torch.linalg.inv(cov), atol=0.35)


def beta_bernoulli(x):
    p = pyro.sample("p", dist.Beta(2.0, 3.0))
    with pyro.plate("data", len(x)):
        pyro.sample("x", dist.Bernoulli(p), obs=x)


def gamma_poisson(x):
    rate = pyro.sample("rate", dist.Gamma(3.0, 1.0))
    with pyro.plate("data", len(x)):
        pyro.sample("x", dist.Poisson(rate), obs=x)


@pytest.mark.slow
def test_mala_beta_bernoulli_constrained_latent():
    x = torch.tensor([1.0] * 7 + [0.0] * 13)
    mcmc = run(PCLangevin(beta_bernoulli, adjust=True), x)
    exact = dist.Beta(2.0 + 7, 3.0 + 13)
    samples = mcmc.get_samples()["p"]
    assert ((samples > 0) & (samples < 1)).all()
    assert_moments(samples.unsqueeze(-1), exact.mean, exact.variance)


@pytest.mark.slow
def test_mala_gamma_poisson_constrained_latent():
    x = torch.tensor([2.0, 5.0, 3.0, 4.0, 1.0, 6.0, 3.0, 2.0])
    mcmc = run(PCLangevin(gamma_poisson, adjust=True), x)
    exact = dist.Gamma(3.0 + x.sum(), 1.0 + len(x))
    assert_moments(mcmc.get_samples()["rate"].unsqueeze(-1), exact.mean, exact.variance)


# -- preconditioning on an ill-scaled Gaussian ----------------------------------
SCALES = torch.logspace(-3, 3, 7)


def ill_scaled_potential(params):
    return 0.5 * (params["z"] / SCALES).square().sum()


@pytest.mark.slow
@pytest.mark.parametrize("adjust", [False, True])
def test_preconditioning_is_stable_where_the_plain_sampler_is_not(adjust):
    # Stability of plain Langevin needs η < 2 σ_min² = 2e-6. With the diagonal
    # P ≈ σ it needs η P / σ² = η / σ_min < 2, i.e. η < 2e-3; η = 5e-4 is used.
    step = 5e-4
    init = {"z": 0.5 * SCALES}

    def kernel(precondition):
        return PCLangevin(potential_fn=ill_scaled_potential, step_size=step, adjust=adjust,
                          precondition=precondition, adapt_step_size=False)

    if adjust:
        plain = run(kernel(None), initial_params=init, num_samples=500, warmup_steps=500)
        # proposals are so far out that essentially none is accepted
        assert plain.diagnostics()["acceptance rate"]["chain 0"] < 0.01
    else:
        with pytest.raises(RuntimeError, match="diverged at sampling step"):
            run(kernel(None), initial_params=init, num_samples=500, warmup_steps=500)

    mcmc = run(kernel("diagonal"), initial_params=init, num_samples=3000, warmup_steps=1000)
    z = mcmc.get_samples()["z"]
    assert torch.isfinite(z).all()
    if adjust:
        assert mcmc.diagnostics()["acceptance rate"]["chain 0"] > 0.3
    # the three smallest scales (1e-3..1e-1) mix: their spread is right within 25%
    ratio = z.std(0)[:3] / SCALES[:3]
    assert torch.all((ratio > 0.75) & (ratio < 1.25)), ratio


# -- MCMC contract, ArviZ, multiprocessing ----------------------------------------
def normal_mean(y):
    mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
    sigma = pyro.sample("sigma", dist.HalfNormal(5.0))
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.Normal(mu, sigma), obs=y)


DATA = torch.tensor([2.1, 3.3, 2.8, 1.9, 3.6, 2.4, 3.0, 2.2, 2.7, 3.1])


@pytest.mark.slow
def test_four_sequential_chains_converge_for_arviz(monkeypatch):
    import pyro.infer.mcmc.api as api

    monkeypatch.setattr(api.mp, "cpu_count", lambda: 1)  # sequential chains, one kernel
    kernel = PCLangevin(normal_mean, adjust=True)
    with pytest.warns(UserWarning, match="sequentially"):
        mcmc = run(kernel, DATA, num_samples=1500, warmup_steps=500, num_chains=4)
    idata = arviz.from_pyro(mcmc)
    rhat = arviz.rhat(idata)
    assert float(rhat["mu"]) < 1.01 and float(rhat["sigma"]) < 1.01
    assert idata.sample_stats["diverging"].shape == (4, 1500)
    # the kernel is reused across sequential chains but keeps model and transforms
    assert kernel.model is normal_mean and "sigma" in kernel.transforms
    assert set(mcmc.diagnostics()["step size"]) == {f"chain {i}" for i in range(4)}


@pytest.mark.slow
def test_chains_run_in_worker_processes(monkeypatch):
    # Pyro runs chains in processes when there are more CPUs than chains; pretend there are.
    import pyro.infer.mcmc.api as api

    monkeypatch.setattr(api.mp, "cpu_count", lambda: 8)
    kernel = PCLangevin(normal_mean, adjust=True)
    mcmc = run(kernel, DATA, num_samples=300, warmup_steps=200, num_chains=2, mp_context="spawn")
    assert isinstance(mcmc.sampler, api._MultiSampler)
    samples = mcmc.get_samples(group_by_chain=True)
    assert samples["mu"].shape == (2, 300)
    assert abs(samples["mu"].mean() - DATA.mean()) < 0.5
    assert (samples["sigma"] > 0).all()


def test_kernel_pickles_before_and_after_setup():
    kernel = PCLangevin(normal_mean, adjust=True)
    pickle.loads(pickle.dumps(kernel))
    kernel.setup(10, DATA)
    params = kernel.sample(kernel.initial_params)
    clone = pickle.loads(pickle.dumps(kernel))
    assert set(clone.sample(params)) == {"mu", "sigma"}


def test_jit_compiled_potential_matches_and_samples():
    plain, jit = PCLangevin(normal_mean), PCLangevin(normal_mean, jit_compile=True, ignore_jit_warnings=True)
    plain.setup(0, DATA)
    jit.setup(0, DATA)
    for mu, log_sigma in [(0.0, 0.0), (2.5, -1.0), (-3.0, 1.5)]:
        point = {"mu": torch.tensor(mu), "sigma": torch.tensor(log_sigma)}
        (u1, g1), (u2, g2) = [langevin.value_and_grad(k.potential_fn)(point) for k in (plain, jit)]
        assert torch.allclose(u1, u2, rtol=1e-5)
        assert all(torch.allclose(g1[k], g2[k], rtol=1e-5, atol=1e-5) for k in g1)
    mcmc = run(PCLangevin(normal_mean, adjust=True, jit_compile=True, ignore_jit_warnings=True), DATA,
               num_samples=300, warmup_steps=200)
    assert abs(mcmc.get_samples()["mu"].mean() - DATA.mean()) < 0.5


def test_same_seed_same_chain():
    a = run(PCLangevin(normal_mean), DATA, num_samples=50, warmup_steps=50).get_samples()
    b = run(PCLangevin(normal_mean), DATA, num_samples=50, warmup_steps=50).get_samples()
    assert torch.equal(a["mu"], b["mu"])


def test_init_guide_sets_the_chain_start():
    def guide(y):
        pyro.sample("mu", dist.Normal(7.0, 1e-3))
        with pyro.plate("data", len(y)):  # an amortised guide's plate is not a latent site
            pass

    kernel = PCLangevin(normal_mean, init=guide)
    kernel.setup(0, DATA)
    assert abs(kernel.initial_params["mu"].item() - 7.0) < 0.01
    assert "sigma" in kernel.initial_params  # left to the init strategy


def test_diagnostics_report_divergences_acceptance_and_step_size():
    kernel = PCLangevin(normal_mean, adjust=True)
    mcmc = run(kernel, DATA, num_samples=100, warmup_steps=100)
    diag = mcmc.diagnostics()
    assert diag["divergences"] == {"chain 0": []}
    assert 0.0 < diag["acceptance rate"]["chain 0"] <= 1.0
    # what warm-up adapted stays readable on the kernel after the run
    assert kernel.step_size == diag["step size"]["chain 0"] != 0.01
    assert set(kernel.preconditioner) == {"mu", "sigma"}


def test_mala_rejects_and_counts_divergences():
    # a log barrier: the energy is NaN outside (-1, 1), where large steps land
    def potential(params):
        return -torch.log1p(-params["z"].square()).sum()

    kernel = PCLangevin(potential_fn=potential, step_size=0.3, adjust=True, adapt_step_size=False,
                        precondition=None)
    mcmc = run(kernel, initial_params={"z": torch.tensor([0.1])}, num_samples=3000,
               warmup_steps=0)
    divergences = mcmc.diagnostics()["divergences"]["chain 0"]
    assert len(divergences) > 0
    assert torch.isfinite(mcmc.get_samples()["z"]).all()


def test_mala_counts_a_finite_proposal_with_a_huge_energy_error_as_a_divergence():
    # N(0, I): from z, a step of η = 1e4 lands near -1e4 z, where U ~ 5e7 |z|²: finite, but an
    # energy error far above 1000, which Pyro's HMC would call divergent; a step of 0.5 never does
    def potential(params):
        return 0.5 * params["z"].square().sum()

    counts = {}
    for step_size in (1e4, 0.5):
        kernel = PCLangevin(potential_fn=potential, step_size=step_size, adjust=True, adapt_step_size=False,
                            precondition=None)
        mcmc = run(kernel, initial_params={"z": torch.full((10,), 0.5)}, num_samples=50, warmup_steps=0)
        counts[step_size] = len(mcmc.diagnostics()["divergences"]["chain 0"])
    assert counts == {1e4: 50, 0.5: 0}


def test_clear_cache_moves_the_chain_from_the_given_params_as_hmc():
    """Pyro's HMC protocol (its test_unnormalized_normal): after `clear_cache()`, `sample(params)`
    starts from `params`; without it the kernel continues its own chain."""
    kernel = PCLangevin(potential_fn=lambda p: 0.5 * (p["z"] - 5.0).square().sum(), step_size=0.01,
                        adapt_step_size=False, precondition=None)
    kernel.initial_params = {"z": torch.tensor(5.0)}
    kernel.setup(0)
    far = {"z": torch.tensor(100.0)}
    assert abs(kernel(far)["z"].item() - 5.0) < 1.0  # its own chain, at 5
    kernel.clear_cache()
    assert abs(kernel(far)["z"].item() - 100.0) < 2.0  # one small step from 100


def test_pyros_kernel_protocol_with_clear_cache_samples_the_target():
    """Pyro's test_unnormalized_normal, verbatim but for the kernel: N(5, 1) from z = 0, 400 warm-up
    calls, 2,000 draws with `clear_cache()` before each; mean and sd within Pyro's 0.1 (seed fixed)."""
    pyro.set_rng_seed(0)
    kernel = PCLangevin(model=None, potential_fn=lambda p: 0.5 * torch.sum((p["z"] - 5.0) ** 2))
    samples = {"z": torch.tensor(0.0)}
    kernel.initial_params = samples
    kernel.setup(400)
    for _ in range(400):
        samples = kernel(samples)
    draws = []
    for _ in range(2000):
        kernel.clear_cache()
        samples = kernel(samples)
        draws.append(samples["z"])
    draws = torch.stack(draws)
    assert abs(draws.mean().item() - 5.0) < 0.1 and abs(draws.std().item() - 1.0) < 0.1


# -- errors that name the problem -------------------------------------------------
@pytest.mark.parametrize("step_size", [0.0, -0.1, math.nan, math.inf])
def test_bad_step_size(step_size):
    with pytest.raises(ValueError, match="step_size must be finite and positive"):
        PCLangevin(normal_mean, step_size=step_size)


def test_unknown_preconditioner():
    with pytest.raises(ValueError, match="Unknown preconditioner 'ada'"):
        PCLangevin(normal_mean, precondition="ada")


def test_mala_with_adam():
    with pytest.raises(ValueError, match="'adam' cannot be Metropolis-adjusted"):
        PCLangevin(normal_mean, precondition="adam", adjust=True)


def test_mala_with_rmsprop_is_refused_and_its_warmup_is_unadjusted():
    # the default adjust=True is refused too; with adjust=False warm-up runs unadjusted
    with pytest.raises(ValueError, match="'rmsprop' cannot be Metropolis-adjusted"):
        PCLangevin(normal_mean, precondition="rmsprop")
    mcmc = run(PCLangevin(normal_mean, precondition="rmsprop", adjust=False), DATA,
               num_samples=20, warmup_steps=20)
    assert torch.isfinite(mcmc.get_samples()["mu"]).all()


# -- defaults: the posterior NUTS gives (issue 13) ---------------------------------
def normal_posterior_by_quadrature(y, num=801):
    """Posterior mean of ``mu`` and sd of ``sigma`` for ``normal_mean`` on a fine grid."""
    mu = torch.linspace(y.mean() - 2.5, y.mean() + 2.5, num, dtype=torch.float64)
    sigma = torch.linspace(0.8, 5.0, num, dtype=torch.float64)
    m, s = mu[:, None], sigma[None, :]
    log_p = (dist.Normal(0.0, 10.0).log_prob(m) + dist.HalfNormal(5.0).log_prob(s)
             + dist.Normal(m[..., None], s[..., None]).log_prob(y.double()).sum(-1))
    w = (log_p - log_p.max()).exp()
    w = w / w.sum()
    mean_mu = (w * m).sum()
    mean_sigma = (w * s).sum()
    sd_sigma = ((w * (s - mean_sigma).square()).sum()).sqrt()
    return mean_mu.item(), sd_sigma.item()


@pytest.mark.slow
def test_default_kernel_matches_the_posterior_of_the_normal_model():
    # Issue 13: ULA (the old default) gave sigma's sd 2.3x NUTS's here. Reference by
    # quadrature (grid error far below Monte Carlo error); tolerance 5 Monte Carlo
    # standard errors from ArviZ's ESS (arviz.mcse of the mean and of the sd).
    torch.manual_seed(0)
    y = 3.0 + 2.0 * torch.randn(50)
    mcmc = run(PCLangevin(normal_mean), y, num_samples=5000, warmup_steps=1000)
    samples = {k: v.numpy()[None] for k, v in mcmc.get_samples().items()}
    mean_mu, sd_sigma = normal_posterior_by_quadrature(y)
    assert abs(samples["mu"].mean() - mean_mu) < 5 * float(arviz.mcse(samples["mu"]))
    sd_err = abs(samples["sigma"].std(ddof=1) - sd_sigma)
    assert sd_err < 5 * float(arviz.mcse(samples["sigma"], method="sd")), (sd_err, sd_sigma)


def test_ula_past_its_stability_limit_reports_divergences():
    # Issue 13: on N(5, 1) ULA at η·h = 2.03 reached 1e42 without a word. Here every
    # step is past the limit (η h = 2.05 > 2, h = 1 exactly); at η = 1.9 none is.
    def potential(params):
        return 0.5 * (params["z"] - 5.0).square().sum()

    def ula(step_size):
        kernel = PCLangevin(potential_fn=potential, adjust=False, precondition=None,
                            step_size=step_size, adapt_step_size=False)
        return run(kernel, initial_params={"z": torch.tensor(5.0)}, num_samples=200,
                   warmup_steps=0)

    with pytest.warns(RuntimeWarning, match="past its stability limit at sampling step 0"):
        mcmc = ula(2.05)
    assert mcmc.diagnostics()["divergences"]["chain 0"] == list(range(200))
    assert ula(1.9).diagnostics()["divergences"]["chain 0"] == []


# -- warm-up schedule ----------------------------------------------------------------
LINEAR_SCALES = torch.linspace(0.1, 1.0, 10)


def linear_gaussian():
    pyro.sample("z", dist.Normal(0.0, LINEAR_SCALES).to_event(1))


@pytest.mark.slow
@pytest.mark.parametrize("precondition", ["variance", "diagonal"])
@pytest.mark.parametrize("warmup_steps", [10, 20, 30, 50])
def test_short_warmups_land_near_the_target_acceptance(warmup_steps, precondition):
    # Issue 13: with 10 warm-up steps the old 75 % restart left acceptance 0.00-0.22
    # (3 seeds). Band 0.3-0.9 around the 0.574 target: the spread of a step size tuned
    # in so few steps (5 seeds measured 0.36-0.87), not a Monte Carlo tolerance; the
    # acceptance rate's own Monte Carlo error over 500 draws is about 0.03. P adapts only
    # from 50 warm-up steps (adaptation.SHORTEST_WINDOWED_WARMUP): from a dozen draws
    # "variance" gave 0.28 after 20 steps and 0.05 after 30, "diagonal" 0.27 after 30 (5 seeds).
    for seed in range(3):
        mcmc = run(PCLangevin(linear_gaussian, precondition=precondition, adjust=True), num_samples=500,
                   warmup_steps=warmup_steps, seed=seed)
        rate = mcmc.diagnostics()["acceptance rate"]["chain 0"]
        assert 0.3 < rate < 0.9, (seed, rate)


def test_nonfinite_potential_at_init_names_the_site():
    def broken(y):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        pyro.sample("bad_obs", dist.Normal(mu, 1.0), obs=torch.tensor(math.inf))

    with pytest.raises(ValueError, match="not finite at any initial point.*'bad_obs'"):
        PCLangevin(broken).setup(10, DATA)


def test_ula_divergence_names_the_step():
    def quartic(params):
        return params["z"].pow(4).sum()

    kernel = PCLangevin(potential_fn=quartic, step_size=0.5, adapt_step_size=False,
                        precondition=None, adjust=False)
    with pytest.raises(RuntimeError, match="diverged at sampling step [0-9]+"):
        run(kernel, initial_params={"z": torch.tensor([3.0])}, num_samples=100, warmup_steps=0)


def test_nonfinite_potential_at_given_initial_params_names_the_site():
    def model():
        pyro.sample("scale", dist.HalfNormal(1.0))
        pyro.sample("loc", dist.Normal(0.0, 1.0))

    kernel = PCLangevin(model)
    kernel.initial_params = {"scale": torch.tensor(math.nan), "loc": torch.tensor(0.0)}
    with pytest.raises(ValueError, match=r"initial point.*\['scale'\]"):
        kernel.setup(10)


def test_init_guide_with_an_unknown_site():
    def guide(y):
        pyro.sample("nu", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match=r"\['nu'\].*not latent sites.*'mu'"):
        PCLangevin(normal_mean, init=guide).setup(10, DATA)


def test_potential_fn_without_initial_params():
    with pytest.raises(ValueError, match="initial_params"):
        PCLangevin(potential_fn=ill_scaled_potential).setup(10)


# -- whitening preconditioners (issue 15) ----------------------------------------
ILL_SIGMA = torch.logspace(-2, 2, 8)
CORR = torch.tensor([[1.0, 0.99], [0.99, 1.0]])


def ill_conditioned():
    pyro.sample("z", dist.Normal(0.0, ILL_SIGMA).to_event(1))


def correlated():
    pyro.sample("z", dist.MultivariateNormal(torch.zeros(2), CORR))


def min_ess(samples):
    samples = samples.reshape(samples.shape[0], -1)
    return float(effective_sample_size(samples.unsqueeze(0), chain_dim=0, sample_dim=1).min())


@pytest.mark.slow
@pytest.mark.parametrize(
    "model, var, kinds",
    [(ill_conditioned, ILL_SIGMA.square(), ("variance", "dense")), (correlated, CORR.diagonal(), ("dense",))],
)
def test_whitening_preconditioners_sample_what_diagonal_cannot(model, var, kinds):
    """1,000 warm-up steps and 2,000 draws. The moments are checked to 5 MCSE only where
    the chain has ESS >= 100 (below that the MCSE itself is unreliable). "diagonal"
    (P ∝ σ, not σ²) gave min ESS 1–3 on the 8-d Gaussian (benchmarks/kernel_preconditioners.py)
    and 2 on the correlated one with 500 warm-up steps;
    "variance" cannot undo a correlation of 0.99 (min ESS 15), so only "dense" is
    asked to pass that one."""
    diagonal = run(PCLangevin(model, precondition="diagonal"), num_samples=2000, warmup_steps=1000)
    assert min_ess(diagonal.get_samples()["z"]) < 100
    for kind in kinds:
        mcmc = run(PCLangevin(model, precondition=kind), num_samples=2000, warmup_steps=1000)
        z = mcmc.get_samples()["z"]
        assert min_ess(z) > 100, kind
        assert_moments(z, torch.zeros_like(var), var)


def test_dense_preconditioner_is_the_matrix_and_frozen_after_warmup():
    kernel = PCLangevin(correlated, precondition="dense")
    mcmc = run(kernel, num_samples=50, warmup_steps=200)
    P = kernel.preconditioner
    assert P.shape == (2, 2) and torch.allclose(P, P.T)
    assert P[0, 1] > 0.5 * P[0, 0]  # the correlation was learnt
    z = mcmc.get_samples()["z"]
    assert z.shape == (50, 2)


def test_unknown_sampling_preconditioner_names_the_choices():
    with pytest.raises(ValueError, match="'variance', 'dense'"):
        PCLangevin(correlated, precondition="full")
