r"""Baselines for filling in missing pixels with a trained deep latent Gaussian model.

Each function draws $z$ for a batch of partly observed images `x` (`mask` True = observed) and
returns them shaped `(S, B, latent_dim)`, so that
[`DeepLatentGaussian.impute`][pyro_lpc.images.models.DeepLatentGaussian.impute] scores them
exactly like the draws of [`infer_posterior`][pyro_lpc.infer_posterior]'s chains on
$p(z \mid x_{\mathrm{obs}})$:

- [`encoder_draws`][pyro_lpc.images.imputation.encoder_draws]: the encoder alone,
  $z \sim q_\phi(z \mid x_{\mathrm{obs}}, \text{fill})$;
- [`pseudo_gibbs`][pyro_lpc.images.imputation.pseudo_gibbs]: Rezende et al. (2014);
- [`metropolis_within_gibbs`][pyro_lpc.images.imputation.metropolis_within_gibbs]: Mattei &
  Frellsen (2018), exact for $p(z \mid x_{\mathrm{obs}})$.

Example:
    ```python
    >>> import pyro, torch
    >>> from pyro_lpc.images.imputation import metropolis_within_gibbs
    >>> from pyro_lpc.images.models import mlp_model
    >>> vae = mlp_model(image_shape=(1, 8, 8), latent_dim=4)
    >>> x = torch.rand(3, 1, 8, 8).round()
    >>> mask = torch.arange(8).repeat(3, 1, 8, 1) < 4                    # the left half observed
    >>> pyro.set_rng_seed(0)
    >>> draws = metropolis_within_gibbs(vae, x, mask, num_samples=50, warmup_steps=20)
    >>> imputed, log_p = vae.impute(x, mask, draws.z)
    >>> draws.z.shape, imputed.shape, log_p.shape
    (torch.Size([50, 3, 4]), torch.Size([3, 1, 8, 8]), torch.Size([3]))

    ```
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from .models import DeepLatentGaussian


class ImputationDraws(NamedTuple):
    """Draws of $z$ for partly observed images, and how often the sampler moved.

    Attributes:
        z: `(S, B, latent_dim)` draws, one per kept step.
        accept_rate: the mean acceptance probability of the kept steps (1 for samplers
            without an accept test).
    """

    z: torch.Tensor
    accept_rate: float


def _filled(dlgm: DeepLatentGaussian, x: torch.Tensor, mask: torch.Tensor, num_samples: int,
            warmup_steps: int) -> torch.Tensor:
    """`x` with its missing pixels set to `dlgm.fill`, after checking every argument."""
    if not isinstance(dlgm, DeepLatentGaussian):
        raise TypeError(f"dlgm must be a DeepLatentGaussian, got {type(dlgm).__name__}")
    if int(num_samples) < 1 or int(warmup_steps) < 0:
        raise ValueError(f"num_samples must be positive and warmup_steps non-negative, got {num_samples!r} and "
                         f"{warmup_steps!r}")
    if x.dim() < 2:
        raise ValueError(f"{dlgm.name}: x must be a batch (B, ...) of images, got shape {tuple(x.shape)}")
    dlgm._check(x)
    if mask is None:
        raise ValueError(f"{dlgm.name}: mask is required (a boolean tensor shaped like x, True = observed)")
    return dlgm._observed(x, mask)


def _complete(dlgm: DeepLatentGaussian, x: torch.Tensor, mask: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    r"""`x` with its missing pixels drawn from $p_\theta(x_{\mathrm{mis}} \mid z)$, `output` = decoder(z)."""
    return torch.where(mask, x, dlgm.likelihood.distribution(output).sample())


@torch.no_grad()
def encoder_draws(dlgm: DeepLatentGaussian, x: torch.Tensor, mask: torch.Tensor,
                  num_samples: int = 100) -> ImputationDraws:
    r"""The encoder alone: $z_s \sim q_\phi(z \mid \tilde x)$, $\tilde x$ = `x` with its missing
    pixels set to `dlgm.fill` (what `dlgm.guide(x, mask=mask)` draws).

    Args:
        dlgm: the trained model.
        x: images `(B, *image_shape)`; missing pixels may hold anything, NaN included.
        mask: boolean, shaped like `x`, True = observed.
        num_samples: draws per image, $S$.

    Returns:
        [`ImputationDraws`][pyro_lpc.images.imputation.ImputationDraws], `z` shaped `(S, B, latent_dim)`.
    """
    filled = _filled(dlgm, x, mask, num_samples, 0)
    loc, scale = dlgm.encoder(filled)
    return ImputationDraws(torch.distributions.Normal(loc, scale).sample((int(num_samples),)), 1.0)


@torch.no_grad()
def pseudo_gibbs(dlgm: DeepLatentGaussian, x: torch.Tensor, mask: torch.Tensor, num_samples: int = 100,
                 warmup_steps: int = 100) -> ImputationDraws:
    r"""Pseudo-Gibbs sampling (Rezende, Mohamed & Wierstra 2014, §5): from $\tilde x$ = `x` filled
    with `dlgm.fill`, alternate

    $$
    z \sim q_\phi(z \mid x_{\mathrm{obs}}, x_{\mathrm{mis}}), \qquad
    x_{\mathrm{mis}} \sim p_\theta(x_{\mathrm{mis}} \mid z).
    $$

    The encoder stands in for the exact conditional $p_\theta(z \mid x)$, so the chain's
    stationary law is not $p_\theta(z, x_{\mathrm{mis}} \mid x_{\mathrm{obs}})$ unless $q_\phi$ is
    exact (Mattei & Frellsen 2018); it is the cheap baseline. One encoder and one decoder pass per
    step.

    Args:
        dlgm: the trained model.
        x: images `(B, *image_shape)`; missing pixels may hold anything, NaN included.
        mask: boolean, shaped like `x`, True = observed.
        num_samples: steps kept, one draw each ($S$).
        warmup_steps: steps discarded first.

    Returns:
        [`ImputationDraws`][pyro_lpc.images.imputation.ImputationDraws]: `z` shaped
        `(S, B, latent_dim)`, `accept_rate` 1.
    """
    current = _filled(dlgm, x, mask, num_samples, warmup_steps)
    draws = []
    for step in range(int(warmup_steps) + int(num_samples)):
        loc, scale = dlgm.encoder(current)
        z = loc + scale * torch.randn_like(loc)
        current = _complete(dlgm, current, mask, dlgm.decoder(z))
        if step >= warmup_steps:
            draws.append(z)
    return ImputationDraws(torch.stack(draws), 1.0)


def _log_weight(dlgm, x, z, output, loc, scale) -> torch.Tensor:
    r"""$\log p_\theta(x \mid z) + \log p(z) - \log q_\phi(z \mid x)$ per image, up to a constant."""
    log_q = torch.distributions.Normal(loc, scale).log_prob(z).sum(-1)
    return dlgm.likelihood.distribution(output).log_prob(x) - 0.5 * z.pow(2).sum(-1) - log_q


@torch.no_grad()
def metropolis_within_gibbs(dlgm: DeepLatentGaussian, x: torch.Tensor, mask: torch.Tensor, num_samples: int = 100,
                            warmup_steps: int = 100) -> ImputationDraws:
    r"""Metropolis-within-Gibbs (Mattei & Frellsen 2018): a Markov chain on
    $(z, x_{\mathrm{mis}})$ whose stationary law is $p_\theta(z, x_{\mathrm{mis}} \mid x_{\mathrm{obs}})$,
    so its $z$ follow $p_\theta(z \mid x_{\mathrm{obs}})$ exactly. Starting from
    $z_0 \sim q_\phi(z \mid \tilde x)$ ($\tilde x$ = `x` filled with `dlgm.fill`), each step

    1. draws $x_{\mathrm{mis}} \sim p_\theta(x_{\mathrm{mis}} \mid z)$ (an exact Gibbs step), and with
       $x = (x_{\mathrm{obs}}, x_{\mathrm{mis}})$
    2. proposes $z' \sim q_\phi(z' \mid x)$, independently of $z$, and accepts it with probability

    $$
    \min\left(1, \frac{p_\theta(x \mid z')\, p(z')\, q_\phi(z \mid x)}
                      {p_\theta(x \mid z)\, p(z)\, q_\phi(z' \mid x)}\right)
    $$

    (an independence Metropolis–Hastings step targeting $p_\theta(z \mid x)$). One encoder and one
    decoder pass per step.

    Args:
        dlgm: the trained model.
        x: images `(B, *image_shape)`; missing pixels may hold anything, NaN included.
        mask: boolean, shaped like `x`, True = observed.
        num_samples: steps kept, one draw each ($S$).
        warmup_steps: steps discarded first.

    Returns:
        [`ImputationDraws`][pyro_lpc.images.imputation.ImputationDraws]: `z` shaped
        `(S, B, latent_dim)` and the kept steps' mean acceptance probability.
    """
    current = _filled(dlgm, x, mask, num_samples, warmup_steps)
    loc, scale = dlgm.encoder(current)
    z = loc + scale * torch.randn_like(loc)
    output = dlgm.decoder(z)
    draws, accept = [], []
    for step in range(int(warmup_steps) + int(num_samples)):
        current = _complete(dlgm, current, mask, output)
        loc, scale = dlgm.encoder(current)
        proposal = loc + scale * torch.randn_like(loc)
        proposal_output = dlgm.decoder(proposal)
        log_ratio = (_log_weight(dlgm, current, proposal, proposal_output, loc, scale)
                     - _log_weight(dlgm, current, z, output, loc, scale))
        accepted = torch.rand_like(log_ratio).log() < log_ratio
        z = torch.where(accepted[:, None], proposal, z)
        output = torch.where(accepted.reshape((-1,) + (1,) * (output.dim() - 1)), proposal_output, output)
        if step >= warmup_steps:
            draws.append(z)
            accept.append(log_ratio.clamp(max=0.0).exp().mean())
    return ImputationDraws(torch.stack(draws), torch.stack(accept).mean().item())
