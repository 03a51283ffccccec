"""Overhead of ``pyro_lpc.fit`` against a hand-written PyTorch LPC loop, and its memory.

Both loops run the same algorithm on the same MNIST-sized model (the IWAE
paper's 784-200-200-50 tanh MLP decoder and encoder, Bernoulli likelihood,
batch 100): K Langevin steps with the shared diagonal preconditioner, θ
gradient accumulated over all kept samples one at a time, Jeffreys warm-start
loss, Adam on θ and φ. Data are random binary images (timing does not depend
on pixel values). Times are medians over iterations after a warm-up, in one
process, so the ratio compares like with like.

Peak memory is measured in fresh subprocesses (peak RSS on CPU, peak CUDA
allocation on a GPU) for several K, to show it does not grow with K.

    python benchmarks/fit_overhead.py [--iterations 30] [--num-steps 20] [--device cpu]
    python benchmarks/fit_overhead.py --iterations 2 --memory-steps --profile-iterations 2 --out /tmp/f.json

``fit`` is timed three times: as is; with ``jit_compile=True`` (the chains'
energy and gradient recorded once per batch shape, :mod:`pyro_lpc.compiled`);
and with ``jit_options={}`` (that recording compiled by ``torch.compile``). The
first iteration, which records (and compiles), is reported on its own. Last,
cProfile splits ``fit``'s time (not compiled) into the phases of an iteration
(``--profile-iterations``; cProfile inflates the Python-heavy parts).

Writes ``benchmarks/results/fit_overhead.json`` (``--out``).
"""
import argparse
import cProfile
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pyro
import torch

from common import phase_shares, results_path, write_results
from pyro_lpc import fit, langevin
from pyro_lpc.images.models import mlp_model

BATCH, LATENT = 100, 50


def make_model(device):
    torch.manual_seed(0)
    return mlp_model(image_shape=(1, 28, 28), latent_dim=LATENT, likelihood="bernoulli").to(device)


def data(iterations, device):
    gen = torch.Generator().manual_seed(1)
    x = (torch.rand(iterations * BATCH, 1, 28, 28, generator=gen) < 0.13).float().to(device)
    return [(x[i * BATCH:(i + 1) * BATCH],) for i in range(iterations)]


def time_fit(dlgm, batches, num_steps, step_size, jit_compile=False):
    stamps = []
    pyro.clear_param_store()

    class Clock:  # a "dataset" that timestamps each batch as fit asks for it
        def __iter__(self):
            for batch in batches:
                stamps.append(time.perf_counter())
                yield batch
            stamps.append(time.perf_counter())

    fit(dlgm.model, dlgm.guide, Clock(), num_steps=num_steps, step_size=step_size,
        keep="all", progress=False, seed=0, jit_compile=jit_compile is not False,
        jit_options=jit_compile if isinstance(jit_compile, dict) else None)
    return [b - a for a, b in zip(stamps, stamps[1:])]


def time_hand_written(dlgm, batches, num_steps, step_size):
    """The same LPC iteration written directly in PyTorch (no Pyro tracing)."""
    decoder, encoder = dlgm.decoder, dlgm.encoder
    opt_theta = torch.optim.Adam(decoder.parameters(), lr=1e-3)
    opt_phi = torch.optim.Adam(encoder.parameters(), lr=1e-3)
    normal = torch.distributions.Normal

    def log_joint(x, z):  # per data point; the model's own likelihood, as a torch distribution
        lik = dlgm.likelihood.distribution(decoder(z)).log_prob(x)
        return lik + normal(0.0, 1.0).log_prob(z).sum(-1)

    precond = None
    times = []
    with pyro.validation_enabled(False):  # as in fit's chains: no argument checks per evaluation
        for (x,) in batches:
            start = time.perf_counter()
            loc, scale = encoder(x)
            q = normal(loc, scale)
            z0 = q.rsample()
            z = z0.detach()
            if precond is None:
                precond = langevin.init_preconditioner("diagonal", {"z": z}, batch_ndim=1)
            kept = []
            for _ in range(num_steps):
                z = z.detach().requires_grad_(True)
                g, = torch.autograd.grad(-log_joint(x, z).sum(), [z])
                precond = langevin.accumulate(precond, {"z": g}, batch_ndim=1)
                p = precond.scale["z"]
                z = (z - step_size * p * g + (2 * step_size * p).sqrt() * torch.randn_like(z)).detach()
                kept.append(z)
            precond = langevin.refresh(precond)
            opt_theta.zero_grad()
            for zk in kept:
                (-log_joint(x, zk).sum() / len(kept)).backward()
            opt_phi.zero_grad()
            forward = -sum(q.log_prob(zk).sum() for zk in kept) / len(kept)
            reverse = q.log_prob(z0).sum() - log_joint(x, z0).sum()
            phi_grads = torch.autograd.grad(forward + reverse, list(encoder.parameters()))
            opt_theta.step()
            for p, gp in zip(encoder.parameters(), phi_grads):
                p.grad = gp
            opt_phi.step()
            times.append(time.perf_counter() - start)
    return times


def peak_memory(num_steps, device):
    """Peak memory (MiB) of a 5-iteration fit in a fresh process.

    On Linux the peak RSS is the child's ``VmHWM``: its ``ru_maxrss`` starts at the *parent's*
    peak (Linux keeps it across ``execve``), which is wrong whenever the caller is the larger
    process (e.g. one holding the datasets)."""
    code = (
        f"import sys, json, resource, torch; sys.path.insert(0, {str(Path(__file__).resolve().parent)!r});"
        "import fit_overhead as b;"
        f"d = b.make_model('{device}'); bt = b.data(5, '{device}');"
        f"b.time_fit(d, bt, {num_steps}, 1e-2);"
        "cuda = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None;"
        "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')] if sys.platform == 'linux' else [];"
        "rss = int(hwm[0].split()[1]) / 1024 if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024;"
        "print(json.dumps({'rss': rss, 'cuda': cuda}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def profile(num_steps, step_size, iterations, device):
    """Share of ``fit``'s time in each phase of an iteration (:func:`common.phase_shares`)."""
    batches, dlgm = data(iterations, device), make_model(device)
    profiler = cProfile.Profile()
    profiler.runcall(time_fit, dlgm, batches, num_steps, step_size)
    return phase_shares(profiler)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--num-steps", type=int, default=20)
    parser.add_argument("--step-size", type=float, default=1e-2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--memory-steps", type=int, nargs="*", default=[5, 20, 80])
    parser.add_argument("--profile-iterations", type=int, default=10, help="0: no profile")
    parser.add_argument("--out", default=results_path("fit_overhead"))
    parser.add_argument("--note", help="free text stored with the results (shown on the page)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warmup = 5
    batches = data(args.iterations + warmup, args.device)
    dlgm = make_model(args.device)
    hand = time_hand_written(dlgm, batches, args.num_steps, args.step_size)[warmup:]
    variants = {"pyro_lpc.fit": False, "fit(jit_compile=True)": True, "fit(jit_compile={})": {}}
    times = {}
    for name, jit_compile in variants.items():
        dlgm = make_model(args.device)
        times[name] = time_fit(dlgm, batches, args.num_steps, args.step_size, jit_compile=jit_compile)
    t_hand = statistics.median(hand)
    print(f"device={args.device} torch={torch.__version__} threads={torch.get_num_threads()} "
          f"batch={BATCH} K={args.num_steps} iterations={args.iterations} (median after {warmup} warm-up)")
    print(f"{'loop':<24}{'ms / iteration':>16}{'/ hand-written':>16}{'first iteration s':>20}")
    print(f"{'hand-written PyTorch':<24}{1e3 * t_hand:>16.2f}{1.0:>16.3f}")
    for name, t in times.items():
        median = statistics.median(t[warmup:])
        print(f"{name:<24}{1e3 * median:>16.2f}{median / t_hand:>16.3f}{t[0]:>20.2f}")
    print("goal: fit / hand-written <= 1.15")
    memory = {}
    if args.memory_steps:
        print(f"\n{'K':>4}{'peak RSS MiB':>16}{'peak CUDA MiB':>16}")
    for k in args.memory_steps:
        memory[str(k)] = mem = peak_memory(k, args.device)
        cuda = f"{mem['cuda']:.1f}" if mem["cuda"] is not None else "-"
        print(f"{k:>4}{mem['rss']:>16.1f}{cuda:>16}")
    phases = profile(args.num_steps, args.step_size, args.profile_iterations, args.device) \
        if args.profile_iterations else {}
    for name, share in phases.items():
        print(f"{name}: {100 * share:.0f}%")
    write_results(args.out, {
        "device": args.device, "threads": torch.get_num_threads(), "num_steps": args.num_steps,
        "step_size": args.step_size, "keep": "all", "iterations": args.iterations, "warmup": warmup,
        "hand_ms": 1e3 * t_hand, "fit_ms": {name: 1e3 * statistics.median(t[warmup:]) for name, t in times.items()},
        "first_iteration_seconds": {name: t[0] for name, t in times.items()},
        "peak_memory_mib": memory, "profile_iterations": args.profile_iterations, "phases": phases,
    }, args.note)


if __name__ == "__main__":
    main()
