"""prism-jax: PRISM distributed Transformer inference (arXiv 2507.12145) in JAX/Flax.

Public API (DESIGN.md section 2)::

    import prism_jax as pj
    model = pj.load_pretrained(path)          # HF directory (BERT, GPT-2, ViT, Llama) or .gguf
    mesh = pj.edge_mesh(4)
    out = pj.infer(model, batch, mesh=mesh, plan=pj.Plan(strategy="prism", cr=8))
    ids = pj.generate(model, batch, mesh=mesh, plan=pj.Plan(cr=8), max_new_tokens=32)
    report = pj.measure_cost("bert-base", pj.Plan(cr=128), devices=2, seq_len=256)
    plan = pj.plan_for(model, devices=4, bandwidth="10mbit", latency="5ms")  # plan.devices
"""

from prism_jax import cost
from prism_jax.checkpoints.hf import load_pretrained
from prism_jax.configs import (
    PRESETS,
    BertConfig,
    GPT2Config,
    LlamaConfig,
    ModelConfig,
    Plan,
    ViTConfig,
)
from prism_jax.cost import measure as measure_cost
from prism_jax.errors import PrismError
from prism_jax.exchange import segment_means
from prism_jax.generation import generate
from prism_jax.models import Model, init
from prism_jax.partition import edge_mesh, infer
from prism_jax.planner import plan_for

__all__ = [
    "PRESETS",
    "BertConfig",
    "GPT2Config",
    "LlamaConfig",
    "Model",
    "ModelConfig",
    "Plan",
    "PrismError",
    "ViTConfig",
    "cost",
    "edge_mesh",
    "generate",
    "infer",
    "init",
    "load_pretrained",
    "measure_cost",
    "plan_for",
    "segment_means",
]
