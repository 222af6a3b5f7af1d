"""Single-device forward of all-MiniLM-L6-v2: prism-jax (JAX/XLA) against transformers (PyTorch).

Command:  .venv/bin/python experiments/bench_forward.py        (about 1 minute on 2 cores)
Smoke:    .venv/bin/python experiments/bench_forward.py --smoke (seconds; run by the tests)

Both run in this process on the same inputs (batch 8, T in {128, 512}, every token valid).
JAX's first call (trace + compile) is reported apart from its steady state; steady states
are medians of `--repeats` calls. The figure of merit is jax / torch wall time (< 1: faster).
Writes experiments/results/bench_forward.{json,md}.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import common
import numpy as np


@dataclasses.dataclass(frozen=True)
class Config:
    batch: int = 8
    lengths: tuple[int, ...] = (128, 512)
    repeats: int = 10


SMOKE = Config(batch=2, lengths=(16,), repeats=2)


def run(cfg: Config) -> list[dict]:
    import jax
    import torch
    from transformers import BertModel

    import prism_jax as pj
    from prism_jax.data import sources
    from prism_jax.evaluation.timing import timed
    from prism_jax.partition import program

    torch.set_num_threads(os.cpu_count())
    model = pj.load_pretrained(sources.minilm_dir())
    reference = BertModel.from_pretrained(sources.minilm_dir()).eval()
    fn = program(model.graphdef, model.config, pj.Plan(strategy="single"), None)
    rows = []
    for t in cfg.lengths:
        ids = np.random.default_rng(t).integers(1000, 30000, (cfg.batch, t)).astype(np.int32)
        batch = {
            "input_ids": ids,
            "attention_mask": np.ones_like(ids),
            "token_type_ids": np.zeros_like(ids),
        }
        inputs, valid = model.prepare(batch)
        run_jax = functools.partial(
            lambda *a: jax.block_until_ready(fn(*a)), model.params, inputs, valid
        )
        compile_s, jax_s = timed(run_jax, repeats=cfg.repeats)
        run_torch = functools.partial(reference, **{k: torch.tensor(v) for k, v in batch.items()})
        with torch.inference_mode():
            _, torch_s = timed(run_torch, repeats=cfg.repeats)
        rows.append(
            {
                "batch": cfg.batch,
                "tokens": t,
                "jax_first_call_s": compile_s,
                "jax_s": jax_s,
                "torch_s": torch_s,
                "jax_over_torch": jax_s / torch_s,
            }
        )
    return rows


def main(argv=None):
    from prism_jax.cli.parser import Parser

    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (writes only to --out)")
    parser.add_argument("--repeats", type=common.positive_int, default=Config.repeats)
    common.add_out(parser)
    args = parser.parse_args(argv)
    cfg = SMOKE if args.smoke else Config(repeats=args.repeats)
    rows = run(cfg)
    table = common.speed_table(rows)
    print(table)
    text = "# all-MiniLM-L6-v2 forward, one CPU device\n\n" + table + "\n"
    common.save(args, "bench_forward", rows, text)


if __name__ == "__main__":
    common.run_script(main)
