r"""Benchmark of the ``PCLangevin`` MCMC kernel (sampling efficiency and per-step cost).

Run from the repository root::

    python benchmarks/kernel.py --quick   # about 1 minute on 2 CPU cores
    python benchmarks/kernel.py           # at most about 5 minutes on 2 CPU cores
    python benchmarks/kernel.py --quick --skip-ess --out /tmp/kernel.json   # the per-step timing only

Writes ``benchmarks/results/kernel.json`` (``--out``).

Two things are measured, all on CPU, in one process, one chain per sampler.

1. **ESS per second** of ``PCLangevin(model, adjust=True, precondition="diagonal")``
   (MALA with the diagonal preconditioner adapted during warm-up) against Pyro's
   ``NUTS`` (defaults: step size and diagonal mass matrix adapted, target
   acceptance 0.8, maximum tree depth 10, no JIT), both run through
   ``pyro.infer.MCMC`` with the progress bar disabled, on

   a. Bayesian logistic regression, 100 coefficients with a ``N(0, 1)`` prior,
      1000 synthetic data points (features ``N(0, 1)``, true coefficients
      ``N(0, 0.3²)``, so the logits have a standard deviation of about 3);
   b. a 50-dimensional Gaussian ``N(0, diag(σ²))`` with ``σ`` log-spaced over
      ``[1e-2, 1e2]`` (condition number of the covariance 1e8).

   The effective sample size is ArviZ's default (rank-normalised split-chain
   "bulk") ``arviz.ess`` of the post-warm-up draws, per coordinate (Pyro's
   ``effective_sample_size`` needs O(N²) memory for N draws); the table shows
   its minimum and median over coordinates divided by the wall time of the
   *whole* ``mcmc.run`` (warm-up included). NUTS takes far fewer iterations,
   since each costs many gradient evaluations; the budgets are chosen so both
   samplers run for comparable wall time and are printed. "evals" counts the model's
   executions during the run (one per potential-and-gradient evaluation), a
   machine-independent cost.

2. **Per-step time** of ``PCLangevin.sample`` after warm-up (called directly
   after ``kernel.setup``, without ``MCMC``) against a hand-written PyTorch MALA
   loop on the logistic-regression potential written directly in torch
   (``0.5‖β‖² + Σ BCE-with-logits``, gradient by ``torch.autograd.grad``), with
   the diagonal preconditioner and step size held fixed at the values the
   model-driven kernel adapted (the ``potential_fn=`` kernel adapts its own in
   an identical warm-up; the cost of a step does not depend on these values).
   ``PCLangevin`` runs twice: on the Pyro model (``model=``)
   and on the same hand-written potential (``potential_fn=``); the second
   separates the cost of tracing the Pyro model from the kernel's own
   overhead. The three loops are timed in interleaved rounds (so a change in
   machine load hits all of them alike); the median and the minimum ms/step
   over rounds are reported, with ratios against the hand-written loop.

``torch.set_num_threads`` is left at its default unless ``--threads`` is given.
Other processes on the machine distort wall times badly (with 2 threads on 2
busy cores, OpenMP waits can make small tensor ops ten times slower): the load
average is printed at the start and end.
"""
from __future__ import annotations

import argparse
import cProfile
import math
import pstats
import statistics
import sys
import time

import arviz
import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.infer import MCMC, NUTS

from common import loadavg, machine, results_path, write_results
from pyro_lpc import PCLangevin

#: (warm-up, samples) per problem and sampler; chosen for comparable wall time.
BUDGETS = {
    "quick": {
        "logistic": {"PCLangevin": (4000, 4000), "NUTS": (300, 300)},
        "gaussian": {"PCLangevin": (10000, 10000), "NUTS": (100, 100)},
    },
    "default": {
        "logistic": {"PCLangevin": (20000, 20000), "NUTS": (1500, 1500)},
        "gaussian": {"PCLangevin": (40000, 40000), "NUTS": (500, 500)},
    },
}
#: (kernel warm-up steps, timed steps per round, rounds) for the per-step timing.
TIMING = {"quick": (500, 1000, 3), "default": (1000, 2000, 5)}

NUM_DATA, NUM_FEATURES = 1000, 100
GAUSSIAN_DIM, GAUSSIAN_SCALES = 50, (1e-2, 1e2)


# -- problems -------------------------------------------------------------------
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


def logistic_potential(features, labels):
    """The same energy written directly in torch (up to an additive constant)."""

    def potential(beta):
        logits = features @ beta
        return 0.5 * beta.dot(beta) + F.binary_cross_entropy_with_logits(logits, labels, reduction="sum")

    return potential


GAUSSIAN_SIGMA = torch.logspace(math.log10(GAUSSIAN_SCALES[0]), math.log10(GAUSSIAN_SCALES[1]), GAUSSIAN_DIM)


def gaussian_model():
    pyro.sample("x", dist.Normal(torch.zeros(GAUSSIAN_DIM), GAUSSIAN_SIGMA).to_event(1))


class CountCalls:
    """Wrap a model and count its executions."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.fn(*args, **kwargs)


# -- part 1: ESS per second --------------------------------------------------------
def bulk_ess(draws):
    """ArviZ bulk ESS per coordinate of one chain's ``(num_draws, dim)`` draws."""
    dataset = arviz.convert_to_dataset({"z": draws.double().numpy()[None]})
    return torch.as_tensor(arviz.ess(dataset)["z"].values)


def run_ess(problem, sampler, model, args, warmup, num_samples, seed):
    counted = CountCalls(model)
    if sampler == "PCLangevin":
        kernel = PCLangevin(counted, adjust=True, precondition="diagonal")
    else:
        kernel = NUTS(counted)
    captured = {}

    def hook(kern, params, stage, i):  # MCMC resets the kernel after the run: keep η and P
        if stage == "Sample" and i == num_samples - 1:
            captured["step"] = kern.step_size
            captured["P"] = getattr(kern, "preconditioner", None)
            captured["accept"] = float(kern.logging()["acc. prob"])  # post-warm-up mean

    mcmc = MCMC(kernel, num_samples=num_samples, warmup_steps=warmup, disable_progbar=True, hook_fn=hook)
    pyro.set_rng_seed(seed)
    start = time.perf_counter()
    mcmc.run(*args)
    wall = time.perf_counter() - start
    (draws,) = mcmc.get_samples().values()
    ess = bulk_ess(draws.reshape(num_samples, -1))
    # not mcmc.diagnostics(): it computes Pyro's O(N²)-memory ESS of every site
    row = {
        "problem": problem,
        "sampler": sampler,
        "warmup": warmup,
        "samples": num_samples,
        "wall": wall,
        "evals": counted.calls,
        "ess_min": ess.min().item(),
        "ess_med": ess.median().item(),
        "accept": captured["accept"],
        "step": captured["step"],
        "argmin": int(ess.argmin()),
        "P": captured.get("P"),
    }
    row["min_per_s"], row["med_per_s"] = row["ess_min"] / wall, row["ess_med"] / wall
    return row


# -- part 2: per-step time -----------------------------------------------------------
def value_and_grad(potential, z):
    z = z.detach().requires_grad_(True)
    energy = potential(z)
    (grad,) = torch.autograd.grad(energy, z)
    return energy.detach(), grad


class HandMALA:
    """Plain PyTorch MALA with a fixed diagonal preconditioner ``P`` and step size ``η``."""

    def __init__(self, potential, z, scale, step_size):
        self.potential, self.scale, self.eta = potential, scale, step_size
        self.noise_scale = (2.0 * step_size * scale).sqrt()
        self.z = z.detach().clone()
        self.energy, self.grad = value_and_grad(potential, self.z)

    def log_q(self, to, frm, grad_frm):
        diff = to - frm + self.eta * self.scale * grad_frm
        return -(diff.square() / self.scale).sum() / (4.0 * self.eta)

    def step(self):
        z, energy, grad = self.z, self.energy, self.grad
        proposal = z - self.eta * self.scale * grad + self.noise_scale * torch.randn_like(z)
        new_energy, new_grad = value_and_grad(self.potential, proposal)
        log_alpha = energy - new_energy + self.log_q(z, proposal, new_grad) - self.log_q(proposal, z, grad)
        if torch.rand(()).log() < log_alpha:
            self.z, self.energy, self.grad = proposal, new_energy, new_grad


def warmed_kernel(kernel, args, warmup, extra=50):
    """``setup`` the kernel, run its warm-up and a few sampling steps; return a stepping closure."""
    kernel.setup(warmup, *args)
    params = dict(kernel.initial_params)
    for _ in range(warmup + extra):
        params = kernel.sample(params)
    state = {"params": params}

    def step():
        state["params"] = kernel.sample(state["params"])

    return step, state


def time_steps(step, num_steps):
    start = time.perf_counter()
    for _ in range(num_steps):
        step()
    return (time.perf_counter() - start) / num_steps * 1e3


def run_timing(features, labels, warmup, num_steps, rounds, seed, profile):
    potential = logistic_potential(features, labels)
    pyro.set_rng_seed(seed)
    model_kernel = PCLangevin(logistic_model, adjust=True, precondition="diagonal")
    model_step, model_state = warmed_kernel(model_kernel, (features, labels), warmup)
    scale, eta = model_kernel.preconditioner["beta"], model_kernel.step_size
    z0 = model_state["params"]["beta"]

    fn_kernel = PCLangevin(potential_fn=lambda p: potential(p["beta"]), adjust=True, precondition="diagonal")
    fn_kernel.initial_params = {"beta": z0.clone()}
    fn_step, _ = warmed_kernel(fn_kernel, (), warmup)

    jit_kernel = PCLangevin(logistic_model, adjust=True, precondition="diagonal", jit_compile=True,
                            ignore_jit_warnings=True)
    jit_step, _ = warmed_kernel(jit_kernel, (features, labels), warmup)

    hand = HandMALA(potential, z0, scale, eta)
    for _ in range(warmup):
        hand.step()

    loops = {
        "hand-written MALA": hand.step,
        "PCLangevin(model=)": model_step,
        "PCLangevin(potential_fn=)": fn_step,
        "PCLangevin(model=, jit)": jit_step,
    }
    times = {name: [] for name in loops}
    for _ in range(rounds):
        for name, step in loops.items():
            times[name].append(time_steps(step, num_steps))
    if profile:
        profiler = cProfile.Profile()
        profiler.runcall(time_steps, model_step, num_steps)
        print(f"\ncProfile of {num_steps} PCLangevin(model=).sample calls (top 25 by own time):")
        pstats.Stats(profiler, stream=sys.stdout).sort_stats("tottime").print_stats(25)
    return {name: (statistics.median(t), min(t)) for name, t in times.items()}, eta


# -- report ----------------------------------------------------------------------------
def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller budgets (about 1 minute)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-ess", action="store_true", help="only the per-step timing")
    parser.add_argument("--profile", action="store_true", help="cProfile the PCLangevin(model=) steps")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads (default: leave torch's default)"
    )
    parser.add_argument("--out", default=results_path("kernel"))
    parser.add_argument("--note", help="free text stored with the results (shown on the page)")
    opts = parser.parse_args()
    if opts.threads is not None:
        torch.set_num_threads(opts.threads)
    mode = "quick" if opts.quick else "default"
    command = " ".join([sys.executable] + sys.argv)
    print(f"# {command}\n# {machine()}\n# start: {loadavg()}")
    t_total = time.perf_counter()

    features, labels = logistic_data(opts.seed)
    problems = {
        "logistic": (logistic_model, (features, labels)),
        "gaussian": (gaussian_model, ()),
    }
    rows, slope = [], None
    if not opts.skip_ess:
        for problem, (model, args) in problems.items():
            for sampler, (warmup, num_samples) in BUDGETS[mode][problem].items():
                row = run_ess(problem, sampler, model, args, warmup, num_samples, opts.seed)
                rows.append(row)
                print(
                    f"  {problem:8s} {sampler:10s} {row['wall']:6.1f} s, min ESS {row['ess_min']:8.1f}, "
                    f"median ESS {row['ess_med']:8.1f}",
                    flush=True,
                )

    warmup, num_steps, rounds = TIMING[mode]
    timing, eta = run_timing(features, labels, warmup, num_steps, rounds, opts.seed, opts.profile)

    print("\n== 1. ESS per second (1 chain; ArviZ bulk ESS / wall time of the whole mcmc.run, with warm-up) ==")
    print(
        f"logistic: {NUM_FEATURES}-d Bayesian logistic regression, {NUM_DATA} points;  "
        f"gaussian: {GAUSSIAN_DIM}-d N(0, diag σ²), σ log-spaced in "
        f"[{GAUSSIAN_SCALES[0]:g}, {GAUSSIAN_SCALES[1]:g}]"
    )
    header = (
        f"{'problem':9s}{'sampler':11s}{'warmup':>7s}{'samples':>8s}{'evals':>8s}{'wall s':>7s}"
        f"{'accept':>7s}{'step':>9s}{'min ESS':>8s}{'med ESS':>8s}{'evals/minESS':>13s}"
        f"{'min ESS/s':>10s}{'med ESS/s':>10s}"
    )
    if rows:
        print(header)
        for r in rows:
            print(
                f"{r['problem']:9s}{r['sampler']:11s}{r['warmup']:7d}{r['samples']:8d}{r['evals']:8d}"
                f"{r['wall']:7.1f}{r['accept']:7.3f}{r['step']:9.2e}{r['ess_min']:8.1f}{r['ess_med']:8.1f}"
                f"{r['evals'] / r['ess_min']:13.1f}{r['min_per_s']:10.2f}{r['med_per_s']:10.2f}"
            )
        print(
            "(evals: model executions = potential-and-gradient evaluations in the run; accept: mean\n"
            " acceptance probability after warm-up, targets 0.574 PCLangevin, 0.8 NUTS; step: final η)"
        )
        by = {(r["problem"], r["sampler"]): r for r in rows}
        for problem in problems:
            pcl, nuts = by[(problem, "PCLangevin")], by[(problem, "NUTS")]
            print(
                f"{problem}: PCLangevin/NUTS min-ESS/s = {pcl['min_per_s'] / nuts['min_per_s']:.3g}, "
                f"median-ESS/s = {pcl['med_per_s'] / nuts['med_per_s']:.3g}"
            )
        gauss = by[("gaussian", "PCLangevin")]
        if gauss["P"] is not None:
            p = gauss["P"]["x"]
            # least-squares slope of log P against log σ: 2 would whiten (P = σ²), 1 is P ∝ σ
            lx, lp = GAUSSIAN_SIGMA.log(), p.log()
            slope = ((lx - lx.mean()) * (lp - lp.mean())).sum() / (lx - lx.mean()).square().sum()
            print(
                f"gaussian PCLangevin: adapted P spans [{p.min():.2e}, {p.max():.2e}], slope of log P "
                f"on log σ = {slope:.2f} (2 would whiten); "
                f"min ESS at σ = {GAUSSIAN_SIGMA[gauss['argmin']]:.3g}"
            )

    print(
        f"\n== 2. Per-step time, logistic regression, post-warm-up kernel.sample vs hand-written MALA ==\n"
        f"({warmup} warm-up steps each, then {rounds} interleaved rounds of {num_steps} steps; "
        f"fixed P and η = {eta:.3g}\n from the kernel's warm-up; median and min over rounds, the min being "
        f"least disturbed by other load)"
    )
    base_med, base_min = timing["hand-written MALA"]
    print(f"{'loop':28s}{'median ms/step':>15s}{'min ms/step':>12s}{'ratio (median)':>16s}{'ratio (min)':>12s}")
    for name, (med, low) in timing.items():
        print(f"{name:28s}{med:15.4f}{low:12.4f}{med / base_med:16.2f}{low / base_min:12.2f}")
    print("(goal stated in the issue: PCLangevin / hand-written <= 1.15)")
    print(f"\n# {machine()}\n# end: {loadavg()}; total {time.perf_counter() - t_total:.0f} s\n# {command}")
    write_results(opts.out, {
        "mode": mode, "seed": opts.seed,
        "ess": [{k: v for k, v in r.items() if k != "P"} for r in rows],
        "gaussian_p_slope": None if slope is None else float(slope),
        "timing": {name: {"median_ms": med, "min_ms": low} for name, (med, low) in timing.items()},
        "timing_step_size": eta,
    }, opts.note)


if __name__ == "__main__":
    main()
