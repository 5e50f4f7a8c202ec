"""Fashion-MNIST from the Debian package ``dataset-fashion-mnist`` (never downloaded).

The idx files are read from ``/usr/share/datasets/fashion-mnist`` (override with the
environment variable ``EDGEC_FASHION_MNIST_DIR``)::

    {train,t10k}-images-idx3-ubyte.gz
    {train,t10k}-labels-idx1-ubyte.gz

``load()`` returns images normalised exactly as the committed ``fashion_mnist_cnn.onnx``
expects (``(pixel / 255 - MEAN) / STD``), so its output can be fed straight to the model.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

__all__ = [
    "DEFAULT_DIR",
    "ENV_VAR",
    "MEAN",
    "STD",
    "CLASSES",
    "INPUT_NAME",
    "data_dir",
    "available",
    "load",
    "load_raw",
    "normalize",
    "write_npz",
]

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
ENV_VAR = "EDGEC_FASHION_MNIST_DIR"

# Mean / standard deviation of the 60k training pixels scaled to [0, 1]. The training
# script uses these (through ``load``), so they are part of the model's contract.
MEAN = 0.2860
STD = 0.3530

CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)

# Input name of the committed model (see train_fashion_mnist.py).
INPUT_NAME = "input"

_PREFIX = {"train": "train", "test": "t10k"}
_INSTALL_HINT = "install it with `sudo apt-get install dataset-fashion-mnist`"


def data_dir() -> Path:
    """The folder holding the idx files (``$EDGEC_FASHION_MNIST_DIR`` or the Debian path)."""
    return Path(os.environ.get(ENV_VAR) or DEFAULT_DIR)


def _files(split: str) -> tuple[Path, Path]:
    if split not in _PREFIX:
        raise ValueError(f"split must be 'test' or 'train', not {split!r}")
    d, p = data_dir(), _PREFIX[split]
    return d / f"{p}-images-idx3-ubyte.gz", d / f"{p}-labels-idx1-ubyte.gz"


def available(split: str | None = None) -> bool:
    """True when the idx files of ``split`` (both splits when None) are present."""
    splits = [split] if split is not None else list(_PREFIX)
    return all(f.is_file() for s in splits for f in _files(s))


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    if not path.is_file():
        raise FileNotFoundError(
            f"Fashion-MNIST file {path} not found; {_INSTALL_HINT} "
            f"(or point {ENV_VAR} at a folder holding the idx .gz files)"
        )
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[0:4], "big")
    # idx magic: two zero bytes, type code 0x08 (unsigned byte), number of dimensions.
    if magic >> 8 != 0x08 or (magic & 0xFF) != ndim:
        raise ValueError(f"{path}: not an idx{ndim} ubyte file (magic 0x{magic:08x})")
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    count = int(np.prod(dims))
    if len(data) - offset != count:
        raise ValueError(f"{path}: expected {count} bytes of data, found {len(data) - offset}")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(dims)


def load_raw(split: str = "test") -> tuple[np.ndarray, np.ndarray]:
    """Raw pixels ``uint8 [N, 28, 28]`` and labels ``uint8 [N]``."""
    img_path, lbl_path = _files(split)
    images = _read_idx(img_path, 3)
    labels = _read_idx(lbl_path, 1)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{split}: {images.shape[0]} images but {labels.shape[0]} labels")
    return images, labels


def normalize(pixels: np.ndarray) -> np.ndarray:
    """``uint8 [N, 28, 28]`` (or ``[N, 1, 28, 28]``) -> model input ``float32 [N, 1, 28, 28]``."""
    x = np.asarray(pixels, dtype=np.float32) / np.float32(255.0)
    x = (x - np.float32(MEAN)) / np.float32(STD)
    if x.ndim == 3:
        x = x[:, None, :, :]
    return np.ascontiguousarray(x, dtype=np.float32)


def load(split: str = "test", n: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Images ``float32 [N, 1, 28, 28]`` normalised for the model, labels ``int64 [N]``.

    ``n`` keeps only the first ``n`` examples.
    """
    pixels, labels = load_raw(split)
    if n is not None:
        pixels, labels = pixels[:n], labels[:n]
    return normalize(pixels), labels.astype(np.int64)


def write_npz(path, n: int | None = None, split: str = "test",
              input_name: str = INPUT_NAME) -> Path:
    """Write ``{input_name: images, "labels": labels}`` to ``path`` (first ``n`` examples)."""
    if input_name == "labels":
        raise ValueError("input_name 'labels' clashes with the labels array")
    images, labels = load(split, n=n)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:  # a file object: np.savez would append ".npz" to other names
        np.savez(f, **{input_name: images, "labels": labels})
    return path
