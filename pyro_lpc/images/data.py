r"""Image datasets for training generative models.

[`load_dataset`][pyro_lpc.images.data.load_dataset] returns an [`ImageDataset`][pyro_lpc.images.data.ImageDataset], a
`torch.utils.data.Dataset` whose items are float32 image tensors of shape
`(C, H, W)` (or `(image, label)` pairs with `labels=True`), and whose
`info` attribute is a [`DatasetInfo`][pyro_lpc.images.data.DatasetInfo] (name, image shape, pixel range,
recommended likelihood, number of train/test items, number of grey levels).

Datasets (`name`):

* `"digits"` — scikit-learn's embedded 8×8 handwritten digits (1,797 images,
  grey levels 0..16, so `num_levels = 17`). It ships inside scikit-learn: the
  offline default, no `root` needed. Split: the **first 1,500 images are
  "train", the last 297 "test"** (fixed, in scikit-learn's order).
* `"mnist"`, `"fashion-mnist"` — `torchvision.datasets.MNIST` /
  `FashionMNIST` files in `<root>/MNIST/raw/` / `<root>/FashionMNIST/raw/`
  (60,000 / 10,000 images of 28×28). The `.gz` files alone are enough: they
  are extracted next to themselves (`root` must be writable).
* `"cifar10"` — from the first of these found under `root`:
  torchvision's original python batches (`<root>/cifar-10-batches-py/`, read by
  `torchvision.datasets.CIFAR10`); numpy arrays `train_batch_{1..5}.npz`
  and `test_*.npz` in `<root>/cifar10/` or `<root>/` (see
  [`images_from_arrays`][pyro_lpc.images.data.images_from_arrays]; with the arrays, `split="test"` reads
  `test_first1000_exact.npz` when present — the 1,000 pixel-exact test images —
  and `split="test_jpeg_q75"` the whole, lossy, JPEG-decoded test set); an image
  folder `<root>/cifar10/{train,test}/<class>/*.png`.
* `"svhn"` — `torchvision.datasets.SVHN` (`<root>/{train,test,extra}_32x32.mat`, 32×32).
* `"celeba"` — `torchvision.datasets.CelebA` (`<root>/celeba/`),
  centre-cropped to 148×148 and resized to **64×64**; splits train/valid/test/all.
* `"folder:PATH"` — your own images, [`images_from_folder`][pyro_lpc.images.data.images_from_folder].
* `"arrays:PATH"` — your own numpy arrays, [`images_from_arrays`][pyro_lpc.images.data.images_from_arrays].

Preprocessing (applied per item, in this order):

1. **Scale** to [0, 1]: `x / max_level` (255 for 8-bit images, 16 for digits).
2. **Pad** (`pad_to=32`): zero-pad (black) symmetrically to `pad_to × pad_to`,
   e.g. MNIST 28×28 → 32×32 for the conv model.
3. **Binarise** (only for the [0, 1] range, i.e. Bernoulli likelihoods):
   `binarize="dynamic"` (or `True`) draws every pixel afresh as
   `Bernoulli(grey level)` *each time an item is read*, from torch's global RNG —
   so `torch.manual_seed` makes it reproducible, and each DataLoader worker
   draws its own stream (PyTorch seeds workers with `base_seed + worker_id`).
   `binarize="static"` draws once per item from a generator seeded with
   `(seed, index)`: the same binary image on every access, in every worker.
4. **Range**: `pixel_range=(0, 1)` keeps [0, 1] (Bernoulli likelihood, the
   default for grey-scale data) and `(-1, 1)` maps `x -> 2x - 1` (Gaussian /
   discretised-Gaussian likelihoods, conv models with a `tanh` output; the
   default for colour data). 8-bit pixels then sit exactly on the `num_levels`
   bin centres of [`DiscretizedNormal`][pyro_lpc.images.models.DiscretizedNormal]
   (`num_bins=info.num_levels`).

Missing files raise `FileNotFoundError` naming the expected files and
directory. Nothing is downloaded unless `download=True`. `root=None` means
`$PYRO_LPC_DATA` if set, else `./data`.

Example:
    ```python
    >>> from torch.utils.data import DataLoader
    >>> from pyro_lpc.images.data import load_dataset
    >>> train = load_dataset("digits", binarize="dynamic")
    >>> train.info.image_shape, len(train), train.info.likelihood
    ((1, 8, 8), 1500, 'bernoulli')
    >>> x = next(iter(DataLoader(train, batch_size=100, shuffle=True)))   # (100, 1, 8, 8)

    ```
"""
from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset
from torchvision.datasets import ImageFolder

__all__ = ["DatasetInfo", "ImageDataset", "load_dataset", "images_from_arrays", "images_from_folder", "DATASETS"]

DATASETS = ("digits", "mnist", "fashion-mnist", "cifar10", "svhn", "celeba", "folder:PATH", "arrays:PATH")
_MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
_CELEBA_FILES = ("img_align_celeba/", "list_eval_partition.txt", "identity_CelebA.txt", "list_attr_celeba.txt",
                 "list_bbox_celeba.txt", "list_landmarks_align_celeba.txt")
# standard (train, test) sizes
_COUNTS = {"digits": (1500, 297), "mnist": (60000, 10000), "fashion-mnist": (60000, 10000),
           "cifar10": (50000, 10000), "svhn": (73257, 26032), "celeba": (162770, 19962)}


@dataclass(frozen=True)
class DatasetInfo:
    """What a loaded dataset holds and how to model it.

    Attributes:
        name: dataset name (`"mnist"`, `"folder:/my/images"`, ...).
        split: the split loaded.
        image_shape: `(C, H, W)` of every item, after padding/resizing.
        pixel_range: `(0.0, 1.0)` or `(-1.0, 1.0)`.
        likelihood: recommended likelihood: `"bernoulli"` for [0, 1],
            `"discretized_gaussian"` (`num_bins=num_levels`) for [-1, 1] with
            integer pixels, `"gaussian"` for [-1, 1] float data.
        num_train: items in the train split (`None` if unknown).
        num_test: items in the test split (`None` if unknown).
        num_levels: grey levels per channel in the source (256 for 8-bit,
            17 for digits, `None` for float data).
        binarize: `None`, `"dynamic"` or `"static"`.
    """

    name: str
    split: str
    image_shape: Tuple[int, int, int]
    pixel_range: Tuple[float, float]
    likelihood: str
    num_train: Optional[int]
    num_test: Optional[int]
    num_levels: Optional[int]
    binarize: Optional[str] = None


class ImageDataset(Dataset):
    """Images from `source` (a dataset of `(CHW tensor, label)` with values in
    `0..max_value`) preprocessed as the module docstring describes.

    Use [`load_dataset`][pyro_lpc.images.data.load_dataset],
    [`images_from_arrays`][pyro_lpc.images.data.images_from_arrays] or
    [`images_from_folder`][pyro_lpc.images.data.images_from_folder] to build one. `info` is its
    [`DatasetInfo`][pyro_lpc.images.data.DatasetInfo]; `source` the raw dataset.
    """

    def __init__(self, source: Dataset, info: DatasetInfo, max_value: float, *, seed: int = 0,
                 pad_to: Optional[int] = None, labels: bool = False):
        self.source, self.info, self.max_value = source, info, float(max_value)
        self.seed, self.pad_to, self.labels = int(seed), pad_to, labels

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index):
        x, y = self.source[index]
        x = x.to(torch.float32) / self.max_value
        if self.pad_to is not None:
            dh, dw = self.pad_to - x.shape[-2], self.pad_to - x.shape[-1]
            x = F.pad(x, (dw // 2, dw - dw // 2, dh // 2, dh - dh // 2))
        if self.info.binarize == "dynamic":
            x = torch.bernoulli(x)
        elif self.info.binarize == "static":
            key = np.random.SeedSequence([self.seed, int(index) % len(self)]).generate_state(1)[0]
            g = torch.Generator().manual_seed(int(key))
            x = (torch.rand(x.shape, generator=g) < x).to(torch.float32)
        if self.info.pixel_range[0] == -1.0:
            x = 2.0 * x - 1.0
        return (x, y) if self.labels else x

    def __repr__(self) -> str:
        return f"ImageDataset({len(self)} items, {self.info})"


# ---------------------------------------------------------------------------------------------
# public entry points


def load_dataset(name: str, root: Union[str, Path, None] = None, split: str = "train", *, download: bool = False,
                 binarize: Union[bool, str, None] = None, pixel_range: Optional[Sequence[float]] = None,
                 pad_to: Optional[int] = None, seed: int = 0, labels: bool = False) -> ImageDataset:
    """Load a named image dataset (see the module docstring for names, files and preprocessing).

    Args:
        name: one of `DATASETS` (`"folder:PATH"`/`"arrays:PATH"` for your own data).
        root: directory holding the files (default `$PYRO_LPC_DATA` or `./data`).
        split: `"train"` or `"test"` (svhn also `"extra"`, celeba `"valid"`/`"all"`).
        download: let torchvision download missing files (needs network access).
        binarize: `None`/`False`, `"dynamic"`/`True` or `"static"`.
        pixel_range: `(0, 1)` or `(-1, 1)`; default (0, 1) for grey-scale
            data or when binarising, (-1, 1) for colour data.
        pad_to: zero-pad images to `pad_to × pad_to` (e.g. 32 for MNIST in the conv model).
        seed: seed (a non-negative int) of `binarize="static"`.
        labels: return `(image, label)` pairs instead of images.

    Raises:
        FileNotFoundError: the files are missing (the message lists them).
        ValueError: unknown name or split, or an invalid option.
    """
    prep = dict(binarize=binarize, pixel_range=pixel_range, pad_to=pad_to, seed=seed, labels=labels)
    for prefix, loader in (("folder:", images_from_folder), ("arrays:", images_from_arrays)):
        if name.startswith(prefix):
            return loader(name[len(prefix):], split=split, **prep)
    key = name.strip().lower().replace("_", "-")
    key = {"fashionmnist": "fashion-mnist", "cifar-10": "cifar10"}.get(key, key)
    if key not in _COUNTS:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")
    root = Path(root if root is not None else os.environ.get("PYRO_LPC_DATA", "data")).expanduser()
    if key == "cifar10" and not (download or (root / "cifar-10-batches-py").is_dir()):
        arrays = next((d for d in (root / "cifar10", root) if (d / "train_batch_1.npz").is_file()), None)
        if arrays is not None:
            return _from_arrays(arrays, split, "cifar10", aliases={"test": "test_first1000_exact"}, **prep)
        if (root / "cifar10" / split).is_dir():
            return _from_folder(root / "cifar10", split, None, False, "cifar10", **prep)
    source, max_value = _SOURCES[key](root, split, download)
    counts = dict(zip(("train", "test"), _COUNTS[key]))
    if split in counts:
        counts[split] = len(source)
    colour = key not in ("digits", "mnist", "fashion-mnist")
    return _wrap(source, key, split, max_value, 17 if key == "digits" else 256, counts, colour=colour, **prep)


def images_from_arrays(path: Union[str, Path], split: str = "train", *, binarize=None, pixel_range=None,
                       pad_to: Optional[int] = None, seed: int = 0, labels: bool = False) -> ImageDataset:
    """Images from numpy files: `.npz` with an image array `x` (or a single
    array) and optional labels `y`, or `.npy` image arrays.

    `x` is `(N, H, W)`, `(N, H, W, C)` (when `C` in 1, 3, 4) or `(N, C, H, W)`;
    `uint8` (256 levels) or float in [0, 1]. `path` is a file (used whatever
    `split`) or a directory, where `split` selects `<split>.npz` (or `.npy`),
    else all `<split>_batch_*.npz` concatenated in numeric order, else the single
    `<split>_*.npz`; `split` may also be a file's stem. Takes
    [`load_dataset`][pyro_lpc.images.data.load_dataset]'s preprocessing keywords.
    """
    return _from_arrays(Path(path).expanduser(), split, f"arrays:{path}", binarize=binarize,
                        pixel_range=pixel_range, pad_to=pad_to, seed=seed, labels=labels)


def images_from_folder(path: Union[str, Path], split: str = "train", size=None, *, grayscale: bool = False,
                       binarize=None, pixel_range=None, pad_to: Optional[int] = None, seed: int = 0,
                       labels: bool = False) -> ImageDataset:
    """Images from a folder, read by `torchvision.datasets.ImageFolder`.

    Layout: `PATH/<class>/*.png` or image files directly in `PATH` (one class);
    `PATH/<split>` is the split when it exists, otherwise the whole folder is the
    train split (and other splits are missing). `size`: an int resizes the shorter
    side to `size` and centre-crops a square, `(h, w)` resizes to exactly that;
    without it all images must have the same size. `grayscale` gives 1 channel
    instead of 3 (RGB). Takes [`load_dataset`][pyro_lpc.images.data.load_dataset]'s preprocessing keywords.
    """
    return _from_folder(Path(path).expanduser(), split, size, grayscale, f"folder:{path}", binarize=binarize,
                        pixel_range=pixel_range, pad_to=pad_to, seed=seed, labels=labels)


# ---------------------------------------------------------------------------------------------
# building blocks


def _wrap(source, name, split, max_value, num_levels, counts, colour, *, binarize, pixel_range, pad_to, seed, labels):
    binarize = {True: "dynamic", False: None}.get(binarize, binarize)
    if binarize not in (None, "dynamic", "static"):
        raise ValueError(f"binarize must be None, 'dynamic' or 'static', got {binarize!r}")
    if pixel_range is None:
        pixel_range = (-1.0, 1.0) if colour and binarize is None else (0.0, 1.0)
    pixel_range = tuple(float(v) for v in pixel_range)
    if pixel_range not in ((0.0, 1.0), (-1.0, 1.0)):
        raise ValueError(f"pixel_range must be (0, 1) or (-1, 1), got {pixel_range}")
    if binarize and pixel_range != (0.0, 1.0):
        raise ValueError("binarised images are in {0, 1}: use pixel_range=(0, 1) with binarize")
    if len(source) == 0:
        raise ValueError(f"{name}: the {split!r} split holds no images")
    c, h, w = source[0][0].shape
    if pad_to is not None:
        if pad_to < max(h, w):
            raise ValueError(f"pad_to={pad_to} is smaller than the images ({h}x{w})")
        h = w = int(pad_to)
    likelihood = "bernoulli" if pixel_range == (0.0, 1.0) else "discretized_gaussian" if num_levels else "gaussian"
    info = DatasetInfo(name, split, (c, h, w), pixel_range, likelihood, counts.get("train"), counts.get("test"),
                       num_levels, binarize)
    return ImageDataset(source, info, max_value, seed=seed, pad_to=pad_to, labels=labels)


def _missing(what: str, directory: Path, files, how: str) -> FileNotFoundError:
    listed = "\n".join(f"  {directory / f}" for f in files)
    return FileNotFoundError(f"{what} not found. Expected these files under {directory}:\n{listed}\n{how}")


def _check_split(name, split, allowed):
    if split not in allowed:
        raise ValueError(f"{name}: split must be one of {allowed}, got {split!r}")


def _torchvision(make, error):
    """Build a torchvision dataset, turning its 'not found' / failed-download errors into `error`."""
    try:
        return make()
    except (RuntimeError, OSError) as e:
        raise error from e


def _digits(root, split, download):
    from sklearn.datasets import load_digits

    _check_split("digits", split, ("train", "test"))
    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.uint8)).unsqueeze(1)
    y = torch.from_numpy(d.target)
    part = slice(0, 1500) if split == "train" else slice(1500, None)
    return TensorDataset(x[part], y[part]), 16


def _mnist_like(cls_name):
    def load(root, split, download):
        import torchvision
        from torchvision.datasets.utils import extract_archive

        _check_split(cls_name, split, ("train", "test"))
        raw = root / cls_name / "raw"
        for f in _MNIST_FILES:  # torchvision wants the extracted files; extract local .gz copies
            if not (raw / f).is_file() and (raw / f"{f}.gz").is_file():
                try:
                    extract_archive(str(raw / f"{f}.gz"), str(raw))
                except OSError as e:
                    raise PermissionError(f"{cls_name}: cannot extract {raw / f}.gz next to itself ({e}); copy "
                                          f"{root / cls_name} to a writable directory and pass that as root") from e
        error = _missing(cls_name, raw, [f"{f}.gz" for f in _MNIST_FILES],
                         "(or the same files without .gz). Copy the official files there (the directory must be "
                         "writable) or pass download=True on a machine with network access.")
        if not download and not all((raw / f).is_file() for f in _MNIST_FILES):
            raise error
        ds = _torchvision(lambda: getattr(torchvision.datasets, cls_name)(
            str(root), train=split == "train", download=download), error)
        return TensorDataset(ds.data.unsqueeze(1), ds.targets), 255
    return load


def _cifar10(root, split, download):
    import torchvision

    _check_split("cifar10", split, ("train", "test"))
    error = FileNotFoundError(
        f"CIFAR-10 not found under {root}. Expected one of:\n"
        f"  torchvision's original batches: {root / 'cifar-10-batches-py'}/data_batch_{{1..5}}, test_batch, "
        f"batches.meta (download=True fetches them, with network access);\n"
        f"  numpy arrays in {root / 'cifar10'} (or {root}): train_batch_{{1..5}}.npz and test_first1000_exact.npz "
        f"(or test.npz), each holding uint8 NHWC images 'x' and labels 'y';\n"
        f"  an image folder: {root / 'cifar10' / split}/<class>/*.png")
    ds = _torchvision(lambda: torchvision.datasets.CIFAR10(str(root), train=split == "train", download=download),
                      error)
    return TensorDataset(torch.from_numpy(ds.data).permute(0, 3, 1, 2), torch.tensor(ds.targets)), 255


def _svhn(root, split, download):
    import torchvision

    _check_split("svhn", split, ("train", "test", "extra"))
    error = _missing("SVHN", root, [f"{split}_32x32.mat"],
                     "Get it from http://ufldl.stanford.edu/housenumbers/ or pass download=True with network access.")
    ds = _torchvision(lambda: torchvision.datasets.SVHN(str(root), split=split, download=download), error)
    return TensorDataset(torch.from_numpy(ds.data), torch.from_numpy(ds.labels)), 255


def _celeba(root, split, download):
    import torchvision
    from torchvision import transforms as T

    _check_split("celeba", split, ("train", "valid", "test", "all"))
    error = _missing("CelebA", root / "celeba", _CELEBA_FILES,
                     "(img_align_celeba/ holds the 202,599 aligned JPEGs). See torchvision.datasets.CelebA; "
                     "download=True needs network access and gdown.")
    transform = T.Compose([T.CenterCrop(148), T.Resize(64), T.PILToTensor()])
    ds = _torchvision(lambda: torchvision.datasets.CelebA(str(root), split=split, transform=transform,
                                                          download=download), error)
    return ds, 255


_SOURCES = {"digits": _digits, "mnist": _mnist_like("MNIST"), "fashion-mnist": _mnist_like("FashionMNIST"),
            "cifar10": _cifar10, "svhn": _svhn, "celeba": _celeba}


def _natural(p: Path):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)]


def _array_files(path: Path, split: str):
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"no such file or directory: {path}")
    for pattern in (f"{split}.npz", f"{split}.npy", f"{split}_batch_*.np[zy]", f"{split}_*.np[zy]"):
        files = sorted(path.glob(pattern), key=_natural)
        if len(files) > 1 and "_batch_" not in pattern:
            raise ValueError(f"split {split!r} is ambiguous in {path}: {[f.name for f in files]}; "
                             "pass one file's stem as split")
        if files:
            return files
    raise _missing(f"split {split!r}", path, [f"{split}.npz", f"{split}_batch_<i>.npz", f"{split}_<name>.npz"],
                   "(any one of these forms; .npy also works).")


def _read_arrays(file: Path):
    z = np.load(file)
    if isinstance(z, np.ndarray):
        return z, None
    keys = z.files
    if "x" not in keys and len(keys) != 1:
        raise ValueError(f"{file}: expected an array named 'x' (and optionally 'y'), found {keys}")
    return z["x" if "x" in keys else keys[0]], (z["y"] if "y" in keys else None)


def _count(file: Path) -> int:
    """Number of images in an array file, read from the array header alone."""
    z = np.load(file, mmap_mode="r")
    if isinstance(z, np.ndarray):
        return len(z)
    with z, z.zip.open(f"{'x' if 'x' in z.files else z.files[0]}.npy") as f:
        major, _ = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        return read(f)[0][0]


def _from_arrays(path: Path, split: str, name: str, aliases=None, **prep):
    """`aliases` maps a split to a file stem used instead when that file exists."""
    def resolve(s):
        a = (aliases or {}).get(s)
        return a if a is not None and (path / f"{a}.npz").is_file() else s

    split = resolve(split)
    files = _array_files(path, split)
    with ThreadPoolExecutor(max_workers=min(len(files), os.cpu_count() or 1)) as pool:  # lzma releases the GIL
        parts = list(pool.map(_read_arrays, files))
    x = np.concatenate([p[0] for p in parts])
    if all(p[1] is not None for p in parts):
        y = torch.from_numpy(np.concatenate([p[1] for p in parts]).astype(np.int64))
    else:
        y = torch.full((len(x),), -1, dtype=torch.int64)
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[-1] in (1, 3, 4):
        x = x.transpose(0, 3, 1, 2)
    elif x.ndim != 4:
        raise ValueError(f"{name}: images must be (N, H, W), (N, H, W, C) or (N, C, H, W), got {x.shape}")
    if x.dtype == np.uint8:
        max_value, num_levels = 255, 256
    elif np.issubdtype(x.dtype, np.floating) and x.min() >= 0 and x.max() <= 1:
        max_value, num_levels = 1.0, None
    else:
        raise ValueError(f"{name}: images must be uint8 or float in [0, 1], got {x.dtype} in [{x.min()}, {x.max()}]")
    kind = "test" if split.startswith("test") else "train"
    counts = {kind: len(x)}
    if path.is_dir():  # the other split's size, from its labels
        other = {"train": "test", "test": "train"}[kind]
        try:
            counts[other] = sum(_count(f) for f in _array_files(path, resolve(other)))
        except (FileNotFoundError, ValueError):
            pass
    source = TensorDataset(torch.from_numpy(np.ascontiguousarray(x)), y)
    return _wrap(source, name, split, max_value, num_levels, counts, colour=x.shape[1] > 1, **prep)


class _Folder(ImageFolder):
    """`ImageFolder` that also takes images directly in the folder (one class)."""

    def find_classes(self, directory):
        if any(e.is_dir() for e in os.scandir(directory)):
            return super().find_classes(directory)
        return [""], {"": 0}


def _from_folder(path: Path, split: str, size, grayscale: bool, name: str, **prep):
    from torchvision import transforms as T

    folder = path / split if (path / split).is_dir() or split != "train" else path
    if not folder.is_dir():
        raise _missing(f"image folder for split {split!r}", path, [f"{split}/<class>/*.png"],
                       "(or put the images directly in the folder, which is then the train split).")
    steps = ([T.Grayscale(1)] if grayscale else []) + ([T.Resize(size), T.CenterCrop(size)] if size else [])
    source = _Folder(str(folder), transform=T.Compose(steps + [T.PILToTensor()]))
    counts = {split: len(source)}
    other = {"train": "test", "test": "train"}.get(split)
    if other and (path / other).is_dir():
        counts[other] = len(_Folder(str(path / other)))
    return _wrap(source, name, split, 255, 256, counts, colour=not grayscale, **prep)
