"""
Reading runs: a run folder (run.json + metrics.jsonl, as tracking.RunRecord writes them) or a ClearML offline
session (its folder or its .zip) becomes one Run. Every file read here is hostile input: runs are passed around.

Design choices:
- Only inside the run given: a file is opened one path component at a time below the run's folder with O_NOFOLLOW,
  so a symlinked run.json, metrics.jsonl or debug sample, or a sample key holding `..`, is refused, never followed.
  Only regular files are read (a FIFO or a device could block or never end). A folder of runs does not follow a
  symlink to a run elsewhere either; a path named on the command line is the user's own and is followed.
- Bounded: run.json and task.json up to MAX_HEADER_BYTES, metrics.jsonl up to MAX_METRICS_BYTES, a sample or a
  tokenizer up to MAX_SMALL_BYTES, measured before reading (a zip member by what it unpacks to, and a zip's central
  directory before Python parses it). Metrics are read in chunks and keep only their numbers and samples, so memory
  stays near the size of the samples, whatever the file claims. A run over a bound is left out with a warning.
- Checked: each field has the type its writer gives it, or the run is left out with one line naming the field
  (RecordError); an evaluation with a malformed value (a string, a list, a bool, a number beyond float range) is
  skipped, one warning per file. NaN and infinite losses are kept as a diverged run recorded them; curves skip them.
- Fast: an evaluation's sample, its last field and most of its bytes, is cut off before parsing and decoded only
  where shown; the rest of a chunk is parsed in one json.loads call; the garbage collector is paused while reading.
  Together about twice as fast as json.loads line by line (bench/bench_compare.py).
- Both the current record and its extension are read: run.json's "run_id", "started", "model": {"parameters",
  "flops_per_token"}, and "tokens_per_s" in evaluations; what a run did not record is None or NaN.
"""

import gc
import itertools
import json
import lzma
import math
import os
import stat
import sys
import tempfile
import unicodedata
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from operator import itemgetter
from pathlib import Path

import numpy as np

from errors import UsageError
from tokenizer import Tokenizer

MAX_HEADER_BYTES = 16 * 2**20  # task.json holds the uncommitted diff, which can be large
MAX_METRICS_BYTES = 256 * 2**20  # a run of 100,000 evaluations with 100-token samples writes about 65 MB
MAX_SMALL_BYTES = 8 * 2**20  # one sample; a tokenizer of 65,536 tokens is about 2 MB
MAX_ZIP_DIRECTORY = 16 * 2**20  # about 150,000 members; Python holds each as an object of a few hundred bytes
CHUNK_BYTES = 4 * 2**20
MAX_STEP = 2**53  # steps are exact integers in float64
MAX_INT = 2**63  # a recorded count (parameters, FLOPs, vocabulary) beyond this is not one
SAMPLE_FIELD = b', "sample": '  # tracking.RunRecord writes an evaluation's sample as its last field
RECORD_FIELDS = {"step": "step", "tokens": "tokens", "elapsed": "elapsed", "lr": "lr", "Loss/train": "loss_train",
                 "Loss/val": "loss_val", "BPB": "bpb", "tokens/s": "tokens_per_s"}  # fmt: skip
SESSION_SCALARS = {("Loss", "train"): "Loss/train", ("Loss", "val"): "Loss/val", ("BPB", "val"): "BPB",
                   ("Learning rate", "lr"): "lr", ("Throughput", "tokens/s"): "tokens/s"}  # fmt: skip
SAMPLE_TITLE = "Generated Sample"
# what reading a file or a corrupt zip member can raise: an OS error, a truncated stream, an unsupported or encrypted
# member, a broken deflate, lzma or bzip2 stream
READ_ERRORS = (OSError, EOFError, ValueError, NotImplementedError, RuntimeError, zlib.error, lzma.LZMAError,
               zipfile.BadZipFile)  # fmt: skip
HEADER_SCHEMA = {
    "hypothesis": str, "flags": dict, "dataset": str, "started": str, "run_id": str,
    "tokenizer": {"fingerprint": str, "vocab_size": int}, "git": {"commit": str, "dirty": bool},
    "clearml": {"task_id": str, "offline_session": str, "web_page": str},
    "model": {"parameters": int, "flops_per_token": int},
}  # fmt: skip
TASK_SCHEMA = {"id": str, "comment": str, "tags": list, "offline_output_models": list, "hyperparams": dict,
               "script": {"version_num": str, "diff": str}}  # fmt: skip


class RecordError(UsageError):
    """A path that holds no readable run; the message is one line for the user."""


def terminal_text(text: str) -> str:
    """Text from a record made safe for a terminal: whitespace runs become one space; control characters (escape
    sequences), format characters and lone surrogates become U+FFFD."""
    text = " ".join(str(text).split())
    return "".join("\ufffd" if unicodedata.category(c) in ("Cc", "Cf", "Cs", "Co") else c for c in text)


def warn(message: str) -> None:
    print(f"warning: {terminal_text(message)}", file=sys.stderr, flush=True)


@dataclass
class Run:
    path: Path
    name: str
    hypothesis: str = ""
    status: str = "unknown"
    message: str = ""
    flags: dict = field(default_factory=dict)  # values as text, the same way for run folders and ClearML sessions
    dataset: str | None = None
    tokenizer: str | None = None  # fingerprint
    vocab_size: int | None = None
    commit: str | None = None
    dirty: bool | None = None
    task_id: str | None = None
    web_page: str | None = None  # the task's page on a ClearML server
    offline: bool = False  # tracked in a ClearML offline session
    started: float | None = None  # seconds since the epoch
    run_id: str | None = None
    parameters: int | None = None
    flops_per_token: int | None = None  # training FLOPs per token
    wall_time: float = 0.0
    evals: dict = field(default_factory=dict)  # "step" and the other RECORD_FIELDS keys -> arrays, by step
    samples: Callable[[int], str] = lambda i: ""  # the sample of evaluation i, read only when shown

    @property
    def steps(self) -> np.ndarray:
        return self.evals.get("step", np.zeros(0, dtype=np.int64))

    @property
    def tokens_per_s(self) -> float | None:
        values = self.evals.get("tokens/s", np.zeros(0))
        values = values[np.isfinite(values)]
        return float(values.mean()) if len(values) else None

    def curve(self, metric: str) -> tuple[np.ndarray, np.ndarray]:
        """Steps and values of one curve, without the evaluations that did not record it."""
        values = self.evals[metric]
        keep = np.isfinite(values)
        return self.steps[keep].astype(np.float64), values[keep]

    def comparable_loss(self, other: "Run") -> bool:
        """Loss per token compares only under the same tokenizer; unknown fingerprints fall back on data and size."""
        if self.tokenizer and other.tokenizer:
            return self.tokenizer == other.tokenizer
        return (self.dataset, self.vocab_size) == (other.dataset, other.vocab_size)


# -------------------------------------------------------------------------------------------------------------------
# files, read safely


class Folder:
    """The files below one folder, never following a symlink below it."""

    def __init__(self, path: Path):
        self.path = path

    def open(self, name: str, limit: int):
        """The regular file `name` ("a/b/c") as a binary file; None when absent; RecordError when it is a symlink,
        not a regular file, or over `limit` bytes."""
        parts = name.split("/")
        if any(part in ("", ".", "..") or "\0" in part for part in parts):
            raise RecordError(f"{self.path}: refused to read {name!r}, which points outside the run")
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as e:
            raise RecordError(f"{self.path} is not readable ({e.strerror})") from None
        try:
            for part in parts[:-1]:
                below = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
                os.close(fd)
                fd = below
            file_fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=fd)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise RecordError(
                f"{self.path / name} is a symbolic link or not readable ({e.strerror}); not followed"
            ) from None
        finally:
            os.close(fd)
        return checked_file(os.fdopen(file_fd, "rb"), os.fstat(file_fd), self.path / name, limit)

    def names_below(self, folder: str, limit: int = 1000) -> list[str]:
        """Names of the real (not symlinked) folders in `folder`, at most `limit` of them."""
        if (self.path / folder).is_symlink():
            return []
        try:
            with os.scandir(self.path / folder) as entries:
                return [e.name for _, e in zip(range(limit), entries, strict=False) if e.is_dir(follow_symlinks=False)]
        except OSError:
            return []


def checked_file(f, st: os.stat_result, where: Path, limit: int):
    if not stat.S_ISREG(st.st_mode):
        f.close()
        raise RecordError(f"{where} is not a regular file; not read")
    if st.st_size > limit:
        f.close()
        raise RecordError(f"{where} is {st.st_size / 2**20:.0f} MiB, more than the {limit // 2**20} MiB read")
    return f


class Zip:
    """The members of a zip, measured by what they unpack to before they are read."""

    def __init__(self, path: Path):
        self.path = path
        with open(path, "rb") as f:
            if central_directory_bytes(f) > MAX_ZIP_DIRECTORY:
                raise RecordError(f"{path} lists more members than a ClearML offline session holds; not read")
        self.zip = zipfile.ZipFile(path)

    def open(self, name: str, limit: int):
        try:
            info = self.zip.getinfo(name)
        except KeyError:
            return None
        if info.file_size > limit:
            raise RecordError(
                f"{self.path}: {name} unpacks to {info.file_size / 2**20:.0f} MiB, more than the "
                f"{limit // 2**20} MiB read"
            )
        return self.zip.open(info)

    def names(self) -> list[str]:
        return self.zip.namelist()


def central_directory_bytes(f) -> int:
    """The size of a zip's central directory, from its end record (zip64 too), before zipfile parses it."""
    f.seek(0, os.SEEK_END)
    size = f.tell()
    f.seek(max(0, size - (22 + 65535 + 20)))  # the end record, its longest comment, and a zip64 locator
    tail = f.read()
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or len(tail) < at + 16:
        raise RecordError(f"{getattr(f, 'name', 'the file')} is not a zip file")
    directory = int.from_bytes(tail[at + 12 : at + 16], "little")
    if directory == 0xFFFFFFFF and at >= 20 and tail[at - 20 : at - 16] == b"PK\x06\x07":  # zip64
        f.seek(int.from_bytes(tail[at - 12 : at - 4], "little"))
        record = f.read(56)
        directory = int.from_bytes(record[40:48], "little") if record[:4] == b"PK\x06\x06" else directory
    return directory


def read_bounded(source, name: str, limit: int) -> bytes | None:
    try:
        f = source.open(name, limit)
        if f is None:
            return None
        with f:
            payload = f.read(limit + 1)
    except READ_ERRORS as e:
        raise RecordError(f"{source.path}: {name} is not readable ({type(e).__name__})") from None
    if len(payload) > limit:
        raise RecordError(f"{source.path}: {name} is more than the {limit // 2**20} MiB read")
    return payload


def line_chunks(source, name: str, limit: int) -> Iterator[list[bytes]]:
    """The lines of a file, as many as a chunk read holds at a time; RecordError once more than `limit` bytes come."""
    try:
        f = source.open(name, limit)
    except READ_ERRORS as e:
        raise RecordError(f"{source.path}: {name} is not readable ({type(e).__name__})") from None
    if f is None:
        return
    with f:
        pending, total = [], 0  # the pieces of a line that has not ended yet
        while chunk := read_chunk(f, source, name):
            total += len(chunk)
            if total > limit:
                raise RecordError(f"{source.path}: {name} is more than the {limit // 2**20} MiB read")
            lines = chunk.split(b"\n")
            if len(lines) == 1:
                pending.append(chunk)
                continue
            lines[0] = b"".join([*pending, lines[0]])
            pending = [lines.pop()]
            yield lines
        if tail := b"".join(pending):
            yield [tail]


def read_lines(source, name: str, limit: int) -> Iterator[bytes]:
    for lines in line_chunks(source, name, limit):
        yield from lines


def read_chunk(f, source, name: str) -> bytes:
    try:
        return f.read(CHUNK_BYTES)
    except READ_ERRORS as e:
        raise RecordError(f"{source.path}: {name} is not readable ({type(e).__name__})") from None


def parse_json(payload: bytes):
    """A JSON value, or ValueError; deep nesting (RecursionError) counts as malformed too."""
    try:
        return json.loads(payload)
    except RecursionError:
        raise ValueError("nested too deeply") from None


# -------------------------------------------------------------------------------------------------------------------
# checking what was read


def checked(value, schema, where: str):
    """`value` if it has the type `schema` names (a type, or a dict of key -> schema for an object, whose absent or
    null keys are None); RecordError naming the field otherwise. Keys the schema does not name are dropped."""
    if isinstance(schema, dict):
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise RecordError(f"{where} is {json_type(value)}, not an object")
        return {key: checked(value.get(key), inner, f"{where}.{key}") for key, inner in schema.items()}
    if value is None or (type(value) is int and abs(value) <= MAX_INT if schema is int else isinstance(value, schema)):
        return value
    raise RecordError(f"{where} is {json_type(value)}, not {json_type(schema())}")


def json_type(value) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "true or false", int: "an integer",
             float: "a number", type(None): "null"}  # fmt: skip
    return names.get(type(value), type(value).__name__)


def flag_texts(flags: dict, where: str) -> dict[str, str]:
    """Flags as text, the way ClearML writes hyperparameters, so both sources compare equal."""
    texts = {}
    for name, value in flags.items():
        if isinstance(value, list) and all(is_scalar(v) for v in value):
            texts[name] = str(value)
        elif is_scalar(value):
            texts[name] = "" if value is None else value if isinstance(value, str) else str(value)
        else:
            raise RecordError(f"{where} flag {name!r} is {json_type(value)}, not a value")
    return texts


def is_scalar(value) -> bool:
    return value is None or isinstance(value, str | int | float | bool)


def number_table(rows: list[dict], fields: dict, where: str) -> tuple[np.ndarray, list[int]]:
    """The rows' fields as float64 columns, and the indices of the rows kept. A row whose step is not an integer in
    [0, MAX_STEP], or any of whose fields is not a number (null and absent are NaN), is left out with a warning."""
    present = [i for i, key in enumerate(fields.values()) if rows and key in rows[0]]
    try:  # C-level passes when every row is well formed, which is what a writer of this program gives
        values = list(map(itemgetter(*(list(fields.values())[i] for i in present)), rows)) if present else []
        types = set(map(type, itertools.chain.from_iterable(values)))
        if present[:1] == [0] and types <= {int, float, type(None)} and set(map(type, (v[0] for v in values))) <= {int}:
            table = np.full((len(rows), len(fields)), np.nan)
            table[:, present] = np.array(values, dtype=np.float64).reshape(len(rows), len(present))
            if np.all((table[:, 0] >= 0) & (table[:, 0] <= MAX_STEP)):
                return table, list(range(len(rows)))
    except (KeyError, OverflowError, TypeError):
        pass
    kept, table = [], []
    for i, row in enumerate(rows):
        numbers = [row.get(key) for key in fields.values()]
        step = numbers[0]
        if type(step) is int and 0 <= step <= MAX_STEP and all(is_number(v) for v in numbers[1:]):
            kept.append(i)
            table.append([math.nan if v is None else float(v) for v in numbers])
    if len(kept) < len(rows):
        warn(f"{where}: {len(rows) - len(kept)} evaluations with malformed values skipped")
    return np.array(table, dtype=np.float64).reshape(len(kept), len(fields)), kept


def is_number(value) -> bool:
    if value is None or type(value) is float:
        return True
    return type(value) is int and abs(value) < 2**1000  # float() of a larger int overflows


def evals_by_step(table: np.ndarray, fields: dict) -> tuple[dict, np.ndarray]:
    """Columns of arrays sorted by step, and which row each came from; a step evaluated twice (resumed from an older
    checkpoint) keeps the last."""
    steps = table[:, 0].astype(np.int64)
    _, last = np.unique(steps[::-1], return_index=True)
    order = len(steps) - 1 - last  # indices of the last occurrence of each step, in step order
    columns = {name: table[order, i] for i, name in enumerate(fields)}
    columns["step"] = steps[order]
    return columns, order


def timestamp(text: str | None) -> float | None:
    try:
        return datetime.fromisoformat(text).timestamp() if text else None
    except (ValueError, OverflowError, OSError):
        return None


# -------------------------------------------------------------------------------------------------------------------
# run folders


def load_record(folder: Path) -> Run:
    """A run folder written by tracking.RunRecord."""
    files = Folder(folder)
    payload = read_bounded(files, "run.json", MAX_HEADER_BYTES)
    if payload is None:
        raise RecordError(f"{folder} has metrics.jsonl but no run.json")
    try:
        header = parse_json(payload)
        if not isinstance(header, dict):
            raise RecordError(f"run.json is {json_type(header)}, not an object")
        header = checked(header, HEADER_SCHEMA, "run.json")
    except ValueError as e:
        raise RecordError(f"{folder / 'run.json'} is not JSON ({e})") from None
    except RecordError as e:
        raise RecordError(f"{folder}: {e}") from None
    run = Run(
        path=folder,
        name=folder.name or str(folder),
        hypothesis=header["hypothesis"] or "",
        dataset=header["dataset"],
        tokenizer=header["tokenizer"]["fingerprint"],
        vocab_size=header["tokenizer"]["vocab_size"],
        commit=header["git"]["commit"],
        dirty=header["git"]["dirty"],
        started=timestamp(header["started"]),
        run_id=header["run_id"],
        parameters=header["model"]["parameters"],
        flops_per_token=header["model"]["flops_per_token"],
    )
    flags, clearml = header["flags"] or {}, header["clearml"]
    where = str(folder / "metrics.jsonl")
    events = record_events(line_chunks(files, "metrics.jsonl", MAX_METRICS_BYTES), where)
    kinds = [e.get("event") for e, _ in events]
    for (event, _), kind in zip(events, kinds, strict=True):
        if kind == "status" and isinstance(event.get("status"), str):
            run.status, run.message = event["status"], event.get("message") or ""
            run.message = run.message if isinstance(run.message, str) else ""
        elif kind == "resumed":  # the flags as used from here on
            flags = event["flags"] if isinstance(event.get("flags"), dict) else flags
            clearml = checked(event.get("clearml"), HEADER_SCHEMA["clearml"], f"{where} resumed.clearml")
            run.status, run.message = "running", ""
        if kind != "eval" and is_number(elapsed := event.get("elapsed")) and elapsed is not None:
            run.wall_time = max(run.wall_time, float(elapsed)) if math.isfinite(elapsed) else run.wall_time
    evals = [pair for pair, kind in zip(events, kinds, strict=True) if kind == "eval"]
    run.flags = flag_texts(flags, f"{folder}:")
    run.task_id, run.web_page, run.offline = clearml["task_id"], clearml["web_page"], bool(clearml["offline_session"])
    table, kept = number_table([e for e, _ in evals], RECORD_FIELDS, where)
    run.evals, order = evals_by_step(table, RECORD_FIELDS)
    elapsed = run.evals["elapsed"][np.isfinite(run.evals["elapsed"])]
    run.wall_time = max(run.wall_time, float(elapsed.max()) if len(elapsed) else 0.0)
    shown = [evals[kept[i]][1] for i in order]
    run.samples = lambda i: decode_sample(shown[i])
    return run


def record_events(chunks: Iterator[list[bytes]], where: str) -> list[tuple[dict, bytes | None]]:
    """The events of metrics.jsonl, each with its sample's JSON text (None without one), parsed a chunk of lines
    at a time. A torn last line (a kill mid-write) is skipped; a broken line before it is warned about."""
    events, previous = [], None
    for lines in chunks:
        if previous is not None:
            events += parse_batch(previous, where, last=False)
        previous = lines
    if previous:
        if SAMPLE_FIELD in previous[-1] and not previous[-1].rstrip().endswith(b'"}'):
            previous.pop()  # torn in the middle of its sample by a kill
        events += parse_batch(previous, where, last=True)
    return events


def parse_batch(lines: list[bytes], where: str, last: bool) -> list[tuple[dict, bytes | None]]:
    lines = [line for line in lines if line and not line.isspace()]
    cuts = [line.find(SAMPLE_FIELD) for line in lines]  # cannot match inside a JSON string, where quotes are escaped
    heads = [line if cut < 0 else line[:cut] + b"}" for line, cut in zip(lines, cuts, strict=True)]
    literals = [None if cut < 0 else line[cut + len(SAMPLE_FIELD) : -1] for line, cut in zip(lines, cuts, strict=True)]
    try:
        events = parse_json(b"[" + b",".join(heads) + b"]")
    except ValueError:  # a torn or broken line: parse line by line to find it
        events = [None] * len(heads)
        for i, head in enumerate(heads):
            try:
                events[i] = parse_json(head)
            except ValueError:
                if not last or i < len(heads) - 1:
                    warn(f"{where}: a line is not JSON; skipped")
    return [(e, literal) for e, literal in zip(events, literals, strict=True) if isinstance(e, dict)]


def decode_sample(literal: bytes | str | None) -> str:
    """The sample from its JSON text."""
    try:
        sample = parse_json(literal) if literal else ""
    except ValueError:
        return ""
    return sample if isinstance(sample, str) else ""


# -------------------------------------------------------------------------------------------------------------------
# ClearML offline sessions


def load_session(path: Path) -> Run:
    """A ClearML offline session: task.json for the task, metrics.jsonl for scalars and debug samples."""
    try:
        files = Zip(path) if path.is_file() else Folder(path)
        task = parse_json(read_bounded(files, "task.json", MAX_HEADER_BYTES) or b"null")
    except READ_ERRORS as e:
        raise RecordError(f"{path} is not a readable ClearML offline session ({type(e).__name__})") from None
    if not isinstance(task, dict):
        raise RecordError(f"{path} is not a ClearML offline session (no task.json)")
    try:
        task = checked(task, TASK_SCHEMA, "task.json")
        flags = session_flags(task["hyperparams"] or {})
    except RecordError as e:
        raise RecordError(f"{path}: {e}") from None
    tags = [t for t in task["tags"] or [] if isinstance(t, str)]
    status = next((s for s in ("failed", "aborted") if s in tags), None)
    commit = task["script"]["version_num"]
    run = Run(
        path=path,
        name=path.stem if path.suffix == ".zip" else path.name,
        hypothesis=task["comment"] or "",
        status=status or ("completed" if task["offline_output_models"] else "unknown"),
        flags=flags,
        dataset=tags[0] if tags else None,
        tokenizer=session_tokenizer(files),
        vocab_size=flag_int(flags, "vocab_size"),
        commit=commit or None,
        dirty=bool((task["script"]["diff"] or "").strip()) if commit else None,
        task_id=task["id"],
        offline=True,
    )
    read_session_metrics(run, files)
    return run


def flag_int(flags: dict[str, str], name: str) -> int | None:
    """A flag's value as a whole number, if it is one (at most 9 digits)."""
    text = flags.get(name, "")
    return int(text) if text.isascii() and text.isdigit() and len(text) <= 9 else None


def session_flags(hyperparams: dict) -> dict[str, str]:
    args = checked(hyperparams.get("Args"), dict, "task.json hyperparams.Args") or {}
    flags = {}
    for name, entry in args.items():
        value = checked(entry, {"value": str}, f"task.json hyperparams.Args.{name}")["value"]
        flags[name] = value or ""
    return flags


def read_session_metrics(run: Run, files) -> None:
    """Scalars by step, each evaluation's time from its Loss/val timestamp, and where each sample is."""
    where = f"{run.path}/metrics.jsonl"
    scalars: dict[str, dict[int, float]] = {name: {} for name in SESSION_SCALARS.values()}
    keys, table_plot, times, malformed = {}, None, {}, 0
    for line in read_lines(files, "metrics.jsonl", MAX_METRICS_BYTES):
        try:
            batch = parse_json(line) if line.strip() else []
        except ValueError:
            batch = []
        for e in batch if isinstance(batch, list) else []:
            if not isinstance(e, dict) or type(e.get("iter")) is not int or not 0 <= e["iter"] <= MAX_STEP:
                malformed += 1
                continue
            step, moment = e["iter"], e.get("timestamp")
            if is_number(moment) and moment is not None and math.isfinite(moment):
                times[step] = min(times.get(step, moment), moment)
            metric, variant = (e.get(k) if isinstance(e.get(k), str) else None for k in ("metric", "variant"))
            name = SESSION_SCALARS.get((metric, variant))
            if e.get("type") == "training_stats_scalar" and name:
                if is_number(e.get("value")):
                    scalars[name][step] = math.nan if e["value"] is None else float(e["value"])
                else:
                    malformed += 1
            elif metric == SAMPLE_TITLE and e.get("type") == "training_debug_image":
                keys[step] = e.get("key")
            elif metric == SAMPLE_TITLE and e.get("type") == "plot" and isinstance(e.get("plot_str"), str):
                table_plot = e["plot_str"]  # the last table holds every sample so far
    if malformed:
        warn(f"{where}: {malformed} events with malformed values skipped")
    session_evals(run, scalars, times, keys, table_samples(table_plot), files)


def session_evals(run: Run, scalars: dict, times: dict, keys: dict, texts: dict, files) -> None:
    val = scalars["Loss/val"]
    first = min(times.values(), default=math.nan)
    run.started = first / 1000 if math.isfinite(first) else None
    run.wall_time = (max(times.values()) - first) / 1000 if times else 0.0
    tokens_per_step = math.prod(flag_int(run.flags, k) or 0 for k in ("batch_size", "grad_accum", "block_size"))
    lrs = scalars["lr"]
    rows = [[s, s * tokens_per_step, (times.get(s, first) - first) / 1000, lrs.get(s, lrs.get(s + 1, math.nan)),
             scalars["Loss/train"].get(s, math.nan), v, scalars["BPB"].get(s, math.nan), math.nan]
            for s, v in val.items()]  # fmt: skip
    table = np.array(rows, dtype=np.float64).reshape(len(rows), len(RECORD_FIELDS))
    run.evals, _ = evals_by_step(table, RECORD_FIELDS)
    throughput = list(scalars["tokens/s"].values())
    if throughput:  # reported between evaluations: the run's mean, as a run folder's evaluations give it
        run.evals["tokens/s"] = np.full(len(run.steps), float(np.nanmean(throughput)))
    steps = [int(s) for s in run.steps]
    run.samples = lambda i: texts.get(steps[i]) or debug_sample(files, keys.get(steps[i]))


def debug_sample(files, key) -> str:
    if not isinstance(key, str) or not key:
        return ""
    try:
        payload = read_bounded(files, f"data/{key}", MAX_SMALL_BYTES)
    except RecordError as e:
        warn(str(e))
        return ""
    return (payload or b"").decode("utf-8", errors="replace")


def session_tokenizer(files) -> str | None:
    """The fingerprint of the tokenizer artifact, when the run got far enough to upload it."""
    if isinstance(files, Zip):
        names = [
            n for n in files.names() if n.startswith("data/") and n.endswith("/artifacts/tokenizer/tokenizer.json")
        ]
    else:
        names = [f"data/{project}/artifacts/tokenizer/tokenizer.json" for project in files.names_below("data")]
    for name in names:
        try:
            payload = read_bounded(files, name, MAX_SMALL_BYTES)
        except RecordError:
            continue
        if payload is not None:
            return tokenizer_fingerprint(payload)
    return None


def tokenizer_fingerprint(payload: bytes) -> str | None:
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "tokenizer.json").write_bytes(payload)
        try:
            return Tokenizer.load(Path(tmp) / "tokenizer.json").fingerprint
        except Exception:  # an unreadable artifact only means the fingerprint is unknown
            return None


def table_samples(plot_str: str | None) -> dict[int, str]:
    """Samples from a `Generated Sample` table plot: the column headed step, and the last column's text."""
    try:
        table = parse_json(plot_str)["data"][0]
        headers = [str(h).lower() for h in table["header"]["values"]]
        columns = table["cells"]["values"]
        step_column = columns[next(i for i, h in enumerate(headers) if "step" in h)]
        return {int(s): str(t) for s, t in zip(step_column, columns[-1], strict=False)}
    except (ValueError, KeyError, IndexError, TypeError, StopIteration, OverflowError, RecursionError):
        return {}


# -------------------------------------------------------------------------------------------------------------------
# finding runs


def is_session(path: Path) -> bool:
    if path.is_dir():
        return (path / "task.json").is_file()
    return path.suffix == ".zip" and path.is_file()


def is_record(path: Path) -> bool:
    """run.json, or a record whose header is missing; an offline session also has metrics.jsonl, beside task.json."""
    return (
        path.is_dir() and not is_session(path) and ((path / "run.json").exists() or (path / "metrics.jsonl").exists())
    )


def load_run(path: Path) -> Run:
    """A run folder or an offline session (folder or .zip); RecordError when `path` is neither."""
    if is_record(path):
        return load_record(path)
    if is_session(path):
        return load_session(path)
    if not path.exists():
        raise RecordError(f"{path} does not exist")
    if (path / "ckpt.pt").is_file():
        raise RecordError(f"{path} holds a checkpoint but no run record (run.json, metrics.jsonl)")
    raise RecordError(f"{path} is not a run folder or a ClearML offline session")


def run_paths(folder: Path, depth: int = 2) -> list[Path]:
    """The runs in a folder, and in the folders it holds (a group of seeds) down to `depth`; a symlink is left out."""
    try:
        children = sorted(folder.iterdir())
    except OSError as e:
        warn(f"{folder} is not readable ({e.strerror})")
        return []
    sessions = {c.name for c in children if not c.is_symlink() and c.is_dir()}
    found = []
    for child in children:
        if child.is_symlink():
            warn(f"{child} is a symbolic link; not followed")
        elif is_record(child) or (is_session(child) and not (child.suffix == ".zip" and child.stem in sessions)):
            found.append(child)  # an offline cache holds each session twice, as a folder and as its .zip
        elif depth > 1 and child.is_dir():
            found += run_paths(child, depth - 1)
    return found


def read_runs(paths: list[Path]) -> list[Run]:
    """Each path is a run, or a folder of runs read in the order they started; what cannot be read is warned about
    and left out, as is a run named twice. The garbage collector is paused: reading makes many short-lived dicts,
    and collecting them while they are made only costs time (15-20 % of reading 20 long runs)."""
    runs, seen = [], set()
    gc.disable()
    try:
        for path in paths:
            group = [path] if is_record(path) or is_session(path) or not path.is_dir() else run_paths(path)
            if not group:
                warn(f"{path} holds no run folder or ClearML offline session")
            loaded = []
            for candidate in group:
                try:
                    loaded.append(load_run(candidate))
                except RecordError as e:
                    warn(str(e))
            if group != [path]:
                loaded.sort(key=lambda r: (r.started is None, r.started or 0.0, str(r.path)))
            for run in loaded:
                if (key := run.path.resolve()) not in seen:
                    seen.add(key)
                    runs.append(run)
    finally:
        gc.enable()
    return runs
