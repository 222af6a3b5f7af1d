"""A load test of `prism-jax serve` with the official `openai` client: tokens/s, time to first
token and latency p50 / p95 at 1, 4 and 16 concurrent streaming clients, against
`transformers` generating the same requests one by one in the same run.

Command:  .venv/bin/python experiments/serve_load.py           (SmolLM2-135M; long on 2 cores)
Smoke:    .venv/bin/python experiments/serve_load.py --smoke   (the GPT-2 task model, N = 2)

For each plan (`--plans`, `CR:compressor` pairs; `prism+` is `Plan.best` for the model, for a
causal LM sink + tail + tilt) a server is started (`prism-jax serve --devices N ...`); then,
per concurrency C in `--clients` (each load run twice and the second timed, so that the
programs its batches need are compiled, as on a server that has been up a while), C threads
each send `--requests` streamed greedy requests (chat when the tokenizer has a chat template,
else completions) of `--max-tokens` new tokens, prompts drawn from a fixed list. Per request:
time to the first text chunk, latency, completion tokens (the stream's usage). Rows: total
tokens/s (all tokens / wall time), p50 / p95 of both times, and whether every request was
answered exactly once (distinct ids, one per request). The `transformers` row generates the
same prompts greedily one by one (`model.generate`, the same token budget, stopping at the end
of sequence as the server does; tokens/s counts the tokens each made). Emulated devices
share this machine's cores with the client threads and the baseline.
Writes experiments/results/serve_load.{json,md}.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import common

PROMPTS = [
    "What is the capital of France?",
    "Name three colours of the rainbow.",
    "Why is the sky blue?",
    "Write one sentence about tea.",
    "What is 12 times 7?",
    "Give a synonym of happy.",
    "What do bees make?",
    "Which planet is the largest?",
]


@dataclasses.dataclass
class Config:
    smoke: bool = common.setting(False, "GPT-2 task model, N = 2, clients 1,2, 2 requests each")
    model: str = common.setting("smollm2", "smollm2 (the real GGUF) or a checkpoint path")
    devices: int = common.setting(4, "emulated devices N")
    plans: str = common.setting("1:paper,16:prism+", "CR:compressor pairs, comma-separated")
    clients: str = common.setting("1,4,16", "concurrent clients, comma-separated")
    requests: int = common.setting(4, "requests per client")
    max_tokens: int = common.setting(32, "new tokens per request")
    out: str | None = common.output(None, "results folder")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(model: str, devices: int, cr: int, compressor: str, extra=()):
    """A `prism-jax serve` subprocess, ready; (process, base url, model name). `extra`: more
    flags of `serve`."""
    port = _free_port()
    argv = [sys.executable, "-m", "prism_jax.cli", "serve", "--model", model, "--port",
            str(port), "--devices", str(devices), "--cr", str(cr), "--compressor", compressor,
            "--max-batch", "16", *extra]  # fmt: skip
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"serve exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as r:
                return proc, url, json.loads(r.read())["model"]
        except OSError:
            time.sleep(0.2)


def one(client, name: str, chat: bool, prompt: str, max_tokens: int) -> dict:
    """One streamed greedy request: its id, time to first text, latency and tokens."""
    tic = time.perf_counter()
    kw = dict(model=name, max_tokens=max_tokens, temperature=0, stream=True)
    if chat:
        stream = client.chat.completions.create(
            messages=[{"role": "user", "content": prompt}], **kw
        )
    else:
        stream = client.completions.create(prompt=prompt, **kw)
    first, ident, tokens = None, None, 0
    for chunk in stream:
        ident = chunk.id
        text = chunk.choices[0].delta.content if chat else chunk.choices[0].text
        if text and first is None:
            first = time.perf_counter() - tic
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    latency = time.perf_counter() - tic
    return {"id": ident, "ttft": latency if first is None else first, "latency": latency,
            "tokens": tokens}  # fmt: skip


def load(url: str, name: str, chat: bool, clients: int, requests: int, max_tokens: int) -> dict:
    """`clients` threads sending `requests` streamed requests each -> the row's figures."""
    import numpy as np
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="-", max_retries=0, timeout=600)
    jobs = [PROMPTS[(c * requests + r) % len(PROMPTS)] for c in range(clients)
            for r in range(requests)]  # fmt: skip
    tic = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        done = list(pool.map(lambda p: one(client, name, chat, p, max_tokens), jobs))
    wall = time.perf_counter() - tic
    ttft, latency = (np.array([d[k] for d in done]) for k in ("ttft", "latency"))
    tokens = sum(d["tokens"] for d in done)
    return {
        "clients": clients, "requests": len(jobs), "tokens": tokens, "seconds": wall,
        "tokens_per_second": tokens / wall,
        "ttft_p50": float(np.percentile(ttft, 50)), "ttft_p95": float(np.percentile(ttft, 95)),
        "latency_p50": float(np.percentile(latency, 50)),
        "latency_p95": float(np.percentile(latency, 95)),
        "answered_once": len({d["id"] for d in done}) == len(jobs) and None not in
        {d["id"] for d in done},
    }  # fmt: skip


def baseline(model: str, chat: bool, prompts: list[str], max_tokens: int) -> dict:
    """`transformers` generating `prompts` greedily one by one."""
    import torch
    import transformers

    path = Path(model)
    kw = dict(gguf_file=path.name) if path.suffix == ".gguf" else {}
    where = str(path.parent if kw else path)
    tok = transformers.AutoTokenizer.from_pretrained(where, **kw)
    lm = transformers.AutoModelForCausalLM.from_pretrained(where, **kw).eval()
    tokens, tic = 0, time.perf_counter()
    for prompt in prompts:
        if chat:
            text = tok.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
            ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids
        else:
            ids = tok(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            out = lm.generate(ids, max_new_tokens=max_tokens, do_sample=False)
        tokens += out.shape[1] - ids.shape[1]
    wall = time.perf_counter() - tic
    return {"requests": len(prompts), "tokens": tokens, "seconds": wall,
            "tokens_per_second": tokens / wall}  # fmt: skip


def markdown(rows: list[dict], base: dict, cfg) -> str:
    lines = [
        f"serve load test: {cfg.model}, N = {cfg.devices}, {cfg.requests} streamed requests "
        f"per client, {cfg.max_tokens} new tokens each (greedy)",
        "",
        "| plan | clients | requests | tokens/s | TTFT p50 (s) | TTFT p95 (s) | latency p50 (s) "
        "| latency p95 (s) | answered once |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['plan']} | {r['clients']} | {r['requests']} | {r['tokens_per_second']:.2f} "
            f"| {r['ttft_p50']:.3f} | {r['ttft_p95']:.3f} | {r['latency_p50']:.3f} "
            f"| {r['latency_p95']:.3f} | {r['answered_once']} |"
        )
    lines.append(
        f"| transformers, one by one | 1 | {base['requests']} | {base['tokens_per_second']:.2f} "
        "| | | | | |"
    )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    cfg = common.parse(Config, __doc__, argv, devices=None)
    if cfg.smoke:
        cfg = dataclasses.replace(cfg, model=str(common.HERE / "models" / "gpt2-wikipedia"),
                                  devices=2, plans="1:paper", clients="1,2", requests=2,
                                  max_tokens=4)  # fmt: skip
    if cfg.model == "smollm2":
        from prism_jax.data import sources

        cfg = dataclasses.replace(cfg, model=str(sources.smollm2_gguf()))
    rows = []
    chat = False
    for pair in cfg.plans.split(","):
        cr, compressor = pair.split(":")
        proc, url, name = start(cfg.model, cfg.devices, int(cr), compressor)
        try:
            chat = _has_chat(cfg.model)
            clients = [int(c) for c in cfg.clients.split(",")]
            for c in clients:  # run twice, timed the second: the programs compiled first
                load(url, name, chat, c, cfg.requests, cfg.max_tokens)
                row = load(url, name, chat, c, cfg.requests, cfg.max_tokens)
                rows.append({"plan": f"CR={cr} {compressor}", **row})
                print(rows[-1], flush=True)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(cfg.requests)]
    base = baseline(cfg.model, chat, prompts, cfg.max_tokens)
    text = markdown(rows, base, cfg)
    print(text)
    common.save(cfg, "serve_load", {"config": dataclasses.asdict(cfg), "rows": rows,
                                    "transformers": base}, text)  # fmt: skip
    return 0


def _has_chat(model: str) -> bool:
    path = Path(model)
    if path.suffix == ".gguf":
        return True  # SmolLM2's GGUF carries its chat template
    settings = json.loads((path / "tokenizer_config.json").read_text())
    return bool(settings.get("chat_template"))


if __name__ == "__main__":
    common.run_script(main)
