"""compare.py on runs that someone else made: symlinks out of the run, zips that unpack to far more than they hold,
malformed or hostile records, and --html pointed where a report must not go. Each case ends in a table of the runs
that can be read (a warning for each one left out), or in one line and exit 2; never in a traceback.

The fuzz tests give the readers any bytes (Hypothesis) in run.json, metrics.jsonl, an offline session's task.json and
metrics.jsonl, and a session's zip, through compare.main in this process. The session they start from is a real one,
written by ClearML for a tiny run in this module.
"""

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from browser import chromium_driver
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from runner import TINY_MODEL, make_stories_project
from synthetic import evaluation, header, write_run

import compare
import records

pytestmark = pytest.mark.timeout(120)
CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f\x7f-\x9f]")  # everything but the newline
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def run_compare(*args) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = compare.main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def assert_clean(code: int, out: str, err: str) -> None:
    """A table (exit 0) or one error line last (exit 2); no control character reaches the terminal."""
    assert code in (0, 2), err
    if code == 2:
        assert err.splitlines()[-1].startswith("error: ")
    assert all(line.startswith(("warning: ", "error: ")) for line in err.splitlines()), err
    assert not CONTROL.search(out + err)


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """A tiny real run: its folder and its ClearML offline session, as a folder and as a .zip."""
    project = make_stories_project(tmp_path_factory.mktemp("hostile"), n_bytes=200_000)
    flags = [*TINY_MODEL, "--data", "stories.txt", "--max_steps", "10", "--eval_interval", "5", "--eval_iters", "1"]
    result = project.run(*flags, "--sample_tokens", "5", "--out_dir", "runs/real", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    [session] = project.sessions()
    return {"run": project.path / "runs" / "real", "session": session.folder, "zip": Path(f"{session.folder}.zip")}


@pytest.fixture
def good(tmp_path) -> Path:
    return write_run(tmp_path / "good")


# -------------------------------------------------------------------------------------------------------------------
# reading only inside the run


def test_symlinked_metrics_and_header_are_not_followed(tmp_path, good):
    secret = tmp_path / "secret.jsonl"
    secret.write_text(json.dumps(evaluation(0, 1.2345)) + "\n")
    for name in ("metrics.jsonl", "run.json"):
        run = write_run(tmp_path / f"linked-{name}")
        (run / name).unlink()
        (run / name).symlink_to(secret)
    code, out, err = run_compare(good, tmp_path / "linked-metrics.jsonl", tmp_path / "linked-run.json")
    assert_clean(code, out, err)
    assert code == 0 and "1.2345" not in out
    assert err.count("is a symbolic link or not readable") == 2
    assert "runs           good" in out


def test_folder_of_runs_does_not_follow_a_symlinked_run(tmp_path, good):
    elsewhere = write_run(tmp_path / "elsewhere", events=[evaluation(0, 1.2345)])
    folder = tmp_path / "received"
    shutil.copytree(good, folder / "good")
    (folder / "link").symlink_to(elsewhere)
    code, out, err = run_compare(folder)
    assert code == 0 and "1.2345" not in out
    assert f"warning: {folder / 'link'} is a symbolic link; not followed" in err


def test_sample_key_pointing_outside_the_session_is_refused(tmp_path, real):
    secret = tmp_path / "secret.txt"
    secret.write_text("THE SECRET")
    session = shutil.copytree(real["session"], tmp_path / "session")
    lines = (session / "metrics.jsonl").read_text().splitlines()
    outside = "../" * 12 + str(secret).lstrip("/")
    events = [
        [e | {"key": outside} if e.get("type") == "training_debug_image" else e for e in json.loads(line)]
        for line in lines
    ]
    events = [[e for e in batch if e.get("type") != "plot"] for batch in events]  # so the samples come from the keys
    (session / "metrics.jsonl").write_text("\n".join(map(json.dumps, events)) + "\n")
    linked = shutil.copytree(real["session"], tmp_path / "linked")  # a data folder that is a symlink
    shutil.rmtree(linked / "data")
    (linked / "data").symlink_to(tmp_path)
    report = tmp_path / "out" / "report.html"
    code, out, err = run_compare(session, linked, "--html", report)
    assert_clean(code, out, err)
    assert code == 0 and "THE SECRET" not in report.read_text()
    assert "points outside the run" in err


def test_a_fifo_is_not_read(tmp_path, good):
    run = write_run(tmp_path / "fifo")
    (run / "metrics.jsonl").unlink()
    os.mkfifo(run / "metrics.jsonl")
    code, out, err = run_compare(good, run)
    assert code == 0 and "metrics.jsonl is not a regular file; not read" in err


# -------------------------------------------------------------------------------------------------------------------
# bounded reading


def zip_session(real, target: Path, metrics: bytes | None = None) -> Path:
    """The real session as a zip, its metrics.jsonl replaced by `metrics`."""
    with zipfile.ZipFile(real["zip"]) as source, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as out:
        for item in source.infolist():
            payload = source.read(item)
            out.writestr(item, metrics if metrics is not None and item.filename == "metrics.jsonl" else payload)
    return target


# the peak resident set of this process alone (VmHWM starts anew at exec; ru_maxrss would carry the parent's)
MEASURED = """
import re, runpy, sys
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as e:
    code = e.code
print("peak", re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1), file=sys.stderr)
sys.exit(code)
"""


def peak_rss_mb(*args) -> tuple[subprocess.CompletedProcess, float]:
    """compare.py run with `args`, and the most memory it held (its own peak resident set, in MB)."""
    command = [sys.executable, "-c", MEASURED, str(Path(compare.__file__)), *map(str, args)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    peak = int(re.search(r"^peak (\d+)$", result.stderr, flags=re.M).group(1))
    return result, peak / 1024


def test_a_small_zip_of_huge_metrics_is_left_out_in_little_memory(tmp_path, real, good):
    line = json.dumps([{"type": "training_stats_scalar", "iter": 1, "metric": "Loss", "variant": "val", "value": 1}])
    huge = (line + "\n").encode() * (400 * 2**20 // (len(line) + 1))
    bomb = zip_session(real, tmp_path / "bomb.zip", huge)
    assert bomb.stat().st_size < 4 * 2**20
    result, peak = peak_rss_mb(good, bomb)
    assert result.returncode == 0, result.stderr
    assert "unpacks to 400 MiB, more than the 256 MiB read" in result.stderr
    assert peak < 200


def test_a_zip_member_that_unpacks_to_more_than_it_says_is_refused(tmp_path, real, good):
    zipped = zip_session(real, tmp_path / "liar.zip", b"[]\n" * 100_000)
    data = bytearray(zipped.read_bytes())
    with zipfile.ZipFile(zipped) as z:
        info = z.getinfo("metrics.jsonl")
    for at in (info.header_offset + 22, *find_central_sizes(data, b"metrics.jsonl")):
        data[at : at + 4] = (1000).to_bytes(4, "little")
    zipped.write_bytes(bytes(data))
    code, out, err = run_compare(good, zipped)
    assert code == 0 and "liar.zip" in err and "not readable (BadZipFile)" in err


def find_central_sizes(data: bytearray, name: bytes) -> list[int]:
    """Offsets of the uncompressed-size field of `name`'s central directory entries."""
    found, at = [], data.find(b"PK\x01\x02")
    while at >= 0:
        length = int.from_bytes(data[at + 28 : at + 30], "little")
        if data[at + 46 : at + 46 + length] == name:
            found.append(at + 24)
        at = data.find(b"PK\x01\x02", at + 4)
    return found


def test_a_zip_with_a_huge_central_directory_is_not_parsed(tmp_path, real, good):
    zipped = zip_session(real, tmp_path / "directory.zip")
    data = bytearray(zipped.read_bytes())
    end = data.rfind(b"PK\x05\x06")
    data[end + 12 : end + 16] = (200 * 2**20).to_bytes(4, "little")
    zipped.write_bytes(bytes(data))
    code, out, err = run_compare(good, zipped)
    assert code == 0 and "lists more members than a ClearML offline session holds" in err


def test_metrics_over_the_bound_are_left_out(tmp_path, good, monkeypatch):
    monkeypatch.setattr(records, "MAX_METRICS_BYTES", 1000)
    big = write_run(tmp_path / "big", events=[evaluation(s) for s in range(0, 1000, 10)])
    code, out, err = run_compare(good, big)
    assert code == 0 and f"{big / 'metrics.jsonl'} is 0 MiB, more than the 0 MiB read" in err


# -------------------------------------------------------------------------------------------------------------------
# malformed records


@pytest.mark.parametrize(
    "head, message",
    [
        ([1, 2], "run.json is a list, not an object"),
        (None, "run.json is null, not an object"),
        ("text", "run.json is a string, not an object"),
        (header(flags=[1]), "run.json.flags is a list, not an object"),
        (header(hypothesis=3), "run.json.hypothesis is an integer, not a string"),
        (header(tokenizer={"vocab_size": "512"}), "run.json.tokenizer.vocab_size is a string, not an integer"),
        (header(git={"dirty": "no"}), "run.json.git.dirty is a string, not true or false"),
        (header(model={"parameters": 10**30}), "run.json.model.parameters is an integer, not an integer"),
        (header(flags={"dropout": {"a": 1}}), "flag 'dropout' is an object, not a value"),
    ],
)
def test_malformed_header_leaves_the_run_out(tmp_path, good, head, message):
    bad = tmp_path / "bad"
    write_run(bad)
    (bad / "run.json").write_text(json.dumps(head))
    code, out, err = run_compare(good, bad)
    assert_clean(code, out, err)
    assert code == 0 and message in err
    alone = run_compare(bad)
    assert alone[0] == 2 and alone[2].splitlines()[-1] == "error: no run with an evaluation to compare"


def test_malformed_values_are_skipped_and_nan_kept(tmp_path, good):
    events = [evaluation(0), evaluation(5, loss_val="5.0"), evaluation(10, bpb=[1]), evaluation(15, lr=10**400),
              evaluation(20, loss_val=float("nan")), evaluation(25) | {"step": True}, evaluation(30, 4.0)]  # fmt: skip
    bad = write_run(tmp_path / "bad", head=header(flags=header()["flags"] | {"dropout": 0.1}), events=events)
    code, out, err = run_compare(good, bad)
    assert_clean(code, out, err)
    assert f"{bad / 'metrics.jsonl'}: 4 evaluations with malformed values skipped" in err
    assert "4.0000 @ 30" in out


@pytest.mark.parametrize(
    "task, message",
    [
        ({"hyperparams": []}, "task.json.hyperparams is a list, not an object"),
        ({"hyperparams": {"Args": {"seed": 1}}}, "task.json hyperparams.Args.seed is an integer, not an object"),
        ({"tags": "a"}, "task.json.tags is a string, not a list"),
        ({"script": {"diff": 1}}, "task.json.script.diff is an integer, not a string"),
    ],
)
def test_malformed_task_leaves_the_session_out(tmp_path, real, good, task, message):
    session = shutil.copytree(real["session"], tmp_path / "session")
    (session / "task.json").write_text(json.dumps(json.loads((session / "task.json").read_text()) | task))
    code, out, err = run_compare(good, session)
    assert_clean(code, out, err)
    assert code == 0 and message in err


def test_one_bad_run_in_a_folder_does_not_stop_the_others(tmp_path):
    folder = tmp_path / "runs"
    for name in ("a", "b"):
        write_run(folder / name)
    write_run(folder / "bad")
    (folder / "bad" / "run.json").write_text("[")
    code, out, err = run_compare(folder)
    assert code == 0 and "runs           a, b" in out
    assert "bad/run.json is not JSON" in err


def test_a_baseline_whose_loss_is_not_positive(tmp_path, good):
    flags = header()["flags"] | {"dropout": 0.1}
    zero = write_run(tmp_path / "zero", head=header(flags=flags), events=[evaluation(0, 0.0), evaluation(10, -1.0)])
    code, out, err = run_compare(zero, good)
    assert_clean(code, out, err)
    assert code == 0 and "not comparable: the baseline's Loss/val is not positive" in out
    cfg = argparse_namespace(baseline=str(zero))
    with pytest.raises(compare.CompareError, match="records Loss/val 0 at step 0; a loss is never 0 or below"):
        compare.EarlyAbort.against(cfg, "x.txt", "0123456789abcdef")


def argparse_namespace(**fields):
    import argparse

    defaults = {"max_steps": 100, "abort_after": 0.2, "abort_margin": 0.03, "abort_noise": 3.0, "vocab_size": 512}
    return argparse.Namespace(**(defaults | fields))


# -------------------------------------------------------------------------------------------------------------------
# escaping


def test_control_characters_do_not_reach_the_terminal(tmp_path, good):
    hostile = write_run(tmp_path / "hostile\x1b]0;title\x07", head=header(hypothesis="\x1b[2J\x1b[Hcleared\u202e"))
    code, out, err = run_compare(good, hostile)
    assert_clean(code, out, err)
    assert "\ufffd[2J\ufffd[Hcleared\ufffd" in out


def test_html_and_script_are_escaped(tmp_path, good):
    nasty = "<!--<script>alert(1)</script><b>&amp;"
    folder = write_run(tmp_path / "<!--<script>", head=header(hypothesis=nasty), sample=nasty)
    report = tmp_path / "out" / "report.html"
    code, out, err = run_compare(folder, good, "--html", report)
    assert code == 0, err
    page = report.read_text()
    data = page.split('<script type="application/json" id="page-data">')[1].split("</script>")[0]
    assert "<" not in data and ">" not in data and "&" not in data
    assert json.loads(data)["samples"]["samples"]["20"][0][1] == nasty
    assert nasty not in page and "alert(1)</script>" not in page
    driver = chromium_driver()
    try:
        driver.get(report.as_uri())
        shown = driver.execute_script("return [...document.querySelectorAll('#samples pre')].map(p => p.textContent)")
        assert shown[0] == nasty
        assert [e for e in driver.get_log("browser") if e["level"] == "SEVERE"] == []
    finally:
        driver.quit()


# -------------------------------------------------------------------------------------------------------------------
# where --html may write


@pytest.mark.parametrize(
    "kind, message",
    [
        ("symlink", "is a symbolic link; the report does not follow it"),
        ("run metrics", "is inside the run"),
        ("device", "is not a regular file"),
        ("folder", "is not a regular file"),
        ("inside a run", "is inside the run"),
        ("inside a session", "is inside the run"),
    ],
)
def test_html_refuses_to_write_where_it_must_not(tmp_path, good, real, kind, message):
    target = tmp_path / "target.html"
    target.write_text("kept")
    places = {
        "symlink": tmp_path / "link.html",
        "run metrics": good / "metrics.jsonl",
        "device": Path("/dev/null"),
        "folder": tmp_path,
        "inside a run": good / "report.html",
        "inside a session": real["session"] / "report.html",
    }
    (tmp_path / "link.html").symlink_to(target)
    before = (good / "metrics.jsonl").read_bytes()
    code, out, err = run_compare(good, real["session"], "--html", places[kind])
    assert code == 2 and err.splitlines()[-1].startswith("error: ") and message in err
    assert target.read_text() == "kept" and (good / "metrics.jsonl").read_bytes() == before
    assert not (good / "report.html").exists() and not (real["session"] / "report.html").exists()
    assert Path("/dev/null").is_char_device()


def test_html_replaces_a_report_atomically(tmp_path, good):
    report = tmp_path / "out" / "report.html"
    report.parent.mkdir()
    report.write_text("old")
    code, out, err = run_compare(good, "--html", report)
    assert code == 0, err
    assert report.read_text().startswith("<!DOCTYPE html>")
    assert sorted(p.name for p in report.parent.iterdir()) == ["report.html"]  # no temporary file left


# -------------------------------------------------------------------------------------------------------------------
# fuzzing


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
HEADER_KEYS = ["hypothesis", "flags", "dataset", "tokenizer", "git", "clearml", "started", "run_id", "model"]
EVENT_KEYS = ["event", "step", "tokens", "loss_train", "loss_val", "bpb", "lr", "elapsed", "tokens_per_s", "status"]


def fuzz_dir():
    import tempfile

    return tempfile.TemporaryDirectory(prefix="fuzz-")


def check_both(good: Path, fuzzed: Path) -> None:
    """With a good run beside it the table shows the good one; alone it is a table or one line and exit 2."""
    code, out, err = run_compare(good, fuzzed)
    assert_clean(code, out, err)
    assert code == 0
    assert_clean(*run_compare(fuzzed))


@FUZZ
@given(raw=st.binary(max_size=400), replace=st.dictionaries(st.sampled_from(HEADER_KEYS), JSON, max_size=3))
def test_fuzz_run_json(raw, replace):
    with fuzz_dir() as tmp:
        good, bad, worse = write_run(Path(tmp, "good")), write_run(Path(tmp, "bad")), write_run(Path(tmp, "worse"))
        (bad / "run.json").write_bytes(raw)
        (worse / "run.json").write_text(json.dumps(header() | replace))
        check_both(good, bad)
        check_both(good, worse)


@FUZZ
@given(
    raw=st.binary(max_size=400),
    events=st.lists(
        st.dictionaries(st.sampled_from(EVENT_KEYS), JSON, max_size=6).map(lambda e: evaluation(10) | e), max_size=5
    ),
    sample=st.text(max_size=30),
)
def test_fuzz_metrics_jsonl(raw, events, sample):
    with fuzz_dir() as tmp:
        good = write_run(Path(tmp, "good"))
        bad, worse = write_run(Path(tmp, "bad")), write_run(Path(tmp, "worse"), events=events, sample=sample)
        (bad / "metrics.jsonl").write_bytes(raw)
        check_both(good, bad)
        check_both(good, worse)
        with open(worse / "metrics.jsonl", "ab") as f:
            f.write(raw)  # a torn or broken last line
        check_both(good, worse)


@FUZZ
@given(
    task=st.binary(max_size=300) | JSON.map(lambda v: json.dumps(v).encode()),
    replace=st.dictionaries(st.sampled_from(["id", "comment", "tags", "hyperparams", "script"]), JSON, max_size=3),
    metrics=st.binary(max_size=300),
    events=st.lists(
        st.dictionaries(
            st.sampled_from(["type", "iter", "metric", "variant", "value", "timestamp", "key", "plot_str"]),
            JSON,
            max_size=6,
        ),
        max_size=4,
    ),  # fmt: skip
)
def test_fuzz_offline_session(real, task, replace, metrics, events):
    with fuzz_dir() as tmp:
        good = write_run(Path(tmp, "good"))
        raw = shutil.copytree(real["session"], Path(tmp, "raw"))
        (raw / "task.json").write_bytes(task)
        (raw / "metrics.jsonl").write_bytes(metrics)
        mixed = shutil.copytree(real["session"], Path(tmp, "mixed"))
        (mixed / "task.json").write_text(json.dumps(json.loads((mixed / "task.json").read_text()) | replace))
        with open(mixed / "metrics.jsonl", "a") as f:
            f.write(json.dumps(events) + "\n")
        check_both(good, raw)
        check_both(good, mixed)


@FUZZ
@given(
    raw=st.binary(max_size=300),
    flips=st.lists(st.tuples(st.integers(0, 10**9), st.integers(0, 255)), min_size=1, max_size=8),
)
def test_fuzz_session_zip(real, raw, flips):
    with fuzz_dir() as tmp:
        good = write_run(Path(tmp, "good"))
        Path(tmp, "raw.zip").write_bytes(raw)
        data = bytearray(real["zip"].read_bytes())
        for at, value in flips:
            data[at % len(data)] = value
        Path(tmp, "flipped.zip").write_bytes(bytes(data))
        check_both(good, Path(tmp, "raw.zip"))
        check_both(good, Path(tmp, "flipped.zip"))
