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

import dataclasses

import common

MODEL = common.HERE.parent / "artifacts" / "minilm-finefood"


@dataclasses.dataclass
class Config:
    smoke: bool = common.setting(False, "a few reviews, N = 2, seconds")
    model: str = common.setting(str(MODEL), "a BERT classifier directory")
    limit: int = common.setting(200, "test reviews (default 200)")
    out: str | None = common.output(None, "results folder")


def main(argv=None):
    cfg = common.parse(Config, __doc__, argv)

    import prism_jax as pj
    from prism_jax import models
    from prism_jax.data import sources
    from prism_jax.evaluation import report, tasks

    if cfg.smoke:  # the real encoder with a fresh head: no task model needed
        model = models.with_classifier(pj.load_pretrained(sources.minilm_dir()), 2)
        limit, length, devices = 6, 16, (2,)
    else:
        model, limit, length, devices = pj.load_pretrained(cfg.model), cfg.limit, 256, (2, 4, 8)
    results = []
    for layout in ("padded", "unpadded"):
        task = tasks.load(model, "fine_food_reviews", limit=limit, max_length=length, layout=layout)
        title = f"BERT (MiniLM-L6) fine-food, {layout}"
        most = 2 if cfg.smoke else None  # a smoke: CR = 1 and L
        results.append((title, report.grid(model, task, devices=devices, most_crs=most)))
    text = "\n".join(report.markdown(r, title) for title, r in results)
    print(text)
    common.save(cfg, "table_bert", dict(results), text, lambda png: report.plot(results, png))


if __name__ == "__main__":
    common.run_script(main)
