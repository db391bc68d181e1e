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
- Under torchrun only global rank 0 creates a task; the other ranks hold a `NoTracker`. (ClearML would otherwise
  attach local ranks to their node's task by itself, and create one task per node.)
- `--queue` hands the task, its flags connected, to clearml-agent with `Task.execute_remotely`; on the agent the
  same call does nothing and the run trains there.
"""

import io
import os
import subprocess
import sys
from pathlib import Path

import requests
from clearml import OutputModel, Task
from clearml.backend_api import Session
from clearml.backend_interface.util import get_queue_id
from clearml.config import config_obj, running_remotely

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


class QueueError(Exception):
    """A run that cannot be handed to a queue; the message is one line for the user."""


class NoTracker:
    """Stands in for Tracker where nothing is reported (every torchrun rank but 0): no task, every call does nothing."""

    task_id = None
    offline = True

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: None


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

    def update_flags(self, changed: dict) -> None:
        """Flags the run settled after they were connected (a default that depends on others, a step count)."""
        for name, value in changed.items():
            self.task.set_parameter(f"Args/{name}", value)

    def enqueue(self, queue: str) -> None:
        """Hand the task to the clearml-agents listening on `queue` and end this process (exit 0); the agent re-runs
        it from its commit, diff and Args. Running on the agent, this does nothing."""
        if running_remotely():
            return
        if self.offline:
            raise QueueError(f"--queue {queue}: the ClearML server does not answer, so the run cannot be queued")
        if get_queue_id(self.task.session, queue) is None:
            raise QueueError(
                f"--queue {queue}: the ClearML server has no such queue; create it in the web UI (Workers & Queues) "
                f"or start an agent with: clearml-agent daemon --queue {queue} --create-queue"
            )
        say(f"task {self.task.id} queued on {queue!r}; an agent listening on it runs it (results in the web UI)")
        self.task.execute_remotely(queue_name=queue, exit_process=True)

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
