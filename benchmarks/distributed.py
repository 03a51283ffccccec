"""Data-parallel ``fit``: iterations per second with 1 and 2 processes, and what
an iteration communicates.

Every process trains the MNIST reference model (784-200-200-50 tanh MLP decoder
and encoder, Bernoulli likelihood, K = 20, keep all, Jeffreys) on batches of
100 random binary images (timing does not depend on pixel values). With P
processes (``torchrun --standalone``, gloo, one intra-op thread each, so P
processes use P cores) the global batch is P × 100. Reported per run: median
seconds per iteration, data points per second, and the time spent inside the
all-reduces (measured by timing ``Replicas.average``). The scaling ratio is
data points per second with P processes over that with 1 process on the same
machine, measured in the same invocation.

The projection counts the bytes each rank contributes to all-reduces per
iteration for the reference models (θ and φ gradients and 3 figures; the
shared diagonal's statistics, one per latent coordinate; a global latent's
gradient once per Langevin step — the reference models have none), and the time
a ring all-reduce needs for them, ``2 (P-1)/P · bytes / bandwidth``, at 10 and
100 Gbit/s.

    python benchmarks/distributed.py [--iterations 40] [--processes 1 2]
    python benchmarks/distributed.py --iterations 8 --out /tmp/distributed.json   # a quick look

Writes ``benchmarks/results/distributed.json`` (``--out``).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import pyro
import torch

from common import results_path, write_results
from pyro_lpc import distributed, fit
from pyro_lpc.images.models import conv_model, mlp_model

BATCH, LATENT, NUM_STEPS = 100, 50, 20


def worker(iterations: int, out: str, threads: int) -> None:
    """One rank: time ``fit`` on ``iterations`` batches of its own."""
    torch.set_num_threads(threads)
    group = distributed.replicas()
    torch.manual_seed(0)
    dlgm = mlp_model(image_shape=(1, 28, 28), latent_dim=LATENT, likelihood="bernoulli")
    gen = torch.Generator().manual_seed(1)
    total = iterations * group.world_size  # round-robin: each rank takes `iterations` of them
    x = (torch.rand(total * BATCH, 1, 28, 28, generator=gen) < 0.13).float()
    batches = [(x[i * BATCH:(i + 1) * BATCH],) for i in range(total)]

    communication = []
    average = distributed.Replicas.average

    def timed_average(self, tensors, like=None):
        start = time.perf_counter()
        out = average(self, tensors, like)
        communication.append(time.perf_counter() - start)
        return out

    distributed.Replicas.average = timed_average
    result = fit(dlgm.model, dlgm.guide, batches, num_steps=NUM_STEPS, step_size=1e-2, keep="all",
                 progress=False, seed=0)
    times = result["time"]
    per_iteration = [b - a for a, b in zip(times, times[1:])][5:]  # after 5 warm-up iterations
    n = len(result.history)
    report = {"rank": group.rank, "world_size": group.world_size, "iterations": n,
              "median_s": statistics.median(per_iteration),
              "communication_s_per_iteration": sum(communication) / n if communication else 0.0}
    with open(os.path.join(out, f"rank{group.rank}.json"), "w") as f:
        json.dump(report, f)
    distributed.finish()


def launch(processes: int, iterations: int, threads: int = 1) -> dict:
    """Run :func:`worker` in ``processes`` ranks; rank 0's report."""
    with tempfile.TemporaryDirectory() as out:
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc-per-node={processes}", __file__, "--worker", out, "--iterations", str(iterations),
                   "--threads", str(threads)]
        subprocess.run(command, check=True, env=env, capture_output=True, text=True)
        with open(os.path.join(out, "rank0.json")) as f:
            return json.load(f)


def parameter_count(dlgm) -> "tuple[int, int]":
    """(θ, φ) sizes of a reference model, counted from Pyro's param store after one trace."""
    pyro.clear_param_store()
    x = torch.zeros(2, *dlgm.image_shape) if hasattr(dlgm, "image_shape") else None
    pyro.poutine.trace(dlgm.guide).get_trace(x)
    guide_params = {k: v.numel() for k, v in pyro.get_param_store().items()}
    pyro.poutine.trace(dlgm.model).get_trace(x)
    all_params = {k: v.numel() for k, v in pyro.get_param_store().items()}
    theta = sum(v for k, v in all_params.items() if k not in guide_params)
    return theta, sum(guide_params.values())


def projection() -> list:
    """Bytes all-reduced per iteration and ring all-reduce times (8 ranks) for the reference models."""
    models = {
        "MNIST MLP 784-200-200-50": (mlp_model(image_shape=(1, 28, 28), latent_dim=50), 50),
        "CIFAR-10 conv (latent 64)": (conv_model(image_size=32, channels=3, latent_dim=64), 64),
    }
    rows = []
    for name, (dlgm, latent) in models.items():
        theta, phi = parameter_count(dlgm)
        size = 4 * (theta + phi + 3 + latent)  # gradients + figures, then the preconditioner statistics
        ring = 2 * 7 / 8 * size
        rows.append({"model": name, "theta": theta, "phi": phi, "bytes": size,
                     "ring_ms_10gbit": ring * 8 / 10e9 * 1e3, "ring_ms_100gbit": ring * 8 / 100e9 * 1e3})
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=40, help="iterations per rank")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--out", default=results_path("distributed"))
    parser.add_argument("--note", help="free text stored with the results (shown on the page)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.worker:
        return worker(options.iterations, options.worker, options.threads)
    print(f"CPU cores: {os.cpu_count()}; torch {torch.__version__}; gloo; one intra-op thread per process\n")
    print("| processes | threads each | s / iteration (median) | data points / s | all-reduce s / iteration | "
          "scaling |\n|---|---|---|---|---|---|")
    runs = [(processes, 1) for processes in options.processes]
    if os.cpu_count() > 1:  # the other way to use the machine: one process, one intra-op thread per core
        runs.append((1, os.cpu_count()))
    rows, baseline = [], None
    for processes, threads in runs:
        report = launch(processes, options.iterations, threads=threads)
        throughput = processes * BATCH / report["median_s"]
        baseline = baseline or throughput
        rows.append({"processes": processes, "threads": threads, "median_s": report["median_s"],
                     "data_points_per_s": throughput, "allreduce_s": report["communication_s_per_iteration"],
                     "scaling": throughput / baseline})
        print(f"| {processes} | {threads} | {report['median_s']:.4f} | {throughput:.0f} | "
              f"{report['communication_s_per_iteration']:.4f} | {throughput / baseline:.2f}x |", flush=True)
    traffic = projection()
    print("\nCommunication per iteration (float32; Langevin steps of local latents communicate nothing):\n")
    for row in traffic:
        print(f"{row['model']}: θ {row['theta']:,}, φ {row['phi']:,}, {row['bytes'] / 1e6:.2f} MB per rank; "
              f"ring all-reduce over 8 ranks {row['ring_ms_10gbit']:.2f} ms at 10 Gbit/s, "
              f"{row['ring_ms_100gbit']:.3f} ms at 100 Gbit/s")
    write_results(options.out, {"iterations": options.iterations, "num_steps": NUM_STEPS, "batch": BATCH,
                                "rows": rows, "traffic": traffic}, options.note)


if __name__ == "__main__":
    main()
