"""
The flags: one table, the parser built from it, the checks across flags, and the run's configuration they become.

Design choices:
- Flags are nanoGPT's, snake_case, never abbreviated (`--lr` is an error, not `--lr_decay_steps`). Every one has a
  help text and a checked range, so a bad value is an argparse error (a short usage, then the error as the last
  line, exit 2), never a traceback. The table below is the one place a flag is defined.
- The configuration is a frozen dataclass with one field per flag (plus `world_size`). main.py resolves it once,
  before training: the defaults that follow other flags (`resolve_defaults`), what a resume keeps (`for_resume`),
  the vocabulary the text allows and the step count `--max_seconds` buys. Nothing changes it afterwards, and it is
  what run.json, the checkpoint and ClearML's Args record.
- A default that follows other flags is recorded as the value it resolved to (warmup 6 for a 60-step run), so a
  fresh run and its resumed twin record the same configuration, and a resumed run keeps its schedule.
- A resumed run takes its saved configuration, then the flags typed now: the model's shape, the vocabulary and the
  optimizer cannot change; flags about this invocation (`INVOCATION_FLAGS`) are never taken from the saved run.
"""

import argparse
import dataclasses
import math
import os
from datetime import datetime
from pathlib import Path
from typing import NamedTuple

import data
from errors import UsageError
from model import ARCH_DEFAULTS, ARCHS, GPTConfig, arch_default
from tokenizer import Tokenizer

WARMUP_STEPS, WARMUP_SHARE = 100, 0.1  # default warmup: 100 steps, but never more than this share of the run
MIN_LR_SHARE = 0.1  # default --min_lr: a tenth of --learning_rate, as nanoGPT's
# What a resumed run cannot change: the model's shape (every GPTConfig field but dropout) and the optimizer.
# The rates too: another rate can mean another number of optimizer groups, which the saved state would not fit.
FROZEN_FLAGS = (
    *(f.name for f in dataclasses.fields(GPTConfig) if f.name != "dropout"),
    "optimizer",
    "embedding_lr",
    "head_lr",
    "scalar_lr",
)
INVOCATION_FLAGS = (
    "resume",
    "new_data",
    "overwrite",
    "eval_only",
    "eval_split",
    "offline",
    "seeds",
    "sample",
    "num_samples",
)  # about this invocation, not the run: never taken from a saved run


class Number:
    """An argparse type: converts to `kind` (int or float) and checks low <= value <= high (strict when open)."""

    def __init__(self, kind: type, low=None, high=None, low_open: bool = False, high_open: bool = False):
        self.kind, self.low, self.high, self.low_open, self.high_open = kind, low, high, low_open, high_open
        self.__name__ = kind.__name__  # argparse names the type in its error messages

    def __call__(self, text: str):
        try:
            value = self.kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a valid {self.kind.__name__}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        too_low = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        too_high = self.high is not None and (value >= self.high if self.high_open else value > self.high)
        if too_low or too_high:
            lo = "" if self.low is None else f"{self.low} {'<' if self.low_open else '<='} "
            hi = "" if self.high is None else f" {'<' if self.high_open else '<='} {self.high}"
            raise argparse.ArgumentTypeError(f"{text} is out of range: must be {lo}value{hi}")
        return value


SEED_MAX = 2**63 - 1  # torch.manual_seed takes a signed 64-bit seed
POSITIVE_INT, COUNT = Number(int, 1), Number(int, 0)
POSITIVE = Number(float, 0, low_open=True)
FRACTION = Number(float, 0, 1, high_open=True)  # 0 <= value < 1


class Flag(NamedTuple):
    name: str
    default: object
    help: str
    type: object = None
    choices: tuple | None = None
    action: str | None = None  # "store_true", "bool" (--x / --no-x), or None for a value
    nargs: str | None = None
    metavar: str | None = None


FLAGS = {
    "data": [
        Flag("data", "tinystories", "'tinystories' (streamed over HTTP) or a path to a .txt file"),
        Flag("tinystories_url", os.environ.get("TINYSTORIES_URL", data.DEFAULT_TINYSTORIES_URL),
             "base URL of the TinyStories files (environment TINYSTORIES_URL)"),
        Flag("tinystories_version", "v1", "v1: TinyStories-{train,valid}.txt; v2: the TinyStoriesV2-GPT4 pair",
             choices=("v1", "v2")),
        Flag("val_fraction", 0.1, "tail of a local .txt file held out for validation",
             Number(float, 0, 0.5, low_open=True)),
        Flag("cache_dir", os.environ.get("GPT_FROM_SCRATCH_CACHE", "~/.cache/gpt-from-scratch"),
             "where tokenized data and tokenizers are cached (environment GPT_FROM_SCRATCH_CACHE)"),
        Flag("vocab_size", 4096, "BPE vocabulary size, trained from scratch on the training text",
             Number(int, 256 + len(Tokenizer.SPECIAL_TOKENS), 65536)),
        Flag("train_tokens", None, "tokens trained on, from the start of the training text (default: for "
             "TinyStories what --max_steps needs, for a file all of its training split; recorded)", POSITIVE_INT),
    ],
    "model": [
        Flag("arch", "modern", "modern: rotary, RMSNorm, QK-norm, ReLU², untied; gpt2: the plain GPT-2 block",
             choices=ARCHS),
        Flag("n_layer", 6, "transformer blocks", POSITIVE_INT),
        Flag("n_head", 6, "attention heads; must divide n_embd", POSITIVE_INT),
        Flag("n_embd", 384, "embedding width", POSITIVE_INT),
        Flag("block_size", 256, "context length in tokens", POSITIVE_INT),
        Flag("dropout", 0.0, "dropout rate", FRACTION),
        Flag("bias", False, "biases in linear layers and LayerNorm", action="bool"),
        Flag("zero_init_proj", False, "attention and MLP output projections start at zero, so each block starts as "
             "the identity (default: on with --arch modern)", action="bool"),
        Flag("zero_init_head", False, "the output head starts at zero, so the first prediction is uniform (not with "
             "--arch gpt2, whose head is tied)", action="bool"),
        Flag("embed_norm", False, "RMSNorm on the token embedding before the first block (default: on with --arch "
             "modern)", action="bool"),
        Flag("x0_mix", False, "each block's input is a learned mix of the residual stream and the embedding "
             "(default: on with --arch modern)", action="bool"),
        Flag("value_embeds", 0, "N value-embedding tables mixed into v of the first and last N layers (0: off; at "
             "most n_layer / 2)", COUNT),
        Flag("unet_skips", False, "learned skips from each early block's input to its mirrored late block",
             action="bool"),
        Flag("logit_softcap", 0.0, "squash the logits to cap * tanh(logits / cap); 0 is off (the speedrun uses "
             "15-30)", Number(float, 0)),
    ],
    "training": [
        Flag("batch_size", 32, "sequences per micro-batch (per process under torchrun)", POSITIVE_INT),
        Flag("grad_accum", 1, "micro-batches per optimizer step", POSITIVE_INT),
        Flag("max_steps", 5000, "optimizer steps", POSITIVE_INT),
        Flag("max_seconds", None, "a training budget in seconds: turned into --max_steps by timing a few steps "
             "first (recorded)", POSITIVE),
        Flag("learning_rate", 1e-3, "peak AdamW learning rate", POSITIVE),
        Flag("min_lr", None, f"learning rate at the end of the decay (default: {MIN_LR_SHARE:g} x learning_rate)",
             Number(float, 0)),
        Flag("warmup_steps", None, f"linear warmup steps (default: {WARMUP_STEPS}, at most "
             f"{WARMUP_SHARE * 100:.0f}%% of max_steps)", COUNT),
        Flag("lr_decay_steps", None, "steps over which the learning rate decays (default: max_steps)", POSITIVE_INT),
        Flag("optimizer", "muon", "muon: Muon for hidden matrices, AdamW for embeddings and vectors; adamw: AdamW "
             "for all", choices=("muon", "adamw")),
        Flag("muon_lr", 0.02, "peak Muon learning rate", POSITIVE),
        Flag("embedding_lr", None, "peak AdamW rate of the token, position and value embeddings (default: "
             "--learning_rate)", POSITIVE),
        Flag("head_lr", None, "peak AdamW rate of the untied output head (default: --learning_rate)", POSITIVE),
        Flag("scalar_lr", None, "peak AdamW rate of vectors and scalars: norm weights, biases, the learned mixes "
             "(default: --learning_rate)", POSITIVE),
        Flag("weight_decay", 0.1, "AdamW weight decay on matrices", Number(float, 0)),
        Flag("beta1", 0.9, "AdamW beta1", FRACTION),
        Flag("beta2", 0.95, "AdamW beta2", FRACTION),
        Flag("grad_clip", 1.0, "max gradient norm; 0 disables", Number(float, 0)),
        Flag("seed", 1337, "seed for weights, batches and dropout", Number(int, 0, SEED_MAX)),
    ],
    "evaluation and sampling": [
        Flag("eval_interval", 250, "steps between evaluations", POSITIVE_INT),
        Flag("eval_iters", 50, "batches per split per evaluation", POSITIVE_INT),
        Flag("log_interval", 10, "steps between reading the loss off the device", POSITIVE_INT),
        Flag("eval_only", False, "with --resume RUN_DIR and --data FILE: one pass over FILE's --eval_split, "
             "recorded in the run, then exit", action="store_true"),
        Flag("eval_split", "val", "with --eval_only: the validation split of --data, or all of it (a held-out "
             "file)", choices=("val", "all")),
        Flag("prompt", "Once upon a time", "start of the generated sample"),
        Flag("sample_tokens", 100, "tokens generated per sample", COUNT),
        Flag("temperature", 0.8, "sampling temperature; 0 is greedy", Number(float, 0)),
        Flag("top_k", 50, "sample only from the k likeliest tokens", POSITIVE_INT),
        Flag("baseline", None, "a run folder or ClearML offline session on the same data: stop this run when "
             "clearly worse", metavar="RUN"),
        Flag("abort_after", 0.2, "with --baseline: fraction of max_steps before a run may be stopped",
             Number(float, 0, 1)),
        Flag("abort_margin", 0.03, "with --baseline: stop when Loss/val is this much worse (relative) at two "
             "evaluations in a row", Number(float, 0)),
        Flag("abort_noise", 3.0, "with --baseline of two or more seeds: stop only when also worse than their mean by "
             "this many standard deviations of the seeds", Number(float, 0)),
    ],
    "system": [
        Flag("device", "auto", "auto picks CUDA, then MPS, then CPU", choices=("auto", "cpu", "cuda", "mps")),
        Flag("dtype", "auto", "autocast dtype; auto is bfloat16 on CUDA when supported, else float32",
             choices=("auto", "float32", "bfloat16", "float16")),
        Flag("compile", None, "compile the model and Muon's update with torch.compile (default: on for CUDA, off "
             "on CPU and MPS)", action="bool"),
    ],
    "tracking": [
        Flag("comment", "", "the hypothesis this run tests; also names the ClearML task"),
        Flag("project", "gpt-from-scratch", "ClearML project"),
        Flag("task_name", None, "ClearML task name (default: the comment, else dataset and time)"),
        Flag("tags", [], "extra ClearML tags", nargs="*"),
        Flag("offline", False, "track in ClearML's offline mode even if a server is set", action="store_true"),
        Flag("queue", None, "create the task, then hand it to the clearml-agents that listen on this queue "
             "(needs a ClearML server)", metavar="NAME"),
    ],
    "output": [
        Flag("out_dir", None, "run folder for the checkpoint (default: runs/<time>)"),
        Flag("resume", None, "continue the run saved in RUN_DIR", metavar="RUN_DIR"),
        Flag("new_data", False, "with --resume: allow training on another --data than the run's",
             action="store_true"),
        Flag("overwrite", False, "start a new run in an --out_dir that holds one, replacing it",
             action="store_true"),
        Flag("checkpoint_interval", None, "steps between checkpoints (default: eval_interval)", POSITIVE_INT),
    ],
    "modes": [
        Flag("seeds", None, "run this configuration once per seed, one after another, each in its own run folder "
             "inside one group folder (--out_dir) and its own ClearML task, all tagged with the group",
             Number(int, 0, SEED_MAX), nargs="+", metavar="SEED"),
        Flag("sample", False, "with --resume RUN_DIR: generate from the trained model with --prompt and exit; "
             "nothing is written", action="store_true"),
        Flag("num_samples", 1, "with --sample: how many samples to generate", Number(int, 1, 1000)),
        Flag("reproduce", None, "rerun a recorded run (folder, offline session or task id) from its own code and "
             "compare every evaluation (main.py --reproduce RUN --help for its options)", metavar="RUN"),
    ],
}  # fmt: skip
ALL_FLAGS = [flag for group in FLAGS.values() for flag in group]

Config = dataclasses.make_dataclass(
    "Config", [(flag.name, object) for flag in ALL_FLAGS] + [("world_size", int, 1)], frozen=True
)
Config.__doc__ = "The run's configuration: one field per flag, and the number of processes; read-only."


class Parser(argparse.ArgumentParser):
    """argparse with a short usage line: the full list of flags is what --help is for."""

    def format_usage(self) -> str:
        return f"usage: {self.prog} [--FLAG VALUE ...]   ({self.prog} --help lists every flag)\n"


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="main.py",
        description="Train a GPT from scratch, tracked in ClearML.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        allow_abbrev=False,
    )
    for title, flags in FLAGS.items():
        group = parser.add_argument_group(title)
        for flag in flags:
            options = dict(default=flag.default, help=flag.help)
            if flag.action == "bool":
                options["action"] = argparse.BooleanOptionalAction
            elif flag.action:
                options["action"] = flag.action
            else:
                options.update(type=flag.type, choices=flag.choices, nargs=flag.nargs, metavar=flag.metavar)
            group.add_argument(f"--{flag.name}", **options)
    return parser


def typed_flags(parser: argparse.ArgumentParser, argv: list[str]) -> dict:
    """The flags the user typed, with their values, ignoring defaults."""
    saved = {a.dest: a.default for a in parser._actions}
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    try:
        return vars(parser.parse_args(argv))
    finally:
        for action in parser._actions:
            action.default = saved[action.dest]


def value_types() -> dict[str, type]:
    """The value type of every flag: a flag left unset is recorded empty with its type (see tracking.py)."""

    def value_type(flag: Flag) -> type:
        if flag.action:
            return bool
        if flag.nargs:
            return list
        return getattr(flag.type, "kind", None) or flag.type or type(flag.default or "")

    return {flag.name: value_type(flag) for flag in ALL_FLAGS}


BOOL_FLAGS = [flag.name for flag in ALL_FLAGS if flag.action == "bool"]


def parse(argv: list[str]) -> tuple[Config, dict]:
    """The configuration as typed (defaults for the rest), and the flags typed; argparse exits 2 on a bad value."""
    parser = build_parser()
    values, typed = vars(parser.parse_args(argv)), typed_flags(parser, argv)
    # Under clearml-agent, ClearML's argparse binding gives a --x/--no-x flag that the task holds True as [True].
    values |= {name: values[name][0] for name in BOOL_FLAGS if isinstance(values[name], list) and values[name]}
    # The techniques that follow --arch, unless typed.
    values |= {name: arch_default(values["arch"], name) for name in ARCH_DEFAULTS["modern"] if name not in typed}
    return Config(**values), typed


def for_resume(typed_now: Config, typed: dict, saved: dict) -> Config:
    """A resumed run's configuration: the saved one, then the flags typed now (flags about this invocation
    always come from now). UsageError for a flag that cannot change."""
    for name in FROZEN_FLAGS:
        if name in typed and typed[name] != saved.get(name):
            raise UsageError(f"--{name} cannot change when resuming (the run has {saved.get(name)})")
    if "data" in typed and typed["data"] != saved.get("data") and not (typed_now.eval_only or typed_now.new_data):
        raise UsageError(
            f"--data {typed['data']}: the run in {typed_now.resume} trained on {saved.get('data')}; resuming on "
            "other data needs --new_data"
        )
    if "out_dir" in typed and Path(typed["out_dir"]).resolve() != Path(typed_now.resume).resolve():
        raise UsageError("--out_dir cannot differ from --resume RUN_DIR: a resumed run stays in its folder")
    fields = {f.name for f in dataclasses.fields(Config)}
    kept = {k: v for k, v in saved.items() if k in fields and k not in INVOCATION_FLAGS}
    now = {name: getattr(typed_now, name) for name in INVOCATION_FLAGS}
    return dataclasses.replace(typed_now, **{**kept, **typed, **now, "out_dir": typed_now.resume})


def check(cfg: Config) -> None:
    """The checks across flags; UsageError for the first that fails."""
    if cfg.eval_only and not cfg.resume:
        raise UsageError("--eval_only needs --resume RUN_DIR (the run to evaluate)")
    if cfg.sample and not cfg.resume:
        raise UsageError("--sample needs --resume RUN_DIR (the run to generate from)")
    if cfg.eval_split == "all" and (not cfg.eval_only or cfg.data == "tinystories"):
        raise UsageError("--eval_split all scores a whole local file: it needs --eval_only and --data FILE")
    if cfg.n_embd % cfg.n_head:
        raise UsageError(f"--n_embd {cfg.n_embd} is not divisible by --n_head {cfg.n_head}")
    model_config(cfg, cfg.vocab_size)  # the model's own checks of its techniques (UsageError)
    if cfg.head_lr is not None and cfg.arch == "gpt2":
        raise UsageError("--head_lr needs an untied head: --arch gpt2 ties it to the token embedding")
    if cfg.baseline and cfg.out_dir and Path(cfg.baseline).resolve() == Path(cfg.out_dir).resolve():
        raise UsageError(f"--baseline {cfg.baseline} is this run's own --out_dir: a run cannot be its own baseline")
    if cfg.min_lr is not None and cfg.min_lr > cfg.learning_rate:
        raise UsageError(f"--min_lr {cfg.min_lr} is above --learning_rate {cfg.learning_rate}")


def model_config(cfg: Config, vocab_size: int) -> GPTConfig:
    """The model the configuration describes: every GPTConfig field is the flag of the same name."""
    shape = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(GPTConfig) if f.name != "vocab_size"}
    return GPTConfig(vocab_size=vocab_size, **shape)


def dataset_tag(data_flag: str) -> str:
    """What the run is tagged with: `tinystories`, or the local file's name."""
    return "tinystories" if data_flag == "tinystories" else Path(data_flag).name


def resolve_defaults(cfg: Config, device: str) -> Config:
    """The defaults that follow other flags, as values: recorded so, they stay put when the run is resumed.
    Those that follow the step count wait for it (`resolve_schedule`)."""
    return dataclasses.replace(
        cfg,
        min_lr=cfg.learning_rate * MIN_LR_SHARE if cfg.min_lr is None else cfg.min_lr,
        checkpoint_interval=cfg.checkpoint_interval or cfg.eval_interval,
        compile=device == "cuda" if cfg.compile is None else cfg.compile,
        task_name=cfg.task_name or cfg.comment or f"{dataset_tag(cfg.data)} {datetime.now():%Y-%m-%d %H:%M}",
    )


def resolve_schedule(cfg: Config, max_steps: int) -> Config:
    """The step count (--max_seconds may have fixed it) and the schedule's defaults that follow it."""
    warmup = min(WARMUP_STEPS, int(WARMUP_SHARE * max_steps)) if cfg.warmup_steps is None else cfg.warmup_steps
    return dataclasses.replace(
        cfg, max_steps=max_steps, warmup_steps=warmup, lr_decay_steps=cfg.lr_decay_steps or max_steps
    )


def as_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def configuration(argv: list[str], device: str = "cpu") -> Config:
    """The configuration `argv` gives a fresh run on `device`, every default resolved (for scripts and tests)."""
    cfg, _ = parse(argv)
    check(cfg)
    cfg = resolve_defaults(cfg, device)
    return resolve_schedule(cfg, cfg.max_steps)


def to_argv(values: dict) -> list[str]:
    """The command line that gives these flag values (the inverse of `parse` for the flags given)."""
    argv = []
    for flag in ALL_FLAGS:
        if flag.name not in values or values[flag.name] is None:
            continue
        value = values[flag.name]
        if flag.action == "store_true":
            argv += [f"--{flag.name}"] if value else []
        elif flag.action == "bool":
            argv.append(f"--{flag.name}" if value else f"--no-{flag.name}")
        elif flag.nargs:
            argv += [f"--{flag.name}", *map(str, value)]
        else:
            argv += [f"--{flag.name}", repr(value) if isinstance(value, float) else str(value)]
    return argv
