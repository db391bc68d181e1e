"""
Tokens/s and MFU of this project's default training step against the GPT-2 baseline, same shape, same process.

    python bench/bench_gpu_step.py [--cpu] [--nanogpt PATH_TO_NANOGPT_CHECKOUT]

Prints one line of figures on stdout (progress goes to stderr); bench/gpu.sh runs it after the CUDA tests.
- ours: the modern block with Muon, as main.py trains by default;
- baseline: the GPT-2 block (learned positions, LayerNorm, GELU, tied embeddings, F.cross_entropy) with fused
  AdamW, as nanoGPT trains it: this project's `--arch gpt2`, or nanoGPT's own model.py when --nanogpt is given.
Both run in bf16 autocast and torch.compile'd, at two shapes: the default one (6 layers, 6 heads, 384 wide,
block 256, batch 32, vocab 4096) and GPT-2 124M (12 layers, 12 heads, 768 wide, block 1024, batch 16, vocab 50304).
A step is forward with loss, backward, gradient clipping, optimizer step, zero_grad, on a fixed batch already on
the device. Compilation happens in warm-up steps, outside the timing; candidates are timed in alternating rounds
with the device synchronized, best round each. MFU is the model's training FLOPs per token (6N + attention, as
main.py reports it) times tokens/s over the card's dense bf16 peak.

--cpu runs the same at tiny shapes in fp32, eagerly: it checks the script, its figures mean nothing.
"""

import argparse
import contextlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_train_step import load_nanogpt  # noqa: E402

from model import GPT, GPTConfig  # noqa: E402


@dataclass
class Shape:
    name: str
    n_layer: int
    n_head: int
    n_embd: int
    block_size: int
    batch_size: int
    vocab_size: int

    def model_args(self) -> dict:
        return dict(
            n_layer=self.n_layer, n_head=self.n_head, n_embd=self.n_embd, block_size=self.block_size,
            vocab_size=self.vocab_size, dropout=0.0, bias=False,
        )  # fmt: skip

    def label(self) -> str:
        return f"{self.name} {self.n_layer}x{self.n_embd} T{self.block_size} B{self.batch_size}"


GPU_SHAPES = [Shape("default", 6, 6, 384, 256, 32, 4096), Shape("gpt2-124M", 12, 12, 768, 1024, 16, 50304)]
CPU_SHAPES = [Shape("default", 2, 2, 64, 64, 4, 256), Shape("gpt2-124M", 2, 4, 96, 128, 2, 512)]
# Dense bf16 peaks, most specific name first; None (MFU "n/a") for other devices.
PEAK_BF16 = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12))


def peak_flops(device: str) -> float | None:
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((flops for key, flops in PEAK_BF16 if key in name), None)


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def make_step(model, optimizer, shape: Shape, device: str):
    autocast = torch.autocast("cuda", torch.bfloat16) if device == "cuda" else contextlib.nullcontext()
    x, y = (torch.randint(0, shape.vocab_size, (shape.batch_size, shape.block_size), device=device) for _ in "xy")
    step_model = torch.compile(model) if device == "cuda" else model

    def step():
        with autocast:
            _, loss = step_model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def candidates(shape: Shape, device: str, nanogpt: Path | None) -> dict:
    """name -> (step function, training FLOPs per token)."""
    torch.manual_seed(0)
    ours = GPT(GPTConfig(**shape.model_args(), arch="modern")).to(device)
    gpt2_config = GPTConfig(**shape.model_args(), arch="gpt2")
    with torch.device("meta"):
        gpt2_flops = GPT(gpt2_config).flops_per_token()  # nanoGPT's model has the same weights at bias=False
    with contextlib.redirect_stdout(sys.stderr):  # nanoGPT prints its parameter counts
        if nanogpt is None:
            baseline = GPT(gpt2_config).to(device)
        else:
            nano = load_nanogpt(nanogpt)
            baseline = nano.GPT(nano.GPTConfig(**shape.model_args())).to(device)
        baseline_optimizer = baseline.configure_optimizers(0.1, 6e-4, (0.9, 0.95), device)
    ours_optimizer = ours.configure_optimizers(0.1, 6e-3, (0.9, 0.95), device, muon_lr=0.02)
    return {
        "ours": (make_step(ours, ours_optimizer, shape, device), ours.flops_per_token()),
        "baseline": (make_step(baseline, baseline_optimizer, shape, device), gpt2_flops),
    }


def measure(shape: Shape, device: str, nanogpt: Path | None, steps: int, rounds: int) -> dict:
    """name -> tokens per second, best round."""
    runs = candidates(shape, device, nanogpt)
    for name, (step, _) in runs.items():
        started = time.perf_counter()
        for _ in range(3):
            step()
        synchronize(device)
        seconds = time.perf_counter() - started
        print(f"{shape.label()}, {name}: warm-up and compilation {seconds:.1f} s", file=sys.stderr)
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(rounds):
        for name, (step, _) in runs.items():
            synchronize(device)
            started = time.perf_counter()
            for _ in range(steps):
                step()
            synchronize(device)
            best[name] = min(best[name], time.perf_counter() - started)
    tokens = steps * shape.batch_size * shape.block_size
    return {name: (tokens / best[name], flops) for name, (_, flops) in runs.items()}


def figures(tokens_per_s: float, flops_per_token: int, peak: float | None) -> str:
    mfu = f"{100 * tokens_per_s * flops_per_token / peak:.1f}%" if peak else "n/a"
    return f"{tokens_per_s:,.0f} tok/s MFU {mfu}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="tiny shapes on the CPU, eager fp32: a dry run of the script")
    p.add_argument("--nanogpt", type=Path, help="a checkout of nanoGPT: its model.py is the baseline")
    p.add_argument("--steps", type=int, default=None, help="steps per timed round (default: 20, 2 with --cpu)")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds (default: 3, 1 with --cpu)")
    args = p.parse_args()
    steps, rounds = args.steps or (2 if args.cpu else 20), args.rounds or (1 if args.cpu else 3)
    if args.nanogpt is not None and not (args.nanogpt / "model.py").is_file():
        p.error(f"--nanogpt {args.nanogpt}: no model.py there")
    device = "cpu" if args.cpu else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        p.error("no CUDA device; --cpu runs the dry run")
    peak = peak_flops(device)
    card = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    baseline, mode = "nanoGPT" if args.nanogpt else "gpt2+AdamW", "fp32 eager" if args.cpu else "bf16 compiled"
    parts = [f"gpu-step {device} ({card}), ours=modern+Muon, baseline={baseline}, {mode}"]
    for shape in CPU_SHAPES if args.cpu else GPU_SHAPES:
        result = measure(shape, device, args.nanogpt, steps, rounds)
        (ours, ours_flops), (base, base_flops) = result["ours"], result["baseline"]
        parts.append(
            f"{shape.label()}: ours {figures(ours, ours_flops, peak)}, baseline {figures(base, base_flops, peak)}, "
            f"{ours / base:.2f}x"
        )
        if device == "cuda":
            torch._dynamo.reset()  # the next shape compiles afresh, and this one's graphs free their memory
            torch.cuda.empty_cache()
    print(" | ".join(parts), flush=True)


if __name__ == "__main__":
    main()
