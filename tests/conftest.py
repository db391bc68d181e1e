"""Two pytest-xdist workers share the machine's cores: each worker, and every program a test starts, computes on one
thread, so their thread pools do not fight over the same cores (which made the suite about half as fast)."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import signal  # noqa: E402
from pathlib import Path  # noqa: E402 (after the thread setting, which torch reads when it is imported)

import pytest  # noqa: E402
from runner import SERVED_TRAIN, SERVED_VALID, STARTED, TRAIN_SAMPLE, VALID_SAMPLE  # noqa: E402

from tokenizer import Tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    """A 512-token tokenizer trained on the start of the train sample, for the TinyStories download tests."""
    return Tokenizer.train(TRAIN_SAMPLE.read_bytes()[:300_000].decode(), 512)


@pytest.fixture
def files(tmp_path) -> dict[str, Path]:
    """What a test TinyStories server serves, under the real file names; the train file is a copy tests may edit."""
    train = tmp_path / "served-train.txt"
    train.write_bytes(TRAIN_SAMPLE.read_bytes())
    return {SERVED_TRAIN: train, SERVED_VALID: VALID_SAMPLE}


@pytest.fixture(autouse=True)
def own_signal_handlers():
    """A test that runs main.main in-process installs the run's Ctrl+C handler: the worker gets its own back."""
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    yield
    for signum, handler in handlers.items():
        signal.signal(signum, handler)


@pytest.fixture(autouse=True)
def no_program_left_running():
    """A test that failed before its program ended does not leave it running to slow down the tests after it."""
    yield
    while STARTED:
        process = STARTED.pop()
        if process.poll() is None:
            process.kill()
            process.wait()
