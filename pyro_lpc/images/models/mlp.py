"""Fully connected decoder and encoder (the IWAE paper's MNIST MLP, 784-200-200-50 tanh).

Both networks accept any number of leading batch dimensions: the decoder maps
`z` of shape `(..., latent_dim)` to `(..., *out_shape)`; the encoder maps
`x` of shape `(..., *in_shape)` to `(loc, scale)`, each `(..., latent_dim)`.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Type

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def _mlp(sizes: Sequence[int], activation: Type[nn.Module]) -> nn.Sequential:
    """Linear layers of the given widths with `activation` between them (none after the last)."""
    layers = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2:
            layers.append(activation())
    return nn.Sequential(*layers)


class MLPDecoder(nn.Module):
    """`z -> f_θ(z)`, the output parameters of the likelihood (logits, or a mean).

    Args:
        latent_dim: dimension of `z`.
        hidden: widths of the hidden layers.
        out_shape: shape of one output, e.g. `(1, 28, 28)`.
        activation: hidden activation class (default `torch.nn.Tanh`).
        out_activation: optional activation class applied to the output
            (`None`: raw outputs, i.e. Bernoulli logits; `nn.Tanh` for means in [-1, 1]).

    Example:
        ```python
        >>> dec = MLPDecoder(latent_dim=50)
        >>> dec(torch.randn(8, 50)).shape
        torch.Size([8, 1, 28, 28])

        ```
    """

    def __init__(
        self,
        latent_dim: int = 50,
        hidden: Sequence[int] = (200, 200),
        out_shape: Sequence[int] = (1, 28, 28),
        activation: Type[nn.Module] = nn.Tanh,
        out_activation: Optional[Type[nn.Module]] = None,
    ):
        super().__init__()
        self.latent_dim = int(latent_dim)
        self.out_shape = tuple(int(s) for s in out_shape)
        out_size = math.prod(self.out_shape)
        net = _mlp([self.latent_dim, *hidden, out_size], activation)
        if out_activation is not None:
            net.append(out_activation())
        self.net = net

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.shape[-1] != self.latent_dim:
            raise ValueError(f"MLPDecoder expects z with last dimension {self.latent_dim}, got shape {tuple(z.shape)}")
        return self.net(z).reshape(*z.shape[:-1], *self.out_shape)


class MLPEncoder(nn.Module):
    """`x -> (loc, scale)` of a diagonal Gaussian `q_φ(z | x)`.

    `scale = softplus(h) + min_scale` keeps the scale positive and bounded away from 0.

    Args:
        in_shape: shape of one input, e.g. `(1, 28, 28)`.
        hidden: widths of the hidden layers.
        latent_dim: dimension of `z`.
        activation: hidden activation class (default `torch.nn.Tanh`).
        min_scale: floor added to the scale.

    Example:
        ```python
        >>> loc, scale = MLPEncoder(latent_dim=50)(torch.rand(8, 1, 28, 28))
        >>> loc.shape, bool((scale > 0).all())
        (torch.Size([8, 50]), True)

        ```
    """

    def __init__(
        self,
        in_shape: Sequence[int] = (1, 28, 28),
        hidden: Sequence[int] = (200, 200),
        latent_dim: int = 50,
        activation: Type[nn.Module] = nn.Tanh,
        min_scale: float = 1e-3,
    ):
        super().__init__()
        self.in_shape = tuple(int(s) for s in in_shape)
        self.latent_dim = int(latent_dim)
        self.min_scale = float(min_scale)
        self.net = _mlp([math.prod(self.in_shape), *hidden, 2 * self.latent_dim], activation)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        n = len(self.in_shape)
        if tuple(x.shape[x.dim() - n:]) != self.in_shape:
            raise ValueError(f"MLPEncoder expects inputs of shape (..., {self.in_shape}), got {tuple(x.shape)}")
        h = self.net(x.reshape(*x.shape[: x.dim() - n], -1))
        loc, raw = h.chunk(2, dim=-1)
        return loc, F.softplus(raw) + self.min_scale
