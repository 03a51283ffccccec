"""Run directories of the `pyro-lpc` command: where a run goes, its configuration, the
dataset and model it describes, loading a trained run (`load_run`) and writing its metrics.

A run directory holds `config.json`, `checkpoint.pt`, `history.jsonl`,
`metrics.json`, `samples.png`, `reconstructions.png` and `curves.png`.
"""
from __future__ import annotations

import json
import os
from typing import Callable, List, NamedTuple, Optional, Union

import pyro
import torch

from ..checkpoint import CHECKPOINT, load_checkpoint, read_checkpoint
from ..marginal_likelihood import log_marginal_likelihood
from .data import load_dataset
from .models import conv_model, mlp_model
from .plots import save_grid
from .sample_quality import sample_quality, train_feature_extractor

CONFIG, HISTORY, METRICS = "config.json", "history.jsonl", "metrics.json"


def default_run_dir(dataset: str, method: str, existing: bool = False) -> str:
    """`runs/<dataset>-<method>`, or `-2`, `-3`...: the first free one, or the
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


def run_config(out: str, new_config: dict, *, resume: bool = False, epochs: Optional[int] = None) -> dict:
    """The configuration of a new run in `out` (`new_config`; refused if `out` already
    holds a run), or with `resume` that of the run there (`epochs` overriding its number
    of epochs; its checkpoint is read, so a broken run fails before anything is written)."""
    config_path = os.path.join(out, CONFIG)
    if resume:
        if not os.path.exists(config_path):
            raise SystemExit(f"pyro-lpc: --resume: no run to continue in {out} (missing {CONFIG}).")
        with open(config_path) as f:
            config = json.load(f)
        if epochs is not None:
            config["epochs"] = epochs
        read_checkpoint(os.path.join(out, CHECKPOINT))
        return config
    if os.path.exists(os.path.join(out, CHECKPOINT)):
        raise SystemExit(f"pyro-lpc: {out} already holds a run; use --resume to continue it or --out elsewhere.")
    return new_config


def write_config(out: str, config: dict) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, CONFIG), "w") as f:
        json.dump(config, f, indent=2)


def write_history(out: str, history) -> None:
    """One JSON object per line, one line per training iteration."""
    with open(os.path.join(out, HISTORY), "w") as f:
        for row in history:
            f.write(json.dumps(row) + "\n")


def run_data(config: dict, split: str, *, binarize=None, labels: bool = False):
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


def run_model(config: dict, image_shape):
    """The run's model and guide ([`mlp_model`][pyro_lpc.images.models.mlp_model] or
    [`conv_model`][pyro_lpc.images.models.conv_model]), initialised from the run's seed."""
    torch.manual_seed(config["seed"])
    if config["model"] == "conv":
        return conv_model(image_size=image_shape[-1], channels=image_shape[0], latent_dim=config["latent_dim"])
    hidden = (200, 200)
    return mlp_model(image_shape=tuple(image_shape), latent_dim=config["latent_dim"], hidden=hidden,
                     likelihood="bernoulli")


def data_loader(dataset, batch_size: int, shuffle: bool = True, group=None, seed: int = 0):
    """Batches of `dataset`; under torchrun each rank's share through a `DistributedSampler`."""
    if group is not None and group.world_size > 1:
        sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=group.world_size, rank=group.rank,
                                                      shuffle=shuffle, seed=seed)
        return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=False)


def resolve_device(device: Union[str, torch.device]) -> torch.device:
    """`device` as a `torch.device`: `"cpu"`, `"cuda"` or `"cuda:N"`, refused (`ValueError`)
    when it names no device of this machine."""
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device: expected cpu, cuda or cuda:N, got {device!r}") from None
    if resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"device: expected cpu, cuda or cuda:N, got {device!r}")
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: CUDA is not available here (torch {torch.__version__}, "
                             "torch.cuda.is_available() is False); use cpu")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                             f"numbered from 0")
    return resolved


class Run(NamedTuple):
    """A trained run, as `load_run` returns it.

    Attributes:
        config: the run's `config.json`.
        dlgm: the `DeepLatentGaussian` with the learned weights (`dlgm.sample(n)`,
            `dlgm.reconstruct(x)`).
        model: `dlgm.model`, the Pyro model `model(x)`.
        guide: `dlgm.guide`, the amortised guide `guide(x)`.
        params: Pyro's global param store, holding the learned parameters.
        train_set: the run's training images (dynamically binarised for Bernoulli models).
    """

    config: dict
    dlgm: torch.nn.Module
    model: Callable
    guide: Callable
    params: pyro.params.param_store.ParamStoreDict
    train_set: torch.utils.data.Dataset


def load_run(run_dir: str, device: Union[str, torch.device] = "cpu") -> Run:
    """A run of `pyro-lpc train`: its model and guide with the learned parameters, on `device`.

    Clears Pyro's param store and loads the run's parameters into it, as training left them
    (the last epoch's checkpoint), so the model is ready for inference:

    ```python
    run = pyro_lpc.images.load_run("runs/digits-lpc")
    x = torch.stack([run.train_set[i] for i in range(100)])
    log_px = log_marginal_likelihood(run.model, run.guide, x, num_samples=100)  # pyro_lpc.marginal_likelihood
    ```

    Raises:
        FileNotFoundError: `run_dir` holds no `config.json` or no checkpoint.
        ValueError: the checkpoint is corrupted, or `device` is not a device of this machine.
    """
    device = resolve_device(device)
    config_path = os.path.join(run_dir, CONFIG)
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{run_dir} is not a run directory (missing {CONFIG}).")
    checkpoint_path = os.path.join(run_dir, CHECKPOINT)
    if not os.path.exists(checkpoint_path):
        raise FileNotFoundError(f"{run_dir} holds no trained parameters (missing {CHECKPOINT}).")
    with open(config_path) as f:
        config = json.load(f)
    train_set = run_data(config, "train", binarize="dynamic")
    pyro.clear_param_store()
    dlgm = run_model(config, train_set.info.image_shape).to(device)
    batch = next(iter(data_loader(train_set, 2, shuffle=False))).to(device)
    load_checkpoint(checkpoint_path, dlgm.model, dlgm.guide, (batch,), {}, {})
    return Run(config, dlgm, dlgm.model, dlgm.guide, pyro.get_param_store(), train_set)


def eval_images(config: dict, device: Union[str, torch.device] = "cpu") -> torch.Tensor:
    """The run's test images as the evaluation sees them (statically binarised for Bernoulli
    models: the same draw every time), stacked on `device`."""
    test_set = run_data(config, "test", binarize="static")
    return torch.stack([test_set[i] for i in range(len(test_set))]).to(device)


def eval_log_likelihood(config: dict, dlgm, images: torch.Tensor, progress: bool = False) -> torch.Tensor:
    """Per-image log-likelihoods whose mean is `metrics.json`'s `test_log_likelihood`: the IWAE
    bound with k = `config["eval_samples"]` and the run's guide as proposal, seeded with the
    run's seed."""
    torch.manual_seed(config["seed"])
    with torch.no_grad():
        return log_marginal_likelihood(dlgm.model, dlgm.guide, images, num_samples=config["eval_samples"],
                                       method="iwae", batch_size=config["batch_size"], progress=progress)


def evaluate_run(run_dir: str, config: dict, dlgm, progress: bool = True) -> List[str]:
    """Write the run's `metrics.json` (test IWAE log-likelihood; Fréchet distance and
    density/coverage in the features of a LeNet trained on the training images),
    `samples.png` and `reconstructions.png`; returns the run's file names. Runs on the
    device of `dlgm`'s parameters."""
    device = next(dlgm.parameters()).device
    test = eval_images(config, device)
    lml = eval_log_likelihood(config, dlgm, test, progress)
    labelled = run_data(config, "train", labels=True)
    images = torch.stack([labelled[i][0] for i in range(len(labelled))]).to(device)
    labels = torch.tensor([int(labelled[i][1]) for i in range(len(labelled))])
    extractor = train_feature_extractor(images, labels, seed=config["seed"])
    real_set = run_data(config, "test")
    real = torch.stack([real_set[i] for i in range(len(real_set))]).to(device)
    with torch.no_grad():
        fake = dlgm.sample(len(real))
        quality = sample_quality(real, fake, extractor)
        save_grid(fake[:64], os.path.join(run_dir, "samples.png"))
        recon = dlgm.reconstruct(test[:32])
        pairs = torch.stack([test[:32], recon], 1).flatten(0, 1)
        save_grid(pairs, os.path.join(run_dir, "reconstructions.png"), nrow=16)
    metrics = {
        "test_log_likelihood": lml.mean().item(),
        "test_log_likelihood_bound": f"IWAE, k={config['eval_samples']}",
        "num_test": len(test),
        **{k: float(v) for k, v in quality.items()},
    }
    with open(os.path.join(run_dir, METRICS), "w") as f:
        json.dump(metrics, f, indent=2)
    return [CONFIG, CHECKPOINT, HISTORY, METRICS, "samples.png", "reconstructions.png", "curves.png"]
