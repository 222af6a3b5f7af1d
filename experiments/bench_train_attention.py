"""Training through the attention core on the CPU: `tiled` against `dense`, one run.

Command:  .venv/bin/python experiments/bench_train_attention.py          (about 4 minutes, 2 cores)
Smoke:    .venv/bin/python experiments/bench_train_attention.py --smoke  (seconds; run by the tests)

`attend` computes attention tile by tile (`attention.tiled`) from `TILED_FROM` keys on, because
its forward beats `dense` there (`results/profile_attention.md`). Training differentiates it too.
This times, for small models at lengths past `TILED_FROM` (random weights, one device, float32):

- `vit`: the Fashion-MNIST ViT of train_vit.py (64 wide, 4 layers, 2 heads of 32, 197 tokens),
  batch 128, 10 classes;
- `bert`: a MiniLM-sized encoder classifier (384 wide, 6 layers, 12 heads of 32), batch 8 of 256
  tokens, a quarter of half the rows padding;
- `gpt2`: a causal LM (256 wide, 4 layers, 4 heads of 64, a 4,096-token vocabulary so that the
  output layer does not hide the attention), batch 8 of 256 tokens;
- `llama`: the same causal LM with rotary keys and grouped queries (6 heads, 2 KV heads of 32);

each with the attention core as `attend` picks it now (`tiled`, differentiated by its own VJP:
the probabilities recomputed tile by tile from each row's log-sum-exp), as `dense`, and as
`tiled` differentiated by JAX through its `lax.map` (what training ran before the VJP; JAX then
keeps every tile's probabilities for the backward pass). Two programs each: `forward` (the
inference program) and `train step` (cross-entropy, its gradients and an AdamW update).
Times are medians of `--repeats` calls after a first (compiling) one; ratio = time / dense's
(< 1: faster than dense). Every setting compiles afresh (JAX's caches cleared).
Writes experiments/results/bench_train_attention.{json,md}.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import common  # noqa: E402
import numpy as np  # noqa: E402

CORES = ("tiled", "dense", "tiled, autodiff through the map")


@dataclasses.dataclass(frozen=True)
class Config:
    models: tuple[str, ...] = ("vit", "bert", "gpt2", "llama")
    batch: int = 8  # text models; the ViT trains at batch 128 as train_vit.py does
    vit_batch: int = 128
    tokens: int = 256
    repeats: int = 5
    out: str = str(Path(__file__).parent / "results")


SMOKE = Config(models=("vit", "llama"), batch=2, vit_batch=2, tokens=12, repeats=1, out="")


SIZES = {  # width, layers, query heads, KV heads, MLP width of the text models
    "bert": dict(width=384, depth=6, heads=12, kv_heads=12, mlp_width=1536),
    "gpt2": dict(width=256, depth=4, heads=4, kv_heads=4, mlp_width=1024),
    "llama": dict(width=192, depth=4, heads=6, kv_heads=2, mlp_width=512),
}


def model_config(name: str, cfg: Config):
    """The config of model `name` (the smoke: narrow and shallow, same families)."""
    from prism_jax import configs

    smoke = cfg.tokens < 128
    if name == "vit":
        import train_vit

        return train_vit.vit_config(smoke)
    sizes = SIZES[name]
    if smoke:
        sizes = dict(width=16, depth=2, heads=2, kv_heads=1 if name == "llama" else 2, mlp_width=32)
    text = dict(vocab_size=4096, max_positions=max(cfg.tokens, 16), head_dim=None, **sizes)
    if name == "bert":
        preset = configs.PRESETS["bert-base"]()
        return dataclasses.replace(preset, head="classifier", num_labels=2, pooler=True, **text)
    preset = configs.PRESETS["gpt2" if name == "gpt2" else "smollm2-135m"](head="lm")
    return dataclasses.replace(preset, **text)


def batch(model, cfg: Config, rng: np.random.Generator) -> dict:
    """A random HF-style batch for `model` (labels for classifiers)."""
    c = model.config
    if c.family == "vit":
        shape = (cfg.vit_batch, c.channels, c.image_size, c.image_size)
        pixels = rng.standard_normal(shape).astype(np.float32)
        return {"pixel_values": pixels, "labels": rng.integers(0, c.num_labels, cfg.vit_batch)}
    ids = rng.integers(0, c.vocab_size, (cfg.batch, cfg.tokens))
    mask = np.ones_like(ids)
    if c.family == "bert":
        mask[cfg.batch // 2 :, cfg.tokens - cfg.tokens // 4 :] = 0
    out = {"input_ids": ids, "attention_mask": mask}
    if c.head == "classifier":
        out["labels"] = rng.integers(0, c.num_labels, cfg.batch)
    return out


def programs(model, examples: dict):
    """(forward, train step) as jitted callables of the model's params, and their inputs."""
    import jax
    import optax

    from prism_jax import partition
    from prism_jax.plan import Plan
    from prism_jax.training import train

    head = model.config.head
    forward = partition.program(model.graphdef, model.config, Plan(strategy="single"), None)
    inputs, valid = model.prepare({k: v for k, v in examples.items() if k != "labels"})
    if head == "classifier":
        targets, weights = examples["labels"], np.ones(len(examples["labels"]), np.float32)
    else:
        targets, weights = train.next_token_targets(inputs["input_ids"], valid)
    opt = optax.adamw(1e-4)

    def logits(params):
        tokens, cls = forward(params, inputs, valid)
        return (cls if head == "classifier" else tokens)["logits"]

    def step(params, opt_state):
        value, grads = jax.value_and_grad(lambda p: train.loss(head, logits(p), targets, weights))(
            params
        )
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    opt_state, step = opt.init(model.params), jax.jit(step)
    return (
        lambda: jax.block_until_ready(logits(model.params)),
        lambda: jax.block_until_ready(step(model.params, opt_state)),
    )


@contextlib.contextmanager
def core(name: str):
    """`attend` computing attention with core `name`, every compiled program dropped before
    and after (a cached program keeps the core it was traced with)."""
    import jax

    from prism_jax import attention, partition

    saved = attention.TILED_FROM, attention._tiles
    attention.TILED_FROM = 10**9 if name == "dense" else 0
    if name == "tiled, autodiff through the map":
        attention._tiles = lambda *args: attention._tile_forward(*args)[0]
    partition.program.cache_clear()
    jax.clear_caches()
    try:
        yield
    finally:
        attention.TILED_FROM, attention._tiles = saved
        partition.program.cache_clear()
        jax.clear_caches()


def run(cfg: Config) -> list[dict]:
    import jax

    from prism_jax import models
    from prism_jax.evaluation.timing import timed

    rows = []
    for name in cfg.models:
        model = models.init(model_config(name, cfg))
        examples = batch(model, cfg, np.random.default_rng(0))
        for program in ("forward", "train step"):
            seconds, outputs = {}, {}
            for core_name in CORES:
                with core(core_name):
                    forward, step = programs(model, examples)
                    fn = forward if program == "forward" else step
                    _, seconds[core_name] = timed(fn, repeats=cfg.repeats)
                    outputs[core_name] = np.asarray(fn()[-1] if program == "train step" else fn())
            for core_name in CORES:  # the same logits, the same loss
                np.testing.assert_allclose(
                    outputs[core_name], outputs["dense"], rtol=1e-4, atol=1e-5
                )
            for core_name in CORES:
                rows.append(
                    {
                        "model": name,
                        "tokens": int(model.prepare(examples)[1].shape[1]),
                        "program": program,
                        "core": core_name,
                        "ms": seconds[core_name] * 1e3,
                        "ratio": seconds[core_name] / seconds["dense"],
                    }
                )
                print(
                    f"{name:6s} {program:10s} {core_name:32s} {rows[-1]['ms']:9.1f} ms  "
                    f"ratio {rows[-1]['ratio']:.2f}",
                    flush=True,
                )
        jax.clear_caches()
    return rows


def markdown(rows: list[dict], cfg: Config) -> str:
    lines = [
        "# Training through the attention core: `tiled` against `dense` (float32, 2-core CPU)",
        "",
        "`.venv/bin/python experiments/bench_train_attention.py`",
        "",
        f"Medians of {cfg.repeats} calls after a compiling one; ratio = time / dense's (< 1:",
        "faster). `tiled` is what `attend` runs past `TILED_FROM` keys (its own VJP);",
        "`autodiff through the map` is the same forward differentiated by JAX (before the VJP).",
        "",
        "| model | tokens | program | core | ms | ratio to dense |",
        "|---|---:|---|---|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['tokens']} | {r['program']} | {r['core']} | {r['ms']:.1f} | "
            f"{r['ratio']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None):
    from prism_jax.cli.parser import Parser

    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny models, writes nothing")
    parser.add_argument("--repeats", type=common.positive_int, default=Config.repeats)
    args = parser.parse_args(argv)
    cfg = SMOKE if args.smoke else dataclasses.replace(Config(), repeats=args.repeats)
    rows = run(cfg)
    print(markdown(rows, cfg))
    from prism_jax.evaluation import report

    out = Path(cfg.out) if cfg.out else None
    report.save(out, "bench_train_attention", rows, markdown(rows, cfg))


if __name__ == "__main__":
    common.run_script(main)
