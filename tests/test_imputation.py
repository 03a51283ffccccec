"""The imputation baselines (pyro_lpc.images.imputation) on a linear-Gaussian model whose
conditional p(z | x_obs) is known in closed form."""
import arviz
import numpy as np
import pyro
import pytest
import torch

from pyro_lpc.images.imputation import encoder_draws, metropolis_within_gibbs, pseudo_gibbs
from pyro_lpc.images.models import DeepLatentGaussian, Gaussian, mlp_model

Q, D, N, SIGMA = 2, 5, 20, 0.5
W = torch.tensor([[1.0, 0.5], [-0.5, 1.0], [0.8, -0.3], [0.2, 0.9], [-1.0, 0.4]])
BIAS = torch.tensor([0.3, -0.2, 0.1, 0.0, 0.5])


class Encoder(torch.nn.Module):
    """An imperfect q(z | x): the exact full-data posterior's mean shifted by 0.3, its sd times 1.5."""

    def __init__(self):
        super().__init__()
        cov = torch.linalg.inv(torch.eye(Q) + W.T @ W / SIGMA**2)
        self.register_buffer("gain", cov @ W.T / SIGMA**2)
        self.register_buffer("sd", 1.5 * cov.diagonal().sqrt())

    def forward(self, x):
        return (x - BIAS) @ self.gain.T + 0.3, self.sd.expand(x.shape[0], Q)


def linear_gaussian():
    """z ~ N(0, I_2), x | z ~ N(W z + b, 0.5² I_5): a DeepLatentGaussian with a linear decoder."""
    decoder = torch.nn.Linear(Q, D)
    with torch.no_grad():
        decoder.weight.copy_(W)
        decoder.bias.copy_(BIAS)
    return DeepLatentGaussian(decoder, Encoder(), Gaussian(scale=SIGMA, event_dim=1), Q)


def data():
    """20 points, each missing 2 of its 5 coordinates (which hold NaN)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(N, Q, generator=gen) @ W.T + BIAS + SIGMA * torch.randn(N, D, generator=gen)
    mask = torch.ones(N, D, dtype=torch.bool)
    mask[torch.arange(N)[:, None], torch.rand(N, D, generator=gen).argsort(1)[:, :2]] = False
    return x, mask


def exact_given_observed(x, mask):
    """p(z_i | x_i,obs) = N(m_i, C_i): C_i = (I + W_oᵀW_o/σ²)⁻¹, m_i = C_i W_oᵀ(x_i,o - b_o)/σ², with W_o
    the rows of W (and x_i,o, b_o the coordinates) that point i observes."""
    w = W * mask[..., None]
    cov = torch.linalg.inv(torch.eye(Q) + w.transpose(1, 2) @ w / SIGMA**2)
    return (cov @ w.transpose(1, 2) @ ((x - BIAS) * mask)[..., None]).squeeze(-1) / SIGMA**2, cov


def standardised_errors(z, mean, variance):
    """(mean of the draws - exact mean) / MCSE per (point, coordinate); MCSE = sqrt(variance / ESS),
    ESS from arviz, one chain per (point, coordinate)."""
    ess = torch.tensor([arviz.ess(d[None]) for d in z.permute(1, 2, 0).reshape(N * Q, -1).numpy()])
    return (z.mean(0) - mean).reshape(-1) / (variance.reshape(-1) / ess).sqrt()


def test_metropolis_within_gibbs_follows_the_exact_conditional_and_pseudo_gibbs_does_not():
    """Fixed seed. Metropolis-within-Gibbs: every mean within 5 Monte Carlo standard errors of the
    exact p(z | x_obs) (40 coordinates; a |N(0,1)| above 5 has probability 6e-7 each), and each
    coordinate's variance, pooled over the 20 points as the ratio to the exact one, within 5 MCSE
    of 1 (a Gaussian's sample variance has relative MCSE sqrt(2 / ESS)). Pseudo-Gibbs with the same
    imperfect encoder settles elsewhere (its means lie > 5 MCSE away): dropping the accept test
    would fail this test."""
    dlgm = linear_gaussian()
    x, mask = data()
    hidden = torch.where(mask, x, torch.tensor(float("nan")))
    mean, cov = exact_given_observed(x, mask)
    variance = torch.diagonal(cov, dim1=1, dim2=2)
    pyro.set_rng_seed(0)
    draws = metropolis_within_gibbs(dlgm, hidden, mask, num_samples=4000, warmup_steps=200)
    z = draws.z
    assert z.shape == (4000, N, Q)
    assert 0.2 < draws.accept_rate < 1.0
    errors = standardised_errors(z, mean, variance)
    assert errors.abs().max() < 5.0, errors
    ratio = (z.var(0) / variance).mean(0)
    ess = torch.tensor([arviz.ess(d[None]) for d in ((z - mean) ** 2).permute(1, 2, 0).reshape(N * Q, -1).numpy()])
    mcse = ((2.0 / ess).reshape(N, Q).mean(0) / N).sqrt()
    assert ((ratio - 1).abs() < 5 * mcse).all(), (ratio, mcse)
    biased = pseudo_gibbs(dlgm, hidden, mask, num_samples=4000, warmup_steps=200)
    assert biased.z.shape == (4000, N, Q) and biased.accept_rate == 1.0
    assert standardised_errors(biased.z, mean, variance).abs().max() > 5.0


def test_draws_are_scored_by_impute_and_are_reproducible():
    dlgm = linear_gaussian()
    x, mask = data()
    for sampler in (pseudo_gibbs, metropolis_within_gibbs):
        pyro.set_rng_seed(3)
        first = sampler(dlgm, x, mask, num_samples=7, warmup_steps=3)
        pyro.set_rng_seed(3)
        again = sampler(dlgm, x, mask, num_samples=7, warmup_steps=3)
        assert torch.equal(first.z, again.z)
        imputed, log_p = dlgm.impute(x, mask, first.z)
        assert imputed.shape == x.shape and log_p.shape == (N,) and torch.isfinite(log_p).all()
        assert torch.equal(imputed[mask], x[mask])
    assert encoder_draws(dlgm, x, mask, num_samples=5).z.shape == (5, N, Q)


def test_bad_inputs_are_named():
    dlgm = mlp_model(image_shape=(1, 8, 8), latent_dim=3)
    x = torch.rand(4, 1, 8, 8).round()
    mask = torch.rand(4, 1, 8, 8) < 0.5
    for sampler in (encoder_draws, pseudo_gibbs, metropolis_within_gibbs):
        with pytest.raises(ValueError, match=r"expected a batch of shape \(B, 1, 8, 8\), got \(4, 1, 8, 7\)"):
            sampler(dlgm, x[..., :7], mask[..., :7])
        with pytest.raises(ValueError, match=r"mask must have the shape of x, \(4, 1, 8, 8\), got \(4, 1, 8\)"):
            sampler(dlgm, x, mask[..., 0])
        with pytest.raises(TypeError, match="mask must be a boolean tensor"):
            sampler(dlgm, x, mask.float())
        with pytest.raises(ValueError, match="mask is required"):
            sampler(dlgm, x, None)
        with pytest.raises(ValueError, match="num_samples must be positive"):
            sampler(dlgm, x, mask, num_samples=0)
        with pytest.raises(TypeError, match="dlgm must be a DeepLatentGaussian"):
            sampler(dlgm.model, x, mask)
    with pytest.raises(ValueError, match="warmup_steps non-negative, got 1 and -1"):
        pseudo_gibbs(dlgm, x, mask, num_samples=1, warmup_steps=-1)
    np.testing.assert_equal(metropolis_within_gibbs(dlgm, x, torch.ones_like(mask), 2, 0).z.shape, (2, 4, 3))
