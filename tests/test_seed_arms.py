"""Seed arms on real tiny runs: three seeds of a baseline, three of a learning rate clearly too small, two of a
flag that changes nothing (the sampling temperature: samples are drawn from their own RNG), and one seed of
dropout 0.3. The verdicts, their p-values and the arms' statistics are recomputed here from the numbers the runs
recorded in metrics.jsonl; the page is checked in a real headless Chromium.
"""

import json
import math
import shlex
import subprocess
import sys

import numpy as np
import pytest
from browser import chromium_driver
from runner import TINY_MODEL, make_stories_project, table_row
from scipy import stats

import compare

pytestmark = pytest.mark.timeout(300)
STEPS = 20
RUN_FLAGS = [*TINY_MODEL, "--data", "stories.txt", "--max_steps", str(STEPS), "--eval_interval", "5",
             "--eval_iters", "2", "--sample_tokens", "5", "--learning_rate", "3e-3"]  # fmt: skip
SLOW = ["--learning_rate", "1e-5", "--muon_lr", "2e-4", "--min_lr", "1e-6"]
ARMS = {  # group folder -> (flags, seeds); the baseline's folder is not the first by name, but starts first
    "reference": ([], (1337, 1338, 1339)),
    "lr-small": (SLOW, (1337, 1338, 1339)),
    "temperature": (["--temperature", "0.5"], (1340, 1341)),
    "dropout": (["--dropout", "0.3"], (1337,)),
}


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """Every arm's seeds under runs/<arm>/s<seed>, two runs at a time, the baseline's first."""
    project = make_stories_project(tmp_path_factory.mktemp("arms"), n_bytes=200_000)
    first = project.run(*RUN_FLAGS, "--seed", "1337", "--out_dir", "runs/reference/s1337", timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]  # also makes the tokenizer and the token cache
    todo = [(arm, seed) for arm, (_, seeds) in ARMS.items() for seed in seeds][1:]
    for pair in (todo[i : i + 2] for i in range(0, len(todo), 2)):
        started = [
            project.start(*RUN_FLAGS, *ARMS[arm][0], "--seed", str(seed), "--out_dir", f"runs/{arm}/s{seed}")
            for arm, seed in pair
        ]
        for process in started:
            _, stderr = process.communicate(timeout=300)
            assert process.returncode == 0, stderr[-3000:]
    return project


def compare_runs(project, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "compare.py", *args], cwd=project.path, capture_output=True, text=True,
                            timeout=60)  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result


def last_losses(project, arm: str) -> np.ndarray:
    """Each seed's recorded Loss/val at the last step."""
    values = []
    for seed in ARMS[arm][1]:
        lines = (project.path / "runs" / arm / f"s{seed}" / "metrics.jsonl").read_text().splitlines()
        evals = {e["step"]: e for e in map(json.loads, lines) if e["event"] == "eval"}
        values.append(evals[STEPS]["loss_val"])
    return np.array(values)


def expected_verdict(project, arm: str) -> str:
    a, b = last_losses(project, arm), last_losses(project, "reference")
    p = stats.ttest_ind(a, b, equal_var=False).pvalue
    relative = (a.mean() - b.mean()) / b.mean()
    error = math.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b)) / b.mean()
    seeds = f"{len(a)} vs {len(b)} seeds"
    p_text = "< 0.0001" if p < 1e-4 else f"= {p:.2g}"
    if p < 0.01:
        word = "better" if relative < 0 else "worse"
        return f"{word} by {100 * abs(relative):.1f} % ± {100 * error:.1f} % ({seeds}, p {p_text}): confirmed"
    return f"within seed noise ({100 * relative:+.1f} % ± {100 * error:.1f} %, {seeds}, p {p_text}): not confirmed"


def test_a_learning_rate_too_small_is_confirmed_worse(project):
    table = compare_runs(project, "runs/reference", "runs/lr-small").stdout
    assert table_row(table, "arm") == [
        "baseline (3 seeds)",
        "learning_rate=1e-05, min_lr=1e-06, muon_lr=0.0002 (3 seeds)",
    ]
    assert table_row(table, "seeds") == ["3: 1337, 1338, 1339"] * 2
    assert table_row(table, "status") == ["3 completed"] * 2
    for i, arm in enumerate(("reference", "lr-small")):
        losses = last_losses(project, arm)
        assert table_row(table, "last Loss/val")[i] == f"{losses.mean():.4f} ± {losses.std(ddof=1):.4f}"
    verdict = table_row(table, "vs baseline")[1]
    assert verdict == expected_verdict(project, "lr-small") and verdict.endswith("): confirmed")
    assert table_row(table, "compared at")[1] == f"Loss/val, step {STEPS}"
    assert "confirmed: p < 0.01 in Welch's t-test" in table


def test_a_flag_without_effect_is_not_confirmed(project):
    table = compare_runs(project, "runs/reference", "runs/temperature").stdout
    verdict = table_row(table, "vs baseline")[1]
    assert verdict == expected_verdict(project, "temperature") and verdict.endswith(": not confirmed")


def test_a_folder_of_groups_fits_the_terminal(project):
    result = compare_runs(project, "runs")
    table = result.stdout
    assert "baseline: s1337 (the first run to start in runs)" not in table  # seed folders alike get their group
    assert "baseline: reference/s1337 (the first run to start in runs)" in table  # not dropout/s1337, first by name
    assert table_row(table, "runs")[0] == "reference/s1337, reference/s1338, reference/s1339"
    assert all(compare.width(line) <= 100 for line in table.splitlines())
    assert table_row(table, "arm") == [
        "baseline (3 seeds)",
        "learning_rate=1e-05 , min_lr=1e-06, muon_lr=0.0002 (3 seeds)",  # a word wider than its column is broken
        "temperature=0.5 (2 seeds)",
        "dropout=0.3",
    ]
    assert table_row(table, "status") == ["3 completed"] * 2 + ["2 completed", "completed"]
    assert "within seed noise" in table and "noise unknown" in table


def test_the_printed_command_measures_the_noise(project):
    """The command printed for the one-seed arm runs a seed that joins that arm."""
    table = compare_runs(project, "runs/reference", "runs/dropout").stdout
    assert "seed noise unknown; measure it for dropout=0.3 (dropout/s1337) with:" in table
    command = table.split("seed noise unknown; measure it for dropout=0.3 (dropout/s1337) with:\n")[1]
    words = shlex.split(command.split("seed noise unknown")[0].replace("\\\n", " "))
    assert words[:2] == ["python", "main.py"] and words[-3:] == ["--seeds", "1338", "1339"]
    result = project.run(*words[2:-3], "--seed", "1338", "--out_dir", "noise/s1338", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    table = compare_runs(project, "runs/reference", "runs/dropout", "noise").stdout
    assert table_row(table, "seeds")[1] == "2: 1337, 1338"
    assert table_row(table, "vs baseline")[1].endswith(("confirmed", "not confirmed"))


def test_early_abort_against_a_group_of_seeds(project):
    result = project.run(*RUN_FLAGS, *SLOW, "--seed", "7", "--baseline", "runs/reference", "--out_dir", "aborted",
                         timeout=300)  # fmt: skip
    assert result.returncode == 130, result.stderr[-3000:]
    [line] = [line for line in result.stderr.splitlines() if "worse than the baseline reference" in line]
    assert "(the mean of 3 seeds)" in line and "twice in a row); stopped" in line
    assert "more than the 3.0% margin" in line  # these seeds differ by far less than 1 %


def test_the_page_draws_bands_and_switches_the_axis(project, tmp_path):
    from selenium.webdriver.common.by import By

    report = tmp_path / "report.html"
    compare_runs(project, "runs", "--html", str(report))
    driver = chromium_driver()
    try:
        driver.get(report.as_uri())
        traces = driver.execute_script("return document.getElementById('curves').data.map(t => [t.meta, t.name]);")
        bands = [meta for meta, _ in traces if meta["part"] in ("high", "low")]
        assert len(bands) == 3 * 3 * 2  # three arms of seeds, three curves each, two edges each
        fills = driver.execute_script(
            "return [...document.querySelectorAll('#curves g.trace.scatter path.js-fill')]"
            ".filter(p => (p.getAttribute('d') || '').length > 10).length;"
        )
        assert fills == 3 * 3
        legend = [t.text for t in driver.find_elements(By.CSS_SELECTOR, "#curves .legendtext")]
        assert "dropout=0.3" in legend and "baseline (3 seeds)" in legend
        first = driver.execute_script("return values(document.getElementById('curves').data[0].x);")
        assert first == [0, 5, 10, 15, 20]
        driver.execute_script(
            "const s = document.getElementById('x-axis'); s.value = 'tokens'; s.dispatchEvent(new Event('change'));"
        )
        title, first = driver.execute_script(
            "const c = document.getElementById('curves'); return [c.layout.xaxis.title.text, values(c.data[0].x)];"
        )
        assert title == "tokens" and first == [s * 16 * 64 for s in (0, 5, 10, 15, 20)]
        assert driver.find_element(By.CSS_SELECTOR, ".xtitle").text == "tokens"
        ys = "return document.getElementById('curves').data.map(t => [t.meta.series, values(t.y)]);"
        before = driver.execute_script(ys)
        driver.execute_script(
            "const s = document.getElementById('smoothing'); s.value = '0.9'; s.dispatchEvent(new Event('input'));"
        )
        after = driver.execute_script(ys)
        for (series, old), (_, new) in zip(before, after, strict=True):
            assert (old == new) == (series != "Loss/train"), series  # only the training loss is smoothed
            assert new[0] == pytest.approx(old[0], rel=1e-6)  # debiased: the first point is its own value
        width = driver.execute_script("return window.innerWidth;")
        for table in driver.find_elements(By.TAG_NAME, "table"):
            if table.is_displayed():
                assert driver.execute_script("return arguments[0].getBoundingClientRect().right;", table) <= width
        assert driver.execute_script("return document.documentElement.scrollWidth;") <= width
        assert [e for e in driver.get_log("browser") if e["level"] == "SEVERE"] == []
    finally:
        driver.quit()
