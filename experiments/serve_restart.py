"""`prism-jax serve` from start to its first answer, with the compilation cache cold and warm.

Command:  .venv/bin/python experiments/serve_restart.py          (SmolLM2, about 2 minutes)
Smoke:    .venv/bin/python experiments/serve_restart.py --smoke  (the GPT-2 task model)

For the model as given (the GGUF file) and converted once to a HF directory (`prism-jax
convert`), a server is started twice on N devices with one `--compilation-cache` directory:
first empty (cold), then holding what the first run compiled (warm). Per run: seconds from the
process's start to `/health` answering (ready) and to the first greedy completion (16 new
tokens). Writes experiments/results/serve_restart.{json,md}.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common
from serve_load import start


@dataclasses.dataclass
class Config:
    smoke: bool = common.setting(False, "the GPT-2 task model, N = 2")
    devices: int = common.setting(4, "emulated devices N")
    out: str | None = common.output(None, "results folder")


def first_answer(model: str, devices: int, cache: Path) -> dict:
    """One run: ready and first-answer seconds from the start of the process."""
    import openai

    tic = time.perf_counter()
    proc, url, name = start(model, devices, 1, "paper", ["--compilation-cache", str(cache)])
    ready = time.perf_counter() - tic
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="-", max_retries=0, timeout=600)
        got = client.completions.create(model=name, prompt="The capital of France is",
                                        max_tokens=16, temperature=0)  # fmt: skip
        answered = time.perf_counter() - tic
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    return {"ready_s": ready, "first_answer_s": answered, "text": got.choices[0].text}


def main(argv=None):
    args = common.parse(Config, __doc__, argv)
    from prism_jax.data import sources

    given = str(common.HERE / "models" / "gpt2-wikipedia") if args.smoke else None
    given = given or str(sources.smollm2_gguf())
    devices = 2 if args.smoke else args.devices
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        models = {"as given": given}
        if given.endswith(".gguf"):
            models["converted"] = str(Path(tmp) / "converted")
            convert = [sys.executable, "-m", "prism_jax.cli", "convert", given, models["converted"]]
            subprocess.run(convert, check=True, stdout=subprocess.DEVNULL)
        for kind, model in models.items():
            cache = Path(tmp) / f"cache-{len(rows)}"
            for state in ("cold", "warm"):
                rows.append({"model": kind, "cache": state, **first_answer(model, devices, cache)})
                print(rows[-1], flush=True)
    lines = [
        f"`prism-jax serve` to its first answer ({Path(given).name}, N = {devices}, one "
        "greedy completion of 16 tokens)",
        "",
        "| model | compilation cache | ready (s) | first answer (s) |",
        "|---|---|---:|---:|",
    ]
    lines += [f"| {r['model']} | {r['cache']} | {r['ready_s']:.1f} | {r['first_answer_s']:.1f} |"
              for r in rows]  # fmt: skip
    text = "\n".join(lines) + "\n"
    print(text)
    common.save(args, "serve_restart", {"devices": devices, "rows": rows}, text)


if __name__ == "__main__":
    common.run_script(main)
