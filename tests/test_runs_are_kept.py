"""A run folder belongs to one run, and no failure loses what a run did: real processes, real faults.

Faults are real: a small tmpfs for a full disk (in a private mount namespace, `unshare`), an address-space limit for
out of memory, a fault injected into the model's forward for an unexpected error.
"""

import json
import re
import resource
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from runner import QUICK, TINY_MODEL, TRAIN_SAMPLE, make_stories_project, wait_for_line


@pytest.fixture
def project(tmp_path):
    return make_stories_project(tmp_path)


def last_line(stderr: str) -> str:
    return stderr.strip().splitlines()[-1]


def args_of(session) -> dict:
    return {name: p["value"] for name, p in session.task["hyperparams"]["Args"].items()}


def test_a_new_run_never_overwrites_a_run_folder(project):
    assert project.run(*QUICK, "--max_steps", "2", "--out_dir", "RUN").returncode == 0
    saved = (project.path / "RUN" / "ckpt.pt").read_bytes()
    again = project.refused(*QUICK, "--max_steps", "2", "--out_dir", "RUN")
    assert again.returncode == 2 and "Traceback" not in again.stderr
    assert "already holds a run" in last_line(again.stderr) and "--resume RUN" in last_line(again.stderr)
    assert (project.path / "RUN" / "ckpt.pt").read_bytes() == saved
    replaced = project.run(*QUICK, "--max_steps", "3", "--out_dir", "RUN", "--overwrite")
    assert replaced.returncode == 0, replaced.stderr[-2000:]
    assert torch.load(project.path / "RUN" / "ckpt.pt", weights_only=False)["step"] == 3


def test_a_second_process_on_a_folder_in_use_is_refused(project):
    first = project.start(*QUICK, "--max_steps", "100000", "--out_dir", "RUN")
    wait_for_line(first.stdout, "step 0:", timeout=60)
    second = project.refused(*QUICK, "--max_steps", "2", "--out_dir", "RUN", "--overwrite")
    first.send_signal(signal.SIGINT)
    assert first.wait(timeout=30) == 130
    assert second.returncode == 2 and "in use by another run" in last_line(second.stderr)
    stopped_at = torch.load(project.path / "RUN" / "ckpt.pt", weights_only=True)["step"]
    resumed = project.run("--resume", "RUN", "--max_steps", str(stopped_at + 3))
    assert resumed.returncode == 0, resumed.stderr[-2000:]


def test_default_run_folders_are_one_per_run(project):
    runs = [project.start(*QUICK, "--max_steps", "2") for _ in range(2)]
    assert [run.wait(timeout=120) for run in runs] == [0, 0]
    folders = sorted((project.path / "runs").iterdir())
    assert len(folders) == 2 and all((folder / "ckpt.pt").is_file() for folder in folders)


def test_divergence_keeps_only_a_finite_checkpoint_that_resumes(project):
    flags = [*QUICK, "--learning_rate", "50", "--min_lr", "50", "--warmup_steps", "0", "--grad_clip", "0"]
    result = project.run(*flags, "--max_steps", "500", "--checkpoint_interval", "1", "--log_interval", "1",
                         "--out_dir", "RUN")  # fmt: skip
    assert result.returncode == 1 and "Traceback" not in result.stderr
    line = next(line for line in result.stderr.splitlines() if "diverged" in line)
    checkpoint = torch.load(project.path / "RUN" / "ckpt.pt", weights_only=False)
    assert f"the checkpoint of step {checkpoint['step']} is kept" in line
    assert all(torch.isfinite(t).all() for t in checkpoint["model"].values())
    [session] = project.sessions()
    assert "failed" in session.task["tags"]
    resumed = project.run("--resume", "RUN", "--learning_rate", "1e-3", "--min_lr", "1e-4",
                          "--max_steps", str(checkpoint["step"] + 2))  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-2000:]


def test_divergence_before_the_first_checkpoint_says_so(project):
    flags = [*QUICK, "--learning_rate", "50", "--min_lr", "50", "--warmup_steps", "0", "--grad_clip", "0"]
    result = project.run(*flags, "--max_steps", "500", "--checkpoint_interval", "400", "--log_interval", "1",
                         "--out_dir", "RUN")  # fmt: skip
    assert result.returncode == 1
    assert "no checkpoint was written yet" in next(line for line in result.stderr.splitlines() if "diverged" in line)
    assert not (project.path / "RUN" / "ckpt.pt").exists()


def test_disk_full_keeps_the_previous_checkpoint(project, tmp_path):
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "true"]).returncode != 0:
        pytest.fail("this test needs `unshare -rm` (util-linux) to mount a small tmpfs")
    small, kept = tmp_path / "small-disk", tmp_path / "kept"
    small.mkdir()
    # Room for one checkpoint (about 1.6 MB at this shape: weights, Muon and AdamW state) but not for a second.
    script = (
        f"mount -t tmpfs -o size=2600k tmpfs {small} && "
        f"{sys.executable} main.py {' '.join(QUICK)} --max_steps 100 --checkpoint_interval 10 --out_dir {small}/RUN; "
        f"code=$?; cp -r {small}/RUN {kept}; exit $code"
    )
    result = subprocess.run(["unshare", "-rm", "sh", "-c", script], cwd=project.path, env=project.env(),
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 4, result.stderr[-2000:]
    line = next(line for line in result.stderr.splitlines() if "disk is full" in line)
    assert "the checkpoint of step 10 is kept" in line and "Traceback" not in result.stderr
    assert torch.load(kept / "ckpt.pt", weights_only=False)["step"] == 10
    assert "Traceback" in (kept / "error.log").read_text()
    [session] = project.sessions()
    assert "failed" in session.task["tags"]


def limit_memory():
    resource.setrlimit(resource.RLIMIT_DATA, (2 << 30, 2 << 30))


def test_out_of_memory_is_one_line_and_exit_3(project):
    # The memory check up front passes (it sees the machine's memory), then the first evaluation's 1.6 GB of
    # logits does not fit under the process's 2 GB limit.
    process = subprocess.run(
        [sys.executable, "main.py", *QUICK, "--batch_size", "12288", "--max_steps", "5", "--out_dir", "RUN"],
        cwd=project.path, env=project.env(), capture_output=True, text=True, timeout=120, preexec_fn=limit_memory,
    )  # fmt: skip
    assert process.returncode == 3, process.stderr[-2000:]
    assert "Traceback" not in process.stderr
    assert "out of memory at step 0" in last_line(process.stderr)
    assert "Traceback" in (project.path / "RUN" / "error.log").read_text()
    [session] = project.sessions()
    assert "failed" in session.task["tags"]


def test_an_unexpected_error_is_one_line_and_its_traceback_a_file(project):
    inject = (
        "import sys, runpy, model\n"
        "forward, calls = model.GPT.forward, [0]\n"
        "def failing(self, *args, **kwargs):\n"
        "    calls[0] += 1\n"
        "    if self.training and calls[0] > 30:\n"
        "        raise RuntimeError('injected fault')\n"
        "    return forward(self, *args, **kwargs)\n"
        "model.GPT.forward = failing\n"
        "sys.argv = ['main.py', *sys.argv[1:]]\n"
        "runpy.run_path('main.py', run_name='__main__')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", inject, *QUICK, "--max_steps", "100", "--out_dir", "RUN"],
        cwd=project.path, env=project.env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 5, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    line = next(line for line in result.stderr.splitlines() if "unexpected error" in line)
    assert "RuntimeError: injected fault" in line and "the checkpoint of step 10 is kept" in line
    assert "injected fault" in (project.path / "RUN" / "error.log").read_text()
    [session] = project.sessions()
    assert "failed" in session.task["tags"]


def test_a_checkpoint_of_another_program_is_a_user_error(project):
    (project.path / "OTHER").mkdir()
    torch.save({"state_dict": {}}, project.path / "OTHER" / "ckpt.pt")
    result = project.refused("--resume", "OTHER")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "not a checkpoint of this program" in last_line(result.stderr)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_long_evaluation_is_left_within_seconds(project, signum):
    process = project.start(*QUICK, "--eval_iters", "100000", "--max_steps", "20", "--out_dir", "RUN")
    wait_for_line(process.stdout, "parameters", timeout=60)  # the first evaluation, which takes minutes, begins
    process.send_signal(signum)
    started = time.monotonic()
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 130 and time.monotonic() - started < 10
    assert "Traceback" not in stderr and "interrupted at step 0" in stderr
    assert torch.load(project.path / "RUN" / "ckpt.pt", weights_only=False)["step"] == 0
    [session] = project.sessions()
    assert "aborted" in session.task["tags"] and session.folder.with_suffix(".zip").is_file()


def test_sigterm_while_preparing_data_is_exit_130_and_one_line(project):
    (project.path / "big.txt").write_bytes(TRAIN_SAMPLE.read_bytes() * 6)
    process = project.start(*TINY_MODEL, "--data", "big.txt", "--vocab_size", "4096", "--out_dir", "RUN")
    wait_for_line(process.stderr, "training a 4096-token BPE tokenizer", timeout=60)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 130
    assert "Traceback" not in stderr and "interrupted before training started" in stderr


@pytest.mark.parametrize("typed", [["--lr", "100"], ["--drop", "0.3"]])
def test_flags_are_never_abbreviated(project, typed):
    result = project.refused(*QUICK, *typed, "--max_steps", "2")
    assert result.returncode == 2 and "unrecognized arguments" in last_line(result.stderr)


def test_resume_on_other_data_needs_new_data(project):
    (project.path / "other.txt").write_bytes(TRAIN_SAMPLE.read_bytes()[400_000:800_000])
    assert project.run(*QUICK, "--max_steps", "2", "--out_dir", "RUN").returncode == 0
    refused = project.refused("--resume", "RUN", "--data", "other.txt", "--max_steps", "4")
    assert refused.returncode == 2 and "--new_data" in last_line(refused.stderr)
    assert torch.load(project.path / "RUN" / "ckpt.pt", weights_only=False)["args"]["data"] == "stories.txt"
    allowed = project.run("--resume", "RUN", "--data", "other.txt", "--new_data", "--max_steps", "4")
    assert allowed.returncode == 0, allowed.stderr[-2000:]
    assert torch.load(project.path / "RUN" / "ckpt.pt", weights_only=False)["args"]["data"] == "other.txt"


def test_the_real_vocabulary_size_is_recorded(project):
    (project.path / "small.txt").write_bytes(TRAIN_SAMPLE.read_bytes()[:60_000])
    result = project.run(*QUICK, "--data", "small.txt", "--vocab_size", "65536", "--max_steps", "2",
                         "--out_dir", "RUN")  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    real = torch.load(project.path / "RUN" / "ckpt.pt", weights_only=False)["args"]["vocab_size"]
    assert 257 < real < 65536 and f"the text allows only {real} tokens, not 65536" in result.stderr
    [session] = project.sessions()
    assert args_of(session)["vocab_size"] == str(real)


def test_warmup_is_at_most_a_tenth_of_a_short_run(project):
    assert project.run(*QUICK, "--max_steps", "30", "--log_interval", "1", "--out_dir", "RUN").returncode == 0
    [session] = project.sessions()
    assert args_of(session)["warmup_steps"] == "3"
    lr = session.scalars("Learning rate", "lr")
    assert max(lr, key=lr.get) == 4  # the peak comes right after warmup (the rate of step 3), not after 100 steps


def test_impossible_sizes_are_refused_up_front(project):
    result = project.refused(*QUICK, "--batch_size", "100000000", "--max_steps", "2")
    assert result.returncode == 2 and "--batch_size 100000000" in last_line(result.stderr)
    assert "GiB" in last_line(result.stderr)
    result = project.refused(*QUICK, "--block_size", "100000", "--max_steps", "2")
    assert result.returncode == 2 and "fewer than one training window" in last_line(result.stderr)


def test_eval_only_scores_a_whole_file_with_progress(project):
    assert project.run(*QUICK, "--max_steps", "5", "--out_dir", "RUN").returncode == 0
    (project.path / "held-out.txt").write_bytes(TRAIN_SAMPLE.read_bytes()[-100_000:])
    scores = {}
    for split in ("val", "all"):
        result = project.run("--eval_only", "--resume", "RUN", "--data", "held-out.txt", "--eval_split", split)
        assert result.returncode == 0, result.stderr[-2000:]
        bars = re.findall(r"evaluating: +\d+%\|[^|]*\| (\d+)/(\d+)", result.stderr)
        assert bars and bars[-1][0] == bars[-1][1]  # the bar ends at its total
        scores[split] = result.stdout.strip().splitlines()[-1]
    assert scores["val"] != scores["all"] and all(s.startswith("val_loss=") for s in scores.values())
    record = json.dumps(torch.load(project.path / "RUN" / "ckpt.pt", weights_only=False)["args"])
    assert "held-out.txt" not in record  # evaluating never rewrites the run's configuration
    # Each score is recorded in the run's own record and in a ClearML task of its own (offline: a new session).
    events = [json.loads(line) for line in (project.path / "RUN" / "metrics.jsonl").read_text().splitlines()]
    recorded = [e for e in events if e["event"] == "eval_only"]
    assert [(e["split"], e["step"]) for e in recorded] == [("val", 5), ("all", 5)]
    assert f"val_loss={recorded[1]['loss']:.6f} val_bpb={recorded[1]['bpb']:.6f}" == scores["all"]
    _, *scored = project.sessions()
    pairs = zip(scored, ("val", "all"), strict=True)
    assert [sorted(session.scalars(f"held-out.txt {split}", "bpb")) for session, split in pairs] == [[5], [5]]


def test_two_ctrl_c_during_the_final_sample_still_close_the_task(project):
    assert project.run(*QUICK, "--max_steps", "2", "--eval_interval", "100", "--out_dir", "RUN").returncode == 0
    # Resumed, the run evaluates only at its end, with a long sample.
    process = project.start("--resume", "RUN", "--max_steps", "4", "--sample_tokens", "5000")
    wait_for_line(process.stdout, "step 4:", timeout=120)  # the final evaluation is done; its sample is running
    process.send_signal(signal.SIGINT)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 130 and "Traceback" not in stderr
    _, session = project.sessions()
    assert 4 in session.scalars("Loss", "val") and "aborted" in session.task["tags"]
    assert session.folder.with_suffix(".zip").is_file()
