"""
How a run ends: what Ctrl+C and SIGTERM do, and the outcome (status, exit code, one line) with its exit code.

Design choices:
- Signals by phase. While preparing, evaluating or sampling (`interruptible`), the first Ctrl+C or SIGTERM raises
  KeyboardInterrupt at once, so a long preparation or evaluation ends within seconds. During a training step it
  asks the loop to stop after the step, which then saves the checkpoint. A second Ctrl+C raises QuitNow: the
  checkpoint is skipped but the task is still closed. A third exits at once. While the task is being closed, a
  signal only says how many more it takes.
- The outcome is decided here, from what happened: the loop reports events (diverged, stopped, an exception) and
  these functions turn each into a status for ClearML and the record, an exit code (README "Exit codes") and the
  one line printed last. Failures from outside (out of memory, disk full, I/O) and bugs leave the traceback in the
  run folder's error.log.
"""

import contextlib
import errno
import os
import signal
import sys
import traceback
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import torch

import distributed

EXIT_DONE = 0
EXIT_DIVERGED = 1
EXIT_USAGE = 2
EXIT_OUT_OF_MEMORY = 3
EXIT_IO = 4
EXIT_BUG = 5
EXIT_PEER_LOST = 6  # under torchrun: another process of the run stopped
EXIT_STOPPED = 130


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class QuitNow(BaseException):
    """A second Ctrl+C: leave at once, keeping what is already on disk."""


class StopFlag:
    """What SIGINT and SIGTERM do, by phase (see the module docstring)."""

    def __init__(self):
        self.requested, self.count, self.interruptible, self.closing = False, 0, True, False
        self.reason: str | None = None  # why the run was asked to stop, when not by a signal

    def __call__(self, signum, frame):
        self.count += 1
        name = signal.Signals(signum).name
        if self.count >= 3:
            os._exit(EXIT_STOPPED)
        if self.closing:
            say(f"\n{name}: closing the ClearML task first (Ctrl+C {3 - self.count} more to quit without it)")
            return
        if self.requested:
            if signum == signal.SIGINT:
                raise QuitNow
            return
        self.requested = True
        if self.interruptible:
            raise KeyboardInterrupt
        say(
            f"\n{name}: stopping after this step; the checkpoint is saved and the task closed "
            "(Ctrl+C again: skip the checkpoint; a third time: quit at once)"
        )

    def request(self, reason: str) -> None:
        """Stop as Ctrl+C would, after this step, for `reason` (early abort against a baseline)."""
        self.requested, self.reason = True, reason

    @contextlib.contextmanager
    def allowing_interrupts(self):
        """A block that a signal ends at once; one that came just before the block ends it before it starts."""
        if self.requested and self.reason is None:
            raise KeyboardInterrupt
        self.interruptible = True
        try:
            yield
        finally:
            self.interruptible = False

    def install(self) -> None:
        signal.signal(signal.SIGINT, self)
        signal.signal(signal.SIGTERM, self)


@dataclass(frozen=True)
class Outcome:
    status: str  # "completed", "aborted" or "failed", as ClearML and the run record say it
    exit_code: int
    message: str = ""  # the one line printed last (and the task's status message)

    @property
    def line(self) -> str:
        return self.message.splitlines()[0] if self.message else ""


def completed() -> Outcome:
    return Outcome("completed", EXIT_DONE)


def stopped(step: int, kept: str, reason: str | None = None, saved: Path | None = None) -> Outcome:
    """Stopped by a signal or by the early abort; `saved`, the checkpoint written at this step, if any."""
    message = f"{reason or f'interrupted at step {step}'}; {kept}"
    if saved is not None:
        message += f"\n  continue with: python main.py --resume {saved.parent}"
    return Outcome("aborted", EXIT_STOPPED, message)


def quit_at_once(step: int, kept: str) -> Outcome:
    return Outcome("aborted", EXIT_STOPPED, f"quit at once at step {step}; {kept}")


def diverged(step: int, loss: float, best: float, kept: str) -> Outcome:
    message = f"training diverged at step {step}: loss {loss:.4g} (best {best:.4g}); {kept}"
    return Outcome("failed", EXIT_DIVERGED, message)


def not_finite(step: int, kept: str) -> Outcome:
    message = f"training diverged by step {step}: the weights are no longer finite; {kept}"
    return Outcome("failed", EXIT_DIVERGED, message)


def failure(error: Exception, step: int, kept: str, folder: Path | None) -> Outcome:
    """A failure from outside (or a bug), with its exit code; the traceback goes to the run folder's error.log."""
    log = folder / "error.log" if folder else None
    if log is not None:
        with contextlib.suppress(OSError), open(log, "a") as f:
            f.write(f"{datetime.now():%Y-%m-%d %H:%M:%S} step {step}\n{traceback.format_exc()}\n")
    details = f"details: {log}" if log else "no run folder for the details"
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    if distributed.peer_lost(error):
        return Outcome("failed", EXIT_PEER_LOST, f"another process of this run stopped at step {step}; {kept}")
    if isinstance(error, MemoryError | torch.OutOfMemoryError) or "can't allocate memory" in text:
        message = f"out of memory at step {step}; {kept}; try a smaller --batch_size ({details})"
        return Outcome("failed", EXIT_OUT_OF_MEMORY, message)
    if isinstance(error, OSError):
        what = "the disk is full" if error.errno == errno.ENOSPC else f"I/O error ({error.strerror or text})"
        return Outcome("failed", EXIT_IO, f"{what} at step {step}; {kept}, whole ({details})")
    message = f"unexpected error at step {step}: {type(error).__name__}: {text}; {kept} (traceback: {log})"
    return Outcome("failed", EXIT_BUG, message)
