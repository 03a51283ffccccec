"""What LPC's chains do on CIFAR-10: why ``fit``'s defaults give broken prior samples there.

    python benchmarks/cifar10_chains.py                          # the page's record (about 10 minutes)
    python benchmarks/cifar10_chains.py --smoke --out /tmp/c.json   # runs in seconds (figures meaningless)

The model, likelihood and learning rates of ``benchmarks/cifar10.py`` (conv model, 64 latent
dimensions, discretised Gaussian σ = 0.1, batch 100), trained for a fixed number of iterations by
each setting on the same mini-batch stream (the first ``--train-images`` training images). Every
``--every`` iterations, on a fixed probe batch (the first 100 training images), it records

* the chains' energy drop ``U(z_0) − U(z_K)`` and its second half ``U(z_{K/2}) − U(z_K)``, nats
  per data point (at equilibrium the late drop is near zero and the drop at most O(d) = O(64);
  much more: the chains are still descending, they optimise rather than sample);
* the noise per step ``sqrt(2ηP)`` (root mean square over coordinates) against the guide's
  σ (mean over images and coordinates), and the chains' spread over their second half;
* the aggregate posterior's second moment ``mean z_K²`` (for the VAE: of the guide,
  ``mean μ² + σ²``). With exact posterior samples of a model that fits the data,
  ``E_x E[z² | x] = E_{p(z)} z² = 1``; far from 1, prior samples land where the decoder was not trained;
* the fraction of saturated pixels (``|x̂| > 0.98``, x̂ the decoder's mean) of 100 prior samples.
"""
from __future__ import annotations

import argparse
import time

import pyro
import torch

from cifar10 import LPC_SETTINGS, learning_rates, new_model
from common import default_data_root, log, results_path, stack, write_results
from mnist import VAE
from pyro_lpc import LPC
from pyro_lpc.images.data import load_dataset

#: The settings of ``cifar10.py`` by name: family "lpc" runs ``pyro_lpc.LPC`` (``fit``'s iteration) with
#: the method's keywords, "svi" Pyro's ``SVI(Trace_ELBO)``.
SETTINGS = {"LPC, fit's defaults": LPC_SETTINGS["defaults"], "LPC K=5, η adapted": LPC_SETTINGS["k5-adapted"],
            "VAE": VAE}
PROBE_IMAGES = 100
SATURATED = 0.98


def saturated_fraction(dlgm, generator: torch.Generator) -> float:
    """The fraction of pixels with ``|x̂| > SATURATED`` in the decoder means of 100 prior samples."""
    z = torch.randn(PROBE_IMAGES, dlgm.latent_dim, generator=generator)
    return (dlgm.decoder(z).abs() > SATURATED).float().mean().item()


@torch.no_grad()
def lpc_figures(lpc: LPC, dlgm, probe: torch.Tensor, generator: torch.Generator) -> dict:
    """The chains' figures on ``probe`` (chains run afresh from the guide; nothing of ``lpc`` changes)."""
    _, info = lpc.sample_chains(probe, keep="all")
    samples = torch.stack([k["z"] for k in info.kept])  # (K, B, d)
    _, scale = dlgm.encoder(probe)
    precond = lpc.sampler_state.local_precond
    noise = (2 * lpc.step_size * precond.scale["z"]).sqrt()
    return {"energy_drop": info.energy_drop.item(), "late_energy_drop": info.late_drop.item(),
            "step_size": lpc.step_size, "noise_rms": noise.square().mean().sqrt().item(),
            "guide_sigma": scale.mean().item(),
            "late_spread": samples[len(samples) // 2:].std(0).mean().item() if len(samples) > 2 else None,
            "second_moment": samples[-1].square().mean().item(),
            "saturated": saturated_fraction(dlgm, generator)}


@torch.no_grad()
def vae_figures(dlgm, probe: torch.Tensor, generator: torch.Generator) -> dict:
    loc, scale = dlgm.encoder(probe)
    return {"guide_sigma": scale.mean().item(), "second_moment": (loc.square() + scale.square()).mean().item(),
            "saturated": saturated_fraction(dlgm, generator)}


def diagnose(name: str, images: torch.Tensor, *, iterations: int, every: int, batch_size: int, lr: float,
             seed: int) -> dict:
    """Train setting ``name`` for ``iterations`` mini-batches of ``images``; its figures every ``every``."""
    family, options = SETTINGS[name].family, SETTINGS[name].options
    dlgm = new_model(seed)
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    optim = pyro.optim.Adam({"lr": lr})
    if family == "lpc":
        learner = LPC(dlgm.model, dlgm.guide, optim, guide_optim=pyro.optim.Adam({"lr": lr}), **options)
    else:
        learner = pyro.infer.SVI(dlgm.model, dlgm.guide, optim, pyro.infer.Trace_ELBO())
    batches = torch.Generator().manual_seed(seed)
    figures_rng = torch.Generator().manual_seed(seed + 1)
    probe, rows, begin = images[:PROBE_IMAGES], [], time.perf_counter()
    for it in range(iterations):
        batch = images[torch.randint(len(images), (batch_size,), generator=batches)]
        if family == "lpc":
            log_joint = learner.step(batch)["log_joint"]
        else:
            log_joint = -learner.step(batch) / batch_size  # the ELBO per data point
        if it % every == 0 or it == iterations - 1:
            figures = (lpc_figures(learner, dlgm, probe, figures_rng) if family == "lpc"
                       else vae_figures(dlgm, probe, figures_rng))
            rows.append({"iteration": it + 1, "seconds": time.perf_counter() - begin, "objective": log_joint,
                         **figures})
            log(f"{name} {it + 1}: " + ", ".join(f"{k} {v:.4g}" for k, v in rows[-1].items()
                                                  if isinstance(v, float)))
    return {"label": name, "family": family, "options": options, "lr": lr, "rows": rows}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--every", type=int, default=20)
    parser.add_argument("--train-images", type=int, default=20000)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes that run in seconds (figures meaningless)")
    parser.add_argument("--data-root", default=default_data_root())
    parser.add_argument("--out", default=results_path("cifar10_chains"))
    parser.add_argument("--note", help="free text stored with the results (shown on the page)")
    args = parser.parse_args()
    for flag in ("iterations", "every", "train_images", "batch_size", "threads"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if args.smoke:
        args.iterations, args.every, args.train_images, args.batch_size = 3, 2, 200, 10
    torch.set_num_threads(args.threads)
    images = stack(load_dataset("cifar10", args.data_root, "train"), range(args.train_images))
    lrs = learning_rates()
    runs = [diagnose(name, images, iterations=args.iterations, every=args.every, batch_size=args.batch_size,
                     lr=lrs[SETTINGS[name].family], seed=args.seed) for name in args.settings]
    write_results(args.out, {"iterations": args.iterations, "every": args.every, "train_images": args.train_images,
                             "batch_size": args.batch_size, "threads": args.threads, "seed": args.seed,
                             "probe_images": PROBE_IMAGES, "runs": runs}, args.note)


if __name__ == "__main__":
    main()
