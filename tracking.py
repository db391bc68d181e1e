"""
Experiment tracking in ClearML: the only file that imports clearml.

Design choices:
- One Task per run in project `gpt-from-scratch`, named by the hypothesis (the comment), tagged by dataset.
  ClearML captures the git commit and the uncommitted diff itself. The flags are connected explicitly as
  Hyperparameters → Args, after a resumed run has merged its saved flags with the new ones, so the UI shows the
  values the run really used.
- No server configured → ClearML's own offline mode; the session folder can be imported into a server later.
  A configured server that does not answer within a few seconds → offline too, with one warning: training never
  waits on tracking.
- Reporting runs in a thread, not ClearML's forked subprocess: the fork can inherit the pipe of the `git`
  subprocess that the repository-detection thread is reading, which then never sees EOF and stalls `close()` for
  minutes, leaving the task without commit and diff. The class attribute is set before `Task.init`, so it holds
  whatever the user's clearml.conf says.
- ClearML's own reseeding of torch at `Task.init` is off: it would undo the RNG state a resumed run restores.
- Framework auto-logging is off: the checkpoint is registered once, explicitly, as the task's output model.
- Offline sessions are marked completed when imported, so an aborted or failed run also gets a tag saying so.
"""

import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import requests
from clearml import OutputModel, Task
from clearml.backend_api import Session
from clearml.config import config_obj

SERVER_TIMEOUT_S = 3.0


def configured_server() -> str | None:
    """The API server URL when ClearML credentials are configured (environment or clearml.conf), else None."""
    access_key = os.environ.get("CLEARML_API_ACCESS_KEY") or config_obj.get("api.credentials.access_key", None)
    return Session.get_api_server_host() if access_key else None


def server_answers(url: str) -> bool:
    try:
        requests.get(f"{url.rstrip('/')}/debug.ping", timeout=SERVER_TIMEOUT_S)
        return True
    except requests.RequestException:
        return False


def git_repository(path: Path) -> bool:
    try:
        result = subprocess.run(
            ["git", "-C", str(path), "rev-parse", "--is-inside-work-tree"], capture_output=True, timeout=5
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Tracker:
    """A ClearML Task and the few things a training run reports to it."""

    def __init__(
        self,
        project: str,
        task_name: str,
        tags: list[str],
        comment: str,
        flags: dict,
        offline: bool,
        continue_task_id: str | None = None,
    ):
        server = None if offline else configured_server()
        if server and not server_answers(server):
            say(f"warning: ClearML server {server} does not answer; this run is tracked offline instead.")
            server = None
        self.offline = server is None
        if self.offline:
            Task.set_offline(True)
            if continue_task_id:
                say(
                    "note: offline runs cannot continue a ClearML task; this resumed run writes a new offline "
                    "session. To join the curves, import it with Task.import_offline_session(zip, "
                    f"previous_task_id=<server id of {continue_task_id}>)."
                )
                continue_task_id = None
        source_dir = Path(sys.argv[0]).resolve().parent
        if not git_repository(source_dir):
            say(f"note: {source_dir} is not a git repository, so ClearML records no commit and no diff for this run.")
        Task._report_subprocess_enabled = False  # see the module docstring
        Task.set_random_seed(None)  # ClearML would reseed torch at init; the run's own --seed decides
        self.task = Task.init(
            project_name=project,
            task_name=task_name,
            tags=tags,
            reuse_last_task_id=False,
            continue_last_task=continue_task_id or False,
            auto_connect_frameworks=False,
            auto_connect_arg_parser=False,
        )
        self.task.connect(flags, name="Args")
        if comment:
            self.task.set_comment(comment)
        self.logger = self.task.get_logger()

    @property
    def task_id(self) -> str:
        return self.task.id

    def report_scalar(self, title: str, series: str, value: float, step: int) -> None:
        self.logger.report_scalar(title, series, value=value, iteration=step)

    def report_sample(self, text: str, step: int) -> None:
        """The generated text as a .txt debug sample titled `Generated Sample` (the console log has it too)."""
        self.logger.report_media(
            "Generated Sample", "sample", iteration=step, stream=io.StringIO(text), file_extension=".txt"
        )

    def register_checkpoint(self, path: Path, tokenizer_path: Path, step: int) -> None:
        """The checkpoint as the task's output model, the tokenizer as an artifact."""
        model = OutputModel(task=self.task, name="checkpoint", framework="PyTorch")
        if self.offline:  # update_weights fails offline in clearml 2.1 (its DummyModel has no `locked`)
            model._update_weights_offline(weights_filename=str(path), iteration=step)
        else:
            model.update_weights(weights_filename=str(path), iteration=step, auto_delete_file=False)
        self.task.upload_artifact("tokenizer", artifact_object=tokenizer_path, wait_on_upload=True)

    def close(self, status: str, message: str = "") -> None:
        """Close the task as "completed", "aborted" or "failed" and say where an offline session lies."""
        if status != "completed":
            self.task.add_tags([status])
            if status == "aborted":
                self.task.mark_stopped(force=True, status_message=message or None)
            else:
                self.task.mark_failed(status_reason=message, status_message=message, force=True)
        folder = self.task.get_offline_mode_folder() if self.offline else None
        self.task.close()
        if folder:
            say(
                f"ClearML offline session: {folder}.zip\n"
                f"  import it into a server later with: clearml-task --import-offline-session {folder}.zip"
            )


class RunRecord:
    """The run's own record beside its checkpoint, readable with or without ClearML (compare.py reads it).

    `run.json` is the header, written once (temporary file, then rename): what was run and where it is tracked.
    `metrics.jsonl` holds one JSON event per line, appended, flushed and fsynced as it happens: status changes and
    every evaluation. A kill -9 loses at most the line being written; readers skip a torn last line. A resumed run
    appends to the same file, starting with a "resumed" event that holds the flags as used from then on.
    """

    FORMAT = 1

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.header_path = self.folder / "run.json"
        self.metrics_path = self.folder / "metrics.jsonl"
        self.elapsed_before = 0.0  # seconds recorded by earlier sessions of a resumed run
        self.started = time.monotonic()

    def start(self, tracker: Tracker, flags: dict, dataset: str, tokenizer_fingerprint: str, vocab_size: int,
              step: int, resumed: bool) -> None:  # fmt: skip
        """Write the header of a new run, or mark where a resumed run continues its record."""
        clearml = clearml_location(tracker)
        if resumed and self.header_path.is_file():
            self.elapsed_before = last_elapsed(self.metrics_path)
            self.append({"event": "resumed", "step": step, "flags": flags, "clearml": clearml})
            return
        for path in (self.header_path, self.metrics_path):  # a reused folder keeps the earlier run's record aside
            if path.exists():
                path.rename(path.with_name(f"{path.name}.replaced-{datetime.now():%Y%m%d-%H%M%S}"))
        commit, dirty = git_state(Path(sys.argv[0]).resolve().parent)
        header = {
            "format": self.FORMAT,
            "hypothesis": flags.get("comment", ""),
            "flags": flags,
            "dataset": dataset,
            "tokenizer": {"fingerprint": tokenizer_fingerprint, "vocab_size": vocab_size},
            "git": {"commit": commit, "dirty": dirty},
            "clearml": clearml,
            "world_size": 1,
            "started": datetime.now().astimezone().isoformat(timespec="seconds"),
        }
        write_atomically(self.header_path, json.dumps(header, indent=1, default=str) + "\n")
        self.append({"event": "status", "status": "running", "step": step})

    def evaluation(self, step: int, tokens: int, loss_train: float, loss_val: float, bpb: float, lr: float,
                   sample: str) -> None:  # fmt: skip
        self.append({"event": "eval", "step": step, "tokens": tokens, "loss_train": loss_train, "loss_val": loss_val,
                     "bpb": bpb, "lr": lr}, sample=sample)  # fmt: skip

    def status(self, status: str, message: str = "", step: int | None = None) -> None:
        """ "completed", "aborted" or "failed", with what happened."""
        self.append({"event": "status", "status": status, "message": message, "step": step})

    def append(self, event: dict, sample: str | None = None) -> None:
        event["elapsed"] = round(self.elapsed_before + time.monotonic() - self.started, 3)
        event["time"] = time.time()
        if sample is not None:
            event["sample"] = sample  # last, so a reader that only wants the numbers can cut the line before it
        line = json.dumps(event, default=str) + "\n"  # one write of one whole line
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())


def clearml_location(tracker: Tracker) -> dict:
    """The task id, and where to see it: the offline session's zip, or the task's page on the server."""
    task = tracker.task
    if tracker.offline:
        return {"task_id": task.id, "offline_session": f"{task.get_offline_mode_folder()}.zip"}
    return {"task_id": task.id, "web_page": task.get_output_log_web_page()}


def git_state(path: Path) -> tuple[str | None, bool | None]:
    """The commit checked out at `path` and whether the tree has uncommitted changes; (None, None) without git."""
    try:
        commit = subprocess.run(
            ["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
        changes = subprocess.run(
            ["git", "-C", str(path), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None, None
    if commit.returncode or changes.returncode:
        return None, None
    return commit.stdout.strip(), bool(changes.stdout.strip())


def last_elapsed(metrics_path: Path) -> float:
    """The elapsed seconds of the last whole event, so a resumed run's clock continues where it stopped."""
    elapsed = 0.0
    with contextlib.suppress(OSError), open(metrics_path, encoding="utf-8") as f:
        for line in f:
            with contextlib.suppress(ValueError, TypeError, AttributeError):
                elapsed = float(json.loads(line).get("elapsed", elapsed))
    return elapsed


def write_atomically(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
