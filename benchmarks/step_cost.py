"""One Langevin step of ``fit`` against one decoder forward+backward with respect to its input.

The MNIST reference model (784-200-200-50 tanh MLP decoder, Bernoulli likelihood,
batch 100). Timed, in one process, median over repetitions after a warm-up:

* ``decoder``: the decoder's forward pass and the gradient of its summed output
  with respect to its input z (plain PyTorch) — the floor for any sampler;
* ``energy``: the same plus the likelihood and prior, ``∇z -log p(x, z)`` in plain
  PyTorch (what a hand-written LPC loop computes per step);
* ``fit's step``: ``langevin.step`` on ``ModelEnergy``'s per-data-point energy,
  exactly what ``fit`` runs per step (Pyro trace of the model, constrain/unconstrain,
  the preconditioned proposal, the MALA acceptance diagnostic);
* ``fit's step, jit``: the same with ``fit(jit_compile=True)``'s recorded energy
  (:mod:`pyro_lpc.compiled`).

The goal (issue 8): fit's step ≤ 1.3 × the decoder forward+backward.

    python benchmarks/step_cost.py [--threads 1 2] [--repeats 300]
"""
import argparse
import statistics
import time

import pyro
import pyro.poutine as poutine
import torch

from pyro_lpc import langevin
from pyro_lpc.compiled import CompiledEnergies
from pyro_lpc.models import mlp_model
from pyro_lpc.potential import ModelEnergy, latent_sites, subsample_trace

BATCH, LATENT = 100, 50


def median_ms(fn, repeats: int) -> float:
    for _ in range(max(20, repeats // 10)):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def setup():
    """The model, a batch, and ``fit``'s energy and chain state at guide draws."""
    pyro.clear_param_store()
    torch.manual_seed(0)
    dlgm = mlp_model(image_shape=(1, 28, 28), latent_dim=LATENT, likelihood="bernoulli")
    x = (torch.rand(BATCH, 1, 28, 28) < 0.13).float()
    guide_trace = poutine.trace(dlgm.guide).get_trace(x)
    replay = subsample_trace(guide_trace)
    for name in latent_sites(guide_trace):
        replay.add_node(name, type="sample", is_observed=False, value=guide_trace.nodes[name]["value"].detach(),
                        infer={})
    prototype = poutine.trace(poutine.replay(dlgm.model, trace=replay)).get_trace(x)
    energy = ModelEnergy(dlgm.model, (x,), {}, prototype)
    position = energy.unconstrain({n: prototype.nodes[n]["value"].detach() for n in energy.local})
    return dlgm, x, energy, position


def measure(repeats: int) -> dict:
    dlgm, x, energy, position = setup()
    z0 = position["z"]
    flat_x = x.reshape(BATCH, -1)

    def decoder():
        z = z0.detach().requires_grad_(True)
        torch.autograd.grad(dlgm.decoder(z).sum(), [z])

    def plain_energy():
        z = z0.detach().requires_grad_(True)
        logits = dlgm.decoder(z).reshape(BATCH, -1)
        log_lik = -torch.nn.functional.binary_cross_entropy_with_logits(logits, flat_x, reduction="none").sum(-1)
        torch.autograd.grad(-(log_lik - 0.5 * z.square().sum(-1)).sum(), [z])

    vag = langevin.value_and_grad(energy.local_energy({}))
    state = langevin.init(position, vag, precond=langevin.init_preconditioner("diagonal", position, 1), batch_ndim=1)

    def fit_step():
        langevin.step(state, vag, 1e-2, batch_ndim=1)

    jit_vag = langevin.value_and_grad(CompiledEnergies()(energy, {}))

    def jit_step():
        langevin.step(state, jit_vag, 1e-2, batch_ndim=1)

    return {"decoder": median_ms(decoder, repeats), "energy": median_ms(plain_energy, repeats),
            "fit_step": median_ms(fit_step, repeats), "jit_step": median_ms(jit_step, repeats)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=300)
    options = parser.parse_args()
    print(f"torch {torch.__version__}; MNIST MLP decoder, batch {BATCH}; median ms over {options.repeats}\n")
    print("| threads | decoder fwd+bwd (z) | plain-torch ∇z energy | fit's Langevin step | step / decoder | "
          "step / plain energy | step, jit_compile | jit step / decoder | jit step / plain energy |")
    print("|---|---|---|---|---|---|---|---|---|")
    for threads in options.threads:
        torch.set_num_threads(threads)
        t = measure(options.repeats)
        print(f"| {threads} | {t['decoder']:.3f} | {t['energy']:.3f} | {t['fit_step']:.3f} | "
              f"{t['fit_step'] / t['decoder']:.2f}x | {t['fit_step'] / t['energy']:.2f}x | {t['jit_step']:.3f} | "
              f"{t['jit_step'] / t['decoder']:.2f}x | {t['jit_step'] / t['energy']:.2f}x |", flush=True)
    print("\ngoal: fit's step <= 1.3x the decoder forward+backward")


if __name__ == "__main__":
    main()
