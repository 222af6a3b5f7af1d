"""`prism-jax serve` as a subprocess, the official `openai` client against it: a tiny random
Llama (CR = 1 on 2 devices) and a tiny BERT, one server of each for the module."""

import concurrent.futures
import json
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import openai
import pytest

import prism_jax as pj
from prism_jax.evaluation import metrics
from tests.conftest import FAST_COMPILE

CHAT = (
    "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}assistant{% endif %}"
)
WORDS = ["[PAD]", "[UNK]", "user", "assistant", "system"]


def _llama(source: Path, target: Path) -> Path:
    """The tiny Llama with a word for every id (so that a text is its tokens) and a chat
    template; eos is id 0, [PAD], a special token the text leaves out."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    shutil.copytree(source, target)
    vocab = json.loads((target / "config.json").read_text())["vocab_size"]
    words = WORDS + [f"w{i}" for i in range(len(WORDS), vocab)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken("[PAD]", special=True)])
    tok.save(str(target / "tokenizer.json"))
    settings = {"pad_token": "[PAD]", "chat_template": CHAT}
    (target / "tokenizer_config.json").write_text(json.dumps(settings))
    return target


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A `prism-jax serve` subprocess (stderr kept in a file) and clients for it."""

    def __init__(self, model: Path, log: Path, *flags: str):
        self.name, self.port, self.log = model.name, _free_port(), log
        env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "XLA_FLAGS": FAST_COMPILE,
               "PYTHONPATH": str(Path(__file__).parents[1]), "HOME": str(log.parent),
               "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
        argv = [sys.executable, "-m", "prism_jax.cli", "serve", "--model", str(model),
                "--port", str(self.port), *flags]  # fmt: skip
        self.proc = subprocess.Popen(argv, stderr=log.open("w"), stdout=subprocess.DEVNULL, env=env)
        self.url = f"http://127.0.0.1:{self.port}"
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="-", max_retries=0,
                                    timeout=120)  # fmt: skip

    def wait(self) -> "Server":
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()
            try:
                if self.get("/health")[0] == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.2)
        raise AssertionError("the server did not start: " + self.log.read_text())

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return r.status, r.read().decode()

    def post(self, path: str, body) -> tuple[int, dict]:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data,
                                         headers={"Content-Type": "application/json"})  # fmt: skip
        try:
            with urllib.request.urlopen(request, timeout=60) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def metric(self, name: str) -> float:
        lines = self.get("/metrics")[1].splitlines()
        return sum(float(x.split()[-1]) for x in lines if x.startswith(name + " "))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def servers(hf_models, tmp_path_factory):
    """Both servers, started together: the Llama at CR = 1 on 2 devices (a long batch window,
    so that concurrent requests meet), BERT with a queue of 2 jobs."""
    tmp = tmp_path_factory.mktemp("serve")
    llama = _llama(hf_models("llama_lm")[1], tmp / "llama")
    lm = Server(llama, tmp / "lm.log", "--devices", "2", "--batch-window", "0.2",
                "--max-tokens", "3")  # fmt: skip
    enc = Server(hf_models("bert")[1], tmp / "bert.log", "--devices", "2", "--max-queue", "2",
                 "--compilation-cache", str(tmp / "cache"))  # fmt: skip
    yield {"lm": lm.wait(), "bert": enc.wait(), "llama": llama, "cache": tmp / "cache"}
    lm.stop()
    enc.stop()


@pytest.fixture(scope="module")
def lm_model(servers):
    return pj.load_pretrained(servers["llama"])


def _generated(model, prompt: str, n: int, **kw) -> str:
    """What `pj.generate` continues `prompt` with at CR = 1 on 2 devices, as text."""
    ids = np.array([model.tokenizer.encode_plain(prompt)])
    out = pj.generate(model, {"input_ids": ids}, mesh=pj.edge_mesh(2), max_new_tokens=n, **kw)
    return model.tokenizer.decode(out[0])


def test_chat_streamed_and_not_equals_generate(servers, lm_model):
    lm = servers["lm"]
    assert [m.id for m in lm.client.models.list()] == ["llama"]
    messages = [{"role": "user", "content": "w7 w9 w30"}]
    expected = _generated(lm_model, lm_model.tokenizer.chat("w7 w9 w30"), 8)
    got = lm.client.chat.completions.create(
        model="llama", messages=messages, max_tokens=8, temperature=0
    )
    assert got.choices[0].message.content == expected
    prompt = len(lm_model.tokenizer.encode_plain(lm_model.tokenizer.chat("w7 w9 w30")))
    assert (got.usage.prompt_tokens, got.usage.total_tokens) == (
        prompt, prompt + got.usage.completion_tokens
    )  # fmt: skip
    chunks = list(lm.client.chat.completions.create(
        model="llama", messages=messages, max_tokens=8, temperature=0, stream=True
    ))  # fmt: skip
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == got.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == got.usage.completion_tokens
    unbounded = lm.client.chat.completions.create(model="llama", messages=messages, temperature=0)
    assert unbounded.choices[0].message.content == _generated(
        lm_model, lm_model.tokenizer.chat("w7 w9 w30"), 3
    )  # --max-tokens 3: what a request that names no max_tokens gets


def test_completions_greedy_seeded_and_stop(servers, lm_model):
    lm = servers["lm"]
    got = lm.client.completions.create(model="llama", prompt="w11 w12", max_tokens=6,
                                       temperature=0)  # fmt: skip
    assert got.choices[0].text == _generated(lm_model, "w11 w12", 6)
    sampled = dict(temperature=0.9, top_p=0.8, seed=5)
    got = lm.client.completions.create(model="llama", prompt="w11 w12", max_tokens=6, **sampled)
    assert got.choices[0].text == _generated(lm_model, "w11 w12", 6, **sampled)
    words = got.choices[0].text.split()
    cut = lm.client.completions.create(
        model="llama", prompt="w11 w12", max_tokens=6, stop=[words[2]], **sampled
    )
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == got.choices[0].text[: got.choices[0].text.index(words[2])]
    streamed = list(
        lm.client.completions.create(
            model="llama", prompt="w11 w12", max_tokens=6, stop=[words[2]], stream=True, **sampled
        )
    )  # the text is held back while it may begin the stop string
    assert "".join(c.choices[0].text for c in streamed) == cut.choices[0].text
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_embeddings_equal_infer_mean_pooling(servers, hf_models):
    bert = servers["bert"]
    texts = ["good tea", "the dog is not very sweet"]
    got = bert.client.embeddings.create(model=bert.name, input=texts)
    model = pj.load_pretrained(hf_models("bert")[1])
    for text, row in zip(texts, got.data, strict=True):
        batch = model.tokenizer([text])
        out = pj.infer(model, batch, mesh=pj.edge_mesh(2))
        want = metrics.mean_pool(out["last_hidden_state"], batch["attention_mask"])[0]
        np.testing.assert_allclose(row.embedding, want, atol=1e-5)
    assert got.usage.prompt_tokens == 4 + 8  # [CLS] and [SEP] around each text
    with pytest.raises(openai.RateLimitError):  # 3 jobs, a queue of 2
        bert.client.embeddings.create(model=bert.name, input=["a", "b", "c"])
    assert len(bert.client.embeddings.create(model=bert.name, input=["a", "b"]).data) == 2
    assert any(servers["cache"].iterdir())  # the compiled programs, for the next start


LONG = " ".join(["w9"] * 70)
BAD = [
    ("/v1/chat/completions", b'{"model": "llama", "messages": [', 400, None),
    ("/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "w9"}]},
     404, "model"),
    ("/v1/chat/completions", {"model": "llama"}, 400, "messages"),
    ("/v1/chat/completions", {"model": "llama", "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"model": "llama", "messages": [{"role": "user", "content": LONG}]},
     400, "messages"),
    ("/v1/completions", {"model": "llama", "prompt": "w9", "temperature": -0.5}, 400,
     "temperature"),
    ("/v1/completions", {"model": "llama", "prompt": "w9", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"model": "llama", "prompt": "w9", "top_p": 1.5}, 400, "top_p"),
    ("/v1/completions", {"model": "llama", "prompt": "w9", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"model": "llama", "prompt": "w9", "max_tokens": 64}, 400, "prompt"),
    ("/v1/embeddings", {"model": "llama", "input": "w9"}, 400, None),
]  # fmt: skip


def test_bad_requests_get_openai_errors_and_the_server_goes_on(servers):
    lm = servers["lm"]
    for path, body, status, param in BAD:
        code, answer = lm.post(path, body)
        assert code == status, (body, answer)
        assert set(answer["error"]) == {"message", "type", "param", "code"}, answer
        assert answer["error"]["param"] == param, answer
        good = lm.post("/v1/completions", {"model": "llama", "prompt": "w9", "max_tokens": 1})
        assert good[0] == 200, good
    logged = [x for x in lm.log.read_text().splitlines() if " 40" in x]
    assert len(logged) == len(BAD) and "Traceback" not in lm.log.read_text()


def test_concurrent_requests_are_batched_and_answered_once(servers):
    lm = servers["lm"]
    prompts = [f"w{20 + i} w{40 + i} w{60 + i}" for i in range(8)]

    def ask(prompt):
        got = lm.client.completions.create(model="llama", prompt=prompt, max_tokens=5,
                                           temperature=0)  # fmt: skip
        return got.id, got.choices[0].text

    alone = [ask(p)[1] for p in prompts]
    rows, batches = (
        lm.metric("prism_serve_batch_rows_sum"),
        lm.metric("prism_serve_batch_rows_count"),
    )
    long = {"model": "llama", "prompt": "w50 w51", "max_tokens": 40, "temperature": 0}
    with concurrent.futures.ThreadPoolExecutor(len(prompts) + 1) as pool:
        busy = pool.submit(lm.post, "/v1/completions", long)  # the others queue behind it
        time.sleep(0.05)
        together = list(pool.map(ask, prompts))
    assert busy.result()[0] == 200
    assert len({i for i, _ in together}) == len(prompts)
    assert [t for _, t in together] == alone  # batch mates change nothing at CR = 1
    rows = lm.metric("prism_serve_batch_rows_sum") - rows
    assert rows == len(prompts) + 1
    assert lm.metric("prism_serve_batch_rows_count") - batches < rows
    batches = lm.metric("prism_serve_batch_rows_count")
    with concurrent.futures.ThreadPoolExecutor(5) as pool:  # sampled, no seed: batched too
        busy = pool.submit(lm.post, "/v1/completions", long)
        time.sleep(0.05)
        sampled = list(pool.map(lambda p: lm.client.completions.create(
            model="llama", prompt=p, max_tokens=5, temperature=0.7), prompts[:4]))  # fmt: skip
    assert busy.result()[0] == 200 and all(s.usage.completion_tokens >= 1 for s in sampled)
    assert lm.metric("prism_serve_batch_rows_count") - batches < 5


def test_a_client_that_leaves_a_stream_frees_its_slot(servers):
    lm = servers["lm"]
    body = {"model": "llama", "prompt": "w50 w51", "max_tokens": 40, "temperature": 0}
    assert lm.post("/v1/completions", body)[1]["choices"][0]["finish_reason"] == "length"
    made = lm.metric("prism_serve_generated_tokens_total")
    request = urllib.request.Request(lm.url + "/v1/completions",
                                     data=json.dumps({**body, "stream": True}).encode(),
                                     headers={"Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(request, timeout=60) as r:
        assert r.readline().startswith(b"data: {")
    deadline = time.monotonic() + 20
    while lm.metric("prism_serve_jobs_admitted") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert lm.metric("prism_serve_jobs_admitted") == 0
    assert lm.metric("prism_serve_generated_tokens_total") - made < 40


def test_stream_ends_with_done_and_sigterm_ends_the_server(servers):
    lm = servers["lm"]
    body = {"model": "llama", "messages": [{"role": "user", "content": "w3"}], "max_tokens": 3,
            "stream": True, "temperature": 0}  # fmt: skip
    request = urllib.request.Request(lm.url + "/v1/chat/completions",
                                     data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(request, timeout=60) as r:
        assert r.read().decode().endswith("data: [DONE]\n\n")
    assert lm.metric("prism_serve_bytes_sent_per_device_total") > 0
    lm.proc.send_signal(signal.SIGTERM)
    assert lm.proc.wait(timeout=20) == 0
    assert lm.log.read_text().splitlines()[-1] == "prism-jax serve: stopped"


def test_at_cr_above_1_a_prompt_is_answered_as_generate_answers_it_alone(servers, lm_model):
    """In process: an Engine at CR = 2 on 2 devices, prompts of the same padded length batched
    together, each equal to `pj.generate` of that prompt alone (its own padding, its groups)."""
    import asyncio

    from prism_jax.serve import metrics as served
    from prism_jax.serve.engine import Engine, Job

    plan = pj.Plan(cr=2)
    engine = Engine(lm_model, plan, 2, max_batch=8, max_queue=8, window=0.05)
    loop = asyncio.new_event_loop()
    prompts = ["w11 w12 w13 w14 w15", "w40 w41 w42 w43 w44 w45", "w7 w8 w9 w10 w11"]
    jobs = [Job("text", lm_model.tokenizer.encode_plain(p), loop, asyncio.Queue(), max_tokens=6,
                temperature=0.0) for p in prompts]  # fmt: skip
    batches = served.REGISTRY.get_sample_value("prism_serve_batch_rows_count") or 0
    engine.start()
    engine.submit(jobs)
    try:
        while not all(j.finished for j in jobs):
            loop.run_until_complete(asyncio.sleep(0.05))
    finally:
        engine.stop()
    assert served.REGISTRY.get_sample_value("prism_serve_batch_rows_count") == batches + 1
    assert engine.bucket(5) == engine.bucket(6) == 6  # not a power of two at CR > 1
    for prompt, job in zip(prompts, jobs, strict=True):
        ids = np.array([job.ids])
        alone = pj.generate(lm_model, {"input_ids": ids}, mesh=pj.edge_mesh(2), plan=plan,
                            max_new_tokens=6)  # fmt: skip
        assert lm_model.tokenizer.decode(job.made) == lm_model.tokenizer.decode(alone[0]), prompt
    loop.close()


def test_a_lost_node_fails_its_batch_with_503(servers, lm_model, monkeypatch):
    """Across nodes, a collective that fails (gloo: a peer is gone) answers 503 naming the loss;
    another failure is a 500; the worker goes on either way."""
    import asyncio

    from prism_jax.serve import engine as served

    engine = served.Engine(lm_model, pj.Plan(), 2, max_batch=1, max_queue=4, window=0)
    engine.nodes.many = True
    monkeypatch.setattr(engine.nodes, "publish", lambda message: None)
    errors = iter([RuntimeError("UNKNOWN: Gloo all-reduce failed: Connection reset by peer"),
                   ValueError("something else")])  # fmt: skip

    def broken(*args, **kw):
        raise next(errors)

    monkeypatch.setattr(served, "compute", broken)
    loop = asyncio.new_event_loop()
    jobs = [served.Job("text", [5, 6], loop, asyncio.Queue(), max_tokens=2) for _ in range(2)]
    engine.start()
    try:
        for job in jobs:
            engine.submit([job])
            while not job.finished:
                loop.run_until_complete(asyncio.sleep(0.02))
    finally:
        engine.stop()
    loop.run_until_complete(asyncio.sleep(0))
    lost, other = (job.events.get_nowait() for job in jobs)
    assert lost[:2] == ("error", 503) and "a node of the cluster was lost" in lost[2]
    assert other[:2] == ("error", 500) and "ValueError: something else" in other[2]
    loop.close()
