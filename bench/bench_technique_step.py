"""
What each optional model technique costs per training step on this CPU, against the plain model, same process.

    python bench/bench_technique_step.py [--rounds 20] [--steps 3] [--threads N]

The shape and rates are the CPU recipe's (bench/cpu-2min.args: 2 layers, 128 wide, block 128, batch 16, vocab 4096,
Muon). A step is what main.py's loop does per batch: forward with loss, backward, gradient clipping, the optimizer
step, zero_grad. The plain model has --arch modern's default techniques off; each candidate switches one on, one
is the defaults together (the recipe as it trains now); "plain (again)" is a second plain model, whose ratio
shows the timing noise. Rounds alternate the candidates, a few steps each, so load from elsewhere on the machine
hits all of them alike; each reports its best and its median round, each as a ratio to the plain model's. On a
loaded machine the best rounds are the figure to read.
The last line times tanh against sigmoid over logits of the recipe's shape: the two forms of the soft cap.
Only time is measured here: whether a technique lowers the loss is a seeded comparison of runs.
"""

import argparse
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # the allocator setting main.py trains with

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from machine import describe  # noqa: E402
from steps import fixed_batch_step  # noqa: E402

from model import ARCH_DEFAULTS, GPT, GPTConfig  # noqa: E402

PLAIN = {name: False for name in ARCH_DEFAULTS["modern"]}  # --arch modern's default techniques off
DEFAULTS = "the defaults: embed_norm, x0_mix, zero_init_proj, the recipe's --embedding_lr"
TECHNIQUES = {
    "plain": PLAIN,
    "plain (again)": PLAIN,
    "--zero_init_proj": {**PLAIN, "zero_init_proj": True},
    "--zero_init_head": {**PLAIN, "zero_init_head": True},
    "--embed_norm": {**PLAIN, "embed_norm": True},
    "--x0_mix": {**PLAIN, "x0_mix": True},
    "--value_embeds 1": {**PLAIN, "value_embeds": 1},
    "--unet_skips": {**PLAIN, "unet_skips": True},
    "--logit_softcap 15": {**PLAIN, "logit_softcap": 15.0},
    "--embedding_lr/--head_lr/--scalar_lr": PLAIN,  # optimizer options, below
    DEFAULTS: {},  # GPTConfig's own defaults for --arch modern
    "all of them": dict(
        zero_init_proj=True, zero_init_head=True, embed_norm=True, x0_mix=True, value_embeds=1, unet_skips=True,
        logit_softcap=15.0,
    ),
}  # fmt: skip
SEPARATE_RATES = dict(embedding_lr=0.3, head_lr=0.004, scalar_lr=0.02)


def recipe() -> dict[str, str]:
    """The recipe's flags, name to value (every one of them takes a value)."""
    words = shlex.split((ROOT / "bench" / "cpu-2min.args").read_text())
    return {name.removeprefix("--"): value for name, value in zip(words[::2], words[1::2], strict=True)}


def make_step(name: str, flags: dict[str, str]):
    shape = {key: int(flags[key]) for key in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size")}
    torch.manual_seed(0)
    model = GPT(GPTConfig(**shape, **TECHNIQUES[name]))
    rates = SEPARATE_RATES if name.startswith("--embedding_lr") or name == "all of them" else {}
    if name == DEFAULTS:
        rates = dict(embedding_lr=float(flags["embedding_lr"]))
    optimizer = model.configure_optimizers(
        0.1, float(flags["learning_rate"]), (0.9, 0.95), "cpu", muon_lr=float(flags["muon_lr"]), **rates
    )
    batch = (int(flags["batch_size"]), shape["block_size"])
    x, y = (torch.randint(0, shape["vocab_size"], batch) for _ in range(2))

    step = fixed_batch_step(model, optimizer, x, y)
    step()  # the optimizer's state
    return step


def squash_times(flags: dict[str, str], rounds: int) -> dict[str, float]:
    """Best times of tanh and of sigmoid, in place, over logits of the recipe's (tokens x vocab) shape: the soft
    cap's two forms (model.SoftmaxCrossEntropy takes the sigmoid one)."""
    logits = torch.randn(int(flags["batch_size"]) * int(flags["block_size"]), int(flags["vocab_size"])) * 3
    best = {"tanh_": float("inf"), "sigmoid_": float("inf")}
    for _ in range(rounds):
        for name in best:
            x = logits.clone()
            started = time.perf_counter()
            getattr(x, name)()
            best[name] = min(best[name], time.perf_counter() - started)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--steps", type=int, default=3, help="steps per candidate per round")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    flags = recipe()
    print(f"machine: {describe()}")
    print(f"recipe: {' '.join(f'--{k} {v}' for k, v in flags.items())}")
    steps = {name: make_step(name, flags) for name in TECHNIQUES}
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            started = time.perf_counter()
            for _ in range(args.steps):
                step()
            times[name].append((time.perf_counter() - started) / args.steps)
    best_plain, median_plain = min(times["plain"]), statistics.median(times["plain"])
    print(f"{'technique':38s} {'best ms':>8s} {'x plain':>8s} {'median ms':>10s} {'x plain':>8s}")
    for name, seconds in times.items():
        best, median = min(seconds), statistics.median(seconds)
        ratios = f"{best / best_plain:8.3f} {median * 1e3:10.1f} {median / median_plain:8.3f}"
        print(f"{name:38s} {best * 1e3:8.1f} {ratios}")
    squash = squash_times(flags, args.rounds)
    print(
        f"the cap's squash over the logits: tanh_ {squash['tanh_'] * 1e3:.1f} ms, sigmoid_ "
        f"{squash['sigmoid_'] * 1e3:.1f} ms ({squash['tanh_'] / squash['sigmoid_']:.1f}x)"
    )


if __name__ == "__main__":
    main()
