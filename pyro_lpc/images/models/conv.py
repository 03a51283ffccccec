r"""Convolutional decoder and encoder in the β-VAE style (Higgins et al. 2017; Burgess et al. 2018).

Every convolution has kernel 4 and stride 2. For a `S × S` image (`S` = 32 or 64):

* decoder: `z -> Linear -> 256×1×1 -> ConvT(p=0) -> 4×4 -> ConvT(p=1) -> 8×8 -> … -> C×S×S`,
  SiLU after every layer but the last, `tanh` output (images scaled to [-1, 1]);
* encoder: the mirror image, ``C×S×S -> Conv(p=1) -> … -> 4×4 -> Conv(p=0) -> 256×1×1
  -> Linear -> (loc, scale)`, with `scale = softplus(·) + min_scale``.

Default hidden widths (image side first): `(32, 64, 64)` for 32×32 and
`(32, 32, 64, 64)` for 64×64, as in Higgins et al.'s 64×64 network.
Leading batch dimensions of any number are accepted.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Type

import torch
import torch.nn as nn
import torch.nn.functional as F

SUPPORTED_IMAGE_SIZES = (32, 64)
_DEFAULT_CHANNELS = {32: (32, 64, 64), 64: (32, 32, 64, 64)}


def _check_size(image_size, hidden_channels, who: str) -> Tuple[int, Tuple[int, ...]]:
    if image_size not in SUPPORTED_IMAGE_SIZES:
        raise ValueError(
            f"{who}: unsupported image size {image_size!r}; supported sizes are "
            f"{' and '.join(f'{s}x{s}' for s in SUPPORTED_IMAGE_SIZES)} (pad or resize, e.g. MNIST 28 -> 32)"
        )
    default = _DEFAULT_CHANNELS[image_size]
    widths = tuple(int(c) for c in (hidden_channels if hidden_channels is not None else default))
    if len(widths) != len(default):
        raise ValueError(
            f"{who}: a {image_size}x{image_size} image needs {len(default)} hidden channel widths "
            f"(one per stride-2 layer down to 4x4), got {widths}"
        )
    return int(image_size), widths


class ConvDecoder(nn.Module):
    """`z -> f_θ(z)` of shape `(channels, image_size, image_size)`.

    Args:
        latent_dim: dimension of `z`.
        image_size: 32 or 64 (`ValueError` otherwise).
        channels: image channels (3 for CIFAR-10, 1 for padded MNIST).
        hidden_channels: widths of the hidden feature maps, image side first
            (see module docstring for defaults).
        feature_dim: width of the 1×1 bottleneck (256).
        out_activation: output activation class, `nn.Tanh` (means in [-1, 1]) or
            `None` (raw outputs, e.g. Bernoulli logits).

    Example:
        ```python
        >>> ConvDecoder(latent_dim=32, image_size=32, channels=3)(torch.randn(5, 32)).shape
        torch.Size([5, 3, 32, 32])

        ```
    """

    def __init__(
        self,
        latent_dim: int = 64,
        image_size: int = 32,
        channels: int = 3,
        hidden_channels: Optional[Sequence[int]] = None,
        feature_dim: int = 256,
        out_activation: Optional[Type[nn.Module]] = nn.Tanh,
    ):
        super().__init__()
        self.image_size, widths = _check_size(image_size, hidden_channels, "ConvDecoder")
        self.latent_dim = int(latent_dim)
        self.channels = int(channels)
        self.out_shape = (self.channels, self.image_size, self.image_size)
        self.feature_dim = int(feature_dim)
        self.fc = nn.Sequential(nn.Linear(self.latent_dim, self.feature_dim), nn.SiLU())
        # feature maps from the bottleneck outwards: 256 (1x1) -> widths[-1] (4x4) -> ... -> channels (S x S)
        ins = (self.feature_dim,) + widths[::-1]
        outs = widths[::-1] + (self.channels,)
        layers = []
        for i, (c_in, c_out) in enumerate(zip(ins, outs)):
            layers.append(nn.ConvTranspose2d(c_in, c_out, kernel_size=4, stride=2, padding=0 if i == 0 else 1))
            if i < len(ins) - 1:
                layers.append(nn.SiLU())
        if out_activation is not None:
            layers.append(out_activation())
        self.deconv = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.shape[-1] != self.latent_dim:
            raise ValueError(f"ConvDecoder expects z with last dimension {self.latent_dim}, got shape {tuple(z.shape)}")
        batch = z.shape[:-1]
        h = self.fc(z.reshape(-1, self.latent_dim)).reshape(-1, self.feature_dim, 1, 1)
        return self.deconv(h).reshape(*batch, *self.out_shape)


class ConvEncoder(nn.Module):
    """`x -> (loc, scale)` of a diagonal Gaussian `q_φ(z | x)`; mirror image of
    [`ConvDecoder`][pyro_lpc.images.models.ConvDecoder].

    Args:
        image_size: 32 or 64 (`ValueError` otherwise).
        channels: image channels.
        latent_dim: dimension of `z`.
        hidden_channels: widths of the hidden feature maps, image side first.
        feature_dim: width of the 1×1 bottleneck (256).
        min_scale: floor added to `softplus` for the scale.

    Example:
        ```python
        >>> loc, scale = ConvEncoder(image_size=64, channels=1, latent_dim=10)(torch.randn(2, 1, 64, 64))
        >>> loc.shape, scale.shape
        (torch.Size([2, 10]), torch.Size([2, 10]))

        ```
    """

    def __init__(
        self,
        image_size: int = 32,
        channels: int = 3,
        latent_dim: int = 64,
        hidden_channels: Optional[Sequence[int]] = None,
        feature_dim: int = 256,
        min_scale: float = 1e-3,
    ):
        super().__init__()
        self.image_size, widths = _check_size(image_size, hidden_channels, "ConvEncoder")
        self.channels = int(channels)
        self.in_shape = (self.channels, self.image_size, self.image_size)
        self.latent_dim = int(latent_dim)
        self.feature_dim = int(feature_dim)
        self.min_scale = float(min_scale)
        ins = (self.channels,) + widths
        outs = widths + (self.feature_dim,)
        layers = []
        for i, (c_in, c_out) in enumerate(zip(ins, outs)):
            layers.append(nn.Conv2d(c_in, c_out, kernel_size=4, stride=2, padding=1 if i < len(ins) - 1 else 0))
            layers.append(nn.SiLU())
        self.conv = nn.Sequential(*layers)
        self.fc = nn.Linear(self.feature_dim, 2 * self.latent_dim)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if tuple(x.shape[-3:]) != self.in_shape:
            raise ValueError(
                f"ConvEncoder expects images of shape (..., {self.channels}, {self.image_size}, "
                f"{self.image_size}), got {tuple(x.shape)}"
            )
        batch = x.shape[:-3]
        h = self.conv(x.reshape(-1, *self.in_shape)).reshape(-1, self.feature_dim)
        loc, raw = self.fc(h).chunk(2, dim=-1)
        scale = F.softplus(raw) + self.min_scale
        return loc.reshape(*batch, self.latent_dim), scale.reshape(*batch, self.latent_dim)
