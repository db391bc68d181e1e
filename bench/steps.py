"""The training step the CPU benches time: forward with the loss, backward, clipping, the optimizer step."""

from collections.abc import Callable

import torch


def fixed_batch_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor
                  ) -> Callable[[], None]:  # fmt: skip
    """One step on the fixed batch (x, y) each time it is called."""

    def step() -> None:
        _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step
