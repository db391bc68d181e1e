"""compare.py on real runs: three tiny runs that differ in --dropout, read from their run folders and from their
ClearML offline sessions, shown as a terminal table and as an HTML page opened in a real headless Chromium.

The expected verdicts and crossovers are computed here from the numbers the runs recorded in metrics.jsonl.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest
from browser import chromium_driver
from runner import TINY_MODEL, TRAIN_SAMPLE, git, make_project, table_row, wait_for_line

DROPOUTS = ("0.0", "0.1", "0.2")
RUN_FLAGS = [
    *TINY_MODEL,
    "--data", "mystories.txt", "--max_steps", "30", "--eval_interval", "5", "--eval_iters", "2",
    "--warmup_steps", "5",
]  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three finished runs under runs/ in one project; a small slice of the sample keeps the tokenizer quick."""
    project = make_project(tmp_path_factory.mktemp("compare"))
    (project.path / "mystories.txt").write_bytes(TRAIN_SAMPLE.read_bytes()[:300_000])
    for dropout in DROPOUTS:
        result = project.run(
            *RUN_FLAGS,
            "--dropout",
            dropout,
            "--comment",
            f"dropout {dropout}",
            "--out_dir",
            f"runs/d{dropout}",
            timeout=300,
        )
        assert result.returncode == 0, result.stderr[-3000:]
    return project


def compare(project, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "compare.py", *args], cwd=project.path, capture_output=True, text=True, timeout=60
    )


def recorded_evals(folder) -> dict[int, dict]:
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    return {e["step"]: e for e in map(json.loads, lines) if e["event"] == "eval"}


def expected_verdict(run: dict[int, dict], baseline: dict[int, dict]) -> tuple[str, str]:
    """Verdict and crossover at the steps both runs evaluated (the runs share their evaluation steps)."""
    steps = sorted(set(run) & set(baseline))
    diffs = [run[s]["loss_val"] - baseline[s]["loss_val"] for s in steps]
    last, base = run[steps[-1]]["loss_val"], baseline[steps[-1]]["loss_val"]
    word = "better" if last < base else "worse"
    verdict = f"{word} by {abs(last - base):.4f} ({100 * abs(last - base) / base:.1f} %, 1 vs 1 seeds): noise unknown"
    signed = [(s, d > 0) for s, d in zip(steps, diffs, strict=True) if d != 0]
    changes = [signed[i][0] for i in range(1, len(signed)) if signed[i][1] != signed[i - 1][1]]
    crossover = (
        "none"
        if not changes
        else f"step {changes[-1]}: " + ("passes the baseline" if last < base else "falls behind the baseline")
    )
    return verdict, crossover


def test_record_holds_the_run(runs):
    folder = runs.path / "runs" / "d0.1"
    header = json.loads((folder / "run.json").read_text())
    assert header["hypothesis"] == "dropout 0.1"
    assert header["flags"]["dropout"] == 0.1 and header["dataset"] == "mystories.txt"
    assert header["tokenizer"]["vocab_size"] == 512 and len(header["tokenizer"]["fingerprint"]) == 16
    assert header["git"] == {"commit": git(runs.path, "rev-parse", "HEAD"), "dirty": False}
    assert header["clearml"]["offline_session"].endswith(".zip")
    events = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [e["status"] for e in events if e["event"] == "status"] == ["running", "completed"]
    evals = [e for e in events if e["event"] == "eval"]
    assert [e["step"] for e in evals] == [0, 5, 10, 15, 20, 25, 30]
    assert all(e["sample"].startswith("Once upon a time") for e in evals)
    assert evals[-1]["tokens"] == 30 * 16 * 64 and evals[-1]["elapsed"] > evals[0]["elapsed"]


def test_terminal_table(runs):
    result = compare(runs, "runs/d0.0", "runs/d0.1", "runs/d0.2")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    table = result.stdout
    assert table_row(table, "arm") == ["baseline", "dropout=0.1", "dropout=0.2"]
    assert table_row(table, "runs") == ["d0.0", "d0.1", "d0.2"]
    assert table_row(table, "--dropout") == list(DROPOUTS)
    flag_rows = re.findall(r"^--\w+", table, flags=re.M)
    assert flag_rows == ["--dropout"]  # every other flag is the same; run folders and comments do not count
    assert table_row(table, "hypothesis") == [f"dropout {d}" for d in DROPOUTS]
    assert table_row(table, "status") == ["completed"] * 3
    assert table_row(table, "steps") == ["30"] * 3
    baseline = recorded_evals(runs.path / "runs" / "d0.0")
    verdicts, crossovers = ["baseline"], ["-"]
    for dropout in DROPOUTS[1:]:
        verdict, crossover = expected_verdict(recorded_evals(runs.path / "runs" / f"d{dropout}"), baseline)
        verdicts.append(verdict)
        crossovers.append(crossover)
    assert table_row(table, "vs baseline") == verdicts
    assert table_row(table, "crossover") == crossovers
    assert table_row(table, "best Loss/val")[0] == f"{min(e['loss_val'] for e in baseline.values()):.4f} @ 30"


def test_baseline_flag_and_folder_of_runs(runs):
    result = compare(runs, "runs", "--baseline", "runs/d0.2")
    assert result.returncode == 0, result.stderr
    assert table_row(result.stdout, "runs") == ["d0.2", "d0.0", "d0.1"]  # the folder's runs in the order they started
    assert "baseline: d0.2 (chosen by --baseline)" in result.stdout
    by_start = compare(runs, "runs")
    assert table_row(by_start.stdout, "runs") == ["d0.0", "d0.1", "d0.2"]
    assert "baseline: d0.0 (the first run to start in runs)" in by_start.stdout


def test_offline_sessions_read_like_run_folders(runs):
    sessions = sorted((runs.home / ".clearml" / "cache" / "offline").glob("*.zip"), key=os.path.getmtime)
    assert len(sessions) == 3
    from_sessions = compare(runs, *map(str, sessions))
    from_folders = compare(runs, "runs/d0.0", "runs/d0.1", "runs/d0.2")
    assert from_sessions.returncode == 0, from_sessions.stderr
    for row in ("--dropout", "hypothesis", "steps", "best Loss/val", "last BPB", "vs baseline", "crossover"):
        assert table_row(from_sessions.stdout, row) == table_row(from_folders.stdout, row), row


def test_torn_and_empty_records(runs, tmp_path):
    torn = tmp_path / "torn"
    shutil.copytree(runs.path / "runs" / "d0.1", torn)
    with open(torn / "metrics.jsonl", "a") as f:
        f.write('{"event": "eval", "step": 35, "loss_va')  # a kill in the middle of a line
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(torn / "run.json", empty / "run.json")
    (empty / "metrics.jsonl").write_text("")
    result = compare(runs, "runs/d0.0", str(torn), str(empty))
    assert result.returncode == 0, result.stderr
    assert table_row(result.stdout, "steps") == ["30", "30"]
    assert result.stderr.strip() == f"warning: {empty} has no evaluation yet; left out"
    alone = compare(runs, str(empty))
    assert alone.returncode == 2 and alone.stderr.count("\n") == 2  # the warning and the error line
    assert "no run with an evaluation" in alone.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["nowhere"], "nowhere does not exist"),
        (["mystories.txt"], "is not a run folder or a ClearML offline session"),
        (["runs/d0.0", "--baseline", "runs/gone"], "runs/gone does not exist"),
    ],
)
def test_nothing_to_compare_is_one_line_and_exit_2(runs, args, message):
    result = compare(runs, *args)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) <= 2


def test_another_tokenizer_compares_bits_per_byte(runs):
    result = runs.run(*RUN_FLAGS, "--vocab_size", "400", "--max_steps", "10", "--out_dir", "other/v400", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    table = compare(runs, "runs/d0.0", "other/v400")
    assert table.returncode == 0
    assert "use different tokenizers: Loss is not comparable" in table.stderr
    assert table_row(table.stdout, "compared at")[1] == "BPB, step 10"


def test_killed_run_leaves_a_readable_record(runs):
    process = runs.start(*RUN_FLAGS, "--max_steps", "100000", "--out_dir", "killed/run")
    try:
        wait_for_line(process.stdout, "step 15:", timeout=240)  # step 10 is recorded before step 15 is evaluated
    finally:
        process.send_signal(signal.SIGKILL)
        process.communicate(timeout=30)
    result = compare(runs, "runs/d0.0", "killed/run")
    assert result.returncode == 0, result.stderr
    assert table_row(result.stdout, "status")[1] == "running"
    assert int(table_row(result.stdout, "steps")[1]) >= 10
    before = (runs.path / "killed" / "run" / "metrics.jsonl").read_text().splitlines()

    resumed = runs.run("--resume", "killed/run", "--max_steps", "20", timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    events = [json.loads(line) for line in (runs.path / "killed" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(events) > len(before)  # the same record, appended to
    first_new = events[len(before)]
    assert first_new["event"] == "resumed" and first_new["elapsed"] >= json.loads(before[-1])["elapsed"]
    result = compare(runs, "runs/d0.0", "killed/run")
    assert table_row(result.stdout, "status")[1] == "completed"
    assert table_row(result.stdout, "steps")[1] == "20"


# -------------------------------------------------------------------------------------------------------------------
# the HTML page in Chromium


def test_html_report_in_chromium(runs, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    report = tmp_path / "report.html"
    result = compare(runs, "runs/d0.0", "runs/d0.1", "runs/d0.2", "--html", str(report))
    assert result.returncode == 0, result.stderr
    page = report.read_text()
    assert "<script src=" not in page and 'src="http' not in page  # works offline: plotly.js is inside
    records = {d: recorded_evals(runs.path / "runs" / f"d{d}") for d in DROPOUTS}
    driver = chromium_driver()
    try:
        driver.get(report.as_uri())
        traces = driver.execute_script("return document.getElementById('curves').data.map(t => t.meta);")
        expected = [
            {"arm": i, "series": s, "part": "mean"} for i in range(3) for s in ("Loss/train", "Loss/val", "BPB")
        ]
        assert traces == expected
        drawn = driver.execute_script(
            "return [...document.querySelectorAll('#curves g.trace.scatter')]"
            ".map(g => g.querySelectorAll('path.point').length);"
        )
        assert drawn == [len(records["0.0"])] * 9  # every curve drawn, with a point per evaluation

        def shown_samples() -> list[str]:
            boxes = driver.find_elements(By.CSS_SELECTOR, "#samples pre")
            assert all(box.is_displayed() for box in boxes)
            return [box.get_attribute("textContent") for box in boxes]

        assert shown_samples() == [records[d][30]["sample"] for d in DROPOUTS]
        Select(driver.find_element(By.ID, "sample-step")).select_by_visible_text("step 10")
        assert shown_samples() == [records[d][10]["sample"] for d in DROPOUTS]
        highlighted = driver.find_elements(By.CSS_SELECTOR, "tr.differs th")
        assert "dropout" in [row.text for row in highlighted]
        errors = [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
        assert errors == []
        driver.find_element(By.TAG_NAME, "h1").click()
        screenshot = tmp_path / "compare.png"
        assert driver.save_screenshot(str(screenshot))
        assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        driver.quit()
