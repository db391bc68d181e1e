"""
The time budget: `--max_seconds` turned into a step count before training, so the run reproduces step for step.

Design choices:
- A few steps and one evaluation are timed, then undone: the training state is snapshot first and restored after,
  every part of it (weights, optimizer, scaler, batch position, RNGs), so the run then trains exactly as a run
  given the resulting `--max_steps` would. That step count is what the configuration records.
- Compiling is never timed: with `--compile` an untimed evaluation and an untimed step come first, so both graphs
  are compiled before the clock starts (as modded-nanogpt warms up, restores, then starts its clock).
- Each step costs its own time plus its share of the evaluations (one every eval_interval steps).
- Under torchrun every process takes part in the timed steps; the main process's timing decides for all.
"""

import time

import devices
import distributed
from evaluation import estimate_loss, generate_sample
from loop import train_step
from state import TrainState

PROBE_STEPS = 5  # steps timed, after one untimed step


def time_evaluation(cfg, state: TrainState, eval_model, splits, device: str, autocast) -> float:
    """Seconds of one evaluation with its sample, compiled first (untimed) when compiling."""

    def evaluation() -> None:
        estimate_loss(eval_model, splits, cfg, device, autocast)
        if distributed.is_main():
            generate_sample(state.model, splits.tokenizer, cfg, device, autocast)
        devices.synchronize(device)

    if cfg.compile:
        evaluation()
    started = time.perf_counter()
    evaluation()
    return time.perf_counter() - started


def time_steps(cfg, state: TrainState, step_model, device: str, autocast) -> tuple[float, float]:
    """Seconds of the first (compiling) step, and of each of the PROBE_STEPS steps after it."""

    def step() -> None:
        train_step(step_model, state.optimizer, state.scaler, state.batches, cfg, autocast)

    started = time.perf_counter()
    step()
    devices.synchronize(device)
    first = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(PROBE_STEPS):
        step()
    devices.synchronize(device)
    return first, (time.perf_counter() - started) / PROBE_STEPS


def steps_for(cfg, state: TrainState, step_model, eval_model, splits, machine: devices.Machine) -> tuple[int, str]:
    """The step count --max_seconds buys from state.step on (at most --max_steps), with a line saying how; the
    state is as it was before."""
    device, autocast = machine.device, machine.autocast()
    snapshot = state.snapshot()
    eval_seconds = time_evaluation(cfg, state, eval_model, splits, device, autocast)
    first, per_step = time_steps(cfg, state, step_model, device, autocast)
    state.restore(snapshot)
    steps = max(1, int(cfg.max_seconds / (per_step + eval_seconds / cfg.eval_interval)))
    max_steps = distributed.share(min(cfg.max_steps, state.step + steps))  # the main process's timing decides
    line = (
        f"--max_seconds {cfg.max_seconds:g}: {per_step * 1000:.0f} ms a step and {eval_seconds:.1f} s an evaluation "
        f"(compiling not counted; the first step took {first:.1f} s), so --max_steps {max_steps}, recorded: rerun "
        "with it to reproduce this run"
    )
    return max_steps, line
