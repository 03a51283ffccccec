"""``fit`` and ``fit_svi`` on the inputs users give them (issue 13, items 7, 9, 12).

* ``fit_svi``'s ``elbo`` is per data point of the *full* data (as ``fit``'s
  ``log_joint``), also under a subsampled plate: checked on a conjugate model
  whose guide is the exact posterior, so the ELBO equals ``log p(x)``.
* Bad inputs (``num_epochs``, empty data, a ``checkpoint_dir`` that is a file)
  raise a ``ValueError`` naming the argument before anything is trained or written.
* Batches as Pyro's examples give them: a loader of ``(image, label)`` pairs with
  ``model(x)``/``guide(x)`` trains with ``batch_args``, and says so without it.
"""
import math
import re

import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from pyro_lpc import fit
from pyro_lpc.baselines import fit_svi

SIGMA = 0.5  # observation noise of the conjugate model


def conjugate_posterior(x):
    """z ~ N(0, 1), x | z ~ N(z, σ²): z | x ~ N(x / (1 + σ²), σ² / (1 + σ²))."""
    return x / (1 + SIGMA ** 2), SIGMA / math.sqrt(1 + SIGMA ** 2)


def log_evidence(x):
    """log p(x_i) = log N(x_i; 0, 1 + σ²), per point."""
    return dist.Normal(0.0, math.sqrt(1 + SIGMA ** 2)).log_prob(x)


# -- item 7: fit_svi's per-data-point figure ------------------------------------------
N, B = 64, 8


def batch_model(x):
    """A mini-batch ``x`` of B rows from a loader; the plate scales by N/B."""
    with pyro.plate("data", N, subsample_size=x.shape[0]):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z, SIGMA), obs=x)


def batch_guide(x):
    loc, scale = conjugate_posterior(x)
    with pyro.plate("data", N, subsample_size=x.shape[0]):
        pyro.sample("z", dist.Normal(loc, scale))


def subsampling_model(x):
    """The full data ``x``; the plate draws B indices (the guide's, replayed)."""
    with pyro.plate("data", N, subsample_size=B) as idx:
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z, SIGMA), obs=x[idx])


def subsampling_guide(x):
    with pyro.plate("data", N, subsample_size=B) as idx:
        loc, scale = conjugate_posterior(x[idx])
        pyro.sample("z", dist.Normal(loc, scale))


@pytest.mark.parametrize("objective", ["elbo", "iwae"])
def test_fit_svi_elbo_per_point_of_loader_batches(objective):
    # exact guide: log p(x, z) - log q(z | x) = log p(x) for every z, so each step's
    # objective is (N/B) Σ_batch log p(x_i) with no Monte Carlo error; per data point
    # that is the batch's mean log p(x_i), equal up to float32 rounding (1e-5)
    x = torch.randn(N, generator=torch.Generator().manual_seed(0)) * math.sqrt(1 + SIGMA ** 2)
    loader = DataLoader(TensorDataset(x), batch_size=B, shuffle=False)
    result = fit_svi(batch_model, batch_guide, loader, objective=objective, num_particles=3,
                     progress=False, seed=0)
    expected = log_evidence(x).reshape(N // B, B).mean(1)
    assert torch.allclose(torch.tensor(result["elbo"]), expected, atol=1e-5)


def test_fit_svi_elbo_per_point_when_the_plate_subsamples():
    # each step's figure is the mean log p(x_i) over the B indices the plate drew: over
    # T steps the average estimates the data's mean log p(x_i) with standard error at
    # most sd_i(log p(x_i)) / sqrt(T B) (indices without replacement within a step);
    # 4 standard errors
    x = torch.randn(N, generator=torch.Generator().manual_seed(1)) * math.sqrt(1 + SIGMA ** 2)
    steps = 200
    result = fit_svi(subsampling_model, subsampling_guide, [{"x": x}] * steps, progress=False, seed=0)
    exact = log_evidence(x)
    error = abs(sum(result["elbo"]) / steps - exact.mean().item())
    assert error < 4 * exact.std().item() / math.sqrt(steps * B)


# -- item 9: bad inputs ---------------------------------------------------------------
def small_model(x):
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z, SIGMA), obs=x)


def small_guide(x):
    loc = pyro.param("loc", torch.tensor(0.0))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(loc, 1.0))


def train(method, data, **options):
    options = {"progress": False, "seed": 0, **options}
    if method == "fit":
        return fit(small_model, small_guide, data, num_steps=2, **options)
    return fit_svi(small_model, small_guide, data, **options)


METHODS = ["fit", "fit_svi"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("num_epochs", [0, -1, 1.5, True, "2"])
def test_num_epochs_must_be_a_positive_integer(method, num_epochs, tmp_path):
    folder = tmp_path / "run"
    with pytest.raises(ValueError, match=f"num_epochs must be a positive integer, got {num_epochs!r}"):
        train(method, torch.randn(8), batch_size=4, num_epochs=num_epochs, checkpoint_dir=str(folder))
    assert not folder.exists()


def empty_sources():
    return {
        "tensor": (torch.zeros(0), {"batch_size": 4}),
        "list": ([], {}),
        "loader": (DataLoader(TensorDataset(torch.zeros(0)), batch_size=4), {}),
        "iterator": (iter([]), {}),  # no len(): found when the first epoch yields nothing
    }


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("source", list(empty_sources()))
def test_empty_data_is_refused_and_nothing_written(method, source, tmp_path):
    data, options = empty_sources()[source]
    folder = tmp_path / "run"
    with pytest.raises(ValueError, match="data .*no (data point|mini-batch)"):
        train(method, data, checkpoint_dir=str(folder), **options)
    assert not folder.exists()


def test_zero_dimensional_tensor_data_is_refused():
    with pytest.raises(ValueError, match=r"data is a 0-dimensional tensor"):
        train("fit", torch.tensor(1.0), batch_size=4)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("below", [False, True])
def test_checkpoint_dir_that_is_a_file_is_refused_before_training(method, below, tmp_path):
    existing = tmp_path / "taken"
    existing.write_text("not a folder")
    folder = existing / "run" if below else existing
    calls = []

    def counting(x):
        calls.append(x)
        return x

    loader = map(counting, [torch.randn(4)])
    with pytest.raises(ValueError, match=f"checkpoint_dir=.*{re.escape(str(folder))}.*{re.escape(str(existing))}.* not a directory"):
        train(method, loader, checkpoint_dir=str(folder))
    assert calls == []  # no batch was drawn: refused before training
    assert existing.read_text() == "not a folder" and sorted(tmp_path.iterdir()) == [existing]


def test_checkpoint_file_path_that_is_a_directory_is_refused(tmp_path):
    (tmp_path / "run" / "checkpoint.pt").mkdir(parents=True)
    with pytest.raises(ValueError, match="checkpoint_dir=.* holds a directory .*checkpoint.pt"):
        train("fit", [torch.randn(4)], checkpoint_dir=str(tmp_path / "run"))


# -- item 12: batches as Pyro's examples give them ------------------------------------
class VAE(nn.Module):
    """The shape of Pyro's VAE example (examples/vae/vae.py): ``model(x)``, ``guide(x)``."""

    def __init__(self, z_dim=2, x_dim=16):
        super().__init__()
        self.decoder = nn.Linear(z_dim, x_dim)
        self.encoder = nn.Linear(x_dim, 2 * z_dim)
        self.z_dim = z_dim

    def model(self, x):
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("latent", dist.Normal(x.new_zeros(x.shape[0], self.z_dim), 1.0).to_event(1))
            probs = torch.sigmoid(self.decoder(z))
            pyro.sample("obs", dist.Bernoulli(probs).to_event(1), obs=x.reshape(-1, 16))

    def guide(self, x):
        pyro.module("encoder", self.encoder)
        with pyro.plate("data", x.shape[0]):
            out = self.encoder(x.reshape(-1, 16))
            loc, scale = out[:, :self.z_dim], nn.functional.softplus(out[:, self.z_dim:]) + 1e-3
            pyro.sample("latent", dist.Normal(loc, scale).to_event(1))


def image_label_loader():
    gen = torch.Generator().manual_seed(0)
    images = (torch.rand(32, 1, 4, 4, generator=gen) > 0.5).float()
    labels = torch.randint(0, 10, (32,), generator=gen)
    return DataLoader(TensorDataset(images, labels), batch_size=8)


def train_vae(method, loader, **options):
    torch.manual_seed(0)
    vae = VAE()
    options = {"progress": False, "seed": 0, **options}
    if method == "fit":
        return fit(vae.model, vae.guide, loader, num_steps=2, **options)
    return fit_svi(vae.model, vae.guide, loader, **options)


@pytest.mark.parametrize("method", METHODS)
def test_image_label_loader_without_batch_args_names_the_option(method):
    with pytest.raises(TypeError, match=r"2 positional argument.*batch_args=lambda batch: batch\[0\]"):
        train_vae(method, image_label_loader())


@pytest.mark.parametrize("method", METHODS)
def test_image_label_loader_trains_with_batch_args(method):
    result = train_vae(method, image_label_loader(), num_epochs=2, batch_args=lambda batch: batch[0])
    key = "log_joint" if method == "fit" else "elbo"
    assert len(result.history) == 8 and all(math.isfinite(v) for v in result[key])


def test_batch_args_is_checked():
    with pytest.raises(TypeError, match="batch_args must be a callable"):
        train_vae("fit", image_label_loader(), batch_args=0)
    with pytest.raises(ValueError, match="batch_args maps the batches of an iterable"):
        train("fit", torch.randn(8), batch_size=4, batch_args=lambda batch: batch)
