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
- Decisions every rank must take alike are collectives: whether to stop (a signal reaches the ranks at slightly
  different moments), and the losses, averaged before anything is decided from them. The stop vote (`StopVote`)
  never stalls a step: the vote cast after step N is an all-reduce started then and read after step N+1, by when it
  has long arrived, so every rank stops at the same step, one step after the request.
- What the host reads (losses, the stop vote) travels over gloo as CPU tensors, however the model trains: a few
  numbers the host needs anyway, in a collective whose wait Python can interrupt.
- A rank that dies makes its peers' collectives fail; those failures are recognised (`peer_lost`), so the survivors
  end with one line while torchrun tears the run down.
- A collective is waited on in Python, not blocked in C++: its completion sets a threading.Event, which the main
  thread waits on. The wait ends the moment the collective completes (no polling interval to sleep through), and a
  signal is handled while a rank waits for the others (rank 0 preparing the data, or a peer that Ctrl+C stopped in
  the middle of an evaluation): a KeyboardInterrupt raised by its handler ends the wait within SIGNAL_CHECK_S,
  whichever thread of the process the signal was delivered to.
"""

import atexit
import contextlib
import inspect
import os
import sys
import threading
import traceback

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

SIGNAL_CHECK_S = 0.1  # the longest a wait on the other ranks goes without looking for a signal
ENDED_TOGETHER = threading.Event()  # see end_together


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
        if ENDED_TOGETHER.is_set():
            # No process tears its side down while another still uses the group: a rank aborted at exit
            # ("terminate called without an active exception") in about one two-rank run in four.
            with contextlib.suppress(Exception):
                dist.barrier()
        dist.destroy_process_group()


def end_together() -> None:
    """Every process ended the run at the same step (completed or stopped by the vote), so at exit each waits for
    the others before leaving the group; a process that fails alone does not wait for peers that may never come."""
    ENDED_TOGETHER.set()


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


def wait(work: dist.Work) -> None:
    """Wait for a collective started with async_op=True, in a wait that a signal handler can end by raising."""
    done = threading.Event()
    work.get_future().add_done_callback(lambda _: done.set())  # called on completion or failure, on gloo's thread
    # A signal may be delivered to any thread of the process (gloo's own among them), and then it does not end the
    # main thread's wait: waking every SIGNAL_CHECK_S lets the main thread run the handler within that time.
    while not done.wait(SIGNAL_CHECK_S):
        pass
    collective(work.wait)  # the collective's failure, if it failed


def all_reduce(values: torch.Tensor, op: dist.ReduceOp) -> None:
    """dist.all_reduce in place (of a CPU tensor, over gloo), waited on by `wait`."""
    wait(collective(lambda: dist.all_reduce(values, op=op, async_op=True)))


def any_rank(flag: bool) -> bool:
    """Whether `flag` is set on any rank: the same answer on every rank."""
    if not active():
        return flag
    value = torch.tensor([float(flag)])
    all_reduce(value, dist.ReduceOp.MAX)
    return bool(value.item())


def sum_across(values: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of `values` over ranks, as a new CPU tensor (it travels over gloo)."""
    values = values.detach().to("cpu", copy=True)
    if active():
        all_reduce(values, dist.ReduceOp.SUM)
    return values


def average(values: torch.Tensor) -> torch.Tensor:
    """The element-wise mean of `values` over ranks, as a new CPU tensor."""
    return sum_across(values) / world_size()


class StopVote:
    """Whether any rank asked to stop, agreed without a step waiting for it: `cast` starts the vote (an all-reduce
    of the flag, over gloo) and `decided` reads it a step later, when it has long arrived. The loop reads the vote
    cast after the previous step, then casts its own:

        if vote.decided():           # False before the first cast; the same answer on every rank
            break                    # every rank stops after the same step
        vote.cast(stop.requested)    # read after the next step

    One process behaves alike (a vote of one), so a run stops at the same step whatever its number of processes."""

    def __init__(self):
        self.ballot, self.work = torch.zeros(1), None

    def cast(self, flag: bool) -> None:
        """Start the vote on `flag` (this rank wants to stop); the vote before it is read first if it was not."""
        self.decided()
        self.ballot = torch.tensor([float(flag)])
        if active():
            self.work = collective(lambda: dist.all_reduce(self.ballot, op=dist.ReduceOp.MAX, async_op=True))

    def decided(self) -> bool:
        """Whether any rank cast True in the last vote; waits for it (interruptibly) if it has not arrived."""
        if self.work is not None:
            wait(self.work)
            self.work = None  # only once it has arrived: a wait a signal ended is waited on again
        return bool(self.ballot.item())


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
