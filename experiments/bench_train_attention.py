"""Training through the attention core on the CPU: `tiled` against `dense`, one run.

Command:  .venv/bin/python experiments/bench_train_attention.py          (a few minutes, 2 cores)
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
inference program) and `train step` (cross-entropy, its gradients and an AdamW update); and
for the text models a third, `prism+ forward`: prism+ (`Plan.best(16)`, its value tilt's sums
carried through `attend` as extra value columns) on 4 emulated devices, 1,024 tokens (each
device 256 of its own and the others' means), `tiled` against `dense`.
Times are medians of `--repeats` calls after a first (compiling) one; ratio = time / dense's
(< 1: faster than dense). Every setting compiles afresh (JAX's caches cleared).
Writes experiments/results/bench_train_attention.{json,md}.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
)

import common  # noqa: E402
import numpy as np  # noqa: E402

CORES = ("tiled", "dense", "tiled, autodiff through the map")


@dataclasses.dataclass(frozen=True)
class Config:
    models: tuple[str, ...] = ("vit", "bert", "gpt2", "llama")
    batch: int = 8  # text models; the ViT trains at batch 128 as train_vit.py does
    vit_batch: int = 128
    tokens: int = 256
    prism_tokens: int = 1024  # prism+'s forward: a device's own 256 and the others' means
    devices: int = 4
    cr: int = 16
    repeats: int = 5
    smoke: bool = False  # narrow, shallow models of the same families


SMOKE = Config(
    models=("vit", "llama"), batch=2, vit_batch=2, tokens=12, prism_tokens=24, devices=2, cr=2,
    repeats=1, smoke=True,
)  # fmt: skip


SIZES = {  # width, layers, query heads, KV heads, MLP width of the text models
    "bert": dict(width=384, depth=6, heads=12, kv_heads=12, mlp_width=1536),
    "gpt2": dict(width=256, depth=4, heads=4, kv_heads=4, mlp_width=1024),
    "llama": dict(width=192, depth=4, heads=6, kv_heads=2, mlp_width=512),
}


def model_config(name: str, cfg: Config):
    """The config of model `name` (the smoke: narrow and shallow, same families)."""
    from prism_jax import configs

    if name == "vit":
        import train_vit

        return train_vit.vit_config(cfg.smoke)
    sizes = SIZES[name]
    if cfg.smoke:
        sizes = dict(width=16, depth=2, heads=2, kv_heads=1 if name == "llama" else 2, mlp_width=32)
    positions = max(cfg.tokens, cfg.prism_tokens, 16)
    text = dict(vocab_size=4096, max_positions=positions, head_dim=None, **sizes)
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


def program(model, examples: dict, which: str):
    """The `which` ("forward" or "train step") program on `examples`, a jitted callable."""
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

    if which == "forward":
        return lambda: jax.block_until_ready(logits(model.params))
    opt_state, step = opt.init(model.params), jax.jit(step)
    return lambda: jax.block_until_ready(step(model.params, opt_state))[-1:]  # the loss


def prism_forward(model, examples: dict, cfg: Config):
    """prism+ (`Plan.best(cfg.cr)`: groups, salient token, value tilt) on `cfg.devices`
    emulated devices: the jitted program of the model's params, inputs placed on the mesh."""
    import jax

    from prism_jax import partition
    from prism_jax.plan import Plan

    mesh = partition.edge_mesh(cfg.devices)
    fn = partition.program(model.graphdef, model.config, Plan.best(cfg.cr), mesh)
    inputs, valid = model.prepare({k: v for k, v in examples.items() if k != "labels"})
    inputs, valid = partition.shard_inputs(inputs, valid, mesh)
    params = partition.place(model, mesh)
    return lambda: jax.block_until_ready(fn(params, inputs, valid)[0])


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

    rows = []
    for name in cfg.models:
        model = models.init(model_config(name, cfg))
        rng = np.random.default_rng(0)
        examples = batch(model, cfg, rng)
        tokens = int(model.prepare(examples)[1].shape[1])
        for which in ("forward", "train step"):
            make = functools.partial(program, model, examples, which)
            rows += _timed_cores(cfg, name, tokens, which, make, CORES)
        if model.config.family != "vit":  # the ViT's devices hold 50 tokens: never tiled
            long = dataclasses.replace(cfg, tokens=cfg.prism_tokens)
            make = functools.partial(prism_forward, model, batch(model, long, rng), cfg)
            which = f"prism+ forward, N = {cfg.devices}, CR = {cfg.cr}"
            rows += _timed_cores(cfg, name, cfg.prism_tokens, which, make, CORES[:2])
        jax.clear_caches()
    return rows


def _timed_cores(cfg: Config, name: str, tokens: int, program: str, make, cores) -> list[dict]:
    """One row per core: `make()`'s callable timed under each (made afresh per core), its
    outputs checked equal to dense's."""
    import jax

    from prism_jax.evaluation.timing import timed

    seconds, outputs = {}, {}
    for core_name in cores:
        with core(core_name):
            fn = make()
            _, seconds[core_name] = timed(fn, repeats=cfg.repeats)
            outputs[core_name] = [np.asarray(x) for x in jax.tree.leaves(fn())]
    for core_name in cores:  # the same outputs (logits or hidden states, or the step's loss)
        for got, want in zip(outputs[core_name], outputs["dense"], strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    rows = []
    for core_name in cores:
        ratio = seconds[core_name] / seconds["dense"]
        rows.append(dict(model=name, tokens=tokens, program=program, core=core_name,
                         ms=seconds[core_name] * 1e3, ratio=ratio))  # fmt: skip
        print(f"{name:6s} {program:34s} {core_name:32s} {rows[-1]['ms']:9.1f} ms  "
              f"ratio {ratio:.2f}", flush=True)  # fmt: skip
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
        f"prism+ forward: `Plan.best({cfg.cr})` on {cfg.devices} emulated devices (one machine).",
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
    common.timing_main(__doc__, Config(), SMOKE, run, markdown, "bench_train_attention", argv)


if __name__ == "__main__":
    common.run_script(main)
