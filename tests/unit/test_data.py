"""Datasets: every scheme, splits, class subsets, and the errors bad data gives."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from PIL import Image

from edgecompress.data import load_dataset
from edgecompress.errors import DataError


def _write_cifar10(root, bytes_keys: bool, per_batch: int = 20):
    rng = np.random.default_rng(0)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)

    def key(k):
        return k.encode() if bytes_keys else k

    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = list(rng.integers(0, 10, per_batch))
        with (folder / name).open("wb") as f:
            pickle.dump({key("data"): data, key("labels"): labels}, f)
    with (folder / "batches.meta").open("wb") as f:
        names = [f"n{i}".encode() if bytes_keys else f"n{i}" for i in range(10)]
        pickle.dump({key("label_names"): names}, f)
    return folder


@pytest.mark.parametrize("bytes_keys", [True, False])
def test_cifar10_pickle_layout_with_bytes_or_str_keys(tmp_path, bytes_keys, monkeypatch):
    monkeypatch.setenv("EDGECOMPRESS_HOME", str(tmp_path / "home"))
    folder = _write_cifar10(tmp_path, bytes_keys)
    with (folder / "test_batch").open("rb") as f:
        raw = pickle.load(f, encoding="bytes")
    raw = {k.decode() if isinstance(k, bytes) else k: v for k, v in raw.items()}
    test = load_dataset(f"cifar10:{tmp_path}", "test")
    assert test.x.shape == (20, 32, 32, 3) and test.x.dtype == np.uint8
    # official layout: 1024 red values, then green, then blue
    assert test.x[3, 0, 1, 0] == raw["data"][3][1]
    assert test.x[3, 0, 0, 2] == raw["data"][3][2048]
    assert list(test.y) == list(raw["labels"])
    assert test.classes[0] == "n0"


def test_cifar100_layout(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGECOMPRESS_HOME", str(tmp_path / "home"))
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for name, n in (("train", 60), ("test", 12)):
        with (folder / name).open("wb") as f:
            pickle.dump(
                {
                    b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                    b"fine_labels": list(rng.integers(0, 100, n)),
                },
                f,
            )
    data = load_dataset(f"cifar100:{tmp_path}", "test")
    assert data.num_classes == 100 and len(data) == 12


def test_heldout_is_carved_from_train_deterministically_and_disjoint():
    train = load_dataset("digits", "train")
    heldout = load_dataset("digits", "heldout")
    test = load_dataset("digits", "test")
    assert len(train) + len(heldout) == 1797 - len(test)
    rows = {row.tobytes() for row in train.x.reshape(len(train), -1)}
    overlap = sum(row.tobytes() in rows for row in heldout.x.reshape(len(heldout), -1))
    # digits has a few duplicate images; the split itself shares no index
    assert overlap < 10
    again = load_dataset("digits", "heldout")
    assert np.array_equal(again.y, heldout.y)


def test_digits_are_upsampled_grey_images():
    test = load_dataset("digits", "test")
    assert test.x.shape[1:] == (32, 32, 1) and test.x.dtype == np.uint8
    assert test.x.max() == 255 and len(set(test.y.tolist())) == 10


def test_class_subset_remaps_labels():
    full = load_dataset("digits", "test")
    sub = load_dataset("digits", "test", classes=[7, 2])
    assert set(sub.y.tolist()) == {0, 1}
    assert len(sub) == int(np.sum((full.y == 7) | (full.y == 2)))
    assert sub.classes == ("7", "2") and sub.source_classes == (7, 2)
    first7 = full.x[full.y == 7][0]
    assert np.array_equal(sub.x[sub.y == 0][0], first7)


@pytest.mark.parametrize("classes", [[0, 10], [-1], [1, 1], []])
def test_bad_class_subsets_are_refused(classes):
    with pytest.raises(DataError, match="classes"):
        load_dataset("digits", "test", classes=classes)


@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
def test_npz_is_one_split_in_either_layout(tmp_path, layout):
    x = np.random.default_rng(0).integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
    stored = x if layout == "nhwc" else x.transpose(0, 3, 1, 2)
    np.savez(tmp_path / "d.npz", x=stored, y=np.arange(6) % 3)
    data = load_dataset(f"npz:{tmp_path / 'd.npz'}")
    assert np.array_equal(data.x, x) and data.num_classes == 3
    with pytest.raises(DataError, match="single split"):
        load_dataset(f"npz:{tmp_path / 'd.npz'}", "heldout")


def test_folder_of_class_folders(tmp_path):
    for label in ("cat", "dog"):
        (tmp_path / label).mkdir()
        for i in range(3):
            Image.fromarray(np.full((8, 8, 3), i * 40, np.uint8)).save(tmp_path / label / f"{i}.png")
    data = load_dataset(f"folder:{tmp_path}")
    assert data.classes == ("cat", "dog") and data.x.shape == (6, 8, 8, 3)
    assert list(data.y) == [0, 0, 0, 1, 1, 1]


@pytest.mark.parametrize(
    "spec, message",
    [
        ("mnist:x", "unknown dataset scheme 'mnist'"),
        ("cifar10:/does/not/exist", "does not exist"),
        ("npz:/does/not/exist.npz", "does not exist"),
        ("cifar10:", "names no path"),
    ],
)
def test_bad_specs_say_what_is_wrong(spec, message):
    with pytest.raises(DataError, match=message):
        load_dataset(spec)


def test_corrupt_files_are_reported(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGECOMPRESS_HOME", str(tmp_path / "home"))
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="not a readable npz"):
        load_dataset(f"npz:{tmp_path / 'bad.npz'}")
    folder = _write_cifar10(tmp_path / "c", bytes_keys=False)
    (folder / "data_batch_3").write_bytes(b"garbage")
    with pytest.raises(DataError, match="not a readable CIFAR pickle"):
        load_dataset(f"cifar10:{tmp_path / 'c'}", "train")


def test_decoded_cifar_is_cached_on_disk(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGECOMPRESS_HOME", str(tmp_path / "home"))
    _write_cifar10(tmp_path / "c", bytes_keys=True)
    first = load_dataset(f"cifar10:{tmp_path / 'c'}", "train")
    cached = list((tmp_path / "home" / "cache" / "datasets").glob("cifar10-*.npz"))
    assert len(cached) == 1
    from edgecompress import data as data_module

    data_module._source.cache_clear()

    def must_not_decode(arg):
        raise AssertionError("decoded again instead of reading the cache")

    monkeypatch.setitem(data_module.LOADERS, "cifar10", must_not_decode)
    second = load_dataset(f"cifar10:{tmp_path / 'c'}", "train")
    assert np.array_equal(first.x, second.x)
