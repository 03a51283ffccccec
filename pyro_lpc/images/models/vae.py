r"""Deep latent Gaussian models: the reference Pyro model/guide pairs for images.

$$
z_i \sim \mathcal N(0, I_d), \qquad x_i \mid z_i \sim p_\theta(x_i \mid f_\theta(z_i)),
\qquad q_\phi(z_i \mid x_i) = \mathcal N(\mu_\phi(x_i), \operatorname{diag}\sigma_\phi(x_i)^2),
$$

with `f_θ` the decoder, `p_θ(x | ·)` the likelihood (`likelihoods`), and
`(μ_φ, σ_φ)` the encoder. θ = the decoder's weights plus any learned likelihood
parameter (created in `model` with `pyro.param`); φ = the encoder's weights.
"""
from __future__ import annotations

import math

from typing import Optional, Sequence, Tuple, Type, Union

import pyro
import pyro.distributions as dist
import torch
import torch.nn as nn

from .conv import ConvDecoder, ConvEncoder
from .likelihoods import Bernoulli, DiscretizedGaussian, Gaussian, Likelihood
from .mlp import MLPDecoder, MLPEncoder


class DeepLatentGaussian(nn.Module):
    r"""A decoder/encoder pair wrapped as a Pyro `model`/`guide` for mini-batches of images.

    `model(x)`: `pyro.module(f"{name}.decoder", decoder)`; in `pyro.plate("data", B)`
    a latent site `"z"` ~ `Normal(0, 1).expand([latent_dim]).to_event(1)` and an observed
    site `"x"` ~ `likelihood.distribution(decoder(z))`.
    `guide(x)`: `pyro.module(f"{name}.encoder", encoder)`; `"z"` ~
    `Normal(loc, scale).to_event(1)` with `(loc, scale) = encoder(x)`.

    Partly observed images: both take `mask`, a boolean tensor shaped like `x` (`True` =
    observed). The model masks the likelihood per pixel (`.mask(mask)` on the pixels'
    distribution), so its posterior is $p(z_i \mid x_{i,\mathrm{obs}})$; the guide encodes
    `x` filled in with `fill` (0.5 for Bernoulli data in [0, 1], 0 for data in [-1, 1]: the
    middle of the data range). Missing entries of `x` may hold anything, NaN included.

    Args:
        decoder: module `z (B, latent_dim) -> output (B, *image_shape)`.
        encoder: module `x -> (loc, scale)`, each `(B, latent_dim)`.
        likelihood: a [`Likelihood`][pyro_lpc.images.models.Likelihood].
        latent_dim: dimension `d` of `z`.
        name: prefix of the Pyro parameter names.

    Example:
        ```python
        >>> import pyro, torch
        >>> from pyro_lpc.images.models import mlp_model
        >>> vae = mlp_model(latent_dim=10)                   # 784-200-200-10 tanh, Bernoulli
        >>> x = torch.rand(16, 1, 28, 28).round()
        >>> svi = pyro.infer.SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-3}),
        ...                      pyro.infer.Trace_ELBO())
        >>> loss = svi.step(x)                               # or pyro_lpc.fit(vae.model, vae.guide, data)
        >>> vae.sample(4).shape, vae.reconstruct(x).shape
        (torch.Size([4, 1, 28, 28]), torch.Size([16, 1, 28, 28]))

        ```
    """

    def __init__(self, decoder: nn.Module, encoder: nn.Module, likelihood: Likelihood, latent_dim: int,
                 name: str = "dlgm"):
        super().__init__()
        self.decoder = decoder
        self.encoder = encoder
        self.likelihood = likelihood
        self.latent_dim = int(latent_dim)
        self.name = name
        shape = getattr(decoder, "out_shape", None)
        self.image_shape = tuple(shape) if shape is not None else None

    def _check(self, x: torch.Tensor) -> None:
        if self.image_shape is not None and tuple(x.shape[1:]) != self.image_shape:
            raise ValueError(f"{self.name}: expected a batch of shape (B, {', '.join(map(str, self.image_shape))}), "
                             f"got {tuple(x.shape)}")

    @property
    def fill(self) -> float:
        """The value given to missing pixels before encoding: the middle of the data range."""
        return 0.5 if isinstance(self.likelihood, Bernoulli) else 0.0

    def _observed(self, x: Optional[torch.Tensor], mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """`x` with its missing entries (`mask` False) set to `fill`; `x` itself when `mask` is None."""
        if mask is None:
            return x
        if x is None:
            raise ValueError(f"{self.name}: mask needs the data x")
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"{self.name}: mask must be a boolean tensor (True = observed), got "
                            f"{getattr(mask, 'dtype', type(mask).__name__)}")
        if mask.shape != x.shape:
            raise ValueError(f"{self.name}: mask must have the shape of x, {tuple(x.shape)}, got {tuple(mask.shape)}")
        return torch.where(mask, x, torch.full_like(x, self.fill))

    def _distribution(self, output: torch.Tensor, mask: Optional[torch.Tensor]):
        """The likelihood of the image given the decoder's `output`, over the pixels where `mask` is True."""
        d = self.likelihood.distribution(output)
        if mask is None:
            return d
        return d.base_dist.mask(mask).to_event(d.reinterpreted_batch_ndims)

    def _like(self) -> torch.Tensor:
        """A tensor with the decoder's dtype and device."""
        p = next(self.decoder.parameters(), None)
        return p if p is not None else torch.zeros(())

    def model(self, x: Optional[torch.Tensor] = None, batch_size: Optional[int] = None,
              mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The generative model; `x=None` (with `batch_size`) generates instead of conditioning;
        `mask` (shaped like `x`, True = observed) conditions on the observed pixels only."""
        pyro.module(f"{self.name}.decoder", self.decoder)
        if x is not None:
            self._check(x)
            batch_size, ref = x.shape[0], x
        elif batch_size is None:
            raise ValueError("model(x=None) needs batch_size")
        else:
            ref = self._like()
        x = self._observed(x, mask)
        with pyro.plate("data", batch_size):
            prior = dist.Normal(ref.new_zeros(()), ref.new_ones(())).expand([self.latent_dim]).to_event(1)
            z = pyro.sample("z", prior)
            output = self.decoder(z)
            return pyro.sample("x", self._distribution(output, mask), obs=x)

    def guide(self, x: torch.Tensor, batch_size: Optional[int] = None,
              mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The amortised posterior `q_φ(z | x)`; with `mask`, of `x` filled in with `fill`."""
        pyro.module(f"{self.name}.encoder", self.encoder)
        self._check(x)
        with pyro.plate("data", x.shape[0]):
            loc, scale = self.encoder(self._observed(x, mask))
            return pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    @torch.no_grad()
    def sample(self, n: int) -> torch.Tensor:
        """Decode `n` prior draws `z ~ N(0, I)`; returns the likelihood's mean, `(n, *image_shape)`."""
        ref = self._like()
        z = torch.randn(n, self.latent_dim, dtype=ref.dtype, device=ref.device)
        return self.likelihood.mean(self.decoder(z))

    @torch.no_grad()
    def impute(self, x: torch.Tensor, mask: torch.Tensor, z: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        r"""Fill in the missing pixels of `x` from draws `z` of $p(z_i \mid x_{i,\mathrm{obs}})$, shaped
        `(S, B, latent_dim)` (e.g. `infer_posterior(vae.model, vae.guide, x, mask=mask)["z"]`).

        Returns the images with the observed pixels kept and the missing ones set to the posterior
        predictive mean $\frac1S\sum_s \mathbb E[x \mid z_s]$, and per image the log predictive
        density of `x`'s missing pixels (the true ones, when `x` is complete),
        $\log \frac1S \sum_s p(x_{i,\mathrm{mis}} \mid z_s)$ in nats.
        """
        self._check(x)
        self._observed(x, mask)
        if z.dim() != 3 or z.shape[1:] != (x.shape[0], self.latent_dim):
            raise ValueError(f"{self.name}: z must have shape (S, {x.shape[0]}, {self.latent_dim}), "
                             f"got {tuple(z.shape)}")
        output = self.decoder(z.reshape(-1, self.latent_dim)).reshape(z.shape[:2] + x.shape[1:])
        imputed = torch.where(mask, x, self.likelihood.mean(output).mean(0))
        log_p = self._distribution(output, ~mask).log_prob(x)
        return imputed, torch.logsumexp(log_p, 0) - math.log(z.shape[0])

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, sample: bool = False) -> torch.Tensor:
        """Decode the encoder's mean (or a draw from `q_φ(z | x)` with `sample=True`); the likelihood's mean."""
        self._check(x)
        loc, scale = self.encoder(x)
        z = loc + scale * torch.randn_like(loc) if sample else loc
        return self.likelihood.mean(self.decoder(z))


_LIKELIHOODS = {"bernoulli": Bernoulli, "gaussian": Gaussian, "discretized": DiscretizedGaussian,
                "discretized_gaussian": DiscretizedGaussian}


def _likelihood(likelihood: Union[str, Likelihood], event_dim: int, name: str) -> Likelihood:
    if isinstance(likelihood, str):
        try:
            cls = _LIKELIHOODS[likelihood.lower()]
        except KeyError:
            raise ValueError(f"unknown likelihood {likelihood!r}; choose from {sorted(_LIKELIHOODS)} "
                             "or pass a Likelihood instance") from None
        kwargs = {} if cls is Bernoulli else {"name": f"{name}.likelihood"}
        return cls(event_dim=event_dim, **kwargs)
    if not isinstance(likelihood, Likelihood):
        raise TypeError(f"likelihood must be a string or a Likelihood, got {type(likelihood).__name__}")
    if likelihood.event_dim != event_dim:
        raise ValueError(f"likelihood.event_dim={likelihood.event_dim} does not match the image's "
                         f"{event_dim} dimensions")
    return likelihood


def _out_activation(likelihood: Likelihood) -> Optional[Type[nn.Module]]:
    """Bernoulli decoders output logits; Gaussian ones a mean in [-1, 1] (tanh)."""
    return None if isinstance(likelihood, Bernoulli) else nn.Tanh


def mlp_model(
    image_shape: Sequence[int] = (1, 28, 28),
    latent_dim: int = 50,
    hidden: Sequence[int] = (200, 200),
    likelihood: Union[str, Likelihood] = "bernoulli",
    activation: Type[nn.Module] = nn.Tanh,
    name: str = "dlgm",
) -> DeepLatentGaussian:
    """The IWAE paper's MNIST model: 784-200-200-50 tanh MLPs, Bernoulli likelihood by default.

    `likelihood`: `"bernoulli"` (decoder outputs logits), `"gaussian"` or
    `"discretized"` (decoder outputs a tanh mean; σ = 0.1 fixed), or a
    [`Likelihood`][pyro_lpc.images.models.Likelihood] instance (e.g. with `learn_scale=True`).
    """
    image_shape = tuple(int(s) for s in image_shape)
    lik = _likelihood(likelihood, len(image_shape), name)
    decoder = MLPDecoder(latent_dim, hidden, image_shape, activation, out_activation=_out_activation(lik))
    encoder = MLPEncoder(image_shape, hidden, latent_dim, activation)
    return DeepLatentGaussian(decoder, encoder, lik, latent_dim, name=name)


def conv_model(
    image_size: int = 32,
    channels: int = 3,
    latent_dim: int = 64,
    likelihood: Union[str, Likelihood] = "discretized",
    hidden_channels: Optional[Sequence[int]] = None,
    name: str = "dlgm",
) -> DeepLatentGaussian:
    """β-VAE-style convolutional model (`conv`) for `channels × image_size × image_size`
    images (32 or 64); discretised Gaussian likelihood over [-1, 1] by default.

    `likelihood` as in [`mlp_model`][pyro_lpc.images.models.mlp_model]. `latent_dim=64` is this package's default, not a
    value from the paper.
    """
    lik = _likelihood(likelihood, 3, name)
    decoder = ConvDecoder(latent_dim, image_size, channels, hidden_channels, out_activation=_out_activation(lik))
    encoder = ConvEncoder(image_size, channels, latent_dim, hidden_channels)
    return DeepLatentGaussian(decoder, encoder, lik, latent_dim, name=name)
