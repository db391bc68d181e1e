"""What ClearML shows of a run, read from the offline sessions that real runs write (HOME is an empty folder).

The prompt holds a carriage return and a bell, which every generated sample starts with: what is reported must be
cleaned of them. Two scripts run ClearML's own calls in a child process with the same HOME: the iteration offset
of a continued task, and the debug-sample files of 105 evaluations.
"""

import dis
import json
import os
import shutil
import subprocess
import sys
import unicodedata
import uuid
from importlib.metadata import version
from pathlib import Path

import pytest
import torch
from runner import QUICK, TINY_MODEL, TRAIN_SAMPLE, OfflineSession, make_project, make_stories_project

import tracking

PROMPT = "Once\r upon\x07 a time"
FIRST = [*TINY_MODEL, "--data", "stories.txt", "--max_steps", "3", "--eval_interval", "1", "--eval_iters", "1"]
FIRST += ["--sample_tokens", "4", "--prompt", PROMPT, "--out_dir", "RUN"]
RUNTIME_PACKAGES = {"torch", "clearml", "numpy", "tqdm", "requests"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A run of 3 steps (evaluations at 0, 1, 2, 3), resumed for 2 more (4, 5), in a checkout that has tests."""
    project = make_project(tmp_path_factory.mktemp("tracking"))
    (project.path / "stories.txt").write_bytes(TRAIN_SAMPLE.read_bytes()[:200_000])
    (project.path / "tests").mkdir()
    (project.path / "tests" / "test_stories.py").write_text("import jsonschema\nimport pytest\nimport tiktoken\n")
    first = project.run(*FIRST)
    assert first.returncode == 0, first.stderr[-2000:]
    resumed = project.run("--resume", "RUN", "--max_steps", "5")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    project.said = first.stdout + first.stderr + resumed.stdout + resumed.stderr
    return project, *project.sessions()


def tables(session: OfflineSession) -> dict[int, list[list]]:
    """The `Generated Sample` table reported at each step, as rows of (step, Loss/val, sample)."""
    found = {}
    for event in session.events():
        if event["type"] == "plot" and event["metric"] == "Generated Sample":
            columns = json.loads(event["plot_str"])["data"][0]["cells"]["values"]
            found[event["iter"]] = [list(row) for row in zip(*columns, strict=True)]
    return found


def sample_files(session: OfflineSession) -> dict[str, str]:
    """Each debug sample's storage key, without the task's own folder (as a server stores them for one task), and
    its text."""
    samples = session.debug_samples("Generated Sample")
    task_folder = f".{session.task['id']}/"
    return {
        s["key"].split(task_folder, 1)[1]: (session.folder / "data" / s["key"]).read_text(encoding="utf-8")
        for s in samples
    }


def test_samples_table_holds_every_evaluation_so_far(runs):
    _, first, resumed = runs
    first_tables, resumed_tables = tables(first), tables(resumed)
    assert sorted(first_tables) == [0, 1, 2, 3] and sorted(resumed_tables) == [4, 5]
    for step, rows in {**first_tables, **resumed_tables}.items():
        assert [row[0] for row in rows] == list(range(step + 1))  # the resumed run's table goes on from the first
    val = {**first.scalars("Loss", "val"), **resumed.scalars("Loss", "val")}
    assert [row[1] for row in resumed_tables[5]] == [f"{val[step]:.4f}" for step in range(6)]
    files = {**sample_files(first), **sample_files(resumed)}
    assert sorted(row[2] for row in resumed_tables[5]) == sorted(files.values())


def test_one_debug_sample_file_per_evaluation_across_a_resume(runs):
    _, first, resumed = runs
    first_files, resumed_files = sample_files(first), sample_files(resumed)
    assert len(first_files) == 4 and len(resumed_files) == 2
    assert not first_files.keys() & resumed_files.keys()  # importing both into one task overwrites nothing
    steps = sorted(
        s["iter"] for s in first.debug_samples("Generated Sample") + resumed.debug_samples("Generated Sample")
    )
    assert steps == [0, 1, 2, 3, 4, 5]


def test_reported_samples_have_no_control_characters(runs):
    _, first, resumed = runs
    texts = [row[2] for rows in tables(resumed).values() for row in rows] + list(sample_files(first).values())
    assert texts and all(text.startswith("Once\n upon a time") for text in texts)
    for text in texts:
        assert all(c in "\n\t" or unicodedata.category(c) != "Cc" for c in text), repr(text)
        assert not text.endswith("\ufffd")


def test_clean_sample_keeps_the_text_and_drops_what_cannot_be_shown():
    assert tracking.clean_sample("Tom\r\nsaw\ra \tdog.\n\x1b[2J\x00\x7f\x85") == "Tom\nsaw\na \tdog.\n[2J"
    # a U+FFFD inside the text is the model's own; one at the end is a character cut by the last token
    assert tracking.clean_sample("Lily \ufffd ran caf\u00e9\ufffd") == "Lily \ufffd ran caf\u00e9"
    assert tracking.clean_sample("") == ""


def test_resumed_run_reports_at_its_true_steps(runs):
    _, first, resumed = runs
    assert sorted(first.scalars("Loss", "val")) == [0, 1, 2, 3]
    assert sorted(resumed.scalars("Loss", "val")) == [4, 5]
    assert sorted(resumed.scalars("Train step", "loss")) == [4, 5]


def test_task_starts_before_data_preparation(runs):
    _, first, _ = runs
    console = first.console()
    assert "training a 512-token BPE tokenizer" in console  # printed while the data is prepared


def test_no_gpu_monitor_warnings_without_a_gpu(runs):
    """ClearML's machine monitor probes the GPU; where none answers (a CPU-only machine) the probe is off, silently."""
    project, first, resumed = runs
    for text in (project.said, first.console(), resumed.console()):
        assert "GPU stats" not in text and "GPU monitoring" not in text


def test_unset_flags_are_typed_and_the_real_mode_is_recorded(runs):
    _, first, resumed = runs
    args = first.task["hyperparams"]["Args"]
    unset = {name: (args[name]["value"], args[name].get("type")) for name in ("max_seconds", "baseline", "resume")}
    assert unset == {"max_seconds": ("", "float"), "baseline": ("", "str"), "resume": ("", "str")}
    assert args["lr_decay_steps"]["value"] == args["max_steps"]["value"]  # a default that follows, as resolved
    assert args["offline"] == {**args["offline"], "value": "True", "type": "bool"}  # no --offline: no server
    assert resumed.task["hyperparams"]["Args"]["resume"]["value"] == "RUN"


def test_requirements_are_what_the_program_imports_with_versions(runs):
    _, first, _ = runs
    lines = first.task["script"]["requirements"]["pip"].splitlines()
    pinned = dict(line.split("==") for line in lines if line and not line.startswith("#"))
    assert RUNTIME_PACKAGES <= pinned.keys()
    assert all(pinned[name] == version(name) for name in pinned)
    assert not pinned.keys() & {"pytest", "tiktoken", "jsonschema", "ruff"}  # imported by the checkout's tests only


@pytest.mark.timeout(10)
def test_imported_names_are_read_from_the_bytecode_as_dis_reads_them():
    """Imports at module level, in functions and classes, relative ones, and one past 256 names, whose index needs
    an EXTENDED_ARG."""
    many = "\n".join(f"v{i} = x.a{i}" for i in range(300))
    source = f"import os.path\n{many}\nfrom . import sibling\ndef f():\n    import json as j\n"
    source += "class C:\n    import numpy\nimport torch.nn.functional\n"
    code = compile(source, "m.py", "exec")
    assert max(i.arg for i in dis.get_instructions(code) if i.opname == "IMPORT_NAME") > 255
    assert tracking.imported_names(code) == {"os", "json", "numpy", "torch"}


def test_connected_flags_drive_the_run(runs):
    """Run as clearml-agent runs a task whose Args were edited in the web UI: no flags on the command line, the
    values from the task (ClearML's remote mode, on a copy of the first run's offline session)."""
    project, first, _ = runs
    task_id = f"offline-{uuid.uuid4().hex}"
    copy = first.folder.parent / task_id
    shutil.copytree(first.folder, copy)
    task = json.loads((copy / "task.json").read_text())
    edits = {"n_layer": "3", "out_dir": "EDITED", "max_steps": "1", "max_seconds": "600"}
    for name, value in edits.items():
        task["hyperparams"]["Args"][name]["value"] = value
    (copy / "task.json").write_text(json.dumps({**task, "id": task_id}))
    result = project.run(CLEARML_TASK_ID=task_id, CLEARML_OFFLINE_MODE="1")
    assert result.returncode == 0, result.stderr[-2000:]
    checkpoint = torch.load(project.path / "EDITED" / "ckpt.pt", weights_only=False)
    assert checkpoint["model_config"]["n_layer"] == 3 and checkpoint["step"] == 1
    assert checkpoint["args"]["max_seconds"] == 600.0  # an unset flag, edited: a number, not the string "600"
    assert checkpoint["args"]["data"] == "stories.txt" and checkpoint["args"]["prompt"] == PROMPT


def run_script(project, code: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=project.path, env=project.env(), capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


OFFSET_SCRIPT = """
import json
from clearml import Task
import tracking

Task._report_subprocess_enabled = False  # as the tracker sets it: ClearML's forked reporter can stall close()
Task.set_offline(True)
first = Task.init("offsets", "first", reuse_last_task_id=False, auto_resource_monitoring=False)
first.get_logger().report_scalar("Loss", "val", 1.0, iteration=80)
folder, task_id = first.get_offline_mode_folder(), first.id
first.close()
record = json.loads((folder / "task.json").read_text())
(folder / "task.json").write_text(json.dumps({**record, "last_iteration": 80}))  # as a server records it

offsets = {}
for name, arguments in (("clearml", dict(continue_last_task=task_id)), ("ours", tracking.continue_arguments(task_id))):
    task = Task.init("offsets", "first", auto_resource_monitoring=False, **arguments)
    task.get_logger().report_scalar("Loss", name, 0.5, iteration=90)
    offsets[name] = task.get_initial_iteration() if task.id == task_id else "a new task"
    task.close()
steps = [event["iter"] for line in open(folder / "metrics.jsonl") for event in json.loads(line)]
print(json.dumps([offsets, steps]))
"""


def test_continuing_a_task_adds_no_iteration_offset(tmp_path):
    """ClearML's `continue_last_task=<id>` offsets every report by the task's last iteration + 1; the arguments the
    tracker passes continue the same task at the true step."""
    offsets, steps = json.loads(run_script(make_project(tmp_path), OFFSET_SCRIPT).splitlines()[-1])
    assert offsets == {"clearml": 81, "ours": 0}
    assert steps == [80, 90 + 81, 90]


SAMPLES_SCRIPT = """
import json, sys
import tracking


def run(steps, rows):
    tracker = tracking.Tracker("samples", "many", [], "", offline=True)
    for step in steps:
        rows.append([step, f"{1.0 / (step + 1):.4f}", tracking.clean_sample(f"story {step}\\r\\x00")])
        tracker.report_sample(rows[-1][2], step, rows)
    folder = tracker.task.get_offline_mode_folder()
    tracker.close("completed")
    return rows, str(folder)

rows, first = run(range(105), [])
_, resumed = run(range(105, 110), rows)
print(json.dumps([first, resumed]))
"""


def test_every_evaluation_keeps_its_own_sample_file(tmp_path):
    """105 evaluations (more than ClearML's file history of 100), then a resumed run: no file name is used twice."""
    project = make_project(tmp_path)
    folders = json.loads(run_script(project, SAMPLES_SCRIPT).splitlines()[-1])
    first, resumed = (OfflineSession(Path(folder)) for folder in folders)
    first_files, resumed_files = sample_files(first), sample_files(resumed)
    assert len(first_files) == 105 and len(resumed_files) == 5
    assert not first_files.keys() & resumed_files.keys()
    assert sorted(first_files.values()) == sorted(f"story {step}\n" for step in range(105))
    assert [row[0] for row in tables(resumed)[109]] == list(range(110))


def test_data_refused_after_the_task_started_fails_the_task_with_one_line(runs):
    project, *_ = runs
    (project.path / "tiny.txt").write_text("Once upon a time there was a cat.\n" * 20)
    result = project.run(*TINY_MODEL, "--data", "tiny.txt", "--vocab_size", "300", "--out_dir", "TINY")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("main.py: error: --data tiny.txt: its val split has")
    refused = project.sessions()[-1]
    assert sorted(refused.task["tags"]) == ["failed", "tiny.txt"]
    assert "training a 300-token BPE tokenizer" in refused.console()


def test_a_run_started_by_a_tracked_process_still_gets_its_own_task(tmp_path):
    """ClearML marks the children of a process that tracks a task; a run started by one (a notebook, a sweep
    script) would get a stub that records nothing, unless the mark is dropped."""
    project = make_stories_project(tmp_path)
    parent = f"{os.getpid()}:offline-{uuid.uuid4().hex}"
    result = project.run(*QUICK, "--max_steps", "2", "--out_dir", "RUN", CLEARML_PROC_MASTER_ID=parent)
    assert result.returncode == 0, result.stderr[-2000:]
    [session] = project.sessions()
    assert sorted(session.scalars("Loss", "val")) == [0, 2]
