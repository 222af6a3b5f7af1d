"""BERT accuracy against compression: fine-food reviews, padded to 256 and unpadded.

Command:  .venv/bin/python experiments/table_bert.py          (about 25 minutes on 2 cores)
          (the two grids took 758 + 751 s: `seconds` in results/table_bert.json)
Smoke:    .venv/bin/python experiments/table_bert.py --smoke  (seconds; run by the tests)

The BERT task model (`make finefood-model`: all-MiniLM-L6-v2 fine-tuned on the fine-food
reviews) at N in {2, 4, 8}, CR from 1 up to the local length, both logit biases, training-free.
Twice: every input padded to 256 tokens, as the paper appears to do (the remote devices may
then hold nothing but padding), and unpadded (each input split over the N devices at its own
length, `tasks.unpadded`). Writes experiments/results/table_bert.{json,md,png}.
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
MODEL = HERE.parent / "artifacts" / "minilm-finefood"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a few reviews, N = 2, seconds")
    parser.add_argument("--model", default=str(MODEL), help="a BERT classifier directory")
    parser.add_argument("--limit", type=int, default=200, help="test reviews (default 200)")
    parser.add_argument("--out", default=None, help="results folder")
    args = parser.parse_args(argv)

    import prism_jax as pj
    from prism_jax import models
    from prism_jax.data import sources
    from prism_jax.evaluation import report, tasks

    if args.smoke:  # the real encoder with a fresh head: no task model needed
        model = models.with_classifier(pj.load_pretrained(sources.minilm_dir()), 2)
        limit, length, devices = 6, 16, (2,)
    else:
        model, limit, length, devices = pj.load_pretrained(args.model), args.limit, 256, (2, 4, 8)
    results = []
    for layout in ("padded", "unpadded"):
        task = tasks.load(model, "fine_food_reviews", limit=limit, max_length=length, layout=layout)
        title = f"BERT (MiniLM-L6) fine-food, {layout}"
        results.append((title, report.grid(model, task, devices=devices)))
    text = "\n".join(report.markdown(r, title) for title, r in results)
    print(text)
    out = report.results_dir(args.out, args.smoke, HERE / "results")
    report.save(out, "table_bert", dict(results), text, lambda png: report.plot(results, png))


if __name__ == "__main__":
    main()
