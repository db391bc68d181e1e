"""
A seed group: one configuration trained once per seed, so a verdict can be given with its seed noise.

    python main.py --data tinystories --dropout 0.3 --seeds 1337 1338 1339 --out_dir runs/dropout-0.3

Design choices:
- The seeds run one after another, each as its own `main.py` process, in its own run folder inside the group
  folder (`seed-1337`, ...) and with its own ClearML task; every task carries the group's tag (`group-<folder>`), so
  the web UI filters them together. compare.py reads the group folder as the runs of one arm.
- The group folder's `group.json` records the flags and the seeds, written once; `--resume GROUP` continues where
  the group stopped: a seed stopped midway resumes from its checkpoint, a seed not yet started starts, a finished
  or failed seed is left as it is.
- Ctrl+C or SIGTERM goes to the seed that is running (each runs in a session of its own, so it is forwarded once,
  and a second Ctrl+C still quits at once): the running seed is saved, the rest are not started, and one line
  says which. A seed that fails (diverges, say) does not stop the others; the exit code is then the first failure's.
"""

import json
import signal
import subprocess
import sys
from pathlib import Path

import checkpoint as ckpt
import data
import distributed
import flags
from ending import EXIT_DONE, EXIT_STOPPED, say
from errors import UsageError

GROUP_FILE = "group.json"
LAUNCH_FLAGS = ("seeds", "seed", "out_dir", "resume", "overwrite")  # the group sets these for each seed


def is_group(folder: str | None) -> bool:
    return folder is not None and (Path(folder) / GROUP_FILE).is_file()


def seed_status(folder: Path) -> str:
    """ "new", "completed", "failed" or "stopped" (aborted, or killed while running) for a seed's run folder."""
    if not (folder / ckpt.CHECKPOINT).is_file():
        return "new"
    status = "stopped"
    try:
        with open(folder / "metrics.jsonl", encoding="utf-8", errors="replace") as f:
            for line in f:
                if '"event": "status"' in line:
                    status = {"completed": "completed", "failed": "failed"}.get(
                        json.loads(line).get("status"), "stopped"
                    )
    except (OSError, ValueError, AttributeError):
        return "stopped"
    return status


def start(argv: list[str]) -> int:
    """Start a group from `argv` (with --seeds), or continue one (`--resume GROUP`, with flags typed now)."""
    if distributed.world_size() > 1:
        raise UsageError("--seeds runs one process per seed: start it with python main.py, not torchrun")
    cfg, typed = flags.parse(argv)
    flags.check(cfg)
    if cfg.resume:
        group = Path(cfg.resume)
        record = json.loads((group / GROUP_FILE).read_text(encoding="utf-8"))
        base, seeds = record["flags"], record["seeds"]
        extra = flags.to_argv({k: v for k, v in typed.items() if k not in LAUNCH_FLAGS})
    else:
        group = Path(cfg.out_dir) if cfg.out_dir else ckpt.new_default_folder()
        if is_group(str(group)) or any(group.glob("seed-*")):
            raise UsageError(f"--out_dir {group} already holds a seed group; continue it with --resume {group}")
        group.mkdir(parents=True, exist_ok=True)
        base, seeds, extra = {k: v for k, v in typed.items() if k not in LAUNCH_FLAGS}, cfg.seeds, []
        data.write_atomic(group / GROUP_FILE, json.dumps({"flags": base, "seeds": seeds}, indent=1).encode())
    return run_seeds(group, base, seeds, extra)


def seed_command(group: Path, base: dict, seed: int, extra: list[str]) -> list[str]:
    folder = group / f"seed-{seed}"
    main_py = str(Path(__file__).resolve().parent / "main.py")
    if seed_status(folder) == "stopped":
        return [sys.executable, main_py, "--resume", str(folder), *extra]
    tags = [*base.get("tags", []), f"group-{group.resolve().name}"]
    launch = flags.to_argv({**base, "seed": seed, "out_dir": str(folder), "tags": tags})
    return [sys.executable, main_py, *launch, *extra]


def run_seeds(group: Path, base: dict, seeds: list[int], extra: list[str]) -> int:
    failures = {}
    for i, seed in enumerate(seeds):
        folder = group / f"seed-{seed}"
        if seed_status(folder) in ("completed", "failed"):
            continue
        say(f"seed {seed} ({i + 1} of {len(seeds)}): run folder {folder}")
        code = run_forwarding_signals(seed_command(group, base, seed, extra))
        if code == EXIT_STOPPED:
            rest = ", ".join(map(str, seeds[i + 1 :])) or "none"
            say(f"the group stopped during seed {seed}, which is saved in {folder}; not started: {rest}. "
                f"Continue with: python main.py --resume {group}")  # fmt: skip
            return EXIT_STOPPED
        if code != EXIT_DONE:
            failures[seed] = code
    done = [s for s in seeds if seed_status(group / f"seed-{s}") == "completed"]
    failed = ", ".join(f"{seed} (exit {code})" for seed, code in failures.items())
    say(f"group {group}: {len(done)} of {len(seeds)} seeds completed" + (f"; failed: {failed}" if failed else ""))
    return next(iter(failures.values()), EXIT_DONE)


def run_forwarding_signals(command: list[str]) -> int:
    """Run one seed in a session of its own; Ctrl+C and SIGTERM that reach the group reach it, once each."""
    child = subprocess.Popen(command, start_new_session=True)

    def forward(signum, frame):
        child.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return child.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
