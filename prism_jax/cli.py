"""The `prism-jax` command line: parsing and dispatch (`commands.py` runs and prints).

Bad input gets one line on stderr and exit code 2. Emulated CPU devices are set up here,
before JAX initialises its backend.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

EXIT_USAGE = 2


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line, exit code 2."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _crs(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of integers: {text!r}") from None


def emulate_devices(n: int, *, exact: bool = False) -> None:
    """Ask XLA for at least (`exact`: exactly) `n` CPU devices; effective only before JAX's
    backend starts."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    flags = os.environ.get("XLA_FLAGS", "")
    found = re.search(r"--xla_force_host_platform_device_count=(\d+)", flags)
    if found and (int(found.group(1)) == n or (int(found.group(1)) > n and not exact)):
        return
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", flags)
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={max(n, 1)}".strip()


def _plan_args(p: argparse.ArgumentParser, *, crs: bool = False) -> None:
    p.add_argument("--devices", type=int, default=4, help="emulated edge devices N (default 4)")
    if crs:
        p.add_argument(
            "--cr",
            type=_crs,
            default=[1, 2, 4, 8, 16],
            help="compression rates, comma-separated (default 1,2,4,8,16)",
        )
    else:
        p.add_argument("--cr", type=int, default=1, help="compression rate (segment length)")
        p.add_argument("--strategy", default="prism", choices=["single", "voltage", "prism"])
    p.add_argument("--logit-bias", default="log_count", choices=["log_count", "none"])
    p.add_argument("--json", action="store_true", help="print one JSON object")


def build_parser() -> Parser:
    parser = Parser(
        prog="prism-jax",
        description="PRISM distributed Transformer inference "
        "(arXiv 2507.12145) across emulated edge devices.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "infer",
        help="run one model across N devices on text or images",
        description="Run a HF checkpoint (BERT, GPT-2, ViT) across N emulated "
        "devices and print its outputs.",
    )
    p.add_argument("--model", required=True, help="checkpoint directory or hub id")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", action="append", help="input text (repeat for a batch)")
    source.add_argument("--image", action="append", help="input image file (repeat for a batch)")
    p.add_argument(
        "--max-length",
        type=int,
        default=None,
        help="truncate texts to this many "
        "tokens (default: no truncation; too long a text is an error)",
    )
    p.add_argument(
        "--compare", action="store_true", help="also run the exact model and print the agreement"
    )
    p.add_argument("--save", default=None, help="write every output array to this .npz file")
    _plan_args(p)

    p = sub.add_parser(
        "demo",
        help="the main job: all-MiniLM-L6-v2 on real reviews, per CR",
        description="all-MiniLM-L6-v2 (real weights) on real fine-food reviews "
        "across N emulated devices: agreement with the exact model, bytes sent "
        "and time per compression rate.",
    )
    p.add_argument("--samples", type=int, default=64, help="number of reviews (default 64)")
    p.add_argument("--max-length", type=int, default=128, help="tokens per review (default 128)")
    _plan_args(p, crs=True)

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
        help="preset (bert-base, gpt2, vit-base-patch16-224) or checkpoint directory",
    )
    p.add_argument("--seq-len", type=int, default=None, help="tokens T (ViT: fixed, 1 + P)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    _plan_args(p)

    p = sub.add_parser(
        "eval",
        help="task metric at each CR, beside the measured savings",
        description="The task metric of a model on a dataset at each compression rate on N "
        "emulated devices: accuracy (classifiers on text or images), perplexity (an LM on "
        "text), cloze accuracy (an LM on a cloze set), with the communication and per-device "
        "compute reductions measured from the compiled programs. Datasets come through TFDS: "
        "the local builders (fine_food_reviews, fashion_mnist_local, wikipedia_leads, "
        "wikipedia_cloze, shakespeare_texts) or, online, any TFDS name (glue/sst2, cifar10).",
    )
    p.add_argument("--model", required=True, help="checkpoint directory or hub id")
    p.add_argument("--dataset", default="fine_food_reviews", help="TFDS name")
    p.add_argument("--split", default="test")
    p.add_argument("--limit", type=int, default=None, help="first examples (rows) only")
    p.add_argument(
        "--max-length",
        type=int,
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
    _plan_args(p, crs=True)

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
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-length", type=int, default=128, help="tokens per example / LM row")
    p.add_argument("--eval-limit", type=int, default=1000, help="examples per evaluation")
    p.add_argument("--checkpoint-dir", default=None, help="orbax checkpoints; resumes if present")
    p.add_argument("--checkpoint-every", type=int, default=50)
    p.add_argument("--restart", action="store_true", help="discard checkpoints, start over")
    p.add_argument("--out", default=None, help="export the result as a HF checkpoint here")
    _plan_args(p)
    p.set_defaults(strategy="single")

    for name, text in [
        ("node", "run one edge node of a multi-process cluster (jax.distributed, gloo over TCP)"),
        ("launch", "start a cluster of N local node processes and show node 0's result"),
    ]:
        p = sub.add_parser(
            name,
            help=text,
            description=text + ". The command after the "
            "options (infer or cost with their arguments) runs on the mesh that "
            "spans the nodes; --devices is set to the number of nodes.",
        )
        if name == "node":
            p.add_argument("--rank", type=int, required=True, help="this node's index")
            p.add_argument("--coordinator", required=True, help="HOST:PORT of node 0")
            p.add_argument(
                "--bind",
                default="127.0.0.1",
                help="address node 0's coordinator binds to (default loopback)",
            )
        else:
            p.add_argument(
                "--port", type=int, default=None, help="coordinator port (default: a free one)"
            )
        p.add_argument("--nodes", type=int, required=True, help="number of nodes N")
        p.add_argument(
            "--timeout",
            type=float,
            default=120,
            help="seconds for the cluster to "
            "form and the command to finish before every node gives up (default 120)",
        )
        p.add_argument(
            "rest", nargs=argparse.REMAINDER, metavar="COMMAND ...", help="infer ... | cost ..."
        )
        p.set_defaults(json=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = args.command
    if command == "node":
        emulate_devices(1, exact=True)  # one device per process
    else:
        emulate_devices(max(getattr(args, "devices", 1) or 1, 1))
    from prism_jax import commands
    from prism_jax.errors import PrismError

    try:
        result = commands.RUNNERS[command](args)
    except PrismError as e:
        print(f"prism-jax {command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    if isinstance(result, int) or result is None:  # launch, node: already reported
        return result or 0
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        commands.PRINTERS[command](result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
