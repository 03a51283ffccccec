r"""Does ``PCLangevin(model)`` with its defaults give the posterior NUTS gives?

Run from the repository root::

    python benchmarks/kernel_defaults.py          # about 2 minutes on 2 CPU cores
    python benchmarks/kernel_defaults.py --samples 200 --out /tmp/kernel_defaults.json   # runs, in seconds

Two models, one chain each, through ``pyro.infer.MCMC`` (seed 0):

a. a normal model with unknown mean ``mu ~ N(0, 10²)`` and scale
   ``sigma ~ HalfNormal(5)``, 50 data points drawn from N(3, 2²) (issue 13);
b. a 10-d Gaussian ``N(0, diag(σ²))``, σ evenly spaced over [0.1, 1] (exact
   answer: mean 0, sd σ; the table shows the first and last coordinate).

Samplers: NUTS (Pyro's defaults), ``PCLangevin(model)`` (the defaults: MALA,
"variance" preconditioner), and ``PCLangevin(model, adjust=False)`` (ULA at the
step size warm-up tuned for the same acceptance). Each row prints the posterior
mean and standard deviation of a site with their Monte Carlo standard errors
(``arviz.mcse``, from ArviZ's effective sample size), and the ratio of the
sampler's sd to the reference (NUTS for a, exact for b). Writes
``benchmarks/results/kernel_defaults.json`` (``--out``).
"""
import argparse

import arviz
import pyro
import pyro.distributions as dist
import torch
from pyro.infer import MCMC, NUTS

from common import results_path, write_results
from pyro_lpc import PCLangevin

WARMUP = {"NUTS": 1000, "MALA": 1000, "ULA": 1000}
SAMPLES = {"NUTS": 2000, "MALA": 10000, "ULA": 10000}  # --samples scales these (NUTS gets a fifth)
SCALES = torch.linspace(0.1, 1.0, 10)


def normal_model(y):
    mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
    sigma = pyro.sample("sigma", dist.HalfNormal(5.0))
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.Normal(mu, sigma), obs=y)


def gaussian_model():
    pyro.sample("z", dist.Normal(0.0, SCALES).to_event(1))


def kernels(model):
    return {
        "NUTS": NUTS(model),
        "MALA": PCLangevin(model),
        "ULA": PCLangevin(model, adjust=False),
    }


def summary(samples):
    """{site or site[i]: (mean, mcse mean, sd, mcse sd)} from one chain's draws."""
    rows = {}
    for name, values in samples.items():
        values = values.reshape(values.shape[0], -1).numpy()
        for i in range(values.shape[1]):
            if values.shape[1] > 1 and i not in (0, values.shape[1] - 1):
                continue
            label = name if values.shape[1] == 1 else f"{name}[{i}]"
            draws = values[None, :, i]
            rows[label] = (
                draws.mean(),
                float(arviz.mcse(draws, method="mean")),
                draws.std(ddof=1),
                float(arviz.mcse(draws, method="sd")),
            )
    return rows


def run(model, *args, samples=SAMPLES):
    out = {}
    for label, kernel in kernels(model).items():
        pyro.set_rng_seed(0)
        mcmc = MCMC(kernel, num_samples=samples[label], warmup_steps=WARMUP[label],
                    disable_progbar=True)
        mcmc.run(*args)
        out[label] = summary(mcmc.get_samples())
        if label != "NUTS":
            diag = mcmc.diagnostics()
            out[label]["_info"] = (diag["acceptance rate"]["chain 0"], diag["step size"]["chain 0"],
                                   len(diag["divergences"]["chain 0"]))
    return out


def report(title, out, reference):
    print(f"\n{title}")
    print(f"{'sampler':8} {'site':7} {'mean':>16} {'sd':>16} {'sd / ref':>9}")
    for label, rows in out.items():
        for site, row in rows.items():
            if site == "_info":
                continue
            mean, se_mean, sd, se_sd = row
            ratio = sd / reference[site]
            print(f"{label:8} {site:7} {mean:8.4f} ± {se_mean:.4f} {sd:8.4f} ± {se_sd:.4f} {ratio:9.2f}")
        if "_info" in rows:
            acc, step, div = rows["_info"]
            print(f"{'':8} acceptance {acc:.2f}, step size {step:.3g}, divergences {div}")


def record(out, reference) -> dict:
    """``run``'s output as JSON: per sampler, each site's mean and sd with their MCSEs, the reference
    sd, and (PCLangevin) acceptance, step size and divergences."""
    samplers = {}
    for label, rows in out.items():
        samplers[label] = {"sites": {site: dict(zip(("mean", "mcse_mean", "sd", "mcse_sd"), map(float, row)))
                                     for site, row in rows.items() if site != "_info"}}
        if "_info" in rows:
            samplers[label].update(zip(("acceptance", "step_size", "divergences"), map(float, rows["_info"])))
    return {"reference_sd": {k: float(v) for k, v in reference.items()}, "samplers": samplers}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=SAMPLES["MALA"],
                        help="post-warm-up draws of MALA and ULA (NUTS: a fifth)")
    parser.add_argument("--out", default=results_path("kernel_defaults"))
    parser.add_argument("--note", help="free text stored with the results (shown on the page)")
    args = parser.parse_args()
    samples = {"NUTS": max(args.samples // 5, 1), "MALA": args.samples, "ULA": args.samples}
    torch.set_num_threads(1)
    pyro.set_rng_seed(0)
    y = 3.0 + 2.0 * torch.randn(50)
    normal = run(normal_model, y, samples=samples)
    reference = {site: row[2] for site, row in normal["NUTS"].items()}
    report("a. normal model, 50 points (reference: NUTS's sd)", normal, reference)
    gaussian = run(gaussian_model, samples=samples)
    exact = {"z[0]": SCALES[0].item(), "z[9]": SCALES[-1].item()}
    report("b. 10-d Gaussian, sd 0.1..1 (reference: exact sd 0.1 and 1)", gaussian, exact)
    write_results(args.out, {"warmup": WARMUP, "samples": samples, "normal": record(normal, reference),
                             "gaussian": record(gaussian, exact)}, args.note)


if __name__ == "__main__":
    main()
