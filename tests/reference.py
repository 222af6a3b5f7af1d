"""A plain NumPy implementation of DESIGN.md sections 1 and 1a, for tests only.

Independent of the package: it reads the torch model's own state dict (HF key names), and
it loops explicitly over batch rows, devices, segments and heads. float64 throughout. What
travels is either attention inputs (`exchange="hidden"`, projected by the receiver) or the
sender's keys (rotated at their own positions for Llama) and values (`exchange="kv"`).
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


def _rms(x, w, eps):
    return x / np.sqrt((x**2).mean(-1, keepdims=True) + eps) * w


def _rope(x, pos, theta, k):
    """HF's rotate-half rotary embedding of `x` [T, heads*k] at positions `pos` [T]."""
    angles = pos[:, None] * (1.0 / theta ** (np.arange(0, k, 2) / k))[None]  # [T, k/2]
    cos, sin = np.cos(angles)[:, None], np.sin(angles)[:, None]
    x = x.reshape(len(pos), -1, k)
    x1, x2 = x[..., : k // 2], x[..., k // 2 :]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).reshape(len(pos), -1)


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
        if family == "llama":
            p = f"layers.{i}."
            names = {
                "q": "self_attn.q_proj",
                "k": "self_attn.k_proj",
                "v": "self_attn.v_proj",
                "o": "self_attn.o_proj",
                "gate": "mlp.gate_proj",
                "fc1": "mlp.up_proj",
                "fc2": "mlp.down_proj",
            }
            layer = {n: (_get(sd, p + k + ".weight").T, _bias(sd, p + k)) for n, k in names.items()}
            layer["ln1"] = (_get(sd, p + "input_layernorm.weight"),)
            layer["ln2"] = (_get(sd, p + "post_attention_layernorm.weight"),)
            out.append(layer)
            continue
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
    def fc(name, x):
        return x @ layer[name][0] + layer[name][1]

    if "gate" in layer:  # SwiGLU (Llama)
        silu = fc("gate", h) / (1 + np.exp(-fc("gate", h)))
        return fc("fc2", silu * fc("fc1", h))
    return fc("fc2", _gelu(fc("fc1", h), act))


def _attend(q, keys, values, visible, bias, heads, kv_heads, stats=None, layer=None, theta=None):
    """One device, one batch row: queries [L, H*K] against keys and values [M, H_kv*K];
    query head h reads KV head h // (H / H_kv). With `stats` [M, 1 | 3] (DESIGN.md 1b.4) each
    head adds sum_m p_m s2_m (q_h / sqrt(K)) W_k^(h)T W_v^(h); with rotary keys (`theta`, the
    derivation in prism_jax/compress.py) the query is first turned back by row m's expected
    rotation: per frequency w, rotated by -w * mean position, damped by exp(-w^2 var / 2)."""
    k = q.shape[1] // heads
    out = np.zeros_like(q)
    for h in range(heads):
        sl = slice(h * k, (h + 1) * k)
        g = h // (heads // kv_heads)
        kv = slice(g * k, (g + 1) * k)
        logits = q[:, sl] @ keys[:, kv].T / math.sqrt(k) + bias[None, :]
        logits = np.where(visible, logits, -np.inf)
        top = logits.max(1, keepdims=True)
        p = np.exp(logits - np.where(np.isfinite(top), top, 0))  # a row that sees nothing: 0
        p = p / np.maximum(p.sum(1, keepdims=True), 1e-300)
        out[:, sl] = p @ values[:, kv]
        if stats is not None:
            m_h = layer["k"][0][:, kv].T @ layer["v"][0][:, kv]
            qs = q[:, sl] / math.sqrt(k)
            if theta is None:
                out[:, sl] += (p @ stats[:, 0])[:, None] * (qs @ m_h)
                continue
            w = 1.0 / theta ** (np.arange(0, k, 2) / k)
            for m in np.nonzero(stats[:, 0])[0]:
                s2, centre, variance = stats[m]
                damp = np.tile(np.exp(-0.5 * variance * w**2), 2)
                back = _rope(qs, np.full(len(qs), -centre), theta, k) * damp
                out[:, sl] += p[:, m : m + 1] * s2 * (back @ m_h)
    return out


def _groups(block, valid, keys, cr, compressor):
    """Positions of each group one device sends (DESIGN.md section 1 step 2, sections 1b and
    1c: the row's first `sink` valid tokens that the device holds, at most V - 1, go alone;
    the rest are grouped as 1b states for the V - e groups left)."""
    size = block.stop - block.start
    groups = (compressor or {}).get("groups")
    v = min(groups, size) if groups else math.ceil(size / cr)
    if not compressor or compressor["paper_positions"]:
        return [
            np.arange(block.start + s * cr, block.start + min((s + 1) * cr, size)) for s in range(v)
        ]
    first = [j for j in range(len(valid)) if valid[j]][: compressor.get("sink", 0)]
    sink = [j for j in first if block.start <= j < block.stop][: v - 1]
    idx = [j for j in range(block.start, block.stop) if valid[j] and j not in sink]
    v -= len(sink)
    chosen = []
    salient = min(compressor["salient"], v - 1)
    if salient and idx:
        mean = keys[idx].mean(0)
        dev = [((keys[j] - mean) ** 2).sum() for j in idx]
        order = sorted(range(len(idx)), key=lambda i: (-dev[i], i))[:salient]
        chosen = sorted(idx[i] for i in order)
    rest = [j for j in idx if j not in chosen]
    count = v - len(chosen) if chosen else v - salient
    groups = [[] for _ in range(count)]
    if compressor["grouping"] == "tail":  # C_j = max(C_(j-1) + 1, floor(n^(j/G) (1 + 1e-5)))
        n, ends = len(rest), [0]
        for j in range(1, count):
            ends.append(max(ends[-1] + 1, math.floor(n ** (j / count) * (1 + 1e-5))))
        for rank, j in enumerate(rest):
            distance = n - 1 - rank  # from the device's last valid token
            groups[count - 1 - sum(e <= distance for e in ends[1:])].append(j)
        return [np.array([j]) for j in sink + chosen] + [np.array(m, int) for m in groups]
    for rank, j in enumerate(rest):
        groups[rank * count // len(rest)].append(j)
    for _ in range(compressor["kmeans_iters"] if compressor["grouping"] == "kmeans" else 0):
        centroids = {g: keys[m].mean(0) for g, m in enumerate(groups) if m}
        new = [[] for _ in range(count)]
        for j in rest:
            dist = {g: ((keys[j] - c) ** 2).sum() for g, c in centroids.items()}
            new[min(dist, key=lambda g: (dist[g], g))].append(j)
        groups = new
    return [np.array([j]) for j in sink + chosen] + [np.array(m, int) for m in groups]


def _wire(mean, wire, vectors):
    """What arrives of a group's mean (DESIGN.md 1d): float32, bfloat16, or int8 (int4) with
    a float32 scale s = max|x| / m per vector, m = 127 (7) (1 for a zero vector, or one whose
    s would be subnormal: XLA:CPU flushes those), q = round(x / s) clipped to [-m, m]; int4h:
    int4 of the vector turned by `hadamard`, turned back."""
    x = mean.astype(np.float32)
    if wire == "bf16":
        import ml_dtypes

        return x.astype(ml_dtypes.bfloat16).astype(np.float64)
    if wire in ("int8", "int4", "int4h"):
        m = np.float32(127 if wire == "int8" else 7)
        out = []
        for block in np.split(x, vectors):
            turn = hadamard(len(block)) if wire == "int4h" else np.eye(len(block))
            block = (block.astype(np.float64) @ turn).astype(np.float32)
            s = np.abs(block).max() / m
            s = s if s >= np.finfo(np.float32).tiny else np.float32(1)
            out.append((np.clip(np.round(block / s), -m, m) * np.float64(s)) @ turn)
        return np.concatenate(out)
    return x.astype(np.float64)


def hadamard(w):
    """The int4h wire's turn of a vector of length `w`: block-diagonal Sylvester Hadamard
    matrices H_b / sqrt(b), b the largest power of two dividing w (orthonormal, symmetric)."""
    b = w & -w
    h = np.ones((1, 1))
    while len(h) < b:
        h = np.block([[h, h], [h, -h]])
    return np.kron(np.eye(w // b), h / np.sqrt(b))


def _keys_for_device(a, valid, p, blocks, strategy, cr, logit_bias, causal, extra=None):
    """Rows one device attends to (of whatever travels: inputs, or keys and values): its
    tokens, then (prism) the others' group means. `blocks[q]` is device q's slice of
    positions (equal blocks of L, or a longer last one: tokens generated after a prefill).
    `extra`: the content-aware compressor (DESIGN.md 1b) with each token's keys and inputs.
    Returns rows, visibility, bias and each row's tilt statistics [M, 1 | 3]: s2 and, when
    `extra` has the tokens' positions (rotary), their mean and variance (zero: local rows)."""
    pos = np.arange(blocks[p].start, blocks[p].stop)
    l = len(pos)
    if strategy == "voltage":
        total = blocks[-1].stop
        kpos = np.arange(total)
        vis = valid[None, :] & ((kpos[None, :] <= pos[:, None]) if causal else True)
        return a, np.broadcast_to(vis, (l, total)), np.zeros(total), np.zeros(total)
    kv = [a[blocks[p]]]
    vis = [
        np.broadcast_to(
            valid[pos][None, :] & ((pos[None, :] <= pos[:, None]) if causal else True), (l, l)
        )
    ]
    rotary = extra.get("positions") is not None
    bias, stats = [np.zeros(l)], [np.zeros((l, 3 if rotary else 1))]
    extra = extra or {}
    for q, block in enumerate(blocks if strategy == "prism" else []):
        if q == p:
            continue
        for members in _groups(block, valid, extra.get("keys"), cr, extra.get("compressor")):
            members = np.array([j for j in members if valid[j]], int)
            c = len(members)
            mean = a[members].mean(0) if c else np.zeros(a.shape[1])
            seen = c > 0 and (not causal or q < p)
            kv.append(_wire(mean, extra.get("wire", "f32"), extra.get("vectors", 1))[None])
            vis.append(np.full((l, 1), seen))
            bias.append([math.log(c) if (seen and logit_bias == "log_count") else 0.0])
            row = [0.0, 0.0, 0.0] if rotary else [0.0]
            if c and extra.get("compressor", {}).get("value_tilt"):
                x = extra["inputs"][members]
                row[0] = max(0.0, (x**2).sum(1).mean() - (x.mean(0) ** 2).sum()) / x.shape[1]
                if rotary:
                    at = extra["positions"][members]
                    row[1:] = [at.mean(), at.var()]
            stats.append([row])
    return np.concatenate(kv), np.concatenate(vis, 1), np.concatenate(bias), np.concatenate(stats)


def _config(cfg):
    """(heads, KV heads, head size, depth, eps, activation) of a HF config of any family."""
    heads = getattr(cfg, "num_attention_heads", None) or cfg.n_head
    width = getattr(cfg, "hidden_size", None) or cfg.n_embd
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or width // heads
    depth = getattr(cfg, "num_hidden_layers", None) or cfg.n_layer
    eps = (
        getattr(cfg, "layer_norm_eps", None)
        or getattr(cfg, "rms_norm_eps", None)
        or cfg.layer_norm_epsilon
    )
    act = getattr(cfg, "hidden_act", None) or cfg.activation_function
    return heads, kv_heads, head_dim, depth, eps, act


def _rope_theta(cfg):
    params = getattr(cfg, "rope_parameters", None) or {}
    return params.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))


def _attention(
    a, valid, pos, layer, cfg, *, blocks, strategy, cr, logit_bias, exchange, compressor, wire
):
    """The attention block's output [T, D] of one batch row (tokens at positions `pos`),
    device by device."""
    heads, kv_heads, k, *_ = _config(cfg)
    rotary = cfg.model_type == "llama"
    causal = cfg.model_type in ("gpt2", "llama")
    plan = (strategy, cr, logit_bias, causal)

    def proj(name, x, at=pos):
        out = x @ layer[name][0] + layer[name][1]
        return _rope(out, at, _rope_theta(cfg), k) if rotary and name in "qk" else out

    q = proj("q", a)
    out = np.zeros((len(a), heads * k))
    extra = {"compressor": compressor, "keys": proj("k", a), "inputs": a, "wire": wire}
    extra["vectors"] = 1 if exchange == "hidden" else 2 * kv_heads
    extra["positions"] = pos.astype(float) if rotary else None
    tilt = bool(compressor and compressor["value_tilt"])
    theta = _rope_theta(cfg) if rotary else None
    for p, block in enumerate(blocks):
        if exchange == "kv":  # the senders' own keys and values travel
            kv = np.concatenate([proj("k", a), proj("v", a)], 1)
            rows, vis, bias, stats = _keys_for_device(kv, valid, p, blocks, *plan, extra)
            keys, values = np.split(rows, 2, axis=1)
        else:  # attention inputs travel; the receiver projects them (no rotary here)
            rows, vis, bias, stats = _keys_for_device(a, valid, p, blocks, *plan, extra)
            keys, values = proj("k", rows, None), proj("v", rows, None)
        out[block] = _attend(
            q[block], keys, values, vis, bias, heads, kv_heads, stats if tilt else None, layer,
            theta,
        )  # fmt: skip
    return out @ layer["o"][0] + layer["o"][1]


def forward(
    cfg,
    directory,
    batch,
    *,
    n,
    cr=1,
    strategy="prism",
    logit_bias="log_count",
    exchange=None,
    last_extra=0,
    grouping="segments",
    salient=0,
    kmeans_iters=10,
    value_tilt=False,
    sink=0,
    wire="f32",
    groups=0,
):
    """NumPy reference outputs: last_hidden_state [B, T, D], and logits / pooler_output.

    Args:
      cfg: the HF config; directory: the saved checkpoint; n: devices; cr, strategy,
      logit_bias and exchange as in `pj.Plan` (exchange None: kv for Llama, else hidden).
      last_extra: the last `last_extra` tokens of the batch are appended to the last
        device's block (generation: tokens decoded after a prefill of the others).
      grouping, salient, kmeans_iters, value_tilt: the compressor of DESIGN.md section 1b;
        sink: the sink tokens sent exactly (section 1c); wire: what the means travel as (1d);
        groups: V per device in place of ceil(L / CR).
    """
    family = cfg.model_type
    exchange = exchange or ("kv" if family == "llama" else "hidden")
    sd = _sd(directory)
    g = functools.partial(_get, sd)
    *_, depth, eps, act = _config(cfg)
    post_ln = family == "bert"

    def norm(x, weights):
        return _rms(x, *weights, eps) if family == "llama" else _ln(x, *weights, eps)

    x, valid, pos = _embed(family, g, batch, eps)
    b, t, d = x.shape
    l = math.ceil((t - last_extra) / n)
    blocks = [slice(p * l, (p + 1) * l) for p in range(n)]
    blocks[-1] = slice((n - 1) * l, n * l + last_extra)
    x = np.pad(x, ((0, 0), (0, n * l + last_extra - t), (0, 0)))
    valid = np.pad(valid, ((0, 0), (0, n * l + last_extra - t)))
    pos = np.pad(pos, ((0, 0), (0, n * l + last_extra - t)))
    compressor = dict(
        grouping=grouping, salient=salient, kmeans_iters=kmeans_iters, value_tilt=value_tilt,
        sink=sink, paper_positions=grouping == "segments" and not salient and not sink,
        groups=groups,
    )  # fmt: skip
    plan = dict(blocks=blocks, strategy=strategy, cr=cr, logit_bias=logit_bias, exchange=exchange,
                compressor=compressor, wire=wire)  # fmt: skip
    for layer in _layers(sd, family, depth):
        a = x if post_ln else norm(x, layer["ln1"])
        att = np.stack([_attention(a[r], valid[r], pos[r], layer, cfg, **plan) for r in range(b)])
        if post_ln:
            x = _ln(x + att, *layer["ln1"], eps)
            x = _ln(x + _mlp(x, layer, act), *layer["ln2"], eps)
        else:
            x = x + att
            x = x + _mlp(norm(x, layer["ln2"]), layer, act)
    x = x[:, :t]
    if family == "gpt2":
        x = _ln(x, g("ln_f.weight"), g("ln_f.bias"), eps)
    if family == "vit":
        x = _ln(x, g("layernorm.weight"), g("layernorm.bias"), eps)
    if family == "llama":
        x = _rms(x, g("norm.weight"), eps)
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
    if cfg.architectures and cfg.architectures[0] == "LlamaForCausalLM":
        head = sd["lm_head.weight"] if "lm_head.weight" in sd else g("embed_tokens.weight")
        out["logits"] = x @ head.T
    return out


def _embed(family, g, batch, eps):
    """(embeddings [B, T, D], validity [B, T], positions [B, T]: the batch's position_ids or
    0..T-1)."""
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
        return x, np.ones(x.shape[:2], bool), np.broadcast_to(np.arange(x.shape[1]), x.shape[:2])
    ids = np.asarray(batch["input_ids"])
    valid = np.asarray(batch.get("attention_mask", np.ones_like(ids))).astype(bool)
    t = ids.shape[1]
    pos = np.asarray(batch.get("position_ids", np.broadcast_to(np.arange(t), ids.shape)))
    if family == "llama":
        return g("embed_tokens.weight")[ids], valid, pos
    if family == "gpt2":
        return g("wte.weight")[ids] + g("wpe.weight")[pos], valid, pos
    types = np.asarray(batch.get("token_type_ids", np.zeros_like(ids)))
    x = (
        g("word_embeddings.weight")[ids]
        + g("position_embeddings.weight")[:t]
        + g("token_type_embeddings.weight")[types]
    )
    x = _ln(x, g("embeddings.LayerNorm.weight"), g("embeddings.LayerNorm.bias"), eps)
    return x, valid, pos
