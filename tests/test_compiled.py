"""The recorded (torch.jit.trace) local energy equals Pyro's, on later batches too."""
import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch

from pyro_lpc import fit
from pyro_lpc.compiled import CompiledEnergies
from pyro_lpc.potential import ModelEnergy

N = 40
decoder = torch.nn.Linear(2, 3)


def model(x):
    pyro.module("decoder", decoder)
    scale = pyro.param("scale", torch.tensor(0.5), constraint=dist.constraints.positive)
    with pyro.plate("data", x.shape[0], subsample_size=10) as idx:
        z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
        rate = pyro.sample("rate", dist.Gamma(2.0, 1.0))  # constrained: log-Jacobian in the energy
        pyro.sample("x", dist.Normal(decoder(z) * rate[:, None], scale).to_event(1), obs=x[idx])


def energy_for(x, seed):
    pyro.set_rng_seed(seed)
    prototype = poutine.trace(model).get_trace(x)
    energy = ModelEnergy(model, (x,), {}, prototype)
    position = energy.unconstrain({n: prototype.nodes[n]["value"].detach() for n in energy.local})
    return energy, position


def value_and_grad(fn, position):
    leaves = {k: v.detach().requires_grad_(True) for k, v in position.items()}
    value = fn(leaves)
    return value.detach(), torch.autograd.grad(value.sum(), list(leaves.values()))


def test_the_recorded_energy_equals_pyros_on_later_batches_and_after_parameter_updates():
    compiled = CompiledEnergies()
    gen = torch.Generator().manual_seed(0)
    for batch in range(3):
        x = torch.randn(N, 3, generator=gen)  # new data and new subsample indices each batch
        energy, position = energy_for(x, seed=batch)
        u_ref, g_ref = value_and_grad(energy.local_energy({}), position)
        u_jit, g_jit = value_and_grad(compiled(energy, {}), position)
        assert torch.allclose(u_ref, u_jit, atol=1e-5), batch
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(g_ref, g_jit)), batch
        with torch.no_grad():  # an optimiser step moves the parameters in place
            decoder.weight.add_(0.1)
            pyro.param("scale").unconstrained().add_(0.2)
    assert len(compiled.recorded) == 1  # one recording served all three batches


def test_fit_with_jit_compile_follows_the_same_chains():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(N, 3, generator=gen)

    def run(jit):
        pyro.clear_param_store()
        torch.manual_seed(0)
        decoder.reset_parameters()
        result = fit(model, None, [(x,)] * 4, num_steps=5, step_size=0.05, seed=2, progress=False,
                     jit_compile=jit, optim=pyro.optim.Adam({"lr": 1e-2}))
        return result["log_joint"], decoder.weight.detach().clone()

    (lj_ref, w_ref), (lj_jit, w_jit) = run(False), run(True)
    assert lj_jit == __import__("pytest").approx(lj_ref, rel=1e-4)
    assert torch.allclose(w_ref, w_jit, atol=1e-5)
