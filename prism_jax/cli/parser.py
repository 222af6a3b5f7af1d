"""The `prism-jax` argument parser: one function per subcommand, argument types that refuse
bad values at parse time (one line, exit code 2), before any model or data is loaded."""

from __future__ import annotations

import argparse
import dataclasses

from prism_jax.cli import planning
from prism_jax.cli.values import (
    compression_rates,
    coordinator,
    float32_weight,
    nonnegative_float,
    nonnegative_int,
    port,
    positive_float,
    positive_int,
    probability,
    seed,
    utf8_text,
)
from prism_jax.data.tfds_builders import LOCAL
from prism_jax.plan import (
    EXCHANGES,
    GROUPINGS,
    LOGIT_BIASES,
    STRATEGIES,
    TRANSPORTS,
    WIRES,
    Plan,
)

EXIT_USAGE = 2


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line, exit code 2."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")

    def parse_known_args(self, args=None, namespace=None):
        """As argparse's, and `--cr` left out takes its default here, with `cr_given` saying
        whether it was given (`--plan auto` refuses a given one, the default's value too)."""
        ns, rest = super().parse_known_args(args, namespace)
        if getattr(ns, "cr_default", None) is not None and not hasattr(ns, "cr_given"):
            ns.cr_given = ns.cr is not None
            ns.cr = ns.cr_default if ns.cr is None else ns.cr
        return ns, rest


def _plan_args(p: argparse.ArgumentParser, *, crs: bool = False, auto: bool = False) -> None:
    p.add_argument(
        "--devices", type=positive_int, default=4, help="emulated edge devices N (default 4)"
    )
    if crs:
        p.add_argument(
            "--cr",
            type=compression_rates,
            default=None,
            help="compression rates, comma-separated (default 1,2,4,8,16)",
        )
        p.set_defaults(cr_default=[1, 2, 4, 8, 16])
    else:
        p.add_argument("--cr", type=positive_int, default=None, help="compression rate (default 1)")
        p.set_defaults(cr_default=1)
        p.add_argument("--strategy", default="prism", choices=STRATEGIES)
    p.add_argument("--logit-bias", default="log_count", choices=LOGIT_BIASES)
    p.add_argument(
        "--exchange",
        default="auto",
        choices=EXCHANGES,
        help="what travels: attention-input means (hidden) or key/value means (kv); auto: "
        "the cheaper exact one, kv for rotary models",
    )
    p.add_argument(
        "--transport",
        default="all_gather",
        choices=TRANSPORTS,
        help="how a layer's exchange travels, the same values every way: all_gather (a ring of "
        "N - 1 steps on gloo), all_to_all (one step), stream (the nodes' own connections, "
        "sent at once; one process per device: launch or node)",
    )
    c = p.add_argument_group("compressor (DESIGN.md 1b, 1c; default: the paper's segments)")
    c.add_argument(
        "--compressor",
        default="paper",
        choices=["paper", "prism+"],
        help="prism+: k-means groups, one salient token, value tilt (the flags below override)",
    )
    c.add_argument("--grouping", default=None, choices=GROUPINGS, help="how tokens are grouped")
    c.add_argument(
        "--salient",
        type=nonnegative_int,
        default=None,
        help="0 or 1: a token per device sent exactly",
    )
    c.add_argument(
        "--sink",
        type=nonnegative_int,
        default=None,
        help="the first S valid tokens of each row sent exactly (a language model's attention "
        "sink), out of the groups of the device that holds them",
    )
    c.add_argument(
        "--wire",
        default="f32",
        choices=WIRES,
        help="what the means travel as (default f32; int8, int4: a float32 scale per vector; "
        "int4h: int4 after a Hadamard rotation of each vector)",
    )
    c.add_argument("--kmeans-iters", type=positive_int, default=None, help="k-means iterations")
    c.add_argument(
        "--groups",
        type=positive_int,
        default=None,
        help="V groups a device sends per layer instead of ceil(L / CR) (with --cr 1, not with "
        "--grouping segments; in Python `planner.fill` finds the most within a byte budget)",
    )
    c.add_argument(
        "--value-tilt", action="store_true", help="send each group's spread; tilt its value"
    )
    if auto:
        a = p.add_argument_group("planner (`prism-jax plan`)")
        a.add_argument(
            "--plan",
            default=None,
            choices=["auto"],
            help="auto: run the planner's choice of devices (at most --devices), CR, compressor "
            "and wire for the link flags below",
        )
        planning.link_args(a, required=False)
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _infer(sub) -> None:
    p = sub.add_parser(
        "infer",
        help="run one model across N devices on text or images",
        description="Run a HF checkpoint (BERT, GPT-2, ViT, Llama) or a GGUF file across N "
        "emulated devices and print its outputs.",
    )
    p.add_argument("--model", required=True, help="checkpoint directory, .gguf file or hub id")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--text", action="append", type=utf8_text, help="input text (repeat for a batch)"
    )
    source.add_argument("--image", action="append", help="input image file (repeat for a batch)")
    p.add_argument(
        "--max-length",
        type=positive_int,
        default=None,
        help="truncate texts to this many "
        "tokens (default: no truncation; too long a text is an error)",
    )
    p.add_argument(
        "--compare", action="store_true", help="also run the exact model and print the agreement"
    )
    p.add_argument(
        "--save", default=None, help="write every output array to this file (NumPy .npz format)"
    )
    _plan_args(p, auto=True)


def _demo(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="the main job: all-MiniLM-L6-v2 on real reviews, per CR",
        description="all-MiniLM-L6-v2 (real weights) on real fine-food reviews "
        "across N emulated devices: agreement with the exact model, bytes sent "
        "and time per compression rate.",
    )
    p.add_argument(
        "--samples", type=positive_int, default=64, help="number of reviews (default 64)"
    )
    p.add_argument(
        "--max-length", type=positive_int, default=128, help="tokens per review (default 128)"
    )
    _plan_args(p, crs=True)


def _cost(sub) -> None:
    p = sub.add_parser(
        "cost",
        help="bytes sent and FLOPs per device, from the compiled program",
        description="Lower and compile the inference program for abstract "
        "weights and report, per device and inference, the bytes its "
        "collectives send (with the closed form beside them) and its FLOPs "
        "against one device running the whole sequence.",
    )
    p.add_argument(
        "--model",
        required=True,
        help="preset (bert-base, gpt2, vit-base-patch16-224, smollm2-135m), checkpoint "
        "directory or .gguf file",
    )
    p.add_argument(
        "--seq-len", type=positive_int, default=None, help="tokens T (ViT: fixed, 1 + P)"
    )
    p.add_argument("--batch", type=positive_int, default=1)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    _plan_args(p)


def _eval(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="task metric at each CR, beside the measured savings",
        description="The task metric of a model on a dataset at each compression rate on N "
        "emulated devices: accuracy (classifiers on text or images), perplexity (an LM on "
        "text), cloze accuracy (an LM on a cloze set), with the communication and per-device "
        "compute reductions measured from the compiled programs. Datasets come through TFDS: "
        f"the local builders ({', '.join(LOCAL)}) or, online, any TFDS name (glue/sst2, "
        "cifar10).",
    )
    p.add_argument("--model", required=True, help="checkpoint directory or hub id")
    p.add_argument("--dataset", default="fine_food_reviews", help="TFDS name")
    p.add_argument("--split", default="test")
    p.add_argument("--limit", type=positive_int, default=None, help="first examples (rows) only")
    p.add_argument(
        "--max-length",
        type=positive_int,
        default=None,
        help="tokens per example (text classification: padded to it, default 256; LM: row "
        "length, default the model's positions)",
    )
    p.add_argument(
        "--layout",
        default="padded",
        choices=["padded", "unpadded"],
        help="text classification: split the padded sequence, or each input at its own length",
    )
    _plan_args(p, crs=True, auto=True)


def _finetune(sub) -> None:
    p = sub.add_parser(
        "finetune",
        help="fine-tune a classifier or LM under a plan (robust to a CR)",
        description="Fine-tune on a TFDS dataset (a classifier on labelled text or images, an "
        "LM on text) under single, or prism at N devices and a CR so that the model learns to "
        "work with compression. Resumable: orbax checkpoints in --checkpoint-dir.",
    )
    p.add_argument(
        "--model",
        required=True,
        help="checkpoint directory (a base model gets a fresh head for a labelled dataset)",
    )
    p.add_argument("--dataset", default="fine_food_reviews", help="TFDS name")
    p.add_argument("--eval-split", default="test")
    p.add_argument("--steps", type=positive_int, default=300)
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--lr", type=positive_float, default=5e-5)
    p.add_argument("--warmup", type=nonnegative_int, default=30)
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument(
        "--max-length", type=positive_int, default=128, help="tokens per example / LM row"
    )
    p.add_argument("--eval-limit", type=positive_int, default=1000, help="examples per evaluation")
    p.add_argument("--checkpoint-dir", default=None, help="orbax checkpoints; resumes if present")
    p.add_argument("--checkpoint-every", type=positive_int, default=50)
    p.add_argument("--restart", action="store_true", help="discard checkpoints, start over")
    p.add_argument(
        "--out", default=None,
        help="export the result as a HF checkpoint here (a new or empty directory)",
    )  # fmt: skip
    p.add_argument("--force", action="store_true", help="replace --out if it already holds files")
    p.add_argument(
        "--mixed-cr",
        type=compression_rates,
        default=None,
        help="mixed-CR training (prism): each step at a CR drawn from these, comma-separated "
        "(--cr is then the CR evaluated)",
    )
    p.add_argument(
        "--distill",
        type=float32_weight,
        default=0.0,
        help="weight of KL(the starting model run exactly || the model trained) beside the "
        "cross-entropy: keeps the exact model's predictions while learning compression (for "
        "a model that already does the task)",
    )
    _plan_args(p)
    p.set_defaults(strategy="single")


def _generate(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="generate text: a partitioned prefill, then decoding from a compressed cache",
        description="Generate text with a causal LM (Llama-family, GPT-2; a HF directory or a "
        ".gguf file): the prompt is prefilled across N emulated devices with the plan, then "
        "the device that owns its end decodes alone from a cache of [remote K/V means | its "
        "own K/V | generated K/V], sending nothing per new token. Streams the text.",
    )
    p.add_argument("--model", required=True, help="checkpoint directory, .gguf file or hub id")
    p.add_argument(
        "--prompt", action="append", type=utf8_text, required=True,
        help="prompt text (repeat for a batch; only a single prompt is streamed)",
    )  # fmt: skip
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    p.add_argument("--max-new-tokens", type=positive_int, default=32)
    p.add_argument("--temperature", type=nonnegative_float, default=0.0, help="0: greedy (default)")
    p.add_argument("--top-k", type=positive_int, default=None, help="sample among the k best")
    p.add_argument(
        "--top-p", type=probability, default=None,
        help="sample among the most likely tokens that hold this probability (after --top-k)",
    )  # fmt: skip
    p.add_argument("--seed", type=seed, default=0, help="sampling seed")
    p.add_argument(
        "--compare", action="store_true", help="also generate with the exact model and compare"
    )
    _plan_args(p, auto=True)


def _convert(sub) -> None:
    p = sub.add_parser(
        "convert",
        help="a llama.cpp GGUF file -> a HF checkpoint directory",
        description="Dequantize a Llama-family GGUF file (F32, F16, Q8_0, Q4_0, Q4_1, ...: "
        "whatever the gguf package reads) and write a HF checkpoint directory: config.json, "
        "model.safetensors (float32), tokenizer.json and tokenizer_config.json (with the chat "
        "template) and generation_config.json, loadable by transformers and prism-jax alike.",
    )
    p.add_argument("source", help="the .gguf file")
    p.add_argument("out", help="directory to write (a new or empty one, unless --force)")
    p.add_argument("--force", action="store_true", help="replace `out` if it already holds files")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _serve(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a model across N devices behind OpenAI's HTTP API",
        description="Load a checkpoint once, place it on N emulated devices with the plan and "
        "answer OpenAI-style requests until SIGTERM: /v1/chat/completions (server-sent events "
        "with stream), /v1/completions, /v1/embeddings (encoders, mean-pooled), /v1/models, "
        "/health and Prometheus /metrics. Requests that arrive together are batched.",
    )
    p.add_argument("--model", required=True, help="checkpoint directory or .gguf file")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default loopback)")
    p.add_argument("--port", type=port, default=8000, help="port to listen on (default 8000)")
    p.add_argument("--max-batch", type=positive_int, default=8, help="rows per batch (default 8)")
    p.add_argument(
        "--max-queue", type=positive_int, default=64,
        help="jobs waiting or running before requests get 429 (default 64)",
    )  # fmt: skip
    p.add_argument(
        "--batch-window", type=nonnegative_float, default=0.005,
        help="seconds the worker waits for requests to batch together (default 0.005)",
    )  # fmt: skip
    p.add_argument(
        "--max-tokens", type=positive_int, default=256,
        help="new tokens of a chat request that names no max_tokens (default 256; at most the "
        "rest of the context)",
    )  # fmt: skip
    p.add_argument(
        "--compilation-cache", default=None, metavar="DIR",
        help="keep compiled programs in this directory (JAX's persistent cache): a restart "
        "reads them instead of compiling again",
    )  # fmt: skip
    _plan_args(p, auto=True)


def _cluster(sub, name: str, text: str) -> None:
    p = sub.add_parser(
        name,
        help=text,
        description=text + ". The command after the options (infer, cost, eval, generate or "
        "serve with their arguments) runs on the mesh that spans the nodes; --devices is set to "
        "the number of nodes. serve: node 0 holds the HTTP front and runs until stopped.",
    )
    if name == "node":
        p.add_argument("--rank", type=nonnegative_int, required=True, help="this node's index")
        p.add_argument("--coordinator", type=coordinator, required=True, help="HOST:PORT of node 0")
        p.add_argument(
            "--bind",
            default="127.0.0.1",
            help="address node 0's coordinator binds to (default loopback)",
        )
    else:
        p.add_argument(
            "--port", type=port, default=None, help="coordinator port (default: a free one)"
        )
    p.add_argument("--nodes", type=positive_int, required=True, help="number of nodes N")
    p.add_argument(
        "--timeout",
        type=positive_float,
        default=120,
        help="seconds for the cluster to "
        "form and the command to finish before every node gives up (default 120)",
    )
    p.add_argument(
        "rest",
        nargs=argparse.REMAINDER,
        metavar="COMMAND ...",
        help="infer ... | cost ... | eval ... | generate ... | serve ... (node 0 serves HTTP) | "
        "plan --profile ... (measure the nodes); with --plan auto, launch plans once and starts "
        "the choice's nodes (maybe fewer than --nodes)",
    )
    p.set_defaults(json=False)


def build_parser() -> Parser:
    parser = Parser(
        prog="prism-jax",
        description="PRISM distributed Transformer inference "
        "(arXiv 2507.12145) across emulated edge devices.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands = (_infer, _demo, _cost, _eval, _finetune, _generate, _convert, _serve)
    for add in (*commands, planning.add_parser):
        add(sub)
    _cluster(
        sub, "node", "run one edge node of a multi-process cluster (jax.distributed, gloo over TCP)"
    )
    _cluster(sub, "launch", "start a cluster of N local node processes and show node 0's result")
    return parser


def plan_of(args, cr: int | None = None, cfg=None) -> Plan:
    """The `Plan` the command line names (`cr` for one cell of a sweep): `--compressor prism+`
    starts from `Plan.best` for the model `cfg` (None, before it is read: an encoder's), and
    the single compressor flags override it. With `--plan auto`: the planner's choice once
    `planning.auto` has made it (before: the flags are checked, and the paper's plan stands in).
    """
    if getattr(args, "plan", None) == "auto":
        return planning.chosen(args)
    planning.check_unplanned(args)
    chosen = {
        k: getattr(args, k)
        for k in ("grouping", "salient", "kmeans_iters", "sink", "groups")
        if getattr(args, k) is not None
    }
    if args.value_tilt:
        chosen["value_tilt"] = True
    fields = dict(
        wire=args.wire,
        strategy=getattr(args, "strategy", "prism"),
        cr=args.cr if cr is None else cr,
        logit_bias=args.logit_bias,
        exchange=args.exchange,
        transport=args.transport,
    )
    if args.compressor == "prism+":
        return Plan.best(model=cfg, **fields | chosen)
    return Plan(**fields | chosen)


def plan_summary(plan: Plan, cfg) -> dict:
    """What a result reports of its plan: every field, `exchange` resolved for the model."""
    return dataclasses.asdict(plan.for_model(cfg))
