r"""Many vectorised ``PCLangevin`` chains in one process against Pyro's NUTS (issue 15, item 2).

Run from the repository root::

    python benchmarks/kernel_vectorized.py          # about 3 minutes on 2 CPU cores
    python benchmarks/kernel_vectorized.py --scale 0.2 --out /tmp/v.json   # runs, in seconds

Writes ``benchmarks/results/kernel_vectorized.json`` (``--out``).

Samplers: ``pyro_lpc.VectorizedMCMC(PCLangevin(model), num_chains=C)`` (MALA, default
``"variance"`` preconditioner, one model evaluation per step for all C chains) with
C = 1, 4, 16, each for ``--scale`` x (1,000 warm-up + 1,000 draws) steps; Pyro's NUTS
(defaults, no JIT) through ``pyro.infer.MCMC`` with 1 chain and with ``num_chains=2``
(two worker processes), ``--scale`` x (300 + 300) iterations. Problems: the 100-d
Bayesian logistic regression (1,000 points) of ``benchmarks/kernel.py`` (NUTS on its
``X @ β`` form; VectorizedMCMC on the same model written ``(X * β).sum(-1)``, which broadcasts
over the chain dim) and an 8-d
Gaussian with σ log-spaced over [1e-2, 1e2]. Figure: min over coordinates of ArviZ's
bulk ESS of all chains together (so summed over chains), divided by the wall time
of the whole ``run`` (warm-up and process start-up included). One torch thread per
process; the machine's 2 cores are shared with other work, so timings are noisy: the
load average is recorded before and after.
"""
import argparse
import sys
import time
from pathlib import Path

import arviz
import pyro
import pyro.distributions as dist
import torch
from pyro.infer import MCMC, NUTS

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import loadavg, results_path, write_results  # noqa: E402
from kernel import logistic_data, logistic_model  # noqa: E402

from pyro_lpc import PCLangevin, VectorizedMCMC  # noqa: E402

ILL_SIGMA = torch.logspace(-2, 2, 8)
CHAINS = (1, 4, 16)


def logistic_broadcasting(features, labels):
    """``logistic_model`` written to broadcast over leading batch dims (``(X * β).sum(-1)`` for
    ``X @ β``), as a model for Pyro's vectorised particles is: VectorizedMCMC evaluates it under an
    outer chain plate, where ``β`` has shape ``[C, 1, 100]``."""
    beta = pyro.sample("beta", dist.Normal(torch.zeros(features.shape[1]), 1.0).to_event(1))
    with pyro.plate("data", features.shape[0]):
        pyro.sample("y", dist.Bernoulli(logits=(features * beta).sum(-1)), obs=labels)


def ill_model():
    pyro.sample("z", dist.Normal(0.0, ILL_SIGMA).to_event(1))


def min_bulk_ess(mcmc) -> float:
    grouped = mcmc.get_samples(group_by_chain=True)
    data = {k: v.reshape(v.shape[:2] + (-1,)).double().numpy() for k, v in grouped.items()}
    ess = arviz.ess(arviz.convert_to_dataset(data))
    return float(min(ess[k].values.min() for k in data))


def run_one(problem, sampler, chains, model, args, warmup, draws, seed):
    pyro.set_rng_seed(seed)
    if sampler == "VectorizedMCMC":
        mcmc = VectorizedMCMC(PCLangevin(model), num_samples=draws, warmup_steps=warmup, num_chains=chains,
                              disable_progbar=True)
    else:
        mcmc = MCMC(NUTS(model), num_samples=draws, warmup_steps=warmup, num_chains=chains, disable_progbar=True)
    begin = time.perf_counter()
    mcmc.run(*args)
    seconds = time.perf_counter() - begin
    ess = min_bulk_ess(mcmc)
    divergences = sum(len(v) for v in mcmc.diagnostics()["divergences"].values())
    row = {"problem": problem, "sampler": sampler, "chains": chains, "warmup": warmup, "draws": draws,
           "seconds": round(seconds, 2), "min_ess": round(ess, 1), "ess_per_s": round(ess / seconds, 2),
           "divergences": divergences}
    print(row, flush=True)
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies every budget")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=results_path("kernel_vectorized"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    load_before = loadavg()
    print(load_before, flush=True)
    data = logistic_data(0)
    problems = {"logistic": ((logistic_broadcasting, logistic_model), data), "ill": ((ill_model, ill_model), ())}
    steps, iterations = int(1000 * args.scale), int(300 * args.scale)
    rows = []
    for problem, ((vectorisable, model), model_args) in problems.items():
        for chains in CHAINS:
            rows.append(run_one(problem, "VectorizedMCMC", chains, vectorisable, model_args, steps, steps, args.seed))
        for chains in (1, 2):
            rows.append(run_one(problem, "NUTS", chains, model, model_args, iterations, iterations, args.seed))
    load_after = loadavg()
    print(load_after)
    write_results(args.out, {"runs": rows, "load_before": load_before, "load_after": load_after},
                  note="One seed; the 2 CPU cores were shared with other work, so wall times are noisy.")


if __name__ == "__main__":
    main()
