"""LPC (Jeffreys) against the VAE on CIFAR-10 at equal wall-clock: sample quality.

    python benchmarks/cifar10.py --budget small
    python benchmarks/cifar10.py --budget smoke --out /tmp/cifar10.json --images-dir /tmp   # runs, in a minute

The β-VAE-style conv model (:func:`pyro_lpc.images.models.conv_model`, 64 latent dimensions),
discretised Gaussian likelihood (σ = 0.1), pixels in [-1, 1], batch 100, all 50,000 training
images; LPC with ``fit``'s defaults and the Jeffreys warm start, the VAE through ``fit_svi``,
each for ``seconds`` of training with its family's learning rate (``--lr-lpc`` / ``--lr-vae``;
by default the ones ``benchmarks/mnist.py`` chose, read from ``benchmarks/results/mnist.json``).
Fréchet distance, density, coverage, precision and recall of ``quality_images`` samples against
as many pixel-exact test images, in the feature space of a LeNet trained on the training images
and labels (not Inception features: not FIDs).

Writes ``benchmarks/results/cifar10.json`` and ``cifar10_samples.png`` in ``--images-dir``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from common import (IMAGES, TimedStream, default_data_root, final_state, fit_settings, log, plot_sample_grids,
                    results_path, samples, stack, strip_states, train, write_results)
from mnist import LPC, VAE
from pyro_lpc.images.data import load_dataset
from pyro_lpc.images.sample_quality import sample_quality, train_feature_extractor
from pyro_lpc.images.models import conv_model


@dataclass(frozen=True)
class Budget:
    cifar_seconds: float  # training time of each method
    quality_images: int  # samples and test images for the sample-quality figures
    feature_epochs: int  # epochs of the LeNet feature extractor
    train_images: int  # training images used (for the model and the feature extractor)


BUDGETS = {
    "smoke": Budget(cifar_seconds=3, quality_images=100, feature_epochs=1, train_images=2000),
    "small": Budget(cifar_seconds=90, quality_images=1000, feature_epochs=5, train_images=50000),
    "full": Budget(cifar_seconds=900, quality_images=1000, feature_epochs=10, train_images=50000),
}


def experiment(root: str, budget: Budget, lr: dict, seed: int, images_dir: Path) -> dict:
    images, labels = stack(load_dataset("cifar10", root, "train", labels=True), range(budget.train_images))
    test, test_labels = stack(load_dataset("cifar10", root, "test", labels=True), range(budget.quality_images))
    log("CIFAR-10: feature extractor")
    extractor = train_feature_extractor(images, labels, epochs=budget.feature_epochs, seed=seed)
    out = {"feature_accuracy": extractor.accuracy(test, test_labels), "runs": [], "num_test": len(test),
           "reference_quality": sample_quality(test, images[: len(test)], extractor)}
    grids = {"real test images": test[:64]}
    for method in (LPC, VAE):
        torch.manual_seed(seed)
        dlgm = conv_model(image_size=32, channels=3, latent_dim=64, likelihood="discretized")
        stream = TimedStream(images, dlgm, seconds=budget.cifar_seconds, seed=seed)
        run = train(method, dlgm, stream, lr[method.family], seed)
        fake = samples(dlgm, final_state(run), len(test))
        run["quality"] = sample_quality(test, fake, extractor)
        grids[method.label] = fake[:64]
        out["runs"].append(strip_states(run))
        log(f"CIFAR-10 {method.label}: {run['iterations']} iterations, Fréchet distance "
            f"{run['quality']['frechet_distance']:.2f}")
    plot_sample_grids(grids, images_dir / "cifar10_samples.png", nrow=8)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", choices=list(BUDGETS), default="small")
    parser.add_argument("--lr-lpc", type=float, help="default: LPC's learning rate in results/mnist.json")
    parser.add_argument("--lr-vae", type=float, help="default: the VAE's learning rate in results/mnist.json")
    parser.add_argument("--data-root", default=default_data_root(), help="folder with cifar10/ (default: "
                        "$PYRO_LPC_DATA or ../shared/data beside the checkout)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=results_path("cifar10"))
    parser.add_argument("--images-dir", default=str(IMAGES))
    parser.add_argument("--note", help="free text stored with the results (shown on the page)")
    args = parser.parse_args()
    lr = {"lpc": args.lr_lpc, "svi": args.lr_vae}
    if None in lr.values():
        mnist = Path(results_path("mnist"))
        if not mnist.exists():
            parser.error(f"--lr-lpc and --lr-vae are needed: {mnist} (written by benchmarks/mnist.py) is missing")
        chosen = json.loads(mnist.read_text())["best_lr"]
        lr = {family: value if value is not None else chosen[family] for family, value in lr.items()}
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=UserWarning, module="sklearn.utils.parallel")
    budget, images_dir = BUDGETS[args.budget], Path(args.images_dir)
    images_dir.mkdir(parents=True, exist_ok=True)
    cifar = experiment(args.data_root, budget, lr, args.seed, images_dir)
    write_results(args.out, {"budget_name": args.budget, "budget": dataclasses.asdict(budget),
                             "threads": args.threads, "seed": args.seed,
                             "lpc_settings": fit_settings(), **cifar}, args.note)


if __name__ == "__main__":
    main()
