"""The latency model (`latency`) and the planner (`planner.plan_for`, `prism-jax plan`)."""

import dataclasses
import json
import re

import pytest

import prism_jax as pj
from prism_jax import cli, cost, latency, models, planner
from tests.test_tasks import _lm

BERT = pj.PRESETS["bert-base"]()


def test_latency_terms_are_the_stated_model():
    plan, link = pj.Plan(cr=16), latency.Link.parse("10mbit", "5ms")
    profile = latency.Profile(2.0, collective_s=0.001, node_speed=(1, 0.5, 1, 1))
    got = latency.predict(BERT, plan, devices=4, seq_len=256, link=link, profile=profile)
    share = cost.flops_closed_form(BERT, plan, devices=4, seq_len=256) / cost.flops_closed_form(
        BERT, pj.Plan(strategy="single"), devices=1, seq_len=256
    )
    sent = cost.bytes_closed_form(BERT, plan, devices=4, seq_len=256)
    assert got.compute == pytest.approx(2.0 * share / 0.5)  # the slowest node sets the pace
    assert got.rounds == pytest.approx(12 * 3 * 2 * 0.005)  # depth x (N - 1) x round trip
    assert got.transfer == pytest.approx(3 * sent * 8 / 10e6)
    assert got.overhead == pytest.approx(12 * 0.001)
    assert got.total == pytest.approx(sum(got))
    alone = latency.predict(BERT, pj.Plan(strategy="single"), devices=4, seq_len=256,
                            link=link, profile=profile)  # fmt: skip
    assert alone == (2.0, 0.0, 0.0, 0.0)  # on the fastest node, nothing sent


def test_latency_rounds_by_transport():
    """The link's latency by transport (experiments/results/collective_probe.md): a round trip
    per step, N - 1 steps for the all-gather, one for the all-to-all; the stream waits for no
    receiver: a one-way delay a layer for an encoder; a causal model's pipeline fills once
    and its blocks, relayed (`stream.routes`), travel while the next layer computes."""
    smol = pj.PRESETS["smollm2-135m"]()
    link, profile = latency.Link.parse("10mbit", "5ms"), latency.Profile(4.0)
    shape = dict(devices=4, seq_len=512, link=link, profile=profile)

    def estimate(cfg, transport):
        return latency.predict(cfg, pj.Plan(cr=16, transport=transport), **shape)

    assert estimate(BERT, "all_to_all").rounds == pytest.approx(12 * 1 * 2 * 0.005)
    assert estimate(BERT, "stream").rounds == pytest.approx(12 * 0.005)
    ring, stream = estimate(smol, "all_gather"), estimate(smol, "stream")
    assert ring.rounds == pytest.approx(30 * 3 * 2 * 0.005)
    assert stream.rounds == pytest.approx(3 * 0.005)  # the last device's lag, once
    assert stream.compute == ring.compute and stream.transfer < ring.transfer / 10
    relayed = ring.transfer * 2 / 3  # N = 4: the busiest uplink two blocks a layer, not three
    assert stream.transfer == pytest.approx(max(relayed - ring.compute, 0) + relayed / 30)
    # the planner puts each plan on its fastest transport among those allowed
    cands = planner.candidates(smol, devices=4, seq_len=512, link=link, profile=profile)
    assert {c.plan.transport for c in cands if c.devices > 2} == {"stream"}
    one = planner.candidates(smol, devices=4, seq_len=512, link=link, profile=profile,
                             transports=("all_gather", "all_to_all"))  # fmt: skip
    assert {c.plan.transport for c in one if c.devices > 2} == {"all_to_all"}


@pytest.mark.parametrize(
    ("text", "bits"),
    [("10mbit", 10e6), ("50Mbit/s", 50e6), ("500kbit", 5e5), ("1gbit", 1e9), ("unlimited", None)],
)
def test_bandwidth_units(text, bits):
    assert latency.parse_bandwidth(text) == (bits or float("inf"))


@pytest.mark.parametrize("text", ["0", "0mbit", "-1mbit", "10parsecs", "fast", ""])
def test_bad_bandwidth_is_refused(text):
    with pytest.raises(pj.PrismError, match="bandwidth"):
        latency.parse_bandwidth(text)


@pytest.mark.parametrize(("text", "seconds"), [("5ms", 0.005), ("200us", 2e-4), ("0", 0.0)])
def test_latency_units(text, seconds):
    assert latency.parse_latency(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["-1", "-1ms", "5", "5 hours", "ms"])
def test_bad_latency_is_refused(text):
    with pytest.raises(pj.PrismError, match="latency"):
        latency.parse_latency(text)


def test_choose_calibrates_fastest_first_and_skips_dominated():
    """A synthetic loss that grows with CR and shrinks with the wire's bits: the choice is the
    fastest candidate within budget, and a candidate dominated by one over budget is never
    calibrated."""
    link, profile = latency.Link.parse("10mbit", "1ms"), latency.Profile(1.0)
    cands = planner.candidates(BERT, devices=4, seq_len=256, link=link, profile=profile)
    assert [c.estimate.total for c in cands] == sorted(c.estimate.total for c in cands)
    bits = {"f32": 32, "bf16": 16, "int8": 8, "int4h": 4}
    asked = []

    def loss(c):
        asked.append(c)
        return c.plan.cr / 64 * (1.5 if c.compressor == "paper" else 1) * (8 / bits[c.plan.wire])

    out = planner.choose(cands, loss, budget=0.2)
    chosen = [c for c in out if c.status == "chosen"]
    assert len(chosen) == 1 and chosen[0].loss <= 0.2
    within = [c for c in cands if c.compressor == "single" or loss(c) <= 0.2]
    assert chosen[0].estimate.total == min(c.estimate.total for c in within)
    failed = [c for c in out if c.status == "over budget"]
    for c in out:
        if c.status == "dominated":
            assert c not in asked[: len(out)] and planner._dominated(c, failed)


def test_a_failed_plan_dominates_only_plans_that_send_less():
    """Groups per token, not the CR: a filled plan (`groups`, cr = 1) over the budget does not
    rule out one with more groups, and does rule out one with fewer."""
    est = latency.Estimate(1.0, 0.0, 0.0, 0.0)

    def cand(groups, devices=4):
        plan = pj.Plan(groups=groups, grouping="tail", sink=1, wire="int4h")
        return planner.Candidate(devices, plan, "fill", est, 0, tokens=128)

    failed = [cand(53)]
    assert not planner._dominated(cand(106), failed)  # twice the groups: calibrate it
    assert planner._dominated(cand(26), failed) and planner._dominated(cand(53, 8), failed)
    assert cand(64).rate == 0.5 and pj.Plan(cr=4).segments(128) / 128 == 0.25


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "cache"


def test_fast_link_distributes_slow_link_stays_on_one_device(cache):
    model = _lm()
    kw = dict(devices=2, limit=2, seq_len=32, cache_dir=cache, profile=latency.Profile(1.0))
    fast = planner.plan_for(model, bandwidth="unlimited", latency="0", max_ppl_rise=1.0, **kw)
    assert fast.devices == 2 and fast.strategy == "prism" and isinstance(fast, pj.Plan)
    slow = planner.plan_for(model, bandwidth="100bit", latency="20ms", max_ppl_rise=1.0, **kw)
    assert slow.devices == 1 and slow.strategy == "single"
    assert slow.chosen.loss == 0 and slow.calibrations == 0  # one device needs no calibration
    # A tighter budget than the fast choice's loss: more bytes (a lower CR or a wider wire), or
    # one device.
    loss = fast.chosen.loss
    assert loss > 0
    tight = planner.plan_for(model, bandwidth="unlimited", latency="0", max_ppl_rise=loss / 2, **kw)
    assert tight.strategy == "single" or (
        tight.chosen.bytes_per_device > fast.chosen.bytes_per_device
    )


def test_calibrations_are_cached_by_model_and_data(cache):
    model = _lm()
    kw = dict(devices=2, bandwidth="unlimited", seq_len=32, cache_dir=cache,
              profile=latency.Profile(1.0), max_ppl_rise=1.0)  # fmt: skip
    first = planner.plan_for(model, limit=2, **kw)
    assert first.calibrations >= 2  # the exact model and at least one plan
    again = planner.plan_for(model, limit=2, **kw)
    assert again.calibrations == 0 and again == first
    assert [c.loss for c in again.candidates] == [c.loss for c in first.candidates]
    other = dataclasses.replace(model, params=models.init(model.config, seed=1).params)
    assert planner.plan_for(other, limit=2, **kw).calibrations >= 2  # a changed model
    assert planner.plan_for(model, limit=3, **kw).calibrations >= 2  # changed data


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--bandwidth", "0"], "bandwidth '0'"),
        (["--bandwidth", "10parsecs"], "bandwidth '10parsecs'"),
        (["--bandwidth", "10mbit", "--latency", "-1"], "latency '-1'"),
        (["--bandwidth", "10mbit", "--latency", "5 fortnights"], "latency"),
        (["--bandwidth", "10mbit", "--max-loss", "200%"], "--max-loss"),
        (["--bandwidth", "10mbit", "--node-speed", "1,0"], "--node-speed"),
        (["--bandwidth", "10mbit", "--collective-ms", "-1"], "--collective-ms"),
    ],
)
def test_bad_plan_flags_are_one_line(flags, message, capsys):
    assert cli.main(["plan", "--model", "nowhere", "--devices", "2", *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_plan_on_the_command_line(hf_models, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("PRISM_JAX_CACHE", str(tmp_path))
    directory = str(hf_models("gpt2_lm")[1])
    capsys.readouterr()  # what building the model printed
    argv = ["plan", "--model", directory, "--devices", "2", "--bandwidth", "unlimited",
            "--limit", "2", "--seq-len", "16", "--max-ppl-rise", "50%",
            "--collective-ms", "0"]  # fmt: skip
    assert cli.main([*argv, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["metric"] == "perplexity" and out["choice"]["status"] == "chosen"
    assert {r["devices"] for r in out["candidates"]} == {1, 2}
    assert (tmp_path / "calibration.json").exists()
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    assert "choice:" in text and "one device" in text
    assert re.search(r"run it: --devices \d --(strategy single|cr \d+ .* --wire \w+)", text)


def test_plan_auto_runs_the_choice(hf_models, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("PRISM_JAX_CACHE", str(tmp_path))
    directory = str(hf_models("gpt2_lm")[1])
    capsys.readouterr()  # what building the model printed
    base = ["--model", directory, "--devices", "2", "--plan", "auto", "--json"]
    fast = ["--bandwidth", "unlimited", "--max-ppl-rise", "50%", "--collective-ms", "0"]
    assert (
        cli.main(["generate", *base, *fast, "--prompt", "good tea", "--max-new-tokens", "2"]) == 0
    )
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert out["devices"] == 2 and out["plan"]["strategy"] == "prism"
    assert re.search(r"--plan auto: (paper|best) CR=\d+ .* on 2 device\(s\)", captured.err)
    assert cli.main(["infer", *base, *fast, "--text", "tea"]) == 0  # fewer tokens than devices
    out = json.loads(capsys.readouterr().out)
    assert out["devices"] == 1
    slow = ["--bandwidth", "100bit", "--latency", "20ms"]
    assert cli.main(["infer", *base, *slow, "--text", "good tea"]) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert out["devices"] == 1 and out["plan"]["strategy"] == "single"
    assert "--plan auto: one device on 1 device(s)" in captured.err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--plan", "auto"], "--plan auto needs the link"),
        (["--plan", "auto", "--bandwidth", "1mbit", "--cr", "4"], "drop --cr"),
        (["--plan", "auto", "--bandwidth", "1mbit", "--cr", "1"], "drop --cr"),  # the default's
        (
            ["--plan", "auto", "--bandwidth", "1mbit", "--transport", "all_to_all"],
            "drop --transport",
        ),  # fmt: skip
        (["--plan", "auto", "--bandwidth", "1mbit", "--wire", "int8"], "drop --wire"),
        (["--plan", "manual"], "invalid choice: 'manual'"),
        (["--bandwidth", "1mbit", "--latency", "5ms"], "--bandwidth, --latency: the planner's"),
        (["--max-ppl-rise", "0.05"], "--max-ppl-rise: the planner's flags apply only with"),
    ],
)
def test_bad_plan_auto_is_one_line(hf_models, flags, message, capsys):
    directory = str(hf_models("gpt2_lm")[1])
    capsys.readouterr()  # what building the model printed
    assert cli.main(["infer", "--model", directory, "--text", "tea", *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["node", "--rank", "0", "--nodes", "2", "--coordinator", "127.0.0.1:1", "--", "infer",
          "--model", "m", "--plan", "auto", "--bandwidth", "10mbit", "--text", "tea"],
         "--plan auto plans once for every node: run it under `prism-jax launch`"),
        (["launch", "--nodes", "2", "--", "infer", "--model", "m", "--plan", "auto", "--text",
          "tea"], "--plan auto needs the link"),
        (["launch", "--nodes", "2", "--", "plan", "--model", "m", "--bandwidth", "1mbit"],
         "plan runs across nodes only to measure them: add --profile"),
        (["plan", "--model", "m", "--devices", "2", "--bandwidth", "1mbit", "--profile"],
         "--profile measures the nodes and the link between them: run `prism-jax launch"),
        (["plan", "--model", "m", "--devices", "2"], "plan needs the link: --bandwidth"),
        (["plan", "--model", "m", "--bandwidth", "1mbit"], "plan needs --devices N"),
        (["plan", "--model", "m", "--bandwidth", "1mbit", "--devices", "4", "--node-speed",
          "1,1"], "--node-speed names 2 nodes, fewer than --devices 4"),
        (["infer", "--model", "m", "--text", "t", "--plan", "auto", "--bandwidth", "1mbit",
          "--devices", "3", "--node-speed", "1,1"], "--node-speed names 2 nodes"),
        (["launch", "--nodes", "2", "--", "plan", "--model", "m", "--profile", "--node-speed",
          "1,2"], "--profile measures what --node-speed states; drop --node-speed"),
    ],
)  # fmt: skip
def test_planning_across_nodes_refuses_in_one_line(argv, message, capsys):
    """Checked before a model loads or a node starts."""
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


@pytest.mark.parametrize(("command", "preset"), [("infer", "bert-base"), ("eval", "gpt2"),
                                                ("generate", "smollm2-135m")])  # fmt: skip
def test_flags_name_every_candidate_plan(command, preset):
    """What `launch --plan auto` passes to the nodes is the plan the planner chose."""
    from prism_jax.cli.parser import build_parser, plan_of
    from prism_jax.cli.planning import flags

    cfg = pj.PRESETS[preset]()
    link, profile = latency.Link.parse("10mbit"), latency.Profile(1.0)
    source = {"infer": ["--text", "tea"], "eval": [], "generate": ["--prompt", "tea"]}[command]
    plans = planner.candidates(cfg, devices=3, seq_len=64, link=link, profile=profile)
    assert len(plans) > 40
    for c in plans:
        args = build_parser().parse_args([command, "--model", "m", *source,
                                          *flags(c.plan, command)])  # fmt: skip
        cr = args.cr[0] if command == "eval" else None
        got = plan_of(args, cr, cfg)
        if c.plan.strategy == "single" and command == "eval":
            assert got == pj.Plan(cr=1)  # prism at CR 1 on one device: the exact model
        else:
            assert got == c.plan, (command, c.plan)


def test_profile_from_measured_takes_the_stated_round_trips_out():
    measured = {"single_s": 2.0, "node_s": [2.0, 4.0, 1.0], "node_speed": [1.0, 0.5, 2.0],
                "round_s": 0.030, "bandwidth": 1e6}  # fmt: skip
    got = latency.Profile.from_measured(measured, latency=0.005)
    assert got == latency.Profile(2.0, collective_s=0.030 - 2 * 2 * 0.005,
                                  node_speed=(1.0, 0.5, 2.0))  # fmt: skip
    assert latency.Profile.from_measured(measured, latency=0.02).collective_s == 0.0


def _launched(*command, **env):
    from tests.test_cluster import _launch

    done = _launch(2, 120, *command, **env)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout), done.stderr


def test_launch_plan_auto_starts_the_choice(hf_models, tmp_path):
    """The launcher plans once; the nodes it starts run the choice, on its devices."""
    directory = hf_models("gpt2_lm")[1]
    common = ["--model", directory, "--plan", "auto", "--max-ppl-rise", "50%", "--json"]
    out, err = _launched(
        "infer",
        *common,
        "--text",
        "good tea and more",
        "--bandwidth",
        "unlimited",
        "--collective-ms",
        "0",
        PRISM_JAX_CACHE=str(tmp_path),
    )
    named = re.search(r"--plan auto: the nodes run infer (.*)", err).group(1).split()
    assert out["devices"] == 2 and out["plan"]["strategy"] == "prism"
    assert named[named.index("--cr") + 1] == str(out["plan"]["cr"])
    assert named[named.index("--wire") + 1] == out["plan"]["wire"]
    out, err = _launched(
        "infer", *common, "--text", "tea", "--bandwidth", "100bit", PRISM_JAX_CACHE=str(tmp_path)
    )
    assert out["devices"] == 1 and out["plan"]["strategy"] == "single"
    assert "--plan auto: the nodes run infer --strategy single" in err


def test_plan_profile_measures_the_nodes(hf_models, tmp_path):
    """`launch -- plan --profile`: each node's time and the link's all-gathers, measured, are
    the profile the candidates are predicted with."""
    directory = hf_models("gpt2_lm")[1]
    out, _ = _launched(
        "plan",
        "--model",
        directory,
        "--profile",
        "--limit",
        "2",
        "--seq-len",
        "16",
        "--max-ppl-rise",
        "50%",
        "--json",
        PRISM_JAX_CACHE=str(tmp_path),
    )
    m = out["profile"]
    assert len(m["node_s"]) == 2 and m["single_s"] == m["node_s"][0] > 0
    assert m["node_speed"] == pytest.approx([m["node_s"][0] / t for t in m["node_s"]])
    assert m["round_s"] > 0 and (m["bandwidth"] is None or m["bandwidth"] > 0)
    depth = pj.load_pretrained(str(directory)).config.depth
    for row in out["candidates"]:
        terms = row["terms_s"]
        if row["devices"] == 1:
            assert terms["compute"] == pytest.approx(m["single_s"] / max(m["node_speed"]))
        else:  # --latency 0: the measured round is the collective's own cost
            assert terms["overhead"] == pytest.approx(depth * m["round_s"])
            assert terms["rounds"] == 0


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        (dict(devices=0), "devices must be an integer >= 1"),
        (dict(bandwidth="0"), "bandwidth '0'"),
        (dict(latency=-1), "latency -1"),
        (dict(max_loss=2.0), "max_loss must be a share"),
        (dict(max_ppl_rise=-0.1), "max_ppl_rise must be a share"),
        (dict(limit=0), "limit must be an integer >= 1"),
        (dict(node_speed=(1, 0)), "node speeds must be > 0"),
    ],
)
def test_bad_plan_for_arguments_name_the_field(kw, message, tmp_path):
    args = dict(devices=2, bandwidth="10mbit", latency="1ms", cache_dir=tmp_path) | kw
    with pytest.raises(pj.PrismError, match=re.escape(message)):
        pj.plan_for(_lm(), **args)


def test_serve_takes_plan_auto_flags(capsys):
    """`serve --plan auto` checks the planner's flags before anything loads."""
    assert cli.main(["serve", "--model", "nowhere", "--plan", "auto"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--plan auto needs the link" in err, err


def test_fill_takes_the_most_groups_within_the_budget():
    cfg = pj.PRESETS["smollm2-135m"]()
    shape = dict(devices=4, seq_len=256)
    budget = cost.bytes_closed_form(cfg, pj.Plan(cr=16), **shape)
    best = pj.Plan.best(1, cfg, wire="int4h", sink=1)
    got = planner.fill(cfg, best, budget, **shape)
    assert got.groups > 64 / 16 and got.cr == 1
    assert cost.bytes_closed_form(cfg, got, **shape) <= budget
    more = dataclasses.replace(got, groups=got.groups + 1)
    assert cost.bytes_closed_form(cfg, more, **shape) > budget
    assert planner.fill(cfg, best, 10**9, **shape).groups == 0  # every token alone fits
    with pytest.raises(pj.PrismError, match="holds no group"):
        planner.fill(cfg, best, 10, **shape)
    with pytest.raises(pj.PrismError, match="not 'segments'"):
        planner.fill(cfg, pj.Plan(), budget, **shape)
    for bad, message in ((float("nan"), "budget must be"), (1000.5, "budget must be"),
                         (None, "budget must be"), (True, "budget must be")):  # fmt: skip
        with pytest.raises(pj.PrismError, match=message):
            planner.fill(cfg, best, bad, **shape)
    with pytest.raises(pj.PrismError, match="seq_len must be an integer >= 4"):
        planner.fill(cfg, best, budget, devices=4, seq_len=2)
    with pytest.raises(pj.PrismError, match="devices must be an integer >= 2"):
        planner.fill(cfg, best, budget, devices=0, seq_len=256)
