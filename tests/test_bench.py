"""bench/gpu.sh runs on a GPU machine that may be lent for minutes only: its CPU dry run proves it works first."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIGURES = r"\d+x\d+ T\d+ B\d+: ours [\d,]+ tok/s MFU n/a, baseline [\d,]+ tok/s MFU n/a, \d+\.\d\dx"
LINE = (
    rf"gpu-step cpu \(CPU\), ours=modern\+Muon, baseline=gpt2\+AdamW, fp32 eager \| default {FIGURES} \| "
    rf"gpt2-124M {FIGURES} \| tests: [1-9]\d* passed \(cpu\)"
)


def test_gpu_script_dry_run_prints_one_line_of_figures():
    result = subprocess.run(
        ["bash", "bench/gpu.sh", "--cpu"],
        cwd=ROOT,
        env=os.environ | {"PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1 and re.fullmatch(LINE, lines[0]), result.stdout
