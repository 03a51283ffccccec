"""PCLangevin where Pyro's NUTS runs: collapsed and enumerated models.

Pyro's `collapse_conjugate` workflow (mirrored from Pyro's own
`tests/infer/mcmc/test_nuts.py::test_beta_binomial`) may leave no continuous
latent; HMC/NUTS then return the (empty) params unchanged each step, and
`posterior_replay` draws the collapsed sites afterwards. Discrete sites with
finite support are enumerated and summed out of the potential, as for HMC.

Tolerances (as in test_kernel.py): means to 5 Monte Carlo standard errors
`5 * sd / sqrt(ESS)`, variances to `5 * var * sqrt(2 / ESS)`, ESS from the chain
(`pyro.ops.stats.effective_sample_size`); independent draws have ESS = n. Seeds
are fixed.
"""
import arviz
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.contrib.conjugate.infer import BetaBinomialPair, collapse_conjugate, posterior_replay
from pyro.infer import NUTS
from pyro.infer.autoguide.initialization import init_to_value
from pyro.ops.stats import effective_sample_size
from test_kernel import assert_moments, run

from pyro_lpc import PCLangevin

# -- collapsed: Pyro's beta-binomial without hyperpriors (nothing continuous left) ----
TRUE_PROBS = torch.tensor([[0.7, 0.4], [0.6, 0.4]])
TOTAL_COUNT = torch.tensor([[1000, 600], [400, 800]])


def beta_binomial(data):
    with pyro.plate("plate_0", data.shape[-1]):
        alpha, beta = torch.tensor([1.0, 1.0]), torch.tensor([1.0, 1.0])
        pair = BetaBinomialPair()
        with pyro.plate("plate_1", data.shape[-2]):
            probs = pyro.sample("probs", pair.latent(alpha, beta))
            with pyro.plate("data", data.shape[0]):
                pyro.sample("binomial", pair.conditional(probs=probs, total_count=TOTAL_COUNT),
                            obs=data)


def beta_binomial_data():
    pyro.set_rng_seed(0)
    return dist.Binomial(total_count=TOTAL_COUNT, probs=TRUE_PROBS).sample((10,))


def test_collapsed_model_runs_as_nuts_does():
    data = beta_binomial_data()
    runs = {kernel: run(kernel(collapse_conjugate(beta_binomial)), data, num_samples=50,
                        warmup_steps=20)
            for kernel in (NUTS, PCLangevin)}
    nuts, pcl = runs[NUTS], runs[PCLangevin]
    assert pcl.get_samples() == nuts.get_samples() == {}
    assert pcl.get_samples(group_by_chain=True) == nuts.get_samples(group_by_chain=True)
    assert pcl.diagnostics()["divergences"] == nuts.diagnostics()["divergences"] == {"chain 0": []}
    assert (pcl.diagnostics()["acceptance rate"] == nuts.diagnostics()["acceptance rate"]
            == {"chain 0": 1.0})
    pcl.summary()
    assert "sample_stats" in arviz.from_pyro(pcl, log_likelihood=False).groups()

    # The workflow's second half: the collapsed site's exact posterior, Beta(1 + Σk, 1 + Σ(n - k)).
    num_samples = 400
    posterior = posterior_replay(beta_binomial, pcl.get_samples(), data, num_samples=num_samples)
    k = data.sum(0)
    exact = dist.Beta(1.0 + k, 1.0 + 10 * TOTAL_COUNT - k)
    assert_moments(posterior["probs"].reshape(num_samples, -1), exact.mean, exact.variance)


def test_collapsed_model_with_impossible_data_names_the_site():
    def model(k):
        pair = BetaBinomialPair()
        p = pyro.sample("p", pair.latent(torch.tensor(2.0), torch.tensor(3.0)))
        pyro.sample("k", pair.conditional(probs=p, total_count=torch.tensor(10.0)), obs=k)

    with pytest.raises(ValueError, match=r"no continuous latent.*not finite.*\['k'\]"):
        PCLangevin(collapse_conjugate(model)).setup(10, torch.tensor(12.0))


# -- enumerated: a two-component Gaussian mixture with its assignments summed out -------
WEIGHTS = torch.tensor([0.3, 0.7])
PRIOR_SCALE = 5.0


def mixture(data):
    locs = pyro.sample("locs", dist.Normal(0.0, PRIOR_SCALE).expand([2]).to_event(1))
    with pyro.plate("data", len(data)):
        assignment = pyro.sample("assignment", dist.Categorical(WEIGHTS),
                                 infer={"enumerate": "parallel"})
        pyro.sample("obs", dist.Normal(locs[assignment], 1.0), obs=data)


def mixture_posterior(data, points=200):
    """Exact posterior mean and variance of the locs by quadrature on a grid ±1.5
    around each cluster's sample mean (over 8 posterior sds; the label-swapped mode
    is about e^-34 lighter and lies outside)."""
    centres = torch.stack([data[:30].mean(), data[30:].mean()]).double()
    grids = [c + torch.linspace(-1.5, 1.5, points, dtype=torch.float64) for c in centres]
    l0, l1 = torch.meshgrid(*grids, indexing="ij")
    locs = torch.stack([l0, l1], -1)[..., None, :]  # (points, points, 1, 2)
    x = data.double()[:, None]
    log_lik = (WEIGHTS.double().log() + dist.Normal(locs, 1.0).log_prob(x)).logsumexp(-1).sum(-1)
    log_post = log_lik + dist.Normal(0.0, PRIOR_SCALE).log_prob(torch.stack([l0, l1], -1)).sum(-1)
    w = (log_post - log_post.logsumexp((0, 1))).exp()
    mean = torch.stack([(w * l0).sum(), (w * l1).sum()])
    var = torch.stack([(w * l0 ** 2).sum(), (w * l1 ** 2).sum()]) - mean ** 2
    return mean.float(), var.float()


@pytest.mark.slow
@pytest.mark.parametrize("max_plate_nesting", [1, None])  # None: Pyro guesses it, as for NUTS
def test_enumerated_mixture_matches_exact_posterior_and_nuts(max_plate_nesting):
    torch.manual_seed(1)
    data = torch.cat([torch.randn(30) - 2.0, torch.randn(70) + 2.0])
    mean, var = mixture_posterior(data)
    # Both samplers start in the labelling the weights favour (chains cannot switch labels).
    options = dict(max_plate_nesting=max_plate_nesting,
                   init_strategy=init_to_value(values={"locs": torch.tensor([-1.0, 1.0])}))
    samples, ess = {}, {}
    for kernel, num_samples in ((PCLangevin, 2000), (NUTS, 300)):
        mcmc = run(kernel(mixture, **options), data, num_samples=num_samples, warmup_steps=300)
        samples[kernel] = mcmc.get_samples()["locs"]
        assert set(mcmc.get_samples()) == {"locs"}  # the assignments are summed out
        ess[kernel] = effective_sample_size(samples[kernel].unsqueeze(0), chain_dim=0, sample_dim=1)
    assert_moments(samples[PCLangevin], mean, var)
    # PCLangevin against NUTS: the difference of two independent means, 5 joint MCSEs.
    diff = samples[PCLangevin].mean(0) - samples[NUTS].mean(0)
    mcse = (var / ess[PCLangevin] + var / ess[NUTS]).sqrt()
    assert torch.all(diff.abs() < 5.0 * mcse), (diff, mcse)
