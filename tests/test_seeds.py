"""Seed groups (`--seeds`) and reading a trained model (`--sample`), run as a user runs them.

Training data is a slice of the TinyStories train sample in tests/data (see SOURCES.md there).
"""

import json
import signal

import pytest
from runner import QUICK, make_stories_project, wait_for_line


@pytest.fixture
def project(tmp_path):
    return make_stories_project(tmp_path)


@pytest.mark.timeout(240)
def test_ctrl_c_during_the_second_seed_stops_the_group_and_resume_continues_it(project):
    # Each seed trains for a second or two: the first one finishes, the second is stopped while it trains.
    group = project.start(*QUICK, "--max_steps", "40", "--seeds", "11", "12", "13", "--out_dir", "G")
    wait_for_line(group.stdout, "run folder G/seed-12", timeout=120)  # the first seed is done, the second starts
    wait_for_line(group.stdout, "step 0:", timeout=60)
    group.send_signal(signal.SIGINT)
    _, stderr = group.communicate(timeout=60)
    assert group.returncode == 130 and "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert "stopped during seed 12, which is saved in G/seed-12; not started: 13" in last
    assert "--resume G" in last
    assert (project.path / "G" / "seed-12" / "ckpt.pt").is_file() and not (project.path / "G" / "seed-13").exists()

    resumed = project.run("--resume", "G", timeout=180)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stderr.strip().splitlines()[-1] == "group G: 3 of 3 seeds completed"
    sessions = project.sessions()
    assert all("group-G" in s.task["tags"] for s in sessions)
    seeds = sorted(int(s.task["hyperparams"]["Args"]["seed"]["value"]) for s in sessions)
    assert seeds == [11, 12, 12, 13]  # seed 12 in two sessions: stopped, then resumed


@pytest.mark.timeout(120)
def test_a_failing_seed_does_not_stop_the_others(project):
    flags = [*QUICK, "--max_steps", "40", "--learning_rate", "50", "--min_lr", "50", "--grad_clip", "0",
             "--warmup_steps", "0", "--log_interval", "1", "--eval_interval", "100"]  # fmt: skip
    result = project.run(*flags, "--seeds", "1", "2", "--out_dir", "G", timeout=120)
    assert result.returncode == 1  # the first failure's code
    assert result.stderr.count("training diverged at step") == 2
    assert "group G: 0 of 2 seeds completed; failed: 1 (exit 1), 2 (exit 1)" in result.stderr.strip().splitlines()[-1]
    assert json.loads((project.path / "G" / "group.json").read_text())["seeds"] == [1, 2]


# The thread method: broken, the refusal would wait in the process group's rendezvous, in C++, where the signal
# method cannot end it.
@pytest.mark.timeout(60, method="thread")
def test_seeds_under_torchrun_is_refused_in_one_line(project):
    # What torchrun sets for each of its processes; test_distributed.py launches the real torchrun.
    torchrun = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    result = project.refused(*QUICK, "--seeds", "1", "2", **torchrun)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.endswith("error: --seeds runs one process per seed: start it with python main.py, not torchrun")
    assert not (project.path / "runs").exists()


@pytest.mark.timeout(120)
def test_sample_generates_from_a_trained_run_and_writes_nothing(project):
    assert project.run(*QUICK, "--max_steps", "10", "--out_dir", "RUN").returncode == 0
    before = {p.name: p.stat().st_mtime_ns for p in (project.path / "RUN").iterdir()}
    sessions = len(project.sessions())
    result = project.run("--sample", "--resume", "RUN", "--prompt", "The dog", "--num_samples", "3",
                         "--sample_tokens", "8")  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    headers = [line for line in result.stdout.splitlines() if line.startswith("--- sample ")]
    assert headers == [f"--- sample {i} of 3 (step 10, seed 1337) ---" for i in (1, 2, 3)]
    texts = result.stdout.split("---\n")[1:]
    assert len(texts) == 3 and all(text.startswith("The dog") for text in texts)
    assert {p.name: p.stat().st_mtime_ns for p in (project.path / "RUN").iterdir()} == before
    assert len(project.sessions()) == sessions
