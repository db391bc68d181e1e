"""Opening anyone's run is safe: checkpoints that carry code, are corrupted or belong to another run are refused
before anything is written; a refused --overwrite leaves the old run; the run's own files are never followed
through a symbolic link; the token cache on a full disk ends in one line. The checkpoint reader is fuzzed.

Training data is a slice of the TinyStories train sample in tests/data (see SOURCES.md there).
"""

import io
import os
import shutil
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from runner import QUICK, make_stories_project

import checkpoint as ckpt


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    project = make_stories_project(tmp_path_factory.mktemp("hostile"))
    for folder in ("RUN", "OTHER"):
        result = project.run(*QUICK, "--max_steps", "3", "--out_dir", folder)
        assert result.returncode == 0, result.stderr[-2000:]
    return project


def last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


def folder_contents(folder) -> dict:
    """Every file's bytes but the lock's, which names the process that holds (or last held) the folder."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file() and p.name != ".lock"}


def copy_run(project, name: str) -> None:
    shutil.rmtree(project.path / name, ignore_errors=True)
    shutil.copytree(project.path / "RUN", project.path / name)


class RunsCode:
    def __reduce__(self):
        return (os.system, ("touch CODE-RAN",))


def test_a_checkpoint_that_carries_code_is_refused_and_its_code_never_runs(project):
    copy_run(project, "EVIL")
    torch.save({"program": "gpt-from-scratch", "model": RunsCode()}, project.path / "EVIL" / "ckpt.pt")
    for extra in ([], ["--eval_only", "--data", "stories.txt"], ["--sample"]):
        result = project.refused("--resume", "EVIL", *extra)
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert "holds objects other than tensors and plain values, so it was not loaded" in last_line(result.stderr)
    assert not (project.path / "CODE-RAN").exists()


def test_a_corrupted_checkpoint_is_refused_before_anything_is_written(project):
    copy_run(project, "FLIPPED")
    path = project.path / "FLIPPED" / "ckpt.pt"
    state = torch.load(path, weights_only=True)
    weight = state["model"]["lm_head.weight"]
    weight.view(-1).view(torch.uint8)[1234] ^= 0x10  # a flipped bit inside a weight: torch.load itself cannot tell
    buffer = io.BytesIO()
    torch.save(state, buffer)
    path.write_bytes(buffer.getvalue())
    before = folder_contents(project.path / "FLIPPED")
    result = project.refused("--resume", "FLIPPED", "--max_steps", "6")
    assert result.returncode == 2 and "fails its checksum: the file is corrupted" in last_line(result.stderr)
    assert folder_contents(project.path / "FLIPPED") == before


def test_another_runs_checkpoint_copied_into_a_run_folder_is_refused(project):
    copy_run(project, "SWAPPED")
    shutil.copy(project.path / "OTHER" / "ckpt.pt", project.path / "SWAPPED" / "ckpt.pt")
    before = folder_contents(project.path / "SWAPPED")
    result = project.refused("--resume", "SWAPPED", "--max_steps", "6")
    assert result.returncode == 2 and "belongs to another run" in last_line(result.stderr)
    assert folder_contents(project.path / "SWAPPED") == before


def test_a_checkpoint_whose_weights_do_not_fit_its_flags_is_one_line(project):
    copy_run(project, "RESHAPED")
    path = project.path / "RESHAPED" / "ckpt.pt"
    state = torch.load(path, weights_only=True)
    state["args"]["n_embd"] = 128  # the flags say one shape, the weights hold another; the checksum still holds
    state["checksum"] = ckpt.checksum(state)
    torch.save(state, path)
    result = project.refused("--resume", "RESHAPED", "--max_steps", "6")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "its weights do not fit its recorded model shape (size mismatch for" in last_line(result.stderr)


@pytest.mark.parametrize("refusal", [["--block_size", "100000"], ["--baseline", "REPLACED"]])
def test_a_refused_overwrite_leaves_the_old_run_as_it_was(project, refusal):
    copy_run(project, "REPLACED")
    before = folder_contents(project.path / "REPLACED")
    result = project.refused(*QUICK, "--max_steps", "3", "--out_dir", "REPLACED", "--overwrite", *refusal)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert folder_contents(project.path / "REPLACED") == before


@pytest.mark.parametrize("name", [".lock", "metrics.jsonl"])
def test_a_run_file_that_is_a_symbolic_link_is_refused_not_followed(project, tmp_path, name):
    copy_run(project, "LINKED")
    target = tmp_path / "elsewhere.txt"
    target.write_text("not the run's\n")
    (project.path / "LINKED" / name).unlink(missing_ok=True)
    (project.path / "LINKED" / name).symlink_to(target)
    result = project.refused("--resume", "LINKED", "--max_steps", "6")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"LINKED/{name} is a symbolic link; a run folder's files must be its own" in last_line(result.stderr)
    assert target.read_text() == "not the run's\n"


def test_a_seed_beyond_64_bits_is_a_flag_error(project):
    result = project.refused(*QUICK, "--seed", str(2**64), "--out_dir", "SEED")
    assert result.returncode == 2 and "argument --seed: 18446744073709551616 is out of range" in last_line(
        result.stderr
    )


def test_the_token_cache_on_a_full_disk_is_exit_4_and_one_line(project, tmp_path):
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "true"]).returncode != 0:
        pytest.fail("this test needs `unshare -rm` (util-linux) to mount a small tmpfs")
    small = tmp_path / "small-disk"
    small.mkdir()
    run = f"{sys.executable} main.py {' '.join(QUICK)} --max_steps 3 --cache_dir {small} --out_dir FULL"
    script = f"mount -t tmpfs -o size=200k tmpfs {small} && {run}"
    result = subprocess.run(["unshare", "-rm", "sh", "-c", script], cwd=project.path, env=project.env(),
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 4 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "the disk is full: no room left for the token cache" in last_line(result.stderr)
    assert last_line(result.stderr).endswith("nothing was trained")
    assert "failed" in project.sessions()[-1].task["tags"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.integers(0, 10**7), flips=st.lists(st.tuples(st.integers(0, 10**7), st.integers(1, 255)), max_size=4))
def test_any_damage_to_a_checkpoint_is_one_line(project, tmp_path_factory, cut, flips):
    """Truncated or bit-flipped anywhere, a checkpoint loads whole and verified, or is a RunFolderError."""
    good = (project.path / "RUN" / "ckpt.pt").read_bytes()
    damaged = bytearray(good[: cut % (len(good) + 1)])
    for at, mask in flips:
        if damaged:
            damaged[at % len(damaged)] ^= mask
    folder = tmp_path_factory.mktemp("damaged")
    shutil.copy(project.path / "RUN" / "run.json", folder / "run.json")
    (folder / "ckpt.pt").write_bytes(bytes(damaged))
    try:
        state = ckpt.load(folder)
    except ckpt.RunFolderError as e:
        assert "\n" not in str(e)
    else:
        assert state["checksum"] == ckpt.checksum(state)
