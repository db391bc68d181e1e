"""
One contender of bench/gpu.sh's loss-per-second comparison: main.py trains for a fixed time, five of its steps
are profiled, then main.py --eval_only measures bits per byte on held-in and held-out text.

    python bench/gpu_train.py --json PATH [--trace PATH] [--held_in FILE] [--held_out FILE] -- MAIN_PY_FLAGS...

- main.py runs in this process (`main.main(argv)`, as `python main.py argv` runs it), so the three runs share one
  start-up, one CUDA context and the compiled code; its own output goes to stdout and stderr as usual.
- Profiling: a global optimizer-step hook (`register_optimizer_step_post_hook`) drives a torch.profiler schedule,
  so whatever loop calls `optimizer.step()` is profiled at its own steps: the first `--profile_after` steps
  (compilation, the --max_seconds probe, the first training steps) are skipped, two warm up, five are recorded.
  The trace is written where --trace says and summarised by trace_summary.py.
- Held-in: the validation split of the training file (main.py's last --val_fraction, never trained on); held-out:
  a whole other file (`--eval_split all`). Each is one deterministic pass, `--eval_only --resume RUN`.
- The run's own record (metrics.jsonl) gives the curve: each evaluation's step, tokens, seconds and bits per byte.
Writes one JSON object with all of that to --json; exits with main.py's first nonzero exit code.
"""

import argparse
import contextlib
import io
import json
import re
import sys
from pathlib import Path

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.profiler import ProfilerActivity, profile, schedule

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import trace_summary  # noqa: E402

import main  # noqa: E402

PROFILED_STEPS, WARMUP_STEPS = 5, 2


class Tee(io.TextIOBase):
    """Writes to a stream and keeps a copy, so what main.py prints can be both shown and read."""

    def __init__(self, stream):
        self.stream, self.copy = stream, io.StringIO()

    def write(self, text: str) -> int:
        self.copy.write(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()


def train_profiled(argv: list[str], trace: Path | None, skip: int) -> tuple[int, str, bool]:
    """main.main(argv) with `PROFILED_STEPS` of its optimizer steps profiled: exit code, its stdout, whether a
    trace was written."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    written = []

    def export(prof) -> None:
        if trace is not None:
            prof.export_chrome_trace(str(trace))
            written.append(trace)

    when = schedule(skip_first=skip, wait=0, warmup=WARMUP_STEPS, active=PROFILED_STEPS, repeat=1)
    tee = Tee(sys.stdout)
    with profile(activities=activities, schedule=when, on_trace_ready=export) as prof:
        hook = register_optimizer_step_post_hook(lambda optimizer, args, kwargs: prof.step())
        try:
            with contextlib.redirect_stdout(tee):
                code = main.main(argv)
        finally:
            hook.remove()
    return code, tee.copy.getvalue(), bool(written)


def evaluate(run: Path, data: Path, extra: list[str], common: list[str]) -> dict:
    """`main.py --eval_only --resume run --data data`: its loss and bits per byte, or its exit code."""
    tee = Tee(sys.stdout)
    with contextlib.redirect_stdout(tee):
        code = main.main(["--eval_only", "--resume", str(run), "--data", str(data), *extra, *common])
    found = re.search(r"val_loss=(\S+) val_bpb=(\S+)\s*$", tee.copy.getvalue())
    if code or not found:
        return {"exit_code": code or 1}
    return {"exit_code": 0, "file": str(data), "loss": float(found[1]), "bpb": float(found[2])}


def record(run: Path) -> dict:
    """The run's evaluations from its metrics.jsonl: step, tokens, seconds since the start, bits per byte."""
    curve = []
    with contextlib.suppress(OSError), open(run / "metrics.jsonl", encoding="utf-8") as f:
        for line in f:
            event = json.loads(line)
            if event.get("event") == "eval":
                curve.append({k: event.get(k) for k in ("step", "tokens", "elapsed", "bpb", "loss_val")})
    return {"curve": curve}


def trained_figures(stdout: str) -> dict:
    """What main.py said about the run: training tokens, the step count --max_seconds chose and the step time."""
    figures = {}
    if found := re.search(r"([\d,]+) training tokens", stdout):
        figures["training_tokens"] = int(found[1].replace(",", ""))
    if found := re.search(r"(\d+) ms a step .*?--max_steps (\d+)", stdout):
        figures["probe_ms_per_step"], figures["max_steps"] = int(found[1]), int(found[2])
    if found := re.search(r"compiling took ([\d.]+) s", stdout):
        figures["compile_s"] = float(found[1])
    return figures


def flag(argv: list[str], name: str) -> str | None:
    """The value of `--name` in argv, if given."""
    return argv[argv.index(name) + 1] if name in argv[:-1] else None


def run(args: argparse.Namespace) -> dict:
    out_dir = flag(args.main_flags, "--out_dir")
    if out_dir is None:
        sys.exit("gpu_train.py: main.py's flags must name --out_dir, the run that is then evaluated")
    code, stdout, traced = train_profiled(args.main_flags, args.trace, args.profile_after)
    result = {"exit_code": code, **trained_figures(stdout), **record(Path(out_dir))}
    result["profile"] = trace_summary.summarize(trace_summary.read_trace(args.trace)) if traced else None
    if code:
        return result
    common = [
        f for name in ("--device", "--cache_dir") if (value := flag(args.main_flags, name)) for f in (name, value)
    ]
    common += ["--offline", "--sample_tokens", "0"]
    result["held_in"] = evaluate(Path(out_dir), args.held_in, [], common)
    if args.held_out is not None:
        result["held_out"] = evaluate(Path(out_dir), args.held_out, ["--eval_split", "all"], common)
    return result


def main_cli() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path, required=True, help="where the figures are written")
    p.add_argument("--trace", type=Path, help="where the profiler's Chrome trace is written (.json or .json.gz)")
    p.add_argument("--profile_after", type=int, default=30, help="optimizer steps before the profiled ones")
    p.add_argument("--held_in", type=Path, help="the training file, whose validation split is measured")
    p.add_argument("--held_out", type=Path, help="a file never trained on, measured whole")
    p.add_argument("main_flags", nargs=argparse.REMAINDER, help="-- then main.py's flags")
    args = p.parse_args()
    args.main_flags = args.main_flags[1:] if args.main_flags[:1] == ["--"] else args.main_flags
    if args.held_in is None:
        args.held_in = Path(flag(args.main_flags, "--data") or "")
    result = run(args)
    args.json.write_text(json.dumps(result, indent=1))
    codes = [result["exit_code"]] + [result[k]["exit_code"] for k in ("held_in", "held_out") if k in result]
    sys.exit(next((c for c in codes if c), 0))


if __name__ == "__main__":
    main_cli()
