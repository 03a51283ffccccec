"""The `pyro-lpc` command: train, evaluate and sample image generative models.

```bash
pyro-lpc train [--dataset digits] [--method lpc|vae|iwae] [--model mlp|conv] ... [--out RUN_DIR]
pyro-lpc evaluate RUN_DIR
pyro-lpc sample RUN_DIR -n 64
pyro-lpc impute RUN_DIR --mask bottom-half
pyro-lpc train --help
```

`pyro-lpc train` with no arguments trains on scikit-learn's embedded 8×8
digits (offline, 2-3 minutes on 2 CPU cores with the default 1 thread). `vae` and `iwae` train the
very same model and guide with Pyro's `SVI` (`Trace_ELBO`;
`RenyiELBO(alpha=0)` with k particles). A run directory holds
`config.json`, `checkpoint.pt`, `history.jsonl`, `metrics.json`,
`samples.png`, `reconstructions.png` and `curves.png`.

Several processes train one LPC run data-parallel when launched by `torchrun`:

```bash
torchrun --standalone --nproc-per-node 2 -m pyro_lpc train --dataset mnist
```

(`--batch-size` is per process; rank 0 writes the run directory.)
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time
from typing import List, Optional

import pyro
import torch

from torch.distributed.elastic.multiprocessing.errors import record

from .. import __version__, distributed
from ..baselines import fit_svi
from ..fit import fit
from ..langevin import PRECONDITIONERS
from ..posterior import infer_posterior
from ..warm_start import OBJECTIVES
from . import imputation, plots
from .data import DATASETS
from .runs import (data_loader, default_run_dir, eval_images, evaluate_run, load_run, resolve_device, run_config,
                   run_data, run_model, write_config, write_history)

METHODS = ("lpc", "vae", "iwae")
MASKS = ("bottom-half", "random")
#: How `pyro-lpc impute` draws z: our chains (MALA, ULA) or a baseline of `pyro_lpc.images.imputation`.
IMPUTERS = ("mala", "ula", "encoder", "pseudo-gibbs", "metropolis-within-gibbs")
MODELS = ("mlp", "conv")
DATASET_NAMES = [d for d in DATASETS if ":" not in d]


#: `--threads` default: torch threads per process (benchmarks/cli_threads.py)
THREADS = 1

#: `--compile` choices and the `fit(jit_compile=..., jit_options=...)` each stands for
COMPILE = {"off": (False, None), "record": (True, None), "inductor": (True, {}),
           "cuda-graphs": (True, {"mode": "reduce-overhead"})}


def _num_steps(value: str):
    if value == "auto":
        return value
    if value.isdigit():
        return int(value)
    raise argparse.ArgumentTypeError(f"expected a non-negative integer or 'auto', got {value!r}")


def _keep(value: str):
    """`--keep` as stored in config.json: "all", "last", an int burn-in or "every:N"."""
    if value in ("all", "last") or value.isdigit() or (value.startswith("every:") and value[6:].isdigit()
                                                        and int(value[6:]) > 0):
        return int(value) if value.isdigit() else value
    raise argparse.ArgumentTypeError(f"expected last, all, an integer burn-in or every:N, got {value!r}")


def _keep_for_fit(keep):
    """config.json's `keep` as `fit` takes it (`every:N` is the slice of every N-th sample)."""
    if isinstance(keep, str) and keep.startswith("every:"):
        n = int(keep[6:])
        return slice(n - 1, None, n)
    return keep


def _positive_int(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return int(value)


def _fraction(value: str) -> float:
    try:
        fraction = float(value)
    except ValueError:
        fraction = float("nan")
    if not 0.0 < fraction < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number strictly between 0 and 1, got {value!r}")
    return fraction


def _device(value: str) -> torch.device:
    """`--device`, refused here (before any data are read) when this machine lacks it."""
    try:
        return resolve_device(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The description's lines as written; each option's default, unless it is `None` or a flag's `False`."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def _plain(markdown: str) -> str:
    """The module docstring for a terminal: no code fences, no backticks."""
    return re.sub(r"^```\w*\n", "", markdown, flags=re.MULTILINE).replace("`", "")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pyro-lpc", description=_plain(__doc__), formatter_class=_HelpFormatter)
    parser.add_argument("--version", action="version", version=f"pyro-lpc {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    machine = argparse.ArgumentParser(add_help=False)
    machine.add_argument("--device", default="cpu", type=_device, metavar="{cpu,cuda,cuda:N}",
                         help="cpu, cuda or cuda:N: where the model, its parameters and the data live (under "
                              "torchrun, cuda is each process's LOCAL_RANK GPU)")
    machine.add_argument("--threads", type=_positive_int, default=THREADS, metavar="N",
                         help="torch CPU threads (torch.set_num_threads); more than 1 rarely pays for these "
                              "small models and loses badly beside other busy processes (docs/benchmarks.md)")
    command = dict(parents=[machine], formatter_class=_HelpFormatter)

    train = commands.add_parser("train", help="train a model (default: LPC on the embedded digits)",
                                description="Train a model and write a run directory: LPC on scikit-learn's "
                                            "embedded 8x8 digits unless told otherwise.", **command)
    train.add_argument("--dataset", default="digits", choices=DATASET_NAMES,
                       help="digits is embedded (offline); the others are read from --data-root")
    train.add_argument("--data-root", default=None, help="folder with the dataset files")
    train.add_argument("--method", default="lpc", choices=METHODS,
                       help="lpc, or Pyro's SVI on the same model and guide: vae (Trace_ELBO), iwae (RenyiELBO, "
                            "alpha=0)")
    train.add_argument("--model", default=None, choices=MODELS,
                       help="decoder and encoder (default: mlp for grey-scale, conv for colour data)")
    train.add_argument("--latent-dim", type=int, default=None,
                       help="size of z (default: 16 for digits, 50 for mlp, 64 for conv)")
    train.add_argument("--epochs", type=int, default=None, help="passes over the data (default: 150 for digits, "
                                                                 "10 otherwise)")
    train.add_argument("--batch-size", type=int, default=100,
                       help="per process: under torchrun the global batch is nproc × this")
    train.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate of model and guide")
    train.add_argument("--num-steps", type=_num_steps, default=20, metavar="{K,auto}",
                       help="Langevin steps K per mini-batch, or 'auto' (adapted to the chains' energy drop)")
    train.add_argument("--step-size", type=float, default=1e-2, help="Langevin step size η")
    train.add_argument("--target-accept", type=float, default=None,
                       help="adapt η so the chains' mean MALA acceptance probability tracks this value")
    train.add_argument("--precondition", default="diagonal", choices=[str(p) for p in PRECONDITIONERS],
                       help="the chains' diagonal preconditioner (None: plain Langevin)")
    train.add_argument("--warm-start", default="jeffreys", choices=list(OBJECTIVES) + ["none"],
                       help="guide objective, or 'none' for encoder-free chains")
    train.add_argument("--adjust", action="store_true", help="Metropolis-adjust the chains (MALA)")
    train.add_argument("--compile", default="off", choices=list(COMPILE),
                       help="the chains' energy and gradient: off (Pyro at every step), record (one recorded "
                            "graph per batch shape), inductor (that graph compiled by torch.compile; needs a "
                            "C++ compiler on CPU) or cuda-graphs (compiled and replayed as a CUDA graph)")
    train.add_argument("--keep", default="last", type=_keep, metavar="{last,all,INT,every:N}",
                       help="samples feeding θ: last, all, an int burn-in or every:N (every N-th)")
    train.add_argument("--persistent-chains", action="store_true",
                       help="keep each image's chain state across epochs and start each visit from it or a "
                            "fresh encoder draw (an independence Metropolis choice); memory: one copy of z per "
                            "training image (MNIST, 50 latents: 12 MB)")
    train.add_argument("--particles", type=int, default=5, help="k for --method iwae")
    train.add_argument("--eval-samples", type=int, default=1000, help="k of the test IWAE bound")
    train.add_argument("--seed", type=int, default=0, help="seed of the initial weights, data order and chains")
    train.add_argument("--out", default=None,
                       help="run directory (default: the first free runs/<dataset>-<method>[-N])")
    train.add_argument("--resume", action="store_true", help="continue the run in --out")
    train.add_argument("--quiet", action="store_true", help="no progress bars")

    evaluate = commands.add_parser("evaluate", help="write metrics.json of a run",
                                   description="Rewrite a run's metrics.json, samples.png and reconstructions.png.",
                                   **command)
    evaluate.add_argument("run_dir", help="the run directory")
    evaluate.add_argument("--eval-samples", type=int, default=None,
                          help="k of the test IWAE bound (default: the run's)")
    evaluate.add_argument("--quiet", action="store_true", help="no progress bars")

    sample = commands.add_parser("sample", help="draw images from a trained run",
                                 description="Draw images from a trained run's model into one picture.", **command)
    sample.add_argument("run_dir", help="the run directory")
    sample.add_argument("-n", "--num", type=int, default=64, help="number of images")
    sample.add_argument("--output", default=None, help="image file (default: RUN_DIR/samples.png)")
    sample.add_argument("--seed", type=int, default=0, help="seed of the draws")

    impute = commands.add_parser(
        "impute", help="fill in missing pixels of test images with a trained run",
        description="Hide pixels of the first N test images, draw z from p(z | observed pixels) with "
                    "infer_posterior (MALA chains warm-started by the encoder on the image filled in; --method "
                    "for ULA or a baseline), and write observed / imputed (posterior predictive mean) / true "
                    "images in one picture. Prints the log predictive density of the true missing pixels, per "
                    "image, for the method and for the encoder alone.", **command)
    impute.add_argument("run_dir", help="the run directory")
    impute.add_argument("--mask", default="bottom-half", choices=MASKS,
                        help="the missing pixels: the bottom half of each image, or random pixels")
    impute.add_argument("--fraction", type=_fraction, default=0.5,
                        help="the fraction of pixels missing under --mask random")
    impute.add_argument("-n", "--num", type=_positive_int, default=16, help="number of test images")
    impute.add_argument("--num-samples", type=_positive_int, default=100, help="posterior samples per image")
    impute.add_argument("--method", default="mala", choices=IMPUTERS,
                        help="how z is drawn: infer_posterior's chains, Metropolis-adjusted (mala) or not (ula); "
                             "the encoder alone; pseudo-Gibbs (Rezende et al. 2014); Metropolis-within-Gibbs "
                             "(Mattei & Frellsen 2018)")
    impute.add_argument("--warmup-steps", type=int, default=100,
                        help="steps discarded before the draws (the chains adapt η in them)")
    impute.add_argument("--seed", type=int, default=0, help="seed of the random mask and the chains")
    impute.add_argument("--output", "--out", default=None,
                        help="image file (default: RUN_DIR/imputations-MASK.png, -METHOD added for other methods)")
    return parser


class _Indexed(torch.utils.data.Dataset):
    """`(dataset[i], i)`: images with their indices, for `--persistent-chains`."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        return self.dataset[index], index


def missing_pixels(shape, pattern: str, fraction: float = 0.5) -> torch.Tensor:
    """A boolean mask of `shape` `(N, C, H, W)`, True = observed, the same for every channel:
    `"bottom-half"` hides rows `H // 2` to `H - 1`; `"random"` hides `round(fraction · H · W)`
    pixels of each image, chosen uniformly (torch's global generator)."""
    n, channels, height, width = shape
    if pattern == "bottom-half":
        observed = (torch.arange(height) < height // 2)[:, None].expand(height, width).expand(n, height, width)
    elif pattern == "random":
        order = torch.rand(n, height * width).argsort(1)
        observed = (order >= round(fraction * height * width)).reshape(n, height, width)
    else:
        raise ValueError(f"pattern must be one of {MASKS}, got {pattern!r}")
    return observed[:, None].expand(n, channels, height, width).clone()


# -- the configuration of a new run --------------------------------------------------------------
def _config_from_args(args) -> dict:
    colour = args.dataset in ("cifar10", "svhn", "celeba")
    model = args.model or ("conv" if colour else "mlp")
    digits = args.dataset == "digits"
    return {
        "dataset": args.dataset,
        "data_root": args.data_root,
        "method": args.method,
        "model": model,
        "latent_dim": args.latent_dim or (16 if digits else 50 if model == "mlp" else 64),
        "epochs": args.epochs if args.epochs is not None else (150 if digits else 10),
        "batch_size": args.batch_size,
        "lr": args.lr,
        "num_steps": args.num_steps,
        "step_size": args.step_size,
        "precondition": None if args.precondition == "None" else args.precondition,
        "warm_start": args.warm_start,
        "adjust": args.adjust,
        "keep": args.keep,
        "persistent_chains": args.persistent_chains,
        "target_accept": args.target_accept,
        "compile": args.compile,
        "particles": args.particles,
        "eval_samples": args.eval_samples,
        "seed": args.seed,
        "version": __version__,
    }


# -- commands --------------------------------------------------------------------------------
def train(args) -> int:
    group = distributed.replicas()
    if group.world_size > 1 and args.method != "lpc":
        raise NotImplementedError(f"--method {args.method} trains in one process; run it without torchrun.")
    if args.persistent_chains and args.method != "lpc":
        raise ValueError(f"--persistent-chains keeps LPC's chains; --method {args.method} has none.")
    if group.is_main:
        out = args.out or default_run_dir(args.dataset, args.method, existing=args.resume)
        config = run_config(out, _config_from_args(args), resume=args.resume, epochs=args.epochs)
    out, config = group.broadcast_object((out, config) if group.is_main else None)
    # rank 0 loads first (torchvision may unpack archives in place), then the others; a missing
    # file fails cleanly, before anything is written
    train_set = run_data(config, "train", binarize="dynamic") if group.is_main else None
    group.broadcast_object(None)
    if train_set is None:
        train_set = run_data(config, "train", binarize="dynamic")
    if group.is_main:
        write_config(out, config)
    pyro.clear_param_store()
    dlgm = run_model(config, train_set.info.image_shape).to(args.device)
    persistent = config.get("persistent_chains", False)
    loader = data_loader(_Indexed(train_set) if persistent else train_set, config["batch_size"], group=group,
                         seed=config["seed"])
    common = dict(num_epochs=config["epochs"], seed=config["seed"], progress=not args.quiet and group.is_main,
                  checkpoint_dir=out, resume=args.resume,
                  batch_args=(lambda b: b[0].to(args.device)) if persistent else lambda x: x.to(args.device))
    optim = lambda: pyro.optim.Adam({"lr": config["lr"]})  # noqa: E731
    started = time.perf_counter()
    if config["method"] == "lpc":
        guide = None if config["warm_start"] == "none" else dlgm.guide
        jit_compile, jit_options = COMPILE[config.get("compile", "off")]
        result = fit(dlgm.model, guide, loader, num_steps=config["num_steps"], step_size=config["step_size"],
                     precondition=config["precondition"], adjust=config["adjust"],
                     warm_start="jeffreys" if guide is None else config["warm_start"],
                     keep=_keep_for_fit(config["keep"]), target_accept_prob=config.get("target_accept"),
                     jit_compile=jit_compile, jit_options=jit_options, optim=optim(), guide_optim=optim(),
                     persistent_chains=persistent, batch_indices=(lambda b: b[1]) if persistent else None, **common)
    else:
        objective = "elbo" if config["method"] == "vae" else "iwae"
        result = fit_svi(dlgm.model, dlgm.guide, loader, objective=objective, num_particles=config["particles"],
                         optim=optim(), **common)
    if not group.is_main:
        return 0
    write_history(out, result.history)
    plots.plot_curves(result.history, os.path.join(out, "curves.png"))
    written = evaluate_run(out, config, dlgm, progress=not args.quiet)
    print(f"pyro-lpc: trained {config['method']} on {config['dataset']} for {config['epochs']} epochs "
          f"in {time.perf_counter() - started:.0f} s on {group.world_size} process(es); "
          f"wrote {', '.join(written)} in {out}")
    return 0


def evaluate(args) -> int:
    run = load_run(args.run_dir, args.device)
    config = dict(run.config, eval_samples=args.eval_samples or run.config["eval_samples"])
    written = evaluate_run(args.run_dir, config, run.dlgm, progress=not args.quiet)
    print(f"pyro-lpc: wrote {', '.join(written)} in {args.run_dir}")
    return 0


def sample(args) -> int:
    run = load_run(args.run_dir, args.device)
    torch.manual_seed(args.seed)
    output = args.output or os.path.join(args.run_dir, "samples.png")
    with torch.no_grad():
        plots.save_grid(run.dlgm.sample(args.num), output)
    print(f"pyro-lpc: wrote {args.num} samples to {output}")
    return 0


def impute(args) -> int:
    run = load_run(args.run_dir, args.device)
    images = eval_images(run.config, args.device)
    if args.num > len(images):
        raise ValueError(f"-n {args.num}: the test set holds only {len(images)} images")
    pyro.set_rng_seed(args.seed)
    x = images[:args.num]
    mask = missing_pixels(x.shape, args.mask, args.fraction).to(x.device)
    hidden = torch.where(mask, x, torch.full_like(x, float("nan")))  # the missing pixels are never read
    z, how = _imputation_draws(run, x, hidden, mask, args)
    imputed, log_p = run.dlgm.impute(x, mask, z)
    encoder = pyro.infer.Predictive(run.guide, num_samples=args.num_samples, return_sites=["z"])
    _, log_p_encoder = run.dlgm.impute(x, mask, encoder(hidden, mask=mask)["z"])
    method = "" if args.method == "mala" else f"-{args.method}"
    output = args.output or os.path.join(args.run_dir, f"imputations-{args.mask}{method}.png")
    plots.save_imputations(x, mask, imputed, output)
    missing = (~mask[:, 0]).sum().item() / args.num
    print(f"pyro-lpc: {args.num} test images, {missing:.0f} of {mask[0, 0].numel()} pixels missing ({args.mask}); "
          f"log-likelihood of the true missing pixels per image: {args.method} {log_p.mean().item():.2f} nats, "
          f"encoder alone {log_p_encoder.mean().item():.2f} nats; {how}; wrote {output}")
    return 0


def _imputation_draws(run, x, hidden, mask, args):
    """`--method`'s draws of z, `(S, B, latent_dim)`, and a line on how the sampler moved."""
    if args.method in ("mala", "ula"):
        samples = infer_posterior(run.model, run.guide, hidden, mask=mask, num_samples=args.num_samples,
                                  warmup_steps=args.warmup_steps, adjust=args.method == "mala")
        return samples["z"], (f"{args.method.upper()} acceptance {samples.accept_rate:.2f}, {samples.divergences} "
                              f"divergences, step size {samples.step_size:.3g}")
    if args.method == "encoder":
        return imputation.encoder_draws(run.dlgm, hidden, mask, args.num_samples).z, "no chain"
    sampler = imputation.pseudo_gibbs if args.method == "pseudo-gibbs" else imputation.metropolis_within_gibbs
    draws = sampler(run.dlgm, hidden, mask, args.num_samples, args.warmup_steps)
    return draws.z, f"acceptance {draws.accept_rate:.2f}"


@record
def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        code = {"train": train, "evaluate": evaluate, "sample": sample, "impute": impute}[args.command](args)
    except (FileNotFoundError, ValueError, NotImplementedError) as error:
        print(f"pyro-lpc: error: {error}", file=sys.stderr)
        code = 2
    distributed.finish(code)  # a torchrun worker ends here; one process returns
    return code


if __name__ == "__main__":
    sys.exit(main())
