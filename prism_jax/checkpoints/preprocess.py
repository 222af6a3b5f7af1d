"""Tokenizers and image processors read from a checkpoint directory (HF file formats)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import signal
import threading
import warnings
from pathlib import Path

import numpy as np
import tokenizers
from PIL import Image

from prism_jax.errors import PrismError


@dataclasses.dataclass(frozen=True)
class Tokenizer:
    """A `tokenizers` tokenizer that returns HF-style NumPy batches, right-padded."""

    backend: object  # tokenizers.Tokenizer
    pad_id: int
    max_length: int
    chat_template: str | None = None  # Jinja, as in HF's tokenizer_config.json
    special: dict = dataclasses.field(default_factory=dict)  # bos_token, eos_token, ... names

    def __call__(
        self, texts: list[str], *, max_length: int | None = None, pad_to: int | None = None
    ) -> dict[str, np.ndarray]:
        """Encode, truncate to `max_length` if given, pad to the longest text (or `pad_to`).

        Without `max_length` nothing is truncated (as with HF's default `truncation=False`):
        a text longer than the model's positions is then an error at inference.

        Returns `input_ids`, `attention_mask`, `token_type_ids`, each `[B, T]` int32.
        """
        limit = max_length or None
        encodings = [e for e in self.backend.encode_batch(list(texts))]
        rows = [(e.ids[:limit], e.type_ids[:limit]) for e in encodings]
        t = max(pad_to or 0, max(len(ids) for ids, _ in rows))
        out = {
            k: np.zeros((len(rows), t), np.int32)
            for k in ("input_ids", "attention_mask", "token_type_ids")
        }
        out["input_ids"][:] = self.pad_id
        for i, (ids, types) in enumerate(rows):
            out["input_ids"][i, : len(ids)] = ids
            out["attention_mask"][i, : len(ids)] = 1
            out["token_type_ids"][i, : len(ids)] = types
        return out

    def encode_plain(self, text: str) -> list[int]:
        """Token ids of `text` without special tokens or truncation (for packing LM text)."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        """Text of `ids`, special tokens left out."""
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=True)

    def chat(self, prompt: str) -> str:
        """`prompt` as one user turn of the chat template, ready for the assistant's reply
        (rendered in Jinja's sandbox, as `transformers` renders it)."""
        if not self.chat_template:
            raise PrismError("this model's tokenizer has no chat template")
        try:
            with _time_limit(CHAT_SECONDS):
                return (
                    _chat_environment()
                    .from_string(self.chat_template)
                    .render(
                        messages=[{"role": "user", "content": prompt}],
                        add_generation_prompt=True,
                        **self.special,
                    )
                )
        except Exception as e:  # noqa: BLE001 - a template's own errors are the user's to see
            raise PrismError(f"the chat template failed: {e}") from None


# A chat template renders in milliseconds: one that loops longer than this (nested
# `range(99999)`s) is refused, not waited for.
CHAT_SECONDS = 10.0
CHAT_RANGE = 100_000  # the items all of a render's `range` calls may make together


def _chat_environment():
    """Jinja's sandbox (as `transformers` renders chat templates), with every `range` of one
    render drawing from one budget of `CHAT_RANGE` items."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    left = [CHAT_RANGE]

    def bounded_range(*args):
        items = range(*args)
        left[0] -= len(items)
        if left[0] < 0:
            raise PrismError(f"it loops over more than {CHAT_RANGE:,} range items")
        return items

    env.globals["range"] = bounded_range
    return env


@contextlib.contextmanager
def _time_limit(seconds: float):
    """Raise a PrismError in the block after `seconds` (on the main thread, where signals are
    delivered; elsewhere the block runs unbounded)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def expired(signum, frame):
        raise PrismError(f"it ran for more than {seconds:g} s (a loop without end?)")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text()) if path.exists() else {}
    except OSError as e:
        raise PrismError(f"cannot read {path}: {e.strerror or e}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PrismError(f"corrupt {path.name} in {path.parent}: {e}") from None


def load_tokenizer(directory: Path) -> Tokenizer | None:
    """The directory's `tokenizer.json` (or a WordPiece `vocab.txt`), or None."""
    settings = _json(directory / "tokenizer_config.json")
    config = _json(directory / "config.json")
    try:
        if (directory / "tokenizer.json").exists():
            backend = tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json"))
        elif (directory / "vocab.txt").exists():
            backend = tokenizers.BertWordPieceTokenizer(
                str(directory / "vocab.txt"), lowercase=settings.get("do_lower_case", True)
            )
        else:
            return None
    except Exception as e:  # noqa: BLE001 - the tokenizers library raises plain Exceptions
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise PrismError(f"corrupt tokenizer in {directory}: {first}") from None
    backend.no_padding()
    backend.no_truncation()
    pad = settings.get("pad_token")
    pad = pad.get("content") if isinstance(pad, dict) else pad
    pad_id = backend.token_to_id(pad) if pad else None
    if pad_id is None:
        pad_id = config.get("pad_token_id") or 0
    limit = settings.get("model_max_length", 0)
    positions = config.get("max_position_embeddings") or config.get("n_positions") or 512
    max_length = limit if 0 < limit <= positions else positions
    return Tokenizer(
        backend,
        int(pad_id),
        int(max_length),
        chat_template=settings.get("chat_template"),
        special=special_tokens(settings),
    )


def special_tokens(settings: dict) -> dict:
    """`bos_token`, `eos_token`, ... of a tokenizer_config.json, as plain strings."""
    names = ("bos_token", "eos_token", "unk_token", "pad_token")
    out = {k: settings[k] for k in names if k in settings}
    return {k: v.get("content") if isinstance(v, dict) else v for k, v in out.items()}


@dataclasses.dataclass(frozen=True)
class ImageProcessor:
    """HF `ViTImageProcessor` semantics: RGB, resize, rescale, normalize, `[B, C, H, W]`."""

    size: tuple[int, int]  # (height, width)
    resample: int = 2  # PIL bilinear
    rescale: float | None = 1 / 255
    mean: tuple[float, ...] | None = (0.5, 0.5, 0.5)
    std: tuple[float, ...] | None = (0.5, 0.5, 0.5)
    channels: int = 3  # 1: greyscale (a Fashion-MNIST model), 3: RGB

    def __call__(self, images) -> dict[str, np.ndarray]:
        """PIL images (or paths) -> `{"pixel_values": [B, C, H, W] float32}`."""
        arrays = []
        for image in images:
            if not isinstance(image, Image.Image):
                image = read_image(image)
            image = image.convert("L" if self.channels == 1 else "RGB")
            image = image.resize(self.size[::-1], resample=self.resample)
            arrays.append(np.asarray(image, np.float32).reshape(*self.size, self.channels))
        return {"pixel_values": self.normalize(np.stack(arrays))}

    def normalize(self, pixels: np.ndarray) -> np.ndarray:
        """`[n, H, W, C]` pixels at the model's size -> `[n, C, H, W]` float32, rescaled and
        normalised: the one place pixels are (image files and dataset arrays alike)."""
        x = pixels.astype(np.float32)
        if self.rescale is not None:
            x = x * np.float32(self.rescale)
        if self.mean is not None:
            x = (x - np.float32(self.mean)) / np.float32(self.std)
        return x.transpose(0, 3, 1, 2)


def read_image(path) -> Image.Image:
    """An image file decoded in full, or a PrismError: unreadable, truncated, or larger than
    PIL's decompression-bomb limit (`Image.MAX_IMAGE_PIXELS`, about 89 M pixels)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(path)
            image.load()  # decode now: a truncated file fails here, not later
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        raise PrismError(
            f"image {path} has more than {Image.MAX_IMAGE_PIXELS:,} pixels (a decompression bomb?)"
        ) from None
    except (OSError, ValueError, SyntaxError) as e:
        raise PrismError(f"cannot read image {path}: {e}") from None
    return image


def load_image_processor(directory: Path) -> ImageProcessor | None:
    """The directory's `preprocessor_config.json` as an `ImageProcessor`, or None."""
    cfg = _json(directory / "preprocessor_config.json")
    if not cfg:
        return None
    size = cfg.get("size", 224)
    if isinstance(size, dict):
        size = (
            size.get("height", size.get("shortest_edge")),
            size.get("width", size.get("shortest_edge")),
        )
    elif isinstance(size, int):
        size = (size, size)
    mean = cfg.get("image_mean", (0.5,) * 3)
    return ImageProcessor(
        size=tuple(size),
        channels=1 if len(mean) == 1 else 3,
        resample=cfg.get("resample", 2),
        rescale=cfg.get("rescale_factor", 1 / 255) if cfg.get("do_rescale", True) else None,
        mean=tuple(cfg.get("image_mean", (0.5,) * 3)) if cfg.get("do_normalize", True) else None,
        std=tuple(cfg.get("image_std", (0.5,) * 3)) if cfg.get("do_normalize", True) else None,
    )
