"""Hugging Face checkpoints (and GGUF files) -> prism_jax params, strictly (no torch), and back.

Through the family tables of `tables`: every HF tensor is consumed or listed as ignored, every
parameter is filled, every shape is checked; a mismatch raises `PrismError` naming the keys.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from prism_jax import checks, models
from prism_jax.checkpoints import atomic, gguf, preprocess, safetensors, tables
from prism_jax.checkpoints.tables import ARCHITECTURES, resolve_architecture
from prism_jax.configs import ModelConfig
from prism_jax.errors import PrismError


def convert(cfg: ModelConfig, tensors: dict[str, np.ndarray], dtype=np.float32) -> models.Model:
    """HF tensors -> a `Model` with every parameter filled; raises naming any mismatch."""
    model = models.abstract(cfg)
    shapes = {name: v.shape for name, v in models.flat_params(model.params).items()}
    ignored = [re.compile(p) for p in tables.TABLES[cfg.family][4]]
    values, consumed, mismatched, not_float, not_finite = {}, set(), [], [], []
    for hf_key, ours, transform in tables.entries(cfg, tables.base_prefix(cfg, set(tensors))):
        if hf_key not in tensors or ours not in shapes:
            continue
        consumed.add(hf_key)
        if (
            tensors[hf_key].dtype not in safetensors.FLOAT_DTYPES
        ):  # never cast integers into weights
            not_float.append(f"{hf_key}: {tensors[hf_key].dtype}")
            values[ours] = None  # present, unusable: reported below
            continue
        w = np.asarray(tensors[hf_key], np.float32)
        if not np.isfinite(w).all():
            not_finite.append(hf_key)
        w = transform.load(w)
        want = shapes[ours]
        if w.shape != want:
            mismatched.append(f"{hf_key}: {list(w.shape)} != {list(want)}")
        values[ours] = w
    if cfg.family == "gpt2" or getattr(cfg, "tied", False):
        consumed |= _check_tied_head(tensors, values.get(tables.TIED_TABLE[cfg.family]))
    unused = sorted(k for k in set(tensors) - consumed if not any(p.fullmatch(k) for p in ignored))
    missing = sorted(set(shapes) - set(values))
    problems = [
        (label, items)
        for label, items in (
            ("unused tensors", unused),
            ("missing parameters", missing),
            ("shape mismatches", mismatched),
            ("tensors that are not floating point", not_float),
            ("tensors with NaN or inf", not_finite),
        )
        if items
    ]
    if problems:
        raise PrismError(
            "checkpoint does not fit its config: "
            + "; ".join(f"{label} {_shorten(items)}" for label, items in problems)
        )
    return models.Model(cfg, model.graphdef, models.from_flat(model.params, values, dtype))


def _check_tied_head(tensors: dict, table: np.ndarray | None) -> set[str]:
    """A tied LM head (GPT-2; Llama with `tie_word_embeddings`) is the embedding table: a
    stored copy must equal it."""
    if "lm_head.weight" in tensors and table is not None:
        if not np.array_equal(tensors["lm_head.weight"], table):
            raise PrismError(
                "lm_head.weight differs from the embedding table, but the config ties them"
            )
    return {"lm_head.weight"} & set(tensors)


def _shorten(items: list[str], limit: int = 12) -> str:
    more = f" ... and {len(items) - limit} more" if len(items) > limit else ""
    return "[" + ", ".join(items[:limit]) + "]" + more


def read_config(directory: Path) -> dict:
    """`config.json` of a checkpoint directory, as a dict."""
    path = directory / "config.json"
    if not path.exists():
        raise PrismError(f"no config.json in {directory}")
    return read_config_file(path)


def read_config_file(path: Path) -> dict:
    """A JSON object file of a checkpoint directory, as a dict."""
    try:
        hf = json.loads(path.read_text())
    except OSError as e:  # unreadable (permissions), or a directory where the file should be
        raise PrismError(f"cannot read {path}: {e.strerror or e}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PrismError(f"corrupt {path.name} in {path.parent}: {e}") from None
    if not isinstance(hf, dict):
        raise PrismError(f"corrupt {path.name} in {path.parent}: not a JSON object")
    return hf


def make_config(hf: dict, keys: set[str]) -> ModelConfig:
    """Check an HF config; the head comes from `architectures`, a base model's pooler from
    whether its weights are in the checkpoint."""
    cls, head, pooler = resolve_architecture(hf)
    if pooler is None:
        pooler = any(k.endswith("pooler.dense.weight") for k in keys)
    try:
        return cls.from_hf_config(hf, head=head, pooler=pooler)
    except (KeyError, TypeError) as e:
        raise PrismError(f"config.json lacks or mistypes a field: {e}") from None


def resolve_directory(name: str | os.PathLike) -> Path:
    """A local checkpoint directory, or a hub id fetched through `huggingface_hub`'s cache."""
    path = Path(name)
    if path.is_dir():
        return path
    if path.exists():
        raise PrismError(f"{path} is a file; give the checkpoint directory (or a .gguf file)")
    if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", str(name)):
        raise PrismError(f"no checkpoint directory at {name}")
    import huggingface_hub  # only hub ids need it

    try:
        return Path(
            huggingface_hub.snapshot_download(
                str(name), allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"]
            )
        )
    except Exception as e:  # offline, unknown repo, network: all end the same way for a user
        raise PrismError(
            f"no checkpoint directory at {name}, and it could not be fetched as a hub id "
            f"(offline, or not in the local cache: {type(e).__name__})"
        ) from None


def load_pretrained(name: str | os.PathLike, *, dtype=np.float32) -> models.Model:
    """Load a HF checkpoint (BERT, GPT-2, ViT or Llama; with or without a task head).

    Args:
      name: a directory with `config.json` and `model.safetensors` (or a sharded index),
        a llama.cpp `.gguf` file (dequantized), or a hub id, resolved through
        `huggingface_hub`'s cache (fails clearly offline).
      dtype: parameter dtype, a float type (float32, bfloat16, float16, float64).

    Returns:
      A `Model`, with the directory's tokenizer or image processor when present.
    """
    name, dtype = checks.path("name", name), checks.float_dtype(dtype)
    if str(name).endswith(".gguf"):
        return _load_gguf(Path(name), dtype)
    directory = resolve_directory(name)
    hf = read_config(directory)
    resolve_architecture(hf)  # an unknown architecture is named before any tensor is read
    tensors = safetensors.read_checkpoint_tensors(directory)
    model = convert(make_config(hf, set(tensors)), tensors, dtype)
    generation = generation_ids(hf, getattr(model.config, "vocab_size", None), directory)
    return models.Model(
        model.config,
        model.graphdef,
        model.params,
        tokenizer=preprocess.load_tokenizer(directory),
        image_processor=preprocess.load_image_processor(directory),
        generation=generation,
    )


GENERATION_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def generation_ids(
    hf: dict, vocab: int | None, directory: Path | None = None, *, source: str = ""
) -> dict:
    """bos / eos / pad token ids of config.json (or of the GGUF file `source`), overridden by
    generation_config.json; each checked to be a token of the `vocab`-token vocabulary (any
    id >= 0 for a model without one, a ViT)."""
    found = checked_ids(hf, vocab, source or str((directory or Path()) / "config.json"))
    if directory is not None and (directory / "generation_config.json").exists():
        path = directory / "generation_config.json"
        found |= checked_ids(read_config_file(path), vocab, str(path))
    return found


def checked_ids(values: dict, vocab: int | None, where: str) -> dict:
    """The generation ids among `values` (eos: an int or a list of them); a PrismError
    naming the field and `where` for one that is not a token id below `vocab`."""
    out, limit = {}, vocab if vocab is not None else float("inf")
    for key in GENERATION_IDS:
        value = values.get(key)
        if value is None:
            continue
        listed = key == "eos_token_id" and isinstance(value, list)
        ids = value if listed else [value]
        if not ids or any(type(i) is not int or not 0 <= i < limit for i in ids):  # bools too
            either = " (or a list of them)" if key == "eos_token_id" else ""
            raise PrismError(
                f"{where}: {key} must be a token id in [0, {vocab}){either}, got {value!r}"
            )
        out[key] = value
    return out


def gguf_config(path: str | os.PathLike) -> ModelConfig:
    """The model config of a GGUF file, from its metadata (costing a model needs no weights)."""
    return make_config(gguf.read_config(path), set())


def _load_gguf(path: Path, dtype) -> models.Model:
    contents = gguf.read(path)
    config, tensors = contents["config"], contents["tensors"]
    model = convert(make_config(config, set(tensors)), tensors, dtype)
    generation = generation_ids(config, model.config.vocab_size, source=str(path))
    tok = None
    if contents["tokenizer"] is not None:
        settings = contents["tokenizer_config"]
        tok = preprocess.Tokenizer(
            contents["tokenizer"],
            generation.get("pad_token_id", generation.get("eos_token_id", 0)),
            config["max_position_embeddings"],
            chat_template=settings.get("chat_template"),
            special=preprocess.special_tokens(settings),
        )
    return models.Model(
        model.config, model.graphdef, model.params, tokenizer=tok, generation=generation
    )


def convert_gguf(
    source: str | os.PathLike, directory: str | os.PathLike, *, replace: bool = False
) -> dict:
    """Write a GGUF file as a HF checkpoint directory (config.json, model.safetensors,
    tokenizer.json and tokenizer_config.json with the chat template, generation_config.json)
    that `transformers` and `load_pretrained` both load. The tensors are checked against the
    config (as `load_pretrained` would) before anything is written; the directory is written
    whole or not at all (`atomic`), and one that holds files is refused unless `replace`.

    Returns:
      A summary: the config, the number of parameters, and the tokenizer's fate.
    """
    atomic.check_target(directory, replace=replace)  # before the long read
    contents = gguf.read(source)
    config, tensors = contents["config"], contents["tensors"]
    model = convert(make_config(config, set(tensors)), tensors)  # raises on any mismatch
    generation_ids(config, model.config.vocab_size, source=str(source))
    with atomic.writing(directory, replace=replace) as temp:
        gguf.write_directory(
            contents, temp, lambda t, path: save_file(t, path, metadata={"format": "pt"})
        )
    return {
        "source": str(source),
        "out": str(directory),
        "config": config,
        "parameters": int(sum(t.size for t in tensors.values())),
        "tokenizer": contents["tokenizer_note"] or "tokenizer.json written",
    }


# --- saving: the same tables, run backwards ---------------------------------------------


def hf_config(cfg: ModelConfig) -> dict:
    """The HF `config.json` of a model config: `HF_KEYS`, the table `from_hf_config` reads."""
    arch = next(
        name
        for name, (cls, head, _) in ARCHITECTURES.items()
        if cls is type(cfg) and head == cfg.head
    )
    out = {"architectures": [arch], "model_type": cfg.family}
    out |= {key: getattr(cfg, field) for field, (key, _) in type(cfg).HF_KEYS.items()}
    if cfg.family == "gpt2":
        out["tie_word_embeddings"] = True
    if cfg.family == "bert":
        out["position_embedding_type"] = "absolute"
    if cfg.rope_theta is not None:  # both spellings: transformers 5 and the older one
        out["rope_parameters"] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
        out["rope_theta"] = cfg.rope_theta
    if cfg.head == "classifier":
        out["id2label"] = {str(i): f"LABEL_{i}" for i in range(cfg.num_labels)}
        out["label2id"] = {f"LABEL_{i}": i for i in range(cfg.num_labels)}
    return out


def state_dict(model: models.Model) -> dict[str, np.ndarray]:
    """The model's parameters under HF keys and layouts (float32)."""
    cfg = model.config
    flat = {k: np.asarray(v, np.float32) for k, v in models.flat_params(model.params).items()}
    pieces: dict[str, list[np.ndarray]] = {}
    for hf_key, ours, transform in tables.entries(cfg, tables.base_prefix(cfg)):
        if ours in flat:
            pieces.setdefault(hf_key, []).append(transform.save(flat[ours], cfg))
    return {
        k: np.ascontiguousarray(v[0] if len(v) == 1 else np.concatenate(v, axis=-1))
        for k, v in pieces.items()
    }


def save_pretrained(model: models.Model, directory: str | Path, *, replace: bool = False) -> Path:
    """Write `model` as an HF checkpoint directory, whole or not at all (`atomic`); a
    directory that already holds files is refused unless `replace`. Returns the directory."""
    with atomic.writing(directory, replace=replace) as temp:
        _write_checkpoint(model, temp)
    return Path(directory).absolute()


def _write_checkpoint(model: models.Model, directory: Path) -> None:
    config = hf_config(model.config) | model.generation
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    save_file(state_dict(model), directory / "model.safetensors", metadata={"format": "pt"})
    if model.generation:  # transformers' `generate` reads its stop and pad ids here
        (directory / "generation_config.json").write_text(json.dumps(model.generation, indent=2))
    if model.tokenizer is not None:
        tok = model.tokenizer
        tok.backend.save(str(directory / "tokenizer.json"))
        settings = {
            "pad_token": tok.backend.id_to_token(tok.pad_id),
            "model_max_length": tok.max_length,
            **tok.special,
        }
        if tok.chat_template:
            settings["chat_template"] = tok.chat_template
        (directory / "tokenizer_config.json").write_text(json.dumps(settings, indent=2))
    if model.image_processor is not None:
        p = model.image_processor
        (directory / "preprocessor_config.json").write_text(
            json.dumps(
                {
                    "image_processor_type": "ViTImageProcessor",
                    "do_resize": True,
                    "size": {"height": p.size[0], "width": p.size[1]},
                    "resample": p.resample,
                    "do_rescale": p.rescale is not None,
                    "rescale_factor": p.rescale or 1.0,
                    "do_normalize": p.mean is not None,
                    "image_mean": list(p.mean or (0.5,) * p.channels),
                    "image_std": list(p.std or (0.5,) * p.channels),
                },
                indent=2,
            )
        )
