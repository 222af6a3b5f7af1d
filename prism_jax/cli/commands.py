"""What each `prism-jax` subcommand does (`parser` parses; this runs; `printing` prints).

Each runner takes the parsed arguments and returns a JSON-able dict (printed as JSON with
--json, else by the printer of the same name), or None when it reported by itself.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from pathlib import Path

import jax
import numpy as np

import prism_jax as pj
from prism_jax import cluster, cost, models, serve
from prism_jax.checkpoints import atomic, hf
from prism_jax.cli import llm, planning, printing
from prism_jax.cli.parser import build_parser, plan_of, plan_summary
from prism_jax.data import sources, tfds_builders
from prism_jax.errors import PrismError
from prism_jax.evaluation import metrics, sweep, tasks
from prism_jax.training import train
from prism_jax.training.checkpoint import usable_directory


def _outputs_summary(model, out: dict, batch: dict) -> dict:
    """What a person wants to read of each output row."""
    cfg = model.config
    rows = []
    for i in range(len(out["last_hidden_state"])):
        row = {}
        if cfg.head == "classifier":
            logits = out["logits"][i]
            probs = np.exp(logits - logits.max())
            probs /= probs.sum()
            row["label"] = int(probs.argmax())
            row["probability"] = round(float(probs.max()), 4)
        elif cfg.head == "lm":
            last = int(batch["attention_mask"][i].sum()) - 1
            top = np.argsort(out["logits"][i, last])[::-1][:5]
            decode = model.tokenizer.backend.decode if model.tokenizer else str
            row["next_tokens"] = [decode([int(t)]) if model.tokenizer else int(t) for t in top]
        else:
            emb = out["last_hidden_state"][i, 0]
            row["cls_norm"] = round(float(np.linalg.norm(emb)), 4)
        rows.append(row)
    return {"rows": rows}


def _make_batch(model, args) -> dict:
    family = model.config.family
    if args.text is not None:
        if family == "vit":
            raise PrismError("this is a ViT checkpoint: give --image, not --text")
        if model.tokenizer is None:
            raise PrismError("the checkpoint has no tokenizer (tokenizer.json or vocab.txt)")
        return model.tokenizer(args.text, max_length=args.max_length)
    if family != "vit":
        raise PrismError(f"this is a {family} checkpoint: give --text, not --image")
    if model.image_processor is None:
        raise PrismError("the checkpoint has no preprocessor_config.json")
    return model.image_processor(args.image)


def _agreement(model, out: dict, exact: dict, batch: dict) -> dict:
    mask = batch.get("attention_mask", np.ones(out["last_hidden_state"].shape[:2]))
    cos = (
        metrics.mean_pool(out["last_hidden_state"], mask)
        * metrics.mean_pool(exact["last_hidden_state"], mask)
    ).sum(-1)
    result = {
        "cosine_mean": float(cos.mean()),
        "cosine_min": float(cos.min()),
        "max_abs_diff": float(np.abs(out["last_hidden_state"] - exact["last_hidden_state"]).max()),
    }
    if "logits" in out:
        a, b = out["logits"].argmax(-1), exact["logits"].argmax(-1)
        if a.ndim == 2:  # LM: agreement on valid tokens
            valid = np.asarray(mask).astype(bool)
            a, b = a[valid], b[valid]
        result["top1_agreement"] = float((a == b).mean())
    return result


def writable_file(path: str) -> Path:
    """Where a file will be written, exactly as named, checked before any work: a name was
    given, its directory exists and takes new files, and it is not a directory."""
    if not path:
        raise PrismError("give a file name to write to, not an empty one")
    target = Path(path)
    if target.is_dir():
        raise PrismError(f"{target} is a directory, not a file")
    if not target.parent.is_dir():
        raise PrismError(f"cannot write {target}: no directory {target.parent}")
    if not os.access(target.parent, os.W_OK) or (
        target.exists() and not os.access(target, os.W_OK)
    ):
        raise PrismError(f"cannot write {target}: permission denied")
    return target


def _check_finite(out: dict) -> dict:
    bad = sorted(k for k, v in out.items() if not np.isfinite(v).all())
    if bad:
        raise PrismError(f"the model produced NaN or inf in {', '.join(bad)}")
    return out


def _run_infer(args) -> dict:
    plan = plan_of(args)
    save = writable_file(args.save) if args.save is not None else None
    model = pj.load_pretrained(args.model)
    batch = _make_batch(model, args)
    tokens = np.shape(batch["input_ids"])[-1] if args.text else None
    planning.auto(args, model, tokens=tokens)  # --plan auto: the planner's devices and plan
    plan = plan_of(args, cfg=model.config)  # `--compressor prism+` is the model's best
    mesh = pj.edge_mesh(args.devices)
    out = _check_finite(pj.infer(model, batch, mesh=mesh, plan=plan))
    if save and jax.process_index() == 0:  # in a cluster every node holds the gathered outputs
        try:
            with open(save, "wb") as f:  # a path would get ".npz" added by NumPy
                np.savez(f, **out)
        except OSError as e:
            raise PrismError(f"cannot write {save}: {e.strerror or e}") from None
    b, t = out["last_hidden_state"].shape[:2]
    sent = cost.bytes_closed_form(model.config, plan, devices=args.devices, seq_len=t, batch=b)
    full = cost.bytes_closed_form(
        model.config, pj.Plan(strategy="voltage"), devices=args.devices, seq_len=t, batch=b
    )
    result = {
        "model": str(args.model),
        "family": model.config.family,
        "head": model.config.head,
        "devices": args.devices,
        "plan": plan_summary(plan, model.config),
        "batch": b,
        "tokens": t,
        "bytes_per_device": sent,
        "bytes_voltage": full,
        **_outputs_summary(model, out, batch),
    }
    if args.compare:
        result["compare"] = _agreement(model, out, pj.infer(model, batch), batch)
    return result


def _demo_templates(args) -> list[tuple[str, pj.Plan]]:
    """The compressors the demo shows: the one the flags name and, when they name none but
    the paper's, the best preset beside it at about the same bytes."""
    named = plan_of(args, 1)
    if not named.paper or named.wire != "f32" or args.compressor != "paper":
        return [("asked", named)]
    best = pj.Plan.best(1, logit_bias=named.logit_bias, exchange=named.exchange)
    return [("paper", named), ("prism+", best)]


def _run_demo(args) -> dict:
    texts = sources.fine_food_reviews("test")[0][: args.samples]
    model = pj.load_pretrained(sources.minilm_dir())
    rows = []
    for name, template in _demo_templates(args):
        got = metrics.agreement_sweep(
            model,
            texts,
            devices=args.devices,
            crs=args.cr,
            template=template,
            max_length=args.max_length,
            progress=not args.json,
        )
        got = got[1:] if rows else got  # voltage, the reference, once
        rows += [
            {**r, "compressor": "voltage" if r["strategy"] == "voltage" else name} for r in got
        ]
    return {
        "model": "all-MiniLM-L6-v2",
        "data": f"{len(texts)} fine-food test reviews",
        "devices": args.devices,
        "max_length": args.max_length,
        "logit_bias": args.logit_bias,
        "rows": rows,
    }


def _run_eval(args) -> dict:
    plan_of(args, args.cr[0])  # the flags, checked before the model loads
    model = pj.load_pretrained(args.model)
    task = tasks.load(
        model,
        args.dataset,
        split=args.split,
        limit=args.limit,
        max_length=args.max_length,
        layout=args.layout,
    )
    planning.auto(args, model)  # --plan auto: the planner's devices and plan
    plans = [(args.devices, plan_of(args, cr, model.config)) for cr in args.cr]
    rows = sweep.sweep(
        model.config,
        plans,
        task.score,
        metric=task.metric,
        seq_len=task.seq_len,
        progress=not args.json,
        desc=f"{task.metric} N={args.devices}",
    )
    return {
        "model": args.model,
        "dataset": args.dataset,
        "split": args.split,
        "metric": task.metric,
        "examples": task.examples,
        "seq_len": task.seq_len,
        "layout": args.layout,
        "devices": args.devices,
        "rows": rows,
    }


def _check_out(out: str, source: str, force: bool) -> Path:
    """`--out` is checked before training: not the source model, a new or empty directory
    (unless `force`) where files can be written."""
    target = Path(out).absolute()
    if Path(source).exists() and target.resolve() == Path(source).resolve():
        raise PrismError(f"--out {out} is the model being fine-tuned; export to another directory")
    held = source if Path(source).exists() else None  # (a hub id is held nowhere here)
    return atomic.check_target(target, replace=force, what="--out", hint="--force", source=held)


def _run_finetune(args) -> dict:
    plan = plan_of(args)
    if args.mixed_cr and plan.strategy != "prism":
        raise PrismError("--mixed-cr trains under prism: add --strategy prism")
    cfg = train.TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup=args.warmup,
        seed=args.seed,
        distill=args.distill,
        checkpoint_every=args.checkpoint_every,
    )
    if args.checkpoint_dir:
        usable_directory(args.checkpoint_dir, "--checkpoint-dir")
    out = _check_out(args.out, args.model, args.force) if args.out else None
    model = pj.load_pretrained(args.model)
    features = tfds_builders.features(args.dataset)
    if "label" in features and model.config.head != "classifier":
        if args.distill:
            raise PrismError(
                "--distill needs a model that already does the task: this one gets a fresh "
                "classifier head, whose predictions are noise"
            )
        model = models.with_classifier(model, features["label"].num_classes, seed=args.seed)
    train_task = tasks.load(model, args.dataset, split="train", max_length=args.max_length)
    test_task = tasks.load(
        model,
        args.dataset,
        split=args.eval_split,
        limit=args.eval_limit,
        max_length=args.max_length,
    )
    mesh = pj.edge_mesh(args.devices) if plan.strategy != "single" else None

    def evaluate(m):
        return {f"{args.eval_split}_{test_task.metric}": test_task.score(mesh, plan, m)}

    run = train.train(
        model,
        train_task.train_examples,
        cfg,
        plan=plan,
        mesh=mesh,
        checkpoint_dir=args.checkpoint_dir,
        restart=args.restart,
        progress=not args.json,
        evaluate=evaluate,
        crs=args.mixed_cr,
    )
    if not run.evals:  # resumed after its last step (nothing left to train): score it still
        run.evals.append({"step": args.steps, **evaluate(run.model)})
    if out:
        hf.save_pretrained(run.model, out, replace=args.force)
    return {
        "model": args.model,
        "dataset": args.dataset,
        "plan": vars(plan) | {},
        "mixed_cr": args.mixed_cr,
        "distill": args.distill,
        "devices": args.devices,
        "steps": args.steps,
        "resumed_from": run.resumed_from,
        "loss_first": run.losses[0] if run.losses else None,
        "loss_last": run.losses[-1] if run.losses else None,
        "evals": run.evals,
        "out": args.out,
    }


def _run_cost(args) -> dict:
    plan = plan_of(args)
    model = hf.gguf_config(args.model) if str(args.model).endswith(".gguf") else args.model
    _, cfg = cost.resolve_config(model)
    plan = plan_of(args, cfg=cfg)
    report = cost.measure(
        cfg,
        plan,
        devices=args.devices,
        seq_len=args.seq_len,
        batch=args.batch,
        dtype=args.dtype,
    )
    return report.as_dict() | {"model": args.model, "plan": plan_summary(plan, cfg)}


def _rest(args) -> list[str]:
    return args.rest[1:] if args.rest[:1] == ["--"] else args.rest


ACROSS_NODES = (
    "infer",
    "cost",
    "eval",
    "generate",
    "serve",
    "plan",
)  # what `node` and `launch` run


def _inner(args, *, launcher: bool = False) -> argparse.Namespace:
    """The command a node runs, with --devices set to the number of nodes (`launcher`: the
    command as `launch` reads it, where `--plan auto` may plan once for every node)."""
    rest = _rest(args)
    name = rest[0] if rest else ""
    if name not in ACROSS_NODES:
        given = f"{name} does not run across nodes; " if name in RUNNERS else ""
        raise PrismError(
            f"{given}give the command to run after the options: "
            "infer ..., cost ..., eval ..., generate ..., serve ... or plan --profile ..."
        )
    inner = build_parser().parse_args(rest)
    if name == "plan" and not inner.profile:
        raise PrismError("plan runs across nodes only to measure them: add --profile")
    if name == "plan":
        inner.devices = inner.devices or args.nodes
        planning.check_flags(inner, nodes=args.nodes)
    if getattr(inner, "plan", None) == "auto":
        if not launcher:  # each node would calibrate on its own
            raise PrismError(
                "--plan auto plans once for every node: run it under `prism-jax launch`, or "
                "run `prism-jax plan` and give the nodes its choice's flags"
            )
        planning.chosen(inner)  # the link given, no flag the planner sets
    elif name != "plan":  # the plan's flags: before any node starts (or waits for the others)
        plan_of(inner, inner.cr[0] if name == "eval" else None)
    if "--devices" in rest and inner.devices != args.nodes:
        raise PrismError(f"--devices {inner.devices} differs from --nodes {args.nodes}")
    inner.devices = args.nodes
    return inner


def _run_node(args):
    inner = _inner(args)
    result_out = cluster.keep_stdout_for_results()  # the runtime's own prints go to stderr
    timer = cluster.watchdog(args.rank, args.timeout, grace_s=2)  # forming reports first
    cluster.initialize(
        args.rank, args.nodes, args.coordinator, bind=args.bind, timeout_s=args.timeout
    )
    with cluster.fail_fast(args.rank, args.nodes):
        cluster.check_consistent(args.rank, vars(inner))
        if inner.command == "serve":  # formed: a server runs until it is stopped
            timer.cancel()
        result = RUNNERS[inner.command](inner)
    timer.cancel()
    if args.rank == 0 and not isinstance(result, int):
        with contextlib.redirect_stdout(result_out):
            printing.show(inner.command, result, as_json=inner.json)
        result_out.flush()
    return None


def _run_launch(args):
    inner = _inner(args, launcher=True)  # check the command here, before starting any process
    nodes, rest = args.nodes, _rest(args)
    if getattr(inner, "plan", None) == "auto":
        nodes, rest = planning.for_launch(inner, rest)
    serving = rest[:1] == ["serve"]  # runs until stopped: no deadline for a result
    return cluster.launch(nodes, rest, timeout_s=args.timeout, port=args.port, deadline=not serving)


RUNNERS = {
    "infer": _run_infer,
    "demo": _run_demo,
    "eval": _run_eval,
    "cost": _run_cost,
    "finetune": _run_finetune,
    "node": _run_node,
    "launch": _run_launch,
    "convert": llm.run_convert,
    "generate": llm.run_generate,
    "plan": planning.run,
    "serve": serve.run_serve,
}
