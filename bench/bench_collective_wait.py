"""
What waiting on the other processes costs under torchrun (2 CPU processes, gloo): how late a rank resumes after the
last peer joins a collective, and what deciding together whether to stop adds to each step.

    python bench/bench_collective_wait.py [--repeats 40]

Each figure is from one torchrun launch of this script in worker mode, candidates interleaved repeat by repeat so
load from elsewhere hits them alike. Both ranks are on one machine, so their monotonic clocks agree.

- Late by: rank 1 joins an all-reduce LATE_MS after rank 0 started waiting on it; the figure is how long after rank
  1 joined rank 0 resumed (median over repeats), for the wait that polled with a sleep doubling from 0.1 ms to
  50 ms (what distributed.py did), distributed.wait (an Event that the collective's completion sets), and
  work.wait() blocking in C++ (the floor, but deaf to Ctrl+C).
- Per step: STEPS steps of a fixed piece of compute (alike on both ranks), alone, with an "any rank" all-reduce of
  the stop flag waited on after each (what main.py does: polled before, by distributed.wait now), and with
  distributed.StopVote (cast after a step, read after the next); the figure is the time each adds to a step
  (median of repeats).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

LATE_MS = (1, 10, 30)
STEPS = 50


def polled(work) -> None:
    """The wait distributed.py had: polls, sleeping 0.1 ms at first, doubling up to 50 ms."""
    pause = 1e-4
    while not work.is_completed():
        time.sleep(pause)
        pause = min(2 * pause, 0.05)
    work.wait()


def late_join(wait, late_s: float) -> float:
    """Seconds between rank 1 joining an all-reduce late_s late and rank 0 resuming from `wait`."""
    import torch
    import torch.distributed as dist

    import distributed

    distributed.wait_for_all()
    value, times = torch.zeros(1), torch.zeros(2, dtype=torch.float64)
    if distributed.rank() == 1:
        time.sleep(late_s)
        times[1] = time.monotonic()
        dist.all_reduce(value)
    else:
        wait(dist.all_reduce(value, async_op=True))
        times[0] = time.monotonic()
    resumed, joined = distributed.sum_across(times).tolist()
    return resumed - joined


def steps_with(decide, compute) -> float:
    """Seconds per step of `compute` followed by `decide(step)`, for this rank."""
    import distributed

    distributed.wait_for_all()
    started = time.perf_counter()
    for step in range(STEPS):
        compute()
        decide(step)
    return (time.perf_counter() - started) / STEPS


def worker(repeats: int) -> None:
    import torch

    import distributed

    distributed.setup()
    a = torch.randn(256, 256)

    def compute() -> None:  # a few milliseconds of work, alike on both ranks: the figure is what deciding adds
        for _ in range(4):
            a.matmul(a)

    def any_rank_polled(step: int) -> None:
        flag = torch.zeros(1)
        polled(torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, async_op=True))

    def any_rank(step: int) -> None:
        distributed.any_rank(False)

    vote = distributed.StopVote()

    def stop_vote(step: int) -> None:
        vote.decided()
        vote.cast(False)

    waits = {"polled (before)": polled, "distributed.wait": distributed.wait, "work.wait() (blocking)": None}
    late = {(name, ms): [] for name in waits for ms in LATE_MS}
    deciders = {
        "alone": lambda step: None,
        "any_rank, polled (before)": any_rank_polled,
        "any_rank, distributed.wait": any_rank,
        "StopVote": stop_vote,
    }
    per_step = {name: [] for name in deciders}
    for _ in range(repeats):
        for ms in LATE_MS:
            for name, wait in waits.items():
                late[name, ms].append(late_join(wait or (lambda work: work.wait()), ms / 1e3))
        for name, decide in deciders.items():
            per_step[name].append(steps_with(decide, compute))
    vote.decided()
    if distributed.is_main():
        result = {
            "late": {f"{name}|{ms}": statistics.median(values) for (name, ms), values in late.items()},
            "per_step": {name: statistics.median(values) for name, values in per_step.items()},
        }
        print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=40)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args.repeats)

    from machine import describe

    print(f"machine: {describe()}; load average {os.getloadavg()[0]:.1f} at the start")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__,
               "--worker", "--repeats", str(args.repeats)]  # fmt: skip
    out = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                         check=True).stdout  # fmt: skip
    [line] = [line for line in out.splitlines() if line.startswith("RESULT ")]
    result = json.loads(line.removeprefix("RESULT "))
    print("rank 0 resumes this long after the last rank joins (median):")
    print(f"{'wait':26s}" + "".join(f"{f'late {ms} ms':>14s}" for ms in LATE_MS))
    for name in ("polled (before)", "distributed.wait", "work.wait() (blocking)"):
        print(f"{name:26s}" + "".join(f"{result['late'][f'{name}|{ms}'] * 1e3:11.2f} ms" for ms in LATE_MS))
    alone = result["per_step"]["alone"]
    print(f"a step of compute alone: {alone * 1e3:.2f} ms; deciding whether to stop adds per step:")
    for name in ("any_rank, polled (before)", "any_rank, distributed.wait", "StopVote"):
        print(f"{name:28s}{(result['per_step'][name] - alone) * 1e3:9.3f} ms")


if __name__ == "__main__":
    main()
