"""How much of a remote group's first-order value term the scalar value tilt recovers.

Command:  .venv/bin/python experiments/probe_tilt.py
Smoke:    .venv/bin/python experiments/probe_tilt.py --smoke  (GPT-2, one row, seconds)

To first order in its keys' spread, a group g of n tokens contributes
n exp(q~.mean k) (mean v + q~ C_g) to a query's attention, per KV head
C_g = mean_j (k_j - mean k)(v_j - mean v)^T (`prism_jax/compress.py`). The value tilt
(DESIGN.md section 1b.4) replaces q~ C_g by s2_g q~ B_g: a scalar (the group's isotropic
input spread) times a basis the receiver builds from its own weights, B = W_k^T W_v, turned
back by the group's expected rotation for rotary keys. This probe measures, on the reference
model's own layer inputs (transformers, held-out Wikipedia rows of 256 tokens; N = 4, the
paper's segments of CR tokens; the queries of the last device against every group of the
others), the relative error ||q~ (C_g - estimate)|| / ||q~ C_g|| (1: no tilt; 0: the term
exactly) of:

- `tilt`: the value tilt as shipped, s2_g B_g;
- `best scalar`: the scalar per group and KV head that fits these very queries best, an
  oracle bound on any scalar statistic a group could send with this basis;
- `local shape`: s2_g W_k^T S W_v, S the within-group covariance of the receiver's own
  tokens at unit mean variance (anisotropic inputs, no extra bytes).

Writes experiments/results/probe_tilt.{json,md}.
"""

from __future__ import annotations

import dataclasses
import time

import common
import jax.numpy as jnp
import numpy as np

from prism_jax import layers

MODELS = ("GPT-2", "SmolLM2")


@dataclasses.dataclass
class Config:
    smoke: bool = common.setting(False, "GPT-2, one row, two layers")
    rows: int = common.setting(4, "held-out Wikipedia rows of 256 tokens")
    devices: int = common.setting(4, "N")
    cr: int = common.setting(16, "tokens per group (the paper's segments)")
    out: str | None = common.output(None, "results folder")


def reference(name: str):
    """(tokenizer, transformers model) of `name`, weights from local files only."""
    import transformers

    from prism_jax.data import sources

    if name == "SmolLM2":
        path = sources.smollm2_gguf()
        kw = dict(gguf_file=path.name)
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path.parent), **kw)
        return tokenizer, transformers.LlamaForCausalLM.from_pretrained(str(path.parent), **kw)
    path = common.HERE / "models" / "gpt2-wikipedia"
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"))
    return tokenizer, transformers.GPT2LMHeadModel.from_pretrained(path)


def test_rows(tokenizer, rows: int, length: int = 256) -> np.ndarray:
    """`[rows, length]` token ids: the held-out leads, joined and cut."""
    from prism_jax.data import sources
    from prism_jax.data.splits import wiki_split

    texts = [t for title, t in sources.wikipedia_leads() if wiki_split(title) == "test"]
    ids = tokenizer("\n\n".join(texts[: 40 * rows]))["input_ids"]
    return np.asarray(ids[: rows * length]).reshape(rows, length)


def layer_tensors(model, hidden, index: int) -> dict:
    """One layer's inputs `a` [T, D] (after its norm), q [T, H, K] and k, v [T, G, K] (keys
    rotated at their positions), W_k, W_v [D, G, K], float64."""
    import torch

    cfg = model.config
    f64 = lambda t: t.detach().double().numpy()  # noqa: E731
    if cfg.model_type == "gpt2":
        block = model.transformer.h[index]
        with torch.no_grad():
            a = f64(block.ln_1(hidden[index])[0])
        w, bias = f64(block.attn.c_attn.weight), f64(block.attn.c_attn.bias)  # [D, 3D] (Conv1D)
        h = g = cfg.n_head
        d = w.shape[0]
        q, k, v = (a @ w[:, i * d : (i + 1) * d] + bias[i * d : (i + 1) * d] for i in range(3))
        wk, wv = w[:, d : 2 * d], w[:, 2 * d :]
        theta = None
    else:
        layer = model.model.layers[index]
        with torch.no_grad():
            a = f64(layer.input_layernorm(hidden[index])[0])
        proj = layer.self_attn
        wq, wk, wv = (f64(p.weight).T for p in (proj.q_proj, proj.k_proj, proj.v_proj))
        h, g = cfg.num_attention_heads, cfg.num_key_value_heads
        q, k, v = a @ wq, a @ wk, a @ wv
        theta = (cfg.rope_parameters or {}).get("rope_theta", 10000.0)
    t, d = a.shape
    kd = q.shape[1] // h
    q, k, v = q.reshape(t, h, kd), k.reshape(t, g, kd), v.reshape(t, g, kd)
    if theta is not None:
        q, k = _rotated(q, theta), _rotated(k, theta)
    return {"a": a, "q": q / np.sqrt(kd), "k": k, "v": v, "theta": theta,
            "wk": wk.reshape(d, g, kd), "wv": wv.reshape(d, g, kd)}  # fmt: skip


def _rotated(x: np.ndarray, theta: float) -> np.ndarray:
    """`x` [T, heads, K] rotated at positions 0..T-1, as the model rotates (`layers.rotate`)."""
    positions = jnp.arange(len(x))[None]
    return np.asarray(layers.rotate(jnp.asarray(x)[None], positions, theta)[0], np.float64)


ESTIMATES = ("tilt", "best scalar", "local shape")


def errors(t: dict, devices: int, cr: int) -> dict[str, float]:
    """Each estimate's mean relative error over the groups (the paper's segments of `cr`
    tokens) of devices 0..N-2, for the queries of device N-1 (which every causal row sees)."""
    a, q, k, v, theta = t["a"], t["q"], t["k"], t["v"], t["theta"]
    n = len(a) // devices
    own = slice((devices - 1) * n, devices * n)
    qs = q[own].reshape(n, k.shape[1], -1, q.shape[-1])  # [L, G, R, K]
    basis = np.einsum("dgk,dgj->gkj", t["wk"], t["wv"])  # [G, K, K]
    shaped_v = np.einsum("de,egj->dgj", _local_shape(a[own], cr), t["wv"])
    shaped = np.einsum("dgk,dgj->gkj", t["wk"], shaped_v)  # W_k^T S W_v, per KV head
    out = {name: [] for name in ESTIMATES}
    for device in range(devices - 1):
        for start in range(device * n, (device + 1) * n, cr):
            g = slice(start, min(start + cr, (device + 1) * n))
            cov = np.einsum("jgk,jgl->gkl", k[g] - k[g].mean(0), v[g] - v[g].mean(0)) / len(a[g])
            true = np.einsum("lgrk,gkj->lgrj", qs, cov)
            turned = qs if theta is None else _turned_back(qs, np.arange(len(a))[g], theta)
            tilt = np.einsum("lgrk,gkj->lgrj", turned, basis)
            local = np.einsum("lgrk,gkj->lgrj", turned, shaped)
            s2 = max(0.0, (a[g] ** 2).sum(1).mean() - (a[g].mean(0) ** 2).sum()) / a.shape[1]
            fit = (true * tilt).sum((0, 2, 3)) / np.maximum((tilt**2).sum((0, 2, 3)), 1e-300)
            norm = np.linalg.norm(true)
            guesses = (s2 * tilt, fit[:, None, None] * tilt, s2 * local)
            for name, guess in zip(ESTIMATES, guesses, strict=True):
                out[name].append(np.linalg.norm(true - guess) / norm)
    return {name: float(np.mean(e)) for name, e in out.items()}


def _local_shape(a: np.ndarray, cr: int) -> np.ndarray:
    """`[D, D]` within-group covariance of the receiver's own tokens (its segments), scaled
    to unit mean variance: the shape of the spread, not its size."""
    centred = np.concatenate([a[i : i + cr] - a[i : i + cr].mean(0) for i in range(0, len(a), cr)])
    cov = centred.T @ centred / len(a)
    return cov / (np.trace(cov) / len(cov))


def _turned_back(q: np.ndarray, positions: np.ndarray, theta: float) -> np.ndarray:
    """E_g[R]^T q for a group at `positions`: the Gaussian mean rotation the receiver applies
    (`layers.mean_rotation`)."""
    centre, spread = jnp.float32(positions.mean()), jnp.float32(positions.var())
    cos, sin = layers.mean_rotation(centre, spread, q.shape[-1], theta)
    cos, sin = np.asarray(cos, np.float64), np.asarray(sin, np.float64)
    return cos * q - sin * np.asarray(layers._rotate_half(jnp.asarray(q)), np.float64)


def main(argv=None):
    args = common.parse(Config, __doc__, argv, devices=None)
    import torch

    tic = time.perf_counter()
    record = {"devices": args.devices, "cr": args.cr, "models": {}}
    for name in ("GPT-2",) if args.smoke else MODELS:
        tokenizer, model = reference(name)
        model.eval()
        ids = test_rows(tokenizer, 1 if args.smoke else args.rows)
        layers = range(2 if args.smoke else model.config.num_hidden_layers)
        found = {i: [] for i in layers}
        for row in ids:
            with torch.no_grad():
                hidden = model(torch.tensor(row[None]), output_hidden_states=True).hidden_states
            for i in layers:
                found[i].append(errors(layer_tensors(model, hidden, i), args.devices, args.cr))
        record["models"][name] = [
            {"layer": i, **{e: float(np.mean([r[e] for r in rs])) for e in ESTIMATES}}
            for i, rs in found.items()
        ]
        record["rows"] = len(ids)
    record["seconds"] = time.perf_counter() - tic
    text = markdown(record)
    print(text)
    common.save(args, "probe_tilt", record, text)


def markdown(record: dict) -> str:
    lines = [
        "# The value tilt against each group's first-order term",
        "",
        "`.venv/bin/python experiments/probe_tilt.py`",
        "",
        f"Relative error ||q~ (C_g - estimate)|| / ||q~ C_g|| (1: no tilt), N = "
        f"{record['devices']}, the paper's segments of {record['cr']} tokens, the last "
        f"device's queries, {record['rows']} held-out Wikipedia rows of 256 tokens; mean over "
        f"groups and rows; {record['seconds']:.0f} s.",
        "",
        "| model | layers | " + " | ".join(ESTIMATES) + " |",
        "|---|---|" + "---:|" * len(ESTIMATES),
    ]
    for name, rows in record["models"].items():
        cut = max(1, len(rows) // 3)
        for label, part in (
            ("all", rows),
            ("first third", rows[:cut]),
            ("last third", rows[-cut:]),
        ):
            means = [np.mean([r[e] for r in part]) for e in ESTIMATES]
            lines.append(f"| {name} | {label} | " + " | ".join(f"{m:.3f}" for m in means) + " |")
    lines += ["", "Per layer:", "", "| model | layer | " + " | ".join(ESTIMATES) + " |",
              "|---|---:|" + "---:|" * len(ESTIMATES)]  # fmt: skip
    for name, rows in record["models"].items():
        lines += [f"| {name} | {r['layer']} | " + " | ".join(f"{r[e]:.3f}" for e in ESTIMATES)
                  + " |" for r in rows]  # fmt: skip
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    common.run_script(main)
