"""Persistent chains (``persistent_chains=True``): each data point's chain state kept by dataset index."""
import os
import subprocess
import sys
import textwrap

import arviz as az
import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.autoguide import AutoNormal

from pyro_lpc import LPC, fit
from test_schedule import vae_guide, vae_model

N = 24
SPREAD = torch.linspace(-20.0, 20.0, N)  # each point's posterior sits at its own x (sd 0.1), far from the others


def far_apart(x):
    """z_i ~ N(0, 30²), x_i ~ N(z_i, 0.1²): point i's posterior is N(≈x_i, ≈0.1²)."""
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(0.0, 30.0))
        pyro.sample("x", dist.Normal(z, 0.1), obs=x)


# two unadjusted steps of η = 0.005, unpreconditioned: the distance to a point's posterior shrinks
# 4-fold per visit, so a chain that starts afresh (or from another point's state) stays O(1-10) away
# from it after any number of epochs; only one carried through the epochs reaches it
SLOW_CHAINS = dict(num_steps=2, step_size=0.005, precondition=None, optim=pyro.optim.Adam({"lr": 0.0}))


def stored(store):
    assert bool(store["seen"].all())
    return store["positions"]["z"]


def test_state_follows_its_data_point_through_shuffling():
    one = fit(far_apart, None, SPREAD, batch_size=6, num_epochs=1, seed=0, progress=False, persistent_chains=True,
              **SLOW_CHAINS)
    six = fit(far_apart, None, SPREAD, batch_size=6, num_epochs=6, seed=0, progress=False, persistent_chains=True,
              **SLOW_CHAINS)
    assert (stored(one.sampler_state["chain_store"]) - SPREAD).abs().max() > 5.0  # one visit is not enough
    # after 6 shuffled epochs row i holds a state of point i's posterior (sd 0.1): 12 steps from the
    # prior, 5 sd at most away (another point's state would be at least 1.7 away)
    assert (stored(six.sampler_state["chain_store"]) - SPREAD).abs().max() < 0.5
    # encoder-free, a seen point's chain continues: 4 batches of fresh chains, then all from stored states
    assert six["stored_starts"] == [0.0] * 4 + [1.0] * 20


def test_dataloader_indices_and_a_subsampled_plate_give_the_indices():
    dataset = torch.utils.data.TensorDataset(SPREAD, torch.arange(N))
    loader = torch.utils.data.DataLoader(dataset, batch_size=6, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    result = fit(far_apart, None, loader, num_epochs=6, seed=0, progress=False, persistent_chains=True,
                 batch_args=lambda batch: batch[0], batch_indices=lambda batch: batch[1], **SLOW_CHAINS)
    assert (stored(result.sampler_state["chain_store"]) - SPREAD).abs().max() < 0.5

    def subsampled(x):  # the model picks its mini-batch of the full data: the plate's indices in the trace
        with pyro.plate("data", N, subsample_size=6) as idx:
            z = pyro.sample("z", dist.Normal(0.0, 30.0))
            pyro.sample("x", dist.Normal(z, 0.1), obs=x[idx])

    def guide(x):  # a poor proposal: the Metropolis choice keeps the stored states
        with pyro.plate("data", N, subsample_size=6):
            pyro.sample("z", dist.Normal(0.0, 30.0))

    pyro.set_rng_seed(0)
    lpc = LPC(subsampled, guide, persistent_chains=True, **SLOW_CHAINS)
    for _ in range(40):  # 40 draws of 6 of 24: every point visited at least twice
        lpc.step(SPREAD)
    assert (stored(lpc.chain_store.state_dict()) - SPREAD).abs().max() < 1.0
    assert lpc.chain_store.nbytes == N * 4  # one float32 per point


def linear_gaussian(x):
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z, 0.5), obs=x)


def off_guide(x):  # fixed and wrong: mean shifted by 0.67 posterior sd, wider
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(0.8 * x + 0.3, 0.6))


@pytest.mark.parametrize("num_steps", [0, 3])
def test_metropolis_choice_keeps_the_exact_posterior(num_steps):
    # z ~ N(0, 1), x ~ N(z, 0.5²): p(z | x) = N(0.8 x, 0.2). θ fixed; with K = 0 each visit is the
    # independence Metropolis choice alone (the guide draw vs the stored state), with K = 3 that
    # choice and three MALA steps. Over 400 visits the 40 points' chains, standardised by their exact
    # posterior, have mean 0 and second moment 1 within 5 Monte Carlo standard errors (sd / sqrt(ESS),
    # ESS by ArviZ over the 40 chains). "Whichever has the higher weight" fails this (second moment
    # 0.01, -47 MCSE) and "always the guide draw" too (mean 0.68, +64 MCSE).
    x = 1.5 * torch.randn(40, generator=torch.Generator().manual_seed(0))
    mean, sd = 0.8 * x, 0.2 ** 0.5
    pyro.set_rng_seed(0)
    lpc = LPC(linear_gaussian, off_guide, pyro.optim.Adam({"lr": 0.0}), num_steps=num_steps, step_size=0.1,
              adjust=num_steps > 0, precondition=None, persistent_chains=True)
    draws = []
    for _ in range(400):
        lpc.step(x, data_indices=torch.arange(40))
        draws.append(lpc.chain_store.positions["z"].clone())
    u = ((torch.stack(draws, 1) - mean[:, None]) / sd).numpy()  # (40 chains, 400 visits)
    for values, expected in ((u, 0.0), (u ** 2, 1.0)):
        mcse = values.std() / np.sqrt(float(az.ess(values)))
        assert abs(values.mean() - expected) < 5 * mcse, (values.mean(), expected, mcse)


def test_resume_is_bit_identical(tmp_path):
    x = torch.randn(48, 2, generator=torch.Generator().manual_seed(1))

    def run(epochs, resume, folder):
        pyro.clear_param_store()
        return fit(vae_model, vae_guide, x, batch_size=16, num_epochs=epochs, num_steps=3, seed=5,
                   progress=False, checkpoint_dir=str(folder), resume=resume, persistent_chains=True,
                   optim=pyro.optim.Adam({"lr": 0.05}))

    full = run(4, False, tmp_path / "full")
    params = {k: v.detach().clone() for k, v in pyro.get_param_store().items()}
    run(2, False, tmp_path / "split")
    resumed = run(4, True, tmp_path / "split")  # a fresh param store, as in a new process
    for name, value in params.items():
        assert torch.equal(pyro.param(name).detach(), value), name
    assert resumed["log_joint"] == full["log_joint"]
    a, b = full.sampler_state["chain_store"], resumed.sampler_state["chain_store"]
    assert torch.equal(a["seen"], b["seen"]) and torch.equal(a["positions"]["z"], b["positions"]["z"])


def test_unindexable_setups_and_bad_indices_are_refused():
    batches = [(SPREAD[:6],), (SPREAD[6:12],)]
    with pytest.raises(ValueError, match="data_indices was not passed and the data plate 'data' is not subsampled"):
        fit(far_apart, None, batches, progress=False, persistent_chains=True, **SLOW_CHAINS)
    lpc = LPC(far_apart, None, persistent_chains=True, **SLOW_CHAINS)
    with pytest.raises(ValueError, match=r"one index per data point of the batch \(6\), got torch.int64 of shape \(5,\)"):
        lpc.step(SPREAD[:6], data_indices=torch.arange(5))
    with pytest.raises(ValueError, match="distinct non-negative"):
        lpc.step(SPREAD[:6], data_indices=torch.tensor([0, 1, 2, 3, 4, 4]))
    with pytest.raises(ValueError, match="integer tensor"):
        lpc.step(SPREAD[:6], data_indices=torch.arange(6.0))
    with pytest.raises(ValueError, match="pass persistent_chains=True"):
        fit(far_apart, None, batches, batch_indices=lambda b: b, progress=False)
    with pytest.raises(ValueError, match="knows each row's index"):
        fit(far_apart, None, SPREAD, batch_size=6, persistent_chains=True, batch_indices=lambda b: b, progress=False)
    with pytest.raises(TypeError, match="persistent_chains must be True or False"):
        LPC(far_apart, None, pyro.optim.Adam({}), persistent_chains="yes")
    pyro.clear_param_store()
    with pytest.raises(ValueError, match=r"auxiliary site\(s\) \['z_unconstrained'\]"):
        fit(far_apart, AutoNormal(far_apart), SPREAD, batch_size=6, persistent_chains=True, progress=False)

    def all_global(x):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(mu, 1.0), obs=x)

    with pytest.raises(ValueError, match=r"every latent of the model is global: \['mu'\]"):
        fit(all_global, None, SPREAD, batch_size=6, persistent_chains=True, progress=False)


def test_without_persistent_chains_data_indices_reach_the_model():
    seen = []

    def model(x, data_indices):
        seen.append(data_indices)
        far_apart(x)

    LPC(model, None, pyro.optim.Adam({"lr": 0.0}), num_steps=1).step(SPREAD[:6], data_indices="mine")
    assert set(seen) == {"mine"}


JOB = textwrap.dedent("""
    import os, sys, torch, pyro
    sys.path.insert(0, {tests!r})
    from test_persistent import SPREAD, SLOW_CHAINS, far_apart
    from pyro_lpc import fit
    from pyro_lpc.distributed import finish
    torch.set_num_threads(1)
    result = fit(far_apart, None, SPREAD, batch_size=3, num_epochs=6, seed=0, progress=False,
                 persistent_chains=True, **SLOW_CHAINS)
    torch.save(result.sampler_state["chain_store"], os.path.join(sys.argv[1], os.environ["RANK"] + ".pt"))
    finish()
""")


@pytest.mark.slow
def test_ranks_keep_every_point_of_the_global_batch(tmp_path):
    # 2 gloo ranks, 3 points each per global batch of 6; the shards change every epoch (a global
    # shuffle), so each rank stores the whole global batch's final states (one all-gather)
    script = tmp_path / "job.py"
    script.write_text(JOB.format(tests=os.path.dirname(__file__)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           str(script), str(tmp_path)], capture_output=True, text=True, timeout=180, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"{r}.pt") for r in (0, 1)]
    assert torch.equal(stored(ranks[0]), stored(ranks[1]))
    assert (stored(ranks[0]) - SPREAD).abs().max() < 0.5  # each point's chain carried across ranks and epochs


def test_a_repeated_index_keeps_its_first_row():
    """A DistributedSampler pads the last shards with repeated indices: the store keeps the first
    row of each, the same on every rank, instead of an undefined one of the indexed write."""
    from pyro_lpc.persistent import ChainStore

    store = ChainStore()
    store.update(torch.tensor([2, 0, 2, 0]), {"z": torch.tensor([[1.0], [2.0], [3.0], [4.0]])})
    assert store.positions["z"].flatten().tolist() == [2.0, 0.0, 1.0]
