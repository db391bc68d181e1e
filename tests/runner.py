"""Helpers for tests that run main.py as a user would, in its own git repository, and read ClearML offline sessions."""

import atexit
import contextlib
import functools
import importlib.util
import io
import itertools
import json
import os
import py_compile
import queue
import re
import shutil
import subprocess
import tempfile
import threading
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

from zygote import ZYGOTE

ROOT = Path(__file__).resolve().parents[1]
# TinyStories samples kept in the repository; see tests/data/SOURCES.md.
TEST_DATA = ROOT / "tests" / "data"
TRAIN_SAMPLE = TEST_DATA / "tinystories-train-sample.txt"
VALID_SAMPLE = TEST_DATA / "tinystories-valid-sample.txt"
SERVED_TRAIN, SERVED_VALID = "TinyStories-train.txt", "TinyStories-valid.txt"  # names on a test TinyStories server
PROJECT_FILES = [
    f"{name}.py" for name in tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["py-modules"]
]
TINY_MODEL = [
    "--device", "cpu", "--n_layer", "2", "--n_head", "2", "--n_embd", "64", "--block_size", "64",
    "--batch_size", "16", "--vocab_size", "512", "--sample_tokens", "20",
]  # fmt: skip
# A quick run on stories.txt (see make_stories_project): evaluations every 10 steps, short samples.
QUICK = [*TINY_MODEL, "--data", "stories.txt", "--eval_iters", "2", "--eval_interval", "10", "--sample_tokens", "5"]


STARTED: list[subprocess.Popen] = []  # every program a test started with Project.start


@dataclass
class Project:
    """A copy of the program in its own git repository (no remote), with its own HOME and cache."""

    path: Path
    home: Path
    cache: Path

    def env(self, **extra: str) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CLEARML_", "TRAINS_"))}
        env.update(HOME=str(self.home), GPT_FROM_SCRATCH_CACHE=str(self.cache), PYTHONUNBUFFERED="1", **extra)
        return env

    def run(self, *args: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
        """python main.py ARGS in the project, to its end (subprocess.run's capture_output and timeout)."""
        with self.start(*args, **env) as process:
            try:
                stdout, stderr = process.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
                raise
        return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)

    def refused(self, *args: str, **env: str) -> subprocess.CompletedProcess:
        """main.main(args) in this process, in the project's folder and environment, for a run that is refused
        before it trains: the same code path as the command line at a tenth of a new process's cost. It runs the
        checkout's modules, not the project's copies, so a test that changes the copies starts a process instead."""
        import main

        saved_env, saved_cwd, out, err = dict(os.environ), os.getcwd(), io.StringIO(), io.StringIO()
        try:
            os.environ.clear()
            os.environ.update(self.env(**env))
            os.chdir(self.path)
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                try:
                    code = main.main(list(args))
                except SystemExit as e:
                    code = e.code
        finally:
            os.chdir(saved_cwd)
            os.environ.clear()
            os.environ.update(saved_env)
        return subprocess.CompletedProcess(["main.py", *args], code, out.getvalue(), err.getvalue())

    def start(self, *args: str, **env: str) -> subprocess.Popen:
        """python main.py ARGS in the project, with pipes for its output (forked from a zygote, see zygote.py)."""
        process = ZYGOTE.popen(
            ["main.py", *args], cwd=self.path, env=self.env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        STARTED.append(process)  # ended after the test if it is still running (see conftest.py)
        return process

    def sessions(self) -> list["OfflineSession"]:
        """ClearML offline sessions written under this HOME, oldest first."""
        folders = (self.home / ".clearml" / "cache" / "offline").glob("*/")
        return [OfflineSession(f) for f in sorted(folders, key=lambda f: f.stat().st_mtime) if f.is_dir()]


@dataclass
class OfflineSession:
    folder: Path

    @property
    def task(self) -> dict:
        return json.loads((self.folder / "task.json").read_text())

    def events(self) -> list[dict]:
        lines = (self.folder / "metrics.jsonl").read_text().splitlines()
        return [event for line in lines if line.strip() for event in json.loads(line)]

    def scalars(self, title: str, series: str) -> dict[int, float]:
        return {
            e["iter"]: e["value"]
            for e in self.events()
            if e["type"] == "training_stats_scalar" and e["metric"] == title and e["variant"] == series
        }

    def debug_samples(self, title: str) -> list[dict]:
        return [e for e in self.events() if e["type"] == "training_debug_image" and e["metric"] == title]

    def console(self) -> str:
        lines = (self.folder / "log.jsonl").read_text().splitlines()
        return "\n".join(event["msg"] for line in lines if line.strip() for event in json.loads(line))


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


@functools.cache
def compiled_modules() -> Path:
    """The program's modules compiled once per test process, as bytecode checked against the source's hash, so it
    holds in every copy (a copy a test edits is compiled again, as Python does). Where the environment says not to
    write bytecode (PYTHONDONTWRITEBYTECODE), every run of a new copy would compile 7,000 lines twice: importing
    them, and reading their imports for the run record: half a second."""
    folder = Path(tempfile.mkdtemp(prefix="gpt-from-scratch-bytecode-")) / "__pycache__"
    atexit.register(shutil.rmtree, folder.parent, ignore_errors=True)
    for name in PROJECT_FILES:
        cached = folder / Path(importlib.util.cache_from_source(name)).name
        py_compile.compile(
            ROOT / name, cached, doraise=True, invalidation_mode=py_compile.PycInvalidationMode.CHECKED_HASH
        )
    return folder


def make_project(tmp_path: Path) -> Project:
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in PROJECT_FILES:
        shutil.copy(ROOT / name, repo / name)
    git(repo, "init", "-q")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@example.com", "add", ".")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-qm", "baseline")
    shutil.copytree(compiled_modules(), repo / "__pycache__")  # what a checkout that has run before holds
    home = tmp_path / "home"
    home.mkdir()
    return Project(repo, home, tmp_path / "cache")


def wait_for_line(stream, needle: str, timeout: float) -> str:
    """Read lines from a pipe until one contains `needle`; returns everything read.

    The pipe is read in a thread that stops after that line, so the timeout holds however the program stalls."""
    lines: queue.Queue = queue.Queue()

    def matches(line: str) -> bool:
        return needle in line

    def read() -> None:
        for line in iter(stream.readline, ""):
            lines.put(line)
            if matches(line):
                return
        lines.put(None)  # the end of the pipe: the program closed it or ended

    threading.Thread(target=read, daemon=True).start()
    seen, deadline = [], time.monotonic() + timeout
    while True:
        try:
            line = lines.get(timeout=max(deadline - time.monotonic(), 0))
        except queue.Empty:
            break
        if line is None:
            break
        seen.append(line)
        if matches(line):
            return "".join(seen)
    raise AssertionError(f"{needle!r} not seen within {timeout} s; got:\n{''.join(seen)}")


def wait_for_record(folder: Path, event: dict, timeout: float) -> None:
    """Wait until the run's metrics.jsonl holds an event with these fields (the record is written as it happens)."""
    deadline, path = time.monotonic() + timeout, folder / "metrics.jsonl"
    while time.monotonic() < deadline:
        if path.is_file():
            for line in path.read_text().splitlines():
                with contextlib.suppress(ValueError):
                    if event.items() <= json.loads(line).items():
                        return
        time.sleep(0.02)  # a file has no event to wait on: look again shortly
    raise AssertionError(f"no event {event} in {path} within {timeout} s")


def make_stories_project(tmp_path: Path, n_bytes: int = 400_000) -> Project:
    """make_project, with the first n_bytes of the train sample as stories.txt."""
    project = make_project(tmp_path)
    (project.path / "stories.txt").write_bytes(TRAIN_SAMPLE.read_bytes()[:n_bytes])
    return project


def table_row(table: str, name: str) -> list[str]:
    """The cells of a row of the table's first block, its wrapped lines joined; the dashes under the header give
    where each column starts."""
    lines = table.split("\n\n")[0].splitlines()
    dashes = next(line for line in lines if re.fullmatch(r"-+(  -+)*", line))
    spans = [m.span() for m in re.finditer(r"-+", dashes)]
    [at] = [i for i, line in enumerate(lines) if line.startswith(name + "  ")]
    below = itertools.takewhile(lambda line: line.startswith(" " * spans[0][1]) and line.strip(), lines[at + 1 :])
    rows = [lines[at], *below]
    starts = [start for start, _ in spans[1:]] + [None]
    cells = [[row[starts[c] : starts[c + 1]].strip() for row in rows] for c in range(len(spans) - 1)]
    return [" ".join(part for part in parts if part) for parts in cells]
