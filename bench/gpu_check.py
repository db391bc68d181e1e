"""
What a first run on a GPU needs measured, in one command, inside a time budget; bench/gpu.sh runs it, and its header
holds the plan (each phase's estimate and limit).

    bash bench/gpu.sh [--budget 480] [--train_seconds 60] [--skip PHASE,...] [--data FILE] [--held_out FILE]
                      [--wheels DIR] [--out DIR]
    bash bench/gpu.sh --cpu     # the dry run: every phase at tiny shapes on the CPU, in tens of seconds

Design choices:
- Every phase is a child process in its own process group, its output in its own log, killed at its limit; the
  next phase starts only if its estimate fits in what is left of --budget. A phase that does not fit is skipped and
  named; the loss-per-second pair runs both or neither (one loss without its baseline compares nothing).
- Nothing is downloaded. The baseline is this program's own GPT-2 block with AdamW (`--arch gpt2 --optimizer
  adamw`, nanoGPT's learning rates); the data are the repository's tests/data files unless --data says otherwise.
  main.py needs clearml: where it is not installed, --wheels DIR installs it from wheels in DIR (pip download).
- Compiled code is cached in this run's own folder, shared by its phases: compile times are those of a cold
  start, and the training runs reuse what the step phase compiled at the same shape.
- TORCH_LOGS=recompiles,graph_breaks for every phase: its log lines are counted per phase.
- Output: progress on stderr; the one line of figures last on stdout; with --out (default $OUT) the details:
  gpu-check.json (every figure), gpu-check.log (every phase's output), gpu-check.txt (the line) and each
  contender's profiler trace (trace-NAME.json.gz).
- Exit: 0 when every phase that ran passed; 1 when one failed or was stopped at its limit; 2 for a bad argument or
  no CUDA device; 130 on Ctrl+C or SIGTERM (the running phase's processes are killed, the line still printed).
"""

import argparse
import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import trace_summary  # noqa: E402

TRAIN_FILE = ROOT / "tests" / "data" / "tinystories-train-sample.txt"
HELD_OUT_FILE = ROOT / "tests" / "data" / "tinystories-valid-sample.txt"
TEST_FILES = (
    "tests/test_model.py",
    "tests/test_batches.py",
)  # the files whose tests take a `device` (run here with -k cuda)
GPU_SHAPE = "--n_layer 6 --n_head 6 --n_embd 384 --block_size 256 --batch_size 32 --vocab_size 4096"
DRY_RUN_SHAPE = "--n_layer 2 --n_head 2 --n_embd 32 --block_size 32 --batch_size 8 --vocab_size 512"
BASELINE_FLAGS = "--arch gpt2 --optimizer adamw --learning_rate 6e-4 --min_lr 6e-5"
EVALUATIONS = 10  # per training run, so the record shows the curve (and any overfitting of a small text)
DRY_RUN_BYTES = (256_000, 32_000)  # the dry run trains on the start of the training file, holds out this much
PROFILE_WINDOW = 7  # optimizer steps gpu_train.py's profiler warms up (2) and records (5): no evaluation among them


@dataclass(frozen=True)
class Phase:
    name: str
    gpu: tuple[float, float]  # seconds: estimate and limit on one H100/H200 (training: plus --train_seconds)
    cpu: tuple[float, float]  # the same for the dry run


PREFLIGHT_LIMIT = 60
PHASES = (
    Phase("tests", (45, 90), (8, 60)),
    Phase("step-default", (60, 120), (6, 60)),
    Phase("train-ours", (55, 120), (12, 90)),
    Phase("train-baseline", (55, 120), (12, 90)),
    Phase("step-124M", (100, 170), (6, 60)),
)
PREFLIGHT = """
import json, platform, sys
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/bench"]
import torch, devices, machine
info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.cuda.is_available(),
        "machine": machine.describe()}
if info["cuda"]:
    props = torch.cuda.get_device_properties(0)
    info.update(card=props.name, memory_gib=round(props.total_memory / 2**30, 1), bf16=torch.cuda.is_bf16_supported(),
                capability=f"{props.major}.{props.minor}", peak_flops=devices.peak_flops(props.name))
try:
    import clearml
    info["clearml"] = clearml.__version__
except ImportError:
    info["clearml"] = None
print(json.dumps(info))
"""


class PhaseFailed(Exception):
    """A phase ran and failed: the message says how in one line, `output` holds the end of what it printed."""

    def __init__(self, message: str, output: str = ""):
        super().__init__(message)
        self.output = output


class Stop:
    """SIGINT and SIGTERM stop the check (KeyboardInterrupt), except while a phase's process is being started:
    then the signal waits until that process exists, so it is killed rather than left running."""

    def __init__(self):
        self.deferring, self.pending = False, False

    def __call__(self, signum, frame):
        if self.deferring:
            self.pending = True
        else:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def deferred(self):
        self.deferring = True
        try:
            yield
        finally:
            self.deferring = False

    def take_pending(self) -> None:
        """Raise the KeyboardInterrupt of a signal that came while deferred."""
        if self.pending:
            self.pending = False
            raise KeyboardInterrupt


STOP = Stop()


class Check:
    """The budget, the work folder, and what each phase found."""

    def __init__(self, args: argparse.Namespace, work: Path):
        self.args, self.work, self.started = args, work, time.monotonic()
        self.device = "cpu" if args.cpu else "cuda"
        self.python = sys.executable  # the interpreter gpu.sh chose, for every phase
        self.results: dict[str, dict] = {}
        self.env = os.environ | {
            "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
            "PYTHONUNBUFFERED": "1",
            "TORCH_LOGS": "recompiles,graph_breaks",
            "TORCHINDUCTOR_CACHE_DIR": str(work / "inductor-cache"),
            "TRITON_CACHE_DIR": str(work / "triton-cache"),
        }

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def left(self) -> float:
        return self.args.budget - self.elapsed()

    def say(self, message: str) -> None:
        print(f"[{self.elapsed():4.0f} s] {message}", file=sys.stderr, flush=True)

    def run(self, name: str, command: list[str], limit: float, env: dict | None = None, budgeted: bool = True) -> str:
        """Run `command` in its own process group, its output in the phase's log; the log's text. Stopped (the whole
        group killed) at `limit` seconds, or at the end of the budget if `budgeted`, whichever is first."""
        log = self.work / f"{name}.log"
        limit = max(1.0, min(limit, self.left())) if budgeted else limit
        with open(log, "a", encoding="utf-8") as out:
            out.write(f"$ {shlex.join(command)}\n")
            out.flush()
            with STOP.deferred():  # a signal while the child starts is taken once there is a process to kill
                process = subprocess.Popen(
                    command, cwd=ROOT, env=env or self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
                )
            try:
                STOP.take_pending()
                code = process.wait(timeout=limit)
            except subprocess.TimeoutExpired:
                code = None
            finally:  # on a timeout, Ctrl+C or SIGTERM alike: nothing of the phase outlives it
                with_group_killed(process)
        text = log.read_text(encoding="utf-8", errors="replace")
        if code is None:
            raise PhaseFailed(f"stopped at its limit of {limit:.0f} s", tail(text))
        if code:
            last = text.strip().splitlines()[-1] if text.strip() else ""
            raise PhaseFailed(f"exit code {code}: {last[:200]}", tail(text))
        return text


def with_group_killed(process: subprocess.Popen) -> None:
    """Kill what is left of a process's group (its children too: compile workers, pytest's), then reap it."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def dynamo_events(log: str) -> dict:
    """Recompiles and graph breaks that TORCH_LOGS=recompiles,graph_breaks reported in a log, with their first lines."""
    recompiles = re.findall(r"\[__recompiles\] (Recompiling function .*)", log)
    reasons = re.findall(r"\[__recompiles\]\s+- (\S.*)", log)
    breaks = re.findall(r"\[__graph_breaks\] (Graph break.*)", log)
    return {
        "recompiles": len(recompiles),
        "graph_breaks": len(breaks),
        "recompile_lines": recompiles[:10],
        "recompile_reasons": reasons[:10],
        "graph_break_lines": breaks[:10],
    }


def preflight(check: Check) -> dict:
    """Python, torch, the card and its peak, and whether main.py's clearml is there (installed from --wheels if not)."""
    text = check.run("preflight", [check.python, "-c", PREFLIGHT, str(ROOT)], PREFLIGHT_LIMIT, budgeted=False)
    info = json.loads(text.strip().splitlines()[-1])
    if info["clearml"] is None and check.args.wheels is not None:
        site = check.work / "site"
        wheels = [str(w) for w in sorted(check.args.wheels.glob("*.whl"))]
        pip = [check.python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", str(site), *wheels]
        check.run("preflight", pip, PREFLIGHT_LIMIT, budgeted=False)
        check.env["PYTHONPATH"] = os.pathsep.join([str(site), check.env["PYTHONPATH"]])
        version = [check.python, "-c", "import clearml; print(clearml.__version__)"]
        found = check.run("preflight", version, PREFLIGHT_LIMIT, budgeted=False)
        info["clearml"] = found.strip().splitlines()[-1]
    return info


def tests(check: Check, limit: float) -> dict:
    """The tests that take a device, on this one (`-k cuda`; `-k cpu` in the dry run), without pytest-xdist."""
    command = [check.python, "-m", "pytest", *TEST_FILES, "-q", "-o", "addopts=", "-p", "no:cacheprovider"]
    text = check.run("tests", [*command, "-k", check.device], limit)
    summary = text.strip().splitlines()[-1]
    counts = {kind: int(n) for n, kind in re.findall(r"(\d+) (passed|failed|errors?|skipped|deselected)", summary)}
    if not counts.get("passed"):
        raise PhaseFailed(f"no test passed: {summary}", tail(text))
    return {"counts": counts, "summary": summary}


def step(check: Check, limit: float, shape: str) -> dict:
    """bench_gpu_step.py at one shape: both contenders' tokens/s, MFU, compile time, memory and graphs."""
    figures = check.work / f"step-{shape}.json"
    command = [check.python, str(ROOT / "bench" / "bench_gpu_step.py"), "--shape", shape, "--json", str(figures)]
    text = check.run(f"step-{shape}", command + (["--cpu"] if check.args.cpu else []), limit)
    result = json.loads(figures.read_text())["shapes"][0]
    return result | {"dynamo_log": dynamo_events(text)}


def eval_interval(check: Check) -> int:
    """Steps between evaluations: about EVALUATIONS in the run, from the step phase's tokens/s where it ran."""
    step_default = check.results.get("step-default", {})
    shape = step_default.get("shape")
    if step_default.get("status") != "ok" or shape is None:
        return 50 if check.args.cpu else 1000
    steps = (
        check.args.train_seconds * step_default["ours"]["tokens_per_s"] / (shape["batch_size"] * shape["block_size"])
    )
    return max(check.args.profile_after + PROFILE_WINDOW + 1, int(steps / EVALUATIONS))


def train_flags(check: Check, name: str) -> list[str]:
    """main.py's flags for one contender: the fixed-time run at the default shape, evaluated along the way."""
    args = check.args
    flags = [
        "--data", str(args.data), "--device", check.device, "--offline", "--sample_tokens", "0",
        "--cache_dir", str(check.work / "cache"), "--out_dir", str(check.work / "runs" / name),
        "--max_seconds", f"{args.train_seconds:g}", "--max_steps", "100000000",
        "--eval_interval", str(eval_interval(check)), "--eval_iters", "2" if args.cpu else "20",
    ]  # fmt: skip
    flags += shlex.split(DRY_RUN_SHAPE if args.cpu else GPU_SHAPE)
    return flags + (shlex.split(BASELINE_FLAGS) if name == "baseline" else [])


def train(check: Check, limit: float, name: str) -> dict:
    """gpu_train.py for one contender: main.py trained for --train_seconds, profiled, then evaluated."""
    figures, trace = check.work / f"train-{name}.json", check.work / f"trace-{name}.json.gz"
    command = [
        check.python, str(ROOT / "bench" / "gpu_train.py"), "--json", str(figures), "--trace", str(trace),
        "--held_in", str(check.args.data), "--held_out", str(check.args.held_out),
        "--profile_after", str(check.args.profile_after), "--", *train_flags(check, name),
    ]  # fmt: skip
    env = check.env | {"HOME": str(check.work / "home")}  # ClearML's offline session stays in the work folder
    text = check.run(f"train-{name}", command, limit, env)
    result = json.loads(figures.read_text())
    return result | training_figures(result) | {"dynamo_log": dynamo_events(text)}


def training_figures(result: dict) -> dict:
    """From the run's evaluations: its tokens/s between the first and last evaluation after step 0 (evaluations
    included), the seconds it trained at that rate, the best bits per byte seen, and the passes over the text."""
    curve = result.get("curve") or []
    figures = {}
    if len(curve) >= 3 and curve[-1]["elapsed"] > curve[1]["elapsed"]:
        rate = (curve[-1]["tokens"] - curve[1]["tokens"]) / (curve[-1]["elapsed"] - curve[1]["elapsed"])
        figures.update(tokens_per_s=rate, trained_s=curve[-1]["tokens"] / rate if rate else None)
    if curve:
        best = min(curve, key=lambda e: e["bpb"])
        figures.update(tokens=curve[-1]["tokens"], best_bpb=best["bpb"], best_step=best["step"])
        if result.get("training_tokens"):
            figures["passes"] = curve[-1]["tokens"] / result["training_tokens"]
    return figures


def skip_reason(check: Check, phase: Phase) -> str | None:
    """Why `phase` does not run, or None."""
    training = phase.name.startswith("train-")
    if phase.name in check.args.skip:
        return "--skip"
    if training and not check.results["preflight"].get("clearml"):
        return "main.py needs clearml, not installed here: --wheels DIR installs it"
    needed = estimate(check, phase)
    if phase.name == "train-ours":  # the pair runs both or neither
        needed += estimate(check, next(p for p in PHASES if p.name == "train-baseline"))
    if needed > check.left():
        return f"needs ~{needed:.0f} s, {max(0, check.left()):.0f} s left"
    if phase.name == "train-baseline" and check.results.get("train-ours", {}).get("status") != "ok":
        return "train-ours did not complete: a baseline alone compares nothing"
    return None


def estimate(check: Check, phase: Phase) -> float:
    seconds = (phase.cpu if check.args.cpu else phase.gpu)[0]
    return seconds + (check.args.train_seconds if phase.name.startswith("train-") else 0)


def limit(check: Check, phase: Phase) -> float:
    seconds = (phase.cpu if check.args.cpu else phase.gpu)[1]
    return seconds + (check.args.train_seconds if phase.name.startswith("train-") else 0)


def run_phase(check: Check, phase: Phase) -> None:
    """Run one phase (or skip it, saying why) and record what it found."""
    reason = skip_reason(check, phase)
    if reason:
        check.results[phase.name] = {"status": "skipped", "reason": reason}
        check.say(f"{phase.name}: skipped ({reason})")
        return
    started = check.elapsed()
    check.results[phase.name] = {"status": "running"}
    check.say(f"{phase.name}: started (estimate {estimate(check, phase):.0f} s, limit {limit(check, phase):.0f} s)")
    work, *what = PHASE_WORK[phase.name]
    try:
        figures = work(check, limit(check, phase), *what)
        status = "ok"
    except PhaseFailed as e:
        figures, status = {"error": str(e), "output": e.output}, "failed"
    check.results[phase.name] = {"status": status, "seconds": check.elapsed() - started, **figures}
    ending = "done" if status == "ok" else f"FAILED, {figures['error']}; the end of its output:\n{figures['output']}"
    check.say(f"{phase.name}: {ending} ({check.elapsed() - started:.0f} s)")


PHASE_WORK = {
    "tests": (tests,),
    "step-default": (step, "default"),
    "train-ours": (train, "ours"),
    "train-baseline": (train, "baseline"),
    "step-124M": (step, "gpt2-124M"),
}


def contender_figures(c: dict) -> str:
    """One contender at one shape: tokens/s, MFU, compile time, peak memory over the model's estimate."""
    mfu = f"{100 * c['mfu']:.1f}%" if c.get("mfu") is not None else "n/a"
    memory = "n/a"
    if c.get("peak_memory") and c.get("memory_estimate"):
        memory = f"{c['peak_memory'] / c['memory_estimate']:.2f}"
    syncs = f", {c['syncs_per_step']:g} syncs/step" if c.get("syncs_per_step") is not None else ""
    return f"{c['tokens_per_s']:,.0f} tok/s MFU {mfu} compile {c['compile_s']:.0f} s memory/estimate {memory}{syncs}"


def step_segment(result: dict) -> str:
    """One shape: both contenders, the ratio of their tokens/s, and the graphs and graph breaks each compiled."""
    ours, baseline = result["ours"], result["baseline"]
    graphs = f"{ours['graphs']}/{ours['graph_breaks']} {baseline['graphs']}/{baseline['graph_breaks']}"
    return (
        f"{result['label']}: ours {contender_figures(ours)}, baseline {contender_figures(baseline)}, "
        f"{result['ratio']:.2f}x, graphs/breaks {graphs}"
    )


def loss_segment(seconds: float, ours: dict, baseline: dict) -> str:
    """Loss per second: held-in and held-out bits per byte after the same training time, and how it was spent."""
    parts = []
    for key in ("held_in", "held_out"):
        a, b = ours.get(key, {}).get("bpb"), baseline.get(key, {}).get("bpb")
        name = key.replace("_", "-")
        parts.append(f"{name} bpb ours {a:.3f} baseline {b:.3f} ({a / b:.3f}x)" if a and b else f"{name} bpb n/a")
    trained = "/".join(f"{r['trained_s']:.0f}" if r.get("trained_s") else "?" for r in (ours, baseline))
    best = "/".join(f"{r['best_bpb']:.3f}" if r.get("best_bpb") else "?" for r in (ours, baseline))
    passes = max(ours.get("passes") or 0, baseline.get("passes") or 0)
    text = f"{ours.get('training_tokens', 0) / 1e6:.2f} M tokens"
    repeated = f"{passes:.0f} passes over {text} (a small text repeated: overfitting counts)"
    if not passes:
        repeated = "passes over the text n/a"
    elif passes <= 1:
        repeated = f"{passes:.2f} of one pass over {text}"
    return (
        f"{seconds:g} s training: {', '.join(parts)}, best val bpb during the runs {best}, trained {trained} s, "
        f"{repeated}"
    )


def profile_segment(ours: dict, baseline: dict) -> str:
    """What the five profiled steps of each training run show."""
    parts = [f"{name} {trace_summary.describe(r['profile']) if r.get('profile') else 'no trace'}" for name, r in
             (("ours", ours), ("baseline", baseline))]  # fmt: skip
    return "profile " + "; ".join(parts)


def dynamo_segment(ours: dict, baseline: dict) -> str:
    """Recompiles and graph breaks TORCH_LOGS reported in each training run."""
    counts = [f"{r['dynamo_log']['recompiles']}/{r['dynamo_log']['graph_breaks']}" for r in (ours, baseline)]
    return f"training recompiles/graph breaks: ours {counts[0]}, baseline {counts[1]}"


def outcome_segments(results: dict) -> list[str]:
    """What failed and what was skipped (always said, "none" included), and what a signal interrupted."""
    segments = []
    for status in ("failed", "skipped", "interrupted"):
        names = [
            f"{name} ({result.get('reason') or result.get('error', '').splitlines()[0]})"
            for name, result in results.items()
            if result.get("status") == status
        ]
        if names or status != "interrupted":
            segments.append(f"{status}: {', '.join(names) or 'none'}")
    return segments


def summary_line(check: Check) -> str:
    """The one line of figures: the machine, each phase that ran, then what failed and what was skipped."""
    results, info = check.results, check.results.get("preflight", {})
    card = info.get("card", "CPU") + (" (dry run: the figures mean nothing)" if check.args.cpu else "")
    elapsed = f"{check.elapsed():.0f} s of {check.args.budget:g}"
    segments = [f"gpu-check {check.device}: {card}, torch {info.get('torch', '?')}, {elapsed}"]
    done = {name for name, result in results.items() if result.get("status") == "ok"}
    if "tests" in done:
        segments.append(f"tests {results['tests']['counts']['passed']} passed")
    segments += [step_segment(results[name]) for name in ("step-default", "step-124M") if name in done]
    if {"train-ours", "train-baseline"} <= done:
        ours, baseline = results["train-ours"], results["train-baseline"]
        segments += [loss_segment(check.args.train_seconds, ours, baseline), profile_segment(ours, baseline)]
        segments.append(dynamo_segment(ours, baseline))
    return " | ".join(segments + outcome_segments(results))


def dry_run_data(work: Path) -> tuple[Path, Path]:
    """The start of the training and held-out files, whole lines, for a dry run that trains in seconds."""
    paths = []
    for source, size in zip((TRAIN_FILE, HELD_OUT_FILE), DRY_RUN_BYTES, strict=True):
        text = source.read_bytes()[:size]
        path = work / f"dry-run-{source.name}"
        path.write_bytes(text[: text.rfind(b"\n") + 1])
        paths.append(path)
    return paths[0], paths[1]


def write_details(check: Check, line: str, out: Path) -> None:
    """Every figure, every phase's output, the line and the traces, under `out` (a handful of files)."""
    out.mkdir(parents=True, exist_ok=True)
    report = {"line": line, "budget": check.args.budget, "elapsed": check.elapsed(), "phases": check.results}
    report["settings"] = {k: str(v) for k, v in vars(check.args).items()}
    (out / "gpu-check.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "gpu-check.txt").write_text(line + "\n")
    with open(out / "gpu-check.log", "w", encoding="utf-8") as log:
        for path in sorted(check.work.glob("*.log"), key=lambda p: p.stat().st_mtime):
            log.write(f"===== {path.stem}\n{path.read_text(encoding='utf-8', errors='replace')}\n")
    for trace in check.work.glob("trace-*.json.gz"):
        shutil.copyfile(trace, out / trace.name)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="the dry run: every phase at tiny shapes on the CPU")
    p.add_argument("--budget", type=float, help="seconds for the whole check (default: 480, 240 with --cpu)")
    p.add_argument("--train_seconds", type=float, help="training time of each contender (default: 60, 2 with --cpu)")
    p.add_argument(
        "--profile_after", type=int, help="optimizer steps before the 7 profiled (default: 30, 10 with --cpu)"
    )
    p.add_argument("--skip", default="", help="comma-separated phases not to run: " + ", ".join(p.name for p in PHASES))
    p.add_argument("--data", type=Path, default=TRAIN_FILE, help="training text (its tail is the held-in split)")
    p.add_argument("--held_out", type=Path, default=HELD_OUT_FILE, help="text never trained on, measured whole")
    p.add_argument("--wheels", type=Path, help="a folder of wheels to install clearml (and what it needs) from")
    p.add_argument("--out", type=Path, default=os.environ.get("OUT") or None, help="where the details go ($OUT)")
    args = p.parse_args()
    args.budget = args.budget or (240 if args.cpu else 480)
    args.train_seconds = args.train_seconds or (2 if args.cpu else 60)
    args.profile_after = args.profile_after if args.profile_after is not None else (10 if args.cpu else 30)
    args.skip = {name for name in args.skip.split(",") if name}
    if unknown := args.skip - {phase.name for phase in PHASES}:
        p.error(
            f"--skip {','.join(sorted(unknown))}: no such phase; the phases are {', '.join(p.name for p in PHASES)}"
        )
    for name in ("data", "held_out", "wheels"):
        path = getattr(args, name)
        if path is not None and not (path.is_dir() if name == "wheels" else path.is_file()):
            p.error(f"--{name} {path}: not found")
    return args


def main() -> int:
    args = parse_args()
    signal.signal(signal.SIGINT, STOP)
    signal.signal(signal.SIGTERM, STOP)
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    check, code = Check(args, work), 0
    try:
        if args.cpu and args.data == TRAIN_FILE and args.held_out == HELD_OUT_FILE:
            args.data, args.held_out = dry_run_data(work)
        try:
            check.results["preflight"] = {"status": "ok", **preflight(check), "seconds": check.elapsed()}
        except PhaseFailed as e:
            print(f"gpu.sh: the preflight check failed: {e}", file=sys.stderr)
            return 1
        if not args.cpu and not check.results["preflight"]["cuda"]:
            print("gpu.sh: no CUDA device here; bash bench/gpu.sh --cpu runs the dry run", file=sys.stderr)
            return 2
        for phase in PHASES:
            run_phase(check, phase)
    except KeyboardInterrupt:
        for name in [n for n, r in check.results.items() if r.get("status") == "running"]:
            check.results[name] = {"status": "interrupted", "reason": "stopped by a signal"}
        for phase in PHASES:
            check.results.setdefault(phase.name, {"status": "skipped", "reason": "not started: interrupted"})
        code = 130
    finally:
        line = summary_line(check)
        if args.out is not None:
            write_details(check, line, args.out)
        shutil.rmtree(work, ignore_errors=True)
    failed = any(r.get("status") == "failed" for r in check.results.values())
    print(line, flush=True)
    return code or (1 if failed else 0)


if __name__ == "__main__":
    sys.exit(main())
