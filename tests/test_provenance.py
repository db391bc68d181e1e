"""What a run records for reproducing it: the patch holds every change that runs, and nothing the user keeps is
written. A plain git repository with no program in it; git only, no training."""

import hashlib
import subprocess
from pathlib import Path

import pytest
from runner import git

import provenance

USER = ("-c", "user.name=t", "-c", "user.email=t@example.com")


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()
            and ".git" not in p.relative_to(folder).parts}  # fmt: skip


@pytest.fixture
def repo(tmp_path) -> Path:
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "main.py").write_text("print('main')\n")
    (repo / "model.py").write_text("SCALE = 1.0\nSHIFT = 0.0\n")
    (repo / "old.py").write_text("gone = True\n")
    (repo / ".gitignore").write_text("ignored.txt\n")
    git(repo, "init", "-q")
    git(repo, *USER, "add", ".")
    git(repo, *USER, "commit", "-qm", "baseline")
    return repo


@pytest.mark.timeout(60)
def test_the_patch_holds_staged_unstaged_and_untracked_changes_and_rebuilds_the_tree(repo, tmp_path):
    (repo / "model.py").write_text("SCALE = 2.0\nSHIFT = 0.0\n")
    git(repo, "add", "model.py")  # staged, then changed again: both parts run
    (repo / "model.py").write_text("SCALE = 2.0\nSHIFT = 0.5\n")
    (repo / "old.py").unlink()
    (repo / "tweak.py").write_text("FACTOR = 1.25\n")  # untracked
    (repo / "staged_new.py").write_text("NEW = 1\n")
    git(repo, "add", "staged_new.py")
    (repo / "weights.bin").write_bytes(bytes(range(256)) * 4)  # binary, untracked
    (repo / "ignored.txt").write_text("not code\n")
    (repo / "big.txt").write_bytes(b"x" * (provenance.MAX_UNTRACKED_BYTES + 1))
    (repo / "stories.txt").write_text("the run's data\n")
    for folder, marker in (("runs/a", "run.json"), ("cache/files/x", ".lock"), ("__pycache__", "model.pyc")):
        (repo / folder).mkdir(parents=True)
        (repo / folder / marker).write_text("{}")
        (repo / folder / "written.txt").write_text("written by a run\n")
    index = (repo / ".git" / "index").read_bytes()

    code, patch = provenance.code_state(repo / "main.py", data_file=repo / "stories.txt")

    assert (repo / ".git" / "index").read_bytes() == index
    assert code["commit"] == git(repo, "rev-parse", "HEAD") and code["program"] == "main.py"
    assert code["patch_sha256"] == hashlib.sha256(patch).hexdigest()
    assert code["left_out"] == [{"path": "big.txt", "bytes": provenance.MAX_UNTRACKED_BYTES + 1}]
    rebuilt = tmp_path / "rebuilt"
    git(repo, "worktree", "add", "-q", "--detach", str(rebuilt), code["commit"])
    subprocess.run(["git", "-C", str(rebuilt), "apply", "--binary", "-"], input=patch, check=True)
    left_out = {"ignored.txt", "big.txt", "stories.txt"}
    expected = {name: content for name, content in files_of(repo).items()
                if name not in left_out and name.split("/")[0] not in ("runs", "cache", "__pycache__")}  # fmt: skip
    assert files_of(rebuilt) == expected


@pytest.mark.timeout(60)
def test_a_clean_tree_has_an_empty_patch_and_no_repository_says_why(repo, tmp_path):
    code, patch = provenance.code_state(repo / "main.py")
    assert patch == b"" and code["patch_bytes"] == 0
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "main.py").write_text("")
    code, patch = provenance.code_state(alone / "main.py")
    assert code["commit"] is None and "not in a git repository" in code["problem"] and patch == b""


@pytest.mark.timeout(60)
def test_the_data_is_identified_by_its_bytes(tmp_path):
    text = tmp_path / "stories.txt"
    text.write_bytes(b"Once upon a time\n")
    identity = provenance.data_identity(str(text), [])
    assert identity == {"kind": "file", "path": str(text.resolve()), "bytes": 17,
                        "sha256": hashlib.sha256(b"Once upon a time\n").hexdigest()}  # fmt: skip
    source = {"url": "http://h/TinyStories-train.txt", "size": 9, "etag": '"e"', "bytes": 5, "tokens": 2, "other": 1}
    assert provenance.data_identity("tinystories", [source])["files"] == [
        {"url": "http://h/TinyStories-train.txt", "size": 9, "etag": '"e"', "bytes": 5, "tokens": 2}
    ]
