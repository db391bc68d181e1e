"""
Train a GPT from scratch on TinyStories or a local .txt file, one hypothesis per run, tracked in ClearML.

    python main.py --data tinystories --dropout 0.3 --comment "Hypothesis: more dropout lowers val loss"

Design choices:
- Flags are nanoGPT's, snake_case; every one has a help text and a checked range, so a bad value is an argparse
  error (exit 2), never a traceback. Every mistake found after parsing goes through the same `parser.error`.
- Flags are never abbreviated: `--lr` is an error, not `--lr_decay_steps`.
- The learning rate warms up linearly (by default over at most a tenth of the run), then decays on a cosine from
  the end of warmup to `--min_lr`. `--max_seconds` is turned into a step count before training, by timing a few
  steps that are then undone; the count is recorded as `max_steps`, so the run reproduces step for step.
- The training step never waits for the device: losses stay on it and are read once per `--log_interval`, where
  throughput is measured with the clock synchronized, the first (compiling) step excluded.
- Evaluation uses the same batches at every eval step (fixed seeds), so curves compare within and across runs.
  Bits per byte count text only: special tokens are left out of both tokens and bytes.
- Sampling runs under a forked RNG, so evaluating never changes the training trajectory: N steps, resume, M steps
  equals N + M steps.
- checkpoint.py owns the run folder (one run each, locked) and writes only finite checkpoints, atomically.
- Signals: while preparing, evaluating or sampling, Ctrl+C or SIGTERM stops at once; during a training step, the
  step ends first. Then the checkpoint is saved, the task is closed as aborted, exit 130. A second Ctrl+C skips the
  checkpoint but still closes the task. A diverging loss stops the run, keeps the last good checkpoint, exit 1.
- A failure from outside (out of memory, disk full, I/O error) or a bug ends with one line saying what happened and
  what was kept, the task closed as failed, the traceback in the run folder's error.log, and its own exit code.
- Under torchrun (distributed.py) the same program trains one model in DistributedDataParallel: --batch_size is per
  process, and process r takes the r-th part of the batch one process would draw with world_size times --batch_size,
  for training and evaluation alike: N processes train and evaluate exactly as one process with an N times larger
  batch. Rank 0 alone creates the task, prints and writes; all ranks agree at every step whether to stop.
"""

import os
import signal
import sys

EXIT_ABORTED = 130

if __name__ == "__main__":  # a signal while the imports below load: nothing to save yet, and no traceback

    def quit_while_starting(signum, frame):
        print(f"{signal.Signals(signum).name}: stopped while starting; nothing was written", file=sys.stderr)
        os._exit(EXIT_ABORTED)

    signal.signal(signal.SIGINT, quit_while_starting)
    signal.signal(signal.SIGTERM, quit_while_starting)

import argparse
import contextlib
import copy
import errno
import inspect
import math
import tempfile
import time
import traceback
from dataclasses import asdict
from datetime import datetime
from pathlib import Path

# Before torch allocates anything: large CPU tensors on transparent huge pages, so the fresh (tokens x vocab)
# buffers of every step do not fault in 4 KB at a time (Linux only; bench/bench_train_step.py --default_allocator).
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import numpy as np
import torch
from tqdm import tqdm

import checkpoint as ckpt
import compare
import data
import devices
import distributed
import provenance
import reproduce
import tracking
from errors import UsageError
from model import ARCHS, GPT, GPTConfig, enable_tf32
from tokenizer import Tokenizer

# Exit codes (README: "Exit codes"); 2 is argparse's own for a user's mistake.
EXIT_DIVERGED = 1
EXIT_USAGE = 2
EXIT_OUT_OF_MEMORY = 3
EXIT_IO = 4
EXIT_BUG = 5
EXIT_PEER_LOST = 6  # under torchrun: another process of the run stopped
DIVERGENCE_FACTOR = 2.0  # a training loss above this multiple of the best one (after warmup) means divergence
FROZEN_FLAGS = ("n_layer", "n_head", "n_embd", "block_size", "bias", "arch", "vocab_size", "optimizer")
WARMUP_STEPS, WARMUP_SHARE = 100, 0.1  # default warmup: 100 steps, but never more than this share of the run
BUDGET_PROBE_STEPS = 5  # steps timed (after one untimed) to turn --max_seconds into a step count


def in_range(
    kind: type, low: float | None = None, high: float | None = None, low_open: bool = False, high_open: bool = False
):
    """An argparse type that converts to `kind` and checks low <= value <= high (or strict, when open)."""

    def check(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a valid {kind.__name__}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        too_low = low is not None and (value <= low if low_open else value < low)
        too_high = high is not None and (value >= high if high_open else value > high)
        if too_low or too_high:
            lo = "" if low is None else f"{low} {'<' if low_open else '<='} "
            hi = "" if high is None else f" {'<' if high_open else '<='} {high}"
            raise argparse.ArgumentTypeError(f"{text} is out of range: must be {lo}value{hi}")
        return value

    return check


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Train a GPT from scratch, tracked in ClearML.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        allow_abbrev=False,
    )
    g = p.add_argument_group("data")
    g.add_argument("--data", default="tinystories", help="'tinystories' (streamed over HTTP) or a path to a .txt file")
    g.add_argument(
        "--tinystories_url",
        default=os.environ.get("TINYSTORIES_URL", data.DEFAULT_TINYSTORIES_URL),
        help="base URL of the TinyStories files (environment TINYSTORIES_URL)",
    )
    g.add_argument(
        "--tinystories_version",
        default="v1",
        choices=("v1", "v2"),
        help="v1: TinyStories-{train,valid}.txt; v2: the TinyStoriesV2-GPT4 pair",
    )
    g.add_argument(
        "--val_fraction",
        type=in_range(float, 0, 0.5, low_open=True),
        default=0.1,
        help="tail of a local .txt file held out for validation",
    )
    g.add_argument(
        "--cache_dir",
        default=os.environ.get("GPT_FROM_SCRATCH_CACHE", "~/.cache/gpt-from-scratch"),
        help="where tokenized data and tokenizers are cached (environment GPT_FROM_SCRATCH_CACHE)",
    )
    g.add_argument(
        "--vocab_size",
        type=in_range(int, 256 + len(Tokenizer.SPECIAL_TOKENS), 65536),
        default=4096,
        help="BPE vocabulary size, trained from scratch on the training text",
    )

    g = p.add_argument_group("model")
    g.add_argument(
        "--arch",
        choices=ARCHS,
        default="modern",
        help="modern: rotary, RMSNorm, QK-norm, ReLU², untied; gpt2: the plain GPT-2 block",
    )
    g.add_argument("--n_layer", type=in_range(int, 1), default=6, help="transformer blocks")
    g.add_argument("--n_head", type=in_range(int, 1), default=6, help="attention heads; must divide n_embd")
    g.add_argument("--n_embd", type=in_range(int, 1), default=384, help="embedding width")
    g.add_argument("--block_size", type=in_range(int, 1), default=256, help="context length in tokens")
    g.add_argument("--dropout", type=in_range(float, 0, 1, high_open=True), default=0.0, help="dropout rate")
    g.add_argument(
        "--bias", action=argparse.BooleanOptionalAction, default=False, help="biases in linear layers and LayerNorm"
    )

    g = p.add_argument_group("training")
    g.add_argument("--batch_size", type=in_range(int, 1), default=32, help="sequences per micro-batch")
    g.add_argument("--grad_accum", type=in_range(int, 1), default=1, help="micro-batches per optimizer step")
    g.add_argument("--max_steps", type=in_range(int, 1), default=5000, help="optimizer steps")
    g.add_argument(
        "--max_seconds",
        type=in_range(float, 0, low_open=True),
        default=None,
        help="a training budget in seconds: turned into --max_steps by timing a few steps first (recorded)",
    )
    g.add_argument(
        "--learning_rate", type=in_range(float, 0, low_open=True), default=1e-3, help="peak AdamW learning rate"
    )
    g.add_argument("--min_lr", type=in_range(float, 0), default=1e-4, help="learning rate at the end of the decay")
    g.add_argument(
        "--warmup_steps",
        type=in_range(int, 0),
        default=None,
        help=f"linear warmup steps (default: {WARMUP_STEPS}, at most {WARMUP_SHARE * 100:.0f}%% of max_steps)",
    )
    g.add_argument(
        "--lr_decay_steps",
        type=in_range(int, 1),
        default=None,
        help="steps over which the learning rate decays (default: max_steps)",
    )
    g.add_argument(
        "--optimizer",
        choices=("muon", "adamw"),
        default="muon",
        help="muon: Muon for hidden matrices, AdamW for embeddings and vectors; adamw: AdamW for all",
    )
    g.add_argument("--muon_lr", type=in_range(float, 0, low_open=True), default=0.02, help="peak Muon learning rate")
    g.add_argument("--weight_decay", type=in_range(float, 0), default=0.1, help="AdamW weight decay on matrices")
    g.add_argument("--beta1", type=in_range(float, 0, 1, high_open=True), default=0.9, help="AdamW beta1")
    g.add_argument("--beta2", type=in_range(float, 0, 1, high_open=True), default=0.95, help="AdamW beta2")
    g.add_argument("--grad_clip", type=in_range(float, 0), default=1.0, help="max gradient norm; 0 disables")
    g.add_argument("--seed", type=in_range(int, 0), default=1337, help="seed for weights, batches and dropout")

    g = p.add_argument_group("evaluation and sampling")
    g.add_argument("--eval_interval", type=in_range(int, 1), default=250, help="steps between evaluations")
    g.add_argument("--eval_iters", type=in_range(int, 1), default=50, help="batches per split per evaluation")
    g.add_argument(
        "--log_interval", type=in_range(int, 1), default=10, help="steps between reading the loss off the device"
    )
    g.add_argument(
        "--eval_only",
        action="store_true",
        help="with --resume RUN_DIR and --data FILE: one pass over FILE's --eval_split, then exit",
    )
    g.add_argument(
        "--eval_split",
        choices=("val", "all"),
        default="val",
        help="with --eval_only: the validation split of --data, or all of it (a held-out file)",
    )
    g.add_argument("--prompt", default="Once upon a time", help="start of the generated sample")
    g.add_argument("--sample_tokens", type=in_range(int, 0), default=100, help="tokens generated per sample")
    g.add_argument("--temperature", type=in_range(float, 0), default=0.8, help="sampling temperature; 0 is greedy")
    g.add_argument("--top_k", type=in_range(int, 1), default=50, help="sample only from the k likeliest tokens")
    g.add_argument(
        "--baseline",
        default=None,
        metavar="RUN",
        help="a run folder or ClearML offline session on the same data: stop this run when clearly worse",
    )
    g.add_argument(
        "--abort_after",
        type=in_range(float, 0, 1),
        default=0.2,
        help="with --baseline: fraction of max_steps before a run may be stopped",
    )
    g.add_argument(
        "--abort_margin",
        type=in_range(float, 0),
        default=0.03,
        help="with --baseline: stop when Loss/val is this much worse (relative) at two evaluations in a row",
    )

    g = p.add_argument_group("system")
    g.add_argument(
        "--device", choices=("auto", "cpu", "cuda", "mps"), default="auto", help="auto picks CUDA, then MPS, then CPU"
    )
    g.add_argument(
        "--dtype",
        choices=("auto", "float32", "bfloat16", "float16"),
        default="auto",
        help="autocast dtype; auto is bfloat16 on CUDA when supported, else float32",
    )
    g.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="compile the model and Muon's update with torch.compile (default: on for CUDA, off on CPU and MPS)",
    )

    g = p.add_argument_group("tracking")
    g.add_argument("--comment", default="", help="the hypothesis this run tests; also names the ClearML task")
    g.add_argument("--project", default="gpt-from-scratch", help="ClearML project")
    g.add_argument("--task_name", default=None, help="ClearML task name (default: the comment, else dataset and time)")
    g.add_argument("--tags", nargs="*", default=[], help="extra ClearML tags")
    g.add_argument("--offline", action="store_true", help="track in ClearML's offline mode even if a server is set")
    g.add_argument(
        "--queue",
        default=None,
        metavar="NAME",
        help="create the task, then hand it to the clearml-agents that listen on this queue (needs a ClearML server)",
    )

    g = p.add_argument_group("output")
    g.add_argument("--out_dir", default=None, help="run folder for the checkpoint (default: runs/<time>)")
    g.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue the run saved in RUN_DIR")
    g.add_argument("--reproduce", default=None, metavar="RUN", help="rerun a recorded run from its own code and "
                   "compare every evaluation (main.py --reproduce RUN --help for its options)")  # fmt: skip
    g.add_argument(
        "--new_data", action="store_true", help="with --resume: allow training on another --data than the run's"
    )
    g.add_argument(
        "--overwrite", action="store_true", help="start a new run in an --out_dir that holds one, replacing it"
    )
    g.add_argument(
        "--checkpoint_interval",
        type=in_range(int, 1),
        default=None,
        help="steps between checkpoints (default: eval_interval)",
    )
    return p


def explicit_flags(parser: argparse.ArgumentParser, argv: list[str]) -> dict:
    """The flags the user typed, with their values, ignoring defaults."""
    saved = {a.dest: a.default for a in parser._actions}
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    try:
        return vars(parser.parse_args(argv))
    finally:
        for action in parser._actions:
            action.default = saved[action.dest]


# -------------------------------------------------------------------------------------------------------------------
# training pieces


def learning_rate(step: int, args: argparse.Namespace) -> float:
    """Linear warmup over warmup_steps, then a cosine from the end of warmup down to min_lr at lr_decay_steps."""
    if step < args.warmup_steps:
        return args.learning_rate * (step + 1) / (args.warmup_steps + 1)
    decay_steps = (args.lr_decay_steps or args.max_steps) - args.warmup_steps
    progress = min(max((step - args.warmup_steps) / max(decay_steps, 1), 0.0), 1.0)
    return args.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (args.learning_rate - args.min_lr)


def text_only(tokens, n_bytes: int, tokenizer: Tokenizer) -> tuple[int, int]:
    """Tokens and UTF-8 bytes of a split without its special tokens: what bits per byte counts."""
    n_tokens, text_bytes = len(tokens), n_bytes
    for special, special_id in tokenizer.special_ids.items():
        count = int((tokens == special_id).sum()) if len(tokens) else 0
        n_tokens -= count
        text_bytes -= count * len(special.encode())
    return n_tokens, text_bytes


def bits_per_byte(nats_per_token: float, n_tokens: int, n_bytes: int) -> float:
    return nats_per_token * n_tokens / (math.log(2) * n_bytes)


def token_losses(model: GPT, x: torch.Tensor, y: torch.Tensor, autocast) -> torch.Tensor:
    """The loss of every target token, (B, T)."""
    with autocast:
        logits, _ = model(x, y)
    return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none").view_as(y)


@torch.no_grad()
def estimate_loss(model: GPT, splits: data.Splits, args: argparse.Namespace, device: str, autocast) -> dict:
    """Mean loss over eval_iters batches of each split (the same batches at every call), and the validation loss
    over text tokens only, for bits per byte."""
    model.eval()
    losses, special = {}, torch.tensor(list(splits.tokenizer.special_ids.values()), device=device)
    for offset, split in enumerate(("train", "val")):
        generator = torch.Generator().manual_seed(args.seed + 1 + offset)
        total, text_total, text_count = 0.0, 0.0, 0
        for _ in range(args.eval_iters):
            x, y = data.get_batch(
                getattr(splits, split), args.batch_size, args.block_size, generator, device,
                part=distributed.rank(), parts=distributed.world_size(),
            )  # fmt: skip
            per_token = token_losses(model, x, y, autocast)
            text = ~torch.isin(y, special)
            total += per_token.mean().item()
            text_total += per_token[text].sum().item()
            text_count += int(text.sum())
        total, text_total, text_count = distributed.sum_across(
            torch.tensor([total, text_total, text_count], dtype=torch.float64)
        ).tolist()
        losses[split] = total / (args.eval_iters * distributed.world_size())
        losses[f"{split}_text"] = text_total / max(text_count, 1)
    model.train()
    return losses


@torch.no_grad()
def generate_sample(model: GPT, tokenizer: Tokenizer, args: argparse.Namespace, device: str, autocast) -> str:
    ids = tokenizer.encode(args.prompt) or [tokenizer.eot_id]
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    model.eval()
    with torch.random.fork_rng(devices=[device] if device == "cuda" else []), autocast:
        torch.manual_seed(args.seed)
        out = model.generate(idx, args.sample_tokens, temperature=args.temperature, top_k=args.top_k)
    model.train()
    return tokenizer.decode(out[0].tolist())


class Batches:
    """Training batches drawn from --seed, one fetched ahead so its copy to the GPU overlaps the current step.

    `state` is the generator's state before the batch held ahead: a resumed run draws that batch again."""

    def __init__(self, tokens, args: argparse.Namespace, device: str, state: torch.Tensor | None = None):
        self.tokens, self.args, self.device = tokens, args, device
        self.generator = torch.Generator().manual_seed(args.seed)
        self.restart(self.generator.get_state() if state is None else state)

    def _draw(self):
        self.state = self.generator.get_state()
        return data.get_batch(
            self.tokens, self.args.batch_size, self.args.block_size, self.generator, self.device,
            part=distributed.rank(), parts=distributed.world_size(),
        )  # fmt: skip

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        batch, self.ahead = self.ahead, self._draw()
        return batch

    def restart(self, state: torch.Tensor) -> None:
        """Draw again from a state taken earlier (`state`)."""
        self.generator.set_state(state)
        self.ahead = self._draw()


def train_step(model, optimizer, scaler, batches: Batches, args: argparse.Namespace, autocast) -> torch.Tensor:
    """One optimizer step over grad_accum micro-batches; returns the mean loss, left on the device (no sync)."""
    loss_sum = None
    for micro in range(args.grad_accum):
        x, y = batches.next()
        with distributed.sync_gradients(model, now=micro == args.grad_accum - 1):
            with autocast:
                _, loss = model(x, y)
            scaler.scale(loss / args.grad_accum).backward()
        loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
    if args.grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum / args.grad_accum


def set_learning_rate(optimizer: torch.optim.Optimizer, step: int, args: argparse.Namespace) -> float:
    lr = learning_rate(step, args)
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * lr / args.learning_rate
    return lr


def build_optimizer(model: GPT, args: argparse.Namespace, device: str, saved: dict | None):
    """The optimizer from the flags; a resumed run keeps its saved state but takes the flags' hyperparameters."""
    muon_lr = args.muon_lr if args.optimizer == "muon" else None
    betas = (args.beta1, args.beta2)
    optimizer = model.configure_optimizers(
        args.weight_decay, args.learning_rate, betas, device, muon_lr=muon_lr, compile_muon=args.compile
    )
    if saved is not None:
        settings = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
        optimizer.load_state_dict(saved)
        for group, setting in zip(optimizer.param_groups, settings, strict=True):
            group.update(setting)
    return optimizer


class QuitNow(BaseException):
    """A second Ctrl+C: leave at once, keeping what is already on disk."""


class StopFlag:
    """What SIGINT and SIGTERM do, by phase.

    Preparing, evaluating or sampling (`interruptible`): the first signal raises KeyboardInterrupt at once, so a long
    preparation or evaluation ends within seconds. In a training step it asks the loop to stop after the step. A
    second Ctrl+C raises QuitNow wherever the run is, except while the task is being closed; a third exits at once.
    """

    def __init__(self):
        self.requested, self.count, self.interruptible, self.closing = False, 0, True, False

    def __call__(self, signum, frame):
        self.count += 1
        name = signal.Signals(signum).name
        if self.count >= 3:
            os._exit(EXIT_ABORTED)
        if self.closing:
            say(f"\n{name}: closing the ClearML task first (Ctrl+C {3 - self.count} more to quit without it)")
            return
        if self.requested:
            if signum == signal.SIGINT:
                raise QuitNow
            return
        self.requested = True
        if self.interruptible:
            raise KeyboardInterrupt
        say(f"\n{name}: stopping after this step (Ctrl+C again to quit at once)")

    @contextlib.contextmanager
    def allowing_interrupts(self):
        self.interruptible = True
        try:
            yield
        finally:
            self.interruptible = False

    def install(self) -> None:
        signal.signal(signal.SIGINT, self)
        signal.signal(signal.SIGTERM, self)


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -------------------------------------------------------------------------------------------------------------------
# main


def load_data(parser: argparse.ArgumentParser, args: argparse.Namespace, tokenizer: Tokenizer | None):
    cache_dir = Path(args.cache_dir).expanduser()
    try:
        if args.data == "tinystories":
            batch = args.batch_size * args.grad_accum * distributed.world_size()  # sequences per step, all ranks
            needed = args.max_steps * batch * (args.block_size + 1)
            splits = data.load_tinystories(
                base_url=args.tinystories_url,
                version=args.tinystories_version,
                vocab_size=args.vocab_size,
                train_tokens=int(needed * 1.1) + 10 * args.block_size,
                cache_dir=cache_dir,
                tokenizer=tokenizer,
            )
        else:
            splits = data.load_text_file(
                args.data,
                vocab_size=args.vocab_size,
                val_fraction=args.val_fraction,
                cache_dir=cache_dir,
                tokenizer=tokenizer,
            )
    except data.DataError as e:
        parser.error(str(e))
    window = args.block_size + 1
    for split in ("val",) if args.eval_only else ("train", "val"):
        n = len(getattr(splits, split))
        if n < window:
            parser.error(
                f"--data {args.data}: its {split} split has {n} tokens, fewer than one training window of "
                f"block_size + 1 = {window}; use a bigger file or a smaller --block_size"
            )
    return splits


def resolve_args(parser: argparse.ArgumentParser, argv: list[str]) -> tuple[argparse.Namespace, dict | None]:
    args = parser.parse_args(argv)
    checkpoint = None
    if args.resume:
        try:
            checkpoint = ckpt.load(args.resume)
        except ckpt.RunFolderError as e:
            parser.error(str(e))
        given, saved = explicit_flags(parser, argv), checkpoint["args"]
        for name in FROZEN_FLAGS:
            if name in given and given[name] != saved.get(name):
                parser.error(f"--{name} cannot change when resuming (the run has {saved.get(name)})")
        if "data" in given and given["data"] != saved["data"] and not (args.eval_only or args.new_data):
            parser.error(
                f"--data {given['data']}: the run in {args.resume} trained on {saved['data']}; resuming on other "
                "data needs --new_data"
            )
        if "out_dir" in given and Path(given["out_dir"]).resolve() != Path(args.resume).resolve():
            parser.error("--out_dir cannot differ from --resume RUN_DIR: a resumed run stays in its folder")
        fresh = {"new_data", "overwrite", "eval_only", "eval_split"}  # about this invocation, not the run
        vars(args).update({**{k: v for k, v in saved.items() if k not in fresh}, **given})
        args.out_dir = args.resume
    elif args.eval_only:
        parser.error("--eval_only needs --resume RUN_DIR (the run to evaluate)")
    if args.eval_split == "all" and (not args.eval_only or args.data == "tinystories"):
        parser.error("--eval_split all scores a whole local file: it needs --eval_only and --data FILE")
    if args.n_embd % args.n_head:
        parser.error(f"--n_embd {args.n_embd} is not divisible by --n_head {args.n_head}")
    if args.min_lr > args.learning_rate:
        parser.error(f"--min_lr {args.min_lr} is above --learning_rate {args.learning_rate}")
    return args, checkpoint


def check_memory(parser: argparse.ArgumentParser, model: GPT, args: argparse.Namespace, device: str) -> None:
    """Refuse up front a batch whose training step cannot fit in the device's memory."""
    needed, free = model.training_memory(args.batch_size), devices.available_memory(device)
    if free is not None and needed > free:
        parser.error(
            f"--batch_size {args.batch_size} with --block_size {args.block_size}: a training step needs about "
            f"{needed / 2**30:.1f} GiB, and {device} has {free / 2**30:.1f} GiB free; use a smaller --batch_size "
            "(and --grad_accum for the same batch) or a smaller model"
        )


@torch.no_grad()
def evaluate_only(args: argparse.Namespace, model: GPT, splits: data.Splits, device: str, autocast) -> None:
    """One deterministic pass over the validation split (or all of --data); the last line is what scripts read."""
    tokens, n_bytes = splits.val, splits.val_bytes
    if args.eval_split == "all":  # a local file: its training split is the bytes before the validation split
        tokens, n_bytes = np.concatenate([splits.train, splits.val]), Path(args.data).stat().st_size
    model.eval()
    special = torch.tensor(list(splits.tokenizer.special_ids.values()))
    total, text_total = 0.0, 0.0
    n_windows = (len(tokens) - 1 + args.block_size - 1) // args.block_size
    batches = data.iter_eval_batches(tokens, args.batch_size, args.block_size)
    for x, y in tqdm(batches, total=math.ceil(n_windows / args.batch_size), desc="evaluating", file=sys.stderr):
        per_token = token_losses(model, x.to(device), y.to(device), autocast).cpu()
        total += per_token.sum().item()
        text_total += per_token[~torch.isin(y, special)].sum().item()
    n_text_tokens, n_text_bytes = text_only(tokens, n_bytes, splits.tokenizer)
    loss = total / (len(tokens) - 1)
    bpb = bits_per_byte(text_total / n_text_tokens, n_text_tokens, n_text_bytes)
    print(f"val_loss={loss:.6f} val_bpb={bpb:.6f}")


def dataset_tag(data_flag: str) -> str:
    """What the run is tagged with: `tinystories`, or the local file's name."""
    return "tinystories" if data_flag == "tinystories" else Path(data_flag).name


def flag_types(parser: argparse.ArgumentParser) -> dict[str, type]:
    """The value type of every flag; the tracker records the flags left unset with it."""

    def value_type(action: argparse.Action) -> type:
        if isinstance(action.type, type):
            return action.type
        if action.type is not None:  # an in_range checker: it converts to its `kind`
            return inspect.getclosurevars(action.type).nonlocals.get("kind", str)
        return list if action.nargs in ("*", "+") else str

    return {action.dest: value_type(action) for action in parser._actions}


def start_tracking(parser: argparse.ArgumentParser, args: argparse.Namespace, checkpoint: dict | None):
    tag = dataset_tag(args.data)
    try:
        return tracking.Tracker(
            project=args.project,
            task_name=args.task_name or args.comment or f"{tag} {datetime.now():%Y-%m-%d %H:%M}",
            tags=[tag, *args.tags],
            comment=args.comment,
            offline=args.offline,
            continue_task_id=checkpoint.get("task_id") if checkpoint else None,
            samples=checkpoint.get("samples") if checkpoint else None,
        )
    except tracking.ConfigError as e:
        parser.error(str(e))


def build_model(
    parser: argparse.ArgumentParser, args: argparse.Namespace, splits: data.Splits, checkpoint: dict | None, device: str
) -> GPT:
    config = GPTConfig(
        vocab_size=splits.tokenizer.vocab_size,
        block_size=args.block_size,
        n_layer=args.n_layer,
        n_head=args.n_head,
        n_embd=args.n_embd,
        dropout=args.dropout,
        bias=args.bias,
        arch=args.arch,
    )
    model = GPT(config).to(device)
    check_memory(parser, model, args, device)
    if checkpoint:
        model.load_state_dict(checkpoint["model"])
    return model


def check_system(parser: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[str, str, object]:
    """The flags about this machine and the data file, checked: device, dtype and autocast."""
    try:
        device = devices.pick_device(args.device)
        dtype = devices.pick_dtype(device, args.dtype)
    except UsageError as e:
        parser.error(str(e))
    autocast = devices.autocast(device, dtype)
    if args.data != "tinystories":
        try:
            data.check_text_file(Path(args.data).expanduser().resolve())
        except data.DataError as e:
            parser.error(str(e))
    if device == "cuda":
        enable_tf32()
    if args.compile is None:
        args.compile = device == "cuda"
    return device, dtype, autocast


def claim_run_folder(parser: argparse.ArgumentParser, args: argparse.Namespace, resuming: bool):
    """The run folder, locked for this run (the lock is held while the returned file stays open)."""
    try:
        out_dir, lock = ckpt.claim(args.out_dir, resuming=resuming, overwrite=args.overwrite)
    except ckpt.RunFolderError as e:
        parser.error(str(e))
    args.out_dir = str(out_dir)
    return out_dir, lock


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if reproduce.requested(argv):
        return reproduce.main(argv, build_parser())
    stop = StopFlag()
    stop.install()
    try:
        distributed.setup()
        return run(argv, stop)
    except KeyboardInterrupt:
        say("interrupted before training started; nothing to save")
        return EXIT_ABORTED


def check_launch(parser: argparse.ArgumentParser, args: argparse.Namespace, device: str) -> None:
    """Flags that depend on how the program was started (torchrun) or on a server (--queue)."""
    args.world_size = distributed.world_size()  # recorded in Args and in the checkpoint
    if args.world_size > 1 and args.queue:
        parser.error("--queue hands the run to a clearml-agent: start it with python main.py, not torchrun")
    if args.world_size > 1 and device == "mps":
        parser.error("under torchrun the processes train on CUDA GPUs or on the CPU: use --device cpu on this machine")
    if args.queue and (args.offline or tracking.configured_server() is None):
        parser.error(f"--queue {args.queue} needs a ClearML server: run clearml-init or set CLEARML_API_HOST")


def run(argv: list[str], stop: StopFlag) -> int:
    parser = build_parser()
    args, checkpoint = resolve_args(parser, argv)
    device, dtype, autocast = check_system(parser, args)
    check_launch(parser, args, device)
    tokenizer = tokenizer_from_text(checkpoint["tokenizer"]) if checkpoint else None
    if args.eval_only:
        with distributed.main_first():
            splits = load_data(parser, args, tokenizer)
        evaluate_only(args, build_model(parser, args, splits, checkpoint, device), splits, device, autocast)
        return 0
    main_rank = distributed.is_main()  # rank 0 alone owns the run folder and the task; the others follow it
    out_dir, lock = claim_run_folder(parser, args, resuming=checkpoint is not None) if main_rank else (None, None)

    # The task starts once the flags are checked, so its console holds everything below; the run then goes on with
    # the flags as the task holds them (under clearml-agent, as edited in the web UI), checked again if they changed.
    tracker = start_tracking(parser, args, checkpoint) if main_rank else tracking.NoTracker()
    stop.install()  # again: Task.init hooks SIGTERM to close the task first, which can hang; ours decide
    connected = argparse.Namespace(**tracker.connect(vars(args), flag_types(parser))) if main_rank else args
    connected = argparse.Namespace(**distributed.share(vars(connected)))
    try:
        if connected != args:
            if main_rank and connected.out_dir != args.out_dir:
                lock.close()
                out_dir, lock = claim_run_folder(parser, connected, resuming=checkpoint is not None)
            args = connected
            device, dtype, autocast = check_system(parser, args)
        out_dir = Path(args.out_dir)
        if args.queue:
            tracker.enqueue(args.queue)  # ends this process, unless it is the agent that runs the task
        torch.manual_seed(args.seed + distributed.rank())  # weights come from rank 0 (DDP broadcasts them)
        with distributed.main_first():  # the tokenizer and the token cache are made once, by rank 0
            splits = load_data(parser, args, tokenizer)
        if splits.tokenizer.vocab_size != args.vocab_size:  # the text allows fewer merges (data.py says so)
            args.vocab_size = splits.tokenizer.vocab_size
            tracker.update_flags({"vocab_size": args.vocab_size})
        model = build_model(parser, args, splits, checkpoint, device)
        try:
            optimizer = build_optimizer(model, args, device, checkpoint["optimizer"] if checkpoint else None)
        except ValueError as e:  # a checkpoint whose optimizer state has other groups (an older Muon layout)
            parser.error(f"--resume {args.resume}: its optimizer state does not fit this program's optimizer ({e})")
        try:
            early_abort = compare.EarlyAbort.against(args, splits.tag, splits.tokenizer.fingerprint)
        except compare.CompareError as e:
            parser.error(f"--baseline {args.baseline}: {e}")
    except tracking.QueueError as e:
        tracker.close("failed", str(e), quiet=True)
        parser.error(str(e))
    except SystemExit:  # a mistake in the data or the edited flags, explained on stderr: its line stays the last
        tracker.close("failed", "refused before training", quiet=True)
        raise
    except KeyboardInterrupt:
        tracker.close("aborted", "interrupted before training started", quiet=True)
        raise
    return train(
        args, checkpoint, model, optimizer, splits, device, dtype, autocast, out_dir, tracker, stop, early_abort
    )


def tokenizer_from_text(text: str) -> Tokenizer:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tokenizer.json"
        path.write_text(text, encoding="utf-8")
        return Tokenizer.load(path)


def train(
    args,
    checkpoint,
    model,
    optimizer,
    splits,
    device,
    dtype,
    autocast,
    out_dir: Path,
    tracker,
    stop: StopFlag,
    early_abort=None,
) -> int:
    tokenizer = splits.tokenizer
    tokenizer_path = out_dir / "tokenizer.json"
    if distributed.is_main():
        tokenizer.save(tokenizer_path)
    batches = Batches(splits.train, args, device, checkpoint["rng"]["batches"] if checkpoint else None)
    step, best_val, best_train, saved_step = 0, float("inf"), float("inf"), None
    if checkpoint:
        step, best_val, saved_step = checkpoint["step"], checkpoint["best_val_loss"], checkpoint["step"]
        torch.set_rng_state(checkpoint["rng"]["torch"])
        if device == "cuda" and checkpoint["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(checkpoint["rng"]["cuda"])
    eval_model = torch.compile(model) if args.compile else model
    step_model = distributed.wrap(eval_model, device)  # DDP for the training steps only
    scaler = torch.amp.GradScaler(enabled=dtype == "float16")
    val_text_tokens, val_text_bytes = text_only(splits.val, splits.val_bytes, tokenizer)

    record = tracking.RunRecord(out_dir) if distributed.is_main() else tracking.NoTracker()  # rank 0 writes it
    recorded = provenance.capture(args.data, splits.sources, device, dtype) if distributed.is_main() else None
    record.start(tracker, vars(args), splits.tag, tokenizer.fingerprint, tokenizer.vocab_size, step, bool(checkpoint),
                 provenance=recorded)  # fmt: skip
    abort_reason = None
    print(
        f"{model.num_params() / 1e6:.2f}M parameters, {len(splits.train):,} training tokens, device {device}, "
        f"dtype {dtype}, run folder {out_dir}",
        flush=True,
    )
    world = distributed.world_size()  # used, rather than the recorded args.world_size, which Args may override
    if world > 1:
        print(
            f"world size {world}: global batch {args.batch_size * args.grad_accum * world} sequences "
            f"(--batch_size {args.batch_size} x --grad_accum {args.grad_accum} x {world} ranks)",
            flush=True,
        )

    def checkpoint_state() -> dict:
        return {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "step": step,
            "args": vars(args),
            "model_config": asdict(model.config),
            "best_val_loss": best_val,
            "tokenizer": tokenizer_path.read_text(encoding="utf-8"),
            "task_id": tracker.task_id,
            "samples": tracker.samples,
            "rng": {
                "batches": batches.state,
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state() if device == "cuda" else None,
            },
        }

    def save() -> None:
        nonlocal saved_step
        if distributed.is_main():
            ckpt.save(out_dir / ckpt.CHECKPOINT, checkpoint_state())
        saved_step = step

    def kept() -> str:
        if saved_step is None:
            return f"no checkpoint was written yet (the first is due at step {checkpoint_interval})"
        return f"the checkpoint of step {saved_step} is kept in {out_dir}"

    def evaluate(final: bool = False) -> None:
        nonlocal best_val, abort_reason
        with stop.allowing_interrupts():
            losses = estimate_loss(eval_model, splits, args, device, autocast)
            bpb = bits_per_byte(losses["val_text"], val_text_tokens, val_text_bytes)
            tracker.report_scalar("Loss", "train", losses["train"], step)
            tracker.report_scalar("Loss", "val", losses["val"], step)
            tracker.report_scalar("BPB", "val", bpb, step)
            best_val = min(best_val, losses["val"])
            tqdm.write(f"step {step}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
            sample = ""
            if distributed.is_main():
                sample = tracking.clean_sample(generate_sample(model, tokenizer, args, device, autocast))
                tqdm.write(f"--- Generated Sample (step {step}) ---\n{sample}\n---")
                tracker.report_sample(sample, step, losses["val"])
        lr_now = learning_rate(step, args)
        record.evaluation(step, step * tokens_per_step, losses["train"], losses["val"], bpb, lr_now, sample)
        if early_abort and not final and not abort_reason and (abort_reason := early_abort.check(step, losses["val"])):
            tracker.add_tags([compare.WORSE_THAN_BASELINE])
            stop.requested = True  # stop as Ctrl+C would: after this step, checkpoint kept, status aborted

    def fix_steps_from_budget(eval_seconds: float) -> None:
        """Time a few steps, undo them, and turn --max_seconds into --max_steps (recorded), so the run reproduces."""
        model_state, optimizer_state = copy.deepcopy((model.state_dict(), optimizer.state_dict()))
        batch_state, rng_state = batches.state, torch.get_rng_state()
        started = time.perf_counter()
        train_step(step_model, optimizer, scaler, batches, args, autocast)  # compiles, with --compile
        devices.synchronize(device)
        first = time.perf_counter() - started
        started = time.perf_counter()
        for _ in range(BUDGET_PROBE_STEPS):
            train_step(step_model, optimizer, scaler, batches, args, autocast)
        devices.synchronize(device)
        per_step = (time.perf_counter() - started) / BUDGET_PROBE_STEPS
        model.load_state_dict(model_state)
        optimizer.load_state_dict(optimizer_state)
        batches.restart(batch_state)
        torch.set_rng_state(rng_state)
        steps = max(1, int(args.max_seconds / (per_step + eval_seconds / args.eval_interval)))
        args.max_steps = distributed.share(min(args.max_steps, step + steps))  # rank 0's timing decides for all
        tracker.update_flags({"max_steps": args.max_steps})
        if default_warmup:
            args.warmup_steps = min(WARMUP_STEPS, int(WARMUP_SHARE * args.max_steps))
        if early_abort:
            early_abort.first_step = args.abort_after * args.max_steps
        tqdm.write(
            f"--max_seconds {args.max_seconds:g}: {per_step * 1000:.0f} ms a step (the first took {first:.1f} s and is "
            f"not counted), so --max_steps {args.max_steps}, recorded: rerun with it to reproduce this run"
        )

    default_warmup = args.warmup_steps is None  # then it follows the step count, which --max_seconds may change
    if default_warmup:
        args.warmup_steps = min(WARMUP_STEPS, int(WARMUP_SHARE * args.max_steps))
    checkpoint_interval = args.checkpoint_interval or args.eval_interval
    tokens_per_step = args.batch_size * args.grad_accum * args.block_size * world
    peak = devices.peak_flops(torch.cuda.get_device_name()) if device == "cuda" else None
    peak = peak * world if peak else None
    status, message, exit_code = "completed", "", 0
    evaluated_at = step if checkpoint else None  # a resumed run was evaluated at its saved step already
    pending, clock, timed_steps, bar = [], None, 0, None
    try:
        stop.interruptible = False
        if args.max_seconds is not None and args.max_seconds != (checkpoint or {}).get("args", {}).get("max_seconds"):
            started = time.perf_counter()
            if evaluated_at is None:
                evaluate()
                evaluated_at = step
            else:  # timed only: a resumed run was evaluated at this step already
                with stop.allowing_interrupts():
                    estimate_loss(eval_model, splits, args, device, autocast)
                    generate_sample(model, tokenizer, args, device, autocast)
            fix_steps_from_budget(time.perf_counter() - started)
        if default_warmup:
            tracker.update_flags({"warmup_steps": args.warmup_steps})
        record.append({"event": "settled", "flags": {"max_steps": args.max_steps, "warmup_steps": args.warmup_steps}})
        bar = tqdm(total=args.max_steps, initial=step, desc="training", dynamic_ncols=True, mininterval=1.0)
        while step < args.max_steps:
            if step % args.eval_interval == 0 and step != evaluated_at:
                evaluate()
                evaluated_at = step
            if step % checkpoint_interval == 0 and step not in (0, saved_step):
                save()
            if clock is not None and timed_steps == 0:  # evaluations and checkpoints are not timed
                devices.synchronize(device)
                clock = time.perf_counter()
            lr = set_learning_rate(optimizer, step, args)
            compile_start = time.perf_counter() if clock is None else None
            pending.append(train_step(step_model, optimizer, scaler, batches, args, autocast))
            step += 1
            bar.update(1)
            if clock is None:  # the first step compiles and warms up: it is not timed
                devices.synchronize(device)
                clock = time.perf_counter()
                if args.compile:
                    tqdm.write(f"compiling took {clock - compile_start:.1f} s (the first step; not timed)")
            else:
                timed_steps += 1
            due = step % args.eval_interval == 0 or step % checkpoint_interval == 0 or step == args.max_steps
            stopping = distributed.any_rank(stop.requested)  # every rank stops at the same step
            if len(pending) < args.log_interval and not due and not stopping:
                continue
            # Once per log interval, and before evaluations and checkpoints: the losses come off the device
            # (averaged over ranks, so every rank sees the same losses and decides alike on divergence).
            losses, first = distributed.average(torch.stack(pending).float()).tolist(), step - len(pending) + 1
            pending = []
            devices.synchronize(device)
            tokens_per_s = tokens_per_step * timed_steps / (time.perf_counter() - clock) if timed_steps else 0.0
            timed_steps = 0
            for offset, loss in enumerate(losses):
                tracker.report_scalar("Train step", "loss", loss, first + offset)
            tracker.report_scalar("Learning rate", "lr", lr, step)
            if tokens_per_s:
                tracker.report_scalar("Throughput", "tokens/s", tokens_per_s, step)
                if peak:
                    tracker.report_scalar("MFU", "percent", 100 * model.flops_per_token() * tokens_per_s / peak, step)
            bar.set_postfix(loss=f"{losses[-1]:.3f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
            for at, loss in enumerate(losses, start=first):
                if not math.isfinite(loss) or (at > args.warmup_steps and loss > DIVERGENCE_FACTOR * best_train):
                    status, exit_code = "failed", EXIT_DIVERGED
                    message = f"training diverged at step {at}: loss {loss:.4g} (best {best_train:.4g}); {kept()}"
                    break
                best_train = min(best_train, loss)
            if status == "failed":
                break
            if stopping:
                status, exit_code, message = "aborted", EXIT_ABORTED, abort_reason or f"interrupted at step {step}"
                break
        bar.close()
        if status == "completed" and step != evaluated_at:
            evaluate(final=True)
        if status != "failed":
            save()
            tracker.register_checkpoint(out_dir / ckpt.CHECKPOINT, tokenizer_path, step)
    except KeyboardInterrupt:  # during an evaluation or a sample: keep what the steps did
        status, exit_code, message = "aborted", EXIT_ABORTED, f"interrupted at step {step}"
        stop.interruptible = False
        try:
            save()
            tracker.register_checkpoint(out_dir / ckpt.CHECKPOINT, tokenizer_path, step)
        except ckpt.NotFiniteError:
            message += f"; the weights are not finite, so {kept()}"
        except QuitNow:
            message += f"; quit at once, {kept()}"
    except QuitNow:
        status, exit_code, message = "aborted", EXIT_ABORTED, f"quit at once at step {step}; {kept()}"
    except ckpt.NotFiniteError:
        status, exit_code = "failed", EXIT_DIVERGED
        message = f"training diverged by step {step}: the weights are no longer finite; {kept()}"
    except Exception as e:
        exit_code, message = failure(e, step, kept(), out_dir)
        status = "failed"
        distributed.failure(message)
    finally:
        if bar is not None:
            bar.close()
    if status == "aborted" and saved_step == step:
        message += (
            f"; checkpoint saved to {out_dir / ckpt.CHECKPOINT}\n  continue with: python main.py --resume {out_dir}"
        )
    stop.closing = True
    record.status(status, message.splitlines()[0] if message else "", step)
    tracker.close(status, message.splitlines()[0] if message else "")
    if status != "completed":
        say(message)  # last, after ClearML's own lines: what happened and what was kept
    return exit_code


def failure(error: Exception, step: int, kept: str, out_dir: Path) -> tuple[int, str]:
    """The exit code and the one line for a failure from outside (or a bug); the traceback goes to error.log."""
    log = out_dir / "error.log"
    with contextlib.suppress(OSError), open(log, "a") as f:
        f.write(f"{datetime.now():%Y-%m-%d %H:%M:%S} step {step}\n{traceback.format_exc()}\n")
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    if distributed.peer_lost(error):
        return EXIT_PEER_LOST, f"another process of this run stopped at step {step}; {kept}"
    if isinstance(error, MemoryError | torch.OutOfMemoryError) or "can't allocate memory" in text:
        return EXIT_OUT_OF_MEMORY, f"out of memory at step {step}; {kept}; try a smaller --batch_size (details: {log})"
    if isinstance(error, OSError):
        what = "the disk is full" if error.errno == errno.ENOSPC else f"I/O error ({error.strerror or text})"
        return EXIT_IO, f"{what} at step {step}; {kept}, whole (details: {log})"
    return EXIT_BUG, f"unexpected error at step {step}: {type(error).__name__}: {text}; {kept} (traceback: {log})"


if __name__ == "__main__":
    code = main()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the run is over: a late signal changes nothing now
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sys.exit(code)
