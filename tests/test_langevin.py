"""The functional core against exact answers for Gaussian targets.

Statistical checks use many independent chains advanced in one vectorised
step (``batch_ndim=1``), fixed seeds, and tolerances of 5 Monte Carlo standard
errors: for ``n`` independent draws of N(0, s²), the sample variance has
standard error ``s² sqrt(2/n)``.
"""
import math

import pytest
import torch

from pyro_lpc import langevin


def gaussian(precision):
    """Energy U(z) = p z² / 2 per chain (chains along dim 0, event dim 1)."""
    precision = torch.as_tensor(precision)

    def potential(position):
        z = position["z"]
        return 0.5 * (precision * z.square()).sum(-1)

    return langevin.value_and_grad(potential)


def run_chains(potential, z0, step_size, num_steps, precondition=None, adjust=False):
    state = langevin.init({"z": z0}, potential, precondition, batch_ndim=1)
    accept = []
    for _ in range(num_steps):
        state, info = langevin.step(state, potential, step_size, adjust=adjust, batch_ndim=1)
        accept.append(info.accept_prob)
    return state, torch.stack(accept)


def variance_tolerance(var, n, num_se=5.0):
    return num_se * var * math.sqrt(2.0 / n)


@pytest.mark.parametrize("step_size", [0.05, 0.2, 0.4])
def test_ula_stationary_variance_is_the_known_discretisation(step_size):
    # ULA on N(0, 1/p): z' = (1 - ηp) z + sqrt(2η) ξ has variance 2 / (p (2 - ηp)).
    torch.manual_seed(0)
    p, n = 4.0, 20000
    potential = gaussian([p])
    state, _ = run_chains(potential, torch.zeros(n, 1), step_size, 200)
    expected = 2.0 / (p * (2.0 - step_size * p))
    var = state.position["z"].var().item()
    assert abs(var - expected) < variance_tolerance(expected, n)
    # and it is distinguishable from the exact 1/p except for the smallest step
    if step_size >= 0.2:
        assert abs(var - 1.0 / p) > variance_tolerance(expected, n)


def test_ula_bias_shrinks_to_the_target_as_step_size_goes_to_zero():
    torch.manual_seed(1)
    p, n = 4.0, 20000
    potential = gaussian([p])
    state, _ = run_chains(potential, torch.randn(n, 1) / math.sqrt(p), 1e-3, 300)
    var = state.position["z"].var().item()
    assert abs(var - 1.0 / p) < variance_tolerance(1.0 / p, n)


@pytest.mark.parametrize("precondition", [None, "diagonal"])
def test_mala_is_exact_at_a_large_step(precondition):
    # Step 0.4 with precision 4 gives ULA variance 1.25 (5x the target); MALA removes the bias.
    torch.manual_seed(2)
    precision = torch.tensor([4.0, 0.25])
    n = 10000
    potential = gaussian(precision)
    state, accept = run_chains(
        potential, torch.randn(n, 2) / precision.sqrt(), 0.4, 400, precondition, adjust=True
    )
    var = state.position["z"].var(0)
    expected = 1.0 / precision
    # successive MALA states are correlated, but each chain's final state is an independent draw
    for v, e in zip(var.tolist(), expected.tolist()):
        assert abs(v - e) < variance_tolerance(e, n)
    assert accept.shape == (400, n)
    assert 0.05 < accept.mean() < 1.0


def test_mala_accepts_per_chain_when_chains_have_no_event_dims():
    # latents of shape (chains,): each chain's acceptance must use only its own terms
    torch.manual_seed(5)
    n = 10000

    def potential(position):
        return 2.0 * position["z"].square()  # precision 4, one energy per chain

    fn = langevin.value_and_grad(potential)
    state = langevin.init({"z": torch.randn(n) / 2.0}, fn, None, batch_ndim=1)
    for _ in range(300):
        state, info = langevin.step(state, fn, 0.4, adjust=True, batch_ndim=1)
    assert info.accept_prob.shape == (n,)
    var = state.position["z"].var().item()
    assert abs(var - 0.25) < variance_tolerance(0.25, n)


def test_diagonal_preconditioner_is_shared_and_constant_within_a_chain():
    torch.manual_seed(3)
    precision = torch.tensor([1e4, 1.0, 1e-4])
    potential = gaussian(precision)
    z0 = torch.randn(64, 3) / precision.sqrt()
    state = langevin.init({"z": z0}, potential, "diagonal", batch_ndim=1)
    assert state.precond.second_moment["z"].shape == (3,)
    for _ in range(20):
        state = state._replace(
            precond=langevin.accumulate(state.precond, state.grad, batch_ndim=1)
        )
        state, _ = langevin.step(state, potential, 1e-5, batch_ndim=1)
    # step() never changed P: still the initial ones until refresh() is called
    assert torch.equal(state.precond.scale["z"], torch.ones(3))
    scale = langevin.refresh(state.precond).scale["z"]
    # P = 1 / sqrt(E g²) ≈ sqrt(variance) = 1 / sqrt(precision) for a Gaussian in equilibrium
    ratio = scale * precision.sqrt()
    assert torch.all((ratio > 0.5) & (ratio < 2.0)), ratio


def test_rmsprop_statistics_are_per_chain_and_bias_corrected():
    potential = gaussian([1.0])
    z0 = torch.tensor([[1.0], [3.0]])
    state = langevin.init({"z": z0}, potential, "rmsprop", batch_ndim=1)
    torch.manual_seed(0)
    state, _ = langevin.step(state, potential, 1e-2, batch_ndim=1)
    # after one update v̂ = g² exactly, so P = 1 / (|g| + λ) with g = z0
    expected = 1.0 / (z0.abs() + langevin.EPSILON)
    assert torch.allclose(state.precond.scale["z"], expected)


def test_adam_drift_uses_the_first_moment_and_rejects_adjustment():
    potential = gaussian([1.0])
    state = langevin.init({"z": torch.ones(5, 1)}, potential, "adam", batch_ndim=1)
    state, info = langevin.step(state, potential, 1e-2, batch_ndim=1)
    assert state.precond.first_moment["z"].shape == (5, 1)
    assert info.accepted.all()
    with pytest.raises(ValueError, match="adam.*adjust"):
        langevin.step(state, potential, 1e-2, adjust=True, batch_ndim=1)


def test_rmsprop_rejects_adjustment():
    # Its P_k changes every step, so the Metropolis test is not exact: 20,000 chains
    # started at N(0, 1) had variance 0.71 after five "MALA" steps at η = 1 (issue 13).
    with pytest.raises(ValueError, match="'rmsprop' cannot be Metropolis-adjusted"):
        langevin.check_precondition("rmsprop", adjust=True)
    potential = gaussian([1.0])
    state = langevin.init({"z": torch.randn(5, 1)}, potential, "rmsprop", batch_ndim=1)
    with pytest.raises(ValueError, match="rmsprop.*adjust"):
        langevin.step(state, potential, 1.0, adjust=True, batch_ndim=1)


def test_nonfinite_proposals_are_divergent_and_rejected_by_mala():
    def potential(position):
        z = position["z"].squeeze(-1)
        return torch.where(z > 1.0, torch.full_like(z, math.nan), 0.5 * z.square())

    fn = langevin.value_and_grad(potential)
    torch.manual_seed(4)
    state = langevin.init({"z": torch.full((1000, 1), 0.9)}, fn, None, batch_ndim=1)
    new, info = langevin.step(state, fn, 0.5, adjust=True, batch_ndim=1)
    assert info.diverged.any() and (~info.diverged).any()
    assert not info.accepted[info.diverged].any()
    assert torch.isfinite(new.position["z"]).all()
    assert torch.isfinite(new.potential).all()


def test_several_sites_and_batch_shapes():
    def potential(position):
        return 0.5 * position["a"].square().sum(-1) + 0.5 * position["b"].square().sum((-2, -1))

    fn = langevin.value_and_grad(potential)
    state = langevin.init({"a": torch.zeros(7, 3), "b": torch.zeros(7, 2, 2)}, fn, "diagonal", 1)
    state, info = langevin.step(state, fn, 0.1, adjust=True, batch_ndim=1)
    assert info.accept_prob.shape == (7,)
    assert state.position["b"].shape == (7, 2, 2)
    assert state.precond.scale["b"].shape == (2, 2)


@pytest.mark.parametrize("bad", [0.0, -1e-3, math.inf, math.nan])
def test_bad_step_sizes_are_refused(bad):
    with pytest.raises(ValueError, match="step_size"):
        langevin.check_step_size(bad)


def test_unknown_preconditioner_lists_the_valid_ones():
    with pytest.raises(ValueError, match="Unknown preconditioner 'fisher'.*diagonal"):
        langevin.check_precondition("fisher")


def test_dense_mala_keeps_the_target_invariant():
    """4,000 independent chains started exactly from N(0, Σ) (Σ with correlation 0.9) stay
    there under 10 dense MALA steps with a P that is not Σ and a large step. Independent
    chains: the MCSE of a sample variance is var·sqrt(2/n), of a covariance
    sqrt((Σ_ii Σ_jj + Σ_ij²)/n); both checked to 5 MCSE."""
    torch.manual_seed(0)
    cov = torch.tensor([[1.0, 0.9 * 2.0], [0.9 * 2.0, 4.0]])
    precision = torch.linalg.inv(cov)
    potential = langevin.value_and_grad(lambda p: 0.5 * ((p["z"] @ precision) * p["z"]).sum(-1))
    n = 4000
    start = torch.randn(n, 2) @ torch.linalg.cholesky(cov).mT
    precond = langevin.init_preconditioner("dense", {"z": start}, batch_ndim=1)
    p_matrix = torch.tensor([[2.0, 0.5], [0.5, 1.0]])
    precond = precond._replace(cholesky=torch.linalg.cholesky(p_matrix), scale={"z": p_matrix.diagonal()})
    state = langevin.init({"z": start}, potential, "dense", batch_ndim=1, precond=precond)
    accepted = 0.0
    for _ in range(10):
        state, info = langevin.step(state, potential, 0.3, adjust=True, batch_ndim=1)
        accepted += info.accepted.float().mean().item() / 10
    assert 0.1 < accepted < 0.9  # the test is not vacuous: chains move and are rejected
    z = state.position["z"]
    sample = torch.cov(z.T)
    mcse = ((cov.diagonal()[:, None] * cov.diagonal()[None, :] + cov.square()) / n).sqrt()
    assert torch.all((sample - cov).abs() < 5 * mcse), (sample, cov)


def test_dense_proposal_and_density_match_the_formula():
    """z' = z - η P g + sqrt(2η) L ξ, and log q(z | z') = -(z - z' + ηPg')ᵀP⁻¹(...)/(4η)."""
    torch.manual_seed(1)
    cov = torch.tensor([[2.0, 0.3, 0.1], [0.3, 1.0, 0.2], [0.1, 0.2, 0.5]])
    chol = torch.linalg.cholesky(cov)
    position = {"a": torch.randn(2), "b": torch.randn(())}
    grad = {"a": torch.randn(2), "b": torch.randn(())}
    precond = langevin.init_preconditioner("dense", position)._replace(cholesky=chol)
    state = langevin.LangevinState(position, torch.tensor(0.0), grad, precond, 0)
    noise = {"a": torch.randn(2), "b": torch.randn(())}
    _, _, proposal, _ = langevin.propose(state, 0.3, noise=noise)
    flat = lambda x: langevin.flatten(x, x)  # noqa: E731
    expected = flat(position) - 0.3 * cov @ flat(grad) + (0.6 ** 0.5) * chol @ flat(noise)
    torch.testing.assert_close(flat(proposal), expected)
    diff = flat(position) - flat(proposal) + 0.3 * cov @ flat(grad)
    log_q = langevin._log_proposal(position, proposal, grad, precond, 0.3, 0)
    torch.testing.assert_close(log_q, -(diff @ torch.linalg.solve(cov, diff)) / 1.2)


@pytest.mark.parametrize("kind", ["variance", "dense"])
def test_fit_refuses_the_sampling_preconditioners(kind):
    with pytest.raises(ValueError, match=f"Unknown preconditioner '{kind}'"):
        langevin.check_precondition(kind)
    langevin.check_sampling_precondition(kind, adjust=True)
