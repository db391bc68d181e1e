"""The training loop's recipe: no host sync inside a step, the learning-rate schedule, bits per byte, resume flags."""

import contextlib
import math
import os
import signal

import numpy as np
import pytest
import torch
from runner import TINY_MODEL, TRAIN_SAMPLE, make_project
from torch.utils._python_dispatch import TorchDispatchMode

import data
import devices
import ending
import loop
import main
from evaluation import bits_per_byte, text_only
from flags import configuration
from model import GPT, GPTConfig
from state import TrainState
from tokenizer import Tokenizer
from tracking import NoTracker

# Ops that make the host wait for the device: reading a value (item, bool, equality of whole tensors).
SYNCING_OPS = ("aten._local_scalar_dense", "aten.is_nonzero", "aten.equal")


class SyncCounter(TorchDispatchMode):
    """Counts ops that read a value to the host. An optimizer's step counters are left out: they live on the host
    on every device (torch's AdamW keeps them on the CPU unless fused or capturable), so reading them waits for
    nothing."""

    def __init__(self, host_counters: list[torch.Tensor]):
        super().__init__()
        self.host_counters, self.syncs, self.ops = host_counters, [], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        if str(func).startswith(SYNCING_OPS) and not any(args[0] is t for t in self.host_counters):
            self.syncs.append(str(func))
        return func(*args, **(kwargs or {}))


def flags(*extra: str):
    return configuration(["--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--block_size", "16",
                                           "--batch_size", "4", *extra])  # fmt: skip


@pytest.mark.parametrize("optimizer", ["muon", "adamw"])
def test_a_training_step_never_waits_for_the_device(optimizer):
    args = flags("--grad_accum", "2", "--optimizer", optimizer, "--warmup_steps", "2")
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=97, block_size=16, n_layer=2, n_head=2, n_embd=32))
    model_optimizer = main.build_optimizer(model, args, "cpu")
    tokens = np.random.default_rng(0).integers(0, 97, 5000).astype(np.uint16)
    batches = data.Batches(tokens, args.batch_size, args.block_size, args.seed, "cpu")
    scaler = torch.amp.GradScaler(enabled=False)
    loop.train_step(model, model_optimizer, scaler, batches, args, contextlib.nullcontext())  # creates the state
    counters = [s["step"] for s in model_optimizer.state.values() if torch.is_tensor(s.get("step"))]
    with SyncCounter(counters) as counter:
        loop.set_learning_rate(model_optimizer, 3, args)
        loss = loop.train_step(model, model_optimizer, scaler, batches, args, contextlib.nullcontext())
    assert counter.ops > 100  # the step really ran under the counter
    assert counter.syncs == []
    assert loss.dim() == 0 and math.isfinite(loss.item())


def test_learning_rate_schedule():
    args = flags("--learning_rate", "1e-3", "--min_lr", "1e-4", "--warmup_steps", "10", "--max_steps", "110")
    lr = [loop.learning_rate(step, args) for step in range(111)]
    assert lr[0] == pytest.approx(1e-3 / 11) and lr[9] == pytest.approx(1e-3 * 10 / 11)
    assert lr[10] == pytest.approx(1e-3)  # the cosine starts at the end of warmup
    assert lr[60] == pytest.approx((1e-3 + 1e-4) / 2)
    assert lr[110] == pytest.approx(1e-4)
    assert all(a >= b for a, b in zip(lr[10:], lr[11:], strict=False))


def test_bits_per_byte_leaves_special_tokens_out():
    text = "The cat sat.\n<|endoftext|>\nA dog ran.\n<|endoftext|>\n"
    tokenizer = Tokenizer.train(text * 3, 260)
    ids = np.array(tokenizer.encode(text), dtype=np.uint16)
    n_tokens, n_bytes = text_only(ids, len(text.encode()), tokenizer)
    # By hand: two <|endoftext|> tokens, each standing for 13 bytes of text.
    assert n_tokens == len(ids) - 2 and n_bytes == len(text.encode()) - 2 * 13
    assert bits_per_byte(math.log(2), n_tokens, n_bytes) == pytest.approx(n_tokens / n_bytes)


class SignalledTracker(NoTracker):
    """A tracker whose first report receives a Ctrl+C in the middle, as tqdm or ClearML would, holding a lock."""

    def __init__(self):
        self.reports: list[str] = []

    def report_scalar(self, title, series, value, step):
        if not self.reports:
            os.kill(os.getpid(), signal.SIGINT)  # handled at the next bytecode, inside this call
        self.reports.append(f"{title}/{series}")

    def report_sample(self, *args):
        self.reports.append("sample")


def test_ctrl_c_while_an_evaluation_reports_stops_before_the_sample_with_the_report_whole():
    cfg = flags("--vocab_size", "260", "--eval_iters", "1", "--sample_tokens", "3")
    text = TRAIN_SAMPLE.read_text(encoding="utf-8")[:5000]
    tokenizer = Tokenizer.train(text, cfg.vocab_size)
    ids = np.array(tokenizer.encode(text), dtype=np.uint16)
    splits = data.Splits(train=ids[:1000], val=ids[1000:], val_bytes=len(text), tokenizer=tokenizer, tag="t")
    machine = devices.Machine("cpu", "float32")
    model = main.build_model(cfg, tokenizer.vocab_size, machine, None)
    batches = data.Batches(splits.train, cfg.batch_size, cfg.block_size, cfg.seed, "cpu")
    state = TrainState(model, main.build_optimizer(model, cfg, "cpu"), torch.amp.GradScaler("cpu", enabled=False),
                       batches, "cpu", cfg.seed)  # fmt: skip
    tracker, stop = SignalledTracker(), ending.StopFlag()
    run = loop.Run(cfg=cfg, machine=machine, splits=splits, step_model=model, eval_model=model, tracker=tracker,
                   record=NoTracker(), stop=stop, checkpoints=None, early_abort=None, resumed=False)  # fmt: skip
    stop.install()
    with pytest.raises(KeyboardInterrupt):  # the run then saves its checkpoint and ends (exit 130)
        loop.evaluate(run, state)
    assert stop.requested
    assert tracker.reports == ["Loss/train", "Loss/val", "BPB/val"]  # whole, and no sample drawn after the signal
    assert state.samples == []


@pytest.fixture
def project(tmp_path):
    project = make_project(tmp_path)
    (project.path / "stories.txt").write_bytes(TRAIN_SAMPLE.read_bytes()[:300_000])
    return project


QUICK = [*TINY_MODEL, "--data", "stories.txt", "--eval_iters", "1", "--eval_interval", "4", "--sample_tokens", "2"]


def test_resume_trains_with_changed_optimizer_flags_and_refuses_another_optimizer(project):
    assert project.run(*QUICK, "--max_steps", "4", "--warmup_steps", "0", "--out_dir", "RUN").returncode == 0
    resumed = project.run("--resume", "RUN", "--max_steps", "8", "--muon_lr", "0.005", "--beta2", "0.9")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    groups = torch.load(project.path / "RUN" / "ckpt.pt", weights_only=False)["optimizer"]["param_groups"]
    muon = next(g for g in groups if g["use_muon"])
    assert muon["initial_lr"] == 0.005 and 0 < muon["lr"] <= 0.005
    assert all(g["betas"] == (0.9, 0.9) for g in groups)
    refused = project.refused("--resume", "RUN", "--max_steps", "12", "--optimizer", "adamw")
    assert refused.returncode == 2 and "--optimizer cannot change" in refused.stderr.strip().splitlines()[-1]
