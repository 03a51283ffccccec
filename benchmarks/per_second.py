"""LPC against the VAE per second of compute on MNIST (issue 8's targets).

Protocol (``benchmarks/run.py``'s, every method alike): the 784-200-200-50 tanh MLP
decoder and encoder, Bernoulli likelihood, batch 100 of dynamically binarised
training images from one shared stream, the same initial weights, Adam with one
learning rate for θ and φ; each method trains for ``--seconds`` of wall-clock
time (snapshots at fixed iteration counts and fractions of the budget; snapshot
time excluded). Test NLL = −(IWAE bound, k = ``--eval-samples``) with the
method's own guide on the first ``--test-images`` statically binarised test
images. Learning rates: ``--lr-lpc`` / ``--lr-vae``, by default the ones
``benchmarks/run.py --budget small`` chose on the grid {1e-3, 3e-3} (LPC 3e-3,
VAE 1e-3; ``benchmarks/results/small.json``).

Reported: iterations and ms per iteration; NLL at fixed iteration counts, at
fractions of the budget and at the end; how many iterations each LPC variant
needs to reach the VAE's NLL at ``--match-iteration`` (the first snapshot at or
below it); and where an LPC iteration spends its time (cProfile, by phase).

    python benchmarks/per_second.py --seconds 360            # the 6-minute comparison
    python benchmarks/per_second.py --seconds 60 --eval-samples 200 --test-images 500   # a quick look
    python benchmarks/per_second.py --device cuda ...        # model, batches and evaluation on a GPU
"""
import argparse
import cProfile
import copy
import dataclasses
import json
import os
import pstats
import time

import pyro
import torch

import run as bench
from pyro_lpc import AdaptiveSteps, fit

VARIANTS = {
    "VAE": bench.Method("VAE", "svi", {"objective": "elbo"}),
    "LPC K=20, keep all": bench.Method("LPC K=20, keep all", "lpc", {"num_steps": 20, "keep": "all"}),
    "LPC K=20, keep last": bench.Method("LPC K=20, keep last", "lpc", {"num_steps": 20, "keep": "last"}),
    "LPC K=5, keep last": bench.Method("LPC K=5, keep last", "lpc", {"num_steps": 5, "keep": "last"}),
    "LPC K=5, keep last, η adapted": bench.Method(
        "LPC K=5, keep last, η adapted", "lpc", {"num_steps": 5, "keep": "last", "target_accept": 0.57}),
    "LPC auto K ≤ 20, keep last": bench.Method(
        "LPC auto K ≤ 20, keep last", "lpc", {"num_steps": "auto", "keep": "last"}),
    "LPC auto, tolerance 3": bench.Method(
        "LPC auto, tolerance 3", "lpc", {"num_steps": AdaptiveSteps(tolerance=3.0), "keep": "last"}),
    "LPC K=0 (guide draws)": bench.Method("LPC K=0 (guide draws)", "lpc", {"num_steps": 0}),
    # the chains' energy and gradient recorded once and compiled by torch.compile (pyro_lpc.compiled)
    "LPC K=5, keep last, η adapted, compiled": bench.Method(
        "LPC K=5, keep last, η adapted, compiled", "lpc",
        {"num_steps": 5, "keep": "last", "target_accept": 0.57, "jit_compile": {}}),
    "LPC auto, tolerance 3, compiled": bench.Method(
        "LPC auto, tolerance 3, compiled", "lpc",
        {"num_steps": AdaptiveSteps(tolerance=3.0), "keep": "last", "jit_compile": {}}),
    # on a GPU: the compiled recording replayed as a CUDA graph
    "LPC K=5, keep last, η adapted, CUDA graphs": bench.Method(
        "LPC K=5, keep last, η adapted, CUDA graphs", "lpc",
        {"num_steps": 5, "keep": "last", "target_accept": 0.57, "jit_compile": {"mode": "reduce-overhead"}}),
}
PHASES = dict(bench.PHASES, fused_gradients="K = 0: θ and φ gradients in one pass")


def fresh(method):
    """``method`` with its own copy of its options (a step schedule carries state)."""
    return dataclasses.replace(method, options=copy.deepcopy(method.options))


def profile_iterations(method, data, lr, seed, device="cpu", iterations=30) -> dict:
    """Share of an LPC iteration's time in each phase (cProfile cumulative times)."""
    method = fresh(method)
    dlgm = bench.mnist_model(seed, device)
    gen = torch.Generator().manual_seed(seed)
    batches = [(torch.bernoulli(data["train"][i * bench.BATCH:(i + 1) * bench.BATCH], generator=gen).to(device),)
               for i in range(iterations)]
    pyro.clear_param_store()
    profiler = cProfile.Profile()
    profiler.runcall(fit, dlgm.model, dlgm.guide, batches, progress=False, seed=seed,
                     optim=pyro.optim.Adam({"lr": lr}), guide_optim=pyro.optim.Adam({"lr": lr}), **method.options)
    totals = dict.fromkeys(list(PHASES) + ["fit"], 0.0)
    for (filename, _, name), (_, _, _, cumulative, _) in pstats.Stats(profiler).stats.items():
        if filename.endswith(os.path.join("pyro_lpc", "fit.py")) and name in totals:
            totals[name] += cumulative
    if not totals["fit"]:  # cProfile recorded no fit frame (seen on an H200 with CUDA graphs; cause not found)
        return {}
    return {PHASES[name]: totals[name] / totals["fit"] for name in PHASES if totals[name]}


def nll_at(run, iteration):
    snap = bench.snapshot_at(run, iteration)
    return None if snap is None else -snap["test_ll"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=360.0)
    parser.add_argument("--methods", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--lr-lpc", type=float, nargs="+", default=[3e-3],
                        help="one run of each LPC variant per learning rate")
    parser.add_argument("--lr-vae", type=float, nargs="+", default=[1e-3],
                        help="one VAE run per learning rate (the best at the end is the VAE's figure)")
    parser.add_argument("--eval-samples", type=int, default=1000)
    parser.add_argument("--test-images", type=int, default=1000)
    parser.add_argument("--iterations", type=int, nargs="+", default=[1000, 2000, 4000, 8000, 16000, 32000])
    parser.add_argument("--match-iteration", type=int, default=16000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cuda: model, batches and evaluation on the GPU")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-root", default=bench.default_data_root())
    parser.add_argument("--out", default=str(bench.RESULTS / "per_second.json"))
    options = parser.parse_args()
    torch.set_num_threads(options.threads)
    budget = dataclasses.replace(bench.BUDGETS["small"], mnist_seconds=options.seconds,
                                 snapshot_iterations=tuple(options.iterations), snapshot_fractions=(1 / 6, 0.5, 1.0),
                                 eval_samples=options.eval_samples, test_images=options.test_images)
    data = bench.mnist_data(bench.writable_mnist_root(options.data_root), budget, options.seed)
    where = torch.cuda.get_device_name() if options.device.startswith("cuda") else "CPU"
    print(f"{bench.machine()}; {where}; torch threads {options.threads}; {options.seconds:g} s per method; "
          f"test NLL: IWAE k={options.eval_samples} on {options.test_images} test images", flush=True)
    runs = []
    jobs = [(key, lr) for key in options.methods
            for lr in (options.lr_vae if VARIANTS[key].family == "svi" else options.lr_lpc)]
    for key, lr in jobs:
        method = fresh(VARIANTS[key])
        started = time.time()
        run = bench.run_mnist_method(method, lr, data, budget, options.seed, device=options.device)
        run.pop("dlgm")
        history = run.pop("history")
        steps = [row.get("num_steps", 0) for row in history]
        run["mean_num_steps"] = sum(steps) / max(len(steps), 1) if method.family == "lpc" else None
        run["wall_seconds"] = time.time() - started
        runs.append(bench.strip_states(run))
    vaes = [r for r in runs if r["label"] == "VAE"]
    vae = max(vaes, key=lambda r: r["snapshots"][-1]["test_ll"]) if vaes else None
    target = nll_at(vae, options.match_iteration) if vae else None
    fractions = sorted({round(s["seconds"] / options.seconds, 2) for r in runs for s in r["snapshots"]
                        if s["iteration"] not in options.iterations} - {0.0})
    header = ["method", "lr", "iterations", "ms / it", "mean K"] + [f"NLL @ {i} it" for i in options.iterations[:5]] \
        + ["NLL at the end"] + [f"it. to VAE's NLL @ {options.match_iteration}"]
    rows = []
    for r in runs:
        reach = None
        if target is not None and r is not vae:
            hit = [s["iteration"] for s in r["snapshots"] if -s["test_ll"] <= target]
            if r["label"] == "VAE":
                hit = []
            reach = f"{min(hit)}" if hit else f"not reached in {r['iterations']}"
        rows.append([r["label"], f"{r['lr']:g}", str(r["iterations"]), f"{r['ms_per_iteration']:.1f}",
                     "-" if r["mean_num_steps"] is None else f"{r['mean_num_steps']:.1f}"]
                    + [bench.fmt(nll_at(r, i)) for i in options.iterations[:5]]
                    + [bench.fmt(-r["snapshots"][-1]["test_ll"])]
                    + [reach if r["label"] != "VAE" else ("target" if r is vae else "-")])
    print()
    print(bench.table(header, rows))
    at_fractions = [[r["label"] + f" (lr {r['lr']:g})"] + [f"{-s['test_ll']:.2f} ({s['iteration']} it)"
                     for s in r["snapshots"] if s["iteration"] not in options.iterations] for r in runs]
    print("\nNLL at equal wall-clock (iterations reached):\n")
    print(bench.table(["method"] + [f"{f:.0%} of the budget" for f in fractions], at_fractions))
    print(f"\nThe VAE's figure: lr {vae['lr']:g} (best at the end); its NLL at {options.match_iteration} "
          f"iterations: {bench.fmt(target)}" if vae else "")
    profiles = {}
    for r in runs:
        method = VARIANTS[next(k for k, m in VARIANTS.items() if m.label == r["label"])]
        if method.family == "lpc":
            profiles[r["label"]] = profile_iterations(method, data, r["lr"], options.seed, options.device)
            shares = ", ".join(f"{name} {100 * share:.0f}%" for name, share in profiles[r["label"]].items())
            print(f"where the time goes, {r['label']}: {shares}")
    os.makedirs(os.path.dirname(options.out), exist_ok=True)
    with open(options.out, "w") as f:
        json.dump({"options": vars(options), "machine": bench.machine(), "device": where, "runs": runs,
                   "vae_target": target, "profiles": profiles}, f, indent=1)
    print(f"\nwrote {options.out}")


if __name__ == "__main__":
    main()
