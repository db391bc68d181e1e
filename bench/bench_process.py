"""
How long a short run takes from start to exit, and what the end of the process costs.

    python bench/bench_exit.py [--repeats 5]

A 2-step run of a tiny model on the start of tests/data's train sample, in a temporary folder with its own HOME
(an offline ClearML session), started two ways in alternation: `python main.py ...`, which freezes the objects
before the interpreter ends (gc.freeze), and the same main() called from `python -c`, which leaves the last
garbage collection to the interpreter. Prints the median wall time of each and their ratio.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from machine import describe  # noqa: E402

FLAGS = ["--device", "cpu", "--n_layer", "2", "--n_head", "2", "--n_embd", "64", "--block_size", "64",
         "--batch_size", "16", "--vocab_size", "512", "--sample_tokens", "20", "--max_steps", "2",
         "--eval_interval", "10", "--eval_iters", "2", "--offline"]  # fmt: skip
WITHOUT_FREEZE = "import sys; sys.path.insert(0, sys.argv[1]); import main; sys.exit(main.main(sys.argv[2:]))"


def timed(command: list[str], env: dict) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, env=env)
    return time.perf_counter() - started


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    print(describe())
    with tempfile.TemporaryDirectory() as work:
        text = Path(work) / "stories.txt"
        text.write_bytes((ROOT / "tests" / "data" / "tinystories-train-sample.txt").read_bytes()[:200_000])
        env = {**os.environ, "HOME": work, "OMP_NUM_THREADS": "1"}
        run = [*FLAGS, "--data", str(text), "--cache_dir", str(Path(work) / "cache")]
        subprocess.run(
            [sys.executable, str(ROOT / "main.py"), *run, "--out_dir", f"{work}/warm"],
            check=True,
            capture_output=True,
            env=env,
        )  # fmt: skip  (the token cache, made once)
        frozen, plain = "main.py (gc.freeze at exit)", "main() from python -c"
        times = {frozen: [], plain: []}
        for i in range(args.repeats):
            times[frozen].append(timed([sys.executable, str(ROOT / "main.py"), *run, "--out_dir", f"{work}/a{i}"], env))
            times[plain].append(
                timed([sys.executable, "-c", WITHOUT_FREEZE, str(ROOT), *run, "--out_dir", f"{work}/b{i}"], env)
            )
    medians = {name: statistics.median(values) for name, values in times.items()}
    for name, value in medians.items():
        print(f"{name:32s} median {value:.2f} s of {args.repeats}: {', '.join(f'{v:.2f}' for v in times[name])}")
    print(f"a short run ends {medians[plain] - medians[frozen]:.2f} s sooner ({medians[plain] / medians[frozen]:.2f}x)")


if __name__ == "__main__":
    main()
