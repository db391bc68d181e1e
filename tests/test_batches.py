"""Training batches: contiguous inputs and targets, reproducible from the seed, redrawn from a saved state, split
between processes; on CUDA, pinned on the host and on the device when a step takes them."""

import numpy as np
import pytest
import torch

import data

TOKENS = np.random.default_rng(0).integers(0, 512, 10_000).astype(np.uint16)
BATCH, BLOCK, SEED = 4, 16, 1337


def draws(batches: data.Batches, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [batches.next() for _ in range(n)]


def same(a: list, b: list) -> bool:
    return all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b, strict=True))


@pytest.mark.timeout(30)
def test_a_step_gets_contiguous_inputs_and_targets_shifted_by_one():
    for x, y in draws(data.Batches(TOKENS, BATCH, BLOCK, SEED, "cpu"), 3):
        assert x.shape == y.shape == (BATCH, BLOCK) and x.dtype == y.dtype == torch.int64
        assert x.is_contiguous() and y.is_contiguous()
        assert torch.equal(x[:, 1:], y[:, :-1])


@pytest.mark.timeout(30)
def test_batches_are_the_windows_at_starts_drawn_from_the_seed():
    """What a checkpoint's batch state means: the same windows whatever version of the code draws them."""
    generator = torch.Generator().manual_seed(SEED)
    for x, y in draws(data.Batches(TOKENS, BATCH, BLOCK, SEED, "cpu"), 3):
        starts = torch.randint(len(TOKENS) - BLOCK, (BATCH,), generator=generator).numpy()
        windows = torch.from_numpy(TOKENS[starts[:, None] + np.arange(BLOCK + 1)].astype(np.int64))
        assert torch.equal(x, windows[:, :-1]) and torch.equal(y, windows[:, 1:])


@pytest.mark.timeout(30)
def test_a_saved_state_draws_the_same_batches_again():
    batches = data.Batches(TOKENS, BATCH, BLOCK, SEED, "cpu")
    draws(batches, 2)
    state = batches.state.clone()  # before the batch held ahead, as a checkpoint saves it
    ahead = draws(batches, 3)
    batches.restart(state)
    assert same(draws(batches, 3), ahead)
    assert same(draws(data.Batches(TOKENS, BATCH, BLOCK, SEED, "cpu", state=state), 3), ahead)  # a resumed run
    assert not same(draws(data.Batches(TOKENS, BATCH, BLOCK, SEED + 1, "cpu"), 3), ahead)


@pytest.mark.timeout(30)
def test_the_parts_of_a_batch_are_one_process_batch_twice_as_large():
    whole = draws(data.Batches(TOKENS, 2 * BATCH, BLOCK, SEED, "cpu"), 3)
    parts = [draws(data.Batches(TOKENS, BATCH, BLOCK, SEED, "cpu", part=part, parts=2), 3) for part in (0, 1)]
    for (x, y), (x0, y0), (x1, y1) in zip(whole, *parts, strict=True):
        assert torch.equal(x, torch.cat([x0, x1])) and torch.equal(y, torch.cat([y0, y1]))


@pytest.mark.timeout(30)
def test_evaluation_batches_are_contiguous_too():
    x, y = data.get_batch(TOKENS, BATCH, BLOCK, torch.Generator().manual_seed(SEED), "cpu")
    assert x.is_contiguous() and y.is_contiguous() and torch.equal(x[:, 1:], y[:, :-1])


@pytest.mark.timeout(60)
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_the_host_batch_is_pinned_and_the_device_batch_equals_the_cpu_one():
    assert data.sample_windows(TOKENS, BATCH, BLOCK, torch.Generator().manual_seed(SEED), pin=True).is_pinned()
    on_cpu = draws(data.Batches(TOKENS, BATCH, BLOCK, SEED, "cpu"), 4)
    on_cuda = draws(data.Batches(TOKENS, BATCH, BLOCK, SEED, "cuda"), 4)
    assert all(x.is_cuda and x.is_contiguous() and y.is_contiguous() for x, y in on_cuda)
    assert same([(x.cpu(), y.cpu()) for x, y in on_cuda], on_cpu)
