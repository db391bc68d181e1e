"""The terminal table and the page, from run folders written here: the table fits 100 columns whatever the number of
arms and never cuts a status; the page has rows for parameters and tokens/s, links a task only to its web page, and
leaves out flags that do not apply. The verdict's p-value is scipy's Welch test.
"""

import contextlib
import io
import math
import re

import numpy as np
import pytest
from runner import table_row
from scipy import stats
from synthetic import evaluation, header, write_run

import arms
import compare

pytestmark = pytest.mark.timeout(60)
LONG_STATUS = "worse than the baseline base: Loss/val 6.2473 against 5.8528 at step 10 (+6.7%), stopped; kept"


def run_compare(*args) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = compare.main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def arm_run(folder, dropout: float, seed: int = 1, **fields):
    flags = header()["flags"] | {"dropout": dropout, "seed": seed, "tinystories_url": "https://example.org/ts"}
    events = [evaluation(s, 5.0 - s / 100 + dropout) for s in (0, 10, 20)]
    return write_run(folder, head=header(flags=flags, **fields), events=events)


@pytest.mark.parametrize("arms", [1, 2, 5, 12])
def test_the_table_fits_100_columns_and_keeps_every_status(tmp_path, arms):
    folders = [arm_run(tmp_path / f"run{i}", dropout=i / 100) for i in range(arms)]
    with open(folders[-1] / "metrics.jsonl", "a") as f:
        f.write(f'{{"event": "status", "status": "aborted", "message": "{LONG_STATUS}"}}\n')
    code, out, err = run_compare(*folders)
    assert code == 0, err
    assert max(compare.width(line) for line in out.splitlines()) <= 100
    blocks = [b for b in out.split("\n\n") if re.search(r"^-+  -", b, flags=re.M)]
    statuses = [cell for block in blocks for cell in table_row(block, "status")]
    assert f"aborted: {LONG_STATUS}" in statuses
    runs = [cell for block in blocks for cell in table_row(block, "runs")]
    assert set(runs) == {f"run{i}" for i in range(arms)}  # every arm shown; the baseline's begins each block


def test_wide_characters_count_twice(tmp_path):
    folders = [arm_run(tmp_path / "a", 0.0, hypothesis="仮説" * 30), arm_run(tmp_path / "b", 0.1)]
    code, out, _ = run_compare(*folders)
    table = out.split("\nseed noise unknown")[0].splitlines()  # the commands below keep each value whole
    assert code == 0 and max(compare.width(line) for line in table) <= 100
    assert "\n".join(table).count("仮説") == 30  # wrapped, none cut


def test_the_page_rows_links_and_flags(tmp_path):
    model = {"parameters": 1_234_567, "flops_per_token": 7_400_000}
    web = arm_run(tmp_path / "web", 0.0, model=model, clearml={"task_id": "abc", "web_page": "https://clear.ml/t/abc"})
    with open(web / "metrics.jsonl", "a") as f:
        f.write('{"event": "eval", "step": 30, "tokens": 3000, "loss_val": 4.7, "tokens_per_s": 12345.0}\n')
    local = arm_run(tmp_path / "local", 0.1, clearml={"task_id": "off1", "offline_session": "/home/me/secret.zip"})
    script = arm_run(tmp_path / "script", 0.2, clearml={"task_id": "x", "web_page": "javascript:alert(1)"})
    report = tmp_path / "out" / "report.html"
    code, out, err = run_compare(web, local, script, "--html", report)
    assert code == 0, err
    page = report.read_text()
    assert '<a href="https://clear.ml/t/abc">abc</a>' in page
    assert "offline session, task off1" in page and "secret.zip" not in page
    assert table_row(out, "parameters") == ["1,234,567", "-", "-"]
    assert table_row(out, "tokens/s") == ["12,345", "-", "-"]
    summary = page.split("<h2>Summary</h2>")[1].split("<h2>Curves</h2>")[0]
    assert "javascript:" not in summary  # only an http(s) address becomes a link
    assert "<th>parameters</th><td>1,234,567</td>" in summary and "<th>tokens/s</th><td>12,345</td>" in summary
    flags = page.split("<h2>Flags</h2>")[1]
    assert "<th>dropout</th>" in flags and "<th>data</th>" in flags
    assert "tinystories_url" not in flags  # a local file has no TinyStories URL


def test_flags_that_apply_to_one_arm_only(tmp_path):
    flags = header()["flags"]
    adamw = write_run(tmp_path / "adamw", head=header(flags=flags | {"optimizer": "adamw", "muon_lr": 0.02}))
    muon = write_run(tmp_path / "muon", head=header(flags=flags | {"optimizer": "muon", "muon_lr": 0.02}))
    report = tmp_path / "report.html"
    assert run_compare(adamw, muon, "--html", report)[0] == 0
    assert "<th>muon_lr</th><td>n/a</td><td>0.02</td>" in report.read_text()


def test_baseline_may_be_a_group_of_seeds(tmp_path):
    group = tmp_path / "group"
    for seed in (1, 2, 3):
        arm_run(group / f"s{seed}", 0.0, seed=seed)
    other = arm_run(tmp_path / "other", 0.1)
    code, out, err = run_compare(other, "--baseline", group)
    assert code == 0, err
    assert table_row(out, "arm") == ["baseline (3 seeds)", "dropout=0.1"]
    assert table_row(out, "seeds") == ["3: 1, 2, 3", "1"]
    assert "baseline: s1 (chosen by --baseline)" in out


def test_welch_p_is_scipys():
    rng = np.random.default_rng(0)
    for _ in range(200):
        a, b = rng.normal(5, rng.uniform(1e-3, 1), rng.integers(2, 7)), rng.normal(5.2, 0.3, rng.integers(2, 7))
        assert arms.welch_p(a, b) == pytest.approx(stats.ttest_ind(a, b, equal_var=False).pvalue, rel=1e-9)
    assert math.isnan(arms.welch_p(np.ones(3), np.ones(3)))
