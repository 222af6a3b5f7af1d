"""What a results file records of the run that wrote it: the command line, the commit, the
date, the machine (CPU model, cores) and the package versions (`of_this_run`), and the one
line that says so beneath its Markdown (`line`). Files written before these were recorded
lack them; `line` says "not recorded" for each field a record lacks."""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The packages a result can depend on (those installed are recorded, with their versions).
PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "ml_dtypes",
            "tensorflow-datasets", "tokenizers", "transformers", "torch")  # fmt: skip
FIELDS = ("command", "commit", "date", "machine", "packages")
NOT_RECORDED = "not recorded"


def of_this_run() -> dict:
    """This process's command line, commit (and whether tracked files differ from it), date
    (UTC), machine and package versions."""
    return {
        "command": command(sys.argv),
        "commit": _git("rev-parse", "HEAD"),
        "uncommitted_changes": _changed(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpu": cpu_model(),
            "cores": os.cpu_count(),
            "system": platform.platform(),
            "jax_devices": _jax_devices(),
        },
        "packages": {"python": platform.python_version(), **_versions(PACKAGES)},
    }


def stamp(path: Path, command: str) -> None:
    """Put this run's provenance, with `command` for the command line, at the head of the
    JSON record at `path` (a CLI's `--json` output, written by a Makefile target)."""
    record = json.loads(path.read_text())
    record = record if isinstance(record, dict) else {"rows": record}
    head = {**of_this_run(), "command": command}
    path.write_text(json.dumps({"provenance": head, **record}, indent=2) + "\n")


def command(argv: list[str]) -> str:
    """The command line as typed from the repository root: the interpreter and the script
    relative to it where they lie inside it."""
    return shlex.join([_from_root(sys.executable), _from_root(argv[0]), *argv[1:]])


def cpu_model() -> str | None:
    """The CPU's model name (/proc/cpuinfo; `platform.processor()` elsewhere)."""
    try:
        for text in Path("/proc/cpuinfo").read_text().splitlines():
            if text.startswith(("model name", "Model")):
                return text.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def line(record) -> str:
    """One Markdown line: what `record` (a results file's JSON) holds of its provenance."""
    got = record.get("provenance", {}) if isinstance(record, dict) else {}
    machine, packages = got.get("machine"), got.get("packages")
    commit = got.get("commit") and got["commit"][:12]
    if commit and got.get("uncommitted_changes"):
        commit += " with uncommitted changes"
    parts = [
        f"command `{got['command']}`" if got.get("command") else f"command {NOT_RECORDED}",
        f"commit {commit or NOT_RECORDED}",
        f"date {got.get('date') or NOT_RECORDED}",
        "machine " + (f"{machine['cpu']}, {machine['cores']} cores" if machine else NOT_RECORDED),
        "packages " + (_short(packages) if packages else NOT_RECORDED),
    ]
    return "Written by: " + "; ".join(parts) + "."


def _short(packages: dict) -> str:
    return ", ".join(f"{name} {version}" for name, version in packages.items())


def _from_root(path: str) -> str:
    try:
        return str(Path(path).absolute().relative_to(ROOT))
    except ValueError:
        return path


def _git(*argv: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(ROOT), *argv], capture_output=True, text=True,
                              timeout=30)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _changed() -> bool | None:
    status = _git("status", "--porcelain", "--untracked-files=no")
    return None if status is None else bool(status)


def _jax_devices() -> str | None:
    """ "8 x cpu", "1 x NVIDIA H100 ...": the devices JAX ran on (None before JAX started)."""
    if "jax" not in sys.modules:
        return None
    try:
        devices = sys.modules["jax"].devices()
    except RuntimeError:  # no backend starts (JAX_PLATFORMS names a missing one)
        return None
    return f"{len(devices)} x {devices[0].device_kind}"


def _versions(names) -> dict:
    found = {}
    for name in names:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return found


if __name__ == "__main__":  # python experiments/provenance.py FILE.json COMMAND...
    stamp(Path(sys.argv[1]), shlex.join(sys.argv[2:]))
