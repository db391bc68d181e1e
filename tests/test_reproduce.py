"""`main.py --reproduce RUN` as a user runs it, in a clone of the program with its own git history: the run's code
is rebuilt from its record, rerun, and every evaluation compared, while the clone is left exactly as it was.

The recorded code differs from the clone's first commit in four ways, each of which changes the training loss: a
commit that was never pushed (the clone's remote has only the first commit), a staged change, an unstaged change
in the same file, and a new untracked module that the unstaged change imports.
"""

import json
import shutil
import signal
import zipfile
from pathlib import Path

import numpy as np
import pytest
from http_server import FileServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from runner import QUICK, SERVED_TRAIN, git, make_stories_project, wait_for_line

import data
import flags
import provenance
import records
import reproduce

USER = ("-c", "user.name=t", "-c", "user.email=t@example.com")
# The training loss only (the mean): evaluations take each token's loss, which stays as it was.
TWEAK = """def scaled(loss):
    def tweaked(logits, targets, reduction="mean", cap=0.0):
        return 1.25 * loss(logits, targets) if reduction == "mean" else loss(logits, targets, reduction, cap)
    return tweaked
"""


def edit(path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{path.name} no longer holds {old!r}: pick another line to change"
    path.write_text(text.replace(old, new))


def recorded_code_project(tmp_path):
    """A clone whose remote has its first commit, then the four changes of the module docstring."""
    project = make_stories_project(tmp_path)
    git(tmp_path, "clone", "-q", "--bare", str(project.path), "origin.git")
    git(project.path, "remote", "add", "origin", str(tmp_path / "origin.git"))
    model = project.path / "model.py"
    edit(model, "std=0.02 / math.sqrt", "std=0.04 / math.sqrt")
    git(project.path, *USER, "commit", "-qam", "residual projections start larger")  # never pushed
    edit(model, "std=0.02)", "std=0.03)")
    git(project.path, "add", "model.py")  # staged
    with open(model, "a") as f:  # unstaged, importing an untracked module
        f.write("\nfrom tweak import scaled  # noqa: E402\n\ncross_entropy = scaled(cross_entropy)\n")
    (project.path / "tweak.py").write_text(TWEAK)
    return project


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """The project of recorded_code_project and a run of 20 steps in it (evaluations at 0, 10 and 20)."""
    project = recorded_code_project(tmp_path_factory.mktemp("reproduce"))
    result = project.run(*QUICK, "--max_steps", "20", "--out_dir", "RUN")
    assert result.returncode == 0, result.stderr[-3000:]
    return project


def evaluations(folder) -> list[dict]:
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    return [{k: e[k] for k in ("step", "loss_train", "loss_val", "bpb", "sample")}
            for e in map(json.loads, lines) if e["event"] == "eval"]  # fmt: skip


def checkout_state(project) -> dict:
    """The clone's HEAD, index, status and every file outside its run folders, byte for byte."""
    kept = [p for p in project.path.rglob("*") if not p.relative_to(project.path).parts[0].startswith((".git", "RUN"))]
    files = {p.relative_to(project.path).as_posix(): p.read_bytes() for p in kept if p.is_file()}
    return {
        "HEAD": git(project.path, "rev-parse", "HEAD"),
        "index": (project.path / ".git" / "index").read_bytes(),
        "status": git(project.path, "status", "--porcelain", "--", ".", ":(exclude)RUN*"),
        "worktrees": git(project.path, "worktree", "list", "--porcelain"),
        "files": files,
    }


def last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


@pytest.mark.timeout(180)
def test_a_run_reproduces_exactly_from_its_record_and_the_checkout_is_left_as_it_was(recorded, tmp_path):
    project = recorded
    git(project.path, "add", "-A", "model.py", "tweak.py")
    git(project.path, *USER, "commit", "-qm", "keep the tweak")  # HEAD moves on
    edit(project.path / "model.py", "std=0.03)", "std=0.05)")  # and the tree is dirty again
    (project.path / "scratch.py").write_text("unrelated = 1\n")
    before = checkout_state(project)
    (tmp_path / "tmp").mkdir()

    result = project.run("--reproduce", "RUN", TMPDIR=str(tmp_path / "tmp"))

    assert result.returncode == 0, result.stderr[-3000:]
    assert last_line(result.stdout) == (
        "reproduced exactly: 3 of 3 evaluations identical (Loss/val, Loss/train, BPB, samples)"
    )
    original, rerun = evaluations(project.path / "RUN"), evaluations(project.path / "RUN.reproduction")
    assert [e["step"] for e in original] == [0, 10, 20] and rerun == original
    assert checkout_state(project) == before
    assert list((tmp_path / "tmp").glob("gpt-reproduce-*")) == []
    header = json.loads((project.path / "RUN" / "run.json").read_text())
    session = next(s for s in project.sessions() if "reproduction" in s.task["tags"])
    assert header["clearml"]["task_id"] in session.task["comment"]


@pytest.mark.timeout(180)
def test_the_first_steps_reproduce_from_the_offline_session_alone(recorded, tmp_path):
    project = recorded
    header = json.loads((project.path / "RUN" / "run.json").read_text())
    session = tmp_path / "session.zip"
    shutil.copy(header["clearml"]["offline_session"], session)
    (project.path / "RUN").rename(project.path / "RUN.hidden")
    try:
        result = project.run("--reproduce", str(session), "--max_steps", "10")
    finally:
        (project.path / "RUN.hidden").rename(project.path / "RUN")
    assert result.returncode == 0, result.stderr[-3000:]
    assert last_line(result.stdout).startswith("reproduced exactly: 2 of 2 evaluations identical")
    rerun = evaluations(project.path / "runs" / "session.reproduction")
    assert rerun[:2] == evaluations(project.path / "RUN")[:2]


@pytest.mark.timeout(180)
def test_code_changed_after_recording_is_named_at_its_first_differing_step(recorded):
    project = recorded
    shutil.copytree(project.path / "RUN", project.path / "RUN-edited")
    patch = project.path / "RUN-edited" / "code.patch"
    edit(patch, "1.25 * loss", "1.50 * loss")  # the loss of training steps only: step 0 is the same
    header_path = project.path / "RUN-edited" / "run.json"
    header = json.loads(header_path.read_text())
    header["reproduce"]["code"]["patch_sha256"] = reproduce.hashlib.sha256(patch.read_bytes()).hexdigest()
    header_path.write_text(json.dumps(header))

    result = project.run("--reproduce", "RUN-edited")

    assert result.returncode == reproduce.EXIT_DIFFERS, result.stderr[-3000:]
    assert last_line(result.stdout).startswith("differs from step 10: Loss/val ")
    assert last_line(result.stdout).endswith("; 1 of 3 evaluations identical")


@pytest.mark.timeout(180)
def test_a_run_stopped_and_resumed_reproduces_as_one_run(tmp_path):
    project = make_stories_project(tmp_path)
    first = project.start(*QUICK, "--dropout", "0.1", "--max_steps", "30", "--out_dir", "STOPPED")
    wait_for_line(first.stdout, "step 10:", timeout=90)
    first.send_signal(signal.SIGINT)
    assert first.wait(timeout=60) == 130
    resumed = project.run("--resume", "STOPPED")
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    result = project.run("--reproduce", "STOPPED")

    n = len(evaluations(project.path / "STOPPED"))  # 0, 10 unless stopped while evaluating it, 20, 30
    assert result.returncode == 0, result.stderr[-3000:]
    assert n >= 3 and last_line(result.stdout).startswith(f"reproduced exactly: {n} of {n} evaluations identical")


@pytest.mark.timeout(120)
def test_changed_data_is_refused_in_one_line(recorded):
    project = recorded
    stories = project.path / "stories.txt"
    kept, reproductions = stories.read_bytes(), sorted(project.path.glob("RUN.reproduction*"))
    stories.write_bytes(kept + b"One more story.\n")
    try:
        result = project.run("--reproduce", "RUN")
    finally:
        stories.write_bytes(kept)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    line = last_line(result.stderr)
    assert line.startswith("the data differs from the record: ") and "--new_data" in line
    assert sorted(project.path.glob("RUN.reproduction*")) == reproductions


@pytest.mark.timeout(120)
def test_records_that_cannot_be_reproduced_are_refused(recorded, tmp_path):
    project = recorded
    run = tmp_path / "RUN"
    shutil.copytree(project.path / "RUN", run)
    header = json.loads((run / "run.json").read_text())
    commit = header["reproduce"]["code"]["commit"]
    parser = flags.build_parser()
    assert reproduce.read_recorded(run, parser).reproduce == header["reproduce"]

    (run / "code.patch").write_bytes((run / "code.patch").read_bytes() + b"\n")
    with pytest.raises(reproduce.RecordError, match="not the one recorded .* changed after the run"):
        reproduce.read_recorded(run, parser)
    older = {k: v for k, v in header.items() if k != "reproduce"}
    (run / "run.json").write_text(json.dumps(older))
    with pytest.raises(reproduce.RecordError, match="written before --reproduce existed"):
        reproduce.read_recorded(run, parser)
    garbled = json.loads(json.dumps(header))
    garbled["reproduce"]["code"].update(commit="--output=x", program="../x.py")
    (run / "run.json").write_text(json.dumps(garbled))
    with pytest.raises(reproduce.RecordError, match="lacks code.commit, code.program "):
        reproduce.read_recorded(run, parser)

    with pytest.raises(reproduce.RecordError, match=f"commit {'0' * 12} of RUN is not in this repository .*; "
                                                    f"fetch it with: git fetch origin {'0' * 40}"):  # fmt: skip
        with reproduce.rebuilt_code(project.path, "0" * 40, b"", "RUN"):
            pass
    already_applied = git(project.path, "diff", f"{commit}~1", commit).encode() + b"\n"
    with pytest.raises(reproduce.RecordError, match=f"the changes recorded in RUN do not apply to {commit[:12]}: "):
        with reproduce.rebuilt_code(project.path, commit, already_applied, "RUN"):
            pass
    assert len(git(project.path, "worktree", "list").splitlines()) == 1


@pytest.mark.parametrize("argv", [
    [],
    ["--bias", "--no-compile", "--tags", "a", "b c", "--offline", "--warmup_steps", "0", "--learning_rate", "3e-05"],
    ["--no-bias", "--compile", "--prompt", "-x = y", "--comment", "", "--data", "my stories.txt", "--dropout", "0.1"],
])  # fmt: skip
def test_the_final_flags_turn_back_into_the_command_line_that_gives_them(argv):
    parser = flags.build_parser()
    values = vars(parser.parse_args(argv))
    assert vars(parser.parse_args(reproduce.command_line(parser, values))) == values


def run_of(values: list[float], samples: list[str]) -> records.Run:
    steps = np.arange(len(values)) * 10
    evals = {
        "step": steps,
        "Loss/val": np.array(values),
        "Loss/train": np.array(values) + 1,
        "BPB": np.ones(len(values)),
    }
    return records.Run(path=Path("run"), name="run", evals=evals, samples=lambda i: samples[i])


def test_the_verdict_names_the_first_difference_or_the_largest():
    original = run_of([3.5, 3.2140, 3.0], ["a", "b", "c"])
    assert reproduce.verdict(original, run_of([3.5, 3.2140, 3.0], ["a", "b", "c"]), 20, [])[1]
    text, same = reproduce.verdict(original, run_of([3.5, 3.2145, 3.1], ["a", "b", "c"]), 20, [])
    assert not same and text == (
        "differs from step 10: Loss/val 3.2145 against 3.2140 (+0.02 %); 1 of 3 evaluations identical"
    )
    text, _ = reproduce.verdict(original, run_of([3.5, 3.2140, 3.0], ["a", "b", "d"]), 10, [])
    assert text.startswith("reproduced exactly: 2 of 2 evaluations")
    text, _ = reproduce.verdict(original, run_of([3.5, 3.2140, 3.0], ["a", "b", "d"]), 20, [])
    assert text == 'differs from step 20: the sample "d" against "c"; 2 of 3 evaluations identical'
    text, _ = reproduce.verdict(original, run_of([3.5000001, 3.2145, 3.1], ["a", "b", "c"]), 20, ["device cuda"])
    assert text.startswith("not identical, as expected (device cuda): largest relative difference at step 20: "
                           "Loss/val 3.1000 against 3.0000 (+3.33 %)")  # fmt: skip


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=12,
)
PATCH = b"diff --git a/x b/x\n"
VALID = {
    "code": {"commit": "a" * 40, "root": "/r", "program": "main.py", "cwd": "/r", "patch": "code.patch",
             "patch_sha256": reproduce.hashlib.sha256(PATCH).hexdigest()},
    "data": {"kind": "file", "path": "/r/stories.txt", "bytes": 3, "sha256": "b" * 64},
    "versions": {"torch": "2"},
    "device": {"device": "cpu", "dtype": "float32"},
}  # fmt: skip
PARTS = [f"{section}.{key}" for section, keys in VALID.items() for key in keys] + ["data.files", "code", "device"]
hostile_sections = st.dictionaries(
    st.sampled_from(PARTS),
    json_values | st.sampled_from(["../main.py", "/main.py", "a/b", "", ".", "--output=x", "tinystories"]),
    max_size=3,
).map(lambda changes: mutated(VALID, changes))
hostile_events = st.lists(
    json_values.map(json.dumps)
    | st.builds(lambda flags, section: json.dumps({"event": "resumed", "flags": flags, "reproduce": section}),
                json_values, hostile_sections | json_values)
    | st.builds(lambda flags: json.dumps({"event": "settled", "flags": flags}), json_values),
    max_size=4,
)  # fmt: skip


def mutated(record: dict, changes: dict) -> object:
    out = json.loads(json.dumps(record))
    for name, value in changes.items():
        section, _, key = name.partition(".")
        if key and isinstance(out.get(section), dict):
            out[section][key] = value
        else:
            out[section] = value
    return out


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(section=hostile_sections, flags=json_values, events=hostile_events, patch=st.just(PATCH) | st.binary(max_size=9))
def test_a_hostile_run_folder_is_refused_in_one_line(tmp_path, section, flags, events, patch):
    folder = tmp_path / "hostile"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    (folder / "run.json").write_text(json.dumps({"flags": flags, "clearml": flags, "reproduce": section}))
    (folder / "metrics.jsonl").write_text("\n".join(events))
    (folder / "code.patch").write_bytes(patch)
    (folder / "b").symlink_to(folder / "code.patch")
    read_or_refuse(folder)


@pytest.mark.filterwarnings("ignore:Duplicate name")
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    section=hostile_sections | json_values,
    args=st.dictionaries(st.sampled_from(["max_steps", "tags", "bias", "data", "world_size"]),
                         st.fixed_dictionaries({"value": json_values | st.text()}) | json_values, max_size=4),
    names=st.lists(st.sampled_from(["data/p/t/artifacts/code.patch/code.patch", "data/p/u/artifacts/code.patch/x",
                                    "task.json", "../x"]), max_size=2, unique=True),
)  # fmt: skip
def test_a_hostile_offline_session_is_refused_in_one_line(tmp_path, section, args, names):
    task = {"id": "t", "configuration": {"reproduce": {"value": json.dumps(section)}}, "hyperparams": {"Args": args}}
    with zipfile.ZipFile(tmp_path / "session.zip", "w") as z:
        z.writestr("task.json", json.dumps(task))
        for name in names:
            z.writestr(name, PATCH)
    read_or_refuse(tmp_path / "session.zip")


def read_or_refuse(path: Path) -> None:
    """What a hostile record may do: be read, or be refused in one line; nothing else."""
    try:
        recorded = reproduce.read_recorded(path, flags.build_parser())
    except reproduce.RecordError as e:
        assert "\n" not in str(e)
    else:
        assert recorded.patch == PATCH and isinstance(recorded.flags, dict)
        reproduce.command_line(flags.build_parser(), recorded.flags)


@pytest.mark.timeout(180)
def test_a_stop_signal_reaches_the_rerun_and_the_worktree_is_removed(recorded):
    project = recorded
    reproduction = project.start("--reproduce", "RUN", "--out_dir", "STOPPED-RERUN")
    wait_for_line(reproduction.stdout, "step 0:", timeout=120)
    reproduction.send_signal(signal.SIGTERM)
    assert reproduction.wait(timeout=60) == 130
    assert last_line(reproduction.stderr.read()).startswith("the rerun ended with exit code 130 at step ")
    assert len(git(project.path, "worktree", "list").splitlines()) == 1


@pytest.mark.timeout(120)
def test_tinystories_is_identified_by_the_servers_size_and_etag_and_the_bytes_read(files, tokenizer, tmp_path):
    with FileServer(files) as server:
        splits = data.load_tinystories(base_url=server.url, version="v1", vocab_size=512, train_tokens=20_000,
                                       cache_dir=tmp_path, tokenizer=tokenizer)  # fmt: skip
        identity = provenance.data_identity("tinystories", splits.sources)
        train, valid = identity["files"]
        assert train["url"] == f"{server.url}/{SERVED_TRAIN}" and train["tokens"] == len(splits.train)
        assert valid["bytes"] == splits.val_bytes == valid["size"] and train["bytes"] < train["size"]
        assert reproduce.data_difference(identity) is None
        with open(files[SERVED_TRAIN], "ab") as f:
            f.write(b"One more story.\n<|endoftext|>\n")
        assert reproduce.data_difference(identity).startswith(f"the data differs from the record: {train['url']} ")


def test_a_resumed_segment_with_other_code_or_flags_is_said():
    code = {"code": {"commit": "a" * 40, "patch_sha256": "1"}}
    segments = [{"step": 0, "flags": {"dropout": 0.0, "out_dir": "A"}, "reproduce": code},
                {"step": 40, "flags": {"dropout": 0.0, "out_dir": "B"}, "reproduce": code},
                {"step": 80, "flags": {"dropout": 0.1}, "reproduce": {"code": {"commit": "a" * 40}}}]  # fmt: skip
    assert reproduce.segment_notes(segments) == [
        "resumed at step 80 with other code",
        "resumed at step 80 with --dropout 0.1 (was 0.0)",
    ]
