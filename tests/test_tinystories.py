"""TinyStories over HTTP, against a real server on 127.0.0.1: resume by Range, faults, cache protocol, concurrency.

The server serves the TinyStories samples in tests/data (see SOURCES.md there) under the
names of the real TinyStories files.
"""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from http_server import FileServer
from runner import ROOT, SERVED_TRAIN, SERVED_VALID, TINY_MODEL, TRAIN_SAMPLE, VALID_SAMPLE, make_project

import data
from tokenizer import Tokenizer

TRAIN, VALID = SERVED_TRAIN, SERVED_VALID
TRAIN_BYTES = TRAIN_SAMPLE.read_bytes()
ALL = 10**9  # more tokens than the file has: prepare all of it


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(data, "CHUNK_BYTES", 256 << 10)  # many commits per file, as with the real 1.9 GB one
    monkeypatch.setattr(data, "RETRIES", 1)


def load(server: FileServer, cache: Path, tokenizer: Tokenizer, train_tokens: int = ALL) -> data.Splits:
    return data.load_tinystories(base_url=server.url, version="v1", vocab_size=512, train_tokens=train_tokens,
                                 cache_dir=cache, tokenizer=tokenizer)  # fmt: skip


@pytest.fixture
def reference(tmp_path, files, tokenizer) -> np.ndarray:
    with FileServer(files) as server:
        return np.array(load(server, tmp_path / "reference-cache", tokenizer).train)


def test_whole_file_equals_tokenizing_it_at_once(reference, tokenizer):
    assert np.array_equal(reference, tokenizer.encode_array(TRAIN_BYTES.decode()))


def cut_points() -> list[int]:
    multibyte = next(i for i, b in enumerate(TRAIN_BYTES) if b >= 0x80)
    separator = TRAIN_BYTES.index(b"<|endoftext|>", 500_000)
    return [700_001, multibyte + 1, separator + 5]  # anywhere, inside a UTF-8 character, inside <|endoftext|>


@pytest.mark.parametrize("cut", cut_points())
def test_cut_connection_resumes_by_range_with_identical_tokens(tmp_path, files, tokenizer, reference, cut):
    with FileServer(files, cut_at={TRAIN: (cut, 1)}) as server:
        splits = load(server, tmp_path / "cache", tokenizer)
    assert np.array_equal(splits.train, reference)
    spans = server.spans(TRAIN)
    cut_index = next(i for i, (first, sent) in enumerate(spans) if first + sent == cut)
    assert spans[cut_index + 1][0] == cut  # every byte received before the cut is kept
    assert server.gets(TRAIN)[cut_index + 1].status == 206
    assert server.fetched(TRAIN) == len(TRAIN_BYTES)


def test_server_ignoring_range(tmp_path, files, tokenizer, reference):
    with FileServer(files, cut_at={TRAIN: (900_000, 1)}, ignore_range=True) as server:
        splits = load(server, tmp_path / "cache", tokenizer)
    assert np.array_equal(splits.train, reference)
    assert {r.status for r in server.gets(TRAIN)} == {200}


def test_only_what_is_needed_then_more_by_range_then_nothing(tmp_path, files, tokenizer, reference):
    cache = tmp_path / "cache"
    with FileServer(files) as server:
        first = load(server, cache, tokenizer, train_tokens=20_000)
        fetched_first = server.fetched(TRAIN)
        assert len(first.train) >= 20_000 and fetched_first < len(TRAIN_BYTES) / 3
        again = load(server, cache, tokenizer, train_tokens=20_000)
        assert server.fetched(TRAIN) == fetched_first  # the second identical call downloads nothing
        requests_before = len(server.gets(TRAIN))
        more = load(server, cache, tokenizer, train_tokens=200_000)
    assert np.array_equal(again.train, first.train)
    assert len(more.train) >= 200_000 and np.array_equal(more.train, reference[: len(more.train)])
    continued = server.spans(TRAIN)[requests_before:]
    resumed_at = continued[0][0]
    assert 0 < resumed_at <= fetched_first  # went on by Range where the cache stopped, not from byte 0
    assert fetched_first - resumed_at < 10_000  # fetching again at most the story that was cut off


def test_file_changed_on_the_server_rebuilds_the_cache(tmp_path, files, tokenizer, capsys):
    cache = tmp_path / "cache"
    with FileServer(files) as server:
        load(server, cache, tokenizer, train_tokens=20_000)
        changed = b"A new first story.\n<|endoftext|>\n" + TRAIN_BYTES
        files[TRAIN].write_bytes(changed)
        splits = load(server, cache, tokenizer, train_tokens=ALL)
    assert "changed on the server" in capsys.readouterr().err
    assert np.array_equal(splits.train, tokenizer.encode_array(changed.decode()))


def damage(meta_path: Path, how: str) -> None:
    """Damage the token cache whose record is meta_path, as a crash of the disk or a careless hand would."""
    tokens_bin, meta = meta_path.parent / "tokens.bin", json.loads(meta_path.read_text())
    if how == "tokens.bin cut short":
        with open(tokens_bin, "r+b") as f:
            f.truncate(tokens_bin.stat().st_size // 2 + 1)
    elif how == "meta.json a list":
        meta_path.write_text(json.dumps(list(meta.values())))
    elif how == "meta.json of wrong types":
        meta_path.write_text(json.dumps({**meta, "tokens": str(meta["tokens"]), "bytes": -1}))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["tokens.bin cut short", "meta.json a list", "meta.json of wrong types"])
def test_a_damaged_token_cache_is_said_once_and_made_again(tmp_path, files, tokenizer, reference, capsys, how):
    cache = tmp_path / "cache"
    with FileServer(files) as server:
        load(server, cache, tokenizer, train_tokens=20_000)
        [meta_path] = cache.glob("tinystories/*/*/train/meta.json")
        damage(meta_path, how)
        capsys.readouterr()
        splits = load(server, cache, tokenizer, train_tokens=20_000)
        said = capsys.readouterr().err
        assert np.array_equal(load(server, cache, tokenizer, train_tokens=20_000).train, splits.train)
    assert said.count("is damaged") == 1 and f"the token cache in {meta_path.parent} is damaged (" in said
    assert "it is made again" in said and "Traceback" not in said
    assert len(splits.train) >= 20_000 and np.array_equal(splits.train, reference[: len(splits.train)])
    assert "is damaged" not in capsys.readouterr().err  # made whole: the third load says nothing


@pytest.mark.timeout(60)
def test_a_damaged_tokenizer_prefix_and_tokenizer_are_made_again(tmp_path, files, monkeypatch, capsys):
    monkeypatch.setattr(data, "TOKENIZER_TRAIN_BYTES", 300_000)
    cache = tmp_path / "cache"
    with FileServer(files) as server:
        first = load_training_the_tokenizer(server, cache, train_tokens=1_000)
        [prefix] = cache.rglob("prefix.txt")
        [learned] = cache.rglob("tokenizer-512.json")
        prefix.write_bytes(prefix.read_bytes()[: TRAIN_BYTES.index("’".encode()) + 1])  # inside a UTF-8 character
        capsys.readouterr()
        again = load_training_the_tokenizer(server, cache, train_tokens=1_000)
        assert f"{prefix} is damaged (cut short); it is fetched again" in capsys.readouterr().err
        learned.write_text('{"format": ')
        third = load_training_the_tokenizer(server, cache, train_tokens=1_000)
        assert f"{learned} is not a tokenizer file of this program" in capsys.readouterr().err
    assert first.tokenizer.fingerprint == again.tokenizer.fingerprint == third.tokenizer.fingerprint


def load_training_the_tokenizer(server: FileServer, cache: Path, train_tokens: int = ALL) -> data.Splits:
    return data.load_tinystories(base_url=server.url, version="v1", vocab_size=512, train_tokens=train_tokens,
                                 cache_dir=cache)  # fmt: skip


def test_tokens_start_from_the_tokenizer_prefix_without_fetching_it_again(tmp_path, files, monkeypatch):
    monkeypatch.setattr(data, "TOKENIZER_TRAIN_BYTES", 500_000)
    cache = tmp_path / "cache"
    with FileServer(files) as server:
        splits = load_training_the_tokenizer(server, cache)
    [prefix] = cache.rglob("prefix.txt")
    prefix_bytes = prefix.stat().st_size
    assert TRAIN_BYTES.startswith(prefix.read_bytes()) and 400_000 < prefix_bytes <= 500_000
    (_, sent_for_prefix), *stream = server.spans(TRAIN)
    assert all(first >= prefix_bytes for first, _ in stream)
    # Every byte is fetched once, but for the end of the story that the prefix cut off.
    assert server.fetched(TRAIN) == len(TRAIN_BYTES) + sent_for_prefix - prefix_bytes
    assert np.array_equal(splits.train, splits.tokenizer.encode_array(TRAIN_BYTES.decode()))


def test_a_prefix_from_an_older_file_is_not_used(tmp_path, files, monkeypatch):
    monkeypatch.setattr(data, "TOKENIZER_TRAIN_BYTES", 500_000)
    cache = tmp_path / "cache"
    with FileServer(files) as server:
        load_training_the_tokenizer(server, cache, train_tokens=1_000)
        changed = b"A new first story.\n<|endoftext|>\n" + TRAIN_BYTES
        files[TRAIN].write_bytes(changed)
        splits = load_training_the_tokenizer(server, cache)
    assert np.array_equal(splits.train, splits.tokenizer.encode_array(changed.decode()))


def prepare_in_child(url: str, cache: Path, tokenizer_path: Path) -> subprocess.Popen:
    script = (
        "import sys, data; from pathlib import Path; from tokenizer import Tokenizer\n"
        "data.CHUNK_BYTES = 64 << 10\n"
        f"data.load_tinystories(base_url={url!r}, version='v1', vocab_size=512, train_tokens={ALL},\n"
        f"    cache_dir=Path({str(cache)!r}), tokenizer=Tokenizer.load({str(tokenizer_path)!r}))\n"
    )
    return subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stderr=subprocess.DEVNULL)


def test_kill_9_mid_download_leaves_a_cache_the_next_run_completes(tmp_path, files, tokenizer, reference):
    cache, tokenizer_path = tmp_path / "cache", tmp_path / "tokenizer.json"
    tokenizer.save(tokenizer_path)
    with FileServer(files, bytes_per_second=2_000_000) as server:
        child = prepare_in_child(server.url, cache, tokenizer_path)
        committed = list(cache.glob("tinystories/*/*/train/meta.json"))
        deadline = time.monotonic() + 30
        while not committed and time.monotonic() < deadline:
            time.sleep(0.02)
            committed = list(cache.glob("tinystories/*/*/train/meta.json"))
        time.sleep(0.2)
        child.send_signal(signal.SIGKILL)
        child.wait()
        server.bytes_per_second = None
        partial = data.read_json(committed[0])["bytes"]
        assert 0 < partial < len(TRAIN_BYTES)
        splits = load(server, cache, tokenizer)
    assert np.array_equal(splits.train, reference)


def test_two_runs_preparing_one_cache_at_once(tmp_path, files, tokenizer, reference):
    cache, tokenizer_path = tmp_path / "cache", tmp_path / "tokenizer.json"
    tokenizer.save(tokenizer_path)
    with FileServer(files, bytes_per_second=8_000_000) as server:
        children = [prepare_in_child(server.url, cache, tokenizer_path) for _ in range(2)]
        assert [child.wait(timeout=60) for child in children] == [0, 0]
        splits = load(server, cache, tokenizer)
    assert np.array_equal(splits.train, reference)
    assert server.fetched(TRAIN) == len(TRAIN_BYTES)  # the second run waited, then found it prepared


def test_unreachable_server_is_one_clear_error(tmp_path, tokenizer):
    started = time.monotonic()
    with pytest.raises(data.DataError, match=r"http://127\.0\.0\.1:9/TinyStories-train\.txt.*--tinystories_url"):
        data.load_tinystories(base_url="http://127.0.0.1:9", version="v1", vocab_size=512, train_tokens=1000,
                              cache_dir=tmp_path, tokenizer=tokenizer)  # fmt: skip
    assert time.monotonic() - started < 10


def test_main_streams_tinystories_resumes_and_reuses(tmp_path):
    """The whole program against a 42 MB train file whose first connection is cut after 1.5 MB."""
    project = make_project(tmp_path)
    big = tmp_path / "train-x20.txt"
    big.write_bytes(TRAIN_BYTES * 20)
    files = {TRAIN: big, VALID: VALID_SAMPLE}
    flags = [*TINY_MODEL, "--data", "tinystories", "--max_steps", "20", "--eval_interval", "10", "--eval_iters", "3"]
    with FileServer(files, cut_at={TRAIN: (1_500_000, 1)}) as server:
        first = project.run(*flags, "--tinystories_url", server.url, "--out_dir", "RUN1")
        assert first.returncode == 0, first.stderr[-3000:]
        fetched = server.fetched(TRAIN)
        assert fetched < 0.6 * big.stat().st_size
        spans = server.spans(TRAIN)
        assert any(first + sent == 1_500_000 for first, sent in spans)  # the cut connection
        assert any(first == 1_500_000 for first, _ in spans)  # resumed where it was cut
        second = project.run(*flags, "--tinystories_url", server.url, "--out_dir", "RUN2")
        assert second.returncode == 0, second.stderr[-3000:]
        assert server.fetched(TRAIN) - fetched < 0.01 * big.stat().st_size
    first_session, _ = project.sessions()
    assert "tinystories" in first_session.task["tags"]
