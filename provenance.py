"""
What reproducing a run needs, taken as it starts: its code, its data, the versions, the device and the dtype.

Design choices:
- The code is the commit and one patch against it holding every change that runs: staged and unstaged changes and
  the untracked files git does not ignore, as `git diff --binary` (binary files included). The patch is made in a
  temporary index (GIT_INDEX_FILE, read from the commit), so the user's index is never written; git commands run
  with GIT_OPTIONAL_LOCKS=0 and no external diff or text conversion.
- Left out of the patch: the run's data file (identified by its hash instead), what runs write beside the code
  (folders holding a run or a data cache, which hold `.lock`, `run.json` or `ckpt.pt`), bytecode caches
  (`__pycache__`), and untracked files over MAX_UNTRACKED_BYTES, which are data or weights rather than code; the
  last are listed in the record by name and size.
- A local data file is identified by the sha256 of its bytes (read once at the start of a run, about a second per
  GB); TinyStories by the base URL, the version, and for each file the server's size and ETag and the bytes of it
  the run read.
- Versions are Python's, torch's and those of the installed packages the program imports
  (tracking.runtime_requirements). The device is its kind, the GPU's or CPU's name and the CPU threads: with the
  dtype and torch's version, what decides whether a rerun can be bit-identical.
- Nothing here fails a run: where git or a file cannot be read, the record says why and the run goes on.
"""

import hashlib
import os
import platform
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

import tracking

FORMAT = 1
MAX_UNTRACKED_BYTES = 1 << 20  # an untracked file larger than this is data or weights, not code
WRITTEN_BY_RUNS = (".lock", "run.json", "ckpt.pt")  # a folder holding one of these is a run folder or a data cache
GIT_TIMEOUT_S = 60


@dataclass
class Provenance:
    record: dict  # the "reproduce" section of run.json; record["code"]["patch_sha256"] names `patch`
    patch: bytes


def capture(data_flag: str, sources: list[dict], device: str, dtype: str, program: Path | None = None) -> Provenance:
    """What reproducing this run needs; `sources` is data.Splits.sources, `program` the entry script (sys.argv[0])."""
    program = Path(program or sys.argv[0]).resolve()
    data_file = None if data_flag == "tinystories" else Path(data_flag).expanduser().resolve()
    code, patch = code_state(program, data_file)
    record = {
        "format": FORMAT,
        "code": code,
        "data": data_identity(data_flag, sources),
        "versions": versions(),
        "device": machine(device, dtype),
    }
    return Provenance(record, patch)


# -------------------------------------------------------------------------------------------------------------------
# code


class GitError(Exception):
    pass


def git(folder: Path, *args: str, index: Path | None = None, stdin: bytes | None = None) -> bytes:
    """The output of a git command in `folder`, with the temporary `index` in place of the user's."""
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0", **({"GIT_INDEX_FILE": str(index)} if index else {})}
    try:
        result = subprocess.run(["git", "-C", str(folder), *args], input=stdin, capture_output=True, env=env,
                                timeout=GIT_TIMEOUT_S)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as e:
        raise GitError(f"git {args[0]}: {type(e).__name__}") from None
    if result.returncode:
        lines = result.stderr.decode(errors="replace").strip().splitlines()
        raise GitError(lines[-1] if lines else f"git {args[0]} failed")
    return result.stdout


def code_state(program: Path, data_file: Path | None = None) -> tuple[dict, bytes]:
    """The commit of the repository holding `program`, and the patch from it to the files as they are now (the run's
    data file left out: it is identified by its hash)."""
    try:
        root = Path(git(program.parent, "rev-parse", "--show-toplevel").decode().strip())
        commit = git(root, "rev-parse", "--verify", "HEAD^{commit}").decode().strip()
    except GitError:
        return {"commit": None, "problem": f"{program.parent} is not in a git repository with a commit"}, b""
    code = {"commit": commit, "root": str(root), "program": program.relative_to(root).as_posix(),
            "cwd": str(Path.cwd().resolve())}  # fmt: skip
    try:
        patch, left_out = changes(root, data_file)
    except GitError as e:
        return {**code, "commit": None, "problem": f"the uncommitted changes could not be read ({e})"}, b""
    code.update(patch_sha256=hashlib.sha256(patch).hexdigest(), patch_bytes=len(patch), left_out=left_out)
    return code, patch


def changes(root: Path, data_file: Path | None = None) -> tuple[bytes, list[dict]]:
    """Every change from HEAD to the working tree, untracked files included, as a binary patch; and the untracked
    files left out for their size."""
    with tempfile.TemporaryDirectory(prefix="gpt-provenance-") as tmp:
        index = Path(tmp) / "index"
        git(root, "read-tree", "HEAD", index=index)
        git(root, "add", "--update", "--", ":/", index=index)
        others = git(root, "ls-files", "-z", "--others", "--exclude-standard", "--", ":/", index=index)
        names = [name for name in others.decode().split("\0") if name and (root / name).resolve() != data_file]
        kept, left_out = untracked_code(root, names)
        if kept:
            git(root, "--literal-pathspecs", "add", "--pathspec-from-file=-", "--pathspec-file-nul", index=index,
                stdin="\0".join(kept).encode())  # fmt: skip
        patch = git(root, "diff", "--cached", "--binary", "--no-ext-diff", "--no-textconv", "--no-color",
                    "--src-prefix=a/", "--dst-prefix=b/", "HEAD", index=index)  # fmt: skip
    return patch, left_out


def untracked_code(root: Path, names: list[str]) -> tuple[list[str], list[dict]]:
    """The untracked files (paths from the repository's root) that are code, and those left out for their size."""
    kept, left_out, written = [], [], {}
    for name in names:
        path = root / name
        if name.endswith("/"):  # a repository nested in this one: its own commit, not part of this patch
            continue
        folders = [parent for parent in path.parents if parent != root and parent.is_relative_to(root)]
        if any(folder.name == "__pycache__" for folder in folders) or path.suffix == ".pyc":
            continue
        if any(written_by_runs(folder, written) for folder in folders):
            continue
        size = path.lstat().st_size
        if size > MAX_UNTRACKED_BYTES:
            left_out.append({"path": name, "bytes": size})
        else:
            kept.append(name)
    return kept, left_out


def written_by_runs(folder: Path, seen: dict[Path, bool]) -> bool:
    if folder not in seen:
        seen[folder] = any((folder / name).exists() for name in WRITTEN_BY_RUNS)
    return seen[folder]


# -------------------------------------------------------------------------------------------------------------------
# data, versions, machine


def data_identity(data_flag: str, sources: list[dict]) -> dict:
    """A local file's absolute path, size and sha256; or TinyStories' files as the server and the cache know them."""
    if data_flag == "tinystories":
        files = [{key: source.get(key) for key in ("url", "size", "etag", "bytes", "tokens")} for source in sources]
        return {"kind": "tinystories", "files": files}
    path = Path(data_flag).expanduser().resolve()
    try:
        return {"kind": "file", "path": str(path), "bytes": path.stat().st_size, "sha256": file_sha256(path)}
    except OSError as e:
        return {"kind": "file", "path": str(path), "problem": f"unreadable ({e.strerror})"}


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(8 << 20):
            digest.update(block)
    return digest.hexdigest()


def versions() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__,
            "packages": tracking.runtime_requirements()}  # fmt: skip


def machine(device: str, dtype: str) -> dict:
    """The device's kind and name and the dtype; on the CPU, the threads too."""
    name = torch.cuda.get_device_name() if device == "cuda" else cpu_name() if device == "cpu" else device
    found = {"device": device, "dtype": dtype, "name": name}
    if device == "cpu":
        found["threads"] = torch.get_num_threads()
    return found


def cpu_name() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else the architecture."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
