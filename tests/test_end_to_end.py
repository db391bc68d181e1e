"""One real training run of main.py on a local .txt, checked the way a user would check it in the ClearML web UI.

The data is the TinyStories train sample in tests/data (see SOURCES.md there), as
`mystories.txt`. HOME is an empty folder, so ClearML has no configuration and uses its offline mode.
"""

import re
import shutil
import time

import pytest
from runner import TINY_MODEL, TRAIN_SAMPLE, git, make_project

from flags import ALL_FLAGS

HYPOTHESIS = "Hypothesis: dropout 0.3 helps a tiny model"
RUN_FLAGS = [
    *TINY_MODEL,
    "--data", "mystories.txt", "--max_steps", "60", "--eval_interval", "20", "--eval_iters", "5",
    "--dropout", "0.3", "--learning_rate", "3e-3", "--comment", HYPOTHESIS, "--out_dir", "RUN",
]  # fmt: skip


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    project = make_project(tmp_path_factory.mktemp("e2e"))
    shutil.copy(TRAIN_SAMPLE, project.path / "mystories.txt")
    with open(project.path / "model.py", "a") as f:
        f.write("# an uncommitted change\n")
    started = time.monotonic()
    result = project.run(*RUN_FLAGS)
    seconds = time.monotonic() - started
    assert result.returncode == 0, result.stderr[-3000:]
    [session] = project.sessions()
    return project, result, session, seconds


def test_run_finishes_promptly(finished_run):
    _, result, _, seconds = finished_run
    assert seconds < 120
    assert "Traceback" not in result.stderr


def test_task_identity_in_the_ui(finished_run):
    _, _, session, _ = finished_run
    task = session.task
    assert task["project_name"] == "gpt-from-scratch"
    assert task["name"] == HYPOTHESIS
    assert task["comment"] == HYPOTHESIS
    assert "mystories.txt" in task["tags"]


def test_every_flag_is_a_hyperparameter(finished_run):
    project, _, session, _ = finished_run
    args = session.task["hyperparams"]["Args"]
    help_run = project.run("--help")
    assert help_run.returncode == 0, help_run.stderr[-2000:]
    flags = set(re.findall(r"^  --(\w+)", help_run.stdout, flags=re.M))
    assert flags == {flag.name for flag in ALL_FLAGS}  # --help lists every flag
    assert flags <= set(args), flags - set(args)
    assert args["dropout"]["value"] == "0.3"
    assert args["learning_rate"]["value"] == "0.003"
    assert args["comment"]["value"] == HYPOTHESIS


def test_source_commit_and_uncommitted_diff(finished_run):
    project, _, session, _ = finished_run
    script = session.task["script"]
    assert script["version_num"] == git(project.path, "rev-parse", "HEAD")
    assert "+# an uncommitted change" in script["diff"]


def test_loss_curves_share_steps_and_val_falls(finished_run):
    _, _, session, _ = finished_run
    train, val = session.scalars("Loss", "train"), session.scalars("Loss", "val")
    assert sorted(train) == sorted(val) == [0, 20, 40, 60]
    assert val[0] - val[60] > 0.5
    assert sorted(session.scalars("BPB", "val")) == [0, 20, 40, 60]


def test_one_generated_sample_per_eval(finished_run):
    _, _, session, _ = finished_run
    samples = session.debug_samples("Generated Sample")
    assert sorted(s["iter"] for s in samples) == [0, 20, 40, 60]
    assert all(s["url"].endswith(".txt") for s in samples)
    assert session.console().count("Generated Sample") >= 4


def test_checkpoint_is_the_output_model(finished_run):
    project, result, session, _ = finished_run
    assert (project.path / "RUN" / "ckpt.pt").is_file()
    [model] = session.task["offline_output_models"]
    # The model refers to the run folder's checkpoint: the session holds no second copy of it.
    assert model["weights"]["register_uri"] == (project.path / "RUN" / "ckpt.pt").resolve().as_uri()
    assert not list(session.folder.rglob("*.pt"))
    assert "offline session" in result.stderr and "--import-offline-session" in result.stderr


def test_eval_only_prints_loss_and_bits_per_byte(finished_run):
    project, _, _, _ = finished_run
    result = project.run("--eval_only", "--resume", "RUN", "--data", "mystories.txt", "--device", "cpu")
    assert result.returncode == 0, result.stderr[-2000:]
    last = result.stdout.strip().splitlines()[-1]
    match = re.fullmatch(r"val_loss=(\d+\.\d+) val_bpb=(\d+\.\d+)", last)
    assert match, last
    loss, bpb = map(float, match.groups())
    assert 0 < bpb < loss < 6.3  # better than a uniform guess over 512 tokens; a token holds more than one byte
