"""
How long a short run takes from start to exit, and what main.py's two gc.freeze() calls save.

    python bench/bench_process.py [--repeats 5]

A 2-step run of a tiny model on the start of tests/data's train sample, in a temporary folder with its own HOME
(an offline ClearML session), started three ways in turn: `python main.py ...`, which imports with the garbage
collector off and then freezes what the imports made, and freezes again before the interpreter ends; the same
main() called from `python -c` with the freeze at the end only; and with neither. Prints the median wall time of
each and the ratios.
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
CALL_MAIN = "import gc, sys; sys.path.insert(0, sys.argv[1]); import main; code = main.main(sys.argv[2:]); "
EXIT_FREEZE_ONLY = CALL_MAIN + "gc.freeze(); sys.exit(code)"
NO_FREEZE = CALL_MAIN + "sys.exit(code)"


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
        ways = {
            "python main.py (both freezes)": [sys.executable, str(ROOT / "main.py")],
            "main() with the exit freeze only": [sys.executable, "-c", EXIT_FREEZE_ONLY, str(ROOT)],
            "main() without either": [sys.executable, "-c", NO_FREEZE, str(ROOT)],
        }
        times = {name: [] for name in ways}
        for i in range(args.repeats):
            for j, (name, command) in enumerate(ways.items()):
                times[name].append(timed([*command, *run, "--out_dir", f"{work}/{j}-{i}"], env))
    medians = {name: statistics.median(values) for name, values in times.items()}
    for name, value in medians.items():
        print(f"{name:34s} median {value:.2f} s of {args.repeats}: {', '.join(f'{v:.2f}' for v in times[name])}")
    both, exit_only, neither = medians.values()
    print(
        f"the freeze after the imports: {exit_only - both:.2f} s sooner ({exit_only / both:.2f}x); the freeze at "
        f"exit: {neither - exit_only:.2f} s ({neither / exit_only:.2f}x); both: {neither / both:.2f}x"
    )


if __name__ == "__main__":
    main()
