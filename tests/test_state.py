"""One training state: the --max_seconds probe leaves every part of it as it was, and two torchrun processes with
dropout resume exactly (N steps, resume, M steps equals N + M in one go), each taking back its own RNG streams.
"""

import time

import numpy as np
import pytest
import torch
from runner import TINY_MODEL, TRAIN_SAMPLE, make_project
from test_distributed import exit_codes, finish, torchrun

import budget
import data
import devices
import loop
import main
from flags import configuration
from state import TrainState
from tokenizer import Tokenizer

FLAGS = ["--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--block_size", "16", "--batch_size", "4", "--dropout",
         "0.2", "--eval_iters", "2", "--sample_tokens", "3", "--max_seconds", "1", "--grad_accum", "2"]  # fmt: skip


def tiny_state(cfg, tokens: np.ndarray) -> TrainState:
    torch.manual_seed(cfg.seed)
    model = main.build_model(cfg, 300, devices.Machine("cpu", "float32"), None)
    scaler = torch.amp.GradScaler("cpu", enabled=True)  # enabled, so that its growth tracker moves
    batches = data.Batches(tokens, cfg.batch_size, cfg.block_size, cfg.seed, "cpu")
    return TrainState(model, main.build_optimizer(model, cfg, "cpu"), scaler, batches, "cpu", cfg.seed)


def assert_same(a, b, where: str = "state") -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.mark.timeout(60)
def test_the_budget_probe_leaves_every_part_of_the_state_as_it_was():
    text = TRAIN_SAMPLE.read_text(encoding="utf-8")[:20_000]
    tokenizer = Tokenizer.train(text, 300)
    ids = np.array(tokenizer.encode(text), dtype=np.uint16)
    splits = data.Splits(train=ids[:4000], val=ids[4000:], val_bytes=len(text), tokenizer=tokenizer, tag="t")
    cfg = configuration(FLAGS)
    machine = devices.Machine("cpu", "float32")

    def train(probe: bool) -> tuple[list[float], dict]:
        state = tiny_state(cfg, splits.train)  # seeds the global RNG, which dropout draws from
        loop.train_step(state.model, state.optimizer, state.scaler, state.batches, cfg, machine.autocast())
        state.step, state.samples = 1, [[0, "5.0000", "Once"]]  # optimizer, scaler and samples not empty
        if probe:
            before = state.snapshot()
            budget.steps_for(cfg, state, state.model, state.model, splits, machine)
            assert_same(state.snapshot(), before)
        steps = [loop.train_step(state.model, state.optimizer, state.scaler, state.batches, cfg, machine.autocast())
                 for _ in range(3)]  # fmt: skip
        return torch.stack(steps).tolist(), state.model.state_dict()

    (probed_losses, probed_model), (losses, model) = train(probe=True), train(probe=False)
    assert probed_losses == losses  # the run goes on as if the probe had never happened
    assert_same(probed_model, model)


@pytest.mark.timeout(240)
def test_two_ranks_with_dropout_resume_exactly(tmp_path):
    project = make_project(tmp_path)
    (project.path / "stories.txt").write_bytes(TRAIN_SAMPLE.read_bytes()[:300_000])
    flags = [*TINY_MODEL, "--data", "stories.txt", "--eval_iters", "1", "--sample_tokens", "3", "--dropout", "0.2",
             "--warmup_steps", "2", "--lr_decay_steps", "8", "--eval_interval", "4", "--log_interval", "1"]  # fmt: skip
    for args in (["--max_steps", "4", "--out_dir", "A"], ["--resume", "A", "--max_steps", "8"],
                 ["--max_steps", "8", "--out_dir", "B"]):  # fmt: skip
        code, _, stderr, _ = finish(torchrun(project, *flags, *args), timeout=120)
        assert code == 0 and exit_codes(project) == {0: 0, 1: 0}, stderr[-3000:]
        (project.path / "exits.txt").unlink()
    first, resumed, straight = project.sessions()
    pieced = {**first.scalars("Train step", "loss"), **resumed.scalars("Train step", "loss")}
    assert pieced == straight.scalars("Train step", "loss") and len(pieced) == 8
    a = torch.load(project.path / "A" / "ckpt.pt", weights_only=True)
    b = torch.load(project.path / "B" / "ckpt.pt", weights_only=True)
    assert_same(a["model"], b["model"], "model")
    assert len(a["rng"]) == 2 and not torch.equal(a["rng"][0]["cpu"], a["rng"][1]["cpu"])  # each rank its own
    same = {**b["args"], "out_dir": "A", "resume": "A", "task_name": a["args"]["task_name"]}  # named by the time
    assert a["args"]["world_size"] == 2 and a["args"] == same


class CompilesOnFirstCall(torch.nn.Module):
    """A model whose first forward costs what compiling would (a second), as torch.compile's first call does."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        if self.calls == 1:
            time.sleep(1.0)  # stands for the compile: what the probe must leave out of its timing
        return self.model(*args, **kwargs)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("compiling", [True, False])
def test_the_probe_never_times_the_compile_of_the_evaluation(compiling):
    text = TRAIN_SAMPLE.read_text(encoding="utf-8")[:20_000]
    tokenizer = Tokenizer.train(text, 300)
    ids = np.array(tokenizer.encode(text), dtype=np.uint16)
    splits = data.Splits(train=ids[:4000], val=ids[4000:], val_bytes=len(text), tokenizer=tokenizer, tag="t")
    cfg = configuration([*FLAGS, "--compile" if compiling else "--no-compile"])
    state = tiny_state(cfg, splits.train)
    seconds = budget.time_evaluation(
        cfg, state, CompilesOnFirstCall(state.model), splits, "cpu", devices.autocast("cpu", "float32")
    )
    assert (seconds < 0.5) if compiling else (seconds > 1.0)
