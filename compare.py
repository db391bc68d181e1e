"""
Compare training runs, with or without a ClearML server: a table in the terminal, or one HTML page.

    python compare.py runs/baseline runs/dropout-0.1 runs/dropout-0.2
    python compare.py runs/ --baseline runs/baseline --html report.html

Design choices:
- Reads what the runs wrote: the run folder's own record (run.json + metrics.jsonl, see tracking.RunRecord) and
  ClearML offline sessions (the folder or its .zip), so runs tracked offline compare without importing them anywhere.
  It never writes into a run.
- The first run, or `--baseline`, is the baseline. The verdict compares each run with it at the last step both
  reached, interpolating linearly between evaluations; the crossover is the step from which the run has stayed on
  its side of the baseline. Both use Loss/val when the runs share a tokenizer, else bits per byte (loss per token
  is not comparable across tokenizers, BPB is).
- Only the flags that differ are shown in the terminal; flags that name places (run folder, cache) never count.
- Curves are numpy arrays, so 20 runs of 10,000 evaluations tabulate in well under a second (bench/bench_compare.py).
- The HTML page is one file that works offline: Plotly draws the curves (the library ClearML's web UI uses), with
  plotly.js embedded rather than fetched from a CDN. It holds the samples of at most MAX_SAMPLE_STEPS evaluations,
  evenly spread, so a long run's page stays a few MB.
- Bad input: one line on stderr. A path that holds no run, or a run with no evaluation yet, is a warning when other
  runs can still be compared, and exit 2 when nothing can. A torn last line (a run killed mid-write) is skipped.
- EarlyAbort is the same comparison made during training: main.py --baseline stops a run that is worse than its
  baseline by more than --abort_margin at two evaluations in a row, from --abort_after of its steps on.
"""

import argparse
import gc
import html
import json
import math
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from operator import itemgetter
from pathlib import Path

import numpy as np

from errors import UsageError
from tokenizer import Tokenizer

WORSE_THAN_BASELINE = "worse-than-baseline"
CURVES = ("Loss/train", "Loss/val", "BPB")
PLACE_FLAGS = {"out_dir", "resume", "cache_dir", "comment", "task_name", "baseline"}  # where, not what, was trained
MAX_SAMPLE_STEPS = 100
SAME = 5e-4  # relative differences below this are reported as equal
CELL_WIDTH = 40
SAMPLE_FIELD = ', "sample": '  # tracking.RunRecord writes an evaluation's sample as its last field


class CompareError(UsageError):
    """A mistake in what was asked to compare; the message is one line for the user."""


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


@dataclass
class Run:
    path: Path
    name: str
    hypothesis: str = ""
    status: str = "unknown"
    message: str = ""
    flags: dict = field(default_factory=dict)  # values as text, the same way for run folders and ClearML sessions
    dataset: str | None = None
    tokenizer: str | None = None  # fingerprint
    vocab_size: int | None = None
    commit: str | None = None
    dirty: bool | None = None
    clearml: str = ""  # where the run is in ClearML: offline session or web page
    wall_time: float = 0.0
    evals: dict = field(default_factory=dict)  # "step", "tokens", "elapsed", "lr" and CURVES -> arrays, by step
    samples: list = field(default_factory=list)  # per evaluation (as evals["step"]), the JSON text holding its sample

    @property
    def steps(self) -> np.ndarray:
        return self.evals.get("step", np.zeros(0, dtype=np.int64))

    def comparable_loss(self, other: "Run") -> bool:
        """Loss per token compares only under the same tokenizer; unknown fingerprints fall back on data and size."""
        if self.tokenizer and other.tokenizer:
            return self.tokenizer == other.tokenizer
        return (self.dataset, self.vocab_size) == (other.dataset, other.vocab_size)


# -------------------------------------------------------------------------------------------------------------------
# reading


def read_json_lines(text: str, where: str) -> list:
    """One JSON value per line; a torn last line (a kill mid-write) is skipped, a broken middle line warned about."""
    values, lines = [], text.splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            values.append(json.loads(line))
        except ValueError:
            if number < len(lines):
                warn(f"{where}: line {number} is not JSON; skipped")
    return values


RECORD_FIELDS = {"step": "step", "tokens": "tokens", "elapsed": "elapsed", "lr": "lr", "Loss/train": "loss_train",
                 "Loss/val": "loss_val", "BPB": "bpb"}  # fmt: skip


def record_events(text: str, where: str) -> list[tuple[dict, str]]:
    """The events of metrics.jsonl, each with its line. An evaluation's sample, its last field and most of its bytes,
    is cut off before parsing and decoded only where shown (decode_sample); the rest of the file is parsed in one
    json.loads call. Together they read long runs about twice as fast as json.loads line by line."""
    lines = [line for line in text.splitlines() if line.strip()]
    if lines and SAMPLE_FIELD in lines[-1] and not lines[-1].endswith('"}'):
        lines.pop()  # torn in the middle of its sample by a kill
    heads = []
    for line in lines:
        cut = line.find(SAMPLE_FIELD)  # cannot match inside a JSON string, where quotes are escaped
        heads.append(line if cut < 0 else line[:cut] + "}")
    try:
        events = json.loads("[" + ",".join(heads) + "]")
    except ValueError:  # a torn or broken line: parse line by line to find it
        events = [None] * len(heads)
        for i, head in enumerate(heads):
            try:
                events[i] = json.loads(head)
            except ValueError:
                if i < len(heads) - 1:
                    warn(f"{where}: line {i + 1} is not JSON; skipped")
    return [(e, line) for e, line in zip(events, lines, strict=True) if isinstance(e, dict)]


def decode_sample(raw: str) -> str:
    """The sample in a JSON line holding one (a record's line, or {"sample": ...})."""
    try:
        return json.loads(raw).get("sample", "")
    except (ValueError, AttributeError):
        return ""


def evals_by_step(rows: list[dict], samples: list[str], fields: dict) -> tuple[dict, list[str]]:
    """Columns of arrays sorted by step; a step evaluated twice (resumed from an older checkpoint) keeps the last.
    `fields` maps each column to its key in the rows."""
    if not rows:
        return {k: np.zeros(0) for k in fields}, []
    try:  # one C-level pass over the rows; a row without some field takes the slower way, missing as NaN
        table = np.array(list(map(itemgetter(*fields.values()), rows)), dtype=np.float64)
    except KeyError:
        table = np.array([[r.get(f, math.nan) for f in fields.values()] for r in rows], dtype=np.float64)
    columns = dict(zip(fields, table.T, strict=True))
    steps = columns["step"].astype(np.int64)
    _, last = np.unique(steps[::-1], return_index=True)
    order = len(steps) - 1 - last  # indices of the last occurrence of each step, in step order
    out = {k: v[order] for k, v in columns.items()}
    out["step"] = steps[order]
    return out, [samples[i] for i in order]


def load_record(folder: Path) -> Run:
    """A run folder written by tracking.RunRecord."""
    try:
        header = json.loads((folder / "run.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CompareError(f"{folder} has metrics.jsonl but no run.json") from None
    except (OSError, ValueError) as e:
        raise CompareError(f"{folder / 'run.json'} is not readable ({type(e).__name__})") from None
    try:
        text = (folder / "metrics.jsonl").read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        text = ""
    run = Run(
        path=folder,
        name=folder.name or str(folder),
        hypothesis=header.get("hypothesis", ""),
        flags=header.get("flags", {}),
        dataset=header.get("dataset"),
        tokenizer=header.get("tokenizer", {}).get("fingerprint"),
        vocab_size=header.get("tokenizer", {}).get("vocab_size"),
        commit=header.get("git", {}).get("commit"),
        dirty=header.get("git", {}).get("dirty"),
    )
    clearml = header.get("clearml", {})
    events = record_events(text, str(folder / "metrics.jsonl"))
    evals = [(e, line) for e, line in events if e.get("event") == "eval"]
    for event, _ in events:
        if event.get("event") == "status":
            run.status, run.message = event.get("status", run.status), event.get("message") or ""
        elif event.get("event") == "resumed":
            run.flags, clearml = event.get("flags", run.flags), event.get("clearml", clearml)
            run.status, run.message = "running", ""
    if events:
        run.wall_time = float(np.nanmax(np.array([e.get("elapsed") for e, _ in events], dtype=np.float64)))
    run.flags = {k: flag_text(v) for k, v in run.flags.items()}
    run.clearml = clearml.get("offline_session") or clearml.get("web_page") or ""
    run.evals, run.samples = evals_by_step([e for e, _ in evals], [line for _, line in evals], RECORD_FIELDS)
    return run


def flag_text(value) -> str:
    """A flag's value written as ClearML writes hyperparameters, so both sources compare equal."""
    return "" if value is None else value if isinstance(value, str) else str(value)


class SessionFiles:
    """Files of a ClearML offline session, in its folder or in its .zip."""

    def __init__(self, path: Path):
        self.path = path
        self.zip = zipfile.ZipFile(path) if path.is_file() else None

    def read(self, name: str) -> bytes | None:
        try:
            return self.zip.read(name) if self.zip else (self.path / name).read_bytes()
        except (KeyError, OSError):
            return None

    def names(self) -> list[str]:
        if self.zip:
            return self.zip.namelist()
        return [str(p.relative_to(self.path)) for p in self.path.rglob("*") if p.is_file()]


def load_session(path: Path) -> Run:
    """A ClearML offline session: task.json for the task, metrics.jsonl for scalars and debug samples."""
    try:
        files = SessionFiles(path)
        task = json.loads(files.read("task.json") or b"null")
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise CompareError(f"{path} is not a readable ClearML offline session ({type(e).__name__})") from None
    if not isinstance(task, dict):
        raise CompareError(f"{path} is not a ClearML offline session (no task.json)")
    flags = {k: v.get("value", "") for k, v in task.get("hyperparams", {}).get("Args", {}).items()}
    tags = task.get("tags", [])
    status = next((s for s in ("failed", "aborted") if s in tags), None)
    if status is None:
        status = "completed" if task.get("offline_output_models") else "unknown"
    script = task.get("script", {})
    run = Run(
        path=path,
        name=path.stem if path.suffix == ".zip" else path.name,
        hypothesis=task.get("comment") or "",
        status=status,
        flags=flags,
        dataset=tags[0] if tags else None,
        tokenizer=session_tokenizer(files),
        vocab_size=int(flags["vocab_size"]) if flags.get("vocab_size", "").isdigit() else None,
        commit=script.get("version_num") or None,
        dirty=bool(script.get("diff", "").strip()) if script.get("version_num") else None,
        clearml=f"offline session {path} (task {task.get('id', '?')})",
    )
    text = (files.read("metrics.jsonl") or b"").decode("utf-8", errors="replace")
    events = [e for batch in read_json_lines(text, f"{path}/metrics.jsonl") for e in batch if isinstance(e, dict)]
    scalars: dict[tuple, dict[int, float]] = {}
    samples: dict[int, str] = {}
    first_ms = min((e.get("timestamp", math.inf) for e in events), default=math.inf)
    elapsed: dict[int, float] = {}
    for e in events:
        step = e.get("iter")
        if e.get("type") == "training_stats_scalar":
            scalars.setdefault((e.get("metric"), e.get("variant")), {})[step] = e.get("value")
            if (e.get("metric"), e.get("variant")) == ("Loss", "val"):
                elapsed[step] = (e.get("timestamp", first_ms) - first_ms) / 1000
        elif e.get("type") == "training_debug_image" and e.get("metric") == "Generated Sample":
            samples[step] = (files.read(f"data/{e.get('key', '')}") or b"").decode("utf-8", errors="replace")
        elif e.get("type") == "plot" and e.get("metric") == "Generated Sample":
            samples.update(table_samples(e.get("plot_str", "")))
    if events:
        run.wall_time = (max(e.get("timestamp", first_ms) for e in events) - first_ms) / 1000
    val = scalars.get(("Loss", "val"), {})
    lrs = scalars.get(("Learning rate", "lr"), {})
    tokens_per_step = math.prod(int(flags.get(k, "0") or 0) for k in ("batch_size", "grad_accum", "block_size"))
    rows = [{"step": s, "tokens": s * tokens_per_step, "elapsed": elapsed.get(s), "lr": lrs.get(s, lrs.get(s + 1)),
             "Loss/train": scalars.get(("Loss", "train"), {}).get(s), "Loss/val": v,
             "BPB": scalars.get(("BPB", "val"), {}).get(s)} for s, v in val.items()]  # fmt: skip
    samples_json = [json.dumps({"sample": samples.get(r["step"], "")}) for r in rows]
    run.evals, run.samples = evals_by_step(rows, samples_json, {k: k for k in RECORD_FIELDS})
    return run


def session_tokenizer(files: SessionFiles) -> str | None:
    """The fingerprint of the tokenizer artifact, when the run got far enough to upload it."""
    name = next((n for n in files.names() if n.endswith("artifacts/tokenizer/tokenizer.json")), None)
    payload = files.read(name) if name else None
    if payload is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "tokenizer.json").write_bytes(payload)
        try:
            return Tokenizer.load(Path(tmp) / "tokenizer.json").fingerprint
        except Exception:  # an unreadable artifact only means the fingerprint is unknown
            return None


def table_samples(plot_str: str) -> dict[int, str]:
    """Samples from a `Generated Sample` table plot: the column headed step, and the last column's text."""
    try:
        table = json.loads(plot_str)["data"][0]
        headers = [str(h).lower() for h in table["header"]["values"]]
        columns = table["cells"]["values"]
        step_column = columns[next(i for i, h in enumerate(headers) if "step" in h)]
        return {int(s): str(t) for s, t in zip(step_column, columns[-1], strict=True)}
    except (ValueError, KeyError, IndexError, TypeError, StopIteration):
        return {}


def is_session(path: Path) -> bool:
    if path.is_dir():
        return (path / "task.json").is_file()
    return path.suffix == ".zip" and path.is_file()


def is_record(path: Path) -> bool:
    """run.json, or a record whose header is missing; an offline session also has metrics.jsonl, beside task.json."""
    return (
        path.is_dir() and not is_session(path) and ((path / "run.json").is_file() or (path / "metrics.jsonl").is_file())
    )


def load_run(path: Path) -> Run:
    """A run folder or an offline session (folder or .zip); CompareError when `path` is neither."""
    if is_record(path):
        return load_record(path)
    if is_session(path):
        return load_session(path)
    if not path.exists():
        raise CompareError(f"{path} does not exist")
    if (path / "ckpt.pt").is_file():
        raise CompareError(f"{path} holds a checkpoint but no run record (run.json, metrics.jsonl)")
    raise CompareError(f"{path} is not a run folder or a ClearML offline session")


def find_runs(paths: list[Path]) -> list[Run]:
    """Each path is a run, or a folder holding runs; what cannot be read is warned about and left out."""
    runs = []
    for path in paths:
        if is_record(path) or is_session(path) or not path.is_dir():
            candidates = [path]
        else:
            children = sorted(path.iterdir())
            folders = {c.name for c in children if c.is_dir()}
            # an offline cache holds each session twice, as a folder and as its .zip
            candidates = [
                c
                for c in children
                if is_record(c) or (is_session(c) and not (c.suffix == ".zip" and c.stem in folders))
            ]
            if not candidates:
                warn(f"{path} holds no run folder or ClearML offline session")
        for candidate in candidates:
            try:
                runs.append(load_run(candidate))
            except CompareError as e:
                warn(str(e))
    return runs


def read_runs(paths: list[Path]) -> list[Run]:
    """find_runs with the garbage collector paused: reading creates many short-lived dicts, and collecting them
    while they are being created only costs time (15-20 % of reading 20 long runs)."""
    gc.disable()
    try:
        return find_runs(paths)
    finally:
        gc.enable()


# -------------------------------------------------------------------------------------------------------------------
# comparing


@dataclass
class Verdict:
    metric: str  # "Loss/val" or "BPB"
    step: int  # the last step both runs reached
    value: float
    baseline: float
    crossover: int | None  # the step from which the run stayed on its side of the baseline; None if it never crossed

    @property
    def relative(self) -> float:
        return (self.value - self.baseline) / self.baseline

    def text(self) -> str:
        if abs(self.relative) < SAME:
            return "same as baseline"
        word = "better" if self.relative < 0 else "worse"
        return f"{word} by {abs(self.value - self.baseline):.4f} ({abs(self.relative):.1%})"


def compare_with(run: Run, baseline: Run) -> Verdict | None:
    """The run against the baseline at the last step both reached; None if their evaluations do not overlap."""
    metric = "Loss/val" if run.comparable_loss(baseline) else "BPB"
    a, b = curve(run, metric), curve(baseline, metric)
    if not len(a[0]) or not len(b[0]):
        return None
    low, high = max(a[0][0], b[0][0]), min(a[0][-1], b[0][-1])
    if low > high:
        return None
    grid = np.union1d(a[0], b[0])
    grid = grid[(grid >= low) & (grid <= high)]
    diff = np.interp(grid, *a) - np.interp(grid, *b)
    value, base = float(np.interp(high, *a)), float(np.interp(high, *b))
    return Verdict(metric, int(high), value, base, crossover_step(grid, diff))


def curve(run: Run, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Steps and values of one curve, without the evaluations that did not record it."""
    values = run.evals[metric]
    keep = np.isfinite(values)
    return run.steps[keep].astype(np.float64), values[keep]


def crossover_step(grid: np.ndarray, diff: np.ndarray) -> int | None:
    """The first step of the last stretch where `diff` keeps its sign, if it had another sign before (zeros skipped)."""
    signs = np.sign(diff)
    nonzero = np.flatnonzero(signs)
    if not len(nonzero):
        return None
    changes = np.flatnonzero(signs[nonzero][1:] != signs[nonzero][:-1])
    return int(grid[nonzero[changes[-1] + 1]]) if len(changes) else None


def differing_flags(runs: list[Run]) -> list[str]:
    names = sorted({k for r in runs for k in r.flags} - PLACE_FLAGS)
    return [k for k in names if len({r.flags.get(k, "") for r in runs}) > 1]


def check_tokenizers(runs: list[Run], baseline: Run) -> None:
    for run in runs:
        if run is not baseline and not run.comparable_loss(baseline):
            warn(
                f"{run.name} and the baseline {baseline.name} use different tokenizers: Loss is not comparable "
                f"between them, so the verdict compares BPB"
            )


def wall_time(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m{seconds:02d}s"


def best_and_last(run: Run, metric: str) -> tuple[str, str]:
    steps, values = curve(run, metric)
    if not len(values):
        return "-", "-"
    best = int(np.argmin(values))
    return f"{values[best]:.4f} @ {int(steps[best])}", f"{values[-1]:.4f} @ {int(steps[-1])}"


def crossover_text(verdict: Verdict | None) -> str:
    if verdict is None or verdict.crossover is None:
        return "none"
    side = "passes the baseline" if verdict.relative < 0 else "falls behind the baseline"
    return f"step {verdict.crossover}: {side}"


def summary_rows(runs: list[Run], baseline: Run) -> list[tuple[str, list[str]]]:
    """The comparison as (row name, one cell per run); shared by the terminal table and the HTML page."""
    verdicts = [None if r is baseline else compare_with(r, baseline) for r in runs]
    rows = [
        ("hypothesis", [r.hypothesis or "-" for r in runs]),
        ("status", [r.status + (f": {r.message}" if r.message and r.status != "completed" else "") for r in runs]),
    ]
    rows += [(f"--{k}", [r.flags.get(k, "-") for r in runs]) for k in differing_flags(runs)]
    rows += [
        ("steps", [str(int(r.steps[-1])) for r in runs]),
        ("tokens", [f"{int(r.evals['tokens'][-1]):,}" if np.isfinite(r.evals["tokens"][-1]) else "-" for r in runs]),
        ("wall time", [wall_time(r.wall_time) for r in runs]),
    ]
    for metric in ("Loss/val", "BPB"):
        best_last = [best_and_last(r, metric) for r in runs]
        rows += [(f"best {metric}", [b for b, _ in best_last]), (f"last {metric}", [last for _, last in best_last])]
    pairs = list(zip(runs, verdicts, strict=True))
    rows += [
        ("vs baseline", ["baseline" if r is baseline else v.text() if v else "no common step" for r, v in pairs]),
        ("compared at", ["-" if r is baseline or not v else f"{v.metric}, step {v.step}" for r, v in pairs]),
        ("crossover", ["-" if r is baseline else crossover_text(v) for r, v in pairs]),
        ("commit", [commit_text(r) for r in runs]),
    ]
    return rows


def commit_text(run: Run) -> str:
    if not run.commit:
        return "unknown"
    return run.commit[:10] + (" (dirty)" if run.dirty else "")


def terminal_table(runs: list[Run], baseline: Run) -> str:
    rows = [("run", [r.name + (" (baseline)" if r is baseline else "") for r in runs]), *summary_rows(runs, baseline)]

    def fit(text: str) -> str:
        text = " ".join(text.split())
        return text if len(text) <= CELL_WIDTH else text[: CELL_WIDTH - 1] + "…"

    cells = [[name, *map(fit, values)] for name, values in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def gather(paths: list[Path], baseline_path: Path | None) -> tuple[list[Run], Run]:
    """The runs that can be compared and their baseline; CompareError when nothing can be compared."""
    baseline = None
    if baseline_path is not None:
        baseline = load_run(baseline_path)
        if not len(baseline.steps):
            raise CompareError(f"the baseline {baseline_path} has no evaluation yet")
    runs = read_runs(paths)
    if baseline is not None:
        runs = [baseline] + [r for r in runs if r.path.resolve() != baseline.path.resolve()]
    evaluated = []
    for run in runs:
        if len(run.steps):
            evaluated.append(run)
        else:
            warn(f"{run.path} has no evaluation yet; left out")
    if not evaluated:
        raise CompareError("no run with an evaluation to compare")
    baseline = baseline or evaluated[0]
    check_tokenizers(evaluated, baseline)
    return evaluated, baseline


# -------------------------------------------------------------------------------------------------------------------
# the HTML page


def figure(runs: list[Run]):
    """Loss/train, Loss/val and BPB of every run against step, one color per run; a legend click hides a run."""
    import plotly.graph_objects as go  # imported here: main.py imports this module for EarlyAbort alone
    from plotly.colors import qualitative
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=3, subplot_titles=CURVES, horizontal_spacing=0.06)
    colors = qualitative.Plotly + qualitative.D3
    for i, run in enumerate(runs):
        for col, metric in enumerate(CURVES, 1):
            steps, values = curve(run, metric)
            fig.add_trace(
                go.Scatter(
                    x=steps.astype(np.int32),  # half the bytes of float64 in the page; plenty for a plot
                    y=values.astype(np.float32),
                    mode="lines+markers" if len(steps) <= 50 else "lines",
                    name=run.name,
                    legendgroup=run.name,
                    showlegend=col == 1,
                    line={"color": colors[i % len(colors)]},
                    meta={"run": run.name, "series": metric},
                    hovertemplate=f"{html.escape(run.name)}<br>step %{{x}}<br>{metric} %{{y:.4f}}<extra></extra>",
                ),
                row=1,
                col=col,
            )
        fig.update_xaxes(title_text="step")
    fig.update_layout(height=460, margin={"t": 40, "b": 40, "l": 50, "r": 20}, legend={"orientation": "h", "y": -0.2})
    return fig


def sample_steps(runs: list[Run]) -> list[int]:
    steps = np.unique(np.concatenate([r.steps for r in runs]))
    if len(steps) > MAX_SAMPLE_STEPS:
        steps = steps[np.unique(np.linspace(0, len(steps) - 1, MAX_SAMPLE_STEPS).round().astype(int))]
    return [int(s) for s in steps]


def samples_at(runs: list[Run], steps: list[int]) -> dict:
    """For each step, each run's latest sample at or before it, with the step it was generated at."""
    table = {}
    for step in steps:
        cells = []
        for run in runs:
            i = int(np.searchsorted(run.steps, step, side="right")) - 1
            cells.append([int(run.steps[i]), decode_sample(run.samples[i])] if i >= 0 else None)
        table[str(step)] = cells
    return table


def html_table(header: list[str], rows: list[tuple[str, list[str]]], differs: set[str] = frozenset()) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        f"<tr{' class=differs' if name in differs else ''}><th>{html.escape(name)}</th>"
        + "".join(f"<td>{html.escape(v)}</td>" for v in values)
        + "</tr>"
        for name, values in rows
    )
    return f"<table><thead><tr><th></th>{head}</tr></thead><tbody>{body}</tbody></table>"


PAGE_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin-bottom: 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; vertical-align: top; }
thead th { background: #f0f0f0; }
tr.differs td, tr.differs th { background: #fff3b0; }
#samples { display: grid; gap: 1em; }
#samples pre { white-space: pre-wrap; background: #f7f7f7; padding: 0.8em; margin: 0.3em 0 0; }
"""

PAGE_SCRIPT = """
const SAMPLES = JSON.parse(document.getElementById("samples-data").textContent);
function showSamples(step) {
  const cells = SAMPLES.samples[step];
  const box = document.getElementById("samples");
  box.replaceChildren();
  SAMPLES.runs.forEach((name, i) => {
    const div = document.createElement("div");
    const title = document.createElement("b");
    const pre = document.createElement("pre");
    const cell = cells[i];
    title.textContent = cell && cell[0] !== Number(step) ? `${name} (step ${cell[0]})` : name;
    pre.textContent = cell ? cell[1] : "no evaluation yet at this step";
    div.append(title, pre);
    box.append(div);
  });
}
const select = document.getElementById("sample-step");
select.addEventListener("change", () => showSamples(select.value));
showSamples(select.value);
"""


def html_report(runs: list[Run], baseline: Run) -> str:
    names = [r.name + (" (baseline)" if r is baseline else "") for r in runs]
    plot = figure(runs).to_html(full_html=False, include_plotlyjs=True, div_id="curves", config={"responsive": True})
    flag_names = sorted({k for r in runs for k in r.flags})
    differs = set(differing_flags(runs))
    flag_rows = [(k, [r.flags.get(k, "-") for r in runs]) for k in sorted(flag_names, key=lambda k: k not in differs)]
    run_rows = [("run folder", [str(r.path) for r in runs]), ("ClearML", [r.clearml or "-" for r in runs])]
    steps = sample_steps(runs)
    samples = json.dumps({"runs": [r.name for r in runs], "samples": samples_at(runs, steps)}).replace("</", "<\\/")
    options = "".join(f'<option value="{s}"{" selected" if s == steps[-1] else ""}>step {s}</option>' for s in steps)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Run comparison</title>
<link rel="icon" href="data:,"><style>{PAGE_STYLE}
#samples {{ grid-template-columns: repeat({len(runs)}, minmax(0, 1fr)); }}</style></head>
<body>
<h1>Run comparison</h1>
<h2>Summary</h2>
{html_table(names, summary_rows(runs, baseline) + run_rows)}
<h2>Curves</h2>
{plot}
<h2>Generated samples</h2>
<label>at evaluation <select id="sample-step">{options}</select></label>
<div id="samples"></div>
<h2>Flags</h2>
<p>Highlighted rows differ between runs.</p>
{html_table(names, flag_rows, differs)}
<script type="application/json" id="samples-data">{samples}</script>
<script>{PAGE_SCRIPT}</script>
</body></html>
"""


def write_page(path: Path, text: str) -> None:
    """Temporary file beside `path`, then rename: an open report is never half-written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=path.name, suffix=".tmp", delete=False) as f:
        f.write(text)
    Path(f.name).chmod(0o644)
    Path(f.name).replace(path)


# -------------------------------------------------------------------------------------------------------------------
# early abort during training


class EarlyAbort:
    """Decides at each evaluation whether a run is clearly worse than its baseline at the same step."""

    def __init__(self, baseline: Run, max_steps: int, after: float, margin: float):
        self.baseline, self.margin = baseline, margin
        self.first_step = after * max_steps
        self.steps, self.losses = curve(baseline, "Loss/val")
        self.worse_in_a_row = 0

    @classmethod
    def against(cls, args: argparse.Namespace, dataset: str, tokenizer_fingerprint: str) -> "EarlyAbort | None":
        """From main.py's flags, once the data is known; CompareError when the baseline cannot be compared."""
        if not args.baseline:
            return None
        baseline = load_run(Path(args.baseline))
        if not len(curve(baseline, "Loss/val")[0]):
            raise CompareError("the baseline has no evaluation yet")
        if baseline.dataset != dataset:
            raise CompareError(f"the baseline was trained on {baseline.dataset}, this run on {dataset}")
        if baseline.tokenizer not in (None, tokenizer_fingerprint) or (
            baseline.tokenizer is None and baseline.vocab_size != args.vocab_size
        ):
            raise CompareError("the baseline used another tokenizer, so its Loss/val is not comparable")
        return cls(baseline, args.max_steps, args.abort_after, args.abort_margin)

    def check(self, step: int, loss: float) -> str | None:
        """The reason to stop, when Loss/val is worse than the baseline's by more than the margin twice in a row."""
        if step < self.first_step or step > self.steps[-1] or step < self.steps[0]:
            self.worse_in_a_row = 0  # before the grace period, or where the baseline has no evaluation to compare
            return None
        base = float(np.interp(step, self.steps, self.losses))
        self.worse_in_a_row = self.worse_in_a_row + 1 if loss > base * (1 + self.margin) else 0
        if self.worse_in_a_row < 2:
            return None
        return (
            f"worse than the baseline {self.baseline.name}: Loss/val {loss:.4f} against {base:.4f} at step {step} "
            f"({(loss - base) / base:+.1%}, more than {self.margin:.1%} twice in a row); stopped"
        )


# -------------------------------------------------------------------------------------------------------------------
# command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Compare training runs: run folders, folders holding them, or ClearML offline sessions."
    )
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN", help="run folder, folder of runs, or session")
    parser.add_argument("--baseline", type=Path, default=None, help="the run to compare against (default: the first)")
    parser.add_argument("--html", type=Path, default=None, metavar="FILE", help="also write an HTML report")
    args = parser.parse_args(argv)
    try:
        runs, baseline = gather(args.runs, args.baseline)
    except CompareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(terminal_table(runs, baseline))
    if args.html:
        try:
            write_page(args.html, html_report(runs, baseline))
        except OSError as e:
            print(f"error: cannot write {args.html} ({e.strerror})", file=sys.stderr)
            return 2
        print(f"report written to {args.html}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
