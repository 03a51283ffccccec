"""``pyro_lpc.marginal_likelihood`` against closed forms.

The estimators use models with an exact ``log p(x)``: a linear-Gaussian model
(``z ~ N(0, I_q)``, ``x | z ~ N(Wz + b, σ²I)``, ``p(x) = N(b, WWᵀ + σ²I)``) and a
Gamma–Poisson model (``p(x)`` negative binomial, with a positive latent, so AIS runs
through a log-Jacobian). The linear-Gaussian guides are the exact posterior moved and
widened in its own whitened coordinates (``q = N(μ + m L1, c² LLᵀ)``, ``Σ_post = LLᵀ``),
which makes ``KL(q‖p(z|x))``, ``χ²(p(z|x)‖q)`` and ``sup log p(z|x)/q(z)`` the same closed
forms for every data point — and the estimators' errors i.i.d. across data points, so
their spread across points is their spread across independent runs. Seeds are fixed;
every tolerance says where it comes from.
"""
import math

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_lpc.marginal_likelihood import ais_schedule, log_marginal_likelihood

F64 = torch.float64


@pytest.fixture(autouse=True)
def clean_param_store():
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()


# -- linear-Gaussian model -------------------------------------------------------------
Q, D, SIGMA = 2, 4, 0.5
_g = torch.Generator().manual_seed(0)
W = torch.randn(D, Q, generator=_g, dtype=F64)
B = torch.randn(D, generator=_g, dtype=F64)
POST_COV = torch.linalg.inv(torch.eye(Q, dtype=F64) + W.T @ W / SIGMA**2)
POST_L = torch.linalg.cholesky(POST_COV)


def lg_model(x):
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(torch.zeros(Q, dtype=x.dtype), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z @ W.T + B, SIGMA).to_event(1), obs=x)


def lg_guide(shift=0.0, widen=1.0):
    """``N(μ_post(x) + shift·L1, widen²·Σ_post)``; ``shift=0, widen=1`` is the exact posterior."""

    def guide(x):
        loc = (x - B) @ W @ POST_COV / SIGMA**2 + shift * POST_L.sum(-1)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.MultivariateNormal(loc, scale_tril=widen * POST_L))

    return guide


def lg_data(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, Q, generator=g, dtype=F64)
    return z @ W.T + B + SIGMA * torch.randn(n, D, generator=g, dtype=F64)


def lg_exact(x):
    return dist.MultivariateNormal(B, W @ W.T + SIGMA**2 * torch.eye(D, dtype=F64)).log_prob(x)


def whitened_divergences(m, c, q=Q):
    """For π = N(0, I_q), q = N(m1, c²I_q): KL(q‖π), χ²(π‖q) = ∫π²/q − 1 and M = sup log π/q (c > 1)."""
    kl = 0.5 * q * (c**2 + m**2 - 1.0 - 2.0 * math.log(c))
    a = 1.0 - 1.0 / (2.0 * c**2)  # ∫N(z;0,1)²/N(z;m,c²) dz = c/√(2a) exp(m²/(2c²) + m²/(4ac⁴))
    per_dim = c / math.sqrt(2.0 * a) * math.exp(m**2 / (2.0 * c**2) + m**2 / (4.0 * a * c**4))
    z = -m / (c**2 - 1.0)  # argmax of -z²/2 + (z-m)²/(2c²) + log c
    sup = -(z**2) / 2.0 + (z - m) ** 2 / (2.0 * c**2) + math.log(c)
    return kl, per_dim**q - 1.0, q * sup


# -- IWAE --------------------------------------------------------------------------------
def test_iwae_exact_posterior_is_exact_at_any_k():
    """q = p(z|x): every weight p(x,z)/q(z|x) equals p(x); any error is float64 rounding."""
    x = lg_data(20)
    pyro.set_rng_seed(0)
    for k in (1, 7):
        est = log_marginal_likelihood(lg_model, lg_guide(), x, num_samples=k)
        assert est.shape == (20,) and est.dtype == F64
        assert (est - lg_exact(x)).abs().max() < 1e-10


def test_iwae_bound_and_gap_shrink_with_k():
    """q off by one posterior sd in each direction and 1.5x too wide: KL = 1.44, χ² = 1.56.

    * per point, ``L̂_k − log p = log W̄`` with ``W̄`` the mean of k i.i.d. ratios
      ``w/p = π/q ∈ (0, e^M]`` of mean 1 and variance χ²; one-sided Bernstein gives
      ``P(W̄ − 1 ≥ a) ≤ exp(−k a² / (2χ² + 2(e^M − 1)a/3))``: the tolerance uses
      ``a_k`` with probability 1e-9 per point (and ``W̄ ≤ e^M`` always);
    * the mean gap over N i.i.d. points: ``E[L̂_1] − log p = −KL`` within 4 standard errors,
      every mean gap ≤ 4 se above 0, and the gap shrinks from k to 10k by more than 2 se of
      the difference (the expected gaps are ≈1.44, 0.09, 0.011, 0.0009).
    """
    shift, widen = 1.0, 1.5
    kl, chi2, sup = whitened_divergences(shift, widen)
    x = lg_data(4000)
    exact = lg_exact(x)
    pyro.set_rng_seed(0)
    log_fail = math.log(1e9)
    means, ses = [], []
    for k in (1, 10, 100, 1000):
        gap = log_marginal_likelihood(lg_model, lg_guide(shift, widen), x, num_samples=k, chunk_size=250) - exact
        lin = 2.0 / 3.0 * log_fail * (math.exp(sup) - 1.0)
        a_k = (lin + math.sqrt(lin**2 + 8.0 * k * log_fail * chi2)) / (2.0 * k)
        assert gap.max() <= min(sup, math.log1p(a_k)) + 1e-9, k
        means.append(gap.mean().item())
        ses.append(gap.std().item() / math.sqrt(len(x)))
        assert means[-1] <= 4 * ses[-1], k
    assert abs(means[0] + kl) <= 4 * ses[0]
    for i in range(3):
        assert means[i + 1] - means[i] > 2 * math.hypot(ses[i], ses[i + 1]), (means, ses)


def test_iwae_prior_proposal_and_batching():
    """guide=None proposes from the prior, so L̂_1 = log p(x|z), z ~ p(z), whose mean is
    log p(x) − KL(p(z) ‖ p(z|x)) (closed form per point): over 2000 points the mean of
    L̂_1 − log p + KL must be 0 within 4 standard errors. Batches of a tensor, a list of tuples
    and a list of dicts give identical draws and estimates under one seed."""
    x = lg_data(2000)
    runs = []
    for data, kw in ((x, {"batch_size": 700}), ([(b,) for b in x.split(700)], {}),
                     ([{"x": b} for b in x.split(700)], {})):
        pyro.set_rng_seed(3)
        runs.append(log_marginal_likelihood(lg_model, None, data, num_samples=1, **kw))
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])
    prec = torch.linalg.inv(POST_COV)
    mu = (x - B) @ W @ POST_COV / SIGMA**2
    kl = 0.5 * (torch.trace(prec) + ((mu @ prec) * mu).sum(-1) - Q + torch.logdet(POST_COV))
    err = runs[0] - lg_exact(x) + kl
    assert err.mean().abs() <= 4 * err.std() / math.sqrt(len(x))


def test_ais_one_step_is_importance_sampling():
    """With one annealing increment and no transition AIS is the IWAE estimator (same draws)."""
    x = lg_data(10)
    pyro.set_rng_seed(5)
    iwae = log_marginal_likelihood(lg_model, lg_guide(1.0, 1.5), x, num_samples=16)
    pyro.set_rng_seed(5)
    ais = log_marginal_likelihood(lg_model, lg_guide(1.0, 1.5), x, num_samples=16, method="ais",
                                  ais_steps=1, adapt_step_size=False)
    assert (iwae - ais).abs().max() < 1e-12


# -- AIS -------------------------------------------------------------------------------
def _per_point_check(gap, runs):
    """``gap``: (points × runs) estimates − exact. Per point, the mean over independent runs must
    be within 4 standard errors of ``E[L̂] − log p``, which lies in ``[−sd²/2 − ..., 0]``: for a
    near-log-normal ``Ŵ``, ``E[log Ŵ] ≈ log E[Ŵ] − Var(log Ŵ)/2``; we allow twice that bias."""
    gap = gap.reshape(runs, -1)
    mean, sd = gap.mean(0), gap.std(0)
    tol = 4 * sd / math.sqrt(runs) + sd**2
    assert (mean.abs() <= tol).all(), (mean, tol)
    return mean, sd


def test_ais_linear_gaussian_from_guide_and_prior():
    """8 data points × 32 independent runs (rows of repeated data are independent runs), 8 chains
    and 100 temperatures each. From the off guide AIS's spread is ~0.1 nats (importance sampling
    with the same 8 draws: ~0.5); from the prior (far wider than the posterior) ~0.35 nats
    (prior importance sampling with 8 draws is off by ~5 nats)."""
    runs, points = 32, 8
    x = lg_data(points).repeat(runs, 1)
    exact = lg_exact(x)
    pyro.set_rng_seed(0)
    est = log_marginal_likelihood(lg_model, lg_guide(1.0, 1.5), x, num_samples=8, method="ais",
                                  ais_steps=100, step_size=0.05)
    _, sd = _per_point_check(est - exact, runs)
    assert sd.max() < 0.25
    pyro.set_rng_seed(0)
    est = log_marginal_likelihood(lg_model, None, x, num_samples=8, method="ais", ais_steps=100, step_size=0.05)
    _, sd = _per_point_check(est - exact, runs)
    assert sd.max() < 0.8


# -- Gamma–Poisson: positive latent, AIS in log space with the log-Jacobian ---------------------
ALPHA, BETA = 3.0, 0.5


def gp_model(x):
    with pyro.plate("data", x.shape[0]):
        rate = pyro.sample("rate", dist.Gamma(torch.tensor(ALPHA, dtype=F64), torch.tensor(BETA, dtype=F64)))
        pyro.sample("x", dist.Poisson(rate), obs=x)


def gp_guide(extra_rate=0.0):
    def guide(x):  # extra_rate=0: the exact posterior Gamma(α + x, β + 1)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("rate", dist.Gamma(ALPHA + x, BETA + 1.0 + extra_rate))

    return guide


def gp_exact(x):
    return dist.GammaPoisson(torch.tensor(ALPHA, dtype=F64), torch.tensor(BETA, dtype=F64)).log_prob(x)


def test_gamma_poisson_iwae_exact_posterior_is_exact():
    x = torch.tensor([0.0, 1.0, 4.0, 12.0], dtype=F64)
    pyro.set_rng_seed(0)
    est = log_marginal_likelihood(gp_model, gp_guide(), x, num_samples=1)
    assert (est - gp_exact(x)).abs().max() < 1e-10


def test_gamma_poisson_ais_matches_negative_binomial():
    """From the prior and from a too-narrow guide, 24 independent runs of 4 points. Dropping the
    log-Jacobian of ``rate = exp(u)`` would anneal towards ``p(x, z)/z`` instead: measured errors
    of 0.3–1 nat per point, against tolerances ≤ 0.25 here."""
    runs = 24
    x = torch.tensor([0.0, 2.0, 6.0, 15.0], dtype=F64).repeat(runs)
    exact = gp_exact(x)
    for guide in (None, gp_guide(extra_rate=1.0)):
        pyro.set_rng_seed(1)
        est = log_marginal_likelihood(gp_model, guide, x, num_samples=8, method="ais", ais_steps=50, step_size=0.1)
        _, sd = _per_point_check(est - exact, runs)
        assert sd.max() < 0.3


# -- errors and the reference model ---------------------------------------------------------
def test_global_latent_is_rejected_by_name():
    def model(x):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(mu, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    for method in ("iwae", "ais"):
        with pytest.raises(ValueError, match=r"global latent site\(s\) \['mu'\]"):
            log_marginal_likelihood(model, None, torch.zeros(3), num_samples=2, method=method)
    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(x.new_zeros(Q), 1.0).to_event(1))
            pyro.sample("extra", dist.Normal(x.new_zeros(()), 1.0))

    with pytest.raises(ValueError, match=r"samples site\(s\) \['extra'\] that are not latent sites"):
        log_marginal_likelihood(lg_model, guide, lg_data(3), num_samples=2)
    with pytest.raises(ValueError, match="method"):
        log_marginal_likelihood(lg_model, None, lg_data(3), method="elbo")


def test_reference_vae_runs_vectorised():
    """The reference DeepLatentGaussian model/guide broadcast over the particles plate."""
    from pyro_lpc.images.models import mlp_model

    torch.manual_seed(0)
    vae = mlp_model(image_shape=(1, 4, 4), latent_dim=2, hidden=(8,))
    x = torch.rand(6, 1, 4, 4, generator=torch.Generator().manual_seed(0)).round()
    pyro.set_rng_seed(0)
    elbo = log_marginal_likelihood(vae.model, vae.guide, x, num_samples=1)
    iwae = log_marginal_likelihood(vae.model, vae.guide, x, num_samples=200, batch_size=4)
    ais = log_marginal_likelihood(vae.model, vae.guide, x, num_samples=20, method="ais", ais_steps=20)
    assert elbo.shape == iwae.shape == ais.shape == (6,)
    assert torch.isfinite(ais).all()
    # E[L_1] ≤ E[L_200]: with 6 points the single-draw ELBOs scatter, so compare the means
    assert iwae.mean() > elbo.mean()


def test_ais_schedules():
    for name in ("sigmoid", "geometric", "linear"):
        b = ais_schedule(10, name)
        assert b.shape == (11,) and b[0] == 0 and b[-1] == 1 and (b[1:] > b[:-1]).all()
    with pytest.raises(ValueError, match="increase"):
        log_marginal_likelihood(lg_model, None, lg_data(2), method="ais", schedule=[0.0, 0.7, 0.5, 1.0])
