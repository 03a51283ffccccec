"""``fit`` and ``WarmStart`` against closed-form answers.

Linear-Gaussian models make every target exact: PPCA's maximum-likelihood
solution (Tipping & Bishop 1999), the per-point Gaussian posterior of a
one-latent model, and the marginal likelihood of a hierarchical model. Seeds
are fixed; each tolerance says where it comes from.
"""
import math
import os

import arviz
import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.nn as nn

from pyro_lpc import NonFiniteError, WarmStart, fit
from pyro_lpc.potential import SplitEnergy


@pytest.fixture(autouse=True)
def clean_param_store():
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()


# -- probabilistic PCA ---------------------------------------------------------------
N, D, Q = 1000, 8, 2


def ppca_data(seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(D, Q, generator=gen)
    z = torch.randn(N, Q, generator=gen)
    return z @ w.T + 0.5 * torch.randn(N, D, generator=gen) + 1.0


def ppca_model(x):
    w = pyro.param("W", 0.1 * torch.randn(D, Q, generator=torch.Generator().manual_seed(1)))
    mu = pyro.param("mu", torch.zeros(D))
    sigma = pyro.param("sigma", torch.tensor(1.0), constraint=dist.constraints.positive)
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([Q]).to_event(1))
        pyro.sample("x", dist.Normal(z @ w.T + mu, sigma).to_event(1), obs=x)


class LinearEncoder(nn.Module):
    def __init__(self, d_in, d_latent, seed=2):
        super().__init__()
        torch.manual_seed(seed)
        self.linear = nn.Linear(d_in, 2 * d_latent)
        self.d_latent = d_latent

    def forward(self, x):
        out = self.linear(x)
        return out[..., : self.d_latent], nn.functional.softplus(out[..., self.d_latent:]) + 1e-3


def make_guide(encoder, site="z", event=1, plate_kwargs=None):
    def guide(x):
        pyro.module("encoder", encoder)
        loc, scale = encoder(x)
        with pyro.plate("data", x.shape[0]):
            pyro.sample(site, dist.Normal(loc, scale).to_event(event))

    return guide


def ppca_mle(x):
    """Closed-form ML solution: top-Q eigenvectors, σ² = mean of the discarded eigenvalues."""
    cov = torch.cov(x.T, correction=0)
    evals, evecs = torch.linalg.eigh(cov)
    evals, evecs = evals.flip(0), evecs.flip(1)
    sigma2 = evals[Q:].mean()
    w = evecs[:, :Q] * (evals[:Q] - sigma2).sqrt()
    return w, x.mean(0), sigma2, evecs[:, :Q]


def ppca_loglik(x, w, mu, sigma2):
    return dist.MultivariateNormal(mu, w @ w.T + sigma2 * torch.eye(D)).log_prob(x).mean()


@pytest.mark.slow
def test_ppca_recovers_the_maximum_likelihood_solution_with_default_sampler():
    x = ppca_data()
    w_ml, mu_ml, sigma2_ml, top = ppca_mle(x)
    guide = make_guide(LinearEncoder(D, Q))
    result = fit(ppca_model, guide, x, batch_size=100, num_epochs=30, seed=0, progress=False,
                 optim=pyro.optim.Adam({"lr": 1e-2}), guide_optim=pyro.optim.Adam({"lr": 1e-2}))
    store = pyro.get_param_store()
    w, mu, sigma2 = store["W"].detach(), store["mu"].detach(), store["sigma"].detach() ** 2
    # principal subspace: largest principal angle to the top-Q eigenvectors
    q, _ = torch.linalg.qr(w)
    cos = torch.linalg.svdvals(q.T @ top).min().clamp(max=1.0)
    assert math.degrees(math.acos(cos)) < 5.0
    # σ² ≈ mean of the discarded eigenvalues; with Adam at lr 1e-2 the iterate
    # jitters by about 1% of σ, so allow 10% on σ².
    assert abs(sigma2 - sigma2_ml) / sigma2_ml < 0.10, (sigma2, sigma2_ml)
    # per-point exact log-likelihood within 0.05 nats of the MLE's
    gap = ppca_loglik(x, w_ml, mu_ml, sigma2_ml) - ppca_loglik(x, w, mu, sigma2)
    assert 0.0 <= gap < 0.05, gap
    assert torch.isfinite(torch.tensor(result["log_joint"])).all()


# -- warm-start objectives on a model with an exact posterior -------------------------
A, S = 2.0, 0.5  # x = A z + S ε, z ~ N(0, 1): posterior N(A x / (A² + S²), S² / (A² + S²))


def one_latent_model(x):
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(A * z, S), obs=x)


def posterior_kl(encoder, x):
    """Mean over data of KL(q(z|x) ‖ p(z|x)) against the analytic posterior."""
    loc, scale = encoder(x.unsqueeze(-1))
    exact = dist.Normal(A * x / (A**2 + S**2), math.sqrt(S**2 / (A**2 + S**2)))
    return torch.distributions.kl_divergence(dist.Normal(loc.squeeze(-1), scale.squeeze(-1)), exact).mean().item()


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["forward", "reverse", "jeffreys"])
def test_each_objective_moves_the_guide_to_the_exact_posterior(objective):
    x = A * torch.randn(500, generator=torch.Generator().manual_seed(0)) + S * torch.randn(
        500, generator=torch.Generator().manual_seed(1))
    encoder = LinearEncoder(1, 1)

    def guide(x):
        pyro.module("encoder", encoder)
        loc, scale = encoder(x.unsqueeze(-1))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(loc.squeeze(-1), scale.squeeze(-1)))

    before = posterior_kl(encoder, x)
    fit(one_latent_model, WarmStart(guide, objective), x, batch_size=50, num_epochs=15,
        num_steps=10, step_size=0.05, seed=0, progress=False,
        guide_optim=pyro.optim.Adam({"lr": 2e-2}))
    after = posterior_kl(encoder, x)
    assert after < 0.2 * before, (before, after)
    if objective == "jeffreys":
        # a linear Gaussian guide can be exact; 0.02 nats is what 15 epochs of
        # Adam on chain samples (K=10, Monte Carlo noise) reach across seeds
        assert after < 0.02, after


# -- subsampling: unscaled local drift, scaled θ gradient -------------------------------
FULL = 400


def subsampled_model(idx, x_full):
    w = pyro.param("w", torch.tensor(0.5))
    with pyro.plate("data", FULL, subsample=idx):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(w * z, 0.3), obs=x_full[idx])


def minibatch_model(idx, x_full):
    w = pyro.param("w", torch.tensor(0.5))
    with pyro.plate("data", len(idx)):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(w * z, 0.3), obs=x_full[idx])


def one_iteration(model, batch):
    pyro.clear_param_store()
    result = fit(model, None, [batch], num_steps=15, step_size=0.05, keep="last", seed=3,
                 optim=pyro.optim.SGD({"lr": 1e-4}), progress=False)
    return pyro.param("w").item() - 0.5, result


def test_local_drift_ignores_the_plate_scale_and_theta_carries_it():
    x_full = torch.randn(FULL, generator=torch.Generator().manual_seed(0))
    idx = torch.arange(0, FULL, 8)  # B = 50, scale N/B = 8
    delta_sub, res_sub = one_iteration(subsampled_model, (idx, x_full))
    delta_mini, res_mini = one_iteration(minibatch_model, (idx, x_full))
    # identical chains (same seed, same unscaled energies) give exactly proportional θ steps
    assert delta_mini != 0.0
    assert delta_sub / delta_mini == pytest.approx(FULL / len(idx), rel=1e-4)
    # the reported log-joint is per data point in both cases
    assert res_sub["log_joint"][0] == pytest.approx(res_mini["log_joint"][0], rel=1e-4)


# -- a global latent and local latents in a subsampled plate -----------------------------
def hierarchical_model(x):
    tau = pyro.param("tau", torch.tensor(0.5), constraint=dist.constraints.positive)
    mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
    with pyro.plate("data", x.shape[0], subsample_size=100) as idx:
        z = pyro.sample("z", dist.Normal(mu, tau))
        pyro.sample("x", dist.Normal(z, 0.5), obs=x[idx])


@pytest.mark.slow
def test_global_and_local_latents_in_a_subsampled_plate_learn_the_generating_values():
    gen = torch.Generator().manual_seed(0)
    n, mu_true, tau_true = 2000, 3.0, 1.5
    x = mu_true + tau_true * torch.randn(n, generator=gen) + 0.5 * torch.randn(n, generator=gen)
    encoder = LinearEncoder(1, 1)

    def guide(x):  # local z only: the global mu is left to its persistent chain
        pyro.module("encoder", encoder)
        with pyro.plate("data", x.shape[0], subsample_size=100) as idx:
            loc, scale = encoder(x[idx].unsqueeze(-1))
            pyro.sample("z", dist.Normal(loc.squeeze(-1), scale.squeeze(-1)))

    result = fit(hierarchical_model, guide, [(x,)] * 20, num_epochs=15, num_steps=10,
                 step_size=0.05, seed=0, progress=False,
                 optim=pyro.optim.Adam({"lr": 2e-2}), guide_optim=pyro.optim.Adam({"lr": 2e-2}))
    tau = pyro.param("tau").item()
    mu = result.sampler_state["global_values"]["mu"].item()
    # MLE of τ has sd ≈ τ / sqrt(2n) · (τ² + 0.25) / τ² ≈ 0.03; allow 0.1 for Adam's jitter.
    assert abs(tau - tau_true) < 0.1, tau
    # posterior sd of μ is ≈ sqrt((τ² + 0.25) / n) ≈ 0.035; mini-batch gradient noise widens
    # the SGLD chain's spread to ≈ 0.07 (measured): its last draw within 3 of those, 0.2
    assert abs(mu - x.mean().item()) < 0.2, mu


# -- a constrained local latent ----------------------------------------------------------
def gamma_poisson(x):
    with pyro.plate("data", x.shape[0]):
        rate = pyro.sample("rate", dist.Gamma(3.0, 2.0))
        pyro.sample("x", dist.Poisson(rate), obs=x)


@pytest.mark.slow
def test_constrained_local_latents_are_sampled_in_unconstrained_space():
    from pyro_lpc.diagnostics import ChainRecorder

    x = torch.tensor([0.0, 2.0, 7.0, 15.0])
    recorder = ChainRecorder(x, num_chains=4, num_steps=3000)
    fit(gamma_poisson, None, x.repeat(25), batch_size=50, num_steps=10, step_size=0.1, adjust=True,
        seed=0, progress=False, recorder=recorder)
    draws = recorder.records[0].sel(draw=slice(500, None))
    rate = torch.as_tensor(draws.posterior["rate"].values).flatten(0, 1)
    assert (rate > 0).all()
    exact = dist.Gamma(3.0 + x, 3.0)  # conjugate posterior per data point
    ess = torch.as_tensor(arviz.ess(draws)["rate"].values)
    # MALA is exact: means within 5 Monte Carlo standard errors (sd / sqrt(ESS))
    assert torch.all((rate.mean(0) - exact.mean).abs() < 5 * exact.stddev / ess.sqrt())


# -- modes and options ----------------------------------------------------------------
@pytest.mark.parametrize("precondition", ["diagonal", "rmsprop", "adam", None])
def test_encoder_free_mode_and_every_preconditioner_learn(precondition):
    x = ppca_data()[:400]
    result = fit(ppca_model, None, x, batch_size=100, num_epochs=6, num_steps=10, step_size=0.02,
                 precondition=precondition, seed=0, progress=False,
                 optim=pyro.optim.Adam({"lr": 2e-2}))
    log_joint = result["log_joint"]
    assert len(log_joint) == 24 and result["guide_loss"][0] is None
    assert sum(log_joint[-4:]) / 4 > sum(log_joint[:4]) / 4 + 1.0


def test_mala_reports_acceptance():
    x = ppca_data()[:200]
    result = fit(ppca_model, make_guide(LinearEncoder(D, Q)), x, batch_size=100, num_steps=5,
                 adjust=True, seed=0, progress=False)
    assert all(0.0 < a <= 1.0 for a in result["accept_rate"])


def test_same_seed_same_result():
    x = ppca_data()[:200]
    runs = []
    for _ in range(2):
        pyro.clear_param_store()
        fit(ppca_model, make_guide(LinearEncoder(D, Q)), x, batch_size=50, num_steps=5, seed=7,
            progress=False)
        runs.append(pyro.param("W").detach().clone())
    assert torch.equal(runs[0], runs[1])


def test_reverse_term_from_the_chains_start_energy_changes_nothing(monkeypatch):
    """The guide's reverse term reads log p(x, z_0) and its gradient from the chains' first
    evaluation (SplitEnergy.log_joint_from_energy) instead of evaluating the model again:
    training must be the same as with the model evaluated, to float rounding."""
    x = ppca_data()[:200]

    def run():
        pyro.clear_param_store()
        result = fit(ppca_model, make_guide(LinearEncoder(D, Q)), x, batch_size=50, num_steps=5, seed=7,
                     num_epochs=2, progress=False, optim=pyro.optim.Adam({"lr": 1e-2}),
                     guide_optim=pyro.optim.Adam({"lr": 1e-2}))
        return result["guide_loss"], {k: v.detach().clone() for k, v in pyro.get_param_store().items()}

    loss_reused, params_reused = run()
    monkeypatch.setattr(SplitEnergy, "_energy_scale", lambda self, prototype: None)  # evaluate the model
    loss_evaluated, params_evaluated = run()
    assert loss_reused == pytest.approx(loss_evaluated, rel=1e-5)
    for name, value in params_evaluated.items():
        assert torch.allclose(params_reused[name], value, atol=1e-5), name


def test_a_subsampled_plate_of_the_model_alone_keeps_its_indices_through_an_iteration():
    """The guide does not replay the model's pixel subsample: fit must draw it once per batch
    (its prototype trace) and hold it for every evaluation of that iteration's chains, also
    when later batches reuse the model's structure."""
    seen = []
    P = 20

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            with pyro.plate("pixels", P, subsample_size=3, dim=-2) as idx:
                seen.append(tuple(idx.tolist()))
                pyro.sample("x", dist.Normal(z, 1.0), obs=x.T[idx])

    def guide(x):
        loc = pyro.param("loc", torch.zeros(x.shape[0]))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(loc, 1.0))

    x = torch.randn(8, P, generator=torch.Generator().manual_seed(0))
    fit(model, guide, [(x,)] * 3, num_steps=4, progress=False, seed=0, data_plate="data")
    assert len(seen) > 3 * 5  # every chain step evaluated the model
    assert len(set(seen)) <= 3  # one index set per iteration (new draws: 3 of 20, rarely equal)


def test_resume_is_bit_identical(tmp_path):
    x = ppca_data()[:300]

    def run(epochs, resume, folder):
        pyro.clear_param_store()
        guide = make_guide(LinearEncoder(D, Q))
        return fit(ppca_model, guide, x, batch_size=100, num_epochs=epochs, num_steps=5, seed=11,
                   progress=False, checkpoint_dir=str(folder), resume=resume)

    full = run(2, False, tmp_path / "full")
    w_full = pyro.param("W").detach().clone()
    enc_full = pyro.param("encoder$$$linear.weight").detach().clone()
    run(1, False, tmp_path / "split")
    resumed = run(2, True, tmp_path / "split")  # fresh encoder and param store, as in a new process
    assert torch.equal(pyro.param("W").detach(), w_full)
    assert torch.equal(pyro.param("encoder$$$linear.weight").detach(), enc_full)
    assert resumed["log_joint"] == full["log_joint"]


def test_corrupted_checkpoint_is_refused_and_left_alone(tmp_path):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="corrupted"):
        fit(ppca_model, None, ppca_data()[:100], batch_size=50, checkpoint_dir=str(tmp_path),
            resume=True, progress=False)
    assert path.read_bytes() == b"not a checkpoint"
    assert os.listdir(tmp_path) == ["checkpoint.pt"]


# -- errors that name the problem ---------------------------------------------------------
def test_guide_missing_a_local_site():
    def model(x):
        with pyro.plate("data", x.shape[0]):
            a = pyro.sample("a", dist.Normal(0.0, 1.0))
            b = pyro.sample("b", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(a + b, 1.0), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("a", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match=r"does not sample the latent site\(s\) \['b'\] .*every local latent"):
        fit(model, guide, torch.randn(10), batch_size=5, progress=False)


def test_guide_sampling_an_unknown_site():
    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("extra", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match=r"\['extra'\].*not latent sites"):
        fit(one_latent_model, guide, torch.randn(10), batch_size=5, progress=False)


def test_observed_site_outside_every_plate_does_not_hide_the_data_plate():
    def model(x):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        pyro.sample("mu_obs", dist.Normal(mu, 0.1), obs=torch.tensor(0.5))  # no plate
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(mu, 1.0))
            pyro.sample("x", dist.Normal(z, 0.5), obs=x)

    result = fit(model, None, torch.randn(40), batch_size=20, num_steps=3, progress=False, seed=0)
    # z is local (one chain per data point), only mu is a persistent global chain
    assert set(result.sampler_state["global_values"]) == {"mu"}


def test_model_without_latent_sites():
    def model(x):
        loc = pyro.param("loc", torch.tensor(0.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(loc, 1.0), obs=x)

    with pytest.raises(ValueError, match="no latent sample site"):
        fit(model, None, torch.randn(10), batch_size=5, progress=False)


def test_discrete_latent_site():
    def model(x):
        with pyro.plate("data", x.shape[0]):
            c = pyro.sample("c", dist.Bernoulli(0.5))
            pyro.sample("x", dist.Normal(c, 1.0), obs=x)

    with pytest.raises(ValueError, match="Latent site 'c' is discrete"):
        fit(model, None, torch.randn(10), batch_size=5, progress=False)


def test_batch_the_model_rejects():
    with pytest.raises(RuntimeError, match=r"iteration 0 with a batch of shape\(s\) \[\(5, 3\)\]"):
        fit(ppca_model, None, torch.randn(10, 3), batch_size=5, progress=False)


def test_overflow_mid_training_stops_with_finite_parameters():
    x = ppca_data()[:300].clone()
    x[250] = 1e30  # finite, but its squared error overflows: a non-finite log-joint at batch 3
    batches = [(x[i:i + 100],) for i in range(0, 300, 100)]
    with pytest.raises(NonFiniteError, match=r"iteration 2: .*site\(s\) \[.*'x'") as info:
        fit(ppca_model, make_guide(LinearEncoder(D, Q)), batches, num_steps=5, progress=False)
    assert len(info.value.result.history) == 2
    for name, value in pyro.get_param_store().items():
        assert torch.isfinite(value).all(), name


def test_nan_in_a_batch_names_the_iteration():
    x = ppca_data()[:300].clone()
    x[250] = math.nan  # Pyro's validation rejects it in the guide's Normal
    batches = [(x[i:i + 100],) for i in range(0, 300, 100)]
    with pytest.raises(RuntimeError, match=r"iteration 2 with a batch of shape\(s\) \[\(100, 8\)\]"):
        fit(ppca_model, make_guide(LinearEncoder(D, Q)), batches, num_steps=5, progress=False)
    for name, value in pyro.get_param_store().items():
        assert torch.isfinite(value).all(), name


def test_bad_options():
    x = torch.randn(10, D)
    with pytest.raises(ValueError, match="keep must be"):
        fit(ppca_model, None, x, batch_size=5, keep="some")
    with pytest.raises(ValueError, match="batch_size"):
        fit(ppca_model, None, x)
    with pytest.raises(ValueError, match="Unknown warm-start objective 'kl'"):
        fit(ppca_model, make_guide(LinearEncoder(D, Q)), x, batch_size=5, warm_start="kl")
    with pytest.raises(ValueError, match="step_size"):
        fit(ppca_model, None, x, batch_size=5, step_size=-1.0)
    with pytest.raises(ValueError, match="adjust=True needs every latent site to be local.*'mu'"):
        fit(hierarchical_model, None, [(torch.randn(200),)], adjust=True, progress=False)
