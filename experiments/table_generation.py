"""Generation against compression: greedy agreement with the exact model, time to first token,
decode speed, bytes and cache size, for SmolLM2-135M (real weights) and the GPT-2 task model.

Command:  .venv/bin/python experiments/table_generation.py          (about 4 minutes on 2 cores)
Smoke:    .venv/bin/python experiments/table_generation.py --smoke  (GPT-2 only; run by the tests)

Prompts: the first 48 tokens of the first 8 held-out (test split) Wikipedia leads, one batch,
right-padded by the tokenizer and left-padded for generation (`--packed`: rows of
`--prompt-tokens` of the test leads packed end to end, for long prompts). Each (N, CR), N in
{2, 4, 8}, CR in {1, 2, 4, 8, 16}, and each compressor (`--compressors`: `paper`, the paper's
segment means; `prism+`, `Plan.best`: k-means groups, a salient token, the value tilt)
generates 32 tokens greedily (end of sequence ignored) with a partitioned prefill and a decode
from the compressed cache (DESIGN.md section 1a), and is compared with the exact model's 32
tokens: the share of equal tokens and the mean length of the common prefix. Times: prefill
(time to first token, the compile of a new shape included: the first (N, CR) of each N also
compiles) and decode tokens/s per row (median step, after the compiling first); bytes each
device sends in the prefill (none while decoding) and the cache bytes against the exact cache.
Emulated devices share this machine's 2 cores.
Writes experiments/results/table_generation.{json,md,png} and the continuations of two
prompts at CR = 1 and, with each compressor, CR = 16 (N = 4) into the Markdown.
"""

from __future__ import annotations

import dataclasses
import sys

import common

MODELS = {"SmolLM2-135M": None, "GPT-2 task model": common.HERE / "models" / "gpt2-wikipedia"}
COMPRESSORS = ("paper", "prism+", "lm+", "lm+ int8", "lm+ int4", "lm+ int4h", "lm+ int4h V")


@dataclasses.dataclass
class Config:
    smoke: bool = common.setting(False, "GPT-2, 2 prompts, 4 tokens, N = 2, CR in {1, 4}")
    prompts: int = common.setting(8, "prompts (test-split Wikipedia leads)")
    prompt_tokens: int = common.setting(48, "tokens of each lead used as its prompt")
    packed: bool = common.setting(
        False, "prompts of --prompt-tokens from the test leads packed end to end (long prompts)"
    )
    new_tokens: int = common.setting(32, "tokens generated per prompt")
    compressors: str = common.setting(
        "paper,prism+", "compressors compared, comma-separated: " + ", ".join(COMPRESSORS)
    )
    devices: str = common.setting("2,4,8", "device counts, comma-separated")
    crs: str = common.setting("1,2,4,8,16", "compression rates, comma-separated")
    models: str = common.setting("smollm2,gpt2", "models, comma-separated: smollm2, gpt2")
    out: str | None = common.output(None, "results folder")


def agreement(got, exact) -> dict:
    import numpy as np

    equal = got == exact
    prefix = np.where(equal.all(1), equal.shape[1], np.argmin(equal, 1))
    return {"token_agreement": float(equal.mean()), "common_prefix": float(prefix.mean())}


def compressors_of(text: str) -> list[str] | None:
    """The compressors of a comma-separated flag, or None when one is unknown."""
    names = text.split(",")
    return names if set(names) <= set(COMPRESSORS) and len(set(names)) == len(names) else None


def plan_of(compressor: str, cr: int, model=None, *, devices: int = 1, seq_len: int = 1):
    """paper: segment means; prism+: `Plan.best` of an encoder (k-means, salient, tilt);
    lm+: `Plan.best` of the model (a causal LM: the sink, tail groups, tilt); lm+ int8 and
    lm+ int4, lm+ int4h: the same on that wire at the smallest CR whose bytes per device (at
    `devices`, `seq_len`) are at most the paper's float32 segments' at CR (about 3.7 and 6.6
    times the vectors); lm+ int4h V: with one sink token, the most groups within those bytes
    (`planner.fill`)."""
    import prism_jax as pj
    from prism_jax import cost

    if compressor == "prism+":
        return pj.Plan.best(cr)
    if compressor == "lm+":
        return pj.Plan.best(cr, model)
    if compressor.startswith("lm+ "):
        shape = dict(devices=devices, seq_len=seq_len)
        budget = cost.bytes_closed_form(model.config, pj.Plan(cr=cr), **shape)
        if compressor.endswith(" V"):
            from prism_jax import planner

            best = pj.Plan.best(1, model, wire=compressor[4:-2], sink=1)
            return planner.fill(model.config, best, budget, **shape)
        for smaller in range(1, cr + 1):
            plan = pj.Plan.best(smaller, model, wire=compressor[4:])
            if cost.bytes_closed_form(model.config, plan, **shape) <= budget:
                return plan
    return pj.Plan(cr=cr)


def sweep_model(name, model, batch, devices, crs, new_tokens, compressors):
    import prism_jax as pj
    from prism_jax import generation

    exact = generation.run(model, batch, max_new_tokens=new_tokens, eos=False)
    rows, samples = [], {}
    for n in devices:
        for compressor in compressors:
            for cr in crs:
                t = batch["input_ids"].shape[1]
                plan = plan_of(compressor, cr, model, devices=n, seq_len=t)
                run = generation.run(model, batch, mesh=pj.edge_mesh(n), plan=plan,
                                     max_new_tokens=new_tokens, eos=False)  # fmt: skip
                rows.append({"model": name, "compressor": compressor, "devices": n, "cr": cr,
                             "plan": dataclasses.asdict(plan), "prompt_tokens": t,
                             **agreement(run.ids, exact.ids),
                             "prefill_seconds": run.prefill_seconds,
                             "tokens_per_second": run.tokens_per_second,
                             "prefill_bytes": run.prefill_bytes, "cache_bytes": run.cache_bytes,
                             "exact_cache_bytes": run.exact_cache_bytes})  # fmt: skip
                print(rows[-1], flush=True)
                samples[(compressor, n, cr)] = run.ids
    return rows, samples, exact


def right_padded(rows: list[list[int]]) -> dict:
    import numpy as np

    t = max(len(r) for r in rows)
    ids, mask = np.zeros((len(rows), t), np.int32), np.zeros((len(rows), t), np.int32)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = r, 1
    return {"input_ids": ids, "attention_mask": mask}


def main(argv=None):
    args = common.parse(Config, __doc__, argv)
    compressors = compressors_of(args.compressors)
    if compressors is None:
        choices = ", ".join(COMPRESSORS)
        print(f"table_generation.py: error: argument --compressors: expected distinct names of "
              f"{choices}, comma-separated: {args.compressors!r}", file=sys.stderr)  # fmt: skip
        return 2

    import prism_jax as pj
    from prism_jax.data import sources, tfds_builders
    from prism_jax.evaluation import tasks

    smoke = args.smoke
    count, new = (2, 4) if smoke else (args.prompts, args.new_tokens)
    listed = [tuple(int(x) for x in getattr(args, f).split(",")) for f in ("devices", "crs")]
    devices, crs = ((2,), (1, 4)) if smoke else listed
    models = args.models.split(",")
    leads, _ = tfds_builders.texts("wikipedia_leads", "test", limit=count)
    results, texts = [], []
    for name, path in MODELS.items():
        if smoke and path is None:  # the smoke of table_llama.py loads SmolLM2 already
            continue
        if ("smollm2" if path is None else "gpt2") not in models:
            continue
        model = pj.load_pretrained(path or sources.smollm2_gguf())
        tok = model.tokenizer
        prompts = [tok.encode_plain(t)[: args.prompt_tokens] for t in leads]
        if args.packed:  # rows of the test leads end to end: prompts as long as asked
            packed = tasks.load(
                model, "wikipedia_leads", limit=count, max_length=args.prompt_tokens
            )
            prompts = [list(map(int, r)) for r in packed.train_examples["input_ids"]]
        batch = right_padded(prompts)
        rows, samples, exact = sweep_model(name, model, batch, devices, crs, new, compressors)
        results += rows
        n = 4 if 4 in devices else devices[0]
        shown = [(compressors[0], crs[0])] + [(c, crs[-1]) for c in compressors]
        for i in range(min(2, count)):
            by_plan = {label(c, cr): tok.decode(samples[(c, n, cr)][i]) for c, cr in shown}
            texts.append((name, tok.decode(prompts[i]), by_plan, tok.decode(exact.ids[i])))
    save(args, results, texts, crs)
    return 0


def label(compressor: str, cr: int) -> str:
    return f"CR = {cr}" if cr == 1 else f"{compressor} CR = {cr}"


def markdown(results, texts, crs) -> str:
    head = "model | compressor | N | CR | token agreement | common prefix | TTFT (s) | tokens/s | "
    head += "prefill bytes/device | cache bytes | exact cache"
    lines = [f"| {head} |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [
        f"| {r['model']} | {r['compressor']} | {r['devices']} | {r['cr']} | "
        f"{100 * r['token_agreement']:.1f} % | "
        f"{r['common_prefix']:.1f} | {r['prefill_seconds']:.2f} | {r['tokens_per_second']:.1f} | "
        f"{r['prefill_bytes']:,} | {r['cache_bytes']:,} | {r['exact_cache_bytes']:,} |"
        for r in results
    ]
    lines += decode_speed_ratios(results)
    lines += ["", f"Continuations (greedy, N = 4) at CR = {crs[0]} and CR = {crs[-1]}:", ""]
    for name, prompt, by_plan, exact in texts:
        lines += [f"**{name}**, prompt: {prompt!r}", ""]
        lines += [f"- {plan}: {text!r}" for plan, text in by_plan.items()]
        lines += [f"- exact: {exact!r}", ""]
    return "\n".join(lines) + "\n"


def decode_speed_ratios(results) -> list[str]:
    """Markdown lines: each model's prism+ decode speed against the paper's segments at the
    same N and CR, the mean over those cells of this run (none with one compressor)."""
    speed = {(r["model"], r["compressor"], r["devices"], r["cr"]): r["tokens_per_second"]
             for r in results}  # fmt: skip
    lines = []
    for name in dict.fromkeys(r["model"] for r in results):
        ratios = [v / speed[(m, "paper", n, cr)] for (m, c, n, cr), v in speed.items()
                  if m == name and c == "prism+" and (m, "paper", n, cr) in speed]  # fmt: skip
        if ratios:
            mean = sum(ratios) / len(ratios)
            lines.append(f"{name}: prism+ decodes at {mean:.2f} of the paper's segments' "
                         f"tokens/s (mean over {len(ratios)} cells, same N and CR)")  # fmt: skip
    return [""] + lines if lines else []


def plot(results, path, new_tokens: int = 32) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["model"] for r in results))
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 3.6), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        for i, n in enumerate(sorted({r["devices"] for r in results})):
            styles = ("-", "--", ":", "-.", (0, (5, 1)), (0, (1, 3)), (0, (3, 1, 1, 1)))
            for compressor, style in zip(COMPRESSORS, styles, strict=True):
                pts = [(r["cr"], 100 * r["token_agreement"]) for r in results
                       if r["model"] == name and r["devices"] == n
                       and r["compressor"] == compressor]  # fmt: skip
                if pts:
                    ax.plot(*zip(*pts, strict=True), linestyle=style, marker="o", ms=3,
                            color=f"C{i}", label=f"N={n} {compressor}")  # fmt: skip
        ax.set_xscale("log", base=2)
        ax.set_xlabel("compression rate CR")
        ax.set_ylabel("greedy tokens equal to exact (%)")
        ax.set_title(f"{name}: {new_tokens} generated tokens", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save(args, results, texts, crs):
    text = markdown(results, texts, crs)
    print(text)
    record = {"rows": results, "continuations": texts}
    new = 4 if args.smoke else args.new_tokens
    common.save(args, "table_generation", record, text, lambda png: plot(results, png, new))


if __name__ == "__main__":
    common.run_script(main)
