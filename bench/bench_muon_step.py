"""
The Muon optimizer step against an earlier model.py's (default: the per-matrix loop it replaced), same process.

    python bench/bench_muon_step.py [--before REV] [--rounds 20] [--threads N]

The earlier model.py is read with `git show REV:model.py` and loaded as a module beside the current one.
Both build the same model from the same seed. Three figures each:
- aten ops dispatched by one Muon `optimizer.step()` at the default shape (6 layers, 384 wide, vocab 4096),
  counted with a TorchDispatchMode, once the optimizer's state exists;
- the time of that optimizer step alone on this machine's CPU;
- the time of a whole default training step (modern block, Muon: forward with loss, backward, clipping, step,
  zero_grad) at the CPU recipe's shape (bench/cpu-2min.args: 2 layers, 128 wide, block 128, batch 16).
Times are the best of rounds that alternate single steps, so load from elsewhere on the machine hits both alike.
"""

import argparse
import os
import subprocess
import sys
import time
import types
from pathlib import Path

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # the allocator setting main.py trains with

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from machine import describe  # noqa: E402
from steps import fixed_batch_step  # noqa: E402

import model as current  # noqa: E402

DEFAULT_SHAPE = dict(n_layer=6, n_head=6, n_embd=384, block_size=256, vocab_size=4096)
CPU_SHAPE = dict(n_layer=2, n_head=4, n_embd=128, block_size=128, vocab_size=4096)
CPU_BATCH = 16


def load_model_module(rev: str) -> types.ModuleType:
    source = subprocess.run(
        ["git", "show", f"{rev}:model.py"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    module = types.ModuleType(f"model_{rev}")
    exec(compile(source, f"{rev}:model.py", "exec"), module.__dict__)
    return module


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def optimizer_step(module: types.ModuleType):
    """A Muon step at the default shape on fixed random gradients, with its state already made."""
    torch.manual_seed(0)
    model = module.GPT(module.GPTConfig(**DEFAULT_SHAPE))
    optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu", muon_lr=0.02)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()
    return optimizer.step


def training_step(module: types.ModuleType):
    torch.manual_seed(0)
    model = module.GPT(module.GPTConfig(**CPU_SHAPE))
    optimizer = model.configure_optimizers(0.1, 6e-3, (0.9, 0.95), "cpu", muon_lr=0.04)
    x, y = (torch.randint(0, CPU_SHAPE["vocab_size"], (CPU_BATCH, CPU_SHAPE["block_size"])) for _ in range(2))

    step = fixed_batch_step(model, optimizer, x, y)
    step()
    return step


def best_times(steps: dict, rounds: int) -> dict:
    """The best time of each step over rounds that run every step once, in turn."""
    best = {name: float("inf") for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            started = time.perf_counter()
            step()
            best[name] = min(best[name], time.perf_counter() - started)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", default="25dcbdf", help="the git revision whose model.py is the baseline")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    modules = {f"before ({args.before})": load_model_module(args.before), "now": current}
    print(f"machine: {describe()}")
    ops = {}
    for name, module in modules.items():
        step = optimizer_step(module)
        with CountOps() as counter:
            step()
        ops[name] = counter.count
    optimizer_times = best_times({name: optimizer_step(m) for name, m in modules.items()}, args.rounds)
    training_times = best_times({name: training_step(m) for name, m in modules.items()}, args.rounds)
    before, now = modules
    print(f"{'':22s} {'ops/step':>9s} {'optimizer ms':>13s} {'train step ms':>14s}")
    for name in modules:
        print(f"{name:22s} {ops[name]:9d} {optimizer_times[name] * 1e3:13.1f} {training_times[name] * 1e3:14.1f}")
    ratios = ops[before] / ops[now], *(times[before] / times[now] for times in (optimizer_times, training_times))
    print(f"{'ratio before/now':22s} {ratios[0]:8.1f}x {ratios[1]:12.2f}x {ratios[2]:13.2f}x")


if __name__ == "__main__":
    main()
