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

import argparse
import os
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
)
HERE = Path(__file__).parent
MODEL = HERE / "models" / "gpt2-wikipedia"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a few rows, N = 8, seconds")
    parser.add_argument("--model", default=str(MODEL), help="a GPT-2 LM directory")
    parser.add_argument("--rows", type=int, default=32, help="test rows of 256 tokens")
    parser.add_argument("--questions", type=int, default=136, help="cloze questions (0: none)")
    parser.add_argument(
        "--cloze-biases", default="log_count,none", help="logit biases for the cloze grid"
    )
    parser.add_argument("--out", default=None, help="results folder")
    args = parser.parse_args(argv)

    import prism_jax as pj
    from prism_jax.evaluation import report, tasks

    model = pj.load_pretrained(args.model)
    rows, questions, devices = (
        (4, 3, (8,)) if args.smoke else (args.rows, args.questions, (2, 4, 8))
    )
    results = []
    task = tasks.load(model, "wikipedia_leads", limit=rows)
    results.append(("GPT-2 Wikipedia perplexity", report.grid(model, task, devices=devices)))
    save(results, args)  # the perplexity grid alone first: the cloze grid takes longer
    if questions:
        task = tasks.load(model, "wikipedia_cloze", limit=questions)
        biases = tuple(args.cloze_biases.split(","))
        results.append(("GPT-2 cloze", report.grid(model, task, devices=devices, biases=biases)))
        save(results, args)


def save(results, args):
    from prism_jax.evaluation import report

    text = "\n".join(report.markdown(r, title) for title, r in results)
    print(text)
    out = report.results_dir(args.out, args.smoke, HERE / "results")
    report.save(out, "table_gpt2", dict(results), text, lambda png: report.plot(results, png))


if __name__ == "__main__":
    main()
