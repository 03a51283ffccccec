"""Robustness of LPC's learning to the Langevin step size η, with and without preconditioning.

    python benchmarks/step_size.py --budget small   # digits
    python benchmarks/step_size.py --budget full    # MNIST
    python benchmarks/step_size.py --budget smoke --out /tmp/step_size.json --images-dir /tmp

LPC (Jeffreys warm start, ``fit``'s K and ``keep``, Adam 1e-3) over a grid of η, with the
shared diagonal preconditioner and without one, unadjusted (ULA) and Metropolis-adjusted
(MALA); each cell trains for ``seconds`` and reports the final test IWAE bound and, for MALA,
the mean acceptance rate over the last quarter of the run. The paper's claim: preconditioning
makes learning robust to the step size.

Writes ``benchmarks/results/step_size.json`` and ``step_size.png`` in ``--images-dir``.
"""
from __future__ import annotations

import argparse
import dataclasses
import shutil
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Tuple

import torch

from common import (IMAGES, Method, TimedStream, default_data_root, final_state, fit_settings, log, log_likelihood,
                    mnist_model, pyplot, results_path, stack, timed, train, writable_mnist_root, write_results)
from pyro_lpc.images.data import load_dataset
from pyro_lpc.images.models import mlp_model


@dataclass(frozen=True)
class Budget:
    dataset: str  # "digits" (scikit-learn's embedded 8×8 digits) or "mnist"
    seconds: float  # training time of every cell
    step_sizes: Tuple[float, ...]
    eval_samples: int  # k of the IWAE bound
    test_images: int  # at most this many statically binarised test images


BUDGETS = {
    "smoke": Budget(dataset="digits", seconds=1, step_sizes=(1e-2,), eval_samples=10, test_images=50),
    "small": Budget(dataset="digits", seconds=15, step_sizes=(1e-3, 1e-2, 1e-1), eval_samples=500,
                    test_images=10000),
    "full": Budget(dataset="mnist", seconds=120, step_sizes=(1e-3, 3e-3, 1e-2, 3e-2, 1e-1), eval_samples=5000,
                   test_images=10000),
}


def label(precondition, adjust) -> str:
    return f"{'MALA' if adjust else 'ULA'}, {'diagonal' if precondition else 'no'} preconditioner"


def experiment(data_root: str, budget: Budget, seed: int) -> dict:
    root = writable_mnist_root(data_root) if budget.dataset == "mnist" else None
    try:
        grey = stack(load_dataset(budget.dataset, root, "train"))
        test = load_dataset(budget.dataset, root, "test", binarize="static", seed=seed)
        test = stack(test, range(min(budget.test_images, len(test))))
    finally:
        if root:
            shutil.rmtree(root, ignore_errors=True)

    def model():
        if budget.dataset == "mnist":
            return mnist_model(seed)
        torch.manual_seed(seed)
        return mlp_model(image_shape=(1, 8, 8), latent_dim=16, likelihood="bernoulli")

    rows = []
    for precondition in ("diagonal", None):
        for adjust in (False, True):
            for eta in budget.step_sizes:
                method = Method(f"η={eta:g}", "lpc", {"step_size": eta, "precondition": precondition,
                                                      "adjust": adjust})
                dlgm = model()
                stream = TimedStream(grey, dlgm, seconds=budget.seconds, seed=seed, binarize=True)
                run = train(method, dlgm, stream, 1e-3, seed)
                accept = [r["accept_rate"] for r in run["history"] if "accept_rate" in r]
                test_ll, seconds = timed(log_likelihood, dlgm, final_state(run), test,
                                         num_samples=budget.eval_samples)
                rows.append({
                    "precondition": precondition, "adjust": adjust, "step_size": eta,
                    "iterations": run["iterations"], "diverged_at": run["diverged_at"], "test_ll": test_ll,
                    "eval_seconds": seconds,
                    "accept_rate": statistics.mean(accept[-max(1, len(accept) // 4):]) if accept else None,
                })
                log(f"{label(precondition, adjust)}, η = {eta:g}: test log-lik {test_ll:.2f}")
    return {"dataset": budget.dataset, "num_test": len(test), "rows": rows}


def plot(rows, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for precondition in ("diagonal", None):
        for adjust in (False, True):
            ok = [r for r in rows if (r["precondition"], r["adjust"]) == (precondition, adjust)
                  and r["diverged_at"] is None]
            ax.plot([r["step_size"] for r in ok], [r["test_ll"] for r in ok], marker="o",
                    ls="-" if precondition else "--", label=label(precondition, adjust))
    ax.set_xscale("log")
    ax.set_xlabel("Langevin step size η")
    ax.set_ylabel("final test log-likelihood (nats)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", choices=list(BUDGETS), default="small")
    parser.add_argument("--data-root", default=default_data_root(),
                        help="folder with MNIST/raw, for --budget full (default: $PYRO_LPC_DATA or ../shared/data)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=results_path("step_size"))
    parser.add_argument("--images-dir", default=str(IMAGES))
    parser.add_argument("--note", help="free text stored with the results (shown on the page)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    budget = BUDGETS[args.budget]
    result = experiment(args.data_root, budget, args.seed)
    Path(args.images_dir).mkdir(parents=True, exist_ok=True)
    plot(result["rows"], Path(args.images_dir) / "step_size.png")
    write_results(args.out, {"budget_name": args.budget, "budget": dataclasses.asdict(budget),
                             "threads": args.threads, "seed": args.seed, "lpc_settings": fit_settings(),
                             **result}, args.note)


if __name__ == "__main__":
    main()
