"""`prism-jax launch --nodes 2 -- serve ...`: node 0 holds the HTTP front, node 1 follows its
batches; answers equal `pj.generate` on 2 emulated devices; SIGTERM to `launch` ends it all."""

import concurrent.futures
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import openai
import psutil

import prism_jax as pj
from tests.conftest import FAST_COMPILE
from tests.test_serve import _free_port, _llama


def test_launch_serve_answers_as_generate_and_ends_on_sigterm(hf_models, tmp_path):
    llama = _llama(hf_models("llama_lm")[1], tmp_path / "llama")
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device per node
    env |= {"HF_HUB_OFFLINE": "1", "XLA_FLAGS": FAST_COMPILE,
            "PYTHONPATH": str(Path(__file__).parents[1])}  # fmt: skip
    argv = [sys.executable, "-m", "prism_jax.cli", "launch", "--nodes", "2", "--timeout", "60",
            "--", "serve", "--model", str(llama), "--port", str(port),
            "--batch-window", "0.1"]  # fmt: skip
    launcher = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="-",
                               max_retries=0, timeout=120)  # fmt: skip
        deadline = time.monotonic() + 120
        while True:
            assert launcher.poll() is None and time.monotonic() < deadline
            try:
                client.models.list()
                break
            except openai.APIConnectionError:
                time.sleep(0.3)
        model = pj.load_pretrained(llama)
        prompts = ["w11 w12", "w5 w6 w7", "w20", "w30 w31"]

        def ask(prompt):
            got = client.completions.create(model="llama", prompt=prompt, max_tokens=6,
                                            temperature=0)  # fmt: skip
            return got.choices[0].text

        with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
            answers = list(pool.map(ask, prompts))
        for prompt, answer in zip(prompts, answers, strict=True):
            ids = np.array([model.tokenizer.encode_plain(prompt)])
            out = pj.generate(model, {"input_ids": ids}, mesh=pj.edge_mesh(2), max_new_tokens=6)
            assert answer == model.tokenizer.decode(out[0]), prompt
        chunks = list(client.completions.create(model="llama", prompt=prompts[0], max_tokens=6,
                                                temperature=0, stream=True))  # fmt: skip
        assert "".join(c.choices[0].text for c in chunks) == answers[0]  # streamed as it decodes
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
            text = r.read().decode()
        sent = {w: float(re.search(rf'cluster_bytes_total{{what="{w}"}} (\S+)', text)[1])
                for w in ("batches", "tokens")}  # fmt: skip
        assert sent["batches"] > 0 and sent["tokens"] >= 4 * 6 * 4  # at least 4 rows of 6 ids
        nodes = psutil.Process(launcher.pid).children()
        assert len(nodes) == 2
        launcher.send_signal(signal.SIGTERM)
        assert launcher.wait(timeout=30) == 128 + signal.SIGTERM
        gone, alive = psutil.wait_procs(nodes, timeout=10)
        assert not alive
    finally:
        if launcher.poll() is None:
            launcher.kill()
