"""The set-up files agree with each other: pixi.toml, pyproject.toml, README.md and .ci/run.

pixi cannot run where the tests run, so pixi.toml is checked against pixi's own manifest JSON schema, which the
repository keeps in tests/data/ (see SOURCES.md there).
"""

import json
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import jsonschema

ROOT = Path(__file__).resolve().parents[1]
PIXI_SCHEMA = ROOT / "tests" / "data" / "pixi-manifest-schema.json"
REQUIRED = {"torch", "clearml", "numpy", "tqdm", "requests", "plotly", "scipy"}


def load_toml(name: str) -> dict:
    return tomllib.loads((ROOT / name).read_text(encoding="utf-8"))


def requirement_name(spec: str) -> str:
    return re.split(r"[\s<>=!~\[;]", spec, maxsplit=1)[0].lower()


def test_pixi_manifest_follows_pixi_schema():
    schema = json.loads(PIXI_SCHEMA.read_text(encoding="utf-8"))
    jsonschema.validate(load_toml("pixi.toml"), schema)


def test_pixi_targets_the_three_platforms_from_conda_forge():
    workspace = load_toml("pixi.toml")["workspace"]
    assert workspace["channels"] == ["conda-forge"]
    assert set(workspace["platforms"]) == {"linux-64", "osx-arm64", "win-64"}


def test_pixi_installs_the_project_itself_with_its_dependencies():
    pixi, project = load_toml("pixi.toml"), load_toml("pyproject.toml")["project"]
    this = pixi["pypi-dependencies"][project["name"]]
    assert (ROOT / this["path"] / "pyproject.toml").is_file() and this["editable"]
    assert set(this["extras"]) <= set(project["optional-dependencies"])
    assert {requirement_name(d) for d in project["dependencies"]} == REQUIRED
    # Nothing is pinned twice: every Python package comes from pyproject.toml, only Python itself from conda.
    assert set(pixi["dependencies"]) == {"python"}


def run_task(command: str, *extra: str) -> subprocess.CompletedProcess:
    """A pixi task's command as pixi runs it, with this interpreter as `python`."""
    words = shlex.split(command)
    assert words[0] == "python"
    return subprocess.run([sys.executable, *words[1:], *extra], cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_pixi_tasks_run_real_files():
    tasks = load_toml("pixi.toml")["tasks"]
    assert set(tasks) >= {"train", "compare", "test"}
    for name in ("train", "compare"):
        result = run_task(tasks[name]["cmd"], "--help")
        assert result.returncode == 0 and result.stdout.startswith("usage: "), (name, result.stderr[-2000:])
    collected = run_task(tasks["test"]["cmd"], "--collect-only", "-q", "-n", "0", "tests/test_setup.py")
    assert "tests/test_setup.py::test_pixi_tasks_run_real_files" in collected.stdout, collected.stderr[-2000:]


def test_readme_test_command_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "python -m pytest" in readme and "pixi run test" in readme
    assert "python -m pytest" in ci
    assert "pip install -q torch==" in ci and 'pip install -q -e ".[test]"' in ci


def test_readme_documents_every_flag():
    import flags

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    flags = {option for action in flags.build_parser()._actions for option in action.option_strings}
    missing = {flag for flag in flags if flag.startswith("--") and f"`{flag}" not in readme and flag != "--no-bias"}
    assert not missing - {"--help"}
