"""The model families and the `Model` handle that the rest of the package passes around."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from prism_jax.configs import ModelConfig
from prism_jax.models import bert, gpt2, llama, vit

FAMILIES = {
    "bert": (bert.Bert, bert.prepare),
    "gpt2": (gpt2.GPT2, gpt2.prepare),
    "vit": (vit.ViT, vit.prepare),
    "llama": (llama.Llama, llama.prepare),
}


@dataclasses.dataclass(frozen=True, eq=False)
class Model:
    """A model split for the functional core: static graph, explicit params, preprocessors.

    Attributes:
      config: the family config.
      graphdef: the NNX graph (static; hashable, so compiled programs are cached on it).
      params: the NNX state, passed explicitly into every compiled call.
      tokenizer: a `preprocess.Tokenizer` when the checkpoint has one.
      image_processor: a `preprocess.ImageProcessor` when the checkpoint has one.
      generation: token ids for generation: `bos_token_id`, `eos_token_id` (an int or a
        list), `pad_token_id` (config.json, overridden by generation_config.json).
    """

    config: ModelConfig
    graphdef: Any
    params: Any
    tokenizer: Any = None
    image_processor: Any = None
    generation: dict = dataclasses.field(default_factory=dict)
    # mesh or device -> (the params placed, their copies there). Not an init field, so that
    # `dataclasses.replace(model, params=...)` starts with no placements; each entry also names
    # the params it was made from and is only used for those.
    placed: dict = dataclasses.field(default_factory=dict, init=False, repr=False, compare=False)

    def prepare(self, batch: dict) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """HF batch -> (model inputs with the token axis second, validity `[B, T]`)."""
        return FAMILIES[self.config.family][1](self.config, batch)


def abstract(cfg: ModelConfig) -> Model:
    """The model's graph and parameter shapes, with no parameter memory allocated."""
    cls = FAMILIES[cfg.family][0]
    graphdef, state = nnx.split(nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0))))
    return Model(cfg, graphdef, state)


def init(cfg: ModelConfig, *, seed: int = 0) -> Model:
    """A model with random weights (the presets, tests, training from scratch)."""
    graphdef, state = nnx.split(FAMILIES[cfg.family][0](cfg, rngs=nnx.Rngs(seed)))
    return Model(cfg, graphdef, state)


LAYERS = "encoder.blocks."  # the stacked layers' parameters: `[depth, ...]` each


def flat_params(params) -> dict[str, Any]:
    """Dotted path -> value of every parameter, each layer on its own: a stacked
    `encoder.blocks.X` `[depth, ...]` is listed as `encoder.blocks.{i}.X` (the names the
    checkpoint tables use). Abstract params give `jax.ShapeDtypeStruct`s."""
    out = {}
    for path, variable in nnx.to_flat_state(params):
        name, value = ".".join(map(str, path)), variable.get_value()
        if not name.startswith(LAYERS):
            out[name] = value
            continue
        for i in range(value.shape[0]):
            layer = (
                jax.ShapeDtypeStruct(value.shape[1:], value.dtype)
                if isinstance(value, jax.ShapeDtypeStruct)
                else value[i]
            )
            out[f"{LAYERS}{i}.{name.removeprefix(LAYERS)}"] = layer
    return out


def from_flat(params, values: dict[str, Any], dtype=None) -> Any:
    """`params` (concrete or abstract) with every value taken from `values` (names as
    `flat_params` gives them; the layers' entries are stacked back), cast to `dtype` if given."""

    def value(name: str, shape) -> jax.Array:
        if not name.startswith(LAYERS):
            return jnp.asarray(values[name], dtype)
        rest = name.removeprefix(LAYERS)
        layers = [values[f"{LAYERS}{i}.{rest}"] for i in range(shape[0])]
        return jnp.asarray(np.stack(layers), dtype)

    return nnx.from_flat_state(
        [
            (path, v.replace(value(".".join(map(str, path)), v.get_value().shape)))
            for path, v in nnx.to_flat_state(params)
        ]
    )


def with_classifier(model: Model, num_labels: int, *, seed: int = 0) -> Model:
    """`model` with a fresh classification head of `num_labels` classes (BERT: on the pooler,
    which is initialised too if the checkpoint had none; ViT: on the CLS row). Every
    parameter the model already has is kept."""
    cfg = dataclasses.replace(
        model.config, head="classifier", num_labels=num_labels, pooler=model.config.family == "bert"
    )
    fresh = init(cfg, seed=seed)
    old = {p: v for p, v in nnx.to_flat_state(model.params)}
    state = nnx.from_flat_state(
        [
            (p, old[p] if p in old and old[p].get_value().shape == v.get_value().shape else v)
            for p, v in nnx.to_flat_state(fresh.params)
        ]
    )
    return Model(
        cfg, fresh.graphdef, state, model.tokenizer, model.image_processor, model.generation
    )
