"""LPC (Jeffreys) against the VAE on CIFAR-10 at equal wall-clock, side by side: sample quality.

    python benchmarks/cifar10.py                    # 30 minutes per method, the page's record
    python benchmarks/cifar10.py --lpc k5-adapted --out benchmarks/results/cifar10_k5_adapted.json   # K = 5, η adapted
    python benchmarks/cifar10.py --lpc k5-adapted --learn-scale --seconds 900 \
        --out benchmarks/results/cifar10_k5_adapted_learned_sigma.json       # both learn σ, 15 minutes each
    python benchmarks/cifar10.py --budget small     # 90 s per method
    python benchmarks/cifar10.py --budget smoke --out /tmp/cifar10.json --images-dir /tmp   # runs, in a minute

The β-VAE-style conv model (:func:`pyro_lpc.images.models.conv_model`, 64 latent dimensions),
discretised Gaussian likelihood (σ = 0.1), pixels in [-1, 1], batch 100, all 50,000 training
images; LPC with the Jeffreys warm start and ``fit``'s defaults (or ``--lpc``'s setting), the VAE
through ``fit_svi``, each for ``--seconds`` of training (default: the budget's) with its family's learning rate
(``--lr-lpc`` / ``--lr-vae``; by default the ones ``benchmarks/mnist.py`` chose, read from
``benchmarks/results/mnist.json``).

The methods train **side by side**: this process loads the data and trains the feature
extractor, then starts one child process per method (this script with ``--train-only``),
each with one torch thread and, where the machine has a core per method, pinned to a core of
its own; both see the same seed, initial weights and mini-batch stream. A run's clock starts
at its first mini-batch and everything after it counts as training time (compilation
included; ``fit``'s defaults compile nothing) except the parameter snapshots' copies, taken
at ``snapshot_fractions`` of the budget. The children save their snapshots; this process
then scores every snapshot: Fréchet distance, density, coverage, precision and recall of
``quality_images`` samples against as many pixel-exact test images, in the feature space of
a LeNet trained on the training images and labels (not Inception features: not FIDs).

Writes ``benchmarks/results/cifar10.json`` (``--out``) and ``cifar10_samples.png`` in ``--images-dir``
(``cifar10_<lpc>_samples.png`` for another ``--lpc`` setting).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Tuple

import torch

from common import (IMAGES, Method, TimedStream, default_data_root, fit_settings, loadavg, log, plot_sample_grids,
                    results_path, samples, stack, strip_states, timed, train, write_results)
from mnist import LPC, VAE
from pyro_lpc.images.data import load_dataset
from pyro_lpc.images.models import DiscretizedGaussian, conv_model
from pyro_lpc.images.sample_quality import sample_quality, train_feature_extractor


@dataclass(frozen=True)
class Budget:
    cifar_seconds: float  # training time of each method
    quality_images: int  # samples and test images for the sample-quality figures
    feature_epochs: int  # epochs of the LeNet feature extractor
    train_images: int  # training images used (for the model and the feature extractor)
    snapshot_fractions: Tuple[float, ...] = (1 / 6, 0.5, 1.0)  # snapshots (and their scores) at these fractions


BUDGETS = {
    "smoke": Budget(cifar_seconds=6, quality_images=100, feature_epochs=1, train_images=2000),
    "small": Budget(cifar_seconds=90, quality_images=1000, feature_epochs=5, train_images=50000),
    "30min": Budget(cifar_seconds=1800, quality_images=1000, feature_epochs=5, train_images=50000),
}
#: The LPC setting trained against the VAE (``--lpc``): ``fit``'s defaults, or chains every iteration
#: (K = 5) with η adapted to a MALA acceptance rate of 0.57, as in ``per_second.py``.
LPC_SETTINGS = {
    "defaults": LPC,
    "k5-adapted": Method("LPC K=5, η adapted", "lpc", {"warm_start": "jeffreys", "num_steps": 5,
                                                       "target_accept_prob": 0.57}),
}
THREADS_PER_RUN = 1


def learning_rates() -> dict:
    """``{"lpc": lr, "svi": lr}``: the families' learning rates chosen by ``benchmarks/mnist.py``."""
    mnist = Path(results_path("mnist"))
    if not mnist.exists():
        raise FileNotFoundError(f"{mnist} (written by benchmarks/mnist.py) is missing")
    chosen = json.loads(mnist.read_text())["best_lr"]
    return {"lpc": chosen["lpc"], "svi": chosen["svi"]}


#: The trained methods' names (``--train-only``'s choices), in :func:`methods`'s order.
TRAINED = ("lpc", "vae")


def methods(lpc: str) -> dict:
    """``{"lpc": LPC_SETTINGS[lpc], "vae": VAE}``, by ``--train-only``'s names."""
    return dict(zip(TRAINED, (LPC_SETTINGS[lpc], VAE)))


def samples_image(lpc: str, learn_scale: bool = False) -> str:
    """The file name of the sample grids (the defaults' keeps the page's first name)."""
    suffix = "_learned_sigma" if learn_scale else ""
    return "cifar10_samples.png" if (lpc, suffix) == ("defaults", "") else f"cifar10_{lpc}{suffix}_samples.png"


#: With ``--learn-scale``: the likelihood's σ is learned (as θ), starting here instead of the fixed 0.1.
LEARNED_SCALE_INIT = 1.0


def new_model(seed: int, learn_scale: bool = False):
    torch.manual_seed(seed)  # the same initial weights for every method
    likelihood = DiscretizedGaussian(scale=LEARNED_SCALE_INIT, learn_scale=True, event_dim=3,
                                     name="dlgm.likelihood") if learn_scale else "discretized"
    return conv_model(image_size=32, channels=3, latent_dim=64, likelihood=likelihood)


def train_only(args, budget: Budget) -> None:
    """The child process: train one method on the images in ``--images`` and save its run record and
    snapshot states to ``--state-out``."""
    if args.core is not None:
        os.sched_setaffinity(0, {args.core})
    torch.set_num_threads(THREADS_PER_RUN)
    method = methods(args.lpc)[args.train_only]
    images = torch.load(args.images, weights_only=True)
    dlgm = new_model(args.seed, args.learn_scale)
    stream = TimedStream(images, dlgm, seconds=budget.cifar_seconds, seed=args.seed,
                         fractions=budget.snapshot_fractions)
    run = train(method, dlgm, stream, args.lr_lpc if method.family == "lpc" else args.lr_vae, args.seed)
    log(f"CIFAR-10 {method.label}: {run['iterations']} iterations, {run['ms_per_iteration']:.1f} ms each")
    torch.save({"run": strip_states(run) | {"core": args.core},
                "states": [s["state"] for s in run["snapshots"]]}, args.state_out)


def child_command(args, budget: Budget, key: str, folder: Path, core) -> list:
    command = [sys.executable, os.path.abspath(__file__), "--budget", args.budget,
               "--seconds", repr(budget.cifar_seconds),
               "--lr-lpc", repr(args.lr_lpc), "--lr-vae", repr(args.lr_vae), "--seed", str(args.seed), "--lpc", args.lpc,
               *(["--learn-scale"] if args.learn_scale else []),
               "--train-only", key, "--images", str(folder / "images.pt"), "--state-out", str(folder / f"{key}.pt")]
    return command + (["--core", str(core)] if core is not None else [])


def train_side_by_side(args, budget: Budget, images: torch.Tensor, folder: Path) -> dict:
    """Train every method on ``images`` in its own child process, all at the same time; ``{key: saved run}``."""
    torch.save(images, folder / "images.pt")
    available = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    keys = list(methods(args.lpc))
    cores = available[: len(keys)] if len(available) >= len(keys) else [None] * len(keys)
    env = dict(os.environ, OMP_NUM_THREADS=str(THREADS_PER_RUN), MKL_NUM_THREADS=str(THREADS_PER_RUN))
    children = {}
    try:
        for key, core in zip(keys, cores):
            command = child_command(args, budget, key, folder, core)
            children[key] = subprocess.Popen(command, env=env)
        status = {key: child.wait() for key, child in children.items()}
    finally:  # on an error or an interrupt here, end the children started so far
        for child in children.values():
            if child.poll() is None:
                child.kill()
                child.wait()
    failed = {key: rc for key, rc in status.items() if rc}
    if failed:
        raise RuntimeError(f"training processes failed (exit status by method): {failed}")
    return {key: torch.load(folder / f"{key}.pt", weights_only=True) for key in keys}


def score(saved: dict, test: torch.Tensor, extractor, seed: int, learn_scale: bool) -> Tuple[dict, torch.Tensor]:
    """The run record with every snapshot's sample quality, and the final samples."""
    run, dlgm = saved["run"], new_model(seed, learn_scale)
    for snap, state in zip(run["snapshots"], saved["states"]):
        fake = samples(dlgm, state, len(test))
        snap["quality"] = sample_quality(test, fake, extractor)
        log(f"CIFAR-10 {run['label']} at {snap['seconds']:.0f} s ({snap['iteration']} iterations): Fréchet "
            f"distance {snap['quality']['frechet_distance']:.2f}, density {snap['quality']['density']:.2f}, "
            f"coverage {snap['quality']['coverage']:.2f}")
    run["quality"] = run["snapshots"][-1]["quality"]
    return run, fake


def experiment(args, budget: Budget, images_dir: Path) -> dict:
    images, labels = stack(load_dataset("cifar10", args.data_root, "train", labels=True), range(budget.train_images))
    test, test_labels = stack(load_dataset("cifar10", args.data_root, "test", labels=True),
                              range(budget.quality_images))
    log("CIFAR-10: feature extractor")
    extractor, feature_seconds = timed(train_feature_extractor, images, labels, epochs=budget.feature_epochs,
                                       seed=args.seed)
    out = {"feature_accuracy": extractor.accuracy(test, test_labels), "feature_seconds": feature_seconds,
           "num_test": len(test)}
    out["load_before"] = loadavg()
    log(f"CIFAR-10: {', '.join(m.label for m in methods(args.lpc).values())} side by side, {budget.cifar_seconds:g} s each, "
        f"{out['load_before']}")
    with tempfile.TemporaryDirectory(prefix="pyro-lpc-cifar10-") as folder:
        saved = train_side_by_side(args, budget, images, Path(folder))
    out["load_after"] = loadavg()
    begin = time.perf_counter()
    grids, out["runs"] = {"real test images": test[:64]}, []
    for key, method in methods(args.lpc).items():
        run, fake = score(saved[key], test, extractor, args.seed, args.learn_scale)
        out["runs"].append(run)
        grids[method.label] = fake[:64]
    out["reference_quality"] = sample_quality(test, images[: len(test)], extractor)  # the scores' ceiling
    out["evaluation_seconds"] = time.perf_counter() - begin
    plot_sample_grids(grids, images_dir / samples_image(args.lpc, args.learn_scale), nrow=8)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", choices=list(BUDGETS), default="30min")
    parser.add_argument("--seconds", type=float, help="training time of each method (default: the budget's)")
    parser.add_argument("--lr-lpc", type=float, help="default: LPC's learning rate in results/mnist.json")
    parser.add_argument("--lr-vae", type=float, help="default: the VAE's learning rate in results/mnist.json")
    parser.add_argument("--data-root", default=default_data_root(), help="folder with cifar10/ (default: "
                        "$PYRO_LPC_DATA or ../shared/data beside the checkout)")
    parser.add_argument("--threads", type=int, default=2,
                        help="torch threads of this process (feature extractor, scoring); each method trains with 1")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=results_path("cifar10"))
    parser.add_argument("--images-dir", default=str(IMAGES))
    parser.add_argument("--note", help="free text stored with the results (shown on the page)")
    # the child processes' options (set by train_side_by_side)
    parser.add_argument("--lpc", choices=list(LPC_SETTINGS), default="defaults",
                        help="the LPC setting: fit's defaults, or K = 5 with η adapted (default: defaults)")
    parser.add_argument("--learn-scale", action="store_true",
                        help=f"both methods learn the likelihood's σ, from {LEARNED_SCALE_INIT:g} (default: σ = 0.1 fixed)")
    parser.add_argument("--train-only", choices=TRAINED, help=argparse.SUPPRESS)
    parser.add_argument("--images", help=argparse.SUPPRESS)
    parser.add_argument("--state-out", help=argparse.SUPPRESS)
    parser.add_argument("--core", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.seconds is not None and args.seconds <= 0:
        parser.error(f"--seconds must be positive, got {args.seconds:g}")
    budget = BUDGETS[args.budget]
    if args.seconds is not None:
        budget = dataclasses.replace(budget, cifar_seconds=args.seconds)
    if args.train_only:
        if None in (args.images, args.state_out, args.lr_lpc, args.lr_vae):
            parser.error("--train-only needs --images, --state-out, --lr-lpc and --lr-vae")
        train_only(args, budget)
        return
    if None in (args.lr_lpc, args.lr_vae):
        try:
            chosen = learning_rates()
        except FileNotFoundError as error:
            parser.error(f"--lr-lpc and --lr-vae are needed: {error}")
        args.lr_lpc = chosen["lpc"] if args.lr_lpc is None else args.lr_lpc
        args.lr_vae = chosen["svi"] if args.lr_vae is None else args.lr_vae
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=UserWarning, module="sklearn.utils.parallel")
    images_dir = Path(args.images_dir)
    images_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    cifar = experiment(args, budget, images_dir)
    write_results(args.out, {"budget_name": args.budget, "budget": dataclasses.asdict(budget), "seed": args.seed,
                             "side_by_side": True, "threads_per_run": THREADS_PER_RUN,
                             "evaluation_threads": args.threads, "lpc_settings": fit_settings(),
                             "lpc": args.lpc, "lpc_options": LPC_SETTINGS[args.lpc].options,
                             "samples_image": samples_image(args.lpc, args.learn_scale),
                             "learned_scale_init": LEARNED_SCALE_INIT if args.learn_scale else None,
                             "total_seconds": time.perf_counter() - start, **cifar}, args.note)


if __name__ == "__main__":
    main()
