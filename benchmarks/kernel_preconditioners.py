r"""Which preconditioner should ``PCLangevin`` use by default? (issue 15, item 1)

Run from the repository root::

    python benchmarks/kernel_preconditioners.py                # a few minutes on 2 CPU cores
    python benchmarks/kernel_preconditioners.py --steps 300 --out /tmp/p.json   # runs, in seconds

MALA (``PCLangevin(model, precondition=kind)``, one chain through
``pyro.infer.MCMC``) with ``kind`` = ``"diagonal"`` (gradient RMS), ``"variance"``
(windowed posterior variance) and ``"dense"`` (windowed covariance), at equal
numbers of steps (``--steps`` warm-up, then ``2 x --steps`` draws), 2 seeds, on:

a. ``ill``: an 8-d Gaussian, σ log-spaced over [1e-2, 1e2];
b. ``chain``: the Gaussian chain of Pyro's HMC tests, 9 scalar links
   ``x_1 ~ N(0, 1)``, ``x_k ~ N(x_{k-1}, 1)``, one observation ``y ~ N(x_9, 1)``
   (posterior correlations up to 0.99);
c. ``normal``: ``mu ~ N(0, 10)``, ``sigma ~ HalfNormal(5)``, 50 points from N(3, 2²)
   (as ``benchmarks/kernel_defaults.py``; exact moments by quadrature on a grid);
d. ``logistic``: the 100-d Bayesian logistic regression of ``benchmarks/kernel.py``
   (no exact answer: errors are not reported).

Figures per run: min ArviZ bulk ESS over coordinates, per second (warm-up included)
and per gradient (model evaluations), and the largest error of a posterior mean
and of a standard deviation against the exact one, in units of the exact sd.
"""
import argparse
import sys
import time
from pathlib import Path

import arviz
import pyro
import pyro.distributions as dist
import torch
from pyro.infer import MCMC

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import results_path, write_results  # noqa: E402
from kernel_defaults import normal_model  # noqa: E402  (the same model as the defaults study)
from kernel import CountCalls, logistic_data, logistic_model  # noqa: E402

from pyro_lpc import PCLangevin  # noqa: E402

KINDS = ("diagonal", "variance", "dense")
ILL_SIGMA = torch.logspace(-2, 2, 8)
LINKS = 9
CHAIN_Y = torch.tensor(1.0)
NORMAL_Y = 3.0 + 2.0 * torch.randn(50, generator=torch.Generator().manual_seed(0))


def ill_model():
    pyro.sample("z", dist.Normal(0.0, ILL_SIGMA).to_event(1))


def chain_model(y):
    x = torch.tensor(0.0)
    for k in range(LINKS):
        x = pyro.sample(f"x_{k}", dist.Normal(x, 1.0))
    pyro.sample("y", dist.Normal(x, 1.0), obs=y)


def chain_exact():
    """Posterior mean and sd of (x_1..x_9): a Gaussian with tridiagonal precision."""
    precision = 2.0 * torch.eye(LINKS) - torch.diag(torch.ones(LINKS - 1), 1) - torch.diag(torch.ones(LINKS - 1), -1)
    b = torch.zeros(LINKS)
    b[-1] = CHAIN_Y
    cov = torch.linalg.inv(precision.double())
    return (cov @ b.double()).float(), cov.diagonal().sqrt().float()


def normal_exact():
    """Posterior mean and sd of (mu, sigma) by quadrature on a 2,000² grid."""
    mu = torch.linspace(0.0, 6.0, 2000, dtype=torch.float64)[:, None]
    sigma = torch.linspace(0.5, 5.0, 2000, dtype=torch.float64)[None, :]
    y = NORMAL_Y.double()
    log_p = (dist.Normal(0.0, 10.0).log_prob(mu) + dist.HalfNormal(5.0).log_prob(sigma)
             + (-0.5 * ((y.sum() - 0) * 0)) - len(y) * sigma.log()
             - ((y.square().sum() - 2 * mu * y.sum() + len(y) * mu.square()) / (2 * sigma.square())))
    w = (log_p - log_p.max()).exp()
    w = w / w.sum()
    means, sds = [], []
    for grid in (mu.expand_as(w), sigma.expand_as(w)):
        m = (w * grid).sum()
        means.append(m)
        sds.append((w * (grid - m).square()).sum().sqrt())
    return torch.stack(means).float(), torch.stack(sds).float()


def problems():
    features, labels = logistic_data(0)
    return {
        "ill": (ill_model, (), (torch.zeros(8), ILL_SIGMA)),
        "chain": (chain_model, (CHAIN_Y,), chain_exact()),
        "normal": (normal_model, (NORMAL_Y,), normal_exact()),
        "logistic": (logistic_model, (features, labels), None),
    }


def run(model, args, exact, kind, steps, seed):
    counted = CountCalls(model)
    mcmc = MCMC(PCLangevin(counted, precondition=kind), num_samples=2 * steps, warmup_steps=steps,
                disable_progbar=True)
    pyro.set_rng_seed(seed)
    start = time.perf_counter()
    mcmc.run(*args)
    seconds = time.perf_counter() - start
    draws = torch.cat([v.reshape(v.shape[0], -1) for v in mcmc.get_samples().values()], -1)
    ess = torch.as_tensor(arviz.ess(arviz.convert_to_dataset({"z": draws.double().numpy()[None]}))["z"].values)
    out = {"kind": kind, "seed": seed, "seconds": seconds, "gradients": counted.calls,
           "min_ess": float(ess.min()), "ess_per_s": float(ess.min()) / seconds,
           "ess_per_1k_grad": 1000 * float(ess.min()) / counted.calls}
    if exact is not None:
        mean, sd = exact
        out["mean_err_sd"] = float(((draws.mean(0) - mean).abs() / sd).max())
        out["sd_err_rel"] = float(((draws.std(0) - sd).abs() / sd).max())
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1500, help="warm-up steps (draws: twice as many)")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--problems", nargs="+", default=["ill", "chain", "normal", "logistic"])
    parser.add_argument("--out", default=results_path("kernel_preconditioners"))
    opts = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for name, (model, args, exact) in problems().items():
        if name not in opts.problems:
            continue
        for kind in KINDS:
            for seed in range(opts.seeds):
                row = {"problem": name, **run(model, args, exact, kind, opts.steps, seed)}
                print(row, flush=True)
                rows.append(row)
    write_results(opts.out, {"steps": opts.steps, "threads": 1, "runs": rows})


if __name__ == "__main__":
    main()
