"""
Seed arms: runs whose configuration is the same but for the seed are one arm, and an arm is compared with the
baseline arm seed against seed, so that "better" means better than seed noise.

Design choices:
- An arm is the runs whose flags are equal except --seed and SAME_TRAINING: where a run is kept and how it is
  tracked or launched, how often the loss is read off the device or a checkpoint is written, and the early abort
  (which can end a run, not change it). Everything else, device and dtype included, makes another arm.
- An arm's curve: each seed interpolated linearly onto the union of the seeds' evaluation steps, up to the last step
  every seed reached; then the mean, the standard deviation (n - 1 in the denominator) and min/max over the seeds.
- The verdict compares an arm with the baseline arm at the last step both reached, on Loss/val when the tokenizers
  are shared, else on bits per byte. The difference of the means, relative to the baseline's mean, ± its standard
  error (sqrt(s_a²/n_a + s_b²/n_b) / baseline mean), and Welch's two-sided t-test, its t distribution from scipy:
  it does not assume that two configurations scatter alike across seeds. Confirmed when p < CONFIRM_P = 0.01, the
  bar modded-nanogpt sets for a new record: a change that does nothing is confirmed once in a hundred comparisons.
  With one seed on a side the noise is unknown, and the verdict says so; noise_command gives the command that
  measures it.
- An arm is labelled by what differs from the baseline arm (`dropout=0.3`), so legends and columns say what changed.
"""

import math
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from records import Run, flag_int

SAME_TRAINING = {
    "seed", "out_dir", "resume", "comment", "tags", "task_name", "project", "offline", "queue", "overwrite",
    "new_data", "cache_dir", "baseline", "abort_after", "abort_margin", "abort_noise", "log_interval",
    "checkpoint_interval", "max_seconds",  # --max_seconds is recorded as the --max_steps it was turned into
}  # fmt: skip
NOT_FLAGS = {"world_size"}  # recorded among the flags (how many processes ran), but not one that can be typed
NEGATABLE = {"bias", "compile"}  # flags written --no-NAME when off (argparse.BooleanOptionalAction in main.py)
NOT_APPLICABLE = {  # flag -> when it does not apply, given an arm's flags
    "tinystories_url": lambda f: f.get("data", "tinystories") != "tinystories",
    "tinystories_version": lambda f: f.get("data", "tinystories") != "tinystories",
    "val_fraction": lambda f: f.get("data", "tinystories") == "tinystories",
    "muon_lr": lambda f: f.get("optimizer") == "adamw",
    "eval_split": lambda f: f.get("eval_only") != "True",
    "top_k": lambda f: f.get("temperature") in ("0", "0.0"),
    "temperature": lambda f: f.get("sample_tokens") == "0",
    "prompt": lambda f: f.get("sample_tokens") == "0",
}


def applies(name: str, flags: dict[str, str]) -> bool:
    """Whether a flag has any effect given the others (a local file has no TinyStories URL, AdamW no Muon rate)."""
    return not NOT_APPLICABLE.get(name, lambda f: False)(flags)


CONFIRM_P = 0.01
SAME = 5e-4  # relative differences below this are reported as equal
NOISE_SEEDS = 2  # noise_command adds this many seeds to the one a run has


@dataclass
class Band:
    """An arm's curve: its seeds on a common grid of steps."""

    grid: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    low: np.ndarray
    high: np.ndarray
    n: int


@dataclass(eq=False)  # an arm is itself: hashed and compared by identity
class Arm:
    runs: list[Run]
    label: str = ""
    bands: dict = field(default_factory=dict, repr=False)

    @property
    def first(self) -> Run:
        return self.runs[0]

    @cached_property
    def flags(self) -> dict[str, str]:
        """The flags that make the arm, those of its first run."""
        return {k: v for k, v in self.first.flags.items() if k not in SAME_TRAINING}

    @property
    def seeds(self) -> list[str]:
        return [r.flags.get("seed", "?") for r in self.runs]

    def curves(self, metric: str) -> list[tuple[np.ndarray, np.ndarray]]:
        """Each seed's curve, leaving out the seeds that recorded none."""
        return [c for c in (r.curve(metric) for r in self.runs) if len(c[0])]

    def band(self, metric: str) -> Band | None:
        if metric not in self.bands:
            self.bands[metric] = band_of(self.curves(metric))
        return self.bands[metric]

    def values_at(self, metric: str, step: float) -> np.ndarray:
        return np.array([np.interp(step, steps, values) for steps, values in self.curves(metric)])

    def comparable_loss(self, other: "Arm") -> bool:
        return all(a.comparable_loss(b) for a in self.runs for b in other.runs)


def band_of(curves: list[tuple[np.ndarray, np.ndarray]]) -> Band | None:
    if not curves:
        return None
    low, high = max(s[0] for s, _ in curves), min(s[-1] for s, _ in curves)
    if low > high:  # the seeds share no stretch of steps
        return None
    grid = np.unique(np.concatenate([s for s, _ in curves]))
    grid = grid[(grid >= low) & (grid <= high)]
    matrix = np.vstack([np.interp(grid, s, v) for s, v in curves])
    std = matrix.std(axis=0, ddof=1) if len(curves) > 1 else np.zeros(len(grid))
    return Band(grid, matrix.mean(axis=0), std, matrix.min(axis=0), matrix.max(axis=0), len(curves))


def arm_key(run: Run) -> tuple:
    return run.dataset, tuple(sorted((k, v) for k, v in run.flags.items() if k not in SAME_TRAINING))


def group_arms(runs: list[Run], baseline: Run) -> list[Arm]:
    """The runs' arms in the order their first runs come, the baseline's arm first, each labelled; an arm's runs
    by seed."""
    arms: dict[tuple, Arm] = {}
    for run in [baseline] + [r for r in runs if r is not baseline]:
        arms.setdefault(arm_key(run), Arm([])).runs.append(run)
    ordered = list(arms.values())
    for arm in ordered:
        arm.runs.sort(key=seed_order)  # seeds in order, however their runs were started
        arm.label = label(arm, ordered[0])
    return ordered


def seed_order(run: Run) -> tuple:
    seed = run.flags.get("seed", "")
    return (0, int(seed), "") if seed.isdigit() else (1, 0, seed)


def label(arm: Arm, baseline: Arm) -> str:
    """What differs from the baseline arm, as `name=value`; "baseline" for the baseline's own arm."""
    if arm is baseline:
        return "baseline"
    names = sorted(set(arm.flags) | set(baseline.flags))
    changes = [f"{k}={arm.flags.get(k) or '-'}" for k in names if arm.flags.get(k, "") != baseline.flags.get(k, "")]
    if arm.first.dataset != baseline.first.dataset and not changes:
        changes.append(f"dataset={arm.first.dataset}")
    return ", ".join(changes) or arm.first.name


def differing_flags(arms: list[Arm]) -> list[str]:
    names = sorted({k for arm in arms for k in arm.flags})
    return [k for k in names if len({arm.flags.get(k, "") for arm in arms}) > 1]


# -------------------------------------------------------------------------------------------------------------------
# the verdict


@dataclass
class Verdict:
    metric: str  # "Loss/val" or "BPB"
    step: int  # the last step both arms reached
    values: np.ndarray  # the arm's seeds at that step
    baseline: np.ndarray  # the baseline arm's seeds at that step
    crossover: int | None  # the step from which the arm's mean stayed on its side of the baseline's; None if never
    p: float | None = None  # Welch's t-test; None with one seed on a side

    @property
    def relative(self) -> float:
        """(mean - baseline mean) / baseline mean; NaN when the baseline's mean is not positive (no loss is)."""
        base = float(self.baseline.mean())
        return (float(self.values.mean()) - base) / base if base > 0 else math.nan

    @property
    def error(self) -> float:
        """The standard error of `relative`, from both arms' seeds; NaN with one seed on a side."""
        if min(len(self.values), len(self.baseline)) < 2 or not self.baseline.mean() > 0:
            return math.nan
        variance = self.values.var(ddof=1) / len(self.values) + self.baseline.var(ddof=1) / len(self.baseline)
        return math.sqrt(variance) / float(self.baseline.mean())

    @property
    def confirmed(self) -> bool:
        return self.p is not None and self.p < CONFIRM_P

    def text(self) -> str:
        relative, seeds = self.relative, f"{len(self.values)} vs {len(self.baseline)} seeds"
        if math.isnan(relative):
            return f"not comparable: the baseline's {self.metric} is not positive"
        if self.p is None:
            if abs(relative) < SAME:
                return f"same as baseline ({seeds}): noise unknown"
            word, by = "better" if relative < 0 else "worse", abs(float(self.values.mean() - self.baseline.mean()))
            return f"{word} by {by:.4f} ({percent(abs(relative))}, {seeds}): noise unknown"
        p = "n/a" if math.isnan(self.p) else "< 0.0001" if self.p < 1e-4 else f"= {self.p:.2g}"
        if self.confirmed:
            word = "better" if relative < 0 else "worse"
            return f"{word} by {percent(abs(relative))} ± {percent(self.error)} ({seeds}, p {p}): confirmed"
        return (
            f"within seed noise ({percent(relative, sign=True)} ± {percent(self.error)}, {seeds}, p {p}): not confirmed"
        )


def percent(x: float, sign: bool = False) -> str:
    return (f"{100 * x:+.1f} %" if sign else f"{100 * x:.1f} %") if math.isfinite(x) else "?"


def compare_arms(arm: Arm, baseline: Arm) -> Verdict | None:
    """The arm against the baseline arm at the last step both reached; None if their curves do not overlap."""
    metric = "Loss/val" if arm.comparable_loss(baseline) else "BPB"
    a, b = arm.band(metric), baseline.band(metric)
    if a is None or b is None:
        return None
    low, high = max(a.grid[0], b.grid[0]), min(a.grid[-1], b.grid[-1])
    if low > high:
        return None
    grid = np.union1d(a.grid, b.grid)
    grid = grid[(grid >= low) & (grid <= high)]
    diff = np.interp(grid, a.grid, a.mean) - np.interp(grid, b.grid, b.mean)
    verdict = Verdict(metric, int(high), arm.values_at(metric, high), baseline.values_at(metric, high),
                      crossover_step(grid, diff))  # fmt: skip
    if min(len(verdict.values), len(verdict.baseline)) >= 2:
        verdict.p = welch_p(verdict.values, verdict.baseline)
    return verdict


def welch_p(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sided p-value of Welch's t-test, with the Welch-Satterthwaite degrees of freedom; NaN when neither side
    has any spread. The same number as scipy.stats.ttest_ind(a, b, equal_var=False), whose import alone (0.85 s)
    would take half of compare's time budget: the t distribution comes from scipy.special (0.25 s)."""
    from scipy.special import stdtr  # imported here: only verdicts between arms of seeds need it

    var_a, var_b = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    if var_a + var_b == 0:
        return math.nan
    t = (a.mean() - b.mean()) / math.sqrt(var_a + var_b)
    dof = (var_a + var_b) ** 2 / (var_a**2 / (len(a) - 1) + var_b**2 / (len(b) - 1))
    return float(2 * stdtr(dof, -abs(t)))


def crossover_step(grid: np.ndarray, diff: np.ndarray) -> int | None:
    """The first step of the last stretch where `diff` keeps its sign, if it had another sign before (zeros skipped)."""
    signs = np.sign(diff)
    nonzero = np.flatnonzero(signs)
    if not len(nonzero):
        return None
    changes = np.flatnonzero(signs[nonzero][1:] != signs[nonzero][:-1])
    return int(grid[nonzero[changes[-1] + 1]]) if len(changes) else None


def noise_command(arm: Arm) -> list[str]:
    """The command, as words, that runs this arm's configuration with NOISE_SEEDS more seeds (main.py --seeds)."""
    words = ["python", "main.py"]
    for name, value in arm.first.flags.items():
        if name in SAME_TRAINING | NOT_FLAGS or value in ("", "None") or (value == "False" and name not in NEGATABLE):
            continue
        if not applies(name, arm.first.flags):
            continue
        if value in ("True", "False"):
            words.append(f"--{name}" if value == "True" else f"--no-{name}")
        else:
            words += [f"--{name}", value]
    if arm.first.hypothesis:
        words += ["--comment", arm.first.hypothesis]
    seed = max((flag_int(r.flags, "seed") or 0 for r in arm.runs), default=0)
    words += ["--seeds", *(str(seed + i) for i in range(1, NOISE_SEEDS + 1))]
    return words
