"""Datasets by spec string, deterministic held-out splits, class subsets, and a decode cache.

Specs: `cifar10:DIR`, `cifar100:DIR`, `npz:FILE`, `folder:DIR`, `digits`. Images are
uint8 NHWC everywhere; normalization belongs to the model's InputSpec, not here.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from edgecompress.errors import DataError

log = logging.getLogger(__name__)

SPLITS = ("train", "heldout", "test")
HELDOUT_SEED = 20240917
CIFAR_HELDOUT = 5000
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp"}


@dataclass(frozen=True)
class Dataset:
    """One split of a dataset: images (uint8 NHWC), integer labels, class names."""

    x: np.ndarray
    y: np.ndarray
    classes: tuple[str, ...]
    name: str
    split: str
    # For a class subset: the original class numbers, in the order of the new labels.
    source_classes: tuple[int, ...] | None = None

    def __len__(self) -> int:
        return len(self.y)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def take(self, n: int | None, seed: int = 0) -> Dataset:
        """A fixed random subset of n images (all of them when n is None or too large)."""
        if n is None or n >= len(self):
            return self
        index = np.sort(np.random.default_rng(seed).choice(len(self), n, replace=False))
        return replace(self, x=self.x[index], y=self.y[index])


@dataclass(frozen=True)
class _Source:
    """A whole dataset before splitting: train and test arrays (test may be absent)."""

    train: tuple[np.ndarray, np.ndarray] | None
    test: tuple[np.ndarray, np.ndarray] | None
    classes: tuple[str, ...]
    heldout: int  # images carved from train for the held-out split


def _heldout_index(n: int, count: int) -> np.ndarray:
    rng = np.random.default_rng(HELDOUT_SEED)
    return np.sort(rng.permutation(n)[:count])


def _split(source: _Source, split: str, name: str) -> Dataset:
    if split == "test":
        if source.test is None:
            raise DataError(f"{name} has no test split; choose --split train or heldout")
        x, y = source.test
    else:
        if source.train is None:
            raise DataError(
                f"{name} is a single split (the whole file is evaluated as 'test'); "
                f"it has no {split!r} split: give cifar10:DIR or folder:DIR with train/ and test/"
            )
        x, y = source.train
        held = _heldout_index(len(y), source.heldout)
        if split == "heldout":
            x, y = x[held], y[held]
        else:
            keep = np.ones(len(y), bool)
            keep[held] = False
            x, y = x[keep], y[keep]
    return Dataset(x, y, source.classes, name, split)


def _subset(data: Dataset, classes: Sequence[int]) -> Dataset:
    bad = [c for c in classes if not 0 <= c < data.num_classes]
    if bad:
        raise DataError(
            f"--classes {','.join(map(str, bad))} out of range: {data.name} has classes "
            f"0..{data.num_classes - 1}"
        )
    if len(set(classes)) != len(classes) or not classes:
        raise DataError("--classes must list distinct class numbers, e.g. 0,1,5")
    remap = np.full(data.num_classes, -1, np.int64)
    remap[list(classes)] = np.arange(len(classes))
    keep = remap[data.y] >= 0
    names = tuple(data.classes[c] for c in classes)
    return Dataset(data.x[keep], remap[data.y[keep]], names, data.name, data.split, tuple(classes))


# --- loaders: each turns the part after "scheme:" into a _Source -------------------------


def _unpickle(path: Path) -> dict:
    try:
        with path.open("rb") as f:
            raw = pickle.load(f, encoding="bytes")
    except FileNotFoundError:
        raise DataError(f"{path} is missing; is this a CIFAR python-pickle folder?") from None
    except Exception as err:
        raise DataError(f"{path} is not a readable CIFAR pickle ({type(err).__name__}: {err})") from None
    if not isinstance(raw, dict):
        raise DataError(f"{path} does not hold a CIFAR batch dictionary")
    # The original archive loads with bytes keys, the JPEG copy with str keys.
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in raw.items()}


def _pickle_images(entry: dict, path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        data = np.asarray(entry["data"], np.uint8)
        labels = np.asarray(entry[label_key], np.int64)
        x = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    except (KeyError, ValueError) as err:
        raise DataError(f"{path} is a corrupt CIFAR batch ({err})") from None
    if len(x) != len(labels):
        raise DataError(f"{path} has {len(x)} images but {len(labels)} labels")
    return np.ascontiguousarray(x), labels


def _find_batches(root: Path, marker: str, inner: str) -> Path:
    if not root.exists():
        raise DataError(f"data folder {root} does not exist; check the path after the scheme")
    for candidate in (root, root / inner):
        if (candidate / marker).exists():
            return candidate
    raise DataError(f"{root} holds no {marker}; give the folder with the python-pickle files")


def _cifar10(arg: str) -> _Source:
    folder = _find_batches(Path(arg), "data_batch_1", "cifar-10-batches-py")
    parts = [_pickle_images(_unpickle(folder / f"data_batch_{i}"), folder, "labels") for i in range(1, 6)]
    test = _pickle_images(_unpickle(folder / "test_batch"), folder, "labels")
    names = [f"class{i}" for i in range(10)]
    if (folder / "batches.meta").exists():
        meta = _unpickle(folder / "batches.meta")
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta.get("label_names", names)]
    train = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
    return _Source(train, test, tuple(names), CIFAR_HELDOUT)


def _cifar100(arg: str) -> _Source:
    folder = _find_batches(Path(arg), "train", "cifar-100-python")
    train = _pickle_images(_unpickle(folder / "train"), folder, "fine_labels")
    test = _pickle_images(_unpickle(folder / "test"), folder, "fine_labels")
    names = [f"class{i}" for i in range(100)]
    if (folder / "meta").exists():
        meta = _unpickle(folder / "meta")
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta.get("fine_label_names", names)]
    return _Source(train, test, tuple(names), CIFAR_HELDOUT)


def _npz(arg: str) -> _Source:
    path = Path(arg)
    if not path.is_file():
        raise DataError(f"npz file {path} does not exist; check the path after npz:")
    try:
        with np.load(path, allow_pickle=False) as f:
            if "x" not in f or "y" not in f:
                raise DataError(f"{path} must hold arrays 'x' (images) and 'y' (labels); it has {list(f)}")
            x, y = f["x"], f["y"]
    except DataError:
        raise
    except Exception as err:
        raise DataError(f"{path} is not a readable npz file ({type(err).__name__}: {err})") from None
    if x.ndim != 4 or x.dtype != np.uint8:
        raise DataError(f"{path}: 'x' must be uint8 images NHWC or NCHW, got {x.dtype} {x.shape}")
    if x.shape[1] in (1, 3) and x.shape[-1] not in (1, 3):
        x = x.transpose(0, 2, 3, 1)
    y = np.asarray(y).astype(np.int64).reshape(-1)
    if len(y) != len(x):
        raise DataError(f"{path} has {len(x)} images but {len(y)} labels")
    classes = tuple(f"class{i}" for i in range(int(y.max()) + 1 if len(y) else 0))
    return _Source(None, (np.ascontiguousarray(x), y), classes, 0)


def _read_image_folder(folder: Path, classes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image

    images, labels = [], []
    for label, name in enumerate(classes):
        for path in sorted((folder / name).iterdir()):
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                with Image.open(path) as image:
                    images.append(np.asarray(image.convert("RGB")))
            except Exception as err:
                raise DataError(f"cannot read image {path}: {err}") from None
            labels.append(label)
    if not images:
        raise DataError(f"{folder} holds no PNG or JPEG images in its class folders")
    if len({im.shape for im in images}) > 1:
        raise DataError(f"images under {folder} differ in size; resize them to one size first")
    return np.stack(images), np.asarray(labels, np.int64)


def _folder(arg: str) -> _Source:
    root = Path(arg)
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist; give a folder with one sub-folder per class")
    if (root / "train").is_dir() and (root / "test").is_dir():
        classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
        train = _read_image_folder(root / "train", classes)
        test = _read_image_folder(root / "test", classes)
        return _Source(train, test, tuple(classes), max(1, len(train[1]) // 10))
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"{root} has no class sub-folders (one folder of images per class)")
    return _Source(None, _read_image_folder(root, classes), tuple(classes), 0)


def _digits(arg: str) -> _Source:
    """scikit-learn's bundled 8x8 digits, upsampled to 32x32 grey images; fully offline."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = (bunch.images / 16.0 * 255.0).clip(0, 255).astype(np.uint8)
    images = images.repeat(4, axis=1).repeat(4, axis=2)[..., None]  # 8x8 -> 32x32, NHWC
    labels = bunch.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(labels))
    test_index, train_index = np.sort(order[:360]), np.sort(order[360:])
    train = (images[train_index], labels[train_index])
    test = (images[test_index], labels[test_index])
    return _Source(train, test, tuple(str(i) for i in range(10)), 300)


LOADERS: dict[str, Callable[[str], _Source]] = {
    "cifar10": _cifar10,
    "cifar100": _cifar100,
    "npz": _npz,
    "folder": _folder,
    "digits": _digits,
}


def _cache_dir() -> Path:
    home = Path(os.environ.get("EDGECOMPRESS_HOME", Path.home() / ".edgecompress"))
    return home / "cache" / "datasets"


def _cached_source(scheme: str, arg: str) -> _Source:
    """Decoded arrays cached on disk, keyed by the source's path and modification times."""
    if scheme not in ("cifar10", "cifar100", "folder"):
        return LOADERS[scheme](arg)
    root = Path(arg).resolve()
    stamp = ""
    if root.exists():
        stamp = ";".join(
            f"{p.name}:{p.stat().st_mtime_ns}:{p.stat().st_size}" for p in sorted(root.rglob("*"))[:200]
        )
    key = hashlib.sha256(f"{scheme}|{root}|{stamp}".encode()).hexdigest()[:20]
    path = _cache_dir() / f"{scheme}-{key}.npz"
    if path.exists():
        try:
            with np.load(path, allow_pickle=False) as f:
                train = (f["train_x"], f["train_y"]) if "train_x" in f else None
                test = (f["test_x"], f["test_y"]) if "test_x" in f else None
                return _Source(train, test, tuple(f["classes"].tolist()), int(f["heldout"]))
        except Exception:
            log.warning("ignoring unreadable dataset cache %s", path)
    source = LOADERS[scheme](arg)
    arrays: dict[str, np.ndarray] = {
        "classes": np.asarray(source.classes),
        "heldout": np.asarray(source.heldout),
    }
    if source.train is not None:
        arrays["train_x"], arrays["train_y"] = source.train
    if source.test is not None:
        arrays["test_x"], arrays["test_y"] = source.test
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial.npz")
        np.savez(partial, **arrays)
        partial.replace(path)
    except OSError as err:  # a read-only home must not stop anyone from evaluating
        log.warning("cannot cache decoded dataset at %s: %s", path, err)
    return source


@functools.lru_cache(maxsize=4)
def _source(spec: str) -> _Source:
    scheme, _, arg = spec.partition(":")
    if scheme not in LOADERS:
        raise DataError(
            f"unknown dataset scheme {scheme!r} in {spec!r}; use one of: "
            + ", ".join(f"{s}:PATH" if s != "digits" else s for s in LOADERS)
        )
    if scheme != "digits" and not arg:
        raise DataError(f"{spec!r} names no path; write it as {scheme}:PATH")
    return _cached_source(scheme, arg)


def load_dataset(spec: str, split: str = "test", classes: Sequence[int] | None = None) -> Dataset:
    """One split of the dataset named by `spec`, optionally restricted to (remapped) classes."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose one of: {', '.join(SPLITS)}")
    data = _split(_source(spec), split, spec)
    return _subset(data, list(classes)) if classes is not None else data
