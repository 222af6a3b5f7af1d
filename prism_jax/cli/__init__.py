"""The `prism-jax` command line: `parser` parses, `commands` runs and prints, `main` dispatches.

Bad input gets one line on stderr and exit code 2. Emulated CPU devices are set up here,
before JAX initialises its backend (so `commands`, which starts it, is imported after).
"""

from __future__ import annotations

import errno
import logging
import os
import re
import sys

from prism_jax.cli.parser import EXIT_USAGE, build_parser
from prism_jax.errors import PrismError

__all__ = ["EXIT_BROKEN_PIPE", "EXIT_USAGE", "build_parser", "emulate_devices", "main"]


def emulate_devices(n: int, *, exact: bool = False) -> None:
    """Ask XLA for at least (`exact`: exactly) `n` CPU devices; effective only before JAX's
    backend starts. JAX is held to its CPU backend only on a host without an accelerator
    plugin (and never against the user's own `JAX_PLATFORMS`): with a GPU, one-device work
    runs there and `edge_mesh` emulates more devices than it has on the CPU."""
    if not accelerator_installed():
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    flags = os.environ.get("XLA_FLAGS", "")
    found = re.search(r"--xla_force_host_platform_device_count=(\d+)", flags)
    if found and (int(found.group(1)) == n or (int(found.group(1)) > n and not exact)):
        return
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", flags)
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={max(n, 1)}".strip()


def accelerator_installed() -> bool:
    """Whether a JAX accelerator plugin (CUDA, ROCm, TPU) is installed, read from the installed
    distributions without starting JAX."""
    from importlib import metadata

    pattern = re.compile(r"^(jax[-_]cuda\d+[-_]plugin|jax[-_]rocm\d+[-_]plugin|libtpu)")
    return any(pattern.match(d.metadata["Name"] or "") for d in metadata.distributions())


def _quiet_runtime() -> None:
    """Keep stderr to our one line: library log records (orbax logs through absl) stay out,
    and so do asyncio's "Task exception was never retrieved" records of a failed orbax
    restore's other read tasks (when they are collected is a race: the test saw them once in
    three runs), nor JAX's record of a failed host callback, and the restore's late callbacks
    into its closed event loop are dropped."""
    logging.getLogger("absl").setLevel(logging.CRITICAL)
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    # A failed host callback (the stream's exchange, a lost peer) is logged with a traceback
    # before its error reaches `cluster.fail_fast`, which reports it in one line.
    logging.getLogger("jax._src.callback").setLevel(logging.CRITICAL)
    default = sys.unraisablehook

    def hook(unraisable):
        if isinstance(unraisable.exc_value, RuntimeError) and "Event loop is closed" in str(
            unraisable.exc_value
        ):
            return
        default(unraisable)

    sys.unraisablehook = hook


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (argparse's 0 or 2 included)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, or a usage error already printed in one line
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    command = args.command
    if command not in ("node", "launch") and getattr(args, "transport", None) == "stream":
        print(
            f"prism-jax {command}: error: --transport stream runs on a cluster of one process "
            f"per device: prism-jax launch --nodes N -- {command} ... (or node); emulated "
            "devices use all_gather or all_to_all",
            file=sys.stderr,
        )
        return EXIT_USAGE
    _quiet_runtime()
    if command == "node":
        emulate_devices(1, exact=True)  # one device per process
    elif command == "launch":
        emulate_devices(args.nodes)  # what `--plan auto` calibrates on; nothing else runs here
    else:
        emulate_devices(getattr(args, "devices", None) or 1)
    from prism_jax.cli import commands, printing  # starts JAX: after the devices are set up

    try:
        result = commands.RUNNERS[command](args)
        if isinstance(result, int) or result is None:  # launch, node: already reported
            return result or 0
        printing.show(command, result, as_json=args.json)
        sys.stdout.flush()  # a closed or full stdout fails here, not at the interpreter's exit
    except PrismError as e:
        print(f"prism-jax {command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"prism-jax {command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly, as Unix tools do
        _discard_stdout()
        return EXIT_BROKEN_PIPE
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise
        _discard_stdout()
        where = f" ({e.filename})" if e.filename else ""
        print(f"prism-jax {command}: error: cannot write: {e.strerror}{where}", file=sys.stderr)
        return EXIT_USAGE
    return 0


EXIT_BROKEN_PIPE = 128 + 13  # what a shell reports for a tool that SIGPIPE ended


def _discard_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's last flush of what its buffer
    still holds does not fail a second time (with a message) at exit."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # not a real file (captured, in tests)
        pass
