"""A plain NumPy implementation of DESIGN.md section 1, for tests only.

Independent of the package: it reads the torch model's own state dict (HF key names), and
it loops explicitly over batch rows, devices and segments. float64 throughout.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from scipy.special import erf


def _gelu(x, act):
    if act in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    if act == "relu":
        return np.maximum(x, 0)
    return 0.5 * x * (1 + erf(x / math.sqrt(2)))


def _ln(x, w, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def _sd(directory):
    """The checkpoint as saved (hub key layout), read by the safetensors library itself."""
    from safetensors.numpy import load_file

    return {k: v.astype(np.float64) for k, v in load_file(f"{directory}/model.safetensors").items()}


def _get(sd, suffix):
    """The tensor whose HF key ends in `suffix` (prefixes such as `bert.` vary)."""
    return next(v for key, v in sd.items() if key == suffix or key.endswith("." + suffix))


def _layers(sd, family, depth):
    """Per-layer weights as {name: (weight [in, out], bias)}."""
    out = []
    for i in range(depth):
        if family == "gpt2":
            p = f"h.{i}."
            qkv = zip(
                np.split(_get(sd, p + "attn.c_attn.weight"), 3, 1),
                np.split(_get(sd, p + "attn.c_attn.bias"), 3),
                strict=True,
            )
            conv = {
                n: (_get(sd, p + k + ".weight"), _get(sd, p + k + ".bias"))
                for n, k in [
                    ("o", "attn.c_proj"),
                    ("fc1", "mlp.c_fc"),
                    ("fc2", "mlp.c_proj"),
                    ("ln1", "ln_1"),
                    ("ln2", "ln_2"),
                ]
            }
            out.append(dict(zip("qkv", qkv, strict=True), **conv))
            continue
        p = f"encoder.layer.{i}."
        att = "attention.self." if family == "bert" else "attention.attention."
        names = {
            "q": att + "query",
            "k": att + "key",
            "v": att + "value",
            "o": "attention.output.dense",
            "fc1": "intermediate.dense",
            "fc2": "output.dense",
        }
        layer = {n: (_get(sd, p + k + ".weight").T, _bias(sd, p + k)) for n, k in names.items()}
        lns = (
            ("attention.output.LayerNorm", "output.LayerNorm")
            if family == "bert"
            else ("layernorm_before", "layernorm_after")
        )
        for n, k in zip(("ln1", "ln2"), lns, strict=True):
            layer[n] = (_get(sd, p + k + ".weight"), _get(sd, p + k + ".bias"))
        out.append(layer)
    return out


def _bias(sd, name):
    """A linear layer's bias, zeros where the checkpoint has none (ViT qkv_bias=False)."""
    try:
        return _get(sd, name + ".bias")
    except StopIteration:
        return np.zeros(_get(sd, name + ".weight").shape[0])


def _mlp(h, layer, act):
    return _gelu(h @ layer["fc1"][0] + layer["fc1"][1], act) @ layer["fc2"][0] + layer["fc2"][1]


def _attend(a_local, kv_in, visible, bias, layer, heads):
    """One device, one batch row: queries [L, D] against keys/values from kv_in [M, D]."""
    q = a_local @ layer["q"][0] + layer["q"][1]
    k = kv_in @ layer["k"][0] + layer["k"][1]
    v = kv_in @ layer["v"][0] + layer["v"][1]
    d = q.shape[1]
    hk = d // heads
    out = np.zeros_like(q)
    for h in range(heads):
        sl = slice(h * hk, (h + 1) * hk)
        logits = q[:, sl] @ k[:, sl].T / math.sqrt(hk) + bias[None, :]
        logits = np.where(visible, logits, -np.inf)
        logits -= logits.max(1, keepdims=True)
        p = np.exp(logits)
        out[:, sl] = (p / p.sum(1, keepdims=True)) @ v[:, sl]
    return out @ layer["o"][0] + layer["o"][1]


def _keys_for_device(a, valid, p, n, l, strategy, cr, logit_bias, causal):
    """Keys one device attends to: its tokens, then (prism) the others' segment means."""
    pos = np.arange(p * l, (p + 1) * l)
    if strategy == "voltage":
        kpos = np.arange(n * l)
        vis = valid[None, :] & ((kpos[None, :] <= pos[:, None]) if causal else True)
        return a, np.broadcast_to(vis, (l, n * l)), np.zeros(n * l)
    kv = [a[p * l : (p + 1) * l]]
    vis = [
        np.broadcast_to(
            valid[pos][None, :] & ((pos[None, :] <= pos[:, None]) if causal else True), (l, l)
        )
    ]
    bias = [np.zeros(l)]
    for q in range(n) if strategy == "prism" else []:
        if q == p:
            continue
        for s in range(math.ceil(l / cr)):
            seg = np.arange(q * l + s * cr, q * l + min((s + 1) * cr, l))
            c = valid[seg].sum()
            mean = a[seg][valid[seg]].mean(0) if c else np.zeros(a.shape[1])
            seen = c > 0 and (not causal or q < p)
            kv.append(mean[None])
            vis.append(np.full((l, 1), seen))
            bias.append([math.log(c) if (seen and logit_bias == "log_count") else 0.0])
    return np.concatenate(kv), np.concatenate(vis, 1), np.concatenate(bias)


def forward(cfg, directory, batch, *, n, cr=1, strategy="prism", logit_bias="log_count"):
    """NumPy reference outputs: last_hidden_state [B, T, D], and logits / pooler_output.

    Args:
      cfg: the HF config; directory: the saved checkpoint; n: devices; cr, strategy and
      logit_bias as in `pj.Plan`.
    """
    family = cfg.model_type
    sd = _sd(directory)
    g = functools.partial(_get, sd)
    heads = getattr(cfg, "num_attention_heads", None) or cfg.n_head
    depth = getattr(cfg, "num_hidden_layers", None) or cfg.n_layer
    eps = getattr(cfg, "layer_norm_eps", None) or cfg.layer_norm_epsilon
    act = getattr(cfg, "hidden_act", None) or cfg.activation_function
    causal, post_ln = family == "gpt2", family == "bert"
    x, valid = _embed(family, g, batch, eps)
    b, t, d = x.shape
    l = math.ceil(t / n)
    x = np.pad(x, ((0, 0), (0, n * l - t), (0, 0)))
    valid = np.pad(valid, ((0, 0), (0, n * l - t)))
    for layer in _layers(sd, family, depth):
        a = x if post_ln else _ln(x, *layer["ln1"], eps)
        att = np.zeros_like(x)
        for row in range(b):
            for p in range(n):
                kv, vis, bias = _keys_for_device(
                    a[row], valid[row], p, n, l, strategy, cr, logit_bias, causal
                )
                att[row, p * l : (p + 1) * l] = _attend(
                    a[row, p * l : (p + 1) * l], kv, vis, bias, layer, heads
                )
        if post_ln:
            x = _ln(x + att, *layer["ln1"], eps)
            x = _ln(x + _mlp(x, layer, act), *layer["ln2"], eps)
        else:
            x = x + att
            x = x + _mlp(_ln(x, *layer["ln2"], eps), layer, act)
    x = x[:, :t]
    if family == "gpt2":
        x = _ln(x, g("ln_f.weight"), g("ln_f.bias"), eps)
    if family == "vit":
        x = _ln(x, g("layernorm.weight"), g("layernorm.bias"), eps)
    out = {"last_hidden_state": x}
    if any(k.endswith("pooler.dense.weight") for k in sd):
        out["pooler_output"] = np.tanh(
            x[:, 0] @ g("pooler.dense.weight").T + g("pooler.dense.bias")
        )
    if "classifier.weight" in sd:
        feat = out["pooler_output"] if family == "bert" else x[:, 0]
        out["logits"] = feat @ sd["classifier.weight"].T + sd["classifier.bias"]
    if cfg.architectures and cfg.architectures[0] == "GPT2LMHeadModel":
        out["logits"] = x @ g("wte.weight").T  # tied
    return out


def _embed(family, g, batch, eps):
    if family == "vit":
        px = np.asarray(batch["pixel_values"], np.float64)
        w, bias = g("patch_embeddings.projection.weight"), g("patch_embeddings.projection.bias")
        bsz, c, h, _ = px.shape
        ps = w.shape[-1]
        grid = h // ps
        patches = px.reshape(bsz, c, grid, ps, grid, ps).transpose(0, 2, 4, 1, 3, 5)
        x = patches.reshape(bsz, grid * grid, -1) @ w.reshape(w.shape[0], -1).T + bias
        cls = np.broadcast_to(g("embeddings.cls_token")[0], (bsz, 1, w.shape[0]))
        x = np.concatenate([cls, x], 1) + g("embeddings.position_embeddings")
        return x, np.ones(x.shape[:2], bool)
    ids = np.asarray(batch["input_ids"])
    valid = np.asarray(batch.get("attention_mask", np.ones_like(ids))).astype(bool)
    t = ids.shape[1]
    if family == "gpt2":
        return g("wte.weight")[ids] + g("wpe.weight")[:t], valid
    types = np.asarray(batch.get("token_type_ids", np.zeros_like(ids)))
    x = (
        g("word_embeddings.weight")[ids]
        + g("position_embeddings.weight")[:t]
        + g("token_type_embeddings.weight")[types]
    )
    return _ln(x, g("embeddings.LayerNorm.weight"), g("embeddings.LayerNorm.bias"), eps), valid
