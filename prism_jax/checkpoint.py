"""Training checkpoints with orbax: keep the last k, resume from the latest, fail clearly.

A checkpoint holds the whole training state (params, optimizer state, step) as one pytree.
Saves are synchronous so that a process killed after `save` returns loses nothing; orbax
writes to a temporary directory and renames it, so a save cut short leaves no step behind.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from prism_jax.errors import PrismError


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

    def clear(self) -> None:
        """Delete every checkpoint of this run (starting over)."""
        self.manager.close()
        shutil.rmtree(self.directory, ignore_errors=True)
        self.manager = self._open()

    def close(self) -> None:
        self.manager.close()
