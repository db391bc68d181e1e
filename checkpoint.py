"""
The run folder and its checkpoint: one run per folder, and nothing a run wrote is ever lost.

Design choices:
- A run folder belongs to one run. A new run refuses a folder that already holds one (the user resumes it with
  --resume, or replaces it with an explicit --overwrite), and an exclusive `flock` held for the whole run refuses a
  second process on the same folder, so two runs never interleave their checkpoints. `--overwrite` removes the old
  run only when the new one is about to train (`RunFolder.replace_old_run`): a run refused before that leaves the
  folder as it was.
- The default folder, runs/<date-time>, is created exclusively: two runs started in the same second get two folders.
- The run's own files are never symbolic links: one that is (.lock, an old record) is refused, not followed.
- A checkpoint holds tensors and plain values only and is loaded with `weights_only=True`, so a file from anyone
  cannot run code. It records the id of the run it belongs to and a checksum of its whole contents (BLAKE2b over
  every tensor's bytes and every value), so a corrupted file or another run's checkpoint copied into the folder
  is refused before anything is written.
- A checkpoint is written to a temporary file in the same folder, fsynced and renamed: a kill at any moment leaves
  the previous checkpoint whole. Only finite weights and optimizer state are written, so the last checkpoint on
  disk always resumes; one that would not fit on the disk is refused before a byte is written.
"""

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import pickle
import shutil
import zipfile
from datetime import datetime
from pathlib import Path

import torch

import atomic
from errors import UsageError

CHECKPOINT = "ckpt.pt"
FORMAT = 2
PROGRAM = "gpt-from-scratch"
RUN_FILES = (CHECKPOINT, "run.json", "metrics.jsonl")  # any of these means the folder holds a run
OLD_RUN_FILES = (*RUN_FILES, "tokenizer.json", "error.log", "code.patch")  # what --overwrite removes
REQUIRED_KEYS = ("run_id", "checksum", "args", "model_config", "tokenizer", "model", "optimizer", "step", "rng")
SPACE_MARGIN = 1.1  # torch.save's own framing on top of the tensors' bytes


class RunFolderError(UsageError):
    """A run folder or checkpoint that cannot be used as asked; the message is one line for the user."""


class NotFiniteError(Exception):
    """The weights or optimizer state hold NaN or infinity: such a checkpoint is never written."""


# -------------------------------------------------------------------------------------------------------------------
# the run folder


class RunFolder:
    """A run folder, locked for this process while the object lives (the lock goes with the process)."""

    def __init__(self, path: Path, lock, old_run: list[str]):
        self.path, self.lock, self.old_run = path, lock, old_run

    @classmethod
    def claim(cls, out_dir: str | None, resuming: bool, overwrite: bool) -> "RunFolder":
        """Create or reuse the run folder and lock it; a folder holding a run needs `resuming` or `overwrite`."""
        folder = new_default_folder() if out_dir is None else Path(out_dir)
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RunFolderError(f"--out_dir {folder} is not writable ({e.strerror})") from None
        lock = lock_folder(folder)
        held = [name for name in RUN_FILES if os.path.lexists(folder / name)]
        if held and not resuming and not overwrite:
            lock.close()
            raise RunFolderError(
                f"--out_dir {folder} already holds a run ({', '.join(held)}); continue it with --resume {folder}, "
                "choose another --out_dir, or replace it with --overwrite"
            )
        return cls(folder, lock, held if overwrite and not resuming else [])

    def replace_old_run(self) -> None:
        """With --overwrite, remove the old run's files: called once the new run is about to train."""
        if self.old_run:
            for name in OLD_RUN_FILES:
                with contextlib.suppress(FileNotFoundError):
                    (self.path / name).unlink()
            self.old_run = []

    def release(self) -> None:
        self.lock.close()


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


def open_own_file(path: Path, mode: str = "a+"):
    """Open a file of the run folder, refusing a symbolic link (it could point anywhere)."""
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | (os.O_APPEND if mode.startswith("a") else 0)
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise RunFolderError(f"{path} is a symbolic link; a run folder's files must be its own") from None
        raise RunFolderError(f"{path} cannot be written ({e.strerror})") from None
    return os.fdopen(fd, mode)


def lock_folder(folder: Path):
    lock = open_own_file(folder / ".lock", "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        owner = lock.read(100).strip() or "another process"
        lock.close()
        raise RunFolderError(
            f"--out_dir {folder} is in use by another run ({owner}); wait for it or choose another"
        ) from None
    lock.seek(0)
    lock.truncate()
    lock.write(f"pid {os.getpid()}")
    lock.flush()
    return lock


# -------------------------------------------------------------------------------------------------------------------
# the checkpoint


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


def on_cpu(state: object) -> object:
    """The state with every tensor copied to the CPU (once, for both the checksum and the file)."""
    if isinstance(state, torch.Tensor):
        return state.detach().cpu()
    if isinstance(state, dict):
        return {key: on_cpu(value) for key, value in state.items()}
    if isinstance(state, list | tuple):
        return type(state)(on_cpu(value) for value in state)
    return state


def feed(digest, value: object) -> None:
    """Hash a nested state canonically: dict keys in a fixed order, tensors by dtype, shape and bytes."""
    if isinstance(value, torch.Tensor):
        flat = value.detach().cpu().contiguous().reshape(-1)
        digest.update(f"T{value.dtype}{tuple(value.shape)}".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    elif isinstance(value, dict):
        digest.update(f"D{len(value)}".encode())
        for key in sorted(value, key=repr):
            feed(digest, key)
            feed(digest, value[key])
    elif isinstance(value, list | tuple):
        digest.update(f"L{len(value)}".encode())
        for item in value:
            feed(digest, item)
    else:
        digest.update(f"V{type(value).__name__}:{value!r}".encode())


def checksum(state: dict) -> str:
    digest = hashlib.blake2b(digest_size=16)
    feed(digest, {key: value for key, value in state.items() if key != "checksum"})
    return digest.hexdigest()


def all_finite(state: dict) -> bool:
    floats = [t for t in tensors(state) if t.is_floating_point()]
    return all(bool(torch.isfinite(t).all()) for t in floats)


def save(path: Path, state: dict) -> None:
    """Write state to path atomically, with its checksum, only if its model and optimizer are finite and it fits
    on the disk."""
    if not all_finite({"model": state["model"], "optimizer": state["optimizer"]}):
        raise NotFiniteError("the weights or optimizer state are not finite")
    state = on_cpu({**state, "format": FORMAT, "program": PROGRAM})
    state["checksum"] = checksum(state)
    needed = SPACE_MARGIN * sum(t.numel() * t.element_size() for t in tensors(state))
    free = shutil.disk_usage(path.parent).free
    if needed > free:
        raise OSError(errno.ENOSPC, f"a checkpoint needs about {needed / 1e6:.1f} MB, {free / 1e6:.1f} MB free")
    atomic.replace(path, lambda f: torch.save(state, f))


def load(run_dir: str | Path) -> dict:
    """The checkpoint in run_dir, checked to be this program's, whole, and the folder's own; RunFolderError
    otherwise. Nothing in the file can run code."""
    path = Path(run_dir) / CHECKPOINT
    if path.is_symlink() or not path.is_file():
        raise RunFolderError(f"--resume {run_dir}: no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        if not zipfile.is_zipfile(path):  # not torch.save's format at all
            raise RunFolderError(f"--resume {run_dir}: {path} is not a readable checkpoint (UnpicklingError)") from None
        raise RunFolderError(
            f"--resume {run_dir}: {path} holds objects other than tensors and plain values, so it was not loaded "
            "(it is not a checkpoint of this program, and loading it could run code)"
        ) from None
    except Exception as e:  # any unreadable file is the same mistake for the user
        raise RunFolderError(f"--resume {run_dir}: {path} is not a readable checkpoint ({type(e).__name__})") from None
    check_contents(run_dir, path, state)
    return state


def check_contents(run_dir: str | Path, path: Path, state: object) -> None:
    """A checkpoint of this program's format, whose checksum holds, belonging to the run recorded beside it."""
    if not isinstance(state, dict) or state.get("program") != PROGRAM:
        raise RunFolderError(f"--resume {run_dir}: {path} is not a checkpoint of this program")
    if state.get("format") != FORMAT:
        raise RunFolderError(
            f"--resume {run_dir}: {path} was written by another version of this program (format "
            f"{state.get('format')!r}, this one reads {FORMAT}); resume it with that version"
        )
    missing = [key for key in REQUIRED_KEYS if key not in state]
    if missing:
        raise RunFolderError(f"--resume {run_dir}: {path} is not a whole checkpoint (no {missing[0]!r})")
    if checksum(state) != state["checksum"]:
        raise RunFolderError(f"--resume {run_dir}: {path} fails its checksum: the file is corrupted")
    recorded = recorded_run_id(Path(run_dir))
    if recorded is not None and recorded != state["run_id"]:
        raise RunFolderError(
            f"--resume {run_dir}: {path} belongs to another run (run id {state['run_id']}, the folder's record "
            f"says {recorded}); copy the whole run folder, not its checkpoint"
        )


def recorded_run_id(folder: Path) -> str | None:
    """The run id in the folder's run.json, if it has a readable one."""
    record = folder / "run.json"
    if record.is_symlink() or not record.is_file():
        return None
    try:
        with open(record, encoding="utf-8") as f:
            header = json.loads(f.read(1 << 20))
    except (OSError, ValueError):
        return None
    return header.get("run_id") if isinstance(header, dict) and isinstance(header.get("run_id"), str) else None


class Checkpoints:
    """The run's checkpoints as the loop writes them: every process calls `save` (the RNGs are gathered), the main
    process alone writes; `kept()` says what is on disk, for the line that ends a run."""

    def __init__(self, folder: Path | None, header: dict, saved_step: int | None):
        self.folder, self.header, self.saved_step = folder, header, saved_step
        self.interval = header["args"]["checkpoint_interval"]

    @property
    def path(self) -> Path | None:
        return self.folder / CHECKPOINT if self.folder else None

    def due(self, step: int) -> bool:
        return step % self.interval == 0 and step not in (0, self.saved_step)

    def save(self, state) -> None:
        """Write `state` (a TrainState) with the run's header; NotFiniteError keeps the previous checkpoint."""
        contents = {**self.header, **state.state_dict()}
        if self.folder is not None:
            save(self.folder / CHECKPOINT, contents)
        self.saved_step = state.step

    def kept(self, step: int) -> str:
        if self.saved_step is None:
            first = (step // self.interval + 1) * self.interval
            return f"no checkpoint was written yet (the first is due at step {first})"
        if self.saved_step == step and self.folder is not None:
            return f"checkpoint saved to {self.path}"
        where = self.folder if self.folder is not None else "the main process's run folder"  # another rank
        return f"the checkpoint of step {self.saved_step} is kept in {where}"
