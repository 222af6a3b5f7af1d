"""Training checkpoints with orbax: keep the last k, resume from the latest, fail clearly.

A checkpoint holds the whole training state (params, optimizer state, step) as one pytree.
Saves are synchronous so that a process killed after `save` returns loses nothing; orbax
writes to a temporary directory and renames it, so a save cut short leaves no step behind.
Beside the steps, `run.json` records what the run is (settings, start, data), so that a
directory is only resumed by the run that wrote it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from prism_jax.errors import PrismError

RUN_RECORD = "run.json"


class Checkpoints:
    """The checkpoints of one training run, in `directory`."""

    def __init__(self, directory: str | Path, *, keep: int = 3):
        self.directory = Path(directory).absolute()
        self.keep = keep
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
        saved, record = json.loads(path.read_text()), json.loads(json.dumps(record))
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
        """Delete every checkpoint of this run (starting over)."""
        self.manager.close()
        shutil.rmtree(self.directory, ignore_errors=True)
        self.manager = self._open()

    def close(self) -> None:
        self.manager.close()
