"""``LPC``: one iteration per ``step``, as ``pyro.infer.SVI``; ``fit`` is a loop over it."""
import copy

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_lpc import LPC, fit
from pyro_lpc.distributed import SingleProcess


def model(x):
    w = pyro.param("w", torch.tensor([1.0, -0.5]))
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))                      # a global latent
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(mu, 1.0))
        pyro.sample("x", dist.Normal(z[:, None] * w, 0.5).to_event(1), obs=x)


def guide(x):
    net = pyro.param("net", torch.zeros(2))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(x @ net, 1.0))


def data():
    return torch.randn(48, 2, generator=torch.Generator().manual_seed(0))


def params():
    return {k: v.detach().clone() for k, v in pyro.get_param_store().items()}


def test_lpc_step_equals_fit_for_one_epoch_with_the_same_seed():
    x = data()
    batches = [(b,) for b in x.split(16)]
    result = fit(model, guide, batches, num_steps=4, seed=3, progress=False, optim=pyro.optim.Adam({"lr": 0.05}))
    by_fit = params()

    pyro.clear_param_store()
    _, generator = SingleProcess().streams(3)  # as fit(seed=3): seeds Pyro, a generator for the global noise
    lpc = LPC(model, guide, pyro.optim.Adam({"lr": 0.05}), num_steps=4, generator=generator)
    rows = [lpc.step(b) for (b,) in batches]
    assert [r["log_joint"] for r in rows] == [r["log_joint"] for r in result.history]
    for name, value in params().items():
        assert torch.equal(value, by_fit[name]), name


def test_state_dict_round_trip_resumes_bit_for_bit():
    x = data()
    pyro.set_rng_seed(0)
    lpc = LPC(model, guide, pyro.optim.Adam({"lr": 0.05}), num_steps="auto", target_accept_prob=0.6,
              generator=torch.Generator().manual_seed(0))
    for b in x.split(16):
        lpc.step(b)
    saved = copy.deepcopy((lpc.state_dict(), params(), pyro.get_param_store().get_state(), lpc.optim.get_state(),
                           lpc.guide_optim.get_state(), torch.get_rng_state(), lpc.generator.get_state()))
    continued = [lpc.step(b) for b in x.split(16)]
    after = params()

    # a fresh object restored from the saved state continues identically
    state, _, store, optim_state, guide_optim_state, rng, gen = saved
    pyro.get_param_store().set_state(store)
    restored = LPC(model, guide, pyro.optim.Adam({"lr": 0.05}), num_steps="auto", target_accept_prob=0.6,
                   generator=torch.Generator())
    restored.load_state_dict(state)
    restored.optim.set_state(optim_state)
    restored.guide_optim.set_state(guide_optim_state)
    restored.generator.set_state(gen)
    torch.set_rng_state(rng)
    again = [restored.step(b) for b in x.split(16)]
    assert again == continued
    for name, value in params().items():
        assert torch.equal(value, after[name]), name


def test_fit_steps_a_pyro_lr_scheduler_once_per_epoch():
    """Before: a pyro.optim scheduler passed to fit was never stepped (the rate stayed 0.1)."""
    x = data()
    scheduler = pyro.optim.StepLR({"optimizer": torch.optim.SGD, "optim_args": {"lr": 0.1},
                                   "step_size": 1, "gamma": 0.5})
    fit(model, guide, x, batch_size=16, num_epochs=3, num_steps=2, optim=scheduler, seed=0, progress=False)
    rates = [s.optimizer.param_groups[0]["lr"] for s in scheduler.optim_objs.values()]
    assert rates == pytest.approx([0.1 * 0.5**3])  # θ = w (the guide has its own default optimiser)


def test_one_scheduler_for_theta_and_phi_steps_once_and_plateau_reads_the_epochs_loss():
    """The same scheduler object as optim and guide_optim steps once per epoch; ReduceLROnPlateau
    gets the epoch's mean loss (before: fit crashed on its missing metric after the first epoch)."""
    x = data()
    shared = pyro.optim.StepLR({"optimizer": torch.optim.SGD, "optim_args": {"lr": 0.01}, "step_size": 1,
                                "gamma": 0.5})
    fit(model, guide, x, batch_size=16, num_epochs=2, num_steps=2, optim=shared, guide_optim=shared, seed=0,
        progress=False)
    assert [s.optimizer.param_groups[0]["lr"] for s in shared.optim_objs.values()] == pytest.approx([0.01 / 4] * 2)
    plateau = pyro.optim.ReduceLROnPlateau({"optimizer": torch.optim.SGD, "optim_args": {"lr": 0.01},
                                            "patience": 0, "factor": 0.5, "threshold": 1e9})
    fit(model, guide, x, batch_size=16, num_epochs=3, num_steps=2, optim=plateau, seed=0, progress=False)
    (scheduler,) = plateau.optim_objs.values()
    # stepped once per epoch with a loss; an impossible threshold makes every epoch a plateau
    assert scheduler.last_epoch == 3 and scheduler.optimizer.param_groups[0]["lr"] == pytest.approx(0.01 / 8)


def test_options_are_checked_when_the_object_is_built():
    with pytest.raises(TypeError, match="optim must be a pyro.optim optimiser"):
        LPC(model, guide, torch.optim.Adam)
    with pytest.raises(TypeError, match="jit_options must be a dict"):
        LPC(model, guide, pyro.optim.Adam({}), jit_compile=True, jit_options="inductor")
    with pytest.raises(ValueError, match="pass jit_compile=True too"):
        LPC(model, guide, pyro.optim.Adam({}), jit_options={})
    with pytest.raises(TypeError, match="jit_compile must be True or False"):
        LPC(model, guide, pyro.optim.Adam({}), jit_compile={})
    with pytest.raises(ValueError, match="keep"):
        LPC(model, guide, pyro.optim.Adam({}), keep=-1)
