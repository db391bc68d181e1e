"""
One model trained by several processes: the process group that `torchrun` starts, and the few decisions all the
processes (ranks) must take together.

    torchrun --standalone --nproc_per_node 2 main.py ...

Design choices:
- torchrun's environment decides (RANK, LOCAL_RANK, WORLD_SIZE, and MASTER_ADDR/MASTER_PORT for the rendezvous).
  Without it the run is one process: no process group is created and every function here returns at once.
- One process group: NCCL carries CUDA tensors (each process on GPU LOCAL_RANK), gloo carries CPU tensors, so the
  stop flag travels without waiting for the GPU. A machine without CUDA uses gloo alone.
- Global rank 0 speaks and writes (`is_main`): the ClearML task, the progress bar, the run folder. The other ranks
  print nothing but their own failures, so no message is repeated once per process.
- Decisions every rank must take alike are collectives: the stop flag is an "any" over ranks at every step (a signal
  reaches the ranks at slightly different moments), and losses are averaged before anything is decided from them.
- A rank that dies makes its peers' collectives fail; those failures are recognised (`peer_lost`), so the survivors
  end with one line while torchrun tears the run down.
- Waits on collectives are polled, not blocked in C++, so a signal is handled while a rank waits for the others:
  rank 0 preparing the data, or a peer that Ctrl+C stopped in the middle of an evaluation.
"""

import atexit
import contextlib
import inspect
import os
import sys
import time
import traceback

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

POLL_SECONDS = 0.05  # the longest sleep between two looks at a pending collective


class PeerLost(Exception):
    """Another process of the run is gone, so a collective cannot complete."""


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """The global rank: 0 in a single-process run."""
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    """The rank on this machine, which is also the index of its GPU."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def setup() -> None:
    """Join the process group when started by torchrun; ranks other than 0 then print only their own failures."""
    if world_size() == 1 or active():
        return
    if torch.cuda.is_available():
        if local_rank() >= torch.cuda.device_count():
            print(
                f"rank {rank()}: this machine has {torch.cuda.device_count()} GPUs, fewer than the processes torchrun "
                "started on it; give --nproc_per_node at most one process per GPU",
                file=sys.stderr,
            )
            sys.exit(2)
        torch.cuda.set_device(local_rank())  # "cuda" now means this rank's GPU everywhere
    dist.init_process_group(backend="cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
    atexit.register(teardown)
    if not is_main():
        sys.stdout = sys.stderr = open(os.devnull, "w")  # noqa: SIM115 (held for the life of the process)
        sys.excepthook = print_own_failure


def teardown() -> None:
    if active():
        dist.destroy_process_group()


def print_own_failure(kind, error, trace) -> None:
    """A rank other than 0 whose error would otherwise be silent: one line when a peer is gone, else the traceback."""
    if peer_lost(error):
        failure("another process of this run stopped, so this one stops too")
    else:
        traceback.print_exception(kind, error, trace, file=sys.__stderr__)


def failure(message: str) -> None:
    """A failure of this process alone (rank 0 prints its own as usual); other ranks say it with their rank."""
    if not is_main():
        print(f"rank {rank()}: {message}", file=sys.__stderr__, flush=True)


def peer_lost(error: BaseException) -> bool:
    """Whether `error` is a collective failing because another process of the run is gone."""
    if isinstance(error, PeerLost | dist.DistError):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and any(
        sign in text for sign in ("Connection closed by peer", "Connection reset by peer", "NCCL communicator")
    )


def collective(run):
    """Run a collective, turning the failure caused by a vanished peer into PeerLost."""
    try:
        return run()
    except RuntimeError as e:
        if peer_lost(e):
            raise PeerLost("another process of this run stopped") from e
        raise


def all_reduce(values: torch.Tensor, op: dist.ReduceOp) -> None:
    """dist.all_reduce in place, waited on by polling: first every 0.1 ms, backing off to POLL_SECONDS."""
    work = collective(lambda: dist.all_reduce(values, op=op, async_op=True))
    pause = 1e-4
    while not work.is_completed():
        time.sleep(pause)
        pause = min(2 * pause, POLL_SECONDS)
    collective(work.wait)


def any_rank(flag: bool) -> bool:
    """Whether `flag` is set on any rank: the same answer on every rank."""
    if not active():
        return flag
    value = torch.tensor([float(flag)])
    all_reduce(value, dist.ReduceOp.MAX)
    return bool(value.item())


def sum_across(values: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of `values` over ranks (a copy; CPU tensors go over gloo, CUDA ones over NCCL)."""
    values = values.clone()
    if active():
        all_reduce(values, dist.ReduceOp.SUM)
    return values


def average(values: torch.Tensor) -> torch.Tensor:
    """The element-wise mean of `values` over ranks."""
    return sum_across(values) / world_size() if active() else values


def share(value):
    """Rank 0's `value` (any picklable object), on every rank."""
    if not active():
        return value
    box = [value]
    collective(lambda: dist.broadcast_object_list(box, src=0))
    return box[0]


def wait_for_all() -> None:
    """Return when every rank has called this (a barrier over gloo, whatever the device)."""
    if active():
        all_reduce(torch.zeros(1), dist.ReduceOp.SUM)


@contextlib.contextmanager
def main_first():
    """Rank 0 runs the block first (preparing a cache, training a tokenizer), then the others (reading it)."""
    if not is_main():
        wait_for_all()
    yield
    if is_main():
        wait_for_all()


def wrap(model: torch.nn.Module, device: str) -> torch.nn.Module:
    """The model in DistributedDataParallel when the run has several processes (rank 0's weights are broadcast)."""
    if not active():
        return model
    # Buffers (rotary tables) are computed alike on every rank: no need to sync them before each forward. The flag
    # was renamed in recent PyTorch.
    renamed = "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
    no_buffer_sync = {"forward_sync_buffers" if renamed else "broadcast_buffers": False}
    return DistributedDataParallel(model, device_ids=[local_rank()] if device == "cuda" else None, **no_buffer_sync)


def sync_gradients(model: torch.nn.Module, now: bool):
    """The context for one micro-batch's backward: gradients are all-reduced only `now` (the last micro-batch of a
    step); the others accumulate locally, so a step of grad_accum micro-batches all-reduces once."""
    if now or not isinstance(model, DistributedDataParallel):
        return contextlib.nullcontext()
    return model.no_sync()


def gather(value) -> list:
    """Every process's `value` (any picklable object), in rank order, on every process."""
    if not active():
        return [value]
    values = [None] * world_size()
    collective(lambda: dist.all_gather_object(values, value))
    return values
