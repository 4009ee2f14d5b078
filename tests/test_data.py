import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdbench import data
from kdbench.errors import KdbenchError

FASHION = Path("/usr/share/datasets/fashion-mnist")


def reference_crop(x, padding, dy, dx, flip, fill):
    """One image: pad with the per-channel fill, crop, maybe mirror."""
    c, h, w = x.shape
    padded = fill.view(c, 1, 1).expand(c, h + 2 * padding, w + 2 * padding).clone()
    padded[:, padding : padding + h, padding : padding + w] = x
    out = padded[:, dy : dy + h, dx : dx + w]
    return out.flip(-1) if flip else out


def test_crop_flip_matches_per_image_reference():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 3, 8, 8, generator=g)
    dy = torch.randint(0, 9, (16,), generator=g)
    dx = torch.randint(0, 9, (16,), generator=g)
    flip = torch.rand(16, generator=g) < 0.5
    fill = torch.tensor([-1.0, -2.0, -3.0])
    out = data.crop_flip(x, 4, dy, dx, flip, fill)
    for i in range(16):
        expected = reference_crop(x[i], 4, int(dy[i]), int(dx[i]), bool(flip[i]), fill)
        assert torch.equal(out[i], expected)
    # offset (padding, padding) without flip is the identity
    centre = torch.full((16,), 4)
    same = data.crop_flip(x, 4, centre, centre, torch.zeros(16, dtype=torch.bool), fill)
    assert torch.equal(same, x)


def all_crops(x, padding, fill):
    span = 2 * padding + 1
    return [
        reference_crop(x, padding, dy, dx, flip, fill)
        for dy in range(span)
        for dx in range(span)
        for flip in (False, True)
    ]


def test_loader_batches_are_padded_crops_of_their_source():
    g = torch.Generator().manual_seed(1)
    split = data.Split(torch.rand(37, 3, 6, 6, generator=g), torch.arange(37) % 5)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    loader = data.Loader(split, 8, "cpu", mean, std, train=True, seed=3, crop_padding=2, flip=True)
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    normalised = (split.x - m) / s
    fill = (-m / s).flatten()  # a zero (black) pixel after normalisation
    order = torch.randperm(37, generator=data.epoch_generator(3, 5))
    seen_labels, k, flipped, shifted = [], 0, 0, 0
    for xb, yb in loader.epoch(5):
        for img, label in zip(xb, yb, strict=True):
            src = normalised[order[k]]
            assert label == split.y[order[k]]
            assert any(torch.equal(img, c) for c in all_crops(src, 2, fill))
            flipped += not torch.equal(img, src) and any(
                torch.equal(img, c.flip(-1)) for c in all_crops(src, 2, fill)[::2]
            )
            shifted += not torch.equal(img, src)
            seen_labels.append(int(label))
            k += 1
    assert k == 37 and len(loader) == 5
    assert sorted(seen_labels) == sorted(split.y.tolist())
    assert shifted > 20 and flipped > 5


def test_loader_order_depends_on_seed_and_epoch_only():
    split = data.Split(torch.rand(20, 1, 4, 4), torch.arange(20))
    a = data.Loader(split, 6, "cpu", (0.5,), (0.2,), train=True, seed=7, crop_padding=1)
    b = data.Loader(split, 6, "cpu", (0.5,), (0.2,), train=True, seed=7, crop_padding=1)
    torch.manual_seed(123)  # global RNG must not matter
    ya = torch.cat([y for _, y in a.epoch(2)])
    xb_all = [x for x, _ in b.epoch(2)]
    yb = torch.cat([y for _, y in b.epoch(2)])
    assert torch.equal(ya, yb)
    assert torch.equal(torch.cat(xb_all), torch.cat([x for x, _ in a.epoch(2)]))
    assert not torch.equal(ya, torch.cat([y for _, y in a.epoch(3)]))
    dropped = data.Loader(split, 6, "cpu", (0.5,), (0.2,), train=True, seed=7, drop_last=True)
    assert len(dropped) == 3 and dropped.num_samples == 18
    assert sum(len(y) for _, y in dropped.epoch(0)) == 18


def test_eval_loader_is_in_order_and_unaugmented():
    split = data.Split(torch.rand(10, 1, 4, 4), torch.arange(10))
    loader = data.Loader(split, 4, "cpu", (0.0,), (1.0,), crop_padding=4, flip=True)
    xs, ys = zip(*loader.epoch(), strict=True)
    assert torch.equal(torch.cat(ys), torch.arange(10))
    assert torch.equal(torch.cat(xs), split.x)


def test_digits_split_is_deterministic_stratified_and_disjoint():
    ds = data.load_dataset("digits")
    again = data.load_dataset("digits")
    assert torch.equal(ds.train.x, again.train.x) and torch.equal(ds.test.y, again.test.y)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (1168, 270, 359)
    assert ds.num_classes == 10 and ds.in_channels == 1 and ds.image_size == 16
    assert float(ds.train.x.min()) >= 0.0 and float(ds.train.x.max()) <= 1.0
    for split in (ds.train, ds.val, ds.test):  # stratified: every class present in proportion
        counts = torch.bincount(split.y, minlength=10).float()
        assert counts.min() / counts.max() > 0.8
    flat = [s.x.flatten(1) for s in (ds.train, ds.val, ds.test)]
    assert torch.cdist(flat[0][:200], flat[2]).min() > 0  # no test image among the train ones
    other = data.load_dataset("digits", split_seed=1, image_size=8)
    assert other.image_size == 8 and not torch.equal(other.test.y, ds.test.y)


def test_a_training_subset_is_stratified_the_same_for_every_run_and_leaves_the_rest_whole():
    ds = data.load_dataset("digits")
    sub = ds.with_train_size(300)
    assert (len(sub.train), len(sub.val), len(sub.test)) == (300, 270, 359)
    assert sub.val is ds.val and sub.test is ds.test and sub.mean == ds.mean
    counts = torch.bincount(sub.train.y, minlength=10)
    full = torch.bincount(ds.train.y, minlength=10)
    assert int(counts.sum()) == 300 and (counts - full * 300 / len(ds.train)).abs().max() < 1
    # images of the training split, each once, with their own labels
    pairs = zip(ds.train.x, ds.train.y, strict=True)
    rows = {tuple(x.flatten().tolist()): int(y) for x, y in pairs}
    picked = [tuple(x.flatten().tolist()) for x in sub.train.x]
    assert len(set(picked)) == 300 and [rows[x] for x in picked] == sub.train.y.tolist()
    # the same images from a new load, other ones with another split_seed
    assert torch.equal(data.load_dataset("digits").with_train_size(300).train.x, sub.train.x)
    other = data.load_dataset("digits", split_seed=1).with_train_size(300)
    assert len(other.train) == 300 and not torch.equal(other.train.x, sub.train.x)
    assert sub.summary()["sizes"]["train"] == 300 and sub.summary()["train_size_of"] == 1168
    assert ds.with_train_size(None) is ds and ds.with_train_size(1168) is ds
    # nested: each subset lies inside every larger one, and every one is stratified (each class
    # within one image of its share, none missing)
    index = {tuple(x.flatten().tolist()): i for i, x in enumerate(ds.train.x)}
    assert len(index) == len(ds.train)

    def images(size):
        return {index[tuple(x.flatten().tolist())] for x in ds.with_train_size(size).train.x}

    small, large = images(100), images(101)
    assert len(small) == 100 and small < large < images(300) < images(1000)
    labels, n = ds.train.y.numpy(), len(ds.train)
    order = data._nested_order(labels, [0, 1])
    assert sorted(order.tolist()) == list(range(n)) and set(order[:300].tolist()) == images(300)
    share = np.bincount(labels, minlength=10) / n
    for size in range(10, n + 1):
        counts = np.bincount(labels[order[:size]], minlength=10)
        assert counts.min() >= 1 and np.abs(counts - share * size).max() < 1, size
    # the config's check knows the split's size without loading it
    assert data.train_split_size("digits") == (1168, 10)
    other = data.load_dataset("digits", val_fraction=0.3, test_fraction=0.1)
    assert data.train_split_size("digits", {"val_fraction": 0.3, "test_fraction": 0.1}) == (
        len(other.train),
        10,
    )
    for size in (9, 1169):
        with pytest.raises(KdbenchError, match=r"train_size must be in 10\.\.1168 for digits"):
            ds.with_train_size(size)


def test_fashion_mnist_reads_the_real_idx_files():
    if not FASHION.is_dir():
        if os.environ.get("CI"):
            pytest.fail("CI must install Debian's dataset-fashion-mnist")
        pytest.skip("Fashion-MNIST not installed: apt-get install dataset-fashion-mnist")
    ds = data.load_dataset("fashion_mnist", val_size=5000)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (55000, 5000, 10000)
    assert data.train_split_size("fashion_mnist", {"val_size": 5000}) == (55000, 10)
    assert ds.train.x.shape[1:] == (1, 28, 28) and ds.num_classes == 10
    assert torch.bincount(ds.test.y).tolist() == [1000] * 10
    assert abs(float(ds.train.x.mean()) - 0.2860) < 0.002  # the published mean


def test_idx_reader_rejects_truncated_files(tmp_path):
    for stem, magic, shape in (
        ("train-images-idx3-ubyte", 2051, (3, 2, 2)),
        ("train-labels-idx1-ubyte", 2049, (3,)),
        ("t10k-images-idx3-ubyte", 2051, (2, 2, 2)),
        ("t10k-labels-idx1-ubyte", 2049, (2,)),
    ):
        header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in shape)
        body = bytes(int(torch.tensor(shape).prod()))
        (tmp_path / stem).write_bytes(
            header + body[: -1 if stem.startswith("train-images") else None]
        )
    with pytest.raises(KdbenchError, match="truncated"):
        data.load_dataset("fashion_mnist", root=str(tmp_path), val_size=1)


def test_missing_datasets_say_where_to_put_them(tmp_path):
    with pytest.raises(KdbenchError, match="dataset-fashion-mnist"):
        data.load_dataset("fashion_mnist", root=str(tmp_path))
    with pytest.raises(KdbenchError) as err:
        data.load_dataset("cifar100", root=str(tmp_path / "data"))
    msg = str(err.value)
    assert "cifar-100-python" in msg and "download: true" in msg and "\n" not in msg
    (tmp_path / "data" / "cifar-10-batches-py").mkdir(parents=True)
    with pytest.raises(KdbenchError, match="cannot be read"):
        data.load_dataset("cifar10", root=str(tmp_path / "data"))


def test_unknown_dataset_settings_are_rejected():
    with pytest.raises(KdbenchError, match="unknown key 'size'"):
        data.load_dataset("digits", size=8)
    with pytest.raises(KdbenchError, match="unknown dataset"):
        data.load_dataset("mnist")


def test_interpolation_keeps_digits_recognisable():
    ds = data.load_dataset("digits", image_size=32)
    small = F.avg_pool2d(ds.train.x[:50], 4)
    ref = data.load_dataset("digits", image_size=8).train.x[:50]
    assert torch.corrcoef(torch.stack([small.flatten(), ref.flatten()]))[0, 1] > 0.9
