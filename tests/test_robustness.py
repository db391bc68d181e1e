"""Never lose a run: real signals to real training processes, resume, divergence, an unreachable ClearML server.

Training data is a slice of the TinyStories train sample in tests/data (see SOURCES.md there).
"""

import signal
import subprocess
import time

import pytest
import torch
from runner import QUICK, make_stories_project, wait_for_line, wait_for_record


@pytest.fixture
def project(tmp_path):
    return make_stories_project(tmp_path)


def finish(process: subprocess.Popen, timeout: float = 30) -> tuple[int, str, str, float]:
    started = time.monotonic()
    stdout, stderr = process.communicate(timeout=timeout)
    return process.returncode, stdout, stderr, time.monotonic() - started


def test_ctrl_c_after_first_eval_saves_checkpoint_and_aborts_task(project):
    process = project.start(*QUICK, "--max_steps", "100000", "--out_dir", "RUN")
    wait_for_line(process.stdout, "step 0:", timeout=60)
    process.send_signal(signal.SIGINT)
    code, _, stderr, seconds = finish(process)
    assert code == 130 and seconds < 15
    assert "Traceback" not in stderr
    assert "checkpoint saved to RUN/ckpt.pt" in stderr and "--resume RUN" in stderr
    checkpoint = torch.load(project.path / "RUN" / "ckpt.pt", weights_only=False)
    assert f"interrupted at step {checkpoint['step']};" in stderr
    [session] = project.sessions()
    assert "aborted" in session.task["tags"]


def test_sigterm_saves_and_resume_continues_after_the_saved_step(project):
    process = project.start(*QUICK, "--max_steps", "100000", "--out_dir", "RUN")
    wait_for_line(process.stdout, "step 0:", timeout=60)
    process.send_signal(signal.SIGTERM)
    code, _, stderr, seconds = finish(process)
    assert code == 130 and seconds < 15 and "Traceback" not in stderr
    saved_step = torch.load(project.path / "RUN" / "ckpt.pt", weights_only=False)["step"]
    assert f"interrupted at step {saved_step};" in stderr and "checkpoint saved to RUN/ckpt.pt" in stderr

    result = project.run("--resume", "RUN", "--max_steps", str(saved_step + 12))
    assert result.returncode == 0, result.stderr[-2000:]
    first, resumed = project.sessions()
    assert "aborted" in first.task["tags"] and "aborted" not in resumed.task["tags"]
    steps = sorted(resumed.scalars("Loss", "val"))
    assert steps and steps[0] > saved_step
    assert min(resumed.scalars("Train step", "loss")) == saved_step + 1
    assert torch.load(project.path / "RUN" / "ckpt.pt", weights_only=False)["step"] > saved_step


def test_second_ctrl_c_quits_at_once(project):
    # Steps of about a second, so the second Ctrl+C lands while the first waits for its step to end.
    process = project.start(
        *QUICK, "--batch_size", "1024", "--max_steps", "100000", "--sample_tokens", "0", "--out_dir", "RUN"
    )
    wait_for_record(project.path / "RUN", {"event": "eval", "step": 0}, timeout=60)  # recorded: the steps begin
    process.send_signal(signal.SIGINT)
    wait_for_line(process.stderr, "stopping after this step", timeout=10)
    process.send_signal(signal.SIGINT)
    code, _, stderr, seconds = finish(process)
    assert code == 130 and seconds < 5
    assert "checkpoint saved" not in stderr and "Traceback" not in stderr


def test_kill_9_keeps_the_last_checkpoint_whole(project):
    """Checkpointing at every step, SIGKILL lands during or between writes; what is on disk always loads."""
    checkpoint_path = project.path / "RUN" / "ckpt.pt"
    flags = [*QUICK, "--max_steps", "100000", "--checkpoint_interval", "1", "--out_dir", "RUN"]
    for delay in (0.0, 0.5):  # each run is killed once it has written a checkpoint of its own
        before = checkpoint_path.stat().st_mtime_ns if checkpoint_path.exists() else 0
        process = project.start(*flags) if before == 0 else project.start("--resume", "RUN")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (
            not checkpoint_path.exists() or checkpoint_path.stat().st_mtime_ns == before
        ):
            time.sleep(0.05)
        time.sleep(delay)
        process.kill()
        process.wait()
        assert checkpoint_path.stat().st_mtime_ns != before, "the run wrote no checkpoint of its own"
        checkpoint = torch.load(checkpoint_path, weights_only=False)
        assert checkpoint["step"] >= 1
    result = project.run("--resume", "RUN", "--max_steps", str(checkpoint["step"] + 3))
    assert result.returncode == 0, result.stderr[-2000:]


def test_unreachable_server_falls_back_to_offline(project):
    started = time.monotonic()
    result = project.run(
        *QUICK, "--max_steps", "3", "--out_dir", "RUN",
        CLEARML_API_HOST="http://127.0.0.1:9", CLEARML_API_ACCESS_KEY="key", CLEARML_API_SECRET_KEY="secret",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert time.monotonic() - started < 90
    warnings = [line for line in result.stderr.splitlines() if "does not answer" in line]
    assert len(warnings) == 1 and "http://127.0.0.1:9" in warnings[0]
    assert len(project.sessions()) == 1


def test_run_outside_a_git_repository_says_so(tmp_path, project):
    (project.path / ".git").rename(tmp_path / "git-moved-away")
    result = project.run(*QUICK, "--max_steps", "2", "--out_dir", "RUN", timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "is not a git repository" in result.stderr


def test_commit_and_diff_are_recorded_with_a_remote(project):
    subprocess.run(["git", "remote", "add", "origin", "https://example.com/me/gpt.git"], cwd=project.path, check=True)
    with open(project.path / "main.py", "a") as f:
        f.write("# local edit\n")
    result = project.run(*QUICK, "--max_steps", "2", "--out_dir", "RUN", timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    [session] = project.sessions()
    script = session.task["script"]
    assert script["repository"] == "https://example.com/me/gpt.git"
    assert len(script["version_num"]) == 40 and "+# local edit" in script["diff"]
    assert script["branch"] and script["entry_point"] == "main.py"
