"""Adaptive inference in fit: the step schedule, step-size adaptation, K = 0, thinning."""
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO

from pyro_lpc import fit
from pyro_lpc.lpc import LPC, kept_steps
from pyro_lpc.schedule import AdaptiveSteps, StepSizeAdaptation, steps_schedule


# -- the schedule responds to its signal as documented ----------------------------------
def test_steps_double_while_the_late_drop_exceeds_the_tolerance_and_halve_below_half_of_it():
    steps = AdaptiveSteps(max_steps=16, initial=2, tolerance=1.0)
    assert [steps.update(3.0) for _ in range(4)] == [4, 8, 16, 16]  # capped at max_steps
    assert steps.update(0.7) == 16  # between tolerance/2 and tolerance: unchanged
    assert [steps.update(0.2) for _ in range(6)] == [8, 4, 2, 1, 0, 0]  # down to min_steps = 0
    assert AdaptiveSteps(max_steps=16, min_steps=2, initial=2).update(0.0) == 2


def test_at_zero_steps_a_probe_runs_every_probe_every_iterations_and_can_restart_the_chains():
    steps = AdaptiveSteps(max_steps=8, initial=0, tolerance=1.0, probe_every=5, probe_steps=3)
    ks = [steps(i) for i in range(15)]
    assert ks == [0, 0, 0, 0, 3] * 3
    steps.update(2.0)  # the probe found the chains still lowering the energy
    assert steps(15) == 1 and steps.update(2.0) == 2


def test_a_zero_step_probe_restarts_from_one_step():
    steps = AdaptiveSteps(max_steps=8, initial=0, tolerance=1.0)
    assert steps.update(5.0) == 1


def test_schedule_arguments_are_checked():
    assert steps_schedule(5).steps == 5 and steps_schedule("auto").max_steps == 20
    for bad in (-1, 2.5, "many", True):
        with pytest.raises(ValueError, match="num_steps"):
            steps_schedule(bad)
    with pytest.raises(ValueError, match="min_steps"):
        AdaptiveSteps(max_steps=4, min_steps=5)
    with pytest.raises(ValueError, match="tolerance"):
        AdaptiveSteps(tolerance=0.0)
    with pytest.raises(ValueError, match="target_accept"):
        StepSizeAdaptation(0.1, target=1.5)


def test_step_size_moves_towards_the_target_acceptance():
    adapt = StepSizeAdaptation(0.1, target=0.6, gain=0.5)
    assert adapt.update(0.9) > 0.1  # accepting too often: larger steps
    adapt = StepSizeAdaptation(0.1, target=0.6, gain=0.5)
    assert adapt.update(0.2) < 0.1
    assert adapt.update(float("nan")) == adapt.step_size  # no information, no move


def test_keep_selects_steps_and_falls_back_to_the_last():
    assert kept_steps("all", 4) == {1, 2, 3, 4}
    assert kept_steps("last", 4) == {4}
    assert kept_steps(2, 4) == {3, 4}
    assert kept_steps(6, 4) == {4}  # a burn-in beyond a short (adaptive) chain keeps the last
    assert kept_steps(slice(4, None, 5), 20) == {5, 10, 15, 20}  # every 5th
    assert kept_steps(slice(4, None, 5), 3) == {3}


# -- the schedule inside fit: a linear-Gaussian model with a fixed guide -----------------
S = 0.5  # x = z + S ε, z ~ N(0, 1): posterior N(x / (1 + S²), S² / (1 + S²))


def model(x):
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z, S), obs=x)


def fixed_guide(shift):
    def guide(x):
        pyro.param("unused", torch.tensor(0.0))  # a φ the (zero-lr) optimiser never moves
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(x / (1 + S**2) + shift, math.sqrt(S**2 / (1 + S**2))))
    return guide


def run_auto(shift):
    x = torch.randn(400, generator=torch.Generator().manual_seed(0)) * math.sqrt(1 + S**2)
    schedule = AdaptiveSteps(max_steps=16, tolerance=1.0, probe_every=4, probe_steps=4)
    result = fit(model, fixed_guide(shift), [(x,)] * 30, num_steps=schedule, step_size=0.05, seed=0,
                 progress=False, guide_optim=pyro.optim.SGD({"lr": 0.0}), warm_start="reverse")
    return result


def test_with_the_exact_posterior_as_guide_the_steps_go_to_zero_and_only_probes_run():
    # chains started from exact posterior draws do not lower the energy: the late drop
    # is Monte Carlo noise, sd ≈ sqrt(1/2 / 400) ≈ 0.04 nats, far below tolerance / 2
    result = run_auto(shift=0.0)
    ks = result["num_steps"]
    assert ks[:5] == [16, 8, 4, 2, 1]
    assert set(ks[6:]) <= {0, 4} and ks.count(4) >= 4  # probes only, each sending K back to 0
    assert all(abs(d) < 0.5 for d in result["late_energy_drop"] if d is not None)


def test_with_a_poor_guide_the_steps_stay_at_the_maximum():
    # draws 4 posterior sds off: a chain lowers the energy by ~ (shift / sd)² / 2 = 8 nats
    # per point, and by 1.8-2.2 (measured; sd ~0.1) in its second half at K = 16, η = 0.05
    result = run_auto(shift=4.0 * math.sqrt(S**2 / (1 + S**2)))
    assert set(result["num_steps"]) == {16}
    assert min(result["late_energy_drop"]) > 1.0


# -- K = 0: θ steps on the guide's draws -------------------------------------------------
def vae_model(x):
    w = pyro.param("w", torch.tensor([1.0, -0.5]))
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z[:, None] * w, 0.3).to_event(1), obs=x)


def vae_guide(x):
    a = pyro.param("a", torch.zeros(2))
    scale = pyro.param("scale", torch.tensor(1.0), constraint=dist.constraints.positive)
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(x @ a, scale))


def batches():
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(300, generator=gen)
    x = z[:, None] * torch.tensor([2.0, 1.0]) + 0.3 * torch.randn(300, 2, generator=gen)
    return [(x[i:i + 50],) for i in range(0, 300, 50)]


def params():
    return {k: v.detach().clone() for k, v in pyro.get_param_store().items()}


def test_zero_steps_with_the_reverse_objective_is_pyros_vae():
    # one guide draw per iteration, θ and φ stepped on the negative ELBO at it: SVI(Trace_ELBO)
    fit(vae_model, vae_guide, batches(), num_steps=0, warm_start="reverse", seed=3, progress=False,
        optim=pyro.optim.SGD({"lr": 2e-4}), guide_optim=pyro.optim.SGD({"lr": 2e-4}), num_epochs=2)
    ours = params()
    pyro.clear_param_store()
    pyro.set_rng_seed(3)
    svi = SVI(vae_model, vae_guide, pyro.optim.SGD({"lr": 2e-4}), Trace_ELBO())
    for _ in range(2):
        for (x,) in batches():
            svi.step(x)
    theirs = params()
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.allclose(ours[name], theirs[name], atol=1e-6), (name, ours[name], theirs[name])
    assert not torch.allclose(ours["w"], torch.tensor([1.0, -0.5]))


def test_the_fused_zero_step_gradients_equal_the_separate_ones(monkeypatch):
    def run():
        pyro.clear_param_store()
        result = fit(vae_model, vae_guide, batches(), num_steps=0, seed=4, progress=False)
        return params(), result["log_joint"], result["guide_loss"]

    fused = run()
    monkeypatch.setattr(LPC, "_fused_gradients", lambda *args: None)
    separate = run()
    for name in fused[0]:
        assert torch.allclose(fused[0][name], separate[0][name], atol=1e-6), name
    assert fused[1] == pytest.approx(separate[1], rel=1e-6)
    assert fused[2] == pytest.approx(separate[2], rel=1e-6)


# -- step-size adaptation inside fit ------------------------------------------------------
def test_the_step_size_settles_where_the_acceptance_rate_meets_the_target():
    x = torch.randn(200, generator=torch.Generator().manual_seed(2)) * math.sqrt(1 + S**2)
    result = fit(model, None, [(x,)] * 150, num_steps=10, step_size=2.0, target_accept_prob=0.6, seed=0,
                 progress=False, precondition=None, adjust=True)
    rates, sizes = result["accept_rate"], result["step_size"]
    # after settling, each rate averages 10 steps x 200 chains; its spread across
    # iterations is ~0.01 (measured), so the mean of the last 50 is within 0.02 of the target
    assert abs(sum(rates[-50:]) / 50 - 0.6) < 0.02
    # fixed-η runs of the same chains accept 0.66 at η = 0.3 and 0.51 at η = 0.4 (measured,
    # ±0.01): started at η = 2, the adaptation must have come down to between them
    assert 0.3 < sizes[-1] < 0.4, sizes[-1]


def test_target_accept_adapts_the_local_step_size_with_global_latents_present():
    """The local chains' acceptance (energies at the moved global value) drives η as without
    globals: z_i's conditional posterior does not depend on μ's value, so η settles in the
    same bracket as the local-only test above (before: target_accept was refused here)."""
    def hierarchical(x):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(mu, 1.0))
            pyro.sample("x", dist.Normal(z, S), obs=x)

    x = torch.randn(200, generator=torch.Generator().manual_seed(2)) * math.sqrt(1 + S**2)
    result = fit(hierarchical, None, [(x,)] * 150, num_steps=10, step_size=2.0, target_accept_prob=0.6, seed=0,
                 progress=False, precondition=None)
    rates, sizes = result["accept_rate"], result["step_size"]
    assert abs(sum(rates[-50:]) / 50 - 0.6) < 0.02  # as above: spread of the mean ~0.01
    assert 0.3 < sizes[-1] < 0.4, sizes[-1]


def test_zero_steps_need_a_reverse_kl_term():
    x = torch.zeros(4, 2)
    with pytest.raises(ValueError, match="num_steps=0 with encoder-free"):
        fit(vae_model, None, [(x,)], num_steps=0, progress=False)
    with pytest.raises(ValueError, match="num_steps=0 with warm_start='forward'"):
        fit(vae_model, vae_guide, [(x,)], num_steps=0, warm_start="forward", progress=False)
    schedule = AdaptiveSteps(max_steps=4, initial=0)
    result = fit(vae_model, None, [(x,)] * 3, num_steps=schedule, progress=False)
    assert min(result["num_steps"]) >= 1  # the run keeps at least one step ...
    assert (schedule.min_steps, schedule.steps) == (0, 0)  # ... without changing the user's object


def test_a_users_adaptive_steps_object_carries_no_state_into_the_next_run():
    """Before: fit updated the AdaptiveSteps it was given, so a second run started where the
    first left off (here K = 1 instead of the initial 8)."""
    x = torch.randn(16, generator=torch.Generator().manual_seed(3)) * math.sqrt(1 + S**2)
    schedule = AdaptiveSteps(max_steps=8, tolerance=100.0)  # a large tolerance: K halves every iteration
    first = fit(model, None, [(x,)] * 4, num_steps=schedule, seed=0, progress=False)["num_steps"]
    second = fit(model, None, [(x,)] * 4, num_steps=schedule, seed=0, progress=False)["num_steps"]
    assert first == second == [8, 4, 2, 1]
    assert schedule.state_dict() == AdaptiveSteps(max_steps=8, tolerance=100.0).state_dict()


def test_a_bad_keep_slice_is_named_before_training():
    with pytest.raises(ValueError, match="keep=slice"):
        fit(vae_model, vae_guide, [(torch.zeros(4, 2),)], num_steps=5, keep=slice(0, None, 0), progress=False)
