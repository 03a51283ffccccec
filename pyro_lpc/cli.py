"""The ``pyro-lpc`` command: train, evaluate and sample image generative models.

    pyro-lpc train [--dataset digits] [--method lpc|vae|iwae] [--model mlp|conv] ... [--out RUN_DIR]
    pyro-lpc evaluate RUN_DIR
    pyro-lpc sample RUN_DIR -n 64

``pyro-lpc train`` with no arguments trains on scikit-learn's embedded 8×8
digits (offline, a few minutes on 2 CPU cores). ``vae`` and ``iwae`` train the
very same model and guide with Pyro's ``SVI`` (``Trace_ELBO``;
``RenyiELBO(alpha=0)`` with k particles). A run directory holds
``config.json``, ``checkpoint.pt``, ``history.jsonl``, ``metrics.json``,
``samples.png``, ``reconstructions.png`` and ``curves.png``.

Several processes train one LPC run data-parallel when launched by ``torchrun``::

    torchrun --standalone --nproc-per-node 2 -m pyro_lpc train --dataset mnist

(``--batch-size`` is per process; rank 0 writes the run directory.)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import List, Optional

import pyro
import torch

from torch.distributed.elastic.multiprocessing.errors import record

from . import __version__, distributed
from .baselines import fit_svi
from .checkpoint import CHECKPOINT, load_checkpoint, read_checkpoint
from .data import DATASETS, load_dataset
from .fit import fit
from .langevin import PRECONDITIONERS
from .models import conv_model, mlp_model
from .warm_start import OBJECTIVES

METHODS = ("lpc", "vae", "iwae")
MODELS = ("mlp", "conv")
CONFIG, HISTORY, METRICS = "config.json", "history.jsonl", "metrics.json"
DATASET_NAMES = [d for d in DATASETS if ":" not in d]


#: ``--compile`` choices and the ``fit(jit_compile=...)`` each stands for
COMPILE = {"off": False, "record": True, "inductor": {}, "cuda-graphs": {"mode": "reduce-overhead"}}


def _num_steps(value: str):
    if value == "auto":
        return value
    if value.isdigit():
        return int(value)
    raise argparse.ArgumentTypeError(f"expected a non-negative integer or 'auto', got {value!r}")


def _keep(value: str):
    """``--keep`` as stored in config.json: "all", "last", an int burn-in or "every:N"."""
    if value in ("all", "last") or value.isdigit() or (value.startswith("every:") and value[6:].isdigit()
                                                        and int(value[6:]) > 0):
        return int(value) if value.isdigit() else value
    raise argparse.ArgumentTypeError(f"expected last, all, an integer burn-in or every:N, got {value!r}")


def _keep_for_fit(keep):
    """config.json's ``keep`` as ``fit`` takes it (``every:N`` is the slice of every N-th sample)."""
    if isinstance(keep, str) and keep.startswith("every:"):
        n = int(keep[6:])
        return slice(n - 1, None, n)
    return keep


def _choice(valid):
    """An argparse type that names the valid values when given another."""

    def parse(value):
        if value not in valid:
            raise argparse.ArgumentTypeError(f"invalid choice {value!r}; valid: {', '.join(map(str, valid))}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pyro-lpc", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"pyro-lpc {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train a model (default: LPC on the embedded digits)")
    train.add_argument("--dataset", default="digits", type=_choice(DATASET_NAMES),
                       help=f"one of {', '.join(DATASET_NAMES)} (default digits, embedded)")
    train.add_argument("--data-root", default=None, help="folder with the dataset files")
    train.add_argument("--method", default="lpc", type=_choice(METHODS), help="lpc, vae or iwae")
    train.add_argument("--model", default=None, type=_choice(MODELS),
                       help="mlp or conv (default: mlp for grey-scale, conv for colour data)")
    train.add_argument("--latent-dim", type=int, default=None, help="default 16 (digits), 50 (mlp), 64 (conv)")
    train.add_argument("--epochs", type=int, default=None, help="default 150 for digits, 10 otherwise")
    train.add_argument("--batch-size", type=int, default=100,
                       help="per process: under torchrun the global batch is nproc × this")
    train.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate of model and guide")
    train.add_argument("--num-steps", type=_num_steps, default=20,
                       help="Langevin steps K per mini-batch, or 'auto' (adapted to the chains' energy drop)")
    train.add_argument("--step-size", type=float, default=1e-2, help="Langevin step size η")
    train.add_argument("--target-accept", type=float, default=None,
                       help="adapt η so the chains' mean MALA acceptance probability tracks this value")
    train.add_argument("--precondition", default="diagonal", type=_choice([str(p) for p in PRECONDITIONERS]))
    train.add_argument("--warm-start", default="jeffreys", type=_choice(list(OBJECTIVES) + ["none"]),
                       help="guide objective, or 'none' for encoder-free chains")
    train.add_argument("--adjust", action="store_true", help="Metropolis-adjust the chains (MALA)")
    train.add_argument("--compile", default="off", type=_choice(list(COMPILE)),
                       help="the chains' energy and gradient: off (Pyro at every step), record (one recorded "
                            "graph per batch shape), inductor (that graph compiled by torch.compile; needs a "
                            "C++ compiler on CPU) or cuda-graphs (compiled and replayed as a CUDA graph)")
    train.add_argument("--keep", default="last", type=_keep,
                       help="samples feeding θ: last, all, an int burn-in or every:N (every N-th)")
    train.add_argument("--particles", type=int, default=5, help="k for --method iwae")
    train.add_argument("--eval-samples", type=int, default=1000, help="k of the test IWAE bound")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--out", default=None,
                       help="run directory (default: the first free runs/<dataset>-<method>[-N])")
    train.add_argument("--resume", action="store_true", help="continue the run in --out")
    train.add_argument("--quiet", action="store_true", help="no progress bars")

    evaluate = commands.add_parser("evaluate", help="write metrics.json of a run")
    evaluate.add_argument("run_dir")
    evaluate.add_argument("--eval-samples", type=int, default=None, help="k of the test IWAE bound")
    evaluate.add_argument("--quiet", action="store_true")

    sample = commands.add_parser("sample", help="draw images from a trained run")
    sample.add_argument("run_dir")
    sample.add_argument("-n", "--num", type=int, default=64)
    sample.add_argument("--output", default=None, help="image file (default RUN_DIR/samples.png)")
    sample.add_argument("--seed", type=int, default=0)
    return parser


# -- configuration and the model of a run ----------------------------------------------------
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
        "target_accept": args.target_accept,
        "compile": args.compile,
        "particles": args.particles,
        "eval_samples": args.eval_samples,
        "seed": args.seed,
        "version": __version__,
    }


def _data(config, split, *, binarize=None, labels=False):
    """The run's dataset: Bernoulli MLPs see [0, 1] images, conv models [-1, 1] (padded to 32)."""
    conv = config["model"] == "conv"
    small = config["dataset"] in ("digits", "mnist", "fashion-mnist")
    return load_dataset(
        config["dataset"], config["data_root"], split,
        binarize=None if conv else binarize,
        pixel_range=(-1.0, 1.0) if conv else (0.0, 1.0),
        pad_to=32 if conv and small else None,
        labels=labels,
    )


def _model(config, image_shape):
    torch.manual_seed(config["seed"])
    if config["model"] == "conv":
        return conv_model(image_size=image_shape[-1], channels=image_shape[0], latent_dim=config["latent_dim"])
    hidden = (200, 200)
    return mlp_model(image_shape=tuple(image_shape), latent_dim=config["latent_dim"], hidden=hidden,
                     likelihood="bernoulli")


def _loader(dataset, batch_size, shuffle=True, group=None, seed=0):
    """Batches of ``dataset``; under torchrun each rank's share through a ``DistributedSampler``."""
    if group is not None and group.world_size > 1:
        sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=group.world_size, rank=group.rank,
                                                      shuffle=shuffle, seed=seed)
        return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=False)


# -- commands --------------------------------------------------------------------------------
def train(args) -> int:
    group = distributed.replicas()
    if group.world_size > 1 and args.method != "lpc":
        raise NotImplementedError(f"--method {args.method} trains in one process; run it without torchrun.")
    if group.is_main:
        out = args.out or _default_run_dir(args.dataset, args.method, existing=args.resume)
        config = _run_config(args, out)
    out, config = group.broadcast_object((out, config) if group.is_main else None)
    # rank 0 loads first (torchvision may unpack archives in place), then the others; a missing
    # file fails cleanly, before anything is written
    train_set = _data(config, "train", binarize="dynamic") if group.is_main else None
    group.broadcast_object(None)
    if train_set is None:
        train_set = _data(config, "train", binarize="dynamic")
    if group.is_main:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, CONFIG), "w") as f:
            json.dump(config, f, indent=2)
    pyro.clear_param_store()
    dlgm = _model(config, train_set.info.image_shape)
    loader = _loader(train_set, config["batch_size"], group=group, seed=config["seed"])
    common = dict(num_epochs=config["epochs"], seed=config["seed"], progress=not args.quiet and group.is_main,
                  checkpoint_dir=out, resume=args.resume)
    optim = lambda: pyro.optim.Adam({"lr": config["lr"]})  # noqa: E731
    started = time.perf_counter()
    if config["method"] == "lpc":
        guide = None if config["warm_start"] == "none" else dlgm.guide
        result = fit(dlgm.model, guide, loader, num_steps=config["num_steps"], step_size=config["step_size"],
                     precondition=config["precondition"], adjust=config["adjust"],
                     warm_start="jeffreys" if guide is None else config["warm_start"],
                     keep=_keep_for_fit(config["keep"]), target_accept=config.get("target_accept"),
                     jit_compile=COMPILE[config.get("compile", "off")], optim=optim(), guide_optim=optim(), **common)
    else:
        objective = "elbo" if config["method"] == "vae" else "iwae"
        result = fit_svi(dlgm.model, dlgm.guide, loader, objective=objective, num_particles=config["particles"],
                         optim=optim(), **common)
    if not group.is_main:
        return 0
    with open(os.path.join(out, HISTORY), "w") as f:
        for row in result.history:
            f.write(json.dumps(row) + "\n")
    _plot_curves(result.history, os.path.join(out, "curves.png"))
    written = _evaluate_run(out, config, dlgm, train_set, progress=not args.quiet)
    print(f"pyro-lpc: trained {config['method']} on {config['dataset']} for {config['epochs']} epochs "
          f"in {time.perf_counter() - started:.0f} s on {group.world_size} process(es); "
          f"wrote {', '.join(written)} in {out}")
    return 0


def _run_config(args, out) -> dict:
    """The configuration of a new run in ``out``, or of the run there to resume (checked)."""
    config_path = os.path.join(out, CONFIG)
    if args.resume:
        if not os.path.exists(config_path):
            raise SystemExit(f"pyro-lpc: --resume: no run to continue in {out} (missing {CONFIG}).")
        with open(config_path) as f:
            config = json.load(f)
        if args.epochs is not None:
            config["epochs"] = args.epochs
        read_checkpoint(os.path.join(out, CHECKPOINT))  # fails cleanly, before anything is written
    else:
        config = _config_from_args(args)
        if os.path.exists(os.path.join(out, CHECKPOINT)):
            raise SystemExit(f"pyro-lpc: {out} already holds a run; use --resume to continue it or --out elsewhere.")
    return config


def _default_run_dir(dataset, method, existing=False):
    """``runs/<dataset>-<method>``, or ``-2``, ``-3``...: the first free one, or the
    last taken one when resuming."""
    base = os.path.join("runs", f"{dataset}-{method}")
    taken = [base] if os.path.exists(base) else []
    n = 2
    while os.path.exists(f"{base}-{n}"):
        taken.append(f"{base}-{n}")
        n += 1
    if existing:
        return taken[-1] if taken else base
    return base if not taken else f"{base}-{n}"


def _restore_run(run_dir):
    """Config, rebuilt model with its trained parameters, and the train set of a run."""
    config_path = os.path.join(run_dir, CONFIG)
    if not os.path.exists(config_path):
        raise SystemExit(f"pyro-lpc: {run_dir} is not a run directory (missing {CONFIG}).")
    with open(config_path) as f:
        config = json.load(f)
    train_set = _data(config, "train", binarize="dynamic")
    pyro.clear_param_store()
    dlgm = _model(config, train_set.info.image_shape)
    batch = next(iter(_loader(train_set, 2, shuffle=False)))
    load_checkpoint(os.path.join(run_dir, CHECKPOINT), dlgm.model, dlgm.guide, (batch,), {}, {})
    return config, dlgm, train_set


def evaluate(args) -> int:
    config, dlgm, train_set = _restore_run(args.run_dir)
    if args.eval_samples:
        config["eval_samples"] = args.eval_samples
    written = _evaluate_run(args.run_dir, config, dlgm, train_set, progress=not args.quiet)
    print(f"pyro-lpc: wrote {', '.join(written)} in {args.run_dir}")
    return 0


def sample(args) -> int:
    _, dlgm, _ = _restore_run(args.run_dir)
    torch.manual_seed(args.seed)
    output = args.output or os.path.join(args.run_dir, "samples.png")
    with torch.no_grad():
        _save_grid(dlgm.sample(args.num), output)
    print(f"pyro-lpc: wrote {args.num} samples to {output}")
    return 0


# -- evaluation and pictures -------------------------------------------------------------------
def _evaluate_run(run_dir, config, dlgm, train_set, progress=True) -> List[str]:
    from .evaluate import log_marginal_likelihood, sample_quality, train_feature_extractor

    torch.manual_seed(config["seed"])
    test_set = _data(config, "test", binarize="static")
    test = torch.stack([test_set[i] for i in range(len(test_set))])
    with torch.no_grad():
        lml = log_marginal_likelihood(dlgm.model, dlgm.guide, test, num_samples=config["eval_samples"],
                                      method="iwae", batch_size=config["batch_size"], progress=progress)
    labelled = _data(config, "train", labels=True)
    images = torch.stack([labelled[i][0] for i in range(len(labelled))])
    labels = torch.tensor([int(labelled[i][1]) for i in range(len(labelled))])
    extractor = train_feature_extractor(images, labels, seed=config["seed"])
    real = torch.stack([_data(config, "test")[i] for i in range(len(test_set))])
    with torch.no_grad():
        fake = dlgm.sample(len(real))
        quality = sample_quality(real, fake, extractor)
        _save_grid(fake[:64], os.path.join(run_dir, "samples.png"))
        recon = dlgm.reconstruct(test[:32])
        pairs = torch.stack([test[:32], recon], 1).flatten(0, 1)
        _save_grid(pairs, os.path.join(run_dir, "reconstructions.png"), nrow=16)
    metrics = {
        "test_log_likelihood": lml.mean().item(),
        "test_log_likelihood_bound": f"IWAE, k={config['eval_samples']}",
        "num_test": len(test),
        **{k: float(v) for k, v in quality.items()},
    }
    with open(os.path.join(run_dir, METRICS), "w") as f:
        json.dump(metrics, f, indent=2)
    return [CONFIG, CHECKPOINT, HISTORY, METRICS, "samples.png", "reconstructions.png", "curves.png"]


def _save_grid(images, path, nrow=8):
    import torchvision

    images = images.detach().cpu().float()
    if images.min() < 0:
        images = (images + 1) / 2
    if images.shape[-1] < 28:  # make 8x8 digits visible
        images = torch.nn.functional.interpolate(images, scale_factor=28 // images.shape[-1], mode="nearest")
    torchvision.utils.save_image(images.clamp(0, 1), path, nrow=nrow, padding=2, pad_value=0.5)


def _plot_curves(history, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = "log_joint" if history and "log_joint" in history[0] else "elbo"
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    values = [row[key] for row in history]
    for ax, x, label in ((axes[0], [r["iteration"] for r in history], "iteration"),
                         (axes[1], [r["time"] for r in history], "seconds")):
        ax.plot(x, values, lw=0.8)
        ax.set_xlabel(label)
        ax.set_ylabel(f"{key} per data point")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


@record
def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code = {"train": train, "evaluate": evaluate, "sample": sample}[args.command](args)
    except (FileNotFoundError, ValueError, NotImplementedError) as error:
        print(f"pyro-lpc: error: {error}", file=sys.stderr)
        code = 2
    distributed.finish(code)  # a torchrun worker ends here; one process returns
    return code


if __name__ == "__main__":
    sys.exit(main())
