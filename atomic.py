"""
Files written whole or not at all: the new content goes to a temporary file beside the target, is fsynced, and is
renamed over the target, so a reader finds the old file or the new one, never half of one.

Design choices:
- The temporary file's name is chosen before the file exists, and the file is created inside the `try` that
  removes it, so an interrupt landing anywhere (Ctrl+C raises between any two bytecodes) leaves no temporary file
  behind. `tempfile.mkstemp` could not give that: it creates the file before its caller knows the name.
- The name is `<target>.<random>.tmp`, created exclusively (never an existing file or a symbolic link), in the
  target's folder, so the rename stays on one file system; the token cache removes leftovers of a killed process.
- One function with the writing passed in, not a context manager: a generator-based one could be interrupted
  between creating the file and entering the block, where its cleanup would not run.
"""

import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def replace(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Replace `path` with what `write(file)` writes, or leave it as it was."""
    temporary = path.with_name(f"{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        with open(temporary, "xb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:  # Ctrl+C included
        temporary.unlink(missing_ok=True)
        raise
