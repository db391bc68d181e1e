"""The record is what ran: run.json, the checkpoint's flags and ClearML's Args hold the same final configuration, for
a fresh run, a --max_seconds run (which reproduces with the steps it trained) and a resumed run (tests/test_state.py
covers a torchrun run).

Training data is a slice of the TinyStories train sample in tests/data (see SOURCES.md there).
"""

import json

import pytest
import torch
from runner import QUICK, make_stories_project


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    project, printed = make_stories_project(tmp_path_factory.mktemp("record")), {}
    for flags in (
        ["--max_steps", "12", "--out_dir", "FRESH"],
        ["--max_steps", "100000", "--max_seconds", "1", "--out_dir", "TIMED"],
        ["--max_steps", "6", "--out_dir", "RESUMED"],
    ):
        result = project.run(*QUICK, *flags)
        assert result.returncode == 0, result.stderr[-2000:]
        printed[flags[-1]] = result.stdout
    result = project.run("--resume", "RESUMED", "--max_steps", "12")
    assert result.returncode == 0, result.stderr[-2000:]
    fresh, timed, first, resumed = project.sessions()
    return project, {"FRESH": fresh, "TIMED": timed, "RESUMED": resumed}, first, printed


def recorded_flags(project, folder: str) -> dict:
    """The flags as the record holds them now: run.json's, or those of the last resumed event."""
    flags = json.loads((project.path / folder / "run.json").read_text())["flags"]
    for line in (project.path / folder / "metrics.jsonl").read_text().splitlines():
        event = json.loads(line)
        if event["event"] == "resumed":
            flags = event["flags"]
    return flags


def as_text(flags: dict) -> dict:
    """As ClearML writes hyperparameters: unset is empty, the rest as Python prints it."""
    return {
        name: "" if value is None else value if isinstance(value, str) else str(value) for name, value in flags.items()
    }


@pytest.mark.parametrize("folder", ["FRESH", "TIMED", "RESUMED"])
def test_run_json_checkpoint_and_args_hold_one_configuration(runs, folder):
    project, sessions, _, _ = runs
    recorded = recorded_flags(project, folder)
    saved = torch.load(project.path / folder / "ckpt.pt", weights_only=True)["args"]
    args = {name: entry["value"] for name, entry in sessions[folder].task["hyperparams"]["Args"].items()}
    assert recorded == saved
    assert as_text(recorded) == args
    assert recorded["out_dir"] == folder and recorded["warmup_steps"] is not None  # as resolved, never "default"


def test_a_max_seconds_run_records_the_steps_it_trained(runs):
    project, sessions, _, _ = runs
    recorded = recorded_flags(project, "TIMED")
    trained = torch.load(project.path / "TIMED" / "ckpt.pt", weights_only=True)["step"]
    assert recorded["max_steps"] == trained < 100000
    assert recorded["lr_decay_steps"] == trained  # the defaults that follow the step count follow it
    assert sessions["TIMED"].task["hyperparams"]["Args"]["max_steps"]["value"] == str(trained)


def test_a_max_seconds_run_says_and_reproduces_the_steps_it_trained(runs):
    project, _, _, printed = runs
    trained = torch.load(project.path / "TIMED" / "ckpt.pt", weights_only=True)["step"]
    assert f"--max_steps {trained}" in printed["TIMED"]  # "recorded: rerun with it"
    result = project.run("--reproduce", "TIMED")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1].startswith("reproduced exactly: ")
    lines = (project.path / "TIMED.reproduction" / "metrics.jsonl").read_text().splitlines()
    assert [e["step"] for e in map(json.loads, lines) if e["event"] == "eval"][-1] == trained


def test_a_resumed_run_differs_from_its_first_part_only_in_what_was_typed(runs):
    project, _, first, _ = runs
    header = json.loads((project.path / "RESUMED" / "run.json").read_text())["flags"]
    resumed = recorded_flags(project, "RESUMED")
    differing = {name for name in header if header[name] != resumed[name]}
    assert differing == {"max_steps", "resume"}  # typed, and the invocation's own
    first_args = {name: entry["value"] for name, entry in first.task["hyperparams"]["Args"].items()}
    assert first_args == as_text(header)


def test_resuming_a_completed_run_says_there_is_nothing_to_do_and_writes_nothing(runs):
    project, _, _, _ = runs
    before = {p.name: p.read_bytes() for p in (project.path / "FRESH").iterdir() if p.name != ".lock"}
    sessions = len(project.sessions())
    result = project.refused("--resume", "FRESH")
    assert (
        result.returncode == 0 and "has trained its 12 steps: nothing to do" in result.stderr.strip().splitlines()[-1]
    )
    assert {p.name: p.read_bytes() for p in (project.path / "FRESH").iterdir() if p.name != ".lock"} == before
    assert len(project.sessions()) == sessions
