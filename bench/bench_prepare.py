"""
Preparing a large TinyStories-like file: text tokenized per second, and peak memory.

    python bench/bench_prepare.py [--megabytes 400]

Writes a synthetic file (the shared train sample repeated) of the given size in a temporary folder, then runs
data.load_text_file on it in a child process, so the peak resident memory (ru_maxrss) is that of the preparation
alone. The tokenizer is trained first and passed in, as a resumed run does, so the figure is tokenization only.
"""

import argparse
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from machine import describe  # noqa: E402

SAMPLE = ROOT.parent / "shared" / "data" / "tinystories-train-sample.txt"
CHILD = """
import sys, time, resource
from pathlib import Path
import data
from tokenizer import Tokenizer
tokenizer = Tokenizer.load(sys.argv[2])
started = time.perf_counter()
splits = data.load_text_file(sys.argv[1], vocab_size=0, val_fraction=0.01, cache_dir=Path(sys.argv[3]),
                             tokenizer=tokenizer)
seconds = time.perf_counter() - started
print(seconds, len(splits.train) + len(splits.val), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--megabytes", type=int, default=400)
    args = p.parse_args()
    print(f"machine: {describe()}")
    sample = SAMPLE.read_bytes()
    with tempfile.TemporaryDirectory() as tmp:
        big = Path(tmp) / "big.txt"
        with open(big, "wb") as f:
            for _ in range(args.megabytes * 1_000_000 // len(sample) + 1):
                f.write(sample)
        size = big.stat().st_size
        sys.path.insert(0, str(ROOT))
        from tokenizer import Tokenizer

        Tokenizer.train(sample.decode(), 4096).save(Path(tmp) / "tokenizer.json")
        command = [sys.executable, "-c", CHILD, str(big), str(Path(tmp) / "tokenizer.json"), str(Path(tmp) / "cache")]
        out = subprocess.run(command, cwd=ROOT, check=True, capture_output=True, text=True)
        seconds, tokens, max_rss_kb = out.stdout.split()
        rss = int(max_rss_kb) / 1024
        own = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        print(f"file: {size / 1e6:.0f} MB, {int(tokens):,} tokens in {float(seconds):.1f} s")
        print(f"throughput: {size / 1e6 / float(seconds):.1f} MB/s of text")
        print(f"peak resident memory of the preparing process: {rss:.0f} MB (largest child: {own:.0f} MB)")


if __name__ == "__main__":
    main()
