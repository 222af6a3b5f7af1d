"""GPT-2 against compression: Wikipedia perplexity and the CBT-style cloze test.

Command:  .venv/bin/python experiments/table_gpt2.py          (about 30 minutes on 2 cores)
Smoke:    .venv/bin/python experiments/table_gpt2.py --smoke  (seconds; run by the tests)

The GPT-2 task model (experiments/models/gpt2-wikipedia, `train_gpt2.py`) with the
partition-aware causal mask, at N in {2, 4, 8}, CR from 1 up to the local length, training-free:
held-out perplexity on packed 256-token rows of the test leads (both logit biases) and cloze
accuracy on the `wikipedia_cloze` questions (10 options, chance 10 %). Writes
experiments/results/table_gpt2.{json,md,png}.
"""

from __future__ import annotations

import dataclasses

import common

MODEL = common.HERE / "models" / "gpt2-wikipedia"


@dataclasses.dataclass
class Config:
    smoke: bool = common.setting(False, "a few rows, N = 8, seconds")
    model: str = common.setting(str(MODEL), "a GPT-2 LM directory")
    rows: int = common.setting(32, "test rows of 256 tokens")
    questions: int = common.setting(136, "cloze questions (0: none)", minimum=0)
    cloze_biases: str = common.setting("log_count,none", "logit biases for the cloze grid")
    out: str | None = common.output(None, "results folder")


def main(argv=None):
    args = common.parse(Config, __doc__, argv)

    import prism_jax as pj
    from prism_jax.evaluation import report, tasks

    model = pj.load_pretrained(args.model)
    rows, questions, devices = (
        (4, 3, (8,)) if args.smoke else (args.rows, args.questions, (2, 4, 8))
    )
    results = []
    task = tasks.load(model, "wikipedia_leads", limit=rows)
    most = 2 if args.smoke else None  # a smoke: CR = 1 and L
    grid = report.grid(model, task, devices=devices, most_crs=most)
    results.append(("GPT-2 Wikipedia perplexity", grid))
    save(results, args)  # the perplexity grid alone first: the cloze grid takes longer
    if questions:
        task = tasks.load(model, "wikipedia_cloze", limit=questions)
        biases = tuple(args.cloze_biases.split(","))
        grid = report.grid(model, task, devices=devices, biases=biases, most_crs=most)
        results.append(("GPT-2 cloze", grid))
        save(results, args)


def save(results, args):
    from prism_jax.evaluation import report

    text = "\n".join(report.markdown(r, title) for title, r in results)
    print(text)
    common.save(args, "table_gpt2", dict(results), text, lambda png: report.plot(results, png))


if __name__ == "__main__":
    common.run_script(main)
