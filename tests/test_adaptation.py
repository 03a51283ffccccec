"""Warm-up adaptation (pyro_lpc.adaptation): the window estimates are the sample moments."""
import pytest
import torch
from pyro.ops.welford import WelfordCovariance

from pyro_lpc import langevin
from pyro_lpc.adaptation import Moments, WindowCovariance


def regularised(cov, n):
    """Stan's regularisation: (n / (n + 5)) cov + 1e-3 (5 / (n + 5)) I."""
    return n / (n + 5.0) * cov + 1e-3 * 5.0 / (n + 5.0) * torch.eye(cov.shape[0], dtype=cov.dtype)


def window_samples(n=40, seed=0):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(n, 2, 3, generator=gen, dtype=torch.float64)
    b = torch.randn(n, generator=gen, dtype=torch.float64) * 5.0 + a[:, 0, 0]
    return [{"a": a[i], "b": b[i]} for i in range(n)], torch.cat([a.reshape(n, -1), b[:, None]], -1)


def test_variance_window_is_the_sample_variance_over_the_gradient_variance():
    positions, flat = window_samples()
    # a Gaussian energy with precision diag(d): ∇U = d z, so Var(∇U) = d² Var(z)
    d = torch.linspace(0.5, 4.0, flat.shape[1], dtype=torch.float64)
    window = WindowCovariance(dense=False)
    for z, x in zip(positions, flat):
        window.update(z, langevin.unflatten(d * x, z))
    precond = langevin.init_preconditioner("variance", positions[0])
    scale = window.preconditioner(precond).scale
    var = regularised(torch.cov(flat.T), len(flat)).diagonal()
    expected = (var / (d.square() * torch.cov(flat.T).diagonal())).sqrt()
    torch.testing.assert_close(langevin.flatten(scale, scale), expected)
    assert scale["a"].shape == (2, 3) and scale["b"].shape == ()


def test_dense_window_is_the_regularised_sample_covariance_and_restarts():
    positions, flat = window_samples()
    window = WindowCovariance(dense=True)
    for z in positions:
        window.update(z, z)
    precond = langevin.init_preconditioner("dense", positions[0])
    new = window.preconditioner(precond, final=True)
    expected = regularised(torch.cov(flat.T), len(flat))
    torch.testing.assert_close(new.cholesky @ new.cholesky.mT, expected)
    torch.testing.assert_close(langevin.flatten(new.scale, new.scale), expected.diagonal())
    # the next window starts afresh: its estimate uses only its own samples
    later, flat_later = window_samples(seed=1)
    for z in later[:10]:
        window.update(z, z)
    again = window.preconditioner(precond, final=True)
    torch.testing.assert_close(again.cholesky @ again.cholesky.mT, regularised(torch.cov(flat_later[:10].T), 10))


def test_dense_window_before_the_last_uses_the_diagonal_estimate():
    positions, flat = window_samples()
    window = WindowCovariance(dense=True)
    for z in positions:
        window.update(z, z)
    new = window.preconditioner(langevin.init_preconditioner("dense", positions[0]), final=False)
    var = regularised(torch.cov(flat.T), len(flat)).diagonal()
    expected = (var / torch.cov(flat.T).diagonal()).sqrt()
    torch.testing.assert_close(new.cholesky, torch.diag(expected.sqrt()))


def test_window_with_too_few_samples():
    window = WindowCovariance(dense=False)
    window.update({"z": torch.zeros(2)}, {"z": torch.zeros(2)})
    with pytest.raises(ValueError, match="at least 2 samples.*got 1"):
        window.preconditioner(langevin.init_preconditioner("variance", {"z": torch.zeros(2)}))


@pytest.mark.parametrize("dense", [False, True])
def test_moments_merged_in_batches_equal_pyros_welford_one_at_a_time(dense):
    """`Moments` takes C chains' draws in one update; the result is Pyro's WelfordCovariance fed
    the same rows one by one (float64, so the comparison is exact to rounding)."""
    rows = torch.randn(20, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 3 + 1
    moments, welford = Moments(dense=dense), WelfordCovariance(diagonal=not dense)
    for batch in rows.split([5, 1, 7, 7]):
        moments.update(batch)
    for row in rows:
        welford.update(row)
    for regularize in (False, True):
        assert torch.allclose(moments.covariance(regularize), welford.get_covariance(regularize))
