"""
Train a GPT from scratch on TinyStories or a local .txt file, one hypothesis per run, tracked in ClearML.

    python main.py --data tinystories --dropout 0.3 --comment "Hypothesis: more dropout lowers val loss"

Design choices:
- Flags are nanoGPT's, snake_case; every one has a help text and a checked range, so a bad value is an argparse
  error (exit 2), never a traceback. Every mistake found after parsing goes through the same `parser.error`.
- The learning rate warms up linearly, then decays on a cosine to `--min_lr`. With `--max_seconds` the decay follows
  whichever budget, steps or seconds, is spent first, so a time-boxed run still ends on a low learning rate.
- Evaluation uses the same batches at every eval step (fixed seeds), so curves compare within and across runs.
- Sampling runs under a forked RNG, so evaluating never changes the training trajectory: N steps, resume, M steps
  equals N + M steps.
- The checkpoint is written to a temporary file, fsynced and renamed: a kill at any time keeps the last one whole.
- Ctrl+C or SIGTERM: the current step ends, the checkpoint is saved, the task is closed as aborted, exit 130.
  A second Ctrl+C exits at once. A diverging loss stops the run, keeps the last good checkpoint, exit 1.
"""

import argparse
import contextlib
import math
import os
import signal
import sys
import tempfile
import time
from dataclasses import asdict
from datetime import datetime
from pathlib import Path

# Before torch allocates anything: large CPU tensors on transparent huge pages, so the fresh (tokens x vocab)
# buffers of every step do not fault in 4 KB at a time (Linux only; bench/bench_train_step.py --default_allocator).
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import torch
from tqdm import tqdm

import compare
import data
import tracking
from model import ARCHS, GPT, GPTConfig
from tokenizer import Tokenizer

EXIT_ABORTED = 130
DIVERGENCE_FACTOR = 2.0  # a training loss above this multiple of the best one (after warmup) means divergence
MODEL_FLAGS = ("n_layer", "n_head", "n_embd", "block_size", "bias", "arch", "vocab_size")


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
        help="stop training when this wall-clock budget is spent, then evaluate and save",
    )
    g.add_argument(
        "--learning_rate", type=in_range(float, 0, low_open=True), default=1e-3, help="peak AdamW learning rate"
    )
    g.add_argument("--min_lr", type=in_range(float, 0), default=1e-4, help="learning rate at the end of the decay")
    g.add_argument("--warmup_steps", type=in_range(int, 0), default=100, help="linear warmup steps")
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
        "--eval_only",
        action="store_true",
        help="with --resume RUN_DIR and --data FILE: one pass over FILE's validation split, then exit",
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
    g.add_argument("--compile", action="store_true", help="compile the model with torch.compile")

    g = p.add_argument_group("tracking")
    g.add_argument("--comment", default="", help="the hypothesis this run tests; also names the ClearML task")
    g.add_argument("--project", default="gpt-from-scratch", help="ClearML project")
    g.add_argument("--task_name", default=None, help="ClearML task name (default: the comment, else dataset and time)")
    g.add_argument("--tags", nargs="*", default=[], help="extra ClearML tags")
    g.add_argument("--offline", action="store_true", help="track in ClearML's offline mode even if a server is set")

    g = p.add_argument_group("output")
    g.add_argument("--out_dir", default=None, help="run folder for the checkpoint (default: runs/<time>)")
    g.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue the run saved in RUN_DIR")
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
# checkpoints


def load_checkpoint(parser: argparse.ArgumentParser, run_dir: str) -> dict:
    path = Path(run_dir) / "ckpt.pt"
    if not path.is_file():
        parser.error(f"--resume {run_dir}: no checkpoint at {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # any unreadable file is the same mistake for the user
        parser.error(f"--resume {run_dir}: {path} is not a readable checkpoint ({type(e).__name__})")


def save_checkpoint(path: Path, state: dict) -> None:
    """Write to a temporary file in the same folder, fsync, then rename: readers never see a half-written file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def tokenizer_from_text(text: str) -> Tokenizer:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tokenizer.json"
        path.write_text(text, encoding="utf-8")
        return Tokenizer.load(path)


# -------------------------------------------------------------------------------------------------------------------
# devices


def pick_device(parser: argparse.ArgumentParser, name: str) -> str:
    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    if name == "auto":
        return "cuda" if cuda else "mps" if mps else "cpu"
    if (name == "cuda" and not cuda) or (name == "mps" and not mps):
        parser.error(f"--device {name} was asked for, but this machine has no {name.upper()} device; use --device cpu")
    return name


def autocast_context(parser: argparse.ArgumentParser, device: str, dtype: str):
    if dtype == "auto":
        dtype = "bfloat16" if device == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    if dtype == "float16" and device == "cpu":
        parser.error("--dtype float16 needs a GPU; use float32 or bfloat16 on the CPU")
    if dtype == "float32":
        return dtype, contextlib.nullcontext()
    return dtype, torch.autocast(device_type=device, dtype=getattr(torch, dtype))


# -------------------------------------------------------------------------------------------------------------------
# training pieces


def learning_rate(step: int, progress: float, args: argparse.Namespace) -> float:
    """Linear warmup over warmup_steps, then cosine decay to min_lr as `progress` goes from 0 to 1."""
    if step < args.warmup_steps:
        return args.learning_rate * (step + 1) / (args.warmup_steps + 1)
    progress = min(max(progress, 0.0), 1.0)
    return args.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (args.learning_rate - args.min_lr)


@torch.no_grad()
def estimate_loss(model: GPT, splits: data.Splits, args: argparse.Namespace, device: str, autocast) -> dict:
    """Mean loss over eval_iters batches of each split; the same batches at every call."""
    model.eval()
    losses = {}
    for offset, split in enumerate(("train", "val")):
        tokens = getattr(splits, split)
        generator = torch.Generator().manual_seed(args.seed + 1 + offset)
        total = 0.0
        for _ in range(args.eval_iters):
            x, y = data.get_batch(tokens, args.batch_size, args.block_size, generator, device)
            with autocast:
                _, loss = model(x, y)
            total += loss.item()
        losses[split] = total / args.eval_iters
    model.train()
    return losses


def bits_per_byte(loss: float, n_tokens: int, n_bytes: int) -> float:
    return loss * n_tokens / (math.log(2) * n_bytes)


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


class StopFlag:
    """First SIGINT/SIGTERM asks the loop to stop after the current step; a second SIGINT exits at once."""

    def __init__(self):
        self.requested = False

    def __call__(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            os._exit(EXIT_ABORTED)
        self.requested = True
        print(
            f"\n{signal.Signals(signum).name}: stopping after this step (Ctrl+C again to quit at once)",
            file=sys.stderr,
            flush=True,
        )

    def install(self) -> None:
        signal.signal(signal.SIGINT, self)
        signal.signal(signal.SIGTERM, self)


# -------------------------------------------------------------------------------------------------------------------
# main


def load_data(parser: argparse.ArgumentParser, args: argparse.Namespace, tokenizer: Tokenizer | None):
    cache_dir = Path(args.cache_dir).expanduser()
    try:
        if args.data == "tinystories":
            needed = args.max_steps * args.batch_size * args.grad_accum * (args.block_size + 1)
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
    for split in ("train", "val"):
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
        checkpoint = load_checkpoint(parser, args.resume)
        given = explicit_flags(parser, argv)
        for name in MODEL_FLAGS:
            if name in given and given[name] != checkpoint["args"][name]:
                parser.error(f"--{name} cannot change when resuming (the run has {checkpoint['args'][name]})")
        vars(args).update({**checkpoint["args"], **given})
        args.out_dir = args.resume
    elif args.eval_only:
        parser.error("--eval_only needs --resume RUN_DIR (the run to evaluate)")
    if args.n_embd % args.n_head:
        parser.error(f"--n_embd {args.n_embd} is not divisible by --n_head {args.n_head}")
    if args.min_lr > args.learning_rate:
        parser.error(f"--min_lr {args.min_lr} is above --learning_rate {args.learning_rate}")
    return args, checkpoint


def prepare_out_dir(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Path:
    out_dir = Path(args.out_dir or Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S"))
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=out_dir, prefix=".write-test")
        probe.close()
    except OSError as e:
        parser.error(f"--out_dir {out_dir} is not writable ({e.strerror})")
    return out_dir


def evaluate_only(args: argparse.Namespace, model: GPT, splits: data.Splits, device: str, autocast) -> None:
    """One deterministic pass over the whole validation split; the last line is what scripts read."""
    model.eval()
    total_nats, total_tokens = 0.0, 0
    with torch.no_grad():
        for x, y in data.iter_eval_batches(splits.val, args.batch_size, args.block_size):
            with autocast:
                _, loss = model(x.to(device), y.to(device))
            total_nats += loss.item() * y.numel()
            total_tokens += y.numel()
    loss = total_nats / total_tokens
    print(f"val_loss={loss:.6f} val_bpb={bits_per_byte(loss, total_tokens, splits.val_bytes):.6f}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args, checkpoint = resolve_args(parser, argv)
    device = pick_device(parser, args.device)
    dtype, autocast = autocast_context(parser, device, args.dtype)
    out_dir = None if args.eval_only else prepare_out_dir(parser, args)
    torch.manual_seed(args.seed)

    tokenizer = tokenizer_from_text(checkpoint["tokenizer"]) if checkpoint else None
    splits = load_data(parser, args, tokenizer)
    try:
        early_abort = (
            None if args.eval_only else compare.EarlyAbort.against(args, splits.tag, splits.tokenizer.fingerprint)
        )
    except compare.CompareError as e:
        parser.error(f"--baseline {args.baseline}: {e}")
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
    if checkpoint:
        model.load_state_dict(checkpoint["model"])
    if args.eval_only:
        evaluate_only(args, model, splits, device, autocast)
        return 0
    return train(args, checkpoint, model, splits, device, dtype, autocast, out_dir, early_abort)


def train(args, checkpoint, model, splits, device, dtype, autocast, out_dir: Path, early_abort=None) -> int:
    tokenizer = splits.tokenizer
    tokenizer_path = out_dir / "tokenizer.json"
    tokenizer.save(tokenizer_path)
    muon_lr = args.muon_lr if args.optimizer == "muon" else None
    betas = (args.beta1, args.beta2)
    optimizer = model.configure_optimizers(args.weight_decay, args.learning_rate, betas, device, muon_lr=muon_lr)
    batch_generator = torch.Generator().manual_seed(args.seed)
    step, best_val, best_train = 0, float("inf"), float("inf")
    if checkpoint:
        optimizer.load_state_dict(checkpoint["optimizer"])
        step, best_val = checkpoint["step"], checkpoint["best_val_loss"]
        batch_generator.set_state(checkpoint["rng"]["batches"])
        torch.set_rng_state(checkpoint["rng"]["torch"])
        if device == "cuda" and checkpoint["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(checkpoint["rng"]["cuda"])
    step_model = torch.compile(model) if args.compile else model
    scaler = torch.amp.GradScaler(enabled=dtype == "float16")

    task_name = args.task_name or args.comment or f"{splits.tag} {datetime.now():%Y-%m-%d %H:%M}"
    tracker = tracking.Tracker(
        project=args.project,
        task_name=task_name,
        tags=[splits.tag, *args.tags],
        comment=args.comment,
        flags=vars(args),
        offline=args.offline,
        continue_task_id=checkpoint.get("task_id") if checkpoint else None,
    )
    record = tracking.RunRecord(out_dir)
    record.start(tracker, vars(args), splits.tag, tokenizer.fingerprint, tokenizer.vocab_size, step, bool(checkpoint))
    abort_reason = None
    print(
        f"{model.num_params() / 1e6:.2f}M parameters, {len(splits.train):,} training tokens, device {device}, "
        f"dtype {dtype}, run folder {out_dir}",
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
            "rng": {
                "batches": batch_generator.get_state(),
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state() if device == "cuda" else None,
            },
        }

    def save() -> Path:
        path = out_dir / "ckpt.pt"
        save_checkpoint(path, checkpoint_state())
        return path

    def evaluate(final: bool = False) -> None:
        nonlocal best_val, abort_reason
        losses = estimate_loss(step_model, splits, args, device, autocast)
        bpb = bits_per_byte(losses["val"], len(splits.val), splits.val_bytes)
        tracker.report_scalar("Loss", "train", losses["train"], step)
        tracker.report_scalar("Loss", "val", losses["val"], step)
        tracker.report_scalar("BPB", "val", bpb, step)
        best_val = min(best_val, losses["val"])
        tqdm.write(f"step {step}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
        sample = generate_sample(model, tokenizer, args, device, autocast)
        tqdm.write(f"--- Generated Sample (step {step}) ---\n{sample}\n---")
        tracker.report_sample(sample, step)
        lr_now = learning_rate(step, step / (args.lr_decay_steps or args.max_steps), args)
        record.evaluation(step, step * tokens_per_step, losses["train"], losses["val"], bpb, lr_now, sample)
        if early_abort and not final and not abort_reason and (abort_reason := early_abort.check(step, losses["val"])):
            tracker.task.add_tags([compare.WORSE_THAN_BASELINE])
            stop.requested = True  # stop as Ctrl+C would: after this step, checkpoint kept, status aborted

    stop = StopFlag()
    stop.install()
    checkpoint_interval = args.checkpoint_interval or args.eval_interval
    decay_steps = args.lr_decay_steps or args.max_steps
    tokens_per_step = args.batch_size * args.grad_accum * args.block_size
    peak = peak_flops(device)
    status, message, exit_code = "completed", "", 0
    start, start_step = time.perf_counter(), step
    bar = tqdm(total=args.max_steps, initial=step, desc="training", dynamic_ncols=True, mininterval=1.0)
    while step < args.max_steps:
        elapsed = time.perf_counter() - start
        if args.max_seconds is not None and elapsed >= args.max_seconds:
            tqdm.write(f"--max_seconds {args.max_seconds:g} spent at step {step}")
            break
        if step % args.eval_interval == 0 and (step != start_step or checkpoint is None):
            evaluate()
        if step % checkpoint_interval == 0 and step != start_step:
            save()
        progress = step / decay_steps
        if args.max_seconds is not None:
            progress = max(progress, elapsed / args.max_seconds)
        lr = learning_rate(step, progress, args)
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * lr / args.learning_rate

        t0 = time.perf_counter()
        loss_sum = 0.0
        for _ in range(args.grad_accum):
            x, y = data.get_batch(splits.train, args.batch_size, args.block_size, batch_generator, device)
            with autocast:
                _, loss = step_model(x, y)
            scaler.scale(loss / args.grad_accum).backward()
            loss_sum += loss.item()
        if args.grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        step += 1

        train_loss = loss_sum / args.grad_accum
        tokens_per_s = tokens_per_step / (time.perf_counter() - t0)
        tracker.report_scalar("Train step", "loss", train_loss, step)
        tracker.report_scalar("Learning rate", "lr", lr, step)
        tracker.report_scalar("Throughput", "tokens/s", tokens_per_s, step)
        if peak:
            tracker.report_scalar("MFU", "percent", 100 * model.flops_per_token() * tokens_per_s / peak, step)
        bar.update(1)
        bar.set_postfix(loss=f"{train_loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)

        if not math.isfinite(train_loss) or (step > args.warmup_steps and train_loss > DIVERGENCE_FACTOR * best_train):
            status, exit_code = "failed", 1
            message = (
                f"training diverged at step {step}: loss {train_loss:.4g} (best {best_train:.4g}); "
                f"the last good checkpoint is kept in {out_dir}"
            )
            break
        best_train = min(best_train, train_loss)
        if stop.requested:
            status, exit_code, message = "aborted", EXIT_ABORTED, abort_reason or f"interrupted at step {step}"
            break
    bar.close()

    if status == "failed":
        print(message, file=sys.stderr)
    else:
        if status == "completed":
            evaluate(final=True)
        path = save()
        tracker.register_checkpoint(path, tokenizer_path, step)
        if status == "aborted":
            print(
                f"{message}; checkpoint saved to {path}\n  continue with: python main.py --resume {out_dir}",
                file=sys.stderr,
            )
    record.status(status, message, step)
    tracker.close(status, message)
    return exit_code


def peak_flops(device: str) -> float | None:
    """Dense bf16 peak of known GPUs, for MFU; None where no fair figure is known."""
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name()
    for key, flops in (("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("4090", 165e12), ("3090", 71e12)):
        if key in name:
            return flops
    return None


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("\ninterrupted before training started; nothing to save", file=sys.stderr)
        sys.exit(EXIT_ABORTED)
