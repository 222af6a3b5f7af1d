"""Evaluation on the device against the host path it replaced: the cloze and perplexity scores
of the GPT-2 task model, both ways, in one run.

Command:  .venv/bin/python experiments/bench_eval.py          (about 5 minutes on 2 cores)
Smoke:    .venv/bin/python experiments/bench_eval.py --smoke  (seconds; run by the tests)

`host`: what `tasks` did before, kept here as the reference: every batch's `[B, T, V]` logits
come back to the host and the log-softmax runs in float64 NumPy (`host_cloze_scores`).
`device`: `partition.next_token_logprobs`, the log-softmax inside the compiled program, only
`[B, T]` back. Both score the same questions (and rows) at the same (N, CR) cells; each cell
runs once to compile, then is timed over every question. The two must pick the same options
(the script checks it). Writes experiments/results/bench_eval.{json,md}.
"""

from __future__ import annotations

import dataclasses
import time

import common
import numpy as np

CELLS = [(1, 1), (2, 8), (4, 16), (8, 32)]  # (N, CR); N = 1 is the single-device program


@dataclasses.dataclass
class Config:
    smoke: bool = common.setting(False, "2 questions, 2 rows, one cell")
    questions: int = common.setting(48, "cloze questions")
    rows: int = common.setting(32, "perplexity rows of 256 tokens")
    out: str | None = common.output(None, "results folder")


def host_cloze_scores(model, batch, target, mesh, plan) -> np.ndarray:
    """The replaced path: full logits to the host, float64 log-softmax there."""
    from prism_jax.partition import infer

    logits = infer(model, batch, mesh=mesh, plan=plan)["logits"].astype(np.float64)
    ids = batch["input_ids"]
    rows, cols = np.nonzero(target[:, 1:])
    picked = logits[rows, cols]
    top = picked.max(-1, keepdims=True)
    lse = top[:, 0] + np.log(np.exp(picked - top).sum(-1))
    logp = picked[np.arange(len(rows)), ids[rows, cols + 1]] - lse
    return np.bincount(rows, weights=logp, minlength=len(ids))


def host_perplexity(model, ids, mesh, plan, batch_size=16) -> float:
    from prism_jax.partition import infer

    nll, count = 0.0, 0
    for start in range(0, len(ids), batch_size):
        rows = ids[start : start + batch_size]
        logits = infer(model, {"input_ids": rows}, mesh=mesh, plan=plan)["logits"]
        logits = logits[:, :-1].astype(np.float64)
        logp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
        nll -= float(np.take_along_axis(logp, rows[:, 1:, None], axis=-1).sum())
        count += rows[:, 1:].size
    return float(np.exp(nll / count))


def timed_twice(fn):
    """(value, seconds of the second call): the first compiles."""
    fn()
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def measure(model, batches, rows_ids, mesh, plan) -> dict:
    """Both paths at one (mesh, plan): cloze picks and perplexity, with their times."""
    from prism_jax.data import cloze
    from prism_jax.evaluation import metrics
    from prism_jax.partition import next_token_logprobs

    def host():
        return [host_cloze_scores(model, b, t, mesh, plan).argmax() for b, t in batches]

    def device():
        picks = []
        for b, t in batches:
            where, weights = cloze.scored_positions(t)
            logp = next_token_logprobs(model, b, mesh=mesh, plan=plan, where=where)
            picks.append(cloze.sequence_scores(logp, weights).argmax())
        return picks

    picks_host, host_s = timed_twice(host)
    picks_device, device_s = timed_twice(device)
    ppl_host, ppl_host_s = timed_twice(lambda: host_perplexity(model, rows_ids, mesh, plan))
    ppl_device, ppl_device_s = timed_twice(
        lambda: metrics.perplexity(model, rows_ids, mesh=mesh, plan=plan)
    )
    return {"cloze_host_s": host_s, "cloze_device_s": device_s,
            "cloze_speedup": host_s / device_s,
            "same_picks": bool(np.array_equal(picks_host, picks_device)),
            "ppl_host_s": ppl_host_s, "ppl_device_s": ppl_device_s,
            "ppl_speedup": ppl_host_s / ppl_device_s,
            "ppl_host": ppl_host, "ppl_device": ppl_device}  # fmt: skip


def main(argv=None):
    args = common.parse(Config, __doc__, argv)

    import prism_jax as pj
    from prism_jax.data import cloze, tfds_builders
    from prism_jax.evaluation import tasks

    model = pj.load_pretrained(common.HERE / "models" / "gpt2-wikipedia")
    n_q, n_rows = (2, 2) if args.smoke else (args.questions, args.rows)
    cells = CELLS[1:2] if args.smoke else CELLS
    records = tfds_builders.records("wikipedia_cloze", "test", n_q)
    text = lambda v: v.decode() if isinstance(v, bytes) else str(v)  # noqa: E731
    keys = ("context", "question", "options", "answer")
    questions = [{k: (list(map(text, r[k])) if k == "options" else text(r[k])) for k in keys}
                 for r in records]  # fmt: skip
    batches = [cloze.candidates(q, model.tokenizer, 256) for q in questions]
    rows_ids = tasks.load(model, "wikipedia_leads", limit=n_rows).train_examples["input_ids"]

    rows = []
    for n, cr in cells:
        mesh, plan = (None, None) if n == 1 else (pj.edge_mesh(n), pj.Plan(cr=cr))
        row = {"devices": n, "cr": cr, "questions": n_q, "rows": n_rows}
        row |= measure(model, batches, rows_ids, mesh, plan)
        print(row, flush=True)
        rows.append(row)
        if not row["same_picks"] or abs(row["ppl_host"] / row["ppl_device"] - 1) > 1e-4:
            raise SystemExit(f"the two paths disagree at N = {n}, CR = {cr}")
    text = markdown(rows)
    print(text)
    common.save(args, "bench_eval", rows, text)


def markdown(rows) -> str:
    lines = [
        "| N | CR | cloze host (s) | cloze device (s) | speed-up | ppl host (s) "
        "| ppl device (s) | speed-up |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['devices']} | {r['cr']} | {r['cloze_host_s']:.2f} | {r['cloze_device_s']:.2f} "
        f"| {r['cloze_speedup']:.2f}x | {r['ppl_host_s']:.2f} | {r['ppl_device_s']:.2f} "
        f"| {r['ppl_speedup']:.2f}x |"
        for r in rows
    ]
    q, n = rows[0]["questions"], rows[0]["rows"]
    return (
        f"GPT-2 task model, {q} cloze questions (10 options x 256 tokens each) and {n} "
        "perplexity rows of 256 tokens per cell; seconds of a second (compiled) pass.\n\n"
        + "\n".join(lines)
        + "\n"
    )


if __name__ == "__main__":
    common.run_script(main)
