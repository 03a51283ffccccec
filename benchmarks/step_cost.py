"""One Langevin step of ``fit`` against one decoder forward+backward with respect to its input.

The MNIST reference model (784-200-200-50 tanh MLP decoder, Bernoulli likelihood,
batch 100). Timed, in one process, median over repetitions after a warm-up:

* ``decoder``: the decoder's forward pass and the gradient of its summed output
  with respect to its input z (plain PyTorch) — the floor for any sampler;
* ``energy``: the same plus the likelihood and prior, ``∇z -log p(x, z)`` in plain
  PyTorch (what a hand-written LPC loop computes per step; the model's own
  likelihood as a torch distribution, argument checks off as in ``fit``'s chains);
* ``fit's step``: ``langevin.step`` on ``SplitEnergy``'s per-data-point energy,
  exactly what ``fit`` runs per step (Pyro trace of the model, constrain/unconstrain,
  the preconditioned proposal, the MALA acceptance diagnostic);
* ``fit's step, recorded``: the same with ``fit(jit_compile=True)``'s recorded
  energy and gradient (:mod:`pyro_lpc.compiled`: one ``make_fx`` graph per batch shape);
* ``fit's step, compiled``: ``fit(jit_compile=True, jit_options={})``, that recording compiled by
  ``torch.compile`` (Inductor; ``--compile-options`` to pass others, e.g.
  ``'{"mode": "reduce-overhead"}'`` for CUDA graphs on a GPU). Compile time is
  reported separately.

The goal (issue 8): fit's step ≤ 1.3 × the decoder forward+backward.

    python benchmarks/step_cost.py [--threads 1 2] [--repeats 300] [--device cpu] [--compile-options '{}']
    python benchmarks/step_cost.py --threads 1 --repeats 20 --out /tmp/step_cost.json   # a quick look

On a GPU (``--device cuda``) every timed call ends with ``torch.cuda.synchronize()``.
Writes ``benchmarks/results/step_cost.json`` (``--out``).
"""
import argparse
import functools
import json
import statistics
import time

import pyro
import pyro.poutine as poutine
import torch

from common import results_path, write_results
from pyro_lpc import langevin
from pyro_lpc.compiled import CompiledEnergies
from pyro_lpc.images.models import mlp_model
from pyro_lpc.potential import SplitEnergy, latent_sites, subsample_trace

BATCH, LATENT = 100, 50


def median_ms(fn, repeats: int, device: torch.device = torch.device("cpu")) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(max(20, repeats // 10)):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def setup(device: torch.device = torch.device("cpu")):
    """The model, a batch, and ``fit``'s energy and chain state at guide draws."""
    pyro.clear_param_store()
    torch.manual_seed(0)
    dlgm = mlp_model(image_shape=(1, 28, 28), latent_dim=LATENT, likelihood="bernoulli").to(device)
    x = (torch.rand(BATCH, 1, 28, 28, device=device) < 0.13).float()
    guide_trace = poutine.trace(dlgm.guide).get_trace(x)
    replay = subsample_trace(guide_trace)
    for name in latent_sites(guide_trace):
        replay.add_node(name, type="sample", is_observed=False, value=guide_trace.nodes[name]["value"].detach(),
                        infer={})
    prototype = poutine.trace(poutine.replay(dlgm.model, trace=replay)).get_trace(x)
    energy = SplitEnergy(dlgm.model, (x,), {}, prototype)
    position = energy.unconstrain({n: prototype.nodes[n]["value"].detach() for n in energy.local})
    return dlgm, x, energy, position


def measure(repeats: int, device: torch.device, compile_options: dict) -> "tuple[dict, float]":
    dlgm, x, energy, position = setup(device)
    z0 = position["z"]

    def decoder():
        z = z0.detach().requires_grad_(True)
        torch.autograd.grad(dlgm.decoder(z).sum(), [z])

    def plain_energy():
        z = z0.detach().requires_grad_(True)
        log_lik = dlgm.likelihood.distribution(dlgm.decoder(z)).log_prob(x)
        torch.autograd.grad(-(log_lik - 0.5 * z.square().sum(-1)).sum(), [z])

    vag = langevin.value_and_grad(energy.local_energy({}))
    state = langevin.init(position, vag, precond=langevin.init_preconditioner("diagonal", position, 1), batch_ndim=1)
    def recorded(options):  # the local chains' value-and-gradient as fit(jit_compile=True) runs it
        evaluate = CompiledEnergies(options).evaluation(energy, {}, move_globals=False)
        return lambda p: evaluate(p, {})[0]

    steps = {"fit's step": vag, "fit's step, recorded": recorded(None),
             "fit's step, compiled": recorded(compile_options)}
    start = time.perf_counter()
    steps["fit's step, compiled"](position)  # records and compiles
    compile_seconds = time.perf_counter() - start

    timed = {"decoder fwd+bwd (z)": decoder, "plain-torch ∇z energy": pyro.validation_enabled(False)(plain_energy)}
    for name, potential_and_grad in steps.items():
        timed[name] = functools.partial(langevin.step, state, potential_and_grad, 1e-2, batch_ndim=1)
    return {name: median_ms(fn, repeats, device) for name, fn in timed.items()}, compile_seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=300)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--compile-options", default="{}", help="torch.compile keyword arguments, as JSON")
    parser.add_argument("--out", default=results_path("step_cost"))
    parser.add_argument("--note", help="free text stored with the results (shown on the page)")
    options = parser.parse_args()
    device = torch.device(options.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"torch {torch.__version__} on {where}; MNIST MLP decoder, batch {BATCH}; "
          f"median ms over {options.repeats}\n")
    print("| threads | what | ms | / decoder | / plain energy |\n|---|---|---|---|---|")
    rows, compile_seconds = [], {}
    for threads in options.threads:
        torch.set_num_threads(threads)
        t, compile_seconds[str(threads)] = measure(options.repeats, device, json.loads(options.compile_options))
        decoder, energy = t["decoder fwd+bwd (z)"], t["plain-torch ∇z energy"]
        for name, ms in t.items():
            rows.append({"threads": threads, "what": name, "ms": ms})
            print(f"| {threads} | {name} | {ms:.3f} | {ms / decoder:.2f}x | {ms / energy:.2f}x |", flush=True)
        print(f"| {threads} | compile time (s) | {compile_seconds[str(threads)]:.1f} | | |")
    print("\ngoal: fit's step <= 1.3x the decoder forward+backward")
    write_results(options.out, {"device": where, "repeats": options.repeats,
                                "compile_options": json.loads(options.compile_options), "rows": rows,
                                "compile_seconds": compile_seconds}, options.note)


if __name__ == "__main__":
    main()
