"""A local text file as --data: what is not a regular file, a text too small for the vocabulary asked, what Ctrl+C
or kill -9 while tokenizing leave in the cache, a damaged cache, and what a full disk leaves (for TinyStories too).

The text is the TinyStories train sample in tests/data (see SOURCES.md there), repeated to take a few seconds.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from http_server import FileServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from runner import ROOT, STARTED, TRAIN_SAMPLE, VALID_SAMPLE

import data
from errors import UsageError
from tokenizer import Tokenizer

COPIES = 2  # of the sample: long enough to interrupt while it is tokenized


def load(path: Path, cache: Path, tokenizer: Tokenizer | None = None, vocab_size: int = 512) -> data.Splits:
    return data.load_text_file(path, vocab_size=vocab_size, val_fraction=0.1, cache_dir=cache, tokenizer=tokenizer)


def error_of(path: Path, cache: Path) -> str:
    """The DataError that loading path raises; in a thread, so a loader stuck opening a FIFO fails the test."""
    errors = []

    def attempt():
        try:
            load(path, cache)
        except data.DataError as e:
            errors.append(str(e))

    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(timeout=10)
    assert errors, "no DataError within 10 s"
    return errors[0]


def test_a_directory_a_fifo_and_a_device_each_get_their_own_message(tmp_path):
    fifo = tmp_path / "pipe.txt"
    os.mkfifo(fifo)
    cache = tmp_path / "cache"
    assert error_of(tmp_path, cache) == f"--data {tmp_path}: is a directory, not a text file"
    assert "is a named pipe (FIFO)" in error_of(fifo, cache)
    assert error_of(Path("/dev/zero"), cache).startswith("--data /dev/zero: is a character device, not a text file")


@pytest.mark.timeout(30)
def test_a_data_error_is_a_usage_error_that_main_reports_in_one_line(tmp_path):
    with pytest.raises(UsageError, match="no such file"):
        load(tmp_path / "missing.txt", tmp_path / "cache")


def test_a_text_with_fewer_merges_than_asked_uses_and_says_its_real_vocabulary(tmp_path, capsys):
    path = tmp_path / "small.txt"
    path.write_text("A cat sat on a mat.\n<|endoftext|>\nA dog ran to a log.\n<|endoftext|>\n" * 40)
    for _ in range(2):  # trained, then from the cache
        splits = load(path, tmp_path / "cache", vocab_size=4096)
        real = splits.tokenizer.vocab_size
        assert real < 4096 and max(splits.train.max(), splits.val.max()) < real
        assert f"the text allows only {real} tokens, not 4096" in capsys.readouterr().err


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "stories.txt"
    path.write_bytes(TRAIN_SAMPLE.read_bytes() * COPIES)
    return path


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.json"
    Tokenizer.train(TRAIN_SAMPLE.read_text()[:300_000], 512).save(path)
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory, text_file, tokenizer_path) -> data.Splits:
    return load(text_file, tmp_path_factory.mktemp("reference"), Tokenizer.load(tokenizer_path))


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "how", ["train.bin cut short", "val.bin cut short", "meta.json of wrong types", "meta.json null"]
)
def test_a_damaged_file_cache_is_said_once_and_made_again(tmp_path, text_file, tokenizer_path, reference, capsys, how):
    cache, tokenizer = tmp_path / "cache", Tokenizer.load(tokenizer_path)
    load(text_file, cache, tokenizer)
    [meta_path] = cache.glob("files/*/*/meta.json")
    meta = json.loads(meta_path.read_text())
    if how.endswith("cut short"):
        with open(meta_path.parent / how.split()[0], "r+b") as f:
            f.truncate(100)
    else:
        meta_path.write_text("null" if how == "meta.json null" else json.dumps({**meta, "train_tokens": 1.5}))
    capsys.readouterr()
    assert_same_tokens(load(text_file, cache, tokenizer), reference)
    said = capsys.readouterr().err
    assert said.count("is damaged") == 1 and f"the token cache in {meta_path.parent} is damaged (" in said
    assert_same_tokens(load(text_file, cache, tokenizer), reference)
    assert "is damaged" not in capsys.readouterr().err


FULL_DISK_CHILD = """
import errno, json, sys
from pathlib import Path
import numpy as np
import data
from tokenizer import Tokenizer

data.CHUNK_BYTES = 256 << 10  # several commits before the disk is full
source, cache, tokenizer, out = sys.argv[1], Path(sys.argv[2]), Tokenizer.load(sys.argv[3]), Path(sys.argv[4])
try:
    if source.startswith("http://"):
        splits = data.load_tinystories(base_url=source, version="v1", vocab_size=512, train_tokens=10**9,
                                       cache_dir=cache, tokenizer=tokenizer)
    else:
        splits = data.load_text_file(source, vocab_size=512, val_fraction=0.1, cache_dir=cache, tokenizer=tokenizer)
except OSError as e:
    left = [str(p) for p in cache.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".building-")]
    records = [data.read_json(p) for p in cache.rglob("meta.json")]
    whole = [data.tokens_in(p.parent / "tokens.bin") >= data.read_json(p)["tokens"] for p in cache.rglob("meta.json")]
    print(json.dumps(dict(error=errno.errorcode[e.errno], line=e.strerror, left=left, records=records, whole=whole)))
    sys.exit(4)
np.save(out / "train.npy", splits.train)
np.save(out / "val.npy", splits.val)
"""


def on_a_full_disk_then_with_room(tmp_path: Path, source: str, tokenizer_path: Path) -> tuple[dict, data.Splits]:
    """Prepare `source` with the cache on a 1 MB tmpfs (in a private mount namespace), then again once the same
    tmpfs has room: what the full disk raised and left, and the tokens prepared after."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "true"]).returncode != 0:
        pytest.fail("this test needs `unshare -rm` (util-linux) to mount a small tmpfs")
    disk, out = tmp_path / "small-disk", tmp_path / "out"
    disk.mkdir()
    out.mkdir()
    prepare = f'"{sys.executable}" -c "$0" {source} {disk}/cache {tokenizer_path} {out}'
    script = (f"mount -t tmpfs -o size=1m tmpfs {disk} && {{ {prepare}; echo exit $?; }} && "
              f"mount -o remount,size=32m {disk} && {prepare}")  # fmt: skip
    result = subprocess.run(["unshare", "-rm", "sh", "-c", script, FULL_DISK_CHILD], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)  # fmt: skip
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    first, exit_code = result.stdout.strip().splitlines()[-2:]
    assert exit_code == "exit 4", result.stdout
    splits = data.Splits(np.load(out / "train.npy"), np.load(out / "val.npy"), 0, Tokenizer.load(tokenizer_path), "")
    return json.loads(first), splits


@pytest.mark.timeout(60)
def test_a_full_disk_while_tokenizing_a_file_leaves_the_cache_whole(tmp_path, text_file, tokenizer_path, reference):
    full, splits = on_a_full_disk_then_with_room(tmp_path, str(text_file), tokenizer_path)
    assert full["error"] == "ENOSPC" and full["left"] == [] and full["records"] == []
    folder = full["line"].split("token cache in ")[1].split(";")[0]
    assert full["line"] == (f"the disk is full: no room left for the token cache in {folder}; what it held before is "
                            "kept whole. Free some space or choose another --cache_dir")  # fmt: skip
    assert_same_tokens(splits, reference)


@pytest.mark.timeout(60)
def test_a_full_disk_while_streaming_tinystories_keeps_what_was_committed(tmp_path, files, tokenizer_path):
    tokenizer = Tokenizer.load(tokenizer_path)
    with FileServer(files) as server:
        full, splits = on_a_full_disk_then_with_room(tmp_path, server.url, tokenizer_path)
    assert full["error"] == "ENOSPC" and full["left"] == [] and full["line"].startswith("the disk is full: ")
    [train] = full["records"]  # the disk filled up while the train file was tokenized
    assert 0 < train["tokens"] and train["bytes"] < train["size"] and full["whole"] == [True]
    assert np.array_equal(splits.train, tokenizer.encode_array(TRAIN_SAMPLE.read_text()))
    assert np.array_equal(splits.val, tokenizer.encode_array(VALID_SAMPLE.read_text()))


URL, EMPTY = "http://mirror/TinyStories-train.txt", Tokenizer([])  # a tokenizer of bytes alone
ANY_VALUE = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=20))
COUNT = st.integers(0, 40)
STREAM_RECORDS = st.builds(
    lambda size, etag, tokens: dict(url=URL, size=size, etag=etag, fingerprint=EMPTY.fingerprint, bytes=size // 2,
                                    tokens=tokens),  # fmt: skip
    COUNT, st.text(max_size=5), COUNT,
)  # fmt: skip
FILE_RECORDS = st.builds(
    lambda size, train, val: dict(source="/data/stories.txt", size=size, split=size // 2,
                                  fingerprint=EMPTY.fingerprint, train_tokens=train, val_tokens=val, val_bytes=size),
    COUNT, COUNT, COUNT,
)  # fmt: skip


def mutated(record: dict, field: str | None, value, drop: bool) -> dict:
    """`record` with one field dropped or set to `value` (none where `field` is None)."""
    if field in record:
        if drop:
            del record[field]
        else:
            record[field] = value
    return record


RECORDS = st.one_of(
    st.binary(max_size=200),
    st.builds(mutated, STREAM_RECORDS | FILE_RECORDS, st.sampled_from([None, *data.STREAM_RECORD, *data.FILE_RECORD]),
              ANY_VALUE | st.integers(-3, 80), st.booleans()),
)  # fmt: skip


TOKEN_FILES = {"tokens.bin": "tokens", "train.bin": "train_tokens", "val.bin": "val_tokens"}  # and their counts


def token_files(folder: Path, record, sizes: tuple[int, int, int] | None) -> None:
    """tokens.bin, train.bin and val.bin of `sizes` bytes, or (None) of the sizes the record gives where it can."""
    for at, (name, count) in enumerate(TOKEN_FILES.items()):
        given_count = record.get(count) if isinstance(record, dict) else None
        fits = type(given_count) is int and 0 <= given_count < 1000
        size = sizes[at] if sizes else 2 * given_count if fits else 0
        (folder / name).write_bytes(b"\0" * size)


@pytest.mark.timeout(120)
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(record=RECORDS, sizes=st.none() | st.tuples(st.integers(0, 81), st.integers(0, 81), st.integers(0, 81)))
def test_any_cache_record_is_trusted_only_where_it_matches_its_files(tmp_path, record, sizes):
    """Whatever a cache's meta.json holds, its reader returns a record whose counts its files hold, or None."""
    folder = tmp_path / "cache"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    (folder / "meta.json").write_bytes(record if isinstance(record, bytes) else json.dumps(record).encode())
    token_files(folder, record, sizes)
    streamed = data.stream_record(folder, URL, EMPTY)
    if streamed is not None:
        assert all(type(streamed[name]) is kind for name, kind in data.STREAM_RECORD.items())
        assert 0 <= streamed["tokens"] <= data.tokens_in(folder / "tokens.bin")
        assert 0 <= streamed["bytes"] <= streamed["size"] and streamed["fingerprint"] == EMPTY.fingerprint
    on_file = data.file_record(folder, EMPTY)
    if on_file is not None:
        assert all(type(on_file[name]) is kind for name, kind in data.FILE_RECORD.items())
        assert on_file["train_tokens"] == data.tokens_in(folder / "train.bin")
        assert on_file["val_tokens"] == data.tokens_in(folder / "val.bin")
    else:
        assert not folder.exists()  # a record not trusted is removed with what it described


def tokenize_in_child(path: Path, cache: Path, tokenizer_path: Path) -> subprocess.Popen:
    """A process group tokenizing path with a pool of workers, as a run does, that exits 130 on Ctrl+C."""
    script = (
        "import sys, data, tokenizer; from pathlib import Path\n"
        "data.CHUNK_BYTES = 256 << 10\n"
        "tokenizer.PARALLEL_MIN_CHARS = 0\n"
        "try:\n"
        f"    data.load_text_file(Path({str(path)!r}), vocab_size=512, val_fraction=0.1,\n"
        f"        cache_dir=Path({str(cache)!r}), tokenizer=tokenizer.Tokenizer.load({str(tokenizer_path)!r}))\n"
        "except KeyboardInterrupt:\n"
        "    print('interrupted', file=sys.stderr)\n"
        "    sys.exit(130)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)  # fmt: skip
    STARTED.append(child)  # killed after the test if it is still running
    return child


def wait_until_tokenizing(child: subprocess.Popen, cache: Path) -> Path:
    """The child's temporary folder, once tokens are being written there by its pool of workers."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and child.poll() is None:
        building = [b for b in cache.glob("files/*/.building-*") if (b / "train.bin").exists()]
        if building and (building[0] / "train.bin").stat().st_size and len(psutil.Process(child.pid).children()) > 1:
            return building[0]
        time.sleep(0.01)
    raise AssertionError(f"the child never started tokenizing with workers (exit code {child.poll()})")


def assert_same_tokens(splits: data.Splits, reference: data.Splits) -> None:
    assert np.array_equal(splits.train, reference.train) and np.array_equal(splits.val, reference.val)


def test_ctrl_c_to_the_process_group_while_tokenizing(tmp_path, text_file, tokenizer_path, reference):
    cache = tmp_path / "cache"
    child = tokenize_in_child(text_file, cache, tokenizer_path)
    wait_until_tokenizing(child, cache)
    workers = psutil.Process(child.pid).children()
    os.killpg(child.pid, signal.SIGINT)  # what Ctrl+C in a terminal does
    _, stderr = child.communicate(timeout=10)
    assert child.returncode == 130 and stderr.strip() == "interrupted", stderr[-3000:]  # no worker traceback
    assert not any(worker.is_running() for worker in workers)
    assert not list(cache.rglob(".building-*")) and not list(cache.rglob("*.tmp"))
    assert_same_tokens(load(text_file, cache, Tokenizer.load(tokenizer_path)), reference)


def test_kill_9_while_tokenizing_leaves_a_folder_the_next_run_removes(tmp_path, text_file, tokenizer_path, reference):
    cache = tmp_path / "cache"
    child = tokenize_in_child(text_file, cache, tokenizer_path)
    building = wait_until_tokenizing(child, cache)
    os.killpg(child.pid, signal.SIGKILL)
    child.communicate(timeout=10)
    assert building.exists()
    assert_same_tokens(load(text_file, cache, Tokenizer.load(tokenizer_path)), reference)
    assert not building.exists() and not list(cache.rglob(".building-*"))
