"""
Reproduce a recorded run in one command: rebuild its code, rerun its configuration, compare every evaluation.

    python main.py --reproduce runs/baseline                 # a run folder, or a ClearML offline session (.zip)
    python main.py --reproduce runs/baseline --max_steps 200  # only its first 200 steps: a quick check
    python main.py --reproduce 0123456789abcdef0123456789abcdef  # a task on the ClearML server

Design choices:
- The code is rebuilt in a temporary `git worktree` of the program's own repository, detached at the recorded
  commit, with the recorded patch applied and git hooks off. The user's working tree, index and HEAD are never
  touched, so a HEAD that moved on, a dirty tree, a commit never pushed and a repository without a remote all work.
  The worktree is removed afterwards, whatever happens.
- The run's final configuration is turned back into a command line from the parser's own actions, so each flag is
  written as the parser reads it (`--no-bias`, store_true flags, lists; unset flags left out). Where the run went is
  replaced: a new run folder (beside the original, named for it), the data file by its recorded absolute path, the
  cache folder made absolute. What only that invocation meant is left out (`--resume`, `--baseline`, `--queue`,
  and `--max_seconds`, which the recorded `max_steps` replaces). `--max_steps K` reruns the first K steps under the
  whole run's schedule: its warmup and its decay are kept.
- The rerun is a run of its own, with its own record and ClearML task, tagged `reproduction`, whose description
  names the original task. It runs from the worktree, in the place of the folder the run was started from.
- A stopped and resumed run is rerun as one run, with the code it started with and its last flags: where a
  resumed segment ran other code or flags, bit-identity is not expected.
- Every evaluation of the original up to the last rerun step is compared exactly: Loss/val, Loss/train, BPB and
  the sample. On another device, dtype, torch version or number of CPU threads, or on other data (`--new_data`),
  bit-identity is not expected: that is said before the rerun, and the verdict gives the largest relative
  difference instead. Exit 0 when identical (or not expected to be), EXIT_DIFFERS when it should have been and is
  not, the rerun's own code when it stops early.
- Refused in one line, exit 2, before anything runs: a record without what reproducing needs (an older run: what
  is missing is named), a commit this repository lacks (how to fetch it), a patch that does not match its recorded
  sha256 or does not apply, data that differs from its record (unless `--new_data`).
- A task id that is no path here is fetched from the ClearML server (tracking.task_as_session) as the files of an
  offline session, and read as one.
- Run folders and sessions are hostile input: their files are read with a size bound, never through a symlink,
  only inside the folder or zip given; the patch must match the sha256 recorded beside it.
- Ctrl+C or SIGTERM while the code is being rebuilt stops at once; during the rerun it is passed on to the rerun
  (in its own process group, so a terminal's Ctrl+C reaches it once), which stops as any run does.
"""

import argparse
import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import arms
import checkpoint as ckpt
import data
import devices
import provenance
import records
import tracking
from errors import UsageError

EXIT_DIFFERS = 7  # README "Exit codes"
EXIT_USAGE, EXIT_ABORTED = 2, 130
TAG = "reproduction"
COMPARED = ("Loss/val", "Loss/train", "BPB")
DROPPED = {"resume", "baseline", "queue", "max_seconds", "new_data", "overwrite", "eval_only", "eval_split",
           "reproduce", "world_size", "seeds", "sample", "num_samples"}  # fmt: skip
MAX_READ_BYTES = 256 << 20  # the most read of any one file of a run folder or session
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
SOURCE_DIR = Path(__file__).resolve().parent


class RecordError(UsageError):
    """A run that cannot be reproduced as recorded; the message is one line."""


@dataclass
class Recorded:
    """What a run recorded for reproducing it."""

    path: Path
    flags: dict  # the final configuration
    reproduce: dict  # the "reproduce" section the run started with (provenance.capture)
    patch: bytes
    task_id: str | None
    processes: object = 1  # the recorded world_size: the run's torchrun processes
    notes: list[str] = field(default_factory=list)  # resumed segments with other code or flags


def requested(argv: list[str]) -> bool:
    return any(arg == "--reproduce" or arg.startswith("--reproduce=") for arg in argv)


def options_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="main.py", allow_abbrev=False, description="Rerun a recorded run and compare every evaluation."
    )
    p.add_argument("--reproduce", required=True, metavar="RUN",
                   help="a run folder, an offline session (folder or .zip), or a task id on the server")  # fmt: skip
    p.add_argument("--max_steps", type=int, default=None, help="rerun only the first K steps (default: all)")
    p.add_argument("--new_data", action="store_true", help="go on where the data differs from the record")
    p.add_argument("--out_dir", default=None, help="the rerun's folder (default: beside RUN, RUN.reproduction)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), default=None, help="default: as recorded")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default=None,
                   help="default: as recorded, on the recorded device")  # fmt: skip
    p.add_argument("--offline", action="store_true", help="track the rerun in ClearML's offline mode")
    return p


def main(argv: list[str], parser: argparse.ArgumentParser) -> int:
    """`main.py --reproduce RUN ...`; `parser` is the training flags' parser, which the rerun's command line is for."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, stop_now)
    options = options_parser().parse_args(argv)
    try:
        return reproduce(options, parser)
    except UsageError as e:
        say(str(e))
        return EXIT_USAGE
    except KeyboardInterrupt:
        say("--reproduce interrupted; stopped before its verdict")
        return EXIT_ABORTED


def stop_now(signum, frame):
    raise KeyboardInterrupt


def reproduce(options: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UsageError("--reproduce starts its own rerun: run it with python main.py, not under torchrun")
    with recorded_at(options.reproduce) as path:
        return reproduce_from(path, options, parser)


@contextlib.contextmanager
def recorded_at(run: str) -> Iterator[Path]:
    """The path of RUN; for a ClearML task id that is no path here, the task fetched from the server as an offline
    session's folder, named for the task."""
    if Path(run).exists() or not re.fullmatch(r"[0-9a-f]{32}", run):
        yield Path(run)
        return
    with tempfile.TemporaryDirectory(prefix="gpt-reproduce-task-") as folder:
        (Path(folder) / run).mkdir()
        try:
            tracking.task_as_session(run, Path(folder) / run)
        except tracking.TaskError as e:
            raise RecordError(str(e)) from None
        yield Path(folder) / run


def reproduce_from(path: Path, options: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    recorded = read_recorded(path, parser)
    if str(recorded.processes) != "1":
        raise RecordError(f"{path} was trained by {recorded.processes} processes under torchrun; --reproduce reruns "
                          "runs of one process only")  # fmt: skip
    original = load_run(path)
    steps = rerun_steps(recorded, original, options.max_steps)
    reasons = [
        *recorded.notes,
        data_note(recorded.reproduce["data"], options.new_data),
        *machine_notes(recorded, options),
    ]
    reasons = [reason for reason in reasons if reason]
    out_dir = Path(options.out_dir or default_out_dir(path)).resolve()
    held = [name for name in ckpt.RUN_FILES if (out_dir / name).exists()]
    if held:
        raise RecordError(f"--out_dir {out_dir} already holds a run ({', '.join(held)}); choose another")
    flags = rerun_flags(recorded, steps, out_dir, options)
    code = recorded.reproduce["code"]
    say(f"reproducing {path}: commit {code['commit'][:12]} with its recorded changes ({len(recorded.patch):,} "
        f"bytes of patch), {steps} steps, into {out_dir}")  # fmt: skip
    if recorded.notes:
        say("note: the rerun is one run, with the code this run started with and its last flags from step 0")
    if reasons:
        say(f"note: bit-identity is not expected ({'; '.join(reasons)}): the verdict gives the largest difference")
    with rebuilt_code(repository(), code["commit"], recorded.patch, str(path)) as worktree:
        exit_code = rerun(worktree, code, command_line(parser, flags))
    try:
        rerun_run = records.load_run(out_dir)
    except records.RecordError:
        say(f"the rerun ended with exit code {exit_code} before its first evaluation: nothing to compare")
        return exit_code or EXIT_DIFFERS
    reasons += checked_rerun(recorded.reproduce, out_dir, data_checked=not options.new_data)
    text, identical = verdict(original, rerun_run, steps, reasons)
    print(text, flush=True)
    if exit_code:
        say(f"the rerun ended with exit code {exit_code} at step {int(rerun_run.steps.max(initial=0))}")
        return exit_code
    return 0 if identical or reasons else EXIT_DIFFERS


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -------------------------------------------------------------------------------------------------------------------
# reading what was recorded


def read_inside(folder: Path, name: str, limit: int = MAX_READ_BYTES) -> bytes:
    """The bytes of `name`, a '/'-separated path inside `folder`, read through no symlink and at most `limit`."""
    parts = name.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise RecordError(f"{folder}: {name!r} is not a path inside it")
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        for part in parts[:-1]:
            inner = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = inner
        inner = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=fd)
        os.close(fd)
        fd = inner
    except FileNotFoundError:
        raise RecordError(f"{folder / name} is missing") from None
    except OSError as e:  # a symlink (ELOOP, ENOTDIR) or an unreadable file
        raise RecordError(f"{folder / name} cannot be read ({e.strerror}; symlinks are not followed)") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise RecordError(f"{folder / name} is not a regular file")
        content = f.read(limit + 1)
    if len(content) > limit:
        raise RecordError(f"{folder / name} is larger than {limit >> 20} MB")
    return content


def json_object(content: bytes, where: object) -> dict:
    try:
        value = json.loads(content)
    except ValueError:
        raise RecordError(f"{where} is not JSON") from None
    if not isinstance(value, dict):
        raise RecordError(f"{where} does not hold a JSON object")
    return value


def read_recorded(path: Path, parser: argparse.ArgumentParser) -> Recorded:
    """What the run folder or the offline session at `path` recorded for reproducing it."""
    if path.is_dir() and (path / "run.json").is_file():
        recorded = read_run_folder(path)
    elif (path.is_dir() and (path / "task.json").is_file()) or (path.is_file() and path.suffix == ".zip"):
        recorded = read_session(path, parser)
    elif not path.exists():
        raise RecordError(f"--reproduce {path}: no such run folder or ClearML offline session")
    else:
        raise RecordError(f"--reproduce {path}: not a run folder (no run.json) nor a ClearML offline session")
    digest, expected = hashlib.sha256(recorded.patch).hexdigest(), recorded.reproduce["code"]["patch_sha256"]
    if digest != expected:
        raise RecordError(f"{path}: the patch of its uncommitted changes is not the one recorded (its sha256 is "
                          f"{digest[:12]}, the record says {expected[:12]}): it was changed after the run")  # fmt: skip
    return recorded


def read_run_folder(folder: Path) -> Recorded:
    """run.json, and metrics.jsonl's resumed segments: the flags as they last were, each segment's code."""
    header = json_object(read_inside(folder, "run.json"), folder / "run.json")
    text = read_inside(folder, "metrics.jsonl").decode("utf-8", errors="replace")
    segments = [{"step": 0, "flags": as_dict(header.get("flags")), "reproduce": header.get("reproduce")}]
    for event, _ in records.record_events(iter([text.encode().split(b"\n")]), str(folder / "metrics.jsonl")):
        if event.get("event") == "resumed":
            segments.append({"step": event.get("step"), "flags": as_dict(event.get("flags")),
                             "reproduce": event.get("reproduce")})  # fmt: skip
    reproduce = complete(segments[0]["reproduce"], folder / "run.json")
    patch = read_inside(folder, reproduce["code"]["patch"])
    task_id = as_dict(header.get("clearml")).get("task_id")
    flags = segments[-1]["flags"]
    return Recorded(folder, flags, reproduce, patch, task_id, flags.get("world_size", 1), segment_notes(segments))


def as_dict(value: object) -> dict:
    return dict(value) if isinstance(value, dict) else {}


def is_text(value: object) -> bool:
    return isinstance(value, str) and value != ""


def inside_path(value: object) -> bool:
    """A relative path that stays inside the folder it is relative to."""
    return is_text(value) and not Path(value).is_absolute() and ".." not in Path(value).parts


RECORD_CHECKS = {  # each part of the "reproduce" section (provenance.capture) that a rerun uses, and its check
    "code.commit": lambda v: isinstance(v, str) and re.fullmatch(r"[0-9a-f]{40}|[0-9a-f]{64}", v) is not None,
    "code.root": is_text,
    "code.program": inside_path,
    "code.cwd": is_text,
    "code.patch": lambda v: inside_path(v) and "/" not in v,
    "code.patch_sha256": is_text,
    "data.kind": lambda v: v in ("file", "tinystories"),
    "versions.torch": is_text,
    "device.device": lambda v: v in ("cpu", "cuda", "mps"),
    "device.dtype": lambda v: v in ("float32", "bfloat16", "float16"),
}
DATA_CHECKS = {
    "file": {"data.path": is_text, "data.sha256": is_text, "data.bytes": lambda v: type(v) is int},
    "tinystories": {
        "data.files": lambda v: isinstance(v, list) and all(isinstance(f, dict) and is_text(f.get("url")) for f in v)
    },
}


def complete(reproduce: object, where: Path) -> dict:
    """The "reproduce" section, checked to hold what reproducing needs, each part of its kind."""
    if not isinstance(reproduce, dict):
        raise RecordError(f"{where} holds no record of the run's code, data, versions and device (written before "
                          "--reproduce existed): rerun its flags with this version")  # fmt: skip
    problem = as_dict(reproduce.get("code")).get("problem") or as_dict(reproduce.get("data")).get("problem")
    if problem:
        raise RecordError(f"{where}: the run could not record what reproducing needs: {problem}")
    kind = as_dict(reproduce.get("data")).get("kind")
    checks = {**RECORD_CHECKS, **(DATA_CHECKS.get(kind, {}) if isinstance(kind, str) else {})}
    wrong = [name for name, check in checks.items() if not check(part(reproduce, name))]
    if wrong:
        raise RecordError(f"{where}: its record of the run lacks {', '.join(wrong)} (or holds something else)")
    return reproduce


def part(record: dict, name: str) -> object:
    section, key = name.split(".")
    return as_dict(record.get(section)).get(key)


def segment_notes(segments: list[dict]) -> list[str]:
    """What differed in each resumed segment from the one before: the rerun runs the first segment's code with the
    last one's flags, so bit-identity is not expected then."""
    notes, first = [], segments[0]
    ignored = (arms.SAME_TRAINING - {"seed"}) | DROPPED | {"offline", "max_steps"}
    for before, segment in zip(segments, segments[1:], strict=False):
        code, started = (as_dict(as_dict(one["reproduce"]).get("code")) for one in (segment, first))
        if (code.get("commit"), code.get("patch_sha256")) != (started.get("commit"), started.get("patch_sha256")):
            notes.append(f"resumed at step {segment['step']} with other code")
        changed = [f"--{name} {segment['flags'].get(name)} (was {before['flags'].get(name)})"
                   for name in sorted(set(before["flags"]) | set(segment["flags"]))
                   if name not in ignored and before["flags"].get(name) != segment["flags"].get(name)]  # fmt: skip
        if changed:
            notes.append(f"resumed at step {segment['step']} with {', '.join(changed)}")
    return notes


class SessionFiles:
    """The files of a ClearML offline session, in its folder or its .zip, read with a size bound."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.zip = zipfile.ZipFile(path) if path.is_file() else None
        except (OSError, zipfile.BadZipFile) as e:
            raise RecordError(f"{path} is not a readable ClearML offline session ({type(e).__name__})") from None

    def read(self, name: str) -> bytes:
        if self.zip is None:
            return read_inside(self.path, name)
        try:
            with self.zip.open(name) as f:
                content = f.read(MAX_READ_BYTES + 1)
        except KeyError:
            raise RecordError(f"{self.path} holds no {name}") from None
        except (OSError, zipfile.BadZipFile, ValueError) as e:  # ValueError: a bad compression or CRC
            raise RecordError(f"{self.path}: {name} cannot be read ({type(e).__name__})") from None
        if len(content) > MAX_READ_BYTES:
            raise RecordError(f"{self.path}: {name} is larger than {MAX_READ_BYTES >> 20} MB")
        return content

    def patch_names(self) -> list[str]:
        """The session's files of the artifact `code.patch` (data/<project>/<task>/artifacts/code.patch/<file>)."""
        if self.zip is not None:
            names = self.zip.namelist()
        else:
            names = [p.relative_to(self.path).as_posix() for p in walk(self.path / "data", depth=8)]
        return [name for name in names if name.split("/")[-3:-1] == ["artifacts", tracking.PATCH]]


def walk(folder: Path, depth: int) -> Iterator[Path]:
    """The files under `folder`, `depth` levels deep at most, through no symlink."""
    with contextlib.suppress(OSError), os.scandir(folder) as entries:
        for entry in entries:
            if entry.is_dir(follow_symlinks=False) and depth > 1:
                yield from walk(Path(entry.path), depth - 1)
            elif entry.is_file(follow_symlinks=False):
                yield Path(entry.path)


def read_session(path: Path, parser: argparse.ArgumentParser) -> Recorded:
    """task.json's Args (the flags as the task held them at the end) and its `reproduce` configuration; the patch
    artifact."""
    files = SessionFiles(path)
    task = json_object(files.read("task.json"), f"{path}: task.json")
    configuration = as_dict(as_dict(task.get("configuration")).get(tracking.REPRODUCE)).get("value")
    reproduce = complete(json_object(configuration.encode(), f"{path}: its reproduce configuration")
                         if isinstance(configuration, str) else None, path)  # fmt: skip
    names = files.patch_names()
    if len(names) != 1:
        raise RecordError(f"{path}: the session holds {len(names)} code.patch artifacts, not one")
    args = as_dict(as_dict(task.get("hyperparams")).get("Args"))
    flags = flags_from_args(parser, {k: v.get("value", "") for k, v in args.items() if isinstance(v, dict)})
    task_id = task.get("id") if isinstance(task.get("id"), str) else None
    processes = as_dict(args.get("world_size")).get("value") or 1
    return Recorded(path, flags, reproduce, files.read(names[0]), task_id, processes)


def flags_from_args(parser: argparse.ArgumentParser, args: dict[str, str]) -> dict:
    """ClearML's Args (text) as flag values: empty is unset, booleans and lists decoded, the rest kept as text for
    the command line."""
    flags = {}
    for action in parser._actions:
        text = args.get(action.dest)
        if not isinstance(text, str) or text == "":
            continue
        if action.nargs == 0 or isinstance(action, argparse.BooleanOptionalAction):
            flags[action.dest] = text == "True"
        elif action.nargs in ("*", "+"):
            try:
                flags[action.dest] = [str(item) for item in json.loads(text)]
            except (ValueError, TypeError):
                raise RecordError(f"Args/{action.dest} is not a list: {text[:80]!r}") from None
        else:
            flags[action.dest] = text
    return flags


def load_run(path: Path) -> records.Run:
    try:
        return records.load_run(path)
    except records.RecordError as e:
        raise RecordError(str(e)) from None


# -------------------------------------------------------------------------------------------------------------------
# what the rerun is


def rerun_steps(recorded: Recorded, original: records.Run, asked: int | None) -> int:
    """The step the rerun stops at: `asked`, or the original's last evaluation."""
    try:
        planned = int(recorded.flags["max_steps"])
    except (KeyError, ValueError, TypeError):
        raise RecordError(f"{recorded.path}: its flags hold no max_steps") from None
    if not len(original.steps):
        raise RecordError(f"{recorded.path} has no evaluation to compare with")
    steps = asked or int(original.steps.max())
    if not 1 <= steps <= planned:
        raise RecordError(f"--max_steps {steps}: the run was configured for {planned} steps; give 1 to {planned}")
    return steps


def rerun_flags(recorded: Recorded, steps: int, out_dir: Path, options: argparse.Namespace) -> dict:
    """The recorded final flags, with where the rerun goes and what it is in ClearML."""
    flags = {name: value for name, value in recorded.flags.items() if name not in DROPPED}
    planned = int(flags["max_steps"])
    if steps < planned:  # the first steps of the whole run: its schedule stays
        flags["lr_decay_steps"] = flags.get("lr_decay_steps") or planned
    flags["max_steps"] = steps
    identity = recorded.reproduce["data"]
    if identity["kind"] == "file":
        flags["data"] = identity["path"]
    cwd = Path(recorded.reproduce["code"]["cwd"])
    if flags.get("cache_dir"):
        flags["cache_dir"] = str(cwd / Path(str(flags["cache_dir"])).expanduser())
    flags.update(device_flags(recorded, options))
    origin = f"task {recorded.task_id}" if recorded.task_id else "a run"
    flags["comment"] = f"Reproduction of {origin} ({recorded.path.resolve()})" + (
        f": {flags['comment']}" if flags.get("comment") else ""
    )
    flags["task_name"] = f"reproduction of {flags.get('task_name') or recorded.path.name}"
    flags["tags"] = [*listed(flags.get("tags")), TAG]
    flags["out_dir"] = str(out_dir)
    flags["offline"] = flags.get("offline") or options.offline
    return flags


def device_flags(recorded: Recorded, options: argparse.Namespace) -> dict:
    """The device and dtype as recorded where this machine has that device (or as asked); `--compile` as recorded on
    the same device, else the device's default."""
    was = recorded.reproduce["device"]
    device = here_device(options.device, was["device"])
    same = device == was["device"]
    dtype = devices.pick_dtype(device, options.dtype or (was["dtype"] if same else "auto"))
    return {"device": device, "dtype": dtype, "compile": recorded.flags.get("compile") if same else None}


def here_device(asked: str | None, recorded: str) -> str:
    if asked:
        return devices.pick_device(asked)
    try:
        return devices.pick_device(recorded)
    except UsageError:  # this machine has no such device
        return devices.pick_device("auto")


def machine_notes(recorded: Recorded, options: argparse.Namespace) -> list[str]:
    """Why bit-identity is not expected on this machine: another device, dtype, torch or CPU threads."""
    flags = device_flags(recorded, options)
    was, now = recorded.reproduce["device"], provenance.machine(flags["device"], flags["dtype"])
    notes = [f"{what} {now.get(key)}, recorded {was.get(key)}" for key, what in
             (("device", "device"), ("name", "on"), ("dtype", "dtype"), ("threads", "CPU threads"))
             if was.get(key) != now.get(key)]  # fmt: skip
    torch_now, torch_then = provenance.versions()["torch"], recorded.reproduce["versions"].get("torch")
    if torch_now != torch_then:
        notes.append(f"torch {torch_now}, recorded {torch_then}")
    return notes


def data_note(identity: dict, new_data: bool) -> str | None:
    """None where the data is the recorded data; else what differs (refused, unless `new_data`)."""
    problem = data_difference(identity)
    if problem and not new_data:
        raise RecordError(f"{problem}; restore it, or give --new_data to reproduce on it anyway")
    return f"{problem} (--new_data)" if problem else None


def data_difference(identity: dict) -> str | None:
    if identity["kind"] == "file":
        path = Path(identity["path"])
        try:
            size, digest = path.stat().st_size, provenance.file_sha256(path)
        except OSError as e:
            return f"the run's data file {path} cannot be read ({e.strerror})"
        if (size, digest) != (identity["bytes"], identity["sha256"]):
            return (f"the data differs from the record: {path} has {size:,} bytes, sha256 {digest[:12]}; the run "
                    f"read {identity['bytes']:,} bytes, sha256 {identity['sha256'][:12]}")  # fmt: skip
        return None
    link = data.Link()
    for file in identity["files"]:
        try:
            remote = data.remote_file(link, file["url"])
        except data.DataError as e:
            raise RecordError(str(e)) from None
        if (remote["size"], remote["etag"]) != (file.get("size"), file.get("etag")):
            return (f"the data differs from the record: {file['url']} is {remote['size']:,} bytes, ETag "
                    f"{remote['etag']!r} on the server; the run read it at {file.get('size'):,} bytes, ETag "
                    f"{file.get('etag')!r}")  # fmt: skip
    return None


def default_out_dir(path: Path) -> Path:
    """Beside a run folder, named for it; for a session, under runs/."""
    base = path.parent if path.is_dir() and (path / "run.json").is_file() else Path("runs")
    name = f"{path.stem if path.suffix == '.zip' else path.name}.reproduction"
    for n in range(1, 1000):
        folder = base / (name if n == 1 else f"{name}-{n}")
        if not folder.exists():
            return folder
    raise RecordError(f"{base} holds 999 reproductions of {path.name} already; give --out_dir")


def listed(value: object) -> list:
    return list(value) if isinstance(value, list | tuple) else [] if value is None else [value]


def command_line(parser: argparse.ArgumentParser, flags: dict) -> list[str]:
    """The arguments that make `parser` give `flags`: each flag it knows whose value is set (None is left out)."""
    argv = []
    for action in parser._actions:
        value = flags.get(action.dest)
        if not action.option_strings or value is None:
            continue
        option = action.option_strings[0]
        if isinstance(action, argparse.BooleanOptionalAction):
            argv.append(option if value else f"--no-{option[2:]}")
        elif action.nargs == 0:  # store_true and its kin: the flag given means its constant
            argv += [option] if value == action.const else []
        elif action.nargs in ("*", "+"):
            argv += [option, *map(str, listed(value))] if value else []
        else:
            argv.append(f"{option}={value}")  # one word, whatever the value starts with
    return argv


# -------------------------------------------------------------------------------------------------------------------
# the rerun


def repository() -> Path:
    """The root of the git repository this program runs from."""
    try:
        return Path(provenance.git(SOURCE_DIR, "rev-parse", "--show-toplevel").decode().strip())
    except provenance.GitError:
        raise RecordError(f"{SOURCE_DIR} is not a git repository: run --reproduce from a clone of it") from None


@contextlib.contextmanager
def rebuilt_code(root: Path, commit: str, patch: bytes, where: str) -> Iterator[Path]:
    """A temporary worktree of the repository at `root`, at `commit` with `patch` applied; removed afterwards."""
    try:
        provenance.git(root, "cat-file", "-e", f"{commit}^{{commit}}")
    except provenance.GitError:
        remotes = provenance.git(root, "remote").decode().split()
        fetch = (f"fetch it with: git fetch {remotes[0]} {commit}" if remotes else
                 "this repository has no remote: run --reproduce from the clone the run was made in")  # fmt: skip
        raise RecordError(f"commit {commit[:12]} of {where} is not in this repository ({root}); {fetch}") from None
    folder = Path(tempfile.mkdtemp(prefix="gpt-reproduce-"))
    worktree = folder / "code"
    try:
        provenance.git(root, "-c", "core.hooksPath=/dev/null", "worktree", "add", "--detach", "--quiet",
                       str(worktree), commit)  # fmt: skip
        if patch:
            try:
                provenance.git(worktree, "apply", "--binary", "--whitespace=nowarn", "-", stdin=patch)
            except provenance.GitError as e:
                raise RecordError(f"the changes recorded in {where} do not apply to {commit[:12]}: {e}") from None
        yield worktree
    finally:
        with contextlib.suppress(provenance.GitError):
            provenance.git(root, "worktree", "remove", "--force", str(worktree))
        shutil.rmtree(folder, ignore_errors=True)


def rerun(worktree: Path, code: dict, argv: list[str]) -> int:
    """Run the rebuilt program with `argv`, from the place in the worktree of the folder the run started from;
    a stop signal is passed on to it."""
    cwd, root = Path(code["cwd"]), Path(code["root"])
    inside = worktree / cwd.relative_to(root) if cwd.is_relative_to(root) else None
    place = inside if inside and inside.is_dir() else cwd if cwd.is_dir() else worktree
    child = subprocess.Popen([sys.executable, str(worktree / code["program"]), *argv], cwd=place, process_group=0)
    for signum in STOP_SIGNALS:
        signal.signal(signum, lambda signum, frame: child.send_signal(signum))
    try:
        return child.wait()
    finally:
        for signum in STOP_SIGNALS:
            signal.signal(signum, stop_now)


def checked_rerun(reproduce: dict, out_dir: Path, data_checked: bool) -> list[str]:
    """What the rerun's own record shows: a warning where the code it rebuilt records another commit or patch than
    the run's; and, returned as a reason for differences, other data read (a TinyStories cache that has grown)."""
    try:
        rerun_record = as_dict(json_object(read_inside(out_dir, "run.json"), out_dir / "run.json").get("reproduce"))
    except RecordError:
        return []
    code, was = as_dict(rerun_record.get("code")), reproduce["code"]
    if (code.get("commit"), code.get("patch_sha256")) != (was["commit"], was["patch_sha256"]):
        say("warning: the rebuilt code records another commit or patch than the run's: it is not the code that ran")
    if data_checked and rerun_record.get("data") != reproduce["data"]:
        return [
            f"the rerun read other data: {describe(rerun_record.get('data'))}, the run {describe(reproduce['data'])}"
        ]
    return []


def describe(identity: dict | None) -> str:
    if not identity:
        return "nothing recorded"
    if identity.get("kind") == "file":
        return f"{identity.get('path')} ({identity.get('bytes')} bytes, sha256 {str(identity.get('sha256'))[:12]})"
    return ", ".join(f"{f.get('bytes')} bytes of {str(f.get('url')).rsplit('/', 1)[-1]}" for f in identity["files"])


# -------------------------------------------------------------------------------------------------------------------
# the verdict


def verdict(original: records.Run, rerun_run: records.Run, steps: int, reasons: list[str]) -> tuple[str, bool]:
    """One line: identical at every evaluation of the original up to `steps`, or where it first differs; where
    bit-identity is not expected (`reasons`), the largest relative difference."""
    at = {int(step): i for i, step in enumerate(rerun_run.steps)}
    evaluations = [(int(step), i) for i, step in enumerate(original.steps) if step <= steps]
    first, largest, identical = None, None, 0
    for step, i in evaluations:
        differences = evaluation_differences(original, i, rerun_run, at.get(step))
        identical += not differences
        first = first or (differences and (step, differences[0][1]))
        for relative, text in differences:
            if relative is not None and (largest is None or relative > largest[0]):
                largest = (relative, step, text)
    n = len(evaluations)
    if not first:
        return f"reproduced exactly: {n} of {n} evaluations identical ({', '.join(COMPARED)}, samples)", True
    if reasons and largest:
        _, step, text = largest
        return (f"not identical, as expected ({'; '.join(reasons)}): largest relative difference at step {step}: "
                f"{text}; {identical} of {n} evaluations identical"), False  # fmt: skip
    step, text = first
    expected = f" (as expected: {'; '.join(reasons)})" if reasons else ""
    return f"differs from step {step}: {text}; {identical} of {n} evaluations identical{expected}", False


def evaluation_differences(original: records.Run, i: int, rerun_run: records.Run, j: int | None) -> list[tuple]:
    """(relative difference, text) of each value of the evaluation that differs; None for the sample's."""
    if j is None:
        return [(None, "the rerun has no evaluation at this step")]
    found = []
    for name in COMPARED:
        new, old = float(rerun_run.evals[name][j]), float(original.evals[name][i])
        if new == old or (math.isnan(new) and math.isnan(old)):
            continue
        relative = abs(new - old) / abs(old) if old else math.inf
        new_text, old_text = distinct(new, old)
        found.append((relative, f"{name} {new_text} against {old_text} ({percent(new, old)})"))
    new_sample, old_sample = rerun_run.samples(j), original.samples(i)
    if new_sample != old_sample:
        found.append((None, f"the sample {shorten(new_sample)} against {shorten(old_sample)}"))
    return found


def distinct(a: float, b: float) -> tuple[str, str]:
    """Both numbers with 4 decimals, or as many more as it takes to tell them apart."""
    for digits in range(4, 18):
        if f"{a:.{digits}f}" != f"{b:.{digits}f}":
            return f"{a:.{digits}f}", f"{b:.{digits}f}"
    return repr(a), repr(b)


def percent(new: float, old: float) -> str:
    if not old or not math.isfinite(new - old):
        return "not comparable"
    change = 100 * (new - old) / abs(old)
    return f"{change:+.2f} %" if abs(change) >= 0.005 else f"{change:+.1e} %"


def shorten(text: str, width: int = 40) -> str:
    return json.dumps(text if len(text) <= width else text[: width - 1] + "…", ensure_ascii=False)
