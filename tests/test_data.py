"""Tests for pyro_lpc.images.data: the embedded digits, preprocessing, binarisation, the real
datasets in ``../shared/data`` (or ``$PYRO_LPC_DATA``; skipped when absent), user
arrays and image folders, and the error messages."""
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Subset

from pyro_lpc.images.data import images_from_arrays, images_from_folder, load_dataset

DATA = Path(os.environ.get("PYRO_LPC_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))


def needs(*files):
    missing = [f for f in files if not (DATA / f).is_file()]
    return pytest.mark.skipif(bool(missing), reason=f"real data not found: {[str(DATA / f) for f in missing]} "
                                                    "(set PYRO_LPC_DATA to the shared data folder)")


def digits_raw():
    from sklearn.datasets import load_digits
    return torch.from_numpy(load_digits().images).float().unsqueeze(1) / 16, torch.from_numpy(load_digits().target)


# ------------------------------------------------------------------------------------------ digits


def test_digits_shapes_range_counts_and_info():
    train, test = load_dataset("digits"), load_dataset("digits", split="test")
    assert (len(train), len(test)) == (1500, 297)
    x = torch.stack([train[i] for i in range(len(train))])
    assert x.shape == (1500, 1, 8, 8) and x.dtype == torch.float32
    assert x.min() == 0.0 and x.max() == 1.0
    assert torch.equal(x * 16, (x * 16).round())  # the 17 grey levels k/16
    info = train.info
    assert info.image_shape == (1, 8, 8) and info.pixel_range == (0.0, 1.0) and info.likelihood == "bernoulli"
    assert (info.num_train, info.num_test, info.num_levels, info.binarize) == (1500, 297, 17, None)


def test_digits_split_is_first_1500_and_last_297_and_deterministic():
    raw, y = digits_raw()
    train, test = load_dataset("digits", labels=True), load_dataset("digits", split="test", labels=True)
    assert torch.equal(train[0][0], raw[0]) and torch.equal(train[1499][0], raw[1499])
    assert torch.equal(test[0][0], raw[1500]) and torch.equal(test[296][0], raw[-1])
    assert [test[i][1] for i in range(297)] == y[1500:].tolist()
    again = load_dataset("digits", split="test")
    assert all(torch.equal(again[i], test[i][0]) for i in range(0, 297, 37))


def test_symmetric_pixel_range_and_option_errors():
    unit, sym = load_dataset("digits"), load_dataset("digits", pixel_range=(-1, 1))
    assert torch.equal(sym[5], 2 * unit[5] - 1)
    assert sym.info.pixel_range == (-1.0, 1.0) and sym.info.likelihood == "discretized_gaussian"
    with pytest.raises(ValueError, match="pixel_range"):
        load_dataset("digits", pixel_range=(0, 255))
    with pytest.raises(ValueError, match="binarize"):
        load_dataset("digits", pixel_range=(-1, 1), binarize="dynamic")
    with pytest.raises(ValueError, match="binarize"):
        load_dataset("digits", binarize="threshold")
    with pytest.raises(ValueError, match="split"):
        load_dataset("digits", split="valid")


def test_pad_to():
    unit = load_dataset("digits")
    padded = load_dataset("digits", pad_to=12)
    assert padded[3].shape == (1, 12, 12) and padded.info.image_shape == (1, 12, 12)
    assert torch.equal(padded[3][:, 2:10, 2:10], unit[3])
    border = padded[3].clone()
    border[:, 2:10, 2:10] = 0
    assert border.abs().sum() == 0
    sym = load_dataset("digits", pad_to=11, pixel_range=(-1, 1))  # odd padding: 1 before, 2 after
    assert torch.equal(sym[3][:, 1:9, 1:9], 2 * unit[3] - 1) and (sym[3][:, 9:, :] == -1).all()
    with pytest.raises(ValueError, match="pad_to"):
        load_dataset("digits", pad_to=6)


# ------------------------------------------------------------------------------------------ binarisation


def test_dynamic_binarisation_draws_afresh_with_mean_the_grey_level():
    grey = load_dataset("digits")
    binary = load_dataset("digits", binarize="dynamic")
    assert binary.info.binarize == "dynamic" and binary.info.likelihood == "bernoulli"
    torch.manual_seed(0)
    a, b = binary[7], binary[7]
    assert a.dtype == torch.float32 and set(a.unique().tolist()) <= {0.0, 1.0}
    assert not torch.equal(a, b)
    draws = torch.stack([binary[7] for _ in range(4000)])
    # each pixel's mean of 4000 Bernoulli(p) draws has std <= 0.5/sqrt(4000) = 0.008: 0.04 is 5 std
    assert (draws.mean(0) - grey[7]).abs().max() < 0.04
    assert (draws.mean() - grey[7].mean()).abs() < 0.005
    torch.manual_seed(1)
    first = binary[7]
    torch.manual_seed(1)
    assert torch.equal(binary[7], first)  # reproducible under torch.manual_seed


def test_dynamic_binarisation_in_dataloader_workers():
    binary = load_dataset("digits", binarize=True)
    same_item = Subset(binary, [7] * 64)  # worker 0 makes batch 0, worker 1 batch 1
    loader = DataLoader(same_item, batch_size=32, num_workers=2)
    torch.manual_seed(0)
    epoch1 = list(loader)
    epoch2 = list(loader)
    torch.manual_seed(0)
    replay = list(loader)
    assert not torch.equal(epoch1[0], epoch1[1])  # the two workers draw different streams
    assert not torch.equal(epoch1[0], epoch2[0])  # fresh draws every epoch
    assert all(torch.equal(r, e) for r, e in zip(replay, epoch1))  # seeded: reproducible


def test_static_binarisation_is_fixed_and_seeded():
    grey = load_dataset("digits")
    s0, s0_again = load_dataset("digits", binarize="static"), load_dataset("digits", binarize="static")
    s1 = load_dataset("digits", binarize="static", seed=1)
    torch.manual_seed(0)
    assert torch.equal(s0[7], s0[7]) and torch.equal(s0[7], s0_again[7])
    assert set(s0[7].unique().tolist()) <= {0.0, 1.0}
    x0 = torch.stack([s0[i] for i in range(len(s0))])
    x1 = torch.stack([s1[i] for i in range(len(s1))])
    assert not torch.equal(x0, x1)
    g = torch.stack([grey[i] for i in range(len(grey))])
    # 96,000 Bernoulli pixels: std of the mean <= 0.0016, tolerance 0.008 = 5 std
    assert (x0.mean() - g.mean()).abs() < 0.008
    assert not torch.equal(x0[:10], x0[10:20])  # different items get different noise


# ------------------------------------------------------------------------------------------ real data


MNIST_LIKE = [
    ("mnist", "MNIST", 0.1307, [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]),
    ("fashion-mnist", "FashionMNIST", 0.2860, [1000] * 10),
]


@pytest.mark.parametrize("name, folder, mean, test_hist", MNIST_LIKE, ids=["mnist", "fashion-mnist"])
def test_mnist_like_from_real_gz_files(name, folder, mean, test_hist, tmp_path):
    files = [f"{folder}/raw/{p}-{k}.gz" for p in ("train", "t10k") for k in ("images-idx3-ubyte", "labels-idx1-ubyte")]
    if any(not (DATA / f).is_file() for f in files):
        pytest.skip(f"real data not found under {DATA / folder / 'raw'} (set PYRO_LPC_DATA)")
    shutil.copytree(DATA / folder, tmp_path / folder)  # torchvision extracts next to the .gz: needs a writable root
    train = load_dataset(name, tmp_path)
    test = load_dataset(name, tmp_path, split="test", labels=True)
    assert (len(train), len(test)) == (60000, 10000)
    assert (train.info.num_train, train.info.num_test, train.info.image_shape) == (60000, 10000, (1, 28, 28))
    x = torch.stack([train[i] for i in range(len(train))])
    assert x.shape == (60000, 1, 28, 28) and x.dtype == torch.float32
    assert x.min() == 0.0 and x.max() == 1.0
    assert abs(x.mean().item() - mean) < 5e-4
    labels = torch.tensor([test[i][1] for i in range(len(test))])
    assert torch.bincount(labels, minlength=10).tolist() == test_hist
    assert test[0][0].shape == (1, 28, 28) and test[0][0].dtype == torch.float32
    padded = load_dataset(name, tmp_path, pad_to=32, pixel_range=(-1, 1))
    assert padded[123].shape == (1, 32, 32) and padded.info.likelihood == "discretized_gaussian"
    assert torch.equal(padded[123][:, 2:30, 2:30], 2 * train[123] - 1) and padded[123][:, :2].eq(-1).all()


@pytest.mark.slow
@needs(*[f"cifar10/train_batch_{i}.npz" for i in range(1, 6)])
def test_cifar10_train_from_real_arrays():
    train = load_dataset("cifar10", DATA, labels=True)  # ~116 MB of LZMA to decompress: a few seconds
    assert len(train) == 50000 and train.info.image_shape == (3, 32, 32)
    assert train.info.pixel_range == (-1.0, 1.0) and train.info.likelihood == "discretized_gaussian"
    x, y = train[12345]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and -1 <= x.min() and x.max() <= 1
    raw = np.load(DATA / "cifar10" / "train_batch_2.npz")
    assert torch.allclose(x, torch.from_numpy(raw["x"][2345]).permute(2, 0, 1).float() / 127.5 - 1, atol=1e-6)
    assert y == raw["y"][2345]
    first_batch = torch.tensor([train[i][1] for i in range(10000)])
    assert torch.bincount(first_batch).tolist() == [1005, 974, 1032, 1016, 999, 937, 1030, 1001, 1025, 981]


@needs("cifar10/test_first1000_exact.npz", "cifar10/test_jpeg_q75.npz", "cifar10/train_batch_1.npz")
def test_cifar10_test_arrays_and_ambiguous_split():
    test = load_dataset("cifar10", DATA, split="test", pixel_range=(0, 1))
    assert len(test) == 1000 and test.info.split == "test_first1000_exact"
    assert (test.info.num_train, test.info.num_test) == (50000, 1000)
    raw = np.load(DATA / "cifar10" / "test_first1000_exact.npz")["x"]
    assert torch.equal(test[999], torch.from_numpy(raw[999]).permute(2, 0, 1).float() / 255)
    same = images_from_arrays(DATA / "cifar10", split="test_first1000_exact", pixel_range=(0, 1))
    assert torch.equal(same[500], test[500])
    with pytest.raises(ValueError, match="test_first1000_exact.npz.*test_jpeg_q75.npz"):
        load_dataset(f"arrays:{DATA / 'cifar10'}", split="test")


# ------------------------------------------------------------------------------------------ user arrays and folders


def test_arrays_layouts_order_and_dtypes(tmp_path):
    rng = np.random.default_rng(0)
    nhwc = rng.integers(0, 256, (12, 5, 6, 3), dtype=np.uint8)
    for i, part in enumerate(np.split(nhwc, [4, 8]), start=1):  # batch_1, batch_2, batch_10: numeric order
        np.savez(tmp_path / f"train_batch_{[1, 2, 10][i - 1]}.npz", x=part, y=np.full(len(part), i))
    np.savez(tmp_path / "test.npz", x=nhwc[:2].transpose(0, 3, 1, 2))  # NCHW, no labels
    train = load_dataset(f"arrays:{tmp_path}", labels=True, pixel_range=(0, 1))
    assert len(train) == 12 and train.info.image_shape == (3, 5, 6)
    assert (train.info.num_train, train.info.num_test, train.info.num_levels) == (12, 2, 256)
    assert torch.equal(train[9][0], torch.from_numpy(nhwc[9]).permute(2, 0, 1).float() / 255) and train[9][1] == 3
    test = images_from_arrays(tmp_path, split="test")
    assert torch.equal(test[1], torch.from_numpy(nhwc[1]).permute(2, 0, 1).float() / 127.5 - 1)

    grey = rng.random((7, 4, 4)).astype(np.float32)  # NHW float in [0, 1]
    np.save(tmp_path / "grey.npy", grey)
    g = images_from_arrays(tmp_path / "grey.npy")
    assert g[6].shape == (1, 4, 4) and torch.equal(g[6][0], torch.from_numpy(grey[6]))
    assert g.info.likelihood == "bernoulli" and g.info.num_levels is None
    np.save(tmp_path / "bad.npy", grey * 3)
    with pytest.raises(ValueError, match="uint8 or float in"):
        images_from_arrays(tmp_path / "bad.npy")
    with pytest.raises(FileNotFoundError, match="valid.npz"):
        images_from_arrays(tmp_path, split="valid")


def write_png(path, value, size=(6, 5), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value).save(path)


def test_image_folder(tmp_path):
    write_png(tmp_path / "train" / "cats" / "a.png", (255, 0, 51))
    write_png(tmp_path / "train" / "cats" / "b.png", (0, 0, 0))
    write_png(tmp_path / "train" / "dogs" / "c.png", (102, 204, 255))
    write_png(tmp_path / "test" / "dogs" / "d.png", (1, 2, 3))
    train = load_dataset(f"folder:{tmp_path}", labels=True, pixel_range=(0, 1))
    assert len(train) == 3 and train.info.image_shape == (3, 5, 6)
    assert (train.info.num_train, train.info.num_test) == (3, 1)
    x, y = train[2]
    assert y == 1 and x.dtype == torch.float32
    assert torch.allclose(x, torch.tensor([102, 204, 255.0]).view(3, 1, 1).expand(3, 5, 6) / 255)
    assert torch.equal(load_dataset(f"folder:{tmp_path}")[0][:, 0, 0], torch.tensor([1.0, -1.0, 51 / 127.5 - 1]))
    test = images_from_folder(tmp_path, split="test", size=3, grayscale=True)
    assert len(test) == 1 and test[0].shape == (1, 3, 3) and test.info.image_shape == (1, 3, 3)

    flat = tmp_path / "flat"  # images directly in the folder: one class, the train split
    write_png(flat / "1.png", 128, size=(4, 4), mode="L")
    write_png(flat / "2.png", 0, size=(4, 4), mode="L")
    f = images_from_folder(flat, binarize="static")
    assert len(f) == 2 and f[0].shape == (3, 4, 4) and set(f[0].unique().tolist()) <= {0.0, 1.0}
    with pytest.raises(FileNotFoundError, match=str(flat / "test")):
        images_from_folder(flat, split="test")


# ------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize("name, expected", [
    ("mnist", "MNIST/raw/train-images-idx3-ubyte.gz"),
    ("fashion-mnist", "FashionMNIST/raw/t10k-labels-idx1-ubyte.gz"),
    ("cifar10", "cifar10 (or"),
    ("svhn", "train_32x32.mat"),
    ("celeba", "celeba/list_eval_partition.txt"),
])
def test_missing_files_error_names_expected_paths(name, expected, tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        load_dataset(name, tmp_path)
    assert str(tmp_path / expected) in str(err.value)
    if name == "cifar10":
        assert "train_batch_{1..5}.npz" in str(err.value) and "cifar-10-batches-py" in str(err.value)


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as err:
        load_dataset("imagenet")
    for valid in ("digits", "mnist", "fashion-mnist", "cifar10", "svhn", "celeba", "folder:PATH", "arrays:PATH"):
        assert valid in str(err.value)
