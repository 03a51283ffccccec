"""What the benchmark programs share: paths, data, the MNIST training protocol, timing, results.

Every program in ``benchmarks/`` prints its figures and writes one results record (JSON)
under ``benchmarks/results/`` with :func:`write_results`; ``benchmarks/render.py`` builds
``docs/benchmarks.md`` from those records. Data are read from ``$PYRO_LPC_DATA`` (default:
``../shared/data`` beside the checkout; see DESIGN.md §6).

The MNIST protocol (:func:`mnist_data`, :func:`run_mnist_method`), every method alike:
the IWAE paper's 784-200-200-50 tanh MLP decoder and encoder, Bernoulli likelihood, batch
100 of dynamically binarised training images from one shared stream (:class:`TimedStream`),
the same initial weights, Adam with one learning rate for θ and φ, a wall-clock budget per
method with parameter snapshots at fixed iteration counts and fractions of the budget
(snapshot time excluded); test log-likelihood of each snapshot = the IWAE bound with the
method's own guide (the prior without one) on statically binarised test images.
"""
from __future__ import annotations

import datetime
import inspect
import json
import os
import platform
import pstats
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import pyro
import torch

from pyro_lpc import fit
from pyro_lpc.baselines import fit_svi
from pyro_lpc.images.data import load_dataset
from pyro_lpc.marginal_likelihood import log_marginal_likelihood
from pyro_lpc.fit import NonFiniteError
from pyro_lpc.images.models import mlp_model

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
IMAGES = REPO / "docs" / "img"
BATCH = 100
EVAL_SEED = 1234  # seeds every evaluation (guide draws, AIS chains, prior samples)


# -- the machine, the clock, the record ---------------------------------------------------
def machine() -> str:
    """CPU model, core count, torch, pyro and Python versions, torch threads."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{cpu}; os.cpu_count()={os.cpu_count()}, torch {torch.__version__}, pyro {pyro.__version__}, "
            f"torch threads {torch.get_num_threads()}, Python {platform.python_version()}")


def loadavg() -> str:
    try:
        return "load average {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    except OSError:
        return "load average unavailable"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def timed(fn, *args, **kwargs):
    """``(fn(*args, **kwargs), seconds it took)``."""
    begin = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - begin


def default_data_root() -> str:
    return os.environ.get("PYRO_LPC_DATA") or str(REPO.parent / "shared" / "data")


def results_path(name: str) -> str:
    """Default ``--out`` of a program: ``benchmarks/results/<name>.json``."""
    return str(RESULTS / f"{name}.json")


def write_results(path: str, figures: dict, note: Optional[str] = None) -> dict:
    """Write ``figures`` to ``path`` as a results record: the program, the command line, the date
    and the machine, then the figures (and ``note``, free text shown under the figures on the
    page). Returns the record."""
    record = {"program": os.path.relpath(os.path.abspath(sys.argv[0]), REPO),
              "command": "python " + shlex.join([os.path.relpath(os.path.abspath(sys.argv[0]), REPO)] + sys.argv[1:]),
              "date": datetime.date.today().isoformat(), "machine": machine(), **figures}
    if note:
        record["notes"] = note
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(record, f, indent=1)
        f.write("\n")
    print(f"wrote {path}")
    return record


# -- data -------------------------------------------------------------------------------------
def writable_mnist_root(data_root: str) -> str:
    """A temporary copy of ``<data_root>/MNIST`` (torchvision extracts the .gz files in place)."""
    tmp = tempfile.mkdtemp(prefix="pyro-lpc-bench-")
    shutil.copytree(Path(data_root) / "MNIST", Path(tmp) / "MNIST")
    return tmp


def stack(dataset, indices=None):
    """Items of an :class:`~pyro_lpc.images.data.ImageDataset` as one tensor (two with ``labels=True``)."""
    items = [dataset[i] for i in (indices if indices is not None else range(len(dataset)))]
    if isinstance(items[0], tuple):
        return torch.stack([x for x, _ in items]), torch.tensor([int(y) for _, y in items])
    return torch.stack(items)


def mnist_data(root: str, seed: int, *, val_images: int, test_images: int, quality_images: int) -> dict:
    """Grey-level training images (less the last ``val_images``, held out), their labels, the
    held-out and test images statically binarised, and grey-level test images for sample quality."""
    grey, labels = stack(load_dataset("mnist", root, "train", labels=True))
    held_out = range(len(grey) - val_images, len(grey))
    static_train = load_dataset("mnist", root, "train", binarize="static", seed=seed)
    static_test = load_dataset("mnist", root, "test", binarize="static", seed=seed)
    grey_test, test_labels = stack(load_dataset("mnist", root, "test", labels=True), range(quality_images))
    return {
        "train": grey[: len(grey) - val_images], "grey_train": grey, "train_labels": labels,
        "val": stack(static_train, held_out), "test": stack(static_test, range(test_images)),
        "grey_test": grey_test, "test_labels": test_labels,
    }


#: ``fit``'s settings that a benchmark using its defaults records with its results.
SETTINGS = ("num_steps", "step_size", "keep", "precondition")


def fit_settings() -> dict:
    """``fit``'s current defaults of :data:`SETTINGS`."""
    defaults = inspect.signature(fit).parameters
    return {name: defaults[name].default for name in SETTINGS}


def mnist_model(seed: int, device="cpu"):
    torch.manual_seed(seed)  # the same initial weights for every method
    return mlp_model(image_shape=(1, 28, 28), latent_dim=50, hidden=(200, 200), likelihood="bernoulli").to(device)


# -- training ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Method:
    """A training method: ``family`` "lpc" (``fit``) or "svi" (``fit_svi``), and its keywords."""

    label: str
    family: str
    options: dict = field(default_factory=dict)
    encoder: bool = True  # False: LPC without a guide (chains start from the prior)


class Clock:
    """Wall-clock seconds since creation, minus the seconds passed to :meth:`exclude`."""

    def __init__(self):
        self.start, self.excluded = time.perf_counter(), 0.0

    def elapsed(self) -> float:
        return time.perf_counter() - self.start - self.excluded

    def exclude(self, seconds: float) -> None:
        self.excluded += seconds


class TimedStream:
    """Shuffled mini-batches ``(x,)`` of ``images`` for ``seconds`` of wall-clock time, or until
    ``max_iterations`` batches have been served if that comes first.

    The clock starts at the first batch. When the trainer asks for a batch (that is, after
    its previous update) the stream snapshots ``module``'s parameters if the number of
    batches served reaches one of ``iterations`` or the clock passes one of ``fractions`` of
    the budget, and always at the end; snapshot time is excluded from the clock. Batches and
    binarisation (``binarize=True``: every pixel drawn as Bernoulli(grey level) afresh) come
    from a private generator, so every method sees the same stream; batches are then moved
    to ``device``. With ``indexed`` a batch is ``(x, index)``, the images' indices in ``images``
    (for persistent chains).
    """

    def __init__(self, images, module, *, seconds, seed=0, binarize=False, iterations=(), fractions=(1.0,),
                 device="cpu", indexed=False, max_iterations=None):
        if max_iterations is not None and max_iterations < 1:
            raise ValueError(f"max_iterations must be a positive number of batches, got {max_iterations}")
        self.images, self.module, self.seconds, self.device = images, module, float(seconds), device
        self.max_iterations = max_iterations
        self.indexed = indexed
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
            finished = elapsed >= self.seconds or self.served == self.max_iterations
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
            x = (torch.bernoulli(x, generator=gen) if self.binarize else x).to(self.device)
            yield (x, index) if self.indexed else (x,)


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


def log_likelihood(dlgm, state, images, *, num_samples, use_guide=True, method="iwae", per_image=False, **ais):
    """Mean per-image ``log p(x)`` estimate of the model (and guide) with parameters ``state`` (with
    ``per_image``, the list of the images' estimates)."""
    dlgm.load_state_dict(state)
    pyro.clear_param_store()
    torch.manual_seed(EVAL_SEED)
    with torch.set_grad_enabled(method == "ais"):  # AIS differentiates inside; IWAE needs no graph
        estimate = log_marginal_likelihood(dlgm.model, dlgm.guide if use_guide else None, images,
                                           num_samples=num_samples, method=method, batch_size=BATCH, **ais)
    return estimate.tolist() if per_image else estimate.mean().item()


def samples(dlgm, state, n: int) -> torch.Tensor:
    """``n`` decoded prior draws of the model with parameters ``state`` (seeded)."""
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


def run_mnist_method(method: Method, lr: float, data: dict, *, seconds: float, snapshot_iterations=(),
                     snapshot_fractions=(1.0,), eval_samples: int, seed: int, device="cpu", indexed=False,
                     max_iterations=None) -> dict:
    """Train ``method`` on ``data`` (from :func:`mnist_data`) for ``seconds`` (or ``max_iterations``
    iterations, whichever ends first); every snapshot gets its
    test log-likelihood (``test_ll``) and the seconds that evaluation took (``eval_seconds``). The
    trained model stays in the record as ``dlgm``."""
    dlgm = mnist_model(seed, device)
    stream = TimedStream(data["train"], dlgm, seconds=seconds, seed=seed, binarize=True,
                         iterations=snapshot_iterations, fractions=snapshot_fractions, device=device, indexed=indexed,
                         max_iterations=max_iterations)
    run = train(method, dlgm, stream, lr, seed)
    test = data["test"].to(device)
    for snap in run["snapshots"]:
        snap["test_ll"], snap["eval_seconds"] = timed(log_likelihood, dlgm, snap["state"], test,
                                                      num_samples=eval_samples, use_guide=method.encoder)
    run["dlgm"] = dlgm
    log(f"MNIST {method.label}, lr {lr:g}: {run['iterations']} iterations, final test log-lik "
        f"{run['snapshots'][-1]['test_ll']:.2f}" + (f" (stopped: non-finite at {run['diverged_at']})"
                                                   if run["diverged_at"] is not None else ""))
    return run


# -- profiles ---------------------------------------------------------------------------------
PHASES = {
    "chain_start": "guide draw and model prototype",
    "run_chains": "K Langevin steps (one model gradient each)",
    "theta_gradients": "θ gradient over the kept samples",
    "guide_gradients": "warm-start (guide) loss and gradient",
    "fused_gradients": "K = 0: θ and φ gradients in one pass",
    "_apply": "optimiser steps",
}


def phase_shares(profiler) -> dict:
    """Share of ``fit``'s time in each of :data:`PHASES` (cumulative times of the functions of
    ``pyro_lpc/fit.py`` with those names, over ``fit``'s own), from a ``cProfile.Profile`` that ran
    ``fit``; phases that took no time are left out, and an empty dict means no ``fit`` frame was
    recorded (seen on an H200 with CUDA graphs; cause not found)."""
    totals = dict.fromkeys(list(PHASES) + ["fit"], 0.0)
    for (filename, _, name), (_, _, _, cumulative, _) in pstats.Stats(profiler).stats.items():
        if filename.endswith(os.path.join("pyro_lpc", "fit.py")) and name in totals:
            totals[name] += cumulative
    if not totals["fit"]:
        return {}
    return {PHASES[name]: totals[name] / totals["fit"] for name in PHASES if totals[name]}


# -- figures ----------------------------------------------------------------------------------
def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_sample_grids(grids: dict, path, nrow: int) -> None:
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
