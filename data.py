"""
Data: a local .txt file or TinyStories over HTTP, tokenized once into a cache on disk, and batches from it.

Design choices:
- Token files are flat uint16 arrays, memory-mapped, so memory stays flat whatever the dataset size; text is read
  and tokenized in chunks of a few MB.
- Stories end at `<|endoftext|>`, and the tokenizer never lets a word cross it, so text cut right after it
  tokenizes the same in pieces as in one go: a download cut anywhere resumes with exactly the same tokens.
- TinyStories is streamed with `requests`: only what the run needs is fetched and tokenized, and a later run that
  needs more continues with an HTTP Range request where the cache stops. Errors and overloaded servers (429, 5xx)
  are retried by urllib3 with back-off; read timeouts are not, since a body stalled mid-file is resumed anyway.
- A cut or stalled connection is resumed by Range where it stopped: pieces are read as they arrive (`read1`), so a
  cut loses no byte received. The resume budget counts tries in a row that brought no byte, so a dead link fails
  within a few read timeouts. Progress alone is not enough: over all its tries, a download must keep a floor rate
  (RateFloor: 10 kB/s averaged over a minute by default), so a server that trickles a little on each connection and
  then stalls fails within about two minutes instead of holding a run for hours, while a slow, steady link above
  the floor finishes. A server that ignores Range is read past what we already have.
- Nothing is kept that is not TinyStories text: an error status or a web page (a proxy's error page or a login
  wall answers 200 with HTML) is refused by its headers, and the text itself must be UTF-8 with a story end
  within every STORY_BYTES. A size (Content-Length) that is missing, not a number or past MAX_FILE_BYTES is
  refused too. The error names the URL and what came back.
- A cache is committed by rewriting its metadata (temporary file, then rename) after the tokens are flushed:
  readers trust only the recorded token count, so a run killed at any moment never leaves a cache that reads as
  whole. An exclusive `flock` serialises runs that prepare the same cache; whoever holds it first removes the
  temporary files and `.building-*` folders a killed run left there, since only a lock holder writes them.
- A cache that does not match its record (a token file shorter than its meta.json says, a meta.json of another
  shape or types, a tokenizer prefix cut short, a tokenizer file that does not load) is said in one line and made
  again, never read: nothing in it is trusted beyond what its record and sizes agree on.
- A full disk (or quota) while the cache is written raises OSError(ENOSPC) with one line as its strerror, naming
  the cache folder: every write is committed by a rename or by a record written last, so what the cache held stays
  whole and the next run with room continues from it.
- A local file's cache is keyed by its path, size, modification time, split and tokenizer; it is built in a
  temporary folder and renamed into place. Its last `val_fraction`, from a story boundary, is validation.
- Batches are drawn from the run's seed. Inputs and targets are gathered straight into one contiguous buffer
  (pinned on CUDA, so its copy is one asynchronous transfer rather than a pageable detour); `Batches` holds one
  batch ahead and, on CUDA, copies it on a stream of its own while the current step computes: the step's stream
  waits on an event for that copy alone, and the batch's memory is recorded on the step's stream.
- The tokenizer is trained on a bounded prefix of the training text and cached beside the tokens. For TinyStories
  that prefix is kept with the file's size and ETag, recorded last as its commit; when the file on the server no
  longer matches, the prefix and every tokenizer learned from it are made again. The training tokens start from
  the prefix instead of fetching it again. Where the text allows fewer merges than asked, the smaller vocabulary
  is the one used, and said.
"""

import codecs
import errno
import fcntl
import hashlib
import json
import math
import os
import re
import shutil
import stat
import sys
import tempfile
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import numpy as np
import requests
import torch
import urllib3
from requests.adapters import HTTPAdapter
from tqdm import tqdm
from urllib3.util.retry import Retry

import atomic
from errors import UsageError
from tokenizer import Tokenizer

DEFAULT_TINYSTORIES_URL = "https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main"
TINYSTORIES_FILES = {
    "v1": ("TinyStories-train.txt", "TinyStories-valid.txt"),
    "v2": ("TinyStoriesV2-GPT4-train.txt", "TinyStoriesV2-GPT4-valid.txt"),
}
EOT = Tokenizer.SPECIAL_TOKENS[0].encode()
TOKENIZER_TRAIN_BYTES = 4 << 20  # the prefix of the training text the tokenizer learns from
CHUNK_BYTES = 8 << 20  # text tokenized at a time
WHOLE_FILE = 1 << 62  # tokens "needed" of the validation file (19 MB in V1, 22 MB in V2): all of it
BYTES_PER_TOKEN_GUESS = 4.5  # to size downloads before the first tokens are counted
STREAM_PIECE = 64 << 10  # the most bytes read at a time; the smallest request
RETRIES = 5  # urllib3 retries per request (connection errors, 5xx, 429), with back-off: 15 s in all
TIMEOUT = (5, 10)  # connect, read seconds: a server silent for this long has stalled
STALLS = 3  # resumes in a row that bring no byte before a download fails: a stall fails within ~45 s
RESUME_PAUSE = 1.0  # seconds before a resume, times the stalls in a row
MIN_RATE = 10_000  # bytes/s: a download slower than this, averaged over RATE_WINDOW, fails (TINYSTORIES_MIN_RATE)
RATE_WINDOW = 60.0  # seconds (TINYSTORIES_RATE_WINDOW)
STORY_BYTES = 256 << 10  # TinyStories' stories are a few KB: this much text without a story end is not TinyStories
WEB_PAGE_TYPES = ("text/html", "application/xhtml+xml", "application/json", "application/xml", "text/xml")
PROGRESS_DELAY = 1.0  # seconds before a progress bar shows: quick steps stay quiet
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
MAX_FILE_BYTES = 1 << 40  # a TinyStories file is about 2 GB: a size past a terabyte is a broken server's


class DataError(UsageError):
    """A mistake in the data the user gave, or a download that cannot be done; the message is one line."""


@dataclass
class Splits:
    train: np.ndarray
    val: np.ndarray
    val_bytes: int  # UTF-8 bytes of the text behind `val`, for bits per byte
    tokenizer: Tokenizer
    tag: str  # what the run is tagged with: "tinystories" or the file's name
    sources: list[dict] = field(default_factory=list)  # TinyStories: each file's cache record (url, size, etag, bytes)


# -------------------------------------------------------------------------------------------------------------------
# batches


def sample_windows(
    tokens: np.ndarray,
    batch_size: int,
    block_size: int,
    generator: torch.Generator,
    part: int = 0,
    parts: int = 1,
    pin: bool = False,
) -> torch.Tensor:
    """Random windows of block_size + 1 tokens as one contiguous (2, batch_size, block_size) int64 tensor: the
    inputs, then the same shifted by one. Reproducible from `generator`; in pinned memory with `pin`.

    With `parts` > 1, the starts of parts * batch_size windows are drawn and the `part`-th batch_size of them
    taken: processes that each take their part train on what one process with a `parts` times larger batch would."""
    starts = torch.randint(len(tokens) - block_size, (batch_size * parts,), generator=generator)
    starts = starts[part * batch_size : (part + 1) * batch_size].numpy()
    windows = tokens[starts[:, None] + np.arange(block_size + 1)]
    batch = torch.empty((2, batch_size, block_size), dtype=torch.int64, pin_memory=pin)
    both = batch.numpy()  # written in place: the inputs and targets land contiguous, in pinned memory where asked
    both[0], both[1] = windows[:, :-1], windows[:, 1:]
    return batch


def get_batch(
    tokens: np.ndarray,
    batch_size: int,
    block_size: int,
    generator: torch.Generator,
    device: str | torch.device,
    part: int = 0,
    parts: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets of random windows (see sample_windows), each contiguous, on `device`, in the current
    stream's order."""
    cuda = torch.device(device).type == "cuda"
    batch = sample_windows(tokens, batch_size, block_size, generator, part, parts, pin=cuda)
    batch = batch.to(device, non_blocking=cuda)  # one copy, from pinned memory: asynchronous
    return batch[0], batch[1]


class Batches:
    """Training batches drawn from `seed`, one held ahead. On CUDA the batch ahead is gathered into pinned memory
    and copied on a stream of its own while the current step computes; the step waits for that copy only when it
    takes the batch, by an event, and the batch's memory is kept until the step's stream is done with it.

    `state` is the generator's state before the batch held ahead: a resumed run draws that batch again, and so
    does `restart(state)`. `part` and `parts` split each batch between processes as sample_windows does."""

    def __init__(
        self,
        tokens: np.ndarray,
        batch_size: int,
        block_size: int,
        seed: int,
        device: str | torch.device,
        *,
        part: int = 0,
        parts: int = 1,
        state: torch.Tensor | None = None,
    ):
        self.tokens, self.batch_size, self.block_size = tokens, batch_size, block_size
        self.part, self.parts = part, parts
        self.device = torch.device(device)
        self.copies = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.generator = torch.Generator().manual_seed(seed)
        self.restart(self.generator.get_state() if state is None else state)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch held ahead, inputs and targets, ready for the current stream; the one after is drawn now."""
        batch, ready = self.ahead, self.ready
        if ready is not None:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(ready)
            batch.record_stream(stream)  # allocated on the copy stream: not reused while this stream may use it
        self.draw()
        return batch[0], batch[1]

    def restart(self, state: torch.Tensor) -> None:
        """Draw again from a state taken earlier (`state`)."""
        self.generator.set_state(state)
        self.draw()

    def draw(self) -> None:
        self.state = self.generator.get_state()
        host = sample_windows(self.tokens, self.batch_size, self.block_size, self.generator, self.part, self.parts,
                              pin=self.copies is not None)  # fmt: skip
        if self.copies is None:
            self.ahead, self.ready = host.to(self.device), None
            return
        with torch.cuda.stream(self.copies):
            self.ahead = host.to(self.device, non_blocking=True)
            self.ready = torch.cuda.Event()
            self.ready.record(self.copies)


def iter_eval_batches(
    tokens: np.ndarray, batch_size: int, block_size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Consecutive windows over all of `tokens`, so every token after the first is predicted exactly once."""
    n_windows = (len(tokens) - 1) // block_size
    for first in range(0, n_windows, batch_size):
        count = min(batch_size, n_windows - first)
        start = first * block_size
        windows = torch.from_numpy(tokens[start : start + count * block_size + 1].astype(np.int64))
        yield windows[:-1].view(count, block_size), windows[1:].view(count, block_size)
    rest = torch.from_numpy(tokens[n_windows * block_size :].astype(np.int64))
    if len(rest) > 1:
        yield rest[None, :-1], rest[None, 1:]


# -------------------------------------------------------------------------------------------------------------------
# shared pieces


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def digest(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def write_atomic(path: Path, data: bytes) -> None:
    """The file is either the old one or the new one, never half (see atomic.py)."""
    atomic.replace(path, lambda f: f.write(data))


def write_json(path: Path, payload: dict) -> None:
    write_atomic(path, json.dumps(payload).encode())


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


FILE_RECORD = dict(source=str, size=int, split=int, fingerprint=str, train_tokens=int, val_tokens=int, val_bytes=int)
STREAM_RECORD = dict(url=str, size=int, etag=str, fingerprint=str, bytes=int, tokens=int)


def read_record(path: Path, fields: dict[str, type]) -> dict | None:
    """The JSON object at path where it holds each of `fields` with its type (whole numbers >= 0), else None."""
    record = read_json(path)
    if not isinstance(record, dict):
        return None
    for name, kind in fields.items():
        value = record.get(name)
        if type(value) is not kind or (kind is int and value < 0):
            return None
    return record


def tokens_in(path: Path) -> int:
    return path.stat().st_size // 2 if path.is_file() else 0


def damaged(folder: Path, problem: str) -> None:
    say(f"the token cache in {folder} is damaged ({problem}); it is made again")


def open_tokens(path: Path, count: int) -> np.ndarray:
    if count == 0:
        return np.zeros(0, dtype=np.uint16)
    return np.memmap(path, dtype=np.uint16, mode="r", shape=(count,))


@contextmanager
def locked(folder: Path):
    """Hold an exclusive lock on `folder` while preparing it, so two runs never write the same cache at once.

    A full disk (or quota) while preparing is an OSError(ENOSPC) whose strerror is one line naming the folder."""
    try:
        with open_lock(folder) as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                say(f"waiting for another run preparing {folder}")
                fcntl.flock(lock, fcntl.LOCK_EX)
            remove_leftovers(folder)
            yield
    except OSError as e:
        if e.errno not in DISK_FULL:
            raise
        raise OSError(errno.ENOSPC, f"the disk is full: no room left for the token cache in {folder}; what it held "
                      "before is kept whole. Free some space or choose another --cache_dir") from e  # fmt: skip


def open_lock(folder: Path) -> TextIO:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        return open(folder / ".lock", "w")
    except OSError as e:
        if e.errno in DISK_FULL:
            raise
        raise DataError(f"cannot write the cache in {folder} ({e.strerror}); choose another --cache_dir") from None


def remove_leftovers(folder: Path) -> None:
    """Temporary files and folders under `folder` left by a run that was killed while it held the lock."""
    for leftover in folder.rglob(".building-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    for leftover in folder.rglob("*.tmp"):
        leftover.unlink(missing_ok=True)


def progress(desc: str, total: int, initial: int = 0) -> tqdm:
    """A progress bar on stderr with rate and time left, shown once a step has lasted PROGRESS_DELAY."""
    return tqdm(total=total, initial=initial, desc=desc, unit="B", unit_scale=True, file=sys.stderr,
                delay=PROGRESS_DELAY)  # fmt: skip


def cut_after_last(data: bytes, marks: tuple[bytes, ...]) -> int:
    """The end of the last `mark` in data (the first mark found wins), or 0."""
    for mark in marks:
        at = data.rfind(mark)
        if at >= 0:
            return at + len(mark)
    return 0


def is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def decode(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{where} is not UTF-8 text") from None


def tokenize(tokenizer: Tokenizer, text: str) -> np.ndarray:
    """Token ids of text, cut into a few parts at story ends so encode_many can use every core."""
    parts, size = [], max(len(text) // (os.cpu_count() or 1), 1)
    while text:
        cut = text.find(Tokenizer.SPECIAL_TOKENS[0], size)
        cut = len(text) if cut < 0 else cut + len(Tokenizer.SPECIAL_TOKENS[0])
        parts.append(text[:cut])
        text = text[cut:]
    return np.concatenate([np.zeros(0, np.uint16), *tokenizer.encode_many(parts)])


def cached_tokenizer(folder: Path, text: str, vocab_size: int) -> Tokenizer:
    """The tokenizer learned from `text`, cached in folder; its vocab_size is below the one asked for where the
    text holds fewer distinct pairs to merge."""
    path, tokenizer = folder / f"tokenizer-{vocab_size}.json", None
    if path.exists():
        try:
            tokenizer = Tokenizer.load(path)
        except ValueError as e:
            say(f"{e}; it is trained again")
    if tokenizer is None:
        say(f"training a {vocab_size}-token BPE tokenizer on {len(text.encode()) / 1e6:.1f} MB of text")
        tokenizer = Tokenizer.train(text, vocab_size)
        tokenizer.save(path)
    if tokenizer.vocab_size < vocab_size:
        say(f"the text allows only {tokenizer.vocab_size} tokens, not {vocab_size} (--vocab_size): "
            f"the run uses {tokenizer.vocab_size}")  # fmt: skip
    return tokenizer


# -------------------------------------------------------------------------------------------------------------------
# a local text file


NOT_A_FILE = {
    stat.S_ISDIR: "is a directory, not a text file",
    stat.S_ISFIFO: "is a named pipe (FIFO): the text is read more than once, so give a regular .txt file",
    stat.S_ISCHR: "is a character device, not a text file: give a regular .txt file",
    stat.S_ISBLK: "is a block device, not a text file: give a regular .txt file",
    stat.S_ISSOCK: "is a socket, not a text file: give a regular .txt file",
}


def check_text_file(path: Path) -> int:
    """The size of a regular, non-empty UTF-8 text file at path; anything else is a DataError."""
    try:
        info = path.stat()
    except FileNotFoundError:
        raise DataError(f"--data {path}: no such file (give 'tinystories' or the path of a .txt file)") from None
    except OSError as e:
        raise DataError(f"--data {path}: cannot read it ({e.strerror})") from None
    for is_kind, message in NOT_A_FILE.items():
        if is_kind(info.st_mode):  # checked before opening: opening a FIFO waits for a writer
            raise DataError(f"--data {path}: {message}")
    if info.st_size == 0:
        raise DataError(f"--data {path}: the file is empty")
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 20)
    except OSError as e:
        raise DataError(f"--data {path}: cannot read it ({e.strerror})") from None
    if b"\0" in head:
        raise DataError(f"--data {path}: looks binary (it holds NUL bytes), not like a text file")
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head)
    except UnicodeDecodeError:
        raise DataError(f"--data {path}: is not UTF-8 text") from None
    return info.st_size


def split_point(path: Path, size: int, val_fraction: float) -> int:
    """Where validation starts: the first story end (else line end) after (1 - val_fraction) of the file."""
    target = int(size * (1 - val_fraction))
    with open(path, "rb") as f:
        f.seek(target)
        window = f.read(1 << 16)
    for mark in (EOT + b"\n", EOT, b"\n"):
        at = window.find(mark)
        if at >= 0:
            return target + at + len(mark)
    while target < size and (window[0] & 0xC0) == 0x80:  # never inside a UTF-8 character
        target, window = target + 1, window[1:]
    return target


def read_text_chunks(path: Path, start: int, end: int) -> Iterator[str]:
    """The text of bytes [start, end) in chunks of about CHUNK_BYTES, each cut at a story or line end."""
    with open(path, "rb") as f:
        f.seek(start)
        pending = b""
        while start < end:
            data = pending + f.read(min(CHUNK_BYTES, end - start))
            start += len(data) - len(pending)
            cut = len(data) if start >= end else cut_after_last(data, (EOT, b"\n")) or len(data)
            while cut < len(data) and (data[cut] & 0xC0) == 0x80:
                cut += 1
            pending = data[cut:]
            yield decode(data[:cut], str(path))
        if pending:
            yield decode(pending, str(path))


def write_tokens(path: Path, tokenizer: Tokenizer, chunks: Iterator[str], total: int, desc: str) -> tuple[int, int]:
    """Tokenize text chunks into a uint16 file; returns (tokens, bytes)."""
    n_tokens = n_bytes = 0
    with open(path, "wb") as out, progress(desc, total) as bar:
        for text in chunks:
            ids = tokenize(tokenizer, text)
            out.write(ids.tobytes())
            n_tokens += len(ids)
            size = len(text.encode())
            n_bytes += size
            bar.update(size)
    return n_tokens, n_bytes


def load_text_file(
    path: str | Path, *, vocab_size: int, val_fraction: float, cache_dir: Path, tokenizer: Tokenizer | None = None
) -> Splits:
    path = Path(path).expanduser().resolve()
    size = check_text_file(path)
    split = split_point(path, size, val_fraction)
    if split >= size:
        raise DataError(f"--data {path}: no validation text is left after the split; use a bigger file")
    folder = cache_dir / "files" / digest(str(path), size, path.stat().st_mtime_ns, val_fraction)
    with locked(folder):
        if tokenizer is None:
            with open(path, "rb") as f:
                prefix = f.read(min(split, TOKENIZER_TRAIN_BYTES)).decode("utf-8", errors="ignore")
            tokenizer = cached_tokenizer(folder, prefix, vocab_size)
        tokens = folder / tokenizer.fingerprint
        meta = file_record(tokens, tokenizer)
        if meta is None:
            meta = build_file_cache(path, split, size, tokenizer, tokens)
    return Splits(
        train=open_tokens(tokens / "train.bin", meta["train_tokens"]),
        val=open_tokens(tokens / "val.bin", meta["val_tokens"]),
        val_bytes=meta["val_bytes"],
        tokenizer=tokenizer,
        tag=path.name,
    )


def file_record(folder: Path, tokenizer: Tokenizer) -> dict | None:
    """The record of the tokens cached in folder, None where there are none. A folder whose record does not match
    its token files (a file cut short, a record of another shape) is said and removed, to be made again."""
    if not folder.is_dir():
        return None
    meta = read_record(folder / "meta.json", FILE_RECORD)
    have = (tokens_in(folder / "train.bin"), tokens_in(folder / "val.bin"))
    if meta is None or meta["fingerprint"] != tokenizer.fingerprint:
        problem = "its meta.json is not a record of these tokens"
    elif have != (meta["train_tokens"], meta["val_tokens"]):
        problem = (f"train.bin and val.bin hold {have[0]:,} and {have[1]:,} tokens, its meta.json records "
                   f"{meta['train_tokens']:,} and {meta['val_tokens']:,}")  # fmt: skip
    else:
        return meta
    damaged(folder, problem)
    shutil.rmtree(folder)
    return None


def build_file_cache(path: Path, split: int, size: int, tokenizer: Tokenizer, folder: Path) -> dict:
    """Tokenize both splits in a temporary folder, then rename it into place."""
    building = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".building-"))
    try:
        train_tokens, _ = write_tokens(building / "train.bin", tokenizer, read_text_chunks(path, 0, split), split,
                                       f"tokenizing {path.name}")  # fmt: skip
        val_tokens, val_bytes = write_tokens(building / "val.bin", tokenizer, read_text_chunks(path, split, size),
                                             size - split, "validation split")  # fmt: skip
        if train_tokens == 0:
            raise DataError(f"--data {path}: no training text is left before the validation split")
        meta = dict(source=str(path), size=size, split=split, fingerprint=tokenizer.fingerprint,
                    train_tokens=train_tokens, val_tokens=val_tokens, val_bytes=val_bytes)  # fmt: skip
        write_json(building / "meta.json", meta)
        os.replace(building, folder)
        return meta
    finally:
        shutil.rmtree(building, ignore_errors=True)


# -------------------------------------------------------------------------------------------------------------------
# TinyStories over HTTP


def http_session() -> requests.Session:
    retry = Retry(total=RETRIES, read=False, backoff_factor=0.5, status_forcelist=(429, 500, 502, 503, 504),
                  allowed_methods=("HEAD", "GET"), raise_on_status=False)  # fmt: skip
    session = requests.Session()
    session.mount("http://", HTTPAdapter(max_retries=retry))
    session.mount("https://", HTTPAdapter(max_retries=retry))
    session.headers["Accept-Encoding"] = "identity"  # byte offsets in Range requests are offsets in the file
    return session


@dataclass(frozen=True)
class RateFloor:
    """The slowest download accepted: fewer than `min_rate` bytes/s averaged over `window` seconds fails it
    (0 turns the floor off). A link that brings a little on each connection and then stalls is slow, however
    often it reconnects."""

    min_rate: float = MIN_RATE
    window: float = RATE_WINDOW

    def __post_init__(self):
        if self.min_rate < 0 or self.window <= 0:
            raise ValueError(f"{self} needs min_rate >= 0 and window > 0")

    @classmethod
    def from_environment(cls) -> "RateFloor":
        """The floor that TINYSTORIES_MIN_RATE (bytes/s) and TINYSTORIES_RATE_WINDOW (seconds) set, else the default."""
        min_rate = environment_number("TINYSTORIES_MIN_RATE", MIN_RATE, "a rate in bytes per second (0 for none)")
        window = environment_number("TINYSTORIES_RATE_WINDOW", RATE_WINDOW, "a number of seconds above 0", above=0)
        return cls(min_rate, window)


def environment_number(name: str, default: float, what: str, above: float | None = None) -> float:
    """The finite number >= 0 (or > `above`) in environment variable `name`, or `default` where it is unset."""
    text = os.environ.get(name, "").strip()
    try:
        value = float(text) if text else default
    except ValueError:
        value = math.nan
    if not 0 <= value < math.inf or (above is not None and value <= above):
        raise DataError(f"{name}={text[:40]!r} is not {what}")
    return value


@dataclass
class Link:
    """How TinyStories is fetched: one session (retries, no compression) and the slowest rate accepted."""

    session: requests.Session = field(default_factory=http_session)
    floor: RateFloor = field(default_factory=RateFloor)


class RateMeter:
    """The bytes one download received over about its last `floor.window` seconds, across its reconnects."""

    def __init__(self, url: str, floor: RateFloor):
        self.url, self.floor, self.received = url, floor, 0
        self.marks = deque([(time.monotonic(), 0)])  # (time, bytes received by then), about 60 a window

    def count(self, n_bytes: int) -> None:
        """Add bytes just received (0 after a try that failed); a DataError once the rate is below the floor."""
        now, self.received = time.monotonic(), self.received + n_bytes
        if now - self.marks[-1][0] >= self.floor.window / 60:
            self.marks.append((now, self.received))
        while len(self.marks) > 1 and now - self.marks[1][0] >= self.floor.window:
            self.marks.popleft()
        since, received_then = self.marks[0]
        span = now - since
        rate = (self.received - received_then) / span if span else 0.0
        if self.floor.min_rate and span >= self.floor.window and rate < self.floor.min_rate:
            raise DataError(
                f"the download of {self.url} is too slow: {rate / 1e3:.2f} kB/s over the last {span:.0f} s, under the "
                f"{self.floor.min_rate / 1e3:g} kB/s it must keep (TINYSTORIES_MIN_RATE); the token cache keeps what "
                f"was prepared. Check the network, {WHAT_TO_DO}"
            )


WHAT_TO_DO = "point --tinystories_url (or TINYSTORIES_URL) at a mirror, or give --data a local .txt file"
NETWORK_ERRORS = (requests.RequestException, urllib3.exceptions.HTTPError)  # requests' own, and those of raw reads


def unreachable(url: str, error: str) -> DataError:
    return DataError(f"cannot download {url} ({error}); check the network, {WHAT_TO_DO}")


def summary(data: bytes) -> str:
    text = " ".join(data[:80].decode("utf-8", errors="replace").split())
    return f"{len(data):,} bytes starting {text!r}" if data else "no bytes"


def not_tinystories(url: str, problem: str, what_came: str) -> DataError:
    return DataError(f"{url} is not TinyStories text ({problem}): {what_came}; nothing of it was kept. "
                     f"Check the network or proxy, {WHAT_TO_DO}")  # fmt: skip


def answer_problem(response: requests.Response) -> str | None:
    """Why an answer is not the file: an error status, or a web page (a proxy's error page, a login wall)."""
    if response.status_code not in (200, 206):
        return f"status {response.status_code}"
    if response.headers.get("Content-Type", "").split(";")[0].strip().lower() in WEB_PAGE_TYPES:
        return "a web page"
    return None


def refuse(url: str, response: requests.Response, body: bytes) -> DataError:
    kind = response.headers.get("Content-Type") or "no Content-Type"
    what_came = f"the server answered {response.status_code} {response.reason}, {kind}, {summary(body)}"
    return not_tinystories(url, answer_problem(response), what_came)


def first_bytes(response: requests.Response, n: int = 200) -> bytes:
    """Up to n bytes of a streamed body, as far as the server sends them, for an error message."""
    data = b""
    try:
        while len(data) < n and (piece := response.raw.read1(n - len(data))):
            data += piece
    except NETWORK_ERRORS:
        pass
    return data


def remote_file(link: Link, url: str) -> dict:
    """Size and ETag of the file at url; an answer that is not the file (an error, a web page) is a DataError."""
    for stalls in range(STALLS + 1):
        try:
            response = link.session.head(url, allow_redirects=True, timeout=TIMEOUT)
            break
        except requests.ReadTimeout as e:
            if stalls == STALLS:
                raise unreachable(url, f"{type(e).__name__}, {STALLS + 1} times") from None
        except requests.RequestException as e:
            raise unreachable(url, type(e).__name__) from None
    if answer_problem(response):
        try:  # a HEAD has no body: show what a GET brings (without retries, which the HEAD had)
            with requests.get(url, stream=True, timeout=TIMEOUT, headers={"Accept-Encoding": "identity"}) as page:
                body = first_bytes(page)
        except requests.RequestException:
            body = b""
        raise refuse(url, response, body)
    return dict(size=file_size(url, response), etag=response.headers.get("ETag", ""))


def file_size(url: str, response: requests.Response) -> int:
    """The size a HEAD answer gives, refused where it is missing, not a number, or absurd."""
    text = response.headers.get("Content-Length")
    if text is None:
        raise DataError(f"{url} does not say how large it is (no Content-Length); cannot stream it")
    if not re.fullmatch(r"[0-9]{1,20}", text.strip()) or int(text) > MAX_FILE_BYTES:
        raise DataError(f"{url} gives no usable size (Content-Length: {text[:40]!r}), so it cannot be streamed; "
                        f"{WHAT_TO_DO}")  # fmt: skip
    return int(text)


def stream_bytes(link: Link, url: str, start: int, end: int) -> Iterator[bytes]:
    """Bytes [start, end) of url by Range requests. A cut or stalled connection is resumed where it stopped; the
    download fails after STALLS resumes in a row that brought no byte, or once it is slower than link.floor."""
    stalls, meter = 0, RateMeter(url, link.floor)  # one meter over every try: a reconnect is not progress
    while start < end:
        began = start
        try:
            headers = {"Range": f"bytes={start}-{end - 1}"}
            with link.session.get(url, headers=headers, stream=True, timeout=TIMEOUT) as response:
                if answer_problem(response):
                    raise refuse(url, response, first_bytes(response))
                skip = start if response.status_code == 200 else 0  # 200: the server ignored Range, sent it all
                while start < end and (piece := response.raw.read1(STREAM_PIECE)):  # what has arrived, up to a piece
                    meter.count(len(piece))
                    if skip:
                        piece, skip = piece[skip:], max(skip - len(piece), 0)
                    piece = piece[: end - start]
                    if piece:
                        start += len(piece)
                        yield piece
            if start >= end:
                return
            error = "connection closed early"
        except NETWORK_ERRORS as e:
            error = type(e).__name__
        meter.count(0)
        stalls = 0 if start > began else stalls + 1
        if stalls > STALLS:
            raise unreachable(url, f"stalled at byte {start:,}: {stalls} tries in a row brought nothing; {error}")
        say(f"download of {url} cut at byte {start:,} ({error}); resuming there")
        time.sleep(RESUME_PAUSE * stalls)


def check_story_end(url: str, data: bytes, at: int, whole: bool) -> None:
    """Refuse `data`, the file's bytes from `at`, where its first STORY_BYTES hold no story end; where it is all
    there is (a whole file, the tokenizer's prefix), it must hold one however short it is."""
    if (len(data) >= STORY_BYTES or whole) and EOT not in data[:STORY_BYTES]:
        span = f"its first {len(data[:STORY_BYTES]):,} bytes" if at == 0 else f"{STORY_BYTES:,} bytes from byte {at:,}"
        raise not_tinystories(url, f"no {EOT.decode()} in {span}", f"it sent {summary(data)}")


def decode_text(url: str, data: bytes, at: int) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        problem = f"not UTF-8 at byte {at + e.start:,}"
        raise not_tinystories(url, problem, f"it sent {summary(data[max(e.start - 40, 0) :])}") from None


def file_bytes(link: Link, url: str, start: int, end: int, known: bytes) -> Iterator[bytes]:
    """Bytes [start, end) of url; those within `known`, the file's first bytes fetched earlier, from memory."""
    if start < len(known):
        yield known[start:end]
        start = min(end, len(known))
    if start < end:
        yield from stream_bytes(link, url, start, end)


def commit_tokens(folder: Path, meta: dict, ids: np.ndarray, n_bytes: int) -> None:
    """Write ids after the committed tokens (over any a killed run left uncommitted), flush, then commit."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "tokens.bin"
    with open(path, "r+b" if path.exists() else "wb") as out:
        out.seek(meta["tokens"] * 2)
        out.write(ids.tobytes())
        out.truncate()
        out.flush()
        os.fsync(out.fileno())
    meta.update(bytes=meta["bytes"] + n_bytes, tokens=meta["tokens"] + len(ids))
    write_json(folder / "meta.json", meta)  # the commit point


def stream_record(folder: Path, url: str, tokenizer: Tokenizer) -> dict | None:
    """The record of the tokens committed in folder, None where there are none. A record that does not match its
    tokens file (a file cut short, a record of another shape) is said and not used: the cache is made again."""
    if not (folder / "meta.json").exists():
        return None
    meta = read_record(folder / "meta.json", STREAM_RECORD)
    ours = meta is not None and (meta["url"], meta["fingerprint"]) == (url, tokenizer.fingerprint)
    if not ours or meta["bytes"] > meta["size"]:
        problem = "its meta.json is not a record of these tokens"
    elif (have := tokens_in(folder / "tokens.bin")) < meta["tokens"]:
        problem = f"tokens.bin holds {have:,} tokens, fewer than the {meta['tokens']:,} its meta.json records"
    else:
        return meta
    damaged(folder, problem)
    return None


def extend_stream_cache(
    link: Link,
    url: str,
    remote: dict,
    folder: Path,
    tokenizer: Tokenizer,
    needed_tokens: int,
    known: bytes = b"",
) -> dict:
    """Tokenize url from where the cache in folder stops until it holds `needed_tokens` tokens (or the whole file).

    `remote` is the file's size and ETag on the server now; `known`, its first bytes already fetched at that version.
    """
    size = remote["size"]
    meta = stream_record(folder, url, tokenizer)
    if meta and (meta["size"], meta["etag"]) != (size, remote["etag"]):
        say(f"{url} changed on the server (size or ETag); its token cache is rebuilt")
        meta = None
    if meta is None:
        meta = dict(url=url, **remote, fingerprint=tokenizer.fingerprint, bytes=0, tokens=0)
        (folder / "meta.json").unlink(missing_ok=True)  # the commit point first
        (folder / "tokens.bin").unlink(missing_ok=True)
    pending, fetched = bytearray(), meta["bytes"]  # a bytearray grows in place, piece by piece
    with progress(url.rsplit("/", 1)[-1], size, meta["bytes"]) as bar:
        while meta["tokens"] < needed_tokens and meta["bytes"] < size:
            bytes_per_token = meta["bytes"] / meta["tokens"] if meta["tokens"] else BYTES_PER_TOKEN_GUESS
            wanted = int((needed_tokens - meta["tokens"]) * bytes_per_token * 1.1) + STREAM_PIECE
            window_end = min(size, fetched + min(max(wanted - len(pending), STREAM_PIECE), CHUNK_BYTES))
            for piece in file_bytes(link, url, fetched, window_end, known):
                pending += piece
                fetched += len(piece)
                bar.update(len(piece))
            check_story_end(url, pending, meta["bytes"], whole=meta["bytes"] == 0 and fetched >= size)
            cut = len(pending) if fetched >= size else cut_after_last(pending, (EOT,))
            if cut == 0:
                continue  # no story has ended yet in what was fetched
            text = decode_text(url, pending[:cut], meta["bytes"])
            commit_tokens(folder, meta, tokenize(tokenizer, text), cut)
            del pending[:cut]
    return meta


def tokenizer_prefix(link: Link, url: str, remote: dict, folder: Path, n_bytes: int) -> bytes:
    """The first n_bytes of url cut at the last story end, for the tokenizer to learn from, kept in folder with
    the size and ETag of the file they came from. Where the file on the server is no longer that one, the prefix
    and every tokenizer learned from it are dropped and made again."""
    path, record = folder / "prefix.txt", folder / "prefix.json"
    if read_json(record) == remote and path.exists():
        data = path.read_bytes()
        if data.endswith(EOT) and is_utf8(data):
            return data
        say(f"{path} is damaged (cut short); it is fetched again")
    for stale in (record, *folder.glob("tokenizer-*.json"), path):
        stale.unlink(missing_ok=True)
    end = min(remote["size"], n_bytes)
    pieces = []
    with progress(f"tokenizer text from {url.rsplit('/', 1)[-1]}", end) as bar:
        for piece in stream_bytes(link, url, 0, end):
            pieces.append(piece)
            bar.update(len(piece))
    data = b"".join(pieces)
    check_story_end(url, data, 0, whole=True)
    data = data[: cut_after_last(data, (EOT,))]
    decode_text(url, data, 0)
    write_atomic(path, data)
    write_json(record, remote)  # last: a prefix counts only once its record is there
    return data


def load_tinystories(
    *,
    base_url: str,
    version: str,
    vocab_size: int,
    train_tokens: int,
    cache_dir: Path,
    tokenizer: Tokenizer | None = None,
    rate_floor: RateFloor | None = None,
) -> Splits:
    """The TinyStories splits at base_url, prepared as far as `train_tokens`; a download slower than `rate_floor`
    (by default RateFloor.from_environment()) fails."""
    train_name, valid_name = TINYSTORIES_FILES[version]
    train_url, valid_url = (f"{base_url.rstrip('/')}/{name}" for name in (train_name, valid_name))
    folder = cache_dir / "tinystories" / digest(train_url)
    link = Link(floor=rate_floor or RateFloor.from_environment())
    with locked(folder):
        train_remote, known = remote_file(link, train_url), b""
        if tokenizer is None:
            known = tokenizer_prefix(link, train_url, train_remote, folder, TOKENIZER_TRAIN_BYTES)
            tokenizer = cached_tokenizer(folder, known.decode(), vocab_size)
        train_folder, valid_folder = folder / tokenizer.fingerprint / "train", folder / tokenizer.fingerprint / "valid"
        train = extend_stream_cache(link, train_url, train_remote, train_folder, tokenizer, train_tokens, known)
        valid_remote = remote_file(link, valid_url)
        valid = extend_stream_cache(link, valid_url, valid_remote, valid_folder, tokenizer, WHOLE_FILE)
    return Splits(
        train=open_tokens(train_folder / "tokens.bin", train["tokens"]),
        val=open_tokens(valid_folder / "tokens.bin", valid["tokens"]),
        val_bytes=valid["bytes"],
        tokenizer=tokenizer,
        tag="tinystories",
        sources=[train, valid],
    )
