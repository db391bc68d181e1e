"""
Train a GPT from scratch on TinyStories or a local .txt file, one hypothesis per run, tracked in ClearML.

    python main.py --data tinystories --dropout 0.3 --comment "Hypothesis: more dropout lowers val loss"

Design choices:
- This file is the entry point: it resolves the run's configuration, wires the pieces together, hands over to the
  loop (loop.py) and turns the outcome into an exit code. Flags live in flags.py, the loop's state in state.py,
  evaluation in evaluation.py, the time budget in budget.py, signals and outcomes in ending.py.
- The configuration is resolved once, here, before training, and read-only after: the flags as typed, a resumed
  run's saved configuration, the flags as the ClearML task holds them (under clearml-agent, as edited in the web
  UI), the defaults that follow other flags, the vocabulary the text allows and the step count --max_seconds
  buys. run.json, the checkpoint and ClearML's Args record exactly that.
- The ClearML task starts once the flags are checked, so its console holds everything the run prints, data
  preparation included.
- A user's mistake found at any point raises errors.UsageError; it becomes one line and exit code 2 here, and a
  task already started is closed as failed, quietly, so that line stays the last.
- Under torchrun (distributed.py) the same program trains one model in DistributedDataParallel; the main process
  alone owns the run folder, the task and the record; the configuration is the main process's.
"""

import os
import signal
import sys

EXIT_STOPPED = 130

if __name__ == "__main__":  # a signal while the imports below load: nothing to save yet, and no traceback

    def quit_while_starting(signum, frame):
        print(f"{signal.Signals(signum).name}: stopped while starting; nothing was written", file=sys.stderr)
        os._exit(EXIT_STOPPED)

    signal.signal(signal.SIGINT, quit_while_starting)
    signal.signal(signal.SIGTERM, quit_while_starting)

import dataclasses
import errno
import gc
import uuid
from pathlib import Path

if __name__ == "__main__":
    gc.disable()  # until the imports are done: see the gc.freeze() after them

# Before torch allocates anything: large CPU tensors on transparent huge pages, so the fresh (tokens x vocab)
# buffers of every step do not fault in 4 KB at a time (Linux only; bench/bench_train_step.py --default_allocator).
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import numpy as np
import torch

import budget
import checkpoint as ckpt
import compare
import data
import devices
import distributed
import ending
import evaluation
import flags
import loop
import provenance
import records
import reproduce
import seeds
import tracking
from ending import StopFlag, say
from errors import UsageError
from flags import Config
from model import GPT, enable_tf32
from state import TrainState
from tokenizer import Tokenizer

if __name__ == "__main__":
    # What the imports made lives as long as the process. Frozen, no garbage collection walks it again: collecting
    # while torch imports, and over torch's objects while torch._dynamo imports (at the first optimizer), made
    # every start 0.75 s slower (bench/bench_process.py).
    gc.freeze()
    gc.enable()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if reproduce.requested(argv):
        return reproduce.main(argv, flags.build_parser())
    stop = StopFlag()
    stop.install()
    try:
        typed_now, _ = flags.parse(argv)
        if typed_now.seeds or seeds.is_group(typed_now.resume):  # before a process group: torchrun is refused
            return seeds.start(argv)
        distributed.setup()
        return run(argv, stop)
    except UsageError as e:
        flags.build_parser().error(records.terminal_text(str(e)))  # a short usage, then the line; exit 2
    except OSError as e:  # before training: the disk is full (the token cache), or another I/O error
        say(
            f"{e.strerror or e}; nothing was trained"
            if e.errno == errno.ENOSPC
            else f"I/O error: {e}; nothing was trained"
        )
        return ending.EXIT_IO
    except KeyboardInterrupt:
        say("interrupted before training started; nothing to save")
        return EXIT_STOPPED


def run(argv: list[str], stop: StopFlag) -> int:
    cfg, saved, machine, probing = configure(argv)
    if cfg.eval_only:
        return score_only(cfg, saved, machine)
    if cfg.sample:
        return sample_only(cfg, saved, machine)
    if saved is not None and saved["step"] >= cfg.max_steps and not probing:
        say(f"the run in {cfg.resume} has trained its {saved['step']} steps: nothing to do (give a larger "
            "--max_steps, or --max_seconds, to train on)")  # fmt: skip
        return ending.EXIT_DONE
    folder = ckpt.RunFolder.claim(cfg.out_dir, saved is not None, cfg.overwrite) if distributed.is_main() else None
    # The task starts once the flags are checked, so its console holds everything below.
    tracker = start_tracking(cfg, saved) if distributed.is_main() else tracking.NoTracker()
    stop.install()  # again: Task.init hooks SIGTERM to close the task first, which can hang; ours decide
    try:
        run_, state = prepare(cfg, saved, machine, probing, folder, tracker, stop)
    except (UsageError, OSError):  # its line stays the last: the task closes quietly
        tracker.close("failed", "refused before training", quiet=True)
        raise
    except KeyboardInterrupt:
        tracker.close("aborted", "interrupted before training started", quiet=True)
        raise
    result = loop.run_training(run_, state)
    stop.closing = True
    run_.record.status(result.status, result.line, state.step)
    tracker.close(result.status, result.line)
    if result.status != "completed":
        say(result.message)  # last, after ClearML's own lines: what happened and what was kept
    return result.exit_code


def configure(argv: list[str]) -> tuple[Config, dict | None, devices.Machine, bool]:
    """The flags as typed over a resumed run's saved configuration, checked, with their defaults; the machine;
    and whether --max_seconds is to be turned into a step count."""
    cfg, typed = flags.parse(argv)
    saved = ckpt.load(cfg.resume) if cfg.resume else None
    if saved is not None:
        cfg = flags.for_resume(cfg, typed, saved["args"])
    flags.check(cfg)
    machine = check_system(cfg)
    cfg = dataclasses.replace(flags.resolve_defaults(cfg, machine.device), world_size=distributed.world_size())
    probing = cfg.max_seconds is not None and (saved is None or "max_seconds" in typed)
    return cfg, saved, machine, probing


def check_system(cfg: Config) -> devices.Machine:
    """The flags about this machine, how the program was started and the data file."""
    machine = devices.Machine(device := devices.pick_device(cfg.device), devices.pick_dtype(device, cfg.dtype))
    if cfg.data != "tinystories":
        data.check_text_file(Path(cfg.data).expanduser().resolve())
    if device == "cuda":
        enable_tf32()
    if distributed.world_size() > 1 and cfg.queue:
        raise UsageError("--queue hands the run to a clearml-agent: start it with python main.py, not torchrun")
    if distributed.world_size() > 1 and device == "mps":
        raise UsageError("under torchrun the processes train on CUDA GPUs or on the CPU: use --device cpu here")
    if cfg.queue and (cfg.offline or tracking.configured_server() is None):
        raise UsageError(f"--queue {cfg.queue} needs a ClearML server: run clearml-init or set CLEARML_API_HOST")
    return machine


def start_tracking(cfg: Config, saved: dict | None):
    return tracking.Tracker(
        project=cfg.project,
        task_name=cfg.task_name,
        tags=[flags.dataset_tag(cfg.data), *cfg.tags],
        comment=cfg.comment,
        offline=cfg.offline,
        continue_task_id=saved.get("task_id") if saved else None,
    )


def adopt_connected(cfg: Config, tracker, folder, saved: dict | None, machine: devices.Machine):
    """The configuration as the task holds it (under clearml-agent, edited in the web UI), checked again where it
    changed; the same on every process."""
    connected = tracker.connect(flags.as_dict(cfg), flags.value_types()) if distributed.is_main() else None
    connected = Config(**distributed.share(connected))
    if connected == cfg:
        return cfg, folder, machine
    flags.check(connected)
    machine = check_system(connected)
    if folder is not None and connected.out_dir != cfg.out_dir:
        folder.release()
        folder = ckpt.RunFolder.claim(connected.out_dir, saved is not None, connected.overwrite)
    return connected, folder, machine


def prepare(cfg: Config, saved, machine: devices.Machine, probing: bool, folder, tracker, stop: StopFlag):
    """From the checked flags to the loop's Run and the training state, the configuration made final on the way:
    as the task holds it, the vocabulary the text allows, the step count --max_seconds buys."""
    cfg, folder, machine = adopt_connected(cfg, tracker, folder, saved, machine)
    if cfg.queue:
        tracker.enqueue(cfg.queue)  # ends this process, unless it is the agent that runs the task
    splits = load_data(cfg, Tokenizer.from_json(saved["tokenizer"]) if saved else None)
    # The text may allow fewer merges than asked; the training tokens as used.
    cfg = dataclasses.replace(cfg, vocab_size=splits.tokenizer.vocab_size, train_tokens=len(splits.train))
    state = build_state(cfg, splits, saved, machine)
    # One graph of fixed shapes, so a graph break or a recompile is an error, not a silent slowdown; sampling runs
    # on the model itself (its growing sequence would recompile at every length).
    eval_model = torch.compile(state.model, fullgraph=True, dynamic=False) if cfg.compile else state.model
    step_model = distributed.wrap(eval_model, machine.device)  # DDP for the training steps only
    max_steps = cfg.max_steps
    if probing:
        with stop.allowing_interrupts():
            max_steps, line = budget.steps_for(cfg, state, step_model, eval_model, splits, machine)
        print(line, flush=True)
    cfg = flags.resolve_schedule(cfg, max_steps)
    if distributed.is_main():  # what really happens: the tracking mode, the run folder
        cfg = dataclasses.replace(cfg, offline=tracker.offline, out_dir=str(folder.path))
    cfg = Config(**distributed.share(flags.as_dict(cfg)))  # final: the main process's, on every process
    try:
        early_abort = compare.EarlyAbort.against(cfg, splits.tag, splits.tokenizer.fingerprint)
    except compare.CompareError as e:
        raise UsageError(f"--baseline {cfg.baseline}: {e}") from None
    record, checkpoints = begin(cfg, saved, state, splits, machine, tracker, folder)
    run_ = loop.Run(
        cfg=cfg, machine=machine, splits=splits, step_model=step_model, eval_model=eval_model, tracker=tracker,
        record=record, stop=stop, checkpoints=checkpoints, early_abort=early_abort, resumed=saved is not None,
    )  # fmt: skip
    return run_, state


def load_data(cfg: Config, tokenizer: Tokenizer | None) -> data.Splits:
    """The run's text, tokenized; the training split cut to --train_tokens (for TinyStories, by default, to what
    --max_steps needs, whatever earlier runs left in the cache), so what a run trains on follows its flags alone."""
    cache_dir = Path(cfg.cache_dir).expanduser()
    with distributed.main_first():  # the tokenizer and the token cache are made once, by the main process
        if cfg.data == "tinystories":
            sequences = cfg.batch_size * cfg.grad_accum * distributed.world_size()  # per step, all processes
            wanted = (
                cfg.train_tokens or int(cfg.max_steps * sequences * (cfg.block_size + 1) * 1.1) + 10 * cfg.block_size
            )
            splits = data.load_tinystories(
                base_url=cfg.tinystories_url, version=cfg.tinystories_version, vocab_size=cfg.vocab_size,
                train_tokens=wanted, cache_dir=cache_dir, tokenizer=tokenizer,
            )  # fmt: skip
        else:
            wanted = cfg.train_tokens
            splits = data.load_text_file(cfg.data, vocab_size=cfg.vocab_size, val_fraction=cfg.val_fraction,
                                         cache_dir=cache_dir, tokenizer=tokenizer)  # fmt: skip
    if cfg.train_tokens and len(splits.train) < cfg.train_tokens and not cfg.eval_only:
        raise UsageError(f"--train_tokens {cfg.train_tokens}: the training text of --data {cfg.data} has only "
                         f"{len(splits.train):,} tokens")  # fmt: skip
    splits = dataclasses.replace(splits, train=splits.train[:wanted] if wanted else splits.train)
    window = cfg.block_size + 1
    for split in ("val",) if cfg.eval_only else ("train", "val"):
        if (n := len(getattr(splits, split))) < window:
            raise UsageError(
                f"--data {cfg.data}: its {split} split has {n} tokens, fewer than one training window of "
                f"block_size + 1 = {window}; use a bigger file or a smaller --block_size"
            )
    return splits


def build_model(cfg: Config, vocab_size: int, machine: devices.Machine, weights: dict | None, training: bool = True):
    """The model the configuration describes, on the device, with the saved weights when resuming; for training,
    a batch whose step cannot fit in the device's memory is refused up front."""
    model = GPT(flags.model_config(cfg, vocab_size)).to(machine.device)
    dtype = getattr(torch, machine.dtype)
    needed = model.training_memory(cfg.batch_size, dtype, weights_on_device=True)  # free memory leaves them out
    free = devices.available_memory(machine.device)
    if training and free is not None and needed > free:
        raise UsageError(
            f"--batch_size {cfg.batch_size} with --block_size {cfg.block_size}: a training step needs about "
            f"{needed / 2**30:.1f} GiB, and {machine.device} has {free / 2**30:.1f} GiB free; use a smaller "
            "--batch_size (and --grad_accum for the same batch) or a smaller model"
        )
    if weights is not None:
        try:
            model.load_state_dict(weights)
        except RuntimeError:
            raise UsageError(f"--resume {cfg.resume}: its weights do not fit its recorded model shape") from None
    return model


def build_optimizer(model: GPT, cfg: Config, device: str) -> torch.optim.Optimizer:
    return model.configure_optimizers(
        cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), device,
        muon_lr=cfg.muon_lr if cfg.optimizer == "muon" else None, compile_muon=cfg.compile,
        embedding_lr=cfg.embedding_lr, head_lr=cfg.head_lr, scalar_lr=cfg.scalar_lr,
    )  # fmt: skip


def build_state(cfg: Config, splits: data.Splits, saved: dict | None, machine: devices.Machine) -> TrainState:
    """The training state: new (weights from --seed) or the saved one, whole."""
    torch.manual_seed(cfg.seed + distributed.rank())  # weights come from the main process (DDP broadcasts them)
    model = build_model(cfg, splits.tokenizer.vocab_size, machine, None)
    optimizer = build_optimizer(model, cfg, machine.device)
    scaler = torch.amp.GradScaler(enabled=machine.dtype == "float16")
    batches = data.Batches(
        splits.train,
        cfg.batch_size,
        cfg.block_size,
        cfg.seed,
        machine.device,
        part=distributed.rank(),
        parts=distributed.world_size(),
    )
    state = TrainState(model, optimizer, scaler, batches, machine.device, cfg.seed)
    if saved is not None:
        try:
            state.load_state_dict(saved)
        except RuntimeError as e:  # load_state_dict's own report: the first line that names a tensor
            named = [line.strip() for line in str(e).splitlines() if "size mismatch" in line or "key(s)" in line]
            detail = (named or [type(e).__name__])[0][:200]
            raise UsageError(
                f"--resume {cfg.resume}: its weights do not fit its recorded model shape ({detail})"
            ) from None
        except (ValueError, KeyError, IndexError, TypeError) as e:
            detail = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise UsageError(f"--resume {cfg.resume}: its state does not fit this program's model and optimizer "
                             f"({detail})") from None  # fmt: skip
    return state


def begin(cfg: Config, saved, state: TrainState, splits: data.Splits, machine: devices.Machine, tracker, folder):
    """Everything is checked: the old run is replaced (--overwrite), the record and the task get the final
    configuration. Returns the record and the checkpoints the loop writes."""
    run_id = saved["run_id"] if saved else uuid.uuid4().hex
    main_process = distributed.is_main()
    record = tracking.RunRecord(folder.path) if main_process else tracking.NoTracker()
    if main_process:
        folder.replace_old_run()
        data.write_atomic(folder.path / "tokenizer.json", splits.tokenizer.to_json().encode())
        tracker.update_flags(flags.as_dict(cfg))
        header = record_header(cfg, run_id, state.model, splits, machine)
        recorded = provenance.capture(cfg.data, splits.sources, machine.device, machine.dtype)
        record.start(tracker, header, state.step, bool(saved), provenance=recorded)
    header = {"run_id": run_id, "args": flags.as_dict(cfg), "model_config": dataclasses.asdict(state.model.config),
              "tokenizer": splits.tokenizer.to_json(), "task_id": tracker.task_id}  # fmt: skip
    checkpoints = ckpt.Checkpoints(folder.path if main_process else None, header, saved["step"] if saved else None)
    return record, checkpoints


def record_header(cfg: Config, run_id: str, model: GPT, splits: data.Splits, machine: devices.Machine) -> dict:
    """What run.json says was trained: the configuration, the data, the model's size, the machine."""
    return {
        "run_id": run_id,
        "flags": flags.as_dict(cfg),
        "dataset": splits.tag,
        "tokenizer": {"fingerprint": splits.tokenizer.fingerprint, "vocab_size": splits.tokenizer.vocab_size},
        "model": {"parameters": model.num_params(), "flops_per_token": model.flops_per_token()},
        "device": machine.name,
        "dtype": machine.dtype,
        "world_size": cfg.world_size,
    }


def score_only(cfg: Config, saved: dict, machine: devices.Machine) -> int:
    """--eval_only: one pass over a split of --data, recorded in the run's folder and its task; the score line
    is the last line on stdout, which is what scripts read."""
    folder = ckpt.RunFolder.claim(cfg.resume, resuming=True, overwrite=False) if distributed.is_main() else None
    splits = load_data(cfg, Tokenizer.from_json(saved["tokenizer"]))
    model = build_model(cfg, splits.tokenizer.vocab_size, machine, saved["model"])
    tokens, n_bytes = splits.val, splits.val_bytes
    if cfg.eval_split == "all":  # a local file: its training split is the bytes before the validation split
        tokens, n_bytes = np.concatenate([splits.train, splits.val]), Path(cfg.data).stat().st_size
    scores = evaluation.score(model, tokens, n_bytes, splits.tokenizer, cfg, machine.device, machine.autocast())
    if folder is not None:
        tracking.RunRecord(folder.path).scored(saved["step"], cfg.data, cfg.eval_split, scores["loss"], scores["bpb"])
        tracker = start_tracking(cfg, saved)
        tracker.report_score(f"{flags.dataset_tag(cfg.data)} {cfg.eval_split}", scores, saved["step"])
        tracker.close("completed")
    print(f"val_loss={scores['loss']:.6f} val_bpb={scores['bpb']:.6f}", flush=True)
    return ending.EXIT_DONE


def sample_only(cfg: Config, saved: dict, machine: devices.Machine) -> int:
    """--sample: --num_samples continuations of --prompt from the run's model, printed; nothing is written."""
    tokenizer = Tokenizer.from_json(saved["tokenizer"], "the checkpoint's tokenizer")
    model = build_model(cfg, tokenizer.vocab_size, machine, saved["model"], training=False)
    texts = evaluation.generate_samples(model, tokenizer, cfg, machine.device, machine.autocast(), cfg.num_samples)
    for i, text in enumerate(texts, 1):
        print(f"--- sample {i} of {len(texts)} (step {saved['step']}, seed {cfg.seed}) ---", flush=True)
        print(tracking.clean_sample(text), flush=True)
    return ending.EXIT_DONE


if __name__ == "__main__":
    try:
        code = main()
    finally:
        # The process ends here: its objects need no last garbage collection, which takes 0.8 s over the objects
        # torch._dynamo and sympy leave. Frozen, they are only freed; every run ends that much sooner. Not under
        # torchrun: there the collection ends the process group's threads, and without it a rank aborted at exit.
        if distributed.world_size() == 1:
            gc.freeze()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the run is over: a late signal changes nothing now
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sys.exit(code)
