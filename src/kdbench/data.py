"""Datasets and a device-resident loader.

Every dataset is held as three float tensors (train / validation / test, values in [0, 1]) plus
labels. :class:`Loader` keeps a split on the training device, normalises it once, and per epoch
draws a permutation, crop offsets and flips from a generator seeded by ``(seed, epoch)``: the data
order and augmentation depend only on the seed and the epoch, on CPU and GPU alike, whatever the
method, and a resumed run sees exactly the batches an uninterrupted run would. Augmentation is a
padded random crop plus an optional horizontal flip, done as one batched gather per batch: no
per-sample transforms, no worker processes.
"""

from __future__ import annotations

import gzip
import importlib.util
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from kdbench.errors import KdbenchError

DATASETS = ("digits", "fashion_mnist", "cifar10", "cifar100")

#: Published normalisation constants (REFERENCE §2); digits uses its own training split's.
NORMALISATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261)),
    "cifar100": ((0.5071, 0.4867, 0.4409), (0.267, 0.256, 0.276)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
}

#: Per-dataset defaults; every key can be overridden from the config's ``data.<dataset>`` block.
DEFAULTS: dict[str, dict[str, Any]] = {
    "digits": {
        "image_size": 16,
        "val_fraction": 0.15,
        "test_fraction": 0.2,
        "split_seed": 0,
        "crop_padding": 2,
        "flip": False,
    },
    "fashion_mnist": {
        "root": "/usr/share/datasets/fashion-mnist",
        "val_size": 5000,
        "split_seed": 0,
        "crop_padding": 4,
        "flip": True,
    },
    "cifar10": {
        "root": "resources/data",
        "download": False,
        "val_size": 5000,
        "split_seed": 0,
        "crop_padding": 4,
        "flip": True,
    },
    "cifar100": {
        "root": "resources/data",
        "download": False,
        "val_size": 5000,
        "split_seed": 0,
        "crop_padding": 4,
        "flip": True,
    },
}


@dataclass
class Split:
    """Images (N×C×H×W float32 in [0, 1]) and integer labels."""

    x: Tensor
    y: Tensor

    def __len__(self) -> int:
        return int(self.y.shape[0])


@dataclass
class Dataset:
    name: str
    train: Split
    val: Split
    test: Split
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_padding: int = 4
    flip: bool = True
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def in_channels(self) -> int:
        return int(self.train.x.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.train.x.shape[-1])

    def with_train_size(self, size: int | None) -> Dataset:
        """This dataset with a stratified subset of ``size`` of its training images, drawn with
        its ``split_seed``; itself where ``size`` is None or all of them. Validation and test
        are kept whole. The subsets are the first ``size`` images of one order
        (:func:`_nested_order`), so a smaller one lies inside every larger one."""
        n = len(self.train)
        if size is None or size == n:
            return self
        check_train_size(self.name, size, n, self.num_classes)
        seed = [int(self.info.get("split_seed", 0)), 1]  # a stream of its own, not the val draw
        kept = np.sort(_nested_order(self.train.y.numpy(), seed)[:size])
        info = {**self.info, "train_size_of": n}
        return replace(self, train=_split(self.train.x, self.train.y, kept), info=info)

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "num_classes": self.num_classes,
            "in_channels": self.in_channels,
            "image_size": self.image_size,
            "sizes": {"train": len(self.train), "val": len(self.val), "test": len(self.test)},
            "mean": list(self.mean),
            "std": list(self.std),
            "crop_padding": self.crop_padding,
            "flip": self.flip,
            **self.info,
        }


def dataset_params(name: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The defaults of dataset ``name`` updated with ``overrides`` (unknown keys rejected)."""
    if name not in DEFAULTS:
        raise KdbenchError(f"unknown dataset {name!r} (known: {', '.join(DATASETS)})")
    params = dict(DEFAULTS[name])
    for key, value in (overrides or {}).items():
        if key not in params:
            raise KdbenchError(f"data.{name}: unknown key {key!r} (known: {', '.join(params)})")
        params[key] = value
    return params


def image_shape(name: str, overrides: dict[str, Any] | None = None) -> tuple[int, int, int]:
    """(C, H, W) of dataset ``name``'s images, without loading it."""
    p = dataset_params(name, overrides)
    if name == "digits":
        return (1, int(p["image_size"]), int(p["image_size"]))
    return (1, 28, 28) if name == "fashion_mnist" else (3, 32, 32)


#: the images of each dataset before any split, and its classes
SIZES = {"digits": (1797, 10), "fashion_mnist": (60000, 10), "cifar10": (50000, 10),
         "cifar100": (50000, 100)}  # fmt: skip


def train_split_size(name: str, overrides: dict[str, Any] | None = None) -> tuple[int, int]:
    """(images, classes) of dataset ``name``'s training split, without loading it."""
    p = dataset_params(name, overrides)
    n, classes = SIZES[name]
    if name == "digits":
        n_test, n_val = _digits_holdouts(n, p)
        return n - n_test - n_val, classes
    return n - int(p["val_size"]), classes


def check_train_size(
    name: str, size: int, images: int, classes: int, key: str = "train.train_size"
) -> None:
    """Raise a one-line KdbenchError unless a subset of ``size`` of ``name``'s training split of
    ``images`` images can hold every one of its ``classes`` classes."""
    if not classes <= size <= images:
        raise KdbenchError(
            f"{key} must be in {classes}..{images} for {name} (its training split has {images} "
            f"images of {classes} classes), got {size}"
        )


def load_dataset(name: str, **overrides: Any) -> Dataset:
    """Load dataset ``name`` with its train / validation / test split (see :data:`DEFAULTS`)."""
    p = dataset_params(name, overrides)
    if name == "digits":
        ds = _load_digits(p)
    elif name == "fashion_mnist":
        ds = _load_fashion_mnist(p)
    else:
        ds = _load_cifar(name, p)
    ds.crop_padding = int(p["crop_padding"])
    ds.flip = bool(p["flip"])
    ds.info["split_seed"] = int(p["split_seed"])
    return ds


def _stratified_indices(
    labels: np.ndarray, holdout: int, seed: int | list[int]
) -> tuple[np.ndarray, np.ndarray]:
    """Split ``range(len(labels))`` into (keep, holdout) with ``holdout`` items, stratified.

    Each class gives its share of ``holdout`` (largest remainders round), drawn by a generator
    seeded with ``seed``; both index arrays come back sorted.
    """
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * holdout / len(labels)
    take = np.floor(exact).astype(np.int64)
    take[np.argsort(take - exact, kind="stable")[: holdout - int(take.sum())]] += 1
    held = np.sort(
        np.concatenate(
            [
                rng.permutation(np.flatnonzero(labels == c))[:k]
                for c, k in zip(classes, take, strict=True)
            ]
        )
    )
    return np.setdiff1d(np.arange(len(labels)), held), held


def _nested_order(labels: np.ndarray, seed: int | list[int]) -> np.ndarray:
    """An order of ``range(len(labels))`` whose every prefix is stratified: one image of each
    class first (so any prefix of at least as many images as classes holds them all), then
    the rest of them interleaved by class, the j-th image of a class of n_c images at
    (j + 1/2) / n_c of the way (ties in class order). Each class's images come in an order
    drawn by a generator seeded with ``seed``. A prefix of N images holds about N * n_c / n
    of class c: within one image on the digits split (the tests check every N) and on the
    CIFAR and Fashion-MNIST ones, whose classes are all the same size and so take turns. It
    lies inside every longer prefix, which largest remainders rounding does not promise."""
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    drawn = [rng.permutation(np.flatnonzero(labels == c)) for c in classes]
    index = np.concatenate(drawn)
    rank = np.concatenate([np.arange(n) for n in counts])
    key = np.where(rank == 0, -1.0, (rank + 0.5) / np.repeat(counts, counts))
    klass = np.repeat(np.arange(len(classes)), counts)
    return index[np.lexsort((klass, key))]


def _split(x: Tensor, y: Tensor, idx: np.ndarray) -> Split:
    t = torch.from_numpy(idx)
    return Split(x[t].contiguous(), y[t].contiguous())


def _digits_file() -> Path:
    """scikit-learn's bundled digits table, found without importing scikit-learn (slow)."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise KdbenchError("the digits dataset needs scikit-learn (pip install scikit-learn)")
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz"
    if not path.is_file():
        raise KdbenchError(f"scikit-learn's digits data is missing: {path}")
    return path


def _digits_holdouts(n: int, p: dict[str, Any]) -> tuple[int, int]:
    """(test, validation) images that digits' fractions hold out of its ``n`` images."""
    return round(n * float(p["test_fraction"])), round(n * float(p["val_fraction"]))


def _load_digits(p: dict[str, Any]) -> Dataset:
    table = np.loadtxt(_digits_file(), delimiter=",", dtype=np.float32)
    target = table[:, -1].astype(np.int64)
    images = torch.from_numpy(table[:, :-1].reshape(-1, 1, 8, 8).copy()) / 16.0
    labels = torch.from_numpy(target)
    size = int(p["image_size"])
    if size != images.shape[-1]:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
        images = images.clamp_(0.0, 1.0)
    n = len(labels)
    n_test, n_val = _digits_holdouts(n, p)
    if n_test < 10 or n_val < 10 or n - n_test - n_val < 10:
        raise KdbenchError("data.digits: val_fraction and test_fraction leave a split too small")
    seed = int(p["split_seed"])
    rest, test_idx = _stratified_indices(target, n_test, seed)
    train_rel, val_rel = _stratified_indices(target[rest], n_val, seed)
    train = _split(images, labels, rest[train_rel])
    val = _split(images, labels, rest[val_rel])
    test = _split(images, labels, test_idx)
    mean = (round(float(train.x.mean()), 4),)
    std = (round(float(train.x.std()), 4),)
    return Dataset("digits", train, val, test, 10, mean, std, info={"source": "sklearn"})


def _read_idx(path: Path, magic: int) -> np.ndarray:
    """Read one IDX file (optionally gzipped) with the given magic number."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError) as exc:
        raise KdbenchError(f"cannot read {path}: {exc}") from None
    if len(raw) < 8 or struct.unpack(">I", raw[:4])[0] != magic:
        raise KdbenchError(f"{path} is not an IDX file (bad magic number)")
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    count = int(np.prod(dims))
    offset = 4 + 4 * ndim
    if len(raw) - offset != count:
        raise KdbenchError(
            f"{path} is truncated or corrupt: {len(raw) - offset} bytes, {count} expected"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(dims)


def _find(root: Path, stem: str) -> Path:
    for candidate in (root / f"{stem}.gz", root / stem):
        if candidate.exists():
            return candidate
    raise KdbenchError(
        f"Fashion-MNIST file {stem}.gz not found in {root}: install it with "
        "'apt-get install dataset-fashion-mnist' or set data.fashion_mnist.root"
    )


def _load_fashion_mnist(p: dict[str, Any]) -> Dataset:
    root = Path(p["root"])
    arrays = {}
    for part, prefix in (("train", "train"), ("test", "t10k")):
        images = _read_idx(_find(root, f"{prefix}-images-idx3-ubyte"), 2051)
        labels = _read_idx(_find(root, f"{prefix}-labels-idx1-ubyte"), 2049)
        if len(images) != len(labels):
            raise KdbenchError(
                f"Fashion-MNIST {part}: {len(images)} images but {len(labels)} labels"
            )
        arrays[part] = (images, labels)
    return _with_validation("fashion_mnist", arrays, p, num_classes=10, source=str(root))


def _with_validation(
    name: str,
    arrays: dict[str, tuple[np.ndarray, np.ndarray]],
    p: dict[str, Any],
    num_classes: int,
    source: str,
) -> Dataset:
    """Build a Dataset from uint8 arrays (N×H×W or N×H×W×C), carving validation from train."""

    def to_tensor(images: np.ndarray) -> Tensor:
        t = torch.from_numpy(np.array(images, copy=True, order="C"))
        t = t.unsqueeze(1) if t.ndim == 3 else t.permute(0, 3, 1, 2)
        return t.float().div_(255.0).contiguous()

    train_images, train_labels = arrays["train"]
    val_size = int(p["val_size"])
    if not 0 < val_size < len(train_labels) // 2:
        raise KdbenchError(f"data.{name}.val_size must be in 1..{len(train_labels) // 2 - 1}")
    keep, held = _stratified_indices(train_labels, val_size, int(p["split_seed"]))
    x = to_tensor(train_images)
    y = torch.from_numpy(train_labels.astype(np.int64))
    test = Split(to_tensor(arrays["test"][0]), torch.from_numpy(arrays["test"][1].astype(np.int64)))
    mean, std = NORMALISATION[name]
    return Dataset(
        name,
        _split(x, y, keep),
        _split(x, y, held),
        test,
        num_classes,
        mean,
        std,
        info={"source": source},
    )


_CIFAR = {
    "cifar10": ("cifar-10-batches-py", "cifar-10-python.tar.gz", 10, "CIFAR10"),
    "cifar100": ("cifar-100-python", "cifar-100-python.tar.gz", 100, "CIFAR100"),
}


def _load_cifar(name: str, p: dict[str, Any]) -> Dataset:
    import torchvision

    folder, archive, num_classes, cls_name = _CIFAR[name]
    root = Path(p["root"])
    if not (root / folder).is_dir() and not p["download"]:
        raise KdbenchError(
            f"{cls_name} not found: extract {archive} (python version) into {root}/ so that "
            f"{root / folder} exists, or set data.{name}.download: true"
        )
    cls = getattr(torchvision.datasets, cls_name)
    arrays = {}
    try:
        for part in ("train", "test"):
            ds = cls(root=str(root), train=part == "train", download=bool(p["download"]))
            arrays[part] = (np.asarray(ds.data), np.asarray(ds.targets, dtype=np.int64))
    except (RuntimeError, OSError, EOFError, ValueError) as exc:
        raise KdbenchError(f"{cls_name} under {root} cannot be read: {exc}") from None
    return _with_validation(name, arrays, p, num_classes=num_classes, source=str(root / folder))


def epoch_generator(seed: int, epoch: int, stream: int = 0) -> torch.Generator:
    """A CPU generator determined by (seed, epoch, stream) alone."""
    state = np.random.SeedSequence([int(seed), int(epoch), int(stream)]).generate_state(1)[0]
    return torch.Generator().manual_seed(int(state))


def crop_flip(
    x: Tensor, padding: int, dy: Tensor, dx: Tensor, flip: Tensor, fill: Tensor
) -> Tensor:
    """Padded crop + optional horizontal flip of a batch in one gather.

    Sample ``i`` is the H×W window at offset ``(dy[i], dx[i])`` of ``x[i]`` padded by ``padding``
    pixels of value ``fill`` (one per channel), mirrored left-right where ``flip[i]``.
    """
    n, c, h, w = x.shape
    if padding > 0:
        padded = fill.view(1, c, 1, 1).expand(n, c, h + 2 * padding, w + 2 * padding).clone()
        padded[:, :, padding : padding + h, padding : padding + w] = x
    else:
        padded = x
    ar_h = torch.arange(h, device=x.device)
    ar_w = torch.arange(w, device=x.device)
    rows = dy[:, None] + ar_h[None, :]
    cols = dx[:, None] + torch.where(flip[:, None], (w - 1) - ar_w[None, :], ar_w[None, :])
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    chan = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, chan, rows[:, None, :, None], cols[:, None, None, :]]


class Loader:
    """Batches of one split, resident on ``device`` and normalised once.

    ``train=True`` shuffles and augments per epoch from :func:`epoch_generator`; otherwise the
    split is served in order, unaugmented.
    """

    def __init__(
        self,
        split: Split,
        batch_size: int,
        device: torch.device | str,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        *,
        train: bool = False,
        seed: int = 0,
        crop_padding: int = 0,
        flip: bool = False,
        drop_last: bool = False,
        channels_last: bool = False,
        resident: bool = True,
    ) -> None:
        if batch_size < 1:
            raise KdbenchError(f"batch size must be positive, got {batch_size}")
        self.device = torch.device(device)
        #: where the split lives and is augmented: the training device (``resident``), else the
        #: host, each batch then copied to the device
        self.storage = self.device if resident else torch.device("cpu")
        m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.x = ((split.x - m) / s).to(self.storage)
        self.y = split.y.to(self.storage)
        #: the value of a black (zero) pixel after normalisation: what padding fills in
        self.fill = (-m / s).flatten().to(self.storage)
        self.batch_size = batch_size
        self.train = train
        self.seed = seed
        self.crop_padding = crop_padding if train else 0
        self.flip = flip and train
        self.drop_last = drop_last and train
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __len__(self) -> int:
        n = len(self.y)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    @property
    def num_samples(self) -> int:
        """Samples served per epoch (fewer than the split when the last batch is dropped)."""
        return len(self) * self.batch_size if self.drop_last else len(self.y)

    def epoch(self, epoch: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        n = len(self.y)
        if self.train:
            g = epoch_generator(self.seed, epoch)
            order = torch.randperm(n, generator=g)
            span = 2 * self.crop_padding + 1
            dy = torch.randint(0, span, (n,), generator=g)
            dx = torch.randint(0, span, (n,), generator=g)
            flips = (
                torch.rand(n, generator=g) < 0.5 if self.flip else torch.zeros(n, dtype=torch.bool)
            )
            order, dy, dx, flips = (t.to(self.storage) for t in (order, dy, dx, flips))
        for b in range(len(self)):
            sl = slice(b * self.batch_size, min((b + 1) * self.batch_size, n))
            if self.train:
                idx = order[sl]
                xb = self.x[idx]
                if self.crop_padding or self.flip:
                    xb = crop_flip(xb, self.crop_padding, dy[sl], dx[sl], flips[sl], self.fill)
                yb = self.y[idx]
            else:
                xb, yb = self.x[sl], self.y[sl]
            if self.storage != self.device:
                xb = xb.to(self.device, non_blocking=True)
                yb = yb.to(self.device, non_blocking=True)
            yield xb.contiguous(memory_format=self.memory_format), yb
