"""What every experiment script shares: flags made from the script's config dataclass, the
emulated CPU devices set once before JAX starts, output folders checked before the work
(`out_folder`), and results written with the run's provenance (`write`).

A script states its settings as a dataclass whose fields carry their help (`setting`), then::

    cfg = common.parse(Config, __doc__, argv)          # --smoke, --out, ... and the devices
    common.save(cfg, "table_x", record, markdown, plot)  # results/table_x.{json,md,png}
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import tempfile
import types
import typing
from collections.abc import Callable
from pathlib import Path

import provenance

from prism_jax.cli import emulate_devices
from prism_jax.cli.parser import EXIT_USAGE, Parser
from prism_jax.errors import PrismError
from prism_jax.evaluation import report

HERE = Path(__file__).parent
RESULTS = HERE / "results"


def setting(default, help: str, *, minimum: float | None = None, **argparse_kw):
    """A config field that becomes a flag: `--name` with this default and help. A number
    below `minimum` (default: 1 for an int, 0 for a float) is refused as a usage error."""
    return dataclasses.field(
        default=default, metadata={"help": help, "minimum": minimum, **argparse_kw}
    )


def output(default: str | None, help: str):
    """A config field naming a folder the script writes: checked as the flags are read
    (`out_folder`), so that a bad one is a usage error before the work, not a lost run."""
    return setting(default, help, type=out_folder)


def out_folder(text: str) -> str:
    """argparse type of a folder a script writes (`--out`, checkpoints): one that exists
    and takes a new file, or a new one whose parent exists and does. Anything else is
    refused (one line, exit 2) before the work starts, so that a run is not lost at its end."""
    if not text:
        raise argparse.ArgumentTypeError("expected a folder, got ''")
    path = Path(text)
    try:
        if path.exists() and not path.is_dir():
            raise argparse.ArgumentTypeError(f"{text} is not a folder")
        where = path if path.exists() else path.absolute().parent
        if not where.is_dir():
            why = "is not a folder" if where.exists() else "does not exist"
            raise argparse.ArgumentTypeError(f"{text}: {where} {why}")
        with tempfile.TemporaryFile(dir=where):  # (root passes os.access on a read-only fs)
            pass
    except OSError as e:
        raise argparse.ArgumentTypeError(f"{text}: cannot write there ({e.strerror})") from None
    return text


def add_out(parser) -> None:
    """`--out`, checked (`out_folder`), for the scripts that parse their own flags."""
    parser.add_argument(
        "--out", type=out_folder, help="results folder (default: experiments/results; "
        "a smoke writes nothing without it)"
    )  # fmt: skip


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _at_least(int, 1)(text)


def _at_least(kind: type, minimum: float):
    def read(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not math.isfinite(value) or value < minimum:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__} >= {minimum}: {text!r}")
        return value

    return read


@dataclasses.dataclass
class TrainFlags:
    """The flags of the scripts that train a task model (train_vit.py, train_gpt2.py)."""

    smoke: bool = setting(False, "a tiny model, a few steps")
    out: str | None = output(None, "model directory to write")
    checkpoint_dir: str | None = output(None, "orbax checkpoints (resumable)")
    restart: bool = setting(False, "discard checkpoints, start over")
    data_dir: str | None = setting(None, "where TFDS prepares its array_record")


def parse(config: type, doc: str, argv: list[str] | None = None, *, devices: int | None = 8):
    """`config` filled from the command line (a flag per field), with `devices` emulated CPU
    devices asked of XLA before anything starts JAX's backend (None: JAX's own devices)."""
    parser = Parser(description=doc.splitlines()[0])
    hints = typing.get_type_hints(config)
    for field in dataclasses.fields(config):
        name, meta = "--" + field.name.replace("_", "-"), dict(field.metadata)
        minimum, kind = meta.pop("minimum", None), _plain(hints[field.name])
        if kind is bool:
            parser.add_argument(name, action="store_true", **meta)
        elif kind in (int, float):
            minimum = (1 if kind is int else 0) if minimum is None else minimum
            parser.add_argument(name, type=_at_least(kind, minimum), default=field.default, **meta)
        else:
            parser.add_argument(name, **{"type": kind, "default": field.default, **meta})
    cfg = config(**vars(parser.parse_args(argv)))
    if devices is not None:
        emulate_devices(devices)
    return cfg


def run_script(main: Callable[[], int | None]) -> None:
    """Exit with what a script's `main()` returns; a PrismError on the way (data that is not
    installed, a checkpoint that does not load) is one line on stderr and exit 2, as in the
    CLI, not a traceback."""
    try:
        code = main()
    except PrismError as e:
        print(f"{Path(sys.argv[0]).name}: error: {e}", file=sys.stderr)
        code = EXIT_USAGE
    sys.exit(code or 0)


def _plain(hint) -> type:
    """`int | None` -> int: the type a flag's text is read as."""
    if isinstance(hint, types.UnionType):
        return next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def results_dir(cfg) -> Path | None:
    """Where a script writes: `--out`, else results/; None for a smoke without `--out`."""
    return report.results_dir(cfg.out, cfg.smoke, RESULTS)


def save(cfg, stem: str, record, text: str | None, plot=None) -> None:
    """`results/<stem>.{json,md,png}` (or `--out`, `write`); a smoke without `--out` writes
    nothing."""
    write(results_dir(cfg), stem, record, text, plot)


def write(folder: Path | None, stem: str, record, text: str | None = None, plot=None) -> None:
    """`<folder>/<stem>.json`: `record` (a list goes under "rows") after this run's
    provenance (command, commit, date, machine, packages; a record that holds an earlier
    run's, resumed from its file, keeps it under "earlier_runs"); `.md`: `text` with the
    provenance beneath; `.png`: `plot(path)`. Nothing for a folder of None."""
    if folder is None:
        return
    record = dict(record) if isinstance(record, dict) else {"rows": record}
    earlier = record.pop("earlier_runs", [])
    earlier += [record.pop("provenance")] if "provenance" in record else []
    head = {
        "provenance": provenance.of_this_run(),
        **({"earlier_runs": earlier} if earlier else {}),
    }
    record = {**head, **record}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{stem}.json").write_text(json.dumps(record, indent=2) + "\n")
    if text is not None:
        (folder / f"{stem}.md").write_text(
            text.rstrip("\n") + "\n\n" + provenance.line(record) + "\n"
        )
    if plot is not None:
        plot(folder / f"{stem}.png")


def timing_main(doc: str, full, smoke, run, markdown, stem: str, argv=None) -> None:
    """The `main` of a timing script: `--smoke` (the `smoke` config, writes nothing without
    `--out`) or the `full` config with `--repeats`; `run(cfg)` gives the rows,
    `markdown(rows, cfg)` the table, printed and written to `<--out>/<stem>.{json,md}`
    (default: results/)."""
    parser = Parser(description=doc.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (writes only to --out)")
    parser.add_argument("--repeats", type=positive_int, default=full.repeats)
    add_out(parser)
    args = parser.parse_args(argv)
    cfg = smoke if args.smoke else dataclasses.replace(full, repeats=args.repeats)
    rows = run(cfg)
    print(markdown(rows, cfg))
    save(args, stem, rows, markdown(rows, cfg))


def first_layers(model, depth: int):
    """The model cut to its first `depth` layers (real weights; for the smoke)."""
    from prism_jax import models

    cut = models.abstract(dataclasses.replace(model.config, depth=depth))
    state = models.from_flat(cut.params, models.flat_params(model.params))
    return dataclasses.replace(model, config=cut.config, graphdef=cut.graphdef, params=state)


def speed_table(rows: list[dict]) -> str:
    """Markdown of single-device timings: JAX first call and steady state against PyTorch."""
    lines = [
        "| batch | T | JAX first call (s) | JAX (s) | PyTorch (s) | JAX / PyTorch |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['batch']} | {r['tokens']} | {r['jax_first_call_s']:.2f} | {r['jax_s']:.4f} "
        f"| {r['torch_s']:.4f} | {r['jax_over_torch']:.2f} |"
        for r in rows
    ]
    return "\n".join(lines)
