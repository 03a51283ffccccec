r"""Sample quality of generated images: [`frechet_distance`][pyro_lpc.images.sample_quality.frechet_distance]
(torchmetrics' FID on given features), [`density_coverage`][pyro_lpc.images.sample_quality.density_coverage]
(Naeem et al. 2020, via the `prdc` package), a LeNet-style
[`FeatureExtractor`][pyro_lpc.images.sample_quality.FeatureExtractor] trained on the data set's labels
([`train_feature_extractor`][pyro_lpc.images.sample_quality.train_feature_extractor]),
[`inception_features`][pyro_lpc.images.sample_quality.inception_features] (local weights only) and
[`sample_quality`][pyro_lpc.images.sample_quality.sample_quality], which combines them.
"""
from __future__ import annotations

import contextlib
import io
import os
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "frechet_distance",
    "density_coverage",
    "FeatureExtractor",
    "train_feature_extractor",
    "inception_features",
    "sample_quality",
]


def _as_features(x, name: str) -> torch.Tensor:
    t = torch.as_tensor(x).detach()
    if t.dim() == 1:
        t = t[:, None]
    if t.dim() != 2:
        raise ValueError(f"{name} must be a 2-D array (samples, features), got shape {tuple(t.shape)}.")
    return t.to(torch.float64)


class _Identity(nn.Module):
    """Features in, features out: turns torchmetrics' FID into a Fréchet distance on given features."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = int(num_features)

    def forward(self, x):
        return x


def frechet_distance(real_features, fake_features) -> float:
    r"""Fréchet distance between Gaussians fitted to two feature sets (the FID formula),

    $$
    d^2 = \lVert \mu_r - \mu_f \rVert^2 + \operatorname{Tr}\big(\Sigma_r + \Sigma_f
          - 2 (\Sigma_r \Sigma_f)^{1/2}\big),
    $$

    with sample means and unbiased (`n − 1`) covariances. Computed by torchmetrics'
    `FrechetInceptionDistance` fed an identity "feature extractor" (float64 moments; the
    matrix square root's trace as `Σ sqrt(eig(Σ_r Σ_f))`), so the numbers match
    torchmetrics' FID when the features are Inception's. `real_features`, `fake_features`:
    arrays `(n, d)` (tensor or NumPy), at least 2 rows each.

    ```python
    >>> import torch
    >>> a = torch.randn(500, 3, generator=torch.Generator().manual_seed(0))
    >>> round(frechet_distance(a, a), 6), round(frechet_distance(a, a + 2.0), 6)
    (0.0, 12.0)

    ```
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    real, fake = _as_features(real_features, "real_features"), _as_features(fake_features, "fake_features")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature dimensions differ: {real.shape[1]} (real) vs {fake.shape[1]} (fake).")
    if real.shape[0] < 2 or fake.shape[0] < 2:
        raise ValueError("frechet_distance needs at least 2 samples in each set.")
    # the features given are the whole sample: never gathered from other ranks of a process group
    metric = FrechetInceptionDistance(feature=_Identity(real.shape[1]), sync_on_compute=False).to(real.device)
    metric.update(real, real=True)
    metric.update(fake.to(real.device), real=False)
    return max(float(metric.compute()), 0.0)


def density_coverage(real_features, fake_features, k: int = 5) -> Dict[str, float]:
    r"""Density and coverage (Naeem et al. 2020) — and precision/recall (Kynkäänniemi et al.
    2019) — of fake samples against real ones, from the authors' `prdc` package.

    With `B_k(r_i)` the ball around real sample `r_i` reaching its `k`-th nearest real
    neighbour,

    $$
    \text{density} = \frac{1}{kM} \sum_{j=1}^{M} \sum_{i=1}^{N} 1[f_j \in B_k(r_i)], \qquad
    \text{coverage} = \frac1N \sum_{i=1}^{N} 1[\exists j: f_j \in B_k(r_i)].
    $$

    For identical distributions `E[density] = 1` and `E[coverage] → 1 − 2^{-k}` (`N = M`);
    for disjoint supports both are 0. Density is unbounded above (fakes crowding real modes).

    ```python
    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> r = torch.randn(400, 2, generator=g)
    >>> out = density_coverage(r, r + 100.0)
    >>> out["density"], out["coverage"]
    (0.0, 0.0)

    ```
    """
    from prdc import compute_prdc

    real = _as_features(real_features, "real_features").cpu().numpy()
    fake = _as_features(fake_features, "fake_features").cpu().numpy()
    k = int(k)
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature dimensions differ: {real.shape[1]} (real) vs {fake.shape[1]} (fake).")
    if k < 1 or real.shape[0] <= k or fake.shape[0] <= k:
        raise ValueError(f"k must be in [1, n) for both sets; got k={k}, n_real={real.shape[0]}, "
                         f"n_fake={fake.shape[0]}.")
    with contextlib.redirect_stdout(io.StringIO()):  # prdc prints the sample counts
        out = compute_prdc(real, fake, nearest_k=k)
    return {key: float(value) for key, value in out.items()}


MIN_SIZE = 28  # images are resized up to at least this many pixels a side


class FeatureExtractor(nn.Module):
    """A LeNet-5-style classifier whose penultimate layer gives features for Fréchet distance
    and density/coverage on small images (the "FID with a LeNet" protocol for MNIST-like data,
    where Inception features are meaningless or unavailable).

    ``conv(5×5, 6) → ReLU → maxpool 2 → conv(5×5, 16) → ReLU → maxpool 2 → fc 120 → ReLU →
    fc 84 → ReLU → fc num_classes``; the first convolution is padded by 2 (as for 28×28 MNIST).
    Images smaller than 28×28 (e.g. the 8×8 digits) are first resized bilinearly to
    28×28, so the same architecture serves them. Train it with
    [`train_feature_extractor`][pyro_lpc.images.sample_quality.train_feature_extractor];
    [`features`][pyro_lpc.images.sample_quality.FeatureExtractor.features] returns the 84 penultimate
    activations.
    """

    def __init__(self, image_shape: Sequence[int] = (1, 28, 28), num_classes: int = 10,
                 num_features: int = 84):
        super().__init__()
        self.image_shape = tuple(int(s) for s in image_shape)
        if len(self.image_shape) != 3:
            raise ValueError(f"image_shape must be (C, H, W), got {image_shape!r}.")
        self.resize = tuple(max(MIN_SIZE, s) for s in self.image_shape[1:])
        self.conv = nn.Sequential(
            nn.Conv2d(self.image_shape[0], 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        )
        with torch.no_grad():
            flat = self.conv(torch.zeros(1, self.image_shape[0], *self.resize)).shape[1]
        self.body = nn.Sequential(nn.Linear(flat, 120), nn.ReLU(), nn.Linear(120, num_features), nn.ReLU())
        self.head = nn.Linear(num_features, num_classes)
        self.num_features = int(num_features)

    def _check(self, images: torch.Tensor) -> torch.Tensor:
        images = torch.as_tensor(images)
        if images.dim() == 3 and self.image_shape[0] == 1:
            images = images.unsqueeze(1)  # (N, H, W) -> (N, 1, H, W)
        if tuple(images.shape[1:]) != self.image_shape:
            raise ValueError(f"expected images of shape (N, {', '.join(map(str, self.image_shape))}), "
                             f"got {tuple(images.shape)}.")
        p = next(self.parameters())
        images = images.to(device=p.device, dtype=p.dtype)
        if self.resize != self.image_shape[1:]:
            images = F.interpolate(images, size=self.resize, mode="bilinear", align_corners=False)
        return images

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits, `(N, num_classes)`."""
        return self.head(self.body(self.conv(self._check(images))))

    @torch.no_grad()
    def features(self, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """Penultimate-layer activations, `(N, num_features)`, in evaluation mode."""
        was_training = self.training
        self.eval()
        try:
            images = self._check(images)
            return torch.cat([self.body(self.conv(b)) for b in images.split(batch_size)])
        finally:
            self.train(was_training)

    @torch.no_grad()
    def accuracy(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 512) -> float:
        """Fraction of `images` classified as `labels`."""
        was_training = self.training
        self.eval()
        try:
            images = self._check(images)
            pred = torch.cat([self.head(self.body(self.conv(b))).argmax(-1) for b in images.split(batch_size)])
            return float((pred.cpu() == torch.as_tensor(labels).cpu()).double().mean())
        finally:
            self.train(was_training)


def train_feature_extractor(
    images: torch.Tensor,
    labels: torch.Tensor,
    epochs: int = 5,
    seed: int = 0,
    *,
    batch_size: int = 128,
    lr: float = 1e-3,
    num_classes: Optional[int] = None,
) -> FeatureExtractor:
    """Train a [`FeatureExtractor`][pyro_lpc.images.sample_quality.FeatureExtractor] on labelled images
    (cross-entropy, Adam).

    Args:
        images: `(N, C, H, W)` (or `(N, H, W)`) float images, on the device to train on.
        labels: `(N,)` integer class labels.
        epochs: passes over the data.
        seed: seeds the initial weights and the shuffling (the global RNG is left untouched).

    Returns:
        the trained extractor, in evaluation mode.

    Example:
        ```python
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> labels = torch.arange(200) % 2
        >>> images = torch.rand(200, 1, 16, 16, generator=g) * 0.5
        >>> images[labels == 1, :, :8] += 0.5                # class 1: bright upper half
        >>> net = train_feature_extractor(images, labels, epochs=5, seed=0, batch_size=32)
        >>> net.features(images).shape, net.accuracy(images, labels) > 0.9
        (torch.Size([200, 84]), True)

        ```
    """
    images = torch.as_tensor(images)
    labels = torch.as_tensor(labels).long().to(images.device)
    if images.dim() == 3:
        images = images.unsqueeze(1)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels.")
    num_classes = int(num_classes or int(labels.max()) + 1)
    dtype = images.dtype if images.is_floating_point() else torch.get_default_dtype()
    images = images.to(dtype)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = FeatureExtractor(tuple(images.shape[1:]), num_classes).to(device=images.device, dtype=dtype)
    gen = torch.Generator().manual_seed(seed)
    optim = torch.optim.Adam(net.parameters(), lr=lr)
    net.train()
    for _ in range(int(epochs)):
        order = torch.randperm(images.shape[0], generator=gen).to(images.device)
        for idx in order.split(batch_size):
            loss = nn.functional.cross_entropy(net(images[idx]), labels[idx])
            optim.zero_grad()
            loss.backward()
            optim.step()
    return net.eval()


#: torch-fidelity's Inception-v3 (FID) weights, as cached by ``torch.hub``.
INCEPTION_WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"


def inception_features(images: torch.Tensor, weights_path: Optional[str] = None, *,
                       value_range: Tuple[float, float] = (0.0, 1.0), batch_size: int = 64) -> torch.Tensor:
    """2048-d pool features of the FID Inception-v3 (torchmetrics' `NoTrainInceptionV3`).

    Works offline only: the weights must already be on disk, at `weights_path` or in
    `torch.hub`'s cache (`<torch.hub.get_dir()>/checkpoints/{INCEPTION_WEIGHTS}`); otherwise a
    `FileNotFoundError` says where to put them (nothing is downloaded). Needs the
    `torch-fidelity` package. Images `(N, C, H, W)` with values in `value_range` are mapped
    to uint8, grey images repeated to 3 channels (Inception resizes them to 299×299 itself).
    """
    path = weights_path or os.path.join(torch.hub.get_dir(), "checkpoints", INCEPTION_WEIGHTS)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"Inception-v3 weights not found at {path!r}; there is no download here. Copy the FID "
            f"Inception weights ({INCEPTION_WEIGHTS}, from torch-fidelity's releases) there, or pass "
            "weights_path=, or use a FeatureExtractor trained on the data (train_feature_extractor)."
        )
    try:
        from torchmetrics.image.fid import NoTrainInceptionV3

        net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                 feature_extractor_weights_path=path)
    except ModuleNotFoundError as error:
        raise ImportError("inception_features needs the torch-fidelity package (pip install torch-fidelity) "
                          "for torchmetrics' Inception-v3.") from error
    images = torch.as_tensor(images)
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be (N, 1 or 3, H, W), got {tuple(images.shape)}.")
    lo, hi = value_range
    images = ((images.float() - lo) / (hi - lo)).clamp(0, 1).mul(255).round().to(torch.uint8)
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    net = net.to(images.device)
    with torch.no_grad():
        return torch.cat([net(b) for b in images.split(batch_size)]).double()


def sample_quality(real_images: torch.Tensor, fake_images: torch.Tensor,
                   extractor: Union[FeatureExtractor, Callable[[torch.Tensor], torch.Tensor]],
                   k: int = 5) -> Dict[str, float]:
    """Fréchet distance, density and coverage (and precision, recall) of generated images.

    Args:
        extractor: a [`FeatureExtractor`][pyro_lpc.images.sample_quality.FeatureExtractor] (its
            [`features`][pyro_lpc.images.sample_quality.FeatureExtractor.features]) or any callable
            `images -> (N, d)` features, e.g.
            [`inception_features`][pyro_lpc.images.sample_quality.inception_features].

    Returns:
        `{"frechet_distance", "density", "coverage", "precision", "recall"}`.

    Example:
        ```python
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> labels = torch.arange(400) % 2
        >>> images = torch.rand(400, 1, 16, 16, generator=g) * 0.5
        >>> images[labels == 1, :, :8] += 0.5
        >>> net = train_feature_extractor(images[:200], labels[:200], epochs=5, batch_size=32)
        >>> scores = sample_quality(images[:200], images[200:], net)
        >>> sorted(scores)
        ['coverage', 'density', 'frechet_distance', 'precision', 'recall']

        ```
    """
    fn = extractor.features if isinstance(extractor, FeatureExtractor) else extractor
    real, fake = fn(real_images), fn(fake_images)
    out = {"frechet_distance": frechet_distance(real, fake)}
    out.update(density_coverage(real, fake, k=k))
    return out
