"""``pyro_lpc.images.sample_quality`` against closed forms and known expectations.

Seeds are fixed; every tolerance says where it comes from.
"""
import math

import numpy as np
import pytest
import scipy.linalg
import torch

from pyro_lpc.images.sample_quality import (
    FeatureExtractor,
    density_coverage,
    frechet_distance,
    inception_features,
    sample_quality,
    train_feature_extractor,
)

F64 = torch.float64


# -- Fréchet distance ------------------------------------------------------------------------
def exact_moments(n, mean, cov, seed):
    """n samples whose sample mean and unbiased covariance are exactly ``mean``, ``cov``."""
    z = torch.randn(n, len(mean), generator=torch.Generator().manual_seed(seed), dtype=F64)
    z = z - z.mean(0)
    z = z @ torch.linalg.inv(torch.linalg.cholesky(torch.cov(z.T))).T
    return torch.as_tensor(mean, dtype=F64) + z @ torch.linalg.cholesky(torch.as_tensor(cov, dtype=F64)).T


def test_frechet_distance_closed_form():
    # diagonal case by hand: |μ1−μ2|² = 5; Tr(Σ1 + Σ2 − 2(Σ1Σ2)^½) = (1 + 4 − 4) + (4 + 9 − 12) = 2
    a = exact_moments(300, [0.0, 0.0], torch.diag(torch.tensor([1.0, 4.0])), 0)
    b = exact_moments(300, [1.0, 2.0], torch.diag(torch.tensor([4.0, 9.0])), 1)
    assert frechet_distance(a, b) == pytest.approx(7.0, rel=1e-9)
    # general covariances against scipy's sqrtm
    g = torch.Generator().manual_seed(2)
    m1, m2 = torch.randn(5, generator=g, dtype=F64), torch.randn(5, generator=g, dtype=F64)
    a1, a2 = torch.randn(5, 5, generator=g, dtype=F64), torch.randn(5, 5, generator=g, dtype=F64)
    s1, s2 = a1 @ a1.T + 0.1 * torch.eye(5, dtype=F64), a2 @ a2.T + 0.1 * torch.eye(5, dtype=F64)
    expected = float(((m1 - m2) ** 2).sum() + torch.trace(s1 + s2)
                     - 2 * np.trace(scipy.linalg.sqrtm(s1.numpy() @ s2.numpy())).real)
    fd = frechet_distance(exact_moments(400, m1, s1, 3).numpy(), exact_moments(400, m2, s2, 4))
    assert fd == pytest.approx(expected, rel=1e-7)


def test_frechet_distance_same_gaussian_near_zero():
    """Identical sets: 0 up to rounding. Two samples of N(0, I_4) (n = 2000): E|μ̂1 − μ̂2|² = 2·4/n
    = 0.004, plus a covariance term of the same order; a 0.5 shift adds 0.25."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2000, 4, generator=g), torch.randn(2000, 4, generator=g)
    assert frechet_distance(a, a) < 1e-8
    same = frechet_distance(a, b)
    assert same < 0.03
    shifted = frechet_distance(a, b + torch.tensor([0.5, 0.0, 0.0, 0.0]))
    assert shifted == pytest.approx(0.25, abs=0.05)


# -- density and coverage --------------------------------------------------------------------
def test_density_coverage_same_and_disjoint():
    """Same distribution, N = M = 1000, k = 5: E[density] = 1 (Naeem et al. 2020) and
    E[coverage] = 1 − Π_{j<k}(N−1−j)/(N−1+M−j) = 0.969 (a real point is uncovered iff its k
    nearest real neighbours come before every fake); sd ≈ 0.03 and ≈ 0.006, tolerances ~3-5 sd.
    Disjoint supports: both exactly 0."""
    g = torch.Generator().manual_seed(0)
    real, fake = torch.randn(1000, 8, generator=g), torch.randn(1000, 8, generator=g)
    out = density_coverage(real, fake, k=5)
    expected_cov = 1.0 - math.prod((999 - j) / (1999 - j) for j in range(5))
    assert out["density"] == pytest.approx(1.0, abs=0.1)
    assert out["coverage"] == pytest.approx(expected_cov, abs=0.03)
    apart = density_coverage(real, fake + 100.0, k=5)
    assert apart["density"] == 0.0 and apart["coverage"] == 0.0
    # fakes from half the support only: real points in the other half go uncovered
    half = density_coverage(real, fake[fake[:, 0] > 0], k=5)
    assert half["coverage"] < out["coverage"] - 0.2


# -- feature extractor and the combined metrics -------------------------------------------------
def bar_images(n, seed):
    """Three classes of 1×16×16 images: a horizontal bar, a vertical bar, a centred square; plus noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 3
    images = 0.3 * torch.rand(n, 1, 16, 16, generator=g)
    pos = torch.randint(3, 13, (n,), generator=g)
    for i in range(n):
        p = int(pos[i])
        if labels[i] == 0:
            images[i, 0, p - 1:p + 1, 2:14] += 0.7
        elif labels[i] == 1:
            images[i, 0, 2:14, p - 1:p + 1] += 0.7
        else:
            images[i, 0, 5:11, 5:11] += 0.7
    return images, labels


def test_feature_extractor_and_sample_quality():
    train_x, train_y = bar_images(300, 0)
    real, real_y = bar_images(300, 1)
    other, _ = bar_images(300, 2)
    net = train_feature_extractor(train_x, train_y, epochs=5, seed=0, batch_size=32)
    assert isinstance(net, FeatureExtractor)
    assert net.accuracy(real, real_y) > 0.95
    feats = net.features(real)
    assert feats.shape == (300, 84)
    again = train_feature_extractor(train_x, train_y, epochs=5, seed=0, batch_size=32)
    assert torch.equal(again.features(real), feats)  # seeded
    good = sample_quality(real, other, net)
    bad = sample_quality(real, real[real_y == 0], net)  # mode collapse onto one class
    assert set(good) == {"frechet_distance", "density", "coverage", "precision", "recall"}
    assert good["coverage"] > 0.8 and bad["coverage"] < 0.5
    assert bad["frechet_distance"] > 5 * good["frechet_distance"]


def test_inception_features_needs_local_weights(tmp_path):
    missing = tmp_path / "inception.pth"
    with pytest.raises(FileNotFoundError, match="Inception-v3 weights not found"):
        inception_features(torch.rand(2, 3, 32, 32), weights_path=str(missing))
