"""Segment means and masks against plain loops."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import prism_jax as pj
from prism_jax import exchange
from tests import reference


@pytest.mark.parametrize(("l", "cr"), [(7, 1), (7, 3), (8, 4), (5, 8), (12, 5)])
def test_segment_means_equal_a_plain_loop(l, cr, rng):
    a = rng.standard_normal((2, l, 6)).astype(np.float32)
    valid = rng.random((2, l)) > 0.3
    valid[1, :] = False  # an all-padding row: every segment empty
    means, counts = pj.segment_means(jnp.asarray(a), jnp.asarray(valid), cr)
    s = -(-l // cr)
    assert means.shape == (2, s, 6) and counts.shape == (2, s)
    for b in range(2):
        for j in range(s):
            seg = slice(j * cr, min((j + 1) * cr, l))
            c = valid[b, seg].sum()
            assert counts[b, j] == c
            want = a[b, seg][valid[b, seg]].mean(0) if c else np.zeros(6)
            np.testing.assert_allclose(means[b, j], want, atol=1e-6)


def test_means_of_projections_are_projections_of_means(rng):
    """mean(a) W + b equals the mean of the true keys: why sending means is enough."""
    a = rng.standard_normal((1, 9, 5)).astype(np.float32)
    valid = np.array([[1, 1, 0, 1, 1, 1, 0, 0, 1]], bool)
    w, b = rng.standard_normal((5, 4)), rng.standard_normal(4)
    m, _ = pj.segment_means(jnp.asarray(a), jnp.asarray(valid), 3)
    keys = a[0] @ w + b  # the true keys, token by token
    for j in range(3):  # the mean key of each segment's valid tokens, by a plain loop
        rows = [i for i in range(3 * j, 3 * j + 3) if valid[0, i]]
        np.testing.assert_allclose(np.asarray(m[0, j]) @ w + b, keys[rows].mean(0), atol=1e-5)


def test_single_path_masks_padding_and_future():
    valid = jnp.array([[True, True, True, False]])
    ex = exchange.Exchange(pj.Plan(strategy="single"), causal=True)
    remote = exchange.share(ex, exchange.local_view(ex, valid), jnp.zeros((1, 4, 2)))
    mask = remote.mask
    assert remote.bias is None and remote.rows.shape == (1, 0, 2)
    want = np.tril(np.ones((4, 4), bool)) & np.array([True, True, True, False])
    np.testing.assert_array_equal(mask[0, 0], want)


def test_prism_mask_bias_and_collective_per_device():
    """N = 3, L = 4, CR = 3: per device, local keys then 2 x 2 remote means with log counts."""
    n, l, cr = 3, 4, 3
    valid = jnp.array([[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0]], bool)  # device 2: one valid token
    mesh = pj.edge_mesh(n)

    def per_device(a, valid):
        ex = exchange.Exchange(pj.Plan(cr=cr), "edge", n, causal=True)
        _, mask, bias, _ = remote = exchange.share(ex, exchange.local_view(ex, valid), a)
        kv = jnp.concatenate([a, remote.rows], axis=1)
        return kv, mask[:, :, -1:], bias  # mask of the last local query

    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    a = jax.device_put(jnp.arange(12.0).reshape(1, 12, 1), NamedSharding(mesh, P(None, "edge")))
    valid = jax.device_put(valid, NamedSharding(mesh, P()))
    kv, mask, bias = jax.jit(
        jax.shard_map(
            per_device,
            mesh=mesh,
            in_specs=(P(None, "edge"), P()),
            out_specs=(P(None, "edge"), P(None, "edge"), P(None, None, None, "edge")),
        )
    )(a, valid)
    kv = np.asarray(kv).reshape(1, n, l + 4)
    mask = np.asarray(mask).reshape(n, l + 4)
    bias = np.asarray(bias).reshape(n, l + 4)
    # Device 1 (tokens 4..7): remote rows are device 2 (means of [8, 9, 10], [11]) then device 0.
    np.testing.assert_allclose(kv[0, 1, l:], [8, 0, 1, 3])
    np.testing.assert_array_equal(mask[1, l:], [False, False, True, True])  # only device 0
    np.testing.assert_allclose(bias[1, l:], [0, 0, np.log(3), 0])
    # Device 2 sees both earlier devices; its local padding keys are masked.
    np.testing.assert_array_equal(mask[2], [1, 0, 0, 0, 1, 1, 1, 1])
    # Device 0 sees no remote means at all.
    assert not mask[0, l:].any()


def test_segment_means_ignore_nan_and_inf_in_padding():
    a = np.ones((1, 6, 3), np.float32)
    a[0, 4] = np.inf
    a[0, 5] = np.nan
    valid = np.array([[True, True, True, True, False, False]])
    means, counts = pj.segment_means(jnp.asarray(a), jnp.asarray(valid), 3)
    np.testing.assert_array_equal(means, np.ones((1, 2, 3)))
    np.testing.assert_array_equal(counts, [[3, 1]])
    assert counts.dtype == jnp.int32


def test_segment_means_allocate_nothing_for_a_cr_beyond_l(rng):
    a = jnp.asarray(rng.standard_normal((2, 5, 4)), jnp.float32)
    valid = jnp.ones((2, 5), bool)
    for cr in (5, 6, 2**40):
        means, counts = pj.segment_means(a, valid, cr)
        assert means.shape == (2, 1, 4)
        np.testing.assert_allclose(means[:, 0], a.mean(1), atol=1e-6)
    jaxpr = str(jax.make_jaxpr(lambda x: pj.segment_means(x, valid, 2**40))(a))
    assert "1099511627776" not in jaxpr and "f32[2,5,4]" in jaxpr


@pytest.mark.parametrize("wire", ["f32", "bf16", "int8", "int4", "int4h"])
def test_counts_and_stats_travel_exactly_on_every_wire(wire, rng):
    means = jnp.asarray(rng.standard_normal((2, 3, 6)), jnp.float32)
    counts = jnp.asarray([[0, 1, 301], [255, 257, 2**20 + 1]], jnp.int32)
    size = {"f32": 4, "bf16": 2, "int8": 1, "int4": 1, "int4h": 1}[wire]
    carried = {"f32": 6, "bf16": 6, "int8": 6, "int4": 3, "int4h": 3}[wire]  # two a byte
    scales = 0 if wire in ("f32", "bf16") else 2  # a float32 scale per vector, 2 vectors here
    rows = exchange.encode(means, counts, wire=wire, vectors=2)
    assert rows.dtype == exchange.WIRE_DTYPES[wire]
    assert rows.shape[-1] * size == carried * size + 4 * (scales + 1)
    got_means, got_counts, none = exchange.decode(rows, 6, wire=wire, vectors=2)
    np.testing.assert_array_equal(got_counts, counts)
    assert none is None and got_means.dtype == jnp.float32
    if wire == "f32":
        np.testing.assert_array_equal(got_means, means)
    # float32 statistics (the value tilt's) ride in the same 4-byte words, bit for bit
    stats = jnp.asarray(rng.standard_normal((2, 3, 3)) * 1e3, jnp.float32)
    rows = exchange.encode(means, counts, stats, wire=wire, vectors=2)
    assert rows.shape[-1] * size == carried * size + 4 * (scales + 4)
    _, got_counts, got_stats = exchange.decode(rows, 6, wire=wire, vectors=2)
    np.testing.assert_array_equal(got_counts, counts)
    np.testing.assert_array_equal(got_stats, stats)


def _int_reference(x, vectors, levels=127):
    """DESIGN.md 1d in NumPy, vector by vector: (what the receiver uses, q, s); `levels` 127
    for int8, 7 for int4."""
    out, qs, ss = np.zeros_like(x, np.float64), [], []
    for row in np.ndindex(x.shape[:-1]):
        for j, block in enumerate(np.split(x[row].astype(np.float32), vectors)):
            s = np.abs(block).max() / np.float32(levels)  # float32 arithmetic, as the sender's
            s = s if s >= np.finfo(np.float32).tiny else np.float32(1)  # zero or subnormal
            q = np.clip(np.round(block / s), -levels, levels)  # half to even
            w = len(block)
            out[row][j * w : (j + 1) * w] = q * np.float64(s)
            qs.append(q)
            ss.append(s)
    return out, np.array(qs), np.array(ss)


@pytest.mark.parametrize(("wire", "levels"), [("int8", 127), ("int4", 7)])
@pytest.mark.parametrize(
    "case",
    [
        "random",
        "zeros",
        "one value",
        "huge",
        "tiny",
        "smallest normal scale",
        "a half",
        "from bfloat16",
    ],
)
def test_integer_wires_equal_the_numpy_rule(case, wire, levels, rng):
    x = rng.standard_normal((3, 2, 12)).astype(np.float32)
    if case == "zeros":
        x[:] = 0
    if case == "one value":
        x[:] = -3.25
    if case == "huge":
        x *= np.float32(1e37)
    if case == "tiny":
        x = x / np.abs(x).max() * np.float32(levels * 1.1e-38)  # a subnormal scale: zeros
    if case == "smallest normal scale":
        x = x / np.abs(x).max() * np.float32(levels * 1.2e-38)
    if case == "a half":  # values at k + 0.5 steps: round half to even
        x = np.tile(np.float32([levels, -levels, 0.5, 1.5, 2.5, -0.5]), (3, 2, 2))
    if case == "from bfloat16":
        x = np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32))
    q, s = exchange.quantize(jnp.asarray(x), 3, levels)
    _, want_q, want_s = _int_reference(x, 3, levels)
    got_q, got_s = np.asarray(q).reshape(-1, 4), np.asarray(s).reshape(-1)
    # XLA:CPU flushes subnormal inputs to zero: such a value travels as code 0 (int4's
    # smallest normal scale leaves some values subnormal)
    subnormal = ((np.abs(x) < np.finfo(np.float32).tiny) & (x != 0)).reshape(-1, 4)
    assert (got_q[subnormal] == 0).all()
    want_q = np.where(subnormal, 0, want_q.reshape(-1, 4))
    # XLA:CPU's float32 division is within one ulp, not always correctly rounded as NumPy's:
    # a scale may differ in its last bit, and a q within that of a rounding tie by one.
    np.testing.assert_allclose(got_s, want_s, rtol=2**-23, atol=0)
    assert np.abs(got_q - want_q).max() <= 1 and (got_q != want_q).mean() < 0.01
    if case in ("zeros", "a half", "tiny"):  # exact scales (1 for zeros): exactly the rule
        np.testing.assert_array_equal(got_q, want_q)
        np.testing.assert_array_equal(got_s, want_s)
    got = exchange.dequantize(q, s)  # the receiver: q * s in float32
    np.testing.assert_array_equal(np.asarray(got).reshape(-1, 4), got_q * got_s[:, None])
    rows = exchange.encode(jnp.asarray(x), jnp.ones((3, 2), jnp.int32), wire=wire, vectors=3)
    np.testing.assert_array_equal(exchange.decode(rows, 12, wire=wire, vectors=3)[0], got)


@pytest.mark.parametrize("width", [16, 7, 1])
def test_int4_packs_two_codes_a_byte_low_nibble_first(width, rng):
    codes = rng.integers(-8, 8, size=(3, width)).astype(np.int8)
    codes[0, : min(width, 16)] = np.arange(-8, 8)[: min(width, 16)]  # every code, where room
    packed = np.asarray(exchange.pack4(jnp.asarray(codes)))
    assert packed.shape == (3, (width + 1) // 2) and packed.dtype == np.int8
    padded = np.concatenate([codes, np.zeros((3, width % 2), np.int8)], axis=1)
    nibbles = padded.astype(np.uint8) & 0x0F  # two's complement nibbles, as NumPy writes them
    want = (nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)).view(np.int8)
    np.testing.assert_array_equal(packed, want)
    np.testing.assert_array_equal(exchange.unpack4(jnp.asarray(packed), width), codes)


@pytest.mark.parametrize(("width", "vectors"), [(64, 1), (128, 2), (12, 3), (768, 1), (14, 2)])
def test_rotate_is_the_block_hadamard_and_its_own_inverse(width, vectors, rng):
    """int4h's turn: per vector, blocks of the largest power of two dividing its length (64,
    64, 4, 256, 1) times H_b / sqrt(b), against NumPy's Sylvester matrices; applied twice it
    gives the vector back."""
    x = rng.standard_normal((2, 3, width)).astype(np.float32)
    got = np.asarray(exchange.rotate(jnp.asarray(x), vectors))
    turn = reference.hadamard(width // vectors)
    want = np.concatenate([b @ turn for b in np.split(x.astype(np.float64), vectors, -1)], -1)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    back = np.asarray(exchange.rotate(jnp.asarray(got), vectors))
    np.testing.assert_allclose(back, x, rtol=1e-5, atol=1e-5)


def test_int4h_arrives_as_the_numpy_rule_and_spreads_an_outlier(rng):
    """What arrives on int4h is the reference's int4 of the turned vector, turned back; with
    one outlier channel, int4 leaves the others almost nothing and int4h far less error."""
    x = rng.standard_normal((4, 5, 128)).astype(np.float32)
    x[..., 7] *= 40  # an outlier channel, as in a language model's keys
    counts = jnp.ones((4, 5), jnp.int32)
    got = {
        wire: np.asarray(exchange.decode(exchange.encode(jnp.asarray(x), counts, wire=wire,
                                                         vectors=2), 128, wire=wire,
                                         vectors=2)[0])
        for wire in ("int4", "int4h")
    }  # fmt: skip
    want = np.stack([reference._wire(v, "int4h", 2) for v in x.reshape(-1, 128)])
    np.testing.assert_allclose(got["int4h"].reshape(-1, 128), want, rtol=1e-4, atol=1e-4)
    error = {w: np.square(g - x)[..., np.arange(128) != 7].mean() for w, g in got.items()}
    assert error["int4h"] < error["int4"] / 4, error


@pytest.mark.parametrize(
    ("name", "n", "kw"),
    [
        ("llama_lm", 3, dict(cr=2, grouping="tail", sink=1, value_tilt=True, wire="int4h")),
        ("bert_cls", 4, dict(strategy="voltage")),
    ],
)
def test_all_to_all_exchange_equals_the_all_gather(name, n, kw, hf_models, rng):
    """`Plan(transport="all_to_all")`: one all-to-all a layer in place of the all-gather,
    each device's block sent once to every other (the same bytes), the same outputs."""
    from prism_jax import cost
    from tests import tiny

    model = pj.load_pretrained(hf_models(name)[1])
    batch = tiny.random_batch(name, rng, tokens=17)
    mesh, plan = pj.edge_mesh(n), pj.Plan(transport="all_to_all", **kw)
    got = pj.infer(model, batch, mesh=mesh, plan=plan)
    want = pj.infer(model, batch, mesh=mesh, plan=pj.Plan(**kw))
    for key in want:
        np.testing.assert_array_equal(got[key], want[key])
    cfg, shape = model.config, dict(devices=n, seq_len=17, batch=2)
    sent, ops = cost.collective_bytes(cost.lower(cfg, plan, **shape).as_text())
    assert [op for op, _ in ops] == ["all_to_all"] * cfg.depth
    assert sent == cost.bytes_closed_form(cfg, plan, **shape) > 0


def test_gather_puts_every_device_block_in_device_order():
    n = 4
    mesh = pj.edge_mesh(n)
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    x = jnp.arange(n * 6.0).reshape(1, n * 2, 3)  # device p holds rows 2p, 2p + 1
    x = jax.device_put(x, NamedSharding(mesh, P(None, "edge")))

    def per_device(rows):
        out = []
        for transport in ("all_gather", "all_to_all"):
            ex = exchange.Exchange(pj.Plan(cr=2, transport=transport), "edge", n, causal=False)
            local = exchange.local_view(ex, jnp.ones((1, n * 2), bool))
            out.append(exchange.gather(rows, ex, local)[None])
        return tuple(out)

    out = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=P(None, "edge"),
                                out_specs=P("edge")))(x)  # fmt: skip
    want = np.broadcast_to(np.asarray(x).reshape(1, 1, n, 2, 3), (n, 1, n, 2, 3))
    for got in out:
        np.testing.assert_array_equal(np.asarray(got), want)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        (dict(transport="ring"), "unknown transport 'ring'"),
        (dict(strategy="single", transport="all_to_all"), "transport: strategy='single'"),
    ],
)
def test_bad_transport_names_the_field(kw, message):
    import re

    with pytest.raises(pj.PrismError, match=re.escape(message)):
        pj.Plan(**kw)


def test_stream_on_emulated_devices_is_refused(hf_models, rng):
    """The stream needs one process per device (`launch`, `node`; the cluster tests run it)."""
    from tests import tiny

    model = pj.load_pretrained(hf_models("gpt2_lm")[1])
    batch = tiny.random_batch("gpt2_lm", rng, tokens=9)
    with pytest.raises(pj.PrismError, match="transport 'stream' runs on a cluster of one process"):
        pj.infer(model, batch, mesh=pj.edge_mesh(2), plan=pj.Plan(cr=2, transport="stream"))
