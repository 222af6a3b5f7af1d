"""Training checkpoints with orbax: keep the last k, resume from the latest, fail clearly.

A checkpoint holds the whole training state (params, optimizer state, step) as one pytree.
Saves are synchronous so that a process killed after `save` returns loses nothing; orbax
writes to a temporary directory and renames it, so a save cut short leaves no step behind.
Beside the steps, `run.json` records what the run is (settings, start, data), so that a
directory is only resumed by the run that wrote it.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from prism_jax.errors import PrismError

RUN_RECORD = "run.json"
LOCK = ".lock"  # held by the training run that uses the directory


class Checkpoints:
    """The checkpoints of one training run, in `directory`."""

    def __init__(self, directory: str | Path, *, keep: int = 3):
        self.directory = usable_directory(directory, "checkpoint directory")
        self.keep = keep
        self._lock = _lock(self.directory / LOCK)
        self.manager = self._open()

    def _open(self) -> ocp.CheckpointManager:
        return ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=self.keep,
                create=True,
                enable_async_checkpointing=False,
                cleanup_tmp_directories=True,
            ),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state) -> None:
        self.manager.save(step, args=ocp.args.StandardSave(state), force=True)
        self.manager.wait_until_finished()

    def restore(self, like):
        """The latest state, shaped and placed like `like`; raises if it cannot be read."""
        step = self.latest_step()
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        try:
            return step, self.manager.restore(step, args=ocp.args.StandardRestore(abstract))
        except Exception as e:  # noqa: BLE001 - orbax raises many kinds for a damaged step
            raise PrismError(
                f"checkpoint at step {step} in {self.directory} is corrupt or partial "
                f"({type(e).__name__}); remove it, or start over with restart=True (--restart)"
            ) from None

    def check_run(self, record: dict) -> None:
        """Raise unless `record` is the run these checkpoints belong to."""
        path = self.directory / RUN_RECORD
        if not path.exists():
            raise PrismError(
                f"{self.directory} holds checkpoints but no {RUN_RECORD} saying which run wrote "
                "them; use another directory, or start over with restart=True (--restart)"
            )
        try:
            saved = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise PrismError(
                f"{path} is unreadable ({type(e).__name__}); use another directory, or start "
                "over with restart=True (--restart)"
            ) from None
        if not isinstance(saved, dict):
            raise PrismError(f"{path} is not a run record (a JSON object); use --restart")
        record = json.loads(json.dumps(record))
        differ = sorted(k for k in record.keys() | saved.keys() if record.get(k) != saved.get(k))
        if differ:
            raise PrismError(
                f"{self.directory} holds the checkpoints of another run (differing: "
                f"{', '.join(differ)}); use another directory, or start over with restart=True "
                "(--restart)"
            )

    def record_run(self, record: dict) -> None:
        (self.directory / RUN_RECORD).write_text(json.dumps(record, indent=2, sort_keys=True))

    def clear(self) -> None:
        """Delete every checkpoint of this run (starting over); the lock stays held."""
        self.manager.close()
        for child in self.directory.iterdir():
            if child.name == LOCK:
                continue
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
        self.manager = self._open()

    def close(self) -> None:
        self.manager.close()
        if self._lock is not None:
            self._lock.close()  # closing the file releases the lock
            self._lock = None


def usable_directory(path: str | Path, what: str) -> Path:
    """`path` as an absolute directory that exists (made if needed) and takes new files; a
    one-line PrismError otherwise. Checked before long work, so that none is lost at the end."""
    path = Path(path).absolute()
    if path.exists() and not path.is_dir():
        raise PrismError(f"{what} {path} is a file, not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise PrismError(f"{what} {path} is not writable ({e.strerror or e})") from None
    return path


def _lock(path: Path):
    """Hold an exclusive lock on `path` for as long as the returned file stays open; a second
    holder is refused with the first one's process id."""
    try:
        handle = open(path, "a+")  # noqa: SIM115 - held open for the lifetime of the run
    except OSError as e:  # another user's lock file, or a directory in its place
        raise PrismError(
            f"cannot open the lock file {path} ({e.strerror or e}): another user's run may hold "
            "this checkpoint directory; use another directory"
        ) from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise PrismError(
            f"{path.parent} is in use by another training run (process {holder}); wait for it "
            "to finish, or use another directory"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle
