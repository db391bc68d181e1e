"""
The HTML report of a comparison: one self-contained page that works offline.

Design choices:
- Plotly draws the curves (the library ClearML's web UI uses), with plotly.js embedded rather than fetched from a
  CDN. Each arm is its mean curve over its seeds with a shaded band from their minimum to their maximum; a legend
  click hides an arm. The legend names an arm by what differs from the baseline (`dropout=0.3`).
- The x-axis switches between step, tokens, wall-clock time and training FLOPs (tokens × the model's FLOPs per
  token, when the run recorded it): every arm's x values for each axis are in the page, as base64 float32, and the
  page's script swaps them in. A smoothing control smooths Loss/train (exponential moving average, debiased as
  TensorBoard does), the one training-loss curve the run record holds.
- The flags table wraps long values and fits the window; the flags that differ between arms come first and the
  rest sit behind a toggle. A flag that does not apply to an arm (arms.applies: the TinyStories URL of a local-file
  run, the Muon learning rate of an AdamW run, ...) is left out, or shown as "n/a" where it applies to another arm;
  the flags that do not change training (where a run is kept, the early abort) are not arm flags at all.
- Everything from a record is escaped for where it goes: HTML text and attributes, Plotly's pseudo-HTML labels, and
  the JSON inside <script> (every `<`, `>` and `&` written as a \\u escape, so no `</script`, `<!--` or `<script` can
  appear there). Only an http(s) address becomes a link; an offline session's local zip never does.
- The page holds the samples of at most MAX_SAMPLE_STEPS evaluations, evenly spread, so a long run's page stays a few
  MB, one sample per arm (its first run's).
- write_page never follows a symlink, never replaces anything but a regular file, refuses to write into a run folder
  or an offline session, and writes a temporary file that it renames.
"""

import base64
import html
import json
import os
import stat
from pathlib import Path

import numpy as np

import arms as arms_module
import atomic
from arms import Arm
from errors import UsageError
from records import Run

CURVES = ("Loss/train", "Loss/val", "BPB")
AXES = {"step": "step", "tokens": "tokens", "time": "wall-clock time (s)", "flops": "training FLOPs"}
MAX_SAMPLE_STEPS = 100
RUN_FILES = ("run.json", "metrics.jsonl", "ckpt.pt", ".lock", "task.json")  # a folder holding one is a run's


class ReportError(UsageError):
    """--html names a place the report must not be written to."""


def script_json(value) -> str:
    """JSON to put inside a <script> element: no `<`, `>` or `&` in it, so nothing in it can end or open a tag."""
    text = json.dumps(value, ensure_ascii=True, allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def packed(values: np.ndarray) -> str:
    """float32 values as base64, NaN where there is none (a gap in the curve)."""
    return base64.b64encode(np.asarray(values, dtype="<f4").tobytes()).decode()


def arm_name(arm: Arm) -> str:
    return arm.label + (f" ({len(arm.runs)} seeds)" if len(arm.runs) > 1 else "")


# -------------------------------------------------------------------------------------------------------------------
# the curves


def figure(arms: list[Arm]):
    """Loss/train, Loss/val and BPB of every arm against step: the mean line, and the band of its seeds."""
    import plotly.graph_objects as go  # imported here: the table does not need plotly, and it takes a while
    from plotly.colors import qualitative
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=3, subplot_titles=CURVES, horizontal_spacing=0.06)
    colors = qualitative.Plotly + qualitative.D3
    for i, arm in enumerate(arms):
        color, name = colors[i % len(colors)], html.escape(arm_name(arm))
        for col, metric in enumerate(CURVES, 1):
            band = arm.band(metric)
            if band is None:
                continue
            x = band.grid.astype(np.float32)
            common = {"legendgroup": str(i), "x": x, "hoverlabel": {"namelength": -1}}
            if band.n > 1:
                for part, values in (("high", band.high), ("low", band.low)):
                    fig.add_trace(
                        go.Scatter(
                            y=values.astype(np.float32),
                            mode="lines",
                            line={"width": 0, "color": color},
                            fill="tonexty" if part == "low" else None,
                            fillcolor=translucent(color),
                            showlegend=False,
                            meta={"arm": i, "series": metric, "part": part},
                            hovertemplate=f"{name}<br>{part}est of {band.n} seeds %{{y:.4f}}<extra></extra>",
                            **common,
                        ),  # fmt: skip
                        row=1,
                        col=col,
                    )
            fig.add_trace(
                go.Scatter(
                    y=band.mean.astype(np.float32),
                    mode="lines+markers" if len(x) <= 50 else "lines",
                    name=name,
                    showlegend=col == 1,
                    line={"color": color},
                    meta={"arm": i, "series": metric, "part": "mean"},
                    hovertemplate=f"{name}<br>{metric} %{{y:.4f}}<extra></extra>",
                    **common,
                ),  # fmt: skip
                row=1,
                col=col,
            )
    fig.update_xaxes(title_text=AXES["step"])
    fig.update_layout(height=460, margin={"t": 40, "b": 40, "l": 50, "r": 20}, legend={"orientation": "h", "y": -0.2})
    return fig


def translucent(color: str) -> str:
    """A #rrggbb color as rgba at a fifth of its opacity, for a band."""
    red, green, blue = (int(color[i : i + 2], 16) for i in (1, 3, 5))
    return f"rgba({red}, {green}, {blue}, 0.2)"


def x_values(arm: Arm, grid: np.ndarray) -> dict[str, np.ndarray]:
    """The arm's grid of steps on each axis: the seeds' mean tokens, elapsed seconds and training FLOPs there."""
    per_seed = {"tokens": [], "time": [], "flops": []}
    for run in arm.runs:
        steps = run.steps.astype(np.float64)
        tokens = np.interp(grid, steps, run.evals["tokens"]) if len(steps) else np.full(len(grid), np.nan)
        per_seed["tokens"].append(tokens)
        per_seed["time"].append(np.interp(grid, steps, run.evals["elapsed"]) if len(steps) else tokens * np.nan)
        per_seed["flops"].append(tokens * (run.flops_per_token if run.flops_per_token else np.nan))
    return {"step": grid, **{axis: np.mean(values, axis=0) for axis, values in per_seed.items()}}


def axes_data(fig, arms: list[Arm]) -> dict:
    """Each trace's x values on every axis (the three traces of an arm's curve share theirs: `of_trace` indexes
    `x`), and for each axis the arms that did not record it."""
    xs, of_trace, shared, missing = [], [], {}, {axis: [] for axis in AXES}
    for trace in fig.data:
        arm = arms[trace.meta["arm"]]
        key = (trace.meta["arm"], trace.meta["series"])
        if key not in shared:
            shared[key] = len(xs)
            values = x_values(arm, np.asarray(trace.x, dtype=np.float64))
            xs.append({axis: packed(v) for axis, v in values.items()})
            for axis, v in values.items():
                if not np.isfinite(v).any() and arm_name(arm) not in missing[axis]:
                    missing[axis].append(arm_name(arm))
        of_trace.append(shared[key])
    return {"titles": AXES, "x": xs, "of_trace": of_trace, "missing": missing}


# -------------------------------------------------------------------------------------------------------------------
# tables


def html_table(header: list[str], rows: list[tuple[str, list[str]]], differs: set[str] = frozenset()) -> str:
    """A table of text cells, every cell escaped; a cell already made HTML comes as Markup."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        f"<tr{' class=differs' if name in differs else ''}><th>{html.escape(name)}</th>"
        + "".join(f"<td>{v if isinstance(v, Markup) else html.escape(v)}</td>" for v in values)
        + "</tr>"
        for name, values in rows
    )
    return f"<table><thead><tr><th></th>{head}</tr></thead><tbody>{body}</tbody></table>"


class Markup(str):
    """Text that is already HTML, every piece of it from a record escaped."""


def clearml_cell(arm: Arm) -> Markup:
    """Each run's task: a link to its page on a ClearML server, or the offline session's task id (never its path)."""
    cells = []
    for run in arm.runs:
        if run.web_page and run.web_page.startswith(("https://", "http://")):
            cells.append(f'<a href="{html.escape(run.web_page)}">{html.escape(run.task_id or "task")}</a>')
        elif run.offline:
            cells.append(html.escape(f"offline session, task {run.task_id or '?'}"))
        else:
            cells.append("-")
    return Markup(", ".join(cells))


def flag_tables(arms: list[Arm], header: list[str]) -> str:
    """The flags that differ, then the rest behind a toggle; a flag that applies to no arm is left out."""
    names = sorted({k for arm in arms for k in arm.flags})
    rows = []
    for name in names:
        applies = [name in arm.flags and arms_module.applies(name, arm.flags) for arm in arms]
        if any(applies):
            rows.append(
                (name, [arm.flags[name] or "-" if ok else "n/a" for arm, ok in zip(arms, applies, strict=True)])
            )
    differ = [row for row in rows if len(set(row[1])) > 1]
    same = [row for row in rows if len(set(row[1])) == 1]
    parts = [html_table(header, differ, {name for name, _ in differ})] if differ else ["<p>No flag differs.</p>"]
    if same:
        parts.append(
            f"<details><summary>{len(same)} flags the same in every arm</summary>{html_table(header, same)}</details>"
        )
    return "\n".join(parts)


# -------------------------------------------------------------------------------------------------------------------
# samples


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
            cells.append([int(run.steps[i]), run.samples(i)] if i >= 0 else None)
        table[str(step)] = cells
    return table


# -------------------------------------------------------------------------------------------------------------------
# the page


PAGE_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin-bottom: 1.5em; font-size: 0.9em; width: 100%; table-layout: fixed; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; vertical-align: top;
         overflow-wrap: anywhere; }
thead th:first-child { width: 11em; }
thead th { background: #f0f0f0; }
tr.differs td, tr.differs th { background: #fff3b0; }
summary { cursor: pointer; margin-bottom: 0.8em; }
.controls { display: flex; gap: 2em; align-items: center; flex-wrap: wrap; }
#samples { display: grid; gap: 1em; }
#samples pre { white-space: pre-wrap; overflow-wrap: anywhere; background: #f7f7f7; padding: 0.8em; margin: 0.3em 0 0; }
"""

PAGE_SCRIPT = """
const DATA = JSON.parse(document.getElementById("page-data").textContent);
const curves = document.getElementById("curves");
function unpack(text) {
  const bytes = Uint8Array.from(atob(text), c => c.charCodeAt(0));
  return Array.from(new Float32Array(bytes.buffer), v => (Number.isNaN(v) ? null : v));
}
function values(array) {  // a trace's x or y: Plotly keeps the float32 arrays it was given as {dtype, bdata}
  return array.bdata && array.dtype === "f4" ? unpack(array.bdata) : Array.from(array);
}
const trainIndices = curves.data.map((t, i) => (t.meta.series === "Loss/train" ? i : -1)).filter(i => i >= 0);
const trainRaw = trainIndices.map(i => values(curves.data[i].y));
function smooth(values, weight) {
  let last = 0, count = 0;
  return values.map(v => {
    if (v === null || Number.isNaN(v)) return null;
    last = weight * last + (1 - weight) * v;
    count += 1;
    return weight > 0 ? last / (1 - Math.pow(weight, count)) : v;
  });
}
function setSmoothing(weight) {
  document.getElementById("smoothing-value").textContent = weight.toFixed(2);
  Plotly.restyle(curves, {y: trainRaw.map(values => smooth(values, weight))}, trainIndices);
}
function setAxis(axis) {
  const xs = DATA.axes.x.map(x => unpack(x[axis]));
  Plotly.restyle(curves, {x: DATA.axes.of_trace.map(i => xs[i])});
  const titles = {};
  ["xaxis", "xaxis2", "xaxis3"].forEach(a => { titles[a + ".title.text"] = DATA.axes.titles[axis]; });
  Plotly.relayout(curves, titles);
  const missing = DATA.axes.missing[axis];
  document.getElementById("axis-note").textContent = missing.length ? "not recorded by: " + missing.join(", ") : "";
}
function showSamples(step) {
  const cells = DATA.samples.samples[step];
  const box = document.getElementById("samples");
  box.replaceChildren();
  DATA.samples.names.forEach((name, i) => {
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
const axis = document.getElementById("x-axis");
axis.addEventListener("change", () => setAxis(axis.value));
const smoothing = document.getElementById("smoothing");
smoothing.addEventListener("input", () => setSmoothing(Number(smoothing.value)));
const select = document.getElementById("sample-step");
select.addEventListener("change", () => showSamples(select.value));
showSamples(select.value);
"""


def html_report(comparison, rows: list[tuple[str, list[str]]]) -> str:
    """The page for a compare.Comparison and its summary rows (compare.summary_rows)."""
    arms, header = comparison.arms, [arm_name(arm) for arm in comparison.arms]
    fig = figure(arms)
    plot = fig.to_html(full_html=False, include_plotlyjs=True, div_id="curves", config={"responsive": True})
    firsts = [arm.first for arm in arms]
    steps = sample_steps(firsts)
    data = {
        "axes": axes_data(fig, arms),
        "samples": {"names": [f"{h}: {r.name}" for h, r in zip(header, firsts, strict=True)],
                    "samples": samples_at(firsts, steps)},
    }  # fmt: skip
    run_rows = [
        ("run folders", [", ".join(str(r.path) for r in arm.runs) for arm in arms]),
        ("ClearML", [clearml_cell(arm) for arm in arms]),
    ]
    options = "".join(f'<option value="{s}"{" selected" if s == steps[-1] else ""}>step {s}</option>' for s in steps)
    axis_options = "".join(f'<option value="{k}">{html.escape(v)}</option>' for k, v in AXES.items())
    baseline = f"{header[0]}: {comparison.baseline.name}, {comparison.reason}"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Run comparison</title>
<link rel="icon" href="data:,"><style>{PAGE_STYLE}
#samples {{ grid-template-columns: repeat({len(arms)}, minmax(0, 1fr)); }}</style></head>
<body>
<h1>Run comparison</h1>
<p>Baseline: {html.escape(baseline)}. An arm is the runs whose flags differ only in --seed; a verdict over seeds
is confirmed when Welch's t-test gives p &lt; 0.01.</p>
<h2>Summary</h2>
{html_table(header, rows + run_rows)}
<h2>Curves</h2>
<p>Each line is an arm's mean over its seeds; the shaded band spans their minimum to their maximum.</p>
<div class="controls">
<label>x-axis <select id="x-axis">{axis_options}</select> <span id="axis-note"></span></label>
<label>smoothing of Loss/train <input type="range" id="smoothing" min="0" max="0.99" step="0.01" value="0">
<span id="smoothing-value">0.00</span></label>
</div>
{plot}
<h2>Generated samples</h2>
<label>at evaluation <select id="sample-step">{options}</select></label>
<div id="samples"></div>
<h2>Flags</h2>
{flag_tables(arms, header)}
<script type="application/json" id="page-data">{script_json(data)}</script>
<script>{PAGE_SCRIPT}</script>
</body></html>
"""


def write_page(path: Path, text: str, runs: list[Run]) -> None:
    """The report at `path`, through a temporary file and a rename, so an open report is never half-written;
    ReportError where it must not go."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise ReportError(f"cannot write {path} ({e.strerror})") from None
    if st is not None and stat.S_ISLNK(st.st_mode):
        raise ReportError(f"{path} is a symbolic link; the report does not follow it (name a file)")
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise ReportError(f"{path} is not a regular file; the report replaces only a file (name one)")
    folder = path.parent.resolve()
    for run in runs:
        if folder == run.path.resolve() or folder.is_relative_to(run.path.resolve()):
            raise ReportError(f"{path} is inside the run {run.path}; compare never writes into a run")
    if any(os.path.lexists(folder / name) for name in RUN_FILES):
        raise ReportError(f"{path} is inside a run folder ({folder}); compare never writes into a run")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        atomic.replace(folder / path.name, lambda f: f.write(text.encode("utf-8", errors="replace")))
    except OSError as e:
        raise ReportError(f"cannot write {path} ({e.strerror})") from None
