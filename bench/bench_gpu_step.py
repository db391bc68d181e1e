"""
One training step, ours against the GPT-2 baseline, same shape, same process: tokens/s, MFU, compile time, peak
memory against the model's own estimate, and the graphs torch.compile made.

    python bench/bench_gpu_step.py [--cpu] [--shape default|gpt2-124M] [--json PATH] [--steps N] [--rounds N]

bench/gpu.sh runs it once per shape, each in its own process and time limit. It prints one line of figures on
stdout (progress on stderr); --json writes them all.
- ours: the modern block with Muon, main.py's defaults; baseline: this program's `--arch gpt2` with fused AdamW,
  the GPT-2 block as nanoGPT trains it. Both bf16 autocast, the model torch.compile'd as main.py compiles it, Muon's
  update compiled as `configure_optimizers` does on CUDA.
- Shapes: the default one (6 layers, 6 heads, 384 wide, block 256, batch 32, vocab 4096) and GPT-2 124M
  (12 layers, 12 heads, 768 wide, block 1024, batch 16, vocab 50304).
- A step: forward with loss, backward, gradient clipping, optimizer step, zero_grad, on a fixed batch already on
  the device (the batch's way to the GPU is profiled in main.py's own loop by bench/gpu_train.py).
- Compile time: the first step, synchronised, is mostly compilation; two more warm-up steps follow.
- Timing: candidates alternate in rounds, the device synchronised around each, best round each. MFU is the model's
  training FLOPs per token (`flops_per_token`, as main.py reports it) times tokens/s over `devices.peak_flops`.
- Peak memory: torch.cuda.max_memory_allocated over the warm-up steps, less what was allocated before the
  candidate was built, against `training_memory(batch_size)`.
- Graphs: torch._dynamo's counters (graphs made, graph breaks) before and after each candidate's warm-up.
- Host syncs per step: what torch.cuda's sync debug mode reports over two warm-up steps (a per-step `.item()`
  in the model or the optimizer would show here).

--cpu runs the same at tiny shapes in fp32, compiled with dynamo's "eager" backend (graphs are captured and counted,
no code is generated): it checks the script in seconds, its figures mean nothing.
"""

import argparse
import json
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch._dynamo.utils import counters

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import devices  # noqa: E402
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

    def tokens_per_step(self) -> int:
        return self.batch_size * self.block_size


GPU_SHAPES = {
    "default": Shape("default", 6, 6, 384, 256, 32, 4096),
    "gpt2-124M": Shape("gpt2-124M", 12, 12, 768, 1024, 16, 50304),
}
CPU_SHAPES = {  # the dry run's; bench/gpu_check.py trains at the first one (DRY_RUN_SHAPE there)
    "default": Shape("default", 2, 2, 32, 32, 8, 512),
    "gpt2-124M": Shape("gpt2-124M", 2, 4, 64, 64, 4, 1024),
}
# main.py's default optimizer settings for ours; nanoGPT's learning rate for the baseline (speed does not depend on
# them, but the optimizer's state and work do on which optimizer it is).
OURS = dict(weight_decay=0.1, learning_rate=1e-3, betas=(0.9, 0.95), muon_lr=0.02)
BASELINE = dict(weight_decay=0.1, learning_rate=6e-4, betas=(0.9, 0.95))


def memory_estimate(model: GPT, batch_size: int, dtype: str) -> int:
    """main.py's estimate of a training step's memory, for a model whose weights are already on the device (as
    torch.cuda.max_memory_allocated counts them too, they are added back)."""
    beyond_weights = model.training_memory(batch_size, getattr(torch, dtype), weights_on_device=True)
    return int(beyond_weights + sum(p.numel() * p.element_size() for p in model.parameters()))


def graph_counts() -> tuple[int, int]:
    """Graphs torch._dynamo made so far in this process, and graph breaks it met."""
    return counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())


class Candidate:
    """One model with its optimizer and compiled step, and what its warm-up measured."""

    def __init__(self, name: str, arch: str, shape: Shape, device: str):
        self.name, self.shape, self.device = name, shape, device
        self.dtype = "bfloat16" if device == "cuda" else "float32"
        allocated_before = torch.cuda.memory_allocated() if device == "cuda" else 0
        torch.manual_seed(0)
        self.model = GPT(GPTConfig(**shape.model_args(), arch=arch)).to(device)
        settings = OURS if arch == "modern" else BASELINE
        self.optimizer = self.model.configure_optimizers(
            settings["weight_decay"], settings["learning_rate"], settings["betas"], device,
            muon_lr=settings.get("muon_lr"), compile_muon=device == "cuda",
        )  # fmt: skip
        backend = "inductor" if device == "cuda" else "eager"
        self.step_model = torch.compile(self.model, backend=backend)
        self.autocast = devices.autocast(device, self.dtype)
        shape_bt = (shape.batch_size, shape.block_size)
        self.x, self.y = (torch.randint(0, shape.vocab_size, shape_bt, device=device) for _ in "xy")
        self.figures = {"flops_per_token": self.model.flops_per_token(), "params": self.model.num_params()}
        self.allocated_before = allocated_before

    def step(self) -> None:
        with self.autocast:
            _, loss = self.step_model(self.x, self.y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def warm_up(self) -> None:
        """Compile (the first step) and two more steps; record compile time, peak memory and graph counts."""
        graphs, breaks = graph_counts()
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        self.step()
        devices.synchronize(self.device)
        self.figures["compile_s"] = time.perf_counter() - started
        self.step()
        self.figures["syncs_per_step"] = self.host_syncs(steps=2)
        devices.synchronize(self.device)
        new_graphs, new_breaks = graph_counts()
        self.figures.update(graphs=new_graphs - graphs, graph_breaks=new_breaks - breaks)
        self.figures["memory_estimate"] = memory_estimate(self.model, self.shape.batch_size, self.dtype)
        self.figures["peak_memory"] = None
        if self.device == "cuda":
            self.figures["peak_memory"] = torch.cuda.max_memory_allocated() - self.allocated_before
        f = self.figures
        print(
            f"{self.shape.label()}, {self.name}: compiled and warmed up in {f['compile_s']:.1f} s, "
            f"{f['graphs']} graphs, {f['graph_breaks']} graph breaks",
            file=sys.stderr,
        )

    def host_syncs(self, steps: int) -> float | None:
        """Operations per step that make the host wait for the GPU (`.item()`, a device-to-host copy...), as
        torch.cuda's sync debug mode reports them; None on the CPU."""
        if self.device != "cuda":
            for _ in range(steps):
                self.step()
            return None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                for _ in range(steps):
                    self.step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message) for w in caught) / steps


def time_rounds(candidates: list[Candidate], device: str, steps: int, rounds: int) -> None:
    """Best-round tokens/s of each candidate, rounds alternating between them."""
    best = dict.fromkeys((c.name for c in candidates), float("inf"))
    for _ in range(rounds):
        for c in candidates:
            devices.synchronize(device)
            started = time.perf_counter()
            for _ in range(steps):
                c.step()
            devices.synchronize(device)
            best[c.name] = min(best[c.name], time.perf_counter() - started)
    peak = devices.peak_flops(torch.cuda.get_device_name()) if device == "cuda" else None
    for c in candidates:
        c.figures["step_ms"] = 1000 * best[c.name] / steps
        c.figures["tokens_per_s"] = steps * c.shape.tokens_per_step() / best[c.name]
        c.figures["mfu"] = c.figures["tokens_per_s"] * c.figures["flops_per_token"] / peak if peak else None


def measure(shape: Shape, device: str, steps: int, rounds: int) -> dict:
    """Both candidates at one shape: their figures and the ratio of their tokens/s."""
    candidates = []
    for name, arch in (("ours", "modern"), ("baseline", "gpt2")):
        candidates.append(Candidate(name, arch, shape, device))
        candidates[-1].warm_up()
    time_rounds(candidates, device, steps, rounds)
    ours, baseline = (c.figures for c in candidates)
    result = {"shape": asdict(shape), "label": shape.label(), "ours": ours, "baseline": baseline}
    result["ratio"] = ours["tokens_per_s"] / baseline["tokens_per_s"]
    del candidates
    if device == "cuda":
        torch._dynamo.reset()  # a next shape compiles afresh, and this one's graphs free their memory
        torch.cuda.empty_cache()
    return result


def describe(result: dict) -> str:
    def figures(c: dict) -> str:
        mfu = f"{100 * c['mfu']:.1f}%" if c["mfu"] is not None else "n/a"
        return f"{c['tokens_per_s']:,.0f} tok/s MFU {mfu} compile {c['compile_s']:.0f} s"

    ours, baseline = result["ours"], result["baseline"]
    return f"{result['label']}: ours {figures(ours)}, baseline {figures(baseline)}, {result['ratio']:.2f}x"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="tiny shapes on the CPU, fp32, dynamo only: a dry run")
    p.add_argument("--shape", choices=list(GPU_SHAPES), action="append", help="the shape to time (default: both)")
    p.add_argument("--steps", type=int, default=None, help="steps per timed round (default: 20, 2 with --cpu)")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds (default: 3, 1 with --cpu)")
    p.add_argument("--json", type=Path, help="write every figure to this file")
    args = p.parse_args()
    steps, rounds = args.steps or (2 if args.cpu else 20), args.rounds or (1 if args.cpu else 3)
    device = "cpu" if args.cpu else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        p.error("no CUDA device; --cpu runs the dry run")
    shapes = CPU_SHAPES if args.cpu else GPU_SHAPES
    card = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    results = [measure(shapes[name], device, steps, rounds) for name in args.shape or list(shapes)]
    if args.json:
        args.json.write_text(json.dumps({"device": device, "card": card, "shapes": results}, indent=1))
    mode = "fp32, dynamo eager" if args.cpu else "bf16, compiled"
    print(" | ".join([f"gpu-step {device} ({card}), {mode}", *map(describe, results)]), flush=True)


if __name__ == "__main__":
    main()
