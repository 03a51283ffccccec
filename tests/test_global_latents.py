"""Models with global latents out of the box: Pyro's sparse gamma DEF example (Gamma latents,
global weights) trains with fit's default settings; divergent Langevin steps are rejected,
reported and make η smaller instead of ending the run; target_accept_prob works with globals."""
import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_lpc import fit, langevin


class SparseGammaDEF:
    """Pyro's examples/sparse_gamma_def.py model and its hand-written mean-field guide, with
    smaller layers (the example: 100-40-15 over 64×64 images; here 10-6-4 over 64 pixels)."""

    top, mid, bottom, pixels = 10, 6, 4, 64
    alpha_z, beta_z, alpha_w, beta_w = 0.1, 0.1, 0.1, 0.3

    def model(self, x):
        with pyro.plate("w_top_plate", self.top * self.mid):
            w_top = pyro.sample("w_top", dist.Gamma(self.alpha_w, self.beta_w))
        with pyro.plate("w_mid_plate", self.mid * self.bottom):
            w_mid = pyro.sample("w_mid", dist.Gamma(self.alpha_w, self.beta_w))
        with pyro.plate("w_bottom_plate", self.bottom * self.pixels):
            w_bottom = pyro.sample("w_bottom", dist.Gamma(self.alpha_w, self.beta_w))
        with pyro.plate("data", x.shape[0]):
            z_top = pyro.sample("z_top", dist.Gamma(self.alpha_z, self.beta_z).expand([self.top]).to_event(1))
            mean_mid = z_top @ w_top.reshape(self.top, self.mid)
            z_mid = pyro.sample("z_mid", dist.Gamma(self.alpha_z, self.beta_z / mean_mid).to_event(1))
            mean_bottom = z_mid @ w_mid.reshape(self.mid, self.bottom)
            z_bottom = pyro.sample("z_bottom", dist.Gamma(self.alpha_z, self.beta_z / mean_bottom).to_event(1))
            mean_obs = z_bottom @ w_bottom.reshape(self.bottom, self.pixels)
            pyro.sample("obs", dist.Poisson(mean_obs).to_event(1), obs=x)

    def guide(self, x):
        softplus = torch.nn.functional.softplus

        def gamma(name, shape):
            alpha = pyro.param(f"alpha_{name}", lambda: 0.5 + 0.1 * torch.randn(shape))
            mean = pyro.param(f"mean_{name}", lambda: 0.1 * torch.randn(shape))
            alpha, mean = softplus(alpha), softplus(mean)
            return dist.Gamma(alpha, alpha / mean)

        for name, size in (("top", self.top * self.mid), ("mid", self.mid * self.bottom),
                           ("bottom", self.bottom * self.pixels)):
            with pyro.plate(f"w_{name}_plate", size):
                pyro.sample(f"w_{name}", gamma(f"w_{name}", (size,)))
        with pyro.plate("data", x.shape[0]):
            for name, width in (("top", self.top), ("mid", self.mid), ("bottom", self.bottom)):
                pyro.sample(f"z_{name}", gamma(f"z_{name}", (x.shape[0], width)).to_event(1))


def faces():
    pyro.set_rng_seed(0)
    return dist.Poisson(3.0 * torch.rand(64, SparseGammaDEF.pixels)).sample()


@pytest.mark.parametrize("with_guide", [False, True], ids=["prior starts", "the example's guide"])
def test_sparse_gamma_def_trains_with_default_settings(with_guide):
    """Before: prior starts stopped with NonFiniteError at iteration 1 (Gamma draws underflow to
    0, whose log is -inf, and the first joint steps overflowed)."""
    sgdef = SparseGammaDEF()
    x = faces()
    result = fit(sgdef.model, sgdef.guide if with_guide else None, x, batch_size=64, num_epochs=30,
                 progress=False, seed=0)
    log_joint = result["log_joint"]
    assert all(torch.isfinite(torch.tensor(log_joint)))
    assert sum(log_joint[-5:]) / 5 > sum(log_joint[:5]) / 5  # the chains climb towards the posterior
    divergent = [row for row in result.history if row["divergences"]]
    # every iteration with divergent steps halves η for the next one
    for row in divergent:
        following = result.history[row["iteration"] + 1:row["iteration"] + 2]
        assert not following or following[0]["step_size"] == pytest.approx(row["step_size"] / 2)
    if not with_guide:
        assert divergent  # from the prior, the default η = 0.01 is too large at first


def test_target_accept_runs_with_the_global_weights_moving():
    sgdef = SparseGammaDEF()
    result = fit(sgdef.model, sgdef.guide, faces(), batch_size=64, num_epochs=10, target_accept_prob=0.574,
                 progress=False, seed=0)
    assert all(0.0 <= a <= 1.0 for a in result["accept_rate"])
    assert len(set(result["step_size"])) > 1  # η moved with the acceptance


def test_a_divergent_unadjusted_step_is_rejected_and_reported():
    """ULA proposals whose potential is not finite leave their chain where it was (before: the
    chain carried NaN on)."""
    def potential(p):  # N(0, 1) truncated to |z| < 1: infinite energy beyond
        z = p["z"]
        return (0.5 * z.square() + torch.where(z.abs() < 1.0, 0.0, torch.inf)).sum(-1)

    vag = langevin.value_and_grad(potential)
    torch.manual_seed(0)
    state = langevin.init({"z": torch.zeros(500, 1)}, vag, None, batch_ndim=1)
    new, info = langevin.step(state, vag, 0.5, adjust=False, batch_ndim=1)
    assert info.diverged.any() and (~info.diverged).any()  # η = 0.5: some proposals land beyond 1
    assert torch.equal(info.accepted, ~info.diverged)
    stayed = info.diverged
    assert torch.equal(new.position["z"][stayed], state.position["z"][stayed])
    assert torch.isfinite(new.position["z"]).all() and torch.isfinite(new.potential).all()
