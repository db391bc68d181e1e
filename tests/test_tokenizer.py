"""The byte-level BPE: exact round trips, merges checked by hand, files, fingerprints.

Some tests read the TinyStories train sample in tests/data (see SOURCES.md there).
"""

import json

import numpy as np
import pytest
import tiktoken
from runner import TRAIN_SAMPLE

from tokenizer import SPLIT_PATTERN, Tokenizer

SAMPLE = TRAIN_SAMPLE.read_text(encoding="utf-8")[:300_000]


@pytest.fixture(scope="module")
def trained() -> Tokenizer:
    return Tokenizer.train(SAMPLE, 512)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "Once upon a time, there was a little cat.",
        "Ünïcödé façade, naïve café; 日本語のテキスト; Ελληνικά",
        "emoji 🐱‍👤🚀👍🏽 and flags 🇫🇷",
        "tabs\tand\r\nnewlines\n\n   three spaces   and _under_scores__ 1234567 ²³",
        "The end.\n<|endoftext|>\nOnce<|endoftext|><|endoftext|> <|endoftext",
    ],
)
def test_round_trip(trained, text):
    ids = trained.encode(text)
    assert trained.decode(ids) == text
    assert all(0 <= i < trained.vocab_size for i in ids)


def test_end_of_text_is_one_token(trained):
    ids = trained.encode("a.\n<|endoftext|>\nB")
    assert ids.count(trained.eot_id) == 1
    assert trained.eot_id == trained.vocab_size - 1


def test_merges_by_hand():
    # words: "aaab" x3 (after the regex split "aaab", " aaab", " aaab") -> bytes a=97, b=98, space=32
    tok = Tokenizer.train("aaab aaab aaab", 256 + 1 + 3)
    # pair counts: (97,97) 6, (97,98) 3, (32,97) 2 -> first merge (a, a) = 256
    # then words [256, 97, 98] and [32, 256, 97, 98]: (256,97) 3, (97,98) 3 -> tie, smaller pair (97, 98) = 257
    # then [256, 257] x3 -> (256, 257) 3 beats (32, 256) 2 -> 258
    assert tok.merges == [(97, 97), (97, 98), (256, 257)]
    assert tok.encode("aaab") == [258]
    assert tok.encode(" aaab") == [32, 258]
    assert tok.encode("aab") == [256, 98]


def test_vocab_size_too_small_or_too_large():
    with pytest.raises(ValueError, match="257"):
        Tokenizer.train("hello", 256)
    with pytest.raises(ValueError, match="65536"):
        Tokenizer.train("hello", 70000)


def test_training_is_deterministic_and_vocab_full(trained):
    again = Tokenizer.train(SAMPLE, 512)
    assert again.merges == trained.merges and again.fingerprint == trained.fingerprint
    assert trained.vocab_size == 512
    assert Tokenizer.train(SAMPLE, 600).fingerprint != trained.fingerprint


def test_save_and_load(tmp_path, trained):
    path = tmp_path / "tokenizer.json"
    trained.save(path)
    loaded = Tokenizer.load(path)
    assert loaded.fingerprint == trained.fingerprint
    assert loaded.encode(SAMPLE[:5000]) == trained.encode(SAMPLE[:5000])
    assert [p.name for p in tmp_path.iterdir()] == ["tokenizer.json"]  # no temporary file left behind


def test_load_rejects_foreign_files(tmp_path):
    (tmp_path / "other.json").write_text(json.dumps({"model": {"type": "BPE"}}))
    with pytest.raises(ValueError, match="not a tokenizer file"):
        Tokenizer.load(tmp_path / "other.json")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ValueError, match="not a tokenizer file"):
        Tokenizer.load(tmp_path / "broken.json")


def test_encode_many_equals_encode(trained, monkeypatch):
    texts = [SAMPLE[i : i + 40_000] for i in range(0, 200_000, 40_000)]
    monkeypatch.setattr("tokenizer.PARALLEL_MIN_CHARS", 1)  # force the worker processes
    arrays = trained.encode_many(texts)
    assert [a.tolist() for a in arrays] == [trained.encode(t) for t in texts]
    assert all(a.dtype == np.uint16 for a in arrays)


def test_same_ids_as_tiktoken_with_the_same_merges(trained):
    """tiktoken runs GPT-2's algorithm in Rust; given our merges and regex it must produce our ids."""
    ranks = {token: rank for rank, token in enumerate(trained.token_bytes)}
    reference = tiktoken.Encoding(
        "ours", pat_str=SPLIT_PATTERN, mergeable_ranks=ranks, special_tokens={"<|endoftext|>": trained.eot_id}
    )
    text = SAMPLE[:100_000].replace("   ", "  ")  # runs of 3+ spaces are the one place the two pre-splits differ
    assert trained.encode(text) == reference.encode(text, allowed_special="all")
