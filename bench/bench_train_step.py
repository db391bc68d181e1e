"""
Training-step time of this project's GPT against nanoGPT's model: same shape, same AdamW settings, same process.

    python bench/bench_train_step.py --nanogpt PATH_TO_NANOGPT_CHECKOUT [--compile]

PATH_TO_NANOGPT_CHECKOUT is a clone of github.com/karpathy/nanoGPT (only its model.py is imported). A step is what
a training loop does per batch: forward with loss, backward, gradient clipping, AdamW step, zero_grad. Candidates
are timed in alternating rounds, so load from elsewhere on the machine hits all of them alike; each reports its best
round. Ratios are against nanoGPT's model run eagerly, as its README runs it on a CPU.

The last line, "floor", times only the matrix multiplies and attention kernels of one step at this shape (every
linear layer's forward and two backward products, the head's too, and SDPA forward and backward): no model built
on these fp32 kernels steps faster on this machine, so nanoGPT's time over the floor bounds any speed-up.
"""

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path

# The allocator setting main.py trains with (transparent huge pages), for every candidate alike.
if "--default_allocator" not in sys.argv:
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from machine import describe  # noqa: E402
from steps import fixed_batch_step  # noqa: E402

from model import GPT, GPTConfig  # noqa: E402


def load_nanogpt(path: Path):
    spec = importlib.util.spec_from_file_location("nanogpt_model", path / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_step(model, args):
    optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    x = torch.randint(0, args.vocab_size, (args.batch_size, args.block_size))
    y = torch.randint(0, args.vocab_size, (args.batch_size, args.block_size))

    return fixed_batch_step(model, optimizer, x, y)


def floor_step(args):
    """The GEMMs and attention kernels of one training step of the GPT-2 block, and nothing else."""
    n, c = args.batch_size * args.block_size, args.n_embd
    shapes = [(c, 3 * c), (c, c), (c, 4 * c), (4 * c, c)] * args.n_layer + [(c, args.vocab_size)]
    acts = {fan_in: torch.randn(n, fan_in) for fan_in in {c, 4 * c}}
    weights = [(torch.randn(fan_in, fan_out), torch.randn(n, fan_out)) for fan_in, fan_out in shapes]
    head = (args.batch_size, args.n_head, args.block_size, c // args.n_head)
    q, k, v = (torch.randn(head, requires_grad=True) for _ in range(3))

    def step():
        for w, grad_out in weights:
            x = acts[w.size(0)]
            x @ w  # forward
            grad_out @ w.T  # gradient of the input
            grad_out.T @ x  # gradient of the weight
        for _ in range(args.n_layer):
            y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            y.sum().backward()

    return step


def candidates(args) -> dict:
    shape = dict(
        n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd, block_size=args.block_size,
        vocab_size=args.vocab_size, dropout=0.0,
    )  # fmt: skip
    nano = load_nanogpt(args.nanogpt)
    torch.manual_seed(0)
    models = {
        "nanoGPT (eager)": nano.GPT(nano.GPTConfig(**shape, bias=True)),
        "ours, --arch gpt2 (eager)": GPT(GPTConfig(**shape, arch="gpt2")),
        "ours, --arch modern (eager)": GPT(GPTConfig(**shape, arch="modern")),
    }
    if args.compile:
        models["nanoGPT (compiled)"] = nano.GPT(nano.GPTConfig(**shape, bias=True))
        models["ours, --arch modern (compiled)"] = GPT(GPTConfig(**shape, arch="modern"))
    steps = {}
    for name, model in models.items():
        step = make_step(model, args)
        if "compiled" in name:
            model.forward = torch.compile(model.forward)
        started = time.perf_counter()
        for _ in range(3):  # warm-up, and compilation for the compiled ones
            step()
        print(f"  {name}: warm-up {time.perf_counter() - started:.1f} s", flush=True)
        steps[name] = step
    steps["floor: matmuls + attention only"] = floor_step(args)
    return steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nanogpt", type=Path, required=True, help="a checkout of nanoGPT (its model.py is imported)")
    p.add_argument("--n_layer", type=int, default=4)
    p.add_argument("--n_head", type=int, default=4)
    p.add_argument("--n_embd", type=int, default=128)
    p.add_argument("--block_size", type=int, default=256)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--vocab_size", type=int, default=4096)
    p.add_argument("--steps", type=int, default=10, help="steps per timed round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--compile", action="store_true", help="also time torch.compile'd models")
    p.add_argument("--default_allocator", action="store_true", help="4 KB pages, as PyTorch allocates by default")
    args = p.parse_args()

    print(f"machine: {describe()}")
    print(f"allocator: {'default' if args.default_allocator else 'transparent huge pages, as main.py runs'}")
    print(
        f"shape: {args.n_layer} layers, {args.n_head} heads, {args.n_embd} wide, block {args.block_size}, "
        f"batch {args.batch_size}, vocab {args.vocab_size}"
    )
    steps = candidates(args)
    best = {name: float("inf") for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            started = time.perf_counter()
            for _ in range(args.steps):
                step()
            best[name] = min(best[name], (time.perf_counter() - started) / args.steps)
    baseline = best["nanoGPT (eager)"]
    print(f"{'model':34s} {'ms/step':>8s} {'speed-up':>9s}")
    for name, seconds in best.items():
        print(f"{name:34s} {seconds * 1e3:8.1f} {baseline / seconds:8.2f}x")


if __name__ == "__main__":
    main()
