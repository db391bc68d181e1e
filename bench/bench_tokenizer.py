"""
Tokenizer speed against tiktoken, given the same merges and regex, in the same process.

    python bench/bench_tokenizer.py [--text PATH] [--vocab_size 4096] [--repeats 5]

Prints the time to train the vocabulary on the text, then encoding throughput in MB of text per second: one core
(our `encode_array`, tiktoken's `encode`) and all cores (our `encode_many`, tiktoken's `encode_batch`, which uses
threads), each the best of several repeats after a first, cold, pass. It checks both give the same ids.
"""

import argparse
import sys
import time
from pathlib import Path

import tiktoken

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from machine import describe  # noqa: E402

from tokenizer import SPLIT_PATTERN, Tokenizer  # noqa: E402

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinystories-train-sample.txt"


def best_time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--text", type=Path, default=SAMPLE)
    p.add_argument("--vocab_size", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()

    text = args.text.read_text(encoding="utf-8")
    megabytes = len(text.encode()) / 1e6
    print(f"machine: {describe()}\ntext: {args.text.name}, {megabytes:.2f} MB, vocabulary {args.vocab_size}")

    started = time.perf_counter()
    ours = Tokenizer.train(text, args.vocab_size)
    print(f"Tokenizer.train: {time.perf_counter() - started:.2f} s")

    ranks = {token: rank for rank, token in enumerate(ours.token_bytes)}
    theirs = tiktoken.Encoding("bench", pat_str=SPLIT_PATTERN, mergeable_ranks=ranks,
                               special_tokens={"<|endoftext|>": ours.eot_id})  # fmt: skip
    started = time.perf_counter()
    ids = ours.encode_array(text)
    print(f"first (cold) encode: {megabytes / (time.perf_counter() - started):.1f} MB/s")
    same = ids.tolist() == theirs.encode(text, allowed_special="all")
    print(f"same ids as tiktoken: {same}; round trip exact: {ours.decode(ids) == text}")

    parts = [text] * 4  # 8 MB in four calls' worth, enough for encode_many to use worker processes
    rows = [
        ("one core", lambda: ours.encode_array(text), lambda: theirs.encode(text, allowed_special="all")),
        ("all cores", lambda: ours.encode_many(parts), lambda: theirs.encode_batch(parts, allowed_special="all")),
    ]
    sizes = {"one core": megabytes, "all cores": 4 * megabytes}
    print(f"{'':10s} {'ours MB/s':>10s} {'tiktoken MB/s':>14s} {'ratio':>6s}")
    for name, our_fn, their_fn in rows:
        our_time, their_time = best_time(our_fn, args.repeats), best_time(their_fn, args.repeats)
        size = sizes[name]
        print(f"{name:10s} {size / our_time:10.1f} {size / their_time:14.1f} {their_time / our_time:5.2f}x")


if __name__ == "__main__":
    main()
