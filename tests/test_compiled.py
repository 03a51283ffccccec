"""The recorded (make_fx) local energy and gradient equal Pyro's, on later batches too, as
recorded and compiled with torch.compile."""
import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch

from pyro_lpc import fit, langevin
from pyro_lpc.compiled import MANY_RECORDINGS, CompiledEnergies
from pyro_lpc.potential import SplitEnergy

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
    energy = SplitEnergy(model, (x,), {}, prototype)
    position = energy.unconstrain({n: prototype.nodes[n]["value"].detach() for n in energy.local})
    return energy, position


@pytest.mark.parametrize("options", [None, pytest.param({}, marks=pytest.mark.slow)], ids=["recorded", "compiled"])
def test_the_recorded_energy_equals_pyros_on_later_batches_and_after_parameter_updates(options):
    compiled = CompiledEnergies(options)
    gen = torch.Generator().manual_seed(0)
    for batch in range(3):
        x = torch.randn(N, 3, generator=gen)  # new data and new subsample indices each batch
        energy, position = energy_for(x, seed=batch)
        u_ref, g_ref = langevin.value_and_grad(energy.local_energy({}))(position)
        (u_rec, g_rec), _ = compiled.evaluation(energy, {}, move_globals=False)(position, {})
        assert not any(t.requires_grad for t in position.values())  # the caller's chain state is left alone
        assert torch.allclose(u_ref, u_rec, atol=1e-5), batch
        assert set(g_rec) == set(g_ref) == {"z", "rate"}
        assert all(torch.allclose(g_ref[k], g_rec[k], atol=1e-5) for k in g_ref), batch
        with torch.no_grad():  # an optimiser step moves the parameters in place ...
            decoder.weight.add_(0.1)
        # ... and loading a checkpoint replaces them: the recording must read the new tensor
        pyro.get_param_store()["scale"] = pyro.param("scale").detach() + 0.2
    assert len(compiled.recorded) == 1  # one recording served all three batches


@pytest.mark.parametrize("options", [None, pytest.param({}, marks=pytest.mark.slow)], ids=["recorded", "compiled"])
def test_the_recorded_theta_gradient_equals_pyros_and_leaves_unused_parameters_out(options):
    def with_unused(x):
        pyro.param("unused", torch.zeros(2))  # in the trace, not in the log-joint: no gradient
        return model(x)

    compiled = CompiledEnergies(options)
    gen = torch.Generator().manual_seed(4)
    for batch in range(3):
        x = torch.randn(N, 3, generator=gen)
        pyro.set_rng_seed(batch)
        prototype = poutine.trace(with_unused).get_trace(x)
        energy = SplitEnergy(with_unused, (x,), {}, prototype)
        values = {n: prototype.nodes[n]["value"].detach() for n in ("z", "rate")}
        log_p, trace = energy.log_joint(values)
        names = [n for n, site in trace.nodes.items() if site["type"] == "param"]
        params = [trace.nodes[n]["value"].unconstrained() for n in names]
        reference = torch.autograd.grad(log_p, params, allow_unused=True)
        rec_log_p, rec_params, rec_grads, _ = compiled.theta_loss_and_grad(energy, values, num_samples=2)
        assert torch.allclose(rec_log_p, log_p.detach(), rtol=1e-5)
        assert set(rec_params) == set(names) and all(rec_params[n] is p for n, p in zip(names, params))
        by_name = dict(zip(rec_params, rec_grads))
        assert by_name["unused"] is None and reference[names.index("unused")] is None
        for name, g in zip(names, reference):
            if g is not None:
                assert torch.allclose(by_name[name], -g / 2, rtol=1e-5, atol=1e-6), (batch, name)  # of -log p / 2
        with torch.no_grad():
            decoder.bias.add_(0.1)
        pyro.get_param_store()["scale"] = pyro.param("scale").detach() * 1.5
    assert len(compiled.recorded) == 1


def test_jit_compile_must_be_a_bool_and_jit_options_torch_compile_options():
    with pytest.raises(TypeError, match="jit_compile must be True or False"):
        fit(model, None, [(torch.randn(N, 3),)], jit_compile="inductor", progress=False)
    with pytest.raises(TypeError, match="jit_options must be a dict"):
        fit(model, None, [(torch.randn(N, 3),)], jit_compile=True, jit_options="inductor", progress=False)


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
    assert lj_jit == pytest.approx(lj_ref, rel=1e-4)
    assert torch.allclose(w_ref, w_jit, atol=1e-5)


def test_a_model_without_parameters_runs_alike_recorded():
    def no_params(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, 0.5), obs=x)

    x = torch.randn(20, generator=torch.Generator().manual_seed(5))
    runs = [fit(no_params, None, [(x,)] * 3, num_steps=3, progress=False, seed=0, jit_compile=jit)["log_joint"]
            for jit in (False, True)]
    assert runs[1] == pytest.approx(runs[0], rel=1e-5)


def test_tensors_inside_container_arguments_are_inputs_and_changing_scalars_warn():
    def listed(batch, offset):
        x = batch["x"][0]
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("obs", dist.Normal(z + offset, 0.5), obs=x)

    compiled = CompiledEnergies()
    gen = torch.Generator().manual_seed(6)

    def check(offset):
        args = ({"x": [torch.randn(10, generator=gen)]}, offset)  # new data inside a dict and a list
        energy = SplitEnergy(listed, args, {}, poutine.trace(listed).get_trace(*args))
        position = {"z": torch.randn(10, generator=gen)}
        u_ref, g_ref = langevin.value_and_grad(energy.local_energy({}))(position)
        (u_rec, g_rec), _ = compiled.evaluation(energy, {}, move_globals=False)(position, {})
        assert torch.allclose(u_rec, u_ref, atol=1e-5) and torch.allclose(g_rec["z"], g_ref["z"], atol=1e-5)

    for _ in range(3):
        check(0.5)
    assert len(compiled.recorded) == 1  # one recording read each batch's data
    with pytest.warns(RuntimeWarning, match="keeps changing value"):
        for offset in range(MANY_RECORDINGS):  # a new scalar value: a new recording each time
            check(float(offset))
    assert len(compiled.recorded) == MANY_RECORDINGS + 1


@pytest.mark.parametrize("options", [None, pytest.param({}, marks=pytest.mark.slow)], ids=["recorded", "compiled"])
def test_a_scale_read_from_python_state_is_an_input_of_the_recording(options):
    """An annealed β (poutine.scale from a module-level value) changes between batches of one
    shape: the recordings must follow it (the issue's case: recorded -11.48, Pyro -19.23)."""
    annealing = {"beta": 0.1}

    def annealed(x):
        loc = pyro.param("loc", torch.tensor(0.3))
        with pyro.plate("data", x.shape[0], subsample_size=10) as idx:
            with poutine.scale(scale=annealing["beta"]):
                z = pyro.sample("z", dist.Normal(loc, 1.0))
            pyro.sample("x", dist.Normal(z, 0.5), obs=x[idx])

    x = torch.randn(N, generator=torch.Generator().manual_seed(7))
    compiled = CompiledEnergies(options)
    for beta in (0.1, 1.0, 0.37):
        annealing["beta"] = beta
        prototype = poutine.trace(annealed).get_trace(x)
        energy = SplitEnergy(annealed, (x,), {}, prototype)
        position = {"z": prototype.nodes["z"]["value"].detach()}
        u_ref, g_ref = langevin.value_and_grad(energy.local_energy({}))(position)
        (u_rec, g_rec), _ = compiled.evaluation(energy, {}, move_globals=False)(position, {})
        assert torch.allclose(u_rec, u_ref, atol=1e-5) and torch.allclose(g_rec["z"], g_ref["z"], atol=1e-5)
        log_p, params, grads, _ = compiled.theta_loss_and_grad(energy, position)
        ref_p, _ = energy.log_joint(position)
        (ref_g,) = torch.autograd.grad(ref_p, [pyro.param("loc").unconstrained()])
        assert torch.allclose(log_p, ref_p.detach(), atol=1e-4) and torch.allclose(grads[0], -ref_g, atol=1e-4)
    assert len(compiled.recorded) == 2  # one recording each for the chains and θ, whatever β is


def test_fit_with_jit_compile_follows_an_annealed_scale():
    """fit(jit_compile=True) and fit through Pyro agree while β changes from batch to batch
    (checked to fail when the recording bakes β in)."""
    annealing = {"beta": 0.1}

    def annealed(x):
        loc = pyro.param("loc", torch.tensor(0.3))
        with pyro.plate("data", x.shape[0]):
            with poutine.scale(scale=annealing["beta"]):
                z = pyro.sample("z", dist.Normal(loc, 1.0))
            pyro.sample("x", dist.Normal(z, 0.5), obs=x)

    x = torch.randn(N, generator=torch.Generator().manual_seed(8))

    def batches():  # the user's schedule sets β before each batch
        for beta in (0.1, 0.4, 0.7, 1.0):
            annealing["beta"] = beta
            yield (x,)

    runs = []
    for jit in (False, True):
        pyro.clear_param_store()
        runs.append(fit(annealed, None, batches(), num_steps=3, step_size=0.05, seed=0, progress=False,
                        jit_compile=jit, optim=pyro.optim.Adam({"lr": 1e-2}))["log_joint"])
    assert runs[1] == pytest.approx(runs[0], rel=1e-4)
