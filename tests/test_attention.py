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


@pytest.mark.parametrize("core", CORES)
@pytest.mark.parametrize(
    ("b", "l", "m", "h", "g", "kind"),
    [
        (2, 13, 13, 4, 4, "padding"),
        (3, 7, 7, 6, 2, "causal"),
        (2, 5, 11, 6, 3, "prism"),  # local causal block, then remote means of earlier devices
        (2, 9, 17, 2, 1, "log_count"),
        (3, 1, 21, 4, 2, "decode"),  # one query row against a cache
    ],
)
def test_attention_core_equals_dot_product_attention(core, b, l, m, h, g, kind):
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
    bias = None
    if kind in ("log_count", "prism"):
        counts = rng.integers(1, 9, (b, m))
        bias = np.where(np.arange(m) >= l, np.log(counts), 0).astype(np.float32)
        bias = bias[:, None, None, :]
    got = CORES[core](q, keys, values, jnp.asarray(mask), None if bias is None else bias)
    want = _reference(q, keys, values, mask, bias)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6, rtol=1e-5)


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
