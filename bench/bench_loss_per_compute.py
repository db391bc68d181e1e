"""
Loss per compute: validation bits per byte after a fixed wall-clock budget of training, recipe against baseline.

    python bench/bench_loss_per_compute.py [--seconds 120] [--recipe bench/cpu-2min.args]

Each contender is `main.py` trained for `--seconds` on the TinyStories train sample, then measured with
`main.py --eval_only` in one deterministic pass over held-out TinyStories text (the second half of the shared
validation sample by default). The baseline is the plain GPT-2 block with nanoGPT's training defaults at the
shape nanoGPT users run on a CPU; the recipe is the one line of flags in bench/cpu-2min.args. Both run in this
invocation, one after the other, on the same machine.
"""

import argparse
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
# nanoGPT's model and training defaults at the shape of the CPU comparison; evaluation as light as the recipe's.
BASELINE = (
    "--arch gpt2 --bias --n_layer 4 --n_head 4 --n_embd 128 --block_size 256 --batch_size 16 --vocab_size 4096 "
    "--learning_rate 6e-4 --min_lr 6e-5 --warmup_steps 100 --weight_decay 0.1 --beta1 0.9 --beta2 0.95 "
    "--grad_clip 1.0 --dropout 0.0 --eval_interval 100000 --eval_iters 5"
)


def train_and_measure(name: str, flags: str, args: argparse.Namespace, workdir: Path) -> float:
    run_dir = workdir / name
    common = ["--device", "cpu", "--offline", "--cache_dir", str(workdir / "cache"), "--sample_tokens", "0"]
    train = [
        sys.executable, str(ROOT / "main.py"), "--data", str(args.train), "--max_seconds", str(args.seconds),
        "--max_steps", "1000000", "--out_dir", str(run_dir), *common, *shlex.split(flags),
    ]  # fmt: skip
    started = time.monotonic()
    env = {**os.environ, "HOME": str(workdir)}  # no clearml.conf there: offline sessions stay in workdir
    result = subprocess.run(train, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    if result.returncode:
        sys.exit(f"{name} failed:\n{result.stderr[-3000:]}")
    trained = time.monotonic() - started
    evaluate = [
        sys.executable, str(ROOT / "main.py"), "--eval_only", "--resume", str(run_dir), "--data", str(args.valid),
        "--val_fraction", str(args.val_fraction), *common,
    ]  # fmt: skip
    out = subprocess.run(evaluate, check=True, capture_output=True, text=True, env=env).stdout
    loss, bpb = map(float, re.search(r"val_loss=(\S+) val_bpb=(\S+)\s*$", out).groups())
    print(f"{name:9s} val_loss {loss:.4f}  val_bpb {bpb:.4f}  (process wall time {trained:.0f} s)", flush=True)
    return bpb


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=120, help="training budget of each contender")
    p.add_argument("--recipe", type=Path, default=ROOT / "bench" / "cpu-2min.args")
    p.add_argument("--train", type=Path, default=SHARED / "tinystories-train-sample.txt")
    p.add_argument("--valid", type=Path, default=SHARED / "tinystories-valid-sample.txt")
    p.add_argument("--val_fraction", type=float, default=0.5, help="tail of --valid that is measured")
    p.add_argument("--skip_baseline", action="store_true")
    args = p.parse_args()

    recipe = args.recipe.read_text().strip()
    print(f"recipe: {recipe}\nbaseline: {BASELINE}")
    with tempfile.TemporaryDirectory() as tmp:
        recipe_bpb = train_and_measure("recipe", recipe, args, Path(tmp))
        if not args.skip_baseline:
            baseline_bpb = train_and_measure("baseline", BASELINE, args, Path(tmp))
            print(f"recipe / baseline bits per byte: {recipe_bpb / baseline_bpb:.3f}")


if __name__ == "__main__":
    main()
