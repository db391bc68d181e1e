"""
A byte-level BPE tokenizer, trained from scratch: no tokenizer library, no torch.

Design choices:
- GPT-2's scheme: text is pre-split into words (letters, digits, punctuation runs, whitespace), and merges
  happen inside a word over its UTF-8 bytes, so every string round-trips exactly.
- The pre-split is two-level for speed: `str.split(" ")` cuts the text into pieces (each keeping the space
  before it) at C speed, and GPT-2's regex splits each distinct piece once. This equals the regex over the whole
  text except inside runs of three or more spaces.
- `<|endoftext|>` is one special token, after the merges; TinyStories ends every story with it.
- Training counts distinct words once, then merges the most frequent pair again and again, updating pair counts
  only in the words that hold the merged pair; a heap with lazy deletion finds the next best pair. Ties go to
  the smallest pair of ids, so training is deterministic.
- Encoding caches each distinct piece's ids: 2 MB of TinyStories has about 23,000 distinct pieces, so encoding
  is mostly `str.split` and dictionary look-ups done in C (`map`, `chain`). Large inputs use all cores: worker
  processes that ignore Ctrl+C (the main process kills them), so an interrupt prints no worker traceback. Each
  worker has a pipe of its own and one text at a time, with no lock shared between processes: multiprocessing.Pool
  shares its queues' locks, and a worker killed while sending its result left one held, so `terminate()` hung.
- The JSON file holds the merges; the fingerprint is a digest of everything that decides the ids.
"""

import hashlib
import heapq
import json
import multiprocessing
import multiprocessing.connection
import os
import re
import signal
import weakref
from collections import Counter, defaultdict
from collections.abc import Iterable
from itertools import chain, pairwise, repeat
from pathlib import Path

import numpy as np

import atomic

# Words: a contraction, an optional space and letters, digits, or other symbols (underscore included), or spaces.
SPLIT_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?[^\W\d_]+| ?\d+| ?(?:[^\s\w]|_)+|\s+(?!\S)|\s+"""
UNMERGEABLE = 1 << 62  # the rank of a pair that no merge makes
CACHE_LIMIT = 1_000_000  # distinct pieces kept; past this the cache starts over, so memory stays bounded
PARALLEL_MIN_CHARS = 4_000_000  # below this, starting worker processes costs more than it saves
FORMAT = "gpt-from-scratch-bpe-1"


class Tokenizer:
    SPECIAL_TOKENS = ("<|endoftext|>",)

    def __init__(self, merges: list[tuple[int, int]]):
        self.merges = [tuple(pair) for pair in merges]
        self.ranks = {pair: 256 + i for i, pair in enumerate(self.merges)}  # a merge's rank is its new id
        self.token_bytes = [bytes([i]) for i in range(256)]
        for a, b in self.merges:
            self.token_bytes.append(self.token_bytes[a] + self.token_bytes[b])
        self.special_ids = {s: len(self.token_bytes) + i for i, s in enumerate(self.SPECIAL_TOKENS)}
        self.pattern = re.compile(SPLIT_PATTERN)
        self.workers = None
        self._reset_cache()

    @property
    def vocab_size(self) -> int:
        return len(self.token_bytes) + len(self.SPECIAL_TOKENS)

    @property
    def eot_id(self) -> int:
        return self.special_ids["<|endoftext|>"]

    @property
    def fingerprint(self) -> str:
        canonical = json.dumps({"format": FORMAT, "pattern": SPLIT_PATTERN, "merges": self.merges,
                                "special": self.SPECIAL_TOKENS})  # fmt: skip
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    # ---------------------------------------------------------------------------------------------------------------
    # training

    @classmethod
    def train(cls, text: str, vocab_size: int) -> "Tokenizer":
        smallest = 256 + len(cls.SPECIAL_TOKENS)
        if not smallest <= vocab_size <= 65536:
            raise ValueError(f"vocab_size must be from {smallest} (bytes + special tokens) to 65536, not {vocab_size}")
        pattern = re.compile(SPLIT_PATTERN)
        first, *rest = text.split(" ")
        pieces = Counter(" " + piece for piece in rest)
        pieces[first] += 1
        counts = Counter()
        for piece, n in pieces.items():
            for part in piece.split(cls.SPECIAL_TOKENS[0]):
                for word in pattern.findall(part):
                    counts[word] += n
        words = [list(word.encode("utf-8")) for word in counts]
        freqs = list(counts.values())
        return cls(merge_pairs(words, freqs, vocab_size - smallest))

    # ---------------------------------------------------------------------------------------------------------------
    # encoding and decoding

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def encode_array(self, text: str) -> np.ndarray:
        """The ids of `text` as a uint16 array, assembled by numpy from each piece's cached ids."""
        first, *rest = text.split(" ")
        rows = np.fromiter(map(self.piece_rows.get, rest, repeat(0)), dtype=np.int64, count=len(rest))
        unknown = np.flatnonzero(rows == 0)
        if len(unknown):
            if len(self.piece_rows) + len(unknown) > CACHE_LIMIT:
                self._reset_cache()
                unknown = np.arange(len(rest))
            rows[unknown] = [self._piece_row(rest[i]) for i in unknown.tolist()]
        flat, starts, lengths = self._table()
        counts = lengths[rows]
        ends = np.cumsum(counts)
        positions = np.arange(ends[-1] if len(ends) else 0) + np.repeat(starts[rows] - (ends - counts), counts)
        return np.concatenate([np.array(self._encode_piece(first), dtype=np.uint16), flat[positions]])

    def _piece_row(self, piece: str) -> int:
        """The cache row of a piece that had a space before it, added on first sight."""
        row = self.piece_rows.get(piece)
        if row is None:
            row = self.piece_rows[piece] = len(self.piece_ids)
            self.piece_ids.append(self._encode_piece(" " + piece))
            self.table = None
        return row

    def _table(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """All cached pieces' ids in one flat array, with each piece's start and length."""
        if self.table is None:
            lengths = np.fromiter(map(len, self.piece_ids), dtype=np.int64, count=len(self.piece_ids))
            flat = np.fromiter(chain.from_iterable(self.piece_ids), dtype=np.uint16, count=int(lengths.sum()))
            self.table = flat, np.cumsum(lengths) - lengths, lengths
        return self.table

    def _reset_cache(self) -> None:
        self.piece_rows: dict[str, int] = {}
        self.piece_ids: list[tuple[int, ...]] = [()]  # row 0 is "not cached yet"
        self.word_ids: dict[str, list[int]] = {}
        self.table = None

    def _encode_piece(self, piece: str) -> tuple[int, ...]:
        ids = []
        for i, part in enumerate(piece.split(self.SPECIAL_TOKENS[0])):
            if i:
                ids.append(self.eot_id)
            for word in self.pattern.findall(part):
                if word not in self.word_ids:
                    self.word_ids[word] = self._encode_word(word)
                ids.extend(self.word_ids[word])
        return tuple(ids)

    def _encode_word(self, word: str) -> list[int]:
        ids = list(word.encode("utf-8"))
        while len(ids) > 1:
            best = min(pairwise(ids), key=lambda pair: self.ranks.get(pair, UNMERGEABLE))
            if best not in self.ranks:
                break
            ids = merge(ids, best, self.ranks[best])
        return ids

    def encode_many(self, texts: list[str]) -> list[np.ndarray]:
        """[encode_array(t) for t in texts], over all cores when the input is large."""
        count = min(len(texts), os.cpu_count() or 1)
        if count < 2 or sum(map(len, texts)) < PARALLEL_MIN_CHARS:
            return [self.encode_array(t) for t in texts]
        if self.workers is None:  # kept for later calls, so the workers' caches stay warm
            self.workers = Workers(self.merges, count)
            weakref.finalize(self, self.workers.kill)
        try:
            return self.workers.encode(texts)
        except BaseException:  # Ctrl+C included: stop the workers now, not when the program exits
            self.workers.kill()
            self.workers = None
            raise

    def decode(self, ids: Iterable[int]) -> str:
        specials = {i: s.encode() for s, i in self.special_ids.items()}
        data = b"".join(specials[i] if i in specials else self.token_bytes[i] for i in map(int, ids))
        return data.decode("utf-8", errors="replace")

    # ---------------------------------------------------------------------------------------------------------------
    # files

    def to_json(self) -> str:
        payload = {"format": FORMAT, "pattern": SPLIT_PATTERN, "special_tokens": list(self.SPECIAL_TOKENS),
                   "merges": self.merges}  # fmt: skip
        return json.dumps(payload)

    @classmethod
    def from_json(cls, text: str, where: str = "the tokenizer") -> "Tokenizer":
        """The tokenizer in `text` (as to_json writes it); ValueError naming `where` for anything else."""
        try:
            payload = json.loads(text)
            if payload["format"] != FORMAT or payload["pattern"] != SPLIT_PATTERN:
                raise ValueError("another tokenizer format")
            if tuple(payload["special_tokens"]) != cls.SPECIAL_TOKENS:
                raise ValueError("other special tokens")
            merges = [(int(a), int(b)) for a, b in payload["merges"]]
            if any(not (0 <= a < 256 + i and 0 <= b < 256 + i) for i, (a, b) in enumerate(merges)):
                raise ValueError("a merge refers to a token not yet made")
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{where} is not a tokenizer file of this program ({e})") from None
        return cls(merges)

    def save(self, path: str | Path) -> None:
        """Write the JSON whole or not at all (see atomic.py)."""
        atomic.replace(Path(path), lambda f: f.write(self.to_json().encode("utf-8")))

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, ValueError) as e:
            raise ValueError(f"{path} is not a tokenizer file of this program ({e})") from None
        return cls.from_json(text, str(path))


def merge(ids: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """Replace every non-overlapping occurrence of `pair` in `ids`, left to right, by `new_id`."""
    out, i, n = [], 0, len(ids)
    while i < n:
        if i + 1 < n and ids[i] == pair[0] and ids[i + 1] == pair[1]:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def merge_pairs(words: list[list[int]], freqs: list[int], n_merges: int) -> list[tuple[int, int]]:
    """The BPE merges: the most frequent adjacent pair over all words, `n_merges` times."""
    pair_counts: dict[tuple[int, int], int] = defaultdict(int)
    where: dict[tuple[int, int], set[int]] = defaultdict(set)
    for w, (ids, freq) in enumerate(zip(words, freqs, strict=True)):
        for pair in pairwise(ids):
            pair_counts[pair] += freq
            where[pair].add(w)
    heap = [(-count, pair) for pair, count in pair_counts.items()]
    heapq.heapify(heap)
    merges = []
    while len(merges) < n_merges and heap:
        neg_count, pair = heapq.heappop(heap)
        if pair_counts.get(pair, 0) != -neg_count:
            continue  # stale entry: the count changed since it was pushed
        if neg_count == 0:
            break
        new_id = 256 + len(merges)
        merges.append(pair)
        changed = set()
        for w in where.pop(pair):
            old, freq = words[w], freqs[w]
            new = merge(old, pair, new_id)
            for p in pairwise(old):
                pair_counts[p] -= freq
                changed.add(p)
            for p in pairwise(new):
                pair_counts[p] += freq
                where[p].add(w)
                changed.add(p)
            words[w] = new
        del pair_counts[pair]
        changed.discard(pair)
        for p in changed:
            if pair_counts[p] > 0:
                heapq.heappush(heap, (-pair_counts[p], p))
    return merges


class Workers:
    """Processes that encode texts for Tokenizer.encode_many, one text at a time each, over a pipe of their own."""

    def __init__(self, merges: list[tuple[int, int]], count: int):
        context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else None)
        self.processes, self.pipes = [], []
        for _ in range(count):
            ours, theirs = context.Pipe()
            process = context.Process(target=_serve, args=(theirs, merges), daemon=True)
            process.start()
            theirs.close()
            self.processes.append(process)
            self.pipes.append(ours)

    def encode(self, texts: list[str]) -> list[np.ndarray]:
        """The ids of each text, in order; each worker gets the next text as soon as it has sent its last."""
        results, todo, busy = [None] * len(texts), iter(enumerate(texts)), {}
        for pipe in self.pipes:
            self._give_next(pipe, todo, busy)
        while busy:
            for pipe in multiprocessing.connection.wait(list(busy)):
                try:
                    results[busy.pop(pipe)] = pipe.recv()
                except EOFError:
                    raise RuntimeError("a tokenizer worker process ended while encoding") from None
                self._give_next(pipe, todo, busy)
        return results

    @staticmethod
    def _give_next(pipe, todo, busy: dict) -> None:
        index, text = next(todo, (None, None))
        if text is not None:
            pipe.send(text)
            busy[pipe] = index

    def kill(self) -> None:
        for process in self.processes:
            process.kill()
        for process in self.processes:
            process.join()
        for pipe in self.pipes:
            pipe.close()


def _serve(pipe, merges: list[tuple[int, int]]) -> None:
    # Ctrl+C reaches the whole process group; the main process handles it and kills the workers. SIGTERM must end a
    # worker even where the parent had its own handler when it forked.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    tokenizer = Tokenizer(merges)
    while True:
        try:
            text = pipe.recv()
        except EOFError:  # the main process closed its end
            return
        pipe.send(tokenizer.encode_array(text))
