r"""Per-step cost of ``PCLangevin`` against a hand-written PyTorch MALA loop.

Run from the repository root::

    python benchmarks/kernel_overhead.py --quick   # about 1 minute on 2 CPU cores
    python benchmarks/kernel_overhead.py           # about 3 minutes

Writes ``benchmarks/results/kernel_overhead.json`` (``--out``).

Per-step time of ``PCLangevin.sample`` after warm-up (called directly after ``kernel.setup``,
without ``MCMC``) on the 100-d logistic regression of ``benchmarks/kernel.py``, against a
hand-written PyTorch MALA loop on the same potential written directly in torch
(``0.5‖β‖² + Σ BCE-with-logits``, gradient by ``torch.autograd.grad``), with the diagonal
preconditioner and step size held fixed at the values the model-driven kernel adapted (the
``potential_fn=`` kernel adapts its own in an identical warm-up; the cost of a step does not
depend on these values). ``PCLangevin`` runs on the Pyro model (``model=``, with and without
``jit_compile``) and on the same hand-written potential (``potential_fn=``); the second
separates the cost of tracing the Pyro model from the kernel's own overhead. The loops are timed
in interleaved rounds (so a change in machine load hits all of them alike); the median and the
minimum ms/step over rounds are reported, with ratios against the hand-written loop.

``torch.set_num_threads`` is left at its default unless ``--threads`` is given. The load average
is printed at the start and end.

(Until 2026-12-02 this program was ``benchmarks/kernel.py`` and also measured one chain's ESS per
second against NUTS; ``benchmarks/kernel.py`` now compares vectorised chains with NUTS.)
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import sys
import time
from pathlib import Path

import pyro
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import loadavg, machine, results_path, write_results  # noqa: E402
from kernel import logistic_data, logistic_model  # noqa: E402

from pyro_lpc import PCLangevin  # noqa: E402

#: (kernel warm-up steps, timed steps per round, rounds).
TIMING = {"quick": (500, 1000, 3), "default": (1000, 2000, 5)}


def logistic_potential(features, labels):
    """The same energy written directly in torch (up to an additive constant)."""

    def potential(beta):
        logits = features @ beta
        return 0.5 * beta.dot(beta) + F.binary_cross_entropy_with_logits(logits, labels, reduction="sum")

    return potential


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
    parser.add_argument("--profile", action="store_true", help="cProfile the PCLangevin(model=) steps")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads (default: leave torch's default)"
    )
    parser.add_argument("--out", default=results_path("kernel_overhead"))
    parser.add_argument("--note", help="free text stored with the results (shown on the page)")
    opts = parser.parse_args()
    if opts.threads is not None:
        torch.set_num_threads(opts.threads)
    mode = "quick" if opts.quick else "default"
    command = " ".join([sys.executable] + sys.argv)
    print(f"# {command}\n# {machine()}\n# start: {loadavg()}")
    t_total = time.perf_counter()
    features, labels = logistic_data(opts.seed)
    warmup, num_steps, rounds = TIMING[mode]
    timing, eta = run_timing(features, labels, warmup, num_steps, rounds, opts.seed, opts.profile)
    print(
        f"\n== Per-step time, logistic regression, post-warm-up kernel.sample vs hand-written MALA ==\n"
        f"({warmup} warm-up steps each, then {rounds} interleaved rounds of {num_steps} steps; "
        f"fixed P and η = {eta:.3g}\n from the kernel's warm-up; median and min over rounds, the min being "
        f"least disturbed by other load)"
    )
    base_med, base_min = timing["hand-written MALA"]
    print(f"{'loop':28s}{'median ms/step':>15s}{'min ms/step':>12s}{'ratio (median)':>16s}{'ratio (min)':>12s}")
    for name, (med, low) in timing.items():
        print(f"{name:28s}{med:15.4f}{low:12.4f}{med / base_med:16.2f}{low / base_min:12.2f}")
    print(f"\n# {machine()}\n# end: {loadavg()}; total {time.perf_counter() - t_total:.0f} s\n# {command}")
    write_results(opts.out, {
        "mode": mode, "seed": opts.seed,
        "timing": {name: {"median_ms": med, "min_ms": low} for name, (med, low) in timing.items()},
        "timing_step_size": eta,
    }, opts.note)


if __name__ == "__main__":
    main()
