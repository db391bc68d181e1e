"""
The training state: everything that changes while a run trains, in one object that the checkpoint saves whole.

Design choices:
- One object holds the model, the optimizer, the GradScaler, the step, the best validation loss, the batch sampler's
  position, every random number generator (CPU and CUDA, of every process) and the samples reported so far. The
  checkpoint saves `state_dict()`, `--resume` restores it with `load_state_dict`, and the `--max_seconds` probe
  takes a `snapshot()` and `restore()`s it, so nothing the probe did survives it.
- Under torchrun each process has its own RNG streams (seeded `seed + rank`, so dropout differs across
  processes): the state gathers them all, and on resume each process takes its own back. A process with no saved
  stream (the run resumes with more processes) seeds one from the seed, its rank and the step.
- The state holds tensors and plain values only, so a checkpoint loads with `weights_only=True`.
"""

import copy

import torch

import distributed


def rng_state(device: str) -> dict:
    """This process's random number generators: the CPU one, and the current CUDA device's."""
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if device == "cuda" else None}


def set_rng_state(saved: dict, device: str) -> None:
    torch.set_rng_state(saved["cpu"])
    if device == "cuda" and saved.get("cuda") is not None:
        torch.cuda.set_rng_state(saved["cuda"])


class TrainState:
    """What a run changes as it trains (see the module docstring)."""

    def __init__(self, model, optimizer, scaler, batches, device: str, seed: int):
        self.model, self.optimizer, self.scaler, self.batches = model, optimizer, scaler, batches
        self.device, self.seed = device, seed
        self.step = 0
        self.best_val_loss = float("inf")
        # The reference for divergence: the best training loss since this process started training. It is not
        # saved, so a run stopped by a divergence can be resumed (with a lower learning rate, say) and judged anew.
        self.best_train_loss = float("inf")
        self.samples: list[list] = []  # rows of the Generated Sample table: step, Loss/val, text

    def state_dict(self) -> dict:
        """The whole state, as tensors and plain values; every process must call it (the RNGs are gathered)."""
        return {**self._parts(), "rng": distributed.gather(rng_state(self.device))}

    def load_state_dict(self, saved: dict) -> None:
        self._load_parts(saved)
        streams, rank = saved["rng"], distributed.rank()
        if rank < len(streams):
            set_rng_state(streams[rank], self.device)
        else:  # more processes than the run had: a new stream, reproducible from the seed, rank and step
            torch.manual_seed(self.seed + rank + 1_000_003 * self.step)

    def snapshot(self) -> dict:
        """A copy of the whole state, this process's RNGs included, to `restore` later."""
        return copy.deepcopy({**self._parts(), "rng": rng_state(self.device)})

    def restore(self, snapshot: dict) -> None:
        self._load_parts(snapshot)
        set_rng_state(snapshot["rng"], self.device)

    def _parts(self) -> dict:
        """Everything but the RNGs (references, not copies)."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "best_val_loss": self.best_val_loss,
            "batches": self.batches.state,
            "samples": [list(row) for row in self.samples],
        }

    def _load_parts(self, saved: dict) -> None:
        self.model.load_state_dict(saved["model"])
        load_optimizer_state(self.optimizer, saved["optimizer"])
        if saved["scaler"]:
            self.scaler.load_state_dict(saved["scaler"])
        self.step = saved["step"]
        self.best_val_loss = saved["best_val_loss"]
        self.batches.restart(saved["batches"])
        self.samples = [list(row) for row in saved["samples"]]


def load_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict) -> None:
    """The saved state of the optimizer, with the hyperparameters it has now (a resumed run's changed flags apply).
    ValueError where the saved state has other groups."""
    settings = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    optimizer.load_state_dict(saved)
    for group, setting in zip(optimizer.param_groups, settings, strict=True):
        group.update(setting)
