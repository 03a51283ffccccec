"""A small ``fit`` job for tests/test_distributed.py, run alone or under ``torchrun``.

    python tests/distributed_job.py OUT [--batch-size B] [--epochs E] [--resume] [--fail-at I]
    torchrun --standalone --nproc-per-node 2 tests/distributed_job.py OUT --batch-size B/2

The model has a global latent ``mu``, a local 2-d latent per data point in a
plate scaled by N/B, a decoder and an encoder. All randomness that differs
between ranks is fixed per data point, so one process on a global batch and
several ranks on its shards see *the same chain noise*:

* the guide draws ``z = loc + scale * eps`` with ``eps`` stored beside each
  data point (the last two columns of the data);
* the local Langevin noise of step ``c`` is one standard normal table over the
  global batch, drawn from a generator seeded by ``c``, of which each rank takes
  its own rows (contiguous shards, as ``fit`` deals a tensor).

With ``--own-noise`` the Langevin noise comes from fit's own per-rank random
streams (what resuming must continue bit for bit). Each rank writes ``OUT/rank{r}.pt`` with its parameters, global chain and history.
"""
import argparse
import os

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from torch.distributed.elastic.multiprocessing.errors import record

import pyro_lpc
from pyro_lpc import langevin
from pyro_lpc.distributed import finish

N, D, LATENT = 32, 3, 2


class FixedNoiseNormal(dist.Normal):
    """``Normal(loc, scale)`` whose draw is ``loc + scale * eps`` for a given ``eps``."""

    def __init__(self, loc, scale, eps):
        super().__init__(loc, scale)
        self.eps = eps

    def expand(self, batch_shape, _instance=None):
        shape = torch.Size(batch_shape)
        return FixedNoiseNormal(self.loc.expand(shape), self.scale.expand(shape), self.eps.expand(shape))

    def rsample(self, sample_shape=torch.Size()):
        return self.loc + self.scale * self.eps


def make_data():
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(N, LATENT, generator=gen)
    x = z @ torch.tensor([[1.0, -0.5, 0.3], [0.2, 0.8, -1.0]]) + 1.5 + 0.3 * torch.randn(N, D, generator=gen)
    eps = torch.randn(N, LATENT, generator=gen)
    return torch.cat([x, eps], dim=1)


@record
def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--own-noise", action="store_true",
                        help="Langevin noise from fit's own per-rank streams instead of the shared table")
    parser.add_argument("--fail-at", type=int, default=None, help="rank 1 raises at this iteration")
    options = parser.parse_args()
    torch.set_num_threads(1)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))

    torch.manual_seed(rank)  # different initial weights per rank: fit must broadcast rank 0's
    decoder, encoder = nn.Linear(LATENT, D), nn.Linear(D, 2 * LATENT)
    calls = {"guide": 0, "noise": 0}

    def model(batch):
        x = batch[:, :D]
        pyro.module("decoder", decoder)
        mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
        with pyro.plate("data", N, subsample=torch.arange(len(batch))):
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([LATENT]).to_event(1))
            pyro.sample("x", dist.Normal(decoder(z) + mu, 0.3).to_event(1), obs=x)

    def guide(batch):
        pyro.module("encoder", encoder)
        calls["guide"] += 1  # once per iteration (and once to register the parameters)
        if rank == 1 and options.fail_at is not None and calls["guide"] > options.fail_at + 1:
            raise ValueError(f"rank 1 failed on purpose at iteration {options.fail_at}")
        loc, log_scale = encoder(batch[:, :D]).chunk(2, dim=-1)
        with pyro.plate("data", N, subsample=torch.arange(len(batch))):
            pyro.sample("z", FixedNoiseNormal(loc, log_scale.exp(), batch[:, D:]).to_event(1))

    draw = langevin.standard_normal

    def shared_local_noise(like, generator=None):
        if generator is not None:  # the global chain: fit's own generator, alike on every rank
            return draw(like, generator)
        calls["noise"] += 1
        table = torch.Generator().manual_seed(1000 + calls["noise"])
        out = {}
        for name, z in like.items():
            full = torch.randn((z.shape[0] * world,) + z.shape[1:], generator=table)
            out[name] = full[rank * z.shape[0]:(rank + 1) * z.shape[0]]
        return out

    if not options.own_noise:
        langevin.standard_normal = shared_local_noise
    result = pyro_lpc.fit(
        model, guide, make_data(), batch_size=options.batch_size, num_epochs=options.epochs,
        num_steps=5, step_size=0.02, seed=1, progress=False, checkpoint_dir=options.out,
        resume=options.resume,
    )
    params = {k: v.detach().clone() for k, v in pyro.get_param_store().items()}
    os.makedirs(options.out, exist_ok=True)
    torch.save({"params": params, "history": result.history, "sampler": result.sampler_state},
               os.path.join(options.out, f"rank{rank}.pt"))
    finish()


if __name__ == "__main__":
    main()
