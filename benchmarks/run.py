r"""LPC against Pyro's VAE and IWAE on real data; writes ``docs/benchmarks.md``.

Run it from any directory (it works in the repository root)::

    python benchmarks/run.py --budget small   # about 20 minutes on 2 CPU cores
    python benchmarks/run.py --budget full    # many hours: see BUDGETS and the page
    python benchmarks/run.py --budget small --render-only   # rebuild the page from the saved results

The script writes ``docs/benchmarks.md`` (tables, the command, machine, date and budget),
PNG figures under ``docs/img/`` and the raw numbers in ``benchmarks/results/<budget>.json``;
the figures measured by the other scripts (``benchmarks/measured.md``) are appended verbatim
under "Other measurements".

Protocol (every method alike; one seed; torch threads fixed by ``--threads``, default 2):

1. **MNIST.** The IWAE paper's 784-200-200-50 tanh MLP decoder and encoder
   (:func:`pyro_lpc.models.mlp_model`), Bernoulli likelihood, batch 100, Adam on θ and φ with
   one learning rate, the same initial weights for every method. Training images are
   dynamically binarised (a fresh Bernoulli draw of every pixel per batch) from one shared
   stream of batches, the same for all methods; the last ``val_images`` training images are
   held out for choosing learning rates. Every method trains for the same wall-clock budget.
   Parameters are snapshotted at fixed iteration counts and at fixed fractions of the budget
   (snapshot time is excluded from the clock), so each run gives test log-likelihood against
   both iterations and seconds. Test log-likelihood: the IWAE bound (k = ``eval_samples``)
   with the method's own guide as proposal (the prior for the encoder-free run, which has
   none) on the first ``test_images`` statically binarised test images; for the final models
   also AIS started from the prior (proposal-independent: the same for every method) on the
   first ``ais_images`` of them. The learning rate of each family is chosen on the IWAE bound
   of the held-out images over ``lr_grid``: LPC with the Jeffreys warm start for every LPC
   variant, the VAE for the VAE and IWAE. LPC uses ``fit``'s defaults (K, η, ``keep``,
   diagonal preconditioner) unless a variant says otherwise. Sample quality: Fréchet distance
   and density/coverage of decoded prior draws (the likelihood's mean) against grey-level
   test images, in the feature space of a LeNet (:func:`~pyro_lpc.evaluate.train_feature_extractor`)
   trained on the training images and labels.
2. **CIFAR-10.** The β-VAE-style conv model (:func:`pyro_lpc.models.conv_model`), discretised
   Gaussian likelihood (σ = 0.1), pixels in [-1, 1], batch 100; LPC (Jeffreys) and the VAE, each
   with its family's MNIST learning rate, for the same wall-clock budget. Fréchet distance,
   density and coverage of 1,000 samples against the 1,000 pixel-exact test images, in the
   feature space of a LeNet trained on the 50,000 training images and labels.
3. **Step-size robustness.** LPC (Jeffreys, Adam 1e-3, K from ``fit``) over a grid of Langevin
   step sizes η, with the shared diagonal preconditioner and without one, unadjusted (ULA) and
   Metropolis-adjusted (MALA); the final test IWAE bound of each short run.
4. **Cost.** ms per iteration from the MNIST runs, and ``fit`` against the hand-written
   PyTorch loop of ``benchmarks/fit_overhead.py`` (its functions, imported), with peak memory,
   plus a cProfile breakdown of one ``fit`` iteration.
"""
from __future__ import annotations

import argparse
import cProfile
import dataclasses
import datetime
import inspect
import json
import math
import os
import pstats
import re
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pyro
import torch

import fit_overhead
from kernel import loadavg, machine
from pyro_lpc import fit
from pyro_lpc.baselines import fit_svi
from pyro_lpc.data import load_dataset
from pyro_lpc.evaluate import log_marginal_likelihood, sample_quality, train_feature_extractor
from pyro_lpc.fit import NonFiniteError
from pyro_lpc.models import conv_model, mlp_model

REPO = Path(__file__).resolve().parent.parent
PAGE = REPO / "docs" / "benchmarks.md"
IMAGES = REPO / "docs" / "img"
MEASURED = REPO / "benchmarks" / "measured.md"
RESULTS = REPO / "benchmarks" / "results"
BATCH = 100
EVAL_SEED = 1234  # seeds every evaluation (guide draws, AIS chains, prior samples)
FIT_DEFAULTS = {name: p.default for name, p in inspect.signature(fit).parameters.items()
                if p.default is not inspect.Parameter.empty}


# =====================================================================================
# budgets and methods
# =====================================================================================
@dataclass(frozen=True)
class Budget:
    """Everything that differs between ``--budget small`` and ``--budget full``."""

    mnist_seconds: float  # training time of every MNIST run
    lr_grid: Tuple[float, ...]  # Adam learning rates tried for each method family
    snapshot_iterations: Tuple[int, ...]  # snapshots at these iteration counts ...
    snapshot_fractions: Tuple[float, ...]  # ... and at these fractions of the time budget
    eval_samples: int  # k of the IWAE bound
    test_images: int  # statically binarised MNIST test images for the IWAE bound
    val_images: int  # held-out training images for choosing the learning rate
    ais_images: int  # test images for AIS
    ais_chains: int
    ais_steps: int
    quality_images: int  # samples (and real images) for Fréchet distance, density, coverage
    feature_epochs: int  # epochs of the LeNet feature extractor
    cifar_seconds: float
    robustness_dataset: str  # "digits" or "mnist"
    robustness_seconds: float
    step_sizes: Tuple[float, ...]
    overhead_iterations: int  # timed iterations of fit vs the hand-written loop


BUDGETS = {
    "small": Budget(
        mnist_seconds=60, lr_grid=(1e-3, 3e-3), snapshot_iterations=(300, 1000, 3000),
        snapshot_fractions=(0.25, 0.5, 1.0), eval_samples=500, test_images=500, val_images=500,
        ais_images=50, ais_chains=10, ais_steps=1000, quality_images=1000, feature_epochs=5,
        cifar_seconds=90, robustness_dataset="digits", robustness_seconds=15,
        step_sizes=(1e-3, 1e-2, 1e-1), overhead_iterations=20,
    ),
    "full": Budget(
        mnist_seconds=600, lr_grid=(3e-4, 1e-3, 3e-3), snapshot_iterations=(1000, 3000, 10000, 30000),
        snapshot_fractions=(0.25, 0.5, 1.0), eval_samples=5000, test_images=10000, val_images=1000,
        ais_images=200, ais_chains=10, ais_steps=3000, quality_images=1000, feature_epochs=10,
        cifar_seconds=900, robustness_dataset="mnist", robustness_seconds=120,
        step_sizes=(1e-3, 3e-3, 1e-2, 3e-2, 1e-1), overhead_iterations=50,
    ),
}


@dataclass(frozen=True)
class Method:
    """A training method: ``family`` "lpc" (``fit``) or "svi" (``fit_svi``), and its keywords."""

    label: str
    family: str
    options: dict = field(default_factory=dict)
    encoder: bool = True  # False: LPC without a guide (chains start from the prior)


LPC = Method("LPC (Jeffreys)", "lpc", {"warm_start": "jeffreys"})
RMSPROP = Method("LPC, per-chain rmsprop", "lpc", {"warm_start": "jeffreys", "precondition": "rmsprop"})
REVERSE = Method("LPC, reverse KL", "lpc", {"warm_start": "reverse"})
FORWARD = Method("LPC, forward KL", "lpc", {"warm_start": "forward"})
ENCODER_FREE = Method("LPC, encoder-free", "lpc", {}, encoder=False)
VAE = Method("VAE", "svi", {"objective": "elbo"})
IWAE = Method("IWAE (k = 5)", "svi", {"objective": "iwae", "num_particles": 5})
TUNED = {"lpc": LPC, "svi": VAE}  # the learning rate is tuned on these and reused by their family
MNIST_METHODS = [LPC, RMSPROP, REVERSE, FORWARD, ENCODER_FREE, VAE, IWAE]


# =====================================================================================
# data
# =====================================================================================
def default_data_root() -> str:
    return os.environ.get("PYRO_LPC_DATA") or str(REPO.parent / "shared" / "data")


def writable_mnist_root(data_root: str) -> str:
    """A temporary copy of ``<data_root>/MNIST`` (torchvision extracts the .gz files in place)."""
    tmp = tempfile.mkdtemp(prefix="pyro-lpc-bench-")
    shutil.copytree(Path(data_root) / "MNIST", Path(tmp) / "MNIST")
    return tmp


def stack(dataset, indices=None):
    """Items of an :class:`~pyro_lpc.data.ImageDataset` as one tensor (two with ``labels=True``)."""
    items = [dataset[i] for i in (indices if indices is not None else range(len(dataset)))]
    if isinstance(items[0], tuple):
        return torch.stack([x for x, _ in items]), torch.tensor([int(y) for _, y in items])
    return torch.stack(items)


class Clock:
    """Wall-clock seconds since creation, minus the time spent inside ``paused()``."""

    def __init__(self):
        self.start, self.excluded = time.perf_counter(), 0.0

    def elapsed(self) -> float:
        return time.perf_counter() - self.start - self.excluded

    def exclude(self, seconds: float) -> None:
        self.excluded += seconds


class TimedStream:
    """Shuffled mini-batches ``(x,)`` of ``images`` for ``seconds`` of wall-clock time.

    The clock starts at the first batch. When the trainer asks for a batch (that is, after
    its previous update) the stream snapshots ``module``'s parameters if the number of
    batches served reaches one of ``iterations`` or the clock passes one of ``fractions`` of
    the budget, and always at the end; snapshot time is excluded from the clock. Batches and
    binarisation (``binarize=True``: every pixel drawn as Bernoulli(grey level) afresh) come
    from a private generator, so every method sees the same stream; batches are then moved
    to ``device``.
    """

    def __init__(self, images, module, *, seconds, seed=0, binarize=False, iterations=(), fractions=(1.0,),
                 device="cpu"):
        self.images, self.module, self.seconds, self.device = images, module, float(seconds), device
        self.seed, self.binarize = seed, binarize
        self.iterations, self.fractions = sorted(iterations), sorted(fractions)
        self.snapshots: List[dict] = []
        self.served, self.clock = 0, Clock()

    def snapshot(self) -> None:
        """Record the module's parameters now (``train`` also calls it when training stops early)."""
        begin = time.perf_counter()
        state = {k: v.detach().clone() for k, v in self.module.state_dict().items()}
        self.snapshots.append({"iteration": self.served, "seconds": self.clock.elapsed(), "state": state})
        self.clock.exclude(time.perf_counter() - begin)

    def __iter__(self):
        gen = torch.Generator().manual_seed(self.seed)
        due_iterations, due_times = list(self.iterations), [f * self.seconds for f in self.fractions]
        order = torch.empty(0, dtype=torch.long)
        self.snapshots, self.served, self.clock = [], 0, Clock()
        while True:
            elapsed = self.clock.elapsed()
            finished = elapsed >= self.seconds
            if (finished or (due_iterations and self.served >= due_iterations[0])
                    or (due_times and elapsed >= due_times[0])):
                self.snapshot()
                due_iterations = [i for i in due_iterations if i > self.served]
                due_times = [t for t in due_times if t > elapsed]
            if finished:
                return
            if len(order) < BATCH:
                order = torch.cat([order, torch.randperm(len(self.images), generator=gen)])
            index, order = order[:BATCH], order[BATCH:]
            x = self.images[index]
            self.served += 1
            yield ((torch.bernoulli(x, generator=gen) if self.binarize else x).to(self.device),)


# =====================================================================================
# training and evaluation
# =====================================================================================
def train(method: Method, dlgm, stream: TimedStream, lr: float, seed: int) -> dict:
    """Train ``dlgm`` with ``method`` on ``stream``; returns the run's record (snapshots with
    their states, history, and the iteration of a non-finite stop, if any)."""
    pyro.clear_param_store()
    common = dict(seed=seed, progress=False, optim=pyro.optim.Adam({"lr": lr}))
    diverged_at = None
    try:
        if method.family == "lpc":
            result = fit(dlgm.model, dlgm.guide if method.encoder else None, stream,
                         guide_optim=pyro.optim.Adam({"lr": lr}), **common, **method.options)
        else:
            result = fit_svi(dlgm.model, dlgm.guide, stream, **common, **method.options)
        history = result.history
    except NonFiniteError as error:  # the parameters hold their last finite values
        history = error.result.history
        diverged_at = len(history)
        stream.snapshot()
    last = stream.snapshots[-1]
    return {"label": method.label, "lr": lr, "iterations": last["iteration"], "seconds": last["seconds"],
            "ms_per_iteration": 1e3 * last["seconds"] / max(last["iteration"], 1), "diverged_at": diverged_at,
            "snapshots": stream.snapshots, "history": history}


def log_likelihood(dlgm, state, images, *, num_samples, use_guide=True, method="iwae", **ais) -> float:
    """Mean per-image ``log p(x)`` estimate of the model (and guide) with parameters ``state``."""
    dlgm.load_state_dict(state)
    pyro.clear_param_store()
    torch.manual_seed(EVAL_SEED)
    with torch.set_grad_enabled(method == "ais"):  # AIS differentiates inside; IWAE needs no graph
        estimate = log_marginal_likelihood(dlgm.model, dlgm.guide if use_guide else None, images,
                                           num_samples=num_samples, method=method, batch_size=BATCH, **ais)
    return estimate.mean().item()


def timed(fn, *args, **kwargs):
    """``(fn(*args, **kwargs), seconds it took)``."""
    begin = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - begin


def evaluate_snapshots(run: dict, dlgm, images, num_samples: int, use_guide: bool) -> None:
    """Add ``test_ll`` (and the seconds it took, ``eval_seconds``) to every snapshot of ``run``."""
    for snap in run["snapshots"]:
        snap["test_ll"], snap["eval_seconds"] = timed(log_likelihood, dlgm, snap["state"], images,
                                                      num_samples=num_samples, use_guide=use_guide)


def samples(dlgm, state, n: int) -> torch.Tensor:
    dlgm.load_state_dict(state)
    torch.manual_seed(EVAL_SEED)
    return dlgm.sample(n)


def final_state(run: dict) -> dict:
    return run["snapshots"][-1]["state"]


def strip_states(run: dict) -> dict:
    """The run's record without the model, parameter states and per-iteration history (for JSON)."""
    out = {k: v for k, v in run.items() if k not in ("snapshots", "history", "dlgm")}
    out["snapshots"] = [{k: v for k, v in s.items() if k != "state"} for s in run["snapshots"]]
    return out


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# =====================================================================================
# 1. MNIST
# =====================================================================================
def mnist_model(seed: int, device="cpu"):
    torch.manual_seed(seed)  # the same initial weights for every method
    return mlp_model(image_shape=(1, 28, 28), latent_dim=50, hidden=(200, 200), likelihood="bernoulli").to(device)


def mnist_data(root: str, budget: Budget, seed: int) -> dict:
    grey, labels = stack(load_dataset("mnist", root, "train", labels=True))
    held_out = range(len(grey) - budget.val_images, len(grey))
    static_train = load_dataset("mnist", root, "train", binarize="static", seed=seed)
    static_test = load_dataset("mnist", root, "test", binarize="static", seed=seed)
    grey_test, test_labels = stack(load_dataset("mnist", root, "test", labels=True), range(budget.quality_images))
    return {
        "train": grey[: len(grey) - budget.val_images], "grey_train": grey, "train_labels": labels,
        "val": stack(static_train, held_out), "test": stack(static_test, range(budget.test_images)),
        "grey_test": grey_test, "test_labels": test_labels,
    }


def run_mnist_method(method, lr, data, budget, seed, extra_iterations=(), device="cpu") -> dict:
    dlgm = mnist_model(seed, device)
    stream = TimedStream(data["train"], dlgm, seconds=budget.mnist_seconds, seed=seed, binarize=True,
                         iterations=budget.snapshot_iterations + tuple(extra_iterations),
                         fractions=budget.snapshot_fractions, device=device)
    run = train(method, dlgm, stream, lr, seed)
    evaluate_snapshots(run, dlgm, data["test"].to(device), budget.eval_samples, use_guide=method.encoder)
    run["dlgm"] = dlgm
    log(f"MNIST {method.label}, lr {lr:g}: {run['iterations']} iterations, final test log-lik "
        f"{run['snapshots'][-1]['test_ll']:.2f}" + (f" (stopped: non-finite at {run['diverged_at']})"
                                                   if run["diverged_at"] is not None else ""))
    return run


def mnist_experiment(root: str, budget: Budget, seed: int) -> dict:
    data = mnist_data(root, budget, seed)
    grid, best, runs = [], {}, {}
    matched = ()  # later runs also snapshot at LPC (Jeffreys)'s final iteration count
    for family, method in TUNED.items():  # LPC first
        candidates = []
        for lr in budget.lr_grid:
            run = run_mnist_method(method, lr, data, budget, seed, matched)
            run["val_ll"], run["val_seconds"] = timed(log_likelihood, run["dlgm"], final_state(run), data["val"],
                                                      num_samples=budget.eval_samples)
            candidates.append(run)
        chosen = max(candidates, key=lambda r: r["val_ll"] if math.isfinite(r["val_ll"]) else -math.inf)
        best[family], runs[method.label] = chosen["lr"], chosen
        grid += [strip_states(r) | {"chosen": r is chosen} for r in candidates]
        if method is LPC:
            matched = (chosen["iterations"],)
    for method in MNIST_METHODS:
        if method.label not in runs:
            runs[method.label] = run_mnist_method(method, best[method.family], data, budget, seed, matched)

    log("MNIST: AIS and sample quality of the final models")
    extractor = train_feature_extractor(data["grey_train"], data["train_labels"], epochs=budget.feature_epochs,
                                        seed=seed)
    ais_images = data["test"][: budget.ais_images]
    for method in MNIST_METHODS:
        run, state = runs[method.label], final_state(runs[method.label])
        run["ais_ll"], run["ais_seconds"] = timed(log_likelihood, run["dlgm"], state, ais_images,
                                                  num_samples=budget.ais_chains, use_guide=False, method="ais",
                                                  ais_steps=budget.ais_steps)
        run["iwae_ll_ais_images"], run["iwae_ais_seconds"] = timed(log_likelihood, run["dlgm"], state, ais_images,
                                                                   num_samples=budget.eval_samples,
                                                                   use_guide=method.encoder)
        run["quality"] = sample_quality(data["grey_test"], samples(run["dlgm"], state, budget.quality_images),
                                        extractor)
    reference = sample_quality(data["grey_test"], data["grey_train"][: budget.quality_images], extractor)
    plot_sample_grids({m.label: samples(runs[m.label]["dlgm"], final_state(runs[m.label]), 36)
                       for m in MNIST_METHODS}, IMAGES / "mnist_samples.png", nrow=6)
    return {
        "grid": grid, "best_lr": best, "matched_iteration": matched[0],
        "runs": [strip_states(runs[m.label]) | {"encoder": m.encoder, "family": m.family} for m in MNIST_METHODS],
        "reference_quality": reference,
        "feature_accuracy": extractor.accuracy(data["grey_test"], data["test_labels"]),
    }


# =====================================================================================
# 2. CIFAR-10
# =====================================================================================
def cifar_experiment(root: str, budget: Budget, best_lr: Dict[str, float], seed: int) -> dict:
    images, labels = stack(load_dataset("cifar10", root, "train", labels=True))
    test, test_labels = stack(load_dataset("cifar10", root, "test", labels=True))
    test, test_labels = test[: budget.quality_images], test_labels[: budget.quality_images]
    log("CIFAR-10: feature extractor")
    extractor = train_feature_extractor(images, labels, epochs=budget.feature_epochs, seed=seed)
    out = {"feature_accuracy": extractor.accuracy(test, test_labels), "runs": [],
           "num_test": len(test), "reference_quality": sample_quality(test, images[: len(test)], extractor)}
    grids = {"real test images": test[:64]}
    for method in (LPC, VAE):
        torch.manual_seed(seed)
        dlgm = conv_model(image_size=32, channels=3, latent_dim=64, likelihood="discretized")
        stream = TimedStream(images, dlgm, seconds=budget.cifar_seconds, seed=seed)
        run = train(method, dlgm, stream, best_lr[method.family], seed)
        fake = samples(dlgm, final_state(run), len(test))
        run["quality"] = sample_quality(test, fake, extractor)
        grids[method.label] = fake[:64]
        out["runs"].append(strip_states(run))
        log(f"CIFAR-10 {method.label}: {run['iterations']} iterations, Fréchet distance "
            f"{run['quality']['frechet_distance']:.2f}")
    plot_sample_grids(grids, IMAGES / "cifar10_samples.png", nrow=8)
    return out


# =====================================================================================
# 3. step-size robustness
# =====================================================================================
def robustness_experiment(root: str, budget: Budget, seed: int) -> dict:
    if budget.robustness_dataset == "digits":
        grey = stack(load_dataset("digits", split="train"))
        test = stack(load_dataset("digits", split="test", binarize="static", seed=seed))

        def model():
            torch.manual_seed(seed)
            return mlp_model(image_shape=(1, 8, 8), latent_dim=16, likelihood="bernoulli")
    else:
        grey = stack(load_dataset("mnist", root, "train"))
        test = stack(load_dataset("mnist", root, "test", binarize="static", seed=seed), range(budget.test_images))

        def model():
            return mnist_model(seed)
    rows = []
    for precondition in ("diagonal", None):
        for adjust in (False, True):
            for eta in budget.step_sizes:
                method = Method(f"η={eta:g}", "lpc", {"step_size": eta, "precondition": precondition,
                                                      "adjust": adjust})
                dlgm = model()
                stream = TimedStream(grey, dlgm, seconds=budget.robustness_seconds, seed=seed, binarize=True)
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
                log(f"step size {eta:g}, precondition={precondition}, adjust={adjust}: "
                    f"test log-lik {rows[-1]['test_ll']:.2f}")
    return {"dataset": budget.robustness_dataset, "num_test": len(test), "rows": rows}


# =====================================================================================
# 4. cost
# =====================================================================================
PHASES = {
    "chain_start": "guide draw and model prototype",
    "run_chains": "K Langevin steps (one model gradient each)",
    "theta_gradients": "θ gradient over the kept samples",
    "guide_gradients": "warm-start (guide) loss and gradient",
    "_apply": "optimiser steps",
}


def profile_fit(num_steps: int, step_size: float, iterations: int = 10) -> dict:
    """Share of ``fit``'s time in each phase of an iteration (cProfile cumulative times)."""
    batches = fit_overhead.data(iterations, "cpu")
    dlgm = fit_overhead.make_model("cpu")
    profiler = cProfile.Profile()
    profiler.runcall(fit_overhead.time_fit, dlgm, batches, num_steps, step_size)
    totals = dict.fromkeys(list(PHASES) + ["fit"], 0.0)
    for (filename, _, name), (_, _, _, cumulative, _) in pstats.Stats(profiler).stats.items():
        if filename.endswith(os.path.join("pyro_lpc", "fit.py")) and name in totals:
            totals[name] += cumulative
    return {name: totals[name] / totals["fit"] for name in PHASES}


def cost_experiment(budget: Budget) -> dict:
    num_steps, step_size, warmup = FIT_DEFAULTS["num_steps"], FIT_DEFAULTS["step_size"], 5
    batches = fit_overhead.data(budget.overhead_iterations + warmup, "cpu")
    hand = fit_overhead.time_hand_written(fit_overhead.make_model("cpu"), batches, num_steps, step_size)[warmup:]
    ours = fit_overhead.time_fit(fit_overhead.make_model("cpu"), batches, num_steps, step_size)[warmup:]
    memory = {k: fit_overhead.peak_memory(k, "cpu")["rss"] for k in (5, num_steps, 4 * num_steps)}
    return {"num_steps": num_steps, "step_size": step_size, "iterations": budget.overhead_iterations,
            "hand_ms": 1e3 * statistics.median(hand), "fit_ms": 1e3 * statistics.median(ours),
            "peak_rss_mib": memory, "phases": profile_fit(num_steps, step_size)}


# =====================================================================================
# figures
# =====================================================================================
def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_sample_grids(grids: Dict[str, torch.Tensor], path: Path, nrow: int) -> None:
    """One panel per entry of ``grids`` (images in [0, 1] or [-1, 1]), side by side."""
    import torchvision

    plt = pyplot()
    cols = min(4, len(grids))
    rows = -(-len(grids) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.8 * cols, 3.0 * rows), squeeze=False)
    for ax in axes.flat[len(grids):]:
        ax.axis("off")
    for ax, (title, images) in zip(axes.flat, grids.items()):
        images = images.detach().float().cpu()
        images = (images + 1) / 2 if images.min() < 0 else images
        grid = torchvision.utils.make_grid(images.clamp(0, 1), nrow=nrow, padding=1, pad_value=1.0)
        ax.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_mnist_curves(mnist: dict, path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    curves = [(r, {"label": r["label"], "ls": "-" if r["family"] == "lpc" else "--"})
              for r in mnist["runs"] if r["encoder"]]  # the encoder-free run's bound is not comparable
    curves += [(r, {"label": f"{r['label']}, lr {r['lr']:g} (not chosen)", "ls": ":", "alpha": 0.6})
               for r in mnist["grid"] if not r["chosen"]]
    for run, style in curves:
        snaps = [s for s in run["snapshots"] if s["iteration"] > 0]
        axes[0].plot([s["iteration"] for s in snaps], [s["test_ll"] for s in snaps], marker="o", ms=3, lw=1.2,
                     **style)
        axes[1].plot([s["seconds"] for s in snaps], [s["test_ll"] for s in snaps], marker="o", ms=3, lw=1.2,
                     **style)
    axes[0].set_xscale("log")
    axes[0].set_xlabel("iterations (mini-batches)")
    axes[1].set_xlabel("seconds")
    axes[0].set_ylabel("test log-likelihood (IWAE bound, nats)")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_robustness(robust: dict, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for (precondition, adjust), rows in group_robustness(robust).items():
        ok = [r for r in rows if r["diverged_at"] is None]
        ax.plot([r["step_size"] for r in ok], [r["test_ll"] for r in ok], marker="o",
                ls="-" if precondition else "--", label=robustness_label(precondition, adjust))
    ax.set_xscale("log")
    ax.set_xlabel("Langevin step size η")
    ax.set_ylabel("final test log-likelihood (nats)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def group_robustness(robust: dict) -> dict:
    groups: dict = {}
    for row in robust["rows"]:
        groups.setdefault((row["precondition"], row["adjust"]), []).append(row)
    return groups


def robustness_label(precondition, adjust) -> str:
    return f"{'MALA' if adjust else 'ULA'}, {'diagonal' if precondition else 'no'} preconditioner"


# =====================================================================================
# the page
# =====================================================================================
def fmt(value, digits=2) -> str:
    if value is None:
        return "—"
    return "diverged" if isinstance(value, float) and not math.isfinite(value) else f"{value:.{digits}f}"


def table(header: List[str], rows: List[List[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(str, r)) + " |" for r in rows])


def snapshot_at(run: dict, iteration: int) -> Optional[dict]:
    return next((s for s in run["snapshots"] if s["iteration"] == iteration), None)


def common_iteration(runs: List[dict], candidates) -> Optional[int]:
    """The largest snapshot iteration that every run reached."""
    reached = [i for i in candidates if all(snapshot_at(r, i) for r in runs)]
    return max(reached) if reached else None


SETTINGS = ("num_steps", "step_size", "keep", "precondition")  # fit's defaults a run used, kept in its results


def lpc_settings(results: dict) -> str:
    d = results["fit_defaults"]
    return (f"K = {d['num_steps']} Langevin steps, η = {d['step_size']:g}, "
            f"`keep={d['keep']!r}`, `precondition={d['precondition']!r}`")


def mnist_section(results: dict) -> str:
    b, m = Budget(**results["budget"]), results["mnist"]
    runs = {r["label"]: r for r in m["runs"]}
    at = common_iteration(m["runs"], b.snapshot_iterations)
    matched = m["matched_iteration"]
    grid_rows = [[r["label"], f"{r['lr']:g}", r["iterations"], fmt(r["val_ll"])]
                 + [fmt(snapshot_at(r, i)["test_ll"]) if snapshot_at(r, i) else "—" for i in (at, matched)]
                 + [fmt(r["snapshots"][-1]["test_ll"]), "**chosen**" if r["chosen"] else ""] for r in m["grid"]]
    rows = []
    for r in m["runs"]:
        q, snap = r["quality"], snapshot_at(r, at) if at else None
        note = "" if r["encoder"] else " ¹"
        stop = f" (non-finite at {r['diverged_at']})" if r["diverged_at"] is not None else ""
        rows.append([r["label"] + stop, f"{r['lr']:g}", r["iterations"], fmt(r["seconds"], 1),
                     fmt(r["ms_per_iteration"], 1), fmt(snap["test_ll"]) + note if snap else "—",
                     f"**{fmt(r['snapshots'][-1]['test_ll'])}**{note}", fmt(r["iwae_ll_ais_images"]) + note,
                     fmt(r["ais_ll"]), fmt(q["frechet_distance"]), fmt(q["density"]), fmt(q["coverage"])])
    ref = m["reference_quality"]
    rows.append(["*real training images*", "", "", "", "", "", "", "", "", fmt(ref["frechet_distance"]),
                 fmt(ref["density"]), fmt(ref["coverage"])])
    header = ["method", "lr", "iterations", "seconds", "ms / it", f"test LL at {at} it" if at else "—",
              "test LL, final", f"IWAE LL, {b.ais_images} img", f"AIS LL, {b.ais_images} img", "Fréchet dist.",
              "density", "coverage"]
    return f"""## 1. MNIST: LPC against Pyro's VAE and IWAE at equal wall-clock

Dynamically binarised MNIST ({60000 - b.val_images:,} training images; the last {b.val_images} are held out to
choose learning rates), the IWAE paper's 784-200-200-50 tanh MLP decoder and encoder, Bernoulli
likelihood, batch {BATCH}, Adam on θ and φ with one learning rate, the same initial weights and the
same stream of batches for every method. **Every method trains for {b.mnist_seconds:g} s of wall-clock
time.** LPC: `pyro_lpc.fit` with {lpc_settings(results)} (its defaults when this ran), Jeffreys warm start unless
the row says otherwise. VAE and IWAE: `pyro_lpc.baselines.fit_svi` (`Trace_ELBO`;
`RenyiELBO(alpha=0)` with 5 particles) on the same model and guide.

*Test LL*: the IWAE bound with k = {b.eval_samples:,} and the method's own guide as proposal, in nats
per image, on the first {b.test_images:,} statically binarised test images (seed 0). *AIS*: annealed
importance sampling from the **prior** (the same for every method, so independent of the guide),
{b.ais_chains} chains × {b.ais_steps:,} MALA transitions (sigmoid schedule, step size tuned in a pilot
run), on the first {b.ais_images} of those images, next to the IWAE bound on the same images. Both are
stochastic lower bounds of log p(x). *Fréchet distance*, *density* and *coverage*: {b.quality_images:,}
decoded prior draws (Bernoulli means) against {b.quality_images:,} grey-level test images, in the
84-d feature space of a LeNet trained for {b.feature_epochs} epochs on the training images and labels
(test accuracy {100 * m['feature_accuracy']:.1f} %); the last row compares real training images with
the same test images.

**One seed, one run.** DESIGN §7 measured a seed-to-seed spread of about 1.5 nats at 1,000
iterations for this model. A wall-clock budget adds more: the number of iterations a run gets
varies from run to run, and LPC's curves are still steep at the end of a short budget. In two runs
of `--budget small` on 2026-11-26 the LPC runs' iteration counts differed by up to 20 % and their
final test LL by up to 8 nats, enough to reorder the LPC variants, while the VAE and IWAE moved by
about 1 nat. Differences of a few nats between LPC variants here are not significant.

Learning rates (chosen on the IWAE bound of the held-out training images; the LPC variants reuse
LPC (Jeffreys)'s, IWAE reuses the VAE's). Every run after the LPC (Jeffreys) grid also snapshots at
the chosen LPC run's final iteration count ({matched}), for comparisons at equal iterations:

{table(["method", "lr", "iterations", "held-out LL", f"test LL at {at} it", f"test LL at {matched} it",
        "test LL, final", ""], grid_rows)}

Results (final models unless stated):

{table(header, rows)}

¹ The encoder-free run has no guide: its IWAE bound uses the prior as proposal, a looser bound in
50 dimensions; compare it with the others through the AIS column.

Test log-likelihood of the snapshots against iterations and seconds (the encoder-free run is left
out, its bound not being comparable; dotted: the learning rates the grid did not choose):

![MNIST test log-likelihood against iterations and seconds](img/mnist_curves.png)

Samples (decoded prior draws, Bernoulli means) of the final models:

![MNIST samples](img/mnist_samples.png)

{findings(results, runs, at)}
"""


def findings(results: dict, runs: dict, at: Optional[int]) -> str:
    """Plain comparisons, computed from the numbers above."""
    final = lambda label: runs[label]["snapshots"][-1]["test_ll"]  # noqa: E731
    lpc, vae = runs[LPC.label], runs[VAE.label]
    lines = [
        f"- **Equal wall-clock** ({vae['seconds']:.0f} s): LPC (Jeffreys) {final(LPC.label):.2f}, VAE "
        f"{final(VAE.label):.2f}, IWAE {final(IWAE.label):.2f} nats (AIS: {lpc['ais_ll']:.2f}, "
        f"{vae['ais_ll']:.2f}, {runs[IWAE.label]['ais_ll']:.2f}).",
    ]
    grid = {(g["label"], g["lr"]): g for g in results["mnist"]["grid"]}
    vae_same_lr = grid.get((VAE.label, lpc["lr"]))
    for i in (at, results["mnist"]["matched_iteration"]):
        vae_at, same = snapshot_at(vae, i), vae_same_lr and snapshot_at(vae_same_lr, i)
        if i and vae_at and snapshot_at(lpc, i):
            lines.append(f"- **Equal iterations** ({i}): LPC (Jeffreys, lr {lpc['lr']:g}) "
                         f"{snapshot_at(lpc, i)['test_ll']:.2f}, VAE (lr {vae['lr']:g}) {vae_at['test_ll']:.2f}"
                         + (f", VAE at LPC's lr {same['test_ll']:.2f}" if same and vae_same_lr is not vae else "")
                         + " nats.")
    objectives = {"Jeffreys": LPC, "reverse KL": REVERSE, "forward KL": FORWARD}
    lines.append("- **Warm-start objectives** (final test LL; AIS): " + ", ".join(
        f"{name} {final(m.label):.2f}; {runs[m.label]['ais_ll']:.2f}" for name, m in objectives.items()) + ".")
    lpc_runs = sorted((r for r in runs.values() if r["family"] == "lpc"), key=lambda r: -r["ais_ll"])
    lines.append("- **AIS ranking** of the LPC runs (the IWAE bound with a method's own guide also "
                 "measures that guide): " + " > ".join(f"{r['label']} {r['ais_ll']:.2f}" for r in lpc_runs) + ".")
    lines.append(f"- **Preconditioner**: shared diagonal {final(LPC.label):.2f} vs the paper's per-chain "
                 f"rmsprop {final(RMSPROP.label):.2f} nats (AIS {lpc['ais_ll']:.2f} vs "
                 f"{runs[RMSPROP.label]['ais_ll']:.2f}).")
    free = runs[ENCODER_FREE.label]
    lines.append(f"- **Encoder-free** LPC: AIS {free['ais_ll']:.2f} vs {lpc['ais_ll']:.2f} with the "
                 f"Jeffreys-trained encoder ({free['iterations']} vs {lpc['iterations']} iterations).")
    lines.append(f"- **Cost**: LPC (Jeffreys) {lpc['ms_per_iteration']:.1f} ms per iteration, the VAE "
                 f"{vae['ms_per_iteration']:.1f} ms ({lpc['ms_per_iteration'] / vae['ms_per_iteration']:.1f}× "
                 f"slower), so LPC made {lpc['iterations']:,} updates to the VAE's {vae['iterations']:,}.")
    return "Findings (computed from the tables above):\n\n" + "\n".join(lines)


def cifar_section(results: dict) -> str:
    b, c = Budget(**results["budget"]), results["cifar10"]
    rows = [[r["label"], f"{r['lr']:g}", r["iterations"], fmt(r["seconds"], 1), fmt(r["ms_per_iteration"], 1),
             f"**{fmt(r['quality']['frechet_distance'])}**", fmt(r["quality"]["density"]),
             fmt(r["quality"]["coverage"]), fmt(r["quality"]["precision"]), fmt(r["quality"]["recall"])]
            for r in c["runs"]]
    ref = c["reference_quality"]
    rows.append(["*real training images*", "", "", "", "", fmt(ref["frechet_distance"]), fmt(ref["density"]),
                 fmt(ref["coverage"]), fmt(ref["precision"]), fmt(ref["recall"])])
    header = ["method", "lr", "iterations", "seconds", "ms / it", "Fréchet dist.", "density", "coverage",
              "precision", "recall"]
    return f"""## 2. CIFAR-10: LPC against the VAE at equal wall-clock

The convolutional model (`conv_model`: β-VAE-style encoder and decoder, 64 latent dimensions),
discretised Gaussian likelihood with σ = 0.1 on pixels in [-1, 1], batch {BATCH}, all 50,000 training
images, **{b.cifar_seconds:g} s of training each**, the learning rate chosen for the family on MNIST. LPC
(Jeffreys): {lpc_settings(results)}. Sample quality: {c['num_test']:,} samples (the likelihood's mean at
prior draws) against the {c['num_test']:,} pixel-exact CIFAR-10 test images, in the 84-d feature space
of a LeNet trained for {b.feature_epochs} epochs on the training images and labels (test accuracy
{100 * c['feature_accuracy']:.1f} %; not Inception features, so these distances are not FIDs and are not
comparable with published ones). The last row compares {c['num_test']:,} real training images with the
test images.

{table(header, rows)}

![CIFAR-10 samples: real test images, LPC, VAE](img/cifar10_samples.png)
"""


def robustness_section(results: dict) -> str:
    b, rb = Budget(**results["budget"]), results["robustness"]
    groups = group_robustness(rb)
    header = ["η"] + [robustness_label(*key) for key in groups]
    rows = []
    for i, eta in enumerate(b.step_sizes):
        cells = []
        for rows_ in groups.values():
            r = rows_[i]
            cell = "diverged" if r["diverged_at"] is not None else fmt(r["test_ll"])
            if r["accept_rate"] is not None:
                cell += f" (acc. {r['accept_rate']:.2f})"
            cells.append(cell)
        rows.append([f"{eta:g}"] + cells)
    spread = {robustness_label(*k): max(r["test_ll"] for r in v) - min(r["test_ll"] for r in v)
              for k, v in groups.items() if all(r["diverged_at"] is None for r in v)}
    dataset = ("scikit-learn's embedded 8×8 digits (1,500 training images, dynamically binarised; "
               f"16 latent dimensions, 64-200-200-16 MLPs), test IWAE bound (k = {b.eval_samples:,}) on the "
               f"{rb['num_test']} statically binarised test digits"
               if rb["dataset"] == "digits" else
               f"MNIST as in section 1, test IWAE bound on {rb['num_test']:,} test images")
    return f"""## 3. Robustness to the Langevin step size

LPC (Jeffreys warm start, K = {results['fit_defaults']['num_steps']}, `keep={results['fit_defaults']['keep']!r}`, Adam 1e-3) on
{dataset}; {b.robustness_seconds:g} s of training per cell. The paper's claim: preconditioning makes
learning robust to the step size. Columns: the shared diagonal preconditioner or none, unadjusted
(ULA) or Metropolis-adjusted (MALA; mean acceptance rate over the last quarter of the run in
brackets). Cells: final test log-likelihood in nats (higher is better).

{table(header, rows)}

Spread (best − worst final test LL over η): {'; '.join(f'{k}: {v:.2f} nats' for k, v in spread.items())}.

![Final test log-likelihood against the step size](img/step_size.png)
"""


def cost_section(results: dict) -> str:
    c, runs = results["cost"], results["mnist"]["runs"]
    vae = next(r for r in runs if r["label"] == VAE.label)
    rows = [[r["label"], fmt(r["ms_per_iteration"], 1), f"{r['ms_per_iteration'] / vae['ms_per_iteration']:.1f}×"]
            for r in runs]
    phases = [[PHASES[k], f"{100 * v:.0f} %"] for k, v in c["phases"].items()]
    memory = [[k, fmt(v, 0)] for k, v in c["peak_rss_mib"].items()]
    return f"""## 4. Cost

Per iteration in the MNIST runs of section 1 (training seconds / iterations):

{table(["method", "ms / iteration", "vs VAE"], rows)}

`fit` against the hand-written PyTorch loop of `benchmarks/fit_overhead.py` (its functions,
imported: the same model, random binary images, K = {c['num_steps']}, η = {c['step_size']:g},
`keep="all"`, Jeffreys; median over {c['iterations']} iterations after 5 warm-up ones):

{table(["loop", "ms / iteration", "ratio"], [["hand-written PyTorch", fmt(c["hand_ms"], 1), "1.00"],
                                             ["`pyro_lpc.fit`", fmt(c["fit_ms"], 1),
                                              f"{c['fit_ms'] / c['hand_ms']:.2f}"]])}

Peak resident memory of a 5-iteration `fit` in a fresh process (`fit_overhead.peak_memory`):

{table(["K", "peak RSS (MiB)"], memory)}

Where `fit`'s time goes (cProfile, cumulative time of each phase of `fit`'s iteration over 10
iterations, as a share of `fit`'s total; cProfile inflates Python-heavy parts):

{table(["phase", "share"], phases)}
"""


def other_measurements() -> str:
    text = MEASURED.read_text()
    text = re.sub(r"<!--.*?-->\s*", "", text, flags=re.S)
    body = text.split("\n", 1)[1]  # drop this file's own title
    return "## Other measurements\n" + re.sub(r"^(#+) ", r"#\1 ", body, flags=re.M)


def training_seconds(b: Budget) -> float:
    mnist_runs = len(TUNED) * len(b.lr_grid) + len(MNIST_METHODS) - len(TUNED)
    return mnist_runs * b.mnist_seconds + 2 * b.cifar_seconds + 4 * len(b.step_sizes) * b.robustness_seconds


def full_estimate(results: dict) -> float:
    """Rough duration (seconds) of ``--budget full`` from this run's measured rates: the training
    budgets, the MNIST IWAE evaluations scaled by k × images and AIS by chains × steps × images
    (every snapshot counted), plus everything else this run spent, unscaled."""
    small, full, runs = Budget(**results["budget"]), BUDGETS["full"], results["mnist"]["runs"]
    unchosen = [g for g in results["mnist"]["grid"] if not g["chosen"]]
    snaps = [s for r in runs + unchosen for s in r["snapshots"]]
    iwae_rate = sum(s["eval_seconds"] for s in snaps) / (len(snaps) * small.eval_samples * small.test_images)
    ais_rate = sum(r["ais_seconds"] for r in runs) / (len(runs) * small.ais_chains * small.ais_steps
                                                      * small.ais_images)
    evaluated = (sum(s["eval_seconds"] for s in snaps) + sum(r["ais_seconds"] + r["iwae_ais_seconds"] for r in runs)
                 + sum(g.get("val_seconds", 0.0) for g in results["mnist"]["grid"])
                 + sum(r["eval_seconds"] for r in results["robustness"]["rows"]))
    rest = results["total_seconds"] - training_seconds(small) - evaluated
    mnist_runs = len(TUNED) * len(full.lr_grid) + len(MNIST_METHODS) - len(TUNED)
    snapshots = len(full.snapshot_fractions) + len(full.snapshot_iterations)
    iwae_units = full.eval_samples * (
        (mnist_runs * snapshots + 4 * len(full.step_sizes)) * full.test_images
        + len(TUNED) * len(full.lr_grid) * full.val_images + len(MNIST_METHODS) * full.ais_images)
    ais_units = len(MNIST_METHODS) * full.ais_chains * full.ais_steps * full.ais_images
    return training_seconds(full) + iwae_rate * iwae_units + ais_rate * ais_units + rest


def render(results: dict) -> str:
    b = results["budget"]
    budget_rows = [[k, f"`{v}`"] for k, v in b.items()]
    return f"""# Benchmarks

<!-- Generated by benchmarks/run.py; do not edit by hand (rerun it). -->

This page is written by `benchmarks/run.py`, which trains every model from scratch on real data and
measures it. It was generated by

    {results['command']}

on {results['date']} in {results['total_seconds'] / 60:.1f} minutes, on {results['machine']}
(`torch.set_num_threads({results['threads']})` for every method; nothing else ran on the machine).
The **{results['budget_name']}** budget was used:

{table(["budget setting", "value"], budget_rows)}

`--budget full` scales these up (MNIST 600 s per method, IWAE k = 5,000 on all 10,000 test
images, CIFAR-10 900 s per method, the step-size study on MNIST); from this run's measured rates it
would take about **{full_estimate(results) / 3600:.0f} hours** on this machine, most of it the k = 5,000
evaluations of the snapshots.

{mnist_section(results)}
{cifar_section(results)}
{robustness_section(results)}
{cost_section(results)}
{other_measurements()}"""


def write_page(results: dict) -> None:
    IMAGES.mkdir(parents=True, exist_ok=True)
    plot_mnist_curves(results["mnist"], IMAGES / "mnist_curves.png")
    plot_robustness(results["robustness"], IMAGES / "step_size.png")
    PAGE.write_text(render(results))


# =====================================================================================
def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="small")
    parser.add_argument("--data-root", default=default_data_root(),
                        help="folder with MNIST/raw and cifar10/ (default: $PYRO_LPC_DATA or ../shared/data "
                             "beside the checkout)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads for every method")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--render-only", action="store_true",
                        help="rebuild docs/benchmarks.md from benchmarks/results/<budget>.json")
    args = parser.parse_args()
    results_path = RESULTS / f"{args.budget}.json"
    if args.render_only:
        write_page(json.loads(results_path.read_text()))
        print(f"wrote {PAGE.relative_to(REPO)}")
        return

    os.chdir(REPO)  # fit_overhead.peak_memory runs `import fit_overhead` from ./benchmarks
    torch.set_num_threads(args.threads)
    budget = BUDGETS[args.budget]
    IMAGES.mkdir(parents=True, exist_ok=True)
    # prdc's scikit-learn calls warn about joblib's config propagation, also in worker processes
    os.environ["PYTHONWARNINGS"] = "ignore::UserWarning:sklearn.utils.parallel"
    warnings.filterwarnings("ignore", category=UserWarning, module="sklearn.utils.parallel")
    log(f"budget {args.budget}, data {args.data_root}, {machine()}, {loadavg()}")
    start = time.perf_counter()
    mnist_root = writable_mnist_root(args.data_root)
    try:
        mnist = mnist_experiment(mnist_root, budget, args.seed)
        robustness = robustness_experiment(mnist_root, budget, args.seed)
    finally:
        shutil.rmtree(mnist_root, ignore_errors=True)
    cifar = cifar_experiment(args.data_root, budget, mnist["best_lr"], args.seed)
    log("cost")
    cost = cost_experiment(budget)
    total = time.perf_counter() - start
    results = {
        "command": "python " + " ".join([os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:]),
        "date": datetime.date.today().isoformat(), "machine": machine(), "threads": args.threads,
        "budget_name": args.budget, "budget": dataclasses.asdict(budget), "total_seconds": total,
        "mnist": mnist, "cifar10": cifar, "robustness": robustness, "cost": cost,
        "fit_defaults": {k: FIT_DEFAULTS[k] for k in SETTINGS},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    results_path.write_text(json.dumps(results, indent=1))
    write_page(results)
    log(f"done in {total / 60:.1f} min; wrote {PAGE.relative_to(REPO)}, {results_path.relative_to(REPO)} "
        f"and docs/img/; {loadavg()}")


if __name__ == "__main__":
    main()
