"""Which chain samples should the forward-KL warm-start term train on? (issue 13, item 10)

``fit`` trains the guide's forward term ``-mean_k log q(z_k | x)`` on the *kept*
samples, the same ones θ steps on: ``z_K`` alone with the default ``keep="last"``.
The alternative is every sample ``z_1..z_K`` (``keep="all"``). This compares the
two on probabilistic PCA (D = 8, Q = 2, N = 1000) with θ fixed at the data's true
parameters, so that the guide's objective is the only difference (the model has
no parameters: ``keep`` changes nothing but what the guide trains on, and the
cost of one model evaluation per kept sample for the logged log-joint). The
guide is a linear Gaussian encoder (full covariance-free: diagonal Normal); the
exact posterior ``p(z | x) = N(M⁻¹Wᵀ(x − μ), σ²M⁻¹)``, ``M = WᵀW + σ²I``, gives
``KL(p ‖ q)`` per data point in closed form. Reported per seed: KL(p‖q) averaged
over the data after each epoch, at equal iterations and at equal seconds.

    python benchmarks/forward_kl_samples.py                 # K = 10, 2 seeds, 30 epochs
    python benchmarks/forward_kl_samples.py --epochs 5 --seeds 0   # a quick look

Writes ``benchmarks/results/forward_kl_samples.json`` (``--out``).
"""
import argparse
import time

import pyro
import pyro.distributions as dist
import torch
import torch.nn as nn

from common import results_path, write_results
from pyro_lpc import WarmStart, fit

D, Q, N = 8, 2, 1000
SIGMA = 0.5


def truth(seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(D, Q, generator=gen)
    z = torch.randn(N, Q, generator=gen)
    x = z @ w.T + SIGMA * torch.randn(N, D, generator=gen) + 1.0
    return w, torch.ones(D), x


W, MU, X = truth()


def model(x):
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([Q]).to_event(1))
        pyro.sample("x", dist.Normal(z @ W.T + MU, SIGMA).to_event(1), obs=x)


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(D, 2 * Q)

    def forward(self, x):
        out = self.linear(x)
        return out[..., :Q], nn.functional.softplus(out[..., Q:]) + 1e-3


def exact_posterior(x):
    m = W.T @ W + SIGMA**2 * torch.eye(Q)
    cov = SIGMA**2 * torch.linalg.inv(m)
    loc = (x - MU) @ W @ torch.linalg.inv(m).T
    return dist.MultivariateNormal(loc, cov)


def kl_p_q(encoder, x):
    """Mean over data of KL(p(z|x) ‖ q(z|x)) for a Gaussian posterior and a diagonal Gaussian q."""
    with torch.no_grad():
        loc, scale = encoder(x)
        q = dist.MultivariateNormal(loc, scale_tril=torch.diag_embed(scale))
        return torch.distributions.kl_divergence(exact_posterior(x), q).mean().item()


class Batches:
    """Shuffled mini-batches of X; each epoch starts by evaluating KL(p‖q), timing itself so that
    the evaluation can be taken out of fit's clock."""

    def __init__(self, encoder, seed, batch_size=100):
        self.encoder, self.batch_size = encoder, batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.curve, self.eval_seconds, self.marks = [], 0.0, []

    def __len__(self):
        return N // self.batch_size

    def __iter__(self):
        start = time.perf_counter()
        self.curve.append(kl_p_q(self.encoder, X))
        self.eval_seconds += time.perf_counter() - start
        self.marks.append(self.eval_seconds)
        for idx in torch.randperm(N, generator=self.generator).split(self.batch_size):
            yield (X[idx],)


def run(keep, seed, epochs, num_steps, step_size, lr):
    """One fit run; returns iterations, training seconds and KL(p‖q) at the start of each epoch
    and at the end."""
    pyro.clear_param_store()
    torch.manual_seed(seed)
    encoder = Encoder()

    def guide(x):
        pyro.module("encoder", encoder)
        loc, scale = encoder(x)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    data = Batches(encoder, seed)
    result = fit(model, WarmStart(guide, "forward"), data, num_epochs=epochs, num_steps=num_steps,
                 step_size=step_size, keep=keep, seed=seed, progress=False,
                 guide_optim=pyro.optim.Adam({"lr": lr}))
    per_epoch = len(data)
    times = [row["time"] for row in result.history]
    # training time at the end of each epoch, less the evaluations that ran before it ended
    seconds = [0.0] + [times[(e + 1) * per_epoch - 1] - data.marks[e] for e in range(epochs)]
    curve = data.curve + [kl_p_q(encoder, X)]
    return [e * per_epoch for e in range(epochs + 1)], seconds, curve


def at_time(seconds, curve, t):
    """KL at the last epoch finished by time t."""
    return [c for s, c in zip(seconds, curve) if s <= t][-1]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--num-steps", type=int, default=10)
    parser.add_argument("--step-size", type=float, default=0.05)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--out", default=results_path("forward_kl_samples"))
    parser.add_argument("--note", help="free text stored with the results (shown on the page)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"PPCA D={D} Q={Q} N={N}, θ fixed at the truth; forward KL only; K={args.num_steps}, "
          f"η={args.step_size}, Adam lr {args.lr}, batch 100; KL(p‖q) per data point (nats)")
    run("last", 0, 1, args.num_steps, args.step_size, args.lr)  # warm-up: first-call costs
    seeds = {}
    for seed in args.seeds:
        runs = {keep: run(keep, seed, args.epochs, args.num_steps, args.step_size, args.lr)
                for keep in ("last", "all")}
        print(f"\nseed {seed}")
        print(f"{'epoch':>5} {'iters':>6} | {'last: KL':>9} {'s':>6} | {'all: KL':>9} {'s':>6}")
        for e in range(args.epochs + 1):
            (i, s_l, c_l), (_, s_a, c_a) = [(r[0][e], r[1][e], r[2][e]) for r in runs.values()]
            print(f"{e:>5} {i:>6} | {c_l:>9.4f} {s_l:>6.1f} | {c_a:>9.4f} {s_a:>6.1f}")
        t = min(runs["last"][1][-1], runs["all"][1][-1])
        equal = {keep: at_time(runs[keep][1], runs[keep][2], t) for keep in runs}
        print(f"at equal time {t:.1f} s: last {equal['last']:.4f}, all {equal['all']:.4f}")
        seeds[str(seed)] = {"runs": {keep: dict(zip(("iterations", "seconds", "kl"), r)) for keep, r in runs.items()},
                            "equal_time": {"seconds": t, **equal}}
    write_results(args.out, {"epochs": args.epochs, "num_steps": args.num_steps, "step_size": args.step_size,
                             "lr": args.lr, "seeds": seeds}, args.note)


if __name__ == "__main__":
    main()
