"""
Experiment tracking in ClearML: the only file that imports clearml.

Design choices:
- One Task per run in project `gpt-from-scratch`, named by the hypothesis (the comment), tagged by dataset, created
  first, right after the flags are checked: everything the run prints, data preparation included, is in the task's
  console. ClearML captures the git commit and the uncommitted diff itself.
- The flags are connected as Hyperparameters → Args and the run goes on with the values the task holds: under
  clearml-agent, those edited in the web UI. A flag left unset is recorded empty with its type, so a value typed
  into the web UI comes back as a number, not a string. `offline` records how the run is really tracked.
- A server is used only when it works: an authenticated `auth.login` answered within SERVER_TIMEOUT_S in all. Any
  less (no answer, a proxy's 502, a 500, rejected credentials) → ClearML's offline mode with one warning naming the
  problem: training never waits on tracking. A clearml.conf that does not parse is the user's to fix (ConfigError,
  naming the file and line); with --offline the run goes on without it.
- Resume continues the same task at the steps the run reports. ClearML's `continue_last_task=<id>` would add the
  task's last iteration + 1 to every report (step 90 of a run resumed at 80 lands at 171); `reuse_last_task_id=<id>`
  with `continue_last_task=0` continues with no offset. Offline, a resumed run writes a new session, also at the
  true steps: `Task.import_offline_session(zip, previous_task_id=...)` joins it to the first with no offset.
- Generated samples go to Plots as one table, `Generated Sample`, holding every evaluation so far (Compare → Plots
  shows each run's last table in full, side by side), and to Debug samples as one .txt per evaluation. ClearML names
  a debug sample's file by title, series and a per-process counter (modulo metrics.file_history_size), so with one
  series a resumed run would write over the first run's files; the series is the step, which no other evaluation
  of the run has. Samples are cleaned for display (clean_sample).
- Requirements are the installed versions of what the program's own modules import, not ClearML's scan of the whole
  repository (which lists test-only packages and misses what only the modules it did not scan import).
- ClearML's machine monitor keeps CPU and memory; its GPU probe is off where no GPU answers it, instead of two
  warnings on every CPU-only run.
- Reporting runs in a thread, not ClearML's forked subprocess: the fork can inherit the pipe of the `git`
  subprocess that the repository-detection thread is reading, which then never sees EOF and stalls `close()` for
  minutes, leaving the task without commit and diff. The class attribute is set before `Task.init`, so it holds
  whatever the user's clearml.conf says.
- ClearML's own reseeding of torch at `Task.init` is off: it would undo the RNG state a resumed run restores.
- Framework auto-logging is off: the checkpoint is registered once, explicitly, as the task's output model.
- Offline sessions are marked completed when imported, so an aborted or failed run also gets a tag saying so.
- A process started by another one that tracks a ClearML task inherits its mark, and ClearML would then give it a
  stub instead of a task of its own (nothing recorded): the mark is dropped before `Task.init`.
- Under torchrun only global rank 0 creates a task; the other ranks hold a `NoTracker`. (ClearML would otherwise
  attach local ranks to their node's task by itself, and create one task per node.)
- `--queue` hands the task, its flags connected, to clearml-agent with `Task.execute_remotely`; on the agent the
  same call does nothing and the run trains there.
- What reproducing a run needs (provenance.py) goes into the record, as run.json's `reproduce` section with the
  patch beside it in `code.patch`, and into the task, as the configuration object `reproduce` and the artifact
  `code.patch`, so an offline session alone is enough to reproduce the run. A resumed run records its own, and
  writes a patch of its own only where its code changed.
"""

import contextlib
import dis
import functools
import hashlib
import importlib.metadata
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import types
import unicodedata
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import requests
from clearml import OutputModel, Task
from clearml.backend_api import Session
from clearml.backend_api.session.defs import ENV_ACCESS_KEY, ENV_SECRET_KEY
from clearml.backend_config.defs import LOCAL_CONFIG_FILE_OVERRIDE_VAR, LOCAL_CONFIG_FILES
from clearml.backend_interface.util import get_queue_id
from clearml.config import config_obj, running_remotely
from clearml.config.defs import PROC_MASTER_ID_ENV_VAR
from clearml.utilities.pyhocon import ConfigFactory
from clearml.utilities.resource_monitor import ResourceMonitor

import checkpoint
import data
from errors import UsageError

if TYPE_CHECKING:
    from provenance import Provenance

SERVER_TIMEOUT_S = 3.0
SAMPLE_TITLE = "Generated Sample"
SAMPLE_TABLE_ROWS = 500  # the table is sent whole at each evaluation; the latest rows are the ones worth the bytes
SOURCE_DIR = Path(__file__).resolve().parent
REPRODUCE = "reproduce"  # the name of the task's configuration object with run.json's "reproduce" section
IMPORT_NAME, EXTENDED_ARG = dis.opmap["IMPORT_NAME"], dis.opmap["EXTENDED_ARG"]  # opcodes read by imported_names
PATCH = "code.patch"  # the patch of a run's uncommitted changes, in its folder and as the task's artifact


class ConfigError(UsageError):
    """A ClearML configuration file that does not parse."""


def config_files() -> list[Path]:
    """The files ClearML reads its configuration from: CLEARML_CONFIG_FILE, else ~/trains.conf and ~/clearml.conf."""
    override = LOCAL_CONFIG_FILE_OVERRIDE_VAR.get()
    return [
        Path(os.path.expanduser(os.path.expandvars(name))) for name in ([override] if override else LOCAL_CONFIG_FILES)
    ]


def config_problem() -> str | None:
    """'<file> line <n>: <what>' for the first ClearML configuration file that does not parse, else None."""
    for path in config_files():
        if not path.is_file():
            continue
        try:
            ConfigFactory.parse_file(str(path))
        except Exception as e:  # pyparsing's errors, a bad include or substitution, an unreadable file
            line = getattr(e, "lineno", None)
            return f"{path}{f' line {line}' if line else ''}: {getattr(e, 'msg', None) or e}"
    return None


def configured_server() -> str | None:
    """The API server URL when ClearML credentials are configured (environment or clearml.conf), else None."""
    return Session.get_api_server_host() if credentials()[0] else None


def credentials() -> tuple[str | None, str | None]:
    return (
        ENV_ACCESS_KEY.get() or config_obj.get("api.credentials.access_key", None),
        ENV_SECRET_KEY.get() or config_obj.get("api.credentials.secret_key", None),
    )


def server_problem(url: str, access_key: str, secret_key: str | None) -> str | None:
    """Why the ClearML API at `url` cannot be used, or None when it logs in with these credentials.

    The call runs in a daemon thread joined for SERVER_TIMEOUT_S, so nothing (name lookup, a server that trickles
    its answer) makes the run wait longer; a thread still waiting is left behind.
    """
    outcome = []
    thread = threading.Thread(target=lambda: outcome.append(login_problem(url, access_key, secret_key)), daemon=True)
    thread.start()
    thread.join(SERVER_TIMEOUT_S)
    return outcome[0] if outcome else f"does not answer within {SERVER_TIMEOUT_S:g} s"


def login_problem(url: str, access_key: str, secret_key: str | None) -> str | None:
    try:
        response = requests.get(
            f"{url.rstrip('/')}/auth.login", auth=(access_key, secret_key or ""), timeout=SERVER_TIMEOUT_S
        )
    except requests.Timeout:
        return f"does not answer within {SERVER_TIMEOUT_S:g} s"
    except requests.RequestException as e:
        reasons = re.findall(r"\[Errno -?\d+\] ([^'\")]+)", str(e))
        return f"does not answer ({reasons[-1].strip() if reasons else type(e).__name__})"
    if response.status_code in (401, 403):
        return f"rejects the credentials (HTTP {response.status_code} to auth.login)"
    if response.status_code != 200:
        return f"answers HTTP {response.status_code} to auth.login"
    try:
        response.json()["data"]["token"]
    except (ValueError, KeyError, TypeError):
        return "is not a ClearML API server (its auth.login gives no token)"
    return None


def continue_arguments(task_id: str | None) -> dict:
    """`Task.init` arguments that continue task `task_id` at the steps the run reports, or start a new task.

    `continue_last_task=0` also keeps a task run by clearml-agent at its true steps: there ClearML would otherwise
    offset by the task's last iteration.
    """
    return dict(reuse_last_task_id=task_id or False, continue_last_task=0)


def clean_sample(text: str) -> str:
    """Generated text as it is shown: line breaks as \\n, no other control character but tab, and no trailing
    U+FFFD left by a multi-byte character that the last generated token cut in two."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = "".join(c for c in text if c in "\n\t" or unicodedata.category(c) != "Cc")
    return text.rstrip("\ufffd")


def imported_names(code: types.CodeType) -> set[str]:
    """Top-level names of the modules a module's code imports, wherever the import statement is: read from its
    compiled code (the cached bytecode), which is exact and far quicker than parsing the source again. The code is
    read as 2-byte units, opcode then argument (EXTENDED_ARG units carry an argument's high bytes): ten times
    quicker than `dis.get_instructions`, which costs a tenth of a second per run."""
    names, codes = set(), [code]
    while codes:
        code = codes.pop()
        raw, high = code.co_code, 0
        for i in range(0, len(raw), 2):
            if raw[i] == IMPORT_NAME:
                names.add(code.co_names[high | raw[i + 1]].split(".")[0])
            high = (high | raw[i + 1]) << 8 if raw[i] == EXTENDED_ARG else 0
        codes += [const for const in code.co_consts if isinstance(const, types.CodeType)]
    return names - {""}  # a relative import names no top-level module


@functools.cache  # the task and the run record both list them; the program's imports do not change meanwhile
def runtime_requirements() -> list[str]:
    """`name==version` of each installed distribution that the program's loaded modules import."""
    own = {path.stem for path in SOURCE_DIR.glob("*.py")}  # the program's own modules
    names = set()
    for name in own & set(sys.modules):
        module = sys.modules[name]
        if Path(getattr(module, "__file__", "") or "").resolve().parent == SOURCE_DIR:
            names |= imported_names(module.__loader__.get_code(name))
    providers = importlib.metadata.packages_distributions()
    found = {dist for name in names - own for dist in providers.get(name, [])}
    return sorted((f"{dist}=={importlib.metadata.version(dist)}" for dist in found), key=str.lower)


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


class MachineMonitor(ResourceMonitor):
    """ClearML's CPU and memory monitor, with the GPU probe off where no GPU answers it (on a CPU-only machine
    ClearML logs `Could not fetch GPU stats` and `GPU monitoring failed` in every run)."""

    def __init__(self, task, **kwargs):
        super().__init__(task, **kwargs)
        try:
            if self._gpustat:
                self._gpustat.new_query()
        except Exception:  # no NVIDIA library, no driver, no device: all mean there is nothing to monitor
            self._gpustat = None


class QueueError(UsageError):
    """A run that cannot be handed to a queue; the message is one line for the user."""


class TaskError(Exception):
    """A task that cannot be read from the server; the message is one line for the user."""


def task_as_session(task_id: str, folder: Path) -> None:
    """The server's task `task_id` written into `folder` as an offline session's files, for --reproduce: task.json,
    its scalars and last `Generated Sample` table in metrics.jsonl, and its code.patch artifact."""
    server = configured_server()
    problem = "is not configured" if server is None else server_problem(server, *credentials())
    if problem:
        raise TaskError(f"task {task_id}: the ClearML server {server or ''} {problem}; give the run's folder instead")
    try:
        task = Task.get_task(task_id=task_id)
        scalars, plots = task.get_reported_scalars(), task.get_reported_plots()
        patch = task.artifacts[PATCH].get_local_copy(raise_on_error=True) if PATCH in task.artifacts else None
    except Exception as e:  # an unknown id, an unreachable files server: ClearML raises its own kinds
        raise TaskError(f"task {task_id} cannot be read from the ClearML server {server}: {e}") from None
    events = [{"type": "training_stats_scalar", "metric": title, "variant": series, "iter": int(x), "value": y}
              for title, curves in scalars.items() for series, xy in curves.items()
              for x, y in zip(xy["x"], xy["y"], strict=True)]  # fmt: skip
    events += [{"type": "plot", "metric": SAMPLE_TITLE, "iter": plot.get("iter"), "plot_str": plot.get("plot_str")}
               for plot in plots if plot.get("metric") == SAMPLE_TITLE]  # fmt: skip
    data.write_json(folder / "task.json", {**task.export_task(), "id": task.id})
    data.write_atomic(folder / "metrics.jsonl", (json.dumps(events) + "\n").encode())
    if patch:
        artifact = folder / "data" / "server" / task.id / "artifacts" / PATCH / PATCH
        artifact.parent.mkdir(parents=True)
        data.write_atomic(artifact, Path(patch).read_bytes())


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
        offline: bool,
        continue_task_id: str | None = None,
    ):
        """Start the task (raises ConfigError for a clearml.conf that does not parse, unless `offline`).

        `continue_task_id`: the task of the run being resumed.
        """
        PROC_MASTER_ID_ENV_VAR.pop()  # a tracked process marks its children; this run wants a task of its own
        notes = []
        problem = config_problem()
        if problem and not offline:
            raise ConfigError(f"ClearML configuration {problem}; fix it, or run with --offline to go on without it")
        if problem:
            notes.append(f"warning: ClearML configuration {problem}; this --offline run goes on without it")
            LOCAL_CONFIG_FILE_OVERRIDE_VAR.set(os.devnull)  # ClearML reads no file then, only its defaults
        server = None if offline else configured_server()
        problem = server and server_problem(server, *credentials())
        if problem:
            notes.append(f"warning: ClearML server {server} {problem}; this run is tracked offline instead.")
            server = None
        self.offline = server is None
        if self.offline:
            Task.set_offline(True)
        if continue_task_id and (self.offline or continue_task_id.startswith("offline-")):
            notes.append(
                f"note: this resumed run writes a new {'offline session' if self.offline else 'task'}, at the same "
                "steps as the first; to join the curves, import the offline session with "
                f"Task.import_offline_session(zip, previous_task_id=<server id of {continue_task_id}>)."
            )
            continue_task_id = None
        if not git_repository(SOURCE_DIR):
            notes.append(f"note: {SOURCE_DIR} is not a git repository, so ClearML records no commit and no diff.")
        for note in notes:
            say(note)
        self.requirements = tempfile.NamedTemporaryFile("w", prefix="requirements-", suffix=".txt")
        self.requirements.write("\n".join(runtime_requirements()) + "\n")
        self.requirements.flush()  # ClearML reads it in its repository-detection thread, before close()
        Task.force_requirements_env_freeze(requirements_file=self.requirements.name)
        Task._report_subprocess_enabled = False  # see the module docstring
        Task.set_random_seed(None)  # ClearML would reseed torch at init; the run's own --seed decides
        self.task = Task.init(
            project_name=project,
            task_name=task_name,
            tags=tags,
            auto_connect_frameworks=False,
            auto_connect_arg_parser=False,
            auto_resource_monitoring=MachineMonitor,
            **continue_arguments(continue_task_id),
        )
        if comment:
            self.task.set_comment(comment)
        self.logger = self.task.get_logger()
        for note in notes:  # printed before the task started: the console has them too
            self.logger.report_text(note, print_console=False)

    @property
    def task_id(self) -> str:
        return self.task.id

    def add_tags(self, tags: list[str]) -> None:
        self.task.add_tags(tags)

    def update_flags(self, flags: dict) -> None:
        """Args as the run settled them after they were connected (a default that follows others, a step count):
        the values that differ from what the task holds, in one update."""
        held = self.task.get_parameters()
        as_held = {name: "" if value is None else str(value) for name, value in flags.items()}
        changed = {f"Args/{name}": flags[name] for name, text in as_held.items() if held.get(f"Args/{name}") != text}
        if changed:
            self.task.update_parameters(changed)

    def connect(self, flags: dict, types: dict[str, type]) -> dict:
        """Record `flags` as Hyperparameters → Args; return the values the run goes on with.

        Run by clearml-agent, those are the task's (edited in the web UI), cast to each flag's type; `types` gives
        the type of the flags left unset (None), recorded empty. `offline` is recorded as the mode the run is
        really tracked in; the value returned is the one asked for, so a resumed run decides again.
        """
        recorded = {**flags, "offline": self.offline} if "offline" in flags else dict(flags)
        values = dict(self.task.connect(recorded, name="Args"))
        if not running_remotely():
            for name, value in flags.items():
                if value is None and name in types:
                    self.task.set_parameter(f"Args/{name}", "", value_type=types[name].__name__)
        if "offline" in flags:
            values["offline"] = flags["offline"]
        return values

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

    def report_sample(self, text: str, step: int, rows: list[list]) -> None:
        """The sample as a .txt debug sample, and the `Generated Sample` table in Plots: `rows` are every
        evaluation's [step, Loss/val, sample] so far, this one's last."""
        self.logger.report_table(
            SAMPLE_TITLE,
            "stories",
            iteration=step,
            table_plot=[["step", "Loss/val", "sample"], *rows[-SAMPLE_TABLE_ROWS:]],
            extra_data={"columnwidth": [1, 1, 12]},
        )
        self.logger.report_media(
            SAMPLE_TITLE, f"step {step}", iteration=step, stream=io.StringIO(clean_sample(text)), file_extension=".txt"
        )

    def report_score(self, title: str, scores: dict, step: int) -> None:
        """An --eval_only score of the run's checkpoint at `step`: Scalars → `title`, series loss and bpb."""
        for series in ("loss", "bpb"):
            self.logger.report_scalar(title, series, value=scores[series], iteration=step)
        self.logger.report_text(f"{title} at step {step}: loss {scores['loss']:.6f}, bpb {scores['bpb']:.6f}")

    def keep_for_reproducing(self, record: dict, patch: Path | None) -> None:
        """run.json's `reproduce` section as configuration object `reproduce`, the patch as artifact `code.patch`."""
        self.task.set_configuration_object(REPRODUCE, config_text=json.dumps(record, indent=1), config_type="json",
                                           description="what python main.py --reproduce needs")  # fmt: skip
        if patch is not None:
            self.task.upload_artifact(PATCH, artifact_object=patch, wait_on_upload=True)

    def register_checkpoint(self, path: Path, tokenizer_path: Path, step: int) -> None:
        """The checkpoint as the task's output model, the tokenizer as an artifact. Offline the model refers to
        the run folder's file instead of copying it into the session (which would double the disk a run takes);
        with a server it is uploaded."""
        model = OutputModel(task=self.task, name="checkpoint", framework="PyTorch")
        if self.offline:  # update_weights fails offline in clearml 2.1 (its DummyModel has no `locked`)
            model._update_weights_offline(register_uri=path.resolve().as_uri(), iteration=step)
        else:
            model.update_weights(weights_filename=str(path), iteration=step, auto_delete_file=False)
        self.task.upload_artifact("tokenizer", artifact_object=tokenizer_path, wait_on_upload=True)

    def close(self, status: str, message: str = "", quiet: bool = False) -> None:
        """Close the task as "completed", "aborted" or "failed" and, unless `quiet`, say where an offline session
        lies."""
        if status != "completed":
            self.task.add_tags([status])
            if status == "aborted":
                self.task.mark_stopped(force=True, status_message=message or None)
            else:
                self.task.mark_failed(status_reason=message, status_message=message, force=True)
        folder = self.task.get_offline_mode_folder() if self.offline and not quiet else None
        self.task.close()
        self.requirements.close()
        if folder:
            say(
                f"ClearML offline session: {folder}.zip\n"
                f"  import it into a server later with: clearml-task --import-offline-session {folder}.zip"
            )


class RunRecord:
    """The run's own record beside its checkpoint, readable with or without ClearML (compare.py reads it).

    `run.json` is the header, written once (temporary file, then rename): what was run, exactly as configured, and
    where it is tracked. `metrics.jsonl` holds one JSON event per line, appended, flushed and fsynced as it happens:
    status changes and every evaluation. A kill -9 loses at most the line being written; readers skip a torn last
    line. A resumed run appends to the same file, starting with a "resumed" event that holds the configuration
    from then on. Neither file is ever a symbolic link (one is refused, not followed).
    """

    FORMAT = 2

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.header_path = self.folder / "run.json"
        self.metrics_path = self.folder / "metrics.jsonl"
        self.elapsed_before = 0.0  # seconds recorded by earlier sessions of a resumed run
        self.started = time.monotonic()

    def start(self, tracker: Tracker, header: dict, step: int, resumed: bool,
              provenance: "Provenance | None" = None) -> None:  # fmt: skip
        """Write the header of a new run (`header`: run_id, flags and what was trained), or mark where a resumed
        run continues its record; with what reproducing it needs (provenance.capture)."""
        clearml = clearml_location(tracker)
        continuing = resumed and self.header_path.is_file()
        reproduce = {"reproduce": self.keep_provenance(provenance, tracker, step, continuing)} if provenance else {}
        if continuing:
            self.elapsed_before = last_elapsed(self.metrics_path)
            self.append({"event": "resumed", "step": step, "flags": header["flags"], "clearml": clearml, **reproduce})
            return
        commit, dirty = git_state(Path(sys.argv[0]).resolve().parent)
        header = {
            "format": self.FORMAT,
            **header,
            "hypothesis": header["flags"].get("comment", ""),
            "git": {"commit": commit, "dirty": dirty},
            "clearml": clearml,
            "started": datetime.now().astimezone().isoformat(timespec="milliseconds"),  # orders runs started together
            **reproduce,
        }
        data.write_atomic(self.header_path, (json.dumps(header, indent=1, default=str) + "\n").encode())
        self.append({"event": "status", "status": "running", "step": step})

    def keep_provenance(self, provenance: "Provenance", tracker: Tracker, step: int, continuing: bool) -> dict:
        """The patch written beside the record (by a resumed run, only where its code changed), and both given to
        the task; returns the record's `reproduce` section, naming the patch's file."""
        record = {**provenance.record, "code": dict(provenance.record["code"])}
        code, patch = record["code"], None
        if code.get("commit"):
            patch = self.folder / PATCH
            if continuing and file_digest(patch) != code["patch_sha256"]:
                patch = self.folder / f"code.resumed-{step}.patch"  # the code changed since the run started
            if not (continuing and patch.name == PATCH):
                data.write_atomic(patch, provenance.patch)
            code["patch"] = patch.name
        tracker.keep_for_reproducing(record, patch)
        return record

    def evaluation(self, step: int, tokens: int, loss_train: float, loss_val: float, bpb: float, lr: float,
                   tokens_per_s: float, sample: str) -> None:  # fmt: skip
        self.append({"event": "eval", "step": step, "tokens": tokens, "loss_train": loss_train, "loss_val": loss_val,
                     "bpb": bpb, "lr": lr, "tokens_per_s": tokens_per_s}, sample=sample)  # fmt: skip

    def scored(self, step: int, data_flag: str, split: str, loss: float, bpb: float) -> None:
        """An `--eval_only` score of the run's checkpoint at `step`."""
        self.elapsed_before = last_elapsed(self.metrics_path)
        self.append({"event": "eval_only", "step": step, "data": data_flag, "split": split, "loss": loss, "bpb": bpb})

    def status(self, status: str, message: str = "", step: int | None = None) -> None:
        """ "completed", "aborted" or "failed", with what happened."""
        self.append({"event": "status", "status": status, "message": message, "step": step})

    def append(self, event: dict, sample: str | None = None) -> None:
        event["elapsed"] = round(self.elapsed_before + time.monotonic() - self.started, 3)
        event["time"] = time.time()
        if sample is not None:
            event["sample"] = sample  # last, so a reader that only wants the numbers can cut the line before it
        line = json.dumps(event, default=str) + "\n"  # one write of one whole line
        with checkpoint.open_own_file(self.metrics_path, "a") as f:
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


def file_digest(path: Path) -> str | None:
    """The sha256 of a file's bytes, or None where there is no such file."""
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def last_elapsed(metrics_path: Path) -> float:
    """The elapsed seconds of the last whole event, so a resumed run's clock continues where it stopped."""
    elapsed = 0.0
    with contextlib.suppress(OSError), open(metrics_path, encoding="utf-8") as f:
        for line in f:
            with contextlib.suppress(ValueError, TypeError, AttributeError):
                elapsed = float(json.loads(line).get("elapsed", elapsed))
    return elapsed
