"""Output directories written whole or not at all (`convert`, `finetune --out`, `save_pretrained`).

Everything is written into a temporary folder beside the target and renamed into place at the
end, so that an error or a kill leaves the target as it was: never another model's files beside
new weights, never half a checkpoint. A directory that already holds files is refused unless
the caller asks to replace it; a temporary folder left by a killed process is removed by the
next write to the same target.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from pathlib import Path

from prism_jax.errors import PrismError

_PARTIAL = ".partial-"  # .<name>.partial-<pid>-<random>: a write in progress


def check_target(
    path, *, replace: bool, what: str = "output directory", hint="replace=True", source=None
):
    """`path` as an absolute directory that may be written, checked before any long work: not a
    file, empty or absent (or `replace`), its nearest existing parent a writable directory,
    not holding `source` (what is read: replacing the folder would delete it). `hint` says how
    to ask for a replacement (`--force` on the command line)."""
    target = Path(path).absolute()
    if target.exists() and not target.is_dir():
        raise PrismError(f"{what} {target} is a file, not a directory")
    if target.is_dir() and not replace and any(target.iterdir()):
        raise PrismError(
            f"{what} {target} already holds files; give a new or empty directory, or replace "
            f"it ({hint})"
        )
    if source is not None and Path(source).resolve().is_relative_to(target.resolve()):
        raise PrismError(f"{what} {target} holds {source}: replacing it would delete that")
    parent = target.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise PrismError(f"{what} {target} cannot be made: {parent} is a file")
    try:
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as e:
        raise PrismError(f"{what} {target} is not writable ({e.strerror or e})") from None
    return target


@contextlib.contextmanager
def writing(path, *, replace: bool, what: str = "output directory", hint="replace=True"):
    """Yields an empty temporary folder beside `path`; on a normal exit it becomes `path` (the
    old `path` deleted when `replace`), on an exception it is deleted and `path` is untouched."""
    target = check_target(path, replace=replace, what=what, hint=hint)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(target)
    prefix = f".{target.name}{_PARTIAL}{os.getpid()}-"
    temp = Path(tempfile.mkdtemp(prefix=prefix, dir=target.parent))
    try:
        yield temp
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    _move_into_place(temp, target, replace, what)


def _move_into_place(temp: Path, target: Path, replace: bool, what: str) -> None:
    old = None
    if replace and target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.rename(target, old)  # onto the empty folder just made: a unique name
    try:
        os.rename(temp, target)  # atomic; onto an absent or empty directory only
    except OSError as e:
        if old is not None:
            os.rename(old, target)
        kept = Path(tempfile.mkdtemp(prefix=f"{target.name}.new-", dir=target.parent))
        os.rename(temp, kept)
        raise PrismError(
            f"{what} {target} was filled by another process meanwhile ({e.strerror or e}); "
            f"this one's result is left in {kept}"
        ) from None
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _remove_stale(target: Path) -> None:
    """Delete the temporary folders of earlier writes to `target` whose process is gone."""
    pattern = re.compile(re.escape(f".{target.name}{_PARTIAL}") + r"(\d+)-")
    for folder in target.parent.iterdir():
        found = pattern.match(folder.name)
        if found and folder.is_dir() and not _alive(int(found.group(1))):
            shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # gone, or never a process id
        return False
    except PermissionError:  # another user's process
        return True
    return True
