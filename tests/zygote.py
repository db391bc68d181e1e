"""Programs started for the tests from an interpreter that has already imported torch.

Most of the suite's time was spent starting main.py: importing torch (and the torch._dynamo that torch.optim
imports) takes about 2 of the 3 seconds of a short run, ~150 times. A zygote is a Python process that imports
those libraries once and forks a child for each program a test starts. The child becomes the program: its own
standard streams, folder, environment and argv, then main.py run as `__main__`, ending as `python main.py` ends
(atexit, exit code, death by signal). The test gets a subprocess.Popen whose process is that child, so signals,
pipes, timeouts and exit codes are the real ones.

Design choices:
- Only libraries that read nothing of the run's environment when imported are preloaded: not the project's
  modules (each test's copy is imported fresh in the child, edited or not), not ClearML (its configuration follows
  HOME and CLEARML_*). The zygote imports with OMP_NUM_THREADS=1, as every program the tests start has it
  (conftest.py); a program asked to run with other threads starts as a new interpreter.
- The zygote imports and forks from one thread, and runs no torch operation, so a child starts with no thread pool
  and no lock held.
- A child is the zygote's, not the test's: the zygote reaps it and writes its wait status to a pipe the test
  passed with the request, which Popen's wait and poll read instead of waitpid.
- TESTS_FRESH_PROCESSES=1 starts every program as a new interpreter instead, to check that nothing depends on it.
"""

import gc
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading

PRELOADED = ("torch", "torch._dynamo", "numpy", "requests", "tqdm")  # torch.optim imports torch._dynamo when used
MESSAGE_MAX = 1 << 20  # a request: argv, folder and environment, as JSON


def serve(channel: socket.socket) -> tuple[dict, list[int]] | None:
    """Fork a child for each request on `channel`; returns in a child only (its request and standard streams),
    and None in the zygote once the tests are gone."""
    wakeup_read, wakeup_write = os.pipe()
    os.set_blocking(wakeup_write, False)
    signal.set_wakeup_fd(wakeup_write)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # a handler, so that a child's end wakes the select
    status_pipes: dict[int, int] = {}
    while True:
        ready, _, _ = select.select([channel, wakeup_read], [], [])
        if wakeup_read in ready:
            os.read(wakeup_read, 4096)
            report_ended(status_pipes)
        if channel not in ready:
            continue
        message, fds, _, _ = socket.recv_fds(channel, MESSAGE_MAX, 4)
        if not message:
            return None
        request = json.loads(message)
        pid = os.fork()
        if pid == 0:
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            for fd in [wakeup_read, wakeup_write, channel.detach(), *status_pipes.values(), fds.pop()]:
                os.close(fd)
            return request, fds
        status_pipes[pid] = fds.pop()
        for fd in fds:
            os.close(fd)
        channel.send(f"{request['id']} {pid}".encode())


def report_ended(status_pipes: dict[int, int]) -> None:
    """Reap every child that ended and write its wait status to its test's pipe."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        pipe = status_pipes.pop(pid)
        os.write(pipe, str(status).encode())
        os.close(pipe)


def become(request: dict, streams: list[int]) -> None:
    """Turn this child into the requested program's process, as a new interpreter would start it."""
    import tempfile

    for fd, standard in zip(streams, (0, 1, 2), strict=True):
        os.dup2(fd, standard)
    for fd in set(streams):
        os.close(fd)
    if request["new_session"]:
        os.setsid()
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    tempfile.tempdir = None  # found again from TMPDIR


def run(argv: list[str]) -> None:
    """What `python SCRIPT ARGS` or `python -m MODULE ARGS` does once the interpreter has started."""
    import runpy

    if argv[0] == "-m":
        sys.argv, sys.path[0] = argv[1:], os.getcwd()
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv, sys.path[0] = argv, os.path.dirname(os.path.abspath(argv[0]))
        runpy.run_path(argv[0], run_name="__main__")


class Child(subprocess.Popen):
    """A Popen whose process the zygote forks; its wait status comes through a pipe, not waitpid."""

    def __init__(self, zygote: "Zygote", *args, **kwargs):
        self._zygote, self._status = zygote, None
        super().__init__(*args, **kwargs)

    def _execute_child(self, args, executable, preexec_fn, close_fds, pass_fds, cwd, env, startupinfo,
                       creationflags, shell, p2cread, p2cwrite, c2pread, c2pwrite, errread, errwrite,
                       restore_signals, gid, gids, uid, umask, start_new_session, *_):  # fmt: skip
        self._status_read, status_write = os.pipe()
        streams = [p2cread, c2pwrite, errwrite]
        streams = [fd if fd != -1 else standard for fd, standard in zip(streams, (0, 1, 2), strict=True)]
        request = dict(argv=list(args[1:]), cwd=os.path.abspath(cwd or "."), env=dict(env or os.environ),
                       new_session=start_new_session)  # fmt: skip
        try:
            self.pid = self._zygote.fork(request, [*streams, status_write])
        finally:
            os.close(status_write)
        self._child_created = True
        self._close_pipe_fds(p2cread, p2cwrite, c2pread, c2pwrite, errread, errwrite)

    def _status_waitpid(self, pid: int, flags: int) -> tuple[int, int]:
        if self._status is None:
            ready, _, _ = select.select([self._status_read], [], [], 0 if flags & os.WNOHANG else None)
            if not ready:
                return 0, 0
            self._status = int(os.read(self._status_read, 64))
            os.close(self._status_read)
        return pid, self._status

    def _internal_poll(self, _deadstate=None, **_):
        return super()._internal_poll(_deadstate, _waitpid=self._status_waitpid)

    def _try_wait(self, wait_flags):
        return self._status_waitpid(self.pid, wait_flags)


class Zygote:
    """The test process's end of one zygote, started when first needed and ended with the test process."""

    def __init__(self):
        self.lock, self.channel, self.process, self.requests = threading.Lock(), None, None, 0

    def fork(self, request: dict, fds: list[int]) -> int:
        """The pid of a child started for `request`, with `fds` as its standard streams and status pipe."""
        with self.lock:
            if self.process is None:
                self.start()
            self.requests += 1
            try:
                socket.send_fds(self.channel, [json.dumps({**request, "id": self.requests}).encode()], fds)
                while True:  # a reply left unread by a test its timeout ended in here belongs to no one now
                    answer, pid = self.channel.recv(64).decode().split()
                    if int(answer) == self.requests:
                        return int(pid)
            except (OSError, ValueError) as e:  # an empty reply: the zygote is gone
                message = f"the zygote ended with exit code {self.process.wait()}: see its stderr above"
                raise RuntimeError(message) from e

    def start(self) -> None:
        self.channel, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}  # no thread pool to fork
        self.process = subprocess.Popen(
            [sys.executable, __file__, str(theirs.fileno())], pass_fds=[theirs.fileno()], env=env,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
        theirs.close()

    def popen(self, argv: list[str], **kwargs) -> subprocess.Popen:
        """subprocess.Popen([sys.executable, *argv], **kwargs), from the zygote unless TESTS_FRESH_PROCESSES=1."""
        threads = (kwargs.get("env") or os.environ).get("OMP_NUM_THREADS")
        if os.environ.get("TESTS_FRESH_PROCESSES") == "1" or threads != "1":  # torch sized its pools on import
            return subprocess.Popen([sys.executable, *argv], **kwargs)
        return Child(self, [sys.executable, *argv], **kwargs)


ZYGOTE = Zygote()


if __name__ == "__main__":
    for name in PRELOADED:
        __import__(name)
    assert threading.active_count() == 1 and len(os.listdir("/proc/self/task")) == 1, "a thread would not fork"
    # The libraries' objects move out of the collector's reach: a child's collections would otherwise visit them
    # all and so copy every page the child shares with the zygote (a quarter of a second in a short run).
    gc.freeze()
    started = serve(socket.socket(fileno=int(sys.argv[1])))
    if started is None:
        sys.exit(0)
    request, streams = started
    become(request, streams)
    run(request["argv"])
