"""How each `prism-jax` result reads: a printer per subcommand for people, strict JSON for
machines (`--json`)."""

from __future__ import annotations

import json

from prism_jax.cli import planning
from prism_jax.errors import PrismError


def show(command: str, result: dict, *, as_json: bool) -> None:
    """Print `result` of `command`: as JSON, or through the command's printer."""
    print(to_json(result)) if as_json else PRINTERS[command](result)


def to_json(result: dict) -> str:
    """The result as strict JSON (NaN and inf are not JSON: an error, not a broken document)."""
    try:
        return json.dumps(result, indent=2, allow_nan=False)
    except ValueError:
        raise PrismError("the result holds NaN or inf, which JSON cannot carry") from None


def _plan_name(p: dict) -> str:
    """`prism CR=8`, `prism V=26 int4h stream`: the strategy, the group count, a non-f32
    wire and a transport other than the all-gather."""
    size = f"V={p['groups']}" if p.get("groups") else f"CR={p['cr']}"
    wire = "" if p.get("wire", "f32") == "f32" else f" {p['wire']}"
    way = "" if p.get("transport", "all_gather") == "all_gather" else f" {p['transport']}"
    return f"{p['strategy']} {size}{wire}{way}"


def _print_infer(r: dict) -> None:
    p = r["plan"]
    print(
        f"{r['family']} ({r['head']}) on {r['devices']} devices, {_plan_name(p)} "
        f"logit_bias={p['logit_bias']}: batch {r['batch']} x {r['tokens']} tokens"
    )
    print(f"bytes sent per device: {r['bytes_per_device']:,} (voltage: {r['bytes_voltage']:,})")
    for i, row in enumerate(r["rows"]):
        print(f"  [{i}] " + ", ".join(f"{k}={v}" for k, v in row.items()))
    if "compare" in r:
        print(
            "agreement with the exact model: "
            + ", ".join(f"{k}={v:.6g}" for k, v in r["compare"].items())
        )


def _print_demo(r: dict) -> None:
    print(
        f"{r['model']} on {r['data']} (<= {r['max_length']} tokens), N = {r['devices']} "
        f"emulated devices, prism, logit_bias={r['logit_bias']}"
    )
    print(
        f"{'plan':>16} {'cos mean':>9} {'cos min':>9} {'bytes/device':>13} {'comm':>8} "
        f"{'time (s)':>9}"
    )
    for row in r["rows"]:
        kind = row.get("compressor", "prism").replace("asked", "prism")
        name = "voltage" if row["strategy"] == "voltage" else f"{kind} CR={row['cr']}"
        change = 100 * (row["bytes_per_device"] / row["bytes_voltage"] - 1)
        print(
            f"{name:>16} {row['cosine_mean']:>9.5f} {row['cosine_min']:>9.5f} "
            f"{row['bytes_per_device']:>13,} {change:>+7.1f}% {row['seconds']:>9.2f}"
        )
    print(
        "cos: cosine of mean-pooled embeddings with the exact model; comm: bytes sent per "
        "device against voltage (exact, full exchange); time: one compiled pass; paper: "
        "segment means; prism+: k-means groups, a salient token, the value tilt (DESIGN.md 1b)"
    )


def _print_eval(r: dict) -> None:
    metric = r["metric"]
    print(
        f"{r['model']} on {r['examples']} {r['dataset']} {r['split']} examples "
        f"(T = {r['seq_len']}, {r['layout']}), N = {r['devices']}, {metric}"
    )
    print(f"{'CR':>4} {metric:>15} {'vs CR=1':>8} {'comm':>8} {'compute':>8}")
    base = next((row[metric] for row in r["rows"] if row["cr"] == 1), None)
    percent = metric != "perplexity"
    for row in r["rows"]:
        value, scale = row[metric], 100 if percent else 1
        delta = f"{scale * (value - base):+.2f}" if base is not None else "-"
        shown = f"{100 * value:.2f}%" if percent else f"{value:.3f}"
        print(
            f"{row['cr']:>4} {shown:>15} {delta:>8} "
            f"{-100 * row['comm_reduction']:>+7.1f}% {-100 * row['compute_reduction']:>+7.1f}%"
        )


def _print_finetune(r: dict) -> None:
    print(
        f"fine-tuned {r['model']} for {r['steps']} steps under {r['plan']}"
        + (f" (resumed from step {r['resumed_from']})" if r["resumed_from"] else "")
    )
    if r["loss_first"] is not None:
        print(f"loss {r['loss_first']:.4f} -> {r['loss_last']:.4f}")
    for e in r["evals"]:
        print(
            f"  step {e['step']}: " + ", ".join(f"{k} {v:.4f}" for k, v in e.items() if k != "step")
        )
    if r["out"]:
        print(f"exported to {r['out']}")


def _print_cost(r: dict) -> None:
    print(
        f"{r['model']}: {r['strategy']} CR={r['cr']} ({r['exchange']} exchange) on "
        f"{r['devices']} devices, batch {r['batch']} x {r['seq_len']} tokens, {r['dtype']}"
    )
    print(
        f"bytes sent per device: {r['bytes_sent']:,} measured, {r['bytes_closed_form']:,} "
        f"closed form; voltage {r['bytes_voltage']:,} -> communication "
        f"{-100 * r['comm_reduction']:+.2f}%"
    )
    print(
        f"FLOPs per device: {r['flops']:.4g}; single device, whole sequence "
        f"{r['flops_single']:.4g} -> computation {-100 * r['compute_reduction']:+.2f}% "
        f"(matmul closed form {-100 * r['matmul_reduction']:+.2f}%)"
    )


class TextStream:
    """Prints one row's text as the tokens arrive (`generation.run`'s `on_token`): the whole
    decoded text each time, only its new end printed, so multi-byte characters come out
    whole."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.shown = tokenizer, [], ""

    def __call__(self, step: int, ids) -> None:
        self.ids.append(int(ids[0]))
        text = self.tokenizer.decode(self.ids)
        if not text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the rest
            print(text[len(self.shown) :], end="", flush=True)
            self.shown = text


def _print_generate(r: dict) -> None:
    if r["streamed"]:
        print()
    else:
        for prompt, text in zip(r["prompts"], r["texts"], strict=True):
            print(f"{prompt!r} -> {text!r}")
    p, rate = r["plan"], r["decode_tokens_per_second"]
    # the first step compiles: a rate needs a second (0 in the record: none measured)
    rate = f"{rate:.1f} tokens/s" if rate else "no decode rate (one step, which compiles)"
    print(
        f"{_plan_name(p)} on {r['devices']} devices ({p['exchange']} exchange): "
        f"{r['new_tokens']} new tokens, prefill {r['prefill_seconds']:.2f} s sending "
        f"{r['prefill_bytes_per_device']:,} bytes per device, then {rate} sending none; "
        f"cache {r['cache_bytes']:,} bytes (exact: {r['exact_cache_bytes']:,})"
    )
    if "compare" in r:
        c = r["compare"]
        print(f"exact model: {c['texts'][0]!r}; token agreement {100 * c['token_agreement']:.1f}%")


def _print_convert(r: dict) -> None:
    c = r["config"]
    print(
        f"{r['source']} -> {r['out']}: Llama, {c['num_hidden_layers']} layers, width "
        f"{c['hidden_size']}, {c['num_attention_heads']} heads / {c['num_key_value_heads']} KV "
        f"heads, vocabulary {c['vocab_size']}, {r['parameters']:,} parameters (float32)"
    )
    print(f"tokenizer: {r['tokenizer']}")


PRINTERS = {
    "infer": _print_infer,
    "demo": _print_demo,
    "cost": _print_cost,
    "finetune": _print_finetune,
    "eval": _print_eval,
    "convert": _print_convert,
    "generate": _print_generate,
    "plan": planning.show,
}
