"""Fine-tuning: the loss falls (single, prism); kill and resume gives the same result."""

import dataclasses
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

import prism_jax as pj
from prism_jax import models
from prism_jax.training import train
from tests import tiny
from tests.conftest import FAST_COMPILE


def _examples(name, rng, n=8, tokens=12):
    batch = tiny.random_batch(name, rng, batch=n, tokens=tokens)
    batch["attention_mask"][:] = 1
    batch["attention_mask"][::3, tokens - 4 :] = 0  # some padding
    if name == "bert_cls":
        batch["labels"] = rng.integers(0, 3, n)
    return batch


def _params(model):
    return [np.asarray(x) for x in jax.tree.leaves(model.params)]


@pytest.mark.parametrize(
    ("name", "plan", "n"),
    [
        ("bert_cls", pj.Plan(strategy="single"), None),
        ("bert_cls", pj.Plan(cr=2), 4),
        ("gpt2_lm", pj.Plan(cr=3), 4),
    ],
)
def test_a_few_steps_lower_the_loss(name, plan, n, hf_models, rng):
    model = pj.load_pretrained(hf_models(name)[1])
    examples = _examples(name, rng)
    cfg = train.TrainConfig(steps=6, batch_size=8, lr=3e-3)  # full batch: the same data each step
    run = train.train(
        model, examples, cfg, plan=plan, mesh=pj.edge_mesh(n) if n else None, progress=False
    )
    assert run.losses[-1] < 0.8 * run.losses[0]
    # the trained model serves inference as any other
    out = pj.infer(run.model, {k: v for k, v in examples.items() if k != "labels"})
    assert np.isfinite(out["logits"]).all()


def test_schedule_warms_up_then_decays_to_final_lr():
    cfg = train.TrainConfig(steps=100, lr=2e-3, warmup=10, final_lr=0.0)
    lr = train.schedule(cfg)
    assert lr(0) == 0 and lr(5) == pytest.approx(1e-3) and lr(10) == pytest.approx(2e-3)
    assert lr(55) == pytest.approx(1e-3) and lr(100) == pytest.approx(0, abs=1e-12)
    assert train.schedule(train.TrainConfig(steps=100, lr=2e-3))(100) == pytest.approx(2e-4)
    with pytest.raises(pj.PrismError, match="final_lr"):
        train.TrainConfig(steps=1, final_lr=1.5)


def test_batches_are_a_function_of_seed_and_step():
    a = [train.batch_indices(10, 4, 7, s) for s in range(5)]
    b = [train.batch_indices(10, 4, 7, s) for s in range(5)]
    assert all((x == y).all() for x, y in zip(a, b, strict=True))
    first_epoch = np.concatenate(a)[:10]
    assert sorted(first_epoch) == list(range(10))  # each example once per epoch


SCRIPT = textwrap.dedent("""
    import os, signal, sys
    import numpy as np
    import prism_jax as pj
    from prism_jax.training import train
    from tests import tiny
    directory, out, kill_at = sys.argv[1], sys.argv[2], int(sys.argv[3])
    model = pj.load_pretrained(sys.argv[4])
    devices = int(sys.argv[5])
    plan = pj.Plan(strategy="prism", cr=2) if devices > 1 else pj.Plan(strategy="single")
    mesh = pj.edge_mesh(devices) if devices > 1 else None
    rng = np.random.default_rng(0)
    examples = tiny.random_batch("bert_cls", rng, batch=12, tokens=10)
    examples["labels"] = rng.integers(0, 3, 12)
    def die(step):
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
    cfg = train.TrainConfig(steps=9, batch_size=4, lr=1e-3, checkpoint_every=3)
    run = train.train(model, examples, cfg, plan=plan, mesh=mesh, checkpoint_dir=directory,
                      progress=False, on_checkpoint=die)
    np.savez(out, *[np.asarray(x) for x in __import__("jax").tree.leaves(run.model.params)],
             resumed=-1 if run.resumed_from is None else run.resumed_from)
""")


def _train_process(tmp_path, hf_models, directory, out, kill_at, devices):
    return subprocess.run(
        [
            sys.executable,
            "-c",
            SCRIPT,
            str(directory),
            str(out),
            str(kill_at),
            str(hf_models("bert_cls")[1]),
            str(devices),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=str(tmp_path.parent),
        env={
            "PATH": "/usr/bin:/bin",
            "PYTHONPATH": str(__import__("pathlib").Path(__file__).parents[1]),
            "HF_HUB_OFFLINE": "1",
            "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}",
            "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax-cache"),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
        },
    )


@pytest.mark.parametrize(  # single (slow: the mesh case covers it), and prism over a mesh
    "devices", [pytest.param(1, marks=pytest.mark.slow), 2]
)
def test_killed_run_resumes_to_the_same_parameters(tmp_path, hf_models, devices):
    def process(name, kill_at):
        return _train_process(
            tmp_path, hf_models, tmp_path / name, tmp_path / f"{name}.npz", kill_at, devices
        )

    whole = process("a", kill_at=-1)
    assert whole.returncode == 0, whole.stderr[-2000:]
    killed = process("b", kill_at=6)
    assert killed.returncode == -9  # SIGKILL right after the step-6 checkpoint
    assert not (tmp_path / "b.npz").exists()
    resumed = process("b", kill_at=-1)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    with np.load(tmp_path / "a.npz") as a, np.load(tmp_path / "b.npz") as b:
        assert int(b["resumed"]) == 6 and int(a["resumed"]) == -1
        leaves = [k for k in a.files if k != "resumed"]
        assert leaves and all(np.array_equal(a[k], b[k]) for k in leaves)


def test_corrupt_checkpoint_is_an_error_and_restart_starts_over(tmp_path, hf_models, rng):
    model = pj.load_pretrained(hf_models("bert_cls")[1])
    examples = _examples("bert_cls", rng)
    cfg = train.TrainConfig(steps=2, batch_size=4, lr=1e-3, checkpoint_every=1)
    train.train(model, examples, cfg, checkpoint_dir=tmp_path, progress=False)
    for f in (tmp_path / "2").rglob("*"):
        if f.is_file() and f.stat().st_size > 0:
            f.write_bytes(b"\0garbage")
    longer = train.TrainConfig(steps=3, batch_size=4, lr=1e-3, checkpoint_every=1)
    with pytest.raises(pj.PrismError, match="corrupt or partial"):
        train.train(model, examples, longer, checkpoint_dir=tmp_path, progress=False)
    run = train.train(
        model, examples, longer, checkpoint_dir=tmp_path, restart=True, progress=False
    )
    assert run.resumed_from is None and len(run.losses) == 3


def test_checkpoints_resume_only_their_own_run(tmp_path, hf_models, rng):
    model = pj.load_pretrained(hf_models("bert_cls")[1])
    examples = _examples("bert_cls", rng)
    cfg = train.TrainConfig(steps=2, batch_size=4, lr=1e-3, checkpoint_every=1)
    train.train(model, examples, cfg, checkpoint_dir=tmp_path, progress=False)
    other_start = dataclasses.replace(model, params=jax.tree.map(lambda x: 0.5 * x, model.params))
    other_data = {**examples, "labels": (examples["labels"] + 1) % 3}
    for m, data, c, why in [
        (model, examples, dataclasses.replace(cfg, lr=2e-3), "lr"),
        (other_start, examples, cfg, "start"),
        (model, other_data, cfg, "data"),
    ]:
        with pytest.raises(pj.PrismError, match=f"another run \\(differing: {why}\\)"):
            train.train(m, data, c, checkpoint_dir=tmp_path, progress=False)
    longer = dataclasses.replace(cfg, steps=3, checkpoint_every=2)  # extending is resuming
    run = train.train(model, examples, longer, checkpoint_dir=tmp_path, progress=False)
    assert run.resumed_from == 2 and len(run.losses) == 1
    with pytest.raises(pj.PrismError, match="up to step 3, past steps=2"):  # never shortened
        train.train(model, examples, cfg, checkpoint_dir=tmp_path, progress=False)
    (tmp_path / "run.json").unlink()
    with pytest.raises(pj.PrismError, match="no run.json"):
        train.train(model, examples, longer, checkpoint_dir=tmp_path, progress=False)


def test_with_classifier_keeps_the_encoder(hf_models):
    base = pj.load_pretrained(hf_models("bert")[1])
    cls = models.with_classifier(base, 4, seed=1)
    assert (cls.config.head, cls.config.num_labels, cls.config.pooler) == ("classifier", 4, True)
    np.testing.assert_array_equal(
        np.asarray(cls.params["word"]["embedding"][...]),
        np.asarray(base.params["word"]["embedding"][...]),
    )
    assert cls.params["head"]["kernel"][...].shape == (30, 4)


def _score(model, dataset, split, limit, max_length, *, devices=None, cr=4):
    """A task metric of `model` computed afresh, under prism at (N, CR)."""
    from prism_jax.evaluation import tasks

    task = tasks.load(model, dataset, split=split, limit=limit, max_length=max_length)
    n = devices or (4 if model.config.family == "vit" else 2)
    return task.score(pj.edge_mesh(n), pj.Plan(cr=cr))


def test_finetune_cli_under_prism_exports(hf_models, tmp_path, capsys):
    import json

    from prism_jax import cli

    out = tmp_path / "exported"
    argv = (
        f"finetune --model {hf_models('bert')[1]} --steps 3 --batch-size 4 --max-length 24 "
        f"--eval-limit 8 --strategy prism --devices 2 --cr 4 "
        f"--checkpoint-dir {tmp_path / 'ck'} --json"
    ).split()
    assert cli.main([*argv, "--out", str(out)]) == 0
    r = json.loads(capsys.readouterr().out)
    exported = pj.load_pretrained(out)
    assert exported.config.head == "classifier"
    # the reported accuracy is the exported model's, under the plan it was trained with
    assert r["evals"][-1]["step"] == 3
    assert r["evals"][-1]["test_accuracy"] == _score(exported, "fine_food_reviews", "test", 8, 24)
    # the same command again resumes from the last checkpoint: nothing left to train, and the
    # model is scored still (a run killed after its last checkpoint reports its test metric)
    assert cli.main(argv) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["resumed_from"] == 3 and again["evals"] == r["evals"][-1:]
    # fewer steps than the directory holds: one line, exit 2, not the longer-trained model
    fewer = [*argv[: argv.index("--steps") + 1], "2", *argv[argv.index("--steps") + 2 :]]
    assert cli.main(fewer) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert "up to step 3, past steps=2" in line and "Traceback" not in line


@pytest.mark.slow  # 40 s; the CLI's training is test_finetune_cli_under_prism_exports
def test_finetune_cli_lm_and_images(hf_models, tmp_path, capsys):
    """`finetune` trains an LM on text (perplexity) and a ViT on images (accuracy) under prism."""
    import json

    from prism_jax import cli, models
    from prism_jax.checkpoints import hf
    from prism_jax.checkpoints.preprocess import ImageProcessor
    from prism_jax.configs import ViTConfig

    argv = (
        f"finetune --model {hf_models('gpt2_lm')[1]} --dataset wikipedia_leads --steps 2 "
        "--batch-size 2 --max-length 32 --eval-split validation --eval-limit 2 "
        "--strategy prism --devices 4 --cr 2 --json"
    ).split()
    assert cli.main([*argv, "--out", str(tmp_path / "lm")]) == 0
    r = json.loads(capsys.readouterr().out)
    lm = pj.load_pretrained(tmp_path / "lm")
    want = _score(lm, "wikipedia_leads", "validation", 2, 32, devices=4, cr=2)
    assert r["evals"][-1]["validation_perplexity"] == pytest.approx(want, rel=1e-6)

    cfg = ViTConfig(
        width=16, depth=1, heads=2, mlp_width=32, act="gelu", ln_eps=1e-6, max_positions=197,
        image_size=28, patch_size=2, channels=1, head="classifier", num_labels=10,
    )  # fmt: skip
    m = models.init(cfg)
    processor = ImageProcessor(size=(28, 28), mean=(0.5,), std=(0.5,), channels=1)
    vit = hf.save_pretrained(
        models.Model(cfg, m.graphdef, m.params, None, processor), tmp_path / "vit"
    )
    argv = (
        f"finetune --model {vit} --dataset fashion_mnist_local --steps 2 --batch-size 4 "
        "--eval-limit 8 --strategy prism --devices 4 --cr 8 --json"
    ).split()
    assert cli.main([*argv, "--out", str(tmp_path / "vit-tuned")]) == 0
    r = json.loads(capsys.readouterr().out)
    tuned = pj.load_pretrained(tmp_path / "vit-tuned")
    assert r["evals"][-1]["test_accuracy"] == _score(
        tuned, "fashion_mnist_local", "test", 8, None, cr=8
    )
    assert cli.main([*argv[:2], str(hf_models("vit_cls")[1]), *argv[3:]]) == 2
    assert "no image processor" in capsys.readouterr().err


def test_a_non_finite_step_stops_training_and_keeps_the_last_good_checkpoint(
    tmp_path, hf_models, rng
):
    model = pj.load_pretrained(hf_models("bert_cls")[1])
    examples = _examples("bert_cls", rng)
    # lr(0) = 0 during warm-up: step 1 is finite and checkpointed; step 2's update overflows.
    cfg = train.TrainConfig(steps=4, batch_size=4, lr=1e38, warmup=3, checkpoint_every=1)
    with pytest.raises(pj.PrismError, match=r"training stopped at step 2: .* not finite .* "
                       r"last good checkpoint \(step 1\) is kept"):  # fmt: skip
        train.train(model, examples, cfg, checkpoint_dir=tmp_path, progress=False)
    from prism_jax.training.checkpoint import Checkpoints

    ckpt = Checkpoints(tmp_path)
    try:
        assert ckpt.latest_step() == 1
        _, state = ckpt.restore(
            {"params": model.params, "opt": train.optimizer(cfg).init(model.params)}
        )
        assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state["params"]))
    finally:
        ckpt.close()


def test_a_checkpoint_directory_serves_one_run_at_a_time(tmp_path, hf_models, rng):
    """A second trainer on a directory in use is refused and told who holds it."""
    import os

    from prism_jax.training.checkpoint import Checkpoints

    holder = Checkpoints(tmp_path)
    try:
        model = pj.load_pretrained(hf_models("bert_cls")[1])
        cfg = train.TrainConfig(steps=1, batch_size=4, lr=1e-3)
        with pytest.raises(
            pj.PrismError, match=rf"in use by another training run \(process {os.getpid()}\)"
        ):
            train.train(
                model, _examples("bert_cls", rng), cfg, checkpoint_dir=tmp_path, progress=False
            )
    finally:
        holder.close()
    run = train.train(
        model, _examples("bert_cls", rng), cfg, checkpoint_dir=tmp_path, progress=False
    )
    assert len(run.losses) == 1  # free again once the holder closed


@pytest.mark.slow  # 20-25 s: two training processes
def test_two_processes_on_one_checkpoint_directory(tmp_path, hf_models):
    """Two fine-tunes started together on one directory: one trains, the other is refused
    with one line naming the holder, and no orbax traceback."""
    argv = [sys.executable, "-m", "prism_jax.cli", "finetune", "--model",
            str(hf_models("bert_cls")[1]), "--steps", "40", "--batch-size", "2",
            "--max-length", "8", "--eval-limit", "2", "--checkpoint-dir", str(tmp_path / "ck"),
            "--json"]  # fmt: skip
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "TFDS_DATA_DIR": str(tmp_path / "tfds"),
           "PYTHONPATH": str(__import__("pathlib").Path(__file__).parents[1]),
           "XLA_FLAGS": FAST_COMPILE}  # fmt: skip
    one_step = [*argv[:7], "1", *argv[8:]]
    first = subprocess.run(one_step, capture_output=True, env=env, text=True)
    assert first.returncode == 0, first.stderr[-2000:]  # TFDS prepared, a run recorded
    procs = [
        subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for _ in range(2)
    ]
    results = [p.communicate(timeout=300) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], results
    err = next(e for p, (_, e) in zip(procs, results, strict=True) if p.returncode == 2)
    assert err.count("\n") == 1 and "is in use by another training run (process " in err, err


def test_mixed_cr_training_draws_each_steps_cr_and_resumes_exactly(
    tmp_path, hf_models, rng, monkeypatch
):
    """Mixed-CR robust fine-tuning: each step runs at a CR drawn from a list (a function of
    seed and step; every CR once in each run of len(crs) steps), and a resumed run ends where
    an uninterrupted one does."""
    model = pj.load_pretrained(hf_models("bert_cls")[1])
    examples = _examples("bert_cls", rng)
    mesh, crs = pj.edge_mesh(2), [1, 4]
    drawn = [train.step_cr(crs, 0, s) for s in range(4)]
    assert sorted(drawn[:2]) == sorted(drawn[2:]) == crs
    built, real = [], train._step_function

    def spy(graphdef, model_cfg, cfg, plan, mesh):  # which plans the steps are built for
        built.append(plan)
        return real(graphdef, model_cfg, cfg, plan, mesh)

    monkeypatch.setattr(train, "_step_function", spy)
    cfg = train.TrainConfig(steps=2, batch_size=4, lr=1e-3, checkpoint_every=1)
    kw = dict(plan=pj.Plan(cr=4, logit_bias="none"), mesh=mesh, progress=False, crs=crs)
    whole = train.train(model, examples, cfg, **kw)
    assert [p.cr for p in built] == drawn[:2]  # one program per CR, in the order drawn
    assert all(p.logit_bias == "none" for p in built)  # the rest of the plan is kept

    class Stop(Exception):
        pass

    def stop(step):
        raise Stop  # interrupted right after the step-1 checkpoint

    with pytest.raises(Stop):
        train.train(model, examples, cfg, checkpoint_dir=tmp_path, on_checkpoint=stop, **kw)
    resumed = train.train(model, examples, cfg, checkpoint_dir=tmp_path, **kw)
    assert resumed.resumed_from == 1
    np.testing.assert_allclose(resumed.losses, whole.losses[1:], rtol=1e-6)
    with pytest.raises(pj.PrismError, match="mixed compression rates need the prism"):
        train.train(model, examples, cfg, progress=False, crs=crs)
    with pytest.raises(pj.PrismError, match="every mixed compression rate"):
        train.train(model, examples, cfg, plan=pj.Plan(cr=4), mesh=mesh, crs=[2, 0])


def _kl(teacher, logits):
    """KL(softmax(teacher) || softmax(logits)) over the last axis, in float64 NumPy."""
    t = np.asarray(teacher, np.float64) - np.log(np.exp(teacher).sum(-1, keepdims=True))
    q = np.asarray(logits, np.float64) - np.log(np.exp(logits).sum(-1, keepdims=True))
    return (np.exp(t) * (t - q)).sum(-1)


def test_distillation_pulls_toward_the_exact_starting_model(hf_models, rng):
    """The term is KL(teacher || model), weighted like the loss; in training it is added to
    the cross-entropy with the starting model run exactly as the teacher, and the trained
    model's compressed predictions stay closer to the exact starting ones than without it."""
    logits, teacher = rng.standard_normal((2, 3, 5)).astype(np.float32)
    kl = _kl(teacher, logits)
    w = np.array([1, 0, 1], np.float32)
    assert float(train.distillation("classifier", logits, teacher, w)) == pytest.approx(kl.mean())
    assert float(train.distillation("lm", logits, teacher, w)) == pytest.approx(kl @ w / 2)
    assert float(train.distillation("classifier", teacher, teacher, w)) == pytest.approx(
        0, abs=1e-6
    )

    model = pj.load_pretrained(hf_models("bert_cls")[1])
    examples = _examples("bert_cls", rng)
    inputs = {k: v for k, v in examples.items() if k != "labels"}
    mesh, plan = pj.edge_mesh(2), pj.Plan(cr=4)
    cfg = train.TrainConfig(steps=4, batch_size=8, lr=3e-3)  # full batch: the same data each step
    plain = train.train(model, examples, cfg, plan=plan, mesh=mesh, progress=False)
    weight = 10.0
    kept = train.train(model, examples, dataclasses.replace(cfg, distill=weight), plan=plan,
                       mesh=mesh, progress=False)  # fmt: skip
    exact = pj.infer(model, inputs)["logits"]
    start_kl = _kl(exact, pj.infer(model, inputs, mesh=mesh, plan=plan)["logits"]).mean()
    assert start_kl > 1e-4  # CR = 4 moved the predictions
    assert kept.losses[0] == pytest.approx(plain.losses[0] + weight * start_kl, rel=1e-4)
    after = {
        name: _kl(exact, pj.infer(run.model, inputs, mesh=mesh, plan=plan)["logits"]).mean()
        for name, run in (("plain", plain), ("kept", kept))
    }
    assert after["kept"] < 0.5 * after["plain"], after


@pytest.mark.parametrize(
    ("name", "plan", "n"),
    [  # prism+ without its tilt: the tilt's attention is its own (layers.Attention._tilted)
        ("llama_lm", dataclasses.replace(pj.Plan.best(3), value_tilt=False), 2),
        ("bert_cls", pj.Plan(strategy="single"), None),
    ],
)
@pytest.mark.slow  # 30 s each; the tiled core's VJP against dense: test_attention
def test_training_through_the_tiled_core_equals_training_through_dense(
    name, plan, n, hf_models, rng, monkeypatch
):
    """`attend` picks `tiled` (with its own VJP) from `TILED_FROM` keys on: through it, inside
    the mesh's `shard_map` and the scanned layers, a few steps give the losses that `dense`
    gives, and one step's gradients equal dense's (grouped KV heads and k-means groups
    included). What the cores compute is compared, not parameters after AdamW, which divides
    by the root of tiny second moments and so grows two correct cores' rounding apart."""
    from prism_jax import attention, partition

    model = pj.load_pretrained(hf_models(name)[1])
    examples = _examples(name, rng)
    labels = np.asarray(examples.get("labels", np.zeros(1)), np.int32)
    hf = {k: v for k, v in examples.items() if k != "labels"}
    cfg = train.TrainConfig(steps=3, batch_size=8, lr=3e-3)
    losses, grads = {}, {}
    for core, tiled_from in (("dense", 10**9), ("tiled", 1)):
        monkeypatch.setattr(attention, "TILED_FROM", tiled_from)
        partition.program.cache_clear()  # compiled programs keep the core they were traced with
        train._step_function.cache_clear()
        jax.clear_caches()
        mesh = pj.edge_mesh(n) if n else None
        run = train.train(model, examples, cfg, plan=plan, mesh=mesh, progress=False)
        losses[core] = run.losses
        params = partition.place(model, mesh) if mesh else model.params
        batch = train._step_inputs(model, hf, labels, np.arange(8), mesh)
        fn = jax.jit(train.gradients(model.graphdef, model.config, cfg, plan, mesh))
        grads[core] = models.flat_params(fn(params, None, *batch)[1])
    partition.program.cache_clear()
    train._step_function.cache_clear()
    np.testing.assert_allclose(losses["tiled"], losses["dense"], rtol=1e-5)
    assert grads["tiled"].keys() == grads["dense"].keys()
    for path, dense in grads["dense"].items():
        np.testing.assert_allclose(grads["tiled"][path], dense, rtol=1e-4, atol=1e-5, err_msg=path)
