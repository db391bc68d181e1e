"""Files written whole or not at all: an interrupt at any line of the program's code that writes a file leaves the
old file or the new one and no temporary file. (Lines of the standard library are left alone: an interrupt there
can leave its own locks held, as between tempfile's lock acquire and its try.)"""

import sys
from collections.abc import Callable
from pathlib import Path

import pytest

import data

ROOT = Path(data.__file__).resolve().parent


def interrupted_at(line: int, action: Callable[[], None]) -> bool:
    """Run `action`, raising KeyboardInterrupt at the `line`-th line it executes in the program's own modules; True
    if it ended before that many lines ran."""
    executed = 0

    def trace(frame, event, arg):
        nonlocal executed
        if Path(frame.f_code.co_filename).parent != ROOT:
            return None
        if event == "line":
            executed += 1
            if executed == line:
                raise KeyboardInterrupt
        return trace

    sys.settrace(trace)
    try:
        action()
    except KeyboardInterrupt:
        return False
    finally:
        sys.settrace(None)
    return True


@pytest.mark.timeout(60)
def test_an_interrupt_anywhere_in_a_write_leaves_the_old_file_or_the_new_one_and_nothing_else(tmp_path: Path):
    target = tmp_path / "meta.json"
    for line in range(1, 10_000):
        target.write_bytes(b"old")
        finished = interrupted_at(line, lambda: data.write_atomic(target, b"new"))
        assert [p.name for p in tmp_path.iterdir()] == ["meta.json"], f"interrupted at line {line}"
        assert target.read_bytes() in (b"old", b"new")
        if finished:
            assert target.read_bytes() == b"new" and line > 3  # the interrupt came at every line the write runs
            return
    raise AssertionError("the write never finished")
