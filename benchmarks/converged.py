"""Converged quality on MNIST, compared by AIS (issue 17 item 3).

Each method trains until its held-out bound stops improving, and its best state is then
scored by annealed importance sampling from the prior, which does not depend on the guide.

Protocol (``common``'s MNIST protocol otherwise): the 784-200-200-50 tanh MLP decoder and
encoder, Bernoulli likelihood, batch 100 of dynamically binarised images, the same initial
weights and the same stream of batches for every method, Adam with one learning rate
(``--lr``, 1e-3) for θ and φ, one torch thread (``--threads``). The training set is the
first ``--train-images`` MNIST training images (default 5,000, 50 iterations an epoch).
On all 60,000 images the VAE's test bound still gains about 1 nat between 3 and 6
minutes (``per_second_6min_1thread_vae.json``), too slow to converge in the ~10 minutes
per method that the study has. On 5,000 images each image is seen hundreds of times in
that time, and the model overfits early: in a 60 s pilot of the VAE (3,000 iterations)
the bound on training images was already 5 nats above the held-out one.

*Held-out bound*: the IWAE bound (k = ``--held-out-samples``, the method's own guide) on
the last 500 training images (statically binarised, not in the training set), every
``--every`` iterations. Evaluation time is left out of the training clock and draws from
a forked random state, so it does not change training.

*Stopping*: the best state is kept; training stops when ``--patience`` evaluations in a
row have not beaten by more than ``--min-delta`` nats the last evaluation that did
(:class:`Patience`), or after ``--max-seconds`` of training (the run is then marked
capped, not converged).

*Evaluation of the best state*, on the first ``--test-images`` statically binarised test
images: AIS from the prior with ``--ais-chains`` chains and T = ``--ais-steps`` MALA
transitions, and again with 4T (a tight estimate changes little when T grows); the IWAE
bound (k = ``--test-samples``, own guide) on the same images, so IWAE − AIS shows the
guide's gap; and the IWAE bound (k = ``--held-out-samples``) on the first 500 training
images (statically binarised), next to the held-out bound, to show overfitting.

Two processes side by side (one per core), each method after the other in its process:

    python benchmarks/converged.py --methods VAE "LPC K=5, keep last, η adapted, compiled" \\
        --out benchmarks/results/converged_vae_k5.json
    python benchmarks/converged.py --methods "IWAE (k = 5)" "LPC auto, tolerance 3, compiled" \\
        --out benchmarks/results/converged_iwae_auto.json
    python benchmarks/converged.py --smoke --methods VAE --out /tmp/converged.json   # seconds

Writes ``benchmarks/results/converged.json`` (``--out``).
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from common import (BATCH, RESULTS, TimedStream, default_data_root, log, log_likelihood, machine, mnist_data, mnist_model,
                    results_path, stack, timed, train, writable_mnist_root, write_results)
from mnist import IWAE
from per_second import VARIANTS, fresh
from pyro_lpc.images.data import load_dataset
from pyro_lpc.marginal_likelihood import log_marginal_likelihood
from render import fmt, table

METHODS = {"VAE": VARIANTS["VAE"], IWAE.label: IWAE,
           **{key: VARIANTS[key] for key in ("LPC K=5, keep last, η adapted, compiled",
                                               "LPC auto, tolerance 3, compiled")}}
#: Images of the held-out set (mnist_data's last training images) and of the training-set bound.
BOUND_IMAGES = 500
#: ``--smoke``: sizes that run in seconds (figures meaningless).
SMOKE = dict(train_images=300, every=5, patience=2, max_seconds=3.0, held_out_samples=5, test_images=4,
             test_samples=10, ais_chains=2, ais_steps=5)


class Patience:
    """Early stopping for a score to maximise.

    `update` takes each new score; the run should stop (`stop`) once `patience` scores
    in a row have not exceeded `reference + min_delta`, where `reference` is the last score
    that did. `best` is the highest score seen (any rise counts), whose state the caller keeps.
    A non-finite score is never an improvement.

    Args:
        patience: scores in a row without a significant rise before stopping (≥ 1).
        min_delta: the rise (≥ 0) that counts as significant.
    """

    def __init__(self, patience: int, min_delta: float):
        if patience < 1:
            raise ValueError(f"patience must be at least 1, got {patience!r}")
        if not min_delta >= 0:
            raise ValueError(f"min_delta must be non-negative, got {min_delta!r}")
        self.patience, self.min_delta = patience, min_delta
        self.best = self.reference = -math.inf
        self.waited = 0

    def update(self, score: float) -> bool:
        """Take `score`; True when it is the best so far."""
        if score > self.reference + self.min_delta:
            self.reference, self.waited = score, 0
        else:
            self.waited += 1
        if score > self.best:
            self.best = score
            return True
        return False

    @property
    def stop(self) -> bool:
        return self.waited >= self.patience


class HeldOutStream(TimedStream):
    """A :class:`~common.TimedStream` that calls ``score()`` every ``every`` iterations (and at the
    end of the budget), keeps the module's state at the best score in ``best``, and ends when
    ``rule`` (a :class:`Patience`) says stop (``converged``). Scoring runs on a forked random
    state and its time is excluded from the clock."""

    def __init__(self, images, module, score, *, every: int, rule: Patience, **kwargs):
        super().__init__(images, module, **kwargs)
        self.score, self.every, self.rule = score, every, rule
        self.evaluations, self.best, self.converged = [], None, False

    def evaluate(self, iteration: int) -> None:
        """Score the module after ``iteration`` updates."""
        begin = time.perf_counter()
        with torch.random.fork_rng(devices=[]):
            value = self.score()
        entry = {"iteration": iteration, "seconds": self.clock.elapsed(), "held_out": value}
        if self.rule.update(value):
            self.best = {**entry, "state": {k: v.detach().clone() for k, v in self.module.state_dict().items()}}
        self.evaluations.append(entry)
        log(f"  {iteration} iterations, {entry['seconds']:.0f} s: held-out bound {value:.2f}")
        self.clock.exclude(time.perf_counter() - begin)

    def __iter__(self):
        for batch in super().__iter__():
            done = self.served - 1  # updates made before this batch
            if done and done % self.every == 0:
                self.evaluate(done)
                if self.rule.stop:
                    self.converged, self.served = True, done  # this batch goes unused
                    self.snapshot()
                    return
            yield batch
        if not self.evaluations or self.evaluations[-1]["iteration"] != self.served:
            self.evaluate(self.served)


def iwae_bound(dlgm, images, num_samples: int) -> float:
    """The IWAE bound with the guide, mean over ``images``, at the module's current state."""
    with torch.no_grad():
        return log_marginal_likelihood(dlgm.model, dlgm.guide, images, num_samples=num_samples,
                                       batch_size=BATCH).mean().item()


def run_method(key: str, data: dict, options) -> dict:
    """Train ``METHODS[key]`` until the held-out bound stops improving, then score its best state."""
    method = fresh(METHODS[key])
    dlgm = mnist_model(options.seed)
    rule = Patience(options.patience, options.min_delta)
    stream = HeldOutStream(data["train"], dlgm, lambda: iwae_bound(dlgm, data["val"], options.held_out_samples),
                           every=options.every, rule=rule, seconds=options.max_seconds, seed=options.seed,
                           binarize=True)
    started = time.time()
    run = train(method, dlgm, stream, options.lr, options.seed)
    history = run.pop("history")
    best = stream.best
    steps = [row.get("num_steps", 0) for row in history]
    out = {"label": method.label, "lr": options.lr, "iterations": run["iterations"], "seconds": run["seconds"],
           "ms_per_iteration": run["ms_per_iteration"], "diverged_at": run["diverged_at"],
           "mean_num_steps": sum(steps) / max(len(steps), 1) if method.family == "lpc" else None,
           "converged": stream.converged, "evaluations": stream.evaluations,
           "best_iteration": best["iteration"], "best_seconds": best["seconds"], "held_out": best["held_out"],
           "training_seconds_with_held_out": time.time() - started}
    log(f"{method.label}: best held-out bound {best['held_out']:.2f} at {best['iteration']} iterations "
        f"({best['seconds']:.0f} s); {'converged' if stream.converged else 'capped'} at {run['iterations']}")
    state, test = best["state"], data["test"]
    evaluation_started = time.time()
    out["train_bound"] = log_likelihood(dlgm, state, data["train_bound"], num_samples=options.held_out_samples)
    out["test_iwae"] = log_likelihood(dlgm, state, test, num_samples=options.test_samples)
    out["ais"] = {}
    for length in (options.ais_steps, 4 * options.ais_steps):
        values, seconds = timed(log_likelihood, dlgm, state, test, num_samples=options.ais_chains, use_guide=False,
                                method="ais", ais_steps=length, per_image=True)
        out["ais"][str(length)] = {"log_likelihood": sum(values) / len(values), "per_image": values,
                                   "seconds": seconds}
        log(f"  AIS, {options.ais_chains} chains × {length} steps: {sum(values) / len(values):.2f} ({seconds:.0f} s)")
    out["evaluation_seconds"] = time.time() - evaluation_started
    out["wall_seconds"] = time.time() - started
    return out


def summary(runs: list, ais_steps: int) -> str:
    long = str(4 * ais_steps)
    return table(["method", "it. to best", "min to best", "", "held-out", "train", f"AIS T={ais_steps}",
                  f"AIS T={long}", "test IWAE", "wall min"],
                 [[r["label"], r["best_iteration"], fmt(r["best_seconds"] / 60, 1),
                   "converged" if r["converged"] else "capped", fmt(r["held_out"]), fmt(r["train_bound"]),
                   fmt(r["ais"][str(ais_steps)]["log_likelihood"]), fmt(r["ais"][long]["log_likelihood"]),
                   fmt(r["test_iwae"]), fmt(r["wall_seconds"] / 60, 1)] for r in runs])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--train-images", type=int, default=5000)
    parser.add_argument("--every", type=int, default=1000, help="iterations between held-out evaluations")
    parser.add_argument("--patience", type=int, default=4)
    parser.add_argument("--min-delta", type=float, default=0.1, help="nats")
    parser.add_argument("--max-seconds", type=float, default=420.0, help="training time cap per method")
    parser.add_argument("--held-out-samples", type=int, default=100)
    parser.add_argument("--test-images", type=int, default=100)
    parser.add_argument("--test-samples", type=int, default=1000)
    parser.add_argument("--ais-chains", type=int, default=10)
    parser.add_argument("--ais-steps", type=int, default=500, help="T; AIS also runs with 4T")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes that run in seconds (figures meaningless)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-root", default=default_data_root())
    parser.add_argument("--out", default=results_path("converged"))
    parser.add_argument("--note", help="free text stored with the results (shown on the page)")
    options = parser.parse_args()
    if options.smoke:
        if Path(options.out).resolve().parent == RESULTS:
            parser.error("--smoke figures are meaningless: give an --out outside benchmarks/results")
        vars(options).update(SMOKE)
    torch.set_num_threads(options.threads)
    root = writable_mnist_root(options.data_root)
    data = mnist_data(root, options.seed, val_images=BOUND_IMAGES, test_images=options.test_images,
                      quality_images=1)
    data["train"] = data["train"][:options.train_images]
    static_train = load_dataset("mnist", root, "train", binarize="static", seed=options.seed)
    data["train_bound"] = stack(static_train, range(min(BOUND_IMAGES, options.train_images)))
    print(f"{machine()}; {options.train_images} training images; at most {options.max_seconds:g} s per method",
          flush=True)
    runs = [run_method(key, data, options) for key in options.methods]
    print()
    print(summary(runs, options.ais_steps))
    write_results(options.out, {"options": vars(options), "runs": runs}, options.note)


if __name__ == "__main__":
    main()
