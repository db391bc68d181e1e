"""
The run folder and its checkpoint: one run per folder, and nothing a run wrote is ever lost.

Design choices:
- A run folder belongs to one run. A new run refuses a folder that already holds one (the user resumes it with
  --resume, or replaces it with an explicit --overwrite), and an exclusive `flock` held for the whole run refuses a
  second process on the same folder, so two runs never interleave their checkpoints.
- The default folder, runs/<date-time>, is created exclusively: two runs started in the same second get two folders.
- A checkpoint is written to a temporary file in the same folder, fsynced and renamed: a kill at any moment leaves
  the previous checkpoint whole.
- Only finite weights and optimizer state are written, so the last checkpoint on disk always resumes; and one that
  would not fit on the disk is refused before a byte is written, keeping the previous one.
- Loading checks that the file is a checkpoint of this program, so a foreign .pt is a clear error, not a KeyError.
"""

import contextlib
import errno
import fcntl
import os
import shutil
import tempfile
from datetime import datetime
from pathlib import Path

import torch

CHECKPOINT = "ckpt.pt"
RUN_FILES = (CHECKPOINT, "run.json", "metrics.jsonl")  # any of these means the folder holds a run
OVERWRITTEN_FILES = (*RUN_FILES, "tokenizer.json", "error.log")
REQUIRED_KEYS = ("model", "optimizer", "step", "args", "model_config", "tokenizer", "rng")
SPACE_MARGIN = 1.1  # torch.save's own framing on top of the tensors' bytes


class RunFolderError(Exception):
    """A run folder that cannot be used as asked; the message is one line for the user."""


class NotFiniteError(Exception):
    """The weights or optimizer state hold NaN or infinity: such a checkpoint is never written."""


def claim(out_dir: str | None, resuming: bool, overwrite: bool) -> tuple[Path, object]:
    """Create or reuse the run folder and lock it for this process; returns the folder and the lock to keep open."""
    if out_dir is None:
        folder = new_default_folder()
    else:
        folder = Path(out_dir)
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RunFolderError(f"--out_dir {folder} is not writable ({e.strerror})") from None
    lock = lock_folder(folder)
    held = [name for name in RUN_FILES if (folder / name).exists()]
    if held and not resuming:
        if not overwrite:
            lock.close()
            raise RunFolderError(
                f"--out_dir {folder} already holds a run ({', '.join(held)}); continue it with --resume {folder}, "
                "choose another --out_dir, or replace it with --overwrite"
            )
        for name in OVERWRITTEN_FILES:
            (folder / name).unlink(missing_ok=True)
    return folder, lock


def new_default_folder() -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    Path("runs").mkdir(exist_ok=True)
    for n in range(1, 1000):
        folder = Path("runs") / (stamp if n == 1 else f"{stamp}-{n}")
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue
        except OSError as e:
            raise RunFolderError(f"cannot create a run folder under runs/ ({e.strerror}); give --out_dir") from None
    raise RunFolderError(f"too many runs started at {stamp}; give --out_dir")


def lock_folder(folder: Path):
    try:
        lock = open(folder / ".lock", "a+")
    except OSError as e:
        raise RunFolderError(f"--out_dir {folder} is not writable ({e.strerror})") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        owner = lock.read().strip() or "another process"
        lock.close()
        raise RunFolderError(
            f"--out_dir {folder} is in use by another run ({owner}); wait for it or choose another"
        ) from None
    lock.seek(0)
    lock.truncate()
    lock.write(f"pid {os.getpid()}")
    lock.flush()
    return lock


def load(run_dir: str | Path) -> dict:
    """The checkpoint in run_dir, checked to be one of this program's; RunFolderError otherwise."""
    path = Path(run_dir) / CHECKPOINT
    if not path.is_file():
        raise RunFolderError(f"--resume {run_dir}: no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # any unreadable file is the same mistake for the user
        raise RunFolderError(f"--resume {run_dir}: {path} is not a readable checkpoint ({type(e).__name__})") from None
    missing = [key for key in REQUIRED_KEYS if not isinstance(state, dict) or key not in state]
    if missing:
        raise RunFolderError(f"--resume {run_dir}: {path} is not a checkpoint of this program (no {missing[0]!r})")
    return state


def tensors(state: object):
    """Every tensor inside a nested dict/list state."""
    if isinstance(state, torch.Tensor):
        yield state
    elif isinstance(state, dict):
        for value in state.values():
            yield from tensors(value)
    elif isinstance(state, list | tuple):
        for value in state:
            yield from tensors(value)


def all_finite(state: dict) -> bool:
    floats = [t for t in tensors(state) if t.is_floating_point()]
    return all(bool(torch.isfinite(t).all()) for t in floats)


def save(path: Path, state: dict) -> None:
    """Write state to path atomically, only if its model and optimizer are finite and it fits on the disk."""
    if not all_finite({"model": state["model"], "optimizer": state["optimizer"]}):
        raise NotFiniteError("the weights or optimizer state are not finite")
    needed = SPACE_MARGIN * sum(t.numel() * t.element_size() for t in tensors(state))
    free = shutil.disk_usage(path.parent).free
    if needed > free:
        raise OSError(errno.ENOSPC, f"a checkpoint needs about {needed / 1e6:.1f} MB, {free / 1e6:.1f} MB free")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
