"""`layers.attend` against `jax.nn.dot_product_attention` (the exact reference)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prism_jax import layers


def _reference(q, k, v, mask, bias):
    return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, implementation="xla")


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
def test_attend_equals_dot_product_attention(b, l, m, h, g, kind):
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
    got = layers.attend(q, keys, values, jnp.asarray(mask), None if bias is None else bias)
    want = _reference(q, keys, values, mask, bias)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6, rtol=1e-5)


def test_a_row_that_sees_nothing_gives_zeros_and_bf16_stays_close():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, 3, 2, 4)).astype(np.float32)
    kv = rng.standard_normal((1, 5, 2, 4)).astype(np.float32)
    mask = np.ones((1, 1, 3, 5), bool)
    mask[0, 0, 1] = False  # query row 1: padding, sees nothing
    out = np.asarray(layers.attend(q, kv, kv, jnp.asarray(mask)))
    assert np.all(out[0, 1] == 0) and np.all(np.isfinite(out))
    half = layers.attend(*(jnp.asarray(x, jnp.bfloat16) for x in (q, kv, kv)), jnp.asarray(mask))
    assert half.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(half, np.float32), out, atol=0.05)
