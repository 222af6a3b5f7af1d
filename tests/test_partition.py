"""The distributed engine: exact at CR = 1, equal to the NumPy reference of DESIGN.md at CR > 1."""

import numpy as np
import pytest

import prism_jax as pj
from tests import reference, tiny
from tests.conftest import ATOL_LAYER, ATOL_MODEL

HEADED = ("bert_cls", "gpt2_lm", "vit_cls")


def _rows(name, batch, x):
    """Compare GPT-2 on its valid tokens only (HF's padded rows attend to nothing useful)."""
    if name.startswith("gpt2"):
        return x[np.asarray(batch["attention_mask"]).astype(bool)]
    return x


def _close(name, batch, got, want, depth):
    np.testing.assert_allclose(
        _rows(name, batch, got["last_hidden_state"]),
        _rows(name, batch, want["last_hidden_state"]),
        atol=ATOL_LAYER * depth,
        rtol=0,
    )
    if "logits" in want:
        logits = got["logits"] if got["logits"].ndim == 2 else _rows(name, batch, got["logits"])
        ref = want["logits"] if want["logits"].ndim == 2 else _rows(name, batch, want["logits"])
        np.testing.assert_allclose(logits, ref, atol=ATOL_MODEL, rtol=0)


def _torch_want(name, torch_model, batch):
    """transformers' outputs: logits, and the last hidden state where HF exposes ours (a ViT
    classifier's last hidden state precedes the final LayerNorm, so only logits there)."""
    ref = tiny.torch_outputs(torch_model, batch)
    want = {"logits": ref["logits"]}
    if not name.startswith("vit"):
        want["last_hidden_state"] = ref["hidden_states"][-1]
    return want


def _close_to_torch(name, batch, got, want, depth):
    if "last_hidden_state" in want:
        _close(name, batch, got, want, depth)
    else:
        np.testing.assert_allclose(got["logits"], want["logits"], atol=ATOL_MODEL, rtol=0)


@pytest.mark.parametrize("name", HEADED)
@pytest.mark.parametrize("n", [1, 2, 3, 4, 8])
def test_cr1_equals_single_and_torch(name, n, hf_models, rng):
    torch_model, directory = hf_models(name)
    model = pj.load_pretrained(directory)
    batch = tiny.random_batch(name, rng)
    single = pj.infer(model, batch)
    want = _torch_want(name, torch_model, batch)
    mesh = pj.edge_mesh(n)
    for strategy in ("voltage", "prism"):
        out = pj.infer(model, batch, mesh=mesh, plan=pj.Plan(strategy=strategy, cr=1))
        _close(name, batch, out, single, model.config.depth)
        _close_to_torch(name, batch, out, want, model.config.depth)


@pytest.mark.parametrize("name", ["bert", "gpt2", "vit"])
def test_base_models_cr1_on_three_devices(name, hf_models, rng):
    torch_model, directory = hf_models(name)
    model = pj.load_pretrained(directory)
    batch = tiny.random_batch(name, rng, tokens=11)
    want = tiny.torch_outputs(torch_model, batch)
    out = pj.infer(model, batch, mesh=pj.edge_mesh(3), plan=pj.Plan(cr=1))
    _close(name, batch, out, want, model.config.depth)
    if "pooler_output" in want:
        np.testing.assert_allclose(out["pooler_output"], want["pooler_output"], atol=ATOL_MODEL)


@pytest.mark.parametrize(
    ("name", "n", "cr"),
    [
        ("bert_cls", 2, 3),
        ("bert_cls", 3, 2),
        ("gpt2_lm", 2, 4),
        ("gpt2_lm", 3, 2),
        ("vit_cls", 4, 5),
        ("vit_cls", 3, 8),
        ("vit", 2, 3),
    ],
)
@pytest.mark.parametrize("logit_bias", ["log_count", "none"])
def test_prism_matches_numpy_reference(name, n, cr, logit_bias, hf_models, rng):
    torch_model, directory = hf_models(name)
    model = pj.load_pretrained(directory)
    batch = tiny.random_batch(name, rng, batch=3, tokens=17)
    plan = pj.Plan(strategy="prism", cr=cr, logit_bias=logit_bias)
    out = pj.infer(model, batch, mesh=pj.edge_mesh(n), plan=plan)
    want = reference.forward(
        torch_model.config, directory, batch, n=n, cr=cr, logit_bias=logit_bias
    )
    _close(name, batch, out, want, model.config.depth)
    # The approximation must really move the outputs, or this test proves nothing.
    exact = pj.infer(model, batch)
    moved = np.abs(_rows(name, batch, out["last_hidden_state"] - exact["last_hidden_state"]))
    assert moved.max() > 1e-2


def test_logit_bias_variants_differ(hf_models, rng):
    _, directory = hf_models("bert_cls")
    model = pj.load_pretrained(directory)
    batch = tiny.random_batch("bert_cls", rng, tokens=20)
    mesh = pj.edge_mesh(2)
    a, b = (
        pj.infer(model, batch, mesh=mesh, plan=pj.Plan(cr=4, logit_bias=v))["logits"]
        for v in ("log_count", "none")
    )
    assert np.abs(a - b).max() > 1e-3


def test_gpt2_device0_tokens_do_not_depend_on_cr(hf_models, rng):
    _, directory = hf_models("gpt2_lm")
    model = pj.load_pretrained(directory)
    batch = tiny.random_batch("gpt2_lm", rng, batch=2, tokens=24)
    batch["attention_mask"][:] = 1
    mesh = pj.edge_mesh(4)  # L = 6: device 0 holds tokens 0..5
    outs = [pj.infer(model, batch, mesh=mesh, plan=pj.Plan(cr=cr))["logits"] for cr in (1, 2, 3, 6)]
    for o in outs[1:]:
        np.testing.assert_allclose(o[:, :6], outs[0][:, :6], atol=ATOL_MODEL, rtol=0)
        assert np.abs(o[:, 6:] - outs[0][:, 6:]).max() > 1e-3  # later devices do change


@pytest.mark.parametrize("strategy", ["voltage", "prism"])
def test_gpt2_is_causal_across_devices(strategy, hf_models, rng):
    """Changing token j changes no output before j, on any device, at any CR."""
    _, directory = hf_models("gpt2_lm")
    model = pj.load_pretrained(directory)
    batch = tiny.random_batch("gpt2_lm", rng, batch=1, tokens=21)
    batch["attention_mask"][:] = 1
    mesh = pj.edge_mesh(3)
    plan = pj.Plan(strategy=strategy, cr=3 if strategy == "prism" else 1)
    base = pj.infer(model, batch, mesh=mesh, plan=plan)["logits"]
    for j in (4, 7, 12, 20):
        changed = {k: v.copy() for k, v in batch.items()}
        changed["input_ids"][0, j] = (changed["input_ids"][0, j] + 1) % 100 + 1
        out = pj.infer(model, changed, mesh=mesh, plan=plan)["logits"]
        np.testing.assert_array_equal(out[:, :j], base[:, :j])
        assert np.abs(out[:, j] - base[:, j]).max() > 0


def test_classifier_reads_cls_on_device0(hf_models, rng):
    """The CLS logits equal the reference even when device 0 holds a single token."""
    torch_model, directory = hf_models("bert_cls")
    model = pj.load_pretrained(directory)
    batch = tiny.random_batch("bert_cls", rng, batch=2, tokens=8)
    out = pj.infer(model, batch, mesh=pj.edge_mesh(8), plan=pj.Plan(cr=1))
    np.testing.assert_allclose(
        out["logits"], tiny.torch_outputs(torch_model, batch)["logits"], atol=ATOL_MODEL
    )


def test_too_many_devices_is_an_error(hf_models, rng):
    _, directory = hf_models("bert")
    model = pj.load_pretrained(directory)
    batch = tiny.random_batch("bert", rng, tokens=5)
    with pytest.raises(pj.PrismError, match="8 devices but only 5 tokens"):
        pj.infer(model, batch, mesh=pj.edge_mesh(8))


def test_edge_mesh_checks_device_count():
    assert pj.edge_mesh(4).shape == {"edge": 4}
    with pytest.raises(pj.PrismError, match="xla_force_host_platform_device_count=9"):
        pj.edge_mesh(9)


def test_replaced_params_are_used_on_a_mesh(hf_models, rng):
    """`dataclasses.replace(model, params=...)` must not run the old weights from a cache."""
    import dataclasses

    import jax

    model = pj.load_pretrained(hf_models("bert_cls")[1])
    batch = tiny.random_batch("bert_cls", rng, tokens=10)
    mesh = pj.edge_mesh(2)
    old = pj.infer(model, batch, mesh=mesh, plan=pj.Plan(cr=2))["logits"]
    new_model = dataclasses.replace(model, params=jax.tree.map(lambda x: 0.5 * x, model.params))
    new = pj.infer(new_model, batch, mesh=mesh, plan=pj.Plan(cr=2))["logits"]
    want = pj.infer(new_model, batch, mesh=mesh, plan=pj.Plan(cr=1))["logits"]
    assert np.abs(new - old).max() > 1e-3
    np.testing.assert_allclose(want, pj.infer(new_model, batch)["logits"], atol=ATOL_MODEL, rtol=0)
    # and the old model still runs its own weights
    np.testing.assert_array_equal(
        pj.infer(model, batch, mesh=mesh, plan=pj.Plan(cr=2))["logits"], old
    )


def test_single_on_a_mesh_is_exact_or_refused(hf_models, rng):
    """`single` through `pj.infer` ignores the mesh; the compiled program refuses a mesh
    rather than run block-diagonal attention."""
    from prism_jax import partition

    model = pj.load_pretrained(hf_models("gpt2_lm")[1])
    batch = tiny.random_batch("gpt2_lm", rng, tokens=12)
    got = pj.infer(model, batch, mesh=pj.edge_mesh(3), plan=pj.Plan(strategy="single"))
    np.testing.assert_array_equal(got["logits"], pj.infer(model, batch)["logits"])
    with pytest.raises(pj.PrismError, match="strategy 'single' runs on one device"):
        partition.program(model.graphdef, model.config, pj.Plan(strategy="single"), pj.edge_mesh(3))


def test_cr_beyond_the_local_length_is_one_segment(hf_models, rng):
    """A CR past L behaves as CR = L and compiles the same program size (no padding to CR)."""
    from prism_jax import cost

    model = pj.load_pretrained(hf_models("bert_cls")[1])
    batch = tiny.random_batch("bert_cls", rng, tokens=12)
    mesh = pj.edge_mesh(2)  # L = 6
    at_l = pj.infer(model, batch, mesh=mesh, plan=pj.Plan(cr=6))["logits"]
    for cr in (7, 10**6, 2**31, 2**63):
        got = pj.infer(model, batch, mesh=mesh, plan=pj.Plan(cr=cr))["logits"]
        np.testing.assert_array_equal(got, at_l)
    huge = cost.measure(model.config, pj.Plan(cr=2**31), devices=2, seq_len=12)
    same = cost.measure(model.config, pj.Plan(cr=6), devices=2, seq_len=12)
    assert huge.bytes_sent == same.bytes_sent == huge.bytes_closed_form
    assert huge.flops == same.flops


def test_bf16_counts_are_exact_and_outputs_near_float32(rng):
    """301 valid tokens in one segment arrive as 301 in bf16 (which holds integers exactly
    only to 256), and a bf16 model stays within bf16 rounding of the float32 one."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from prism_jax import exchange, models
    from prism_jax.configs import BertConfig

    n, l = 2, 320
    valid = np.ones((1, n * l), bool)
    valid[0, 301:l] = False  # device 0: 301 valid tokens
    mesh = pj.edge_mesh(n)

    def per_device(a, valid):
        ex = exchange.Exchange(pj.Plan(cr=l), "edge", n)
        return exchange.share(ex, exchange.local_view(ex, valid), a).bias  # the log-count bias

    a = jnp.asarray(rng.standard_normal((1, n * l, 8)), jnp.bfloat16)
    bias = jax.jit(
        jax.shard_map(
            per_device,
            mesh=mesh,
            in_specs=(P(None, "edge"), P()),
            out_specs=P(None, None, None, "edge"),
        )
    )(jax.device_put(a, NamedSharding(mesh, P(None, "edge"))), valid)
    bias = np.asarray(bias).reshape(n, l + 1)
    assert bias.dtype == np.float32
    np.testing.assert_allclose(np.exp(bias[1, l]), 301, rtol=1e-6)  # device 1 hears 301
    np.testing.assert_allclose(np.exp(bias[0, l]), 320, rtol=1e-6)

    cfg = BertConfig(
        vocab_size=50, width=32, depth=2, heads=4, mlp_width=64, act="gelu", ln_eps=1e-12,
        max_positions=700,
    )  # fmt: skip
    f32 = models.init(cfg)
    bf16 = models.Model(
        cfg, f32.graphdef, jax.tree.map(lambda x: x.astype(jnp.bfloat16), f32.params)
    )
    batch = {"input_ids": rng.integers(0, 50, (1, 640)), "attention_mask": valid.astype(np.int32)}
    for plan in (pj.Plan(cr=400), pj.Plan(cr=8)):
        want = pj.infer(f32, batch, mesh=mesh, plan=plan)["last_hidden_state"]
        got = pj.infer(bf16, batch, mesh=mesh, plan=plan)["last_hidden_state"]
        assert got.dtype == jnp.bfloat16 and np.isfinite(np.asarray(got, np.float32)).all()
        np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=0.1, rtol=0)


@pytest.mark.parametrize("name", ["llama_lm"])  # rotary, GQA, the tilt statistics
def test_scanned_layers_equal_the_unrolled_program(name, hf_models, rng, monkeypatch):
    """The layers run as one `lax.scan` over parameters stacked on a layer axis, attention
    tile by tile (forced here on few keys); the unrolled, dense program `cost` lowers
    (`straight`) computes the same outputs, and only it lets XLA count every layer's FLOPs."""
    import dataclasses

    import jax

    from prism_jax import attention, cost, models
    from prism_jax.partition import place, program, shard_inputs

    monkeypatch.setattr(attention, "TILED_FROM", 2)

    model = pj.load_pretrained(hf_models(name)[1])
    depth = model.config.depth
    kernel = model.params["encoder"]["blocks"]["attn"]["q"]["kernel"]
    assert kernel.shape[0] == depth and depth > 1
    flat = models.flat_params(model.params)  # the checkpoint tables' per-layer names
    assert f"encoder.blocks.{depth - 1}.attn.q.kernel" in flat
    again = models.from_flat(model.params, flat)
    assert all(
        np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(model.params), strict=True)
    )

    # a plan of this test's own, so that no program compiled before the patch is reused
    mesh, plan = pj.edge_mesh(2), dataclasses.replace(pj.Plan.best(2), kmeans_iters=3)
    inputs, valid = model.prepare(tiny.random_batch(name, rng, tokens=12))
    args = (place(model, mesh), *shard_inputs(inputs, valid, mesh))
    scanned = program(model.graphdef, model.config, plan, mesh)
    unrolled = program(model.graphdef, model.config, plan, mesh, straight=True)
    for got, want in zip(
        jax.tree.leaves(scanned(*args)), jax.tree.leaves(unrolled(*args)), strict=True
    ):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=ATOL_LAYER, rtol=0)

    def flops(straight):
        lowered = cost.lower(model.config, plan, devices=2, seq_len=12, straight=straight)
        return cost.compiled_flops(lowered.compile())

    assert flops(False) < 0.8 * flops(True)  # XLA counts the scan's body once


def test_weights_updated_in_place_are_used_on_a_mesh(hf_models, rng):
    """Placed params are cached per mesh for the very arrays they came from: an NNX in-place
    update (`v[...] = ...`) is placed anew, for `infer` and `generate` alike."""
    model = pj.load_pretrained(hf_models("gpt2_lm")[1])
    batch = tiny.random_batch("gpt2_lm", rng, batch=2, tokens=8)
    mesh = pj.edge_mesh(2)
    before = pj.infer(model, batch, mesh=mesh)["logits"]
    pj.generate(model, batch, mesh=mesh, max_new_tokens=2)
    table = model.params["wte"]["embedding"]
    table[...] = table[...] * 2
    exact = pj.infer(model, batch)["logits"]
    assert np.abs(exact - before).max() > 1e-2  # the update changes the model
    np.testing.assert_allclose(pj.infer(model, batch, mesh=mesh)["logits"], exact, atol=ATOL_MODEL)
    np.testing.assert_array_equal(
        pj.generate(model, batch, mesh=mesh, max_new_tokens=4),
        pj.generate(model, batch, max_new_tokens=4),
    )
