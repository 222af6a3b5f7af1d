"""The attention core (`prism_jax.attention`: dense, blocked, fused) against
`jax.nn.dot_product_attention` with `implementation="xla"` (the exact reference)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prism_jax import attention


def _reference(q, k, v, mask, bias):
    return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, implementation="xla")


CORES = {
    "attend": attention.attend,
    "dense": attention.dense,
    "blocked-3": functools.partial(attention.blocked, block=3),  # odd blocks, last one padded
    "blocked-5": functools.partial(attention.blocked, block=5),
    "blocked-64": functools.partial(attention.blocked, block=64),  # one block longer than M
    "tiled": attention.tiled,
    "fused": attention.fused,  # the GPU path, run here on the CPU
}


def _case(b, l, m, h, g, kind):
    """Queries, keys, values, a mask of `kind` and log-count biases (None for plain masks)."""
    rng = np.random.default_rng(l * m + h)
    k_dim = 8
    q = rng.standard_normal((b, l, h, k_dim)).astype(np.float32)
    keys = rng.standard_normal((b, m, g, k_dim)).astype(np.float32)
    values = rng.standard_normal((b, m, g, k_dim)).astype(np.float32)
    valid = rng.random((b, m)) < 0.8
    valid[:, 0] = True  # every query sees at least one key
    mask = np.broadcast_to(valid[:, None, None, :], (b, 1, l, m)).copy()
    if kind == "causal":
        mask &= np.tril(np.ones((l, m), bool))[None, None]
    if kind == "prism":
        local = np.tril(np.ones((l, l), bool))
        mask[:, :, :, :l] = valid[:, None, None, :l] & local
        mask[:, :, :, l:] = valid[:, None, None, l:] & (np.arange(m - l) < 4)  # earlier devices
    if kind == "one_row":
        mask = mask[:, :, :1]  # one mask row for every query row
    bias = None
    if kind in ("log_count", "prism"):
        counts = rng.integers(1, 9, (b, m))
        bias = np.where(np.arange(m) >= l, np.log(counts), 0).astype(np.float32)[:, None, None]
    return q, keys, values, jnp.asarray(mask), bias


CASES = [
    (2, 13, 13, 4, 4, "padding"),
    (2, 6, 10, 4, 2, "one_row"),
    (3, 7, 7, 6, 2, "causal"),
    (2, 5, 11, 6, 3, "prism"),  # local causal block, then remote means of earlier devices
    (2, 9, 17, 2, 1, "log_count"),
    (3, 1, 21, 4, 2, "decode"),  # one query row against a cache
]


@pytest.mark.parametrize("core", CORES)
@pytest.mark.parametrize(("b", "l", "m", "h", "g", "kind"), CASES)
def test_attention_core_equals_dot_product_attention(core, b, l, m, h, g, kind):
    q, keys, values, mask, bias = _case(b, l, m, h, g, kind)
    got = CORES[core](q, keys, values, mask, bias)
    want = _reference(q, keys, values, mask, bias)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("core", ["dense", "tiled", "blocked-5"])
@pytest.mark.parametrize(("b", "l", "m", "h", "g", "kind"), CASES)
def test_attention_core_gradients_equal_dot_product_attention(core, b, l, m, h, g, kind):
    """Gradients in queries, keys, values and the log-count bias (`tiled` has its own VJP, the
    others are differentiated by JAX) against the reference's, for a random cotangent."""
    q, keys, values, mask, bias = _case(b, l, m, h, g, kind)
    bias = np.zeros((b, 1, 1, m), np.float32) if bias is None else bias
    cotangent = np.random.default_rng(1).standard_normal(q.shape).astype(np.float32)

    def gradients(fn):
        loss = lambda *args: (fn(*args[:3], mask, args[3]) * cotangent).sum()  # noqa: E731
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(q, keys, values, bias)

    got, want = gradients(CORES[core]), gradients(_reference)
    for name, a, w in zip(("q", "keys", "values", "bias"), got, want, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(w), atol=2e-6, rtol=1e-5, err_msg=name)


def test_tiled_gradients_are_zero_for_rows_that_see_nothing_and_bf16_stays_close():
    """A query row that sees no key has a constant (zero) output: zero gradient, no NaN; keys
    that no row sees get none either. bfloat16 gradients stay near float32's."""
    q, keys, values, mask, _ = _case(2, 6, 9, 4, 2, "causal")
    mask = np.array(mask)
    mask[0, 0, 3] = False  # batch row 0, query row 3: sees nothing
    mask[1, 0, :, 5:] = False  # batch row 1: keys 5.. unseen
    mask = jnp.asarray(mask)

    def gradients(*args):
        loss = lambda q, k, v: attention.tiled(q, k, v, mask).astype(jnp.float32).sum()  # noqa: E731
        return jax.grad(loss, argnums=(0, 1, 2))(*args)

    dq, dk, dv = (np.asarray(x) for x in gradients(q, keys, values))
    assert all(np.all(np.isfinite(x)) for x in (dq, dk, dv))
    assert np.all(dq[0, 3] == 0) and np.any(dq[0, 2] != 0)
    assert np.all(dk[1, 5:] == 0) and np.all(dv[1, 5:] == 0) and np.any(dv[1, :5] != 0)
    half = gradients(*(jnp.asarray(x, jnp.bfloat16) for x in (q, keys, values)))
    for h, f in zip(half, (dq, dk, dv), strict=True):
        assert h.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(h, np.float32), f, atol=0.1, rtol=0.05)


@pytest.mark.parametrize("core", CORES)
def test_a_row_that_sees_nothing_gives_zeros_and_bf16_stays_close(core):
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, 3, 2, 4)).astype(np.float32)
    kv = rng.standard_normal((1, 7, 2, 4)).astype(np.float32)
    mask = np.ones((1, 1, 3, 7), bool)
    mask[0, 0, 1] = False  # query row 1: padding, sees nothing
    mask[0, 0, 2, :3] = False  # row 2 sees nothing in the first blocks of 3
    out = np.asarray(CORES[core](q, kv, kv, jnp.asarray(mask)))
    assert np.all(out[0, 1] == 0) and np.all(np.isfinite(out))
    want = _reference(q, kv, kv, mask, None)
    np.testing.assert_allclose(out[0, [0, 2]], np.asarray(want)[0, [0, 2]], atol=1e-6)
    half = CORES[core](*(jnp.asarray(x, jnp.bfloat16) for x in (q, kv, kv)), jnp.asarray(mask))
    assert half.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(half, np.float32), out, atol=0.05)


def test_attend_goes_tile_by_tile_past_tiled_from(monkeypatch):
    """From `TILED_FROM` keys on `attend` is the tiled map (its jaxpr holds a loop), and equal;
    `loops=False` (what `cost` lowers) stays dense."""
    monkeypatch.setattr(attention, "TILED_FROM", 6)
    rng = np.random.default_rng(1)
    q, kv = (rng.standard_normal((2, 6, 2, 4)).astype(np.float32) for _ in range(2))
    mask = jnp.asarray(np.tril(np.ones((6, 6), bool))[None, None].repeat(2, 0))

    def traced(**kw):  # a fresh function each time: make_jaxpr caches by function
        return str(jax.make_jaxpr(lambda *a: attention.attend(*a, **kw))(q, kv, kv, mask))

    assert "scan" in traced() and "scan" not in traced(loops=False)
    want = _reference(q, kv, kv, mask, None)
    np.testing.assert_allclose(attention.attend(q, kv, kv, mask), want, atol=1e-6)
    monkeypatch.setattr(attention, "TILED_FROM", 7)
    assert "scan" not in traced()


@pytest.mark.parametrize("core", ["attend", "dense", "tiled", "blocked-5"])
def test_values_wider_than_keys_carry_extra_columns_through_the_same_weights(core):
    """Values of Kv != K columns (prism+'s tilt sums ride along that way): each column block
    gets what attention over it alone gives, and so do the gradients."""
    q, keys, values, mask, bias = _case(2, 5, 11, 6, 3, "prism")
    extra = np.random.default_rng(2).standard_normal(values.shape[:3] + (3,)).astype(np.float32)
    wide = np.concatenate([values, extra], axis=-1)
    got = np.asarray(CORES[core](q, keys, wide, mask, bias))
    assert got.shape == q.shape[:3] + (wide.shape[-1],)
    np.testing.assert_allclose(got[..., :8], _reference(q, keys, values, mask, bias), atol=1e-6)
    extra_alone = _reference(q, keys, np.pad(extra, ((0, 0), (0, 0), (0, 0), (0, 5))), mask, bias)
    np.testing.assert_allclose(got[..., 8:], np.asarray(extra_alone)[..., :3], atol=1e-6)

    def loss(fn, v):
        return lambda q, k: (fn(q, k, v, mask, bias)[..., :8] ** 2).sum()

    got_grads = jax.grad(loss(CORES[core], wide), argnums=(0, 1))(q, keys)
    want_grads = jax.grad(loss(_reference, values), argnums=(0, 1))(q, keys)
    for a, w in zip(got_grads, want_grads, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(w), atol=2e-6, rtol=1e-5)
