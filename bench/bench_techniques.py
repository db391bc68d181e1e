"""
Each optional technique switched on alone against the CPU recipe, three seeds each, judged with its seed noise.

    python bench/bench_techniques.py [--steps 1200] [--seeds 1 2 3] [--parallel 2] [--only NAME ...]
    python bench/bench_techniques.py --combine embed_norm x0_mix zero_init_proj embedding_lr   # together

Every arm is `main.py RECIPE FLAG --max_steps 1200 --seeds 1 2 3`, RECIPE being bench/cpu-2min.args as this table
first measured it (`plain_recipe`: no --embedding_lr, --arch modern's default techniques off), on the TinyStories
train sample of tests/data, one seed group per arm (main.py's --seeds), in --workdir (resumable: a finished group is
read again, a stopped one continued). Then:
- held-in: the arms' Loss/val and BPB at their last evaluation (the train file's own validation split), the
  verdict of compare.py against the recipe's arm (Welch's t-test over the seeds: difference ± its standard error,
  p, confirmed at p < 0.01);
- held-out: each seed's bits per byte over the whole validation sample of tests/data (`main.py --eval_only
  --eval_split all`), with the same test;
- tokens/s: each run's mean over its evaluations, arm against recipe. With --parallel 2 two runs share the
  machine's two cores (one thread each), so this column is rough; bench/bench_technique_step.py times the step in
  one process, alternating rounds, which is the figure to trust for speed.
Prints one markdown table; the recipe's own line gives its absolute figures.
"""

import argparse
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import arms  # noqa: E402
import compare  # noqa: E402
from model import ARCH_DEFAULTS  # noqa: E402

DATA = ROOT / "tests" / "data"
TECHNIQUES = {
    "zero_init_proj": "--zero_init_proj",
    "zero_init_head": "--zero_init_head",
    "embed_norm": "--embed_norm",
    "x0_mix": "--x0_mix",
    "value_embeds": "--value_embeds 1",
    "unet_skips": "--unet_skips",
    "logit_softcap": "--logit_softcap 15",
    "embedding_lr": "--embedding_lr 0.03",
    "head_lr": "--head_lr 0.003",
    "scalar_lr": "--scalar_lr 0.02",
}


def plain_recipe(recipe: list[str]) -> list[str]:
    """The recipe as this table first measured it, which its defaults then followed: no separate embedding rate,
    and --arch modern's default techniques off, so each arm switches one on."""
    cut = recipe.index("--embedding_lr") if "--embedding_lr" in recipe else len(recipe)
    return [*recipe[:cut], *recipe[cut + 2 :], *(f"--no-{name}" for name in ARCH_DEFAULTS["modern"])]


def arm_command(flags: str, args: argparse.Namespace, folder: Path) -> list[str]:
    if (folder / "group.json").is_file():
        return [sys.executable, str(ROOT / "main.py"), "--resume", str(folder)]
    recipe = plain_recipe((ROOT / "bench" / "cpu-2min.args").read_text().split())
    return [
        sys.executable, str(ROOT / "main.py"), "--data", str(DATA / "tinystories-train-sample.txt"), "--device", "cpu",
        "--offline", "--cache_dir", str(args.workdir / "cache"), *recipe, "--max_steps", str(args.steps),
        "--eval_interval", str(args.steps // 4), "--sample_tokens", "0", *shlex.split(flags),
        "--seeds", *map(str, args.seeds), "--out_dir", str(folder),
    ]  # fmt: skip


def run_arms(arms_to_run: dict[str, str], args: argparse.Namespace) -> None:
    """Every arm's seed group, --parallel groups at a time, each process on one thread."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HOME": str(args.workdir)}  # offline sessions stay in workdir
    waiting, running = list(arms_to_run.items()), []
    while waiting or running:
        while waiting and len(running) < args.parallel:
            name, flags = waiting.pop(0)
            log = open(args.workdir / f"{name}.log", "w")  # noqa: SIM115 (closed when the group ends)
            process = subprocess.Popen(arm_command(flags, args, args.workdir / name), stdout=log, stderr=log, env=env)
            running.append((name, process, log))
            print(f"started {name}", file=sys.stderr, flush=True)
        name, process, log = running.pop(0)
        process.wait()
        log.close()
        if process.returncode:
            sys.exit(f"{name}: main.py exited {process.returncode}; see {args.workdir / name}.log")


def held_out_bpb(run: Path, args: argparse.Namespace) -> float:
    command = [sys.executable, str(ROOT / "main.py"), "--eval_only", "--resume", str(run), "--device", "cpu",
               "--data", str(DATA / "tinystories-valid-sample.txt"), "--eval_split", "all", "--offline"]  # fmt: skip
    env = {**os.environ, "HOME": str(args.workdir)}
    out = subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout
    return float(re.search(r"val_bpb=(\S+)\s*$", out).group(1))


def arm_figures(arm: arms.Arm, args: argparse.Namespace) -> dict:
    last = min(int(run.steps[-1]) for run in arm.runs)
    speeds = [run.tokens_per_s for run in arm.runs if run.tokens_per_s]
    return {
        "loss": arm.values_at("Loss/val", last),
        "bpb": arm.values_at("BPB", last),
        "held_out": np.array([held_out_bpb(run.path, args) for run in arm.runs]),
        "tokens_per_s": float(np.mean(speeds)) if speeds else float("nan"),
        "step": last,
    }


def verdict_text(values: np.ndarray, baseline: np.ndarray, metric: str, step: int) -> str:
    verdict = arms.Verdict(metric, step, values, baseline, None, arms.welch_p(values, baseline))
    return verdict.text()


def table(names: list[str], figures: dict[str, dict]) -> str:
    base = figures["recipe"]
    lines = [
        "| arm | held-in Loss/val | held-in BPB | verdict (held-in Loss/val) | held-out BPB | verdict (held-out BPB) | "
        "tokens/s × recipe |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name in names:
        f = figures[name]
        cells = [f"{f[k].mean():.4f} ± {f[k].std(ddof=1):.4f}" for k in ("loss", "bpb")]
        held_out = f"{f['held_out'].mean():.4f} ± {f['held_out'].std(ddof=1):.4f}"
        if name == "recipe":
            verdicts = ["baseline", "baseline"]
        else:
            verdicts = [verdict_text(f["loss"], base["loss"], "Loss/val", f["step"]),
                        verdict_text(f["held_out"], base["held_out"], "BPB", f["step"])]  # fmt: skip
        speed = f"{f['tokens_per_s'] / base['tokens_per_s']:.2f}"
        lines.append(f"| {name} | {cells[0]} | {cells[1]} | {verdicts[0]} | {held_out} | {verdicts[1]} | {speed} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--parallel", type=int, default=2, help="seed groups run at once, one thread each")
    p.add_argument("--workdir", type=Path, default=ROOT / "runs" / "techniques")
    p.add_argument("--only", nargs="*", choices=TECHNIQUES, default=None, help="these techniques (default: all)")
    p.add_argument("--combine", nargs="*", choices=TECHNIQUES, default=None, help="also an arm of these together")
    args = p.parse_args()
    args.workdir = args.workdir.resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)
    arms_to_run = {"recipe": "", **{name: TECHNIQUES[name] for name in args.only or TECHNIQUES}}
    if args.combine:
        arms_to_run["+".join(args.combine)] = " ".join(TECHNIQUES[name] for name in args.combine)
    run_arms(arms_to_run, args)
    comparison = compare.gather([args.workdir / name for name in arms_to_run], args.workdir / "recipe")
    by_folder = {arm.first.path.parent.name: arm for arm in comparison.arms}
    figures = {name: arm_figures(by_folder[name], args) for name in arms_to_run}
    print(f"recipe: {(ROOT / 'bench' / 'cpu-2min.args').read_text().strip()} --max_steps {args.steps}; "
          f"seeds {' '.join(map(str, args.seeds))}; runs in {args.workdir}")  # fmt: skip
    print(table(list(arms_to_run), figures))


if __name__ == "__main__":
    main()
