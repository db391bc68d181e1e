"""
compare.py on many long runs in seed arms: the time to read them and print the table, and to write the HTML report.

    python bench/bench_compare.py [--arms 3] [--seeds 5] [--evals 10000] [--repeats 3]

Writes `--arms` × `--seeds` run folders of `--evals` evaluations each (run.json and metrics.jsonl as
tracking.RunRecord writes them, with the model's size and tokens/s, each evaluation with a 100-word sample) into a
temporary folder, then times, best of `--repeats`: reading them and building the terminal table (`compare.gather` +
`compare.terminal_table`: arms, their statistics and Welch's t-tests included), and the HTML report from the runs
already read (`report.html_report` + writing the file); then the whole command as a user runs it,
`python compare.py DIR` and `python compare.py DIR --html FILE`, interpreter start and imports included. Targets:
under 2 s for the table, under 5 s for the HTML. As a baseline from the same run, it times parsing the same
metrics files line by line with json.loads, the plain way to read this format.
"""

import argparse
import json
import math
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from machine import describe  # noqa: E402

import compare  # noqa: E402
import report  # noqa: E402

WORDS = "once upon a time there was a little girl named Lily she loved to play in the park with her dog".split()


def write_runs(root: Path, arms: int, seeds: int, evals: int) -> list[Path]:
    rng = random.Random(0)
    folders = []
    for r in range(arms * seeds):
        arm, seed = divmod(r, seeds)
        folder = root / f"arm{arm}" / f"seed{seed}"
        folder.mkdir(parents=True)
        flags = {"dropout": 0.1 * arm, "learning_rate": 1e-3, "max_steps": evals * 10, "seed": 1337 + seed}
        header = {"format": 1, "hypothesis": f"dropout {0.1 * arm:.1f}", "flags": flags, "dataset": "tinystories",
                  "tokenizer": {"fingerprint": "0123456789abcdef", "vocab_size": 4096},
                  "git": {"commit": "0" * 40, "dirty": False}, "clearml": {}, "world_size": 1,
                  "started": f"2026-01-01T00:{r:02d}:00+00:00", "run_id": f"run{r}",
                  "model": {"parameters": 10_000_000, "flops_per_token": 60_000_000}}  # fmt: skip
        (folder / "run.json").write_text(json.dumps(header))
        lines = [json.dumps({"event": "status", "status": "running", "step": 0, "elapsed": 0.0})]
        for i in range(evals):
            loss = 2 + 4 * math.exp(-i / (evals / 5)) + 0.02 * arm + rng.gauss(0, 0.01)
            sample = " ".join(rng.choices(WORDS, k=100))
            lines.append(json.dumps({"event": "eval", "step": i * 10, "tokens": i * 10 * 8192, "elapsed": i * 1.5,
                                     "loss_train": loss - 0.05, "loss_val": loss, "bpb": loss / 1.6, "lr": 1e-3,
                                     "tokens_per_s": 50_000.0, "sample": sample}))  # fmt: skip
        lines.append(json.dumps({"event": "status", "status": "completed", "step": evals * 10, "elapsed": evals * 1.5}))
        (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
        folders.append(folder)
    return folders


def best_time(fn, repeats: int) -> tuple[float, object]:
    best, result = math.inf, None
    for _ in range(repeats):
        started = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - started)
    return best, result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arms", type=int, default=3)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--evals", type=int, default=10_000)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    print(describe())
    with tempfile.TemporaryDirectory() as tmp:
        folders = write_runs(Path(tmp), args.arms, args.seeds, args.evals)
        size = sum((f / "metrics.jsonl").stat().st_size for f in folders) / 1e6
        print(f"{args.arms} arms x {args.seeds} seeds x {args.evals:,} evaluations, {size:.0f} MB of metrics.jsonl")

        def parse_only():
            for f in folders:
                [json.loads(line) for line in (f / "metrics.jsonl").read_text().splitlines()]

        def table():
            comparison = compare.gather([Path(tmp)], None)
            return comparison, compare.terminal_table(comparison)

        def page():
            text = report.html_report(comparison, compare.summary_rows(comparison))
            report.write_page(Path(tmp) / "report.html", text, comparison.runs)

        floor, _ = best_time(parse_only, args.repeats)
        table_s, (comparison, _) = best_time(table, args.repeats)
        assert [len(arm.runs) for arm in comparison.arms] == [args.seeds] * args.arms
        import plotly.graph_objects  # noqa: F401  the import is paid once per process, outside the timing below

        html_s, _ = best_time(page, args.repeats)
        page = (Path(tmp) / "report.html").stat().st_size / 1e6
        command = [sys.executable, str(Path(compare.__file__)), tmp]
        cli_table_s, _ = best_time(lambda: subprocess.run(command, check=True, capture_output=True), args.repeats)
        html_command = [*command, "--html", str(Path(tmp) / "cli.html")]
        cli_html_s, _ = best_time(lambda: subprocess.run(html_command, check=True, capture_output=True), args.repeats)
    print(f"baseline, json.loads line by line:  {floor:.2f} s")
    print(f"table (read + tabulate):   {table_s:.2f} s  ({floor / table_s:.2f}x faster than the baseline)")
    print(f"HTML report (runs read):   {html_s:.2f} s, {page:.1f} MB page")
    print(f"python compare.py DIR:         {cli_table_s:.2f} s  (target < 2 s)")
    print(f"python compare.py DIR --html:  {cli_html_s:.2f} s  (target < 5 s)")


if __name__ == "__main__":
    main()
