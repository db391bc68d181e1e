"""Scale out: main.py under the real torchrun launcher (2 CPU processes, gloo), and --queue without a ClearML server;
distributed.py's own waits and stop vote under torchrun too.

Each worker is a shell that runs main.py and writes down its exit code (torchrun reports none once it has forwarded
a signal); the shell's trap only defers a forwarded signal until main.py, which gets it too, has finished.
Training data is a slice of the TinyStories train sample in tests/data (see SOURCES.md there).
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from runner import ROOT, TINY_MODEL, TRAIN_SAMPLE, make_project, wait_for_line
from zygote import ZYGOTE

QUICK = [
    *TINY_MODEL, "--data", "stories.txt", "--eval_iters", "2", "--sample_tokens", "5", "--warmup_steps", "2",
    "--log_interval", "2",
]  # fmt: skip
WORKER = 'trap : INT TERM; "$0" main.py "$@"; code=$?; echo "$RANK $code" >> exits.txt; exit $code'
SHUTDOWN_GRACE_S = 30  # torchrun's wait before it SIGKILLs workers that ignore its signal


@pytest.fixture
def project(tmp_path):
    project = make_project(tmp_path)
    (project.path / "stories.txt").write_bytes(TRAIN_SAMPLE.read_bytes()[:300_000])
    return project


def torchrun(project, *args: str) -> subprocess.Popen:
    command = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    return ZYGOTE.popen(  # the launcher from the zygote; its workers are new interpreters, as a user's are
        [*command, "--no-python", "sh", "-c", WORKER, sys.executable, *args],
        cwd=project.path,
        env=project.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # so a failed test can end the launcher and its workers together
    )


def finish(process: subprocess.Popen, timeout: float) -> tuple[int, str, str, float]:
    started = time.monotonic()
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        raise
    return process.returncode, stdout, stderr, time.monotonic() - started


def exit_codes(project) -> dict[int, int]:
    lines = (project.path / "exits.txt").read_text().split("\n")
    return dict(tuple(map(int, line.split())) for line in lines if line)


def test_two_ranks_train_as_one_process_with_twice_the_batch(project):
    """Same windows, same gradients: with gradient accumulation, the all-reduce after the last micro-batch sums all."""
    flags = [*QUICK, "--grad_accum", "2", "--max_steps", "8", "--eval_interval", "4"]
    one = project.run(*flags, "--batch_size", "8", "--out_dir", "ONE", OMP_NUM_THREADS="1")
    assert one.returncode == 0, one.stderr[-2000:]
    code, stdout, stderr, _ = finish(torchrun(project, *flags, "--batch_size", "4", "--out_dir", "TWO"), timeout=120)
    assert code == 0 and exit_codes(project) == {0: 0, 1: 0}, stderr[-3000:]

    assert stdout.count("world size 2: global batch 16 sequences") == 1  # rank 0 alone speaks
    assert stdout.count("step 8: train loss") == 1
    single, double = project.sessions()  # one ClearML task for the two processes
    assert double.task["hyperparams"]["Args"]["world_size"]["value"] == "2"
    for title, series in (("Train step", "loss"), ("Loss", "val"), ("Loss", "train")):
        expected, got = single.scalars(title, series), double.scalars(title, series)
        assert got.keys() == expected.keys()
        assert all(abs(got[step] - expected[step]) < 1e-4 for step in expected), (title, expected, got)
    checkpoint = torch.load(project.path / "TWO" / "ckpt.pt", weights_only=False)
    assert checkpoint["args"]["world_size"] == 2 and checkpoint["step"] == 8
    written = sorted(p.name for p in (project.path / "TWO").iterdir())
    assert [name for name in written if "ckpt" in name] == ["ckpt.pt"] and "tokenizer.json" in written


def test_ctrl_c_stops_every_rank_at_the_same_step_and_resumes_on_one_process(project):
    process = torchrun(project, *QUICK, "--max_steps", "100000", "--eval_interval", "100000", "--out_dir", "RUN")
    wait_for_line(process.stdout, "step 0:", timeout=90)
    time.sleep(1.0)  # into the training steps
    process.send_signal(signal.SIGINT)  # to the launcher, as Ctrl+C in a terminal
    _, _, stderr, seconds = finish(process, timeout=SHUTDOWN_GRACE_S + 30)
    # Both workers stopped on their own (before torchrun's SIGKILL), at the step they agreed on, and exited 130.
    assert exit_codes(project) == {0: 130, 1: 130}, stderr[-3000:]
    assert seconds < SHUTDOWN_GRACE_S
    assert "rank 1:" not in stderr and "Unable to shutdown" not in stderr
    checkpoint = torch.load(project.path / "RUN" / "ckpt.pt", weights_only=False)
    assert f"interrupted at step {checkpoint['step']}; checkpoint saved to RUN/ckpt.pt" in stderr
    [session] = project.sessions()
    assert "aborted" in session.task["tags"]

    more = checkpoint["step"] + 3
    result = project.run("--resume", "RUN", "--max_steps", str(more), OMP_NUM_THREADS="1")
    assert result.returncode == 0, result.stderr[-2000:]
    resumed = torch.load(project.path / "RUN" / "ckpt.pt", weights_only=False)
    assert resumed["step"] == more and resumed["args"]["world_size"] == 1


def test_killing_one_worker_ends_the_run(project):
    process = torchrun(project, *QUICK, "--max_steps", "100000", "--eval_interval", "5", "--out_dir", "RUN")
    wait_for_line(process.stdout, "step 5:", timeout=90)  # the ranks are training together
    workers = [p for p in psutil.Process(process.pid).children(recursive=True) if "main.py" in p.cmdline()[1:2]]
    [rank_1] = [p for p in workers if p.environ().get("RANK") == "1"]
    rank_1.kill()
    code, _, stderr, seconds = finish(process, timeout=SHUTDOWN_GRACE_S + 30)
    assert code != 0 and seconds < SHUTDOWN_GRACE_S
    assert exit_codes(project) == {0: 6, 1: 128 + signal.SIGKILL}, stderr[-3000:]
    assert "another process of this run stopped at step" in stderr
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in workers)


def test_diverging_loss_stops_every_rank(project):
    flags = [*QUICK, "--learning_rate", "50", "--min_lr", "50", "--grad_clip", "0", "--eval_interval", "100000"]
    code, _, stderr, _ = finish(torchrun(project, *flags, "--max_steps", "300", "--out_dir", "RUN"), timeout=120)
    assert code != 0 and exit_codes(project) == {0: 1, 1: 1}, stderr[-3000:]
    assert stderr.count("training diverged at step") == 1


def test_queue_without_a_server_is_a_usage_error(project):
    result = project.refused(*QUICK, "--queue", "gpus", "--out_dir", "RUN")
    assert result.returncode == 2
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.endswith("error: --queue gpus needs a ClearML server: run clearml-init or set CLEARML_API_HOST")
    assert project.sessions() == [] and not (project.path / "RUN").exists()


@pytest.fixture
def torchrun_script(tmp_path):
    """Start a script in 2 processes under torchrun, importing this program's modules, with tmp_path as its
    argument; whatever is left of it when the test ends (it failed) is killed, workers first."""
    launched = []

    def start(script: str) -> subprocess.Popen:
        command = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
        process = ZYGOTE.popen([*command, "--no-python", sys.executable, "-c", script, str(tmp_path)], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)  # fmt: skip
        launched.append(process)
        return process

    yield start
    for process in launched:
        if process.poll() is None:
            for left in [*psutil.Process(process.pid).children(recursive=True), psutil.Process(process.pid)]:
                left.kill()
            process.wait()


VOTES = """
import json, random, sys, time
from pathlib import Path
import distributed
distributed.setup()
rank, stops = distributed.rank(), []
for trial in range(30):
    wants = [random.Random(f"{trial} {r}").randrange(1, 12) for r in range(2)]  # the step after which each asks
    vote, step = distributed.StopVote(), 0
    while True:
        step += 1  # a training step, of a length that differs by rank and by step
        time.sleep(random.Random(f"{trial} {rank} {step}").random() * 0.002)
        if vote.decided():
            break
        vote.cast(step >= wants[rank])
    stops.append(dict(wants=wants, stopped=step))
(Path(sys.argv[1]) / f"rank-{rank}.json").write_text(json.dumps(stops))
"""


@pytest.mark.timeout(120)
def test_the_stop_vote_stops_every_rank_after_the_same_step(tmp_path, torchrun_script):
    code, _, stderr, _ = finish(torchrun_script(VOTES), timeout=90)
    assert code == 0, stderr[-3000:]
    rank_0, rank_1 = (json.loads((tmp_path / f"rank-{rank}.json").read_text()) for rank in (0, 1))
    assert rank_0 == rank_1
    assert all(trial["stopped"] == min(trial["wants"]) + 1 for trial in rank_0)  # the vote is read a step later
    assert {trial["wants"][0] < trial["wants"][1] for trial in rank_0} == {True, False}  # either rank asks first


WAITS = """
import sys, threading
import distributed
distributed.setup()
try:
    if distributed.rank() == 1:
        print("rank 1 busy", file=sys.__stdout__, flush=True)
        while not threading.Event().wait(0.1):  # busy elsewhere until Ctrl+C reaches it too (looking for it)
            pass
    print("rank 0 waiting", flush=True)
    distributed.wait_for_all()
except KeyboardInterrupt:
    print(f"rank {distributed.rank()} interrupted", file=sys.__stdout__, flush=True)
    if distributed.rank() == 0:  # stays, so that torchrun does not end rank 1 before Ctrl+C reaches it too
        while not threading.Event().wait(0.1):
            pass
    sys.exit(130)
"""


def main_thread_state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


@pytest.mark.timeout(120)  # torchrun starts in seconds, but in a minute on a loaded machine
def test_ctrl_c_ends_a_wait_for_the_other_ranks_at_once(torchrun_script):
    process = torchrun_script(WAITS)
    # Both ranks inside the try, whichever says so first: rank 1 may leave setup() after rank 0 has.
    if "rank 0 waiting" not in wait_for_line(process.stdout, "rank 1 busy", timeout=60):
        wait_for_line(process.stdout, "rank 0 waiting", timeout=60)
    workers = [p for p in psutil.Process(process.pid).children(recursive=True) if p.cmdline()[1:2] == ["-c"]]
    rank_0, rank_1 = sorted(workers, key=lambda p: p.environ()["RANK"])
    deadline = time.monotonic() + 10
    while main_thread_state(rank_0.pid) != "S" and time.monotonic() < deadline:  # until it blocks in the wait
        time.sleep(0.01)
    rank_0.send_signal(signal.SIGINT)  # Ctrl+C reaches rank 0 first, while rank 1 is elsewhere
    started = time.monotonic()
    wait_for_line(process.stdout, "rank 0 interrupted", timeout=10)
    assert time.monotonic() - started < 5
    rank_1.send_signal(signal.SIGINT)
    wait_for_line(process.stdout, "rank 1 interrupted", timeout=10)
    code, _, stderr, seconds = finish(process, timeout=SHUTDOWN_GRACE_S + 30)
    assert code != 0 and seconds < SHUTDOWN_GRACE_S, stderr[-3000:]  # rank 1 ended on its own, then torchrun
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in workers)
