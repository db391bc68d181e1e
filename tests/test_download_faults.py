"""TinyStories from misbehaving servers on 127.0.0.1: web pages, server errors, stalls, dropped connections, Ctrl+C.

What is asserted is what a user meets: the one-line error and how long it took, and what the cache holds
afterwards; a good server after a bad one must give the right tokens and a tokenizer with the full vocabulary.
The server serves the TinyStories samples in tests/data (see SOURCES.md there).
"""

import signal
import subprocess
import sys
import time
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
from http_server import FileServer
from runner import ROOT, SERVED_TRAIN, SERVED_VALID, TINY_MODEL, TRAIN_SAMPLE, make_project

import data
from tokenizer import Tokenizer

TRAIN, VALID = SERVED_TRAIN, SERVED_VALID
TRAIN_BYTES = TRAIN_SAMPLE.read_bytes()
ALL = 10**9  # more tokens than the file has: prepare all of it
READ_TIMEOUT = 1.0


@pytest.fixture(autouse=True)
def quick_faults(monkeypatch):
    monkeypatch.setattr(data, "CHUNK_BYTES", 256 << 10)
    monkeypatch.setattr(data, "TOKENIZER_TRAIN_BYTES", 300_000)
    monkeypatch.setattr(data, "RETRIES", 1)
    monkeypatch.setattr(data, "TIMEOUT", (2, READ_TIMEOUT))
    monkeypatch.setattr(data, "STALLS", 2)
    monkeypatch.setattr(data, "RESUME_PAUSE", 0.05)


def load(
    server: FileServer, cache: Path, tokenizer: Tokenizer | None = None, train_tokens: int = ALL, **floor
) -> data.Splits:
    return data.load_tinystories(base_url=server.url, version="v1", vocab_size=512, train_tokens=train_tokens,
                                 cache_dir=cache, tokenizer=tokenizer, **floor)  # fmt: skip


def kept_files(cache: Path) -> list[Path]:
    """Files in the cache other than the locks."""
    return [p for p in cache.rglob("*") if p.is_file() and p.name != ".lock"]


PAGE = b"<!DOCTYPE html>\n<html><body><h1>Proxy error</h1> Please log in to continue.</body></html>\n"


@pytest.mark.parametrize(
    "answer, what_came",
    [
        ((200, "text/html; charset=utf-8", PAGE), "200 OK, text/html"),
        ((200, "text/plain", PAGE), "no <|endoftext|> in its first"),
        ((500, "text/plain", b"Internal Server Error: database is down"), "500 Internal Server Error, text/plain"),
        ((502, "text/html", b"<html><body>502 Bad Gateway</body></html>"), "502 Bad Gateway, text/html"),
    ],
)
def test_a_bad_answer_is_refused_kept_nowhere_and_a_good_server_then_gives_the_full_tokenizer(
    tmp_path, files, answer, what_came
):
    cache = tmp_path / "cache"
    with FileServer(files, answer=answer) as server:
        started = time.monotonic()
        with pytest.raises(data.DataError) as refused:
            load(server, cache)
        assert time.monotonic() - started < 10
        message = str(refused.value)
        assert "\n" not in message
        assert f"{server.url}/{TRAIN} is not TinyStories text" in message and what_came in message
        assert " ".join(answer[2].decode().split())[:40] in message  # what came back, summarised
        assert kept_files(cache) == []
        server.answer = None
        splits = load(server, cache)
    assert splits.tokenizer.vocab_size == 512
    assert np.array_equal(splits.train, splits.tokenizer.encode_array(TRAIN_BYTES.decode()))


@pytest.mark.timeout(30)
@pytest.mark.parametrize("length", ["abc", "-5", "", str(10**30), "9" * 5000])
def test_a_size_that_is_not_a_size_is_one_line_naming_the_url(tmp_path, files, length):
    with FileServer(files, headers={"Content-Length": length}) as server, pytest.raises(data.DataError) as refused:
        load(server, tmp_path / "cache")
    message = str(refused.value)
    assert f"{server.url}/{TRAIN} gives no usable size (Content-Length: {length[:40]!r})" in message
    assert "\n" not in message and kept_files(tmp_path / "cache") == []


def test_text_that_is_not_utf8_is_refused(tmp_path, files):
    files[TRAIN].write_bytes(TRAIN_BYTES[:5000] + b"\xff\xfe binary \x00" + TRAIN_BYTES[5000:])
    with FileServer(files) as server, pytest.raises(data.DataError, match="not UTF-8 at byte 5,000"):
        load(server, tmp_path / "cache")
    assert kept_files(tmp_path / "cache") == []


def test_a_file_changed_on_the_server_gets_a_new_prefix_and_tokenizer(tmp_path, files, capsys):
    cache = tmp_path / "cache"
    few_stories = b"A cat sat.\n<|endoftext|>\nA dog ran.\n<|endoftext|>\n"
    files[TRAIN].write_bytes(few_stories)
    with FileServer(files) as server:
        small = load(server, cache)
        assert small.tokenizer.vocab_size < 300
        assert f"the text allows only {small.tokenizer.vocab_size} tokens, not 512" in capsys.readouterr().err
        files[TRAIN].write_bytes(TRAIN_BYTES)
        splits = load(server, cache)
    assert splits.tokenizer.vocab_size == 512
    assert np.array_equal(splits.train, splits.tokenizer.encode_array(TRAIN_BYTES.decode()))
    [prefix] = cache.rglob("prefix.txt")
    assert TRAIN_BYTES.startswith(prefix.read_bytes()) and prefix.stat().st_size > 250_000


def test_main_refuses_a_web_page_with_exit_2_and_one_line(tmp_path, files):
    project = make_project(tmp_path)
    with FileServer(files, answer=(200, "text/html", PAGE)) as server:
        result = project.run(*TINY_MODEL, "--data", "tinystories", "--max_steps", "2", "--tinystories_url",
                             server.url, "--out_dir", "RUN")  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert f"{server.url}/{TRAIN} is not TinyStories text" in result.stderr.strip().splitlines()[-1]
    assert not list(project.cache.rglob("prefix.txt")) and not list(project.cache.rglob("*.bin"))


def test_a_stalled_download_fails_within_a_few_read_timeouts(tmp_path, files, tokenizer):
    with FileServer(files, stall_at={TRAIN: (100_000, 99)}) as server:
        started = time.monotonic()
        with pytest.raises(data.DataError) as stalled:
            load(server, tmp_path / "cache", tokenizer)
        elapsed = time.monotonic() - started
    # One read timeout per try: the first try, which brought 100,000 bytes, and STALLS + 1 that brought none.
    assert len(server.gets(TRAIN)) == data.STALLS + 2
    assert (data.STALLS + 1) * READ_TIMEOUT <= elapsed < (data.STALLS + 1) * READ_TIMEOUT + 5
    message = str(stalled.value)
    assert f"cannot download {server.url}/{TRAIN}" in message and "at byte 100,000" in message


def test_a_stall_is_resumed_where_it_stopped(tmp_path, files, tokenizer):
    with FileServer(files, stall_at={TRAIN: (700_001, 1)}) as server:
        splits = load(server, tmp_path / "cache", tokenizer)
    assert np.array_equal(splits.train, tokenizer.encode_array(TRAIN_BYTES.decode()))
    assert 700_001 in [first for first, _ in server.spans(TRAIN)]  # resumed at the first byte not received
    assert server.fetched(TRAIN) == len(TRAIN_BYTES)


def test_a_link_dropping_every_connection_finishes_and_keeps_every_byte(tmp_path, files, tokenizer, monkeypatch):
    monkeypatch.setattr(data, "CHUNK_BYTES", 8 << 20)  # the whole file in one window: every request is a resume
    drop_after = 150_000  # not a multiple of the pieces read, so a cut always falls inside one
    with FileServer(files, drop_after=drop_after) as server:
        splits = load(server, tmp_path / "cache", tokenizer)
    spans = server.spans(TRAIN)
    assert len(spans) == -(-len(TRAIN_BYTES) // drop_after) > 4 * (data.STALLS + 1)  # cuts far past the budget
    assert all(first == before + sent for (before, sent), (first, _) in pairwise(spans))  # none lost
    assert server.fetched(TRAIN) == len(TRAIN_BYTES)
    assert np.array_equal(splits.train, tokenizer.encode_array(TRAIN_BYTES.decode()))


@pytest.mark.timeout(30)
def test_a_server_trickling_a_little_per_connection_fails_on_the_rate_floor(tmp_path, files, tokenizer, monkeypatch):
    monkeypatch.setattr(data, "TIMEOUT", (2, 0.3))
    monkeypatch.setenv("TINYSTORIES_MIN_RATE", "20000")
    monkeypatch.setenv("TINYSTORIES_RATE_WINDOW", "2")
    with FileServer(files, stall_after=2_000) as server:  # about 7 kB/s: 2 MB would take five minutes
        started = time.monotonic()
        with pytest.raises(data.DataError) as slow:
            load(server, tmp_path / "cache", tokenizer)
        elapsed = time.monotonic() - started
    assert len(server.gets(TRAIN)) > data.STALLS + 2  # each try brought bytes, so the budget of stalls never ran out
    assert 2 <= elapsed < 2 + 3
    message = str(slow.value)
    assert f"the download of {server.url}/{TRAIN} is too slow: " in message and "\n" not in message
    rate = float(message.split("too slow: ")[1].split(" kB/s")[0])
    assert 1 < rate < 20 and "under the 20 kB/s it must keep (TINYSTORIES_MIN_RATE)" in message


@pytest.mark.timeout(60)
def test_a_slow_but_steady_link_above_the_floor_finishes(tmp_path, files, tokenizer):
    floor = data.RateFloor(min_rate=200_000, window=1.0)
    with FileServer(files, bytes_per_second=800_000) as server:  # 2.6 s for the train file
        splits = load(server, tmp_path / "cache", tokenizer, rate_floor=floor)
    assert np.array_equal(splits.train, tokenizer.encode_array(TRAIN_BYTES.decode()))


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    "name, value", [("TINYSTORIES_MIN_RATE", "fast"), ("TINYSTORIES_MIN_RATE", "-1"), ("TINYSTORIES_RATE_WINDOW", "0")]
)
def test_a_rate_floor_from_the_environment_that_is_not_a_number_is_one_line(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(data.DataError, match=f"^{name}='{value}' is not a"):
        data.RateFloor.from_environment()


def test_the_tokenizer_prefix_download_shows_progress(tmp_path, files, monkeypatch, capsys):
    monkeypatch.setattr(data, "PROGRESS_DELAY", 0.2)
    with FileServer(files, bytes_per_second=400_000) as server:
        load(server, tmp_path / "cache", train_tokens=1_000)
    bar = [line for line in capsys.readouterr().err.split("\r") if line.startswith(f"tokenizer text from {TRAIN}")]
    assert bar, "no progress bar for the tokenizer's text"
    assert any("kB/s" in line and "<00:0" in line for line in bar)  # rate and time left


def prepare_in_child(url: str, cache: Path, tokenizer_path: Path) -> subprocess.Popen:
    script = (
        "import sys, data; from pathlib import Path; from tokenizer import Tokenizer\n"
        "data.CHUNK_BYTES = 64 << 10\n"
        "try:\n"
        f"    data.load_tinystories(base_url={url!r}, version='v1', vocab_size=512, train_tokens={ALL},\n"
        f"        cache_dir=Path({str(cache)!r}), tokenizer=Tokenizer.load({str(tokenizer_path)!r}))\n"
        "except KeyboardInterrupt:\n"
        "    sys.exit(130)\n"
    )
    return subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stderr=subprocess.PIPE, text=True)


def test_ctrl_c_mid_download_leaves_a_cache_the_next_run_continues(tmp_path, files, tokenizer):
    cache, tokenizer_path = tmp_path / "cache", tmp_path / "tokenizer.json"
    tokenizer.save(tokenizer_path)
    with FileServer(files, bytes_per_second=1_000_000) as server:
        child = prepare_in_child(server.url, cache, tokenizer_path)
        deadline = time.monotonic() + 30
        while not list(cache.glob("tinystories/*/*/train/meta.json")) and time.monotonic() < deadline:
            time.sleep(0.02)
        child.send_signal(signal.SIGINT)
        _, stderr = child.communicate(timeout=10)
        assert child.returncode == 130, stderr[-2000:]
        assert "Traceback" not in stderr
        assert not list(cache.rglob("*.tmp")) and not list(cache.rglob(".building-*"))
        fetched_before = server.fetched(TRAIN)
        assert fetched_before < len(TRAIN_BYTES)  # interrupted mid-download
        server.bytes_per_second = None
        splits = load(server, cache, tokenizer)
        assert server.fetched(TRAIN) - fetched_before < len(TRAIN_BYTES)  # continued, not started over
    assert np.array_equal(splits.train, tokenizer.encode_array(TRAIN_BYTES.decode()))
