"""
The training loop over one training state: steps, evaluations, checkpoints, and how the loop ends.

Design choices:
- The loop reads top-down (`train`): evaluate when due, checkpoint when due, one optimizer step, and once per
  `--log_interval` read the losses off the device, report them and decide whether to stop. Everything that
  changes is in the TrainState (state.py); everything fixed for the run is in `Run`.
- The learning rate warms up linearly over warmup_steps, then decays on a cosine from the end of warmup to min_lr
  at lr_decay_steps.
- The training step never waits for the device: losses stay on it and are read once per `--log_interval`, where
  throughput is measured with the clock synchronized; evaluations, checkpoints and the first (compiling) step are
  not timed.
- Divergence: a non-finite training loss, or after warmup one above DIVERGENCE_FACTOR times the best so far.
- Under torchrun every process trains its part of each batch (data.py); losses are averaged over processes before
  anything is decided from them, and every process stops at the same step.
- How the loop ends is an Outcome (outcome.py); `run_training` turns whatever escapes the loop (an interrupted
  evaluation, a second Ctrl+C, weights no longer finite, a failure from outside) into one.
"""

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

import checkpoint as ckpt
import compare
import data
import devices
import distributed
import ending
import tracking
from ending import Outcome, QuitNow, StopFlag
from evaluation import bits_per_byte, estimate_loss, generate_sample, text_only
from state import TrainState

DIVERGENCE_FACTOR = 2.0  # a training loss above this multiple of the best one (after warmup) means divergence


def learning_rate(step: int, cfg) -> float:
    """Linear warmup over warmup_steps, then a cosine from the end of warmup down to min_lr at lr_decay_steps."""
    if step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / (cfg.warmup_steps + 1)
    decay_steps = (cfg.lr_decay_steps or cfg.max_steps) - cfg.warmup_steps
    progress = min(max((step - cfg.warmup_steps) / max(decay_steps, 1), 0.0), 1.0)
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.learning_rate - cfg.min_lr)


def set_learning_rate(optimizer: torch.optim.Optimizer, step: int, cfg) -> float:
    lr = learning_rate(step, cfg)
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * lr / cfg.learning_rate
    return lr


def train_step(model, optimizer, scaler, batches: data.Batches, cfg, autocast) -> torch.Tensor:
    """One optimizer step over grad_accum micro-batches; returns the mean loss, left on the device (no sync)."""
    loss_sum = None
    for micro in range(cfg.grad_accum):
        x, y = batches.next()
        with distributed.sync_gradients(model, now=micro == cfg.grad_accum - 1):
            with autocast:
                _, loss = model(x, y)
            scaler.scale(loss / cfg.grad_accum).backward()
        loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
    if cfg.grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum / cfg.grad_accum


class Throughput:
    """Tokens per second over the timed steps since the last report: the clock restarts at the first step after
    each report, so evaluations and checkpoints between reports are not timed, and the first step is not timed."""

    def __init__(self, device: str, tokens_per_step: int, compiling: bool):
        self.device, self.tokens_per_step, self.compiling = device, tokens_per_step, compiling
        self.clock, self.steps, self.first_started, self.latest = None, 0, None, 0.0

    def before_step(self) -> None:
        if self.clock is None:
            self.first_started = time.perf_counter()
        elif self.steps == 0:
            devices.synchronize(self.device)
            self.clock = time.perf_counter()

    def after_step(self) -> None:
        if self.clock is not None:
            self.steps += 1
            return
        devices.synchronize(self.device)  # the first step compiles and warms up: it is not timed
        self.clock = time.perf_counter()
        if self.compiling:
            tqdm.write(f"compiling took {self.clock - self.first_started:.1f} s (the first step; not timed)")

    def tokens_per_s(self) -> float:
        """Since the clock last started; 0 when no step was timed. Synchronizes the device."""
        devices.synchronize(self.device)
        if self.steps:
            self.latest = self.tokens_per_step * self.steps / (time.perf_counter() - self.clock)
        self.steps = 0
        return self.latest if self.latest else 0.0


@dataclass
class Run:
    """What the loop needs that does not change while it trains."""

    cfg: object  # flags.Config, final
    machine: devices.Machine
    splits: data.Splits
    step_model: torch.nn.Module  # compiled and in DistributedDataParallel where asked
    eval_model: torch.nn.Module  # compiled where asked
    tracker: object  # tracking.Tracker, or a NoTracker on the processes that do not report
    record: object  # tracking.RunRecord, or a NoTracker
    stop: StopFlag
    checkpoints: ckpt.Checkpoints
    early_abort: compare.EarlyAbort | None
    resumed: bool

    def __post_init__(self):
        cfg = self.cfg
        self.device, self.autocast = self.machine.device, self.machine.autocast()
        self.tokens_per_step = cfg.batch_size * cfg.grad_accum * cfg.block_size * distributed.world_size()
        self.val_text = text_only(self.splits.val, self.splits.val_bytes, self.splits.tokenizer)  # for BPB
        peak = self.machine.peak_flops
        self.peak_flops = peak * distributed.world_size() if peak else None  # of all processes, for MFU
        self.throughput = Throughput(self.device, self.tokens_per_step, cfg.compile)


def evaluate(run: Run, state: TrainState, final: bool = False) -> None:
    """Losses and a sample at this step, reported and recorded; may ask the loop to stop (early abort).

    A signal ends the computing at once; while the results are printed and reported it waits, as during a step,
    for the next interruptible block: raised inside tqdm or ClearML, it would leave their locks half taken."""
    cfg, step = run.cfg, state.step
    with run.stop.allowing_interrupts():
        losses = estimate_loss(run.eval_model, run.splits, cfg, run.device, run.autocast)
    bpb = bits_per_byte(losses["val_text"], *run.val_text)
    for title, series, value in (("Loss", "train", losses["train"]), ("Loss", "val", losses["val"]),
                                 ("BPB", "val", bpb)):  # fmt: skip
        run.tracker.report_scalar(title, series, value, step)
    state.best_val_loss = min(state.best_val_loss, losses["val"])
    tqdm.write(f"step {step}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
    sample = ""
    if distributed.is_main():
        # Under torchrun the main process samples alone: a signal then stops it after the step, by the vote, so
        # the other processes stop with it instead of finding it gone.
        with run.stop.allowing_interrupts() if distributed.world_size() == 1 else contextlib.nullcontext():
            sample = tracking.clean_sample(generate_sample(state.model, run.splits.tokenizer, cfg, run.device,
                                                           run.autocast))  # fmt: skip
        tqdm.write(f"--- Generated Sample (step {step}) ---\n{sample}\n---")
        state.samples.append([step, f"{losses['val']:.4f}", sample])
        run.tracker.report_sample(sample, step, state.samples)
    run.record.evaluation(step, step * run.tokens_per_step, losses["train"], losses["val"], bpb,
                          learning_rate(step, cfg), run.throughput.latest, sample)  # fmt: skip
    if run.early_abort and not final and not run.stop.requested:
        if reason := run.early_abort.check(step, losses["val"]):
            run.tracker.add_tags([compare.WORSE_THAN_BASELINE])
            run.stop.request(reason)  # stop as Ctrl+C would: after this step, checkpoint kept, status aborted


def report_steps(run: Run, state: TrainState, losses: list[float], lr: float, bar: tqdm) -> None:
    """The per-step losses of the last interval, the learning rate, tokens/s and MFU."""
    first = state.step - len(losses) + 1
    for offset, loss in enumerate(losses):
        run.tracker.report_scalar("Train step", "loss", loss, first + offset)
    run.tracker.report_scalar("Learning rate", "lr", lr, state.step)
    tokens_per_s = run.throughput.tokens_per_s()
    if tokens_per_s:
        run.tracker.report_scalar("Throughput", "tokens/s", tokens_per_s, state.step)
        if run.peak_flops:
            mfu = 100 * state.model.flops_per_token() * tokens_per_s / run.peak_flops
            run.tracker.report_scalar("MFU", "percent", mfu, state.step)
    bar.set_postfix(loss=f"{losses[-1]:.3f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)


def first_divergence(losses: list[float], state: TrainState, cfg) -> tuple[int, float] | None:
    """The first (step, loss) of the interval that diverges; the best training loss follows the others."""
    for step, loss in enumerate(losses, start=state.step - len(losses) + 1):
        if not math.isfinite(loss) or (step > cfg.warmup_steps and loss > DIVERGENCE_FACTOR * state.best_train_loss):
            return step, loss
        state.best_train_loss = min(state.best_train_loss, loss)
    return None


def say_what_trains(run: Run, state: TrainState) -> None:
    cfg, where = run.cfg, f", run folder {run.checkpoints.folder}" if run.checkpoints.folder else ""
    print(f"{state.model.num_params() / 1e6:.2f}M parameters, {len(run.splits.train):,} training tokens, device "
          f"{run.device}, dtype {run.machine.dtype}{where}", flush=True)  # fmt: skip
    if cfg.world_size > 1:
        print(f"world size {cfg.world_size}: global batch {cfg.batch_size * cfg.grad_accum * cfg.world_size} "
              f"sequences (--batch_size {cfg.batch_size} x --grad_accum {cfg.grad_accum} x {cfg.world_size} "
              "processes)", flush=True)  # fmt: skip


def train(run: Run, state: TrainState) -> Outcome:
    """Train from state.step to max_steps, or until stopped; the state is checkpointed at the end."""
    cfg, pending, stopping, vote = run.cfg, [], False, distributed.StopVote()
    say_what_trains(run, state)
    run.stop.interruptible = False  # a signal during a step stops the loop after the step
    evaluated_at = state.step if run.resumed else None  # a resumed run was evaluated at its saved step already
    with tqdm(total=cfg.max_steps, initial=state.step, desc="training", dynamic_ncols=True, mininterval=1.0) as bar:
        while state.step < cfg.max_steps:
            if state.step % cfg.eval_interval == 0 and state.step != evaluated_at:
                evaluate(run, state)
                evaluated_at = state.step
            if run.checkpoints.due(state.step):
                run.checkpoints.save(state)
            run.throughput.before_step()
            lr = set_learning_rate(state.optimizer, state.step, cfg)
            pending.append(train_step(run.step_model, state.optimizer, state.scaler, state.batches, cfg,
                                      run.autocast))  # fmt: skip
            state.step += 1
            bar.update(1)
            run.throughput.after_step()
            # Every process stops after the same step: a signal by the vote cast a step earlier (it reaches the
            # processes at slightly different moments), an early abort at once (decided alike everywhere).
            stopping = vote.decided() or run.stop.reason is not None
            vote.cast(run.stop.requested)
            due = state.step % cfg.eval_interval == 0 or run.checkpoints.due(state.step) or state.step == cfg.max_steps
            if len(pending) < cfg.log_interval and not due and not stopping:
                continue
            # The losses come off the device, averaged over processes: every process decides alike.
            losses, pending = distributed.average(torch.stack(pending).float()).tolist(), []
            report_steps(run, state, losses, lr, bar)
            if diverged := first_divergence(losses, state, cfg):
                return ending.diverged(*diverged, state.best_train_loss, run.checkpoints.kept(state.step))
            if stopping:
                break
    if not stopping and state.step != evaluated_at:
        evaluate(run, state, final=True)
    run.checkpoints.save(state)
    distributed.end_together()
    if stopping:
        return ending.stopped(state.step, run.checkpoints.kept(state.step), run.stop.reason, run.checkpoints.path)
    return ending.completed()


def run_training(run: Run, state: TrainState) -> Outcome:
    """`train`, with whatever escapes it turned into an Outcome; the checkpoint registered with the task."""
    try:
        result = train(run, state)
    except KeyboardInterrupt:  # during an evaluation or a sample: keep what the steps did
        result = save_after_interrupt(run, state)
    except QuitNow:
        result = ending.quit_at_once(state.step, run.checkpoints.kept(state.step))
    except ckpt.NotFiniteError:
        result = ending.not_finite(state.step, run.checkpoints.kept(state.step))
    except Exception as e:
        result = ending.failure(e, state.step, run.checkpoints.kept(state.step), run.checkpoints.folder)
        distributed.failure(result.message)
    if result.status != "failed" and run.checkpoints.saved_step is not None and run.checkpoints.folder is not None:
        run.tracker.register_checkpoint(run.checkpoints.path, Path(run.checkpoints.folder) / "tokenizer.json",
                                        run.checkpoints.saved_step)  # fmt: skip
    return result


def save_after_interrupt(run: Run, state: TrainState) -> Outcome:
    run.stop.interruptible = False
    suffix = ""
    try:
        run.checkpoints.save(state)
    except ckpt.NotFiniteError:
        suffix = "; the weights are not finite"
    except QuitNow:
        suffix = "; quit at once"
    saved = run.checkpoints.path if run.checkpoints.saved_step == state.step else None
    return ending.stopped(state.step, run.checkpoints.kept(state.step) + suffix, None, saved)
