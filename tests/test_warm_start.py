"""Warm starts from Pyro's own guides: autoguides and EasyGuide (issue 13, items 10 and 11).

An autoguide samples auxiliary sites in unconstrained space and sets each model
site to a ``Delta`` carrying ``-log|J|``; the chains start from the model sites'
values, and the forward term ``-log q(z)`` is computed through the guide's own
density. Each forward loss is checked against ``-log q`` written out by hand
(float32 arithmetic: tolerance 1e-4 relative).
"""
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.contrib.easyguide import EasyGuide
from pyro.infer import MCMC
from pyro.infer.autoguide import (AutoDelta, AutoDiagonalNormal, AutoLowRankMultivariateNormal,
                                  AutoMultivariateNormal, AutoNormal)
from pyro.infer.autoguide.initialization import init_to_value

from pyro_lpc import PCLangevin, WarmStart, fit
from pyro_lpc.marginal_likelihood import log_marginal_likelihood
from pyro_lpc.potential import joint_potential

N = 6
X = torch.tensor([2.1, 3.4, 1.2, 4.0, 2.8, 3.3])
# far from init_to_uniform's (-2, 2) in unconstrained space, so a start from the guide shows
START = {"mu": torch.tensor(7.0), "sigma": torch.tensor(20.0)}


def model(x):
    """Global mu and (constrained) sigma, one local latent per data point."""
    mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
    sigma = pyro.sample("sigma", dist.HalfNormal(5.0))
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(mu, sigma))
        pyro.sample("x", dist.Normal(z, 0.5), obs=x)


class GroupGuide(EasyGuide):
    """Pyro's sparse-gamma-DEF pattern: a joint group of the globals, a grouped local per point."""

    def init(self, site):
        return START[site["name"]].clone() if site["name"] in START else torch.zeros(site["fn"].shape())

    def guide(self, x):
        loc = pyro.param("globals_loc", torch.stack([START["mu"], START["sigma"].log()]))
        tril = pyro.param("globals_tril", 1e-3 * torch.eye(2), constraint=dist.constraints.lower_cholesky)
        self.group(match="mu|sigma").sample("globals", dist.MultivariateNormal(loc, scale_tril=tril))
        z_loc = pyro.param("z_loc", torch.zeros(x.shape[0], 1))
        with self.plate("data", x.shape[0]):
            self.group(match="z").sample("locals", dist.Normal(z_loc, 0.5).to_event(1))


AUTO = {"AutoDiagonalNormal": AutoDiagonalNormal, "AutoMultivariateNormal": AutoMultivariateNormal,
        "AutoLowRankMultivariateNormal": AutoLowRankMultivariateNormal}


def make_guide(kind):
    init = init_to_value(values={k: v.clone() for k, v in START.items()})  # Pyro steps them in place
    if kind == "AutoNormal":
        return AutoNormal(model, init_loc_fn=init, init_scale=1e-3)
    if kind in AUTO:
        return AUTO[kind](model, init_loc_fn=init, init_scale=1e-3)
    if kind == "AutoDelta":
        return AutoDelta(model, init_loc_fn=init)
    return GroupGuide(model)


GUIDES = ["AutoNormal", *AUTO, "EasyGuide"]


def hand_log_q(kind, guide, z):
    """log q(z) written out: the guide's density of the unconstrained values u = (mu, log sigma, z),
    less log|d sigma / d log sigma| = log sigma."""
    u = torch.cat([z["mu"].reshape(1), z["sigma"].log().reshape(1), z["z"]])
    if kind == "AutoNormal":
        locs = torch.cat([guide.locs.mu.reshape(1), guide.locs.sigma.reshape(1), guide.locs.z])
        scales = torch.cat([guide.scales.mu.reshape(1), guide.scales.sigma.reshape(1), guide.scales.z])
        log_q = dist.Normal(locs, scales).log_prob(u).sum()
    elif kind == "AutoDiagonalNormal":
        log_q = dist.Normal(guide.loc, guide.scale).log_prob(u).sum()
    elif kind == "AutoMultivariateNormal":
        log_q = dist.MultivariateNormal(guide.loc, scale_tril=guide.scale_tril * guide.scale[:, None]).log_prob(u)
    elif kind == "AutoLowRankMultivariateNormal":
        log_q = dist.LowRankMultivariateNormal(guide.loc, guide.scale[:, None] * guide.cov_factor,
                                               guide.scale ** 2).log_prob(u)
    else:
        store = pyro.get_param_store()
        log_q = dist.MultivariateNormal(store["globals_loc"], scale_tril=store["globals_tril"]).log_prob(u[:2]) \
            + dist.Normal(store["z_loc"].squeeze(-1), 0.5).log_prob(u[2:]).sum()
    return log_q - z["sigma"].log()


@pytest.mark.parametrize("kind", GUIDES)
def test_forward_loss_through_an_autoguide_is_minus_log_q_by_hand(kind):
    pyro.set_rng_seed(0)
    guide = make_guide(kind)
    warm = WarmStart(guide, "forward")
    trace = warm.draw((X,), {})
    transforms = joint_potential(model, (X,)).transforms
    sample = {"mu": torch.tensor(2.5), "sigma": torch.tensor(0.8), "z": X + 0.3}
    loss = warm.forward_loss(trace, [sample], (X,), {}, transforms)
    expected = -hand_log_q(kind, guide, sample)
    assert torch.isclose(loss, expected, rtol=1e-4), (loss, expected)
    # the mean over samples: two samples give the mean of their losses
    other = {"mu": torch.tensor(-1.0), "sigma": torch.tensor(3.0), "z": X - 0.2}
    pair = warm.forward_loss(trace, [sample, other], (X,), {}, transforms)
    assert torch.isclose(pair, (expected - hand_log_q(kind, guide, other)) / 2, rtol=1e-4)


@pytest.mark.parametrize("kind", GUIDES)
def test_fit_trains_an_autoguide_as_warm_start(kind):
    guide = make_guide(kind)
    with torch.no_grad():
        guide(X)  # sets up the guide's parameters
    before = {k: v.detach().clone() for k, v in pyro.get_param_store().items()}
    result = fit(model, guide, [(X,)] * 3, num_steps=3, step_size=1e-2, seed=0, progress=False)
    assert len(result.history) == 3
    assert all(torch.isfinite(torch.tensor(row["guide_loss"])) for row in result.history)
    after = pyro.get_param_store()
    assert any(not torch.equal(before[k], after[k].detach()) for k in before), "φ was not trained"
    # the global chain started from the guide's draw (mu ≈ 7) and moved from there by SGLD steps
    # of size η/N = 1.7e-3 (noise sd 0.06 per step): 3 iterations of 3 steps stay within 1
    assert abs(result.sampler_state["global_values"]["mu"] - START["mu"]) < 1.0


@pytest.mark.parametrize("kind", [*GUIDES, "AutoDelta"])
def test_pclangevin_starts_from_an_autoguide(kind):
    kernel = PCLangevin(model, adjust=True, init=make_guide(kind))
    kernel.setup(0, X)
    start = kernel.initial_params  # unconstrained: mu, log sigma
    assert abs(start["mu"] - START["mu"]) < 0.05 and abs(start["sigma"] - START["sigma"].log()) < 0.05
    mcmc = MCMC(PCLangevin(model, adjust=True, init=make_guide(kind)), num_samples=5, warmup_steps=5,
                disable_progbar=True)
    mcmc.run(X)
    assert mcmc.get_samples()["z"].shape == (5, N)


@pytest.mark.parametrize("objective", ["forward", "jeffreys"])
def test_autodelta_has_no_forward_term(objective):
    with pytest.raises(ValueError, match=r"site 'mu' is a point mass.*warm_start='reverse'"):
        fit(model, make_guide("AutoDelta"), [(X,)], warm_start=objective, num_steps=2, progress=False)


def test_autodelta_with_the_reverse_objective_moves_towards_the_map():
    guide = make_guide("AutoDelta")
    result = fit(model, guide, [(X,)] * 20, warm_start="reverse", num_steps=2, seed=0, progress=False,
                 guide_optim=pyro.optim.Adam({"lr": 0.1}))
    # the point mass's loss is -log p(x, z_0): it falls from the start far from the data
    assert result["guide_loss"][-1] < result["guide_loss"][0]
    assert abs(guide.median(X)["mu"] - X.mean()) < abs(START["mu"] - X.mean())


def test_an_auxiliary_site_the_samples_do_not_determine_is_refused():
    def guide(x):
        a = pyro.sample("a", dist.Normal(0.0, 1.0), infer={"is_auxiliary": True})
        pyro.sample("mu", dist.Normal(a, 1.0))  # q(mu) = ∫ q(a) q(mu | a) da: not at hand
        pyro.sample("sigma", dist.LogNormal(0.0, 1.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(x, 1.0))

    with pytest.raises(ValueError, match=r"auxiliary site 'a'.*cannot be derived.*warm_start='reverse'"):
        fit(model, guide, [(X,)], warm_start="jeffreys", num_steps=2, progress=False)
    result = fit(model, guide, [(X,)], warm_start="reverse", num_steps=2, progress=False)
    assert torch.isfinite(torch.tensor(result["guide_loss"])).all()


def test_forward_term_trains_on_the_kept_samples(monkeypatch):
    """What the docs say (warm_start.py, concepts.md): the forward term sees fit's kept samples."""
    seen = []
    original = WarmStart.forward_loss

    def spy(self, guide_trace, samples, *args, **kwargs):
        seen.append([s["z"] for s in samples])
        return original(self, guide_trace, samples, *args, **kwargs)

    monkeypatch.setattr(WarmStart, "forward_loss", spy)
    for keep, count in (("last", 1), ("all", 4), (slice(0, None, 2), 2), (1, 3)):
        seen.clear()
        fit(model, make_guide("AutoNormal"), [(X,)], num_steps=4, keep=keep, seed=0, progress=False)
        assert len(seen) == 1 and len(seen[0]) == count, (keep, [len(s) for s in seen])


def test_iwae_with_an_autonormal_at_the_exact_posterior_is_exact():
    """With q = p(z | x) every importance weight is p(x): the estimate is log p(x) for any k."""
    a, s = 2.0, 0.5

    def local_model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(a * z, s), obs=x)

    post_loc, post_sd = a * X / (a**2 + s**2), (s**2 / (a**2 + s**2)) ** 0.5
    guide = AutoNormal(local_model, init_loc_fn=init_to_value(values={"z": post_loc}), init_scale=post_sd)
    estimate = log_marginal_likelihood(local_model, guide, X, num_samples=8)
    exact = dist.Normal(0.0, (a**2 + s**2) ** 0.5).log_prob(X).double()
    assert torch.allclose(estimate, exact, atol=1e-4), (estimate, exact)  # float32 terms, summed
    with pytest.raises(ValueError, match=r"method='ais'.*auxiliary site\(s\) \['z_unconstrained'\]"):
        log_marginal_likelihood(local_model, guide, X, num_samples=8, method="ais")
