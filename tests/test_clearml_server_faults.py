"""ClearML servers that are less than working, and configuration files that do not parse.

A run never waits on ClearML for more than a few seconds, never shows a traceback for it, and says in one line what
was wrong: with a server that does not work it goes on offline; with a clearml.conf that does not parse it stops
(exit 2) unless --offline was asked for. The servers are real HTTP servers on 127.0.0.1 (tests/clearml_server.py).
"""

import time

import pytest
from clearml_server import ACCESS_KEY, SECRET_KEY, ClearMLServer
from runner import TINY_MODEL, TRAIN_SAMPLE, make_project, wait_for_line

import tracking

QUICK = [*TINY_MODEL, "--data", "stories.txt", "--max_steps", "1", "--eval_interval", "1", "--eval_iters", "1"]
BROKEN_CONF = 'api {\n  api_server: "http://localhost:8008"\n  credentials {\n    access_key: "k"\n  }\n}\n}}\n'


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    project = make_project(tmp_path_factory.mktemp("faults"))
    (project.path / "stories.txt").write_bytes(TRAIN_SAMPLE.read_bytes()[:200_000])
    return project


def offline_warnings(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "tracked offline" in line]


def test_api_that_hangs_behind_a_ping_is_given_up_within_seconds(project):
    with ClearMLServer("hang") as server:
        process = project.start(*QUICK, "--out_dir", "HANG", **server.env())
        said = wait_for_line(process.stderr, "tracked offline", timeout=60)
        warned_at = time.monotonic()
        _, stderr = process.communicate(timeout=120)
    warning = said.splitlines()[-1]
    assert process.returncode == 0, stderr[-2000:]
    assert f"ClearML server {server.url} does not answer within" in warning and "tracked offline" in warning
    assert server.paths == ["/auth.login"]  # one call, and nothing after it gave up
    assert warned_at - server.times[0] < tracking.SERVER_TIMEOUT_S + 3
    assert offline_warnings(said + stderr) == [warning] and "Traceback" not in said + stderr
    assert (project.path / "HANG" / "ckpt.pt").is_file()


def test_api_answering_errors_means_offline_with_one_warning(project):
    with ClearMLServer(500) as server:
        result = project.run(*QUICK, "--out_dir", "STATUS500", **server.env())
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    [warning] = offline_warnings(result.stderr)
    assert f"ClearML server {server.url} answers HTTP 500 to auth.login" in warning
    assert server.paths == ["/auth.login"]


def test_reachability_is_an_authenticated_call():
    with ClearMLServer("working") as server:
        assert tracking.server_problem(server.url, ACCESS_KEY, SECRET_KEY) is None
        assert "rejects the credentials (HTTP 401" in tracking.server_problem(server.url, ACCESS_KEY, "wrong")
        assert server.paths == ["/auth.login", "/auth.login"]
    with ClearMLServer("hang") as server:
        started = time.monotonic()
        assert "does not answer within" in tracking.server_problem(server.url, ACCESS_KEY, SECRET_KEY)
        assert time.monotonic() - started < tracking.SERVER_TIMEOUT_S + 1
    with ClearMLServer(502) as server:  # a proxy in front of a server that is down
        assert tracking.server_problem(server.url, ACCESS_KEY, SECRET_KEY) == "answers HTTP 502 to auth.login"
        url = server.url
    assert "does not answer (Connection refused)" == tracking.server_problem(url, ACCESS_KEY, SECRET_KEY)


def test_malformed_clearml_conf_is_one_line_and_exit_2(tmp_path):
    project = make_project(tmp_path)
    (project.path / "stories.txt").write_bytes(TRAIN_SAMPLE.read_bytes()[:20_000])
    (project.home / "clearml.conf").write_text(BROKEN_CONF)
    result = project.run(*QUICK, "--out_dir", "RUN")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith(f"main.py: error: ClearML configuration {project.home / 'clearml.conf'} line 7: ")
    assert "--offline" in line and project.sessions() == []


def test_malformed_clearml_conf_with_offline_goes_on_without_it(project, tmp_path):
    conf = tmp_path / "broken.conf"
    conf.write_text(BROKEN_CONF)
    result = project.run(*QUICK, "--offline", "--out_dir", "BROKENCONF", CLEARML_CONFIG_FILE=str(conf))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    [line] = [line for line in result.stderr.splitlines() if str(conf) in line]
    assert f"{conf} line 7" in line and "goes on without it" in line
    assert (project.path / "BROKENCONF" / "ckpt.pt").is_file()
