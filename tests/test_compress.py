"""Content-aware groups (DESIGN.md section 1b): the rules one by one, the whole compressor
against the NumPy reference, exactness at CR = 1, bytes, and refusals."""

import re

import jax.numpy as jnp
import numpy as np
import pytest

import prism_jax as pj
from prism_jax import attention, cli, compress, cost, partition
from prism_jax.errors import PrismError
from tests import reference, tiny
from tests.conftest import ATOL_LAYER, ATOL_MODEL


def test_balanced_groups_cover_valid_tokens_evenly():
    rng = np.random.default_rng(0)
    valid = rng.random((20, 17)) < 0.7
    got = np.asarray(compress.balanced(jnp.asarray(valid), 5))
    for row, ids in zip(valid, got, strict=True):
        n = row.sum()
        assert (ids[~row] == -1).all()
        want = [r * 5 // n for r in range(n)]  # floor(rank * V / n), in position order
        assert list(ids[row]) == want
        if n >= 5:
            sizes = np.bincount(ids[row], minlength=5)
            assert sizes.min() >= 1 and sizes.max() - sizes.min() <= 1


def test_salient_token_is_the_farthest_key_and_ties_go_to_the_earliest():
    keys = np.zeros((2, 6, 3), np.float32)
    keys[0, 4] = [5, 0, 0]  # far from the rest
    keys[1, 1] = keys[1, 3] = [2, 2, 0]  # an exact tie: position 1 wins
    valid = np.ones((2, 6), bool)
    valid[0, 5] = False
    keys[0, 5] = [100, 0, 0]  # padding never counts, however far
    got = np.asarray(compress.salient(jnp.asarray(keys), jnp.asarray(valid), 1))
    assert got[0].nonzero()[0].tolist() == [4] and got[1].nonzero()[0].tolist() == [1]


def test_kmeans_keeps_an_emptied_group_empty():
    keys = np.array([[[0.0], [0.1], [0.2], [10.0]]], np.float32)
    groups = np.array([[0, 1, 1, 2]], np.int32)  # group 1 lies between its neighbours
    out = np.asarray(compress.kmeans(jnp.asarray(keys), jnp.asarray(groups), 3, 5))
    assert out[0, 3] == 2 and set(out[0, :3]) <= {0, 1}
    assert (out >= 0).all()


CASES = [
    ("bert_cls", 3, dict(cr=3, grouping="balanced")),
    ("bert_cls", 2, dict(cr=4, grouping="kmeans", salient=1, value_tilt=True)),
    ("gpt2_lm", 4, dict(cr=2, value_tilt=True)),
    ("gpt2_lm", 3, dict(cr=3, grouping="kmeans", salient=1, value_tilt=True)),
    ("vit_cls", 3, dict(cr=2, grouping="balanced", salient=1)),
    ("vit_cls", 2, dict(cr=5, salient=1, grouping="kmeans", kmeans_iters=2)),
    ("llama_lm", 3, dict(cr=3, grouping="kmeans", salient=1)),
    ("llama_lm", 3, dict(cr=3, grouping="kmeans", salient=1, value_tilt=True)),  # rotary tilt
    ("llama_lm", 2, dict(cr=4, value_tilt=True)),
    ("bert_cls", 3, dict(cr=3, grouping="kmeans", salient=1, exchange="kv")),
]


@pytest.mark.parametrize(("name", "n", "kw"), CASES)
def test_compressor_matches_numpy_reference(name, n, kw, hf_models, rng):
    _matches_reference(name, n, kw, hf_models, rng)


SINK_CASES = [  # DESIGN.md 1c; 17 tokens: L = 9 (N = 2), 6 (N = 3), 5 (N = 4)
    ("llama_lm", 2, dict(cr=4, grouping="balanced", sink=2), None),
    ("llama_lm", 3, dict(cr=3, grouping="kmeans", salient=1, sink=3, value_tilt=True), None),
    ("gpt2_lm", 4, dict(cr=2, grouping="balanced", sink=8), None),  # past a device: spans two
    ("gpt2_lm", 3, dict(cr=2, grouping="kmeans", salient=1, sink=4), "left"),  # on a later device
    ("llama_lm", 4, dict(cr=5, grouping="balanced", sink=3), "left, V = 1"),  # one mean
    ("bert_cls", 2, dict(cr=3, grouping="kmeans", sink=1, exchange="kv"), None),
    ("vit_cls", 3, dict(cr=4, grouping="balanced", salient=1, sink=2), None),
    # the tail grouping: finest at each device's last valid token
    ("llama_lm", 2, dict(cr=2, grouping="tail", sink=2), None),
    ("gpt2_lm", 3, dict(cr=2, grouping="tail", sink=3, value_tilt=True), "left"),
    ("llama_lm", 2, dict(cr=3, grouping="tail", salient=1, sink=1, wire="int8"), None),
]


@pytest.mark.parametrize(
    ("n", "groups", "sizes"),
    [(64, 8, [1, 1, 2, 4, 5, 9, 16, 26]), (12, 4, [1, 2, 3, 6]), (9, 3, [2, 2, 5]),
     (5, 8, [1, 1, 1, 1, 1, 0, 0, 0]), (7, 1, [7]), (256, 16, None), (1000, 37, None)],
)  # fmt: skip
def test_tail_groups_grow_backward_from_the_last_token(n, groups, sizes):
    """compress.tail against the rule written out in NumPy (float64): every group non-empty
    while n >= G, sizes non-decreasing backward save for rounding's one-token steps."""
    ids = np.asarray(compress.tail(jnp.ones((1, n), bool), groups))[0]
    got = np.bincount(ids, minlength=groups)[::-1].tolist()  # from the last token back
    ends = [0]
    for j in range(1, groups):
        ends.append(max(ends[-1] + 1, int(np.floor(n ** (j / groups) * (1 + 1e-5)))))
    want = np.diff([*ends[: min(groups, n)], n]).tolist() + [0] * max(0, groups - n)
    assert got == want and sum(got) == n
    if sizes is not None:
        assert got == sizes
    if n >= groups:
        assert min(got) >= 1 and got[-1] == max(got)


@pytest.mark.parametrize(("name", "n", "kw", "padding"), SINK_CASES)
def test_sink_matches_numpy_reference(name, n, kw, padding, hf_models, rng):
    left = padding is not None and padding.startswith("left")
    one = padding is not None and padding.endswith("V = 1")  # no room: the paper's one mean
    _matches_reference(name, n, kw, hf_models, rng, left=left, changes=not one)


WIRE_CASES = [  # DESIGN.md 1d: what arrives is what the NumPy rule sends
    ("llama_lm", 3, dict(cr=1, wire="int8")),  # CR = 1: every token alone, quantized
    ("gpt2_lm", 2, dict(cr=1, wire="bf16")),
    ("bert_cls", 2, dict(cr=2, wire="int8")),
    ("vit_cls", 3, dict(cr=4, wire="int8", exchange="kv")),
    ("gpt2_lm", 3, dict(cr=3, wire="int8", grouping="kmeans", salient=1, sink=2, value_tilt=True)),
    ("llama_lm", 2, dict(cr=4, wire="bf16", grouping="balanced", sink=1, value_tilt=True)),
    ("llama_lm", 3, dict(cr=1, wire="int4")),  # codes in [-7, 7], two a byte
    ("bert_cls", 3, dict(cr=2, wire="int4", grouping="balanced", salient=1)),
    ("llama_lm", 2, dict(cr=3, wire="int4", grouping="tail", sink=2, value_tilt=True)),
    ("llama_lm", 3, dict(cr=1, wire="int4h")),  # int4 of each vector turned by a Hadamard
    ("gpt2_lm", 2, dict(cr=2, wire="int4h", grouping="tail", sink=1, value_tilt=True)),
]


@pytest.mark.parametrize(("name", "n", "kw"), WIRE_CASES)
def test_wire_matches_numpy_reference(name, n, kw, hf_models, rng):
    _matches_reference(name, n, kw, hf_models, rng)


GROUPS_CASES = [  # Plan(groups=V): V groups a device in place of ceil(L / CR)
    ("llama_lm", 3, dict(groups=4, grouping="tail", sink=1, wire="int4h"), True),
    ("bert_cls", 2, dict(groups=3, grouping="kmeans", salient=1, value_tilt=True), True),
    ("gpt2_lm", 2, dict(groups=20, grouping="balanced"), False),  # V = L: every token alone
]


@pytest.mark.parametrize(("name", "n", "kw", "changes"), GROUPS_CASES)
def test_groups_match_numpy_reference(name, n, kw, changes, hf_models, rng):
    _matches_reference(name, n, kw, hf_models, rng, changes=changes)


def test_groups_set_v_and_its_bytes():
    cfg = pj.PRESETS["smollm2-135m"]()
    plan = pj.Plan(groups=53, grouping="tail", sink=1, value_tilt=True, wire="int4h")
    assert plan.segments(128) == 53 and plan.segments(40) == 40
    lowered = cost.lower(cfg, plan, devices=2, seq_len=256, batch=1)
    measured, _ = cost.collective_bytes(lowered.as_text())
    assert (
        measured
        == cost.bytes_closed_form(cfg, plan, devices=2, seq_len=256)
        == (cfg.depth * 53 * (192 + 4 * (1 + 3 + 6)))
    )  # ceil(384 / 2) code bytes, count + 3 tilt words + 6 scales
    assert not plan.lossless and pj.Plan().lossless and pj.Plan(strategy="voltage").lossless
    assert not pj.Plan(wire="int8").lossless and not pj.Plan(cr=2).lossless


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        (dict(groups=4), "groups: the paper's segments are fixed runs"),
        (dict(groups=4, cr=2, grouping="tail"), "cr=2 and groups=4: give one of them"),
        (dict(groups=-1, grouping="tail"), "groups must be an integer in [0, 1048576]"),
        (dict(groups=4, grouping="tail", strategy="voltage"), "grouping, groups set, but"),
        (dict(groups=4, strategy="voltage"), "groups set, but compressor settings apply"),
    ],
)
def test_bad_groups_name_the_field(kw, message):
    with pytest.raises(pj.PrismError, match=re.escape(message)):
        pj.Plan(**kw)


def test_sink_at_cr1_is_exact_and_zero_is_the_plain_plan(hf_models, rng):
    model = pj.load_pretrained(hf_models("llama_lm")[1])
    batch = tiny.random_batch("llama_lm", rng, tokens=11)
    exact = pj.infer(model, batch)["logits"]
    for sink in (1, 3, 20):
        plan = pj.Plan(cr=1, grouping="kmeans", salient=1, sink=sink)
        got = pj.infer(model, batch, mesh=pj.edge_mesh(3), plan=plan)["logits"]
        np.testing.assert_allclose(got, exact, atol=ATOL_MODEL)
    plain = pj.Plan(cr=3, grouping="balanced")
    np.testing.assert_array_equal(
        pj.infer(model, batch, mesh=pj.edge_mesh(2), plan=plain)["logits"],
        pj.infer(
            model, batch, mesh=pj.edge_mesh(2), plan=pj.Plan(cr=3, grouping="balanced", sink=0)
        )["logits"],
    )


@pytest.mark.parametrize(("name", "n", "kw"), [c for c in CASES if c[2].get("value_tilt")])
def test_tilt_through_the_tiled_core_matches_numpy_reference(
    name, n, kw, hf_models, rng, monkeypatch
):
    """The tilt's sums ride through `attend` as extra value columns: on the tiled core too
    (`attend` picks it from `TILED_FROM` keys on; compiled programs keep their core)."""
    monkeypatch.setattr(attention, "TILED_FROM", 1)
    partition.program.cache_clear()
    try:
        _matches_reference(name, n, kw, hf_models, rng)
    finally:
        partition.program.cache_clear()


def _matches_reference(name, n, kw, hf_models, rng, *, left=False, changes=True):
    torch_model, directory = hf_models(name)
    model = pj.load_pretrained(directory)
    batch = tiny.random_batch(name, rng, tokens=17)
    if left:  # left-padded rows: the first valid tokens sit on a later device
        mask = batch["attention_mask"]
        batch["attention_mask"] = mask[:, ::-1].copy()
        batch["position_ids"] = np.maximum(np.cumsum(batch["attention_mask"], 1) - 1, 0)
    plan = pj.Plan(**kw)
    out = pj.infer(model, batch, mesh=pj.edge_mesh(n), plan=plan)["last_hidden_state"]
    want = reference.forward(torch_model.config, directory, batch, n=n, **kw)["last_hidden_state"]
    valid = batch["attention_mask"].astype(bool) if "attention_mask" in batch else ...
    np.testing.assert_allclose(out[valid], want[valid], atol=ATOL_LAYER * model.config.depth)
    paper = pj.infer(model, batch, mesh=pj.edge_mesh(n), plan=pj.Plan(cr=kw.get("cr", 1)))
    moved = np.abs(out - paper["last_hidden_state"])[valid].max()
    assert moved > 1e-3 if changes else moved < ATOL_LAYER * model.config.depth


@pytest.mark.parametrize("name", ["bert_cls", "gpt2_lm"])
def test_best_compressor_is_exact_at_cr1(name, hf_models, rng):
    model = pj.load_pretrained(hf_models(name)[1])
    batch = tiny.random_batch(name, rng, tokens=13)
    exact = pj.infer(model, batch)["last_hidden_state"]
    got = pj.infer(model, batch, mesh=pj.edge_mesh(3), plan=pj.Plan.best(1))["last_hidden_state"]
    valid = batch["attention_mask"].astype(bool)
    np.testing.assert_allclose(got[valid], exact[valid], atol=ATOL_LAYER * model.config.depth)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_tilt_bytes_equal_closed_form(dtype):
    cfg = pj.PRESETS["bert-base"]()
    cfg = type(cfg)(**{**cfg.__dict__, "depth": 2})
    size = 2 if dtype == "bfloat16" else 4
    plan = pj.Plan.best(8, wire="bf16" if size == 2 else "f32")  # bf16 means on the wire
    lowered = cost.lower(cfg, plan, devices=4, seq_len=64, batch=2, dtype=dtype)
    measured = cost.collective_bytes(lowered.as_text())[0]
    want = cost.bytes_closed_form(cfg, plan, devices=4, seq_len=64, batch=2, dtype_bytes=size)
    assert measured == want == 2 * 2 * 2 * (768 * size + 4 + 4)  # D, int32 count, f32 spread


def test_tilt_with_kv_exchange_equals_hidden_where_both_apply(hf_models, rng):
    """Without rotary keys the tilt of K/V means is the same first-order term (the
    rotary tilt of prism_jax/compress.py with no rotation): both exchanges give the same outputs."""
    model = pj.load_pretrained(hf_models("gpt2_lm")[1])
    batch = tiny.random_batch("gpt2_lm", rng, tokens=16)
    mesh, kw = pj.edge_mesh(4), dict(cr=2, grouping="kmeans", salient=1, value_tilt=True)
    hidden = pj.infer(model, batch, mesh=mesh, plan=pj.Plan(exchange="hidden", **kw))
    kv = pj.infer(model, batch, mesh=mesh, plan=pj.Plan(exchange="kv", **kw))
    valid = batch["attention_mask"].astype(bool)
    np.testing.assert_allclose(
        kv["last_hidden_state"][valid], hidden["last_hidden_state"][valid], atol=1e-4
    )


def test_rotary_tilt_bytes_equal_closed_form():
    """A rotary group also sends its mean position and position variance (float32 words)."""
    cfg = pj.PRESETS["smollm2-135m"]()
    cfg = type(cfg)(**{**cfg.__dict__, "depth": 1})
    plan = pj.Plan.best(8, wire="bf16")
    lowered = cost.lower(cfg, plan, devices=2, seq_len=64, batch=1, dtype="bfloat16")
    measured = cost.collective_bytes(lowered.as_text())[0]
    want = cost.bytes_closed_form(cfg, plan, devices=2, seq_len=64, batch=1, dtype_bytes=2)
    assert measured == want == 4 * (cfg.kv_width * 2 + 4 * 4)  # K/V means, count + 3 stats


def test_bad_compressor_settings_are_named(hf_models, rng, capsys):
    for kw, message in (
        (dict(grouping="random"), "unknown grouping"),
        (dict(salient=-1), r"salient must be an integer in \[0, 1\]"),
        (dict(grouping="balanced", salient=100), r"salient must be an integer in \[0, 1\]"),
        (dict(salient=1), "grouping='segments' .* has no room for exact tokens.* salient"),
        (dict(sink=2), "grouping='segments' .* has no room for exact tokens.* sink"),
        (dict(kmeans_iters=0), r"kmeans_iters must be an integer in \[1, 1000\]"),
        (dict(kmeans_iters=2**31), r"kmeans_iters must be an integer in \[1, 1000\]"),
        (dict(value_tilt="yes"), "value_tilt must be True or False"),
    ):
        with pytest.raises(PrismError, match=message):
            pj.Plan(cr=2, **kw)
    directory = str(hf_models("bert_cls")[1])
    base = ["infer", "--model", directory, "--devices", "2", "--cr", "4", "--text", "good tea"]
    assert cli.main([*base, "--compressor", "prism+", "--json"]) == 0
    assert '"grouping": "kmeans"' in capsys.readouterr().out
    for bad in (["--grouping", "random"], ["--salient", "-1"], ["--kmeans-iters", "0"]):
        assert cli.main([*base, *bad]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1, err


COMBOS = [
    dict(grouping="balanced"),
    dict(grouping="kmeans"),
    dict(grouping="balanced", salient=1),
    dict(value_tilt=True),
    dict(grouping="kmeans", salient=1, value_tilt=True),
]


@pytest.mark.parametrize("kw", COMBOS)
def test_every_combination_is_exact_when_every_token_is_its_own_group(kw, hf_models, rng):
    model = pj.load_pretrained(hf_models("gpt2_lm")[1])
    batch = tiny.random_batch("gpt2_lm", rng, tokens=13)
    exact = pj.infer(model, batch)["last_hidden_state"]
    got = pj.infer(model, batch, mesh=pj.edge_mesh(4), plan=pj.Plan(cr=1, **kw))
    valid = batch["attention_mask"].astype(bool)
    np.testing.assert_allclose(
        got["last_hidden_state"][valid], exact[valid], atol=ATOL_LAYER * model.config.depth
    )


@pytest.mark.parametrize("cr", [2, 64])  # 64 >= L: V = 1, one mean per device, no salient
def test_devices_without_valid_tokens_and_a_single_group(cr, hf_models, rng):
    torch_model, directory = hf_models("bert_cls")
    model = pj.load_pretrained(directory)
    batch = tiny.random_batch("bert_cls", rng, batch=3, tokens=20)
    batch["attention_mask"][2, 3:] = 0  # row 2: devices 1..3 hold padding only
    kw = dict(cr=cr, grouping="kmeans", salient=1, value_tilt=True)
    out = pj.infer(model, batch, mesh=pj.edge_mesh(4), plan=pj.Plan(**kw))["last_hidden_state"]
    want = reference.forward(torch_model.config, directory, batch, n=4, **kw)
    np.testing.assert_allclose(
        out, want["last_hidden_state"], atol=ATOL_LAYER * model.config.depth, rtol=0
    )


def test_sink_on_the_command_line(hf_models, capsys):
    directory = str(hf_models("gpt2_lm")[1])
    base = ["infer", "--model", directory, "--devices", "2", "--cr", "4", "--text", "good tea"]
    assert cli.main([*base, "--grouping", "balanced", "--sink", "2", "--json"]) == 0
    assert '"sink": 2' in capsys.readouterr().out
    assert cli.main([*base, "--sink", "2"]) == 2  # the paper's segments have no room for it
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no room for exact tokens" in err


def test_wire_on_the_command_line(hf_models, capsys):
    directory = str(hf_models("bert_cls")[1])
    base = ["infer", "--model", directory, "--devices", "2", "--text", "good tea"]
    for wire in ("int8", "int4", "int4h"):
        assert cli.main([*base, "--cr", "4", "--wire", wire, "--json"]) == 0
        assert f'"wire": "{wire}"' in capsys.readouterr().out
    assert cli.main([*base, "--groups", "3", "--grouping", "tail", "--json"]) == 0
    assert '"groups": 3' in capsys.readouterr().out
    assert cli.main([*base, "--groups", "3", "--grouping", "tail", "--wire", "int4h"]) == 0
    assert "prism V=3 int4h" in capsys.readouterr().out  # not "CR=1": it compresses
    for bad, message in (
        (["--cr", "4", "--wire", "int2"], "invalid choice: 'int2'"),
        (["--strategy", "voltage", "--wire", "int8"], "wire set, but compressor settings"),
        (["--groups", "3"], "groups: the paper's segments are fixed runs"),
        (["--groups", "0", "--grouping", "tail"], "--groups: "),
    ):
        assert cli.main([*base, *bad]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err


def test_best_is_per_model(hf_models, capsys):
    """Plan.best: encoders k-means + salient + tilt; causal LMs the sink + tail + tilt; the
    command line's `--compressor prism+` takes the model's own."""
    lm, encoder = (pj.load_pretrained(hf_models(n)[1]) for n in ("gpt2_lm", "bert_cls"))
    assert pj.Plan.best(8, lm) == pj.Plan(cr=8, grouping="tail", sink=4, value_tilt=True)
    assert pj.Plan.best(8, lm.config, sink=2).sink == 2
    assert pj.Plan.best(8, encoder) == pj.Plan.best(8)
    assert pj.Plan.best(8).grouping == "kmeans" and pj.Plan.best(8).salient == 1
    directory = str(hf_models("gpt2_lm")[1])
    argv = ["infer", "--model", directory, "--devices", "2", "--cr", "4", "--text", "good tea"]
    assert cli.main([*argv, "--compressor", "prism+", "--json"]) == 0
    out = capsys.readouterr().out
    assert '"grouping": "tail"' in out and '"sink": 4' in out
