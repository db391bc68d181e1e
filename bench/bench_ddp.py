"""
Training throughput on the CPU with 1 and 2 processes (torchrun, gloo), and what the gradient all-reduce costs.

    python bench/bench_ddp.py [--rounds 3] [--steps 4]

Each candidate is a torchrun launch of this script in worker mode, which times main.py's own training step
(`loop.train_step` on `distributed.wrap`'s DistributedDataParallel model, Muon as by default) on random tokens at a
fixed shape; `--batch_size` is per process, as in main.py, so 2 processes step over twice the tokens. A round is
`--steps` steps; its time is the slowest rank's; each candidate reports its best round. Candidates are launched in
alternating order, twice, and keep their best launch, so load from elsewhere on the machine hits all of them alike.

The 2-process launch also times, in the same process: the step without the gradient all-reduce (under `no_sync`),
an all-reduce of a flat tensor as large as all the gradients, and the one-number stop-flag all-reduce main.py does
at every step. The baseline is one process using both cores (2 threads), which is what `python main.py` runs.
"""

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

SHAPE = ["--n_layer", "4", "--n_head", "4", "--n_embd", "128", "--block_size", "256", "--batch_size", "16"]
VOCAB = 4096
CANDIDATES = {  # name: (processes, threads per process)
    "1 process, 2 threads": (1, 2),
    "1 process, 1 thread": (1, 1),
    "2 processes (gloo), 1 thread each": (2, 1),
}


def timed(run, repeats: int) -> float:
    """Seconds per call of `run`, for the slowest rank."""
    import torch

    import distributed

    distributed.wait_for_all()
    started = time.perf_counter()
    for _ in range(repeats):
        run()
    elapsed = torch.tensor([time.perf_counter() - started])
    if distributed.active():
        torch.distributed.all_reduce(elapsed, op=torch.distributed.ReduceOp.MAX)
    return elapsed.item() / repeats


def worker(rounds: int, steps: int) -> None:
    import numpy as np
    import torch

    import data
    import distributed
    import flags
    import loop
    import main
    from model import GPT, GPTConfig

    distributed.setup()
    args = flags.configuration(["--device", "cpu", "--vocab_size", str(VOCAB), *SHAPE])
    torch.manual_seed(0)
    config = GPTConfig(VOCAB, block_size=args.block_size, n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd)
    model = GPT(config)
    optimizer = main.build_optimizer(model, args, "cpu")
    step_model = distributed.wrap(model, "cpu")
    tokens = np.random.default_rng(0).integers(0, VOCAB, 1 << 21, dtype=np.uint16)
    batches = data.Batches(tokens, args.batch_size, args.block_size, args.seed, "cpu")
    scaler = torch.amp.GradScaler(enabled=False)

    def step() -> None:
        loop.train_step(step_model, optimizer, scaler, batches, args, contextlib.nullcontext())

    for _ in range(2):  # warm-up: allocator, DDP buckets
        step()
    result = {"step_s": min(timed(step, steps) for _ in range(rounds))}
    if distributed.active():
        gradients = torch.zeros(sum(p.numel() for p in model.parameters()))

        def step_without_sync() -> None:
            with step_model.no_sync():
                step()

        result["no_sync_step_s"] = min(timed(step_without_sync, steps) for _ in range(rounds))
        result["all_reduce_s"] = min(timed(lambda: torch.distributed.all_reduce(gradients), 10) for _ in range(rounds))
        result["stop_flag_s"] = min(timed(lambda: distributed.any_rank(False), 200) for _ in range(rounds))
        result["parameters"] = gradients.numel()
    if distributed.is_main():
        print("RESULT " + json.dumps(result), flush=True)


def launch(processes: int, threads: int, rounds: int, steps: int) -> dict:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
        __file__, "--worker", "--rounds", str(rounds), "--steps", str(steps),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    out = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
    [line] = [line for line in out.splitlines() if line.startswith("RESULT ")]
    return json.loads(line.removeprefix("RESULT "))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=4, help="steps per timed round")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args.rounds, args.steps)

    from machine import describe

    print(f"machine: {describe()}; load average {os.getloadavg()[0]:.1f} at the start")
    print(f"shape: {' '.join(SHAPE)} --vocab_size {VOCAB} (--batch_size per process), Muon, float32")
    best: dict[str, dict] = {}
    for order in (list(CANDIDATES), list(reversed(CANDIDATES))):
        for name in order:
            result = launch(*CANDIDATES[name], args.rounds, args.steps)
            if name not in best or result["step_s"] < best[name]["step_s"]:
                best[name] = result
    baseline = None
    print(f"{'candidate':36s} {'ms/step':>8s} {'tokens/s':>9s} {'vs 1 process, 2 threads':>24s}")
    for name, result in best.items():
        processes = CANDIDATES[name][0]
        tokens_per_s = processes * 16 * 256 / result["step_s"]
        baseline = baseline or tokens_per_s
        print(f"{name:36s} {result['step_s'] * 1e3:8.1f} {tokens_per_s:9,.0f} {tokens_per_s / baseline:23.2f}x")
    two = best["2 processes (gloo), 1 thread each"]
    step_ms, no_sync_ms = two["step_s"] * 1e3, two["no_sync_step_s"] * 1e3
    print(
        f"2 processes: step {step_ms:.1f} ms, without the gradient all-reduce {no_sync_ms:.1f} ms "
        f"(the all-reduce adds {step_ms - no_sync_ms:.1f} ms, {(step_ms - no_sync_ms) / step_ms:.0%} of the step)"
    )
    print(
        f"all-reduce of {two['parameters'] / 1e6:.2f}M fp32 gradients alone: {two['all_reduce_s'] * 1e3:.1f} ms "
        f"({two['all_reduce_s'] * 1e3 / step_ms:.0%} of the step); stop flag: {two['stop_flag_s'] * 1e6:.0f} us a step"
    )


if __name__ == "__main__":
    main()
