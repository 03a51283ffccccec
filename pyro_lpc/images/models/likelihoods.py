r"""Observation models `p_θ(x | z)` for images, given the decoder's output `f_θ(z)`.

Each likelihood is a small object whose `distribution` turns a decoder output of
shape `(..., *image_shape)` into a Pyro distribution whose event dimensions are the
image dimensions (`event_dim`, 3 for `(C, H, W)`), ready for
`pyro.sample("x", likelihood.distribution(output), obs=x)`. Learned parameters (a
learned σ) are created with `pyro.param` inside `distribution`, so they
belong to the model that calls it.

* [`Bernoulli`][pyro_lpc.images.models.Bernoulli] — output = logits, data in {0, 1} or in [0, 1] (the usual
  cross-entropy on grey levels; not normalised for fractional data).
* [`Gaussian`][pyro_lpc.images.models.Gaussian] — output = mean, fixed σ or one learned log σ per channel.
* [`DiscretizedGaussian`][pyro_lpc.images.models.DiscretizedGaussian] — output = mean, the Gaussian discretised to the
  `num_bins` levels of 8-bit images scaled to [-1, 1] ([`DiscretizedNormal`][pyro_lpc.images.models.DiscretizedNormal]).
"""
from __future__ import annotations

import math
from typing import Optional

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import TorchDistribution, constraints
from torch.distributions.utils import broadcast_all

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def _log_ndtr(x: torch.Tensor) -> torch.Tensor:
    """`log Φ(x)` with a correct, finite gradient everywhere.

    `torch.special.log_ndtr`'s backward is wrong (and NaN) far in the lower tail
    (x below about -1e3 in float32), so for `x < -20` the asymptotic series
    `log Φ(x) = -x²/2 - log(-x) - log√(2π) + log(1 - x⁻² + 3x⁻⁴ - 15x⁻⁶ + 105x⁻⁸)`
    (relative error below 1e-10 there) is used instead.
    """
    x_core = x.clamp(min=-20.0)
    x_tail = x.clamp(max=-20.0)
    r = x_tail.reciprocal() ** 2
    series = 1.0 - r * (1.0 - r * (3.0 - r * (15.0 - 105.0 * r)))
    tail = -0.5 * x_tail * x_tail - torch.log(-x_tail) - _LOG_SQRT_2PI + torch.log(series)
    return torch.where(x < -20.0, tail, torch.special.log_ndtr(x_core))


def _log_sinhc(h: torch.Tensor) -> torch.Tensor:
    """`log(sinh(h) / h)` (even in `h`), accurate with finite gradients for every finite `h`."""
    a = h.abs()
    a_small = a.clamp(max=0.1)
    a_mid = a.clamp(min=0.1, max=20.0)
    a_big = a.clamp(min=20.0)
    small = a_small**2 / 6 - a_small**4 / 180 + a_small**6 / 2835
    mid = torch.log(torch.sinh(a_mid) / a_mid)
    big = a_big - torch.log(2 * a_big)  # + log1p(-exp(-2a)), below float precision for a > 20
    return torch.where(a < 0.1, small, torch.where(a < 20.0, mid, big))


class DiscretizedNormal(TorchDistribution):
    r"""A Normal distribution discretised to `K = num_bins` equally spaced levels in [-1, 1].

    The levels (bin centres) are $c_k = -1 + k\Delta$, $k = 0..K-1$,
    $\Delta = 2/(K-1)$ (`2/255` for 8-bit images). Bin `k` covers
    $[c_k - \Delta/2, c_k + \Delta/2)$, and the two edge bins absorb the tails
    (as in PixelCNN++):

    $$
    P(k) = \Phi(u_k) - \Phi(l_k), \quad
    u_k = \frac{c_k + \Delta/2 - \mu}{\sigma}, \quad
    l_k = \frac{c_k - \Delta/2 - \mu}{\sigma}, \quad
    l_0 = -\infty, \; u_{K-1} = +\infty.
    $$

    `log_prob` is computed stably: the edge bins as $\log\Phi(u_0)$ and
    $\log\Phi(-l_{K-1})$; interior bins as a difference of log-CDFs, reflected into
    the lower tail, $\log\Phi(a) + \log(1 - e^{\log\Phi(b) - \log\Phi(a)})$; and where the
    bin is narrow relative to σ ($w = \Delta/\sigma$ below $2\,\epsilon^{1/3}$
    of the dtype, where that difference loses its digits) by the density at the centre
    times the bin width with the exact exponential tilt,
    $\log\phi(m) + \log w + \log(\sinh(mw/2)/(mw/2))$, $m = (c_k - \mu)/\sigma$
    (relative error below $w^2/8$). A value is assigned to its nearest level, so
    data need not lie exactly on the grid, but must lie in [-1, 1] (checked when
    validation is on).

    `sample`/`rsample` return bin centres; `rsample` passes gradients straight
    through the rounding (a biased, straight-through estimator). `mean` is exact.

    Args:
        loc: μ, any real tensor.
        scale: σ > 0.
        num_bins: number of levels `K` (256 for 8-bit data).

    Example:
        ```python
        >>> d = DiscretizedNormal(torch.tensor(0.0), torch.tensor(0.1))
        >>> x = d.enumerate_support()            # the 256 bin centres
        >>> float(d.log_prob(x).exp().sum())     # doctest: +ELLIPSIS
        1.0...

        ```
    """

    arg_constraints = {"loc": constraints.real, "scale": constraints.positive}
    support = constraints.interval(-1.0, 1.0)
    has_rsample = True
    has_enumerate_support = True

    def __init__(self, loc, scale, num_bins: int = 256, validate_args=None):
        if int(num_bins) < 2:
            raise ValueError(f"num_bins must be at least 2, got {num_bins}")
        self.loc, self.scale = broadcast_all(loc, scale)
        self.num_bins = int(num_bins)
        super().__init__(self.loc.shape, validate_args=validate_args)

    @property
    def bin_width(self) -> float:
        return 2.0 / (self.num_bins - 1)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(DiscretizedNormal, _instance)
        batch_shape = torch.Size(batch_shape)
        new.loc = self.loc.expand(batch_shape)
        new.scale = self.scale.expand(batch_shape)
        new.num_bins = self.num_bins
        super(DiscretizedNormal, new).__init__(batch_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    def bin_index(self, value: torch.Tensor) -> torch.Tensor:
        """Index `k` of the level nearest to `value` (as a float tensor, clamped to 0..K-1)."""
        return torch.round((value + 1.0) / self.bin_width).clamp(0, self.num_bins - 1)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        delta = self.bin_width
        k = self.bin_index(value)
        inv_scale = self.scale.reciprocal()
        centre = k * delta - 1.0
        m = (centre - self.loc) * inv_scale
        w = delta * inv_scale
        u = m + 0.5 * w
        l = m - 0.5 * w
        # interior bins, wide relative to sigma: log(Phi(a) - Phi(b)) with a > b in the lower tail
        flip = m > 0
        a = torch.where(flip, -l, u)
        b = torch.where(flip, -u, l)
        log_a = _log_ndtr(a)
        log_b = _log_ndtr(b)
        tiny = torch.finfo(log_a.dtype).tiny
        wide = log_a + torch.log((-torch.expm1(log_b - log_a)).clamp(min=tiny))
        # interior bins, narrow relative to sigma: density at the centre x width, with exponential tilt
        narrow = -0.5 * m * m - _LOG_SQRT_2PI + torch.log(w) + _log_sinhc(0.5 * m * w)
        threshold = 2.0 * torch.finfo(log_a.dtype).eps ** (1.0 / 3.0)
        interior = torch.where(w < threshold, narrow, wide)
        lower_edge = _log_ndtr(u)
        upper_edge = _log_ndtr(-l)
        return torch.where(k == 0, lower_edge, torch.where(k == self.num_bins - 1, upper_edge, interior))

    def _round(self, x: torch.Tensor) -> torch.Tensor:
        return self.bin_index(x) * self.bin_width - 1.0

    def rsample(self, sample_shape=torch.Size()) -> torch.Tensor:
        shape = self._extended_shape(sample_shape)
        eps = torch.randn(shape, dtype=self.loc.dtype, device=self.loc.device)
        x = (self.loc + self.scale * eps).clamp(-1.0, 1.0)
        return x + (self._round(x) - x).detach()

    def sample(self, sample_shape=torch.Size()) -> torch.Tensor:
        with torch.no_grad():
            return self.rsample(sample_shape)

    def enumerate_support(self, expand: bool = True) -> torch.Tensor:
        values = torch.arange(self.num_bins, dtype=self.loc.dtype, device=self.loc.device) * self.bin_width - 1.0
        values = values.reshape((-1,) + (1,) * len(self.batch_shape))
        if expand:
            values = values.expand((-1,) + self.batch_shape)
        return values

    @property
    def mean(self) -> torch.Tensor:
        r"""$E[X] = c_0 + \Delta \sum_{j=1}^{K-1} P(k \ge j) = -1 + \Delta \sum_j \Phi((\mu - e_j)/\sigma)$,
        with $e_j = -1 + (j - 1/2)\Delta$ the inner bin edges."""
        total = torch.zeros_like(self.loc)
        for j in range(1, self.num_bins):
            edge = -1.0 + (j - 0.5) * self.bin_width
            total = total + torch.special.ndtr((self.loc - edge) / self.scale)
        return total * self.bin_width - 1.0


class _BernoulliLogLikelihood(torch.autograd.Function):
    r"""`x f - softplus(f)` elementwise, with `softplus(f) = max(f, 0) + log(1 + e^{-|f|})`.

    The same value as `-binary_cross_entropy_with_logits`, several times faster on CPU:
    `log1p` (which `softplus`, `logsigmoid` and the cross-entropy use) is not
    vectorised there, `log` and `exp` are. Dropping `log1p` costs at most the
    float rounding of `1 + e^{-|f|}`, an absolute error below `eps` per element.
    The backward is the closed form `∂/∂f = x - σ(f)`, `∂/∂x = f`, written with
    differentiable operations, so higher-order gradients work.
    """

    @staticmethod
    def forward(ctx, logits, value):
        ctx.save_for_backward(logits, value)
        return value * logits - logits.clamp(min=0) - torch.log(torch.exp(-logits.abs()).add_(1.0))

    @staticmethod
    def backward(ctx, grad):
        logits, value = ctx.saved_tensors
        grad_logits = (value - torch.sigmoid(logits)) * grad if ctx.needs_input_grad[0] else None
        grad_value = logits * grad if ctx.needs_input_grad[1] else None
        return grad_logits, grad_value


class _UnitIntervalBernoulli(dist.Bernoulli):
    """Bernoulli whose `log_prob` (`-BCE`) also accepts grey levels in [0, 1], computed
    by `_BernoulliLogLikelihood`."""

    support = constraints.unit_interval

    def log_prob(self, value):
        if self._validate_args:
            self._validate_sample(value)
        logits, value = broadcast_all(self.logits, value)
        return _BernoulliLogLikelihood.apply(logits, value)


class Likelihood:
    """Base class: `distribution(output)` over the whole image, `mean(output)` its mean.

    Args:
        event_dim: number of image dimensions (3 for `(C, H, W)`, 1 for flat vectors).
    """

    def __init__(self, event_dim: int = 3):
        self.event_dim = int(event_dim)

    def distribution(self, output: torch.Tensor) -> TorchDistribution:  # pragma: no cover - abstract
        raise NotImplementedError

    def mean(self, output: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(event_dim={self.event_dim})"


class Bernoulli(Likelihood):
    r"""`x ~ Bernoulli(sigmoid(output))` per pixel; the decoder outputs logits.

    $\log p(x \mid z) = \sum_i x_i \log\sigma(f_i) + (1 - x_i)\log(1 - \sigma(f_i))$,
    for binary data or grey levels in [0, 1].
    """

    def distribution(self, output: torch.Tensor) -> TorchDistribution:
        return _UnitIntervalBernoulli(logits=output).to_event(self.event_dim)

    def mean(self, output: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(output)


class Gaussian(Likelihood):
    r"""`x ~ Normal(output, σ)` per pixel; the decoder outputs the mean.

    σ is either the fixed `scale` or, with `learn_scale=True`, $\exp$ of a
    `pyro.param` named `f"{name}.log_scale"` (initialised to `log(scale)`), one
    per channel (shape `(C, 1, 1)`) when `event_dim == 3`, else a single scalar.

    Args:
        scale: σ, or its initial value when learned.
        learn_scale: learn log σ as a model parameter.
        event_dim: number of image dimensions.
        name: prefix of the learned parameter's name.
    """

    def __init__(self, scale: float = 0.1, learn_scale: bool = False, event_dim: int = 3, name: str = "likelihood"):
        super().__init__(event_dim)
        if not scale > 0:
            raise ValueError(f"scale must be positive, got {scale}")
        self.scale = float(scale)
        self.learn_scale = bool(learn_scale)
        self.name = name

    @property
    def param_name(self) -> Optional[str]:
        """Name of the learned log σ in Pyro's param store (`None` when σ is fixed)."""
        return f"{self.name}.log_scale" if self.learn_scale else None

    def scale_for(self, output: torch.Tensor):
        """σ for a decoder output: the fixed float, or `exp(pyro.param(...))` (created on first use)."""
        if not self.learn_scale:
            return self.scale
        shape = (output.shape[-3], 1, 1) if self.event_dim == 3 else ()
        log_scale = pyro.param(
            self.param_name,
            lambda: torch.full(shape, math.log(self.scale), dtype=output.dtype, device=output.device),
        )
        return log_scale.exp()

    def distribution(self, output: torch.Tensor) -> TorchDistribution:
        return dist.Normal(output, self.scale_for(output)).to_event(self.event_dim)

    def mean(self, output: torch.Tensor) -> torch.Tensor:
        return output

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(scale={self.scale}, learn_scale={self.learn_scale}, "
                f"event_dim={self.event_dim}, name={self.name!r})")


class DiscretizedGaussian(Gaussian):
    r"""`x ~ DiscretizedNormal(output, σ, num_bins)` per pixel, for 8-bit images scaled to [-1, 1].

    The bin probabilities are those of [`DiscretizedNormal`][pyro_lpc.images.models.DiscretizedNormal]; σ is fixed or
    learned exactly as in [`Gaussian`][pyro_lpc.images.models.Gaussian]. `-log p(x | z) / (D log 2)` is the
    usual bits per dimension (for data on the `num_bins` grid, no dequantisation).
    `mean` returns the exact mean of the discretised distribution.
    """

    def __init__(self, num_bins: int = 256, scale: float = 0.1, learn_scale: bool = False,
                 event_dim: int = 3, name: str = "likelihood"):
        super().__init__(scale=scale, learn_scale=learn_scale, event_dim=event_dim, name=name)
        self.num_bins = int(num_bins)

    def distribution(self, output: torch.Tensor) -> TorchDistribution:
        return DiscretizedNormal(output, self.scale_for(output), self.num_bins).to_event(self.event_dim)

    def mean(self, output: torch.Tensor) -> torch.Tensor:
        return self.distribution(output).base_dist.mean

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", num_bins={self.num_bins})"
