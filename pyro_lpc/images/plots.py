"""The pictures of a run: image grids (samples, reconstructions) and training curves."""
from __future__ import annotations

import torch
import torchvision


def _unit_range(images: torch.Tensor) -> torch.Tensor:
    """Images in `[0, 1]` (those with negative values are taken to be in `[-1, 1]`), on the CPU."""
    images = images.detach().cpu().float()
    return (images + 1) / 2 if images.min() < 0 else images


def save_grid(images: torch.Tensor, path: str, nrow: int = 8) -> None:
    """Save `(N, C, H, W)` images in `[0, 1]` or `[-1, 1]` as one grid picture; images
    smaller than 28 pixels a side are enlarged (nearest neighbour) to stay visible."""
    images = _unit_range(images)
    if images.shape[-1] < 28:  # make 8x8 digits visible
        images = torch.nn.functional.interpolate(images, scale_factor=28 // images.shape[-1], mode="nearest")
    torchvision.utils.save_image(images.clamp(0, 1), path, nrow=nrow, padding=2, pad_value=0.5)


def plot_curves(history, path: str) -> None:
    """Plot the per-data-point `log_joint` (LPC) or `elbo` (SVI) of a training history
    against iterations and seconds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = "log_joint" if history and "log_joint" in history[0] else "elbo"
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    values = [row[key] for row in history]
    for ax, x, label in ((axes[0], [r["iteration"] for r in history], "iteration"),
                         (axes[1], [r["time"] for r in history], "seconds")):
        ax.plot(x, values, lw=0.8)
        ax.set_xlabel(label)
        ax.set_ylabel(f"{key} per data point")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_imputations(true: torch.Tensor, mask: torch.Tensor, imputed: torch.Tensor, path: str) -> None:
    """Save three rows of `N` images: observed (missing pixels, `mask` False, grey), imputed, true."""
    n = true.shape[0]
    images = _unit_range(torch.cat([true, imputed, true]))
    images[:n] = torch.where(mask.cpu(), images[:n], torch.tensor(0.5))
    save_grid(images, path, nrow=n)
