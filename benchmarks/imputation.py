r"""Filling in missing pixels: our chains against the encoder and the MCMC baselines (issue 16).

Run from the repository root (one torch thread)::

    python benchmarks/imputation.py                 # MNIST, about 20 minutes on a loaded 2-core machine
    python benchmarks/imputation.py --quick         # the embedded 8×8 digits, about a minute

1. **Model.** The IWAE paper's 784-200-200-50 tanh MLP decoder and encoder (Bernoulli), trained
   with `pyro_lpc.fit`'s defaults (LPC, Jeffreys warm start, Adam 1e-3) on dynamically binarised
   MNIST training images for `--epochs` epochs of batch 100, as `pyro-lpc train` does (seeded, so
   the same model every time); its test log-likelihood (IWAE bound, k = 1000) on the study's images.
2. **Classifier.** A 784-200-10 ReLU MLP trained with Adam 1e-3 on dynamically binarised training
   images (`--classifier-epochs`); its accuracy on the complete test images is the ceiling.
3. **Imputation.** The first `--num-images` statically binarised test images, 50 % of the pixels
   missing in two patterns (`random` pixels, the `bottom-half`; `pyro_lpc.images.cli.missing_pixels`),
   the missing pixels set to NaN. Methods, each giving S = `--num-samples` draws of z per image:
   (a) the encoder alone (`encoder_draws`); (b) pseudo-Gibbs and (c) Metropolis-within-Gibbs
   (`pyro_lpc.images.imputation`), each after `--warmup-steps` discarded steps; (d) `infer_posterior`'s
   chains, ULA (`adjust=False`) and MALA (`adjust=True`), warm-started by the masked guide, with
   `--warmup-steps` adapting steps. So every iterative method takes `warmup + S` steps, one
   decoder pass per image each (the chains also back-propagate through it). The chains run again
   with `--long-warmup` warm-up steps, to see what a longer warm-up buys.
4. **Metrics** per method and pattern, over `--seeds` (each seed: a new random mask and new
   draws; the same trained model): the log-likelihood of the true missing pixels,
   $\log \frac1S \sum_s p(x_{\mathrm{mis}} \mid z_s)$ (`DeepLatentGaussian.impute`), averaged over
   images, with its Monte Carlo standard error over images (sd / √N), and its gain over the encoder
   image by image (paired: a much smaller error); the classifier's accuracy on
   the completed images (missing pixels = posterior predictive mean); wall time; decoder passes
   per image (counted by a forward hook on the decoder); acceptance rate; the share of images whose
   z moved in fewer than 10 % of the kept steps ("stuck").

Writes `benchmarks/results/imputation.json` and `docs/img/imputation_<pattern>.png` (observed /
each method's imputation / true, for the first 8 images of seed 0); `--quick` writes both under
the temporary directory instead, unless `--out`/`--img-dir` are given.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import pyro
import torch
import torch.nn as nn

from common import (IMAGES, default_data_root, log, loadavg, log_likelihood, pyplot, results_path, stack, timed,
                    writable_mnist_root, write_results)
from pyro_lpc import fit, infer_posterior
from pyro_lpc.images.cli import missing_pixels
from pyro_lpc.images.data import load_dataset
from pyro_lpc.images.imputation import encoder_draws, metropolis_within_gibbs, pseudo_gibbs
from pyro_lpc.images.models import mlp_model
from pyro_lpc.images.runs import data_loader

PATTERNS = ("random", "bottom-half")
METHODS = ("encoder", "pseudo-Gibbs", "Metropolis-within-Gibbs", "chains, ULA", "chains, MALA")
STUCK = 0.1  # an image's chain is "stuck" when z moved in fewer than this share of its kept steps
REFERENCE = "encoder"  # each method's log p(x_mis) is also given as its gain over this one, image by image
SHOWN = 8  # images in each picture


def load(quick: bool, data_root: str, num_images: int) -> dict:
    """Grey training images with labels, and the first `num_images` statically binarised test
    images with labels: the digits (8×8) with `quick`, else MNIST."""
    name, root = ("digits", None) if quick else ("mnist", writable_mnist_root(data_root))
    train_grey, train_labels = stack(load_dataset(name, root, "train", labels=True))
    test = load_dataset(name, root, "test", binarize="static", seed=0, labels=True)
    test_x, test_labels = stack(test, range(min(num_images, len(test))))
    return {"dataset": name, "root": root, "train": train_grey, "train_labels": train_labels, "test": test_x,
            "test_labels": test_labels}


def train_classifier(images, labels, epochs: int, seed: int) -> nn.Module:
    """A one-hidden-layer ReLU MLP on dynamically binarised `images` (Adam 1e-3, batch 100)."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Flatten(), nn.Linear(images[0].numel(), 200), nn.ReLU(), nn.Linear(200, 10))
    optim = torch.optim.Adam(net.parameters(), lr=1e-3)
    for _ in range(epochs):
        for index in torch.randperm(len(images), generator=gen).split(100):
            loss = nn.functional.cross_entropy(net(torch.bernoulli(images[index], generator=gen)), labels[index])
            optim.zero_grad()
            loss.backward()
            optim.step()
    return net.eval()


def accuracy(classifier, images, labels) -> float:
    with torch.no_grad():
        return (classifier(images).argmax(-1) == labels).float().mean().item()


class DecoderPasses:
    """Counts the rows (one per image and draw) that go through `decoder`'s forward."""

    def __init__(self, decoder: nn.Module):
        self.rows = 0
        self.handle = decoder.register_forward_hook(self.count)

    def count(self, module, inputs, output):
        self.rows += inputs[0].reshape(-1, inputs[0].shape[-1]).shape[0]


def draws(method: str, dlgm, hidden, mask, num_samples: int, warmup_steps: int):
    """`(z (S, B, d), acceptance rate)` of `method` for the images `hidden` (NaN where missing)."""
    if method == "encoder":
        return encoder_draws(dlgm, hidden, mask, num_samples)
    if method == "pseudo-Gibbs":
        return pseudo_gibbs(dlgm, hidden, mask, num_samples, warmup_steps)
    if method == "Metropolis-within-Gibbs":
        return metropolis_within_gibbs(dlgm, hidden, mask, num_samples, warmup_steps)
    samples = infer_posterior(dlgm.model, dlgm.guide, hidden, mask=mask, num_samples=num_samples,
                              warmup_steps=warmup_steps, adjust=method.startswith("chains, MALA"))
    return samples["z"], samples.accept_rate


def run_method(method, warmup_steps, dlgm, x, mask, labels, classifier, args, seed) -> dict:
    hidden = torch.where(mask, x, torch.full_like(x, float("nan")))  # the missing pixels are never read
    pyro.set_rng_seed(seed)
    passes = DecoderPasses(dlgm.decoder)
    begin = time.perf_counter()
    try:
        z, accept = draws(method, dlgm, hidden, mask, args.num_samples, warmup_steps)
    finally:
        passes.handle.remove()
    seconds = time.perf_counter() - begin
    imputed, log_p = dlgm.impute(x, mask, z.detach())
    moves = (z[1:] != z[:-1]).any(-1).float().mean(0)  # per image: the share of kept steps that moved z
    return {"method": method, "log_p": log_p, "stuck_images": (moves < STUCK).float().mean().item(), "log_lik_missing": log_p.mean().item(),
            "log_lik_missing_mcse": (log_p.std() / len(log_p) ** 0.5).item(),
            "accuracy": accuracy(classifier, imputed, labels), "seconds": seconds,
            "decoder_passes_per_image": passes.rows / len(x), "accept_rate": accept, "imputed": imputed}


def save_picture(x, mask, imputed: dict, path: str) -> None:
    """Rows: observed (missing grey), each method's imputation, true; the first `SHOWN` images."""
    import torchvision

    plt = pyplot()
    observed = torch.where(mask[:SHOWN], x[:SHOWN], torch.tensor(0.5))
    rows = {"observed": observed, **{m: im[:SHOWN] for m, im in imputed.items()}, "true": x[:SHOWN]}
    width = 1.7 + 0.5 * SHOWN
    fig, axes = plt.subplots(len(rows), 1, figsize=(width, 0.56 * len(rows)))
    for ax, (label, images) in zip(axes, rows.items()):
        grid = torchvision.utils.make_grid(images.clamp(0, 1), nrow=SHOWN, padding=1, pad_value=1.0)
        ax.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest")
        ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.subplots_adjust(left=1.6 / width, right=0.99, top=0.99, bottom=0.01, hspace=0.08)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def summarise(runs: list, methods) -> list:
    """Per pattern and method: the means over seeds of each figure (the Monte Carlo standard errors
    over images too: every seed imputes the same images, so they do not shrink), and the per-seed values."""
    rows = []
    for pattern in PATTERNS:
        for method in methods:
            mine = [r for r in runs if r["pattern"] == pattern and r["method"] == method]
            rows.append({"pattern": pattern, "method": method,
                         **{key: sum(r[key] for r in mine) / len(mine)
                            for key in ("log_lik_missing", "vs_reference", "accuracy", "seconds",
                                        "decoder_passes_per_image", "accept_rate", "stuck_images")},
                         **{key: sum(r[key] for r in mine) / len(mine)  # the same images in every seed
                            for key in ("log_lik_missing_mcse", "vs_reference_mcse")},
                         "log_lik_missing_per_seed": [r["log_lik_missing"] for r in mine],
                         "accuracy_per_seed": [r["accuracy"] for r in mine]})
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the embedded digits, short budgets (about a minute)")
    parser.add_argument("--data-root", default=default_data_root(),
                        help="folder holding MNIST/raw (default: $PYRO_LPC_DATA or ../shared/data beside the checkout)")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs of 100-image batches (default 4: "
                        "2,400 iterations; quick 20: 300)")
    parser.add_argument("--classifier-epochs", type=int, default=None, help="default 3; quick 30")
    parser.add_argument("--num-images", type=int, default=500, help="test images imputed (quick: all 297)")
    parser.add_argument("--num-samples", type=int, default=100, help="draws of z per image, S, for every method")
    parser.add_argument("--warmup-steps", type=int, default=100, help="discarded steps of each iterative method")
    parser.add_argument("--long-warmup", type=int, default=300,
                        help="also run the chains with this many warm-up steps (0: not)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="imputation seeds (masks and draws)")
    parser.add_argument("--train-seed", type=int, default=0)
    parser.add_argument("--out", default=None)
    parser.add_argument("--img-dir", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    epochs_lpc = args.epochs if args.epochs is not None else (20 if args.quick else 4)
    epochs = args.classifier_epochs if args.classifier_epochs is not None else (30 if args.quick else 3)
    out = args.out or (os.path.join(tempfile.gettempdir(), "imputation_quick.json") if args.quick
                       else results_path("imputation"))
    img_dir = args.img_dir or (tempfile.gettempdir() if args.quick else str(IMAGES))
    started = time.perf_counter()

    data = load(args.quick, args.data_root, args.num_images)
    x, labels = data["test"], data["test_labels"]
    image_shape = tuple(x.shape[1:])
    latent_dim = 16 if args.quick else 50
    torch.manual_seed(args.train_seed)
    dlgm = mlp_model(image_shape=image_shape, latent_dim=latent_dim, hidden=(200, 200), likelihood="bernoulli")
    pyro.clear_param_store()
    loader = data_loader(load_dataset(data["dataset"], data["root"], "train", binarize="dynamic"), 100,
                         seed=args.train_seed)
    (result, train_seconds) = timed(fit, dlgm.model, dlgm.guide, loader, num_epochs=epochs_lpc, seed=args.train_seed,
                                    optim=pyro.optim.Adam({"lr": 1e-3}), guide_optim=pyro.optim.Adam({"lr": 1e-3}),
                                    progress=False)
    iterations = len(result.history)
    test_ll = log_likelihood(dlgm, dlgm.state_dict(), x, num_samples=1000)
    log(f"{data['dataset']}: trained {iterations} iterations in {train_seconds:.0f} s; "
        f"test log-likelihood {test_ll:.2f} (IWAE, k = 1000, {len(x)} images)")
    classifier = train_classifier(data["train"], data["train_labels"], epochs, args.train_seed)
    ceiling = accuracy(classifier, x, labels)
    log(f"classifier: {epochs} epochs; accuracy on the complete test images {ceiling:.3f}")

    methods = [(m, args.warmup_steps) for m in METHODS]
    if args.long_warmup:  # the chains again with a longer warm-up (more decoder passes)
        methods += [(f"{m}, {args.long_warmup} warm-up steps", args.long_warmup) for m in METHODS[-2:]]
    runs = []
    for seed in args.seeds:
        for pattern in PATTERNS:
            torch.manual_seed(seed)
            mask = missing_pixels(x.shape, pattern, 0.5)
            imputed, log_p = {}, {}
            for method, warmup_steps in methods:
                result = run_method(method, warmup_steps, dlgm, x, mask, labels, classifier, args, seed)
                imputed[method] = result.pop("imputed")
                log_p[method] = result.pop("log_p")
                gain = log_p[method] - log_p[REFERENCE]  # paired over images: much smaller error
                result.update(vs_reference=gain.mean().item(), vs_reference_mcse=(gain.std() / len(x) ** 0.5).item())
                runs.append({"seed": seed, "pattern": pattern, **result})
                log(f"seed {seed}, {pattern}, {method}: log p(x_mis) {result['log_lik_missing']:.2f} ± "
                    f"{result['log_lik_missing_mcse']:.2f} nats, accuracy {result['accuracy']:.3f}, "
                    f"gain over the encoder {result['vs_reference']:.2f} ± {result['vs_reference_mcse']:.2f}, "
                    f"{result['seconds']:.1f} s, {result['decoder_passes_per_image']:.0f} decoder passes/image, "
                    f"acceptance {result['accept_rate']:.2f}, stuck images {result['stuck_images']:.3f}")
            if seed == args.seeds[0]:
                path = os.path.join(img_dir, f"imputation_{pattern.replace('-', '_')}.png")
                save_picture(x, mask, {m: imputed[m] for m in METHODS}, path)
                log(f"wrote {path}")

    rows = summarise(runs, [m for m, _ in methods])
    write_results(out, {
        "options": {"dataset": data["dataset"], "train_epochs": epochs_lpc, "num_images": len(x),
                    "num_samples": args.num_samples, "warmup_steps": args.warmup_steps,
                    "long_warmup": args.long_warmup, "seeds": args.seeds,
                    "train_seed": args.train_seed, "classifier_epochs": epochs, "missing_fraction": 0.5,
                    "latent_dim": latent_dim},
        "model": {"iterations": iterations, "seconds": train_seconds, "test_log_likelihood": test_ll,
                  "missing_pixels_per_image": {p: int((~missing_pixels((1,) + image_shape, p, 0.5)).sum())
                                               for p in PATTERNS}},
        "classifier_accuracy_complete": ceiling,
        "rows": rows, "runs": runs, "loadavg": loadavg(),
        "total_seconds": time.perf_counter() - started,
    })


if __name__ == "__main__":
    main()
