"""
Evaluation, bits per byte and sampling: what the loop measures at each evaluation, and `--eval_only`.

Design choices:
- Evaluation uses the same batches at every eval step (fixed seeds), so curves compare within and across runs.
  Sums stay on the device and are read once per split, not once per batch.
- Bits per byte count text only: special tokens are left out of both tokens and bytes.
- Sampling runs under a forked RNG, so evaluating never changes the training trajectory: N steps, resume, M steps
  equals N + M steps.
- Under torchrun each process evaluates its part of every batch (as it trains), and the sums are added across
  processes, so N processes measure what one process with an N times larger batch would.
- `--eval_only` scores every token of a split once, in consecutive windows, with a progress bar that ends at its
  total.
"""

import math
import sys

import numpy as np
import torch
from tqdm import tqdm

import data
import distributed
from model import GPT
from tokenizer import Tokenizer


def text_only(tokens: np.ndarray, n_bytes: int, tokenizer: Tokenizer) -> tuple[int, int]:
    """Tokens and UTF-8 bytes of a split without its special tokens: what bits per byte counts."""
    n_tokens, text_bytes = len(tokens), n_bytes
    for special, special_id in tokenizer.special_ids.items():
        count = int((tokens == special_id).sum()) if len(tokens) else 0
        n_tokens -= count
        text_bytes -= count * len(special.encode())
    return n_tokens, text_bytes


def bits_per_byte(nats_per_token: float, n_tokens: int, n_bytes: int) -> float:
    return nats_per_token * n_tokens / (math.log(2) * n_bytes)


def token_losses(model: GPT, x: torch.Tensor, y: torch.Tensor, autocast) -> torch.Tensor:
    """The loss of every target token, (B, T)."""
    with autocast:
        _, losses = model(x, y, reduction="none")
    return losses


@torch.no_grad()
def estimate_loss(model: GPT, splits: data.Splits, cfg, device: str, autocast) -> dict:
    """Mean loss over eval_iters batches of each split (the same batches at every call), and the validation loss
    over text tokens only, for bits per byte."""
    model.eval()
    losses, special = {}, torch.tensor(list(splits.tokenizer.special_ids.values()), device=device)
    for offset, split in enumerate(("train", "val")):
        generator = torch.Generator().manual_seed(cfg.seed + 1 + offset)
        sums = torch.zeros(3, dtype=torch.float64, device=device)  # mean losses, text losses, text tokens
        for _ in range(cfg.eval_iters):
            x, y = data.get_batch(
                getattr(splits, split), cfg.batch_size, cfg.block_size, generator, device,
                part=distributed.rank(), parts=distributed.world_size(),
            )  # fmt: skip
            per_token = token_losses(model, x, y, autocast)
            text = ~torch.isin(y, special)
            sums += torch.stack([per_token.mean(), per_token[text].sum(), text.sum()]).double()
        total, text_total, text_count = distributed.sum_across(sums.cpu()).tolist()
        losses[split] = total / (cfg.eval_iters * distributed.world_size())
        losses[f"{split}_text"] = text_total / max(text_count, 1)
    model.train()
    return losses


@torch.no_grad()
def generate_samples(model: GPT, tokenizer: Tokenizer, cfg, device: str, autocast, count: int = 1) -> list[str]:
    """`count` continuations of --prompt, drawn from --seed under a forked RNG (the run's own is left as it was)."""
    ids = tokenizer.encode(cfg.prompt) or [tokenizer.eot_id]
    idx = torch.tensor([ids] * count, dtype=torch.long, device=device)
    model.eval()
    with torch.random.fork_rng(devices=[device] if device == "cuda" else []), autocast:
        torch.manual_seed(cfg.seed)
        out = model.generate(idx, cfg.sample_tokens, temperature=cfg.temperature, top_k=cfg.top_k)
    model.train()
    return [tokenizer.decode(row.tolist()) for row in out]


def generate_sample(model: GPT, tokenizer: Tokenizer, cfg, device: str, autocast) -> str:
    return generate_samples(model, tokenizer, cfg, device, autocast)[0]


@torch.no_grad()
def score(model: GPT, tokens: np.ndarray, n_bytes: int, tokenizer: Tokenizer, cfg, device: str, autocast) -> dict:
    """One deterministic pass over `tokens`: every token after the first predicted once. Returns loss and bpb."""
    model.eval()
    special = torch.tensor(list(tokenizer.special_ids.values()))
    total, text_total = 0.0, 0.0
    n_windows = (len(tokens) - 1 + cfg.block_size - 1) // cfg.block_size
    batches = data.iter_eval_batches(tokens, cfg.batch_size, cfg.block_size)
    with tqdm(total=n_windows, desc="evaluating", unit="window", file=sys.stderr) as bar:
        for x, y in batches:
            per_token = token_losses(model, x.to(device), y.to(device), autocast).cpu()
            total += per_token.sum().item()
            text_total += per_token[~torch.isin(y, special)].sum().item()
            bar.update(len(x))
    n_text_tokens, n_text_bytes = text_only(tokens, n_bytes, tokenizer)
    loss = total / (len(tokens) - 1)
    return {"loss": loss, "bpb": bits_per_byte(text_total / n_text_tokens, n_text_tokens, n_text_bytes)}
