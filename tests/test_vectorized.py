"""VectorizedMCMC: C PCLangevin chains in one process against exact posteriors and Pyro's tooling.

Tolerances: a posterior mean is checked to 5 Monte Carlo standard errors, ``5 sd / sqrt(ESS)``,
a posterior variance to ``5 var sqrt(2 / ESS)`` (the MCSE of a variance estimate from ESS
effectively independent draws of a Gaussian), with ESS from all chains together
(:func:`pyro.ops.stats.effective_sample_size`). Seeds are fixed.
"""
import math

import arviz
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.ops.stats import effective_sample_size

from pyro_lpc import PCLangevin, VectorizedMCMC


def run(kernel, *args, num_chains=4, num_samples=2000, warmup_steps=1000, seed=0, **kwargs):
    pyro.set_rng_seed(seed)
    mcmc = VectorizedMCMC(kernel, num_samples=num_samples, warmup_steps=warmup_steps, num_chains=num_chains,
                          disable_progbar=True, **kwargs)
    mcmc.run(*args)
    return mcmc


def assert_moments(samples, mean, var, num_se=5.0):
    """``samples``: [C, draws, ...]; compare each coordinate to the exact mean and variance."""
    samples = samples.reshape(samples.shape[:2] + (-1,))
    ess = effective_sample_size(samples, chain_dim=0, sample_dim=1)
    flat = samples.reshape(-1, samples.shape[-1])
    mean, var = torch.as_tensor(mean).reshape(-1), torch.as_tensor(var).reshape(-1)
    assert torch.all(ess > 100), ess  # below that the MCSE itself is unreliable
    assert torch.all((flat.mean(0) - mean).abs() < num_se * (var / ess).sqrt()), (flat.mean(0), mean, ess)
    assert torch.all((flat.var(0) - var).abs() < num_se * var * (2.0 / ess).sqrt()), (flat.var(0), var, ess)


# -- exact posteriors ------------------------------------------------------------------
Y = torch.tensor([2.1, 3.4, 2.7, 3.9, 2.2, 3.0, 2.5, 3.6])
COUNTS = torch.tensor([3.0, 5.0, 4.0, 2.0, 6.0])


def conjugate(y, counts):
    """mu ~ N(0, 10²), y ~ N(mu, 1); rate ~ Gamma(2, 1), counts ~ Poisson(rate): independent
    conjugate posteriors, one of them on a constrained latent (transform and Jacobian)."""
    mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
    rate = pyro.sample("rate", dist.Gamma(2.0, 1.0))
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.Normal(mu, 1.0), obs=y)
    with pyro.plate("counts", len(counts)):
        pyro.sample("c", dist.Poisson(rate), obs=counts)


@pytest.mark.slow
@pytest.mark.parametrize("precondition", ["variance", "dense", "diagonal", None])
def test_conjugate_posteriors_with_vectorized_chains(precondition):
    mcmc = run(PCLangevin(conjugate, precondition=precondition), Y, COUNTS, num_chains=4)
    samples = mcmc.get_samples(group_by_chain=True)
    precision = 1 / 100 + len(Y)
    assert_moments(samples["mu"], Y.sum() / precision, 1 / precision)
    shape, rate = 2.0 + COUNTS.sum(), 1.0 + len(COUNTS)  # Gamma posterior
    assert_moments(samples["rate"], shape / rate, shape / rate**2)


ILL_SIGMA = torch.logspace(-2, 2, 8)


def ill_conditioned():
    pyro.sample("z", dist.Normal(0.0, ILL_SIGMA).to_event(1))


@pytest.mark.slow
def test_ill_conditioned_gaussian_with_eight_chains():
    mcmc = run(PCLangevin(ill_conditioned), num_chains=8, num_samples=1000, warmup_steps=1000)
    assert_moments(mcmc.get_samples(group_by_chain=True)["z"], torch.zeros(8), ILL_SIGMA.square())


# -- Pyro's tooling -------------------------------------------------------------------------
def test_chains_are_grouped_and_seen_by_arviz_and_diagnostics(capsys):
    mcmc = run(PCLangevin(conjugate), Y, COUNTS, num_chains=3, num_samples=50, warmup_steps=50)
    grouped = mcmc.get_samples(group_by_chain=True)
    assert grouped["mu"].shape == (3, 50) and grouped["rate"].shape == (3, 50)
    assert (grouped["rate"] > 0).all()  # constrained space
    assert mcmc.get_samples()["mu"].shape == (150,)
    diag = mcmc.diagnostics()
    assert set(diag["divergences"]) == {"chain 0", "chain 1", "chain 2"}
    assert set(diag["acceptance rate"]) == {"chain 0", "chain 1", "chain 2"}
    assert "r_hat" in diag["mu"] and "n_eff" in diag["mu"]
    idata = arviz.from_pyro(mcmc)
    assert idata.posterior.sizes["chain"] == 3 and idata.posterior.sizes["draw"] == 50
    assert idata.sample_stats["diverging"].shape == (3, 50)
    mcmc.summary()
    assert "Number of divergences: 0" in capsys.readouterr().out


def barrier_wells(params):
    """Batched over chains: a Gaussian well at 0 (z < 10) and a log barrier on (19, 21); the
    energy is NaN in between and beyond 21, so a chain never crosses and only the barrier
    well's steps (noise sd 0.77 against a width of 2) land where it is NaN."""
    z = params["z"].squeeze(-1)
    return torch.where(z < 10, 0.5 * z.square(), -torch.log1p(-(z - 20).square()))


def test_each_chain_counts_its_own_divergences():
    kernel = PCLangevin(potential_fn=barrier_wells, step_size=0.3, precondition=None, adapt_step_size=False)
    start = {"z": torch.tensor([[0.0], [20.0], [0.5]])}
    mcmc = run(kernel, initial_params=start, num_chains=3, num_samples=300, warmup_steps=0)
    divergences = mcmc.diagnostics()["divergences"]
    assert divergences["chain 0"] == [] and divergences["chain 2"] == []
    assert len(divergences["chain 1"]) > 10
    z = mcmc.get_samples(group_by_chain=True)["z"]
    assert (z[1] > 19).all() and (z[[0, 2]] < 10).all()
    diverging = arviz.from_pyro(mcmc).sample_stats["diverging"].values
    assert diverging.sum(1).tolist() == [0, len(divergences["chain 1"]), 0]


def test_chains_start_spread_out_from_the_init_strategy_or_guide():
    starts = []
    hook = lambda kernel, params, stage, i: starts.append(params["mu"].clone()) if i == 0 else None  # noqa: E731
    run(PCLangevin(conjugate), Y, COUNTS, num_chains=4, num_samples=1, warmup_steps=1, hook_fn=hook)
    assert starts[0].unique().numel() == 4  # four distinct init_to_uniform draws

    def guide(y, counts):
        pyro.sample("mu", dist.Normal(100.0, 0.01))

    starts.clear()
    kernel = PCLangevin(conjugate, init=guide, step_size=1e-6, adapt_step_size=False)
    run(kernel, Y, COUNTS, num_chains=4, num_samples=1, warmup_steps=1, hook_fn=hook)
    assert starts[0].unique().numel() == 4 and ((starts[0] - 100).abs() < 0.1).all()


SCHOOLS_Y = torch.tensor([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0])
SCHOOLS_SIGMA = torch.tensor([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0])


def centred_schools(sigma, y):
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("schools", len(y)):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        pyro.sample("obs", dist.Normal(theta, sigma), obs=y)


@pytest.mark.slow
def test_the_centred_funnel_does_not_fail_silently():
    """Eight schools, centred: chains that wander into the funnel's neck get stuck there. Their
    rejected proposals count as divergences (energy error above 1000, as in Pyro's HMC), and
    R-hat over the chains is far from 1 (seed fixed; on seeds 0 and 1, 2 of 8 chains stuck
    with 500/500 divergent steps, R-hat 2.2-2.3)."""
    mcmc = run(PCLangevin(centred_schools), SCHOOLS_SIGMA, SCHOOLS_Y, num_chains=8, num_samples=500,
               warmup_steps=500)
    divergences = mcmc.diagnostics()["divergences"]
    assert sum(len(v) for v in divergences.values()) > 0
    grouped = {k: v.double().numpy() for k, v in mcmc.get_samples(group_by_chain=True).items()}
    assert float(arviz.rhat(arviz.convert_to_dataset(grouped))["tau"]) > 1.1


@pytest.mark.slow
def test_arviz_puts_each_of_twelve_chains_divergences_on_that_chain():
    """Beyond 10 chains the names are zero-padded, so ArviZ's from_pyro (which sorts them as
    strings: "chain 10" before "chain 2") matches every chain's divergences to its own draws, and
    the adapted P is readable on the kernel after the run. Centred schools: some chains stick in the
    neck (seed fixed so that chains 2-9 and 10-11 differ in their counts)."""
    kernel = PCLangevin(centred_schools)
    mcmc = run(kernel, SCHOOLS_SIGMA, SCHOOLS_Y, num_chains=12, num_samples=300, warmup_steps=300)
    divergences = mcmc.diagnostics()["divergences"]
    assert list(divergences) == [f"chain {c:02d}" for c in range(12)]
    assert divergences["chain 3"] is divergences["chain 03"]  # Pyro's names still find their chain
    counts = [len(v) for v in divergences.values()]
    assert len(set(counts)) > 1
    diverging = arviz.from_pyro(mcmc, log_likelihood=False).sample_stats["diverging"].values
    assert diverging.sum(1).tolist() == counts
    assert set(kernel.preconditioner) == {"mu", "tau", "theta"}


# -- how the model is vectorised, what cannot be, and wrong inputs ---------------------------
def reshapes_a_latent(y):
    z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
    pyro.sample("y", dist.Normal(z.view(2)[0], 1.0), obs=y)  # breaks under a leading chain dim


def reduces_a_latent(y):
    z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
    pyro.sample("y", dist.Normal(z.sum(), 1.0), obs=y)  # under a chain plate: sums over the chains too


def matmul_of_a_latent(y):
    z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
    pyro.sample("y", dist.Normal(torch.tensor([[1.0, 0.0]]) @ z, 1.0).to_event(1), obs=y.reshape(1))


@pytest.mark.slow
@pytest.mark.parametrize("model, mean0, var0", [(reshapes_a_latent, 0.25, 0.5), (reduces_a_latent, 1 / 6, 2 / 3),
                                                (matmul_of_a_latent, 0.25, 0.5)])
def test_models_written_for_one_chain_are_mapped_by_vmap(model, mean0, var0):
    """Each model fixes its shapes for one chain (no leading dim), so a chain plate gets it wrong
    or fails; mapped by vmap, the chains sample the exact Gaussian posterior of z given y = 0.5:
    z[0] ~ N(0.25, 0.5) for y ~ N(z[0], 1); z[0] ~ N(1/6, 2/3) for y ~ N(z[0] + z[1], 1)."""
    mcmc = run(PCLangevin(model), torch.tensor(0.5), num_chains=4, num_samples=1500, warmup_steps=500)
    assert_moments(mcmc.get_samples(group_by_chain=True)["z"][..., 0], mean0, var0)


def guarded(y):
    """A data-dependent Python branch on a latent: vmap cannot trace it, a chain plate can."""
    z = pyro.sample("z", dist.Normal(0.0, 1.0))
    if z.detach().abs().max() > 1e6:
        raise ValueError("z ran away")
    pyro.sample("y", dist.Normal(z, 1.0), obs=y)


@pytest.mark.slow
def test_a_model_vmap_cannot_trace_runs_under_the_chain_plate():
    mcmc = run(PCLangevin(guarded), torch.tensor(0.5), num_chains=4, num_samples=1500, warmup_steps=500)
    assert_moments(mcmc.get_samples(group_by_chain=True)["z"], 0.25, 0.5)


def branches_on_a_latent(y):
    z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
    loc = z[0] if z[0] > 0 else -z[0]  # vmap: data-dependent; chain plate: a bool of several values
    pyro.sample("y", dist.Normal(loc, 1.0), obs=y)


def reads_a_latent_as_a_number(y):
    z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
    pyro.sample("y", dist.Normal(z.sum().item(), 1.0), obs=y)  # chain plate: runs, wrong energies


@pytest.mark.parametrize("model, plate_reason", [(branches_on_a_latent, "RuntimeError"),
                                                 (reads_a_latent_as_a_number, "chain 0's energy is")])
def test_a_model_that_cannot_be_vectorised_gets_the_documented_error(model, plate_reason):
    with pytest.raises(ValueError, match=r"cannot be vectorised over 3 chains \(torch.func.vmap: .*; "
                                         rf"pyro.plate\('_chains'\): {plate_reason}.*pyro.infer.MCMC\(PCLangevin"):
        run(PCLangevin(model), torch.tensor(0.5), num_chains=3, num_samples=5, warmup_steps=5)


SIGMA3 = torch.tensor([0.1, 1.0, 10.0])


def one_chain_potential(params):
    return 0.5 * (params["z"] / SIGMA3).square().sum()


def batched_potential(params):
    """Energies of all chains at once; the guard is a data-dependent branch vmap cannot trace."""
    z = params["z"]
    if (z.abs() > 1e6).any():
        return torch.full(z.shape[:1], math.inf)
    return 0.5 * (z / SIGMA3).square().sum(-1)


@pytest.mark.slow
@pytest.mark.parametrize("potential", [one_chain_potential, batched_potential])
def test_a_potential_fn_samples_its_target_mapped_or_batched(potential):
    """N(0, diag(0.01, 1, 100)) from a one-chain potential (mapped by vmap) and from one written
    for all chains (called batched): moments within 5 MCSE."""
    mcmc = run(PCLangevin(potential_fn=potential), initial_params={"z": torch.randn(4, 3)}, num_chains=4,
               num_samples=1500, warmup_steps=500)
    assert_moments(mcmc.get_samples(group_by_chain=True)["z"], torch.zeros(3), SIGMA3.square())


def test_wrong_inputs_are_named():
    with pytest.raises(TypeError, match="PCLangevin kernel"):
        VectorizedMCMC(pyro.infer.NUTS(conjugate), num_samples=10)
    with pytest.raises(ValueError, match="precondition must be one of"):
        VectorizedMCMC(PCLangevin(conjugate, precondition="rmsprop", adjust=False), num_samples=10)
    with pytest.raises(ValueError, match="adjust=True"):
        VectorizedMCMC(PCLangevin(conjugate, adjust=False), num_samples=10)
    with pytest.raises(ValueError, match=r"initial_params\['z'\] has shape \(2, 1\).*num_chains=3"):
        VectorizedMCMC(PCLangevin(conjugate), num_samples=10, num_chains=3, initial_params={"z": torch.zeros(2, 1)})
    kernel = PCLangevin(potential_fn=lambda p: p["z"][:, 0].square().sum())  # neither one chain's nor batched
    with pytest.raises(ValueError, match=r"torch.func.vmap: IndexError.*one energy per chain, shape \(2,\).*got shape \(\)"):
        run(kernel, initial_params={"z": torch.zeros(2, 1)}, num_chains=2, num_samples=5, warmup_steps=5)
