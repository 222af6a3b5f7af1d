"""Bytes measured from the lowered program equal the closed form; FLOPs fall with CR."""

import dataclasses
import json

import pytest

import prism_jax as pj
from prism_jax import cli, cost

SMALL = {
    "bert": pj.BertConfig(
        vocab_size=100,
        width=30,
        depth=2,
        heads=3,
        mlp_width=40,
        act="gelu",
        ln_eps=1e-12,
        max_positions=128,
    ),
    "gpt2": pj.GPT2Config(
        vocab_size=100,
        width=24,
        depth=3,
        heads=2,
        mlp_width=48,
        act="gelu_new",
        ln_eps=1e-5,
        max_positions=128,
        head="lm",
    ),
    "vit": pj.ViTConfig(
        width=20,
        depth=2,
        heads=4,
        mlp_width=40,
        act="gelu",
        ln_eps=1e-12,
        max_positions=50,
        image_size=14,
        patch_size=2,
        head="classifier",
        num_labels=3,
    ),
    "llama": pj.LlamaConfig(  # grouped-query (4 query / 2 KV heads of 6), rotary: kv exchange
        vocab_size=100,
        width=20,
        depth=2,
        heads=4,
        kv_heads=2,
        head_dim=6,
        mlp_width=36,
        act="silu",
        ln_eps=1e-5,
        max_positions=128,
        rope_theta=1e4,
        head="lm",
    ),
}


@pytest.mark.parametrize("family", sorted(SMALL))
@pytest.mark.parametrize(("t", "n", "cr"), [(48, 4, 4), (50, 3, 5), (37, 8, 2), (20, 2, 128)])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("strategy", ["voltage", "prism"])
def test_measured_bytes_equal_closed_form(family, t, n, cr, dtype, strategy):
    cfg = SMALL[family]
    t = cfg.max_positions if family == "vit" else t
    plan = pj.Plan(strategy=strategy, cr=cr if strategy == "prism" else 1)
    lowered = cost.lower(cfg, plan, devices=n, seq_len=t, batch=2, dtype=dtype)
    measured, ops = cost.collective_bytes(lowered.as_text())
    want = cost.bytes_closed_form(
        cfg, plan, devices=n, seq_len=t, batch=2, dtype_bytes=2 if dtype == "bfloat16" else 4
    )
    assert measured == want > 0
    assert [op for op, _ in ops] == ["all_gather"] * cfg.depth  # one collective per layer


@pytest.mark.parametrize("family", sorted(SMALL))
@pytest.mark.parametrize("wire", ["bf16", "int8", "int4", "int4h"])
@pytest.mark.parametrize("kw", [{}, dict(exchange="kv"), dict(grouping="kmeans", value_tilt=True)])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_wire_bytes_equal_closed_form(family, wire, kw, dtype):
    """DESIGN.md 1d: what the lowered program sends on each wire, whatever the model computes
    in: W means at the wire's width (int4: two a byte), the integer wires' float32 scale per
    vector, the count, the stats."""
    cfg = SMALL[family]
    t = cfg.max_positions if family == "vit" else 37
    plan = pj.Plan(cr=3, wire=wire, **kw)
    lowered = cost.lower(cfg, plan, devices=3, seq_len=t, batch=2, dtype=dtype)
    measured, ops = cost.collective_bytes(lowered.as_text())
    want = cost.bytes_closed_form(cfg, plan, devices=3, seq_len=t, batch=2)
    assert measured == want > 0 and len(ops) == cfg.depth
    f32 = cost.bytes_closed_form(cfg, pj.Plan(cr=3, **kw), devices=3, seq_len=t, batch=2)
    assert want < f32


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_kv_exchange_bytes_equal_closed_form(family, dtype):
    """The means travel as float32 (`wire="f32"`, the default) whatever the model's dtype."""
    cfg, size = SMALL[family], 4
    plan = pj.Plan(cr=4, exchange="kv")
    measured = cost.collective_bytes(
        cost.lower(cfg, plan, devices=4, seq_len=48, batch=2, dtype=dtype).as_text()
    )[0]
    kv = 2 * cfg.kv_heads * cfg.head_dim  # keys and values of every KV head
    want = cfg.depth * 2 * 3 * (kv * size + 4)  # B = 2, S = ceil(12 / 4) = 3, int32 counts
    assert (
        measured
        == want
        == cost.bytes_closed_form(cfg, plan, devices=4, seq_len=48, batch=2, dtype_bytes=size)
    )


def test_single_and_one_device_send_nothing():
    cfg = SMALL["bert"]
    for plan, n in [(pj.Plan(strategy="single"), 4), (pj.Plan(cr=2), 1)]:
        lowered = cost.lower(cfg, plan, devices=n, seq_len=16)
        assert cost.collective_bytes(lowered.as_text())[0] == 0
        assert cost.bytes_closed_form(cfg, plan, devices=n, seq_len=16) == 0


@pytest.mark.parametrize("transport", ["all_to_all", "stream"])
def test_every_transport_sends_the_all_gathers_bytes(transport):
    """The stream's blocks leave by a host callback, no collective the program shows (and
    it runs only on a cluster): it is counted as the all-gather of the same blocks."""
    cfg, shape = SMALL["gpt2"], dict(devices=3, seq_len=24, batch=2)
    want = cost.measured_bytes(cfg, pj.Plan(cr=2), **shape)
    assert cost.measured_bytes(cfg, pj.Plan(cr=2, transport=transport), **shape) == want > 0
    report = cost.measure(cfg, pj.Plan(cr=2, transport=transport), **shape)
    assert report.bytes_sent == report.bytes_closed_form == want


@pytest.mark.parametrize(
    ("family", "plan", "n"),
    [
        ("bert", pj.Plan(strategy="single"), 1),
        ("bert", pj.Plan.best(4), 4),
        ("gpt2", pj.Plan(strategy="voltage"), 3),
        ("vit", pj.Plan(cr=4), 4),
        ("llama", pj.Plan.best(4), 4),
    ],
)
def test_deep_models_are_counted_from_shallow_copies(family, plan, n):
    """Past SHALLOW layers, bytes and FLOPs come from 2- and 3-layer programs: the bytes of
    the whole straight program exactly, its FLOPs to 1e-6 (XLA fuses a few ops differently
    at other depths). Width 64: at toy widths (D <= 32) XLA fuses post-norm BERT's residual
    stream across the unrolled layers and counts each earlier layer again in every later one,
    work the scanned program never does."""
    kv_heads = 2 if family == "llama" else 4
    cfg = dataclasses.replace(
        SMALL[family], depth=cost.SHALLOW + 2, width=64, heads=4, kv_heads=kv_heads,
        head_dim=16, mlp_width=128,
    )  # fmt: skip
    shape = dict(devices=n, seq_len=cfg.max_positions if family == "vit" else 40, batch=2)
    whole = cost.lower(cfg, plan, **shape)
    assert cost.measured_flops(cfg, plan, **shape) == pytest.approx(
        cost.compiled_flops(whole.compile()), rel=1e-6
    )
    assert cost.measured_bytes(cfg, plan, **shape) == cost.collective_bytes(whole.as_text())[0]
    if plan.strategy != "single":
        assert cost.measured_bytes(cfg, plan, **shape) > 0


def test_prism_flops_fall_with_cr_and_stay_below_voltage():
    cfg = SMALL["bert"]
    reports = [cost.measure(cfg, pj.Plan(cr=cr), devices=4, seq_len=128) for cr in (1, 4, 32)]
    voltage = cost.measure(cfg, pj.Plan(strategy="voltage"), devices=4, seq_len=128)
    flops = [r.flops for r in reports]
    assert flops[0] > flops[1] > flops[2]
    assert all(f < voltage.flops for f in flops[1:])
    assert reports[0].flops_single == voltage.flops_single > voltage.flops
    assert all(r.bytes_sent == r.bytes_closed_form for r in reports)
    assert reports[2].comm_reduction == pytest.approx(1 - 31 / (32 * 30))  # L = 32: S = 1


def test_cost_cli_json_and_errors(capsys, tmp_path, hf_models):
    directory = hf_models("bert")[1]
    code = cli.main(
        [
            "cost",
            "--model",
            str(directory),
            "--seq-len",
            "40",
            "--devices",
            "4",
            "--cr",
            "4",
            "--json",
        ]
    )
    r = json.loads(capsys.readouterr().out)
    assert code == 0 and r["bytes_sent"] == r["bytes_closed_form"] == 2 * 3 * 31 * 4
    assert 0 < r["compute_reduction"] < 1
    assert cli.main(["cost", "--model", "bert-huge", "--seq-len", "8"]) == 2
    assert "neither a preset" in capsys.readouterr().err
    assert cli.main(["cost", "--model", "bert-base", "--seq-len", "513"]) == 2
    assert "--seq-len must be in [1, 512]" in capsys.readouterr().err


def test_matmul_closed_form_gives_the_papers_headline():
    """BERT-base, T = 256, N = 2, CR = 128: a closed form (not a measurement) written to count
    what the paper counts gives its -51.24 %; the measurement is XLA's (table_cost.py)."""
    cfg = pj.PRESETS["bert-base"]()
    prism = cost.flops_closed_form(cfg, pj.Plan(cr=128), devices=2, seq_len=256)
    single = cost.flops_closed_form(cfg, pj.Plan(strategy="single"), devices=1, seq_len=256)
    assert round(100 * (1 - prism / single), 2) == 51.24
    comm = cost.bytes_closed_form(cfg, pj.Plan(cr=128), devices=2, seq_len=256)
    full = cost.bytes_closed_form(cfg, pj.Plan(strategy="voltage"), devices=2, seq_len=256)
    assert round(100 * (1 - comm / full), 1) == 99.2
