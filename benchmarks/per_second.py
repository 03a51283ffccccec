"""LPC against the VAE per second of compute on MNIST (issue 8's targets).

Protocol (``common``'s MNIST protocol, every method alike): the 784-200-200-50 tanh MLP
decoder and encoder, Bernoulli likelihood, batch 100 of dynamically binarised
training images from one shared stream, the same initial weights, Adam with one
learning rate for θ and φ; each method trains for ``--seconds`` of wall-clock
time (snapshots at fixed iteration counts and fractions of the budget; snapshot
time excluded). Test NLL = −(IWAE bound, k = ``--eval-samples``) with the
method's own guide on the first ``--test-images`` statically binarised test
images. Learning rates: ``--lr-lpc`` / ``--lr-vae``, by default the ones
``benchmarks/mnist.py --budget small`` chose on the grid {1e-3, 3e-3} (LPC 3e-3,
VAE 1e-3; ``benchmarks/results/mnist.json``). The training images are those of
``mnist.py``'s small budget (the last 500 held out).

Reported: iterations and ms per iteration; NLL at fixed iteration counts, at
fractions of the budget and at the end; how many iterations each LPC variant
needs to reach the VAE's NLL at ``--match-iteration`` (the first snapshot at or
below it); and where an LPC iteration spends its time (cProfile, by phase).

    python benchmarks/per_second.py --seconds 360            # the 6-minute comparison
    python benchmarks/per_second.py --seconds 60 --eval-samples 200 --test-images 500   # a quick look
    python benchmarks/per_second.py --device cuda ...        # model, batches and evaluation on a GPU
    python benchmarks/per_second.py --persistent-chains ...  # the LPC variants with persistent chains
    python benchmarks/per_second.py --seconds 1e9 --max-iterations 200000 ...   # per iteration, time unlimited
    python benchmarks/per_second.py --seconds 3 --methods VAE "LPC K=0 (guide draws)" --eval-samples 5 \
        --test-images 20 --iterations 10 --out /tmp/per_second.json   # runs, in a minute

Writes ``benchmarks/results/per_second.json`` (``--out``).
"""
import argparse
import cProfile
import copy
import dataclasses
import time

import pyro
import torch

from common import (BATCH, Method, default_data_root, machine, mnist_data, mnist_model, phase_shares, results_path,
                    run_mnist_method, strip_states, writable_mnist_root, write_results)
from pyro_lpc import AdaptiveSteps, fit
from render import fmt, snapshot_at, table

VARIANTS = {
    "VAE": Method("VAE", "svi", {"objective": "elbo"}),
    "LPC K=20, keep all": Method("LPC K=20, keep all", "lpc", {"num_steps": 20, "keep": "all"}),
    "LPC K=20, keep last": Method("LPC K=20, keep last", "lpc", {"num_steps": 20, "keep": "last"}),
    "LPC K=5, keep last": Method("LPC K=5, keep last", "lpc", {"num_steps": 5, "keep": "last"}),
    "LPC K=5, keep last, η adapted": Method(
        "LPC K=5, keep last, η adapted", "lpc", {"num_steps": 5, "keep": "last", "target_accept_prob": 0.57}),
    "LPC auto K ≤ 20, keep last": Method(
        "LPC auto K ≤ 20, keep last", "lpc", {"num_steps": "auto", "keep": "last"}),
    "LPC auto, tolerance 3": Method(
        "LPC auto, tolerance 3", "lpc", {"num_steps": AdaptiveSteps(tolerance=3.0), "keep": "last"}),
    "LPC K=0 (guide draws)": Method("LPC K=0 (guide draws)", "lpc", {"num_steps": 0}),
    # the chains' energy and gradient recorded once and compiled by torch.compile (pyro_lpc.compiled)
    "LPC K=5, keep last, η adapted, compiled": Method(
        "LPC K=5, keep last, η adapted, compiled", "lpc",
        {"num_steps": 5, "keep": "last", "target_accept_prob": 0.57, "jit_compile": True, "jit_options": {}}),
    # the fewest steps issue 17 counts as chains that run (mean K ≥ 3): K/2 VAE iterations' cost fewer than K = 5
    "LPC K=3, keep last, η adapted, compiled": Method(
        "LPC K=3, keep last, η adapted, compiled", "lpc",
        {"num_steps": 3, "keep": "last", "target_accept_prob": 0.57, "jit_compile": True, "jit_options": {}}),
    # Metropolis-adjusted chains (exact for fixed θ: what persistent chains carry across epochs)
    "LPC K=5, MALA, η adapted, compiled": Method(
        "LPC K=5, MALA, η adapted, compiled", "lpc",
        {"num_steps": 5, "keep": "last", "target_accept_prob": 0.57, "adjust": True, "jit_compile": True,
         "jit_options": {}}),
    "LPC auto, tolerance 3, compiled": Method(
        "LPC auto, tolerance 3, compiled", "lpc",
        {"num_steps": AdaptiveSteps(tolerance=3.0), "keep": "last", "jit_compile": True, "jit_options": {}}),
    # on a GPU: the compiled recording replayed as a CUDA graph
    "LPC K=5, keep last, η adapted, CUDA graphs": Method(
        "LPC K=5, keep last, η adapted, CUDA graphs", "lpc",
        {"num_steps": 5, "keep": "last", "target_accept_prob": 0.57, "jit_compile": True,
         "jit_options": {"mode": "reduce-overhead"}}),
}


#: ``fit``'s options that give the LPC variants persistent chains on batches ``(x, index)``
PERSISTENT = {"persistent_chains": True, "batch_args": lambda batch: batch[:1], "batch_indices": lambda batch: batch[1]}


def fresh(method, persistent=False):
    """``method`` with its own copy of its options (a step schedule carries state); with
    ``persistent``, an LPC method with persistent chains (its label says so)."""
    method = dataclasses.replace(method, options=copy.deepcopy(method.options))
    if persistent and method.family == "lpc":
        method = dataclasses.replace(method, label=method.label + ", persistent chains",
                                     options={**method.options, **PERSISTENT})
    return method


def profile_iterations(method, data, lr, seed, device="cpu", iterations=30) -> dict:
    """Share of an LPC iteration's time in each phase (:func:`common.phase_shares`); with
    persistent chains the batches cycle through 10 sets of images, so that they are revisited."""
    method = fresh(method)
    dlgm = mnist_model(seed, device)
    gen = torch.Generator().manual_seed(seed)
    persistent = method.options.get("persistent_chains", False)
    batches = []
    for i in range(iterations):
        index = torch.arange(BATCH) + BATCH * (i % 10 if persistent else i)
        x = torch.bernoulli(data["train"][index], generator=gen).to(device)
        batches.append((x, index) if persistent else (x,))
    pyro.clear_param_store()
    profiler = cProfile.Profile()
    profiler.runcall(fit, dlgm.model, dlgm.guide, batches, progress=False, seed=seed,
                     optim=pyro.optim.Adam({"lr": lr}), guide_optim=pyro.optim.Adam({"lr": lr}), **method.options)
    return phase_shares(profiler)


def nll_at(run, iteration):
    snap = snapshot_at(run, iteration)
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
    parser.add_argument("--max-iterations", type=int, default=None,
                        help="stop each run after this many iterations even if time is left (per-iteration "
                             "comparisons: with a large --seconds, every method gets the same iterations)")
    parser.add_argument("--match-iteration", type=int, default=16000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cuda: model, batches and evaluation on the GPU")
    parser.add_argument("--train-images", type=int, default=None,
                        help="train on the first N training images only (more visits per image)")
    parser.add_argument("--persistent-chains", action="store_true",
                        help="the LPC variants with fit(persistent_chains=True): each training image's chain "
                             "kept across epochs (labels end in ', persistent chains')")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-root", default=default_data_root())
    parser.add_argument("--out", default=results_path("per_second"))
    parser.add_argument("--note", help="free text stored with the results (shown on the page)")
    options = parser.parse_args()
    torch.set_num_threads(options.threads)
    data = mnist_data(writable_mnist_root(options.data_root), options.seed, val_images=500,
                      test_images=options.test_images, quality_images=1)
    data["train"] = data["train"][:options.train_images]
    where = torch.cuda.get_device_name() if options.device.startswith("cuda") else "CPU"
    print(f"{machine()}; {where}; torch threads {options.threads}; {options.seconds:g} s per method; "
          f"test NLL: IWAE k={options.eval_samples} on {options.test_images} test images", flush=True)
    runs, methods = [], {}
    jobs = [(key, lr) for key in options.methods
            for lr in (options.lr_vae if VARIANTS[key].family == "svi" else options.lr_lpc)]
    for key, lr in jobs:
        method = fresh(VARIANTS[key], options.persistent_chains)
        methods[method.label] = method
        started = time.time()
        run = run_mnist_method(method, lr, data, seconds=options.seconds, snapshot_iterations=options.iterations,
                               snapshot_fractions=(1 / 6, 0.5, 1.0), eval_samples=options.eval_samples,
                               seed=options.seed, device=options.device,
                               indexed=method.options.get("persistent_chains", False),
                               max_iterations=options.max_iterations)
        run.pop("dlgm")
        history = run.pop("history")
        steps = [row.get("num_steps", 0) for row in history]
        run["mean_num_steps"] = sum(steps) / max(len(steps), 1) if method.family == "lpc" else None
        stored = [row["stored_starts"] for row in history if "stored_starts" in row][-max(len(history) // 10, 1):]
        if stored:  # persistent chains: the fraction started from stored states, last tenth of the run
            run["stored_starts_last_tenth"] = sum(stored) / len(stored)
            print(f"{method.label}: {run['stored_starts_last_tenth']:.3f} of the chains started from their "
                  "stored state (last tenth of the run)", flush=True)
        run["wall_seconds"] = time.time() - started
        runs.append(strip_states(run))
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
                    + [fmt(nll_at(r, i)) for i in options.iterations[:5]]
                    + [fmt(-r["snapshots"][-1]["test_ll"])]
                    + [reach if r["label"] != "VAE" else ("target" if r is vae else "-")])
    print()
    print(table(header, rows))
    at_fractions = [[r["label"] + f" (lr {r['lr']:g})"] + [f"{-s['test_ll']:.2f} ({s['iteration']} it)"
                     for s in r["snapshots"] if s["iteration"] not in options.iterations] for r in runs]
    print("\nNLL at equal wall-clock (iterations reached):\n")
    print(table(["method"] + [f"{f:.0%} of the budget" for f in fractions], at_fractions))
    print(f"\nThe VAE's figure: lr {vae['lr']:g} (best at the end); its NLL at {options.match_iteration} "
          f"iterations: {fmt(target)}" if vae else "")
    profiles = {}
    for r in runs:
        method = methods[r["label"]]
        if method.family == "lpc":
            profiles[r["label"]] = profile_iterations(method, data, r["lr"], options.seed, options.device)
            shares = ", ".join(f"{name} {100 * share:.0f}%" for name, share in profiles[r["label"]].items())
            print(f"where the time goes, {r['label']}: {shares}")
    write_results(options.out, {"options": vars(options), "device": where, "runs": runs, "vae_target": target,
                                "profiles": profiles}, options.note)


if __name__ == "__main__":
    main()
