r"""Vectorised ``PCLangevin`` chains against Pyro's NUTS, side by side (issue 15, item 4).

Run from the repository root::

    python benchmarks/kernel.py                       # about 35 minutes on 2 CPU cores (2 seeds)
    python benchmarks/kernel.py --scale 0.1 --seeds 0 --out /tmp/k.json   # runs, in a minute

Writes ``benchmarks/results/kernel.json`` (``--out``).

Samplers, each through its own driver with the progress bar off:

- ``VectorizedMCMC(PCLangevin(model, precondition=kind), num_chains=C)``, C = 16 and 64: MALA with
  the default ``"variance"`` preconditioner and with ``"dense"`` (the full covariance of all chains'
  draws in the last slow window), all chains in one process and one model evaluation per step
  (``torch.func.vmap`` of the model as written); ``--scale`` x (1,000 warm-up + 1,000 draws) steps;
- Pyro's ``NUTS`` (defaults: adapted step size and diagonal mass matrix, target acceptance 0.8,
  tree depth 10) with ``jit_compile=True`` (1.2-1.7x faster than without on these models here,
  compilation included) through ``pyro.infer.MCMC`` with 1 chain, and with 2 chains
  (``num_chains=2``: Pyro runs them in 2 worker processes when it has the cores, else one after
  the other); ``--scale`` x ``NUTS_ITERATIONS`` (fewer where its trees are deep).

Problems: the 100-d Bayesian logistic regression (1,000 points, ``X @ β``); the 50-d Gaussian
with σ log-spaced in [0.01, 100]; the Gaussian chain of Pyro's HMC tests (10-d, 9 links, one
observation: a random walk whose links are strongly correlated); eight schools, non-centred and
centred (the funnel, where divergences and R-hat must flag trouble); a 10-d multivariate
Student-t with 5 degrees of freedom (heavy tails).

Figures per run: min over coordinates of ArviZ's bulk and tail ESS of all chains together
(summed over chains), divided by the wall time of the whole ``run`` (warm-up and, for 2 NUTS
chains, process start-up included); max R-hat (rank-normalised); divergences after warm-up;
and per 1,000 gradient evaluations (NUTS: leapfrog steps of its 1-chain run, counted in the
process; vectorised: model executions x C, one vmapped execution computing C gradients).
One torch thread per process; every model and sampler run in one process, problems one after
the other, so a change in machine load hits neighbours alike; the load average is recorded.
"""
import argparse
import contextlib
import math
import sys
import time
from pathlib import Path

import arviz
import pyro
import pyro.distributions as dist
import torch
from pyro.infer import MCMC, NUTS
from pyro.infer.mcmc import hmc as hmc_module
from pyro.infer.mcmc import nuts as nuts_module

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import loadavg, machine, results_path, write_results  # noqa: E402

from pyro_lpc import PCLangevin, VectorizedMCMC  # noqa: E402

NUM_DATA, NUM_FEATURES = 1000, 100
GAUSSIAN_DIM, GAUSSIAN_SCALES = 50, (1e-2, 1e2)
GAUSSIAN_SIGMA = torch.logspace(math.log10(GAUSSIAN_SCALES[0]), math.log10(GAUSSIAN_SCALES[1]), GAUSSIAN_DIM)
CHAIN_DIM, CHAIN_LINKS = 10, 9
SCHOOLS_Y = torch.tensor([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0])
SCHOOLS_SIGMA = torch.tensor([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0])
STUDENT_DIM, STUDENT_DF = 10, 5.0
CHAINS = (16, 64)
#: The vectorised chains' preconditioners: the default, and the full covariance from all chains.
KINDS = ("variance", "dense")
#: (warm-up, draws) at --scale 1: every problem's vectorised chains, and NUTS per problem (fewer
#: where its trees are deep, to keep the run under half an hour).
LANGEVIN_STEPS = (1000, 1000)
NUTS_ITERATIONS = {"logistic": (500, 500), "ill": (200, 200), "chain": (300, 300), "schools_noncentred": (500, 500),
                   "schools_centred": (300, 300), "student_t": (500, 500)}


# -- problems -------------------------------------------------------------------------------
def logistic_data(seed: int):
    """Synthetic ``(X, y)``: ``X ~ N(0, 1)``, ``y ~ Bernoulli(sigmoid(X β*))``, ``β* ~ N(0, 0.3²)``."""
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(NUM_DATA, NUM_FEATURES, generator=gen)
    coef = 0.3 * torch.randn(NUM_FEATURES, generator=gen)
    labels = torch.bernoulli(torch.sigmoid(features @ coef), generator=gen)
    return features, labels


def logistic_model(features, labels):
    beta = pyro.sample("beta", dist.Normal(torch.zeros(features.shape[1]), 1.0).to_event(1))
    with pyro.plate("data", features.shape[0]):
        pyro.sample("y", dist.Bernoulli(logits=features @ beta), obs=labels)


def gaussian_model():
    pyro.sample("x", dist.Normal(torch.zeros(GAUSSIAN_DIM), GAUSSIAN_SIGMA).to_event(1))


def gaussian_chain(data):
    """Pyro's ``GaussianChain`` test model (``tests/infer/mcmc/test_hmc.py``): ``loc_i ~ N(loc_{i-1}, 1)``."""
    loc = torch.zeros(CHAIN_DIM)
    for i in range(1, CHAIN_LINKS + 1):
        loc = pyro.sample(f"loc_{i}", dist.Normal(loc, torch.ones(CHAIN_DIM)))
    pyro.sample("obs", dist.Normal(loc, torch.ones(CHAIN_DIM)), obs=data)


def schools_centred(sigma, y):
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("schools", len(y)):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        pyro.sample("obs", dist.Normal(theta, sigma), obs=y)


def schools_noncentred(sigma, y):
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("schools", len(y)):
        eta = pyro.sample("eta", dist.Normal(0.0, 1.0))
        pyro.sample("obs", dist.Normal(mu + tau * eta, sigma), obs=y)


def student_t():
    pyro.sample("x", dist.MultivariateStudentT(STUDENT_DF, torch.zeros(STUDENT_DIM), torch.eye(STUDENT_DIM)))


def problems():
    """name -> (model, args, title)."""
    return {
        "logistic": (logistic_model, logistic_data(0), "logistic regression, 100-d, 1,000 points"),
        "ill": (gaussian_model, (), "50-d Gaussian, σ in [0.01, 100]"),
        "chain": (gaussian_chain, (torch.ones(1, CHAIN_DIM),), "Gaussian chain, 10-d, 9 links"),
        "schools_noncentred": (schools_noncentred, (SCHOOLS_SIGMA, SCHOOLS_Y), "eight schools, non-centred"),
        "schools_centred": (schools_centred, (SCHOOLS_SIGMA, SCHOOLS_Y), "eight schools, centred"),
        "student_t": (student_t, (), "10-d Student-t, 5 d.o.f."),
    }


class CountCalls:
    """Wrap a model and count its executions."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.fn(*args, **kwargs)


class CountLeapfrogs:
    """Count NUTS's gradient evaluations in this process: one per leapfrog step of Pyro's
    ``velocity_verlet`` (trees and the step-size search), which a JIT-compiled potential hides
    from a model-call counter."""

    def __init__(self):
        self.calls = 0

    def __enter__(self):
        self.saved = {module: module.velocity_verlet for module in (nuts_module, hmc_module)}
        for module, verlet in self.saved.items():
            module.velocity_verlet = self.counted(verlet)
        return self

    def counted(self, verlet):
        def wrapper(*args, **kwargs):
            self.calls += kwargs.get("num_steps", args[5] if len(args) > 5 else 1)
            return verlet(*args, **kwargs)
        return wrapper

    def __exit__(self, *exc):
        for module, verlet in self.saved.items():
            module.velocity_verlet = verlet


# -- one run ----------------------------------------------------------------------------------
def chain_summary(grouped) -> dict:
    """Min bulk and tail ESS (all chains together) and max R-hat over every coordinate."""
    data = {k: v.reshape(v.shape[:2] + (-1,)).double().numpy() for k, v in grouped.items()}
    dataset = arviz.convert_to_dataset(data)
    bulk, tail = arviz.ess(dataset, method="bulk"), arviz.ess(dataset, method="tail")
    rhat = arviz.rhat(dataset)
    return {"min_bulk_ess": float(min(bulk[k].values.min() for k in data)),
            "min_tail_ess": float(min(tail[k].values.min() for k in data)),
            "max_rhat": float(max(rhat[k].values.max() for k in data))}


def run_one(problem, model, args, sampler, chains, precondition, steps, seed):
    warmup, draws = steps
    pyro.set_rng_seed(seed)
    if sampler == "VectorizedMCMC":
        counter = CountCalls(model)
        mcmc = VectorizedMCMC(PCLangevin(counter, precondition=precondition), num_samples=draws,
                              warmup_steps=warmup, num_chains=chains, disable_progbar=True)
    else:
        counter = CountLeapfrogs()
        mcmc = MCMC(NUTS(model, jit_compile=True, ignore_jit_warnings=True), num_samples=draws,
                    warmup_steps=warmup, num_chains=chains, disable_progbar=True)
    with counter if sampler == "NUTS" else contextlib.nullcontext():
        begin = time.perf_counter()
        mcmc.run(*args)
        seconds = time.perf_counter() - begin
    row = {"problem": problem, "sampler": sampler, "precondition": precondition, "chains": chains,
           "seed": seed, "warmup": warmup, "draws": draws, "seconds": round(seconds, 2),
           **chain_summary(mcmc.get_samples(group_by_chain=True))}
    row["divergences"] = sum(len(v) for v in mcmc.diagnostics()["divergences"].values())
    # gradients: one vmapped model execution computes all C chains' gradients; NUTS's chains in
    # worker processes are not counted here, so only its 1-chain run has the figure
    if sampler == "VectorizedMCMC":
        row["gradients"] = counter.calls * chains
    else:
        row["gradients"] = counter.calls if chains == 1 else None
    for kind in ("bulk", "tail"):
        row[f"{kind}_ess_per_s"] = round(row[f"min_{kind}_ess"] / seconds, 2)
        row[f"{kind}_ess_per_1k_grad"] = (round(1e3 * row[f"min_{kind}_ess"] / row["gradients"], 3)
                                          if row["gradients"] else None)
    print({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies every budget")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--problems", nargs="+", default=None, help="a subset of the problems (default: all)")
    parser.add_argument("--out", default=results_path("kernel"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"# {machine()}\n# start: {loadavg()}", flush=True)
    load_before = loadavg()
    langevin_steps = tuple(max(1, int(n * args.scale)) for n in LANGEVIN_STEPS)
    nuts_iterations = {name: tuple(max(1, int(n * args.scale)) for n in steps) for name, steps in NUTS_ITERATIONS.items()}
    rows = []
    chosen = problems()
    for name in args.problems or list(chosen):
        model, model_args, _ = chosen[name]
        for seed in args.seeds:
            for chains in (1, 2):
                rows.append(run_one(name, model, model_args, "NUTS", chains, None, nuts_iterations[name], seed))
            for kind in KINDS:
                for chains in CHAINS:
                    rows.append(run_one(name, model, model_args, "VectorizedMCMC", chains, kind, langevin_steps,
                                        seed))
    load_after = loadavg()
    print(f"# end: {load_after}")
    write_results(args.out, {"scale": args.scale, "langevin_steps": langevin_steps,
                             "nuts_iterations": nuts_iterations, "load_before": load_before,
                             "load_after": load_after,
                             "titles": {name: chosen[name][2] for name in args.problems or chosen},
                             "runs": rows})


if __name__ == "__main__":
    main()
