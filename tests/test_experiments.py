"""Every experiment's --smoke runs (fresh processes: each sets up its own devices)."""

import ast
import dataclasses
import functools
import json
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import FAST_COMPILE

# The network testbed and the overlap probe build namespaces (root): slow, kept out of CI.
# So are the smokes that take 10-40 s each and whose parts the unit tests cover (`make slow`
# runs them), to keep the CI suite well under 15 minutes on 2 cores: the attention cores and
# their gradients (test_attention), scanned layers (test_partition), training (test_train),
# generation (test_generation), the ViT grid (table_compress's smoke, test_tasks), evaluation
# on the device (bench_eval's parts: test_tasks) and the GPU benchmark (on CPU here).
SLOW = {
    "edge_testbed.py",
    "overlap_probe.py",
    "collective_probe.py",
    "bench_compile.py",
    "bench_eval.py",
    "bench_gpu.py",
    "bench_forward.py",
    "bench_llama.py",
    "bench_speed.py",
    "bench_train_attention.py",
    "profile_attention.py",
    "robust_finetune.py",
    "serve_load.py",
    "serve_restart.py",
    "table_bert.py",
    "table_generation.py",
    "table_gpt2.py",
    "table_llama.py",
    "table_planner.py",
    "table_sink.py",
    "table_vit.py",
    "table_wire.py",
    "train_gpt2.py",
    "train_vit.py",
}
# Modules the scripts share, and the index of their results (index.py, headlines.py): not
# experiments.
HELPERS = {"common.py", "provenance.py", "index.py", "headlines.py", "testbed_net.py",
           "testbed_relay.py", "testbed_probe.py", "testbed_model.py"}  # fmt: skip
SCRIPTS = [
    pytest.param(name, marks=pytest.mark.slow) if name in SLOW else name
    for name in sorted(p.name for p in (Path(__file__).parents[1] / "experiments").glob("*.py"))
    if name not in HELPERS
]


# What each smoke must leave behind: result files in --out, a model in --out, or (the
# benchmarks) a printed table row with a measured number; and every results file written,
# this run's provenance.
RESULTS = {
    "probe_tilt.py",
    "profile_plans.py",
    "table_bert.py",
    "table_compress.py",
    "table_cost.py",
    "table_generation.py",
    "table_gpt2.py",
    "table_llama.py",
    "table_sink.py",
    "table_vit.py",
    "table_wire.py",
    "table_planner.py",
    "serve_restart.py",
    "robust_finetune.py",
}
MODELS = {"train_gpt2.py", "train_vit.py"}


@pytest.mark.parametrize("script", SCRIPTS)
def test_smoke(script, tmp_path, tfds_dir):
    root = Path(__file__).parents[1]
    out = tmp_path / "out"
    argv = [f"experiments/{script}", "--smoke", "--out", str(out)]
    done = subprocess.run(
        [sys.executable, str(root / argv[0]), *argv[1:]],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        # TFDS prepares each local dataset once per test session, shared by every smoke
        env={
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",  # the testbed's ip and tc live in sbin
            "HF_HUB_OFFLINE": "1",
            "HOME": str(tmp_path),
            "TFDS_DATA_DIR": str(tfds_dir),
            "XLA_FLAGS": FAST_COMPILE,
        },  # fmt: skip
    )
    assert done.returncode == 0, done.stderr[-3000:]
    testbed = ("edge_testbed.py", "overlap_probe.py", "collective_probe.py")
    if script in testbed and "skipped" in done.stdout:  # not root
        pytest.skip(done.stdout.strip(" |\n"))
    if script in RESULTS:
        written = sorted(out.glob("*.json"))
        assert written and all(json.loads(p.read_text()) for p in written)
        assert all(p.with_suffix(".md").read_text().count("|") > 4 for p in written)
    elif script in MODELS:
        import prism_jax as pj

        assert pj.load_pretrained(out).config.family in ("gpt2", "vit")
    else:
        assert re.search(r"^\|[^\n]*\d\.\d+[^\n]*\|\s*$", done.stdout, re.MULTILINE), done.stdout
    written = [tmp_path / f"{script[:-3]}.json"] if script in MODELS else sorted(out.glob("*.json"))
    assert written  # (with --out, a smoke writes its results too)
    for path in written:
        _assert_provenance(json.loads(path.read_text()), argv, root)
        md = path.with_suffix(".md")
        assert not md.exists() or md.read_text().splitlines()[-1].startswith("Written by: comm")


def _assert_provenance(record: dict, argv: list[str], root: Path) -> None:
    """Every field of a results file's provenance is there, and is this run's."""
    import datetime
    import importlib.metadata
    import shlex

    got = record["provenance"]
    assert got["command"].endswith(shlex.join(argv))
    head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                          text=True).stdout.strip()  # fmt: skip
    assert got["commit"] == head and isinstance(got["uncommitted_changes"], bool)
    age = datetime.datetime.now(datetime.UTC) - datetime.datetime.fromisoformat(got["date"])
    assert datetime.timedelta(0) <= age < datetime.timedelta(hours=1)
    assert got["machine"]["cpu"] and got["machine"]["cores"] >= 1
    assert got["packages"]["jax"] == importlib.metadata.version("jax")
    assert got["packages"]["numpy"] == importlib.metadata.version("numpy")


def test_demo_main_job(capsys):
    """The README's main job, small: CR = 1 is exact, CR = 4 sends 4x fewer bytes."""

    import prism_jax as pj
    from prism_jax import cli, cost
    from prism_jax.data import sources
    from prism_jax.evaluation import metrics

    assert cli.main(["demo", "--samples", "6", "--cr", "1,4", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    voltage, cr1, cr4, best1, best4 = rows  # the paper's rows, then the best preset's
    assert voltage["strategy"] == "voltage" and cr1["cosine_min"] > 1 - 1e-5
    assert [r["compressor"] for r in rows] == ["voltage", "paper", "paper", "prism+", "prism+"]
    assert best1["cosine_min"] > 1 - 1e-5 and best4["plan"]["grouping"] == "kmeans"
    assert best4["bytes_per_device"] <= cr4["bytes_per_device"] * 1.05  # about the same bytes
    # bytes measured from the programs equal the closed form of the same batches
    model = pj.load_pretrained(sources.minilm_dir())
    texts = sources.fine_food_reviews("test")[0][:6]
    batches = metrics.text_batches(model, texts, batch_size=8, max_length=128, bucket=64)
    [(_, batch)] = batches
    b, t = batch["input_ids"].shape
    for row in (voltage, cr1, cr4):
        plan = pj.Plan(strategy=row["strategy"], cr=row["cr"])
        assert row["bytes_per_device"] == cost.bytes_closed_form(
            model.config, plan, devices=4, seq_len=t, batch=b
        )
    assert cr4["bytes_per_device"] < cr1["bytes_per_device"] / 3.9
    # the cosine is that of the embeddings computed directly, and CR = 4 really moved them
    exact = metrics.embed(model, batches)
    got = metrics.embed(model, batches, mesh=pj.edge_mesh(4), plan=pj.Plan(cr=4))
    cos = (got * exact).sum(-1)
    assert cr4["cosine_mean"] == pytest.approx(float(cos.mean()), abs=1e-6)
    assert cr4["cosine_min"] == pytest.approx(float(cos.min()), abs=1e-6)
    assert cos.mean() < 0.99  # (a review short enough to sit on device 0 alone stays exact)
    best = metrics.embed(model, batches, mesh=pj.edge_mesh(4), plan=pj.Plan.best(4))
    assert best4["cosine_mean"] == pytest.approx(float((best * exact).sum(-1).mean()), abs=1e-6)


def test_table_compress_resume_computes_only_the_missing_cells(monkeypatch):
    """A resumed grid keeps an earlier run's rows and asks `report.grid` for the (N, CR)
    cells it lacks, one call per template and N."""
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "experiments"))
    import table_compress

    from prism_jax.evaluation import report

    asked = []

    def fake_grid(model, task, *, template, devices, only_crs):
        asked.append((template.grouping, devices, only_crs))
        rows = [{"devices": n, "cr": cr} for n in devices for cr in only_crs]
        return {"exact": 1.0, "rows": rows, "seconds": 2.0}

    monkeypatch.setattr(report, "grid", fake_grid)
    have = {"paper": {"exact": 1.0, "rows": [{"devices": 4, "cr": 4}], "seconds": 1.0}}
    crs = {2: [4, 16], 4: [4, 16]}.get
    got = table_compress.grids(None, None, have, devices=(2, 4), crs=crs)
    assert asked == [("segments", (2,), (4, 16)), ("segments", (4,), (16,)),
                     ("kmeans", (2,), (4, 16)), ("kmeans", (4,), (4, 16))]  # fmt: skip
    assert [(r["devices"], r["cr"]) for r in got["paper"]["rows"]] == [
        (4, 4),
        (2, 4),
        (2, 16),
        (4, 16),
    ]
    assert got["paper"]["seconds"] == 5.0
    assert table_compress.grids(None, None, got, devices=(2, 4), crs=crs) == got
    assert len(asked) == 4  # nothing left to compute


def test_table_compress_recost_keeps_the_metric_and_measures_once_per_plan(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "experiments"))

    import table_compress

    calls = []

    def fake_measure(cfg, plan, devices, seq_len):
        calls.append((devices, plan.cr, plan.grouping, seq_len))
        return types.SimpleNamespace(bytes_sent=10 * plan.cr, comm_reduction=0.5,
                                     compute_reduction=0.25 + devices)  # fmt: skip

    monkeypatch.setattr(table_compress, "_measure", fake_measure)
    rows = [{"devices": 2, "cr": 4, "logit_bias": b, "value": v, "bytes_per_device": 1}
            for b, v in (("log_count", 0.7), ("none", 0.6))]  # fmt: skip
    table_compress.recost(None, rows, table_compress.grid_plan("all four"), 256)
    assert [r["value"] for r in rows] == [0.7, 0.6]
    assert {r["bytes_per_device"] for r in rows} == {40}
    assert rows[0]["compute_reduction"] == 2.25 and rows[1]["comm_reduction"] == 0.5
    assert calls == [(2, 4, "kmeans", 256)] * 2  # (the real `_measure` is cached per plan)


def test_table_compress_grids_every_cr_up_to_the_local_length(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "experiments"))
    import table_compress

    runner = types.SimpleNamespace(args=types.SimpleNamespace(smoke=False))
    crs = table_compress.Runner.crs(runner, 256)
    assert crs(2) == [1, 2, 4, 8, 16, 32, 64, 128]
    assert crs(8) == [1, 2, 4, 8, 16, 32]
    assert table_compress.Runner.crs(runner, 197)(2) == [1, 2, 4, 8, 16, 32, 64, 99]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--images", "0"], "argument --images: expected int >= 1: '0'"),
        (["--rows", "many"], "argument --rows: expected int >= 1: 'many'"),
        (["--limit", "nan"], "argument --limit: expected float >= 0: 'nan'"),
        (["--questions", "-1"], "argument --questions: expected int >= 0: '-1'"),
    ],
)
def test_experiment_flags_refuse_numbers_out_of_range(argv, message, monkeypatch, capsys):
    """A script's numeric settings: ints >= 1 and finite floats >= 0 unless the setting says
    otherwise; anything else is a usage error (exit 2) before any work starts."""
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "experiments"))
    import dataclasses

    import common

    @dataclasses.dataclass
    class Config:
        images: int = common.setting(4, "images")
        rows: int = common.setting(2, "rows")
        limit: float = common.setting(1.0, "seconds")
        questions: int = common.setting(3, "questions (0: none)", minimum=0)

    assert common.parse(Config, "doc", ["--questions", "0"], devices=None).questions == 0
    with pytest.raises(SystemExit) as stop:
        common.parse(Config, "doc", argv, devices=None)
    assert stop.value.code == 2
    [line] = capsys.readouterr().err.splitlines()  # one line, no usage block
    assert line.endswith(message)


def test_table_planner_report_draws_the_frontier_again(tmp_path):
    """`table_planner.py --report` re-renders an earlier record: its table, the frontier plot
    (one panel per N and link), and its provenance kept as an earlier run's."""
    root = Path(__file__).parents[1]
    cell = {"model": "SmolLM2", "nodes": 4, "rate_mbit": 10, "delay_ms": 1.0, "seq_len": 512,
            "choice": "fill:12:int4h@stream", "choice_s": 2.0, "best": "fill:12:int4h@stream",
            "best_s": 2.0, "single_s": 5.0, "paper16_s": 2.5, "paper16_loss": 0.75,
            "losses": {"single": 0.0, "paper:16": 0.75, "fill:12:int4h@stream": 0.05},
            "measured_s": {"single": 5.0, "paper:16": 2.5, "fill:12:int4h@stream": 2.0},
            "predicted_s": {"single": 5.0, "paper:16": 2.4,
                            "fill:12:int4h@stream": 2.1}}  # fmt: skip
    before = {"provenance": {"command": "earlier"}, "budget": 0.1, "testbed": "t.json",
              "cells": [cell, {**cell, "nodes": 2, "delay_ms": 5.0}]}  # fmt: skip
    (tmp_path / "table_planner.json").write_text(json.dumps(before))
    script = root / "experiments" / "table_planner.py"
    done = subprocess.run([sys.executable, str(script), "--report",
                           str(tmp_path / "table_planner.json"), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads((tmp_path / "o" / "table_planner.json").read_text())
    assert record["earlier_runs"] == [{"command": "earlier"}] and record["cells"] == before["cells"]
    assert "| SmolLM2 | 4 | 10 | 1 | fill:12:int4h@stream | 2.00 |" in done.stdout
    assert (tmp_path / "o" / "table_planner_frontier.png").stat().st_size > 10_000


@pytest.mark.parametrize(
    "argv",
    [
        ["table_planner.py", "--report", "no/such/table_planner.json"],
        ["profile_plans.py", "--models", "gpt5"],
        ["profile_plans.py", "--nodes", "2,one"],
        ["edge_testbed.py", "--nodes", "8", "--reserve-cores", "1.9"],  # under 1 ms a period
    ],
)
def test_bad_script_inputs_are_one_line(argv, tmp_path):
    """A record that is not there, a model or device count the profile does not know: one
    line on stderr, exit 2, before any work."""
    script = Path(__file__).parents[1] / "experiments" / argv[0]
    done = subprocess.run([sys.executable, str(script), *argv[1:]], capture_output=True,
                          text=True, timeout=300, cwd=tmp_path)  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0] and "Traceback" not in done.stderr


def test_edge_testbed_subset_flags(monkeypatch):
    """`edge_testbed.py --models/--nodes/--rates/--delays/--repeats` parse into its Config's
    fields; anything else is a usage error."""
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "experiments"))
    import argparse

    import edge_testbed

    assert edge_testbed._rates("10,unlimited,50") == (10, None, 50)
    assert edge_testbed._models("bert-base:256,tiny:32") == (("bert-base", 256), ("tiny", 32))
    assert edge_testbed._models("smollm2-135m:512") == (("smollm2-135m", 512),)
    vit = (("vit-base-patch16-224", 197),)  # its patches and the CLS token
    assert edge_testbed._models("vit-base-patch16-224") == vit
    assert edge_testbed._models("vit-base-patch16-224:197") == vit
    assert edge_testbed._delays("0,1.5,20") == (0.0, 1.5, 20.0)
    assert edge_testbed._positive_ints("4,16") == (4, 16)
    assert edge_testbed._positive_int("3") == 3
    assert edge_testbed._reserve("0.2") == 0.2 and edge_testbed._reserve("0") == 0.0
    plans = "single,paper:16@stream,fill:16:int4h@all_to_all,fill:16:int4h:notilt@stream"
    assert edge_testbed._plans(plans) == tuple(plans.split(","))
    for parse, text in [
        (edge_testbed._plans, "single,paper:16@ring"),
        (edge_testbed._plans, "single@stream,paper:16"),
        (edge_testbed._plans, "single,fill:16:int4h:flat"),
        (edge_testbed._rates, "10,fast"),
        (edge_testbed._rates, "0"),
        (edge_testbed._models, "gpt2:256"),
        (edge_testbed._models, "bert-base"),
        (edge_testbed._models, "vit-base-patch16-224:256"),
        (edge_testbed._positive_ints, "4,-1"),
        (edge_testbed._positive_int, "2,3"),
        (edge_testbed._delays, "-1"),
        (edge_testbed._delays, "5,slow"),
        (edge_testbed._reserve, "-0.1"),
        (edge_testbed._reserve, str(os.cpu_count())),  # every core: none left for a node
        (edge_testbed._reserve, "some"),
    ]:
        with pytest.raises(argparse.ArgumentTypeError):
            parse(text)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["bench_speed.py", "--repeats", "0"], "argument --repeats: expected int >= 1"),
        (["bench_train_attention.py", "--repeats", "0"], "argument --repeats: expected int"),
        (["profile_attention.py", "--repeats", "x"], "argument --repeats: expected int"),
        (["edge_testbed.py", "--rates", "0"], "argument --rates: expected integers >= 1"),
        (["overlap_probe.py", "--layers", "0"], "--layers must be >= 1"),
        (["robust_finetune.py", "--family", "bert", "--distill", "1"], "--distill is for"),
        (["robust_finetune.py", "--steps", "0"], "argument --steps: expected int >= 1"),
        (["robust_finetune.py", "--eval-crs", "2,16"], "--eval-crs: must include 1"),
        (["robust_finetune.py", "--mixed-crs", "1,0"], "--mixed-crs: expected CRs >= 1"),
        (["robust_finetune.py", "--eval-crs", "1,x"], "--eval-crs: expected CRs >= 1"),
        (["robust_finetune.py", "--no-paper"], "--no-paper is for --mixed"),
        (["robust_finetune.py", "--test-examples", "0"], "--test-examples: expected int >= 1"),
        (["robust_finetune.py", "--lr", "0"], "argument --lr: expected a learning rate > 0"),
        (["robust_finetune.py", "--lr=-1e-3"], "argument --lr: expected float >= 0"),
        (["robust_finetune.py", "--mixed", "--distilled-only"], "--distilled-only is for"),
        (["robust_finetune.py", "--exact-from", "/nowhere.json"], "--exact-from: no results"),
        (["robust_finetune.py", "--start-steps", "5"], "--start-steps is for --family vit"),
        (["robust_finetune.py", "--family", "vit", "--start-steps", "0"], "expected int >= 1"),
        (["table_compress.py", "--images", "0"], "argument --images: expected int >= 1"),
        (["table_compress.py", "--models", "vit", "foo"], "argument --models: invalid choice"),
        (["table_generation.py", "--compressors", "paper,best"], "--compressors: expected"),
        (["table_generation.py", "--compressors", "paper,paper"], "--compressors: expected"),
        (["table_sink.py", "--sinks", "0"], "--sinks '0': integers >= 1"),
        (["table_sink.py", "--compressors", "paper;best"], "unknown compressors ['best']"),
        (["table_sink.py", "--model", "bert"], "--model 'bert': smollm2 or gpt2"),
        (["table_sink.py", "--fill", "cr2"], "--fill 'cr2': cr or groups"),
        (["edge_testbed.py", "--plans", "paper:16"], "the plans need single, the baseline"),
        (["edge_testbed.py", "--plans", "single,fill:16:int9"], "expected single, voltage"),
        (["table_wire.py", "--wires", "f32,int2"], "argument --wires: 'f32,int2'"),
        (["table_wire.py", "--models", "vit,resnet"], "argument --models: 'vit,resnet'"),
        (["table_wire.py", "--crs", "4,0"], "argument --crs: '4,0'"),
    ],
)
def test_experiment_bad_flags_are_one_line_and_exit_2(argv, message):
    """A script's bad flag: exit 2 and one line on stderr, before any work starts."""
    script, *rest = argv
    done = subprocess.run(
        [sys.executable, str(Path(__file__).parents[1] / "experiments" / script), *rest],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    [line] = done.stderr.splitlines()
    assert message in line and "Traceback" not in line


def test_robust_finetune_mixed_crs_of_one_cr_is_a_single_cr_prism_plus_arm(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "experiments"))
    import robust_finetune as rf

    def arms(*argv):
        args = rf.common.parse(rf.Config, rf.__doc__, ["--family", "vit", *argv], devices=None)
        return {arm.name: arm for arm in rf.arms(args)}

    single = arms("--mixed", "--mixed-crs", "16")
    assert not any(name.startswith("mixed CR") for name in single)  # no copy of the N=4 arm
    arm = single["trained at N=4 CR=16, prism+"]
    assert arm.crs == [16] and not arm.plan.paper and arm.plan.cr == 16
    assert {"mixed CR {1,16}", "mixed CR {1,16}, prism+"} <= set(
        arms("--mixed", "--mixed-crs", "1,16")
    )


def test_robust_finetune_no_paper_trains_only_exact_and_prism_plus(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "experiments"))
    import robust_finetune as rf

    argv = ["--family", "vit", "--mixed", "--mixed-crs", "1,16", "--no-paper"]
    args = rf.common.parse(rf.Config, rf.__doc__, argv, devices=None)
    trained = [arm for arm in rf.arms(args) if arm.plan is not None]
    assert [arm.name for arm in trained] == [
        "trained at CR=1", "trained at CR=1, scored prism+", "mixed CR {1,16}, prism+"
    ]  # fmt: skip
    assert all(not arm.plan.paper or arm.plan.strategy == "single" for arm in trained)


def test_robust_finetune_gaps_are_paired_differences_from_the_exact_arm(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "experiments"))
    import robust_finetune as rf

    rng = np.random.default_rng(0)
    exact = rng.random(203) < 0.9
    worse = exact & (rng.random(203) < 0.95)  # loses ~5 % of exact's hits, gains none

    def arm(hits: dict) -> dict:
        return {"examples": 203, "accuracy": {cr: h.mean() for cr, h in hits.items()},
                "hits": {cr: np.packbits(h).tobytes().hex() for cr, h in hits.items()},
                "train_minutes": 0.0}  # fmt: skip

    results = {rf.EXACT: arm({1: exact, 16: worse}), "other": arm({1: worse, 16: exact})}
    rf.add_gaps(results)
    lost = (exact & ~worse).mean()
    assert results[rf.EXACT]["gap"][1] == [0.0, 0.0]
    points, se = results[rf.EXACT]["gap"][16]
    assert points == pytest.approx(-100 * lost)
    assert se == pytest.approx(100 * np.std(worse.astype(float) - exact, ddof=1) / np.sqrt(203))
    assert results["other"]["gap"][16] == [0.0, 0.0]
    run = types.SimpleNamespace(args=types.SimpleNamespace(family="vit", devices=4,
                                logit_bias="log_count", layout="padded"),
                                recipe={"steps": 3, "batch_size": 2, "lr": 0.1},
                                eval_crs=[1, 16], task=types.SimpleNamespace(examples=203),
                                dataset="d")  # fmt: skip
    text = rf.markdown(results, run)
    assert f"| other | {-100 * lost:+.1f} ± {se:.1f} | +0.0 ± 0.0 |" in text


def test_robust_finetune_keeps_an_arms_training_minutes_beside_its_checkpoints(
    monkeypatch, tmp_path
):
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "experiments"))
    import robust_finetune as rf

    path = tmp_path / rf.MINUTES
    assert rf._spent(path, 7.5, None, 300) == 7.5  # trained from the start
    assert rf._spent(path, 0.02, 300, 300) == 7.5  # resumed at the end: the earlier minutes
    assert rf._spent(path, 2.0, 100, 300) == 9.5  # resumed part-way: added
    assert json.loads(path.read_text()) == {"train_minutes": 9.5}
    assert rf._spent(tmp_path / "none.json", 0.02, 300, 300) is None  # an older run: unknown
    assert rf._spent(tmp_path / "none.json", 2.0, 100, 300) is None


def test_robust_finetune_start_steps_starts_from_the_cr1_arm_a_longer_run_trained(monkeypatch):
    """--start-steps S: every arm starts from the CR = 1 arm of the `--steps S` run (its
    checkpoint folder, so that run's checkpoints are reused), and the run's names say so."""
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "experiments"))
    import robust_finetune as rf

    def parse(*argv):
        return rf.common.parse(rf.Config, rf.__doc__, ["--family", "vit", *argv], devices=None)

    def run_of(args):
        recipe, longer = rf.recipe_of(args)
        cfg = dataclasses.make_dataclass("TrainConfig", [("steps", int)])(recipe["steps"])
        return rf.Run(args, recipe, longer, "d", [1], "base", None, {}, cfg, None)

    args = parse("--mixed", "--steps", "40", "--start-steps", "280")
    run = run_of(args)
    assert run.recipe["start_steps"] == 280 and run.recipe["steps"] == 40
    assert run.longer == "-steps40-from280" and rf.results_stem(run).endswith("_steps40_from280")
    assert "start_steps" not in run_of(parse("--steps", "40")).recipe  # earlier files' recipe
    asked = []
    monkeypatch.setattr(rf, "trained", lambda arm, r: asked.append((arm, r)) or ("start", 0.0))
    assert rf.converged_start(run) == "start"
    [(arm, first)] = asked
    assert arm.name == rf.EXACT and arm.plan.strategy == "single"
    assert first.cfg.steps == 280 and first.recipe["steps"] == 280
    longer = run_of(parse("--mixed", "--steps", "280"))  # the run that trained it
    assert rf.checkpoint_tag(arm, first) == rf.checkpoint_tag(arm, longer) == "cr1-steps280"
    distilled = next(a for a in rf.arms(args) if a.distill or a.crs)  # this run's own arms
    assert rf.checkpoint_tag(distilled, run).endswith("-steps40-from280")


def test_probe_tilt_is_exact_for_an_isotropic_spread(monkeypatch):
    """Within-group deviations with covariance exactly s2 I make C_g = s2 W_k^T W_v: the
    shipped tilt and the best scalar recover the term exactly (no rotary keys)."""
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "experiments"))
    import probe_tilt

    rng = np.random.default_rng(0)
    d, g, k, cr, devices = 4, 2, 3, 8, 2
    signs = np.concatenate([np.eye(d), -np.eye(d)])  # 2D rows: mean 0, covariance (1/D) I
    a = np.concatenate([rng.normal(size=d) + 1.5 * signs for _ in range(devices)])  # [T, D]
    wk, wv = rng.normal(size=(d, g, k)), rng.normal(size=(d, g, k))
    q = rng.normal(size=(len(a), 2 * g, k))
    t = {"a": a, "q": q, "k": np.einsum("td,dgk->tgk", a, wk), "theta": None,
         "v": np.einsum("td,dgk->tgk", a, wv), "wk": wk, "wv": wv}  # fmt: skip
    got = probe_tilt.errors(t, devices, cr)
    assert got["tilt"] < 1e-12 and got["best scalar"] < 1e-12
    assert got["local shape"] < 1e-12  # (the receiver's own spread has the same shape)


def test_probe_tilt_turns_queries_back_as_the_model_does(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "experiments"))
    import probe_tilt

    from prism_jax.layers import _rotate_half, mean_rotation

    q = np.random.default_rng(1).normal(size=(5, 2, 3, 8))
    positions = np.arange(40, 56)
    cos, sin = mean_rotation(np.float32(positions.mean()), np.float32(positions.var()), 8, 1e4)
    want = np.asarray(cos) * q - np.asarray(sin) * np.asarray(_rotate_half(q))
    np.testing.assert_allclose(probe_tilt._turned_back(q, positions, 1e4), want, atol=1e-5)


@pytest.mark.slow  # 20-30 s, most of it preparing the split
def test_robust_finetune_refuses_more_test_examples_than_the_split_has(tmp_path, tfds_dir):
    """Asking for more test examples than there are: one line, exit 2, nothing trained."""
    script = Path(__file__).parents[1] / "experiments" / "robust_finetune.py"
    argv = ["--smoke", "--family", "vit", "--test-examples", "100000", "--out", str(tmp_path)]
    done = subprocess.run(
        [sys.executable, str(script), *argv], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 2, done.stderr[-2000:]
    *_, line = done.stderr.strip().splitlines()  # (before it: TFDS preparing the split)
    assert "--test-examples: the fashion_mnist_local test split has" in line
    assert "Traceback" not in done.stderr
    assert "fine-tuning" not in done.stdout + done.stderr and not list(tmp_path.iterdir())


@pytest.mark.slow
def test_robust_finetune_other_steps_name_their_results(tmp_path, tfds_dir):
    """--steps other than the recipe's trains, and --test-examples other than the recipe's
    scores, apart from the recipe's run."""
    script = Path(__file__).parents[1] / "experiments" / "robust_finetune.py"
    argv = [sys.executable, str(script), "--smoke", "--family", "vit", "--steps", "3"]
    done = subprocess.run(
        [*argv, "--test-examples", "4", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    text = (tmp_path / "robust_vit_n4_cr16_log_count_padded_steps3_test4.md").read_text()
    assert "3 steps" in text and "4 fashion_mnist_local test examples" in text
    record = json.loads(
        (tmp_path / "robust_vit_n4_cr16_log_count_padded_steps3_test4.json").read_text()
    )
    assert {r["examples"] for r in record["results"].values()} == {4}


def test_robust_finetune_resume_takes_only_the_same_arm_scored_at_every_cr(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "experiments"))
    import robust_finetune as rf

    args = rf.common.parse(
        rf.Config, rf.__doc__, ["--family", "vit", "--mixed", "--mixed-crs", "1,16", "--distill",
                                "1", "--out", str(tmp_path)], devices=None,
    )  # fmt: skip
    arms = {arm.name: arm for arm in rf.arms(args)}
    mixed, distilled = (
        arms["mixed CR {1,16}, prism+"],
        arms["mixed CR {1,16}, prism+, distilled (1)"],
    )
    saved = {"crs": [1, 16], "distill": 0.0, "scored_with": "prism+", "examples": 8,
             "train_minutes": 3.0, "accuracy": {"1": 0.5, "16": 0.25, "2": 0.5},
             "hits": {"1": "f0", "16": "c0", "2": "f0"}, "gap": {"1": [0, 0]}}  # fmt: skip
    got = rf.reusable(saved, mixed, [1, 16])
    assert got["accuracy"] == {1: 0.5, 16: 0.25} and got["hits"] == {1: "f0", 16: "c0"}
    assert "gap" not in got and got["train_minutes"] == 3.0  # gaps are taken again
    assert rf.reusable(saved, distilled, [1, 16]) is None  # another arm
    assert rf.reusable(saved, mixed, [1, 4, 16]) is None  # not scored at CR = 4
    assert rf.reusable(None, mixed, [1, 16]) is None
    assert rf.reusable({**saved, "crs": [1, 2, 16]}, mixed, [1, 16]) is None
    kept = rf.scored(saved)  # an arm of the file that a run does not list: every CR kept
    assert kept["accuracy"] == {1: 0.5, 16: 0.25, 2: 0.5} and "gap" not in kept

    run = types.SimpleNamespace(args=args, recipe={"steps": 150, "limit": 1000})
    assert rf.earlier_results(run, "stem") == {}  # no file yet: every arm trains
    record = {"recipe": {"steps": 150, "limit": 1000}, "results": {mixed.name: saved}}
    (tmp_path / "stem.json").write_text(json.dumps(record))
    assert rf.earlier_results(run, "stem") == {mixed.name: saved}
    taken = {**saved, "crs": None, "from": "shorter.json, 150 steps"}  # --exact-from's arm
    record["results"][rf.EXACT] = taken
    (tmp_path / "stem.json").write_text(json.dumps(record))
    assert rf.earlier_results(run, "stem") == {mixed.name: saved}  # not this run's: trains
    run.recipe = {"steps": 300, "limit": 1000}
    with pytest.raises(ValueError, match="written with another recipe"):
        rf.earlier_results(run, "stem")


def test_robust_finetune_distilled_only_leaves_out_the_undistilled_mixed_arm(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "experiments"))
    import robust_finetune as rf

    argv = ["--family", "vit", "--mixed", "--mixed-crs", "1,16", "--no-paper", "--distill", "1"]
    names = [
        arm.name for arm in rf.arms(rf.common.parse(rf.Config, rf.__doc__, argv, devices=None))
    ]
    assert "mixed CR {1,16}, prism+" in names
    only = rf.common.parse(rf.Config, rf.__doc__, [*argv, "--distilled-only"], devices=None)
    trained = [arm.name for arm in rf.arms(only) if arm.plan is not None]
    assert trained == ["trained at CR=1", "trained at CR=1, scored prism+",
                       "mixed CR {1,16}, prism+, distilled (1)"]  # fmt: skip


def test_robust_finetune_exact_from_takes_the_cr1_arms_of_the_same_test_set(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "experiments"))
    import robust_finetune as rf

    argv = ["--family", "vit", "--mixed", "--mixed-crs", "1,16", "--no-paper", "--steps", "600"]
    args = rf.common.parse(rf.Config, rf.__doc__, argv, devices=None)
    arm = {"crs": None, "distill": 0.0, "examples": 8, "train_minutes": 3.0,
           "accuracy": {"1": 0.5, "16": 0.25}, "hits": {"1": "f0", "16": "c0"}}  # fmt: skip
    mixed = {**arm, "crs": [1, 16], "scored_with": "prism+"}
    results = {rf.EXACT: {**arm, "scored_with": "paper"},
               "trained at CR=1, scored prism+": {**arm, "scored_with": "prism+"},
               "mixed CR {1,16}, prism+": mixed}  # fmt: skip
    record = {"family": "vit", "devices": 4, "cr": 16, "logit_bias": "log_count",
              "layout": "padded", "recipe": {"steps": 300, "limit": 1000},
              "results": results}  # fmt: skip
    path = tmp_path / "shorter.json"
    path.write_text(json.dumps(record))
    run = types.SimpleNamespace(args=args, recipe={"steps": 600, "limit": 1000}, eval_crs=[1, 16])

    taken = rf.exact_results(run, path)
    assert set(taken) == {rf.EXACT, "trained at CR=1, scored prism+"}  # not the mixed arm
    assert {r["from"] for r in taken.values()} == {"shorter.json, 300 steps"}
    arms = {a.name: a for a in rf.arms(args)}
    kept = rf.reusable(taken[rf.EXACT], arms[rf.EXACT], [1, 16])  # as main() takes it
    assert kept["accuracy"] == {1: 0.5, 16: 0.25} and kept["from"] == "shorter.json, 300 steps"

    run.eval_crs = [1, 4, 16]  # the file's arms are not scored at CR = 4: they would train
    with pytest.raises(ValueError, match="lacks 'trained at CR=1' scored at CR = \\[1, 4, 16\\]"):
        rf.exact_results(run, path)
    run.eval_crs, run.recipe = [1, 16], {"steps": 600, "limit": 10000}  # other test examples
    with pytest.raises(ValueError, match="another run's"):
        rf.exact_results(run, path)
    run.recipe = {"steps": 600, "limit": 1000}
    path.write_text(json.dumps({**record, "devices": 2}))
    with pytest.raises(ValueError, match="another run's"):
        rf.exact_results(run, path)

    results = {rf.EXACT: kept, "trained here": rf.scored(mixed)}
    rf.add_gaps(results)
    run = types.SimpleNamespace(args=args, recipe={"steps": 600, "batch_size": 2, "lr": 0.1},
                                eval_crs=[1, 16], task=types.SimpleNamespace(examples=8),
                                dataset="d")  # fmt: skip
    text = rf.markdown(results, run)
    assert "| trained at CR=1 (shorter.json, 300 steps) | 50.0 | 25.0 | 3.0 |" in text
    assert "| trained here | 50.0 | 25.0 | 3.0 |" in text  # this run's arm: no source named


def test_robust_finetune_exact_from_another_runs_file_is_one_line_and_exit_2(
    monkeypatch, tmp_path, capsys
):
    """A results file of another test set: refused by main() in one line, before training."""
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "experiments"))
    import robust_finetune as rf

    record = {"family": "vit", "devices": 4, "logit_bias": "log_count", "layout": "padded",
              "recipe": {"steps": 150, "limit": 10000}, "results": {}}  # fmt: skip
    (tmp_path / "other.json").write_text(json.dumps(record))

    def setup(args):  # the run without its model and data
        recipe, longer = rf.recipe_of(args)
        task = types.SimpleNamespace(examples=1000)
        return types.SimpleNamespace(args=args, recipe=recipe, longer=longer, dataset="d",
                                     eval_crs=[1, 16], task=task)  # fmt: skip

    monkeypatch.setattr(rf, "setup", setup)
    monkeypatch.setattr(rf, "run_arm", lambda *a: pytest.fail("an arm ran"))
    argv = ["--family", "vit", "--eval-crs", "1,16", "--exact-from", str(tmp_path / "other.json")]
    assert rf.main(argv) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("robust_finetune.py: error: argument --exact-from: ")
    assert "is another run's" in line and "'test examples': 10000" in line


@pytest.mark.slow
def test_robust_finetune_resume_trains_only_the_arms_its_results_lack(tmp_path, tfds_dir):
    script = Path(__file__).parents[1] / "experiments" / "robust_finetune.py"
    argv = [sys.executable, str(script), "--smoke", "--family", "vit", "--mixed", "--no-paper",
            "--out", str(tmp_path)]  # fmt: skip
    first = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    done = subprocess.run([*argv, "--distill", "1", "--resume"], capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("(from the results file)") == 5  # all but the distilled arm
    assert done.stderr.count("fine-tuning") and "distilled (1)" in done.stdout
    record = json.loads((tmp_path / "robust_vit_n4_cr16_log_count_padded.json").read_text())
    assert len(record["results"]) == 6
    again = subprocess.run([*argv, "--resume"], capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "fine-tuning" not in again.stderr  # nothing trains
    kept = json.loads((tmp_path / "robust_vit_n4_cr16_log_count_padded.json").read_text())
    assert kept["results"] == record["results"]  # the distilled arm, not listed, is kept
    record["recipe"]["lr"] *= 2
    (tmp_path / "robust_vit_n4_cr16_log_count_padded.json").write_text(json.dumps(record))
    refused = subprocess.run([*argv, "--resume"], capture_output=True, text=True, timeout=600)
    assert refused.returncode == 2 and "written with another recipe" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_a_scripts_prism_error_is_one_line_and_exit_2(monkeypatch, capsys):
    """Data that is not installed (a PrismError in any script) ends as the CLI's bad input does."""
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "experiments"))
    import common

    from prism_jax.errors import PrismError

    def missing():
        raise PrismError("Fashion-MNIST not found in /nowhere (apt-get install ...)")

    monkeypatch.setattr(sys, "argv", ["table_vit.py"])
    with pytest.raises(SystemExit) as done:
        common.run_script(missing)
    assert done.value.code == 2
    assert (
        capsys.readouterr().err
        == "table_vit.py: error: Fashion-MNIST not found in /nowhere (apt-get install ...)\n"
    )
    for code in (None, 0, 2):
        with pytest.raises(SystemExit) as done:
            common.run_script(lambda code=code: code)
        assert done.value.code == (code or 0)


def test_table_generation_reports_prism_plus_decode_speed_against_the_papers(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "experiments"))
    import table_generation

    def row(compressor, n, cr, speed):
        return {"model": "m", "compressor": compressor, "devices": n, "cr": cr,
                "tokens_per_second": speed}  # fmt: skip

    rows = [row("paper", 2, 1, 10.0), row("prism+", 2, 1, 8.0),
            row("paper", 2, 4, 20.0), row("prism+", 2, 4, 20.0)]  # fmt: skip
    [blank, line] = table_generation.decode_speed_ratios(rows)
    assert blank == "" and "decodes at 0.90 of the paper's" in line and "2 cells" in line
    assert table_generation.decode_speed_ratios(rows[::2]) == []  # the paper's alone


def test_bench_speed_times_runs_in_turn_and_states_the_floor(monkeypatch):
    """Runs are timed call by call in turn, and the floor is the products' FLOPs at the best
    measured rate over PyTorch's time."""
    import os

    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))  # the import appends
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "experiments"))
    import bench_speed

    from prism_jax import cost

    calls = []
    fns = {name: functools.partial(calls.append, name) for name in ("torch", "single")}
    measured = bench_speed._interleaved(fns, 3)
    assert calls == ["torch", "single"] * 4  # first calls, then three rounds
    assert all(set(m) == {"first_call_s", "s"} and m["s"] >= 0 for m in measured.values())

    rates = {"jax": 1e11, "torch": 2e11}
    monkeypatch.setattr(bench_speed, "_best_product_rates", lambda rows, width, mlp: rates)
    cfg = cost.resolve_config("bert-base")[1]
    floor = bench_speed._floor(cfg, 8, 128, 0.5)
    rows, d, f = 8 * 128, 768, 3072
    flops = 12 * (8 * rows * d * d + 4 * rows * d * f + 4 * rows * 128 * d)
    assert floor["matmul_gflop"] == pytest.approx(flops / 1e9)
    assert floor["floor"] == pytest.approx(flops / 2e11 / 0.5)
    assert floor["floor_jax_rate"] == pytest.approx(flops / 1e11 / 0.5)
    text = bench_speed.markdown([], [{"model": "m", "batch": 8, "tokens": 128, **floor}])
    assert f"| {floor['floor_jax_rate']:.2f} | {floor['floor']:.2f} |" in text


def test_robust_finetune_another_lr_or_steps_trains_and_writes_apart(monkeypatch):
    """--lr and --steps other than the recipe's change the recipe and name its checkpoints
    and results file apart; the recipe's own values name nothing new."""
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "experiments"))
    import robust_finetune as rf

    def named(*argv):
        args = rf.common.parse(rf.Config, rf.__doc__, ["--family", "vit", *argv], devices=None)
        recipe, longer = rf.recipe_of(args)
        run = types.SimpleNamespace(args=args, recipe=recipe, longer=longer)
        return recipe, longer, rf.results_stem(run)

    recipe, longer, stem = named()
    assert longer == "" and recipe == rf.RECIPES["vit"]
    assert named("--lr", "5e-4", "--steps", "150")[1] == ""  # the recipe's own values
    recipe, longer, stem = named("--lr", "1e-3")
    assert recipe["lr"] == 1e-3 and recipe["steps"] == rf.RECIPES["vit"]["steps"]
    assert longer == "-lr0.001" and stem == "robust_vit_n4_cr16_log_count_padded_lr0.001"
    recipe, longer, stem = named("--steps", "300", "--lr", "2e-4", "--test-examples", "10000")
    assert (recipe["steps"], recipe["lr"], recipe["limit"]) == (300, 2e-4, 10000)
    assert stem == "robust_vit_n4_cr16_log_count_padded_steps300_lr0.0002_test10000"


def _returns(fn: ast.FunctionDef):
    """The return statements of `fn` itself (not of functions defined inside it)."""
    todo = list(fn.body)
    while todo:
        node = todo.pop()
        if isinstance(node, ast.Return):
            yield node
        elif not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            todo.extend(ast.iter_child_nodes(node))


@pytest.mark.parametrize("script", [s if isinstance(s, str) else s.values[0] for s in SCRIPTS])
def test_a_scripts_main_returns_an_exit_code(script):
    """`common.run_script` exits with what `main()` returns: an int, None, or what a function
    of the script annotated `-> int` or `-> None` returns, never a result (a float or a list
    would end a finished run with exit 1)."""
    tree = ast.parse((Path(__file__).parents[1] / "experiments" / script).read_text())
    defs = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}

    def exit_code(value) -> bool:
        if value is None or (isinstance(value, ast.Constant) and type(value.value) is int):
            return True
        if isinstance(value, ast.IfExp):
            return exit_code(value.body) and exit_code(value.orelse)
        if isinstance(value, ast.Name):
            return value.id.startswith("EXIT_")
        if isinstance(value, ast.Call) and isinstance(value.func, ast.Name):
            called = defs.get(value.func.id)
            return called is not None and ast.unparse(called.returns or ast.Constant("?")) in (
                "int",
                "None",
                "int | None",
            )
        return False

    bad = [ast.unparse(r) for r in _returns(defs["main"]) if not exit_code(r.value)]
    assert not bad, f"{script}: main() {bad}"


# Every way an output folder can be unusable, and the words that name it: the folder is new
# in a missing folder, in a file, or in a folder nobody may write (sysfs: even root), or it
# is a file itself.
BAD_OUT = [
    ("missing/out", "does not exist"),
    ("file/out", "is not a folder"),
    ("/sys/prism-out", "cannot write there"),
    ("file", "is not a folder"),
]


def _bad_out(tmp_path, where: str) -> str:
    (tmp_path / "file").write_text("")
    return where if where.startswith("/") else str(tmp_path / where)


@pytest.mark.parametrize(("where", "message"), BAD_OUT)
def test_out_folder_refuses_a_folder_it_could_not_write(where, message, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "experiments"))
    import argparse

    import common

    assert common.out_folder(str(tmp_path)) == str(tmp_path)  # exists, takes a file
    assert common.out_folder(str(tmp_path / "new")) == str(tmp_path / "new")  # made when written
    assert not (tmp_path / "new").exists()  # (checked, not made: a failed run leaves nothing)
    with pytest.raises(argparse.ArgumentTypeError, match=message):
        common.out_folder(_bad_out(tmp_path, where))


# Each script with a bad output folder (its `--out`, and the checkpoint folders of the
# training scripts): one of the BAD_OUT cases in turn, so that each case meets several scripts.
BAD_OUT_RUNS = [
    (script, flag, *BAD_OUT[i % len(BAD_OUT)])
    for i, (script, flag) in enumerate(
        [(s if isinstance(s, str) else s.values[0], "--out") for s in SCRIPTS]
        + [("train_vit.py", "--checkpoint-dir"), ("robust_finetune.py", "--checkpoints")]
    )
]


@pytest.mark.parametrize(("script", "flag", "where", "message"), BAD_OUT_RUNS)
def test_a_scripts_bad_output_folder_is_one_line_and_exit_2_before_the_work(
    script, flag, where, message, tmp_path
):
    """A folder the results could not be written to is refused as the flags are read (a
    smoke run takes seconds to minutes; this must end within the interpreter's start)."""
    bad = _bad_out(tmp_path, where)
    done = subprocess.run(
        [sys.executable, str(Path(__file__).parents[1] / "experiments" / script), "--smoke",
         flag, bad],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    [line] = done.stderr.splitlines()
    assert line == f"{script}: error: argument {flag}: {bad}" + line.split(bad, 1)[1]
    assert message in line and "Traceback" not in line


def test_results_written_again_keep_the_earlier_runs_provenance(tmp_path, monkeypatch):
    """A record resumed from its file (table_compress --resume) holds rows of an earlier run:
    the new file records this run and keeps the earlier one's provenance beside it; a list
    of rows goes under "rows"; a file of before provenance was recorded says so."""
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "experiments"))
    import common
    import provenance

    monkeypatch.setattr(sys, "argv", ["experiments/table_x.py", "--resume"])
    common.write(tmp_path, "first", [{"cr": 1}], "| a | b |")
    first = json.loads((tmp_path / "first.json").read_text())
    assert first["rows"] == [{"cr": 1}] and first["provenance"]["command"].endswith(
        "experiments/table_x.py --resume"
    )
    common.write(tmp_path, "again", first, "| a | b |")
    again = json.loads((tmp_path / "again.json").read_text())
    assert again["earlier_runs"] == [first["provenance"]] and again["rows"] == first["rows"]
    common.write(tmp_path, "third", again)
    assert len(json.loads((tmp_path / "third.json").read_text())["earlier_runs"]) == 2
    assert not (tmp_path / "third.md").exists()  # (no text: the JSON alone)
    md = (tmp_path / "again.md").read_text().splitlines()
    assert md[0] == "| a | b |" and md[-1] == provenance.line(again)
    assert "machine " + again["provenance"]["machine"]["cpu"] in md[-1]
    old = provenance.line({"rows": []})
    assert old.count("not recorded") == len(provenance.FIELDS)


def test_the_committed_results_index_is_what_the_generator_writes(monkeypatch):
    """results/INDEX.md cannot go stale: it equals what index.py makes of the results files
    (run `.venv/bin/python experiments/index.py` after an experiment)."""
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "experiments"))
    import index

    committed = (index.RESULTS / index.NAME).read_text()
    assert committed == index.generate(index.RESULTS)
    assert index.main(["--check"]) == 0
    rows = [line for line in committed.splitlines() if line.startswith("| `")]
    assert len(rows) == len(list(index.RESULTS.rglob("*.json")))


def test_the_results_index_reads_provenance_and_headlines_and_says_when_stale(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "experiments"))
    import common
    import index

    results = tmp_path / "results"
    monkeypatch.setattr(sys, "argv", ["experiments/train_vit.py", "--smoke"])
    common.write(results, "train_vit", {"minutes": 2.0, "test_accuracy": 0.875})
    (results / "nobody.json").write_text(json.dumps({"rows": []}))  # no provenance, no kind
    assert index.main(["--results", str(results)]) == 0
    text = (results / "INDEX.md").read_text()
    [vit] = [line for line in text.splitlines() if "`train_vit.json`" in line]
    assert "experiments/train_vit.py --smoke`" in vit and "test accuracy 87.5 % (2.0 min)" in vit
    assert "not recorded" not in vit and "cores" in vit and "jax " in vit
    [other] = [line for line in text.splitlines() if "`nobody.json`" in line]
    assert other.count("not recorded") == 5 and "no headline figure" in other
    assert index.main(["--results", str(results), "--check"]) == 0
    common.write(results, "train_vit", {"minutes": 2.0, "test_accuracy": 0.9})  # a new run
    capsys.readouterr()
    assert index.main(["--results", str(results), "--check"]) == 1
    [line] = capsys.readouterr().err.splitlines()
    assert "INDEX.md is stale" in line
    with pytest.raises(SystemExit) as done:
        index.main(["--results", str(tmp_path / "none")])
    assert done.value.code == 2


def test_a_cli_record_is_stamped_with_the_make_target(tmp_path):
    """`provenance.py FILE COMMAND...` (the Makefile's CLI-written results): the record keeps
    its fields under this run's provenance, the command line the target's."""
    path = tmp_path / "model.json"
    path.write_text(json.dumps({"steps": 375, "evals": [0.85]}))
    script = Path(__file__).parents[1] / "experiments" / "provenance.py"
    done = subprocess.run([sys.executable, str(script), str(path), "make", "finefood-model"],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    record = json.loads(path.read_text())
    assert record["steps"] == 375 and record["evals"] == [0.85]
    got = record["provenance"]
    assert got["command"] == "make finefood-model" and len(got["commit"]) == 40
    assert got["machine"]["cores"] and got["date"] and got["packages"]["jax"]
