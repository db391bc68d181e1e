"""
Compare training runs, with or without a ClearML server: a table in the terminal, or one HTML page.

    python compare.py runs/baseline runs/dropout-0.1 runs/dropout-0.2
    python compare.py runs/ --baseline runs/baseline-seeds --html report.html

Design choices:
- Reads what the runs wrote (records.py): run folders and ClearML offline sessions, as hostile input. It never writes
  into a run; --html refuses to (report.py).
- Runs that differ only in their seed are one arm (arms.py), shown as one column: its seeds, the mean ± standard
  deviation of best and last Loss/val and BPB over them, and the verdict against the baseline arm with its noise
  (Welch's t-test, confirmed at p < 0.01). With one seed on a side, the noise is unknown: the command that measures
  it is printed below the table.
- The baseline is `--baseline`, else the first run given; a folder of runs is read in the order they started (the
  runs' own record, not their names). The table says which and why.
- The terminal table fits TABLE_WIDTH columns whatever the number of arms: cells wrap, never cut, and arms that do
  not fit beside each other continue in a second block. Text from records is cleaned of control characters, so a
  comment cannot move the cursor or clear the screen.
- Only the flags that differ between arms are shown; flags that do not change training never count (arms.py).
- EarlyAbort is the same comparison made during training: main.py --baseline stops a run that is worse than its
  baseline arm at two evaluations in a row, from --abort_after of its steps on, by more than --abort_margin or, with
  two or more baseline seeds, --abort_noise times their standard deviation at that step, whichever is larger.
"""

import argparse
import os
import shlex
import sys
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import arms as arms_module
from arms import CONFIRM_P, Arm, Verdict
from errors import UsageError
from records import RecordError, Run, is_record, is_session, load_run, read_runs, terminal_text, warn

WORSE_THAN_BASELINE = "worse-than-baseline"
TABLE_WIDTH = 100
MIN_CELL = 16  # narrower columns than this continue the table in another block instead
ABORT_NOISE = 3.0  # --abort_noise default. A run of the baseline's own configuration lands beyond its seeds' mean +
# 3 standard deviations at about 6 % of evaluations with 3 seeds, 2.6 % with 5 (Student's t, n - 1 degrees of
# freedom, for one new draw); the margin is the larger bound unless the seeds scatter by more than 1 %


class CompareError(UsageError):
    """A mistake in what was asked to compare; the message is one line for the user."""


@dataclass
class Comparison:
    runs: list[Run]
    arms: list[Arm]  # the baseline's arm first
    baseline: Run
    reason: str  # why this run is the baseline
    verdicts: list[Verdict | None]  # one per arm; None for the baseline's and for an arm with no common step


# -------------------------------------------------------------------------------------------------------------------
# gathering the runs


def gather(paths: list[Path], baseline_path: Path | None) -> Comparison:
    """The runs that can be compared, their arms and verdicts; CompareError when nothing can be compared."""
    given = baseline_runs(baseline_path) if baseline_path is not None else []
    runs, seen = [], set()
    for run in given + read_runs(paths):
        if (key := run.path.resolve()) not in seen:
            seen.add(key)
            runs.append(run)
    evaluated = []
    for run in runs:
        if len(run.steps):
            evaluated.append(run)
        else:
            warn(f"{run.path} has no evaluation yet; left out")
    if not evaluated:
        raise CompareError("no run with an evaluation to compare")
    baseline = evaluated[0]
    if given:
        reason = "chosen by --baseline"
    elif any(baseline.path == p for p in paths):
        reason = "the first run given"
    else:
        folder = next((p for p in paths if baseline.path.is_relative_to(p)), baseline.path.parent)
        reason = f"the first run to start in {folder}"
    unique_names(evaluated)
    check_tokenizers(evaluated, baseline)
    arms = arms_module.group_arms(evaluated, baseline)
    verdicts = [None] + [arms_module.compare_arms(arm, arms[0]) for arm in arms[1:]]
    return Comparison(evaluated, arms, baseline, reason, verdicts)


def baseline_runs(path: Path) -> list[Run]:
    """The baseline: one run, or a folder holding the seeds of one configuration; CompareError if it has no
    evaluation."""
    try:
        runs = [load_run(path)] if is_record(path) or is_session(path) or not path.is_dir() else read_runs([path])
    except RecordError as e:
        raise CompareError(str(e)) from None
    if not any(len(r.steps) for r in runs):
        raise CompareError(f"the baseline {path} has no evaluation yet")
    return runs


def unique_names(runs: list[Run]) -> None:
    """When two runs are named alike (seed folders of two groups), every run is named with its folder as well."""
    names = [r.name for r in runs]
    if len(set(names)) < len(names):
        for run in runs:
            run.name = f"{run.path.parent.name}/{run.name}"


def check_tokenizers(runs: list[Run], baseline: Run) -> None:
    for run in runs:
        if run is not baseline and not run.comparable_loss(baseline):
            warn(
                f"{run.name} and the baseline {baseline.name} use different tokenizers: Loss is not comparable "
                f"between them, so the verdict compares BPB"
            )


# -------------------------------------------------------------------------------------------------------------------
# the comparison as rows of text, shared by the terminal table and the HTML page


def summary_rows(comparison: Comparison) -> list[tuple[str, list[str]]]:
    """(row name, one cell per arm)."""
    arms, verdicts = comparison.arms, comparison.verdicts
    rows = [
        ("runs", [", ".join(r.name for r in arm.runs) for arm in arms]),
        ("seeds", [seeds_text(arm) for arm in arms]),
        (
            "hypothesis",
            [" / ".join(dict.fromkeys(r.hypothesis for r in arm.runs if r.hypothesis)) or "-" for arm in arms],
        ),
        ("status", [status_text(arm) for arm in arms]),
    ]
    rows += [(f"--{k}", [arm.flags.get(k) or "-" for arm in arms]) for k in arms_module.differing_flags(arms)]
    rows += [
        ("steps", [spread_text([int(r.steps[-1]) for r in arm.runs], "{:d}") for arm in arms]),
        ("tokens", [spread_text([r.evals["tokens"][-1] for r in arm.runs], "{:,.0f}") for arm in arms]),
        ("wall time", [wall_time(float(np.mean([r.wall_time for r in arm.runs]))) for arm in arms]),
        ("parameters", [spread_text([r.parameters for r in arm.runs], "{:,}") for arm in arms]),
        ("tokens/s", [spread_text([r.tokens_per_s for r in arm.runs], "{:,.0f}") for arm in arms]),
    ]
    for metric in ("Loss/val", "BPB"):
        best_last = [best_and_last(arm, metric) for arm in arms]
        rows += [(f"best {metric}", [b for b, _ in best_last]), (f"last {metric}", [last for _, last in best_last])]
    rows += [
        (
            "vs baseline",
            ["baseline" if i == 0 else v.text() if v else "no common step" for i, v in enumerate(verdicts)],
        ),
        ("compared at", ["-" if not v else f"{v.metric}, step {v.step}" for v in verdicts]),
        ("crossover", ["-" if i == 0 else crossover_text(v) for i, v in enumerate(verdicts)]),
        ("commit", [", ".join(dict.fromkeys(commit_text(r) for r in arm.runs)) for arm in arms]),
    ]
    return rows


def seeds_text(arm: Arm) -> str:
    return f"{len(arm.runs)}: {', '.join(arm.seeds)}" if len(arm.runs) > 1 else arm.seeds[0]


def status_text(arm: Arm) -> str:
    """ "completed", "3 completed", or each run's status with its message."""
    texts = [r.status + (f": {r.message}" if r.message and r.status != "completed" else "") for r in arm.runs]
    if len(set(texts)) == 1:
        return texts[0] if len(texts) == 1 else f"{len(texts)} {texts[0]}"
    return "; ".join(f"{r.name} {text}" for r, text in zip(arm.runs, texts, strict=True))


def spread_text(values: list, form: str) -> str:
    """One value, or the range of the arm's values; "-" when none is recorded."""
    values = [v for v in values if v is not None and np.isfinite(v)]
    if not values:
        return "-"
    low, high = min(values), max(values)
    return form.format(low) if low == high else f"{form.format(low)} to {form.format(high)}"


def best_and_last(arm: Arm, metric: str) -> tuple[str, str]:
    """Best and last value: of the run, with its step; of an arm of seeds, mean ± standard deviation over them."""
    curves = arm.curves(metric)
    if not curves:
        return "-", "-"
    if len(curves) == 1:
        steps, values = curves[0]
        best = int(np.argmin(values))
        return f"{values[best]:.4f} @ {int(steps[best])}", f"{values[-1]:.4f} @ {int(steps[-1])}"
    best = np.array([values.min() for _, values in curves])
    last = np.array([values[-1] for _, values in curves])
    return f"{best.mean():.4f} ± {best.std(ddof=1):.4f}", f"{last.mean():.4f} ± {last.std(ddof=1):.4f}"


def wall_time(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m{seconds:02d}s"


def crossover_text(verdict: Verdict | None) -> str:
    if verdict is None or verdict.crossover is None:
        return "none"
    side = "passes the baseline" if verdict.relative < 0 else "falls behind the baseline"
    return f"step {verdict.crossover}: {side}"


def commit_text(run: Run) -> str:
    if not run.commit:
        return "unknown"
    return run.commit[:10] + (" (dirty)" if run.dirty else "")


def notes(comparison: Comparison, columns: int) -> list[str]:
    """What the table needs said below it: the baseline and why, the test's bar, and how to measure unknown noise."""
    base = comparison.arms[0]
    lines = [f"baseline: {comparison.baseline.name} ({comparison.reason})"]
    if any(v and v.p is not None for v in comparison.verdicts):
        lines.append(f"confirmed: p < {CONFIRM_P:g} in Welch's t-test over the seeds at the step compared")
    unknown = [arm for arm, v in zip(comparison.arms, comparison.verdicts, strict=True) if v and v.p is None]
    lines = [terminal_text(line) for line in lines]
    for arm in dict.fromkeys(a for a in unknown + ([base] if unknown else []) if len(a.runs) == 1):
        name = "the baseline" if arm is base else arm.label
        lines.append(terminal_text(f"seed noise unknown; measure it for {name} ({arm.first.name}) with:"))
        lines += command_lines(arms_module.noise_command(arm), columns)
    return lines


def command_lines(words: list[str], columns: int) -> list[str]:
    """A shell command, indented, broken with a backslash between one flag with its values and the next, to fit
    `columns` where they allow."""
    units = []
    for word in map(terminal_text, map(shlex.quote, words)):
        if word.startswith("--") or not units:
            units.append(word)
        else:
            units[-1] += " " + word
    lines, line = [], "   "
    for unit in units:
        if len(line) > 3 and width(line) + 1 + width(unit) > columns - 2:
            lines.append(line + " \\")
            line = "       "
        line += " " + unit
    return [*lines, line]


# -------------------------------------------------------------------------------------------------------------------
# the terminal table


def width(text: str) -> int:
    """Columns a terminal gives `text`: two for wide characters, none for combining ones."""
    return sum(0 if unicodedata.combining(c) else 2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def wrap(text: str, columns: int) -> list[str]:
    """`text` in lines of at most `columns`, broken at spaces where it can be, inside a word where it must."""
    lines, line = [], ""
    for word in text.split(" "):
        candidate = f"{line} {word}" if line else word
        if width(candidate) <= columns:
            line = candidate
            continue
        if line:
            lines.append(line)
        line = ""
        for c in word:
            if width(line + c) > columns:
                lines.append(line)
                line = ""
            line += c
    return [*lines, line]


def terminal_table(comparison: Comparison, columns: int = TABLE_WIDTH) -> str:
    header = [arm.label + (f" ({len(arm.runs)} seeds)" if len(arm.runs) > 1 else "") for arm in comparison.arms]
    rows = [("arm", header), *summary_rows(comparison)]
    rows = [(terminal_text(name), [terminal_text(c) for c in cells]) for name, cells in rows]
    name_width = max(width(name) for name, _ in rows)
    per_block = max(1, (columns - name_width) // (MIN_CELL + 2))
    others = list(range(1, len(header)))
    if len(header) <= per_block:
        blocks = [[0, *others]]
    elif per_block == 1:
        blocks = [[i] for i in range(len(header))]
    else:  # the baseline's column starts every block, so each reads on its own
        blocks = [[0, *others[i : i + per_block - 1]] for i in range(0, len(others), per_block - 1)]
    text = "\n\n".join(block_text(rows, block, name_width, columns) for block in blocks)
    return text + "\n\n" + "\n".join(notes(comparison, columns))


def block_text(rows: list[tuple[str, list[str]]], block: list[int], name_width: int, columns: int) -> str:
    """Some arms' columns, each cell wrapped to its column; a row takes the lines its tallest cell needs."""
    room = columns - name_width - 2 * len(block)
    natural = [max(width(cells[i]) for _, cells in rows) for i in block]
    widths = fair_widths(natural, room)
    lines = []
    for r, (name, cells) in enumerate(rows):
        wrapped = [wrap(cells[i], w) for i, w in zip(block, widths, strict=True)]
        for k in range(max(map(len, wrapped))):
            parts = [name if k == 0 else ""] + [lines_[k] if k < len(lines_) else "" for lines_ in wrapped]
            lines.append("  ".join(pad(p, w) for p, w in zip(parts, [name_width, *widths], strict=True)).rstrip())
        if r == 0:
            lines.append("  ".join("-" * w for w in [name_width, *widths]))
    return "\n".join(lines)


def fair_widths(natural: list[int], room: int) -> list[int]:
    """Column widths within `room`: a column that needs less than an equal share keeps its width, the others share
    what is left."""
    widths, left, open_columns = list(natural), room, list(range(len(natural)))
    while open_columns:
        share = max(1, left // len(open_columns))
        narrow = [i for i in open_columns if natural[i] <= share]
        if not narrow:
            for i in open_columns:
                widths[i] = share
            break
        for i in narrow:
            left -= natural[i]
            open_columns.remove(i)
    return widths


def pad(text: str, columns: int) -> str:
    return text + " " * (columns - width(text))


# -------------------------------------------------------------------------------------------------------------------
# early abort during training


class EarlyAbort:
    """Decides at each evaluation whether a run is clearly worse than its baseline arm at the same step."""

    def __init__(self, baseline: Arm, name: str, max_steps: int, after: float, margin: float, noise: float):
        self.baseline, self.name, self.margin, self.noise = baseline, name, margin, noise
        self.first_step = after * max_steps  # main.py moves it when --max_seconds fixes the step count
        self.band = baseline.band("Loss/val")
        self.worse_in_a_row = 0

    @classmethod
    def against(cls, cfg, dataset: str, tokenizer_fingerprint: str) -> "EarlyAbort | None":
        """From the run's configuration (baseline, max_steps, abort_after, abort_margin, abort_noise, vocab_size),
        once the data is known; CompareError when the baseline cannot be compared."""
        if not cfg.baseline:
            return None
        path = Path(cfg.baseline)
        runs = [r for r in baseline_runs(path) if len(r.curve("Loss/val")[0])]
        if not runs:
            raise CompareError("the baseline has no evaluation yet")
        arms = arms_module.group_arms(runs, runs[0])
        if len(arms) > 1:
            raise CompareError(f"{path} holds runs of {len(arms)} configurations; name one, or a folder of its seeds")
        for run in runs:
            check_baseline(run, dataset, tokenizer_fingerprint, cfg.vocab_size)
        if arms[0].band("Loss/val") is None:
            raise CompareError(f"the seeds in {path} share no evaluated step")
        noise = getattr(cfg, "abort_noise", ABORT_NOISE)  # a configuration recorded before the flag existed
        return cls(arms[0], path.name or str(path), cfg.max_steps, cfg.abort_after, cfg.abort_margin, noise)

    def check(self, step: int, loss: float) -> str | None:
        """The reason to stop, when Loss/val is worse than the baseline's by more than the bound twice in a row."""
        grid = self.band.grid
        if step < self.first_step or step > grid[-1] or step < grid[0]:
            self.worse_in_a_row = 0  # before the grace period, or where the baseline has no evaluation to compare
            return None
        base = float(np.interp(step, grid, self.band.mean))
        spread = float(np.interp(step, grid, self.band.std)) / base
        bound = max(self.margin, self.noise * spread) if self.band.n > 1 else self.margin
        self.worse_in_a_row = self.worse_in_a_row + 1 if loss > base * (1 + bound) else 0
        if self.worse_in_a_row < 2:
            return None
        if self.band.n > 1 and self.noise * spread > self.margin:
            which = f"{self.noise:g} standard deviations of its {self.band.n} seeds ({spread * self.noise:.1%})"
        else:
            which = f"the {self.margin:.1%} margin"
        against = f"{base:.4f}" + (f" (the mean of {self.band.n} seeds)" if self.band.n > 1 else "")
        return (
            f"worse than the baseline {self.name}: Loss/val {loss:.4f} against {against} at step {step} "
            f"({(loss - base) / base:+.1%}, more than {which}, twice in a row); stopped"
        )


def check_baseline(run: Run, dataset: str, tokenizer_fingerprint: str, vocab_size: int) -> None:
    """CompareError unless the baseline run's Loss/val compares with this run's."""
    if run.dataset != dataset:
        raise CompareError(f"the baseline was trained on {run.dataset}, this run on {dataset}")
    if run.tokenizer not in (None, tokenizer_fingerprint) or (run.tokenizer is None and run.vocab_size != vocab_size):
        raise CompareError("the baseline used another tokenizer, so its Loss/val is not comparable")
    steps, losses = run.curve("Loss/val")
    if (losses <= 0).any():
        at = int(np.argmax(losses <= 0))
        raise CompareError(
            f"{run.name} records Loss/val {losses[at]:g} at step {int(steps[at])}; a loss is never 0 or below, "
            f"so its record is not a baseline"
        )


# -------------------------------------------------------------------------------------------------------------------
# command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Compare training runs: run folders, folders holding them, or ClearML offline sessions."
    )
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN", help="run folder, folder of runs, or session")
    parser.add_argument(
        "--baseline", type=Path, default=None, metavar="RUN", help="run or folder of seeds to compare against"
    )
    parser.add_argument("--html", type=Path, default=None, metavar="FILE", help="also write an HTML report")
    args = parser.parse_args(argv)
    try:
        comparison = gather(args.runs, args.baseline)
        print(terminal_table(comparison))
        if args.html:
            import report  # imported here: plotly takes a while to import, and the table does not need it

            report.write_page(args.html, report.html_report(comparison, summary_rows(comparison)), comparison.runs)
            print(f"report written to {terminal_text(str(args.html))}")
    except UsageError as e:
        print(f"error: {terminal_text(str(e))}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the table piped into `head`, which has read what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush meets no closed pipe
    return 0


if __name__ == "__main__":
    sys.exit(main())
