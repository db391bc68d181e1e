"""Run folders written directly, as tracking.RunRecord writes them, for tests of what reads them."""

import json
from pathlib import Path


def header(**fields) -> dict:
    base = {
        "format": 1, "hypothesis": "h", "flags": {"seed": 1, "dropout": 0.0, "data": "x.txt"}, "dataset": "x.txt",
        "tokenizer": {"fingerprint": "0123456789abcdef", "vocab_size": 512}, "git": {"commit": "0" * 40,
        "dirty": False}, "clearml": {}, "world_size": 1, "started": "2026-01-01T00:00:00+00:00",
    }  # fmt: skip
    return base | fields


def evaluation(step: int, loss: float = 5.0, **fields) -> dict:
    return {"event": "eval", "step": step, "tokens": step * 100, "loss_train": loss, "loss_val": loss,
            "bpb": loss / 2, "lr": 1e-3, "elapsed": step / 10} | fields  # fmt: skip


def write_run(folder: Path, head=None, events=None, sample: str = "Once upon a time") -> Path:
    """A run folder as tracking.RunRecord writes it; `head` or `events` replace its header or events."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "run.json").write_text(json.dumps(header() if head is None else head))
    if events is None:
        events = [evaluation(s, 5.0 - s / 100) for s in (0, 10, 20)]
    lines = [json.dumps(e | ({"sample": sample} if e.get("event") == "eval" else {})) for e in events]
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return folder
