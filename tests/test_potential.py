"""``ModelEnergy``: per-data-point energies of a Pyro model, checked by hand."""
import math

import pyro
import pyro.distributions as dist
import torch

import pyro.poutine as poutine
from pyro.infer.autoguide.initialization import InitMessenger, init_to_value

from pyro_lpc import fit, langevin
from pyro_lpc.potential import ModelEnergy, batch_shapes

B, F = 5, 3


def nested_model(x):
    """Two local sites (one positive), a nested plate over features, a global site."""
    w = pyro.param("w", torch.linspace(0.5, 1.5, F))
    g = pyro.sample("g", dist.Normal(0.0, 1.0))
    with pyro.plate("data", x.shape[0], dim=-2):
        z = pyro.sample("z", dist.Normal(g, 1.0))                       # (B, 1)
        s = pyro.sample("s", dist.LogNormal(0.0, 0.5))                  # (B, 1), positive
        with pyro.plate("features", F, dim=-1):
            pyro.sample("x", dist.Normal(w * z, s), obs=x)              # (B, F)


def energy_and_values():
    x = torch.randn(B, F, generator=torch.Generator().manual_seed(0))
    values = {"g": torch.tensor(0.3), "z": torch.randn(B, 1), "s": torch.rand(B, 1) + 0.5}
    # latent sites keep their values but stay latent (conditioning would make them observed)
    trace = poutine.trace(InitMessenger(init_to_value(values=values))(nested_model)).get_trace(x)
    return x, values, ModelEnergy(nested_model, (x,), {}, trace)


def test_local_and_global_sites_and_the_data_plate():
    _, _, energy = energy_and_values()
    assert energy.plate.name == "data"
    assert sorted(energy.local) == ["s", "z"] and energy.globals == ["g"]
    assert energy.chain_axis == {"z": 0, "s": 0}


def test_per_point_energy_with_nested_plates_and_a_jacobian_matches_a_hand_computation():
    x, values, energy = energy_and_values()
    local = energy.unconstrain({k: values[k] for k in ("z", "s")})
    assert torch.allclose(local["s"], values["s"].log())  # LogNormal support: u = log s
    u = energy.local_energy({"g": values["g"]})(local)
    w = pyro.param("w").detach()
    z, s = values["z"], values["s"]
    by_hand = -(
        dist.Normal(values["g"], 1.0).log_prob(z).squeeze(-1)
        + dist.LogNormal(0.0, 0.5).log_prob(s).squeeze(-1) + s.log().squeeze(-1)  # + log|ds/du|
        + dist.Normal(w * z, s).log_prob(x).sum(-1)
    )
    assert u.shape == (B,)
    assert torch.allclose(u, by_hand, atol=1e-5)


def test_fit_learns_a_model_with_several_local_sites_and_nested_plates():
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(300, 1, generator=gen)
    x = z * torch.tensor([2.0, -1.0, 0.5]) + 0.3 * torch.randn(300, F, generator=gen)
    result = fit(nested_model, None, [(x[i:i + 100],) for i in range(0, 300, 100)] * 1, num_epochs=8,
                 num_steps=10, step_size=0.02, seed=0, progress=False,
                 optim=pyro.optim.Adam({"lr": 5e-2}))
    first, last = result["log_joint"][:3], result["log_joint"][-3:]
    assert sum(last) / 3 > sum(first) / 3 + 0.5
    assert all(math.isfinite(v) for v in result["log_joint"])


def subsampled_model(x):
    """Every sample site inside the data plate, subsampled (scale N/B), real-valued latents whose
    data dimension is not the first (chain axis 1)."""
    w = pyro.param("w", torch.linspace(0.5, 1.5, F))
    with pyro.plate("data", x.shape[1], subsample_size=B, dim=-1) as idx:
        z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([2, B]))                 # (2, B)
        pyro.sample("x", dist.Normal(w[:, None] * z.sum(0), 1.0), obs=x[:, idx])   # (F, B)


def test_log_joint_from_the_chains_start_energy_equals_the_models_value_and_guide_gradient():
    x = torch.randn(F, 40, generator=torch.Generator().manual_seed(3))
    pyro.set_rng_seed(0)
    prototype = poutine.trace(subsampled_model).get_trace(x)
    energy = ModelEnergy(subsampled_model, (x,), {}, prototype)
    assert energy.chain_axis == {"z": 1} and energy.energy_scale == 40 / B
    loc = torch.randn(2, B, requires_grad=True)  # a guide's parameter, reaching z through its draw
    values = {"z": loc + 0.3 * torch.randn(2, B)}
    u0, g0 = langevin.value_and_grad(energy.local_energy({}))(energy.unconstrain({"z": values["z"].detach()}))
    reference = energy.log_joint(values)[0]
    reused = energy.log_joint_from_energy(values, u0, g0)
    assert torch.allclose(reused, reference, rtol=1e-6)
    grad_ref, = torch.autograd.grad(reference, [loc])
    grad_reused, = torch.autograd.grad(reused, [loc])
    assert torch.allclose(grad_reused, grad_ref, rtol=1e-5, atol=1e-5)


def test_log_joint_from_energy_is_refused_where_it_would_be_inexact():
    _, _, energy = energy_and_values()  # a global latent and a positive (Jacobian) local latent
    assert energy.energy_scale is None

    def outside(x):  # an observed site outside the data plate
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)
        pyro.sample("total", dist.Normal(z.sum(), 1.0), obs=torch.tensor(0.0))

    x = torch.randn(B)
    assert ModelEnergy(outside, (x,), {}, poutine.trace(outside).get_trace(x)).energy_scale is None


def test_batches_share_a_model_structure_only_with_equal_shapes_and_scalar_arguments():
    x = torch.zeros(B, F)
    assert batch_shapes((x, 100), {"n": 3}) == batch_shapes((torch.ones(B, F), 100), {"n": 3})
    # a plate's full size passed as an argument changes the scale N/B: no reuse across it
    assert batch_shapes((x, 100), {}) != batch_shapes((x, 200), {})
    assert batch_shapes((x,), {"n": 3}) != batch_shapes((x,), {"n": 4})
    assert batch_shapes((x,), {}) != batch_shapes((torch.zeros(B + 1, F),), {})


def test_a_tensor_scale_or_a_plain_bool_mask():
    x = torch.randn(B)

    def scaled(x):  # a tensor scale may change between batches of equal shapes: no energy_scale
        with poutine.scale(scale=torch.tensor(0.5)), pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    assert ModelEnergy(scaled, (x,), {}, poutine.trace(scaled).get_trace(x)).energy_scale is None

    def masked(x):  # poutine.mask also takes a plain bool
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            with poutine.mask(mask=False):
                pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    energy = ModelEnergy(masked, (x,), {}, poutine.trace(masked).get_trace(x))
    z = torch.randn(B)
    assert torch.allclose(energy.local_energy({})({"z": z}), -dist.Normal(0.0, 1.0).log_prob(z))
