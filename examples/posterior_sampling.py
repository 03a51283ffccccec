"""Posterior sampling with PCLangevin inside pyro.infer.MCMC, diagnosed with ArviZ.

A Bayesian logistic regression on synthetic data: MALA with the diagonal
preconditioner adapted during warm-up, four chains, then ``arviz.summary``.
Run: ``python examples/posterior_sampling.py``.
"""
import arviz
import pyro
import pyro.distributions as dist
import torch
from pyro.infer import MCMC

from pyro_lpc import PCLangevin


def model(x, y=None):
    weight = pyro.sample("weight", dist.Normal(0.0, 1.0).expand([x.shape[1]]).to_event(1))
    bias = pyro.sample("bias", dist.Normal(0.0, 5.0))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Bernoulli(logits=x @ weight + bias), obs=y)


def main():
    pyro.set_rng_seed(0)
    x = torch.randn(500, 3)
    y = dist.Bernoulli(logits=x @ torch.tensor([1.5, -2.0, 0.5]) + 0.3).sample()
    kernel = PCLangevin(model, adjust=True, precondition="diagonal")
    mcmc = MCMC(kernel, num_samples=1000, warmup_steps=500, num_chains=4)
    mcmc.run(x, y)
    print(arviz.summary(arviz.from_pyro(mcmc, log_likelihood=False), round_to=3))
    print("true weights: [1.5, -2.0, 0.5], true bias: 0.3")


if __name__ == "__main__":
    main()
