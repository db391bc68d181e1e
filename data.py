"""
Data: a local .txt file or TinyStories over HTTP, tokenized once into a cache on disk, and batches from it.

Design choices:
- Token files are flat uint16 arrays, memory-mapped, so memory stays flat whatever the dataset size; text is read
  and tokenized in chunks of a few MB.
- Stories end at `<|endoftext|>`, and the tokenizer never lets a word cross it, so text cut right after it
  tokenizes the same in pieces as in one go: a download cut anywhere resumes with exactly the same tokens.
- TinyStories is streamed with `requests` (urllib3 retries, timeouts); only what the run needs is fetched and
  tokenized, and a later run that needs more continues with an HTTP Range request where the cache stops. A cut
  connection resumes by Range too; a server that ignores Range is read past what we already have.
- A cache is committed by rewriting its metadata (temporary file, then rename) after the tokens are flushed:
  readers trust only the recorded token count, so a run killed at any moment never leaves a cache that reads as
  whole. An exclusive `flock` serialises runs that prepare the same cache.
- A local file's cache is keyed by its path, size, modification time, split and tokenizer; it is built in a
  temporary folder and renamed into place. Its last `val_fraction`, from a story boundary, is validation.
- The tokenizer is trained on a bounded prefix of the training text and cached beside the tokens. For TinyStories
  that prefix is kept with the file's size and ETag, and the training tokens start from it instead of fetching
  it again.
"""

import codecs
import fcntl
import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import requests
import torch
from requests.adapters import HTTPAdapter
from tqdm import tqdm
from urllib3.util.retry import Retry

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
STREAM_PIECE = 64 << 10  # bytes read at a time: a cut connection loses at most this much; the smallest request
RETRIES = 5  # urllib3 retries per request (connect, read, 5xx, 429), with backoff
RESUMES = 20  # times a download cut mid-body is resumed
TIMEOUT = (5, 30)  # connect, read seconds


class DataError(Exception):
    """A mistake in the data the user gave, or a download that cannot be done; the message is one line."""


@dataclass
class Splits:
    train: np.ndarray
    val: np.ndarray
    val_bytes: int  # UTF-8 bytes of the text behind `val`, for bits per byte
    tokenizer: Tokenizer
    tag: str  # what the run is tagged with: "tinystories" or the file's name


# -------------------------------------------------------------------------------------------------------------------
# batches


def get_batch(
    tokens: np.ndarray,
    batch_size: int,
    block_size: int,
    generator: torch.Generator,
    device: str | torch.device,
    part: int = 0,
    parts: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows of block_size + 1 tokens: inputs and the same shifted by one. Reproducible from `generator`.

    With `parts` > 1, the starts of parts * batch_size windows are drawn and the `part`-th batch_size of them
    returned: processes that each take their part train on what one process with a `parts` times larger batch would."""
    starts = torch.randint(len(tokens) - block_size, (batch_size * parts,), generator=generator)
    starts = starts[part * batch_size : (part + 1) * batch_size].numpy()
    windows = torch.from_numpy(tokens[starts[:, None] + np.arange(block_size + 1)].astype(np.int64))
    x, y = windows[:, :-1], windows[:, 1:]
    if torch.device(device).type == "cuda":
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


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


def write_json(path: Path, payload: dict) -> None:
    """Write to a temporary file, fsync, rename: the file is either the old one or the new one, never half."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(payload, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def open_tokens(path: Path, count: int) -> np.ndarray:
    if count == 0:
        return np.zeros(0, dtype=np.uint16)
    return np.memmap(path, dtype=np.uint16, mode="r", shape=(count,))


@contextmanager
def locked(folder: Path):
    """Hold an exclusive lock on `folder` while preparing it, so two runs never write the same cache at once."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        lock = open(folder / ".lock", "w")
    except OSError as e:
        raise DataError(f"cannot write the cache in {folder} ({e.strerror}); choose another --cache_dir") from None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def cut_after_last(data: bytes, marks: tuple[bytes, ...]) -> int:
    """The end of the last `mark` in data (the first mark found wins), or 0."""
    for mark in marks:
        at = data.rfind(mark)
        if at >= 0:
            return at + len(mark)
    return 0


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
    path = folder / f"tokenizer-{vocab_size}.json"
    if path.exists():
        return Tokenizer.load(path)
    say(f"training a {vocab_size}-token BPE tokenizer on {len(text.encode()) / 1e6:.1f} MB of text")
    tokenizer = Tokenizer.train(text, vocab_size)
    tokenizer.save(path)
    return tokenizer


# -------------------------------------------------------------------------------------------------------------------
# a local text file


def check_text_file(path: Path) -> int:
    if not path.exists():
        raise DataError(f"--data {path}: no such file (give 'tinystories' or the path of a .txt file)")
    if not path.is_file():
        raise DataError(f"--data {path}: is a directory, not a text file")
    size = path.stat().st_size
    if size == 0:
        raise DataError(f"--data {path}: the file is empty")
    with open(path, "rb") as f:
        head = f.read(1 << 20)
    if b"\0" in head:
        raise DataError(f"--data {path}: looks binary (it holds NUL bytes), not like a text file")
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head)
    except UnicodeDecodeError:
        raise DataError(f"--data {path}: is not UTF-8 text") from None
    return size


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
    with open(path, "wb") as out, tqdm(total=total, desc=desc, unit="B", unit_scale=True, file=sys.stderr) as bar:
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
        meta = read_json(tokens / "meta.json")
        if meta is None:
            meta = build_file_cache(path, split, size, tokenizer, tokens)
    return Splits(
        train=open_tokens(tokens / "train.bin", meta["train_tokens"]),
        val=open_tokens(tokens / "val.bin", meta["val_tokens"]),
        val_bytes=meta["val_bytes"],
        tokenizer=tokenizer,
        tag=path.name,
    )


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
    retry = Retry(total=RETRIES, backoff_factor=0.5, status_forcelist=(429, 500, 502, 503, 504),
                  allowed_methods=("HEAD", "GET"))  # fmt: skip
    session = requests.Session()
    session.mount("http://", HTTPAdapter(max_retries=retry))
    session.mount("https://", HTTPAdapter(max_retries=retry))
    return session


def unreachable(url: str, error: Exception) -> DataError:
    return DataError(
        f"cannot download {url} ({type(error).__name__}); check the network, point --tinystories_url "
        "(or TINYSTORIES_URL) at a mirror, or give --data a local .txt file"
    )


def remote_file(session: requests.Session, url: str) -> tuple[int, str]:
    """Size and ETag of the file at url."""
    try:
        response = session.head(url, allow_redirects=True, timeout=TIMEOUT)
        response.raise_for_status()
    except requests.RequestException as e:
        raise unreachable(url, e) from None
    if "Content-Length" not in response.headers:
        raise DataError(f"{url} does not say how large it is (no Content-Length); cannot stream it")
    return int(response.headers["Content-Length"]), response.headers.get("ETag", "")


def stream_bytes(session: requests.Session, url: str, start: int, end: int) -> Iterator[bytes]:
    """Bytes [start, end) of url by a Range request, resumed with another where the connection is cut."""
    resumes = 0
    while start < end:
        try:
            headers = {"Range": f"bytes={start}-{end - 1}"}
            with session.get(url, headers=headers, stream=True, timeout=TIMEOUT) as response:
                response.raise_for_status()
                skip = start if response.status_code == 200 else 0  # 200: the server ignored Range, sent it all
                for chunk in response.iter_content(STREAM_PIECE):
                    if skip:
                        chunk, skip = chunk[skip:], max(skip - len(chunk), 0)
                    chunk = chunk[: end - start]
                    if chunk:
                        start += len(chunk)
                        yield chunk
                    if start >= end:
                        return
            raise requests.ConnectionError(f"connection closed at byte {start} of {end}")
        except requests.RequestException as e:
            resumes += 1
            if resumes > RESUMES or isinstance(e, requests.HTTPError):
                raise unreachable(url, e) from None
            say(f"download of {url} cut at byte {start:,}; resuming there")


def file_bytes(session: requests.Session, url: str, start: int, end: int, known: bytes) -> Iterator[bytes]:
    """Bytes [start, end) of url; those within `known`, the file's first bytes fetched earlier, from memory."""
    if start < len(known):
        yield known[start:end]
        start = min(end, len(known))
    if start < end:
        yield from stream_bytes(session, url, start, end)


def extend_stream_cache(
    session: requests.Session,
    url: str,
    folder: Path,
    tokenizer: Tokenizer,
    needed_tokens: int,
    prefix: tuple[bytes, dict | None] = (b"", None),
) -> dict:
    """Tokenize url from where the cache stops until it holds `needed_tokens` tokens (or the whole file).

    `prefix` is the file's first bytes with the size and ETag they were fetched at; they are not fetched again
    while the file on the server is still that one.
    """
    size, etag = remote_file(session, url)
    known, version = prefix
    if version != dict(size=size, etag=etag):
        known = b""
    meta_path, tokens_path = folder / "meta.json", folder / "tokens.bin"
    meta = read_json(meta_path)
    if meta and (meta["size"], meta["etag"]) != (size, etag):
        say(f"{url} changed on the server (size or ETag); its token cache is rebuilt")
        meta = None
    if meta is None:
        meta = dict(url=url, size=size, etag=etag, fingerprint=tokenizer.fingerprint, bytes=0, tokens=0)
        tokens_path.unlink(missing_ok=True)
    pending, fetched = b"", meta["bytes"]
    with open(tokens_path, "ab") as out, tqdm(total=size, initial=meta["bytes"], desc=url.rsplit("/", 1)[-1],
                                              unit="B", unit_scale=True, file=sys.stderr) as bar:  # fmt: skip
        out.truncate(meta["tokens"] * 2)  # tokens written by a run killed before it committed them
        while meta["tokens"] < needed_tokens and meta["bytes"] < size:
            bytes_per_token = meta["bytes"] / meta["tokens"] if meta["tokens"] else BYTES_PER_TOKEN_GUESS
            wanted = int((needed_tokens - meta["tokens"]) * bytes_per_token * 1.1) + STREAM_PIECE
            window_end = min(size, fetched + min(max(wanted - len(pending), STREAM_PIECE), CHUNK_BYTES))
            for chunk in file_bytes(session, url, fetched, window_end, known):
                pending += chunk
                fetched += len(chunk)
                bar.update(len(chunk))
            cut = len(pending) if fetched >= size else cut_after_last(pending, (EOT,))
            if cut == 0:
                continue  # no story has ended yet in what was fetched
            ids = tokenize(tokenizer, decode(pending[:cut], url))
            out.write(ids.tobytes())
            out.flush()
            os.fsync(out.fileno())
            meta.update(bytes=meta["bytes"] + cut, tokens=meta["tokens"] + len(ids))
            write_json(meta_path, meta)  # the commit point
            pending = pending[cut:]
    return meta


def download_prefix(session: requests.Session, url: str, folder: Path, n_bytes: int) -> tuple[bytes, dict | None]:
    """The first n_bytes of url (cut at the last story end), kept as a file for the tokenizer to learn from, with
    the size and ETag of the file they came from (None where that record is missing)."""
    path, version_path = folder / "prefix.txt", folder / "prefix.json"
    if not path.exists():
        size, etag = remote_file(session, url)
        write_json(version_path, dict(size=size, etag=etag))  # first: a prefix never stands with an older record
        data = b"".join(stream_bytes(session, url, 0, min(size, n_bytes)))
        data = data[: cut_after_last(data, (EOT,)) or len(data)]
        fd, tmp = tempfile.mkstemp(dir=folder, prefix="prefix", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    return path.read_bytes(), read_json(version_path)


def load_tinystories(
    *,
    base_url: str,
    version: str,
    vocab_size: int,
    train_tokens: int,
    cache_dir: Path,
    tokenizer: Tokenizer | None = None,
) -> Splits:
    train_name, valid_name = TINYSTORIES_FILES[version]
    train_url, valid_url = (f"{base_url.rstrip('/')}/{name}" for name in (train_name, valid_name))
    folder = cache_dir / "tinystories" / digest(train_url)
    session = http_session()
    with locked(folder):
        prefix = (b"", None)
        if tokenizer is None:
            prefix = download_prefix(session, train_url, folder, TOKENIZER_TRAIN_BYTES)
            tokenizer = cached_tokenizer(folder, prefix[0].decode("utf-8", errors="ignore"), vocab_size)
        train_folder, valid_folder = folder / tokenizer.fingerprint / "train", folder / tokenizer.fingerprint / "valid"
        train_folder.mkdir(parents=True, exist_ok=True)
        valid_folder.mkdir(parents=True, exist_ok=True)
        train = extend_stream_cache(session, train_url, train_folder, tokenizer, train_tokens, prefix)
        valid = extend_stream_cache(session, valid_url, valid_folder, tokenizer, WHOLE_FILE)
    return Splits(
        train=open_tokens(train_folder / "tokens.bin", train["tokens"]),
        val=open_tokens(valid_folder / "tokens.bin", valid["tokens"]),
        val_bytes=valid["bytes"],
        tokenizer=tokenizer,
        tag="tinystories",
    )
