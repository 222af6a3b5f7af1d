"""SmolLM2-135M-Instruct (real Q4_1 weights) against compression: perplexity, cloze, prefill.

Command:  .venv/bin/python experiments/table_llama.py          (28 minutes on 2 cores)
Smoke:    .venv/bin/python experiments/table_llama.py --smoke  (2 layers, 30 s; run by the tests)

The Llama-family model of DESIGN.md section 4, dequantized from its GGUF file, exchanging
means of its rotated keys and values per KV head (`exchange="kv"`, section 1a: 2 x 3 x 64 =
384 values per group against 576 for hidden means), with the partition-aware causal mask,
training-free. Measured: held-out perplexity on packed rows of the Wikipedia leads' test split
at N in {2, 4, 8} and CR in {1, 2, ..., 32}, both logit biases, beside the bytes each device
sends (measured from the compiled program); cloze accuracy on `wikipedia_cloze` (10 options,
chance 10 %; contexts left-truncated to 128 tokens) at N = 4; prefill latency of one row at
N = 4 against CR (emulated devices on one machine: the compute of all N devices shares its
cores, so this is not edge latency).
Writes experiments/results/table_llama.{json,md,png}.
"""

from __future__ import annotations

import dataclasses
import time

import common


@dataclasses.dataclass
class Config:
    smoke: bool = common.setting(False, "a few short rows, N = 4, seconds")
    rows: int = common.setting(12, "test rows of --seq-len tokens")
    seq_len: int = common.setting(256, "tokens per perplexity row and prefill")
    questions: int = common.setting(16, "cloze questions (0: none)", minimum=0)
    cloze_len: int = common.setting(128, "tokens per cloze candidate (context left-truncated)")
    max_cr: int = common.setting(32, "largest compression rate")
    out: str | None = common.output(None, "results folder")


def prefill(model, devices: int, crs: list[int], seq_len: int, repeats: int = 3) -> list[dict]:
    """Median wall time of one prefill (batch 1) per CR at N devices, after compiling."""
    import numpy as np

    import prism_jax as pj

    ids = np.random.default_rng(0).integers(100, 40000, (1, seq_len))
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    rows = []
    for name, mesh, plan in [("single", None, pj.Plan(strategy="single"))] + [
        (f"prism CR={cr}", pj.edge_mesh(devices), pj.Plan(cr=cr)) for cr in crs
    ]:
        pj.infer(model, batch, mesh=mesh, plan=plan)  # compile
        times = []
        for _ in range(repeats):
            tic = time.perf_counter()
            pj.infer(model, batch, mesh=mesh, plan=plan)
            times.append(time.perf_counter() - tic)
        rows.append({"run": name, "cr": plan.cr, "seconds": float(np.median(times))})
    base = rows[0]["seconds"]
    return [{**r, "over_single": r["seconds"] / base} for r in rows]


def main(argv=None):
    args = common.parse(Config, __doc__, argv)

    import prism_jax as pj
    from prism_jax.data import sources
    from prism_jax.evaluation import report, tasks

    model = pj.load_pretrained(sources.smollm2_gguf())
    if args.smoke:
        model = common.first_layers(model, 2)
    rows, seq_len, questions, cloze_len, devices = (
        (2, 32, 2, 32, (4,))
        if args.smoke
        else (args.rows, args.seq_len, args.questions, args.cloze_len, (2, 4, 8))
    )
    most = 2 if args.smoke else None
    results = []
    task = tasks.load(model, "wikipedia_leads", limit=rows, max_length=seq_len)
    grid = report.grid(model, task, devices=devices, most_crs=most, max_cr=args.max_cr)
    results.append(("SmolLM2 Wikipedia perplexity", grid))
    save(results, [], args)
    if questions:
        task = tasks.load(model, "wikipedia_cloze", limit=questions, max_length=cloze_len)
        grid = report.grid(model, task, devices=(4,), biases=("log_count",), most_crs=most,
                           max_cr=args.max_cr)  # fmt: skip
        results.append(("SmolLM2 cloze", grid))
        save(results, [], args)
    crs = [1, 8] if args.smoke else [1, 2, 4, 8, 16, 32]
    latency = prefill(model, 4, [c for c in crs if c <= args.max_cr], seq_len)
    save(results, latency, args)


def save(results, latency, args):
    from prism_jax.evaluation import report

    text = "\n".join(report.markdown(r, title) for title, r in results)
    bytes_lines = ["", "Bytes each device sends per inference (K/V exchange, measured):", ""]
    grid = results[0][1]
    bytes_lines += ["| N | CR | bytes |", "|---:|---:|---:|"]
    bytes_lines += [
        f"| {r['devices']} | {r['cr']} | {r['bytes_per_device']:,} |"
        for r in grid["rows"]
        if r["logit_bias"] == "log_count"
    ]
    text += "\n".join(bytes_lines) + "\n"
    if latency:
        text += "\n### Prefill latency, batch 1, N = 4 emulated devices on one machine\n\n"
        text += "| run | seconds | / single |\n|---|---:|---:|\n"
        text += "".join(
            f"| {r['run']} | {r['seconds']:.3f} | {r['over_single']:.2f} |\n" for r in latency
        )
    print(text)
    record = {**dict(results), "prefill_latency": latency}
    common.save(args, "table_llama", record, text, lambda png: report.plot(results, png))


if __name__ == "__main__":
    common.run_script(main)
