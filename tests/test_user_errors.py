"""Every mistake a user can make ends with argparse's usage line, one clear `error:` line and exit code 2.

Each case runs main.main in-process (the same code path as the command line, minus interpreter start-up); one case
runs the real command to show the whole output has no traceback.
"""

import pytest
import torch
from runner import TINY_MODEL, TRAIN_SAMPLE, make_project

import flags
import main


def user_error(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main.main(list(argv))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert any(line.startswith("usage: ") for line in err)
    assert err[-1].startswith(f"{flags.build_parser().prog}: error: ")
    return err[-1]


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GPT_FROM_SCRATCH_CACHE", str(tmp_path / "cache"))
    # A run refused once its ClearML task has started (data too small) writes its offline session under HOME.
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


@pytest.fixture
def stories(tmp_path):
    path = tmp_path / "stories.txt"
    path.write_bytes(TRAIN_SAMPLE.read_bytes()[:200_000])
    return path


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--dropout", "1"], "argument --dropout: 1 is out of range"),
        (["--dropout", "-0.1"], "argument --dropout"),
        (["--learning_rate", "0"], "argument --learning_rate: 0 is out of range"),
        (["--learning_rate", "-1e-3"], "argument --learning_rate"),
        (["--learning_rate", "nan"], "not a finite number"),
        (["--batch_size", "0"], "argument --batch_size"),
        (["--block_size", "-5"], "argument --block_size"),
        (["--batch_size", "many"], "'many' is not a valid int"),
        (["--vocab_size", "200"], "argument --vocab_size: 200 is out of range"),
        (["--n_embd", "65", "--n_head", "2"], "--n_embd 65 is not divisible by --n_head 2"),
        (["--min_lr", "1", "--learning_rate", "0.1"], "--min_lr 1.0 is above --learning_rate 0.1"),
        (["--device", "tpu"], "argument --device: invalid choice"),
        (["--eval_only"], "--eval_only needs --resume"),
    ],
)
def test_bad_flag_values(capsys, flags, expected):
    assert expected in user_error(capsys, *flags)


def test_gpu_asked_for_but_absent(capsys, stories):
    absent = "mps" if torch.cuda.is_available() else "cuda"
    message = user_error(capsys, "--data", str(stories), "--device", absent)
    assert f"no {absent.upper()} device; use --device cpu" in message


def test_missing_file(capsys, tmp_path):
    assert "nope.txt" in user_error(capsys, "--data", str(tmp_path / "nope.txt"), "--out_dir", str(tmp_path / "r"))


def test_directory(capsys, tmp_path):
    assert str(tmp_path) in user_error(capsys, "--data", str(tmp_path), "--out_dir", str(tmp_path / "r"))


def test_empty_file(capsys, tmp_path):
    (tmp_path / "empty.txt").write_text("")
    assert "empty" in user_error(capsys, "--data", str(tmp_path / "empty.txt"), "--out_dir", str(tmp_path / "r"))


def test_binary_file(capsys, tmp_path):
    (tmp_path / "blob.txt").write_bytes(bytes(range(256)) * 100)
    message = user_error(capsys, "--data", str(tmp_path / "blob.txt"), "--out_dir", str(tmp_path / "r"))
    assert "text" in message


def test_file_too_small_for_one_window(capsys, tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_text("Once upon a time there was a cat.\n" * 20)
    message = user_error(
        capsys, "--data", str(path), "--out_dir", str(tmp_path / "r"), "--vocab_size", "300", "--block_size", "64",
        "--cache_dir", str(tmp_path / "cache"),
    )  # fmt: skip
    assert "fewer than one training window of block_size + 1 = 65" in message


def test_unwritable_out_dir(capsys, tmp_path, stories):
    (tmp_path / "a-file").write_text("")
    message = user_error(capsys, "--data", str(stories), "--out_dir", str(tmp_path / "a-file" / "run"))
    assert "--out_dir" in message and "not writable" in message


def test_resume_of_a_missing_checkpoint(capsys, tmp_path):
    assert "no checkpoint at" in user_error(capsys, "--resume", str(tmp_path))


def test_resume_of_a_corrupt_checkpoint(capsys, tmp_path):
    (tmp_path / "ckpt.pt").write_bytes(b"not a checkpoint")
    assert "not a readable checkpoint" in user_error(capsys, "--resume", str(tmp_path))


def test_command_line_shows_no_traceback(tmp_path):
    project = make_project(tmp_path)
    result = project.run(*TINY_MODEL, "--data", "missing.txt", timeout=60)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("main.py: error: ")
