"""The headline figure of each kind of results file, for results/INDEX.md (`index.py`): what
the file states as its main measurement, in one line, read from the file's own JSON. A file
of no known kind, or one lacking what its kind's headline reads, says so."""

from __future__ import annotations

import re

NO_HEADLINE = "no headline figure"


def headline(stem: str, record) -> str:
    """The headline of the results file `<stem>.json` holding `record`."""
    for pattern, read in KINDS:
        if re.fullmatch(pattern, stem):
            try:
                return read(record)
            except (KeyError, TypeError, ValueError, IndexError, StopIteration):
                return f"{NO_HEADLINE} (the file lacks what a {pattern} file states)"
    return f"{NO_HEADLINE} (a file of no known kind)"


def rows(record) -> list:
    """A record's rows: the list itself (files written before the provenance was recorded),
    or its "rows"."""
    return record if isinstance(record, list) else record["rows"]


def _span(values) -> str:
    values = sorted(values)
    return f"{values[0]:.2f}" if values[0] == values[-1] else f"{values[0]:.2f}-{values[-1]:.2f}"


def _metric(metric: str, value: float) -> str:
    if metric == "perplexity":
        return f"{value:.4g}"
    return f"{value:.3f}" if metric == "cosine" else f"{100 * value:.1f} %"


def bench_compile(record) -> str:
    ratios = [r["ratio"] for r in rows(record)]
    return f"compile time, scanned / unrolled layers: {_span(ratios)} ({len(ratios)} programs)"


def bench_eval(record) -> str:
    got = rows(record)
    cloze, ppl = _span(r["cloze_speedup"] for r in got), _span(r["ppl_speedup"] for r in got)
    return f"speed-up on the device over the host: cloze {cloze}x, perplexity {ppl}x"


def bench_forward(record) -> str:
    cells = ", ".join(f"{r['jax_over_torch']:.2f} (T = {r['tokens']})" for r in rows(record))
    return f"JAX / PyTorch wall time: {cells}"


def bench_gpu(record) -> str:
    return f"on {record['device']}: JAX / PyTorch {_span(r['ratio'] for r in record['rows'])}"


def bench_llama(record) -> str:
    prefill = _span(r["jax_over_torch"] for r in record["prefill"])
    decode = ", ".join(
        f"{r['jax_tokens_per_s']:.1f} against {r['torch_tokens_per_s']:.1f} (batch {r['batch']})"
        for r in record["decode"]
    )
    return f"prefill JAX / PyTorch {prefill}; greedy decode tokens/s {decode}"


def bench_speed(record) -> str:
    models = {r["model"] for r in record["runs"]}
    single = [r for r in record["runs"] if r["run"] == "single"]
    spans = [f"{m} {_span(r['ratio'] for r in single if r['model'] == m)}" for m in sorted(models)]
    return "single device, JAX / PyTorch wall time: " + ", ".join(spans)


def bench_train_attention(record) -> str:
    steps = [
        r["ratio"] for r in rows(record) if r["program"] == "train step" and r["core"] == "tiled"
    ]
    return f"training step through `tiled` (its VJP) / `dense`: {_span(steps)}"


def edge_testbed(record) -> str:
    cells = []
    for model in sorted({r["model"] for r in record["rows"]}):
        at = {(r["strategy"], r["cr"]): r["latency_s"] for r in record["rows"]
              if r["model"] == model and r["rate_mbit"] == 10}  # fmt: skip
        cells.append(f"{model} {at[('single', 1)] / at[('prism', 16)]:.2f}x")
    return "prism CR = 16 at 10 Mbit/s, N = 2, speed-up over one device: " + ", ".join(cells)


def edge_testbed_v2(record) -> str:
    rows = record["rows"]
    best = max((r for r in rows if r["strategy"] != "single"), key=lambda r: r["speedup"])
    return (f"fastest cell: {best['model']} N = {best['nodes']} {best['plan']} at "
            f"{best['rate_mbit']} Mbit/s, {best['delay_ms']:g} ms: {best['speedup']:.2f}x "
            "one device under the same CPU quota")  # fmt: skip


def finefood_model(record) -> str:
    last = record["evals"][-1]
    return f"test accuracy {100 * last['test_accuracy']:.1f} % after {last['step']} steps"


def gpt2_cloze_all(record) -> str:
    [row] = record["rows"]
    return (
        f"exact cloze accuracy {100 * row['cloze_accuracy']:.1f} % ({record['examples']} questions)"
    )


def overlap_probe(record) -> str:
    slow = [
        r
        for r in record["summary"]
        if r["rate_mbit"] == min(s["rate_mbit"] for s in record["summary"])
    ]
    cells = " / ".join(f"{r['overlap']:.2f}" for r in slow)
    rounds = " / ".join(str(r["layers"]) for r in slow)
    return f"overlap at {slow[0]['rate_mbit']} Mbit/s: {cells} for {rounds} rounds (1: hidden)"


def probe_tilt(record) -> str:
    cells = ", ".join(
        f"{model} {sum(r['tilt'] for r in layers) / len(layers):.3f}"
        for model, layers in record["models"].items()
    )
    return f"relative error of the tilt's term (1: no tilt), mean over layers: {cells}"


def profile_attention(record) -> str:
    layer = " / ".join(f"{r['ratio']:.2f}" for r in rows(record) if r["part"] == "layer")
    tokens = " / ".join(str(r["tokens"]) for r in rows(record) if r["part"] == "layer")
    return f"one bert-base layer, JAX / PyTorch: {layer} at T = {tokens}"


def robust(record) -> str:
    """The arm most accurate at the run's CR, with its distance from exact where the file
    holds it, beside the exact arm's accuracy."""
    cr, results = str(record["cr"]), record["results"]
    exact = results["trained at CR=1"]["accuracy"]["1"]
    scored = {name: r for name, r in results.items() if cr in r["accuracy"]}
    name = max(scored, key=lambda n: scored[n]["accuracy"][cr])
    gap = scored[name].get("gap", {}).get(cr)
    gap = f", {gap[0]:+.1f} ± {gap[1]:.1f} points from exact" if gap else ""
    return (
        f"most accurate at CR = {cr}: {name}, {100 * scored[name]['accuracy'][cr]:.1f} %{gap} "
        f"(exact: {100 * exact:.1f} % at CR = 1)"
    )


def grids(record) -> str:
    """A file of `report.grid` results (table_bert/gpt2/llama/vit): per grid, exact and the
    metric at N = 4 and the largest CR <= 16 with each logit bias."""
    cells = []
    for title, grid in record.items():
        if not isinstance(grid, dict) or "exact" not in grid:
            continue  # (provenance, and the files' other tables)
        at = [r for r in grid["rows"] if r["devices"] == 4 and r["cr"] <= 16]
        cr = max(r["cr"] for r in at)
        value = {r["logit_bias"]: _metric(grid["metric"], r["value"]) for r in at if r["cr"] == cr}
        biases = " / ".join(f"{value[b]} {b}" for b in ("log_count", "none") if b in value)
        cells.append(
            f"{title}: exact {_metric(grid['metric'], grid['exact'])}; N = 4, CR = {cr}: {biases}"
        )
    return "; ".join(cells)


def table_compress(record) -> str:
    """Each change alone (N = 4): the paper's segments against all four, per model and CR."""
    cells = []
    for model, cr in dict.fromkeys((r["model"], r["cr"]) for r in record["alone"]):
        got = {
            r["compressor"]: r["value"]
            for r in record["alone"]
            if (r["model"], r["cr"]) == (model, cr)
        }
        if "segments (paper)" in got and "all four" in got:
            metric = re.search(r"\((\w+)\)", model)[1]
            paper, four = (_metric(metric, got[c]) for c in ("segments (paper)", "all four"))
            cells.append(f"{model} CR = {cr}: {paper} -> {four}")
    return "N = 4, the paper's segments -> all four: " + "; ".join(cells)


def table_cost(record) -> str:
    h = record["headline"]
    return (
        f"{h['model']}, T = {h['seq_len']}, N = {h['devices']}, CR = {h['cr']}: communication "
        f"{-100 * h['comm_reduction']:+.2f} %, "
        f"per-device compute {-100 * h['compute_reduction']:+.2f} %"
    )


def table_generation(record) -> str:
    cells = []
    for model in dict.fromkeys(r["model"] for r in record["rows"]):
        at = {r["compressor"]: r for r in record["rows"]
              if r["model"] == model and r["devices"] == 4 and r["cr"] == 16}  # fmt: skip
        cells.append(f"{model} {100 * at['paper']['token_agreement']:.1f} / "
                     f"{100 * at['prism+']['token_agreement']:.1f} %")  # fmt: skip
    return "N = 4, CR = 16, tokens equal to exact, paper / prism+: " + ", ".join(cells)


def train_gpt2(record) -> str:
    return f"test perplexity {record['test_perplexity']:.1f} ({record['minutes']:.1f} min)"


def train_vit(record) -> str:
    return f"test accuracy {100 * record['test_accuracy']:.1f} % ({record['minutes']:.1f} min)"


def table_sink(record) -> str:
    """The best compressor at the paper's CR = 16 budget, per N, against the paper's."""
    parts = []
    for n in sorted({c["devices"] for c in record["cells"]}):
        cells = [c for c in record["cells"] if c["devices"] == n and c["budget_cr"] == 16]
        papers = [c for c in cells if c["compressor"] == "paper"]
        best = min(cells, key=lambda c: c["perplexity"])
        than = f" (paper {papers[0]['over_exact'] - 1:+.1%})" if papers else ""
        parts.append(f"N = {n}: {best['compressor']} {best['over_exact'] - 1:+.1%}{than}")
    return f"SmolLM2 perplexity vs exact at the paper's CR = 16 bytes: {'; '.join(parts)}"


KINDS = [
    ("bench_compile", bench_compile),
    ("bench_eval", bench_eval),
    ("bench_forward", bench_forward),
    ("bench_gpu", bench_gpu),
    ("bench_llama", bench_llama),
    ("bench_speed", bench_speed),
    ("bench_train_attention", bench_train_attention),
    ("edge_testbed", edge_testbed),
    ("edge_testbed_v2.*", edge_testbed_v2),
    ("finefood_model", finefood_model),
    ("gpt2_cloze_all", gpt2_cloze_all),
    ("overlap_probe", overlap_probe),
    ("probe_tilt", probe_tilt),
    ("profile_attention", profile_attention),
    ("robust_.*", robust),
    ("table_(bert|gpt2|llama|vit)", grids),
    ("table_compress", table_compress),
    ("table_cost", table_cost),
    ("table_generation", table_generation),
    ("table_sink", table_sink),
    ("train_gpt2", train_gpt2),
    ("train_vit", train_vit),
]
