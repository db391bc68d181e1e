"""main.py --baseline: a run clearly worse than its baseline stops after 20 % of its steps, as Ctrl+C would stop it;
a better one finishes; a baseline trained on other data is refused before training starts. Against a baseline arm
of seeds, the bound is the larger of --abort_margin and --abort_noise standard deviations of the seeds.

The baseline learns at the default rates, the worse run at a hundredth of them, the better run at higher ones.
"""

import argparse
import json
import math
import re

import pytest
from runner import TINY_MODEL, TRAIN_SAMPLE, make_project
from synthetic import evaluation, header, write_run

import compare

MAX_STEPS, EVAL_INTERVAL = 50, 5
RUN_FLAGS = [
    *TINY_MODEL,
    "--data", "mystories.txt", "--max_steps", str(MAX_STEPS), "--eval_interval", str(EVAL_INTERVAL),
    "--eval_iters", "2", "--warmup_steps", "5",
]  # fmt: skip
WORSE_RATES = ["--learning_rate", "1e-5", "--muon_lr", "2e-4", "--min_lr", "1e-6"]
BETTER_RATES = ["--learning_rate", "3e-3", "--muon_lr", "0.04"]


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    project = make_project(tmp_path_factory.mktemp("abort"))
    (project.path / "mystories.txt").write_bytes(TRAIN_SAMPLE.read_bytes()[:300_000])
    result = project.run(*RUN_FLAGS, "--out_dir", "BASE", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return project


def record(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_worse_run_stops_after_a_fifth_of_its_steps(project):
    result = project.run(*RUN_FLAGS, *WORSE_RATES, "--baseline", "BASE", "--out_dir", "WORSE", timeout=300)
    assert result.returncode == 130, result.stderr[-3000:]
    [line] = [line for line in result.stderr.splitlines() if "worse than the baseline BASE" in line]
    events = record(project.path / "WORSE")
    status = events[-1]
    assert status["event"] == "status" and status["status"] == "aborted"
    stop_step = int(re.search(r"at step (\d+)", line).group(1))
    first = math.ceil(0.2 * MAX_STEPS / EVAL_INTERVAL) * EVAL_INTERVAL  # the first evaluation at or after 20 %
    assert first + EVAL_INTERVAL <= stop_step <= first + 2 * EVAL_INTERVAL  # two evaluations in a row are worse
    assert status["step"] == stop_step + 1  # the step under way ends, as after Ctrl+C
    evaluated = {e["step"]: e["loss_val"] for e in events if e["event"] == "eval"}
    base = {e["step"]: e["loss_val"] for e in record(project.path / "BASE") if e["event"] == "eval"}
    for step in (stop_step - EVAL_INTERVAL, stop_step):
        assert evaluated[step] > 1.03 * base[step]
    assert f"Loss/val {evaluated[stop_step]:.4f} against {base[stop_step]:.4f}" in line
    assert (project.path / "WORSE" / "ckpt.pt").is_file()
    tags = project.sessions()[-1].task["tags"]
    assert "worse-than-baseline" in tags and "aborted" in tags


def test_better_run_finishes(project):
    result = project.run(*RUN_FLAGS, *BETTER_RATES, "--baseline", "BASE", "--out_dir", "BETTER", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    events = record(project.path / "BETTER")
    assert events[-1]["status"] == "completed" and events[-1]["step"] == MAX_STEPS
    base = [e["loss_val"] for e in record(project.path / "BASE") if e["event"] == "eval"]
    assert [e["loss_val"] for e in events if e["event"] == "eval"][-1] < base[-1]
    assert "worse-than-baseline" not in project.sessions()[-1].task["tags"]


def test_baseline_on_other_data_is_refused(project):
    other = project.path / "other.txt"
    other.write_bytes(TRAIN_SAMPLE.read_bytes()[300_000:600_000])
    result = project.refused(*RUN_FLAGS, "--data", "other.txt", "--baseline", "BASE", "--out_dir", "OTHER")
    assert result.returncode == 2
    assert "--baseline BASE: the baseline was trained on mystories.txt, this run on other.txt" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (project.path / "OTHER" / "metrics.jsonl").exists()


def test_missing_baseline_is_refused(project):
    result = project.refused(*RUN_FLAGS, "--baseline", "NOWHERE", "--out_dir", "MISSING")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].endswith("--baseline NOWHERE: NOWHERE does not exist")


# -------------------------------------------------------------------------------------------------------------------
# the bound, against a baseline arm of seeds written here


def seeds(folder, losses: list[float], steps=range(0, 101, 10)) -> None:
    """One run folder per seed under `folder`; each seed's Loss/val is its value at every step."""
    for seed, loss in enumerate(losses):
        flags = header()["flags"] | {"seed": seed}
        write_run(folder / f"s{seed}", head=header(flags=flags), events=[evaluation(s, loss) for s in steps])


def abort_against(folder, noise: float = 3.0) -> compare.EarlyAbort:
    cfg = argparse.Namespace(baseline=str(folder), max_steps=100, abort_after=0.2, abort_margin=0.03,
                             abort_noise=noise, vocab_size=512)  # fmt: skip
    return compare.EarlyAbort.against(cfg, "x.txt", "0123456789abcdef")


def first_stop(abort: compare.EarlyAbort, loss: float) -> tuple[int, str] | None:
    for step in range(20, 101, 10):
        if reason := abort.check(step, loss):
            return step, reason
    return None


@pytest.mark.timeout(30)
def test_bound_from_the_spread_of_the_baseline_seeds(tmp_path):
    seeds(tmp_path / "wide", [3.8, 4.0, 4.2])  # a standard deviation of 5 %: 3 of them is 15 %
    assert first_stop(abort_against(tmp_path / "wide"), 4.4) is None  # 10 % worse: within the seeds' noise
    step, reason = first_stop(abort_against(tmp_path / "wide"), 4.8)
    assert step == 30  # the second evaluation in a row from 20 % of 100 steps
    assert "Loss/val 4.8000 against 4.0000 (the mean of 3 seeds) at step 30 (+20.0%" in reason
    assert "more than 3 standard deviations of its 3 seeds (15.0%), twice in a row" in reason
    assert first_stop(abort_against(tmp_path / "wide", noise=0.0), 4.2)[1].count("the 3.0% margin") == 1

    seeds(tmp_path / "narrow", [3.99, 4.0, 4.01])  # 3 standard deviations are 0.75 %: the margin is larger
    assert "more than the 3.0% margin" in first_stop(abort_against(tmp_path / "narrow"), 4.2)[1]
    assert first_stop(abort_against(tmp_path / "narrow"), 4.1) is None

    seeds(tmp_path / "one", [4.0])
    assert (
        "against 4.0000 at step 30 (+5.0%, more than the 3.0% margin"
        in first_stop(abort_against(tmp_path / "one"), 4.2)[1]
    )


@pytest.mark.timeout(30)
def test_a_baseline_folder_of_several_configurations_is_refused(tmp_path):
    seeds(tmp_path / "mixed", [4.0, 4.1])
    write_run(tmp_path / "mixed" / "other", head=header(flags=header()["flags"] | {"dropout": 0.3}))
    with pytest.raises(compare.CompareError, match="holds runs of 2 configurations"):
        abort_against(tmp_path / "mixed")
